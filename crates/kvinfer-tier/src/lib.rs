//! kvinfer-tier: where KV blocks go when they leave the block pool, and where they come back from.
//!
//! ```text
//!   pool (kvinfer-cache) ──evicted──> RamTier  (byte budget, own eviction policy, lz4)
//!        │          ──registered──> DiskTier (a directory; survives restart; size cap, TTL)
//!        │          ──registered──> RedisTier (one redis-server or a Redis Cluster; TTL + jitter)
//!        └── miss: TieredStore looks RAM -> disk -> Redis, stops at the first missing block
//! ```
//!
//! - [`TierKey`]: (model fingerprint, layer group, block hash). Blocks of another model, dtype
//!   or layer group have another key, and their header says so too.
//! - [`wire`]: the block's bytes on every tier: a header (magic, version, fingerprint, group,
//!   hash, dtype, shape, token ids, lengths, crc32c) and the payload, maybe compressed. A block
//!   failing any check is a miss, is deleted from its tier, and is counted; never served.
//! - [`Tier`]: get / put / contains / delete (and batch forms) over wire bytes, with counters.
//! - [`TieredStore`]: the tiers in lookup order, background workers with bounded queues (the
//!   engine loop never waits on disk or network), write-back / write-through per tier.
#![deny(missing_docs)]

pub mod codec;
mod disk;
mod index;
mod ram;
mod redis_tier;
mod stats;
mod store;
pub mod testing;
pub mod wire;

pub use codec::Codec;
pub use disk::{DiskScan, DiskTier, DiskTierConfig};
pub use ram::RamTier;
pub use redis_tier::{RedisTarget, RedisTier, RedisTierConfig};
pub use stats::{LatencyHistogram, TierCounters, TierStats, TIER_LATENCY_BUCKETS_S};
pub use store::{
    LoadRequest, LoadResult, LoadRun, TierSpec, TieredStore, TieredStoreConfig, WriteMode,
};
pub use wire::BlockSpec;

use kvinfer_cache::{BlockHash, ModelFingerprint};

/// Names a block on every tier: the model's KV identity, the layer group, the content hash.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TierKey {
    /// Digest of the weights, KV dtype, block size and format version.
    pub fingerprint: ModelFingerprint,
    /// Layers that share block tables (0 for models with one group; Gemma 3: 0 full attention,
    /// 1-5 sliding window).
    pub group: u16,
    /// The block's content hash (chained from the fingerprint's root).
    pub hash: BlockHash,
}

impl TierKey {
    /// Hex of the fingerprint's first 16 bytes: the per-model namespace on disk and in Redis.
    pub fn model_hex(&self) -> String {
        hex(&self.fingerprint.0[..16])
    }

    /// Hex of the block hash.
    pub fn hash_hex(&self) -> String {
        hex(&self.hash.0)
    }
}

/// Lower-case hex of `bytes`.
pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Parses lower-case hex into exactly `N` bytes.
pub(crate) fn unhex<const N: usize>(s: &str) -> Option<[u8; N]> {
    if s.len() != 2 * N {
        return None;
    }
    let mut out = [0u8; N];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

/// What can go wrong in a tier. A failed read is a miss to the engine, never a failed request.
#[derive(Debug, thiserror::Error)]
pub enum TierError {
    /// The file system failed (full disk, permissions, read-only...).
    #[error("disk tier: {0}")]
    Io(#[from] std::io::Error),
    /// Redis failed or is unreachable.
    #[error("redis tier: {0}")]
    Redis(String),
    /// The tier is switched off for a while after repeated failures (circuit breaker open).
    #[error("{0} tier unavailable (circuit open after repeated failures)")]
    Unavailable(&'static str),
    /// A configuration value is out of range.
    #[error("{0}")]
    Config(String),
}

/// A storage level below the pool. Values are wire-encoded blocks ([`wire`]); a tier stores and
/// returns bytes and never interprets them (the store verifies every block it reads). All
/// methods take `&self`: tiers are shared between the loader and the writers.
pub trait Tier: Send + Sync {
    /// Short name: `ram`, `disk`, `redis`, `redis-cluster`.
    fn name(&self) -> &'static str;

    /// The stored value of `key`, if any. A tier counts its own failures (`errors`,
    /// `timeouts`); the store counts hits, misses and corrupt blocks.
    fn get(&self, key: &TierKey) -> Result<Option<Vec<u8>>, TierError>;

    /// Stores `value` under `key` (replacing any). May evict other entries to stay in budget.
    fn put(&self, key: &TierKey, value: &[u8]) -> Result<(), TierError>;

    /// Whether `key` is stored (cheap where the tier keeps an index).
    fn contains(&self, key: &TierKey) -> Result<bool, TierError>;

    /// Removes `key` (a corrupt block, or a clear).
    fn delete(&self, key: &TierKey) -> Result<(), TierError>;

    /// `get` of many keys, in order (pipelined where the tier is remote). One value per key; a
    /// key that could not be read (an unreadable file, a failed or late Redis round trip) is
    /// `None`, counted by the tier in `errors` or `timeouts`: one bad entry never costs the
    /// others, and a prefix is served up to it. `Err` only when nothing could be read (circuit
    /// open, Redis unreachable).
    fn get_many(&self, keys: &[TierKey]) -> Result<Vec<Option<Vec<u8>>>, TierError> {
        Ok(keys.iter().map(|k| self.get(k).unwrap_or(None)).collect())
    }

    /// `get_many` of values of about `value_bytes` each (the store knows a block's size from
    /// its [`BlockSpec`]): a remote tier sizes its round trips and their deadlines by it.
    fn get_many_sized(
        &self,
        keys: &[TierKey],
        value_bytes: usize,
    ) -> Result<Vec<Option<Vec<u8>>>, TierError> {
        let _ = value_bytes;
        self.get_many(keys)
    }

    /// `contains` of many keys, in order (one round trip where the tier is remote).
    fn contains_many(&self, keys: &[TierKey]) -> Result<Vec<bool>, TierError> {
        keys.iter().map(|k| self.contains(k)).collect()
    }

    /// `put` of many entries.
    fn put_many(&self, entries: &[(TierKey, Vec<u8>)]) -> Result<(), TierError> {
        entries.iter().try_for_each(|(k, v)| self.put(k, v))
    }

    /// Removes every entry of this tier's namespace (or of `model` only); returns how many.
    fn clear(&self, model: Option<&ModelFingerprint>) -> Result<u64, TierError>;

    /// Its counters (the store adds hits, misses, corrupt blocks and latencies).
    fn counters(&self) -> &TierCounters;

    /// A snapshot of its counters plus what it holds.
    fn stats(&self) -> TierStats;
}
