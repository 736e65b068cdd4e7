//! Shared by the engine's integration tests.
#![allow(dead_code)]

use kvinfer_model::testing::{write_tiny_model_ctx, TinyArch};
use kvinfer_model::Model;
use std::path::PathBuf;

/// A tiny random model of `arch`, written to a fresh temp file and loaded.
pub fn tiny(arch: TinyArch, seed: u64) -> (Model, PathBuf) {
    tiny_ctx(arch, seed, 256)
}

/// As [`tiny`], with a context of `ctx` tokens.
pub fn tiny_ctx(arch: TinyArch, seed: u64, ctx: u32) -> (Model, PathBuf) {
    let dir = std::env::temp_dir().join(format!("kvinfer-tiny-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    // One file per call: tests run in parallel and a file must not be rewritten while mapped.
    static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let k = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let path = dir.join(format!("{arch:?}-{seed}-{k}.gguf"));
    write_tiny_model_ctx(&path, arch, seed, ctx).unwrap();
    (Model::load(&path).unwrap(), path)
}
