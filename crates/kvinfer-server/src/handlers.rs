//! The endpoints. Each turns a body into an engine request, submits it, and answers with one
//! JSON object or a stream of server-sent events. A client that goes away drops the event
//! receiver, which cancels the request in the engine and frees its blocks.

use crate::edge::RequestId;
use crate::error::{bounded, quote, short, ApiError};
use crate::openai::{
    content_text, engine_request, parse, ChatRequest, Common, CompletionRequest, Prompt,
};
use crate::responses::{
    chat_logprobs, completion_logprobs, AssistantMessage, ChatChoice, ChunkChoice, Delta, Envelope,
    Logprobs, TextChoice, ToolCallDelta, UsageOut,
};
use crate::tools::{CallParser, Piece, ToolPlan};
use crate::AppState;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Extension, State};
use axum::http::{header, StatusCode};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{Html, IntoResponse, Response};
use axum::Json;
use futures_util::stream::{self, Stream};
use kvinfer_engine::{
    EngineRequest, Event, FinishReason, GrammarSpec, SubmitError, TokenLogprob, Usage,
};
use serde_json::{json, Value};
use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::Arc;
use tokio::sync::mpsc::UnboundedReceiver;

/// Which API shape to answer in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Api {
    Chat,
    Completion,
}

fn body_bytes(body: Result<Bytes, BytesRejection>) -> Result<Bytes, ApiError> {
    body.map_err(|e| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::too_large(
                "the request body is larger than this server accepts (--max-body-bytes)",
            )
            .code("body_too_large")
        } else {
            ApiError::invalid(format!("could not read the request body: {e}"), None)
        }
    })
}

/// `POST /v1/chat/completions`.
pub async fn chat(
    State(st): State<Arc<AppState>>,
    rid: Option<Extension<RequestId>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let (req, common): (ChatRequest, Common) = parse(
        &body_bytes(body)?,
        &["messages", "tools", "tool_choice", "parallel_tool_calls"],
    )?;
    if req.messages.is_empty() {
        return Err(ApiError::invalid(
            "messages must not be empty",
            Some("messages"),
        ));
    }
    let Some(template) = st.engine.model().chat_template.as_ref() else {
        return Err(ApiError::invalid(
            "this model has no chat template; use /v1/completions with a raw prompt",
            Some("messages"),
        ));
    };
    let plan = ToolPlan::new(
        req.tools.clone(),
        req.tool_choice.clone(),
        req.parallel_tool_calls,
    )?
    .with_syntax(template.tool_syntax());
    let grammar = match (common.grammar(), plan.grammar()) {
        (Some(_), Some(_)) => {
            return Err(ApiError::invalid(
                "response_format cannot be combined with a tool_choice that forces a call",
                Some("response_format"),
            ))
        }
        (Some(g), None) => Some((g, "response_format")),
        (None, Some(g)) => Some((g, "tools")),
        (None, None) => None,
    };
    let texts = req
        .messages
        .iter()
        .enumerate()
        .map(|(i, m)| content_text(m, i))
        .collect::<Result<Vec<_>, ApiError>>()?;
    too_long_for_context(&st, texts.iter().map(String::len).sum(), "messages")?;
    let (messages, tools) =
        crate::tools::template_messages(&req.messages, texts, &plan, template.knows_tools());
    // Templating and tokenizing a large prompt take a while: off the async threads, so other
    // clients' streams keep flowing.
    let engine = st.engine.clone();
    let ids = blocking(move || {
        let model = engine.model();
        let template = model.chat_template.as_ref().expect("checked above");
        let text = template
            .render_with(&messages, tools.as_ref(), true)
            .map_err(|e| {
                ApiError::invalid(
                    format!(
                        "the chat template refused the messages: {}",
                        bounded(&e.to_string(), 300)
                    ),
                    Some("messages"),
                )
            })?;
        Ok(model.tokenizer.encode(&text, false, true))
    })
    .await?;
    let er = engine_request(&common, ids, &st.engine, &st.served, usize::MAX)?;
    let plan = plan.active().then_some(plan);
    run(st, Api::Chat, er, &common, rid, grammar, plan).await
}

/// `POST /v1/completions`.
pub async fn completion(
    State(st): State<Arc<AppState>>,
    rid: Option<Extension<RequestId>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let (req, common): (CompletionRequest, Common) = parse(&body_bytes(body)?, &["prompt"])?;
    let text = match &req.prompt {
        Prompt::Text(t) => Some(t.clone()),
        Prompt::Texts(a) if a.len() == 1 => Some(a[0].clone()),
        Prompt::Texts(_) => {
            return Err(ApiError::invalid(
                "prompt must be a string, a list of one string, or a list of token ids",
                Some("prompt"),
            ))
        }
        Prompt::Tokens(_) => None,
    };
    let ids = match (text, req.prompt) {
        (Some(t), _) => {
            too_long_for_context(&st, t.len(), "prompt")?;
            let engine = st.engine.clone();
            blocking(move || Ok(engine.model().tokenizer.encode(&t, true, false))).await?
        }
        (None, Prompt::Tokens(ids)) => ids,
        (None, _) => unreachable!("text prompts were taken above"),
    };
    // The legacy API's default output limit.
    let er = engine_request(&common, ids, &st.engine, &st.served, 16)?;
    let grammar = common.grammar().map(|g| (g, "response_format"));
    run(st, Api::Completion, er, &common, rid, grammar, None).await
}

/// Refuses a prompt of `bytes` bytes that cannot fit the context whatever its tokenization
/// (each token is at most the vocabulary's longest), before spending time tokenizing it.
fn too_long_for_context(st: &AppState, bytes: usize, param: &str) -> Result<(), ApiError> {
    let ctx = st.engine.context_size();
    let at_least = bytes / st.longest_token_bytes;
    if at_least >= ctx {
        return Err(ApiError::invalid(
            format!(
                "the prompt is {bytes} bytes, at least {at_least} tokens; this model's context \
                 holds {ctx} (prompt and output together)"
            ),
            Some(param),
        )
        .code("context_length_exceeded"));
    }
    Ok(())
}

/// Runs CPU-heavy request preparation on tokio's blocking pool.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError::internal(format!("request preparation failed: {e}")))?
}

#[allow(clippy::too_many_arguments)]
async fn run(
    st: Arc<AppState>,
    api: Api,
    mut er: EngineRequest,
    common: &Common,
    rid: Option<Extension<RequestId>>,
    grammar: Option<(GrammarSpec, &'static str)>,
    tools: Option<ToolPlan>,
) -> Result<Response, ApiError> {
    let started = std::time::Instant::now();
    if let Some((spec, param)) = grammar {
        // Compiling a schema takes up to tens of milliseconds: off the async threads.
        let engine = st.engine.clone();
        er.grammar = Some(
            blocking(move || {
                let compiler = engine.grammar_compiler().map_err(|e| {
                    ApiError::internal(format!("constrained decoding is unavailable: {e}"))
                })?;
                compiler.compile(&spec).map_err(|e| {
                    ApiError::invalid(
                        format!("the {param} grammar does not compile: {}", short_msg(&e)),
                        Some(param),
                    )
                })
            })
            .await?,
        );
    }
    let include_usage = common
        .stream_options
        .as_ref()
        .is_some_and(|o| o.include_usage);
    let n = er.n;
    let seed = er.sampling.seed;
    let logprobs = er.logprobs.is_some();
    if let Some(u) = &common.user {
        tracing::info!(user = %short(u), "request");
    }
    let rx = st.engine.submit(er).map_err(|e| match e {
        SubmitError::Invalid(m) => ApiError::invalid(m, None),
        SubmitError::TooLong(m) => {
            ApiError::invalid(m, Some("messages")).code("context_length_exceeded")
        }
        SubmitError::ShuttingDown => {
            ApiError::unavailable("the server is shutting down").code("shutdown")
        }
        SubmitError::Overloaded(m) => ApiError::unavailable(m).code("overloaded").retry_after(1),
    })?;
    st.next_id
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let meta = Meta {
        id: format!(
            "{}-{:024x}",
            if api == Api::Chat { "chatcmpl" } else { "cmpl" },
            rand::random::<u128>() >> 32
        ),
        created: now_s(),
        model: st.served.clone(),
        api,
        seed,
        fingerprint: st.fingerprint.clone(),
        request_id: rid.map(|r| r.0 .0).unwrap_or_default(),
        started,
        first_token: None,
        lp: logprobs.then(|| vec![Vec::new(); n]),
        parsers: match &tools {
            Some(plan) => (0..n).map(|_| (CallParser::new(plan), 0)).collect(),
            None => Vec::new(),
        },
        tools,
    };
    let deadline = st.request_timeout.map(|d| tokio::time::Instant::now() + d);
    let cut = st.cut.clone();
    if common.stream {
        Ok(sse(meta, rx, n, include_usage, deadline, cut).into_response())
    } else {
        let work = async {
            match deadline {
                None => collect(meta, rx, n).await,
                // Past the deadline the receiver is dropped: the engine cancels the request.
                Some(d) => tokio::time::timeout_at(d, collect(meta, rx, n))
                    .await
                    .unwrap_or_else(|_| Err(timeout_error())),
            }
        };
        tokio::select! {
            r = work => r,
            _ = cut_now(cut) => Err(shutdown_error()),
        }
    }
}

/// Resolves when the shutdown grace is over (never, for a router without a server).
async fn cut_now(mut cut: tokio::sync::watch::Receiver<bool>) {
    if cut.wait_for(|&c| c).await.is_err() {
        std::future::pending::<()>().await;
    }
}

fn shutdown_error() -> ApiError {
    ApiError::unavailable("the server is shutting down; this request was cut").code("shutdown")
}

fn timeout_error() -> ApiError {
    ApiError::timeout("the request ran past the server's --request-timeout").code("timeout")
}

fn now_s() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

struct Meta {
    id: String,
    created: u64,
    model: String,
    api: Api,
    /// The sampler's seed (given or drawn), so a run can be reproduced.
    seed: u64,
    /// `system_fingerprint`: kvinfer's version and the model's KV fingerprint.
    fingerprint: String,
    /// `X-Request-Id`, for the log line.
    request_id: String,
    started: std::time::Instant,
    first_token: Option<std::time::Instant>,
    /// Per choice, token log-probabilities not yet sent (None: not asked for).
    lp: Option<Vec<Vec<Logprob>>>,
    /// The tools offered: output is parsed for calls.
    tools: Option<ToolPlan>,
    /// Streaming with tools: per choice, the call parser and the calls sent so far.
    parsers: Vec<(CallParser, usize)>,
}

/// One token's log-probability and its alternatives, as the engine reported them.
type Logprob = (TokenLogprob, Vec<TokenLogprob>);

impl Meta {
    fn push_lp(&mut self, index: usize, entry: Logprob) {
        if let Some(lp) = self.lp.as_mut().and_then(|l| l.get_mut(index)) {
            lp.push(entry);
        }
    }

    /// The buffered entries of choice `index` in this API's shape (None when not asked for);
    /// `offset`: the text offset of the first (completions' `text_offset`).
    fn take_lp(&mut self, index: usize, offset: usize) -> Option<Logprobs> {
        let api = self.api;
        let entries = std::mem::take(self.lp.as_mut()?.get_mut(index)?);
        Some(match api {
            Api::Chat => chat_logprobs(&entries),
            Api::Completion => completion_logprobs(&entries, offset),
        })
    }

    /// The envelope of an answer or chunk of this request.
    fn envelope<C>(
        &self,
        object: &'static str,
        choices: Vec<C>,
        usage: Option<UsageOut>,
    ) -> Envelope<'_, C> {
        Envelope {
            id: &self.id,
            object,
            created: self.created,
            model: &self.model,
            system_fingerprint: &self.fingerprint,
            seed: self.seed,
            choices,
            usage,
        }
    }
}

impl Meta {
    /// One log line per request: ids, tokens, time to first token, prefix-cache hit.
    fn log(&self, usage: Option<&Usage>) {
        let ms = |t: Option<std::time::Instant>| t.map(|t| (t - self.started).as_secs_f64() * 1e3);
        let u = usage.copied().unwrap_or_default();
        tracing::info!(
            request_id = %self.request_id,
            id = %self.id,
            prompt_tokens = u.prompt_tokens,
            completion_tokens = u.completion_tokens,
            cached_tokens = u.cached_tokens,
            ttft_ms = ms(self.first_token).unwrap_or(-1.0),
            total_ms = ms(Some(std::time::Instant::now())).unwrap_or(0.0),
            complete = usage.is_some(),
            "request"
        );
    }
}

fn reason(r: FinishReason) -> &'static str {
    match r {
        FinishReason::Stop => "stop",
        FinishReason::Length | FinishReason::ContextFull => "length",
        FinishReason::Cancelled => "stop",
    }
}

async fn collect(
    mut meta: Meta,
    mut rx: UnboundedReceiver<Event>,
    n: usize,
) -> Result<Response, ApiError> {
    let mut texts = vec![String::new(); n];
    let mut reasons = vec!["stop"; n];
    let mut usage = None;
    while let Some(e) = rx.recv().await {
        match e {
            Event::Text { index, text } => {
                meta.first_token.get_or_insert_with(std::time::Instant::now);
                texts[index].push_str(&text)
            }
            Event::Logprob { index, token, top } => meta.push_lp(index, (token, top)),
            Event::Done {
                index,
                finish_reason,
            } => reasons[index] = reason(finish_reason),
            Event::Usage(u) => usage = Some(u),
            Event::Error(m) => return Err(ApiError::internal(m)),
        }
    }
    meta.log(usage.as_ref());
    let usage = usage.unwrap_or_default();
    let usage = Some(UsageOut::from(&usage));
    let body = match meta.api {
        Api::Chat => {
            let choices: Vec<ChatChoice> = texts
                .into_iter()
                .zip(reasons)
                .enumerate()
                .map(|(i, (text, r))| {
                    let (content, tool_calls) = match &meta.tools {
                        Some(plan) => split_calls(plan, &text),
                        None => (text, Vec::new()),
                    };
                    let calls = !tool_calls.is_empty();
                    ChatChoice {
                        index: i,
                        message: AssistantMessage {
                            role: "assistant",
                            content: (!calls || !content.is_empty()).then_some(content),
                            tool_calls,
                        },
                        logprobs: meta.take_lp(i, 0),
                        finish_reason: if calls && r == "stop" {
                            "tool_calls"
                        } else {
                            r
                        },
                    }
                })
                .collect();
            serde_json::to_value(meta.envelope("chat.completion", choices, usage))
        }
        Api::Completion => {
            let choices: Vec<TextChoice> = texts
                .into_iter()
                .zip(reasons)
                .enumerate()
                .map(|(i, (text, r))| TextChoice {
                    index: i,
                    text,
                    logprobs: meta.take_lp(i, 0),
                    finish_reason: Some(r),
                })
                .collect();
            serde_json::to_value(meta.envelope("text_completion", choices, usage))
        }
    };
    Ok(Json(body.unwrap_or_default()).into_response())
}

impl Meta {
    /// One SSE chunk of `choices` (and usage, on the last one when asked).
    fn chunk<C: serde::Serialize>(&self, choices: Vec<C>, usage: Option<UsageOut>) -> SseEvent {
        let object = if self.api == Api::Chat {
            "chat.completion.chunk"
        } else {
            "text_completion"
        };
        let data =
            serde_json::to_string(&self.envelope(object, choices, usage)).unwrap_or_default();
        SseEvent::default().data(data)
    }

    /// A chunk with new text (or the role, or the end) of choice `index`.
    fn delta(
        &self,
        index: usize,
        text: Option<&str>,
        finish: Option<&'static str>,
        role: bool,
        logprobs: Option<Logprobs>,
    ) -> SseEvent {
        match self.api {
            Api::Chat => self.chunk(
                vec![ChunkChoice {
                    index,
                    delta: Delta {
                        role: role.then_some("assistant"),
                        content: text.map(str::to_string),
                        tool_calls: None,
                    },
                    logprobs,
                    finish_reason: finish,
                }],
                None,
            ),
            Api::Completion => self.chunk(
                vec![TextChoice {
                    index,
                    text: text.unwrap_or("").to_string(),
                    logprobs,
                    finish_reason: finish,
                }],
                None,
            ),
        }
    }
}

impl Meta {
    /// The chunks for parsed output of choice `index`: content deltas and whole tool calls
    /// (`delta.tool_calls` with the call's index, id, name and all its arguments).
    fn piece_events(
        &mut self,
        index: usize,
        pieces: Vec<Piece>,
        sent: &mut [usize],
    ) -> Vec<SseEvent> {
        let mut out = Vec::new();
        for piece in pieces {
            let at = sent.get(index).copied().unwrap_or(0);
            let lp = self.take_lp(index, at);
            match piece {
                Piece::Text(text) => {
                    if let Some(s) = sent.get_mut(index) {
                        *s += text.len();
                    }
                    out.push(self.delta(index, Some(&text), None, false, lp));
                }
                Piece::Call(call) => {
                    let k = self.parsers.get(index).map_or(0, |p| p.1);
                    if let Some(p) = self.parsers.get_mut(index) {
                        p.1 += 1;
                    }
                    let choice = ChunkChoice {
                        index,
                        delta: Delta {
                            tool_calls: Some(vec![ToolCallDelta { index: k, call }]),
                            ..Delta::default()
                        },
                        logprobs: lp,
                        finish_reason: None,
                    };
                    out.push(self.chunk(vec![choice], None));
                }
            }
        }
        out
    }
}

/// The SSE answer: a role chunk per choice (chat), content deltas, a finish chunk per choice,
/// the usage chunk if asked, then `[DONE]`.
fn sse(
    meta: Meta,
    rx: UnboundedReceiver<Event>,
    n: usize,
    include_usage: bool,
    deadline: Option<tokio::time::Instant>,
    cut: tokio::sync::watch::Receiver<bool>,
) -> Sse<impl Stream<Item = Result<SseEvent, Infallible>>> {
    let mut first = VecDeque::new();
    if meta.api == Api::Chat {
        for i in 0..n {
            first.push_back(meta.delta(i, Some(""), None, true, None));
        }
    }
    // Text bytes sent per choice so far (completions' `text_offset`).
    let sent = vec![0usize; n];
    let state = (meta, rx, first, false, cut, sent);
    let s = stream::unfold(
        state,
        move |(mut meta, mut rx, mut queue, mut ended, cut, mut sent)| async move {
            loop {
                if let Some(e) = queue.pop_front() {
                    return Some((Ok(e), (meta, rx, queue, ended, cut, sent)));
                }
                if ended {
                    return None;
                }
                let recv = async {
                    match deadline {
                        None => Ok(rx.recv().await),
                        Some(d) => tokio::time::timeout_at(d, rx.recv()).await,
                    }
                };
                let next = tokio::select! {
                    n = recv => n,
                    _ = cut_now(cut.clone()) => {
                        // Cut by the shutdown grace: say so, then end the stream properly.
                        queue.push_back(SseEvent::default().data(shutdown_error().body().to_string()));
                        queue.push_back(SseEvent::default().data("[DONE]"));
                        ended = true;
                        continue;
                    }
                };
                let Ok(next) = next else {
                    // Past --request-timeout: an error event, then [DONE]; dropping the
                    // receiver with the stream cancels the request in the engine.
                    queue.push_back(SseEvent::default().data(timeout_error().body().to_string()));
                    queue.push_back(SseEvent::default().data("[DONE]"));
                    ended = true;
                    continue;
                };
                match next {
                    Some(Event::Text { index, text }) => {
                        meta.first_token.get_or_insert_with(std::time::Instant::now);
                        let pieces = match meta.parsers.get_mut(index) {
                            Some((p, _)) => p.push(&text),
                            None => vec![Piece::Text(text)],
                        };
                        queue.extend(meta.piece_events(index, pieces, &mut sent));
                    }
                    Some(Event::Logprob { index, token, top }) => meta.push_lp(index, (token, top)),
                    Some(Event::Done {
                        index,
                        finish_reason,
                    }) => {
                        let mut r = reason(finish_reason);
                        if let Some((p, _)) = meta.parsers.get_mut(index) {
                            let rest = p.finish();
                            queue.extend(meta.piece_events(index, rest, &mut sent));
                            if r == "stop" && meta.parsers[index].1 > 0 {
                                r = "tool_calls";
                            }
                        }
                        let lp = meta.take_lp(index, sent.get(index).copied().unwrap_or(0));
                        queue.push_back(meta.delta(index, None, Some(r), false, lp))
                    }
                    Some(Event::Usage(u)) => {
                        meta.log(Some(&u));
                        if include_usage {
                            let none: Vec<ChunkChoice> = Vec::new();
                            queue.push_back(meta.chunk(none, Some(UsageOut::from(&u))));
                        }
                    }
                    Some(Event::Error(m)) => {
                        let err = ApiError::internal(m);
                        queue.push_back(SseEvent::default().data(err.body().to_string()));
                    }
                    None => {
                        queue.push_back(SseEvent::default().data("[DONE]"));
                        ended = true;
                    }
                }
            }
        },
    );
    Sse::new(s).keep_alive(KeepAlive::default())
}

/// `GET /v1/models`.
pub async fn models(State(st): State<Arc<AppState>>) -> Json<Value> {
    Json(json!({
        "object": "list",
        "data": [{"id": st.served, "object": "model", "created": st.started, "owned_by": "kvinfer"}],
    }))
}

/// `POST /v1/cache/clear` (behind the API key): empties the pool's prefix cache and deletes
/// this model's blocks from every tier. Requests in flight keep their blocks.
pub async fn clear_cache(State(st): State<Arc<AppState>>) -> Result<Json<Value>, ApiError> {
    let report = st
        .engine
        .clear_cache()
        .await
        .map_err(|e| ApiError::unavailable(e.to_string()))?;
    Ok(Json(
        serde_json::to_value(&report).unwrap_or_else(|_| json!({})),
    ))
}

/// `POST /tokenize` (llama-server's shape): `{"content": text, "add_special": bool}` ->
/// `{"tokens": [ids]}`. `add_special` (default false) adds BOS where the model wants it.
pub async fn tokenize(
    State(st): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, ApiError> {
    let v: Value = serde_json::from_slice(&body_bytes(body)?)
        .map_err(|_| ApiError::invalid("the body must be {\"content\": text}", Some("content")))?;
    if let Some(k) = v.as_object().and_then(|o| {
        o.keys()
            .find(|k| !["content", "add_special"].contains(&k.as_str()))
    }) {
        let message = format!("unknown field {}", quote(k));
        return Err(ApiError::invalid(message, Some(&short(k))));
    }
    let content = v
        .get("content")
        .and_then(Value::as_str)
        .ok_or_else(|| ApiError::invalid("content must be a string", Some("content")))?
        .to_string();
    let special = v
        .get("add_special")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let engine = st.engine.clone();
    let ids =
        blocking(move || Ok(engine.model().tokenizer.encode(&content, special, true))).await?;
    Ok(Json(json!({ "tokens": ids })))
}

/// `POST /detokenize` (llama-server's shape): `{"tokens": [ids]}` -> `{"content": text}`.
pub async fn detokenize(
    State(st): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, ApiError> {
    let v: Value = serde_json::from_slice(&body_bytes(body)?)
        .map_err(|_| ApiError::invalid("the body must be {\"tokens\": [ids]}", Some("tokens")))?;
    let vocab = st.engine.model().config.vocab_size;
    let ids = v
        .get("tokens")
        .and_then(Value::as_array)
        .and_then(|a| {
            a.iter()
                .map(|t| {
                    t.as_u64()
                        .filter(|&t| (t as usize) < vocab)
                        .map(|t| t as u32)
                })
                .collect::<Option<Vec<u32>>>()
        })
        .ok_or_else(|| {
            ApiError::invalid(
                format!("tokens must be a list of token ids below {vocab}"),
                Some("tokens"),
            )
        })?;
    let tok = &st.engine.model().tokenizer;
    let bytes: Vec<u8> = ids
        .iter()
        .flat_map(|&t| tok.token_bytes(t).to_vec())
        .collect();
    Ok(Json(json!({ "content": String::from_utf8_lossy(&bytes) })))
}

/// A known path with another method.
pub async fn method_not_allowed() -> ApiError {
    ApiError::method_not_allowed("this endpoint does not take that HTTP method")
        .code("method_not_allowed")
}

/// `GET /health`.
pub async fn health() -> Json<Value> {
    Json(json!({"status": "ok"}))
}

/// `GET /metrics`: Prometheus text.
pub async fn metrics(State(st): State<Arc<AppState>>) -> Response {
    let errors = st.http_errors.load(std::sync::atomic::Ordering::Relaxed);
    let body = crate::metrics::render(&st.engine.stats(), errors);
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], body).into_response()
}

/// `GET /v1/stats`: the engine snapshot as JSON (the web page's live cache panel).
pub async fn stats(State(st): State<Arc<AppState>>) -> Json<Value> {
    let s = st.engine.stats();
    let mut v = serde_json::to_value(&s).unwrap_or_else(|_| json!({}));
    v["prefix"]["hit_rate"] = json!(s.prefix.hit_rate());
    Json(v)
}

/// `GET /`: the web page (no build step; served from the binary).
pub async fn index() -> Html<&'static str> {
    Html(include_str!("index.html"))
}

/// Any other path.
pub async fn not_found() -> ApiError {
    ApiError::not_found(
        "no such endpoint; see /v1/chat/completions, /v1/completions, /v1/models",
        None,
    )
}

/// The content and the calls of a whole output.
fn split_calls(plan: &ToolPlan, text: &str) -> (String, Vec<crate::tools::ToolCallOut>) {
    let mut p = CallParser::new(plan);
    let mut pieces = p.push(text);
    pieces.extend(p.finish());
    let mut content = String::new();
    let mut calls = Vec::new();
    for piece in pieces {
        match piece {
            Piece::Text(t) => content.push_str(&t),
            Piece::Call(c) => calls.push(c),
        }
    }
    (content, calls)
}

/// An engine or grammar message, cut to a readable length.
fn short_msg(m: &str) -> String {
    crate::error::bounded(m, 300)
}
