//! `fly-coordinator run --local`: one process runs the coordinator and two pytest workers in
//! the project directory, and must report exactly what plain pytest reports.

use fly_tests::check::assert_run_matches_pytest;
use fly_tests::paths::python;
use fly_tests::pytest::run_plain_pytest;
use fly_tests::sandbox::Sandbox;
use fly_tests::{fly, HANG_GUARD};

#[test]
fn local_run_with_two_workers_agrees_with_plain_pytest() {
    let sandbox = Sandbox::new("local");
    let project = sandbox.copy_project("project");
    let oracle_logs = sandbox.dir("pytest-fixture-logs");
    let oracle = run_plain_pytest(
        &python(),
        &project,
        &["."],
        &sandbox.path("junit.xml"),
        &oracle_logs,
    );

    let db = sandbox.path("fly.db");
    let fly_logs = sandbox.dir("fly-fixture-logs");
    let run = fly::run_local(&project, &db, Some(&fly_logs), &["."]).wait(HANG_GUARD);

    assert_run_matches_pytest(&run, &db, &fly_logs, &oracle, &oracle_logs);
}
