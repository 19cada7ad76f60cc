//! `fly-coordinator run --listen --local`: a coordinator that lives for one run (as in a CI
//! pipeline), with workers of its own, joined by a remote `fly-agent`. The run must report what
//! plain pytest reports, use both agents, and exit with pytest's exit code.

use fly_tests::check::assert_run_matches_pytest;
use fly_tests::db::{try_count, FlyDb};
use fly_tests::fly;
use fly_tests::gate::Gate;
use fly_tests::paths::python;
use fly_tests::pytest::run_plain_pytest;
use fly_tests::sandbox::Sandbox;
use fly_tests::{poll_until, HANG_GUARD};

#[test]
fn a_coordinator_for_one_run_takes_remote_agents_and_exits_with_pytests_code() {
    let sandbox = Sandbox::new("listen");
    let client_dir = sandbox.copy_project("client");
    let agent_dir = sandbox.copy_project("agent");
    let oracle_logs = sandbox.dir("pytest-fixture-logs");
    let oracle = run_plain_pytest(
        &python(),
        &client_dir,
        &["."],
        &sandbox.path("junit.xml"),
        &oracle_logs,
    );

    let db = sandbox.path("run.db");
    let fly_logs = sandbox.dir("fly-fixture-logs");
    // The local worker holds the gate test until the remote agent has joined, so the run is
    // still open when it connects, whatever the timing.
    let gate = Gate::new(sandbox.path("gate"));
    let run = fly::run_listen_local(
        &client_dir,
        &db,
        Some(&fly_logs),
        &[("FLY_GATE_FILE", gate.path())],
        &["."],
    );
    let url = poll_until(HANG_GUARD, || {
        run.stderr_so_far().lines().find_map(|line| {
            line.strip_prefix("fly-coordinator listening on ")
                .map(|url| url.trim().to_string())
        })
    })
    .unwrap_or_else(|| {
        panic!(
            "run --listen never announced its address\n{}",
            run.stderr_so_far()
        )
    });
    assert!(url.starts_with("http://127.0.0.1:"), "{url}");

    let remote = fly::agent_at("fly-agent remote", &url, &agent_dir, Some(&fly_logs), &[]);
    poll_until(HANG_GUARD, || {
        (try_count(&db, "agents")? >= 2).then_some(())
    })
    .unwrap_or_else(|| {
        panic!(
            "the remote agent never joined\n--- run stderr ---\n{}\n--- agent stderr ---\n{}",
            run.stderr_so_far(),
            remote.stderr_so_far()
        )
    });
    gate.open();

    let finished = run.wait(HANG_GUARD);
    assert_run_matches_pytest(&finished, &db, &fly_logs, &oracle, &oracle_logs);
    let agents = FlyDb::open_or_panic(&db)
        .agents()
        .unwrap_or_else(|e| panic!("reading agents: {e}"));
    let mut workers: Vec<Option<i64>> = agents.iter().map(|a| a.int("workers")).collect();
    workers.sort_unstable();
    assert_eq!(
        workers,
        vec![Some(1), Some(2)],
        "the local agent (1 worker) and the remote one (2)"
    );
}
