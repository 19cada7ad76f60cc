//! An agent whose checkout collects differently (one extra test file) joins a running run: it
//! must take no work and say which test ids differ, while the run finishes with the right
//! results on the agent whose checkout matches.

use std::time::Duration;

use fly_tests::check::assert_run_matches_pytest;
use fly_tests::db::{try_count, FlyDb};
use fly_tests::fly::{self, Coordinator};
use fly_tests::gate::Gate;
use fly_tests::paths::python;
use fly_tests::pytest::run_plain_pytest;
use fly_tests::sandbox::Sandbox;
use fly_tests::{poll_until, HANG_GUARD};

/// The test only the mismatched agent's checkout has.
const EXTRA_TEST: &str = "test_zz_only_on_one_agent.py::test_exists_only_in_this_checkout";

/// How long the run is held open for the extra agent to notice the mismatch. Only bounds a
/// wait; the assertion afterwards says whether it happened.
const NOTICE_WAIT: Duration = Duration::from_secs(90);

#[test]
fn agent_with_a_different_checkout_takes_no_work_and_names_the_difference() {
    let sandbox = Sandbox::new("mismatch");
    let client_dir = sandbox.copy_project("client");
    let good_dir = sandbox.copy_project("agent-same");
    let extra_dir = sandbox.copy_project("agent-extra");
    std::fs::write(
        extra_dir.join("test_zz_only_on_one_agent.py"),
        "def test_exists_only_in_this_checkout():\n    pass\n",
    )
    .expect("writing the extra test file");
    let oracle_logs = sandbox.dir("pytest-fixture-logs");
    let oracle = run_plain_pytest(
        &python(),
        &client_dir,
        &["."],
        &sandbox.path("junit.xml"),
        &oracle_logs,
    );

    let db = sandbox.path("coordinator.db");
    let coordinator = Coordinator::serve(&sandbox.path(""), &db);
    let fly_logs = sandbox.dir("fly-fixture-logs");
    let gate_file = sandbox.path("gate");
    let good = fly::agent(
        "fly-agent (same checkout)",
        &coordinator,
        &good_dir,
        Some(&fly_logs),
        &[("FLY_GATE_FILE", &gate_file)],
    );
    // Declared after the agents so it is dropped (and the gate opened) before they are stopped.
    let gate = Gate::new(gate_file);

    // The matching agent joins first, so its collection is the run's.
    let good_id = poll_until(HANG_GUARD, || {
        let db = FlyDb::open(&db).ok()?;
        let agents = db.agents().ok()?;
        (agents.len() == 1).then(|| agents[0].text("id"))
    })
    .unwrap_or_else(|| {
        panic!(
            "the coordinator never recorded the first agent\n--- agent stderr ---\n{}",
            good.stderr_so_far()
        )
    });
    let run = fly::run_connect(&client_dir, &coordinator.url, &["."]);
    poll_until(HANG_GUARD, || {
        (try_count(&db, "run_tests")? > 0).then_some(())
    })
    .unwrap_or_else(|| {
        panic!(
            "the run's collection never reached run_tests\n--- agent stderr ---\n{}\n\
             --- run stderr ---\n{}",
            good.stderr_so_far(),
            run.stderr_so_far()
        )
    });

    // The run is held open by test_gate.py until the late agent has had its say.
    let extra = fly::agent(
        "fly-agent (extra test file)",
        &coordinator,
        &extra_dir,
        None,
        &[],
    );
    let names_extra_test = || {
        extra.stderr_so_far().contains(EXTRA_TEST)
            || run.stdout_so_far().contains(EXTRA_TEST)
            || run.stderr_so_far().contains(EXTRA_TEST)
    };
    let _ = poll_until(NOTICE_WAIT, || names_extra_test().then_some(()));
    gate.open();
    let finished = run.wait(HANG_GUARD);

    let checked = assert_run_matches_pytest(&finished, &db, &fly_logs, &oracle, &oracle_logs);
    assert!(
        extra.stderr_so_far().contains(EXTRA_TEST) || finished.output().contains(EXTRA_TEST),
        "neither the mismatched agent's log nor the run's output names {EXTRA_TEST}\n\
         --- mismatched agent stderr ---\n{}\n{}",
        extra.stderr_so_far(),
        finished.describe()
    );
    for result in &checked.results {
        assert_eq!(
            result.text("agent_id"),
            good_id,
            "{} ran on an agent other than the matching one",
            result.text("nodeid")
        );
    }
}
