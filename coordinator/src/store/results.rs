//! Reading final results back as a client receives them: a [`TestResult`] with the phase
//! reports of the attempt that counts, trimmed as the dispatcher trims what it streams. `run
//! --resume` reads a whole run this way ([`super::resume`]); a follower that fell behind a run
//! gets the results it missed read from here by test index ([`read`]), so the coordinator need
//! not hold them in memory for it.

use std::path::Path;
use std::time::Duration;

use fly_common::outcome::Phase;
use fly_common::proto::{PhaseResult, Section, TestResult};
use rusqlite::{params, Connection, OptionalExtension, Row};

use super::{schema, StoreError};

/// The columns [`phase_from_row`] reads, in its order.
pub(super) const PHASE_COLUMNS: &str =
    "phase, outcome, category, duration, longrepr, sections, message, start, stop";

/// A phase report from a row of [`PHASE_COLUMNS`] starting at column `at`.
pub(super) fn phase_from_row(row: &Row<'_>, at: usize) -> rusqlite::Result<PhaseResult> {
    let phase: Option<String> = row.get(at)?;
    let sections: Option<String> = row.get(at + 5)?;
    Ok(PhaseResult {
        phase: phase
            .as_deref()
            .and_then(Phase::parse)
            .map(|p| p.to_proto() as i32)
            .unwrap_or(0),
        outcome: row.get(at + 1)?,
        category: row.get(at + 2)?,
        duration: row.get(at + 3)?,
        longrepr: row.get::<_, Option<String>>(at + 4)?.unwrap_or_default(),
        sections: sections.as_deref().map(parse_sections).unwrap_or_default(),
        message: row.get::<_, Option<String>>(at + 6)?.unwrap_or_default(),
        start: row.get(at + 7)?,
        stop: row.get(at + 8)?,
    })
}

/// Adds `phase` to `result` unless it already has a report of that phase (the dispatcher
/// ignores a duplicate report too).
pub(super) fn add_phase(result: &mut TestResult, phase: PhaseResult) {
    if !result.phases.iter().any(|p| p.phase == phase.phase) {
        result.phases.push(phase);
    }
}

/// Keeps what a client prints or exports of a result, as the dispatcher does for live ones:
/// tracebacks of failures, errors and skips, captured output of failures and errors.
pub(super) fn trim(result: &mut TestResult) {
    let interesting = matches!(result.outcome.as_str(), "failed" | "error")
        || result
            .phases
            .iter()
            .any(|p| p.category == "error" || p.category == "failed");
    for phase in &mut result.phases {
        if !interesting && phase.category != "skipped" {
            phase.longrepr.clear();
        }
        if !interesting {
            phase.sections.clear();
        }
    }
}

/// `[[name, text], ...]` as the store writes captured output; anything else reads as none.
fn parse_sections(json: &str) -> Vec<Section> {
    serde_json::from_str::<Vec<(String, String)>>(json)
        .map(|pairs| {
            pairs
                .into_iter()
                .map(|(name, text)| Section { name, text })
                .collect()
        })
        .unwrap_or_default()
}

/// The final results of `run_id`'s tests `indexes`, in that order, as the dispatcher streamed
/// them (with `flaky`), read on a read-only connection. A test without a recorded result is
/// left out: the caller names it. Two indexed lookups per test, so the cost follows the number
/// of tests asked for, not the size of the run.
pub(super) fn read(
    path: &Path,
    run_id: &str,
    indexes: &[u32],
    busy_timeout: Duration,
) -> Result<Vec<TestResult>, StoreError> {
    let conn = schema::connect_read_only(path, busy_timeout)?;
    read_on(&conn, run_id, indexes).map_err(|source| StoreError::Sqlite {
        path: path.to_path_buf(),
        action: "reading results for a follower",
        source,
    })
}

fn read_on(conn: &Connection, run_id: &str, indexes: &[u32]) -> rusqlite::Result<Vec<TestResult>> {
    let run: Option<i64> = conn
        .query_row(
            "SELECT seq FROM run_keys WHERE run_id = ?1",
            [run_id],
            |r| r.get(0),
        )
        .optional()?;
    let Some(run) = run else {
        return Ok(Vec::new());
    };
    let mut result_row = conn.prepare_cached(
        "SELECT coalesce(r.nodeid, c.nodeid), r.outcome, r.duration, r.attempts, r.lease,
             a.agent_id, r.worker, r.flaky
         FROM test_results r
         JOIN agent_keys a ON a.seq = r.agent
         LEFT JOIN collected c ON c.run = r.run AND c.test_index = r.test_index
         WHERE r.run = ?1 AND r.test_index = ?2",
    )?;
    let mut phase_rows = conn.prepare_cached(&format!(
        "SELECT {PHASE_COLUMNS} FROM phase_reports
         WHERE run = ?1 AND test_index = ?2 AND lease = ?3 ORDER BY id"
    ))?;
    let mut results = Vec::with_capacity(indexes.len());
    for &index in indexes {
        let found = result_row
            .query_row(params![run, index], |row| {
                Ok((
                    row.get::<_, i64>(4)?,
                    TestResult {
                        test_index: index,
                        nodeid: row.get::<_, Option<String>>(0)?.unwrap_or_default(),
                        outcome: row.get(1)?,
                        duration: row.get(2)?,
                        attempts: row.get(3)?,
                        agent_id: row.get(5)?,
                        worker: row.get(6)?,
                        flaky: row.get::<_, i64>(7)? != 0,
                        phases: Vec::new(),
                    },
                ))
            })
            .optional()?;
        let Some((lease, mut result)) = found else {
            continue;
        };
        let phases =
            phase_rows.query_map(params![run, index, lease], |row| phase_from_row(row, 0))?;
        for phase in phases {
            add_phase(&mut result, phase?);
        }
        trim(&mut result);
        results.push(result);
    }
    Ok(results)
}
