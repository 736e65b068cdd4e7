//! What kvinfer computes, checked against what a file asks for: a model is computed exactly as
//! llama.cpp computes it, or refused with a message naming what is not supported. Never run
//! approximately.
//!
//! Two checks. The metadata: every key in the architecture's namespace is one kvinfer reads,
//! or one it knows and whose value does not change the computation (RoPE scaling of type
//! `none`, a soft-cap of 0, ...); any other key is refused by name, so a key that kvinfer does
//! not know can never be silently ignored. The tensors: after the weights are loaded, every
//! tensor of the file must have been read by the loader (a `rope_freqs.weight`, a bias or a
//! norm kvinfer does not apply is refused by name).

use crate::arch::ArchSpec;
use crate::gguf::{GgufFile, MetaValue};
use crate::ModelError;

/// Keys of `{arch}.*` that kvinfer reads (their values are checked where they are read).
const READ: &[&str] = &[
    "context_length",
    "embedding_length",
    "block_count",
    "feed_forward_length",
    "attention.head_count",
    "attention.head_count_kv",
    "attention.layer_norm_rms_epsilon",
    "attention.key_length",
    "attention.value_length",
    "rope.freq_base",
    "rope.dimension_count",
    "rope.scaling.type",
    "rope.scaling.factor",
    "rope.scale_linear",
    "vocab_size",
];

/// Namespaces outside the architecture's that never change the computation.
const NEUTRAL_NAMESPACES: &[&str] = &["general", "tokenizer", "quantize", "GGUF"];

fn refuse(what: String) -> ModelError {
    ModelError::Unsupported(what)
}

/// Refuses a file whose metadata asks for a computation kvinfer does not implement.
pub fn check_metadata(f: &GgufFile, arch: &ArchSpec, head_dim: usize) -> Result<(), ModelError> {
    let prefix = format!("{}.", arch.name());
    if let Some(t) = f.get_str("general.type") {
        if t != "model" {
            return Err(refuse(format!(
                "general.type is {t:?}: kvinfer runs whole models, not {t} files"
            )));
        }
    }
    for key in f.keys() {
        let Some(k) = key.strip_prefix(&prefix) else {
            let ns = key.split('.').next().unwrap_or_default();
            if NEUTRAL_NAMESPACES.contains(&ns) {
                continue;
            }
            return Err(refuse(format!(
                "metadata key {key} is not one kvinfer knows for a {} model",
                arch.name()
            )));
        };
        let value = f.meta(key);
        if READ.contains(&k) || arch.extra_keys.contains(&k) {
            let ok = match k {
                "rope.dimension_count" => f.get_u32(key).map(|v| v as usize) == Some(head_dim),
                "attention.value_length" => f.get_u32(key).map(|v| v as usize) == Some(head_dim),
                _ => true,
            };
            if !ok {
                return Err(refuse(format!(
                    "{key} = {} (kvinfer needs it equal to the head dimension, {head_dim})",
                    show(value)
                )));
            }
            continue;
        }
        let neutral = match k {
            // Read only by YaRN, which the config refuses.
            "rope.scaling.original_context_length" | "rope.scaling.finetuned" => true,
            "attn_logit_softcapping" | "final_logit_softcapping" => {
                f.get_f32(key).is_some_and(|v| v == 0.0)
            }
            "expert_count" | "expert_used_count" => f.get_u32(key) == Some(0),
            "attention.causal" => f.get_bool(key) == Some(true),
            _ => false,
        };
        if !neutral {
            return Err(refuse(format!(
                "metadata {key} = {} changes how the model is computed, which kvinfer does \
                 not implement for {} (it would not match llama.cpp)",
                show(value),
                arch.name()
            )));
        }
    }
    Ok(())
}

/// Refuses a file with tensors the loader did not read.
pub fn check_tensors(f: &GgufFile, arch: &ArchSpec) -> Result<(), ModelError> {
    let unread = f.unread_tensors();
    let Some(first) = unread.first() else {
        return Ok(());
    };
    Err(refuse(format!(
        "tensor {first} is not used by kvinfer's {} forward pass ({} such tensor{}): the \
         model would not be computed as llama.cpp computes it",
        arch.name(),
        unread.len(),
        if unread.len() == 1 { "" } else { "s" }
    )))
}

/// A metadata value for a message, short.
fn show(v: Option<&MetaValue>) -> String {
    let s = match v {
        Some(MetaValue::Str(s)) => format!("{s:?}"),
        Some(MetaValue::Array(a)) => format!("[{} values]", a.len()),
        Some(v) => format!("{v:?}"),
        None => "?".into(),
    };
    s.chars().take(80).collect()
}

#[cfg(test)]
mod tests {
    use crate::gguf::{GgufWriter, MetaValue};
    use crate::testing::{write_tiny_model_with, TinyArch};
    use crate::Model;
    use kvinfer_cache::KvDtype;

    fn load_with(arch: TinyArch, extra: impl FnOnce(&mut GgufWriter)) -> Result<Model, String> {
        let dir = std::env::temp_dir().join(format!("kvinfer-support-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(format!("{}.gguf", rand_name()));
        write_tiny_model_with(&path, arch, 1, 256, extra).unwrap();
        let r = Model::load(&path).map_err(|e| e.to_string());
        let _ = std::fs::remove_file(&path);
        r
    }

    fn rand_name() -> String {
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        format!("m{}", N.fetch_add(1, Ordering::Relaxed))
    }

    fn refused(arch: TinyArch, extra: impl FnOnce(&mut GgufWriter), names: &str) {
        let e = load_with(arch, extra).err().expect("refused");
        assert!(e.contains("unsupported model") && e.contains(names), "{e}");
    }

    #[test]
    fn plain_files_load() {
        for arch in TinyArch::ALL {
            load_with(arch, |_| {}).unwrap();
        }
        // Linear RoPE scaling (the type defaults to linear, as in llama.cpp) is computed.
        let m = load_with(TinyArch::Llama, |w| {
            w.meta("llama.rope.scaling.factor", MetaValue::F32(8.0));
        })
        .unwrap();
        assert_eq!(m.config.rope_freq_scale, 0.125);
        let m = load_with(TinyArch::Llama, |w| {
            w.meta("llama.rope.scaling.type", MetaValue::Str("none".into()))
                .meta("llama.rope.scaling.factor", MetaValue::F32(8.0));
        })
        .unwrap();
        assert_eq!(m.config.rope_freq_scale, 1.0);
        // A Mistral-style window on llama is read and not applied, as llama.cpp's llama graph
        // does (one layer group: no window); the summary says so.
        let plain = load_with(TinyArch::Llama, |_| {}).unwrap();
        let m = load_with(TinyArch::Llama, |w| {
            w.meta("llama.attention.sliding_window", MetaValue::U32(4));
        })
        .unwrap();
        assert!(
            m.summary().contains("sliding window of 4 is not applied"),
            "{}",
            m.summary()
        );
        assert!(!plain.summary().contains("sliding window"));
        assert_eq!(m.kv_identity(16, KvDtype::F16, true).groups.len(), 1);
        // Keys whose value changes nothing are fine.
        load_with(TinyArch::Llama, |w| {
            w.meta("llama.rope.scaling.type", MetaValue::Str("none".into()))
                .meta("llama.rope.dimension_count", MetaValue::U32(16))
                .meta("quantize.imatrix.file", MetaValue::Str("x".into()));
        })
        .unwrap();
    }

    #[test]
    fn what_changes_the_computation_is_refused_by_name() {
        use TinyArch::{Gemma2, Gemma3, Llama, Qwen2};
        // Another architecture's tensors: Q/K norms on llama, biases on qwen3.
        refused(
            Llama,
            |w| {
                w.tensor_f32("blk.1.attn_k_norm.weight", &[16], &[1.0; 16]);
            },
            "blk.1.attn_k_norm.weight",
        );
        refused(
            TinyArch::Qwen3,
            |w| {
                w.tensor_f32("blk.0.attn_v.bias", &[64], &[0.0; 64]);
            },
            "blk.0.attn_v.bias",
        );
        // Phi-3's 128k LongRoPE factors.
        refused(
            TinyArch::Phi3,
            |w| {
                w.tensor_f32("rope_factors_long.weight", &[16], &[1.0; 16]);
            },
            "rope_factors_long.weight",
        );
        // RoPE frequency factors where the architecture has none.
        refused(
            Gemma3,
            |w| {
                w.tensor_f32("rope_freqs.weight", &[16], &[1.0; 16]);
            },
            "rope_freqs.weight",
        );
        let s = |v: &str| MetaValue::Str(v.into());
        // RoPE scaling other than none and linear.
        for ty in ["yarn", "longrope"] {
            refused(
                Qwen2,
                |w| {
                    w.meta("qwen2.rope.scaling.type", s(ty))
                        .meta("qwen2.rope.scaling.factor", MetaValue::F32(4.0));
                },
                "qwen2.rope.scaling.type",
            );
        }
        refused(
            Llama,
            |w| {
                w.meta(
                    "llama.rope.scaling.yarn_log_multiplier",
                    MetaValue::F32(0.1),
                );
            },
            "yarn_log_multiplier",
        );
        refused(
            Gemma3,
            |w| {
                w.meta("gemma3.final_logit_softcapping", MetaValue::F32(30.0));
            },
            "final_logit_softcapping",
        );
        refused(
            Gemma3,
            |w| {
                w.meta("gemma3.attn_logit_softcapping", MetaValue::F32(50.0));
            },
            "attn_logit_softcapping",
        );
        // Gemma 2's output is always the embedding table in llama.cpp: an output matrix is
        // not computed.
        refused(
            Gemma2,
            |w| {
                w.tensor_f32("output.weight", &[64, 2], &[0.0; 128]);
            },
            "output.weight",
        );
        // Partial rotary embedding.
        refused(
            Llama,
            |w| {
                w.meta("llama.rope.dimension_count", MetaValue::U32(8));
            },
            "llama.rope.dimension_count",
        );
        // Unknown keys, unknown biases and norms.
        refused(
            Llama,
            |w| {
                w.meta("llama.some_new_knob", MetaValue::F32(2.0));
            },
            "llama.some_new_knob",
        );
        refused(
            Llama,
            |w| {
                w.tensor_f32("blk.0.attn_q.bias", &[64], &[0.5; 64]);
            },
            "blk.0.attn_q.bias",
        );
        refused(
            Gemma3,
            |w| {
                w.tensor_f32("blk.1.layer_output_norm.weight", &[64], &[1.0; 64]);
            },
            "blk.1.layer_output_norm.weight",
        );
        refused(
            Llama,
            |w| {
                w.meta("general.type", s("adapter"));
            },
            "adapter",
        );
    }
}
