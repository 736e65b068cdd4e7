//! The HTTP API in process (no socket) on a tiny random model: every bad input gets a 4xx in
//! OpenAI's error shape and the next good request still succeeds; JSON and SSE answers have the
//! documented fields; auth, body limit, metrics.

use axum::body::{to_bytes, Body};
use axum::http::{Request, StatusCode};
use axum::Router;
use kvinfer_engine::{start_engine, CacheOptions, EngineConfig};
use kvinfer_model::gguf::MetaValue;
use kvinfer_model::testing::{write_tiny_model_ctx, write_tiny_model_with, TinyArch};
use kvinfer_model::Model;
use kvinfer_server::{router, ServerConfig};
use serde_json::{json, Value};
use tower::ServiceExt;

fn app(api_key: Option<&str>) -> Router {
    app_with(ServerConfig {
        api_key: api_key.map(str::to_string),
        max_body_bytes: 64 << 10,
        ..ServerConfig::default()
    })
}

fn app_with(server: ServerConfig) -> Router {
    app_ctx(server, 256, 64)
}

/// A server on a tiny model with a context of `ctx` tokens and a pool of `blocks` blocks.
fn app_ctx(server: ServerConfig, ctx: u32, blocks: usize) -> Router {
    app_template(server, ctx, blocks, None)
}

/// As [`app_ctx`], with the file's chat template replaced by `template`.
fn app_template(server: ServerConfig, ctx: u32, blocks: usize, template: Option<&str>) -> Router {
    let dir = std::env::temp_dir().join(format!("kvinfer-server-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let k = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let path = dir.join(format!("tiny-{k}.gguf"));
    match template {
        None => write_tiny_model_ctx(&path, TinyArch::Llama, 3, ctx).unwrap(),
        Some(t) => write_tiny_model_with(&path, TinyArch::Llama, 3, ctx, |w| {
            w.meta("tokenizer.chat_template", MetaValue::Str(t.into()));
        })
        .unwrap(),
    }
    let model = Model::load(&path).unwrap();
    let config = EngineConfig {
        cache: CacheOptions {
            num_blocks: Some(blocks),
            ..CacheOptions::default()
        },
        ..EngineConfig::default()
    };
    let (engine, _) = start_engine(model, config, |f| f()).unwrap();
    router(engine, &server)
}

async fn call(
    app: &Router,
    method: &str,
    path: &str,
    body: Body,
    key: Option<&str>,
) -> (StatusCode, String) {
    let mut req = Request::builder().method(method).uri(path);
    if let Some(k) = key {
        req = req.header("authorization", format!("Bearer {k}"));
    }
    let req = req
        .header("content-type", "application/json")
        .body(body)
        .unwrap();
    let res = app.clone().oneshot(req).await.unwrap();
    let status = res.status();
    let bytes = to_bytes(res.into_body(), 16 << 20).await.unwrap();
    (status, String::from_utf8_lossy(&bytes).into_owned())
}

async fn post(app: &Router, path: &str, body: Value) -> (StatusCode, Value) {
    let (s, b) = call(app, "POST", path, Body::from(body.to_string()), None).await;
    (s, serde_json::from_str(&b).unwrap_or(Value::String(b)))
}

fn chat(max_tokens: Value) -> Value {
    json!({"messages": [{"role": "user", "content": "the tin hen"}], "max_tokens": max_tokens, "temperature": 0})
}

fn user(extra: Value) -> Body {
    let mut v = json!({"messages": [{"role": "user", "content": "x"}]});
    for (k, x) in extra.as_object().unwrap() {
        v[k] = x.clone();
    }
    Body::from(v.to_string())
}

/// A good request after a bad one: the server keeps serving.
async fn still_serving(app: &Router) {
    let (s, v) = post(app, "/v1/chat/completions", chat(json!(4))).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["usage"]["completion_tokens"], 4);
}

fn assert_error_shape(v: &Value) {
    let e = &v["error"];
    for k in ["message", "type", "param", "code"] {
        assert!(e.get(k).is_some(), "error lacks {k}: {v}");
    }
    assert!(!e["message"].as_str().unwrap_or("").is_empty(), "{v}");
}

#[tokio::test]
async fn bad_inputs_get_4xx_in_openai_shape_and_serving_continues() {
    let app = app(None);
    let long = "tin hen ".repeat(400);
    let bad = StatusCode::BAD_REQUEST;
    let cases: Vec<(&str, Body, StatusCode, Option<&str>)> = vec![
        ("malformed json", Body::from("{\"messages\": ["), bad, None),
        ("not an object", Body::from("[1, 2]"), bad, None),
        (
            "missing messages",
            Body::from(r#"{"max_tokens": 3}"#),
            bad,
            None,
        ),
        (
            "messages wrong type",
            Body::from(r#"{"messages": "hi"}"#),
            bad,
            None,
        ),
        (
            "empty messages",
            Body::from(r#"{"messages": []}"#),
            bad,
            Some("messages"),
        ),
        (
            "temperature wrong type",
            user(json!({"temperature": "hot"})),
            bad,
            None,
        ),
        (
            "temperature out of range",
            user(json!({"temperature": 7})),
            bad,
            Some("temperature"),
        ),
        (
            "negative max_tokens",
            Body::from(chat(json!(-5)).to_string()),
            bad,
            Some("max_tokens"),
        ),
        (
            "absurd max_tokens",
            Body::from(chat(json!(1_000_000_000_000u64)).to_string()),
            bad,
            Some("max_tokens"),
        ),
        ("n zero", user(json!({"n": 0})), bad, Some("n")),
        ("bad stop", user(json!({"stop": 5})), bad, Some("stop")),
        (
            "prompt past the context",
            Body::from(json!({"messages": [{"role": "user", "content": long}]}).to_string()),
            bad,
            Some("messages"),
        ),
        (
            "unknown model",
            user(json!({"model": "gpt-9"})),
            StatusCode::NOT_FOUND,
            Some("model"),
        ),
        (
            "body over the limit",
            Body::from(vec![b' '; 100 << 10]),
            StatusCode::PAYLOAD_TOO_LARGE,
            None,
        ),
    ];
    let n_cases = cases.len();
    for (what, body, want, param) in cases {
        let (s, b) = call(&app, "POST", "/v1/chat/completions", body, None).await;
        assert_eq!(s, want, "{what}: {b}");
        let v: Value = serde_json::from_str(&b).unwrap_or_else(|_| panic!("{what}: not JSON: {b}"));
        assert_error_shape(&v);
        if let Some(p) = param {
            assert_eq!(v["error"]["param"], p, "{what}: {v}");
        }
        still_serving(&app).await;
    }
    let (s, v) = post(&app, "/v1/completions", json!({"prompt": {"x": 1}})).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    let (s, v) = post(&app, "/v1/completions", json!({"prompt": [999999999]})).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    let (s, b) = call(&app, "GET", "/v1/nothing", Body::empty(), None).await;
    assert_eq!(s, StatusCode::NOT_FOUND, "{b}");
    still_serving(&app).await;
    // Every 4xx was counted, and no block is left in use.
    // (The engine publishes its snapshot after the step that answered: wait for it.)
    let mut m = String::new();
    for _ in 0..200 {
        m = call(&app, "GET", "/metrics", Body::empty(), None).await.1;
        if m.contains("kvinfer_kv_blocks_used 0\n") {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    let errors = format!("kvinfer_http_errors_total {}\n", n_cases + 3);
    assert!(m.contains(&errors), "want {errors} in {m}");
    assert!(m.contains("kvinfer_kv_blocks_used 0\n"), "{m}");
}

#[tokio::test]
async fn json_answers_have_the_documented_fields() {
    let app = app(None);
    let body = json!({"messages": [{"role": "user", "content": "the tin"}], "max_completion_tokens": 6, "temperature": 0, "n": 2});
    let (s, v) = post(&app, "/v1/chat/completions", body).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["choices"].as_array().unwrap().len(), 2);
    assert_eq!(
        v["choices"][0]["message"], v["choices"][1]["message"],
        "greedy choices agree"
    );
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    assert_eq!(v["usage"]["completion_tokens"], 12);
    let total = v["usage"]["prompt_tokens"].as_u64().unwrap() + 12;
    assert_eq!(v["usage"]["total_tokens"], total);
    let body = json!({"prompt": "the tin hen", "max_tokens": 5, "temperature": 0});
    let (s, v) = post(&app, "/v1/completions", body).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["object"], "text_completion");
    assert!(v["choices"][0]["text"].is_string());
    assert!(v["usage"]["prompt_tokens_details"]["cached_tokens"].is_u64());
    let (s, b) = call(&app, "GET", "/v1/models", Body::empty(), None).await;
    assert_eq!(s, StatusCode::OK);
    let v: Value = serde_json::from_str(&b).unwrap();
    let id = v["data"][0]["id"].as_str().unwrap().to_string();
    // Naming the served model works.
    let body = json!({"model": id, "prompt": "the", "max_tokens": 2});
    let (s, _) = post(&app, "/v1/completions", body).await;
    assert_eq!(s, StatusCode::OK);
    let (s, b) = call(&app, "GET", "/health", Body::empty(), None).await;
    assert_eq!((s, b.contains("ok")), (StatusCode::OK, true));
    let (s, b) = call(&app, "GET", "/", Body::empty(), None).await;
    assert_eq!(s, StatusCode::OK);
    assert!(b.to_lowercase().contains("<!doctype html"), "{b}");
}

#[tokio::test]
async fn streams_are_sse_chunks_ending_in_done_with_usage() {
    let app = app(None);
    let body = json!({"messages": [{"role": "user", "content": "the tin hen"}], "max_tokens": 6, "temperature": 0, "stream": true, "stream_options": {"include_usage": true}});
    let (s, b) = call(
        &app,
        "POST",
        "/v1/chat/completions",
        Body::from(body.to_string()),
        None,
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{b}");
    let data: Vec<&str> = b.lines().filter_map(|l| l.strip_prefix("data: ")).collect();
    assert_eq!(data.last(), Some(&"[DONE]"), "{b}");
    let chunks: Vec<Value> = data[..data.len() - 1]
        .iter()
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let text: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    let finish: Vec<&Value> = chunks
        .iter()
        .map(|c| &c["choices"][0]["finish_reason"])
        .filter(|f| !f.is_null())
        .collect();
    assert_eq!(finish, vec![&json!("length")]);
    let usage = &chunks.last().unwrap()["usage"];
    assert_eq!(usage["completion_tokens"], 6);
    // The same request without streaming gives the same text.
    let (_, v) = post(&app, "/v1/chat/completions", chat(json!(6))).await;
    assert_eq!(v["choices"][0]["message"]["content"], text);
}

#[tokio::test]
async fn api_key_guards_v1() {
    let app = app(Some("sesame"));
    let body = || Body::from(chat(json!(2)).to_string());
    let (s, b) = call(&app, "POST", "/v1/chat/completions", body(), None).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED, "{b}");
    assert_error_shape(&serde_json::from_str(&b).unwrap());
    let (s, _) = call(&app, "POST", "/v1/chat/completions", body(), Some("wrong")).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    let (s, b) = call(&app, "POST", "/v1/chat/completions", body(), Some("sesame")).await;
    assert_eq!(s, StatusCode::OK, "{b}");
    let (s, _) = call(&app, "GET", "/health", Body::empty(), None).await;
    assert_eq!(s, StatusCode::OK, "health stays open for probes");
    // Every /v1/* path needs the key, /v1/stats included; a key of the right length but
    // wrong bytes is refused too.
    let (s, _) = call(&app, "GET", "/v1/stats", Body::empty(), None).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    let (s, _) = call(&app, "GET", "/v1/stats", Body::empty(), Some("sesamE")).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    let (s, _) = call(&app, "GET", "/v1/stats", Body::empty(), Some("sesame")).await;
    assert_eq!(s, StatusCode::OK);
}

#[tokio::test]
async fn fields_not_honoured_are_refused_by_name_and_supported_ones_take_effect() {
    let app = app(None);
    for (extra, param, code) in [
        (json!({"frobnicate": 1}), "frobnicate", "unknown_parameter"),
        (json!({"top_logprobs": 3}), "top_logprobs", ""),
        (
            json!({"logprobs": true, "top_logprobs": 21}),
            "top_logprobs",
            "",
        ),
        (json!({"logprobs": "yes"}), "logprobs", ""),
        (
            json!({"response_format": {"type": "xml"}}),
            "response_format.type",
            "",
        ),
        (
            json!({"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "nope"}}}}),
            "response_format",
            "",
        ),
        (
            json!({"tools": [{"type": "function", "function": {"name": "bad name"}}]}),
            "tools[0].function.name",
            "",
        ),
        (json!({"tool_choice": "required"}), "tool_choice", ""),
        (
            json!({"tools": [{"type": "function", "function": {"name": "f"}}],
                   "tool_choice": {"type": "function", "function": {"name": "g"}}}),
            "tool_choice",
            "",
        ),
        (json!({"stop": 5}), "stop", ""),
        (json!({"suffix": "x"}), "suffix", "unsupported_parameter"),
        (json!({"echo": true}), "echo", "unsupported_parameter"),
        (json!({"presence_penalty": 3}), "presence_penalty", ""),
        (json!({"frequency_penalty": -2.5}), "frequency_penalty", ""),
        (json!({"logit_bias": {"x": 1}}), "logit_bias", ""),
        (json!({"logit_bias": {"5": 200}}), "logit_bias", ""),
        (json!({"top_k": -1}), "top_k", ""),
        (json!({"min_p": 1.5}), "min_p", ""),
        (json!({"min_tokens": 99, "max_tokens": 4}), "min_tokens", ""),
    ] {
        let (s, b) = call(
            &app,
            "POST",
            "/v1/chat/completions",
            user(extra.clone()),
            None,
        )
        .await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{extra}: {b}");
        let v: Value = serde_json::from_str(&b).unwrap();
        assert_error_shape(&v);
        assert_eq!(v["error"]["param"], json!(param), "{extra}: {b}");
        if !code.is_empty() {
            assert_eq!(v["error"]["code"], json!(code), "{extra}");
        }
    }
    // A huge unknown field name is quoted short.
    let long = "z".repeat(20_000);
    let (s, b) = call(
        &app,
        "POST",
        "/v1/chat/completions",
        user(json!({ long.clone(): 1 })),
        None,
    )
    .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert!(b.len() < 1000, "the error echoes {} bytes", b.len());
    // The "off" values of fields not done yet are fine.
    let off = json!({"logprobs": false, "response_format": {"type": "text"}, "tools": [],
        "tool_choice": "none", "user": "u1", "max_tokens": 2});
    let (s, b) = call(&app, "POST", "/v1/chat/completions", user(off), None).await;
    assert_eq!(s, StatusCode::OK, "{b}");
    // No seed: a random one, reported; the same seed reproduces a sampled answer.
    let sample = |seed: Option<u64>| {
        let mut v = json!({"max_tokens": 12, "temperature": 1.5, "ignore_eos": true});
        if let Some(s) = seed {
            v["seed"] = json!(s);
        }
        v
    };
    let mut seeds = std::collections::HashSet::new();
    let mut ids = std::collections::HashSet::new();
    let mut texts = Vec::new();
    for _ in 0..4 {
        let (s, b) = call(
            &app,
            "POST",
            "/v1/chat/completions",
            user(sample(None)),
            None,
        )
        .await;
        assert_eq!(s, StatusCode::OK, "{b}");
        let v: Value = serde_json::from_str(&b).unwrap();
        seeds.insert(v["seed"].as_u64().expect("seed reported"));
        let id = v["id"].as_str().unwrap().to_string();
        assert!(id.starts_with("chatcmpl-") && id.len() == 9 + 24, "{id}");
        ids.insert(id);
        assert!(v["system_fingerprint"]
            .as_str()
            .unwrap()
            .starts_with("kvinfer-"));
        texts.push((
            v["seed"].as_u64().unwrap(),
            v["choices"][0]["message"]["content"].clone(),
        ));
    }
    assert!(seeds.len() >= 3, "random seeds: {seeds:?}");
    assert_eq!(ids.len(), 4, "random ids");
    let (seed, text) = texts[0].clone();
    let (_, b) = call(
        &app,
        "POST",
        "/v1/chat/completions",
        user(sample(Some(seed))),
        None,
    )
    .await;
    let v: Value = serde_json::from_str(&b).unwrap();
    assert_eq!(
        v["choices"][0]["message"]["content"], text,
        "the reported seed reproduces it"
    );
    assert_eq!(v["seed"], json!(seed));
}

#[tokio::test]
async fn cache_clear_needs_the_key_and_empties_the_prefix_cache() {
    let app = app(Some("sesame"));
    let body = || Body::from(chat(json!(2)).to_string());
    let (s, b) = call(&app, "POST", "/v1/chat/completions", body(), Some("sesame")).await;
    assert_eq!(s, StatusCode::OK, "{b}");
    let stats = |b: String| serde_json::from_str::<Value>(&b).unwrap();
    // The snapshot is published after the step that answered: wait for it.
    let mut cached = 0;
    for _ in 0..200 {
        let (_, b) = call(&app, "GET", "/v1/stats", Body::empty(), Some("sesame")).await;
        cached = stats(b)["blocks"]["cached"].as_u64().unwrap();
        if cached > 0 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert!(cached > 0, "the chat left cached blocks");
    let (s, _) = call(&app, "POST", "/v1/cache/clear", Body::empty(), None).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    let (s, b) = call(
        &app,
        "POST",
        "/v1/cache/clear",
        Body::empty(),
        Some("sesame"),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{b}");
    let v = stats(b);
    assert_eq!(v["pool_blocks"].as_u64(), Some(cached), "{v}");
    assert_eq!(v["tiers"], json!([]));
    let (_, b) = call(&app, "GET", "/v1/stats", Body::empty(), Some("sesame")).await;
    assert_eq!(stats(b)["blocks"]["cached"], json!(0));
    let (s, _) = call(&app, "POST", "/v1/chat/completions", body(), Some("sesame")).await;
    assert_eq!(s, StatusCode::OK, "serving goes on after a clear");
}

async fn send(app: &Router, req: Request<Body>) -> (StatusCode, axum::http::HeaderMap, String) {
    let res = app.clone().oneshot(req).await.unwrap();
    let (status, headers) = (res.status(), res.headers().clone());
    let bytes = to_bytes(res.into_body(), 16 << 20).await.unwrap();
    (
        status,
        headers,
        String::from_utf8_lossy(&bytes).into_owned(),
    )
}

fn chat_req(headers: &[(&str, &str)]) -> Request<Body> {
    let mut r = Request::builder()
        .method("POST")
        .uri("/v1/chat/completions");
    for (k, v) in headers {
        r = r.header(*k, *v);
    }
    r.body(Body::from(chat(json!(2)).to_string())).unwrap()
}

#[tokio::test]
async fn the_edge_refuses_foreign_hosts_foreign_origins_and_declared_oversize_bodies() {
    let app = app(None);
    // DNS rebinding: a foreign Host on a loopback-bound server.
    let (s, _, b) = send(
        &app,
        chat_req(&[
            ("host", "evil.example:8080"),
            ("content-type", "application/json"),
        ]),
    )
    .await;
    assert_eq!(s, StatusCode::MISDIRECTED_REQUEST, "{b}");
    assert_error_shape(&serde_json::from_str(&b).unwrap());
    let (s, _, b) = send(
        &app,
        chat_req(&[
            ("host", "localhost:8080"),
            ("content-type", "application/json"),
        ]),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{b}");
    // A foreign page's simple (no preflight) text/plain POST.
    let (s, _, b) = send(
        &app,
        chat_req(&[
            ("host", "127.0.0.1:8080"),
            ("origin", "http://evil.example"),
            ("content-type", "text/plain"),
        ]),
    )
    .await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{b}");
    // The page the server serves itself is same-origin.
    let (s, _, b) = send(
        &app,
        chat_req(&[
            ("host", "127.0.0.1:8080"),
            ("origin", "http://127.0.0.1:8080"),
            ("content-type", "application/json"),
        ]),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{b}");
    // A declared body over the limit is refused before it is read.
    let big = Request::builder()
        .method("POST")
        .uri("/v1/chat/completions")
        .header("content-length", (10u64 << 20).to_string())
        .body(Body::empty())
        .unwrap();
    let (s, _, b) = send(&app, big).await;
    assert_eq!(s, StatusCode::PAYLOAD_TOO_LARGE, "{b}");
    // X-Request-Id echoed, or made up.
    let (_, h, _) = send(
        &app,
        chat_req(&[
            ("x-request-id", "abc-123"),
            ("content-type", "application/json"),
        ]),
    )
    .await;
    assert_eq!(h["x-request-id"], "abc-123");
    let (_, h, _) = send(&app, chat_req(&[("content-type", "application/json")])).await;
    assert_eq!(h["x-request-id"].len(), 16);
    // 405 in OpenAI's shape.
    let (s, b) = call(&app, "GET", "/v1/chat/completions", Body::empty(), None).await;
    assert_eq!(s, StatusCode::METHOD_NOT_ALLOWED, "{b}");
    assert_error_shape(&serde_json::from_str(&b).unwrap());
}

#[tokio::test]
async fn cors_is_off_by_default_and_answers_allowed_origins_when_on() {
    let preflight = |origin: &str| {
        Request::builder()
            .method("OPTIONS")
            .uri("/v1/chat/completions")
            .header("origin", origin)
            .header("access-control-request-method", "POST")
            .header(
                "access-control-request-headers",
                "content-type,authorization",
            )
            .body(Body::empty())
            .unwrap()
    };
    let off = app(None);
    let (s, h, _) = send(&off, preflight("http://app.example")).await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    assert!(h.get("access-control-allow-origin").is_none());
    let on = app_with(ServerConfig {
        cors_origins: vec!["http://app.example".into()],
        ..ServerConfig::default()
    });
    let (s, h, _) = send(&on, preflight("http://app.example")).await;
    assert!(s.is_success(), "{s}");
    assert_eq!(h["access-control-allow-origin"], "http://app.example");
    let (s, _, _) = send(&on, preflight("http://other.example")).await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    let (s, h, b) = send(
        &on,
        chat_req(&[
            ("origin", "http://app.example"),
            ("content-type", "application/json"),
        ]),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{b}");
    assert_eq!(h["access-control-allow-origin"], "http://app.example");
}

#[tokio::test]
async fn tokenize_and_detokenize_round_trip() {
    let app = app(None);
    let (s, v) = post(&app, "/tokenize", json!({"content": "the tin hen"})).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let ids = v["tokens"].as_array().unwrap().clone();
    assert!(!ids.is_empty());
    let (s, v) = post(&app, "/detokenize", json!({"tokens": ids})).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["content"], json!("the tin hen"));
    let (s, _) = post(&app, "/detokenize", json!({"tokens": [99999999]})).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    let (s, _) = post(&app, "/tokenize", json!({"text": "x"})).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn a_request_past_its_deadline_is_cut_json_and_stream_alike() {
    let app = app_with(ServerConfig {
        request_timeout: Some(std::time::Duration::from_millis(2)),
        ..ServerConfig::default()
    });
    let long = json!({"messages": [{"role": "user", "content": "x"}], "max_tokens": 230, "ignore_eos": true});
    let (s, v) = post(&app, "/v1/chat/completions", long.clone()).await;
    assert_eq!(s, StatusCode::GATEWAY_TIMEOUT, "{v}");
    assert_eq!(v["error"]["code"], json!("timeout"));
    let mut streamed = long;
    streamed["stream"] = json!(true);
    let (s, b) = call(
        &app,
        "POST",
        "/v1/chat/completions",
        Body::from(streamed.to_string()),
        None,
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    assert!(b.contains("\"timeout\""), "{b}");
    assert!(b.trim_end().ends_with("data: [DONE]"), "{b}");
}

#[tokio::test]
async fn logprobs_in_openai_shapes_json_and_stream() {
    let app = app(None);
    let body = json!({"messages": [{"role": "user", "content": "x"}], "max_tokens": 6,
        "temperature": 0, "ignore_eos": true, "logprobs": true, "top_logprobs": 2});
    let (s, v) = post(&app, "/v1/chat/completions", body.clone()).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let content = v["choices"][0]["logprobs"]["content"].as_array().unwrap();
    assert_eq!(content.len(), 6);
    for e in content {
        let top = e["top_logprobs"].as_array().unwrap();
        assert_eq!(top.len(), 2);
        assert_eq!(
            top[0]["token"], e["token"],
            "greedy: the chosen token is the top one"
        );
        assert!(e["logprob"].as_f64().unwrap() <= 0.0 && e["bytes"].is_array());
    }
    let text: String = content
        .iter()
        .map(|e| e["token"].as_str().unwrap())
        .collect();
    assert_eq!(
        text,
        v["choices"][0]["message"]["content"].as_str().unwrap()
    );
    let mut streamed = body;
    streamed["stream"] = json!(true);
    let (_, b) = call(
        &app,
        "POST",
        "/v1/chat/completions",
        Body::from(streamed.to_string()),
        None,
    )
    .await;
    let n: usize = b
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter(|d| *d != "[DONE]")
        .map(|d| serde_json::from_str::<Value>(d).unwrap())
        .map(|c| {
            c["choices"][0]["logprobs"]["content"]
                .as_array()
                .map_or(0, |a| a.len())
        })
        .sum();
    assert_eq!(n, 6, "every token's logprobs arrive once over the stream");
    let (s, v) = post(
        &app,
        "/v1/completions",
        json!({"prompt": "the tin", "max_tokens": 5,
        "temperature": 0, "ignore_eos": true, "logprobs": 3}),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let lp = &v["choices"][0]["logprobs"];
    for k in ["tokens", "token_logprobs", "top_logprobs", "text_offset"] {
        assert_eq!(lp[k].as_array().unwrap().len(), 5, "{k}: {lp}");
    }
    assert_eq!(
        lp["top_logprobs"][0].as_object().unwrap().len().min(3),
        lp["top_logprobs"][0].as_object().unwrap().len()
    );
    let (_, v) = post(
        &app,
        "/v1/completions",
        json!({"prompt": "x", "max_tokens": 2}),
    )
    .await;
    assert_eq!(v["choices"][0]["logprobs"], Value::Null, "off unless asked");
}

#[tokio::test]
async fn a_prompt_too_long_for_any_tokenization_is_refused_before_tokenizing() {
    let app = app(None);
    let big = "tin hen ".repeat(7_000); // 56 KB: more tokens than the context whatever the split
    for (path, body) in [
        (
            "/v1/chat/completions",
            json!({"messages": [{"role": "user", "content": big}]}),
        ),
        ("/v1/completions", json!({"prompt": big})),
    ] {
        let (s, v) = post(&app, path, body).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
        assert_eq!(v["error"]["code"], json!("context_length_exceeded"));
        assert!(
            v["error"]["message"]
                .as_str()
                .unwrap()
                .contains("bytes, at least"),
            "{v}"
        );
    }
    still_serving(&app).await;
}

/// The `data:` payloads of an SSE body, parsed (`[DONE]` left out).
fn sse_chunks(body: &str) -> Vec<Value> {
    body.lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter(|d| *d != "[DONE]")
        .map(|d| serde_json::from_str(d).unwrap())
        .collect()
}

#[tokio::test]
async fn json_schema_output_parses_and_follows_the_schema_json_and_stream() {
    let app = app(None);
    let schema = json!({
        "type": "object",
        "properties": {
            "city": {"type": "string", "maxLength": 8},
            "days": {"type": "integer", "minimum": 1, "maximum": 9}
        },
        "required": ["city", "days"],
        "additionalProperties": false
    });
    let body = |stream: bool, temperature: f64| {
        json!({"messages": [{"role": "user", "content": "plan a trip"}], "max_tokens": 120,
               "temperature": temperature, "seed": 7, "n": 2, "stream": stream,
               "response_format": {"type": "json_schema",
                                   "json_schema": {"name": "trip", "strict": true, "schema": schema}}})
    };
    let check = |text: &str| {
        let v: Value = serde_json::from_str(text).unwrap_or_else(|e| panic!("{text:?}: {e}"));
        assert_eq!(v.as_object().unwrap().len(), 2, "{text}");
        assert!(v["city"].as_str().unwrap().chars().count() <= 8, "{text}");
        assert!((1..=9).contains(&v["days"].as_i64().unwrap()), "{text}");
    };
    for temperature in [0.0, 1.0] {
        let (s, v) = post(&app, "/v1/chat/completions", body(false, temperature)).await;
        assert_eq!(s, StatusCode::OK, "{v}");
        for c in v["choices"].as_array().unwrap() {
            assert_eq!(c["finish_reason"], "stop", "{v}");
            check(c["message"]["content"].as_str().unwrap());
        }
        let (s, b) = call(
            &app,
            "POST",
            "/v1/chat/completions",
            Body::from(body(true, temperature).to_string()),
            None,
        )
        .await;
        assert_eq!(s, StatusCode::OK);
        let mut texts = [String::new(), String::new()];
        for c in sse_chunks(&b) {
            for ch in c["choices"].as_array().unwrap() {
                if let Some(t) = ch["delta"]["content"].as_str() {
                    texts[ch["index"].as_u64().unwrap() as usize].push_str(t);
                }
            }
        }
        texts.iter().for_each(|t| check(t));
    }
    // json_object on completions too.
    let (s, v) = post(
        &app,
        "/v1/completions",
        json!({"prompt": "x", "max_tokens": 60,
        "response_format": {"type": "json_object"}, "temperature": 0}),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let text = v["choices"][0]["text"].as_str().unwrap();
    if v["choices"][0]["finish_reason"] == "stop" {
        assert!(
            serde_json::from_str::<Value>(text).unwrap().is_object(),
            "{text}"
        );
    } else {
        assert!(text.starts_with('{'), "{text}");
    }
}

#[tokio::test]
async fn forced_tool_calls_come_back_as_tool_calls_json_and_stream() {
    // The tools' description makes a prompt of ~900 byte-level tokens.
    let app = app_ctx(ServerConfig::default(), 2048, 256);
    let tools = json!([
        {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
         "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 10}},
                        "required": ["city"], "additionalProperties": false}}},
        {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object",
         "properties": {"zone": {"enum": ["utc", "cet"]}}, "required": ["zone"], "additionalProperties": false}}}
    ]);
    let body = |stream: bool, choice: Value| {
        json!({"messages": [{"role": "user", "content": "weather in Paris?"}], "max_tokens": 120,
               "temperature": 1.0, "seed": 3, "stream": stream, "tools": tools,
               "tool_choice": choice, "parallel_tool_calls": false})
    };
    let check = |name: &str, args: &str, want: Option<&str>| {
        let a: Value = serde_json::from_str(args).unwrap_or_else(|e| panic!("{args:?}: {e}"));
        match name {
            "get_weather" => assert!(a["city"].as_str().unwrap().chars().count() <= 10),
            "get_time" => assert!(["utc", "cet"].contains(&a["zone"].as_str().unwrap())),
            other => panic!("called {other}"),
        }
        if let Some(w) = want {
            assert_eq!(name, w);
        }
    };
    let named = json!({"type": "function", "function": {"name": "get_time"}});
    for (choice, want) in [(json!("required"), None), (named, Some("get_time"))] {
        let (s, v) = post(&app, "/v1/chat/completions", body(false, choice.clone())).await;
        assert_eq!(s, StatusCode::OK, "{v}");
        let c = &v["choices"][0];
        assert_eq!(c["finish_reason"], "tool_calls", "{v}");
        assert!(c["message"]["content"].is_null(), "{v}");
        let calls = c["message"]["tool_calls"].as_array().unwrap();
        assert_eq!(calls.len(), 1, "{v}");
        assert!(calls[0]["id"].as_str().unwrap().starts_with("call_"));
        assert_eq!(calls[0]["type"], "function");
        let f = &calls[0]["function"];
        check(
            f["name"].as_str().unwrap(),
            f["arguments"].as_str().unwrap(),
            want,
        );

        let (s, b) = call(
            &app,
            "POST",
            "/v1/chat/completions",
            Body::from(body(true, choice).to_string()),
            None,
        )
        .await;
        assert_eq!(s, StatusCode::OK);
        let chunks = sse_chunks(&b);
        let calls: Vec<&Value> = chunks
            .iter()
            .flat_map(|c| {
                c["choices"][0]["delta"]["tool_calls"]
                    .as_array()
                    .into_iter()
                    .flatten()
            })
            .collect();
        assert_eq!(calls.len(), 1, "{b}");
        assert_eq!(calls[0]["index"], 0);
        let f = &calls[0]["function"];
        check(
            f["name"].as_str().unwrap(),
            f["arguments"].as_str().unwrap(),
            want,
        );
        let last = chunks
            .iter()
            .rev()
            .find(|c| !c["choices"][0]["finish_reason"].is_null())
            .unwrap();
        assert_eq!(last["choices"][0]["finish_reason"], "tool_calls", "{b}");
        let content: String = chunks
            .iter()
            .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
            .collect();
        assert_eq!(content, "", "no call text leaks into content: {b}");
    }
    // A conversation carrying a call and its result renders (the template knows no tools).
    let (s, v) = post(
        &app,
        "/v1/chat/completions",
        json!({"max_tokens": 4, "tools": tools, "messages": [
        {"role": "user", "content": "weather in Paris?"},
        {"role": "assistant", "content": null, "tool_calls": [{"id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]}),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{v}");
}

#[tokio::test]
async fn schemas_that_cannot_be_followed_are_400s_naming_response_format() {
    let app = app(None);
    let with_schema = |schema: Value| {
        json!({"messages": [{"role": "user", "content": "x"}], "max_tokens": 4,
               "response_format": {"type": "json_schema",
                                   "json_schema": {"name": "s", "schema": schema}}})
    };
    let cycle = json!({"$defs": {"a": {"$ref": "#/$defs/b"}, "b": {"$ref": "#/$defs/a"}},
                       "$ref": "#/$defs/a"});
    let self_all_of =
        json!({"$defs": {"x": {"allOf": [{"$ref": "#/$defs/x"}]}}, "$ref": "#/$defs/x"});
    let mut deep = json!({"type": "string"});
    for _ in 0..200 {
        deep = json!({"type": "array", "items": deep});
    }
    for (what, schema) in [("cycle", cycle), ("allOf", self_all_of), ("deep", deep)] {
        let (s, v) = post(&app, "/v1/chat/completions", with_schema(schema)).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{what}: {v}");
        assert_error_shape(&v);
        assert_eq!(v["error"]["param"], "response_format", "{what}: {v}");
        let msg = v["error"]["message"].as_str().unwrap();
        assert!(
            !msg.contains("NoExtensionBias") && msg.len() < 400,
            "{what}: {msg}"
        );
        if what == "deep" {
            assert!(msg.contains("100"), "{msg}");
        }
    }
    still_serving(&app).await;
}

/// A Mistral-style template that reads tools (its `[TOOL_CALLS]` names the syntax).
const MISTRAL_TEMPLATE: &str = "{%- if tools %}[AVAILABLE_TOOLS]{{ tools | tojson }}[/AVAILABLE_TOOLS]{%- endif %}\
{%- for m in messages %}{%- if m.role == 'user' %}[INST]{{ m.content }}[/INST]\
{%- elif m.role == 'tool' %}[TOOL_RESULTS]{{ m.content }}[/TOOL_RESULTS]\
{%- elif m.tool_calls %}[TOOL_CALLS][{%- for c in m.tool_calls %}{\"name\": \"{{ c.function.name }}\", \"id\": \"{{ c.id }}\"}{%- endfor %}]\
{%- else %}{{ m.content }}{%- endif %}{%- endfor %}";

/// A Llama 3.x-style template that reads tools (its `ipython` header names the syntax).
const LLAMA3_TEMPLATE: &str = "{%- for m in messages %}{%- if m.role == 'tool' %}<|start_header_id|>ipython<|end_header_id|>\n\n{{ m.content }}<|eot_id|>\
{%- else %}<|start_header_id|>{{ m.role }}<|end_header_id|>\n\n{{ m.content }}<|eot_id|>{%- endif %}{%- endfor %}\
{%- if tools %}Tools: {{ tools | tojson }}{%- endif %}<|start_header_id|>assistant<|end_header_id|>\n\n";

#[tokio::test]
async fn forced_calls_follow_the_syntax_of_the_models_template() {
    let tools = json!([
        {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object",
         "properties": {"zone": {"enum": ["utc", "cet"]}}, "required": ["zone"], "additionalProperties": false}}},
        {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object",
         "properties": {"city": {"enum": ["Paris", "Rome"]}}, "required": ["city"], "additionalProperties": false}}}
    ]);
    for (template, mistral) in [(MISTRAL_TEMPLATE, true), (LLAMA3_TEMPLATE, false)] {
        let app = app_template(ServerConfig::default(), 2048, 256, Some(template));
        for stream in [false, true] {
            let body = json!({"messages": [{"role": "user", "content": "time?"}], "max_tokens": 200,
                "temperature": 1.0, "seed": 5, "stream": stream, "tools": tools,
                "tool_choice": "required"});
            let (s, b) = call(
                &app,
                "POST",
                "/v1/chat/completions",
                Body::from(body.to_string()),
                None,
            )
            .await;
            assert_eq!(s, StatusCode::OK, "{b}");
            let calls: Vec<Value> = if stream {
                sse_chunks(&b)
                    .iter()
                    .flat_map(|c| {
                        c["choices"][0]["delta"]["tool_calls"]
                            .as_array()
                            .cloned()
                            .unwrap_or_default()
                    })
                    .collect()
            } else {
                let v: Value = serde_json::from_str(&b).unwrap();
                assert_eq!(v["choices"][0]["finish_reason"], "tool_calls", "{v}");
                assert!(v["choices"][0]["message"]["content"].is_null(), "{v}");
                v["choices"][0]["message"]["tool_calls"]
                    .as_array()
                    .unwrap()
                    .clone()
            };
            assert!(!calls.is_empty(), "mistral {mistral} stream {stream}: {b}");
            for c in &calls {
                let id = c["id"].as_str().unwrap();
                if mistral {
                    assert!(
                        id.len() == 9 && id.chars().all(|c| c.is_ascii_alphanumeric()),
                        "{id}"
                    );
                } else {
                    assert!(id.starts_with("call_"), "{id}");
                }
                let f = &c["function"];
                let args: Value = serde_json::from_str(f["arguments"].as_str().unwrap()).unwrap();
                match f["name"].as_str().unwrap() {
                    "get_time" => assert!(["utc", "cet"].contains(&args["zone"].as_str().unwrap())),
                    "get_weather" => {
                        assert!(["Paris", "Rome"].contains(&args["city"].as_str().unwrap()))
                    }
                    other => panic!("called {other}"),
                }
            }
        }
        // The call and its result render back through the family's template.
        let (s, v) = post(
            &app,
            "/v1/chat/completions",
            json!({"max_tokens": 4, "tools": tools, "messages": [
            {"role": "user", "content": "time?"},
            {"role": "assistant", "content": null, "tool_calls": [{"id": "abcDEF123", "type": "function",
                "function": {"name": "get_time", "arguments": "{\"zone\": \"utc\"}"}}]},
            {"role": "tool", "tool_call_id": "abcDEF123", "content": "12:00"}]}),
        )
        .await;
        assert_eq!(s, StatusCode::OK, "{v}");
    }
}
