//! End-to-end on tiny random models written by the test itself (no download): the KV cache
//! invariant, batched vs token-by-token prefill, and clear errors on bad input.

use kvinfer_engine::{generate, GenerateRequest, SamplingParams};
use kvinfer_model::testing::{write_tiny_model, TinyArch};
use kvinfer_model::{Model, ModelError};
use std::path::PathBuf;

fn tiny(arch: TinyArch, seed: u64) -> (Model, PathBuf) {
    let dir = std::env::temp_dir().join(format!("kvinfer-tiny-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    // One file per call: tests run in parallel and a file must not be rewritten while mapped.
    static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let k = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let path = dir.join(format!("{arch:?}-{seed}-{k}.gguf"));
    write_tiny_model(&path, arch, seed).unwrap();
    (Model::load(&path).unwrap(), path)
}

fn greedy(model: &Model, prompt: &[u32], n: usize, use_kv_cache: bool) -> Vec<u32> {
    let mut kv = model.new_kv_cache(256);
    let req = GenerateRequest {
        prompt_ids: prompt.to_vec(),
        max_tokens: n,
        sampling: SamplingParams::greedy(),
        stop: vec![],
        ignore_eos: true,
        use_kv_cache,
    };
    generate(model, &mut kv, &req, |_| true).unwrap().ids
}

#[test]
fn cached_and_uncached_generation_agree() {
    for arch in [TinyArch::Llama, TinyArch::Gemma3] {
        for seed in [1, 2] {
            let (model, _) = tiny(arch, seed);
            let prompt = model
                .tokenizer
                .encode("the tin then a thin hen", true, false);
            assert!(prompt.len() > 3, "{arch:?}: prompt tokenized to {prompt:?}");
            // 40 tokens: past gemma3's tiny sliding window of 8, so windowed attention is covered.
            let with = greedy(&model, &prompt, 40, true);
            let without = greedy(&model, &prompt, 40, false);
            assert_eq!(with, without, "{arch:?} seed {seed}");
            assert_eq!(with.len(), 40);
            let distinct: std::collections::HashSet<_> = with.iter().collect();
            assert!(distinct.len() > 1, "{arch:?}: degenerate output {with:?}");
        }
    }
}

#[test]
fn batched_prefill_matches_token_by_token() {
    for arch in [TinyArch::Llama, TinyArch::Gemma3] {
        let (model, _) = tiny(arch, 3);
        let ids: Vec<u32> = (0..70).map(|i| (i * 37 % 250) as u32 + 4).collect();
        let mut kv = model.new_kv_cache(128);
        let batched = model.forward(&ids, &mut kv).unwrap();
        let mut kv2 = model.new_kv_cache(128);
        let mut last = Vec::new();
        for &t in &ids {
            last = model.forward(&[t], &mut kv2).unwrap();
        }
        assert_eq!(kv.len(), kv2.len());
        let max_abs = batched.iter().map(|v| v.abs()).fold(0f32, f32::max);
        let diff = batched
            .iter()
            .zip(&last)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        eprintln!("{arch:?}: batched vs one-by-one max diff {diff}");
        assert!(
            diff <= 1e-3 * max_abs.max(1.0),
            "{arch:?}: max diff {diff} (scale {max_abs})"
        );
    }
}

#[test]
fn bad_input_is_an_error_not_a_panic() {
    let (model, path) = tiny(TinyArch::Llama, 4);
    let mut kv = model.new_kv_cache(8);
    assert!(matches!(
        model.forward(&[], &mut kv),
        Err(ModelError::Input(_))
    ));
    let vocab = model.config.vocab_size as u32;
    assert!(matches!(
        model.forward(&[vocab], &mut kv),
        Err(ModelError::Input(_))
    ));
    assert!(matches!(
        model.forward(&[5; 9], &mut kv),
        Err(ModelError::ContextFull { .. })
    ));
    assert_eq!(kv.len(), 0, "failed calls must not change the cache");
    // A generation that runs into the end of the context stops cleanly.
    let req = GenerateRequest {
        prompt_ids: vec![5, 6, 7],
        max_tokens: 100,
        sampling: SamplingParams::greedy(),
        stop: vec![],
        ignore_eos: true,
        use_kv_cache: true,
    };
    let out = generate(&model, &mut kv, &req, |_| true).unwrap();
    assert_eq!(out.finish_reason, kvinfer_engine::FinishReason::ContextFull);
    assert_eq!(out.ids.len(), 8 - 3 + 1);
    // A prompt as long as the context is refused up front.
    let mut kv = model.new_kv_cache(8);
    let long = GenerateRequest {
        prompt_ids: vec![5; 8],
        ..req
    };
    assert!(generate(&model, &mut kv, &long, |_| true).is_err());

    // Truncated model files fail to load with an error.
    let bytes = std::fs::read(&path).unwrap();
    let cut = path.with_extension("cut.gguf");
    for len in [10, bytes.len() / 3, bytes.len() - 100] {
        std::fs::write(&cut, &bytes[..len]).unwrap();
        let e = Model::load(&cut)
            .err()
            .expect("truncated file must not load");
        assert!(e.to_string().contains("truncated"), "{e}");
    }
}

#[test]
fn stop_strings_and_cancellation() {
    let (model, _) = tiny(TinyArch::Llama, 1);
    let prompt = model.tokenizer.encode("the tin", true, false);
    let full = {
        let mut kv = model.new_kv_cache(256);
        let req = GenerateRequest {
            prompt_ids: prompt.clone(),
            max_tokens: 30,
            sampling: SamplingParams::greedy(),
            stop: vec![],
            ignore_eos: true,
            use_kv_cache: true,
        };
        generate(&model, &mut kv, &req, |_| true).unwrap()
    };
    // Stop on a substring from the middle of the full text: the text is cut right before it.
    let chars: Vec<char> = full.text.chars().collect();
    assert!(chars.len() > 10, "{:?}", full.text);
    let stop: String = chars[6..9].iter().collect();
    let mut kv = model.new_kv_cache(256);
    let req = GenerateRequest {
        prompt_ids: prompt.clone(),
        max_tokens: 30,
        sampling: SamplingParams::greedy(),
        stop: vec![stop.clone()],
        ignore_eos: true,
        use_kv_cache: true,
    };
    let mut streamed = String::new();
    let out = generate(&model, &mut kv, &req, |t| {
        streamed.push_str(t);
        true
    })
    .unwrap();
    let at = full.text.find(&stop).unwrap();
    assert_eq!(out.text, full.text[..at]);
    assert_eq!(streamed, out.text);
    assert_eq!(out.finish_reason, kvinfer_engine::FinishReason::Stop);
    // Cancel after the first piece of text.
    let mut kv = model.new_kv_cache(256);
    let req = GenerateRequest {
        stop: vec![],
        ..req
    };
    let out = generate(&model, &mut kv, &req, |_| false).unwrap();
    assert_eq!(out.finish_reason, kvinfer_engine::FinishReason::Cancelled);
    assert!(out.ids.len() < 30);
}
