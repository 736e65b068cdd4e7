//! RedisTier against real redis-server processes: a plain server and a three-node cluster.

use kvinfer_cache::{BlockHash, ModelFingerprint};
use kvinfer_tier::testing::{RedisCluster, RedisServer};
use kvinfer_tier::{
    BlockSpec, Codec, LoadRequest, RedisTarget, RedisTier, RedisTierConfig, Tier, TierSpec,
    TieredStore, TieredStoreConfig, WriteMode,
};
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

fn block(s: &BlockSpec, i: u32) -> (BlockHash, Vec<u32>, Vec<u8>) {
    let raw: Vec<u8> = (0..s.payload_bytes())
        .map(|j| (j as u32 * 31 + i) as u8)
        .collect();
    let mut h = [0u8; 16];
    h[..4].copy_from_slice(&i.to_le_bytes());
    (BlockHash(h), (0..4).map(|t| i * 10 + t).collect(), raw)
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
        ids.clone().map(|i| block(s, i).0).collect(),
        ids.flat_map(|i| block(s, i).1).collect(),
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
    // Block the server for 2 s from another client.
    let port = server.port.to_string();
    let sleeper = std::thread::spawn(move || {
        std::process::Command::new("redis-cli")
            .args(["-p", &port, "DEBUG", "SLEEP", "2"])
            .output()
    });
    std::thread::sleep(Duration::from_millis(200));
    let t0 = Instant::now();
    assert_eq!(
        s.load_blocking(&request(&spec(1), 0..4)).payloads().len(),
        0
    );
    assert!(
        t0.elapsed() < Duration::from_millis(1000),
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
