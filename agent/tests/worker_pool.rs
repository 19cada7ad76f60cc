//! The worker pool against real pytest: collection, pytest's own verdicts, fixture lifetimes
//! under the nextitem contract, heavy output, early pytest exits, crashes and the replacement
//! of crashed workers (up to a bound), test timeouts with every thread's stack, clean shutdown
//! and draining, each with forked workers (`forked::`) and with spawned ones (`spawned::`).
//!
//! Python comes from `FLY_TEST_PYTHON`, else the workspace's `.venv`, else `python3`; it needs
//! pytest installed. Each test copies a project from `tests/fixtures/` into a temp dir.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::time::Duration;

use fly_agent::worker::{PoolConfig, PoolEvent, WorkerError, WorkerPool, MAX_REPLACEMENTS};
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
    wants: Vec<u32>,
    replaced: Vec<(u32, u32)>,
    unhealthy: Vec<String>,
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
            PoolEvent::WantWork { worker } => self.wants.push(worker),
            PoolEvent::Replaced {
                worker,
                replacement,
            } => self.replaced.push((worker, replacement)),
            PoolEvent::Unhealthy { reason } => self.unhealthy.push(reason),
            PoolEvent::Collected { .. } => {}
        }
    }
}

async fn start(
    fork: bool,
    fixture: &str,
    args: &[&str],
    workers: u32,
    env: &[(&str, &str)],
) -> Harness {
    start_with(fork, fixture, args, workers, env, |_| {}).await
}

/// `start`, with `adjust` changing the pool's configuration first.
async fn start_with(
    fork: bool,
    fixture: &str,
    args: &[&str],
    workers: u32,
    env: &[(&str, &str)],
    adjust: impl FnOnce(&mut PoolConfig),
) -> Harness {
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
        (
            "FLY_PARENT_PID_FILE".to_string(),
            scratch.path().join("parent").display().to_string(),
        ),
        (
            "FLY_GATE_FILE".to_string(),
            scratch.path().join("gate").display().to_string(),
        ),
        (
            "FLY_WORKER_FILE".to_string(),
            scratch.path().join("workers").display().to_string(),
        ),
        ("PYTHONDONTWRITEBYTECODE".to_string(), "1".to_string()),
    ];
    extra_env.extend(env.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    let mut config = PoolConfig {
        python: python(),
        workdir: project.path().to_path_buf(),
        pytest_args: args.iter().map(|a| a.to_string()).collect(),
        workers,
        run_id: "test-run".into(),
        extra_env,
        fork,
        timeout: None,
        max_replacements: MAX_REPLACEMENTS,
    };
    adjust(&mut config);
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

    /// Drains the pool (`hurry` cuts the grace short) and records every event until the pool
    /// is gone.
    async fn drain(
        &mut self,
        grace: Duration,
        hurry: impl std::future::Future<Output = ()> + Send + 'static,
    ) {
        let pool = self.pool.take().unwrap();
        let drain = tokio::spawn(pool.drain(grace, hurry));
        while let Ok(Some(event)) = tokio::time::timeout(PATIENCE, self.events.recv()).await {
            self.record.note(&event);
        }
        tokio::time::timeout(PATIENCE, drain)
            .await
            .unwrap()
            .unwrap();
    }

    /// Lets `test_waits_for_the_gate` finish.
    fn open_gate(&self) {
        std::fs::write(self.scratch.path().join("gate"), b"open").unwrap();
    }

    /// What `test_records_its_worker` wrote: (PYTEST_XDIST_WORKER, worker id, parent pid).
    fn worker_records(&self) -> Vec<(String, u32, u32)> {
        std::fs::read_to_string(self.scratch.path().join("workers"))
            .unwrap_or_default()
            .lines()
            .map(|line| {
                let fields: Vec<&str> = line.split_whitespace().collect();
                (
                    fields[0].to_string(),
                    fields[1].parse().unwrap(),
                    fields[2].parse().unwrap(),
                )
            })
            .collect()
    }

    fn fixture_log(&self) -> Vec<String> {
        std::fs::read_to_string(self.scratch.path().join("fixture.log"))
            .unwrap_or_default()
            .lines()
            .map(String::from)
            .collect()
    }

    fn pids(&self) -> Vec<i32> {
        self.read_pids("pids")
    }

    /// The parent of the worker that wrote `pids`: the fork server, or this test process.
    fn parent_pid(&self) -> i32 {
        let parents = self.read_pids("parent");
        assert_eq!(parents.len(), 1, "{parents:?}");
        parents[0]
    }

    fn read_pids(&self, file: &str) -> Vec<i32> {
        std::fs::read_to_string(self.scratch.path().join(file))
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

async fn collects_with_locations_digest_and_deselection(fork: bool) {
    let mut h = start(fork, "outcomes", &[], 2, &[]).await;
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
    let groups: Vec<&str> = tests.iter().map(|t| t.group.as_str()).collect();
    assert_eq!(groups, ["db", "cache_db", "", "", "", "", "", "", ""]);
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

    let mut h = start(fork, "outcomes", &["-k", "pass"], 1, &[]).await;
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

async fn runs_tests_with_pytests_own_categories(fork: bool) {
    let mut h = start(fork, "outcomes", &[], 2, &[]).await;
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

async fn module_fixtures_live_once_per_module_when_tests_come_one_or_two_at_a_time(fork: bool) {
    let mut h = start(fork, "scoped", &[], 1, &[]).await;
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

async fn revoking_unstarted_tests_keeps_fixture_lifetimes_right(fork: bool) {
    let gate = tempfile::tempdir().unwrap();
    let gate_file = gate.path().join("open");
    let gate_env = gate_file.display().to_string();
    let mut h = start(fork, "scoped", &[], 1, &[("FLY_GATE", &gate_env)]).await;
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
    // Lease 1 runs (held at the gate) with lease 2 as its next test: pytest keeps module a's
    // fixture up for it, so only lease 3 is given back (lease 1 has started).
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
            leases: vec![3]
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
    // Module a's fixture is torn down right after its last test here, before b's test starts.
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
    assert_eq!(started, [1, 2, 4]);
    h.shutdown(Duration::from_secs(30)).await;
    assert_eq!(h.record.exited[0].unstarted, Vec::<u64>::new());
}

async fn a_megabyte_of_output_arrives_and_the_channel_carries_on(fork: bool) {
    let mut h = start(fork, "output", &[], 1, &[]).await;
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

async fn tests_printing_and_reading_stdin_under_dash_s_leave_the_channel_alone(fork: bool) {
    let mut h = start(fork, "output", &["-s"], 1, &[]).await;
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

async fn a_usage_error_fails_the_collection_with_pytests_message(fork: bool) {
    let mut h = start(fork, "outcomes", &["--no-such-option"], 2, &[]).await;
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

async fn a_missing_path_is_a_usage_error(fork: bool) {
    let mut h = start(fork, "outcomes", &["no_such_dir/test_x.py"], 1, &[]).await;
    let (exit_code, output) = h.collection_failed().await;
    assert_eq!(exit_code, 4);
    assert!(output.contains("not found"), "{output}");
    assert!(output.contains("no_such_dir/test_x.py"), "{output}");
    h.shutdown(Duration::from_secs(30)).await;
}

async fn collection_errors_stop_the_run_with_pytests_report(fork: bool) {
    let mut h = start(fork, "broken", &[], 2, &[]).await;
    let (exit_code, output) = h.collection_failed().await;
    assert_eq!(exit_code, 2);
    assert!(output.contains("no_such_module_for_fly"), "{output}");
    assert!(output.contains("error during collection"), "{output}");
    h.shutdown(Duration::from_secs(30)).await;
    assert!(h.record.started.is_empty());
}

async fn a_worker_dying_before_collecting_fails_the_collection(fork: bool) {
    let mut h = start(fork, "dies_early", &[], 2, &[]).await;
    let (exit_code, output) = h.collection_failed().await;
    assert_eq!(exit_code, 7);
    assert!(output.contains("conftest is dying"), "{output}");
    h.shutdown(Duration::from_secs(30)).await;
    assert_eq!(h.record.collection_failed.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spawned_workers_collecting_different_tests_are_refused() {
    let mut h = start(false, "disagree", &[], 2, &[]).await;
    let (exit_code, output) = h.collection_failed().await;
    assert_eq!(exit_code, 2);
    assert!(output.contains("collected different tests"), "{output}");
    assert!(output.contains("test_d.py::test_d[gw"), "{output}");
    h.shutdown(Duration::from_secs(30)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forked_workers_share_one_collection_made_as_worker_0() {
    let mut h = start(true, "disagree", &[], 2, &[]).await;
    let (tests, _, _) = h.collected().await;
    let nodeids: Vec<&str> = tests.iter().map(|t| t.nodeid.as_str()).collect();
    assert_eq!(nodeids, ["test_d.py::test_d[gw0]"]);
    let work = plan(&tests, &["test_d.py::test_d[gw0]"]);
    h.run(work, &[1]).await;
    assert_eq!(h.record.report(1, Phase::Call).outcome, "passed");
    h.shutdown(Duration::from_secs(30)).await;
}

async fn each_worker_has_its_own_environment_session_and_output(fork: bool) {
    let mut h = start(fork, "isolated", &[], 2, &[]).await;
    let (tests, _, _) = h.collected().await;
    let ids: Vec<&str> = tests.iter().map(|t| t.nodeid.as_str()).collect();
    h.run(plan(&tests, &ids), &[1]).await;
    h.shutdown(Duration::from_secs(30)).await;
    let r = &h.record;
    assert!(r.started.iter().any(|(w, _)| *w == 0));
    assert!(r.started.iter().any(|(w, _)| *w == 1));
    for (worker, lease) in &r.started {
        let n = lease - 1;
        let expected: String = (0..40)
            .map(|line| format!("test {n} line {line} on gw{worker}\n"))
            .collect();
        let call = r.report(*lease, Phase::Call);
        let stdout: Vec<&str> = call
            .sections
            .iter()
            .filter(|s| s.name == "Captured stdout call")
            .map(|s| s.text.as_str())
            .collect();
        assert_eq!(
            stdout,
            [expected.as_str()],
            "lease {lease} on worker {worker}"
        );
    }

    let log = h.fixture_log();
    // "... by PID as gwN"
    let pid_of = |line: &str| -> i32 {
        let words: Vec<&str> = line.split(' ').collect();
        let by = words.iter().position(|w| *w == "by").unwrap();
        words[by + 1].parse().unwrap()
    };
    let imports: Vec<&String> = log.iter().filter(|l| l.starts_with("conftest")).collect();
    let mut sessions: Vec<&String> = log.iter().filter(|l| l.contains("set up")).collect();
    sessions.sort_by_key(|l| l.ends_with("gw1"));
    assert_eq!(sessions.len(), 2, "{log:#?}");
    assert!(sessions[0].ends_with("as gw0") && sessions[1].ends_with("as gw1"));
    assert_ne!(pid_of(sessions[0]), pid_of(sessions[1]));
    assert_eq!(log.iter().filter(|l| l.contains("torn down")).count(), 2);
    if fork {
        // One collection, in the fork server, before the fork; session fixtures after it.
        assert_eq!(imports.len(), 1, "{log:#?}");
        assert!(imports[0].ends_with("as gw0"));
        assert!(sessions.iter().all(|s| pid_of(s) != pid_of(imports[0])));
    } else {
        assert_eq!(imports.len(), 2, "{log:#?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fork_server_killed_midway_takes_its_workers_down() {
    let mut h = start(true, "crash", &[], 1, &[]).await;
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
    let fork_server = h.parent_pid();
    unsafe {
        libc::kill(fork_server, libc::SIGKILL);
    }
    h.wait_for("the worker's exit", |e| {
        matches!(e, PoolEvent::Exited { .. })
    })
    .await;
    let call = h.record.report(1, Phase::Call);
    assert_eq!(call.outcome, "failed");
    assert!(call.longrepr.contains("fork server"), "{}", call.longrepr);
    assert!(h.record.exited[0].reason.contains("fork server"));
    assert!(gone(pids[0]).await, "the worker outlived its fork server");
    h.shutdown(Duration::from_secs(5)).await;
}

/// Runs `crasher` then two fine tests on one worker, all handed over at once.
async fn crash_run(fork: bool, crasher: &str) -> Harness {
    crash_run_with(fork, crasher, &[]).await
}

async fn crash_run_with(fork: bool, crasher: &str, args: &[&str]) -> Harness {
    let mut h = start(fork, "crash", args, 1, &[]).await;
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

async fn os_exit_in_a_test_is_reported_as_a_crash(fork: bool) {
    let mut h = crash_run(fork, "test_exits").await;
    assert_crash_reported(
        &h.record,
        1,
        "worker 0 crashed while running this test: exit code 3",
    );
    assert_eq!(h.record.exited[0].exit_code, 3);
    assert_eq!(h.record.exited[0].signal, 0);
    h.shutdown(Duration::from_secs(5)).await;
}

async fn tests_finished_just_before_a_crash_keep_their_reports(fork: bool) {
    // The worker sends its frames in batches: the tests it finished in the moment before the
    // crash may not have gone out yet. They must still arrive, passed, with the crash
    // reported on the test that crashed and nothing else given back but the one after it.
    let mut h = start(fork, "crash", &[], 1, &[]).await;
    let (tests, _, _) = h.collected().await;
    let work = plan(
        &tests,
        &[
            "test_crash.py::test_fine",
            "test_crash.py::test_fine_too",
            "test_crash.py::test_exits",
            "test_crash.py::test_segfaults",
        ],
    );
    h.wait_for("a want", |e| matches!(e, PoolEvent::WantWork { .. }))
        .await;
    h.pool().assign(0, work).unwrap();
    h.wait_for("the worker's exit", |e| {
        matches!(e, PoolEvent::Exited { .. })
    })
    .await;
    for lease in 1..=2 {
        assert_eq!(
            h.record.categories(lease),
            [
                (Phase::Setup, "".to_string()),
                (Phase::Call, "passed".to_string()),
                (Phase::Teardown, "".to_string())
            ],
            "lease {lease}"
        );
    }
    let call = h.record.report(3, Phase::Call);
    assert_eq!(call.outcome, "failed");
    assert!(
        call.longrepr
            .contains("worker 0 crashed while running this test: exit code 3"),
        "{}",
        call.longrepr
    );
    assert_eq!(
        h.record.finished,
        [(0, 1), (0, 2), (0, 3)],
        "{:?}",
        h.record.finished
    );
    assert_eq!(h.record.exited[0].unstarted, [4]);
    h.shutdown(Duration::from_secs(5)).await;
}

async fn a_crash_report_quotes_what_the_test_printed_under_dash_s(fork: bool) {
    // Without capturing, the test's output goes to the worker's own stderr, which the crash
    // report quotes (a forked worker has its own, not the fork server's).
    let mut h = crash_run_with(fork, "test_exits", &["-s"]).await;
    let call = h.record.report(1, Phase::Call);
    assert!(call.longrepr.contains("about to exit"), "{}", call.longrepr);
    h.shutdown(Duration::from_secs(5)).await;
}

async fn a_test_forking_leaves_one_worker_behind(fork: bool) {
    let mut h = start(fork, "crash", &[], 1, &[]).await;
    let (tests, _, _) = h.collected().await;
    let work = plan(
        &tests,
        &[
            "test_crash.py::test_forks_and_the_child_returns",
            "test_crash.py::test_fine",
        ],
    );
    h.run(work, &[2]).await;
    h.shutdown(Duration::from_secs(30)).await;
    let calls: Vec<(u64, &str)> = h
        .record
        .reports
        .iter()
        .filter(|(_, r)| r.phase == Phase::Call as i32)
        .map(|(_, r)| (r.lease, r.outcome.as_str()))
        .collect();
    assert_eq!(calls, [(1, "passed"), (2, "passed")]);
    assert_eq!(h.record.exited.len(), 1);
    assert_eq!(h.record.exited[0].exit_code, 0, "{:?}", h.record.exited[0]);
}

async fn a_segfault_in_a_test_is_reported_as_a_crash(fork: bool) {
    let mut h = crash_run(fork, "test_segfaults").await;
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

async fn a_message_about_a_lease_never_given_stops_the_worker(fork: bool) {
    let mut h = crash_run(fork, "test_reports_a_lease_it_was_not_given").await;
    assert_crash_reported(&h.record, 1, "lease 999999");
    assert!(h
        .record
        .report(1, Phase::Call)
        .longrepr
        .contains("protocol error"));
    assert_eq!(h.record.exited[0].signal, libc::SIGKILL);
    h.shutdown(Duration::from_secs(5)).await;
}

async fn garbage_on_the_channel_stops_the_worker(fork: bool) {
    let mut h = crash_run(fork, "test_sends_garbage").await;
    assert_crash_reported(&h.record, 1, "unreadable message");
    assert_eq!(h.record.exited[0].signal, libc::SIGKILL);
    h.shutdown(Duration::from_secs(5)).await;
}

async fn shutdown_leaves_no_process_behind(fork: bool) {
    let mut h = start(fork, "crash", &[], 1, &[]).await;
    let (tests, _, _) = h.collected().await;
    let work = plan(&tests, &["test_crash.py::test_leaves_a_process_behind"]);
    h.run(work, &[1]).await;
    assert_eq!(h.record.report(1, Phase::Call).outcome, "passed");
    let mut pids = h.pids();
    assert_eq!(pids.len(), 2);
    assert!(
        alive(pids[1]),
        "the test's child should still run before shutdown"
    );
    if fork {
        pids.push(h.parent_pid());
    }
    h.shutdown(Duration::from_secs(30)).await;
    assert_eq!(h.record.exited.len(), 1);
    assert_eq!(h.record.exited[0].exit_code, 0, "{:?}", h.record.exited[0]);
    assert!(h.record.exited[0].reason.contains("pytest finished"));
    for pid in pids {
        assert!(gone(pid).await, "process {pid} survived the shutdown");
    }
}

async fn shutdown_kills_a_test_that_does_not_finish_in_time(fork: bool) {
    let mut h = start(fork, "crash", &[], 1, &[]).await;
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

async fn dropping_the_pool_kills_its_workers(fork: bool) {
    let mut h = start(fork, "crash", &[], 1, &[]).await;
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
    let fork_server = h.parent_pid();
    drop(h.pool.take());
    assert!(gone(pids[0]).await, "the worker survived the pool");
    if fork {
        assert!(gone(fork_server).await, "the fork server survived the pool");
    }
}

async fn the_pool_refuses_work_it_cannot_place(fork: bool) {
    let mut h = start(fork, "outcomes", &[], 1, &[]).await;
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
    let no_python = WorkerPool::start(
        PoolConfig {
            python: PathBuf::from("no-such-python-for-fly"),
            workdir: h.project.path().to_path_buf(),
            pytest_args: Vec::new(),
            workers: 1,
            run_id: "r".into(),
            extra_env: Vec::new(),
            fork,
            timeout: None,
            max_replacements: MAX_REPLACEMENTS,
        },
        mpsc::channel(1).0,
    )
    .await;
    if fork {
        assert!(matches!(
            no_python,
            Err(WorkerError::SpawnForkServer { .. })
        ));
    } else {
        assert!(matches!(no_python, Err(WorkerError::Spawn { .. })));
    }
}

async fn collect_only_reports_the_collection_and_ends(fork: bool) {
    let mut h = start(fork, "outcomes", &["--collect-only", "-q"], 2, &[]).await;
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

async fn a_collection_larger_than_one_message_arrives_whole_and_in_order(fork: bool) {
    let mut h = start(fork, "many", &[], 1, &[]).await;
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

/// A crash in `crasher`, with two more tests held by the worker: they go back, a replacement
/// in the same slot asks for work and runs them (under new leases, as the coordinator would
/// hand them out again) to a pass.
async fn a_replacement_runs_the_rest_after(fork: bool, crasher: &str, expect: &str) {
    let mut h = start(fork, "crash", &[], 1, &[]).await;
    let (tests, _, _) = h.collected().await;
    let work = plan(
        &tests,
        &[
            &format!("test_crash.py::{crasher}"),
            "test_crash.py::test_records_its_worker",
            "test_crash.py::test_fine",
        ],
    );
    h.wait_for("a want", |e| matches!(e, PoolEvent::WantWork { .. }))
        .await;
    h.pool().assign(0, work.clone()).unwrap();
    let replaced = h
        .wait_for("the exit and the replacement", |e| {
            matches!(e, PoolEvent::Replaced { .. })
        })
        .await;
    assert_eq!(
        replaced,
        PoolEvent::Replaced {
            worker: 0,
            replacement: 1
        }
    );
    assert_crash_reported(&h.record, 1, expect);
    h.wait_for("the replacement's want", |e| {
        *e == PoolEvent::WantWork { worker: 1 }
    })
    .await;
    let again = vec![(4, work[1].1), (5, work[2].1)];
    h.pool().assign(1, again).unwrap();
    h.pool().no_more(1).unwrap();
    while h.record.finished.len() < 3 {
        h.next().await;
    }
    assert_eq!(h.record.finished[1..], [(1, 4), (1, 5)]);
    assert_eq!(h.record.report(4, Phase::Call).outcome, "passed");
    assert_eq!(h.record.report(5, Phase::Call).outcome, "passed");
    // Same slot, new worker id; forked from the fork server, or a new process of the agent.
    let records = h.worker_records();
    assert_eq!(records.len(), 1, "{records:?}");
    let (slot, id, parent) = records[0].clone();
    assert_eq!((slot.as_str(), id), ("gw0", 1));
    assert_eq!(parent == std::process::id(), !fork, "parent {parent}");
    h.shutdown(Duration::from_secs(30)).await;
    assert_eq!(h.record.replaced.len(), 1);
    let last = h.record.exited.last().unwrap();
    assert_eq!((last.worker, last.exit_code), (1, 0), "{last:?}");
    assert!(last.unstarted.is_empty());
}

async fn after_os_exit_a_replacement_runs_the_rest(fork: bool) {
    a_replacement_runs_the_rest_after(
        fork,
        "test_exits",
        "worker 0 crashed while running this test: exit code 3",
    )
    .await;
}

async fn after_a_segfault_a_replacement_runs_the_rest(fork: bool) {
    a_replacement_runs_the_rest_after(
        fork,
        "test_segfaults",
        "worker 0 crashed while running this test: killed by signal 11 (SIGSEGV)",
    )
    .await;
}

async fn after_the_last_allowed_replacement_the_pool_is_unhealthy_and_gives_work_back(fork: bool) {
    let mut h = start_with(fork, "crash", &[], 2, &[], |c| c.max_replacements = 1).await;
    let (tests, _, _) = h.collected().await;
    while !(h.record.wants.contains(&0) && h.record.wants.contains(&1)) {
        h.next().await;
    }
    // Worker 1 runs a test held open by the gate, and holds two more.
    let held = plan(
        &tests,
        &[
            "test_crash.py::test_waits_for_the_gate",
            "test_crash.py::test_fine",
            "test_crash.py::test_fine_too",
        ],
    );
    h.pool().assign(1, held).unwrap();
    h.wait_for("the gated start", |e| {
        matches!(e, PoolEvent::Started { lease: 1, .. })
    })
    .await;
    // Worker 0 crashes, its replacement (2) crashes too: that is one crash over the bound.
    let exits = index_of(&tests, "test_crash.py::test_exits");
    h.pool().assign(0, vec![(4, exits)]).unwrap();
    h.pool().no_more(0).unwrap();
    h.wait_for("the first crash's exit and replacement", |e| {
        *e == PoolEvent::WantWork { worker: 2 }
    })
    .await;
    let segfaults = index_of(&tests, "test_crash.py::test_segfaults");
    h.pool().assign(2, vec![(5, segfaults)]).unwrap();
    h.pool().no_more(2).unwrap();
    let unhealthy = h
        .wait_for("the second exit and the verdict", |e| {
            matches!(e, PoolEvent::Unhealthy { .. })
        })
        .await;
    let PoolEvent::Unhealthy { reason } = unhealthy else {
        unreachable!()
    };
    assert!(reason.contains("limit"), "{reason}");
    // The healthy worker gives its unstarted tests back, and finishes the running one.
    h.wait_for("the work given back", |e| {
        matches!(e, PoolEvent::Revoked { .. })
    })
    .await;
    assert_eq!(h.record.revoked, [(1, vec![2, 3])]);
    h.open_gate();
    h.wait_for("the gated test's end and worker 1's exit", |e| {
        matches!(e, PoolEvent::Exited { worker: 1, .. })
    })
    .await;
    assert_eq!(h.record.report(1, Phase::Call).outcome, "passed");
    h.shutdown(Duration::from_secs(30)).await;
    assert_eq!(h.record.replaced, [(0, 2)]);
    assert_eq!(h.record.unhealthy.len(), 1);
    assert!(
        !h.record.wants.iter().any(|w| *w > 2),
        "a worker was replaced past the bound: {:?}",
        h.record.wants
    );
    let worker_1 = h.record.exited.iter().find(|e| e.worker == 1).unwrap();
    assert_eq!(worker_1.exit_code, 0, "{worker_1:?}");
    assert!(worker_1.unstarted.is_empty());
}

async fn a_test_past_the_timeout_fails_with_every_threads_stack(fork: bool) {
    let mut h = start_with(fork, "crash", &[], 1, &[], |c| {
        c.timeout = Some(Duration::from_secs(2))
    })
    .await;
    let (tests, _, _) = h.collected().await;
    let work = plan(
        &tests,
        &[
            "test_crash.py::test_hangs_with_a_thread",
            "test_crash.py::test_fine",
        ],
    );
    h.wait_for("a want", |e| matches!(e, PoolEvent::WantWork { .. }))
        .await;
    h.pool().assign(0, work.clone()).unwrap();
    h.wait_for("the worker's exit", |e| {
        matches!(e, PoolEvent::Exited { .. })
    })
    .await;
    let call = h.record.report(1, Phase::Call);
    assert_eq!(
        (call.outcome.as_str(), call.category.as_str()),
        ("failed", "failed")
    );
    assert_eq!(call.message, "Timeout: the test ran longer than 2 s");
    assert!(call.longrepr.starts_with("Timeout"), "{}", call.longrepr);
    // The test's own stack and its helper thread's.
    assert!(
        call.longrepr.contains("in test_hangs_with_a_thread"),
        "{}",
        call.longrepr
    );
    assert!(
        call.longrepr.contains("in _sleeping_helper"),
        "{}",
        call.longrepr
    );
    assert_eq!(h.record.exited[0].signal, libc::SIGKILL);
    assert_eq!(h.record.exited[0].unstarted, [2]);
    assert!(h.record.exited[0].reason.contains("timeout"));
    // The worker is replaced like a crashed one.
    h.wait_for("the replacement's want", |e| {
        *e == PoolEvent::WantWork { worker: 1 }
    })
    .await;
    h.pool().assign(1, vec![(3, work[1].1)]).unwrap();
    h.pool().no_more(1).unwrap();
    h.wait_for("the test's end", |e| {
        matches!(e, PoolEvent::Finished { lease: 3, .. })
    })
    .await;
    assert_eq!(h.record.report(3, Phase::Call).outcome, "passed");
    h.shutdown(Duration::from_secs(30)).await;
}

async fn a_test_hanging_in_setup_times_out_as_an_error_in_setup(fork: bool) {
    let mut h = start_with(fork, "crash", &[], 1, &[], |c| {
        c.timeout = Some(Duration::from_secs(2))
    })
    .await;
    let (tests, _, _) = h.collected().await;
    let work = plan(&tests, &["test_crash.py::test_hangs_in_setup"]);
    h.wait_for("a want", |e| matches!(e, PoolEvent::WantWork { .. }))
        .await;
    h.pool().assign(0, work).unwrap();
    h.pool().no_more(0).unwrap();
    h.wait_for("the worker's exit", |e| {
        matches!(e, PoolEvent::Exited { .. })
    })
    .await;
    let setup = h.record.report(1, Phase::Setup);
    assert_eq!(
        (setup.outcome.as_str(), setup.category.as_str()),
        ("failed", "error")
    );
    assert!(
        setup.longrepr.contains("in hanging_fixture"),
        "{}",
        setup.longrepr
    );
    assert_eq!(
        h.record.categories(1).len(),
        1,
        "{:?}",
        h.record.categories(1)
    );
    h.shutdown(Duration::from_secs(30)).await;
}

async fn a_drain_gives_unstarted_tests_back_and_lets_the_running_one_finish(fork: bool) {
    let mut h = start(fork, "crash", &[], 1, &[]).await;
    let (tests, _, _) = h.collected().await;
    let work = plan(
        &tests,
        &[
            "test_crash.py::test_waits_for_the_gate",
            "test_crash.py::test_fine",
            "test_crash.py::test_fine_too",
        ],
    );
    h.wait_for("a want", |e| matches!(e, PoolEvent::WantWork { .. }))
        .await;
    h.pool().assign(0, work).unwrap();
    h.wait_for("the start", |e| matches!(e, PoolEvent::Started { .. }))
        .await;
    // The gate opens only once the unstarted tests are back: the running test outlives that.
    let gate = h.scratch.path().join("gate");
    let mut revoked = false;
    let pool = h.pool.take().unwrap();
    let drain = tokio::spawn(pool.drain(Duration::from_secs(60), std::future::pending()));
    while let Ok(Some(event)) = tokio::time::timeout(PATIENCE, h.events.recv()).await {
        h.record.note(&event);
        if matches!(event, PoolEvent::Revoked { .. }) && !revoked {
            revoked = true;
            std::fs::write(&gate, b"open").unwrap();
        }
    }
    tokio::time::timeout(PATIENCE, drain)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(h.record.revoked, [(0, vec![2, 3])]);
    assert_eq!(h.record.finished, [(0, 1)]);
    assert_eq!(h.record.report(1, Phase::Call).outcome, "passed");
    assert_eq!(h.record.exited.len(), 1);
    assert_eq!(h.record.exited[0].exit_code, 0, "{:?}", h.record.exited[0]);
    assert!(h.record.exited[0].unstarted.is_empty());
    assert!(h.record.replaced.is_empty());
}

async fn a_drain_interrupts_the_running_test_when_hurried(fork: bool) {
    let mut h = start(fork, "crash", &[], 1, &[]).await;
    let (tests, _, _) = h.collected().await;
    let work = plan(&tests, &["test_crash.py::test_hangs"]);
    h.wait_for("a want", |e| matches!(e, PoolEvent::WantWork { .. }))
        .await;
    h.pool().assign(0, work).unwrap();
    h.pool().no_more(0).unwrap();
    h.wait_for("the start", |e| matches!(e, PoolEvent::Started { .. }))
        .await;
    // A second signal: the long grace does not matter any more.
    let (hurry, hurried) = tokio::sync::oneshot::channel::<()>();
    hurry.send(()).unwrap();
    h.drain(Duration::from_secs(600), async move {
        let _ = hurried.await;
    })
    .await;
    let call = h.record.report(1, Phase::Call);
    assert_eq!(call.outcome, "failed");
    assert!(call.message.starts_with("interrupted"), "{}", call.message);
    assert!(call.longrepr.contains("stop at once"), "{}", call.longrepr);
    assert_eq!(h.record.exited.len(), 1);
    assert_eq!(h.record.exited[0].signal, libc::SIGKILL);
    // Interrupted, not crashed: nothing replaces it.
    assert!(h.record.replaced.is_empty());
    for pid in h.pids() {
        assert!(gone(pid).await, "process {pid} survived the drain");
    }
}

/// Runs each listed `async fn name(fork: bool)` as `forked::name` and `spawned::name`.
macro_rules! in_both_modes {
    ($($name:ident),* $(,)?) => {
        mod forked {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(true).await
                }
            )*
        }
        mod spawned {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(false).await
                }
            )*
        }
    };
}

in_both_modes!(
    collects_with_locations_digest_and_deselection,
    runs_tests_with_pytests_own_categories,
    module_fixtures_live_once_per_module_when_tests_come_one_or_two_at_a_time,
    revoking_unstarted_tests_keeps_fixture_lifetimes_right,
    a_megabyte_of_output_arrives_and_the_channel_carries_on,
    tests_printing_and_reading_stdin_under_dash_s_leave_the_channel_alone,
    a_usage_error_fails_the_collection_with_pytests_message,
    a_missing_path_is_a_usage_error,
    collection_errors_stop_the_run_with_pytests_report,
    a_worker_dying_before_collecting_fails_the_collection,
    each_worker_has_its_own_environment_session_and_output,
    os_exit_in_a_test_is_reported_as_a_crash,
    tests_finished_just_before_a_crash_keep_their_reports,
    a_crash_report_quotes_what_the_test_printed_under_dash_s,
    a_test_forking_leaves_one_worker_behind,
    a_segfault_in_a_test_is_reported_as_a_crash,
    a_message_about_a_lease_never_given_stops_the_worker,
    garbage_on_the_channel_stops_the_worker,
    shutdown_leaves_no_process_behind,
    shutdown_kills_a_test_that_does_not_finish_in_time,
    dropping_the_pool_kills_its_workers,
    the_pool_refuses_work_it_cannot_place,
    collect_only_reports_the_collection_and_ends,
    a_collection_larger_than_one_message_arrives_whole_and_in_order,
    after_os_exit_a_replacement_runs_the_rest,
    after_a_segfault_a_replacement_runs_the_rest,
    after_the_last_allowed_replacement_the_pool_is_unhealthy_and_gives_work_back,
    a_test_past_the_timeout_fails_with_every_threads_stack,
    a_test_hanging_in_setup_times_out_as_an_error_in_setup,
    a_drain_gives_unstarted_tests_back_and_lets_the_running_one_finish,
    a_drain_interrupts_the_running_test_when_hurried,
);

/// Writes a suite of `files` x `per_file` tests that only `assert True`.
fn tiny_suite(dir: &Path, files: usize, per_file: usize) {
    std::fs::write(dir.join("pytest.ini"), "[pytest]\n").unwrap();
    for f in 0..files {
        let mut text = String::new();
        for t in 0..per_file {
            text.push_str(&format!("def test_{t}():\n    assert True\n\n\n"));
        }
        std::fs::write(dir.join(format!("test_tiny_{f:02}.py")), text).unwrap();
    }
}

/// Wall time and CPU time (of this process, and of the Python processes it waited for) of
/// one run; for a pool also when the collection arrived and when the last test finished.
#[derive(Debug, Clone, Copy, Default)]
struct Sample {
    wall: Duration,
    agent_cpu: Duration,
    python_cpu: Duration,
    collected: Duration,
    tests_done: Duration,
}

fn cpu_times() -> (Duration, Duration) {
    let used = |who| {
        let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
        assert_eq!(unsafe { libc::getrusage(who, &mut usage) }, 0);
        let time = |t: libc::timeval| {
            Duration::from_secs(t.tv_sec as u64) + Duration::from_micros(t.tv_usec as u64)
        };
        time(usage.ru_utime) + time(usage.ru_stime)
    };
    (used(libc::RUSAGE_SELF), used(libc::RUSAGE_CHILDREN))
}

async fn measure<F>(run: F) -> Sample
where
    F: std::future::Future<Output = (Duration, Duration)>,
{
    let (agent, python) = cpu_times();
    let started = std::time::Instant::now();
    let (collected, tests_done) = run.await;
    let wall = started.elapsed();
    let (agent_after, python_after) = cpu_times();
    Sample {
        wall,
        agent_cpu: agent_after - agent,
        python_cpu: python_after - python,
        collected,
        tests_done,
    }
}

/// Runs the whole suite on a pool, handing out `batch` tests per request, from the start of
/// the pool to the last worker's exit; returns when the collection arrived and when the last
/// test finished.
async fn run_on_pool(
    dir: &Path,
    workers: u32,
    fork: bool,
    batch: usize,
    pyc: &str,
) -> (Duration, Duration) {
    let started = std::time::Instant::now();
    let mut collected = Duration::ZERO;
    let config = PoolConfig {
        python: python(),
        workdir: dir.to_path_buf(),
        pytest_args: Vec::new(),
        workers,
        run_id: "bench".into(),
        extra_env: vec![("PYTHONDONTWRITEBYTECODE".into(), pyc.into())],
        fork,
        timeout: None,
        max_replacements: MAX_REPLACEMENTS,
    };
    let (tx, mut rx) = mpsc::channel(10_000);
    let pool = WorkerPool::start(config, tx).await.unwrap();
    let mut queue: VecDeque<(u64, u32)> = VecDeque::new();
    let mut finished = 0;
    let mut passed = 0;
    let mut total = usize::MAX;
    while finished < total {
        match rx.recv().await.unwrap() {
            PoolEvent::Collected { tests, .. } => {
                collected = started.elapsed();
                total = tests.len();
                queue = (0..tests.len() as u32).map(|i| (i as u64 + 1, i)).collect();
            }
            PoolEvent::WantWork { worker } => {
                let take = batch.min(queue.len());
                if take == 0 {
                    pool.no_more(worker).unwrap();
                } else {
                    pool.assign(worker, queue.drain(..take).collect()).unwrap();
                }
            }
            PoolEvent::Report { report, .. } => {
                if report.phase == Phase::Call as i32 && report.outcome == "passed" {
                    passed += 1;
                }
            }
            PoolEvent::Finished { .. } => finished += 1,
            PoolEvent::Started { .. } => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    let tests_done = started.elapsed();
    let shutdown = tokio::spawn(pool.shutdown(Duration::from_secs(30)));
    while rx.recv().await.is_some() {}
    shutdown.await.unwrap();
    assert_eq!(passed, total);
    (collected, tests_done)
}

/// `pyc`: the value of PYTHONDONTWRITEBYTECODE ("" lets Python and pytest cache bytecode).
fn run_plain_pytest(dir: &Path, pyc: &str) {
    let status = std::process::Command::new(python())
        .args(["-m", "pytest", "-q"])
        .env("PYTHONDONTWRITEBYTECODE", pyc)
        .current_dir(dir)
        .stdout(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(status.success());
}

/// Not a check but a measurement: plain `pytest -q` against the pool (1 and 2 workers,
/// forked and spawned, batches of 50) on 5,000 tests that only `assert True`, wall time from
/// start to exit, once with bytecode caching (the usual case: pytest reuses its rewritten test
/// modules) and once with PYTHONDONTWRITEBYTECODE=1 (every collection rewrites them). Run it
/// with `cargo test --release -p fly-agent --test worker_pool -- --ignored --nocapture
/// per_test_overhead` (`FLY_BENCH_ROUNDS`, default 3).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement, not a check; run it by name"]
async fn per_test_overhead_against_plain_pytest() {
    let rounds: usize = std::env::var("FLY_BENCH_ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(3);
    for (pyc, label) in [("", "bytecode cached"), ("1", "PYTHONDONTWRITEBYTECODE=1")] {
        let dir = tempfile::Builder::new()
            .prefix("fly-bench-")
            .tempdir()
            .unwrap();
        tiny_suite(dir.path(), 50, 100);
        // Warm up (and fill the bytecode cache when there is one).
        run_plain_pytest(dir.path(), pyc);
        let mut plain = Vec::new();
        let mut pools: Vec<(u32, bool, Vec<Sample>)> = Vec::new();
        for workers in [1, 2] {
            for fork in [true, false] {
                pools.push((workers, fork, Vec::new()));
            }
        }
        for _ in 0..rounds {
            let plain_run = async {
                run_plain_pytest(dir.path(), pyc);
                (Duration::ZERO, Duration::ZERO)
            };
            plain.push(measure(plain_run).await);
            for (workers, fork, samples) in pools.iter_mut() {
                let run = run_on_pool(dir.path(), *workers, *fork, 50, pyc);
                samples.push(measure(run).await);
            }
        }
        println!("5,000 tiny tests, {label}, {rounds} rounds, interleaved");
        report_line("plain pytest -q", &plain, &plain);
        for (workers, fork, samples) in &pools {
            let mode = if *fork { "forked" } else { "spawned" };
            report_line(
                &format!("pool: {workers} {mode} worker(s)"),
                samples,
                &plain,
            );
        }
    }
}

fn median(samples: &[Sample], of: fn(&Sample) -> Duration) -> Duration {
    let mut values: Vec<Duration> = samples.iter().map(of).collect();
    values.sort();
    values[values.len() / 2]
}

fn report_line(name: &str, samples: &[Sample], plain: &[Sample]) {
    let wall = median(samples, |s| s.wall);
    let best = samples.iter().map(|s| s.wall).min().unwrap();
    let plain_wall = median(plain, |s| s.wall);
    let plain_best = plain.iter().map(|s| s.wall).min().unwrap();
    println!(
        "{name:<28} wall median {:>6.2}s ({:.2} x plain), best {:>6.2}s ({:.2} x plain); \
         cpu median: python {:>6.2}s, agent {:>5.2}s; median collected at {:.2}s, tests done at \
         {:.2}s",
        wall.as_secs_f64(),
        wall.as_secs_f64() / plain_wall.as_secs_f64(),
        best.as_secs_f64(),
        best.as_secs_f64() / plain_best.as_secs_f64(),
        median(samples, |s| s.python_cpu).as_secs_f64(),
        median(samples, |s| s.agent_cpu).as_secs_f64(),
        median(samples, |s| s.collected).as_secs_f64(),
        median(samples, |s| s.tests_done).as_secs_f64(),
    );
}
