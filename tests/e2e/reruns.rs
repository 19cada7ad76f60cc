//! `run --reruns N`: a failed test runs again, on the other worker; a test that fails once and
//! then passes is flaky, counts as passed (exit 0) unless `--flaky-fails`, and every attempt
//! stays in SQLite with the failed one marked superseded. A test that always fails takes
//! N + 1 attempts and fails the run.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use fly_tests::db::{FlyDb, Row};
use fly_tests::fly::clean_env;
use fly_tests::paths::{fly_binary, python};
use fly_tests::process::{Finished, Proc};
use fly_tests::sandbox::Sandbox;
use fly_tests::HANG_GUARD;

/// A suite of its own: one test that fails the first time it runs (it leaves a marker file
/// next to itself) and passes after, one that always passes, one that always fails.
fn write_suite(dir: &Path) {
    fs::create_dir_all(dir).expect("suite dir");
    fs::write(dir.join("pytest.ini"), "[pytest]\n").expect("pytest.ini");
    fs::write(
        dir.join("test_flaky.py"),
        r#"import pathlib

MARKER = pathlib.Path(__file__).with_name("failed-once")


def test_fails_once_then_passes():
    if not MARKER.exists():
        MARKER.write_text("failed once\n")
        assert False, "the first attempt fails"


def test_passes():
    pass
"#,
    )
    .expect("test_flaky.py");
    fs::write(
        dir.join("test_always.py"),
        r#"def test_always_fails():
    assert 1 == 2, "fails every time"
"#,
    )
    .expect("test_always.py");
}

/// `fly-coordinator run --local --workers 2 --db DB FLAGS -- ARGS` in `dir`.
fn run(dir: &Path, db: &Path, flags: &[&str], pytest_args: &[&str]) -> Finished {
    let mut command = Command::new(fly_binary("fly-coordinator"));
    command
        .args(["run", "--local", "--workers", "2", "--db"])
        .arg(db)
        .arg("--python")
        .arg(python())
        .args(flags)
        .arg("--")
        .args(pytest_args)
        .current_dir(dir);
    clean_env(&mut command, None);
    command
        .env_remove("FLY_RERUNS")
        .env_remove("FLY_FLAKY_FAILS");
    Proc::spawn("fly-coordinator run --local --reruns", &mut command).wait(HANG_GUARD)
}

/// The call-phase reports of `nodeid` in the latest run, in the order they arrived.
fn call_reports(db: &FlyDb, run_id: &str, nodeid: &str) -> Vec<Row> {
    db.query(
        "reports",
        "SELECT * FROM reports WHERE run_id = ?1 AND nodeid = ?2 AND phase = 'call' ORDER BY id",
        &[&run_id, &nodeid],
    )
    .unwrap_or_else(|e| panic!("reading reports: {e}"))
}

fn result(db: &FlyDb, run_id: &str, nodeid: &str) -> Row {
    db.results(run_id)
        .into_iter()
        .find(|r| r.text("nodeid") == nodeid)
        .unwrap_or_else(|| panic!("no result for {nodeid}"))
}

fn suite(sandbox: &Sandbox) -> PathBuf {
    let dir = sandbox.path("suite");
    write_suite(&dir);
    dir
}

const FLAKY: &str = "test_flaky.py::test_fails_once_then_passes";
const ALWAYS: &str = "test_always.py::test_always_fails";

#[test]
fn a_test_that_fails_once_then_passes_is_flaky_and_passes_the_run() {
    let sandbox = Sandbox::new("reruns-flaky");
    let dir = suite(&sandbox);
    let db_path = sandbox.path("fly.db");
    let run = run(&dir, &db_path, &["--reruns", "2"], &["test_flaky.py"]);
    assert_eq!(
        run.code,
        Some(0),
        "a flaky test counts as passed\n{}",
        run.describe()
    );
    assert!(
        run.last_stdout_line().contains("2 passed, 1 rerun in"),
        "the summary counts the rerun as pytest-rerunfailures does\n{}",
        run.describe()
    );
    assert!(
        run.stdout.contains(&format!("FLAKY {FLAKY}")),
        "the flaky test is named\n{}",
        run.describe()
    );

    let db = FlyDb::open_or_panic(&db_path);
    let run_id = db.run_id();
    let flaky = result(&db, &run_id, FLAKY);
    assert_eq!(flaky.text("outcome"), "passed");
    assert_eq!(flaky.int("attempts"), Some(2));
    assert_eq!(flaky.int("flaky"), Some(1), "stored as flaky");
    let calls = call_reports(&db, &run_id, FLAKY);
    assert_eq!(calls.len(), 2, "both attempts are kept: {calls:?}");
    assert_eq!(calls[0].text("outcome"), "failed");
    assert_eq!(
        calls[0].int("superseded"),
        Some(1),
        "the failed attempt is history"
    );
    assert_eq!(calls[1].text("outcome"), "passed");
    assert_eq!(
        calls[1].int("superseded"),
        Some(0),
        "the passing attempt counts"
    );
    assert_ne!(calls[0].int("lease"), calls[1].int("lease"));
    assert_eq!(
        flaky.int("lease"),
        calls[1].int("lease"),
        "the result is the last attempt's"
    );
    assert_ne!(
        calls[0].int("worker"),
        calls[1].int("worker"),
        "the rerun ran on the other worker"
    );
    let steady = result(&db, &run_id, "test_flaky.py::test_passes");
    assert_eq!(steady.int("attempts"), Some(1));
    assert_eq!(steady.int("flaky"), Some(0));
    assert_eq!(db.run(&run_id).int("exit_code"), Some(0));
}

#[test]
fn flaky_fails_makes_a_flaky_test_fail_the_run() {
    let sandbox = Sandbox::new("reruns-flaky-fails");
    let dir = suite(&sandbox);
    let db_path = sandbox.path("fly.db");
    let run = run(
        &dir,
        &db_path,
        &["--reruns", "2", "--flaky-fails"],
        &["test_flaky.py"],
    );
    assert_eq!(
        run.code,
        Some(1),
        "--flaky-fails: a flaky test fails the run\n{}",
        run.describe()
    );
    assert!(
        run.stdout.contains(&format!("FLAKY {FLAKY}")) && run.stdout.contains("--flaky-fails"),
        "the output says why the run failed\n{}",
        run.describe()
    );
    let db = FlyDb::open_or_panic(&db_path);
    let run_id = db.run_id();
    assert_eq!(result(&db, &run_id, FLAKY).int("flaky"), Some(1));
    assert_eq!(db.run(&run_id).int("exit_code"), Some(1));
}

#[test]
fn a_test_that_always_fails_takes_every_rerun_and_fails_the_run() {
    let sandbox = Sandbox::new("reruns-always");
    let dir = suite(&sandbox);
    let db_path = sandbox.path("fly.db");
    let run = run(&dir, &db_path, &["--reruns", "2"], &["test_always.py"]);
    assert_eq!(run.code, Some(1), "{}", run.describe());
    assert!(
        run.last_stdout_line().contains("1 failed, 2 rerun in"),
        "{}",
        run.describe()
    );
    assert!(
        run.stdout.contains(&format!("FAILED {ALWAYS}")),
        "the last attempt's failure is reported\n{}",
        run.describe()
    );
    let db = FlyDb::open_or_panic(&db_path);
    let run_id = db.run_id();
    let failed = result(&db, &run_id, ALWAYS);
    assert_eq!(failed.text("outcome"), "failed");
    assert_eq!(
        failed.int("attempts"),
        Some(3),
        "the first attempt and two reruns"
    );
    assert_eq!(failed.int("flaky"), Some(0));
    let calls = call_reports(&db, &run_id, ALWAYS);
    assert_eq!(calls.len(), 3, "{calls:?}");
    let counted: Vec<i64> = calls.iter().filter_map(|r| r.int("superseded")).collect();
    assert_eq!(counted, vec![1, 1, 0], "only the last attempt counts");
}
