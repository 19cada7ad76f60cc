//! The run report and the history commands, against real SQLite databases: the schema is made
//! by the real `Store`, rows are inserted as the coordinator would write them, and every figure
//! the report shows is checked against the same figure computed here, independently, from the
//! rows.

use std::collections::{BTreeMap, HashSet};
use std::path::Path;
use std::process::Command;

use fly_coordinator::report::{self, history, Db, RunView};
use fly_coordinator::store::Store;
use rusqlite::{params, Connection};

const T0: f64 = 1_700_000_000.0;

/// A database with the fly schema, open for inserting rows directly.
fn new_db(path: &Path) -> Connection {
    let store = Store::open(path).expect("create the schema");
    drop(store);
    let conn = Connection::open(path).expect("open for inserts");
    conn.busy_timeout(std::time::Duration::from_secs(5))
        .expect("busy timeout");
    conn
}

fn insert_run(
    conn: &Connection,
    id: &str,
    project: &str,
    args: &[&str],
    created_at: f64,
    status: &str,
    counts: &str,
) {
    conn.execute(
        "INSERT INTO runs (id, project, status, pytest_args, client_cwd, created_at, started_at,
             finished_at, exit_code, collected, deselected, counts, message)
         VALUES (?1, ?2, ?3, ?4, '/src', ?5, ?6, ?7, 1, 0, 0, ?8, NULL)",
        params![
            id,
            project,
            status,
            serde_json::to_string(args).unwrap(),
            created_at,
            created_at + 1.0,
            created_at + 10.0,
            counts
        ],
    )
    .unwrap();
}

fn insert_agent(conn: &Connection, id: &str, host: &str, workers: u32) {
    conn.execute(
        "INSERT INTO agents (id, hostname, fly_version, protocol_version, workers, logical_cpus,
             physical_cores, performance_cores, efficiency_cores, threads_per_core, cpu_quota,
             memory_bytes, core_kind_source, os, arch, topology, labels, workdir, python,
             connected_at, speed)
         VALUES (?1, ?2, '0.1.0', 1, ?3, 16, 8, 6, 2, 2, 4.5, 17179869184, 'intel-hybrid',
             'linux', 'x86_64', ?4, '{}', '/w', 'python3', ?5, 1.25)",
        params![
            id,
            host,
            workers,
            format!("{{\"auto_workers\": {}}}", workers + 1),
            T0
        ],
    )
    .unwrap();
}

fn insert_run_agent(conn: &Connection, run: &str, agent: &str, workers: u32, accepted: bool) {
    conn.execute(
        "INSERT INTO run_agents (run_id, agent_id, workers, accepted, reason) VALUES (?1, ?2, ?3, ?4, ?5)",
        params![
            run,
            agent,
            workers,
            accepted,
            (!accepted).then_some("a different collection")
        ],
    )
    .unwrap();
}

fn insert_test(conn: &Connection, run: &str, index: u32, nodeid: &str) {
    conn.execute(
        "INSERT INTO run_tests (run_id, test_index, nodeid, file, line) VALUES (?1, ?2, ?3, ?4, 1)",
        params![run, index, nodeid, nodeid.split("::").next().unwrap()],
    )
    .unwrap();
}

/// One phase: (phase, category, start offset, stop offset, duration).
type P<'a> = (&'a str, &'a str, f64, f64, f64);

#[allow(clippy::too_many_arguments)]
fn insert_attempt(
    conn: &Connection,
    run: &str,
    index: u32,
    nodeid: &str,
    lease: u64,
    agent: &str,
    worker: u32,
    superseded: bool,
    phases: &[P],
    longrepr: Option<&str>,
) {
    for (phase, category, start, stop, duration) in phases {
        let failing = *category == "failed" || *category == "error";
        conn.execute(
            "INSERT INTO reports (run_id, test_index, nodeid, lease, phase, outcome, category,
                 duration, start, stop, agent_id, worker, longrepr, message, sections, superseded)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16)",
            params![
                run,
                index,
                nodeid,
                lease as i64,
                phase,
                if failing { "failed" } else { "passed" },
                category,
                duration,
                T0 + start,
                T0 + stop,
                agent,
                worker,
                if failing { longrepr } else { None },
                failing.then_some("AssertionError: deliberate"),
                failing.then_some(r#"[["Captured stdout call", "printed <b>bold</b>"]]"#),
                superseded
            ],
        )
        .unwrap();
    }
}

#[allow(clippy::too_many_arguments)]
fn insert_result(
    conn: &Connection,
    run: &str,
    index: u32,
    nodeid: &str,
    outcome: &str,
    duration: f64,
    attempts: u32,
    lease: u64,
    agent: &str,
    worker: u32,
) {
    conn.execute(
        "INSERT INTO results (run_id, test_index, nodeid, outcome, duration, attempts, lease,
             agent_id, worker)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
        params![
            run,
            index,
            nodeid,
            outcome,
            duration,
            attempts,
            lease as i64,
            agent,
            worker
        ],
    )
    .unwrap();
}

const TRACEBACK: &str =
    "def test_b():\n>       assert '</script><script>alert(1)</script>' == ''\nE   AssertionError";

/// Two accepted agents (2 + 1 workers) and a refused one; six tests, one of them retried after
/// a superseded attempt on another worker, one failed, one setup error, one skipped.
fn crafted_run(conn: &Connection, run: &str) {
    insert_run(
        conn,
        run,
        "crafted",
        &["-q", "tests"],
        T0 - 5.0,
        "failed",
        r#"{"passed":3,"failed":1,"error":1,"skipped":1}"#,
    );
    insert_agent(conn, "agent-a", "host-a", 2);
    insert_agent(conn, "agent-b", "host-b", 1);
    insert_agent(conn, "agent-c", "host-c", 2);
    insert_run_agent(conn, run, "agent-a", 2, true);
    insert_run_agent(conn, run, "agent-b", 1, true);
    insert_run_agent(conn, run, "agent-c", 2, false);
    let ids = [
        "tests/test_a.py::test_ok",
        "tests/test_a.py::test_fails",
        "tests/test_b.py::test_setup_error",
        "tests/test_b.py::test_<odd>&\"quoted\"",
        "tests/test_c.py::test_retried",
        "tests/test_c.py::test_skipped",
    ];
    for (i, id) in ids.iter().enumerate() {
        insert_test(conn, run, i as u32, id);
    }
    // agent-a / worker 0.
    insert_attempt(
        conn,
        run,
        0,
        ids[0],
        1,
        "agent-a",
        0,
        false,
        &[
            ("setup", "", 0.0, 0.1, 0.09),
            ("call", "passed", 0.1, 1.0, 0.88),
            ("teardown", "", 1.0, 1.1, 0.1),
        ],
        None,
    );
    insert_result(conn, run, 0, ids[0], "passed", 1.07, 1, 1, "agent-a", 0);
    insert_attempt(
        conn,
        run,
        1,
        ids[1],
        2,
        "agent-a",
        0,
        false,
        &[
            ("setup", "", 1.2, 1.3, 0.1),
            ("call", "failed", 1.3, 2.0, 0.7),
            ("teardown", "", 2.0, 2.1, 0.1),
        ],
        Some(TRACEBACK),
    );
    insert_result(conn, run, 1, ids[1], "failed", 0.9, 1, 2, "agent-a", 0);
    // agent-a / worker 1: a setup error, a passing test, and an attempt at test 4 that was
    // given up on (superseded), overlapping the next test as a late report can.
    insert_attempt(
        conn,
        run,
        2,
        ids[2],
        3,
        "agent-a",
        1,
        false,
        &[
            ("setup", "error", 0.5, 0.6, 0.1),
            ("teardown", "", 0.6, 0.65, 0.05),
        ],
        Some("E   RuntimeError: broken-setup"),
    );
    insert_result(conn, run, 2, ids[2], "error", 0.15, 1, 3, "agent-a", 1);
    insert_attempt(
        conn,
        run,
        4,
        ids[4],
        4,
        "agent-a",
        1,
        true,
        &[("setup", "", 0.7, 0.8, 0.1), ("call", "", 0.8, 1.5, 0.7)],
        None,
    );
    insert_attempt(
        conn,
        run,
        3,
        ids[3],
        5,
        "agent-a",
        1,
        false,
        &[
            ("setup", "", 1.4, 1.45, 0.05),
            ("call", "passed", 1.45, 2.45, 1.0),
            ("teardown", "", 2.45, 2.5, 0.05),
        ],
        None,
    );
    insert_result(conn, run, 3, ids[3], "passed", 1.1, 1, 5, "agent-a", 1);
    // agent-b / worker 0: the retried test's counting attempt, then a skipped test.
    insert_attempt(
        conn,
        run,
        4,
        ids[4],
        6,
        "agent-b",
        0,
        false,
        &[
            ("setup", "", 1.0, 1.2, 0.2),
            ("call", "passed", 1.2, 3.0, 1.75),
            ("teardown", "", 3.0, 3.1, 0.1),
        ],
        None,
    );
    insert_result(conn, run, 4, ids[4], "passed", 2.05, 2, 6, "agent-b", 0);
    insert_attempt(
        conn,
        run,
        5,
        ids[5],
        7,
        "agent-b",
        0,
        false,
        &[
            ("setup", "skipped", 3.2, 3.25, 0.05),
            ("teardown", "", 3.25, 3.3, 0.01),
        ],
        None,
    );
    insert_result(conn, run, 5, ids[5], "skipped", 0.06, 1, 7, "agent-b", 0);
}

/// The figures, computed straight from the rows.
struct Expected {
    wall: f64,
    workers: usize,
    busy: BTreeMap<(String, u32), f64>,
    test_time: f64,
    longest: f64,
    tests: usize,
}

fn expected(conn: &Connection, run: &str) -> Expected {
    let (first, last): (f64, f64) = conn
        .query_row(
            "SELECT min(start), max(stop) FROM reports WHERE run_id = ?1",
            [run],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    let workers: i64 = conn
        .query_row(
            "SELECT sum(workers) FROM run_agents WHERE run_id = ?1 AND accepted = 1",
            [run],
            |r| r.get(0),
        )
        .unwrap();
    // Busy: per worker, sweep the intervals in start order.
    let mut stmt = conn
        .prepare(
            "SELECT agent_id, worker, start, stop FROM reports WHERE run_id = ?1
             ORDER BY agent_id, worker, start",
        )
        .unwrap();
    let rows: Vec<(String, u32, f64, f64)> = stmt
        .query_map([run], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    let mut busy: BTreeMap<(String, u32), f64> = BTreeMap::new();
    let mut reach: BTreeMap<(String, u32), f64> = BTreeMap::new();
    for (agent, worker, start, stop) in rows {
        let key = (agent, worker);
        let covered = reach.get(&key).copied().unwrap_or(f64::MIN);
        let added = (stop - start.max(covered)).max(0.0);
        *busy.entry(key.clone()).or_default() += added;
        reach.insert(key, covered.max(stop));
    }
    let per_test: Vec<f64> = conn
        .prepare(
            "SELECT sum(rep.duration) FROM results res JOIN reports rep
                 ON rep.run_id = res.run_id AND rep.test_index = res.test_index
                    AND rep.lease = res.lease
             WHERE res.run_id = ?1 GROUP BY res.test_index",
        )
        .unwrap()
        .query_map([run], |r| r.get(0))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    Expected {
        wall: last - first,
        workers: workers as usize,
        busy,
        test_time: per_test.iter().sum(),
        longest: per_test.iter().copied().fold(0.0, f64::max),
        tests: per_test.len(),
    }
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() < 1e-6
}

fn assert_close(what: &str, got: f64, want: f64) {
    assert!(
        close(got, want),
        "{what}: the report says {got}, the rows say {want}"
    );
}

fn check_view(view: &RunView, want: &Expected) {
    let s = &view.stats;
    assert_eq!(s.workers, want.workers, "lanes");
    assert_eq!(view.lanes.len(), want.workers, "lanes");
    assert_eq!(s.tests, want.tests, "tests");
    assert_close("wall", s.wall, want.wall);
    assert_close("test time", s.total_test_time, want.test_time);
    assert_close("longest", s.longest_test, want.longest);
    let sum_busy: f64 = want.busy.values().sum();
    for lane in &view.lanes {
        let busy = want
            .busy
            .get(&(lane.agent_id.clone(), lane.worker))
            .copied()
            .unwrap_or(0.0);
        assert_close("busy", lane.busy, busy);
        assert_close("utilization", lane.utilization, busy / want.wall);
    }
    let workers = want.workers as f64;
    let lower_bound = want.longest.max(want.test_time / workers);
    assert_close(
        "overall utilization",
        s.overall_utilization,
        sum_busy / (workers * want.wall),
    );
    assert_close("lower bound", s.lower_bound, lower_bound);
    assert_close(
        "achieved speed-up",
        s.achieved_speedup,
        want.test_time / want.wall,
    );
    assert_close(
        "possible speed-up",
        s.possible_speedup,
        want.test_time / lower_bound,
    );
    assert_close("idle", s.idle, workers * want.wall - sum_busy);
}

/// The JSON the page embeds for its timeline.
fn embedded_data(page: &str) -> serde_json::Value {
    let open = "<script id=\"fly-data\" type=\"application/json\">";
    let start = page.find(open).expect("the page embeds its data") + open.len();
    let end = start + page[start..].find("</script>").expect("closed script");
    serde_json::from_str(&page[start..end]).expect("the embedded data is JSON")
}

#[test]
fn report_figures_match_the_rows() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("fly.db");
    let conn = new_db(&path);
    crafted_run(&conn, "run-crafted-1");
    let want = expected(&conn, "run-crafted-1");
    // The layout is what the test means it to be.
    assert_eq!(want.workers, 3);
    assert_eq!(want.tests, 6);

    let db = Db::open(&path).unwrap();
    let view = db.run_view("run-crafted-1").unwrap();
    check_view(&view, &want);

    // Lanes grouped by agent, in order; the refused agent has none.
    let lanes: Vec<(&str, u32)> = view
        .lanes
        .iter()
        .map(|l| (l.agent_id.as_str(), l.worker))
        .collect();
    assert_eq!(
        lanes,
        [("agent-a", 0), ("agent-a", 1), ("agent-b", 0)],
        "lanes"
    );
    // The superseded attempt is drawn on its worker, marked, and counts as busy only.
    let faded: Vec<_> = view
        .lanes
        .iter()
        .flat_map(|l| &l.bars)
        .filter(|b| b.superseded)
        .collect();
    assert_eq!(faded.len(), 1);
    assert_eq!(faded[0].test_index, 4);
    // Slowest first; the retried test counts its final attempt.
    assert_eq!(
        view.slowest_tests[0].nodeid,
        "tests/test_c.py::test_retried"
    );
    assert_close("slowest", view.slowest_tests[0].duration, 2.05);
    assert_eq!(
        view.slowest_setups[0].nodeid,
        "tests/test_c.py::test_retried"
    );
    // Failures: the failed call and the setup error, with their tracebacks.
    let failing: Vec<(&str, &str)> = view
        .failures
        .iter()
        .map(|f| (f.nodeid.as_str(), f.phase.as_str()))
        .collect();
    assert_eq!(
        failing,
        [
            ("tests/test_a.py::test_fails", "call"),
            ("tests/test_b.py::test_setup_error", "setup")
        ]
    );
    // Agents with topology, including the refused one.
    let c = view.agents.iter().find(|a| a.id == "agent-c").unwrap();
    assert!(!c.accepted);
    let a = view.agents.iter().find(|a| a.id == "agent-a").unwrap();
    let machine = a.machine.as_ref().unwrap();
    assert_eq!(
        (
            machine.performance_cores,
            machine.efficiency_cores,
            machine.threads_per_core
        ),
        (6, 2, 2)
    );
    assert_eq!(machine.auto_workers, Some(3));
    assert_eq!(machine.cpu_quota, Some(4.5));

    // The model serialises (a dashboard may serve it as JSON).
    let json = serde_json::to_value(&view).unwrap();
    assert_eq!(json["lanes"].as_array().unwrap().len(), 3);
}

#[test]
fn the_html_page_is_self_contained_escaped_and_carries_the_data() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("fly.db");
    let conn = new_db(&path);
    crafted_run(&conn, "run-crafted-1");
    let want = expected(&conn, "run-crafted-1");
    let out = dir.path().join("out").join("report.html");

    let view = report::write_html_report(&path, "latest", &out).unwrap();
    assert_eq!(view.run.id, "run-crafted-1");
    let page = std::fs::read_to_string(&out).unwrap();

    // Nothing to fetch.
    assert!(!page.contains("http://") && !page.contains("https://"));
    assert!(!page.contains(" src=") && !page.contains("<link"));
    // Text from the database is escaped: the traceback's markup is shown, never run.
    assert!(!page.contains("<script>alert(1)"));
    assert!(page.contains("&lt;/script&gt;&lt;script&gt;alert(1)&lt;/script&gt;"));
    assert!(page.contains("test_&lt;odd&gt;&amp;&quot;quoted&quot;"));
    assert!(page.contains("printed &lt;b&gt;bold&lt;/b&gt;"));
    assert_eq!(
        page.matches("</script>").count(),
        2,
        "only the page's own two scripts close"
    );
    assert!(page.contains("AssertionError: deliberate"));

    // The embedded data: lanes, bars, tests.
    let data = embedded_data(&page);
    let lanes = data["lanes"].as_array().unwrap();
    assert_eq!(lanes.len(), want.workers);
    let mut counted = HashSet::new();
    let mut bars = 0;
    for lane in lanes {
        for bar in lane["bars"].as_array().unwrap() {
            bars += 1;
            if bar[2] == 0 {
                counted.insert(bar[0].as_u64().unwrap());
            }
        }
    }
    assert_eq!(counted.len(), want.tests, "tests with a counting bar");
    assert_eq!(bars, want.tests + 1, "plus the superseded attempt");
    assert_eq!(data["tests"][3], "tests/test_b.py::test_<odd>&\"quoted\"");
    assert_eq!(data["stats"]["tests"], want.tests);
    assert!(close(
        data["stats"]["overall_utilization"].as_f64().unwrap(),
        view.stats.overall_utilization
    ));
    // Figures in the page text.
    assert!(page.contains(&format!("{:.2}x", want.test_time / want.wall)));
}

#[test]
fn a_large_run_gives_a_page_of_reasonable_size() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("fly.db");
    let mut conn = new_db(&path);
    let run = "run-large";
    const TESTS: u32 = 50_000;
    const AGENTS: u32 = 4;
    const PER_AGENT: u32 = 16;
    let tx = conn.transaction().unwrap();
    insert_run(
        &tx,
        run,
        "big",
        &[],
        T0 - 5.0,
        "passed",
        r#"{"passed":50000}"#,
    );
    for a in 0..AGENTS {
        insert_agent(&tx, &format!("agent-{a}"), &format!("host-{a}"), PER_AGENT);
        insert_run_agent(&tx, run, &format!("agent-{a}"), PER_AGENT, true);
    }
    {
        let mut test = tx
            .prepare("INSERT INTO run_tests (run_id, test_index, nodeid, file, line) VALUES (?1, ?2, ?3, ?4, 1)")
            .unwrap();
        let mut report = tx
            .prepare(
                "INSERT INTO reports (run_id, test_index, nodeid, lease, phase, outcome, category,
                     duration, start, stop, agent_id, worker, superseded)
                 VALUES (?1, ?2, ?3, ?4, ?5, 'passed', ?6, ?7, ?8, ?9, ?10, ?11, 0)",
            )
            .unwrap();
        let mut result = tx
            .prepare(
                "INSERT INTO results (run_id, test_index, nodeid, outcome, duration, attempts,
                     lease, agent_id, worker)
                 VALUES (?1, ?2, ?3, 'passed', ?4, 1, ?2, ?5, ?6)",
            )
            .unwrap();
        let lanes = AGENTS * PER_AGENT;
        let mut clock = vec![0.0f64; lanes as usize];
        for i in 0..TESTS {
            let file = format!("tests/package_{:02}/test_module_{:03}.py", i % 37, i % 411);
            let nodeid = format!("{file}::TestSomething::test_case_{i}[param-{}]", i % 7);
            test.execute(params![run, i, nodeid, file]).unwrap();
            let lane = i % lanes;
            let agent = format!("agent-{}", lane / PER_AGENT);
            let worker = lane % PER_AGENT;
            let call = 0.001 + f64::from(i % 97) * 0.0007;
            let mut t = clock[lane as usize];
            let mut total = 0.0;
            for (phase, category, length) in [
                ("setup", "", 0.0004),
                ("call", "passed", call),
                ("teardown", "", 0.0002),
            ] {
                report
                    .execute(params![
                        run,
                        i,
                        nodeid,
                        i,
                        phase,
                        category,
                        length,
                        T0 + t,
                        T0 + t + length,
                        agent,
                        worker
                    ])
                    .unwrap();
                t += length;
                total += length;
            }
            clock[lane as usize] = t + 0.0001;
            result
                .execute(params![run, i, nodeid, total, agent, worker])
                .unwrap();
        }
    }
    tx.commit().unwrap();
    let want = expected(&conn, run);

    let out = dir.path().join("large.html");
    let view = report::write_html_report(&path, run, &out).unwrap();
    check_view(&view, &want);
    let size = std::fs::metadata(&out).unwrap().len();
    eprintln!("report of 50,000 tests on 64 workers: {size} bytes");
    assert!(size < 15 * 1024 * 1024, "the page is {size} bytes");
    let page = std::fs::read_to_string(&out).unwrap();
    let data = embedded_data(&page);
    assert_eq!(data["lanes"].as_array().unwrap().len(), 64);
    let bars: usize = data["lanes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["bars"].as_array().unwrap().len())
        .sum();
    assert_eq!(bars, TESTS as usize);
    assert_eq!(data["tests"].as_array().unwrap().len(), TESTS as usize);
}

/// Three runs of one project with the same arguments and one with other arguments.
fn history_db(conn: &Connection) {
    let runs = [
        ("run-1", T0, &["tests"][..]),
        ("run-2", T0 + 100.0, &["tests"][..]),
        ("run-3", T0 + 200.0, &["tests", "-k", "x"][..]),
        ("run-4", T0 + 300.0, &["tests"][..]),
    ];
    let outcomes = [
        // (nodeid, outcome and duration in each run)
        (
            "t.py::test_flips",
            ["passed", "failed", "passed", "passed"],
            [1.0, 1.0, 1.0, 1.0],
        ),
        (
            "t.py::test_steady",
            ["passed", "passed", "failed", "passed"],
            [2.0, 3.0, 3.0, 4.0],
        ),
        (
            "t.py::test_new",
            ["", "", "", "passed"],
            [0.0, 0.0, 0.0, 0.5],
        ),
    ];
    for (r, (run, created, args)) in runs.iter().enumerate() {
        insert_run(
            conn,
            run,
            "proj",
            args,
            *created,
            "passed",
            r#"{"passed":2}"#,
        );
        for (i, (nodeid, outcome, duration)) in outcomes.iter().enumerate() {
            if outcome[r].is_empty() {
                continue;
            }
            insert_result(
                conn,
                run,
                i as u32,
                nodeid,
                outcome[r],
                duration[r],
                1,
                i as u64,
                "a",
                0,
            );
        }
    }
    // A test that passed on its second attempt in run-4, after a failing first attempt.
    insert_attempt(
        conn,
        "run-4",
        7,
        "t.py::test_rerun",
        70,
        "a",
        0,
        true,
        &[
            ("setup", "", 0.0, 0.1, 0.1),
            ("call", "failed", 0.1, 0.2, 0.1),
        ],
        Some("E boom"),
    );
    insert_result(
        conn,
        "run-4",
        7,
        "t.py::test_rerun",
        "passed",
        0.2,
        2,
        71,
        "a",
        0,
    );
    // Another project's run is not mixed in.
    insert_run(
        conn,
        "other-1",
        "other",
        &["tests"],
        T0 + 50.0,
        "failed",
        "{}",
    );
    insert_result(
        conn,
        "other-1",
        0,
        "t.py::test_flips",
        "failed",
        9.0,
        1,
        0,
        "a",
        0,
    );
}

#[test]
fn history_queries_list_runs_slowest_and_flaky_tests() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("fly.db");
    let conn = new_db(&path);
    history_db(&conn);
    let db = Db::open(&path).unwrap();

    let runs = history::recent_runs(&db, None, 3).unwrap();
    let ids: Vec<&str> = runs.iter().map(|r| r.id.as_str()).collect();
    assert_eq!(ids, ["run-4", "run-3", "run-2"], "newest first, limited");
    assert_eq!(runs[0].summary(), "2 passed");
    assert_eq!(runs[0].duration, Some(10.0));
    let other = history::recent_runs(&db, Some("other"), 20).unwrap();
    assert_eq!(other.len(), 1);

    let slowest = history::slowest(&db, None, 2, 5).unwrap().unwrap();
    assert_eq!(slowest.project, "proj");
    assert_eq!(slowest.runs.len(), 4);
    assert_eq!(slowest.runs[3].id, "run-4", "the latest run last");
    assert_eq!(slowest.tests.len(), 2);
    assert_eq!(slowest.tests[0].nodeid, "t.py::test_steady");
    assert_eq!(
        slowest.tests[0].durations,
        [Some(2.0), Some(3.0), Some(3.0), Some(4.0)]
    );
    // 4.0 against the median 3.0 of the earlier runs.
    assert!(close(slowest.tests[0].trend.unwrap(), 1.0 / 3.0));
    let mut text = Vec::new();
    history::print_slowest(Some(&slowest), &mut text).unwrap();
    let text = String::from_utf8(text).unwrap();
    assert!(text.contains("+33%"), "{text}");
    assert!(text.contains("t.py::test_steady"), "{text}");

    let flaky = history::flaky(&db, None, 10).unwrap().unwrap();
    let mut found: Vec<(String, &str)> = flaky
        .tests
        .iter()
        .map(|t| {
            let kind = match &t.reason {
                history::FlakyReason::OutcomeChanged { .. } => "changed",
                history::FlakyReason::PassedOnRerun { .. } => "rerun",
            };
            (t.nodeid.clone(), kind)
        })
        .collect();
    found.sort();
    // test_steady failed only in run-3, whose arguments differ: not flaky.
    assert_eq!(
        found,
        [
            ("t.py::test_flips".to_string(), "changed"),
            ("t.py::test_rerun".to_string(), "rerun")
        ]
    );
    let rerun = flaky
        .tests
        .iter()
        .find(|t| t.nodeid == "t.py::test_rerun")
        .unwrap();
    match &rerun.reason {
        history::FlakyReason::PassedOnRerun {
            attempts, earlier, ..
        } => {
            assert_eq!(*attempts, 2);
            assert_eq!(earlier, &["failed".to_string()]);
        }
        other => panic!("{other:?}"),
    }
    // A window of the last two runs holds only one run with the common arguments.
    let narrow = history::flaky(&db, None, 2).unwrap().unwrap();
    assert!(narrow
        .tests
        .iter()
        .all(|t| matches!(t.reason, history::FlakyReason::PassedOnRerun { .. })));
}

fn fly(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_fly-coordinator"))
        .args(args)
        .env_remove("FLY_DB")
        .output()
        .expect("run fly-coordinator")
}

#[test]
fn the_commands_fail_clearly_on_a_missing_database_or_run() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nowhere.db");
    let missing = missing.to_str().unwrap();
    let out = dir.path().join("r.html");
    let out = out.to_str().unwrap();
    for args in [
        vec!["report", "--db", missing, "--html", out],
        vec!["runs", "--db", missing],
        vec!["slowest", "--db", missing],
        vec!["flaky", "--db", missing],
    ] {
        let output = fly(&args);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(3), "{args:?}: {stderr}");
        assert!(stderr.contains("no fly database at"), "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
    assert!(
        !Path::new(missing).exists(),
        "a read never creates the file"
    );

    let path = dir.path().join("fly.db");
    let conn = new_db(&path);
    let db = path.to_str().unwrap();
    let output = fly(&["report", "--db", db, "--html", out]);
    assert_eq!(output.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&output.stderr).contains("holds no runs"));

    crafted_run(&conn, "run-crafted-1");
    let output = fly(&["report", "--db", db, "--run", "no-such-run", "--html", out]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(3), "{stderr}");
    assert!(stderr.contains("has no run \"no-such-run\""), "{stderr}");
    assert!(!Path::new(out).exists());

    // A prefix of the id names the run; the page is written and announced.
    let output = fly(&["report", "--db", db, "--run", "run-cr", "--html", out]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert_eq!(output.status.code(), Some(0), "{output:?}");
    assert!(stdout.contains("6 tests on 3 workers"), "{stdout}");
    assert!(Path::new(out).is_file());

    let output = fly(&["runs", "--db", db]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert_eq!(output.status.code(), Some(0));
    assert!(stdout.starts_with("RUN "), "{stdout}");
    assert!(
        stdout.contains("run-crafted-1")
            && stdout.contains("1 failed, 3 passed, 1 skipped, 1 error"),
        "{stdout}"
    );
}

#[test]
fn a_run_that_ran_no_test_still_gets_a_page() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("fly.db");
    let conn = new_db(&path);
    insert_run(
        &conn,
        "run-usage-error",
        "p",
        &["--no-such-flag"],
        T0,
        "usage_error",
        "{}",
    );
    insert_agent(&conn, "agent-a", "host-a", 2);
    insert_run_agent(&conn, "run-usage-error", "agent-a", 2, true);
    let out = dir.path().join("empty.html");
    let view = report::write_html_report(&path, "latest", &out).unwrap();
    // No report: the wall is the run's own started -> finished.
    assert_close("wall", view.stats.wall, 9.0);
    assert_eq!(view.stats.tests, 0);
    assert_eq!(view.lanes.len(), 2);
    assert_eq!(view.stats.overall_utilization, 0.0);
    let page = std::fs::read_to_string(&out).unwrap();
    assert!(page.contains("no tests ran"));
    assert!(page.contains("Failures (0)"));
}
