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
pub(super) const MIGRATIONS: &[&str] =
    &[V1_INITIAL, V2_HISTORY, V3_RESUME, V4_RERUNS, V5_RETENTION];

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
