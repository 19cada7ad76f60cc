//! The fly coordinator: the work queue and run state of every run, the SQLite store, the gRPC
//! service agents and clients talk to, and the `run` client itself.
//!
//! Data flows one way through these modules: [`server`] turns gRPC streams into dispatcher
//! inputs; [`dispatcher`] owns all run state and asks the pure [`scheduler`] what to hand out;
//! [`store`] persists on a thread of its own; [`client`] and [`terminal`] are the `run`
//! command's side, and [`export`] writes its JUnit XML and trace files; [`node`] wires a
//! coordinator into this process; [`report`] reads the record back for the `report`, `runs`,
//! `slowest` and `flaky` commands; [`http`] serves the live dashboard, `/healthz` and
//! `/metrics` from the dispatcher's [`observe`] snapshots.

pub mod auth;
pub mod cli;
pub mod client;
pub mod collection;
pub mod dispatcher;
pub mod export;
pub mod http;
pub mod labels;
pub mod node;
pub mod observe;
pub mod packed;
pub mod plan;
pub mod report;
pub mod scheduler;
pub mod server;
pub mod store;
pub mod terminal;
pub mod units;
