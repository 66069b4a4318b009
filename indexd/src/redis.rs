//! The Redis index client: one Redis server or a Redis Cluster behind one type.
//!
//! Every operation takes a whole batch and pipelines it: for a single server the batch is
//! written in one go and the replies are read back (one round trip per call); for a cluster the
//! `redis` crate groups the commands per node, sends every group, then reads the replies back
//! (one round trip per node).
//!
//! | operation | command per element | used for |
//! |---|---|---|
//! | [`Redis::set_nx_many`] | `SET key "1" NX EX ttl` | source site: is this VM the first to send this content? |
//! | [`Redis::sadd_many`] | `SADD key member` | destination: this VMM now holds the content |
//! | [`Redis::srem_many`] | `SREM key member` | destination: this VMM no longer holds it |
//! | [`Redis::srandmember_many`] | `SRANDMEMBER key` | destination: which peer to fetch from |
//! | [`Redis::smembers_many`] | `SMEMBERS key` | destination: every holder (after a failed fetch) |
//! | [`Redis::set_many`] | `SET key value` | image repository: publish an image's chunk index ([`crate::repo`]) |
//! | [`Redis::get_many`] | `GET key` | image repository: load an image's chunk index |
//!
//! Keys are binary (the caller's prefix and the raw digest); members are `host:port` strings;
//! `SET`/`GET` values are binary.
//!
//! # Connections and failures
//!
//! Connections use `TCP_NODELAY`, a connect timeout of [`CONNECT_TIMEOUT`] and read/write
//! timeouts of [`IO_TIMEOUT`]. After a connection error the connection is dropped and the next
//! call reconnects, so a restarted Redis works again without restarting the caller. A call that
//! fails on a connection that had been idle (a server restarted since the last call) is retried
//! once on a fresh connection when that is safe: always for the idempotent commands; for
//! `SET NX` when the server had answered no command of the batch (single server) or the
//! connection was found closed (cluster). The one imprecision left: a cluster connection that
//! drops after a node ran part of a batch without losing its data makes the retry report keys
//! this caller had just claimed as not new — the page then reaches the destination by the
//! slower path (pulled from the source), never wrongly. Timeouts are never retried.

use std::time::Duration;

use ::redis::cluster::{cluster_pipe, ClusterClientBuilder, ClusterConnection};
use ::redis::io::tcp::TcpSettings;
use ::redis::{Connection, ConnectionInfo, IntoConnectionInfo, Value};
use thiserror::Error;

/// Connect timeout (per node for a cluster: the budget is shared between the seed nodes).
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Read and write timeout of every connection.
pub const IO_TIMEOUT: Duration = Duration::from_secs(5);

/// Errors of this module.
#[derive(Debug, Error)]
pub enum RedisError {
    /// A URL of the target that does not parse.
    #[error("bad Redis URL {url:?}: {reason}")]
    BadUrl {
        /// The URL as given.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// Connecting (or the handshake, or the cluster's slot discovery) failed.
    #[error("cannot connect to Redis {target}: {source}")]
    Connect {
        /// The target, as URLs.
        target: String,
        /// The client library's error.
        source: ::redis::RedisError,
    },
    /// A command of a batch failed (I/O error, timeout, or an error reply).
    #[error("Redis {op} on {target} failed: {source}")]
    Command {
        /// The command.
        op: &'static str,
        /// The target, as URLs.
        target: String,
        /// The client library's error.
        source: ::redis::RedisError,
    },
    /// A reply of an unexpected type or length.
    #[error("unexpected Redis reply to {op} from {target}: {reply}")]
    Reply {
        /// The command.
        op: &'static str,
        /// The target, as URLs.
        target: String,
        /// What came back.
        reply: String,
    },
}

/// Where the index lives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    /// One Redis server, as a `redis://host:port` URL.
    Single(String),
    /// A Redis Cluster, as the URLs of some of its nodes (seeds).
    Cluster(Vec<String>),
}

impl Target {
    /// `"redis://host:port"` → [`Target::Single`]; `"redis://a:1,redis://b:2,redis://c:3"`
    /// (comma-separated) → [`Target::Cluster`]. A bad URL is an error naming it.
    pub fn parse(s: &str) -> Result<Target, RedisError> {
        let urls: Vec<String> = s.split(',').map(|u| u.trim().to_string()).collect();
        for u in &urls {
            check_url(u)?;
        }
        if urls.len() == 1 {
            Ok(Target::Single(urls.into_iter().next().unwrap_or_default()))
        } else {
            Ok(Target::Cluster(urls))
        }
    }

    /// The URLs of the target.
    pub fn urls(&self) -> Vec<String> {
        match self {
            Target::Single(u) => vec![u.clone()],
            Target::Cluster(v) => v.clone(),
        }
    }
}

/// Shown with every URL's user and password masked (`redis://***@host:port`): targets end up in
/// error messages, warnings and reports.
impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::Single(u) => f.write_str(&redact(u, u)),
            Target::Cluster(v) => write!(f, "cluster {}", redact(&v.join(","), &v.join(","))),
        }
    }
}

fn check_url(u: &str) -> Result<(), RedisError> {
    let bad = |reason: &str| RedisError::BadUrl { url: u.to_string(), reason: reason.to_string() };
    if u.is_empty() {
        return Err(bad("empty URL"));
    }
    let Some(url) = ::redis::parse_redis_url(u) else {
        return Err(bad("not a URL (expected redis://host:port)"));
    };
    if url.scheme() != "redis" {
        return Err(bad("only the redis:// scheme is supported"));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(bad("no host"));
    }
    // The port is always written out: a site runs several Redis servers (coordination and
    // index) on one host, and a forgotten port would silently pick the default one.
    if url.port().is_none() {
        return Err(bad("no :PORT (expected redis://host:port)"));
    }
    Ok(())
}

fn connection_info(url: &str) -> Result<ConnectionInfo, RedisError> {
    let info =
        url.into_connection_info().map_err(|e| RedisError::BadUrl { url: url.to_string(), reason: e.to_string() })?;
    Ok(info.set_tcp_settings(TcpSettings::default().set_nodelay(true)))
}

enum Conn {
    Single(Connection),
    Cluster(Box<ClusterConnection>),
}

/// A connection to the index (see the module documentation).
pub struct Redis {
    target: Target,
    name: String,
    conn: Option<Conn>,
    /// Whether `conn` has not served a call yet (a failure on it is not a stale connection).
    fresh: bool,
}

impl std::fmt::Debug for Redis {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Redis").field("target", &self.name).field("connected", &self.conn.is_some()).finish()
    }
}

/// One pipelined command per element, ready for either connection kind.
struct Batch {
    op: &'static str,
    /// Whether running the batch twice is harmless.
    idempotent: bool,
    single: ::redis::Pipeline,
    cluster: ::redis::cluster::ClusterPipeline,
    len: usize,
}

impl Batch {
    fn new(op: &'static str, idempotent: bool) -> Batch {
        Batch { op, idempotent, single: ::redis::pipe(), cluster: cluster_pipe(), len: 0 }
    }

    /// `op key` for every key (an idempotent read).
    fn per_key(op: &'static str, keys: &[Vec<u8>]) -> Batch {
        let mut b = Batch::new(op, true);
        for k in keys {
            b.push(&[k]);
        }
        b
    }

    fn push(&mut self, args: &[&[u8]]) {
        let c = self.single.cmd(self.op);
        for a in args {
            c.arg(*a);
        }
        let c = self.cluster.cmd(self.op);
        for a in args {
            c.arg(*a);
        }
        self.len += 1;
    }
}

/// How a pipelined batch failed.
struct Failure {
    error: ::redis::RedisError,
    /// Replies read before the failure (single server only; `usize::MAX` when unknown).
    answered: usize,
}

impl RedisError {
    /// Whether the server refused this client's credentials (a wrong or missing password): a
    /// configuration error, not an outage.
    pub fn is_auth(&self) -> bool {
        let source = match self {
            RedisError::Connect { source, .. } | RedisError::Command { source, .. } => source,
            _ => return false,
        };
        source.kind() == ::redis::ErrorKind::AuthenticationFailed
            || matches!(source.code(), Some("NOAUTH" | "WRONGPASS"))
            || source.to_string().contains("NOAUTH")
    }
}

impl Redis {
    /// `PING`: whether the server answers this client (a server that wants a password it was
    /// not given refuses it). For a cluster, connecting already asked every seed node for its
    /// slots, which needs the same: nothing more is sent (a `PING` has no slot to route by).
    pub fn ping(&mut self) -> Result<(), RedisError> {
        if matches!(self.target, Target::Cluster(_)) {
            return Ok(());
        }
        let mut b = Batch::new("PING", true);
        b.push(&[]);
        self.run(&b).map(|_| ())
    }

    /// Connects to `target`; fails within about [`CONNECT_TIMEOUT`] when it is unreachable.
    pub fn connect(target: &Target) -> Result<Redis, RedisError> {
        let mut r = Redis { target: target.clone(), name: target.to_string(), conn: None, fresh: true };
        r.reconnect()?;
        Ok(r)
    }

    /// The target this client talks to.
    pub fn target(&self) -> &Target {
        &self.target
    }

    fn reconnect(&mut self) -> Result<(), RedisError> {
        self.conn = None;
        let err = |source| RedisError::Connect { target: self.name.clone(), source };
        let conn = match &self.target {
            Target::Single(url) => {
                let client = ::redis::Client::open(connection_info(url)?).map_err(err)?;
                let c = client.get_connection_with_timeout(CONNECT_TIMEOUT).map_err(err)?;
                c.set_read_timeout(Some(IO_TIMEOUT)).map_err(err)?;
                c.set_write_timeout(Some(IO_TIMEOUT)).map_err(err)?;
                Conn::Single(c)
            }
            Target::Cluster(urls) => {
                let infos = urls.iter().map(|u| connection_info(u)).collect::<Result<Vec<_>, _>>()?;
                let per_node = (CONNECT_TIMEOUT / infos.len().max(1) as u32).max(Duration::from_millis(500));
                let client = ClusterClientBuilder::new(infos)
                    .connection_timeout(per_node)
                    .response_timeout(IO_TIMEOUT)
                    .tcp_settings(TcpSettings::default().set_nodelay(true))
                    .build()
                    .map_err(err)?;
                let c = client.get_connection().map_err(err)?;
                c.set_write_timeout(Some(IO_TIMEOUT)).map_err(err)?;
                Conn::Cluster(Box::new(c))
            }
        };
        self.conn = Some(conn);
        self.fresh = true;
        Ok(())
    }

    /// Runs `batch`, reconnecting first if the last call broke the connection, and retrying once
    /// on a fresh connection when the failure looks like a stale one and a retry is safe.
    fn run(&mut self, batch: &Batch) -> Result<Vec<Value>, RedisError> {
        if batch.len == 0 {
            return Ok(Vec::new());
        }
        for attempt in 0..2 {
            if self.conn.is_none() {
                self.reconnect()?;
            }
            let was_fresh = std::mem::replace(&mut self.fresh, false);
            let result = match self.conn.as_mut() {
                Some(Conn::Single(c)) => run_single(c, batch),
                Some(Conn::Cluster(c)) => {
                    batch.cluster.query::<Vec<Value>>(c).map_err(|error| Failure { error, answered: usize::MAX })
                }
                None => unreachable!("connected above"),
            };
            let f = match result {
                Ok(values) if values.len() == batch.len => return Ok(values),
                Ok(values) => {
                    self.conn = None;
                    return Err(
                        self.reply_error(batch.op, format!("{} replies to {} commands", values.len(), batch.len))
                    );
                }
                Err(f) => f,
            };
            let connection_level = is_connection_error(&f.error);
            if connection_level {
                self.conn = None;
            }
            let stale = connection_level && !was_fresh && !f.error.is_timeout();
            // SET NX is retried only when no command of the batch can have run: the server
            // answered none (single server), or, for a cluster (which does not say), the
            // connection was found closed — a node restarted since the last call.
            let safe =
                batch.idempotent || f.answered == 0 || (f.answered == usize::MAX && f.error.is_connection_dropped());
            if attempt == 0 && stale && safe {
                tracing::debug!(target = %self.name, op = batch.op, error = %f.error, "Redis connection lost; retrying on a new one");
                continue;
            }
            return Err(RedisError::Command { op: batch.op, target: self.name.clone(), source: f.error });
        }
        unreachable!("the second attempt returns")
    }

    fn reply_error(&self, op: &'static str, reply: String) -> RedisError {
        RedisError::Reply { op, target: self.name.clone(), reply }
    }

    /// Pipelined `SET key "1" NX EX ttl_s` for every key. `Ok(v)`: `v[i]` is true when key `i`
    /// was newly set (this caller is the first). A `ttl_s` of 0 sets no expiry.
    pub fn set_nx_many(&mut self, keys: &[Vec<u8>], ttl_s: u64) -> Result<Vec<bool>, RedisError> {
        let mut b = Batch::new("SET", false);
        let ttl = ttl_s.to_string();
        for k in keys {
            if ttl_s == 0 {
                b.push(&[k, b"1", b"NX"]);
            } else {
                b.push(&[k, b"1", b"NX", b"EX", ttl.as_bytes()]);
            }
        }
        self.run(&b)?
            .into_iter()
            .map(|v| match v {
                Value::Okay => Ok(true),
                Value::SimpleString(s) if s == "OK" => Ok(true),
                Value::Nil => Ok(false),
                other => Err(self.reply_error("SET NX", format!("{other:?}"))),
            })
            .collect()
    }

    /// Pipelined `SADD key member` for every `(key, member)`.
    pub fn sadd_many(&mut self, entries: &[(Vec<u8>, String)]) -> Result<(), RedisError> {
        self.set_op("SADD", entries)
    }

    /// Pipelined `SREM key member` for every `(key, member)`.
    pub fn srem_many(&mut self, entries: &[(Vec<u8>, String)]) -> Result<(), RedisError> {
        self.set_op("SREM", entries)
    }

    fn set_op(&mut self, op: &'static str, entries: &[(Vec<u8>, String)]) -> Result<(), RedisError> {
        let mut b = Batch::new(op, true);
        for (k, m) in entries {
            b.push(&[k, m.as_bytes()]);
        }
        for v in self.run(&b)? {
            if !matches!(v, Value::Int(_)) {
                return Err(self.reply_error(op, format!("{v:?}")));
            }
        }
        Ok(())
    }

    /// Pipelined `SRANDMEMBER key` for every key: a random holder, or `None` when the set is
    /// empty or absent.
    pub fn srandmember_many(&mut self, keys: &[Vec<u8>]) -> Result<Vec<Option<String>>, RedisError> {
        self.run(&Batch::per_key("SRANDMEMBER", keys))?
            .into_iter()
            .map(|v| match v {
                Value::Nil => Ok(None),
                v => self.member(v, "SRANDMEMBER").map(Some),
            })
            .collect()
    }

    /// Pipelined `SMEMBERS key` for every key: every holder (empty when none).
    pub fn smembers_many(&mut self, keys: &[Vec<u8>]) -> Result<Vec<Vec<String>>, RedisError> {
        self.run(&Batch::per_key("SMEMBERS", keys))?
            .into_iter()
            .map(|v| match v {
                Value::Array(items) | Value::Set(items) => {
                    items.into_iter().map(|m| self.member(m, "SMEMBERS")).collect()
                }
                Value::Nil => Ok(Vec::new()),
                other => Err(self.reply_error("SMEMBERS", format!("{other:?}"))),
            })
            .collect()
    }

    /// Pipelined `SET key value` (no expiry) for every `(key, value)`; keys and values are binary.
    pub fn set_many(&mut self, entries: &[(Vec<u8>, Vec<u8>)]) -> Result<(), RedisError> {
        let mut b = Batch::new("SET", true);
        for (k, v) in entries {
            b.push(&[k, v]);
        }
        for v in self.run(&b)? {
            match v {
                Value::Okay => {}
                Value::SimpleString(s) if s == "OK" => {}
                other => return Err(self.reply_error("SET", format!("{other:?}"))),
            }
        }
        Ok(())
    }

    /// Pipelined `GET key` for every key: the value, or `None` when the key is absent.
    pub fn get_many(&mut self, keys: &[Vec<u8>]) -> Result<Vec<Option<Vec<u8>>>, RedisError> {
        self.run(&Batch::per_key("GET", keys))?
            .into_iter()
            .map(|v| match v {
                Value::Nil => Ok(None),
                Value::BulkString(bytes) => Ok(Some(bytes)),
                Value::SimpleString(s) => Ok(Some(s.into_bytes())),
                other => Err(self.reply_error("GET", format!("{other:?}"))),
            })
            .collect()
    }

    fn member(&self, v: Value, op: &'static str) -> Result<String, RedisError> {
        match v {
            Value::BulkString(b) => {
                String::from_utf8(b).map_err(|e| self.reply_error(op, format!("member is not UTF-8: {e}")))
            }
            Value::SimpleString(s) => Ok(s),
            other => Err(self.reply_error(op, format!("{other:?}"))),
        }
    }
}

/// Writes the whole pipeline, then reads one reply per command.
fn run_single(c: &mut Connection, batch: &Batch) -> Result<Vec<Value>, Failure> {
    let packed = batch.single.get_packed_pipeline();
    c.send_packed_command(&packed).map_err(|error| Failure { error, answered: 0 })?;
    let mut out = Vec::with_capacity(batch.len);
    let mut first_error = None;
    for i in 0..batch.len {
        match c.recv_response() {
            Ok(Value::ServerError(e)) => {
                // An error reply to one command: keep reading so the connection stays in step.
                first_error.get_or_insert(::redis::RedisError::from(e));
                out.push(Value::Nil);
            }
            Ok(v) => out.push(v),
            Err(error) if !is_connection_error(&error) => {
                first_error.get_or_insert(error);
                out.push(Value::Nil);
            }
            Err(error) => return Err(Failure { error, answered: i }),
        }
    }
    match first_error {
        Some(error) => Err(Failure { error, answered: batch.len }),
        None => Ok(out),
    }
}

/// Whether the error leaves the connection unusable (I/O, dropped, timeout, protocol).
fn is_connection_error(e: &::redis::RedisError) -> bool {
    e.is_io_error()
        || e.is_connection_dropped()
        || e.is_connection_refusal()
        || e.is_timeout()
        || e.is_unrecoverable_error()
        || matches!(e.kind(), ::redis::ErrorKind::Parse)
}

/// `msg` with the userinfo (user and password) of every URL of `index` replaced by `***`.
pub fn redact(msg: &str, index: &str) -> String {
    let mut out = msg.to_string();
    for url in index.split(',').map(str::trim) {
        let Some(start) = url.find("://").map(|i| i + 3) else { continue };
        let rest = &url[start..];
        let authority = &rest[..rest.find('/').unwrap_or(rest.len())];
        let Some(at) = authority.rfind('@') else { continue };
        let userinfo = &authority[..at];
        if userinfo.is_empty() {
            continue;
        }
        // As written, and as `{:?}` escapes it (the URL errors quote the URL).
        let debug = format!("{userinfo:?}");
        let escaped = &debug[1..debug.len() - 1];
        for form in [userinfo, escaped] {
            out = out.replace(&format!("://{form}@"), "://***@");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redact_hides_userinfo() {
        let idx = "redis://user:s3cret@h:1,redis://:p\"w@h:2,redis://h:3";
        let msg = "cannot connect to Redis cluster redis://user:s3cret@h:1,redis://:p\"w@h:2,redis://h:3: refused; \
                   bad Redis URL \"redis://:p\\\"w@h:2\"";
        let r = redact(msg, idx);
        assert!(!r.contains("s3cret") && !r.contains("p\"w") && !r.contains("p\\\"w"), "{r}");
        assert!(r.contains("redis://***@h:1") && r.contains("redis://***@h:2") && r.contains("redis://h:3"), "{r}");
        assert_eq!(redact("plain", "redis://h:1"), "plain");
        assert_eq!(Target::parse("redis://:pw@h:1").unwrap().to_string(), "redis://***@h:1");
    }

    #[test]
    fn parse_single_and_cluster() {
        assert_eq!(Target::parse("redis://127.0.0.1:6379").unwrap(), Target::Single("redis://127.0.0.1:6379".into()));
        assert_eq!(
            Target::parse("redis://a:1,redis://b:2, redis://c:3").unwrap(),
            Target::Cluster(vec!["redis://a:1".into(), "redis://b:2".into(), "redis://c:3".into()])
        );
        assert!(Target::parse("redis://h").unwrap_err().to_string().contains("no :PORT"));
        assert_eq!(Target::parse("redis://h:1").unwrap().urls(), vec!["redis://h:1".to_string()]);
    }

    #[test]
    fn parse_errors_name_the_url() {
        for bad in [
            "",
            "localhost:6379",
            "http://h:1",
            "redis://",
            "redis://a:1,",
            "redis://a:1,nope",
            "redis://h:99999",
            "redis://h:",
        ] {
            let e = Target::parse(bad).expect_err(bad);
            assert!(matches!(e, RedisError::BadUrl { .. }), "{bad}: {e}");
            let culprit = bad.rsplit(',').next().unwrap_or(bad);
            assert!(e.to_string().contains(&format!("{culprit:?}")), "{bad}: {e}");
        }
    }
}
