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

use crate::client::{self, RunRequest};

/// How long `run --local` waits for its workers to finish after the run ended.
const LOCAL_AGENT_GRACE: Duration = Duration::from_secs(30);
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
    Run(RunArgs),
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
    /// Arguments for pytest, after `--`.
    #[arg(last = true, allow_hyphen_values = true)]
    pytest_args: Vec<String>,
}

/// Entry point of the binary.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let default_level = match cli.command {
        Command::Serve(_) => "info",
        Command::Run(_) => "warn",
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
            Command::Run(args) => run(args).await,
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

async fn serve(args: ServeArgs) -> Result<()> {
    let node = Node::start(&args.db, Duration::from_secs(args.agent_timeout.max(1)))?;
    let (listener, addr) = node::bind(&args.listen).await?;
    println!("fly-coordinator listening on http://{addr}");
    info!(db = %args.db.display(), "serving");
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = node.serve_tcp(listener, async {
        let _ = stop_rx.await;
    });
    stop_signal().await;
    info!("stopping");
    let _ = stop_tx.send(());
    // Agent streams live until their agents hang up; do not wait for them for long.
    let _ = tokio::time::timeout(Duration::from_secs(3), server).await;
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
    let request = RunRequest {
        project: project_name(args.project.clone(), &cwd),
        pytest_args: args.pytest_args.clone(),
        client_cwd: cwd.to_string_lossy().into_owned(),
        dist: args.dist.clone(),
        no_fork: args.no_fork,
    };
    if let Some(url) = &args.connect {
        let channel = match client::connect(url).await {
            Ok(channel) => channel,
            Err(err) => {
                eprintln!("fly-coordinator: {err:#}");
                return Ok(exit_code::INTERNAL_ERROR);
            }
        };
        return client::run(channel, request).await;
    }

    // An embedded coordinator: --local, --listen, or both.
    let local = args.local || args.listen.is_none();
    let node = Node::start(&args.db, Duration::from_secs(args.agent_timeout.max(1)))?;
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = match &args.listen {
        Some(listen) => {
            let (listener, addr) = node::bind(listen).await?;
            eprintln!("fly-coordinator listening on http://{addr}");
            Some(node.serve_tcp(listener, async {
                let _ = stop_rx.await;
            }))
        }
        None => None,
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
    let code = client::run(channel, request).await;
    // Let the local workers finish their session teardown before leaving.
    agent_stop.trigger();
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
    node.shutdown().await?;
    code
}
