//! kvinfer-server: the OpenAI-compatible HTTP API over the engine loop.
//!
//! axum on a small tokio runtime; the engine runs on its own thread and is reached only through
//! its [`EngineHandle`]. Endpoints: `POST /v1/chat/completions`, `POST /v1/completions` (JSON or
//! SSE), `GET /v1/models`, `GET /health`, `GET /metrics` (Prometheus), `GET /v1/stats` (JSON),
//! `GET /` (a chat page with a live view of the KV cache). Errors use OpenAI's shape.
#![deny(missing_docs)]

mod conns;
mod edge;
mod error;
mod handlers;
mod metrics;
mod openai;
mod responses;
mod tools;

pub use conns::{raise_open_files_limit, ConnectionCap};
pub use error::ApiError;

use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::header;
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::{get, post};
use axum::Router;
use kvinfer_engine::EngineHandle;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// How the server listens and what it accepts.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Address to bind (127.0.0.1 by default: not reachable from other machines).
    pub host: String,
    /// Port.
    pub port: u16,
    /// When set, `/v1/*` requires `Authorization: Bearer <key>`.
    pub api_key: Option<String>,
    /// Largest request body accepted, in bytes.
    pub max_body_bytes: usize,
    /// How long in-flight requests may run after SIGINT/SIGTERM before they are cancelled.
    pub shutdown_grace: Duration,
    /// Origins allowed to call the API from a browser (`*`: any); none by default.
    pub cors_origins: Vec<String>,
    /// Longest a request may run (queue, prefill and output); None: no limit.
    pub request_timeout: Option<Duration>,
    /// Most connections open at once (fewer if the open-files limit leaves less room).
    pub max_connections: usize,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            host: "127.0.0.1".into(),
            port: 8080,
            api_key: None,
            max_body_bytes: 4 << 20, // 4 MiB
            shutdown_grace: Duration::from_secs(30),
            cors_origins: Vec::new(),
            request_timeout: None,
            max_connections: MAX_CONNECTIONS,
        }
    }
}

/// What the handlers share.
pub struct AppState {
    engine: EngineHandle,
    /// The model id clients name.
    served: String,
    api_key: Option<String>,
    started: u64,
    next_id: AtomicU64,
    http_errors: AtomicU64,
    /// `system_fingerprint` of every answer.
    fingerprint: String,
    /// `--request-timeout`.
    request_timeout: Option<Duration>,
    /// Turns true when the shutdown grace is over: requests still running are cut.
    cut: tokio::sync::watch::Receiver<bool>,
    /// Bytes of the vocabulary's longest token: a text of N bytes is at least N / this many
    /// tokens, so an over-long prompt is refused before it is tokenized.
    longest_token_bytes: usize,
}

/// The application: routes, auth, body limit, error counting.
pub fn router(engine: EngineHandle, config: &ServerConfig) -> Router {
    router_with_shutdown(engine, config).0
}

/// The application and the switch that cuts requests still running after the shutdown grace.
pub fn router_with_shutdown(
    engine: EngineHandle,
    config: &ServerConfig,
) -> (Router, tokio::sync::watch::Sender<bool>) {
    let (cut_tx, cut_rx) = tokio::sync::watch::channel(false);
    let engine_for_state = engine.clone();
    let served = served_name(&engine);
    let fp = engine.kv_fingerprint();
    let fingerprint = format!(
        "kvinfer-{}-{}",
        env!("CARGO_PKG_VERSION"),
        fp.0[..4]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    );
    let state = Arc::new(AppState {
        engine,
        served,
        api_key: config.api_key.clone(),
        started: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
        next_id: AtomicU64::new(0),
        http_errors: AtomicU64::new(0),
        fingerprint: fingerprint.clone(),
        request_timeout: config.request_timeout,
        cut: cut_rx,
        longest_token_bytes: {
            let tok = &engine_for_state.model().tokenizer;
            (0..tok.vocab_size() as u32)
                .map(|t| tok.token_bytes(t).len())
                .max()
                .unwrap_or(1)
                .max(1)
        },
    });
    let api = Router::new()
        .route("/v1/chat/completions", post(handlers::chat))
        .route("/v1/completions", post(handlers::completion))
        .route("/v1/models", get(handlers::models))
        .route("/v1/cache/clear", post(handlers::clear_cache))
        .route("/v1/stats", get(handlers::stats))
        .route("/tokenize", post(handlers::tokenize))
        .route("/detokenize", post(handlers::detokenize))
        .route_layer(middleware::from_fn_with_state(state.clone(), auth));
    let edge = Arc::new(edge::EdgeConfig {
        cors_origins: config.cors_origins.clone(),
        loopback_only: edge::is_loopback_host(&config.host),
        max_body_bytes: config.max_body_bytes,
    });
    let mut app = Router::new()
        .merge(api)
        .route("/health", get(handlers::health))
        .route("/metrics", get(handlers::metrics))
        .route("/", get(handlers::index))
        .fallback(handlers::not_found)
        .method_not_allowed_fallback(handlers::method_not_allowed)
        .layer(middleware::from_fn_with_state(state.clone(), count_errors))
        .layer(DefaultBodyLimit::max(config.max_body_bytes))
        .with_state(state);
    if !config.cors_origins.is_empty() {
        use tower_http::cors::{AllowOrigin, CorsLayer};
        let origins = if config.cors_origins.iter().any(|o| o == "*") {
            AllowOrigin::any()
        } else {
            AllowOrigin::list(config.cors_origins.iter().filter_map(|o| o.parse().ok()))
        };
        app = app.layer(
            CorsLayer::new()
                .allow_origin(origins)
                .allow_methods([axum::http::Method::GET, axum::http::Method::POST])
                .allow_headers([header::AUTHORIZATION, header::CONTENT_TYPE])
                .expose_headers([axum::http::HeaderName::from_static("x-request-id")]),
        );
    }
    let app = app
        .layer(middleware::from_fn_with_state(edge, edge::guard))
        .layer(middleware::from_fn(edge::request_id));
    (app, cut_tx)
}

/// The model id: the file's name without `.gguf`.
fn served_name(engine: &EngineHandle) -> String {
    let name = engine.model().gguf().path().file_stem();
    name.map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| engine.model().name.clone())
}

async fn auth(State(st): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    if let Some(key) = &st.api_key {
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        // Constant time: the comparison takes as long whatever prefix of the key is right.
        let ok = given.is_some_and(|g| {
            use subtle::ConstantTimeEq;
            g.len() == key.len() && bool::from(g.as_bytes().ct_eq(key.as_bytes()))
        });
        if !ok {
            let e = ApiError::unauthorized(
                "missing or wrong API key: send `Authorization: Bearer <key>`",
            )
            .code("invalid_api_key");
            return axum::response::IntoResponse::into_response(e);
        }
    }
    next.run(req).await
}

async fn count_errors(State(st): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    let res = next.run(req).await;
    if res.status().is_client_error() || res.status().is_server_error() {
        st.http_errors.fetch_add(1, Ordering::Relaxed);
    }
    res
}

/// A connection that has not sent a whole request head within this is closed (a half-sent head
/// is not held forever; an idle keep-alive connection is let go).
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Most connections open at once by default; the open-files limit may allow fewer
/// ([`ConnectionCap`]). Past the cap a new client takes the place of the oldest idle connection,
/// or gets a 503.
pub const MAX_CONNECTIONS: usize = 1024;

/// Serves until SIGINT or SIGTERM; then stops accepting connections, closes idle ones (half-sent
/// heads included), lets in-flight requests finish for up to `shutdown_grace`, then cuts what is
/// left: streams end with an error event and `[DONE]`, JSON requests get a 503 error body, and
/// the process returns.
///
/// hyper's connection builder directly (not `axum::serve`), for what axum does not expose: a
/// header read timeout, which also closes idle keep-alive connections, a connection cap under
/// the open-files limit, and telling idle connections from busy ones (conns.rs).
pub async fn serve(engine: EngineHandle, config: ServerConfig) -> std::io::Result<()> {
    let (app, cut) = router_with_shutdown(engine, &config);
    let listener = tokio::net::TcpListener::bind((config.host.as_str(), config.port)).await?;
    let addr = listener.local_addr()?;
    let cap = ConnectionCap::for_this_process(config.max_connections);
    tracing::info!("listening on http://{addr}, {cap}");
    eprintln!("kvinfer: serving on http://{addr}, {cap} (Ctrl-C to stop)");
    let grace = config.shutdown_grace;
    conns::run(listener, app, cap, grace, cut, shutdown_signal()).await;
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
    eprintln!("kvinfer: shutting down: no new connections; finishing requests in flight");
}
