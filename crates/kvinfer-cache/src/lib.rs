//! The KV cache core of kvinfer: pure and synchronous (no threads, no I/O, no tensor library).
//!
//! - [`ids`]: `BlockId`, `SeqId`, `BlockHash` (chained blake3 from a `ModelFingerprint`).
//! - [`policy`]: eviction policies behind one trait, chosen by `PolicyKind`.
//! - [`BlockPool`]: ref counts, free list, prefix index, eviction (leaf first).
//! - [`KvCacheManager`]: sequences, block tables, prefix reuse, copy-on-write (plan, then commit).
//! - [`KvStorage`]: the K/V bytes, block-major.
//! - [`simulate`]: the offline policy simulator over request traces, with Belady's optimum.
#![deny(missing_docs)]

pub mod ids;
mod manager;
pub mod policy;
mod pool;
pub mod simulate;
mod storage;

pub use ids::{BlockHash, BlockId, ModelFingerprint, SeqId, TokenId};
pub use manager::{
    BlockCopy, BlockUsage, CacheConfig, KvCacheManager, OutOfBlocks, PrefixMatch, PrefixStats,
};
pub use policy::{new_policy, EvictionPolicy, PolicyKind};
pub use pool::BlockPool;
pub use storage::{KvLayout, KvStorage};

/// A sequence-level cache: the manager (metadata) and the storage (bytes) it indexes, sized
/// alike. The engine owns one; the model reads and writes `storage` through block tables.
#[derive(Debug)]
pub struct PagedKv {
    /// Block tables, prefix index, eviction.
    pub manager: KvCacheManager,
    /// The K/V arena.
    pub storage: KvStorage,
}

impl PagedKv {
    /// A cache of `layout.num_blocks` blocks of `layout.block_size` tokens.
    pub fn new(
        layout: KvLayout,
        policy: PolicyKind,
        seed: u64,
        fingerprint: ModelFingerprint,
    ) -> Self {
        let manager = KvCacheManager::new(&CacheConfig {
            num_blocks: layout.num_blocks,
            block_size: layout.block_size,
            policy,
            seed,
            fingerprint,
        });
        Self {
            manager,
            storage: KvStorage::new(layout),
        }
    }

    /// Reserves room for `n_new` tokens of `seq` and applies any copy-on-write to the storage.
    pub fn reserve(&mut self, seq: SeqId, n_new: usize) -> Result<(), OutOfBlocks> {
        for c in self.manager.reserve(seq, n_new)? {
            self.storage.copy_block(c.src, c.dst);
        }
        Ok(())
    }
}
