//! Constrained decoding: a grammar (a JSON schema, any JSON object, or a Lark grammar) compiled
//! by llguidance against the model's vocabulary. The engine asks the grammar for the set of
//! allowed tokens before each sample and feeds it the token chosen; a choice ends when the
//! grammar can take nothing more.
//!
//! Compiling is done by the caller (the server, off its async threads) so that a bad schema is
//! a 400 before the request is queued; the engine only masks and advances.

use crate::json_numbers::Lex;
use kvinfer_model::Model;
use llguidance::api::TopLevelGrammar;
use llguidance::toktrie::{self, SimpleVob, TokEnv, TokRxInfo, TokTrie, TokenizerEnv};
use llguidance::{Matcher, ParserFactory};
use serde_json::{json, Value};
use std::sync::Arc;

/// What output must look like.
#[derive(Debug, Clone, PartialEq)]
pub enum GrammarSpec {
    /// Any JSON object (`response_format: {"type": "json_object"}`).
    JsonObject,
    /// JSON valid under this schema (`response_format: {"type": "json_schema", ...}`).
    JsonSchema(Value),
    /// A Lark grammar in llguidance's dialect (may embed `%json {schema}`).
    Lark(String),
}

/// Compiles grammars for one model's vocabulary (built once; compiling a grammar then takes
/// about a millisecond to tens of milliseconds, by its size).
pub struct GrammarCompiler {
    factory: ParserFactory,
    vocab: Arc<Vocab>,
}

/// Every token's bytes, and the tokens that hold an ASCII digit (the only ones that can
/// lengthen a number: see [`crate::json_numbers`]).
struct Vocab {
    words: Vec<Vec<u8>>,
    digits: Vec<u32>,
}

impl std::fmt::Debug for GrammarCompiler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GrammarCompiler").finish_non_exhaustive()
    }
}

/// The model's tokenizer as llguidance sees it: every token's bytes in a trie (control tokens
/// as 0xFF + their text, llguidance's convention), end-of-generation tokens as its EOS set.
struct Env {
    trie: TokTrie,
    model: Arc<Model>,
}

impl TokenizerEnv for Env {
    fn tok_trie(&self) -> &TokTrie {
        &self.trie
    }

    fn tokenize_bytes(&self, s: &[u8]) -> Vec<toktrie::TokenId> {
        self.model
            .tokenizer
            .encode(&String::from_utf8_lossy(s), false, false)
    }

    fn tokenize_is_canonical(&self) -> bool {
        // Forced tokens are not used; do not let llguidance rely on re-tokenization.
        false
    }
}

impl GrammarCompiler {
    /// Builds the token trie of `model`'s tokenizer over its output width (which may exceed
    /// the tokenizer's vocabulary: the extra ids are never allowed). Tens of milliseconds for a
    /// 50k vocabulary, a few hundred for 262k.
    pub fn new(model: Arc<Model>) -> Result<Self, String> {
        let tokenizer = &model.tokenizer;
        let vocab = model.config.vocab_size;
        let eog = tokenizer.eog_ids().to_vec();
        let Some(&eos) = eog.first() else {
            return Err(
                "the model has no end-of-generation token to end constrained output".into(),
            );
        };
        let words: Vec<Vec<u8>> = (0..vocab as u32)
            .map(|id| {
                if (id as usize) >= tokenizer.vocab_size() {
                    return Vec::new();
                }
                let bytes = tokenizer.token_bytes(id);
                if !bytes.is_empty() {
                    return bytes.to_vec();
                }
                let piece = tokenizer.token_piece(id, true);
                if piece.is_empty() {
                    Vec::new()
                } else {
                    let mut w = vec![TokTrie::SPECIAL_TOKEN_MARKER];
                    w.extend_from_slice(piece);
                    w
                }
            })
            .collect();
        let mut info = TokRxInfo::new(vocab as u32, eos);
        info.tok_bos = tokenizer.bos_id();
        info.tok_end_of_turn = tokenizer.eot_id();
        let trie = TokTrie::from(&info, &words).with_eos_tokens(&eog);
        let env: TokEnv = Arc::new(Env { trie, model });
        let mut factory = ParserFactory::new_simple(&env).map_err(|e| e.to_string())?;
        factory.quiet();
        // Errors go to clients: never llguidance's parser state or the grammar in them.
        factory.limits_mut().verbose_errors = false;
        let digits = (0..words.len() as u32)
            .filter(|&t| words[t as usize].iter().any(u8::is_ascii_digit))
            .collect();
        let vocab = Arc::new(Vocab { words, digits });
        Ok(Self { factory, vocab })
    }

    /// Compiles `spec` into a fresh constraint (an error names what is wrong with it).
    pub fn compile(&self, spec: &GrammarSpec) -> Result<Constraint, String> {
        // JSON answers get bounded numbers; a Lark grammar says itself what it allows.
        let json = !matches!(spec, GrammarSpec::Lark(_));
        let grammar = match spec {
            GrammarSpec::JsonObject => {
                TopLevelGrammar::from_json_schema(compact(json!({"type": "object"})))
            }
            GrammarSpec::JsonSchema(s) => {
                if !s.is_object() && !s.is_boolean() {
                    return Err("the schema must be a JSON object".into());
                }
                check_size(s)?;
                TopLevelGrammar::from_json_schema(compact(s.clone()))
            }
            GrammarSpec::Lark(g) => TopLevelGrammar::from_lark(g.clone()),
        };
        let parser = self
            .factory
            .create_parser(grammar)
            .map_err(|e| e.to_string())?;
        let matcher = Matcher::new(Ok(parser));
        if let Some(e) = matcher.get_error() {
            return Err(e);
        }
        // The first mask, on a copy: a grammar that admits no text at all (a `$ref` cycle with
        // no way out, a self-referencing `allOf`) fails here, before the request is queued,
        // not mid-stream.
        let mut probe = matcher.clone();
        match probe.compute_mask() {
            Ok(m) if !m.is_zero() => {}
            _ => return Err("it admits no output (is there a $ref cycle with no way out?)".into()),
        }
        Ok(Constraint {
            matcher,
            numbers: json.then(|| Numbers {
                vocab: self.vocab.clone(),
                lex: Lex::Outside,
            }),
        })
    }
}

/// The largest JSON schema accepted, in bytes of JSON text.
pub const MAX_SCHEMA_BYTES: usize = 512 << 10;
/// The most properties one object of a schema may list: a mask step's work grows with the
/// properties still possible, and past this a step can stall the running batch.
pub const MAX_PROPERTIES: usize = 500;

/// Refuses schemas past [`MAX_SCHEMA_BYTES`] or with an object past [`MAX_PROPERTIES`].
fn check_size(schema: &Value) -> Result<(), String> {
    let bytes = serde_json::to_vec(schema).map_or(usize::MAX, |v| v.len());
    if bytes > MAX_SCHEMA_BYTES {
        return Err(format!(
            "the schema is {bytes} bytes; the limit is {MAX_SCHEMA_BYTES}"
        ));
    }
    fn widest(v: &Value) -> usize {
        match v {
            Value::Object(o) => {
                let here = o
                    .get("properties")
                    .and_then(Value::as_object)
                    .map_or(0, |p| p.len());
                o.values().map(widest).max().unwrap_or(0).max(here)
            }
            Value::Array(a) => a.iter().map(widest).max().unwrap_or(0),
            _ => 0,
        }
    }
    let w = widest(schema);
    if w > MAX_PROPERTIES {
        return Err(format!(
            "an object of the schema lists {w} properties; the limit is {MAX_PROPERTIES}"
        ));
    }
    Ok(())
}

/// JSON without free whitespace (one space after `,` and `:`): a small model given free
/// whitespace can fill its whole budget with newlines. A schema's own `x-guidance` wins.
fn compact(mut schema: Value) -> Value {
    if let Some(o) = schema.as_object_mut() {
        o.entry("x-guidance").or_insert_with(
            || json!({"whitespace_flexible": false, "item_separator": ", ", "key_separator": ": "}),
        );
    }
    schema
}

/// One choice's grammar state: which tokens may come next.
#[derive(Clone)]
pub struct Constraint {
    matcher: Matcher,
    /// Bounds numbers in JSON output (None for Lark grammars).
    numbers: Option<Numbers>,
}

/// Where the JSON written so far ends, to bound its numbers.
#[derive(Clone)]
struct Numbers {
    vocab: Arc<Vocab>,
    lex: Lex,
}

impl Numbers {
    /// Takes out of `m` the tokens that would make a number longer than the bound, unless
    /// nothing else is allowed (the schema itself asks for a longer number).
    fn bound(&self, m: &mut SimpleVob) {
        let over: Vec<u32> = (self.vocab.digits.iter().copied())
            .filter(|&t| m.is_allowed(t))
            .filter(|&t| self.lex.run(&self.vocab.words[t as usize]).is_none())
            .collect();
        for &t in &over {
            m.disallow_token(t);
        }
        if m.is_zero() {
            for &t in &over {
                m.allow_token(t);
            }
        }
    }

    fn consume(&mut self, token: u32) {
        let word = self.vocab.words.get(token as usize).map_or(&[][..], |w| w);
        // Past the bound only when the grammar allowed nothing else: the number stays at it.
        self.lex = word.iter().fold(self.lex, |s, &b| s.step(b).unwrap_or(s));
    }
}

impl std::fmt::Debug for Constraint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Constraint")
            .field("stopped", &self.matcher.is_stopped())
            .finish()
    }
}

/// The tokens a constraint allows next.
pub struct Mask(SimpleVob);

impl Mask {
    /// Whether `token` may come next.
    pub fn allows(&self, token: u32) -> bool {
        self.0.is_allowed(token)
    }
}

impl Constraint {
    /// The tokens allowed next (end-of-generation tokens when the grammar is complete).
    pub fn mask(&mut self) -> Result<Mask, String> {
        let mut m = self
            .matcher
            .compute_mask_or_eos()
            .map_err(|e| format!("grammar: {e}"))?;
        if let Some(n) = &self.numbers {
            n.bound(&mut m);
        }
        if m.is_zero() {
            return Err("grammar: no token can continue the output".into());
        }
        Ok(Mask(m))
    }

    /// Advances by the sampled `token`.
    pub fn consume(&mut self, token: u32) -> Result<(), String> {
        self.matcher
            .consume_token(token)
            .map_err(|e| format!("grammar: {e}"))?;
        if let Some(n) = &mut self.numbers {
            n.consume(token);
        }
        Ok(())
    }

    /// The grammar is complete and takes nothing more: the choice ends here.
    pub fn is_stopped(&self) -> bool {
        self.matcher.is_stopped()
    }

    /// Whether output could end here (the grammar is complete).
    pub fn is_accepting(&mut self) -> bool {
        self.matcher.is_accepting().unwrap_or(false)
    }
}
