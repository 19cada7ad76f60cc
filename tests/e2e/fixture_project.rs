//! The fixture project and the checks themselves, without fly: plain pytest must give the
//! verdicts the project was written to produce, and pytest-xdist (`-n 2`, whose workers honour
//! pytest's `nextitem` contract) must pass every output and fixture check a fly run faces. A
//! failure here is in the fixture project or the checks, not in fly.

use std::collections::BTreeMap;

use fly_tests::check::{
    assert_fixture_logs_match, assert_output_matches, read_logs, FAILURE_MARKERS, ODD_NODEIDS,
};
use fly_tests::paths::python;
use fly_tests::process::Proc;
use fly_tests::pytest::{pytest_command, run_plain_pytest, JunitVerdict};
use fly_tests::sandbox::Sandbox;
use fly_tests::HANG_GUARD;

#[test]
fn fixture_project_gives_the_verdicts_it_was_written_for() {
    let sandbox = Sandbox::new("fixture");
    let project = sandbox.copy_project("project");
    let oracle_logs = sandbox.dir("pytest-fixture-logs");
    let oracle = run_plain_pytest(
        &python(),
        &project,
        &["."],
        &sandbox.path("junit.xml"),
        &oracle_logs,
    );

    assert_eq!(oracle.exit_code, 1, "{}", oracle.run.describe());
    let expected: BTreeMap<String, u32> = [
        ("failed", 4),
        ("passed", 45),
        ("skipped", 3),
        ("xfailed", 1),
        ("xpassed", 1),
        ("error", 2),
    ]
    .into_iter()
    .map(|(category, n)| (category.to_string(), n))
    .collect();
    assert_eq!(oracle.counts, expected, "{}", oracle.run.describe());
    for odd in ODD_NODEIDS {
        assert!(oracle.collection.iter().any(|id| id == odd), "{odd:?}");
    }
    for marker in FAILURE_MARKERS {
        assert!(oracle.run.stdout.contains(marker), "{marker:?}");
    }
    let verdict =
        |classname: &str, name: &str| oracle.verdicts[&(classname.to_string(), name.to_string())];
    assert_eq!(
        verdict("test_errors", "test_teardown_error_after_passing_call"),
        JunitVerdict::Error
    );
    assert_eq!(verdict("test_marks", "test_xfail"), JunitVerdict::Xfailed);
    assert_eq!(
        verdict("test_marks", "test_xpass_strict_fails"),
        JunitVerdict::Failed
    );
    assert_eq!(
        verdict("test_output", "test_reading_stdin_raises"),
        JunitVerdict::Passed
    );

    // pytest-xdist stands in for a correct parallel runner.
    let xdist_logs = sandbox.dir("xdist-fixture-logs");
    let xdist = Proc::spawn(
        "pytest -n 2",
        pytest_command(&python(), &project, Some(&xdist_logs))
            .args(["-p", "xdist", "-n", "2", "."]),
    );
    // xdist's controller replays its workers' `pytest_runtest_logstart` hooks in its own
    // process; only the workers' logs describe fixtures.
    let controller = xdist.pid();
    let xdist = xdist.wait(HANG_GUARD);
    assert_output_matches(&xdist, &oracle);
    let worker_logs: Vec<_> = read_logs(&xdist_logs)
        .into_iter()
        .filter(|log| log.pid != controller)
        .collect();
    assert_eq!(worker_logs.len(), 2, "two xdist workers: {worker_logs:?}");
    assert_fixture_logs_match(&worker_logs, &read_logs(&oracle_logs), &oracle.collection);
}
