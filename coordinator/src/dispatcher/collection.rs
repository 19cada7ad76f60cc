//! A run's collection as the dispatcher keeps it: the list as collected until the run's units
//! are built, then only the tests' node ids, packed in one buffer. The packed ids are made once,
//! when the list is accepted, with the store's rows of it ([`crate::store::CollectionRows`]),
//! and shared.
//!
//! Once the units are built, a node id is all the dispatcher looks up by test index (to name a
//! test in its reports, results, notices and the dashboard). At a million tests the collected
//! list takes over 100 MB (three strings and a line per test, each string its own allocation);
//! the node ids alone, packed, take a quarter of that.

use std::sync::Arc;

use fly_common::proto::CollectedTest;

use crate::packed::PackedStrings;

/// A run's tests, by index.
pub(super) enum Collection {
    /// As collected, until the run's units are built from it; with the node ids packed, as
    /// the store got them.
    Full {
        tests: Arc<Vec<CollectedTest>>,
        nodeids: Arc<PackedStrings>,
    },
    /// Only the node ids, once nothing needs more.
    Ids(Arc<PackedStrings>),
}

impl Collection {
    pub(super) fn len(&self) -> usize {
        match self {
            Collection::Full { tests, .. } => tests.len(),
            Collection::Ids(ids) => ids.len(),
        }
    }

    /// The node id of test `index`.
    pub(super) fn nodeid(&self, index: usize) -> Option<&str> {
        match self {
            Collection::Full { tests, .. } => tests.get(index).map(|t| t.nodeid.as_str()),
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
            Collection::Full { tests, .. } => Some(tests),
            Collection::Ids(_) => None,
        }
    }

    /// Keeps only the node ids, if nobody else holds the list any more. Call it only once the
    /// run's units are built: they need the rest.
    pub(super) fn compact(&mut self) {
        if let Collection::Full { tests, nodeids } = self {
            if Arc::strong_count(tests) == 1 {
                *self = Collection::Ids(nodeids.clone());
            }
        }
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
        let list = tests(&ids);
        let mut collection = Collection::Full {
            nodeids: Arc::new(list.iter().map(|t| t.nodeid.as_str()).collect()),
            tests: Arc::new(list),
        };
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
        let mut collection = Collection::Full {
            tests: shared.clone(),
            nodeids: Arc::new(shared.iter().map(|t| t.nodeid.as_str()).collect()),
        };
        collection.compact();
        assert!(collection.full().is_some());
        drop(shared);
        collection.compact();
        assert!(collection.full().is_none());
        assert_eq!(collection.nodeid(0), Some("t.py::a"));
    }
}
