"""fly's persistent pytest worker: one pytest session that runs the tests the fly agent hands it.

The agent starts this script as `python -u fly_worker.py <pytest args...>`. It connects to the
agent's Unix socket (FLY_WORKER_SOCKET), says hello, then runs `pytest.main` with a plugin that
reports the collection and, instead of pytest's own run loop, runs the tests the agent sends, in
the order it sends them, reporting every phase. Stdout, stderr and stdin stay the test suite's:
the protocol travels only on the socket (agent/src/worker/frame.rs has the Rust side).

Two ways to start: with FLY_WORKER_ID the process is one worker. With FLY_WORKER_FORK=N it is
the fork server: it collects once, reports the collection, then forks N workers (each connects
on its own and runs the same loop as above) and stays behind as a small supervisor that reports
how each of them ended and forks a replacement when the agent asks for one (agent/src/worker.rs
explains why).

With FLY_WORKER_TIMEOUT=SECONDS every test runs under a fault handler timer: when a test runs
longer, the stack of every thread is written to this worker's dump file in FLY_WORKER_DUMP_DIR,
where the agent reads it before it kills the worker.

Only the standard library and pytest (7, 8 or 9) are used.
"""

import collections
import faulthandler
import gc
import io
import json
import os
import platform
import queue
import signal
import socket
import struct
import sys
import threading
import time
import traceback
import warnings

import pytest

PROTOCOL = 3
# Both directions refuse frames larger than this; the agent treats a larger one as a crash.
MAX_FRAME = 64 * 1024 * 1024
# Captured output, longrepr and message are cut to this many UTF-8 bytes (keeping the end, where
# the failure usually is) so a report always fits in a frame.
MAX_TEXT = 4 * 1024 * 1024
# When a report still does not fit (many large sections), every text is cut to this instead.
SMALL_TEXT = 256 * 1024
COLLECT_CHUNK = 10000
COLLECT_CHUNK_CHARS = 4 * 1024 * 1024
HEADER = struct.Struct(">I")
U64 = struct.Struct("<Q")
# With a log of unsent frames, a frame waits at most about this long (seconds) before it is
# sent: thousands of tiny tests a second cost a few writes, not one each.
FLUSH_INTERVAL = 0.005
# One encoder for every message: json.dumps with options builds a new encoder per call.
ENCODER = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))

# Most reports of a healthy suite are a passed setup, call or teardown without output. Those are
# written from a template instead of through the JSON encoder: at thousands of tests a second the
# encoder is a noticeable part of a worker's time. Only words that need no JSON escaping may go
# between the template's quotes.
PLAIN_WORDS = frozenset(["", "passed", "failed", "skipped", "error", "xfailed", "xpassed"])
PHASES = frozenset(["setup", "call", "teardown"])
PLAIN_REPORT = (
    '{"type":"report","lease":%d,"index":%d,"phase":"%s","outcome":"%s","category":"%s",'
    '"duration":%r,"start":%r,"stop":%r,"longrepr":"","message":"","sections":[]}'
)
START = '{"type":"start","lease":%d,"index":%d,"at":%r}'
FINISHED = '{"type":"finished","lease":%d,"index":%d}'


# This process's pid, kept current across os.fork() so the per-test checks for "am I a child a
# test forked?" cost no system call.
_PID = [os.getpid()]


def _forked():
    _PID[0] = os.getpid()


_FORK_HOOKS = hasattr(os, "register_at_fork")
if _FORK_HOOKS:
    os.register_at_fork(after_in_child=_forked)


def _pid():
    # Without fork hooks (Python < 3.7), ask the system every time.
    return _PID[0] if _FORK_HOOKS else os.getpid()


def _die(message, code=3):
    """Leave at once: the agent is gone or broke the protocol, so nobody could use a report."""
    try:
        sys.stderr.write("fly worker: %s\n" % message)
        sys.stderr.flush()
    except Exception:
        pass
    os._exit(code)


class PendingLog:
    """A copy of the frames a worker has written but not sent yet, in a file the agent reads.

    The worker sends its frames in batches (one write per few milliseconds, not one per test),
    yet the agent must learn everything a worker said before it died: which test it was
    running, and the reports of tests it finished since the last write. So every frame also
    goes into this shared memory map, which survives the process. Its header (little-endian
    u64s) holds `base`, the number of bytes the connection had carried (after the hello) when
    the frames in the map began; `length`, how many bytes of frames follow the header; and the
    test running now as its lease + 1 (0: none) and index, for a connection whose byte count
    means nothing any more (a test wrote into the socket itself). The agent, having read the
    socket to its end, takes whatever part of the map it has not received
    (agent/src/worker/supervisor.rs).
    """

    HEADER = struct.Struct("<QQQQ")
    SIZE = 1024 * 1024

    def __init__(self, path):
        import mmap

        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            os.ftruncate(fd, self.HEADER.size + self.SIZE)
            self.map = mmap.mmap(fd, self.HEADER.size + self.SIZE)
        finally:
            os.close(fd)
        self.length = 0

    def room(self, size):
        return self.length + size <= self.SIZE

    def append(self, frame):
        start = self.HEADER.size + self.length
        self.map[start:start + len(frame)] = frame
        self.length += len(frame)
        # The length is written after the bytes: a worker dying in between left nothing half.
        U64.pack_into(self.map, 8, self.length)

    def sent(self, total):
        """Everything up to `total` bytes of the connection went out: the map starts afresh.
        The length is cleared before the base moves, so the map never claims bytes twice."""
        self.length = 0
        U64.pack_into(self.map, 8, 0)
        U64.pack_into(self.map, 0, total)

    def running(self, lease, index):
        # The index first: a reader that sees the lease sees its index.
        U64.pack_into(self.map, 24, index)
        U64.pack_into(self.map, 16, lease + 1)

    def idle(self):
        U64.pack_into(self.map, 16, 0)


class Channel:
    """Length-prefixed JSON frames over the agent's socket.

    Writes are buffered and go out on `flush`. Without a `PendingLog` the worker flushes when
    a test starts and before it blocks, so the agent always knows which test is running if the
    process dies. With one (`batch`), every frame is also in the log the agent reads after a
    worker's death, so the writes can be batched: the worker flushes when it asks for work,
    before it blocks, and at most FLUSH_INTERVAL after a frame was buffered (a flusher thread
    sees to that while a long test runs).
    """

    def __init__(self, path):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(path)
        self.rfile = self.sock.makefile("rb")
        self.lock = threading.Lock()
        self.buf = bytearray()
        self.pid = _pid()
        self.log = None
        self.total = 0  # bytes sent since the log was attached
        self.closed = False
        self.dirty = None  # set when the buffer fills from empty, for the flusher thread

    def batch(self, path):
        """Keeps a `PendingLog` at `path` and flushes at most every FLUSH_INTERVAL from a
        thread of its own. Called right after the hello went out; False if it cannot be made
        (the worker then flushes at every test as before)."""
        try:
            log = PendingLog(path)
        except (OSError, ValueError) as exc:
            sys.stderr.write("fly worker: cannot keep a log of unsent frames at %s: %s\n" % (path, exc))
            return False
        with self.lock:
            self.flush_locked()
            log.sent(0)
            self.total = 0
            self.log = log
            self.dirty = threading.Event()
        thread = threading.Thread(target=self._flush_loop, name="fly-worker-flush", daemon=True)
        thread.start()
        return True

    def _flush_loop(self):
        dirty = self.dirty
        pid = self.pid
        while True:
            dirty.wait()
            time.sleep(FLUSH_INTERVAL)
            if _pid() != pid:
                return
            with self.lock:
                dirty.clear()
                if self.closed:
                    return
                self.flush_locked()

    @staticmethod
    def encode(obj):
        # ensure_ascii=False keeps output small; "replace" turns lone surrogates (from output
        # decoded with surrogateescape) into "?" instead of invalid UTF-8 the agent would refuse.
        return ENCODER.encode(obj).encode("utf-8", "replace")

    def send(self, obj, data=None):
        # A process forked by a test inherits this object; only the worker itself may speak
        # (and write into the log the worker shares with the agent).
        if _pid() != self.pid:
            return
        if data is None:
            data = self.encode(obj)
        frame = HEADER.pack(len(data)) + data
        with self.lock:
            if self.closed:
                return
            log = self.log
            if log is None:
                self.buf += frame
                return
            if not log.room(len(frame)):
                self.flush_locked()
            if log.room(len(frame)):
                if not self.buf:
                    self.dirty.set()
                self.buf += frame
                log.append(frame)
            else:
                # Larger than the whole log: it goes out at once, as without a log.
                self.buf += frame
                self.flush_locked()

    def flush(self):
        if _pid() != self.pid:
            return
        with self.lock:
            self.flush_locked()

    def flush_locked(self):
        if not self.buf or self.closed:
            return
        try:
            self.sock.sendall(self.buf)
        except OSError as exc:
            _die("lost the connection to the agent: %s" % exc, 1)
        self.total += len(self.buf)
        del self.buf[:]
        if self.log is not None:
            self.log.sent(self.total)

    def recv(self):
        """The next message from the agent, or None when the agent closed the socket."""
        header = self.rfile.read(HEADER.size)
        if len(header) < HEADER.size:
            return None
        (size,) = HEADER.unpack(header)
        if size > MAX_FRAME:
            raise ValueError("frame of %d bytes is over the limit" % size)
        data = self.rfile.read(size)
        if len(data) < size:
            return None
        return json.loads(data.decode("utf-8"))

    def _recv_exact(self, size):
        data = b""
        while len(data) < size:
            chunk = self.sock.recv(size - len(data))
            if not chunk:
                return None
            data += chunk
        return data

    def recv_unbuffered(self):
        """Like `recv`, without the buffered reader.

        The fork server reads on a thread while its main thread forks; a buffered reader's lock
        taken by that thread would stay locked forever in the child, which closes the reader.
        """
        header = self._recv_exact(HEADER.size)
        if header is None:
            return None
        (size,) = HEADER.unpack(header)
        if size > MAX_FRAME:
            raise ValueError("frame of %d bytes is over the limit" % size)
        data = self._recv_exact(size) if size else b""
        if data is None:
            return None
        return json.loads(data.decode("utf-8"))

    def close(self):
        if _pid() == self.pid:
            with self.lock:
                self.closed = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def drop(self):
        """Closes this process's handle only: the connection stays the fork server's."""
        try:
            self.rfile.close()
            self.sock.close()
        except OSError:
            pass


def _hello(channel, worker, token, forker=False):
    channel.send(
        {
            "type": "hello",
            "protocol": PROTOCOL,
            "worker": worker,
            "token": token,
            "pid": os.getpid(),
            "python": platform.python_version(),
            "pytest": pytest.__version__,
            "forker": forker,
        }
    )
    channel.flush()


def _cut(text, limit):
    """Keep the last `limit` UTF-8 bytes of text, saying at the start that it was cut."""
    # A str of n code points encodes to at most 4n bytes: most texts need no encoding at all.
    if len(text) * 4 <= limit:
        return text
    data = text.encode("utf-8", "replace")
    if len(data) <= limit:
        return text
    kept = data[len(data) - limit:].decode("utf-8", "ignore")
    return "[fly: %d bytes cut from the start of this output]\n%s" % (len(data) - limit, kept)


def _first_line(text):
    for line in text.splitlines():
        if line.strip():
            return line
    return ""


def _longrepr_text(report):
    """The report's longrepr as pytest's terminal prints it in FAILURES and ERRORS.

    `report.longreprtext` strips leading whitespace, which would eat the indentation of the
    first source line; render it the way the terminal reporter does instead.
    """
    if report.longrepr is None:
        return ""
    try:
        from _pytest._io import TerminalWriter

        out = io.StringIO()
        writer = TerminalWriter(file=out)
        writer.hasmarkup = False
        report.toterminal(writer)
        return out.getvalue().rstrip()
    except Exception:
        return report.longreprtext


def _message(report):
    """The one-line summary pytest's short test summary shows for this report."""
    if report.passed and not hasattr(report, "wasxfail"):
        return ""
    if hasattr(report, "wasxfail"):
        reason = str(report.wasxfail)
        if reason.startswith("reason: "):
            reason = reason[len("reason: "):]
        if report.failed:
            # strict xpass: pytest puts the reason into longrepr
            return _first_line(report.longreprtext) or reason
        return reason
    longrepr = report.longrepr
    if report.skipped and isinstance(longrepr, tuple) and len(longrepr) == 3:
        reason = str(longrepr[2])
        if reason.startswith("Skipped: "):
            return reason[len("Skipped: "):]
        return "" if reason == "Skipped" else reason
    crash = getattr(longrepr, "reprcrash", None)
    message = getattr(crash, "message", None)
    if isinstance(message, str) and message:
        return _first_line(message)
    return _first_line(report.longreprtext)


def _group(item):
    """The item's xdist_group name, as pytest-xdist's loadgroup names it ("" if none)."""
    names = set()
    for mark in item.iter_markers("xdist_group"):
        name = mark.args[0] if mark.args else mark.kwargs.get("name", "default")
        names.add(str(name))
    return "_".join(sorted(names))


def _quick_snap(capture):
    """pytest's `FDCapture.snap` for `capture`, answering "" at once when nothing was written.

    `snap` seeks to the start of the capture file, reads it, seeks back and truncates it: four
    system calls and several layers of io per stream and phase, for tests that print nothing.
    After a snap the file is empty and positioned at 0, and output through the descriptor or
    `sys.stdout` lands in the file at once (pytest writes through), so a file whose end is at 0
    holds nothing: the snap would return "" and leave the file exactly as it is.
    """
    snap = capture.snap
    fd = capture.tmpfile.fileno()
    lseek = os.lseek
    end = os.SEEK_END

    def quick_snap():
        if capture._state == "suspended" and lseek(fd, 0, end) == 0:
            return ""
        return snap()

    return quick_snap


def _quicken_capture(config):
    """Gives the global capture's stdout and stderr `_quick_snap`. Only pytest's own fd
    capture is touched; capsys/capfd and any other kind keep their own snap."""
    try:
        from _pytest.capture import FDCapture
    except ImportError:
        return
    capman = config.pluginmanager.get_plugin("capturemanager")
    multi = getattr(capman, "_global_capturing", None)
    for name in ("out", "err"):
        capture = getattr(multi, name, None)
        if (
            type(capture) is FDCapture
            and "snap" not in vars(capture)
            and getattr(capture, "_state", None) in ("started", "suspended")
            and hasattr(getattr(capture, "tmpfile", None), "fileno")
        ):
            try:
                capture.snap = _quick_snap(capture)
            except (OSError, ValueError):
                pass


def _identity(fd):
    try:
        st = os.fstat(fd)
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


class ForkPlan:
    """What the fork server needs to start its workers.

    `outputs` holds pairs of write ends of stdout and stderr pipes the agent made: the first
    `count` for the first workers, the rest spares for replacements of crashed workers (the
    agent names the pair with each fork it asks for). `stdout`/`stderr` identify this process's
    own output pipes, so that every descriptor pointing at them (pytest keeps duplicates for
    capturing and for faulthandler) can be pointed at the worker's pipes after the fork.
    """

    def __init__(self, count, fds):
        if count < 1 or len(fds) < 2 * count or len(fds) % 2:
            raise ValueError("FLY_WORKER_OUTPUT must name two descriptors per worker")
        self.count = count
        self.outputs = [(fds[2 * i], fds[2 * i + 1]) for i in range(len(fds) // 2)]
        # The descriptors still open here: a closed number may be reused for something else.
        self.open = set(fds)
        for fd in fds:
            # Only the forked workers may hold these, not whatever the collection starts.
            os.set_inheritable(fd, False)
        self.stdout = _identity(1)
        self.stderr = _identity(2)

    def usable(self, output):
        return (
            isinstance(output, int)
            and 0 <= output < len(self.outputs)
            and all(fd in self.open for fd in self.outputs[output])
        )

    def rewire(self, output):
        """Points every descriptor of the fork server's stdout/stderr at the pipes `output`."""
        out, err = self.outputs[output]
        try:
            fds = [int(name) for name in os.listdir("/dev/fd")]
        except (OSError, ValueError):
            fds = range(1024)
        for fd in fds:
            if fd in self.open:
                continue
            ident = _identity(fd)
            if ident is None:
                continue
            if ident == self.stdout:
                target = out
            elif ident == self.stderr:
                target = err
            else:
                continue
            os.dup2(target, fd, inheritable=os.get_inheritable(fd))
        self.close()

    def close_pair(self, output):
        """The fork server's copies of a pair a worker now holds: its pipes end with it."""
        for fd in self.outputs[output]:
            if fd in self.open:
                self.open.discard(fd)
                try:
                    os.close(fd)
                except OSError:
                    pass

    def close(self):
        for fd in sorted(self.open):
            try:
                os.close(fd)
            except OSError:
                pass
        self.open.clear()


class FlyWorkerPlugin:
    """Reports the collection and replaces pytest's run loop with the agent's queue.

    A reader thread takes the agent's messages as they come (so a revoke is answered even while
    a long test runs); the main thread runs tests. They share the queue under `cond`.
    """

    def __init__(self, channel, token, plan=None, timeout=None, dump_dir=None):
        self.channel = channel
        self.token = token
        self.plan = plan
        # Seconds a test may run (None: no limit), and where the stacks go when it runs longer.
        self.timeout = timeout
        self.dump_dir = dump_dir
        # Under a timeout every report goes out at once, so the agent knows which phase a test
        # that runs out of time is in (a setup that hangs is an error in setup).
        self.flush_reports = timeout is not None
        self.cond = threading.Condition()
        self.queue = collections.deque()  # (lease, index) not started yet, in order
        self.nomore = False
        self.want_sent = False
        self.shutdown = False
        self.exiting = False
        self.items = None
        self.deselected = 0
        self.config = None
        self.stats = None  # the terminal reporter's stats, kept by this plugin while serving
        self.current = None  # (lease, index) of the test running now
        # The setup stack is prepared for this item (the last test's nextitem). When that item
        # was revoked, the stack must be torn down to whatever really runs next.
        self.stack_for = None
        self.fixup_for = None
        # The lease of the nextitem given to the test started last: not given back on revoke.
        self.committed = None

    # --- the agent's messages (reader thread) ---------------------------------------------

    def _batch(self):
        """Batches this worker's writes, keeping what is unsent in a log the agent can read
        (see `Channel.batch`). Not under a timeout: then every report goes out at once."""
        if self.timeout is None and self.dump_dir:
            worker = os.environ.get("FLY_WORKER_ID", "0")
            self.channel.batch(os.path.join(self.dump_dir, "pending-%s.bin" % worker))

    def start_reader(self):
        thread = threading.Thread(target=self._read_loop, name="fly-worker-channel", daemon=True)
        thread.start()

    def _read_loop(self):
        try:
            while True:
                msg = self.channel.recv()
                if msg is None:
                    break
                self._handle(msg)
        except Exception:
            if self.exiting:
                return
            _die("bad message from the agent:\n" + traceback.format_exc())
        if self.exiting:
            return
        # The agent is gone: nobody will read a report, and its tests will be rerun elsewhere.
        # Take our own process group down with us so no test subprocess lingers.
        try:
            if os.getpgid(0) == os.getpid():
                os.killpg(os.getpid(), signal.SIGKILL)
        except OSError:
            pass
        _die("the agent closed the connection", 1)

    def _handle(self, msg):
        kind = msg.get("type") if isinstance(msg, dict) else None
        if kind == "run":
            tests = []
            for entry in msg["tests"]:
                lease, index = entry
                if (
                    not isinstance(lease, int)
                    or not isinstance(index, int)
                    or self.items is None
                    or not 0 <= index < len(self.items)
                ):
                    raise ValueError("bad test in run: %r" % (entry,))
                tests.append((lease, index))
            with self.cond:
                self.queue.extend(tests)
                self.nomore = False
                self.want_sent = False
                self.cond.notify()
        elif kind == "nomore":
            with self.cond:
                self.nomore = True
                self.want_sent = False
                self.cond.notify()
        elif kind == "revoke":
            wanted = set(msg["leases"])
            with self.cond:
                if not msg.get("all"):
                    # pytest tears down after a test only what its nextitem does not share, so
                    # that one stays: moving it would put the teardown off into another test.
                    wanted.discard(self.committed)
                removed = [lease for lease, _ in self.queue if lease in wanted]
                if removed:
                    kept = [entry for entry in self.queue if entry[0] not in wanted]
                    self.queue.clear()
                    self.queue.extend(kept)
                self.channel.send({"type": "revoked", "leases": removed})
                self.channel.flush()
                self.cond.notify()
        elif kind == "shutdown":
            with self.cond:
                self.shutdown = True
                self.cond.notify()
        else:
            raise ValueError("unknown message type %r" % (kind,))

    # --- collection ------------------------------------------------------------------------

    @pytest.hookimpl
    def pytest_configure(self, config):
        self.config = config

    @pytest.hookimpl
    def pytest_deselected(self, items):
        self.deselected += len(items)

    @pytest.hookimpl
    def pytest_collection_finish(self, session):
        self.items = session.items

    def _send_collection(self, session):
        # Chunks of at most COLLECT_CHUNK tests and about COLLECT_CHUNK_CHARS characters, so
        # even huge parametrized ids stay far below the frame limit.
        chunks = [[]]
        size = 0
        for item in session.items:
            path, line = item.location[0], item.location[1]
            entry = [item.nodeid, str(path), line + 1 if isinstance(line, int) else 0, _group(item)]
            entry_size = len(entry[0]) + len(entry[1]) + len(entry[3]) + 16
            if chunks[-1] and (len(chunks[-1]) >= COLLECT_CHUNK or size + entry_size > COLLECT_CHUNK_CHARS):
                chunks.append([])
                size = 0
            chunks[-1].append(entry)
            size += entry_size
        for number, chunk in enumerate(chunks):
            self.channel.send(
                {
                    "type": "collected",
                    "tests": chunk,
                    "deselected": self.deselected,
                    "done": number == len(chunks) - 1,
                }
            )
        self.channel.flush()

    @staticmethod
    def _collection_failed(session):
        return bool(session.testsfailed) and not getattr(
            session.config.option, "continue_on_collection_errors", False
        )

    # --- forking ---------------------------------------------------------------------------

    def _fork_workers(self, session):
        """Forks the workers, then supervises them; returns only in a worker."""
        plan = self.plan
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:
                pass
        # Worker pids to worker ids, shared with the reaper thread under `cond`.
        children = {}
        cond = threading.Condition(threading.Lock())
        for worker in range(plan.count):
            if self._fork_one(session, worker, worker, worker, children, cond):
                return
        for worker in range(plan.count):
            plan.close_pair(worker)
        self._supervise(session, children, cond)

    def _fork_one(self, session, worker, slot, output, children, cond):
        """Forks worker `worker` (PYTEST_XDIST_WORKER=gw<slot>, output pipes `output`).

        Returns True in the new worker, False in the fork server. `cond` is held from the fork
        until the agent has been told the pid, so the reaper cannot report the end of a worker
        before its start.
        """
        with cond:
            try:
                with warnings.catch_warnings():
                    # Python 3.12+ warns when forking with threads running; under -W error that
                    # would raise in this process after the child already exists.
                    warnings.simplefilter("ignore", DeprecationWarning)
                    pid = os.fork()
            except OSError as exc:
                self.channel.send({"type": "forkfailed", "worker": worker, "error": str(exc)})
                self.channel.flush()
                return False
            if pid != 0:
                try:
                    # Also done by the child: whoever runs first, the group exists before the
                    # agent hears of the pid.
                    os.setpgid(pid, pid)
                except OSError:
                    pass
                children[pid] = worker
                self.channel.send({"type": "forked", "worker": worker, "pid": pid})
                self.channel.flush()
                cond.notify_all()
                return False
        try:
            self._become_worker(session, worker, slot, output)
        except BaseException:
            # Nothing of the session may go on in a half-made worker.
            traceback.print_exc()
            _die("could not start worker %d after the fork" % worker)
        return True

    def _become_worker(self, session, worker, slot, output):
        """Turns a freshly forked child into worker `worker` with its own output and channel."""
        plan = self.plan
        try:
            # Its own process group, so the agent can stop this worker and what its tests start
            # without touching the others.
            os.setpgid(0, 0)
        except OSError:
            pass
        os.environ["FLY_WORKER_ID"] = str(worker)
        os.environ["PYTEST_XDIST_WORKER"] = "gw%d" % slot
        plan.rewire(output)
        self.channel.drop()
        self.channel = Channel(os.environ["FLY_WORKER_SOCKET"])
        _hello(self.channel, worker, self.token)
        self._batch()
        self.plan = None
        # pytest's global capture writes into temporary files shared with every other process
        # forked from the same parent; start it afresh so this worker's output stays its own.
        capman = session.config.pluginmanager.get_plugin("capturemanager")
        if capman is not None:
            capman.stop_global_capturing()
            capman.start_global_capturing()
            capman.suspend_global_capture()
        self.start_reader()

    def _supervise(self, session, children, cond):
        """The fork server's last job: report how each worker ended, fork the replacements the
        agent asks for, and leave once the agent needs no more forks and every worker ended.

        Returns only in a replacement worker. Forks happen on this (the main) thread, the only
        one a child keeps, so a replacement can return into pytest's run loop; a reader thread
        takes the agent's requests and a reaper thread waits for the workers.
        """
        channel = self.channel
        plan = self.plan
        events = queue.Queue()

        def read_agent():
            try:
                while True:
                    msg = channel.recv_unbuffered()
                    if msg is None:
                        break
                    events.put(("agent", msg))
            except Exception:
                pass
            events.put(("gone", None))

        def reap():
            while True:
                with cond:
                    while not children:
                        cond.wait()
                try:
                    pid, status = os.waitpid(-1, 0)
                except ChildProcessError:
                    # Something reaped them behind our back: nobody can say how they ended.
                    with cond:
                        lost = list(children.items())
                        children.clear()
                        for pid, worker in lost:
                            try:
                                os.killpg(pid, signal.SIGKILL)
                            except OSError:
                                pass
                            channel.send({"type": "reaped", "worker": worker, "status": signal.SIGKILL})
                        channel.flush()
                    events.put(("reaped", None))
                    continue
                with cond:
                    worker = children.pop(pid, None)
                    if worker is not None:
                        channel.send({"type": "reaped", "worker": worker, "status": status})
                        channel.flush()
                # Anything else is something the collection started; not a worker.
                if worker is not None:
                    events.put(("reaped", None))

        def kill_all():
            with cond:
                pids = list(children)
            for pid in pids:
                try:
                    os.killpg(pid, signal.SIGKILL)
                except OSError:
                    pass

        threading.Thread(target=read_agent, name="fly-fork-server-agent", daemon=True).start()
        threading.Thread(target=reap, name="fly-fork-server-reaper", daemon=True).start()
        done = False
        while True:
            with cond:
                if done and not children:
                    break
            kind, msg = events.get()
            if kind == "gone":
                # The agent is gone: nobody could report on the workers or use their reports.
                kill_all()
                os._exit(1)
            if kind != "agent":
                continue
            what = msg.get("type") if isinstance(msg, dict) else None
            if what == "fork":
                worker, slot, output = msg.get("worker"), msg.get("slot"), msg.get("output")
                if not (isinstance(worker, int) and isinstance(slot, int) and plan.usable(output)):
                    kill_all()
                    _die("bad fork request from the agent: %r" % (msg,))
                if self._fork_one(session, worker, slot, output, children, cond):
                    return
                plan.close_pair(output)
            elif what == "done":
                done = True
            else:
                kill_all()
                _die("unexpected message for the fork server: %r" % (msg,))
        # Nothing of pytest's session end may run here: each worker ran its own.
        os._exit(0)

    # --- running ---------------------------------------------------------------------------

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtestloop(self, session):
        # The collection is reported here, not in pytest_collection_finish: pytest calls that
        # even when the collection ends in a usage error (a path that does not exist).
        if self._collection_failed(session):
            # pytest's own run loop raises Interrupted and prints the errors; exit code 2.
            return None
        self._send_collection(session)
        if session.config.option.collectonly:
            return True
        # What exists now (the collection, mostly) lives as long as the session. Moving it out
        # of the garbage collector's sight makes every later full collection cheaper (they
        # otherwise walk all of it, again and again, while thousands of tests run), and keeps
        # the pages a fork shares with the workers from being written to by the collector.
        if hasattr(gc, "freeze"):
            gc.freeze()
        if self.plan is not None:
            self._fork_workers(session)
        self._quiet_terminal(session.config)
        try:
            self._serve(session)
        finally:
            self._teardown_leftovers(session)
        return True

    def _quiet_terminal(self, config):
        """Stops the terminal reporter's per-test work while serving.

        The agent throws a worker's progress output away, and the reporter would ask every
        plugin for each report's status a second time. Its per-test hooks are hidden (pytest
        registers only routines as hooks) and this plugin keeps its `stats` instead, so the
        summary and plugins reading the stats see every report.
        """
        pm = config.pluginmanager
        reporter = pm.get_plugin("terminalreporter")
        if reporter is None or not isinstance(getattr(reporter, "stats", None), dict):
            return
        try:
            pm.unregister(reporter)
            for name in ("pytest_runtest_logstart", "pytest_runtest_logreport", "pytest_runtest_logfinish"):
                setattr(reporter, name, None)
            pm.register(reporter, "terminalreporter")
        except Exception:
            sys.stderr.write("fly worker: could not quiet the terminal reporter:\n")
            traceback.print_exc()
            if pm.get_plugin("terminalreporter") is None:
                pm.register(reporter, "terminalreporter")
            return
        self.stats = reporter.stats

    def _want_if_needed(self):
        # Called with cond held. Ask as soon as fewer than two tests are held, so the answer
        # can arrive while the current test runs.
        if not self.nomore and not self.want_sent and len(self.queue) < 2:
            self.want_sent = True
            self.channel.send({"type": "want"})
            # The answer should arrive while the current test runs: no batching for this.
            self.channel.flush()

    def _serve(self, session):
        items = session.items
        channel = self.channel
        cond = self.cond
        queue = self.queue
        pid = _pid()
        # pytest's own loop calls the hook this way (item.ihook looks up conftests per test).
        protocol = session.config.hook.pytest_runtest_protocol
        timeout = self.timeout
        dump = self._open_dump() if timeout else None
        began = 0.0
        _quicken_capture(session.config)
        while True:
            with cond:
                # A test starts only when the test after it is known (or known not to exist),
                # so nextitem is right and shared fixtures live exactly as long as needed.
                while not self.shutdown and not (len(queue) >= 2 or (queue and self.nomore)):
                    self._want_if_needed()
                    channel.flush()
                    cond.wait()
                if self.shutdown:
                    return
                lease, index = queue.popleft()
                following = queue[0][1] if queue else None
                self.committed = queue[0][0] if queue else None
                self._want_if_needed()
            item = items[index]
            nextitem = items[following] if following is not None else None
            if self.stack_for is not None and self.stack_for is not item:
                self.fixup_for = item
            self.current = (lease, index)
            if dump is not None:
                # The fault handler's own thread writes the stacks without needing the GIL, so
                # the dump comes even from a test stuck in C code.
                faulthandler.dump_traceback_later(timeout, repeat=False, file=dump, exit=False)
                began = time.monotonic()
            log = channel.log
            if log is not None:
                log.running(lease, index)
            channel.send(None, (START % (lease, index, time.time())).encode())
            if log is None:
                channel.flush()
            protocol(item=item, nextitem=nextitem)
            if _pid() != pid:
                # A test forked and its child came back here: it must not act as the worker.
                os._exit(0)
            if dump is not None:
                faulthandler.cancel_dump_traceback_later()
                if time.monotonic() - began >= timeout:
                    # It finished just in time: its dump must not pass for the next test's.
                    try:
                        dump.seek(0)
                        dump.truncate()
                    except OSError:
                        pass
            self.current = None
            # pytest tears everything down when a plugin asked the session to stop; -x and
            # --maxfail themselves belong to the coordinator, so the loop goes on.
            if session.shouldfail or session.shouldstop:
                self.stack_for = None
            else:
                self.stack_for = nextitem
            channel.send(None, (FINISHED % (lease, index)).encode())
            if log is not None:
                log.idle()

    def _open_dump(self):
        """This worker's file for the stacks of a test that runs out of time (the agent reads
        it as `stack-<worker id>.txt`), or None when it cannot be made."""
        if not self.dump_dir:
            return None
        path = os.path.join(self.dump_dir, "stack-%s.txt" % os.environ.get("FLY_WORKER_ID", "0"))
        try:
            return open(path, "wb", buffering=0)
        except OSError as exc:
            sys.stderr.write("fly worker: cannot open %s for stack dumps: %s\n" % (path, exc))
            return None

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_setup(self, item):
        # The last test was torn down for a next test that was revoked: tear down what this
        # test does not share with it, inside this test's setup so errors get reported.
        if self.fixup_for is item:
            self.fixup_for = None
            item.session._setupstate.teardown_exact(item)

    def _teardown_leftovers(self, session):
        if self.stack_for is None:
            return
        self.stack_for = None
        try:
            session._setupstate.teardown_exact(None)
        except BaseException:
            # No test is left to carry this error; the agent keeps the worker's stderr.
            sys.stderr.write("fly worker: error tearing down fixtures at the end of the session:\n")
            traceback.print_exc()

    @pytest.hookimpl
    def pytest_runtest_logreport(self, report):
        current = self.current
        if current is None:
            return
        lease, index = current
        status = self.config.hook.pytest_report_teststatus(report=report, config=self.config)
        category = status[0] if status else ""
        if self.stats is not None:
            self.stats.setdefault(category, []).append(report)
        phase = report.when
        outcome = report.outcome
        if (
            report.longrepr is None
            and not report.sections
            and type(category) is str
            and category in PLAIN_WORDS
            and outcome in PLAIN_WORDS
            and phase in PHASES
            and not hasattr(report, "wasxfail")
        ):
            duration = float(report.duration)
            stop = float(getattr(report, "stop", 0) or time.time())
            start = float(getattr(report, "start", 0) or stop - duration)
            # x - x is 0.0 only for finite numbers, which JSON can carry.
            if duration - duration == 0.0 and start - start == 0.0 and stop - stop == 0.0:
                data = PLAIN_REPORT % (lease, index, phase, outcome, category, duration, start, stop)
                self.channel.send(None, data.encode())
                if self.flush_reports:
                    self.channel.flush()
                return
        self._send_report(report, lease, index, str(category))
        if self.flush_reports:
            self.channel.flush()

    def _send_report(self, report, lease, index, category):
        try:
            longrepr = _longrepr_text(report)
        except Exception:
            longrepr = repr(report.longrepr)
        try:
            message = _message(report)
        except Exception:
            message = ""
        stop = getattr(report, "stop", 0) or time.time()
        start = getattr(report, "start", 0) or stop - report.duration
        sections = [[str(name), str(text)] for name, text in report.sections]
        msg = {
            "type": "report",
            "lease": lease,
            "index": index,
            "phase": report.when,
            "outcome": report.outcome,
            "category": category,
            "duration": float(report.duration),
            "start": float(start),
            "stop": float(stop),
            "longrepr": _cut(longrepr, MAX_TEXT),
            "message": _cut(message, MAX_TEXT),
            "sections": [[name, _cut(text, MAX_TEXT)] for name, text in sections],
        }
        data = self.channel.encode(msg)
        if len(data) > MAX_FRAME - 1024:
            msg["longrepr"] = _cut(longrepr, SMALL_TEXT)
            msg["message"] = _cut(message, SMALL_TEXT)
            msg["sections"] = [[name, _cut(text, SMALL_TEXT)] for name, text in sections[:64]]
            data = self.channel.encode(msg)
        self.channel.send(msg, data)


def main():
    try:
        path = os.environ["FLY_WORKER_SOCKET"]
        token = os.environ["FLY_WORKER_TOKEN"]
        forks = os.environ.get("FLY_WORKER_FORK")
        if forks:
            fds = [int(fd) for fd in os.environ["FLY_WORKER_OUTPUT"].split(",")]
            plan = ForkPlan(int(forks), fds)
            worker = 0
        else:
            plan = None
            worker = int(os.environ["FLY_WORKER_ID"])
        timeout = float(os.environ.get("FLY_WORKER_TIMEOUT") or 0) or None
        if timeout is not None and not 0 < timeout < float("inf"):
            raise ValueError("FLY_WORKER_TIMEOUT must be a positive number of seconds")
        dump_dir = os.environ.get("FLY_WORKER_DUMP_DIR")
    except (KeyError, ValueError, OSError) as exc:
        sys.stderr.write("fly_worker.py is started by the fly agent, not by hand (%s)\n" % exc)
        return 3
    try:
        channel = Channel(path)
    except OSError as exc:
        sys.stderr.write("fly worker: cannot connect to the agent at %s: %s\n" % (path, exc))
        return 3
    _hello(channel, worker, token, forker=plan is not None)
    # pytest names itself after argv[0] in its usage messages; say "pytest", as the console
    # script would, not this file's name.
    sys.argv[0] = "pytest"
    plugin = FlyWorkerPlugin(channel, token, plan, timeout, dump_dir)
    if plan is None:
        plugin._batch()
        plugin.start_reader()
    code = 3
    try:
        code = int(pytest.main(sys.argv[1:], plugins=[plugin]))
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:
        traceback.print_exc()
    # A forked worker speaks on its own connection, made after the fork.
    channel = plugin.channel
    plugin.exiting = True
    channel.send({"type": "exited", "exit_code": code})
    channel.flush()
    channel.close()
    # The interpreter's last garbage collection, once atexit handlers have run, would walk
    # every object left (the items, the reports of thousands of tests): the worst part of a
    # large worker's exit, which the agent waits for. Objects alive at the exit are freed with
    # their modules as usual; only cycles still unreclaimed then stay uncollected, as the
    # collection frozen above already does (and Python does not promise their finalizers run
    # at exit anyway).
    if hasattr(gc, "freeze"):
        gc.freeze()
    return code


if __name__ == "__main__":
    sys.exit(main())
