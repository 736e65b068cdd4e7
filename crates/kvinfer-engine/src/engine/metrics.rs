//! What the engine loop reports: counters, latency histograms, and the cache's state. The loop
//! publishes a snapshot after every step; the server renders it (Prometheus text, JSON).

use kvinfer_cache::{BlockUsage, PrefixStats};
use kvinfer_tier::TierStats;
use serde::Serialize;

/// Upper bounds (seconds) of the latency histogram buckets; a last `+Inf` bucket is implied.
pub const LATENCY_BUCKETS_S: [f64; 14] = [
    0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// A cumulative histogram over [`LATENCY_BUCKETS_S`].
#[derive(Debug, Clone, Default, Serialize)]
pub struct Histogram {
    /// Observations at or below each bound (cumulative, as Prometheus wants them).
    pub buckets: Vec<u64>,
    /// All observations.
    pub count: u64,
    /// Their sum, in seconds.
    pub sum: f64,
}

impl Histogram {
    /// Records one observation of `seconds`.
    pub fn observe(&mut self, seconds: f64) {
        if self.buckets.is_empty() {
            self.buckets = vec![0; LATENCY_BUCKETS_S.len()];
        }
        for (b, &le) in self.buckets.iter_mut().zip(&LATENCY_BUCKETS_S) {
            if seconds <= le {
                *b += 1;
            }
        }
        self.count += 1;
        self.sum += seconds;
    }
}

/// A snapshot of the engine.
#[derive(Debug, Clone, Default, Serialize)]
pub struct EngineStats {
    /// Model name.
    pub model: String,
    /// Eviction policy name.
    pub policy: String,
    /// Tokens per block.
    pub block_size: usize,
    /// How K and V rows are stored (`f16`, `q8_0`, `q4_0`, `q4`).
    pub kv_dtype: String,
    /// KV bytes per token (all layers, K and V) in that dtype.
    pub kv_bytes_per_token: usize,
    /// Layer groups, a block table each (1, or Gemma 3's 6 with sliding-window savings).
    pub kv_groups: usize,
    /// Requests accepted.
    pub requests_total: u64,
    /// Requests finished, by outcome.
    pub requests_finished: u64,
    /// Requests cancelled (client gone) or failed.
    pub requests_aborted: u64,
    /// Sequences running now.
    pub running: usize,
    /// Sequences waiting for admission (new or preempted).
    pub waiting: usize,
    /// Sequences waiting for their prefix from a tier.
    pub loading: usize,
    /// Tier loads completed.
    pub tier_loads_total: u64,
    /// Prompt tokens brought into the pool from a tier.
    pub tier_hit_tokens_total: u64,
    /// Prompt tokens of accepted requests.
    pub prompt_tokens_total: u64,
    /// Tokens generated.
    pub generation_tokens_total: u64,
    /// Prompt tokens taken from the prefix cache at admission.
    pub cached_prompt_tokens_total: u64,
    /// Forward passes run.
    pub steps_total: u64,
    /// Tokens run through them (decode + prefill).
    pub batch_tokens_total: u64,
    /// Sequences preempted (their blocks taken back; recomputed later).
    pub preemptions_total: u64,
    /// Time to first token.
    pub ttft: Histogram,
    /// Time per output token after the first.
    pub tpot: Histogram,
    /// Time to compute a grammar's token mask (one per constrained token).
    pub grammar: Histogram,
    /// Where the pool's blocks are.
    pub blocks: BlockUsage,
    /// Prefix cache counters.
    pub prefix: PrefixStats,
    /// Each tier below the pool, in lookup order (read when the snapshot is taken).
    pub tiers: Vec<TierStats>,
}
