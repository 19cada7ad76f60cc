//! Renders a [`RunView`] as one self-contained HTML page: inline CSS and JavaScript, no
//! external URL, so the file opens anywhere without network access.
//!
//! The timeline is drawn on a `<canvas>` from compact JSON embedded in the page rather than as
//! one element per bar: a run of 50,000 tests on 64 workers stays a page of a few megabytes that
//! a browser opens at once. The JSON (`<script id="fly-data" type="application/json">`) has
//! this shape, all times in integer microseconds from the first phase start:
//!
//! ```text
//! { "version": 1, "wall_us": N, "names": ["passed", "failed", ...],
//!   "phases": ["setup", "call", "teardown", ""],
//!   "agents": [{"id", "label", "workers"}],
//!   "lanes": [{"agent": i, "worker": w, "busy_us", "utilization",
//!              "bars": [[test_index, outcome, superseded,
//!                        phase, start_us, span_us, duration_us, category, ...], ...]}],
//!   "tests": [nodeid by test index], "stats": {...} }
//! ```
//!
//! `outcome` and `category` index `names` (`category` is -1 for a quiet setup or teardown),
//! `phase` indexes `phases`; each bar carries five numbers per phase after its first three. Everything from the database is escaped: text for
//! HTML, and the JSON so that it cannot end its `<script>` element.
//!
//! The drawing code is `timeline.js` ([`TIMELINE_SCRIPT`]), which the live dashboard
//! (`crate::http`) serves too, with the same data from [`data_json`].

use std::collections::HashMap;
use std::fmt::Write as _;

use serde::Serialize;

use super::{format_seconds, RunStats, RunView, WallSource, FAILURE_LIMIT};

/// Renders the page.
pub fn render(view: &RunView) -> String {
    let mut page = String::with_capacity(1024 * 1024);
    let title = format!(
        "fly report: {} ({})",
        view.run.project,
        short_id(&view.run.id)
    );
    let _ = write!(
        page,
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n\
         <title>{}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n",
        escape(&title)
    );
    header(&mut page, view);
    figures(&mut page, view);
    timeline(&mut page, view);
    workers_table(&mut page, view);
    agents_table(&mut page, view);
    slowest(&mut page, view);
    failures(&mut page, view);
    let _ = write!(
        page,
        "<script id=\"fly-data\" type=\"application/json\">{}</script>\n\
         <script>{TIMELINE_SCRIPT}{SCRIPT}</script>\n</body>\n</html>\n",
        data_json(view)
    );
    page
}

/// Escapes text for HTML element content and attribute values.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// JSON safe inside a `<script>` element: every `<` becomes `\u003c`, so neither `</script>`
/// nor `<!--` can appear. `<` only ever occurs inside JSON strings, where the escape means
/// the same character.
pub fn script_json<T: Serialize>(value: &T) -> String {
    match serde_json::to_string(value) {
        Ok(json) => json.replace('<', "\\u003c"),
        // Only maps with non-string keys fail to serialise, and the data has none.
        Err(_) => "null".into(),
    }
}

fn short_id(id: &str) -> &str {
    id.get(..8).unwrap_or(id)
}

fn pct(x: f64) -> String {
    format!("{:.1}%", x * 100.0)
}

/// Epoch seconds as `YYYY-MM-DD HH:MM:SS UTC`; the page's script shows it in local time.
fn utc(epoch: f64) -> String {
    if !epoch.is_finite() {
        return "-".into();
    }
    let secs = epoch.floor() as i64;
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02} UTC",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60
    )
}

fn time_tag(epoch: Option<f64>) -> String {
    match epoch {
        Some(t) if t.is_finite() => {
            format!("<time data-epoch=\"{}\">{}</time>", t, escape(&utc(t)))
        }
        _ => "-".into(),
    }
}

fn header(page: &mut String, view: &RunView) {
    let run = &view.run;
    let _ = write!(
        page,
        "<header><h1>fly report <span class=\"project\">{}</span></h1>\n\
         <div class=\"status status-{}\">{}</div>\n<dl class=\"meta\">\
         <dt>run</dt><dd><code>{}</code></dd>\
         <dt>created</dt><dd>{}</dd>\
         <dt>started</dt><dd>{}</dd>\
         <dt>finished</dt><dd>{}</dd>\
         <dt>pytest arguments</dt><dd><code>{}</code></dd>\
         <dt>directory</dt><dd><code>{}</code></dd>\
         <dt>exit code</dt><dd>{}</dd>\
         <dt>collected</dt><dd>{}{}</dd>\
         <dt>summary</dt><dd class=\"summary\">{}</dd>",
        escape(&run.project),
        css_class(&run.status),
        escape(&run.status),
        escape(&run.id),
        time_tag(Some(run.created_at)),
        time_tag(run.started_at),
        time_tag(run.finished_at),
        escape(&shell_words(&run.pytest_args)),
        escape(run.client_cwd.as_deref().unwrap_or("-")),
        run.exit_code.map_or("-".into(), |c| c.to_string()),
        run.collected.map_or("-".into(), |c| c.to_string()),
        match run.deselected {
            Some(n) if n > 0 => format!(" ({n} deselected)"),
            _ => String::new(),
        },
        escape(&run.summary()),
    );
    if let Some(message) = run.message.as_deref().filter(|m| *m != run.summary()) {
        let _ = write!(
            page,
            "<dt>message</dt><dd><pre class=\"message\">{}</pre></dd>",
            escape(message)
        );
    }
    page.push_str("</dl></header>\n");
}

fn css_class(text: &str) -> String {
    text.chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '_' || *c == '-')
        .collect()
}

/// Arguments as a user would type them: quoted when they hold spaces or quotes.
fn shell_words(args: &[String]) -> String {
    if args.is_empty() {
        return "(none)".into();
    }
    args.iter()
        .map(|a| {
            if !a.is_empty()
                && a.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_./:=,+@%[]".contains(c))
            {
                a.clone()
            } else {
                format!("'{}'", a.replace('\'', "'\\''"))
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

fn figures(page: &mut String, view: &RunView) {
    let s: &RunStats = &view.stats;
    let card = |page: &mut String, id: &str, label: &str, value: String, note: &str| {
        let _ = write!(
            page,
            "<div class=\"card\" id=\"stat-{id}\"><div class=\"label\">{}</div>\
             <div class=\"value\">{}</div><div class=\"note\">{}</div></div>",
            escape(label),
            escape(&value),
            escape(note)
        );
    };
    page.push_str("<section><h2>How well the workers were used</h2><div class=\"cards\">");
    card(
        page,
        "achieved",
        "achieved speed-up",
        format!("{:.2}x", s.achieved_speedup),
        "total test time / wall",
    );
    card(
        page,
        "possible",
        "possible speed-up",
        format!("{:.2}x", s.possible_speedup),
        "total test time / lower bound",
    );
    card(
        page,
        "idle",
        "idle",
        format_seconds(s.idle),
        &format!(
            "{} of {} worker-seconds",
            pct(1.0 - s.overall_utilization),
            format_seconds(s.workers as f64 * s.wall)
        ),
    );
    card(
        page,
        "utilization",
        "overall utilization",
        pct(s.overall_utilization),
        "sum of busy / (workers × wall)",
    );
    card(
        page,
        "wall",
        "wall",
        format_seconds(s.wall),
        match s.wall_source {
            WallSource::Phases => "first phase start → last phase stop",
            WallSource::Run => "run started → finished (no reports)",
        },
    );
    card(
        page,
        "lower-bound",
        "lower bound",
        format_seconds(s.lower_bound),
        "max(longest test, total / workers)",
    );
    card(
        page,
        "test-time",
        "total test time",
        format_seconds(s.total_test_time),
        &format!(
            "{} tests, longest {}",
            s.tests,
            format_seconds(s.longest_test)
        ),
    );
    card(
        page,
        "workers",
        "workers",
        s.workers.to_string(),
        &format!(
            "on {} agent(s)",
            view.agents.iter().filter(|a| a.accepted).count()
        ),
    );
    card(
        page,
        "run-duration",
        "run duration",
        s.run_duration.map_or("-".into(), format_seconds),
        "submitted → finished, collection included",
    );
    page.push_str("</div>\n");
    if s.unfinished > 0 || s.superseded_attempts > 0 {
        let _ = write!(
            page,
            "<p class=\"note\">{} test(s) reported without a final result; {} attempt(s) \
             superseded (drawn faded, counted as busy, not as test time).</p>",
            s.unfinished, s.superseded_attempts
        );
    }
    page.push_str(DEFINITIONS);
    page.push_str("</section>\n");
}

const DEFINITIONS: &str = "<details class=\"definitions\"><summary>Definitions</summary><ul>\
<li><b>wall</b>: first phase start to last phase stop over all of the run's reports (the \
timeline's span, on the same clocks as the bars; collection and worker start-up come before \
it). Without reports: the run's finished − started.</li>\
<li><b>test time</b> of a test: the sum of the durations of the setup, call and teardown \
reports of its final attempt. <b>Total test time</b>: the sum over all tests with a result.</li>\
<li><b>busy</b> time of a worker: the length of the union of its phase intervals (superseded \
attempts included). <b>Utilization</b>: busy / wall. <b>Overall</b>: sum of busy / (workers \
× wall), every worker of every agent counted.</li>\
<li><b>lower bound</b>: max(longest test, total test time / workers).</li>\
<li><b>achieved speed-up</b>: total test time / wall. <b>Possible speed-up</b>: total test \
time / lower bound. <b>Idle</b>: workers × wall − sum of busy.</li>\
</ul></details>\n";

fn timeline(page: &mut String, view: &RunView) {
    page.push_str(
        "<section><h2>Timeline</h2>\n<div class=\"legend\">\
         <span><i style=\"background:#2e9e44\"></i>passed</span>\
         <span><i style=\"background:#d62828\"></i>failed</span>\
         <span><i style=\"background:#b4480c\"></i>error</span>\
         <span><i style=\"background:#9aa0a6\"></i>skipped</span>\
         <span><i style=\"background:#e0b000\"></i>xfailed</span>\
         <span><i style=\"background:#7cc47f\"></i>xpassed</span>\
         <span><i style=\"background:#2e9e44;opacity:.3\"></i>superseded attempt</span>\
         <span class=\"hint\">setup and teardown are lighter than the call. Wheel: zoom · \
         drag: pan · double-click: reset</span></div>\n",
    );
    let _ = write!(
        page,
        "<div id=\"timeline-box\"><canvas id=\"timeline\" aria-label=\"timeline of {} lanes\">\
         </canvas><div id=\"tip\" hidden></div></div>\n\
         <noscript><p>The timeline needs JavaScript; the tables below do not.</p></noscript>\
         </section>\n",
        view.lanes.len()
    );
}

fn agent_label(view: &RunView, agent_id: &str) -> String {
    view.agents
        .iter()
        .find(|a| a.id == agent_id)
        .and_then(|a| a.machine.as_ref())
        .map(|m| format!("{} ({})", m.hostname, agent_id))
        .unwrap_or_else(|| agent_id.to_string())
}

fn workers_table(page: &mut String, view: &RunView) {
    page.push_str(
        "<section><h2>Workers</h2><table id=\"workers\"><thead><tr><th>agent</th>\
         <th>worker</th><th class=\"num\">attempts</th><th class=\"num\">busy</th>\
         <th class=\"num\">utilization</th><th></th></tr></thead><tbody>",
    );
    for lane in &view.lanes {
        let _ = write!(
            page,
            "<tr><td>{}</td><td>{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td>\
             <td class=\"num\">{}</td><td class=\"meter\"><div style=\"width:{:.1}%\"></div></td>\
             </tr>",
            escape(&agent_label(view, &lane.agent_id)),
            lane.worker,
            lane.bars.len(),
            escape(&format_seconds(lane.busy)),
            pct(lane.utilization),
            (lane.utilization * 100.0).clamp(0.0, 100.0)
        );
    }
    let _ = writeln!(
        page,
        "</tbody><tfoot><tr><td colspan=\"3\">overall ({} workers)</td><td class=\"num\">{}</td>\
         <td class=\"num\">{}</td><td></td></tr></tfoot></table></section>",
        view.stats.workers,
        escape(&format_seconds(view.stats.busy)),
        pct(view.stats.overall_utilization)
    );
}

fn agents_table(page: &mut String, view: &RunView) {
    page.push_str(
        "<section><h2>Agents</h2><table id=\"agents\"><thead><tr><th>agent</th><th>host</th>\
         <th>system</th><th class=\"num\">logical CPUs</th><th class=\"num\">physical cores</th>\
         <th class=\"num\">performance</th><th class=\"num\">efficiency</th><th>SMT</th>\
         <th class=\"num\">quota</th><th class=\"num\">memory</th><th class=\"num\">speed</th>\
         <th class=\"num\">workers (auto)</th><th>taking part</th></tr></thead><tbody>",
    );
    for agent in &view.agents {
        let taking_part = if agent.accepted {
            "yes".to_string()
        } else {
            format!("refused: {}", agent.reason.as_deref().unwrap_or("-"))
        };
        match &agent.machine {
            Some(m) => {
                let _ = write!(
                    page,
                    "<tr><td><code>{}</code></td><td>{}</td><td>{} {} (fly {})</td>\
                     <td class=\"num\">{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td>\
                     <td class=\"num\">{}</td><td>{}</td><td class=\"num\">{}</td>\
                     <td class=\"num\">{:.1} GiB</td><td class=\"num\">{}</td><td class=\"num\">{}{}</td>\
                     <td>{}</td></tr>",
                    escape(&agent.id),
                    escape(&m.hostname),
                    escape(&m.os),
                    escape(&m.arch),
                    escape(&m.fly_version),
                    m.logical_cpus,
                    m.physical_cores,
                    m.performance_cores,
                    m.efficiency_cores,
                    if m.threads_per_core > 1 {
                        format!("yes, {} threads/core", m.threads_per_core)
                    } else {
                        "no".to_string()
                    },
                    m.cpu_quota
                        .map_or("unlimited".to_string(), |q| format!("{q:.2} CPUs")),
                    m.memory_bytes as f64 / (1u64 << 30) as f64,
                    m.speed.map_or("-".to_string(), |s| format!("{s:.2}")),
                    agent.workers,
                    m.auto_workers.map_or(String::new(), |a| format!(" ({a})")),
                    escape(&taking_part),
                );
            }
            None => {
                let _ = write!(
                    page,
                    "<tr><td><code>{}</code></td><td colspan=\"10\">(no record of this agent's \
                     machine)</td><td class=\"num\">{}</td><td>{}</td></tr>",
                    escape(&agent.id),
                    agent.workers,
                    escape(&taking_part)
                );
            }
        }
    }
    page.push_str(
        "</tbody></table><p class=\"note\">The machine is the one each agent last reported; \
         \"workers\" is what it ran for this run, \"auto\" what <code>--workers auto</code> \
         would pick there.</p></section>\n",
    );
}

fn slowest(page: &mut String, view: &RunView) {
    page.push_str(
        "<section><h2>Slowest tests</h2><table id=\"slowest-tests\"><thead><tr>\
         <th class=\"num\">total</th><th class=\"num\">setup</th><th class=\"num\">call</th>\
         <th class=\"num\">teardown</th><th>outcome</th><th>test</th><th>worker</th></tr>\
         </thead><tbody>",
    );
    for t in &view.slowest_tests {
        let _ = write!(
            page,
            "<tr><td class=\"num\">{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td>\
             <td class=\"num\">{}</td><td class=\"oc oc-{}\">{}</td><td><code>{}</code></td>\
             <td>{} / {}</td></tr>",
            format_seconds(t.duration),
            format_seconds(t.setup),
            format_seconds(t.call),
            format_seconds(t.teardown),
            css_class(&t.outcome),
            escape(&t.outcome),
            escape(&t.nodeid),
            escape(&t.agent_id),
            t.worker
        );
    }
    page.push_str(
        "</tbody></table>\n<h2>Slowest fixtures (setup phases)</h2>\
         <table id=\"slowest-setups\"><thead><tr><th class=\"num\">setup</th><th>test</th>\
         <th>worker</th></tr></thead><tbody>",
    );
    for s in &view.slowest_setups {
        let _ = write!(
            page,
            "<tr><td class=\"num\">{}</td><td><code>{}</code></td><td>{} / {}</td></tr>",
            format_seconds(s.duration),
            escape(&s.nodeid),
            escape(&s.agent_id),
            s.worker
        );
    }
    page.push_str(
        "</tbody></table><p class=\"note\">A setup includes the module-, class- and \
         session-scoped fixtures the test was the first on its worker to need.</p></section>\n",
    );
}

fn failures(page: &mut String, view: &RunView) {
    let shown = view.failures.len();
    let _ = write!(
        page,
        "<section id=\"failures\"><h2>Failures ({})</h2>",
        shown + view.failures_omitted
    );
    if shown == 0 {
        page.push_str("<p>None.</p>");
    }
    for f in &view.failures {
        let _ = write!(
            page,
            "<details class=\"failure\"><summary><span class=\"oc oc-{}\">{}</span> \
             <code>{}</code> <span class=\"phase\">in {}</span> {}</summary>",
            css_class(&f.category),
            escape(if f.category.is_empty() {
                "failed"
            } else {
                &f.category
            }),
            escape(&f.nodeid),
            escape(&f.phase),
            escape(f.message.as_deref().unwrap_or(""))
        );
        let _ = write!(
            page,
            "<p class=\"where\">on {} / worker {}</p><pre class=\"traceback\">{}</pre>",
            escape(&agent_label(view, &f.agent_id)),
            f.worker,
            escape(f.longrepr.as_deref().unwrap_or("(no traceback recorded)"))
        );
        for (name, text) in &f.sections {
            let _ = write!(
                page,
                "<h4>{}</h4><pre class=\"section\">{}</pre>",
                escape(name),
                escape(text)
            );
        }
        page.push_str("</details>\n");
    }
    if view.failures_omitted > 0 {
        let _ = write!(
            page,
            "<p class=\"note\">{} more failing phases are not shown (the first {} are).</p>",
            view.failures_omitted, FAILURE_LIMIT
        );
    }
    page.push_str("</section>\n");
}

// ---------------------------------------------------------------------------------------------
// The embedded data.

#[derive(Serialize)]
struct Data<'a> {
    version: u32,
    wall_us: i64,
    names: Vec<&'a str>,
    phases: [&'static str; 4],
    agents: Vec<AgentData>,
    lanes: Vec<LaneData>,
    tests: &'a [String],
    stats: &'a RunStats,
}

#[derive(Serialize)]
struct AgentData {
    id: String,
    label: String,
    workers: u32,
}

#[derive(Serialize)]
struct LaneData {
    agent: usize,
    worker: u32,
    busy_us: i64,
    utilization: f64,
    bars: Vec<Vec<i64>>,
}

fn micros(seconds: f64) -> i64 {
    if seconds.is_finite() {
        (seconds * 1e6).round() as i64
    } else {
        0
    }
}

fn phase_code(phase: &str) -> i64 {
    match phase {
        "setup" => 0,
        "call" => 1,
        "teardown" => 2,
        _ => 3,
    }
}

/// The timeline's data (the shape the module documentation describes) as script-safe JSON:
/// embedded in the report, and served by the live dashboard for the same drawing code.
pub fn data_json(view: &RunView) -> String {
    // Outcome and category names, interned; the well-known ones first so their codes are
    // stable from page to page.
    let mut names: Vec<&str> = vec!["passed", "failed", "error", "skipped", "xfailed", "xpassed"];
    let mut code: HashMap<&str, i64> = names
        .iter()
        .enumerate()
        .map(|(i, n)| (*n, i as i64))
        .collect();
    let mut extra: Vec<&str> = Vec::new();
    for lane in &view.lanes {
        for bar in &lane.bars {
            for name in std::iter::once(bar.outcome.as_str())
                .chain(bar.phases.iter().map(|p| p.category.as_str()))
            {
                if !name.is_empty() && !code.contains_key(name) {
                    code.insert(name, (names.len() + extra.len()) as i64);
                    extra.push(name);
                }
            }
        }
    }
    names.extend(extra);

    let agent_index: HashMap<&str, usize> = view
        .agents
        .iter()
        .enumerate()
        .map(|(i, a)| (a.id.as_str(), i))
        .collect();
    let agents = view
        .agents
        .iter()
        .map(|a| AgentData {
            id: a.id.clone(),
            label: agent_label(view, &a.id),
            workers: a.workers,
        })
        .collect();
    let lanes = view
        .lanes
        .iter()
        .map(|lane| LaneData {
            agent: agent_index
                .get(lane.agent_id.as_str())
                .copied()
                .unwrap_or(0),
            worker: lane.worker,
            busy_us: micros(lane.busy),
            utilization: lane.utilization,
            bars: lane
                .bars
                .iter()
                .map(|bar| {
                    let mut row = Vec::with_capacity(3 + 5 * bar.phases.len());
                    row.push(i64::from(bar.test_index));
                    row.push(code.get(bar.outcome.as_str()).copied().unwrap_or(0));
                    row.push(i64::from(bar.superseded));
                    for p in &bar.phases {
                        let start = micros(p.start);
                        row.push(phase_code(&p.phase));
                        row.push(start);
                        row.push((micros(p.stop) - start).max(0));
                        row.push(micros(p.duration));
                        row.push(code.get(p.category.as_str()).copied().unwrap_or(-1));
                    }
                    row
                })
                .collect(),
        })
        .collect();
    script_json(&Data {
        version: 1,
        wall_us: micros(view.stats.wall),
        names,
        phases: ["setup", "call", "teardown", ""],
        agents,
        lanes,
        tests: &view.tests,
        stats: &view.stats,
    })
}

/// The report's style sheet; the dashboard uses it too, so both look alike.
pub const STYLE: &str = r##"
:root { --fg:#1d232a; --muted:#5f6b76; --line:#d8dee4; --bg:#fff; --panel:#f6f8fa; }
* { box-sizing: border-box; }
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: var(--fg);
  background: var(--bg); margin: 0 auto; padding: 16px 24px 48px; max-width: 1600px; }
h1 { font-size: 22px; margin: 0 0 4px; } h1 .project { color: var(--muted); font-weight: 500; }
h2 { font-size: 17px; margin: 28px 0 10px; border-bottom: 1px solid var(--line); padding-bottom: 4px; }
h4 { margin: 10px 0 4px; font-size: 13px; }
code, pre { font: 12.5px/1.4 ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; }
pre { background: var(--panel); border: 1px solid var(--line); padding: 8px 10px; overflow: auto;
  max-height: 520px; white-space: pre; }
dl.meta { display: grid; grid-template-columns: max-content 1fr; gap: 2px 14px; margin: 10px 0; }
dl.meta dt { color: var(--muted); } dl.meta dd { margin: 0; overflow-wrap: anywhere; }
.status { display: inline-block; padding: 1px 10px; border-radius: 10px; background: #9aa0a6; color: #fff;
  font-weight: 600; }
.status-passed { background: #2e9e44; } .status-failed, .status-error { background: #d62828; }
.status-interrupted { background: #b4480c; }
.cards { display: grid; grid-template-columns: repeat(auto-fill, minmax(190px, 1fr)); gap: 10px; }
.card { background: var(--panel); border: 1px solid var(--line); border-radius: 6px; padding: 8px 12px; }
.card .label { color: var(--muted); font-size: 12px; } .card .value { font-size: 22px; font-weight: 600; }
.card .note, p.note { color: var(--muted); font-size: 12px; }
details.definitions { margin-top: 10px; color: var(--muted); }
.legend { display: flex; flex-wrap: wrap; gap: 14px; margin-bottom: 6px; font-size: 12px; }
.legend i { display: inline-block; width: 12px; height: 10px; margin-right: 4px; vertical-align: -1px; }
.legend .hint { color: var(--muted); }
#timeline-box { position: relative; border: 1px solid var(--line); }
#timeline { display: block; width: 100%; cursor: grab; }
#timeline.dragging { cursor: grabbing; }
#tip { position: absolute; pointer-events: none; background: rgba(29,35,42,.94); color: #fff;
  padding: 6px 9px; border-radius: 4px; font: 12px/1.4 ui-monospace, Menlo, Consolas, monospace;
  white-space: pre; max-width: 720px; overflow: hidden; z-index: 2; }
table { border-collapse: collapse; width: 100%; }
th, td { text-align: left; padding: 3px 8px; border-bottom: 1px solid var(--line); vertical-align: top; }
th { color: var(--muted); font-weight: 500; font-size: 12px; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
td code { overflow-wrap: anywhere; }
tfoot td { font-weight: 600; }
td.meter { width: 22%; } td.meter div { height: 10px; background: #4c8bd6; border-radius: 2px; }
.oc { font-weight: 600; } .oc-passed { color: #2e9e44; } .oc-failed { color: #d62828; }
.oc-error { color: #b4480c; } .oc-skipped { color: #6f767d; } .oc-xfailed { color: #a07e00; }
.oc-xpassed { color: #3f8f43; }
details.failure { border: 1px solid var(--line); border-radius: 4px; margin: 6px 0; padding: 4px 10px; }
details.failure summary { cursor: pointer; overflow-wrap: anywhere; }
details.failure .phase, p.where { color: var(--muted); font-size: 12px; }
"##;

/// The timeline's drawing code, `flyTimeline(canvas, box, tip).set(data)`, shared with the live
/// dashboard (`crate::http`), which redraws it as a run goes on.
pub const TIMELINE_SCRIPT: &str = include_str!("timeline.js");

/// The report's own script: local times in the header, then the timeline from the embedded data.
const SCRIPT: &str = r##"
(function () {
  "use strict";
  var D = JSON.parse(document.getElementById("fly-data").textContent);
  // Local times for the header.
  var times = document.querySelectorAll("time[data-epoch]");
  for (var i = 0; i < times.length; i++) {
    var t = new Date(parseFloat(times[i].getAttribute("data-epoch")) * 1000);
    if (!isNaN(t)) { times[i].title = times[i].textContent; times[i].textContent = t.toLocaleString(); }
  }
  flyTimeline(document.getElementById("timeline"), document.getElementById("timeline-box"),
    document.getElementById("tip")).set(D);
})();
"##;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escape_covers_markup_and_quotes() {
        assert_eq!(
            escape(r#"<a href="x">'&'</a>"#),
            "&lt;a href=&quot;x&quot;&gt;&#39;&amp;&#39;&lt;/a&gt;"
        );
    }

    #[test]
    fn script_json_cannot_close_its_script_element() {
        let json = script_json(&vec!["</script><!-- x"]);
        assert!(!json.contains("</"));
        assert!(!json.contains("<!--"));
        let back: Vec<String> = serde_json::from_str(&json).expect("valid JSON");
        assert_eq!(back, vec!["</script><!-- x".to_string()]);
    }

    #[test]
    fn utc_formats_epoch_seconds() {
        assert_eq!(utc(0.0), "1970-01-01 00:00:00 UTC");
        assert_eq!(utc(951_825_600.5), "2000-02-29 12:00:00 UTC");
    }
}
