//! The KV cache core of kvinfer: pure and synchronous (no threads, no I/O, no tensor library).
//!
//! - [`ids`]: `BlockId`, `SeqId`, `BlockHash` (chained blake3 from a `ModelFingerprint`).
//! - [`policy`]: eviction policies behind one trait, chosen by `PolicyKind`.
//! - [`BlockPool`]: ref counts, free list, prefix index, eviction (leaf first).
//! - [`KvCacheManager`]: sequences, block tables, prefix reuse, copy-on-write (plan, then commit).
//! - [`KvGroups`]: layer groups (full and sliding-window attention), a block table each.
//! - [`KvStorage`]: the K/V bytes, block-major.
//! - [`PagedKv`]: the one door to the cache (manager + storage), reporting block events to a sink.
//! - [`simulate`]: the offline policy simulator over request traces, with Belady's optimum.
#![deny(missing_docs)]

// Block bytes are f16 little-endian as they lie in memory; tiers exchange them as is.
#[cfg(not(target_endian = "little"))]
compile_error!("kvinfer stores KV blocks as little-endian bytes");

pub mod groups;
pub mod ids;
mod manager;
mod paged;
pub mod policy;
mod pool;
pub mod simulate;
mod storage;

pub use groups::{first_needed_block, KvGroups, HOLE};
pub use ids::{BlockHash, BlockId, ModelFingerprint, SeqId, TokenId};
pub use manager::{
    BlockCopy, BlockUsage, CacheConfig, Import, KvCacheManager, OutOfBlocks, PrefixMatch,
    PrefixStats,
};
pub use paged::{KvEventSink, PagedKv, SeqTables};
pub use policy::{new_policy, EvictionPolicy, PolicyKind};
pub use pool::{BlockPool, PoolEvent};
pub use storage::{KvDtype, KvLayout, KvStorage};
