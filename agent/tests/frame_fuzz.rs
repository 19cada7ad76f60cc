//! What the agent reads from a pytest worker, fuzzed on stable Rust (the libFuzzer target
//! `fuzz/fuzz_targets/worker_frame.rs` does the same without a case limit, on nightly). A
//! worker, or a plugin writing to the wrong place, can send anything: every body decodes to a
//! message or a typed `FrameError`, the quick decoding of the per-test messages agrees with the
//! generic one, and a stream of frames with damage anywhere yields its whole frames in order,
//! then at most one error, then its end.

use fly_agent::worker::frame::{decode_frame, FrameError, FrameReader, WorkerMessage};
use proptest::collection::vec;
use proptest::prelude::*;
use serde_json::Value;

/// A JSON value of any type, for fields that may get the wrong one.
fn any_json() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<f64>().prop_map(Value::from),
        vec(any::<char>(), 0..8).prop_map(|c| Value::from(String::from_iter(c))),
        vec(0u32..9, 0..4).prop_map(Value::from),
    ]
}

fn text() -> impl Strategy<Value = Value> {
    prop_oneof![
        prop::sample::select(vec![
            "",
            "call",
            "passed",
            "failed",
            "test_a.py::t[x::y]",
            "é✓日本"
        ])
        .prop_map(Value::from),
        vec(any::<char>(), 0..16).prop_map(|c| Value::from(String::from_iter(c))),
    ]
}

fn number() -> impl Strategy<Value = Value> {
    prop_oneof![
        8 => (0u64..1000).prop_map(Value::from),
        1 => any::<u64>().prop_map(Value::from),
        1 => any_json(),
    ]
}

fn seconds() -> impl Strategy<Value = Value> {
    prop_oneof![
        8 => (0.0f64..1e9).prop_map(Value::from),
        1 => any_json(),
    ]
}

fn collected_tests() -> impl Strategy<Value = Value> {
    prop_oneof![
        8 => vec((text(), text(), number(), text()), 0..4).prop_map(|tests| {
            Value::from(
                tests
                    .into_iter()
                    .map(|(id, file, line, group)| Value::from(vec![id, file, line, group]))
                    .collect::<Vec<_>>(),
            )
        }),
        1 => any_json(),
    ]
}

/// A worker message as the worker writes it: the type tag first, then its fields (mostly of
/// the right type; sometimes one is missing, extra or of another type).
fn worker_frame() -> impl Strategy<Value = Vec<u8>> {
    let kind = prop::sample::select(vec![
        "hello",
        "collected",
        "start",
        "report",
        "finished",
        "want",
        "revoked",
        "exited",
        "forked",
        "reaped",
        "forkfailed",
        "launch",
    ]);
    let fields = (
        number(),
        number(),
        text(),
        text(),
        text(),
        seconds(),
        seconds(),
        collected_tests(),
        any::<bool>(),
        vec(number(), 0..4),
        vec((text(), text()), 0..3),
    );
    (
        kind,
        fields,
        any::<bool>(),
        proptest::option::of((text(), any_json())),
    )
        .prop_map(|(kind, f, drop_one, extra)| {
            let (a, b, s1, s2, s3, t1, t2, tests, flag, list, sections) = f;
            let sections: Vec<Value> = sections
                .into_iter()
                .map(|(name, text)| Value::from(vec![name, text]))
                .collect();
            let pairs: Vec<(&str, Value)> = match kind {
                "hello" => vec![
                    ("protocol", a),
                    ("worker", b),
                    ("token", s1),
                    ("pid", Value::from(4242)),
                    ("python", s2),
                    ("pytest", s3),
                    ("forker", Value::from(flag)),
                ],
                "collected" => vec![
                    ("tests", tests),
                    ("deselected", a),
                    ("done", Value::from(flag)),
                ],
                "start" => vec![("lease", a), ("index", b), ("at", t1)],
                "report" => vec![
                    ("lease", a),
                    ("index", b),
                    ("phase", s1),
                    ("outcome", s2),
                    ("category", s3),
                    ("duration", t1),
                    ("start", t2.clone()),
                    ("stop", t2),
                    ("longrepr", Value::from("Traceback ...")),
                    ("message", Value::from("")),
                    ("sections", Value::from(sections)),
                ],
                "finished" => vec![("lease", a), ("index", b)],
                "revoked" => vec![("leases", Value::from(list))],
                "exited" => vec![("exit_code", a)],
                "forked" => vec![("worker", a), ("pid", b)],
                "reaped" => vec![("worker", a), ("status", b)],
                "forkfailed" => vec![("worker", a), ("error", s1)],
                _ => vec![("anything", a)],
            };
            let mut pairs: Vec<(String, Value)> = pairs
                .into_iter()
                .skip(usize::from(drop_one))
                .map(|(name, value)| (name.to_string(), value))
                .collect();
            if let Some((name, value)) = extra {
                pairs.push((name.as_str().unwrap_or("extra").to_string(), value));
            }
            let mut body = format!("{{\"type\":{}", Value::from(kind));
            for (name, value) in pairs {
                body.push(',');
                body.push_str(&Value::from(name).to_string());
                body.push(':');
                body.push_str(&value.to_string());
            }
            body.push('}');
            body.into_bytes()
        })
}

/// Byte-level damage: flip, insert, remove, or cut off.
fn damage(bytes: &mut Vec<u8>, edits: &[(u8, usize, u8)]) {
    for &(op, at, byte) in edits {
        let len = bytes.len();
        match op % 4 {
            0 if len > 0 => bytes[at % len] ^= byte.max(1),
            1 => bytes.insert(at % (len + 1), byte),
            2 if len > 0 => {
                bytes.remove(at % len);
            }
            3 => bytes.truncate(at % (len + 1)),
            _ => {}
        }
    }
}

/// The body decodes to a message or a JSON error, and (for UTF-8) to the same message as the
/// generic decoding.
fn check_body(body: &[u8]) -> Result<(), TestCaseError> {
    let quick = decode_frame(body);
    if let Err(error) = &quick {
        prop_assert!(
            matches!(error, FrameError::Json(_)),
            "a body can only be bad JSON: {error:?}"
        );
        prop_assert!(!error.to_string().is_empty());
    }
    // Not for invalid UTF-8: serde_json skips the bytes of a field nobody reads (the quick
    // decoding ignores unknown fields) without checking them, while the generic decoding holds
    // every field as a string first. The frame is accepted either way only when every field
    // fly reads is valid.
    if std::str::from_utf8(body).is_err() {
        return Ok(());
    }
    let generic: Result<WorkerMessage, _> = serde_json::from_slice(body);
    // Nor for a number beyond f64 in a field nobody reads: the quick decoding skips it, the
    // generic one parses it while holding every field and fails.
    if generic
        .as_ref()
        .is_err_and(|e| e.to_string().contains("number out of range"))
        && quick.is_ok()
    {
        return Ok(());
    }
    prop_assert_eq!(
        quick.as_ref().ok(),
        generic.as_ref().ok(),
        "the quick decoding disagrees with the generic one on {:?}",
        String::from_utf8_lossy(body)
    );
    Ok(())
}

fn framed(bodies: &[Vec<u8>]) -> Vec<u8> {
    let mut data = Vec::new();
    for body in bodies {
        data.extend_from_slice(&(body.len() as u32).to_be_bytes());
        data.extend_from_slice(body);
    }
    data
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(4096))]

    #[test]
    fn arbitrary_bytes_decode_to_a_message_or_a_typed_error(body in vec(any::<u8>(), 0..256)) {
        check_body(&body)?;
    }

    #[test]
    fn worker_messages_decode_alike_both_ways(body in worker_frame()) {
        check_body(&body)?;
    }

    #[test]
    fn damaged_worker_messages_decode_to_a_message_or_a_typed_error(
        mut body in worker_frame(),
        edits in vec((any::<u8>(), any::<usize>(), any::<u8>()), 1..6),
    ) {
        damage(&mut body, &edits);
        check_body(&body)?;
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1024))]

    /// A stream of frames, damaged at one point and cut into arbitrary reads: the reader yields
    /// every whole frame before the damage in order, then at most one error, then the end.
    #[test]
    fn a_frame_stream_yields_its_frames_then_at_most_one_error(
        bodies in vec(worker_frame(), 0..6),
        edits in vec((any::<u8>(), any::<usize>(), any::<u8>()), 0..3),
        pieces in vec(1usize..64, 1..8),
    ) {
        let clean = framed(&bodies);
        let mut data = clean.clone();
        damage(&mut data, &edits);
        // The frames before the first changed byte are intact.
        let first_change = data
            .iter()
            .zip(&clean)
            .position(|(a, b)| a != b)
            .unwrap_or(data.len().min(clean.len()));
        let mut intact = Vec::new();
        let mut at = 0;
        for body in &bodies {
            let end = at + 4 + body.len();
            if end > first_change {
                break;
            }
            intact.push(decode_frame(body).ok());
            at = end;
        }

        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
        let read: Vec<Result<WorkerMessage, FrameError>> = runtime.block_on(async {
            let (mut tx, rx) = tokio::io::duplex(64);
            let writer = tokio::spawn(async move {
                use tokio::io::AsyncWriteExt;
                let mut rest = &data[..];
                let mut sizes = pieces.iter().cycle();
                while !rest.is_empty() {
                    let n = (*sizes.next().unwrap_or(&1)).min(rest.len());
                    if tx.write_all(&rest[..n]).await.is_err() {
                        break;
                    }
                    rest = &rest[n..];
                }
            });
            let mut reader = FrameReader::new(rx);
            let mut all = Vec::new();
            while let Some(batch) = reader.next_batch().await {
                assert!(!batch.is_empty(), "a batch holds at least one frame");
                all.extend(batch);
            }
            // Once the reader gave up, the writer may be stuck on a full pipe: close it.
            drop(reader);
            let _ = writer.await;
            all
        });
        let errors = read.iter().filter(|r| r.is_err()).count();
        prop_assert!(errors <= 1, "more than one error: {:?}", read);
        if errors == 1 {
            prop_assert!(read.last().is_some_and(|r| r.is_err()), "frames after an error: {:?}", read);
        }
        // Whatever decoded before the damage is what the clean stream holds, in order.
        for (n, expected) in intact.iter().enumerate() {
            match (read.get(n), expected) {
                (Some(Ok(message)), Some(expected)) => prop_assert_eq!(message, expected),
                // A frame the worker sent badly is an error in both.
                (Some(Err(_)), None) => break,
                (got, expected) => {
                    return Err(TestCaseError::fail(format!(
                        "frame {n}: read {got:?}, expected {expected:?}"
                    )));
                }
            }
        }
    }
}
