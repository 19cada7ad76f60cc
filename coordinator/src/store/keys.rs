//! What the writer remembers to fill in the compact rows of schema version 6 without a lookup
//! per row: the small integer key of each run and agent id (`run_keys`, `agent_keys`), and a
//! fingerprint of each node id of each run in progress, so that a report's or result's node id
//! is left out of its row when the run's `collected` row already holds it.
//!
//! Fingerprints, not the node ids: the dispatcher keeps a run's collection packed once it is
//! written, and a second full copy here would cost more than the whole rest of the writer (over
//! 100 MB at a million tests; 8 MB as fingerprints). A report's node id is the collection's own
//! unless something upstream went wrong; a different one whose 64-bit fingerprint matched by
//! chance (odds of 1 in 2^64) would read back as the collected one.
//!
//! Everything here is a cache of what the database holds. After a batch is rolled back
//! ([`Keys::forget`]) the keys are looked up again, since keys created in that batch are gone.

use std::collections::HashMap;
use std::hash::{DefaultHasher, Hash, Hasher};

use crate::collection::Collection;
use rusqlite::{params, Connection, OptionalExtension};

/// Ids remembered before the caches start over: enough for every run and agent of a busy
/// coordinator's day, small enough that a coordinator up for a year does not grow.
const MAX_REMEMBERED: usize = 100_000;
/// Collections remembered at once (runs in progress on one coordinator).
const MAX_COLLECTIONS: usize = 64;

/// The writer's caches.
#[derive(Default)]
pub(super) struct Keys {
    runs: Remembered,
    agents: Remembered,
    collections: HashMap<i64, Vec<u64>>,
}

impl Keys {
    /// The key of run `run_id`, created on first use.
    pub(super) fn run(&mut self, conn: &Connection, run_id: &str) -> rusqlite::Result<i64> {
        key(conn, &mut self.runs, "run_keys", "run_id", run_id)
    }

    /// The key of agent `agent_id`, created on first use.
    pub(super) fn agent(&mut self, conn: &Connection, agent_id: &str) -> rusqlite::Result<i64> {
        key(conn, &mut self.agents, "agent_keys", "agent_id", agent_id)
    }

    /// Run `run`'s collection was written (and committed with the rows that follow it).
    pub(super) fn collected(&mut self, run: i64, tests: &Collection) {
        if self.collections.len() >= MAX_COLLECTIONS && !self.collections.contains_key(&run) {
            self.collections.clear();
        }
        let fingerprints = tests.nodeids().map(fingerprint).collect();
        self.collections.insert(run, fingerprints);
    }

    /// Run `run` is over: its late reports carry their node ids in full.
    pub(super) fn finished(&mut self, run: i64) {
        self.collections.remove(&run);
    }

    /// The node id to store for test `index` of run `run`: none when the run's collection, as
    /// written, holds this very node id at that index.
    pub(super) fn nodeid_to_store<'a>(
        &self,
        run: i64,
        index: u32,
        nodeid: &'a str,
    ) -> Option<&'a str> {
        let collected = self
            .collections
            .get(&run)
            .and_then(|tests| tests.get(index as usize))
            .is_some_and(|known| *known == fingerprint(nodeid));
        (!collected).then_some(nodeid)
    }

    /// The batch these keys were created in was rolled back: look them up afresh.
    pub(super) fn forget(&mut self) {
        self.runs = Remembered::default();
        self.agents = Remembered::default();
    }
}

/// Ids and their keys, and the last one asked for: a batch's reports come in runs from one
/// agent of one run, and comparing with the last id is cheaper than hashing it.
#[derive(Default)]
struct Remembered {
    last: Option<(String, i64)>,
    all: HashMap<String, i64>,
}

/// A node id's fingerprint: SipHash with fixed keys, the same for the same text in this process.
fn fingerprint(nodeid: &str) -> u64 {
    let mut hasher = DefaultHasher::new();
    nodeid.hash(&mut hasher);
    hasher.finish()
}

/// The `seq` of `id` in `table` (`run_keys` or `agent_keys`), inserting it when missing.
fn key(
    conn: &Connection,
    cache: &mut Remembered,
    table: &str,
    column: &str,
    id: &str,
) -> rusqlite::Result<i64> {
    if let Some((last, seq)) = &cache.last {
        if last == id {
            return Ok(*seq);
        }
    }
    let seq = known_or_new(conn, &mut cache.all, table, column, id)?;
    match &mut cache.last {
        Some((last, last_seq)) => {
            last.clear();
            last.push_str(id);
            *last_seq = seq;
        }
        None => cache.last = Some((id.to_owned(), seq)),
    }
    Ok(seq)
}

/// The key of `id` from the map, else from the table, created there when missing.
fn known_or_new(
    conn: &Connection,
    cache: &mut HashMap<String, i64>,
    table: &str,
    column: &str,
    id: &str,
) -> rusqlite::Result<i64> {
    if let Some(&seq) = cache.get(id) {
        return Ok(seq);
    }
    let found: Option<i64> = conn
        .prepare_cached(&format!("SELECT seq FROM {table} WHERE {column} = ?1"))?
        .query_row(params![id], |row| row.get(0))
        .optional()?;
    let seq = match found {
        Some(seq) => seq,
        None => {
            conn.prepare_cached(&format!("INSERT INTO {table} ({column}) VALUES (?1)"))?
                .execute(params![id])?;
            conn.last_insert_rowid()
        }
    };
    if cache.len() >= MAX_REMEMBERED {
        cache.clear();
    }
    cache.insert(id.to_owned(), seq);
    Ok(seq)
}

#[cfg(test)]
mod tests {
    use super::*;
    use fly_common::proto::CollectedTest;

    #[test]
    fn node_ids_are_left_out_only_when_the_collection_has_them_at_that_index() {
        let mut keys = Keys::default();
        let tests: Vec<CollectedTest> = ["t.py::a", "t.py::b"]
            .iter()
            .map(|id| CollectedTest {
                nodeid: id.to_string(),
                ..CollectedTest::default()
            })
            .collect();
        keys.collected(7, &Collection::from(tests.as_slice()));
        assert_eq!(keys.nodeid_to_store(7, 0, "t.py::a"), None);
        assert_eq!(keys.nodeid_to_store(7, 1, "t.py::b"), None);
        assert_eq!(keys.nodeid_to_store(7, 0, "t.py::b"), Some("t.py::b"));
        assert_eq!(keys.nodeid_to_store(7, 2, "t.py::a"), Some("t.py::a"));
        assert_eq!(keys.nodeid_to_store(8, 0, "t.py::a"), Some("t.py::a"));
        keys.finished(7);
        assert_eq!(keys.nodeid_to_store(7, 0, "t.py::a"), Some("t.py::a"));
    }
}
