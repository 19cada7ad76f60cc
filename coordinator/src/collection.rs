//! A run's collection, compact: what the dispatcher keeps for the whole run, what the units are
//! built from, and what the store writes, all one shared value.
//!
//! It is built as the agent's chunks arrive ([`Collection::push`]), so the list as sent (three
//! strings and a line per test, each string its own allocation: over 100 MB at a million tests)
//! never exists whole. The node ids are packed end to end in one buffer; a test's file is kept
//! only where it is not the node id's part before the first `::` (pytest's usual case, which
//! the store's `run_tests` view computes back too), and its `xdist_group` only where it has one.

use fly_common::proto::CollectedTest;

use crate::packed::PackedStrings;

/// A run's tests, by index, in collection order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Collection {
    nodeids: PackedStrings,
    /// 1-based line of each test; 0 when unknown.
    lines: Vec<u32>,
    /// The tests whose file is not the one their node id names, by increasing index.
    files: Vec<(u32, Box<str>)>,
    /// The tests marked `xdist_group(name=...)`, by increasing index.
    groups: Vec<(u32, Box<str>)>,
}

/// One test of a [`Collection`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CollectedRow<'a> {
    pub nodeid: &'a str,
    /// `None` when the file is the node id's part before the first `::`.
    pub file: Option<&'a str>,
    /// 1-based; 0 when unknown.
    pub line: u32,
}

impl Collection {
    /// Room for `count` tests.
    pub fn with_capacity(count: usize) -> Collection {
        Collection {
            // Node ids are rarely shorter than this; the buffer grows if they are longer.
            nodeids: PackedStrings::with_capacity(count, count * 24),
            lines: Vec::with_capacity(count),
            files: Vec::new(),
            groups: Vec::new(),
        }
    }

    /// Adds the next test.
    pub fn push(&mut self, test: &CollectedTest) {
        let index = self.len() as u32;
        if file_of_nodeid(&test.nodeid) != Some(test.file.as_str()) {
            self.files.push((index, Box::from(test.file.as_str())));
        }
        if !test.group.is_empty() {
            self.groups.push((index, Box::from(test.group.as_str())));
        }
        self.nodeids.push(&test.nodeid);
        self.lines.push(test.line);
    }

    /// Gives back the room reserved beyond what the tests took.
    pub fn shrink_to_fit(&mut self) {
        self.nodeids.shrink_to_fit();
        self.lines.shrink_to_fit();
        self.files.shrink_to_fit();
        self.groups.shrink_to_fit();
    }

    pub fn len(&self) -> usize {
        self.nodeids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.nodeids.is_empty()
    }

    /// The node id of test `index`.
    pub fn nodeid(&self, index: usize) -> Option<&str> {
        self.nodeids.get(index)
    }

    /// Every node id, in collection order.
    pub fn nodeids(&self) -> impl Iterator<Item = &str> {
        self.nodeids.iter()
    }

    /// The `xdist_group` name of test `index`; empty when it has none.
    pub fn group(&self, index: usize) -> &str {
        sparse(&self.groups, index).unwrap_or_default()
    }

    /// Test `index`.
    pub fn get(&self, index: usize) -> Option<CollectedRow<'_>> {
        Some(CollectedRow {
            nodeid: self.nodeids.get(index)?,
            file: sparse(&self.files, index),
            line: *self.lines.get(index)?,
        })
    }

    /// Every test, in order.
    pub fn iter(&self) -> impl Iterator<Item = CollectedRow<'_>> {
        (0..self.len()).filter_map(|index| self.get(index))
    }
}

impl<'a> FromIterator<&'a CollectedTest> for Collection {
    fn from_iter<I: IntoIterator<Item = &'a CollectedTest>>(tests: I) -> Collection {
        let mut collection = Collection::default();
        for test in tests {
            collection.push(test);
        }
        collection
    }
}

impl From<&[CollectedTest]> for Collection {
    fn from(tests: &[CollectedTest]) -> Collection {
        tests.iter().collect()
    }
}

/// The file a node id names: its part before the first `::`.
fn file_of_nodeid(nodeid: &str) -> Option<&str> {
    nodeid.find("::").map(|end| &nodeid[..end])
}

fn sparse(entries: &[(u32, Box<str>)], index: usize) -> Option<&str> {
    let index = u32::try_from(index).ok()?;
    entries
        .binary_search_by_key(&index, |(i, _)| *i)
        .ok()
        .map(|at| &*entries[at].1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn test(nodeid: &str, file: &str, line: u32, group: &str) -> CollectedTest {
        CollectedTest {
            nodeid: nodeid.to_string(),
            file: file.to_string(),
            line,
            group: group.to_string(),
        }
    }

    #[test]
    fn tests_read_back_as_collected() {
        let tests = vec![
            test("t.py::a", "t.py", 3, ""),
            test("t.py::b[x-é::y]", "t.py", 0, "db"),
            test("", "", 1, ""),
            test("u.py::C::d", "elsewhere.py", 9, ""),
            test("a/t.py", "a/t.py", 2, "db"),
        ];
        let collection = Collection::from(tests.as_slice());
        assert_eq!(collection.len(), 5);
        let back: Vec<(&str, &str, u32, &str)> = collection
            .iter()
            .enumerate()
            .map(|(index, row)| {
                let file = row
                    .file
                    .unwrap_or_else(|| row.nodeid.split("::").next().unwrap_or_default());
                (row.nodeid, file, row.line, collection.group(index))
            })
            .collect();
        let expected: Vec<(&str, &str, u32, &str)> = tests
            .iter()
            .map(|t| (t.nodeid.as_str(), t.file.as_str(), t.line, t.group.as_str()))
            .collect();
        assert_eq!(back, expected);
        assert_eq!(collection.get(5), None);
        assert_eq!(collection.nodeid(1), Some("t.py::b[x-é::y]"));
        assert_eq!(collection.group(7), "");
    }

    #[test]
    fn file_is_kept_only_when_the_node_id_does_not_name_it() {
        let collection = Collection::from(
            [
                test("a/t.py::test_x", "a/t.py", 1, ""),
                test("a/t.py::C::test_x[1]", "a/t.py", 1, ""),
                test("a/t.py::test_x", "b/t.py", 1, ""),
                test("a/t.py", "a/t.py", 1, ""),
                test("", "", 1, ""),
            ]
            .as_slice(),
        );
        let files: Vec<Option<&str>> = collection.iter().map(|row| row.file).collect();
        assert_eq!(
            files,
            [None, None, Some("b/t.py"), Some("a/t.py"), Some("")]
        );
    }
}
