//! The real models against llama.cpp: greedy generation token for token, first-step logits
//! (cosine > 0.997, same top-5), prompt tokenization, and cached == uncached generation.
//! The reference is bench/fixtures/generate-<model>.json, written by bench/make-fixtures.py.

mod common;

use half::f16;
use kvinfer_cache::{KvDtype, PagedKv, PolicyKind};
use kvinfer_engine::{generate, GenerateRequest, SamplingParams};
use kvinfer_model::Model;
use serde_json::Value;

/// Where llama.cpp's own top-2 margin is below this, a different choice is a near-tie, not a bug.
const NEAR_TIE: f64 = 0.1;

fn fixture(alias: &str) -> Value {
    let p = common::root().join(format!("bench/fixtures/generate-{alias}.json"));
    let text = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    serde_json::from_str(&text).unwrap()
}

fn cases(fx: &Value) -> &Vec<Value> {
    fx["prompts"]
        .as_array()
        .expect("fixture has a prompts array")
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

/// A cache of 512 positions (32 blocks of 16).
fn fresh_kv(model: &Model) -> PagedKv {
    model
        .kv_identity(16, KvDtype::F16, false)
        .paged(32, PolicyKind::Lru, 0)
}

fn greedy(model: &Model, prompt: &[u32], n: usize, use_kv_cache: bool) -> Vec<u32> {
    let mut kv = fresh_kv(model);
    let req = GenerateRequest {
        prompt_ids: prompt.to_vec(),
        max_tokens: n,
        sampling: SamplingParams::greedy(),
        stop: vec![],
        ignore_eos: true,
        use_kv_cache,
        prefix_cache: false,
        ctx_size: 0,
    };
    generate(model, &mut kv, &req, |_| true).unwrap().ids
}

/// Last-token logits of `ids` run as one batch on a fresh cache.
fn first_logits(model: &Model, ids: &[u32]) -> Vec<f32> {
    let mut kv = fresh_kv(model);
    let (seq, _) = kv.add_sequence(ids, false);
    kvinfer_engine::extend_sequence(model, &mut kv, seq, ids)
        .unwrap()
        .expect("512 positions hold the prompt")
}

fn top_k(logits: &[f32], k: usize) -> Vec<u32> {
    let mut idx: Vec<u32> = (0..logits.len() as u32).collect();
    idx.sort_by(|&a, &b| logits[b as usize].total_cmp(&logits[a as usize]));
    idx.truncate(k);
    idx
}

fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum();
    let na: f64 = a.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    dot / (na * nb)
}

fn check_model(alias: &str, file: &str) {
    let model = Model::load(&common::model_path(file)).unwrap();
    let fx = fixture(alias);
    let cases = cases(&fx);
    assert!(
        cases.len() >= 10,
        "{alias}: fixture has {} prompts, want >= 10",
        cases.len()
    );
    let mut report = Vec::new();
    let mut failures = Vec::new();
    let (mut exact, mut noisy) = (0usize, 0usize);
    // llama.cpp's own noise on this model: the most any of its top-10 first-step logits moves when
    // a fixture prompt is evaluated token by token instead of in one batch (same build, same
    // weights). A top-1/top-2 margin can move by twice that, so a gap under this band is not
    // something either engine decides reliably; beyond it, a difference is a bug.
    let band = 2.0
        * cases
            .iter()
            .filter_map(|c| c["llamacpp_self_noise"]["top10_max_abs_diff"].as_f64())
            .fold(NEAR_TIE / 2.0, f64::max);
    for (i, c) in cases.iter().enumerate() {
        let prompt = c["prompt"].as_str().unwrap();
        let special = c["special"].as_bool().unwrap_or(false);
        let want_prompt = ids(&c["prompt_ids"]);
        let got_prompt = model.tokenizer.encode(prompt, true, special);
        if got_prompt != want_prompt {
            failures.push(format!(
                "#{i} prompt ids differ: {got_prompt:?} vs llama.cpp {want_prompt:?}"
            ));
            continue;
        }
        // First step: logits against llama.cpp's.
        let logits = first_logits(&model, &want_prompt);
        // Top-5: the same ids in the same order, except where llama.cpp itself scores the two ids
        // at a rank within NEAR_TIE of each other (its top-10 logits are in the fixture).
        let want_top5 = ids(&c["top5_first"]);
        let got_top5 = top_k(&logits, 5);
        let top10: Vec<(u32, f64)> = c["top10_first"]
            .as_array()
            .expect("fixture has top10_first (regenerate with bench/make-fixtures.py)")
            .iter()
            .map(|p| (p[0].as_u64().unwrap() as u32, p[1].as_f64().unwrap()))
            .collect();
        let ref_logit = |id: u32| top10.iter().find(|p| p.0 == id).map(|p| p.1);
        for (rank, (&g, &w)) in got_top5.iter().zip(&want_top5).enumerate() {
            let tie = match (ref_logit(g), ref_logit(w)) {
                (Some(lg), Some(lw)) => (lw - lg).abs() < band,
                _ => false,
            };
            if g != w && !tie {
                failures.push(format!(
                    "#{i} top-5 {got_top5:?} vs llama.cpp {want_top5:?} (rank {rank})"
                ));
                break;
            }
        }
        if let Some(f) = c["first_logits_file"].as_str() {
            let bytes = std::fs::read(common::root().join("bench/fixtures").join(f)).unwrap();
            let reference: Vec<f32> = bytes
                .chunks_exact(2)
                .map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect();
            let cos = cosine(&logits, &reference);
            // The bar is 0.997, or llama.cpp's own agreement with itself (its batched vs
            // token-by-token logits on this prompt) where that is lower: no engine can be asked
            // to match llama.cpp more closely than llama.cpp matches itself. Not 0.999: the same
            // formulas summed in another order move these logits that far on short prompts
            // (SmolLM2 #0, 5 tokens: kvinfer's scalar and AVX-512 row kernels, both in
            // llama.cpp's per-level order, agree at 0.99947; the packed group kernels, which sum
            // each block exactly and then block after block, sit at 0.9983 from llama.cpp, with
            // the same error against an f64 product as the row kernels, 3.7e-3 rms), while a
            // wrong formula costs far more (0.9 and below).
            let own = c["llamacpp_self_noise"]["cosine"].as_f64().unwrap_or(1.0);
            let bar = own.min(0.997);
            report.push(format!(
                "#{i} first-step cosine {cos:.6} (bar {bar:.6}; llama.cpp vs itself {own:.6})"
            ));
            if cos <= bar {
                failures.push(format!("#{i} first-step logits cosine {cos} <= {bar}"));
            }
        }
        // Greedy generation, token for token.
        let want = ids(&c["ids"]);
        let margins: Vec<f64> = c["margins"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m.as_f64().unwrap())
            .collect();
        let got = greedy(&model, &want_prompt, want.len(), true);
        match got.iter().zip(&want).position(|(a, b)| a != b) {
            None => {
                exact += 1;
                report.push(format!("#{i} {} tokens equal", want.len()))
            }
            Some(step) if margins[step] < NEAR_TIE => {
                exact += 1;
                report.push(format!(
                    "#{i} near-tie at step {step}: llama.cpp margin {:.4} (ours {} vs {})",
                    margins[step], got[step], want[step]
                ))
            }
            Some(step) if margins[step] < band => {
                noisy += 1;
                report.push(format!(
                    "#{i} differs at step {step}: llama.cpp margin {:.3} is inside its own noise band {band:.3}",
                    margins[step]
                ))
            }
            Some(step) => failures.push(format!(
                "#{i} differs at step {step} (llama.cpp margin {:.3}, noise band {band:.3}): ours {:?} vs {:?}",
                margins[step],
                &got[step..],
                &want[step..]
            )),
        }
    }
    // Most prompts must agree outright (or part only at a near-tie).
    if exact * 3 < cases.len() * 2 {
        failures.push(format!(
            "only {exact} of {} prompts agree up to near-ties",
            cases.len()
        ));
    }
    report.push(format!(
        "{exact} prompts equal up to near-ties (< {NEAR_TIE}), {noisy} part inside llama.cpp's own noise band {band:.3}"
    ));
    eprintln!(
        "{alias} vs llama.cpp {}:\n  {}",
        fx["llama_cpp_version"],
        report.join("\n  ")
    );
    assert!(failures.is_empty(), "{alias}:\n{}", failures.join("\n"));
}

#[test]
fn smollm2_matches_llamacpp() {
    check_model(common::MODELS[0].0, common::MODELS[0].1);
}

#[test]
fn gemma3_matches_llamacpp() {
    check_model(common::MODELS[1].0, common::MODELS[1].1);
}

#[test]
fn cached_equals_uncached_on_real_models() {
    for (alias, file) in common::MODELS {
        let model = Model::load(&common::model_path(file)).unwrap();
        let prompt = model
            .tokenizer
            .encode("Here is a short story about a robot who", true, false);
        let with = greedy(&model, &prompt, 24, true);
        let without = greedy(&model, &prompt, 24, false);
        assert_eq!(with, without, "{alias}");
    }
}
