//! RedisTier: blocks in Redis, shared by every kvinfer instance pointed at it: one
//! redis-server (`--redis URL`) or a Redis Cluster (`--redis-cluster HOST:PORT,...`, the
//! `redis` crate's cluster client, which routes each key to its slot's node).
//!
//! - One value per block: the wire form (header + payload), key
//!   `kvinfer:v1:<model: 32 hex>:<group>:<hash: 32 hex>`.
//! - Written with `SET .. EX ttl` where ttl has +-10% jitter, so blocks written together do not
//!   all expire together.
//! - Reads are pipelined in round trips of at most [`RedisTier::READ_BATCH_BYTES`] (4 MiB, by
//!   the block size the store knows from its `BlockSpec`), each under a deadline that grows
//!   with what it asks for: `deadline = --redis-timeout-ms + bytes asked / 50 MiB/s`
//!   ([`RedisTier::READ_FLOOR_BYTES_PER_S`]). 99 blocks of 352 KiB (36 MB) are 9 round trips
//!   of 11 blocks, each allowed 100 + 76 ms.
//! - A failed or late reply ends the read there: the blocks before it are served, the rest are
//!   misses. A slow Redis costs the tail of a prefix, neither the whole prefix nor a stall.
//!   Missed deadlines are counted in `timeouts`, other failures in `errors`.
//! - One server: a round trip's replies are read one by one, each wait bounded by the time
//!   left (the `redis` crate's pipeline waits a whole timeout again for every reply left after
//!   one timed out). A cluster goes through its client's pipeline, which does just that, so
//!   its round trips are also bounded to 16 keys; one that finishes past its deadline is
//!   served, counted as late, and ends the read.
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
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
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
    /// Deadline of one read round trip before its transfer time (see the module docs), and of
    /// connecting.
    pub read_timeout: Duration,
    /// Deadline of one write.
    pub write_timeout: Duration,
}

enum Conn {
    Single(Connection),
    Cluster(Box<ClusterConnection>),
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

/// Most keys one read round trip asks a cluster for: its client waits up to the deadline for
/// each reply of a stalled node (see [`Conn::get_until`]), so this bounds what a stall costs
/// (16 x 180 ms at the defaults) at a small price in round trips for small blocks.
const CLUSTER_READ_BATCH_KEYS: usize = 16;

/// The shortest socket timeout set (zero would mean none).
const MIN_WAIT: Duration = Duration::from_millis(1);

/// The error of a read whose deadline passed.
fn late() -> redis::RedisError {
    std::io::Error::from(std::io::ErrorKind::TimedOut).into()
}

/// A GET's reply as a block: its bytes, or none (absent, or not a string: no block either).
fn as_value(v: redis::Value) -> Option<Vec<u8>> {
    redis::from_redis_value(v).ok().flatten()
}

impl Conn {
    /// The longest wait for reply bytes from now on.
    fn set_read_timeout(&self, timeout: Duration) -> redis::RedisResult<()> {
        let t = Some(timeout.max(MIN_WAIT));
        match self {
            Conn::Single(c) => c.set_read_timeout(t),
            Conn::Cluster(c) => c.set_read_timeout(t),
        }
    }

    /// GETs `keys` in one round trip, reading the replies until `deadline`; each value read is
    /// pushed to `values` as it comes, so a failure leaves the ones before it there. After an
    /// `Err` the connection holds unread replies: drop it.
    ///
    /// One server: reply by reply, each wait bounded by the time left. A cluster: its pipeline
    /// (which splits the keys by node), each wait bounded by the whole deadline; it reads every
    /// reply even after one timed out, so a stalled node costs up to one deadline per key it
    /// holds ([`CLUSTER_READ_BATCH_KEYS`] bounds that).
    fn get_until(
        &mut self,
        keys: &[TierKey],
        deadline: Instant,
        values: &mut Vec<Option<Vec<u8>>>,
    ) -> redis::RedisResult<()> {
        let left = || deadline.saturating_duration_since(Instant::now());
        match self {
            Conn::Single(c) => {
                let mut p = redis::pipe();
                for k in keys {
                    p.cmd("GET").arg(RedisTier::redis_key(k));
                }
                c.send_packed_command(&p.get_packed_pipeline())?;
                for _ in keys {
                    if left().is_zero() {
                        return Err(late());
                    }
                    c.set_read_timeout(Some(left().max(MIN_WAIT)))?;
                    values.push(as_value(c.recv_response()?));
                }
            }
            Conn::Cluster(c) => {
                let mut p = redis::cluster::cluster_pipe();
                for k in keys {
                    p.cmd("GET").arg(RedisTier::redis_key(k));
                }
                c.set_read_timeout(Some(left().max(MIN_WAIT)))?;
                let got: Vec<redis::Value> = p.query(c)?;
                values.extend(got.into_iter().map(as_value));
                if left().is_zero() {
                    return Err(late()); // served, but the read's time is spent
                }
            }
        }
        Ok(())
    }

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

/// What one read round trip brought back.
struct BatchRead {
    /// The values that came in time, in key order: one per key of a prefix of the keys.
    values: Vec<Option<Vec<u8>>>,
    /// Whether every key's value came (if not, the read asks for nothing more).
    complete: bool,
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
    /// The largest value written or read so far (bytes): the block size assumed by a read that
    /// is not told one; 0 until one is seen.
    value_bytes_seen: AtomicU64,
}

const READ: usize = 0;
const WRITE: usize = 1;

impl RedisTier {
    /// Most bytes one read round trip asks for: large enough that a round trip's fixed cost
    /// (~0.1 ms on loopback, ~0.5 ms across a LAN) is small against its transfer (4 ms at
    /// 1 GB/s), small enough that a late one loses about a dozen blocks, not the prefix.
    pub const READ_BATCH_BYTES: usize = 4 << 20; // 4 MiB

    /// The slowest transfer a read round trip is granted before it is late: half a gigabit
    /// link, so that only a stalled Redis (or a link far below that) misses its deadline.
    pub const READ_FLOOR_BYTES_PER_S: u64 = 50 << 20; // 50 MiB/s

    /// Block size assumed before any is known: the largest blocks (module docs of disk.rs).
    const DEFAULT_VALUE_BYTES: usize = 1 << 20; // 1 MiB

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
            value_bytes_seen: AtomicU64::new(0),
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
            Ok(Conn::Cluster(Box::new(c[which].get_connection()?)))
        }
    }

    /// `Err(Unavailable)` while the circuit is open.
    fn check_circuit(&self) -> Result<(), TierError> {
        let b = self.breaker.lock().unwrap_or_else(|e| e.into_inner());
        if b.open_until.is_some_and(|t| Instant::now() < t) {
            return Err(TierError::Unavailable(self.name));
        }
        Ok(())
    }

    /// Closes the circuit after a call that worked.
    fn succeeded(&self) {
        let mut b = self.breaker.lock().unwrap_or_else(|e| e.into_inner());
        b.failures = 0;
        b.open_until = None;
        b.backoff = BACKOFF_MIN;
    }

    /// Counts a failed call (in `timeouts` if `late`, else in `errors`) and opens the circuit
    /// after [`BREAKER_THRESHOLD`] in a row.
    fn failed(&self, e: &redis::RedisError, late: bool) -> TierError {
        let counter = if late {
            &self.counters.timeouts
        } else {
            &self.counters.errors
        };
        TierCounters::add(counter, 1);
        let mut b = self.breaker.lock().unwrap_or_else(|e| e.into_inner());
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
        TierError::Redis(e.to_string())
    }

    /// The connection in `slot`, connecting first if there is none.
    fn conn<'a>(
        &self,
        slot: &'a mut Option<Conn>,
        which: usize,
    ) -> redis::RedisResult<&'a mut Conn> {
        if slot.is_none() {
            *slot = Some(self.connect(which)?);
        }
        Ok(slot.as_mut().expect("connected above"))
    }

    /// Runs `pipe` on connection `which` under the breaker, waiting at most `timeout` for each
    /// part of the reply. A failure drops the connection (replies may still be on their way).
    fn run<T: redis::FromRedisValue>(
        &self,
        which: usize,
        pipe: &Batch,
        timeout: Duration,
    ) -> Result<T, TierError> {
        self.check_circuit()?;
        let mut slot = self.conns[which].lock().unwrap_or_else(|e| e.into_inner());
        let t0 = Instant::now();
        let result = self.conn(&mut slot, which).and_then(|c| {
            c.set_read_timeout(timeout)?;
            c.query(pipe)
        });
        match result {
            Ok(v) => {
                self.succeeded();
                Ok(v)
            }
            Err(e) => {
                *slot = None; // reconnect next time
                              // A cluster may wrap the socket's timeout in its own error: the clock decides.
                let late = e.is_timeout() || t0.elapsed() >= timeout;
                Err(self.failed(&e, late))
            }
        }
    }

    /// One read round trip under `deadline`. `Err` when no value came (or the circuit is open).
    fn read_batch(&self, keys: &[TierKey], deadline: Duration) -> Result<BatchRead, TierError> {
        self.check_circuit()?;
        let mut slot = self.conns[READ].lock().unwrap_or_else(|e| e.into_inner());
        let t0 = Instant::now();
        let mut values = Vec::with_capacity(keys.len());
        let result = self
            .conn(&mut slot, READ)
            .and_then(|c| c.get_until(keys, t0 + deadline, &mut values));
        let largest = values.iter().flatten().map(|v| v.len()).max().unwrap_or(0);
        self.saw_value(largest);
        match result {
            Ok(()) => {
                self.succeeded();
                Ok(BatchRead {
                    values,
                    complete: true,
                })
            }
            Err(e) => {
                *slot = None; // unread replies
                let err = self.failed(&e, e.is_timeout() || t0.elapsed() >= deadline);
                if values.is_empty() {
                    Err(err)
                } else {
                    Ok(BatchRead {
                        values,
                        complete: false,
                    })
                }
            }
        }
    }

    fn saw_value(&self, bytes: usize) {
        self.value_bytes_seen.fetch_max(bytes as u64, Relaxed);
    }

    /// The block size a read assumes when not told: the largest value seen, else 1 MiB.
    fn value_bytes_guess(&self) -> usize {
        match self.value_bytes_seen.load(Relaxed) {
            0 => Self::DEFAULT_VALUE_BYTES,
            n => n as usize,
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

/// `n` keys of about `value_bytes` each in read round trips of at most
/// [`RedisTier::READ_BATCH_BYTES`] and `max_keys` (one key at least): their index ranges, in
/// order.
fn read_batches(
    n: usize,
    value_bytes: usize,
    max_keys: usize,
) -> impl Iterator<Item = Range<usize>> {
    let per = (RedisTier::READ_BATCH_BYTES / value_bytes.max(1)).clamp(1, max_keys.max(1));
    (0..n).step_by(per).map(move |s| s..(s + per).min(n))
}

/// The deadline of a read round trip asking for `bytes`: `timeout` (the round trip and Redis's
/// own work) plus the transfer at [`RedisTier::READ_FLOOR_BYTES_PER_S`].
fn read_deadline(timeout: Duration, bytes: usize) -> Duration {
    timeout + Duration::from_secs_f64(bytes as f64 / RedisTier::READ_FLOOR_BYTES_PER_S as f64)
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
        self.get_many_sized(keys, self.value_bytes_guess())
    }

    /// Round trip after round trip (see the module docs) until one fails or is late: the keys
    /// from there on are `None`. `Err` when the first one fails (nothing was read).
    fn get_many_sized(
        &self,
        keys: &[TierKey],
        value_bytes: usize,
    ) -> Result<Vec<Option<Vec<u8>>>, TierError> {
        let mut out = Vec::with_capacity(keys.len());
        let max_keys = match self.config.target {
            RedisTarget::Single(_) => usize::MAX,
            RedisTarget::Cluster(_) => CLUSTER_READ_BATCH_KEYS,
        };
        for batch in read_batches(keys.len(), value_bytes, max_keys) {
            let deadline = read_deadline(self.config.read_timeout, batch.len() * value_bytes);
            match self.read_batch(&keys[batch], deadline) {
                Ok(read) => {
                    out.extend(read.values);
                    if !read.complete {
                        break;
                    }
                }
                Err(e) if out.is_empty() => return Err(e),
                Err(_) => break,
            }
        }
        out.resize(keys.len(), None);
        Ok(out)
    }

    fn put(&self, key: &TierKey, value: &[u8]) -> Result<(), TierError> {
        let mut p = Batch::new(true);
        p.add("SET")
            .arg(Self::redis_key(key))
            .arg(value)
            .arg("EX")
            .arg(self.ttl_secs());
        self.saw_value(value.len());
        self.run::<()>(WRITE, &p, self.config.write_timeout)
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
        self.saw_value(entries.iter().map(|e| e.1.len()).max().unwrap_or(0));
        self.run::<()>(WRITE, &p, self.config.write_timeout)
    }

    fn contains(&self, key: &TierKey) -> Result<bool, TierError> {
        let mut p = Batch::new(false);
        p.add("EXISTS").arg(Self::redis_key(key));
        let v: Vec<u32> = self.run(WRITE, &p, self.config.write_timeout)?;
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
        let v: Vec<u32> = self.run(WRITE, &p, self.config.write_timeout)?;
        Ok(v.into_iter().map(|n| n > 0).collect())
    }

    fn delete(&self, key: &TierKey) -> Result<(), TierError> {
        let mut p = Batch::new(true);
        p.add("DEL").arg(Self::redis_key(key));
        self.run::<()>(WRITE, &p, self.config.write_timeout)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_are_cut_into_round_trips_of_at_most_4_mib() {
        let block = 360_600; // a 352 KiB block and its header
        let batches: Vec<Range<usize>> = read_batches(99, block, usize::MAX).collect();
        assert_eq!(batches.len(), 9);
        assert_eq!(batches[0], 0..11);
        assert_eq!(batches[8], 88..99);
        assert!(batches
            .iter()
            .all(|b| b.len() * block <= RedisTier::READ_BATCH_BYTES));
        // A block larger than a round trip still goes, alone; nothing asked, nothing sent.
        let all = |n, bytes, max| read_batches(n, bytes, max).collect::<Vec<_>>();
        assert_eq!(all(3, 8 << 20, usize::MAX), [0..1, 1..2, 2..3]);
        assert_eq!(all(0, block, usize::MAX), []);
        assert_eq!(all(5, 0, usize::MAX), [Range { start: 0, end: 5 }]);
        // A cluster's round trips are bounded in keys too.
        assert_eq!(
            all(40, 1024, CLUSTER_READ_BATCH_KEYS),
            [0..16, 16..32, 32..40]
        );
    }

    #[test]
    fn a_deadline_is_the_timeout_plus_the_bytes_at_50_mib_per_s() {
        let t = Duration::from_millis(100);
        assert_eq!(read_deadline(t, 0), t);
        let d = read_deadline(t, 4 << 20);
        assert_eq!(d.as_millis(), 180, "4 MiB at 50 MiB/s is 80 ms");
    }
}
