//! Text to token ids and back, id for id as llama.cpp does it.
//!
//! The reference is llama.cpp's `src/llama-vocab.cpp`: `llama_tokenize(text, add_special,
//! parse_special)` and `llama_token_to_piece(id, special)`. Two tokenizer models are supported,
//! chosen by GGUF `tokenizer.ggml.model`:
//!
//! - `"gpt2"`: byte-level BPE with merges and a pre-tokenizer chosen by `tokenizer.ggml.pre`
//!   (`bpe.rs`; SmolLM2 uses `"smollm"`);
//! - `"llama"`: SentencePiece BPE by token score with byte fallback (`spm.rs`; Gemma 3).
//!
//! Encoding runs in two steps, as in llama.cpp: special tokens are cut out of the text first
//! (`special.rs`), then each remaining raw-text fragment goes through the model. The vocabulary
//! (`vocab.rs`) applies llama.cpp's load-time fix-ups (tokens it recognises by text become control
//! tokens; the end-of-generation set), since those change both encoding and decoding.
//!
//! The `tokenizers` crate provides the regex engine of the BPE pre-tokenizer; the merge loops are
//! written out here because the GGUF data differs from what `tokenizers` models expect (SPM files
//! have scores, not merges) and because llama.cpp's fallbacks must be matched exactly.
//!
//! `tests/tokenizer_llamacpp.rs` checks SmolLM2 and Gemma 3 against llama.cpp's ids on the
//! committed corpus. Known differences from llama.cpp, none of which affects those two models:
//! - llama.cpp picks the end-of-turn token among several candidates in hash-map order; here the
//!   first of its list wins (`<|im_end|>` before `<|endoftext|>`). Both are end-of-generation
//!   either way.
//! - llama.cpp sets lstrip/rstrip attributes on special tokens for a few models by name; here
//!   only Phi-3's (its architecture is supported; Jina and ModernBERT are not).
//! - Special tokens of equal length are tried in id order (llama.cpp: unspecified `std::sort`
//!   order); this matters only when one such token's end is another's start.
//! - A vocabulary without a byte token for some byte makes llama.cpp's SPM throw; here that byte
//!   becomes `<unk>` (or is dropped without one).

mod bpe;
mod special;
mod spm;
mod vocab;

use special::{Fragment, SpecialTokens};
use vocab::{attr, PieceStyle, Vocab};

/// Why a tokenizer could not be built.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    /// `tokenizer.ggml.model` names a tokenizer kvinfer does not implement.
    #[error("unsupported tokenizer model '{0}' (tokenizer.ggml.model); kvinfer supports 'gpt2' (byte-level BPE) and 'llama' (SentencePiece)")]
    UnsupportedModel(String),
    /// `tokenizer.ggml.pre` names a BPE pre-tokenizer kvinfer does not implement.
    #[error("unsupported BPE pre-tokenizer '{0}' (tokenizer.ggml.pre); supported: smollm, starcoder, gpt-2, llama3/llama-bpe, qwen2, default and their aliases")]
    UnsupportedPreTokenizer(String),
    /// The vocabulary has no tokens.
    #[error("the vocabulary is empty (tokenizer.ggml.tokens has no entries)")]
    EmptyVocab,
    /// The vocabulary does not fit 32-bit token ids.
    #[error("the vocabulary has {0} tokens, more than 32-bit token ids can address")]
    VocabTooLarge(usize),
    /// A per-token array is shorter than the vocabulary.
    #[error("tokenizer {what} has {len} entries but the vocabulary has {n_tokens} tokens")]
    ShortArray {
        /// Which array.
        what: &'static str,
        /// Its length.
        len: usize,
        /// The vocabulary size.
        n_tokens: usize,
    },
    /// Two ids have the same text (llama.cpp refuses such a vocabulary too).
    #[error("duplicate token in vocabulary: {text:?} has ids {first} and {second}")]
    DuplicateToken {
        /// The repeated text.
        text: String,
        /// The first id with it.
        first: u32,
        /// The second id with it.
        second: u32,
    },
    /// The file asks for a BOS/EOS token to be added but names none.
    #[error("tokenizer.ggml.{flag} is true, but {id_key} is not set or out of range")]
    MissingSpecialToken {
        /// The add flag, e.g. `add_bos_token`.
        flag: &'static str,
        /// The id key, e.g. `bos_token_id`.
        id_key: &'static str,
    },
    /// A pre-tokenizer regex failed to compile.
    #[error("pre-tokenizer regex failed to compile: {0}")]
    Regex(String),
    /// A required GGUF metadata key is absent or has the wrong type.
    #[error("GGUF metadata key {0} is missing or has the wrong type")]
    MissingKey(&'static str),
}

/// Everything the tokenizer needs, as read from the GGUF metadata (`tokenizer.ggml.*`).
#[derive(Debug, Clone, Default)]
pub struct TokenizerSpec {
    /// `tokenizer.ggml.model`: `"gpt2"` or `"llama"`.
    pub model: String,
    /// `tokenizer.ggml.pre`; BPE only.
    pub pre: Option<String>,
    /// `tokenizer.ggml.tokens`, indexed by id.
    pub tokens: Vec<String>,
    /// `tokenizer.ggml.scores`; empty if absent (then all 0).
    pub scores: Vec<f32>,
    /// `tokenizer.ggml.token_type`; empty if absent (then all normal). 1 normal, 2 unknown,
    /// 3 control, 4 user-defined, 5 unused, 6 byte.
    pub token_types: Vec<i32>,
    /// `tokenizer.ggml.merges` ("left right"); BPE only.
    pub merges: Vec<String>,
    /// `tokenizer.ggml.bos_token_id`.
    pub bos_id: Option<u32>,
    /// `tokenizer.ggml.eos_token_id`.
    pub eos_id: Option<u32>,
    /// `tokenizer.ggml.unknown_token_id`.
    pub unk_id: Option<u32>,
    /// `tokenizer.ggml.padding_token_id`.
    pub pad_id: Option<u32>,
    /// `tokenizer.ggml.eot_token_id`; when `None` it is found by text as llama.cpp does.
    pub eot_id: Option<u32>,
    /// `tokenizer.ggml.add_bos_token`.
    pub add_bos: bool,
    /// `tokenizer.ggml.add_eos_token`.
    pub add_eos: bool,
    /// `tokenizer.ggml.add_space_prefix`; SentencePiece only.
    pub add_space_prefix: bool,
    /// `general.name`: llama.cpp sets strip attributes on special tokens by model name.
    pub model_name: String,
}

impl TokenizerSpec {
    /// Reads the tokenizer metadata of a GGUF file, with llama.cpp's defaults for absent keys.
    pub fn from_gguf(file: &crate::gguf::GgufFile) -> Result<Self, TokenizerError> {
        let model = file
            .get_str("tokenizer.ggml.model")
            .ok_or(TokenizerError::MissingKey("tokenizer.ggml.model"))?
            .to_string();
        let tokens = file
            .get_str_array("tokenizer.ggml.tokens")
            .ok_or(TokenizerError::MissingKey("tokenizer.ggml.tokens"))?;
        let is_spm = model == "llama";
        let merges = match file.get_str_array("tokenizer.ggml.merges") {
            Some(merges) => merges,
            None if model == "gpt2" => {
                return Err(TokenizerError::MissingKey("tokenizer.ggml.merges"))
            }
            None => Vec::new(),
        };
        let pre = file.get_str("tokenizer.ggml.pre").map(str::to_string);
        // llama.cpp's defaults when the keys are absent (llama_vocab::impl::load).
        let (bos, eos, unk) = match model.as_str() {
            "llama" => (Some(1), Some(2), Some(0)),
            "gpt2" => (Some(11), Some(11), None),
            _ => (None, None, None),
        };
        let default_add_bos = is_spm
            || matches!(
                pre.as_deref(),
                Some(
                    "llama3"
                        | "llama-v3"
                        | "llama-bpe"
                        | "falcon3"
                        | "falcon-h1"
                        | "pixtral"
                        | "midm-2.0"
                        | "lfm2"
                        | "tekken"
                )
            );
        let id = |key: &str, default: Option<u32>| match file.get_u32(key) {
            Some(id) if (id as usize) < tokens.len() => Some(id),
            _ => default.filter(|&d| (d as usize) < tokens.len()),
        };
        Ok(Self {
            pre,
            scores: file
                .get_f32_array("tokenizer.ggml.scores")
                .unwrap_or_default(),
            token_types: file
                .get_i32_array("tokenizer.ggml.token_type")
                .unwrap_or_default(),
            merges,
            bos_id: id("tokenizer.ggml.bos_token_id", bos),
            eos_id: id("tokenizer.ggml.eos_token_id", eos),
            unk_id: id("tokenizer.ggml.unknown_token_id", unk),
            pad_id: id("tokenizer.ggml.padding_token_id", None),
            eot_id: id("tokenizer.ggml.eot_token_id", None),
            add_bos: file
                .get_bool("tokenizer.ggml.add_bos_token")
                .unwrap_or(default_add_bos),
            add_eos: file
                .get_bool("tokenizer.ggml.add_eos_token")
                .unwrap_or(false),
            add_space_prefix: file
                .get_bool("tokenizer.ggml.add_space_prefix")
                .unwrap_or(is_spm),
            model_name: file.get_str("general.name").unwrap_or_default().to_string(),
            tokens,
            model,
        })
    }
}

enum Model {
    Bpe(bpe::BpeModel),
    Spm(spm::SpmModel),
}

/// A tokenizer that reproduces llama.cpp's token ids. Cheap to share: all methods take `&self`.
pub struct Tokenizer {
    vocab: Vocab,
    model: Model,
    special: SpecialTokens,
    add_bos: bool,
    add_eos: bool,
    add_space_prefix: bool,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field(
                "model",
                &match self.model {
                    Model::Bpe(_) => "bpe",
                    Model::Spm(_) => "spm",
                },
            )
            .field("vocab_size", &self.vocab.tokens.len())
            .field("bos_id", &self.vocab.bos_id)
            .field("eos_id", &self.vocab.eos_id)
            .field("eog_ids", &self.vocab.eog_ids)
            .finish()
    }
}

impl Tokenizer {
    /// Builds the tokenizer (for a 262k-token vocabulary this takes a few tens of milliseconds).
    pub fn from_spec(mut spec: TokenizerSpec) -> Result<Self, TokenizerError> {
        let style = match spec.model.as_str() {
            "gpt2" => PieceStyle::ByteLevel,
            "llama" => PieceStyle::SentencePiece,
            other => return Err(TokenizerError::UnsupportedModel(other.to_string())),
        };
        let vocab = Vocab::new(&mut spec, style)?;
        let model = match style {
            PieceStyle::ByteLevel => {
                let n_vocab = vocab.tokens.len() as u32;
                Model::Bpe(bpe::BpeModel::new(
                    spec.pre.as_deref(),
                    &spec.merges,
                    &vocab.token_to_id,
                    n_vocab,
                )?)
            }
            PieceStyle::SentencePiece => {
                Model::Spm(spm::SpmModel::new(&vocab.token_to_id, vocab.unk_id))
            }
        };
        if spec.add_bos && vocab.bos_id.is_none() {
            return Err(TokenizerError::MissingSpecialToken {
                flag: "add_bos_token",
                id_key: "bos_token_id",
            });
        }
        if spec.add_eos && vocab.eos_id.is_none() {
            return Err(TokenizerError::MissingSpecialToken {
                flag: "add_eos_token",
                id_key: "eos_token_id",
            });
        }
        let special = SpecialTokens::new(&vocab);
        Ok(Self {
            vocab,
            model,
            special,
            add_bos: spec.add_bos,
            // BPE models never add a space prefix in llama.cpp.
            add_space_prefix: spec.add_space_prefix && style == PieceStyle::SentencePiece,
            add_eos: spec.add_eos,
        })
    }

    /// `llama_tokenize(text, add_special, parse_special)`.
    ///
    /// `add_special` adds BOS/EOS as the file asks (`add_bos_token` / `add_eos_token`);
    /// `parse_special` lets control tokens written in the text (e.g. `<|im_start|>`) become
    /// their ids. User-defined tokens are always matched.
    pub fn encode(&self, text: &str, add_special: bool, parse_special: bool) -> Vec<u32> {
        let fragments = self.special.partition(text, parse_special, &self.vocab);
        let mut out = Vec::with_capacity(text.len() / 3 + 2);
        if add_special && self.add_bos {
            out.extend(self.vocab.bos_id);
        }
        match &self.model {
            Model::Bpe(bpe) => {
                for fragment in fragments {
                    match fragment {
                        Fragment::Text(range) => {
                            bpe.tokenize(&text[range], &self.vocab.token_to_id, &mut out)
                        }
                        Fragment::Token(id) => out.push(id),
                    }
                }
            }
            Model::Spm(spm) => {
                // A space is put before raw text at the start and after a special token.
                let mut after_special = true;
                for fragment in fragments {
                    match fragment {
                        Fragment::Text(range) => {
                            let prefix = if self.add_space_prefix && after_special {
                                " "
                            } else {
                                ""
                            };
                            let escaped =
                                format!("{prefix}{}", &text[range]).replace(' ', "\u{2581}");
                            spm.tokenize(
                                &escaped,
                                &self.vocab.token_to_id,
                                &self.vocab.scores,
                                &mut out,
                            );
                            after_special = false;
                        }
                        Fragment::Token(id) => {
                            out.push(id);
                            after_special = true;
                        }
                    }
                }
            }
        }
        if add_special && self.add_eos {
            out.extend(self.vocab.eos_id);
        }
        out
    }

    /// The bytes of one token as `llama_token_to_piece(id, special = false)` gives them:
    /// control and unknown tokens (BOS, `<|im_end|>`, ...) give nothing, unknown ids too.
    /// A multi-byte character may be split across tokens; join bytes before decoding UTF-8.
    pub fn token_bytes(&self, id: u32) -> &[u8] {
        self.token_piece(id, false)
    }

    /// `llama_token_to_piece(id, special)`: with `special`, control tokens render as their text.
    pub fn token_piece(&self, id: u32, special: bool) -> &[u8] {
        match self.vocab.attrs.get(id as usize) {
            Some(&a) if special || a & (attr::CONTROL | attr::UNKNOWN) == 0 => self.vocab.piece(id),
            _ => &[],
        }
    }

    /// The text of `ids` (lossy UTF-8 of their concatenated [`Self::token_bytes`]).
    pub fn decode(&self, ids: &[u32]) -> String {
        let mut bytes = Vec::with_capacity(ids.len() * 4);
        for &id in ids {
            bytes.extend_from_slice(self.token_bytes(id));
        }
        String::from_utf8_lossy(&bytes).into_owned()
    }

    /// Whether generation stops at `id` (llama.cpp's end-of-generation set: EOS, EOT and the
    /// tokens it recognises by text, such as `<|im_end|>` and `<end_of_turn>`).
    pub fn is_eog(&self, id: u32) -> bool {
        self.vocab.eog_ids.binary_search(&id).is_ok()
    }

    /// The end-of-generation ids, ascending.
    pub fn eog_ids(&self) -> &[u32] {
        &self.vocab.eog_ids
    }

    /// The BOS id, if the vocabulary has one.
    pub fn bos_id(&self) -> Option<u32> {
        self.vocab.bos_id
    }

    /// The EOS id, if the vocabulary has one.
    pub fn eos_id(&self) -> Option<u32> {
        self.vocab.eos_id
    }

    /// The end-of-turn id: from the file, else found by text (`<|im_end|>`, `<end_of_turn>`, ...).
    pub fn eot_id(&self) -> Option<u32> {
        self.vocab.eot_id
    }

    /// The padding id, if the file names one.
    pub fn pad_id(&self) -> Option<u32> {
        self.vocab.pad_id
    }

    /// Whether `encode(.., add_special = true, ..)` puts BOS first.
    pub fn adds_bos(&self) -> bool {
        self.add_bos
    }

    /// Number of tokens in the vocabulary.
    pub fn vocab_size(&self) -> usize {
        self.vocab.tokens.len()
    }

    /// The vocabulary text of `id` as stored in the file (byte-level or `▁`-escaped); "" for
    /// an id outside the vocabulary.
    pub fn token_text(&self, id: u32) -> &str {
        self.vocab
            .tokens
            .get(id as usize)
            .map_or("", String::as_str)
    }

    /// The id whose vocabulary text is exactly `text`.
    pub fn token_id(&self, text: &str) -> Option<u32> {
        self.vocab.token_to_id.get(text).copied()
    }

    /// Whether `id` is a control token (after llama.cpp's by-text fix-ups).
    pub fn is_control(&self, id: u32) -> bool {
        self.vocab
            .attrs
            .get(id as usize)
            .is_some_and(|&a| a & attr::CONTROL != 0)
    }
}

#[cfg(test)]
mod tests;
