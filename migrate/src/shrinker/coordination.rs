//! Shrinker's source half, coordination (the distributed deduplication): before a chunk leaves
//! for the destination site, its digest is registered in the source site's coordination Redis
//! with `SET key 1 NX EX ttl`. The first source to register a digest sends the chunk in full;
//! every later one (another VM of the cluster, or this VM for an intra-VM duplicate) sends only
//! the digest, and the destination site finds the content among its own hypervisors.
//!
//! Keys are `shrink:coord:<run>:<destination site>:<digest>` ([`super::keys`]; the run is
//! `<migration id>.<nonce>`, one per `shrink-migrate` run), so that one run's knowledge never
//! leaks into another's, and they expire (a failed migration leaves nothing
//! behind for long). Decisions are made for a whole group of chunks in one pipelined round trip.
//! If the coordination service fails, the migration degrades to plain pre-copy (everything in
//! full) with a warning — never to a wrong page.

use indexd::hash::{self, Algo};
use indexd::redis::{Redis, Target};

use crate::precopy::{Dedup, EndpointError};

/// Where and how to coordinate.
#[derive(Debug, Clone)]
pub struct DedupConfig {
    /// The source site's coordination Redis (one URL or several for a Redis Cluster); empty for
    /// none (a single VM's move: only the repository's content travels as digests).
    pub coordination: String,
    /// The run of the cluster migration (all VMs of one run share it: `<migration id>.<nonce>`).
    pub migration_id: String,
    /// The destination site.
    pub dest_site: String,
    /// Digest algorithm.
    pub algo: Algo,
    /// Key lifetime in seconds.
    pub ttl_s: u64,
}

/// Counters of the dedup decisions.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct DedupStats {
    /// Chunks hashed.
    pub hashed: u64,
    /// Chunks registered first (sent in full).
    pub first: u64,
    /// Chunks already registered (sent as a digest).
    pub duplicate: u64,
    /// Chunks sent in full because coordination failed.
    pub degraded: u64,
    /// Chunks sent as a digest because they equal content of the base image that the
    /// destination site's repository holds (no coordination needed).
    pub repository: u64,
    /// Why coordination is off, if it is.
    pub warning: Option<String>,
}

/// The coordination client.
pub struct RedisDedup {
    redis: Option<Redis>,
    /// Whether a coordination service was given (else only the repository's content dedups).
    coordinated: bool,
    /// The content of the disk's base image, and whether the destination's repository holds it.
    repo: Option<std::sync::Arc<indexd::repo::RepoIndex>>,
    repo_held: bool,
    algo: Algo,
    prefix: Vec<u8>,
    ttl_s: u64,
    /// Shared with whoever reports on the migration.
    pub stats: std::sync::Arc<std::sync::Mutex<DedupStats>>,
}

impl RedisDedup {
    /// Connects to the coordination service. When it cannot be reached, the returned value
    /// sends everything in full and says why in its stats.
    pub fn new(cfg: &DedupConfig) -> RedisDedup {
        match Self::connect(cfg) {
            Ok(d) => d,
            Err(e) => {
                let d = Self::connect(&DedupConfig { coordination: String::new(), ..cfg.clone() })
                    .expect("no coordination: nothing to refuse");
                d.stats.lock().expect("dedup stats poisoned").warning =
                    Some(indexd::redis::redact(&e.to_string(), &cfg.coordination));
                d
            }
        }
    }

    /// As [`RedisDedup::new`], but a coordination service that refuses this client's
    /// password is an error (a configuration to fix, not an outage to go through). An
    /// unreachable one still degrades to plain pre-copy.
    pub fn connect(cfg: &DedupConfig) -> Result<RedisDedup, indexd::redis::RedisError> {
        let stats = std::sync::Arc::new(std::sync::Mutex::new(DedupStats::default()));
        let redis = match Target::parse(&cfg.coordination)
            .and_then(|t| Redis::connect(&t).and_then(|mut r| r.ping().map(|()| r)))
        {
            _ if cfg.coordination.is_empty() => None,
            Ok(r) => Some(r),
            Err(e) if e.is_auth() => return Err(e),
            Err(e) => {
                let msg = format!("coordination Redis {} unreachable ({e}): plain pre-copy", cfg.coordination);
                // (Never a password in a warning.)
                let msg = indexd::redis::redact(&msg, &cfg.coordination);
                tracing::warn!("{msg}");
                stats.lock().expect("dedup stats poisoned").warning = Some(msg);
                None
            }
        };
        let prefix = super::keys::coordination_prefix(&cfg.migration_id, &cfg.dest_site);
        let coordinated = !cfg.coordination.is_empty();
        Ok(RedisDedup {
            redis,
            coordinated,
            repo: None,
            repo_held: false,
            algo: cfg.algo,
            prefix,
            ttl_s: cfg.ttl_s,
            stats,
        })
    }

    /// The content of the source disk's base image (its digests must be of this migration's
    /// algorithm and chunk size): once the destination says its repository holds the image,
    /// chunks equal to its content travel as digests, without coordination.
    pub fn with_repository(mut self, repo: std::sync::Arc<indexd::repo::RepoIndex>) -> RedisDedup {
        self.repo = Some(repo);
        self
    }
}

impl Dedup for RedisDedup {
    fn decide(&mut self, chunks: &[(u64, &[u8])]) -> Result<Vec<Option<Vec<u8>>>, EndpointError> {
        let repo = self.repo.as_ref().filter(|_| self.repo_held);
        if self.redis.is_none() && repo.is_none() {
            if self.coordinated {
                self.stats.lock().expect("dedup stats poisoned").degraded += chunks.len() as u64;
            }
            return Ok(vec![None; chunks.len()]);
        }
        let mut st = self.stats.lock().expect("dedup stats poisoned");
        st.hashed += chunks.len() as u64;
        let mut out: Vec<Option<Vec<u8>>> = vec![None; chunks.len()];
        // Content of the base image the destination's repository holds: a digest, always.
        let mut ask: Vec<(usize, Vec<u8>)> = Vec::with_capacity(chunks.len());
        for (i, (_, c)) in chunks.iter().enumerate() {
            let d = hash::digest(self.algo, c);
            if repo.is_some_and(|r| r.contains(&d)) {
                st.repository += 1;
                out[i] = Some(d);
            } else {
                ask.push((i, d));
            }
        }
        let Some(redis) = self.redis.as_mut() else {
            if self.coordinated {
                st.degraded += ask.len() as u64;
            }
            return Ok(out);
        };
        let keys: Vec<Vec<u8>> = ask.iter().map(|(_, d)| super::keys::with_digest(&self.prefix, d)).collect();
        match redis.set_nx_many(&keys, self.ttl_s) {
            Ok(first) => {
                for (is_first, (i, d)) in first.into_iter().zip(ask) {
                    if is_first {
                        st.first += 1;
                    } else {
                        st.duplicate += 1;
                        out[i] = Some(d);
                    }
                }
                Ok(out)
            }
            Err(e) => {
                let msg = format!("coordination Redis failed ({e}): plain pre-copy from here on");
                tracing::warn!("{msg}");
                st.warning = Some(msg);
                st.degraded += ask.len() as u64;
                drop(st);
                self.redis = None;
                Ok(out)
            }
        }
    }

    fn repository(&mut self, held: bool) {
        self.repo_held = held;
    }
}
