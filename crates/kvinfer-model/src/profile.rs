//! Where a forward pass spends its time, per operation (`kvinfer bench --profile`).
//!
//! Off by default: then [`timed`] costs one relaxed atomic load. On, each operation of the
//! forward passes adds its wall time and call count to process-wide counters, read with
//! [`snapshot`] and zeroed with [`reset`]. Wall time on the calling thread: a parallel matmul
//! counts once, for as long as its threads take.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Instant;

/// An operation of the forward pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// Token embedding lookup (and scale).
    Embed,
    /// RMS norms: before attention and FFN, Q/K norms, post-norms.
    Norm,
    /// The Q, K and V projections.
    Qkv,
    /// Rotary position embedding of Q and K.
    Rope,
    /// Writing K and V into the paged cache (quantized when the KV dtype says so).
    KvStore,
    /// Attention over the paged cache.
    Attention,
    /// The attention output projection.
    AttnOut,
    /// The FFN's gate and up projections.
    FfnGateUp,
    /// The FFN's activation (SwiGLU, GeGLU).
    Act,
    /// The FFN's down projection.
    FfnDown,
    /// Residual additions.
    Residual,
    /// Final norm and the output matrix (logits).
    Output,
}

/// Every operation, in forward order.
pub const OPS: [Op; 12] = [
    Op::Embed,
    Op::Norm,
    Op::Qkv,
    Op::Rope,
    Op::KvStore,
    Op::Attention,
    Op::AttnOut,
    Op::FfnGateUp,
    Op::Act,
    Op::FfnDown,
    Op::Residual,
    Op::Output,
];

impl Op {
    /// Name in tables and JSON.
    pub fn name(self) -> &'static str {
        match self {
            Op::Embed => "embed",
            Op::Norm => "norm",
            Op::Qkv => "qkv",
            Op::Rope => "rope",
            Op::KvStore => "kv_store",
            Op::Attention => "attention",
            Op::AttnOut => "attn_out",
            Op::FfnGateUp => "ffn_gate_up",
            Op::Act => "act",
            Op::FfnDown => "ffn_down",
            Op::Residual => "residual",
            Op::Output => "output",
        }
    }
}

static ON: AtomicBool = AtomicBool::new(false);
static NANOS: [AtomicU64; OPS.len()] = [const { AtomicU64::new(0) }; OPS.len()];
static CALLS: [AtomicU64; OPS.len()] = [const { AtomicU64::new(0) }; OPS.len()];

/// Turns the counters on or off.
pub fn enable(on: bool) {
    ON.store(on, Ordering::Relaxed);
}

/// Zeroes the counters.
pub fn reset() {
    for i in 0..OPS.len() {
        NANOS[i].store(0, Ordering::Relaxed);
        CALLS[i].store(0, Ordering::Relaxed);
    }
}

/// Runs `f`, adding its time to `op` when profiling is on.
#[inline]
pub fn timed<R>(op: Op, f: impl FnOnce() -> R) -> R {
    if !ON.load(Ordering::Relaxed) {
        return f();
    }
    let t = Instant::now();
    let r = f();
    let i = op as usize;
    NANOS[i].fetch_add(t.elapsed().as_nanos() as u64, Ordering::Relaxed);
    CALLS[i].fetch_add(1, Ordering::Relaxed);
    r
}

/// (operation, seconds, calls) for every operation, in forward order.
pub fn snapshot() -> Vec<(Op, f64, u64)> {
    OPS.iter()
        .map(|&op| {
            let i = op as usize;
            (
                op,
                NANOS[i].load(Ordering::Relaxed) as f64 * 1e-9,
                CALLS[i].load(Ordering::Relaxed),
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_only_when_on() {
        reset();
        timed(Op::Rope, || ());
        assert_eq!(snapshot()[3].2, 0);
        enable(true);
        let v = timed(Op::Rope, || 7);
        enable(false);
        assert_eq!(v, 7);
        let s = snapshot();
        assert_eq!((s[3].0, s[3].2), (Op::Rope, 1));
        reset();
        assert_eq!(snapshot()[3].2, 0);
    }
}
