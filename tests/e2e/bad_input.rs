//! Bad input ends a run the way pytest would: a missing path or an unknown option is a usage
//! error (exit 4, with pytest's own message), a `-k` matching nothing exits 5, whether the run
//! is local or served; an unreachable coordinator fails with a clear message instead of
//! waiting forever.

use std::path::Path;

use fly_tests::fly::{self, Coordinator};
use fly_tests::paths::python;
use fly_tests::process::Finished;
use fly_tests::pytest::run_plain_pytest_only;
use fly_tests::sandbox::Sandbox;
use fly_tests::HANG_GUARD;

/// pytest arguments, the exit code pytest gives them, and a message pytest prints for them.
const CASES: [(&[&str], i32, Option<&str>); 3] = [
    (
        &["nope"],
        4,
        Some("ERROR: file or directory not found: nope"),
    ),
    (
        &["--definitely-not-a-pytest-option"],
        4,
        Some("unrecognized arguments"),
    ),
    (&["-k", "matches_no_test_at_all"], 5, None),
];

/// Checks that plain pytest itself behaves as `CASES` says, so a failure below is fly's.
fn assert_pytest_agrees(project: &Path) {
    for (args, code, message) in CASES {
        let pytest = run_plain_pytest_only(&python(), project, args);
        assert_eq!(
            pytest.code,
            Some(code),
            "plain pytest {args:?}\n{}",
            pytest.describe()
        );
        if let Some(message) = message {
            assert!(pytest.output().contains(message), "{}", pytest.describe());
        }
    }
}

fn assert_like_pytest(args: &[&str], code: i32, message: Option<&str>, run: &Finished) {
    assert_eq!(
        run.code,
        Some(code),
        "fly with pytest args {args:?} should exit {code} as pytest does\n{}",
        run.describe()
    );
    if let Some(message) = message {
        assert!(
            run.output().contains(message),
            "fly with pytest args {args:?} should print pytest's message {message:?}\n{}",
            run.describe()
        );
    }
}

#[test]
fn local_runs_exit_like_pytest_on_bad_input() {
    let sandbox = Sandbox::new("bad-local");
    let project = sandbox.copy_project("project");
    assert_pytest_agrees(&project);
    for (n, (args, code, message)) in CASES.into_iter().enumerate() {
        let db = sandbox.path(&format!("fly-{n}.db"));
        let run = fly::run_local(&project, &db, None, args).wait(HANG_GUARD);
        assert_like_pytest(args, code, message, &run);
    }
}

#[test]
fn served_runs_exit_like_pytest_on_bad_input() {
    let sandbox = Sandbox::new("bad-served");
    let client_dir = sandbox.copy_project("client");
    let agent_dir = sandbox.copy_project("agent");
    let coordinator = Coordinator::serve(&sandbox.path(""), &sandbox.path("coordinator.db"));
    let _agent = fly::agent("fly-agent", &coordinator, &agent_dir, None, &[]);
    // One after another on the same coordinator and agent: a failed run must not wedge them.
    for (args, code, message) in CASES {
        let run = fly::run_connect(&client_dir, &coordinator.url, args).wait(HANG_GUARD);
        assert_like_pytest(args, code, message, &run);
    }
}

#[test]
fn unreachable_coordinator_fails_with_a_clear_message() {
    let sandbox = Sandbox::new("unreachable");
    let project = sandbox.copy_project("project");
    // Port 1 on loopback: nothing listens there (tcpmux is never served on a test machine).
    let address = "127.0.0.1:1";
    let run = fly::run_connect(&project, &format!("http://{address}"), &["."]).wait(HANG_GUARD);
    assert!(
        matches!(run.code, Some(code) if code != 0),
        "run against an unreachable coordinator should fail\n{}",
        run.describe()
    );
    let output = run.output();
    assert!(
        output.contains(address) || output.to_lowercase().contains("connect"),
        "the failure should say which coordinator could not be reached\n{}",
        run.describe()
    );
}
