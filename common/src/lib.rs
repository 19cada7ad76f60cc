//! Shared by the coordinator and the agent: the generated wire types of `proto/fly.proto`,
//! the protocol version both sides check on connect, pytest's exit codes and outcome names,
//! and hardware topology detection.

pub mod batch;
pub mod outcome;
pub mod topology;

/// Generated from `proto/fly.proto`. Conversions to and from richer types happen at the
/// boundary (in the modules that own those types), never inside the generated code.
pub mod proto {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("fly.v1");
}

/// Version of the agent/coordinator and client/coordinator protocol. Both sides send it first
/// and refuse a mismatch with a message naming both versions.
pub const PROTOCOL_VERSION: u32 = 1;

/// fly's own version, reported by agents and shown by `--version`.
pub const FLY_VERSION: &str = env!("CARGO_PKG_VERSION");

/// Largest gRPC message either side accepts. Reports carry captured output, which is capped
/// well below this by the agent.
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024 * 1024;

/// pytest's exit codes, which `fly-coordinator run` returns unchanged.
pub mod exit_code {
    pub const OK: i32 = 0;
    pub const TESTS_FAILED: i32 = 1;
    pub const INTERRUPTED: i32 = 2;
    pub const INTERNAL_ERROR: i32 = 3;
    pub const USAGE_ERROR: i32 = 4;
    pub const NO_TESTS_COLLECTED: i32 = 5;
}
