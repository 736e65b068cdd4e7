//! The tiers behind the engine, end to end on tiny models with real directories and real
//! redis-server processes: a prefix hit from each tier gives exactly the output of no cache at
//! all; a restart finds its blocks on disk; two engines share through Redis (single and
//! cluster); two models never use each other's blocks; damaged blocks are refused, deleted,
//! counted and never linked; a Redis killed mid-run fails no request.

mod common;

use common::tiny;
use kvinfer_cache::{KvDtype, PolicyKind};
use kvinfer_engine::{
    block_spec, generate, start_engine, CacheOptions, EngineConfig, EngineHandle, EngineRequest,
    EngineStats, Event, GenerateRequest, SamplingParams, TierOptions, TierWrite, Usage, WriteMode,
};
use kvinfer_model::testing::TinyArch;
use kvinfer_model::Model;
use kvinfer_tier::testing::{RedisCluster, RedisServer};
use kvinfer_tier::{wire, Codec};
use std::path::{Path, PathBuf};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

const BS: usize = 4;

fn engine(model: Model, num_blocks: usize, tiers: TierOptions) -> (EngineHandle, JoinHandle<()>) {
    engine_as(model, num_blocks, tiers, KvDtype::F16)
}

fn engine_as(
    model: Model,
    num_blocks: usize,
    tiers: TierOptions,
    kv_dtype: KvDtype,
) -> (EngineHandle, JoinHandle<()>) {
    engine_with(
        model,
        CacheOptions {
            num_blocks: Some(num_blocks),
            block_size: BS,
            tiers,
            kv_dtype,
            ..CacheOptions::default()
        },
    )
}

fn engine_with(model: Model, cache: CacheOptions) -> (EngineHandle, JoinHandle<()>) {
    let config = EngineConfig {
        cache,
        max_batch_tokens: 64,
        max_running: 4,
        ctx_size: 0,
        max_waiting: 256,
    };
    start_engine(model, config, |f| f()).unwrap()
}

/// Stops an engine and waits for its thread: the tiers' pending writes are flushed.
fn stop(e: (EngineHandle, JoinHandle<()>)) {
    drop(e.0);
    e.1.join().unwrap();
}

fn run(h: &EngineHandle, prompt: &[u32], max_tokens: usize) -> (Vec<u32>, String, Usage) {
    let req = EngineRequest {
        prompt_ids: prompt.to_vec(),
        max_tokens,
        sampling: SamplingParams::greedy(),
        stop: vec![],
        n: 1,
        ignore_eos: true,
        min_tokens: 0,
        logprobs: None,
        grammar: None,
    };
    let mut rx = h.submit(req).unwrap();
    let (mut text, mut usage) = (String::new(), None);
    while let Some(e) = rx.blocking_recv() {
        match e {
            Event::Text { text: t, .. } => text.push_str(&t),
            Event::Usage(u) => usage = Some(u),
            Event::Error(e) => panic!("request failed: {e}"),
            Event::Done { .. } | Event::Logprob { .. } => {}
        }
    }
    (Vec::new(), text, usage.expect("usage"))
}

/// Reference: no cache reuse at all.
fn alone(model: &Model, prompt: &[u32], max_tokens: usize) -> String {
    alone_as(model, prompt, max_tokens, KvDtype::F16)
}

/// As [`alone`], rows stored as `dtype`.
fn alone_as(model: &Model, prompt: &[u32], max_tokens: usize, dtype: KvDtype) -> String {
    let mut kv = model
        .kv_identity(BS, dtype, false)
        .paged(128, PolicyKind::Lru, 0);
    let req = GenerateRequest {
        prefix_cache: false,
        ..GenerateRequest::greedy(prompt, max_tokens)
    };
    generate(model, &mut kv, &req, |_| true).unwrap().text
}

fn wait_idle(h: &EngineHandle) -> EngineStats {
    let t = Instant::now();
    loop {
        let s = h.stats();
        if s.running == 0 && s.waiting == 0 && s.loading == 0 && s.blocks.in_use == 0 {
            return s;
        }
        assert!(t.elapsed() < Duration::from_secs(20), "never idle: {s:?}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Waits until the tier named `name` has stored at least `n` blocks.
fn wait_puts(h: &EngineHandle, name: &str, n: u64) {
    let t = Instant::now();
    loop {
        let s = h.stats();
        if s.tiers
            .iter()
            .any(|t| t.name == name && t.puts + t.put_skipped >= n)
        {
            return;
        }
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "{name} never stored {n}: {:?}",
            s.tiers
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn prompt(seed: u32, len: usize) -> Vec<u32> {
    (0..len as u32)
        .map(|i| (i * 13 + seed * 31) % 240 + 4)
        .collect()
}

fn temp_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("kvinfer-tiers-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

fn disk(dir: &Path) -> TierOptions {
    TierOptions {
        disk_dir: Some(dir.to_path_buf()),
        ..TierOptions::default()
    }
}

fn block_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == "kvb") {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

#[test]
fn a_ram_tier_hit_after_eviction_equals_no_cache() {
    let (model, path) = tiny(TinyArch::Llama, 9);
    let p = prompt(1, 41); // 10 full blocks
    let want = alone(&model, &p, 6);
    let tiers = TierOptions {
        ram_tier_mb: 16,
        ..TierOptions::default()
    };
    let e = engine(Model::load(&path).unwrap(), 24, tiers);
    assert_eq!(run(&e.0, &p, 6).1, want);
    // Other prompts push every block of the first out of the 24-block pool into RAM.
    for s in 2..6 {
        run(&e.0, &prompt(s, 41), 6);
    }
    wait_idle(&e.0);
    assert!(e.0.stats().blocks.evictions >= 10);
    wait_puts(&e.0, "ram", 10);
    let (_, text, usage) = run(&e.0, &p, 6);
    assert_eq!(text, want, "a RAM tier hit changes nothing");
    assert_eq!(usage.cached_tokens, 40);
    let s = wait_idle(&e.0);
    assert!(s.tier_hit_tokens_total >= 36, "{s:?}");
    assert!(s.tiers[0].hits >= 9);
    stop(e);
}

#[test]
fn a_restart_finds_its_prefix_on_disk_and_a_damaged_block_is_never_served() {
    let (model, path) = tiny(TinyArch::Llama, 9);
    let dir = temp_dir("restart");
    let p = prompt(7, 41);
    let longer = [p.clone(), prompt(8, 5)].concat();
    let want = alone(&model, &longer, 6);
    let e = engine(Model::load(&path).unwrap(), 64, disk(&dir));
    run(&e.0, &p, 6);
    stop(e);
    assert_eq!(
        block_files(&dir).len(),
        11,
        "10 prompt blocks + 1 of the output"
    );

    let e = engine(Model::load(&path).unwrap(), 64, disk(&dir));
    let (_, text, usage) = run(&e.0, &longer, 6);
    assert_eq!(text, want, "a disk hit after restart changes nothing");
    assert_eq!(usage.cached_tokens, 40, "the prompt's 10 blocks from disk");
    stop(e);

    // Damage four blocks of the prefix four ways: truncated, a flipped bit, another model's
    // fingerprint (checksum valid), another format version (checksum valid).
    let spec = block_spec(&model.kv_identity(BS, kvinfer_cache::KvDtype::F16, false));
    let hashes = {
        let kv = model
            .kv_identity(BS, KvDtype::F16, false)
            .paged(1, PolicyKind::Lru, 0);
        kv.hash_blocks(&p)
    };
    let file_of = |i: usize| -> PathBuf {
        let key = spec.key(hashes[i]);
        let h = key.hash_hex();
        dir.join("kvinfer-v1")
            .join(key.model_hex())
            .join(&h[..2])
            .join(format!("{h}-g0.kvb"))
    };
    let read = |i: usize| std::fs::read(file_of(i)).unwrap();
    let b0 = read(0);
    std::fs::write(file_of(0), &b0[..b0.len() / 2]).unwrap();
    let mut b1 = read(1);
    let n = b1.len();
    b1[n - 7] ^= 0x20;
    std::fs::write(file_of(1), &b1).unwrap();
    let payload = wire::decode(&spec, &hashes[2], &p[8..12], &read(2)).unwrap();
    let other = kvinfer_tier::BlockSpec {
        fingerprint: kvinfer_cache::ModelFingerprint([0xab; 32]),
        ..spec
    };
    std::fs::write(
        file_of(2),
        wire::encode(&other, &hashes[2], &p[8..12], &payload, Codec::None),
    )
    .unwrap();
    let mut b3 = read(3);
    b3[4] = 9; // version 9, checksum recomputed so only the version check can refuse it
    let hl = u16::from_le_bytes([b3[6], b3[7]]) as usize;
    let crc = crc32c(&b3[..hl - 4], &b3[hl..]);
    b3[hl - 4..hl].copy_from_slice(&crc.to_le_bytes());
    std::fs::write(file_of(3), &b3).unwrap();

    let e = engine(Model::load(&path).unwrap(), 64, disk(&dir));
    let (_, text, usage) = run(&e.0, &longer, 6);
    assert_eq!(text, want, "damaged blocks change nothing");
    assert_eq!(
        usage.cached_tokens, 0,
        "the run stops at the first damaged block"
    );
    let s = wait_idle(&e.0);
    assert_eq!(s.tier_hit_tokens_total, 0, "nothing unverified was linked");
    assert_eq!(s.tiers[0].corrupt, 4, "{:?}", s.tiers[0]);
    stop(e);
    for i in 0..4 {
        // Deleted, then written again by write-through when the request recomputed them.
        assert!(wire::decode(&spec, &hashes[i], &p[i * 4..i * 4 + 4], &read(i)).is_ok());
    }
    let _ = std::fs::remove_dir_all(&dir);
}

fn crc32c(header: &[u8], payload: &[u8]) -> u32 {
    // The same checksum the wire format uses, recomputed by hand: crc32c over header then payload.
    let mut crc = !0u32;
    for &b in header.iter().chain(payload) {
        crc ^= b as u32;
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0x82f6_3b78
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

#[test]
fn two_models_on_one_disk_dir_never_use_each_others_blocks() {
    let (a, pa) = tiny(TinyArch::Llama, 9);
    let (b, pb) = tiny(TinyArch::Llama, 10);
    assert_ne!(
        a.kv_identity(BS, KvDtype::F16, false).fingerprint,
        b.kv_identity(BS, KvDtype::F16, false).fingerprint
    );
    let dir = temp_dir("two-models");
    let p = prompt(3, 41);
    let e = engine(Model::load(&pa).unwrap(), 64, disk(&dir));
    run(&e.0, &p, 6);
    stop(e);
    let e = engine(Model::load(&pb).unwrap(), 64, disk(&dir));
    let (_, text, usage) = run(&e.0, &p, 6);
    assert_eq!(text, alone(&b, &p, 6));
    assert_eq!(usage.cached_tokens, 0);
    let s = wait_idle(&e.0);
    assert_eq!((s.tiers[0].hits, s.tiers[0].corrupt), (0, 0));
    stop(e);
    drop(a);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_full_or_read_only_disk_tier_degrades_to_misses() {
    let (model, path) = tiny(TinyArch::Llama, 9);
    let p = prompt(5, 41);
    let want = alone(&model, &p, 6);
    // A cap smaller than one block: every write is refused, every request still served.
    let dir = temp_dir("full");
    let full = TierOptions {
        disk_dir: Some(dir.clone()),
        disk_tier_mb: 0,
        ..TierOptions::default()
    };
    let e = engine(Model::load(&path).unwrap(), 64, full);
    for _ in 0..2 {
        assert_eq!(run(&e.0, &p, 6).1, want);
    }
    let t = Instant::now();
    while e.0.stats().tiers[0].errors == 0 {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "no write error counted"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    stop(e);
    assert!(
        block_files(&dir).is_empty(),
        "a refused write leaves no block behind"
    );
    // Read-only: it serves what is there and writes nothing.
    let dir2 = temp_dir("ro");
    let e = engine(Model::load(&path).unwrap(), 64, disk(&dir2));
    run(&e.0, &p, 6);
    stop(e);
    let before = block_files(&dir2);
    let ro = TierOptions {
        write: TierWrite {
            disk: WriteMode::Off,
            ..TierWrite::default()
        },
        ..disk(&dir2)
    };
    let e = engine(Model::load(&path).unwrap(), 64, ro);
    let q = [p.clone(), prompt(6, 9)].concat();
    let (_, text, usage) = run(&e.0, &q, 6);
    assert_eq!(text, alone(&model, &q, 6));
    assert_eq!(usage.cached_tokens, 40);
    stop(e);
    assert_eq!(block_files(&dir2), before, "read-only: nothing written");
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::remove_dir_all(&dir2);
}

fn redis(url: String) -> TierOptions {
    TierOptions {
        redis_url: Some(url),
        redis_timeout: Duration::from_millis(200),
        ..TierOptions::default()
    }
}

#[test]
fn two_engines_share_prefixes_through_redis() {
    let server = RedisServer::start().expect("redis-server");
    let (model, path) = tiny(TinyArch::Llama, 9);
    let p = prompt(11, 41);
    let longer = [p.clone(), prompt(12, 3)].concat();
    let a = engine(Model::load(&path).unwrap(), 64, redis(server.url()));
    let b = engine(Model::load(&path).unwrap(), 64, redis(server.url()));
    run(&a.0, &p, 6);
    wait_puts(&a.0, "redis", 11);
    let (_, text, usage) = run(&b.0, &longer, 6);
    assert_eq!(text, alone(&model, &longer, 6));
    assert_eq!(
        usage.cached_tokens, 40,
        "the second engine got the first's prefix"
    );
    assert!(wait_idle(&b.0).tier_hit_tokens_total >= 40);
    stop(a);
    stop(b);
}

#[test]
fn two_engines_share_prefixes_through_a_redis_cluster() {
    let cluster = RedisCluster::start(3).expect("a redis cluster");
    let (model, path) = tiny(TinyArch::Llama, 9);
    let opts = TierOptions {
        redis_cluster: cluster.addrs(),
        redis_timeout: Duration::from_millis(500),
        ..TierOptions::default()
    };
    let p = prompt(13, 41);
    let longer = [p.clone(), prompt(14, 3)].concat();
    let a = engine(Model::load(&path).unwrap(), 64, opts.clone());
    let b = engine(Model::load(&path).unwrap(), 64, opts);
    run(&a.0, &p, 6);
    wait_puts(&a.0, "redis-cluster", 11);
    let (_, text, usage) = run(&b.0, &longer, 6);
    assert_eq!(text, alone(&model, &longer, 6));
    assert_eq!(usage.cached_tokens, 40);
    stop(a);
    stop(b);
}

#[test]
fn redis_killed_mid_run_fails_no_request_and_the_tier_recovers() {
    let mut server = RedisServer::start().expect("redis-server");
    let (model, path) = tiny(TinyArch::Llama, 9);
    let e = engine(Model::load(&path).unwrap(), 256, redis(server.url()));
    let prompts: Vec<Vec<u32>> = (0..12).map(|s| prompt(20 + s, 33)).collect();
    let wants: Vec<String> = prompts.iter().map(|p| alone(&model, p, 4)).collect();
    let mut misses_before = 0;
    for (i, (p, want)) in prompts.iter().zip(&wants).enumerate() {
        if i == 3 {
            misses_before = e.0.stats().tiers[0].misses;
            server.kill();
        }
        if i == 8 {
            // Five requests of 8 full blocks each looked up during the outage: 40 misses.
            let m = e.0.stats().tiers[0].misses - misses_before;
            assert!(m >= 40, "lookups during the outage are misses: {m}");
            server.restart().unwrap();
        }
        assert_eq!(&run(&e.0, p, 4).1, want, "request {i}");
    }
    let s = wait_idle(&e.0);
    assert!(
        s.tiers[0].errors > 0,
        "the outage was counted: {:?}",
        s.tiers[0]
    );

    // It recovers: after the breaker's backoff, blocks reach the new Redis again.
    let t = Instant::now();
    for k in 0.. {
        run(&e.0, &prompt(99 + k, 33), 4); // new blocks each time: something to write
        let keys: u64 = server.cli(&["DBSIZE"]).unwrap().trim().parse().unwrap_or(0);
        if keys > 0 {
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(15), "never recovered");
        std::thread::sleep(Duration::from_millis(300));
    }
    assert!(e.0.stats().tiers[0].healthy || t.elapsed() < Duration::from_secs(15));
    stop(e);
}

/// LMCache #4385 served one request's KV to another from its disk tier. Here two prompts' block
/// files are swapped on disk: each name now holds the other prompt's valid block. Both are
/// refused (hash and token ids are checked), counted, and both answers stay exact.
#[test]
fn another_requests_block_under_this_name_is_refused() {
    let (model, path) = tiny(TinyArch::Llama, 9);
    let dir = temp_dir("swap");
    let (a, b) = (prompt(30, 41), prompt(31, 41));
    let e = engine(Model::load(&path).unwrap(), 64, disk(&dir));
    run(&e.0, &a, 6);
    run(&e.0, &b, 6);
    stop(e);
    let spec = block_spec(&model.kv_identity(BS, kvinfer_cache::KvDtype::F16, false));
    let kv = model
        .kv_identity(BS, KvDtype::F16, false)
        .paged(1, PolicyKind::Lru, 0);
    let file = |h| {
        let key = spec.key(h);
        let hx = key.hash_hex();
        dir.join("kvinfer-v1")
            .join(key.model_hex())
            .join(&hx[..2])
            .join(format!("{hx}-g0.kvb"))
    };
    let (fa, fb) = (file(kv.hash_blocks(&a)[0]), file(kv.hash_blocks(&b)[0]));
    let (ba, bb) = (std::fs::read(&fa).unwrap(), std::fs::read(&fb).unwrap());
    std::fs::write(&fa, &bb).unwrap();
    std::fs::write(&fb, &ba).unwrap();
    let e = engine(Model::load(&path).unwrap(), 64, disk(&dir));
    for p in [&a, &b] {
        let (_, text, usage) = run(&e.0, p, 6);
        assert_eq!(text, alone(&model, p, 6));
        assert_eq!(
            usage.cached_tokens, 0,
            "the chain stops at the foreign first block"
        );
    }
    let s = wait_idle(&e.0);
    assert_eq!(s.tiers[0].corrupt, 2);
    assert_eq!(s.tier_hit_tokens_total, 0);
    stop(e);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A Redis that stalls (DEBUG SLEEP) while a request waits for its blocks: the load runs on the
/// tier's thread, so a running generation keeps producing tokens meanwhile; the stalled
/// request is answered exactly once the deadline turns the read into a miss.
#[test]
fn a_stalled_tier_never_blocks_the_running_batch() {
    let server = RedisServer::start().expect("redis-server");
    let (model, path) = tiny(TinyArch::Llama, 9);
    let opts = TierOptions {
        redis_url: Some(server.url()),
        redis_timeout: Duration::from_millis(1500),
        ..TierOptions::default()
    };
    let e = engine(Model::load(&path).unwrap(), 256, opts);
    let long = prompt(40, 9);
    let req = EngineRequest {
        prompt_ids: long.clone(),
        max_tokens: 200,
        sampling: SamplingParams::greedy(),
        stop: vec![],
        n: 1,
        ignore_eos: true,
        min_tokens: 0,
        logprobs: None,
        grammar: None,
    };
    let mut rx = e.0.submit(req).unwrap();
    // Wait until it is decoding.
    while !matches!(rx.blocking_recv(), Some(Event::Text { .. })) {}
    let port = server.port.to_string();
    let sleeper = std::thread::spawn(move || {
        std::process::Command::new("redis-cli")
            .args(["-p", &port, "DEBUG", "SLEEP", "1"])
            .output()
    });
    std::thread::sleep(Duration::from_millis(100));
    let h = e.0.clone();
    let q = prompt(41, 41);
    let want = alone(&model, &q, 4);
    let stalled = std::thread::spawn(move || {
        let t0 = Instant::now();
        let (_, text, _) = run(&h, &q, 4);
        (text, t0.elapsed())
    });
    // While the second request waits on Redis, the first keeps streaming.
    let t0 = Instant::now();
    let mut tokens_meanwhile = 0;
    while t0.elapsed() < Duration::from_millis(600) {
        match rx.blocking_recv() {
            Some(Event::Text { .. }) => tokens_meanwhile += 1,
            Some(_) | None => break,
        }
    }
    let (text, took) = stalled.join().unwrap();
    assert_eq!(text, want);
    assert!(
        took >= Duration::from_millis(300),
        "the second request did wait on Redis: {took:?}"
    );
    assert!(
        tokens_meanwhile >= 10,
        "the running batch stalled: {tokens_meanwhile} tokens"
    );
    sleeper.join().unwrap().unwrap();
    drop(rx);
    stop(e);
}

/// Quantized blocks travel through the tiers unchanged: per dtype, a restart's disk hit and a
/// RAM hit give exactly the output of no cache in that dtype, and blocks written under one
/// dtype are never used under another (same model, same disk directory).
#[test]
fn each_kv_dtype_round_trips_through_the_tiers_and_never_crosses_dtypes() {
    let (model, path) = tiny(TinyArch::Gemma3, 12);
    let dir = temp_dir("dtypes");
    let p = prompt(5, 41);
    for dtype in [KvDtype::Q8_0, KvDtype::Q4_0, KvDtype::Q4, KvDtype::F16] {
        let want = alone_as(&model, &p, 6, dtype);
        let tiers = TierOptions {
            ram_tier_mb: 16,
            ..disk(&dir)
        };
        // 64 blocks of every layer: Gemma 3's blocks hold one layer group of six.
        let e = engine_as(Model::load(&path).unwrap(), 64 * 6, tiers.clone(), dtype);
        let (_, text, usage) = run(&e.0, &p, 6);
        assert_eq!(text, want, "{dtype}: first run");
        // Nothing from the dtypes before this one is used.
        assert_eq!(
            usage.cached_tokens, 0,
            "{dtype}: another dtype's blocks were used"
        );
        stop(e);
        // Restarted: the prefix comes back from disk, same output.
        let e = engine_as(Model::load(&path).unwrap(), 64 * 6, disk(&dir), dtype);
        let (_, text, usage) = run(&e.0, &p, 6);
        assert_eq!(text, want, "{dtype}: disk hit");
        assert_eq!(usage.cached_tokens, 40, "{dtype}: no disk hit");
        let s = wait_idle(&e.0);
        assert_eq!(s.tiers[0].corrupt, 0);
        assert_eq!(s.kv_dtype, dtype.name());
        stop(e);
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// A fresh engine of the model at `path` runs `prompt` (6 tokens) and stops: its text and
/// cached prompt tokens.
fn run_restarted(path: &Path, cache: CacheOptions, prompt: &[u32]) -> (String, usize) {
    let e = engine_with(Model::load(path).unwrap(), cache);
    let (_, text, usage) = run(&e.0, prompt, 6);
    stop(e);
    (text, usage.cached_tokens)
}

/// Gemma 3's layer groups through the tiers: every group's blocks are written under their own
/// key (group in it); a RAM hit after eviction and a disk hit after restart need the full
/// group's every block and the sliding groups' window, and equal no cache; a cache keeping
/// every position (`--swa-full`) has other blocks and never takes these.
#[test]
fn layer_groups_travel_through_the_tiers_under_their_own_keys() {
    let (model, path) = tiny(TinyArch::Gemma3, 12);
    let groups = model.kv_groups(true).len();
    assert_eq!(groups, 6);
    let dir = temp_dir("groups");
    let p = prompt(5, 41); // 10 full blocks
    let want = alone(&model, &p, 6);
    let windowed = |blocks: usize, tiers: TierOptions| CacheOptions {
        num_blocks: Some(blocks),
        block_size: BS,
        tiers,
        ..CacheOptions::default()
    };
    let tiers = TierOptions {
        ram_tier_mb: 16,
        ..disk(&dir)
    };
    let e = engine_with(Model::load(&path).unwrap(), windowed(24 * groups, tiers));
    assert_eq!(run(&e.0, &p, 6).1, want);
    assert_eq!(wait_idle(&e.0).kv_groups, groups);
    // Other prompts push the first one's blocks out of the pool into RAM.
    for s in 6..10 {
        run(&e.0, &prompt(s, 41), 6);
    }
    wait_idle(&e.0);
    let (_, text, usage) = run(&e.0, &p, 6);
    assert_eq!(text, want, "a RAM tier hit of every group changes nothing");
    assert_eq!(usage.cached_tokens, 40);
    let s = wait_idle(&e.0);
    assert_eq!(s.tier_hit_tokens_total, 40, "{s:?}");
    // Only what the hit needs: the full group's 10 blocks, and each sliding group's 2 blocks of
    // the window (8 tokens) before position 40.
    assert_eq!(s.tiers.iter().map(|t| t.hits).sum::<u64>(), 10 + 2 * 5);
    assert_eq!(s.tiers.iter().map(|t| t.corrupt).sum::<u64>(), 0);
    stop(e);
    // Every group's full blocks of the first prompt are on disk, a file each.
    assert!(
        block_files(&dir).len() >= 10 * groups,
        "{}",
        block_files(&dir).len()
    );

    let (text, cached) = run_restarted(&path, windowed(24 * groups, disk(&dir)), &p);
    assert_eq!(
        text, want,
        "a disk hit of every group after restart changes nothing"
    );
    assert_eq!(cached, 40);

    // Restarted again, a prompt sharing only p's first 7 blocks: the sliding groups' window
    // before that hit point (not before the longest one) comes from disk.
    let mut q = p[..28].to_vec();
    q.extend(prompt(77, 13));
    let want_q = alone(&model, &q, 6);
    let (text, cached) = run_restarted(&path, windowed(24 * groups, disk(&dir)), &q);
    assert_eq!(text, want_q, "a shorter disk hit changes nothing");
    assert_eq!(cached, 28, "p's first 7 blocks of every group from disk");

    let full = CacheOptions {
        swa_full: true,
        ..windowed(64, disk(&dir))
    };
    let e = engine_with(Model::load(&path).unwrap(), full);
    let (_, text, usage) = run(&e.0, &p, 6);
    assert_eq!(text, want);
    assert_eq!(
        usage.cached_tokens, 0,
        "grouped blocks used by a full cache"
    );
    assert_eq!(wait_idle(&e.0).kv_groups, 1);
    stop(e);
    let _ = std::fs::remove_dir_all(&dir);
}
