//! `run --require KEY=VALUE` goes only to agents carrying that label (`fly-agent --label`): an
//! idle agent without it is passed over, one with it runs the whole suite.

use std::path::Path;
use std::process::Command;

use fly_tests::db::{try_count, FlyDb};
use fly_tests::fly::{clean_env, Coordinator};
use fly_tests::paths::{fly_binary, python};
use fly_tests::process::Proc;
use fly_tests::sandbox::Sandbox;
use fly_tests::{poll_until, HANG_GUARD};

const SUITE: &str = "
def test_one():
    pass

def test_two():
    pass

def test_three():
    assert 1 + 1 == 2
";

fn labelled_agent(name: &str, url: &str, workdir: &Path, label: &str) -> Proc {
    let mut command = Command::new(fly_binary("fly-agent"));
    command
        .args([
            "--connect",
            url,
            "--workers",
            "1",
            "--label",
            label,
            "--workdir",
        ])
        .arg(workdir)
        .arg("--python")
        .arg(python())
        .current_dir(workdir);
    clean_env(&mut command, None);
    Proc::spawn(name, &mut command)
}

#[test]
fn a_run_requiring_a_label_skips_idle_agents_without_it() {
    let sandbox = Sandbox::new("labels");
    let project = sandbox.dir("suite");
    std::fs::write(project.join("test_labels.py"), SUITE).expect("writing the suite");
    let db = sandbox.path("fly.db");
    let coordinator = Coordinator::serve(&sandbox.path(""), &db);

    // An idle agent that does not match is connected before the run is submitted: had the
    // requirement been ignored, it would have been handed the run at once.
    let _other = labelled_agent("fly-agent alpha", &coordinator.url, &project, "os=alpha");
    poll_until(HANG_GUARD, || {
        (try_count(&db, "agents")? >= 1).then_some(())
    })
    .unwrap_or_else(|| panic!("the first agent never registered"));

    let mut command = Command::new(fly_binary("fly-coordinator"));
    command
        .args(["run", "--connect", &coordinator.url, "--require", "os=beta"])
        .args(["--", "-p", "no:cacheprovider", "."])
        .current_dir(&project);
    clean_env(&mut command, None);
    let run = Proc::spawn("fly-coordinator run --require", &mut command);
    poll_until(HANG_GUARD, || (try_count(&db, "runs")? >= 1).then_some(()))
        .unwrap_or_else(|| panic!("the run was never recorded"));

    let _matching = labelled_agent("fly-agent beta", &coordinator.url, &project, "os=beta");
    let finished = run.wait(HANG_GUARD);
    assert_eq!(finished.code, Some(0), "{}", finished.describe());
    assert!(
        finished.last_stdout_line().contains("3 passed"),
        "{}",
        finished.describe()
    );

    let record = FlyDb::open_or_panic(&db);
    let run_id = record.run_id();
    let served: Vec<String> = record
        .query(
            "run_agents",
            "SELECT a.labels AS labels FROM run_agents r JOIN agents a ON a.id = r.agent_id
             WHERE r.run_id = ?1",
            &[&run_id],
        )
        .unwrap_or_else(|e| panic!("{e}"))
        .iter()
        .map(|row| row.text("labels"))
        .collect();
    assert_eq!(served.len(), 1, "agents that served the run: {served:?}");
    assert!(served[0].contains("beta"), "{served:?}");
}
