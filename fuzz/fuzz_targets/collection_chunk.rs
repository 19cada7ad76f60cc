//! Fuzzes an agent's collection as the coordinator receives it: a `Collected` chunk decoded
//! from arbitrary bytes, and the digest both sides compare collections by
//! (`fly_agent::worker::collection_digest`). Decoding yields a chunk or a typed error; the
//! digest is 64 hex digits, the same after a round trip through the wire, and the same whether
//! the tests arrive in one chunk or many.
#![no_main]

use fly_agent::worker::collection_digest;
use fly_common::proto::Collected;
use libfuzzer_sys::fuzz_target;
use prost::Message;

fuzz_target!(|data: &[u8]| {
    let Ok(chunk) = Collected::decode(data) else {
        return;
    };
    let digest = collection_digest(&chunk.tests);
    assert_eq!(digest.len(), 64);
    assert!(digest
        .bytes()
        .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()));
    let again = Collected::decode(chunk.encode_to_vec().as_slice()).expect("re-decoding");
    assert_eq!(collection_digest(&again.tests), digest);
    // Chunks of any size, put back together, are the same collection.
    let size = usize::from(data.first().copied().unwrap_or(1)).max(1);
    let joined: Vec<_> = chunk
        .tests
        .chunks(size)
        .flat_map(|part| part.to_vec())
        .collect();
    assert_eq!(collection_digest(&joined), digest);
});
