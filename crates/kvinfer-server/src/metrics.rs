//! `/metrics`: the engine's snapshot in Prometheus' text format (names `kvinfer_*`). A handful
//! of lines of formatting; no registry is needed since the engine keeps the numbers.

use kvinfer_engine::{
    EngineStats, Histogram, TierStats, LATENCY_BUCKETS_S, TIER_LATENCY_BUCKETS_S,
};
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
    metric(
        &mut o,
        "kvinfer_requests_loading",
        g,
        "Sequences waiting for their prefix from a tier.",
        s.loading,
    );
    metric(
        &mut o,
        "kvinfer_tier_loads_total",
        c,
        "Tier loads completed.",
        s.tier_loads_total,
    );
    metric(
        &mut o,
        "kvinfer_tier_hit_tokens_total",
        c,
        "Prompt tokens brought into the pool from a tier.",
        s.tier_hit_tokens_total,
    );
    tiers(&mut o, &s.tiers);
    o
}

/// One labelled family per tier counter: `kvinfer_tier_*{tier="ram|disk|redis|redis-cluster"}`.
fn tiers(o: &mut String, tiers: &[TierStats]) {
    if tiers.is_empty() {
        return;
    }
    type Get = fn(&TierStats) -> u64;
    let families: [(&str, &str, &str, Get); 14] = [
        (
            "kvinfer_tier_hits_total",
            "counter",
            "Blocks found and verified.",
            |t| t.hits,
        ),
        (
            "kvinfer_tier_misses_total",
            "counter",
            "Blocks asked for and absent.",
            |t| t.misses,
        ),
        (
            "kvinfer_tier_puts_total",
            "counter",
            "Blocks stored.",
            |t| t.puts,
        ),
        (
            "kvinfer_tier_put_skipped_total",
            "counter",
            "Writes skipped: the tier held the block.",
            |t| t.put_skipped,
        ),
        (
            "kvinfer_tier_put_dropped_total",
            "counter",
            "Writes dropped: the write queue was full.",
            |t| t.put_dropped,
        ),
        (
            "kvinfer_tier_read_bytes_total",
            "counter",
            "Bytes read (wire form).",
            |t| t.bytes_read,
        ),
        (
            "kvinfer_tier_written_bytes_total",
            "counter",
            "Bytes written (wire form).",
            |t| t.bytes_written,
        ),
        (
            "kvinfer_tier_errors_total",
            "counter",
            "Failed tier operations.",
            |t| t.errors,
        ),
        (
            "kvinfer_tier_timeouts_total",
            "counter",
            "Tier reads past their deadline (Redis); the blocks from there on were misses.",
            |t| t.timeouts,
        ),
        (
            "kvinfer_tier_evictions_total",
            "counter",
            "Blocks evicted or expired by the tier.",
            |t| t.evictions,
        ),
        (
            "kvinfer_tier_corrupt_blocks_total",
            "counter",
            "Blocks refused by a check, deleted, never served.",
            |t| t.corrupt,
        ),
        (
            "kvinfer_tier_entries",
            "gauge",
            "Blocks held (0 where the tier cannot tell cheaply: Redis).",
            |t| t.entries,
        ),
        (
            "kvinfer_tier_bytes",
            "gauge",
            "Bytes held (0 where the tier cannot tell cheaply: Redis).",
            |t| t.bytes,
        ),
        (
            "kvinfer_tier_healthy",
            "gauge",
            "1 while the tier works, 0 while its circuit is open.",
            |t| t.healthy as u64,
        ),
    ];
    for (name, kind, help, get) in families {
        let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for t in tiers {
            let _ = writeln!(o, "{name}{{tier=\"{}\"}} {}", t.name, get(t));
        }
    }
    for (name, help, pick) in [
        (
            "kvinfer_tier_read_seconds",
            "Latency of one batched tier read.",
            0,
        ),
        (
            "kvinfer_tier_write_seconds",
            "Latency of one block write.",
            1,
        ),
    ] {
        let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} histogram");
        for t in tiers {
            let h = if pick == 0 {
                &t.read_latency
            } else {
                &t.write_latency
            };
            for (i, le) in TIER_LATENCY_BUCKETS_S.iter().enumerate() {
                let n = h.buckets.get(i).copied().unwrap_or(0);
                let _ = writeln!(o, "{name}_bucket{{tier=\"{}\",le=\"{le}\"}} {n}", t.name);
            }
            let _ = writeln!(
                o,
                "{name}_bucket{{tier=\"{}\",le=\"+Inf\"}} {}",
                t.name, h.count
            );
            let _ = writeln!(
                o,
                "{name}_sum{{tier=\"{}\"}} {}\n{name}_count{{tier=\"{}\"}} {}",
                t.name, h.sum, t.name, h.count
            );
        }
    }
}
