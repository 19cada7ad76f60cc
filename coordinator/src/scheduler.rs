//! The work queue of one run: which test goes to which worker, and when.
//!
//! A pure state machine in the sans-I/O style: the dispatcher feeds it [`Event`]s with the
//! current time and carries out the [`Action`]s it returns. It opens no socket, reads no clock
//! and takes no lock, so tests drive it with virtual time and simulated farms.
//!
//! - **Longest first.** Units of work (see `units.rs`) are queued by expected cost, longest
//!   first, so a slow test never starts last and runs alone while the others idle. A long unit
//!   goes to the worker that will be done with it first: one asking while still busy leaves it
//!   to another that would finish it sooner.
//! - **Pull.** A worker asks when it holds fewer than two unstarted tests (it must know the test
//!   after the one it starts, for pytest's fixture teardown) and gets a batch or "nothing for
//!   now". Batches are a slice of the remaining work (guided self-scheduling): large while much
//!   is left, down to one unit at the end; short tests come many at a time to amortise the round
//!   trip, long ones one at a time.
//! - **No idle worker while work waits.** A worker that finds the queue empty is parked, and the
//!   worker whose unstarted tests would start latest (behind its running test and the rest) is
//!   asked to give back the tail of them, which then goes to the parked worker. Time passing
//!   ([`Event::Tick`]) looks again for parked workers: tests stuck behind one that runs far past
//!   its expected time move too. A lost agent's or worker's tests go back to the queue the same
//!   way.
//! - **Machines differ.** Costs are in reference seconds; each agent has a speed (calibrated at
//!   start, refined from observed durations). A worker much slower than the fastest takes short
//!   work from the back of the queue rather than a long test it would finish last.
//! - **Leases.** Every attempt at a test is a lease with a run-unique number. A test has at most
//!   one current lease; reports for any other lease are superseded and change nothing.
//! - **Reruns.** With `run --reruns N` a test whose attempt failed goes back to the queue front
//!   up to N times, preferably to another agent's worker, else to a worker that has not failed
//!   it; only its last attempt is its result.
//! - **Bounded requeues.** A test running when its worker or agent was lost is requeued at most
//!   [`MAX_LOST_ATTEMPTS`] times; the next loss ends it (a test that kills its agent would
//!   otherwise take down every agent of the farm, one after another, forever).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::time::Instant;

use crate::units::{Estimates, Unit};

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

#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// The worker holds fewer than two unstarted tests and cannot go on without an answer.
    WantWork(WorkerKey),
    /// The worker began running this lease's test.
    Started { lease: u64 },
    /// The lease's test ran to its end (teardown reported), taking `seconds` on its worker.
    Finished { lease: u64, seconds: f64 },
    /// Like [`Event::Finished`], for an attempt whose outcome is a failure (`failed` or
    /// `error`): with reruns left, the test runs again instead of ending.
    Failed { lease: u64, seconds: f64 },
    /// The worker gave back these leases, unstarted, when asked to.
    Revoked { worker: WorkerKey, leases: Vec<u64> },
    /// The worker process is gone; `unstarted` are leases it held but never began.
    WorkerExited {
        worker: WorkerKey,
        unstarted: Vec<u64>,
    },
    /// The agent is gone: every lease its workers held goes back to the queue.
    AgentLost(AgentSlot),
    /// Time passed. A test running far past its expected time holds up the tests queued
    /// behind it on its worker: workers told "nothing for now" take them back.
    Tick,
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
    /// Ask the worker to give back these unstarted leases (answered by `Event::Revoked`).
    Revoke { worker: WorkerKey, leases: Vec<u64> },
    /// The lease was the test's current attempt and it finished: the test has its result.
    TestDone { test: u32, lease: u64 },
    /// The lease was the test's current attempt and it failed, with reruns left: the test goes
    /// back to the queue. The lease's reports are history, not the result.
    Rerun { test: u32, lease: u64 },
    /// The test was running when its worker or agent was lost, more than
    /// [`MAX_LOST_ATTEMPTS`] times: it ends without running again. `lease` is its last
    /// attempt; `lost_on` the workers lost with it, oldest first.
    TestAbandoned {
        test: u32,
        lease: u64,
        lost_on: Vec<WorkerKey>,
    },
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

/// Where a test stands: queued, leased (the lease's number), or done. One word per test (an
/// enum would take two): lease numbers start at 1 and never reach `u64::MAX`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct TestState(u64);

impl TestState {
    const QUEUED: TestState = TestState(0);
    const DONE: TestState = TestState(u64::MAX);

    fn leased(lease: u64) -> TestState {
        TestState(lease)
    }

    /// The test's current lease, if it is leased.
    fn lease(self) -> Option<u64> {
        (self != TestState::QUEUED && self != TestState::DONE).then_some(self.0)
    }
}

#[derive(Debug, Default)]
struct WorkerState {
    /// Leases handed to the worker and not finished, in the order it runs them.
    held: VecDeque<u64>,
    /// Leases among `held` that the worker has started, and when.
    started: BTreeMap<u64, Instant>,
    /// Told "nothing for now" and not given anything since.
    parked: bool,
    /// Has started a test in this run (and so set its session fixtures up).
    ran: bool,
    gone: bool,
}

impl WorkerState {
    fn unstarted(&self) -> impl DoubleEndedIterator<Item = u64> + '_ {
        self.held
            .iter()
            .copied()
            .filter(|l| !self.started.contains_key(l))
    }
}

#[derive(Debug, Clone, Copy)]
struct LeaseInfo {
    test: u32,
    worker: WorkerKey,
}

/// A queued unit's tests. Nearly every unit is a single test, which is kept inline: a queue
/// of a million tests then takes 16 MB and no allocation per test.
#[derive(Debug, Clone, PartialEq)]
enum Queued {
    One(u32),
    Many(Box<[u32]>),
}

impl Queued {
    fn tests(&self) -> &[u32] {
        match self {
            Queued::One(test) => std::slice::from_ref(test),
            Queued::Many(tests) => tests,
        }
    }
}

impl From<Unit> for Queued {
    fn from(unit: Unit) -> Queued {
        match unit.tests[..] {
            [test] => Queued::One(test),
            _ => Queued::Many(unit.tests.into_boxed_slice()),
        }
    }
}

/// The most tests handed to one worker at once.
const MAX_BATCH: usize = 128;
/// A batch is worth at least this much work (reference seconds), so tiny tests travel many at a
/// time and the round trip stays a small part of their cost.
const MIN_BATCH_SECONDS: f64 = 0.02;
/// Assumed cost of a test nothing is known about, until tests of this run have finished.
const UNKNOWN_TEST_SECONDS: f64 = 0.1;
/// Taking back tests that would start less than this much sooner is not worth a round trip.
const MIN_TAKE_BACK_SECONDS: f64 = 0.01;
/// A worker this much slower than the fastest leaves long tests to faster ones.
const SLOW_WORKER: f64 = 0.8;
/// How many times a test may be requeued because the worker or agent running it was lost.
/// The loss after that ends the test as an error: three different machines going down under
/// the same test is no longer bad luck.
pub const MAX_LOST_ATTEMPTS: u32 = 3;

#[derive(Debug)]
pub struct Scheduler {
    tests: Vec<TestState>,
    attempts: Vec<u32>,
    /// Expected duration per test in reference seconds, when history knows it.
    estimate: Vec<f64>,
    known: Vec<bool>,
    /// Units waiting, longest first.
    queue: VecDeque<Queued>,
    workers: BTreeMap<WorkerKey, WorkerState>,
    speeds: HashMap<AgentSlot, f64>,
    /// Each agent's speed as it announced it (its calibration).
    calibrated: HashMap<AgentSlot, f64>,
    /// Every lease ever handed out, current or not, so late reports can be classified. Lease
    /// numbers count up from 1, so lease `n` is at index `n - 1`: a million leases take 12 MB
    /// here, where a map took over 50.
    leases: Vec<LeaseInfo>,
    /// Leases asked back and not yet answered.
    revoking: HashSet<u64>,
    /// Idle workers waiting for work being taken back from another worker (the key). They are
    /// not told "nothing for now" meanwhile: that would make them tear down their session
    /// fixtures only to set them up again for the tests taken back.
    awaiting: HashMap<WorkerKey, WorkerKey>,
    next_lease: u64,
    done: usize,
    run_done_sent: bool,
    /// Sum and count of observed durations (reference seconds) of tests without history.
    observed: (f64, u32),
    /// What the queue holds, kept up to date on every push and pop so that answering a worker
    /// never walks the queue: the known costs, and how many tests have none.
    queued_known: f64,
    queued_unknown: usize,
    /// How many times a failed test runs again (`run --reruns`).
    reruns: u32,
    /// Per test, its failed attempts that were run again.
    failures: Vec<u32>,
    /// Per test with failed attempts, the workers that failed it: its reruns go elsewhere
    /// while another worker is live.
    avoid: HashMap<u32, Vec<WorkerKey>>,
    /// Per test, the workers lost while running it, oldest first.
    lost_on: HashMap<u32, Vec<WorkerKey>>,
    /// Tests that came in a unit of several: never taken back (see `is_grouped`).
    grouped: Vec<bool>,
    /// The longest history estimate of any test in the run: with the cost of a test without
    /// history, a bound on what any one held test can cost, so a take-back search can pass
    /// over a worker without looking at its tests.
    max_known_cost: f64,
    /// The time of the event being handled (none before the first).
    now: Option<Instant>,
}

impl Scheduler {
    /// A run of `test_count` tests nothing is known about, each its own unit, in collection
    /// order.
    pub fn uniform(test_count: u32) -> Scheduler {
        let units = (0..test_count)
            .map(|t| Unit {
                tests: vec![t],
                cost: 0.0,
            })
            .collect();
        Scheduler::new(
            units,
            Estimates {
                per_test: vec![0.0; test_count as usize],
                known: vec![false; test_count as usize],
            },
        )
    }

    /// A run of these units (every test in exactly one), queued longest first; ties keep
    /// collection order.
    pub fn new(mut units: Vec<Unit>, estimates: Estimates) -> Scheduler {
        let count = estimates.per_test.len();
        units.sort_by(|a, b| b.cost.total_cmp(&a.cost));
        // Not `collect()`: that would reuse the units' buffer, twice the size the queue needs.
        let mut queue = VecDeque::with_capacity(units.len());
        queue.extend(units.into_iter().map(Queued::from));
        let mut scheduler = Scheduler {
            tests: vec![TestState::QUEUED; count],
            attempts: vec![0; count],
            estimate: estimates.per_test,
            known: estimates.known,
            queue,
            workers: BTreeMap::new(),
            speeds: HashMap::new(),
            calibrated: HashMap::new(),
            // One lease per test, unless tests run again.
            leases: Vec::with_capacity(count),
            revoking: HashSet::new(),
            awaiting: HashMap::new(),
            next_lease: 1,
            done: 0,
            run_done_sent: false,
            observed: (0.0, 0),
            queued_known: 0.0,
            queued_unknown: 0,
            reruns: 0,
            failures: vec![0; count],
            avoid: HashMap::new(),
            lost_on: HashMap::new(),
            grouped: vec![false; count],
            max_known_cost: 0.0,
            now: None,
        };
        scheduler.max_known_cost = scheduler
            .estimate
            .iter()
            .zip(&scheduler.known)
            .filter(|(_, known)| **known)
            .map(|(estimate, _)| *estimate)
            .fold(0.0, f64::max);
        for unit in scheduler.queue.iter().filter(|u| u.tests().len() > 1) {
            for test in unit.tests() {
                if let Some(g) = scheduler.grouped.get_mut(*test as usize) {
                    *g = true;
                }
            }
        }
        for unit in &scheduler.queue {
            let (known, unknown) = scheduler.unit_parts(unit.tests());
            scheduler.queued_known += known;
            scheduler.queued_unknown += unknown;
        }
        scheduler
    }

    /// Counts these tests as finished without running them: a resumed run's tests that already
    /// have a result from the run it carries on with. They leave the queue (a unit left empty
    /// goes), so no worker is handed them. Call it before any work is handed out.
    pub fn skip(&mut self, tests: &[u32]) {
        let mut skipped = HashSet::new();
        for &test in tests {
            if let Some(state) = self
                .tests
                .get_mut(test as usize)
                .filter(|s| **s == TestState::QUEUED)
            {
                *state = TestState::DONE;
                skipped.insert(test);
            }
        }
        if skipped.is_empty() {
            return;
        }
        self.done += skipped.len();
        let units: VecDeque<Queued> = std::mem::take(&mut self.queue)
            .into_iter()
            .filter_map(|unit| {
                let tests: Vec<u32> = unit
                    .tests()
                    .iter()
                    .copied()
                    .filter(|t| !skipped.contains(t))
                    .collect();
                (!tests.is_empty()).then(|| Queued::from(Unit { tests, cost: 0.0 }))
            })
            .collect();
        self.queued_known = 0.0;
        self.queued_unknown = 0;
        for unit in &units {
            let (known, unknown) = self.unit_parts(unit.tests());
            self.queued_known += known;
            self.queued_unknown += unknown;
        }
        self.queue = units;
    }

    /// A unit's known cost and its number of tests without history.
    fn unit_parts(&self, tests: &[u32]) -> (f64, usize) {
        let mut known = 0.0;
        let mut unknown = 0;
        for test in tests {
            let i = *test as usize;
            if self.known.get(i).copied().unwrap_or(false) {
                known += self.estimate[i];
            } else {
                unknown += 1;
            }
        }
        (known, unknown)
    }

    fn push_front(&mut self, unit: Queued) {
        let (known, unknown) = self.unit_parts(unit.tests());
        self.queued_known += known;
        self.queued_unknown += unknown;
        self.queue.push_front(unit);
    }

    /// Takes the next unit for `key` off the queue (see [`Scheduler::next_unit`]).
    fn pop(&mut self, key: WorkerKey, from_back: bool) -> Option<Queued> {
        let index = self.next_unit(key, from_back)?;
        let unit = self.queue.remove(index)?;
        let (known, unknown) = self.unit_parts(unit.tests());
        self.queued_known = (self.queued_known - known).max(0.0);
        self.queued_unknown = self.queued_unknown.saturating_sub(unknown);
        Some(unit)
    }

    /// Expected work left in the queue, in reference seconds.
    fn remaining(&self) -> f64 {
        self.queued_known + self.queued_unknown as f64 * self.unknown_cost()
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

    /// How many times the test ran or may have run: leases handed out, less those given back
    /// unstarted (taken back, or held by a worker or agent that was lost before starting them).
    pub fn attempts(&self, test: u32) -> u32 {
        self.attempts.get(test as usize).copied().unwrap_or(0)
    }

    /// Runs a test whose attempt failed up to `reruns` more times (`run --reruns`).
    pub fn set_reruns(&mut self, reruns: u32) {
        self.reruns = reruns;
    }

    /// The test's failed attempts that were run again.
    pub fn failed_attempts(&self, test: u32) -> u32 {
        self.failures.get(test as usize).copied().unwrap_or(0)
    }

    /// The workers lost while running the test, oldest first.
    pub fn lost_on(&self, test: u32) -> &[WorkerKey] {
        self.lost_on.get(&test).map(Vec::as_slice).unwrap_or(&[])
    }

    /// Declares how fast an agent's cores are (1.0 = reference).
    pub fn set_agent_speed(&mut self, agent: AgentSlot, speed: f64) {
        let speed = if speed.is_finite() && speed > 0.0 {
            speed
        } else {
            1.0
        };
        self.speeds.insert(agent, speed);
        self.calibrated.insert(agent, speed);
    }

    /// Declares an agent's workers before they ask, so batch sizes account for every worker
    /// from the first request on.
    pub fn add_agent(&mut self, agent: AgentSlot, workers: u32, speed: f64) {
        self.set_agent_speed(agent, speed);
        for worker in 0..workers {
            self.workers.entry(WorkerKey { agent, worker }).or_default();
        }
    }

    pub fn agent_speed(&self, agent: AgentSlot) -> f64 {
        self.speeds.get(&agent).copied().unwrap_or(1.0)
    }

    pub fn lease_status(&self, lease: u64) -> LeaseStatus {
        match self.lease(lease) {
            None => LeaseStatus::Unknown,
            Some(info) => match self.tests.get(info.test as usize) {
                Some(state) if state.lease() == Some(lease) => LeaseStatus::Current {
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

    /// Tests waiting in the queue: neither done nor held by a worker. O(workers).
    pub fn queued_count(&self) -> usize {
        let held: usize = self.workers.values().map(|w| w.held.len()).sum();
        self.tests.len().saturating_sub(self.done + held)
    }

    /// Tests a worker has started and not finished. O(workers).
    pub fn running_count(&self) -> usize {
        self.workers.values().map(|w| w.started.len()).sum()
    }

    /// Expected work not done yet, in reference seconds: the queue and what workers hold.
    pub fn remaining_seconds(&self) -> f64 {
        let held: f64 = self
            .workers
            .values()
            .flat_map(|w| w.held.iter())
            .filter_map(|lease| self.lease(*lease))
            .map(|info| self.cost(info.test))
            .sum();
        self.remaining() + held
    }

    /// Seconds the run is expected still to take at `now`: the work left (queued, and what each
    /// worker still has to do) spread over the live workers' speed, but no less than what any
    /// one worker still has to do, nor than the first queued unit on the fastest worker. A test
    /// past its expected time counts as running as long again. `None` without live workers.
    pub fn eta_seconds(&self, now: Instant) -> Option<f64> {
        let capacity = self.capacity();
        let fastest = self.fastest_live_speed();
        if capacity <= 0.0 || fastest <= 0.0 {
            return None;
        }
        let mut in_flight = 0.0;
        let mut longest: f64 = 0.0;
        for (key, state) in self.workers.iter().filter(|(_, s)| !s.gone) {
            let speed = self.agent_speed(key.agent);
            let backlog = self.backlog(state, speed, Some(now));
            in_flight += backlog * speed;
            longest = longest.max(backlog);
        }
        let first = self
            .queue
            .front()
            .map_or(0.0, |u| self.unit_cost(u) / fastest);
        let eta = ((self.remaining() + in_flight) / capacity)
            .max(longest)
            .max(first);
        eta.is_finite().then_some(eta)
    }

    /// The live workers' combined speed: reference seconds of work they do per second.
    pub fn capacity(&self) -> f64 {
        self.workers
            .iter()
            .filter(|(_, w)| !w.gone)
            .map(|(key, _)| self.agent_speed(key.agent))
            .sum()
    }

    /// The expected cost of a test in reference seconds: its history, else the mean of this
    /// run's tests without history so far, else a guess.
    fn cost(&self, test: u32) -> f64 {
        let i = test as usize;
        if self.known.get(i).copied().unwrap_or(false) {
            return self.estimate[i];
        }
        self.unknown_cost()
    }

    /// The expected cost of a test without history.
    fn unknown_cost(&self) -> f64 {
        match self.observed {
            (sum, n) if n > 0 => sum / n as f64,
            _ => UNKNOWN_TEST_SECONDS,
        }
    }

    fn unit_cost(&self, unit: &Queued) -> f64 {
        unit.tests().iter().map(|t| self.cost(*t)).sum()
    }

    /// What is known of a lease handed out in this run.
    fn lease(&self, lease: u64) -> Option<&LeaseInfo> {
        let index = usize::try_from(lease.checked_sub(1)?).ok()?;
        self.leases.get(index)
    }

    pub fn handle(&mut self, event: Event, now: Instant) -> Vec<Action> {
        self.now = Some(now);
        let mut actions = Vec::new();
        match event {
            Event::Tick => self.tick(&mut actions),
            Event::WantWork(key) => {
                let state = self.workers.entry(key).or_default();
                if !state.gone {
                    self.serve(key, &mut actions);
                }
            }
            Event::Started { lease } => {
                if let LeaseStatus::Current { worker, .. } = self.lease_status(lease) {
                    if let Some(state) = self.workers.get_mut(&worker) {
                        state.ran = true;
                        state.started.insert(lease, now);
                    }
                }
            }
            Event::Finished { lease, seconds } => {
                self.finished(lease, seconds, false, &mut actions)
            }
            Event::Failed { lease, seconds } => self.finished(lease, seconds, true, &mut actions),
            Event::Revoked { worker, leases } => {
                let mut back = Vec::new();
                if let Some(state) = self.workers.get_mut(&worker) {
                    for lease in leases {
                        if !state.started.contains_key(&lease) && state.held.contains(&lease) {
                            state.held.retain(|l| *l != lease);
                            back.push(lease);
                        }
                    }
                }
                // Whatever was not given back has started: it is no longer being asked for.
                let asked: Vec<u64> = self
                    .revoking
                    .iter()
                    .copied()
                    .filter(|l| self.lease(*l).is_some_and(|i| i.worker == worker))
                    .collect();
                for lease in asked {
                    self.revoking.remove(&lease);
                }
                // Given back unstarted: no attempt at the test.
                for lease in &back {
                    self.lost(*lease, worker, false, &mut actions);
                }
                // What comes back goes to the workers waiting for it, not to parked ones: a
                // parked worker has torn down its session fixtures.
                self.requeue(back, &mut actions, false);
                self.answer_awaiting(worker, &mut actions);
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
                // The agent reports what the worker never started; anything else it held (a
                // test it was running when it died) was reported and finished by the agent, or
                // is lost now: either way it goes back unless it is done. Leases of other
                // workers in the report are not this worker's to give back.
                let unstarted: BTreeSet<u64> = unstarted
                    .into_iter()
                    .filter(|l| self.lease(*l).is_some_and(|i| i.worker == worker))
                    .collect();
                let mut back: Vec<u64> = unstarted.iter().copied().collect();
                back.extend(held.into_iter().filter(|l| !unstarted.contains(l)));
                for lease in &back {
                    self.lost(*lease, worker, !unstarted.contains(lease), &mut actions);
                }
                self.awaiting.remove(&worker);
                self.requeue(back, &mut actions, true);
                self.answer_awaiting(worker, &mut actions);
                self.wake_parked(&mut actions);
            }
            Event::AgentLost(agent) => {
                // Each worker may have been running its first held test (or one it reported
                // started); its other tests never started. The Started message of a test that
                // kills its agent at once may die with the agent, hence the first held test.
                let mut lost = Vec::new();
                for (key, state) in self.workers.iter_mut() {
                    if key.agent == agent && !state.gone {
                        state.gone = true;
                        let head = state.held.front().copied();
                        for lease in state.held.drain(..) {
                            let in_flight =
                                Some(lease) == head || state.started.contains_key(&lease);
                            lost.push((lease, *key, in_flight));
                        }
                        state.started.clear();
                    }
                }
                lost.sort_unstable_by_key(|(lease, _, _)| *lease);
                for (lease, key, in_flight) in &lost {
                    self.lost(*lease, *key, *in_flight, &mut actions);
                }
                let back: Vec<u64> = lost.iter().map(|(lease, _, _)| *lease).collect();
                self.awaiting.retain(|waiting, _| waiting.agent != agent);
                self.requeue(back, &mut actions, true);
                let victims: Vec<WorkerKey> = self
                    .awaiting
                    .values()
                    .copied()
                    .filter(|v| v.agent == agent)
                    .collect();
                for victim in victims {
                    self.answer_awaiting(victim, &mut actions);
                }
                self.wake_parked(&mut actions);
            }
        }
        // A parked worker asks no more: work in the queue while every live worker is parked
        // would wait forever. It happens when work taken back for a waiting worker arrives
        // after that worker found other work, or when the workers a rerun avoids go away.
        if !self.queue.is_empty() && !self.workers.values().any(|s| !s.gone && !s.parked) {
            self.wake_parked(&mut actions);
        }
        if self.is_done() && !self.run_done_sent {
            self.run_done_sent = true;
            actions.push(Action::RunDone);
        }
        actions
    }

    fn finished(&mut self, lease: u64, seconds: f64, failed: bool, actions: &mut Vec<Action>) {
        let status = self.lease_status(lease);
        self.revoking.remove(&lease);
        let Some(info) = self.lease(lease).copied() else {
            return;
        };
        if let Some(state) = self.workers.get_mut(&info.worker) {
            state.held.retain(|l| *l != lease);
            state.started.remove(&lease);
        }
        let LeaseStatus::Current { test, .. } = status else {
            return;
        };
        if seconds.is_finite() && seconds >= 0.0 {
            let speed = self.agent_speed(info.worker.agent);
            let i = test as usize;
            if self.known[i] {
                // Refine the agent's speed from tests long enough to measure. A test far off its
                // history says more about the test (a fixture it paid this time, a cache) than
                // about the machine: such samples are ignored, and the speed stays within a
                // factor of two of the calibration, so history cannot drift run after run.
                let expected = self.estimate[i];
                if expected > 0.005 && seconds > 0.005 {
                    let sample = expected / seconds;
                    if (1.0 / 3.0..=3.0).contains(&sample) {
                        let base = self
                            .calibrated
                            .get(&info.worker.agent)
                            .copied()
                            .unwrap_or(1.0);
                        let refined = (0.9 * speed + 0.1 * sample).clamp(base / 2.0, base * 2.0);
                        self.speeds.insert(info.worker.agent, refined);
                    }
                }
            } else {
                self.observed.0 += seconds * speed;
                self.observed.1 += 1;
            }
        }
        let i = test as usize;
        if failed && self.failures[i] < self.reruns {
            // Run it again, at the front (it was due early), preferably on another worker: a
            // failure that follows the worker is then told apart from one that follows the test.
            self.failures[i] += 1;
            self.avoid.entry(test).or_default().push(info.worker);
            self.tests[i] = TestState::QUEUED;
            self.push_front(Queued::One(test));
            actions.push(Action::Rerun { test, lease });
            self.wake_parked(actions);
            return;
        }
        self.tests[i] = TestState::DONE;
        self.done += 1;
        self.avoid.remove(&test);
        actions.push(Action::TestDone { test, lease });
    }

    /// A lease taken from its worker: given back, or lost with the worker. One the worker may
    /// have been running (`in_flight`) counts towards the test's bound on losses, and the loss
    /// past [`MAX_LOST_ATTEMPTS`] ends the test; one it never started was no attempt at all.
    /// The caller requeues what is still current.
    fn lost(&mut self, lease: u64, worker: WorkerKey, in_flight: bool, actions: &mut Vec<Action>) {
        let LeaseStatus::Current { test, .. } = self.lease_status(lease) else {
            return;
        };
        let i = test as usize;
        if !in_flight {
            self.attempts[i] = self.attempts[i].saturating_sub(1);
            return;
        }
        let lost_on = self.lost_on.entry(test).or_default();
        lost_on.push(worker);
        if lost_on.len() as u32 > MAX_LOST_ATTEMPTS {
            let lost_on = lost_on.clone();
            self.revoking.remove(&lease);
            self.tests[i] = TestState::DONE;
            self.done += 1;
            self.avoid.remove(&test);
            actions.push(Action::TestAbandoned {
                test,
                lease,
                lost_on,
            });
        }
    }

    /// Whether `key` should leave `test` to another worker: its agent's machine failed the
    /// test before and a live worker of another agent is there to take it (a failure that
    /// comes from the machine would come again there), or `key` itself failed it and another
    /// live worker is there.
    fn avoids(&self, test: u32, key: WorkerKey) -> bool {
        let Some(failed_on) = self.avoid.get(&test) else {
            return false;
        };
        let agent_failed = |agent: u32| failed_on.iter().any(|w| w.agent == agent);
        let mut live = self
            .workers
            .iter()
            .filter(|(_, s)| !s.gone)
            .map(|(k, _)| *k);
        if agent_failed(key.agent) && live.clone().any(|k| !agent_failed(k.agent)) {
            return true;
        }
        failed_on.contains(&key) && live.any(|k| !failed_on.contains(&k))
    }

    /// Where the unit `key` takes next sits in the queue, from the front or from the back: the
    /// first one none of whose tests it should leave to another worker.
    fn next_unit(&self, key: WorkerKey, from_back: bool) -> Option<usize> {
        let len = self.queue.len();
        if self.avoid.is_empty() || len == 0 {
            return match len {
                0 => None,
                _ if from_back => Some(len - 1),
                _ => Some(0),
            };
        }
        let fits = |i: &usize| !self.queue[*i].tests().iter().any(|t| self.avoids(*t, key));
        if from_back {
            (0..len).rev().find(fits)
        } else {
            (0..len).find(fits)
        }
    }

    /// Serves parked and waiting workers while the queue holds work they may take: after a
    /// rerun or a loss, work never waits in the queue while a worker that could run it idles.
    fn wake_parked(&mut self, actions: &mut Vec<Action>) {
        let mut idle: Vec<WorkerKey> = self
            .workers
            .iter()
            .filter(|(k, s)| !s.gone && (s.parked || self.awaiting.contains_key(k)))
            .map(|(k, _)| *k)
            .collect();
        idle.sort_unstable();
        for key in idle {
            if self.queue.is_empty() {
                break;
            }
            if self.next_unit(key, false).is_some() {
                self.serve(key, actions);
            }
        }
    }

    /// Puts the tests of these leases back at the front of the queue (they were due early)
    /// and hands them to parked workers.
    /// Puts these leases' tests back at the front of the queue. With `wake_parked` (work lost
    /// to a fault) parked and waiting workers are served at once, even though a parked worker
    /// sets its session fixtures up again: finishing the run beats keeping it idle.
    fn requeue(&mut self, leases: Vec<u64>, actions: &mut Vec<Action>, wake_parked: bool) {
        let mut tests = Vec::new();
        for lease in leases {
            self.revoking.remove(&lease);
            if let LeaseStatus::Current { test, .. } = self.lease_status(lease) {
                self.tests[test as usize] = TestState::QUEUED;
                tests.push(test);
            }
        }
        tests.sort_unstable();
        tests.dedup();
        if tests.is_empty() {
            return;
        }
        for test in tests.into_iter().rev() {
            self.push_front(Queued::One(test));
        }
        let mut parked: Vec<WorkerKey> = self
            .workers
            .iter()
            .filter(|(k, s)| {
                !s.gone && ((wake_parked && s.parked) || self.awaiting.contains_key(k))
            })
            .map(|(k, _)| *k)
            .collect();
        parked.sort_unstable();
        for key in parked {
            if self.queue.is_empty() {
                break;
            }
            if self.next_unit(key, false).is_some() {
                self.serve(key, actions);
            }
        }
    }

    fn fastest_live_speed(&self) -> f64 {
        self.workers
            .iter()
            .filter(|(_, s)| !s.gone)
            .map(|(k, _)| self.agent_speed(k.agent))
            .fold(0.0, f64::max)
    }

    /// Answers a worker that needs work: a batch, or "nothing for now" (and then, if another
    /// worker sits on unstarted work, a request to give some back).
    fn serve(&mut self, key: WorkerKey, actions: &mut Vec<Action>) {
        let live = self.live_workers().max(1);
        let unstarted = self
            .workers
            .get(&key)
            .map(|s| s.unstarted().count())
            .unwrap_or(0);
        let speed = self.agent_speed(key.agent);
        let remaining = self.remaining();
        // A slow worker leaves the long tests at the front to faster ones when it would finish
        // them later than the run's expected end.
        let capacity: f64 = self
            .workers
            .iter()
            .filter(|(_, s)| !s.gone)
            .map(|(k, _)| self.agent_speed(k.agent))
            .sum();
        let target = (remaining / (4 * live) as f64).max(MIN_BATCH_SECONDS);
        let front = self.queue.front().map(|u| self.unit_cost(u));
        let slow = speed < SLOW_WORKER * self.fastest_live_speed()
            && front.is_some_and(|cost| cost / speed > remaining / capacity.max(speed));
        // A long unit (one that goes out alone) goes to the worker that will be done with it
        // first: a worker asking while it is still busy for a while leaves it to one that
        // will ask sooner.
        let busy = front.is_some_and(|cost| cost >= target && self.sooner_elsewhere(key, cost));
        let from_back = slow || busy;
        let min_tests = 2usize.saturating_sub(unstarted);
        let mut leases = Vec::new();
        let mut batch_cost = 0.0;
        while leases.len() < MAX_BATCH
            && (leases.is_empty() || batch_cost < target || leases.len() < min_tests)
        {
            // A test taken only so the worker knows what follows comes from the back: the
            // shortest, never a second long test that another worker should start now.
            let filler = !leases.is_empty() && batch_cost >= target;
            let Some(unit) = self.pop(key, from_back || filler) else {
                break;
            };
            batch_cost += self.unit_cost(&unit);
            for &test in unit.tests() {
                let lease = self.next_lease;
                self.next_lease += 1;
                self.tests[test as usize] = TestState::leased(lease);
                self.attempts[test as usize] += 1;
                debug_assert_eq!(self.leases.len() as u64 + 1, lease);
                self.leases.push(LeaseInfo { test, worker: key });
                leases.push(Lease { lease, test });
            }
        }
        if !leases.is_empty() {
            self.awaiting.remove(&key);
            let state = self.workers.entry(key).or_default();
            state.parked = false;
            state.held.extend(leases.iter().map(|l| l.lease));
            actions.push(Action::Assign {
                worker: key,
                leases,
            });
            return;
        }
        if self.awaiting.contains_key(&key) {
            return;
        }
        if let Some(victim) = self.take_back(key, actions) {
            self.awaiting.insert(key, victim);
            return;
        }
        self.workers.entry(key).or_default().parked = true;
        actions.push(Action::NoWork { worker: key });
    }

    /// The take-back from `victim` is over (answered, or the victim is gone): workers that
    /// waited on it get work, or are told there is none.
    fn answer_awaiting(&mut self, victim: WorkerKey, actions: &mut Vec<Action>) {
        let mut waiting: Vec<WorkerKey> = self
            .awaiting
            .iter()
            .filter(|(_, v)| **v == victim)
            .map(|(k, _)| *k)
            .collect();
        waiting.sort_unstable();
        for key in waiting {
            self.awaiting.remove(&key);
            if self.workers.get(&key).is_some_and(|s| !s.gone) {
                self.serve(key, actions);
            }
        }
    }

    /// What the worker still has to do before it could start another test, in its own
    /// seconds: the rest of its running test and the tests it holds unstarted.
    fn backlog(&self, state: &WorkerState, speed: f64, now: Option<Instant>) -> f64 {
        let unstarted: f64 = state
            .unstarted()
            .filter_map(|l| self.lease(l))
            .map(|info| self.cost(info.test))
            .sum();
        self.running_wait(state, speed, now) + unstarted / speed
    }

    /// Whether another worker that will ask for work (live, not parked) would be done with a
    /// unit of `cost` at least [`MIN_TAKE_BACK_SECONDS`] sooner than `key`. Stops at the first.
    fn sooner_elsewhere(&self, key: WorkerKey, cost: f64) -> bool {
        let Some(state) = self.workers.get(&key) else {
            return false;
        };
        let speed = self.agent_speed(key.agent);
        // Looked at only while what it holds keeps it busy at least as long as the unit would
        // (the tail case; it asks before it reports its next test started): a worker asking
        // ahead near the end of a short test, the common case, is not worth a pass over every
        // worker.
        let backlog = self.backlog(state, speed, self.now);
        if backlog < cost / speed {
            return false;
        }
        let here = backlog + cost / speed;
        // Asked at every request for a long unit, over every worker: each is judged from its
        // running test and its count of held tests, and its held tests are looked up only when
        // those leave the answer open.
        let most_per_test = self.max_known_cost.max(self.unknown_cost());
        self.workers.iter().any(|(other, s)| {
            if *other == key || s.gone || s.parked {
                return false;
            }
            let speed = self.agent_speed(other.agent);
            // It is sooner when its backlog is below this.
            let within = here - cost / speed - MIN_TAKE_BACK_SECONDS;
            let wait = self.running_wait(s, speed, self.now);
            if wait >= within {
                return false;
            }
            if wait + s.held.len() as f64 * most_per_test / speed < within {
                return true;
            }
            self.backlog(s, speed, self.now) < within
        })
    }

    /// Whether the test came in a unit of several (a module or class kept together because its
    /// fixtures cost more than splitting saves, or a loadfile/loadscope/loadgroup unit). Such
    /// tests are never taken back: moving one would make its new worker set the shared
    /// fixtures up again, which is what grouping them avoided.
    fn is_grouped(&self, test: u32) -> bool {
        self.grouped.get(test as usize).copied().unwrap_or(false)
    }

    /// How long until the worker is done with the test it is running, in its own seconds: the
    /// rest of its expected time, or, for a test already past it, as long again as it has run
    /// so far (a test that overruns says little about when it will end).
    fn running_wait(&self, state: &WorkerState, speed: f64, now: Option<Instant>) -> f64 {
        let (Some(now), Some((lease, since))) = (now, state.started.iter().next()) else {
            return 0.0;
        };
        let expected = self
            .lease(*lease)
            .map(|info| self.cost(info.test) / speed)
            .unwrap_or(0.0);
        let elapsed = now.saturating_duration_since(*since).as_secs_f64();
        if elapsed < expected {
            expected - elapsed
        } else {
            elapsed
        }
    }

    /// The queue is empty and `idle` has nothing: ask the worker whose unstarted tests would
    /// start latest to give back the tail of them. Returns that worker if it was asked.
    ///
    /// A worker's backlog is what it still has to do: the rest of its running test and the
    /// tests it holds unstarted. The tail taken is what evens out the two workers' ends; it is
    /// worth a round trip when the first test taken starts [`MIN_TAKE_BACK_SECONDS`] sooner
    /// on `idle` than it would have on its worker. So a few tiny tests stuck behind a test that
    /// runs far past its expected time are taken back too.
    ///
    /// A worker's next item (the first it holds unstarted) is never taken: pytest ran the test
    /// before it with that `nextitem` and kept the fixtures they share set up for it, so moving
    /// it would put their teardown off into another test's setup (the worker refuses too).
    fn take_back(&mut self, idle: WorkerKey, actions: &mut Vec<Action>) -> Option<WorkerKey> {
        // The worker with the largest backlog, and that backlog.
        let mut best: Option<(WorkerKey, f64)> = None;
        // Idle workers ask one after another as a run ends, each while thousands of workers
        // still hold a few tests: a worker whose backlog could not be worth a take-back (or
        // more than the best found so far) even at the highest cost a test may have is passed
        // over without looking up each of its leases.
        let most_per_test = self.max_known_cost.max(self.unknown_cost());
        for (key, state) in &self.workers {
            // A worker that is not running anything starts its held test at once: taking it
            // would only move the wait.
            if *key == idle || state.gone || state.started.is_empty() {
                continue;
            }
            let speed = self.agent_speed(key.agent);
            let wait = self.running_wait(state, speed, self.now);
            let ceiling = wait + state.held.len() as f64 * most_per_test / speed;
            if ceiling < MIN_TAKE_BACK_SECONDS || best.is_some_and(|(_, b)| ceiling <= b) {
                continue;
            }
            // Its next item stays (see below), and runs before the rest.
            let mut unstarted = state.unstarted();
            let next = unstarted
                .next()
                .and_then(|l| self.lease(l))
                .map_or(0.0, |info| self.cost(info.test) / speed);
            let (tests, work) = unstarted
                .filter(|l| !self.revoking.contains(l))
                .filter_map(|l| self.lease(l))
                .filter(|info| !self.is_grouped(info.test))
                .fold((0usize, 0.0), |(n, work), info| {
                    (n + 1, work + self.cost(info.test) / speed)
                });
            let backlog = wait + next + work;
            if tests > 0 && best.is_none_or(|(_, b)| backlog > b) {
                best = Some((*key, backlog));
            }
        }
        let (victim, backlog) = best?;
        let state = self.workers.get(&victim)?;
        let speed = self.agent_speed(victim.agent);
        let next_item = state.unstarted().next();
        let idle_speed = self.agent_speed(idle.agent);
        let mut taken = Vec::new();
        // The tail's cost on the victim and on `idle`.
        let mut taken_there = 0.0;
        let mut taken_here = 0.0;
        // From the tail: what the victim would run last, while `idle` would still be done
        // with it before the victim is done with the rest.
        for lease in state.unstarted().rev() {
            if taken_here >= backlog - taken_there {
                break;
            }
            if self.revoking.contains(&lease) {
                continue;
            }
            let Some(info) = self.lease(lease) else {
                continue;
            };
            if self.is_grouped(info.test) {
                continue;
            }
            if Some(lease) == next_item {
                break;
            }
            let cost = self.cost(info.test);
            taken_there += cost / speed;
            taken_here += cost / idle_speed;
            taken.push(lease);
        }
        // The first test taken would have started once the victim was through the rest.
        let sooner = backlog - taken_there;
        if taken.is_empty() || sooner < MIN_TAKE_BACK_SECONDS {
            return None;
        }
        taken.reverse();
        self.revoking.extend(taken.iter().copied());
        actions.push(Action::Revoke {
            worker: victim,
            leases: taken,
        });
        Some(victim)
    }

    /// Time passed: with the queue empty, parked workers that have not run a test yet (an
    /// agent that joined late) take back what waits behind tests running long; a parked
    /// worker asks no more, so nothing else would look again. A worker that has run tests is
    /// left parked: its session fixtures are torn down, and pytest sets them up once per
    /// session. Stops at the first worker nothing is worth taking back for.
    fn tick(&mut self, actions: &mut Vec<Action>) {
        if !self.queue.is_empty() {
            return;
        }
        let parked: Vec<WorkerKey> = self
            .workers
            .iter()
            .filter(|(k, s)| s.parked && !s.ran && !s.gone && !self.awaiting.contains_key(k))
            .map(|(k, _)| *k)
            .collect();
        for key in parked {
            match self.take_back(key, actions) {
                Some(victim) => {
                    self.awaiting.insert(key, victim);
                }
                None => break,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;
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

    /// A scheduler over tests with known durations (seconds), each its own unit.
    fn known(durations: &[f64]) -> Scheduler {
        let units = durations
            .iter()
            .enumerate()
            .map(|(i, d)| Unit {
                tests: vec![i as u32],
                cost: *d,
            })
            .collect();
        Scheduler::new(
            units,
            Estimates {
                per_test: durations.to_vec(),
                known: vec![true; durations.len()],
            },
        )
    }

    /// What a simulated run did.
    struct Simulation {
        /// (test, worker) in order of finishing.
        done: Vec<(u32, WorkerKey)>,
        /// (test, worker, start time) in order of starting.
        starts: Vec<(u32, WorkerKey, Duration)>,
        makespan: Duration,
    }

    /// Runs a simulated farm with virtual time until the run is done. Each worker runs its held
    /// tests one after another, a test taking `duration(test) / speed(agent)`, and follows the
    /// real worker's rules: it starts a test only when it knows the next one or was told there
    /// is nothing more, asks when it holds fewer than two unstarted tests, and gives back
    /// unstarted tests when asked. Messages arrive instantly.
    fn simulate(
        sched: &mut Scheduler,
        workers: &[WorkerKey],
        speed: impl Fn(u32) -> f64,
        duration: impl Fn(u32) -> f64,
    ) -> Simulation {
        simulate_with_joins(sched, workers, |_| Duration::ZERO, speed, duration)
    }

    /// [`simulate`], with each agent joining the run at `joins_at(agent)` of virtual time.
    fn simulate_with_joins(
        sched: &mut Scheduler,
        workers: &[WorkerKey],
        joins_at: impl Fn(u32) -> Duration,
        speed: impl Fn(u32) -> f64,
        duration: impl Fn(u32) -> f64,
    ) -> Simulation {
        let t0 = Instant::now();
        let mut now = Duration::ZERO;
        let mut held: HashMap<WorkerKey, VecDeque<Lease>> = HashMap::new();
        let mut busy: HashMap<WorkerKey, (Duration, Lease)> = HashMap::new();
        let mut parked: BTreeSet<WorkerKey> = BTreeSet::new();
        let mut asked: BTreeSet<WorkerKey> = BTreeSet::new();
        let mut sim = Simulation {
            done: Vec::new(),
            starts: Vec::new(),
            makespan: Duration::ZERO,
        };
        let mut inbox: VecDeque<Event> = VecDeque::new();
        // The dispatcher declares each agent's workers when it joins the run.
        let mut per_agent: BTreeMap<u32, u32> = BTreeMap::new();
        for key in workers {
            let count = per_agent.entry(key.agent).or_default();
            *count = (*count).max(key.worker + 1);
        }
        let mut joined: BTreeSet<u32> = BTreeSet::new();
        for _ in 0..10_000_000 {
            for (agent, count) in &per_agent {
                if joins_at(*agent) <= now && joined.insert(*agent) {
                    sched.add_agent(*agent, *count, speed(*agent));
                }
            }
            // Deliver scheduler events and apply its actions until quiet.
            while let Some(event) = inbox.pop_front() {
                for action in sched.handle(event, t0 + now) {
                    match action {
                        Action::Assign { worker, leases } => {
                            parked.remove(&worker);
                            asked.remove(&worker);
                            held.entry(worker).or_default().extend(leases);
                        }
                        Action::NoWork { worker } => {
                            parked.insert(worker);
                            asked.remove(&worker);
                        }
                        Action::Revoke { worker, leases } => {
                            let q = held.entry(worker).or_default();
                            let removed: Vec<u64> = leases
                                .iter()
                                .copied()
                                .filter(|l| q.iter().any(|x| x.lease == *l))
                                .collect();
                            q.retain(|x| !removed.contains(&x.lease));
                            inbox.push_back(Event::Revoked {
                                worker,
                                leases: removed,
                            });
                        }
                        Action::TestDone { test, .. } => {
                            let worker = sim
                                .starts
                                .iter()
                                .rev()
                                .find(|(t, _, _)| *t == test)
                                .map(|(_, w, _)| *w)
                                .unwrap();
                            sim.done.push((test, worker));
                        }
                        // These farms fail no test and lose no worker.
                        Action::Rerun { .. } | Action::TestAbandoned { .. } | Action::RunDone => {}
                    }
                }
            }
            // Workers start what they can, and ask when they cannot.
            for key in workers {
                if busy.contains_key(key) || !joined.contains(&key.agent) {
                    continue;
                }
                let q = held.entry(*key).or_default();
                if q.len() >= 2 || (q.len() == 1 && parked.contains(key)) {
                    let lease = q.pop_front().unwrap();
                    inbox.push_back(Event::Started { lease: lease.lease });
                    let secs = duration(lease.test) / speed(key.agent);
                    busy.insert(*key, (now + Duration::from_secs_f64(secs), lease));
                    sim.starts.push((lease.test, *key, now));
                }
                let q = held.entry(*key).or_default();
                if q.len() < 2 && !parked.contains(key) && !asked.contains(key) {
                    asked.insert(*key);
                    inbox.push_back(Event::WantWork(*key));
                }
            }
            if !inbox.is_empty() {
                continue;
            }
            let next_join = per_agent
                .keys()
                .filter(|a| !joined.contains(a))
                .map(|a| joins_at(*a))
                .min();
            let next_finish = busy.iter().min_by_key(|(_, (t, _))| *t);
            let Some((&key, &(until, lease))) = next_finish else {
                match next_join {
                    Some(at) => {
                        now = at;
                        continue;
                    }
                    None => break,
                }
            };
            if next_join.is_some_and(|at| at < until) {
                now = next_join.unwrap_or(until);
                continue;
            }
            now = until;
            busy.remove(&key);
            let secs = duration(lease.test) / speed(key.agent);
            inbox.push_back(Event::Finished {
                lease: lease.lease,
                seconds: secs,
            });
            if sched.is_done() && inbox.is_empty() {
                break;
            }
        }
        // Drain the last events.
        while let Some(event) = inbox.pop_front() {
            for action in sched.handle(event, t0 + now) {
                if let Action::TestDone { test, .. } = action {
                    let worker = sim
                        .starts
                        .iter()
                        .rev()
                        .find(|(t, _, _)| *t == test)
                        .map(|(_, w, _)| *w)
                        .unwrap();
                    sim.done.push((test, worker));
                }
            }
        }
        sim.makespan = now;
        sim
    }

    fn lower_bound(durations: &[f64], workers: usize) -> f64 {
        let total: f64 = durations.iter().sum();
        let longest = durations.iter().copied().fold(0.0, f64::max);
        longest.max(total / workers as f64)
    }

    /// The `tail` shape: 400 short tests, then three long ones last in collection order.
    fn tail_suite() -> Vec<f64> {
        let mut d: Vec<f64> = (0..400)
            .map(|i| 0.01 + (i * 37 % 90) as f64 / 1000.0)
            .collect();
        d.extend([2.0, 1.5, 1.0]);
        d
    }

    #[test]
    fn every_test_runs_exactly_once_on_a_simulated_farm() {
        let workers: Vec<WorkerKey> = (0..50).flat_map(|a| (0..8).map(move |i| w(a, i))).collect();
        let durations: Vec<f64> = (0..20_000)
            .map(|t| 0.001 + (t as u64 * 7919 % 50) as f64 / 1000.0)
            .collect();
        let mut sched = Scheduler::uniform(20_000);
        let sim = simulate(&mut sched, &workers, |_| 1.0, |t| durations[t as usize]);
        assert!(sched.is_done());
        let mut tests: Vec<u32> = sim.done.iter().map(|(t, _)| *t).collect();
        tests.sort_unstable();
        tests.dedup();
        assert_eq!(tests.len(), 20_000);
        assert_eq!(sim.done.len(), 20_000, "no test finished twice");
    }

    #[test]
    fn with_history_the_longest_tests_start_first_and_the_run_ends_near_the_bound() {
        let durations = tail_suite();
        let workers: Vec<WorkerKey> = (0..8).map(|i| w(0, i)).collect();
        let mut sched = known(&durations);
        let sim = simulate(&mut sched, &workers, |_| 1.0, |t| durations[t as usize]);
        let first: Vec<u32> = sim.starts.iter().take(3).map(|(t, _, _)| *t).collect();
        let mut first_sorted = first.clone();
        first_sorted.sort_unstable();
        assert_eq!(
            first_sorted,
            vec![400, 401, 402],
            "the three long tests start first"
        );
        let bound = lower_bound(&durations, 8);
        let makespan = sim.makespan.as_secs_f64();
        assert!(
            makespan <= bound * 1.05,
            "makespan {makespan:.3} s vs lower bound {bound:.3} s"
        );
    }

    #[test]
    fn without_history_collection_order_leaves_the_tail_late() {
        // The contrast the history exists for: the same suite, nothing known.
        let durations = tail_suite();
        let workers: Vec<WorkerKey> = (0..8).map(|i| w(0, i)).collect();
        let mut sched = Scheduler::uniform(durations.len() as u32);
        let sim = simulate(&mut sched, &workers, |_| 1.0, |t| durations[t as usize]);
        let bound = lower_bound(&durations, 8);
        assert!(sim.makespan.as_secs_f64() > bound * 1.2);
    }

    #[test]
    fn equal_tests_split_evenly() {
        let durations = vec![0.5; 64];
        for n in [2u32, 4, 8] {
            let workers: Vec<WorkerKey> = (0..n).map(|i| w(0, i)).collect();
            let mut sched = known(&durations);
            let sim = simulate(&mut sched, &workers, |_| 1.0, |t| durations[t as usize]);
            let ideal = 32.0 / f64::from(n);
            assert!(
                sim.makespan.as_secs_f64() <= ideal + 0.5 + 1e-9,
                "{n} workers: {:?} against {ideal}",
                sim.makespan
            );
        }
    }

    #[test]
    fn a_worker_is_never_asked_to_start_without_knowing_the_next_test() {
        let mut sched = Scheduler::uniform(10);
        let now = Instant::now();
        let actions = sched.handle(Event::WantWork(w(0, 0)), now);
        assert!(
            assigned(&actions).len() >= 2,
            "first answer gives a test and its successor"
        );
    }

    #[test]
    fn short_tests_travel_in_batches_long_ones_alone() {
        let mut durations = vec![0.0005; 1_000];
        durations.extend([5.0, 4.0]);
        let mut sched = known(&durations);
        let now = Instant::now();
        for i in 0..2 {
            sched.workers.entry(w(0, i)).or_default();
        }
        let first = assigned(&sched.handle(Event::WantWork(w(0, 0)), now));
        assert_eq!(
            first.len(),
            2,
            "a long test alone, with a short one to follow it"
        );
        assert_eq!(first[0].test, 1000);
        assert!(first[1].test < 1000, "the follower is short: {first:?}");
        let second = assigned(&sched.handle(Event::WantWork(w(0, 1)), now));
        assert_eq!(
            second[0].test, 1001,
            "the other long test goes to the other worker"
        );
        let third = assigned(&sched.handle(Event::WantWork(w(0, 0)), now));
        assert!(
            third.len() >= 20,
            "tiny tests come many at a time: {}",
            third.len()
        );
        assert!(third.len() <= MAX_BATCH);
    }

    #[test]
    fn an_empty_queue_answers_nothing_for_now_and_the_run_ends() {
        let mut sched = Scheduler::uniform(1);
        let now = Instant::now();
        let a = sched.handle(Event::WantWork(w(0, 0)), now);
        let lease = assigned(&a)[0].lease;
        // Worker 0 has not started its test (it waits to learn what follows): nothing to take.
        let b = sched.handle(Event::WantWork(w(0, 1)), now);
        assert_eq!(b, vec![Action::NoWork { worker: w(0, 1) }]);
        let c = sched.handle(
            Event::Finished {
                lease,
                seconds: 0.1,
            },
            now,
        );
        assert_eq!(
            c,
            vec![Action::TestDone { test: 0, lease }, Action::RunDone]
        );
    }

    #[test]
    fn tests_kept_together_for_their_fixtures_are_never_taken_back() {
        // One module of six tests kept together (its fixture is expensive): a second worker
        // arriving while the first runs it must not take its tail and set the fixture up again.
        let units = vec![Unit {
            tests: (0..6).collect(),
            cost: 6.0,
        }];
        let mut sched = Scheduler::new(
            units,
            Estimates {
                per_test: vec![1.0; 6],
                known: vec![true; 6],
            },
        );
        let now = Instant::now();
        let held = assigned(&sched.handle(Event::WantWork(w(0, 0)), now));
        assert_eq!(held.len(), 6, "the whole module goes to one worker");
        sched.handle(
            Event::Started {
                lease: held[0].lease,
            },
            now,
        );
        let other = sched.handle(Event::WantWork(w(1, 0)), now);
        assert_eq!(other, vec![Action::NoWork { worker: w(1, 0) }]);
    }

    #[test]
    fn an_idle_worker_takes_back_unstarted_work_from_a_busy_one() {
        let durations = vec![1.0; 6];
        let mut sched = known(&durations);
        let now = Instant::now();
        // One worker grabs everything before the other exists.
        let all = assigned(&sched.handle(Event::WantWork(w(0, 0)), now));
        assert!(all.len() >= 2);
        let mut held: Vec<Lease> = all;
        while held.len() < 6 {
            held.extend(assigned(&sched.handle(Event::WantWork(w(0, 0)), now)));
        }
        sched.handle(
            Event::Started {
                lease: held[0].lease,
            },
            now,
        );
        // A new agent joins mid-run: the queue is empty, so it parks and work is taken back.
        // It is not told "nothing for now" (that would tear down its session fixtures).
        let actions = sched.handle(Event::WantWork(w(1, 0)), now);
        assert_eq!(actions.len(), 1, "{actions:?}");
        let Action::Revoke { worker, leases } = &actions[0] else {
            panic!("expected a revoke, got {actions:?}");
        };
        assert_eq!(*worker, w(0, 0));
        assert!(
            !leases.contains(&held[0].lease),
            "a started test is never taken back"
        );
        let tail: Vec<u64> = held
            .iter()
            .rev()
            .take(leases.len())
            .map(|l| l.lease)
            .rev()
            .collect();
        assert_eq!(
            leases, &tail,
            "the tail is taken: what the busy worker would run last"
        );
        // The busy worker gives them back; the parked one gets them at once.
        let given = sched.handle(
            Event::Revoked {
                worker: w(0, 0),
                leases: leases.clone(),
            },
            now,
        );
        let moved = assigned(&given);
        assert!(moved.len() >= 2, "{given:?}");
        let revoked_tests: Vec<u32> = held
            .iter()
            .filter(|l| leases.contains(&l.lease))
            .map(|l| l.test)
            .collect();
        assert!(moved.iter().all(|l| revoked_tests.contains(&l.test)));
        assert!(matches!(given[0], Action::Assign { worker, .. } if worker == w(1, 0)));
        // The old leases are superseded; the tests have new ones.
        for lease in leases {
            assert!(matches!(
                sched.lease_status(*lease),
                LeaseStatus::Superseded { .. }
            ));
        }
    }

    #[test]
    fn tiny_tests_stuck_behind_a_test_running_long_go_to_a_parked_worker() {
        // Twenty tests of half a millisecond: one batch takes them all.
        let mut sched = known(&[0.0005; 20]);
        let t0 = Instant::now();
        let held = assigned(&sched.handle(Event::WantWork(w(0, 0)), t0));
        assert_eq!(held.len(), 20, "one batch");
        sched.handle(
            Event::Started {
                lease: held[0].lease,
            },
            t0,
        );
        // A millisecond in, the 10 ms of work behind the first test is not worth a round trip.
        let ms = Duration::from_millis(1);
        assert_eq!(
            sched.handle(Event::WantWork(w(1, 0)), t0 + ms),
            vec![Action::NoWork { worker: w(1, 0) }]
        );
        assert_eq!(sched.handle(Event::Tick, t0 + 2 * ms), vec![]);
        // Two seconds in, the first test is far past its time: everything behind it moves but
        // its next item.
        let actions = sched.handle(Event::Tick, t0 + Duration::from_secs(2));
        let unstarted: Vec<u64> = held[2..].iter().map(|l| l.lease).collect();
        assert_eq!(
            actions,
            vec![Action::Revoke {
                worker: w(0, 0),
                leases: unstarted.clone()
            }]
        );
        assert_eq!(
            sched.handle(Event::Tick, t0 + Duration::from_secs(3)),
            vec![],
            "asked once"
        );
        let given = sched.handle(
            Event::Revoked {
                worker: w(0, 0),
                leases: unstarted,
            },
            t0 + Duration::from_secs(3),
        );
        let moved = assigned(&given);
        assert!(
            matches!(given[0], Action::Assign { worker, .. } if worker == w(1, 0)),
            "{given:?}"
        );
        let mut tests: Vec<u32> = moved.iter().map(|l| l.test).collect();
        tests.sort_unstable();
        assert_eq!(tests, (2..20).collect::<Vec<u32>>());
    }

    #[test]
    fn time_passing_never_wakes_a_worker_that_tore_its_session_down() {
        // Two 1 s tests, then twenty tiny ones.
        let mut durations = vec![1.0, 1.0];
        durations.extend([0.0005; 20]);
        let mut sched = known(&durations);
        let t0 = Instant::now();
        let sec = |s: u64| t0 + Duration::from_secs(s);
        let one = assigned(&sched.handle(Event::WantWork(w(1, 0)), t0));
        let mut zero = assigned(&sched.handle(Event::WantWork(w(0, 0)), t0));
        zero.extend(assigned(&sched.handle(Event::WantWork(w(0, 0)), t0)));
        assert_eq!((one.len(), zero.len()), (2, 20), "{one:?} {zero:?}");
        // (1,0) runs its two tests and finds nothing to take: (0,0) has not started yet.
        for lease in &one {
            sched.handle(Event::Started { lease: lease.lease }, t0);
            sched.handle(
                Event::Finished {
                    lease: lease.lease,
                    seconds: 1.0,
                },
                sec(1),
            );
        }
        assert_eq!(
            sched.handle(Event::WantWork(w(1, 0)), sec(1)),
            vec![Action::NoWork { worker: w(1, 0) }]
        );
        // (0,0)'s first test then runs far past its time, with nineteen tests behind it.
        sched.handle(
            Event::Started {
                lease: zero[0].lease,
            },
            sec(1),
        );
        assert_eq!(
            sched.handle(Event::Tick, sec(10)),
            vec![],
            "(1,0) has torn its session fixtures down: it is not woken to set them up again"
        );
        // A worker that asks (or one that never ran a test) still takes them back.
        let actions = sched.handle(Event::WantWork(w(2, 0)), sec(10));
        assert!(
            matches!(&actions[..], [Action::Revoke { worker, leases }]
                if *worker == w(0, 0) && leases.len() == 18),
            "{actions:?}"
        );
    }

    /// Three workers; a 2 s test, two 1.5 s tests, then short ones. (0,0) has asked first and
    /// holds the 2 s test: the scheduler, the durations and what (0,0) got.
    fn long_tests_first_asked_by_one_of_three() -> (Scheduler, Vec<f64>, Vec<Lease>, Instant) {
        let mut durations = vec![2.0, 1.5, 1.5];
        durations.extend([0.05; 30]);
        let mut sched = known(&durations);
        sched.add_agent(0, 3, 1.0);
        let now = Instant::now();
        let first = assigned(&sched.handle(Event::WantWork(w(0, 0)), now));
        assert_eq!(first[0].test, 0, "the longest test first");
        (sched, durations, first, now)
    }

    #[test]
    fn a_busy_worker_asking_ahead_leaves_the_next_long_test_to_a_worker_free_sooner() {
        let (mut sched, durations, first, now) = long_tests_first_asked_by_one_of_three();
        sched.handle(
            Event::Started {
                lease: first[0].lease,
            },
            now,
        );
        // (0,0) asks for what follows while its 2 s test runs, before the others asked at all:
        // a 1.5 s test would start only after 2 s there, at once on another worker.
        let ahead = assigned(&sched.handle(Event::WantWork(w(0, 0)), now));
        assert!(!ahead.is_empty());
        assert!(
            ahead.iter().all(|l| durations[l.test as usize] < 1.0),
            "{ahead:?}"
        );
        for worker in [1, 2] {
            let got = assigned(&sched.handle(Event::WantWork(w(0, worker)), now));
            assert_eq!(durations[got[0].test as usize], 1.5, "{got:?}");
        }
    }

    #[test]
    fn the_eta_spreads_the_work_left_but_waits_for_the_longest_and_for_an_overrun() {
        let mut sched = known(&[2.0, 1.0, 1.0, 1.0]);
        sched.add_agent(0, 2, 1.0);
        let t0 = Instant::now();
        let close = |a: Option<f64>, b: f64| a.is_some_and(|a| (a - b).abs() < 1e-9);
        // 5 s of work over two workers.
        assert!(
            close(sched.eta_seconds(t0), 2.5),
            "{:?}",
            sched.eta_seconds(t0)
        );
        let held = assigned(&sched.handle(Event::WantWork(w(0, 0)), t0));
        assert_eq!(held[0].test, 0);
        sched.handle(
            Event::Started {
                lease: held[0].lease,
            },
            t0,
        );
        // Half a second in: (0,0) has 1.5 s of its test and the 1 s test after it to go.
        let half = t0 + Duration::from_millis(500);
        assert!(
            close(sched.eta_seconds(half), 2.5),
            "{:?}",
            sched.eta_seconds(half)
        );
        // Ten seconds in, its 2 s test still runs: it may run as long again.
        let late = t0 + Duration::from_secs(10);
        assert!(
            close(sched.eta_seconds(late), 11.0),
            "{:?}",
            sched.eta_seconds(late)
        );
    }

    #[test]
    fn a_next_item_stays_with_its_worker_however_long_it_would_wait() {
        // (0,0) runs a 5 s test and holds the two 0.3 s tests after it.
        let mut sched = known(&[5.0, 0.3, 0.3]);
        sched.add_agent(0, 1, 1.0);
        let t0 = Instant::now();
        let mut held = assigned(&sched.handle(Event::WantWork(w(0, 0)), t0));
        while held.len() < 3 {
            held.extend(assigned(&sched.handle(Event::WantWork(w(0, 0)), t0)));
        }
        sched.handle(
            Event::Started {
                lease: held[0].lease,
            },
            t0,
        );
        // Pytest keeps the next item's shared fixtures up for it: only the last one moves.
        assert_eq!(
            sched.handle(Event::WantWork(w(1, 0)), t0),
            vec![Action::Revoke {
                worker: w(0, 0),
                leases: vec![held[2].lease]
            }]
        );
    }

    #[test]
    fn a_worker_asking_before_it_reports_its_long_test_started_also_leaves_the_next_long_one() {
        // The worker asks for what follows before it reports the start of the test it takes.
        let (mut sched, durations, _first, now) = long_tests_first_asked_by_one_of_three();
        let ahead = assigned(&sched.handle(Event::WantWork(w(0, 0)), now));
        assert!(
            ahead.iter().all(|l| durations[l.test as usize] < 1.0),
            "{ahead:?}"
        );
    }

    #[test]
    fn taken_back_work_goes_to_the_worker_waiting_for_it_never_to_a_parked_one() {
        // Worker (0,0) runs a long test and holds two more unstarted; (1,0) arrives and waits
        // for the last to be taken back; (2,0) arrives after it and finds nothing to take.
        let mut sched = known(&[5.0, 1.0, 1.0]);
        let now = Instant::now();
        let mut held = assigned(&sched.handle(Event::WantWork(w(0, 0)), now));
        while held.len() < 3 {
            held.extend(assigned(&sched.handle(Event::WantWork(w(0, 0)), now)));
        }
        sched.handle(
            Event::Started {
                lease: held[0].lease,
            },
            now,
        );
        let waiting = sched.handle(Event::WantWork(w(1, 0)), now);
        assert_eq!(
            waiting,
            vec![Action::Revoke {
                worker: w(0, 0),
                leases: vec![held[2].lease]
            }]
        );
        let parked = sched.handle(Event::WantWork(w(2, 0)), now);
        assert_eq!(parked, vec![Action::NoWork { worker: w(2, 0) }]);
        let given = sched.handle(
            Event::Revoked {
                worker: w(0, 0),
                leases: vec![held[2].lease],
            },
            now,
        );
        let to: Vec<WorkerKey> = given
            .iter()
            .filter_map(|a| match a {
                Action::Assign { worker, .. } => Some(*worker),
                _ => None,
            })
            .collect();
        assert_eq!(to, vec![w(1, 0)], "{given:?}");
        // A fault is different: the lost agent's running test goes to whoever is idle, parked
        // or not, so the run can end.
        let requeued = sched.handle(Event::AgentLost(0), now);
        assert!(
            requeued
                .iter()
                .any(|a| matches!(a, Action::Assign { worker, .. } if *worker == w(2, 0))),
            "{requeued:?}"
        );
    }

    #[test]
    fn an_agent_joining_mid_run_gets_work_and_the_run_still_ends_near_the_bound() {
        let durations: Vec<f64> = vec![0.2; 200];
        let all: Vec<WorkerKey> = (0..2)
            .map(|i| w(0, i))
            .chain((0..2).map(|i| w(1, i)))
            .collect();
        // The second agent joins after the first has taken its work and started on it.
        let mut sched = known(&durations);
        let joins_at = |agent: u32| Duration::from_secs_f64(if agent == 1 { 3.1 } else { 0.0 });
        let sim = simulate_with_joins(
            &mut sched,
            &all,
            joins_at,
            |_| 1.0,
            |t| durations[t as usize],
        );
        let first_late = sim
            .starts
            .iter()
            .find(|(_, k, _)| k.agent == 1)
            .map(|(_, _, at)| *at);
        assert_eq!(
            first_late,
            Some(Duration::from_secs_f64(3.1)),
            "the late agent starts the moment it joins"
        );
        assert!(
            sim.done.iter().any(|(_, k)| k.agent == 1),
            "the late agent ran tests"
        );
        // Two workers alone for 3.1 s, then four share what is left.
        let total: f64 = durations.iter().sum();
        let bound = 3.1 + (total - 2.0 * 3.1) / 4.0;
        assert!(
            sim.makespan.as_secs_f64() <= bound * 1.05,
            "{:?} against {bound}",
            sim.makespan
        );
    }

    #[test]
    fn the_longest_tests_go_to_the_fastest_machine() {
        // Ideal: 8 reference seconds over a total speed of 4, done in 2 s. A long test on the
        // slow machine alone would take 3 s.
        let mut durations = vec![3.0, 3.0];
        durations.extend(vec![0.1; 20]);
        let mut sched = known(&durations);
        sched.set_agent_speed(0, 1.0); // slow machine
        sched.set_agent_speed(1, 3.0); // fast machine
        let workers = [w(0, 0), w(1, 0)];
        let sim = simulate(
            &mut sched,
            &workers,
            |a| if a == 1 { 3.0 } else { 1.0 },
            |t| durations[t as usize],
        );
        for long in [0u32, 1] {
            let ran_on = sim.done.iter().find(|(t, _)| *t == long).unwrap().1;
            assert_eq!(ran_on.agent, 1, "long test {long} ran on the fast machine");
        }
    }

    #[test]
    fn observed_durations_refine_an_agents_speed() {
        let mut sched = known(&[1.0, 1.0, 1.0, 1.0]);
        sched.set_agent_speed(0, 1.0);
        let now = Instant::now();
        let leases = assigned(&sched.handle(Event::WantWork(w(0, 0)), now));
        for lease in leases {
            sched.handle(
                Event::Finished {
                    lease: lease.lease,
                    seconds: 0.5,
                },
                now,
            );
        }
        assert!(sched.agent_speed(0) > 1.1, "{}", sched.agent_speed(0));
    }

    #[test]
    fn a_test_paying_a_fixture_it_did_not_pay_before_does_not_make_the_machine_slow() {
        // History says 0.02 s; this time each test carried a 0.3 s module fixture.
        let mut sched = known(&[0.02; 20]);
        sched.set_agent_speed(0, 1.0);
        let now = Instant::now();
        let mut leases = Vec::new();
        while leases.len() < 20 {
            leases.extend(assigned(&sched.handle(Event::WantWork(w(0, 0)), now)));
        }
        for lease in leases {
            sched.handle(
                Event::Finished {
                    lease: lease.lease,
                    seconds: 0.32,
                },
                now,
            );
        }
        assert!(sched.agent_speed(0) >= 0.5, "{}", sched.agent_speed(0));
    }

    #[test]
    fn a_lost_agents_tests_go_to_waiting_workers_and_late_reports_are_superseded() {
        // A long test and two to follow it: the last is worth taking back while the long one
        // runs.
        let mut sched = known(&[2.0, 0.5, 0.5]);
        let now = Instant::now();
        let mut first = assigned(&sched.handle(Event::WantWork(w(1, 0)), now));
        while first.len() < 3 {
            first.extend(assigned(&sched.handle(Event::WantWork(w(1, 0)), now)));
        }
        sched.handle(
            Event::Started {
                lease: first[0].lease,
            },
            now,
        );
        // Another agent's worker finds the queue empty and waits for the unstarted test taken
        // back from the busy worker.
        let waiting = sched.handle(Event::WantWork(w(2, 0)), now);
        assert_eq!(
            waiting,
            vec![Action::Revoke {
                worker: w(1, 0),
                leases: vec![first[2].lease]
            }]
        );
        let requeued = sched.handle(Event::AgentLost(1), now);
        let mut again = assigned(&requeued);
        assert!(!again.is_empty(), "the waiting worker gets work at once");
        loop {
            let more = assigned(&sched.handle(Event::WantWork(w(2, 0)), now));
            if more.is_empty() {
                break;
            }
            again.extend(more);
        }
        let mut tests: Vec<u32> = again.iter().map(|l| l.test).collect();
        tests.sort_unstable();
        assert_eq!(
            tests,
            vec![0, 1, 2],
            "every test of the lost agent runs again"
        );
        assert!(matches!(
            sched.lease_status(first[0].lease),
            LeaseStatus::Superseded { test: 0 }
        ));
        // A late report from the lost agent changes nothing.
        assert!(sched
            .handle(
                Event::Finished {
                    lease: first[0].lease,
                    seconds: 0.1
                },
                now
            )
            .is_empty());
        assert_eq!(sched.finished_count(), 0);
        assert_eq!(sched.attempts(0), 2);
        for lease in &again {
            sched.handle(
                Event::Finished {
                    lease: lease.lease,
                    seconds: 0.1,
                },
                now,
            );
        }
        assert!(sched.is_done());
        assert_eq!(sched.lease_status(999), LeaseStatus::Unknown);
    }

    #[test]
    fn a_crashed_workers_unstarted_tests_run_elsewhere() {
        let mut sched = Scheduler::uniform(3);
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
                seconds: 0.0,
            },
            now,
        );
        let unstarted: Vec<u64> = held[1..].iter().map(|l| l.lease).collect();
        sched.handle(
            Event::WorkerExited {
                worker: w(0, 0),
                unstarted,
            },
            now,
        );
        let other = assigned(&sched.handle(Event::WantWork(w(0, 1)), now));
        let mut tests: Vec<u32> = other.iter().map(|l| l.test).collect();
        tests.sort_unstable();
        assert_eq!(tests, vec![1, 2]);
        // The dead worker asking again (a stale message) gets nothing.
        assert!(sched.handle(Event::WantWork(w(0, 0)), now).is_empty());
    }
}
