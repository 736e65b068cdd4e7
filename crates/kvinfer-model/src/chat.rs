//! Chat templates: turning a conversation into the prompt text a model was trained on.
//!
//! GGUF files carry the Hugging Face Jinja template in `tokenizer.chat_template`; it is rendered
//! with `minijinja` set up like Hugging Face's `apply_chat_template` (and llama.cpp's Jinja
//! engine): `trim_blocks` and `lstrip_blocks` on, Python string methods available, plus the
//! `raise_exception` and `strftime_now` functions templates expect. Files without a template get
//! the standard Gemma 3 template when the architecture is `gemma3`, and ChatML otherwise (what
//! llama.cpp falls back to).

use minijinja::{context, Environment, ErrorKind};
use serde::{Deserialize, Serialize};

const TEMPLATE_NAME: &str = "chat";

/// The Gemma 3 instruction-tuned chat template (from the Gemma 3 `tokenizer_config.json`).
pub(crate) const GEMMA3_TEMPLATE: &str = r#"{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- if messages[0]['content'] is string -%}
        {%- set first_user_prefix = messages[0]['content'] + '

' -%}
    {%- else -%}
        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '

' -%}
    {%- endif -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- if (message['role'] == 'assistant') -%}
        {%- set role = "model" -%}
    {%- else -%}
        {%- set role = message['role'] -%}
    {%- endif -%}
    {{ '<start_of_turn>' + role + '
' + (first_user_prefix if loop.first else "") }}
    {%- if message['content'] is string -%}
        {{ message['content'] | trim }}
    {%- elif message['content'] is iterable -%}
        {%- for item in message['content'] -%}
            {%- if item['type'] == 'image' -%}
                {{ '<start_of_image>' }}
            {%- elif item['type'] == 'text' -%}
                {{ item['text'] | trim }}
            {%- endif -%}
        {%- endfor -%}
    {%- else -%}
        {{ raise_exception("Invalid content type") }}
    {%- endif -%}
    {{ '<end_of_turn>
' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{'<start_of_turn>model
'}}
{%- endif -%}
"#;

/// ChatML, llama.cpp's template for files that carry none.
const CHATML_TEMPLATE: &str = "{%- for message in messages -%}\
{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}\
{%- endfor -%}\
{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}";

/// Why a chat template could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ChatTemplateError {
    /// The template text is not valid Jinja (for minijinja).
    #[error("chat template does not parse: {0:#}")]
    Syntax(minijinja::Error),
    /// Rendering failed, e.g. the template raised an exception about the messages.
    #[error("chat template failed to render: {0:#}")]
    Render(minijinja::Error),
}

/// One turn of a conversation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    /// `system`, `user` or `assistant`.
    pub role: String,
    /// The text of the turn.
    pub content: String,
}

impl ChatMessage {
    /// A message with the given role.
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// The syntax a model family writes tool calls in, chosen from its chat template as llama.cpp
/// chooses it (`common_chat_templates_apply`): the template's own markers name the family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ToolSyntax {
    /// `<tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>` per call (Hermes 2/3,
    /// Qwen 2.5 / 3, SmolLM3; also what kvinfer asks of templates that do not read tools).
    Hermes,
    /// The answer is a JSON object `{"name": ..., "parameters": {...}}` (Llama 3.1 / 3.2 / 3.3,
    /// whose templates have an `ipython` role).
    Llama3Json,
    /// `[TOOL_CALLS][{"name": ..., "arguments": {...}, "id": "abcDEF123"}, ...]` (Mistral Nemo,
    /// Mistral Small, Mistral 7B v0.3), ids of 9 letters and digits.
    MistralToolCalls,
}

impl ToolSyntax {
    /// The syntax of a template's source (Hermes when it names no other).
    pub fn of_template(source: &str) -> Self {
        if source.contains("<tool_call>") {
            Self::Hermes
        } else if source.contains("<|start_header_id|>ipython<|end_header_id|>") {
            Self::Llama3Json
        } else if source.contains("[TOOL_CALLS]") {
            Self::MistralToolCalls
        } else {
            Self::Hermes
        }
    }

    /// A short name for logs and errors.
    pub fn name(self) -> &'static str {
        match self {
            Self::Hermes => "hermes",
            Self::Llama3Json => "llama3-json",
            Self::MistralToolCalls => "mistral",
        }
    }
}

/// A compiled chat template.
pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: String,
    eos_token: String,
    knows_tools: bool,
    tool_syntax: ToolSyntax,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("bos_token", &self.bos_token)
            .field("eos_token", &self.eos_token)
            .finish_non_exhaustive()
    }
}

impl ChatTemplate {
    /// Compiles `source` (a Hugging Face Jinja chat template). `bos_token` and `eos_token` are
    /// the texts the template sees as `bos_token` / `eos_token`.
    pub fn new(source: &str, bos_token: &str, eos_token: &str) -> Result<Self, ChatTemplateError> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |message: String| -> Result<String, minijinja::Error> {
                Err(minijinja::Error::new(ErrorKind::InvalidOperation, message))
            },
        );
        env.add_function("strftime_now", |format: String| {
            strftime_utc(&format, unix_now_s())
        });
        env.add_template_owned(TEMPLATE_NAME, source.to_string())
            .map_err(ChatTemplateError::Syntax)?;
        Ok(Self {
            env,
            bos_token: bos_token.to_string(),
            eos_token: eos_token.to_string(),
            knows_tools: source.contains("tools") || source.contains("tool_calls"),
            tool_syntax: ToolSyntax::of_template(source),
        })
    }

    /// The template for a model: the file's `tokenizer.chat_template` if any, else the
    /// built-in Gemma 3 template for architecture `gemma3`, else ChatML.
    pub fn for_model(
        file_template: Option<&str>,
        arch: &str,
        bos_token: &str,
        eos_token: &str,
    ) -> Result<Self, ChatTemplateError> {
        let source = match file_template {
            Some(t) if !t.trim().is_empty() => t,
            _ if arch == "gemma3" => GEMMA3_TEMPLATE,
            _ => CHATML_TEMPLATE,
        };
        Self::new(source, bos_token, eos_token)
    }

    /// The standard Gemma 3 chat template
    /// (`<bos><start_of_turn>user\n...<end_of_turn>\n<start_of_turn>model\n`).
    pub fn gemma3_builtin() -> &'static str {
        GEMMA3_TEMPLATE
    }

    /// The ChatML template used when a non-Gemma file has no template.
    pub fn chatml_builtin() -> &'static str {
        CHATML_TEMPLATE
    }

    /// Renders the conversation, ending with the assistant's turn header when
    /// `add_generation_prompt` is set. The text may start with the BOS token's text (Gemma's
    /// template writes it); see [`Self::render_for_encode`].
    pub fn render(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String, ChatTemplateError> {
        self.render_with(messages, None::<&()>, add_generation_prompt)
    }

    /// Whether the template reads `tools` or messages' `tool_calls` (Hugging Face's tool-use
    /// convention); when it does not, a caller offering tools must describe them in the text.
    pub fn knows_tools(&self) -> bool {
        self.knows_tools
    }

    /// The syntax the model writes tool calls in: its family's when the template reads tools,
    /// else Hermes (kvinfer then describes the tools and that syntax in a system message).
    pub fn tool_syntax(&self) -> ToolSyntax {
        if self.knows_tools {
            self.tool_syntax
        } else {
            ToolSyntax::Hermes
        }
    }

    /// As [`Self::render`], with messages of any serializable shape (e.g. with `tool_calls`,
    /// `tool_call_id`) and `tools` in the context as Hugging Face templates expect them.
    pub fn render_with<M: Serialize, T: Serialize>(
        &self,
        messages: &[M],
        tools: Option<&T>,
        add_generation_prompt: bool,
    ) -> Result<String, ChatTemplateError> {
        let template = self
            .env
            .get_template(TEMPLATE_NAME)
            .map_err(ChatTemplateError::Render)?;
        template
            .render(context! {
                messages => messages,
                tools => tools,
                add_generation_prompt => add_generation_prompt,
                bos_token => &self.bos_token,
                eos_token => &self.eos_token,
            })
            .map_err(ChatTemplateError::Render)
    }

    /// Renders for `Tokenizer::encode(text, add_special = true, parse_special = true)`, as
    /// llama.cpp does: when the tokenizer adds BOS (EOS) itself, a BOS (EOS) text the template
    /// wrote at the start (end) is dropped, so it is not there twice.
    pub fn render_for_encode(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
        tokenizer_adds_bos: bool,
        tokenizer_adds_eos: bool,
    ) -> Result<String, ChatTemplateError> {
        let mut text = self.render(messages, add_generation_prompt)?;
        if tokenizer_adds_bos && !self.bos_token.is_empty() && text.starts_with(&self.bos_token) {
            text.drain(..self.bos_token.len());
        }
        if tokenizer_adds_eos && !self.eos_token.is_empty() && text.ends_with(&self.eos_token) {
            text.truncate(text.len() - self.eos_token.len());
        }
        Ok(text)
    }
}

fn unix_now_s() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// Python's `strftime` for the directives chat templates use (`%Y %m %d %B %b %H %M %S %%`),
/// in UTC; other directives are kept as written.
fn strftime_utc(format: &str, unix_s: i64) -> String {
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    let (days, secs) = (unix_s.div_euclid(86_400), unix_s.rem_euclid(86_400));
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let month_name = MONTHS[(month - 1) as usize];

    let mut out = String::with_capacity(format.len() + 8);
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('Y') => out.push_str(&year.to_string()),
            Some('m') => out.push_str(&format!("{month:02}")),
            Some('d') => out.push_str(&format!("{day:02}")),
            Some('B') => out.push_str(month_name),
            Some('b') => out.push_str(&month_name[..3]),
            Some('H') => out.push_str(&format!("{:02}", secs / 3_600)),
            Some('M') => out.push_str(&format!("{:02}", secs % 3_600 / 60)),
            Some('S') => out.push_str(&format!("{:02}", secs % 60)),
            Some('%') => out.push('%'),
            Some(other) => {
                out.push('%');
                out.push(other);
            }
            None => out.push('%'),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tool_syntax_is_the_templates_family() {
        // Fragments of the real templates' sources.
        let qwen = "{%- for tool in tools %}...<tool_call>\n{\"name\": <function-name>}";
        let llama = "{{- \"<|start_header_id|>ipython<|end_header_id|>\\n\\n\" }}{%- if tools %}";
        let mistral = "{%- if tools %}[AVAILABLE_TOOLS]{{ tools|tojson }}[/AVAILABLE_TOOLS]{%- endif %}[TOOL_CALLS]";
        assert_eq!(ToolSyntax::of_template(qwen), ToolSyntax::Hermes);
        assert_eq!(ToolSyntax::of_template(llama), ToolSyntax::Llama3Json);
        assert_eq!(
            ToolSyntax::of_template(mistral),
            ToolSyntax::MistralToolCalls
        );
        assert_eq!(
            ToolSyntax::of_template("{{ messages }}"),
            ToolSyntax::Hermes
        );
        // A template that does not read tools is asked for Hermes' syntax, whatever it names.
        let t = ChatTemplate::new("[TOOL_CALLS]{{ messages[0].content }}", "", "").unwrap();
        assert_eq!(t.tool_syntax(), ToolSyntax::Hermes);
        let t = ChatTemplate::new(mistral, "", "").unwrap();
        assert_eq!(t.tool_syntax(), ToolSyntax::MistralToolCalls);
    }

    /// SmolLM2-135M-Instruct's `tokenizer.chat_template`.
    const SMOLLM2_TEMPLATE: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    fn msgs(turns: &[(&str, &str)]) -> Vec<ChatMessage> {
        turns
            .iter()
            .map(|(r, c)| ChatMessage::new(*r, *c))
            .collect()
    }

    #[test]
    fn smollm2_template_renders_chatml() {
        let t = ChatTemplate::new(SMOLLM2_TEMPLATE, "<|im_start|>", "<|im_end|>").unwrap();
        let m = msgs(&[("system", "Be brief."), ("user", "Hi!")]);
        assert_eq!(
            t.render(&m, true).unwrap(),
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\n"
        );
        assert_eq!(
            t.render(&msgs(&[("user", "Hi!")]), false).unwrap(),
            "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n\
             <|im_start|>user\nHi!<|im_end|>\n"
        );
    }

    #[test]
    fn gemma3_builtin_renders_turns() {
        let t = ChatTemplate::for_model(None, "gemma3", "<bos>", "<eos>").unwrap();
        let m = msgs(&[
            ("system", "Be brief."),
            ("user", "  Hi!\n"),
            ("assistant", "Hello."),
            ("user", "Bye"),
        ]);
        assert_eq!(
            t.render(&m, true).unwrap(),
            "<bos><start_of_turn>user\nBe brief.\n\nHi!<end_of_turn>\n<start_of_turn>model\nHello.<end_of_turn>\n\
             <start_of_turn>user\nBye<end_of_turn>\n<start_of_turn>model\n"
        );
        assert_eq!(
            t.render_for_encode(&msgs(&[("user", "Hi")]), true, true, false)
                .unwrap(),
            "<start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n"
        );
    }

    #[test]
    fn template_exceptions_become_errors() {
        let t = ChatTemplate::new(GEMMA3_TEMPLATE, "<bos>", "<eos>").unwrap();
        let err = t
            .render(&msgs(&[("assistant", "first")]), true)
            .unwrap_err();
        assert!(
            err.to_string()
                .contains("Conversation roles must alternate"),
            "{err}"
        );
        assert!(matches!(
            ChatTemplate::new("{% for %}", "", ""),
            Err(ChatTemplateError::Syntax(_))
        ));
    }

    #[test]
    fn template_is_shareable_across_threads() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<ChatTemplate>();
    }

    #[test]
    fn files_without_template_fall_back_to_chatml() {
        let t = ChatTemplate::for_model(Some(""), "llama", "<s>", "</s>").unwrap();
        assert_eq!(
            t.render(&msgs(&[("user", "Hi")]), true).unwrap(),
            "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
    }

    #[test]
    fn python_string_methods_and_strftime_work() {
        let t = ChatTemplate::new(
            "{{ messages[0]['content'].strip().upper() }}|{{ strftime_now('%Y') | length }}",
            "",
            "",
        )
        .unwrap();
        assert_eq!(
            t.render(&msgs(&[("user", "  hi ")]), false).unwrap(),
            "HI|4"
        );
        assert_eq!(
            strftime_utc("%d %b %Y %H:%M:%S %%", 1_700_000_000),
            "14 Nov 2023 22:13:20 %"
        );
        assert_eq!(strftime_utc("%B %d", 951_782_400), "February 29");
    }
}
