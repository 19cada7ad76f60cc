//! What happened in one run, as a view a user reads: the run, its agents with their topology,
//! one timeline lane per worker with a bar per attempt at a test, and the figures that say how
//! well the run used its workers. [`RunView`] is plain data (`serde::Serialize`): it is loaded
//! here from the SQLite record and rendered by [`html`]; a live dashboard can build the same
//! view from in-memory run state through [`RunInput`] and render or serve it the same way.
//! [`history`] answers the questions across runs (`runs`, `slowest`, `flaky`).
//!
//! # Definitions
//!
//! All times are seconds. Only reports of the run count, and the database is only read.
//!
//! - **wall**: from the first phase start to the last phase stop over all of the run's reports
//!   (the span of the timeline). It is measured on the same clocks as the bars, so no lane can
//!   be busy for longer than the wall, and it leaves out what happens before the first test
//!   starts (collection, worker start-up) and after the last one stops. When the run has no
//!   report, it is `finished_at - started_at` of the run's row ([`WallSource::Run`]). The run's
//!   own duration (`finished_at - created_at`, what the user waited) is shown beside it.
//! - **test time** of a test: the sum of the `duration`s of the phase reports of its final
//!   attempt (the lease its result names; the result's `duration` if that attempt left no
//!   report). **Total test time**: the sum over the tests that have a result.
//! - **busy** time of a worker: the length of the union of the `[start, stop]` intervals of all
//!   the phase reports it ran, superseded attempts included (the worker was occupied).
//! - **utilization** of a worker: busy / wall. **Overall utilization**: sum of busy /
//!   (workers × wall), where *workers* is the number of lanes: every worker of every agent that
//!   took part, whether or not it ran a test.
//! - **lower bound** on the wall: max(longest test time, total test time / workers).
//! - **achieved speed-up**: total test time / wall. **Possible speed-up**: total test time /
//!   lower bound. **Idle**: workers × wall − sum of busy; the capacity that separates the two.
//!
//! Limits: `agents` keeps each agent's latest connection, so the topology shown is the one the
//! agent last reported, which may be newer than the run. Agent clocks are trusted as they are:
//! on a farm whose clocks disagree, lanes of different agents are offset by the skew.

pub mod history;
pub mod html;

use std::collections::{BTreeMap, HashMap};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use fly_common::outcome::{final_outcome, Counts, Phase};
use rusqlite::{Connection, OpenFlags, OptionalExtension};
use serde::Serialize;

use crate::store::SCHEMA_VERSION;

/// The run `--run latest` names: the most recently created one.
pub const LATEST: &str = "latest";

/// Rows in the slowest-tests and slowest-setups tables of a report.
pub const SLOWEST_ROWS: usize = 25;

/// Failures shown with their tracebacks; more are counted, not shown, so a run with thousands
/// of failures still gives a page a browser opens.
pub const FAILURE_LIMIT: usize = 500;

/// Longest traceback (and captured output) shown per failure, in bytes.
pub const TRACEBACK_LIMIT: usize = 64 * 1024;

/// How long a read waits for the coordinator's writer to release a lock.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// What can go wrong reading the record for a report or a history query.
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    #[error(
        "no fly database at {path}: run `fly-coordinator run` there first, or point --db at \
         the database file"
    )]
    NoDatabase { path: PathBuf },
    #[error("{path} is not a fly database (it has no fly schema)")]
    NotFlyDatabase { path: PathBuf },
    #[error(
        "{path} has schema version {found}, but this fly-coordinator only reads versions up to \
         {supported}: it was written by a newer fly"
    )]
    SchemaTooNew {
        path: PathBuf,
        found: u32,
        supported: u32,
    },
    #[error("SQLite database {path}: {action} failed: {source}")]
    Sqlite {
        path: PathBuf,
        action: &'static str,
        source: rusqlite::Error,
    },
    #[error("the database {path} holds no runs yet")]
    NoRuns { path: PathBuf },
    #[error(
        "the database {path} has no run {run:?} (`fly-coordinator runs --db {path}` lists them)"
    )]
    UnknownRun { path: PathBuf, run: String },
    #[error("{run:?} matches several runs in {path}: {matches}; give more of the id")]
    AmbiguousRun {
        path: PathBuf,
        run: String,
        matches: String,
    },
    #[error("cannot write the output: {0}")]
    Output(std::io::Error),
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// A read-only connection to a fly database, with the path for error messages.
pub struct Db {
    conn: Connection,
    path: PathBuf,
}

impl Db {
    /// Opens an existing fly database read-only: never creates, migrates or writes it, so a
    /// report can run beside a serving coordinator (WAL lets it read a consistent snapshot).
    pub fn open(path: &Path) -> Result<Db, ReportError> {
        if !path.is_file() {
            return Err(ReportError::NoDatabase {
                path: path.to_path_buf(),
            });
        }
        let flags = OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX;
        let conn =
            Connection::open_with_flags(path, flags).map_err(|source| ReportError::Sqlite {
                path: path.to_path_buf(),
                action: "opening the database read-only",
                source,
            })?;
        let db = Db {
            conn,
            path: path.to_path_buf(),
        };
        db.conn
            .busy_timeout(BUSY_TIMEOUT)
            .map_err(db.sqlite("setting the busy timeout"))?;
        // "file is not a database" shows up at the first read.
        let version: u32 = db
            .conn
            .pragma_query_value(None, "user_version", |row| row.get(0))
            .map_err(db.sqlite("reading the schema version"))?;
        if version == 0 {
            return Err(ReportError::NotFlyDatabase {
                path: path.to_path_buf(),
            });
        }
        if version > SCHEMA_VERSION {
            return Err(ReportError::SchemaTooNew {
                path: path.to_path_buf(),
                found: version,
                supported: SCHEMA_VERSION,
            });
        }
        Ok(db)
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    pub(crate) fn conn(&self) -> &Connection {
        &self.conn
    }

    pub(crate) fn sqlite(&self, action: &'static str) -> impl Fn(rusqlite::Error) -> ReportError {
        let path = self.path.clone();
        move |source| ReportError::Sqlite {
            path: path.clone(),
            action,
            source,
        }
    }

    /// The id of the run `run` names: [`LATEST`] (the most recently created run), a full run
    /// id, or a prefix of exactly one run's id.
    pub fn resolve_run(&self, run: &str) -> Result<String, ReportError> {
        if run == LATEST {
            return self
                .conn
                .query_row(
                    "SELECT id FROM runs ORDER BY created_at DESC, rowid DESC LIMIT 1",
                    [],
                    |row| row.get(0),
                )
                .optional()
                .map_err(self.sqlite("finding the latest run"))?
                .ok_or_else(|| ReportError::NoRuns {
                    path: self.path.clone(),
                });
        }
        let exact: Option<String> = self
            .conn
            .query_row("SELECT id FROM runs WHERE id = ?1", [run], |row| row.get(0))
            .optional()
            .map_err(self.sqlite("finding the run"))?;
        if let Some(id) = exact {
            return Ok(id);
        }
        let unknown = || ReportError::UnknownRun {
            path: self.path.clone(),
            run: run.to_string(),
        };
        if run.is_empty() {
            return Err(unknown());
        }
        // A prefix, as people copy the first characters of a UUID. `substr` rather than LIKE,
        // whose wildcards could hide in what the user typed.
        let mut stmt = self
            .conn
            .prepare("SELECT id FROM runs WHERE substr(id, 1, length(?1)) = ?1 LIMIT 6")
            .map_err(self.sqlite("finding the run"))?;
        let matches = stmt
            .query_map([run], |row| row.get::<_, String>(0))
            .and_then(|rows| rows.collect::<Result<Vec<_>, _>>())
            .map_err(self.sqlite("finding the run"))?;
        match matches.as_slice() {
            [] => Err(unknown()),
            [one] => Ok(one.clone()),
            many => Err(ReportError::AmbiguousRun {
                path: self.path.clone(),
                run: run.to_string(),
                matches: many.join(", "),
            }),
        }
    }

    /// Loads everything a report shows about `run_id` and builds its view.
    pub fn run_view(&self, run_id: &str) -> Result<RunView, ReportError> {
        Ok(RunView::build(self.run_input(run_id)?))
    }

    /// The rows of one run, as [`RunView::build`] takes them.
    pub fn run_input(&self, run_id: &str) -> Result<RunInput, ReportError> {
        // One read transaction: a consistent snapshot even while a coordinator writes.
        self.conn
            .execute_batch("BEGIN")
            .map_err(self.sqlite("starting a read"))?;
        let input = self.read_run_input(run_id);
        // A read-only transaction has nothing to undo; ending it cannot lose anything.
        let _ = self.conn.execute_batch("COMMIT");
        input
    }

    fn read_run_input(&self, run_id: &str) -> Result<RunInput, ReportError> {
        let run = self.read_run(run_id)?;
        let agents = self.read_agents(run_id)?;
        let collection = self.read_collection(run_id)?;
        let reports = self.read_reports(run_id)?;
        let results = self.read_results(run_id)?;
        Ok(RunInput {
            run,
            agents,
            collection,
            reports,
            results,
        })
    }

    pub(crate) fn read_run(&self, run_id: &str) -> Result<RunInfo, ReportError> {
        self.conn
            .query_row(
                "SELECT id, project, status, pytest_args, client_cwd, created_at, started_at,
                     finished_at, exit_code, collected, deselected, counts, message
                 FROM runs WHERE id = ?1",
                [run_id],
                |row| {
                    let args: Option<String> = row.get(3)?;
                    let counts: Option<String> = row.get(11)?;
                    Ok(RunInfo {
                        id: row.get(0)?,
                        project: row.get(1)?,
                        status: row.get(2)?,
                        pytest_args: parse_args(args.as_deref()),
                        client_cwd: row.get(4)?,
                        created_at: row.get(5)?,
                        started_at: row.get(6)?,
                        finished_at: row.get(7)?,
                        exit_code: row.get(8)?,
                        collected: row.get(9)?,
                        deselected: row.get(10)?,
                        counts: parse_counts(counts.as_deref()),
                        message: row.get(12)?,
                    })
                },
            )
            .optional()
            .map_err(self.sqlite("reading the run"))?
            .ok_or_else(|| ReportError::UnknownRun {
                path: self.path.clone(),
                run: run_id.to_string(),
            })
    }

    pub(crate) fn read_agents(&self, run_id: &str) -> Result<Vec<AgentInfo>, ReportError> {
        let mut stmt = self
            .conn
            .prepare(
                "SELECT ra.agent_id, ra.workers, ra.accepted, ra.reason, a.id, a.hostname, a.os,
                     a.arch, a.logical_cpus, a.physical_cores, a.performance_cores,
                     a.efficiency_cores, a.threads_per_core, a.cpu_quota, a.memory_bytes,
                     a.core_kind_source, a.topology, a.speed, a.fly_version
                 FROM run_agents ra LEFT JOIN agents a ON a.id = ra.agent_id
                 WHERE ra.run_id = ?1
                 ORDER BY ra.accepted DESC, a.connected_at, ra.agent_id",
            )
            .map_err(self.sqlite("reading the run's agents"))?;
        let rows = stmt
            .query_map([run_id], |row| {
                let machine = match row.get::<_, Option<String>>(4)? {
                    None => None,
                    Some(_) => {
                        let topology: Option<String> = row.get(16)?;
                        Some(Machine {
                            hostname: row.get(5)?,
                            os: row.get(6)?,
                            arch: row.get(7)?,
                            logical_cpus: to_u32(row.get(8)?),
                            physical_cores: to_u32(row.get(9)?),
                            performance_cores: to_u32(row.get(10)?),
                            efficiency_cores: to_u32(row.get(11)?),
                            threads_per_core: to_u32(row.get(12)?),
                            cpu_quota: row.get(13)?,
                            memory_bytes: u64::try_from(row.get::<_, i64>(14)?).unwrap_or(0),
                            core_kind_source: row.get(15)?,
                            auto_workers: topology.as_deref().and_then(auto_workers),
                            speed: row.get(17)?,
                            fly_version: row.get(18)?,
                        })
                    }
                };
                Ok(AgentInfo {
                    id: row.get(0)?,
                    workers: to_u32(row.get(1)?),
                    accepted: row.get::<_, i64>(2)? != 0,
                    reason: row.get(3)?,
                    machine,
                })
            })
            .and_then(|rows| rows.collect::<Result<Vec<_>, _>>())
            .map_err(self.sqlite("reading the run's agents"))?;
        Ok(rows)
    }

    fn read_collection(&self, run_id: &str) -> Result<Vec<String>, ReportError> {
        let mut stmt = self
            .conn
            .prepare("SELECT test_index, nodeid FROM run_tests WHERE run_id = ?1")
            .map_err(self.sqlite("reading the run's collection"))?;
        let mut collection: Vec<String> = Vec::new();
        let mut rows = stmt
            .query([run_id])
            .map_err(self.sqlite("reading the run's collection"))?;
        while let Some(row) = rows
            .next()
            .map_err(self.sqlite("reading the run's collection"))?
        {
            let read = || -> rusqlite::Result<(usize, String)> {
                Ok((
                    usize::try_from(row.get::<_, i64>(0)?).unwrap_or(usize::MAX),
                    row.get(1)?,
                ))
            };
            let (index, nodeid) = read().map_err(self.sqlite("reading the run's collection"))?;
            set_nodeid(&mut collection, index, nodeid);
        }
        Ok(collection)
    }

    fn read_reports(&self, run_id: &str) -> Result<Vec<PhaseRecord>, ReportError> {
        let mut stmt = self
            .conn
            .prepare(&format!(
                "SELECT {PHASE_COLUMNS} FROM reports WHERE run_id = ?1 ORDER BY id"
            ))
            .map_err(self.sqlite("reading the run's reports"))?;
        let rows = stmt
            .query_map([run_id], phase_record)
            .and_then(|rows| rows.collect::<Result<Vec<_>, _>>())
            .map_err(self.sqlite("reading the run's reports"))?;
        Ok(rows)
    }

    fn read_results(&self, run_id: &str) -> Result<Vec<ResultRecord>, ReportError> {
        let mut stmt = self
            .conn
            .prepare(
                "SELECT test_index, nodeid, outcome, duration, attempts, lease, agent_id, worker
                 FROM results WHERE run_id = ?1 ORDER BY test_index",
            )
            .map_err(self.sqlite("reading the run's results"))?;
        let rows = stmt
            .query_map([run_id], |row| {
                Ok(ResultRecord {
                    test_index: to_u32(row.get(0)?),
                    nodeid: row.get(1)?,
                    outcome: row.get(2)?,
                    duration: row.get(3)?,
                    attempts: to_u32(row.get(4)?),
                    lease: u64::try_from(row.get::<_, i64>(5)?).unwrap_or(0),
                    agent_id: row.get(6)?,
                    worker: to_u32(row.get(7)?),
                })
            })
            .and_then(|rows| rows.collect::<Result<Vec<_>, _>>())
            .map_err(self.sqlite("reading the run's results"))?;
        Ok(rows)
    }
}

/// `fly-coordinator report`: writes the HTML report of `run` ([`LATEST`], an id or an id
/// prefix) from the database at `db` to `out`, and returns the view it rendered.
pub fn write_html_report(db: &Path, run: &str, out: &Path) -> Result<RunView, ReportError> {
    let db = Db::open(db)?;
    let run_id = db.resolve_run(run)?;
    let view = db.run_view(&run_id)?;
    let page = html::render(&view);
    if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|source| ReportError::Write {
            path: dir.to_path_buf(),
            source,
        })?;
    }
    std::fs::write(out, page).map_err(|source| ReportError::Write {
        path: out.to_path_buf(),
        source,
    })?;
    Ok(view)
}

/// `fly-coordinator report --html OUT`: writes the page and says what it holds.
pub fn report_command(db: &Path, run: &str, out: &Path) -> Result<(), ReportError> {
    let view = write_html_report(db, run, out)?;
    let mut stdout = std::io::stdout().lock();
    writeln!(
        stdout,
        "wrote {} (run {}: {} tests on {} workers, {})",
        out.display(),
        view.run.id,
        view.stats.tests,
        view.stats.workers,
        view.run.summary()
    )
    .map_err(ReportError::Output)
}

/// `fly-coordinator runs`.
pub fn runs_command(db: &Path, project: Option<&str>, limit: usize) -> Result<(), ReportError> {
    let db = Db::open(db)?;
    let runs = history::recent_runs(&db, project, limit)?;
    history::print_runs(&runs, &mut std::io::stdout().lock()).map_err(ReportError::Output)
}

/// `fly-coordinator slowest`.
pub fn slowest_command(
    db: &Path,
    project: Option<&str>,
    limit: usize,
    runs: usize,
) -> Result<(), ReportError> {
    let db = Db::open(db)?;
    let slowest = history::slowest(&db, project, limit, runs)?;
    history::print_slowest(slowest.as_ref(), &mut std::io::stdout().lock())
        .map_err(ReportError::Output)
}

/// `fly-coordinator flaky`.
pub fn flaky_command(db: &Path, project: Option<&str>, runs: usize) -> Result<(), ReportError> {
    let db = Db::open(db)?;
    let flaky = history::flaky(&db, project, runs)?;
    history::print_flaky(flaky.as_ref(), &mut std::io::stdout().lock()).map_err(ReportError::Output)
}

// ---------------------------------------------------------------------------------------------
// Input: the rows of one run.

/// The run's own row.
#[derive(Debug, Clone, Serialize)]
pub struct RunInfo {
    pub id: String,
    pub project: String,
    pub status: String,
    pub pytest_args: Vec<String>,
    pub client_cwd: Option<String>,
    /// Unix epoch seconds.
    pub created_at: f64,
    pub started_at: Option<f64>,
    pub finished_at: Option<f64>,
    pub exit_code: Option<i64>,
    pub collected: Option<i64>,
    pub deselected: Option<i64>,
    /// pytest's summary counts, in pytest's order.
    pub counts: Vec<(String, u32)>,
    /// The summary line, or pytest's output when the run ended before any test ran.
    pub message: Option<String>,
}

impl RunInfo {
    /// `finished_at - created_at`: how long the user waited for the run.
    pub fn duration(&self) -> Option<f64> {
        self.finished_at
            .map(|finished| (finished - self.created_at).max(0.0))
    }

    /// pytest's summary counts as text, e.g. `1 failed, 41 passed`.
    pub fn summary(&self) -> String {
        summary_text(&self.counts)
    }
}

/// An agent that took part in the run (or was refused), with its machine.
#[derive(Debug, Clone, Serialize)]
pub struct AgentInfo {
    pub id: String,
    /// Workers the agent contributed to this run (its own choice: `--workers` or `auto`).
    pub workers: u32,
    /// False when the agent was refused, e.g. because its collection differed.
    pub accepted: bool,
    pub reason: Option<String>,
    /// None when the agent's row is missing.
    pub machine: Option<Machine>,
}

/// An agent's machine, as it last reported it.
#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    pub hostname: String,
    pub os: String,
    pub arch: String,
    pub logical_cpus: u32,
    pub physical_cores: u32,
    pub performance_cores: u32,
    pub efficiency_cores: u32,
    /// More than 1 means SMT (hyper-threading).
    pub threads_per_core: u32,
    /// CPUs granted by a cgroup quota; None when unlimited.
    pub cpu_quota: Option<f64>,
    pub memory_bytes: u64,
    pub core_kind_source: String,
    /// The worker count `--workers auto` picks on this machine.
    pub auto_workers: Option<u32>,
    pub speed: Option<f64>,
    pub fly_version: String,
}

/// One phase report.
#[derive(Debug, Clone, Serialize)]
pub struct PhaseRecord {
    pub test_index: u32,
    pub nodeid: String,
    pub lease: u64,
    /// `setup`, `call`, `teardown`, or empty when unknown.
    pub phase: String,
    pub outcome: String,
    pub category: String,
    pub duration: f64,
    pub start: f64,
    pub stop: f64,
    pub agent_id: String,
    pub worker: u32,
    pub superseded: bool,
    pub longrepr: Option<String>,
    pub message: Option<String>,
    /// Captured output, `(name, text)`.
    pub sections: Vec<(String, String)>,
}

/// A test's final result.
#[derive(Debug, Clone, Serialize)]
pub struct ResultRecord {
    pub test_index: u32,
    pub nodeid: String,
    pub outcome: String,
    pub duration: f64,
    pub attempts: u32,
    pub lease: u64,
    pub agent_id: String,
    pub worker: u32,
}

/// Everything [`RunView::build`] needs about one run: the database's rows, or a live run's
/// state in the same shape.
#[derive(Debug, Clone)]
pub struct RunInput {
    pub run: RunInfo,
    pub agents: Vec<AgentInfo>,
    /// Node ids by test index.
    pub collection: Vec<String>,
    /// Phase reports in the order they were recorded.
    pub reports: Vec<PhaseRecord>,
    pub results: Vec<ResultRecord>,
}

// ---------------------------------------------------------------------------------------------
// The view.

/// Where the wall time comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum WallSource {
    /// First phase start to last phase stop.
    Phases,
    /// The run's `finished_at - started_at` (no report to measure from).
    Run,
}

/// The figures of a run. See the module documentation for the definitions.
#[derive(Debug, Clone, Serialize)]
pub struct RunStats {
    /// Epoch seconds of the timeline's zero: the first phase start.
    pub origin: f64,
    pub wall: f64,
    pub wall_source: WallSource,
    /// `finished_at - created_at` of the run, collection included.
    pub run_duration: Option<f64>,
    /// Tests with a final result.
    pub tests: usize,
    /// Tests with reports but no result (a run that ended early).
    pub unfinished: usize,
    /// Attempts that do not count (superseded), drawn faded.
    pub superseded_attempts: usize,
    pub total_test_time: f64,
    pub longest_test: f64,
    /// Lanes: every worker of every accepted agent.
    pub workers: usize,
    /// Sum of the lanes' busy time.
    pub busy: f64,
    pub overall_utilization: f64,
    pub lower_bound: f64,
    pub achieved_speedup: f64,
    pub possible_speedup: f64,
    pub idle: f64,
    /// Final outcomes of the tests, in pytest's order.
    pub outcomes: Vec<(String, u32)>,
}

/// One phase of one attempt, in seconds from [`RunStats::origin`].
#[derive(Debug, Clone, Serialize)]
pub struct Span {
    pub phase: String,
    pub category: String,
    pub start: f64,
    pub stop: f64,
    /// pytest's own duration of the phase.
    pub duration: f64,
}

/// One attempt at a test on one worker.
#[derive(Debug, Clone, Serialize)]
pub struct Bar {
    pub test_index: u32,
    pub lease: u64,
    /// The test's final outcome for the attempt that counts; for another attempt, the outcome
    /// its own phases add up to.
    pub outcome: String,
    /// The attempt does not count (given up on, or another attempt produced the result).
    pub superseded: bool,
    /// In time order.
    pub phases: Vec<Span>,
}

impl Bar {
    pub fn start(&self) -> f64 {
        self.phases.first().map(|p| p.start).unwrap_or(0.0)
    }

    pub fn stop(&self) -> f64 {
        self.phases
            .iter()
            .map(|p| p.stop)
            .fold(self.start(), f64::max)
    }
}

/// One worker's lane.
#[derive(Debug, Clone, Serialize)]
pub struct Lane {
    pub agent_id: String,
    pub worker: u32,
    pub busy: f64,
    pub utilization: f64,
    /// In start order.
    pub bars: Vec<Bar>,
}

/// A row of the slowest-tests table.
#[derive(Debug, Clone, Serialize)]
pub struct SlowTest {
    pub test_index: u32,
    pub nodeid: String,
    pub outcome: String,
    pub duration: f64,
    pub setup: f64,
    pub call: f64,
    pub teardown: f64,
    pub agent_id: String,
    pub worker: u32,
}

/// A row of the slowest-setups (fixtures) table.
#[derive(Debug, Clone, Serialize)]
pub struct SlowSetup {
    pub test_index: u32,
    pub nodeid: String,
    pub duration: f64,
    pub agent_id: String,
    pub worker: u32,
}

/// A failing phase of a test's final attempt.
#[derive(Debug, Clone, Serialize)]
pub struct Failure {
    pub test_index: u32,
    pub nodeid: String,
    pub phase: String,
    pub category: String,
    pub message: Option<String>,
    /// Truncated to [`TRACEBACK_LIMIT`].
    pub longrepr: Option<String>,
    /// Captured output, each truncated to [`TRACEBACK_LIMIT`].
    pub sections: Vec<(String, String)>,
    pub agent_id: String,
    pub worker: u32,
}

/// A run as a report shows it.
#[derive(Debug, Clone, Serialize)]
pub struct RunView {
    pub run: RunInfo,
    pub agents: Vec<AgentInfo>,
    /// Node ids by test index.
    pub tests: Vec<String>,
    /// Grouped by agent (in [`RunView::agents`] order), then by worker.
    pub lanes: Vec<Lane>,
    pub stats: RunStats,
    pub slowest_tests: Vec<SlowTest>,
    pub slowest_setups: Vec<SlowSetup>,
    /// The first [`FAILURE_LIMIT`] failing phases, in test order.
    pub failures: Vec<Failure>,
    /// Failing phases beyond [`FAILURE_LIMIT`], not shown.
    pub failures_omitted: usize,
}

impl RunView {
    /// Computes the view of a run from its rows.
    pub fn build(input: RunInput) -> RunView {
        let RunInput {
            run,
            mut agents,
            collection,
            reports,
            results,
        } = input;

        let mut tests = collection;
        for report in &reports {
            if tests
                .get(report.test_index as usize)
                .is_none_or(String::is_empty)
            {
                set_nodeid(
                    &mut tests,
                    report.test_index as usize,
                    report.nodeid.clone(),
                );
            }
        }
        for result in &results {
            if tests
                .get(result.test_index as usize)
                .is_none_or(String::is_empty)
            {
                set_nodeid(
                    &mut tests,
                    result.test_index as usize,
                    result.nodeid.clone(),
                );
            }
        }

        // The timeline's span.
        let finite = |x: &f64| x.is_finite();
        let first_start = reports
            .iter()
            .map(|r| r.start)
            .filter(finite)
            .reduce(f64::min);
        let last_stop = reports
            .iter()
            .map(|r| r.stop.max(r.start))
            .filter(finite)
            .reduce(f64::max);
        let (origin, wall, wall_source) = match (first_start, last_stop) {
            (Some(first), Some(last)) => (first, (last - first).max(0.0), WallSource::Phases),
            _ => {
                let started = run.started_at.unwrap_or(run.created_at);
                let wall = run
                    .finished_at
                    .map(|finished| (finished - started).max(0.0))
                    .unwrap_or(0.0);
                (started, wall, WallSource::Run)
            }
        };

        // Lanes: every worker of every accepted agent, then any other (agent, worker) that
        // reported (a row the record lacks must not hide its tests).
        let mut lane_index: HashMap<(String, u32), usize> = HashMap::new();
        let mut lanes: Vec<Lane> = Vec::new();
        let mut add_lane = |lanes: &mut Vec<Lane>, agent_id: &str, worker: u32| {
            *lane_index
                .entry((agent_id.to_string(), worker))
                .or_insert_with(|| {
                    lanes.push(Lane {
                        agent_id: agent_id.to_string(),
                        worker,
                        busy: 0.0,
                        utilization: 0.0,
                        bars: Vec::new(),
                    });
                    lanes.len() - 1
                })
        };
        for agent in agents.iter().filter(|a| a.accepted) {
            for worker in 0..agent.workers {
                add_lane(&mut lanes, &agent.id, worker);
            }
        }
        // An agent that reported without a `run_agents` row: its workers are those it used.
        let recorded = agents.len();
        for report in &reports {
            match agents.iter().position(|a| a.id == report.agent_id) {
                Some(i) if i >= recorded => {
                    agents[i].workers = agents[i].workers.max(report.worker.saturating_add(1));
                }
                Some(_) => {}
                None => agents.push(AgentInfo {
                    id: report.agent_id.clone(),
                    workers: report.worker.saturating_add(1),
                    accepted: true,
                    reason: None,
                    machine: None,
                }),
            }
        }
        for report in &reports {
            add_lane(&mut lanes, &report.agent_id, report.worker);
        }
        // Group lanes by agent, in the agents' order, then by worker.
        let agent_order: HashMap<&str, usize> = agents
            .iter()
            .enumerate()
            .map(|(i, a)| (a.id.as_str(), i))
            .collect();
        let mut order: Vec<usize> = (0..lanes.len()).collect();
        order.sort_by_key(|&i| {
            (
                agent_order
                    .get(lanes[i].agent_id.as_str())
                    .copied()
                    .unwrap_or(usize::MAX),
                lanes[i].worker,
            )
        });
        let mut sorted: Vec<Option<Lane>> = lanes.into_iter().map(Some).collect();
        let mut lanes: Vec<Lane> = order.iter().filter_map(|&i| sorted[i].take()).collect();
        let lane_of: HashMap<(String, u32), usize> = lanes
            .iter()
            .enumerate()
            .map(|(i, l)| ((l.agent_id.clone(), l.worker), i))
            .collect();

        // Bars: one per (lane, lease).
        let result_of: HashMap<u32, &ResultRecord> =
            results.iter().map(|r| (r.test_index, r)).collect();
        let mut bar_of: HashMap<(usize, u64), usize> = HashMap::new();
        let mut intervals: Vec<Vec<(f64, f64)>> = vec![Vec::new(); lanes.len()];
        let mut bar_superseded: Vec<Vec<bool>> = vec![Vec::new(); lanes.len()];
        for report in &reports {
            let Some(&lane) = lane_of.get(&(report.agent_id.clone(), report.worker)) else {
                continue;
            };
            let start = report.start - origin;
            let stop = (report.stop - origin).max(start);
            if start.is_finite() && stop.is_finite() {
                intervals[lane].push((start, stop));
            }
            let bars = &mut lanes[lane].bars;
            let index = *bar_of.entry((lane, report.lease)).or_insert_with(|| {
                bars.push(Bar {
                    test_index: report.test_index,
                    lease: report.lease,
                    outcome: String::new(),
                    superseded: false,
                    phases: Vec::new(),
                });
                bar_superseded[lane].push(false);
                bars.len() - 1
            });
            bars[index].phases.push(Span {
                phase: report.phase.clone(),
                category: report.category.clone(),
                start,
                stop,
                duration: report.duration,
            });
            if report.superseded {
                bar_superseded[lane][index] = true;
            }
        }
        let mut superseded_attempts = 0;
        for (lane_no, lane) in lanes.iter_mut().enumerate() {
            for (bar, reported_superseded) in lane.bars.iter_mut().zip(&bar_superseded[lane_no]) {
                bar.phases.sort_by(|a, b| a.start.total_cmp(&b.start));
                let result = result_of.get(&bar.test_index);
                let counts = result.is_some_and(|r| r.lease == bar.lease);
                bar.superseded = *reported_superseded || (result.is_some() && !counts);
                bar.outcome = match result {
                    Some(result) if counts => result.outcome.clone(),
                    _ => final_outcome(
                        bar.phases
                            .iter()
                            .filter_map(|p| Some((Phase::parse(&p.phase)?, p.category.as_str()))),
                    ),
                };
                if bar.superseded {
                    superseded_attempts += 1;
                }
            }
            lane.bars.sort_by(|a, b| a.start().total_cmp(&b.start()));
            lane.busy = union_length(&mut intervals[lane_no]);
            lane.utilization = ratio(lane.busy, wall);
        }

        // Test time: the phases of each result's own attempt.
        let mut phases_of: HashMap<(u32, u64), Vec<&PhaseRecord>> = HashMap::new();
        for report in &reports {
            phases_of
                .entry((report.test_index, report.lease))
                .or_default()
                .push(report);
        }
        let mut slowest_tests: Vec<SlowTest> = Vec::with_capacity(results.len());
        let mut setups: Vec<SlowSetup> = Vec::new();
        let mut failures: Vec<Failure> = Vec::new();
        let mut outcome_counts = Counts::default();
        let nodeid = |index: u32, fallback: &str| -> String {
            tests
                .get(index as usize)
                .filter(|n| !n.is_empty())
                .cloned()
                .unwrap_or_else(|| fallback.to_string())
        };
        for result in &results {
            outcome_counts.add(&result.outcome, 1);
            let phases = phases_of
                .get(&(result.test_index, result.lease))
                .map(Vec::as_slice)
                .unwrap_or(&[]);
            let phase_time = |name: &str| -> f64 {
                phases
                    .iter()
                    .filter(|p| p.phase == name)
                    .map(|p| p.duration)
                    .sum()
            };
            let duration = if phases.is_empty() {
                result.duration
            } else {
                phases.iter().map(|p| p.duration).sum()
            };
            slowest_tests.push(SlowTest {
                test_index: result.test_index,
                nodeid: nodeid(result.test_index, &result.nodeid),
                outcome: result.outcome.clone(),
                duration,
                setup: phase_time("setup"),
                call: phase_time("call"),
                teardown: phase_time("teardown"),
                agent_id: result.agent_id.clone(),
                worker: result.worker,
            });
            for phase in phases {
                if phase.phase == "setup" {
                    setups.push(SlowSetup {
                        test_index: result.test_index,
                        nodeid: nodeid(result.test_index, &result.nodeid),
                        duration: phase.duration,
                        agent_id: phase.agent_id.clone(),
                        worker: phase.worker,
                    });
                }
            }
            let mut failing: Vec<&&PhaseRecord> = phases
                .iter()
                .filter(|p| {
                    p.category == "failed" || p.category == "error" || p.outcome == "failed"
                })
                .collect();
            failing.sort_by_key(|p| Phase::parse(&p.phase));
            for phase in failing {
                failures.push(Failure {
                    test_index: result.test_index,
                    nodeid: nodeid(result.test_index, &result.nodeid),
                    phase: phase.phase.clone(),
                    category: phase.category.clone(),
                    message: phase.message.clone(),
                    longrepr: phase
                        .longrepr
                        .as_deref()
                        .map(|t| truncate(t, TRACEBACK_LIMIT)),
                    sections: phase
                        .sections
                        .iter()
                        .map(|(name, text)| (name.clone(), truncate(text, TRACEBACK_LIMIT)))
                        .collect(),
                    agent_id: phase.agent_id.clone(),
                    worker: phase.worker,
                });
            }
        }
        let total_test_time: f64 = slowest_tests.iter().map(|t| t.duration).sum();
        let longest_test = slowest_tests.iter().map(|t| t.duration).fold(0.0, f64::max);
        let tested: std::collections::HashSet<u32> = results.iter().map(|r| r.test_index).collect();
        let unfinished = reports
            .iter()
            .filter(|r| !tested.contains(&r.test_index))
            .map(|r| r.test_index)
            .collect::<std::collections::HashSet<_>>()
            .len();

        slowest_tests.sort_by(|a, b| {
            b.duration
                .total_cmp(&a.duration)
                .then(a.test_index.cmp(&b.test_index))
        });
        slowest_tests.truncate(SLOWEST_ROWS);
        setups.sort_by(|a, b| {
            b.duration
                .total_cmp(&a.duration)
                .then(a.test_index.cmp(&b.test_index))
        });
        setups.truncate(SLOWEST_ROWS);
        let failures_omitted = failures.len().saturating_sub(FAILURE_LIMIT);
        failures.truncate(FAILURE_LIMIT);

        let workers = lanes.len();
        let busy: f64 = lanes.iter().map(|l| l.busy).sum();
        let lower_bound = if workers > 0 {
            longest_test.max(total_test_time / workers as f64)
        } else {
            longest_test
        };
        let stats = RunStats {
            origin,
            wall,
            wall_source,
            run_duration: run.duration(),
            tests: results.len(),
            unfinished,
            superseded_attempts,
            total_test_time,
            longest_test,
            workers,
            busy,
            overall_utilization: ratio(busy, workers as f64 * wall),
            lower_bound,
            achieved_speedup: ratio(total_test_time, wall),
            possible_speedup: ratio(total_test_time, lower_bound),
            idle: (workers as f64 * wall - busy).max(0.0),
            outcomes: outcome_counts.ordered(),
        };
        RunView {
            run,
            agents,
            tests,
            lanes,
            stats,
            slowest_tests,
            slowest_setups: setups,
            failures,
            failures_omitted,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Helpers.

/// `a / b`, or 0 when `b` is not positive (a run with no wall time used nothing).
fn ratio(a: f64, b: f64) -> f64 {
    if b > 0.0 && a.is_finite() {
        a / b
    } else {
        0.0
    }
}

/// Total length of the union of `intervals` (sorted in place).
fn union_length(intervals: &mut [(f64, f64)]) -> f64 {
    intervals.sort_by(|a, b| a.0.total_cmp(&b.0));
    let mut total = 0.0;
    let mut current: Option<(f64, f64)> = None;
    for &(start, stop) in intervals.iter() {
        match current {
            Some((s, e)) if start <= e => current = Some((s, e.max(stop))),
            Some((s, e)) => {
                total += e - s;
                current = Some((start, stop));
            }
            None => current = Some((start, stop)),
        }
    }
    if let Some((s, e)) = current {
        total += e - s;
    }
    total
}

fn set_nodeid(tests: &mut Vec<String>, index: usize, nodeid: String) {
    // A test index far beyond any real collection is a corrupt row; do not allocate for it.
    if index > 50_000_000 {
        return;
    }
    if tests.len() <= index {
        tests.resize(index + 1, String::new());
    }
    tests[index] = nodeid;
}

/// At most `limit` bytes of `text`, cut at a character boundary, with a note when cut.
fn truncate(text: &str, limit: usize) -> String {
    if text.len() <= limit {
        return text.to_string();
    }
    let mut end = limit;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!(
        "{}\n[... {} more bytes not shown]",
        &text[..end],
        text.len() - end
    )
}

/// The `reports` columns [`phase_record`] reads, in its order. Tracebacks and captured output
/// only for failing phases: a passing run of 50,000 tests has nothing to show there and need
/// not hold it in memory.
pub(crate) const PHASE_COLUMNS: &str = "test_index, nodeid, lease, phase, outcome, category,
    duration, start, stop, agent_id, worker, superseded,
    CASE WHEN category IN ('failed', 'error') OR outcome = 'failed' THEN longrepr END,
    CASE WHEN category IN ('failed', 'error') OR outcome = 'failed' THEN message END,
    CASE WHEN category IN ('failed', 'error') OR outcome = 'failed' THEN sections END";

/// One row selected with [`PHASE_COLUMNS`].
pub(crate) fn phase_record(row: &rusqlite::Row<'_>) -> rusqlite::Result<PhaseRecord> {
    let sections: Option<String> = row.get(14)?;
    Ok(PhaseRecord {
        test_index: to_u32(row.get(0)?),
        nodeid: row.get(1)?,
        lease: u64::try_from(row.get::<_, i64>(2)?).unwrap_or(0),
        phase: row.get::<_, Option<String>>(3)?.unwrap_or_default(),
        outcome: row.get(4)?,
        category: row.get(5)?,
        duration: row.get(6)?,
        start: row.get(7)?,
        stop: row.get(8)?,
        agent_id: row.get(9)?,
        worker: to_u32(row.get(10)?),
        superseded: row.get::<_, i64>(11)? != 0,
        longrepr: row.get(12)?,
        message: row.get(13)?,
        sections: parse_sections(sections.as_deref()),
    })
}

fn to_u32(value: i64) -> u32 {
    u32::try_from(value).unwrap_or(0)
}

fn parse_args(json: Option<&str>) -> Vec<String> {
    json.and_then(|j| serde_json::from_str(j).ok())
        .unwrap_or_default()
}

/// The `counts` column, in pytest's order.
pub(crate) fn parse_counts(json: Option<&str>) -> Vec<(String, u32)> {
    let map: BTreeMap<String, u64> = json
        .and_then(|j| serde_json::from_str(j).ok())
        .unwrap_or_default();
    let mut counts = Counts::default();
    for (category, n) in map {
        counts.add(&category, u32::try_from(n).unwrap_or(u32::MAX));
    }
    counts.ordered()
}

fn parse_sections(json: Option<&str>) -> Vec<(String, String)> {
    json.and_then(|j| serde_json::from_str(j).ok())
        .unwrap_or_default()
}

fn auto_workers(topology_json: &str) -> Option<u32> {
    let value: serde_json::Value = serde_json::from_str(topology_json).ok()?;
    value
        .get("auto_workers")?
        .as_u64()
        .and_then(|n| u32::try_from(n).ok())
}

/// Counts as pytest's summary line words them, without the time: `1 failed, 2 errors`.
pub(crate) fn summary_text(counts: &[(String, u32)]) -> String {
    let parts: Vec<String> = counts
        .iter()
        .filter(|(_, n)| *n > 0)
        .map(|(category, n)| {
            let noun = match (category.as_str(), n) {
                ("error", 1) => "error",
                ("error", _) => "errors",
                ("warnings", 1) => "warning",
                (other, _) => other,
            };
            format!("{n} {noun}")
        })
        .collect();
    if parts.is_empty() {
        "no tests ran".to_string()
    } else {
        parts.join(", ")
    }
}

/// Seconds as a short human figure: `850us`, `12.3ms`, `4.51s`, `2m05s`, `1h02m`.
pub fn format_seconds(seconds: f64) -> String {
    if !seconds.is_finite() {
        return "-".into();
    }
    let s = seconds.max(0.0);
    if s < 0.001 {
        format!("{:.0}us", s * 1e6)
    } else if s < 1.0 {
        format!("{:.1}ms", s * 1e3)
    } else if s < 60.0 {
        format!("{s:.2}s")
    } else if s < 3600.0 {
        let whole = s.round() as u64;
        format!("{}m{:02}s", whole / 60, whole % 60)
    } else {
        let whole = s.round() as u64;
        format!("{}h{:02}m", whole / 3600, (whole % 3600) / 60)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn union_length_merges_overlaps_and_keeps_gaps() {
        let mut intervals = vec![(5.0, 6.0), (0.0, 2.0), (1.0, 3.0), (3.0, 4.0)];
        assert_eq!(union_length(&mut intervals), 5.0);
        assert_eq!(union_length(&mut []), 0.0);
    }

    #[test]
    fn truncate_cuts_at_a_character_boundary() {
        let text = "ééé";
        let cut = truncate(text, 3);
        assert!(cut.starts_with('é'));
        assert!(cut.contains("more bytes not shown"));
        assert_eq!(truncate("short", 10), "short");
    }

    #[test]
    fn summary_words_counts_as_pytest_does() {
        let counts = parse_counts(Some(r#"{"passed":3,"error":1,"failed":2}"#));
        assert_eq!(summary_text(&counts), "2 failed, 3 passed, 1 error");
        assert_eq!(summary_text(&[]), "no tests ran");
    }

    #[test]
    fn seconds_read_at_every_scale() {
        assert_eq!(format_seconds(0.0005), "500us");
        assert_eq!(format_seconds(0.0123), "12.3ms");
        assert_eq!(format_seconds(4.512), "4.51s");
        assert_eq!(format_seconds(125.0), "2m05s");
        assert_eq!(format_seconds(3720.0), "1h02m");
    }
}
