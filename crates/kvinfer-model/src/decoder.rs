//! The one decoder-only transformer forward pass, over an architecture spec ([`ArchSpec`])
//! that says what differs. In the spirit of llama2.c: the whole model on one page.
//!
//! ```text
//! x = embed(tokens) [* sqrt(n_embd)]                          [n][n_embd]
//! per layer:
//!   q, k, v = Wq·norm(x) [+ bq], Wk·norm(x) [+ bk], Wv·norm(x) [+ bv]   (qkv_bias;
//!             or one Wqkv whose output rows are split: fused_qkv)
//!   [q, k = rmsnorm(q), rmsnorm(k) per head]                  (qk_norm)
//!   q, k = rope(q), rope(k)      (normal or NEOX pairs; linear scaling, rope_freqs factors)
//!   h = Wo · attn(q, K, V)       (causal; the last `window` keys on sliding-window layers;
//!                                 softcap: q pre-scaled, scores cap * tanh(s / cap))
//!   x += [rmsnorm](h)                                         (post_norms)
//!   h = Wdown · (act(Wgate·norm(x)) * Wup·norm(x))  (SiLU or GELU; fused_gate_up: one Wup)
//!   x += [rmsnorm](h)
//! logits = Wout · norm(x[last])  [softcap: cap * tanh(logits / cap)]   [vocab]
//! ```

use crate::arch::{Act, ArchSpec};
use crate::config::ModelConfig;
use crate::gguf::GgufFile;
use crate::kernels::matmul;
use crate::layers::{
    attention, geglu, lm_head, rmsnorm, rmsnorm_into, rope_spans, softcap, store_kv, swiglu,
    AttnShape, KvSpans, Rope,
};
use crate::profile::{timed, Op};
use crate::weights::{load_vec, QMat};
use crate::ModelError;
use kvinfer_cache::KvStorage;

/// The Q, K and V projections: three matrices, or one whose rows are Q's, K's, then V's.
enum Qkv {
    Split(QMat, QMat, QMat),
    Fused(QMat),
}

struct Layer {
    attn_norm: Vec<f32>,
    qkv: Qkv,
    /// Q, K and V biases (`qkv_bias`).
    qkv_bias: Option<[Vec<f32>; 3]>,
    /// Per-head RMSNorm weights of Q and K (`qk_norm`).
    qk_norm: Option<(Vec<f32>, Vec<f32>)>,
    wo: QMat,
    /// After attention and after the FFN (`post_norms`).
    post_norms: Option<(Vec<f32>, Vec<f32>)>,
    ffn_norm: Vec<f32>,
    /// `None` when `w_up` holds the gate's rows and then the up projection's.
    w_gate: Option<QMat>,
    w_up: QMat,
    w_down: QMat,
}

/// Handles to every tensor of a model.
pub struct Weights {
    tok_embd: QMat,
    layers: Vec<Layer>,
    output_norm: Vec<f32>,
    /// `output.weight`, or the embedding matrix when tied.
    output: QMat,
    /// RoPE frequency factors, one per dimension pair (`rope_freqs.weight`, when the spec
    /// allows it and the file has it).
    rope_freqs: Option<Vec<f32>>,
}

impl Weights {
    /// Finds and shape-checks every tensor the spec of `c.arch` names (each one required).
    pub fn load(f: &GgufFile, c: &ModelConfig) -> Result<Self, ModelError> {
        let a = c.arch;
        let (d, kv, qd, hd) = (c.n_embd, c.kv_dim(), c.n_heads * c.head_dim, c.head_dim);
        let tok_embd = QMat::load_table(f, "token_embd.weight", c.vocab_size, d)?;
        // A tied architecture never looks the name up, so a file with one is refused.
        let untied = !a.tied_output && f.tensor("output.weight").is_some();
        let output = match untied {
            true => QMat::load(f, "output.weight", c.vocab_size, d)?,
            false => tok_embd.clone().packed(f),
        };
        let layers = (0..c.n_layers)
            .map(|l| {
                let p = |s: &str| format!("blk.{l}.{s}.weight");
                let pair = |on: bool, x: &str, y: &str, n: usize| -> Result<_, ModelError> {
                    Ok(if on {
                        Some((load_vec(f, &p(x), n)?, load_vec(f, &p(y), n)?))
                    } else {
                        None
                    })
                };
                let bias = |s: &str, n: usize| load_vec(f, &format!("blk.{l}.{s}.bias"), n);
                Ok(Layer {
                    attn_norm: load_vec(f, &p("attn_norm"), d)?,
                    qkv: match a.fused_qkv {
                        true => Qkv::Fused(QMat::load(f, &p("attn_qkv"), qd + 2 * kv, d)?),
                        false => Qkv::Split(
                            QMat::load(f, &p("attn_q"), qd, d)?,
                            QMat::load(f, &p("attn_k"), kv, d)?,
                            QMat::load(f, &p("attn_v"), kv, d)?,
                        ),
                    },
                    qkv_bias: match a.qkv_bias {
                        true => Some([
                            bias("attn_q", qd)?,
                            bias("attn_k", kv)?,
                            bias("attn_v", kv)?,
                        ]),
                        false => None,
                    },
                    qk_norm: pair(a.qk_norm, "attn_q_norm", "attn_k_norm", hd)?,
                    wo: QMat::load(f, &p("attn_output"), d, qd)?,
                    post_norms: pair(a.post_norms, "post_attention_norm", "post_ffw_norm", d)?,
                    ffn_norm: load_vec(f, &p("ffn_norm"), d)?,
                    w_gate: match a.fused_gate_up {
                        true => None,
                        false => Some(QMat::load(f, &p("ffn_gate"), c.n_ff, d)?),
                    },
                    w_up: match a.fused_gate_up {
                        true => QMat::load(f, &p("ffn_up"), 2 * c.n_ff, d)?,
                        false => QMat::load(f, &p("ffn_up"), c.n_ff, d)?,
                    },
                    w_down: QMat::load(f, &p("ffn_down"), d, c.n_ff)?,
                })
            })
            .collect::<Result<_, ModelError>>()?;
        let rope_freqs = match a.rope_freqs && f.tensor("rope_freqs.weight").is_some() {
            true => Some(load_vec(f, "rope_freqs.weight", hd / 2)?),
            false => None,
        };
        Ok(Self {
            tok_embd,
            layers,
            output_norm: load_vec(f, "output_norm.weight", d)?,
            output,
            rope_freqs,
        })
    }

    /// Runs a batch: `tokens` (`[N]`, every sequence's new tokens in `spans` order), stores their
    /// K/V through each span's block table, and returns the logits of each span's last token
    /// (`[spans][vocab]`; every token's with `every_row`). The caller has checked ids, positions
    /// and blocks.
    pub fn forward(
        &self,
        f: &GgufFile,
        c: &ModelConfig,
        tokens: &[u32],
        spans: &KvSpans,
        kv: &mut KvStorage,
        every_row: bool,
    ) -> Vec<Vec<f32>> {
        let a: &ArchSpec = c.arch;
        let (n, d, qd, kvd) = (tokens.len(), c.n_embd, c.n_heads * c.head_dim, c.kv_dim());
        let mut x = vec![0f32; n * d]; // residual stream [n][d]
        timed(Op::Embed, || {
            let scale = (d as f32).sqrt();
            for (t, &tok) in tokens.iter().enumerate() {
                let row = &mut x[t * d..(t + 1) * d];
                self.tok_embd.row_into(f, tok as usize, row);
                if a.embd_scale {
                    row.iter_mut().for_each(|v| *v *= scale);
                }
            }
        });
        let mut xb = vec![0f32; n * d]; // normed input / projected output [n][d]
        let mut q = vec![0f32; n * qd]; // [n][n_heads][head_dim]
        let mut k = vec![0f32; n * kvd]; // [n][n_kv_heads][head_dim]
        let mut v = vec![0f32; n * kvd];
        let mut att = vec![0f32; n * qd];
        let mut gate = vec![0f32; n * c.n_ff]; // [n][n_ff]
        let mut up = vec![0f32; n * c.n_ff];
        // A fused matrix's output before it is split ([n][qd + 2 kvd] or [n][2 n_ff]).
        let mut fused = Vec::new();
        for (l, w) in self.layers.iter().enumerate() {
            let window = c.layer_window(l);
            let base = match window {
                Some(_) => c.rope_base_swa,
                None => c.rope_base,
            };
            timed(Op::Norm, || {
                rmsnorm_into(&x, &w.attn_norm, c.rms_eps, &mut xb)
            });
            timed(Op::Qkv, || {
                match &w.qkv {
                    Qkv::Split(wq, wk, wv) => {
                        matmul(wq.view(f), &xb, n, &mut q);
                        matmul(wk.view(f), &xb, n, &mut k);
                        matmul(wv.view(f), &xb, n, &mut v);
                    }
                    Qkv::Fused(wqkv) => {
                        fused.resize(n * (qd + 2 * kvd), 0.0);
                        matmul(wqkv.view(f), &xb, n, &mut fused);
                        split_rows(&fused, n, &mut [&mut q, &mut k, &mut v]);
                    }
                }
                if let Some([bq, bk, bv]) = &w.qkv_bias {
                    add_rows(&mut q, bq);
                    add_rows(&mut k, bk);
                    add_rows(&mut v, bv);
                }
            });
            if let Some((qn, kn)) = &w.qk_norm {
                timed(Op::Norm, || {
                    rmsnorm(&mut q, qn, c.rms_eps); // per head: rows of head_dim
                    rmsnorm(&mut k, kn, c.rms_eps);
                });
            }
            timed(Op::Rope, || {
                let rows = spans.rows();
                let rope = Rope {
                    style: a.rope,
                    base,
                    freq_scale: c.rope_freq_scale,
                    factors: self.rope_freqs.as_deref(),
                };
                rope_spans(&mut q, rows, c.n_heads, c.head_dim, &rope);
                rope_spans(&mut k, rows, c.n_kv_heads, c.head_dim, &rope);
                if a.softcap {
                    // Soft-capped scores are of pre-scaled queries (llama.cpp's gemma2).
                    q.iter_mut().for_each(|v| *v *= c.query_scale);
                }
            });
            let (slot, layer_spans) = spans.layer(l);
            timed(Op::KvStore, || store_kv(kv, slot, layer_spans, &k, &v));
            let shape = AttnShape {
                n_heads: c.n_heads,
                n_kv_heads: c.n_kv_heads,
                head_dim: c.head_dim,
                scale: if a.softcap { 1.0 } else { c.query_scale },
                window,
                softcap: c.attn_softcap,
            };
            timed(Op::Attention, || {
                attention(&q, kv, slot, layer_spans, shape, &mut att)
            });
            timed(Op::AttnOut, || matmul(w.wo.view(f), &att, n, &mut xb));
            if let Some((post_attn, _)) = &w.post_norms {
                timed(Op::Norm, || rmsnorm(&mut xb, post_attn, c.rms_eps));
            }
            timed(Op::Residual, || add(&mut x, &xb));

            timed(Op::Norm, || {
                rmsnorm_into(&x, &w.ffn_norm, c.rms_eps, &mut xb)
            });
            timed(Op::FfnGateUp, || match &w.w_gate {
                Some(wg) => {
                    matmul(wg.view(f), &xb, n, &mut gate);
                    matmul(w.w_up.view(f), &xb, n, &mut up);
                }
                None => {
                    fused.resize(n * 2 * c.n_ff, 0.0);
                    matmul(w.w_up.view(f), &xb, n, &mut fused);
                    split_rows(&fused, n, &mut [&mut gate, &mut up]);
                }
            });
            timed(Op::Act, || match a.act {
                Act::Silu => swiglu(&mut gate, &up),
                Act::GeluTanh => geglu(&mut gate, &up),
            });
            timed(Op::FfnDown, || matmul(w.w_down.view(f), &gate, n, &mut xb));
            if let Some((_, post_ffw)) = &w.post_norms {
                timed(Op::Norm, || rmsnorm(&mut xb, post_ffw, c.rms_eps));
            }
            timed(Op::Residual, || add(&mut x, &xb));
        }
        timed(Op::Output, || {
            let mut logits = lm_head(
                &x,
                spans.rows(),
                &self.output_norm,
                c.rms_eps,
                self.output.view(f),
                every_row,
            );
            if let Some(cap) = c.final_softcap {
                logits.iter_mut().for_each(|l| softcap(l, cap));
            }
            logits
        })
    }
}

/// Splits each of the `n` rows of `src` (`[n][Σ w_i]`) into the rows of `parts` (`[n][w_i]`
/// each), in order: a fused projection's outputs.
fn split_rows(src: &[f32], n: usize, parts: &mut [&mut Vec<f32>]) {
    debug_assert_eq!(src.len(), parts.iter().map(|p| p.len()).sum::<usize>());
    let mut at = 0;
    for t in 0..n {
        for p in parts.iter_mut() {
            let w = p.len() / n;
            p[t * w..(t + 1) * w].copy_from_slice(&src[at..at + w]);
            at += w;
        }
    }
}

/// Each row of `x` (`[n][b.len()]`) plus `b`: a bias.
fn add_rows(x: &mut [f32], b: &[f32]) {
    for row in x.chunks_exact_mut(b.len()) {
        add(row, b);
    }
}

/// `x += y`: the residual connection.
fn add(x: &mut [f32], y: &[f32]) {
    for (a, b) in x.iter_mut().zip(y) {
        *a += b;
    }
}
