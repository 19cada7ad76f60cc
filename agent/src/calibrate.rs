//! How fast this machine runs Python, relative to a reference core.
//!
//! Machines in a farm differ. The coordinator keeps duration history in reference seconds and
//! gives the longest tests to the fastest cores, so each agent measures its speed once at start:
//! the best of a few runs of a small pure-Python loop (the kind of work tests do), in the very
//! interpreter its workers use. The coordinator refines it later from observed test durations.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use tracing::warn;

/// The loop's time on the reference core: speed 1.0.
const REFERENCE_SECONDS: f64 = 0.010;

const SCRIPT: &str = r#"
import time
def spin(n):
    x = 0
    for k in range(n):
        x += k
    return x
best = None
for _ in range(5):
    t = time.perf_counter()
    spin(300000)
    d = time.perf_counter() - t
    best = d if best is None or d < best else best
print(best)
"#;

/// The speed of this machine's cores relative to the reference (2.0 = twice as fast), or 1.0
/// when it cannot be measured.
pub async fn speed(python: &Path) -> f64 {
    let python = python.to_path_buf();
    let measured = tokio::task::spawn_blocking(move || {
        Command::new(&python)
            .args(["-c", SCRIPT])
            .stdin(Stdio::null())
            .stderr(Stdio::null())
            .output()
    });
    let output = match tokio::time::timeout(Duration::from_secs(20), measured).await {
        Ok(Ok(Ok(output))) if output.status.success() => output,
        _ => {
            warn!("could not time the calibration loop; assuming reference speed");
            return 1.0;
        }
    };
    parse(&String::from_utf8_lossy(&output.stdout)).unwrap_or(1.0)
}

fn parse(text: &str) -> Option<f64> {
    let seconds: f64 = text.trim().parse().ok()?;
    (seconds.is_finite() && seconds > 0.0).then(|| (REFERENCE_SECONDS / seconds).clamp(0.01, 100.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn speed_is_the_reference_time_over_the_measured_one() {
        assert_eq!(parse("0.005\n"), Some(2.0));
        assert_eq!(parse("0.02"), Some(0.5));
        assert_eq!(parse("garbage"), None);
        assert_eq!(parse("-1"), None);
    }

    #[tokio::test]
    async fn a_missing_interpreter_means_reference_speed() {
        assert_eq!(speed(Path::new("/nonexistent/python")).await, 1.0);
    }
}
