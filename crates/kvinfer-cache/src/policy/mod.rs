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
//! Block ids are dense (`0..capacity_blocks`), so implementations may keep per-block state in
//! vectors indexed by [`BlockId::index`].

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

    /// `block` is a candidate again. Idempotent. The pool unpins when the last sequence using a
    /// block releases it, so recency-based policies treat this as the block's last use.
    fn unpin(&mut self, block: BlockId);

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
    let _ = (capacity_blocks, seed);
    Box::new(TempLru {
        kind,
        clock: 0,
        last: Vec::new(),
        set: Default::default(),
    })
}

/// TEMPORARY stand-in until the real policies land (replaced at merge).
#[derive(Debug)]
struct TempLru {
    kind: PolicyKind,
    clock: u64,
    last: Vec<(u64, bool)>,
    set: std::collections::BTreeSet<(u64, u32)>,
}

impl TempLru {
    fn slot(&mut self, b: BlockId) -> &mut (u64, bool) {
        if self.last.len() <= b.index() {
            self.last.resize(b.index() + 1, (0, false));
        }
        &mut self.last[b.index()]
    }
}

impl EvictionPolicy for TempLru {
    fn kind(&self) -> PolicyKind {
        self.kind
    }
    fn insert(&mut self, block: BlockId, _key: u64) {
        self.clock += 1;
        let c = self.clock;
        *self.slot(block) = (c, true);
        self.set.insert((c, block.0));
    }
    fn access(&mut self, block: BlockId) {
        self.clock += 1;
        let c = self.clock;
        let (t, cand) = *self.slot(block);
        if cand {
            self.set.remove(&(t, block.0));
            self.set.insert((c, block.0));
        }
        *self.slot(block) = (c, cand);
    }
    fn pin(&mut self, block: BlockId) {
        let (t, cand) = *self.slot(block);
        if cand {
            self.set.remove(&(t, block.0));
        }
        *self.slot(block) = (t, false);
    }
    fn unpin(&mut self, block: BlockId) {
        let (t, cand) = *self.slot(block);
        if !cand {
            self.clock += 1;
            let c = self.clock;
            self.set.insert((c, block.0));
            *self.slot(block) = (c, true);
        } else {
            let _ = t;
        }
    }
    fn evict(&mut self) -> Option<BlockId> {
        let (t, b) = self.set.pop_first()?;
        let _ = t;
        *self.slot(BlockId(b)) = (0, false);
        Some(BlockId(b))
    }
    fn remove(&mut self, block: BlockId) {
        self.pin(block);
    }
    fn num_candidates(&self) -> usize {
        self.set.len()
    }
}
