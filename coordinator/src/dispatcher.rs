//! The dispatcher owns all run state: connected agents, runs, their collections, schedulers,
//! per-test phase reports and followers.
//!
//! It runs as one task. gRPC handlers never touch run state: they send [`Input`]s through a
//! channel and receive what concerns them on channels of their own. Each input is handled by
//! plain synchronous code (`Dispatcher::handle`), which decides, tells the pure
//! [`Scheduler`] what happened, and carries out its actions: messages to agents, writes to the
//! store, events to followers. Only store flushes are awaited, off the loop, so a slow disk
//! never stalls dispatch.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use fly_common::outcome::{final_outcome, Counts, Phase};
use fly_common::proto::{
    agent_message, coordinator_message, run_event, worker_event, AgentHello, AgentMessage,
    AgentNotice, Assignment, CategoryCount, Collected, CollectionFailed, CoordinatorMessage,
    EndRun, Lease as WireLease, PhaseReport, PhaseResult, Revoke, RunEvent, RunFinished, RunStatus,
    SendCollection, StartRun, SubmitRequest, TestResult, Welcome, Work, WorkerEvents,
};
use fly_common::{exit_code, PROTOCOL_VERSION};
use tokio::sync::{mpsc, oneshot};
use tonic::Status;
use tracing::{debug, info, warn};

use crate::collection::Collection;
use crate::observe::{Observation, Watch};
use crate::scheduler::{Action, AgentSlot, Event, LeaseStatus, Scheduler, WorkerKey};
use crate::store::{History, Store, Write};
use crate::units::{self, Dist};

mod followers;
mod reruns;
mod resume;
mod snapshot;

pub use followers::{channel as follower_channel, FollowerStream, FollowerTx};

pub type AgentTx = mpsc::UnboundedSender<Result<CoordinatorMessage, Status>>;

/// Everything the outside world can tell the dispatcher.
pub enum Input {
    AgentJoined {
        hello: AgentHello,
        tx: AgentTx,
        reply: oneshot::Sender<AgentSlot>,
    },
    AgentMessage {
        slot: AgentSlot,
        message: AgentMessage,
    },
    AgentGone {
        slot: AgentSlot,
        reason: String,
    },
    Submit {
        request: SubmitRequest,
        tx: FollowerTx,
        /// The run's id, or why it was refused (a `--resume` of a run that cannot be resumed).
        reply: oneshot::Sender<Result<String, Status>>,
    },
    /// The recorded run a `run --resume` submission carries on with, read from the store.
    ResumeLoaded {
        request: SubmitRequest,
        tx: FollowerTx,
        reply: oneshot::Sender<Result<String, Status>>,
        recorded: Result<crate::store::RecordedRun, crate::store::LookupError>,
    },
    Follow {
        run_id: String,
        tx: FollowerTx,
    },
    Cancel {
        run_id: String,
        reason: String,
    },
    /// The client that submitted the run went away.
    SubmitterGone {
        run_id: String,
    },
    /// The project's duration history, read for a run (empty if it could not be read).
    HistoryLoaded {
        run_id: String,
        history: Arc<History>,
    },
    /// A snapshot of runs in progress, agents and metrics, for the dashboard and `/metrics`.
    Observe {
        reply: oneshot::Sender<Observation>,
    },
    /// Time passed (every [`TICK`]): the schedulers look again at tests running long.
    Tick,
}

/// How often the dispatcher tells the running schedulers that time passed.
const TICK: Duration = Duration::from_millis(200);

/// Every this many ticks, followers of a running run get a status with a fresh ETA.
const STATUS_TICKS: u32 = 5;

/// Finished runs kept in memory (their verdict, for `follow`); older ones are forgotten, so a
/// coordinator that serves runs for months does not grow with them. The store keeps them all.
const MAX_FINISHED_RUNS: usize = 1_000;

/// Agent messages (and the end of an agent's stream) the dispatcher has not taken yet. Past
/// this, the agents' stream reader waits, and gRPC flow control slows the agents down. A
/// decoded message of 2,048 worker events takes a few hundred kilobytes, several times its
/// size on the wire: the rest waits undecoded in the connections' windows.
const AGENT_INPUT_BACKLOG: usize = 16;

/// The most tests room is made for before a collection's chunks arrive, whatever an agent
/// announces; a larger collection grows as it comes.
const MAX_RESERVED_TESTS: usize = 10_000_000;

/// A cheap handle for sending inputs to the dispatcher task.
#[derive(Clone)]
pub struct DispatcherHandle {
    tx: mpsc::UnboundedSender<Input>,
    agents: mpsc::Sender<Input>,
}

impl DispatcherHandle {
    /// Sends a control input (joins, submissions, follows, timers). Returns false when the
    /// dispatcher has stopped.
    pub fn send(&self, input: Input) -> bool {
        self.tx.send(input).is_ok()
    }

    /// Waits for room for one input from an agent ([`Input::AgentMessage`],
    /// [`Input::AgentGone`]): agent traffic is what can outrun the coordinator, so it is the
    /// part that waits. Taking the room before reading the next message means none is decoded
    /// only to wait. One channel keeps each agent's messages and its departure in order.
    /// `None` when the dispatcher has stopped.
    pub async fn agent_room(&self) -> Option<mpsc::Permit<'_, Input>> {
        self.agents.reserve().await.ok()
    }
}

/// Starts the dispatcher task.
pub fn spawn(store: Store) -> (DispatcherHandle, tokio::task::JoinHandle<()>) {
    let (tx, mut rx) = mpsc::unbounded_channel();
    let (agents, mut agent_rx) = mpsc::channel(AGENT_INPUT_BACKLOG);
    let handle = DispatcherHandle { tx, agents };
    let mut dispatcher = Dispatcher::new(store.clone(), handle.clone());
    let join = tokio::spawn(async move {
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            // Agent traffic is taken only while the store keeps up, so memory stays bounded
            // when the farm reports faster than SQLite commits; control inputs always flow.
            let input = tokio::select! {
                biased;
                input = rx.recv() => input,
                _ = tick.tick() => Some(Input::Tick),
                input = async {
                    store.room().await;
                    agent_rx.recv().await
                } => input,
            };
            match input {
                Some(input) => dispatcher.handle(input, Instant::now()),
                None => break,
            }
        }
    });
    (handle, join)
}

fn epoch_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

struct AgentConn {
    id: String,
    hostname: String,
    workers: u32,
    /// Relative speed of its cores, from its calibration (1.0 = reference).
    speed: f64,
    tx: AgentTx,
    /// The run this agent serves now.
    run: Option<String>,
    /// `fly-agent --label` pairs: which runs it may serve.
    labels: HashMap<String, String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RunPhase {
    /// No collection yet.
    Collecting,
    Running,
    Finished,
}

/// An agent's collection as it arrives in chunks.
#[derive(Default)]
struct PartialCollection {
    /// Built test by test as the chunks arrive: the chunks themselves are not kept.
    tests: Collection,
    digest: String,
    total: u32,
    deselected: u32,
    workers: u32,
    /// The agent sent the full list (not only the digest).
    has_list: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Membership {
    /// StartRun sent; collection not yet accepted.
    Joining,
    Accepted,
    Refused,
}

/// What is known of a test's current attempt while it runs.
#[derive(Default)]
struct CurrentAttempt {
    agent_id: String,
    worker: u32,
    reports: Vec<PhaseReport>,
}

struct RunState {
    id: String,
    /// `run --require` pairs: only agents carrying all of them serve the run.
    required_labels: HashMap<String, String>,
    project: String,
    args: Vec<String>,
    dist: Dist,
    no_fork: bool,
    timeout_seconds: f64,
    /// The project's history; `None` until read.
    history: Option<Arc<History>>,
    /// Workers that asked for work before the scheduler existed (history still loading).
    early_wants: Vec<WorkerKey>,
    /// An agent was asked for the full collection.
    list_requested: bool,
    /// The agent asked for the full list while the run has none.
    lister: Option<AgentSlot>,
    /// Agents that sent only a digest while the lister's list is on its way: judged once the
    /// run has its collection.
    held_digests: Vec<(AgentSlot, PartialCollection)>,
    started: Instant,
    phase: RunPhase,
    /// Shared (an `Arc`) so that a handler can read it while it changes the rest of the run.
    collection: Option<Arc<Collection>>,
    digest: String,
    deselected: u32,
    partial: HashMap<AgentSlot, PartialCollection>,
    members: HashMap<AgentSlot, Membership>,
    scheduler: Option<Scheduler>,
    /// Phase reports of current leases, until the test finishes.
    phases: HashMap<u64, CurrentAttempt>,
    counts: Counts,
    followers: followers::Followers,
    /// The message of the last status sent to followers, repeated by the periodic ones (a
    /// client prints a status's message when it changes).
    last_message: String,
    /// `--reruns`, `--flaky-fails`, flaky tests so far, agents gone (to name lost tests).
    reruns: reruns::Reruns,
    /// `run --resume`: the recorded results this run carries on with.
    resume: Option<resume::Resume>,
}

impl RunState {
    fn broadcast(&mut self, event: run_event::Kind) {
        if let run_event::Kind::Status(status) = &event {
            self.last_message.clone_from(&status.message);
        }
        self.followers.send(RunEvent { kind: Some(event) });
    }

    /// Sends followers a test's final result, whose write to the store is already queued (a
    /// follower that fell behind gets it read back from there).
    fn broadcast_stored_result(&mut self, result: TestResult) {
        let test_index = result.test_index;
        let event = RunEvent {
            kind: Some(run_event::Kind::Result(result)),
        };
        self.followers.send_stored_result(test_index, event);
    }

    /// Sends followers a status with a fresh ETA and the last message again (a client prints
    /// a message only when it changes; a "waiting ..." one it holds back, so that is not
    /// repeated).
    fn refresh_status(&mut self, agents: &HashMap<AgentSlot, AgentConn>) {
        if self.followers.is_empty() || self.last_message.starts_with("waiting") {
            return;
        }
        let status = self.status(agents, self.last_message.clone());
        self.broadcast(run_event::Kind::Status(status));
    }

    fn status(&self, agents: &HashMap<AgentSlot, AgentConn>, message: String) -> RunStatus {
        let accepted: Vec<&AgentSlot> = self
            .members
            .iter()
            .filter(|(_, m)| **m == Membership::Accepted)
            .map(|(s, _)| s)
            .collect();
        RunStatus {
            run_id: self.id.clone(),
            message,
            collected: self
                .collection
                .as_ref()
                .map(|c| c.len() as u32)
                .unwrap_or(0),
            finished: self
                .scheduler
                .as_ref()
                .map(|s| s.finished_count() as u32)
                .unwrap_or(0),
            agents: accepted.len() as u32,
            workers: accepted
                .iter()
                .filter_map(|s| agents.get(s))
                .map(|a| a.workers)
                .sum(),
            running: {
                // A few tests a follower can name as running: those whose first report is in.
                const SHOWN: usize = 8;
                let mut tests: Vec<u32> = self
                    .phases
                    .values()
                    .filter_map(|attempt| attempt.reports.first())
                    .map(|report| report.test_index)
                    .collect();
                tests.sort_unstable();
                tests
                    .iter()
                    .filter_map(|t| self.collection.as_ref()?.nodeid(*t as usize))
                    .take(SHOWN)
                    .map(str::to_string)
                    .collect()
            },
            eta_seconds: self
                .scheduler
                .as_ref()
                .and_then(|s| s.eta_seconds(Instant::now()))
                .unwrap_or(0.0),
        }
    }
}

pub struct Dispatcher {
    store: Store,
    agents: HashMap<AgentSlot, AgentConn>,
    next_slot: AgentSlot,
    runs: HashMap<String, RunState>,
    /// Unfinished runs, oldest first: idle agents go to the first that can use them.
    queue: Vec<String>,
    /// Finished runs still in `runs`, oldest first (at most [`MAX_FINISHED_RUNS`]).
    finished: VecDeque<String>,
    /// Ticks so far (see [`STATUS_TICKS`]).
    ticks: u32,
    /// Work to send, gathered while handling one input so each agent gets one message.
    outbox: HashMap<AgentSlot, Work>,
    /// Our own input channel, for work done off the loop that reports back (history reads).
    inputs: DispatcherHandle,
    /// Agents' machines, each worker's current test and the metrics, for [`Input::Observe`].
    watch: Watch,
}

impl Dispatcher {
    pub fn new(store: Store, inputs: DispatcherHandle) -> Dispatcher {
        Dispatcher {
            inputs,
            store,
            agents: HashMap::new(),
            next_slot: 1,
            runs: HashMap::new(),
            queue: Vec::new(),
            finished: VecDeque::new(),
            ticks: 0,
            outbox: HashMap::new(),
            watch: Watch::new(),
        }
    }

    pub fn handle(&mut self, input: Input, now: Instant) {
        match input {
            Input::AgentJoined { hello, tx, reply } => self.agent_joined(hello, tx, reply),
            Input::AgentMessage { slot, message } => self.agent_message(slot, message, now),
            Input::AgentGone { slot, reason } => self.agent_gone(slot, &reason, now),
            Input::Submit { request, tx, reply } if !request.resume_of.is_empty() => {
                self.load_resumed(request, tx, reply)
            }
            Input::Submit { request, tx, reply } => {
                self.submit(request, tx, reply, now);
            }
            Input::ResumeLoaded {
                request,
                tx,
                reply,
                recorded,
            } => self.resume_loaded(request, tx, reply, recorded, now),
            Input::Follow { run_id, tx } => self.follow(&run_id, tx),
            Input::Cancel { run_id, reason } => self.cancel(&run_id, &reason),
            Input::SubmitterGone { run_id } => {
                if self
                    .runs
                    .get(&run_id)
                    .is_some_and(|r| r.phase != RunPhase::Finished)
                {
                    self.cancel(&run_id, "the client that submitted the run went away");
                }
            }
            Input::HistoryLoaded { run_id, history } => {
                if let Some(run) = self
                    .runs
                    .get_mut(&run_id)
                    .filter(|r| r.phase != RunPhase::Finished)
                {
                    run.history = Some(history);
                    self.start_scheduler(&run_id, now);
                }
            }
            Input::Observe { reply } => self.observe(reply),
            Input::Tick => self.tick(now),
        }
        self.flush_outbox();
        self.watch.dispatched(now);
    }

    fn tick(&mut self, now: Instant) {
        self.ticks = self.ticks.wrapping_add(1);
        let status_due = self.ticks.is_multiple_of(STATUS_TICKS);
        let mut ticked = Vec::new();
        for (run_id, run) in &mut self.runs {
            run.followers.catch_up(&self.store, run_id);
            let Some(scheduler) = run.scheduler.as_mut() else {
                continue;
            };
            let actions = scheduler.handle(Event::Tick, now);
            if !actions.is_empty() {
                ticked.push((run_id.clone(), actions));
            }
            if status_due {
                run.refresh_status(&self.agents);
            }
        }
        for (run_id, actions) in ticked {
            self.apply(&run_id, actions);
        }
    }

    fn flush_outbox(&mut self) {
        for (slot, work) in self.outbox.drain() {
            if let Some(agent) = self.agents.get(&slot) {
                let message = CoordinatorMessage {
                    kind: Some(coordinator_message::Kind::Work(work)),
                };
                let _ = agent.tx.send(Ok(message));
            }
        }
    }

    fn send_to(&self, slot: AgentSlot, kind: coordinator_message::Kind) {
        if let Some(agent) = self.agents.get(&slot) {
            let _ = agent.tx.send(Ok(CoordinatorMessage { kind: Some(kind) }));
        }
    }

    // --- agents ------------------------------------------------------------------------------

    fn agent_joined(&mut self, hello: AgentHello, tx: AgentTx, reply: oneshot::Sender<AgentSlot>) {
        let slot = self.next_slot;
        self.next_slot += 1;
        let topology = hello.topology.clone().unwrap_or_default();
        info!(
            agent = %hello.agent_id,
            host = %hello.hostname,
            workers = hello.workers,
            "agent joined"
        );
        self.store.write(Write::AgentConnected {
            agent_id: hello.agent_id.clone(),
            hostname: hello.hostname.clone(),
            fly_version: hello.fly_version.clone(),
            protocol_version: hello.protocol_version,
            workers: hello.workers,
            topology,
            labels: hello
                .labels
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            workdir: hello.workdir.clone(),
            python: hello.python.clone(),
            speed: hello.speed,
            connected_at: epoch_now(),
        });
        let _ = tx.send(Ok(CoordinatorMessage {
            kind: Some(coordinator_message::Kind::Welcome(Welcome {
                protocol_version: PROTOCOL_VERSION,
                coordinator_id: String::new(),
            })),
        }));
        let labels = hello.labels.clone();
        self.watch.agent_joined(slot, &hello);
        self.agents.insert(
            slot,
            AgentConn {
                labels,
                id: hello.agent_id,
                hostname: hello.hostname,
                workers: hello.workers.max(1),
                speed: if hello.speed.is_finite() && hello.speed > 0.0 {
                    hello.speed
                } else {
                    1.0
                },
                tx,
                run: None,
            },
        );
        let _ = reply.send(slot);
        self.assign_idle_agents();
    }

    fn agent_gone(&mut self, slot: AgentSlot, reason: &str, now: Instant) {
        let Some(agent) = self.agents.remove(&slot) else {
            return;
        };
        self.watch.agent_left(slot);
        info!(agent = %agent.id, host = %agent.hostname, %reason, "agent left");
        self.store.write(Write::AgentDisconnected {
            agent_id: agent.id.clone(),
            at: epoch_now(),
            reason: reason.to_string(),
        });
        if let Some(run_id) = agent.run {
            if let Some(run) = self.runs.get_mut(&run_id) {
                run.members.remove(&slot);
                run.partial.remove(&slot);
                run.held_digests.retain(|(s, _)| *s != slot);
                run.early_wants.retain(|k| k.agent != slot);
                // A test lost with this agent may end later; its result names the agent.
                run.reruns
                    .departed
                    .insert(slot, (agent.hostname.clone(), agent.id.clone()));
                let message = format!(
                    "agent {} ({}) left: {reason}; its tests go back to the queue",
                    agent.hostname, agent.id
                );
                run.broadcast(run_event::Kind::Notice(AgentNotice {
                    run_id: run_id.clone(),
                    message,
                }));
                if let Some(scheduler) = run.scheduler.as_mut() {
                    let actions = scheduler.handle(Event::AgentLost(slot), now);
                    self.apply(&run_id, actions);
                } else if run.phase == RunPhase::Collecting {
                    self.ask_for_collection(&run_id);
                }
            }
        }
    }

    /// Gives every idle agent to the oldest unfinished run that has not refused it.
    fn assign_idle_agents(&mut self) {
        let mut idle: Vec<AgentSlot> = self
            .agents
            .iter()
            .filter(|(_, a)| a.run.is_none())
            .map(|(s, _)| *s)
            .collect();
        idle.sort_unstable();
        for slot in idle {
            let Some(run_id) = self
                .queue
                .iter()
                .find(|id| {
                    self.runs.get(*id).is_some_and(|r| {
                        !r.members.contains_key(&slot)
                            && self.agents.get(&slot).is_some_and(|a| {
                                crate::labels::satisfies(&a.labels, &r.required_labels)
                            })
                    })
                })
                .cloned()
            else {
                continue;
            };
            self.start_run_on(slot, &run_id);
        }
    }

    fn start_run_on(&mut self, slot: AgentSlot, run_id: &str) {
        let Some(run) = self.runs.get_mut(run_id) else {
            return;
        };
        let Some(agent) = self.agents.get_mut(&slot) else {
            return;
        };
        agent.run = Some(run_id.to_string());
        run.members.insert(slot, Membership::Joining);
        let want_collection = run.collection.is_none() && !run.list_requested;
        run.list_requested |= want_collection;
        if want_collection {
            run.lister = Some(slot);
        }
        let start = StartRun {
            run_id: run_id.to_string(),
            pytest_args: run.args.clone(),
            // One agent sends the full list; the others only its digest (a million test ids
            // from each of hundreds of agents would swamp the coordinator). Whoever finishes
            // first without a list is asked for it.
            want_collection,
            expected_digest: run.digest.clone(),
            no_fork: run.no_fork,
            timeout_seconds: run.timeout_seconds,
        };
        let message = format!(
            "agent {} joined the run with {} workers",
            agent.hostname, agent.workers
        );
        let status = run.status(&self.agents, message);
        run.broadcast(run_event::Kind::Status(status));
        self.send_to(slot, coordinator_message::Kind::StartRun(start));
    }

    /// With no collection yet and no agent asked for one (the asked one left), ask another.
    fn ask_for_collection(&mut self, run_id: &str) {
        let Some(run) = self.runs.get(run_id) else {
            return;
        };
        if run.collection.is_some() {
            return;
        }
        if run
            .lister
            .is_some_and(|l| run.members.get(&l) == Some(&Membership::Joining))
        {
            return;
        }
        // The lister left: ask one agent that already collected (else any joining one).
        let Some(run) = self.runs.get_mut(run_id) else {
            return;
        };
        let next = if run.held_digests.is_empty() {
            run.members
                .iter()
                .filter(|(_, m)| **m == Membership::Joining)
                .map(|(s, _)| *s)
                .min()
        } else {
            Some(run.held_digests.remove(0).0)
        };
        run.lister = next;
        if let Some(slot) = next {
            self.send_to(
                slot,
                coordinator_message::Kind::SendCollection(SendCollection {
                    run_id: run_id.to_string(),
                }),
            );
        }
    }

    fn agent_message(&mut self, slot: AgentSlot, message: AgentMessage, now: Instant) {
        let Some(kind) = message.kind else {
            warn!(slot, "empty message from agent ignored");
            return;
        };
        match kind {
            agent_message::Kind::Hello(_) => {
                warn!(slot, "second hello from an agent ignored");
            }
            agent_message::Kind::Collected(collected) => self.collected(slot, collected, now),
            agent_message::Kind::CollectionFailed(failed) => {
                self.collection_failed(slot, failed, now)
            }
            agent_message::Kind::Events(events) => self.worker_events(slot, events, now),
            agent_message::Kind::Unhealthy(unhealthy) => {
                let host = self
                    .agents
                    .get(&slot)
                    .map(|a| a.hostname.clone())
                    .unwrap_or_default();
                warn!(host = %host, reason = %unhealthy.reason, "agent unhealthy; it leaves the run");
                if let Some(run) = self.runs.get_mut(&unhealthy.run_id) {
                    run.broadcast(run_event::Kind::Notice(AgentNotice {
                        run_id: unhealthy.run_id.clone(),
                        message: format!(
                            "{host}: unhealthy, leaving the run: {}",
                            unhealthy.reason
                        ),
                    }));
                }
            }
            agent_message::Kind::Notice(notice) => {
                let host = self
                    .agents
                    .get(&slot)
                    .map(|a| a.hostname.clone())
                    .unwrap_or_default();
                warn!(host = %host, message = %notice.message, "agent notice");
                if let Some(run) = self.runs.get_mut(&notice.run_id) {
                    run.broadcast(run_event::Kind::Notice(AgentNotice {
                        run_id: notice.run_id.clone(),
                        message: format!("{host}: {}", notice.message),
                    }));
                }
            }
        }
    }

    /// Is `slot` serving `run_id` right now? Messages for any other run are stale.
    fn serves(&self, slot: AgentSlot, run_id: &str) -> bool {
        self.agents
            .get(&slot)
            .is_some_and(|a| a.run.as_deref() == Some(run_id))
    }

    fn collected(&mut self, slot: AgentSlot, chunk: Collected, now: Instant) {
        if !self.serves(slot, &chunk.run_id) {
            debug!(slot, run = %chunk.run_id, "collection for a run the agent does not serve");
            return;
        }
        let run_id = chunk.run_id.clone();
        let Some(run) = self.runs.get_mut(&run_id) else {
            return;
        };
        if run.members.get(&slot) == Some(&Membership::Accepted) {
            // Its collection was judged already and it may hold work: judging it again could
            // take it out of the run with its leases.
            warn!(slot, run = %run_id, "a second collection from an accepted agent ignored");
            return;
        }
        let partial = run.partial.entry(slot).or_default();
        if partial.tests.is_empty() && !chunk.tests.is_empty() {
            // The list is kept for the whole run: allocated once at its announced size rather
            // than grown by doubling, which copies it on the way and leaves up to half of it
            // unused. A list that does not match its announced
            // size is refused below anyway.
            let announced = (chunk.total as usize).min(MAX_RESERVED_TESTS);
            partial.tests = Collection::with_capacity(announced);
        }
        partial.has_list |= !chunk.tests.is_empty();
        for test in &chunk.tests {
            partial.tests.push(test);
        }
        partial.digest = chunk.digest;
        partial.total = chunk.total;
        partial.deselected = chunk.deselected;
        partial.workers = chunk.workers;
        if !chunk.done {
            return;
        }
        let Some(mut partial) = run.partial.remove(&slot) else {
            return;
        };
        partial.tests.shrink_to_fit();
        if run.collection.is_none() {
            if partial.total > 0 && !partial.has_list {
                let lister_on_its_way = run.lister.is_some_and(|l| {
                    l != slot && run.members.get(&l) == Some(&Membership::Joining)
                });
                if lister_on_its_way {
                    // The list is coming from another agent: judge this digest against it.
                    run.held_digests.push((slot, partial));
                } else {
                    run.lister = Some(slot);
                    self.send_to(
                        slot,
                        coordinator_message::Kind::SendCollection(SendCollection { run_id }),
                    );
                }
                return;
            }
            if partial.tests.len() != partial.total as usize {
                self.refuse(
                    slot,
                    &run_id,
                    format!(
                        "sent {} of the {} tests it announced",
                        partial.tests.len(),
                        partial.total
                    ),
                    now,
                );
                return;
            }
            self.accept_first_collection(slot, &run_id, partial, now);
            return;
        }
        self.compare_collection(slot, &run_id, partial, now);
    }

    /// Judges an agent's collection against the run's: the same digest joins the run, another
    /// one is refused with the differing ids named (asking for the list first if needed).
    fn compare_collection(
        &mut self,
        slot: AgentSlot,
        run_id: &str,
        partial: PartialCollection,
        now: Instant,
    ) {
        let run_id = run_id.to_string();
        let Some(run) = self.runs.get_mut(&run_id) else {
            return;
        };
        if partial.digest == run.digest {
            run.members.insert(slot, Membership::Accepted);
            if let (Some(scheduler), Some(agent)) = (run.scheduler.as_mut(), self.agents.get(&slot))
            {
                scheduler.add_agent(slot, agent.workers, agent.speed);
            }
            let workers = self.agents.get(&slot).map(|a| a.workers).unwrap_or(0);
            self.store.write(Write::RunAgent {
                run_id: run_id.clone(),
                agent_id: self.agent_id(slot),
                workers,
                accepted: true,
                reason: String::new(),
            });
            self.replay_wants(&run_id, now);
            return;
        }
        if !partial.has_list && partial.total > 0 {
            // Find out which tests differ before refusing, so the message can name them.
            run.members.insert(slot, Membership::Joining);
            self.send_to(
                slot,
                coordinator_message::Kind::SendCollection(SendCollection { run_id }),
            );
            return;
        }
        let theirs: HashSet<&str> = partial.tests.nodeids().collect();
        let reason = match run.collection.as_ref() {
            Some(ours) => describe_difference(ours, &theirs, partial.total),
            None => "a different collection".to_string(),
        };
        self.refuse(slot, &run_id, reason, now);
    }

    fn accept_first_collection(
        &mut self,
        slot: AgentSlot,
        run_id: &str,
        partial: PartialCollection,
        now: Instant,
    ) {
        let agent_id = self.agent_id(slot);
        let workers = self.agents.get(&slot).map(|a| a.workers).unwrap_or(0);
        let Some(run) = self.runs.get_mut(run_id) else {
            return;
        };
        let tests = Arc::new(partial.tests);
        run.digest = partial.digest;
        run.deselected = partial.deselected;
        run.counts.add("deselected", partial.deselected);
        run.collection = Some(tests.clone());
        run.phase = RunPhase::Running;
        run.members.insert(slot, Membership::Accepted);
        self.store.write(Write::RunCollected {
            run_id: run_id.to_string(),
            tests: tests.clone(),
            deselected: partial.deselected,
        });
        self.store.write(Write::RunStarted {
            run_id: run_id.to_string(),
            started_at: epoch_now(),
        });
        self.store.write(Write::RunAgent {
            run_id: run_id.to_string(),
            agent_id,
            workers,
            accepted: true,
            reason: String::new(),
        });
        let message = format!("collected {} tests", tests.len());
        let status = run.status(&self.agents, message);
        run.broadcast(run_event::Kind::Status(status));
        // Agents that joined meanwhile compare their digests when their chunks complete.
        if tests.is_empty() {
            self.finish(
                run_id,
                exit_code::NO_TESTS_COLLECTED,
                String::new(),
                String::new(),
            );
            return;
        }
        self.start_scheduler(run_id, now);
        let held = self
            .runs
            .get_mut(run_id)
            .map(|r| std::mem::take(&mut r.held_digests))
            .unwrap_or_default();
        for (other, partial) in held {
            if self.serves(other, run_id) {
                self.compare_collection(other, run_id, partial, now);
            }
        }
    }

    /// Answers work requests that arrived before the scheduler existed or before their agent's
    /// collection was accepted.
    fn replay_wants(&mut self, run_id: &str, now: Instant) {
        let Some(run) = self.runs.get_mut(run_id) else {
            return;
        };
        let Some(scheduler) = run.scheduler.as_mut() else {
            return;
        };
        let members = &run.members;
        let (ready, waiting): (Vec<WorkerKey>, Vec<WorkerKey>) =
            std::mem::take(&mut run.early_wants)
                .into_iter()
                .partition(|key| members.get(&key.agent) == Some(&Membership::Accepted));
        run.early_wants = waiting;
        let mut actions = Vec::new();
        for key in ready {
            actions.extend(scheduler.handle(Event::WantWork(key), now));
        }
        self.apply(run_id, actions);
    }

    /// Builds the run's units and scheduler once both its collection and its history are in,
    /// and answers the workers that asked for work meanwhile.
    fn start_scheduler(&mut self, run_id: &str, now: Instant) {
        let Some(run) = self.runs.get_mut(run_id) else {
            return;
        };
        if run.scheduler.is_some() || run.phase != RunPhase::Running {
            return;
        }
        let (Some(tests), Some(history)) = (run.collection.clone(), run.history.clone()) else {
            return;
        };
        let estimates = units::estimate(&tests, &history, 0.0);
        let known = estimates.known.iter().filter(|k| **k).count();
        let units = units::build(&tests, &estimates, &history, run.dist);
        info!(
            run = %run_id,
            tests = tests.len(),
            units = units.len(),
            with_history = known,
            "scheduling"
        );
        let mut scheduler = Scheduler::new(units, estimates);
        resume::skip_recorded(run, &self.agents, &tests, &mut scheduler);
        scheduler.set_reruns(run.reruns.limit);
        for (slot, membership) in &run.members {
            if let (Membership::Accepted, Some(agent)) = (membership, self.agents.get(slot)) {
                scheduler.add_agent(*slot, agent.workers, agent.speed);
            }
        }
        run.scheduler = Some(scheduler);
        // The first estimate of the time left, before any test ran.
        run.refresh_status(&self.agents);
        self.replay_wants(run_id, now);
        self.finish_if_all_recorded(run_id);
    }

    fn refuse(&mut self, slot: AgentSlot, run_id: &str, reason: String, now: Instant) {
        let (host, agent_id) = self
            .agents
            .get(&slot)
            .map(|a| (a.hostname.clone(), a.id.clone()))
            .unwrap_or_default();
        let message = format!(
            "agent {host} ({agent_id}) takes no work in this run: its checkout differs: {reason}"
        );
        warn!(run = %run_id, "{message}");
        let mut requeued = Vec::new();
        if let Some(run) = self.runs.get_mut(run_id) {
            run.members.insert(slot, Membership::Refused);
            run.early_wants.retain(|k| k.agent != slot);
            // An agent refused after it was accepted (its pytest failed mid-run) may hold
            // leases: they go back to the queue now, since its departure will no longer concern
            // this run. For an agent the scheduler never had, this changes nothing.
            if let Some(scheduler) = run.scheduler.as_mut() {
                requeued = scheduler.handle(Event::AgentLost(slot), now);
            }
            run.broadcast(run_event::Kind::Notice(AgentNotice {
                run_id: run_id.to_string(),
                message: message.clone(),
            }));
        }
        self.store.write(Write::RunAgent {
            run_id: run_id.to_string(),
            agent_id,
            workers: 0,
            accepted: false,
            reason: reason.clone(),
        });
        self.send_to(
            slot,
            coordinator_message::Kind::EndRun(EndRun {
                run_id: run_id.to_string(),
                cancelled: false,
                reason: message,
            }),
        );
        if let Some(agent) = self.agents.get_mut(&slot) {
            agent.run = None;
        }
        self.apply(run_id, requeued);
        self.assign_idle_agents();
    }

    fn collection_failed(&mut self, slot: AgentSlot, failed: CollectionFailed, now: Instant) {
        if !self.serves(slot, &failed.run_id) {
            return;
        }
        let run_id = failed.run_id.clone();
        let Some(run) = self.runs.get(&run_id) else {
            return;
        };
        if run.collection.is_none() {
            // The run's arguments or its suite are broken: pytest's own verdict is the run's.
            let code = if failed.exit_code == 0 {
                exit_code::INTERNAL_ERROR
            } else {
                failed.exit_code
            };
            self.finish(&run_id, code, failed.output, String::new());
        } else {
            let mut reason = format!(
                "pytest exited with code {} before running tests",
                failed.exit_code
            );
            let tail: String = tail_lines(&failed.output, 20);
            if !tail.is_empty() {
                reason.push_str(":\n");
                reason.push_str(&tail);
            }
            self.refuse(slot, &run_id, reason, now);
        }
    }

    fn agent_id(&self, slot: AgentSlot) -> String {
        self.agents
            .get(&slot)
            .map(|a| a.id.clone())
            .unwrap_or_default()
    }

    fn worker_events(&mut self, slot: AgentSlot, events: WorkerEvents, now: Instant) {
        let run_id = events.run_id;
        if !self.serves(slot, &run_id) {
            debug!(slot, run = %run_id, "worker events for a run the agent does not serve");
            return;
        }
        let agent_id = self.agent_id(slot);
        let Some(run) = self.runs.get_mut(&run_id) else {
            return;
        };
        match run.members.get(&slot) {
            Some(Membership::Accepted) => {}
            Some(Membership::Joining) => {
                // Its collection is still being judged: remember who asked.
                for event in events.events {
                    if let Some(worker_event::Kind::WantWork(_)) = event.kind {
                        run.early_wants.push(WorkerKey {
                            agent: slot,
                            worker: event.worker,
                        });
                    }
                }
                return;
            }
            _ => {
                debug!(slot, run = %run_id, "worker events from an agent not accepted in the run");
                return;
            }
        }
        let Some(collection) = run.collection.clone() else {
            return;
        };
        let Some(scheduler) = run.scheduler.as_mut() else {
            // History is still loading: remember who asked, answer once the scheduler exists.
            for event in events.events {
                if let Some(worker_event::Kind::WantWork(_)) = event.kind {
                    run.early_wants.push(WorkerKey {
                        agent: slot,
                        worker: event.worker,
                    });
                }
            }
            return;
        };
        let mut actions = Vec::new();
        for event in events.events {
            let key = WorkerKey {
                agent: slot,
                worker: event.worker,
            };
            let Some(kind) = event.kind else {
                continue;
            };
            match kind {
                worker_event::Kind::WantWork(_) => {
                    self.watch.want_work();
                    actions.extend(scheduler.handle(Event::WantWork(key), now));
                }
                worker_event::Kind::Started(started) => {
                    self.watch.test_started(
                        slot,
                        key.worker,
                        &run_id,
                        started.lease,
                        started.test_index,
                        started.at,
                    );
                    actions.extend(scheduler.handle(
                        Event::Started {
                            lease: started.lease,
                        },
                        now,
                    ));
                }
                worker_event::Kind::Report(report) => {
                    self.watch.report_received(report.stop);
                    let status = scheduler.lease_status(report.lease);
                    let (test, current) = match status {
                        LeaseStatus::Current { test, worker } if worker == key => (test, true),
                        LeaseStatus::Current { test, .. } | LeaseStatus::Superseded { test } => {
                            (test, false)
                        }
                        LeaseStatus::Unknown => {
                            warn!(
                                agent = %agent_id,
                                lease = report.lease,
                                "report for a lease never handed out rejected"
                            );
                            continue;
                        }
                    };
                    if test != report.test_index {
                        warn!(agent = %agent_id, lease = report.lease, "report names the wrong test; rejected");
                        continue;
                    }
                    let Some(phase) = Phase::from_proto(report.phase) else {
                        warn!(agent = %agent_id, "report without a phase rejected");
                        continue;
                    };
                    let nodeid = collection
                        .nodeid(test as usize)
                        .map(str::to_string)
                        .unwrap_or_default();
                    self.store.write(Write::Report {
                        run_id: run_id.clone(),
                        nodeid,
                        agent_id: agent_id.clone(),
                        worker: key.worker,
                        superseded: !current,
                        report: report.clone(),
                    });
                    if current {
                        let entry = run.phases.entry(report.lease).or_default();
                        entry.agent_id.clone_from(&agent_id);
                        entry.worker = key.worker;
                        // A duplicate report for a phase replaces nothing: the first one counts.
                        if entry.reports.iter().any(|r| r.phase == report.phase) {
                            warn!(agent = %agent_id, lease = report.lease, phase = phase.as_str(), "duplicate report ignored");
                        } else {
                            entry.reports.push(report);
                        }
                    }
                }
                worker_event::Kind::Finished(finished) => {
                    self.watch.test_ended(slot, key.worker, finished.lease);
                    let attempt = run.phases.get(&finished.lease);
                    let seconds = attempt
                        .map(|a| a.reports.iter().map(|r| r.duration).sum())
                        .unwrap_or(0.0);
                    let lease = finished.lease;
                    // A failed attempt may run again (`--reruns`); the scheduler decides.
                    let event = if reruns::attempt_failed(attempt) {
                        Event::Failed { lease, seconds }
                    } else {
                        Event::Finished { lease, seconds }
                    };
                    actions.extend(scheduler.handle(event, now));
                }
                worker_event::Kind::Revoked(revoked) => {
                    actions.extend(scheduler.handle(
                        Event::Revoked {
                            worker: key,
                            leases: revoked.leases,
                        },
                        now,
                    ));
                }
                worker_event::Kind::Exited(exited) => {
                    if !exited.reason.is_empty() && exited.reason != "shutdown" {
                        warn!(agent = %agent_id, worker = key.worker, reason = %exited.reason, "worker exited");
                    }
                    self.watch.worker_exited(slot, key.worker);
                    actions.extend(scheduler.handle(
                        Event::WorkerExited {
                            worker: key,
                            unstarted: exited.unstarted,
                        },
                        now,
                    ));
                }
            }
        }
        self.apply(&run_id, actions);
    }

    /// Carries out the scheduler's actions for one run.
    fn apply(&mut self, run_id: &str, actions: Vec<Action>) {
        let mut run_done = false;
        for action in actions {
            match action {
                Action::Assign { worker, leases } => {
                    let work = self.outbox.entry(worker.agent).or_insert_with(|| Work {
                        run_id: run_id.to_string(),
                        assignments: Vec::new(),
                    });
                    work.assignments.push(Assignment {
                        worker: worker.worker,
                        leases: leases
                            .iter()
                            .map(|l| WireLease {
                                lease: l.lease,
                                test_index: l.test,
                            })
                            .collect(),
                    });
                }
                Action::NoWork { worker } => {
                    let work = self.outbox.entry(worker.agent).or_insert_with(|| Work {
                        run_id: run_id.to_string(),
                        assignments: Vec::new(),
                    });
                    work.assignments.push(Assignment {
                        worker: worker.worker,
                        leases: Vec::new(),
                    });
                }
                Action::Revoke { worker, leases } => {
                    self.send_to(
                        worker.agent,
                        coordinator_message::Kind::Revoke(Revoke {
                            run_id: run_id.to_string(),
                            worker: worker.worker,
                            leases,
                        }),
                    );
                }
                Action::TestDone { test, lease } => self.test_done(run_id, test, lease),
                Action::Rerun { test, lease } => self.test_rerun(run_id, test, lease),
                Action::TestAbandoned {
                    test,
                    lease,
                    lost_on,
                } => self.test_abandoned(run_id, test, lease, &lost_on),
                Action::RunDone => run_done = true,
            }
        }
        if run_done {
            // A flaky test counts as passed, unless `--flaky-fails`.
            let failed = self
                .runs
                .get(run_id)
                .is_some_and(|r| r.counts.any_failed() || r.reruns.fail_the_run());
            let code = if failed {
                exit_code::TESTS_FAILED
            } else {
                exit_code::OK
            };
            self.finish(run_id, code, String::new(), String::new());
        }
    }

    fn test_done(&mut self, run_id: &str, test: u32, lease: u64) {
        let Some(run) = self.runs.get_mut(run_id) else {
            return;
        };
        let attempt = run.phases.remove(&lease).unwrap_or_default();
        let phases = &attempt.reports;
        let Some(nodeid) = run
            .collection
            .as_ref()
            .and_then(|c| c.nodeid(test as usize))
            .map(str::to_string)
        else {
            return;
        };
        let mut outcome_input = Vec::new();
        let mut duration = 0.0;
        for report in phases {
            if let Some(phase) = Phase::from_proto(report.phase) {
                outcome_input.push((phase, report.category.as_str()));
            }
            run.counts.add(&report.category, 1);
            duration += report.duration;
        }
        let outcome = if phases.is_empty() {
            // Finished without a single report (a worker that lost its reports): an error,
            // never a silent pass.
            run.counts.add("error", 1);
            "error".to_string()
        } else {
            final_outcome(outcome_input)
        };
        self.watch.test_finished(&outcome);
        let attempts = run
            .scheduler
            .as_ref()
            .map(|s| s.attempts(test))
            .unwrap_or(1);
        let flaky = reruns::is_flaky(run.scheduler.as_ref(), test, &outcome);
        let interesting = matches!(outcome.as_str(), "failed" | "error")
            || phases
                .iter()
                .any(|r| r.category == "error" || r.category == "failed");
        let result = TestResult {
            test_index: test,
            nodeid: nodeid.clone(),
            outcome: outcome.clone(),
            duration,
            agent_id: attempt.agent_id.clone(),
            worker: attempt.worker,
            phases: phases
                .iter()
                .map(|r| PhaseResult {
                    phase: r.phase,
                    outcome: r.outcome.clone(),
                    category: r.category.clone(),
                    duration: r.duration,
                    longrepr: if interesting || r.category == "skipped" {
                        r.longrepr.clone()
                    } else {
                        String::new()
                    },
                    sections: if interesting {
                        r.sections.clone()
                    } else {
                        Vec::new()
                    },
                    message: r.message.clone(),
                    start: r.start,
                    stop: r.stop,
                })
                .collect(),
            attempts,
            flaky,
        };
        self.store.write(Write::TestResult {
            run_id: run_id.to_string(),
            test_index: test,
            nodeid,
            outcome,
            duration,
            attempts,
            lease,
            agent_id: attempt.agent_id.clone(),
            worker: attempt.worker,
        });
        run.broadcast_stored_result(result);
        self.record_result_details(run_id, test, flaky);
    }

    // --- runs --------------------------------------------------------------------------------

    /// Reads the project's duration history off the loop; the run's scheduler waits for it.
    fn load_history(&self, run_id: &str, project: &str) {
        let store = self.store.clone();
        let inputs = self.inputs.clone();
        let run_id = run_id.to_string();
        let project = project.to_string();
        tokio::spawn(async move {
            let history = match store.load_history(&project).await {
                Ok(history) => history,
                Err(err) => {
                    warn!(%project, %err, "cannot read duration history; scheduling without it");
                    History::default()
                }
            };
            inputs.send(Input::HistoryLoaded {
                run_id,
                history: Arc::new(history),
            });
        });
    }

    /// Creates a run and returns its id.
    fn submit(
        &mut self,
        request: SubmitRequest,
        tx: FollowerTx,
        reply: oneshot::Sender<Result<String, Status>>,
        now: Instant,
    ) -> String {
        let run_id = uuid::Uuid::new_v4().to_string();
        info!(run = %run_id, project = %request.project, args = ?request.pytest_args, "run submitted");
        self.store.write(Write::RunCreated {
            run_id: run_id.clone(),
            project: request.project.clone(),
            pytest_args: request.pytest_args.clone(),
            client_cwd: request.client_cwd.clone(),
            created_at: epoch_now(),
        });
        let dist = request.dist.parse::<Dist>().unwrap_or(Dist::Auto);
        self.load_history(&run_id, &request.project);
        let mut run = RunState {
            id: run_id.clone(),
            project: request.project,
            args: request.pytest_args,
            required_labels: request.required_labels,
            dist,
            no_fork: request.no_fork,
            // `run --timeout`: 0 (or nonsense) means no limit.
            timeout_seconds: Some(request.timeout_seconds)
                .filter(|t| t.is_finite() && *t > 0.0)
                .unwrap_or(0.0),
            history: None,
            early_wants: Vec::new(),
            list_requested: false,
            lister: None,
            held_digests: Vec::new(),
            started: now,
            phase: RunPhase::Collecting,
            collection: None,
            digest: String::new(),
            deselected: 0,
            partial: HashMap::new(),
            members: HashMap::new(),
            scheduler: None,
            phases: HashMap::new(),
            counts: Counts::default(),
            followers: followers::Followers::new(tx),
            last_message: String::new(),
            reruns: reruns::Reruns {
                limit: request.reruns,
                flaky_fails: request.flaky_fails,
                ..Default::default()
            },
            resume: None,
        };
        let waiting = if self.agents.values().any(|a| a.run.is_none()) {
            "starting".to_string()
        } else if self.agents.is_empty() {
            "waiting for an agent to connect".to_string()
        } else {
            "waiting for a free agent".to_string()
        };
        let status = run.status(&self.agents, waiting);
        run.broadcast(run_event::Kind::Status(status));
        self.runs.insert(run_id.clone(), run);
        self.queue.push(run_id.clone());
        let _ = reply.send(Ok(run_id.clone()));
        self.assign_idle_agents();
        run_id
    }

    fn follow(&mut self, run_id: &str, tx: FollowerTx) {
        match self.runs.get_mut(run_id) {
            Some(run) => {
                let status = run.status(&self.agents, "following".into());
                tx.send(Ok(RunEvent {
                    kind: Some(run_event::Kind::Status(status)),
                }));
                if run.phase == RunPhase::Finished {
                    // Finished runs keep no followers; the store has their results.
                    tx.send(Err(Status::failed_precondition(format!(
                        "run {run_id} has finished"
                    ))));
                } else {
                    run.followers.push(tx);
                }
            }
            None => {
                tx.send(Err(Status::not_found(format!(
                    "no run {run_id} in progress or recently finished here; \
                     `fly-coordinator runs --db <the coordinator's database>` lists recorded runs"
                ))));
            }
        }
    }

    fn cancel(&mut self, run_id: &str, reason: &str) {
        if self
            .runs
            .get(run_id)
            .is_some_and(|r| r.phase != RunPhase::Finished)
        {
            info!(run = %run_id, %reason, "run cancelled");
            let message = self
                .runs
                .get(run_id)
                .map(|run| resume::interrupted_message(run, reason))
                .unwrap_or_default();
            self.finish(run_id, exit_code::INTERRUPTED, String::new(), message);
        }
    }

    /// Ends a run: releases its agents, records the verdict, and tells followers once every
    /// write of the run is on disk.
    fn finish(&mut self, run_id: &str, code: i32, output: String, message: String) {
        let Some(run) = self.runs.get_mut(run_id) else {
            return;
        };
        if run.phase == RunPhase::Finished {
            return;
        }
        let cancelled = code == exit_code::INTERRUPTED;
        run.phase = RunPhase::Finished;
        self.watch.run_ended(run_id);
        let wall = run.started.elapsed().as_secs_f64();
        let slots: Vec<AgentSlot> = run.members.keys().copied().collect();
        for slot in slots {
            if self
                .agents
                .get(&slot)
                .is_some_and(|a| a.run.as_deref() == Some(run_id))
            {
                self.send_to(
                    slot,
                    coordinator_message::Kind::EndRun(EndRun {
                        run_id: run_id.to_string(),
                        cancelled,
                        reason: String::new(),
                    }),
                );
                if let Some(agent) = self.agents.get_mut(&slot) {
                    agent.run = None;
                }
            }
        }
        let Some(run) = self.runs.get_mut(run_id) else {
            return;
        };
        // What this run taught about durations, in reference seconds: each agent's speed as
        // the scheduler refined it from observed durations. Recorded after the client has its
        // verdict: for a large run this takes seconds nobody should wait for.
        let record_history = run
            .scheduler
            .as_ref()
            .map(|scheduler| Write::RecordHistory {
                project: run.project.clone(),
                run_id: run_id.to_string(),
                speeds: run
                    .members
                    .keys()
                    .filter_map(|slot| {
                        self.agents
                            .get(slot)
                            .map(|a| (a.id.clone(), scheduler.agent_speed(*slot)))
                    })
                    .collect(),
            });
        let counts: Vec<(String, u32)> = run.counts.ordered();
        let collected = run.collection.as_ref().map(|c| c.len() as u32).unwrap_or(0);
        let status = match code {
            exit_code::OK => "passed",
            exit_code::TESTS_FAILED => "failed",
            exit_code::INTERRUPTED => "interrupted",
            exit_code::USAGE_ERROR => "usage_error",
            exit_code::NO_TESTS_COLLECTED => "no_tests",
            _ => "error",
        };
        self.store.write(Write::RunFinished {
            run_id: run_id.to_string(),
            status: status.to_string(),
            exit_code: code,
            finished_at: epoch_now(),
            counts: counts.clone(),
            message: if message.is_empty() {
                output.clone()
            } else {
                message.clone()
            },
        });
        let finished = RunEvent {
            kind: Some(run_event::Kind::Finished(RunFinished {
                exit_code: code,
                counts: counts
                    .into_iter()
                    .map(|(category, count)| CategoryCount { category, count })
                    .collect(),
                wall_seconds: wall,
                output,
                message,
                collected,
            })),
        };
        let followers = std::mem::take(&mut run.followers);
        // Drop what only a live run needs (the history and a resumed run's results take as
        // much room as the suite has tests); keep the record for `follow` to answer.
        run.scheduler = None;
        run.phases = HashMap::new();
        run.partial = HashMap::new();
        run.collection = None;
        run.history = None;
        run.resume = None;
        run.early_wants = Vec::new();
        run.held_digests = Vec::new();
        self.queue.retain(|id| id != run_id);
        self.finished.push_back(run_id.to_string());
        while self.finished.len() > MAX_FINISHED_RUNS {
            if let Some(oldest) = self.finished.pop_front() {
                self.runs.remove(&oldest);
            }
        }
        let told = followers.finish(&self.store, run_id, finished);
        let store = self.store.clone();
        tokio::spawn(async move {
            told.await;
            if let Some(record) = record_history {
                store.write(record);
            }
        });
        self.assign_idle_agents();
    }
}

/// Names a few of the tests that differ between the run's collection and an agent's.
fn describe_difference(ours: &Collection, theirs: &HashSet<&str>, their_total: u32) -> String {
    let our_ids: HashSet<&str> = ours.nodeids().collect();
    let missing: Vec<&str> = ours
        .nodeids()
        .filter(|id| !theirs.contains(id))
        .take(5)
        .collect();
    let mut extra: Vec<&str> = theirs
        .iter()
        .copied()
        .filter(|id| !our_ids.contains(id))
        .collect();
    extra.sort_unstable();
    extra.truncate(5);
    let mut parts = vec![format!(
        "it collected {their_total} tests, the run has {}",
        ours.len()
    )];
    if !extra.is_empty() {
        parts.push(format!("only on the agent: {}", extra.join(", ")));
    }
    if !missing.is_empty() {
        parts.push(format!("missing on the agent: {}", missing.join(", ")));
    }
    if extra.is_empty() && missing.is_empty() {
        parts.push("the same tests in a different order".into());
    }
    parts.join("; ")
}

fn tail_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    let start = lines.len().saturating_sub(n);
    lines[start..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn finished_runs_past_the_bound_are_forgotten_and_none_keeps_its_history() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let store = Store::open(&dir.path().join("fly.db")).expect("a store");
        let (tx, _inputs) = mpsc::unbounded_channel();
        let (agents, _agent_inputs) = mpsc::channel(1);
        let mut dispatcher = Dispatcher::new(store, DispatcherHandle { tx, agents });
        let now = Instant::now();
        let mut ids = Vec::new();
        for _ in 0..MAX_FINISHED_RUNS + 3 {
            let (follower, _events) = follower_channel();
            let (reply, _reply) = oneshot::channel();
            let request = SubmitRequest {
                protocol_version: PROTOCOL_VERSION,
                project: "p".into(),
                pytest_args: vec![".".into()],
                ..SubmitRequest::default()
            };
            let run_id = dispatcher.submit(request, follower, reply, now);
            dispatcher.handle(
                Input::Cancel {
                    run_id: run_id.clone(),
                    reason: "a test".into(),
                },
                now,
            );
            // The history read for the run may come back after it finished.
            dispatcher.handle(
                Input::HistoryLoaded {
                    run_id: run_id.clone(),
                    history: Arc::new(History::default()),
                },
                now,
            );
            ids.push(run_id);
        }
        assert_eq!(dispatcher.runs.len(), MAX_FINISHED_RUNS);
        assert!(
            !dispatcher.runs.contains_key(&ids[0]),
            "the oldest is forgotten"
        );
        assert!(dispatcher.runs.values().all(|run| run.history.is_none()));

        let follow = |dispatcher: &mut Dispatcher, run_id: &str| {
            let (tx, mut rx) = follower_channel();
            dispatcher.handle(
                Input::Follow {
                    run_id: run_id.to_string(),
                    tx,
                },
                now,
            );
            let mut events = Vec::new();
            while let Some(event) = rx.try_recv() {
                events.push(event);
            }
            events
        };
        let forgotten = follow(&mut dispatcher, &ids[0]);
        let Some(Err(status)) = forgotten.last() else {
            panic!("{forgotten:?}");
        };
        assert_eq!(status.code(), tonic::Code::NotFound);
        assert!(status.message().contains("runs --db"), "{status:?}");
        let kept = follow(&mut dispatcher, &ids[ids.len() - 1]);
        assert!(
            matches!(kept.last(), Some(Err(s)) if s.code() == tonic::Code::FailedPrecondition),
            "a finished run still answers that it finished: {kept:?}"
        );
    }
}
