//! The `kvinfer` binary as a user runs it, on a tiny model the test writes (no download).

use kvinfer_model::testing::{write_tiny_model, TinyArch};
use serde_json::Value;
use std::path::PathBuf;
use std::process::Command;

fn tiny(arch: TinyArch) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("kvinfer-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let k = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let p = dir.join(format!("{arch:?}-{k}.gguf"));
    write_tiny_model(&p, arch, 11).unwrap();
    p
}

fn kvinfer(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_kvinfer"))
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn generate_json_has_the_documented_fields() {
    for arch in [TinyArch::Llama, TinyArch::Gemma3] {
        let m = tiny(arch);
        let out = kvinfer(&[
            "generate",
            "--model",
            m.to_str().unwrap(),
            "--prompt",
            "the tin",
            "--max-tokens",
            "12",
            "--temperature",
            "0",
            "--ignore-eos",
            "--json",
            "--threads",
            "1",
        ]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let j: Value = serde_json::from_slice(&out.stdout).unwrap();
        for key in [
            "model",
            "prompt_ids",
            "ids",
            "text",
            "timings",
            "kv_cache_bytes",
        ] {
            assert!(j.get(key).is_some(), "{arch:?}: missing {key} in {j}");
        }
        for key in ["prefill_ms", "decode_ms", "prefill_tok_s", "decode_tok_s"] {
            assert!(
                j["timings"][key].as_f64().is_some(),
                "{arch:?}: timings.{key}"
            );
        }
        assert_eq!(j["ids"].as_array().unwrap().len(), 12);
        let n_pos = j["prompt_ids"].as_array().unwrap().len() + 11;
        assert!(j["kv_cache_bytes"].as_u64().unwrap() > 0);
        // Whole blocks of the default 16 positions.
        let blocks = (n_pos + 1).div_ceil(16) as u64;
        assert_eq!(j["kv_cache_bytes"].as_u64().unwrap() % blocks, 0);
        // --no-kv-cache gives the same tokens.
        let out2 = kvinfer(&[
            "generate",
            "--model",
            m.to_str().unwrap(),
            "--prompt",
            "the tin",
            "--max-tokens",
            "12",
            "--temperature",
            "0",
            "--ignore-eos",
            "--json",
            "--no-kv-cache",
        ]);
        let j2: Value = serde_json::from_slice(&out2.stdout).unwrap();
        assert_eq!(j["ids"], j2["ids"], "{arch:?}");
    }
}

#[test]
fn helpful_errors() {
    let out = kvinfer(&["generate", "--model", "nosuchmodel", "--prompt", "x"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("unknown model") && err.contains("smollm2"),
        "{err}"
    );

    let out = Command::new(env!("CARGO_BIN_EXE_kvinfer"))
        .args(["generate", "--model", "gemma3", "--prompt", "x"])
        .env("KVINFER_MODELS", "/nonexistent-dir")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("scripts/get-models gemma3"),
        "{err}"
    );

    let m = tiny(TinyArch::Llama);
    for (flags, want) in [
        (&["--max-tokens", "0"][..], "at least 1"),
        (&["--temperature", "-1"][..], "temperature must be >= 0"),
        (&["--top-p", "1.5"][..], "top_p"),
    ] {
        let mut args = vec![
            "generate",
            "--model",
            m.to_str().unwrap(),
            "--prompt",
            "the tin",
        ];
        args.extend_from_slice(flags);
        let out = kvinfer(&args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains(want),
            "{flags:?}: {err}"
        );
        assert!(out.stdout.is_empty(), "{flags:?}: printed before refusing");
    }

    let bad = std::env::temp_dir().join(format!("kvinfer-bad-{}.gguf", std::process::id()));
    std::fs::write(&bad, b"GGUF\x03\x00\x00\x00garbage").unwrap();
    let out = kvinfer(&[
        "generate",
        "--model",
        bad.to_str().unwrap(),
        "--prompt",
        "x",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("truncated"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn chat_reuses_previous_turns() {
    let m = tiny(TinyArch::Llama);
    let mut child = Command::new(env!("CARGO_BIN_EXE_kvinfer"))
        .args([
            "chat",
            "--model",
            m.to_str().unwrap(),
            "--temperature",
            "0",
            "-n",
            "6",
            "--stats",
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"the tin\nthen a hen\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let err = String::from_utf8_lossy(&out.stderr);
    let stats: Vec<&str> = err.lines().filter(|l| l.contains("reused")).collect();
    assert_eq!(stats.len(), 2, "{err}");
    assert!(stats[0].contains("reused 0 from cache"), "{}", stats[0]);
    let reused: usize = stats[1]
        .split("reused ")
        .nth(1)
        .unwrap()
        .split(' ')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        reused > 5,
        "second turn should reuse the first turn's KV: {}",
        stats[1]
    );
}

/// `kvinfer generate` run twice on one --disk-tier: the second process loads the prompt's
/// blocks from disk and prints the same tokens; `cache stats` sees them, `cache clear` empties
/// the directory; a bad tier flag is a clear error.
#[test]
fn a_second_process_on_the_same_disk_tier_reuses_the_first_ones_prefix() {
    let m = tiny(TinyArch::Llama);
    let dir = std::env::temp_dir().join(format!("kvinfer-cli-disk-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let d = dir.to_str().unwrap();
    let prompt = "the tin hen sat on the mat and the red fox ran to the den by the sea";
    let run = |extra: &[&str]| {
        let mut args = vec![
            "generate",
            "--model",
            m.to_str().unwrap(),
            "--prompt",
            prompt,
            "--max-tokens",
            "8",
            "--temperature",
            "0",
            "--ignore-eos",
            "--json",
            "--threads",
            "1",
            "--block-size",
            "4",
        ];
        args.extend_from_slice(extra);
        let out = kvinfer(&args);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice::<Value>(&out.stdout).unwrap()
    };
    let plain = run(&[]);
    let first = run(&["--disk-tier", d]);
    assert_eq!(first["timings"]["tier_tokens"], 0);
    let second = run(&["--disk-tier", d]);
    assert!(
        second["timings"]["tier_tokens"].as_u64().unwrap() > 0,
        "{second}"
    );
    assert_eq!(
        second["timings"]["cached_tokens"],
        second["timings"]["tier_tokens"]
    );
    assert_eq!(second["ids"], plain["ids"], "a disk hit changes nothing");
    assert_eq!(first["ids"], plain["ids"]);

    let stats = kvinfer(&["cache", "stats", "--disk-tier", d, "--json"]);
    assert!(
        stats.status.success(),
        "{}",
        String::from_utf8_lossy(&stats.stderr)
    );
    let s: Value = serde_json::from_slice(&stats.stdout).unwrap();
    assert!(s["disk"]["blocks"].as_u64().unwrap() > 0, "{s}");
    assert_eq!(s["disk"]["models"].as_array().unwrap().len(), 1);
    let clear = kvinfer(&["cache", "clear", "--disk-tier", d, "--json"]);
    assert!(clear.status.success());
    let c: Value = serde_json::from_slice(&clear.stdout).unwrap();
    assert_eq!(c["disk"]["deleted"], s["disk"]["blocks"]);
    let after = run(&["--disk-tier", d]);
    assert_eq!(after["timings"]["tier_tokens"], 0, "cleared");

    for (args, needle) in [
        (vec!["cache", "stats"], "--disk-tier"),
        (
            vec!["cache", "stats", "--disk-tier", "/nonexistent/kvinfer"],
            "not a directory",
        ),
        (
            vec![
                "generate",
                "--model",
                m.to_str().unwrap(),
                "--prompt",
                "x",
                "--tier-write",
                "ram=sideways",
            ],
            "unknown write mode",
        ),
        (
            vec![
                "generate",
                "--model",
                m.to_str().unwrap(),
                "--prompt",
                "x",
                "--tier-codec",
                "gzip",
            ],
            "unknown codec",
        ),
    ] {
        let out = kvinfer(&args);
        assert!(!out.status.success(), "{args:?} should fail");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(needle), "{args:?}: {err}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// `kvinfer serve --config FILE`: the file is below env vars, which are below flags; an
/// unknown key is an error; `--print-config` prints TOML that reads back to the same result.
#[test]
fn serve_config_file_sits_below_env_and_flags() {
    let dir = std::env::temp_dir().join(format!("kvinfer-cli-config-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("serve.toml");
    std::fs::write(
        &file,
        "port = 9123\nkv_cache_mb = 300\nmax-waiting = 7\nredis_cluster = [\"127.0.0.1:7000\", \"127.0.0.1:7001\"]\n",
    )
    .unwrap();
    let f = file.to_str().unwrap();
    let print = |extra: &[&str], env: &[(&str, &str)]| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_kvinfer"));
        c.args(["serve", "--print-config"]).args(extra);
        for (k, v) in env {
            c.env(k, v);
        }
        let out = c.output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let merged = print(&["--config", f], &[]);
    for line in [
        "port = 9123",
        "kv_cache_mb = 300",
        "max_waiting = 7",
        "redis_cluster = [\"127.0.0.1:7000\", \"127.0.0.1:7001\"]",
    ] {
        assert!(merged.lines().any(|l| l == line), "{line} in {merged}");
    }
    let env_wins = print(&["--config", f], &[("KVINFER_PORT", "9200")]);
    assert!(env_wins.lines().any(|l| l == "port = 9200"), "{env_wins}");
    let flag_wins = print(
        &["--config", f, "--port", "9300"],
        &[("KVINFER_PORT", "9200")],
    );
    assert!(flag_wins.lines().any(|l| l == "port = 9300"), "{flag_wins}");
    // The printed configuration is a config file that gives the same result.
    let again = dir.join("printed.toml");
    std::fs::write(&again, &merged).unwrap();
    assert_eq!(print(&["--config", again.to_str().unwrap()], &[]), merged);
    std::fs::write(&file, "prot = 1\n").unwrap();
    let out = kvinfer(&["serve", "--config", f]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("\"prot\" is not a serve option"));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn accuracy_reports_every_dtype_against_f16() {
    let m = tiny(TinyArch::Gemma3);
    let text = std::env::temp_dir().join(format!("kvinfer-acc-{}.txt", std::process::id()));
    std::fs::write(&text, "the tin hen then a thin net ".repeat(40)).unwrap();
    let out = kvinfer(&[
        "accuracy",
        "--models",
        m.to_str().unwrap(),
        "--text",
        text.to_str().unwrap(),
        "--ctx",
        "32,64",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let runs = v["models"][0]["runs"].as_array().unwrap();
    assert_eq!(runs.len(), 2);
    for r in runs {
        let d = r["dtypes"].as_array().unwrap();
        let names: Vec<&str> = d.iter().map(|x| x["kv_dtype"].as_str().unwrap()).collect();
        assert_eq!(names, ["f16", "q8_0", "q4_0", "q4"]);
        assert_eq!(d[0]["kl_mean"], 0.0);
        assert_eq!(d[0]["top1_agreement"], 1.0);
        for x in d {
            assert!(x["perplexity"].as_f64().unwrap() > 1.0, "{x}");
            assert!(x["scored_tokens"].as_u64().unwrap() > 0);
        }
        // Quantized KV moves the distributions (a little).
        assert!(d[1]["kl_mean"].as_f64().unwrap() > 0.0, "{r}");
        assert!(d[1]["kv_bytes_per_token"].as_u64() < d[0]["kv_bytes_per_token"].as_u64());
    }
    // f16 must be the reference; a context past the model's is refused.
    let refused = |flag: &str, value: &str| {
        let (m, t) = (m.to_str().unwrap(), text.to_str().unwrap());
        let out = kvinfer(&["accuracy", "--models", m, "--text", t, flag, value]);
        assert!(!out.status.success(), "{flag} {value} was accepted");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    assert!(refused("--dtypes", "q8_0").contains("f16"));
    refused("--ctx", "100000");
}
