//! The LLaMA architecture (SmolLM2 and kin): pre-norm blocks of grouped-query attention with RoPE
//! and a SwiGLU feed-forward network. Touvron et al. 2023, "LLaMA", arXiv:2302.13971.
//!
//! ```text
//! x = embed(tokens)                                   [n][n_embd]
//! per layer: x += Wo · attn(rope(Wq·norm(x)), rope(Wk·norm(x)), Wv·norm(x))
//!            x += Wdown · (silu(Wgate·norm(x)) * Wup·norm(x))
//! logits = Wout · norm(x[last])                       [vocab]
//! ```

use crate::config::ModelConfig;
use crate::gguf::GgufFile;
use crate::kernels::matmul;
use crate::layers::{
    attention, lm_head, rmsnorm_into, rope_spans, store_kv, swiglu, AttnShape, KvSpans, RopeStyle,
};
use crate::profile::{timed, Op};
use crate::weights::{load_vec, QMat};
use crate::ModelError;
use kvinfer_cache::KvStorage;

struct Layer {
    attn_norm: Vec<f32>,
    wq: QMat,
    wk: QMat,
    wv: QMat,
    wo: QMat,
    ffn_norm: Vec<f32>,
    w_gate: QMat,
    w_up: QMat,
    w_down: QMat,
}

/// Handles to every tensor of a llama model.
pub struct Weights {
    tok_embd: QMat,
    layers: Vec<Layer>,
    output_norm: Vec<f32>,
    /// `output.weight`, or the embedding matrix when tied.
    output: QMat,
}

impl Weights {
    /// Finds and shape-checks every tensor.
    pub fn load(f: &GgufFile, c: &ModelConfig) -> Result<Self, ModelError> {
        let (d, kv, qd) = (c.n_embd, c.kv_dim(), c.n_heads * c.head_dim);
        let tok_embd = QMat::load_table(f, "token_embd.weight", c.vocab_size, d)?;
        let output = match f.tensor("output.weight") {
            Some(_) => QMat::load(f, "output.weight", c.vocab_size, d)?,
            None => tok_embd.clone().packed(f),
        };
        let layers = (0..c.n_layers)
            .map(|l| {
                let p = |s: &str| format!("blk.{l}.{s}.weight");
                Ok(Layer {
                    attn_norm: load_vec(f, &p("attn_norm"), d)?,
                    wq: QMat::load(f, &p("attn_q"), qd, d)?,
                    wk: QMat::load(f, &p("attn_k"), kv, d)?,
                    wv: QMat::load(f, &p("attn_v"), kv, d)?,
                    wo: QMat::load(f, &p("attn_output"), d, qd)?,
                    ffn_norm: load_vec(f, &p("ffn_norm"), d)?,
                    w_gate: QMat::load(f, &p("ffn_gate"), c.n_ff, d)?,
                    w_up: QMat::load(f, &p("ffn_up"), c.n_ff, d)?,
                    w_down: QMat::load(f, &p("ffn_down"), d, c.n_ff)?,
                })
            })
            .collect::<Result<_, ModelError>>()?;
        Ok(Self {
            tok_embd,
            layers,
            output_norm: load_vec(f, "output_norm.weight", d)?,
            output,
        })
    }

    /// Runs a batch: `tokens` (`[N]`, every sequence's new tokens in `spans` order), stores their
    /// K/V through each span's block table, and returns the logits of each span's last token
    /// (`[spans][vocab]`). The caller has checked ids, positions and blocks.
    pub fn forward(
        &self,
        f: &GgufFile,
        c: &ModelConfig,
        tokens: &[u32],
        spans: &KvSpans,
        kv: &mut KvStorage,
        every_row: bool,
    ) -> Vec<Vec<f32>> {
        let (n, d, qd, kvd) = (tokens.len(), c.n_embd, c.n_heads * c.head_dim, c.kv_dim());
        let mut x = vec![0f32; n * d]; // residual stream [n][d]
        timed(Op::Embed, || {
            for (t, &tok) in tokens.iter().enumerate() {
                self.tok_embd
                    .row_into(f, tok as usize, &mut x[t * d..(t + 1) * d]);
            }
        });
        let mut xb = vec![0f32; n * d]; // normed input / projected output [n][d]
        let mut q = vec![0f32; n * qd]; // [n][n_heads][head_dim]
        let mut k = vec![0f32; n * kvd]; // [n][n_kv_heads][head_dim]
        let mut v = vec![0f32; n * kvd];
        let mut att = vec![0f32; n * qd];
        let mut gate = vec![0f32; n * c.n_ff]; // [n][n_ff]
        let mut up = vec![0f32; n * c.n_ff];
        let shape = AttnShape {
            n_heads: c.n_heads,
            n_kv_heads: c.n_kv_heads,
            head_dim: c.head_dim,
            scale: 1.0 / (c.head_dim as f32).sqrt(),
            window: None,
        };
        for (l, w) in self.layers.iter().enumerate() {
            timed(Op::Norm, || {
                rmsnorm_into(&x, &w.attn_norm, c.rms_eps, &mut xb)
            });
            timed(Op::Qkv, || {
                matmul(w.wq.view(f), &xb, n, &mut q);
                matmul(w.wk.view(f), &xb, n, &mut k);
                matmul(w.wv.view(f), &xb, n, &mut v);
            });
            timed(Op::Rope, || {
                let rows = spans.rows();
                rope_spans(
                    &mut q,
                    rows,
                    c.n_heads,
                    c.head_dim,
                    c.rope_base,
                    RopeStyle::Normal,
                );
                rope_spans(
                    &mut k,
                    rows,
                    c.n_kv_heads,
                    c.head_dim,
                    c.rope_base,
                    RopeStyle::Normal,
                );
            });
            let (slot, layer_spans) = spans.layer(l);
            timed(Op::KvStore, || store_kv(kv, slot, layer_spans, &k, &v));
            timed(Op::Attention, || {
                attention(&q, kv, slot, layer_spans, shape, &mut att)
            });
            timed(Op::AttnOut, || matmul(w.wo.view(f), &att, n, &mut xb));
            timed(Op::Residual, || add(&mut x, &xb));

            timed(Op::Norm, || {
                rmsnorm_into(&x, &w.ffn_norm, c.rms_eps, &mut xb)
            });
            timed(Op::FfnGateUp, || {
                matmul(w.w_gate.view(f), &xb, n, &mut gate);
                matmul(w.w_up.view(f), &xb, n, &mut up);
            });
            timed(Op::Act, || swiglu(&mut gate, &up));
            timed(Op::FfnDown, || matmul(w.w_down.view(f), &gate, n, &mut xb));
            timed(Op::Residual, || add(&mut x, &xb));
        }
        timed(Op::Output, || {
            lm_head(
                &x,
                spans.rows(),
                &self.output_norm,
                c.rms_eps,
                self.output.view(f),
                every_row,
            )
        })
    }
}

/// `x += y`: the residual connection.
pub(crate) fn add(x: &mut [f32], y: &[f32]) {
    for (a, b) in x.iter_mut().zip(y) {
        *a += b;
    }
}
