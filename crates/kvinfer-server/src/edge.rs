//! The HTTP edge: what a request must pass before any handler sees it.
//!
//! - **Origins.** A browser sends `Origin` on cross-origin requests, including the "simple"
//!   ones (a `text/plain` POST) that skip the CORS preflight. A request whose `Origin` is
//!   neither this server's own nor one of `--cors-origins` is refused with 403, so no web page
//!   can drive a local server. Allowed origins get CORS headers (tower-http's `CorsLayer`).
//! - **Host.** Bound to a loopback address, the server answers only requests whose `Host` is a
//!   loopback name (`localhost`, `127.0.0.1`, `[::1]`): a DNS-rebinding page's requests carry
//!   its own host name and are refused with 421.
//! - **Declared size.** A `Content-Length` over `--max-body-bytes` is refused with 413 before
//!   the body is read.
//! - **Request id.** `X-Request-Id` is echoed (at most 64 safe characters) or made up, and the
//!   request is logged with it.

use crate::error::{quote, short, ApiError};
use axum::extract::{Request, State};
use axum::http::{header, HeaderValue};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use std::sync::Arc;

/// What the edge checks against.
#[derive(Debug, Clone)]
pub struct EdgeConfig {
    /// Origins allowed cross-origin (`*`: any).
    pub cors_origins: Vec<String>,
    /// Only loopback `Host` names are answered.
    pub loopback_only: bool,
    /// Largest declared body.
    pub max_body_bytes: usize,
}

fn host_name(host: &str) -> &str {
    if let Some(rest) = host.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    host.rsplit_once(':').map_or(host, |(h, _)| h)
}

/// Whether `host` (a `Host` header) names this machine's loopback.
pub fn is_loopback_host(host: &str) -> bool {
    matches!(
        host_name(host).to_ascii_lowercase().as_str(),
        "localhost" | "127.0.0.1" | "::1"
    )
}

/// The origin, host and size checks (see the module docs).
pub async fn guard(State(cfg): State<Arc<EdgeConfig>>, req: Request, next: Next) -> Response {
    let headers = req.headers();
    // No Host at all (HTTP/1.0, in-process calls) is not a browser: only a present, foreign
    // one is refused.
    let host = headers.get(header::HOST).and_then(|v| v.to_str().ok());
    if cfg.loopback_only && host.is_some_and(|h| !is_loopback_host(h)) {
        let host = host.unwrap_or("");
        return ApiError::misdirected(format!(
            "this server is bound to loopback and answers only Host: localhost or 127.0.0.1, \
             not {} (bind another --host to serve other names)",
            quote(host)
        ))
        .code("bad_host")
        .into_response();
    }
    let host = host.unwrap_or("");
    if let Some(origin) = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok()) {
        let own = ["http://", "https://"]
            .iter()
            .any(|s| origin.strip_prefix(s) == Some(host));
        let allowed = cfg.cors_origins.iter().any(|o| o == "*" || o == origin);
        if !own && !allowed {
            return ApiError::forbidden(format!(
                "cross-origin request from {} refused; allow it with --cors-origins",
                quote(origin)
            ))
            .code("origin_not_allowed")
            .into_response();
        }
    }
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > cfg.max_body_bytes as u64) {
        return ApiError::too_large(format!(
            "the request body is {} bytes; this server accepts at most {} (--max-body-bytes)",
            declared.unwrap_or(0),
            cfg.max_body_bytes
        ))
        .code("body_too_large")
        .into_response();
    }
    next.run(req).await
}

/// The request's id, for the handlers' log lines.
#[derive(Debug, Clone)]
pub struct RequestId(pub String);

/// Echoes or makes up `X-Request-Id`, and logs the request with it.
pub async fn request_id(mut req: Request, next: Next) -> Response {
    let given = req
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| {
            !v.is_empty()
                && v.len() <= 64
                && v.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b))
        })
        .map(str::to_string);
    let id = given.unwrap_or_else(|| format!("{:016x}", rand::random::<u64>()));
    req.extensions_mut().insert(RequestId(id.clone()));
    let (method, path) = (req.method().clone(), req.uri().path().to_string());
    let t0 = std::time::Instant::now();
    let mut res = next.run(req).await;
    tracing::info!(
        request_id = %id,
        %method,
        path = %short(&path),
        status = res.status().as_u16(),
        ms = t0.elapsed().as_millis() as u64,
        "http"
    );
    if let Ok(v) = HeaderValue::from_str(&id) {
        res.headers_mut().insert("x-request-id", v);
    }
    res
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_names() {
        for h in [
            "localhost",
            "localhost:8080",
            "127.0.0.1:1",
            "[::1]:80",
            "LOCALHOST",
        ] {
            assert!(is_loopback_host(h), "{h}");
        }
        for h in [
            "evil.example",
            "evil.example:8080",
            "127.0.0.1.nip.io",
            "",
            "[::2]",
        ] {
            assert!(!is_loopback_host(h), "{h}");
        }
    }
}
