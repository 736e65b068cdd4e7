//! Byte-level BPE (GGUF `tokenizer.ggml.model = "gpt2"`), after llama.cpp's
//! `llm_tokenizer_bpe_session`.
//!
//! A raw-text fragment is first split into words by the pre-tokenizer regexes of the file's
//! `tokenizer.ggml.pre` (llama.cpp's `llm_tokenizer_bpe` table, run with the `tokenizers` crate's
//! regex engine); each word is then merged by merge rank. Words are handled as raw bytes: the
//! byte-level alphabet maps every byte to exactly one vocabulary character, so "one symbol per
//! character of the byte-encoded word" (llama.cpp) is "one symbol per byte" here.
//!
//! Merges are keyed by symbol ids rather than strings. A merge whose parts or result are not in
//! the vocabulary still takes part (as llama.cpp allows) through *virtual* ids numbered from the
//! vocabulary size; a word that ends on a virtual symbol falls back to the ids of its single
//! ASCII bytes, as llama.cpp's final `text_to_token` loop does.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::hash::BuildHasherDefault;
use std::ops::Range;

use tokenizers::utils::SysRegex;

use super::vocab::{FxHasher, TokenMap};
use super::TokenizerError;

type MergeMap = HashMap<(u32, u32), (u32, u32), BuildHasherDefault<FxHasher>>;

/// GPT-2's pre-tokenizer regex. llama.cpp runs it through a hand-written matcher
/// (`unicode_regex_split_custom_gpt2`) that implements exactly this expression.
const GPT2_REGEX: &str =
    r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+";
/// Llama 3's pre-tokenizer regex, as in its `tokenizer.json`.
const LLAMA3_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Mistral's Tekken (Nemo, Small 3, Pixtral) pre-tokenizer regex as llama.cpp runs it: its
/// rewrite of the `tokenizer.json` one, where "uppercase" is a letter other than a-z and
/// "lowercase" a letter other than A-Z (so every non-ASCII letter is both).
const TEKKEN_REGEX: &str = r"[^
\p{L}\p{N}]?((?=[\p{L}])([^a-z]))*((?=[\p{L}])([^A-Z]))+|[^
\p{L}\p{N}]?((?=[\p{L}])([^a-z]))+((?=[\p{L}])([^A-Z]))*|\p{N}| ?[^\s\p{L}\p{N}]+[
/]*|\s*[
]+|\s+(?!\S)|\s+";
/// Qwen 2's pre-tokenizer regex, as in its `tokenizer.json`.
const QWEN2_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// How llama.cpp pre-tokenizes for a given `tokenizer.ggml.pre`.
struct PreTokenizer {
    /// Applied in order; each splits every current piece into its matches and the gaps between.
    regexes: &'static [&'static str],
    /// Whole words found in the vocabulary skip the merges (llama.cpp `ignore_merges`).
    ignore_merges: bool,
}

fn pre_tokenizer_for(pre: Option<&str>) -> Result<PreTokenizer, TokenizerError> {
    let p = |regexes, ignore_merges| {
        Ok(PreTokenizer {
            regexes,
            ignore_merges,
        })
    };
    match pre.unwrap_or("default") {
        // LLAMA_VOCAB_PRE_TYPE_SMOLLM and the types sharing its regexes: digits one by one, then GPT-2.
        "smollm" | "starcoder" | "refact" | "command-r" | "codeshell" | "exaone" | "minerva-7b" => {
            p(&[r"\p{N}", GPT2_REGEX], false)
        }
        "gpt-2" | "phi-2" | "jina-es" | "jina-de" | "gigachat" | "jina-v2-es" | "jina-v2-de"
        | "mpt" | "olmo" | "jais" | "trillion" | "granite-docling" | "exaone4" | "a.x-4.0"
        | "mellum" | "modern-bert" => p(&[GPT2_REGEX], false),
        "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "falcon-h1" | "pixtral" | "midm-2.0"
        | "lfm2" | "dbrx" | "smaug-bpe" => p(&[LLAMA3_REGEX], true),
        "qwen2" | "deepseek-r1-qwen" | "megrez" | "stablelm2" => p(&[QWEN2_REGEX], false),
        "tekken" => p(&[TEKKEN_REGEX], true),
        "default" => p(
            &[
                r"[\p{P}\$\+<=>\^~\|]+",
                GPT2_REGEX,
                r"\p{N}+",
                r"[0-9][0-9][0-9]",
            ],
            false,
        ),
        other => Err(TokenizerError::UnsupportedPreTokenizer(other.to_string())),
    }
}

/// The GPT-2 byte-level alphabet: the vocabulary character standing for each byte.
pub(crate) fn byte_to_char(byte: u8) -> char {
    BYTE_CHARS[byte as usize]
}

/// The byte a byte-level vocabulary character stands for, if it is one.
pub(crate) fn char_to_byte(c: char) -> Option<u8> {
    let cp = c as u32;
    // Every byte-level character is below U+0144 (256 + 68).
    if cp < 0x144 {
        let b = CHAR_BYTES[cp as usize];
        (b >= 0).then_some(b as u8)
    } else {
        None
    }
}

const fn is_printable_byte(b: usize) -> bool {
    (b >= 0x21 && b <= 0x7E) || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF)
}

static BYTE_CHARS: [char; 256] = {
    let mut table = ['\0'; 256];
    let mut n = 0u32;
    let mut b = 0;
    while b < 256 {
        table[b] = if is_printable_byte(b) {
            match char::from_u32(b as u32) {
                Some(c) => c,
                None => '\0',
            }
        } else {
            let c = match char::from_u32(256 + n) {
                Some(c) => c,
                None => '\0',
            };
            n += 1;
            c
        };
        b += 1;
    }
    table
};

static CHAR_BYTES: [i16; 0x144] = {
    let mut table = [-1i16; 0x144];
    let mut b = 0;
    while b < 256 {
        table[BYTE_CHARS[b] as usize] = b as i16;
        b += 1;
    }
    table
};

/// A byte-level BPE model: pre-tokenizer regexes plus the merge table.
pub(crate) struct BpeModel {
    regexes: Vec<SysRegex>,
    ignore_merges: bool,
    /// Number of real vocabulary ids; ids at or above it are virtual (see module docs).
    n_vocab: u32,
    /// Texts of the virtual ids, indexed by `id - n_vocab`.
    virtual_texts: Vec<String>,
    /// Symbol id of each byte's byte-level character.
    byte_symbols: [u32; 256],
    /// (left id, right id) -> (rank, merged id). The first of duplicate merges wins, as in llama.cpp.
    merges: MergeMap,
    /// Ids of the one-byte ASCII tokens, for the fallback of words ending on virtual symbols.
    ascii_ids: [Option<u32>; 128],
}

impl BpeModel {
    pub(crate) fn new(
        pre: Option<&str>,
        merges: &[String],
        token_to_id: &TokenMap,
        n_vocab: u32,
    ) -> Result<Self, TokenizerError> {
        let pre = pre_tokenizer_for(pre)?;
        let regexes = pre
            .regexes
            .iter()
            .map(|r| SysRegex::new(r).map_err(|e| TokenizerError::Regex(format!("{r}: {e}"))))
            .collect::<Result<Vec<_>, _>>()?;

        let mut interner = Interner {
            token_to_id,
            n_vocab,
            virtual_ids: HashMap::new(),
            virtual_texts: Vec::new(),
        };
        let mut byte_symbols = [0u32; 256];
        for (b, slot) in byte_symbols.iter_mut().enumerate() {
            *slot = interner.id(&byte_to_char(b as u8).to_string());
        }
        let mut merge_map = MergeMap::with_capacity_and_hasher(merges.len(), Default::default());
        for (rank, merge) in merges.iter().enumerate() {
            // llama.cpp splits at the first space after the first byte.
            let Some(pos) = merge.bytes().skip(1).position(|b| b == b' ').map(|p| p + 1) else {
                continue;
            };
            let (left, right) = (&merge[..pos], &merge[pos + 1..]);
            let key = (interner.id(left), interner.id(right));
            let merged = interner.id(&format!("{left}{right}"));
            merge_map.entry(key).or_insert((rank as u32, merged));
        }
        let mut ascii_ids = [None; 128];
        for (b, slot) in ascii_ids.iter_mut().enumerate() {
            *slot = token_to_id.get(&(b as u8 as char).to_string()).copied();
        }
        Ok(Self {
            regexes,
            ignore_merges: pre.ignore_merges,
            n_vocab,
            virtual_texts: interner.virtual_texts,
            byte_symbols,
            merges: merge_map,
            ascii_ids,
        })
    }

    /// Tokenizes one raw-text fragment, appending to `out`.
    pub(crate) fn tokenize(&self, text: &str, token_to_id: &TokenMap, out: &mut Vec<u32>) {
        for word in self.split_words(text) {
            self.tokenize_word(&text.as_bytes()[word], token_to_id, out);
        }
    }

    /// Byte ranges of the pre-tokenizer's words, in order, covering all of `text`.
    pub(crate) fn split_words(&self, text: &str) -> Vec<Range<usize>> {
        if text.is_empty() {
            return Vec::new();
        }
        let mut pieces: Vec<Range<usize>> = std::iter::once(0..text.len()).collect();
        for regex in &self.regexes {
            let mut next = Vec::with_capacity(pieces.len() * 2);
            for piece in pieces {
                let s = &text[piece.clone()];
                let mut last = 0;
                // A regex engine error (e.g. its backtrack limit) ends the matches early; the rest
                // of the piece then stays one word, as in the `tokenizers` crate.
                for (start, end) in regex.find_iter(s) {
                    if start == end {
                        continue;
                    }
                    if start > last {
                        next.push(piece.start + last..piece.start + start);
                    }
                    next.push(piece.start + start..piece.start + end);
                    last = end;
                }
                if last < s.len() {
                    next.push(piece.start + last..piece.end);
                }
            }
            pieces = next;
        }
        pieces
    }

    fn tokenize_word(&self, word: &[u8], token_to_id: &TokenMap, out: &mut Vec<u32>) {
        if word.is_empty() {
            return;
        }
        if self.ignore_merges {
            let encoded: String = word.iter().map(|&b| byte_to_char(b)).collect();
            if let Some(&id) = token_to_id.get(&encoded) {
                out.push(id);
                return;
            }
        }

        // One symbol per byte, linked in a list; merged-away symbols are marked dead.
        let mut symbols: Vec<Symbol> = word
            .iter()
            .enumerate()
            .map(|(i, &b)| Symbol {
                id: self.byte_symbols[b as usize],
                prev: i as i32 - 1,
                next: if i + 1 == word.len() {
                    -1
                } else {
                    i as i32 + 1
                },
                alive: true,
            })
            .collect();
        // Lowest rank first, then leftmost: llama.cpp's `llm_bigram_bpe::comparator`.
        let mut queue: BinaryHeap<Reverse<Bigram>> = BinaryHeap::new();
        for i in 1..symbols.len() {
            self.push_bigram(&symbols, i as i32 - 1, i as i32, &mut queue);
        }
        while let Some(Reverse(bigram)) = queue.pop() {
            let (l, r) = (bigram.left as usize, bigram.right as usize);
            // Skip a pair made stale by an earlier merge.
            if !symbols[l].alive
                || !symbols[r].alive
                || symbols[l].id != bigram.left_id
                || symbols[r].id != bigram.right_id
            {
                continue;
            }
            symbols[l].id = bigram.merged_id;
            symbols[r].alive = false;
            let next = symbols[r].next;
            symbols[l].next = next;
            if next >= 0 {
                symbols[next as usize].prev = l as i32;
            }
            self.push_bigram(&symbols, symbols[l].prev, l as i32, &mut queue);
            self.push_bigram(&symbols, l as i32, next, &mut queue);
        }

        let mut i = 0i32;
        while i >= 0 {
            let sym = &symbols[i as usize];
            if sym.id < self.n_vocab {
                out.push(sym.id);
            } else {
                let text = &self.virtual_texts[(sym.id - self.n_vocab) as usize];
                out.extend(
                    text.bytes()
                        .filter_map(|b| self.ascii_ids.get(b as usize).copied().flatten()),
                );
            }
            i = sym.next;
        }
    }

    fn push_bigram(
        &self,
        symbols: &[Symbol],
        left: i32,
        right: i32,
        queue: &mut BinaryHeap<Reverse<Bigram>>,
    ) {
        if left < 0 || right < 0 {
            return;
        }
        let (left_id, right_id) = (symbols[left as usize].id, symbols[right as usize].id);
        if let Some(&(rank, merged_id)) = self.merges.get(&(left_id, right_id)) {
            queue.push(Reverse(Bigram {
                rank,
                left,
                right,
                left_id,
                right_id,
                merged_id,
            }));
        }
    }
}

struct Symbol {
    id: u32,
    prev: i32,
    next: i32,
    alive: bool,
}

/// A candidate merge; ordered by (rank, left position) so the heap pops llama.cpp's choice.
#[derive(PartialEq, Eq, PartialOrd, Ord)]
struct Bigram {
    rank: u32,
    left: i32,
    right: i32,
    left_id: u32,
    right_id: u32,
    merged_id: u32,
}

/// Gives every string a symbol id: its vocabulary id, or a virtual id past the vocabulary.
struct Interner<'a> {
    token_to_id: &'a TokenMap,
    n_vocab: u32,
    virtual_ids: HashMap<String, u32>,
    virtual_texts: Vec<String>,
}

impl Interner<'_> {
    fn id(&mut self, text: &str) -> u32 {
        if let Some(&id) = self.token_to_id.get(text) {
            return id;
        }
        if let Some(&id) = self.virtual_ids.get(text) {
            return id;
        }
        let id = self.n_vocab + self.virtual_texts.len() as u32;
        self.virtual_texts.push(text.to_string());
        self.virtual_ids.insert(text.to_string(), id);
        id
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_level_alphabet_is_a_bijection() {
        let mut seen = std::collections::HashSet::new();
        for b in 0..=255u8 {
            let c = byte_to_char(b);
            assert!(seen.insert(c), "byte {b} maps to a repeated char");
            assert_eq!(char_to_byte(c), Some(b));
        }
        assert_eq!(byte_to_char(b' '), 'Ġ');
        assert_eq!(byte_to_char(b'\n'), 'Ċ');
        assert_eq!(byte_to_char(b'a'), 'a');
        assert_eq!(char_to_byte('€'), None);
    }

    fn words(pre: &str, text: &str) -> Vec<String> {
        let model = BpeModel::new(Some(pre), &[], &TokenMap::default(), 0).unwrap();
        model
            .split_words(text)
            .into_iter()
            .map(|r| text[r].to_string())
            .collect()
    }

    #[test]
    fn smollm_pre_tokenizer_isolates_digits_then_splits_like_gpt2() {
        assert_eq!(words("smollm", "Hello world"), ["Hello", " world"]);
        assert_eq!(
            words("smollm", "year 2024!"),
            ["year", " ", "2", "0", "2", "4", "!"]
        );
        assert_eq!(
            words("smollm", "I'm   here\n\n"),
            ["I", "'m", "  ", " here", "\n\n"]
        );
        assert_eq!(words("smollm", "a²b"), ["a", "²", "b"]);
        assert!(words("smollm", "").is_empty());
        // Tekken: case changes split words; every non-ASCII letter counts as both cases (as in
        // llama.cpp's rewrite); digits one by one.
        assert_eq!(
            words("tekken", "HelloWorld ÉtéWORLD 123"),
            ["Hello", "World", " Été", "WORLD", " ", "1", "2", "3"]
        );
        assert_eq!(words("tekken", "a/b\n\nc"), ["a", "/b", "\n\n", "c"]);
    }

    #[test]
    fn unknown_pre_tokenizer_is_an_error() {
        let err = BpeModel::new(Some("no-such-pre"), &[], &TokenMap::default(), 0)
            .err()
            .unwrap();
        assert!(err.to_string().contains("no-such-pre"), "{err}");
    }
}
