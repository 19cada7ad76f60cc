//! End-to-end tests: real `fly-coordinator` and `fly-agent` processes on loopback running the
//! fixture project (`tests/fixtures/project`) with real pytest workers, each run compared with
//! plain pytest on the same copy of the project.

mod auth;
mod bad_input;
mod dashboard;
mod distributed;
mod drain;
mod export;
mod fixture_project;
mod history;
mod interrupt;
mod labels;
mod listen;
mod local;
mod mismatched_agent;
mod netns;
mod plan;
mod report;
mod reruns;
mod slow_client;
mod terminal;
mod tls;
