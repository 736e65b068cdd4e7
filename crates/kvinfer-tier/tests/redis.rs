//! RedisTier against real redis-server processes: a plain server and a three-node cluster.

use kvinfer_cache::{BlockHash, ModelFingerprint};
use kvinfer_tier::testing::{RedisCluster, RedisServer};
use kvinfer_tier::{
    BlockSpec, Codec, LoadRequest, RedisTarget, RedisTier, RedisTierConfig, Tier, TierSpec,
    TieredStore, TieredStoreConfig, WriteMode,
};
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn spec(model: u8) -> BlockSpec {
    BlockSpec {
        fingerprint: ModelFingerprint([model; 32]),
        group: 0,
        dtype: 0,
        n_layers: 2,
        n_kv_heads: 2,
        head_dim: 16,
        block_size: 4,
    }
}

/// Blocks the size of a small real model's: TinyLlama's 22 layers, 4 KV heads of 64 values,
/// 16 tokens, f16: 352 KiB each, 36 MB for 100 blocks.
fn real_spec(model: u8) -> BlockSpec {
    BlockSpec {
        n_layers: 22,
        n_kv_heads: 4,
        head_dim: 64,
        block_size: 16,
        ..spec(model)
    }
}

fn hash(i: u32) -> BlockHash {
    let mut h = [0u8; 16];
    h[..4].copy_from_slice(&i.to_le_bytes());
    BlockHash(h)
}

fn tokens(s: &BlockSpec, i: u32) -> Vec<u32> {
    (0..s.block_size as u32).map(|t| i * 100 + t).collect()
}

fn block(s: &BlockSpec, i: u32) -> (BlockHash, Vec<u32>, Vec<u8>) {
    let raw: Vec<u8> = (0..s.payload_bytes())
        .map(|j| (j as u32 * 31 + i) as u8)
        .collect();
    (hash(i), tokens(s, i), raw)
}

fn tier(target: RedisTarget, timeout_ms: u64) -> Arc<RedisTier> {
    Arc::new(
        RedisTier::new(RedisTierConfig {
            target,
            ttl: Duration::from_secs(1000),
            read_timeout: Duration::from_millis(timeout_ms),
            write_timeout: Duration::from_millis(1000),
        })
        .unwrap(),
    )
}

fn store(s: BlockSpec, t: Arc<RedisTier>) -> TieredStore {
    TieredStore::new(
        TieredStoreConfig {
            block: s,
            write_queue_blocks: 256,
            load_queue: 8,
        },
        vec![TierSpec {
            tier: t,
            write: WriteMode::Through,
            codec: Codec::None,
        }],
    )
}

fn request(s: &BlockSpec, ids: std::ops::Range<u32>) -> LoadRequest {
    LoadRequest::chain(
        ids.clone().map(hash).collect(),
        ids.flat_map(|i| tokens(s, i)).collect(),
    )
}

fn write(store: &TieredStore, ids: std::ops::Range<u32>) {
    for i in ids {
        let (h, t, raw) = block(store.spec(), i);
        store.write_registered(0, h, &t, &raw);
    }
    store.flush();
}

#[test]
fn blocks_round_trip_with_jittered_ttls_and_models_stay_apart() {
    let server = RedisServer::start().expect("redis-server");
    let t = tier(RedisTarget::Single(server.url()), 200);
    let a = store(spec(1), t.clone());
    write(&a, 0..20);
    let r = a.load_blocking(&request(&spec(1), 0..20));
    assert_eq!(r.payloads().len(), 20);
    assert_eq!(r.payloads()[7], block(&spec(1), 7).2);
    // TTLs near 1000 s, not all equal.
    let ttls: Vec<i64> = (0..20)
        .map(|i| {
            let key = RedisTier::redis_key(&spec(1).key(block(&spec(1), i).0));
            server.cli(&["TTL", &key]).unwrap().trim().parse().unwrap()
        })
        .collect();
    assert!(ttls.iter().all(|&x| (880..=1100).contains(&x)), "{ttls:?}");
    assert!(ttls.iter().any(|&x| x != ttls[0]), "jitter: {ttls:?}");
    // Another model on the same Redis finds nothing of the first's.
    let b = store(spec(2), t.clone());
    assert_eq!(
        b.load_blocking(&request(&spec(2), 0..20)).payloads().len(),
        0
    );
    // A block overwritten with another model's bytes under this key is refused and deleted.
    let key = RedisTier::redis_key(&spec(1).key(block(&spec(1), 3).0));
    let (h, tk, raw) = block(&spec(2), 3);
    let foreign = kvinfer_tier::wire::encode(&spec(2), &h, &tk, &raw, Codec::None);
    t.put(&spec(1).key(block(&spec(1), 3).0), &foreign).unwrap();
    assert_eq!(
        a.load_blocking(&request(&spec(1), 0..20)).payloads().len(),
        3
    );
    assert_eq!(server.cli(&["EXISTS", &key]).unwrap().trim(), "0");
    assert_eq!(t.stats().corrupt, 1);
    // Written again: found again; clear removes this model's blocks only.
    write(&a, 3..4);
    write(&b, 0..5);
    assert_eq!(
        a.load_blocking(&request(&spec(1), 0..20)).payloads().len(),
        20
    );
    assert_eq!(a.clear(), vec![("redis", Ok(20))]);
    assert_eq!(
        b.load_blocking(&request(&spec(2), 0..5)).payloads().len(),
        5
    );
}

#[test]
fn a_dead_redis_is_a_miss_opens_the_circuit_and_recovers_when_it_returns() {
    let mut server = RedisServer::start().expect("redis-server");
    let t = tier(RedisTarget::Single(server.url()), 200);
    let s = store(spec(1), t.clone());
    write(&s, 0..4);
    server.kill();
    let t0 = Instant::now();
    for _ in 0..10 {
        assert_eq!(
            s.load_blocking(&request(&spec(1), 0..4)).payloads().len(),
            0
        );
    }
    assert!(
        t0.elapsed() < Duration::from_secs(3),
        "misses are quick: {:?}",
        t0.elapsed()
    );
    let st = t.stats();
    assert!(!st.healthy, "circuit open");
    assert!(st.errors >= 3);
    server.restart().unwrap();
    write(&s, 0..4); // may be refused while the circuit is still open
    let t0 = Instant::now();
    loop {
        write(&s, 0..4);
        if s.load_blocking(&request(&spec(1), 0..4)).payloads().len() == 4 {
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(10), "never recovered");
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(t.stats().healthy);
}

#[test]
fn a_slow_redis_is_a_miss_within_the_deadline() {
    let server = RedisServer::start().expect("redis-server");
    let t = tier(RedisTarget::Single(server.url()), 100);
    let s = store(spec(1), t.clone());
    write(&s, 0..4);
    assert_eq!(
        s.load_blocking(&request(&spec(1), 0..4)).payloads().len(),
        4
    );
    // Block the server for 3 s from another client.
    let port = server.port.to_string();
    let sleeper = std::thread::spawn(move || {
        std::process::Command::new("redis-cli")
            .args(["-p", &port, "DEBUG", "SLEEP", "3"])
            .output()
    });
    std::thread::sleep(Duration::from_millis(200));
    let t0 = Instant::now();
    assert_eq!(
        s.load_blocking(&request(&spec(1), 0..4)).payloads().len(),
        0
    );
    // The load gave up at its deadline (100 ms), not when the server woke: what it guards is
    // "less than the sleep", with room for a busy machine.
    assert!(
        t0.elapsed() < Duration::from_millis(2000),
        "took {:?}",
        t0.elapsed()
    );
    sleeper.join().unwrap().unwrap();
}

#[test]
fn a_cluster_spreads_blocks_over_its_nodes_and_serves_them_back() {
    let cluster = RedisCluster::start(3).expect("a redis cluster");
    let t = tier(RedisTarget::Cluster(cluster.addrs()), 500);
    assert_eq!(t.name(), "redis-cluster");
    let s = store(spec(1), t.clone());
    write(&s, 0..60);
    let r = s.load_blocking(&request(&spec(1), 0..60));
    assert_eq!(r.payloads().len(), 60);
    assert_eq!(r.payloads()[59], block(&spec(1), 59).2);
    let per_node: Vec<u64> = cluster
        .nodes
        .iter()
        .map(|n| n.cli(&["DBSIZE"]).unwrap().trim().parse().unwrap())
        .collect();
    assert_eq!(per_node.iter().sum::<u64>(), 60);
    assert!(per_node.iter().all(|&n| n > 0), "spread: {per_node:?}");
    assert_eq!(t.count().unwrap().0, 60);
    assert_eq!(s.clear(), vec![("redis-cluster", Ok(60))]);
    assert_eq!(
        s.load_blocking(&request(&spec(1), 0..60)).payloads().len(),
        0
    );
}

/// A TCP relay to a real redis-server whose replies, once, stop for `stall` after `after_bytes`
/// of them went through: a link that goes slow in the middle of a long read. Only the path
/// is slowed; the server is the real one.
struct SlowLink {
    port: u16,
}

impl SlowLink {
    fn start(upstream: u16, after_bytes: u64, stall: Duration) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let stalled = Arc::new(AtomicBool::new(false));
        std::thread::spawn(move || {
            for client in listener.incoming().flatten() {
                let Ok(server) = TcpStream::connect(("127.0.0.1", upstream)) else {
                    continue;
                };
                let (c, s) = (client.try_clone().unwrap(), server.try_clone().unwrap());
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut &c, &mut &s);
                    let _ = s.shutdown(Shutdown::Write);
                });
                let stalled = stalled.clone();
                std::thread::spawn(move || {
                    relay_replies(server, client, after_bytes, stall, &stalled)
                });
            }
        });
        Self { port }
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }
}

/// Copies `from` to `to`, sleeping `stall` once (across connections) at byte `after`.
fn relay_replies(
    mut from: TcpStream,
    mut to: TcpStream,
    after: u64,
    stall: Duration,
    stalled: &AtomicBool,
) {
    let mut buf = vec![0u8; 64 << 10];
    let mut sent = 0u64;
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let mut chunk = &buf[..n];
        if sent < after && sent + n as u64 >= after && !stalled.swap(true, SeqCst) {
            let head = (after - sent) as usize;
            if to.write_all(&chunk[..head]).is_err() {
                break;
            }
            sent += head as u64;
            chunk = &chunk[head..];
            std::thread::sleep(stall);
        }
        if to.write_all(chunk).is_err() {
            break;
        }
        sent += chunk.len() as u64;
    }
    let _ = to.shutdown(Shutdown::Both);
}

/// Writes blocks `ids` of `s` through a tier straight to `server`.
fn write_direct(server: &RedisServer, s: BlockSpec, ids: std::ops::Range<u32>) {
    let w = store(s, tier(RedisTarget::Single(server.url()), 1000));
    write(&w, ids);
}

#[test]
fn a_late_batch_cuts_a_long_prefix_there_and_the_batches_before_it_are_served() {
    let server = RedisServer::start().expect("redis-server");
    let s = real_spec(1);
    let n = 120;
    write_direct(&server, s, 0..n);
    // Another instance reads over a link that stops for 3 s once 20 MiB of replies went by.
    let stall_at: u64 = 20 << 20;
    let link = SlowLink::start(server.port, stall_at, Duration::from_secs(3));
    let t = tier(RedisTarget::Single(link.url()), 100);
    let r = store(s, t.clone());
    let t0 = Instant::now();
    let got = r.load_blocking(&request(&s, 0..n));
    let took = t0.elapsed();
    let served = got.payloads().len() as u64;
    // Each reply is the value plus RESP framing ("$360xxx\r\n" .. "\r\n").
    let reply = s.wire_bytes() as u64 + 12;
    let per_batch = (RedisTier::READ_BATCH_BYTES / s.wire_bytes()).max(1) as u64;
    let before_stall = stall_at / reply;
    assert!(
        served > 0 && served <= before_stall && served + per_batch > before_stall,
        "served {served} blocks; {before_stall} came before the stall, {per_batch} a batch"
    );
    assert_eq!(
        got.payloads()[served as usize - 1],
        block(&s, served as u32 - 1).2
    );
    // About the batches before it and one deadline (~180 ms), not the 3 s stall.
    assert!(
        took < Duration::from_millis(1000),
        "the late batch cost {took:?}"
    );
    let st = t.stats();
    assert_eq!((st.timeouts, st.errors), (1, 0), "{st:?}");
    assert_eq!((st.hits, st.misses), (served, n as u64 - served), "{st:?}");
    assert!(st.healthy, "one late batch does not open the circuit");
    // The link is fast again: the whole prefix comes back.
    assert_eq!(
        r.load_blocking(&request(&s, 0..n)).payloads().len(),
        n as usize
    );
}

#[test]
fn a_long_prefix_of_real_sized_blocks_is_served_under_the_default_timeout_on_a_busy_machine() {
    let server = RedisServer::start().expect("redis-server");
    let s = real_spec(1);
    let n = 120; // 43 MB
    write_direct(&server, s, 0..n);
    let t = tier(RedisTarget::Single(server.url()), 100); // --redis-timeout-ms's default
    let r = store(s, t.clone());
    // Twice as many spinning threads as cores, for the whole read.
    let busy = Arc::new(AtomicBool::new(true));
    let cores = std::thread::available_parallelism().map_or(2, |c| c.get());
    let hogs: Vec<_> = (0..2 * cores)
        .map(|_| {
            let busy = busy.clone();
            std::thread::spawn(move || {
                let mut x = 0u64;
                while busy.load(SeqCst) {
                    x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(7));
                }
            })
        })
        .collect();
    let lens: Vec<usize> = (0..3)
        .map(|_| r.load_blocking(&request(&s, 0..n)).payloads().len())
        .collect();
    busy.store(false, SeqCst);
    for h in hogs {
        h.join().unwrap();
    }
    let st = t.stats();
    assert_eq!(lens, vec![n as usize; 3], "{st:?}");
    assert_eq!(
        (st.timeouts, st.errors, st.hits),
        (0, 0, 3 * n as u64),
        "{st:?}"
    );
}
