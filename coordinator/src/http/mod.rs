//! The coordinator's HTTP port (`serve --http HOST:PORT`, `run --http`): the live dashboard,
//! `/healthz` for probes and `/metrics` for Prometheus.
//!
//! Pages are plain HTML with the CSS and JavaScript inline (embedded in the binary; no build
//! step, no external URL). Each page polls a JSON endpoint once a second and draws it:
//!
//! | route | what |
//! |---|---|
//! | `/` | runs in progress (progress, ETA) and recent runs |
//! | `/runs/{id}` | one run (`latest`, an id or an id prefix): progress, the live timeline, the tests running now, failures |
//! | `/runs/{id}/report` | the run's full static report, as `report --html` writes it |
//! | `/agents` | connected agents: topology, labels, and the test each worker runs now |
//! | `/api/overview`, `/api/runs/{id}`, `/api/agents` | the pages' JSON |
//! | `/healthz` | `ok` (200), or 503 when the dispatcher or the store's writer has stopped |
//! | `/metrics` | Prometheus (OpenMetrics text): see [`crate::observe::render_metrics`] |
//!
//! Live state comes from the dispatcher ([`Input::Observe`]); the record (timelines, finished
//! runs, failures) from SQLite through read-only connections on the blocking pool.
//!
//! **Who may look.** The pages show test names, tracebacks and captured output, so the port
//! follows the gRPC port's rule ([`crate::auth`]): off loopback it needs the farm's token or
//! `--insecure`. With a token every route but `/healthz` requires it, as `Authorization:
//! Bearer TOKEN` or as `?token=TOKEN` (which the pages keep on their links and requests);
//! `/metrics` too, unless `--metrics-open`. The port speaks plain HTTP: off loopback, put it
//! behind a TLS proxy or keep it on a private network.

mod live;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, Query, Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use fly_agent::connect::Token;
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tonic::metadata::AsciiMetadataValue;
use tracing::warn;

use crate::auth::{self, AuthError, ListenArgs};
use crate::dispatcher::{DispatcherHandle, Input};
use crate::node::Node;
use crate::observe::{self, Observation, DEFAULT_TARGET_SECONDS};
use crate::report::{self, html, Db, ReportError};
use crate::store::Store;

pub use live::{RunningTest, PAGE_FAILURES, SCAN_ROWS, TIMELINE_REPORTS};

/// How often the pages poll, in milliseconds (written into them).
const POLL_MS: u32 = 1000;

/// Recent runs on the runs page.
const RECENT_RUNS: usize = 30;

/// How long a request waits for the dispatcher's snapshot.
const OBSERVE_TIMEOUT: Duration = Duration::from_secs(10);

/// How long `/healthz` waits for the store to confirm its writer is alive; a slow disk is
/// not a dead coordinator, so running out of this time still answers `ok`.
const STORE_CHECK: Duration = Duration::from_secs(2);

const DASHBOARD_CSS: &str = include_str!("assets/dashboard.css");
const DASHBOARD_JS: &str = include_str!("assets/dashboard.js");

/// The HTTP port's flags (`serve`, and `run` with an embedded coordinator).
#[derive(clap::Args, Debug, Clone)]
pub struct HttpArgs {
    /// Serve the live dashboard, /healthz and /metrics on HOST:PORT (port 0 picks a free one;
    /// the URL is printed). Off loopback it needs the token or --insecure, as --listen does.
    #[arg(long = "http", env = "FLY_HTTP", value_name = "HOST:PORT")]
    pub addr: Option<String>,
    /// Let /metrics answer without the token (everything else still requires it).
    #[arg(long, env = "FLY_METRICS_OPEN")]
    pub metrics_open: bool,
    /// fly_desired_workers (in /metrics) is the worker count that would finish the queued work
    /// within this many seconds, from history.
    #[arg(long, env = "FLY_TARGET_SECONDS", default_value_t = DEFAULT_TARGET_SECONDS,
          value_parser = positive_seconds)]
    pub target_seconds: f64,
}

fn positive_seconds(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(s) if s.is_finite() && s > 0.0 => Ok(s),
        _ => Err(format!("{text:?} is not a positive number of seconds")),
    }
}

/// Why the HTTP port cannot start.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("the dashboard's port (--http): {0}")]
    Auth(#[from] AuthError),
    #[error("cannot listen on {addr} (--http): {source}")]
    Bind {
        addr: String,
        source: std::io::Error,
    },
}

/// What the handlers share.
#[derive(Clone)]
struct AppState {
    dispatcher: DispatcherHandle,
    store: Store,
    db: PathBuf,
    token: Option<Arc<Token>>,
    metrics_open: bool,
    target_seconds: f64,
}

/// A running HTTP port.
pub struct Dashboard {
    addr: SocketAddr,
    stop: oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

impl Dashboard {
    /// Starts the HTTP port for `node` if `args` asks for one: applies the loopback rule to
    /// its address with `listen`'s token and `--insecure`, binds, and serves in the background.
    pub async fn start(
        args: &HttpArgs,
        listen: &ListenArgs,
        node: &Node,
    ) -> Result<Option<Dashboard>, HttpError> {
        let Some(addr) = &args.addr else {
            return Ok(None);
        };
        let token = listen.token.resolve().map_err(AuthError::from)?;
        // The dashboard has no TLS of its own.
        auth::check_listen_address(addr, token.is_some(), listen.insecure, false).await?;
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| HttpError::Bind {
                addr: addr.clone(),
                source,
            })?;
        let local = listener.local_addr().map_err(|source| HttpError::Bind {
            addr: addr.clone(),
            source,
        })?;
        let store = node.store().clone();
        let state = AppState {
            dispatcher: node.dispatcher(),
            db: store.path().to_path_buf(),
            store,
            token: token.map(Arc::new),
            metrics_open: args.metrics_open,
            target_seconds: args.target_seconds,
        };
        Ok(Some(Dashboard::serve(listener, local, state)))
    }

    fn serve(listener: TcpListener, addr: SocketAddr, state: AppState) -> Dashboard {
        let (stop, stopped) = oneshot::channel::<()>();
        let app = router(state);
        let task = tokio::spawn(async move {
            let served = axum::serve(listener, app)
                .with_graceful_shutdown(async {
                    let _ = stopped.await;
                })
                .await;
            if let Err(err) = served {
                warn!(%err, "the dashboard's HTTP server stopped");
            }
        });
        Dashboard { addr, stop, task }
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The dashboard's URL (without the token).
    pub fn url(&self) -> String {
        format!("http://{}/", self.addr)
    }

    /// Stops serving; pages still open are cut off after a moment.
    pub async fn stop(self) {
        let _ = self.stop.send(());
        let mut task = self.task;
        if tokio::time::timeout(Duration::from_secs(2), &mut task)
            .await
            .is_err()
        {
            task.abort();
        }
    }
}

fn router(state: AppState) -> Router {
    Router::new()
        .route("/", get(runs_page))
        .route("/runs/{id}", get(run_page))
        .route("/runs/{id}/report", get(run_report))
        .route("/agents", get(agents_page))
        .route("/api/overview", get(api_overview))
        .route("/api/runs/{id}", get(api_run))
        .route("/api/agents", get(api_agents))
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .layer(middleware::from_fn_with_state(state.clone(), require_token))
        .with_state(state)
}

// --- who may look ----------------------------------------------------------------------------

#[derive(Deserialize)]
struct TokenQuery {
    token: Option<String>,
}

/// With a token, every route but `/healthz` (and `/metrics` with `--metrics-open`) needs it,
/// compared in constant time by the same code as the gRPC port's.
async fn require_token(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let Some(expected) = &state.token else {
        return next.run(request).await;
    };
    let path = request.uri().path();
    if path == "/healthz" || (path == "/metrics" && state.metrics_open) {
        return next.run(request).await;
    }
    let presented = match request.headers().get(header::AUTHORIZATION) {
        Some(value) => value.to_str().ok().map(str::to_string),
        None => Query::<TokenQuery>::try_from_uri(request.uri())
            .ok()
            .and_then(|q| q.0.token)
            .map(|t| format!("Bearer {t}")),
    };
    let presented = presented.and_then(|p| AsciiMetadataValue::try_from(p).ok());
    match auth::verify(expected, presented.as_ref()) {
        Ok(()) => next.run(request).await,
        Err(refusal) => {
            warn!(path = %request.uri().path(), "refused a dashboard request: no valid token");
            let mut response = (
                StatusCode::UNAUTHORIZED,
                format!(
                    "{}\nOn the dashboard, add ?token=TOKEN to the URL.\n",
                    refusal.message()
                ),
            )
                .into_response();
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"fly\""),
            );
            response
        }
    }
}

// --- health and metrics ----------------------------------------------------------------------

async fn observe(dispatcher: &DispatcherHandle) -> Option<Observation> {
    let (reply, answer) = oneshot::channel();
    if !dispatcher.send(Input::Observe { reply }) {
        return None;
    }
    tokio::time::timeout(OBSERVE_TIMEOUT, answer)
        .await
        .ok()?
        .ok()
}

fn unavailable(what: &str) -> Response {
    (StatusCode::SERVICE_UNAVAILABLE, format!("{what}\n")).into_response()
}

async fn healthz(State(state): State<AppState>) -> Response {
    if observe(&state.dispatcher).await.is_none() {
        return unavailable("the dispatcher has stopped");
    }
    // A flush fails at once when the writer thread is gone; a slow one means a busy disk.
    if let Ok(Err(err)) = tokio::time::timeout(STORE_CHECK, state.store.flush()).await {
        return unavailable(&format!("the store's writer has stopped: {err}"));
    }
    (StatusCode::OK, "ok\n").into_response()
}

async fn metrics(State(state): State<AppState>) -> Response {
    let Some(observation) = observe(&state.dispatcher).await else {
        return unavailable("the dispatcher has stopped");
    };
    let text = observe::render_metrics(&observation, state.target_seconds);
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        text,
    )
        .into_response()
}

// --- the JSON the pages poll -----------------------------------------------------------------

fn json_response(body: String) -> Response {
    (
        [
            (header::CONTENT_TYPE, "application/json"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        body,
    )
        .into_response()
}

fn report_error(err: ReportError) -> Response {
    let status = match err {
        ReportError::UnknownRun { .. } | ReportError::NoRuns { .. } => StatusCode::NOT_FOUND,
        ReportError::AmbiguousRun { .. } => StatusCode::BAD_REQUEST,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    };
    (status, format!("{err}\n")).into_response()
}

/// Runs `read` on the blocking pool (SQLite reads block).
async fn blocking<T: Send + 'static>(
    read: impl FnOnce() -> Result<T, ReportError> + Send + 'static,
) -> Result<T, Response> {
    match tokio::task::spawn_blocking(read).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(err)) => Err(report_error(err)),
        Err(err) => Err((StatusCode::INTERNAL_SERVER_ERROR, format!("{err}\n")).into_response()),
    }
}

#[derive(Serialize)]
struct Overview<'a> {
    at: f64,
    runs: &'a [observe::RunNow],
    recent: Vec<report::history::RunSummary>,
    agents: usize,
    workers: usize,
    busy_workers: usize,
    desired_workers: u64,
}

async fn api_overview(State(state): State<AppState>) -> Response {
    let Some(observation) = observe(&state.dispatcher).await else {
        return unavailable("the dispatcher has stopped");
    };
    let db = state.db.clone();
    let recent = match blocking(move || {
        let db = Db::open(&db)?;
        report::history::recent_runs(&db, None, RECENT_RUNS)
    })
    .await
    {
        Ok(recent) => recent,
        Err(response) => return response,
    };
    let overview = Overview {
        at: observation.at,
        runs: &observation.runs,
        recent,
        agents: observation.agents.len(),
        workers: observation.workers(),
        busy_workers: observation.busy_workers(),
        desired_workers: observation.desired_workers(state.target_seconds),
    };
    json_response(serde_json::to_string(&overview).unwrap_or_else(|_| "{}".into()))
}

async fn api_run(State(state): State<AppState>, Path(id): Path<String>) -> Response {
    let Some(observation) = observe(&state.dispatcher).await else {
        return unavailable("the dispatcher has stopped");
    };
    let db = state.db.clone();
    match blocking(move || live::run_json(&db, &id, &observation.runs, &observation.agents)).await {
        Ok(json) => json_response(json),
        Err(response) => response,
    }
}

#[derive(Serialize)]
struct AgentsPage<'a> {
    at: f64,
    agents: &'a [observe::AgentNow],
    runs: &'a [observe::RunNow],
}

async fn api_agents(State(state): State<AppState>) -> Response {
    let Some(observation) = observe(&state.dispatcher).await else {
        return unavailable("the dispatcher has stopped");
    };
    let page = AgentsPage {
        at: observation.at,
        agents: &observation.agents,
        runs: &observation.runs,
    };
    json_response(serde_json::to_string(&page).unwrap_or_else(|_| "{}".into()))
}

// --- pages -----------------------------------------------------------------------------------

/// A page: the shared shell, the report's style, and the dashboard's script, which draws
/// `page` (`runs`, `run` or `agents`) from the JSON it polls.
fn page(title: &str, page: &str, run: Option<&str>, body: &str) -> Response {
    let run_attr = run
        .map(|id| format!(" data-run=\"{}\"", html::escape(id)))
        .unwrap_or_default();
    let nav = |name: &str, href: &str, label: &str| {
        let current = if name == page {
            " aria-current=\"page\""
        } else {
            ""
        };
        format!("<a href=\"{href}\" data-keep-token{current}>{label}</a>")
    };
    let document = format!(
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n\
         <meta name=\"referrer\" content=\"no-referrer\">\n<title>{}</title>\n\
         <style>{}{DASHBOARD_CSS}</style>\n</head>\n<body>\n\
         <nav class=\"top\"><b>fly</b>{}{}<span id=\"updated\" class=\"muted\"></span></nav>\n\
         <main id=\"app\" data-page=\"{page}\" data-poll-ms=\"{POLL_MS}\"{run_attr}>\n{body}\n\
         <p id=\"error\" class=\"error\" hidden></p>\n</main>\n\
         <script>{}\n{DASHBOARD_JS}</script>\n</body>\n</html>\n",
        html::escape(title),
        html::STYLE,
        nav("runs", "/", "Runs"),
        nav("agents", "/agents", "Agents"),
        html::TIMELINE_SCRIPT,
    );
    (
        [
            (header::CACHE_CONTROL, "no-store"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        ],
        Html(document),
    )
        .into_response()
}

async fn runs_page() -> Response {
    page(
        "fly: runs",
        "runs",
        None,
        "<h1>Runs</h1>\n<section><h2>In progress</h2><div id=\"live-runs\">\
         <p class=\"muted\">Loading…</p></div><p id=\"farm\" class=\"muted\"></p></section>\n\
         <section><h2>Recent</h2><div id=\"recent-runs\"></div></section>",
    )
}

async fn run_page(Path(id): Path<String>) -> Response {
    page(
        &format!("fly: run {}", id.get(..8).unwrap_or(&id)),
        "run",
        Some(&id),
        "<header><h1>Run <code id=\"run-id\"></code> <span class=\"project\" id=\"run-project\">\
         </span></h1><div id=\"run-status\" class=\"status\"></div>\
         <a id=\"full-report\" data-keep-token>full report</a></header>\n\
         <section><div class=\"progress\"><div id=\"progress-bar\"></div></div>\
         <p id=\"progress\"></p><div class=\"cards\" id=\"run-cards\"></div></section>\n\
         <section><h2>Timeline</h2><div class=\"legend\">\
         <span><i style=\"background:#4c8bd6\"></i>running</span>\
         <span><i style=\"background:#2e9e44\"></i>passed</span>\
         <span><i style=\"background:#d62828\"></i>failed</span>\
         <span><i style=\"background:#b4480c\"></i>error</span>\
         <span><i style=\"background:#9aa0a6\"></i>skipped</span>\
         <span><i style=\"background:#e0b000\"></i>xfailed</span>\
         <span><i style=\"background:#7cc47f\"></i>xpassed</span>\
         <span class=\"hint\">Wheel: zoom · drag: pan · double-click: follow the run again</span>\
         </div><p id=\"timeline-note\" class=\"muted\"></p>\
         <div id=\"timeline-box\"><canvas id=\"timeline\" aria-label=\"timeline\"></canvas>\
         <div id=\"tip\" hidden></div></div></section>\n\
         <section><h2>Running now</h2><table id=\"running\"><thead><tr><th>agent</th>\
         <th>worker</th><th>test</th><th class=\"num\">for</th></tr></thead><tbody></tbody>\
         </table></section>\n\
         <section id=\"failures\"><h2>Failures <span id=\"failure-count\"></span></h2>\
         <div id=\"failure-list\"></div></section>",
    )
}

async fn agents_page() -> Response {
    page(
        "fly: agents",
        "agents",
        None,
        "<h1>Agents</h1>\n<p id=\"agents-summary\" class=\"muted\">Loading…</p>\n\
         <div id=\"agents\"></div>",
    )
}

async fn run_report(State(state): State<AppState>, Path(id): Path<String>) -> Response {
    let db = state.db.clone();
    match blocking(move || {
        let db = Db::open(&db)?;
        let run_id = db.resolve_run(&id)?;
        Ok(html::render(&db.run_view(&run_id)?))
    })
    .await
    {
        Ok(page) => ([(header::CACHE_CONTROL, "no-store")], Html(page)).into_response(),
        Err(response) => response,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn target_seconds_must_be_positive() {
        assert_eq!(positive_seconds("300"), Ok(300.0));
        assert!(positive_seconds("0").is_err());
        assert!(positive_seconds("-5").is_err());
        assert!(positive_seconds("soon").is_err());
    }

    /// A plain HTTP/1.1 GET over a real socket: the status and the body.
    async fn get(addr: SocketAddr, path: &str) -> (u16, String) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).await.unwrap();
        let (head, body) = response.split_once("\r\n\r\n").unwrap();
        let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
        (status, body.to_string())
    }

    fn state(dispatcher: DispatcherHandle, store: Store) -> AppState {
        AppState {
            dispatcher,
            db: store.path().to_path_buf(),
            store,
            token: None,
            metrics_open: false,
            target_seconds: DEFAULT_TARGET_SECONDS,
        }
    }

    async fn serve_state(state: AppState) -> Dashboard {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        Dashboard::serve(listener, addr, state)
    }

    #[tokio::test]
    async fn grpc_health_serves_and_healthz_says_ok() {
        use tonic_health::pb::health_check_response::ServingStatus;
        use tonic_health::pb::health_client::HealthClient;
        use tonic_health::pb::HealthCheckRequest;

        let dir = tempfile::tempdir().unwrap();
        let node = Node::start(&dir.path().join("fly.db"), Duration::from_secs(10)).unwrap();
        let (listener, addr) = crate::node::bind("127.0.0.1:0").await.unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let server = node
            .serve_tcp(listener, &crate::auth::Security::default(), async {
                let _ = stopped.await;
            })
            .unwrap();
        let channel = tonic::transport::Endpoint::try_from(format!("http://{addr}"))
            .unwrap()
            .connect()
            .await
            .unwrap();
        let mut client = HealthClient::new(channel);
        for service in ["", "fly.v1.Agents", "fly.v1.Runs"] {
            // The fly services are marked serving just after the node starts.
            let status = loop {
                let answer = client
                    .check(HealthCheckRequest {
                        service: service.into(),
                    })
                    .await;
                match answer {
                    Ok(response) => break response.into_inner().status,
                    Err(status) if status.code() == tonic::Code::NotFound => {
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                    Err(status) => panic!("{service:?}: {status}"),
                }
            };
            assert_eq!(status, ServingStatus::Serving as i32, "{service:?}");
        }

        let dashboard = serve_state(state(node.dispatcher(), node.store().clone())).await;
        assert_eq!(
            get(dashboard.addr(), "/healthz").await,
            (200, "ok\n".into())
        );
        let (status, text) = get(dashboard.addr(), "/metrics").await;
        assert_eq!(status, 200);
        assert!(text.contains("fly_agents 0"), "{text}");
        dashboard.stop().await;
        let _ = stop.send(());
        let _ = server.await;
        node.shutdown().await.unwrap();
    }

    #[tokio::test]
    async fn healthz_fails_once_the_store_writer_is_gone() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("fly.db")).unwrap();
        let (dispatcher, _task) = crate::dispatcher::spawn(store.clone());
        store.clone().close().await.unwrap();
        let dashboard = serve_state(state(dispatcher, store)).await;
        let (status, body) = get(dashboard.addr(), "/healthz").await;
        assert_eq!(status, 503, "{body}");
        assert!(body.contains("store"), "{body}");
        dashboard.stop().await;
    }

    #[test]
    fn pages_name_no_external_url() {
        for (name, body) in [
            ("css", DASHBOARD_CSS),
            ("js", DASHBOARD_JS),
            ("timeline", html::TIMELINE_SCRIPT),
        ] {
            assert!(
                !body.contains("http://") && !body.contains("https://"),
                "{name} names an external URL"
            );
        }
    }
}
