//! Duration history for scheduling: what a finished run teaches about how long each test takes
//! and what each module's and class's shared fixtures cost, kept per project in reference
//! seconds, and read back for the next run.
//!
//! Figures are normalised by the speed of the agent that produced them (seconds measured on an
//! agent of speed 2.0 count double), so machines of different speeds share one history. Each
//! test and scope keeps its last [`MAX_SAMPLES`] samples; the estimate is their median, so one
//! slow run (a loaded machine, a cold cache) does not move it.

use std::collections::HashMap;
use std::path::Path;
use std::sync::mpsc;
use std::time::Duration;

use rusqlite::{params, Connection, Statement};

use super::{schema, StoreError};

/// Samples kept per test and per scope, newest last; the estimate is their median.
pub const MAX_SAMPLES: usize = 5;

/// A project's duration history as the scheduler uses it. Every figure is in reference seconds:
/// seconds on a machine of speed 1.0 (an agent of speed 2.0 takes half as long).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct History {
    /// Expected duration of each test (setup + call + teardown), by nodeid.
    pub tests: HashMap<String, f64>,
    /// Expected cost of each module's or class's scoped fixtures, by scope: the module path
    /// (`pkg/test_a.py`) or the class (`pkg/test_a.py::TestX`). A worker pays it in the setup
    /// of the first test of the scope it runs, so that test's own duration includes it too.
    pub scopes: HashMap<String, f64>,
}

/// The statements that read and write one history table (`durations` or `scope_costs`).
struct Table {
    select: &'static str,
    upsert: &'static str,
}

const DURATIONS: Table = Table {
    select: "SELECT samples FROM durations WHERE project = ?1 AND nodeid = ?2",
    upsert: "INSERT INTO durations (project, nodeid, estimate, samples, updated_at)
             VALUES (?1, ?2, ?3, ?4, ?5)
             ON CONFLICT (project, nodeid) DO UPDATE SET estimate = excluded.estimate,
                 samples = excluded.samples, updated_at = excluded.updated_at",
};

const SCOPE_COSTS: Table = Table {
    select: "SELECT samples FROM scope_costs WHERE project = ?1 AND scope = ?2",
    upsert: "INSERT INTO scope_costs (project, scope, estimate, samples, updated_at)
             VALUES (?1, ?2, ?3, ?4, ?5)
             ON CONFLICT (project, scope) DO UPDATE SET estimate = excluded.estimate,
                 samples = excluded.samples, updated_at = excluded.updated_at",
};

/// Every result of the run, in test order.
const RUN_RESULTS: &str = "
    SELECT test_index, nodeid, agent_id, worker, duration, lease FROM results
    WHERE run_id = ?1 ORDER BY test_index";

/// Where the run's phase reports lie in `reports`: its lowest and highest id. Answered from the
/// index alone.
const RUN_REPORT_IDS: &str = "SELECT min(id), max(id) FROM reports WHERE run_id = ?1";

/// The run's phase reports, in arrival order. A run's reports are inserted while it runs, so
/// they sit in one stretch of ids (shared only with runs that overlapped it): scanning that
/// stretch of the table in order is much cheaper than a b-tree search per row from the index,
/// which for a million-test run dominated the whole write. `+run_id` keeps SQLite from using
/// the index anyway.
const RUN_REPORTS: &str = "
    SELECT test_index, lease, phase, duration, start FROM reports
    WHERE id BETWEEN ?2 AND ?3 AND +run_id = ?1";

/// One test of the run as its final attempt ran. Durations are in the agent's own seconds.
struct Ran {
    test_index: i64,
    /// The attempt that counts.
    lease: i64,
    nodeid: String,
    /// Index into the run's agents.
    agent: usize,
    worker: i64,
    /// Sum of the attempt's phase durations (the result's own duration if it has no report).
    duration: f64,
    /// Whether any phase report of the attempt was found.
    reported: bool,
    /// The setup phase's duration, if the attempt reported one.
    setup: Option<f64>,
    /// When the attempt's first phase began: the order in which its worker ran it.
    start: f64,
}

/// A test in the order its worker ran it, for fixture costs.
#[derive(Debug, Clone, Copy)]
struct Step<'a> {
    agent: usize,
    worker: i64,
    start: f64,
    nodeid: &'a str,
    /// Setup duration in reference seconds.
    setup: f64,
}

/// Adds what run `run_id` of `project` taught to the history: one duration sample per test that
/// has a result, one fixture-cost sample per scope that can be measured. `speeds` gives the
/// speed of each agent (by id) that ran tests; an agent missing from it falls back to the speed
/// recorded when it connected, then to 1.0.
pub(super) fn record(
    conn: &Connection,
    project: &str,
    run_id: &str,
    speeds: &HashMap<String, f64>,
    now: f64,
) -> rusqlite::Result<()> {
    let (ran, agents) = read_run(conn, run_id)?;
    if ran.is_empty() {
        return Ok(());
    }
    let agent_speeds = agents
        .iter()
        .map(|id| agent_speed(conn, id, speeds))
        .collect::<rusqlite::Result<Vec<f64>>>()?;

    let mut durations: Vec<(&str, f64)> = ran
        .iter()
        .map(|t| (t.nodeid.as_str(), t.duration * agent_speeds[t.agent]))
        .filter(|(_, d)| d.is_finite() && *d >= 0.0)
        .collect();
    // In key order the b-tree is walked and extended page by page instead of at random.
    durations.sort_unstable_by(|a, b| a.0.cmp(b.0));
    add_samples(conn, &DURATIONS, project, &durations, now)?;

    let mut steps: Vec<Step> = ran
        .iter()
        .filter_map(|t| {
            let setup = t.setup? * agent_speeds[t.agent];
            (setup.is_finite() && setup >= 0.0 && t.start.is_finite()).then_some(Step {
                agent: t.agent,
                worker: t.worker,
                start: t.start,
                nodeid: &t.nodeid,
                setup,
            })
        })
        .collect();
    let mut scopes: Vec<(&str, f64)> = scope_samples(&mut steps).into_iter().collect();
    scopes.sort_unstable_by(|a, b| a.0.cmp(b.0));
    add_samples(conn, &SCOPE_COSTS, project, &scopes, now)
}

/// Reads the run's tests as their final attempts ran, and the ids of the agents that ran them
/// (`Ran::agent` indexes the latter).
fn read_run(conn: &Connection, run_id: &str) -> rusqlite::Result<(Vec<Ran>, Vec<String>)> {
    let mut ran: Vec<Ran> = Vec::new();
    let mut agents: Vec<String> = Vec::new();
    let mut agent_index: HashMap<String, usize> = HashMap::new();
    let mut stmt = conn.prepare_cached(RUN_RESULTS)?;
    let mut rows = stmt.query([run_id])?;
    while let Some(row) = rows.next()? {
        let agent_id = row.get_ref(2)?.as_str()?;
        let agent = match agent_index.get(agent_id) {
            Some(&i) => i,
            None => {
                agent_index.insert(agent_id.to_owned(), agents.len());
                agents.push(agent_id.to_owned());
                agents.len() - 1
            }
        };
        ran.push(Ran {
            test_index: row.get(0)?,
            nodeid: row.get(1)?,
            agent,
            worker: row.get(3)?,
            // Replaced by the sum of the reports, if there are any.
            duration: row.get(4)?,
            lease: row.get(5)?,
            reported: false,
            setup: None,
            start: f64::INFINITY,
        });
    }

    let ids: (Option<i64>, Option<i64>) = conn
        .prepare_cached(RUN_REPORT_IDS)?
        .query_row([run_id], |row| Ok((row.get(0)?, row.get(1)?)))?;
    let (Some(first), Some(last)) = ids else {
        return Ok((ran, agents)); // no reports at all
    };
    let mut stmt = conn.prepare_cached(RUN_REPORTS)?;
    let mut rows = stmt.query(params![run_id, first, last])?;
    while let Some(row) = rows.next()? {
        let test_index: i64 = row.get(0)?;
        // `ran` is in test order.
        let Ok(i) = ran.binary_search_by_key(&test_index, |t| t.test_index) else {
            continue; // a test without a result
        };
        let test = &mut ran[i];
        if test.lease != row.get::<_, i64>(1)? {
            continue; // an attempt that does not count
        }
        let (duration, start): (f64, f64) = (row.get(3)?, row.get(4)?);
        if !test.reported {
            test.reported = true;
            test.duration = 0.0;
        }
        test.duration += duration;
        test.start = test.start.min(start);
        if row.get_ref(2)?.as_str_or_null()? == Some("setup") {
            test.setup = Some(duration);
        }
    }
    Ok((ran, agents))
}

/// The speed of agent `id`: from the run's figures, else as recorded at connection, else 1.0.
fn agent_speed(
    conn: &Connection,
    id: &str,
    speeds: &HashMap<String, f64>,
) -> rusqlite::Result<f64> {
    if let Some(speed) = speeds.get(id).copied().and_then(valid_speed) {
        return Ok(speed);
    }
    let mut stmt = conn.prepare_cached("SELECT speed FROM agents WHERE id = ?1")?;
    let mut rows = stmt.query([id])?;
    let recorded = match rows.next()? {
        Some(row) => row.get::<_, Option<f64>>(0)?.and_then(valid_speed),
        None => None,
    };
    Ok(recorded.unwrap_or_else(|| {
        tracing::warn!(
            agent = id,
            "no speed known for an agent; its durations count as reference seconds"
        );
        1.0
    }))
}

/// A speed usable as a multiplier: positive and finite.
pub(super) fn valid_speed(speed: f64) -> Option<f64> {
    (speed.is_finite() && speed > 0.0).then_some(speed)
}

/// Appends one sample per key to `table`, keeping the newest [`MAX_SAMPLES`] and their median.
fn add_samples(
    conn: &Connection,
    table: &Table,
    project: &str,
    samples: &[(&str, f64)],
    now: f64,
) -> rusqlite::Result<()> {
    let mut select = conn.prepare_cached(table.select)?;
    let mut upsert = conn.prepare_cached(table.upsert)?;
    let mut kept: Vec<f64> = Vec::with_capacity(MAX_SAMPLES + 1);
    let mut scratch: Vec<f64> = Vec::with_capacity(MAX_SAMPLES + 1);
    for &(key, sample) in samples {
        read_samples(&mut select, project, key, &mut kept)?;
        kept.push(round_micros(sample));
        if kept.len() > MAX_SAMPLES {
            kept.drain(..kept.len() - MAX_SAMPLES);
        }
        scratch.clear();
        scratch.extend_from_slice(&kept);
        let estimate = median(&mut scratch).unwrap_or(sample);
        let text = serde_json::to_string(&kept)
            .map_err(|err| rusqlite::Error::ToSqlConversionFailure(Box::new(err)))?;
        upsert.execute(params![project, key, estimate, text, now])?;
    }
    Ok(())
}

/// Fills `kept` with the samples stored for `key` (none if there is no row). A row whose
/// samples cannot be read is started afresh rather than failing the whole run's history.
fn read_samples(
    select: &mut Statement<'_>,
    project: &str,
    key: &str,
    kept: &mut Vec<f64>,
) -> rusqlite::Result<()> {
    kept.clear();
    let mut rows = select.query(params![project, key])?;
    let Some(row) = rows.next()? else {
        return Ok(());
    };
    let text = row.get_ref(0)?.as_str().unwrap_or("");
    match serde_json::from_str::<Vec<f64>>(text) {
        Ok(samples) => kept.extend(samples.into_iter().filter(|s| s.is_finite())),
        Err(err) => tracing::warn!(
            project,
            key,
            error = %err,
            "unreadable duration samples in the store; starting them afresh"
        ),
    }
    Ok(())
}

/// Microsecond resolution is far finer than test timings vary, and keeps the stored JSON short
/// (a project's whole history is read before each run).
fn round_micros(seconds: f64) -> f64 {
    (seconds * 1e6).round() / 1e6
}

/// The median (the mean of the middle two for an even count), in linear time. Reorders
/// `values`.
fn median(values: &mut [f64]) -> Option<f64> {
    let n = values.len();
    if n == 0 {
        return None;
    }
    let mid = n / 2;
    let (lower, upper, _) = values.select_nth_unstable_by(mid, f64::total_cmp);
    let upper = *upper;
    if n % 2 == 1 {
        return Some(upper);
    }
    let below = lower.iter().copied().max_by(f64::total_cmp)?;
    Some((below + upper) / 2.0)
}

/// The part of a nodeid that names the test, without its parameters (which may contain `::`).
fn without_params(nodeid: &str) -> &str {
    match nodeid.find('[') {
        Some(i) => &nodeid[..i],
        None => nodeid,
    }
}

/// A test's module scope: its file path, `pkg/test_a.py`.
fn module_of(nodeid: &str) -> &str {
    let base = without_params(nodeid);
    match base.find("::") {
        Some(i) => &base[..i],
        None => base,
    }
}

/// A test method's class scope, `pkg/test_a.py::TestX` (the innermost class for nested ones,
/// as pytest-xdist's `loadscope` groups them); `None` for a module-level test function.
fn class_of(nodeid: &str) -> Option<&str> {
    let base = without_params(nodeid);
    let i = base.rfind("::")?;
    base[..i].contains("::").then(|| &base[..i])
}

/// One fixture-cost sample per scope (module or class) from the order workers ran tests in.
///
/// A worker pays a scope's fixtures in the setup of the first test of each maximal run of
/// consecutive tests of that scope; the rest of the run reuses them. So a run of two or more
/// tests yields the first test's setup minus the median setup of the others (at least 0), and a
/// lone test yields its setup minus the median setup of the whole run, when that is positive.
/// A scope run several times (split over workers, or interleaved with other scopes) gets the
/// median of its runs' figures. A class run that opens its module's run also carries the
/// module's fixtures, which cannot be told apart from one observation; so does the first
/// scope of each worker carry the session's fixtures.
///
/// Sorts `steps` by worker and start time: O(n log n).
fn scope_samples<'a>(steps: &mut [Step<'a>]) -> HashMap<&'a str, f64> {
    let mut setups: Vec<f64> = steps.iter().map(|s| s.setup).collect();
    let Some(run_median) = median(&mut setups) else {
        return HashMap::new();
    };
    steps.sort_unstable_by(|a, b| {
        (a.agent, a.worker)
            .cmp(&(b.agent, b.worker))
            .then(a.start.total_cmp(&b.start))
    });
    let mut per_scope: HashMap<&'a str, Vec<f64>> = HashMap::new();
    let mut scratch: Vec<f64> = Vec::new();
    let levels: [fn(&str) -> Option<&str>; 2] = [|n| Some(module_of(n)), class_of];
    for worker in steps.chunk_by(|a, b| (a.agent, a.worker) == (b.agent, b.worker)) {
        for scope_of in levels {
            for run in worker.chunk_by(|a, b| scope_of(a.nodeid) == scope_of(b.nodeid)) {
                let Some(scope) = scope_of(run[0].nodeid) else {
                    continue;
                };
                let first = run[0].setup;
                let sample = if run.len() >= 2 {
                    scratch.clear();
                    scratch.extend(run[1..].iter().map(|s| s.setup));
                    median(&mut scratch).map(|others| (first - others).max(0.0))
                } else {
                    Some(first - run_median).filter(|excess| *excess > 0.0)
                };
                if let Some(sample) = sample {
                    per_scope.entry(scope).or_default().push(sample);
                }
            }
        }
    }
    per_scope
        .into_iter()
        .filter_map(|(scope, mut samples)| median(&mut samples).map(|m| (scope, m)))
        .collect()
}

/// Rows per message from the thread reading durations to the thread building the map.
const BATCH: usize = 4096;

/// Reads `project`'s history on read-only connections of its own.
///
/// Building a map of a million owned strings costs more than SQLite's scan, so the two overlap:
/// a scoped thread steps through the rows and sends them in batches while this one inserts
/// them, into a map sized up front from a count taken on a second connection meanwhile (growing
/// it instead would hash every key again at each doubling).
pub(super) fn load(
    path: &Path,
    project: &str,
    busy_timeout: Duration,
) -> Result<History, StoreError> {
    let (rows_tx, rows_rx) = mpsc::channel::<Vec<(String, f64)>>();
    std::thread::scope(|scope| {
        let reader = std::thread::Builder::new()
            .name("fly-history-read".into())
            .spawn_scoped(scope, move || {
                read_history(path, project, busy_timeout, rows_tx)
            })
            .map_err(StoreError::SpawnReader)?;
        let mut tests = HashMap::with_capacity(count_tests(path, project, busy_timeout));
        // Ends when the reader is done, or has failed and dropped its sender.
        for batch in rows_rx {
            tests.extend(batch);
        }
        let scopes = match reader.join() {
            Ok(scopes) => scopes?,
            // A panic stays a panic; the blocking task that runs this reports it.
            Err(panic) => std::panic::resume_unwind(panic),
        };
        Ok(History { tests, scopes })
    })
}

/// Streams `project`'s test durations to `rows` and returns its scope costs, both inside one
/// read transaction so they come from the same snapshot while the writer goes on.
fn read_history(
    path: &Path,
    project: &str,
    busy_timeout: Duration,
    rows: mpsc::Sender<Vec<(String, f64)>>,
) -> Result<HashMap<String, f64>, StoreError> {
    let read = |action: &'static str| {
        move |source: rusqlite::Error| StoreError::Sqlite {
            path: path.to_path_buf(),
            action,
            source,
        }
    };
    let mut conn = schema::connect_read_only(path, busy_timeout)?;
    let tx = conn
        .transaction()
        .map_err(read("starting a read of the duration history"))?;
    read_estimates(
        &tx,
        "SELECT nodeid, estimate FROM durations WHERE project = ?1",
        project,
        |batch| {
            // The receiver only goes away by unwinding, which ends this scope anyway.
            let _ = rows.send(batch);
        },
    )
    .map_err(read("reading test durations"))?;
    drop(rows);
    let mut scopes = HashMap::new();
    read_estimates(
        &tx,
        "SELECT scope, estimate FROM scope_costs WHERE project = ?1",
        project,
        |batch| scopes.extend(batch),
    )
    .map_err(read("reading fixture costs"))?;
    Ok(scopes)
}

/// How many test durations `project` has, to size the map; 0 (let it grow) if that cannot be
/// read: the reader reports real errors.
fn count_tests(path: &Path, project: &str, busy_timeout: Duration) -> usize {
    let count = schema::connect_read_only(path, busy_timeout)
        .ok()
        .and_then(|conn| {
            conn.query_row(
                "SELECT count(*) FROM durations WHERE project = ?1",
                [project],
                |row| row.get::<_, i64>(0),
            )
            .ok()
        });
    count.and_then(|n| usize::try_from(n).ok()).unwrap_or(0)
}

/// Runs `sql` (selecting a key and an estimate) and hands the rows to `sink` in batches.
fn read_estimates(
    conn: &Connection,
    sql: &str,
    project: &str,
    mut sink: impl FnMut(Vec<(String, f64)>),
) -> rusqlite::Result<()> {
    let mut stmt = conn.prepare(sql)?;
    let mut rows = stmt.query([project])?;
    let mut batch = Vec::with_capacity(BATCH);
    while let Some(row) = rows.next()? {
        let key = row.get_ref(0)?.as_str()?.to_owned();
        batch.push((key, row.get(1)?));
        if batch.len() == BATCH {
            sink(std::mem::replace(&mut batch, Vec::with_capacity(BATCH)));
        }
    }
    if !batch.is_empty() {
        sink(batch);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::{Store, Write};
    use super::*;
    use fly_common::proto::{Phase, PhaseReport};
    use std::path::PathBuf;
    use std::time::Instant;

    const PROJECT: &str = "proj";

    fn temp_db() -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("fly.sqlite");
        (dir, path)
    }

    /// How one attempt at a test ran, in the agent's own seconds.
    struct Attempt<'a> {
        nodeid: &'a str,
        agent: &'a str,
        worker: u32,
        start: f64,
        setup: f64,
        call: f64,
        teardown: f64,
    }

    impl<'a> Attempt<'a> {
        fn new(nodeid: &'a str, start: f64, setup: f64, call: f64) -> Self {
            Attempt {
                nodeid,
                agent: "agent-a",
                worker: 0,
                start,
                setup,
                call,
                teardown: 0.0,
            }
        }
    }

    /// Queues the phase reports of one attempt, as the dispatcher does.
    fn write_reports(store: &Store, run_id: &str, index: u32, lease: u64, a: &Attempt) {
        let phases = [
            (Phase::Setup, a.setup, 0.0),
            (Phase::Call, a.call, a.setup),
            (Phase::Teardown, a.teardown, a.setup + a.call),
        ];
        for (phase, duration, offset) in phases {
            store.write(Write::Report {
                run_id: run_id.into(),
                nodeid: a.nodeid.into(),
                agent_id: a.agent.into(),
                worker: a.worker,
                superseded: false,
                report: PhaseReport {
                    lease,
                    test_index: index,
                    phase: phase as i32,
                    outcome: "passed".into(),
                    category: if phase == Phase::Call { "passed" } else { "" }.into(),
                    duration,
                    start: a.start + offset,
                    stop: a.start + offset + duration,
                    ..PhaseReport::default()
                },
            });
        }
    }

    fn write_result(store: &Store, run_id: &str, index: u32, lease: u64, a: &Attempt) {
        store.write(Write::TestResult {
            run_id: run_id.into(),
            test_index: index,
            nodeid: a.nodeid.into(),
            outcome: "passed".into(),
            duration: a.setup + a.call + a.teardown,
            attempts: 1,
            lease,
            agent_id: a.agent.into(),
            worker: a.worker,
        });
    }

    /// A whole run: every attempt reported and counted (lease = index + 1), then its history
    /// recorded with `speeds`.
    fn write_run(store: &Store, run_id: &str, tests: &[Attempt], speeds: &[(&str, f64)]) {
        for (index, a) in tests.iter().enumerate() {
            let index = index as u32;
            write_reports(store, run_id, index, u64::from(index) + 1, a);
            write_result(store, run_id, index, u64::from(index) + 1, a);
        }
        store.write(Write::RecordHistory {
            project: PROJECT.into(),
            run_id: run_id.into(),
            speeds: speeds.iter().map(|(a, s)| (a.to_string(), *s)).collect(),
        });
    }

    fn samples_of(path: &Path, table_key: &str, key: &str) -> Vec<f64> {
        let conn = Connection::open(path).expect("reader");
        let sql = match table_key {
            "test" => "SELECT samples FROM durations WHERE project = ?1 AND nodeid = ?2",
            _ => "SELECT samples FROM scope_costs WHERE project = ?1 AND scope = ?2",
        };
        let text: String = conn
            .query_row(sql, [PROJECT, key], |r| r.get(0))
            .expect("samples row");
        serde_json::from_str(&text).expect("samples json")
    }

    fn assert_close(actual: Option<&f64>, expected: f64, what: &str) {
        let actual = actual.copied().unwrap_or(f64::NAN);
        assert!(
            (actual - expected).abs() < 1e-9,
            "{what}: expected {expected}, got {actual}"
        );
    }

    #[tokio::test]
    async fn one_run_records_each_tests_duration_from_its_final_attempt() {
        let (_dir, path) = temp_db();
        let store = Store::open(&path).expect("open");
        let fast = Attempt {
            teardown: 0.1,
            ..Attempt::new("t.py::test_fast", 0.0, 0.1, 0.25)
        };
        let retried = Attempt::new("t.py::test_retried", 1.0, 0.0, 2.0);
        let skipped = Attempt::new("t.py::test_skipped", 3.0, 0.001, 0.0);
        // The retried test's first attempt (lease 100) was given up on after 30 s; only its
        // final attempt (lease 2) counts.
        write_reports(
            &store,
            "run-1",
            1,
            100,
            &Attempt::new("t.py::test_retried", 0.5, 0.0, 30.0),
        );
        write_run(
            &store,
            "run-1",
            &[fast, retried, skipped],
            &[("agent-a", 1.0)],
        );
        // A test whose worker died before any report still has a result, and its duration.
        store.write(Write::TestResult {
            run_id: "run-1".into(),
            test_index: 3,
            nodeid: "t.py::test_crashed".into(),
            outcome: "failed".into(),
            duration: 4.0,
            attempts: 1,
            lease: 4,
            agent_id: "agent-a".into(),
            worker: 0,
        });
        // Reports of another run do not count for this one.
        write_reports(
            &store,
            "run-0",
            0,
            1,
            &Attempt::new("t.py::test_fast", 0.0, 9.0, 9.0),
        );
        store.write(Write::RecordHistory {
            project: PROJECT.into(),
            run_id: "run-1".into(),
            speeds: HashMap::from([("agent-a".to_string(), 1.0)]),
        });
        store.flush().await.expect("flush");

        let history = store.load_history(PROJECT).await.expect("load");
        assert_eq!(history.tests.len(), 4, "{:?}", history.tests);
        assert_close(history.tests.get("t.py::test_fast"), 0.45, "fast");
        assert_close(history.tests.get("t.py::test_retried"), 2.0, "retried");
        // Skipped tests are recorded too: cheap is true information.
        assert_close(history.tests.get("t.py::test_skipped"), 0.001, "skipped");
        assert_close(history.tests.get("t.py::test_crashed"), 4.0, "crashed");
        // The run was recorded twice, so each test has two samples.
        assert_eq!(samples_of(&path, "test", "t.py::test_fast"), [0.45, 0.45]);
        store.close().await.expect("close");
    }

    #[tokio::test]
    async fn the_median_of_recent_runs_ignores_one_outlier_and_keeps_five_samples() {
        let (_dir, path) = temp_db();
        let store = Store::open(&path).expect("open");
        let speeds = [("agent-a", 1.0)];
        for (run, seconds) in [("run-1", 1.0), ("run-2", 9.0), ("run-3", 1.2)] {
            let test = Attempt::new("t.py::test_x", 0.0, 0.0, seconds);
            write_run(&store, run, &[test], &speeds);
        }
        store.flush().await.expect("flush");
        let history = store.load_history(PROJECT).await.expect("load");
        assert_close(
            history.tests.get("t.py::test_x"),
            1.2,
            "median of 1.0, 9.0, 1.2",
        );
        assert_eq!(samples_of(&path, "test", "t.py::test_x"), [1.0, 9.0, 1.2]);

        // Four more runs: only the five newest samples are kept, newest last.
        for (run, seconds) in [("r4", 3.0), ("r5", 3.5), ("r6", 4.0), ("r7", 4.5)] {
            let test = Attempt::new("t.py::test_x", 0.0, 0.0, seconds);
            write_run(&store, run, &[test], &speeds);
        }
        store.flush().await.expect("flush");
        assert_eq!(
            samples_of(&path, "test", "t.py::test_x"),
            [1.2, 3.0, 3.5, 4.0, 4.5]
        );
        let history = store.load_history(PROJECT).await.expect("load");
        assert_close(
            history.tests.get("t.py::test_x"),
            3.5,
            "median of the last five",
        );
        store.close().await.expect("close");
    }

    #[tokio::test]
    async fn durations_are_normalised_by_the_speed_of_the_agent_that_ran_them() {
        let (_dir, path) = temp_db();
        let store = Store::open(&path).expect("open");
        // An agent missing from the run's speeds counts at the speed it connected with.
        store.write(Write::AgentConnected {
            agent_id: "agent-slow".into(),
            hostname: "old-box".into(),
            fly_version: "0.1.0".into(),
            protocol_version: 1,
            workers: 1,
            topology: fly_common::proto::Topology::default(),
            labels: vec![],
            workdir: "/w".into(),
            python: "python3".into(),
            connected_at: 1.0,
            speed: 0.5,
        });
        let tests = [
            Attempt {
                agent: "agent-fast",
                ..Attempt::new("t.py::test_on_fast", 0.0, 0.25, 1.0)
            },
            Attempt {
                agent: "agent-slow",
                ..Attempt::new("t.py::test_on_slow", 0.0, 0.0, 4.0)
            },
            Attempt {
                agent: "agent-unknown",
                ..Attempt::new("t.py::test_on_unknown", 0.0, 0.0, 3.0)
            },
        ];
        write_run(&store, "run-1", &tests, &[("agent-fast", 2.0)]);
        store.flush().await.expect("flush");
        let history = store.load_history(PROJECT).await.expect("load");
        // 1.25 s on a machine twice as fast as the reference is 2.5 reference seconds.
        assert_close(history.tests.get("t.py::test_on_fast"), 2.5, "speed 2.0");
        assert_close(history.tests.get("t.py::test_on_slow"), 2.0, "speed 0.5");
        assert_close(history.tests.get("t.py::test_on_unknown"), 3.0, "no speed");
        store.close().await.expect("close");
    }

    #[tokio::test]
    async fn an_expensive_module_fixture_shows_as_its_scopes_cost() {
        let (_dir, path) = temp_db();
        let store = Store::open(&path).expect("open");
        // Worker 0 runs pkg/test_a.py, whose module fixture takes 0.3 s in its first test's
        // setup; worker 1 runs the class TestX (a 0.05 s class fixture) and then a cheap module.
        let mut tests = Vec::new();
        for i in 0..5 {
            let setup = if i == 0 { 0.3 } else { 0.001 };
            tests.push((format!("pkg/test_a.py::test_{i}"), 0, f64::from(i), setup));
        }
        for i in 0..3 {
            let setup = if i == 0 { 0.05 } else { 0.001 };
            tests.push((
                format!("pkg/test_b.py::TestX::test_{i}"),
                1,
                f64::from(i),
                setup,
            ));
        }
        for i in 0..3 {
            tests.push((
                format!("pkg/test_c.py::test_{i}"),
                1,
                f64::from(10 + i),
                0.001,
            ));
        }
        let attempts: Vec<Attempt> = tests
            .iter()
            .map(|(nodeid, worker, start, setup)| Attempt {
                worker: *worker,
                ..Attempt::new(nodeid, *start, *setup, 0.01)
            })
            .collect();
        write_run(&store, "run-1", &attempts, &[("agent-a", 1.0)]);
        store.flush().await.expect("flush");

        let history = store.load_history(PROJECT).await.expect("load");
        assert_close(history.scopes.get("pkg/test_a.py"), 0.299, "module a");
        assert_close(
            history.scopes.get("pkg/test_b.py::TestX"),
            0.049,
            "class TestX",
        );
        // The class opens its module's run, so the module carries the same cost.
        assert_close(history.scopes.get("pkg/test_b.py"), 0.049, "module b");
        assert_close(history.scopes.get("pkg/test_c.py"), 0.0, "cheap module");
        assert_eq!(history.scopes.len(), 4, "{:?}", history.scopes);
        // The test that paid for the fixture carries it in its own duration as well.
        assert_close(
            history.tests.get("pkg/test_a.py::test_0"),
            0.31,
            "first test",
        );
        assert_close(
            history.tests.get("pkg/test_a.py::test_1"),
            0.011,
            "second test",
        );
        assert_eq!(samples_of(&path, "scope", "pkg/test_a.py"), [0.299]);
        store.close().await.expect("close");
    }

    #[tokio::test]
    async fn an_empty_or_unknown_project_has_no_history() {
        let (_dir, path) = temp_db();
        let store = Store::open(&path).expect("open");
        let history = store.load_history(PROJECT).await.expect("load empty");
        assert_eq!(history, History::default());

        write_run(
            &store,
            "run-1",
            &[Attempt::new("t.py::test_x", 0.0, 0.0, 1.0)],
            &[("agent-a", 1.0)],
        );
        store.flush().await.expect("flush");
        let other = store
            .load_history("other-project")
            .await
            .expect("load other");
        assert_eq!(other, History::default());
        // A run that recorded nothing (no results) adds nothing.
        store.write(Write::RecordHistory {
            project: "other-project".into(),
            run_id: "no-such-run".into(),
            speeds: HashMap::new(),
        });
        store.flush().await.expect("flush");
        let other = store
            .load_history("other-project")
            .await
            .expect("load other");
        assert_eq!(other, History::default());
        store.close().await.expect("close");
    }

    #[tokio::test]
    async fn a_version_1_file_is_migrated_with_its_data_kept() {
        let (_dir, path) = temp_db();
        {
            let conn = Connection::open(&path).expect("create v1");
            conn.execute_batch(schema::MIGRATIONS[0])
                .expect("v1 schema");
            conn.execute_batch(
                "PRAGMA user_version = 1;
                 INSERT INTO runs (id, project, status, pytest_args, created_at)
                     VALUES ('old-run', 'proj', 'passed', '[]', 1.0);
                 INSERT INTO agents (id, hostname, fly_version, protocol_version, workers,
                     logical_cpus, physical_cores, performance_cores, efficiency_cores,
                     threads_per_core, memory_bytes, core_kind_source, os, arch, topology,
                     labels, workdir, python, connected_at)
                     VALUES ('old-agent', 'box', '0.0.9', 1, 2, 4, 2, 2, 0, 2, 1024, 'uniform',
                     'linux', 'x86_64', '{}', '{}', '/w', 'python3', 1.0);
                 INSERT INTO results (run_id, test_index, nodeid, outcome, duration, attempts,
                     lease, agent_id, worker)
                     VALUES ('old-run', 0, 't.py::test_old', 'passed', 0.5, 1, 1, 'old-agent', 0);",
            )
            .expect("v1 data");
        }
        let store = Store::open(&path).expect("open migrates");
        store.flush().await.expect("flush");
        let conn = Connection::open(&path).expect("reader");
        let version: u32 = conn
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .expect("version");
        assert_eq!(version, schema::SCHEMA_VERSION);
        let kept: (String, String, Option<f64>, String) = conn
            .query_row(
                "SELECT r.status, a.hostname, a.speed, s.nodeid
                 FROM runs r, agents a, results s
                 WHERE r.id = 'old-run' AND a.id = 'old-agent' AND s.run_id = 'old-run'",
                [],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
            )
            .expect("old rows");
        assert_eq!(
            kept,
            ("passed".into(), "box".into(), None, "t.py::test_old".into())
        );
        // The old run's results can feed the new tables: its agent has no speed, so 1.0.
        store.write(Write::RecordHistory {
            project: PROJECT.into(),
            run_id: "old-run".into(),
            speeds: HashMap::new(),
        });
        store.flush().await.expect("flush");
        let history = store.load_history(PROJECT).await.expect("load");
        assert_close(history.tests.get("t.py::test_old"), 0.5, "old result");
        store.close().await.expect("close");
    }

    /// Fills `run_id` with `n` results and their three phase reports straight in SQL (the
    /// store's own writes would take far longer than the part under test), 50 tests a module,
    /// spread over 8 workers.
    fn synthetic_run(path: &Path, run_id: &str, n: u32) {
        let conn = Connection::open(path).expect("writer");
        conn.execute_batch("BEGIN").expect("begin");
        conn.execute(
            "WITH RECURSIVE n(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM n WHERE i < ?2 - 1)
             INSERT INTO results (run_id, test_index, nodeid, outcome, duration, attempts, lease,
                 agent_id, worker)
             SELECT ?1, i, printf('pkg/test_%d.py::test_%d', i / 50, i), 'passed', 0.03, 1, i,
                 'agent-a', (i / 50) % 8
             FROM n",
            params![run_id, n],
        )
        .expect("results");
        conn.execute(
            "WITH RECURSIVE n(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM n WHERE i < ?2 - 1),
                 p(phase, k) AS (VALUES ('setup', 0), ('call', 1), ('teardown', 2))
             INSERT INTO reports (run_id, test_index, nodeid, lease, phase, outcome, category,
                 duration, start, stop, agent_id, worker)
             SELECT ?1, i, printf('pkg/test_%d.py::test_%d', i / 50, i), i, phase, 'passed',
                 '', CASE WHEN k = 0 AND i % 50 = 0 THEN 0.2 ELSE 0.01 END, i * 3 + k,
                 i * 3 + k + 1, 'agent-a', (i / 50) % 8
             FROM n, p",
            params![run_id, n],
        )
        .expect("reports");
        conn.execute_batch("COMMIT").expect("commit");
    }

    async fn record_big_run(n: u32) {
        let (_dir, path) = temp_db();
        let store = Store::open(&path).expect("open");
        synthetic_run(&path, "big", n);
        let started = Instant::now();
        store.write(Write::RecordHistory {
            project: PROJECT.into(),
            run_id: "big".into(),
            speeds: HashMap::from([("agent-a".to_string(), 1.0)]),
        });
        store.flush().await.expect("flush");
        let recorded = started.elapsed();
        let started = Instant::now();
        let history = store.load_history(PROJECT).await.expect("load");
        let loaded = started.elapsed();
        eprintln!(
            "recorded the history of a {n}-test run in {:.3} s, read it back in {:.3} s",
            recorded.as_secs_f64(),
            loaded.as_secs_f64()
        );
        assert_eq!(history.tests.len(), n as usize);
        assert_close(history.tests.get("pkg/test_0.py::test_1"), 0.03, "a test");
        assert_eq!(history.scopes.len(), n.div_ceil(50) as usize);
        assert_close(history.scopes.get("pkg/test_0.py"), 0.19, "a module");
        store.close().await.expect("close");
    }

    #[tokio::test]
    async fn recording_a_large_run() {
        record_big_run(100_000).await;
    }

    /// The million-test figure: `cargo test --release -p fly-coordinator --lib
    /// store::history -- --ignored --nocapture`.
    #[tokio::test]
    #[ignore = "slow in debug builds; run with --release to read the figure"]
    async fn recording_a_million_test_run() {
        record_big_run(1_000_000).await;
    }

    /// A project with a million tests must load in well under a second; the time is printed
    /// (run with `--nocapture`, and `--release` for a meaningful figure).
    #[tokio::test]
    async fn loading_a_million_durations() {
        const N: u32 = 1_000_000;
        let (_dir, path) = temp_db();
        let store = Store::open(&path).expect("open");
        {
            let conn = Connection::open(&path).expect("writer");
            conn.execute(
                "WITH RECURSIVE n(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM n WHERE i < ?2 - 1)
                 INSERT INTO durations (project, nodeid, estimate, samples, updated_at)
                 SELECT ?1, printf('tests/pkg_%d/test_mod_%d.py::TestCase::test_case_%d[param-%d]',
                     i / 10000, i / 100, i, i % 7),
                     i / 1000.0, printf('[%f,%f,%f,%f,%f]', 0.1, 0.2, 0.3, 0.4, i / 1000.0), 1.0
                 FROM n",
                params![PROJECT, N],
            )
            .expect("fill durations");
            // Another project's rows are not read.
            conn.execute(
                "INSERT INTO durations VALUES ('other', 'x.py::t', 1.0, '[1.0]', 1.0)",
                [],
            )
            .expect("other project");
        }
        let started = Instant::now();
        let history = store.load_history(PROJECT).await.expect("load");
        let elapsed = started.elapsed();
        eprintln!(
            "loaded {} durations in {:.3} s",
            history.tests.len(),
            elapsed.as_secs_f64()
        );
        assert_eq!(history.tests.len(), N as usize);
        assert_close(
            history
                .tests
                .get("tests/pkg_0/test_mod_12.py::TestCase::test_case_1234[param-2]"),
            1.234,
            "a test",
        );
        assert!(history.scopes.is_empty());
        store.close().await.expect("close");
    }

    fn step(worker: i64, start: f64, nodeid: &str, setup: f64) -> Step<'_> {
        Step {
            agent: 0,
            worker,
            start,
            nodeid,
            setup,
        }
    }

    #[test]
    fn scopes_are_modules_and_innermost_classes() {
        assert_eq!(module_of("pkg/test_a.py::test_x"), "pkg/test_a.py");
        assert_eq!(module_of("pkg/test_a.py::test_p[a::b]"), "pkg/test_a.py");
        assert_eq!(module_of("pkg/test_a.py"), "pkg/test_a.py");
        assert_eq!(class_of("pkg/test_a.py::test_x"), None);
        assert_eq!(class_of("pkg/test_a.py::test_p[a::b::c]"), None);
        assert_eq!(
            class_of("pkg/test_a.py::TestX::test_m[1]"),
            Some("pkg/test_a.py::TestX")
        );
        assert_eq!(
            class_of("pkg/test_a.py::TestX::TestY::test_m"),
            Some("pkg/test_a.py::TestX::TestY")
        );
    }

    #[test]
    fn median_resists_outliers_and_averages_the_middle_pair() {
        assert_eq!(median(&mut []), None);
        assert_eq!(median(&mut [3.0]), Some(3.0));
        assert_eq!(median(&mut [1.0, 100.0, 1.2]), Some(1.2));
        assert_eq!(median(&mut [4.0, 1.0, 3.0, 2.0]), Some(2.5));
    }

    #[test]
    fn fixture_cost_is_charged_to_the_first_test_of_each_run_of_a_scope() {
        // Worker 0 runs a.py in two runs (interleaved with b.py, so a.py's module fixture is set
        // up twice); worker 1 runs the class C of c.py, then a lone test of d.py. Listed out of
        // order: the steps are sorted by start time.
        let mut steps = vec![
            step(0, 3.0, "a.py::t3", 0.5),
            step(0, 0.0, "a.py::t1", 0.4),
            step(0, 1.0, "a.py::t2", 0.01),
            step(0, 2.0, "b.py::t1", 0.01),
            step(0, 2.5, "b.py::t2", 0.01),
            step(0, 4.0, "a.py::t4", 0.02),
            step(0, 5.0, "a.py::t5", 0.02),
            step(1, 0.0, "c.py::C::t1", 1.01),
            step(1, 1.0, "c.py::C::t2", 0.01),
            step(1, 2.0, "c.py::C::t3", 0.01),
            step(1, 3.0, "d.py::t1", 0.21),
        ];
        let samples = scope_samples(&mut steps);
        let rounded: HashMap<&str, f64> = samples
            .iter()
            .map(|(k, v)| (*k, (v * 1000.0).round() / 1000.0))
            .collect();
        // a.py: runs give 0.4 - 0.01 and 0.5 - 0.02; one sample, their median.
        // b.py: nothing to set up. c.py and its class: 1.0 each. d.py alone: 0.21 less the
        // run's median setup (0.02).
        let expected: HashMap<&str, f64> = [
            ("a.py", 0.435),
            ("b.py", 0.0),
            ("c.py", 1.0),
            ("c.py::C", 1.0),
            ("d.py", 0.19),
        ]
        .into_iter()
        .collect();
        assert_eq!(rounded, expected);
    }

    #[test]
    fn a_lone_test_no_slower_than_usual_says_nothing() {
        let mut steps = vec![
            step(0, 0.0, "a.py::t1", 0.1),
            step(0, 1.0, "b.py::t1", 0.1),
            step(0, 2.0, "b.py::t2", 0.1),
        ];
        let samples = scope_samples(&mut steps);
        assert_eq!(samples.get("a.py"), None);
        assert_eq!(samples.get("b.py"), Some(&0.0));
    }
}
