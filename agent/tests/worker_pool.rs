//! The worker pool against real pytest: collection, pytest's own verdicts, fixture lifetimes
//! under the nextitem contract, heavy output, early pytest exits, crashes and clean shutdown.
//!
//! Python comes from `FLY_TEST_PYTHON`, else the workspace's `.venv`, else `python3`; it needs
//! pytest installed. Each test copies a project from `tests/fixtures/` into a temp dir.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::time::Duration;

use fly_agent::worker::{PoolConfig, PoolEvent, WorkerError, WorkerPool};
use fly_common::proto::{CollectedTest, Phase, PhaseReport};
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;

/// A guard against a hung test run, never a timing assertion.
const PATIENCE: Duration = Duration::from_secs(120);

fn python() -> PathBuf {
    if let Some(python) = std::env::var_os("FLY_TEST_PYTHON") {
        return PathBuf::from(python);
    }
    let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin/python");
    if venv.exists() {
        return venv;
    }
    PathBuf::from("python3")
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            if entry.file_name() != "__pycache__" {
                copy_dir(&entry.path(), &target);
            }
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

/// A pool over a fresh copy of one fixture project, and everything it reported.
struct Harness {
    pool: Option<WorkerPool>,
    events: mpsc::Receiver<PoolEvent>,
    project: tempfile::TempDir,
    scratch: tempfile::TempDir,
    record: Record,
}

#[derive(Default)]
struct Record {
    started: Vec<(u32, u64)>,
    reports: Vec<(u32, PhaseReport)>,
    finished: Vec<(u32, u64)>,
    revoked: Vec<(u32, Vec<u64>)>,
    exited: Vec<Exited>,
    collection_failed: Vec<(i32, String)>,
}

#[derive(Debug, Clone)]
struct Exited {
    worker: u32,
    exit_code: i32,
    signal: i32,
    reason: String,
    unstarted: Vec<u64>,
}

impl Record {
    fn report(&self, lease: u64, phase: Phase) -> &PhaseReport {
        let found = self
            .reports
            .iter()
            .find(|(_, r)| r.lease == lease && r.phase == phase as i32);
        match found {
            Some((_, report)) => report,
            None => panic!("no {phase:?} report for lease {lease}: {:#?}", self.reports),
        }
    }

    fn categories(&self, lease: u64) -> Vec<(Phase, String)> {
        self.reports
            .iter()
            .filter(|(_, r)| r.lease == lease)
            .map(|(_, r)| (Phase::try_from(r.phase).unwrap(), r.category.clone()))
            .collect()
    }

    fn note(&mut self, event: &PoolEvent) {
        match event.clone() {
            PoolEvent::Started { worker, lease, .. } => self.started.push((worker, lease)),
            PoolEvent::Report { worker, report } => self.reports.push((worker, report)),
            PoolEvent::Finished { worker, lease, .. } => self.finished.push((worker, lease)),
            PoolEvent::Revoked { worker, leases } => self.revoked.push((worker, leases)),
            PoolEvent::Exited {
                worker,
                exit_code,
                signal,
                reason,
                unstarted,
            } => self.exited.push(Exited {
                worker,
                exit_code,
                signal,
                reason,
                unstarted,
            }),
            PoolEvent::CollectionFailed { exit_code, output } => {
                self.collection_failed.push((exit_code, output))
            }
            PoolEvent::Collected { .. } | PoolEvent::WantWork { .. } => {}
        }
    }
}

async fn start(fixture: &str, args: &[&str], workers: u32, env: &[(&str, &str)]) -> Harness {
    let project = tempfile::Builder::new()
        .prefix("fly-fixture-")
        .tempdir()
        .unwrap();
    let scratch = tempfile::Builder::new()
        .prefix("fly-scratch-")
        .tempdir()
        .unwrap();
    copy_dir(
        &Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures")
            .join(fixture),
        project.path(),
    );
    let mut extra_env = vec![
        (
            "FLY_FIXTURE_LOG".to_string(),
            scratch.path().join("fixture.log").display().to_string(),
        ),
        (
            "FLY_PID_FILE".to_string(),
            scratch.path().join("pids").display().to_string(),
        ),
        ("PYTHONDONTWRITEBYTECODE".to_string(), "1".to_string()),
    ];
    extra_env.extend(env.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    let config = PoolConfig {
        python: python(),
        workdir: project.path().to_path_buf(),
        pytest_args: args.iter().map(|a| a.to_string()).collect(),
        workers,
        run_id: "test-run".into(),
        extra_env,
    };
    let (tx, rx) = mpsc::channel(10_000);
    let pool = WorkerPool::start(config, tx).await.unwrap();
    Harness {
        pool: Some(pool),
        events: rx,
        project,
        scratch,
        record: Record::default(),
    }
}

impl Harness {
    fn pool(&self) -> &WorkerPool {
        self.pool.as_ref().unwrap()
    }

    async fn next(&mut self) -> PoolEvent {
        let event = tokio::time::timeout(PATIENCE, self.events.recv())
            .await
            .expect("the pool went silent")
            .expect("the pool's event channel closed");
        self.record.note(&event);
        event
    }

    async fn collected(&mut self) -> (Vec<CollectedTest>, u32, String) {
        match self.next().await {
            PoolEvent::Collected {
                tests,
                deselected,
                digest,
            } => (tests, deselected, digest),
            other => panic!("expected the collection, got {other:?}"),
        }
    }

    async fn collection_failed(&mut self) -> (i32, String) {
        match self.next().await {
            PoolEvent::CollectionFailed { exit_code, output } => (exit_code, output),
            other => panic!("expected a failed collection, got {other:?}"),
        }
    }

    /// Waits for an event matching `want`, recording everything on the way.
    async fn wait_for(&mut self, what: &str, want: impl Fn(&PoolEvent) -> bool) -> PoolEvent {
        loop {
            let event = self.next().await;
            if want(&event) {
                return event;
            }
            assert!(
                !matches!(event, PoolEvent::Exited { .. }) || what.contains("exit"),
                "a worker exited while waiting for {what}: {event:?}"
            );
        }
    }

    /// Hands `plan` out on demand, `batches[i % len]` tests per request, and waits until every
    /// lease finished.
    async fn run(&mut self, plan: Vec<(u64, u32)>, batches: &[usize]) {
        let total = plan.len();
        let mut queue: VecDeque<_> = plan.into();
        let mut requests = 0;
        while self.record.finished.len() < total {
            if let PoolEvent::WantWork { worker } = self.next().await {
                let take = batches[requests % batches.len()].min(queue.len());
                requests += 1;
                if take == 0 {
                    self.pool().no_more(worker).unwrap();
                } else {
                    self.pool()
                        .assign(worker, queue.drain(..take).collect())
                        .unwrap();
                }
            }
        }
    }

    /// Shuts the pool down and records every event until the pool is gone.
    async fn shutdown(&mut self, grace: Duration) {
        let pool = self.pool.take().unwrap();
        let shutdown = tokio::spawn(pool.shutdown(grace));
        while let Ok(Some(event)) = tokio::time::timeout(PATIENCE, self.events.recv()).await {
            self.record.note(&event);
        }
        tokio::time::timeout(PATIENCE, shutdown)
            .await
            .unwrap()
            .unwrap();
    }

    fn fixture_log(&self) -> Vec<String> {
        std::fs::read_to_string(self.scratch.path().join("fixture.log"))
            .unwrap_or_default()
            .lines()
            .map(String::from)
            .collect()
    }

    fn pids(&self) -> Vec<i32> {
        std::fs::read_to_string(self.scratch.path().join("pids"))
            .unwrap_or_default()
            .split_whitespace()
            .map(|p| p.parse().unwrap())
            .collect()
    }
}

fn index_of(tests: &[CollectedTest], nodeid: &str) -> u32 {
    tests
        .iter()
        .position(|t| t.nodeid == nodeid)
        .unwrap_or_else(|| panic!("{nodeid} was not collected: {tests:#?}")) as u32
}

/// Leases 1, 2, ... for the given tests, in order.
fn plan(tests: &[CollectedTest], nodeids: &[&str]) -> Vec<(u64, u32)> {
    nodeids
        .iter()
        .enumerate()
        .map(|(i, id)| (i as u64 + 1, index_of(tests, id)))
        .collect()
}

fn line_of(path: &Path, needle: &str) -> u32 {
    let text = std::fs::read_to_string(path).unwrap();
    text.lines().position(|l| l.starts_with(needle)).unwrap() as u32 + 1
}

/// Alive and not a zombie (a zombie has been killed, it only waits to be reaped).
fn alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat
            .rsplit(')')
            .next()
            .unwrap_or("")
            .trim_start()
            .starts_with('Z'),
        Err(_) => unsafe { libc::kill(pid, 0) == 0 },
    }
}

async fn gone(pid: i32) -> bool {
    for _ in 0..500 {
        if !alive(pid) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn collects_with_locations_digest_and_deselection() {
    let mut h = start("outcomes", &[], 2, &[]).await;
    let (tests, deselected, digest) = h.collected().await;
    let nodeids: Vec<&str> = tests.iter().map(|t| t.nodeid.as_str()).collect();
    assert_eq!(
        nodeids,
        [
            "test_other.py::test_other_one",
            "test_other.py::test_other_two",
            "test_outcomes.py::test_pass",
            "test_outcomes.py::test_fail",
            "test_outcomes.py::test_skip",
            "test_outcomes.py::test_xfail",
            "test_outcomes.py::test_xpass",
            "test_outcomes.py::test_setup_error",
            "test_outcomes.py::test_teardown_error",
        ]
    );
    assert_eq!(deselected, 0);
    let mut hasher = Sha256::new();
    for id in &nodeids {
        hasher.update(format!("{id}\n"));
    }
    assert_eq!(digest, hex::encode(hasher.finalize()));
    let pass = &tests[2];
    assert_eq!(pass.file, "test_outcomes.py");
    assert_eq!(
        pass.line,
        line_of(&h.project.path().join("test_outcomes.py"), "def test_pass")
    );
    // A decorated test starts at its first decorator, as pytest reports it.
    assert_eq!(
        tests[4].line,
        line_of(
            &h.project.path().join("test_outcomes.py"),
            "@pytest.mark.skip"
        )
    );
    // Both workers ask for work once the collection is known.
    let mut wanting = Vec::new();
    while wanting.len() < 2 {
        if let PoolEvent::WantWork { worker } = h.next().await {
            wanting.push(worker);
        }
    }
    wanting.sort();
    assert_eq!(wanting, [0, 1]);
    h.shutdown(Duration::from_secs(30)).await;
    assert_eq!(h.record.exited.len(), 2);
    for exited in &h.record.exited {
        assert!(exited.unstarted.is_empty());
        assert_eq!(exited.signal, 0, "{exited:?}");
    }

    let mut h = start("outcomes", &["-k", "pass"], 1, &[]).await;
    let (tests, deselected, _) = h.collected().await;
    let nodeids: Vec<&str> = tests.iter().map(|t| t.nodeid.as_str()).collect();
    assert_eq!(
        nodeids,
        [
            "test_outcomes.py::test_pass",
            "test_outcomes.py::test_xpass"
        ]
    );
    assert_eq!(deselected, 7);
    h.shutdown(Duration::from_secs(30)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_tests_with_pytests_own_categories() {
    let mut h = start("outcomes", &[], 2, &[]).await;
    let (tests, _, _) = h.collected().await;
    let ids = [
        "test_outcomes.py::test_pass",
        "test_outcomes.py::test_fail",
        "test_outcomes.py::test_skip",
        "test_outcomes.py::test_xfail",
        "test_outcomes.py::test_xpass",
        "test_outcomes.py::test_setup_error",
        "test_outcomes.py::test_teardown_error",
        "test_other.py::test_other_one",
        "test_other.py::test_other_two",
    ];
    h.run(plan(&tests, &ids), &[2]).await;
    let r = &h.record;
    let quiet = |phase: Phase| (phase, String::new());
    let s = |phase: Phase, c: &str| (phase, c.to_string());
    assert_eq!(
        r.categories(1),
        [
            quiet(Phase::Setup),
            s(Phase::Call, "passed"),
            quiet(Phase::Teardown)
        ]
    );
    assert_eq!(
        r.categories(2),
        [
            quiet(Phase::Setup),
            s(Phase::Call, "failed"),
            quiet(Phase::Teardown)
        ]
    );
    assert_eq!(
        r.categories(3),
        [s(Phase::Setup, "skipped"), quiet(Phase::Teardown)]
    );
    assert_eq!(
        r.categories(4),
        [
            quiet(Phase::Setup),
            s(Phase::Call, "xfailed"),
            quiet(Phase::Teardown)
        ]
    );
    assert_eq!(
        r.categories(5),
        [
            quiet(Phase::Setup),
            s(Phase::Call, "xpassed"),
            quiet(Phase::Teardown)
        ]
    );
    assert_eq!(
        r.categories(6),
        [s(Phase::Setup, "error"), quiet(Phase::Teardown)]
    );
    assert_eq!(
        r.categories(7),
        [
            quiet(Phase::Setup),
            s(Phase::Call, "passed"),
            s(Phase::Teardown, "error")
        ]
    );

    let passed = r.report(1, Phase::Call);
    assert_eq!(passed.outcome, "passed");
    assert_eq!(passed.message, "");
    assert!(passed
        .sections
        .iter()
        .any(|s| s.name == "Captured stdout call" && s.text.contains("hello from test_pass")));
    assert!(passed.stop >= passed.start && passed.start > 1.0e9);

    let failed = r.report(2, Phase::Call);
    assert_eq!(failed.outcome, "failed");
    assert_eq!(failed.message, "assert 1 == 2");
    assert!(
        failed.longrepr.contains("def test_fail"),
        "{}",
        failed.longrepr
    );
    assert_eq!(r.report(3, Phase::Setup).message, "not today");
    assert_eq!(r.report(3, Phase::Setup).outcome, "skipped");
    assert_eq!(r.report(4, Phase::Call).message, "known bug");
    assert_eq!(r.report(4, Phase::Call).outcome, "skipped");
    let setup_error = r.report(6, Phase::Setup);
    assert_eq!(setup_error.message, "RuntimeError: setup boom");
    assert!(setup_error.longrepr.contains("setup boom"));
    assert_eq!(
        r.report(7, Phase::Teardown).message,
        "RuntimeError: teardown boom"
    );

    // Both workers took part; every lease was started once and finished once.
    assert!(r.started.iter().any(|(w, _)| *w == 0));
    assert!(r.started.iter().any(|(w, _)| *w == 1));
    let mut finished: Vec<u64> = r.finished.iter().map(|(_, l)| *l).collect();
    finished.sort();
    assert_eq!(finished, (1..=9).collect::<Vec<_>>());

    h.shutdown(Duration::from_secs(30)).await;
    let mut ended: Vec<u32> = h.record.exited.iter().map(|e| e.worker).collect();
    ended.sort();
    assert_eq!(ended, [0, 1]);
    for exited in &h.record.exited {
        // pytest's own exit code: tests failed.
        assert_eq!(exited.exit_code, 1, "{exited:?}");
        assert!(exited.unstarted.is_empty());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn module_fixtures_live_once_per_module_when_tests_come_one_or_two_at_a_time() {
    let mut h = start("scoped", &[], 1, &[]).await;
    let (tests, _, _) = h.collected().await;
    let ids: Vec<&str> = tests.iter().map(|t| t.nodeid.as_str()).collect();
    let work = plan(&tests, &ids);
    h.run(work, &[1, 2]).await;
    // The last test ran knowing nothing follows: everything is torn down already.
    assert_eq!(
        h.fixture_log(),
        [
            "setup session",
            "setup test_mod_a",
            "teardown test_mod_a",
            "setup test_mod_b",
            "teardown test_mod_b",
            "teardown session",
        ]
    );
    assert!(h.record.reports.iter().all(|(_, r)| r.outcome == "passed"));
    h.shutdown(Duration::from_secs(30)).await;
    assert_eq!(h.record.exited.len(), 1);
    assert_eq!(h.record.exited[0].exit_code, 0);
    assert_eq!(h.fixture_log().len(), 6);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoking_unstarted_tests_keeps_fixture_lifetimes_right() {
    let gate = tempfile::tempdir().unwrap();
    let gate_file = gate.path().join("open");
    let gate_env = gate_file.display().to_string();
    let mut h = start("scoped", &[], 1, &[("FLY_GATE", &gate_env)]).await;
    let (tests, _, _) = h.collected().await;
    let a1 = index_of(&tests, "test_mod_a.py::test_a1");
    let a2 = index_of(&tests, "test_mod_a.py::test_a2");
    let a3 = index_of(&tests, "test_mod_a.py::test_a3");
    let b1 = index_of(&tests, "test_mod_b.py::test_b1");
    h.wait_for("a want", |e| matches!(e, PoolEvent::WantWork { .. }))
        .await;
    h.pool().assign(0, vec![(1, a1), (2, a2), (3, a3)]).unwrap();
    h.wait_for("the start of lease 1", |e| {
        matches!(e, PoolEvent::Started { lease: 1, .. })
    })
    .await;
    // Lease 1 runs (held at the gate) with lease 2 as its next test; 2 and 3 are taken back,
    // lease 1 cannot be.
    h.pool().revoke(0, vec![1, 2, 3]).unwrap();
    let revoked = h
        .wait_for("the revoke's answer", |e| {
            matches!(e, PoolEvent::Revoked { .. })
        })
        .await;
    assert_eq!(
        revoked,
        PoolEvent::Revoked {
            worker: 0,
            leases: vec![2, 3]
        }
    );
    std::fs::write(&gate_file, "").unwrap();
    h.wait_for("lease 1 to finish", |e| {
        matches!(e, PoolEvent::Finished { lease: 1, .. })
    })
    .await;
    h.wait_for("a want", |e| matches!(e, PoolEvent::WantWork { .. }))
        .await;
    h.pool().assign(0, vec![(4, b1)]).unwrap();
    h.pool().no_more(0).unwrap();
    h.wait_for("lease 4 to finish", |e| {
        matches!(e, PoolEvent::Finished { lease: 4, .. })
    })
    .await;
    assert_eq!(
        h.fixture_log(),
        [
            "setup session",
            "setup test_mod_a",
            "waiting at the gate",
            "teardown test_mod_a",
            "setup test_mod_b",
            "teardown test_mod_b",
            "teardown session",
        ]
    );
    assert!(h.record.reports.iter().all(|(_, r)| r.outcome == "passed"));
    let started: Vec<u64> = h.record.started.iter().map(|(_, l)| *l).collect();
    assert_eq!(started, [1, 4]);
    h.shutdown(Duration::from_secs(30)).await;
    assert_eq!(h.record.exited[0].unstarted, Vec::<u64>::new());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_megabyte_of_output_arrives_and_the_channel_carries_on() {
    let mut h = start("output", &[], 1, &[]).await;
    let (tests, _, _) = h.collected().await;
    let work = plan(
        &tests,
        &[
            "test_output.py::test_prints_a_megabyte",
            "test_output.py::test_after",
        ],
    );
    h.run(work, &[1]).await;
    let big = h.record.report(1, Phase::Call);
    assert_eq!(big.outcome, "passed");
    let stdout = big
        .sections
        .iter()
        .find(|s| s.name == "Captured stdout call")
        .expect("captured stdout");
    assert_eq!(stdout.text.len(), 1024 * 1024);
    assert_eq!(h.record.report(2, Phase::Call).outcome, "passed");
    h.shutdown(Duration::from_secs(30)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tests_printing_and_reading_stdin_under_dash_s_leave_the_channel_alone() {
    let mut h = start("output", &["-s"], 1, &[]).await;
    let (tests, _, _) = h.collected().await;
    let ids: Vec<&str> = tests.iter().map(|t| t.nodeid.as_str()).collect();
    h.run(plan(&tests, &ids), &[3]).await;
    for lease in 1..=3 {
        let call = h.record.report(lease, Phase::Call);
        assert_eq!(call.outcome, "passed", "{}", call.longrepr);
    }
    h.shutdown(Duration::from_secs(30)).await;
    assert_eq!(h.record.exited[0].exit_code, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_usage_error_fails_the_collection_with_pytests_message() {
    let mut h = start("outcomes", &["--no-such-option"], 2, &[]).await;
    let (exit_code, output) = h.collection_failed().await;
    assert_eq!(exit_code, 4);
    assert!(output.contains("usage:"), "{output}");
    assert!(
        output.contains("unrecognized arguments: --no-such-option"),
        "{output}"
    );
    h.shutdown(Duration::from_secs(30)).await;
    // One failure for the run, whatever the number of workers.
    assert_eq!(h.record.collection_failed.len(), 1);
    assert_eq!(h.record.exited.len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_path_is_a_usage_error() {
    let mut h = start("outcomes", &["no_such_dir/test_x.py"], 1, &[]).await;
    let (exit_code, output) = h.collection_failed().await;
    assert_eq!(exit_code, 4);
    assert!(output.contains("not found"), "{output}");
    assert!(output.contains("no_such_dir/test_x.py"), "{output}");
    h.shutdown(Duration::from_secs(30)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn collection_errors_stop_the_run_with_pytests_report() {
    let mut h = start("broken", &[], 2, &[]).await;
    let (exit_code, output) = h.collection_failed().await;
    assert_eq!(exit_code, 2);
    assert!(output.contains("no_such_module_for_fly"), "{output}");
    assert!(output.contains("error during collection"), "{output}");
    h.shutdown(Duration::from_secs(30)).await;
    assert!(h.record.started.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_dying_before_collecting_fails_the_collection() {
    let mut h = start("dies_early", &[], 2, &[]).await;
    let (exit_code, output) = h.collection_failed().await;
    assert_eq!(exit_code, 7);
    assert!(output.contains("conftest is dying"), "{output}");
    h.shutdown(Duration::from_secs(30)).await;
    assert_eq!(h.record.collection_failed.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_collecting_different_tests_are_refused() {
    let mut h = start("disagree", &[], 2, &[]).await;
    let (exit_code, output) = h.collection_failed().await;
    assert_eq!(exit_code, 2);
    assert!(output.contains("collected different tests"), "{output}");
    assert!(output.contains("test_d.py::test_d[gw"), "{output}");
    h.shutdown(Duration::from_secs(30)).await;
}

/// Runs `crasher` then two fine tests on one worker, all handed over at once.
async fn crash_run(crasher: &str) -> Harness {
    let mut h = start("crash", &[], 1, &[]).await;
    let (tests, _, _) = h.collected().await;
    let work = plan(
        &tests,
        &[
            &format!("test_crash.py::{crasher}"),
            "test_crash.py::test_fine",
            "test_crash.py::test_fine_too",
        ],
    );
    h.wait_for("a want", |e| matches!(e, PoolEvent::WantWork { .. }))
        .await;
    h.pool().assign(0, work).unwrap();
    h.wait_for("the worker's exit", |e| {
        matches!(e, PoolEvent::Exited { .. })
    })
    .await;
    h
}

fn assert_crash_reported(r: &Record, lease: u64, expect: &str) {
    let call = r.report(lease, Phase::Call);
    assert_eq!(call.outcome, "failed");
    assert_eq!(call.category, "failed");
    assert!(call.longrepr.contains(expect), "{}", call.longrepr);
    assert!(call.message.contains(expect), "{}", call.message);
    // The crash report comes before the test's end, and the end before the worker's exit.
    assert_eq!(r.finished, [(0, lease)]);
    assert_eq!(r.exited.len(), 1);
    assert_eq!(r.exited[0].unstarted, [2, 3]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn os_exit_in_a_test_is_reported_as_a_crash() {
    let mut h = crash_run("test_exits").await;
    assert_crash_reported(
        &h.record,
        1,
        "worker 0 crashed while running this test: exit code 3",
    );
    assert_eq!(h.record.exited[0].exit_code, 3);
    assert_eq!(h.record.exited[0].signal, 0);
    h.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_segfault_in_a_test_is_reported_as_a_crash() {
    let mut h = crash_run("test_segfaults").await;
    assert_crash_reported(
        &h.record,
        1,
        "worker 0 crashed while running this test: killed by signal 11 (SIGSEGV)",
    );
    // pytest's faulthandler writes the Python traceback to the worker's stderr.
    let call = h.record.report(1, Phase::Call);
    assert!(
        call.longrepr.contains("Segmentation fault"),
        "{}",
        call.longrepr
    );
    assert!(call.longrepr.contains("test_crash.py"), "{}", call.longrepr);
    assert_eq!(h.record.exited[0].signal, libc::SIGSEGV);
    assert!(h.record.exited[0].reason.contains("SIGSEGV"));
    h.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_about_a_lease_never_given_stops_the_worker() {
    let mut h = crash_run("test_reports_a_lease_it_was_not_given").await;
    assert_crash_reported(&h.record, 1, "lease 999999");
    assert!(h
        .record
        .report(1, Phase::Call)
        .longrepr
        .contains("protocol error"));
    assert_eq!(h.record.exited[0].signal, libc::SIGKILL);
    h.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_on_the_channel_stops_the_worker() {
    let mut h = crash_run("test_sends_garbage").await;
    assert_crash_reported(&h.record, 1, "unreadable message");
    assert_eq!(h.record.exited[0].signal, libc::SIGKILL);
    h.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_leaves_no_process_behind() {
    let mut h = start("crash", &[], 1, &[]).await;
    let (tests, _, _) = h.collected().await;
    let work = plan(&tests, &["test_crash.py::test_leaves_a_process_behind"]);
    h.run(work, &[1]).await;
    assert_eq!(h.record.report(1, Phase::Call).outcome, "passed");
    let pids = h.pids();
    assert_eq!(pids.len(), 2);
    assert!(
        alive(pids[1]),
        "the test's child should still run before shutdown"
    );
    h.shutdown(Duration::from_secs(30)).await;
    assert_eq!(h.record.exited.len(), 1);
    assert_eq!(h.record.exited[0].exit_code, 0, "{:?}", h.record.exited[0]);
    assert!(h.record.exited[0].reason.contains("pytest finished"));
    for pid in pids {
        assert!(gone(pid).await, "process {pid} survived the shutdown");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_kills_a_test_that_does_not_finish_in_time() {
    let mut h = start("crash", &[], 1, &[]).await;
    let (tests, _, _) = h.collected().await;
    let work = plan(&tests, &["test_crash.py::test_hangs"]);
    h.wait_for("a want", |e| matches!(e, PoolEvent::WantWork { .. }))
        .await;
    h.pool().assign(0, work).unwrap();
    h.pool().no_more(0).unwrap();
    h.wait_for("the start", |e| matches!(e, PoolEvent::Started { .. }))
        .await;
    h.shutdown(Duration::from_millis(500)).await;
    let call = h.record.report(1, Phase::Call);
    assert!(
        call.longrepr.contains("shutdown grace"),
        "{}",
        call.longrepr
    );
    assert_eq!(h.record.finished, [(0, 1)]);
    assert_eq!(h.record.exited[0].signal, libc::SIGKILL);
    for pid in h.pids() {
        assert!(gone(pid).await, "process {pid} survived the shutdown");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_the_pool_kills_its_workers() {
    let mut h = start("crash", &[], 1, &[]).await;
    let (tests, _, _) = h.collected().await;
    let work = plan(&tests, &["test_crash.py::test_hangs"]);
    h.wait_for("a want", |e| matches!(e, PoolEvent::WantWork { .. }))
        .await;
    h.pool().assign(0, work).unwrap();
    h.pool().no_more(0).unwrap();
    h.wait_for("the start", |e| matches!(e, PoolEvent::Started { .. }))
        .await;
    let mut pids = Vec::new();
    for _ in 0..500 {
        pids = h.pids();
        if !pids.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(pids.len(), 1);
    drop(h.pool.take());
    assert!(gone(pids[0]).await, "the worker survived the pool");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pool_refuses_work_it_cannot_place() {
    let mut h = start("outcomes", &[], 1, &[]).await;
    assert!(matches!(
        h.pool().assign(0, vec![(1, 0)]),
        Err(WorkerError::NotCollected)
    ));
    let (tests, _, _) = h.collected().await;
    assert!(matches!(
        h.pool().assign(3, vec![(1, 0)]),
        Err(WorkerError::NoSuchWorker {
            worker: 3,
            workers: 1
        })
    ));
    let beyond = tests.len() as u32;
    assert!(matches!(
        h.pool().assign(0, vec![(1, beyond)]),
        Err(WorkerError::BadTestIndex { .. })
    ));
    h.shutdown(Duration::from_secs(30)).await;
    assert!(matches!(
        WorkerPool::start(
            PoolConfig {
                python: PathBuf::from("no-such-python-for-fly"),
                workdir: h.project.path().to_path_buf(),
                pytest_args: Vec::new(),
                workers: 1,
                run_id: "r".into(),
                extra_env: Vec::new(),
            },
            mpsc::channel(1).0,
        )
        .await,
        Err(WorkerError::Spawn { .. })
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn collect_only_reports_the_collection_and_ends() {
    let mut h = start("outcomes", &["--collect-only", "-q"], 2, &[]).await;
    let (tests, _, _) = h.collected().await;
    assert_eq!(tests.len(), 9);
    // Nothing runs: both workers end on their own, without asking for work.
    while h.record.exited.len() < 2 {
        let event = h.next().await;
        assert!(!matches!(event, PoolEvent::WantWork { .. }), "{event:?}");
    }
    for exited in &h.record.exited {
        assert_eq!(exited.exit_code, 0, "{exited:?}");
    }
    h.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_collection_larger_than_one_message_arrives_whole_and_in_order() {
    let mut h = start("many", &[], 1, &[]).await;
    let (tests, _, _) = h.collected().await;
    assert_eq!(tests.len(), 25_000);
    for (n, test) in tests.iter().enumerate() {
        assert_eq!(test.nodeid, format!("test_many.py::test_many[{n}]"));
    }
    let (lease, index) = (1, 24_999);
    h.wait_for("a want", |e| matches!(e, PoolEvent::WantWork { .. }))
        .await;
    h.pool().assign(0, vec![(lease, index)]).unwrap();
    h.pool().no_more(0).unwrap();
    h.wait_for("the test's end", |e| {
        matches!(e, PoolEvent::Finished { .. })
    })
    .await;
    assert_eq!(h.record.report(lease, Phase::Call).outcome, "passed");
    h.shutdown(Duration::from_secs(30)).await;
}
