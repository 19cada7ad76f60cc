//! Runs that did not finish: marking those a dead coordinator left "in progress" as
//! interrupted when a store opens, and reading back what an unfinished run recorded, for
//! `run --resume`.
//!
//! Several coordinators may share one database (two `run --local` in one project). Each open
//! store holds a shared `flock(2)` on `<db>-coordinators` ([`Presence`]); the kernel releases
//! it when the process ends, however it ends. A store that can take it exclusively is alone,
//! so every run still in progress in the file was left by a coordinator that is gone; one that
//! cannot leaves such runs alone, since they may be running.
//!
//! A resumed run's own rows hold only what it ran; it names the run it carries on with in
//! `runs.resumed_from`. So the results of a run are those of the whole chain: its own, then
//! those of the run it resumed for tests it did not run, and so on (the newest result of a
//! node id wins).

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::time::Duration;

use fly_common::outcome::Counts;
use fly_common::proto::TestResult;
use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};

use super::results::{add_phase, phase_from_row, trim, PHASE_COLUMNS};
use super::{object_json, schema, StoreError, STATUS_CREATED, STATUS_RUNNING};

/// Status of a run that was cancelled or whose coordinator stopped before it ended.
pub const STATUS_INTERRUPTED: &str = "interrupted";

/// `runs.message` of a run found in progress when a store opens: the coordinator that ran it
/// stopped (crashed, was killed, lost its machine) before the run ended.
pub const COORDINATOR_STOPPED: &str = "the coordinator stopped while this run was in progress";

/// pytest's exit code for an interrupted session, recorded for runs found abandoned.
const INTERRUPTED_EXIT_CODE: i32 = fly_common::exit_code::INTERRUPTED;

/// This process's claim on a database: while it lives, other coordinators opening the file
/// know that someone is using it.
pub(super) struct Presence {
    /// Holds the shared lock; closing it releases the lock.
    _file: Option<std::fs::File>,
}

/// Announces this store on `path`'s presence file and tells whether no other coordinator has
/// the database open. When the presence file cannot be used, the answer is "not alone": runs
/// in progress are better left as they are than wrongly marked interrupted.
pub(super) fn announce(path: &Path) -> (Presence, bool) {
    let mut name = path.as_os_str().to_owned();
    name.push("-coordinators");
    let lock_path = std::path::PathBuf::from(name);
    let file = match std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
    {
        Ok(file) => file,
        Err(err) => {
            tracing::warn!(
                path = %lock_path.display(),
                error = %err,
                "cannot open the file that tells coordinators sharing a database apart; runs \
                 left in progress by a coordinator that stopped are not marked interrupted"
            );
            return (Presence { _file: None }, false);
        }
    };
    let alone = lock(&file, true);
    // Shared from now on, so the next coordinator to open the database sees this one.
    if !lock(&file, false) {
        tracing::warn!(
            path = %lock_path.display(),
            "cannot lock the file that tells coordinators sharing a database apart"
        );
    }
    (Presence { _file: Some(file) }, alone)
}

/// `flock(2)`: exclusive without waiting, or shared (waiting out another store's brief
/// exclusive lock while it opens). True when the lock was taken.
#[cfg(unix)]
fn lock(file: &std::fs::File, exclusive: bool) -> bool {
    use std::os::fd::AsRawFd;
    let operation = if exclusive {
        libc::LOCK_EX | libc::LOCK_NB
    } else {
        libc::LOCK_SH
    };
    loop {
        // SAFETY: flock only takes a lock on a descriptor this function borrows.
        if unsafe { libc::flock(file.as_raw_fd(), operation) } == 0 {
            return true;
        }
        if std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted {
            return false;
        }
    }
}

/// Without `flock(2)`, every coordinator takes itself to be alone.
#[cfg(not(unix))]
fn lock(_file: &std::fs::File, _exclusive: bool) -> bool {
    true
}

/// A recorded run, as `run --resume` needs it.
#[derive(Debug, Clone, Default)]
pub struct RecordedRun {
    /// The full run id (the lookup may have used a prefix).
    pub id: String,
    pub project: String,
    pub status: String,
    pub pytest_args: Vec<String>,
    /// A later run that already carries on with this one, if any.
    pub resumed_by: Option<String>,
    /// The node ids of the run's recorded collection, in order: none when the run ended
    /// before collecting.
    pub collection: Vec<String>,
    /// Tests pytest deselected in the run.
    pub deselected: u32,
    /// How long the run took, from its start to its end (0 when unknown).
    pub wall_seconds: f64,
    /// The final result of every test that has one in this run or in the runs it resumed, by
    /// node id (the newest run's wins). `test_index` is the test's index in the run where it
    /// ran.
    pub results: HashMap<String, TestResult>,
}

/// Why a run cannot be read back.
#[derive(Debug, thiserror::Error)]
pub enum LookupError {
    #[error("there is no run {0} in the database")]
    NotFound(String),
    #[error("{given} matches several runs ({matches}): give more of the run id")]
    Ambiguous { given: String, matches: String },
    #[error(transparent)]
    Store(#[from] StoreError),
}

fn sqlite_err<'a>(
    path: &'a Path,
    action: &'static str,
) -> impl Fn(rusqlite::Error) -> StoreError + 'a {
    move |source| StoreError::Sqlite {
        path: path.to_path_buf(),
        action,
        source,
    }
}

/// Reads the run `given` (a full run id, or a prefix that names one run) and the results of
/// its chain, on a read-only connection.
pub(super) fn load(
    path: &Path,
    given: &str,
    busy_timeout: Duration,
) -> Result<RecordedRun, LookupError> {
    let conn = schema::connect_read_only(path, busy_timeout)?;
    let err = sqlite_err(path, "reading a run to resume");
    let id = resolve(&conn, given).map_err(&err)??;
    let mut run = conn
        .query_row(
            "SELECT id, project, status, pytest_args, coalesce(deselected, 0),
                 coalesce(finished_at - coalesce(started_at, created_at), 0),
                 (SELECT id FROM runs AS later WHERE later.resumed_from = runs.id
                  ORDER BY later.created_at DESC LIMIT 1)
             FROM runs WHERE id = ?1",
            [&id],
            |row| {
                let args: String = row.get(3)?;
                Ok(RecordedRun {
                    id: row.get(0)?,
                    project: row.get(1)?,
                    status: row.get(2)?,
                    // Written by the store itself as a JSON array of strings.
                    pytest_args: serde_json::from_str(&args).unwrap_or_default(),
                    deselected: row.get(4)?,
                    wall_seconds: row.get::<_, f64>(5)?.max(0.0),
                    resumed_by: row.get(6)?,
                    collection: Vec::new(),
                    results: HashMap::new(),
                })
            },
        )
        .map_err(&err)?;
    run.collection = {
        let mut statement = conn
            .prepare("SELECT nodeid FROM run_tests WHERE run_id = ?1 ORDER BY test_index")
            .map_err(&err)?;
        let rows = statement.query_map([&run.id], |r| r.get(0)).map_err(&err)?;
        rows.collect::<rusqlite::Result<_>>().map_err(&err)?
    };
    run.results = chain_results(&conn, &run.id).map_err(&err)?;
    Ok(run)
}

/// The run id `given` names: itself when a run has that id, else the one run whose id starts
/// with it.
fn resolve(conn: &Connection, given: &str) -> rusqlite::Result<Result<String, LookupError>> {
    if given.is_empty() {
        return Ok(Err(LookupError::NotFound(String::new())));
    }
    let exact: Option<String> = conn
        .query_row("SELECT id FROM runs WHERE id = ?1", [given], |r| r.get(0))
        .optional()?;
    if let Some(id) = exact {
        return Ok(Ok(id));
    }
    // substr, not LIKE: a `%` or `_` in what the user typed is not a wildcard.
    let mut statement = conn.prepare(
        "SELECT id FROM runs WHERE substr(id, 1, length(?1)) = ?1 ORDER BY created_at LIMIT 6",
    )?;
    let matches: Vec<String> = statement
        .query_map([given], |r| r.get(0))?
        .collect::<rusqlite::Result<_>>()?;
    Ok(match matches.as_slice() {
        [] => Err(LookupError::NotFound(given.to_string())),
        [one] => Ok(one.clone()),
        many => Err(LookupError::Ambiguous {
            given: given.to_string(),
            matches: many.join(", "),
        }),
    })
}

/// The final results of `run_id` and of the runs it resumed, by node id, the newest winning.
fn chain_results(conn: &Connection, run_id: &str) -> rusqlite::Result<HashMap<String, TestResult>> {
    let mut results: HashMap<String, TestResult> = HashMap::new();
    let mut seen = HashSet::new();
    let mut next = Some(run_id.to_string());
    while let Some(id) = next.take() {
        // fly never writes a cycle, but a hand-edited database must not hang the coordinator.
        if !seen.insert(id.clone()) {
            break;
        }
        for result in run_results(conn, &id)? {
            results.entry(result.nodeid.clone()).or_insert(result);
        }
        next = conn
            .query_row("SELECT resumed_from FROM runs WHERE id = ?1", [&id], |r| {
                r.get::<_, Option<String>>(0)
            })
            .optional()?
            .flatten();
    }
    Ok(results)
}

/// The results one run recorded itself, each with the phase reports of the attempt that
/// counts, trimmed as the dispatcher trims what it streams: tracebacks of failures, errors
/// and skips, captured output of failures and errors.
fn run_results(conn: &Connection, run_id: &str) -> rusqlite::Result<Vec<TestResult>> {
    let mut by_index: HashMap<i64, (u64, TestResult)> = HashMap::new();
    let mut statement = conn.prepare(
        "SELECT test_index, nodeid, outcome, duration, attempts, lease, agent_id, worker
         FROM results WHERE run_id = ?1",
    )?;
    let rows = statement.query_map([run_id], |row| {
        let index: i64 = row.get(0)?;
        let lease: i64 = row.get(5)?;
        Ok((
            index,
            lease as u64,
            TestResult {
                test_index: u32::try_from(index).unwrap_or(u32::MAX),
                nodeid: row.get(1)?,
                outcome: row.get(2)?,
                duration: row.get(3)?,
                attempts: row.get(4)?,
                agent_id: row.get(6)?,
                worker: row.get(7)?,
                phases: Vec::new(),
                ..Default::default()
            },
        ))
    })?;
    for row in rows {
        let (index, lease, result) = row?;
        by_index.insert(index, (lease, result));
    }
    if by_index.is_empty() {
        return Ok(Vec::new());
    }
    // A run's reports lie in one stretch of ids: scanning it in order beats an index search
    // per row (see `history::RUN_REPORTS`).
    let (first, last): (Option<i64>, Option<i64>) = conn.query_row(
        "SELECT min(id), max(id) FROM reports WHERE run_id = ?1",
        [run_id],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )?;
    let (Some(first), Some(last)) = (first, last) else {
        // Results without a single report: each counts as an error.
        return Ok(by_index.into_values().map(|(_, r)| r).collect());
    };
    let mut statement = conn.prepare(&format!(
        "SELECT test_index, lease, {PHASE_COLUMNS}
         FROM reports WHERE id BETWEEN ?2 AND ?3 AND +run_id = ?1 ORDER BY id"
    ))?;
    let rows = statement.query_map(params![run_id, first, last], |row| {
        let index: i64 = row.get(0)?;
        let lease: i64 = row.get(1)?;
        Ok((index, lease as u64, phase_from_row(row, 2)?))
    })?;
    for row in rows {
        let (index, lease, phase) = row?;
        // Only the attempt that counts.
        match by_index.get_mut(&index) {
            Some((counted, result)) if *counted == lease => add_phase(result, phase),
            _ => {}
        }
    }
    let mut results: Vec<TestResult> = by_index.into_values().map(|(_, r)| r).collect();
    for result in &mut results {
        trim(result);
    }
    results.sort_by_key(|r| r.test_index);
    Ok(results)
}

/// What a result adds to pytest's counts: the category of each of its phase reports, or one
/// error for a test that finished without any report (as the dispatcher counted it).
pub fn count_result(counts: &mut Counts, result: &TestResult) {
    if result.phases.is_empty() {
        counts.add("error", 1);
    }
    for phase in &result.phases {
        counts.add(&phase.category, 1);
    }
}

/// Marks every run still `created` or `running` as interrupted: whoever opens the store is
/// the coordinator now, and the one that ran those runs is gone. Each gets exit code 2, the
/// counts of the results it (and the runs it resumed) recorded for its collection, a finish
/// time of its last report (else its start), and [`COORDINATOR_STOPPED`] as its message.
/// Returns their ids.
pub(super) fn mark_abandoned(
    conn: &mut Connection,
    path: &Path,
) -> Result<Vec<String>, StoreError> {
    let err = sqlite_err(path, "marking runs left in progress as interrupted");
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(&err)?;
    let abandoned: Vec<(String, Option<i64>)> = {
        let mut statement = tx
            .prepare("SELECT id, deselected FROM runs WHERE status IN (?1, ?2)")
            .map_err(&err)?;
        let rows = statement
            .query_map(params![STATUS_CREATED, STATUS_RUNNING], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })
            .map_err(&err)?;
        rows.collect::<rusqlite::Result<_>>().map_err(&err)?
    };
    for (id, deselected) in &abandoned {
        let collection: HashSet<String> = {
            let mut statement = tx
                .prepare("SELECT nodeid FROM run_tests WHERE run_id = ?1")
                .map_err(&err)?;
            let rows = statement.query_map([id], |r| r.get(0)).map_err(&err)?;
            rows.collect::<rusqlite::Result<_>>().map_err(&err)?
        };
        let mut counts = Counts::default();
        for (nodeid, result) in chain_results(&tx, id).map_err(&err)? {
            if collection.contains(&nodeid) {
                count_result(&mut counts, &result);
            }
        }
        counts.add(
            "deselected",
            deselected.and_then(|d| u32::try_from(d).ok()).unwrap_or(0),
        );
        tx.execute(
            "UPDATE runs SET status = ?2, exit_code = ?3, counts = ?4, message = ?5,
                 finished_at = coalesce(
                     (SELECT max(stop) FROM reports WHERE run_id = ?1 AND stop > 0),
                     started_at, created_at)
             WHERE id = ?1",
            params![
                id,
                STATUS_INTERRUPTED,
                INTERRUPTED_EXIT_CODE,
                object_json(&counts.ordered()),
                COORDINATOR_STOPPED
            ],
        )
        .map_err(&err)?;
    }
    tx.commit().map_err(&err)?;
    Ok(abandoned.into_iter().map(|(id, _)| id).collect())
}

#[cfg(test)]
mod tests {

    use fly_common::outcome::Phase;
    use fly_common::proto::{CollectedTest, PhaseReport, Section};

    use crate::collection::Collection;
    use rusqlite::Connection;

    use super::super::{Store, Write};
    use super::*;

    fn temp_db() -> (tempfile::TempDir, std::path::PathBuf) {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("fly.sqlite");
        (dir, path)
    }

    fn created(run_id: &str, created_at: f64) -> Write {
        Write::RunCreated {
            run_id: run_id.into(),
            project: "proj".into(),
            pytest_args: vec!["-q".into(), "tests".into()],
            client_cwd: String::new(),
            created_at,
        }
    }

    fn collected(run_id: &str, nodeids: &[&str]) -> Write {
        Write::RunCollected {
            run_id: run_id.into(),
            tests: std::sync::Arc::new(Collection::from(
                nodeids
                    .iter()
                    .map(|n| CollectedTest {
                        nodeid: (*n).into(),
                        file: "t.py".into(),
                        ..Default::default()
                    })
                    .collect::<Vec<_>>()
                    .as_slice(),
            )),
            deselected: 1,
        }
    }

    /// The reports and the result of one test that ran with `lease`: `call` is its call
    /// phase's category.
    fn ran(run_id: &str, index: u32, nodeid: &str, lease: u64, call: &str) -> Vec<Write> {
        let report = |phase: Phase, category: &str, longrepr: &str| Write::Report {
            run_id: run_id.into(),
            nodeid: nodeid.into(),
            agent_id: "agent".into(),
            worker: 0,
            superseded: false,
            report: PhaseReport {
                lease,
                test_index: index,
                phase: phase.to_proto() as i32,
                outcome: if category == "failed" {
                    "failed"
                } else {
                    "passed"
                }
                .into(),
                category: category.into(),
                duration: 0.5,
                start: 5000.0,
                stop: 5000.5 + f64::from(index),
                longrepr: longrepr.into(),
                sections: vec![Section {
                    name: "Captured stdout call".into(),
                    text: "out\n".into(),
                }],
                message: String::new(),
            },
        };
        vec![
            report(Phase::Setup, "", ""),
            report(Phase::Call, call, "assert 1 == 2"),
            report(Phase::Teardown, "", ""),
            Write::TestResult {
                run_id: run_id.into(),
                test_index: index,
                nodeid: nodeid.into(),
                outcome: call.into(),
                duration: 1.5,
                attempts: 1,
                lease,
                agent_id: "agent".into(),
                worker: 0,
            },
        ]
    }

    async fn write_all(store: &Store, writes: Vec<Write>) {
        for w in writes {
            store.write(w);
        }
        store.flush().await.expect("flush");
    }

    fn run_row(
        path: &Path,
        id: &str,
    ) -> (
        String,
        Option<i64>,
        Option<String>,
        Option<String>,
        Option<f64>,
    ) {
        let conn = Connection::open(path).expect("reader");
        conn.query_row(
            "SELECT status, exit_code, counts, message, finished_at FROM runs WHERE id = ?1",
            [id],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?)),
        )
        .expect("run row")
    }

    #[tokio::test]
    async fn runs_left_in_progress_are_marked_interrupted_when_a_store_opens() {
        let (_dir, path) = temp_db();
        let store = Store::open(&path).expect("open");
        let mut writes = vec![
            created("never-started", 1000.0),
            created("half-done", 1001.0),
            Write::RunStarted {
                run_id: "half-done".into(),
                started_at: 1002.0,
            },
            collected("half-done", &["t.py::a", "t.py::b", "t.py::c"]),
            created("finished", 1003.0),
            Write::RunFinished {
                run_id: "finished".into(),
                status: "passed".into(),
                exit_code: 0,
                finished_at: 1004.0,
                counts: vec![("passed".into(), 3)],
                message: String::new(),
            },
        ];
        writes.extend(ran("half-done", 0, "t.py::a", 1, "passed"));
        writes.extend(ran("half-done", 2, "t.py::c", 3, "failed"));
        write_all(&store, writes).await;
        // The coordinator dies here: nothing marks the runs finished.
        drop(store);

        let store = Store::open(&path).expect("reopen");
        store.close().await.expect("close");
        let (status, code, counts, message, finished_at) = run_row(&path, "half-done");
        assert_eq!(status, STATUS_INTERRUPTED);
        assert_eq!(code, Some(2));
        assert_eq!(message.as_deref(), Some(COORDINATOR_STOPPED));
        let counts: serde_json::Value =
            serde_json::from_str(&counts.expect("counts")).expect("json");
        assert_eq!(
            counts,
            serde_json::json!({"passed": 1, "failed": 1, "deselected": 1})
        );
        // When it was last heard of: its last report.
        assert_eq!(finished_at, Some(5002.5));

        let (status, code, counts, message, finished_at) = run_row(&path, "never-started");
        assert_eq!(status, STATUS_INTERRUPTED);
        assert_eq!(code, Some(2));
        assert_eq!(counts.as_deref(), Some("{}"));
        assert_eq!(message.as_deref(), Some(COORDINATOR_STOPPED));
        assert_eq!(finished_at, Some(1000.0));

        // A finished run is left as it was.
        let (status, code, _, message, finished_at) = run_row(&path, "finished");
        assert_eq!((status.as_str(), code), ("passed", Some(0)));
        assert_eq!(message, None);
        assert_eq!(finished_at, Some(1004.0));
    }

    #[tokio::test]
    async fn a_run_in_progress_is_left_alone_while_another_coordinator_has_the_database_open() {
        let (_dir, path) = temp_db();
        let running = Store::open(&path).expect("open");
        write_all(&running, vec![created("live", 1000.0)]).await;

        // A second coordinator on the same file: the run may be running, so it stays as is.
        let second = Store::open(&path).expect("open beside the first");
        second.close().await.expect("close");
        assert_eq!(run_row(&path, "live").0, STATUS_CREATED);

        // Once the first is gone (its process died: the kernel drops its lock), the next one
        // to open the file marks the run.
        drop(running);
        let third = Store::open(&path).expect("open alone");
        third.close().await.expect("close");
        assert_eq!(run_row(&path, "live").0, STATUS_INTERRUPTED);
    }

    #[tokio::test]
    async fn a_run_reads_back_with_the_results_of_the_runs_it_resumed() {
        let (_dir, path) = temp_db();
        let store = Store::open(&path).expect("open");
        let mut writes = vec![
            created("aaaa-first", 1000.0),
            collected("aaaa-first", &["t.py::a", "t.py::b", "t.py::c"]),
            created("bbbb-second", 1001.0),
            Write::RunResumed {
                run_id: "bbbb-second".into(),
                resumed_from: "aaaa-first".into(),
            },
            collected("bbbb-second", &["t.py::a", "t.py::b", "t.py::c"]),
        ];
        writes.extend(ran("aaaa-first", 0, "t.py::a", 1, "passed"));
        // Ran again in the second run: the newer result wins.
        writes.extend(ran("aaaa-first", 1, "t.py::b", 2, "passed"));
        writes.extend(ran("bbbb-second", 1, "t.py::b", 7, "failed"));
        write_all(&store, writes).await;

        let second = store
            .load_run("bbbb")
            .await
            .expect("a prefix names the run");
        assert_eq!(second.id, "bbbb-second");
        assert_eq!(second.project, "proj");
        assert_eq!(second.pytest_args, vec!["-q", "tests"]);
        assert_eq!(second.collection, vec!["t.py::a", "t.py::b", "t.py::c"]);
        assert_eq!(second.deselected, 1);
        assert_eq!(second.resumed_by, None);
        let mut nodeids: Vec<&String> = second.results.keys().collect();
        nodeids.sort();
        assert_eq!(nodeids, ["t.py::a", "t.py::b"]);
        let a = &second.results["t.py::a"];
        assert_eq!(a.outcome, "passed");
        assert_eq!(a.phases.len(), 3);
        // A passing test keeps neither its traceback nor its output, as the live run sends it.
        assert!(a
            .phases
            .iter()
            .all(|p| p.longrepr.is_empty() && p.sections.is_empty()));
        let b = &second.results["t.py::b"];
        assert_eq!(b.outcome, "failed");
        let call = b
            .phases
            .iter()
            .find(|p| p.phase == Phase::Call.to_proto() as i32)
            .expect("call phase");
        assert_eq!(call.longrepr, "assert 1 == 2");
        assert_eq!(call.sections.len(), 1);
        let mut counts = Counts::default();
        for result in second.results.values() {
            count_result(&mut counts, result);
        }
        assert_eq!(
            counts.ordered(),
            vec![("failed".into(), 1), ("passed".into(), 1)]
        );

        let first = store.load_run("aaaa-first").await.expect("by id");
        assert_eq!(first.resumed_by.as_deref(), Some("bbbb-second"));
        assert_eq!(first.results["t.py::b"].outcome, "passed");

        let missing = store.load_run("cccc").await.expect_err("no such run");
        assert!(matches!(missing, LookupError::NotFound(_)), "{missing:?}");
        store.write(created("bbbb-third", 1002.0));
        store.flush().await.expect("flush");
        let ambiguous = store.load_run("bbbb").await.expect_err("two runs match");
        assert!(
            ambiguous.to_string().contains("bbbb-second")
                && ambiguous.to_string().contains("bbbb-third"),
            "{ambiguous}"
        );
        store.close().await.expect("close");
    }
}
