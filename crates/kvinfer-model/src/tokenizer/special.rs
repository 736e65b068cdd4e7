//! Splitting special tokens out of the text before the model tokenizer runs, after llama.cpp's
//! `tokenizer_st_partition`.
//!
//! llama.cpp takes the special tokens (control, user-defined and unknown types) longest first
//! and, for each, cuts every occurrence out of the text fragments that are still raw, left to
//! right. Control and unknown tokens take part only when `parse_special` is set; user-defined
//! tokens always do. The order matters: with tokens `bcd` and `ab`, the text `abcd` becomes
//! `a` + `bcd`, not `ab` + `cd`.
//!
//! Scanning the text once per special token is slow for big vocabularies (Gemma 3 has about
//! 6,400), so a byte trie first finds which special tokens occur at all; only those are then
//! cut out, in llama.cpp's order.
//!
//! Ties between tokens of equal length are broken by id here. llama.cpp sorts with `std::sort`,
//! which leaves their order unspecified; it matters only for two equal-length tokens where the
//! end of one is the start of the other, which neither supported model has.

use std::ops::Range;

use super::vocab::{attr, Vocab};

/// A piece of the input: raw text still to tokenize, or a special token already cut out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Fragment {
    Text(Range<usize>),
    Token(u32),
}

const NO_TOKEN: u32 = u32::MAX;

struct TrieNode {
    /// (byte, child node index), sorted by byte.
    children: Vec<(u8, u32)>,
    /// Rank (index into `SpecialTokens::by_rank`) of the token ending here, or `NO_TOKEN`.
    rank: u32,
}

/// The special tokens of a vocabulary, in llama.cpp's partition order.
pub(crate) struct SpecialTokens {
    /// Token ids, longest text first.
    by_rank: Vec<u32>,
    /// Byte trie over the token texts; node 0 is the root.
    trie: Vec<TrieNode>,
}

impl SpecialTokens {
    pub(crate) fn new(vocab: &Vocab) -> Self {
        let mut by_rank: Vec<u32> = (0..vocab.tokens.len() as u32)
            .filter(|&id| {
                vocab.attrs[id as usize] & (attr::CONTROL | attr::USER_DEFINED | attr::UNKNOWN) != 0
            })
            .collect();
        by_rank.sort_by_key(|&id| (std::cmp::Reverse(vocab.tokens[id as usize].len()), id));

        let mut trie = vec![TrieNode {
            children: Vec::new(),
            rank: NO_TOKEN,
        }];
        for (rank, &id) in by_rank.iter().enumerate() {
            let mut node = 0usize;
            for &b in vocab.tokens[id as usize].as_bytes() {
                node = match trie[node].children.binary_search_by_key(&b, |&(c, _)| c) {
                    Ok(i) => trie[node].children[i].1 as usize,
                    Err(i) => {
                        let child = trie.len();
                        trie.push(TrieNode {
                            children: Vec::new(),
                            rank: NO_TOKEN,
                        });
                        trie[node].children.insert(i, (b, child as u32));
                        child
                    }
                };
            }
            // Token texts are unique and non-empty (see `Vocab::new`), so this is the only token here.
            trie[node].rank = rank as u32;
        }
        Self { by_rank, trie }
    }

    /// Splits `text` into raw-text fragments and special tokens.
    pub(crate) fn partition(
        &self,
        text: &str,
        parse_special: bool,
        vocab: &Vocab,
    ) -> Vec<Fragment> {
        if text.is_empty() {
            return Vec::new();
        }
        let mut fragments = vec![Fragment::Text(0..text.len())];
        for rank in self.ranks_present(text.as_bytes(), parse_special, vocab) {
            let id = self.by_rank[rank as usize];
            let needle = vocab.tokens[id as usize].as_str();
            let mut next = Vec::with_capacity(fragments.len() + 2);
            for fragment in fragments {
                let Fragment::Text(range) = fragment else {
                    next.push(fragment);
                    continue;
                };
                let mut start = range.start;
                let token_attr = vocab.attrs[id as usize];
                // llama.cpp's `isspace` (ASCII whitespace, vertical tab included).
                let space = |b: u8| b == b' ' || (b'\t'..=b'\r').contains(&b);
                // Matches of a whole UTF-8 string in UTF-8 text fall on character boundaries,
                // so all slicing below is in bounds and on boundaries (the strips drop ASCII
                // bytes only).
                while let Some(pos) = text[start..range.end].find(needle) {
                    let at = start + pos;
                    let mut left_end = at;
                    if token_attr & attr::LSTRIP != 0 {
                        while left_end > start && space(text.as_bytes()[left_end - 1]) {
                            left_end -= 1;
                        }
                    }
                    if left_end > start {
                        next.push(Fragment::Text(start..left_end));
                    }
                    next.push(Fragment::Token(id));
                    start = at + needle.len();
                    if token_attr & attr::RSTRIP != 0 {
                        while start < range.end && space(text.as_bytes()[start]) {
                            start += 1;
                        }
                    }
                }
                if start < range.end {
                    next.push(Fragment::Text(start..range.end));
                }
            }
            fragments = next;
        }
        fragments
    }

    /// Ranks of the eligible special tokens occurring anywhere in `text`, ascending.
    fn ranks_present(&self, text: &[u8], parse_special: bool, vocab: &Vocab) -> Vec<u32> {
        let mut seen = vec![false; self.by_rank.len()];
        let mut ranks = Vec::new();
        for start in 0..text.len() {
            let mut node = 0usize;
            for &b in &text[start..] {
                let children = &self.trie[node].children;
                match children.binary_search_by_key(&b, |&(c, _)| c) {
                    Ok(i) => node = children[i].1 as usize,
                    Err(_) => break,
                }
                let rank = self.trie[node].rank;
                if rank != NO_TOKEN && !seen[rank as usize] {
                    seen[rank as usize] = true;
                    let token_attr = vocab.attrs[self.by_rank[rank as usize] as usize];
                    // Without parse_special, control and unknown tokens stay plain text.
                    if parse_special || token_attr & (attr::CONTROL | attr::UNKNOWN) == 0 {
                        ranks.push(rank);
                    }
                }
            }
        }
        ranks.sort_unstable();
        ranks
    }
}
