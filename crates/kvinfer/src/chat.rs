//! `kvinfer chat`: interactive multi-turn chat. Each turn renders the whole conversation with the
//! chat template and reuses the KV cache for the part of it the previous turns already computed.

use crate::cli::ChatArgs;
use crate::load::{kv_cache, load_model, sampling};
use anyhow::{Context, Result};
use kvinfer_engine::{generate_tiered, GenerateRequest};
use kvinfer_model::chat::ChatMessage;
use std::io::{BufRead, IsTerminal, Write};

pub fn run(a: ChatArgs) -> Result<()> {
    let model = load_model(&a.model)?;
    let template = model.chat_template.as_ref().context(
        "this model file has no chat template; use `kvinfer generate --prompt` for raw text",
    )?;
    let tok = &model.tokenizer;
    // Earlier turns stay in the prefix cache: each turn's prompt reuses their full blocks.
    let (mut kv, tiers) = kv_cache(&model, &a.model)?;
    let ctx = a.model.ctx_size.min(model.config.context_length);
    let mut messages: Vec<ChatMessage> = Vec::new();
    if let Some(s) = &a.system {
        messages.push(ChatMessage {
            role: "system".into(),
            content: s.clone(),
        });
    }
    let interactive = std::io::stdin().is_terminal();
    let dim = |s: &str| {
        if interactive {
            format!("\x1b[2m{s}\x1b[0m")
        } else {
            s.to_string()
        }
    };
    if interactive {
        eprintln!(
            "{}",
            dim(&format!(
                "chatting with {} — /reset clears, /exit or Ctrl-D quits",
                model.name
            ))
        );
    }
    let stdin = std::io::stdin();
    let mut lines = stdin.lock().lines();
    loop {
        if interactive {
            eprint!("> ");
        }
        let Some(line) = lines.next() else { break };
        let line = line.context("reading stdin")?;
        let line = line.trim();
        match line {
            "" => continue,
            "/exit" | "/quit" => break,
            "/reset" => {
                messages.retain(|m| m.role == "system");
                eprintln!("{}", dim("(conversation cleared)"));
                continue;
            }
            _ => {}
        }
        messages.push(ChatMessage {
            role: "user".into(),
            content: line.to_string(),
        });
        let text = template.render(&messages, true)?;
        let prompt_ids = tok.encode(&text, false, true);
        if prompt_ids.len() + 1 >= ctx {
            messages.pop();
            eprintln!(
                "error: the conversation is {} tokens, the context holds {ctx}; /reset to start over",
                prompt_ids.len(),
            );
            continue;
        }
        let req = GenerateRequest {
            prompt_ids: prompt_ids.clone(),
            max_tokens: a.max_tokens,
            sampling: sampling(&a.sampling),
            stop: a.sampling.stop.clone(),
            ignore_eos: false,
            use_kv_cache: true,
            prefix_cache: true,
            ctx_size: ctx,
        };
        let stdout = std::io::stdout();
        let out = match generate_tiered(&model, &mut kv, tiers.as_deref(), &req, |t| {
            let mut s = stdout.lock();
            let _ = s.write_all(t.as_bytes());
            let _ = s.flush();
            true
        }) {
            Ok(o) => o,
            Err(e) => {
                // The conversation goes on: say what failed and drop the unanswered message.
                messages.pop();
                eprintln!("error: {e}");
                continue;
            }
        };
        writeln!(std::io::stdout())?;
        let reused = out.timings.cached_tokens;
        if a.stats || interactive {
            let from_tiers = match out.timings.tier_tokens {
                0 => String::new(),
                n => format!(" ({n} of them loaded from the tiers)"),
            };
            eprintln!(
                "{}",
                dim(&format!(
                    "prompt {} tokens, reused {} from cache, TTFT {:.0} ms, {} tokens at {:.1} tok/s{from_tiers}",
                    prompt_ids.len(),
                    reused,
                    out.timings.prefill_ms,
                    out.ids.len(),
                    out.timings.decode_tok_s()
                ))
            );
        }
        messages.push(ChatMessage {
            role: "assistant".into(),
            content: out.text.trim().to_string(),
        });
    }
    Ok(())
}
