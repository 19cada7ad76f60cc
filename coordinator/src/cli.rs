//! `fly-coordinator`'s command line: `serve` a farm, or `run` a suite (against a farm, on this
//! machine alone, or as a coordinator that lives for one run).

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use fly_agent::{AgentConfig, WorkerCount};
use fly_common::exit_code;
use tracing::info;

use crate::auth::ListenArgs;
use crate::client::{self, RunRequest};

/// How long `run --local` waits for its workers to finish after the run ended.
const LOCAL_AGENT_GRACE: Duration = Duration::from_secs(30);
/// After a second Ctrl-C, how long `run --local` still waits for its database writes.
const STOP_NOW_WAIT: Duration = Duration::from_secs(2);
use crate::node::{self, Node};

#[derive(Parser, Debug)]
#[command(
    name = "fly-coordinator",
    version,
    about = "Distributed pytest: the coordinator and the `run` client"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Serve a farm: agents connect with `fly-agent --connect`, clients with `run --connect`.
    Serve(ServeArgs),
    /// Run a pytest suite and exit with pytest's exit code.
    ///
    /// With no --connect or --listen it runs on this machine alone (like --local), as a
    /// replacement for `pytest -n auto`.
    // Boxed: its many options make it far larger than the other commands' arguments.
    Run(Box<RunArgs>),
    /// Predict a recorded run's wall time for other worker counts: replays its test durations
    /// through the scheduler with virtual time ("how many workers should our farm have").
    Plan(PlanArgs),
    /// Write a recorded run's report as one self-contained HTML file: a timeline per worker,
    /// utilization and speed-up, the slowest tests and fixtures, failures, agents.
    Report(ReportArgs),
    /// List recent runs with their status and summary.
    Runs(RunsArgs),
    /// List the slowest tests of the latest run and how their durations moved over recent runs.
    Slowest(SlowestArgs),
    /// List tests whose outcome changed between runs, or that passed on a rerun.
    Flaky(FlakyArgs),
}

#[derive(Args, Debug)]
struct ServeArgs {
    /// Address to listen on, HOST:PORT (port 0 picks a free one; the address is printed).
    #[arg(long, env = "FLY_LISTEN", default_value = "127.0.0.1:7171")]
    listen: String,
    /// The SQLite database that keeps runs, reports and history.
    #[arg(long, env = "FLY_DB", default_value = ".fly/fly.db")]
    db: PathBuf,
    /// Seconds of silence after which an agent's connection counts as dead.
    #[arg(long, env = "FLY_AGENT_TIMEOUT", default_value_t = 10)]
    agent_timeout: u64,
    #[command(flatten)]
    security: ListenArgs,
    /// The dashboard, /healthz and /metrics (--http HOST:PORT).
    #[command(flatten)]
    http: crate::http::HttpArgs,
    /// --retain-days, --retain-size: pruning old runs.
    #[command(flatten)]
    retention: node::RetentionArgs,
}

#[derive(Args, Debug)]
struct RunArgs {
    /// Submit to a serving coordinator, e.g. http://coordinator:7171.
    #[arg(long, env = "FLY_CONNECT", conflicts_with_all = ["local", "listen"])]
    connect: Option<String>,
    /// Run an embedded coordinator and agent in this process (the default without --connect
    /// or --listen).
    #[arg(long)]
    local: bool,
    /// Serve a coordinator for this one run on HOST:PORT; agents elsewhere connect to it.
    /// Combine with --local to also run workers here.
    #[arg(long)]
    listen: Option<String>,
    /// Workers of the local agent: `auto` (the performance cores this process may use) or a
    /// number.
    #[arg(long, env = "FLY_WORKERS", default_value = "auto")]
    workers: WorkerCount,
    /// The SQLite database (for --local and --listen).
    #[arg(long, env = "FLY_DB", default_value = ".fly/fly.db")]
    db: PathBuf,
    /// Python interpreter for the local workers (default: $VIRTUAL_ENV's python, else python3).
    #[arg(long, env = "FLY_PYTHON")]
    python: Option<PathBuf>,
    /// Project name under which history is kept (default: the current directory's name).
    #[arg(long, env = "FLY_PROJECT")]
    project: Option<String>,
    /// Seconds of silence after which an agent's connection counts as dead.
    #[arg(long, env = "FLY_AGENT_TIMEOUT", default_value_t = 10)]
    agent_timeout: u64,
    /// How tests are grouped into units of work, as in pytest-xdist: `load` (each test on its
    /// own), `loadfile` (a file's tests together), `loadscope` (a module's or class's tests
    /// together), `loadgroup` (`xdist_group` marks together), or `auto` (each test on its own,
    /// except modules and classes whose shared fixtures cost more than splitting would save).
    #[arg(long, env = "FLY_DIST", default_value = "auto", value_parser = ["auto", "load", "loadfile", "loadscope", "loadgroup"])]
    dist: String,
    /// Start every worker as its own pytest process instead of forking the workers from one
    /// process after collection (for suites that cannot survive a fork).
    #[arg(long, env = "FLY_NO_FORK")]
    no_fork: bool,
    /// Fail a test that runs longer than SECONDS (setup, call and teardown together) with the
    /// stack of every thread of its worker, and replace the worker; 0 (the default): no limit.
    #[arg(long, env = "FLY_TIMEOUT", value_name = "SECONDS", default_value_t = 0.0, value_parser = parse_timeout)]
    timeout: f64,
    /// Write the results as JUnit XML to PATH once the run is over (as pytest's --junitxml).
    #[arg(long, value_name = "PATH")]
    junit_xml: Option<PathBuf>,
    /// Write a Chrome trace-event timeline to PATH (one track per worker; open it in Perfetto).
    #[arg(long, value_name = "PATH")]
    trace_json: Option<PathBuf>,
    /// The token (for --connect and --listen), --insecure and the TLS identity (for --listen).
    #[command(flatten)]
    security: ListenArgs,
    /// The CA certificate (PEM) that signed the coordinator's TLS certificate, for an https://
    /// --connect URL (default: the system's trusted roots).
    #[arg(long, env = "FLY_CA", value_name = "PEM")]
    ca: Option<PathBuf>,
    /// Run only on agents with this label, KEY=VALUE (repeatable; agents set theirs with
    /// `fly-agent --label`).
    #[arg(long = "require", value_name = "KEY=VALUE", value_parser = crate::labels::parse_label)]
    require: Vec<(String, String)>,
    /// Carry on with an unfinished run (interrupted, or left behind by a coordinator that
    /// stopped): run only its tests that have no result yet (matched by node id; tests
    /// collected now and never run run too), with its pytest arguments, and report the
    /// combined run. RUN_ID is the run's id or a unique prefix of it; the other options are
    /// this run's own.
    #[arg(long, value_name = "RUN_ID", conflicts_with = "pytest_args")]
    resume: Option<String>,
    /// Run a failed test (outcome failed or error) again, up to N more times (as
    /// pytest-rerunfailures' --reruns), on another machine's worker when one is live, else on
    /// another worker. A test that fails and then passes is flaky: it counts as passed and is
    /// named in the output.
    #[arg(long, env = "FLY_RERUNS", value_name = "N", default_value_t = 0)]
    reruns: u32,
    /// Make flaky tests (failed, then passed on a rerun) fail the run with exit code 1.
    #[arg(long, env = "FLY_FLAKY_FAILS")]
    flaky_fails: bool,
    /// --durations, --durations-min, --color.
    #[command(flatten)]
    terminal: crate::terminal::TerminalArgs,
    /// The embedded coordinator's dashboard, /healthz and /metrics (--http HOST:PORT; with
    /// --local or --listen).
    #[command(flatten)]
    http: crate::http::HttpArgs,
    /// Arguments for pytest, after `--`.
    #[arg(last = true, allow_hyphen_values = true)]
    pytest_args: Vec<String>,
}

#[derive(Args, Debug)]
struct PlanArgs {
    /// The SQLite database that keeps runs (opened read-only).
    #[arg(long, env = "FLY_DB", default_value = ".fly/fly.db")]
    db: PathBuf,
    /// The run to replay: `latest` (the most recent finished run), a run id or an id prefix.
    #[arg(long, default_value = "latest")]
    run: String,
    /// Worker counts to predict, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,2,4,8,16,32",
          value_parser = clap::value_parser!(u32).range(1..))]
    workers: Vec<u32>,
    /// How tests are grouped into units, as for `run` (runs do not record it).
    #[arg(long, default_value = "auto", value_parser = ["auto", "load", "loadfile", "loadscope", "loadgroup"])]
    dist: String,
}

#[derive(Args, Debug)]
struct ReportArgs {
    /// The SQLite database that keeps runs (opened read-only).
    #[arg(long, env = "FLY_DB", default_value = ".fly/fly.db")]
    db: PathBuf,
    /// The run: `latest` (the most recently created), a run id or an id prefix.
    #[arg(long, default_value = "latest")]
    run: String,
    /// Where to write the HTML report.
    #[arg(long, value_name = "OUT")]
    html: PathBuf,
}

#[derive(Args, Debug)]
struct RunsArgs {
    /// The SQLite database that keeps runs (opened read-only).
    #[arg(long, env = "FLY_DB", default_value = ".fly/fly.db")]
    db: PathBuf,
    /// How many runs to list, newest first.
    #[arg(long, default_value_t = 20)]
    limit: usize,
    /// Only runs of this project.
    #[arg(long)]
    project: Option<String>,
}

#[derive(Args, Debug)]
struct SlowestArgs {
    /// The SQLite database that keeps runs (opened read-only).
    #[arg(long, env = "FLY_DB", default_value = ".fly/fly.db")]
    db: PathBuf,
    /// How many tests to list.
    #[arg(long, default_value_t = 20)]
    limit: usize,
    /// The project (default: the latest run's).
    #[arg(long)]
    project: Option<String>,
    /// How many recent runs to show durations from.
    #[arg(long, default_value_t = 5)]
    runs: usize,
}

#[derive(Args, Debug)]
struct FlakyArgs {
    /// The SQLite database that keeps runs (opened read-only).
    #[arg(long, env = "FLY_DB", default_value = ".fly/fly.db")]
    db: PathBuf,
    /// The project (default: the latest run's).
    #[arg(long)]
    project: Option<String>,
    /// How many recent runs of the project to look at.
    #[arg(long, default_value_t = 10)]
    runs: usize,
}

/// Entry point of the binary.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let default_level = match cli.command {
        Command::Serve(_) => "info",
        Command::Run(_) | Command::Plan(_) => "warn",
        Command::Report(_) | Command::Runs(_) | Command::Slowest(_) | Command::Flaky(_) => "warn",
    };
    init_tracing(default_level);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("fly-coordinator: cannot start the async runtime: {err}");
            return ExitCode::from(exit_code::INTERNAL_ERROR as u8);
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Serve(args) => serve(args).await.map(|()| exit_code::OK),
            Command::Run(args) => run(*args).await,
            Command::Plan(args) => plan(args),
            Command::Report(args) => crate::report::report_command(&args.db, &args.run, &args.html)
                .map(|()| exit_code::OK)
                .map_err(Into::into),
            Command::Runs(args) => {
                crate::report::runs_command(&args.db, args.project.as_deref(), args.limit)
                    .map(|()| exit_code::OK)
                    .map_err(Into::into)
            }
            Command::Slowest(args) => crate::report::slowest_command(
                &args.db,
                args.project.as_deref(),
                args.limit,
                args.runs,
            )
            .map(|()| exit_code::OK)
            .map_err(Into::into),
            Command::Flaky(args) => {
                crate::report::flaky_command(&args.db, args.project.as_deref(), args.runs)
                    .map(|()| exit_code::OK)
                    .map_err(Into::into)
            }
        }
    });
    // Workers and streams may linger in blocking tasks; never wait for them at exit.
    runtime.shutdown_timeout(Duration::from_millis(200));
    match result {
        Ok(code) => ExitCode::from(code.clamp(0, 255) as u8),
        Err(err) => {
            eprintln!("fly-coordinator: error: {err:#}");
            ExitCode::from(exit_code::INTERNAL_ERROR as u8)
        }
    }
}

fn init_tracing(default_level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("FLY_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

/// Resolves when the process is asked to stop (SIGINT or SIGTERM).
async fn stop_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = match signal(SignalKind::terminate()) {
            Ok(term) => term,
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
                return;
            }
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

fn plan(args: PlanArgs) -> Result<i32> {
    let dist = args.dist.parse().map_err(anyhow::Error::msg)?;
    crate::plan::command(&args.db, &args.run, &args.workers, dist)?;
    Ok(exit_code::OK)
}

async fn serve(args: ServeArgs) -> Result<()> {
    let security = args.security.security(&args.listen).await?;
    let mut node = Node::start(&args.db, Duration::from_secs(args.agent_timeout.max(1)))?;
    node.retain(args.retention.retention());
    let dashboard = crate::http::Dashboard::start(&args.http, &args.security, &node).await?;
    let (listener, addr) = node::bind(&args.listen).await?;
    println!(
        "fly-coordinator listening on {}://{addr}",
        security.scheme()
    );
    if let Some(dashboard) = &dashboard {
        println!("fly-coordinator dashboard on {}", dashboard.url());
    }
    info!(db = %args.db.display(), "serving");
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = node.serve_tcp(listener, &security, async {
        let _ = stop_rx.await;
    })?;
    stop_signal().await;
    info!("stopping");
    let _ = stop_tx.send(());
    // Agent streams live until their agents hang up; do not wait for them for long.
    let _ = tokio::time::timeout(Duration::from_secs(3), server).await;
    if let Some(dashboard) = dashboard {
        dashboard.stop().await;
    }
    node.shutdown().await
}

fn project_name(explicit: Option<String>, cwd: &Path) -> String {
    explicit.unwrap_or_else(|| {
        cwd.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "default".into())
    })
}

async fn run(args: RunArgs) -> Result<i32> {
    let cwd = std::env::current_dir().context("cannot read the current directory")?;
    // A `--durations` among pytest's arguments is taken as fly's own (see TerminalArgs).
    let mut pytest_args = args.pytest_args.clone();
    let terminal = args.terminal.options(&mut pytest_args);
    let mut request = RunRequest {
        project: project_name(args.project.clone(), &cwd),
        pytest_args,
        client_cwd: cwd.to_string_lossy().into_owned(),
        dist: args.dist.clone(),
        no_fork: args.no_fork,
        timeout_seconds: args.timeout,
        exports: crate::export::Exports {
            junit_xml: args.junit_xml.clone(),
            trace_json: args.trace_json.clone(),
        },
        required_labels: crate::labels::requirements(&args.require).map_err(anyhow::Error::msg)?,
        terminal,
        resume_of: args.resume.clone(),
        reruns: args.reruns,
        flaky_fails: args.flaky_fails,
        leave_now: None,
    };
    if args.connect.is_some() && args.http.addr.is_some() {
        anyhow::bail!(
            "--http serves the dashboard of the coordinator `run` embeds (--local, --listen); a \
             farm's dashboard is `serve --http`"
        );
    }
    if let Some(url) = &args.connect {
        let connected = match args.security.token.resolve() {
            Ok(token) => {
                let options = fly_agent::connect::ConnectOptions {
                    token,
                    ca: args.ca.clone(),
                };
                client::connect(url, &options)
                    .await
                    .map(|channel| (channel, options.attach_token()))
            }
            Err(err) => Err(err.into()),
        };
        let (channel, auth) = match connected {
            Ok(connected) => connected,
            Err(err) => {
                eprintln!("fly-coordinator: {err:#}");
                return Ok(exit_code::INTERNAL_ERROR);
            }
        };
        return client::run(channel, auth, request).await;
    }
    if !request.required_labels.is_empty() && args.listen.is_none() {
        anyhow::bail!(
            "--require picks agents of a farm, and the local agent has no labels: use it with \
             --connect or --listen"
        );
    }

    // An embedded coordinator: --local, --listen, or both. What may refuse to listen is
    // checked before the database is opened.
    let security = match &args.listen {
        Some(listen) => Some(args.security.security(listen).await?),
        None => None,
    };
    let local = args.local || args.listen.is_none();
    let node = Node::start(&args.db, Duration::from_secs(args.agent_timeout.max(1)))?;
    let dashboard = crate::http::Dashboard::start(&args.http, &args.security, &node).await?;
    if let Some(dashboard) = &dashboard {
        eprintln!("fly-coordinator dashboard on {}", dashboard.url());
    }
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = match (&args.listen, &security) {
        (Some(listen), Some(security)) => {
            let (listener, addr) = node::bind(listen).await?;
            eprintln!(
                "fly-coordinator listening on {}://{addr}",
                security.scheme()
            );
            Some(node.serve_tcp(listener, security, async {
                let _ = stop_rx.await;
            })?)
        }
        _ => None,
    };
    let channel = node.in_memory_channel().await?;
    let (agent_stop, agent_shutdown) = fly_agent::shutdown::Shutdown::new();
    let agent = if local {
        let config = AgentConfig {
            workers: args.workers,
            workdir: cwd.clone(),
            python: args
                .python
                .clone()
                .unwrap_or_else(fly_agent::default_python),
            labels: Vec::new(),
            // The local agent is stopped once the run is over: whatever still runs is left over.
            drain_grace: Duration::from_secs(2),
        };
        let agent_channel = channel.clone();
        Some(tokio::spawn(async move {
            if let Err(err) = fly_agent::serve_channel(agent_channel, &config, agent_shutdown).await
            {
                eprintln!("fly-coordinator: the local agent stopped: {err:#}");
            }
        }))
    } else {
        None
    };
    // A second Ctrl-C means now: the local workers are killed rather than drained.
    let (leave_now, mut left_now) = tokio::sync::oneshot::channel();
    request.leave_now = Some(leave_now);
    // The in-process connection needs no token.
    let code = client::run(channel, Default::default(), request).await;
    let now = left_now.try_recv().is_ok();
    // Let the local workers finish their session teardown before leaving.
    agent_stop.trigger();
    if now {
        agent_stop.trigger();
    }
    if let Some(mut agent) = agent {
        if tokio::time::timeout(LOCAL_AGENT_GRACE, &mut agent)
            .await
            .is_err()
        {
            agent.abort();
            let _ = agent.await;
        }
    }
    let _ = stop_tx.send(());
    if let Some(server) = server {
        let _ = tokio::time::timeout(Duration::from_secs(2), server).await;
    }
    if let Some(dashboard) = dashboard {
        dashboard.stop().await;
    }
    if now {
        // Writes the database cannot take right now (locked, disk full) are given up on.
        if tokio::time::timeout(STOP_NOW_WAIT, node.shutdown())
            .await
            .is_err()
        {
            eprintln!("fly-coordinator: stopped before every write reached the database");
        }
        return code;
    }
    node.shutdown().await?;
    code
}

/// `run --timeout`: a number of seconds, at least 0.
fn parse_timeout(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(seconds) if seconds.is_finite() && seconds >= 0.0 => Ok(seconds),
        _ => Err(format!("expected a number of seconds >= 0, got {s:?}")),
    }
}
