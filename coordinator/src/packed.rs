//! Strings packed end to end in one buffer and read back by index: a run's node ids, kept once
//! for the whole run (in its [`crate::collection::Collection`]) instead of one allocation per
//! test. At a million tests that is about a quarter of the memory of the
//! strings as collected.

/// Strings in the order they were pushed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PackedStrings {
    text: String,
    /// Where each string ends in `text`.
    ends: Vec<usize>,
}

impl PackedStrings {
    /// Room for `count` strings of `bytes` in all.
    pub fn with_capacity(count: usize, bytes: usize) -> PackedStrings {
        PackedStrings {
            text: String::with_capacity(bytes),
            ends: Vec::with_capacity(count),
        }
    }

    pub fn push(&mut self, s: &str) {
        self.text.push_str(s);
        self.ends.push(self.text.len());
    }

    /// Gives back the room reserved beyond what the strings took.
    pub fn shrink_to_fit(&mut self) {
        self.text.shrink_to_fit();
        self.ends.shrink_to_fit();
    }

    pub fn len(&self) -> usize {
        self.ends.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ends.is_empty()
    }

    /// String `index`.
    pub fn get(&self, index: usize) -> Option<&str> {
        let end = *self.ends.get(index)?;
        let start = match index.checked_sub(1) {
            Some(previous) => *self.ends.get(previous)?,
            None => 0,
        };
        self.text.get(start..end)
    }

    /// Every string, in order.
    pub fn iter(&self) -> impl Iterator<Item = &str> {
        (0..self.len()).filter_map(|index| self.get(index))
    }
}

impl<'a> FromIterator<&'a str> for PackedStrings {
    fn from_iter<I: IntoIterator<Item = &'a str>>(strings: I) -> PackedStrings {
        let mut packed = PackedStrings::default();
        for s in strings {
            packed.push(s);
        }
        packed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strings_read_back_in_order() {
        let strings = ["t.py::a", "", "t.py::b[x-é]", "u.py::C::d"];
        let packed: PackedStrings = strings.iter().copied().collect();
        assert_eq!(packed.len(), 4);
        assert_eq!(packed.iter().collect::<Vec<_>>(), strings);
        assert_eq!(packed.get(2), Some("t.py::b[x-é]"));
        assert_eq!(packed.get(4), None);
        assert!(PackedStrings::default().is_empty());
    }
}
