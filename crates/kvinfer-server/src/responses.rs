//! OpenAI's response shapes as typed structs: the JSON answer of chat and completions, the SSE
//! chunks, usage and logprobs.

use crate::tools::ToolCallOut;
use kvinfer_engine::{TokenLogprob, Usage};
use serde::Serialize;

/// A whole answer (`chat.completion`, `text_completion`) or one stream chunk
/// (`chat.completion.chunk`, `text_completion`); `C` is the choice shape.
#[derive(Debug, Serialize)]
pub struct Envelope<'a, C> {
    /// `chatcmpl-...` / `cmpl-...`.
    pub id: &'a str,
    /// The object type.
    pub object: &'static str,
    /// Unix seconds.
    pub created: u64,
    /// The served model.
    pub model: &'a str,
    /// kvinfer's version and the model's KV fingerprint.
    pub system_fingerprint: &'a str,
    /// The sampler's seed (given or drawn).
    pub seed: u64,
    /// The choices.
    pub choices: Vec<C>,
    /// Token accounting (always on a whole answer; on the last chunk when asked).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<UsageOut>,
}

/// `usage`.
#[derive(Debug, Serialize)]
pub struct UsageOut {
    /// Prompt tokens.
    pub prompt_tokens: usize,
    /// Generated tokens over all choices.
    pub completion_tokens: usize,
    /// Both.
    pub total_tokens: usize,
    /// Of the prompt: what the prefix cache served.
    pub prompt_tokens_details: PromptDetails,
}

/// `usage.prompt_tokens_details`.
#[derive(Debug, Serialize)]
pub struct PromptDetails {
    /// Prompt tokens served from the prefix cache.
    pub cached_tokens: usize,
}

impl From<&Usage> for UsageOut {
    fn from(u: &Usage) -> Self {
        Self {
            prompt_tokens: u.prompt_tokens,
            completion_tokens: u.completion_tokens,
            total_tokens: u.prompt_tokens + u.completion_tokens,
            prompt_tokens_details: PromptDetails {
                cached_tokens: u.cached_tokens,
            },
        }
    }
}

/// A chat answer's choice.
#[derive(Debug, Serialize)]
pub struct ChatChoice {
    /// Choice index.
    pub index: usize,
    /// The assistant's message.
    pub message: AssistantMessage,
    /// Token log-probabilities when asked.
    pub logprobs: Option<Logprobs>,
    /// stop / length / tool_calls.
    pub finish_reason: &'static str,
}

/// The assistant's message of a chat answer.
#[derive(Debug, Serialize)]
pub struct AssistantMessage {
    /// Always "assistant".
    pub role: &'static str,
    /// The text (null when the answer is only tool calls).
    pub content: Option<String>,
    /// The calls found in the output.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub tool_calls: Vec<ToolCallOut>,
}

/// A completions choice (whole answer or chunk).
#[derive(Debug, Serialize)]
pub struct TextChoice {
    /// Choice index.
    pub index: usize,
    /// The text (of this chunk, in a stream).
    pub text: String,
    /// Token log-probabilities when asked.
    pub logprobs: Option<Logprobs>,
    /// Set on the last chunk of the choice (always on a whole answer).
    pub finish_reason: Option<&'static str>,
}

/// A chat stream chunk's choice.
#[derive(Debug, Serialize)]
pub struct ChunkChoice {
    /// Choice index.
    pub index: usize,
    /// What is new.
    pub delta: Delta,
    /// Token log-probabilities of this delta when asked.
    pub logprobs: Option<Logprobs>,
    /// Set on the choice's last chunk.
    pub finish_reason: Option<&'static str>,
}

/// `delta` of a chat chunk.
#[derive(Debug, Default, Serialize)]
pub struct Delta {
    /// "assistant" on the first chunk.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<&'static str>,
    /// New text.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
    /// A whole call (one per chunk).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<ToolCallDelta>>,
}

/// A tool call in a stream: its index among the choice's calls, then the call.
#[derive(Debug, Serialize)]
pub struct ToolCallDelta {
    /// Position among the choice's calls.
    pub index: usize,
    /// The call, whole.
    #[serde(flatten)]
    pub call: ToolCallOut,
}

/// OpenAI's two logprobs shapes.
#[derive(Debug, Serialize)]
#[serde(untagged)]
pub enum Logprobs {
    /// Chat: `{"content": [{token, logprob, bytes, top_logprobs}]}`.
    Chat {
        /// One per token.
        content: Vec<ChatLogprob>,
    },
    /// Completions: parallel lists.
    Completion {
        /// Token texts.
        tokens: Vec<String>,
        /// Their log-probabilities.
        token_logprobs: Vec<f32>,
        /// Per token, alternative text -> log-probability.
        top_logprobs: Vec<serde_json::Map<String, serde_json::Value>>,
        /// Per token, its offset in the text.
        text_offset: Vec<usize>,
    },
}

/// One token of chat logprobs.
#[derive(Debug, Serialize)]
pub struct ChatLogprob {
    /// Its text.
    pub token: String,
    /// ln p.
    pub logprob: f32,
    /// Its bytes.
    pub bytes: Vec<u8>,
    /// The most likely tokens there.
    pub top_logprobs: Vec<TopLogprob>,
}

/// An alternative token.
#[derive(Debug, Serialize)]
pub struct TopLogprob {
    /// Its text.
    pub token: String,
    /// ln p.
    pub logprob: f32,
    /// Its bytes.
    pub bytes: Vec<u8>,
}

impl From<&TokenLogprob> for TopLogprob {
    fn from(t: &TokenLogprob) -> Self {
        Self {
            token: t.token.clone(),
            logprob: t.logprob,
            bytes: t.bytes.clone(),
        }
    }
}

/// `entries` in the chat shape.
pub fn chat_logprobs(entries: &[(TokenLogprob, Vec<TokenLogprob>)]) -> Logprobs {
    Logprobs::Chat {
        content: entries
            .iter()
            .map(|(t, top)| ChatLogprob {
                token: t.token.clone(),
                logprob: t.logprob,
                bytes: t.bytes.clone(),
                top_logprobs: top.iter().map(TopLogprob::from).collect(),
            })
            .collect(),
    }
}

/// `entries` in the completions shape; `offset`: the text offset of the first.
pub fn completion_logprobs(
    entries: &[(TokenLogprob, Vec<TokenLogprob>)],
    offset: usize,
) -> Logprobs {
    let mut at = offset;
    let mut text_offset = Vec::with_capacity(entries.len());
    for (t, _) in entries {
        text_offset.push(at);
        at += t.token.len();
    }
    Logprobs::Completion {
        tokens: entries.iter().map(|(t, _)| t.token.clone()).collect(),
        token_logprobs: entries.iter().map(|(t, _)| t.logprob).collect(),
        top_logprobs: entries
            .iter()
            .map(|(_, top)| {
                top.iter()
                    .map(|t| (t.token.clone(), serde_json::Value::from(t.logprob)))
                    .collect()
            })
            .collect(),
        text_offset,
    }
}
