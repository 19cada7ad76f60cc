//! `fly-bench-farm`: measures how fast a real coordinator hands out and persists tests, with a
//! simulated farm of fake agents over real gRPC (no Python), and how much memory it needs.
//!
//! It starts `fly-coordinator serve` as a child process (so its memory and CPU can be read from
//! `/proc`), connects the agents (one HTTP/2 connection each), submits a run with the `Runs`
//! client and follows it to its end, then stops the coordinator and counts the rows in its
//! database. It prints a table of stage times, throughput, memory, CPU and traffic, and exits
//! non-zero only when the run fails or rows are missing: targets are reported, not enforced.
//!
//! Build the coordinator first (`cargo build --release -p fly-coordinator`): by default the one
//! next to this binary is used. On a machine shared with other work, wall-clock rates drop with
//! the load; the CPU time per test of each coordinator thread does not, and is printed too.

mod agent;
mod coordinator;
mod report;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use fly_common::proto::runs_client::RunsClient;
use fly_common::proto::{run_event, RunFinished, SubmitRequest};
use fly_common::{MAX_MESSAGE_BYTES, PROTOCOL_VERSION};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_stream::StreamExt;
use tonic::transport::Endpoint;

use crate::agent::{CollectionMode, Farm, FarmStats};
use crate::coordinator::{Coordinator, Sample};
use crate::report::{Measurements, Rows};

/// How often a progress line is printed.
const PROGRESS_EVERY: Duration = Duration::from_secs(2);
/// How long the run may take to accept a collection before the harness gives up.
const COLLECT_TIMEOUT: Duration = Duration::from_secs(300);

#[derive(Parser, Debug)]
#[command(
    name = "fly-bench-farm",
    about = "A simulated farm (fake agents over real gRPC) measuring the coordinator's capacity"
)]
pub struct Args {
    /// Fake agents, each on its own connection.
    #[arg(long, default_value_t = 500)]
    agents: usize,
    /// Workers per agent.
    #[arg(long, default_value_t = 8)]
    workers: u32,
    /// Tests in the synthetic suite.
    #[arg(long, default_value_t = 1_000_000)]
    tests: u32,
    /// The coordinator binary (default: `fly-coordinator` next to this binary).
    #[arg(long)]
    coordinator: Option<PathBuf>,
    /// Which agents send the full test list: `one-lister` (only the first one asked; the others
    /// send their digest once the run has its collection) or `as-asked` (exactly what the real
    /// agent does with StartRun.want_collection and SendCollection).
    #[arg(long, value_enum, default_value_t = CollectionMode::OneLister)]
    collection: CollectionMode,
    /// Seconds each phase report of a test claims.
    #[arg(long, default_value_t = 0.0001)]
    phase_seconds: f64,
    /// Threads of this harness's async runtime (the coordinator gets the rest of the machine).
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Keep the database and the coordinator's log in this directory (default: a temporary
    /// directory, removed at the end).
    #[arg(long)]
    keep: Option<PathBuf>,
    /// Record the coordinator with `perf record` into this file while tests are handed out.
    #[arg(long)]
    perf: Option<PathBuf>,
    /// Options for `perf record` (with --perf).
    #[arg(long, default_value = "-F 499", allow_hyphen_values = true)]
    perf_args: String,
    /// Give up after this many seconds.
    #[arg(long, default_value_t = 1800)]
    timeout: u64,
}

fn main() -> ExitCode {
    let args = Args::parse();
    raise_fd_limit();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.threads.max(1))
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("fly-bench-farm: cannot start the async runtime: {err}");
            return ExitCode::from(2);
        }
    };
    let outcome = runtime.block_on(bench(args));
    runtime.shutdown_timeout(Duration::from_secs(1));
    match outcome {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(err) => {
            eprintln!("fly-bench-farm: error: {err:#}");
            ExitCode::from(2)
        }
    }
}

/// 500 connections need 500 descriptors on each side: lift the soft limit to the hard one
/// (the coordinator inherits it).
fn raise_fd_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit read and write the struct we pass.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && limit.rlim_cur < limit.rlim_max
        {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
}

fn default_coordinator() -> Result<PathBuf> {
    let me = std::env::current_exe().context("finding this binary")?;
    let dir = me.parent().context("this binary has no parent directory")?;
    let path = dir.join("fly-coordinator");
    if !path.exists() {
        bail!(
            "no coordinator at {}: build it (cargo build --release -p fly-coordinator) or pass \
             --coordinator",
            path.display()
        );
    }
    Ok(path)
}

/// Runs the whole benchmark; Ok(false) when the run failed or rows are missing.
async fn bench(args: Args) -> Result<bool> {
    let binary = match &args.coordinator {
        Some(path) => path.clone(),
        None => default_coordinator()?,
    };
    let temp = tempfile::tempdir().context("creating a temporary directory")?;
    let dir = match &args.keep {
        Some(dir) => {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
            dir.clone()
        }
        None => temp.path().to_path_buf(),
    };
    let db = dir.join("farm.db");
    for stale in ["farm.db", "farm.db-wal", "farm.db-shm"] {
        let _ = std::fs::remove_file(dir.join(stale));
    }
    let coordinator = Coordinator::start(&binary, &db, &dir.join("coordinator.log")).await?;
    eprintln!(
        "coordinator pid {} at {} (db {})",
        coordinator.pid(),
        coordinator.url(),
        db.display()
    );
    let outcome = drive(&args, &coordinator).await;
    // The agents hung up inside `drive`; now the coordinator closes its database.
    let stopped = coordinator.stop().await;
    let mut measured = match outcome {
        Ok(measured) => measured,
        Err(err) => {
            if let Err(stop) = stopped {
                eprintln!("fly-bench-farm: also: {stop:#}");
            }
            return Err(err);
        }
    };
    stopped?;
    measured.rows = Some(report::count_rows(&db, &measured.run_id)?);
    let ok = report::print(&args_summary(&args, &binary), &measured, args.tests);
    if args.keep.is_some() {
        eprintln!("kept {}", dir.display());
    }
    Ok(ok)
}

fn args_summary(args: &Args, binary: &std::path::Path) -> String {
    format!(
        "{} agents x {} workers, {} tests, collection {:?}, harness threads {}, coordinator {}",
        args.agents,
        args.workers,
        args.tests,
        args.collection,
        args.threads,
        binary.display()
    )
}

/// Connects the farm, submits and follows the run, and hangs the agents up.
async fn drive(args: &Args, coordinator: &Coordinator) -> Result<Measurements> {
    let clock = Instant::now();
    let collection = Arc::new(agent::synthetic_collection(args.tests));
    let (collected_tx, collected_rx) = watch::channel(false);
    let (quit_tx, quit_rx) = watch::channel(false);
    let farm = Arc::new(Farm {
        url: coordinator.url().to_string(),
        workers: args.workers,
        collection,
        digest: format!("farm-{}", args.tests),
        mode: args.collection,
        phase_seconds: args.phase_seconds,
        collected: collected_rx,
        quit: quit_rx,
        clock,
        stats: FarmStats::default(),
        lister: AtomicBool::new(false),
    });

    // Memory sampling and a progress line, until the end of `drive`.
    let max_rss = Arc::new(AtomicU64::new(0));
    let results = Arc::new(AtomicU64::new(0));
    let pid = coordinator.pid();
    let sampler = {
        let max_rss = max_rss.clone();
        let farm = farm.clone();
        let results = results.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(100));
            let mut next_line = Instant::now() + PROGRESS_EVERY;
            let mut last_cpu = Duration::ZERO;
            loop {
                tick.tick().await;
                let Some(sample) = coordinator::sample_pid(pid) else {
                    continue;
                };
                max_rss.fetch_max(sample.rss, Ordering::Relaxed);
                if Instant::now() >= next_line {
                    next_line += PROGRESS_EVERY;
                    // Cores used since the last line.
                    let cores = sample.cpu.saturating_sub(last_cpu).as_secs_f64()
                        / PROGRESS_EVERY.as_secs_f64();
                    last_cpu = sample.cpu;
                    eprintln!(
                        "  {:7.1} s  leases {:>9}  tests run {:>9}  results {:>9}  rss {:>5} MB  \
                         coordinator {:.2} cores",
                        clock.elapsed().as_secs_f64(),
                        farm.stats.leases_received.load(Ordering::Relaxed),
                        farm.stats.tests_run.load(Ordering::Relaxed),
                        results.load(Ordering::Relaxed),
                        sample.rss >> 20,
                        cores
                    );
                }
            }
        })
    };
    let outcome = tokio::time::timeout(
        Duration::from_secs(args.timeout),
        follow(
            args,
            coordinator,
            &farm,
            &collected_tx,
            &quit_tx,
            &results,
            clock,
        ),
    )
    .await;
    let _ = quit_tx.send(true);
    sampler.abort();
    let mut measured = match outcome {
        Ok(result) => result?,
        Err(_) => bail!(
            "gave up after {} s; the coordinator's log ends with:\n{}",
            args.timeout,
            coordinator.log_tail(20)
        ),
    };
    measured.max_rss = max_rss.load(Ordering::Relaxed).max(measured.end.rss);
    measured.stats = Some(farm.clone());
    Ok(measured)
}

/// Connects the agents, submits the run and follows it to RunFinished.
async fn follow(
    args: &Args,
    coordinator: &Coordinator,
    farm: &Arc<Farm>,
    collected_tx: &watch::Sender<bool>,
    quit_tx: &watch::Sender<bool>,
    results: &AtomicU64,
    clock: Instant,
) -> Result<Measurements> {
    let load_start = report::load_average();
    let mut agents = JoinSet::new();
    for index in 0..args.agents {
        agents.spawn(agent::run(index, farm.clone()));
    }
    // Every agent connected and welcomed before the run is submitted.
    while farm.stats.connected.load(Ordering::Relaxed) < args.agents {
        tokio::select! {
            Some(done) = agents.join_next() => {
                done.context("an agent task panicked")??;
                bail!("an agent stopped before the run started");
            }
            _ = tokio::time::sleep(Duration::from_millis(20)) => {}
        }
    }
    let connected = clock.elapsed();
    eprintln!(
        "{} agents connected in {:.2} s",
        args.agents,
        connected.as_secs_f64()
    );

    let channel = Endpoint::from_shared(coordinator.url().to_string())
        .context("the coordinator's URL")?
        .tcp_nodelay(true)
        .connect()
        .await
        .context("connecting the client")?;
    let mut client = RunsClient::new(channel)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    let submitted = clock.elapsed();
    let mut events = client
        .submit(SubmitRequest {
            protocol_version: PROTOCOL_VERSION,
            project: "farm".into(),
            pytest_args: vec!["-q".into()],
            client_cwd: String::new(),
            ..Default::default()
        })
        .await
        .context("submitting the run")?
        .into_inner();

    let collect_deadline = tokio::time::Instant::now() + COLLECT_TIMEOUT;
    let mut run_id = String::new();
    let mut accepted: Option<(Duration, Sample, report::Threads, Duration)> = None;
    let mut perf = None;
    let mut failed_results = 0u64;
    let finished: RunFinished = loop {
        let event = tokio::select! {
            event = events.next() => event,
            _ = tokio::time::sleep_until(collect_deadline), if accepted.is_none() => bail!(
                "no collection accepted within {} s of the submission; the coordinator's log \
                 ends with:\n{}",
                COLLECT_TIMEOUT.as_secs(),
                coordinator.log_tail(20)
            ),
            Some(done) = agents.join_next() => {
                done.context("an agent task panicked")??;
                bail!("an agent hung up during the run");
            }
        };
        let event = match event {
            Some(Ok(event)) => event,
            Some(Err(status)) => bail!("the run's stream failed: {status}"),
            None => bail!("the run's stream ended without RunFinished"),
        };
        match event.kind {
            Some(run_event::Kind::Status(status)) => {
                if run_id.is_empty() {
                    run_id = status.run_id.clone();
                }
                if accepted.is_none() && status.collected > 0 {
                    let at = clock.elapsed();
                    let sample = coordinator.sample().unwrap_or_default();
                    accepted = Some((at, sample, coordinator.threads(), coordinator::own_cpu()));
                    let _ = collected_tx.send(true);
                    if let Some(file) = &args.perf {
                        perf = Some(report::start_perf(
                            coordinator.pid(),
                            file,
                            &args.perf_args,
                        )?);
                    }
                    eprintln!(
                        "collection of {} tests accepted after {:.2} s",
                        status.collected,
                        (at - submitted).as_secs_f64()
                    );
                }
            }
            Some(run_event::Kind::Result(result)) => {
                results.fetch_add(1, Ordering::Relaxed);
                if result.outcome != "passed" {
                    failed_results += 1;
                }
            }
            Some(run_event::Kind::Notice(notice)) => eprintln!("notice: {}", notice.message),
            Some(run_event::Kind::Finished(finished)) => break finished,
            None => {}
        }
    };
    let finished_at = clock.elapsed();
    let end = coordinator.sample().unwrap_or_default();
    let end_threads = coordinator.threads();
    let end_own_cpu = coordinator::own_cpu();
    if let Some(perf) = perf {
        report::stop_perf(perf).await;
    }
    // Hang the agents up before the coordinator is stopped.
    let _ = quit_tx.send(true);
    while let Some(done) = agents.join_next().await {
        done.context("an agent task panicked")??;
    }
    let Some((accepted_at, accepted_sample, accepted_threads, accepted_own_cpu)) = accepted else {
        bail!(
            "the run finished (exit code {}) without a collection: {}{}",
            finished.exit_code,
            finished.message,
            finished.output
        );
    };
    Ok(Measurements {
        run_id,
        connected,
        submitted,
        accepted: accepted_at,
        finished: finished_at,
        exit_code: finished.exit_code,
        counts: finished
            .counts
            .iter()
            .map(|c| (c.category.clone(), c.count))
            .collect(),
        results_received: results.load(Ordering::Relaxed),
        failed_results,
        accepted_sample,
        end,
        max_rss: 0,
        threads: report::diff_threads(&accepted_threads, &end_threads),
        harness_cpu: end_own_cpu.saturating_sub(accepted_own_cpu),
        stats: None,
        rows: None::<Rows>,
        load_start,
        load_end: report::load_average(),
    })
}
