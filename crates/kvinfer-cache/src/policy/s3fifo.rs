//! S3-FIFO (Yang et al., "FIFO queues are all you need for cache eviction", SOSP'23).
//!
//! Three FIFO queues: a small probationary queue S (10% of the capacity), a main queue M, and a
//! ghost queue G remembering the *identities* (the `key` given at insert) of blocks recently
//! evicted from S, as many as M holds. A new block enters M if its key is in G (it was evicted
//! too early), else S. A hit only bumps a 2-bit frequency (at most 3); there is no reordering on
//! hit, which is what makes the policy cheap. To evict:
//! - while S holds at least its target share (pinned members included) and has a candidate, pop
//!   S's head: if it was hit since insert, move it to M's tail (frequency reset); else remember its
//!   key in G and evict it;
//! - otherwise pop M's head: if its frequency is above 0, decrement it and reinsert it at the
//!   tail; else evict it. (If M has no candidate, S is used even below its target.)
//!
//! Every step is O(1); eviction is amortised O(1), since a block is reinserted at most 3 times per
//! hit-free pass.
//!
//! # Deviation from the paper: pinning
//! The paper's cache has no pinned objects. Here a pinned block is taken out of its queue (O(1):
//! the queues are intrusive doubly linked lists over a vector) and put back in the same queue
//! when unpinned, keeping its frequency: at the *tail* when its last user let go, at the head
//! when it became a leaf by its child's eviction (so a cached chain drains together). Re-queueing treats the release of a block
//! as a fresh arrival in its queue, which suits the engine: a block just released by a finishing
//! request is the likeliest to be shared by the next turn of the same conversation.

use super::{EvictionPolicy, PolicyKind};
use crate::ids::BlockId;
use std::collections::{HashMap, VecDeque};

/// The end of a list, or no link.
const NO_LINK: usize = usize::MAX;

/// Frequencies saturate here (2 bits, as in the paper).
const MAX_FREQ: u8 = 3;

/// Which queue a known block belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Queue {
    /// Not known to the policy.
    None,
    Small,
    Main,
}

/// Per-block state; `prev`/`next` link the block into its queue while it is a candidate.
#[derive(Debug, Clone, Copy)]
struct Node {
    queue: Queue,
    pinned: bool,
    freq: u8,
    /// The identity given at insert, remembered in the ghost queue on eviction from S.
    key: u64,
    prev: usize,
    next: usize,
}

const EMPTY: Node = Node {
    queue: Queue::None,
    pinned: false,
    freq: 0,
    key: 0,
    prev: NO_LINK,
    next: NO_LINK,
};

/// Head, tail and length of one intrusive FIFO over the node vector (head = oldest).
#[derive(Debug, Clone, Copy)]
struct List {
    head: usize,
    tail: usize,
    len: usize,
}

impl List {
    const EMPTY: List = List {
        head: NO_LINK,
        tail: NO_LINK,
        len: 0,
    };

    fn push_back(&mut self, nodes: &mut [Node], i: usize) {
        nodes[i].prev = self.tail;
        nodes[i].next = NO_LINK;
        if self.tail == NO_LINK {
            self.head = i;
        } else {
            nodes[self.tail].next = i;
        }
        self.tail = i;
        self.len += 1;
    }

    fn push_front(&mut self, nodes: &mut [Node], i: usize) {
        nodes[i].prev = NO_LINK;
        nodes[i].next = self.head;
        if self.head == NO_LINK {
            self.tail = i;
        } else {
            nodes[self.head].prev = i;
        }
        self.head = i;
        self.len += 1;
    }

    fn unlink(&mut self, nodes: &mut [Node], i: usize) {
        let Node { prev, next, .. } = nodes[i];
        if prev == NO_LINK {
            self.head = next;
        } else {
            nodes[prev].next = next;
        }
        if next == NO_LINK {
            self.tail = prev;
        } else {
            nodes[next].prev = prev;
        }
        nodes[i].prev = NO_LINK;
        nodes[i].next = NO_LINK;
        self.len -= 1;
    }

    fn pop_front(&mut self, nodes: &mut [Node]) -> Option<usize> {
        let i = self.head;
        if i == NO_LINK {
            return None;
        }
        self.unlink(nodes, i);
        Some(i)
    }
}

/// A bounded FIFO of evicted identities with O(1) membership.
///
/// A key found again (a ghost hit) is dropped from the map at once; its slot in the FIFO stays
/// until it reaches the head, so stale slots count towards the bound (the ghost may briefly
/// remember slightly fewer keys than `capacity`).
#[derive(Debug)]
struct Ghost {
    capacity: usize,
    /// (key, the push number that put it there), oldest first.
    fifo: VecDeque<(u64, u64)>,
    /// key -> its latest push number.
    live: HashMap<u64, u64>,
    num_pushes: u64,
}

impl Ghost {
    fn new(capacity: usize) -> Self {
        Self {
            capacity,
            fifo: VecDeque::with_capacity(capacity),
            live: HashMap::with_capacity(capacity),
            num_pushes: 0,
        }
    }

    fn push(&mut self, key: u64) {
        if self.capacity == 0 {
            return;
        }
        if self.fifo.len() == self.capacity {
            if let Some((old, n)) = self.fifo.pop_front() {
                if self.live.get(&old) == Some(&n) {
                    self.live.remove(&old);
                }
            }
        }
        self.num_pushes += 1;
        self.fifo.push_back((key, self.num_pushes));
        self.live.insert(key, self.num_pushes);
    }

    /// Whether `key` was remembered; forgets it.
    fn take(&mut self, key: u64) -> bool {
        self.live.remove(&key).is_some()
    }
}

/// The S3-FIFO policy; see the module doc.
///
/// # Invariants
/// A known, unpinned block is linked in the list of its queue; a pinned or unknown one is in
/// none. `small_total` counts the known blocks whose queue is `Small`, pinned or not.
#[derive(Debug)]
pub(crate) struct S3Fifo {
    /// Per block, indexed by `BlockId::index`.
    nodes: Vec<Node>,
    small: List,
    main: List,
    ghost: Ghost,
    small_total: usize,
    /// S's share of the capacity: 10%, at least 1 block.
    small_target: usize,
}

impl S3Fifo {
    pub(crate) fn new(capacity_blocks: usize) -> Self {
        let small_target = (capacity_blocks / 10).max(1);
        Self {
            nodes: Vec::with_capacity(capacity_blocks),
            small: List::EMPTY,
            main: List::EMPTY,
            ghost: Ghost::new(capacity_blocks.saturating_sub(small_target)),
            small_total: 0,
            small_target,
        }
    }

    /// Appends block `i` to the tail of its queue's list.
    fn link(&mut self, i: usize) {
        let list = match self.nodes[i].queue {
            Queue::Small => &mut self.small,
            Queue::Main => &mut self.main,
            Queue::None => unreachable!("only known blocks are linked"),
        };
        list.push_back(&mut self.nodes, i);
    }

    /// Puts block `i` at the head of its queue's list (next to be considered for eviction).
    fn link_front(&mut self, i: usize) {
        let list = match self.nodes[i].queue {
            Queue::Small => &mut self.small,
            Queue::Main => &mut self.main,
            Queue::None => unreachable!("only known blocks are linked"),
        };
        list.push_front(&mut self.nodes, i);
    }

    /// Takes block `i` out of its queue's list.
    fn unlink(&mut self, i: usize) {
        let list = match self.nodes[i].queue {
            Queue::Small => &mut self.small,
            Queue::Main => &mut self.main,
            Queue::None => unreachable!("only known blocks are linked"),
        };
        list.unlink(&mut self.nodes, i);
    }

    fn known(&self, block: BlockId) -> bool {
        self.nodes
            .get(block.index())
            .is_some_and(|n| n.queue != Queue::None)
    }

    /// Forgets a block that is already out of every list.
    fn forget(&mut self, i: usize) {
        if self.nodes[i].queue == Queue::Small {
            self.small_total -= 1;
        }
        self.nodes[i] = EMPTY;
    }

    /// One step of S's side of eviction: the evicted block, or `None` if its head moved to M.
    fn evict_from_small(&mut self) -> Option<usize> {
        let i = self.small.pop_front(&mut self.nodes)?;
        if self.nodes[i].freq >= 1 {
            self.small_total -= 1;
            self.nodes[i].freq = 0;
            self.nodes[i].queue = Queue::Main;
            self.main.push_back(&mut self.nodes, i);
            None
        } else {
            self.ghost.push(self.nodes[i].key);
            self.forget(i);
            Some(i)
        }
    }

    /// Checks the invariants (tests and debugging).
    #[cfg(test)]
    pub(crate) fn check_invariants(&self) {
        let walk = |l: &List, q: Queue| {
            let mut n = 0;
            let mut i = l.head;
            let mut prev = NO_LINK;
            while i != NO_LINK {
                let node = &self.nodes[i];
                assert_eq!(node.queue, q, "block {i} in the wrong list");
                assert!(!node.pinned, "pinned block {i} is linked");
                assert_eq!(node.prev, prev, "broken back link at {i}");
                prev = i;
                i = node.next;
                n += 1;
            }
            assert_eq!(l.tail, prev, "tail is not the last node");
            assert_eq!(l.len, n, "list length");
        };
        walk(&self.small, Queue::Small);
        walk(&self.main, Queue::Main);
        let unpinned = |q| {
            self.nodes
                .iter()
                .filter(|n| n.queue == q && !n.pinned)
                .count()
        };
        assert_eq!(unpinned(Queue::Small), self.small.len);
        assert_eq!(unpinned(Queue::Main), self.main.len);
        let small = self.nodes.iter().filter(|n| n.queue == Queue::Small);
        assert_eq!(small.count(), self.small_total);
        assert!(self.ghost.fifo.len() <= self.ghost.capacity);
    }
}

impl EvictionPolicy for S3Fifo {
    fn kind(&self) -> PolicyKind {
        PolicyKind::S3Fifo
    }

    fn insert(&mut self, block: BlockId, key: u64) {
        self.remove(block);
        let i = block.index();
        if i >= self.nodes.len() {
            self.nodes.resize(i + 1, EMPTY);
        }
        let queue = if self.ghost.take(key) {
            Queue::Main
        } else {
            self.small_total += 1;
            Queue::Small
        };
        self.nodes[i] = Node {
            queue,
            key,
            ..EMPTY
        };
        self.link(i);
    }

    fn access(&mut self, block: BlockId) {
        if self.known(block) {
            let n = &mut self.nodes[block.index()];
            n.freq = (n.freq + 1).min(MAX_FREQ);
        }
    }

    fn pin(&mut self, block: BlockId) {
        if !self.known(block) || self.nodes[block.index()].pinned {
            return;
        }
        let i = block.index();
        self.unlink(i);
        self.nodes[i].pinned = true;
    }

    fn unpin(&mut self, block: BlockId, used: bool) {
        if !self.known(block) || !self.nodes[block.index()].pinned {
            return;
        }
        let i = block.index();
        self.nodes[i].pinned = false;
        if used {
            self.link(i);
        } else {
            self.link_front(i);
        }
    }

    fn evict(&mut self) -> Option<BlockId> {
        loop {
            let use_small =
                self.small.len > 0 && (self.small_total >= self.small_target || self.main.len == 0);
            if use_small {
                if let Some(i) = self.evict_from_small() {
                    return Some(BlockId(i as u32));
                }
                continue;
            }
            let i = self.main.pop_front(&mut self.nodes)?;
            if self.nodes[i].freq > 0 {
                self.nodes[i].freq -= 1;
                self.main.push_back(&mut self.nodes, i);
            } else {
                self.forget(i);
                return Some(BlockId(i as u32));
            }
        }
    }

    fn remove(&mut self, block: BlockId) {
        if !self.known(block) {
            return;
        }
        let i = block.index();
        if !self.nodes[i].pinned {
            self.unlink(i);
        }
        self.forget(i);
    }

    fn num_candidates(&self) -> usize {
        self.small.len + self.main.len
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b(i: u32) -> BlockId {
        BlockId(i)
    }

    fn evict(p: &mut S3Fifo) -> Option<u32> {
        let v = p.evict().map(|x| x.0);
        p.check_invariants();
        v
    }

    /// Capacity 10: S's target is 1 block, G remembers 9 keys.
    fn ten() -> S3Fifo {
        S3Fifo::new(10)
    }

    #[test]
    fn one_hit_wonders_leave_from_small_in_fifo_order() {
        let mut p = ten();
        for i in 0..4 {
            p.insert(b(i), 100 + u64::from(i));
        }
        p.check_invariants();
        assert_eq!(p.num_candidates(), 4);
        assert_eq!(
            [evict(&mut p), evict(&mut p), evict(&mut p), evict(&mut p)],
            [Some(0), Some(1), Some(2), Some(3)]
        );
        assert_eq!(evict(&mut p), None);
    }

    #[test]
    fn hit_in_small_moves_to_main_and_ghost_hit_goes_to_main() {
        let mut p = ten();
        for i in 0..3 {
            p.insert(b(i), 100 + u64::from(i));
        }
        p.access(b(0));
        // S = [0*, 1, 2]: 0 moves to M, 1 is evicted and its key 101 remembered.
        assert_eq!(evict(&mut p), Some(1));
        assert_eq!(p.main.len, 1);
        // Key 101 comes back in block 1: straight to M, behind 0.
        p.insert(b(1), 101);
        assert_eq!(p.main.len, 2);
        assert_eq!(p.small_total, 1);
        // S = [2] holds its target (1): evict from S first, then M in FIFO order.
        assert_eq!(evict(&mut p), Some(2));
        assert_eq!(evict(&mut p), Some(0));
        assert_eq!(evict(&mut p), Some(1));
    }

    #[test]
    fn main_reinserts_while_frequency_lasts() {
        let mut p = ten();
        p.insert(b(0), 1);
        p.insert(b(1), 2);
        p.access(b(0));
        p.access(b(1));
        // Both move to M with freq 0 on the first eviction call, which then evicts 0 from M.
        assert_eq!(evict(&mut p), Some(0));
        p.insert(b(0), 3); // S = [0], M = [1]
        p.access(b(1));
        p.access(b(1)); // 1: freq 2 in M
        p.access(b(0)); // 0: freq 1 in S -> moves to M's tail
                        // S's head moves to M, S empties; M = [1 (f2), 0 (f0)]: 1 goes round to the tail.
        assert_eq!(evict(&mut p), Some(0));
        assert_eq!(evict(&mut p), Some(1));
    }

    #[test]
    fn frequency_saturates_at_three() {
        let mut p = ten();
        p.insert(b(0), 1);
        for _ in 0..10 {
            p.access(b(0));
        }
        assert_eq!(p.nodes[0].freq, MAX_FREQ);
    }

    #[test]
    fn pin_takes_out_and_unpin_requeues_at_tail() {
        let mut p = ten();
        for i in 0..3 {
            p.insert(b(i), 100 + u64::from(i));
        }
        p.pin(b(0));
        p.pin(b(0)); // idempotent
        p.check_invariants();
        assert_eq!(p.num_candidates(), 2);
        assert_eq!(p.small_total, 3, "pinned members still count towards S");
        p.unpin(b(0), true);
        p.unpin(b(0), true); // idempotent
        p.check_invariants();
        assert_eq!(evict(&mut p), Some(1));
        assert_eq!(evict(&mut p), Some(2));
        assert_eq!(evict(&mut p), Some(0));
    }

    #[test]
    fn all_pinned_gives_none() {
        let mut p = ten();
        p.insert(b(0), 1);
        p.insert(b(1), 2);
        p.access(b(1));
        assert_eq!(evict(&mut p), Some(0)); // 1 stays in S: it was hit
        p.insert(b(0), 3);
        p.pin(b(0));
        p.pin(b(1));
        assert_eq!(evict(&mut p), None);
        p.unpin(b(1), true);
        assert_eq!(evict(&mut p), Some(1));
    }

    #[test]
    fn remove_forgets_pinned_or_not() {
        let mut p = ten();
        for i in 0..4 {
            p.insert(b(i), u64::from(i));
        }
        p.pin(b(1));
        p.remove(b(1));
        p.remove(b(2));
        p.remove(b(2)); // idempotent
        p.remove(b(77)); // unknown
        p.access(b(2)); // unknown now: no effect
        p.unpin(b(1), true); // unknown now: no effect
        p.check_invariants();
        assert_eq!(p.small_total, 2);
        // A removed block's key is not a ghost: re-inserting it goes to S.
        p.insert(b(2), 2);
        assert_eq!(p.small_total, 3);
        assert_eq!(evict(&mut p), Some(0));
        assert_eq!(evict(&mut p), Some(3));
        assert_eq!(evict(&mut p), Some(2));
    }

    #[test]
    fn ghost_is_bounded() {
        let mut g = Ghost::new(2);
        g.push(1);
        g.push(2);
        g.push(3);
        assert!(!g.take(1));
        assert!(g.take(2));
        assert!(!g.take(2));
        g.push(3); // a second push of 3: the first slot is stale now
        g.push(4);
        assert!(
            g.take(3),
            "the stale slot of 3 leaving does not forget its newer push"
        );
        assert!(g.take(4));
    }
}
