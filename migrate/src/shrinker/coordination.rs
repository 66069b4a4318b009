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
    /// The source site's coordination Redis (one URL or several for a Redis Cluster).
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
    /// Why coordination is off, if it is.
    pub warning: Option<String>,
}

/// The coordination client.
pub struct RedisDedup {
    redis: Option<Redis>,
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
        let stats = std::sync::Arc::new(std::sync::Mutex::new(DedupStats::default()));
        let redis = match Target::parse(&cfg.coordination).and_then(|t| Redis::connect(&t)) {
            Ok(r) => Some(r),
            Err(e) => {
                let msg = format!("coordination Redis {} unreachable ({e}): plain pre-copy", cfg.coordination);
                tracing::warn!("{msg}");
                stats.lock().expect("dedup stats poisoned").warning = Some(msg);
                None
            }
        };
        let prefix = super::keys::coordination_prefix(&cfg.migration_id, &cfg.dest_site);
        RedisDedup { redis, algo: cfg.algo, prefix, ttl_s: cfg.ttl_s, stats }
    }
}

impl Dedup for RedisDedup {
    fn decide(&mut self, chunks: &[(u64, &[u8])]) -> Result<Vec<Option<Vec<u8>>>, EndpointError> {
        let Some(redis) = self.redis.as_mut() else {
            self.stats.lock().expect("dedup stats poisoned").degraded += chunks.len() as u64;
            return Ok(vec![None; chunks.len()]);
        };
        let digests: Vec<Vec<u8>> = chunks.iter().map(|(_, c)| hash::digest(self.algo, c)).collect();
        let keys: Vec<Vec<u8>> = digests.iter().map(|d| super::keys::with_digest(&self.prefix, d)).collect();
        let mut st = self.stats.lock().expect("dedup stats poisoned");
        st.hashed += chunks.len() as u64;
        match redis.set_nx_many(&keys, self.ttl_s) {
            Ok(first) => Ok(first
                .into_iter()
                .zip(digests)
                .map(|(is_first, d)| {
                    if is_first {
                        st.first += 1;
                        None
                    } else {
                        st.duplicate += 1;
                        Some(d)
                    }
                })
                .collect()),
            Err(e) => {
                let msg = format!("coordination Redis failed ({e}): plain pre-copy from here on");
                tracing::warn!("{msg}");
                st.warning = Some(msg);
                st.degraded += chunks.len() as u64;
                drop(st);
                self.redis = None;
                Ok(vec![None; chunks.len()])
            }
        }
    }
}
