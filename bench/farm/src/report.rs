//! What a benchmark run measured, the database check that proves every report and result was
//! persisted, the printed table, and the optional `perf record` of the coordinator.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Stdio;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use rusqlite::{Connection, OpenFlags};
use tokio::process::{Child, Command};

use crate::agent::Farm;
use crate::coordinator::Sample;

/// The throughput the issue asks for, tests per second.
const TARGET_TESTS_PER_SECOND: f64 = 50_000.0;
/// The coordinator's memory budget, bytes.
const TARGET_RSS: u64 = 300 << 20;

/// CPU time per thread name.
pub type Threads = BTreeMap<String, Duration>;

/// Rows the coordinator's database holds for the run.
#[derive(Debug, Default)]
pub struct Rows {
    pub status: String,
    pub reports: u64,
    pub results: u64,
    pub passed: u64,
    pub run_tests: u64,
}

pub struct Measurements {
    pub run_id: String,
    /// Times since the harness started.
    pub connected: Duration,
    pub submitted: Duration,
    pub accepted: Duration,
    pub finished: Duration,
    pub exit_code: i32,
    pub counts: Vec<(String, u32)>,
    pub results_received: u64,
    pub failed_results: u64,
    pub accepted_sample: Sample,
    pub end: Sample,
    pub max_rss: u64,
    /// Coordinator CPU per thread between acceptance and RunFinished.
    pub threads: Threads,
    /// This harness's own CPU over the same span.
    pub harness_cpu: Duration,
    pub stats: Option<Arc<Farm>>,
    pub rows: Option<Rows>,
    /// The first three fields of /proc/loadavg.
    pub load_start: String,
    pub load_end: String,
}

/// The 1, 5 and 15 minute load averages.
pub fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

pub fn diff_threads(before: &Threads, after: &Threads) -> Threads {
    after
        .iter()
        .map(|(name, cpu)| {
            let base = before.get(name).copied().unwrap_or_default();
            (name.clone(), cpu.saturating_sub(base))
        })
        .collect()
}

/// Counts the run's rows, reading the database the coordinator closed.
pub fn count_rows(db: &Path, run_id: &str) -> Result<Rows> {
    let conn = Connection::open_with_flags(db, OpenFlags::SQLITE_OPEN_READ_ONLY)
        .with_context(|| format!("opening {}", db.display()))?;
    let count = |sql: &str| -> Result<u64> {
        let n: i64 = conn
            .query_row(sql, [run_id], |row| row.get(0))
            .with_context(|| format!("{sql} in {}", db.display()))?;
        Ok(u64::try_from(n).unwrap_or(0))
    };
    let status: String = conn
        .query_row("SELECT status FROM runs WHERE id = ?1", [run_id], |row| {
            row.get(0)
        })
        .with_context(|| format!("reading run {run_id} from {}", db.display()))?;
    Ok(Rows {
        status,
        reports: count("SELECT count(*) FROM reports WHERE run_id = ?1")?,
        results: count("SELECT count(*) FROM results WHERE run_id = ?1")?,
        passed: count("SELECT count(*) FROM results WHERE run_id = ?1 AND outcome = 'passed'")?,
        run_tests: count("SELECT count(*) FROM run_tests WHERE run_id = ?1")?,
    })
}

fn mb(bytes: u64) -> String {
    format!("{:.0} MB", bytes as f64 / (1u64 << 20) as f64)
}

fn secs(d: Duration) -> String {
    format!("{:.2} s", d.as_secs_f64())
}

/// Prints the table; returns whether the run passed with every row persisted.
pub fn print(setup: &str, m: &Measurements, tests: u32) -> bool {
    let tests = u64::from(tests);
    let dispatch = m.finished.saturating_sub(m.accepted);
    let rate = tests as f64 / dispatch.as_secs_f64().max(1e-9);
    let stats = m.stats.as_ref().map(|f| &f.stats);
    let at = |ns: &std::sync::atomic::AtomicU64| {
        Duration::from_nanos(ns.load(Ordering::Relaxed)).saturating_sub(m.accepted)
    };
    println!();
    println!("fly-bench-farm: {setup}");
    println!("  stage                                        time");
    println!(
        "  start -> {:<34} {}",
        "all agents welcomed",
        secs(m.connected)
    );
    println!(
        "  submit -> {:<33} {}",
        "collection accepted",
        secs(m.accepted.saturating_sub(m.submitted))
    );
    if let Some(s) = stats {
        println!(
            "  accepted -> {:<31} {}",
            "last lease received",
            secs(at(&s.last_lease_ns))
        );
        println!(
            "  accepted -> {:<31} {}",
            "last test run by an agent",
            secs(at(&s.last_finish_ns))
        );
    }
    println!(
        "  accepted -> {:<31} {}",
        "RunFinished (all persisted)",
        secs(dispatch)
    );
    println!();
    println!(
        "  throughput   {:>10.0} tests/s handed out and persisted   (target >= {:.0})  {}",
        rate,
        TARGET_TESTS_PER_SECOND,
        verdict(rate >= TARGET_TESTS_PER_SECOND)
    );
    println!(
        "  memory       peak RSS {} (sampled max {}, at acceptance {}, at end {})   (target <= {})  {}",
        mb(m.end.hwm),
        mb(m.max_rss),
        mb(m.accepted_sample.rss),
        mb(m.end.rss),
        mb(TARGET_RSS),
        verdict(m.end.hwm <= TARGET_RSS)
    );
    let coordinator_cpu = m.end.cpu.saturating_sub(m.accepted_sample.cpu);
    println!(
        "  cpu          coordinator {} ({:.2} cores), this harness {} ({:.2} cores), over the dispatch span",
        secs(coordinator_cpu),
        coordinator_cpu.as_secs_f64() / dispatch.as_secs_f64().max(1e-9),
        secs(m.harness_cpu),
        m.harness_cpu.as_secs_f64() / dispatch.as_secs_f64().max(1e-9),
    );
    // CPU per test does not depend on what else runs on the machine; for a stage that runs on
    // one thread it bounds the rate that stage can ever reach.
    let mut threads: Vec<(&String, &Duration)> = m.threads.iter().collect();
    threads.sort_by(|a, b| b.1.cmp(a.1));
    for (name, cpu) in threads.iter().filter(|(_, cpu)| cpu.as_millis() >= 10) {
        let per_test = cpu.as_secs_f64() * 1e6 / tests as f64;
        println!(
            "               coordinator thread {name:<17} {:>9}  {per_test:6.1} us/test  (one core: at most {:.0} tests/s)",
            secs(**cpu),
            1e6 / per_test.max(1e-9)
        );
    }
    println!(
        "  machine      load average {} at start, {} at end (other processes share these cores)",
        m.load_start.trim(),
        m.load_end.trim()
    );
    if let Some(s) = stats {
        let work = s.work_messages.load(Ordering::Relaxed).max(1);
        let leases = s.leases_received.load(Ordering::Relaxed);
        println!(
            "  traffic      agents sent {} messages ({} events); {} Work messages ({:.1} leases each), \
             {} 'nothing now', {} revokes",
            s.messages_sent.load(Ordering::Relaxed),
            s.events_sent.load(Ordering::Relaxed),
            work,
            leases as f64 / work as f64,
            s.no_work.load(Ordering::Relaxed),
            s.revokes.load(Ordering::Relaxed),
        );
        println!(
            "               full lists sent {}, SendCollection asks {}, leases {} for {} tests, \
             workers never served {}",
            s.lists_sent.load(Ordering::Relaxed),
            s.send_collection_asks.load(Ordering::Relaxed),
            leases,
            tests,
            s.idle_workers.load(Ordering::Relaxed),
        );
    }
    let counts: Vec<String> = m.counts.iter().map(|(c, n)| format!("{n} {c}")).collect();
    println!(
        "  run          exit code {}, {}; results streamed to the client {} ({} not passed)",
        m.exit_code,
        counts.join(", "),
        m.results_received,
        m.failed_results
    );
    let mut ok = m.exit_code == 0 && m.results_received == tests && m.failed_results == 0;
    match &m.rows {
        Some(rows) => {
            let complete = rows.reports == 3 * tests
                && rows.results == tests
                && rows.passed == tests
                && rows.run_tests == tests;
            println!(
                "  database     run {}: {} reports (expected {}), {} results (expected {}, {} passed), \
                 {} collected tests  {}",
                rows.status,
                rows.reports,
                3 * tests,
                rows.results,
                tests,
                rows.passed,
                rows.run_tests,
                verdict(complete)
            );
            ok &= complete;
        }
        None => {
            println!("  database     not read");
            ok = false;
        }
    }
    println!();
    ok
}

fn verdict(ok: bool) -> &'static str {
    if ok {
        "ok"
    } else {
        "MISSED"
    }
}

/// Starts `perf record` on the coordinator.
pub fn start_perf(pid: u32, file: &Path, options: &str) -> Result<Child> {
    Command::new("perf")
        .arg("record")
        .args(options.split_whitespace())
        .arg("-o")
        .arg(file)
        .arg("-p")
        .arg(pid.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .context("starting perf record (is perf installed?)")
}

/// Stops `perf record` (SIGINT makes it write its file) and waits for it.
pub async fn stop_perf(mut perf: Child) {
    if let Some(pid) = perf.id().and_then(|p| libc::pid_t::try_from(p).ok()) {
        // SAFETY: kill(2) on our own unreaped child.
        unsafe {
            libc::kill(pid, libc::SIGINT);
        }
    }
    if tokio::time::timeout(Duration::from_secs(60), perf.wait())
        .await
        .is_err()
    {
        let _ = perf.kill().await;
    }
}
