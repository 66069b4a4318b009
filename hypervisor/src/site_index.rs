//! The destination side of Shrinker's content-based addressing, for one VMM: which of this
//! guest's chunks hold which content (an index kept correct as chunks are overwritten), their
//! registration in the destination site's index Redis (`SADD digest host:port`, `SREM` when the
//! last chunk with a digest is gone), a peer server that hands chunks to the site's other
//! hypervisors, and the resolution of digest-only chunks: this guest's own memory first, then a
//! holder found with `SRANDMEMBER` (another one when it fails), every chunk verified against its
//! digest before it is installed.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use indexd::hash::{self, Algo};
use indexd::index::ContentIndex;
use indexd::peer::{ChunkSource, PeerClient, PeerServer};
use indexd::redis::{Redis, Target};
use serde::Serialize;
use vm_memory::{Bytes, GuestAddress};

use crate::vstate::memory::GuestMemoryMmap;

/// Key prefix of the site index.
const KEY_PREFIX: &[u8] = b"shrinkidx:";

fn key(digest: &[u8]) -> Vec<u8> {
    let mut k = KEY_PREFIX.to_vec();
    k.extend_from_slice(digest);
    k
}

/// How a destination VMM takes part in its site's index.
#[derive(Debug, Clone)]
pub struct SiteOptions {
    /// The site's index Redis (one URL, or several comma-separated for a Redis Cluster).
    pub index: Option<String>,
    /// Where this VMM's peer server listens.
    pub peer_listen: String,
    /// The address other hypervisors use to reach it (default: the listening address).
    pub peer_advertise: Option<String>,
    /// How long waiting content may stop arriving at the site before it is pulled from the source.
    pub wait: Duration,
}

/// Where resolved chunks came from, and what went wrong on the way.
#[derive(Debug, Clone, Default, Serialize)]
pub struct SiteStats {
    /// Found in this guest's own memory (intra-VM duplicates).
    pub local: u64,
    /// Fetched from another hypervisor of the site.
    pub peer: u64,
    /// Peer answers that did not match their digest (dropped, another holder tried).
    pub corrupt_from_peer: u64,
    /// Peers that could not be reached.
    pub peer_errors: u64,
    /// Index operations that failed (the index is then left alone: content comes from the source).
    pub index_errors: u64,
    /// Chunks this VMM registered in the site index.
    pub registered: u64,
    /// Chunks this VMM served to peers.
    pub served: u64,
    /// Times this VMM re-registered everything it holds after the index came back.
    pub resyncs: u64,
    /// Why the index is not used, if it is not.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub warning: Option<String>,
}

/// Serves this guest's chunks to peers, from the live guest memory, checked against the digest.
struct GuestChunks {
    mem: GuestMemoryMmap,
    index: Arc<Mutex<ContentIndex>>,
    algo: Algo,
    chunk: usize,
}

impl GuestChunks {
    fn read(&self, gpa: u64) -> Option<Vec<u8>> {
        let mut buf = vec![0u8; self.chunk];
        self.mem.read_slice(&mut buf, GuestAddress(gpa)).ok()?;
        Some(buf)
    }
}

impl ChunkSource for GuestChunks {
    fn chunk(&self, digest: &[u8]) -> Option<Vec<u8>> {
        let gpa = self.index.lock().expect("index poisoned").lookup(digest)?;
        // The guest may have changed it since (it runs once the migration is over).
        self.read(gpa).filter(|b| hash::digest(self.algo, b) == digest)
    }
}

/// One VMM's membership in the site index.
pub struct SiteIndex {
    algo: Algo,
    chunk: usize,
    member: String,
    index: Arc<Mutex<ContentIndex>>,
    chunks: Arc<GuestChunks>,
    redis: Option<Redis>,
    /// Where the index is (to connect again after it was unreachable).
    target: Option<Target>,
    /// No index operation before this (after a failure).
    retry_at: std::time::Instant,
    /// The index lost track of us (it failed, perhaps restarted empty): re-register all.
    resync: bool,
    peers: PeerClient,
    server: PeerServer,
    /// Index updates not pushed yet: per key, whether this VMM holds it (the last word wins,
    /// so a digest dropped and regained between two flushes stays registered).
    pending: HashMap<Vec<u8>, bool>,
    /// Counters.
    pub stats: SiteStats,
}

impl SiteIndex {
    /// Joins the site: starts the peer server and connects to the index.
    pub fn start(opts: &SiteOptions, mem: GuestMemoryMmap, algo: Algo, chunk: usize) -> Result<SiteIndex, String> {
        let index = Arc::new(Mutex::new(ContentIndex::new()));
        let chunks = Arc::new(GuestChunks { mem, index: index.clone(), algo, chunk });
        let server = PeerServer::start(&opts.peer_listen, chunks.clone())
            .map_err(|e| format!("peer server on {}: {e}", opts.peer_listen))?;
        let member = opts.peer_advertise.clone().unwrap_or_else(|| server.local_addr().to_string());
        let mut stats = SiteStats::default();
        let target = match &opts.index {
            None => None,
            Some(url) => Some(Target::parse(url).map_err(|e| format!("--index {url}: {e}"))?),
        };
        let redis = match &target {
            None => None,
            Some(t) => match Redis::connect(t) {
                Ok(r) => Some(r),
                Err(e) => {
                    let msg = format!(
                        "index Redis unreachable ({e}): missing content comes from the source until it answers"
                    );
                    tracing::warn!("{msg}");
                    stats.warning = Some(msg);
                    None
                }
            },
        };
        Ok(SiteIndex {
            algo,
            chunk,
            member,
            index,
            chunks,
            redis,
            target,
            retry_at: std::time::Instant::now(),
            resync: false,
            peers: PeerClient::new(Duration::from_secs(2)),
            server,
            pending: HashMap::new(),
            stats,
        })
    }

    /// The address peers use for this VMM.
    pub fn member(&self) -> &str {
        &self.member
    }

    fn index_failed(&mut self, e: impl std::fmt::Display) {
        let msg = format!("index Redis failed ({e}): content came from the source while it was down");
        tracing::warn!("{msg}");
        self.stats.index_errors += 1;
        self.stats.warning = Some(msg);
        // Leave it alone for a moment; when it answers again it may have lost everything (a
        // restart), so this VMM registers all it holds once more.
        self.retry_at = std::time::Instant::now() + Duration::from_millis(500);
        self.resync = true;
    }

    /// The index, when it may be used now (reconnecting when it was unreachable).
    fn index(&mut self) -> Option<&mut Redis> {
        let now = std::time::Instant::now();
        if now < self.retry_at {
            return None;
        }
        if self.redis.is_none() {
            let t = self.target.as_ref()?;
            match Redis::connect(t) {
                Ok(r) => {
                    self.redis = Some(r);
                    self.resync = true;
                }
                Err(_) => {
                    self.retry_at = now + Duration::from_secs(1);
                    return None;
                }
            }
        }
        if self.resync {
            let all: Vec<(Vec<u8>, String)> = self
                .index
                .lock()
                .expect("index poisoned")
                .digests()
                .into_iter()
                .map(|d| (key(&d), self.member.clone()))
                .collect();
            let r = self.redis.as_mut()?;
            if all.chunks(8192).all(|part| r.sadd_many(part).is_ok()) {
                self.resync = false;
                self.stats.resyncs += 1;
                self.stats.registered += all.len() as u64;
            } else {
                self.retry_at = now + Duration::from_millis(500);
                self.stats.index_errors += 1;
                return None;
            }
        }
        self.redis.as_mut()
    }

    /// A chunk was installed at `gpa` (`Some` = content, `None` = uniform chunk).
    pub fn on_write(&mut self, gpa: u64, data: Option<&[u8]>) {
        let digest = data.map(|bytes| hash::digest(self.algo, bytes));
        self.record(gpa, digest.as_deref());
    }

    /// Chunk `gpa` now holds content `digest` (`None`: not indexed content).
    fn record(&mut self, gpa: u64, digest: Option<&[u8]>) {
        let mut index = self.index.lock().expect("index poisoned");
        let old = match digest {
            Some(d) => {
                let old = index.insert(gpa, d);
                if self.target.is_some() && old.as_ref().is_none_or(|(o, _)| o != d) {
                    self.pending.insert(key(d), true);
                }
                old
            }
            None => index.remove(gpa),
        };
        if let Some((od, true)) = old {
            if self.target.is_some() && index.lookup(&od).is_none() {
                self.pending.insert(key(&od), false);
            }
        }
    }

    /// Pushes batched index updates.
    pub fn flush(&mut self) {
        let (mut sadd, mut srem) = (Vec::new(), Vec::new());
        for (k, holds) in self.pending.drain() {
            if holds {
                sadd.push((k, self.member.clone()));
            } else {
                srem.push((k, self.member.clone()));
            }
        }
        if sadd.is_empty() && srem.is_empty() {
            return;
        }
        let Some(redis) = self.index() else {
            // Not now: what this VMM holds is registered in full when the index answers again.
            self.resync = self.target.is_some();
            return;
        };
        let r = redis.sadd_many(&sadd).and_then(|_| redis.srem_many(&srem));
        match r {
            Ok(()) => self.stats.registered += sadd.len() as u64,
            Err(e) => self.index_failed(e),
        }
    }

    /// Writes verified content (`bytes` hashing to `digest`) at every address of `gpas`.
    fn install(&mut self, mem_write: &mut dyn FnMut(u64, &[u8]), gpas: &[u64], bytes: &[u8], digest: &[u8]) {
        for &g in gpas {
            mem_write(g, bytes);
            self.record(g, Some(digest));
        }
    }

    /// Installs every chunk of `batch` whose content can be found at the site (removing it
    /// from `batch`); `mem_write` writes a chunk into guest memory.
    pub fn resolve(&mut self, batch: &mut Vec<(u64, Vec<u8>)>, mem_write: &mut dyn FnMut(u64, &[u8])) {
        // Group the addresses by digest: one lookup and one fetch per distinct content.
        let mut wanted: HashMap<Vec<u8>, Vec<u64>> = HashMap::new();
        for (gpa, d) in batch.drain(..) {
            wanted.entry(d).or_default().push(gpa);
        }
        // 1. This guest's own memory.
        let mut left: Vec<(Vec<u8>, Vec<u64>)> = Vec::new();
        for (d, gpas) in wanted {
            let src = self.index.lock().expect("index poisoned").lookup(&d);
            match src.and_then(|g| self.chunks.read(g)).filter(|b| hash::digest(self.algo, b) == d) {
                Some(bytes) => {
                    self.stats.local += gpas.len() as u64;
                    self.install(mem_write, &gpas, &bytes, &d);
                }
                None => left.push((d, gpas)),
            }
        }
        // 2. Other hypervisors of the site: a random holder, then the others.
        if !left.is_empty() && self.index().is_some() {
            let keys: Vec<Vec<u8>> = left.iter().map(|(d, _)| key(d)).collect();
            // A random holder first (SRANDMEMBER); the whole set only for what that fails on.
            let first = match self.index().map(|r| r.srandmember_many(&keys)) {
                Some(Ok(h)) => h,
                Some(Err(e)) => {
                    self.index_failed(e);
                    vec![None; left.len()]
                }
                None => vec![None; left.len()],
            };
            let mut candidates: Vec<Vec<String>> =
                first.into_iter().map(|h| h.filter(|m| *m != self.member).into_iter().collect()).collect();
            let mut tried: Vec<Vec<String>> = vec![Vec::new(); left.len()];
            let mut done = vec![false; left.len()];
            for round in 0..3 {
                if round > 0 {
                    // Holders that failed or were this VMM itself: ask for every holder.
                    let again: Vec<usize> = (0..left.len()).filter(|&i| !done[i] && candidates[i].is_empty()).collect();
                    if !again.is_empty() {
                        let keys: Vec<Vec<u8>> = again.iter().map(|&i| key(&left[i].0)).collect();
                        if let Some(Ok(all)) = self.index().map(|r| r.smembers_many(&keys)) {
                            for (&i, members) in again.iter().zip(all) {
                                candidates[i] = members
                                    .into_iter()
                                    .filter(|m| *m != self.member && !tried[i].contains(m))
                                    .collect();
                            }
                        }
                    }
                }
                let mut by_peer: HashMap<String, Vec<usize>> = HashMap::new();
                for (i, c) in candidates.iter_mut().enumerate() {
                    if !done[i] && !c.is_empty() {
                        let peer = c.remove(0);
                        tried[i].push(peer.clone());
                        by_peer.entry(peer).or_default().push(i);
                    }
                }
                if by_peer.is_empty() {
                    break;
                }
                for (peer, idx) in by_peer {
                    let digests: Vec<Vec<u8>> = idx.iter().map(|&i| left[i].0.clone()).collect();
                    for part in idx.chunks(4096).zip(digests.chunks(4096)) {
                        match self.peers.fetch(&peer, part.1) {
                            Ok(answers) => {
                                for (&i, a) in part.0.iter().zip(answers) {
                                    let Some(bytes) = a else { continue };
                                    if bytes.len() != self.chunk || hash::digest(self.algo, &bytes) != left[i].0 {
                                        self.stats.corrupt_from_peer += 1;
                                        continue;
                                    }
                                    let (d, gpas) = left[i].clone();
                                    self.stats.peer += gpas.len() as u64;
                                    self.install(mem_write, &gpas, &bytes, &d);
                                    done[i] = true;
                                }
                            }
                            Err(e) => {
                                tracing::debug!("peer {peer}: {e}");
                                self.stats.peer_errors += 1;
                            }
                        }
                    }
                }
            }
            left = left.into_iter().zip(done).filter(|(_, d)| !d).map(|(x, _)| x).collect();
            self.flush();
        }
        for (d, gpas) in left {
            for g in gpas {
                batch.push((g, d.clone()));
            }
        }
    }

    /// Counters, with what the peer server did.
    pub fn snapshot_stats(&self) -> SiteStats {
        let mut s = self.stats.clone();
        s.served = self.server.served();
        s
    }

    /// Test hook: make the peer server corrupt what it serves.
    pub fn set_corrupt(&self, on: bool) {
        self.server.set_corrupt(on);
    }
}

impl Drop for SiteIndex {
    fn drop(&mut self) {
        // The VM is gone from this host: it holds none of its content any more.
        if let Some(redis) = self.redis.as_mut() {
            let gone: Vec<(Vec<u8>, String)> = self
                .index
                .lock()
                .map(|i| i.digests())
                .unwrap_or_default()
                .into_iter()
                .map(|d| (key(&d), self.member.clone()))
                .collect();
            for part in gone.chunks(10_000) {
                if redis.srem_many(part).is_err() {
                    break;
                }
            }
        }
    }
}
