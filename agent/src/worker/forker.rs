//! The fork server's watcher: relays the one collection to the central task, gives each forked
//! worker's supervisor its process group, passes on how each worker ended, as reported by the
//! fork server (the agent cannot wait for processes that are not its children), and asks the
//! fork server for replacement workers.

use std::collections::HashMap;
use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;
use std::sync::{Arc, Mutex};

use fly_common::proto::CollectedTest;
use tokio::io::AsyncWriteExt;
use tokio::net::unix::OwnedWriteHalf;
use tokio::net::UnixStream;
use tokio::process::Child;
use tokio::sync::{mpsc, oneshot};
use tokio::time::{timeout_at, Instant};
use tracing::{debug, warn};

use super::frame::{encode_frame, AgentMessage, FrameReader, WorkerMessage};
use super::supervisor::{
    collected_test, connection_lost, next_frames, sleep_until_some, Frame, Frames, ProcessEnd,
    StandIn, DRAIN_WAIT, EOF_GRACE, LINGER_GRACE,
};
use super::tail::Output;
use super::{end_group, kill_group, set_group, Group, Internal, KillKind};

/// What the pool asks of the fork server.
pub(crate) enum ForkerCommand {
    /// Fork worker `worker` in slot `slot` (`gw<slot>`) onto the spare pipe pair `output`;
    /// `forked` is how its supervisor learns its pid and end.
    Fork {
        worker: u32,
        slot: u32,
        output: u32,
        forked: Forked,
    },
    /// No more forks: the fork server leaves once its workers have ended.
    Done,
}

/// The fork server's view of one worker.
pub(crate) struct Forked {
    pub(crate) group: Arc<Mutex<Group>>,
    /// Taken once the worker's end is known.
    pub(crate) end: Option<oneshot::Sender<ProcessEnd>>,
    /// The fork server said it forked this worker.
    pub(crate) forked: bool,
}

impl Forked {
    pub(crate) fn new(group: Arc<Mutex<Group>>, end: oneshot::Sender<ProcessEnd>) -> Forked {
        Forked {
            group,
            end: Some(end),
            forked: false,
        }
    }
}

pub(crate) struct Forker {
    group: Arc<Mutex<Group>>,
    central: mpsc::Sender<Internal>,
    output: Output,
    /// By worker id: the first workers, then the replacements asked for.
    workers: HashMap<u32, Forked>,
    collection: Vec<CollectedTest>,
    collection_done: bool,
    exit_message: Option<i32>,
    broken: bool,
    /// Requests for the fork server; its end tells the fork server that the agent is gone.
    write: Option<OwnedWriteHalf>,
    /// Requests made before the fork server connected.
    pending: Vec<AgentMessage>,
}

impl Forker {
    pub(crate) fn new(
        output: Output,
        group: Arc<Mutex<Group>>,
        central: mpsc::Sender<Internal>,
        workers: Vec<Forked>,
    ) -> Forker {
        Forker {
            group,
            central,
            output,
            workers: (0..).zip(workers).collect(),
            collection: Vec::new(),
            collection_done: false,
            exit_message: None,
            broken: false,
            write: None,
            pending: Vec::new(),
        }
    }

    pub(crate) async fn run(
        mut self,
        mut child: Child,
        mut connection: oneshot::Receiver<Result<UnixStream, String>>,
        mut commands: mpsc::UnboundedReceiver<ForkerCommand>,
    ) {
        let mut awaiting_connection = true;
        let mut commands_open = true;
        let mut frames: Option<Frames> = None;
        let mut kill_at: Option<Instant> = None;
        let status = loop {
            tokio::select! {
                status = child.wait() => break status,
                conn = &mut connection, if awaiting_connection => {
                    awaiting_connection = false;
                    match conn {
                        Ok(Ok(stream)) => {
                            frames = Some(self.connect(stream));
                            let pending = std::mem::take(&mut self.pending);
                            self.write_messages(pending).await;
                        }
                        Ok(Err(reason)) => self.fail(&reason),
                        // The acceptor is gone: the pool is being dropped.
                        Err(_) => {}
                    }
                }
                command = commands.recv(), if commands_open => match command {
                    Some(command) => self.command(command).await,
                    None => commands_open = false,
                },
                batch = next_frames(&mut frames) => match batch {
                    Some(batch) => self.handle(batch).await,
                    None => {
                        frames = None;
                        let grace = if self.exit_message.is_some() { LINGER_GRACE } else { EOF_GRACE };
                        kill_at = Some(Instant::now() + grace);
                    }
                },
                _ = sleep_until_some(kill_at) => {
                    kill_at = None;
                    kill_group(
                        &self.group,
                        KillKind::Broken,
                        "it closed its connection to the agent but did not exit",
                    );
                }
            }
        };
        self.finish(status, frames, commands).await;
    }

    fn connect(&mut self, stream: UnixStream) -> Frames {
        let (read, write) = stream.into_split();
        self.write = Some(write);
        FrameReader::new(read)
    }

    async fn command(&mut self, command: ForkerCommand) {
        let message = match command {
            ForkerCommand::Fork {
                worker,
                slot,
                output,
                forked,
            } => {
                self.workers.insert(worker, forked);
                AgentMessage::Fork {
                    worker,
                    slot,
                    output,
                }
            }
            ForkerCommand::Done => AgentMessage::Done,
        };
        if self.write.is_some() {
            self.write_messages(vec![message]).await;
        } else {
            self.pending.push(message);
        }
    }

    async fn write_messages(&mut self, messages: Vec<AgentMessage>) {
        let Some(write) = self.write.as_mut() else {
            return;
        };
        let mut buf = Vec::new();
        for message in &messages {
            encode_frame(message, &mut buf);
        }
        if let Err(error) = write.write_all(&buf).await {
            // The fork server is gone; its end (soon) settles every worker it did not fork.
            debug!("writing to the fork server failed: {error}");
        }
    }

    async fn handle(&mut self, batch: Vec<Frame>) {
        for frame in batch {
            if self.broken {
                return;
            }
            let message = match frame {
                Ok(message) => message,
                Err(error) if connection_lost(&error) => {
                    return debug!("the fork server's connection ended: {error}");
                }
                Err(error) => return self.fail(&format!("it sent an unreadable message: {error}")),
            };
            if let Err(reason) = self.check(message).await {
                self.fail(&reason);
            }
        }
    }

    async fn check(&mut self, message: WorkerMessage) -> Result<(), String> {
        match message {
            WorkerMessage::Collected {
                tests,
                deselected,
                done,
            } => {
                if self.collection_done {
                    return Err("it sent its collection twice".into());
                }
                self.collection
                    .extend(tests.into_iter().map(collected_test));
                if done {
                    self.collection_done = true;
                    let collected = Internal::Collected {
                        worker: None,
                        tests: std::mem::take(&mut self.collection),
                        deselected,
                    };
                    // The central task ends only when the pool is dropped.
                    let _ = self.central.send(collected).await;
                }
                Ok(())
            }
            WorkerMessage::Forked { worker, pid } => {
                let forked = self.worker(worker)?;
                if forked.forked || forked.end.is_none() || pid <= 1 {
                    return Err(format!("it reported forking worker {worker} as {pid}"));
                }
                forked.forked = true;
                debug!(worker, pid, "worker forked");
                set_group(&forked.group, pid);
                Ok(())
            }
            WorkerMessage::Reaped { worker, status } => {
                let forked = self.worker(worker)?;
                match (forked.forked, forked.end.take()) {
                    (true, Some(end)) => {
                        let _ = end.send(ProcessEnd::of(Ok(ExitStatus::from_raw(status))));
                        Ok(())
                    }
                    _ => Err(format!(
                        "it reported the end of worker {worker} out of turn"
                    )),
                }
            }
            WorkerMessage::ForkFailed { worker, error } => {
                let forked = self.worker(worker)?;
                match (forked.forked, forked.end.take()) {
                    (false, Some(end)) => {
                        warn!(worker, "the fork server could not fork the worker: {error}");
                        let _ = end.send(ProcessEnd::of(Err(std::io::Error::other(format!(
                            "it could not be forked: {error}"
                        )))));
                        Ok(())
                    }
                    _ => Err(format!(
                        "it reported failing to fork worker {worker} out of turn"
                    )),
                }
            }
            WorkerMessage::Exited { exit_code } => {
                self.exit_message = Some(exit_code);
                Ok(())
            }
            other => Err(format!("it sent {other:?}, which only a worker may send")),
        }
    }

    fn worker(&mut self, worker: u32) -> Result<&mut Forked, String> {
        self.workers
            .get_mut(&worker)
            .ok_or_else(|| format!("it spoke of worker {worker}, which does not exist"))
    }

    /// The fork server broke the protocol: it is stopped, and its workers with it.
    fn fail(&mut self, reason: &str) {
        warn!("stopping the fork server: {reason}");
        self.broken = true;
        kill_group(
            &self.group,
            KillKind::Broken,
            &format!("protocol error: {reason}"),
        );
    }

    /// The fork server ended: the workers it never forked end with it, with its exit status
    /// and output (that is how a usage or collection error reaches the user); forked workers
    /// whose end it did not report are stopped, as nobody could report it now.
    async fn finish(
        mut self,
        status: std::io::Result<ExitStatus>,
        frames: Option<Frames>,
        mut commands: mpsc::UnboundedReceiver<ForkerCommand>,
    ) {
        let kill = end_group(&self.group);
        // Replacements asked for too late end with the fork server, as if never forked.
        commands.close();
        while let Ok(command) = commands.try_recv() {
            if let ForkerCommand::Fork { worker, forked, .. } = command {
                self.workers.insert(worker, forked);
            }
        }
        let deadline = Instant::now() + DRAIN_WAIT;
        if let Some(mut frames) = frames {
            while let Ok(Some(batch)) = timeout_at(deadline, frames.next_batch()).await {
                self.handle(batch).await;
            }
        }
        self.output.finish(deadline).await;
        let output = self.output.text();
        for forked in self.workers.values_mut() {
            let Some(end) = forked.end.take() else {
                continue;
            };
            let end_of_worker = if forked.forked {
                kill_group(
                    &forked.group,
                    KillKind::Broken,
                    "its fork server ended before it",
                );
                ProcessEnd::of(Err(std::io::Error::other(
                    "its fork server ended without reporting it",
                )))
            } else {
                ProcessEnd {
                    status: copy_status(&status),
                    stand_in: Some(StandIn {
                        exit_message: self.exit_message,
                        output: output.clone(),
                        kill: kill.clone(),
                    }),
                }
            };
            let _ = end.send(end_of_worker);
        }
    }
}

fn copy_status(status: &std::io::Result<ExitStatus>) -> std::io::Result<ExitStatus> {
    match status {
        Ok(status) => Ok(*status),
        Err(error) => Err(std::io::Error::new(error.kind(), error.to_string())),
    }
}
