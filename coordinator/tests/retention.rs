//! Retention (`serve --retain-days`, `--retain-size`) against a real SQLite store: old runs'
//! reports go, recent and running runs and the duration history stay, the size cap prunes the
//! oldest runs first and keeps the file from growing, and a prune never holds up the writes of
//! the runs going on meanwhile.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fly_common::proto::{CollectedTest, Phase, PhaseReport, Section, Topology};
use fly_coordinator::store::{PruneSummary, Retention, Store, StoreConfig, Write};
use rusqlite::types::Value;
use rusqlite::Connection;

const DAY: f64 = 24.0 * 60.0 * 60.0;
const PROJECT: &str = "proj";
const AGENT: &str = "agent-a";

fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs_f64()
}

fn days(n: u64) -> Retention {
    Retention {
        max_age: Some(Duration::from_secs(n * 86_400)),
        max_bytes: None,
    }
}

fn size_cap(bytes: u64) -> Retention {
    Retention {
        max_age: None,
        max_bytes: Some(bytes),
    }
}

fn temp_db() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("fly.db");
    (dir, path)
}

fn open(path: &Path, prune_chunk: usize) -> Store {
    Store::open_with(
        path,
        StoreConfig {
            prune_chunk,
            ..StoreConfig::default()
        },
    )
    .expect("open store")
}

/// A run as the dispatcher records it.
struct Run<'a> {
    id: &'a str,
    created_at: f64,
    /// None: still running.
    finished_at: Option<f64>,
    tests: u32,
    resumed_from: Option<&'a str>,
    /// Bytes of captured output per call report, to give runs some bulk.
    output: usize,
}

impl<'a> Run<'a> {
    fn finished(id: &'a str, finished_at: f64, tests: u32) -> Run<'a> {
        Run {
            id,
            created_at: finished_at - 60.0,
            finished_at: Some(finished_at),
            tests,
            resumed_from: None,
            output: 64,
        }
    }
}

fn connect_agent(store: &Store) {
    store.write(Write::AgentConnected {
        agent_id: AGENT.into(),
        hostname: "box1".into(),
        fly_version: "0.1.0".into(),
        protocol_version: 1,
        workers: 2,
        topology: Topology {
            logical_cpus: 4,
            physical_cores: 2,
            ..Topology::default()
        },
        labels: vec![],
        workdir: "/srv/work".into(),
        python: "python3".into(),
        connected_at: now() - 50.0 * DAY,
        speed: 1.0,
    });
}

fn nodeid(index: u32) -> String {
    format!("tests/test_mod{}.py::test_{index}", index % 3)
}

/// Writes everything a run records: creation, collection, agents, three phase reports and a
/// result per test, the end and the duration history (these last two only once finished).
fn write_run(store: &Store, run: &Run) {
    store.write(Write::RunCreated {
        run_id: run.id.into(),
        project: PROJECT.into(),
        pytest_args: vec!["-q".into()],
        client_cwd: "/src/proj".into(),
        created_at: run.created_at,
    });
    if let Some(from) = run.resumed_from {
        store.write(Write::RunResumed {
            run_id: run.id.into(),
            resumed_from: from.into(),
        });
    }
    store.write(Write::RunStarted {
        run_id: run.id.into(),
        started_at: run.created_at + 1.0,
    });
    let tests: Vec<CollectedTest> = (0..run.tests)
        .map(|i| CollectedTest {
            nodeid: nodeid(i),
            file: format!("tests/test_mod{}.py", i % 3),
            line: i + 1,
            ..CollectedTest::default()
        })
        .collect();
    store.write(Write::RunCollected {
        run_id: run.id.into(),
        tests: std::sync::Arc::new(fly_coordinator::collection::Collection::from(
            tests.as_slice(),
        )),
        deselected: 0,
    });
    store.write(Write::RunAgent {
        run_id: run.id.into(),
        agent_id: AGENT.into(),
        workers: 2,
        accepted: true,
        reason: String::new(),
    });
    let mut clock = run.created_at + 2.0;
    for i in 0..run.tests {
        for phase in [Phase::Setup, Phase::Call, Phase::Teardown] {
            // The first test of each module pays for its module's fixtures.
            let duration = if phase == Phase::Setup && i < 3 {
                0.5
            } else {
                0.01
            };
            let call = phase == Phase::Call;
            store.write(Write::Report {
                run_id: run.id.into(),
                nodeid: nodeid(i),
                agent_id: AGENT.into(),
                worker: i % 2,
                superseded: false,
                report: PhaseReport {
                    lease: u64::from(i) + 1,
                    test_index: i,
                    phase: phase as i32,
                    outcome: "passed".into(),
                    category: if call { "passed" } else { "" }.into(),
                    duration,
                    start: clock,
                    stop: clock + duration,
                    sections: if call {
                        vec![Section {
                            name: "Captured stdout call".into(),
                            text: "x".repeat(run.output),
                        }]
                    } else {
                        vec![]
                    },
                    ..PhaseReport::default()
                },
            });
            clock += duration;
        }
        if run.finished_at.is_some() {
            store.write(Write::TestResult {
                run_id: run.id.into(),
                test_index: i,
                nodeid: nodeid(i),
                outcome: "passed".into(),
                duration: 0.02,
                attempts: 1,
                lease: u64::from(i) + 1,
                agent_id: AGENT.into(),
                worker: i % 2,
            });
        }
    }
    if let Some(finished_at) = run.finished_at {
        store.write(Write::RunFinished {
            run_id: run.id.into(),
            status: "passed".into(),
            exit_code: 0,
            finished_at,
            counts: vec![("passed".into(), run.tests)],
            message: format!("{} passed", run.tests),
        });
        store.write(Write::RecordHistory {
            project: PROJECT.into(),
            run_id: run.id.into(),
            speeds: [(AGENT.to_string(), 1.0)].into(),
        });
    }
}

fn reader(path: &Path) -> Connection {
    Connection::open(path).expect("open reader")
}

fn count(conn: &Connection, sql: &str, run: &str) -> i64 {
    conn.query_row(sql, [run], |row| row.get(0)).expect(sql)
}

/// The rows each table holds for the run: reports, results, run_tests, run_agents.
fn rows_of(conn: &Connection, run: &str) -> [i64; 4] {
    ["reports", "results", "run_tests", "run_agents"].map(|table| {
        count(
            conn,
            &format!("SELECT count(*) FROM {table} WHERE run_id = ?1"),
            run,
        )
    })
}

/// Every row of a table, every column, in key order.
fn snapshot(conn: &Connection, table: &str) -> Vec<Vec<Value>> {
    let mut stmt = conn
        .prepare(&format!("SELECT * FROM {table} ORDER BY 1, 2"))
        .expect("prepare snapshot");
    let columns = stmt.column_count();
    stmt.query_map([], |row| (0..columns).map(|i| row.get(i)).collect())
        .expect("query snapshot")
        .collect::<Result<_, _>>()
        .expect("rows")
}

/// The run's summary row as `fly-coordinator runs` lists it, and whether it is marked pruned.
fn summary_row(conn: &Connection, run: &str) -> (String, Option<i64>, Option<String>, bool) {
    conn.query_row(
        "SELECT status, exit_code, counts, pruned_at IS NOT NULL FROM runs WHERE id = ?1",
        [run],
        |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
    )
    .expect("runs row")
}

fn page_count(conn: &Connection) -> i64 {
    conn.pragma_query_value(None, "page_count", |row| row.get(0))
        .expect("page_count")
}

#[tokio::test]
async fn retention_removes_old_reports_and_keeps_history() {
    let (_dir, path) = temp_db();
    // A small chunk: the prune takes many steps and stops in the middle of runs.
    let store = open(&path, 7);
    let now = now();
    connect_agent(&store);
    write_run(&store, &Run::finished("old-1", now - 41.0 * DAY, 12));
    write_run(&store, &Run::finished("old-2", now - 40.0 * DAY, 12));
    // Old, but `recent-resume` carries on with it: `run --resume` needs its results.
    write_run(&store, &Run::finished("old-resumed", now - 39.0 * DAY, 12));
    write_run(
        &store,
        &Run {
            resumed_from: Some("old-resumed"),
            ..Run::finished("recent-resume", now - DAY, 12)
        },
    );
    write_run(&store, &Run::finished("recent", now - 2.0 * DAY, 12));
    // Created long ago and still going: never pruned.
    write_run(
        &store,
        &Run {
            finished_at: None,
            ..Run::finished("running", now - 45.0 * DAY, 12)
        },
    );
    store.flush().await.expect("flush");

    let conn = reader(&path);
    let durations = snapshot(&conn, "durations");
    let scope_costs = snapshot(&conn, "scope_costs");
    let agents = snapshot(&conn, "agents");
    assert_eq!(durations.len(), 12, "one duration per test");
    assert!(!scope_costs.is_empty(), "fixture costs were recorded");
    let kept = ["old-resumed", "recent-resume", "recent", "running"];
    let before: Vec<[i64; 4]> = kept.iter().map(|run| rows_of(&conn, run)).collect();
    let old_summaries: Vec<_> = ["old-1", "old-2"]
        .iter()
        .map(|run| summary_row(&conn, run))
        .collect();

    let summary = store.prune(days(30)).await.expect("prune");
    assert_eq!(summary.runs, 2, "{summary:?}");
    // 12 tests: 36 reports, 12 results, 12 collected tests, 1 agent per run.
    assert_eq!(summary.rows, 2 * (36 + 12 + 12 + 1), "{summary:?}");
    assert!(summary.complete && summary.steps > 1, "{summary:?}");

    for (run, old) in ["old-1", "old-2"].iter().zip(old_summaries) {
        assert_eq!(rows_of(&conn, run), [0, 0, 0, 0], "{run}'s rows are gone");
        // Its summary stays for `fly-coordinator runs`, marked pruned.
        let (status, code, counts, pruned) = summary_row(&conn, run);
        assert_eq!((status, code, counts), (old.0, old.1, old.2));
        assert!(pruned, "{run} is marked pruned");
        assert_eq!(
            count(&conn, "SELECT count(*) FROM runs WHERE id = ?1", run),
            1
        );
    }
    for (run, rows) in kept.iter().zip(&before) {
        assert_eq!(&rows_of(&conn, run), rows, "{run} is intact");
        assert!(!summary_row(&conn, run).3, "{run} is not marked pruned");
    }
    assert_eq!(before[3], [36, 0, 12, 1], "the running run had its reports");
    assert_eq!(snapshot(&conn, "durations"), durations);
    assert_eq!(snapshot(&conn, "scope_costs"), scope_costs);
    assert_eq!(snapshot(&conn, "agents"), agents);

    // The history still plans the next run.
    let history = store.load_history(PROJECT).await.expect("history");
    assert_eq!(history.tests.len(), 12);

    // Nothing more to do; then the resuming run ages out, and the run it resumed with it.
    let again = store.prune(days(30)).await.expect("prune again");
    assert_eq!((again.runs, again.rows), (0, 0), "{again:?}");
    let later = store
        .prune(days(0))
        .await
        .expect("prune everything finished");
    assert_eq!(later.runs, 3, "{later:?}");
    for run in ["old-resumed", "recent-resume", "recent"] {
        assert_eq!(rows_of(&conn, run), [0, 0, 0, 0], "{run}");
    }
    assert_eq!(rows_of(&conn, "running"), before[3]);
    assert_eq!(snapshot(&conn, "durations"), durations);
    store.close().await.expect("close");
}

#[tokio::test]
async fn a_run_that_just_finished_is_kept_until_its_history_can_be_recorded() {
    let (_dir, path) = temp_db();
    let store = open(&path, 5_000);
    connect_agent(&store);
    write_run(&store, &Run::finished("just-now", now() - 5.0, 6));
    store.flush().await.expect("flush");
    let summary = store.prune(days(0)).await.expect("prune");
    assert_eq!(summary.runs, 0, "{summary:?}");
    let summary = store.prune(size_cap(1)).await.expect("prune to nothing");
    assert_eq!(summary.runs, 0, "{summary:?}");
    assert!(summary.over_size_cap, "{summary:?}");
    assert_eq!(rows_of(&reader(&path), "just-now"), [18, 6, 6, 1]);
    store.close().await.expect("close");
}

/// Writes `runs` runs finishing one minute apart from `*clock` on, and returns their ids.
fn write_round(store: &Store, clock: &mut f64, round: usize, runs: usize) -> Vec<String> {
    (0..runs)
        .map(|i| {
            let id = format!("run-{round:02}-{i:02}");
            *clock += 60.0;
            write_run(
                store,
                &Run {
                    output: 400,
                    ..Run::finished(&id, *clock, 100)
                },
            );
            id
        })
        .collect()
}

#[tokio::test]
async fn the_size_cap_prunes_the_oldest_runs_and_the_file_stops_growing() {
    let (_dir, path) = temp_db();
    let store = open(&path, 5_000);
    connect_agent(&store);
    let conn = reader(&path);
    // A month ago, one minute per run: all well past the grace for recent runs.
    let mut clock = now() - 30.0 * DAY;
    const RUNS: usize = 10;

    let mut order = write_round(&store, &mut clock, 0, RUNS);
    store.flush().await.expect("flush");
    let full: PruneSummary = store.prune(size_cap(u64::MAX)).await.expect("no-op prune");
    assert_eq!(full.runs, 0);
    // Keep about half of what ten runs take.
    let cap = full.used_after / 2;
    let summary = store.prune(size_cap(cap)).await.expect("prune to the cap");
    assert!(summary.used_after <= cap, "{summary:?} cap {cap}");
    assert!(!summary.over_size_cap, "{summary:?}");
    assert!(
        (3..=7).contains(&summary.runs),
        "about half the runs go: {summary:?}"
    );
    let pruned = |conn: &Connection| -> Vec<String> {
        let mut stmt = conn
            .prepare("SELECT id FROM runs WHERE pruned_at IS NOT NULL ORDER BY finished_at")
            .expect("prepare");
        stmt.query_map([], |r| r.get(0))
            .expect("query")
            .collect::<Result<_, _>>()
            .expect("rows")
    };
    // The oldest went, and only they.
    assert_eq!(pruned(&conn), order[..summary.runs as usize].to_vec());
    for run in &order[summary.runs as usize..] {
        assert_eq!(rows_of(&conn, run), [300, 100, 100, 1], "{run} is intact");
    }

    // The same volume again, round after round: freed pages are reused, so once the file has
    // room for the cap plus a round it stops growing.
    let mut pages = Vec::new();
    for round in 1..=4 {
        order.extend(write_round(&store, &mut clock, round, RUNS));
        store.flush().await.expect("flush");
        let summary = store.prune(size_cap(cap)).await.expect("prune");
        assert!(summary.used_after <= cap, "round {round}: {summary:?}");
        let pruned = pruned(&conn);
        assert_eq!(pruned, order[..pruned.len()].to_vec(), "oldest first");
        pages.push(page_count(&conn));
    }
    eprintln!("page count after each round: {pages:?}");
    let settled = pages[1];
    assert!(
        pages[2..].iter().all(|&p| p <= settled + settled / 50),
        "the file keeps growing: pages after each round {pages:?}"
    );
    assert_eq!(
        snapshot(&conn, "durations").len(),
        100,
        "the history of every test stays"
    );
    store.close().await.expect("close");
}

#[tokio::test]
async fn runs_in_progress_are_never_pruned_even_over_the_size_cap() {
    let (_dir, path) = temp_db();
    let store = open(&path, 5_000);
    connect_agent(&store);
    write_run(
        &store,
        &Run {
            finished_at: None,
            ..Run::finished("running", now() - 90.0 * DAY, 50)
        },
    );
    write_run(&store, &Run::finished("done", now() - 80.0 * DAY, 50));
    store.flush().await.expect("flush");
    let summary = store
        .prune(Retention {
            max_age: Some(Duration::from_secs(86_400)),
            max_bytes: Some(1),
        })
        .await
        .expect("prune");
    assert_eq!(summary.runs, 1, "{summary:?}");
    assert!(summary.over_size_cap, "{summary:?}");
    let conn = reader(&path);
    assert_eq!(rows_of(&conn, "done"), [0, 0, 0, 0]);
    assert_eq!(rows_of(&conn, "running"), [150, 0, 50, 1]);
    store.close().await.expect("close");
}

/// A run with many reports, pruned in small steps: long enough to act while it is under way.
async fn big_old_run(path: &Path, chunk: usize) -> Store {
    let store = open(path, chunk);
    connect_agent(&store);
    write_run(&store, &Run::finished("big", now() - 60.0 * DAY, 20_000));
    store.flush().await.expect("flush");
    store
}

/// Waits until the prune has deleted some of the big run's reports.
async fn until_under_way(conn: &Connection) {
    while count(
        conn,
        "SELECT count(*) FROM reports WHERE run_id = ?1",
        "big",
    ) == 60_000
    {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_keep_landing_while_a_prune_is_under_way() {
    let (_dir, path) = temp_db();
    let store = big_old_run(&path, 20).await;
    let conn = reader(&path);
    let prune = tokio::spawn(store.prune(days(30)));
    until_under_way(&conn).await;

    // A run going on meanwhile: its reports are committed between the prune's steps.
    write_run(&store, &Run::finished("meanwhile", now(), 5));
    store.flush().await.expect("flush during the prune");
    let left = count(
        &conn,
        "SELECT count(*) FROM reports WHERE run_id = ?1",
        "big",
    );
    eprintln!("reports of the old run left when the flush returned: {left} of 60000");
    assert!(
        left > 0,
        "the flush waited for the whole prune instead of going between its steps"
    );
    assert_eq!(rows_of(&conn, "meanwhile"), [15, 5, 5, 1]);

    let summary = prune.await.expect("task").expect("prune");
    assert!(summary.complete && summary.steps > 100, "{summary:?}");
    assert_eq!(rows_of(&conn, "big"), [0, 0, 0, 0]);
    assert_eq!(rows_of(&conn, "meanwhile"), [15, 5, 5, 1]);
    store.close().await.expect("close");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prune_cut_short_by_closing_is_finished_by_the_next_one() {
    let (_dir, path) = temp_db();
    let store = big_old_run(&path, 20).await;
    let conn = reader(&path);
    let prune = tokio::spawn(store.prune(days(30)));
    until_under_way(&conn).await;
    store.close().await.expect("close during the prune");
    let cut = prune.await.expect("task").expect("prune answers");
    assert!(!cut.complete, "{cut:?}");
    let left = rows_of(&conn, "big");
    assert!(left[0] > 0, "{left:?}");

    // The next prune finishes the run it was deleting, even with a policy that would not pick
    // it now.
    let store = open(&path, 5_000);
    let summary = store.prune(size_cap(u64::MAX)).await.expect("prune");
    assert!(summary.complete, "{summary:?}");
    assert_eq!(rows_of(&conn, "big"), [0, 0, 0, 0]);
    assert!(summary_row(&conn, "big").3);
    store.close().await.expect("close");
}
