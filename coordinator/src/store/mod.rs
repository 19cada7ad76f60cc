//! The coordinator's SQLite store: a record of runs, agents, collections, every phase report and
//! every final result, written by one background thread so the async runtime never waits on
//! SQLite; and the duration history the scheduler plans runs with.
//!
//! Only the coordinator writes the database. [`Store::write`] queues a [`Write`] on a channel;
//! the writer thread drains what is pending (up to [`StoreConfig::batch_limit`] writes), applies
//! it in one transaction with cached prepared statements and commits, so the cost of a commit
//! is shared by thousands of rows. [`Store::flush`] resolves once everything queued before it is
//! committed.
//!
//! Failure policy: a batch that fails as a whole (disk full, the file locked by another process)
//! is logged loudly, kept in memory and retried with capped backoff; no write is ever dropped,
//! and flush waiters keep waiting until it lands. A single write that SQLite rejects on its own
//! merits (a value it cannot store) is logged and skipped, so one bad write can neither stop the
//! thread nor hold up the others. Nothing is rejected for referring to a missing row: the schema
//! has no foreign keys.
//!
//! [`Store::write`] never blocks: the producers are the coordinator's own tasks. The backlog is
//! bounded all the same: the dispatcher waits for [`Store::room`] (fewer than
//! [`StoreConfig::backlog_limit`] writes queued) before it takes the next agent message, so
//! while the disk is slow, full or locked the farm waits in gRPC flow control instead of the
//! queue growing without limit.
//!
//! Reads the coordinator itself needs ([`Store::load_history`]) run on read-only connections of
//! their own on tokio's blocking pool: never on the writer thread (they would wait behind a
//! batch) and never on the runtime's threads.

mod history;
mod keys;
mod results;
mod resume;
mod retention;
mod schema;

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use fly_common::proto::{PhaseReport, TestResult, Topology};
use rusqlite::{params, Connection, ErrorCode, TransactionBehavior};
use tokio::sync::oneshot;

use crate::collection::Collection;

pub use history::{History, MAX_SAMPLES};
pub use resume::{count_result, LookupError, RecordedRun, COORDINATOR_STOPPED, STATUS_INTERRUPTED};
pub use retention::{PruneSummary, Retention, RECENT_GRACE};
pub use schema::SCHEMA_VERSION;

/// Run status written by [`Write::RunCreated`].
pub const STATUS_CREATED: &str = "created";
/// Run status written by [`Write::RunStarted`].
pub const STATUS_RUNNING: &str = "running";

/// What can go wrong opening or using the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot create the directory {path} for the database: {source}")]
    CreateDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("SQLite database {path}: {action} failed: {source}")]
    Sqlite {
        path: PathBuf,
        action: &'static str,
        source: rusqlite::Error,
    },
    #[error(
        "SQLite database {path} has schema version {found}, but this fly-coordinator only knows \
         versions up to {supported}: it was written by a newer fly. Upgrade fly-coordinator, or \
         point it at another database file"
    )]
    SchemaTooNew {
        path: PathBuf,
        found: u32,
        supported: u32,
    },
    #[error("SQLite database {path}: migrating the schema to version {version} failed: {source}")]
    Migrate {
        path: PathBuf,
        version: u32,
        source: rusqlite::Error,
    },
    #[error("cannot start the store's writer thread: {0}")]
    SpawnWriter(std::io::Error),
    #[error("the store's writer thread for {path} has stopped; writes queued since were lost")]
    WriterGone { path: PathBuf },
    #[error("cannot start a thread to read the duration history: {0}")]
    SpawnReader(std::io::Error),
    #[error("a read of {path} did not finish: {source}")]
    ReadTask {
        path: PathBuf,
        source: tokio::task::JoinError,
    },
}

/// Tuning of the writer. [`Store::open`] uses the defaults; tests shorten the timeouts.
#[derive(Debug, Clone)]
pub struct StoreConfig {
    /// How long SQLite itself waits for a lock held by another connection before a statement
    /// fails with "database is locked" and the batch is retried.
    pub busy_timeout: Duration,
    /// Most writes applied in one transaction. Bigger batches amortise the commit; this bound
    /// keeps a transaction (and the memory held for a retry) reasonable.
    pub batch_limit: usize,
    /// First wait before retrying a failed batch; doubled after every failure.
    pub initial_backoff: Duration,
    /// Longest wait between retries of a failed batch.
    pub max_backoff: Duration,
    /// Queued writes above which [`Store::room`] makes producers wait.
    pub backlog_limit: usize,
    /// Most rows one step of a prune ([`Store::prune`]) deletes in its transaction; ordinary
    /// batches are committed between steps.
    pub prune_chunk: usize,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            busy_timeout: Duration::from_secs(5),
            batch_limit: 10_000,
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(10),
            // About 5,000 tests' reports and results: two of the writer's batches, a fraction
            // of a second of its work. More only holds more memory: at a million tests the farm
            // ran as fast with 20,000 as with 40,000, 10-15 MB smaller.
            backlog_limit: 20_000,
            // Tens of milliseconds of deleting: what a batch of reports may wait behind.
            prune_chunk: 5_000,
        }
    }
}

/// One change to the record. Applied in the order queued.
#[derive(Debug, Clone)]
pub enum Write {
    /// A run was submitted. Its status becomes [`STATUS_CREATED`].
    RunCreated {
        run_id: String,
        project: String,
        pytest_args: Vec<String>,
        client_cwd: String,
        created_at: f64,
    },
    /// The run carries on with the unfinished run `resumed_from` (`run --resume`).
    RunResumed {
        run_id: String,
        resumed_from: String,
    },
    /// The run began handing out work. Its status becomes [`STATUS_RUNNING`].
    RunStarted { run_id: String, started_at: f64 },
    /// The run's collection. Replaces any collection recorded for the run before.
    RunCollected {
        run_id: String,
        tests: Arc<Collection>,
        deselected: u32,
    },
    /// The run ended with this status, exit code and pytest category counts.
    RunFinished {
        run_id: String,
        status: String,
        exit_code: i32,
        finished_at: f64,
        counts: Vec<(String, u32)>,
        message: String,
    },
    /// An agent joined. An agent reconnecting under the same id replaces its row.
    AgentConnected {
        agent_id: String,
        hostname: String,
        fly_version: String,
        protocol_version: u32,
        workers: u32,
        topology: Topology,
        labels: Vec<(String, String)>,
        workdir: String,
        python: String,
        connected_at: f64,
        /// How fast the agent's cores run Python relative to the reference machine (1.0), from
        /// its calibration. Stored as NULL when not positive and finite (an agent that did not
        /// measure it).
        speed: f64,
    },
    /// An agent's stream ended.
    AgentDisconnected {
        agent_id: String,
        at: f64,
        reason: String,
    },
    /// An agent took part in a run, or was refused (`accepted: false`) with `reason`, e.g.
    /// because its collection differed from the run's.
    RunAgent {
        run_id: String,
        agent_id: String,
        workers: u32,
        accepted: bool,
        reason: String,
    },
    /// One phase report of one attempt at a test. `superseded` is set when the report's lease
    /// is no longer the test's current one (an attempt already given up on, including one
    /// whose report arrives after the test's result came from another lease).
    Report {
        run_id: String,
        nodeid: String,
        agent_id: String,
        worker: u32,
        superseded: bool,
        report: PhaseReport,
    },
    /// A test's final result. Reports of the test from other leases (attempts that were given
    /// up on) are marked superseded; reports of its own lease are left as they are.
    TestResult {
        run_id: String,
        test_index: u32,
        nodeid: String,
        outcome: String,
        duration: f64,
        attempts: u32,
        lease: u64,
        agent_id: String,
        worker: u32,
    },
    /// More about a test's final result, queued right after its [`Write::TestResult`] when
    /// there is any: `flaky` (an attempt failed and a rerun passed), and `lost_on`, the JSON
    /// array of the workers lost while running the test (empty: none).
    TestResultDetails {
        run_id: String,
        test_index: u32,
        flaky: bool,
        lost_on: String,
    },
    /// The run is over: add what it taught to `project`'s duration history, from the run's
    /// results and the phase reports of each result's attempt, as written before this. One
    /// duration sample per test with a result, one fixture-cost sample per module and class
    /// that can be measured; all in reference seconds, multiplied by `speeds[agent_id]` of the
    /// agent that ran them (an agent missing from `speeds` falls back to the speed it connected
    /// with, then 1.0). Queue it once per run: every write adds samples.
    RecordHistory {
        project: String,
        run_id: String,
        speeds: HashMap<String, f64>,
    },
}

impl Write {
    /// The variant's name, for logs.
    fn kind(&self) -> &'static str {
        match self {
            Write::RunCreated { .. } => "RunCreated",
            Write::RunStarted { .. } => "RunStarted",
            Write::RunResumed { .. } => "RunResumed",
            Write::RunCollected { .. } => "RunCollected",
            Write::RunFinished { .. } => "RunFinished",
            Write::AgentConnected { .. } => "AgentConnected",
            Write::AgentDisconnected { .. } => "AgentDisconnected",
            Write::RunAgent { .. } => "RunAgent",
            Write::Report { .. } => "Report",
            Write::TestResult { .. } => "TestResult",
            Write::TestResultDetails { .. } => "TestResultDetails",
            Write::RecordHistory { .. } => "RecordHistory",
        }
    }

    /// The run or agent the write is about, for logs.
    fn subject(&self) -> &str {
        match self {
            Write::RunCreated { run_id, .. }
            | Write::RunStarted { run_id, .. }
            | Write::RunResumed { run_id, .. }
            | Write::RunCollected { run_id, .. }
            | Write::RunFinished { run_id, .. }
            | Write::RunAgent { run_id, .. }
            | Write::Report { run_id, .. }
            | Write::TestResult { run_id, .. }
            | Write::TestResultDetails { run_id, .. }
            | Write::RecordHistory { run_id, .. } => run_id,
            Write::AgentConnected { agent_id, .. } | Write::AgentDisconnected { agent_id, .. } => {
                agent_id
            }
        }
    }
}

/// What travels to the writer thread.
// Writes are nearly every command; boxing them to shrink the rare Flush/Shutdown would cost an
// allocation per write.
#[allow(clippy::large_enum_variant)]
enum Command {
    Write(Write),
    /// Answer once everything queued before this is committed.
    Flush(oneshot::Sender<()>),
    /// Delete what `retention` does not keep, a chunk at a time between batches, and answer
    /// when done.
    Prune {
        retention: Retention,
        done: PruneWaiter,
    },
    /// Commit everything queued before this, close the database, answer, and stop.
    Shutdown(oneshot::Sender<()>),
}

/// Handle to the store. Cheap to clone: every clone feeds the same writer thread.
#[derive(Clone)]
pub struct Store {
    tx: mpsc::Sender<Command>,
    path: Arc<Path>,
    busy_timeout: Duration,
    backlog: Arc<Backlog>,
    /// Tells other coordinators opening the file that this one uses it, until the last clone
    /// is dropped.
    _presence: Arc<resume::Presence>,
}

/// How many writes are queued and not yet committed, so that whoever produces them can slow
/// down (see [`Store::room`]) rather than let memory grow while SQLite is slower than the farm.
struct Backlog {
    queued: AtomicUsize,
    /// Signalled whenever the writer commits a batch.
    drained: tokio::sync::Notify,
    limit: usize,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("path", &self.path).finish()
    }
}

impl Store {
    /// Creates the parent directory if missing, opens (or creates) the database, sets WAL,
    /// synchronous=NORMAL and a busy timeout, runs migrations (refusing a database whose schema
    /// is newer than this binary knows, with a clear error), and starts the writer thread.
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        Store::open_with(path, StoreConfig::default())
    }

    /// [`Store::open`] with explicit tuning.
    pub fn open_with(path: &Path, config: StoreConfig) -> Result<Store, StoreError> {
        if let Some(dir) = path.parent().filter(|dir| !dir.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|source| StoreError::CreateDir {
                path: dir.to_path_buf(),
                source,
            })?;
        }
        let (presence, alone) = resume::announce(path);
        let mut conn = schema::connect(path, config.busy_timeout)?;
        schema::migrate(&mut conn, path)?;
        if alone {
            for run in resume::mark_abandoned(&mut conn, path)? {
                tracing::warn!(
                    run = %run,
                    "run {run} was in progress when its coordinator stopped; it is marked \
                     interrupted (`fly-coordinator run --resume {run}` runs the rest)"
                );
            }
        } else {
            tracing::info!(
                path = %path.display(),
                "another coordinator has this database open: runs in progress are left as they are"
            );
        }
        let (tx, rx) = mpsc::channel();
        let busy_timeout = config.busy_timeout;
        let backlog = Arc::new(Backlog {
            queued: AtomicUsize::new(0),
            drained: tokio::sync::Notify::new(),
            limit: config.backlog_limit.max(1),
        });
        let writer = Writer {
            conn,
            path: path.to_path_buf(),
            config,
            backlog: backlog.clone(),
            keys: keys::Keys::default(),
        };
        std::thread::Builder::new()
            .name("fly-store-writer".into())
            .spawn(move || writer.run(rx))
            .map_err(StoreError::SpawnWriter)?;
        Ok(Store {
            tx,
            path: Arc::from(path),
            busy_timeout,
            backlog,
            _presence: Arc::new(presence),
        })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Queue a write. Never blocks on SQLite; producers of many writes wait for
    /// [`Store::room`] between inputs so the queue stays bounded.
    pub fn write(&self, w: Write) {
        self.backlog.queued.fetch_add(1, Ordering::Relaxed);
        if let Err(mpsc::SendError(Command::Write(w))) = self.tx.send(Command::Write(w)) {
            // Only after close() or a crashed writer: nothing can record it any more.
            tracing::error!(
                path = %self.path.display(),
                kind = w.kind(),
                subject = w.subject(),
                "the store's writer has stopped; a write was lost"
            );
        }
    }

    /// Resolves once fewer than [`StoreConfig::backlog_limit`] writes wait to be committed. The
    /// dispatcher waits for this before it takes the next agent message, so a farm faster
    /// than the disk is slowed down (its reports wait in gRPC flow control) instead of filling
    /// memory. While the database cannot be written at all this waits too: nothing is dropped.
    pub async fn room(&self) {
        loop {
            let drained = self.backlog.drained.notified();
            if self.backlog.queued.load(Ordering::Relaxed) < self.backlog.limit {
                return;
            }
            drained.await;
        }
    }

    /// Writes queued and not yet committed.
    pub fn backlog(&self) -> usize {
        self.backlog.queued.load(Ordering::Relaxed)
    }

    /// Resolves once every write queued before it is committed (used before a run reports
    /// "finished", so a finished run's rows are all on disk). While the database cannot be
    /// written, this waits: writes are retried, never dropped.
    pub async fn flush(&self) -> Result<(), StoreError> {
        let (done, wait) = oneshot::channel();
        self.tx
            .send(Command::Flush(done))
            .map_err(|_| self.writer_gone())?;
        wait.await.map_err(|_| self.writer_gone())
    }

    /// Flush and stop the writer thread; resolves after the database is closed. Call it once
    /// every other clone is done writing: a write from another clone after this is lost (and
    /// logged). Like [`Store::flush`], it waits while the database cannot be written; wrap it
    /// in a timeout to give up on a broken disk at shutdown.
    pub async fn close(self) -> Result<(), StoreError> {
        let (done, wait) = oneshot::channel();
        self.tx
            .send(Command::Shutdown(done))
            .map_err(|_| self.writer_gone())?;
        wait.await.map_err(|_| self.writer_gone())
    }

    /// Deletes the rows of old finished runs that `retention` does not keep (see
    /// [`Retention`]; their `runs` row stays, marked `pruned_at`), oldest first, and resolves
    /// with what it did. It never deletes the rows of a run in progress, of one that finished
    /// within [`RECENT_GRACE`], of one a kept run resumed, nor the duration history or agents.
    ///
    /// The writer thread does it in short transactions of at most
    /// [`StoreConfig::prune_chunk`] rows, committing the writes queued meanwhile between them:
    /// writes keep landing and [`Store::flush`] does not wait for a prune. Prunes run one after
    /// the other. A prune that fails (the file locked for longer than the busy timeout, say)
    /// is given up with an error; what it deleted stays deleted, and the next prune carries
    /// on. If the store closes first, the summary says it is not complete.
    pub fn prune(
        &self,
        retention: Retention,
    ) -> impl Future<Output = Result<PruneSummary, StoreError>> + Send + 'static {
        let (done, wait) = oneshot::channel();
        let sent = self.tx.send(Command::Prune { retention, done }).is_ok();
        let path = self.path.to_path_buf();
        async move {
            let gone = || StoreError::WriterGone { path };
            if !sent {
                return Err(gone());
            }
            // No answer at all: the writer thread died (it answers even when it closes).
            wait.await.map_err(|_| gone())?
        }
    }

    /// Reads `project`'s duration history (estimates in reference seconds; empty for a project
    /// never recorded) on read-only connections, from tokio's blocking pool. It sees what was
    /// committed when it starts: flush first to include writes still queued. Needs a tokio
    /// runtime when polled.
    pub fn load_history(
        &self,
        project: &str,
    ) -> impl Future<Output = Result<History, StoreError>> + Send + 'static {
        let path = self.path.to_path_buf();
        let project = project.to_owned();
        let busy_timeout = self.busy_timeout;
        async move {
            let task_path = path.clone();
            tokio::task::spawn_blocking(move || history::load(&task_path, &project, busy_timeout))
                .await
                .map_err(|source| StoreError::ReadTask { path, source })?
        }
    }

    /// Reads the run `given` names (its id, or a prefix of one run's id) with the results of
    /// the runs it resumed, on a read-only connection from tokio's blocking pool: what `run
    /// --resume` carries on with. Sees what was committed when it starts.
    pub fn load_run(
        &self,
        given: &str,
    ) -> impl Future<Output = Result<RecordedRun, LookupError>> + Send + 'static {
        let path = self.path.to_path_buf();
        let given = given.to_owned();
        let busy_timeout = self.busy_timeout;
        async move {
            let task_path = path.clone();
            tokio::task::spawn_blocking(move || resume::load(&task_path, &given, busy_timeout))
                .await
                .map_err(|source| StoreError::ReadTask { path, source })?
        }
    }

    /// Reads the final results of `run_id`'s tests `indexes`, as the dispatcher streamed them,
    /// on a read-only connection from tokio's blocking pool: what a follower that fell behind
    /// the run missed. Sees what was committed when it starts: flush first. Tests without a
    /// recorded result are left out.
    pub fn read_results(
        &self,
        run_id: &str,
        indexes: Vec<u32>,
    ) -> impl Future<Output = Result<Vec<TestResult>, StoreError>> + Send + 'static {
        let path = self.path.to_path_buf();
        let run_id = run_id.to_owned();
        let busy_timeout = self.busy_timeout;
        async move {
            let task_path = path.clone();
            tokio::task::spawn_blocking(move || {
                results::read(&task_path, &run_id, &indexes, busy_timeout)
            })
            .await
            .map_err(|source| StoreError::ReadTask { path, source })?
        }
    }

    fn writer_gone(&self) -> StoreError {
        StoreError::WriterGone {
            path: self.path.to_path_buf(),
        }
    }
}

/// Where the answer to a [`Store::prune`] goes.
type PruneWaiter = oneshot::Sender<Result<PruneSummary, StoreError>>;

/// The writer thread's state.
struct Writer {
    conn: Connection,
    path: PathBuf,
    config: StoreConfig,
    backlog: Arc<Backlog>,
    keys: keys::Keys,
}

impl Writer {
    fn run(mut self, rx: mpsc::Receiver<Command>) {
        let mut batch: Vec<Write> = Vec::new();
        let mut waiters: Vec<oneshot::Sender<()>> = Vec::new();
        let mut shutdown = None;
        let mut prunes: VecDeque<(retention::Job, PruneWaiter)> = VecDeque::new();
        loop {
            let first = if prunes.is_empty() {
                match rx.recv() {
                    Ok(command) => command,
                    // `recv` fails only once every Store is dropped and the channel is empty:
                    // then everything has been committed and the thread ends quietly.
                    Err(mpsc::RecvError) => break,
                }
            } else {
                // While a prune is under way, take what is queued without waiting for more:
                // with nothing queued, the prune's next step follows at once.
                match rx.try_recv() {
                    Ok(command) => command,
                    Err(mpsc::TryRecvError::Empty) => {
                        self.prune_step(&mut prunes);
                        continue;
                    }
                    Err(mpsc::TryRecvError::Disconnected) => break,
                }
            };
            let mut next = Some(first);
            while let Some(command) = next.take() {
                match command {
                    Command::Write(w) => batch.push(w),
                    Command::Flush(done) => waiters.push(done),
                    Command::Prune { retention, done } => {
                        prunes.push_back((retention::Job::new(retention, epoch_now()), done));
                    }
                    Command::Shutdown(done) => {
                        shutdown = Some(done);
                        break;
                    }
                }
                if batch.len() < self.config.batch_limit {
                    next = rx.try_recv().ok();
                }
            }
            if !batch.is_empty() {
                self.commit_until_done(&batch);
                self.backlog
                    .queued
                    .fetch_sub(batch.len(), Ordering::Relaxed);
                self.backlog.drained.notify_waiters();
                batch.clear();
            }
            for done in waiters.drain(..) {
                // A waiter that gave up (its future dropped) does not matter.
                let _ = done.send(());
            }
            if shutdown.is_some() {
                break;
            }
            self.prune_step(&mut prunes);
        }
        // Prunes cut short: what they deleted stays deleted, and the next one carries on.
        for (job, done) in prunes {
            let _ = done.send(Ok(job.summary().clone()));
        }
        if let Err((_, err)) = self.conn.close() {
            tracing::error!(path = %self.path.display(), error = %err, "closing the store failed");
        }
        if let Some(done) = shutdown {
            let _ = done.send(());
        }
    }

    /// One step of the first prune queued, if any; answers it when it is done or failed.
    fn prune_step(&mut self, prunes: &mut VecDeque<(retention::Job, PruneWaiter)>) {
        let Some((job, _)) = prunes.front_mut() else {
            return;
        };
        let result = job.step(&mut self.conn, self.config.prune_chunk);
        let answer = match result {
            Ok(retention::Progress::More) => return,
            Ok(retention::Progress::Done) => Ok(job.summary().clone()),
            Err(source) => {
                tracing::error!(
                    path = %self.path.display(),
                    error = %source,
                    "pruning old runs failed; the next prune carries on"
                );
                Err(StoreError::Sqlite {
                    path: self.path.clone(),
                    action: "pruning old runs",
                    source,
                })
            }
        };
        if let Some((_, done)) = prunes.pop_front() {
            let _ = done.send(answer);
        }
    }

    /// Commits the batch, retrying with capped backoff until it succeeds: the batch stays in
    /// memory meanwhile, so nothing is lost if the disk fills up or another process holds the
    /// database locked for a while.
    fn commit_until_done(&mut self, batch: &[Write]) {
        let mut backoff = self.config.initial_backoff;
        let mut failures = 0u32;
        loop {
            let started = Instant::now();
            match self.commit(batch) {
                Ok(skipped) => {
                    if failures > 0 {
                        tracing::warn!(
                            path = %self.path.display(),
                            writes = batch.len(),
                            failures,
                            "the store's pending writes were committed after retrying"
                        );
                    }
                    tracing::debug!(
                        writes = batch.len(),
                        skipped,
                        elapsed = ?started.elapsed(),
                        "store batch committed"
                    );
                    return;
                }
                Err(err) => {
                    failures += 1;
                    tracing::error!(
                        path = %self.path.display(),
                        error = %err,
                        writes = batch.len(),
                        failures,
                        retry_in_ms = backoff.as_millis() as u64,
                        "writing to the store failed; keeping the writes and retrying"
                    );
                    std::thread::sleep(backoff);
                    backoff = (backoff * 2).min(self.config.max_backoff);
                }
            }
        }
    }

    /// Applies the batch in one transaction. Returns how many writes were skipped as malformed;
    /// an error means nothing was committed and the whole batch must be retried.
    fn commit(&mut self, batch: &[Write]) -> rusqlite::Result<usize> {
        // IMMEDIATE takes the write lock up front, so a lock held by another process shows up
        // here (after the busy timeout) rather than halfway through the batch.
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let mut skipped = 0;
        for w in batch {
            if let Err(err) = apply(&tx, &mut self.keys, w) {
                if affects_only_this_write(&err) {
                    skipped += 1;
                    tracing::error!(
                        path = %self.path.display(),
                        kind = w.kind(),
                        subject = w.subject(),
                        error = %err,
                        "the store rejected a write; skipping it"
                    );
                } else {
                    // Dropping `tx` rolls the whole batch back, with the keys it created.
                    self.keys.forget();
                    return Err(err);
                }
            }
        }
        if let Err(err) = tx.commit() {
            self.keys.forget();
            return Err(err);
        }
        Ok(skipped)
    }
}

/// Whether an error is about the write's own values (skip it) rather than the database being
/// unwritable right now (retry the batch). Unknown SQLite errors count as the latter: retrying
/// forever, loudly, is better than silently dropping data.
fn affects_only_this_write(err: &rusqlite::Error) -> bool {
    match err {
        rusqlite::Error::SqliteFailure(failure, _) => matches!(
            failure.code,
            ErrorCode::ConstraintViolation
                | ErrorCode::TypeMismatch
                | ErrorCode::TooBig
                | ErrorCode::ParameterOutOfRange
        ),
        // Everything else rusqlite reports itself is a value it could not convert, such as an
        // integer beyond SQLite's 64-bit signed range.
        _ => true,
    }
}

/// Runs `body` inside a savepoint, so a write made of several statements is applied entirely
/// or not at all even when it is skipped as malformed.
fn atomically(
    conn: &Connection,
    body: impl FnOnce() -> rusqlite::Result<()>,
) -> rusqlite::Result<()> {
    conn.prepare_cached("SAVEPOINT store_write")?.execute([])?;
    match body() {
        Ok(()) => {
            conn.prepare_cached("RELEASE store_write")?.execute([])?;
            Ok(())
        }
        Err(err) => {
            conn.prepare_cached("ROLLBACK TO store_write")?
                .execute([])?;
            conn.prepare_cached("RELEASE store_write")?.execute([])?;
            Err(err)
        }
    }
}

/// `None` for an empty string, so "nothing" is NULL in the database.
fn non_empty(s: &str) -> Option<&str> {
    (!s.is_empty()).then_some(s)
}

/// Clamps a `u64` into SQLite's signed 64-bit integers (memory sizes never get near the limit).
fn clamp_i64(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

fn topology_json(t: &Topology) -> String {
    serde_json::json!({
        "logical_cpus": t.logical_cpus,
        "physical_cores": t.physical_cores,
        "performance_cores": t.performance_cores,
        "efficiency_cores": t.efficiency_cores,
        "threads_per_core": t.threads_per_core,
        "affinity": t.affinity,
        "cpu_quota": t.cpu_quota,
        "memory_bytes": t.memory_bytes,
        "core_kind_source": t.core_kind_source,
        "auto_workers": t.auto_workers,
        "os": t.os,
        "arch": t.arch,
    })
    .to_string()
}

/// A JSON object from key/value pairs; a repeated key keeps its last value.
fn object_json<V: Into<serde_json::Value> + Clone>(pairs: &[(String, V)]) -> String {
    let map: serde_json::Map<String, serde_json::Value> = pairs
        .iter()
        .map(|(k, v)| (k.clone(), v.clone().into()))
        .collect();
    serde_json::Value::Object(map).to_string()
}

fn warn_if_missing(changed: usize, w: &Write) {
    if changed == 0 {
        tracing::warn!(
            kind = w.kind(),
            subject = w.subject(),
            "store write refers to a row that does not exist; nothing was updated"
        );
    }
}

/// Applies one write inside the batch's transaction.
fn apply(conn: &Connection, keys: &mut keys::Keys, w: &Write) -> rusqlite::Result<()> {
    match w {
        Write::RunCreated {
            run_id,
            project,
            pytest_args,
            client_cwd,
            created_at,
        } => {
            let args = serde_json::Value::from(pytest_args.as_slice()).to_string();
            conn.prepare_cached(
                "INSERT INTO runs (id, project, status, pytest_args, client_cwd, created_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)
                 ON CONFLICT (id) DO UPDATE SET project = excluded.project,
                     pytest_args = excluded.pytest_args, client_cwd = excluded.client_cwd,
                     created_at = excluded.created_at",
            )?
            .execute(params![
                run_id,
                project,
                STATUS_CREATED,
                args,
                non_empty(client_cwd),
                created_at
            ])?;
        }
        Write::RunResumed {
            run_id,
            resumed_from,
        } => {
            let changed = conn
                .prepare_cached("UPDATE runs SET resumed_from = ?2 WHERE id = ?1")?
                .execute(params![run_id, resumed_from])?;
            warn_if_missing(changed, w);
        }
        Write::RunStarted { run_id, started_at } => {
            let changed = conn
                .prepare_cached("UPDATE runs SET status = ?2, started_at = ?3 WHERE id = ?1")?
                .execute(params![run_id, STATUS_RUNNING, started_at])?;
            warn_if_missing(changed, w);
        }
        Write::RunCollected {
            run_id,
            tests,
            deselected,
        } => {
            let run = keys.run(conn, run_id)?;
            atomically(conn, || {
                let mut insert = conn.prepare_cached(
                    "INSERT INTO collected (run, test_index, nodeid, file, line)
                     VALUES (?1, ?2, ?3, ?4, ?5)
                     ON CONFLICT (run, test_index) DO UPDATE SET nodeid = excluded.nodeid,
                         file = excluded.file, line = excluded.line",
                )?;
                for (index, test) in tests.iter().enumerate() {
                    let line = (test.line != 0).then_some(test.line);
                    insert.execute(params![run, index as i64, test.nodeid, test.file, line])?;
                }
                // A shorter re-collection must not leave the old tail behind.
                conn.prepare_cached("DELETE FROM collected WHERE run = ?1 AND test_index >= ?2")?
                    .execute(params![run, tests.len() as i64])?;
                let changed = conn
                    .prepare_cached(
                        "UPDATE runs SET collected = ?2, deselected = ?3 WHERE id = ?1",
                    )?
                    .execute(params![run_id, tests.len() as i64, deselected])?;
                warn_if_missing(changed, w);
                Ok(())
            })?;
            keys.collected(run, tests);
        }
        Write::RunFinished {
            run_id,
            status,
            exit_code,
            finished_at,
            counts,
            message,
        } => {
            let changed = conn
                .prepare_cached(
                    "UPDATE runs SET status = ?2, exit_code = ?3, finished_at = ?4, counts = ?5,
                         message = ?6
                     WHERE id = ?1",
                )?
                .execute(params![
                    run_id,
                    status,
                    exit_code,
                    finished_at,
                    object_json(counts),
                    non_empty(message)
                ])?;
            warn_if_missing(changed, w);
            let run = keys.run(conn, run_id)?;
            keys.finished(run);
        }
        Write::AgentConnected {
            agent_id,
            hostname,
            fly_version,
            protocol_version,
            workers,
            topology,
            labels,
            workdir,
            python,
            connected_at,
            speed,
        } => {
            // A cgroup quota of 0 means "unlimited", which reads better as NULL.
            let quota = (topology.cpu_quota > 0.0).then_some(topology.cpu_quota);
            let speed = history::valid_speed(*speed);
            conn.prepare_cached(
                "INSERT OR REPLACE INTO agents (id, hostname, fly_version, protocol_version,
                     workers, logical_cpus, physical_cores, performance_cores, efficiency_cores,
                     threads_per_core, cpu_quota, memory_bytes, core_kind_source, os, arch,
                     topology, labels, workdir, python, connected_at, disconnected_at,
                     disconnect_reason, speed)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16,
                     ?17, ?18, ?19, ?20, NULL, NULL, ?21)",
            )?
            .execute(params![
                agent_id,
                hostname,
                fly_version,
                protocol_version,
                workers,
                topology.logical_cpus,
                topology.physical_cores,
                topology.performance_cores,
                topology.efficiency_cores,
                topology.threads_per_core,
                quota,
                clamp_i64(topology.memory_bytes),
                topology.core_kind_source,
                topology.os,
                topology.arch,
                topology_json(topology),
                object_json(labels),
                workdir,
                python,
                connected_at,
                speed,
            ])?;
        }
        Write::AgentDisconnected {
            agent_id,
            at,
            reason,
        } => {
            let changed = conn
                .prepare_cached(
                    "UPDATE agents SET disconnected_at = ?2, disconnect_reason = ?3 WHERE id = ?1",
                )?
                .execute(params![agent_id, at, non_empty(reason)])?;
            warn_if_missing(changed, w);
        }
        Write::RunAgent {
            run_id,
            agent_id,
            workers,
            accepted,
            reason,
        } => {
            conn.prepare_cached(
                "INSERT OR REPLACE INTO run_agents (run_id, agent_id, workers, accepted, reason)
                 VALUES (?1, ?2, ?3, ?4, ?5)",
            )?
            .execute(params![
                run_id,
                agent_id,
                workers,
                accepted,
                non_empty(reason)
            ])?;
        }
        Write::Report {
            run_id,
            nodeid,
            agent_id,
            worker,
            superseded,
            report,
        } => {
            let phase = fly_common::outcome::Phase::from_proto(report.phase).map(|p| p.as_str());
            // `[[name, text], ...]`: serde writes a pair as a two-element array.
            let sections = if report.sections.is_empty() {
                None
            } else {
                let pairs: Vec<(&str, &str)> = report
                    .sections
                    .iter()
                    .map(|s| (s.name.as_str(), s.text.as_str()))
                    .collect();
                Some(
                    serde_json::to_string(&pairs)
                        .map_err(|err| rusqlite::Error::ToSqlConversionFailure(Box::new(err)))?,
                )
            };
            // The dispatcher marks a report superseded when its lease is no longer the test's
            // current one, which covers a late report arriving after another lease's result.
            let run = keys.run(conn, run_id)?;
            let agent = keys.agent(conn, agent_id)?;
            let nodeid = keys.nodeid_to_store(run, report.test_index, nodeid);
            conn.prepare_cached(
                "INSERT INTO phase_reports (run, test_index, nodeid, lease, phase, outcome,
                     category, duration, start, stop, agent, worker, longrepr, message, sections,
                     superseded)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16)",
            )?
            .execute(params![
                run,
                report.test_index,
                nodeid,
                report.lease,
                phase,
                report.outcome,
                report.category,
                report.duration,
                report.start,
                report.stop,
                agent,
                worker,
                non_empty(&report.longrepr),
                non_empty(&report.message),
                sections,
                superseded,
            ])?;
        }
        Write::TestResult {
            run_id,
            test_index,
            nodeid,
            outcome,
            duration,
            attempts,
            lease,
            agent_id,
            worker,
        } => {
            let run = keys.run(conn, run_id)?;
            let agent = keys.agent(conn, agent_id)?;
            let nodeid = keys.nodeid_to_store(run, *test_index, nodeid);
            let insert = || {
                conn.prepare_cached(
                    "INSERT OR REPLACE INTO test_results (run, test_index, nodeid, outcome,
                         duration, attempts, lease, agent, worker)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
                )?
                .execute(params![
                    run, test_index, nodeid, outcome, duration, attempts, lease, agent, worker
                ])
                .map(|_| ())
            };
            if *attempts <= 1 {
                // The test's only attempt: no other lease has reports to mark superseded, so
                // the common case costs one statement and no savepoint.
                insert()?;
            } else {
                atomically(conn, || {
                    insert()?;
                    // Only the result's own attempt counts. Rows already marked are left
                    // untouched.
                    conn.prepare_cached(
                        "UPDATE phase_reports SET superseded = 1
                         WHERE run = ?1 AND test_index = ?2 AND lease <> ?3
                           AND superseded = 0",
                    )?
                    .execute(params![run, test_index, lease])?;
                    Ok(())
                })?;
            }
        }
        Write::TestResultDetails {
            run_id,
            test_index,
            flaky,
            lost_on,
        } => {
            let run = keys.run(conn, run_id)?;
            conn.prepare_cached(
                "UPDATE test_results SET flaky = ?3, lost_on = ?4 WHERE run = ?1 AND test_index = ?2",
            )?
            .execute(params![run, test_index, flaky, non_empty(lost_on)])?;
        }
        Write::RecordHistory {
            project,
            run_id,
            speeds,
        } => atomically(conn, || {
            history::record(conn, project, run_id, speeds, epoch_now())
        })?,
    }
    Ok(())
}

/// Seconds since the Unix epoch (0 if the clock is before it).
fn epoch_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use fly_common::proto::{CollectedTest, Phase, Section};
    use rusqlite::OptionalExtension;

    const RUN: &str = "run-1";

    fn temp_db() -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("nested").join("fly.sqlite");
        (dir, path)
    }

    /// A second, independent connection: what a user (or a later coordinator) would see.
    fn reader(path: &Path) -> Connection {
        Connection::open(path).expect("open reader")
    }

    fn count(conn: &Connection, sql: &str) -> i64 {
        conn.query_row(sql, [], |row| row.get(0)).expect(sql)
    }

    fn user_version(conn: &Connection) -> u32 {
        conn.pragma_query_value(None, "user_version", |row| row.get(0))
            .expect("user_version")
    }

    fn run_created(run_id: &str) -> Write {
        Write::RunCreated {
            run_id: run_id.into(),
            project: "proj".into(),
            pytest_args: vec!["-q".into(), "tests/it's \"quoted\"".into()],
            client_cwd: "/src/proj".into(),
            created_at: 1000.5,
        }
    }

    fn report(run_id: &str, index: u32, lease: u64, phase: Phase, category: &str) -> Write {
        Write::Report {
            run_id: run_id.into(),
            nodeid: format!("tests/test_x.py::test_{index}"),
            agent_id: "agent-a".into(),
            worker: 3,
            superseded: false,
            report: PhaseReport {
                lease,
                test_index: index,
                phase: phase as i32,
                outcome: "passed".into(),
                category: category.into(),
                duration: 0.25,
                start: 2000.0,
                stop: 2000.25,
                longrepr: String::new(),
                sections: vec![Section {
                    name: "Captured stdout call".into(),
                    text: "hello\n".into(),
                }],
                message: String::new(),
            },
        }
    }

    #[tokio::test]
    async fn fresh_file_is_migrated_and_reopening_keeps_data() {
        let (_dir, path) = temp_db();
        let store = Store::open(&path).expect("open fresh");
        store.write(run_created(RUN));
        store.close().await.expect("close");

        let conn = reader(&path);
        assert_eq!(user_version(&conn), SCHEMA_VERSION);
        let mode: String = conn
            .pragma_query_value(None, "journal_mode", |row| row.get(0))
            .expect("journal_mode");
        assert_eq!(mode, "wal");
        drop(conn);

        // Re-opening runs no migration twice and keeps the row.
        let store = Store::open(&path).expect("reopen");
        store.write(run_created("run-2"));
        store.close().await.expect("close again");
        let conn = reader(&path);
        assert_eq!(user_version(&conn), SCHEMA_VERSION);
        assert_eq!(count(&conn, "SELECT count(*) FROM runs"), 2);
    }

    /// Every row of `sql`, as SQLite values, for comparing what a query shows.
    fn rows(conn: &Connection, sql: &str) -> Vec<Vec<rusqlite::types::Value>> {
        let mut stmt = conn.prepare(sql).expect(sql);
        let columns = stmt.column_count();
        stmt.query_map([], |row| {
            (0..columns)
                .map(|i| row.get::<_, rusqlite::types::Value>(i))
                .collect::<rusqlite::Result<Vec<_>>>()
        })
        .expect(sql)
        .collect::<rusqlite::Result<Vec<_>>>()
        .expect(sql)
    }

    #[tokio::test]
    async fn version_5_rows_read_the_same_after_the_compact_migration() {
        let (dir, _) = temp_db();
        let path = dir.path().join("v5.sqlite");
        {
            let mut conn = Connection::open(&path).expect("create");
            let tx = conn.transaction().expect("tx");
            for script in &schema::MIGRATIONS[..5] {
                tx.execute_batch(script).expect("old migration");
            }
            tx.pragma_update(None, "user_version", 5).expect("version");
            tx.execute_batch(
                "INSERT INTO runs (id, project, status, pytest_args, created_at)
                     VALUES ('run-a', 'p', 'passed', '[]', 1.0), ('run-b', 'p', 'failed', '[]', 2.0);
                 INSERT INTO run_tests VALUES
                     ('run-a', 0, 'pkg/t.py::test_x', 'pkg/t.py', 3),
                     ('run-a', 1, 'pkg/t.py::C::test_y[1]', 'pkg/t.py', NULL),
                     ('run-a', 2, 'odd.py::test_z', 'elsewhere.py', 9),
                     ('run-b', 0, 'plain_nodeid', 'plain_nodeid', 1);
                 INSERT INTO reports (run_id, test_index, nodeid, lease, phase, outcome, category,
                         duration, start, stop, agent_id, worker, longrepr, message, sections,
                         superseded) VALUES
                     ('run-a', 0, 'pkg/t.py::test_x', 1, 'setup', 'passed', '', 0.1, 10, 10.1,
                      'agent-1', 0, NULL, NULL, NULL, 0),
                     ('run-a', 0, 'pkg/t.py::test_x', 1, 'call', 'failed', 'failed', 0.2, 10.1,
                      10.3, 'agent-1', 0, 'trace', 'boom', '[[\"out\",\"x\"]]', 1),
                     ('run-a', 1, 'a renamed nodeid', 2, NULL, 'failed', 'error', 0, 11, 11,
                      'agent-2', 3, 'crash', NULL, NULL, 0),
                     ('run-x', 7, 'uncollected.py::t', 1, 'call', 'passed', 'passed', 1, 1, 2,
                      'agent-9', 1, NULL, NULL, NULL, 0);
                 INSERT INTO results (run_id, test_index, nodeid, outcome, duration, attempts,
                         lease, agent_id, worker, flaky, lost_on) VALUES
                     ('run-a', 0, 'pkg/t.py::test_x', 'failed', 0.3, 1, 1, 'agent-1', 0, 0, NULL),
                     ('run-a', 1, 'a renamed nodeid', 'error', 0, 2, 2, 'agent-2', 3, 1, '[]'),
                     ('run-x', 7, 'uncollected.py::t', 'passed', 1, 1, 1, 'agent-9', 1, 0, NULL);",
            )
            .expect("old rows");
            tx.commit().expect("commit");
        }
        let queries = [
            "SELECT * FROM run_tests ORDER BY run_id, test_index",
            "SELECT * FROM reports ORDER BY id",
            "SELECT * FROM results ORDER BY run_id, test_index",
        ];
        let before: Vec<_> = {
            let conn = reader(&path);
            queries.iter().map(|q| rows(&conn, q)).collect()
        };
        assert_eq!(before.iter().map(Vec::len).collect::<Vec<_>>(), [4, 4, 3]);

        let store = Store::open(&path).expect("migrate");
        store.close().await.expect("close");
        let conn = reader(&path);
        assert_eq!(user_version(&conn), SCHEMA_VERSION);
        let after: Vec<_> = queries.iter().map(|q| rows(&conn, q)).collect();
        assert_eq!(
            before, after,
            "the views show exactly the rows version 5 held"
        );
        // Stored compactly: the node ids and files the collection gives are left out.
        assert_eq!(
            count(
                &conn,
                "SELECT count(*) FROM phase_reports WHERE nodeid IS NULL"
            ),
            2
        );
        assert_eq!(
            count(&conn, "SELECT count(*) FROM collected WHERE file IS NULL"),
            2
        );
    }

    #[tokio::test]
    async fn reports_leave_out_the_node_id_their_collection_holds_and_read_back_whole() {
        let (_dir, path) = temp_db();
        let store = Store::open(&path).expect("open");
        store.write(run_created(RUN));
        let tests = ["tests/test_x.py::test_0", "tests/test_x.py::test_1"]
            .iter()
            .map(|nodeid| CollectedTest {
                nodeid: nodeid.to_string(),
                file: "tests/test_x.py".into(),
                line: 1,
                group: String::new(),
            })
            .collect::<Vec<_>>();
        store.write(Write::RunCollected {
            run_id: RUN.into(),
            tests: Arc::new(Collection::from(tests.as_slice())),
            deselected: 0,
        });
        store.write(report(RUN, 0, 1, Phase::Call, "passed"));
        // A report whose node id is not the collection's at its index keeps it.
        let mut stray = report(RUN, 1, 1, Phase::Call, "passed");
        if let Write::Report { nodeid, .. } = &mut stray {
            *nodeid = "t.py::renamed".into();
        }
        store.write(stray);
        store.close().await.expect("close");

        let conn = reader(&path);
        assert_eq!(
            rows(
                &conn,
                "SELECT test_index, nodeid, file FROM run_tests ORDER BY test_index"
            ),
            rows(
                &conn,
                "VALUES (0, 'tests/test_x.py::test_0', 'tests/test_x.py'),
                        (1, 'tests/test_x.py::test_1', 'tests/test_x.py')"
            )
        );
        assert_eq!(
            rows(
                &conn,
                "SELECT test_index, nodeid FROM reports ORDER BY test_index"
            ),
            rows(
                &conn,
                "VALUES (0, 'tests/test_x.py::test_0'), (1, 't.py::renamed')"
            )
        );
        assert_eq!(
            rows(
                &conn,
                "SELECT nodeid FROM phase_reports ORDER BY test_index"
            ),
            rows(&conn, "VALUES (NULL), ('t.py::renamed')")
        );
        assert_eq!(
            count(&conn, "SELECT count(*) FROM collected WHERE file IS NULL"),
            2
        );
    }

    #[test]
    fn newer_schema_is_refused_and_left_alone() {
        let (dir, _) = temp_db();
        let path = dir.path().join("future.sqlite");
        {
            let conn = Connection::open(&path).expect("create");
            conn.execute_batch("CREATE TABLE from_the_future (x); PRAGMA user_version = 99;")
                .expect("future schema");
        }
        let err = Store::open(&path).expect_err("a newer schema must be refused");
        assert!(
            matches!(err, StoreError::SchemaTooNew { found: 99, supported, .. } if supported == SCHEMA_VERSION),
            "{err:?}"
        );
        let text = err.to_string();
        assert!(text.contains("99") && text.contains("newer fly"), "{text}");
        assert!(text.contains("future.sqlite"), "{text}");
        let conn = reader(&path);
        assert_eq!(user_version(&conn), 99);
        assert_eq!(
            count(
                &conn,
                "SELECT count(*) FROM sqlite_master WHERE name = 'runs'"
            ),
            0
        );
    }

    #[test]
    fn a_file_that_is_not_a_database_is_refused_with_its_path() {
        let (dir, _) = temp_db();
        let path = dir.path().join("notes.txt");
        std::fs::write(
            &path,
            "this is not SQLite, just some text that is long enough ".repeat(20),
        )
        .expect("write");
        let err = Store::open(&path).expect_err("not a database");
        assert!(err.to_string().contains("notes.txt"), "{err}");
    }

    #[tokio::test]
    async fn run_writes_land_with_the_right_columns() {
        let (_dir, path) = temp_db();
        let store = Store::open(&path).expect("open");
        store.write(run_created(RUN));
        store.flush().await.expect("flush");
        let conn = reader(&path);
        let row: (String, String, String, Option<String>, f64, Option<f64>) = conn
            .query_row(
                "SELECT project, status, pytest_args, client_cwd, created_at, started_at
                 FROM runs WHERE id = ?1",
                [RUN],
                |r| {
                    Ok((
                        r.get(0)?,
                        r.get(1)?,
                        r.get(2)?,
                        r.get(3)?,
                        r.get(4)?,
                        r.get(5)?,
                    ))
                },
            )
            .expect("run row");
        assert_eq!(row.0, "proj");
        assert_eq!(row.1, STATUS_CREATED);
        let args: Vec<String> = serde_json::from_str(&row.2).expect("args json");
        assert_eq!(args, ["-q", "tests/it's \"quoted\""]);
        assert_eq!(row.3.as_deref(), Some("/src/proj"));
        assert_eq!(row.4, 1000.5);
        assert_eq!(row.5, None);

        store.write(Write::RunStarted {
            run_id: RUN.into(),
            started_at: 1001.0,
        });
        let tests = Arc::new(vec![
            CollectedTest {
                nodeid: "a.py::t1".into(),
                file: "a.py".into(),
                line: 3,
                group: String::new(),
            },
            CollectedTest {
                nodeid: "a.py::t2".into(),
                file: "a.py".into(),
                line: 0,
                group: String::new(),
            },
            CollectedTest {
                nodeid: "b.py::t3".into(),
                file: "b.py".into(),
                line: 7,
                group: String::new(),
            },
        ]);
        store.write(Write::RunCollected {
            run_id: RUN.into(),
            tests: Arc::new(Collection::from(tests.as_slice())),
            deselected: 4,
        });
        store.flush().await.expect("flush");
        let (status, started, collected, deselected): (String, f64, i64, i64) = conn
            .query_row(
                "SELECT status, started_at, collected, deselected FROM runs WHERE id = ?1",
                [RUN],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
            )
            .expect("run row");
        assert_eq!(
            (status.as_str(), started, collected, deselected),
            (STATUS_RUNNING, 1001.0, 3, 4)
        );
        let mut stmt = conn
            .prepare("SELECT test_index, nodeid, file, line FROM run_tests WHERE run_id = ?1 ORDER BY test_index")
            .expect("prepare");
        let rows: Vec<(i64, String, String, Option<i64>)> = stmt
            .query_map([RUN], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
            .expect("query")
            .collect::<Result<_, _>>()
            .expect("rows");
        assert_eq!(
            rows,
            vec![
                (0, "a.py::t1".into(), "a.py".into(), Some(3)),
                (1, "a.py::t2".into(), "a.py".into(), None),
                (2, "b.py::t3".into(), "b.py".into(), Some(7)),
            ]
        );

        // A shorter re-collection replaces the old one entirely.
        store.write(Write::RunCollected {
            run_id: RUN.into(),
            tests: Arc::new(Collection::from(&tests[2..3])),
            deselected: 0,
        });
        store.write(Write::RunFinished {
            run_id: RUN.into(),
            status: "failed".into(),
            exit_code: 1,
            finished_at: 1010.0,
            counts: vec![("passed".into(), 2), ("failed".into(), 1)],
            message: "1 failed, 2 passed".into(),
        });
        store.close().await.expect("close");
        assert_eq!(
            count(
                &conn,
                "SELECT count(*) FROM run_tests WHERE run_id = 'run-1'"
            ),
            1
        );
        let nodeid: String = conn
            .query_row(
                "SELECT nodeid FROM run_tests WHERE test_index = 0",
                [],
                |r| r.get(0),
            )
            .expect("nodeid");
        assert_eq!(nodeid, "b.py::t3");
        let (status, exit_code, finished, counts, message, collected): (
            String,
            i32,
            f64,
            String,
            String,
            i64,
        ) = conn
            .query_row(
                "SELECT status, exit_code, finished_at, counts, message, collected
                 FROM runs WHERE id = ?1",
                [RUN],
                |r| {
                    Ok((
                        r.get(0)?,
                        r.get(1)?,
                        r.get(2)?,
                        r.get(3)?,
                        r.get(4)?,
                        r.get(5)?,
                    ))
                },
            )
            .expect("run row");
        assert_eq!(
            (status.as_str(), exit_code, finished),
            ("failed", 1, 1010.0)
        );
        assert_eq!(
            serde_json::from_str::<serde_json::Value>(&counts).expect("counts json"),
            serde_json::json!({"passed": 2, "failed": 1})
        );
        assert_eq!(message, "1 failed, 2 passed");
        assert_eq!(collected, 1);
    }

    #[tokio::test]
    async fn agent_writes_land_with_the_right_columns() {
        let (_dir, path) = temp_db();
        let store = Store::open(&path).expect("open");
        let topology = Topology {
            logical_cpus: 16,
            physical_cores: 10,
            performance_cores: 6,
            efficiency_cores: 4,
            threads_per_core: 2,
            affinity: vec![0, 1, 2, 3],
            cpu_quota: 0.0,
            memory_bytes: 32 << 30,
            core_kind_source: "intel-hybrid".into(),
            auto_workers: 6,
            os: "linux".into(),
            arch: "x86_64".into(),
        };
        store.write(Write::AgentConnected {
            agent_id: "agent-a".into(),
            hostname: "box1".into(),
            fly_version: "0.1.0".into(),
            protocol_version: 1,
            workers: 6,
            topology: topology.clone(),
            labels: vec![("gpu".into(), "none".into()), ("zone".into(), "eu".into())],
            workdir: "/srv/work".into(),
            python: "/usr/bin/python3".into(),
            connected_at: 50.0,
            speed: 1.5,
        });
        store.write(Write::AgentDisconnected {
            agent_id: "agent-a".into(),
            at: 60.0,
            reason: "stream closed".into(),
        });
        store.write(Write::RunAgent {
            run_id: RUN.into(),
            agent_id: "agent-a".into(),
            workers: 6,
            accepted: true,
            reason: String::new(),
        });
        store.write(Write::RunAgent {
            run_id: RUN.into(),
            agent_id: "agent-b".into(),
            workers: 2,
            accepted: false,
            reason: "collection differs: 10 tests instead of 12".into(),
        });
        store.flush().await.expect("flush");

        let conn = reader(&path);
        // SQLite hands integers back as i64; compare the whole row as text for a readable diff.
        let row: String = conn
            .query_row(
                "SELECT concat_ws('|', hostname, fly_version, protocol_version, workers,
                        logical_cpus, physical_cores, performance_cores, efficiency_cores,
                        threads_per_core, coalesce(cpu_quota, 'NULL'), memory_bytes,
                        core_kind_source, os, arch, speed)
                 FROM agents WHERE id = 'agent-a'",
                [],
                |r| r.get(0),
            )
            .expect("agent row");
        assert_eq!(
            row,
            format!(
                "box1|0.1.0|1|6|16|10|6|4|2|NULL|{}|intel-hybrid|linux|x86_64|1.5",
                32u64 << 30
            )
        );
        let types: String = conn
            .query_row(
                "SELECT concat_ws('|', typeof(workers), typeof(memory_bytes), typeof(cpu_quota),
                        typeof(connected_at))
                 FROM agents WHERE id = 'agent-a'",
                [],
                |r| r.get(0),
            )
            .expect("agent row types");
        assert_eq!(types, "integer|integer|null|real");
        let (topo, labels, workdir, python, connected, disconnected, reason): (
            String,
            String,
            String,
            String,
            f64,
            Option<f64>,
            Option<String>,
        ) = conn
            .query_row(
                "SELECT topology, labels, workdir, python, connected_at, disconnected_at,
                        disconnect_reason
                 FROM agents WHERE id = 'agent-a'",
                [],
                |r| {
                    Ok((
                        r.get(0)?,
                        r.get(1)?,
                        r.get(2)?,
                        r.get(3)?,
                        r.get(4)?,
                        r.get(5)?,
                        r.get(6)?,
                    ))
                },
            )
            .expect("agent row");
        let topo: serde_json::Value = serde_json::from_str(&topo).expect("topology json");
        assert_eq!(topo["affinity"], serde_json::json!([0, 1, 2, 3]));
        assert_eq!(topo["auto_workers"], 6);
        assert_eq!(topo["memory_bytes"], 32u64 << 30);
        assert_eq!(topo["core_kind_source"], "intel-hybrid");
        assert_eq!(
            serde_json::from_str::<serde_json::Value>(&labels).expect("labels json"),
            serde_json::json!({"gpu": "none", "zone": "eu"})
        );
        assert_eq!(
            (workdir.as_str(), python.as_str()),
            ("/srv/work", "/usr/bin/python3")
        );
        assert_eq!((connected, disconnected), (50.0, Some(60.0)));
        assert_eq!(reason.as_deref(), Some("stream closed"));

        let mut stmt = conn
            .prepare("SELECT agent_id, workers, accepted, reason FROM run_agents WHERE run_id = ?1 ORDER BY agent_id")
            .expect("prepare");
        let rows: Vec<(String, u32, bool, Option<String>)> = stmt
            .query_map([RUN], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
            .expect("query")
            .collect::<Result<_, _>>()
            .expect("rows");
        assert_eq!(
            rows,
            vec![
                ("agent-a".into(), 6, true, None),
                (
                    "agent-b".into(),
                    2,
                    false,
                    Some("collection differs: 10 tests instead of 12".into())
                ),
            ]
        );

        // Reconnecting under the same id starts a fresh connection record with its quota.
        store.write(Write::AgentConnected {
            agent_id: "agent-a".into(),
            hostname: "box1".into(),
            fly_version: "0.1.0".into(),
            protocol_version: 1,
            workers: 2,
            topology: Topology {
                cpu_quota: 2.5,
                ..topology
            },
            labels: vec![],
            workdir: "/srv/work".into(),
            python: "/usr/bin/python3".into(),
            connected_at: 70.0,
            speed: 0.0,
        });
        store.close().await.expect("close");
        type AgentRow = (Option<f64>, u32, String, Option<f64>, Option<f64>);
        let (quota, workers, labels, disconnected, speed): AgentRow = conn
            .query_row(
                "SELECT cpu_quota, workers, labels, disconnected_at, speed
                 FROM agents WHERE id = 'agent-a'",
                [],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?)),
            )
            .expect("agent row");
        // An agent that measured no speed (0) has NULL, not a speed of zero.
        assert_eq!(
            (quota, workers, labels.as_str(), disconnected, speed),
            (Some(2.5), 2, "{}", None, None)
        );
    }

    #[tokio::test]
    async fn reports_and_results_land_and_abandoned_attempts_are_superseded() {
        let (_dir, path) = temp_db();
        let store = Store::open(&path).expect("open");
        // No RunCreated on purpose: reports for a run without a row are kept all the same.
        let mut failing = report(RUN, 7, 11, Phase::Call, "failed");
        if let Write::Report { report, .. } = &mut failing {
            report.outcome = "failed".into();
            report.longrepr = "def test_7():\n>   assert 1 == 2".into();
            report.message = "AssertionError: assert 1 == 2".into();
        }
        // Attempt with lease 11 (abandoned: its agent vanished), then lease 12 (final).
        store.write(report(RUN, 7, 11, Phase::Setup, ""));
        store.write(failing);
        store.write(report(RUN, 7, 12, Phase::Setup, ""));
        store.write(report(RUN, 7, 12, Phase::Call, "passed"));
        store.write(report(RUN, 7, 12, Phase::Teardown, ""));
        store.write(Write::TestResult {
            run_id: RUN.into(),
            test_index: 7,
            nodeid: "tests/test_x.py::test_7".into(),
            outcome: "passed".into(),
            duration: 0.75,
            attempts: 2,
            lease: 12,
            agent_id: "agent-b".into(),
            worker: 1,
        });
        // A late teardown report of the abandoned attempt arrives after the result; the
        // dispatcher knows its lease is no longer current.
        let mut late = report(RUN, 7, 11, Phase::Teardown, "");
        if let Write::Report { superseded, .. } = &mut late {
            *superseded = true;
        }
        store.write(late);
        // The dispatcher itself flags a report of a lease it no longer holds current.
        let mut stale = report(RUN, 8, 20, Phase::Setup, "");
        if let Write::Report { superseded, .. } = &mut stale {
            *superseded = true;
        }
        store.write(stale);
        store.flush().await.expect("flush");

        let conn = reader(&path);
        let mut stmt = conn
            .prepare(
                "SELECT lease, phase, outcome, category, superseded FROM reports
                 WHERE run_id = ?1 AND test_index = 7 ORDER BY id",
            )
            .expect("prepare");
        let rows: Vec<(i64, String, String, String, bool)> = stmt
            .query_map([RUN], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
            })
            .expect("query")
            .collect::<Result<_, _>>()
            .expect("rows");
        assert_eq!(
            rows,
            vec![
                (11, "setup".into(), "passed".into(), "".into(), true),
                (11, "call".into(), "failed".into(), "failed".into(), true),
                (12, "setup".into(), "passed".into(), "".into(), false),
                (12, "call".into(), "passed".into(), "passed".into(), false),
                (12, "teardown".into(), "passed".into(), "".into(), false),
                (11, "teardown".into(), "passed".into(), "".into(), true),
            ]
        );
        type ReportRow = (
            String,
            f64,
            f64,
            f64,
            String,
            u32,
            Option<String>,
            Option<String>,
            Option<String>,
        );
        let failed: ReportRow = conn
            .query_row(
                "SELECT nodeid, duration, start, stop, agent_id, worker, longrepr, message, sections
                 FROM reports WHERE lease = 11 AND phase = 'call'",
                [],
                |r| {
                    Ok((
                        r.get(0)?,
                        r.get(1)?,
                        r.get(2)?,
                        r.get(3)?,
                        r.get(4)?,
                        r.get(5)?,
                        r.get(6)?,
                        r.get(7)?,
                        r.get(8)?,
                    ))
                },
            )
            .expect("report row");
        assert_eq!(failed.0, "tests/test_x.py::test_7");
        assert_eq!((failed.1, failed.2, failed.3), (0.25, 2000.0, 2000.25));
        assert_eq!((failed.4.as_str(), failed.5), ("agent-a", 3));
        assert_eq!(
            failed.6.as_deref(),
            Some("def test_7():\n>   assert 1 == 2")
        );
        assert_eq!(failed.7.as_deref(), Some("AssertionError: assert 1 == 2"));
        let sections: serde_json::Value =
            serde_json::from_str(failed.8.as_deref().expect("sections")).expect("sections json");
        assert_eq!(
            sections,
            serde_json::json!([["Captured stdout call", "hello\n"]])
        );
        let (longrepr, message): (Option<String>, Option<String>) = conn
            .query_row(
                "SELECT longrepr, message FROM reports WHERE lease = 12 AND phase = 'call'",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .expect("report row");
        assert_eq!((longrepr, message), (None, None));
        assert_eq!(
            count(
                &conn,
                "SELECT superseded FROM reports WHERE test_index = 8 AND lease = 20"
            ),
            1
        );

        let result: (String, String, f64, u32, i64, String, u32) = conn
            .query_row(
                "SELECT nodeid, outcome, duration, attempts, lease, agent_id, worker
                 FROM results WHERE run_id = ?1 AND test_index = 7",
                [RUN],
                |r| {
                    Ok((
                        r.get(0)?,
                        r.get(1)?,
                        r.get(2)?,
                        r.get(3)?,
                        r.get(4)?,
                        r.get(5)?,
                        r.get(6)?,
                    ))
                },
            )
            .expect("result row");
        assert_eq!(
            result,
            (
                "tests/test_x.py::test_7".into(),
                "passed".into(),
                0.75,
                2,
                12,
                "agent-b".into(),
                1
            )
        );
        store.close().await.expect("close");
    }

    #[tokio::test]
    async fn a_bad_write_is_skipped_and_the_rest_of_its_batch_lands() {
        let (_dir, path) = temp_db();
        let store = Store::open(&path).expect("open");
        store.write(report(RUN, 0, 1, Phase::Call, "passed"));
        // A lease beyond SQLite's integer range cannot be stored.
        store.write(report(RUN, 1, u64::MAX, Phase::Call, "passed"));
        // Updates of rows that do not exist change nothing and stop nothing.
        store.write(Write::RunStarted {
            run_id: "no-such-run".into(),
            started_at: 1.0,
        });
        store.write(Write::AgentDisconnected {
            agent_id: "no-such-agent".into(),
            at: 1.0,
            reason: String::new(),
        });
        store.write(report(RUN, 2, 3, Phase::Call, "passed"));
        store.flush().await.expect("flush");
        store.write(report(RUN, 3, 4, Phase::Call, "passed"));
        store.close().await.expect("close");
        let conn = reader(&path);
        let mut stmt = conn
            .prepare("SELECT test_index FROM reports ORDER BY id")
            .expect("prepare");
        let indexes: Vec<u32> = stmt
            .query_map([], |r| r.get(0))
            .expect("query")
            .collect::<Result<_, _>>()
            .expect("rows");
        assert_eq!(indexes, [0, 2, 3]);
        assert_eq!(count(&conn, "SELECT count(*) FROM runs"), 0);
    }

    #[tokio::test]
    async fn flush_means_committed_for_other_connections() {
        let (_dir, path) = temp_db();
        let store = Store::open(&path).expect("open");
        let conn = reader(&path);
        for round in 1..=5i64 {
            for i in 0..1000 {
                store.write(report(RUN, i, u64::from(i) + 1, Phase::Call, "passed"));
            }
            store.flush().await.expect("flush");
            assert_eq!(count(&conn, "SELECT count(*) FROM reports"), round * 1000);
        }
        store.close().await.expect("close");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn writes_from_many_tasks_all_land() {
        let (_dir, path) = temp_db();
        let store = Store::open(&path).expect("open");
        let tasks: Vec<_> = (0..32u32)
            .map(|task| {
                let store = store.clone();
                tokio::spawn(async move {
                    let run_id = format!("run-{task}");
                    store.write(run_created(&run_id));
                    for i in 0..500 {
                        store.write(report(&run_id, i, u64::from(i), Phase::Call, "passed"));
                        if i % 100 == 0 {
                            tokio::task::yield_now().await;
                        }
                    }
                    store.flush().await.expect("flush from a task");
                })
            })
            .collect();
        for task in tasks {
            task.await.expect("task");
        }
        store.close().await.expect("close");
        let conn = reader(&path);
        assert_eq!(count(&conn, "SELECT count(*) FROM runs"), 32);
        assert_eq!(count(&conn, "SELECT count(*) FROM reports"), 32 * 500);
        assert_eq!(
            count(
                &conn,
                "SELECT count(*) FROM (SELECT run_id FROM reports GROUP BY run_id HAVING count(*) = 500)"
            ),
            32
        );
    }

    #[tokio::test]
    async fn writes_wait_out_a_lock_held_by_another_process_and_none_are_lost() {
        let (_dir, path) = temp_db();
        let config = StoreConfig {
            busy_timeout: Duration::from_millis(20),
            initial_backoff: Duration::from_millis(10),
            max_backoff: Duration::from_millis(50),
            ..StoreConfig::default()
        };
        let store = Store::open_with(&path, config).expect("open");
        let locker = reader(&path);
        locker.execute_batch("BEGIN EXCLUSIVE").expect("lock");

        store.write(run_created(RUN));
        for i in 0..2000 {
            store.write(report(RUN, i, u64::from(i), Phase::Call, "passed"));
        }
        let flushing = tokio::spawn({
            let store = store.clone();
            async move { store.flush().await }
        });
        // Long enough for several failed attempts (busy timeout 20 ms, backoff up to 50 ms).
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert!(
            !flushing.is_finished(),
            "flush must not resolve while the writes cannot be committed"
        );
        // More writes while the batch is stuck queue up behind it.
        for i in 2000..3000 {
            store.write(report(RUN, i, u64::from(i), Phase::Call, "passed"));
        }
        locker.execute_batch("COMMIT").expect("unlock");

        flushing.await.expect("task").expect("flush");
        store.close().await.expect("close");
        assert_eq!(count(&locker, "SELECT count(*) FROM runs"), 1);
        assert_eq!(count(&locker, "SELECT count(*) FROM reports"), 3000);
        assert_eq!(
            count(&locker, "SELECT count(DISTINCT test_index) FROM reports"),
            3000
        );
    }

    #[tokio::test]
    async fn writes_after_close_fail_cleanly() {
        let (_dir, path) = temp_db();
        let store = Store::open(&path).expect("open");
        let other = store.clone();
        store.close().await.expect("close");
        // Logged, not a panic; flush says the writer is gone.
        other.write(run_created(RUN));
        let err = other.flush().await.expect_err("writer is gone");
        assert!(matches!(err, StoreError::WriterGone { .. }), "{err:?}");
        // The database was closed cleanly: the WAL was checkpointed into the main file.
        let conn = reader(&path);
        assert_eq!(user_version(&conn), SCHEMA_VERSION);
        let table: Option<String> = conn
            .query_row(
                "SELECT name FROM sqlite_master WHERE name = 'reports'",
                [],
                |r| r.get(0),
            )
            .optional()
            .expect("query");
        assert_eq!(table.as_deref(), Some("reports"));
    }

    /// Throughput of the path the coordinator uses most: many small phase reports. Run with
    /// `--nocapture` (and `--release` for a meaningful figure) to read the rate.
    #[tokio::test]
    async fn hundred_thousand_reports() {
        const N: u32 = 100_000;
        let (_dir, path) = temp_db();
        let store = Store::open(&path).expect("open");
        store.write(run_created(RUN));
        store.flush().await.expect("flush");
        let writes: Vec<Write> = (0..N)
            .map(|i| {
                let phase = [Phase::Setup, Phase::Call, Phase::Teardown][(i % 3) as usize];
                let category = if phase == Phase::Call { "passed" } else { "" };
                report(RUN, i / 3, u64::from(i / 3), phase, category)
            })
            .collect();
        let started = Instant::now();
        for w in writes {
            store.write(w);
        }
        store.flush().await.expect("flush");
        let elapsed = started.elapsed();
        eprintln!(
            "inserted {N} reports in {:.3} s: {:.0} reports/s",
            elapsed.as_secs_f64(),
            f64::from(N) / elapsed.as_secs_f64()
        );
        store.close().await.expect("close");
        let conn = reader(&path);
        assert_eq!(count(&conn, "SELECT count(*) FROM reports"), i64::from(N));
    }
}
