//! Errors in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}` with an HTTP status.
//!
//! One constructor per status, and the `type` is a function of the status ([`error_type`]), so
//! the two never disagree. A value the client sent appears in a message only through [`quote`]
//! (or [`short`] for `param` and log fields): at most [`QUOTE_CHARS`] characters, escaped.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;

/// An error answer.
#[derive(Debug, Clone)]
pub struct ApiError {
    /// HTTP status; set by the constructor, and with it the `type`.
    status: StatusCode,
    /// What went wrong and what to do.
    pub message: String,
    /// The request field at fault, if one is.
    pub param: Option<String>,
    /// A short machine-readable code.
    pub code: Option<&'static str>,
    /// Seconds for a `Retry-After` header (503 when overloaded).
    pub retry_after: Option<u64>,
}

/// OpenAI's error `type` for an HTTP status: 401 `authentication_error`, 403
/// `permission_error`, 429 `rate_limit_exceeded`, 503 `service_unavailable_error`, 504
/// `timeout_error`, any other 5xx `server_error`, any other 4xx (400, 404, 405, 413, 421, 422)
/// `invalid_request_error`.
pub fn error_type(status: StatusCode) -> &'static str {
    match status.as_u16() {
        401 => "authentication_error",
        403 => "permission_error",
        429 => "rate_limit_exceeded",
        503 => "service_unavailable_error",
        504 => "timeout_error",
        s if s >= 500 => "server_error",
        _ => "invalid_request_error",
    }
}

impl ApiError {
    fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
            param: None,
            code: None,
            retry_after: None,
        }
    }

    /// 400: the request is malformed or a field is out of range.
    pub fn invalid(message: impl Into<String>, param: Option<&str>) -> Self {
        let mut e = Self::new(StatusCode::BAD_REQUEST, message);
        e.param = param.map(str::to_string);
        e
    }

    /// 401: no API key, or a wrong one.
    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, message)
    }

    /// 403: refused whatever the request says (a foreign origin).
    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, message)
    }

    /// 404: no such endpoint or model.
    pub fn not_found(message: impl Into<String>, param: Option<&str>) -> Self {
        let mut e = Self::new(StatusCode::NOT_FOUND, message);
        e.param = param.map(str::to_string);
        e
    }

    /// 405: a known path with another method.
    pub fn method_not_allowed(message: impl Into<String>) -> Self {
        Self::new(StatusCode::METHOD_NOT_ALLOWED, message)
    }

    /// 413: the body is over `--max-body-bytes`.
    pub fn too_large(message: impl Into<String>) -> Self {
        Self::new(StatusCode::PAYLOAD_TOO_LARGE, message)
    }

    /// 421: a `Host` this server does not answer for.
    pub fn misdirected(message: impl Into<String>) -> Self {
        Self::new(StatusCode::MISDIRECTED_REQUEST, message)
    }

    /// 500: the server failed (the model, a worker thread).
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, message)
    }

    /// 503: overloaded or shutting down; try again later.
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, message)
    }

    /// 504: the request ran past `--request-timeout`.
    pub fn timeout(message: impl Into<String>) -> Self {
        Self::new(StatusCode::GATEWAY_TIMEOUT, message)
    }

    /// Adds `Retry-After: secs`.
    pub fn retry_after(mut self, secs: u64) -> Self {
        self.retry_after = Some(secs);
        self
    }

    /// Sets the code.
    pub fn code(mut self, code: &'static str) -> Self {
        self.code = Some(code);
        self
    }

    /// The HTTP status.
    pub fn status(&self) -> StatusCode {
        self.status
    }

    /// The JSON body.
    pub fn body(&self) -> serde_json::Value {
        serde_json::json!({
            "error": {
                "message": self.message,
                "type": error_type(self.status),
                "param": self.param,
                "code": self.code,
            }
        })
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut r = (self.status, Json(self.body())).into_response();
        if let Some(s) = self.retry_after {
            r.headers_mut().insert(
                axum::http::header::RETRY_AFTER,
                axum::http::HeaderValue::from(s),
            );
        }
        r
    }
}

/// Most characters of a client's value an error message or log line repeats.
pub const QUOTE_CHARS: usize = 64;

/// At most [`QUOTE_CHARS`] characters of a value a client sent, escaped as Rust's `{:?}` does
/// (control characters, quotes, backslashes), with `…` when cut: for `param` and log fields.
pub fn short(s: &str) -> String {
    let mut out: String = s
        .chars()
        .take(QUOTE_CHARS)
        .flat_map(char::escape_debug)
        .collect();
    if s.chars().nth(QUOTE_CHARS).is_some() {
        out.push('…');
    }
    out
}

/// [`short`] in double quotes, for messages: `"abc"`, or `"abc…" (100000 characters)` when
/// cut.
pub fn quote(s: &str) -> String {
    let n = s.chars().count();
    if n > QUOTE_CHARS {
        format!("\"{}\" ({n} characters)", short(s))
    } else {
        format!("\"{}\"", short(s))
    }
}

/// A message from a library (serde, the template engine) that may repeat what the client sent:
/// each `"quoted"` or `` `backticked` `` run in it cut to [`QUOTE_CHARS`] characters, control
/// characters escaped, and the whole at most `max_chars` characters.
pub fn bounded(m: &str, max_chars: usize) -> String {
    let mut out = String::new();
    // The quote character of the run we are in, and how many characters of it were kept.
    let (mut open, mut kept, mut escaped) = (None::<char>, 0usize, false);
    let mut written = 0usize;
    for c in m.chars() {
        if written >= max_chars {
            out.push('…');
            break;
        }
        let inside = open.is_some();
        let closes = inside && !escaped && Some(c) == open;
        escaped = inside && !escaped && c == '\\' && open == Some('"');
        if closes {
            open = None;
        } else if !inside && (c == '"' || c == '`') {
            (open, kept) = (Some(c), 0);
        } else if inside {
            kept += 1;
            if kept > QUOTE_CHARS {
                if kept == QUOTE_CHARS + 1 {
                    out.push('…');
                    written += 1;
                }
                continue;
            }
        }
        if c.is_control() {
            out.extend(c.escape_debug());
        } else {
            out.push(c);
        }
        written += 1;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quotes_are_short_and_escaped() {
        assert_eq!(quote("gpt-4"), "\"gpt-4\"");
        assert_eq!(quote("a\"b\\c\nd"), r#""a\"b\\c\nd""#);
        let long = "x".repeat(100_000);
        let q = quote(&long);
        assert!(q.len() < 100, "{q}");
        assert!(q.ends_with("…\" (100000 characters)"), "{q}");
        assert_eq!(short(&"é".repeat(64)), "é".repeat(64));
        assert_eq!(short(&"é".repeat(65)), "é".repeat(64) + "…");
        // Escaping is bounded too: 64 characters of at most 10 bytes each.
        assert!(quote(&"\u{1}".repeat(1000)).len() < 64 * 10 + 40);
        assert_eq!(bounded("a\u{7}b", 10), "a\\u{7}b");
        assert_eq!(bounded("abcdef", 3), "abc…");
        let serde = format!(
            "invalid type: string {:?}, expected i64",
            "x\"y".repeat(1000)
        );
        let b = bounded(&serde, 300);
        assert!(b.ends_with("…\", expected i64"), "{b}");
        assert!(b.len() < 120, "{b}");
        let variant = format!("unknown variant `{}`, expected `text`", "v".repeat(1000));
        assert!(bounded(&variant, 300).ends_with("…`, expected `text`"));
    }

    #[test]
    fn every_constructor_carries_the_type_of_its_status() {
        let cases = [
            (ApiError::invalid("m", None), 400, "invalid_request_error"),
            (ApiError::unauthorized("m"), 401, "authentication_error"),
            (ApiError::forbidden("m"), 403, "permission_error"),
            (ApiError::not_found("m", None), 404, "invalid_request_error"),
            (
                ApiError::method_not_allowed("m"),
                405,
                "invalid_request_error",
            ),
            (ApiError::too_large("m"), 413, "invalid_request_error"),
            (ApiError::misdirected("m"), 421, "invalid_request_error"),
            (ApiError::internal("m"), 500, "server_error"),
            (ApiError::unavailable("m"), 503, "service_unavailable_error"),
            (ApiError::timeout("m"), 504, "timeout_error"),
        ];
        for (e, status, kind) in cases {
            assert_eq!(e.status().as_u16(), status);
            assert_eq!(e.body()["error"]["type"], kind, "{status}");
        }
        assert_eq!(
            error_type(StatusCode::TOO_MANY_REQUESTS),
            "rate_limit_exceeded"
        );
        assert_eq!(error_type(StatusCode::BAD_GATEWAY), "server_error");
    }
}
