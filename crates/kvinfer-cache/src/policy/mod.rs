//! Eviction policies: which cached, unreferenced block to reuse when the pool is full.
//!
//! One trait, one small implementation each, chosen by [`PolicyKind`]. The engine's pool and the
//! offline simulator (`crate::simulate`) drive the *same* implementations.
//!
//! # The contract
//! The cache tells a policy about every block that holds cached content. A block is a *candidate*
//! for eviction unless it is pinned: the pool pins blocks in use by a sequence and blocks whose
//! cached children remain (leaf first), so the policy itself never needs to know about either.
//! The simulator never pins. Every operation is O(1) or O(log n) in the number of blocks known.
//!
//! Block ids are dense (`0..capacity_blocks`), so implementations keep per-block state in vectors
//! indexed by [`BlockId::index`], grown on demand. Calls about a block the policy does not know
//! (`access`, `pin`, `unpin`, `remove`) do nothing; `insert` of a known block starts it afresh.
//!
//! # The implementations
//! - `keyed`: LRU, LFU-DA, FIFO and Random, each a small rule giving a block's priority key over
//!   one shared ordered set (O(log n)).
//! - `s3fifo`: S3-FIFO's three queues as intrusive lists over a vector (O(1), eviction amortised).

mod keyed;
mod s3fifo;

#[cfg(test)]
pub(crate) use keyed::splitmix64;

use crate::ids::BlockId;
use std::fmt;
use std::str::FromStr;

/// An eviction order over cached blocks.
pub trait EvictionPolicy: Send + fmt::Debug {
    /// Which policy this is.
    fn kind(&self) -> PolicyKind;

    /// `block` now holds cached content named `key` (its hash's low 64 bits in the engine, the
    /// trace's id in the simulator). It starts as an unpinned candidate with fresh state (a
    /// block id reused after eviction is a new object). Policies that remember evicted
    /// identities (S3-FIFO's ghost queue) look `key` up.
    fn insert(&mut self, block: BlockId, key: u64);

    /// A lookup hit `block` (pinned or not).
    fn access(&mut self, block: BlockId);

    /// `block` may not be evicted until [`EvictionPolicy::unpin`]. Idempotent. Keeps the block's
    /// history (frequency, queue).
    fn pin(&mut self, block: BlockId);

    /// `block` is a candidate again. Idempotent. `used`: the last sequence using it let go just
    /// now, so recency-based policies count this as the block's last use (LRU, LFU's tie-break)
    /// and queue policies re-queue it at the tail. Not `used`: it became a leaf because its last
    /// cached child was evicted; its history is unchanged and queue policies put it at the head
    /// (a cached chain drains from its leaf back, together).
    fn unpin(&mut self, block: BlockId, used: bool);

    /// Chooses the candidate to evict, forgets it, and returns it; `None` when every known block
    /// is pinned (or none is known).
    fn evict(&mut self) -> Option<BlockId>;

    /// Forgets `block` (pinned or not) without treating it as an eviction.
    fn remove(&mut self, block: BlockId);

    /// Blocks that could be evicted now.
    fn num_candidates(&self) -> usize;
}

/// The policies on offer (`--evict`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum PolicyKind {
    /// Least recently used (the default).
    #[default]
    Lru,
    /// Least frequently used, with dynamic aging (LFU-DA); ties go to the least recent.
    Lfu,
    /// First in, first out (by insertion).
    Fifo,
    /// Uniformly random among candidates, seeded (reproducible).
    Random,
    /// S3-FIFO (Yang et al., SOSP'23): a small probationary FIFO, a main FIFO with reinsertion,
    /// and a ghost queue of recently evicted identities.
    S3Fifo,
}

impl PolicyKind {
    /// Every policy, in the order reports list them.
    pub const ALL: [PolicyKind; 5] = [
        PolicyKind::Lru,
        PolicyKind::Lfu,
        PolicyKind::Fifo,
        PolicyKind::Random,
        PolicyKind::S3Fifo,
    ];

    /// The name used on the command line and in reports.
    pub fn name(self) -> &'static str {
        match self {
            PolicyKind::Lru => "lru",
            PolicyKind::Lfu => "lfu",
            PolicyKind::Fifo => "fifo",
            PolicyKind::Random => "random",
            PolicyKind::S3Fifo => "s3fifo",
        }
    }
}

impl fmt::Display for PolicyKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for PolicyKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        PolicyKind::ALL
            .into_iter()
            .find(|k| k.name().eq_ignore_ascii_case(s))
            .ok_or_else(|| {
                format!(
                    "unknown eviction policy {s:?}; choose one of lru, lfu, fifo, random, s3fifo"
                )
            })
    }
}

/// A fresh policy of `kind` for a cache of `capacity_blocks` blocks; `seed` drives `Random`.
pub fn new_policy(kind: PolicyKind, capacity_blocks: usize, seed: u64) -> Box<dyn EvictionPolicy> {
    use keyed::{Fifo, KeyedPolicy, LfuDa, Lru, Random};
    match kind {
        PolicyKind::Lru => Box::new(KeyedPolicy::new(Lru, capacity_blocks)),
        PolicyKind::Lfu => Box::new(KeyedPolicy::new(LfuDa::default(), capacity_blocks)),
        PolicyKind::Fifo => Box::new(KeyedPolicy::new(Fifo, capacity_blocks)),
        PolicyKind::Random => Box::new(KeyedPolicy::new(Random::new(seed), capacity_blocks)),
        PolicyKind::S3Fifo => Box::new(s3fifo::S3Fifo::new(capacity_blocks)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    /// Random operations on every policy against a model of the contract: `evict` returns a known,
    /// unpinned block (and `None` only when there is none); `num_candidates` counts them.
    #[test]
    fn every_policy_keeps_the_contract() {
        for kind in PolicyKind::ALL {
            let mut p = new_policy(kind, 32, 5);
            assert_eq!(p.kind(), kind);
            let mut known = HashSet::new();
            let mut pinned = HashSet::new();
            let mut x = 42;
            for step in 0..20_000 {
                x = splitmix64(x);
                let b = BlockId((x % 40) as u32);
                match (x >> 32) % 6 {
                    0 => {
                        p.insert(b, x >> 40);
                        known.insert(b);
                        pinned.remove(&b);
                    }
                    1 => p.access(b),
                    2 => {
                        p.pin(b);
                        if known.contains(&b) {
                            pinned.insert(b);
                        }
                    }
                    3 => {
                        p.unpin(b, true);
                        pinned.remove(&b);
                    }
                    4 => match p.evict() {
                        Some(v) => {
                            assert!(
                                known.remove(&v),
                                "{kind} step {step}: evicted unknown {v:?}"
                            );
                            assert!(!pinned.contains(&v), "{kind} step {step}: evicted pinned");
                        }
                        None => assert_eq!(known.len(), pinned.len(), "{kind} step {step}"),
                    },
                    _ => {
                        p.remove(b);
                        known.remove(&b);
                        pinned.remove(&b);
                    }
                }
                assert_eq!(
                    p.num_candidates(),
                    known.len() - pinned.len(),
                    "{kind} step {step}"
                );
            }
        }
    }
}
