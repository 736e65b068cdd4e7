//! RedisTier: blocks in Redis, shared by every kvinfer instance pointed at it: one
//! redis-server (`--redis URL`) or a Redis Cluster (`--redis-cluster HOST:PORT,...`, the
//! `redis` crate's cluster client, which routes each key to its slot's node).
//!
//! - One value per block: the wire form (header + payload), key
//!   `kvinfer:v1:<model: 32 hex>:<group>:<hash: 32 hex>`.
//! - Written with `SET .. EX ttl` where ttl has +-10% jitter, so blocks written together do not
//!   all expire together.
//! - Reads are pipelined (one round trip for a whole prefix) under a short deadline per read
//!   (`--redis-timeout-ms`): a slow Redis is a miss, not a stall.
//! - Circuit breaker: after 3 failures in a row the tier answers "unavailable" at once for a
//!   backoff (1 s, doubling to 30 s); then one call tries again (reconnecting), and a success
//!   closes the circuit. Reads and writes use separate connections, so a large write does not
//!   delay a read.

use crate::stats::{TierCounters, TierStats};
use crate::{Tier, TierError, TierKey};
use kvinfer_cache::ModelFingerprint;
use rand::Rng;
use redis::cluster::{ClusterClient, ClusterConnection};
use redis::{Client, Connection};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Where Redis is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RedisTarget {
    /// One server: `redis://host:port/db`.
    Single(String),
    /// A cluster, by some of its nodes (`host:port`).
    Cluster(Vec<String>),
}

/// How to reach and use Redis.
#[derive(Debug, Clone)]
pub struct RedisTierConfig {
    /// The server or cluster.
    pub target: RedisTarget,
    /// Lifetime of a block (before jitter).
    pub ttl: Duration,
    /// Deadline of one read (and of connecting).
    pub read_timeout: Duration,
    /// Deadline of one write.
    pub write_timeout: Duration,
}

enum Conn {
    Single(Connection),
    Cluster(ClusterConnection),
}

/// Commands sent in one round trip; `ignore`: their replies are not wanted.
struct Batch {
    cmds: Vec<redis::Cmd>,
    ignore: bool,
}

impl Batch {
    fn new(ignore: bool) -> Self {
        Self {
            cmds: Vec::new(),
            ignore,
        }
    }

    fn add(&mut self, name: &str) -> &mut redis::Cmd {
        self.cmds.push(redis::cmd(name));
        self.cmds.last_mut().expect("just pushed")
    }
}

impl Conn {
    /// A cluster needs its own pipeline type (it splits the batch by slot and node).
    fn query<T: redis::FromRedisValue>(&mut self, batch: &Batch) -> redis::RedisResult<T> {
        match self {
            Conn::Single(c) => {
                let mut p = redis::pipe();
                for cmd in &batch.cmds {
                    p.add_command(cmd.clone());
                    if batch.ignore {
                        p.ignore();
                    }
                }
                p.query(c)
            }
            Conn::Cluster(c) => {
                let mut p = redis::cluster::cluster_pipe();
                for cmd in &batch.cmds {
                    p.add_command(cmd.clone());
                    if batch.ignore {
                        p.ignore();
                    }
                }
                p.query(c)
            }
        }
    }
}

#[derive(Debug)]
struct Breaker {
    failures: u32,
    open_until: Option<Instant>,
    backoff: Duration,
}

const BREAKER_THRESHOLD: u32 = 3;
const BACKOFF_MIN: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(30);

/// Blocks in Redis. See the module docs.
pub struct RedisTier {
    config: RedisTierConfig,
    name: &'static str,
    single: Option<Client>,
    /// [reads, writes]: the response timeout is per client.
    cluster: Option<[ClusterClient; 2]>,
    /// [read connection, write connection], connected lazily.
    conns: [Mutex<Option<Conn>>; 2],
    breaker: Mutex<Breaker>,
    counters: TierCounters,
}

const READ: usize = 0;
const WRITE: usize = 1;

impl RedisTier {
    /// A tier over `config.target`. Connects lazily: a Redis that is down at start-up is a tier
    /// of misses until it comes up.
    pub fn new(config: RedisTierConfig) -> Result<Self, TierError> {
        let err = |e: redis::RedisError| TierError::Config(format!("redis: {e}"));
        let (single, cluster, name) = match &config.target {
            RedisTarget::Single(url) => (
                Some(Client::open(url.as_str()).map_err(err)?),
                None,
                "redis",
            ),
            RedisTarget::Cluster(nodes) => {
                if nodes.is_empty() {
                    return Err(TierError::Config(
                        "--redis-cluster needs HOST:PORT[,HOST:PORT...]".into(),
                    ));
                }
                let urls: Vec<String> = nodes.iter().map(|n| node_url(n)).collect();
                let build = |timeout: Duration| {
                    ClusterClient::builder(urls.clone())
                        .connection_timeout(config.read_timeout)
                        .response_timeout(timeout)
                        .retries(1)
                        .build()
                        .map_err(err)
                };
                let c = [build(config.read_timeout)?, build(config.write_timeout)?];
                (None, Some(c), "redis-cluster")
            }
        };
        Ok(Self {
            config,
            name,
            single,
            cluster,
            conns: [Mutex::new(None), Mutex::new(None)],
            breaker: Mutex::new(Breaker {
                failures: 0,
                open_until: None,
                backoff: BACKOFF_MIN,
            }),
            counters: TierCounters::default(),
        })
    }

    /// The Redis key of `key`.
    pub fn redis_key(key: &TierKey) -> String {
        format!(
            "kvinfer:v1:{}:{}:{}",
            key.model_hex(),
            key.group,
            key.hash_hex()
        )
    }

    fn connect(&self, which: usize) -> redis::RedisResult<Conn> {
        let timeout = if which == READ {
            self.config.read_timeout
        } else {
            self.config.write_timeout
        };
        if let Some(c) = &self.single {
            let con = c.get_connection_with_timeout(self.config.read_timeout)?;
            con.set_read_timeout(Some(timeout))?;
            con.set_write_timeout(Some(timeout))?;
            Ok(Conn::Single(con))
        } else {
            let c = self.cluster.as_ref().expect("single or cluster");
            Ok(Conn::Cluster(c[which].get_connection()?))
        }
    }

    /// Runs `pipe` on connection `which` under the breaker.
    fn run<T: redis::FromRedisValue>(&self, which: usize, pipe: &Batch) -> Result<T, TierError> {
        {
            let b = self.breaker.lock().unwrap_or_else(|e| e.into_inner());
            if b.open_until.is_some_and(|t| Instant::now() < t) {
                return Err(TierError::Unavailable(self.name));
            }
        }
        let mut slot = self.conns[which].lock().unwrap_or_else(|e| e.into_inner());
        let result = match slot.as_mut() {
            Some(c) => c.query(pipe),
            None => self.connect(which).and_then(|mut c| {
                let r = c.query(pipe);
                *slot = Some(c);
                r
            }),
        };
        let mut b = self.breaker.lock().unwrap_or_else(|e| e.into_inner());
        match result {
            Ok(v) => {
                b.failures = 0;
                b.open_until = None;
                b.backoff = BACKOFF_MIN;
                Ok(v)
            }
            Err(e) => {
                *slot = None; // reconnect next time
                TierCounters::add(&self.counters.errors, 1);
                b.failures += 1;
                if b.failures >= BREAKER_THRESHOLD {
                    b.open_until = Some(Instant::now() + b.backoff);
                    tracing::warn!(
                        "{} tier failing ({e}); trying again in {:?}",
                        self.name,
                        b.backoff
                    );
                    b.backoff = (b.backoff * 2).min(BACKOFF_MAX);
                }
                Err(TierError::Redis(e.to_string()))
            }
        }
    }

    fn ttl_secs(&self) -> u64 {
        let base = self.config.ttl.as_secs_f64().max(1.0);
        let jitter = rand::rng().random_range(-0.1..0.1);
        (base * (1.0 + jitter)).round().max(1.0) as u64
    }

    fn healthy(&self) -> bool {
        let b = self.breaker.lock().unwrap_or_else(|e| e.into_inner());
        b.failures < BREAKER_THRESHOLD
    }

    /// Connections to every node holding data: the server, or the cluster's masters.
    fn node_connections(&self) -> Result<Vec<Connection>, TierError> {
        let e = |e: redis::RedisError| TierError::Redis(e.to_string());
        let open = |url: &str| -> Result<Connection, TierError> {
            let c = Client::open(url).map_err(e)?;
            let con = c
                .get_connection_with_timeout(self.config.write_timeout)
                .map_err(e)?;
            con.set_read_timeout(Some(self.config.write_timeout * 4))
                .map_err(e)?;
            Ok(con)
        };
        match &self.config.target {
            RedisTarget::Single(url) => Ok(vec![open(url)?]),
            RedisTarget::Cluster(seeds) => {
                let mut seed = None;
                for s in seeds {
                    if let Ok(c) = open(&node_url(s)) {
                        seed = Some(c);
                        break;
                    }
                }
                let mut seed =
                    seed.ok_or_else(|| TierError::Redis("no cluster node reachable".into()))?;
                let nodes: String = redis::cmd("CLUSTER")
                    .arg("NODES")
                    .query(&mut seed)
                    .map_err(e)?;
                nodes
                    .lines()
                    .filter(|l| l.contains("master") && !l.contains("fail"))
                    .filter_map(|l| l.split_whitespace().nth(1))
                    .map(|addr| open(&node_url(addr.split('@').next().unwrap_or(addr))))
                    .collect()
            }
        }
    }

    /// Every key under `pattern` on every node, with its value's length.
    fn scan(
        &self,
        pattern: &str,
        mut each: impl FnMut(&mut Connection, Vec<String>) -> Result<(), TierError>,
    ) -> Result<(), TierError> {
        let e = |e: redis::RedisError| TierError::Redis(e.to_string());
        for mut con in self.node_connections()? {
            let mut cursor: u64 = 0;
            loop {
                let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
                    .arg(cursor)
                    .arg("MATCH")
                    .arg(pattern)
                    .arg("COUNT")
                    .arg(1000)
                    .query(&mut con)
                    .map_err(e)?;
                if !keys.is_empty() {
                    each(&mut con, keys)?;
                }
                if next == 0 {
                    break;
                }
                cursor = next;
            }
        }
        Ok(())
    }

    /// Blocks and bytes stored under this tier's prefix (one SCAN over every node: for
    /// `kvinfer cache stats`, not for the serving path).
    pub fn count(&self) -> Result<(u64, u64), TierError> {
        let (mut n, mut bytes) = (0u64, 0u64);
        self.scan("kvinfer:v1:*", |con, keys| {
            let mut p = redis::pipe();
            for k in &keys {
                p.cmd("STRLEN").arg(k);
            }
            let lens: Vec<u64> = p.query(con).map_err(|e| TierError::Redis(e.to_string()))?;
            n += keys.len() as u64;
            bytes += lens.iter().sum::<u64>();
            Ok(())
        })?;
        Ok((n, bytes))
    }
}

fn node_url(node: &str) -> String {
    if node.starts_with("redis://") {
        node.to_string()
    } else {
        format!("redis://{node}")
    }
}

impl Tier for RedisTier {
    fn name(&self) -> &'static str {
        self.name
    }

    fn get(&self, key: &TierKey) -> Result<Option<Vec<u8>>, TierError> {
        Ok(self.get_many(std::slice::from_ref(key))?.pop().flatten())
    }

    fn get_many(&self, keys: &[TierKey]) -> Result<Vec<Option<Vec<u8>>>, TierError> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let mut p = Batch::new(false);
        for k in keys {
            p.add("GET").arg(Self::redis_key(k));
        }
        self.run(READ, &p)
    }

    fn put(&self, key: &TierKey, value: &[u8]) -> Result<(), TierError> {
        let mut p = Batch::new(true);
        p.add("SET")
            .arg(Self::redis_key(key))
            .arg(value)
            .arg("EX")
            .arg(self.ttl_secs());
        self.run::<()>(WRITE, &p)
    }

    fn put_many(&self, entries: &[(TierKey, Vec<u8>)]) -> Result<(), TierError> {
        if entries.is_empty() {
            return Ok(());
        }
        let mut p = Batch::new(true);
        for (k, v) in entries {
            p.add("SET")
                .arg(Self::redis_key(k))
                .arg(&v[..])
                .arg("EX")
                .arg(self.ttl_secs());
        }
        self.run::<()>(WRITE, &p)
    }

    fn contains(&self, key: &TierKey) -> Result<bool, TierError> {
        let mut p = Batch::new(false);
        p.add("EXISTS").arg(Self::redis_key(key));
        let v: Vec<u32> = self.run(WRITE, &p)?;
        Ok(v.first().copied().unwrap_or(0) > 0)
    }

    fn contains_many(&self, keys: &[TierKey]) -> Result<Vec<bool>, TierError> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let mut p = Batch::new(false);
        for k in keys {
            p.add("EXISTS").arg(Self::redis_key(k));
        }
        let v: Vec<u32> = self.run(WRITE, &p)?;
        Ok(v.into_iter().map(|n| n > 0).collect())
    }

    fn delete(&self, key: &TierKey) -> Result<(), TierError> {
        let mut p = Batch::new(true);
        p.add("DEL").arg(Self::redis_key(key));
        self.run::<()>(WRITE, &p)
    }

    fn clear(&self, model: Option<&ModelFingerprint>) -> Result<u64, TierError> {
        let pattern = match model {
            Some(m) => format!(
                "kvinfer:v1:{}:*",
                TierKey {
                    fingerprint: *m,
                    group: 0,
                    hash: kvinfer_cache::BlockHash([0; 16])
                }
                .model_hex()
            ),
            None => "kvinfer:v1:*".into(),
        };
        let mut n = 0;
        self.scan(&pattern, |con, keys| {
            // One DEL per key: in a cluster, keys of one node still span many slots.
            let mut p = redis::pipe();
            for k in &keys {
                p.cmd("DEL").arg(k).ignore();
            }
            p.query::<()>(con)
                .map_err(|e| TierError::Redis(e.to_string()))?;
            n += keys.len() as u64;
            Ok(())
        })?;
        Ok(n)
    }

    fn counters(&self) -> &TierCounters {
        &self.counters
    }

    fn stats(&self) -> TierStats {
        self.counters.snapshot(self.name, 0, 0, self.healthy())
    }
}
