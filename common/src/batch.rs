//! How an agent folds its workers' events into `WorkerEvents` messages: as many as are ready,
//! up to a count and a size.
//!
//! The size bound is for the coordinator: every agent stream keeps a decode buffer as large as
//! the largest message it has carried, so with hundreds of agents, messages of a couple of
//! thousand reports (150 KB and more) would keep tens of megabytes of buffers alive there.

use prost::Message;

use crate::proto::WorkerEvent;

/// Events in one message at most.
pub const EVENT_BATCH: usize = 2_048;
/// Encoded bytes of the events in one message, at most (a larger single event goes alone).
pub const EVENT_BATCH_BYTES: usize = 32 * 1024;

/// Events waiting to be sent.
#[derive(Debug, Default)]
pub struct EventBatch {
    events: Vec<WorkerEvent>,
    bytes: usize,
}

impl EventBatch {
    pub fn push(&mut self, event: WorkerEvent) {
        self.bytes += event.encoded_len();
        self.events.push(event);
    }

    /// The batch should be sent before another event joins it.
    pub fn is_full(&self) -> bool {
        self.events.len() >= EVENT_BATCH || self.bytes >= EVENT_BATCH_BYTES
    }

    pub fn is_empty(&self) -> bool {
        self.events.is_empty()
    }

    pub fn len(&self) -> usize {
        self.events.len()
    }

    /// The events, in order, leaving the batch empty.
    pub fn take(&mut self) -> Vec<WorkerEvent> {
        self.bytes = 0;
        std::mem::take(&mut self.events)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::{worker_event, PhaseReport, WantWork};

    fn want(worker: u32) -> WorkerEvent {
        WorkerEvent {
            worker,
            kind: Some(worker_event::Kind::WantWork(WantWork {})),
        }
    }

    #[test]
    fn a_batch_is_full_at_its_count_or_its_size() {
        let mut batch = EventBatch::default();
        for worker in 0..EVENT_BATCH as u32 - 1 {
            batch.push(want(worker));
        }
        assert!(!batch.is_full());
        batch.push(want(0));
        assert!(batch.is_full());
        let events = batch.take();
        assert_eq!(events.len(), EVENT_BATCH);
        assert_eq!(events[5].worker, 5, "in order");
        assert!(batch.is_empty() && !batch.is_full());

        let report = |longrepr: &str| WorkerEvent {
            worker: 1,
            kind: Some(worker_event::Kind::Report(PhaseReport {
                longrepr: longrepr.to_string(),
                ..PhaseReport::default()
            })),
        };
        batch.push(report(&"x".repeat(EVENT_BATCH_BYTES / 2)));
        assert!(!batch.is_full());
        batch.push(report(&"y".repeat(EVENT_BATCH_BYTES / 2)));
        assert!(batch.is_full(), "full by size at {} events", batch.len());
        batch.take();
        batch.push(report(&"z".repeat(EVENT_BATCH_BYTES * 4)));
        assert!(batch.is_full(), "one large event goes alone");
    }
}
