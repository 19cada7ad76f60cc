//! A run's collection as the dispatcher keeps it: the list as collected until the run's units
//! are built, then only the tests' node ids, in one buffer. (The store writes its own compact
//! copy, [`crate::store::CollectionRows`], made when the list is accepted.)
//!
//! Once the units are built, a node id is all the dispatcher looks up by test index (to name a
//! test in its reports, results, notices and the dashboard). At a million tests the collected
//! list takes over 100 MB (three strings and a line per test, each string its own allocation);
//! the node ids alone, packed, take a quarter of that.

use std::sync::Arc;

use fly_common::proto::CollectedTest;

/// A run's tests, by index.
pub(super) enum Collection {
    /// As collected, until the run's units are built from it.
    Full(Arc<Vec<CollectedTest>>),
    /// Only the node ids, once nothing needs more.
    Ids(NodeIds),
}

impl Collection {
    pub(super) fn len(&self) -> usize {
        match self {
            Collection::Full(tests) => tests.len(),
            Collection::Ids(ids) => ids.len(),
        }
    }

    /// The node id of test `index`.
    pub(super) fn nodeid(&self, index: usize) -> Option<&str> {
        match self {
            Collection::Full(tests) => tests.get(index).map(|t| t.nodeid.as_str()),
            Collection::Ids(ids) => ids.get(index),
        }
    }

    /// Every node id, in collection order.
    pub(super) fn nodeids(&self) -> impl Iterator<Item = &str> {
        (0..self.len()).filter_map(|index| self.nodeid(index))
    }

    /// The list as collected, while it is kept.
    pub(super) fn full(&self) -> Option<&Arc<Vec<CollectedTest>>> {
        match self {
            Collection::Full(tests) => Some(tests),
            Collection::Ids(_) => None,
        }
    }

    /// Keeps only the node ids, if nobody else holds the list any more. Call it only once the
    /// run's units are built: they need the rest.
    pub(super) fn compact(&mut self) {
        let Collection::Full(tests) = self else {
            return;
        };
        if Arc::strong_count(tests) != 1 {
            return;
        }
        let full = std::mem::replace(self, Collection::Ids(NodeIds::default()));
        let Collection::Full(tests) = full else {
            return;
        };
        *self = match Arc::try_unwrap(tests) {
            Ok(tests) => match NodeIds::new(tests) {
                Ok(ids) => Collection::Ids(ids),
                Err(tests) => Collection::Full(Arc::new(tests)),
            },
            Err(tests) => Collection::Full(tests),
        };
    }
}

/// Node ids packed end to end in one string, with where each one ends.
#[derive(Default)]
pub(super) struct NodeIds {
    text: String,
    ends: Vec<u32>,
}

impl NodeIds {
    /// The node ids of `tests`; the tests back if their node ids add up to more than 4 GB.
    fn new(tests: Vec<CollectedTest>) -> Result<NodeIds, Vec<CollectedTest>> {
        let total: usize = tests.iter().map(|t| t.nodeid.len()).sum();
        if u32::try_from(total).is_err() {
            return Err(tests);
        }
        let mut ids = NodeIds {
            text: String::with_capacity(total),
            ends: Vec::with_capacity(tests.len()),
        };
        for test in tests {
            ids.text.push_str(&test.nodeid);
            // Cannot fail: the whole text fits in a u32.
            ids.ends
                .push(u32::try_from(ids.text.len()).unwrap_or(u32::MAX));
        }
        Ok(ids)
    }

    fn len(&self) -> usize {
        self.ends.len()
    }

    fn get(&self, index: usize) -> Option<&str> {
        let end = *self.ends.get(index)? as usize;
        let start = match index.checked_sub(1) {
            Some(previous) => *self.ends.get(previous)? as usize,
            None => 0,
        };
        self.text.get(start..end)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tests(ids: &[&str]) -> Vec<CollectedTest> {
        ids.iter()
            .map(|id| CollectedTest {
                nodeid: id.to_string(),
                file: id.split("::").next().unwrap_or_default().to_string(),
                line: 1,
                group: String::new(),
            })
            .collect()
    }

    #[test]
    fn node_ids_read_the_same_before_and_after_compacting() {
        let ids = ["t.py::a", "t.py::b[x-é]", "", "u.py::C::d"];
        let mut collection = Collection::Full(Arc::new(tests(&ids)));
        let before: Vec<String> = collection.nodeids().map(str::to_string).collect();
        collection.compact();
        assert!(collection.full().is_none(), "compacted");
        assert_eq!(collection.len(), ids.len());
        assert_eq!(collection.nodeids().collect::<Vec<_>>(), before);
        assert_eq!(collection.nodeid(1), Some("t.py::b[x-é]"));
        assert_eq!(collection.nodeid(4), None);
    }

    #[test]
    fn a_list_someone_else_still_holds_is_kept_whole() {
        let shared = Arc::new(tests(&["t.py::a"]));
        let mut collection = Collection::Full(shared.clone());
        collection.compact();
        assert!(collection.full().is_some());
        drop(shared);
        collection.compact();
        assert!(collection.full().is_none());
        assert_eq!(collection.nodeid(0), Some("t.py::a"));
    }
}
