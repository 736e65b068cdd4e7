//! Error answers in process on a tiny model: every status the server emits carries the OpenAI
//! `type` of that status, and no error repeats more than a short, escaped prefix of what the
//! client sent.

use axum::body::{to_bytes, Body};
use axum::http::{Request, StatusCode};
use axum::Router;
use kvinfer_engine::{start_engine, CacheOptions, EngineConfig};
use kvinfer_model::testing::{write_tiny_model_ctx, TinyArch};
use kvinfer_model::Model;
use kvinfer_server::{router_with_shutdown, ServerConfig};
use serde_json::{json, Value};
use tower::ServiceExt;

/// A server on a tiny model, and the switch that cuts requests at the end of a shutdown grace.
fn app(server: ServerConfig, engine: EngineConfig) -> (Router, tokio::sync::watch::Sender<bool>) {
    let dir = std::env::temp_dir().join(format!("kvinfer-errors-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let k = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let path = dir.join(format!("tiny-{k}.gguf"));
    write_tiny_model_ctx(&path, TinyArch::Llama, 3, 256).unwrap();
    let model = Model::load(&path).unwrap();
    let (engine, _) = start_engine(model, engine, |f| f()).unwrap();
    router_with_shutdown(engine, &server)
}

fn engine_config() -> EngineConfig {
    EngineConfig {
        cache: CacheOptions {
            num_blocks: Some(64),
            ..CacheOptions::default()
        },
        ..EngineConfig::default()
    }
}

fn server_config() -> ServerConfig {
    ServerConfig {
        max_body_bytes: 64 << 10,
        ..ServerConfig::default()
    }
}

/// Sends `method path` with `headers` and `body`; the status and the body as text.
async fn send(
    app: &Router,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: impl Into<Body>,
) -> (StatusCode, String) {
    let mut req = Request::builder().method(method).uri(path);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let res = app
        .clone()
        .oneshot(req.body(body.into()).unwrap())
        .await
        .unwrap();
    let status = res.status();
    let bytes = to_bytes(res.into_body(), 16 << 20).await.unwrap();
    (status, String::from_utf8_lossy(&bytes).into_owned())
}

const JSON: (&str, &str) = ("content-type", "application/json");

/// What, method, path, headers, body; the status and `type` it must get.
type StatusCase<'a> = (
    &'a str,
    &'a str,
    &'a str,
    Vec<(&'a str, &'a str)>,
    Body,
    u16,
    &'a str,
);
/// What, path, headers, body (POSTed); the status it must get.
type QuoteCase<'a> = (&'a str, &'a str, Vec<(&'a str, &'a str)>, String, u16);

fn chat(extra: Value) -> String {
    let mut v = json!({"messages": [{"role": "user", "content": "the tin hen"}], "max_tokens": 2});
    for (k, x) in extra.as_object().unwrap() {
        v[k] = x.clone();
    }
    v.to_string()
}

/// The error object of an answer, after checking its shape.
fn error_of(what: &str, body: &str) -> Value {
    let v: Value =
        serde_json::from_str(body).unwrap_or_else(|_| panic!("{what}: not JSON: {body}"));
    let e = v["error"].clone();
    for k in ["message", "type", "param", "code"] {
        assert!(e.get(k).is_some(), "{what}: error lacks {k}: {body}");
    }
    e
}

#[tokio::test]
async fn every_status_carries_its_openai_type() {
    let (app, _) = app(
        ServerConfig {
            api_key: Some("sesame".into()),
            ..server_config()
        },
        engine_config(),
    );
    let key = ("authorization", "Bearer sesame");
    let invalid = "invalid_request_error";
    let cases: Vec<StatusCase> = vec![
        (
            "out of range",
            "POST",
            "/v1/chat/completions",
            vec![key, JSON],
            chat(json!({"temperature": 7})).into(),
            400,
            invalid,
        ),
        (
            "no key",
            "POST",
            "/v1/chat/completions",
            vec![JSON],
            chat(json!({})).into(),
            401,
            "authentication_error",
        ),
        (
            "foreign origin",
            "POST",
            "/v1/chat/completions",
            vec![key, JSON, ("origin", "http://evil.example")],
            chat(json!({})).into(),
            403,
            "permission_error",
        ),
        (
            "unknown model",
            "POST",
            "/v1/chat/completions",
            vec![key, JSON],
            chat(json!({"model": "gpt-9"})).into(),
            404,
            invalid,
        ),
        (
            "unknown path",
            "GET",
            "/v1/nothing",
            vec![key],
            Body::empty(),
            404,
            invalid,
        ),
        (
            "wrong method",
            "GET",
            "/v1/chat/completions",
            vec![key],
            Body::empty(),
            405,
            invalid,
        ),
        (
            "declared body over the limit",
            "POST",
            "/v1/chat/completions",
            vec![key, JSON, ("content-length", "10485760")],
            Body::empty(),
            413,
            invalid,
        ),
        (
            "body over the limit",
            "POST",
            "/v1/chat/completions",
            vec![key, JSON],
            vec![b' '; 100 << 10].into(),
            413,
            invalid,
        ),
        (
            "foreign host",
            "POST",
            "/v1/chat/completions",
            vec![key, JSON, ("host", "evil.example")],
            chat(json!({})).into(),
            421,
            invalid,
        ),
    ];
    for (what, method, path, headers, body, status, kind) in cases {
        let (s, b) = send(&app, method, path, &headers, body).await;
        assert_eq!(s.as_u16(), status, "{what}: {b}");
        assert_eq!(error_of(what, &b)["type"], kind, "{what}: {b}");
    }
}

#[tokio::test]
async fn overload_shutdown_and_timeout_are_503_503_504_with_their_types() {
    // One running, one waiting (--max-waiting 1): of 16 long requests at once, some are
    // refused as overloaded.
    let (full, _) = app(
        server_config(),
        EngineConfig {
            max_running: 1,
            max_waiting: 1,
            ..engine_config()
        },
    );
    let long = chat(json!({"max_tokens": 200, "ignore_eos": true}));
    let tasks: Vec<_> = (0..16)
        .map(|_| {
            let (full, long) = (full.clone(), long.clone());
            tokio::spawn(
                async move { send(&full, "POST", "/v1/chat/completions", &[JSON], long).await },
            )
        })
        .collect();
    let mut answers = Vec::new();
    for t in tasks {
        answers.push(t.await.unwrap());
    }
    let refused: Vec<&String> = answers
        .iter()
        .filter(|(s, _)| *s == StatusCode::SERVICE_UNAVAILABLE)
        .map(|(_, b)| b)
        .collect();
    assert!(!refused.is_empty(), "16 requests at once, none refused");
    for b in refused {
        let e = error_of("overloaded", b);
        assert_eq!(
            (e["type"].as_str(), e["code"].as_str()),
            (Some("service_unavailable_error"), Some("overloaded")),
            "{b}"
        );
    }
    // The shutdown grace is over: a request still running is cut.
    let (cut_app, cut) = app(server_config(), engine_config());
    cut.send(true).unwrap();
    let long = chat(json!({"max_tokens": 200, "ignore_eos": true}));
    let (s, b) = send(&cut_app, "POST", "/v1/chat/completions", &[JSON], long).await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE, "{b}");
    let e = error_of("cut", &b);
    assert_eq!(
        (e["type"].as_str(), e["code"].as_str()),
        (Some("service_unavailable_error"), Some("shutdown")),
        "{b}"
    );
    // Past --request-timeout.
    let (slow, _) = app(
        ServerConfig {
            request_timeout: Some(std::time::Duration::from_millis(2)),
            ..server_config()
        },
        engine_config(),
    );
    let long = chat(json!({"max_tokens": 230, "ignore_eos": true}));
    let (s, b) = send(&slow, "POST", "/v1/chat/completions", &[JSON], long).await;
    assert_eq!(s, StatusCode::GATEWAY_TIMEOUT, "{b}");
    let e = error_of("timeout", &b);
    assert_eq!(
        (e["type"].as_str(), e["code"].as_str()),
        (Some("timeout_error"), Some("timeout")),
        "{b}"
    );
}

#[tokio::test]
async fn errors_quote_only_a_short_escaped_prefix_of_what_was_sent() {
    let (app, _) = app(server_config(), engine_config());
    let long = "x".repeat(20_000);
    let long_header = "y".repeat(8_000);
    let cases: Vec<QuoteCase> = vec![
        (
            "model",
            "/v1/chat/completions",
            vec![JSON],
            chat(json!({ "model": long })),
            404,
        ),
        (
            "logit_bias key",
            "/v1/chat/completions",
            vec![JSON],
            chat(json!({"logit_bias": { long.clone(): 1 }})),
            400,
        ),
        (
            "unknown field",
            "/v1/chat/completions",
            vec![JSON],
            chat(json!({ long.clone(): 1 })),
            400,
        ),
        (
            "string for a number",
            "/v1/chat/completions",
            vec![JSON],
            chat(json!({ "n": long })),
            400,
        ),
        (
            "unknown variant",
            "/v1/chat/completions",
            vec![JSON],
            chat(json!({"response_format": {"type": long}})),
            400,
        ),
        (
            "tool_choice",
            "/v1/chat/completions",
            vec![JSON],
            chat(json!({ "tool_choice": long })),
            400,
        ),
        (
            "unknown /tokenize field",
            "/tokenize",
            vec![JSON],
            json!({ long.clone(): 1 }).to_string(),
            400,
        ),
        (
            "Host",
            "/v1/chat/completions",
            vec![JSON, ("host", long_header.as_str())],
            chat(json!({})),
            421,
        ),
        (
            "Origin",
            "/v1/chat/completions",
            vec![JSON, ("origin", long_header.as_str())],
            chat(json!({})),
            403,
        ),
    ];
    for (what, path, headers, body, status) in cases {
        let (s, b) = send(&app, "POST", path, &headers, body).await;
        assert_eq!(s.as_u16(), status, "{what}: {}", &b[..b.len().min(300)]);
        assert!(
            b.len() < 700,
            "{what}: the error is {} bytes: {}",
            b.len(),
            &b[..300]
        );
        let e = error_of(what, &b);
        let message = e["message"].as_str().unwrap();
        assert!(
            message.contains("xxxx") || message.contains("yyyy"),
            "{what}: {b}"
        );
        assert!(message.contains('…'), "{what}: says the value was cut: {b}");
    }
    // A number's wrong type still says what was expected after the cut value.
    let (_, b) = send(
        &app,
        "POST",
        "/v1/chat/completions",
        &[JSON],
        chat(json!({ "n": long })),
    )
    .await;
    assert!(b.contains("expected i64"), "{b}");
    // Control characters are escaped.
    let (s, b) = send(
        &app,
        "POST",
        "/v1/chat/completions",
        &[JSON],
        chat(json!({"model": "a\u{1b}[31mb"})),
    )
    .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let message = error_of("escape", &b)["message"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(message.contains(r#""a\u{1b}[31mb""#), "{message}");
}
