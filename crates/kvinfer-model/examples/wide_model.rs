//! Writes a tiny-vocabulary llama wide enough that its matrix products dominate
//! (`TinyArch::Wide`: n_embd 2048, n_ff 5632, 2 layers), every matrix in one weight type, to
//! compare kvinfer's speed per type with llama.cpp's on the same file (bench/wide-models).
//!
//! Usage: `cargo run --release -p kvinfer-model --example wide_model -- OUT_DIR TYPE [TYPE ...]`
//! (types by ggml name: Q4_0, Q2_K, IQ4_XS, ...); writes `OUT_DIR/wide-<type>.gguf`.

use kvinfer_model::ggml_type::GgmlType;
use kvinfer_model::testing::{write_tiny_model_ctx, TinyArch};
use std::error::Error;
use std::path::PathBuf;

fn main() -> Result<(), Box<dyn Error>> {
    let mut args = std::env::args().skip(1);
    let out = PathBuf::from(
        args.next()
            .ok_or("usage: wide_model OUT_DIR TYPE [TYPE ...]")?,
    );
    std::fs::create_dir_all(&out)?;
    for name in args {
        let ty = (0..64u32)
            .filter_map(GgmlType::from_id)
            .find(|t| GgmlType::id_name(*t as u32).is_some_and(|n| n.eq_ignore_ascii_case(&name)))
            .ok_or_else(|| format!("unknown or unsupported type {name}"))?;
        let path = out.join(format!("wide-{}.gguf", name.to_ascii_lowercase()));
        write_tiny_model_ctx(&path, TinyArch::Wide(ty), 7, 8192)?;
        eprintln!("wrote {}", path.display());
    }
    Ok(())
}
