//! What `fly-coordinator run` prints, in pytest's own shapes: the live progress while tests
//! run, then the ERRORS and FAILURES sections with each traceback, the slowest durations, the
//! short test summary, and the `=== 1 failed, 3 passed in 0.52s ===` line, so people and tools
//! that read pytest output read fly's.

pub mod durations;
pub mod progress;

use console::Style as Paint;
use fly_common::outcome::{format_duration, Counts, Phase};
use fly_common::proto::{RunFinished, TestResult};

pub use durations::Durations;
pub use progress::Progress;

/// `--color`: pytest's choices and meanings.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum ColorChoice {
    /// When stdout is a terminal (and the environment does not say otherwise).
    #[default]
    Auto,
    /// Always, even into a pipe or a file.
    Yes,
    /// Never.
    No,
}

/// The `run` options about what is printed. Flattened into `run`'s arguments.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct TerminalArgs {
    /// After the run, list the N slowest setup/call/teardown phases, as pytest's --durations
    /// (0: all). A `--durations` among the pytest arguments after `--` is taken as this one:
    /// the workers' own pytest would print its list to nobody.
    #[arg(long, value_name = "N")]
    pub durations: Option<usize>,
    /// Leave phases shorter than SECONDS out of --durations (default 0.005, or 0 with -vv), as
    /// pytest's --durations-min; also taken from the pytest arguments.
    #[arg(long, value_name = "SECONDS")]
    pub durations_min: Option<f64>,
    /// Colour the output: `yes`, `no`, or `auto` (when stdout is a terminal; NO_COLOR,
    /// PY_COLORS, FORCE_COLOR and TERM=dumb count as pytest counts them).
    #[arg(long, value_enum, default_value = "auto", value_name = "WHEN")]
    pub color: ColorChoice,
}

/// What the client needs to know to print a run: the choices of [`TerminalArgs`] and the
/// verbosity of the pytest arguments.
#[derive(Debug, Clone, Default)]
pub struct Options {
    pub durations: Option<usize>,
    pub durations_min: Option<f64>,
    pub color: ColorChoice,
    /// pytest's verbosity from the pytest arguments (`-v` 1, `-vv` 2, `-q` -1).
    pub verbosity: i32,
}

impl TerminalArgs {
    /// The options for a run with `pytest_args`. A `--durations`/`--durations-min` among
    /// them is taken out (fly prints the list from what the workers report); one given before
    /// `--` wins over one after it.
    pub fn options(&self, pytest_args: &mut Vec<String>) -> Options {
        let (durations, durations_min) = take_durations(pytest_args);
        Options {
            durations: self.durations.or(durations),
            durations_min: self.durations_min.or(durations_min),
            color: self.color,
            verbosity: verbosity(pytest_args),
        }
    }
}

/// Takes `--durations N`, `--durations=N`, `--durations-min S` and `--durations-min=S` out of
/// pytest's arguments and returns their values (the last one wins, as with argparse). A value
/// that does not parse is left where it is, for pytest to refuse with its usage message.
pub fn take_durations(args: &mut Vec<String>) -> (Option<usize>, Option<f64>) {
    let mut durations = None;
    let mut durations_min = None;
    let mut kept = Vec::with_capacity(args.len());
    let mut i = 0;
    while i < args.len() {
        let arg = &args[i];
        // (flag, its value, how many arguments it spans)
        let found = match arg.split_once('=') {
            Some((flag @ ("--durations" | "--durations-min"), value)) => {
                Some((flag, value.to_string(), 1))
            }
            _ if arg == "--durations" || arg == "--durations-min" => args
                .get(i + 1)
                .map(|value| (arg.as_str(), value.clone(), 2)),
            _ => None,
        };
        let taken = match found {
            Some(("--durations", value, span)) => value.parse::<usize>().ok().map(|n| {
                durations = Some(n);
                span
            }),
            Some((_, value, span)) => {
                value
                    .parse::<f64>()
                    .ok()
                    .filter(|s| s.is_finite())
                    .map(|s| {
                        durations_min = Some(s);
                        span
                    })
            }
            None => None,
        };
        match taken {
            Some(span) => i += span,
            None => {
                kept.push(args[i].clone());
                i += 1;
            }
        }
    }
    *args = kept;
    (durations, durations_min)
}

/// pytest's verbosity from its arguments: each `v` in `-v`, `-vv`, `-vs`... and `--verbose`
/// adds one, each `q` and `--quiet` takes one away. Only clusters of pytest's flag letters that
/// take no value are read (`-k v` is no verbosity); `-o verbosity_*` and ini files are not.
pub fn verbosity(args: &[String]) -> i32 {
    let mut level = 0;
    for arg in args {
        match arg.as_str() {
            "--verbose" => level += 1,
            "--quiet" => level -= 1,
            short if short.len() > 1 && short.starts_with('-') && !short.starts_with("--") => {
                let letters = &short[1..];
                if letters.chars().all(|c| "vqsxl".contains(c)) {
                    level += letters.matches('v').count() as i32;
                    level -= letters.matches('q').count() as i32;
                }
            }
            _ => {}
        }
    }
    level
}

/// True on a CI system, as pytest tells (`CI` or `BUILD_NUMBER` set): pytest then prints short
/// summary messages whole instead of cutting them to the terminal width.
pub fn running_on_ci() -> bool {
    std::env::var_os("CI").is_some() || std::env::var_os("BUILD_NUMBER").is_some()
}

/// Whether to colour, as pytest decides for its stdout: `--color yes/no` first, then
/// `PY_COLORS=1/0`, `NO_COLOR`, `FORCE_COLOR`, and otherwise a terminal that is not
/// `TERM=dumb`. `env` reads a variable (the process environment in [`Style::detect`]).
pub fn use_color(
    choice: ColorChoice,
    is_terminal: bool,
    env: impl Fn(&str) -> Option<String>,
) -> bool {
    match choice {
        ColorChoice::Yes => return true,
        ColorChoice::No => return false,
        ColorChoice::Auto => {}
    }
    match env("PY_COLORS").as_deref() {
        Some("1") => return true,
        Some("0") => return false,
        _ => {}
    }
    if env("NO_COLOR").is_some_and(|v| !v.is_empty()) {
        return false;
    }
    if env("FORCE_COLOR").is_some_and(|v| !v.is_empty()) {
        return true;
    }
    is_terminal && env("TERM").as_deref() != Some("dumb")
}

/// How the end of a run is printed.
#[derive(Debug, Clone)]
pub struct Style {
    /// Columns, for separator lines and short summary messages.
    pub width: usize,
    pub color: bool,
    /// Print short summary messages whole (on CI, or with -vv), as pytest does.
    pub full_messages: bool,
}

impl Style {
    /// The style for this process's stdout.
    pub fn detect(options: &Options) -> Style {
        use std::io::IsTerminal;
        let env = |name: &str| std::env::var(name).ok();
        Style {
            width: width(),
            color: use_color(options.color, std::io::stdout().is_terminal(), env),
            full_messages: running_on_ci() || options.verbosity >= 2,
        }
    }

    /// Plain text, 80 columns: what a pipe gets.
    pub fn plain() -> Style {
        Style {
            width: 80,
            color: false,
            full_messages: false,
        }
    }

    fn paint(&self, paint: Paint, text: &str) -> String {
        if self.color {
            paint.force_styling(true).apply_to(text).to_string()
        } else {
            text.to_string()
        }
    }
}

/// pytest's separator line: `==== title ====` filling `width` columns.
pub fn sep(ch: char, title: &str, width: usize) -> String {
    let (left, right) = sep_sides(ch, title, width);
    if title.is_empty() {
        return left;
    }
    format!("{left} {title} {right}")
}

/// The fill on either side of a separator's title (the whole line when there is no title).
fn sep_sides(ch: char, title: &str, width: usize) -> (String, String) {
    if title.is_empty() {
        return (ch.to_string().repeat(width), String::new());
    }
    let title_width = console::measure_text_width(title);
    let n = (width.saturating_sub(title_width + 2) / 2).max(1);
    let side = ch.to_string().repeat(n);
    let mut right = side.clone();
    // pytest fills an odd remainder on the right.
    if 2 * n + title_width + 2 < width {
        right.push(ch);
    }
    (side, right)
}

/// The terminal width pytest would use: `COLUMNS`, else the width of the terminal stdout is,
/// else 80; anything under 40 columns counts as 80.
pub fn width() -> usize {
    let columns = std::env::var("COLUMNS")
        .ok()
        .and_then(|c| c.parse::<usize>().ok())
        .filter(|w| *w > 0)
        .or_else(|| {
            console::Term::stdout()
                .size_checked()
                .map(|(_, cols)| usize::from(cols))
        });
    columns.filter(|w| *w >= 40).unwrap_or(80)
}

/// pytest's headline for a test: its name within the file, `Class.test[param]`.
pub fn head_line(nodeid: &str) -> String {
    let (path, params) = match nodeid.find('[') {
        Some(i) => nodeid.split_at(i),
        None => (nodeid, ""),
    };
    let name = match path.find("::") {
        Some(i) => &path[i + 2..],
        None => path,
    };
    format!("{}{}", name.replace("::", "."), params)
}

/// One line of pytest's short test summary: `FAILED nodeid - message`, the message cut to the
/// width with `...` unless `full` (pytest's `_get_line_with_reprcrash_message`). `word` is
/// printed as given (it may carry colour); `word_width` is its width on screen.
fn short_line(
    word: &str,
    word_width: usize,
    nodeid: &str,
    message: &str,
    width: usize,
    full: bool,
) -> String {
    let mut line = format!("{word} {nodeid}");
    if message.is_empty() {
        return line;
    }
    // Only the first line, as pytest's reprcrash message is used.
    let message = message.lines().next().unwrap_or_default();
    if full {
        line.push_str(" - ");
        line.push_str(message);
        return line;
    }
    let used = word_width + 1 + console::measure_text_width(nodeid);
    let mut available = width.saturating_sub(used);
    const FORMAT_WIDTH: usize = 3; // " - "
    const ELLIPSIS: &str = "...";
    if FORMAT_WIDTH + ELLIPSIS.len() > available {
        return line;
    }
    let mut text = message.to_string();
    if FORMAT_WIDTH + console::measure_text_width(&text) > available {
        available -= ELLIPSIS.len();
        text = text.chars().take(available).collect();
        while FORMAT_WIDTH + console::measure_text_width(&text) > available {
            text.pop();
        }
        text.push_str(ELLIPSIS);
    }
    line.push_str(" - ");
    line.push_str(&text);
    line
}

/// The message pytest's short summary shows for a failed phase: none when the report has no
/// crash location, which the worker's message tells by being the whole of a one-line longrepr
/// (a strict xpass: `[XPASS(strict)] reason`).
fn summary_message<'a>(message: &'a str, longrepr: &str) -> &'a str {
    if message.trim_end() == longrepr.trim_end() {
        ""
    } else {
        message
    }
}

/// pytest's colour for a category in the summary line.
fn category_color(category: &str) -> console::Color {
    match category {
        "failed" | "error" => console::Color::Red,
        "passed" => console::Color::Green,
        _ => console::Color::Yellow,
    }
}

/// The categories pytest's terminal knows; any other (a plugin's) turns the line yellow.
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

/// The summary line between its `=` fills: each count in its category's colour (bold when that
/// is the line's main colour), the fills and the time in the main colour, as pytest marks it up.
fn summary_line(counts: &Counts, seconds: f64, style: &Style) -> String {
    let plain = counts.summary_line(seconds);
    if !style.color {
        return sep('=', &plain, style.width);
    }
    let ordered = counts.ordered();
    let unknown_seen = ordered
        .iter()
        .any(|(c, _)| !KNOWN_CATEGORIES.contains(&c.as_str()));
    let main = if counts.any_failed() {
        console::Color::Red
    } else if counts.get("warnings") + counts.get("xpassed") > 0 || unknown_seen {
        console::Color::Yellow
    } else if counts.get("passed") > 0 {
        console::Color::Green
    } else {
        console::Color::Yellow
    };
    let in_main = |text: &str| style.paint(Paint::new().fg(main), text);
    let body = plain
        .rsplit_once(" in ")
        .map(|(body, _)| body)
        .unwrap_or(&plain);
    let parts: Vec<String> = if ordered.is_empty() {
        vec![style.paint(Paint::new().fg(main).bold(), body)]
    } else {
        body.split(", ")
            .zip(&ordered)
            .map(|(text, (category, _))| {
                let color = category_color(category);
                let paint = Paint::new().fg(color);
                style.paint(if color == main { paint.bold() } else { paint }, text)
            })
            .collect()
    };
    let (left, right) = sep_sides('=', &plain, style.width);
    format!(
        "{} {}{} {}",
        in_main(&left),
        parts.join(&in_main(", ")),
        in_main(&format!(" in {}", format_duration(seconds))),
        in_main(&right)
    )
}

/// Renders everything printed after the run: errors, failures, the slowest durations, the short
/// summary and the summary line. Tests are listed in collection order, as plain pytest lists
/// them (fly's results arrive in the order the workers finish them).
pub fn render_end(
    failures: &[TestResult],
    finished: &RunFinished,
    durations: Option<&Durations>,
    style: &Style,
) -> String {
    let width = style.width;
    let mut out = String::new();
    if !finished.output.is_empty() {
        out.push_str(finished.output.trim_end());
        out.push('\n');
    }
    let mut ordered: Vec<&TestResult> = failures.iter().collect();
    ordered.sort_by_key(|r| r.test_index);
    let mut failed_blocks = Vec::new();
    let mut error_blocks = Vec::new();
    let mut failed_short = Vec::new();
    let mut error_short = Vec::new();
    let red = || Paint::new().red();
    for result in ordered {
        let head = head_line(&result.nodeid);
        for phase in &result.phases {
            let Some(which) = Phase::from_proto(phase.phase) else {
                continue;
            };
            let mut block = String::new();
            let title = match (which, phase.category.as_str()) {
                (Phase::Call, "failed") => head.clone(),
                (Phase::Setup | Phase::Teardown, "error") => {
                    format!("ERROR at {} of {}", which.as_str(), head)
                }
                _ => continue,
            };
            block.push_str(&style.paint(red().bold(), &sep('_', &title, width)));
            block.push('\n');
            if !phase.longrepr.is_empty() {
                block.push_str(phase.longrepr.trim_end());
                block.push('\n');
            }
            for section in &phase.sections {
                block.push_str(&sep('-', &section.name, width));
                block.push('\n');
                block.push_str(section.text.trim_end());
                block.push('\n');
            }
            let word = if phase.category == "error" {
                "ERROR"
            } else {
                "FAILED"
            };
            let line = short_line(
                &style.paint(red(), word),
                word.len(),
                &result.nodeid,
                summary_message(&phase.message, &phase.longrepr),
                width,
                style.full_messages,
            );
            if phase.category == "error" {
                error_blocks.push(block);
                error_short.push(line);
            } else {
                failed_blocks.push(block);
                failed_short.push(line);
            }
        }
    }
    if !error_blocks.is_empty() {
        out.push_str(&sep('=', "ERRORS", width));
        out.push('\n');
        out.push_str(&error_blocks.concat());
    }
    if !failed_blocks.is_empty() {
        out.push_str(&sep('=', "FAILURES", width));
        out.push('\n');
        out.push_str(&failed_blocks.concat());
    }
    if let Some(durations) = durations {
        out.push_str(&durations.render(width));
    }
    // pytest's default `-r fE`: failures first, then errors.
    if !failed_short.is_empty() || !error_short.is_empty() {
        out.push_str(&sep('=', "short test summary info", width));
        out.push('\n');
        for line in failed_short.iter().chain(&error_short) {
            out.push_str(line);
            out.push('\n');
        }
    }
    if !finished.message.is_empty() {
        out.push_str(&format!("fly: {}\n", finished.message));
    }
    // When pytest stopped before running tests, its own output (above) already ends the way
    // pytest ends it; a second summary line would only repeat it.
    if finished.output.is_empty() {
        let mut counts = Counts::default();
        for c in &finished.counts {
            counts.add(&c.category, c.count);
        }
        out.push_str(&summary_line(&counts, finished.wall_seconds, style));
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use fly_common::proto::{CategoryCount, PhaseResult};

    fn strings(args: &[&str]) -> Vec<String> {
        args.iter().map(|a| a.to_string()).collect()
    }

    #[test]
    fn separator_lines_match_pytest() {
        // pytest: `=================== 1 passed in 0.01s ===================` (80 wide).
        let line = sep('=', "1 passed in 0.01s", 80);
        assert_eq!(line.len(), 80);
        assert_eq!(
            line,
            "============================== 1 passed in 0.01s ==============================="
        );
        assert_eq!(sep('=', "FAILURES", 80).len(), 80);
        assert_eq!(sep('=', "", 10), "==========");
    }

    #[test]
    fn head_lines_keep_parameters_whole() {
        assert_eq!(head_line("t.py::test_a"), "test_a");
        assert_eq!(head_line("t.py::TestX::test_a"), "TestX.test_a");
        assert_eq!(head_line("t.py::test_p[a::b c]"), "test_p[a::b c]");
    }

    fn failing(index: u32, nodeid: &str, longrepr: &str, message: &str) -> TestResult {
        TestResult {
            test_index: index,
            nodeid: nodeid.into(),
            outcome: "failed".into(),
            phases: vec![PhaseResult {
                phase: Phase::Call.to_proto() as i32,
                outcome: "failed".into(),
                category: "failed".into(),
                longrepr: longrepr.into(),
                message: message.into(),
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    fn finished(counts: &[(&str, u32)], seconds: f64) -> RunFinished {
        RunFinished {
            exit_code: 1,
            counts: counts
                .iter()
                .map(|(c, n)| CategoryCount {
                    category: c.to_string(),
                    count: *n,
                })
                .collect(),
            wall_seconds: seconds,
            ..Default::default()
        }
    }

    #[test]
    fn failures_and_errors_print_under_pytest_headers() {
        let failing = failing(1, "t.py::test_bad", "E   assert 1 == 2", "assert 1 == 2");
        let erroring = TestResult {
            test_index: 0,
            nodeid: "t.py::test_setup".into(),
            outcome: "error".into(),
            phases: vec![PhaseResult {
                phase: Phase::Setup.to_proto() as i32,
                outcome: "failed".into(),
                category: "error".into(),
                longrepr: "def f():\n>   raise RuntimeError('boom')\nE   RuntimeError: boom".into(),
                message: "RuntimeError: boom".into(),
                ..Default::default()
            }],
            ..Default::default()
        };
        let finished = finished(&[("failed", 1), ("error", 1)], 1.5);
        let text = render_end(&[failing, erroring], &finished, None, &Style::plain());
        let errors = text.find(" ERRORS ").unwrap();
        let failures = text.find(" FAILURES ").unwrap();
        assert!(errors < failures, "{text}");
        assert!(text.contains("ERROR at setup of test_setup"));
        // pytest lists failures before errors in the short summary.
        let short: Vec<&str> = text
            .lines()
            .skip_while(|l| !l.contains("short test summary info"))
            .skip(1)
            .take(2)
            .collect();
        assert_eq!(
            short,
            [
                "FAILED t.py::test_bad - assert 1 == 2",
                "ERROR t.py::test_setup - RuntimeError: boom"
            ],
            "{text}"
        );
        let last = text.lines().last().unwrap();
        assert!(
            last.starts_with("=") && last.contains(" 1 failed, 1 error in 1.50s "),
            "{text}"
        );
        assert!(!text.contains('\x1b'), "no colour in plain style: {text}");
    }

    #[test]
    fn failures_are_listed_in_collection_order() {
        let late = failing(7, "t.py::test_late", "E   late", "late");
        let early = failing(2, "t.py::test_early", "E   early", "early");
        let text = render_end(
            &[late, early],
            &finished(&[("failed", 2)], 0.1),
            None,
            &Style::plain(),
        );
        let early_at = text.find("_ test_early _").unwrap();
        let late_at = text.find("_ test_late _").unwrap();
        assert!(early_at < late_at, "{text}");
        assert!(
            text.find("FAILED t.py::test_early").unwrap()
                < text.find("FAILED t.py::test_late").unwrap()
        );
    }

    #[test]
    fn short_summary_messages_are_cut_to_the_width_like_pytest() {
        // What pytest 8 printed for the fixture project at 80 columns.
        let message = "AssertionError: assert 'left-side' == 'right-side-d...erate-failure'";
        let result = failing(0, "test_basic.py::test_fails", "E  ...\nlong", message);
        let text = render_end(
            std::slice::from_ref(&result),
            &finished(&[("failed", 1)], 0.1),
            None,
            &Style::plain(),
        );
        assert!(
            text.contains(
                "\nFAILED test_basic.py::test_fails - AssertionError: assert 'left-side' == 'rig...\n"
            ),
            "{text}"
        );
        let full = Style {
            full_messages: true,
            ..Style::plain()
        };
        let text = render_end(&[result], &finished(&[("failed", 1)], 0.1), None, &full);
        assert!(text.contains(&format!("FAILED test_basic.py::test_fails - {message}\n")));
        // No room even for " - ...": the message is left out.
        assert_eq!(
            short_line("FAILED", 6, &"x".repeat(70), "boom", 80, false),
            format!("FAILED {}", "x".repeat(70))
        );
    }

    #[test]
    fn a_strict_xpass_has_no_summary_message() {
        let xpass = failing(
            0,
            "test_marks.py::test_xpass_strict_fails",
            "[XPASS(strict)] strict-xpass-deliberate",
            "[XPASS(strict)] strict-xpass-deliberate",
        );
        let text = render_end(
            &[xpass],
            &finished(&[("failed", 1)], 0.1),
            None,
            &Style::plain(),
        );
        assert!(
            text.contains("\nFAILED test_marks.py::test_xpass_strict_fails\n"),
            "{text}"
        );
    }

    #[test]
    fn colour_marks_the_summary_line_but_keeps_its_text() {
        let style = Style {
            color: true,
            ..Style::plain()
        };
        let text = render_end(
            &[],
            &finished(&[("failed", 1), ("passed", 3)], 0.5),
            None,
            &style,
        );
        let last = text.lines().last().unwrap();
        assert!(last.contains("\x1b["), "{last:?}");
        let stripped = console::strip_ansi_codes(last);
        assert_eq!(stripped, sep('=', "1 failed, 3 passed in 0.50s", 80));
    }

    #[test]
    fn colour_follows_flag_then_environment_like_pytest() {
        let env = |vars: &'static [(&'static str, &'static str)]| {
            move |name: &str| {
                vars.iter()
                    .find(|(k, _)| *k == name)
                    .map(|(_, v)| v.to_string())
            }
        };
        assert!(use_color(
            ColorChoice::Yes,
            false,
            env(&[("NO_COLOR", "1")])
        ));
        assert!(!use_color(ColorChoice::No, true, env(&[])));
        assert!(use_color(ColorChoice::Auto, true, env(&[])));
        assert!(!use_color(ColorChoice::Auto, false, env(&[])));
        assert!(!use_color(
            ColorChoice::Auto,
            true,
            env(&[("NO_COLOR", "1")])
        ));
        assert!(!use_color(
            ColorChoice::Auto,
            true,
            env(&[("TERM", "dumb")])
        ));
        assert!(use_color(
            ColorChoice::Auto,
            false,
            env(&[("FORCE_COLOR", "1")])
        ));
        assert!(use_color(
            ColorChoice::Auto,
            false,
            env(&[("PY_COLORS", "1"), ("NO_COLOR", "1")])
        ));
        assert!(!use_color(
            ColorChoice::Auto,
            true,
            env(&[("PY_COLORS", "0")])
        ));
    }

    #[test]
    fn durations_flags_are_taken_out_of_pytest_arguments() {
        let mut args = strings(&["-x", "--durations", "5", "tests", "--durations-min=0.1"]);
        assert_eq!(take_durations(&mut args), (Some(5), Some(0.1)));
        assert_eq!(args, strings(&["-x", "tests"]));

        let mut args = strings(&["--durations=0", "."]);
        assert_eq!(take_durations(&mut args), (Some(0), None));
        assert_eq!(args, strings(&["."]));

        // Not a number: pytest's own usage error must say so.
        let mut args = strings(&["--durations=many", "--durations"]);
        assert_eq!(take_durations(&mut args), (None, None));
        assert_eq!(args, strings(&["--durations=many", "--durations"]));

        // fly's own flag, before `--`, wins.
        let own = TerminalArgs {
            durations: Some(3),
            ..Default::default()
        };
        let mut args = strings(&["--durations=9", "-vv"]);
        let options = own.options(&mut args);
        assert_eq!(options.durations, Some(3));
        assert_eq!(options.verbosity, 2);
        assert_eq!(args, strings(&["-vv"]));
    }

    #[test]
    fn verbosity_counts_flags_not_values() {
        assert_eq!(verbosity(&strings(&["-v", "-vs", "--verbose"])), 3);
        assert_eq!(verbosity(&strings(&["-q", "-vv"])), 1);
        assert_eq!(verbosity(&strings(&["-k", "v", "-kv"])), 0);
    }
}
