//! What the coordinator is doing right now, as the dashboard and the metrics endpoint see it.
//!
//! The dispatcher owns all run state, so it is also what answers "what is happening": it
//! keeps a [`Watch`] (connected agents with their machines, the test each worker runs now, and
//! the counters and latency histograms of [`Metrics`]) up to date through one-line hooks, and
//! answers `Input::Observe` with an [`Observation`]: a small snapshot whose size grows with the
//! number of runs and workers, never with the number of tests. The HTTP side renders it as
//! JSON for the pages and as Prometheus text for `/metrics` ([`render_metrics`]).

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::AtomicU64;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use fly_common::proto::AgentHello;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use serde::Serialize;

use crate::report::Machine;
use crate::scheduler::AgentSlot;

/// The outcomes `fly_tests_finished_total` always exports (at 0 until one happens), so a
/// dashboard's rate() has a series from the start.
const OUTCOMES: [&str; 6] = ["passed", "failed", "error", "skipped", "xfailed", "xpassed"];

/// Default of `--target-seconds`: `fly_desired_workers` is the worker count that would finish
/// the queued work in this long.
pub const DEFAULT_TARGET_SECONDS: f64 = 300.0;

/// Unix epoch seconds now.
pub fn epoch_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

type Labels = Vec<(&'static str, String)>;

/// Counters and histograms the dispatcher updates as things happen. Cheap to clone: every
/// clone shares the same atomics, so the HTTP side encodes what the dispatcher counts without
/// asking it.
#[derive(Clone, Debug)]
pub struct Metrics {
    finished: Family<Labels, Counter>,
    dispatch_latency: Histogram,
    report_latency: Histogram,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let finished = Family::<Labels, Counter>::default();
        for outcome in OUTCOMES {
            let _ = finished.get_or_create(&vec![("outcome", outcome.to_string())]);
        }
        Metrics {
            finished,
            // In-process handling: from 10 µs to about 2.6 s.
            dispatch_latency: Histogram::new(exponential_buckets(0.000_01, 4.0, 10)),
            // Agent batching and the network: from 1 ms to about a minute.
            report_latency: Histogram::new(exponential_buckets(0.001, 2.5, 13)),
        }
    }

    /// A test got its final result.
    pub fn test_finished(&self, outcome: &str) {
        self.finished
            .get_or_create(&vec![("outcome", outcome.to_string())])
            .inc();
    }

    /// Tests finished with `outcome` so far.
    pub fn finished_count(&self, outcome: &str) -> u64 {
        self.finished
            .get_or_create(&vec![("outcome", outcome.to_string())])
            .get()
    }
}

/// A test a worker is running now.
#[derive(Debug, Clone, Serialize)]
pub struct TestNow {
    pub run: String,
    pub test_index: u32,
    pub lease: u64,
    pub nodeid: String,
    /// When it started, epoch seconds on the agent's clock.
    pub since: f64,
}

/// One worker of a connected agent.
#[derive(Debug, Clone, Serialize)]
pub struct WorkerNow {
    pub worker: u32,
    /// None while idle.
    pub test: Option<TestNow>,
}

/// A connected agent.
#[derive(Debug, Clone, Serialize)]
pub struct AgentNow {
    pub id: String,
    pub hostname: String,
    pub machine: Machine,
    pub labels: BTreeMap<String, String>,
    pub workers: u32,
    pub workdir: String,
    pub python: String,
    /// Epoch seconds.
    pub connected_at: f64,
    /// The run it serves now.
    pub run: Option<String>,
    pub worker_states: Vec<WorkerNow>,
}

/// A run in progress.
#[derive(Debug, Clone, Serialize)]
pub struct RunNow {
    pub id: String,
    pub project: String,
    /// `collecting` (no collection yet) or `running`.
    pub phase: &'static str,
    /// When it was submitted, epoch seconds.
    pub created_at: f64,
    pub collected: u32,
    pub finished: u32,
    /// Tests waiting for a worker.
    pub queued: u32,
    /// Tests a worker has started and not finished.
    pub running: u32,
    /// pytest's summary counts so far, in pytest's order.
    pub counts: Vec<(String, u32)>,
    pub agents: u32,
    pub workers: u32,
    /// Expected work left (queued and held by workers) in reference seconds, from history.
    pub remaining_seconds: f64,
    /// Combined speed of the run's live workers: reference seconds they do per second.
    pub capacity: f64,
    /// remaining / capacity; None while no worker serves the run or nothing is scheduled yet.
    pub eta_seconds: Option<f64>,
    /// Clients following the run that fell behind it: they get its results read back from
    /// the database.
    pub followers_behind: u32,
}

/// A snapshot of the coordinator.
#[derive(Debug, Clone, Serialize)]
pub struct Observation {
    /// When it was taken, epoch seconds.
    pub at: f64,
    /// Unfinished runs, oldest first.
    pub runs: Vec<RunNow>,
    /// Connected agents, in the order they joined.
    pub agents: Vec<AgentNow>,
    #[serde(skip)]
    pub metrics: Metrics,
}

impl Observation {
    /// Workers of connected agents running a test now.
    pub fn busy_workers(&self) -> usize {
        self.agents
            .iter()
            .flat_map(|a| &a.worker_states)
            .filter(|w| w.test.is_some())
            .count()
    }

    /// Workers of connected agents.
    pub fn workers(&self) -> usize {
        self.agents.iter().map(|a| a.workers as usize).sum()
    }

    /// The mean speed of the connected agents' workers (1.0 without any).
    pub fn mean_speed(&self) -> f64 {
        let (sum, n) = self
            .agents
            .iter()
            .map(|a| {
                (
                    a.machine.speed.unwrap_or(1.0) * f64::from(a.workers),
                    a.workers,
                )
            })
            .fold((0.0, 0u32), |(s, n), (x, w)| (s + x, n + w));
        if n > 0 && sum > 0.0 {
            sum / f64::from(n)
        } else {
            1.0
        }
    }

    /// See [`desired_workers`].
    pub fn desired_workers(&self, target_seconds: f64) -> u64 {
        let remaining: f64 = self.runs.iter().map(|r| r.remaining_seconds).sum();
        desired_workers(
            remaining,
            self.runs.len(),
            self.mean_speed(),
            target_seconds,
        )
    }
}

/// The worker count that would do `remaining` reference seconds of work in `target_seconds`
/// on workers of `speed`: an autoscaler's signal. At least 1 while any run is unfinished (a
/// run waiting for its first agent has no estimate yet, and needs a worker all the same), 0
/// when there is nothing to do.
pub fn desired_workers(remaining: f64, unfinished_runs: usize, speed: f64, target: f64) -> u64 {
    if unfinished_runs == 0 {
        return 0;
    }
    let speed = if speed.is_finite() && speed > 0.0 {
        speed
    } else {
        1.0
    };
    let target = if target.is_finite() && target > 0.0 {
        target
    } else {
        DEFAULT_TARGET_SECONDS
    };
    let needed = if remaining.is_finite() && remaining > 0.0 {
        (remaining / (speed * target)).ceil()
    } else {
        0.0
    };
    // A figure beyond any farm is still a number Prometheus can hold.
    (needed.min(1e9) as u64).max(1)
}

/// What the dispatcher knows of one worker's current test.
#[derive(Debug, Clone)]
pub struct Running {
    pub run: String,
    pub lease: u64,
    pub test: u32,
    pub since: f64,
}

/// A connected agent as the watch keeps it.
#[derive(Debug)]
pub struct Watched {
    /// Everything but `run` and `worker_states`, filled in by the snapshot.
    pub agent: AgentNow,
    pub running: HashMap<u32, Running>,
    joined: u64,
}

/// The dispatcher's record of what is going on that run state does not keep: agents'
/// machines, each worker's current test, and the metrics. Every hook is O(1).
#[derive(Debug, Default)]
pub struct Watch {
    agents: HashMap<AgentSlot, Watched>,
    joins: u64,
    metrics: Metrics,
    /// WantWork requests in the input being handled.
    wants: u32,
}

impl Watch {
    pub fn new() -> Watch {
        Watch::default()
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Connected agents in the order they joined.
    pub fn agents(&self) -> Vec<(AgentSlot, &Watched)> {
        let mut agents: Vec<(AgentSlot, &Watched)> =
            self.agents.iter().map(|(s, w)| (*s, w)).collect();
        agents.sort_by_key(|(_, w)| w.joined);
        agents
    }

    pub fn agent_joined(&mut self, slot: AgentSlot, hello: &AgentHello) {
        let topology = hello.topology.clone().unwrap_or_default();
        let machine = Machine {
            hostname: hello.hostname.clone(),
            os: topology.os,
            arch: topology.arch,
            logical_cpus: topology.logical_cpus,
            physical_cores: topology.physical_cores,
            performance_cores: topology.performance_cores,
            efficiency_cores: topology.efficiency_cores,
            threads_per_core: topology.threads_per_core,
            cpu_quota: (topology.cpu_quota > 0.0).then_some(topology.cpu_quota),
            memory_bytes: topology.memory_bytes,
            core_kind_source: topology.core_kind_source,
            auto_workers: Some(topology.auto_workers),
            speed: (hello.speed.is_finite() && hello.speed > 0.0).then_some(hello.speed),
            fly_version: hello.fly_version.clone(),
        };
        self.joins += 1;
        self.agents.insert(
            slot,
            Watched {
                agent: AgentNow {
                    id: hello.agent_id.clone(),
                    hostname: hello.hostname.clone(),
                    machine,
                    labels: hello
                        .labels
                        .iter()
                        .map(|(k, v)| (k.clone(), v.clone()))
                        .collect(),
                    workers: hello.workers.max(1),
                    workdir: hello.workdir.clone(),
                    python: hello.python.clone(),
                    connected_at: epoch_now(),
                    run: None,
                    worker_states: Vec::new(),
                },
                running: HashMap::new(),
                joined: self.joins,
            },
        );
    }

    pub fn agent_left(&mut self, slot: AgentSlot) {
        self.agents.remove(&slot);
    }

    /// A worker asked for work in the input being handled.
    pub fn want_work(&mut self) {
        self.wants += 1;
    }

    /// The input taken at `received` has been handled and its work sent: the dispatch latency
    /// of every WantWork it carried.
    pub fn dispatched(&mut self, received: Instant) {
        if self.wants > 0 {
            let seconds = received.elapsed().as_secs_f64();
            for _ in 0..self.wants {
                self.metrics.dispatch_latency.observe(seconds);
            }
            self.wants = 0;
        }
    }

    /// A phase report whose phase stopped at `stop` (epoch seconds on the agent's clock)
    /// arrived. Clock skew can make it negative; that counts as 0.
    pub fn report_received(&mut self, stop: f64) {
        if stop.is_finite() && stop > 0.0 {
            self.metrics
                .report_latency
                .observe((epoch_now() - stop).max(0.0));
        }
    }

    pub fn test_started(
        &mut self,
        slot: AgentSlot,
        worker: u32,
        run: &str,
        lease: u64,
        test: u32,
        at: f64,
    ) {
        if let Some(agent) = self.agents.get_mut(&slot) {
            agent.running.insert(
                worker,
                Running {
                    run: run.to_string(),
                    lease,
                    test,
                    since: if at.is_finite() && at > 0.0 {
                        at
                    } else {
                        epoch_now()
                    },
                },
            );
        }
    }

    /// The worker finished the lease's test (whether or not it still counts).
    pub fn test_ended(&mut self, slot: AgentSlot, worker: u32, lease: u64) {
        if let Some(agent) = self.agents.get_mut(&slot) {
            if agent.running.get(&worker).is_some_and(|r| r.lease == lease) {
                agent.running.remove(&worker);
            }
        }
    }

    /// A test got its final result.
    pub fn test_finished(&mut self, outcome: &str) {
        self.metrics.test_finished(outcome);
    }

    pub fn worker_exited(&mut self, slot: AgentSlot, worker: u32) {
        if let Some(agent) = self.agents.get_mut(&slot) {
            agent.running.remove(&worker);
        }
    }

    /// Whatever the run's workers were running is over.
    pub fn run_ended(&mut self, run: &str) {
        for agent in self.agents.values_mut() {
            agent.running.retain(|_, r| r.run != run);
        }
    }
}

/// The Prometheus exposition (OpenMetrics text) of an observation, with `fly_desired_workers`
/// for `target_seconds`. Gauges are computed from the snapshot; counters and histograms are
/// the dispatcher's own.
pub fn render_metrics(observation: &Observation, target_seconds: f64) -> String {
    let mut registry = Registry::default();
    let int_gauge = |value: usize| {
        let gauge = Gauge::<i64>::default();
        gauge.set(i64::try_from(value).unwrap_or(i64::MAX));
        gauge
    };
    let queued: usize = observation.runs.iter().map(|r| r.queued as usize).sum();
    let running: usize = observation.runs.iter().map(|r| r.running as usize).sum();
    let busy = observation.busy_workers();
    let workers = observation.workers();
    registry.register(
        "fly_tests_queued",
        "Tests of unfinished runs waiting for a worker",
        int_gauge(queued),
    );
    registry.register(
        "fly_tests_running",
        "Tests a worker has started and not finished",
        int_gauge(running),
    );
    registry.register(
        "fly_followers_behind",
        "Clients following a run that fell behind it and get its results read back from the \
         database",
        int_gauge(
            observation
                .runs
                .iter()
                .map(|r| r.followers_behind as usize)
                .sum(),
        ),
    );
    registry.register(
        "fly_runs_active",
        "Runs submitted and not finished",
        int_gauge(observation.runs.len()),
    );
    registry.register(
        "fly_agents",
        "Connected agents",
        int_gauge(observation.agents.len()),
    );
    registry.register(
        "fly_workers_busy",
        "Workers of connected agents running a test",
        int_gauge(busy),
    );
    registry.register(
        "fly_workers_idle",
        "Workers of connected agents not running a test",
        int_gauge(workers.saturating_sub(busy)),
    );
    registry.register(
        "fly_tests_finished",
        "Tests that got their final result, by outcome",
        observation.metrics.finished.clone(),
    );
    registry.register(
        "fly_dispatch_latency_seconds",
        "From taking a worker's request for work to sending its answer",
        observation.metrics.dispatch_latency.clone(),
    );
    registry.register(
        "fly_report_latency_seconds",
        "From a phase's end on the agent to its report reaching the coordinator",
        observation.metrics.report_latency.clone(),
    );
    let eta = Family::<Labels, Gauge<f64, AtomicU64>>::default();
    for run in &observation.runs {
        if let Some(seconds) = run.eta_seconds {
            eta.get_or_create(&vec![
                ("run", run.id.clone()),
                ("project", run.project.clone()),
            ])
            .set(seconds);
        }
    }
    registry.register(
        "fly_run_eta_seconds",
        "Estimated seconds until the run finishes: its remaining work from history over its \
         workers' speed",
        eta,
    );
    let desired = Gauge::<i64>::default();
    desired.set(i64::try_from(observation.desired_workers(target_seconds)).unwrap_or(i64::MAX));
    registry.register(
        "fly_desired_workers",
        format!(
            "Workers that would finish the queued work in {target_seconds} s, from history (an \
             autoscaling signal)"
        ),
        desired,
    );
    let mut text = String::new();
    // Writing into a String cannot fail.
    let _ = encode(&mut text, &registry);
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use fly_common::proto::Topology;

    fn hello(id: &str, workers: u32) -> AgentHello {
        AgentHello {
            agent_id: id.into(),
            hostname: format!("host-{id}"),
            workers,
            speed: 2.0,
            topology: Some(Topology {
                logical_cpus: 8,
                performance_cores: 4,
                os: "linux".into(),
                ..Topology::default()
            }),
            ..AgentHello::default()
        }
    }

    #[test]
    fn desired_workers_finishes_the_queue_by_the_target() {
        assert_eq!(desired_workers(0.0, 0, 1.0, 300.0), 0);
        // A run waiting for its first agent still wants one.
        assert_eq!(desired_workers(0.0, 1, 1.0, 300.0), 1);
        assert_eq!(desired_workers(600.0, 1, 1.0, 300.0), 2);
        assert_eq!(desired_workers(601.0, 1, 1.0, 300.0), 3);
        // Twice as fast workers: half as many.
        assert_eq!(desired_workers(1200.0, 2, 2.0, 300.0), 2);
        assert_eq!(desired_workers(f64::NAN, 1, 0.0, -1.0), 1);
    }

    #[test]
    fn the_watch_follows_each_workers_current_test() {
        let mut watch = Watch::new();
        watch.agent_joined(7, &hello("a", 2));
        watch.agent_joined(3, &hello("b", 1));
        let order: Vec<String> = watch
            .agents()
            .iter()
            .map(|(_, w)| w.agent.id.clone())
            .collect();
        assert_eq!(order, ["a", "b"], "in the order they joined");
        watch.test_started(7, 1, "run", 5, 42, 100.0);
        assert_eq!(watch.agents[&7].running[&1].test, 42);
        // A late finish of an older lease leaves the current test alone.
        watch.test_ended(7, 1, 4);
        assert!(watch.agents[&7].running.contains_key(&1));
        watch.test_ended(7, 1, 5);
        assert!(watch.agents[&7].running.is_empty());
        watch.test_started(7, 0, "run", 6, 1, 0.0);
        watch.run_ended("run");
        assert!(watch.agents[&7].running.is_empty());
        watch.agent_left(7);
        assert_eq!(watch.agents().len(), 1);
    }

    #[test]
    fn metrics_name_every_family() {
        let mut watch = Watch::new();
        watch.agent_joined(1, &hello("a", 2));
        watch.test_started(1, 0, "r1", 1, 0, 10.0);
        watch.test_finished("passed");
        watch.test_finished("passed");
        watch.want_work();
        watch.dispatched(Instant::now());
        watch.report_received(epoch_now() - 0.5);
        let mut agent = watch.agents()[0].1.agent.clone();
        agent.worker_states = vec![
            WorkerNow {
                worker: 0,
                test: Some(TestNow {
                    run: "r1".into(),
                    test_index: 0,
                    lease: 1,
                    nodeid: "t.py::x".into(),
                    since: 10.0,
                }),
            },
            WorkerNow {
                worker: 1,
                test: None,
            },
        ];
        let observation = Observation {
            at: epoch_now(),
            runs: vec![RunNow {
                id: "r1".into(),
                project: "p".into(),
                phase: "running",
                created_at: 1.0,
                collected: 10,
                finished: 2,
                queued: 7,
                running: 1,
                counts: vec![("passed".into(), 2)],
                agents: 1,
                workers: 2,
                remaining_seconds: 1200.0,
                capacity: 4.0,
                eta_seconds: Some(300.0),
                followers_behind: 1,
            }],
            agents: vec![agent],
            metrics: watch.metrics().clone(),
        };
        let text = render_metrics(&observation, 300.0);
        for line in [
            "fly_tests_queued 7",
            "fly_tests_running 1",
            "fly_followers_behind 1",
            "fly_agents 1",
            "fly_workers_busy 1",
            "fly_workers_idle 1",
            "fly_tests_finished_total{outcome=\"passed\"} 2",
            "fly_tests_finished_total{outcome=\"failed\"} 0",
            "fly_dispatch_latency_seconds_count 1",
            "fly_report_latency_seconds_count 1",
            "fly_run_eta_seconds{run=\"r1\",project=\"p\"} 300.0",
            // 1200 reference seconds on speed-2 workers in 300 s.
            "fly_desired_workers 2",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "no line {line:?} in\n{text}"
            );
        }
    }
}
