//! Fuzzes what the agent reads from a pytest worker, which can print anything: the bytes as one
//! frame body (`decode_frame`) and as a stream of length-prefixed frames (`FrameReader`). A
//! body decodes to a message or a JSON error; a stream yields frames, then at most one error,
//! then its end. Never a panic, never an allocation past the frame size limit.
#![no_main]

use std::sync::OnceLock;

use fly_agent::worker::frame::{decode_frame, FrameError, FrameReader};
use libfuzzer_sys::fuzz_target;

fn runtime() -> &'static tokio::runtime::Runtime {
    static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("a tokio runtime for the fuzz target")
    })
}

fuzz_target!(|data: &[u8]| {
    if let Err(error) = decode_frame(data) {
        assert!(matches!(error, FrameError::Json(_)), "{error:?}");
    }
    runtime().block_on(async {
        let mut reader = FrameReader::new(data);
        let mut errors = 0;
        while let Some(batch) = reader.next_batch().await {
            assert!(!batch.is_empty());
            assert_eq!(errors, 0, "frames after an error");
            errors += batch.iter().filter(|frame| frame.is_err()).count();
            assert!(batch[..batch.len() - 1].iter().all(Result::is_ok));
        }
        assert!(errors <= 1);
    });
});
