//! Tool calling: tools into the prompt, calls out of the output.
//!
//! Calls are parsed in the syntax the model's family writes, chosen from its chat template as
//! llama.cpp chooses it ([`ToolSyntax`]): Hermes' (Qwen 2.5/3, SmolLM3 and others), one block
//! per call,
//!
//! ```text
//! <tool_call>
//! {"name": "get_weather", "arguments": {"city": "Paris"}}
//! </tool_call>
//! ```
//!
//! Llama 3.x's, an answer that is a JSON object `{"name": "get_weather", "parameters": {...}}`
//! (several separated by `;`), and Mistral's, `[TOOL_CALLS]` then a JSON array of
//! `{"name", "arguments", "id"}` (ids of 9 letters and digits).
//!
//! A template that reads `tools` gets them as Hugging Face templates expect. A template that
//! does not (SmolLM2's, Gemma 3's) gets them described in a system message, and past calls and
//! tool results are written into the turns as text, as llama.cpp does for such templates.
//! `tool_choice: "required"` or a named function constrains the output to valid calls with a
//! grammar built from the tools' parameter schemas; `"auto"` leaves the model free and parses
//! whatever calls it writes.

use crate::error::quote;
use crate::error::ApiError;
use crate::openai::{FunctionCall, Message, Tool, ToolCallIn, ToolChoice};
use kvinfer_engine::GrammarSpec;
pub use kvinfer_engine::ToolSyntax;
use serde::Serialize;
use serde_json::{json, Value};

/// The opening tag of a call.
pub const OPEN: &str = "<tool_call>";
/// The closing tag of a call.
pub const CLOSE: &str = "</tool_call>";
/// What opens Mistral's calls.
pub const MISTRAL_CALLS: &str = "[TOOL_CALLS]";

/// What the request asks of tools, checked.
#[derive(Debug, Clone)]
pub struct ToolPlan {
    /// The tools offered (empty: none, or `tool_choice: "none"`).
    pub tools: Vec<Tool>,
    /// The output must be calls (`required` or a named function).
    pub forced: Option<Forced>,
    /// More than one call allowed in one answer.
    pub parallel: bool,
    /// The syntax calls are written in (the model's; Hermes until [`Self::with_syntax`]).
    pub syntax: ToolSyntax,
}

/// A tool choice that constrains the output.
#[derive(Debug, Clone)]
pub enum Forced {
    /// Any of the tools.
    Any,
    /// This one.
    Named(String),
}

impl ToolPlan {
    /// Checks `tools`, `tool_choice` and `parallel_tool_calls`.
    pub fn new(
        tools: Option<Vec<Tool>>,
        choice: Option<ToolChoice>,
        parallel: Option<bool>,
    ) -> Result<Self, ApiError> {
        let tools = tools.unwrap_or_default();
        for (i, t) in tools.iter().enumerate() {
            if t.kind != "function" {
                return Err(ApiError::invalid(
                    format!(
                        "tools[{i}].type must be \"function\", got {}",
                        quote(&t.kind)
                    ),
                    Some(&format!("tools[{i}].type")),
                ));
            }
            let name = &t.function.name;
            if name.is_empty()
                || name.len() > 64
                || !name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
            {
                return Err(ApiError::invalid(
                    format!(
                        "tools[{i}].function.name must be 1-64 of a-z, A-Z, 0-9, _ and -, got {}",
                        quote(name)
                    ),
                    Some(&format!("tools[{i}].function.name")),
                ));
            }
            if tools[..i].iter().any(|u| &u.function.name == name) {
                return Err(ApiError::invalid(
                    format!("two tools are named {}", quote(name)),
                    Some("tools"),
                ));
            }
            if let Some(p) = &t.function.parameters {
                if !p.is_object() {
                    return Err(ApiError::invalid(
                        "function parameters must be a JSON schema object",
                        Some(&format!("tools[{i}].function.parameters")),
                    ));
                }
            }
        }
        let forced = match choice {
            None => None,
            Some(ToolChoice::Mode(m)) => match m.as_str() {
                "auto" => None,
                "none" => {
                    return Ok(Self {
                        tools: vec![],
                        forced: None,
                        parallel: false,
                        syntax: ToolSyntax::Hermes,
                    })
                }
                "required" if tools.is_empty() => {
                    return Err(ApiError::invalid(
                        "tool_choice \"required\" needs tools",
                        Some("tool_choice"),
                    ))
                }
                "required" => Some(Forced::Any),
                _ => {
                    return Err(ApiError::invalid(
                        format!(
                            "tool_choice must be \"none\", \"auto\", \"required\" or \
                             {{\"type\": \"function\", \"function\": {{\"name\": ...}}}}, got {}",
                            quote(&m)
                        ),
                        Some("tool_choice"),
                    ))
                }
            },
            Some(ToolChoice::Named { kind, function }) => {
                if kind != "function" {
                    return Err(ApiError::invalid(
                        "tool_choice.type must be \"function\"",
                        Some("tool_choice"),
                    ));
                }
                if !tools.iter().any(|t| t.function.name == function.name) {
                    return Err(ApiError::invalid(
                        format!(
                            "tool_choice names {}, which is not in tools",
                            quote(&function.name)
                        ),
                        Some("tool_choice"),
                    ));
                }
                Some(Forced::Named(function.name))
            }
        };
        Ok(Self {
            tools,
            forced,
            parallel: parallel.unwrap_or(true),
            syntax: ToolSyntax::Hermes,
        })
    }

    /// The plan for a model that writes calls in `syntax`.
    pub fn with_syntax(mut self, syntax: ToolSyntax) -> Self {
        self.syntax = syntax;
        self
    }

    /// Whether output is parsed for calls.
    pub fn active(&self) -> bool {
        !self.tools.is_empty()
    }

    /// The grammar forced calls must follow (None: the model is free), in the plan's syntax.
    pub fn grammar(&self) -> Option<GrammarSpec> {
        let forced = self.forced.as_ref()?;
        let args_key = match self.syntax {
            ToolSyntax::Llama3Json => "parameters",
            ToolSyntax::Hermes | ToolSyntax::MistralToolCalls => "arguments",
        };
        let schemas: Vec<Value> = self
            .tools
            .iter()
            .filter(|t| match forced {
                Forced::Any => true,
                Forced::Named(n) => &t.function.name == n,
            })
            .map(|t| {
                let mut props = serde_json::Map::new();
                props.insert("name".into(), json!({"const": t.function.name}));
                props.insert(
                    args_key.into(),
                    t.function
                        .parameters
                        .clone()
                        .unwrap_or_else(|| json!({"type": "object"})),
                );
                let mut required = vec![json!("name"), json!(args_key)];
                if self.syntax == ToolSyntax::MistralToolCalls {
                    props.insert(
                        "id".into(),
                        json!({"type": "string", "pattern": "^[a-zA-Z0-9]{9}$"}),
                    );
                    required.push(json!("id"));
                }
                json!({
                    "type": "object",
                    "properties": props,
                    "required": required,
                    "additionalProperties": false,
                })
            })
            .collect();
        let mut schema = if schemas.len() == 1 {
            schemas.into_iter().next().expect("one")
        } else {
            json!({ "anyOf": schemas })
        };
        schema["x-guidance"] =
            json!({"whitespace_flexible": false, "item_separator": ", ", "key_separator": ": "});
        // A named function is exactly one call; `required` allows several only when parallel
        // calls are allowed. The grammar ends after the last call it allows.
        let several = self.parallel && matches!(forced, Forced::Any);
        let (call, sep, start, end) = match self.syntax {
            ToolSyntax::Hermes => (
                format!("\"{OPEN}\\n\" %json {schema} \"\\n{CLOSE}\""),
                "\"\\n\"",
                String::new(),
                "",
            ),
            ToolSyntax::Llama3Json => (format!("%json {schema}"), "\"; \"", String::new(), ""),
            ToolSyntax::MistralToolCalls => (
                format!("%json {schema}"),
                "\", \"",
                format!("\"{MISTRAL_CALLS}[\" "),
                " \"]\"",
            ),
        };
        let lark = if several {
            format!("start: {start}call ({sep} call)*{end}\ncall: {call}\n")
        } else {
            format!("start: {start}call{end}\ncall: {call}\n")
        };
        Some(GrammarSpec::Lark(lark))
    }

    /// The system text that describes the tools to a template that does not read them.
    fn system_text(&self) -> String {
        let mut s = String::from(
            "You are a function calling AI model. You are provided with function signatures \
             within <tools></tools> XML tags. You may call one or more functions to assist with \
             the user query. Don't make assumptions about what values to plug into functions. \
             Here are the available tools: <tools>",
        );
        for t in &self.tools {
            s.push('\n');
            s.push_str(&serde_json::to_string(t).unwrap_or_default());
        }
        s.push_str(
            "\n</tools>\nFor each function call return a json object with function name and \
             arguments within <tool_call></tool_call> XML tags as follows:\n<tool_call>\n\
             {\"name\": <function-name>, \"arguments\": <args-dict>}\n</tool_call>",
        );
        s
    }
}

/// A message as the template context gets it.
#[derive(Debug, Clone, Serialize)]
pub struct TemplateMessage {
    /// Role.
    pub role: String,
    /// Text.
    pub content: String,
    /// The assistant's calls, in OpenAI's shape with `arguments` parsed (what HF templates read).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<Value>>,
    /// A tool result's call id.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
    /// A tool result's tool name, or a participant's name.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

/// The `tool_calls` of an assistant message as templates read them (`arguments` as an object
/// when it parses, as many templates iterate it).
fn template_calls(calls: &[ToolCallIn]) -> Vec<Value> {
    calls
        .iter()
        .map(|c| {
            let args = serde_json::from_str::<Value>(&c.function.arguments)
                .unwrap_or_else(|_| Value::String(c.function.arguments.clone()));
            json!({
                "id": c.id,
                "type": "function",
                "function": {"name": c.function.name, "arguments": args},
            })
        })
        .collect()
}

/// A call written the way the model is asked to write it.
fn call_text(f: &FunctionCall) -> String {
    let args = serde_json::from_str::<Value>(&f.arguments)
        .unwrap_or_else(|_| Value::String(f.arguments.clone()));
    format!(
        "{OPEN}\n{{\"name\": {}, \"arguments\": {args}}}\n{CLOSE}",
        Value::String(f.name.clone())
    )
}

/// Builds the template's messages from the request's (content already as text) and the tools
/// to put in the context (None when the template does not read them).
pub fn template_messages(
    messages: &[Message],
    texts: Vec<String>,
    plan: &ToolPlan,
    knows_tools: bool,
) -> (Vec<TemplateMessage>, Option<Vec<Tool>>) {
    if knows_tools {
        let out = messages
            .iter()
            .zip(texts)
            .map(|(m, content)| TemplateMessage {
                role: m.role.clone(),
                content,
                tool_calls: m.tool_calls.as_deref().map(template_calls),
                tool_call_id: m.tool_call_id.clone(),
                name: m.name.clone(),
            })
            .collect();
        let tools = plan.active().then(|| plan.tools.clone());
        return (out, tools);
    }
    // The template knows only roles and text: calls and results become text.
    let mut out: Vec<TemplateMessage> = Vec::new();
    let mut prev_tool = false;
    for (m, content) in messages.iter().zip(texts) {
        let plain = |role: &str, content: String| TemplateMessage {
            role: role.into(),
            content,
            tool_calls: None,
            tool_call_id: None,
            name: None,
        };
        if m.role == "tool" {
            let text = format!("<tool_response>\n{content}\n</tool_response>");
            match out.last_mut() {
                Some(last) if prev_tool => {
                    last.content.push('\n');
                    last.content.push_str(&text);
                }
                _ => out.push(plain("user", text)),
            }
            prev_tool = true;
            continue;
        }
        prev_tool = false;
        let mut content = content;
        for c in m.tool_calls.iter().flatten() {
            if !content.is_empty() {
                content.push('\n');
            }
            content.push_str(&call_text(&c.function));
        }
        out.push(plain(&m.role, content));
    }
    if plan.active() {
        let sys = plan.system_text();
        match out.first_mut() {
            Some(first) if first.role == "system" => {
                first.content = format!("{}\n\n{sys}", first.content);
            }
            _ => out.insert(
                0,
                TemplateMessage {
                    role: "system".into(),
                    content: sys,
                    tool_calls: None,
                    tool_call_id: None,
                    name: None,
                },
            ),
        }
    }
    (out, None)
}

/// A call found in the output, in OpenAI's response shape.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ToolCallOut {
    /// `call_` + 24 hex characters.
    pub id: String,
    /// Always "function".
    #[serde(rename = "type")]
    pub kind: &'static str,
    /// Name and arguments (a JSON string).
    pub function: FunctionOut,
}

/// A called function.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FunctionOut {
    /// The tool's name.
    pub name: String,
    /// Its arguments, JSON text.
    pub arguments: String,
}

/// A piece of parsed output.
#[derive(Debug, Clone, PartialEq)]
pub enum Piece {
    /// Text for `content`.
    Text(String),
    /// A complete call.
    Call(ToolCallOut),
}

/// The first JSON value at the start of a text (after whitespace).
enum JsonPrefix {
    /// More text is needed to know.
    Incomplete,
    /// The text does not start with JSON.
    Invalid,
    /// A value and the bytes it took.
    Value(Value, usize),
}

fn json_prefix(s: &str) -> JsonPrefix {
    let mut it = serde_json::Deserializer::from_str(s).into_iter::<Value>();
    match it.next() {
        None => JsonPrefix::Incomplete,
        Some(Ok(v)) => JsonPrefix::Value(v, it.byte_offset()),
        Some(Err(e)) if e.is_eof() => JsonPrefix::Incomplete,
        Some(Err(_)) => JsonPrefix::Invalid,
    }
}

/// Where a Llama 3 JSON parser is.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
enum JsonMode {
    /// Only whitespace so far: a call may open the answer.
    #[default]
    Start,
    /// After a call: another may follow (after `;`).
    Calls,
    /// The answer is text.
    Text,
}

/// Splits streamed output into text and calls, in the plan's syntax. Text that might begin a
/// call is held back until it is clear; a call is given whole once it is complete. A block that
/// does not hold valid calls of offered tools stays text.
#[derive(Debug)]
pub struct CallParser {
    buf: String,
    names: Vec<String>,
    syntax: ToolSyntax,
    /// A call was the last thing found: whitespace after it is not content (the newline
    /// between parallel calls, the one before the end).
    after_call: bool,
    json_mode: JsonMode,
}

impl CallParser {
    /// A parser for calls of `plan`'s tools.
    pub fn new(plan: &ToolPlan) -> Self {
        Self {
            buf: String::new(),
            names: plan.tools.iter().map(|t| t.function.name.clone()).collect(),
            syntax: plan.syntax,
            after_call: false,
            json_mode: JsonMode::Start,
        }
    }

    /// Takes the next text; returns what became final.
    pub fn push(&mut self, text: &str) -> Vec<Piece> {
        self.buf.push_str(text);
        let mut out = Vec::new();
        match self.syntax {
            ToolSyntax::Hermes => self.push_tagged(&mut out),
            ToolSyntax::MistralToolCalls => self.push_marked(&mut out),
            ToolSyntax::Llama3Json => self.push_json(&mut out),
        }
        out
    }

    /// Hermes: `<tool_call>` ... `</tool_call>` blocks anywhere in the text.
    fn push_tagged(&mut self, out: &mut Vec<Piece>) {
        loop {
            if self.after_call && self.buf.trim().is_empty() {
                return; // whitespace after a call: held until it is clear what follows
            }
            let Some(start) = self.buf.find(OPEN) else {
                return self.release_unless_prefix_of(out, OPEN);
            };
            let Some(end) = self.buf[start..].find(CLOSE).map(|e| start + e) else {
                // Inside a call: the text before it is final.
                let before: String = self.buf.drain(..start).collect();
                return self.text(out, before);
            };
            let before: String = self.buf.drain(..start).collect();
            let block: String = self.buf.drain(..end - start + CLOSE.len()).collect();
            self.text(out, before);
            let body = &block[OPEN.len()..block.len() - CLOSE.len()];
            let call = serde_json::from_str::<Value>(body.trim())
                .ok()
                .and_then(|v| self.call(&v, None));
            match call {
                Some(c) => {
                    out.push(Piece::Call(c));
                    self.after_call = true;
                }
                None => self.text(out, block),
            }
        }
    }

    /// Mistral: `[TOOL_CALLS]` and a JSON array of calls.
    fn push_marked(&mut self, out: &mut Vec<Piece>) {
        loop {
            if self.after_call && self.buf.trim().is_empty() {
                return;
            }
            let Some(start) = self.buf.find(MISTRAL_CALLS) else {
                return self.release_unless_prefix_of(out, MISTRAL_CALLS);
            };
            let before: String = self.buf.drain(..start).collect();
            self.text(out, before);
            let body = &self.buf[MISTRAL_CALLS.len()..];
            match json_prefix(body) {
                JsonPrefix::Incomplete => return,
                JsonPrefix::Invalid => {
                    let marker: String = self.buf.drain(..MISTRAL_CALLS.len()).collect();
                    self.text(out, marker);
                }
                JsonPrefix::Value(v, n) => {
                    let block: String = self.buf.drain(..MISTRAL_CALLS.len() + n).collect();
                    let items = match &v {
                        Value::Array(a) => a.iter().collect::<Vec<_>>(),
                        one => vec![one],
                    };
                    let calls: Option<Vec<ToolCallOut>> = items
                        .iter()
                        .map(|c| self.call(c, c.get("id").and_then(Value::as_str)))
                        .collect();
                    match calls {
                        Some(calls) if !calls.is_empty() => {
                            out.extend(calls.into_iter().map(Piece::Call));
                            self.after_call = true;
                        }
                        _ => self.text(out, block),
                    }
                }
            }
        }
    }

    /// Llama 3: an answer that opens with a JSON call (more may follow, after `;`).
    fn push_json(&mut self, out: &mut Vec<Piece>) {
        loop {
            if self.json_mode == JsonMode::Text {
                let all = std::mem::take(&mut self.buf);
                return self.text(out, all);
            }
            let mut t = self.buf.trim_start();
            if self.json_mode == JsonMode::Calls {
                t = t.strip_prefix(';').map_or(t, str::trim_start);
            }
            if t.is_empty() {
                return;
            }
            if !t.starts_with('{') {
                self.json_mode = JsonMode::Text;
                continue;
            }
            let skip = self.buf.len() - t.len();
            match json_prefix(t) {
                JsonPrefix::Incomplete => return,
                JsonPrefix::Invalid => self.json_mode = JsonMode::Text,
                JsonPrefix::Value(v, n) => match self.call(&v, None) {
                    Some(c) => {
                        self.buf.drain(..skip + n);
                        out.push(Piece::Call(c));
                        self.after_call = true;
                        self.json_mode = JsonMode::Calls;
                    }
                    None => self.json_mode = JsonMode::Text,
                },
            }
        }
    }

    /// Releases the text held, except a tail that could be the start of `marker`.
    fn release_unless_prefix_of(&mut self, out: &mut Vec<Piece>, marker: &str) {
        let keep = (1..marker.len())
            .rev()
            .find(|&k| self.buf.ends_with(&marker[..k]))
            .unwrap_or(0);
        let cut = self.buf.len() - keep;
        let text: String = self.buf.drain(..cut).collect();
        self.text(out, text);
    }

    /// The output ended: whatever is held is text, except whitespace after a call and a call
    /// cut short (by the length limit): text that is part of a call never becomes content.
    pub fn finish(&mut self) -> Vec<Piece> {
        let mut out = Vec::new();
        let rest = std::mem::take(&mut self.buf);
        let cut_call = match self.syntax {
            ToolSyntax::Hermes => rest.starts_with(OPEN),
            ToolSyntax::MistralToolCalls => rest.starts_with(MISTRAL_CALLS),
            ToolSyntax::Llama3Json => {
                self.json_mode != JsonMode::Text
                    && rest.trim_start().starts_with('{')
                    && rest.contains("\"name\"")
            }
        };
        if !(self.after_call && rest.trim().is_empty()) && !cut_call {
            self.text(&mut out, rest);
        }
        out
    }

    /// Emits content text; whitespace only between two calls is dropped.
    fn text(&mut self, out: &mut Vec<Piece>, text: String) {
        if self.after_call && text.trim().is_empty() {
            return;
        }
        if !text.is_empty() {
            self.after_call = false;
            out.push(Piece::Text(text));
        }
    }

    /// The call in `v` (`{"name", "arguments" | "parameters"}`) if it names an offered tool;
    /// `id` is the model's own (Mistral), kept when well-formed.
    fn call(&self, v: &Value, id: Option<&str>) -> Option<ToolCallOut> {
        let name = v.get("name")?.as_str()?;
        if !self.names.iter().any(|n| n == name) {
            return None;
        }
        let args = match v.get("arguments").or_else(|| v.get("parameters")) {
            None => json!({}),
            Some(Value::String(s)) => serde_json::from_str(s).ok()?,
            Some(a) => a.clone(),
        };
        let id = match (self.syntax, id) {
            (ToolSyntax::MistralToolCalls, Some(i))
                if i.len() == 9 && i.chars().all(|c| c.is_ascii_alphanumeric()) =>
            {
                i.to_string()
            }
            (ToolSyntax::MistralToolCalls, _) => {
                use rand::distr::{Alphanumeric, SampleString};
                Alphanumeric.sample_string(&mut rand::rng(), 9)
            }
            _ => format!("call_{:024x}", rand::random::<u128>() >> 32),
        };
        Some(ToolCallOut {
            id,
            kind: "function",
            function: FunctionOut {
                name: name.to_string(),
                arguments: args.to_string(),
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::openai::FunctionDef;

    fn plan(choice: Option<ToolChoice>) -> ToolPlan {
        let tool = |name: &str| Tool {
            kind: "function".into(),
            function: FunctionDef {
                name: name.into(),
                description: Some("d".into()),
                parameters: Some(
                    json!({"type": "object", "properties": {"city": {"type": "string"}}}),
                ),
                strict: None,
            },
        };
        ToolPlan::new(Some(vec![tool("weather"), tool("time")]), choice, None).unwrap()
    }

    fn run(p: &mut CallParser, pieces: &[&str]) -> Vec<Piece> {
        let mut out: Vec<Piece> = pieces.iter().flat_map(|t| p.push(t)).collect();
        out.extend(p.finish());
        out
    }

    #[test]
    fn calls_split_across_chunks_are_found_whole() {
        let mut p = CallParser::new(&plan(None));
        let out = run(
            &mut p,
            &[
                "Sure. <tool",
                "_call>\n{\"name\": \"weather\", \"argu",
                "ments\": {\"city\": \"Paris\"}}\n</tool_",
                "call>\n<tool_call>{\"name\": \"time\"}</tool_call> done",
            ],
        );
        assert_eq!(out.len(), 4, "{out:?}");
        assert_eq!(out[0], Piece::Text("Sure. ".into()));
        let Piece::Call(c) = &out[1] else {
            panic!("{out:?}")
        };
        assert_eq!(c.function.name, "weather");
        assert_eq!(c.function.arguments, r#"{"city":"Paris"}"#);
        let Piece::Call(c) = &out[2] else {
            panic!("{out:?}")
        };
        assert_eq!(
            (c.function.name.as_str(), c.function.arguments.as_str()),
            ("time", "{}")
        );
        assert_eq!(out[3], Piece::Text(" done".into()));
        // The newline between two calls, in chunks of its own, is not content.
        let mut p = CallParser::new(&plan(None));
        let call = "<tool_call>\n{\"name\": \"time\"}\n</tool_call>";
        let out = run(&mut p, &[call, "\n", call, "\n"]);
        assert_eq!(out.len(), 2, "{out:?}");
        assert!(out.iter().all(|x| matches!(x, Piece::Call(_))));
    }

    #[test]
    fn unknown_tools_bad_json_and_unfinished_calls_stay_text() {
        let mut p = CallParser::new(&plan(None));
        let text = "<tool_call>{\"name\": \"nope\"}</tool_call><tool_call>{bad</tool_call>";
        let cut = "<tool_call>{\"name\": \"time\"}\n</tool_call";
        let out: String = run(&mut p, &[text, cut])
            .into_iter()
            .map(|x| match x {
                Piece::Text(t) => t,
                Piece::Call(c) => panic!("{c:?}"),
            })
            .collect();
        // Blocks that are not calls stay text; a call cut short is not content.
        assert_eq!(out, text);
        let after_call = run(
            &mut CallParser::new(&plan(None)),
            &["<tool_call>{\"name\": \"time\"}</tool_call>\n<tool_call>\n{\"na"],
        );
        assert_eq!(after_call.len(), 1, "{after_call:?}");
        assert!(matches!(&after_call[0], Piece::Call(_)));
        // Text that only looks like the start of a tag is released at the end.
        let held = run(&mut CallParser::new(&plan(None)), &["a <tool"]);
        assert_eq!(
            held,
            vec![Piece::Text("a ".into()), Piece::Text("<tool".into())]
        );
    }

    fn texts_and_calls(out: &[Piece]) -> (String, Vec<(String, String, String)>) {
        let mut text = String::new();
        let mut calls = Vec::new();
        for p in out {
            match p {
                Piece::Text(t) => text.push_str(t),
                Piece::Call(c) => calls.push((
                    c.id.clone(),
                    c.function.name.clone(),
                    c.function.arguments.clone(),
                )),
            }
        }
        (text, calls)
    }

    #[test]
    fn llama3_answers_that_are_json_calls_are_calls_and_other_answers_text() {
        let llama = || CallParser::new(&plan(None).with_syntax(ToolSyntax::Llama3Json));
        // Two calls, split anywhere, `;` between them.
        let out = run(
            &mut llama(),
            &[
                " {\"name\": \"weather\", \"param",
                "eters\": {\"city\": \"Rome\"}}",
                "; {\"type\": \"function\", \"name\": \"time\", \"parameters\": {}}\n",
            ],
        );
        let (text, calls) = texts_and_calls(&out);
        assert_eq!(text, "");
        assert_eq!(calls.len(), 2, "{out:?}");
        assert_eq!(
            (calls[0].1.as_str(), calls[0].2.as_str()),
            ("weather", r#"{"city":"Rome"}"#)
        );
        assert_eq!((calls[1].1.as_str(), calls[1].2.as_str()), ("time", "{}"));
        assert!(calls[0].0.starts_with("call_"));
        // Text, JSON that is not a call, an unknown tool: all text, nothing lost.
        for answer in [
            "It is sunny. {\"name\": \"weather\"}",
            "{\"city\": \"Paris\"}",
            "{\"name\": \"nope\", \"parameters\": {}} after",
            "{not json",
        ] {
            let chunks: Vec<String> = answer.chars().map(String::from).collect();
            let chunks: Vec<&str> = chunks.iter().map(String::as_str).collect();
            let (text, calls) = texts_and_calls(&run(&mut llama(), &chunks));
            assert_eq!((text.as_str(), calls.len()), (answer, 0), "{answer}");
        }
        // A call cut short by the length limit is not content.
        let (text, calls) = texts_and_calls(&run(&mut llama(), &["{\"name\": \"time\", \"par"]));
        assert_eq!((text.as_str(), calls.len()), ("", 0));
    }

    #[test]
    fn mistral_tool_calls_arrays_are_calls_with_their_ids() {
        let mistral = || CallParser::new(&plan(None).with_syntax(ToolSyntax::MistralToolCalls));
        let out = run(
            &mut mistral(),
            &[
                "Let me check.[TOOL",
                "_CALLS][{\"name\": \"weather\", \"arguments\": {\"city\": \"Oslo\"}, \"id\": \"abcDEF123\"}, ",
                "{\"name\": \"time\", \"arguments\": \"{}\", \"id\": \"bad id\"}]",
            ],
        );
        let (text, calls) = texts_and_calls(&out);
        assert_eq!(text, "Let me check.");
        assert_eq!(calls.len(), 2, "{out:?}");
        assert_eq!(calls[0].0, "abcDEF123");
        assert_eq!(
            (calls[0].1.as_str(), calls[0].2.as_str()),
            ("weather", r#"{"city":"Oslo"}"#)
        );
        // An id that is not 9 letters and digits is replaced by one that is.
        assert!(calls[1].0.len() == 9 && calls[1].0.chars().all(|c| c.is_ascii_alphanumeric()));
        assert_ne!(calls[1].0, "bad id");
        // An array naming an unknown tool, or not JSON: text.
        for answer in [
            "[TOOL_CALLS][{\"name\": \"nope\", \"arguments\": {}}]",
            "[TOOL_CALLS] oops",
            "a [TOOL",
        ] {
            let (text, calls) = texts_and_calls(&run(&mut mistral(), &[answer]));
            assert_eq!((text.as_str(), calls.len()), (answer, 0), "{answer}");
        }
        let (text, calls) =
            texts_and_calls(&run(&mut mistral(), &["[TOOL_CALLS][{\"name\": \"ti"]));
        assert_eq!((text.as_str(), calls.len()), ("", 0));
    }

    #[test]
    fn forced_grammars_write_each_syntax() {
        let forced = |syntax| {
            let Some(GrammarSpec::Lark(l)) = plan(Some(ToolChoice::Mode("required".into())))
                .with_syntax(syntax)
                .grammar()
            else {
                panic!("a lark grammar")
            };
            l
        };
        let h = forced(ToolSyntax::Hermes);
        assert!(
            h.contains("<tool_call>") && h.contains("\"arguments\""),
            "{h}"
        );
        let l = forced(ToolSyntax::Llama3Json);
        assert!(
            l.contains("\"parameters\"") && !l.contains("<tool_call>"),
            "{l}"
        );
        let m = forced(ToolSyntax::MistralToolCalls);
        assert!(
            m.contains("[TOOL_CALLS][") && m.contains("[a-zA-Z0-9]{9}"),
            "{m}"
        );
    }

    #[test]
    fn choices_are_checked() {
        assert!(plan(Some(ToolChoice::Mode("required".into())))
            .grammar()
            .is_some());
        assert!(plan(None).grammar().is_none());
        assert!(!plan(Some(ToolChoice::Mode("none".into()))).active());
        let bad = ToolPlan::new(None, Some(ToolChoice::Mode("required".into())), None);
        assert!(bad.is_err());
        let named = |n: &str| {
            ToolPlan::new(
                plan(None).tools.into(),
                Some(ToolChoice::Named {
                    kind: "function".into(),
                    function: crate::openai::NamedFunction { name: n.into() },
                }),
                None,
            )
        };
        assert!(named("time").is_ok());
        assert!(named("other").is_err());
    }

    #[test]
    fn templates_without_tools_get_them_as_text() {
        let msgs = vec![
            Message {
                role: "user".into(),
                content: None,
                tool_calls: None,
                tool_call_id: None,
                name: None,
            },
            Message {
                role: "assistant".into(),
                content: None,
                tool_calls: Some(vec![ToolCallIn {
                    id: Some("call_1".into()),
                    kind: Some("function".into()),
                    function: FunctionCall {
                        name: "weather".into(),
                        arguments: "{\"city\": \"Paris\"}".into(),
                    },
                }]),
                tool_call_id: None,
                name: None,
            },
            Message {
                role: "tool".into(),
                content: None,
                tool_calls: None,
                tool_call_id: Some("call_1".into()),
                name: None,
            },
        ];
        let texts = vec!["weather?".to_string(), String::new(), "sunny".to_string()];
        let (out, tools) = template_messages(&msgs, texts, &plan(None), false);
        assert!(tools.is_none());
        let roles: Vec<&str> = out.iter().map(|m| m.role.as_str()).collect();
        assert_eq!(roles, ["system", "user", "assistant", "user"]);
        assert!(out[0].content.contains("\"weather\""));
        assert_eq!(
            out[2].content,
            "<tool_call>\n{\"name\": \"weather\", \"arguments\": {\"city\":\"Paris\"}}\n</tool_call>"
        );
        assert_eq!(out[3].content, "<tool_response>\nsunny\n</tool_response>");
    }
}
