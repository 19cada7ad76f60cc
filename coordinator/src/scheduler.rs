//! The work queue of one run: which test goes to which worker, and when.
//!
//! A pure state machine in the sans-I/O style: the dispatcher feeds it [`Event`]s with the
//! current time and carries out the [`Action`]s it returns. It opens no socket, reads no clock
//! and takes no lock, so tests drive it with virtual time and simulated farms.
//!
//! Every attempt at a test is a *lease* with a run-unique number. A test has at most one
//! current lease; reports for any other lease are superseded and never change the result.
//! Work is pulled: a worker asks when it holds fewer than two unstarted tests (it needs to know
//! the test after the one it starts, for pytest's fixture teardown), and is answered with more
//! tests or with "nothing for now". Workers told "nothing for now" are parked and get work
//! pushed to them if any comes back to the queue (a lost agent's tests).

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::time::Instant;

/// The dispatcher's number for a connected agent.
pub type AgentSlot = u32;

/// One worker process of one agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct WorkerKey {
    pub agent: AgentSlot,
    pub worker: u32,
}

/// One attempt at one test, as handed to a worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lease {
    pub lease: u64,
    pub test: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The worker holds fewer than two unstarted tests and cannot go on without an answer.
    WantWork(WorkerKey),
    /// The worker began running this lease's test.
    Started { lease: u64 },
    /// The lease's test ran to its end (teardown reported).
    Finished { lease: u64 },
    /// The worker process is gone; `unstarted` are leases it held but never began.
    WorkerExited {
        worker: WorkerKey,
        unstarted: Vec<u64>,
    },
    /// The worker gave back these leases, unstarted, when asked to.
    Revoked { worker: WorkerKey, leases: Vec<u64> },
    /// The agent is gone: every lease its workers held goes back to the queue.
    AgentLost(AgentSlot),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Append these tests, in order, to what the worker holds.
    Assign {
        worker: WorkerKey,
        leases: Vec<Lease>,
    },
    /// Nothing for this worker now; it runs what it holds and waits.
    NoWork { worker: WorkerKey },
    /// The lease was the test's current attempt and it finished: the test has its result.
    TestDone { test: u32, lease: u64 },
    /// Every test has its result.
    RunDone,
}

/// Where a report's lease stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaseStatus {
    /// The test's current attempt.
    Current { test: u32, worker: WorkerKey },
    /// An attempt that was given up on (its worker or agent was lost) or already finished.
    Superseded { test: u32 },
    /// Never handed out in this run.
    Unknown,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TestState {
    Queued,
    Leased(u64),
    Done,
}

#[derive(Debug, Default)]
struct WorkerState {
    /// Leases handed to the worker and not finished, in the order it runs them.
    held: VecDeque<u64>,
    /// Leases among `held` that the worker has started.
    started: BTreeSet<u64>,
    /// Told "nothing for now" and not given anything since.
    parked: bool,
    gone: bool,
}

impl WorkerState {
    fn unstarted(&self) -> usize {
        self.held.len() - self.started.len()
    }
}

#[derive(Debug, Clone, Copy)]
struct LeaseInfo {
    test: u32,
    worker: WorkerKey,
}

/// The largest batch handed to one worker at once; batches shrink as the queue drains so the
/// end of the run stays balanced (guided self-scheduling).
const MAX_BATCH: usize = 64;

#[derive(Debug)]
pub struct Scheduler {
    tests: Vec<TestState>,
    attempts: Vec<u32>,
    queue: VecDeque<u32>,
    workers: HashMap<WorkerKey, WorkerState>,
    /// Every lease ever handed out, current or not, so late reports can be classified.
    leases: HashMap<u64, LeaseInfo>,
    next_lease: u64,
    done: usize,
    run_done_sent: bool,
}

impl Scheduler {
    /// A run of `test_count` tests, queued in collection order.
    pub fn new(test_count: u32) -> Scheduler {
        Scheduler {
            tests: vec![TestState::Queued; test_count as usize],
            attempts: vec![0; test_count as usize],
            queue: (0..test_count).collect(),
            workers: HashMap::new(),
            leases: HashMap::new(),
            next_lease: 1,
            done: 0,
            run_done_sent: false,
        }
    }

    pub fn test_count(&self) -> usize {
        self.tests.len()
    }

    pub fn finished_count(&self) -> usize {
        self.done
    }

    pub fn is_done(&self) -> bool {
        self.done == self.tests.len()
    }

    /// How many times the test was handed out.
    pub fn attempts(&self, test: u32) -> u32 {
        self.attempts.get(test as usize).copied().unwrap_or(0)
    }

    pub fn lease_status(&self, lease: u64) -> LeaseStatus {
        match self.leases.get(&lease) {
            None => LeaseStatus::Unknown,
            Some(info) => match self.tests.get(info.test as usize) {
                Some(TestState::Leased(current)) if *current == lease => LeaseStatus::Current {
                    test: info.test,
                    worker: info.worker,
                },
                _ => LeaseStatus::Superseded { test: info.test },
            },
        }
    }

    /// Workers that have been seen and are not gone.
    pub fn live_workers(&self) -> usize {
        self.workers.values().filter(|w| !w.gone).count()
    }

    pub fn handle(&mut self, event: Event, _now: Instant) -> Vec<Action> {
        let mut actions = Vec::new();
        match event {
            Event::WantWork(key) => {
                let state = self.workers.entry(key).or_default();
                if state.gone {
                    return actions;
                }
                self.serve(key, &mut actions);
            }
            Event::Started { lease } => {
                if let LeaseStatus::Current { worker, .. } = self.lease_status(lease) {
                    if let Some(state) = self.workers.get_mut(&worker) {
                        state.started.insert(lease);
                    }
                }
            }
            Event::Finished { lease } => {
                let status = self.lease_status(lease);
                if let Some(info) = self.leases.get(&lease).copied() {
                    if let Some(state) = self.workers.get_mut(&info.worker) {
                        state.held.retain(|l| *l != lease);
                        state.started.remove(&lease);
                    }
                }
                if let LeaseStatus::Current { test, .. } = status {
                    self.tests[test as usize] = TestState::Done;
                    self.done += 1;
                    actions.push(Action::TestDone { test, lease });
                }
            }
            Event::WorkerExited { worker, unstarted } => {
                let held = match self.workers.get_mut(&worker) {
                    Some(state) => {
                        state.gone = true;
                        state.started.clear();
                        std::mem::take(&mut state.held)
                    }
                    None => VecDeque::new(),
                };
                // The agent reports what the worker never started; anything else it held
                // (a test it was running when it died) was reported and finished by the agent,
                // or is lost now: either way it goes back unless it is done.
                let mut back: Vec<u64> = unstarted;
                back.extend(held);
                self.requeue(back, &mut actions);
            }
            Event::Revoked { worker, leases } => {
                let mut back = Vec::new();
                if let Some(state) = self.workers.get_mut(&worker) {
                    for lease in leases {
                        if !state.started.contains(&lease) && state.held.contains(&lease) {
                            state.held.retain(|l| *l != lease);
                            back.push(lease);
                        }
                    }
                }
                self.requeue(back, &mut actions);
            }
            Event::AgentLost(agent) => {
                let mut back = Vec::new();
                for (key, state) in self.workers.iter_mut() {
                    if key.agent == agent && !state.gone {
                        state.gone = true;
                        state.started.clear();
                        back.extend(state.held.drain(..));
                    }
                }
                back.sort_unstable();
                self.requeue(back, &mut actions);
            }
        }
        if self.is_done() && !self.run_done_sent {
            self.run_done_sent = true;
            actions.push(Action::RunDone);
        }
        actions
    }

    /// Puts the tests of these leases back at the front of the queue (they were due early)
    /// and hands them to parked workers.
    fn requeue(&mut self, leases: Vec<u64>, actions: &mut Vec<Action>) {
        let mut tests = Vec::new();
        for lease in leases {
            if let LeaseStatus::Current { test, .. } = self.lease_status(lease) {
                self.tests[test as usize] = TestState::Queued;
                tests.push(test);
            }
        }
        tests.sort_unstable();
        tests.dedup();
        for test in tests.into_iter().rev() {
            self.queue.push_front(test);
        }
        let parked: Vec<WorkerKey> = self
            .workers
            .iter()
            .filter(|(_, s)| s.parked && !s.gone)
            .map(|(k, _)| *k)
            .collect();
        let mut parked = parked;
        parked.sort_unstable();
        for key in parked {
            if self.queue.is_empty() {
                break;
            }
            self.serve(key, actions);
        }
    }

    /// Answers a worker that needs work: a batch, or "nothing for now".
    fn serve(&mut self, key: WorkerKey, actions: &mut Vec<Action>) {
        let live = self.live_workers().max(1);
        let unstarted = self.workers.get(&key).map(|s| s.unstarted()).unwrap_or(0);
        let guided = self.queue.len() / (4 * live);
        let want = guided
            .clamp(1, MAX_BATCH)
            .max(2usize.saturating_sub(unstarted));
        let mut leases = Vec::new();
        while leases.len() < want {
            let Some(test) = self.queue.pop_front() else {
                break;
            };
            let lease = self.next_lease;
            self.next_lease += 1;
            self.tests[test as usize] = TestState::Leased(lease);
            self.attempts[test as usize] += 1;
            self.leases.insert(lease, LeaseInfo { test, worker: key });
            leases.push(Lease { lease, test });
        }
        let state = self.workers.entry(key).or_default();
        if leases.is_empty() {
            state.parked = true;
            actions.push(Action::NoWork { worker: key });
        } else {
            state.parked = false;
            state.held.extend(leases.iter().map(|l| l.lease));
            actions.push(Action::Assign {
                worker: key,
                leases,
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn w(agent: u32, worker: u32) -> WorkerKey {
        WorkerKey { agent, worker }
    }

    fn assigned(actions: &[Action]) -> Vec<Lease> {
        actions
            .iter()
            .flat_map(|a| match a {
                Action::Assign { leases, .. } => leases.clone(),
                _ => vec![],
            })
            .collect()
    }

    /// Runs a simulated farm with virtual time until the run is done: each worker runs its
    /// held tests one after another, each taking `duration(test)`.
    fn simulate(
        sched: &mut Scheduler,
        workers: &[WorkerKey],
        duration: impl Fn(u32) -> Duration,
    ) -> (Vec<(u32, WorkerKey)>, Duration) {
        let t0 = Instant::now();
        let mut now = t0;
        let mut held: HashMap<WorkerKey, VecDeque<Lease>> = HashMap::new();
        let mut busy_until: HashMap<WorkerKey, (Instant, Lease)> = HashMap::new();
        let mut parked: BTreeSet<WorkerKey> = BTreeSet::new();
        let mut done = Vec::new();
        let mut pending: VecDeque<WorkerKey> = workers.iter().copied().collect();
        for _ in 0..1_000_000 {
            while let Some(key) = pending.pop_front() {
                for action in sched.handle(Event::WantWork(key), now) {
                    apply(action, &mut held, &mut parked, &mut done);
                }
            }
            // Start what can start: a worker starts its next test when it knows the one after
            // or was told there is nothing more.
            for key in workers {
                if busy_until.contains_key(key) {
                    continue;
                }
                let q = held.entry(*key).or_default();
                if q.len() >= 2 || (q.len() == 1 && parked.contains(key)) {
                    let lease = q.pop_front().unwrap();
                    sched.handle(Event::Started { lease: lease.lease }, now);
                    busy_until.insert(*key, (now + duration(lease.test), lease));
                } else if !parked.contains(key) && !pending.contains(key) {
                    pending.push_back(*key);
                }
            }
            if !pending.is_empty() {
                continue;
            }
            let Some((&key, &(until, lease))) = busy_until.iter().min_by_key(|(_, (t, _))| *t)
            else {
                break;
            };
            now = until;
            busy_until.remove(&key);
            for action in sched.handle(Event::Finished { lease: lease.lease }, now) {
                apply(action, &mut held, &mut parked, &mut done);
            }
            if sched.is_done() {
                break;
            }
        }
        (done, now - t0)
    }

    fn apply(
        action: Action,
        held: &mut HashMap<WorkerKey, VecDeque<Lease>>,
        parked: &mut BTreeSet<WorkerKey>,
        done: &mut Vec<(u32, WorkerKey)>,
    ) {
        match action {
            Action::Assign { worker, leases } => {
                parked.remove(&worker);
                held.entry(worker).or_default().extend(leases);
            }
            Action::NoWork { worker } => {
                parked.insert(worker);
            }
            Action::TestDone { test, .. } => done.push((test, w(0, 0))),
            Action::RunDone => {}
        }
    }

    #[test]
    fn every_test_runs_exactly_once_on_a_simulated_farm() {
        let workers: Vec<WorkerKey> = (0..50).flat_map(|a| (0..8).map(move |i| w(a, i))).collect();
        let mut sched = Scheduler::new(20_000);
        let (done, _) = simulate(&mut sched, &workers, |t| {
            Duration::from_millis(1 + (t as u64 * 7919) % 50)
        });
        assert!(sched.is_done());
        let mut tests: Vec<u32> = done.iter().map(|(t, _)| *t).collect();
        tests.sort_unstable();
        tests.dedup();
        assert_eq!(tests.len(), 20_000);
        assert_eq!(done.len(), 20_000, "no test finished twice");
    }

    #[test]
    fn a_worker_is_never_asked_to_start_without_knowing_the_next_test() {
        let mut sched = Scheduler::new(10);
        let now = Instant::now();
        let actions = sched.handle(Event::WantWork(w(0, 0)), now);
        assert!(
            assigned(&actions).len() >= 2,
            "first answer gives a test and its successor"
        );
    }

    #[test]
    fn an_empty_queue_answers_nothing_for_now_and_the_run_ends() {
        let mut sched = Scheduler::new(1);
        let now = Instant::now();
        let a = sched.handle(Event::WantWork(w(0, 0)), now);
        let lease = assigned(&a)[0].lease;
        let b = sched.handle(Event::WantWork(w(0, 1)), now);
        assert_eq!(b, vec![Action::NoWork { worker: w(0, 1) }]);
        let c = sched.handle(Event::Finished { lease }, now);
        assert_eq!(
            c,
            vec![Action::TestDone { test: 0, lease }, Action::RunDone]
        );
    }

    #[test]
    fn a_lost_agents_tests_go_to_parked_workers_and_late_reports_are_superseded() {
        let mut sched = Scheduler::new(2);
        let now = Instant::now();
        let first = assigned(&sched.handle(Event::WantWork(w(1, 0)), now));
        assert_eq!(first.len(), 2);
        sched.handle(
            Event::Started {
                lease: first[0].lease,
            },
            now,
        );
        // Another agent's worker finds nothing and parks.
        assert_eq!(
            sched.handle(Event::WantWork(w(2, 0)), now),
            vec![Action::NoWork { worker: w(2, 0) }]
        );
        let requeued = sched.handle(Event::AgentLost(1), now);
        let again = assigned(&requeued);
        assert_eq!(
            again.iter().map(|l| l.test).collect::<Vec<_>>(),
            vec![0, 1],
            "both tests, in their original order, pushed to the parked worker"
        );
        assert!(matches!(
            sched.lease_status(first[0].lease),
            LeaseStatus::Superseded { test: 0 }
        ));
        // A late report from the lost agent changes nothing.
        assert!(sched
            .handle(
                Event::Finished {
                    lease: first[0].lease
                },
                now
            )
            .is_empty());
        assert_eq!(sched.finished_count(), 0);
        assert_eq!(sched.attempts(0), 2);
        for lease in &again {
            sched.handle(Event::Finished { lease: lease.lease }, now);
        }
        assert!(sched.is_done());
        assert_eq!(sched.lease_status(999), LeaseStatus::Unknown);
    }

    #[test]
    fn a_crashed_workers_unstarted_tests_run_elsewhere() {
        let mut sched = Scheduler::new(3);
        let now = Instant::now();
        let held = assigned(&sched.handle(Event::WantWork(w(0, 0)), now));
        sched.handle(
            Event::Started {
                lease: held[0].lease,
            },
            now,
        );
        // The agent reports the crashed test as failed and finished, then the exit.
        sched.handle(
            Event::Finished {
                lease: held[0].lease,
            },
            now,
        );
        sched.handle(
            Event::WorkerExited {
                worker: w(0, 0),
                unstarted: vec![held[1].lease],
            },
            now,
        );
        let other = assigned(&sched.handle(Event::WantWork(w(0, 1)), now));
        let tests: Vec<u32> = other.iter().map(|l| l.test).collect();
        assert_eq!(tests, vec![1, 2]);
        // The dead worker asking again (a stale message) gets nothing.
        assert!(sched.handle(Event::WantWork(w(0, 0)), now).is_empty());
    }

    #[test]
    fn batches_shrink_as_the_queue_drains() {
        let mut sched = Scheduler::new(10_000);
        let now = Instant::now();
        let workers: Vec<WorkerKey> = (0..4).map(|i| w(0, i)).collect();
        for key in &workers {
            sched.workers.entry(*key).or_default();
        }
        let first = assigned(&sched.handle(Event::WantWork(workers[0]), now));
        assert_eq!(first.len(), MAX_BATCH);
        // Drain nearly everything.
        while sched.queue.len() > 10 {
            let _ = sched.queue.pop_front();
        }
        let late = assigned(&sched.handle(Event::WantWork(workers[1]), now));
        assert_eq!(late.len(), 2, "near the end, only a test and its successor");
    }
}
