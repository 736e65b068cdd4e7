//! The offline policy simulator: replays a trace of requests against a cache of a given capacity
//! under each eviction policy, beside Belady's offline optimum.
//!
//! A trace is a list of requests, each the ids of its KV blocks in order; equal ids mean equal
//! content *including the whole prefix* (Mooncake's `hash_ids`, or our chained `BlockHash`), so
//! an id is a block's full identity. Pure: the caller reads the file.
//!
//! # Semantics
//! Requests are processed in order, and each id is one lookup. A hit tells the policy
//! (`access`); a miss inserts the block into a slot (a [`BlockId`] in `0..capacity_blocks`),
//! first evicting one when all slots are full and reusing the victim's slot. The simulator never
//! pins: the engine pins blocks in use and parents before children (leaf first), but here every
//! id already names its whole prefix and requests do not overlap in time.
//!
//! Two rates are reported: the *block* hit rate counts every hit; the *prefix* hit rate counts a
//! hit only if every earlier block of its request hit too, which is what an engine can reuse
//! (KV after a missing block must be recomputed anyway).
//!
//! Belady's MIN (Belady, 1966) evicts the resident block whose next use is furthest in the future.
//! Under the same slot semantics (a miss is always inserted) it maximises block hits, so it is an
//! upper bound on every policy's block hit rate (not necessarily on the prefix hit rate).

use crate::ids::BlockId;
use crate::policy::{new_policy, EvictionPolicy, PolicyKind};
use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::str::FromStr;

/// A policy the simulator can run: an online [`PolicyKind`] or the offline optimum.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SimPolicy {
    /// One of the engine's eviction policies.
    Online(PolicyKind),
    /// Belady's offline optimum (needs the future, so the simulator only).
    Belady,
}

impl SimPolicy {
    /// Every policy, in the order reports list them: the online ones, then Belady.
    pub const ALL: [SimPolicy; 6] = [
        SimPolicy::Online(PolicyKind::Lru),
        SimPolicy::Online(PolicyKind::Lfu),
        SimPolicy::Online(PolicyKind::Fifo),
        SimPolicy::Online(PolicyKind::Random),
        SimPolicy::Online(PolicyKind::S3Fifo),
        SimPolicy::Belady,
    ];

    /// The name used on the command line and in reports.
    pub fn name(self) -> &'static str {
        match self {
            SimPolicy::Online(k) => k.name(),
            SimPolicy::Belady => "belady",
        }
    }
}

impl fmt::Display for SimPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for SimPolicy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.eq_ignore_ascii_case("belady") {
            return Ok(SimPolicy::Belady);
        }
        s.parse().map(SimPolicy::Online).map_err(|_| {
            format!("unknown policy {s:?}; choose from lru, lfu, fifo, random, s3fifo, belady")
        })
    }
}

/// What one policy achieved at one capacity.
#[derive(Debug, Clone, PartialEq)]
pub struct SimResult {
    /// The policy's name (`lru`, ..., `belady`).
    pub policy: String,
    /// Slots in the simulated cache.
    pub capacity_blocks: usize,
    /// Block lookups: every id of every request.
    pub lookups: u64,
    /// Lookups that found their block cached.
    pub block_hits: u64,
    /// `block_hits / lookups` (0 for an empty trace).
    pub block_hit_rate: f64,
    /// Hits whose request's earlier blocks all hit too.
    pub prefix_hits: u64,
    /// `prefix_hits / lookups` (0 for an empty trace).
    pub prefix_hit_rate: f64,
}

/// Replays `requests` (each a request's block ids in order) against a cache of `capacity_blocks`
/// under `policy`; `seed` drives `random`.
pub fn simulate(
    requests: &[Vec<u64>],
    policy: SimPolicy,
    capacity_blocks: usize,
    seed: u64,
) -> SimResult {
    let counts = match policy {
        SimPolicy::Online(kind) => {
            let mut r = Online(new_policy(kind, capacity_blocks, seed));
            replay(requests, capacity_blocks, &mut r)
        }
        SimPolicy::Belady => {
            let mut r = Belady::new(requests, capacity_blocks);
            replay(requests, capacity_blocks, &mut r)
        }
    };
    counts.result(policy.name(), capacity_blocks)
}

/// Belady's offline optimum on `requests` with `capacity_blocks` slots.
pub fn simulate_belady(requests: &[Vec<u64>], capacity_blocks: usize) -> SimResult {
    simulate(requests, SimPolicy::Belady, capacity_blocks, 0)
}

/// The choice of victims, as the replay loop sees it. `pos` numbers lookups across the whole
/// trace, from 0.
trait Replacer {
    fn hit(&mut self, slot: BlockId, pos: usize);
    fn insert(&mut self, slot: BlockId, id: u64, pos: usize);
    /// A victim among the filled slots; only called when all are filled.
    fn evict(&mut self) -> BlockId;
}

struct Online(Box<dyn EvictionPolicy>);

impl Replacer for Online {
    fn hit(&mut self, slot: BlockId, _pos: usize) {
        self.0.access(slot);
    }
    fn insert(&mut self, slot: BlockId, id: u64, _pos: usize) {
        self.0.insert(slot, id);
    }
    fn evict(&mut self) -> BlockId {
        self.0
            .evict()
            .expect("the simulator never pins, so a full cache has a candidate")
    }
}

/// Belady's MIN: resident slots ordered by the position of their block's next use.
struct Belady {
    /// Per lookup position: the position of the same id's next lookup, or `NEVER`.
    next_use: Vec<usize>,
    /// (next use, slot) for every filled slot; the last is the victim.
    resident: BTreeSet<(usize, BlockId)>,
    /// Per slot: its block's next use, the key it has in `resident`.
    slot_next: Vec<usize>,
}

const NEVER: usize = usize::MAX;

impl Belady {
    fn new(requests: &[Vec<u64>], capacity_blocks: usize) -> Self {
        let ids: Vec<u64> = requests.iter().flatten().copied().collect();
        let mut next_use = vec![NEVER; ids.len()];
        let mut seen_at: HashMap<u64, usize> = HashMap::new();
        for (pos, id) in ids.iter().enumerate().rev() {
            if let Some(next) = seen_at.insert(*id, pos) {
                next_use[pos] = next;
            }
        }
        Self {
            next_use,
            resident: BTreeSet::new(),
            slot_next: vec![NEVER; capacity_blocks],
        }
    }

    fn set(&mut self, slot: BlockId, pos: usize) {
        let next = self.next_use[pos];
        self.slot_next[slot.index()] = next;
        self.resident.insert((next, slot));
    }
}

impl Replacer for Belady {
    fn hit(&mut self, slot: BlockId, pos: usize) {
        self.resident.remove(&(self.slot_next[slot.index()], slot));
        self.set(slot, pos);
    }
    fn insert(&mut self, slot: BlockId, _id: u64, pos: usize) {
        self.set(slot, pos);
    }
    fn evict(&mut self) -> BlockId {
        let (_, slot) = self
            .resident
            .pop_last()
            .expect("evict is only called on a full cache");
        slot
    }
}

#[derive(Debug, Default)]
struct Counts {
    lookups: u64,
    block_hits: u64,
    prefix_hits: u64,
}

impl Counts {
    fn result(&self, policy: &str, capacity_blocks: usize) -> SimResult {
        let rate = |n: u64| {
            if self.lookups == 0 {
                0.0
            } else {
                n as f64 / self.lookups as f64
            }
        };
        SimResult {
            policy: policy.to_string(),
            capacity_blocks,
            lookups: self.lookups,
            block_hits: self.block_hits,
            block_hit_rate: rate(self.block_hits),
            prefix_hits: self.prefix_hits,
            prefix_hit_rate: rate(self.prefix_hits),
        }
    }
}

/// The replay loop shared by every policy. By far the most time goes to the map lookup and the
/// policy's own bookkeeping; both are O(1) or O(log n) per lookup.
fn replay(requests: &[Vec<u64>], capacity_blocks: usize, r: &mut impl Replacer) -> Counts {
    let mut counts = Counts::default();
    // id -> the slot holding it; and per filled slot, its id.
    let mut slot_of: HashMap<u64, BlockId> = HashMap::with_capacity(capacity_blocks);
    let mut id_in: Vec<u64> = Vec::with_capacity(capacity_blocks);
    let mut pos = 0;
    for request in requests {
        let mut prefix_intact = true;
        for &id in request {
            counts.lookups += 1;
            if let Some(&slot) = slot_of.get(&id) {
                counts.block_hits += 1;
                counts.prefix_hits += u64::from(prefix_intact);
                r.hit(slot, pos);
            } else {
                prefix_intact = false;
                if capacity_blocks > 0 {
                    let slot = if id_in.len() < capacity_blocks {
                        id_in.push(id);
                        BlockId((id_in.len() - 1) as u32)
                    } else {
                        let slot = r.evict();
                        slot_of.remove(&id_in[slot.index()]);
                        id_in[slot.index()] = id;
                        slot
                    };
                    slot_of.insert(id, slot);
                    r.insert(slot, id, pos);
                }
            }
            pos += 1;
        }
    }
    counts
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A system prompt (block 0) shared by two conversations that grow turn by turn:
    /// A = 0,1,3,5 and B = 0,2,4. Lookup positions in brackets.
    ///
    /// ```text
    /// R1 [0 1]  R2 [0 2]  R3 [0 1 3]  R4 [0 2 4]  R5 [0 1 3 5]  R6 [0 2]   (16 lookups)
    ///    p0 p1     p2 p3     p4 p5 p6    p7 p8 p9    p10..p13       p14 p15
    /// ```
    fn hand_trace() -> Vec<Vec<u64>> {
        vec![
            vec![0, 1],
            vec![0, 2],
            vec![0, 1, 3],
            vec![0, 2, 4],
            vec![0, 1, 3, 5],
            vec![0, 2],
        ]
    }

    fn run(p: SimPolicy) -> (u64, u64) {
        let r = simulate(&hand_trace(), p, 3, 1);
        assert_eq!(r.lookups, 16);
        assert_eq!(r.capacity_blocks, 3);
        assert_eq!(r.policy, p.name());
        (r.block_hits, r.prefix_hits)
    }

    /// Capacity 3, order least to most recent:
    /// R1 [0,1]; R2 0 hit, 2 -> [1,0,2]; R3 0 hit, 1 hit, 3 evicts 2 -> [0,1,3];
    /// R4 0 hit, 2 evicts 1, 4 evicts 3 -> [0,2,4]; R5 0 hit, 1 evicts 2, 3 evicts 4, 5 evicts 0;
    /// R6 0 and 2 miss. Hits 1+2+1+1 = 5, all at the front of their requests.
    #[test]
    fn lru_by_hand() {
        assert_eq!(run(SimPolicy::Online(PolicyKind::Lru)), (5, 5));
    }

    /// Insertion order: R2 0 hit, [0,1,2]; R3 0 hit, 1 hit, 3 evicts 0 -> [1,2,3];
    /// R4 0 misses (evicts 1), 2 hits *after a miss*, 4 evicts 2 -> [3,0,4];
    /// R5 0 hit, 1 evicts 3, 3 evicts 0, 5 evicts 4 -> [1,3,5]; R6 0 and 2 miss.
    /// Hits 1+2+1+1 = 5; R4's hit on 2 is not a prefix hit: 4.
    #[test]
    fn fifo_by_hand() {
        assert_eq!(run(SimPolicy::Online(PolicyKind::Fifo)), (5, 4));
    }

    /// LFU-DA, priority = L + references, L = last victim's priority; ties to the least recent.
    /// R2: 0 -> p2, 2 in at p1. R3: 0 -> p3, 1 -> p2, 3 evicts 2 (p1; L=1), 3 in at p2.
    /// R4: 0 -> p5, 2 evicts 1 (p2, older than 3; L=2) in at p3, 4 evicts 3 (p2) in at p3.
    /// R5: 0 -> p7, 1 evicts 2 (L=3) in at p4, 3 evicts 4 in at p4, 5 evicts 1 (L=4) in at p5.
    /// R6: 0 hit, 2 misses. The hot system prompt survives: hits 1+2+1+1+1 = 6, all prefix.
    #[test]
    fn lfu_by_hand() {
        assert_eq!(run(SimPolicy::Online(PolicyKind::Lfu)), (6, 6));
    }

    /// Capacity 3: S's target 1 block, ghost of 2 keys.
    /// R1, R2: S = [0,1,2], 0 hit once. R3: 0 and 1 hit; 3 misses: 0 and 1 (hit) move to M,
    /// 2 is evicted into the ghost; 3 enters S. R4: 0 hit; 2 misses: S's 3 is evicted (ghost
    /// [2,3]); 2 is a ghost hit and enters M = [0,1,2]; 4 misses: S is empty, M's 0 (freq 1)
    /// goes round, 1 is evicted; 4 enters S. R5: 0 hit; 1, 3, 5 each evict S's only block.
    /// R6: 0 and 2 hit in M. Hits 1+2+1+1+2 = 7, all prefix.
    #[test]
    fn s3fifo_by_hand() {
        assert_eq!(run(SimPolicy::Online(PolicyKind::S3Fifo)), (7, 7));
    }

    /// Next uses decide: p6 (3) evicts 1 (next p11; 0 at p7, 2 at p8); p9 (4) evicts 2 (p15;
    /// 0 at p10, 3 at p12); p11 (1) evicts 4 (never); p13 (5) evicts 1 or 3 (never again);
    /// p15 misses. Hits p2 p4 p5 p7 p8 p10 p12 p14 = 8; p12 follows R5's miss on 1: prefix 7.
    #[test]
    fn belady_by_hand() {
        assert_eq!(run(SimPolicy::Belady), (8, 7));
    }

    #[test]
    fn random_is_bounded_by_belady_and_reproducible() {
        let belady = simulate_belady(&hand_trace(), 3);
        for seed in 0..20 {
            let a = simulate(
                &hand_trace(),
                SimPolicy::Online(PolicyKind::Random),
                3,
                seed,
            );
            assert!(a.block_hits <= belady.block_hits, "seed {seed}: {a:?}");
            // Whatever it evicts, R2's lookup of 0 hits (the cache is not full yet).
            assert!(a.block_hits >= 1);
            let b = simulate(
                &hand_trace(),
                SimPolicy::Online(PolicyKind::Random),
                3,
                seed,
            );
            assert_eq!(a, b);
        }
    }

    /// A trace with shared prefixes and conversations that grow, as Mooncake's does.
    fn random_trace(seed: u64, num_requests: usize) -> Vec<Vec<u64>> {
        let mut x = seed;
        let mut next = move || {
            x = crate::policy::splitmix64(x);
            x
        };
        let mut convs: Vec<Vec<u64>> = Vec::new();
        let mut fresh = 1_000;
        (0..num_requests)
            .map(|_| {
                let c = if convs.is_empty() || next() % 4 == 0 {
                    convs.push(vec![next() % 3]); // one of 3 system prompts
                    convs.len() - 1
                } else {
                    (next() % convs.len() as u64) as usize
                };
                for _ in 0..1 + next() % 3 {
                    fresh += 1;
                    convs[c].push(fresh);
                }
                convs[c].clone()
            })
            .collect()
    }

    #[test]
    fn belady_beats_every_policy() {
        for seed in 0..4 {
            let trace = random_trace(seed, 300);
            for cap in [1, 4, 16, 64, 256] {
                let best = simulate_belady(&trace, cap);
                for p in SimPolicy::ALL {
                    let r = simulate(&trace, p, cap, seed);
                    assert!(
                        r.block_hits <= best.block_hits,
                        "seed {seed} cap {cap}: {r:?} beats {best:?}"
                    );
                    assert!(r.prefix_hits <= r.block_hits);
                    assert_eq!(r.lookups, best.lookups);
                }
            }
        }
    }

    #[test]
    fn infinite_capacity_hits_every_repeat() {
        let trace = random_trace(9, 200);
        let lookups: usize = trace.iter().map(Vec::len).sum();
        let distinct: std::collections::HashSet<_> = trace.iter().flatten().collect();
        for p in SimPolicy::ALL {
            let r = simulate(&trace, p, lookups, 3);
            assert_eq!(r.block_hits as usize, lookups - distinct.len(), "{p}");
        }
    }

    #[test]
    fn zero_capacity_and_empty_trace() {
        for p in SimPolicy::ALL {
            let r = simulate(&hand_trace(), p, 0, 0);
            assert_eq!((r.lookups, r.block_hits, r.prefix_hits), (16, 0, 0));
            let r = simulate(&[], p, 8, 0);
            assert_eq!((r.lookups, r.block_hit_rate), (0, 0.0));
        }
    }

    #[test]
    fn policy_names_round_trip() {
        for p in SimPolicy::ALL {
            assert_eq!(p.name().parse::<SimPolicy>(), Ok(p));
        }
        assert_eq!("BELADY".parse::<SimPolicy>(), Ok(SimPolicy::Belady));
        assert!("mru".parse::<SimPolicy>().unwrap_err().contains("belady"));
    }
}
