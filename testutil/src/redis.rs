//! Real `redis-server` processes for tests and benchmarks: a single server or a three-node
//! Redis Cluster on free loopback ports, each in its own temporary directory, with persistence
//! off (`--save "" --appendonly no`), killed (and the directory removed) on drop, also when a
//! test panics.
//!
//! Needs `redis-server` (Debian package `redis-server`) and, for a cluster, `redis-cli`
//! (`redis-tools`); fails with a message saying so when they are missing.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use thiserror::Error;

use crate::fs::TempDir;
use crate::ports::free_port;
use crate::util::{tail_lines, wait_for};

/// How long a server or a cluster may take to come up before it is a failure.
const READY_WITHIN: Duration = Duration::from_secs(30);

/// Errors of this module.
#[derive(Debug, Error)]
pub enum RedisError {
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
    pub fn start() -> Result<RedisServer, RedisError> {
        Self::start_with(&[])
    }

    /// Starts a server with extra command-line arguments.
    pub fn start_with(extra: &[&str]) -> Result<RedisServer, RedisError> {
        let mut last = String::new();
        // The port is free when chosen but may be taken before the server binds it: try again.
        for _ in 0..5 {
            let mut s = RedisServer {
                port: free_port(),
                dir: TempDir::new("redis").map_err(|e| RedisError::Other(format!("temp dir: {e}")))?,
                extra: extra.iter().map(|s| s.to_string()).collect(),
                child: None,
            };
            match s.spawn() {
                Ok(()) => return Ok(s),
                Err(RedisError::Other(m)) => last = m,
                Err(e) => return Err(e),
            }
        }
        Err(RedisError::Other(format!("redis-server did not start: {last}")))
    }

    fn spawn(&mut self) -> Result<(), RedisError> {
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
        let child = cmd.spawn().map_err(|source| RedisError::Missing {
            program: "redis-server",
            package: "redis-server",
            source,
        })?;
        self.child = Some(child);
        let (port, pid) = (self.port, self.child.as_ref().map(Child::id));
        let child = &mut self.child;
        // Ready when the server answering on the port is this one (and not another process
        // that took the port first: this one then exits, and is started again).
        let ready = wait_for(&format!("redis-server on port {port} to answer PING"), READY_WITHIN.as_secs(), || {
            if ping(port) && server_pid(port) == pid {
                return Some(Ok(()));
            }
            child.as_mut().and_then(|c| c.try_wait().ok().flatten()).map(Err)
        });
        match ready {
            Ok(Ok(())) => Ok(()),
            Ok(Err(status)) => {
                self.child = None;
                let tail = tail_lines(&log, 5).lines().collect::<Vec<_>>().join(" | ");
                Err(RedisError::Other(format!("redis-server on port {port} exited ({status}): {tail}")))
            }
            Err(e) => {
                self.kill();
                Err(RedisError::Other(e.to_string()))
            }
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
    pub fn restart(&mut self) -> Result<(), RedisError> {
        self.kill();
        self.spawn()
    }

    /// Runs `redis-cli -p PORT ARGS...` and returns its standard output.
    pub fn cli(&self, args: &[&str]) -> Result<String, RedisError> {
        redis_cli(&["-p", &self.port.to_string()], args)
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

fn redis_cli(conn: &[&str], args: &[&str]) -> Result<String, RedisError> {
    let out = Command::new("redis-cli")
        .args(["-h", "127.0.0.1"])
        .args(conn)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|source| RedisError::Missing { program: "redis-cli", package: "redis-tools", source })?;
    if !out.status.success() {
        return Err(RedisError::Other(format!(
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

/// Whether `CLUSTER INFO` output says the cluster is ok.
pub(crate) fn cluster_state_ok(info: &str) -> bool {
    info.lines().any(|l| l.trim() == "cluster_state:ok")
}

/// A Redis Cluster of three masters (no replicas) on free loopback ports.
#[derive(Debug)]
pub struct RedisCluster {
    nodes: Vec<RedisServer>,
}

impl RedisCluster {
    /// Starts three `redis-server --cluster-enabled yes` processes, joins them with
    /// `redis-cli --cluster create`, and waits for `cluster_state:ok` on every node.
    pub fn start() -> Result<RedisCluster, RedisError> {
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
    pub fn restart_node(&mut self, i: usize) -> Result<(), RedisError> {
        self.nodes[i].restart()?;
        self.wait_ok()
    }

    fn wait_ok(&self) -> Result<(), RedisError> {
        let deadline = Instant::now() + READY_WITHIN;
        for n in &self.nodes {
            let mut info = String::new();
            // What is left of the deadline shared by all nodes.
            let secs = deadline.saturating_duration_since(Instant::now()).as_secs();
            let ok = wait_for(&format!("cluster_state:ok on node {}", n.port()), secs, || {
                match n.cli(&["cluster", "info"]) {
                    Ok(i) => info = i,
                    Err(e) => return Some(Err(e)),
                }
                cluster_state_ok(&info).then_some(Ok(()))
            });
            match ok {
                Ok(r) => r?,
                Err(_) => return Err(RedisError::Other(format!("cluster node {} not ok: {info}", n.port()))),
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

    /// `redis://a,redis://b,redis://c` (what `indexd::redis::Target::parse` takes).
    pub fn target_string(&self) -> String {
        self.urls().join(",")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
