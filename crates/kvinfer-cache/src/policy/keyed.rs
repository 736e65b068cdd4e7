//! Policies that order candidates by a priority key: LRU, LFU-DA, FIFO and Random.
//!
//! [`KeyedPolicy`] does the bookkeeping once: per-block state in a vector indexed by
//! [`BlockId::index`], and the candidates in a `BTreeSet<(Key, BlockId)>` whose first element is
//! the next victim (O(log n) per operation). A pinned block leaves the set but keeps its key, so
//! its history survives the pin. Each policy is then a tiny [`KeyRule`] saying how a block's key
//! is born and how it changes, in the manner of SGLang's `evict_policy.py`.

use super::{EvictionPolicy, PolicyKind};
use crate::ids::BlockId;
use std::collections::BTreeSet;
use std::fmt;

/// How one policy computes a block's priority key; the smallest key is evicted first.
///
/// `tick` is the policy's logical clock, bumped once per call on the policy, so it is unique
/// per event and increases with time.
pub(crate) trait KeyRule: Send + fmt::Debug {
    /// The priority key; `(Key, BlockId)` must be totally ordered.
    type Key: Ord + Copy + fmt::Debug + Send;

    /// Which policy this rule is.
    fn kind(&self) -> PolicyKind;

    /// The key of a block that just received content named `key`.
    fn inserted(&mut self, tick: u64, key: u64) -> Self::Key;

    /// The key after a lookup hit.
    fn accessed(&mut self, tick: u64, old: Self::Key) -> Self::Key;

    /// The key after the last user released the block. Unchanged unless the rule says otherwise.
    fn unpinned(&mut self, _tick: u64, old: Self::Key) -> Self::Key {
        old
    }

    /// `victim` was chosen for eviction (LFU-DA ages its clock here).
    fn evicted(&mut self, _victim: Self::Key) {}
}

/// LRU: the key is the tick of the last use (insert, hit or unpin).
#[derive(Debug, Default)]
pub(crate) struct Lru;

impl KeyRule for Lru {
    type Key = u64;
    fn kind(&self) -> PolicyKind {
        PolicyKind::Lru
    }
    fn inserted(&mut self, tick: u64, _key: u64) -> u64 {
        tick
    }
    fn accessed(&mut self, tick: u64, _old: u64) -> u64 {
        tick
    }
    fn unpinned(&mut self, tick: u64, _old: u64) -> u64 {
        tick
    }
}

/// FIFO: the key is the tick of insertion, never changed.
#[derive(Debug, Default)]
pub(crate) struct Fifo;

impl KeyRule for Fifo {
    type Key = u64;
    fn kind(&self) -> PolicyKind {
        PolicyKind::Fifo
    }
    fn inserted(&mut self, tick: u64, _key: u64) -> u64 {
        tick
    }
    fn accessed(&mut self, _tick: u64, old: u64) -> u64 {
        old
    }
}

/// Random: the key is a pseudo-random number drawn at insert, `splitmix64(seed ^ n)` for the
/// `n`th insert, so a run is reproducible for a seed. Ordering by a random key evicts uniformly
/// among candidates.
#[derive(Debug)]
pub(crate) struct Random {
    seed: u64,
    num_inserts: u64,
}

impl Random {
    pub(crate) fn new(seed: u64) -> Self {
        Self {
            seed,
            num_inserts: 0,
        }
    }
}

impl KeyRule for Random {
    type Key = u64;
    fn kind(&self) -> PolicyKind {
        PolicyKind::Random
    }
    fn inserted(&mut self, _tick: u64, _key: u64) -> u64 {
        self.num_inserts += 1;
        splitmix64(self.seed ^ self.num_inserts)
    }
    fn accessed(&mut self, _tick: u64, old: u64) -> u64 {
        old
    }
}

/// splitmix64 (Steele, Lea and Flood, 2014): a fast, well-mixed 64-bit hash of a counter.
pub(crate) fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// LFU with dynamic aging (LFU-DA; Arlitt et al., "Evaluating content management techniques for
/// Web proxy caches", 2000): priority `K = L + F`, where `F` counts the block's references since
/// insert (the insert is the first) and `L` is the priority of the last evicted block. `K` is set
/// at insert and at each hit; `L` only grows, so blocks that were popular long ago age out
/// instead of staying forever. Ties go to the least recently used.
#[derive(Debug, Default)]
pub(crate) struct LfuDa {
    /// `L`: the priority of the last evicted block.
    age: u64,
}

/// An LFU-DA key: ordered by priority, then by last use (`refs` never decides: ticks are unique).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct LfuKey {
    priority: u64,
    last_use: u64,
    refs: u64,
}

impl KeyRule for LfuDa {
    type Key = LfuKey;
    fn kind(&self) -> PolicyKind {
        PolicyKind::Lfu
    }
    fn inserted(&mut self, tick: u64, _key: u64) -> LfuKey {
        LfuKey {
            priority: self.age + 1,
            last_use: tick,
            refs: 1,
        }
    }
    fn accessed(&mut self, tick: u64, old: LfuKey) -> LfuKey {
        let refs = old.refs + 1;
        LfuKey {
            priority: self.age + refs,
            last_use: tick,
            refs,
        }
    }
    fn unpinned(&mut self, tick: u64, old: LfuKey) -> LfuKey {
        LfuKey {
            last_use: tick,
            ..old
        }
    }
    fn evicted(&mut self, victim: LfuKey) {
        self.age = victim.priority;
    }
}

/// What a [`KeyedPolicy`] knows of one block.
#[derive(Debug, Clone, Copy)]
struct BlockState<K> {
    key: K,
    pinned: bool,
}

/// An [`EvictionPolicy`] that evicts the candidate with the smallest key under rule `R`.
///
/// # Invariants
/// `candidates` holds exactly `(state[b].key, b)` for every known, unpinned block `b`.
#[derive(Debug)]
pub(crate) struct KeyedPolicy<R: KeyRule> {
    rule: R,
    /// Logical clock, bumped once per call.
    tick: u64,
    /// Per block, indexed by `BlockId::index`; `None` for blocks the policy does not know.
    state: Vec<Option<BlockState<R::Key>>>,
    candidates: BTreeSet<(R::Key, BlockId)>,
}

impl<R: KeyRule> KeyedPolicy<R> {
    pub(crate) fn new(rule: R, capacity_blocks: usize) -> Self {
        Self {
            rule,
            tick: 0,
            state: Vec::with_capacity(capacity_blocks),
            candidates: BTreeSet::new(),
        }
    }

    fn next_tick(&mut self) -> u64 {
        self.tick += 1;
        self.tick
    }

    fn slot(&mut self, block: BlockId) -> &mut Option<BlockState<R::Key>> {
        let i = block.index();
        if i >= self.state.len() {
            self.state.resize(i + 1, None);
        }
        &mut self.state[i]
    }

    /// Sets a known block's key, keeping `candidates` in step.
    fn rekey(&mut self, block: BlockId, f: impl FnOnce(&mut R, u64, R::Key) -> R::Key) {
        let tick = self.next_tick();
        let Some(Some(st)) = self.state.get(block.index()).copied() else {
            return;
        };
        let key = f(&mut self.rule, tick, st.key);
        if !st.pinned {
            self.candidates.remove(&(st.key, block));
            self.candidates.insert((key, block));
        }
        self.state[block.index()] = Some(BlockState { key, ..st });
    }

    /// Checks the invariant (tests and debugging).
    #[cfg(test)]
    pub(crate) fn check_invariants(&self) {
        let mut n = 0;
        for (i, st) in self.state.iter().enumerate() {
            if let Some(st) = st {
                let b = BlockId(i as u32);
                assert_eq!(
                    !st.pinned,
                    self.candidates.contains(&(st.key, b)),
                    "block {i}: pinned={} disagrees with the candidate set",
                    st.pinned
                );
                n += usize::from(!st.pinned);
            }
        }
        assert_eq!(
            n,
            self.candidates.len(),
            "stale entries in the candidate set"
        );
    }
}

impl<R: KeyRule> EvictionPolicy for KeyedPolicy<R> {
    fn kind(&self) -> PolicyKind {
        self.rule.kind()
    }

    fn insert(&mut self, block: BlockId, key: u64) {
        self.remove(block);
        let tick = self.next_tick();
        let k = self.rule.inserted(tick, key);
        *self.slot(block) = Some(BlockState {
            key: k,
            pinned: false,
        });
        self.candidates.insert((k, block));
    }

    fn access(&mut self, block: BlockId) {
        self.rekey(block, |r, tick, old| r.accessed(tick, old));
    }

    fn pin(&mut self, block: BlockId) {
        self.next_tick();
        if let Some(Some(st)) = self.state.get_mut(block.index()) {
            if !st.pinned {
                st.pinned = true;
                self.candidates.remove(&(st.key, block));
            }
        }
    }

    fn unpin(&mut self, block: BlockId, used: bool) {
        let tick = self.next_tick();
        let Some(Some(st)) = self.state.get_mut(block.index()) else {
            return;
        };
        if st.pinned {
            st.pinned = false;
            if used {
                st.key = self.rule.unpinned(tick, st.key);
            }
            self.candidates.insert((st.key, block));
        }
    }

    fn evict(&mut self) -> Option<BlockId> {
        self.next_tick();
        let (key, block) = self.candidates.pop_first()?;
        self.state[block.index()] = None;
        self.rule.evicted(key);
        Some(block)
    }

    fn remove(&mut self, block: BlockId) {
        if let Some(slot) = self.state.get_mut(block.index()) {
            if let Some(st) = slot.take() {
                if !st.pinned {
                    self.candidates.remove(&(st.key, block));
                }
            }
        }
    }

    fn num_candidates(&self) -> usize {
        self.candidates.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b(i: u32) -> BlockId {
        BlockId(i)
    }

    fn drain<R: KeyRule>(p: &mut KeyedPolicy<R>) -> Vec<u32> {
        let mut out = Vec::new();
        while let Some(x) = p.evict() {
            p.check_invariants();
            out.push(x.0);
        }
        out
    }

    fn filled<R: KeyRule>(rule: R, n: u32) -> KeyedPolicy<R> {
        let mut p = KeyedPolicy::new(rule, n as usize);
        for i in 0..n {
            p.insert(b(i), 100 + u64::from(i));
        }
        p
    }

    #[test]
    fn lru_evicts_least_recently_used() {
        let mut p = filled(Lru, 4);
        p.access(b(0));
        p.access(b(2));
        p.check_invariants();
        assert_eq!(drain(&mut p), [1, 3, 0, 2]);
        assert_eq!(p.evict(), None);
    }

    #[test]
    fn lru_unpin_counts_as_use_and_pinned_are_skipped() {
        let mut p = filled(Lru, 3);
        p.pin(b(0));
        p.pin(b(0)); // idempotent
        assert_eq!(p.num_candidates(), 2);
        p.access(b(0)); // a hit on a pinned block is allowed
        p.check_invariants();
        assert_eq!(p.evict(), Some(b(1)));
        p.unpin(b(0), true);
        p.unpin(b(0), true); // idempotent
        p.check_invariants();
        assert_eq!(p.num_candidates(), 2);
        assert_eq!(drain(&mut p), [2, 0]);
    }

    #[test]
    fn all_pinned_gives_none() {
        let mut p = filled(Fifo, 2);
        p.pin(b(0));
        p.pin(b(1));
        assert_eq!(p.evict(), None);
        p.unpin(b(1), true);
        assert_eq!(p.evict(), Some(b(1)));
    }

    #[test]
    fn fifo_ignores_hits_and_unpins() {
        let mut p = filled(Fifo, 4);
        p.access(b(0));
        p.pin(b(1));
        p.unpin(b(1), true);
        assert_eq!(drain(&mut p), [0, 1, 2, 3]);
    }

    #[test]
    fn lfu_da_orders_by_frequency_then_recency_and_ages() {
        let mut p = filled(LfuDa::default(), 3);
        // refs: 0 -> 3, 1 -> 1, 2 -> 2.
        p.access(b(0));
        p.access(b(0));
        p.access(b(2));
        assert_eq!(p.evict(), Some(b(1))); // L becomes 1
                                           // A newcomer gets L + 1 = 2, equal to block 2's (refs 2, L 0) but more recent.
        p.insert(b(1), 7);
        assert_eq!(p.evict(), Some(b(2))); // L becomes 2
                                           // Newcomer 2 gets priority 3, equal to block 0's (refs 3, L 0); block 0 is older.
        p.insert(b(2), 8);
        assert_eq!(drain(&mut p), [1, 0, 2]);
    }

    #[test]
    fn lfu_ties_go_to_least_recent() {
        let mut p = filled(LfuDa::default(), 3);
        assert_eq!(drain(&mut p), [0, 1, 2]);
    }

    #[test]
    fn random_is_reproducible_and_a_permutation() {
        let order = |seed| {
            let mut p = filled(Random::new(seed), 64);
            p.access(b(3));
            drain(&mut p)
        };
        let a = order(7);
        assert_eq!(a, order(7));
        assert_ne!(a, order(8));
        let mut sorted = a.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (0..64).collect::<Vec<_>>());
    }

    #[test]
    fn remove_forgets_pinned_or_not_and_reinsert_is_fresh() {
        let mut p = filled(Lru, 4);
        p.pin(b(1));
        p.remove(b(1));
        p.remove(b(2));
        p.remove(b(2)); // idempotent
        p.remove(b(99)); // unknown
        p.unpin(b(1), true); // unknown now: no effect
        p.access(b(2)); // unknown now: no effect
        p.check_invariants();
        assert_eq!(p.num_candidates(), 2);
        p.insert(b(2), 5);
        p.insert(b(0), 6); // re-insert of a known block replaces it
        p.check_invariants();
        assert_eq!(drain(&mut p), [3, 2, 0]);
    }

    #[test]
    fn state_grows_on_demand() {
        let mut p = KeyedPolicy::new(Lru, 0);
        p.insert(b(1000), 1);
        p.insert(b(5), 2);
        assert_eq!(drain(&mut p), [1000, 5]);
    }
}
