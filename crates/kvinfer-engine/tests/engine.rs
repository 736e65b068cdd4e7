//! The engine loop on tiny models: many concurrent requests (continuous batching, chunked
//! prefill, preemption under a tiny pool) give exactly what one-at-a-time generation gives;
//! n > 1; cancellation frees blocks; bad submissions are refused.

mod common;

use common::{tiny, tiny_ctx};
use kvinfer_cache::{KvDtype, PolicyKind};
use kvinfer_engine::{
    generate, start_engine, CacheOptions, EngineConfig, EngineHandle, EngineRequest, Event,
    FinishReason, GenerateRequest, SamplingParams, SubmitError,
};
use kvinfer_model::testing::TinyArch;
use kvinfer_model::Model;
use std::time::{Duration, Instant};

fn engine(
    model: Model,
    num_blocks: usize,
    block_size: usize,
    max_batch_tokens: usize,
) -> EngineHandle {
    // `num_blocks` blocks of every layer: gemma3's hold one layer group each.
    let num_blocks = num_blocks * model.kv_groups(true).len();
    let config = EngineConfig {
        cache: CacheOptions {
            num_blocks: Some(num_blocks),
            block_size,
            ..CacheOptions::default()
        },
        max_batch_tokens,
        max_running: 8,
        ctx_size: 0,
        max_waiting: 256,
    };
    start_engine(model, config, |f| f()).unwrap().0
}

fn request(prompt: &[u32], max_tokens: usize, n: usize) -> EngineRequest {
    EngineRequest {
        prompt_ids: prompt.to_vec(),
        max_tokens,
        sampling: SamplingParams::greedy(),
        stop: vec![],
        n,
        ignore_eos: true,
        min_tokens: 0,
        logprobs: None,
        grammar: None,
    }
}

/// Everything a request's channel carried: text per choice, finish reasons, usage.
#[derive(Debug, Default)]
struct Outcome {
    text: Vec<String>,
    reasons: Vec<Option<FinishReason>>,
    usage: Option<kvinfer_engine::Usage>,
    error: Option<String>,
    logprobs: Vec<
        Vec<(
            kvinfer_engine::TokenLogprob,
            Vec<kvinfer_engine::TokenLogprob>,
        )>,
    >,
}

fn collect(mut rx: tokio::sync::mpsc::UnboundedReceiver<Event>, n: usize) -> Outcome {
    let mut o = Outcome {
        text: vec![String::new(); n],
        reasons: vec![None; n],
        ..Outcome::default()
    };
    while let Some(e) = rx.blocking_recv() {
        match e {
            Event::Text { index, text } => o.text[index].push_str(&text),
            Event::Done {
                index,
                finish_reason,
            } => {
                assert!(o.reasons[index].is_none(), "two Done for choice {index}");
                o.reasons[index] = Some(finish_reason);
            }
            Event::Usage(u) => o.usage = Some(u),
            Event::Error(e) => o.error = Some(e),
            Event::Logprob { index, token, top } => {
                o.logprobs.resize(n, Vec::new());
                o.logprobs[index].push((token, top));
            }
        }
    }
    o
}

/// Reference: one request at a time on a fresh cache, no prefix reuse.
fn alone(model: &Model, prompt: &[u32], max_tokens: usize) -> String {
    let mut kv = model
        .kv_identity(16, KvDtype::F16, false)
        .paged(64, PolicyKind::Lru, 0);
    let req = GenerateRequest {
        prefix_cache: false,
        ..GenerateRequest::greedy(prompt, max_tokens)
    };
    generate(model, &mut kv, &req, |_| true).unwrap().text
}

fn wait_idle(h: &EngineHandle) -> kvinfer_engine::EngineStats {
    let t = Instant::now();
    loop {
        let s = h.stats();
        if s.running == 0 && s.waiting == 0 && s.blocks.in_use == 0 {
            return s;
        }
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "engine never went idle: {s:?}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn prompts() -> Vec<Vec<u32>> {
    let stems: Vec<Vec<u32>> = (0..2)
        .map(|s| {
            (0..19)
                .map(|i| ((i * 7 + s * 90) % 240) as u32 + 4)
                .collect()
        })
        .collect();
    (0..12)
        .map(|r| {
            let mut p = stems[r % 2].clone();
            p.extend((0..(r % 4 + 1)).map(|i| ((r * 29 + i * 5) % 240) as u32 + 4));
            p
        })
        .collect()
}

#[test]
fn concurrent_requests_equal_one_at_a_time_even_under_preemption() {
    for arch in [TinyArch::Llama, TinyArch::Gemma3] {
        // (blocks, block size, batch tokens): roomy; then a pool so small that sequences are
        // preempted, with chunked prefill (prompts of 20+ tokens in chunks of at most 10).
        for (blocks, bs, batch) in [(128, 16, 256), (14, 4, 10)] {
            let (model, _) = tiny(arch, 21);
            let ps = prompts();
            let want: Vec<String> = ps.iter().map(|p| alone(&model, p, 12)).collect();
            let h = engine(model, blocks, bs, batch);
            let rxs: Vec<_> = ps
                .iter()
                .map(|p| h.submit(request(p, 12, 1)).unwrap())
                .collect();
            for ((rx, w), p) in rxs.into_iter().zip(&want).zip(&ps) {
                let o = collect(rx, 1);
                assert_eq!(o.error, None);
                assert_eq!(&o.text[0], w, "{arch:?} blocks {blocks}: prompt {p:?}");
                assert_eq!(o.reasons[0], Some(FinishReason::Length));
                let u = o.usage.expect("usage at the end");
                assert_eq!((u.prompt_tokens, u.completion_tokens), (p.len(), 12));
            }
            let s = wait_idle(&h);
            assert_eq!(s.requests_finished, 12);
            assert!(
                s.prefix.hit_tokens > 0,
                "{arch:?}: shared stems were never reused"
            );
            if blocks == 14 {
                assert!(
                    s.preemptions_total > 0,
                    "{arch:?}: the tiny pool never preempted"
                );
            }
            assert!(
                s.batch_tokens_total > s.steps_total,
                "{arch:?}: never more than one token per step: no batching"
            );
        }
    }
}

#[test]
fn n_choices_share_the_prompt_and_each_equals_a_single_run() {
    let (model, _) = tiny(TinyArch::Llama, 22);
    let p: Vec<u32> = (0..23).map(|i| (i * 13 % 200) as u32 + 4).collect();
    let want = alone(&model, &p, 10);
    let h = engine(model, 64, 4, 64);
    let o = collect(h.submit(request(&p, 10, 3)).unwrap(), 3);
    for i in 0..3 {
        assert_eq!(o.text[i], want, "choice {i}");
        assert_eq!(o.reasons[i], Some(FinishReason::Length));
    }
    assert_eq!(o.usage.unwrap().completion_tokens, 30);
    wait_idle(&h);
    // Sampled choices differ by seed (seed + index) but each is reproducible.
    let sampled = |h: &EngineHandle| {
        let mut r = request(&p, 16, 2);
        r.sampling = SamplingParams {
            temperature: 1.5,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            seed: 5,
            ..SamplingParams::default()
        };
        collect(h.submit(r).unwrap(), 2).text
    };
    let a = sampled(&h);
    assert_eq!(a, sampled(&h));
    assert_ne!(
        a[0], a[1],
        "two choices with different seeds drew the same 16 tokens"
    );
}

#[test]
fn a_dropped_receiver_cancels_and_frees_blocks() {
    // A long request, hung up on as soon as it is submitted: the engine sees the closed
    // channel at its next step, whatever the scheduling of this thread. (Hanging up after the
    // first text raced the tiny model's 8000 tokens on a busy machine: the request could end
    // first. A client hanging up mid-stream is tested against the real server, in
    // tests/openai.)
    let (model, _) = tiny_ctx(TinyArch::Llama, 23, 8192);
    let h = engine(model, 2100, 4, 64);
    let p: Vec<u32> = (0..30).map(|i| i + 4).collect();
    let rx = h.submit(request(&p, 8000, 1)).unwrap();
    drop(rx);
    // The engine takes the submission, then finds its client gone.
    let t = Instant::now();
    while h.stats().requests_aborted == 0 {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "a request whose client hung up was never aborted: {:?}",
            h.stats()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let s = wait_idle(&h);
    assert_eq!(s.requests_total, 1);
    assert_eq!(s.requests_aborted, 1);
    assert!(
        s.generation_tokens_total < 8000,
        "the request ran to the end"
    );
    // The engine keeps serving.
    let o = collect(h.submit(request(&p, 3, 1)).unwrap(), 1);
    assert_eq!(o.reasons[0], Some(FinishReason::Length));
}

#[test]
fn stop_strings_end_a_choice_and_the_text_stops_before_them() {
    let (model, _) = tiny(TinyArch::Llama, 24);
    let p = model.tokenizer.encode("the tin", true, false);
    let full = alone(&model, &p, 30);
    let chars: Vec<char> = full.chars().collect();
    assert!(chars.len() > 10, "{full:?}");
    let stop: String = chars[6..9].iter().collect();
    let h = engine(model, 64, 16, 64);
    let mut r = request(&p, 30, 1);
    r.stop = vec![stop.clone()];
    let o = collect(h.submit(r).unwrap(), 1);
    assert_eq!(o.text[0], full[..full.find(&stop).unwrap()]);
    assert_eq!(o.reasons[0], Some(FinishReason::Stop));
}

#[test]
fn bad_submissions_are_refused_with_reasons() {
    let (model, _) = tiny(TinyArch::Llama, 25);
    let ctx = model.config.context_length;
    let h = engine(model, 8, 4, 64);
    let bad = |r: EngineRequest| h.submit(r).expect_err("refused");
    assert!(matches!(bad(request(&[], 4, 1)), SubmitError::Invalid(_)));
    assert!(matches!(bad(request(&[5], 0, 1)), SubmitError::Invalid(_)));
    assert!(matches!(bad(request(&[5], 4, 0)), SubmitError::Invalid(_)));
    assert!(matches!(bad(request(&[5], 4, 99)), SubmitError::Invalid(_)));
    assert!(matches!(
        bad(request(&[u32::MAX], 4, 1)),
        SubmitError::Invalid(_)
    ));
    assert!(matches!(
        bad(request(&vec![5; ctx], 4, 1)),
        SubmitError::TooLong(_)
    ));
    // 8 blocks of 4 tokens: a 40-token prompt can never fit.
    let e = bad(request(&[5; 40], 4, 1));
    assert!(e.to_string().contains("--kv-cache-mb"), "{e}");
    // Still serving.
    let o = collect(h.submit(request(&[5, 6], 3, 1)).unwrap(), 1);
    assert_eq!(o.usage.unwrap().completion_tokens, 3);
}

#[test]
fn min_tokens_holds_off_end_of_generation_and_logit_bias_forces_or_bans() {
    let (model, path) = tiny(TinyArch::Llama, 5);
    let eog = model.tokenizer.eog_ids()[0];
    let h = engine(Model::load(&path).unwrap(), 64, 4, 64);
    let p = [5u32, 6, 7, 8, 9];
    let forced = |min_tokens: usize| {
        let mut r = request(&p, 12, 1);
        r.ignore_eos = false;
        r.min_tokens = min_tokens;
        r.sampling.logit_bias = vec![(eog, 100.0)];
        collect(h.submit(r).unwrap(), 1)
    };
    // EOG forced by +100: the choice stops at once, unless min_tokens holds it off.
    let o = forced(0);
    assert_eq!(
        (o.usage.unwrap().completion_tokens, o.reasons[0]),
        (1, Some(FinishReason::Stop))
    );
    let o = forced(5);
    assert_eq!(
        o.usage.unwrap().completion_tokens,
        6,
        "5 tokens, then the forced EOG"
    );
    // -100 on the greedy first token: another token comes first.
    let first = |bias: Vec<(u32, f32)>| {
        let mut kv = model
            .kv_identity(16, KvDtype::F16, false)
            .paged(64, PolicyKind::Lru, 0);
        let mut req = GenerateRequest::greedy(&p, 1);
        req.sampling.logit_bias = bias;
        generate(&model, &mut kv, &req, |_| true).unwrap().ids[0]
    };
    let greedy = first(vec![]);
    assert_ne!(first(vec![(greedy, -100.0)]), greedy);
    wait_idle(&h);
}

#[test]
fn past_max_waiting_submissions_are_refused_as_overloaded_until_the_queue_drains() {
    let (_, path) = tiny(TinyArch::Llama, 9);
    let config = EngineConfig {
        cache: CacheOptions {
            num_blocks: Some(256),
            block_size: 16,
            ..CacheOptions::default()
        },
        max_batch_tokens: 64,
        max_running: 1,
        ctx_size: 0,
        max_waiting: 3,
    };
    let h = start_engine(Model::load(&path).unwrap(), config, |f| f())
        .unwrap()
        .0;
    let mut accepted = Vec::new();
    let mut refused = 0;
    for i in 0..10 {
        match h.submit(request(&[5, 6, 7 + i], 200, 1)) {
            Ok(rx) => accepted.push(rx),
            Err(SubmitError::Overloaded(m)) => {
                assert!(m.contains("--max-waiting"), "{m}");
                refused += 1
            }
            Err(e) => panic!("{e}"),
        }
    }
    assert!(
        refused >= 5,
        "only {} accepted of 10 with one running and 3 waiting",
        accepted.len()
    );
    for rx in accepted {
        assert!(collect(rx, 1).error.is_none());
    }
    wait_idle(&h);
    assert!(
        h.submit(request(&[5, 6], 2, 1)).is_ok(),
        "the queue drained"
    );
}

#[test]
fn greedy_logprobs_put_the_chosen_token_on_top() {
    let (_, path) = tiny(TinyArch::Llama, 9);
    let h = engine(Model::load(&path).unwrap(), 64, 4, 64);
    let mut r = request(&[5, 6, 7, 8, 9, 10], 12, 1);
    r.logprobs = Some(3);
    let o = collect(h.submit(r).unwrap(), 1);
    assert_eq!(o.logprobs[0].len(), o.usage.unwrap().completion_tokens);
    for (t, top) in &o.logprobs[0] {
        assert_eq!(top.len(), 3);
        assert_eq!(top[0].id, t.id, "greedy picks the most likely token");
        assert_eq!(top[0].logprob, t.logprob);
        assert!(top.windows(2).all(|w| w[0].logprob >= w[1].logprob));
        assert!(t.logprob <= 0.0);
        let mass: f32 = top.iter().map(|x| x.logprob.exp()).sum();
        assert!(mass <= 1.0 + 1e-4, "{mass}");
    }
    let mut r = request(&[5, 6], 2, 1);
    r.logprobs = Some(kvinfer_engine::MAX_TOP_LOGPROBS + 1);
    assert!(matches!(h.submit(r), Err(SubmitError::Invalid(_))));
}
