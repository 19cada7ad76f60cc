//! One worker's supervisor: relays the pool's commands to the worker, checks every message the
//! worker sends against what it was given, enforces the test timeout, and turns the worker's
//! end (clean or not) into events, reporting a test it died in as crashed, timed out or
//! interrupted.
//!
//! A spawned worker's end is its child process's exit status; a forked worker's end is what
//! the fork server reports about it (see `forker.rs`).

use std::collections::{HashSet, VecDeque};
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::ExitStatus;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fly_common::outcome::Phase;
use fly_common::proto::{CollectedTest, PhaseReport, Section};
use tokio::io::AsyncWriteExt;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;
use tokio::process::Child;
use tokio::sync::{mpsc, oneshot};
use tokio::time::{sleep_until, timeout_at, Instant};
use tracing::{debug, warn};

use super::frame::{
    encode_frame, AgentMessage, FrameError, FrameReader, ReportMessage, WorkerMessage,
};
use super::tail::{Output, Tail};
use super::{
    collection_digest, end_group, kill_group, signal_name, Group, Internal, Kill, KillKind,
    PoolEvent, TIMEOUT_GRACE,
};

/// A worker closed its socket without saying it exits: it is dying; kill it if it lingers.
pub(crate) const EOF_GRACE: Duration = Duration::from_secs(5);
/// A worker said it exits but its process lives on (a non-daemon thread a test left behind,
/// a slow atexit handler): kill it after this long.
pub(crate) const LINGER_GRACE: Duration = Duration::from_secs(30);
/// After the process ended, how long to wait for the rest of its messages and output (held
/// open only by a process that escaped the group).
pub(crate) const DRAIN_WAIT: Duration = Duration::from_secs(3);
/// Lines of the worker's stderr and stdout quoted in a crash report.
const CRASH_LINES: usize = 40;
/// How Python's fault handler starts its dump, and how much of the dump a report quotes.
const FAULT_HANDLER_HEADER: &str = "Fatal Python error:";
const FAULT_DUMP_LINES: usize = 200;
/// How the fault handler's timer starts its dump of every thread's stack.
const TIMEOUT_HEADER: &str = "Timeout (";
/// Lines of a timed-out test's stack dump a report quotes (every thread of a busy test).
const TIMEOUT_DUMP_LINES: usize = 1000;

/// What the pool asks of one worker.
#[derive(Debug, Clone)]
pub(crate) enum Command {
    Assign(Vec<(u64, u32)>),
    NoMore,
    Revoke(Vec<u64>),
    Shutdown,
    /// Give back every unstarted test, finish the running one and leave; work assigned from
    /// now on is given back at once.
    Drain,
}

/// What a supervisor watches for beyond the protocol.
pub(crate) struct SupervisorOptions {
    /// How long a test may run.
    pub(crate) timeout: Option<Duration>,
    /// Where the worker's fault handler writes every thread's stack when a test times out.
    pub(crate) dump: PathBuf,
    /// Where the worker keeps the frames it has not sent yet (`PendingLog` in fly_worker.py).
    pub(crate) unsent: PathBuf,
    /// The run's collection digest, which a spawned replacement must collect.
    pub(crate) expected_digest: Option<String>,
    /// The worker replaces a crashed one: ending before it ever asked for work is a crash too.
    pub(crate) replacement: bool,
}

pub(crate) type Frame = Result<WorkerMessage, FrameError>;
/// A worker's (or the fork server's) side of the socket, read in the supervisor's own loop.
pub(crate) type Frames = FrameReader<OwnedReadHalf>;

/// How a worker process ended.
pub(crate) struct ProcessEnd {
    pub(crate) status: std::io::Result<ExitStatus>,
    /// Set for a worker that was never forked: the fork server's end stands in for its own.
    pub(crate) stand_in: Option<StandIn>,
}

impl ProcessEnd {
    pub(crate) fn of(status: std::io::Result<ExitStatus>) -> ProcessEnd {
        ProcessEnd {
            status,
            stand_in: None,
        }
    }
}

/// What the fork server said, printed and suffered, for the workers it never forked.
pub(crate) struct StandIn {
    pub(crate) exit_message: Option<i32>,
    pub(crate) output: String,
    pub(crate) kill: Option<Kill>,
}

/// Where a worker's end comes from.
pub(crate) enum Process {
    /// Spawned by the pool: wait for the child.
    Spawned(Child),
    /// Forked by the fork server, which reports the end (the agent cannot wait for it).
    Forked(oneshot::Receiver<ProcessEnd>),
}

impl Process {
    async fn wait(&mut self) -> ProcessEnd {
        match self {
            Process::Spawned(child) => ProcessEnd::of(child.wait().await),
            Process::Forked(end) => match end.await {
                Ok(end) => end,
                Err(_) => ProcessEnd::of(Err(std::io::Error::other(
                    "the pool stopped watching its fork server",
                ))),
            },
        }
    }
}

/// The test a worker is running.
struct Running {
    lease: u64,
    index: u32,
    started: Instant,
    started_epoch: f64,
    /// The last phase reported, and whether it passed: decides which phase a crash is in.
    last: Option<(Phase, bool)>,
}

impl Running {
    /// The phase a test that ended here failed in, and pytest's category for it. Without
    /// `reports_flushed` a setup report may still sit in the worker's buffer, so "nothing
    /// reported" counts as the call; with it (under a timeout) it means the setup.
    fn failed_phase(&self, reports_flushed: bool) -> (Phase, &'static str) {
        match self.last {
            None if reports_flushed => (Phase::Setup, "error"),
            None | Some((Phase::Setup, true)) => (Phase::Call, "failed"),
            Some(_) => (Phase::Teardown, "error"),
        }
    }
}

/// How the test a worker was running came to an end without its reports.
enum Ending {
    /// The worker died (or broke the protocol).
    Crashed(String),
    /// The test ran past the timeout; the stacks the fault handler dumped.
    TimedOut { seconds: f64, dump: String },
    /// The pool stopped the worker.
    Interrupted(String),
}

pub(crate) struct Supervisor {
    id: u32,
    group: Arc<Mutex<Group>>,
    central: mpsc::Sender<Internal>,
    output: Output,
    /// False for a forked worker: the fork server collected for it.
    collects: bool,
    to_worker: mpsc::UnboundedSender<AgentMessage>,
    to_worker_rx: Option<mpsc::UnboundedReceiver<AgentMessage>>,
    unstarted: VecDeque<(u64, u32)>,
    /// The leases in `unstarted` and `running`, for quick checks of large assignments.
    held: HashSet<u64>,
    running: Option<Running>,
    collection: Vec<CollectedTest>,
    collection_done: bool,
    exit_message: Option<i32>,
    /// Set once the worker broke the protocol; later messages are ignored.
    broken: bool,
    /// The worker's stream ended without lining up with its log of unsent frames.
    unaligned: bool,
    options: SupervisorOptions,
    /// When the running test times out (the timeout plus the grace for the stack dump).
    deadline: Option<Instant>,
    /// The stack dump of the test that timed out: (its lease, the dump).
    timed_out: Option<(u64, String)>,
    /// The worker is giving its work back and leaving.
    draining: bool,
    /// The pool told the worker to leave (shutdown or drain): its end is expected.
    leaving: bool,
    /// It asked for work at least once: it got through its start.
    asked: bool,
}

impl Supervisor {
    /// `output` is the worker's stdout and stderr, already draining.
    pub(crate) fn new(
        id: u32,
        output: Output,
        collects: bool,
        group: Arc<Mutex<Group>>,
        central: mpsc::Sender<Internal>,
        options: SupervisorOptions,
    ) -> Supervisor {
        let (to_worker, to_worker_rx) = mpsc::unbounded_channel();
        Supervisor {
            id,
            group,
            central,
            output,
            collects,
            to_worker,
            to_worker_rx: Some(to_worker_rx),
            unstarted: VecDeque::new(),
            held: HashSet::new(),
            running: None,
            collection: Vec::new(),
            collection_done: false,
            exit_message: None,
            broken: false,
            unaligned: false,
            options,
            deadline: None,
            timed_out: None,
            draining: false,
            leaving: false,
            asked: false,
        }
    }

    pub(crate) async fn run(
        mut self,
        mut process: Process,
        mut connection: oneshot::Receiver<Result<UnixStream, String>>,
        mut commands: mpsc::UnboundedReceiver<Command>,
    ) {
        let mut awaiting_connection = true;
        let mut commands_open = true;
        let mut frames: Option<Frames> = None;
        let mut kill_at: Option<Instant> = None;
        let end = loop {
            tokio::select! {
                end = process.wait() => break end,
                conn = &mut connection, if awaiting_connection => {
                    awaiting_connection = false;
                    match conn {
                        Ok(Ok(stream)) => frames = Some(self.connect(stream)),
                        Ok(Err(reason)) => self.fail(&reason),
                        // The acceptor is gone: the pool is being dropped.
                        Err(_) => {}
                    }
                }
                batch = next_frames(&mut frames) => match batch {
                    Some(batch) => self.handle(batch).await,
                    None => {
                        // The worker closed its end (or died): what it wrote but never sent
                        // is in its log.
                        if let Some(mut ended) = frames.take() {
                            self.recover(&mut ended).await;
                        }
                        let grace = if self.exit_message.is_some() { LINGER_GRACE } else { EOF_GRACE };
                        kill_at = Some(Instant::now() + grace);
                    }
                },
                command = commands.recv(), if commands_open => match command {
                    Some(command) => self.command(command).await,
                    None => commands_open = false,
                },
                _ = sleep_until_some(kill_at) => {
                    kill_at = None;
                    let reason = if self.exit_message.is_some() {
                        "it did not exit after pytest finished"
                    } else {
                        "it closed its connection to the agent but did not exit"
                    };
                    kill_group(&self.group, KillKind::Broken, reason);
                }
                _ = sleep_until_some(self.deadline) => {
                    self.deadline = None;
                    self.time_out().await;
                }
            }
        };
        self.finish(end, frames, commands).await;
    }

    /// Starts the socket's writer task; the supervisor reads the socket itself.
    fn connect(&mut self, stream: UnixStream) -> Frames {
        let (read, write) = stream.into_split();
        if let Some(outgoing) = self.to_worker_rx.take() {
            tokio::spawn(write_frames(write, outgoing, self.id));
        }
        FrameReader::with_continuation(read)
    }

    /// Ends the worker's stream with what its log holds beyond the bytes received (the frames
    /// it wrote but had not sent when it closed or died), and handles them. Sets `unaligned`
    /// when the stream and the log could not be lined up, so the running test is not known
    /// from the stream.
    async fn recover(&mut self, frames: &mut Frames) {
        if frames.is_finished() {
            return;
        }
        let tail = if frames.failed() {
            None
        } else {
            match read_unsent(&self.options.unsent).await {
                Ok(Some(log)) => log.after(frames.received()),
                // No log: the worker sends every frame at once (under a timeout, or an older
                // worker); a partial frame at the end is then just truncated.
                Ok(None) => Some(Vec::new()),
                Err(error) => {
                    debug!(
                        worker = self.id,
                        "cannot read the worker's unsent frames: {error}"
                    );
                    None
                }
            }
        };
        let lined_up = tail.is_some();
        let batch = frames.finish(&tail.unwrap_or_default());
        if !batch.is_empty() {
            self.handle(batch).await;
        }
        if !lined_up || frames.failed() {
            self.unaligned = true;
        }
    }

    /// The test the worker's log says it was running when it died, taken as started when
    /// the stream cannot tell (a test wrote into the worker's socket itself).
    async fn running_from_log(&mut self) {
        if self.running.is_some() {
            return;
        }
        let Ok(Some(log)) = read_unsent(&self.options.unsent).await else {
            return;
        };
        let Some((lease, index)) = log.running else {
            return;
        };
        let Some(position) = self.unstarted.iter().position(|e| *e == (lease, index)) else {
            return;
        };
        self.unstarted.remove(position);
        let now = epoch_now();
        self.running = Some(Running {
            lease,
            index,
            started: Instant::now(),
            started_epoch: now,
            last: None,
        });
    }

    async fn command(&mut self, command: Command) {
        let message = match command {
            Command::Assign(leases) if self.draining => {
                // Work that crossed the drain on the way: straight back to the coordinator.
                let leases: Vec<u64> = leases
                    .into_iter()
                    .map(|(lease, _)| lease)
                    .filter(|lease| !self.held.contains(lease))
                    .collect();
                if !leases.is_empty() {
                    let worker = self.id;
                    self.emit(Internal::Event(PoolEvent::Revoked { worker, leases }))
                        .await;
                }
                return;
            }
            Command::Assign(leases) => {
                let leases = self.accept_leases(leases);
                if leases.is_empty() {
                    return;
                }
                AgentMessage::Run { tests: leases }
            }
            Command::NoMore => AgentMessage::Nomore,
            Command::Revoke(leases) => AgentMessage::Revoke { leases, all: false },
            Command::Shutdown => {
                self.leaving = true;
                AgentMessage::Shutdown
            }
            Command::Drain => {
                self.leaving = true;
                if self.draining {
                    return;
                }
                self.draining = true;
                let leases: Vec<u64> = self.unstarted.iter().map(|(lease, _)| *lease).collect();
                if !leases.is_empty() {
                    // Answered with `revoked`, naming those it had not started yet.
                    let _ = self
                        .to_worker
                        .send(AgentMessage::Revoke { leases, all: true });
                }
                AgentMessage::Shutdown
            }
        };
        // A closed channel means the connection is gone; the end of the process reports the
        // leases as unstarted.
        let _ = self.to_worker.send(message);
    }

    /// The running test is past its timeout and the grace for the stack dump: read the dump,
    /// then kill the worker (its end reports the test).
    async fn time_out(&mut self) {
        let (Some(running), Some(timeout)) = (&self.running, self.options.timeout) else {
            return;
        };
        let (lease, index) = (running.lease, running.index);
        let dump = match tokio::fs::read(&self.options.dump).await {
            Ok(bytes) => timeout_dump(&String::from_utf8_lossy(&bytes)),
            Err(error) => {
                debug!(worker = self.id, "no stack dump: {error}");
                String::new()
            }
        };
        // The test may have finished while the dump was read.
        if self.running.as_ref().map(|r| r.lease) != Some(lease) {
            return;
        }
        self.timed_out = Some((lease, dump));
        kill_group(
            &self.group,
            KillKind::Timeout,
            &format!(
                "test {index} ran longer than the {} s timeout",
                timeout.as_secs_f64()
            ),
        );
    }

    /// Records newly assigned leases, dropping any this worker already holds.
    fn accept_leases(&mut self, leases: Vec<(u64, u32)>) -> Vec<(u64, u32)> {
        let mut accepted = Vec::with_capacity(leases.len());
        for (lease, index) in leases {
            if !self.held.insert(lease) {
                warn!(
                    worker = self.id,
                    lease, "lease assigned twice to one worker; ignoring the repeat"
                );
            } else {
                accepted.push((lease, index));
            }
        }
        self.unstarted.extend(accepted.iter().copied());
        accepted
    }

    /// Checks a batch of messages (whatever arrived together) and passes their events on in
    /// one message, so the pool's tasks wake up once per batch, not once per event.
    async fn handle(&mut self, batch: Vec<Frame>) {
        let mut events = Vec::with_capacity(batch.len());
        for frame in batch {
            if self.broken {
                break;
            }
            let message = match frame {
                Ok(message) => message,
                // A worker that dies with our messages unread resets the connection: that is
                // its end (reported by its exit), not a message it sent.
                Err(error) if connection_lost(&error) => {
                    debug!(worker = self.id, "the worker's connection ended: {error}");
                    break;
                }
                Err(error) => {
                    self.fail(&format!("it sent an unreadable message: {error}"));
                    break;
                }
            };
            match self.check(message) {
                Ok(Some(Internal::Event(event))) => events.push(event),
                Ok(Some(internal)) => {
                    if !events.is_empty() {
                        self.emit(Internal::Events(std::mem::take(&mut events)))
                            .await;
                    }
                    self.emit(internal).await;
                }
                Ok(None) => {}
                Err(reason) => self.fail(&reason),
            }
        }
        if !events.is_empty() {
            self.emit(Internal::Events(events)).await;
        }
    }

    /// Checks one message against the worker's state and updates it.
    fn check(&mut self, message: WorkerMessage) -> Result<Option<Internal>, String> {
        let worker = self.id;
        match message {
            WorkerMessage::Hello(_) => Err("it said hello twice".into()),
            WorkerMessage::Collected {
                tests,
                deselected,
                done,
            } => {
                if !self.collects {
                    return Err("it sent a collection, but its fork server collected".into());
                }
                if self.collection_done {
                    return Err("it sent its collection twice".into());
                }
                self.collection
                    .extend(tests.into_iter().map(collected_test));
                if !done {
                    return Ok(None);
                }
                self.collection_done = true;
                let tests = std::mem::take(&mut self.collection);
                if let Some(expected) = &self.options.expected_digest {
                    let digest = collection_digest(&tests);
                    if digest != *expected {
                        return Err(format!(
                            "it collected {} tests that differ from the run's collection                              (digest {digest}, the run's {expected})",
                            tests.len()
                        ));
                    }
                }
                Ok(Some(Internal::Collected {
                    worker: Some(worker),
                    tests,
                    deselected,
                }))
            }
            WorkerMessage::Start { lease, index, at } => {
                if let Some(running) = &self.running {
                    return Err(format!(
                        "it started lease {lease} while lease {} was still running",
                        running.lease
                    ));
                }
                let Some(position) = self.unstarted.iter().position(|e| *e == (lease, index))
                else {
                    return Err(format!(
                        "it started lease {lease} (test {index}), which it does not hold"
                    ));
                };
                // Still held (as running) until it finishes.
                self.unstarted.remove(position);
                let now = epoch_now();
                // A batching worker's start arrives a little after the fact (or, after its
                // death, from its log): the worker's own clock says when the test started.
                let ago = if at > 0.0 && at <= now { now - at } else { 0.0 };
                let received = Instant::now();
                let started = Duration::try_from_secs_f64(ago)
                    .ok()
                    .and_then(|ago| received.checked_sub(ago))
                    .unwrap_or(received);
                self.running = Some(Running {
                    lease,
                    index,
                    started,
                    started_epoch: now - ago,
                    last: None,
                });
                self.deadline = self
                    .options
                    .timeout
                    .map(|timeout| started + timeout + TIMEOUT_GRACE);
                let at = if at > 0.0 { at } else { now };
                Ok(Some(Internal::Event(PoolEvent::Started {
                    worker,
                    lease,
                    test_index: index,
                    at,
                })))
            }
            WorkerMessage::Report(report) => {
                let running = match &mut self.running {
                    Some(r) if r.lease == report.lease && r.index == report.index => r,
                    _ => {
                        return Err(format!(
                            "it reported on lease {} (test {}), which is not running",
                            report.lease, report.index
                        ))
                    }
                };
                let Some(phase) = Phase::parse(&report.phase) else {
                    return Err(format!("it reported an unknown phase {:?}", report.phase));
                };
                if !matches!(report.outcome.as_str(), "passed" | "failed" | "skipped") {
                    return Err(format!(
                        "it reported an unknown outcome {:?}",
                        report.outcome
                    ));
                }
                running.last = Some((phase, report.outcome == "passed"));
                Ok(Some(Internal::Event(PoolEvent::Report {
                    worker,
                    report: phase_report(report, phase),
                })))
            }
            WorkerMessage::Finished { lease, index } => match &self.running {
                Some(r) if r.lease == lease && r.index == index => {
                    self.running = None;
                    self.deadline = None;
                    self.held.remove(&lease);
                    Ok(Some(Internal::Event(PoolEvent::Finished {
                        worker,
                        lease,
                        test_index: index,
                    })))
                }
                _ => Err(format!(
                    "it finished lease {lease} (test {index}), which is not running"
                )),
            },
            WorkerMessage::Want => {
                self.asked = true;
                if self.draining {
                    return Ok(None);
                }
                Ok(Some(Internal::Event(PoolEvent::WantWork { worker })))
            }
            WorkerMessage::Revoked { leases } => {
                let running = self.running.as_ref().map(|r| r.lease);
                let bad = leases
                    .iter()
                    .find(|l| !self.held.contains(l) || running == Some(**l));
                if let Some(lease) = bad {
                    return Err(format!(
                        "it gave back lease {lease}, which it does not hold unstarted"
                    ));
                }
                let given_back: HashSet<u64> = leases.iter().copied().collect();
                self.unstarted.retain(|(l, _)| !given_back.contains(l));
                for lease in &leases {
                    self.held.remove(lease);
                }
                Ok(Some(Internal::Event(PoolEvent::Revoked { worker, leases })))
            }
            WorkerMessage::Exited { exit_code } => {
                self.exit_message = Some(exit_code);
                Ok(None)
            }
            WorkerMessage::Forked { .. }
            | WorkerMessage::Reaped { .. }
            | WorkerMessage::ForkFailed { .. } => {
                Err("it sent a message only the fork server may send".into())
            }
        }
    }

    /// The worker broke the protocol (or could not be let in): it is treated as crashed.
    fn fail(&mut self, reason: &str) {
        warn!(worker = self.id, "stopping worker: {reason}");
        self.broken = true;
        kill_group(
            &self.group,
            KillKind::Broken,
            &format!("protocol error: {reason}"),
        );
    }

    async fn emit(&self, internal: Internal) {
        // The central task ends only when the pool is dropped; nothing is left to tell then.
        let _ = self.central.send(internal).await;
    }

    /// The process ended: collect what it still said and printed, then report its end.
    async fn finish(
        mut self,
        end: ProcessEnd,
        frames: Option<Frames>,
        mut commands: mpsc::UnboundedReceiver<Command>,
    ) {
        // Anything the tests left running in the group goes too (it may hold our pipes open).
        let mut kill = end_group(&self.group);
        let deadline = Instant::now() + DRAIN_WAIT;
        if let Some(mut frames) = frames {
            while let Ok(Some(batch)) = timeout_at(deadline, frames.next_batch()).await {
                self.handle(batch).await;
            }
            self.recover(&mut frames).await;
        }
        if self.broken || self.unaligned {
            self.running_from_log().await;
        }
        self.output.finish(deadline).await;
        let status = end.status;
        let output = match end.stand_in {
            Some(stand_in) => {
                self.exit_message = stand_in.exit_message;
                kill = kill.or(stand_in.kill);
                stand_in.output
            }
            None => self.output.text(),
        };
        // Leases handed over after the end are returned with the unstarted ones.
        commands.close();
        while let Ok(command) = commands.try_recv() {
            if let Command::Assign(leases) = command {
                self.accept_leases(leases);
            }
        }

        let (exit_code, signal) = match &status {
            Ok(status) => (status.code().unwrap_or(-1), status.signal().unwrap_or(0)),
            Err(_) => (-1, 0),
        };
        let how = match &status {
            Ok(status) => match status.signal() {
                Some(signal) => format!("killed by signal {signal} ({})", signal_name(signal)),
                None => format!("exit code {exit_code}"),
            },
            Err(error) => format!("its exit status is unknown ({error})"),
        };
        let clean = self.exit_message.is_some()
            && self.exit_message == status.as_ref().ok().and_then(|s| s.code());
        let reason = match (&kill, clean) {
            (Some(kill), _) => format!("stopped by the agent: {} ({how})", kill.reason),
            (None, true) => format!("pytest finished ({how})"),
            (None, false) => format!("crashed: {how}"),
        };
        // A worker that ends without being told to, and not as a `--collect-only` worker does
        // (cleanly, never asking for work), needs a replacement: it crashed, or pytest itself
        // gave up on it (an internal error ends pytest "cleanly" too).
        let expected = self.leaving || kill.as_ref().is_some_and(|k| k.kind == KillKind::Stopped);
        let crashed = !expected
            && (!clean || self.asked || self.running.is_some() || self.options.replacement);
        if let Some(running) = self.running.take() {
            let timed_out = match self.timed_out.take() {
                Some((lease, dump)) if lease == running.lease => Some(dump),
                _ => None,
            };
            let ending = match (&kill, timed_out, self.options.timeout) {
                (Some(kill), Some(dump), Some(timeout)) if kill.kind == KillKind::Timeout => {
                    Ending::TimedOut {
                        seconds: timeout.as_secs_f64(),
                        dump,
                    }
                }
                (Some(kill), _, _) if kill.kind == KillKind::Stopped => {
                    Ending::Interrupted(format!("{} ({how})", kill.reason))
                }
                (Some(kill), _, _) => {
                    Ending::Crashed(format!("the agent stopped it: {} ({how})", kill.reason))
                }
                (None, _, _) => Ending::Crashed(how.clone()),
            };
            self.report_end(running, ending).await;
        }
        let collection_exit_code = self
            .exit_message
            .or(status.as_ref().ok().and_then(|s| s.code()))
            .unwrap_or(fly_common::exit_code::INTERNAL_ERROR);
        let collection_output = if self.exit_message.is_some() {
            output
        } else {
            // pytest did not get to say why it stopped: add what the agent saw.
            format!(
                "{output}\nfly: worker {} stopped before collecting: {reason}\n",
                self.id
            )
            .trim_start()
            .to_string()
        };
        debug!(worker = self.id, "worker ended: {reason}");
        let exit = PoolEvent::Exited {
            worker: self.id,
            exit_code,
            signal,
            reason,
            unstarted: self.unstarted.iter().map(|(lease, _)| *lease).collect(),
        };
        self.emit(Internal::Ended {
            worker: self.id,
            exit,
            exit_code: collection_exit_code,
            output: collection_output,
            crashed,
        })
        .await;
    }

    /// Reports the test the worker was running as failed by how it ended, then finished.
    async fn report_end(&mut self, running: Running, ending: Ending) {
        let (phase, category) = running.failed_phase(self.options.timeout.is_some());
        let id = self.id;
        let (message, mut longrepr, quote_output) = match ending {
            Ending::Crashed(why) => {
                let message = format!("worker {id} crashed while running this test: {why}");
                (message.clone(), message, true)
            }
            Ending::Interrupted(why) => {
                let message =
                    format!("interrupted: worker {id} was stopped while running this test: {why}");
                (message.clone(), message, true)
            }
            Ending::TimedOut { seconds, dump } => {
                let message = format!("Timeout: the test ran longer than {seconds} s");
                let mut longrepr = format!("{message}; worker {id} was killed.");
                let dump = if dump.trim().is_empty() {
                    // The fault handler's timer was taken (pytest's faulthandler_timeout, or
                    // the test's own): its dump, if any, went to the worker's stderr.
                    self.output
                        .stderr
                        .lock()
                        .map(|t| timeout_dump(&t.text()))
                        .unwrap_or_default()
                } else {
                    dump
                };
                if dump.trim().is_empty() {
                    longrepr.push_str("\n\nThe worker wrote no stack dump.");
                    (message, longrepr, true)
                } else {
                    longrepr.push_str(&format!(
                        "\n\nThe stack of every thread when the time ran out (most recent call \
                         first):\n\n{dump}"
                    ));
                    (message, longrepr, false)
                }
            }
        };
        if quote_output {
            for (name, tail) in [
                ("stderr", &self.output.stderr),
                ("stdout", &self.output.stdout),
            ] {
                let lines = tail.lock().map(|t| crash_excerpt(&t)).unwrap_or_default();
                if !lines.trim().is_empty() {
                    longrepr.push_str(&format!("\n\nlast lines of the worker's {name}:\n{lines}"));
                }
            }
        }
        let report = PhaseReport {
            lease: running.lease,
            test_index: running.index,
            phase: phase.to_proto() as i32,
            outcome: "failed".into(),
            category: category.into(),
            duration: running.started.elapsed().as_secs_f64(),
            start: running.started_epoch,
            stop: epoch_now(),
            longrepr,
            sections: Vec::new(),
            message,
        };
        self.emit(Internal::Event(PoolEvent::Report {
            worker: self.id,
            report,
        }))
        .await;
        self.emit(Internal::Event(PoolEvent::Finished {
            worker: self.id,
            lease: running.lease,
            test_index: running.index,
        }))
        .await;
    }
}

pub(crate) fn collected_test(
    (nodeid, file, line, group): (String, String, u32, String),
) -> CollectedTest {
    CollectedTest {
        nodeid,
        file,
        line,
        group,
    }
}

/// The part of a worker's output that explains a crash: Python's fault handler dump (which
/// pytest enables) when there is one, else the last lines.
fn crash_excerpt(tail: &Tail) -> String {
    let text = tail.text();
    match text.rfind(FAULT_HANDLER_HEADER) {
        Some(start) => {
            let dump: Vec<&str> = text[start..].lines().take(FAULT_DUMP_LINES).collect();
            dump.join("\n")
        }
        None => tail.last_lines(CRASH_LINES),
    }
}

/// The connection broke (the process died): an end of the stream, not a bad message.
pub(crate) fn connection_lost(error: &FrameError) -> bool {
    matches!(
        error,
        FrameError::Io(error) if matches!(
            error.kind(),
            std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe
        )
    )
}

/// The last stack dump the fault handler's timer wrote in `text` (a dump file can still hold
/// the dump of an earlier test that finished just in time), cut to a readable length.
fn timeout_dump(text: &str) -> String {
    match text.rfind(TIMEOUT_HEADER) {
        Some(start) => {
            let dump: Vec<&str> = text[start..].lines().take(TIMEOUT_DUMP_LINES).collect();
            dump.join("\n")
        }
        None => String::new(),
    }
}

fn phase_report(report: ReportMessage, phase: Phase) -> PhaseReport {
    PhaseReport {
        lease: report.lease,
        test_index: report.index,
        phase: phase.to_proto() as i32,
        outcome: report.outcome,
        category: report.category,
        duration: report.duration,
        start: report.start,
        stop: report.stop,
        longrepr: report.longrepr,
        sections: report
            .sections
            .into_iter()
            .map(|(name, text)| Section { name, text })
            .collect(),
        message: report.message,
    }
}

fn epoch_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// A worker's log of the frames it had not sent yet (`PendingLog` in fly_worker.py).
struct UnsentLog {
    /// Bytes of the connection (after the hello) before the first frame in `frames`.
    base: u64,
    frames: Vec<u8>,
    /// The test it was running: (lease, index).
    running: Option<(u64, u32)>,
}

impl UnsentLog {
    /// The bytes that follow the first `received` bytes of the connection, or None when the
    /// log does not continue from there (the worker sent bytes that were never received).
    fn after(&self, received: u64) -> Option<Vec<u8>> {
        let skip = received.checked_sub(self.base)?;
        // Past the end: everything in the log was sent (the worker died before it moved the
        // log's base past what it had just sent).
        Some(
            usize::try_from(skip)
                .ok()
                .and_then(|skip| self.frames.get(skip..))
                .map(<[u8]>::to_vec)
                .unwrap_or_default(),
        )
    }
}

/// Size of the log's header: base, length, running lease + 1, running index (little-endian).
const UNSENT_HEADER: usize = 32;

/// Reads a worker's log of unsent frames; `Ok(None)` when the worker keeps none.
async fn read_unsent(path: &std::path::Path) -> std::io::Result<Option<UnsentLog>> {
    use tokio::io::AsyncReadExt;
    let mut file = match tokio::fs::File::open(path).await {
        Ok(file) => file,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(error) => return Err(error),
    };
    let mut header = [0u8; UNSENT_HEADER];
    file.read_exact(&mut header).await?;
    let field = |i: usize| {
        let mut bytes = [0u8; 8];
        bytes.copy_from_slice(&header[i * 8..i * 8 + 8]);
        u64::from_le_bytes(bytes)
    };
    let (base, length, lease, index) = (field(0), field(1), field(2), field(3));
    let length = usize::try_from(length)
        .ok()
        .filter(|length| *length <= MAX_UNSENT_BYTES)
        .ok_or_else(|| std::io::Error::other(format!("a log of {length} unsent bytes")))?;
    let mut frames = vec![0u8; length];
    file.read_exact(&mut frames).await?;
    // The lease is stored plus one, so that 0 means "no test running".
    let running = lease.checked_sub(1).zip(u32::try_from(index).ok());
    Ok(Some(UnsentLog {
        base,
        frames,
        running,
    }))
}

/// The largest log a worker keeps (fly_worker.py's `PendingLog.SIZE`, with room to spare).
const MAX_UNSENT_BYTES: usize = 16 * 1024 * 1024;

/// The next batch from the socket, once connected.
pub(crate) async fn next_frames(frames: &mut Option<Frames>) -> Option<Vec<Frame>> {
    match frames {
        Some(frames) => frames.next_batch().await,
        None => std::future::pending().await,
    }
}

pub(crate) async fn sleep_until_some(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

/// Writes the pool's messages to the worker, coalescing whatever is queued into one write.
async fn write_frames(
    mut write: OwnedWriteHalf,
    mut messages: mpsc::UnboundedReceiver<AgentMessage>,
    worker: u32,
) {
    let mut buf = Vec::new();
    while let Some(message) = messages.recv().await {
        buf.clear();
        encode_frame(&message, &mut buf);
        while let Ok(more) = messages.try_recv() {
            encode_frame(&more, &mut buf);
        }
        if let Err(error) = write.write_all(&buf).await {
            // The worker is gone; its supervisor learns that from the process.
            debug!(worker, "writing to the worker failed: {error}");
            return;
        }
    }
}
