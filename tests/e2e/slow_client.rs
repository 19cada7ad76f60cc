//! A `run` client that stops reading its run (a suspended terminal, a slow link): the
//! coordinator must neither hold the run's results in memory for it nor lose any. The client
//! falls behind, the coordinator reads what it missed back from its database, and once it reads
//! again it prints every failure and writes a JUnit file with every test, each once.

use std::collections::BTreeMap;
use std::process::Command;
use std::time::Duration;

use fly_tests::paths::fly_binary;
use fly_tests::process::Proc;
use fly_tests::pytest::{parse_junit, JunitVerdict};
use fly_tests::sandbox::Sandbox;
use fly_tests::{poll_until, HANG_GUARD};

use crate::dashboard::{get, metric, serve};

const TESTS: usize = 3_000;

/// Every test fails with a traceback and a line of captured output: about 2 KB of results each,
/// 6 MB in all, far more than a follower may have waiting (1 MiB) plus what HTTP/2 buffers.
const SUITE: &str = r#"
import pytest

@pytest.mark.parametrize("i", range(3000))
def test_noisy(i):
    print("x" * 1000)
    assert i < 0, f"on purpose {i}"
"#;

/// The coordinator's `--agent-timeout` here: a connection silent that long (a stopped client's
/// too) is dropped, and a dropped client's run is cancelled.
const AGENT_TIMEOUT: &str = "120";

/// The longest the client stays stopped: well inside [`AGENT_TIMEOUT`], however slowly a busy
/// machine runs the suite.
const STOPPED_AT_MOST: Duration = Duration::from_secs(60);

#[test]
fn a_stopped_client_falls_behind_and_still_gets_every_result_once() {
    let sandbox = Sandbox::new("slow-client");
    let project = sandbox.dir("project");
    std::fs::write(project.join("test_noisy.py"), SUITE).expect("writing the suite");
    let db = sandbox.path("fly.db");
    let junit = sandbox.path("junit.xml");
    let (coordinator, url, http) = serve(
        &sandbox.dir("coordinator"),
        &db,
        &["--agent-timeout", AGENT_TIMEOUT],
        &[],
    );
    let _agent = fly_tests::fly::agent_at("fly-agent", &url, &project, None, &[]);

    let mut command = Command::new(fly_binary("fly-coordinator"));
    command
        .args(["run", "--connect", &url, "--junit-xml"])
        .arg(&junit)
        .args(["--", "-q", "-p", "no:cacheprovider"])
        .current_dir(&project);
    fly_tests::fly::clean_env(&mut command, None);
    let client = Proc::spawn("fly-coordinator run --connect", &mut command);
    poll_until(HANG_GUARD, || {
        client.stderr_so_far().contains("fly: run ").then_some(())
    })
    .unwrap_or_else(|| panic!("the run never started:\n{}", client.stderr_so_far()));
    let finished = |text: &str| metric(text, "fly_tests_finished_total").unwrap_or(0.0);

    // Stopped: it reads nothing while the run goes on.
    client.signal(libc::SIGSTOP);
    let stopped = std::time::Instant::now();
    let behind_at = poll_until(STOPPED_AT_MOST, || {
        let (_, text) = get(&http, "/metrics", &[]);
        (metric(&text, "fly_followers_behind") >= Some(1.0)).then(|| finished(&text))
    });
    // Some more of the run finishes while it stays stopped, then it reads again.
    if let Some(at) = behind_at {
        poll_until(STOPPED_AT_MOST.saturating_sub(stopped.elapsed()), || {
            let (_, text) = get(&http, "/metrics", &[]);
            (finished(&text) >= at + 500.0).then_some(())
        });
    }
    client.signal(libc::SIGCONT);
    let behind_at = behind_at.unwrap_or_else(|| {
        panic!(
            "the stopped client never fell behind\n{}\n--- coordinator ---\n{}",
            get(&http, "/metrics", &[]).1,
            coordinator.stderr_so_far()
        )
    });
    assert!(
        behind_at < TESTS as f64,
        "the client fell behind only once the run had ended"
    );

    let run = client.wait(HANG_GUARD);
    assert_eq!(run.code, Some(1), "{}", run.describe());
    assert!(
        run.last_stdout_line()
            .contains(&format!(" {TESTS} failed in ")),
        "{}",
        run.describe()
    );
    // pytest's short summary names every failure once, with its own message.
    let mut named = vec![0u32; TESTS];
    for line in run.stdout.lines() {
        if let Some(i) = line
            .strip_prefix("FAILED test_noisy.py::test_noisy[")
            .and_then(|rest| rest.split_once("] - AssertionError: on purpose "))
            .and_then(|(i, message)| (i == message).then(|| i.parse::<usize>().ok())?)
        {
            named[i] += 1;
        }
    }
    let wrong: Vec<usize> = (0..TESTS).filter(|&i| named[i] != 1).collect();
    assert!(
        wrong.is_empty(),
        "tests not named exactly once in the short summary: {:?}\n{}",
        &wrong[..wrong.len().min(20)],
        run.describe()
    );
    let xml = std::fs::read_to_string(&junit).expect("the JUnit file");
    let verdicts: BTreeMap<_, _> = parse_junit(&xml).expect("valid JUnit");
    assert_eq!(verdicts.len(), TESTS);
    assert!(verdicts.values().all(|v| *v == JunitVerdict::Failed));
    let mut in_xml = vec![false; TESTS];
    for piece in xml.split("on purpose ").skip(1) {
        let digits: String = piece.chars().take_while(char::is_ascii_digit).collect();
        if let Ok(i) = digits.parse::<usize>() {
            in_xml[i.min(TESTS - 1)] = true;
        }
    }
    assert!(
        in_xml.iter().all(|&seen| seen),
        "some failures are missing from the JUnit file"
    );
    // The client had gone on reading live until its channel filled; the rest came from the
    // database. Once the run is over, nobody is behind any more.
    let (_, text) = get(&http, "/metrics", &[]);
    assert_eq!(metric(&text, "fly_followers_behind"), Some(0.0), "{text}");
    drop(coordinator);
}
