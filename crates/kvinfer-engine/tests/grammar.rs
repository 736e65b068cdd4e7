//! Constrained decoding in the engine loop: output follows the grammar (a JSON schema, any JSON
//! object, a Lark grammar) whatever the sampler draws, alone and batched, and greedy output
//! under a grammar is the same batched as alone.

mod common;

use common::tiny;
use kvinfer_engine::{
    start_engine, CacheOptions, EngineConfig, EngineHandle, EngineRequest, Event, FinishReason,
    GrammarSpec, SamplingParams,
};
use kvinfer_model::testing::TinyArch;
use serde_json::{json, Value};

fn engine(arch: TinyArch) -> EngineHandle {
    let (model, _) = tiny(arch, 3);
    let config = EngineConfig {
        cache: CacheOptions {
            num_blocks: Some(256),
            block_size: 4,
            ..CacheOptions::default()
        },
        max_batch_tokens: 64,
        max_running: 16,
        ctx_size: 0,
        max_waiting: 256,
    };
    start_engine(model, config, |f| f()).unwrap().0
}

fn request(
    h: &EngineHandle,
    spec: &GrammarSpec,
    prompt: &[u32],
    temperature: f32,
) -> EngineRequest {
    EngineRequest {
        prompt_ids: prompt.to_vec(),
        max_tokens: 400,
        sampling: SamplingParams {
            temperature,
            seed: prompt.len() as u64,
            ..SamplingParams::greedy()
        },
        stop: vec![],
        n: 2,
        ignore_eos: false,
        min_tokens: 0,
        logprobs: None,
        grammar: Some(h.grammar_compiler().unwrap().compile(spec).unwrap()),
    }
}

/// Text and finish reason per choice.
fn outputs(
    rx: tokio::sync::mpsc::UnboundedReceiver<Event>,
    n: usize,
) -> Vec<(String, FinishReason)> {
    let mut rx = rx;
    let mut text = vec![String::new(); n];
    let mut reasons = vec![None; n];
    while let Some(e) = rx.blocking_recv() {
        match e {
            Event::Text { index, text: t } => text[index].push_str(&t),
            Event::Done {
                index,
                finish_reason,
            } => reasons[index] = Some(finish_reason),
            Event::Error(e) => panic!("request failed: {e}"),
            _ => {}
        }
    }
    text.into_iter()
        .zip(reasons)
        .map(|(t, r)| (t, r.expect("every choice ends")))
        .collect()
}

fn schema() -> Value {
    json!({
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 6},
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
            "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3},
            "ok": {"type": "boolean"}
        },
        "required": ["name", "age", "tags", "ok"],
        "additionalProperties": false
    })
}

fn check_person(text: &str) {
    let v: Value = serde_json::from_str(text).unwrap_or_else(|e| panic!("{text:?}: {e}"));
    let o = v.as_object().expect("an object");
    assert_eq!(o.len(), 4, "{text}");
    assert!(o["name"].as_str().unwrap().chars().count() <= 6, "{text}");
    assert!((0..=120).contains(&o["age"].as_i64().unwrap()), "{text}");
    let tags = o["tags"].as_array().unwrap();
    assert!(
        tags.len() <= 3
            && tags
                .iter()
                .all(|t| ["a", "b", "c"].contains(&t.as_str().unwrap()))
    );
    assert!(o["ok"].is_boolean(), "{text}");
}

fn prompts() -> Vec<Vec<u32>> {
    (0..8)
        .map(|r| {
            (0..(5 + r * 3))
                .map(|i| ((i * 13 + r * 7) % 200) as u32 + 4)
                .collect()
        })
        .collect()
}

#[test]
fn sampled_output_follows_the_schema_batched() {
    for arch in [TinyArch::Llama, TinyArch::Gemma3] {
        let h = engine(arch);
        let spec = GrammarSpec::JsonSchema(schema());
        // Eight requests of two choices each at temperature 1, all in flight at once.
        let rxs: Vec<_> = prompts()
            .iter()
            .map(|p| h.submit(request(&h, &spec, p, 1.0)).unwrap())
            .collect();
        for rx in rxs {
            for (text, reason) in outputs(rx, 2) {
                assert_eq!(reason, FinishReason::Stop, "{arch:?}: {text:?}");
                check_person(&text);
            }
        }
        assert!(h.stats().grammar.count > 0, "mask time is recorded");
    }
}

#[test]
fn greedy_output_under_a_grammar_is_the_same_batched_as_alone() {
    let h = engine(TinyArch::Llama);
    let spec = GrammarSpec::JsonSchema(schema());
    let alone: Vec<_> = prompts()
        .iter()
        .map(|p| outputs(h.submit(request(&h, &spec, p, 0.0)).unwrap(), 2))
        .collect();
    let rxs: Vec<_> = prompts()
        .iter()
        .map(|p| h.submit(request(&h, &spec, p, 0.0)).unwrap())
        .collect();
    for (rx, want) in rxs.into_iter().zip(alone) {
        let got = outputs(rx, 2);
        assert_eq!(got, want);
        check_person(&got[0].0);
    }
}

#[test]
fn json_object_and_lark_grammars() {
    let h = engine(TinyArch::Llama);
    for p in prompts().iter().take(4) {
        for (text, reason) in outputs(
            h.submit(request(&h, &GrammarSpec::JsonObject, p, 1.0))
                .unwrap(),
            2,
        ) {
            // A bounded budget may cut an object short; a stopped one must parse.
            if reason == FinishReason::Stop {
                let v: Value =
                    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{text:?}: {e}"));
                assert!(v.is_object(), "{text}");
            } else {
                assert!(text.starts_with('{'), "{text}");
            }
        }
        let lark = GrammarSpec::Lark(r#"start: ("yes" | "no") "!""#.into());
        for (text, reason) in outputs(h.submit(request(&h, &lark, p, 1.0)).unwrap(), 2) {
            assert!(text == "yes!" || text == "no!", "{text:?}");
            assert_eq!(reason, FinishReason::Stop);
        }
    }
}

#[test]
fn a_bad_grammar_is_refused_at_compile_time() {
    let h = engine(TinyArch::Llama);
    let c = h.grammar_compiler().unwrap();
    assert!(c
        .compile(&GrammarSpec::JsonSchema(json!(["not", "a", "schema"])))
        .is_err());
    assert!(c
        .compile(&GrammarSpec::JsonSchema(json!({"type": "no-such-type"})))
        .is_err());
    assert!(c.compile(&GrammarSpec::Lark("start: (".into())).is_err());
}

/// Every number in `text` (outside strings), as (integer, fraction, exponent) digit counts.
fn number_digits(text: &str) -> Vec<(usize, usize, usize)> {
    let (mut out, mut in_str, mut esc) = (Vec::new(), false, false);
    let b = text.as_bytes();
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        if in_str {
            (esc, in_str) = match (esc, c) {
                (true, _) => (false, true),
                (false, b'\\') => (true, true),
                (false, b'"') => (false, false),
                _ => (false, true),
            };
        } else if c == b'"' {
            in_str = true;
        } else if c == b'-' || c.is_ascii_digit() {
            let mut parts = [0usize; 3];
            let mut part = 0;
            while i < b.len() {
                match b[i] {
                    d if d.is_ascii_digit() => parts[part] += 1,
                    b'.' => part = 1,
                    b'e' | b'E' => part = 2,
                    b'-' | b'+' => {}
                    _ => break,
                }
                i += 1;
            }
            out.push((parts[0], parts[1], parts[2]));
            continue;
        }
        i += 1;
    }
    out
}

#[test]
fn json_numbers_are_bounded_unless_the_schema_asks_for_more() {
    use kvinfer_engine::json_numbers::{MAX_EXP_DIGITS, MAX_FRAC_DIGITS, MAX_INT_DIGITS};
    let h = engine(TinyArch::Llama);
    let numbers = GrammarSpec::JsonSchema(json!({
        "type": "object",
        "properties": {"xs": {"type": "array", "items": {"type": "number"}, "minItems": 3}},
        "required": ["xs"],
    }));
    let mut seen = 0;
    for spec in [GrammarSpec::JsonObject, numbers] {
        for p in prompts().iter().take(4) {
            for (text, reason) in outputs(h.submit(request(&h, &spec, p, 1.5)).unwrap(), 2) {
                let digits = number_digits(&text);
                for &(i, f, e) in &digits {
                    assert!(
                        i <= MAX_INT_DIGITS as usize
                            && f <= MAX_FRAC_DIGITS as usize
                            && e <= MAX_EXP_DIGITS as usize,
                        "{text}"
                    );
                }
                seen += digits.len();
                if reason == FinishReason::Stop {
                    let v: Value =
                        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{text:?}: {e}"));
                    assert!(v.is_object(), "{text}");
                }
            }
        }
    }
    assert!(seen >= 3, "the schema's numbers were written");
    // A schema that asks for a longer number gets it.
    let big = GrammarSpec::JsonSchema(json!({"type": "integer", "minimum": 1e17}));
    for (text, reason) in outputs(h.submit(request(&h, &big, &prompts()[0], 1.0)).unwrap(), 2) {
        if reason == FinishReason::Stop {
            let v: f64 = text.parse().unwrap_or_else(|e| panic!("{text:?}: {e}"));
            assert!(v >= 1e17, "{text}");
        }
    }
}

#[test]
fn schemas_that_cannot_be_followed_are_refused_at_compile_time_without_parser_state() {
    let h = engine(TinyArch::Llama);
    let c = h.grammar_compiler().unwrap();
    let cycle = json!({
        "$defs": {"a": {"$ref": "#/$defs/b"}, "b": {"$ref": "#/$defs/a"}},
        "$ref": "#/$defs/a"
    });
    let self_all_of =
        json!({"$defs": {"x": {"allOf": [{"$ref": "#/$defs/x"}]}}, "$ref": "#/$defs/x"});
    let props: serde_json::Map<String, Value> = (0..5000)
        .map(|i| {
            (
                format!("p{i:05}"),
                json!({"type": "string", "description": "a property ".repeat(40)}),
            )
        })
        .collect();
    let wide = json!({"type": "object", "properties": props, "required": ["p00000"]});
    let props: serde_json::Map<String, Value> = (0..600)
        .map(|i| (format!("p{i}"), json!({"type": "integer"})))
        .collect();
    let many = json!({"type": "object", "properties": {"inner": {"properties": props}}});
    for (what, schema) in [
        ("cycle", cycle),
        ("allOf", self_all_of),
        ("wide", wide),
        ("many", many),
    ] {
        let e = c
            .compile(&GrammarSpec::JsonSchema(schema))
            .err()
            .unwrap_or_else(|| panic!("{what} compiled"));
        assert!(e.len() < 400, "{what}: {e}");
        assert!(
            !e.contains("NoExtensionBias") && !e.contains("row"),
            "{what}: {e}"
        );
    }
}
