//! SIGTERM drains an agent: it takes no new work, gives its unstarted tests back, lets its
//! running tests finish and exits 0. A second agent started afterwards runs the rest, and every
//! test of the run is counted once.

use std::collections::BTreeSet;
use std::path::Path;

use fly_tests::db::{try_count, FlyDb};
use fly_tests::fly::{self, Coordinator};
use fly_tests::sandbox::Sandbox;
use fly_tests::{poll_until, HANG_GUARD};

/// Tests in the suite; each sleeps long enough to be running when the agent is told to stop.
const TESTS: usize = 6;

/// A suite of `TESTS` tests of 3 s each; each leaves a mark in `$DRAIN_MARKS` when it starts.
fn write_suite(dir: &Path) {
    std::fs::write(dir.join("pytest.ini"), "[pytest]\n").unwrap();
    std::fs::write(
        dir.join("test_slow.py"),
        format!(
            "import os\nimport time\n\nimport pytest\n\n\n\
             @pytest.mark.parametrize(\"n\", range({TESTS}))\n\
             def test_sleeps(n):\n\
             \x20   marks = os.environ.get(\"DRAIN_MARKS\")\n\
             \x20   if marks:\n\
             \x20       with open(os.path.join(marks, \"test_sleeps[%d]\" % n), \"w\") as f:\n\
             \x20           f.write(str(os.getpid()))\n\
             \x20   time.sleep(3)\n"
        ),
    )
    .unwrap();
}

fn marks(dir: &Path) -> BTreeSet<String> {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(|e| e.ok())
                .map(|e| format!("test_slow.py::{}", e.file_name().to_string_lossy()))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn a_drained_agent_finishes_its_running_tests_gives_the_rest_back_and_exits_0() {
    let sandbox = Sandbox::new("drain");
    let dirs = [
        sandbox.dir("client"),
        sandbox.dir("agent-a"),
        sandbox.dir("agent-b"),
    ];
    for dir in &dirs {
        write_suite(dir);
    }
    let [client_dir, dir_a, dir_b] = dirs;
    let marks_dir = sandbox.dir("marks");
    let db = sandbox.path("coordinator.db");
    let coordinator = Coordinator::serve(&sandbox.path(""), &db);
    let env = [("DRAIN_MARKS", marks_dir.as_path())];
    let first = fly::agent("fly-agent a", &coordinator, &dir_a, None, &env);
    poll_until(HANG_GUARD, || {
        (try_count(&db, "agents")? >= 1).then_some(())
    })
    .unwrap_or_else(|| {
        panic!(
            "the coordinator never recorded agent a\n--- agent a stderr ---\n{}",
            first.stderr_so_far()
        )
    });
    let run = fly::run_connect(&client_dir, &coordinator.url, &["-q"]);

    // Both workers of agent a are in the middle of a test.
    let running = poll_until(HANG_GUARD, || {
        let marked = marks(&marks_dir);
        (marked.len() >= 2).then_some(marked)
    })
    .unwrap_or_else(|| {
        panic!(
            "agent a never started two tests\n--- agent a stderr ---\n{}",
            first.stderr_so_far()
        )
    });
    let pid = libc::pid_t::try_from(first.pid()).expect("a pid");
    // SAFETY: kill(2) on the agent this test started and has not reaped yet.
    unsafe {
        libc::kill(pid, libc::SIGTERM);
    }
    let second = fly::agent("fly-agent b", &coordinator, &dir_b, None, &env);

    let first = first.wait(HANG_GUARD);
    assert_eq!(first.code, Some(0), "{}", first.describe());
    let run = run.wait(HANG_GUARD);
    assert_eq!(
        run.code,
        Some(0),
        "{}\n--- agent b stderr ---\n{}",
        run.describe(),
        second.stderr_so_far()
    );

    let fly_db = FlyDb::open_or_panic(&db);
    let run_id = fly_db.run_id();
    let agents = fly_db
        .agents()
        .unwrap_or_else(|e| panic!("reading agents: {e}"));
    let agent_a = agents
        .iter()
        .find(|a| Path::new(&a.text("workdir")) == dir_a)
        .unwrap_or_else(|| panic!("agent a is not recorded: {agents:?}"))
        .text("id");

    // Every test has one result, passed, and ran once: one call report that counts. (A test
    // given back and handed out again has two leases, but only one of them ran.)
    let results = fly_db.results(&run_id);
    let nodeids: BTreeSet<String> = results.iter().map(|r| r.text("nodeid")).collect();
    assert_eq!(results.len(), TESTS, "{results:?}");
    assert_eq!(nodeids.len(), TESTS, "{results:?}");
    let reports = fly_db.reports(&run_id);
    for result in &results {
        assert_eq!(result.text("outcome"), "passed", "{result:?}");
        let calls: Vec<_> = reports
            .iter()
            .filter(|r| r.text("nodeid") == result.text("nodeid") && r.text("phase") == "call")
            .collect();
        assert_eq!(calls.len(), 1, "{calls:?}");
        assert_eq!(calls[0].int("superseded"), Some(0), "{calls:?}");
        assert_eq!(calls[0].text("lease"), result.text("lease"), "{calls:?}");
    }
    // The tests that were running when agent a was told to stop finished there and count.
    for nodeid in &running {
        let result = results
            .iter()
            .find(|r| r.text("nodeid") == *nodeid)
            .unwrap_or_else(|| panic!("no result for {nodeid}: {results:?}"));
        assert_eq!(result.text("agent_id"), agent_a, "{result:?}");
    }
    // Agent a's reports are all passing and all count: nothing of it was killed or redone.
    let from_a: Vec<_> = reports
        .iter()
        .filter(|r| r.text("agent_id") == agent_a)
        .collect();
    assert_eq!(from_a.len(), 3 * running.len(), "{from_a:?}");
    for report in &from_a {
        assert_eq!(report.text("outcome"), "passed", "{report:?}");
        assert_eq!(report.int("superseded"), Some(0), "{report:?}");
    }
    // The rest ran on agent b.
    assert_eq!(
        results
            .iter()
            .filter(|r| r.text("agent_id") != agent_a)
            .count(),
        TESTS - running.len(),
        "{results:?}"
    );
    assert!(
        run.output().contains(&format!("{TESTS} passed")),
        "{}",
        run.describe()
    );
}
