//! Per-tier counters: atomics the loader and writers bump, snapshotted for `/v1/stats`,
//! Prometheus and `kvinfer cache stats`.

use serde::Serialize;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// Upper bounds (seconds) of the tier latency buckets; a last `+Inf` bucket is implied.
pub const TIER_LATENCY_BUCKETS_S: [f64; 12] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
];

/// A lock-free cumulative histogram over [`TIER_LATENCY_BUCKETS_S`].
#[derive(Debug, Default)]
pub struct AtomicHistogram {
    buckets: [AtomicU64; 12],
    count: AtomicU64,
    sum_ns: AtomicU64,
}

impl AtomicHistogram {
    /// Records one observation.
    pub fn observe(&self, seconds: f64) {
        for (b, &le) in self.buckets.iter().zip(&TIER_LATENCY_BUCKETS_S) {
            if seconds <= le {
                b.fetch_add(1, Relaxed);
            }
        }
        self.count.fetch_add(1, Relaxed);
        self.sum_ns.fetch_add((seconds * 1e9) as u64, Relaxed);
    }

    fn snapshot(&self) -> LatencyHistogram {
        LatencyHistogram {
            buckets: self.buckets.iter().map(|b| b.load(Relaxed)).collect(),
            count: self.count.load(Relaxed),
            sum: self.sum_ns.load(Relaxed) as f64 / 1e9,
        }
    }
}

/// A histogram snapshot (cumulative buckets, as Prometheus wants them).
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct LatencyHistogram {
    /// Observations at or below each bound of [`TIER_LATENCY_BUCKETS_S`].
    pub buckets: Vec<u64>,
    /// All observations.
    pub count: u64,
    /// Their sum in seconds.
    pub sum: f64,
}

/// The live counters of one tier.
#[derive(Debug, Default)]
pub struct TierCounters {
    /// Blocks found and verified.
    pub hits: AtomicU64,
    /// Blocks asked for and not there (or unreadable).
    pub misses: AtomicU64,
    /// Blocks stored.
    pub puts: AtomicU64,
    /// Writes skipped because the tier already held the block.
    pub put_skipped: AtomicU64,
    /// Writes dropped because the write queue was full.
    pub put_dropped: AtomicU64,
    /// Bytes read (wire form).
    pub bytes_read: AtomicU64,
    /// Bytes written (wire form).
    pub bytes_written: AtomicU64,
    /// Failed operations (I/O, network); a missed deadline is counted in `timeouts` instead.
    pub errors: AtomicU64,
    /// Round trips that missed their deadline (Redis): the blocks from there on are misses.
    /// Apart from `errors` because a slow tier wants another fix (a longer
    /// `--redis-timeout-ms`, a closer Redis) than a failing one.
    pub timeouts: AtomicU64,
    /// Entries evicted to stay within the budget (or expired).
    pub evictions: AtomicU64,
    /// Blocks that failed a check: deleted, counted, never served.
    pub corrupt: AtomicU64,
    /// Read latency (one batch read).
    pub read_latency: AtomicHistogram,
    /// Write latency (one block).
    pub write_latency: AtomicHistogram,
}

impl TierCounters {
    /// Adds `n` to `counter`.
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Relaxed);
    }

    /// A snapshot, with what the tier holds.
    pub fn snapshot(
        &self,
        name: &'static str,
        entries: u64,
        bytes: u64,
        healthy: bool,
    ) -> TierStats {
        TierStats {
            name,
            entries,
            bytes,
            healthy,
            hits: self.hits.load(Relaxed),
            misses: self.misses.load(Relaxed),
            puts: self.puts.load(Relaxed),
            put_skipped: self.put_skipped.load(Relaxed),
            put_dropped: self.put_dropped.load(Relaxed),
            bytes_read: self.bytes_read.load(Relaxed),
            bytes_written: self.bytes_written.load(Relaxed),
            errors: self.errors.load(Relaxed),
            timeouts: self.timeouts.load(Relaxed),
            evictions: self.evictions.load(Relaxed),
            corrupt: self.corrupt.load(Relaxed),
            read_latency: self.read_latency.snapshot(),
            write_latency: self.write_latency.snapshot(),
        }
    }
}

/// A tier's state for reports.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct TierStats {
    /// `ram`, `disk`, `redis`, `redis-cluster`.
    pub name: &'static str,
    /// Blocks held (for Redis: unknown, 0).
    pub entries: u64,
    /// Bytes held (wire form; for Redis: unknown, 0).
    pub bytes: u64,
    /// False while the tier is failing (circuit open).
    pub healthy: bool,
    /// See [`TierCounters`].
    pub hits: u64,
    /// See [`TierCounters`].
    pub misses: u64,
    /// See [`TierCounters`].
    pub puts: u64,
    /// See [`TierCounters`].
    pub put_skipped: u64,
    /// See [`TierCounters`].
    pub put_dropped: u64,
    /// See [`TierCounters`].
    pub bytes_read: u64,
    /// See [`TierCounters`].
    pub bytes_written: u64,
    /// See [`TierCounters`].
    pub errors: u64,
    /// See [`TierCounters`].
    pub timeouts: u64,
    /// See [`TierCounters`].
    pub evictions: u64,
    /// See [`TierCounters`].
    pub corrupt: u64,
    /// See [`TierCounters`].
    pub read_latency: LatencyHistogram,
    /// See [`TierCounters`].
    pub write_latency: LatencyHistogram,
}
