#!/usr/bin/env python3
"""An independent reference for kvinfer's forward passes and dequantization.

Reads the cases `cargo run --example reference_cases` wrote (tests/reference/run does both):

1. Each tiny model's weights are dequantized by the `gguf` package (not by kvinfer) and run
   through a numpy forward pass in float32 written from llama.cpp's graph for its architecture
   (src/models/{llama,qwen2,qwen3,gemma3,phi3}.cpp): RMSNorm, Q/K/V (+ biases), per-head Q/K norms,
   RoPE (normal or NEOX pairs, linear scaling, rope_freqs factors), causal grouped-query
   attention (a sliding window on Gemma 3's local layers), the gated FFN (SiLU or GELU), the
   post-norms and the output head. Every tensor of the file must be used.
   kvinfer's logits must agree with it: per position, max |difference| <= TOL times the
   reference's largest |logit| (kvinfer, like llama.cpp, quantizes activations to 8 bits for
   quantized weights and stores K/V in f16, so the two differ by rounding); kvinfer's greedy
   token may differ from the reference's argmax only where their reference logits are within twice that
   difference (a smaller margin is a tie within rounding), and at MIN_SAME of the positions or
   more it must be exactly the reference's, so the check cannot pass on ties alone.
2. Each dequantized tensor's first rows must equal the `gguf` package's dequantization bit for
   bit.

Usage: check.py CASES_DIR       (exit status 1 on any failure)
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import gguf
import numpy as np

TOL = 0.05  # of the reference's largest |logit| at that position (seen: 0.020-0.029)
MIN_SAME = 0.9  # fraction of positions whose greedy token must be the reference's


def field(r: gguf.GGUFReader, key: str, default=None):
    f = r.fields.get(key)
    return default if f is None else f.contents()


def weights(r: gguf.GGUFReader) -> dict[str, np.ndarray]:
    return {t.name: gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32) for t in r.tensors}


def rmsnorm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    ms = np.mean(x.astype(np.float64) ** 2, axis=-1, keepdims=True)
    return (x / np.sqrt(ms + eps)).astype(np.float32) * w


def rope(x: np.ndarray, pos: np.ndarray, base: float, neox: bool, freq_scale: float, factors) -> np.ndarray:
    """x: [n, heads, hd]; ggml's rope_ext without YaRN."""
    hd = x.shape[-1]
    i = np.arange(hd // 2, dtype=np.float64)
    theta = pos[:, None].astype(np.float64) * base ** (-2.0 * i / hd)
    if factors is not None:
        theta = theta / factors.astype(np.float64)
    theta = (freq_scale * theta)[:, None, :]
    c, s = np.cos(theta).astype(np.float32), np.sin(theta).astype(np.float32)
    out = x.copy()
    if neox:
        x0, x1 = x[..., : hd // 2], x[..., hd // 2 :]
        out[..., : hd // 2] = x0 * c - x1 * s
        out[..., hd // 2 :] = x0 * s + x1 * c
    else:
        x0, x1 = x[..., 0::2], x[..., 1::2]
        out[..., 0::2] = x0 * c - x1 * s
        out[..., 1::2] = x0 * s + x1 * c
    return out


def attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, window, scale: float, cap: float) -> np.ndarray:
    """q: [n, H, hd], k/v: [n, KV, hd]; causal, grouped heads; scores times scale, then
    cap * tanh(s / cap) when cap > 0."""
    n, H, hd = q.shape
    group = H // k.shape[1]
    out = np.zeros_like(q)
    for h in range(H):
        kh, vh = k[:, h // group], v[:, h // group]
        s = (q[:, h] @ kh.T) * np.float32(scale)
        if cap > 0:
            s = cap * np.tanh(s / cap)
        for p in range(n):
            lo = 0 if window is None else max(0, p + 1 - window)
            row = s[p, lo : p + 1]
            e = np.exp(row - row.max())
            out[p, h] = (e / e.sum()) @ vh[lo : p + 1]
    return out


def silu(x):
    return x / (1.0 + np.exp(-x))


def gelu_tanh(x):
    return 0.5 * x * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x**3)))


def forward(path: Path, tokens: list[int]) -> np.ndarray:
    r = gguf.GGUFReader(path)
    arch = field(r, "general.architecture")
    if arch not in ("llama", "qwen2", "qwen3", "gemma3", "phi3", "gemma2"):
        raise SystemExit(f"no reference for architecture {arch}")
    md = lambda k, d=None: field(r, f"{arch}.{k}", d)  # noqa: E731
    W = weights(r)
    used: set[str] = set()

    def w(name: str) -> np.ndarray:
        used.add(name)
        return W[name]

    def opt(name: str):
        return w(name) if name in W else None

    n_layer, n_embd = md("block_count"), md("embedding_length")
    n_head = md("attention.head_count")
    n_kv = md("attention.head_count_kv", n_head)
    hd = md("attention.key_length", n_embd // n_head)
    eps = md("attention.layer_norm_rms_epsilon", 1e-5)
    base = md("rope.freq_base", 10000.0)
    stype, factor = md("rope.scaling.type", "linear"), md("rope.scaling.factor", 0.0)
    freq_scale = 1.0 if stype == "none" or not factor else 1.0 / factor
    neox = arch in ("qwen2", "qwen3", "gemma3", "phi3", "gemma2")
    gemma = arch in ("gemma2", "gemma3")
    # gemma2: queries scaled before soft-capped scores (27B: by 1/sqrt(n_embd / n_head)).
    attn_cap, final_cap = md("attn_logit_softcapping", 0.0), md("final_logit_softcapping", 0.0)
    q_scale = 1.0 / np.sqrt(n_embd / n_head if arch == "gemma2" and n_layer == 46 else hd)
    factors = opt("rope_freqs.weight") if arch == "llama" else None

    n = len(tokens)
    pos = np.arange(n)
    x = w("token_embd.weight")[tokens].copy()
    if gemma:
        x *= np.float32(np.sqrt(n_embd))
    for l in range(n_layer):
        p = lambda t: f"blk.{l}.{t}.weight"  # noqa: E731
        h = rmsnorm(x, w(p("attn_norm")), eps)
        if arch == "phi3":  # one matrix: Q's rows, K's, V's
            qkv = h @ w(p("attn_qkv")).T
            q, k, v = qkv[:, : n_head * hd], qkv[:, n_head * hd : (n_head + n_kv) * hd], qkv[:, (n_head + n_kv) * hd :]
        else:
            q, k, v = h @ w(p("attn_q")).T, h @ w(p("attn_k")).T, h @ w(p("attn_v")).T
        if arch == "qwen2":
            q, k, v = q + w(f"blk.{l}.attn_q.bias"), k + w(f"blk.{l}.attn_k.bias"), v + w(f"blk.{l}.attn_v.bias")
        q, k, v = q.reshape(n, n_head, hd), k.reshape(n, n_kv, hd), v.reshape(n, n_kv, hd)
        if arch in ("qwen3", "gemma3"):
            q, k = rmsnorm(q, w(p("attn_q_norm")), eps), rmsnorm(k, w(p("attn_k_norm")), eps)
        base_l, window = base, None
        if arch == "gemma3" and l % 6 != 5:
            base_l, window = md("rope.freq_base_swa", 10000.0), md("attention.sliding_window")
        if arch == "gemma2" and l % 2 == 0:
            window = md("attention.sliding_window")
        q = rope(q, pos, base_l, neox, freq_scale, factors)
        k = rope(k, pos, base_l, neox, freq_scale, factors)
        o = attention(q, k, v, window, q_scale, attn_cap if arch == "gemma2" else 0.0)
        o = o.reshape(n, n_head * hd) @ w(p("attn_output")).T
        if gemma:
            o = rmsnorm(o, w(p("post_attention_norm")), eps)
        x = x + o
        h = rmsnorm(x, w(p("ffn_norm")), eps)
        if arch == "phi3":  # ggml_swiglu of one tensor: silu(first half) * second half
            gu = h @ w(p("ffn_up")).T
            g, u = gu[:, : gu.shape[1] // 2], gu[:, gu.shape[1] // 2 :]
        else:
            g, u = h @ w(p("ffn_gate")).T, h @ w(p("ffn_up")).T
        o = ((gelu_tanh(g) if gemma else silu(g)) * u) @ w(p("ffn_down")).T
        if gemma:
            o = rmsnorm(o, w(p("post_ffw_norm")), eps)
        x = x + o
    x = rmsnorm(x, w("output_norm.weight"), eps)
    out = opt("output.weight")
    logits = x @ (out if out is not None else W["token_embd.weight"]).T
    if arch == "gemma2" and final_cap > 0:
        logits = final_cap * np.tanh(logits / final_cap)
    unused = sorted(set(W) - used)
    if unused:
        raise SystemExit(f"{path.name}: the reference did not use {unused}")
    return logits


def check_tiny(d: Path, case: dict) -> list[str]:
    ref = forward(d / case["file"], case["tokens"])
    got = np.array(case["logits"], dtype=np.float32)
    errs, same, worst = [], 0, 0.0
    for i in range(len(case["tokens"])):
        scale = float(np.abs(ref[i]).max())
        diff = float(np.abs(got[i] - ref[i]).max())
        worst = max(worst, diff / scale)
        if diff > TOL * scale:
            errs.append(f"{case['arch']} position {i}: max |diff| {diff:.4g} > {TOL} x {scale:.4g}")
        choice = int(np.argmax(got[i]))
        if choice == int(np.argmax(ref[i])):
            same += 1
        elif ref[i].max() - ref[i][choice] > 2 * diff:
            errs.append(f"{case['arch']} position {i}: greedy {choice} is {ref[i].max() - ref[i][choice]:.4g} "
                        f"below the reference's best, more than rounding ({diff:.4g}) explains")
    n = len(case["tokens"])
    if same < MIN_SAME * n:
        errs.append(f"{case['arch']}: greedy agrees at only {same}/{n} positions")
    print(f"  {case['arch']:<12} ({case['architecture']}): {n} positions, worst max|diff| / max|logit| = "
          f"{worst:.4f} (tolerance {TOL}), same greedy token at {same}/{n}")
    return errs


def check_dequant(case: dict) -> list[str]:
    r = gguf.GGUFReader(case["file"])
    t = next(t for t in r.tensors if t.name == case["tensor"])
    rows, cols = case["rows"], case["cols"]
    ref = gguf.quants.dequantize(t.data[:rows], t.tensor_type).astype(np.float32).reshape(-1)[: rows * cols]
    got = np.array(case["bits"], dtype=np.uint32)
    same = np.array_equal(ref.view(np.uint32), got)
    print(f"  {case['type']:<6} {case['tensor']} ({Path(case['file']).name}): "
          f"{rows} x {cols} {'bit-identical' if same else 'DIFFERENT'}")
    if same:
        return []
    bad = int(np.sum(ref.view(np.uint32) != got))
    return [f"{case['type']} {case['tensor']}: {bad} of {rows * cols} values differ from gguf's dequantization"]


def main() -> int:
    d = Path(sys.argv[1])
    cases = json.loads((d / "cases.json").read_text())
    errs: list[str] = []
    print("forward passes against the numpy reference:")
    for c in cases["tiny"]:
        errs += check_tiny(d, c)
    print("dequantization against the gguf package:")
    for c in cases["dequant"]:
        errs += check_dequant(c)
    for e in errs:
        print("FAIL", e)
    print("ok" if not errs else f"{len(errs)} failures")
    return 1 if errs else 0


if __name__ == "__main__":
    sys.exit(main())
