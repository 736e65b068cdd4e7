//! Real Redis servers for tests: `redis-server` from the system's package (CI installs it),
//! started on free loopback ports in a temporary directory and killed on drop. No mock stands
//! in for Redis. Tests that need one call [`RedisServer::start`]; without `redis-server` they
//! fail with a message saying how to install it.

use std::io;
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A port free on 127.0.0.1 right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

/// A port free on 127.0.0.1 whose cluster bus port (+10000) is free too.
pub fn free_cluster_port() -> u16 {
    use rand::Rng;
    loop {
        let p: u16 = rand::rng().random_range(20000..40000);
        let free = |p: u16| TcpListener::bind(("127.0.0.1", p)).is_ok();
        if free(p) && free(p + 10000) {
            return p;
        }
    }
}

/// One redis-server child process.
pub struct RedisServer {
    child: Option<Child>,
    /// Its port on 127.0.0.1.
    pub port: u16,
    dir: PathBuf,
    cluster: bool,
}

fn redis_missing(e: io::Error) -> io::Error {
    io::Error::new(
        e.kind(),
        format!("starting redis-server: {e}; install it (Debian: apt-get install redis-server)"),
    )
}

impl RedisServer {
    /// A plain server on a free port, persistence off.
    pub fn start() -> io::Result<Self> {
        Self::start_on(free_port(), false)
    }

    /// A server on `port` (a restart reuses it), as a cluster node if `cluster`.
    pub fn start_on(port: u16, cluster: bool) -> io::Result<Self> {
        let dir = std::env::temp_dir().join(format!("kvinfer-redis-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let mut cmd = Command::new("redis-server");
        cmd.args([
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ])
        .args(["--enable-debug-command", "local"])
        .arg("--dir")
        .arg(&dir)
        .arg("--logfile")
        .arg(dir.join("redis.log"))
        .stdout(Stdio::null())
        .stderr(Stdio::null());
        if cluster {
            cmd.args([
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                "nodes.conf",
            ]);
        }
        let child = cmd.spawn().map_err(redis_missing)?;
        let s = Self {
            child: Some(child),
            port,
            dir,
            cluster,
        };
        s.wait_ready()?;
        Ok(s)
    }

    fn wait_ready(&self) -> io::Result<()> {
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(10) {
            if self.cli(&["PING"]).is_ok_and(|o| o.trim() == "PONG") {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let log = std::fs::read_to_string(self.dir.join("redis.log")).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(5).collect();
        Err(io::Error::other(format!(
            "redis-server on {} never answered; its log ends: {tail:?}",
            self.port
        )))
    }

    /// `redis://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Runs `redis-cli -p PORT args...`; its stdout.
    pub fn cli(&self, args: &[&str]) -> io::Result<String> {
        let out = Command::new("redis-cli")
            .args(["-p", &self.port.to_string()])
            .args(args)
            .output()?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Kills the server at once (SIGKILL).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it again on the same port (empty: persistence is off).
    pub fn restart(&mut self) -> io::Result<()> {
        self.kill();
        *self = Self::start_on(self.port, self.cluster)?;
        Ok(())
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A Redis Cluster of `n` masters (no replicas), made with `redis-cli --cluster create`.
pub struct RedisCluster {
    /// Its nodes.
    pub nodes: Vec<RedisServer>,
}

impl RedisCluster {
    /// Starts `n >= 3` nodes and joins them into a cluster; waits until it serves.
    pub fn start(n: usize) -> io::Result<Self> {
        let nodes = (0..n)
            .map(|_| RedisServer::start_on(free_cluster_port(), true))
            .collect::<io::Result<Vec<_>>>()?;
        let addrs: Vec<String> = nodes
            .iter()
            .map(|s| format!("127.0.0.1:{}", s.port))
            .collect();
        let out = Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(&addrs)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()?;
        if !out.success() {
            return Err(io::Error::other("redis-cli --cluster create failed"));
        }
        let c = Self { nodes };
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(20) {
            let ok = c.nodes.iter().all(|s| {
                s.cli(&["CLUSTER", "INFO"])
                    .is_ok_and(|o| o.contains("cluster_state:ok"))
            });
            if ok {
                return Ok(c);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Err(io::Error::other(
            "the cluster never reached cluster_state:ok",
        ))
    }

    /// `HOST:PORT` of every node.
    pub fn addrs(&self) -> Vec<String> {
        self.nodes
            .iter()
            .map(|s| format!("127.0.0.1:{}", s.port))
            .collect()
    }
}
