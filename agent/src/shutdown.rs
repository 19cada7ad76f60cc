//! `Shutdown`: the one way any part of the agent learns that it should stop, and how urgently.
//!
//! A signal handler (or the embedding `run --local`) flips a watch channel; every loop that
//! must stop selects on [`Shutdown::recv`]. A watch, not a broadcast, so a listener created
//! after the signal still sees it. The first trigger asks for a drain (no new work, unstarted
//! work goes back, running tests may finish); the second means now ([`Shutdown::recv_now`]).

use tokio::sync::watch;

#[derive(Clone)]
pub struct Shutdown {
    /// How many times stopping was asked for: 0 not yet, 1 drain, 2 or more now.
    rx: watch::Receiver<u8>,
}

/// Flips every [`Shutdown`] made from it.
pub struct ShutdownTrigger {
    tx: watch::Sender<u8>,
}

impl Shutdown {
    pub fn new() -> (ShutdownTrigger, Shutdown) {
        let (tx, rx) = watch::channel(0);
        (ShutdownTrigger { tx }, Shutdown { rx })
    }

    /// A shutdown that never fires.
    pub fn never() -> Shutdown {
        let (trigger, shutdown) = Shutdown::new();
        // Keep the sender alive forever so `changed()` never errors out.
        std::mem::forget(trigger);
        shutdown
    }

    pub fn is_triggered(&self) -> bool {
        *self.rx.borrow() >= 1
    }

    /// Resolves once shutdown has been asked for (at once if it already was).
    pub async fn recv(&mut self) {
        self.reach(1).await;
    }

    /// Resolves once shutdown has been asked for a second time: stop at once.
    pub async fn recv_now(&mut self) {
        self.reach(2).await;
    }

    async fn reach(&mut self, level: u8) {
        while *self.rx.borrow_and_update() < level {
            if self.rx.changed().await.is_err() {
                // The trigger is gone without firing: nobody can ask any more.
                std::future::pending::<()>().await;
            }
        }
    }
}

impl ShutdownTrigger {
    /// The first call asks for a drain, any later one for an immediate stop.
    pub fn trigger(&self) {
        self.tx
            .send_modify(|level| *level = level.saturating_add(1));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_second_trigger_means_now() {
        let (trigger, mut shutdown) = Shutdown::new();
        assert!(!shutdown.is_triggered());
        trigger.trigger();
        shutdown.recv().await;
        assert!(shutdown.is_triggered());
        let mut now = shutdown.clone();
        let waiting = tokio::spawn(async move { now.recv_now().await });
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished());
        trigger.trigger();
        waiting.await.unwrap();
        // A listener made after both triggers sees them at once.
        shutdown.clone().recv_now().await;
    }
}
