//! The store's SQLite schema: opening a connection with the settings the store relies on, and
//! the ordered migrations that bring a database file up to the version this binary knows.
//!
//! The schema version lives in `PRAGMA user_version`. Migration N (1-based) is `MIGRATIONS[N-1]`;
//! each one runs in its own transaction together with the bump of `user_version`, so a crash
//! mid-migration leaves the file at the previous version, never half-migrated. Migrations are
//! only ever appended: a released script is never edited, because databases in the field
//! already ran it. A new version goes at the end of `MIGRATIONS`.

use std::path::Path;
use std::time::Duration;

use rusqlite::{Connection, OpenFlags, TransactionBehavior};

use super::StoreError;

/// Every migration, in order. The schema version of a fully migrated database is the length of
/// this list.
pub(super) const MIGRATIONS: &[&str] = &[
    V1_INITIAL,
    V2_HISTORY,
    V3_RESUME,
    V4_RERUNS,
    V5_RETENTION,
    V6_COMPACT,
];

/// The schema version this binary writes. A database with a higher `user_version` was written
/// by a newer fly and is refused rather than guessed at.
pub const SCHEMA_VERSION: u32 = MIGRATIONS.len() as u32;

/// Version 1: runs, agents, which agents served which run, each run's collection, every phase
/// report of every attempt, and one final result per test.
///
/// There are deliberately no foreign keys: the writer must never reject a report because the
/// row it refers to is missing (a bug elsewhere must not lose data or stop the writer).
const V1_INITIAL: &str = r#"
CREATE TABLE runs (
    id           TEXT PRIMARY KEY NOT NULL,
    project      TEXT NOT NULL,
    status       TEXT NOT NULL,
    pytest_args  TEXT NOT NULL,
    client_cwd   TEXT,
    created_at   REAL NOT NULL,
    started_at   REAL,
    finished_at  REAL,
    exit_code    INTEGER,
    collected    INTEGER,
    deselected   INTEGER,
    counts       TEXT,
    message      TEXT
);
CREATE INDEX runs_by_project ON runs (project, created_at);

CREATE TABLE agents (
    id                 TEXT PRIMARY KEY NOT NULL,
    hostname           TEXT NOT NULL,
    fly_version        TEXT NOT NULL,
    protocol_version   INTEGER NOT NULL,
    workers            INTEGER NOT NULL,
    logical_cpus       INTEGER NOT NULL,
    physical_cores     INTEGER NOT NULL,
    performance_cores  INTEGER NOT NULL,
    efficiency_cores   INTEGER NOT NULL,
    threads_per_core   INTEGER NOT NULL,
    cpu_quota          REAL,
    memory_bytes       INTEGER NOT NULL,
    core_kind_source   TEXT NOT NULL,
    os                 TEXT NOT NULL,
    arch               TEXT NOT NULL,
    topology           TEXT NOT NULL,
    labels             TEXT NOT NULL,
    workdir            TEXT NOT NULL,
    python             TEXT NOT NULL,
    connected_at       REAL NOT NULL,
    disconnected_at    REAL,
    disconnect_reason  TEXT
);

CREATE TABLE run_agents (
    run_id    TEXT NOT NULL,
    agent_id  TEXT NOT NULL,
    workers   INTEGER NOT NULL,
    accepted  INTEGER NOT NULL,
    reason    TEXT,
    PRIMARY KEY (run_id, agent_id)
);

CREATE TABLE run_tests (
    run_id      TEXT NOT NULL,
    test_index  INTEGER NOT NULL,
    nodeid      TEXT NOT NULL,
    file        TEXT NOT NULL,
    line        INTEGER,
    PRIMARY KEY (run_id, test_index)
);

CREATE TABLE reports (
    id          INTEGER PRIMARY KEY,
    run_id      TEXT NOT NULL,
    test_index  INTEGER NOT NULL,
    nodeid      TEXT NOT NULL,
    lease       INTEGER NOT NULL,
    phase       TEXT,
    outcome     TEXT NOT NULL,
    category    TEXT NOT NULL,
    duration    REAL NOT NULL,
    start       REAL NOT NULL,
    stop        REAL NOT NULL,
    agent_id    TEXT NOT NULL,
    worker      INTEGER NOT NULL,
    longrepr    TEXT,
    message     TEXT,
    sections    TEXT,
    superseded  INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX reports_by_test ON reports (run_id, test_index);

CREATE TABLE results (
    run_id      TEXT NOT NULL,
    test_index  INTEGER NOT NULL,
    nodeid      TEXT NOT NULL,
    outcome     TEXT NOT NULL,
    duration    REAL NOT NULL,
    attempts    INTEGER NOT NULL,
    lease       INTEGER NOT NULL,
    agent_id    TEXT NOT NULL,
    worker      INTEGER NOT NULL,
    PRIMARY KEY (run_id, test_index)
);
"#;

/// Version 2: duration history for scheduling, and each agent's speed.
///
/// `durations` and `scope_costs` are `WITHOUT ROWID`: rows live in primary-key order, so reading
/// one project's history (a million rows for a big project) is one contiguous range scan of one
/// b-tree rather than an index walk plus a table lookup per row.
const V2_HISTORY: &str = r#"
CREATE TABLE durations (
    project     TEXT NOT NULL,
    nodeid      TEXT NOT NULL,
    estimate    REAL NOT NULL,
    samples     TEXT NOT NULL,
    updated_at  REAL NOT NULL,
    PRIMARY KEY (project, nodeid)
) WITHOUT ROWID;

CREATE TABLE scope_costs (
    project     TEXT NOT NULL,
    scope       TEXT NOT NULL,
    estimate    REAL NOT NULL,
    samples     TEXT NOT NULL,
    updated_at  REAL NOT NULL,
    PRIMARY KEY (project, scope)
) WITHOUT ROWID;

ALTER TABLE agents ADD COLUMN speed REAL;
"#;

/// Version 3: `run --resume`. A run that carries on with an unfinished one names it in
/// `resumed_from`; its own rows hold only what it ran, and its `counts` are the combined run's.
/// The index answers "was this run resumed already?".
const V3_RESUME: &str = r#"
ALTER TABLE runs ADD COLUMN resumed_from TEXT;
CREATE INDEX runs_by_resumed_from ON runs (resumed_from);
"#;

/// Version 4: `run --reruns` and the bound on requeues. `results.flaky` is 1 when an attempt of
/// the test failed and a rerun passed; `results.lost_on` names, as a JSON array of
/// `{"agent_id", "hostname", "worker"}`, the workers lost while running the test (NULL when
/// none). Every attempt's reports stay in `reports`; those of attempts that do not count are
/// marked superseded.
const V4_RERUNS: &str = r#"
ALTER TABLE results ADD COLUMN flaky INTEGER NOT NULL DEFAULT 0;
ALTER TABLE results ADD COLUMN lost_on TEXT;
"#;

/// Version 5: retention (`serve --retain-days`, `--retain-size`). A pruned run keeps its `runs`
/// row (status, exit code, counts, times: what `fly-coordinator runs` lists) and loses its
/// reports, results, collection and `run_agents` rows; `pruned_at` is when. The partial index
/// lists the runs not pruned yet in the order they finished, so finding the oldest one to
/// prune is one index lookup however many runs the file has kept.
const V5_RETENTION: &str = r#"
ALTER TABLE runs ADD COLUMN pruned_at REAL;
CREATE INDEX runs_to_prune ON runs (finished_at) WHERE pruned_at IS NULL;
"#;

/// Version 6: compact rows for the three tables that grow with every test (a million-test run
/// wrote 978 MB under version 5, most of it the 36-character run id repeated in every row and
/// index entry; on a slow disk the writer waited on those bytes).
///
/// - `run_keys` and `agent_keys` give each run and agent id a small integer (`seq`, an
///   `INTEGER PRIMARY KEY`, so VACUUM never renumbers it). Keys are never deleted: a pruned run
///   keeps its `runs` row and so its key.
/// - `collected`, `phase_reports` and `test_results` hold the collection, the phase reports and
///   the results keyed by those integers. `collected` and `test_results` are `WITHOUT ROWID`
///   tables on `(run, test_index)`, so there is no second copy of the key in an index.
///   `collected.file` is NULL when it is the node id's part before the first `::` (nearly
///   always); `phase_reports.nodeid` and `test_results.nodeid` are NULL when the node id is the
///   one `collected` holds for the test (the writer only leaves it out when it knows the run's
///   collection).
/// - `run_tests`, `reports` and `results` become views with the columns they always had, so
///   every query (the coordinator's reports, `sqlite3` users' own) reads them as before.
///   INSTEAD OF INSERT triggers let them be written too (tests and tools do); the coordinator's
///   writer writes the tables directly.
///
/// Existing rows are copied over in this migration, which on a big file takes a while once.
const V6_COMPACT: &str = r#"
CREATE TABLE run_keys (
    seq     INTEGER PRIMARY KEY,
    run_id  TEXT NOT NULL UNIQUE
);
CREATE TABLE agent_keys (
    seq       INTEGER PRIMARY KEY,
    agent_id  TEXT NOT NULL UNIQUE
);
INSERT OR IGNORE INTO run_keys (run_id) SELECT id FROM runs ORDER BY created_at;
INSERT OR IGNORE INTO run_keys (run_id) SELECT DISTINCT run_id FROM run_tests;
INSERT OR IGNORE INTO run_keys (run_id) SELECT DISTINCT run_id FROM reports;
INSERT OR IGNORE INTO run_keys (run_id) SELECT DISTINCT run_id FROM results;
INSERT OR IGNORE INTO agent_keys (agent_id) SELECT id FROM agents ORDER BY connected_at;
INSERT OR IGNORE INTO agent_keys (agent_id) SELECT DISTINCT agent_id FROM reports;
INSERT OR IGNORE INTO agent_keys (agent_id) SELECT DISTINCT agent_id FROM results;

CREATE TABLE collected (
    run         INTEGER NOT NULL,
    test_index  INTEGER NOT NULL,
    nodeid      TEXT NOT NULL,
    file        TEXT,
    line        INTEGER,
    PRIMARY KEY (run, test_index)
) WITHOUT ROWID;
INSERT INTO collected (run, test_index, nodeid, file, line)
    SELECT k.seq, t.test_index, t.nodeid,
           NULLIF(t.file, CASE WHEN instr(t.nodeid, '::') > 0
                               THEN substr(t.nodeid, 1, instr(t.nodeid, '::') - 1) END),
           t.line
    FROM run_tests t JOIN run_keys k ON k.run_id = t.run_id;

CREATE TABLE phase_reports (
    id          INTEGER PRIMARY KEY,
    run         INTEGER NOT NULL,
    test_index  INTEGER NOT NULL,
    nodeid      TEXT,
    lease       INTEGER NOT NULL,
    phase       TEXT,
    outcome     TEXT NOT NULL,
    category    TEXT NOT NULL,
    duration    REAL NOT NULL,
    start       REAL NOT NULL,
    stop        REAL NOT NULL,
    agent       INTEGER NOT NULL,
    worker      INTEGER NOT NULL,
    longrepr    TEXT,
    message     TEXT,
    sections    TEXT,
    superseded  INTEGER NOT NULL DEFAULT 0
);
INSERT INTO phase_reports (id, run, test_index, nodeid, lease, phase, outcome, category,
        duration, start, stop, agent, worker, longrepr, message, sections, superseded)
    SELECT r.id, k.seq, r.test_index, NULLIF(r.nodeid, c.nodeid), r.lease, r.phase, r.outcome,
           r.category, r.duration, r.start, r.stop, a.seq, r.worker, r.longrepr, r.message,
           r.sections, r.superseded
    FROM reports r
    JOIN run_keys k ON k.run_id = r.run_id
    JOIN agent_keys a ON a.agent_id = r.agent_id
    LEFT JOIN collected c ON c.run = k.seq AND c.test_index = r.test_index;
CREATE INDEX phase_reports_by_test ON phase_reports (run, test_index);

CREATE TABLE test_results (
    run         INTEGER NOT NULL,
    test_index  INTEGER NOT NULL,
    nodeid      TEXT,
    outcome     TEXT NOT NULL,
    duration    REAL NOT NULL,
    attempts    INTEGER NOT NULL,
    lease       INTEGER NOT NULL,
    agent       INTEGER NOT NULL,
    worker      INTEGER NOT NULL,
    flaky       INTEGER NOT NULL DEFAULT 0,
    lost_on     TEXT,
    PRIMARY KEY (run, test_index)
) WITHOUT ROWID;
INSERT INTO test_results (run, test_index, nodeid, outcome, duration, attempts, lease, agent,
        worker, flaky, lost_on)
    SELECT k.seq, r.test_index, NULLIF(r.nodeid, c.nodeid), r.outcome, r.duration, r.attempts,
           r.lease, a.seq, r.worker, r.flaky, r.lost_on
    FROM results r
    JOIN run_keys k ON k.run_id = r.run_id
    JOIN agent_keys a ON a.agent_id = r.agent_id
    LEFT JOIN collected c ON c.run = k.seq AND c.test_index = r.test_index;

DROP TABLE run_tests;
DROP TABLE reports;
DROP TABLE results;

CREATE VIEW run_tests AS
    SELECT k.run_id AS run_id, c.test_index AS test_index, c.nodeid AS nodeid,
           coalesce(c.file, substr(c.nodeid, 1, instr(c.nodeid, '::') - 1)) AS file,
           c.line AS line
    FROM collected c JOIN run_keys k ON k.seq = c.run;

CREATE VIEW reports AS
    SELECT p.id AS id, k.run_id AS run_id, p.test_index AS test_index,
           coalesce(p.nodeid, c.nodeid) AS nodeid, p.lease AS lease, p.phase AS phase,
           p.outcome AS outcome, p.category AS category, p.duration AS duration,
           p.start AS start, p.stop AS stop, a.agent_id AS agent_id, p.worker AS worker,
           p.longrepr AS longrepr, p.message AS message, p.sections AS sections,
           p.superseded AS superseded
    FROM phase_reports p
    JOIN run_keys k ON k.seq = p.run
    JOIN agent_keys a ON a.seq = p.agent
    LEFT JOIN collected c ON c.run = p.run AND c.test_index = p.test_index;

CREATE VIEW results AS
    SELECT k.run_id AS run_id, r.test_index AS test_index,
           coalesce(r.nodeid, c.nodeid) AS nodeid, r.outcome AS outcome,
           r.duration AS duration, r.attempts AS attempts, r.lease AS lease,
           a.agent_id AS agent_id, r.worker AS worker, r.flaky AS flaky, r.lost_on AS lost_on
    FROM test_results r
    JOIN run_keys k ON k.seq = r.run
    JOIN agent_keys a ON a.seq = r.agent
    LEFT JOIN collected c ON c.run = r.run AND c.test_index = r.test_index;

CREATE TRIGGER run_tests_insert INSTEAD OF INSERT ON run_tests BEGIN
    INSERT OR IGNORE INTO run_keys (run_id) VALUES (NEW.run_id);
    INSERT OR REPLACE INTO collected (run, test_index, nodeid, file, line)
        VALUES ((SELECT seq FROM run_keys WHERE run_id = NEW.run_id), NEW.test_index,
                NEW.nodeid, NEW.file, NEW.line);
END;

CREATE TRIGGER reports_insert INSTEAD OF INSERT ON reports BEGIN
    INSERT OR IGNORE INTO run_keys (run_id) VALUES (NEW.run_id);
    INSERT OR IGNORE INTO agent_keys (agent_id) VALUES (NEW.agent_id);
    INSERT INTO phase_reports (id, run, test_index, nodeid, lease, phase, outcome, category,
            duration, start, stop, agent, worker, longrepr, message, sections, superseded)
        VALUES (NEW.id, (SELECT seq FROM run_keys WHERE run_id = NEW.run_id), NEW.test_index,
                NEW.nodeid, NEW.lease, NEW.phase, NEW.outcome, NEW.category, NEW.duration,
                NEW.start, NEW.stop, (SELECT seq FROM agent_keys WHERE agent_id = NEW.agent_id),
                NEW.worker, NEW.longrepr, NEW.message, NEW.sections,
                coalesce(NEW.superseded, 0));
END;

CREATE TRIGGER results_insert INSTEAD OF INSERT ON results BEGIN
    INSERT OR IGNORE INTO run_keys (run_id) VALUES (NEW.run_id);
    INSERT OR IGNORE INTO agent_keys (agent_id) VALUES (NEW.agent_id);
    INSERT OR REPLACE INTO test_results (run, test_index, nodeid, outcome, duration, attempts,
            lease, agent, worker, flaky, lost_on)
        VALUES ((SELECT seq FROM run_keys WHERE run_id = NEW.run_id), NEW.test_index,
                NEW.nodeid, NEW.outcome, NEW.duration, NEW.attempts, NEW.lease,
                (SELECT seq FROM agent_keys WHERE agent_id = NEW.agent_id), NEW.worker,
                coalesce(NEW.flaky, 0), NEW.lost_on);
END;
"#;

/// Opens (or creates) the database file and applies the settings the store relies on: WAL so
/// readers never block the writer, `synchronous=NORMAL` (durable at every checkpoint, and a
/// power cut loses at most the last commits, never corrupts), and a busy timeout so a short
/// lock by another process is waited out inside SQLite before the writer's own retry kicks in.
pub(super) fn connect(path: &Path, busy_timeout: Duration) -> Result<Connection, StoreError> {
    let sqlite = |action: &'static str| {
        move |source: rusqlite::Error| StoreError::Sqlite {
            path: path.to_path_buf(),
            action,
            source,
        }
    };
    let conn = Connection::open(path).map_err(sqlite("opening the database"))?;
    conn.busy_timeout(busy_timeout)
        .map_err(sqlite("setting the busy timeout"))?;
    // The first statement that reads the file is where "file is not a database" shows up.
    let mode: String = conn
        .pragma_update_and_check(None, "journal_mode", "WAL", |row| row.get(0))
        .map_err(sqlite("switching to WAL journal mode"))?;
    if !mode.eq_ignore_ascii_case("wal") {
        // Some filesystems (network mounts) cannot do WAL; the store still works, only with
        // readers and the writer blocking each other.
        tracing::warn!(
            path = %path.display(),
            journal_mode = %mode,
            "SQLite refused WAL journal mode; readers will block the writer"
        );
    }
    conn.pragma_update(None, "synchronous", "NORMAL")
        .map_err(sqlite("setting synchronous=NORMAL"))?;
    // Checkpoint the WAL into the database every 10,000 pages (about 40 MB) instead of
    // SQLite's 1,000: each checkpoint syncs both files, and a million-test run wrote ~90 of
    // them at the default, the writer waiting on the disk for each; fewer, larger ones also
    // copy fewer pages twice (1.5M report-shaped rows: 30% less wall time on an ordinary
    // disk). A WAL file that grew larger is cut back to 64 MB after a checkpoint.
    conn.pragma_update(None, "wal_autocheckpoint", 10_000)
        .map_err(sqlite("setting wal_autocheckpoint"))?;
    conn.pragma_update(None, "journal_size_limit", 64 * 1024 * 1024)
        .map_err(sqlite("setting journal_size_limit"))?;
    // The writer prepares about a dozen statements; keep all of them cached.
    conn.set_prepared_statement_cache_capacity(32);
    Ok(conn)
}

/// Brings the database up to [`SCHEMA_VERSION`], one migration per transaction, and refuses a
/// database whose schema is newer than this binary knows. Safe against another process
/// migrating the same file at the same time: the version is re-read under the write lock.
pub(super) fn migrate(conn: &mut Connection, path: &Path) -> Result<(), StoreError> {
    loop {
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(|source| StoreError::Sqlite {
                path: path.to_path_buf(),
                action: "locking the database to migrate it",
                source,
            })?;
        let found: u32 = tx
            .pragma_query_value(None, "user_version", |row| row.get(0))
            .map_err(|source| StoreError::Sqlite {
                path: path.to_path_buf(),
                action: "reading the schema version",
                source,
            })?;
        if found > SCHEMA_VERSION {
            return Err(StoreError::SchemaTooNew {
                path: path.to_path_buf(),
                found,
                supported: SCHEMA_VERSION,
            });
        }
        if found == SCHEMA_VERSION {
            // Nothing to do; dropping the transaction releases the lock.
            return Ok(());
        }
        let target = found + 1;
        let script = MIGRATIONS[found as usize];
        let migrate_err = |source| StoreError::Migrate {
            path: path.to_path_buf(),
            version: target,
            source,
        };
        if found > 0 {
            // Migrating a file with runs in it copies rows (version 6 rewrote the per-test
            // tables: about 30 s for a million recorded tests); say so before going quiet.
            tracing::info!(
                path = %path.display(),
                from = found,
                to = target,
                "migrating the store's schema; a big file takes a while"
            );
        }
        tx.execute_batch(script).map_err(migrate_err)?;
        tx.pragma_update(None, "user_version", target)
            .map_err(migrate_err)?;
        tx.commit().map_err(migrate_err)?;
        tracing::info!(path = %path.display(), version = target, "migrated the store's schema");
    }
}

/// Opens a read-only connection for queries that run beside the writer (WAL lets them read a
/// consistent snapshot without blocking it). The file must already exist and be migrated:
/// [`super::Store::open`] did both.
pub(super) fn connect_read_only(
    path: &Path,
    busy_timeout: Duration,
) -> Result<Connection, StoreError> {
    let sqlite = |action: &'static str| {
        move |source: rusqlite::Error| StoreError::Sqlite {
            path: path.to_path_buf(),
            action,
            source,
        }
    };
    let flags = OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let conn = Connection::open_with_flags(path, flags)
        .map_err(sqlite("opening the database read-only"))?;
    conn.busy_timeout(busy_timeout)
        .map_err(sqlite("setting the busy timeout"))?;
    Ok(conn)
}
