#!/usr/bin/env python3
"""Generate llama.cpp reference fixtures for kvinfer's tokenizer and decode tests.

Run with the bench venv (see bench/setup-llamacpp):

    bench/.venv/bin/python bench/make-fixtures.py [--only tokenizer|generate] [--models smollm2,gemma3]

Writes (all deterministic, small, meant to be committed):
    bench/fixtures/tokenizer-corpus.json        list of test strings
    bench/fixtures/tokenizer-<model>.json       llama.cpp token ids per string (special=False and True)
    bench/fixtures/generate-<model>.json        greedy 48-token continuations + margins + top-5
    bench/fixtures/logits/<model>-<i>.f16       full first-step logits (LE float16) for prompts 0..2
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
FIXTURES = BENCH / "fixtures"
LOGITS_DIR = FIXTURES / "logits"

MODELS = {
    "smollm2": {"file": ROOT / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf", "add_bos": False},
    "gemma3": {"file": ROOT / "models" / "gemma-3-270m-q4_k_m.gguf", "add_bos": True},
}

GEN_TOKENS = 48
N_CTX = 512
N_THREADS = 2
N_BATCH = 512
SEED = 1234
N_LOGITS_FILES = 3


# --------------------------------------------------------------------------
# Tokenizer corpus
# --------------------------------------------------------------------------

HAND_WRITTEN = [
    # trivial / whitespace
    "",
    " ",
    "  ",
    "   ",
    "\t",
    "\n",
    "\n\n",
    "\n\n\n",
    "\r\n",
    " \n ",
    "a",
    " a",
    "a ",
    "  a  ",
    "Hello",
    "Hello world",
    " Hello world",
    "Hello world ",
    "Hello  world",
    "Hello   world",
    "Hello\tworld",
    "Hello\t\tworld\t",
    "Hello\nworld",
    "Hello\n\nworld",
    "Hello\n\n\n\nworld",
    "Hello \n world",
    "line one\r\nline two\r\n",
    "   leading spaces",
    "trailing spaces   ",
    "\t\tindented with tabs",
    "    four space indent\n        eight space indent",
    # ASCII prose
    "The quick brown fox jumps over the lazy dog.",
    "Once upon a time, in a land far, far away, there lived a small dragon.",
    "It was the best of times, it was the worst of times; it was the age of wisdom.",
    "Why? Because... well, nobody really knows!",
    "She said, \"I'll be there at 5 o'clock.\"",
    "Mr. Smith & Mrs. Jones (née Brown) arrived at 3:45 p.m.",
    "ALL CAPS SENTENCE WITH SHOUTING!!!",
    "camelCaseIdentifier and snake_case_identifier and kebab-case-identifier",
    "e.g. i.e. etc. vs. U.S.A.",
    # contractions
    "don't I'll you're we've they'd it's can't won't shouldn't",
    "DON'T I'LL YOU'RE WE'VE THEY'D",
    "I'm sure he'd've done it if they'd asked.",
    "rock 'n' roll, 'twas, y'all, o'clock",
    "it’s curly apostrophe’s test",
    # numbers
    "0",
    "7",
    "42",
    "123",
    "1234",
    "12345",
    "1234567890",
    "3.14159265358979323846",
    "-273.15",
    "1,000,000",
    "1e-10 and 6.022e23",
    "0x1F 0b1010 0o777",
    "98765432109876543210987654321",
    "The year 2024 had 366 days; 2023 had 365.",
    "Call +1 (555) 123-4567 now",
    "v1.2.3-rc.4+build.567",
    # CJK / Japanese / Korean
    "你好，世界！",
    "我爱自然语言处理。今天天气很好。",
    "中华人民共和国成立于1949年。",
    "こんにちは世界",
    "日本語のテキストとカタカナ、ひらがな、漢字。",
    "東京は日本の首都です。",
    "ｶﾀｶﾅ 半角 ＡＢＣ 全角",
    "안녕하세요 세계",
    "한국어 문장입니다. 감사합니다!",
    # Arabic / Hebrew / Hindi / Cyrillic / Greek / Thai
    "مرحبا بالعالم",
    "اللغة العربية جميلة جدا.",
    "שלום עולם",
    "नमस्ते दुनिया",
    "हिन्दी भाषा बहुत सुंदर है।",
    "Привет, мир! Как дела?",
    "Съешь же ещё этих мягких французских булок.",
    "Γειά σου Κόσμε",
    "สวัสดีชาวโลก",
    "Tiếng Việt có dấu: Xin chào thế giới",
    # accented latin / combining marks
    "café naïve résumé façade coöperate",
    "Ångström Øresund Æsir straße Größe",
    "ÀÁÂÃÄÅàáâãäå ÈÉÊËèéêë",
    "e\u0301 (e + combining acute)",
    "n\u0303o combining tilde",
    "a\u0300\u0301\u0302\u0303\u0304 stacked combining marks",
    "Z\u0351\u036b\u0343\u036a\u0302\u036b\u033d\u034f\u0334\u0319\u0324\u031e\u0349\u035a\u032f\u031e\u0320\u034dA\u036b\u0357\u0334\u0362\u0335\u031c\u0330\u0354LGO",
    "\u00e9 vs e\u0301",
    # emoji
    "😀",
    "Hello 😀 world 🌍!",
    "🔥🔥🔥",
    "👍🏽 thumbs up medium skin tone",
    "👨‍👩‍👧‍👦 family ZWJ sequence",
    "👩‍💻 woman technologist",
    "🏳️‍🌈 rainbow flag",
    "🇺🇸🇯🇵🇩🇪🇫🇷 flags",
    "🇬🇧",
    "❤️ heart with variation selector",
    "1️⃣ keycap",
    "🧑🏿‍🤝‍🧑🏻",
    # code
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n",
    "fn main() {\n    let v: Vec<u32> = (0..10).map(|x| x * x).collect();\n    println!(\"{:?}\", v);\n}\n",
    "#include <stdio.h>\nint main(void) {\n\tprintf(\"hello, world\\n\");\n\treturn 0;\n}\n",
    "const add = (a, b) => a + b;\nconsole.log(`sum: ${add(1, 2)}`);",
    "SELECT id, name FROM users WHERE age >= 18 ORDER BY name DESC LIMIT 10;",
    "<html><body><div class=\"main\">Hi &amp; bye</div></body></html>",
    "{\"key\": [1, 2, 3], \"nested\": {\"a\": null, \"b\": true}}",
    "for i in $(seq 1 10); do echo \"$i\"; done 2>&1 | tee log.txt",
    "public static void main(String[] args) { System.out.println(\"Hi\"); }",
    "x = [i**2 for i in range(10) if i % 2 == 0]",
    "if (a != b && c <= d || !e) { return a->b; }",
    "    \treturn;\n}\n\n\n",
    "// comment\n/* block */\n# hash comment\n-- sql comment",
    "regex: ^[a-zA-Z0-9._%+-]+@[a-zA-Z0-9.-]+\\.[a-zA-Z]{2,}$",
    # URLs / paths / emails
    "https://www.example.com/path/to/page?query=1&other=two#fragment",
    "http://localhost:8080/api/v1/items/42",
    "Visit github.com/ggml-org/llama.cpp for more.",
    "/usr/local/bin/python3 C:\\Windows\\System32\\cmd.exe",
    "contact: john.doe+tag@example.co.uk",
    # markdown
    "# Heading 1\n\n## Heading 2\n\nSome **bold** and *italic* and `code`.",
    "- item one\n- item two\n  - nested item\n1. first\n2. second",
    "| col a | col b |\n|-------|-------|\n| 1     | 2     |",
    "```python\nprint('hi')\n```",
    "> quoted text\n> more quote",
    "[link text](https://example.com) and ![image](img.png)",
    "---\n***\n___",
    # special-token-like text
    "<|im_start|>",
    "<|im_end|>",
    "<|im_start|>user\nHello!<|im_end|>\n<|im_start|>assistant\n",
    "<|im_start|>system\nYou are helpful.<|im_end|>",
    "<|endoftext|>",
    "<start_of_turn>",
    "<end_of_turn>",
    "<start_of_turn>user\nHi there<end_of_turn>\n<start_of_turn>model\n",
    "<bos>",
    "<eos>",
    "<s>",
    "</s>",
    "<pad>",
    "<unk>",
    "<mask>",
    "text<|im_end|>more text",
    "<|im_start|><|im_start|>",
    "< |im_start| >",
    "<|notatoken|>",
    "[INST] hello [/INST]",
    "<think>reasoning</think>",
    # punctuation / symbols
    "!!!???...,,,;;;:::",
    "@#$%^&*()_+-=[]{}|;':\",./<>?`~",
    "—–-‐ dashes … ellipsis «quotes» „German“ ‚single‘",
    "© ® ™ § ¶ † ‡ • ° ± × ÷ ≠ ≤ ≥ ∞ ∑ ∫ √ π",
    "€100 £50 ¥1000 ₹500 $20.99",
    "→ ← ↑ ↓ ⇒ ⇔ ∀ ∃ ∈ ∉ ⊂ ∪ ∩",
    "\u200b zero width space \u200b",
    "non\u00a0breaking\u00a0space",
    "soft\u00adhyphen",
    "\ufeffBOM at start",
    "tab\u000bvertical\u000cformfeed",
    "\u2028line separator\u2029paragraph separator",
    "\x00 null byte",
    "control \x01\x02\x1b[0m escape",
    # mixed scripts
    "English, 中文, 日本語, 한국어, العربية, हिन्दी mixed.",
    "The word for cat in Japanese is 猫 (neko).",
    "Mixing😀emoji中文and English123numbers",
    "ABC123def456GHI",
    # long
    "supercalifragilisticexpialidocious",
    "pneumonoultramicroscopicsilicovolcanoconiosis",
    "Donaudampfschifffahrtselektrizitätenhauptbetriebswerkbauunterbeamtengesellschaft",
    "a" * 300,
    "ab" * 150,
    "x" * 1000,
    " " * 64,
    "\n" * 32,
    "=" * 80,
    "😀" * 20,
    "中" * 50,
]


def programmatic_variants() -> list[str]:
    out: list[str] = []
    words = ["the", "cat", "sat", "on", "mat", "running", "unbelievable", "tokenization", "GPU", "AI"]
    # whitespace combinations around a word
    for pre in ["", " ", "  ", "\t", "\n", " \n"]:
        for post in ["", " ", "  ", "\n", "\t "]:
            out.append(f"{pre}word{post}")
    # digit runs of every length 1..24
    digits = "31415926535897932384626433832795"
    for n in range(1, 25):
        out.append(digits[:n])
    # numbers embedded in text
    for n in [5, 17, 256, 1024, 65536, 1000000, 123456789]:
        out.append(f"I have {n} apples and {n * 3 + 1} oranges.")
    # case variants
    for w in words:
        out.append(f"{w} {w.capitalize()} {w.upper()}")
    # repeated spaces between words
    for k in range(1, 9):
        out.append((" " * k).join(["alpha", "beta", "gamma"]))
    # newline runs
    for k in range(1, 7):
        out.append(("\n" * k).join(["para one.", "para two."]))
    # contraction matrix
    for subj in ["I", "you", "we", "they", "she"]:
        for c in ["'ll", "'ve", "'d", "'re", "'s", "'m"]:
            out.append(f"{subj}{c} go")
    return out


def build_corpus() -> list[str]:
    corpus: list[str] = []
    seen: set[str] = set()
    for s in HAND_WRITTEN + programmatic_variants():
        if s not in seen:
            seen.add(s)
            corpus.append(s)
    return corpus


# --------------------------------------------------------------------------
# Generation prompts
# --------------------------------------------------------------------------

RAW_PROMPTS = [
    "The capital of France is",
    "Once upon a time, in a small village at the edge of the forest,",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "Here is a list of five fruits:\n1.",
    "Question: What is the boiling point of water at sea level?\nAnswer:",
    "The three primary colors are",
    "import numpy as np\n\n# compute the mean of an array\narr = np.array([1, 2, 3, 4])\n",
    "In 1492, Columbus",
    "La capitale de l'Allemagne est",
    "Der schnellste Weg zum Bahnhof ist",
    "日本の首都は",
    "My favorite recipe for chocolate chip cookies starts with",
]

CHAT_USER_MESSAGES = [
    "What is the capital of Japan?",
    "Write a haiku about the ocean.",
    "Explain what a hash table is in one sentence.",
    "List three benefits of regular exercise.",
]

CHAT_TEMPLATES = {
    "smollm2": "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n",
    "gemma3": "<start_of_turn>user\n{}<end_of_turn>\n<start_of_turn>model\n",
}


def prompts_for(model: str) -> list[tuple[str, bool]]:
    ps = [(p, False) for p in RAW_PROMPTS]
    tmpl = CHAT_TEMPLATES[model]
    ps += [(tmpl.format(m), True) for m in CHAT_USER_MESSAGES]
    return ps


# --------------------------------------------------------------------------
# llama.cpp helpers
# --------------------------------------------------------------------------

def llama_version_info() -> dict:
    import llama_cpp

    info = {"llama_cpp_python": llama_cpp.__version__, "llama_cpp_commit": "unknown"}
    vfile = BENCH / "build" / "llama.cpp.version.json"
    if vfile.exists():
        try:
            info["llama_cpp_commit"] = json.loads(vfile.read_text())["llama_cpp_commit"]
        except Exception:
            pass
    if info["llama_cpp_commit"] == "unknown":
        # fall back to the CHANGELOG shipped in the sdist
        import re

        for cl in (BENCH / "build" / "sdist").glob(f"llama_cpp_python-{llama_cpp.__version__}/CHANGELOG.md"):
            m = re.search(r"## \[" + re.escape(llama_cpp.__version__) + r"\][^#]*?llama\.cpp@([0-9a-f]+)", cl.read_text())
            if m:
                info["llama_cpp_commit"] = m.group(1)
    info["system_info"] = llama_cpp.llama_cpp.llama_print_system_info().decode().strip()
    return info


def version_string(info: dict) -> str:
    return f"llama-cpp-python {info['llama_cpp_python']} (llama.cpp {info['llama_cpp_commit']})"


def open_llama(path: Path, vocab_only: bool):
    from llama_cpp import Llama

    return Llama(
        model_path=str(path),
        vocab_only=vocab_only,
        n_ctx=N_CTX,
        n_batch=N_BATCH,
        n_ubatch=N_BATCH,
        n_threads=N_THREADS,
        n_threads_batch=N_THREADS,
        seed=SEED,
        logits_all=False,
        verbose=False,
    )


def tokenizer_fixture(model: str, corpus: list[str], info: dict) -> dict:
    spec = MODELS[model]
    llm = open_llama(spec["file"], vocab_only=True)
    bos = llm.token_bos()
    cases = []
    for text in corpus:
        b = text.encode("utf-8")
        ids = llm.tokenize(b, add_bos=spec["add_bos"], special=False)
        ids_sp = llm.tokenize(b, add_bos=spec["add_bos"], special=True)
        # sanity: BOS presence must follow the add_bos flag (llama-cpp-python must not add its own)
        if spec["add_bos"]:
            assert ids and ids[0] == bos, (model, text, ids[:3])
        else:
            assert not ids or ids[0] != bos, (model, text, ids[:3])
        body = ids[1:] if spec["add_bos"] else ids
        detok = detokenize(llm, body)
        cases.append(
            {
                "text": text,
                "ids": ids,
                "ids_special": ids_sp,
                "roundtrip": detok == text,
            }
        )
    n_rt = sum(c["roundtrip"] for c in cases)
    print(f"[{model}] tokenizer: {len(cases)} strings, {n_rt} round-trip exactly via detokenize", file=sys.stderr)
    return {
        "model": model,
        "model_file": spec["file"].name,
        "add_bos": spec["add_bos"],
        "bos_id": bos,
        "n_vocab": llm.n_vocab(),
        "llama_cpp_version": version_string(info),
        "llama_cpp_python": info["llama_cpp_python"],
        "llama_cpp_commit": info["llama_cpp_commit"],
        "call": "llm.tokenize(text.encode(), add_bos=add_bos, special=False|True); ids=special False, ids_special=special True",
        "cases": cases,
    }


def detokenize(llm, ids: list[int], special: bool = False) -> str:
    """llama.cpp's llama_detokenize (llama-cpp-python's own detokenize truncates pieces > 32 bytes)."""
    import llama_cpp

    arr = (llama_cpp.llama_token * max(1, len(ids)))(*ids)
    cap = 64 + 256 * len(ids)
    buf = ctypes.create_string_buffer(cap)
    n = llama_cpp.llama_detokenize(llm._model.vocab, arr, len(ids), buf, cap, False, special)
    assert n >= 0, n
    return buf.raw[:n].decode("utf-8", errors="replace")


def last_logits(llm) -> np.ndarray:
    import llama_cpp

    ptr = llama_cpp.llama_get_logits_ith(llm._ctx.ctx, -1)
    return np.ctypeslib.as_array(ptr, shape=(llm.n_vocab(),)).astype(np.float32).copy()


def generate_fixture(model: str, info: dict) -> dict:
    spec = MODELS[model]
    llm = open_llama(spec["file"], vocab_only=False)
    bos = llm.token_bos()
    eos = llm.token_eos()
    LOGITS_DIR.mkdir(parents=True, exist_ok=True)
    records = []
    for i, (prompt, special) in enumerate(prompts_for(model)):
        prompt_ids = llm.tokenize(prompt.encode("utf-8"), add_bos=spec["add_bos"], special=special)
        if spec["add_bos"]:
            assert prompt_ids[0] == bos and (len(prompt_ids) < 2 or prompt_ids[1] != bos), prompt_ids[:3]
        elif not special:
            assert prompt_ids[0] != bos, prompt_ids[:3]
        llm.reset()  # n_tokens = 0; eval() then drops the KV cache from position 0 on
        assert llm.n_tokens == 0
        t0 = time.time()
        llm.eval(prompt_ids)
        ids: list[int] = []
        margins: list[float] = []
        top5_first: list[int] = []
        logits_file = None
        for step in range(GEN_TOKENS):
            lg = last_logits(llm)
            order = np.argsort(-lg, kind="stable")
            top1, top2 = int(order[0]), int(order[1])
            if step == 0:
                top5_first = [int(t) for t in order[:5]]
                first_lg = lg.copy()
                top10_first = [[int(t), round(float(lg[t]), 4)] for t in order[:10]]
                if i < N_LOGITS_FILES:
                    rel = f"logits/{model}-{i}.f16"
                    lg.astype("<f2").tofile(FIXTURES / rel)
                    logits_file = rel
            ids.append(top1)
            margins.append(round(float(lg[top1] - lg[top2]), 5))
            llm.eval([top1])  # do NOT stop at EOS
        dt = time.time() - t0
        # llama.cpp's own noise floor: the same prompt evaluated one token at a time instead of
        # in one batch gives slightly different logits (different kernels / accumulation order).
        llm.reset()
        for t in prompt_ids:
            llm.eval([t])
        lg1 = last_logits(llm).astype(np.float64)
        lg0 = first_lg.astype(np.float64)
        top10 = [t for t, _ in top10_first]
        self_noise = {
            "cosine": round(float(lg0 @ lg1 / np.linalg.norm(lg0) / np.linalg.norm(lg1)), 6),
            "max_abs_diff": round(float(np.abs(lg0 - lg1).max()), 4),
            "top10_max_abs_diff": round(float(np.abs(lg0[top10] - lg1[top10]).max()), 4),
            "top5_token_by_token": [int(t) for t in np.argsort(-lg1, kind="stable")[:5]],
        }
        text = detokenize(llm, ids, special=True)
        print(f"[{model}] prompt {i} ({len(prompt_ids)} tok, {dt:.1f}s, min margin {min(margins):.3f}): {prompt[:40]!r} -> {text[:100]!r}", file=sys.stderr)
        rec = {
            "prompt": prompt,
            "special": special,
            "prompt_ids": prompt_ids,
            "ids": ids,
            "text": text,
            "margins": margins,
            "top5_first": top5_first,
            "top10_first": top10_first,
            "llamacpp_self_noise": self_noise,
            "first_logits_file": logits_file,
        }
        records.append(rec)

    # determinism check: re-run prompt 0 after the others; ids must match (also checks reset works)
    prompt, special = prompts_for(model)[0]
    llm.reset()
    llm.eval(records[0]["prompt_ids"])
    again = []
    for _ in range(GEN_TOKENS):
        t = int(np.argmax(last_logits(llm)))
        again.append(t)
        llm.eval([t])
    assert again == records[0]["ids"], f"{model}: rerun of prompt 0 differs: {again} vs {records[0]['ids']}"

    return {
        "model": model,
        "model_file": spec["file"].name,
        "add_bos": spec["add_bos"],
        "bos_id": bos,
        "eos_id": eos,
        "n_vocab": llm.n_vocab(),
        "llama_cpp_version": version_string(info),
        "llama_cpp_python": info["llama_cpp_python"],
        "llama_cpp_commit": info["llama_cpp_commit"],
        "llama_cpp_system_info": info["system_info"],
        "settings": {
            "n_ctx": N_CTX,
            "n_threads": N_THREADS,
            "n_batch": N_BATCH,
            "seed": SEED,
            "gen_tokens": GEN_TOKENS,
            "decoding": "greedy argmax of last-position logits each step, no EOS stop",
            "margins": "logit[top1] - logit[top2] at each generated step",
            "first_logits_file": "raw little-endian float16, n_vocab values, logits before the first generated token",
        },
        "host": platform.machine(),
        "prompts": records,
    }


def dump(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # one string / case / prompt per line: readable diffs, still small
    c = lambda v: json.dumps(v, ensure_ascii=False, separators=(",", ":"))
    if isinstance(obj, list):
        text = "[\n" + ",\n".join(" " + c(v) for v in obj) + "\n]\n"
    else:
        lines = []
        for k, v in obj.items():
            if isinstance(v, list) and v and isinstance(v[0], dict):
                inner = ",\n".join("  " + c(e) for e in v)
                lines.append(f" {c(k)}: [\n{inner}\n ]")
            else:
                lines.append(f" {c(k)}: {c(v)}")
        text = "{\n" + ",\n".join(lines) + "\n}\n"
    json.loads(text)
    path.write_text(text, encoding="utf-8")
    print(f"wrote {path.relative_to(ROOT)} ({path.stat().st_size} bytes)", file=sys.stderr)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", choices=["tokenizer", "generate"], default=None)
    ap.add_argument("--models", default=",".join(MODELS))
    args = ap.parse_args()
    models = [m for m in args.models.split(",") if m]
    for m in models:
        if m not in MODELS:
            sys.exit(f"unknown model {m}")
        if not MODELS[m]["file"].exists():
            sys.exit(f"missing model file {MODELS[m]['file']} (run scripts/get-models)")

    info = llama_version_info()
    print(f"using {version_string(info)}", file=sys.stderr)
    FIXTURES.mkdir(parents=True, exist_ok=True)

    corpus = build_corpus()
    assert len(corpus) >= 220, len(corpus)
    if args.only in (None, "tokenizer"):
        dump(FIXTURES / "tokenizer-corpus.json", corpus)
        for m in models:
            dump(FIXTURES / f"tokenizer-{m}.json", tokenizer_fixture(m, corpus, info))
    if args.only in (None, "generate"):
        for m in models:
            dump(FIXTURES / f"generate-{m}.json", generate_fixture(m, info))

    total = sum(p.stat().st_size for p in FIXTURES.rglob("*") if p.is_file())
    print(f"fixtures total: {total} bytes", file=sys.stderr)


if __name__ == "__main__":
    main()
