//! End-to-end tests: real `fly-coordinator` and `fly-agent` processes on loopback running the
//! fixture project (`tests/fixtures/project`) with real pytest workers, each run compared with
//! plain pytest on the same copy of the project.

mod bad_input;
mod distributed;
mod fixture_project;
mod history;
mod listen;
mod local;
mod mismatched_agent;
