//! The scheduler as a state machine, under random farms: property tests over random sequences
//! of agent joins and losses (a partition is a loss, and the agent may come back as a new one),
//! worker crashes, delayed, duplicate and late messages, take-backs answered in part, and
//! failing tests with reruns.
//!
//! A small interpreter plays the farm. Each worker follows the real worker's rules (it starts a
//! test only when it knows the next one or was told there is nothing more, asks once when it
//! holds fewer than two unstarted tests, gives back what it has not started when asked). Each
//! agent keeps its messages in order both ways, as its gRPC stream does; the random sequence
//! decides which agent's next message arrives when. The properties:
//!
//! - every test ends with exactly one final result (`TestDone` or `TestAbandoned`);
//! - a final result or a rerun only ever comes from the attempt that just finished, never from
//!   a lease that was given back or lost with its worker;
//! - a test with its result is never handed out again, and every lease is new;
//! - `RunDone` comes exactly once, after every test has its result, and no work, result or
//!   rerun follows it;
//! - the run ends whenever a worker stays alive (one joins at the end if all were lost);
//! - a test runs at most `reruns + MAX_LOST_ATTEMPTS + 1` times, and is rerun at most `reruns`
//!   times.

use std::collections::{HashMap, HashSet, VecDeque};
use std::time::{Duration, Instant};

use fly_coordinator::scheduler::{
    Action, Event, Lease, LeaseStatus, Scheduler, WorkerKey, MAX_LOST_ATTEMPTS,
};
use fly_coordinator::units::{Estimates, Unit};
use proptest::prelude::*;

/// One step of the random sequence. Indexes pick among the agents or workers that exist at
/// that point (modulo their number).
#[derive(Debug, Clone)]
enum Op {
    /// The next message of an agent reaches the coordinator.
    ToCoordinator(u8),
    /// The next message for an agent reaches it.
    ToAgent(u8),
    /// A worker does its next thing: finish its test, start one, ask for work.
    Step(u8),
    /// A new agent joins with this many workers.
    Join(u8),
    /// An agent is lost (crash, partition): only its first `keep` unsent messages still
    /// arrive before its loss is noticed.
    LoseAgent { agent: u8, keep: u8 },
    /// A worker process dies; its agent reports the test it was running as finished
    /// (crashed) or not at all.
    ExitWorker { worker: u8, report_running: bool },
    /// A late or duplicate report: the end of an attempt already finished or given up on.
    Late { pick: u16, failed: bool },
    /// A worker's request for work arrives twice.
    DuplicateWant(u8),
    /// From now on, workers answer a take-back with only part of what they could give.
    PartialRevokes(bool),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => any::<u8>().prop_map(Op::ToCoordinator),
        6 => any::<u8>().prop_map(Op::ToAgent),
        10 => any::<u8>().prop_map(Op::Step),
        1 => (1u8..=3).prop_map(Op::Join),
        1 => (any::<u8>(), 0u8..4).prop_map(|(agent, keep)| Op::LoseAgent { agent, keep }),
        1 => (any::<u8>(), any::<bool>())
            .prop_map(|(worker, report_running)| Op::ExitWorker { worker, report_running }),
        1 => (any::<u16>(), any::<bool>()).prop_map(|(pick, failed)| Op::Late { pick, failed }),
        1 => any::<u8>().prop_map(Op::DuplicateWant),
        1 => any::<bool>().prop_map(Op::PartialRevokes),
    ]
}

#[derive(Debug, Clone)]
struct Scenario {
    /// Per test: how many of its first attempts fail (4: every attempt fails).
    fail_first: Vec<u8>,
    /// Per test: its expected cost, when history knows it.
    history: Vec<Option<f64>>,
    reruns: u32,
    /// Workers of the agents there from the start.
    agents: Vec<u8>,
    ops: Vec<Op>,
}

fn scenario() -> impl Strategy<Value = Scenario> {
    (1usize..=24)
        .prop_flat_map(|tests| {
            (
                prop::collection::vec(0u8..=4, tests),
                prop::collection::vec(prop::option::of(0.001f64..2.0), tests),
                0u32..=3,
                prop::collection::vec(1u8..=3, 1..=3),
                prop::collection::vec(op(), 0..400),
            )
        })
        .prop_map(|(fail_first, history, reruns, agents, ops)| Scenario {
            fail_first,
            history,
            reruns,
            agents,
            ops,
        })
}

/// What the coordinator told an agent, on its way there.
#[derive(Debug, Clone)]
enum ToAgent {
    Assign(u32, Vec<Lease>),
    NoWork(u32),
    Revoke(u32, Vec<u64>),
}

#[derive(Debug)]
struct Worker {
    key: WorkerKey,
    /// Handed to it, not started, in order.
    held: VecDeque<Lease>,
    running: Option<Lease>,
    /// Told "nothing for now" and not given anything since.
    parked: bool,
    /// Asked for work and not answered yet.
    asked: bool,
    alive: bool,
}

#[derive(Debug)]
struct Agent {
    alive: bool,
    workers: Vec<usize>,
    /// Messages to the coordinator, in order; an agent's loss is the last one.
    out: VecDeque<Event>,
    inbox: VecDeque<ToAgent>,
}

struct Farm {
    scheduler: Scheduler,
    t0: Instant,
    ticks: u64,
    fail_first: Vec<u8>,
    reruns: u32,
    workers: Vec<Worker>,
    agents: Vec<Agent>,
    partial_revokes: bool,
    // What the properties are checked against.
    test_of: HashMap<u64, u32>,
    assigned_to: HashMap<u64, WorkerKey>,
    /// Leases whose end reached the scheduler.
    ended: HashSet<u64>,
    /// Leases given back or lost with their worker: none of them may yield a result.
    dead: HashSet<u64>,
    finals: Vec<u32>,
    reruns_seen: Vec<u32>,
    /// Attempts of each test that ran to their end (drives which attempts fail).
    runs: Vec<u32>,
    run_done: u32,
}

impl Farm {
    fn new(scenario: &Scenario) -> Farm {
        let count = scenario.fail_first.len();
        let units = (0..count)
            .map(|t| Unit {
                tests: vec![t as u32],
                cost: scenario.history[t].unwrap_or(0.0),
            })
            .collect();
        let estimates = Estimates {
            per_test: scenario.history.iter().map(|h| h.unwrap_or(0.0)).collect(),
            known: scenario.history.iter().map(Option::is_some).collect(),
        };
        let mut scheduler = Scheduler::new(units, estimates);
        scheduler.set_reruns(scenario.reruns);
        let mut farm = Farm {
            scheduler,
            t0: Instant::now(),
            ticks: 0,
            fail_first: scenario.fail_first.clone(),
            reruns: scenario.reruns,
            workers: Vec::new(),
            agents: Vec::new(),
            partial_revokes: false,
            test_of: HashMap::new(),
            assigned_to: HashMap::new(),
            ended: HashSet::new(),
            dead: HashSet::new(),
            finals: vec![0; count],
            reruns_seen: vec![0; count],
            runs: vec![0; count],
            run_done: 0,
        };
        for workers in &scenario.agents {
            farm.join(*workers);
        }
        farm
    }

    fn join(&mut self, workers: u8) {
        let slot = self.agents.len() as u32;
        let mut indexes = Vec::new();
        for w in 0..u32::from(workers) {
            indexes.push(self.workers.len());
            self.workers.push(Worker {
                key: WorkerKey {
                    agent: slot,
                    worker: w,
                },
                held: VecDeque::new(),
                running: None,
                parked: false,
                asked: false,
                alive: true,
            });
        }
        // Speeds differ between machines; the properties hold whatever they are.
        let speed = 0.5 + f64::from(slot % 4) * 0.5;
        self.scheduler.add_agent(slot, u32::from(workers), speed);
        self.agents.push(Agent {
            alive: true,
            workers: indexes,
            out: VecDeque::new(),
            inbox: VecDeque::new(),
        });
    }

    fn live_workers(&self) -> usize {
        self.workers
            .iter()
            .filter(|w| w.alive && self.agents[w.key.agent as usize].alive)
            .count()
    }

    /// Hands one event to the scheduler and checks what it answers.
    fn feed(&mut self, event: Event) {
        self.ticks += 1;
        let now = self.t0 + Duration::from_millis(self.ticks);
        let ending = match &event {
            Event::Finished { lease, .. } => Some((*lease, false)),
            Event::Failed { lease, .. } => Some((*lease, true)),
            _ => None,
        };
        let was_current = ending.is_some_and(|(lease, _)| {
            matches!(
                self.scheduler.lease_status(lease),
                LeaseStatus::Current { .. }
            )
        });
        // What the event takes away from the scheduler's workers.
        match &event {
            Event::WorkerExited { worker, .. } => self.bury(|key| key == *worker),
            Event::AgentLost(agent) => self.bury(|key| key.agent == *agent),
            Event::Revoked { leases, .. } => self.dead.extend(leases.iter().copied()),
            _ => {}
        }
        let actions = self.scheduler.handle(event, now);
        if let Some((lease, _)) = ending {
            self.ended.insert(lease);
        }
        for action in actions {
            // Once the run is done the dispatcher drops the scheduler; a "nothing for now" to
            // a late request is all that may still come.
            assert!(
                self.run_done == 0 || matches!(action, Action::NoWork { .. }),
                "{action:?} after RunDone"
            );
            match action {
                Action::Assign { worker, leases } => {
                    assert!(!leases.is_empty(), "an empty assignment for {worker:?}");
                    for lease in &leases {
                        assert!(
                            self.test_of.insert(lease.lease, lease.test).is_none(),
                            "lease {} handed out twice",
                            lease.lease
                        );
                        assert_eq!(
                            self.finals[lease.test as usize], 0,
                            "test {} handed out again after its result",
                            lease.test
                        );
                        self.assigned_to.insert(lease.lease, worker);
                    }
                    self.route(worker, ToAgent::Assign(worker.worker, leases));
                }
                Action::NoWork { worker } => self.route(worker, ToAgent::NoWork(worker.worker)),
                Action::Revoke { worker, leases } => {
                    self.route(worker, ToAgent::Revoke(worker.worker, leases))
                }
                Action::TestDone { test, lease } => {
                    self.check_end(test, lease, ending, was_current);
                    self.finals[test as usize] += 1;
                }
                Action::Rerun { test, lease } => {
                    self.check_end(test, lease, ending, was_current);
                    assert_eq!(
                        ending,
                        Some((lease, true)),
                        "a rerun only follows a failed attempt"
                    );
                    self.reruns_seen[test as usize] += 1;
                    assert!(
                        self.reruns_seen[test as usize] <= self.reruns,
                        "test {test} rerun more than {} times",
                        self.reruns
                    );
                    assert_eq!(
                        self.scheduler.failed_attempts(test),
                        self.reruns_seen[test as usize]
                    );
                }
                Action::TestAbandoned {
                    test,
                    lease,
                    lost_on,
                } => {
                    assert_eq!(self.finals[test as usize], 0, "test {test} ended twice");
                    assert_eq!(self.test_of.get(&lease), Some(&test));
                    assert_eq!(lost_on.len() as u32, MAX_LOST_ATTEMPTS + 1, "{lost_on:?}");
                    assert_eq!(self.scheduler.lost_on(test), lost_on.as_slice());
                    self.finals[test as usize] += 1;
                }
                Action::RunDone => {
                    self.run_done += 1;
                    assert!(
                        self.finals.iter().all(|n| *n == 1),
                        "RunDone before every test has its result: {:?}",
                        self.finals
                    );
                }
            }
        }
        let bound = self.reruns + MAX_LOST_ATTEMPTS + 1;
        for test in 0..self.finals.len() as u32 {
            let attempts = self.scheduler.attempts(test);
            assert!(
                attempts <= bound,
                "test {test} took {attempts} attempts, more than {bound}"
            );
        }
    }

    /// A final result or a rerun: from the attempt that just ended, which was current and
    /// neither given back nor lost.
    fn check_end(&self, test: u32, lease: u64, ending: Option<(u64, bool)>, was_current: bool) {
        assert_eq!(self.finals[test as usize], 0, "test {test} ended twice");
        assert_eq!(
            ending.map(|(l, _)| l),
            Some(lease),
            "test {test} ended by another event"
        );
        assert!(
            was_current,
            "lease {lease} was superseded, yet it ended test {test}"
        );
        assert!(
            !self.dead.contains(&lease),
            "lease {lease} was given back or lost, yet it ended test {test}"
        );
        assert_eq!(self.test_of.get(&lease), Some(&test));
    }

    /// Every lease handed to these workers whose end never reached the scheduler is gone.
    fn bury(&mut self, lost: impl Fn(WorkerKey) -> bool) {
        let gone: Vec<u64> = self
            .assigned_to
            .iter()
            .filter(|(lease, key)| lost(**key) && !self.ended.contains(*lease))
            .map(|(lease, _)| *lease)
            .collect();
        self.dead.extend(gone);
    }

    fn route(&mut self, worker: WorkerKey, message: ToAgent) {
        let agent = &mut self.agents[worker.agent as usize];
        // A lost agent's stream is gone: what is sent to it is lost too.
        if agent.alive {
            agent.inbox.push_back(message);
        }
    }

    fn worker_index(&self, key: WorkerKey) -> Option<usize> {
        self.agents
            .get(key.agent as usize)?
            .workers
            .get(key.worker as usize)
            .copied()
    }

    /// The agent hands the coordinator's next message to its worker.
    fn deliver(&mut self, agent: usize) {
        let Some(message) = self.agents[agent].inbox.pop_front() else {
            return;
        };
        let partial = self.partial_revokes;
        let (worker, message) = match message {
            ToAgent::Assign(w, leases) => (w, ToAgent::Assign(w, leases)),
            ToAgent::NoWork(w) => (w, ToAgent::NoWork(w)),
            ToAgent::Revoke(w, leases) => (w, ToAgent::Revoke(w, leases)),
        };
        let key = WorkerKey {
            agent: agent as u32,
            worker,
        };
        let Some(index) = self.worker_index(key) else {
            return;
        };
        let state = &mut self.workers[index];
        // Work for a dead worker goes nowhere: its exit already told the coordinator.
        if !state.alive {
            return;
        }
        match message {
            ToAgent::Assign(_, leases) => {
                state.held.extend(leases);
                state.parked = false;
                state.asked = false;
            }
            ToAgent::NoWork(_) => {
                state.parked = true;
                state.asked = false;
            }
            ToAgent::Revoke(_, wanted) => {
                let mut removed: Vec<u64> = state
                    .held
                    .iter()
                    .map(|l| l.lease)
                    .filter(|l| wanted.contains(l))
                    .collect();
                if partial {
                    removed.truncate(removed.len() / 2);
                }
                state.held.retain(|l| !removed.contains(&l.lease));
                self.agents[agent].out.push_back(Event::Revoked {
                    worker: key,
                    leases: removed,
                });
            }
        }
    }

    /// The worker's next move, as the real worker makes it. Returns whether it did anything.
    fn step(&mut self, index: usize) -> bool {
        let key = self.workers[index].key;
        let agent = key.agent as usize;
        if !self.workers[index].alive || !self.agents[agent].alive {
            return false;
        }
        let mut events = Vec::new();
        let state = &mut self.workers[index];
        if let Some(lease) = state.running.take() {
            let test = lease.test as usize;
            let attempt = self.runs[test];
            self.runs[test] += 1;
            let failed = self.fail_first[test] >= 4 || attempt < u32::from(self.fail_first[test]);
            let seconds = 0.001 * f64::from(1 + (lease.lease % 7) as u32);
            events.push(if failed {
                Event::Failed {
                    lease: lease.lease,
                    seconds,
                }
            } else {
                Event::Finished {
                    lease: lease.lease,
                    seconds,
                }
            });
        } else if state.held.len() >= 2 || (state.held.len() == 1 && state.parked) {
            if let Some(lease) = state.held.pop_front() {
                events.push(Event::Started { lease: lease.lease });
                state.running = Some(lease);
            }
        }
        if state.held.len() < 2 && !state.parked && !state.asked {
            state.asked = true;
            events.push(Event::WantWork(key));
        }
        let moved = !events.is_empty();
        self.agents[agent].out.extend(events);
        moved
    }

    fn apply(&mut self, op: &Op) {
        match *op {
            Op::ToCoordinator(n) => {
                if let Some(agent) = pick(self.agents.len(), n) {
                    if let Some(event) = self.agents[agent].out.pop_front() {
                        self.feed(event);
                    }
                }
            }
            Op::ToAgent(n) => {
                if let Some(agent) = pick(self.agents.len(), n) {
                    self.deliver(agent);
                }
            }
            Op::Step(n) => {
                if let Some(worker) = pick(self.workers.len(), n) {
                    self.step(worker);
                }
            }
            Op::Join(workers) => self.join(workers),
            Op::LoseAgent { agent, keep } => {
                let Some(agent) = pick(self.agents.len(), agent) else {
                    return;
                };
                let state = &mut self.agents[agent];
                if !state.alive {
                    return;
                }
                state.alive = false;
                state.out.truncate(usize::from(keep));
                state.inbox.clear();
                state.out.push_back(Event::AgentLost(agent as u32));
            }
            Op::ExitWorker {
                worker,
                report_running,
            } => {
                let Some(index) = pick(self.workers.len(), worker) else {
                    return;
                };
                let key = self.workers[index].key;
                let agent = key.agent as usize;
                if !self.workers[index].alive || !self.agents[agent].alive {
                    return;
                }
                let state = &mut self.workers[index];
                state.alive = false;
                let mut events = Vec::new();
                if let Some(lease) = state.running.take() {
                    if report_running {
                        // The agent reports a crashed test as failed.
                        self.runs[lease.test as usize] += 1;
                        events.push(Event::Failed {
                            lease: lease.lease,
                            seconds: 0.0,
                        });
                    }
                }
                let unstarted = state.held.drain(..).map(|l| l.lease).collect();
                events.push(Event::WorkerExited {
                    worker: key,
                    unstarted,
                });
                self.agents[agent].out.extend(events);
            }
            Op::Late { pick: n, failed } => {
                let mut gone: Vec<u64> = self.ended.union(&self.dead).copied().collect();
                gone.sort_unstable();
                if let Some(i) = pick(gone.len(), n as usize) {
                    let lease = gone[i];
                    let event = if failed {
                        Event::Failed {
                            lease,
                            seconds: 0.01,
                        }
                    } else {
                        Event::Finished {
                            lease,
                            seconds: 0.01,
                        }
                    };
                    let before = self.finals.clone();
                    self.feed(event);
                    assert_eq!(
                        before, self.finals,
                        "a late report of lease {lease} ended a test"
                    );
                }
            }
            Op::DuplicateWant(n) => {
                if let Some(index) = pick(self.workers.len(), n) {
                    let key = self.workers[index].key;
                    let agent = key.agent as usize;
                    if self.workers[index].alive && self.agents[agent].alive {
                        self.agents[agent].out.push_back(Event::WantWork(key));
                    }
                }
            }
            Op::PartialRevokes(on) => self.partial_revokes = on,
        }
    }

    /// Lets the farm run without further trouble until the run is done: every message
    /// arrives, every worker moves, nothing fails but the tests themselves.
    fn run_to_the_end(&mut self) {
        self.partial_revokes = false;
        if self.live_workers() == 0 {
            self.join(2);
        }
        for _ in 0..100_000 {
            if self.run_done > 0 {
                return;
            }
            let mut moved = false;
            for agent in 0..self.agents.len() {
                while let Some(event) = self.agents[agent].out.pop_front() {
                    self.feed(event);
                    moved = true;
                }
            }
            for agent in 0..self.agents.len() {
                while !self.agents[agent].inbox.is_empty() {
                    self.deliver(agent);
                    moved = true;
                }
            }
            for worker in 0..self.workers.len() {
                moved |= self.step(worker);
            }
            if !moved && self.run_done == 0 {
                panic!(
                    "the run is stuck: no message on its way and no worker can move\n\
                     results: {:?}\nworkers: {:#?}\nscheduler: {:#?}",
                    self.finals, self.workers, self.scheduler
                );
            }
        }
        panic!("the run did not end: results {:?}", self.finals);
    }
}

fn pick(len: usize, n: impl Into<usize>) -> Option<usize> {
    (len > 0).then(|| n.into() % len)
}

fn check(scenario: &Scenario) {
    let mut farm = Farm::new(scenario);
    for op in &scenario.ops {
        farm.apply(op);
    }
    farm.run_to_the_end();
    assert_eq!(farm.run_done, 1);
    assert!(farm.scheduler.is_done());
    assert!(
        farm.finals.iter().all(|n| *n == 1),
        "every test has exactly one result: {:?}",
        farm.finals
    );
    // A test that always fails used every rerun; one that failed fewer times than it may be
    // rerun passed in the end, unless its worker kept being lost.
    for (test, &fails) in scenario.fail_first.iter().enumerate() {
        let test = test as u32;
        if fails >= 4 && farm.scheduler.lost_on(test).len() as u32 <= MAX_LOST_ATTEMPTS {
            assert_eq!(farm.scheduler.failed_attempts(test), scenario.reruns);
        }
    }
    // Late reports of every attempt after the end change nothing and end nothing.
    let mut all: Vec<u64> = farm.test_of.keys().copied().collect();
    all.sort_unstable();
    for lease in all {
        let actions = farm.scheduler.handle(
            Event::Finished {
                lease,
                seconds: 0.0,
            },
            farm.t0,
        );
        assert!(actions.is_empty(), "{actions:?} after the run ended");
    }
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 512,
        ..ProptestConfig::default()
    })]

    #[test]
    fn every_test_ends_exactly_once_and_the_run_ends(scenario in scenario()) {
        check(&scenario);
    }
}

/// A test that kills whatever agent runs it is not requeued forever: after
/// `MAX_LOST_ATTEMPTS` requeues it ends, naming every worker it was lost on, and the run ends.
#[test]
fn a_test_that_takes_down_every_agent_ends_as_abandoned() {
    let mut scheduler = Scheduler::uniform(2);
    scheduler.set_reruns(2);
    let now = Instant::now();
    let mut lost_on = Vec::new();
    for agent in 0..=MAX_LOST_ATTEMPTS {
        scheduler.add_agent(agent, 1, 1.0);
        let key = WorkerKey { agent, worker: 0 };
        let actions = scheduler.handle(Event::WantWork(key), now);
        let leases: Vec<Lease> = actions
            .iter()
            .flat_map(|a| match a {
                Action::Assign { leases, .. } => leases.clone(),
                _ => Vec::new(),
            })
            .collect();
        let killer = leases
            .iter()
            .find(|l| l.test == 0)
            .copied()
            .expect("the killer test is handed out");
        // The harmless test comes along (a worker must know its next test), held unstarted
        // behind the killer: losing it with the agent is no attempt at it.
        assert!(leases.iter().any(|l| l.test == 1), "{leases:?}");
        scheduler.handle(
            Event::Started {
                lease: killer.lease,
            },
            now,
        );
        lost_on.push(key);
        let actions = scheduler.handle(Event::AgentLost(agent), now);
        if agent < MAX_LOST_ATTEMPTS {
            assert!(
                !actions
                    .iter()
                    .any(|a| matches!(a, Action::TestAbandoned { .. })),
                "{actions:?}"
            );
        } else {
            assert!(
                actions.contains(&Action::TestAbandoned {
                    test: 0,
                    lease: killer.lease,
                    lost_on: lost_on.clone(),
                }),
                "{actions:?}"
            );
        }
    }
    assert_eq!(scheduler.attempts(0), MAX_LOST_ATTEMPTS + 1);
    assert_eq!(
        scheduler.attempts(1),
        0,
        "the test held behind the killer never started"
    );
    // The harmless test still runs, and the run ends.
    scheduler.add_agent(99, 1, 1.0);
    let key = WorkerKey {
        agent: 99,
        worker: 0,
    };
    let actions = scheduler.handle(Event::WantWork(key), now);
    let lease = actions
        .iter()
        .find_map(|a| match a {
            Action::Assign { leases, .. } => leases.first().copied(),
            _ => None,
        })
        .expect("the other test is handed out");
    assert_eq!(lease.test, 1);
    let end = scheduler.handle(
        Event::Finished {
            lease: lease.lease,
            seconds: 0.1,
        },
        now,
    );
    assert_eq!(
        end,
        vec![
            Action::TestDone {
                test: 1,
                lease: lease.lease
            },
            Action::RunDone
        ]
    );
}

/// A failed attempt runs again on another worker while one is live, and only the last
/// attempt ends the test.
#[test]
fn a_failed_test_is_rerun_on_another_worker() {
    let mut scheduler = Scheduler::uniform(1);
    scheduler.set_reruns(1);
    scheduler.add_agent(0, 2, 1.0);
    let now = Instant::now();
    let first = WorkerKey {
        agent: 0,
        worker: 0,
    };
    let second = WorkerKey {
        agent: 0,
        worker: 1,
    };
    let lease = match scheduler.handle(Event::WantWork(first), now).as_slice() {
        [Action::Assign { leases, .. }] => leases[0],
        other => panic!("{other:?}"),
    };
    // The other worker finds nothing and is told so.
    assert_eq!(
        scheduler.handle(Event::WantWork(second), now),
        vec![Action::NoWork { worker: second }]
    );
    let rerun = scheduler.handle(
        Event::Failed {
            lease: lease.lease,
            seconds: 0.1,
        },
        now,
    );
    assert_eq!(
        rerun[0],
        Action::Rerun {
            test: 0,
            lease: lease.lease
        }
    );
    let again = match &rerun[1..] {
        [Action::Assign { worker, leases }] => {
            assert_eq!(
                *worker, second,
                "the rerun goes to the worker that did not fail it"
            );
            leases[0]
        }
        other => panic!("{other:?}"),
    };
    // The worker that failed it asks again and is not given the rerun.
    assert_eq!(
        scheduler.handle(Event::WantWork(first), now),
        vec![Action::NoWork { worker: first }]
    );
    assert_eq!(scheduler.failed_attempts(0), 1);
    assert_eq!(scheduler.attempts(0), 2);
    let end = scheduler.handle(
        Event::Failed {
            lease: again.lease,
            seconds: 0.1,
        },
        now,
    );
    assert_eq!(
        end,
        vec![
            Action::TestDone {
                test: 0,
                lease: again.lease
            },
            Action::RunDone
        ],
        "no reruns left: the failure is the result"
    );
}

/// A rerun goes to another agent's machine while one has a live worker, not to the other
/// worker of the machine that failed it.
#[test]
fn a_failed_test_is_rerun_on_another_agent_first() {
    let mut scheduler = Scheduler::uniform(1);
    scheduler.set_reruns(1);
    scheduler.add_agent(0, 2, 1.0);
    scheduler.add_agent(1, 1, 1.0);
    let now = Instant::now();
    let key = |agent, worker| WorkerKey { agent, worker };
    let lease = match scheduler.handle(Event::WantWork(key(0, 0)), now).as_slice() {
        [Action::Assign { leases, .. }] => leases[0],
        other => panic!("{other:?}"),
    };
    // Both other workers ask and wait; the failure then sends the rerun to agent 1.
    for worker in [key(0, 1), key(1, 0)] {
        assert_eq!(
            scheduler.handle(Event::WantWork(worker), now),
            vec![Action::NoWork { worker }]
        );
    }
    let rerun = scheduler.handle(
        Event::Failed {
            lease: lease.lease,
            seconds: 0.1,
        },
        now,
    );
    assert!(
        matches!(&rerun[1..], [Action::Assign { worker, .. }] if *worker == key(1, 0)),
        "{rerun:?}"
    );
}

/// With only the worker that failed it left, a rerun runs there rather than never.
#[test]
fn a_rerun_takes_the_same_worker_when_no_other_is_live() {
    let mut scheduler = Scheduler::uniform(1);
    scheduler.set_reruns(3);
    scheduler.add_agent(0, 2, 1.0);
    let now = Instant::now();
    let only = WorkerKey {
        agent: 0,
        worker: 0,
    };
    let gone = WorkerKey {
        agent: 0,
        worker: 1,
    };
    scheduler.handle(
        Event::WorkerExited {
            worker: gone,
            unstarted: Vec::new(),
        },
        now,
    );
    let lease = match scheduler.handle(Event::WantWork(only), now).as_slice() {
        [Action::Assign { leases, .. }] => leases[0],
        other => panic!("{other:?}"),
    };
    let rerun = scheduler.handle(
        Event::Failed {
            lease: lease.lease,
            seconds: 0.1,
        },
        now,
    );
    assert_eq!(rerun.len(), 1, "{rerun:?}");
    let again = match scheduler.handle(Event::WantWork(only), now).as_slice() {
        [Action::Assign { leases, .. }] => leases[0],
        other => panic!("{other:?}"),
    };
    assert_eq!(again.test, 0);
    assert_eq!(
        scheduler.handle(
            Event::Finished {
                lease: again.lease,
                seconds: 0.1
            },
            now
        ),
        vec![
            Action::TestDone {
                test: 0,
                lease: again.lease
            },
            Action::RunDone
        ]
    );
}
