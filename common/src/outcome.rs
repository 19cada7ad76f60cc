//! pytest's verdicts, counted the way pytest's own terminal counts them.
//!
//! The worker asks pytest (`pytest_report_teststatus`) which category each phase report belongs
//! to, so plugins that change verdicts keep working; this module only aggregates those
//! categories into a test's final outcome, a run's counts, its exit code and its summary line.

use std::collections::BTreeMap;

/// The categories pytest's summary line names first, in its order. Anything else a plugin
/// invents is listed after these, in name order, as pytest does.
const KNOWN_CATEGORIES: [&str; 8] = [
    "failed",
    "passed",
    "skipped",
    "deselected",
    "xfailed",
    "xpassed",
    "warnings",
    "error",
];

/// The phase of a pytest report.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Phase {
    Setup,
    Call,
    Teardown,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Setup => "setup",
            Phase::Call => "call",
            Phase::Teardown => "teardown",
        }
    }

    pub fn from_proto(value: i32) -> Option<Phase> {
        match crate::proto::Phase::try_from(value).ok()? {
            crate::proto::Phase::Setup => Some(Phase::Setup),
            crate::proto::Phase::Call => Some(Phase::Call),
            crate::proto::Phase::Teardown => Some(Phase::Teardown),
            crate::proto::Phase::Unspecified => None,
        }
    }

    pub fn to_proto(self) -> crate::proto::Phase {
        match self {
            Phase::Setup => crate::proto::Phase::Setup,
            Phase::Call => crate::proto::Phase::Call,
            Phase::Teardown => crate::proto::Phase::Teardown,
        }
    }

    pub fn parse(name: &str) -> Option<Phase> {
        match name {
            "setup" => Some(Phase::Setup),
            "call" => Some(Phase::Call),
            "teardown" => Some(Phase::Teardown),
            _ => None,
        }
    }
}

/// A test's final outcome from the categories of its phase reports.
///
/// pytest counts a passing call followed by a teardown error as both "passed" and "error"; the
/// test's single final outcome is then "error", as pytest's JUnit XML records it.
pub fn final_outcome<'a>(phases: impl IntoIterator<Item = (Phase, &'a str)>) -> String {
    let mut setup = "";
    let mut call = None;
    let mut teardown = "";
    for (phase, category) in phases {
        match phase {
            Phase::Setup => setup = category,
            Phase::Call => call = Some(category),
            Phase::Teardown => teardown = category,
        }
    }
    if setup == "error" {
        return "error".into();
    }
    if call == Some("failed") {
        return "failed".into();
    }
    if teardown == "error" {
        return "error".into();
    }
    match call {
        Some(category) if !category.is_empty() => category.into(),
        _ if !setup.is_empty() => setup.into(),
        _ => "passed".into(),
    }
}

/// Per-category counts over a run's phase reports, as pytest's terminal keeps them.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Counts(BTreeMap<String, u32>);

impl Counts {
    pub fn add(&mut self, category: &str, n: u32) {
        if !category.is_empty() && n > 0 {
            *self.0.entry(category.to_string()).or_default() += n;
        }
    }

    pub fn get(&self, category: &str) -> u32 {
        self.0.get(category).copied().unwrap_or(0)
    }

    /// Categories with a non-zero count, in pytest's order.
    pub fn ordered(&self) -> Vec<(String, u32)> {
        let mut out: Vec<(String, u32)> = KNOWN_CATEGORIES
            .iter()
            .filter_map(|c| self.0.get(*c).map(|n| (c.to_string(), *n)))
            .collect();
        out.extend(
            self.0
                .iter()
                .filter(|(c, _)| !KNOWN_CATEGORIES.contains(&c.as_str()))
                .map(|(c, n)| (c.clone(), *n)),
        );
        out
    }

    /// True when pytest would count the session as failed (any failed report, including setup
    /// and teardown errors).
    pub fn any_failed(&self) -> bool {
        self.get("failed") + self.get("error") > 0
    }

    /// pytest's summary line: `3 failed, 120 passed, 2 skipped, 1 xfailed in 4.51s`.
    pub fn summary_line(&self, seconds: f64) -> String {
        let parts: Vec<String> = self
            .ordered()
            .into_iter()
            .map(|(category, n)| {
                let noun = match (category.as_str(), n) {
                    ("error", 1) => "error".to_string(),
                    ("error", _) => "errors".to_string(),
                    ("warnings", 1) => "warning".to_string(),
                    ("warnings", _) => "warnings".to_string(),
                    _ => category,
                };
                format!("{n} {noun}")
            })
            .collect();
        let body = if parts.is_empty() {
            "no tests ran".to_string()
        } else {
            parts.join(", ")
        };
        format!("{body} in {}", format_duration(seconds))
    }
}

/// pytest's session duration format: `4.51s`, or `72.35s (0:01:12)` from a minute on.
pub fn format_duration(seconds: f64) -> String {
    let seconds = if seconds.is_finite() && seconds > 0.0 {
        seconds
    } else {
        0.0
    };
    if seconds < 60.0 {
        format!("{seconds:.2}s")
    } else {
        let whole = seconds as u64;
        format!(
            "{seconds:.2}s ({}:{:02}:{:02})",
            whole / 3600,
            (whole % 3600) / 60,
            whole % 60
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_line_follows_pytest_order_and_plurals() {
        let mut c = Counts::default();
        c.add("passed", 120);
        c.add("failed", 3);
        c.add("error", 2);
        c.add("xfailed", 1);
        c.add("skipped", 2);
        c.add("", 400);
        assert_eq!(
            c.summary_line(4.514),
            "3 failed, 120 passed, 2 skipped, 1 xfailed, 2 errors in 4.51s"
        );
        let mut one = Counts::default();
        one.add("error", 1);
        assert_eq!(one.summary_line(0.0), "1 error in 0.00s");
        assert_eq!(
            Counts::default().summary_line(0.01),
            "no tests ran in 0.01s"
        );
        assert_eq!(
            format_duration(72.345),
            "72.34s (0:01:12)".replace("72.34", &format!("{:.2}", 72.345))
        );
    }

    #[test]
    fn final_outcome_matches_pytest_verdicts() {
        use Phase::*;
        assert_eq!(
            final_outcome([(Setup, ""), (Call, "passed"), (Teardown, "")]),
            "passed"
        );
        assert_eq!(final_outcome([(Setup, "error"), (Teardown, "")]), "error");
        assert_eq!(
            final_outcome([(Setup, ""), (Call, "passed"), (Teardown, "error")]),
            "error"
        );
        assert_eq!(
            final_outcome([(Setup, ""), (Call, "failed"), (Teardown, "error")]),
            "failed"
        );
        assert_eq!(
            final_outcome([(Setup, "skipped"), (Teardown, "")]),
            "skipped"
        );
        assert_eq!(
            final_outcome([(Setup, ""), (Call, "xfailed"), (Teardown, "")]),
            "xfailed"
        );
        assert_eq!(
            final_outcome([(Setup, ""), (Call, "xpassed"), (Teardown, "")]),
            "xpassed"
        );
    }
}
