//! The `run` client: submits a run to a coordinator (remote, or in this process), follows it
//! to its end, prints what pytest would print, and returns pytest's exit code.
//!
//! Ctrl-C once cancels the run (the coordinator stops its tests, partial results stay in the
//! database, exit code 2); a second Ctrl-C leaves at once.

use std::io::{IsTerminal, Write as _};
use std::time::Duration;

use anyhow::{Context, Result};
use fly_common::proto::runs_client::RunsClient;
use fly_common::proto::{run_event, CancelRequest, RunFinished, SubmitRequest, TestResult};
use fly_common::{exit_code, MAX_MESSAGE_BYTES, PROTOCOL_VERSION};
use tokio_stream::StreamExt;
use tonic::transport::{Channel, Endpoint};

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
}

/// Connects to a coordinator at `url`, failing within [`CONNECT_TIMEOUT`].
pub async fn connect(url: &str) -> Result<Channel> {
    let endpoint = Endpoint::from_shared(url.to_string())
        .with_context(|| {
            format!("{url:?} is not a valid coordinator URL (expected http://HOST:PORT)")
        })?
        .connect_timeout(CONNECT_TIMEOUT)
        .tcp_nodelay(true);
    match tokio::time::timeout(CONNECT_TIMEOUT, endpoint.connect()).await {
        Ok(Ok(channel)) => Ok(channel),
        Ok(Err(err)) => Err(anyhow::anyhow!(
            "cannot reach the coordinator at {url}: {}",
            error_chain(&err)
        )),
        Err(_) => Err(anyhow::anyhow!(
            "cannot reach the coordinator at {url}: no answer within {} s",
            CONNECT_TIMEOUT.as_secs()
        )),
    }
}

fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// Submits the run, follows it and prints its outcome. Returns pytest's exit code.
pub async fn run(channel: Channel, request: RunRequest) -> Result<i32> {
    let mut client = RunsClient::new(channel)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    let submit = SubmitRequest {
        protocol_version: PROTOCOL_VERSION,
        project: request.project,
        pytest_args: request.pytest_args,
        client_cwd: request.client_cwd,
        dist: request.dist,
        no_fork: request.no_fork,
    };
    let mut stream = client
        .submit(submit)
        .await
        .map_err(|status| anyhow::anyhow!("the coordinator refused the run: {}", status.message()))?
        .into_inner();

    let interactive = std::io::stderr().is_terminal();
    let mut run_id = String::new();
    let mut failures: Vec<TestResult> = Vec::new();
    let mut collected = 0u32;
    let mut done = 0u32;
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
                        eprintln!("fly: {notice}");
                    }
                    continue;
                }
            },
            _ = tokio::signal::ctrl_c() => {
                interrupts += 1;
                if interrupts >= 2 || run_id.is_empty() {
                    eprintln!("\nfly: interrupted");
                    return Ok(exit_code::INTERRUPTED);
                }
                eprintln!("\nfly: cancelling the run (Ctrl-C again to leave at once)");
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
                }
                if status.collected > 0 && collected == 0 {
                    collected = status.collected;
                }
                waiting_notice = None;
                if status.message != last_status {
                    if status.message.starts_with("waiting") {
                        waiting_notice = Some(status.message.clone());
                    } else {
                        eprintln!("fly: {}", status.message);
                    }
                    last_status = status.message;
                }
            }
            Some(run_event::Kind::Notice(notice)) => {
                eprintln!("fly: warning: {}", notice.message);
            }
            Some(run_event::Kind::Result(result)) => {
                done += 1;
                if interactive && collected > 0 {
                    eprint!("\r[{done}/{collected}]");
                    let _ = std::io::stderr().flush();
                }
                let noteworthy = result
                    .phases
                    .iter()
                    .any(|p| p.category == "failed" || p.category == "error");
                if noteworthy {
                    failures.push(result);
                }
            }
            Some(run_event::Kind::Finished(finished)) => break finished,
            None => {}
        }
    };
    if interactive && done > 0 {
        eprintln!();
    }
    let text = terminal::render_end(&failures, &finished, terminal::width());
    if finished.exit_code == exit_code::USAGE_ERROR {
        eprint!("{text}");
    } else {
        print!("{text}");
    }
    let _ = std::io::stdout().flush();
    Ok(finished.exit_code)
}
