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

mod forker;
pub mod frame;
mod supervisor;
mod tail;

use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
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
use tracing::{debug, warn};

pub use frame::{decode_frame, FrameError, WorkerMessage};

use forker::{Forked, Forker};
use frame::{read_frame, PROTOCOL_VERSION};
use supervisor::{Command, Process, Supervisor};
use tail::Output;

/// The worker script, shipped inside the agent binary.
const WORKER_SCRIPT: &str = include_str!("../python/fly_worker.py");

/// How long a connection may take to say hello before it is dropped.
const HELLO_WAIT: Duration = Duration::from_secs(60);

/// After the shutdown grace ran out and the workers were killed, how long to wait for their
/// supervisors to report the ends before giving up on them.
const AFTER_KILL_WAIT: Duration = Duration::from_secs(10);

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
    /// Answer to `revoke`: the leases actually taken back (never started).
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
    /// the failure if the worker never delivered a collection.
    Ended {
        worker: u32,
        exit: PoolEvent,
        exit_code: i32,
        output: String,
    },
}

/// The part of a process that both its supervisor and the pool's kill paths touch.
#[derive(Debug)]
pub(crate) struct Group {
    /// The process group id while the process may be alive; None before a forked worker's pid
    /// is known and once the process was reaped.
    pgid: Option<i32>,
    /// Why the pool killed the group (or will, as soon as its pgid is known), if it did.
    kill_reason: Option<String>,
    /// The process ended: nothing is signalled any more.
    ended: bool,
}

impl Group {
    fn new(pgid: Option<i32>) -> Arc<Mutex<Group>> {
        Arc::new(Mutex::new(Group {
            pgid,
            kill_reason: None,
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

fn lock(group: &Mutex<Group>) -> std::sync::MutexGuard<'_, Group> {
    group.lock().unwrap_or_else(|e| e.into_inner())
}

/// SIGKILLs the process's whole group (pytest and anything its tests started). A forked
/// worker whose pid is not known yet is killed as soon as it is.
pub(crate) fn kill_group(group: &Mutex<Group>, reason: &str) {
    let mut group = lock(group);
    if group.ended {
        return;
    }
    if group.kill_reason.is_none() {
        group.kill_reason = Some(reason.to_string());
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
    if group.kill_reason.is_some() {
        signal_group(group.pgid);
    }
}

/// The process ended: kills what is left of its group (processes its tests left behind may
/// hold pipes open) and returns why the pool killed it, if it did.
pub(crate) fn end_group(group: &Mutex<Group>) -> Option<String> {
    let mut group = lock(group);
    group.ended = true;
    signal_group(group.pgid.take());
    group.kill_reason.clone()
}

type Slot = Mutex<Option<oneshot::Sender<Result<UnixStream, String>>>>;

/// Where the acceptor hands each connection, by the hello's worker id (or fork server flag).
struct Slots {
    workers: Vec<Slot>,
    forker: Option<Slot>,
}

struct WorkerHandle {
    commands: mpsc::UnboundedSender<Command>,
    group: Arc<Mutex<Group>>,
}

/// A set of persistent pytest workers sharing one collection.
pub struct WorkerPool {
    workers: Vec<WorkerHandle>,
    total: Arc<OnceLock<u32>>,
    supervisors: Vec<JoinHandle<()>>,
    /// The fork server's group and its watcher, when the workers are forked.
    forker: Option<(Arc<Mutex<Group>>, JoinHandle<()>)>,
    central: Option<JoinHandle<()>>,
    acceptor: JoinHandle<()>,
    // Holds the script and the socket; removed when the pool goes.
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
        let launch = Launch {
            config: &config,
            script: &script,
            socket: &socket,
            token: uuid::Uuid::new_v4().simple().to_string(),
        };

        let (internal_tx, internal_rx) = mpsc::channel(256);
        let started = if config.fork {
            launch.forked(&internal_tx)?
        } else {
            launch.spawned(&internal_tx)?
        };
        drop(internal_tx);

        let total = Arc::new(OnceLock::new());
        let central = tokio::spawn(central(config.workers, internal_rx, events, total.clone()));
        let acceptor = tokio::spawn(accept(listener, launch.token, Arc::new(started.slots)));
        Ok(WorkerPool {
            workers: started.workers,
            total,
            supervisors: started.supervisors,
            forker: started.forker,
            central: Some(central),
            acceptor,
            _dir: dir,
        })
    }

    /// Appends `(lease, test_index)` pairs to the worker's queue, in order.
    pub fn assign(&self, worker: u32, leases: Vec<(u64, u32)>) -> Result<(), WorkerError> {
        let handle = self.handle(worker)?;
        let total = *self.total.get().ok_or(WorkerError::NotCollected)?;
        if let Some(&(_, index)) = leases.iter().find(|(_, index)| *index >= total) {
            return Err(WorkerError::BadTestIndex { index, total });
        }
        if leases.is_empty() {
            return Ok(());
        }
        self.send(worker, handle, Command::Assign(leases))
    }

    /// Tells the worker nothing more is coming for now: it runs what it holds, the last test
    /// with all fixtures torn down after it.
    pub fn no_more(&self, worker: u32) -> Result<(), WorkerError> {
        let handle = self.handle(worker)?;
        self.send(worker, handle, Command::NoMore)
    }

    /// Asks the worker to give back these leases if it has not started them; the answer is a
    /// `PoolEvent::Revoked` with the ones it gave back.
    pub fn revoke(&self, worker: u32, leases: Vec<u64>) -> Result<(), WorkerError> {
        let handle = self.handle(worker)?;
        self.send(worker, handle, Command::Revoke(leases))
    }

    /// Asks every worker to finish, waits up to `grace`, then SIGKILLs their process groups
    /// (and the fork server's). Keep receiving events meanwhile: the workers' last reports and
    /// exits are sent.
    pub async fn shutdown(mut self, grace: Duration) {
        for handle in &self.workers {
            let _ = handle.commands.send(Command::Shutdown);
        }
        let deadline = Instant::now() + grace;
        let mut running = Vec::new();
        for mut task in std::mem::take(&mut self.supervisors) {
            if timeout_at(deadline, &mut task).await.is_err() {
                running.push(task);
            }
        }
        let mut forker = self.forker.take();
        if let Some((_, task)) = forker.as_mut() {
            // The fork server leaves once it has reported all its workers' ends.
            if timeout_at(deadline, task).await.is_ok() {
                forker = None;
            }
        }
        const TOO_SLOW: &str = "it did not finish within the shutdown grace period";
        for handle in &self.workers {
            kill_group(&handle.group, TOO_SLOW);
        }
        // Only the fork server can report how a forked worker ended: it is stopped after its
        // workers, unless some were never forked (they end only when it does).
        let all_forked = self.workers.iter().all(|handle| {
            let group = lock(&handle.group);
            group.pgid.is_some() || group.ended
        });
        if let Some((group, _)) = forker.as_ref().filter(|_| !all_forked) {
            kill_group(group, TOO_SLOW);
        }
        for mut task in running {
            if timeout(AFTER_KILL_WAIT, &mut task).await.is_err() {
                warn!("a worker supervisor did not finish after its worker was killed");
                task.abort();
            }
        }
        if let Some((group, mut task)) = forker {
            kill_group(&group, TOO_SLOW);
            if timeout(AFTER_KILL_WAIT, &mut task).await.is_err() {
                warn!("the fork server's watcher did not finish after it was killed");
                task.abort();
            }
        }
        if let Some(mut central) = self.central.take() {
            if timeout(AFTER_KILL_WAIT, &mut central).await.is_err() {
                central.abort();
            }
        }
    }

    fn handle(&self, worker: u32) -> Result<&WorkerHandle, WorkerError> {
        self.workers
            .get(worker as usize)
            .ok_or(WorkerError::NoSuchWorker {
                worker,
                workers: self.workers.len() as u32,
            })
    }

    fn send(
        &self,
        worker: u32,
        handle: &WorkerHandle,
        command: Command,
    ) -> Result<(), WorkerError> {
        handle
            .commands
            .send(command)
            .map_err(|_| WorkerError::WorkerGone(worker))
    }
}

impl Drop for WorkerPool {
    fn drop(&mut self) {
        for handle in &self.workers {
            kill_group(&handle.group, "the worker pool was dropped");
        }
        if let Some((group, task)) = &self.forker {
            kill_group(group, "the worker pool was dropped");
            task.abort();
        }
        self.acceptor.abort();
        for task in &self.supervisors {
            task.abort();
        }
        if let Some(central) = &self.central {
            central.abort();
        }
    }
}

/// Everything needed to start the pool's Python processes.
struct Launch<'a> {
    config: &'a PoolConfig,
    script: &'a Path,
    socket: &'a Path,
    token: String,
}

/// The started processes, their supervisors, and where their connections go.
struct Started {
    workers: Vec<WorkerHandle>,
    supervisors: Vec<JoinHandle<()>>,
    forker: Option<(Arc<Mutex<Group>>, JoinHandle<()>)>,
    slots: Slots,
}

impl Launch<'_> {
    /// `python -u fly_worker.py <pytest args>` in the workdir, in its own process group, with
    /// the protocol's environment on top of the suite's.
    fn command(&self) -> tokio::process::Command {
        let config = self.config;
        let mut command = tokio::process::Command::new(&config.python);
        command
            .arg("-u")
            .arg(self.script)
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
            .env("FLY_WORKER_SOCKET", self.socket)
            .env("FLY_WORKER_TOKEN", &self.token)
            .env("FLY_RUN_ID", &config.run_id)
            .env("PYTEST_XDIST_WORKER_COUNT", config.workers.to_string());
        command
    }

    /// Starts every worker as its own process.
    fn spawned(&self, internal: &mpsc::Sender<Internal>) -> Result<Started, WorkerError> {
        let config = self.config;
        let mut started = Started {
            workers: Vec::new(),
            supervisors: Vec::new(),
            forker: None,
            slots: Slots {
                workers: Vec::new(),
                forker: None,
            },
        };
        for id in 0..config.workers {
            let mut command = self.command();
            command
                .env("FLY_WORKER_ID", id.to_string())
                .env("PYTEST_XDIST_WORKER", format!("gw{id}"));
            let mut child = match command.spawn() {
                Ok(child) => child,
                Err(source) => {
                    for handle in &started.workers {
                        kill_group(&handle.group, "another worker failed to start");
                    }
                    return Err(WorkerError::Spawn {
                        worker: id,
                        python: config.python.clone(),
                        workdir: config.workdir.clone(),
                        source,
                    });
                }
            };
            let group = Group::new(child.id().map(|pid| pid as i32));
            let output = Output::drain(child.stdout.take(), child.stderr.take());
            let (conn_tx, conn_rx) = oneshot::channel();
            let (cmd_tx, cmd_rx) = mpsc::unbounded_channel();
            started.slots.workers.push(Mutex::new(Some(conn_tx)));
            let supervisor = Supervisor::new(id, output, true, group.clone(), internal.clone());
            let process = Process::Spawned(child);
            started
                .supervisors
                .push(tokio::spawn(supervisor.run(process, conn_rx, cmd_rx)));
            started.workers.push(WorkerHandle {
                commands: cmd_tx,
                group,
            });
        }
        Ok(started)
    }

    /// Starts the fork server, which collects once and forks the workers.
    fn forked(&self, internal: &mpsc::Sender<Internal>) -> Result<Started, WorkerError> {
        let config = self.config;
        // A stdout and a stderr pipe per worker: the read ends stay here, the write ends go to
        // the fork server, which hands each pair to its worker after the fork.
        let mut readers = Vec::new();
        let mut writers = Vec::new();
        for _ in 0..2 * config.workers {
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

        let mut started = Started {
            workers: Vec::new(),
            supervisors: Vec::new(),
            forker: None,
            slots: Slots {
                workers: Vec::new(),
                forker: None,
            },
        };
        let mut forked = Vec::new();
        let mut readers = readers.into_iter();
        for id in 0..config.workers {
            let output = Output::drain(readers.next(), readers.next());
            let group = Group::new(None);
            let (end_tx, end_rx) = oneshot::channel();
            let (conn_tx, conn_rx) = oneshot::channel();
            let (cmd_tx, cmd_rx) = mpsc::unbounded_channel();
            started.slots.workers.push(Mutex::new(Some(conn_tx)));
            let supervisor = Supervisor::new(id, output, false, group.clone(), internal.clone());
            let process = Process::Forked(end_rx);
            started
                .supervisors
                .push(tokio::spawn(supervisor.run(process, conn_rx, cmd_rx)));
            forked.push(Forked::new(group.clone(), end_tx));
            started.workers.push(WorkerHandle {
                commands: cmd_tx,
                group,
            });
        }
        let group = Group::new(child.id().map(|pid| pid as i32));
        let output = Output::drain(child.stdout.take(), child.stderr.take());
        let (conn_tx, conn_rx) = oneshot::channel();
        started.slots.forker = Some(Mutex::new(Some(conn_tx)));
        let forker = Forker::new(output, group.clone(), internal.clone(), forked);
        started.forker = Some((group, tokio::spawn(forker.run(child, conn_rx))));
        Ok(started)
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
    let slot = if hello.forker {
        slots.forker.as_ref()
    } else {
        slots.workers.get(hello.worker as usize)
    };
    let Some(slot) = slot else {
        return warn!(
            "dropping a connection claiming to be worker {} (fork server: {})",
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
    let sender = slot.lock().ok().and_then(|mut slot| slot.take());
    match sender {
        Some(sender) => {
            let _ = sender.send(verdict);
        }
        None => warn!("dropping a second connection for worker {}", hello.worker),
    }
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

/// Merges the workers' collections into one Collected (or CollectionFailed) and forwards
/// everything else. Until the collection is known, WantWork and Exited events are held back, so
/// the agent sees the collection's verdict before any worker's work or end.
async fn central(
    workers: u32,
    mut internal: mpsc::Receiver<Internal>,
    events: mpsc::Sender<PoolEvent>,
    total: Arc<OnceLock<u32>>,
) {
    let mut out = Outbox { events, open: true };
    let mut state = CollectionState::Pending;
    let mut collected = vec![false; workers as usize];
    // The first collection: (worker, tests, deselected, digest).
    let mut first: Option<(u32, Vec<CollectedTest>, u32, String)> = None;
    let mut held: Vec<PoolEvent> = Vec::new();
    while let Some(message) = internal.recv().await {
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
            } => {
                if !matches!(state, CollectionState::Pending) {
                    out.send(exit).await;
                    continue;
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
