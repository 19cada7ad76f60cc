//! `Shutdown`: the one way any part of the agent learns that it should stop.
//!
//! A signal handler (or the embedding `run --local`) flips a watch channel; every loop that
//! must stop selects on [`Shutdown::recv`]. A watch, not a broadcast, so a listener created
//! after the signal still sees it.

use tokio::sync::watch;

#[derive(Clone)]
pub struct Shutdown {
    rx: watch::Receiver<bool>,
}

/// Flips every [`Shutdown`] made from it.
pub struct ShutdownTrigger {
    tx: watch::Sender<bool>,
}

impl Shutdown {
    pub fn new() -> (ShutdownTrigger, Shutdown) {
        let (tx, rx) = watch::channel(false);
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
        *self.rx.borrow()
    }

    /// Resolves once shutdown has been asked for (at once if it already was).
    pub async fn recv(&mut self) {
        while !*self.rx.borrow_and_update() {
            if self.rx.changed().await.is_err() {
                // The trigger is gone without firing: nobody can ask any more.
                std::future::pending::<()>().await;
            }
        }
    }
}

impl ShutdownTrigger {
    pub fn trigger(&self) {
        let _ = self.tx.send(true);
    }
}
