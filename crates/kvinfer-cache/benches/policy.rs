//! Eviction-policy throughput: operations per second on a full policy of 100k blocks.
//!
//! Each step is the engine's traffic in miniature: a lookup hit (`access`), a block taken into use
//! (`pin`), one released (`unpin`, 16 steps after its pin), and a miss that makes room (`evict`)
//! and fills the victim (`insert`): 5 operations. Block choices are uniform over the 100k blocks.
//! Criterion reports elements/s = policy operations per second.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use kvinfer_cache::{new_policy, BlockId, PolicyKind};
use std::hint::black_box;
use std::time::Duration;

const NUM_BLOCKS: u32 = 100_000;
/// Steps per timed iteration (5 operations each).
const STEPS: usize = 1_000;
/// Blocks pinned at once.
const PINNED: usize = 16;

/// xorshift64*: block choices, the same for every policy.
fn random_blocks(n: usize) -> Vec<BlockId> {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    (0..n)
        .map(|_| {
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            BlockId((x.wrapping_mul(0x2545_f491_4f6c_dd1d) % u64::from(NUM_BLOCKS)) as u32)
        })
        .collect()
}

fn policy_ops(c: &mut Criterion) {
    let mut group = c.benchmark_group("policy_ops_100k_blocks");
    group.throughput(Throughput::Elements(5 * STEPS as u64));
    // 2 choices per step, over a long cycle so iterations do not replay the same blocks.
    let choices = random_blocks(2 * STEPS * 64);
    for kind in PolicyKind::ALL {
        let mut p = new_policy(kind, NUM_BLOCKS as usize, 7);
        for i in 0..NUM_BLOCKS {
            p.insert(BlockId(i), u64::from(i));
        }
        let mut pinned = [BlockId(0); PINNED];
        for (k, b) in pinned.iter_mut().enumerate() {
            *b = BlockId(k as u32);
            p.pin(*b);
        }
        let mut next_key = u64::from(NUM_BLOCKS);
        let mut t = 0;
        group.bench_function(BenchmarkId::from_parameter(kind), |bench| {
            bench.iter(|| {
                for step in 0..STEPS {
                    let (hit, take) = (choices[t], choices[t + 1]);
                    t = (t + 2) % choices.len();
                    p.access(hit);
                    let slot = step % PINNED;
                    p.unpin(pinned[slot], true);
                    p.pin(take);
                    pinned[slot] = take;
                    if let Some(victim) = p.evict() {
                        next_key += 1;
                        p.insert(victim, next_key);
                    }
                }
                black_box(p.num_candidates())
            })
        });
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .sample_size(30);
    targets = policy_ops
}
criterion_main!(benches);
