//! The coordinator's HTTP port during a real run (`serve --http`): `/healthz` and `/metrics`
//! answer with every named metric while tests run and finish, and the live pages, driven in
//! headless Chromium, draw the run's timeline and show the agent with the test each worker
//! runs. A gate test holds one worker until the checks are done, so the run is in progress
//! whatever the timing. Also: with a token, everything but `/healthz` requires it.
//!
//! Chromium is Debian's `chromium` package (`.ci/install-chromium` installs it). Without it the
//! browser half of the test fails when `CI` is set (CI installs it and must run it) and is
//! skipped with a notice elsewhere, so the README's test command works on a machine with only
//! cargo and python3.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use fly_tests::fly::{self, clean_env};
use fly_tests::gate::Gate;
use fly_tests::paths::fly_binary;
use fly_tests::process::Proc;
use fly_tests::sandbox::Sandbox;
use fly_tests::{poll_until, HANG_GUARD};

/// Every metric family `/metrics` must name.
const FAMILIES: [&str; 11] = [
    "fly_tests_queued",
    "fly_tests_running",
    "fly_followers_behind",
    "fly_agents",
    "fly_workers_busy",
    "fly_workers_idle",
    "fly_tests_finished",
    "fly_dispatch_latency_seconds",
    "fly_report_latency_seconds",
    "fly_run_eta_seconds",
    "fly_desired_workers",
];

/// A suite whose first test waits for the gate file and whose others sleep: a run that stays
/// in progress while the test looks, and leaves bars on the timeline meanwhile.
const SUITE: &str = r#"
import os
import time

import pytest


def test_gate():
    gate = os.environ.get("FLY_DASHBOARD_GATE")
    deadline = time.monotonic() + 300
    while gate and not os.path.exists(gate) and time.monotonic() < deadline:
        time.sleep(0.05)


@pytest.mark.parametrize("n", range(6))
def test_sleeps(n):
    time.sleep(0.5)


def test_fails():
    time.sleep(0.5)
    assert 1 + 1 == 3, "on purpose"
"#;

/// `fly-coordinator serve` with the HTTP port on an ephemeral loopback port, and its two
/// announced URLs (gRPC, dashboard).
pub(crate) fn serve(
    cwd: &Path,
    db: &Path,
    args: &[&str],
    env: &[(&str, &str)],
) -> (Proc, String, String) {
    let mut command = Command::new(fly_binary("fly-coordinator"));
    command
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--http",
            "127.0.0.1:0",
            "--db",
        ])
        .arg(db)
        .args(args)
        .current_dir(cwd);
    clean_env(&mut command, None);
    command.env_remove("FLY_HTTP").envs(env.iter().copied());
    let mut process = Proc::spawn("fly-coordinator serve --http", &mut command);
    let grpc = process.wait_for_stdout_line(HANG_GUARD, |line| {
        line.strip_prefix("fly-coordinator listening on ")
            .map(|url| url.trim().to_string())
    });
    let http = process.wait_for_stdout_line(HANG_GUARD, |line| {
        line.strip_prefix("fly-coordinator dashboard on ")
            .map(|url| url.trim().to_string())
    });
    assert!(http.starts_with("http://127.0.0.1:"), "{http}");
    let host = http
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .to_string();
    (process, grpc, host)
}

/// A plain HTTP/1.1 GET; returns the status and the body.
pub(crate) fn get(host: &str, path: &str, headers: &[(&str, &str)]) -> (u16, String) {
    let mut stream =
        TcpStream::connect(host).unwrap_or_else(|e| panic!("connecting to {host}: {e}"));
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .expect("a read timeout");
    let mut request = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n");
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("\r\n");
    stream
        .write_all(request.as_bytes())
        .unwrap_or_else(|e| panic!("GET {path}: {e}"));
    let mut response = Vec::new();
    stream
        .read_to_end(&mut response)
        .unwrap_or_else(|e| panic!("GET {path}: {e}"));
    let response = String::from_utf8_lossy(&response).into_owned();
    let (head, body) = response
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("GET {path}: not an HTTP response: {response:?}"));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("GET {path}: no status in {head:?}"));
    (status, body.to_string())
}

fn get_ok(host: &str, path: &str) -> String {
    let (status, body) = get(host, path, &[]);
    assert_eq!(status, 200, "GET {path}: {body}");
    body
}

/// The value of an unlabelled sample, or the sum over a labelled family's samples.
pub(crate) fn metric(text: &str, name: &str) -> Option<f64> {
    let values: Vec<f64> = text
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let series_name = series.split('{').next()?;
            (series_name == name).then(|| value.parse().ok())?
        })
        .collect();
    (!values.is_empty()).then(|| values.iter().sum())
}

/// Chromium, if installed; fails the test on CI when it is not.
fn chromium() -> Option<PathBuf> {
    let found = std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|dir| dir.join("chromium"))
            .find(|candidate| candidate.is_file())
    });
    if found.is_none() {
        let why = "the dashboard test drives the pages in headless Chromium, and `chromium` is \
                   not on PATH: install Debian's chromium package (`bash .ci/install-chromium`, \
                   or `apt-get install chromium`)";
        let on_ci = std::env::var_os("CI").is_some_and(|v| !v.is_empty());
        assert!(!on_ci, "{why}");
        eprintln!("SKIPPED the browser checks of the dashboard test: {why}");
    }
    found
}

/// The page's DOM after its scripts ran for three seconds of virtual time (three polls).
fn dump_dom(sandbox: &Sandbox, chromium: &Path, url: &str) -> String {
    let profile = sandbox.dir("chromium-profile");
    let mut command = Command::new(chromium);
    command
        .args([
            "--headless",
            "--disable-gpu",
            "--no-sandbox",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--window-size=1280,900",
            "--virtual-time-budget=3000",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .arg("--dump-dom")
        .arg(url);
    let finished = Proc::spawn("chromium --dump-dom", &mut command).wait(HANG_GUARD);
    assert_eq!(finished.code, Some(0), "{}", finished.describe());
    assert!(
        finished.stdout.contains("</html>"),
        "no DOM from {url}\n{}",
        finished.describe()
    );
    finished.stdout
}

/// The number in `attr="N"` of the first element that has it.
fn attribute_number(dom: &str, attr: &str) -> Option<u64> {
    let start = dom.find(&format!("{attr}=\""))? + attr.len() + 2;
    let end = start + dom[start..].find('"')?;
    dom[start..end].parse().ok()
}

#[test]
fn health_metrics_and_the_live_pages_follow_a_real_run() {
    let sandbox = Sandbox::new("dashboard");
    let project = sandbox.dir("suite");
    std::fs::write(project.join("test_dashboard_suite.py"), SUITE).expect("writing the suite");
    let db = sandbox.path("fly.db");
    let (coordinator, grpc, http) = serve(&project, &db, &[], &[]);

    let (status, body) = get(&http, "/healthz", &[]);
    assert_eq!((status, body.as_str()), (200, "ok\n"));

    let gate = Gate::new(sandbox.path("gate"));
    let agent = fly::agent_at(
        "fly-agent",
        &grpc,
        &project,
        None,
        &[("FLY_DASHBOARD_GATE", gate.path())],
    );
    let run = fly::run_connect(&project, &grpc, &["-p", "no:cacheprovider", "."]);

    // While the gate test holds its worker, the other worker finishes the sleeping tests.
    let metrics = poll_until(HANG_GUARD, || {
        let (status, text) = get(&http, "/metrics", &[]);
        assert_eq!(status, 200, "{text}");
        let finished = metric(&text, "fly_tests_finished_total")?;
        let running = metric(&text, "fly_tests_running")?;
        (finished >= 3.0 && running >= 1.0).then_some(text)
    })
    .unwrap_or_else(|| {
        panic!(
            "/metrics never showed a test running and three finished\n{}\n--- coordinator ---\n{}\n--- agent ---\n{}",
            get(&http, "/metrics", &[]).1,
            coordinator.stderr_so_far(),
            agent.stderr_so_far()
        )
    });
    for family in FAMILIES {
        assert!(
            metrics.contains(&format!("# TYPE {family} ")),
            "/metrics has no {family} family:\n{metrics}"
        );
    }
    assert_eq!(metric(&metrics, "fly_agents"), Some(1.0), "{metrics}");
    assert!(
        metric(&metrics, "fly_workers_busy") >= Some(1.0),
        "{metrics}"
    );
    assert!(
        metric(&metrics, "fly_desired_workers") >= Some(1.0),
        "{metrics}"
    );
    assert!(
        metric(&metrics, "fly_report_latency_seconds_count") >= Some(3.0),
        "{metrics}"
    );
    assert!(
        metric(&metrics, "fly_dispatch_latency_seconds_count") >= Some(1.0),
        "{metrics}"
    );
    let (status, body) = get(&http, "/healthz", &[]);
    assert_eq!((status, body.as_str()), (200, "ok\n"));

    // The run and the agent as the JSON says, then as the pages draw them.
    let overview: serde_json::Value =
        serde_json::from_str(&get_ok(&http, "/api/overview")).expect("overview JSON");
    let run_id = overview["runs"][0]["id"]
        .as_str()
        .unwrap_or_else(|| panic!("no run in progress in {overview}"))
        .to_string();
    let agents: serde_json::Value =
        serde_json::from_str(&get_ok(&http, "/api/agents")).expect("agents JSON");
    let hostname = agents["agents"][0]["hostname"]
        .as_str()
        .unwrap_or_else(|| panic!("no agent in {agents}"))
        .to_string();

    let run_path = format!("/runs/{run_id}");
    for path in ["/", run_path.as_str(), "/agents"] {
        let page = get_ok(&http, path);
        assert!(
            !page.contains("http://") && !page.contains("https://"),
            "{path} names an external URL"
        );
    }

    if let Some(chromium) = chromium() {
        let run_dom = dump_dom(&sandbox, &chromium, &format!("http://{http}/runs/{run_id}"));
        let canvas = run_dom
            .find("<canvas id=\"timeline\"")
            .map(|at| &run_dom[at..at + run_dom[at..].find('>').unwrap_or(0)])
            .unwrap_or_else(|| panic!("no timeline canvas in\n{run_dom}"));
        assert!(canvas.contains("data-drawn=\"1\""), "{canvas}");
        assert!(
            attribute_number(canvas, "data-bars") >= Some(3),
            "the timeline drew fewer than three bars: {canvas}"
        );
        assert!(
            run_dom.contains("class=\"lane-label\"") && run_dom.contains(&hostname),
            "no lane of {hostname} on the run page\n{run_dom}"
        );
        assert!(
            run_dom.contains("test_dashboard_suite.py::test_gate"),
            "the run page does not list the running gate test\n{run_dom}"
        );

        let agents_dom = dump_dom(&sandbox, &chromium, &format!("http://{http}/agents"));
        assert!(
            agents_dom.contains(&format!("class=\"hostname\">{hostname}<")),
            "the agents page does not show {hostname}\n{agents_dom}"
        );
        assert!(
            agents_dom.contains("class=\"worker\" data-worker=\"0\"")
                && agents_dom.contains("class=\"worker\" data-worker=\"1\""),
            "the agents page does not list both workers\n{agents_dom}"
        );
        assert!(
            agents_dom.contains("data-state=\"busy\"")
                && agents_dom.contains("test_dashboard_suite.py::test_gate"),
            "the agents page does not show the worker running the gate test\n{agents_dom}"
        );
    }

    gate.open();
    let finished = run.wait(HANG_GUARD);
    assert_eq!(finished.code, Some(1), "{}", finished.describe());
    let after = poll_until(HANG_GUARD, || {
        let (_, text) = get(&http, "/metrics", &[]);
        (metric(&text, "fly_tests_running") == Some(0.0)).then_some(text)
    })
    .unwrap_or_else(|| panic!("tests still running after the run ended"));
    let outcome = |o: &str| {
        after
            .lines()
            .find_map(|l| l.strip_prefix(&format!("fly_tests_finished_total{{outcome=\"{o}\"}} ")))
            .and_then(|v| v.parse::<f64>().ok())
    };
    assert_eq!(outcome("passed"), Some(7.0), "{after}");
    assert_eq!(outcome("failed"), Some(1.0), "{after}");
    assert_eq!(metric(&after, "fly_tests_queued"), Some(0.0), "{after}");
    assert_eq!(metric(&after, "fly_desired_workers"), Some(0.0), "{after}");

    // The finished run: its page from the record, and the full report.
    let page: serde_json::Value =
        serde_json::from_str(&get_ok(&http, &format!("/api/runs/{run_id}"))).expect("run JSON");
    assert!(page["live"].is_null(), "{page}");
    assert_eq!(page["run"]["status"], "failed", "{page}");
    assert_eq!(page["failures_total"], 1, "{page}");
    let report = get_ok(&http, &format!("/runs/{}/report", &run_id[..8]));
    assert!(
        report.contains("test_fails"),
        "the full report misses test_fails"
    );
    drop(agent);
}

#[test]
fn with_a_token_only_healthz_is_open() {
    let sandbox = Sandbox::new("dashboard-token");
    let project = sandbox.dir("cwd");
    let db = sandbox.path("fly.db");
    let (_coordinator, _, http) = serve(&project, &db, &[], &[("FLY_TOKEN", "s3cret-token")]);
    assert_eq!(get(&http, "/healthz", &[]).0, 200);
    for path in ["/metrics", "/api/agents", "/agents", "/"] {
        let (status, body) = get(&http, path, &[]);
        assert_eq!(status, 401, "{path} without the token: {body}");
        assert!(body.contains("no token"), "{body}");
        assert!(!body.contains("s3cret"), "{body}");
        let (status, _) = get(&http, path, &[("Authorization", "Bearer wrong")]);
        assert_eq!(status, 401, "{path} with a wrong token");
        let (status, _) = get(&http, path, &[("Authorization", "Bearer s3cret-token")]);
        assert_eq!(status, 200, "{path} with the token");
    }
    // The pages pass the token on as a query parameter.
    let (status, page) = get(&http, "/agents?token=s3cret-token", &[]);
    assert_eq!(status, 200);
    assert!(page.contains("data-keep-token"), "{page}");
    assert_eq!(get(&http, "/api/agents?token=s3cret-token", &[]).0, 200);
    assert_eq!(get(&http, "/api/agents?token=nope", &[]).0, 401);

    // --metrics-open leaves /metrics to Prometheus without the token.
    let db = sandbox.path("open.db");
    let (_open, _, http) = serve(
        &project,
        &db,
        &["--metrics-open"],
        &[("FLY_TOKEN", "s3cret-token")],
    );
    assert_eq!(get(&http, "/metrics", &[]).0, 200);
    assert_eq!(get(&http, "/api/agents", &[]).0, 401);

    // Off loopback without a token, the port is refused before anything listens.
    let mut command = Command::new(fly_binary("fly-coordinator"));
    command
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--http",
            "0.0.0.0:0",
            "--db",
        ])
        .arg(sandbox.path("refused.db"))
        .current_dir(&project);
    clean_env(&mut command, None);
    let refused =
        Proc::spawn("fly-coordinator serve --http 0.0.0.0:0", &mut command).wait(HANG_GUARD);
    assert_ne!(refused.code, Some(0), "{}", refused.describe());
    assert!(
        refused.stderr.contains("--http") && refused.stderr.contains("--insecure"),
        "{}",
        refused.describe()
    );
}
