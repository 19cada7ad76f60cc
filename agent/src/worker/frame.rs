//! The agent <-> pytest worker wire format: length-prefixed JSON frames and their typed
//! messages (protocol version 1, written down in the worker protocol notes).
//!
//! Decoding is a pure function of the bytes so it can be fuzzed: whatever a worker (or a
//! plugin printing into the wrong place) sends, the result is a message or a `FrameError`.

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt};

/// The worker protocol version this agent speaks; the worker's hello must carry the same.
pub const PROTOCOL_VERSION: u32 = 1;

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
    /// A chunk of the collection: `(nodeid, file, 1-based line or 0)`.
    Collected {
        tests: Vec<(String, String, u32)>,
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
    Revoke {
        leases: Vec<u64>,
    },
    Shutdown,
}

/// Parses the body of one frame (without its length prefix).
pub fn decode_frame(body: &[u8]) -> Result<WorkerMessage, FrameError> {
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
        let collected =
            br#"{"type":"collected","tests":[["a.py::t","a.py",3]],"deselected":1,"done":true}"#;
        assert_eq!(
            decode_frame(collected).ok(),
            Some(WorkerMessage::Collected {
                tests: vec![("a.py::t".into(), "a.py".into(), 3)],
                deselected: 1,
                done: true
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
}
