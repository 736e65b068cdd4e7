//! `kvinfer cache simulate` as a user runs it, on small traces the test writes.

use serde_json::Value;
use std::path::PathBuf;
use std::process::Command;

fn temp_dir() -> PathBuf {
    static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let k = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("kvinfer-sim-{}-{k}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn kvinfer(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_kvinfer"))
        .args(args)
        .output()
        .unwrap()
}

/// The hand-worked trace of `kvinfer_cache::simulate`'s unit tests, in Mooncake's format (with
/// the fields we ignore, and a blank line).
const TRACE: &str = r#"{"timestamp": 0, "input_length": 1024, "output_length": 5, "hash_ids": [0, 1]}
{"timestamp": 1, "input_length": 1024, "output_length": 5, "hash_ids": [0, 2]}
{"timestamp": 2, "input_length": 1536, "output_length": 5, "hash_ids": [0, 1, 3]}

{"timestamp": 3, "input_length": 1536, "output_length": 5, "hash_ids": [0, 2, 4]}
{"timestamp": 4, "input_length": 2048, "output_length": 5, "hash_ids": [0, 1, 3, 5]}
{"timestamp": 5, "input_length": 1024, "output_length": 5, "hash_ids": [0, 2]}
"#;

#[test]
fn json_has_every_policy_and_field_and_the_hand_worked_counts() {
    let dir = temp_dir();
    let trace = dir.join("trace.jsonl");
    std::fs::write(&trace, TRACE).unwrap();
    let svg = dir.join("plot.svg");
    let out = kvinfer(&[
        "cache",
        "simulate",
        "--trace",
        trace.to_str().unwrap(),
        "--capacity-blocks",
        "3,100",
        "--json",
        "--plot",
        svg.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rows: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(rows.len(), 12, "6 policies x 2 capacities");
    let row = |policy: &str, cap: u64| {
        rows.iter()
            .find(|r| r["policy"] == policy && r["capacity_blocks"] == cap)
            .unwrap_or_else(|| panic!("no row for {policy} at {cap}"))
    };
    for r in &rows {
        for key in [
            "policy",
            "capacity_blocks",
            "lookups",
            "block_hits",
            "block_hit_rate",
            "prefix_hits",
            "prefix_hit_rate",
        ] {
            assert!(r.get(key).is_some(), "missing {key} in {r}");
        }
        assert_eq!(r.as_object().unwrap().len(), 7, "unexpected fields in {r}");
        assert_eq!(r["lookups"], 16);
    }
    // (block hits, prefix hits) at capacity 3, as worked out in the unit tests.
    for (policy, hits, prefix) in [
        ("lru", 5, 5),
        ("lfu", 6, 6),
        ("fifo", 5, 4),
        ("s3fifo", 7, 7),
        ("belady", 8, 7),
    ] {
        let r = row(policy, 3);
        assert_eq!(
            (r["block_hits"].as_u64(), r["prefix_hits"].as_u64()),
            (Some(hits), Some(prefix)),
            "{policy}"
        );
    }
    assert_eq!(row("belady", 3)["block_hit_rate"].as_f64(), Some(0.5));
    // With room for everything, every repeat hits: 16 lookups, 6 distinct ids.
    for policy in ["lru", "lfu", "fifo", "random", "s3fifo", "belady"] {
        assert_eq!(row(policy, 100)["block_hits"], 10, "{policy}");
    }
    let svg = std::fs::read_to_string(&svg).unwrap();
    assert!(svg.starts_with("<svg") && svg.contains("belady"));
}

#[test]
fn table_by_default_and_policy_choice() {
    let dir = temp_dir();
    let trace = dir.join("trace.jsonl");
    std::fs::write(&trace, TRACE).unwrap();
    let out = kvinfer(&[
        "cache",
        "simulate",
        "--trace",
        trace.to_str().unwrap(),
        "--capacity-blocks",
        "3",
        "--policy",
        "lru,belady",
    ]);
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("6 requests, 16 block lookups"), "{text}");
    assert!(text.contains("lru") && text.contains("belady") && !text.contains("fifo"));
}

#[test]
fn bad_traces_and_flags_are_clear_errors() {
    let dir = temp_dir();
    let bad = dir.join("bad.jsonl");
    std::fs::write(&bad, "{\"hash_ids\": [1, 2]}\n{\"hash_ids\": \"oops\"}\n").unwrap();
    let out = kvinfer(&[
        "cache",
        "simulate",
        "--trace",
        bad.to_str().unwrap(),
        "--capacity-blocks",
        "4",
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("bad.jsonl:2:"), "{err}");
    assert!(err.contains("hash_ids"), "{err}");

    let missing = dir.join("nope.jsonl");
    let out = kvinfer(&[
        "cache",
        "simulate",
        "--trace",
        missing.to_str().unwrap(),
        "--capacity-blocks",
        "4",
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("reading trace") && err.contains("nope.jsonl"),
        "{err}"
    );

    let good = dir.join("good.jsonl");
    std::fs::write(&good, TRACE).unwrap();
    let out = kvinfer(&[
        "cache",
        "simulate",
        "--trace",
        good.to_str().unwrap(),
        "--capacity-blocks",
        "4",
        "--policy",
        "mru",
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("unknown policy"), "{err}");
}
