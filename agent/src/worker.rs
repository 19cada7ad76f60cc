//! The agent's pool of persistent pytest workers: starts them, hands them tests, and turns what
//! they say (and how they die) into `PoolEvent`s for the agent's connection to the coordinator.
//!
//! Each worker runs `fly_worker.py` (embedded in the agent) in its own process group, talking
//! to the pool over a Unix socket in a private temp dir, so the tests keep stdout, stderr and
//! stdin to themselves. One supervisor task per worker watches its socket, its process and its
//! output; a central task merges collections and forwards events in order.
//!
//! # Two ways to start the workers
//!
//! Spawned (`fork: false`): every worker is its own `python -u fly_worker.py <pytest args>`,
//! all started at once. Each imports pytest and the suite and collects by itself, so start-up
//! costs a collection per worker (the CPU time of N collections), and the pool checks that
//! all workers collected the same tests.
//!
//! Forked (`fork: true`, the default of the agent): start-up must not grow with the number of
//! workers, so one Python process, the fork server, imports and collects once, reports that
//! collection, and only then forks the N workers (sharing the collected items copy-on-write).
//! Nothing runs before the fork but configuration and collection: session fixtures are set up
//! by each worker after it. Each forked worker moves into its own process group, points every
//! descriptor of the fork server's stdout/stderr at its own pair of pipes (the pool creates
//! them and passes their write ends to the fork server, so each worker's output is its own),
//! restarts pytest's output capturing (whose temporary files it would otherwise share with its
//! siblings), sets `PYTEST_XDIST_WORKER=gwN`, connects to the socket with its own worker id and
//! runs exactly the loop a spawned worker runs. Its pytest session state is its own from the
//! fork on.
//!
//! The agent cannot wait for a forked worker: it is the fork server's child, not the agent's.
//! So the fork server stays alive as a small supervisor: it reports each fork (the worker's pid,
//! which is also its process group, so the pool can kill it), waits for its children and
//! reports each raw wait status over its own connection; the worker's supervisor turns that
//! into the same exit code or signal a spawned worker's end gives. If the fork server itself
//! dies first, the workers it had forked are killed (nobody could report their ends), and the
//! workers it never forked end with its exit status and output: that is how a usage error or a
//! failed collection reaches the user, once. If the agent goes away, the fork server sees its
//! connection close and kills its workers. Killing the pool kills every worker's group and the
//! fork server's group.
//!
//! What a fork cannot give: whatever the suite does while it is imported and collected happens
//! once, as worker 0 (`PYTEST_XDIST_WORKER=gw0`). Values a conftest computes from the
//! environment at import time are worker 0's in every worker, connections opened then are
//! shared, threads started then do not exist in the workers. Such suites run with `--no-fork`.
//!
//! # Crashes, timeouts and replacements
//!
//! A worker that dies while the run goes on (a segfault, `os._exit`, the OOM killer, a protocol
//! error, or a test that ran past `PoolConfig::timeout`) has its running test reported failed
//! by its supervisor and its unstarted tests listed in its `Exited` event (the coordinator
//! queues them again). The pool then starts a replacement in the same slot (same
//! `PYTEST_XDIST_WORKER=gwN`) under a new worker id, so the coordinator, which counts the old
//! id as gone, sees a fresh worker asking for work: spawned, it is a new process that collects
//! again (and must collect the same tests); forked, the fork server forks it from the collected
//! session, writing to one of the spare pipe pairs the pool handed it at start (one per allowed
//! replacement). After `PoolConfig::max_replacements` replacements the pool stops replacing:
//! it reports `Unhealthy`, takes every worker's unstarted tests back (`Revoked`) and lets the
//! running ones finish.
//!
//! A test timeout is enforced by the supervisor, from the `start` the worker sends: at timeout
//! plus [`TIMEOUT_GRACE`] it reads the stacks the worker's fault handler wrote into its dump
//! file at the timeout (every thread's), kills the worker's process group and reports the test
//! failed with them (an error, if it was still in setup or already in teardown).
//!
//! # Stopping
//!
//! `shutdown` asks every worker to finish its current test and leave; `drain` first takes back
//! every unstarted test (answered with `Revoked`), returns work handed over later at once, and
//! reports a test still running when the grace period ends as interrupted.

mod forker;
pub mod frame;
mod supervisor;
mod tail;

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::pin::Pin;
use std::process::Stdio;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use fly_common::proto::CollectedTest;
use sha2::{Digest, Sha256};
use tokio::net::unix::pipe;
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::{timeout, timeout_at, Instant};
use tracing::{debug, info, warn};

pub use frame::{decode_frame, FrameError, WorkerMessage};

use forker::{Forked, Forker, ForkerCommand};
use frame::{read_frame, PROTOCOL_VERSION};
use supervisor::{Command, Process, Supervisor, SupervisorOptions};
use tail::Output;

/// The worker script, shipped inside the agent binary.
const WORKER_SCRIPT: &str = include_str!("../python/fly_worker.py");

/// How long a connection may take to say hello before it is dropped.
const HELLO_WAIT: Duration = Duration::from_secs(60);

/// After the shutdown grace ran out and the workers were killed, how long to wait for their
/// supervisors to report the ends before giving up on them.
const AFTER_KILL_WAIT: Duration = Duration::from_secs(10);

/// How many crashed (or timed out) workers a pool replaces in one run before it reports the
/// agent unhealthy: a suite that keeps killing its workers would otherwise fork forever, and a
/// machine that keeps killing them (memory, a broken interpreter) should stop taking work.
pub const MAX_REPLACEMENTS: u32 = 8;

/// How long after a test's timeout the agent waits for the worker's own stack dump before it
/// kills the worker (the fault handler writes it at the timeout itself).
pub const TIMEOUT_GRACE: Duration = Duration::from_secs(1);

/// What the pool runs.
#[derive(Debug, Clone)]
pub struct PoolConfig {
    pub python: PathBuf,
    pub workdir: PathBuf,
    pub pytest_args: Vec<String>,
    pub workers: u32,
    pub run_id: String,
    pub extra_env: Vec<(String, String)>,
    /// Collect once in one process and fork the workers from it (see the module docs); else
    /// start every worker as its own Python process.
    pub fork: bool,
    /// How long one test (setup, call and teardown) may run; None: as long as it takes.
    pub timeout: Option<Duration>,
    /// Crashed workers replaced before the pool gives up ([`MAX_REPLACEMENTS`] for the agent).
    /// With forked workers each allowed replacement holds a spare pipe pair from the start.
    pub max_replacements: u32,
}

/// What happens in the pool, in order per worker.
#[derive(Debug, Clone, PartialEq)]
pub enum PoolEvent {
    /// Every worker collected, and all collections agree. `digest` = hex sha256 over the ordered
    /// nodeids, each followed by '\n'.
    Collected {
        tests: Vec<CollectedTest>,
        deselected: u32,
        digest: String,
    },
    /// pytest stopped before running any test (usage error exit 4, collection errors exit 2,
    /// ...), or the workers' collections disagree. `output` = what pytest printed (stdout tail
    /// then stderr tail of the first failing worker).
    CollectionFailed { exit_code: i32, output: String },
    /// The worker holds fewer than two unstarted tests and was not told "no more".
    WantWork { worker: u32 },
    /// The worker started this test (`at`: Unix epoch seconds, the worker's clock).
    Started {
        worker: u32,
        lease: u64,
        test_index: u32,
        at: f64,
    },
    Report {
        worker: u32,
        report: fly_common::proto::PhaseReport,
    },
    Finished {
        worker: u32,
        lease: u64,
        test_index: u32,
    },
    /// Answer to `revoke` (or work given back by a draining worker): the leases actually taken
    /// back (never started).
    Revoked { worker: u32, leases: Vec<u64> },
    /// The worker process ended (shutdown, or a crash). `unstarted` = leases it held but never
    /// started. `exit_code` is -1 and `signal` non-zero when a signal ended it.
    Exited {
        worker: u32,
        exit_code: i32,
        signal: i32,
        reason: String,
        unstarted: Vec<u64>,
    },
    /// `worker` crashed and `replacement`, a new worker in its slot, is starting; it asks for
    /// work once it is ready.
    Replaced { worker: u32, replacement: u32 },
    /// Too many workers crashed (or a crashed one could not be replaced): the pool replaces no
    /// more, has taken back every unstarted test (`Revoked`) and lets the running ones finish.
    Unhealthy { reason: String },
}

/// Why the pool could not do what it was asked.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("the worker pool needs at least one worker")]
    NoWorkers,
    #[error("cannot create a private directory for the workers: {0}")]
    TempDir(#[source] std::io::Error),
    #[error("cannot write the worker script to {path}: {source}")]
    WriteScript {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot listen for workers on {path}: {source}")]
    Bind {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot start worker {worker} with {python} in {workdir}: {source}")]
    Spawn {
        worker: u32,
        python: PathBuf,
        workdir: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot start the workers' fork server with {python} in {workdir}: {source}")]
    SpawnForkServer {
        python: PathBuf,
        workdir: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot create the output pipes of the forked workers: {0}")]
    Pipe(#[source] std::io::Error),
    #[error("there is no worker {worker}: the pool has {workers}")]
    NoSuchWorker { worker: u32, workers: u32 },
    #[error("worker {0} has exited")]
    WorkerGone(u32),
    #[error("tests can be assigned only after the collection")]
    NotCollected,
    #[error("test index {index} is outside the collection of {total} tests")]
    BadTestIndex { index: u32, total: u32 },
}

/// What a supervisor tells the central task.
pub(crate) enum Internal {
    Event(PoolEvent),
    /// Events that arrived together from one worker, in order.
    Events(Vec<PoolEvent>),
    /// A worker's collection; `worker` None: the fork server's, shared by every worker.
    Collected {
        worker: Option<u32>,
        tests: Vec<CollectedTest>,
        deselected: u32,
    },
    /// The worker is gone; `exit` is its `PoolEvent::Exited`. `exit_code` and `output` describe
    /// the failure if the worker never delivered a collection. `crashed`: it ended in a way
    /// that calls for a replacement (not a clean end, not stopped by the pool).
    Ended {
        worker: u32,
        exit: PoolEvent,
        exit_code: i32,
        output: String,
        crashed: bool,
    },
}

/// What kind of end the pool gave a process it killed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum KillKind {
    /// It misbehaved (a protocol error, lingering, losing its fork server): a crash.
    Broken,
    /// Its test ran longer than the timeout.
    Timeout,
    /// The pool is stopping (shutdown, drain, drop): its test was interrupted, nothing crashed.
    Stopped,
}

/// Why the pool killed a process.
#[derive(Debug, Clone)]
pub(crate) struct Kill {
    pub(crate) kind: KillKind,
    pub(crate) reason: String,
}

/// The part of a process that both its supervisor and the pool's kill paths touch.
#[derive(Debug)]
pub(crate) struct Group {
    /// The process group id while the process may be alive; None before a forked worker's pid
    /// is known and once the process was reaped.
    pgid: Option<i32>,
    /// Why the pool killed the group (or will, as soon as its pgid is known), if it did.
    kill: Option<Kill>,
    /// The process ended: nothing is signalled any more.
    ended: bool,
}

impl Group {
    fn new(pgid: Option<i32>) -> Arc<Mutex<Group>> {
        Arc::new(Mutex::new(Group {
            pgid,
            kill: None,
            ended: false,
        }))
    }
}

fn signal_group(pgid: Option<i32>) {
    // A pgid of 0 or 1 would mean our own group or init: never signal those.
    if let Some(pgid) = pgid.filter(|pgid| *pgid > 1) {
        // SAFETY: killpg only sends a signal; a group that is already gone gives ESRCH.
        unsafe {
            libc::killpg(pgid, libc::SIGKILL);
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

/// SIGKILLs the process's whole group (pytest and anything its tests started). A forked
/// worker whose pid is not known yet is killed as soon as it is. The first reason given sticks.
pub(crate) fn kill_group(group: &Mutex<Group>, kind: KillKind, reason: &str) {
    let mut group = lock(group);
    if group.ended {
        return;
    }
    if group.kill.is_none() {
        group.kill = Some(Kill {
            kind,
            reason: reason.to_string(),
        });
    }
    signal_group(group.pgid);
}

/// Records a forked worker's process group.
pub(crate) fn set_group(group: &Mutex<Group>, pgid: i32) {
    let mut group = lock(group);
    if group.ended {
        return;
    }
    group.pgid = Some(pgid);
    if group.kill.is_some() {
        signal_group(group.pgid);
    }
}

/// The process ended: kills what is left of its group (processes its tests left behind may
/// hold pipes open) and returns why the pool killed it, if it did.
pub(crate) fn end_group(group: &Mutex<Group>) -> Option<Kill> {
    let mut group = lock(group);
    group.ended = true;
    signal_group(group.pgid.take());
    group.kill.clone()
}

type ConnectionSender = oneshot::Sender<Result<UnixStream, String>>;

/// Where the acceptor hands each connection, by the hello's worker id (or fork server flag).
/// A worker's entry is made before it starts and taken by its first valid hello.
struct Slots {
    workers: Mutex<HashMap<u32, ConnectionSender>>,
    forker: Mutex<Option<ConnectionSender>>,
}

struct WorkerHandle {
    commands: mpsc::UnboundedSender<Command>,
    group: Arc<Mutex<Group>>,
}

/// Every worker the pool started (replacements too), shared by the pool and the central task,
/// which starts the replacements.
#[derive(Default)]
struct Registry {
    /// By worker id: ids are handed out in order, from 0.
    workers: Vec<WorkerHandle>,
    supervisors: Vec<JoinHandle<()>>,
    /// The pool is stopping: no replacement may start any more.
    stopping: bool,
}

/// The fork server's watcher task, its process group and the way to ask it for forks.
struct ForkerHandle {
    group: Arc<Mutex<Group>>,
    commands: mpsc::UnboundedSender<ForkerCommand>,
    task: JoinHandle<()>,
}

/// How the pool stops its workers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stop {
    /// Finish the current test, then leave.
    Shutdown,
    /// Give back every unstarted test first (`Revoked`), return any work handed over later.
    Drain,
}

/// A set of persistent pytest workers sharing one collection.
pub struct WorkerPool {
    registry: Arc<Mutex<Registry>>,
    total: Arc<OnceLock<u32>>,
    forker: Option<ForkerHandle>,
    /// Wakes the central task so it sees that the pool is stopping.
    wake_central: mpsc::UnboundedSender<()>,
    central: Option<JoinHandle<()>>,
    acceptor: JoinHandle<()>,
    // Holds the script, the socket and the stack dumps; removed when the pool goes.
    _dir: tempfile::TempDir,
}

impl WorkerPool {
    /// Writes the embedded script, binds the socket, starts the workers (all at once, or the
    /// fork server that forks them), and returns; events arrive on `events`. WantWork events
    /// are held back until Collected has been sent.
    pub async fn start(
        config: PoolConfig,
        events: mpsc::Sender<PoolEvent>,
    ) -> Result<WorkerPool, WorkerError> {
        if config.workers == 0 {
            return Err(WorkerError::NoWorkers);
        }
        let dir = tempfile::Builder::new()
            .prefix("fly-workers-")
            .permissions(std::fs::Permissions::from_mode(0o700))
            .tempdir()
            .map_err(WorkerError::TempDir)?;
        let script = dir.path().join("fly_worker.py");
        std::fs::write(&script, WORKER_SCRIPT).map_err(|source| WorkerError::WriteScript {
            path: script.clone(),
            source,
        })?;
        let socket = dir.path().join("workers.sock");
        let listener = UnixListener::bind(&socket).map_err(|source| WorkerError::Bind {
            path: socket.clone(),
            source,
        })?;
        let registry = Arc::new(Mutex::new(Registry::default()));
        let slots = Arc::new(Slots {
            workers: Mutex::new(HashMap::new()),
            forker: Mutex::new(None),
        });
        let launcher = Arc::new(Launcher {
            config,
            script,
            socket,
            dir: dir.path().to_path_buf(),
            token: uuid::Uuid::new_v4().simple().to_string(),
            registry: registry.clone(),
            slots: slots.clone(),
        });

        let (internal_tx, internal_rx) = mpsc::channel(256);
        let (forker, spares) = if launcher.config.fork {
            let (forker, spares) = launcher.forked(&internal_tx)?;
            (Some(forker), spares)
        } else {
            launcher.spawned(&internal_tx)?;
            (None, VecDeque::new())
        };

        let workers = launcher.config.workers;
        let replacer = Replacer {
            launcher: launcher.clone(),
            internal: Some(internal_tx),
            forker: forker.as_ref().map(|f| ForkerLink {
                group: f.group.clone(),
                commands: f.commands.clone(),
                spares,
            }),
            slot_of: (0..workers).map(|id| (id, id)).collect(),
            next_id: workers,
            replaced: 0,
        };
        let (wake_tx, wake_rx) = mpsc::unbounded_channel();
        let total = Arc::new(OnceLock::new());
        let central = tokio::spawn(central(
            workers,
            internal_rx,
            wake_rx,
            events,
            total.clone(),
            replacer,
        ));
        let acceptor = tokio::spawn(accept(listener, launcher.token.clone(), slots));
        Ok(WorkerPool {
            registry,
            total,
            forker,
            wake_central: wake_tx,
            central: Some(central),
            acceptor,
            _dir: dir,
        })
    }

    /// Appends `(lease, test_index)` pairs to the worker's queue, in order.
    pub fn assign(&self, worker: u32, leases: Vec<(u64, u32)>) -> Result<(), WorkerError> {
        let commands = self.commands(worker)?;
        let total = *self.total.get().ok_or(WorkerError::NotCollected)?;
        if let Some(&(_, index)) = leases.iter().find(|(_, index)| *index >= total) {
            return Err(WorkerError::BadTestIndex { index, total });
        }
        if leases.is_empty() {
            return Ok(());
        }
        send(worker, &commands, Command::Assign(leases))
    }

    /// Tells the worker nothing more is coming for now: it runs what it holds, the last test
    /// with all fixtures torn down after it.
    pub fn no_more(&self, worker: u32) -> Result<(), WorkerError> {
        let commands = self.commands(worker)?;
        send(worker, &commands, Command::NoMore)
    }

    /// Asks the worker to give back these leases if it has not started them; the answer is a
    /// `PoolEvent::Revoked` with the ones it gave back.
    pub fn revoke(&self, worker: u32, leases: Vec<u64>) -> Result<(), WorkerError> {
        let commands = self.commands(worker)?;
        send(worker, &commands, Command::Revoke(leases))
    }

    /// Asks every worker to finish, waits up to `grace`, then SIGKILLs their process groups
    /// (and the fork server's). Keep receiving events meanwhile: the workers' last reports and
    /// exits are sent.
    pub async fn shutdown(self, grace: Duration) {
        self.stop(Stop::Shutdown, grace, std::future::pending())
            .await;
    }

    /// Stops the pool without losing work: every worker gives back its unstarted tests at once
    /// (`Revoked`), work assigned from now on is given back as it arrives, and the running
    /// tests get up to `grace` (or until `hurry` resolves) to finish before their workers are
    /// killed and the tests reported failed as interrupted. Keep receiving events meanwhile.
    pub async fn drain(self, grace: Duration, hurry: impl Future<Output = ()> + Send) {
        self.stop(Stop::Drain, grace, hurry).await;
    }

    async fn stop(mut self, how: Stop, grace: Duration, hurry: impl Future<Output = ()>) {
        let handles: Vec<(mpsc::UnboundedSender<Command>, Arc<Mutex<Group>>)> = {
            let mut registry = lock(&self.registry);
            registry.stopping = true;
            registry
                .workers
                .iter()
                .map(|h| (h.commands.clone(), h.group.clone()))
                .collect()
        };
        // The central task lets go of the channel it would start replacements with.
        let _ = self.wake_central.send(());
        let command = match how {
            Stop::Shutdown => Command::Shutdown,
            Stop::Drain => Command::Drain,
        };
        for (commands, _) in &handles {
            let _ = commands.send(command.clone());
        }
        let mut hurry = std::pin::pin!(hurry);
        let mut clock = Deadline {
            at: Instant::now() + grace,
            hurried: false,
        };
        let supervisors = std::mem::take(&mut lock(&self.registry).supervisors);
        let mut running = Vec::new();
        for mut task in supervisors {
            if !clock.wait(&mut hurry, &mut task).await {
                running.push(task);
            }
        }
        let mut forker = self.forker.take();
        if let Some(handle) = forker.as_mut() {
            // No more forks; the fork server leaves once it has reported all its workers' ends.
            let _ = handle.commands.send(ForkerCommand::Done);
            if clock.wait(&mut hurry, &mut handle.task).await {
                forker = None;
            }
        }
        let too_slow = match (how, clock.hurried) {
            (_, true) => "the agent was told to stop at once".to_string(),
            (Stop::Shutdown, false) => {
                "it did not finish within the shutdown grace period".to_string()
            }
            (Stop::Drain, false) => format!(
                "the agent is stopping, and the test did not finish within the {} s grace \
                 period of its drain",
                grace.as_secs_f64()
            ),
        };
        for (_, group) in &handles {
            kill_group(group, KillKind::Stopped, &too_slow);
        }
        // Only the fork server can report how a forked worker ended: it is stopped after its
        // workers, unless some were never forked (they end only when it does).
        let all_forked = handles.iter().all(|(_, group)| {
            let group = lock(group);
            group.pgid.is_some() || group.ended
        });
        if let Some(handle) = forker.as_ref().filter(|_| !all_forked) {
            kill_group(&handle.group, KillKind::Stopped, &too_slow);
        }
        for mut task in running {
            if timeout(AFTER_KILL_WAIT, &mut task).await.is_err() {
                warn!("a worker supervisor did not finish after its worker was killed");
                task.abort();
            }
        }
        if let Some(mut handle) = forker {
            kill_group(&handle.group, KillKind::Stopped, &too_slow);
            if timeout(AFTER_KILL_WAIT, &mut handle.task).await.is_err() {
                warn!("the fork server's watcher did not finish after it was killed");
                handle.task.abort();
            }
        }
        if let Some(mut central) = self.central.take() {
            if timeout(AFTER_KILL_WAIT, &mut central).await.is_err() {
                central.abort();
            }
        }
    }

    fn commands(&self, worker: u32) -> Result<mpsc::UnboundedSender<Command>, WorkerError> {
        let registry = lock(&self.registry);
        registry
            .workers
            .get(worker as usize)
            .map(|handle| handle.commands.clone())
            .ok_or(WorkerError::NoSuchWorker {
                worker,
                workers: registry.workers.len() as u32,
            })
    }
}

fn send(
    worker: u32,
    commands: &mpsc::UnboundedSender<Command>,
    command: Command,
) -> Result<(), WorkerError> {
    commands
        .send(command)
        .map_err(|_| WorkerError::WorkerGone(worker))
}

/// When the pool's patience with a stopping worker ends: at `at`, or as soon as the caller's
/// `hurry` resolves.
struct Deadline {
    at: Instant,
    hurried: bool,
}

impl Deadline {
    /// Waits for `task` until the deadline; true if it finished.
    async fn wait<T, F: Future<Output = ()>>(
        &mut self,
        hurry: &mut Pin<&mut F>,
        task: &mut JoinHandle<T>,
    ) -> bool {
        loop {
            tokio::select! {
                result = timeout_at(self.at, &mut *task) => return result.is_ok(),
                _ = hurry.as_mut(), if !self.hurried => {
                    self.hurried = true;
                    self.at = Instant::now();
                }
            }
        }
    }
}

impl Drop for WorkerPool {
    fn drop(&mut self) {
        let registry = lock(&self.registry);
        for handle in &registry.workers {
            kill_group(
                &handle.group,
                KillKind::Stopped,
                "the worker pool was dropped",
            );
        }
        for task in &registry.supervisors {
            task.abort();
        }
        drop(registry);
        if let Some(handle) = &self.forker {
            kill_group(
                &handle.group,
                KillKind::Stopped,
                "the worker pool was dropped",
            );
            handle.task.abort();
        }
        self.acceptor.abort();
        if let Some(central) = &self.central {
            central.abort();
        }
    }
}

/// Everything needed to start the pool's Python processes, first ones and replacements.
struct Launcher {
    config: PoolConfig,
    script: PathBuf,
    socket: PathBuf,
    /// The pool's private directory, where each worker writes its stack dumps.
    dir: PathBuf,
    token: String,
    registry: Arc<Mutex<Registry>>,
    slots: Arc<Slots>,
}

impl Launcher {
    /// `python -u fly_worker.py <pytest args>` in the workdir, in its own process group, with
    /// the protocol's environment on top of the suite's.
    fn command(&self) -> tokio::process::Command {
        let config = &self.config;
        let mut command = tokio::process::Command::new(&config.python);
        command
            .arg("-u")
            .arg(&self.script)
            .args(&config.pytest_args)
            .current_dir(&config.workdir)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(true);
        // The suite's own variables first: the protocol's must not be overridden.
        for (key, value) in &config.extra_env {
            command.env(key, value);
        }
        command
            .env_remove("FLY_WORKER_ID")
            .env_remove("FLY_WORKER_FORK")
            .env_remove("FLY_WORKER_OUTPUT")
            .env_remove("FLY_WORKER_TIMEOUT")
            .env("FLY_WORKER_SOCKET", &self.socket)
            .env("FLY_WORKER_TOKEN", &self.token)
            .env("FLY_WORKER_DUMP_DIR", &self.dir)
            .env("FLY_RUN_ID", &config.run_id)
            .env("PYTEST_XDIST_WORKER_COUNT", config.workers.to_string());
        if let Some(timeout) = config.timeout {
            command.env("FLY_WORKER_TIMEOUT", timeout.as_secs_f64().to_string());
        }
        command
    }

    /// What the supervisor of worker `id` watches for.
    fn options(&self, id: u32, expected_digest: Option<String>) -> SupervisorOptions {
        SupervisorOptions {
            timeout: self.config.timeout,
            dump: self.dir.join(format!("stack-{id}.txt")),
            unsent: self.dir.join(format!("pending-{id}.bin")),
            replacement: expected_digest.is_some() || id >= self.config.workers,
            expected_digest,
        }
    }

    /// A connection slot for worker `id`, made before the worker can connect.
    fn expect_connection(&self, id: u32) -> oneshot::Receiver<Result<UnixStream, String>> {
        let (conn_tx, conn_rx) = oneshot::channel();
        lock(&self.slots.workers).insert(id, conn_tx);
        conn_rx
    }

    /// Starts worker `id` as its own process (`PYTEST_XDIST_WORKER=gw<slot>`) with its
    /// supervisor, and records both in `registry`.
    fn spawn_worker(
        &self,
        registry: &mut Registry,
        id: u32,
        slot: u32,
        internal: &mpsc::Sender<Internal>,
        expected_digest: Option<String>,
    ) -> Result<(), WorkerError> {
        let mut command = self.command();
        command
            .env("FLY_WORKER_ID", id.to_string())
            .env("PYTEST_XDIST_WORKER", format!("gw{slot}"));
        let mut child = command.spawn().map_err(|source| WorkerError::Spawn {
            worker: id,
            python: self.config.python.clone(),
            workdir: self.config.workdir.clone(),
            source,
        })?;
        let group = Group::new(child.id().map(|pid| pid as i32));
        let output = Output::drain(child.stdout.take(), child.stderr.take());
        let conn_rx = self.expect_connection(id);
        let (cmd_tx, cmd_rx) = mpsc::unbounded_channel();
        let options = self.options(id, expected_digest);
        let supervisor =
            Supervisor::new(id, output, true, group.clone(), internal.clone(), options);
        let process = Process::Spawned(child);
        registry
            .supervisors
            .push(tokio::spawn(supervisor.run(process, conn_rx, cmd_rx)));
        registry.workers.push(WorkerHandle {
            commands: cmd_tx,
            group,
        });
        Ok(())
    }

    /// Starts every worker as its own process.
    fn spawned(&self, internal: &mpsc::Sender<Internal>) -> Result<(), WorkerError> {
        let mut registry = lock(&self.registry);
        for id in 0..self.config.workers {
            if let Err(error) = self.spawn_worker(&mut registry, id, id, internal, None) {
                for handle in &registry.workers {
                    kill_group(
                        &handle.group,
                        KillKind::Stopped,
                        "another worker failed to start",
                    );
                }
                return Err(error);
            }
        }
        Ok(())
    }

    /// The supervisor of forked worker `id`, writing to `output`, recorded in `registry`; the
    /// returned `Forked` goes to the fork server's watcher, which reports the worker's end.
    fn forked_worker(
        &self,
        registry: &mut Registry,
        id: u32,
        output: Output,
        internal: &mpsc::Sender<Internal>,
    ) -> Forked {
        let group = Group::new(None);
        let (end_tx, end_rx) = oneshot::channel();
        let conn_rx = self.expect_connection(id);
        let (cmd_tx, cmd_rx) = mpsc::unbounded_channel();
        let options = self.options(id, None);
        let supervisor =
            Supervisor::new(id, output, false, group.clone(), internal.clone(), options);
        let process = Process::Forked(end_rx);
        registry
            .supervisors
            .push(tokio::spawn(supervisor.run(process, conn_rx, cmd_rx)));
        registry.workers.push(WorkerHandle {
            commands: cmd_tx,
            group: group.clone(),
        });
        Forked::new(group, end_tx)
    }

    /// Starts the fork server, which collects once and forks the workers. Returns its handle
    /// and the read ends of the spare pipe pairs for replacements, with their pair numbers.
    fn forked(
        &self,
        internal: &mpsc::Sender<Internal>,
    ) -> Result<(ForkerHandle, VecDeque<Spare>), WorkerError> {
        let config = &self.config;
        // A stdout and a stderr pipe per worker and per allowed replacement: the read ends stay
        // here, the write ends go to the fork server, which hands each pair to one worker after
        // its fork.
        let pairs = config.workers + config.max_replacements;
        let mut readers = Vec::new();
        let mut writers = Vec::new();
        for _ in 0..2 * pairs {
            let (reader, writer) = std::io::pipe().map_err(WorkerError::Pipe)?;
            let reader =
                pipe::Receiver::from_owned_fd(OwnedFd::from(reader)).map_err(WorkerError::Pipe)?;
            readers.push(reader);
            writers.push(writer);
        }
        let fds: Vec<RawFd> = writers.iter().map(|w| w.as_raw_fd()).collect();
        let listed: Vec<String> = fds.iter().map(|fd| fd.to_string()).collect();
        let mut command = self.command();
        command
            .env("FLY_WORKER_FORK", config.workers.to_string())
            .env("FLY_WORKER_OUTPUT", listed.join(","))
            // The collection happens once, as worker 0 would do it.
            .env("PYTEST_XDIST_WORKER", "gw0");
        // SAFETY: the closure runs in the child between fork and exec, where only
        // async-signal-safe calls are allowed: it only calls fcntl (no allocation, no locks) to
        // let the write ends (created close-on-exec) survive the exec.
        unsafe {
            command.pre_exec(move || {
                for &fd in &fds {
                    if libc::fcntl(fd, libc::F_SETFD, 0) == -1 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        let spawned = command.spawn();
        // The fork server holds the write ends now; ours would keep the pipes from ending.
        drop(writers);
        let mut child = spawned.map_err(|source| WorkerError::SpawnForkServer {
            python: config.python.clone(),
            workdir: config.workdir.clone(),
            source,
        })?;

        let mut forked = Vec::new();
        let mut readers = readers.into_iter();
        {
            let mut registry = lock(&self.registry);
            for id in 0..config.workers {
                let output = Output::drain(readers.next(), readers.next());
                forked.push(self.forked_worker(&mut registry, id, output, internal));
            }
        }
        let mut spares = VecDeque::new();
        for pair in config.workers..pairs {
            if let (Some(out), Some(err)) = (readers.next(), readers.next()) {
                spares.push_back(Spare { pair, out, err });
            }
        }
        let group = Group::new(child.id().map(|pid| pid as i32));
        let output = Output::drain(child.stdout.take(), child.stderr.take());
        let (conn_tx, conn_rx) = oneshot::channel();
        *lock(&self.slots.forker) = Some(conn_tx);
        let (commands_tx, commands_rx) = mpsc::unbounded_channel();
        let forker = Forker::new(output, group.clone(), internal.clone(), forked);
        let task = tokio::spawn(forker.run(child, conn_rx, commands_rx));
        Ok((
            ForkerHandle {
                group,
                commands: commands_tx,
                task,
            },
            spares,
        ))
    }
}

/// The read ends of a pipe pair kept for a replacement worker; `pair` is its number in the
/// fork server's list.
struct Spare {
    pair: u32,
    out: pipe::Receiver,
    err: pipe::Receiver,
}

/// The central task's way to ask the fork server for replacements.
struct ForkerLink {
    group: Arc<Mutex<Group>>,
    commands: mpsc::UnboundedSender<ForkerCommand>,
    spares: VecDeque<Spare>,
}

/// Starts replacements for crashed workers, up to the configured number.
struct Replacer {
    launcher: Arc<Launcher>,
    /// For the replacements' supervisors; dropped once the pool stops, so the central task's
    /// channel closes when the last supervisor ends.
    internal: Option<mpsc::Sender<Internal>>,
    forker: Option<ForkerLink>,
    /// Worker id to its slot (the N of `gwN`).
    slot_of: HashMap<u32, u32>,
    next_id: u32,
    replaced: u32,
}

impl Replacer {
    fn stop(&mut self) {
        self.internal = None;
    }

    /// Starts a replacement for `worker` in its slot; returns its id, None when the pool is
    /// stopping anyway, or why there can be none. `digest` is the run's collection, which a
    /// spawned replacement must collect again.
    fn replace(&mut self, worker: u32, digest: &str) -> Result<Option<u32>, String> {
        let Some(internal) = self.internal.clone() else {
            return Ok(None);
        };
        let max = self.launcher.config.max_replacements;
        if self.replaced >= max {
            return Err(format!(
                "worker {worker} crashed or timed out, and {max} crashed workers were already \
                 replaced in this run (the limit)"
            ));
        }
        let slot = self.slot_of.get(&worker).copied().unwrap_or(worker);
        let id = self.next_id;
        let launcher = &self.launcher;
        let mut registry = lock(&launcher.registry);
        if registry.stopping {
            self.internal = None;
            return Ok(None);
        }
        match self.forker.as_mut() {
            Some(link) => {
                if lock(&link.group).ended {
                    return Err(format!(
                        "worker {worker} ended abnormally and its fork server is gone, so it \
                         cannot be replaced"
                    ));
                }
                let Some(spare) = link.spares.pop_front() else {
                    return Err(format!(
                        "worker {worker} ended abnormally and no output pipes are left for a \
                         replacement"
                    ));
                };
                let output = Output::drain(Some(spare.out), Some(spare.err));
                let forked = launcher.forked_worker(&mut registry, id, output, &internal);
                // Sent under the registry's lock: a stopping pool's "done" comes after it.
                let sent = link.commands.send(ForkerCommand::Fork {
                    worker: id,
                    slot,
                    output: spare.pair,
                    forked,
                });
                if sent.is_err() {
                    // The watcher is gone; the new supervisor learns that from its process.
                    warn!(worker = id, "the fork server's watcher is gone");
                }
            }
            None => launcher
                .spawn_worker(&mut registry, id, slot, &internal, Some(digest.to_string()))
                .map_err(|error| {
                    format!("worker {worker} ended abnormally and cannot be replaced: {error}")
                })?,
        }
        drop(registry);
        self.replaced += 1;
        self.next_id += 1;
        self.slot_of.insert(id, slot);
        info!(
            worker,
            replacement = id,
            slot,
            "replacing a crashed worker ({} of {max} replacements)",
            self.replaced
        );
        Ok(Some(id))
    }

    /// Tells every worker to give back its unstarted tests and finish: the pool is unhealthy.
    fn drain_all(&mut self) {
        self.stop();
        let mut registry = lock(&self.launcher.registry);
        registry.stopping = true;
        for handle in &registry.workers {
            let _ = handle.commands.send(Command::Drain);
        }
    }
}

/// Accepts worker connections and hands each, after a valid hello, to its supervisor.
async fn accept(listener: UnixListener, token: String, slots: Arc<Slots>) {
    let token = Arc::new(token);
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                tokio::spawn(handshake(stream, token.clone(), slots.clone()));
            }
            Err(error) => {
                // Out of file descriptors and the like: retry without spinning.
                warn!("accepting a worker connection failed: {error}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

async fn handshake(mut stream: UnixStream, token: Arc<String>, slots: Arc<Slots>) {
    // Read the hello unbuffered so no byte of the frames after it is taken from the stream.
    let body = match timeout(HELLO_WAIT, read_frame(&mut stream)).await {
        Ok(Ok(Some(body))) => body,
        Ok(Ok(None)) => return debug!("a worker connection closed before its hello"),
        Ok(Err(error)) => return warn!("dropping a worker connection: {error}"),
        Err(_) => return warn!("dropping a worker connection that sent no hello"),
    };
    let hello = match decode_frame(&body) {
        Ok(WorkerMessage::Hello(hello)) => hello,
        Ok(other) => return warn!("dropping a worker connection that began with {other:?}"),
        Err(error) => return warn!("dropping a worker connection: {error}"),
    };
    let sender = if hello.forker {
        lock(&slots.forker).take()
    } else {
        lock(&slots.workers).remove(&hello.worker)
    };
    let Some(sender) = sender else {
        return warn!(
            "dropping a connection claiming to be worker {} (fork server: {}), which is not \
             expected or already connected",
            hello.worker, hello.forker
        );
    };
    let verdict = if hello.token != *token {
        Err("its hello carried the wrong token".to_string())
    } else if hello.protocol != PROTOCOL_VERSION {
        Err(format!(
            "it speaks worker protocol {} but the agent speaks {PROTOCOL_VERSION}",
            hello.protocol
        ))
    } else {
        debug!(
            worker = hello.worker,
            forker = hello.forker,
            pid = hello.pid,
            "worker connected: python {}, pytest {}",
            hello.python,
            hello.pytest
        );
        Ok(stream)
    };
    let _ = sender.send(verdict);
}

/// Hex sha256 over the ordered nodeids, each followed by '\n'.
pub fn collection_digest(tests: &[CollectedTest]) -> String {
    let mut hasher = Sha256::new();
    for test in tests {
        hasher.update(test.nodeid.as_bytes());
        hasher.update(b"\n");
    }
    hex::encode(hasher.finalize())
}

/// Sends events to the agent; once the receiver is gone, events are dropped.
struct Outbox {
    events: mpsc::Sender<PoolEvent>,
    open: bool,
}

impl Outbox {
    async fn send(&mut self, event: PoolEvent) {
        if self.open && self.events.send(event).await.is_err() {
            self.open = false;
        }
    }
}

enum CollectionState {
    Pending,
    Done,
    Failed,
}

/// Merges the workers' collections into one Collected (or CollectionFailed), forwards
/// everything else, and replaces workers that crash once tests run. Until the collection is
/// known, WantWork and Exited events are held back, so the agent sees the collection's verdict
/// before any worker's work or end.
async fn central(
    workers: u32,
    mut internal: mpsc::Receiver<Internal>,
    mut wake: mpsc::UnboundedReceiver<()>,
    events: mpsc::Sender<PoolEvent>,
    total: Arc<OnceLock<u32>>,
    mut replacer: Replacer,
) {
    let mut out = Outbox { events, open: true };
    let mut state = CollectionState::Pending;
    let mut collected = vec![false; workers as usize];
    // The first collection: (worker, tests, deselected, digest).
    let mut first: Option<(u32, Vec<CollectedTest>, u32, String)> = None;
    let mut run_digest = String::new();
    let mut unhealthy = false;
    let mut held: Vec<PoolEvent> = Vec::new();
    loop {
        let message = tokio::select! {
            message = internal.recv() => match message {
                Some(message) => message,
                None => break,
            },
            Some(()) = wake.recv() => {
                // The pool is stopping: no replacements, and no sender of our own keeping the
                // channel open once the last supervisor is gone.
                replacer.stop();
                continue;
            }
        };
        match message {
            Internal::Event(event) => forward(&mut out, &state, &mut held, event).await,
            Internal::Events(events) => {
                for event in events {
                    forward(&mut out, &state, &mut held, event).await;
                }
            }
            Internal::Collected {
                worker,
                tests,
                deselected,
            } => {
                // A replacement's collection was checked by its supervisor.
                if !matches!(state, CollectionState::Pending) {
                    continue;
                }
                // The fork server's collection is every worker's; it is the only one then.
                let worker = match worker {
                    Some(worker) => worker,
                    None => {
                        collected.iter_mut().for_each(|seen| *seen = true);
                        0
                    }
                };
                if let Some(seen) = collected.get_mut(worker as usize) {
                    *seen = true;
                }
                let digest = collection_digest(&tests);
                if let Some((first_worker, first_tests, _, first_digest)) = &first {
                    if digest != *first_digest {
                        let output =
                            describe_mismatch((*first_worker, first_tests), (worker, &tests));
                        first = None;
                        state = CollectionState::Failed;
                        let failed = PoolEvent::CollectionFailed {
                            exit_code: fly_common::exit_code::INTERRUPTED,
                            output,
                        };
                        resolve(&mut out, failed, &mut held, false).await;
                        continue;
                    }
                } else {
                    first = Some((worker, tests, deselected, digest));
                }
                if collected.iter().all(|seen| *seen) {
                    if let Some((_, tests, deselected, digest)) = first.take() {
                        let _ = total.set(tests.len() as u32);
                        state = CollectionState::Done;
                        run_digest.clone_from(&digest);
                        let done = PoolEvent::Collected {
                            tests,
                            deselected,
                            digest,
                        };
                        resolve(&mut out, done, &mut held, true).await;
                    }
                }
            }
            Internal::Ended {
                worker,
                exit,
                exit_code,
                output,
                crashed,
            } => {
                match state {
                    CollectionState::Done => {
                        out.send(exit).await;
                        if crashed && !unhealthy {
                            match replacer.replace(worker, &run_digest) {
                                Ok(Some(replacement)) => {
                                    out.send(PoolEvent::Replaced {
                                        worker,
                                        replacement,
                                    })
                                    .await;
                                }
                                Ok(None) => {}
                                Err(reason) => {
                                    warn!("the agent is unhealthy: {reason}");
                                    unhealthy = true;
                                    replacer.drain_all();
                                    out.send(PoolEvent::Unhealthy { reason }).await;
                                }
                            }
                        }
                        continue;
                    }
                    CollectionState::Failed => {
                        out.send(exit).await;
                        continue;
                    }
                    CollectionState::Pending => {}
                }
                held.retain(|event| *event != PoolEvent::WantWork { worker });
                held.push(exit);
                let collected_here = collected.get(worker as usize).copied().unwrap_or(false);
                if !collected_here {
                    // This worker stopped before collecting: pytest could not start the run.
                    first = None;
                    state = CollectionState::Failed;
                    let failed = PoolEvent::CollectionFailed { exit_code, output };
                    resolve(&mut out, failed, &mut held, false).await;
                }
            }
        }
    }
}

/// Passes a worker's event on; a request for work waits for the collection's verdict.
async fn forward(
    out: &mut Outbox,
    state: &CollectionState,
    held: &mut Vec<PoolEvent>,
    event: PoolEvent,
) {
    match (event, state) {
        (PoolEvent::WantWork { worker }, CollectionState::Pending) => {
            let want = PoolEvent::WantWork { worker };
            if !held.contains(&want) {
                held.push(want);
            }
        }
        (PoolEvent::WantWork { .. }, CollectionState::Failed) => {}
        (event, _) => out.send(event).await,
    }
}

/// Sends the collection's verdict, then what was held back for it (requests for work only if
/// there is work).
async fn resolve(
    out: &mut Outbox,
    verdict: PoolEvent,
    held: &mut Vec<PoolEvent>,
    keep_wants: bool,
) {
    out.send(verdict).await;
    for event in held.drain(..) {
        if keep_wants || !matches!(event, PoolEvent::WantWork { .. }) {
            out.send(event).await;
        }
    }
}

/// Explains to the user how two workers' collections differ.
fn describe_mismatch(a: (u32, &[CollectedTest]), b: (u32, &[CollectedTest])) -> String {
    let (worker_a, tests_a) = a;
    let (worker_b, tests_b) = b;
    let mut text = format!(
        "fly: the workers collected different tests (worker {worker_a}: {} tests, worker \
         {worker_b}: {} tests), so tests cannot be shared between them. Is the collection \
         order random or dependent on the worker (PYTEST_XDIST_WORKER)?\n",
        tests_a.len(),
        tests_b.len()
    );
    let position = tests_a
        .iter()
        .zip(tests_b)
        .position(|(x, y)| x.nodeid != y.nodeid)
        .unwrap_or(tests_a.len().min(tests_b.len()));
    let name = |tests: &[CollectedTest]| {
        tests
            .get(position)
            .map_or("(nothing)".to_string(), |t| t.nodeid.clone())
    };
    text.push_str(&format!(
        "first difference at test {position}: worker {worker_a} has {}, worker {worker_b} has {}\n",
        name(tests_a),
        name(tests_b)
    ));
    text
}

/// The conventional name of a signal number, for messages.
pub(crate) fn signal_name(signal: i32) -> &'static str {
    match signal {
        libc::SIGHUP => "SIGHUP",
        libc::SIGINT => "SIGINT",
        libc::SIGQUIT => "SIGQUIT",
        libc::SIGILL => "SIGILL",
        libc::SIGTRAP => "SIGTRAP",
        libc::SIGABRT => "SIGABRT",
        libc::SIGBUS => "SIGBUS",
        libc::SIGFPE => "SIGFPE",
        libc::SIGKILL => "SIGKILL",
        libc::SIGUSR1 => "SIGUSR1",
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGUSR2 => "SIGUSR2",
        libc::SIGPIPE => "SIGPIPE",
        libc::SIGALRM => "SIGALRM",
        libc::SIGTERM => "SIGTERM",
        libc::SIGXCPU => "SIGXCPU",
        libc::SIGXFSZ => "SIGXFSZ",
        _ => "unknown signal",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn test(nodeid: &str) -> CollectedTest {
        CollectedTest {
            nodeid: nodeid.into(),
            file: "f.py".into(),
            line: 1,
            group: String::new(),
        }
    }

    #[test]
    fn digest_covers_the_ordered_nodeids() {
        let empty = collection_digest(&[]);
        assert_eq!(
            empty,
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        let ab = collection_digest(&[test("a"), test("b")]);
        assert_ne!(ab, collection_digest(&[test("b"), test("a")]));
        // "a\n" + "b\n" hashed as one string
        assert_eq!(ab, hex::encode(Sha256::digest(b"a\nb\n")));
    }

    #[test]
    fn mismatch_names_the_first_difference() {
        let text = describe_mismatch((0, &[test("a"), test("b")]), (1, &[test("a"), test("c")]));
        assert!(text.contains("first difference at test 1"), "{text}");
        assert!(text.contains("worker 0 has b, worker 1 has c"), "{text}");
    }
}
