//! A fake agent: speaks the real agent protocol over its own gRPC connection, with workers
//! that finish every test the instant they start it.
//!
//! It keeps the real agent's rules that shape the coordinator's load: hello first; the
//! collection as a list (in chunks of 5,000) only when asked, otherwise its digest; a worker
//! starts a test only when it holds two (it must know the next one) or was told there is no
//! more, and asks again when it holds fewer than two; every test yields a start, three phase
//! reports and a finish; events go out batched, at most 2,048 to a message.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use fly_common::batch::EventBatch;
use fly_common::proto::agents_client::AgentsClient;
use fly_common::proto::{
    agent_message, coordinator_message, worker_event, AgentHello, AgentMessage, Collected,
    CollectedTest, CoordinatorMessage, Lease, Phase, PhaseReport, Revoked, TestFinished,
    TestStarted, WantWork, WorkerEvent, WorkerEvents,
};
use fly_common::{MAX_MESSAGE_BYTES, PROTOCOL_VERSION};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt;
use tonic::transport::Endpoint;

/// Tests per `Collected` chunk, as the real agent sends them.
pub const COLLECTION_CHUNK: usize = 5_000;
/// How long connecting to the coordinator may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(20);

/// Which agents send the full test list.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum CollectionMode {
    /// Exactly as the real agent: the list whenever StartRun.want_collection or SendCollection
    /// asks for it, the digest otherwise. Every agent idle at submit time is asked.
    AsAsked,
    /// Only the first agent StartRun asks for the list sends it; the others send their digest
    /// once the run has its collection, so the coordinator never needs to ask them again (an
    /// ideal of the protocol, isolating dispatch from collection traffic). A SendCollection is
    /// still answered with the list.
    OneLister,
}

/// What every fake agent shares.
pub struct Farm {
    pub url: String,
    pub workers: u32,
    pub collection: Arc<Vec<CollectedTest>>,
    pub digest: String,
    pub mode: CollectionMode,
    /// Seconds each phase report claims to have taken.
    pub phase_seconds: f64,
    /// Becomes true once the run reported its collection accepted.
    pub collected: watch::Receiver<bool>,
    /// Becomes true when the agents should hang up.
    pub quit: watch::Receiver<bool>,
    /// Time zero of the `*_at` statistics.
    pub clock: Instant,
    pub stats: FarmStats,
    /// Taken by the agent that sends the list in one-lister mode.
    pub lister: AtomicBool,
}

/// Counters all agents add to.
#[derive(Default)]
pub struct FarmStats {
    pub connected: AtomicUsize,
    pub tests_run: AtomicU64,
    pub leases_received: AtomicU64,
    pub work_messages: AtomicU64,
    pub no_work: AtomicU64,
    pub revokes: AtomicU64,
    pub messages_sent: AtomicU64,
    pub events_sent: AtomicU64,
    pub lists_sent: AtomicU64,
    pub send_collection_asks: AtomicU64,
    pub end_runs: AtomicUsize,
    /// Workers that never received a test.
    pub idle_workers: AtomicUsize,
    /// Nanoseconds after `Farm::clock` of the last lease received / last test finished.
    pub last_lease_ns: AtomicU64,
    pub last_finish_ns: AtomicU64,
}

impl Farm {
    fn mark(&self, at: &AtomicU64) {
        let ns = u64::try_from(self.clock.elapsed().as_nanos()).unwrap_or(u64::MAX);
        at.fetch_max(ns, Ordering::Relaxed);
    }
}

/// The synthetic suite: `t{i/100}.py::test_{i}`, a hundred tests a file.
pub fn synthetic_collection(tests: u32) -> Vec<CollectedTest> {
    (0..tests)
        .map(|i| {
            let file = format!("t{}.py", i / 100);
            CollectedTest {
                nodeid: format!("{file}::test_{i}"),
                line: 1 + 2 * (i % 100),
                file,
                group: String::new(),
            }
        })
        .collect()
}

#[derive(Default)]
struct Worker {
    /// Leases held and not started, in order.
    held: VecDeque<Lease>,
    /// Told there is nothing more for now.
    parked: bool,
    /// Asked for work and not answered yet.
    asked: bool,
    served: bool,
}

impl Worker {
    /// The next test to start, under the real worker's rule: only when it knows the test after
    /// it (pytest's fixture teardown needs that) or was told there is no more.
    fn start_next(&mut self) -> Option<Lease> {
        if self.held.len() >= 2 || self.parked {
            self.held.pop_front()
        } else {
            None
        }
    }

    /// Whether to ask for work now: it holds fewer than two and has neither asked already nor
    /// been told there is nothing.
    fn ask(&mut self) -> bool {
        let ask = self.held.len() < 2 && !self.parked && !self.asked;
        self.asked |= ask;
        ask
    }
}

struct Run {
    id: String,
    /// Waiting for the run's collection before sending the digest (one-lister mode).
    digest_pending: bool,
}

struct FakeAgent {
    index: usize,
    farm: Arc<Farm>,
    out: mpsc::Sender<AgentMessage>,
    run: Option<Run>,
    workers: Vec<Worker>,
    events: Vec<WorkerEvent>,
}

/// Connects agent `index`, serves the run, and hangs up when the farm quits.
pub async fn run(index: usize, farm: Arc<Farm>) -> Result<()> {
    let endpoint = Endpoint::from_shared(farm.url.clone())
        .context("the coordinator's URL")?
        .connect_timeout(CONNECT_TIMEOUT)
        .tcp_nodelay(true);
    let channel = endpoint
        .connect()
        .await
        .with_context(|| format!("agent {index} connecting to {}", farm.url))?;
    let (out, out_rx) = mpsc::channel::<AgentMessage>(64);
    let hello = AgentHello {
        protocol_version: PROTOCOL_VERSION,
        agent_id: format!("farm-agent-{index:05}"),
        hostname: format!("farm-{index:05}"),
        workers: farm.workers,
        fly_version: fly_common::FLY_VERSION.to_string(),
        speed: 1.0,
        ..Default::default()
    };
    out.send(message(agent_message::Kind::Hello(hello)))
        .await
        .context("queueing the hello")?;
    let mut inbound = AgentsClient::new(channel)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES)
        .join(ReceiverStream::new(out_rx))
        .await
        .with_context(|| format!("agent {index} joining"))?
        .into_inner();
    match inbound.next().await {
        Some(Ok(CoordinatorMessage {
            kind: Some(coordinator_message::Kind::Welcome(_)),
        })) => {}
        other => bail!("agent {index}: expected a welcome, got {other:?}"),
    }
    farm.stats.connected.fetch_add(1, Ordering::Relaxed);
    let mut agent = FakeAgent {
        index,
        farm: farm.clone(),
        out,
        run: None,
        workers: Vec::new(),
        events: Vec::new(),
    };
    let mut quit = farm.quit.clone();
    let mut collected = farm.collected.clone();
    loop {
        let digest_pending = agent.run.as_ref().is_some_and(|r| r.digest_pending);
        tokio::select! {
            incoming = inbound.next() => match incoming {
                Some(Ok(message)) => agent.on_message(message).await?,
                Some(Err(status)) => bail!("agent {index}: stream error: {status}"),
                None => bail!("agent {index}: the coordinator closed the stream"),
            },
            // The watch guard is dropped inside each branch future: it must not live across an
            // await (it is not Send).
            ready = async { collected.wait_for(|c| *c).await.map(|_| ()) }, if digest_pending => {
                ready.context("the farm's collection signal")?;
                agent.send_pending_digest().await?;
            }
            _ = async { quit.wait_for(|q| *q).await.map(|_| ()) } => break,
        }
    }
    let idle = agent.workers.iter().filter(|w| !w.served).count();
    farm.stats.idle_workers.fetch_add(idle, Ordering::Relaxed);
    Ok(())
}

fn message(kind: agent_message::Kind) -> AgentMessage {
    AgentMessage { kind: Some(kind) }
}

fn event(worker: u32, kind: worker_event::Kind) -> WorkerEvent {
    WorkerEvent {
        worker,
        kind: Some(kind),
    }
}

fn epoch_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

impl FakeAgent {
    async fn on_message(&mut self, message: CoordinatorMessage) -> Result<()> {
        let Some(kind) = message.kind else {
            return Ok(());
        };

        match kind {
            coordinator_message::Kind::Welcome(_) => {}
            coordinator_message::Kind::Reject(reject) => {
                bail!("agent {}: refused: {}", self.index, reject.reason)
            }
            coordinator_message::Kind::StartRun(start) => {
                self.workers = (0..self.farm.workers).map(|_| Worker::default()).collect();
                let lists = match self.farm.mode {
                    CollectionMode::AsAsked => start.want_collection,
                    CollectionMode::OneLister => {
                        start.want_collection && !self.farm.lister.swap(true, Ordering::Relaxed)
                    }
                };
                let waits = self.farm.mode == CollectionMode::OneLister && !lists;
                self.run = Some(Run {
                    id: start.run_id,
                    digest_pending: waits,
                });
                if !waits {
                    self.send_collection(lists).await?;
                    self.want_work_everywhere().await?;
                }
            }
            coordinator_message::Kind::SendCollection(ask) => {
                if self.run.as_ref().is_some_and(|r| r.id == ask.run_id) {
                    self.farm
                        .stats
                        .send_collection_asks
                        .fetch_add(1, Ordering::Relaxed);
                    // As the real agent: the list, and nothing else (its workers asked for
                    // work already).
                    self.send_collection(true).await?;
                }
            }
            coordinator_message::Kind::Work(work) => {
                if self.run.as_ref().is_none_or(|r| r.id != work.run_id) {
                    return Ok(());
                }
                let stats = &self.farm.stats;
                stats.work_messages.fetch_add(1, Ordering::Relaxed);
                let mut touched = Vec::with_capacity(work.assignments.len());
                let mut received = 0u64;
                for assignment in work.assignments {
                    let Some(worker) = self.workers.get_mut(assignment.worker as usize) else {
                        bail!(
                            "agent {}: work for worker {} of {}",
                            self.index,
                            assignment.worker,
                            self.farm.workers
                        );
                    };
                    worker.asked = false;
                    if assignment.leases.is_empty() {
                        worker.parked = true;
                        stats.no_work.fetch_add(1, Ordering::Relaxed);
                    } else {
                        worker.parked = false;
                        worker.served = true;
                        received += assignment.leases.len() as u64;
                        worker.held.extend(assignment.leases);
                    }
                    touched.push(assignment.worker);
                }
                if received > 0 {
                    stats.leases_received.fetch_add(received, Ordering::Relaxed);
                    self.farm.mark(&stats.last_lease_ns);
                }
                for worker in touched {
                    self.step(worker);
                }
                self.flush_events().await?;
            }
            coordinator_message::Kind::Revoke(revoke) => {
                if self.run.as_ref().is_none_or(|r| r.id != revoke.run_id) {
                    return Ok(());
                }
                self.farm.stats.revokes.fetch_add(1, Ordering::Relaxed);
                let Some(worker) = self.workers.get_mut(revoke.worker as usize) else {
                    return Ok(());
                };
                // Everything held is unstarted (tests run the instant they start).
                let mut removed = Vec::new();
                worker.held.retain(|l| {
                    let take = revoke.leases.contains(&l.lease);
                    if take {
                        removed.push(l.lease);
                    }
                    !take
                });
                self.events.push(event(
                    revoke.worker,
                    worker_event::Kind::Revoked(Revoked { leases: removed }),
                ));
                self.step(revoke.worker);
                self.flush_events().await?;
            }
            coordinator_message::Kind::EndRun(end) => {
                if self.run.as_ref().is_some_and(|r| r.id == end.run_id) {
                    self.farm.stats.end_runs.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        Ok(())
    }

    /// The collection as the list (`list`) or only its digest.
    async fn send_collection(&mut self, list: bool) -> Result<()> {
        let Some(run) = self.run.as_ref() else {
            return Ok(());
        };
        let tests = &self.farm.collection;
        let header = |chunk: Vec<CollectedTest>, done: bool| Collected {
            run_id: run.id.clone(),
            digest: self.farm.digest.clone(),
            total: tests.len() as u32,
            deselected: 0,
            tests: chunk,
            done,
            workers: self.farm.workers,
        };
        if !list || tests.is_empty() {
            let digest = header(Vec::new(), true);
            return self.send(agent_message::Kind::Collected(digest)).await;
        }
        self.farm.stats.lists_sent.fetch_add(1, Ordering::Relaxed);
        let chunks = tests.len().div_ceil(COLLECTION_CHUNK);
        for (i, chunk) in tests.chunks(COLLECTION_CHUNK).enumerate() {
            let chunk = header(chunk.to_vec(), i + 1 == chunks);
            self.send(agent_message::Kind::Collected(chunk)).await?;
        }
        Ok(())
    }

    async fn send_pending_digest(&mut self) -> Result<()> {
        if let Some(run) = self.run.as_mut() {
            run.digest_pending = false;
        }
        self.send_collection(false).await?;
        self.want_work_everywhere().await
    }

    async fn want_work_everywhere(&mut self) -> Result<()> {
        for worker in 0..self.farm.workers {
            self.step(worker);
        }
        self.flush_events().await
    }

    /// Runs what worker `w` may start, and asks for work when it holds fewer than two.
    fn step(&mut self, w: u32) {
        let Some(worker) = self.workers.get_mut(w as usize) else {
            return;
        };
        let mut ran = 0u64;
        let mut now = None;
        while let Some(lease) = worker.start_next() {
            let at = *now.get_or_insert_with(epoch_now);
            let seconds = self.farm.phase_seconds;
            self.events.push(event(
                w,
                worker_event::Kind::Started(TestStarted {
                    lease: lease.lease,
                    test_index: lease.test_index,
                    at,
                }),
            ));
            for (phase, category) in [
                (Phase::Setup, ""),
                (Phase::Call, "passed"),
                (Phase::Teardown, ""),
            ] {
                self.events.push(event(
                    w,
                    worker_event::Kind::Report(PhaseReport {
                        lease: lease.lease,
                        test_index: lease.test_index,
                        phase: phase as i32,
                        outcome: "passed".into(),
                        category: category.into(),
                        duration: seconds,
                        start: at,
                        stop: at + seconds,
                        ..Default::default()
                    }),
                ));
            }
            self.events.push(event(
                w,
                worker_event::Kind::Finished(TestFinished {
                    lease: lease.lease,
                    test_index: lease.test_index,
                }),
            ));
            ran += 1;
        }
        if worker.ask() {
            self.events
                .push(event(w, worker_event::Kind::WantWork(WantWork {})));
        }
        if ran > 0 {
            self.farm.stats.tests_run.fetch_add(ran, Ordering::Relaxed);
            self.farm.mark(&self.farm.stats.last_finish_ns);
        }
    }

    async fn flush_events(&mut self) -> Result<()> {
        let Some(run_id) = self.run.as_ref().map(|r| r.id.clone()) else {
            self.events.clear();
            return Ok(());
        };
        // Folded into messages as the real agent folds them.
        let mut pending = std::mem::take(&mut self.events).into_iter().peekable();
        while pending.peek().is_some() {
            let mut batch = EventBatch::default();
            while !batch.is_full() {
                match pending.next() {
                    Some(event) => batch.push(event),
                    None => break,
                }
            }
            let events = batch.take();
            self.farm
                .stats
                .events_sent
                .fetch_add(events.len() as u64, Ordering::Relaxed);
            let batch = WorkerEvents {
                run_id: run_id.clone(),
                events,
            };
            self.send(agent_message::Kind::Events(batch)).await?;
        }
        Ok(())
    }

    async fn send(&self, kind: agent_message::Kind) -> Result<()> {
        self.farm
            .stats
            .messages_sent
            .fetch_add(1, Ordering::Relaxed);
        self.out
            .send(message(kind))
            .await
            .with_context(|| format!("agent {}: the outbound stream closed", self.index))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease(n: u64) -> Lease {
        Lease {
            lease: n,
            test_index: n as u32,
        }
    }

    #[test]
    fn a_worker_starts_a_test_only_when_it_knows_the_next_one_or_was_told_there_is_none() {
        let mut worker = Worker::default();
        assert!(worker.ask(), "an empty worker asks");
        assert!(!worker.ask(), "and does not ask twice before an answer");
        worker.asked = false;
        worker.held.extend([lease(1), lease(2), lease(3)]);
        let started: Vec<u64> = std::iter::from_fn(|| worker.start_next())
            .map(|l| l.lease)
            .collect();
        assert_eq!(started, vec![1, 2], "the last one waits for its successor");
        assert!(worker.ask(), "holding one, it asks for more");
        worker.asked = false;
        worker.parked = true;
        assert_eq!(worker.start_next().map(|l| l.lease), Some(3));
        assert!(!worker.ask(), "a parked worker waits to be given work");
    }

    #[test]
    fn the_synthetic_suite_has_a_hundred_tests_a_file() {
        let tests = synthetic_collection(250);
        assert_eq!(tests[0].nodeid, "t0.py::test_0");
        assert_eq!(tests[199].nodeid, "t1.py::test_199");
        assert_eq!(tests[249].file, "t2.py");
        let ids: std::collections::HashSet<&str> =
            tests.iter().map(|t| t.nodeid.as_str()).collect();
        assert_eq!(ids.len(), 250);
    }
}
