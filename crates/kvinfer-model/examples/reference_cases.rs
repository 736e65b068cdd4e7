//! Writes what `tests/reference/check.py` compares against an independent numpy forward pass
//! (weights dequantized by the `gguf` package):
//! - every tiny model (`kvinfer_model::testing`, one per architecture and shape) as a GGUF
//!   file, a prompt and kvinfer's greedy continuation of it, and kvinfer's logits after every
//!   one of those tokens;
//! - from each real model file given after the output directory (and the tiny Llama 3, which
//!   holds Q2_K, Q3_K, Q4_K, Q5_K, IQ4_NL and IQ4_XS), the first rows of one tensor per
//!   weight type, dequantized by
//!   kvinfer (as f32 bits).
//!
//! Usage: `cargo run --release -p kvinfer-model --example reference_cases -- OUT [MODEL.gguf ...]`

use kvinfer_cache::{BlockId, KvDtype, KvStorage};
use kvinfer_model::gguf::GgufFile;
use kvinfer_model::kernels::dequantize_row;
use kvinfer_model::testing::{write_tiny_model, TinyArch};
use kvinfer_model::{Model, SeqBatch};
use serde_json::json;
use std::error::Error;
use std::path::{Path, PathBuf};

/// Prompt tokens, then greedy tokens.
const PROMPT: usize = 10;
const GREEDY: usize = 14;

/// kvinfer's logits after every token of `ids`, in one pass over a fresh cache.
fn logits(model: &Model, ids: &[u32]) -> Result<Vec<Vec<f32>>, Box<dyn Error>> {
    let id = model.kv_identity(16, KvDtype::F16, false);
    let n_blocks = ids.len().div_ceil(16);
    let mut kv = KvStorage::new(id.layout(n_blocks));
    let tables = vec![(0..n_blocks as u32).map(BlockId).collect::<Vec<_>>()];
    let batch = [SeqBatch {
        tokens: ids,
        start: 0,
        tables: &tables,
    }];
    Ok(model.forward_all(&mut kv, &batch)?)
}

fn argmax(x: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in x.iter().enumerate() {
        if v > x[best] {
            best = i;
        }
    }
    best as u32
}

fn tiny_case(out: &Path, arch: TinyArch) -> Result<serde_json::Value, Box<dyn Error>> {
    let file = format!("{arch:?}.gguf");
    let path = out.join(&file);
    write_tiny_model(&path, arch, 7)?;
    let model = Model::load(&path)?;
    let vocab = model.config.vocab_size as u32;
    let mut ids: Vec<u32> = (0..PROMPT as u32).map(|i| (i * 37 + 5) % vocab).collect();
    for _ in 0..GREEDY {
        let all = logits(&model, &ids)?;
        ids.push(argmax(all.last().expect("a row per token")));
    }
    let all = logits(&model, &ids)?;
    Ok(json!({
        "arch": format!("{arch:?}"),
        "architecture": model.config.arch.name(),
        "file": file,
        "prompt_len": PROMPT,
        "tokens": ids,
        "logits": all,
    }))
}

/// The first rows of the first tensor of each weight type in `path`, dequantized.
fn dequant_cases(path: &Path) -> Result<Vec<serde_json::Value>, Box<dyn Error>> {
    let f = GgufFile::open(path)?;
    let mut seen = Vec::new();
    let mut cases = Vec::new();
    for t in f.tensors() {
        if seen.contains(&t.ty) || t.dims.len() != 2 {
            continue;
        }
        seen.push(t.ty);
        let cols = t.dims[0] as usize;
        let rb = t.ty.row_bytes(cols).ok_or("not a row type")?;
        let data = f.tensor_data(t);
        let rows = 2.min(t.dims[1] as usize);
        let mut bits = Vec::new();
        for r in 0..rows {
            let mut dst = vec![0f32; cols];
            dequantize_row(t.ty, &data[r * rb..(r + 1) * rb], &mut dst);
            bits.extend(dst.iter().map(|v| v.to_bits()));
        }
        cases.push(json!({
            "file": path.to_string_lossy(),
            "tensor": t.name,
            "type": format!("{:?}", t.ty),
            "rows": rows,
            "cols": cols,
            "bits": bits,
        }));
    }
    Ok(cases)
}

fn main() -> Result<(), Box<dyn Error>> {
    let mut args = std::env::args().skip(1);
    let out = PathBuf::from(
        args.next()
            .ok_or("usage: reference_cases OUT [MODEL.gguf ...]")?,
    );
    std::fs::create_dir_all(&out)?;
    let tiny = TinyArch::ALL
        .iter()
        .map(|&a| tiny_case(&out, a))
        .collect::<Result<Vec<_>, _>>()?;
    // The tiny Llama 3 holds the super-block and IQ4 types kvinfer's own test quantizer writes.
    let mut dequant = dequant_cases(&out.join(format!("{:?}.gguf", TinyArch::Llama3)))?;
    for m in args {
        dequant.extend(dequant_cases(Path::new(&m))?);
    }
    let doc = json!({"tiny": tiny, "dequant": dequant});
    std::fs::write(out.join("cases.json"), serde_json::to_vec(&doc)?)?;
    eprintln!(
        "wrote {} tiny models and {} dequantized tensors to {}",
        tiny.len(),
        dequant.len(),
        out.display()
    );
    Ok(())
}
