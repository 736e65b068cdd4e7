//! OpenAI request bodies, checked and turned into engine requests.
//!
//! Bodies are read into typed structs (serde enums for the fields of several shapes: `stop`,
//! `content`, `prompt`, `logprobs`, `response_format`, `tool_choice`) after the field check, so
//! that every mistake — malformed JSON, an unknown field, a wrong type, a number out of range —
//! becomes a 400 in OpenAI's error shape naming the field.

/// Kept here for the modules that quote through `openai` (tools.rs).
pub use crate::error::short;
use crate::error::{bounded, quote, ApiError};
use kvinfer_engine::{EngineHandle, EngineRequest, GrammarSpec, SamplingParams, MAX_N};
use serde::{Deserialize, Serialize};
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
    pub stop: Option<Stop>,
    /// Choices per request.
    pub n: Option<i64>,
    /// Stream with server-sent events.
    #[serde(default)]
    pub stream: bool,
    /// `{"include_usage": true}` adds a usage chunk at the end of a stream.
    pub stream_options: Option<StreamOptions>,
    /// Keep the k most likely tokens (0 or absent: all).
    pub top_k: Option<i64>,
    /// Drop tokens below min_p times the best one's probability, [0, 1].
    pub min_p: Option<f64>,
    /// llama.cpp's repetition penalty over the last 64 tokens, > 0 (1: off).
    pub repetition_penalty: Option<f64>,
    /// OpenAI's presence penalty, -2..=2.
    pub presence_penalty: Option<f64>,
    /// OpenAI's frequency penalty, -2..=2.
    pub frequency_penalty: Option<f64>,
    /// Token id (as a string) -> bias, -100..=100.
    pub logit_bias: Option<std::collections::HashMap<String, f64>>,
    /// Keep generating past end-of-generation tokens.
    #[serde(default)]
    pub ignore_eos: bool,
    /// No end-of-generation token before this many tokens.
    pub min_tokens: Option<i64>,
    /// The caller's end-user id (logged, never used for output).
    pub user: Option<String>,
    /// Chat: `true` asks for token log-probabilities; completions: how many alternatives (int).
    pub logprobs: Option<Logprobs>,
    /// Chat: alternatives per token (0..=20) with `logprobs: true`.
    pub top_logprobs: Option<i64>,
    /// `text`, `json_object` or `json_schema`: constrains the output.
    pub response_format: Option<ResponseFormat>,
}

/// `stop`: one string or a list.
#[derive(Debug, Deserialize)]
#[serde(untagged, expecting = "a string or a list of at most 4 strings")]
pub enum Stop {
    /// One stop string.
    One(String),
    /// Several.
    Many(Vec<String>),
}

/// `logprobs`: a flag (chat) or a count of alternatives (completions).
#[derive(Debug, Deserialize)]
#[serde(untagged, expecting = "true/false (chat) or a count (completions)")]
pub enum Logprobs {
    /// Chat's switch.
    Flag(bool),
    /// Completions' number of alternatives.
    Count(i64),
}

/// `response_format`.
#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum ResponseFormat {
    /// Free text (the default).
    Text,
    /// Any JSON object.
    JsonObject,
    /// JSON under a schema.
    JsonSchema {
        /// The schema and its name.
        json_schema: JsonSchemaFormat,
    },
}

/// `response_format.json_schema`. `name`, `description` and `strict` are OpenAI's metadata:
/// the output follows `schema` exactly whatever they say, and the description is not shown to
/// the model (as in vLLM and llama-server).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
pub struct JsonSchemaFormat {
    /// The schema's name.
    pub name: Option<String>,
    /// What it is for.
    pub description: Option<String>,
    /// The JSON schema (absent: any JSON object).
    pub schema: Option<Value>,
    /// OpenAI's strict mode; output always follows the schema exactly here.
    pub strict: Option<bool>,
}

impl Common {
    /// The grammar `response_format` asks for (None: free text).
    pub fn grammar(&self) -> Option<GrammarSpec> {
        match &self.response_format {
            None | Some(ResponseFormat::Text) => None,
            Some(ResponseFormat::JsonObject) => Some(GrammarSpec::JsonObject),
            Some(ResponseFormat::JsonSchema { json_schema }) => Some(match &json_schema.schema {
                Some(s) => GrammarSpec::JsonSchema(s.clone()),
                None => GrammarSpec::JsonObject,
            }),
        }
    }
}

/// Fields both endpoints take and honour.
const COMMON_FIELDS: &[&str] = &[
    "model",
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "top_p",
    "seed",
    "stop",
    "n",
    "stream",
    "stream_options",
    "top_k",
    "min_p",
    "repetition_penalty",
    "presence_penalty",
    "frequency_penalty",
    "logit_bias",
    "ignore_eos",
    "min_tokens",
    "user",
    "logprobs",
    "top_logprobs",
    "response_format",
];

/// OpenAI fields this server does not do yet: accepted only at their "off" value, otherwise a
/// 400 naming them (never a 200 that quietly ignores them).
fn off_value_only(field: &str, v: &Value) -> Option<bool> {
    let off = match field {
        "echo" | "store" => v.is_null() || v == &Value::Bool(false),
        "best_of" => v.is_null() || v.as_i64() == Some(1),
        "suffix" | "metadata" => v.is_null(),
        "tools" | "functions" => v.is_null() || v.as_array().is_some_and(|a| a.is_empty()),
        "tool_choice" | "function_call" => {
            v.is_null() || v.as_str() == Some("none") || v.as_str() == Some("auto")
        }
        "parallel_tool_calls" => true,
        "service_tier" => {
            v.is_null() || v.as_str() == Some("auto") || v.as_str() == Some("default")
        }
        _ => return None,
    };
    Some(off)
}

/// Refuses any field that is neither honoured (`COMMON_FIELDS` plus `own`) nor at the off value
/// of a field not done yet.
pub fn check_fields(body: &Value, own: &[&str]) -> Result<(), ApiError> {
    let Some(obj) = body.as_object() else {
        return Ok(());
    };
    for (k, v) in obj {
        if COMMON_FIELDS.contains(&k.as_str()) || own.contains(&k.as_str()) {
            continue;
        }
        let key = short(k);
        match off_value_only(k, v) {
            Some(true) => {}
            Some(false) => {
                return Err(ApiError::invalid(
                    format!("{key} is not supported by this server yet; leave it out"),
                    Some(&key),
                )
                .code("unsupported_parameter"))
            }
            None => {
                return Err(
                    ApiError::invalid(format!("unknown field {}", quote(k)), Some(&key))
                        .code("unknown_parameter"),
                )
            }
        }
    }
    Ok(())
}

/// Stream options.
#[derive(Debug, Deserialize, Default)]
pub struct StreamOptions {
    /// Send a last chunk with token usage.
    #[serde(default)]
    pub include_usage: bool,
}

/// A chat message.
#[derive(Debug, Clone, Deserialize)]
pub struct Message {
    /// system, user, assistant, tool (others are passed to the template as they are).
    pub role: String,
    /// The text (null for an assistant turn that only calls tools).
    pub content: Option<Content>,
    /// The assistant's tool calls.
    pub tool_calls: Option<Vec<ToolCallIn>>,
    /// A tool result: the call it answers.
    pub tool_call_id: Option<String>,
    /// A participant's or tool's name.
    pub name: Option<String>,
}

/// A message's `content`: a string or a list of parts.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged, expecting = "a string or a list of text parts")]
pub enum Content {
    /// Plain text.
    Text(String),
    /// Parts (only text parts are supported).
    Parts(Vec<ContentPart>),
}

/// One part of a message's content.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ContentPart {
    /// `{"type": "text", "text": ...}`.
    Text {
        /// The text.
        text: String,
    },
    /// Images, audio, files: not supported by these models.
    #[serde(other)]
    Other,
}

/// A tool call in an assistant message of the conversation.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct ToolCallIn {
    /// The call's id.
    pub id: Option<String>,
    /// "function".
    #[serde(rename = "type")]
    pub kind: Option<String>,
    /// What was called.
    pub function: FunctionCall,
}

/// A function called, as OpenAI writes it (`arguments` is JSON text).
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct FunctionCall {
    /// The tool.
    pub name: String,
    /// JSON text.
    pub arguments: String,
}

/// A tool offered (`tools[i]`).
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct Tool {
    /// "function".
    #[serde(rename = "type")]
    pub kind: String,
    /// The function.
    pub function: FunctionDef,
}

/// A function a tool exposes.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct FunctionDef {
    /// Its name.
    pub name: String,
    /// What it does.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// A JSON schema of its arguments.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub parameters: Option<Value>,
    /// OpenAI's strict flag (calls always follow the schema when forced here).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub strict: Option<bool>,
}

/// `tool_choice`.
#[derive(Debug, Clone, Deserialize)]
#[serde(
    untagged,
    expecting = "\"none\", \"auto\", \"required\" or {\"type\": \"function\", \"function\": {\"name\": ...}}"
)]
pub enum ToolChoice {
    /// none / auto / required.
    Mode(String),
    /// One function by name.
    Named {
        /// "function".
        #[serde(rename = "type")]
        kind: String,
        /// Which.
        function: NamedFunction,
    },
}

/// `tool_choice.function`.
#[derive(Debug, Clone, Deserialize)]
pub struct NamedFunction {
    /// The tool's name.
    pub name: String,
}

/// `POST /v1/chat/completions`.
#[derive(Debug, Deserialize)]
pub struct ChatRequest {
    /// The conversation.
    pub messages: Vec<Message>,
    /// Tools the model may call.
    pub tools: Option<Vec<Tool>>,
    /// Whether and which tool it must call.
    pub tool_choice: Option<ToolChoice>,
    /// Several calls in one answer (default true).
    pub parallel_tool_calls: Option<bool>,
}

/// `prompt`: text or token ids.
#[derive(Debug, Deserialize)]
#[serde(
    untagged,
    expecting = "a string, a list of one string, or a list of token ids"
)]
pub enum Prompt {
    /// Text.
    Text(String),
    /// Token ids.
    Tokens(Vec<u32>),
    /// A batch of texts (only one is supported).
    Texts(Vec<String>),
}

/// `POST /v1/completions`.
#[derive(Debug, Deserialize)]
pub struct CompletionRequest {
    /// The prompt.
    pub prompt: Prompt,
}

/// Parses a JSON body into the endpoint's own fields `T` and the shared ones, with
/// OpenAI-shaped errors naming the field; refuses fields it would not honour (`own`: the
/// endpoint's fields beyond the common ones).
pub fn parse<T: serde::de::DeserializeOwned>(
    body: &[u8],
    own: &[&str],
) -> Result<(T, Common), ApiError> {
    if let Some(field) = too_deep(body) {
        let param = field.as_deref().map(short);
        return Err(ApiError::invalid(
            format!(
                "{} nests arrays and objects more than {MAX_NESTING} levels deep; the limit \
                 is {MAX_NESTING}",
                param.as_deref().unwrap_or("the body")
            ),
            param.as_deref(),
        ));
    }
    let value: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::invalid(format!("the body is not valid JSON: {e}"), None))?;
    if !value.is_object() {
        return Err(ApiError::invalid("the body must be a JSON object", None));
    }
    check_fields(&value, own)?;
    Ok((typed(&value)?, typed(&value)?))
}

/// The deepest a request body may nest arrays and objects (serde_json stops at 128; a JSON
/// schema in `response_format` or `tools` is the usual deep value).
pub const MAX_NESTING: usize = 100;

/// When `body` nests deeper than [`MAX_NESTING`]: the top-level field it does so in. Strings are skipped; the body
/// need not be valid JSON (parsing says what else is wrong with it).
fn too_deep(body: &[u8]) -> Option<Option<String>> {
    let (mut depth, mut in_str, mut esc) = (0usize, false, false);
    let (mut key_start, mut last_key) = (None, None::<String>);
    for (i, &b) in body.iter().enumerate() {
        if in_str {
            match (esc, b) {
                (true, _) => esc = false,
                (false, b'\\') => esc = true,
                (false, b'"') => {
                    in_str = false;
                    if let Some(start) = key_start.take() {
                        last_key = Some(String::from_utf8_lossy(&body[start..i]).into_owned());
                    }
                }
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => {
                in_str = true;
                // A string at depth 1 right after `{` or `,` is a top-level key.
                let prev = body[..i].iter().rev().find(|c| !c.is_ascii_whitespace());
                if depth == 1 && matches!(prev, Some(b'{') | Some(b',')) {
                    key_start = Some(i + 1);
                }
            }
            b'{' | b'[' => {
                depth += 1;
                if depth > MAX_NESTING {
                    return Some(if depth > 1 { last_key } else { None });
                }
            }
            b'}' | b']' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    None
}

/// `T` from `value`; an error names the field's path.
fn typed<T: serde::de::DeserializeOwned>(value: &Value) -> Result<T, ApiError> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let msg = bounded(&e.inner().to_string(), 300);
        if path == "." {
            ApiError::invalid(format!("bad request body: {msg}"), None)
        } else {
            let path = short(&path);
            ApiError::invalid(format!("{path}: {msg}"), Some(&path))
        }
    })
}

/// Text of a message's content.
pub fn content_text(m: &Message, i: usize) -> Result<String, ApiError> {
    match &m.content {
        None => Ok(String::new()),
        Some(Content::Text(s)) => Ok(s.clone()),
        Some(Content::Parts(parts)) => parts
            .iter()
            .map(|p| match p {
                ContentPart::Text { text } => Ok(text.as_str()),
                ContentPart::Other => Err(ApiError::invalid(
                    "only text content parts ({\"type\": \"text\", \"text\": ...}) are supported",
                    Some(&format!("messages[{i}].content")),
                )),
            })
            .collect(),
    }
}

fn stops(v: &Option<Stop>) -> Result<Vec<String>, ApiError> {
    match v {
        None => Ok(vec![]),
        Some(Stop::One(s)) => Ok(vec![s.clone()]),
        Some(Stop::Many(a)) if a.len() <= 4 => Ok(a.clone()),
        Some(Stop::Many(_)) => Err(ApiError::invalid(
            "stop must be a string or a list of at most 4 strings",
            Some("stop"),
        )),
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
            return Err(ApiError::not_found(
                format!(
                    "model {} is not served here; this server serves {served:?} (see /v1/models)",
                    quote(m)
                ),
                Some("model"),
            )
            .code("model_not_found"));
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
    let in_range = |name: &str, v: Option<f64>, lo: f64, hi: f64, default: f64| match v {
        None => Ok(default),
        Some(x) if (lo..=hi).contains(&x) => Ok(x),
        Some(x) => Err(ApiError::invalid(
            format!("{name} must be between {lo} and {hi}, got {x}"),
            Some(name),
        )),
    };
    let top_k = match c.top_k {
        None => 0,
        Some(k) if k >= 0 => k as usize,
        Some(k) => {
            return Err(ApiError::invalid(
                format!("top_k must be >= 0, got {k}"),
                Some("top_k"),
            ))
        }
    };
    let min_p = in_range("min_p", c.min_p, 0.0, 1.0, 0.0)?;
    let repetition_penalty = in_range("repetition_penalty", c.repetition_penalty, 1e-3, 10.0, 1.0)?;
    let presence_penalty = in_range("presence_penalty", c.presence_penalty, -2.0, 2.0, 0.0)?;
    let frequency_penalty = in_range("frequency_penalty", c.frequency_penalty, -2.0, 2.0, 0.0)?;
    let vocab = handle.model().config.vocab_size;
    let mut logit_bias = Vec::new();
    for (k, &b) in c.logit_bias.iter().flatten() {
        let id = k
            .parse::<u32>()
            .ok()
            .filter(|&t| (t as usize) < vocab)
            .ok_or_else(|| {
                ApiError::invalid(
                    format!(
                        "logit_bias keys are token ids below {vocab}, got {}",
                        quote(k)
                    ),
                    Some("logit_bias"),
                )
            })?;
        if !(-100.0..=100.0).contains(&b) {
            return Err(ApiError::invalid(
                format!("logit_bias values are between -100 and 100, got {b}"),
                Some("logit_bias"),
            ));
        }
        logit_bias.push((id, b as f32));
    }
    logit_bias.sort_by_key(|b| b.0);
    let min_tokens = match c.min_tokens {
        None => 0,
        Some(m) if m >= 0 && (m as u64) <= max_tokens as u64 => m as usize,
        Some(m) => {
            return Err(ApiError::invalid(
                format!("min_tokens must be between 0 and max_tokens ({max_tokens}), got {m}"),
                Some("min_tokens"),
            ))
        }
    };
    let max_top = kvinfer_engine::MAX_TOP_LOGPROBS as i64;
    let top_range = |k: i64, name: &str| {
        if (0..=max_top).contains(&k) {
            Ok(k as usize)
        } else {
            Err(ApiError::invalid(
                format!("{name} must be between 0 and {max_top}, got {k}"),
                Some(name),
            ))
        }
    };
    let logprobs = match (&c.logprobs, c.top_logprobs) {
        (None | Some(Logprobs::Flag(false)), None) => None,
        (None | Some(Logprobs::Flag(false)), Some(_)) => {
            return Err(ApiError::invalid(
                "top_logprobs needs logprobs: true",
                Some("top_logprobs"),
            ))
        }
        (Some(Logprobs::Flag(true)), k) => Some(top_range(k.unwrap_or(0), "top_logprobs")?),
        // The completions API: logprobs is the number of alternatives.
        (Some(Logprobs::Count(k)), None) => Some(top_range(*k, "logprobs")?),
        (Some(Logprobs::Count(_)), Some(_)) => {
            return Err(ApiError::invalid(
                "logprobs must be true/false (chat) or a count (completions)",
                Some("logprobs"),
            ))
        }
    };
    // No seed given: a random one, reported back in the response so the run can be repeated.
    let seed = match c.seed {
        Some(s) => s as u64,
        None => rand::random::<u32>() as u64,
    };
    let sampling = SamplingParams {
        temperature: temperature as f32,
        top_k,
        top_p: top_p as f32,
        min_p: min_p as f32,
        repeat_penalty: repetition_penalty as f32,
        repeat_last_n: 64,
        presence_penalty: presence_penalty as f32,
        frequency_penalty: frequency_penalty as f32,
        logit_bias,
        seed,
    };
    Ok(EngineRequest {
        prompt_ids,
        max_tokens,
        sampling,
        stop: stops(&c.stop)?,
        n: n as usize,
        ignore_eos: c.ignore_eos,
        min_tokens,
        logprobs,
        grammar: None,
    })
}
