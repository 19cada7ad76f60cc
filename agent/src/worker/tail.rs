//! A bounded tail of a worker's stdout or stderr: the part worth showing when pytest stops
//! early or a worker crashes, without holding megabytes a test printed.

use std::sync::{Arc, Mutex};

use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::task::JoinHandle;
use tokio::time::{timeout_at, Instant};

/// How much of each stream is kept.
pub const TAIL_BYTES: usize = 64 * 1024;

/// The last `TAIL_BYTES` bytes written to a stream.
#[derive(Debug, Default)]
pub struct Tail {
    buf: Vec<u8>,
    cut: bool,
}

impl Tail {
    pub fn push(&mut self, data: &[u8]) {
        self.buf.extend_from_slice(data);
        // Trim only once the buffer is twice the limit, so trimming costs O(1) per byte.
        if self.buf.len() > 2 * TAIL_BYTES {
            let excess = self.buf.len() - TAIL_BYTES;
            self.buf.drain(..excess);
            self.cut = true;
        }
    }

    /// The kept text, starting at a line boundary when the start was cut off.
    pub fn text(&self) -> String {
        let start = self.buf.len().saturating_sub(TAIL_BYTES);
        let mut bytes = &self.buf[start..];
        if self.cut || start > 0 {
            if let Some(newline) = bytes.iter().position(|&b| b == b'\n') {
                bytes = &bytes[newline + 1..];
            }
        }
        String::from_utf8_lossy(bytes).into_owned()
    }

    /// The last `lines` lines of the kept text.
    pub fn last_lines(&self, lines: usize) -> String {
        let text = self.text();
        let trimmed = text.trim_end();
        let mut start = trimmed.len();
        for _ in 0..lines {
            match trimmed[..start].rfind('\n') {
                Some(i) => start = i,
                None => {
                    start = 0;
                    break;
                }
            }
        }
        trimmed[start..].trim_start_matches('\n').to_string()
    }
}

/// A process's stdout and stderr, drained continuously into bounded tails.
pub struct Output {
    pub stdout: Arc<Mutex<Tail>>,
    pub stderr: Arc<Mutex<Tail>>,
    drains: Vec<JoinHandle<()>>,
}

impl Output {
    /// Starts draining whichever of the two streams exist.
    pub fn drain<O, E>(stdout: Option<O>, stderr: Option<E>) -> Output
    where
        O: AsyncRead + Unpin + Send + 'static,
        E: AsyncRead + Unpin + Send + 'static,
    {
        let out = Arc::new(Mutex::new(Tail::default()));
        let err = Arc::new(Mutex::new(Tail::default()));
        let mut drains = Vec::new();
        if let Some(stream) = stdout {
            drains.push(tokio::spawn(drain(stream, out.clone())));
        }
        if let Some(stream) = stderr {
            drains.push(tokio::spawn(drain(stream, err.clone())));
        }
        Output {
            stdout: out,
            stderr: err,
            drains,
        }
    }

    /// Waits until both streams ended, or gives up on them at `deadline` (a process that
    /// escaped the group can hold a pipe open).
    pub async fn finish(&mut self, deadline: Instant) {
        for mut task in std::mem::take(&mut self.drains) {
            if timeout_at(deadline, &mut task).await.is_err() {
                task.abort();
            }
        }
    }

    /// What the process printed: the stdout tail, then the stderr tail.
    pub fn text(&self) -> String {
        let text = |tail: &Mutex<Tail>| tail.lock().map(|t| t.text()).unwrap_or_default();
        let stdout = text(&self.stdout);
        let stderr = text(&self.stderr);
        match (stdout.is_empty(), stderr.is_empty()) {
            (_, true) => stdout,
            (true, false) => stderr,
            (false, false) if stdout.ends_with('\n') => stdout + &stderr,
            (false, false) => stdout + "\n" + &stderr,
        }
    }
}

impl Drop for Output {
    fn drop(&mut self) {
        for task in &self.drains {
            task.abort();
        }
    }
}

/// Reads `stream` to its end into `tail`.
pub async fn drain(mut stream: impl AsyncRead + Unpin, tail: Arc<Mutex<Tail>>) {
    let mut chunk = vec![0u8; 16 * 1024];
    loop {
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if let Ok(mut tail) = tail.lock() {
                    tail.push(&chunk[..n]);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_only_the_end() {
        let mut tail = Tail::default();
        for i in 0..100_000 {
            tail.push(format!("line {i}\n").as_bytes());
        }
        let text = tail.text();
        assert!(text.len() <= TAIL_BYTES);
        assert!(text.starts_with("line "));
        assert!(text.ends_with("line 99999\n"));
        assert_eq!(tail.last_lines(2), "line 99998\nline 99999");
    }

    #[test]
    fn short_output_is_whole() {
        let mut tail = Tail::default();
        tail.push(b"one\ntwo\n");
        assert_eq!(tail.text(), "one\ntwo\n");
        assert_eq!(tail.last_lines(5), "one\ntwo");
    }
}
