//! Reading what the coordinator recorded in its SQLite database. Rows are read by column name
//! into maps, so a test names exactly the columns it relies on and a missing one fails with
//! the list of columns that do exist.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use rusqlite::types::Value;
use rusqlite::{Connection, OpenFlags};

/// One row, by column name.
#[derive(Debug, Clone)]
pub struct Row {
    table: String,
    columns: BTreeMap<String, Value>,
}

impl Row {
    fn value(&self, column: &str) -> &Value {
        self.columns.get(column).unwrap_or_else(|| {
            panic!(
                "table {} has no column {column:?} (it has {:?})",
                self.table,
                self.columns.keys().collect::<Vec<_>>()
            )
        })
    }

    pub fn has(&self, column: &str) -> bool {
        self.columns.contains_key(column)
    }

    /// A column as text: integers and reals are formatted, NULL is "".
    pub fn text(&self, column: &str) -> String {
        match self.value(column) {
            Value::Null => String::new(),
            Value::Integer(n) => n.to_string(),
            Value::Real(x) => x.to_string(),
            Value::Text(s) => s.clone(),
            Value::Blob(b) => String::from_utf8_lossy(b).into_owned(),
        }
    }

    /// A column as an integer; `None` for NULL or text that is not a number.
    pub fn int(&self, column: &str) -> Option<i64> {
        match self.value(column) {
            Value::Integer(n) => Some(*n),
            Value::Real(x) => Some(*x as i64),
            Value::Text(s) => s.trim().parse().ok(),
            _ => None,
        }
    }
}

/// An open fly database.
pub struct FlyDb {
    conn: Connection,
}

impl FlyDb {
    /// Opens an existing database without creating it (the coordinator may still be writing;
    /// WAL lets us read alongside).
    pub fn open(path: &Path) -> Result<FlyDb, String> {
        if !path.is_file() {
            return Err(format!("{} does not exist", path.display()));
        }
        let conn = Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(|e| format!("cannot open {}: {e}", path.display()))?;
        conn.busy_timeout(Duration::from_secs(10))
            .map_err(|e| format!("cannot set a busy timeout: {e}"))?;
        Ok(FlyDb { conn })
    }

    /// Opens the database, failing the test when it cannot.
    pub fn open_or_panic(path: &Path) -> FlyDb {
        FlyDb::open(path).unwrap_or_else(|e| panic!("fly's database: {e}"))
    }

    /// Runs `sql` with `params`, returning every row by column name.
    pub fn query(
        &self,
        table: &str,
        sql: &str,
        params: &[&dyn rusqlite::ToSql],
    ) -> Result<Vec<Row>, String> {
        let mut statement = self.conn.prepare(sql).map_err(|e| format!("{sql}: {e}"))?;
        let names: Vec<String> = statement
            .column_names()
            .into_iter()
            .map(str::to_string)
            .collect();
        let rows = statement
            .query_map(params, |row| {
                let mut columns = BTreeMap::new();
                for (i, name) in names.iter().enumerate() {
                    columns.insert(name.clone(), row.get::<_, Value>(i)?);
                }
                Ok(Row {
                    table: table.to_string(),
                    columns,
                })
            })
            .map_err(|e| format!("{sql}: {e}"))?;
        rows.collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("{sql}: {e}"))
    }

    fn query_or_panic(&self, table: &str, sql: &str, params: &[&dyn rusqlite::ToSql]) -> Vec<Row> {
        self.query(table, sql, params)
            .unwrap_or_else(|e| panic!("reading fly's database: {e}"))
    }

    /// The id of the most recent run, if any run was recorded yet.
    pub fn latest_run_id(&self) -> Result<Option<String>, String> {
        let rows = self.query(
            "runs",
            "SELECT id FROM runs ORDER BY created_at DESC LIMIT 1",
            &[],
        )?;
        Ok(rows.first().map(|row| row.text("id")))
    }

    /// The id of the most recent run, failing the test when there is none.
    pub fn run_id(&self) -> String {
        match self.latest_run_id() {
            Ok(Some(id)) => id,
            Ok(None) => panic!("fly's database holds no run"),
            Err(e) => panic!("reading fly's database: {e}"),
        }
    }

    pub fn run(&self, run_id: &str) -> Row {
        let mut rows = self.query_or_panic("runs", "SELECT * FROM runs WHERE id = ?1", &[&run_id]);
        assert_eq!(rows.len(), 1, "expected one runs row for {run_id}");
        rows.remove(0)
    }

    /// The run's collection, in test_index order.
    pub fn run_tests(&self, run_id: &str) -> Vec<Row> {
        self.query_or_panic(
            "run_tests",
            "SELECT * FROM run_tests WHERE run_id = ?1 ORDER BY test_index",
            &[&run_id],
        )
    }

    pub fn results(&self, run_id: &str) -> Vec<Row> {
        self.query_or_panic(
            "results",
            "SELECT * FROM results WHERE run_id = ?1 ORDER BY test_index",
            &[&run_id],
        )
    }

    pub fn reports(&self, run_id: &str) -> Vec<Row> {
        self.query_or_panic(
            "reports",
            "SELECT * FROM reports WHERE run_id = ?1 ORDER BY test_index",
            &[&run_id],
        )
    }

    pub fn agents(&self) -> Result<Vec<Row>, String> {
        self.query("agents", "SELECT * FROM agents", &[])
    }
}

/// Rows of `table` in the database at `path`, or `None` while the database or the table does
/// not exist yet. For polling a coordinator that is still starting.
pub fn try_count(path: &Path, table: &str) -> Option<i64> {
    let db = FlyDb::open(path).ok()?;
    let rows = db
        .query(table, &format!("SELECT COUNT(*) AS n FROM {table}"), &[])
        .ok()?;
    rows.first().and_then(|row| row.int("n"))
}
