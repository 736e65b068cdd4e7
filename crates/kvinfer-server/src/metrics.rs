//! `/metrics`: the engine's snapshot in Prometheus' text format (names `kvinfer_*`). A handful
//! of lines of formatting; no registry is needed since the engine keeps the numbers.

use kvinfer_engine::{EngineStats, Histogram, LATENCY_BUCKETS_S};
use std::fmt::Write;

fn metric(out: &mut String, name: &str, kind: &str, help: &str, value: impl std::fmt::Display) {
    let _ = writeln!(
        out,
        "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
    );
}

fn histogram(out: &mut String, name: &str, help: &str, h: &Histogram) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
    for (i, le) in LATENCY_BUCKETS_S.iter().enumerate() {
        let n = h.buckets.get(i).copied().unwrap_or(0);
        let _ = writeln!(out, "{name}_bucket{{le=\"{le}\"}} {n}");
    }
    let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {}", h.count);
    let _ = writeln!(out, "{name}_sum {}\n{name}_count {}", h.sum, h.count);
}

/// Renders `s` (and the HTTP error count) as Prometheus text.
pub fn render(s: &EngineStats, http_errors: u64) -> String {
    let mut o = String::new();
    let c = "counter";
    let g = "gauge";
    metric(
        &mut o,
        "kvinfer_requests_total",
        c,
        "Requests accepted by the engine.",
        s.requests_total,
    );
    metric(
        &mut o,
        "kvinfer_requests_finished_total",
        c,
        "Requests completed.",
        s.requests_finished,
    );
    metric(
        &mut o,
        "kvinfer_requests_aborted_total",
        c,
        "Requests cancelled (client gone) or failed.",
        s.requests_aborted,
    );
    metric(
        &mut o,
        "kvinfer_http_errors_total",
        c,
        "HTTP answers with a 4xx or 5xx status.",
        http_errors,
    );
    metric(
        &mut o,
        "kvinfer_requests_running",
        g,
        "Sequences in the running batch.",
        s.running,
    );
    metric(
        &mut o,
        "kvinfer_requests_waiting",
        g,
        "Sequences waiting for admission.",
        s.waiting,
    );
    metric(
        &mut o,
        "kvinfer_prompt_tokens_total",
        c,
        "Prompt tokens of accepted requests.",
        s.prompt_tokens_total,
    );
    metric(
        &mut o,
        "kvinfer_generation_tokens_total",
        c,
        "Tokens generated.",
        s.generation_tokens_total,
    );
    metric(
        &mut o,
        "kvinfer_steps_total",
        c,
        "Batched forward passes.",
        s.steps_total,
    );
    metric(
        &mut o,
        "kvinfer_batch_tokens_total",
        c,
        "Tokens run through forward passes.",
        s.batch_tokens_total,
    );
    metric(
        &mut o,
        "kvinfer_preemptions_total",
        c,
        "Sequences preempted for lack of blocks.",
        s.preemptions_total,
    );
    histogram(
        &mut o,
        "kvinfer_time_to_first_token_seconds",
        "Time from arrival to the first token.",
        &s.ttft,
    );
    histogram(
        &mut o,
        "kvinfer_time_per_output_token_seconds",
        "Time between output tokens.",
        &s.tpot,
    );
    metric(
        &mut o,
        "kvinfer_kv_blocks_total",
        g,
        "KV blocks in the pool.",
        s.blocks.total,
    );
    metric(
        &mut o,
        "kvinfer_kv_blocks_used",
        g,
        "KV blocks held by running sequences.",
        s.blocks.in_use,
    );
    metric(
        &mut o,
        "kvinfer_kv_blocks_cached",
        g,
        "KV blocks holding a cached prefix, evictable.",
        s.blocks.cached,
    );
    metric(
        &mut o,
        "kvinfer_kv_blocks_free",
        g,
        "KV blocks holding nothing.",
        s.blocks.free,
    );
    metric(
        &mut o,
        "kvinfer_kv_block_size_tokens",
        g,
        "Tokens per KV block.",
        s.block_size,
    );
    metric(
        &mut o,
        "kvinfer_prefix_cache_queries_total",
        c,
        "Prompts looked up in the prefix cache.",
        s.prefix.queries,
    );
    metric(
        &mut o,
        "kvinfer_prefix_cache_query_tokens_total",
        c,
        "Prompt tokens looked up.",
        s.prefix.query_tokens,
    );
    metric(
        &mut o,
        "kvinfer_prefix_cache_hit_tokens_total",
        c,
        "Prompt tokens served from the prefix cache.",
        s.prefix.hit_tokens,
    );
    let _ = writeln!(
        o,
        "# HELP kvinfer_kv_evictions_total Cached KV blocks evicted, by policy.\n\
         # TYPE kvinfer_kv_evictions_total counter\n\
         kvinfer_kv_evictions_total{{policy=\"{}\"}} {}",
        s.policy, s.blocks.evictions
    );
    o
}
