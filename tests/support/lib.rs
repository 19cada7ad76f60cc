//! Shared helpers for fly's end-to-end tests: where the binaries and the fixture project are,
//! child processes that can neither leak nor hang a test, the plain-pytest oracle, readers for
//! fly's SQLite database and for the fixture project's bookkeeping logs, and the assertions
//! that compare a fly run with plain pytest on the same project.

pub mod auth;
pub mod check;
pub mod db;
pub mod fixture_log;
pub mod fly;
pub mod gate;
pub mod netns;
pub mod paths;
pub mod process;
pub mod pytest;
pub mod sandbox;

use std::time::{Duration, Instant};

/// Hang guard for anything a test waits on: a run, a process start, a row in the database.
/// Generous on purpose; it only turns a hang into a failure and is never a timing assertion.
pub const HANG_GUARD: Duration = Duration::from_secs(120);

/// Polls `ready` every 100 ms until it returns `Some`, or gives up with `None` once `timeout`
/// has passed (the caller fails the test with whatever context it has).
pub fn poll_until<T>(timeout: Duration, mut ready: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = ready() {
            return Some(value);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}
