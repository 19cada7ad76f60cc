//! The fixture project's gate (`tests/fixtures/project/test_gate.py`): with `FLY_GATE_FILE`
//! set, that test holds its worker until the file exists. Tests use it to keep a run open while
//! something else happens, with no timing assumption.

use std::path::{Path, PathBuf};

/// A gate file, opened at the latest when dropped, so a failing test never leaves a pytest
/// worker waiting on it.
pub struct Gate(PathBuf);

impl Gate {
    pub fn new(path: PathBuf) -> Gate {
        Gate(path)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    pub fn open(&self) {
        std::fs::write(&self.0, b"open")
            .unwrap_or_else(|e| panic!("writing {}: {e}", self.0.display()));
    }
}

impl Drop for Gate {
    fn drop(&mut self) {
        let _ = std::fs::write(&self.0, b"open");
    }
}
