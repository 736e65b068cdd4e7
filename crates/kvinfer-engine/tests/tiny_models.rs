//! End-to-end on tiny random models written by the test itself (no download): the KV cache
//! invariants (cached == recomputed, prefix reuse == fresh under every eviction policy, batched
//! == one at a time), no leaked blocks, and clear errors on bad input.

mod common;

use common::tiny;
use kvinfer_cache::{KvDtype, PagedKv, PolicyKind};
use kvinfer_engine::{
    extend_sequence, extend_sequence_rows, generate, FinishReason, GenerateRequest, SamplingParams,
};
use kvinfer_model::testing::TinyArch;
use kvinfer_model::{Model, ModelError, SeqBatch};

/// A cache of `num_blocks` blocks of `block_size` tokens of f16 rows.
fn paged(model: &Model, block_size: usize, num_blocks: usize, policy: PolicyKind) -> PagedKv {
    paged_as(model, block_size, num_blocks, policy, KvDtype::F16)
}

/// As [`paged`], rows stored as `dtype`, with sliding-window savings as `kvinfer serve` runs
/// by default (gemma3: one block table per layer group, `num_blocks` blocks in each).
fn paged_as(
    model: &Model,
    block_size: usize,
    num_blocks: usize,
    policy: PolicyKind,
    dtype: KvDtype,
) -> PagedKv {
    paged_groups(model, block_size, num_blocks, policy, dtype, true)
}

/// As [`paged_as`]; `windowed` false keeps every layer's every position (`--swa-full`).
fn paged_groups(
    model: &Model,
    block_size: usize,
    num_blocks: usize,
    policy: PolicyKind,
    dtype: KvDtype,
    windowed: bool,
) -> PagedKv {
    let id = model.kv_identity(block_size, dtype, windowed);
    id.paged(num_blocks * id.groups.len(), policy, 11)
}

/// The models and KV dtypes every invariant is checked for: each dtype on a llama and on
/// gemma3 (sliding window), f16 and q8_0 on every other architecture; the quantized ones need
/// heads of a multiple of 32.
fn cases() -> Vec<(TinyArch, KvDtype)> {
    let mut v = vec![(TinyArch::Llama, KvDtype::F16)];
    for d in KvDtype::ALL {
        v.push((TinyArch::LlamaHead32, d));
        v.push((TinyArch::Gemma3, d));
    }
    for arch in [
        TinyArch::Llama3,
        TinyArch::Qwen2,
        TinyArch::Qwen3,
        TinyArch::Phi3,
        TinyArch::Gemma2,
    ] {
        v.push((arch, KvDtype::F16));
        v.push((arch, KvDtype::Q8_0));
    }
    v
}

fn request(prompt: &[u32], n: usize) -> GenerateRequest {
    GenerateRequest {
        prompt_ids: prompt.to_vec(),
        max_tokens: n,
        sampling: SamplingParams::greedy(),
        stop: vec![],
        ignore_eos: true,
        use_kv_cache: true,
        prefix_cache: true,
        ctx_size: 0,
    }
}

fn greedy(model: &Model, prompt: &[u32], n: usize, use_kv_cache: bool, dtype: KvDtype) -> Vec<u32> {
    let mut kv = paged_as(model, 16, 32, PolicyKind::Lru, dtype);
    let req = GenerateRequest {
        use_kv_cache,
        ..request(prompt, n)
    };
    generate(model, &mut kv, &req, |_| true).unwrap().ids
}

#[test]
fn cached_and_uncached_generation_agree() {
    for (arch, dtype) in cases() {
        for seed in [1, 2] {
            let (model, _) = tiny(arch, seed);
            let prompt = model
                .tokenizer
                .encode("the tin then a thin hen", true, false);
            assert!(prompt.len() > 3, "{arch:?}: prompt tokenized to {prompt:?}");
            // 40 tokens: past gemma3's tiny sliding window of 8, so windowed attention is covered.
            let with = greedy(&model, &prompt, 40, true, dtype);
            let without = greedy(&model, &prompt, 40, false, dtype);
            assert_eq!(with, without, "{arch:?} {dtype} seed {seed}");
            assert_eq!(with.len(), 40);
            let distinct: std::collections::HashSet<_> = with.iter().collect();
            assert!(distinct.len() > 1, "{arch:?}: degenerate output {with:?}");
        }
    }
}

/// Runs `ids` through a fresh sequence of `kv` in chunks of `chunk` tokens; last logits.
fn run_chunked(model: &Model, kv: &mut PagedKv, ids: &[u32], chunk: usize) -> Vec<f32> {
    let (seq, _) = kv.add_sequence(ids, false);
    let mut last = Vec::new();
    for c in ids.chunks(chunk) {
        last = extend_sequence(model, kv, seq, c).unwrap().expect("room");
    }
    kv.release(seq);
    last
}

#[test]
fn batched_chunked_and_token_by_token_prefill_are_bit_identical() {
    for (arch, dtype) in cases() {
        let (model, _) = tiny(arch, 3);
        let ids: Vec<u32> = (0..70).map(|i| (i * 37 % 250) as u32 + 4).collect();
        let mut kv = paged_as(&model, 16, 16, PolicyKind::Lru, dtype);
        let whole = run_chunked(&model, &mut kv, &ids, ids.len());
        assert_eq!(
            whole,
            run_chunked(&model, &mut kv, &ids, 1),
            "{arch:?} {dtype} token by token"
        );
        assert_eq!(
            whole,
            run_chunked(&model, &mut kv, &ids, 13),
            "{arch:?} {dtype} chunks of 13"
        );
    }
}

#[test]
fn a_batch_of_sequences_equals_each_alone() {
    for (arch, dtype) in cases() {
        let (model, _) = tiny(arch, 5);
        let prompts: Vec<Vec<u32>> = [3usize, 17, 40]
            .iter()
            .map(|&n| {
                (0..n)
                    .map(|i| (i * 13 % 200) as u32 + 4 + n as u32)
                    .collect()
            })
            .collect();
        let mut kv = paged_as(&model, 4, 32, PolicyKind::Lru, dtype);
        let alone: Vec<Vec<f32>> = prompts
            .iter()
            .map(|p| run_chunked(&model, &mut kv, p, p.len()))
            .collect();
        let seqs: Vec<_> = prompts
            .iter()
            .map(|p| {
                let (s, _) = kv.add_sequence(p, false);
                kv.reserve(s, p.len()).unwrap();
                s
            })
            .collect();
        let (tables, storage) = kv.tables_and_storage();
        let batch: Vec<SeqBatch> = prompts
            .iter()
            .zip(&seqs)
            .map(|(p, &s)| SeqBatch {
                tokens: p,
                start: 0,
                tables: tables.block_tables(s),
            })
            .collect();
        let together = model.forward(storage, &batch).unwrap();
        assert_eq!(together, alone, "{arch:?} {dtype}");
    }
}

/// The central invariant: reusing cached prefixes changes nothing, under every eviction policy,
/// with a pool so small that evictions happen mid-workload. No block leaks between requests.
#[test]
fn prefix_reuse_equals_recompute_under_every_policy_with_evictions() {
    for (arch, dtype) in cases() {
        let (model, _) = tiny(arch, 6);
        // Three "system prompts" and per-request suffixes: a few dozen prompts sharing prefixes.
        let stems: Vec<Vec<u32>> = (0..3)
            .map(|s| {
                (0..21)
                    .map(|i| ((i * 7 + s * 50) % 240) as u32 + 4)
                    .collect()
            })
            .collect();
        let prompts: Vec<Vec<u32>> = (0..30)
            .map(|r| {
                let mut p = stems[r % 3].clone();
                p.extend((0..(r % 5 + 1)).map(|i| ((r * 31 + i * 3) % 240) as u32 + 4));
                if r % 4 == 0 {
                    p.truncate(9); // a shorter prompt inside a stem
                }
                p
            })
            .collect();
        let reference: Vec<Vec<u32>> = prompts
            .iter()
            .map(|p| {
                let mut kv = paged_as(&model, 4, 16, PolicyKind::Lru, dtype);
                let req = GenerateRequest {
                    prefix_cache: false,
                    ..request(p, 6)
                };
                generate(&model, &mut kv, &req, |_| true).unwrap().ids
            })
            .collect();
        for policy in PolicyKind::ALL {
            // 16 blocks of 4 tokens: room for two requests' worth of cached blocks at most.
            let mut kv = paged_as(&model, 4, 16, policy, dtype);
            for (p, want) in prompts.iter().zip(&reference) {
                let out = generate(&model, &mut kv, &request(p, 6), |_| true).unwrap();
                assert_eq!(&out.ids, want, "{arch:?} {dtype} {policy}: prompt {p:?}");
                assert_eq!(kv.usage().in_use, 0, "{arch:?} {policy}: blocks leaked");
                kv.check_invariants().unwrap();
            }
            let (stats, usage) = (kv.stats(), kv.usage());
            assert!(
                stats.hit_tokens > 0,
                "{arch:?} {policy}: no prefix was reused"
            );
            assert!(
                usage.evictions > 0,
                "{arch:?} {policy}: the pool never evicted"
            );
        }
    }
}

#[test]
fn bad_input_is_an_error_not_a_panic() {
    let (model, path) = tiny(TinyArch::Llama, 4);
    let mut kv = paged(&model, 4, 4, PolicyKind::Lru);
    let (seq, _) = kv.add_sequence(&[5; 8], false);
    kv.reserve(seq, 8).unwrap();
    let blocks = kv.block_tables(seq).to_vec();
    let run =
        |kv: &mut PagedKv, tokens: &[u32], start: usize, tables: &[Vec<kvinfer_cache::BlockId>]| {
            model.forward(
                kv.tables_and_storage().1,
                &[SeqBatch {
                    tokens,
                    start,
                    tables,
                }],
            )
        };
    assert!(matches!(
        run(&mut kv, &[], 0, &blocks),
        Err(ModelError::Input(_))
    ));
    let vocab = model.config.vocab_size as u32;
    assert!(matches!(
        run(&mut kv, &[vocab], 0, &blocks),
        Err(ModelError::Input(_))
    ));
    // More positions than the block table covers.
    assert!(matches!(
        run(&mut kv, &[5; 9], 0, &blocks),
        Err(ModelError::Input(_))
    ));
    // Past the model's context (256 positions).
    assert!(matches!(
        run(&mut kv, &[5; 2], 255, &blocks),
        Err(ModelError::ContextFull { .. })
    ));
    kv.release(seq);

    // A generation that runs into the end of the context stops cleanly, and so does one that
    // runs out of blocks.
    let req = GenerateRequest {
        ctx_size: 8,
        ..request(&[5, 6, 7], 100)
    };
    let mut kv = paged(&model, 4, 16, PolicyKind::Lru);
    let out = generate(&model, &mut kv, &req, |_| true).unwrap();
    assert_eq!(out.finish_reason, FinishReason::ContextFull);
    assert_eq!(out.ids.len(), 8 - 3 + 1);
    let mut small = paged(&model, 4, 2, PolicyKind::Lru);
    let out = generate(&model, &mut small, &request(&[5, 6, 7], 100), |_| true).unwrap();
    assert_eq!(out.finish_reason, FinishReason::ContextFull);
    assert_eq!(out.ids.len(), 8 - 3 + 1);
    assert_eq!(small.usage().in_use, 0);
    // A prompt as long as the context is refused up front; one the pool cannot hold too.
    let long = GenerateRequest {
        prompt_ids: vec![5; 8],
        ..req.clone()
    };
    assert!(generate(&model, &mut kv, &long, |_| true).is_err());
    let e = generate(&model, &mut small, &request(&[5; 12], 2), |_| true).unwrap_err();
    assert!(e.to_string().contains("--kv-cache-mb"), "{e}");
    assert_eq!(small.usage().in_use, 0, "a refused request leaks nothing");

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
    let mut kv = paged(&model, 16, 32, PolicyKind::Lru);
    let full = generate(&model, &mut kv, &request(&prompt, 30), |_| true).unwrap();
    // Stop on a substring from the middle of the full text: the text is cut right before it.
    let chars: Vec<char> = full.text.chars().collect();
    assert!(chars.len() > 10, "{:?}", full.text);
    let stop: String = chars[6..9].iter().collect();
    let req = GenerateRequest {
        stop: vec![stop.clone()],
        ..request(&prompt, 30)
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
    assert_eq!(out.finish_reason, FinishReason::Stop);
    // Cancel after the first piece of text.
    let out = generate(&model, &mut kv, &request(&prompt, 30), |_| false).unwrap();
    assert_eq!(out.finish_reason, FinishReason::Cancelled);
    assert!(out.ids.len() < 30);
    assert_eq!(kv.usage().in_use, 0);
}

/// Two samples of one prompt share its blocks; each writes its own next token into the shared
/// partial block through a copy-on-write, and each sees exactly what a lone sequence would.
#[test]
fn forked_sequences_copy_the_shared_partial_block_on_write() {
    let (model, _) = tiny(TinyArch::Llama, 8);
    let prompt: Vec<u32> = (0..6).map(|i| i * 11 + 5).collect(); // 1.5 blocks of 4
    let mut kv = paged(&model, 4, 16, PolicyKind::Lru);
    let step = |kv: &mut PagedKv, seq, tokens: &[u32]| {
        extend_sequence(&model, kv, seq, tokens)
            .unwrap()
            .expect("room")
    };
    let (a, _) = kv.add_sequence(&prompt, true);
    step(&mut kv, a, &prompt);
    let b = kv.fork(a);
    assert_eq!(kv.block_table(a), kv.block_table(b));
    let mut got = Vec::new();
    for (seq, next) in [(a, 40u32), (b, 41u32)] {
        got.push(step(&mut kv, seq, &[next]));
    }
    assert_ne!(kv.block_table(a)[1], kv.block_table(b)[1]);
    assert_eq!(kv.block_table(a)[0], kv.block_table(b)[0]);
    for (logits, next) in got.iter().zip([40u32, 41]) {
        let mut alone = prompt.clone();
        alone.push(next);
        let mut fresh = paged(&model, 4, 16, PolicyKind::Lru);
        assert_eq!(
            logits,
            &run_chunked(&model, &mut fresh, &alone, alone.len()),
            "token {next}"
        );
    }
    // `a` reads its own position 6 again: `b`'s write must not have landed in it.
    let again = step(&mut kv, a, &[50]);
    let mut alone = prompt.clone();
    alone.extend([40, 50]);
    let mut fresh = paged(&model, 4, 16, PolicyKind::Lru);
    assert_eq!(again, run_chunked(&model, &mut fresh, &alone, alone.len()));
    kv.release(a);
    kv.release(b);
    kv.check_invariants().unwrap();
    assert_eq!(kv.usage().in_use, 0);
}

/// Quantized KV stays close to f16 (the accuracy itself is measured by `kvinfer accuracy` on
/// the real models): the logits of a 60-token prompt differ little and mostly agree on top-1.
#[test]
fn quantized_kv_logits_stay_close_to_f16() {
    for arch in [TinyArch::LlamaHead32, TinyArch::Gemma3] {
        let (model, _) = tiny(arch, 4);
        let ids: Vec<u32> = (0..60).map(|i| (i * 29 % 240) as u32 + 4).collect();
        let logits = |dtype| {
            let mut kv = paged_as(&model, 16, 8, PolicyKind::Lru, dtype);
            run_chunked(&model, &mut kv, &ids, 7)
        };
        let reference = logits(KvDtype::F16);
        let spread = reference.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        for (dtype, tol) in [
            (KvDtype::Q8_0, 0.05),
            (KvDtype::Q4_0, 0.5),
            (KvDtype::Q4, 0.5),
        ] {
            let got = logits(dtype);
            assert_ne!(
                got, reference,
                "{arch:?} {dtype}: identical to f16, so not quantized"
            );
            let worst = got
                .iter()
                .zip(&reference)
                .fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
            assert!(
                worst <= tol * spread,
                "{arch:?} {dtype}: logits off by {worst} (spread {spread})"
            );
        }
    }
}

/// Runs `ids` through a fresh sequence of `kv` in chunks of `chunk` tokens: the logits after
/// every token, and the bytes of the blocks the sequence held at the end.
fn every_row_chunked(
    model: &Model,
    kv: &mut PagedKv,
    ids: &[u32],
    chunk: usize,
) -> (Vec<Vec<f32>>, usize) {
    let (seq, _) = kv.add_sequence(ids, false);
    let mut rows = Vec::new();
    for c in ids.chunks(chunk) {
        rows.extend(
            extend_sequence_rows(model, kv, seq, c, true)
                .unwrap()
                .expect("room"),
        );
    }
    let held = kv.usage().in_use * kv.layout().block_bytes();
    kv.release(seq);
    kv.check_invariants().unwrap();
    (rows, held)
}

/// Gemma 3's sliding-window memory: letting go of the blocks before the window changes no
/// logit, in any dtype, whole or chunked, and holds less.
#[test]
fn sliding_window_memory_gives_logits_bit_identical_to_the_full_cache() {
    for dtype in KvDtype::ALL {
        let (model, _) = tiny(TinyArch::Gemma3, 8);
        assert!(
            model.kv_groups(true).len() > 1,
            "tiny gemma3 has layer groups"
        );
        let ids: Vec<u32> = (0..70).map(|i| (i * 41 % 230) as u32 + 4).collect();
        let mut full = paged_groups(&model, 4, 24, PolicyKind::Lru, dtype, false);
        let mut windowed = paged_groups(&model, 4, 24, PolicyKind::Lru, dtype, true);
        let (want, full_bytes) = every_row_chunked(&model, &mut full, &ids, ids.len());
        assert_eq!(want.len(), ids.len());
        for chunk in [ids.len(), 13, 1] {
            let (got, bytes) = every_row_chunked(&model, &mut windowed, &ids, chunk);
            assert!(got == want, "{dtype} chunks of {chunk}: logits differ");
            // 70 tokens, window 8, blocks of 4: the full group holds 18 blocks, each of the
            // five sliding groups 3 (blocks 15..18), of 1 layer each, against 18 of 6 layers.
            assert_eq!(bytes * 108, full_bytes * 33, "{dtype} chunks of {chunk}");
        }
    }
}

/// A multi-turn chat keeps reusing its whole history with sliding-window memory: each turn's
/// prompt is the last one's prompt and answer plus a new message, and it is served from the
/// cache up to its last full block; the answers equal recomputation's.
#[test]
fn a_multi_turn_chat_reuses_its_whole_history_with_sliding_windows() {
    let (model, _) = tiny(TinyArch::Gemma3, 9);
    // A small pool: other traffic between turns evicts the blocks the window left behind.
    let mut kv = paged_as(&model, 4, 16, PolicyKind::Lru, KvDtype::F16);
    let mut evictions = 0;
    let mut history: Vec<u32> = (0..11).map(|i| (i * 7 % 200) as u32 + 4).collect();
    for turn in 0..4 {
        let out = generate(&model, &mut kv, &request(&history, 9), |_| true).unwrap();
        let fresh = greedy(&model, &history, 9, false, KvDtype::F16);
        assert_eq!(
            out.ids, fresh,
            "turn {turn}: output differs from recomputation"
        );
        if turn > 0 {
            // The last turn computed its prompt and 8 of its 9 answer tokens; 5 new ones since.
            assert_eq!(
                out.timings.cached_tokens,
                (history.len() - 6) / 4 * 4,
                "turn {turn}: the whole history, to its last full block"
            );
        }
        // Unrelated traffic between turns.
        let other: Vec<u32> = (0..30)
            .map(|i| (i * 11 + turn * 3) as u32 % 220 + 4)
            .collect();
        generate(&model, &mut kv, &request(&other, 3), |_| true).unwrap();
        kv.check_invariants().unwrap();
        evictions = kv.usage().evictions;
        history.extend(&out.ids);
        history.extend((0..5).map(|i| (i + turn as u32 * 5) % 200 + 4));
    }
    assert!(evictions > 0, "the pool was under pressure");
}
