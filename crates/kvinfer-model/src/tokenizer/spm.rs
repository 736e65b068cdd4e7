//! SentencePiece BPE (GGUF `tokenizer.ggml.model = "llama"`), after llama.cpp's
//! `llm_tokenizer_spm_session`.
//!
//! The GGUF file carries a score per token, not a merge list: starting from single UTF-8
//! characters, the adjacent pair whose concatenation is the vocabulary token with the highest
//! score is merged first (ties: leftmost). Symbols that end up outside the vocabulary are emitted
//! as byte tokens `<0xXX>`.
//!
//! llama.cpp's `resegment` also consults a reverse-merge map for final symbols that are not
//! tokens; every key of that map is a vocabulary token, so the lookup can never succeed there and
//! the byte fallback is the only path taken. It is omitted here.

use std::collections::BinaryHeap;

use super::vocab::TokenMap;

/// What the SPM merge loop needs from the vocabulary.
pub(crate) struct SpmModel {
    /// Token id for each byte: `<0xXX>`, else the one-character token, else `<unk>`.
    byte_tokens: [Option<u32>; 256],
}

impl SpmModel {
    pub(crate) fn new(token_to_id: &TokenMap, unk_id: Option<u32>) -> Self {
        let mut byte_tokens = [None; 256];
        for (b, slot) in byte_tokens.iter_mut().enumerate() {
            let hex = format!("<0x{b:02X}>");
            let single = (b < 0x80).then(|| (b as u8 as char).to_string());
            *slot = token_to_id
                .get(&hex)
                .or_else(|| single.and_then(|s| token_to_id.get(&s)))
                .copied()
                .or(unk_id);
        }
        Self { byte_tokens }
    }

    /// Tokenizes `text`, whose spaces are already escaped to U+2581, appending to `out`.
    pub(crate) fn tokenize(
        &self,
        text: &str,
        token_to_id: &TokenMap,
        scores: &[f32],
        out: &mut Vec<u32>,
    ) {
        if text.is_empty() {
            return;
        }
        // One symbol per UTF-8 character, as byte ranges of `text` linked in a list.
        let mut symbols: Vec<Symbol> = Vec::with_capacity(text.len());
        for (start, c) in text.char_indices() {
            let i = symbols.len() as i32;
            let len = c.len_utf8();
            symbols.push(Symbol {
                start,
                len,
                prev: i - 1,
                next: if start + len == text.len() { -1 } else { i + 1 },
            });
        }

        let mut queue = BinaryHeap::new();
        let score_of = |id: u32| scores.get(id as usize).copied().unwrap_or(0.0);
        let try_add =
            |symbols: &[Symbol], left: i32, right: i32, queue: &mut BinaryHeap<Bigram>| {
                if left < 0 || right < 0 {
                    return;
                }
                let (l, r) = (&symbols[left as usize], &symbols[right as usize]);
                let size = l.len + r.len;
                if let Some(&id) = token_to_id.get(&text[l.start..l.start + size]) {
                    queue.push(Bigram {
                        score: score_of(id),
                        left,
                        right,
                        size,
                    });
                }
            };
        for i in 1..symbols.len() as i32 {
            try_add(&symbols, i - 1, i, &mut queue);
        }
        while let Some(bigram) = queue.pop() {
            let (l, r) = (bigram.left as usize, bigram.right as usize);
            // Skip pairs made stale by an earlier merge: a symbol's length only ever grows.
            if symbols[l].len == 0
                || symbols[r].len == 0
                || symbols[l].len + symbols[r].len != bigram.size
            {
                continue;
            }
            symbols[l].len += symbols[r].len;
            symbols[r].len = 0;
            let next = symbols[r].next;
            symbols[l].next = next;
            if next >= 0 {
                symbols[next as usize].prev = bigram.left;
            }
            try_add(&symbols, symbols[l].prev, bigram.left, &mut queue);
            try_add(&symbols, bigram.left, next, &mut queue);
        }

        let mut i = 0i32;
        while i >= 0 {
            let sym = &symbols[i as usize];
            let piece = &text[sym.start..sym.start + sym.len];
            match token_to_id.get(piece) {
                Some(&id) => out.push(id),
                None => out.extend(piece.bytes().filter_map(|b| self.byte_tokens[b as usize])),
            }
            i = sym.next;
        }
    }
}

struct Symbol {
    start: usize,
    /// Byte length; 0 once merged into the symbol on its left.
    len: usize,
    prev: i32,
    next: i32,
}

/// A candidate merge. The heap pops the highest score, then the leftmost pair
/// (llama.cpp's `llm_bigram_spm::comparator`).
struct Bigram {
    score: f32,
    left: i32,
    right: i32,
    size: usize,
}

impl Ord for Bigram {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.score
            .total_cmp(&other.score)
            .then_with(|| other.left.cmp(&self.left))
    }
}

impl PartialOrd for Bigram {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl PartialEq for Bigram {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other).is_eq()
    }
}

impl Eq for Bigram {}
