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

/// A free TCP port on 127.0.0.1 (free when asked; another process may take it after).
pub fn free_port() -> u16 {
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
        loop {
            if ping(self.port) {
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
