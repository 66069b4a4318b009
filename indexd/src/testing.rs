//! Real `redis-server` processes for tests and benchmarks: a single server or a three-node
//! Redis Cluster on free loopback ports, each in its own temporary directory, with persistence
//! off (`--save "" --appendonly no`), killed (and the directory removed) on drop, also when a
//! test panics.
//!
//! Needs `redis-server` (Debian package `redis-server`) and, for a cluster, `redis-cli`
//! (`redis-tools`); fails with a message saying so when they are missing.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use thiserror::Error;

/// How long a server or a cluster may take to come up before it is a failure.
const READY_WITHIN: Duration = Duration::from_secs(30);

/// Errors of this module.
#[derive(Debug, Error)]
pub enum TestingError {
    /// A program is not installed.
    #[error("{program} is not installed (apt-get install {package}): {source}")]
    Missing {
        /// The program.
        program: &'static str,
        /// The Debian package providing it.
        package: &'static str,
        /// The spawn error.
        source: std::io::Error,
    },
    /// Something else went wrong.
    #[error("{0}")]
    Other(String),
}

/// A temporary directory removed on drop.
#[derive(Debug)]
pub struct TempDir(PathBuf);

impl TempDir {
    /// A new empty directory under the system's temporary directory.
    pub fn new(tag: &str) -> std::io::Result<TempDir> {
        static N: AtomicU64 = AtomicU64::new(0);
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
        let p = std::env::temp_dir().join(format!(
            "indexd-{tag}-{}-{}-{nanos}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&p)?;
        Ok(TempDir(p))
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Ports [`free_port`] hands out when the kernel's ephemeral range cannot be read.
const FALLBACK_POOL: (u16, u16) = (10_000, 32_768);
/// Ports each process gets to itself before it runs into the next process's block.
const BLOCK: u32 = 256;

/// The ports [`free_port`] hands out: below the kernel's ephemeral range
/// (`net.ipv4.ip_local_port_range`), where neither `bind(port 0)` nor an outgoing connection
/// of any process ever lands, from 10000 (or, when that range starts too low, above it).
fn pool() -> (u16, u16) {
    let range = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").ok().and_then(|t| {
        let mut it = t.split_whitespace().map(|n| n.parse::<u32>().ok());
        Some((it.next()??, it.next()??))
    });
    match range {
        Some((lo, _)) if lo >= u32::from(FALLBACK_POOL.0) + 4 * BLOCK => (FALLBACK_POOL.0, lo as u16),
        Some((_, hi)) if hi + 4 * BLOCK < 65_535 => ((hi + 1) as u16, 65_535),
        _ => FALLBACK_POOL,
    }
}

/// The `n`-th port of this process in a pool of `span` ports: processes start at different
/// blocks (by process id), and a process walks on from its block through the whole pool.
fn nth_port(pool: (u16, u16), pid: u32, n: u32) -> u16 {
    let span = u32::from(pool.1 - pool.0);
    let blocks = (span / BLOCK).max(1);
    let start = (pid % blocks) * BLOCK;
    pool.0 + ((start + n) % span) as u16
}

/// A TCP port on 127.0.0.1 that is free now and unlikely to be taken before it is used: each call
/// gets the next port of a process-wide sequence outside the kernel's ephemeral range (so no
/// ephemeral bind or connection of another process lands on it), starting at a block chosen
/// by the process id (so concurrent test processes use different ports), checked with a bind.
/// Another program choosing fixed ports may still take it before the caller binds: servers
/// started on it should retry on another port when the bind fails, as [`RedisServer`] does.
pub fn free_port() -> u16 {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let pool = pool();
    let span = u64::from(pool.1 - pool.0);
    for _ in 0..span {
        let n = (NEXT.fetch_add(1, Ordering::Relaxed) % span) as u32;
        let port = nth_port(pool, std::process::id(), n);
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    // Every port of the pool is in use: one the kernel finds free.
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("cannot bind an ephemeral loopback port")
}

/// One `redis-server` process.
#[derive(Debug)]
pub struct RedisServer {
    port: u16,
    dir: TempDir,
    extra: Vec<String>,
    child: Option<Child>,
}

impl RedisServer {
    /// Starts a standalone server on a free loopback port.
    pub fn start() -> Result<RedisServer, TestingError> {
        Self::start_with(&[])
    }

    /// Starts a server with extra command-line arguments.
    pub fn start_with(extra: &[&str]) -> Result<RedisServer, TestingError> {
        let mut last = String::new();
        // The port is free when chosen but may be taken before the server binds it: try again.
        for _ in 0..5 {
            let mut s = RedisServer {
                port: free_port(),
                dir: TempDir::new("redis").map_err(|e| TestingError::Other(format!("temp dir: {e}")))?,
                extra: extra.iter().map(|s| s.to_string()).collect(),
                child: None,
            };
            match s.spawn() {
                Ok(()) => return Ok(s),
                Err(TestingError::Other(m)) => last = m,
                Err(e) => return Err(e),
            }
        }
        Err(TestingError::Other(format!("redis-server did not start: {last}")))
    }

    fn spawn(&mut self) -> Result<(), TestingError> {
        let log = self.dir.path().join(format!("redis-{}.log", self.port));
        let mut cmd = Command::new("redis-server");
        cmd.arg("--port")
            .arg(self.port.to_string())
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--protected-mode", "no"])
            .arg("--dir")
            .arg(self.dir.path())
            .arg("--logfile")
            .arg(&log)
            .args(&self.extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let child = cmd.spawn().map_err(|source| TestingError::Missing {
            program: "redis-server",
            package: "redis-server",
            source,
        })?;
        self.child = Some(child);
        let deadline = Instant::now() + READY_WITHIN;
        let pid = self.child.as_ref().map(Child::id);
        loop {
            // Ready when the server answering on the port is this one (and not another
            // process that took the port first: this one then exits, and is started again).
            if ping(self.port) && server_pid(self.port) == pid {
                return Ok(());
            }
            if let Some(c) = self.child.as_mut() {
                if let Ok(Some(status)) = c.try_wait() {
                    self.child = None;
                    let tail = std::fs::read_to_string(&log).unwrap_or_default();
                    let tail: String = tail.lines().rev().take(5).collect::<Vec<_>>().join(" | ");
                    return Err(TestingError::Other(format!(
                        "redis-server on port {} exited ({status}): {tail}",
                        self.port
                    )));
                }
            }
            if Instant::now() > deadline {
                self.kill();
                return Err(TestingError::Other(format!("redis-server on port {} did not answer PING", self.port)));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `redis://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Kills the server (its data is lost: no persistence).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it again on the same port (after [`RedisServer::kill`]).
    pub fn restart(&mut self) -> Result<(), TestingError> {
        self.kill();
        self.spawn()
    }

    /// Runs `redis-cli -p PORT ARGS...` and returns its standard output.
    pub fn cli(&self, args: &[&str]) -> Result<String, TestingError> {
        redis_cli(&["-p", &self.port.to_string()], args)
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

fn redis_cli(conn: &[&str], args: &[&str]) -> Result<String, TestingError> {
    let out = Command::new("redis-cli")
        .args(["-h", "127.0.0.1"])
        .args(conn)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|source| TestingError::Missing { program: "redis-cli", package: "redis-tools", source })?;
    if !out.status.success() {
        return Err(TestingError::Other(format!(
            "redis-cli {args:?} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `PING` over a raw socket.
fn ping(port: u16) -> bool {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    if s.write_all(b"PING\r\n").is_err() {
        return false;
    }
    let mut b = [0u8; 7];
    s.read_exact(&mut b).is_ok() && &b == b"+PONG\r\n"
}

/// The process id of the Redis server answering on `port` (`INFO server`), over a raw socket.
fn server_pid(port: u16) -> Option<u32> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    s.write_all(b"INFO server\r\n").ok()?;
    // A bulk string: `$<len>\r\n<len bytes>\r\n`.
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n") {
        s.read_exact(&mut b).ok()?;
        head.push(b[0]);
        if head.len() > 32 {
            return None;
        }
    }
    let len: usize = std::str::from_utf8(head.strip_prefix(b"$")?).ok()?.trim().parse().ok()?;
    let mut body = vec![0u8; len];
    s.read_exact(&mut body).ok()?;
    String::from_utf8_lossy(&body)
        .lines()
        .find_map(|l| l.strip_prefix("process_id:"))
        .and_then(|p| p.trim().parse().ok())
}

/// A Redis Cluster of three masters (no replicas) on free loopback ports.
#[derive(Debug)]
pub struct RedisCluster {
    nodes: Vec<RedisServer>,
}

impl RedisCluster {
    /// Starts three `redis-server --cluster-enabled yes` processes, joins them with
    /// `redis-cli --cluster create`, and waits for `cluster_state:ok` on every node.
    pub fn start() -> Result<RedisCluster, TestingError> {
        let mut nodes = Vec::new();
        for i in 0..3 {
            let conf = format!("nodes-{i}.conf");
            nodes.push(RedisServer::start_with(&[
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                &conf,
                "--cluster-node-timeout",
                "5000",
            ])?);
        }
        let addrs: Vec<String> = nodes.iter().map(|n| format!("127.0.0.1:{}", n.port())).collect();
        let mut args = vec!["--cluster", "create"];
        args.extend(addrs.iter().map(String::as_str));
        args.extend(["--cluster-replicas", "0", "--cluster-yes"]);
        redis_cli(&[], &args)?;
        let cluster = RedisCluster { nodes };
        cluster.wait_ok()?;
        Ok(cluster)
    }

    /// Restarts node `i` on its port with its cluster configuration (its data is lost, its
    /// slots stay), and waits for `cluster_state:ok` everywhere.
    pub fn restart_node(&mut self, i: usize) -> Result<(), TestingError> {
        self.nodes[i].restart()?;
        self.wait_ok()
    }

    fn wait_ok(&self) -> Result<(), TestingError> {
        let deadline = Instant::now() + READY_WITHIN;
        for n in &self.nodes {
            loop {
                let info = n.cli(&["cluster", "info"])?;
                if info.lines().any(|l| l.trim() == "cluster_state:ok") {
                    break;
                }
                if Instant::now() > deadline {
                    return Err(TestingError::Other(format!("cluster node {} not ok: {info}", n.port())));
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        Ok(())
    }

    /// The nodes.
    pub fn nodes(&self) -> &[RedisServer] {
        &self.nodes
    }

    /// The nodes' URLs.
    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(RedisServer::url).collect()
    }

    /// `redis://a,redis://b,redis://c` (what [`crate::redis::Target::parse`] takes).
    pub fn target_string(&self) -> String {
        self.urls().join(",")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_come_from_a_per_process_block_outside_the_ephemeral_range() {
        let pool = (10_000, 32_768);
        let span = u32::from(pool.1 - pool.0);
        for pid in [1, 4242, 99_999] {
            let ports: std::collections::HashSet<u16> = (0..span).map(|n| nth_port(pool, pid, n)).collect();
            assert_eq!(ports.len(), span as usize, "every port of the pool once");
            assert!(ports.iter().all(|&p| (pool.0..pool.1).contains(&p)));
        }
        // Neighbouring processes start one block apart.
        assert_eq!(nth_port(pool, 7, 0) + BLOCK as u16, nth_port(pool, 8, 0));
        assert_eq!(nth_port(pool, 7, 1), nth_port(pool, 7, 0) + 1);
        let (lo, hi) = super::pool();
        assert!(lo < hi);
    }

    #[test]
    fn free_ports_are_distinct_bindable_and_not_ephemeral() {
        let eph = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").unwrap_or_default();
        let eph: Vec<u16> = eph.split_whitespace().filter_map(|n| n.parse().ok()).collect();
        let ports: Vec<u16> = (0..50).map(|_| free_port()).collect();
        let distinct: std::collections::HashSet<_> = ports.iter().collect();
        assert_eq!(distinct.len(), ports.len(), "{ports:?}");
        for p in ports {
            TcpListener::bind(("127.0.0.1", p)).unwrap();
            if let [lo, hi] = eph[..] {
                assert!(!(lo..=hi).contains(&p), "{p} is in the ephemeral range {lo}-{hi}");
            }
        }
    }

    #[test]
    fn a_server_is_ready_when_it_is_the_one_answering() {
        let s = RedisServer::start().unwrap();
        assert_eq!(server_pid(s.port()), s.child.as_ref().map(Child::id));
        // Another server asked for the same port does not mistake the first for itself.
        let mut other =
            RedisServer { port: s.port(), dir: TempDir::new("redis").unwrap(), extra: Vec::new(), child: None };
        match other.spawn() {
            Ok(()) => panic!("a server that could not bind port {} was taken for ready", s.port()),
            Err(e) => assert!(e.to_string().contains("exited"), "{e}"),
        }
    }
}
