//! The `run` client: submits a run to a coordinator (remote, or in this process), follows it
//! to its end, prints what pytest would print, and returns pytest's exit code.
//!
//! Ctrl-C (or SIGTERM) once cancels the run: the coordinator stops its tests, the results of
//! the tests that finished stay in the database, the client prints the summary of what ran and
//! exits 2. A second one leaves at once.

use std::collections::HashMap;
use std::io::Write as _;
use std::time::{Duration, Instant};

use anyhow::Result;
use fly_agent::connect::{self, AttachToken, ConnectOptions};
use fly_common::proto::runs_client::RunsClient;
use fly_common::proto::{run_event, CancelRequest, RunFinished, SubmitRequest, TestResult};
use fly_common::{exit_code, MAX_MESSAGE_BYTES, PROTOCOL_VERSION};
use tokio_stream::StreamExt;
use tonic::transport::Channel;

use crate::export::{self, Collector, Exports};
use crate::terminal;

/// How long `run --connect` tries to reach the coordinator before giving up.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a run may wait for agents before the client says so.
const WAITING_NOTICE_DELAY: Duration = Duration::from_secs(2);

pub struct RunRequest {
    pub project: String,
    pub pytest_args: Vec<String>,
    pub client_cwd: String,
    /// How tests are grouped into units of work (`--dist`).
    pub dist: String,
    pub no_fork: bool,
    /// Seconds a test may run (`--timeout`); 0: no limit.
    pub timeout_seconds: f64,
    /// Labels an agent must carry to serve the run (`--require`).
    pub required_labels: HashMap<String, String>,
    /// Files to write once the run is finished (`--junit-xml`, `--trace-json`).
    pub exports: Exports,
    /// What to print and how (`--durations`, `--color`).
    pub terminal: terminal::Options,
    /// `--resume RUN_ID`: carry on with that unfinished run instead of starting afresh.
    pub resume_of: Option<String>,
    /// `--reruns N`: run a failed test again, up to N more times.
    pub reruns: u32,
    /// `--flaky-fails`: a test that failed and then passed on a rerun fails the run.
    pub flaky_fails: bool,
    /// Fired when the user asked to stop at once (a second Ctrl-C), so whoever embeds the
    /// coordinator and agent (`run --local`) stops its workers now instead of letting them
    /// finish.
    pub leave_now: Option<tokio::sync::oneshot::Sender<()>>,
}

/// Connects to a coordinator at `url` (TLS for `https://`, trusting `options.ca`), failing
/// within [`CONNECT_TIMEOUT`]. A failed TLS handshake is named as one.
pub async fn connect(url: &str, options: &ConnectOptions) -> Result<Channel> {
    let endpoint = options
        .endpoint(url)?
        .connect_timeout(CONNECT_TIMEOUT)
        .tcp_nodelay(true);
    match tokio::time::timeout(CONNECT_TIMEOUT, endpoint.connect()).await {
        Ok(Ok(channel)) => Ok(channel),
        Ok(Err(err)) => Err(anyhow::anyhow!(
            "cannot reach the coordinator at {url}: {}",
            connect::describe_connect_error(&err)
        )),
        Err(_) => Err(anyhow::anyhow!(
            "cannot reach the coordinator at {url}: no answer within {} s",
            CONNECT_TIMEOUT.as_secs()
        )),
    }
}

/// Submits the run, follows it and prints its outcome. Returns pytest's exit code. `auth` puts
/// the farm's token on every call.
pub async fn run(channel: Channel, auth: AttachToken, request: RunRequest) -> Result<i32> {
    let mut client = RunsClient::with_interceptor(channel, auth)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    let submit = SubmitRequest {
        protocol_version: PROTOCOL_VERSION,
        project: request.project,
        pytest_args: request.pytest_args,
        client_cwd: request.client_cwd,
        dist: request.dist,
        no_fork: request.no_fork,
        timeout_seconds: request.timeout_seconds,
        required_labels: request.required_labels,
        resume_of: request.resume_of.clone().unwrap_or_default(),
        reruns: request.reruns,
        flaky_fails: request.flaky_fails,
    };
    // Listening from before the submission on: the first signal must cancel, not kill.
    let mut signals = StopSignals::install()?;
    let mut leave_now = request.leave_now;
    let mut stream = match client.submit(submit).await {
        Ok(response) => response.into_inner(),
        // A run that cannot be resumed is the user's mistake, told as pytest tells one.
        Err(status)
            if request.resume_of.is_some()
                && matches!(
                    status.code(),
                    tonic::Code::NotFound | tonic::Code::FailedPrecondition
                ) =>
        {
            eprintln!("fly-coordinator: {}", status.message());
            return Ok(exit_code::USAGE_ERROR);
        }
        Err(status) => {
            anyhow::bail!("the coordinator refused the run: {}", status.message())
        }
    };

    let style = terminal::Style::detect(&request.terminal);
    let mut progress = terminal::Progress::detect(style.color);
    let mut tick = tokio::time::interval(terminal::progress::TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut durations = request.terminal.durations.map(|count| {
        terminal::Durations::new(
            count,
            request.terminal.durations_min,
            request.terminal.verbosity,
        )
    });
    // Every result is kept only when a file will be written from them.
    let mut collector = (!request.exports.is_empty()).then(Collector::new);
    let mut run_id = String::new();
    let mut failures: Vec<TestResult> = Vec::new();
    // Tests that passed on a rerun: (node id, attempts).
    let mut flaky: Vec<(String, u32)> = Vec::new();
    let mut interrupts = 0u32;
    let mut last_status = String::new();
    // "Waiting for an agent" is news only if the wait lasts: a local agent joins at once.
    let mut waiting_notice: Option<String> = None;
    let finished: RunFinished = loop {
        let next = async {
            if waiting_notice.is_some() {
                tokio::time::timeout(WAITING_NOTICE_DELAY, stream.next())
                    .await
                    .ok()
            } else {
                Some(stream.next().await)
            }
        };
        let event = tokio::select! {
            event = next => match event {
                Some(event) => event,
                None => {
                    if let Some(notice) = waiting_notice.take() {
                        progress.note(&format!("fly: {notice}"));
                    }
                    continue;
                }
            },
            // The bar's ETA and the plain lines move with time too. Not while a waiting notice
            // is due: the tick would restart its delay.
            _ = tick.tick(), if progress.is_active() && waiting_notice.is_none() => {
                progress.tick(Instant::now());
                continue;
            }
            _ = signals.next() => {
                interrupts += 1;
                if interrupts >= 2 || run_id.is_empty() {
                    progress.finish();
                    eprintln!("\nfly: interrupted: stopping now");
                    if let Some(now) = leave_now.take() {
                        let _ = now.send(());
                    }
                    return Ok(exit_code::INTERRUPTED);
                }
                progress.note(
                    "\nfly: interrupted: cancelling the run (press Ctrl-C again to stop now)",
                );
                let mut cancel = client.clone();
                let id = run_id.clone();
                tokio::spawn(async move {
                    let _ = cancel.cancel(CancelRequest { run_id: id }).await;
                });
                continue;
            }
        };
        let event = match event {
            Some(Ok(event)) => event,
            Some(Err(status)) => {
                anyhow::bail!("lost the run: {}", status.message());
            }
            None => anyhow::bail!("the coordinator ended the run's stream without a result"),
        };
        match event.kind {
            Some(run_event::Kind::Status(status)) => {
                if run_id.is_empty() {
                    run_id = status.run_id.clone();
                    eprintln!("fly: run {run_id}");
                    if let Some(collector) = collector.as_mut() {
                        collector.set_run_id(&run_id);
                    }
                }
                waiting_notice = None;
                if status.message != last_status {
                    if status.message.starts_with("waiting") {
                        waiting_notice = Some(status.message.clone());
                    } else {
                        progress.note(&format!("fly: {}", status.message));
                    }
                    last_status = status.message.clone();
                }
                progress.status(&status, Instant::now());
            }
            Some(run_event::Kind::Notice(notice)) => {
                progress.note(&format!("fly: warning: {}", notice.message));
            }
            Some(run_event::Kind::Result(result)) => {
                progress.result(&result, Instant::now());
                if let Some(durations) = durations.as_mut() {
                    durations.add(&result);
                }
                let noteworthy = result
                    .phases
                    .iter()
                    .any(|p| p.category == "failed" || p.category == "error");
                if result.flaky {
                    flaky.push((result.nodeid.clone(), result.attempts));
                }
                if let Some(collector) = collector.as_mut() {
                    if noteworthy {
                        failures.push(result.clone());
                    }
                    collector.add(result);
                } else if noteworthy {
                    failures.push(result);
                }
            }
            Some(run_event::Kind::Finished(finished)) => break finished,
            None => {}
        }
    };
    progress.finish();
    print_flaky(&flaky, request.flaky_fails);
    let text = terminal::render_end(&failures, &finished, durations.as_ref(), &style);
    if finished.exit_code == exit_code::USAGE_ERROR {
        eprint!("{text}");
    } else {
        print!("{text}");
    }
    let _ = std::io::stdout().flush();
    match &collector {
        Some(collector) => Ok(export::write_and_report(
            &request.exports,
            collector,
            &finished,
        )),
        None => Ok(finished.exit_code),
    }
}

/// Names the tests that failed and then passed on a rerun, just above pytest's summary line
/// (which counts them as passed, with `N rerun`), and says when they fail the run.
fn print_flaky(flaky: &[(String, u32)], flaky_fails: bool) {
    if flaky.is_empty() {
        return;
    }
    let mut out = std::io::stdout().lock();
    for (nodeid, attempts) in flaky {
        let _ = writeln!(out, "FLAKY {nodeid} - passed on attempt {attempts}");
    }
    if flaky_fails {
        let _ = writeln!(
            out,
            "fly: {} flaky test{} fail{} the run (--flaky-fails)",
            flaky.len(),
            if flaky.len() == 1 { "" } else { "s" },
            if flaky.len() == 1 { "s" } else { "" },
        );
    }
}

/// SIGINT (Ctrl-C) and SIGTERM: a person or a CI system asking the run to stop.
struct StopSignals {
    #[cfg(unix)]
    interrupt: tokio::signal::unix::Signal,
    #[cfg(unix)]
    terminate: tokio::signal::unix::Signal,
}

impl StopSignals {
    /// Takes over both signals for the rest of the process: from now on they cancel the run
    /// instead of killing the process.
    fn install() -> Result<StopSignals> {
        #[cfg(unix)]
        {
            use anyhow::Context as _;
            use tokio::signal::unix::{signal, SignalKind};
            Ok(StopSignals {
                interrupt: signal(SignalKind::interrupt()).context("cannot listen for SIGINT")?,
                terminate: signal(SignalKind::terminate()).context("cannot listen for SIGTERM")?,
            })
        }
        #[cfg(not(unix))]
        {
            Ok(StopSignals {})
        }
    }

    /// Resolves at the next signal.
    async fn next(&mut self) {
        #[cfg(unix)]
        {
            tokio::select! {
                _ = self.interrupt.recv() => {}
                _ = self.terminate.recv() => {}
            }
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
