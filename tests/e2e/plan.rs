//! The what-if planner: `fly-coordinator plan` replays a recorded run through the scheduler, and
//! its prediction for the worker count the run really used comes close to the wall time that
//! run took. This compares a prediction with a measurement of the same run; it asserts nothing
//! about how fast fly is.

use std::path::Path;
use std::process::Command;

use fly_tests::db::FlyDb;
use fly_tests::fly;
use fly_tests::paths::fly_binary;
use fly_tests::process::{Finished, Proc};
use fly_tests::sandbox::Sandbox;
use fly_tests::HANG_GUARD;

/// Writes a sleeping suite of 7.5 s of test time: one 2 s test, two medium ones and 24 short
/// ones of 0.05 to 0.3 s, the long test last in collection order.
fn write_sleeping_suite(dir: &Path) {
    std::fs::create_dir_all(dir).expect("suite dir");
    for file in 0..3 {
        let mut body = String::from("import time\n");
        for test in 0..8 {
            let seconds = 0.05 + 0.05 * ((file * 8 + test) % 6) as f64;
            body.push_str(&format!(
                "\ndef test_short_{test}():\n    time.sleep({seconds:.2})\n"
            ));
        }
        std::fs::write(dir.join(format!("test_a{file}.py")), body).expect("write suite");
    }
    std::fs::write(
        dir.join("test_b_medium.py"),
        "import time\n\ndef test_medium_1():\n    time.sleep(0.8)\n\n\
         def test_medium_2():\n    time.sleep(0.5)\n",
    )
    .expect("write suite");
    std::fs::write(
        dir.join("test_z_long.py"),
        "import time\n\ndef test_long():\n    time.sleep(2.0)\n",
    )
    .expect("write suite");
}

fn plan(cwd: &Path, args: &[&str]) -> Finished {
    let mut command = Command::new(fly_binary("fly-coordinator"));
    command
        .arg("plan")
        .args(args)
        .current_dir(cwd)
        .env_remove("FLY_DB");
    Proc::spawn("fly-coordinator plan", &mut command).wait(HANG_GUARD)
}

/// The predicted wall time in the table row for `workers`.
fn predicted(output: &str, workers: u32) -> Option<f64> {
    let row = output
        .lines()
        .find(|line| line.split_whitespace().next() == Some(&workers.to_string()))?;
    row.split_whitespace().nth(1)?.parse().ok()
}

#[test]
fn the_prediction_for_the_workers_used_is_close_to_the_measured_wall_time() {
    let sandbox = Sandbox::new("plan");
    let suite = sandbox.path("suite");
    write_sleeping_suite(&suite);
    let db_path = sandbox.path("fly.db");

    // The first run records history; the second one is scheduled from it, longest first.
    for label in ["first", "second"] {
        let run = fly::run_local(&suite, &db_path, None, &[]).wait(HANG_GUARD);
        assert_eq!(run.code, Some(0), "{label} run\n{}", run.describe());
    }
    let db = FlyDb::open_or_panic(&db_path);
    let run_id = db.run_id();
    let rows = db
        .query(
            "runs",
            "SELECT finished_at - started_at AS wall FROM runs WHERE id = ?1",
            &[&run_id],
        )
        .unwrap_or_else(|e| panic!("{e}"));
    let measured: f64 = rows
        .first()
        .and_then(|row| row.text("wall").parse().ok())
        .unwrap_or_else(|| panic!("the run's wall time: {rows:?}"));

    let db_arg = db_path.to_string_lossy().into_owned();
    let out = plan(&suite, &["--db", &db_arg, "--workers", "1,2,4"]);
    assert_eq!(out.code, Some(0), "{}", out.describe());
    assert!(
        out.stdout.contains(&run_id),
        "replays the latest run\n{}",
        out.stdout
    );
    assert!(
        out.stdout.contains("<- used"),
        "marks the worker count the run used\n{}",
        out.stdout
    );
    assert!(
        out.stdout
            .contains("longest test: test_z_long.py::test_long"),
        "{}",
        out.stdout
    );
    let prediction = predicted(&out.stdout, 2)
        .unwrap_or_else(|| panic!("no prediction for 2 workers\n{}", out.stdout));
    let error = (prediction - measured).abs() / measured;
    assert!(
        error <= 0.10,
        "predicted {prediction:.3} s for 2 workers, the run took {measured:.3} s ({:.1}% off)\n{}",
        error * 100.0,
        out.stdout
    );
    let one = predicted(&out.stdout, 1).unwrap_or_else(|| panic!("{}", out.stdout));
    assert!(
        one > prediction,
        "one worker is predicted slower than two\n{}",
        out.stdout
    );
}

#[test]
fn a_missing_database_or_run_is_a_clear_error() {
    let sandbox = Sandbox::new("plan-missing");
    let dir = sandbox.dir("project");
    let missing = sandbox.path("nowhere.db");
    let out = plan(&dir, &["--db", &missing.to_string_lossy()]);
    assert_eq!(out.code, Some(3), "{}", out.describe());
    assert!(out.stderr.contains("no database at"), "{}", out.describe());
    assert!(!missing.exists(), "plan creates no database");

    let suite = sandbox.path("suite");
    write_sleeping_suite(&suite);
    let db_path = sandbox.path("fly.db");
    let run = fly::run_local(&suite, &db_path, None, &["-k", "short_1"]).wait(HANG_GUARD);
    assert_eq!(run.code, Some(0), "{}", run.describe());
    let out = plan(
        &dir,
        &["--db", &db_path.to_string_lossy(), "--run", "no-such-run"],
    );
    assert_eq!(out.code, Some(3), "{}", out.describe());
    assert!(
        out.stderr.contains("no run \"no-such-run\""),
        "{}",
        out.describe()
    );
}
