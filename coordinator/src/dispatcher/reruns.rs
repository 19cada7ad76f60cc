//! Reruns of failed tests (`run --reruns`, `--flaky-fails`) and the end of a test lost with too
//! many workers, on the dispatcher's side: which attempts count as failures, what a rerun does
//! to the run's counts, what is recorded for flaky and lost tests, and the error result that
//! names the agents a test took down.
//!
//! The scheduler decides (a failed attempt with reruns left goes back to the queue; the loss
//! past [`MAX_LOST_ATTEMPTS`] ends the test); this module turns its decisions into results,
//! counts and rows.

use std::collections::HashMap;

use fly_common::outcome::{final_outcome, Phase};
use fly_common::proto::{run_event, PhaseResult, TestResult};
use tracing::{info, warn};

use super::{CurrentAttempt, Dispatcher};
use crate::scheduler::{AgentSlot, Scheduler, WorkerKey, MAX_LOST_ATTEMPTS};
use crate::store::Write;

/// What a run keeps about reruns and lost tests beyond the scheduler's own bookkeeping.
#[derive(Debug, Default)]
pub(super) struct Reruns {
    /// How many times a failed test runs again (`--reruns`).
    pub limit: u32,
    /// A flaky test fails the run (`--flaky-fails`).
    pub flaky_fails: bool,
    /// Tests that failed and then passed on a rerun, so far.
    pub flaky: u32,
    /// Agents that left the run, as (hostname, agent id): a test lost with them may end after
    /// they are gone, and its result names them.
    pub departed: HashMap<AgentSlot, (String, String)>,
}

impl Reruns {
    /// Whether the run's flaky tests make it fail.
    pub fn fail_the_run(&self) -> bool {
        self.flaky_fails && self.flaky > 0
    }
}

/// Whether a finished attempt failed, as far as reruns go: its outcome is `failed` or `error`,
/// as pytest-rerunfailures reruns them (an attempt that finished without a single report is an
/// error too). `xfailed`, `skipped` and the rest are verdicts, not failures.
pub(super) fn attempt_failed(attempt: Option<&CurrentAttempt>) -> bool {
    let Some(attempt) = attempt.filter(|a| !a.reports.is_empty()) else {
        return true;
    };
    let phases = attempt
        .reports
        .iter()
        .filter_map(|r| Some((Phase::from_proto(r.phase)?, r.category.as_str())));
    matches!(final_outcome(phases).as_str(), "failed" | "error")
}

/// Whether a test with this final outcome is flaky: an earlier attempt failed and was run
/// again, and this one did not fail.
pub(super) fn is_flaky(scheduler: Option<&Scheduler>, test: u32, outcome: &str) -> bool {
    scheduler.is_some_and(|s| s.failed_attempts(test) > 0) && !matches!(outcome, "failed" | "error")
}

impl Dispatcher {
    /// The scheduler runs a failed test again: its attempt's reports are history (stored, and
    /// marked superseded once the test's result comes from another attempt), and the run
    /// counts one `rerun`, as pytest-rerunfailures' summary line does (`1 passed, 1 rerun`).
    pub(super) fn test_rerun(&mut self, run_id: &str, test: u32, lease: u64) {
        let Some(run) = self.runs.get_mut(run_id) else {
            return;
        };
        run.phases.remove(&lease);
        run.counts.add("rerun", 1);
        let nodeid = run
            .collection
            .as_ref()
            .and_then(|c| c.nodeid(test as usize))
            .unwrap_or_default();
        info!(run = %run_id, test = %nodeid, lease, "failed; running it again");
    }

    /// After a test's result is written: records whether it is flaky and where it was lost.
    pub(super) fn record_result_details(&mut self, run_id: &str, test: u32, flaky: bool) {
        let lost_on = self.lost_on_json(run_id, test);
        let Some(run) = self.runs.get_mut(run_id) else {
            return;
        };
        if flaky {
            run.reruns.flaky += 1;
        }
        if flaky || !lost_on.is_empty() {
            self.store.write(Write::TestResultDetails {
                run_id: run_id.to_string(),
                test_index: test,
                flaky,
                lost_on,
            });
        }
    }

    /// The scheduler gave up on a test lost with its worker more than [`MAX_LOST_ATTEMPTS`]
    /// times: it ends as an error whose report names every agent and worker it was lost on.
    pub(super) fn test_abandoned(
        &mut self,
        run_id: &str,
        test: u32,
        lease: u64,
        lost_on: &[WorkerKey],
    ) {
        let names: Vec<(String, String, u32)> = lost_on
            .iter()
            .map(|key| {
                let (host, id) = self.agent_name(run_id, key.agent);
                (host, id, key.worker)
            })
            .collect();
        let lost_json = self.lost_on_json(run_id, test);
        let Some(run) = self.runs.get_mut(run_id) else {
            return;
        };
        run.phases.remove(&lease);
        let Some(nodeid) = run
            .collection
            .as_ref()
            .and_then(|c| c.nodeid(test as usize))
            .map(str::to_string)
        else {
            return;
        };
        let (last_agent, last_worker) = names
            .last()
            .map(|(_, id, worker)| (id.clone(), *worker))
            .unwrap_or_default();
        let mut hosts: Vec<String> = Vec::new();
        for (host, id, _) in &names {
            let name = format!("{host} ({id})");
            if !hosts.contains(&name) {
                hosts.push(name);
            }
        }
        let message = format!(
            "lost with its worker {} times, on {}",
            names.len(),
            hosts.join(", ")
        );
        let mut longrepr = format!(
            "fly: the worker running this test was lost {} times (a test is requeued at most {} \
             times after such a loss), so it is not run again. The test may take its worker or \
             agent down (a crash, exhausted memory, a signal, a timeout of the connection).\n\
             Lost with:\n",
            names.len(),
            MAX_LOST_ATTEMPTS
        );
        for (n, (host, id, worker)) in names.iter().enumerate() {
            longrepr.push_str(&format!(
                "  attempt {}: agent {host} (id {id}), worker {worker}\n",
                n + 1
            ));
        }
        warn!(run = %run_id, test = %nodeid, %message, "test abandoned");
        run.counts.add("error", 1);
        let attempts = run
            .scheduler
            .as_ref()
            .map(|s| s.attempts(test))
            .unwrap_or(1);
        // No pytest report says why the test ended: an error at setup, as pytest reports a
        // test that never got to run, carries the explanation to the terminal and JUnit XML.
        let result = TestResult {
            test_index: test,
            nodeid: nodeid.clone(),
            outcome: "error".into(),
            duration: 0.0,
            agent_id: last_agent.clone(),
            worker: last_worker,
            phases: vec![PhaseResult {
                phase: Phase::Setup.to_proto() as i32,
                outcome: "failed".into(),
                category: "error".into(),
                longrepr,
                message,
                ..Default::default()
            }],
            attempts,
            ..Default::default()
        };
        self.store.write(Write::TestResult {
            run_id: run_id.to_string(),
            test_index: test,
            nodeid,
            outcome: "error".into(),
            duration: 0.0,
            attempts,
            lease,
            agent_id: last_agent,
            worker: last_worker,
        });
        self.store.write(Write::TestResultDetails {
            run_id: run_id.to_string(),
            test_index: test,
            flaky: false,
            lost_on: lost_json,
        });
        run.broadcast(run_event::Kind::Result(result));
        self.watch.test_finished("error");
    }

    /// An agent's hostname and id, whether it is still connected or has left the run.
    fn agent_name(&self, run_id: &str, slot: AgentSlot) -> (String, String) {
        if let Some(agent) = self.agents.get(&slot) {
            return (agent.hostname.clone(), agent.id.clone());
        }
        self.runs
            .get(run_id)
            .and_then(|run| run.reruns.departed.get(&slot).cloned())
            .unwrap_or_else(|| ("an unknown host".into(), format!("slot {slot}")))
    }

    /// The workers lost while running the test, as the JSON `results.lost_on` keeps; empty
    /// when none was.
    fn lost_on_json(&self, run_id: &str, test: u32) -> String {
        let Some(lost_on) = self
            .runs
            .get(run_id)
            .and_then(|run| run.scheduler.as_ref())
            .map(|s| s.lost_on(test))
            .filter(|l| !l.is_empty())
        else {
            return String::new();
        };
        let entries: Vec<serde_json::Value> = lost_on
            .iter()
            .map(|key| {
                let (hostname, agent_id) = self.agent_name(run_id, key.agent);
                serde_json::json!({
                    "agent_id": agent_id,
                    "hostname": hostname,
                    "worker": key.worker,
                })
            })
            .collect();
        serde_json::Value::Array(entries).to_string()
    }
}
