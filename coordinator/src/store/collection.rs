//! A run's collection as the store writes it ([`super::Write::RunCollected`]): the node ids
//! packed end to end in one buffer, a file only where it is not the node id's part before the
//! first `::` (the `run_tests` view computes that one back), and the lines.
//!
//! The dispatcher builds it when it accepts a run's list, so the list itself (three strings per
//! test, over 100 MB at a million tests) can go as soon as the run's units are built instead
//! of living until the writer gets to the write.

use std::sync::Arc;

use fly_common::proto::CollectedTest;

use crate::packed::PackedStrings;

/// The rows of a run's collection, by test index.
#[derive(Debug, Clone, Default)]
pub struct CollectionRows {
    /// Every node id, in order: shared with the dispatcher, which keeps them for the run.
    nodeids: Arc<PackedStrings>,
    /// The file of each test when it is not the one its node id names.
    files: Vec<Option<Box<str>>>,
    /// 1-based line of each test; 0 when unknown.
    lines: Vec<u32>,
}

/// One test of a [`CollectionRows`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CollectionRow<'a> {
    pub nodeid: &'a str,
    /// `None` when the file is the node id's part before the first `::`.
    pub file: Option<&'a str>,
    /// 1-based; 0 when unknown.
    pub line: u32,
}

impl CollectionRows {
    /// The rows of `tests`, in order.
    pub fn new(tests: &[CollectedTest]) -> CollectionRows {
        let bytes = tests.iter().map(|t| t.nodeid.len()).sum();
        let mut nodeids = PackedStrings::with_capacity(tests.len(), bytes);
        let mut files = Vec::with_capacity(tests.len());
        let mut lines = Vec::with_capacity(tests.len());
        for test in tests {
            nodeids.push(&test.nodeid);
            files.push(file_to_store(&test.nodeid, &test.file).map(Box::from));
            lines.push(test.line);
        }
        CollectionRows {
            nodeids: Arc::new(nodeids),
            files,
            lines,
        }
    }

    /// The node ids, in order.
    pub fn nodeids(&self) -> &Arc<PackedStrings> {
        &self.nodeids
    }

    /// How many tests.
    pub fn len(&self) -> usize {
        self.nodeids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.nodeids.is_empty()
    }

    /// Test `index`.
    pub fn get(&self, index: usize) -> Option<CollectionRow<'_>> {
        Some(CollectionRow {
            nodeid: self.nodeids.get(index)?,
            file: self.files.get(index)?.as_deref(),
            line: *self.lines.get(index)?,
        })
    }

    /// Every test, in order.
    pub fn iter(&self) -> impl Iterator<Item = CollectionRow<'_>> {
        (0..self.len()).filter_map(|index| self.get(index))
    }
}

impl From<&[CollectedTest]> for CollectionRows {
    fn from(tests: &[CollectedTest]) -> CollectionRows {
        CollectionRows::new(tests)
    }
}

/// The file to store for a collected test: none when it is the node id's part before the first
/// `::`, which the `run_tests` view computes back.
fn file_to_store<'a>(nodeid: &str, file: &'a str) -> Option<&'a str> {
    let derived = nodeid.find("::").map(|end| &nodeid[..end]);
    (derived != Some(file)).then_some(file)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_is_left_out_only_when_the_view_can_compute_it() {
        assert_eq!(file_to_store("a/t.py::test_x", "a/t.py"), None);
        assert_eq!(file_to_store("a/t.py::C::test_x[1]", "a/t.py"), None);
        assert_eq!(file_to_store("a/t.py::test_x", "b/t.py"), Some("b/t.py"));
        assert_eq!(file_to_store("a/t.py", "a/t.py"), Some("a/t.py"));
        assert_eq!(file_to_store("", ""), Some(""));
    }

    #[test]
    fn rows_read_back_as_collected() {
        let tests: Vec<CollectedTest> = [
            ("t.py::a", "t.py", 3),
            ("t.py::b[x-é::y]", "t.py", 0),
            ("", "", 1),
            ("u.py::C::d", "elsewhere.py", 9),
        ]
        .iter()
        .map(|(nodeid, file, line)| CollectedTest {
            nodeid: nodeid.to_string(),
            file: file.to_string(),
            line: *line,
            group: String::new(),
        })
        .collect();
        let rows = CollectionRows::new(&tests);
        assert_eq!(rows.len(), 4);
        let back: Vec<(&str, &str, u32)> = rows
            .iter()
            .map(|row| {
                let file = row
                    .file
                    .unwrap_or_else(|| row.nodeid.split("::").next().unwrap_or_default());
                (row.nodeid, file, row.line)
            })
            .collect();
        let expected: Vec<(&str, &str, u32)> = tests
            .iter()
            .map(|t| (t.nodeid.as_str(), t.file.as_str(), t.line))
            .collect();
        assert_eq!(back, expected);
        assert_eq!(rows.get(4), None);
    }
}
