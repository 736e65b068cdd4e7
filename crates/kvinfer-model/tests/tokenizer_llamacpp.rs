// The tokenizer and chat templates on the two real models, against llama.cpp.
//
// `bench/fixtures/tokenizer-corpus.json` lists the test strings; `tokenizer-<model>.json` holds
// llama.cpp's ids for each (`llama_tokenize` with parse_special false and true, BOS as the file
// asks), made by `bench/make-fixtures.py`. Every string is checked both ways and all mismatches
// are reported together. The models come from `scripts/get-models` (into `$KVINFER_MODELS`, by
// default `<workspace>/models`); a missing model fails the tests.

use std::path::{Path, PathBuf};

use kvinfer_model::chat::{ChatMessage, ChatTemplate};
use kvinfer_model::gguf::GgufFile;
use kvinfer_model::tokenizer::{Tokenizer, TokenizerSpec};
use serde::Deserialize;

const SMOLLM2: &str = "smollm2";
const GEMMA3: &str = "gemma3";

/// `bench/fixtures/tokenizer-<model>.json`.
#[derive(Deserialize)]
struct Fixture {
    model_file: String,
    add_bos: bool,
    bos_id: u32,
    n_vocab: usize,
    llama_cpp_version: String,
    cases: Vec<Case>,
}

#[derive(Deserialize)]
struct Case {
    text: String,
    /// parse_special = false.
    ids: Vec<u32>,
    /// parse_special = true.
    ids_special: Vec<u32>,
    /// Whether llama.cpp's `llama_detokenize` gives the text back.
    roundtrip: bool,
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn fixture_path(name: &str) -> PathBuf {
    workspace_root().join("bench/fixtures").join(name)
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> T {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| {
        panic!(
            "cannot read {}: {e} (fixtures are committed; regenerate with bench/make-fixtures.py)",
            path.display()
        )
    });
    serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("{} is not a valid fixture: {e}", path.display()))
}

fn load_fixture(model: &str) -> Fixture {
    let fixture: Fixture = read_json(&fixture_path(&format!("tokenizer-{model}.json")));
    let corpus: Vec<String> = read_json(&fixture_path("tokenizer-corpus.json"));
    let texts: Vec<&String> = fixture.cases.iter().map(|c| &c.text).collect();
    assert!(
        texts.iter().copied().eq(corpus.iter()),
        "tokenizer-{model}.json does not match tokenizer-corpus.json"
    );
    fixture
}

/// The model file and its tokenizer; fails with instructions when the model is not installed.
fn load_model(file: &str) -> (GgufFile, Tokenizer) {
    let dir = std::env::var_os("KVINFER_MODELS")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("models"));
    let path = dir.join(file);
    assert!(
        path.is_file(),
        "model file {} is missing: run scripts/get-models (or point KVINFER_MODELS at the folder holding it)",
        path.display()
    );
    let gguf =
        GgufFile::open(&path).unwrap_or_else(|e| panic!("cannot open {}: {e}", path.display()));
    let spec =
        TokenizerSpec::from_gguf(&gguf).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let tokenizer =
        Tokenizer::from_spec(spec).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    (gguf, tokenizer)
}

/// One line per mismatch: the text, then both id lists from the first difference, with token texts.
fn describe_mismatch(
    tok: &Tokenizer,
    text: &str,
    parse_special: bool,
    got: &[u32],
    want: &[u32],
) -> String {
    let first = got
        .iter()
        .zip(want)
        .position(|(a, b)| a != b)
        .unwrap_or(got.len().min(want.len()));
    let show = |ids: &[u32]| {
        let tail: Vec<String> = ids[first..]
            .iter()
            .take(8)
            .map(|&id| format!("{id}:{:?}", tok.token_text(id)))
            .collect();
        format!(
            "[{}{}]",
            tail.join(" "),
            if ids.len() > first + 8 { " …" } else { "" }
        )
    };
    let shown: String = text.chars().take(60).collect();
    format!(
        "  parse_special={parse_special} text={shown:?}{} (len {}): from index {first}\n    kvinfer   {}\n    llama.cpp {}",
        if shown.len() < text.len() { "…" } else { "" },
        text.len(),
        show(got),
        show(want)
    )
}

fn check_against_llamacpp(model: &str) {
    let fixture = load_fixture(model);
    let (_, tok) = load_model(&fixture.model_file);
    assert_eq!(tok.vocab_size(), fixture.n_vocab, "vocabulary size");
    assert_eq!(tok.adds_bos(), fixture.add_bos, "add_bos");
    assert_eq!(tok.bos_id(), Some(fixture.bos_id), "BOS id");

    let mut mismatches = Vec::new();
    for case in &fixture.cases {
        for (parse_special, want) in [(false, &case.ids), (true, &case.ids_special)] {
            let got = tok.encode(&case.text, fixture.add_bos, parse_special);
            if &got != want {
                mismatches.push(describe_mismatch(
                    &tok,
                    &case.text,
                    parse_special,
                    &got,
                    want,
                ));
            }
        }
    }
    assert!(
        mismatches.is_empty(),
        "[{model}] {} of {} encodings differ from {}:\n{}",
        mismatches.len(),
        2 * fixture.cases.len(),
        fixture.llama_cpp_version,
        mismatches.join("\n")
    );
}

#[test]
fn smollm2_matches_llamacpp() {
    check_against_llamacpp(SMOLLM2);
}

#[test]
fn gemma3_matches_llamacpp() {
    check_against_llamacpp(GEMMA3);
}

/// decode(encode(s)) == s: always for byte-level BPE; for SentencePiece wherever llama.cpp's own
/// detokenizer round-trips (it cannot where the text holds U+2581, which decodes as a space).
#[test]
fn decode_inverts_encode() {
    for model in [SMOLLM2, GEMMA3] {
        let fixture = load_fixture(model);
        let (_, tok) = load_model(&fixture.model_file);
        let mut failures = Vec::new();
        for case in &fixture.cases {
            if model == GEMMA3 && !case.roundtrip {
                continue;
            }
            let ids = tok.encode(&case.text, false, false);
            let back = tok.decode(&ids);
            if back != case.text {
                failures.push(format!("  {:?} -> {:?}", case.text, back));
            }
        }
        assert!(
            failures.is_empty(),
            "[{model}] {} strings do not round-trip:\n{}",
            failures.len(),
            failures.join("\n")
        );
    }
    let (_, smol) = load_model("SmolLM2-135M-Instruct.Q4_1.gguf");
    for s in [
        "\u{2581}x\u{2581}",
        "ĠĊ",
        "\u{0}\u{1}\u{7f}\u{85}",
        "a\u{e000}\u{10ffff}b",
        "<|im_end|>",
    ] {
        assert_eq!(smol.decode(&smol.encode(s, false, false)), s);
    }
}

/// End-of-generation sets as `llama_vocab_is_eog` reports them (llama.cpp 0c1e57098).
#[test]
fn eog_tokens_match_llamacpp() {
    let (_, smol) = load_model("SmolLM2-135M-Instruct.Q4_1.gguf");
    // <|endoftext|>, <|im_end|>, and <reponame> (taken for a FIM repo token).
    assert_eq!(smol.eog_ids(), [0, 2, 4]);
    assert_eq!(smol.eot_id(), smol.token_id("<|im_end|>"));
    let (_, gemma) = load_model("gemma-3-270m-q4_k_m.gguf");
    // <eos>, <end_of_turn>, and </s> (llama.cpp's text list).
    assert_eq!(gemma.eog_ids(), [1, 106, 212]);
    assert_eq!(gemma.eot_id(), Some(106));
    assert!(gemma.token_bytes(106).is_empty() && gemma.token_piece(106, true) == b"<end_of_turn>");
}

#[test]
fn smollm2_chat_template_from_file() {
    let (gguf, tok) = load_model("SmolLM2-135M-Instruct.Q4_1.gguf");
    let source = gguf
        .get_str("tokenizer.chat_template")
        .expect("SmolLM2 carries a chat template");
    let bos = tok.token_text(tok.bos_id().unwrap()).to_string();
    let eos = tok.token_text(tok.eos_id().unwrap()).to_string();
    let template = ChatTemplate::for_model(Some(source), "llama", &bos, &eos).unwrap();
    let messages = [
        ChatMessage::new("system", "You are terse."),
        ChatMessage::new("user", "What is 2+2?"),
    ];
    let prompt = template
        .render_for_encode(&messages, true, tok.adds_bos(), false)
        .unwrap();
    assert_eq!(
        prompt,
        "<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"
    );
    let ids = tok.encode(&prompt, true, true);
    let (im_start, im_end) = (
        tok.token_id("<|im_start|>").unwrap(),
        tok.token_id("<|im_end|>").unwrap(),
    );
    assert_eq!(ids[0], im_start);
    assert_eq!(ids.iter().filter(|&&id| id == im_start).count(), 3);
    assert_eq!(ids.iter().filter(|&&id| id == im_end).count(), 2);
    assert_eq!(
        tok.decode(&ids),
        "system\nYou are terse.\nuser\nWhat is 2+2?\nassistant\n"
    );
}

#[test]
fn gemma3_builtin_chat_template() {
    let (gguf, tok) = load_model("gemma-3-270m-q4_k_m.gguf");
    assert!(
        gguf.get_str("tokenizer.chat_template").is_none(),
        "this Gemma 3 file has no template of its own"
    );
    let bos = tok.token_text(tok.bos_id().unwrap()).to_string();
    let eos = tok.token_text(tok.eos_id().unwrap()).to_string();
    let template = ChatTemplate::for_model(None, "gemma3", &bos, &eos).unwrap();
    let messages = [
        ChatMessage::new("system", "You are terse."),
        ChatMessage::new("user", "What is 2+2?"),
    ];
    assert_eq!(
        template.render(&messages, true).unwrap(),
        "<bos><start_of_turn>user\nYou are terse.\n\nWhat is 2+2?<end_of_turn>\n<start_of_turn>model\n"
    );
    // The tokenizer adds BOS itself, so the template's "<bos>" text is dropped: one BOS only.
    let prompt = template
        .render_for_encode(&messages, true, tok.adds_bos(), false)
        .unwrap();
    let ids = tok.encode(&prompt, true, true);
    let (start, end) = (
        tok.token_id("<start_of_turn>").unwrap(),
        tok.token_id("<end_of_turn>").unwrap(),
    );
    assert_eq!(&ids[..2], [tok.bos_id().unwrap(), start]);
    assert_eq!(
        ids.iter().filter(|&&id| Some(id) == tok.bos_id()).count(),
        1
    );
    assert_eq!(ids.iter().filter(|&&id| id == start).count(), 2);
    assert_eq!(ids.iter().filter(|&&id| id == end).count(), 1);
}

/// The models kvinfer installs pass the load-time support check (every metadata key known,
/// every tensor read).
#[test]
fn installed_models_pass_the_support_check() {
    for file in [
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "gemma-3-270m-q4_k_m.gguf",
    ] {
        let (gguf, _) = load_model(file);
        let path = gguf.path().to_path_buf();
        drop(gguf);
        kvinfer_model::Model::load(&path).unwrap_or_else(|e| panic!("{file}: {e}"));
    }
}
