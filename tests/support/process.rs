//! Child processes that can neither leak nor hang a test. Output is drained by threads as it
//! comes (so a chatty child never blocks on a full pipe) and can be read while the child runs;
//! every wait is bounded; dropping a [`Proc`] stops the child (SIGTERM, then SIGKILL), so a
//! failing assertion never leaves a coordinator or an agent behind.

use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use wait_timeout::ChildExt;

/// How long a child gets to exit after SIGTERM before it is killed.
const TERM_GRACE: Duration = Duration::from_secs(10);

/// How long to wait for the output drains after the child exited. A grandchild holding the
/// pipe open must not hang the test; what was read by then is kept.
const DRAIN_GRACE: Duration = Duration::from_secs(10);

/// One output stream of a child, collected by a background thread.
struct Drain {
    buffer: Arc<Mutex<Vec<u8>>>,
    done: Receiver<()>,
}

impl Drain {
    fn start(stream: impl Read + Send + 'static, lines: Option<Sender<String>>) -> Drain {
        let buffer = Arc::new(Mutex::new(Vec::new()));
        let (done_tx, done) = mpsc::channel();
        let sink = Arc::clone(&buffer);
        thread::spawn(move || {
            let mut reader = BufReader::new(stream);
            let mut line = Vec::new();
            loop {
                line.clear();
                match reader.read_until(b'\n', &mut line) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {
                        if let Some(lines) = &lines {
                            let _ = lines.send(String::from_utf8_lossy(&line).into_owned());
                        }
                        sink.lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .extend_from_slice(&line);
                    }
                }
            }
            let _ = done_tx.send(());
        });
        Drain { buffer, done }
    }

    fn text(&self) -> String {
        let bytes = self.buffer.lock().unwrap_or_else(|e| e.into_inner());
        String::from_utf8_lossy(&bytes).into_owned()
    }

    fn finish(&self) -> String {
        let _ = self.done.recv_timeout(DRAIN_GRACE);
        self.text()
    }
}

/// A running child process with its stdout and stderr being collected.
pub struct Proc {
    name: String,
    child: Child,
    stdout: Drain,
    stderr: Drain,
    stdout_lines: Receiver<String>,
    reaped: bool,
}

/// A child that exited (or was killed by [`Proc::wait`]'s hang guard).
#[derive(Debug, Clone)]
pub struct Finished {
    pub name: String,
    /// The exit code; `None` when a signal ended the child.
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl Finished {
    /// stdout then stderr, for assertions that do not care where a message went.
    pub fn output(&self) -> String {
        format!("{}\n{}", self.stdout, self.stderr)
    }

    /// The last non-empty line of stdout.
    pub fn last_stdout_line(&self) -> &str {
        self.stdout
            .lines()
            .rev()
            .find(|line| !line.trim().is_empty())
            .unwrap_or("")
    }

    /// A readable dump for assertion messages: the exit code and the tails of both streams.
    pub fn describe(&self) -> String {
        format!(
            "{} exited with {:?}\n--- stdout (tail) ---\n{}\n--- stderr (tail) ---\n{}",
            self.name,
            self.code,
            tail(&self.stdout, 6000),
            tail(&self.stderr, 6000)
        )
    }
}

/// The last `max` bytes of `text` (on a char boundary).
pub fn tail(text: &str, max: usize) -> &str {
    if text.len() <= max {
        return text;
    }
    let mut start = text.len() - max;
    while !text.is_char_boundary(start) {
        start += 1;
    }
    &text[start..]
}

impl Proc {
    /// Starts `command` with stdin from /dev/null (CI has no terminal) and both output streams
    /// collected. `name` labels the process in failure messages.
    pub fn spawn(name: &str, command: &mut Command) -> Proc {
        command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = command
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name} ({command:?}): {e}"));
        let (lines_tx, stdout_lines) = mpsc::channel();
        let stdout = Drain::start(
            child.stdout.take().expect("stdout was piped"),
            Some(lines_tx),
        );
        let stderr = Drain::start(child.stderr.take().expect("stderr was piped"), None);
        Proc {
            name: name.to_string(),
            child,
            stdout,
            stderr,
            stdout_lines,
            reaped: false,
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends the child `signal` (kill(2)): a user's Ctrl-C, a suspended terminal, a crash.
    pub fn signal(&self, signal: libc::c_int) {
        let Ok(pid) = libc::pid_t::try_from(self.pid()) else {
            return;
        };
        if !self.reaped {
            // SAFETY: kill(2) on our own child, not reaped yet, so its pid is still its own.
            unsafe {
                libc::kill(pid, signal);
            }
        }
    }

    /// Everything the child wrote to stdout so far.
    pub fn stdout_so_far(&self) -> String {
        self.stdout.text()
    }

    /// Everything the child wrote to stderr so far.
    pub fn stderr_so_far(&self) -> String {
        self.stderr.text()
    }

    /// Waits for the first stdout line for which `wanted` returns `Some`, failing the test when
    /// the child exits or `timeout` passes first.
    pub fn wait_for_stdout_line<T>(
        &mut self,
        timeout: Duration,
        mut wanted: impl FnMut(&str) -> Option<T>,
    ) -> T {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.stdout_lines.recv_timeout(left) {
                Ok(line) => {
                    if let Some(value) = wanted(line.trim_end()) {
                        return value;
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    panic!(
                        "{} printed no expected line within {timeout:?}\n{}",
                        self.name,
                        self.snapshot()
                    );
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    let status = self.child.wait_timeout(DRAIN_GRACE).ok().flatten();
                    panic!(
                        "{} closed its stdout (exit: {status:?}) before printing the expected line\n{}",
                        self.name,
                        self.snapshot()
                    );
                }
            }
        }
    }

    /// Waits for the child to exit, at most `timeout`; past it the child is killed and the test
    /// fails with its output.
    pub fn wait(mut self, timeout: Duration) -> Finished {
        let status = match self.child.wait_timeout(timeout) {
            Ok(status) => status,
            Err(e) => panic!("cannot wait for {}: {e}", self.name),
        };
        match status {
            Some(status) => {
                self.reaped = true;
                self.finished(status)
            }
            None => {
                self.stop();
                panic!(
                    "{} did not finish within {timeout:?} (hang guard); it was killed\n{}",
                    self.name,
                    self.snapshot()
                );
            }
        }
    }

    fn finished(&self, status: ExitStatus) -> Finished {
        Finished {
            name: self.name.clone(),
            code: status.code(),
            stdout: self.stdout.finish(),
            stderr: self.stderr.finish(),
        }
    }

    fn snapshot(&self) -> String {
        format!(
            "--- {} stdout (tail) ---\n{}\n--- {} stderr (tail) ---\n{}",
            self.name,
            tail(&self.stdout.text(), 6000),
            self.name,
            tail(&self.stderr.text(), 6000)
        )
    }

    /// Asks the child to stop (SIGTERM, so an agent can stop its workers), then kills it if it
    /// has not exited within the grace period, and reaps it.
    pub fn stop(&mut self) {
        if self.reaped {
            return;
        }
        if let Ok(None) = self.child.try_wait() {
            if let Ok(pid) = libc::pid_t::try_from(self.child.id()) {
                // SAFETY: kill(2) with a pid this struct spawned and has not reaped yet, so the
                // pid cannot have been recycled for an unrelated process.
                unsafe {
                    libc::kill(pid, libc::SIGTERM);
                }
            }
            if let Ok(None) = self.child.wait_timeout(TERM_GRACE) {
                let _ = self.child.kill();
            }
        }
        let _ = self.child.wait();
        self.reaped = true;
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop();
    }
}
