//! Which agents may serve a run: the labels a run requires (`run --require KEY=VALUE`, sent as
//! `SubmitRequest.required_labels`) against the labels an agent carries (`fly-agent --label
//! KEY=VALUE`, sent in its `AgentHello`). A farm can so hold several Python versions or
//! operating systems, and a run goes only to the machines it names.

use std::collections::{BTreeMap, HashMap};

/// True when `agent` carries every required label with the required value. A run that requires
/// nothing can go to any agent; labels the run does not mention do not matter.
pub fn satisfies(agent: &HashMap<String, String>, required: &HashMap<String, String>) -> bool {
    required
        .iter()
        .all(|(key, value)| agent.get(key) == Some(value))
}

/// `key=value, key=value`, sorted by key: for messages such as "waiting for an agent with ...".
pub fn describe(labels: &HashMap<String, String>) -> String {
    let sorted: BTreeMap<&String, &String> = labels.iter().collect();
    sorted
        .into_iter()
        .map(|(key, value)| format!("{key}={value}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Parses one `KEY=VALUE` (clap's value parser for `--require`). The value may be empty and
/// may itself contain `=`; the key may not be empty.
pub fn parse_label(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((key, value)) if !key.is_empty() => Ok((key.to_string(), value.to_string())),
        _ => Err(format!("expected KEY=VALUE, got {s:?}")),
    }
}

/// The requirement map of a run from its `--require` pairs. Requiring one key with two
/// different values could never be met, so it is an error rather than a run that waits forever.
pub fn requirements(pairs: &[(String, String)]) -> Result<HashMap<String, String>, String> {
    let mut required = HashMap::new();
    for (key, value) in pairs {
        if let Some(previous) = required.insert(key.clone(), value.clone()) {
            if previous != *value {
                return Err(format!(
                    "--require {key}={previous} and --require {key}={value} cannot both hold"
                ));
            }
        }
    }
    Ok(required)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn an_agent_serves_a_run_when_it_carries_every_required_label() {
        let agent = map(&[("os", "linux"), ("python", "3.12"), ("zone", "eu")]);
        assert!(satisfies(&agent, &map(&[])));
        assert!(satisfies(&agent, &map(&[("os", "linux")])));
        assert!(satisfies(
            &agent,
            &map(&[("os", "linux"), ("python", "3.12")])
        ));
        assert!(!satisfies(&agent, &map(&[("python", "3.13")])));
        assert!(!satisfies(
            &agent,
            &map(&[("os", "linux"), ("gpu", "a100")])
        ));
        assert!(!satisfies(&map(&[]), &map(&[("os", "linux")])));
        // An empty value is a value: it does not match a missing label.
        assert!(!satisfies(&agent, &map(&[("gpu", "")])));
        assert!(satisfies(&map(&[("gpu", "")]), &map(&[("gpu", "")])));
    }

    #[test]
    fn requirements_are_described_in_key_order() {
        assert_eq!(
            describe(&map(&[("python", "3.12"), ("os", "linux")])),
            "os=linux, python=3.12"
        );
        assert_eq!(describe(&map(&[])), "");
    }

    #[test]
    fn labels_parse_as_key_equals_value() {
        assert_eq!(parse_label("os=linux"), Ok(("os".into(), "linux".into())));
        assert_eq!(parse_label("k=a=b"), Ok(("k".into(), "a=b".into())));
        assert_eq!(parse_label("k="), Ok(("k".into(), String::new())));
        assert!(parse_label("=v").is_err());
        assert!(parse_label("novalue").is_err());
    }

    #[test]
    fn one_key_with_two_values_cannot_be_required() {
        let pairs = |list: &[(&str, &str)]| -> Vec<(String, String)> {
            list.iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        let ok = requirements(&pairs(&[("os", "linux"), ("os", "linux"), ("py", "3")])).unwrap();
        assert_eq!(ok, map(&[("os", "linux"), ("py", "3")]));
        let err = requirements(&pairs(&[("os", "linux"), ("os", "macos")])).unwrap_err();
        assert!(
            err.contains("os=linux") && err.contains("os=macos"),
            "{err}"
        );
    }
}
