#!/usr/bin/env python3
"""Side-by-side benchmark: fly against plain pytest and pytest-xdist on synthetic suites.

What it measures, and why:

  For each suite written by `../shared/bench/gen_suite.py` (tail, trivial, fixtures, cpu) it
  times whole commands, end to end, the way a user waits for them (subprocess wall time with
  time.perf_counter, start-up and exit included):

    collect    pytest --collect-only -q       one collection: the floor of any pytest runner
    pytest     pytest -q -p no:cacheprovider  plain, one process
    xdist      pytest -n N (and, for fixtures, pytest -n 4 --dist loadfile)
    fly 1st    fly-coordinator run --local on a fresh database (no duration history)
    fly        the same command again on that database (with history): the figure that counts

  and reads `gen_suite.py bound DIR N`, the makespan lower bound (longest test, or total test
  time / N), which plus one collection is what a perfect scheduler could reach.

  The machine this runs on is small and shared, so absolute times drift from minute to
  minute. Every command of a suite therefore runs back to back in the same round, the rounds
  alternate the order of the commands, and each ratio is the median over --repeat rounds of
  that round's fly / other (paired, side by side); times shown are medians. The targets are
  checked on those ratios (PASS/MISS).

  For fly's second run it also reads fly's own SQLite database (the workers' phase reports
  carry start and stop times) to show where the time went: start-up (launch to the first test
  starting), the span in which tests ran and how busy the workers were in it, when the longest
  test started, and the finish (last test done, summary line printed, process exit). Processes
  a command leaves behind after exiting are reported (and killed); so are hangs (--timeout).

It is a report, not a test: it exits 0 even when a target is missed, and non-zero only when it
cannot measure at all (build failure, missing generator). Stdlib only.

usage:
  python3 bench/run.py [--suites tail,trivial,fixtures,cpu] [--repeat 3] [--out DIR]
                       [--no-build | --fly-bin PATH] [--timeout 300] [--fly-args "--dist load"]

The report is printed as Markdown and also written to OUT/report.md, with every raw sample in
OUT/results.json. If bench/farm exists, its simulated-farm benchmark
(`cargo run --release -p fly-bench-farm`) runs after the suites and its output is included.
"""

import argparse
import datetime
import json
import os
import platform
import re
import resource
import shlex
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GEN_SUITE = ROOT.parent / "shared" / "bench" / "gen_suite.py"
VENV_PYTHON = ROOT / ".venv" / "bin" / "python"
FARM_DIR = ROOT / "bench" / "farm"

# The same quiet, cache-free pytest arguments for every runner, so all of them do the same work.
PYTEST_ARGS = ["-q", "-p", "no:cacheprovider"]

# Each suite: the worker count the targets are stated for, the xdist variants to time against,
# and the targets, as (what fly is compared with, the largest allowed ratio fly / that).
SUITES = {
    "tail": {
        "workers": 8,
        "xdist": {"xdist -n 8": ["-n", "8"]},
        "targets": [("bound+collect", 1.10), ("xdist -n 8", 0.60)],
    },
    "trivial": {
        "workers": 2,
        "xdist": {"xdist -n 2": ["-n", "2"]},
        "targets": [("xdist -n 2", 0.50), ("pytest", 0.75)],
    },
    "fixtures": {
        "workers": 4,
        "xdist": {
            "xdist -n 4": ["-n", "4"],
            "xdist -n 4 --dist loadfile": ["-n", "4", "--dist", "loadfile"],
        },
        "targets": [("xdist -n 4 --dist loadfile", 0.70)],
    },
    "cpu": {
        "workers": 2,
        "xdist": {"xdist -n 2": ["-n", "2"]},
        "targets": [("xdist -n 2", 1.00)],
    },
}

FLY_FIRST = "fly 1st run"
FLY = "fly"  # the second run, with history: the figure the targets use
FLY_BIN = ROOT / "target" / "release" / "fly-coordinator"


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def sh(cmd, cwd=ROOT, check=True, capture=False):
    """Runs a set-up command (not a timed one), echoing it."""
    log("$ " + " ".join(shlex.quote(str(c)) for c in cmd))
    result = subprocess.run(
        [str(c) for c in cmd], cwd=cwd, text=True, capture_output=capture
    )
    if check and result.returncode != 0:
        if capture:
            log(result.stdout + result.stderr)
        sys.exit(f"bench: command failed with exit code {result.returncode}: {cmd}")
    return result


def clean_env():
    """The environment for timed commands: no settings of ours or the caller's leak in."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("FLY_", "PYTEST_")) and k != "VIRTUAL_ENV"
    }
    env["PYTHONDONTWRITEBYTECODE"] = "1"  # the pycache is written once, by the warm-up
    return env


def ensure_venv(python):
    """Creates .venv as .ci/run does when it is missing or lacks pytest-xdist."""
    if python.exists():
        probe = subprocess.run(
            [str(python), "-c", "import pytest, xdist"], capture_output=True
        )
        if probe.returncode == 0:
            return
    if not python.exists():
        sh([sys.executable, "-m", "venv", ROOT / ".venv"])
    sh(
        [
            ROOT / ".venv" / "bin" / "pip",
            "install",
            "-q",
            "--disable-pip-version-check",
            "-r",
            ROOT / "tests" / "requirements.txt",
        ]
    )


class Sample:
    """One timed command: wall time, exit code, pytest's summary line and when it appeared,
    and for fly the breakdown of its run read from its database."""

    def __init__(self, seconds, code, summary, timed_out, launched_at, summary_after, cpu=None):
        self.seconds = seconds
        self.cpu = cpu  # user + system CPU seconds of the command and everything it waited for
        self.code = code
        self.summary = summary
        self.timed_out = timed_out
        self.launched_at = launched_at  # epoch seconds, to line up with fly's records
        self.summary_after = summary_after  # seconds from launch; None if never printed
        self.breakdown = None

    @property
    def ok(self):
        return self.code == 0 and not self.timed_out

    def as_json(self):
        return {
            "seconds": self.seconds,
            "cpu_seconds": self.cpu,
            "exit_code": self.code,
            "summary": self.summary,
            "summary_after": self.summary_after,
            "timed_out": self.timed_out,
            "breakdown": self.breakdown,
        }


SUMMARY_RE = re.compile(r"^=*\s*(\d+ (passed|failed|tests? collected).*?)\s*=*$")


def summary_line(output):
    """pytest's last summary line ('403 passed in 6.54s'), or the last line of output."""
    lines = [line for line in output.splitlines() if line.strip()]
    for line in reversed(lines):
        match = SUMMARY_RE.match(line.strip())
        if match:
            return match.group(1)
    return lines[-1].strip() if lines else ""


def timed(cmd, cwd, timeout, log_path):
    """Runs one command and returns its wall time.

    Its output goes through a pipe to `log_path`, and the moment pytest's summary line appears
    is noted: that is when a user sees the verdict, which can be earlier than the exit. The
    command runs in a session of its own; one that outlives `timeout` is killed with its whole
    process group and reported as timed out, and processes it leaves behind after exiting are
    reported and killed."""
    summary_at = []

    def pump(pipe, out):
        for raw in pipe:
            now = time.perf_counter()
            line = raw.decode(errors="replace")
            out.write(line)
            if SUMMARY_RE.match(line.strip()):
                summary_at.append(now)

    # Commands run one at a time, so the growth of this process's children's CPU usage is
    # this command's (its descendants count once they are waited for).
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started_epoch = time.time()
    start = time.perf_counter()
    with open(log_path, "w") as out:
        proc = subprocess.Popen(
            [str(c) for c in cmd],
            cwd=cwd,
            env=clean_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        reader = threading.Thread(target=pump, args=(proc.stdout, out), daemon=True)
        reader.start()
        timed_out = False
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            os.killpg(proc.pid, signal.SIGKILL)
            code = proc.wait()
        seconds = time.perf_counter() - start
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
        leftovers = process_group_alive(proc.pid)
        if leftovers:
            os.killpg(proc.pid, signal.SIGKILL)
        reader.join(timeout=10)
    output = Path(log_path).read_text(errors="replace")
    summary_after = (summary_at[-1] - start) if summary_at else None
    sample = Sample(seconds, code, summary_line(output), timed_out, started_epoch, summary_after, cpu)
    if leftovers:
        log(f"  !! left processes running after it exited (killed): {' '.join(map(str, cmd))}")
    if not sample.ok:
        reason = f"timed out after {timeout}s" if timed_out else f"exit code {code}"
        log(f"  !! {reason}: {' '.join(map(str, cmd))} (in {cwd}); output in {log_path}")
        log("  " + "\n  ".join(output.splitlines()[-15:]))
    return sample


def process_group_alive(pgid):
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def fly_breakdown(db, sample):
    """Where the time of fly's latest run in `db` went, from fly's own records.

    The workers' phase reports carry epoch start/stop times on this machine's clock, so they
    line up with the harness's launch time and the moment fly printed pytest's summary."""
    try:
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
        run = con.execute(
            "SELECT id FROM runs ORDER BY created_at DESC LIMIT 1"
        ).fetchone()
        if run is None:
            return None
        run_id = run[0]
        first, last, busy, workers = con.execute(
            "SELECT min(start), max(stop), sum(stop - start),"
            " count(DISTINCT agent_id || ':' || worker)"
            " FROM reports WHERE run_id = ? AND superseded = 0",
            (run_id,),
        ).fetchone()
        longest = con.execute(
            "SELECT start, duration FROM reports WHERE run_id = ? AND phase = 'call'"
            " AND superseded = 0 ORDER BY duration DESC LIMIT 1",
            (run_id,),
        ).fetchone()
        tests = con.execute(
            "SELECT count(*) FROM results WHERE run_id = ?", (run_id,)
        ).fetchone()[0]
        con.close()
    except sqlite3.Error as err:
        log(f"  !! cannot read fly's database {db}: {err}")
        return None
    if first is None or not workers:
        return None
    span = last - first
    launched = sample.launched_at
    summary = launched + sample.summary_after if sample.summary_after is not None else None
    return {
        "startup": first - launched,
        "test_span": span,
        "to_summary": summary - last if summary else None,
        "after_summary": launched + sample.seconds - summary if summary else None,
        "busy_per_worker": busy / workers,
        "utilisation": busy / (workers * span) if span > 0 else None,
        "gap_per_test_ms": 1000 * (workers * span - busy) / tests if tests else None,
        "longest_test_starts_at": (longest[0] - first) if longest else None,
        "longest_test": longest[1] if longest else None,
        "workers": workers,
    }


def median(values):
    return statistics.median(values) if values else None


def fmt(seconds):
    return "n/a" if seconds is None else f"{seconds:.2f}"


def bench_suite(kind, args, out, python):
    spec = SUITES[kind]
    n = spec["workers"]
    suite_dir = out / "suites" / kind
    logs = out / "logs"
    dbs = out / "db"
    shutil.rmtree(suite_dir, ignore_errors=True)
    sh([sys.executable, GEN_SUITE, kind, suite_dir])
    # The lower bound is unknown for cpu: its durations depend on the machine.
    bound_out = sh(
        [sys.executable, GEN_SUITE, "bound", suite_dir, n], check=False, capture=True
    )
    bound = float(bound_out.stdout) if bound_out.returncode == 0 else None

    pytest = [python, "-m", "pytest"] + PYTEST_ARGS
    fly_args = shlex.split(args.fly_args)

    def fly_cmd(db):
        return [
            args.fly_bin, "run", "--local", "--workers", n, "--db", db,
            "--python", python, "--project", f"bench-{kind}", *fly_args, "--",
            *PYTEST_ARGS,
        ]  # fmt: skip

    # Warm-up, untimed: writes the bytecode caches and fills the page cache for everyone.
    warm_env = clean_env()
    del warm_env["PYTHONDONTWRITEBYTECODE"]
    subprocess.run([str(c) for c in pytest + ["--collect-only"]], cwd=suite_dir, env=warm_env, capture_output=True)

    samples = {}

    def record(name, sample):
        samples.setdefault(name, []).append(sample)

    def unit_simple(name, cmd, rnd):
        def go():
            slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
            log(f"  [{kind} round {rnd + 1}] {name}")
            record(name, timed(cmd, suite_dir, args.timeout, logs / f"{kind}-{slug}-r{rnd + 1}.log"))
        return go  # fmt: skip

    def unit_fly(rnd):
        def go():
            db = dbs / f"{kind}-r{rnd + 1}.db"
            for suffix in ("", "-wal", "-shm"):
                Path(f"{db}{suffix}").unlink(missing_ok=True)
            for name, tag in ((FLY_FIRST, "1st"), (FLY, "2nd")):
                log(f"  [{kind} round {rnd + 1}] {name}")
                sample = timed(fly_cmd(db), suite_dir, args.timeout, logs / f"{kind}-fly-{tag}-r{rnd + 1}.log")
                if sample.ok:
                    sample.breakdown = fly_breakdown(db, sample)
                record(name, sample)
        return go  # fmt: skip

    for rnd in range(args.repeat):
        units = [
            unit_simple("collect", pytest + ["--collect-only"], rnd),
            unit_simple("pytest", pytest, rnd),
            *(unit_simple(name, pytest + extra, rnd) for name, extra in spec["xdist"].items()),
            unit_fly(rnd),
        ]
        # Alternate the order between rounds so that drift in the machine's load does not
        # always favour whichever command happens to run first.
        for unit in units if rnd % 2 == 0 else reversed(units):
            unit()

    if bound is not None:
        # The floor for a whole command: the makespan bound plus one collection, per round.
        samples["bound+collect"] = [
            Sample(bound + c.seconds, c.code, "", c.timed_out, c.launched_at, None)
            for c in samples["collect"]
        ]
    med = {name: median([s.seconds for s in ss if s.ok]) for name, ss in samples.items()}
    return {"kind": kind, "workers": n, "bound": bound, "samples": samples, "median": med}


def paired_ratio(samples, num, den):
    """Median over rounds of num / den, each ratio from two commands of the same round: the
    load of a shared machine drifts between rounds far more than within one."""
    pairs = zip(samples.get(num, []), samples.get(den, []))
    ratios = [a.seconds / b.seconds for a, b in pairs if a.ok and b.ok and b.seconds > 0]
    return median(ratios)


def breakdown_medians(samples):
    rows = [s.breakdown for s in samples if s.ok and s.breakdown]
    if not rows:
        return None
    keys = rows[0].keys()
    return {
        k: median([r[k] for r in rows if r.get(k) is not None]) for k in keys
    }


def report_suite(res):
    kind, n, med, samples = res["kind"], res["workers"], res["median"], res["samples"]
    spec = SUITES[kind]
    lines = [f"### `{kind}`, {n} workers", ""]
    bound = res["bound"]
    lines.append(
        f"Lower bound (`gen_suite.py bound`, {n} workers): "
        + (f"{bound:.2f} s" if bound is not None else "unknown (machine-dependent durations)")
        + "."
    )
    lines += [
        "",
        "| command | median s | min–max s | fly / this | CPU s | summary |",
        "|---|---:|---:|---:|---:|---|",
    ]
    order = ["collect", "pytest", *spec["xdist"], FLY_FIRST, FLY, "bound+collect"]
    for name in order:
        ss = samples.get(name)
        if not ss:
            continue
        ok = [s.seconds for s in ss if s.ok]
        failed = len(ss) - len(ok)
        spread = f"{min(ok):.2f}–{max(ok):.2f}" if ok else "n/a"
        cell = fmt(med.get(name)) + (f" ({failed} failed)" if failed else "")
        fly_vs = "" if name in (FLY, FLY_FIRST, "collect") else fmt(paired_ratio(samples, FLY, name))
        label = {FLY: "**fly** (2nd run, with history)", "bound+collect": "bound + collect"}.get(name, name)
        cpu = median([s.cpu for s in ss if s.ok and s.cpu is not None])
        lines.append(f"| {label} | {cell} | {spread} | {fly_vs} | {fmt(cpu)} | {ss[-1].summary} |")
    lines += ["", "| target | ratio | limit | | 1st run's ratio |", "|---|---:|---:|---|---:|"]
    verdicts = []
    for other, limit in spec["targets"]:
        ratio = paired_ratio(samples, FLY, other)
        verdict = "n/a" if ratio is None else "PASS" if ratio <= limit else "MISS"
        verdicts.append((kind, other, ratio, limit, verdict))
        first = fmt(paired_ratio(samples, FLY_FIRST, other))
        lines.append(f"| fly / {other} | {fmt(ratio)} | ≤ {limit:.2f} | **{verdict}** | {first} |")
    bd = breakdown_medians(samples.get(FLY, []))
    if bd:
        lines += [
            "",
            "Where fly's time went (2nd run, medians; from fly's database and the time its "
            "summary line appeared):",
            "",
            f"- start-up, launch to the first test starting: {fmt(bd['startup'])} s",
            f"- tests, first start to last stop: {fmt(bd['test_span'])} s; workers busy in test "
            f"phases {100 * (bd['utilisation'] or 0):.0f}% of it ({fmt(bd['busy_per_worker'])} s "
            f"each), {bd['gap_per_test_ms']:.2f} ms between phases per test",
            f"- the longest test ({fmt(bd['longest_test'])} s) started "
            f"{fmt(bd['longest_test_starts_at'])} s into the tests",
            f"- last test done to the summary line: {fmt(bd.get('to_summary'))} s; "
            f"summary line to exit: {fmt(bd.get('after_summary'))} s",
        ]
    return lines, verdicts


def run_farm(timeout):
    """The simulated-farm benchmark, when bench/farm exists: its own output, verbatim."""
    lines = ["## Simulated farm (`bench/farm`)", ""]
    if not FARM_DIR.is_dir():
        return lines + ["bench/farm does not exist yet: skipped (hook: `run_farm` in bench/run.py)."]
    cmd = ["cargo", "run", "--release", "-q", "-p", "fly-bench-farm"]
    log("$ " + " ".join(cmd))
    try:
        res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return lines + [f"`{' '.join(cmd)}` timed out after {timeout} s."]
    # Paths under the project read better (and leak less) relative to it.
    stdout = res.stdout.replace(f"{ROOT}/", "").strip("\n")
    lines += [f"`{' '.join(cmd)}` (exit code {res.returncode}):", "", "```", stdout]
    if res.returncode != 0:
        lines.append(res.stderr.rstrip()[-3000:])
    return lines + ["```"]


def machine():
    cpus = os.cpu_count()
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:
        pass
    model = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpus} CPUs, {model}, {platform.system()} {platform.release()}"


def loadavg():
    """The 1, 5 and 15 minute load averages: how much else wanted these cores."""
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "unknown"


def versions(python):
    """The interpreter, pytest, pytest-xdist, and the state of the tree fly is built from."""
    probe = subprocess.run(
        [str(python), "-c", "import sys, pytest, xdist; print(sys.version.split()[0], pytest.__version__, xdist.__version__)"],
        capture_output=True, text=True,
    )  # fmt: skip
    py, pt, xd = (probe.stdout.split() + ["?"] * 3)[:3]
    rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    tree = f"tree at {rev or '?'}{' with uncommitted changes' if dirty else ''}"
    return f"Python {py}, pytest {pt}, pytest-xdist {xd}; {tree}"  # fmt: skip


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--suites", default="tail,trivial,fixtures,cpu", help="comma-separated suite kinds")
    parser.add_argument("--repeat", type=int, default=3, help="rounds per suite; figures are medians")
    parser.add_argument("--out", type=Path, help="where suites, databases, logs and the report go (default: a new temp dir)")
    parser.add_argument("--python", type=Path, default=VENV_PYTHON, help="interpreter with pytest and pytest-xdist (default: .venv, created if missing)")
    parser.add_argument("--no-build", action="store_true", help="use the release binaries as they are")
    parser.add_argument("--fly-bin", type=Path, help="time this fly-coordinator binary instead of building one (implies --no-build)")
    parser.add_argument("--timeout", type=float, default=300, help="seconds before a command counts as hung and is killed")
    parser.add_argument("--fly-args", default="", help="extra arguments for `fly-coordinator run`, e.g. \"--dist load\"")
    parser.add_argument("--no-farm", action="store_true", help="skip the simulated-farm benchmark")
    args = parser.parse_args()  # fmt: skip

    if args.repeat < 1:
        sys.exit("bench: --repeat must be at least 1")
    kinds = [k.strip() for k in args.suites.split(",") if k.strip()]
    unknown = [k for k in kinds if k not in SUITES]
    if unknown:
        sys.exit(f"bench: unknown suite(s) {unknown}; known: {', '.join(SUITES)}")
    if not GEN_SUITE.is_file():
        sys.exit(f"bench: the suite generator is missing: {GEN_SUITE}")
    out = (args.out or Path(tempfile.mkdtemp(prefix="fly-bench-"))).resolve()
    for sub in ("suites", "logs", "db"):
        (out / sub).mkdir(parents=True, exist_ok=True)

    python = args.python.absolute()  # not resolve(): a venv's python is a symlink
    if python == VENV_PYTHON:
        ensure_venv(python)
    source_bin = args.fly_bin or FLY_BIN
    build = not args.no_build and not args.fly_bin
    # Describe the tree before building: others may commit or edit while the suites run.
    built_from = versions(python) + (" when the build started" if build else "")
    if build:
        built = sh(["cargo", "build", "--release", "--bins"], check=False)
        if built.returncode != 0:
            sys.exit("bench: `cargo build --release --bins` failed; fix the build, or time the "
                     "binaries as they are with --no-build or --fly-bin PATH")
    if not source_bin.is_file():
        sys.exit(f"bench: {source_bin} is missing; build with `cargo build --release --bins`")
    if not build:
        mtime = datetime.datetime.fromtimestamp(source_bin.stat().st_mtime, datetime.timezone.utc)
        built_from += f"; timed {source_bin.name} as found, built {mtime:%Y-%m-%d %H:%M} UTC"
    # Others may rebuild target/release while this runs: time a private copy of the binary.
    args.fly_bin = out / "bin" / "fly-coordinator"
    args.fly_bin.parent.mkdir(exist_ok=True)
    shutil.copy2(source_bin, args.fly_bin)

    started = datetime.datetime.now(datetime.timezone.utc)
    load_at_start = loadavg()
    results = [bench_suite(kind, args, out, python) for kind in kinds]

    cmdline = "python3 bench/run.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    lines = [
        "## Side by side",
        "",
        f"- command: `{cmdline.strip()}`",
        f"- date: {started:%Y-%m-%d %H:%M} UTC; {args.repeat} rounds per suite, medians",
        f"- machine: {machine()}; load average {load_at_start} at the start, {loadavg()} at the end",
        f"- {built_from}",
        f"- pytest arguments for every runner: `{' '.join(PYTEST_ARGS)}`"
        + (f"; extra fly arguments: `{args.fly_args}`" if args.fly_args else ""),
        "",
    ]
    verdicts = []
    for res in results:
        suite_lines, suite_verdicts = report_suite(res)
        lines += suite_lines + [""]
        verdicts += suite_verdicts
    lines += ["### Targets", "", "| suite | fly / | ratio | limit | verdict |", "|---|---|---:|---:|---|"]
    lines += [f"| {k} | {o} | {fmt(r)} | ≤ {lim:.2f} | {v} |" for k, o, r, lim, v in verdicts]
    lines.append("")
    if not args.no_farm:
        lines += run_farm(args.timeout) + [""]

    text = "\n".join(lines)
    print(text)
    (out / "report.md").write_text(text + "\n")
    raw = {
        "date": started.isoformat(),
        "machine": machine(),
        "suites": {
            r["kind"]: {
                "workers": r["workers"],
                "bound": r["bound"],
                "median": r["median"],
                "samples": {k: [s.as_json() for s in v] for k, v in r["samples"].items()},
            }
            for r in results
        },
    }
    (out / "results.json").write_text(json.dumps(raw, indent=1))
    log(f"bench: report in {out / 'report.md'}, raw samples in {out / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
