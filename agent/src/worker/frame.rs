//! The agent <-> pytest worker wire format: length-prefixed JSON frames and their typed
//! messages (protocol version 1 is written down in the worker protocol notes; version 2 adds
//! the xdist_group name to each collected test and the fork server: its hello says
//! `"forker":true`, and it sends `forked`, `reaped` and `forkfailed`; version 3 lets the agent
//! ask the fork server for a replacement worker (`fork`) and tell it that no more are coming
//! (`done`), and gives the workers a test timeout through their environment).
//!
//! Decoding is a pure function of the bytes so it can be fuzzed: whatever a worker (or a
//! plugin printing into the wrong place) sends, the result is a message or a `FrameError`.

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt};

/// The worker protocol version this agent speaks; the worker's hello must carry the same.
pub const PROTOCOL_VERSION: u32 = 3;

/// Largest frame either side accepts. The worker cuts captured output so reports stay below it.
pub const MAX_FRAME_BYTES: usize = 64 * 1024 * 1024;

/// Why a frame could not be read or understood.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("frame of {len} bytes is larger than the {max} byte limit", max = MAX_FRAME_BYTES)]
    TooLarge { len: usize },
    #[error("connection closed in the middle of a frame")]
    Truncated,
    #[error("reading a frame: {0}")]
    Io(#[source] std::io::Error),
    #[error("frame is not a valid worker message: {0}")]
    Json(#[source] serde_json::Error),
}

/// The first message on a connection: who is speaking.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Hello {
    pub protocol: u32,
    pub worker: u32,
    pub token: String,
    pub pid: u32,
    #[serde(default)]
    pub python: String,
    #[serde(default)]
    pub pytest: String,
    /// The fork server (which collects and forks the workers) rather than a worker.
    #[serde(default)]
    pub forker: bool,
}

/// One TestReport, as the worker sends it.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct ReportMessage {
    pub lease: u64,
    pub index: u32,
    pub phase: String,
    pub outcome: String,
    #[serde(default)]
    pub category: String,
    #[serde(default)]
    pub duration: f64,
    #[serde(default)]
    pub start: f64,
    #[serde(default)]
    pub stop: f64,
    #[serde(default)]
    pub longrepr: String,
    #[serde(default)]
    pub message: String,
    /// `(name, text)` pairs such as ("Captured stdout call", "...").
    #[serde(default)]
    pub sections: Vec<(String, String)>,
}

/// Everything a worker may send.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum WorkerMessage {
    Hello(Hello),
    /// A chunk of the collection: `(nodeid, file, 1-based line or 0, xdist_group name or "")`.
    Collected {
        tests: Vec<(String, String, u32, String)>,
        deselected: u32,
        done: bool,
    },
    Start {
        lease: u64,
        index: u32,
        /// Unix epoch seconds on the worker's clock.
        #[serde(default)]
        at: f64,
    },
    Report(ReportMessage),
    Finished {
        lease: u64,
        index: u32,
    },
    Want,
    Revoked {
        leases: Vec<u64>,
    },
    Exited {
        exit_code: i32,
    },
    /// Fork server only: it forked this worker as process `pid` (also its process group).
    Forked {
        worker: u32,
        pid: i32,
    },
    /// Fork server only: the worker ended; `status` is the raw wait status from waitpid.
    Reaped {
        worker: u32,
        status: i32,
    },
    /// Fork server only: this worker could not be forked.
    ForkFailed {
        worker: u32,
        error: String,
    },
}

/// Everything the agent may send to a worker.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum AgentMessage {
    /// Append `(lease, test index)` pairs to the worker's queue.
    Run {
        tests: Vec<(u64, u32)>,
    },
    Nomore,
    /// Give back those of `leases` not started. Without `all`, the worker keeps the test it
    /// gave the test it runs (or ran last) as pytest's `nextitem`: pytest kept the fixtures
    /// they share set up for it. A draining worker gives back everything.
    Revoke {
        leases: Vec<u64>,
        all: bool,
    },
    Shutdown,
    /// Fork server only: fork worker `worker` (a new id) as `PYTEST_XDIST_WORKER=gw<slot>`,
    /// its stdout and stderr going to the agent's spare pipe pair number `output`.
    Fork {
        worker: u32,
        slot: u32,
        output: u32,
    },
    /// Fork server only: no more forks are coming; leave once every worker has ended.
    Done,
}

/// The fields of `start` and `finished`, for decoding them without the enum.
#[derive(Deserialize)]
struct TestFields {
    lease: u64,
    index: u32,
    #[serde(default)]
    at: f64,
}

/// Parses the body of one frame (without its length prefix).
pub fn decode_frame(body: &[u8]) -> Result<WorkerMessage, FrameError> {
    // Serde decodes an internally tagged enum by first copying the whole object into a
    // generic tree. The worker writes the tag first, so the messages every test sends are
    // decoded straight into their fields instead (the tag is then an ignored field).
    if body.starts_with(br#"{"type":"report","#) {
        return serde_json::from_slice(body)
            .map(WorkerMessage::Report)
            .map_err(FrameError::Json);
    }
    if body.starts_with(br#"{"type":"start","#) {
        let TestFields { lease, index, at } =
            serde_json::from_slice(body).map_err(FrameError::Json)?;
        return Ok(WorkerMessage::Start { lease, index, at });
    }
    if body.starts_with(br#"{"type":"finished","#) {
        let TestFields { lease, index, .. } =
            serde_json::from_slice(body).map_err(FrameError::Json)?;
        return Ok(WorkerMessage::Finished { lease, index });
    }
    serde_json::from_slice(body).map_err(FrameError::Json)
}

/// Appends one framed message (length prefix and JSON body) to `out`.
pub fn encode_frame(message: &AgentMessage, out: &mut Vec<u8>) {
    let start = out.len();
    out.extend_from_slice(&[0; 4]);
    // Serializing these plain enums into a Vec cannot fail (no maps with non-string keys, no
    // failing Serialize impls); should it ever, the frame is left empty rather than panicking.
    if serde_json::to_writer(&mut *out, message).is_err() {
        out.truncate(start);
        return;
    }
    let len = (out.len() - start - 4) as u32;
    out[start..start + 4].copy_from_slice(&len.to_be_bytes());
}

/// Reads frames from a stream in batches: whatever arrived together is decoded together.
///
/// Unlike `read_frame`, waiting for the next batch is cancel-safe (bytes read so far stay in
/// the reader's buffer), so it can be one branch of a `select!`.
pub struct FrameReader<R> {
    stream: R,
    buf: Vec<u8>,
    /// Where the first unread frame starts in `buf`.
    start: usize,
    /// The stream ended, or a frame could not be read: nothing more comes.
    done: bool,
    /// A frame could not be read (or the stream broke): nothing after it can be trusted.
    failed: bool,
    /// Bytes read from the stream so far.
    received: u64,
    /// A partial frame at the end of the stream waits for [`FrameReader::finish`] instead of
    /// being reported as truncated at once.
    defer_truncation: bool,
    /// [`FrameReader::finish`] was called.
    finished: bool,
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    pub fn new(stream: R) -> FrameReader<R> {
        FrameReader {
            stream,
            buf: Vec::with_capacity(64 * 1024),
            start: 0,
            done: false,
            failed: false,
            received: 0,
            defer_truncation: false,
            finished: false,
        }
    }

    /// Like `new`, for a stream whose end may be continued from elsewhere: a worker's log of
    /// the frames it had not sent yet when it died. A partial frame at the end of the stream is
    /// left for [`FrameReader::finish`] rather than reported as truncated.
    pub fn with_continuation(stream: R) -> FrameReader<R> {
        let mut reader = FrameReader::new(stream);
        reader.defer_truncation = true;
        reader
    }

    /// Bytes read from the stream so far, whole frames or not.
    pub fn received(&self) -> u64 {
        self.received
    }

    /// A frame could not be read, or the stream broke: the bytes received no longer line up
    /// with what the other side wrote.
    pub fn failed(&self) -> bool {
        self.failed
    }

    /// Ends the stream here: decodes the frames `tail` (the bytes that followed the last one
    /// received) completes or holds, and reports a frame still partial as truncated. Nothing
    /// comes after a failed frame, and nothing after the first call.
    pub fn finish(&mut self, tail: &[u8]) -> Vec<Result<WorkerMessage, FrameError>> {
        if self.finished || self.failed {
            self.finished = true;
            self.done = true;
            return Vec::new();
        }
        self.finished = true;
        self.buf.extend_from_slice(tail);
        self.done = false;
        let mut batch = self.take_frames();
        self.done = true;
        if !self.failed && self.buf.len() > self.start {
            self.failed = true;
            batch.push(Err(FrameError::Truncated));
        }
        batch
    }

    /// [`FrameReader::finish`] was called.
    pub fn is_finished(&self) -> bool {
        self.finished
    }

    /// The next frames, at least one; a bad frame ends the batch and the stream. None at the
    /// end of the stream.
    pub async fn next_batch(&mut self) -> Option<Vec<Result<WorkerMessage, FrameError>>> {
        loop {
            let batch = self.take_frames();
            if !batch.is_empty() {
                return Some(batch);
            }
            if self.done {
                return None;
            }
            if self.start > 0 {
                self.buf.drain(..self.start);
                self.start = 0;
            }
            if self.buf.capacity() - self.buf.len() < 16 * 1024 {
                self.buf.reserve(64 * 1024);
            }
            match self.stream.read_buf(&mut self.buf).await {
                Ok(0) => {
                    self.done = true;
                    if self.buf.len() > self.start && !self.defer_truncation {
                        self.failed = true;
                        return Some(vec![Err(FrameError::Truncated)]);
                    }
                }
                Ok(n) => self.received += n as u64,
                Err(error) => {
                    self.done = true;
                    self.failed = true;
                    return Some(vec![Err(FrameError::Io(error))]);
                }
            }
        }
    }

    /// Decodes every whole frame in the buffer.
    fn take_frames(&mut self) -> Vec<Result<WorkerMessage, FrameError>> {
        let mut batch = Vec::new();
        while !self.done {
            let unread = &self.buf[self.start..];
            let Some(header) = unread.get(..4) else { break };
            let len = u32::from_be_bytes([header[0], header[1], header[2], header[3]]) as usize;
            if len > MAX_FRAME_BYTES {
                self.done = true;
                self.failed = true;
                batch.push(Err(FrameError::TooLarge { len }));
                break;
            }
            let Some(body) = unread.get(4..4 + len) else {
                // Make room for the whole frame at once rather than growing step by step.
                self.buf.reserve(4 + len);
                break;
            };
            let frame = decode_frame(body);
            self.start += 4 + len;
            if frame.is_err() {
                self.done = true;
                self.failed = true;
            }
            batch.push(frame);
        }
        batch
    }
}

/// Reads the body of the next frame. `Ok(None)` is a clean end of stream between frames.
pub async fn read_frame<R: AsyncRead + Unpin>(
    reader: &mut R,
) -> Result<Option<Vec<u8>>, FrameError> {
    let mut header = [0u8; 4];
    let mut filled = 0;
    while filled < header.len() {
        let n = reader
            .read(&mut header[filled..])
            .await
            .map_err(FrameError::Io)?;
        if n == 0 {
            return if filled == 0 {
                Ok(None)
            } else {
                Err(FrameError::Truncated)
            };
        }
        filled += n;
    }
    let len = u32::from_be_bytes(header) as usize;
    if len > MAX_FRAME_BYTES {
        return Err(FrameError::TooLarge { len });
    }
    let mut body = vec![0u8; len];
    match reader.read_exact(&mut body).await {
        Ok(_) => Ok(Some(body)),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Err(FrameError::Truncated),
        Err(e) => Err(FrameError::Io(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_every_message_kind() {
        let hello = br#"{"type":"hello","protocol":1,"worker":2,"token":"t","pid":7,"python":"3.11.7","pytest":"8.4.2"}"#;
        assert!(matches!(
            decode_frame(hello),
            Ok(WorkerMessage::Hello(Hello { worker: 2, .. }))
        ));
        let collected = br#"{"type":"collected","tests":[["a.py::t","a.py",3,"db"]],"deselected":1,"done":true}"#;
        assert_eq!(
            decode_frame(collected).ok(),
            Some(WorkerMessage::Collected {
                tests: vec![("a.py::t".into(), "a.py".into(), 3, "db".into())],
                deselected: 1,
                done: true
            })
        );
        assert_eq!(
            decode_frame(br#"{"type":"reaped","worker":1,"status":2816}"#).ok(),
            Some(WorkerMessage::Reaped {
                worker: 1,
                status: 2816
            })
        );
        assert_eq!(
            decode_frame(br#"{"type":"forkfailed","worker":0,"error":"no memory"}"#).ok(),
            Some(WorkerMessage::ForkFailed {
                worker: 0,
                error: "no memory".into()
            })
        );
        assert_eq!(
            decode_frame(br#"{"type":"want"}"#).ok(),
            Some(WorkerMessage::Want)
        );
        let report = br#"{"type":"report","lease":5,"index":0,"phase":"call","outcome":"failed","category":"failed","duration":0.5,"start":1.0,"stop":1.5,"longrepr":"x","message":"m","sections":[["Captured stdout call","hi"]],"future_field":1}"#;
        match decode_frame(report) {
            Ok(WorkerMessage::Report(r)) => {
                assert_eq!(r.lease, 5);
                assert_eq!(
                    r.sections,
                    vec![("Captured stdout call".into(), "hi".into())]
                );
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn refuses_garbage_without_panicking() {
        for body in [
            &b""[..],
            b"not json",
            b"[]",
            br#"{"type":"launch"}"#,
            br#"{"type":"start","lease":-1,"index":0}"#,
            br#"{"type":"collected","tests":[["a"]],"deselected":0,"done":true}"#,
            br#"{"type":"collected","tests":[["a","a.py",1]],"deselected":0,"done":true}"#,
            b"\xff\xfe",
        ] {
            assert!(decode_frame(body).is_err(), "{body:?} was accepted");
        }
    }

    #[test]
    fn encodes_with_a_length_prefix() {
        let mut out = Vec::new();
        encode_frame(
            &AgentMessage::Run {
                tests: vec![(1, 2)],
            },
            &mut out,
        );
        let body = br#"{"type":"run","tests":[[1,2]]}"#;
        assert_eq!(&out[..4], &(body.len() as u32).to_be_bytes());
        assert_eq!(&out[4..], body);

        let mut out = Vec::new();
        encode_frame(
            &AgentMessage::Fork {
                worker: 3,
                slot: 1,
                output: 4,
            },
            &mut out,
        );
        encode_frame(&AgentMessage::Done, &mut out);
        let fork = br#"{"type":"fork","worker":3,"slot":1,"output":4}"#;
        assert_eq!(&out[4..4 + fork.len()], fork);
        assert_eq!(&out[8 + fork.len()..], br#"{"type":"done"}"#);
    }

    #[test]
    fn the_quick_decoding_agrees_with_the_enum() {
        let report = br#"{"type":"report","lease":5,"index":0,"phase":"call","outcome":"passed","category":"passed","duration":0.5,"start":1.0,"stop":1.5,"longrepr":"","message":"","sections":[]}"#;
        let start = br#"{"type":"start","lease":5,"index":7,"at":1.25}"#;
        let finished = br#"{"type":"finished","lease":5,"index":7}"#;
        for body in [&report[..], start, finished] {
            let generic: Result<WorkerMessage, _> = serde_json::from_slice(body);
            assert_eq!(decode_frame(body).ok(), generic.ok());
        }
        assert!(decode_frame(br#"{"type":"start","lease":-5,"index":7}"#).is_err());
        assert!(decode_frame(br#"{"type":"finished","lease":5}"#).is_err());
    }

    fn framed(bodies: &[&[u8]]) -> Vec<u8> {
        let mut data = Vec::new();
        for body in bodies {
            data.extend_from_slice(&(body.len() as u32).to_be_bytes());
            data.extend_from_slice(body);
        }
        data
    }

    #[tokio::test]
    async fn a_frame_reader_batches_what_arrived_together() {
        let want = br#"{"type":"want"}"#;
        let exited = br#"{"type":"exited","exit_code":0}"#;
        let data = framed(&[want, want, exited]);
        // Arrives in two pieces, split inside the second frame.
        let (first, second) = data.split_at(25);
        let stream = tokio_test_stream(vec![first.to_vec(), second.to_vec()]);
        let mut reader = FrameReader::new(stream);
        let batch = reader.next_batch().await.unwrap();
        assert_eq!(batch.len(), 1);
        let batch = reader.next_batch().await.unwrap();
        assert_eq!(batch.len(), 2);
        assert!(matches!(
            batch[1],
            Ok(WorkerMessage::Exited { exit_code: 0 })
        ));
        assert!(reader.next_batch().await.is_none());

        let mut cut = FrameReader::new(&[0u8, 0, 0, 9, b'x'][..]);
        assert!(matches!(
            cut.next_batch().await.unwrap()[..],
            [Err(FrameError::Truncated)]
        ));
        let big = ((MAX_FRAME_BYTES + 1) as u32).to_be_bytes();
        let mut data = framed(&[want]);
        data.extend_from_slice(&big);
        let mut oversized = FrameReader::new(&data[..]);
        let batch = oversized.next_batch().await.unwrap();
        assert!(matches!(
            batch[..],
            [Ok(WorkerMessage::Want), Err(FrameError::TooLarge { .. })]
        ));
        assert!(oversized.next_batch().await.is_none());
    }

    /// A stream that yields `pieces` one read at a time.
    fn tokio_test_stream(pieces: Vec<Vec<u8>>) -> impl AsyncRead + Unpin {
        let (mut tx, rx) = tokio::io::duplex(1024);
        tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            for piece in pieces {
                tx.write_all(&piece).await.unwrap();
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
        });
        rx
    }

    #[tokio::test]
    async fn reads_frames_and_refuses_oversized_ones() {
        let mut data = Vec::new();
        data.extend_from_slice(&3u32.to_be_bytes());
        data.extend_from_slice(b"abc");
        let mut reader = &data[..];
        assert_eq!(
            read_frame(&mut reader).await.ok().flatten(),
            Some(b"abc".to_vec())
        );
        assert!(matches!(read_frame(&mut reader).await, Ok(None)));

        let big = ((MAX_FRAME_BYTES + 1) as u32).to_be_bytes();
        assert!(matches!(
            read_frame(&mut &big[..]).await,
            Err(FrameError::TooLarge { .. })
        ));
        let cut = [0u8, 0, 0, 9, b'x'];
        assert!(matches!(
            read_frame(&mut &cut[..]).await,
            Err(FrameError::Truncated)
        ));
    }

    #[tokio::test]
    async fn a_stream_cut_in_a_frame_is_continued_by_its_tail() {
        let start = framed(&[br#"{"type":"start","lease":1,"index":0,"at":1.5}"#]);
        let finished = framed(&[br#"{"type":"finished","lease":1,"index":0}"#]);
        // The stream breaks off three bytes into `finished`; the rest comes from elsewhere.
        let mut stream = start.clone();
        stream.extend_from_slice(&finished[..3]);
        let mut reader = FrameReader::with_continuation(&stream[..]);
        let batch = reader.next_batch().await.unwrap();
        assert!(matches!(
            batch[..],
            [Ok(WorkerMessage::Start { lease: 1, .. })]
        ));
        assert!(reader.next_batch().await.is_none());
        assert_eq!(reader.received(), stream.len() as u64);
        let rest = reader.finish(&finished[3..]);
        assert!(matches!(
            rest[..],
            [Ok(WorkerMessage::Finished { lease: 1, index: 0 })]
        ));
        assert!(!reader.failed());
        // Finished once: a second tail changes nothing.
        assert!(reader.finish(&finished).is_empty());

        // Without a tail the partial frame is truncated, as `new` reports it at once.
        let mut reader = FrameReader::with_continuation(&stream[..]);
        reader.next_batch().await.unwrap();
        assert!(reader.next_batch().await.is_none());
        assert!(matches!(
            reader.finish(&[])[..],
            [Err(FrameError::Truncated)]
        ));
        let mut plain = FrameReader::new(&stream[..]);
        plain.next_batch().await.unwrap();
        let end = plain.next_batch().await.unwrap();
        assert!(matches!(end[..], [Err(FrameError::Truncated)]));
        assert!(plain.failed());
    }
}
