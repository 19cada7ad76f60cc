//! The what-if planner: replays a recorded run's test durations through the real scheduler with
//! virtual time and predicts, for each worker count, the run's wall time, how busy the workers
//! would be and the speed-up, to answer "how many workers should our farm have".
//!
//! The model, and what it assumes:
//! - **Durations.** Each test holds its worker as long as its counting attempt did, from its
//!   setup's start to its teardown's end, as measured on the machines that ran it; the
//!   simulated workers all run at that speed.
//! - **Estimates.** The scheduler is given what fly's history records for each test (the sum of
//!   its setup, call and teardown durations), taken from this same run: perfect history, so the
//!   prediction is for a project whose history is settled, not for a first run.
//! - **Protocol.** Simulated workers follow the real worker's rules (`fly_worker.py`): a test
//!   starts only once the test after it is known or known not to exist, a worker asks for work
//!   as soon as it holds fewer than two unstarted tests, and gives back tests when asked.
//!   Every message takes half a round trip.
//! - **Overheads, measured from the run.** The time between one test's teardown and the next
//!   test's setup on a worker (median) is charged to every test and taken as the dispatch round
//!   trip too, since the record has no separate figure for it; the run's startup (run started
//!   to first setup) and finish (last teardown to run finished) are added once.

use std::cmp::Ordering;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use fly_common::proto::CollectedTest;
use rusqlite::{Connection, OpenFlags, OptionalExtension};

use crate::collection::Collection;
use crate::scheduler::{Action, Event, Lease, Scheduler, WorkerKey};
use crate::store::{History, SCHEMA_VERSION};
use crate::units::{self, Dist};

/// Round trip assumed when the run shows no gap between two tests on one worker (every worker
/// ran at most one test): a loopback dispatch.
const DEFAULT_ROUND_TRIP: f64 = 0.002;

/// The simulated agent's slot; the planner runs every worker on one agent.
const AGENT: u32 = 0;

/// Why a run could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    #[error("no database at {0} (run fly there first, or pass --db)")]
    NoDatabase(PathBuf),
    #[error("{path}: {action}: {source}")]
    Sqlite {
        path: PathBuf,
        action: &'static str,
        source: rusqlite::Error,
    },
    #[error("{path} is not a fly database (schema version 0)")]
    NotFly { path: PathBuf },
    #[error(
        "{path} has schema version {found}, newer than this fly-coordinator knows ({supported})"
    )]
    SchemaTooNew {
        path: PathBuf,
        found: u32,
        supported: u32,
    },
    #[error("{path} holds no finished run")]
    NoFinishedRun { path: PathBuf },
    #[error("{path} holds no run {selector:?}")]
    UnknownRun { path: PathBuf, selector: String },
    #[error("{selector:?} names several runs in {path}: {candidates}")]
    AmbiguousRun {
        path: PathBuf,
        selector: String,
        candidates: String,
    },
    #[error("run {run} has no test results to replay")]
    NoResults { run: String },
}

/// One test of a recorded run and the time its counting attempt took.
#[derive(Debug, Clone, PartialEq)]
pub struct RecordedTest {
    pub nodeid: String,
    /// How long the attempt whose result counts held its worker, in seconds: from its setup's
    /// start to its teardown's end. More than the phases' durations by what pytest does between
    /// phases (building a failure's report, for one).
    pub seconds: f64,
    /// What fly's history records for the test: the sum of that attempt's setup, call and
    /// teardown durations. The simulated scheduler expects this.
    pub estimate: f64,
}

impl RecordedTest {
    /// A test whose phases account for all of its time.
    pub fn new(nodeid: impl Into<String>, seconds: f64) -> RecordedTest {
        RecordedTest {
            nodeid: nodeid.into(),
            seconds,
            estimate: seconds,
        }
    }
}

/// What the planner needs of a run: its tests' durations and the overheads around them.
#[derive(Debug, Clone)]
pub struct RecordedRun {
    pub id: String,
    pub project: String,
    /// The tests that have a result, in collection order.
    pub tests: Vec<RecordedTest>,
    /// Tests of the collection that have no result (the run ended early); left out.
    pub missing: usize,
    /// Scoped fixture costs of the project, for `--dist auto`'s grouping.
    pub scopes: HashMap<String, f64>,
    /// How the tests are grouped into units (the run record does not keep it).
    pub dist: Dist,
    /// Workers that ran the run (all accepted agents together), when known.
    pub workers_used: Option<u32>,
    /// `finished_at - started_at`, when the run finished.
    pub measured_wall: Option<f64>,
    /// Run started to the first test's setup: history, scheduling, the first dispatch.
    pub startup: f64,
    /// The last test's teardown to the run's end: the last reports and the store's flush.
    pub finish: f64,
    /// Time a worker spends between one test's teardown and the next test's setup.
    pub per_test: f64,
    /// A dispatch's round trip: a worker's request to the scheduler's answer arriving.
    pub round_trip: f64,
}

impl RecordedRun {
    /// A run of these tests and nothing else: no overheads, no known worker count, `load`
    /// units. For what-ifs that do not come from a database.
    pub fn from_tests(tests: Vec<RecordedTest>) -> RecordedRun {
        RecordedRun {
            id: String::new(),
            project: String::new(),
            tests,
            missing: 0,
            scopes: HashMap::new(),
            dist: Dist::Load,
            workers_used: None,
            measured_wall: None,
            startup: 0.0,
            finish: 0.0,
            per_test: 0.0,
            round_trip: 0.0,
        }
    }

    /// The sum of the tests' durations: one worker's busy time, overheads aside.
    pub fn total_seconds(&self) -> f64 {
        self.tests.iter().map(|t| finite_seconds(t.seconds)).sum()
    }

    /// The longest test.
    pub fn longest(&self) -> Option<&RecordedTest> {
        self.tests
            .iter()
            .max_by(|a, b| finite_seconds(a.seconds).total_cmp(&finite_seconds(b.seconds)))
    }

    fn longest_seconds(&self) -> f64 {
        self.longest().map_or(0.0, |t| finite_seconds(t.seconds))
    }

    /// The fewest workers for which the lower bound is the longest test: from here on, more
    /// workers cannot shorten the run. 1 for a run without tests.
    pub fn saturation_workers(&self) -> u32 {
        let longest = self.longest_seconds();
        if longest <= 0.0 {
            return 1;
        }
        // A hair of tolerance: 20 s over a 10 s test is 2 workers, not 3 by rounding.
        let ratio = self.total_seconds() / longest;
        (ratio - 1e-9).ceil().clamp(1.0, u32::MAX as f64) as u32
    }

    /// The wall time no schedule can beat with `workers` workers: the longest test or an even
    /// share of all the work, whichever is longer, plus the run's startup and finish.
    pub fn lower_bound(&self, workers: u32) -> f64 {
        let longest = self.longest_seconds();
        let share = self.total_seconds() / f64::from(workers.max(1));
        self.startup + longest.max(share) + self.finish
    }
}

/// The planner's answer for one worker count.
#[derive(Debug, Clone, PartialEq)]
pub struct Prediction {
    pub workers: u32,
    /// Predicted wall time, run started to run finished, in seconds.
    pub wall: f64,
    /// [`RecordedRun::lower_bound`] for this worker count.
    pub lower_bound: f64,
    /// Share of the workers' time spent running tests over the whole predicted wall time.
    pub utilization: f64,
    /// Predicted wall time with one worker divided by this one.
    pub speedup: f64,
}

/// Predicts the run's wall time for each worker count (0 counts as 1), in the order given.
pub fn plan(run: &RecordedRun, workers: &[u32]) -> Vec<Prediction> {
    let serial = predicted_wall(run, 1);
    let total = run.total_seconds();
    workers
        .iter()
        .map(|&n| {
            let n = n.max(1);
            let wall = if n == 1 {
                serial
            } else {
                predicted_wall(run, n)
            };
            Prediction {
                workers: n,
                wall,
                lower_bound: run.lower_bound(n),
                utilization: if wall > 0.0 {
                    total / (f64::from(n) * wall)
                } else {
                    0.0
                },
                speedup: if wall > 0.0 { serial / wall } else { 1.0 },
            }
        })
        .collect()
}

/// Startup + the simulated span from the first setup to the last teardown + finish.
fn predicted_wall(run: &RecordedRun, workers: u32) -> f64 {
    run.startup + simulate(run, workers) + run.finish
}

/// A message in flight, or a test ending, at a virtual time.
#[derive(Debug)]
enum Happening {
    /// An event reaches the scheduler.
    ToScheduler(Event),
    /// The scheduler's answers reach a worker.
    Assign(u32, Vec<Lease>),
    NoMore(u32),
    Revoke(u32, Vec<u64>),
    /// The worker's running test ends (its teardown stops).
    TestEnds(u32),
}

struct Timed {
    at: f64,
    /// Tie-break: same-time happenings in the order they were caused.
    seq: u64,
    what: Happening,
}

impl PartialEq for Timed {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}
impl Eq for Timed {}
impl PartialOrd for Timed {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Timed {
    /// Reversed, so that `BinaryHeap` (a max-heap) pops the earliest first.
    fn cmp(&self, other: &Self) -> Ordering {
        other
            .at
            .total_cmp(&self.at)
            .then_with(|| other.seq.cmp(&self.seq))
    }
}

/// One simulated pytest worker, as `fly_worker.py` keeps its state.
#[derive(Default)]
struct SimWorker {
    /// Handed to the worker and not started, in order.
    held: VecDeque<Lease>,
    /// Told "nothing for now" and given nothing since.
    nomore: bool,
    /// Asked for work and not answered yet.
    want_sent: bool,
    running: Option<Lease>,
}

struct Simulation<'a> {
    scheduler: Scheduler,
    seconds: &'a [f64],
    per_test: f64,
    half_trip: f64,
    workers: Vec<SimWorker>,
    pending: BinaryHeap<Timed>,
    seq: u64,
    now: f64,
    first_setup: Option<f64>,
    last_teardown: f64,
}

impl Simulation<'_> {
    fn at(&mut self, delay: f64, what: Happening) {
        self.seq += 1;
        self.pending.push(Timed {
            at: self.now + delay,
            seq: self.seq,
            what,
        });
    }

    fn key(worker: u32) -> WorkerKey {
        WorkerKey {
            agent: AGENT,
            worker,
        }
    }

    /// The worker's loop: start the next test if its successor is known (or known not to
    /// exist), and ask for more when fewer than two are held.
    fn step(&mut self, w: u32) {
        let Some(state) = self.workers.get_mut(w as usize) else {
            return;
        };
        if state.running.is_none() && (state.held.len() >= 2 || state.nomore) {
            if let Some(lease) = state.held.pop_front() {
                state.running = Some(lease);
                let seconds = self
                    .seconds
                    .get(lease.test as usize)
                    .copied()
                    .unwrap_or(0.0);
                let setup = self.now + self.per_test;
                self.first_setup = Some(self.first_setup.map_or(setup, |f| f.min(setup)));
                self.at(
                    self.half_trip,
                    Happening::ToScheduler(Event::Started { lease: lease.lease }),
                );
                self.at(self.per_test + seconds, Happening::TestEnds(w));
            }
        }
        let Some(state) = self.workers.get_mut(w as usize) else {
            return;
        };
        if !state.nomore && !state.want_sent && state.held.len() < 2 {
            // A running worker asks at once, so the answer arrives while its test runs.
            state.want_sent = true;
            self.at(
                self.half_trip,
                Happening::ToScheduler(Event::WantWork(Self::key(w))),
            );
        }
    }

    fn happen(&mut self, what: Happening, t0: Instant) {
        match what {
            Happening::ToScheduler(event) => {
                // The scheduler reads no clock; virtual time maps onto a real instant for it.
                let now = Duration::try_from_secs_f64(self.now)
                    .ok()
                    .and_then(|d| t0.checked_add(d))
                    .unwrap_or(t0);
                for action in self.scheduler.handle(event, now) {
                    match action {
                        Action::Assign { worker, leases } => {
                            self.at(self.half_trip, Happening::Assign(worker.worker, leases));
                        }
                        Action::NoWork { worker } => {
                            self.at(self.half_trip, Happening::NoMore(worker.worker));
                        }
                        Action::Revoke { worker, leases } => {
                            self.at(self.half_trip, Happening::Revoke(worker.worker, leases));
                        }
                        // A replay sends no failures and loses no worker: no reruns, no
                        // abandoned tests.
                        Action::TestDone { .. }
                        | Action::Rerun { .. }
                        | Action::TestAbandoned { .. }
                        | Action::RunDone => {}
                    }
                }
            }
            Happening::Assign(w, leases) => {
                if let Some(state) = self.workers.get_mut(w as usize) {
                    state.held.extend(leases);
                    state.nomore = false;
                    state.want_sent = false;
                    if state.running.is_none() {
                        self.step(w);
                    }
                }
            }
            Happening::NoMore(w) => {
                if let Some(state) = self.workers.get_mut(w as usize) {
                    state.nomore = true;
                    state.want_sent = false;
                    if state.running.is_none() {
                        self.step(w);
                    }
                }
            }
            Happening::Revoke(w, leases) => {
                if let Some(state) = self.workers.get_mut(w as usize) {
                    let removed: Vec<u64> = state
                        .held
                        .iter()
                        .map(|l| l.lease)
                        .filter(|l| leases.contains(l))
                        .collect();
                    state.held.retain(|l| !removed.contains(&l.lease));
                    let idle = state.running.is_none();
                    self.at(
                        self.half_trip,
                        Happening::ToScheduler(Event::Revoked {
                            worker: Self::key(w),
                            leases: removed,
                        }),
                    );
                    if idle {
                        self.step(w);
                    }
                }
            }
            Happening::TestEnds(w) => {
                let Some(lease) = self
                    .workers
                    .get_mut(w as usize)
                    .and_then(|s| s.running.take())
                else {
                    return;
                };
                self.last_teardown = self.last_teardown.max(self.now);
                let seconds = self
                    .seconds
                    .get(lease.test as usize)
                    .copied()
                    .unwrap_or(0.0);
                self.at(
                    self.half_trip,
                    Happening::ToScheduler(Event::Finished {
                        lease: lease.lease,
                        seconds,
                    }),
                );
                self.step(w);
            }
        }
    }
}

/// Runs the recorded tests on `workers` simulated workers through the real scheduler and
/// returns the span from the first test's setup to the last test's teardown, in seconds.
pub fn simulate(run: &RecordedRun, workers: u32) -> f64 {
    if run.tests.is_empty() {
        return 0.0;
    }
    let workers = workers.max(1);
    let seconds: Vec<f64> = run
        .tests
        .iter()
        .map(|t| finite_seconds(t.seconds))
        .collect();
    // Perfect history: the scheduler expects what this run's phases took.
    let history = History {
        tests: run
            .tests
            .iter()
            .map(|t| (t.nodeid.clone(), finite_seconds(t.estimate)))
            .collect(),
        scopes: run.scopes.clone(),
    };
    let mut collected = Collection::with_capacity(run.tests.len());
    for t in &run.tests {
        collected.push(&CollectedTest {
            nodeid: t.nodeid.clone(),
            file: units::file_of(&t.nodeid).to_string(),
            ..Default::default()
        });
    }
    let estimates = units::estimate(&collected, &history, 0.0);
    let units = units::build(&collected, &estimates, &history, run.dist);
    let mut scheduler = Scheduler::new(units, estimates);
    scheduler.add_agent(AGENT, workers, 1.0);

    let mut sim = Simulation {
        scheduler,
        seconds: &seconds,
        per_test: finite_seconds(run.per_test),
        half_trip: finite_seconds(run.round_trip) / 2.0,
        workers: (0..workers).map(|_| SimWorker::default()).collect(),
        pending: BinaryHeap::new(),
        seq: 0,
        now: 0.0,
        first_setup: None,
        last_teardown: 0.0,
    };
    let t0 = Instant::now();
    for w in 0..workers {
        sim.step(w);
    }
    // Each test causes a handful of happenings; far more means the model is stuck in a loop.
    let limit = 1_000 + 100 * (seconds.len() as u64 + u64::from(workers));
    let mut steps = 0u64;
    while let Some(next) = sim.pending.pop() {
        steps += 1;
        if steps > limit {
            tracing::warn!(
                workers,
                "the simulation did not settle; the prediction is cut short"
            );
            break;
        }
        sim.now = next.at;
        sim.happen(next.what, t0);
    }
    if !sim.scheduler.is_done() {
        tracing::warn!(
            workers,
            finished = sim.scheduler.finished_count(),
            tests = sim.scheduler.test_count(),
            "the simulated run stopped before every test finished"
        );
    }
    match sim.first_setup {
        Some(first) => (sim.last_teardown - first).max(0.0),
        None => 0.0,
    }
}

/// A duration the simulation can use: negative, NaN and infinite figures count as 0.
fn finite_seconds(seconds: f64) -> f64 {
    if seconds.is_finite() {
        seconds.max(0.0)
    } else {
        0.0
    }
}

fn median(values: &mut [f64]) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    values.sort_by(|a, b| a.total_cmp(b));
    let mid = values.len() / 2;
    Some(if values.len() % 2 == 1 {
        values[mid]
    } else {
        (values[mid - 1] + values[mid]) / 2.0
    })
}

/// Opens the database read-only and checks that it is a fly database this binary can read.
fn open(path: &Path) -> Result<(Connection, u32), PlanError> {
    if !path.is_file() {
        return Err(PlanError::NoDatabase(path.to_path_buf()));
    }
    let sqlite = |action: &'static str| {
        move |source: rusqlite::Error| PlanError::Sqlite {
            path: path.to_path_buf(),
            action,
            source,
        }
    };
    let flags = OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let conn = Connection::open_with_flags(path, flags).map_err(sqlite("opening read-only"))?;
    // A coordinator may be writing; wait out its short locks.
    conn.busy_timeout(Duration::from_secs(5))
        .map_err(sqlite("setting the busy timeout"))?;
    let version: u32 = conn
        .pragma_query_value(None, "user_version", |row| row.get(0))
        .map_err(sqlite("reading the schema version"))?;
    if version == 0 {
        return Err(PlanError::NotFly {
            path: path.to_path_buf(),
        });
    }
    if version > SCHEMA_VERSION {
        return Err(PlanError::SchemaTooNew {
            path: path.to_path_buf(),
            found: version,
            supported: SCHEMA_VERSION,
        });
    }
    Ok((conn, version))
}

/// The run `selector` names: `latest` (the most recent finished run), a run id, or a prefix of
/// exactly one run id.
fn resolve(conn: &Connection, path: &Path, selector: &str) -> Result<String, PlanError> {
    let sqlite = |action: &'static str| {
        move |source: rusqlite::Error| PlanError::Sqlite {
            path: path.to_path_buf(),
            action,
            source,
        }
    };
    if selector == "latest" {
        return conn
            .query_row(
                "SELECT id FROM runs WHERE finished_at IS NOT NULL \
                 ORDER BY created_at DESC LIMIT 1",
                [],
                |row| row.get::<_, String>(0),
            )
            .optional()
            .map_err(sqlite("finding the latest run"))?
            .ok_or_else(|| PlanError::NoFinishedRun {
                path: path.to_path_buf(),
            });
    }
    let mut statement = conn
        .prepare(
            "SELECT id FROM runs WHERE substr(id, 1, length(?1)) = ?1 \
             ORDER BY created_at DESC LIMIT 6",
        )
        .map_err(sqlite("finding the run"))?;
    let ids = statement
        .query_map([selector], |row| row.get::<_, String>(0))
        .and_then(|rows| rows.collect::<Result<Vec<String>, _>>())
        .map_err(sqlite("finding the run"))?;
    if let Some(exact) = ids.iter().find(|id| *id == selector) {
        return Ok(exact.clone());
    }
    match ids.as_slice() {
        [] => Err(PlanError::UnknownRun {
            path: path.to_path_buf(),
            selector: selector.to_string(),
        }),
        [one] => Ok(one.clone()),
        many => Err(PlanError::AmbiguousRun {
            path: path.to_path_buf(),
            selector: selector.to_string(),
            candidates: many.join(", "),
        }),
    }
}

/// One report row as the planner reads it.
struct PhaseRow {
    test: u32,
    lease: i64,
    duration: f64,
    start: f64,
    stop: f64,
    worker: (String, i64),
}

/// Loads run `selector` (`latest`, an id or an id prefix) from the database at `path`,
/// read-only. Units are grouped as for `--dist auto`; set [`RecordedRun::dist`] to change it.
pub fn load(path: &Path, selector: &str) -> Result<RecordedRun, PlanError> {
    let (conn, version) = open(path)?;
    let sqlite = |action: &'static str| {
        move |source: rusqlite::Error| PlanError::Sqlite {
            path: path.to_path_buf(),
            action,
            source,
        }
    };
    let id = resolve(&conn, path, selector)?;
    let (project, started_at, finished_at): (String, Option<f64>, Option<f64>) = conn
        .query_row(
            "SELECT project, started_at, finished_at FROM runs WHERE id = ?1",
            [&id],
            |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)),
        )
        .map_err(sqlite("reading the run"))?;

    let mut statement = conn
        .prepare("SELECT test_index, nodeid FROM run_tests WHERE run_id = ?1 ORDER BY test_index")
        .map_err(sqlite("reading the run's collection"))?;
    let collection = statement
        .query_map([&id], |row| {
            Ok((row.get::<_, u32>(0)?, row.get::<_, String>(1)?))
        })
        .and_then(|rows| rows.collect::<Result<Vec<_>, _>>())
        .map_err(sqlite("reading the run's collection"))?;

    let mut statement = conn
        .prepare("SELECT test_index, lease, duration FROM results WHERE run_id = ?1")
        .map_err(sqlite("reading the run's results"))?;
    let results: HashMap<u32, (i64, f64)> = statement
        .query_map([&id], |row| Ok((row.get(0)?, (row.get(1)?, row.get(2)?))))
        .and_then(|rows| rows.collect::<Result<HashMap<_, _>, _>>())
        .map_err(sqlite("reading the run's results"))?;

    let mut statement = conn
        .prepare(
            "SELECT test_index, lease, duration, start, stop, agent_id, worker \
             FROM reports WHERE run_id = ?1",
        )
        .map_err(sqlite("reading the run's reports"))?;
    let phases: Vec<PhaseRow> = statement
        .query_map([&id], |row| {
            Ok(PhaseRow {
                test: row.get(0)?,
                lease: row.get(1)?,
                duration: row.get(2)?,
                start: row.get(3)?,
                stop: row.get(4)?,
                worker: (row.get(5)?, row.get(6)?),
            })
        })
        .and_then(|rows| rows.collect::<Result<Vec<_>, _>>())
        .map_err(sqlite("reading the run's reports"))?;

    let workers_used: Option<u32> = conn
        .query_row(
            "SELECT SUM(workers) FROM run_agents WHERE run_id = ?1 AND accepted = 1",
            [&id],
            |row| row.get(0),
        )
        .map_err(sqlite("reading the run's agents"))?;

    // Scope costs arrived with schema version 2.
    let scopes: HashMap<String, f64> = if version >= 2 {
        let mut statement = conn
            .prepare("SELECT scope, estimate FROM scope_costs WHERE project = ?1")
            .map_err(sqlite("reading the project's scope costs"))?;
        statement
            .query_map([&project], |row| Ok((row.get(0)?, row.get(1)?)))
            .and_then(|rows| rows.collect::<Result<HashMap<_, _>, _>>())
            .map_err(sqlite("reading the project's scope costs"))?
    } else {
        HashMap::new()
    };

    // The counting attempt of each test: its phases' durations summed, and its span.
    let mut counted: HashMap<u32, (f64, f64, f64)> = HashMap::new();
    for phase in &phases {
        if results
            .get(&phase.test)
            .is_some_and(|(l, _)| *l == phase.lease)
        {
            let entry = counted
                .entry(phase.test)
                .or_insert((0.0, phase.start, phase.stop));
            entry.0 += phase.duration;
            entry.1 = entry.1.min(phase.start);
            entry.2 = entry.2.max(phase.stop);
        }
    }
    let mut tests = Vec::new();
    let mut missing = 0;
    for (index, nodeid) in collection {
        match (results.get(&index), counted.get(&index)) {
            (Some(_), Some((sum, start, stop))) => tests.push(RecordedTest {
                nodeid,
                // Report timestamps are coarser than durations: never less than the phases.
                seconds: (stop - start).max(*sum),
                estimate: *sum,
            }),
            // An attempt that left no report (a crash before setup) has only the result's sum.
            (Some((_, fallback)), None) => tests.push(RecordedTest::new(nodeid, *fallback)),
            (None, _) => missing += 1,
        }
    }
    if tests.is_empty() {
        return Err(PlanError::NoResults { run: id });
    }

    // Every attempt's span on its worker, superseded ones included: they took the worker too.
    let mut spans: HashMap<(String, i64), HashMap<i64, (f64, f64)>> = HashMap::new();
    for phase in &phases {
        let span = spans
            .entry(phase.worker.clone())
            .or_default()
            .entry(phase.lease)
            .or_insert((phase.start, phase.stop));
        span.0 = span.0.min(phase.start);
        span.1 = span.1.max(phase.stop);
    }
    let mut gaps = Vec::new();
    for leases in spans.values() {
        let mut ordered: Vec<(f64, f64)> = leases.values().copied().collect();
        ordered.sort_by(|a, b| a.0.total_cmp(&b.0));
        for pair in ordered.windows(2) {
            let gap = pair[1].0 - pair[0].1;
            // Clocks that step back and overlapping rounding are noise, not time spent.
            if gap.is_finite() && gap >= 0.0 {
                gaps.push(gap);
            }
        }
    }
    let gap = median(&mut gaps);
    let first_start = phases.iter().map(|p| p.start).reduce(f64::min);
    let last_stop = phases.iter().map(|p| p.stop).reduce(f64::max);
    // Workers on other machines time themselves by their own clocks: a skewed one must not
    // produce a negative overhead.
    let positive = |x: Option<f64>| x.filter(|x| x.is_finite()).unwrap_or(0.0).max(0.0);
    Ok(RecordedRun {
        id,
        project,
        tests,
        missing,
        scopes,
        dist: Dist::Auto,
        workers_used: workers_used.filter(|w| *w > 0),
        measured_wall: started_at.zip(finished_at).map(|(s, f)| (f - s).max(0.0)),
        startup: positive(started_at.zip(first_start).map(|(s, f)| f - s)),
        finish: positive(finished_at.zip(last_stop).map(|(f, l)| f - l)),
        per_test: gap.unwrap_or(0.0),
        round_trip: gap.unwrap_or(DEFAULT_ROUND_TRIP),
    })
}

fn ms(seconds: f64) -> String {
    format!("{:.1} ms", seconds * 1000.0)
}

/// The planner's report: what was replayed and how, a table of predictions, and where more
/// workers stop helping.
pub fn render(run: &RecordedRun, predictions: &[Prediction]) -> String {
    let mut out = String::new();
    let _ = write!(
        out,
        "run {} (project {}): {} tests, {:.2} s of test time",
        run.id,
        run.project,
        run.tests.len(),
        run.total_seconds()
    );
    if let Some(used) = run.workers_used {
        let _ = write!(out, ", ran on {used} workers");
    }
    if let Some(wall) = run.measured_wall {
        let _ = write!(out, " in {wall:.2} s");
    }
    out.push('\n');
    if run.missing > 0 {
        let _ = writeln!(
            out,
            "{} tests of the collection have no result and are left out",
            run.missing
        );
    }
    out.push_str(
        "model: each test holds a worker as long as its counting attempt did (setup start to \
         teardown end); the scheduler knows each test's phase durations from this same run \
         (perfect history); every worker runs at the recorded speed\n",
    );
    let _ = writeln!(
        out,
        "overheads measured in the run: startup {}, finish {}, {} between tests on a worker, \
         {} per dispatch round trip",
        ms(run.startup),
        ms(run.finish),
        ms(run.per_test),
        ms(run.round_trip)
    );
    out.push('\n');
    let _ = writeln!(
        out,
        "{:>7}  {:>13}  {:>15}  {:>11}  {:>8}",
        "workers", "predicted (s)", "lower bound (s)", "utilization", "speed-up"
    );
    for p in predictions {
        let _ = write!(
            out,
            "{:>7}  {:>13.2}  {:>15.2}  {:>10.0}%  {:>7.2}x",
            p.workers,
            p.wall,
            p.lower_bound,
            p.utilization * 100.0,
            p.speedup
        );
        if run.workers_used == Some(p.workers) {
            match run.measured_wall {
                Some(wall) => {
                    let _ = write!(out, "  <- used: measured {wall:.2} s");
                }
                None => out.push_str("  <- used"),
            }
        }
        out.push('\n');
    }
    if let Some(longest) = run.longest() {
        let _ = writeln!(
            out,
            "\nlongest test: {} ({:.2} s); from {} workers on the lower bound is that test: more \
             workers stop helping",
            longest.nodeid,
            longest.seconds,
            run.saturation_workers()
        );
    }
    out
}

/// `fly-coordinator plan`: loads the run, predicts and prints. Errors name the database and
/// the run.
pub fn command(db: &Path, selector: &str, workers: &[u32], dist: Dist) -> Result<(), PlanError> {
    let mut run = load(db, selector)?;
    run.dist = dist;
    let predictions = plan(&run, workers);
    print!("{}", render(&run, &predictions));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run_of(durations: &[(&str, f64)]) -> RecordedRun {
        RecordedRun::from_tests(
            durations
                .iter()
                .map(|(id, s)| RecordedTest::new(*id, *s))
                .collect(),
        )
    }

    /// One 10 s test and a hundred 0.1 s ones, the long one last in collection order.
    fn one_long_test() -> RecordedRun {
        let mut tests: Vec<(String, f64)> = (0..100)
            .map(|i| (format!("test_short.py::test_{i}"), 0.1))
            .collect();
        tests.push(("test_zz.py::test_long".into(), 10.0));
        let refs: Vec<(&str, f64)> = tests.iter().map(|(id, s)| (id.as_str(), *s)).collect();
        run_of(&refs)
    }

    fn close(actual: f64, expected: f64, tolerance: f64) -> bool {
        (actual - expected).abs() <= tolerance
    }

    #[test]
    fn one_worker_runs_everything_in_a_row() {
        let run = one_long_test();
        let p = &plan(&run, &[1])[0];
        assert!(close(p.wall, 20.0, 1e-6), "{p:?}");
        assert!(close(p.speedup, 1.0, 1e-9));
        assert!(close(p.utilization, 1.0, 1e-6));
    }

    #[test]
    fn two_workers_finish_near_the_long_test_and_more_do_not_help() {
        let run = one_long_test();
        let predictions = plan(&run, &[2, 4, 8]);
        for p in &predictions {
            assert!(
                p.wall >= 10.0 - 1e-9,
                "nothing beats the longest test: {p:?}"
            );
            assert!(close(p.lower_bound, 10.0, 1e-9), "{p:?}");
        }
        // The long test starts first and the other worker runs the short ones meanwhile. Not
        // exactly 10 s: the worker starting the long test asks for work as it starts it (it
        // holds fewer than two), and the short tests it is given wait behind the long one
        // unless the scheduler takes them back.
        let two = &predictions[0];
        assert!(two.wall <= 10.0 * 1.15, "{two:?}");
        assert!(two.speedup >= 20.0 / 11.5, "{two:?}");
        assert!(
            predictions[2].utilization < 0.3,
            "8 workers mostly idle: {predictions:?}"
        );
        assert_eq!(run.saturation_workers(), 2);
        assert_eq!(
            run.longest().map(|t| t.nodeid.as_str()),
            Some("test_zz.py::test_long")
        );
    }

    #[test]
    fn equal_tests_scale_linearly() {
        let ids: Vec<String> = (0..64).map(|i| format!("t.py::test_{i}")).collect();
        let run = run_of(&ids.iter().map(|id| (id.as_str(), 0.5)).collect::<Vec<_>>());
        for p in plan(&run, &[1, 2, 4, 8, 16]) {
            let ideal = 32.0 / f64::from(p.workers);
            // At worst two tests late. List scheduling's bound is one; equal tests on workers
            // that all finish at the same virtual instant add one more: a worker asking at that
            // instant may be answered before the others' "started" arrive, so the take-back that
            // would even out the last tests sees nobody running yet.
            assert!(
                p.wall >= ideal - 1e-9 && p.wall <= ideal + 1.0 + 1e-9,
                "{p:?}"
            );
            assert!(
                p.speedup >= f64::from(p.workers) * ideal / (ideal + 1.0) - 1e-9,
                "{p:?}"
            );
        }
        assert_eq!(run.saturation_workers(), 64);
    }

    #[test]
    fn overheads_are_charged_per_test_and_once_per_run() {
        let ids: Vec<String> = (0..10).map(|i| format!("t.py::test_{i}")).collect();
        let mut run = run_of(&ids.iter().map(|id| (id.as_str(), 1.0)).collect::<Vec<_>>());
        run.startup = 0.5;
        run.finish = 0.25;
        run.per_test = 0.01;
        run.round_trip = 0.002;
        let one = &plan(&run, &[1])[0];
        // Nine gaps between ten tests; the round trip hides behind the running tests.
        let expected = 0.5 + 10.0 + 9.0 * 0.01 + 0.25;
        assert!(close(one.wall, expected, 1e-6), "{one:?} vs {expected}");
        assert!(close(one.lower_bound, 0.5 + 10.0 + 0.25, 1e-9), "{one:?}");
        let two = &plan(&run, &[2])[0];
        assert!(two.wall >= two.lower_bound, "{two:?}");
        run.startup = 0.0;
        run.finish = 0.0;
        let bare = &plan(&run, &[2])[0];
        assert!(
            close(two.wall - bare.wall, 0.75, 1e-9),
            "{two:?} vs {bare:?}"
        );
    }

    #[test]
    fn a_slow_round_trip_shows_when_tests_are_shorter_than_it() {
        // Dispatches travel in batches, so even a round trip ten times a test costs far less
        // than a round trip per test.
        let ids: Vec<String> = (0..400).map(|i| format!("t.py::test_{i}")).collect();
        let mut run = run_of(
            &ids.iter()
                .map(|id| (id.as_str(), 0.001))
                .collect::<Vec<_>>(),
        );
        let quick = plan(&run, &[4])[0].wall;
        run.round_trip = 0.01;
        let slow = plan(&run, &[4])[0].wall;
        assert!(slow > quick, "{slow} vs {quick}");
        assert!(slow < 400.0 * 0.01 / 4.0, "{slow}");
    }

    #[test]
    fn worker_counts_are_answered_in_order_and_an_empty_run_predicts_its_overheads() {
        let run = one_long_test();
        let counts: Vec<u32> = plan(&run, &[8, 1, 3]).iter().map(|p| p.workers).collect();
        assert_eq!(counts, vec![8, 1, 3]);
        let mut empty = RecordedRun::from_tests(Vec::new());
        empty.startup = 1.0;
        let p = &plan(&empty, &[4])[0];
        assert!(close(p.wall, 1.0, 1e-9), "{p:?}");
        assert_eq!(empty.saturation_workers(), 1);
    }

    #[test]
    fn the_report_names_the_used_count_and_where_more_workers_stop_helping() {
        let mut run = one_long_test();
        run.id = "run-1".into();
        run.project = "demo".into();
        run.workers_used = Some(2);
        run.measured_wall = Some(10.4);
        let text = render(&run, &plan(&run, &[1, 2, 4]));
        assert!(text.contains("perfect history"), "{text}");
        assert!(text.contains("<- used: measured 10.40 s"), "{text}");
        assert!(
            text.contains("test_zz.py::test_long (10.00 s); from 2 workers on"),
            "{text}"
        );
        let two = plan(&run, &[2])[0].wall;
        let row: Vec<&str> = text
            .lines()
            .find(|l| l.split_whitespace().next() == Some("2"))
            .map(|l| l.split_whitespace().collect())
            .unwrap_or_default();
        let printed = row.get(1).and_then(|s| s.parse::<f64>().ok());
        assert!(
            printed.is_some_and(|w| close(w, two, 0.005)),
            "{row:?} vs {two}"
        );
    }

    #[test]
    fn loading_a_missing_database_says_so_and_creates_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("fly.db");
        let err = load(&path, "latest").unwrap_err();
        assert!(matches!(err, PlanError::NoDatabase(_)), "{err}");
        assert!(err.to_string().contains("no database at"), "{err}");
        assert!(!path.exists());
    }

    #[test]
    fn loading_replays_the_counting_attempt_and_measures_the_overheads() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("fly.db");
        // The real store writes the schema; rows are written here as the dispatcher would.
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let store = crate::store::Store::open(&path).unwrap();
            store.close().await.unwrap();
        });
        let conn = Connection::open(&path).unwrap();
        conn.execute_batch(
            "INSERT INTO runs (id, project, status, pytest_args, created_at, started_at, finished_at)
                 VALUES ('aaaa-1', 'demo', 'passed', '[]', 99.0, 100.0, 104.0),
                        ('bbbb-2', 'demo', 'running', '[]', 200.0, 200.5, NULL);
             INSERT INTO run_agents VALUES ('aaaa-1', 'agent', 2, 1, NULL);
             INSERT INTO run_tests VALUES ('aaaa-1', 0, 't.py::a', 't.py', 1),
                                          ('aaaa-1', 1, 't.py::b', 't.py', 2),
                                          ('aaaa-1', 2, 't.py::c', 't.py', 3);
             -- t.py::a ran twice: lease 1 was lost (superseded), lease 3 counts.
             INSERT INTO results (run_id, test_index, nodeid, outcome, duration, attempts, lease,
                                  agent_id, worker)
                         VALUES ('aaaa-1', 0, 't.py::a', 'passed', 1.5, 2, 3, 'agent', 0),
                                        ('aaaa-1', 1, 't.py::b', 'passed', 1.9, 1, 2, 'agent', 1);
             INSERT INTO reports (run_id, test_index, nodeid, lease, phase, outcome, category,
                                  duration, start, stop, agent_id, worker, superseded) VALUES
               ('aaaa-1', 0, 't.py::a', 1, 'setup', 'passed', '', 0.1, 100.2, 100.3, 'agent', 0, 1),
               ('aaaa-1', 0, 't.py::a', 1, 'call', 'passed', 'passed', 1.0, 100.3, 101.3, 'agent', 0, 1),
               ('aaaa-1', 1, 't.py::b', 2, 'setup', 'passed', '', 0.5, 100.25, 100.75, 'agent', 1, 0),
               -- 0.1 s between setup and call belongs to no phase, but the test took it.
               ('aaaa-1', 1, 't.py::b', 2, 'call', 'passed', 'passed', 1.4, 100.85, 102.25, 'agent', 1, 0),
               ('aaaa-1', 0, 't.py::a', 3, 'setup', 'passed', '', 0.25, 102.27, 102.52, 'agent', 1, 0),
               ('aaaa-1', 0, 't.py::a', 3, 'call', 'passed', 'passed', 1.25, 102.52, 103.77, 'agent', 1, 0);",
        )
        .unwrap();
        drop(conn);

        let run = load(&path, "latest").unwrap();
        assert_eq!(
            run.id, "aaaa-1",
            "the unfinished run is not the latest finished one"
        );
        assert_eq!(load(&path, "aaaa").unwrap().id, "aaaa-1", "an id prefix");
        assert_eq!(run.project, "demo");
        let tests: Vec<(&str, f64, f64)> = run
            .tests
            .iter()
            .map(|t| (t.nodeid.as_str(), t.seconds, t.estimate))
            .collect();
        assert_eq!(tests.len(), 2, "{tests:?}");
        assert_eq!((tests[0].0, tests[1].0), ("t.py::a", "t.py::b"));
        assert!(
            close(tests[0].1, 1.5, 1e-9) && close(tests[0].2, 1.5, 1e-9),
            "{tests:?}"
        );
        assert!(
            close(tests[1].1, 2.0, 1e-9) && close(tests[1].2, 1.9, 1e-9),
            "{tests:?}"
        );
        assert_eq!(run.missing, 1);
        assert_eq!(run.workers_used, Some(2));
        assert!(close(run.measured_wall.unwrap(), 4.0, 1e-9));
        assert!(close(run.startup, 0.2, 1e-9), "{}", run.startup);
        assert!(close(run.finish, 0.23, 1e-9), "{}", run.finish);
        assert!(close(run.per_test, 0.02, 1e-9), "{}", run.per_test);
        assert!(close(run.round_trip, 0.02, 1e-9));

        let err = load(&path, "nope").unwrap_err();
        assert!(matches!(err, PlanError::UnknownRun { .. }), "{err}");
        assert!(matches!(
            load(&path, "bbbb-2").unwrap_err(),
            PlanError::NoResults { .. }
        ));
    }
}
