//! The Gemma 3 architecture. Gemma Team 2025, "Gemma 3 Technical Report", arXiv:2503.19786.
//!
//! Differences from llama, all here: embeddings scaled by sqrt(n_embd); RMSNorm on each query and
//! key head; norms after attention and after the FFN as well as before; GELU-gated FFN; NEOX RoPE
//! with base 1e6 on global layers and 10000 on sliding-window layers; five sliding-window layers
//! (window 512) for every global one (layer % 6 == 5); output tied to the embeddings. The GGUF
//! norm weights already include Gemma's `1 +` offset (added at conversion).

use crate::config::ModelConfig;
use crate::gguf::GgufFile;
use crate::kernels::matmul;
use crate::layers::{
    attention, geglu, lm_head, rmsnorm, rmsnorm_into, rope_spans, store_kv, AttnShape, KvSpans,
    RopeStyle,
};
use crate::llama::add;
use crate::profile::{timed, Op};
use crate::weights::{load_vec, QMat};
use crate::ModelError;
use kvinfer_cache::KvStorage;

struct Layer {
    attn_norm: Vec<f32>,
    wq: QMat,
    wk: QMat,
    wv: QMat,
    q_norm: Vec<f32>,
    k_norm: Vec<f32>,
    wo: QMat,
    post_attn_norm: Vec<f32>,
    ffn_norm: Vec<f32>,
    w_gate: QMat,
    w_up: QMat,
    w_down: QMat,
    post_ffw_norm: Vec<f32>,
}

/// Handles to every tensor of a gemma3 model.
pub struct Weights {
    tok_embd: QMat,
    layers: Vec<Layer>,
    output_norm: Vec<f32>,
    output: QMat,
}

impl Weights {
    /// Finds and shape-checks every tensor.
    pub fn load(f: &GgufFile, c: &ModelConfig) -> Result<Self, ModelError> {
        let (d, kv, qd, hd) = (c.n_embd, c.kv_dim(), c.n_heads * c.head_dim, c.head_dim);
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
                    q_norm: load_vec(f, &p("attn_q_norm"), hd)?,
                    k_norm: load_vec(f, &p("attn_k_norm"), hd)?,
                    wo: QMat::load(f, &p("attn_output"), d, qd)?,
                    post_attn_norm: load_vec(f, &p("post_attention_norm"), d)?,
                    ffn_norm: load_vec(f, &p("ffn_norm"), d)?,
                    w_gate: QMat::load(f, &p("ffn_gate"), c.n_ff, d)?,
                    w_up: QMat::load(f, &p("ffn_up"), c.n_ff, d)?,
                    w_down: QMat::load(f, &p("ffn_down"), d, c.n_ff)?,
                    post_ffw_norm: load_vec(f, &p("post_ffw_norm"), d)?,
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
        let embd_scale = (d as f32).sqrt();
        let mut x = vec![0f32; n * d]; // residual stream [n][d]
        timed(Op::Embed, || {
            for (t, &tok) in tokens.iter().enumerate() {
                let row = &mut x[t * d..(t + 1) * d];
                self.tok_embd.row_into(f, tok as usize, row);
                row.iter_mut().for_each(|v| *v *= embd_scale);
            }
        });
        let mut xb = vec![0f32; n * d];
        let mut q = vec![0f32; n * qd]; // [n][n_heads][head_dim]
        let mut k = vec![0f32; n * kvd]; // [n][n_kv_heads][head_dim]
        let mut v = vec![0f32; n * kvd];
        let mut att = vec![0f32; n * qd];
        let mut gate = vec![0f32; n * c.n_ff];
        let mut up = vec![0f32; n * c.n_ff];
        for (l, w) in self.layers.iter().enumerate() {
            let swa = c.is_swa_layer(l);
            let base = if swa { c.rope_base_swa } else { c.rope_base };
            timed(Op::Norm, || {
                rmsnorm_into(&x, &w.attn_norm, c.rms_eps, &mut xb)
            });
            timed(Op::Qkv, || {
                matmul(w.wq.view(f), &xb, n, &mut q);
                matmul(w.wk.view(f), &xb, n, &mut k);
                matmul(w.wv.view(f), &xb, n, &mut v);
            });
            timed(Op::Norm, || {
                rmsnorm(&mut q, &w.q_norm, c.rms_eps); // per head: rows of head_dim
                rmsnorm(&mut k, &w.k_norm, c.rms_eps);
            });
            timed(Op::Rope, || {
                let rows = spans.rows();
                rope_spans(&mut q, rows, c.n_heads, c.head_dim, base, RopeStyle::Neox);
                rope_spans(
                    &mut k,
                    rows,
                    c.n_kv_heads,
                    c.head_dim,
                    base,
                    RopeStyle::Neox,
                );
            });
            let (slot, layer_spans) = spans.layer(l);
            timed(Op::KvStore, || store_kv(kv, slot, layer_spans, &k, &v));
            let shape = AttnShape {
                n_heads: c.n_heads,
                n_kv_heads: c.n_kv_heads,
                head_dim: c.head_dim,
                scale: 1.0 / (c.head_dim as f32).sqrt(),
                window: if swa { c.sliding_window } else { None },
            };
            timed(Op::Attention, || {
                attention(&q, kv, slot, layer_spans, shape, &mut att)
            });
            timed(Op::AttnOut, || matmul(w.wo.view(f), &att, n, &mut xb));
            timed(Op::Norm, || rmsnorm(&mut xb, &w.post_attn_norm, c.rms_eps));
            timed(Op::Residual, || add(&mut x, &xb));

            timed(Op::Norm, || {
                rmsnorm_into(&x, &w.ffn_norm, c.rms_eps, &mut xb)
            });
            timed(Op::FfnGateUp, || {
                matmul(w.w_gate.view(f), &xb, n, &mut gate);
                matmul(w.w_up.view(f), &xb, n, &mut up);
            });
            timed(Op::Act, || geglu(&mut gate, &up));
            timed(Op::FfnDown, || matmul(w.w_down.view(f), &gate, n, &mut xb));
            timed(Op::Norm, || rmsnorm(&mut xb, &w.post_ffw_norm, c.rms_eps));
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
