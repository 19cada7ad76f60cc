//! `fly-coordinator serve` with two `fly-agent`s of two workers each, on loopback, and a client
//! submitting the run with `run --connect`: the run must report exactly what plain pytest
//! reports, and the coordinator must record both agents with their hardware topology.

use std::collections::BTreeSet;

use fly_tests::check::assert_run_matches_pytest;
use fly_tests::db::{try_count, FlyDb};
use fly_tests::fly::{self, Coordinator};
use fly_tests::paths::python;
use fly_tests::pytest::run_plain_pytest;
use fly_tests::sandbox::Sandbox;
use fly_tests::{poll_until, HANG_GUARD};

#[test]
fn two_agents_agree_with_plain_pytest_and_are_recorded_with_their_topology() {
    let sandbox = Sandbox::new("distributed");
    // Each agent gets its own checkout, as on separate machines; the client has a third.
    let client_dir = sandbox.copy_project("client");
    let agent_dirs = [
        sandbox.copy_project("agent-a"),
        sandbox.copy_project("agent-b"),
    ];
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
    let agents = [
        fly::agent(
            "fly-agent a",
            &coordinator,
            &agent_dirs[0],
            Some(&fly_logs),
            &[],
        ),
        fly::agent(
            "fly-agent b",
            &coordinator,
            &agent_dirs[1],
            Some(&fly_logs),
            &[],
        ),
    ];
    // Both agents are in before the run starts, so both are offered its work.
    poll_until(HANG_GUARD, || {
        (try_count(&db, "agents")? >= 2).then_some(())
    })
    .unwrap_or_else(|| {
        panic!(
            "the coordinator never recorded two agents\n--- coordinator stderr ---\n{}\n\
             --- agent a stderr ---\n{}\n--- agent b stderr ---\n{}",
            coordinator.process().stderr_so_far(),
            agents[0].stderr_so_far(),
            agents[1].stderr_so_far()
        )
    });

    let run = fly::run_connect(&client_dir, &coordinator.url, &["."]).wait(HANG_GUARD);
    let checked = assert_run_matches_pytest(&run, &db, &fly_logs, &oracle, &oracle_logs);

    let recorded = FlyDb::open_or_panic(&db)
        .agents()
        .unwrap_or_else(|e| panic!("reading agents: {e}"));
    assert_eq!(
        recorded.len(),
        2,
        "agents should hold both agents: {recorded:?}"
    );
    let ids: BTreeSet<String> = recorded.iter().map(|row| row.text("id")).collect();
    assert_eq!(ids.len(), 2, "the two agents need distinct ids: {ids:?}");
    for agent in &recorded {
        assert!(!agent.text("hostname").is_empty(), "no hostname: {agent:?}");
        assert_eq!(agent.int("workers"), Some(2), "workers: {agent:?}");
        assert!(
            agent.int("logical_cpus").unwrap_or(0) >= 1,
            "logical_cpus: {agent:?}"
        );
        assert!(
            agent.int("physical_cores").unwrap_or(0) >= 1,
            "physical_cores: {agent:?}"
        );
        if agent.has("topology") {
            let topology: serde_json::Value = serde_json::from_str(&agent.text("topology"))
                .unwrap_or_else(|e| panic!("agents.topology is not JSON ({e}): {agent:?}"));
            assert!(topology.is_object(), "agents.topology: {topology}");
        }
    }
    for result in &checked.results {
        let agent = result.text("agent_id");
        assert!(
            ids.contains(&agent),
            "{} ran on agent {agent:?}, which is not in agents {ids:?}",
            result.text("nodeid")
        );
    }
}
