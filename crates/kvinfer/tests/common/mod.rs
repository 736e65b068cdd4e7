//! Shared helpers of the end-to-end tests over the real models.

use std::path::PathBuf;

/// The workspace root.
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .unwrap()
}

/// Path of a real model; panics with the install command when it is missing (CI installs them).
pub fn model_path(file: &str) -> PathBuf {
    let dir = std::env::var("KVINFER_MODELS")
        .map(PathBuf::from)
        .unwrap_or_else(|_| root().join("models"));
    let p = dir.join(file);
    assert!(
        p.is_file(),
        "model {} is missing: run scripts/get-models",
        p.display()
    );
    p
}

/// (alias, file) of both real models.
pub const MODELS: [(&str, &str); 2] = [
    ("smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
    ("gemma3", "gemma-3-270m-q4_k_m.gguf"),
];
