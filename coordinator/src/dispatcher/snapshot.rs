//! Answers [`Input::Observe`](super::Input::Observe): an [`Observation`] of the dispatcher's
//! state for the dashboard and `/metrics`. A child module of the dispatcher so that it reads
//! run state directly; it copies per run and per worker, never per test (a worker's current
//! test is one node id looked up in the run's collection).

use tokio::sync::oneshot;

use super::{Dispatcher, Membership, RunPhase};
use crate::observe::{epoch_now, AgentNow, Observation, RunNow, TestNow, WorkerNow};

impl Dispatcher {
    pub(super) fn observe(&self, reply: oneshot::Sender<Observation>) {
        let _ = reply.send(self.observation());
    }

    fn observation(&self) -> Observation {
        let at = epoch_now();
        let runs = self
            .queue
            .iter()
            .filter_map(|id| self.runs.get(id))
            .filter(|run| run.phase != RunPhase::Finished)
            .map(|run| {
                let accepted: Vec<_> = run
                    .members
                    .iter()
                    .filter(|(_, m)| **m == Membership::Accepted)
                    .filter_map(|(slot, _)| self.agents.get(slot))
                    .collect();
                let collected = run.collection.as_ref().map_or(0, |c| c.len());
                let (finished, queued, running, remaining, capacity) = match &run.scheduler {
                    Some(s) => (
                        s.finished_count(),
                        s.queued_count(),
                        s.running_count(),
                        s.remaining_seconds(),
                        s.capacity(),
                    ),
                    // Collected but not scheduled yet (history loading): all of it waits.
                    None => (0, collected, 0, 0.0, 0.0),
                };
                // The same estimate the run's followers get.
                let eta_seconds = run
                    .scheduler
                    .as_ref()
                    .and_then(|s| s.eta_seconds(std::time::Instant::now()));
                RunNow {
                    id: run.id.clone(),
                    project: run.project.clone(),
                    phase: if run.phase == RunPhase::Collecting {
                        "collecting"
                    } else {
                        "running"
                    },
                    created_at: at - run.started.elapsed().as_secs_f64(),
                    collected: to_u32(collected),
                    finished: to_u32(finished),
                    queued: to_u32(queued),
                    running: to_u32(running),
                    counts: run.counts.ordered(),
                    agents: to_u32(accepted.len()),
                    workers: accepted.iter().map(|a| a.workers).sum(),
                    remaining_seconds: remaining,
                    capacity,
                    eta_seconds,
                    followers_behind: to_u32(run.followers.behind()),
                }
            })
            .collect();
        let agents = self
            .watch
            .agents()
            .into_iter()
            .map(|(slot, watched)| {
                let worker_states = (0..watched.agent.workers)
                    .map(|worker| WorkerNow {
                        worker,
                        test: watched.running.get(&worker).map(|r| TestNow {
                            run: r.run.clone(),
                            test_index: r.test,
                            lease: r.lease,
                            nodeid: self
                                .runs
                                .get(&r.run)
                                .and_then(|run| run.collection.as_ref())
                                .and_then(|c| c.nodeid(r.test as usize))
                                .map(str::to_string)
                                .unwrap_or_default(),
                            since: r.since,
                        }),
                    })
                    .collect();
                AgentNow {
                    run: self.agents.get(&slot).and_then(|a| a.run.clone()),
                    worker_states,
                    ..watched.agent.clone()
                }
            })
            .collect();
        Observation {
            at,
            runs,
            agents,
            metrics: self.watch.metrics().clone(),
        }
    }
}

fn to_u32(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}
