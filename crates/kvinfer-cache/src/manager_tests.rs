//! Unit and property tests of the manager and the pool under it.

use super::*;
use proptest::prelude::*;

fn manager(num_blocks: usize, block_size: usize, policy: PolicyKind) -> KvCacheManager {
    grouped(num_blocks, block_size, policy, vec![None])
}

fn grouped(
    num_blocks: usize,
    block_size: usize,
    policy: PolicyKind,
    windows: Vec<Option<usize>>,
) -> KvCacheManager {
    KvCacheManager::new(&CacheConfig {
        num_blocks,
        block_size,
        policy,
        seed: 7,
        fingerprint: ModelFingerprint([3; 32]),
        windows,
    })
}

/// Runs a whole prompt through `m` as the engine would: add, reserve, commit.
fn run_prompt(m: &mut KvCacheManager, prompt: &[u32]) -> (SeqId, usize) {
    let (s, cached) = m.add_sequence(prompt, true);
    m.reserve(s, prompt.len() - cached).expect("room");
    m.commit(s, &prompt[cached..]);
    (s, cached)
}

#[test]
fn a_repeated_prompt_reuses_its_full_blocks_but_not_the_last_token() {
    let mut m = manager(16, 4, PolicyKind::Lru);
    let p: Vec<u32> = (0..10).collect();
    let (a, cached) = run_prompt(&mut m, &p);
    assert_eq!(cached, 0);
    m.release(a);
    assert_eq!(m.usage().cached, 2, "two full blocks stay cached");
    assert_eq!(m.usage().free, 14, "the partial block is freed");
    let (b, cached) = run_prompt(&mut m, &p);
    assert_eq!(cached, 8);
    m.release(b);
    // Exactly two blocks long: only the first is reused, the last token must be computed.
    let (c, cached) = run_prompt(&mut m, &p[..8]);
    assert_eq!(cached, 4);
    m.release(c);
    let st = m.stats();
    assert_eq!((st.queries, st.query_tokens, st.hit_tokens), (3, 28, 12));
    m.check_invariants().unwrap();
}

#[test]
fn a_different_token_ends_the_match() {
    let mut m = manager(16, 4, PolicyKind::Lru);
    let p: Vec<u32> = (0..13).collect();
    let (a, _) = run_prompt(&mut m, &p);
    m.release(a);
    let mut q = p.clone();
    q[5] = 99; // second block differs
    assert_eq!(m.lookup(&q).num_tokens, 4);
    q[1] = 99;
    assert_eq!(m.lookup(&q).num_tokens, 0);
}

#[test]
fn eviction_is_leaf_first_and_out_of_blocks_changes_nothing() {
    let mut m = manager(3, 2, PolicyKind::Lru);
    let p = [1, 2, 3, 4, 5, 6];
    let (a, _) = run_prompt(&mut m, &p);
    assert_eq!(m.usage().in_use, 3);
    let before = m.usage();
    let (b, _) = m.add_sequence(&[9, 9, 9], true);
    assert_eq!(
        m.reserve(b, 3),
        Err(OutOfBlocks {
            needed: 2,
            available: 0
        })
    );
    assert_eq!(m.usage(), before);
    m.release(a);
    assert_eq!(m.usage().cached, 3);
    // Needs one block: the leaf [5,6] goes, [1,2] and [3,4] stay reachable.
    m.reserve(b, 2).unwrap();
    assert_eq!(m.usage().evictions, 1);
    assert_eq!(m.lookup(&[1, 2, 3, 4, 5, 6, 7]).num_tokens, 4);
    m.check_invariants().unwrap();
    m.reserve(b, 1).unwrap(); // no new block: 3 tokens fit in 2 blocks
    assert_eq!(m.usage().evictions, 1);
    m.release(b);
    m.check_invariants().unwrap();
}

#[test]
fn fork_shares_blocks_and_copies_a_partial_block_on_write() {
    let mut m = manager(8, 4, PolicyKind::Lru);
    let (a, _) = run_prompt(&mut m, &[1, 2, 3, 4, 5, 6]);
    let b = m.fork(a);
    assert_eq!(m.block_table(a), m.block_table(b));
    assert_eq!(m.usage().in_use, 2);
    m.check_invariants().unwrap();
    let copies = m.reserve(b, 1).unwrap();
    assert_eq!(copies.len(), 1);
    assert_eq!(copies[0].src, m.block_table(a)[1]);
    assert_eq!(copies[0].dst, m.block_table(b)[1]);
    assert_eq!(
        m.block_table(a)[0],
        m.block_table(b)[0],
        "the full block stays shared"
    );
    m.commit(b, &[7]);
    // `a` now owns its partial block alone: no copy.
    assert!(m.reserve(a, 1).unwrap().is_empty());
    m.commit(a, &[8]);
    m.check_invariants().unwrap();
    m.release(a);
    m.release(b);
    assert_eq!(m.usage().in_use, 0);
    m.check_invariants().unwrap();
}

#[test]
fn concurrent_equal_prefixes_dedupe_into_the_cached_copy() {
    let mut m = manager(8, 2, PolicyKind::Lru);
    let p = [1, 2, 3, 4, 5];
    // Both admitted before either computed anything: no hit for the second.
    let (a, _) = m.add_sequence(&p, true);
    let (b, cb) = m.add_sequence(&p, true);
    assert_eq!(cb, 0);
    m.reserve(a, 5).unwrap();
    m.reserve(b, 5).unwrap();
    m.commit(a, &p);
    m.commit(b, &p);
    assert_eq!(
        m.block_table(a)[..2],
        m.block_table(b)[..2],
        "b swapped to a's blocks"
    );
    assert_eq!(m.usage().in_use, 4);
    m.check_invariants().unwrap();
    m.release(a);
    m.release(b);
    assert_eq!(m.usage().cached, 2);
    m.check_invariants().unwrap();
}

#[test]
fn without_prefix_caching_nothing_is_registered_or_counted() {
    let mut m = manager(8, 2, PolicyKind::Lru);
    let (a, c) = m.add_sequence(&[1, 2, 3, 4, 5], false);
    assert_eq!(c, 0);
    m.reserve(a, 5).unwrap();
    m.commit(a, &[1, 2, 3, 4, 5]);
    m.release(a);
    assert_eq!(m.usage().free, 8);
    assert_eq!(m.stats().queries, 0);
}

#[test]
fn waste_counts_unfilled_slots() {
    let mut m = manager(8, 4, PolicyKind::Lru);
    let (_a, _) = run_prompt(&mut m, &[1, 2, 3, 4, 5]);
    assert_eq!(m.slot_usage(), (3, 8));
}

#[derive(Debug, Clone)]
enum Op {
    /// Start a prompt: a shared stem (`stem` of 3 choices) cut to `len`, then `tail` distinct tokens.
    Add {
        stem: u8,
        len: u8,
        tail: u8,
    },
    /// Compute `n` more tokens of live sequence `i % live` (decode or chunked prefill).
    Step {
        i: u8,
        n: u8,
    },
    Fork {
        i: u8,
    },
    Release {
        i: u8,
    },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (0u8..3, 0u8..24, 0u8..6).prop_map(|(stem, len, tail)| Op::Add { stem, len, tail }),
        (any::<u8>(), 1u8..6).prop_map(|(i, n)| Op::Step { i, n }),
        any::<u8>().prop_map(|i| Op::Fork { i }),
        any::<u8>().prop_map(|i| Op::Release { i }),
    ]
}

fn stem(which: u8) -> Vec<u32> {
    (0..24).map(|t| (which as u32) * 1000 + t).collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Random workloads on a small pool, every policy: the invariants hold after every
    /// operation, admission takes exactly the looked-up prefix, and releasing everything
    /// leaves no block in use.
    #[test]
    fn invariants_hold_under_random_workloads(
        ops in prop::collection::vec(op(), 1..80),
        pi in 0usize..5,
        windowed in any::<bool>(),
    ) {
        let policy = PolicyKind::ALL[pi];
        let mut m = match windowed {
            // A full group and two sliding ones (window 4 over blocks of 3).
            true => grouped(30, 3, policy, vec![None, Some(4), Some(4)]),
            false => manager(12, 3, policy),
        };
        let mut live: Vec<(SeqId, Vec<u32>)> = Vec::new(); // sequence, its full token list
        let mut next_tok = 100_000u32;
        for op in ops {
            match op {
                Op::Add { stem: s, len, tail } => {
                    let mut p = stem(s)[..len as usize].to_vec();
                    for _ in 0..=tail {
                        p.push(next_tok);
                        next_tok += 1;
                    }
                    let expect = m.lookup(&p);
                    let (id, cached) = m.add_sequence(&p, true);
                    prop_assert_eq!(cached, expect.num_tokens);
                    prop_assert!(cached < p.len());
                    prop_assert_eq!(m.block_tables(id), &expect.tables[..]);
                    live.push((id, p));
                }
                Op::Step { i, n } if !live.is_empty() => {
                    let k = i as usize % live.len();
                    let (id, ref mut toks) = live[k];
                    let done = m.num_tokens(id);
                    while toks.len() < done + n as usize {
                        toks.push(next_tok);
                        next_tok += 1;
                    }
                    let new = toks[done..done + n as usize].to_vec();
                    let before = m.usage();
                    match m.reserve(id, new.len()) {
                        Ok(_) => m.commit(id, &new),
                        Err(e) => {
                            prop_assert_eq!(m.usage(), before);
                            prop_assert!(e.needed > e.available);
                        }
                    }
                }
                Op::Fork { i } if !live.is_empty() => {
                    let k = i as usize % live.len();
                    let (id, toks) = live[k].clone();
                    let f = m.fork(id);
                    live.push((f, toks));
                }
                Op::Release { i } if !live.is_empty() => {
                    let k = i as usize % live.len();
                    let (id, _) = live.swap_remove(k);
                    m.release(id);
                }
                _ => {}
            }
            if let Err(e) = m.check_invariants() {
                prop_assert!(false, "{}", e);
            }
            let u = m.usage();
            prop_assert_eq!(u.free + u.cached + u.in_use, u.total);
        }
        for (id, _) in live.drain(..) {
            m.release(id);
        }
        m.check_invariants().map_err(TestCaseError::fail)?;
        prop_assert_eq!(m.usage().in_use, 0);
    }
}

/// Evicting a leaf makes its parent a candidate without making it look recently used: an old
/// chain drains leaf-back before a newer chain loses anything (under LRU, FIFO-like queues too).
#[test]
fn an_old_chain_drains_before_a_newer_one() {
    for policy in [PolicyKind::Lru, PolicyKind::Lfu, PolicyKind::S3Fifo] {
        let mut m = manager(6, 2, policy);
        let old = [1, 2, 3, 4, 5, 6, 7];
        let new = [11, 12, 13, 14, 15];
        let (a, _) = run_prompt(&mut m, &old);
        m.release(a);
        let (b, _) = run_prompt(&mut m, &new);
        m.release(b);
        assert_eq!((m.usage().cached, m.usage().free), (5, 1));
        // Three blocks: the free one, then two evictions.
        let (c, _) = m.add_sequence(&[21, 22, 23, 24, 25], true);
        m.reserve(c, 5).unwrap();
        assert_eq!(m.usage().evictions, 2);
        assert_eq!(
            m.lookup(&new).num_tokens,
            4,
            "{policy}: the newer chain lost a block"
        );
        assert_eq!(m.lookup(&old).num_tokens, 2, "{policy}");
        m.release(c);
        m.check_invariants().unwrap();
    }
}

#[test]
fn a_sliding_group_lets_go_of_blocks_before_its_window() {
    // Blocks of 4, window 6: after 20 tokens the next query sees positions 15..=20, so the
    // sliding group holds blocks 3 and 4 only; blocks 0..3 stay cached, evictable.
    let mut m = grouped(16, 4, PolicyKind::Lru, vec![None, Some(6)]);
    let p: Vec<u32> = (0..20).collect();
    let (a, _) = run_prompt(&mut m, &p);
    let t = m.block_tables(a);
    assert_eq!(t[0].len(), 5);
    assert!(t[0].iter().all(|&b| b != HOLE));
    assert_eq!(&t[1][..3], &[HOLE; 3]);
    assert!(t[1][3..].iter().all(|&b| b != HOLE));
    let u = m.usage();
    assert_eq!((u.in_use, u.cached), (7, 3));
    m.check_invariants().unwrap();
    m.release(a);
    assert_eq!(m.usage().cached, 10, "both groups' full blocks stay cached");

    // The same history and more: a hit of all 5 blocks, the sliding group's from block 3 on.
    let mut q = p.clone();
    q.extend(100..110);
    let hit = m.lookup(&q);
    assert_eq!(hit.num_tokens, 20);
    assert_eq!(&hit.tables[1][..3], &[HOLE; 3]);
    let (b, cached) = m.add_sequence(&q, true);
    assert_eq!(cached, 20);
    m.reserve(b, 10).unwrap();
    m.commit(b, &q[20..]);
    m.check_invariants().unwrap();
    m.release(b);
    m.check_invariants().unwrap();
}

#[test]
fn a_hit_needs_every_full_block_and_the_window_before_its_end() {
    let m = grouped(4, 4, PolicyKind::Lru, vec![None, Some(6)]);
    let hashes = m.hash_blocks(&(0..40).collect::<Vec<u32>>());
    // Blocks 0..10 of the full group; sliding blocks as `missing` says.
    let with = |missing: &[usize]| {
        let missing = missing.to_vec();
        m.prefix_blocks(&hashes, move |g, i| g == 0 || !missing.contains(&i))
    };
    assert_eq!(with(&[]), 10);
    // 10 blocks need sliding blocks 8 and 9 ((41 - 6) / 4 = 8): older holes do not matter.
    assert_eq!(with(&[0, 1, 2, 3, 4, 5, 6, 7]), 10);
    assert_eq!(with(&[9]), 9, "9 blocks need 7 and 8");
    assert_eq!(with(&[8, 9]), 8, "8 blocks need 6 and 7");
    assert_eq!(with(&[6, 9]), 9, "9 blocks need only 7 and 8");
    assert_eq!(
        with(&[6, 8]),
        6,
        "10 and 9 need 8, 8 and 7 need 6; 6 needs 4 and 5"
    );
}

#[test]
fn a_missing_full_block_caps_the_hit_whatever_the_sliding_groups_hold() {
    let m = grouped(4, 4, PolicyKind::Lru, vec![None, Some(6), Some(6)]);
    let hashes = m.hash_blocks(&(0..40).collect::<Vec<u32>>());
    assert_eq!(m.prefix_blocks(&hashes, |g, i| g != 0 || i != 4), 4);
    // The second sliding group lacks block 2: a prefix of 4 needs blocks 2 and 3 there.
    assert_eq!(
        m.prefix_blocks(&hashes, |g, i| (g != 0 || i != 4) && (g != 2 || i != 2)),
        2
    );
}
