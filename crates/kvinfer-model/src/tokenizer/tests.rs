//! Unit tests on tiny hand-made vocabularies. The real models are checked against llama.cpp's
//! ids in `tests/tokenizer_llamacpp.rs`.

use super::*;

const NORMAL: i32 = 1;
const UNKNOWN: i32 = 2;
const CONTROL: i32 = 3;
const USER_DEFINED: i32 = 4;
const BYTE: i32 = 6;

/// A byte-level BPE vocabulary: 3 control tokens, 1 user-defined, the 256 byte characters,
/// then the results of `merges` in order.
fn bpe_spec(merges: &[&str]) -> TokenizerSpec {
    let mut tokens: Vec<String> = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<tag>"]
        .map(String::from)
        .to_vec();
    let mut token_types = vec![CONTROL, CONTROL, CONTROL, USER_DEFINED];
    for b in 0..=255u8 {
        tokens.push(bpe::byte_to_char(b).to_string());
        token_types.push(NORMAL);
    }
    for m in merges {
        tokens.push(m.replace(' ', ""));
        token_types.push(NORMAL);
    }
    TokenizerSpec {
        model: "gpt2".into(),
        pre: Some("smollm".into()),
        tokens,
        token_types,
        merges: merges.iter().map(|m| m.to_string()).collect(),
        bos_id: Some(1),
        eos_id: Some(2),
        ..Default::default()
    }
}

const HELLO_MERGES: &[&str] = &[
    "h e", "l l", "he ll", "hell o", "Ġ w", "o r", "Ġw or", "l d", "Ġwor ld", "1 2",
];

fn bpe() -> Tokenizer {
    Tokenizer::from_spec(bpe_spec(HELLO_MERGES)).unwrap()
}

fn id(t: &Tokenizer, text: &str) -> u32 {
    t.token_id(text)
        .unwrap_or_else(|| panic!("{text:?} not in vocab"))
}

fn ids(t: &Tokenizer, texts: &[&str]) -> Vec<u32> {
    texts.iter().map(|s| id(t, s)).collect()
}

#[test]
fn bpe_merges_words() {
    let t = bpe();
    assert_eq!(
        t.encode("hello world", false, false),
        ids(&t, &["hello", "Ġworld"])
    );
    assert_eq!(
        t.encode("hello", true, false),
        ids(&t, &["hello"]),
        "add_bos is false"
    );
    assert!(t.encode("", true, true).is_empty());
}

#[test]
fn bpe_lower_rank_merges_first() {
    let t = Tokenizer::from_spec(bpe_spec(&["b c", "a b"])).unwrap();
    assert_eq!(t.encode("abc", false, false), ids(&t, &["a", "bc"]));
    let t = Tokenizer::from_spec(bpe_spec(&["a b", "b c"])).unwrap();
    assert_eq!(t.encode("abc", false, false), ids(&t, &["ab", "c"]));
}

#[test]
fn bpe_smollm_splits_digits_before_merging() {
    let t = bpe();
    assert_eq!(t.encode("x12", false, false), ids(&t, &["x", "1", "2"]));
}

#[test]
fn bpe_merge_outside_vocab_still_applies() {
    // "a b" makes "ab", which is not a token; "ab c" makes "abc", which is.
    let mut spec = bpe_spec(&["x y"]);
    spec.tokens.push("abc".into());
    spec.token_types.push(NORMAL);
    spec.merges = vec!["a b".into(), "ab c".into()];
    let t = Tokenizer::from_spec(spec).unwrap();
    assert_eq!(t.encode("abc", false, false), ids(&t, &["abc"]));
    // A word ending on the virtual "ab" falls back to its ASCII bytes, as llama.cpp does.
    assert_eq!(t.encode("ab", false, false), ids(&t, &["a", "b"]));
}

#[test]
fn control_tokens_split_only_with_parse_special() {
    let t = bpe();
    let start = id(&t, "<|im_start|>");
    let with = t.encode("<|im_start|>hello", false, true);
    assert_eq!(with, [start, id(&t, "hello")]);
    let without = t.encode("<|im_start|>hello", false, false);
    assert!(!without.contains(&start));
    assert_eq!(t.decode(&without), "<|im_start|>hello");
}

#[test]
fn user_defined_tokens_always_split() {
    let t = bpe();
    let tag = id(&t, "<tag>");
    for parse_special in [false, true] {
        assert_eq!(
            t.encode("hello<tag>hello", false, parse_special),
            [id(&t, "hello"), tag, id(&t, "hello")]
        );
    }
    assert_eq!(t.token_bytes(tag), b"<tag>", "user-defined tokens render");
}

#[test]
fn longer_special_tokens_are_cut_first() {
    let mut spec = bpe_spec(&[]);
    for text in ["ab", "bcd"] {
        spec.tokens.push(text.into());
        spec.token_types.push(USER_DEFINED);
    }
    let t = Tokenizer::from_spec(spec).unwrap();
    assert_eq!(t.encode("abcd", false, false), ids(&t, &["a", "bcd"]));
    assert_eq!(t.encode("abab", false, false), ids(&t, &["ab", "ab"]));
}

#[test]
fn control_tokens_render_only_when_asked() {
    let t = bpe();
    let end = id(&t, "<|im_end|>");
    assert!(t.token_bytes(end).is_empty());
    assert_eq!(t.token_piece(end, true), b"<|im_end|>");
    assert_eq!(t.decode(&[id(&t, "hello"), end]), "hello");
    assert!(t.token_bytes(u32::MAX).is_empty());
    assert_eq!(t.token_text(u32::MAX), "");
}

#[test]
fn bpe_round_trips_any_text() {
    let t = bpe();
    for s in [
        "héllo wörld\n\t 123 😀",
        "  leading and trailing  ",
        "\u{0}\u{7f}\u{85}\u{a0}",
        "ǅ ǈ ǋ ǲ",
    ] {
        assert_eq!(t.decode(&t.encode(s, false, false)), s);
    }
}

#[test]
fn eog_set_follows_llama_cpp() {
    let t = bpe();
    assert!(t.is_eog(id(&t, "<|endoftext|>")));
    assert!(t.is_eog(id(&t, "<|im_end|>")));
    assert!(!t.is_eog(id(&t, "<|im_start|>")));
    assert_eq!(t.eot_id(), Some(id(&t, "<|im_end|>")));
}

#[test]
fn recognised_tokens_become_control_even_if_typed_normal() {
    let mut spec = bpe_spec(&[]);
    spec.tokens.push("<end_of_turn>".into());
    spec.token_types.push(NORMAL);
    let t = Tokenizer::from_spec(spec).unwrap();
    let eot = id(&t, "<end_of_turn>");
    assert!(t.is_control(eot) && t.is_eog(eot));
    assert_eq!(t.encode("<end_of_turn>", false, true), [eot]);
    assert_ne!(t.encode("<end_of_turn>", false, false), [eot]);
}

/// A SentencePiece vocabulary: `<unk>`, `<s>`, `</s>`, the 256 byte tokens, then `pieces`.
fn spm_spec(pieces: &[(&str, f32)]) -> TokenizerSpec {
    let mut tokens: Vec<String> = ["<unk>", "<s>", "</s>"].map(String::from).to_vec();
    let mut token_types = vec![UNKNOWN, CONTROL, CONTROL];
    let mut scores = vec![0.0; 3];
    for b in 0..=255u8 {
        tokens.push(format!("<0x{b:02X}>"));
        token_types.push(BYTE);
        scores.push(0.0);
    }
    for &(text, score) in pieces {
        tokens.push(text.into());
        token_types.push(NORMAL);
        scores.push(score);
    }
    TokenizerSpec {
        model: "llama".into(),
        tokens,
        scores,
        token_types,
        bos_id: Some(1),
        eos_id: Some(2),
        unk_id: Some(0),
        add_bos: true,
        ..Default::default()
    }
}

const SPM_PIECES: &[(&str, f32)] = &[
    ("▁", -1.0),
    ("a", -5.0),
    ("b", -5.0),
    ("c", -5.0),
    ("ab", -2.0),
    ("bc", -1.0),
    ("▁a", -3.0),
    ("aa", -4.0),
];

#[test]
fn spm_merges_highest_score_first() {
    let t = Tokenizer::from_spec(spm_spec(SPM_PIECES)).unwrap();
    // "bc" (-1) beats "ab" (-2).
    assert_eq!(t.encode("abc", false, false), ids(&t, &["a", "bc"]));
    // Equal scores: leftmost first.
    assert_eq!(t.encode("aaa", false, false), ids(&t, &["aa", "a"]));
    assert_eq!(
        t.encode("abc", true, false),
        [&[1][..], &ids(&t, &["a", "bc"])].concat()
    );
}

#[test]
fn spm_escapes_spaces_and_falls_back_to_bytes() {
    let t = Tokenizer::from_spec(spm_spec(SPM_PIECES)).unwrap();
    let e = t.encode("a é", false, false);
    assert_eq!(e, ids(&t, &["a", "▁", "<0xC3>", "<0xA9>"]));
    assert_eq!(t.decode(&e), "a é");
}

#[test]
fn spm_space_prefix_goes_at_start_and_after_special_tokens() {
    let mut spec = spm_spec(SPM_PIECES);
    spec.add_space_prefix = true;
    let t = Tokenizer::from_spec(spec).unwrap();
    assert_eq!(t.encode("a", false, false), ids(&t, &["▁a"]));
    assert_eq!(
        t.encode("a</s>a", false, true),
        ids(&t, &["▁a", "</s>", "▁a"])
    );
    assert_eq!(t.decode(&t.encode("a", false, false)), " a");
}

#[test]
fn spm_renders_pieces_like_llama_cpp() {
    let t = Tokenizer::from_spec(spm_spec(SPM_PIECES)).unwrap();
    assert_eq!(t.token_bytes(id(&t, "▁a")), b" a");
    assert_eq!(t.token_bytes(id(&t, "<0x41>")), b"A");
    assert!(t.token_bytes(0).is_empty(), "unknown renders as nothing");
    assert!(t.token_bytes(1).is_empty(), "control renders as nothing");
    assert!(t.is_eog(2));
}

#[test]
fn spec_errors_say_what_is_wrong() {
    let mut spec = bpe_spec(&[]);
    spec.model = "wordpiece".into();
    assert!(Tokenizer::from_spec(spec)
        .unwrap_err()
        .to_string()
        .contains("wordpiece"));

    let mut spec = spm_spec(&[]);
    spec.tokens[5] = spec.tokens[4].clone();
    assert!(matches!(
        Tokenizer::from_spec(spec),
        Err(TokenizerError::DuplicateToken {
            first: 4,
            second: 5,
            ..
        })
    ));

    let mut spec = spm_spec(&[]);
    spec.scores.truncate(10);
    assert!(Tokenizer::from_spec(spec)
        .unwrap_err()
        .to_string()
        .contains("scores"));

    let mut spec = spm_spec(&[]);
    spec.bos_id = None;
    assert!(Tokenizer::from_spec(spec)
        .unwrap_err()
        .to_string()
        .contains("add_bos_token"));

    assert!(matches!(
        Tokenizer::from_spec(TokenizerSpec::default()),
        Err(TokenizerError::UnsupportedModel(_))
    ));
}

/// Pseudo-random strings over an alphabet full of edge cases never panic and (for byte-level
/// BPE, and SPM with byte fallback) round-trip.
#[test]
fn random_text_never_panics() {
    let alphabet: Vec<char> = "ab c\n\t  1²é😀\u{2581}<|>/s\u{0}\u{200d}\u{fffd}"
        .chars()
        .collect();
    let bpe = bpe();
    let spm = Tokenizer::from_spec(spm_spec(SPM_PIECES)).unwrap();
    let mut state = 0x9e3779b97f4a7c15u64;
    for _ in 0..2000 {
        let mut s = String::new();
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        for k in 0..(state % 24) {
            s.push(alphabet[((state >> (k % 32)) as usize + k as usize * 7) % alphabet.len()]);
        }
        for parse_special in [false, true] {
            let b = bpe.encode(&s, true, parse_special);
            let p = spm.encode(&s, true, parse_special);
            if !parse_special {
                assert_eq!(bpe.decode(&b), s);
                // U+2581 in the input comes back as a space.
                assert_eq!(spm.decode(&p), s.replace('\u{2581}', " "));
            }
        }
    }
}

#[test]
fn tokenizer_is_shareable_across_threads() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Tokenizer>();
}

#[test]
fn phi3_special_tokens_swallow_the_whitespace_after_them_as_in_llama_cpp() {
    let phi3 = |name: &str| {
        let mut spec = bpe_spec(HELLO_MERGES);
        spec.model_name = name.into();
        Tokenizer::from_spec(spec).unwrap()
    };
    let (t, plain) = (phi3("Phi-3-mini-4k-instruct"), phi3("SmolLM2"));
    let start = id(&t, "<|im_start|>");
    // "<|im_start|>\n hello": the newline and space after the control token are dropped.
    assert_eq!(
        t.encode("<|im_start|>\n hello", false, true),
        [start, id(&t, "hello")]
    );
    assert_ne!(
        plain.encode("<|im_start|>\n hello", false, true),
        [start, id(&t, "hello")]
    );
    // Whitespace before it stays; user-defined tokens strip too.
    let tag = id(&t, "<tag>");
    assert_eq!(
        t.encode("hello<tag>  hello", false, true),
        [id(&t, "hello"), tag, id(&t, "hello")]
    );
    let before = t.encode("hello <tag>", false, true);
    assert_eq!(before.last(), Some(&tag));
    assert_eq!(
        before.len(),
        3,
        "the space before the token stays: {before:?}"
    );
}
