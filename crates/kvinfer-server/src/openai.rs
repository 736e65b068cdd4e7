//! OpenAI request bodies, checked and turned into engine requests.
//!
//! Bodies are parsed by hand from JSON (not by an extractor) so that every mistake — malformed
//! JSON, a missing field, a wrong type, a number out of range — becomes a 400 in OpenAI's error
//! shape naming the field.

use crate::error::ApiError;
use kvinfer_engine::{EngineHandle, EngineRequest, SamplingParams, MAX_N};
use serde::Deserialize;
use serde_json::Value;

/// The fields shared by `/v1/chat/completions` and `/v1/completions`.
#[derive(Debug, Deserialize)]
pub struct Common {
    /// Must name the served model when given.
    pub model: Option<String>,
    /// Legacy name of the output limit.
    pub max_tokens: Option<i64>,
    /// The chat API's name of the output limit.
    pub max_completion_tokens: Option<i64>,
    /// Sampling temperature, 0..=2.
    pub temperature: Option<f64>,
    /// Nucleus sampling, (0, 1].
    pub top_p: Option<f64>,
    /// Seed of the sampler.
    pub seed: Option<i64>,
    /// One stop string or several.
    pub stop: Option<Value>,
    /// Choices per request.
    pub n: Option<i64>,
    /// Stream with server-sent events.
    #[serde(default)]
    pub stream: bool,
    /// `{"include_usage": true}` adds a usage chunk at the end of a stream.
    pub stream_options: Option<StreamOptions>,
}

/// Stream options.
#[derive(Debug, Deserialize, Default)]
pub struct StreamOptions {
    /// Send a last chunk with token usage.
    #[serde(default)]
    pub include_usage: bool,
}

/// A chat message; `content` is a string or a list of text parts.
#[derive(Debug, Deserialize)]
pub struct Message {
    /// system, user, assistant (others are passed to the template as they are).
    pub role: String,
    /// The text.
    pub content: Value,
}

/// `POST /v1/chat/completions`.
#[derive(Debug, Deserialize)]
pub struct ChatRequest {
    /// The conversation.
    pub messages: Vec<Message>,
    #[serde(flatten)]
    /// The shared fields.
    pub common: Common,
}

/// `POST /v1/completions`.
#[derive(Debug, Deserialize)]
pub struct CompletionRequest {
    /// A string, a list of one string, or a list of token ids.
    pub prompt: Value,
    #[serde(flatten)]
    /// The shared fields.
    pub common: Common,
}

/// Parses a JSON body into `T`, with OpenAI-shaped errors.
pub fn parse<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    let value: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::invalid(format!("the body is not valid JSON: {e}"), None))?;
    if !value.is_object() {
        return Err(ApiError::invalid("the body must be a JSON object", None));
    }
    serde_json::from_value(value)
        .map_err(|e| ApiError::invalid(format!("bad request body: {e}"), None))
}

/// Text of a message's content.
pub fn content_text(m: &Message, i: usize) -> Result<String, ApiError> {
    let param = format!("messages[{i}].content");
    match &m.content {
        Value::String(s) => Ok(s.clone()),
        Value::Array(parts) => {
            let mut out = String::new();
            for p in parts {
                match (p.get("type").and_then(Value::as_str), p.get("text").and_then(Value::as_str)) {
                    (Some("text"), Some(t)) => out.push_str(t),
                    _ => {
                        return Err(ApiError::invalid(
                            "only text content parts ({\"type\": \"text\", \"text\": ...}) are supported",
                            Some(&param),
                        ))
                    }
                }
            }
            Ok(out)
        }
        Value::Null => Ok(String::new()),
        _ => Err(ApiError::invalid(
            "content must be a string or a list of text parts",
            Some(&param),
        )),
    }
}

fn stops(v: &Option<Value>) -> Result<Vec<String>, ApiError> {
    let bad = || {
        ApiError::invalid(
            "stop must be a string or a list of at most 4 strings",
            Some("stop"),
        )
    };
    match v {
        None | Some(Value::Null) => Ok(vec![]),
        Some(Value::String(s)) => Ok(vec![s.clone()]),
        Some(Value::Array(a)) if a.len() <= 4 => a
            .iter()
            .map(|s| s.as_str().map(str::to_string).ok_or_else(bad))
            .collect(),
        _ => Err(bad()),
    }
}

/// Checks the shared fields against the served model and builds the engine request for
/// `prompt_ids`. `default_max` applies when neither limit is given (clamped to the context).
pub fn engine_request(
    c: &Common,
    prompt_ids: Vec<u32>,
    handle: &EngineHandle,
    served: &str,
    default_max: usize,
) -> Result<EngineRequest, ApiError> {
    if let Some(m) = &c.model {
        if m != served && m != "kvinfer" {
            return Err(ApiError::invalid(
                format!("model {m:?} is not served here; this server serves {served:?} (see /v1/models)"),
                Some("model"),
            )
            .code("model_not_found")
            .status(axum::http::StatusCode::NOT_FOUND));
        }
    }
    let ctx = handle.context_size();
    if prompt_ids.is_empty() {
        return Err(ApiError::invalid("the prompt is empty", Some("prompt")));
    }
    if prompt_ids.len() >= ctx {
        return Err(ApiError::invalid(
            format!(
                "the prompt is {} tokens; this model's context holds {ctx} (prompt and output \
                 together)",
                prompt_ids.len()
            ),
            Some("messages"),
        )
        .code("context_length_exceeded"));
    }
    let room = ctx - prompt_ids.len();
    let (limit, name) = match (c.max_completion_tokens, c.max_tokens) {
        (Some(v), _) => (Some(v), "max_completion_tokens"),
        (None, Some(v)) => (Some(v), "max_tokens"),
        (None, None) => (None, "max_tokens"),
    };
    let max_tokens = match limit {
        None => default_max.min(room),
        Some(v) if v < 1 => {
            return Err(ApiError::invalid(
                format!("{name} must be at least 1, got {v}"),
                Some(name),
            ))
        }
        Some(v) if v as u64 > room as u64 => {
            return Err(ApiError::invalid(
                format!(
                    "{name} is {v}, but the prompt ({} tokens) leaves room for at most {room} in \
                     this model's context of {ctx}",
                    prompt_ids.len()
                ),
                Some(name),
            )
            .code("context_length_exceeded"))
        }
        Some(v) => v as usize,
    };
    let temperature = c.temperature.unwrap_or(1.0);
    if !(0.0..=2.0).contains(&temperature) {
        return Err(ApiError::invalid(
            format!("temperature must be between 0 and 2, got {temperature}"),
            Some("temperature"),
        ));
    }
    let top_p = c.top_p.unwrap_or(1.0);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(ApiError::invalid(
            format!("top_p must be in (0, 1], got {top_p}"),
            Some("top_p"),
        ));
    }
    let n = c.n.unwrap_or(1);
    if n < 1 || n > MAX_N as i64 {
        return Err(ApiError::invalid(
            format!("n must be between 1 and {MAX_N}, got {n}"),
            Some("n"),
        ));
    }
    let sampling = SamplingParams {
        temperature: temperature as f32,
        top_k: 0,
        top_p: top_p as f32,
        min_p: 0.0,
        repeat_penalty: 1.0,
        repeat_last_n: 64,
        seed: c.seed.unwrap_or(0) as u64,
    };
    Ok(EngineRequest {
        prompt_ids,
        max_tokens,
        sampling,
        stop: stops(&c.stop)?,
        n: n as usize,
        ignore_eos: false,
    })
}
