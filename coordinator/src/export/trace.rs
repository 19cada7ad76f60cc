//! `run --trace-json`: the run as a Chrome trace-event timeline (the JSON object format that
//! Perfetto and `chrome://tracing` open), one track per worker.
//!
//! Each agent is a process (named `agent <id>`) and each of its workers a thread (`worker N`).
//! Each test is a complete (`"ph": "X"`) slice from its setup's start to its teardown's end,
//! with its setup, call and teardown as slices nested inside, all carrying the node id and
//! outcome in `args`. Times are microseconds since the earliest phase of the run (the epoch
//! second of that origin is in `otherData`).
//!
//! Thread ids are numbered across the whole trace rather than reusing the worker number under
//! each process: trace importers (Perfetto's among them) treat a tid as unique on the machine,
//! and two agents' "worker 0" would otherwise share a track.

use std::collections::BTreeMap;

use fly_common::outcome::Phase;
use fly_common::proto::TestResult;
use serde::Serialize;
use serde_json::{json, Map, Value};

use super::Collector;

/// A trace in the JSON object format.
#[derive(Debug, Serialize)]
pub struct Trace {
    #[serde(rename = "traceEvents")]
    pub trace_events: Vec<TraceEvent>,
    #[serde(rename = "displayTimeUnit")]
    pub display_time_unit: &'static str,
    #[serde(rename = "otherData")]
    pub other_data: Map<String, Value>,
}

/// One trace event: a complete slice (`X`) or a metadata record (`M`) naming a track.
#[derive(Debug, Clone, Serialize)]
pub struct TraceEvent {
    pub name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cat: Option<&'static str>,
    pub ph: &'static str,
    /// Microseconds since the trace's origin.
    pub ts: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dur: Option<f64>,
    pub pid: u32,
    pub tid: u32,
    #[serde(skip_serializing_if = "Map::is_empty")]
    pub args: Map<String, Value>,
}

/// A phase with a usable time span, in integer nanoseconds since the origin: slices computed
/// from the same integers nest exactly, where rounding floats separately could let a phase
/// end a nanosecond after its test.
struct Span<'a> {
    phase: &'a fly_common::proto::PhaseResult,
    start: i64,
    stop: i64,
}

/// The run's timeline. Tests whose phases carry no times (from a coordinator that does not
/// send them) are left out.
pub fn trace(run: &Collector) -> Trace {
    let results = run.results_in_collection_order();
    let timed = |start: f64, stop: f64| start.is_finite() && stop.is_finite() && start > 0.0;
    let origin = results
        .iter()
        .flat_map(|r| r.phases.iter())
        .filter(|p| timed(p.start, p.stop))
        .map(|p| p.start)
        .reduce(f64::min)
        .unwrap_or(0.0);
    let nanos = |epoch: f64| ((epoch - origin) * 1e9).round() as i64;

    // Each test's timed phases, and the earliest start of each agent (agents are numbered in
    // the order they started testing).
    let mut tests: Vec<(&TestResult, Vec<Span>)> = Vec::new();
    let mut agent_start: BTreeMap<&str, i64> = BTreeMap::new();
    for result in results {
        let spans: Vec<Span> = result
            .phases
            .iter()
            .filter(|p| timed(p.start, p.stop))
            .map(|p| {
                let start = nanos(p.start);
                Span {
                    phase: p,
                    start,
                    stop: nanos(p.stop).max(start),
                }
            })
            .collect();
        let Some(first) = spans.iter().map(|s| s.start).min() else {
            continue;
        };
        let earliest = agent_start.entry(&result.agent_id).or_insert(first);
        *earliest = (*earliest).min(first);
        tests.push((result, spans));
    }
    let mut agents: Vec<(&str, i64)> = agent_start.into_iter().collect();
    agents.sort_by_key(|(id, start)| (*start, *id));
    let pids: BTreeMap<&str, u32> = agents
        .iter()
        .enumerate()
        .map(|(i, (id, _))| (*id, i as u32 + 1))
        .collect();
    let mut tracks: BTreeMap<(u32, u32), u32> = BTreeMap::new();
    for (result, _) in &tests {
        tracks.insert((pids[result.agent_id.as_str()], result.worker), 0);
    }
    for (tid, track) in tracks.values_mut().enumerate() {
        *track = tid as u32 + 1;
    }

    let mut events = Vec::new();
    for (id, _) in &agents {
        let pid = pids[id];
        events.push(metadata(
            "process_name",
            pid,
            0,
            json!({ "name": format!("agent {id}") }),
        ));
        events.push(metadata(
            "process_sort_index",
            pid,
            0,
            json!({ "sort_index": pid }),
        ));
    }
    for (&(pid, worker), &tid) in &tracks {
        let name = format!("worker {worker}");
        events.push(metadata("thread_name", pid, tid, json!({ "name": name })));
        events.push(metadata(
            "thread_sort_index",
            pid,
            tid,
            json!({ "sort_index": tid }),
        ));
    }
    for (result, spans) in &tests {
        let pid = pids[result.agent_id.as_str()];
        let tid = tracks[&(pid, result.worker)];
        let start = spans.iter().map(|s| s.start).min().unwrap_or(0);
        let stop = spans.iter().map(|s| s.stop).max().unwrap_or(start);
        let mut args = Map::new();
        args.insert("nodeid".into(), json!(result.nodeid));
        args.insert("outcome".into(), json!(result.outcome));
        args.insert("attempts".into(), json!(result.attempts.max(1)));
        args.insert("agent".into(), json!(result.agent_id));
        args.insert("worker".into(), json!(result.worker));
        events.push(slice(&result.nodeid, "test", start, stop, pid, tid, args));
        for span in spans {
            let phase = Phase::from_proto(span.phase.phase)
                .map(|p| p.as_str())
                .unwrap_or("phase");
            let mut args = Map::new();
            args.insert("nodeid".into(), json!(result.nodeid));
            args.insert("outcome".into(), json!(span.phase.outcome));
            args.insert("category".into(), json!(span.phase.category));
            // pytest's own measure of the phase (its clock, not the wall span).
            args.insert("duration_s".into(), json!(finite(span.phase.duration)));
            if !span.phase.message.is_empty() {
                args.insert("message".into(), json!(span.phase.message));
            }
            events.push(slice(phase, "phase", span.start, span.stop, pid, tid, args));
        }
    }

    let mut other_data = Map::new();
    other_data.insert(
        "generator".into(),
        json!("fly-coordinator run --trace-json"),
    );
    other_data.insert("run_id".into(), json!(run.run_id()));
    other_data.insert("origin_epoch_seconds".into(), json!(origin));
    Trace {
        trace_events: events,
        display_time_unit: "ms",
        other_data,
    }
}

fn metadata(name: &str, pid: u32, tid: u32, args: Value) -> TraceEvent {
    TraceEvent {
        name: name.to_string(),
        cat: None,
        ph: "M",
        ts: 0.0,
        dur: None,
        pid,
        tid,
        args: match args {
            Value::Object(map) => map,
            _ => Map::new(),
        },
    }
}

fn slice(
    name: &str,
    cat: &'static str,
    start_ns: i64,
    stop_ns: i64,
    pid: u32,
    tid: u32,
    args: Map<String, Value>,
) -> TraceEvent {
    TraceEvent {
        name: name.to_string(),
        cat: Some(cat),
        ph: "X",
        ts: start_ns as f64 / 1000.0,
        dur: Some((stop_ns - start_ns).max(0) as f64 / 1000.0),
        pid,
        tid,
        args,
    }
}

/// JSON has no NaN or infinity: such a figure is written as 0.
fn finite(value: f64) -> f64 {
    if value.is_finite() {
        value
    } else {
        0.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fly_common::proto::PhaseResult;

    fn phase(which: Phase, start: f64, stop: f64) -> PhaseResult {
        PhaseResult {
            phase: which.to_proto() as i32,
            outcome: "passed".into(),
            category: if which == Phase::Call { "passed" } else { "" }.into(),
            duration: stop - start,
            start,
            stop,
            ..Default::default()
        }
    }

    fn test(index: u32, agent: &str, worker: u32, at: f64) -> TestResult {
        TestResult {
            test_index: index,
            nodeid: format!("test_t.py::test_{index}"),
            outcome: "passed".into(),
            agent_id: agent.into(),
            worker,
            attempts: 1,
            phases: vec![
                phase(Phase::Setup, at, at + 0.001),
                phase(Phase::Call, at + 0.001, at + 0.0101),
                phase(Phase::Teardown, at + 0.0101, at + 0.0103),
            ],
            ..Default::default()
        }
    }

    #[test]
    fn two_agents_with_two_workers_make_four_named_tracks_of_nested_slices() {
        let base = 1_800_000_000.123_456;
        let mut run = Collector::new();
        run.set_run_id("run-1");
        run.add(test(0, "agent-b", 0, base + 0.5));
        run.add(test(1, "agent-a", 0, base));
        run.add(test(2, "agent-a", 1, base + 0.01));
        run.add(test(3, "agent-b", 1, base + 0.02));
        run.add(test(4, "agent-a", 0, base + 0.0103));
        let json = serde_json::to_value(trace(&run)).unwrap();

        let events = json["traceEvents"].as_array().unwrap();
        let threads: BTreeMap<(u64, u64), String> = events
            .iter()
            .filter(|e| e["ph"] == "M" && e["name"] == "thread_name")
            .map(|e| {
                let key = (e["pid"].as_u64().unwrap(), e["tid"].as_u64().unwrap());
                (key, e["args"]["name"].as_str().unwrap().to_string())
            })
            .collect();
        assert_eq!(threads.len(), 4, "{threads:?}");
        let tids: std::collections::BTreeSet<u64> = threads.keys().map(|k| k.1).collect();
        assert_eq!(tids.len(), 4, "thread ids are unique across agents");
        let processes: BTreeMap<u64, String> = events
            .iter()
            .filter(|e| e["ph"] == "M" && e["name"] == "process_name")
            .map(|e| {
                let name = e["args"]["name"].as_str().unwrap().to_string();
                (e["pid"].as_u64().unwrap(), name)
            })
            .collect();
        // agent-a started testing first.
        assert_eq!(processes[&1], "agent agent-a");
        assert_eq!(processes[&2], "agent agent-b");

        let slices: Vec<&Value> = events.iter().filter(|e| e["ph"] == "X").collect();
        assert_eq!(slices.len(), 5 * 4);
        for test in slices.iter().filter(|e| e["cat"] == "test") {
            let key = (test["pid"].as_u64().unwrap(), test["tid"].as_u64().unwrap());
            assert!(threads.contains_key(&key), "a slice on an unnamed track");
            let (start, end) = (
                test["ts"].as_f64().unwrap(),
                test["ts"].as_f64().unwrap() + test["dur"].as_f64().unwrap(),
            );
            let phases: Vec<&&Value> = slices
                .iter()
                .filter(|e| e["cat"] == "phase" && e["args"]["nodeid"] == test["name"])
                .collect();
            assert_eq!(phases.len(), 3);
            for phase in phases {
                assert_eq!(
                    (phase["pid"].clone(), phase["tid"].clone()),
                    (test["pid"].clone(), test["tid"].clone())
                );
                let ts = phase["ts"].as_f64().unwrap();
                let dur = phase["dur"].as_f64().unwrap();
                assert!(dur >= 0.0);
                assert!(ts >= start && ts + dur <= end, "{phase} outside {test}");
            }
        }
        let first = slices
            .iter()
            .find(|e| e["name"] == "test_t.py::test_1")
            .unwrap();
        assert_eq!(first["ts"].as_f64(), Some(0.0));
        assert_eq!(json["otherData"]["run_id"], "run-1");
    }

    #[test]
    fn untimed_phases_are_left_out_and_broken_figures_stay_valid_json() {
        let mut run = Collector::new();
        let mut untimed = test(0, "a", 0, 0.0);
        for p in &mut untimed.phases {
            p.start = 0.0;
            p.stop = 0.0;
        }
        run.add(untimed);
        let mut odd = test(1, "a", 1, 1_800_000_000.0);
        odd.phases[1].duration = f64::NAN;
        odd.phases[2].stop = odd.phases[2].start - 1.0;
        run.add(odd);
        let text = serde_json::to_string(&trace(&run)).unwrap();
        let json: Value = serde_json::from_str(&text).unwrap();
        let slices: Vec<&Value> = json["traceEvents"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["ph"] == "X")
            .collect();
        assert_eq!(slices.len(), 4, "only the timed test: {text}");
        assert!(slices.iter().all(|e| e["dur"].as_f64().unwrap() >= 0.0));
    }
}
