//! The vocabulary as llama.cpp sees it after loading (`llama_vocab::impl::load`): token texts,
//! scores, per-token attributes including llama.cpp's by-text overrides, the end-of-generation
//! set, and the token-to-piece cache.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

use super::{bpe, TokenizerError, TokenizerSpec};

/// Text-to-id map. Building it for a 262k-token vocabulary and the lookups of the merge loops
/// dominate the tokenizer's cost, so it uses a multiply-rotate hash (as rustc's FxHash) instead
/// of SipHash; its keys come from the model file, not from users.
pub(crate) type TokenMap = HashMap<String, u32, BuildHasherDefault<FxHasher>>;

/// FxHash: one rotate, xor and multiply per 8 bytes.
#[derive(Default, Clone, Copy)]
pub(crate) struct FxHasher {
    hash: u64,
}

impl FxHasher {
    const SEED: u64 = 0x51_7c_c1_b7_27_22_0a_95;

    fn add(&mut self, word: u64) {
        self.hash = (self.hash.rotate_left(5) ^ word).wrapping_mul(Self::SEED);
    }
}

impl Hasher for FxHasher {
    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for chunk in &mut chunks {
            let mut word = [0u8; 8];
            word.copy_from_slice(chunk);
            self.add(u64::from_le_bytes(word));
        }
        let rest = chunks.remainder();
        if !rest.is_empty() {
            let mut word = [0u8; 8];
            word[..rest.len()].copy_from_slice(rest);
            self.add(u64::from_le_bytes(word) ^ ((rest.len() as u64) << 59));
        }
    }

    fn write_u8(&mut self, i: u8) {
        self.add(u64::from(i));
    }

    fn write_u32(&mut self, i: u32) {
        self.add(u64::from(i));
    }

    fn write_u64(&mut self, i: u64) {
        self.add(i);
    }

    fn write_usize(&mut self, i: usize) {
        self.add(i as u64);
    }

    fn finish(&self) -> u64 {
        self.hash
    }
}

/// Token attribute bits, as llama.cpp's `llama_token_attr`.
pub(crate) mod attr {
    pub const UNKNOWN: u32 = 1 << 0;
    pub const UNUSED: u32 = 1 << 1;
    pub const NORMAL: u32 = 1 << 2;
    pub const CONTROL: u32 = 1 << 3;
    pub const USER_DEFINED: u32 = 1 << 4;
    pub const BYTE: u32 = 1 << 5;
    /// Whitespace before the token is dropped when it is cut out of the text.
    pub const LSTRIP: u32 = 1 << 7;
    /// Whitespace after the token is dropped when it is cut out of the text.
    pub const RSTRIP: u32 = 1 << 8;
}

/// How normal tokens spell their bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PieceStyle {
    /// GPT-2 byte-level characters (BPE models).
    ByteLevel,
    /// U+2581 stands for a space (SentencePiece models).
    SentencePiece,
}

/// Texts llama.cpp takes for the end-of-turn token when the file names none.
const EOT_TEXTS: &[&str] = &[
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "<|end_of_text|>",
    "<EOT>",
    "_<EOT>",
    "[EOT]",
    "<｜end▁of▁sentence｜>",
    "<end_of_utterance>",
];
const EOM_TEXTS: &[&str] = &["<|eom_id|>"];
const FIM_PRE_TEXTS: &[&str] = &[
    "<|fim_prefix|>",
    "<fim-prefix>",
    "<fim_prefix>",
    "<｜fim▁begin｜>",
    "<PRE>",
    "▁<PRE>",
    "<|code_prefix|>",
    "<|prefix|>",
];
const FIM_SUF_TEXTS: &[&str] = &[
    "<|fim_suffix|>",
    "<fim-suffix>",
    "<fim_suffix>",
    "<｜fim▁hole｜>",
    "<SUF>",
    "▁<SUF>",
    "<|code_suffix|>",
    "<|suffix|>",
];
const FIM_MID_TEXTS: &[&str] = &[
    "<|fim_middle|>",
    "<fim-middle>",
    "<fim_middle>",
    "<｜fim▁end｜>",
    "<MID>",
    "▁<MID>",
    "<|code_middle|>",
    "<|middle|>",
];
const FIM_PAD_TEXTS: &[&str] = &["<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]"];
const FIM_REP_TEXTS: &[&str] = &[
    "<|fim_repo|>",
    "<|repo_name|>",
    "<fim-repo>",
    "<REPO>",
    "<reponame>",
];
const FIM_SEP_TEXTS: &[&str] = &["<|file_sep|>"];
/// Texts llama.cpp always treats as end of generation.
const EOG_TEXTS: &[&str] = &[
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<|return|>",
    "<|call|>",
    "<|flush|>",
    "<|calls|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "</s>",
    "<|eom_id|>",
    "<EOT>",
    "_<EOT>",
    "[EOT]",
    "[EOS]",
    "<|end_of_text|>",
    "<end_of_utterance>",
    "<eos>",
    "<turn|>",
    "<|tool_response>",
    "<｜end▁of▁sentence｜>",
    "[e~[",
];

/// The loaded vocabulary.
///
/// # Invariants
/// `tokens`, `scores` and `attrs` have one entry per id; token texts are unique and non-empty;
/// `piece_offsets` has one more entry than there are tokens.
pub(crate) struct Vocab {
    pub tokens: Vec<String>,
    pub token_to_id: TokenMap,
    pub scores: Vec<f32>,
    pub attrs: Vec<u32>,
    pub bos_id: Option<u32>,
    pub eos_id: Option<u32>,
    pub eot_id: Option<u32>,
    pub unk_id: Option<u32>,
    pub pad_id: Option<u32>,
    /// End-of-generation ids, sorted.
    pub eog_ids: Vec<u32>,
    /// Concatenated pieces (llama.cpp `token_to_piece(.., special = true)`) of all tokens.
    pieces: Vec<u8>,
    piece_offsets: Vec<u32>,
}

impl Vocab {
    pub(crate) fn new(spec: &mut TokenizerSpec, style: PieceStyle) -> Result<Self, TokenizerError> {
        let n_tokens = spec.tokens.len();
        if n_tokens == 0 {
            return Err(TokenizerError::EmptyVocab);
        }
        if n_tokens >= u32::MAX as usize {
            return Err(TokenizerError::VocabTooLarge(n_tokens));
        }
        check_len("scores", &spec.scores, n_tokens)?;
        check_len("token_types", &spec.token_types, n_tokens)?;

        let mut tokens = std::mem::take(&mut spec.tokens);
        let mut token_to_id = TokenMap::with_capacity_and_hasher(n_tokens, Default::default());
        for (id, text) in tokens.iter_mut().enumerate() {
            if text.is_empty() {
                *text = format!("[EMPTY_{id}]");
            }
            if let Some(first) = token_to_id.insert(text.clone(), id as u32) {
                return Err(TokenizerError::DuplicateToken {
                    text: text.clone(),
                    first,
                    second: id as u32,
                });
            }
        }
        let scores = if spec.scores.is_empty() {
            vec![0.0; n_tokens]
        } else {
            spec.scores[..n_tokens].to_vec()
        };
        let mut attrs: Vec<u32> = if spec.token_types.is_empty() {
            vec![attr::NORMAL; n_tokens]
        } else {
            spec.token_types[..n_tokens]
                .iter()
                .map(|&t| type_to_attr(t))
                .collect()
        };

        // llama.cpp ignores special ids past the vocabulary (with a warning).
        let in_range = |id: Option<u32>| id.filter(|&i| (i as usize) < n_tokens);
        let mut vocab = Vocab {
            tokens,
            token_to_id,
            scores,
            attrs: Vec::new(),
            bos_id: in_range(spec.bos_id),
            eos_id: in_range(spec.eos_id),
            eot_id: in_range(spec.eot_id),
            unk_id: in_range(spec.unk_id),
            pad_id: in_range(spec.pad_id),
            eog_ids: Vec::new(),
            pieces: Vec::new(),
            piece_offsets: Vec::new(),
        };
        vocab.eog_ids = vocab.detect_special_tokens(&mut attrs);
        vocab.strip_attrs_by_name(&spec.model_name, &mut attrs);
        vocab.attrs = attrs;
        vocab.build_pieces(style);
        Ok(vocab)
    }

    /// llama.cpp's strip attributes by model name (`llama_vocab::impl::load`): for Phi-3 every
    /// special token swallows the whitespace after it, except `<unk>`, `<s>` and
    /// `<|endoftext|>` (llama.cpp refuses a Phi-3 vocabulary without them; here a missing one is
    /// skipped).
    fn strip_attrs_by_name(&self, model_name: &str, attrs: &mut [u32]) {
        let name = model_name.to_lowercase();
        if !(name.contains("phi-3") || name.contains("phi3")) {
            return;
        }
        for a in attrs.iter_mut() {
            if *a & (attr::CONTROL | attr::USER_DEFINED | attr::UNKNOWN) != 0 {
                *a |= attr::RSTRIP;
            }
        }
        let mut set = |text: &str, on: bool| {
            if let Some(&id) = self.token_to_id.get(text) {
                if on {
                    attrs[id as usize] |= attr::RSTRIP;
                } else {
                    attrs[id as usize] &= !attr::RSTRIP;
                }
            }
        };
        set("</s>", true);
        for t in ["<unk>", "<s>", "<|endoftext|>"] {
            set(t, false);
        }
    }

    /// llama.cpp's "auto-detect special tokens by text": fills in the end-of-turn token, marks
    /// the tokens it recognises as control (even when the file typed them otherwise), marks
    /// control tokens named "unused", and returns the end-of-generation set.
    fn detect_special_tokens(&mut self, attrs: &mut [u32]) -> Vec<u32> {
        // llama.cpp walks a hash map, so with several candidates present it takes an arbitrary
        // one; here the first in list order (for ChatML vocabularies `<|im_end|>`, not
        // `<|endoftext|>`).
        let find = |texts: &[&str]| texts.iter().find_map(|t| self.token_to_id.get(*t).copied());
        let mut mark_control = |id: Option<u32>| {
            if let Some(id) = id {
                attrs[id as usize] |= attr::CONTROL;
            }
        };
        if self.eot_id.is_none() {
            self.eot_id = find(EOT_TEXTS);
            mark_control(self.eot_id);
        }
        let eom_id = find(EOM_TEXTS);
        mark_control(eom_id);
        for texts in [FIM_PRE_TEXTS, FIM_SUF_TEXTS, FIM_MID_TEXTS] {
            mark_control(find(texts));
        }
        let fim_pad = find(FIM_PAD_TEXTS);
        let fim_rep = find(FIM_REP_TEXTS);
        let fim_sep = find(FIM_SEP_TEXTS);
        for id in [fim_pad, fim_rep, fim_sep] {
            mark_control(id);
        }

        for (text, a) in self.tokens.iter().zip(attrs.iter_mut()) {
            if *a & attr::CONTROL != 0 && text.contains("unused") {
                *a |= attr::UNUSED;
            }
        }

        let mut eog: Vec<u32> = [fim_pad, fim_rep, fim_sep].into_iter().flatten().collect();
        for &text in EOG_TEXTS {
            if let Some(&id) = self.token_to_id.get(text) {
                eog.push(id);
                attrs[id as usize] |= attr::CONTROL;
            }
        }
        // gpt-oss: these are always rendered.
        for text in ["<|channel|>", "<|message|>", "<|start|>", "<|constrain|>"] {
            if let Some(&id) = self.token_to_id.get(text) {
                attrs[id as usize] = attr::USER_DEFINED;
            }
        }
        eog.extend([self.eos_id, self.eot_id, eom_id].into_iter().flatten());
        eog.sort_unstable();
        eog.dedup();

        let snapshot = eog.clone();
        let id_of = |text: &str| {
            snapshot
                .iter()
                .copied()
                .find(|&id| self.tokens[id as usize] == text)
        };
        // o200k_harmony and solar-open: "<|end|>" ends a message, not the generation.
        let has = |text: &str| id_of(text).is_some();
        if let Some(end) = id_of("<|end|>") {
            let has_call = has("<|call|>") || has("<|calls|>");
            if has_call && (has("<|return|>") || has("<|flush|>")) {
                eog.retain(|&id| id != end);
                attrs[end as usize] = attr::USER_DEFINED;
            }
        }
        // gemma4 and plamo have a normal "</s>", unlike paddleocr.
        if let (Some(s), true) = (
            id_of("</s>"),
            has("<|tool_response>") || has("<|plamo:eos|>"),
        ) {
            eog.retain(|&id| id != s);
            attrs[s as usize] = attr::NORMAL;
        }
        eog
    }

    fn build_pieces(&mut self, style: PieceStyle) {
        let mut pieces = Vec::with_capacity(self.tokens.iter().map(String::len).sum());
        let mut offsets = Vec::with_capacity(self.tokens.len() + 1);
        offsets.push(0u32);
        for (text, &a) in self.tokens.iter().zip(&self.attrs) {
            append_piece(text, a, style, &mut pieces);
            offsets.push(pieces.len() as u32);
        }
        self.pieces = pieces;
        self.piece_offsets = offsets;
    }

    /// llama.cpp's `token_to_piece(id, special = true)`: also renders control tokens.
    pub(crate) fn piece(&self, id: u32) -> &[u8] {
        let i = id as usize;
        match (self.piece_offsets.get(i), self.piece_offsets.get(i + 1)) {
            (Some(&start), Some(&end)) => &self.pieces[start as usize..end as usize],
            _ => &[],
        }
    }
}

fn check_len<T>(what: &'static str, values: &[T], n_tokens: usize) -> Result<(), TokenizerError> {
    if !values.is_empty() && values.len() < n_tokens {
        return Err(TokenizerError::ShortArray {
            what,
            len: values.len(),
            n_tokens,
        });
    }
    Ok(())
}

/// GGUF `tokenizer.ggml.token_type` (llama.cpp `llama_token_type`) to attribute bits.
fn type_to_attr(token_type: i32) -> u32 {
    match token_type {
        1 => attr::NORMAL,
        2 => attr::UNKNOWN,
        3 => attr::CONTROL,
        4 => attr::USER_DEFINED,
        5 => attr::UNUSED,
        6 => attr::BYTE,
        _ => 0, // undefined: never rendered
    }
}

/// Appends the piece of one token (llama.cpp `token_to_piece` with `special = true`).
fn append_piece(text: &str, a: u32, style: PieceStyle, out: &mut Vec<u8>) {
    if a & (attr::UNKNOWN | attr::CONTROL | attr::USER_DEFINED) != 0 {
        out.extend_from_slice(text.as_bytes());
    } else if a & attr::NORMAL != 0 {
        match style {
            PieceStyle::SentencePiece => {
                for (i, part) in text.split('\u{2581}').enumerate() {
                    if i > 0 {
                        out.push(b' ');
                    }
                    out.extend_from_slice(part.as_bytes());
                }
            }
            PieceStyle::ByteLevel => {
                for c in text.chars() {
                    match bpe::char_to_byte(c) {
                        Some(b) => out.push(b),
                        None => {
                            // llama.cpp's `llama_decode_text` marks characters outside the
                            // byte-level alphabet this way.
                            let mut buf = [0u8; 4];
                            out.extend_from_slice(b"[UNK_BYTE_0x");
                            for b in c.encode_utf8(&mut buf).bytes() {
                                out.extend_from_slice(format!("{b:02x}").as_bytes());
                            }
                            out.extend_from_slice(text.as_bytes());
                            out.push(b']');
                        }
                    }
                }
            }
        }
    } else if a & attr::BYTE != 0 {
        // "<0xXX>"
        if let Some(b) = text
            .get(3..5)
            .and_then(|hex| u8::from_str_radix(hex, 16).ok())
        {
            out.push(b);
        }
    }
    // Unused or undefined tokens render as nothing.
}
