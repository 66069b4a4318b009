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
use vm_memory::{Bytes, GuestAddress};

use crate::vstate::memory::GuestMemoryMmap;

/// How many rounds of holders a digest-only chunk gets per [`SiteIndex::resolve`]: a random
/// holder, then (after a failure, or when the random one was this VMM) the others, one a round.
const HOLDER_ROUNDS: usize = 3;

/// The site-index key of a digest (see [`migrate::keys`]).
fn key(digest: &[u8]) -> Vec<u8> {
    migrate::keys::index_key(digest)
}

/// What the site index must learn when a chunk changes: `old` is the digest it held before and
/// whether no chunk of this guest holds that digest any more, `new` what it holds now (`None`:
/// content that is not indexed). Per key, whether this VMM holds it, in the order they apply.
fn index_changes(old: Option<(&[u8], bool)>, new: Option<&[u8]>) -> Vec<(Vec<u8>, bool)> {
    let mut out = Vec::new();
    if let Some(d) = new {
        if old.is_none_or(|(o, _)| o != d) {
            out.push((key(d), true));
        }
    }
    if let Some((od, true)) = old {
        out.push((key(od), false));
    }
    out
}

/// Pending index updates as the `SADD` and the `SREM` lists of `member`.
type Updates = (Vec<(Vec<u8>, String)>, Vec<(Vec<u8>, String)>);

/// Splits pending index updates (per key, whether `member` holds it) into `SADD`s and `SREM`s.
fn split_updates(pending: impl IntoIterator<Item = (Vec<u8>, bool)>, member: &str) -> Updates {
    let (mut sadd, mut srem) = (Vec::new(), Vec::new());
    for (k, holds) in pending {
        if holds {
            sadd.push((k, member.to_owned()));
        } else {
            srem.push((k, member.to_owned()));
        }
    }
    (sadd, srem)
}

/// The first holder to ask for each digest: the random one `SRANDMEMBER` named, unless it is
/// this VMM (`me`) or there is none.
fn first_holders(random: Vec<Option<String>>, me: &str) -> Vec<Vec<String>> {
    random.into_iter().map(|h| h.filter(|m| m != me).into_iter().collect()).collect()
}

/// The digests (by position) that need every holder listed: not resolved, nobody left to ask.
fn need_all_holders(candidates: &[Vec<String>], done: &[bool]) -> Vec<usize> {
    (0..candidates.len()).filter(|&i| !done[i] && candidates[i].is_empty()).collect()
}

/// The holders still worth asking among `members`: neither this VMM nor one asked already.
fn untried(members: Vec<String>, me: &str, tried: &[String]) -> Vec<String> {
    members.into_iter().filter(|m| m != me && !tried.contains(m)).collect()
}

/// One round: every unresolved digest with a candidate left goes to its next candidate (which
/// is then tried); returns the digests (by position) to ask each holder for.
fn next_round(candidates: &mut [Vec<String>], done: &[bool], tried: &mut [Vec<String>]) -> HashMap<String, Vec<usize>> {
    let mut by_peer: HashMap<String, Vec<usize>> = HashMap::new();
    for (i, c) in candidates.iter_mut().enumerate() {
        if !done[i] && !c.is_empty() {
            let peer = c.remove(0);
            tried[i].push(peer.clone());
            by_peer.entry(peer).or_default().push(i);
        }
    }
    by_peer
}

/// Whether a peer's answer is the chunk asked for: one chunk long, hashing to its digest.
fn is_chunk(algo: Algo, chunk: usize, bytes: &[u8], digest: &[u8]) -> bool {
    bytes.len() == chunk && hash::verify(algo, bytes, digest)
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

pub use migrate::stats::SiteStats;

/// Why a VMM cannot join its site.
#[derive(Debug, thiserror::Error)]
pub enum SiteIndexError {
    /// The peer server cannot listen.
    #[error("peer server on {addr}: {source}")]
    PeerServer {
        /// The address.
        addr: String,
        /// Cause.
        source: indexd::peer::PeerError,
    },
    /// The index's URL is not one.
    #[error("--index {url}: {source}")]
    Index {
        /// The URL.
        url: String,
        /// Cause.
        source: indexd::redis::RedisError,
    },
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
        self.read(gpa).filter(|b| hash::verify(self.algo, b, digest))
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
    pub fn start(
        opts: &SiteOptions,
        mem: GuestMemoryMmap,
        algo: Algo,
        chunk: usize,
    ) -> Result<SiteIndex, SiteIndexError> {
        let index = Arc::new(Mutex::new(ContentIndex::new()));
        let chunks = Arc::new(GuestChunks { mem, index: index.clone(), algo, chunk });
        let server = PeerServer::start(&opts.peer_listen, chunks.clone())
            .map_err(|source| SiteIndexError::PeerServer { addr: opts.peer_listen.clone(), source })?;
        let member = opts.peer_advertise.clone().unwrap_or_else(|| server.local_addr().to_string());
        let mut stats = SiteStats::default();
        let target = match &opts.index {
            None => None,
            Some(url) => Some(Target::parse(url).map_err(|source| SiteIndexError::Index { url: url.clone(), source })?),
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
            Some(d) => index.insert(gpa, d),
            None => index.remove(gpa),
        };
        if self.target.is_some() {
            let old = old.as_ref().map(|(od, gone)| (od.as_slice(), *gone && index.lookup(od).is_none()));
            // The last word wins: a digest dropped and regained stays registered.
            self.pending.extend(index_changes(old, digest));
        }
    }

    /// Pushes batched index updates.
    pub fn flush(&mut self) {
        let (sadd, srem) = split_updates(self.pending.drain(), &self.member);
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
            match src.and_then(|g| self.chunks.read(g)).filter(|b| hash::verify(self.algo, b, &d)) {
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
            let mut candidates = first_holders(first, &self.member);
            let mut tried: Vec<Vec<String>> = vec![Vec::new(); left.len()];
            let mut done = vec![false; left.len()];
            for round in 0..HOLDER_ROUNDS {
                if round > 0 {
                    // Holders that failed or were this VMM itself: ask for every holder.
                    let again = need_all_holders(&candidates, &done);
                    if !again.is_empty() {
                        let keys: Vec<Vec<u8>> = again.iter().map(|&i| key(&left[i].0)).collect();
                        if let Some(Ok(all)) = self.index().map(|r| r.smembers_many(&keys)) {
                            for (&i, members) in again.iter().zip(all) {
                                candidates[i] = untried(members, &self.member, &tried[i]);
                            }
                        }
                    }
                }
                let by_peer = next_round(&mut candidates, &done, &mut tried);
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
                                    if !is_chunk(self.algo, self.chunk, &bytes, &left[i].0) {
                                        self.stats.corrupt_from_peer += 1;
                                        continue;
                                    }
                                    let (d, gpas) = left[i].clone();
                                    self.stats.peer += gpas.len() as u64;
                                    if tried[i].len() > 1 {
                                        self.stats.next_holder += 1;
                                    }
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

#[cfg(test)]
mod tests {
    use super::*;

    use indexd::testing::RedisServer;

    const CHUNK: usize = 4096;
    const ALGO: Algo = Algo::Sha256;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    // ---- Pure logic ----

    #[test]
    fn keys_are_the_prefix_and_the_raw_digest() {
        assert_eq!(key(&[0x01, 0xff, 0x00]), b"shrink:index:\x01\xff\x00".to_vec());
        assert_eq!(key(&[]), b"shrink:index:".to_vec());
    }

    #[test]
    fn index_changes_register_new_content_and_drop_the_last_copy_of_the_old() {
        let (a, b) = (b"aaaa".as_slice(), b"bbbb".as_slice());
        assert_eq!(index_changes(None, Some(a)), vec![(key(a), true)], "a chunk written for the first time");
        assert_eq!(index_changes(Some((a, false)), Some(a)), vec![], "the same content again: nothing to say");
        assert_eq!(
            index_changes(Some((a, false)), Some(b)),
            vec![(key(b), true)],
            "overwritten, the old content still in another chunk: only the new one is registered"
        );
        assert_eq!(
            index_changes(Some((a, true)), Some(b)),
            vec![(key(b), true), (key(a), false)],
            "overwritten, the last copy of the old content gone: SADD the new, SREM the old"
        );
        assert_eq!(
            index_changes(Some((a, true)), None),
            vec![(key(a), false)],
            "the last copy overwritten with content that is not indexed (a uniform chunk)"
        );
        assert_eq!(index_changes(Some((a, false)), None), vec![], "another copy is left");
        assert_eq!(index_changes(None, None), vec![], "uniform over never-written");
    }

    #[test]
    fn pending_updates_split_into_sadd_and_srem_of_this_member() {
        let (sadd, srem) = split_updates(vec![(b"k1".to_vec(), true), (b"k2".to_vec(), false)], "10.0.0.1:7100");
        assert_eq!(sadd, vec![(b"k1".to_vec(), "10.0.0.1:7100".to_owned())]);
        assert_eq!(srem, vec![(b"k2".to_vec(), "10.0.0.1:7100".to_owned())]);
        let (sadd, srem) = split_updates(Vec::new(), "m");
        assert!(sadd.is_empty() && srem.is_empty());
    }

    #[test]
    fn the_random_holder_is_asked_first_unless_it_is_this_vmm() {
        let first = first_holders(vec![Some("p1".into()), Some("me".into()), None], "me");
        assert_eq!(first, vec![s(&["p1"]), vec![], vec![]]);
        // Without a candidate and unresolved: every holder is listed; resolved ones are not.
        assert_eq!(need_all_holders(&first, &[false, false, true]), vec![1]);
        assert_eq!(need_all_holders(&first, &[false, false, false]), vec![1, 2]);
    }

    #[test]
    fn later_rounds_ask_the_holders_not_tried_yet_never_this_vmm() {
        let members = s(&["p1", "me", "p2", "p3"]);
        assert_eq!(untried(members.clone(), "me", &s(&["p1"])), s(&["p2", "p3"]));
        assert_eq!(untried(members, "me", &s(&["p1", "p2", "p3"])), Vec::<String>::new());
    }

    #[test]
    fn a_round_sends_each_open_digest_to_its_next_candidate_grouped_by_holder() {
        let mut candidates = vec![s(&["p1", "p2"]), s(&["p1"]), s(&["p2"]), vec![], s(&["p1"])];
        let done = [false, false, false, false, true];
        let mut tried = vec![Vec::new(); 5];
        let round = next_round(&mut candidates, &done, &mut tried);
        let mut got: Vec<(String, Vec<usize>)> = round.into_iter().collect();
        got.sort();
        assert_eq!(got, vec![("p1".to_owned(), vec![0, 1]), ("p2".to_owned(), vec![2])]);
        assert_eq!(tried, vec![s(&["p1"]), s(&["p1"]), s(&["p2"]), vec![], vec![]]);
        // What is left for the next round: p2 for digest 0; nobody for 1, 2, 3.
        assert_eq!(candidates[0], s(&["p2"]));
        assert_eq!(need_all_holders(&candidates, &done), vec![1, 2, 3]);
        // Digest 0 failed at p1: the next round asks p2, once.
        let round = next_round(&mut candidates, &[false, true, true, true, true], &mut tried);
        assert_eq!(round.into_iter().collect::<Vec<_>>(), vec![("p2".to_owned(), vec![0])]);
        assert_eq!(tried[0], s(&["p1", "p2"]));
        // Nobody left anywhere: no round at all.
        assert!(next_round(&mut candidates, &done, &mut tried).is_empty());
    }

    #[test]
    fn only_a_chunk_of_the_right_length_and_digest_is_accepted() {
        let data = vec![7u8; CHUNK];
        let d = hash::digest(ALGO, &data);
        assert!(is_chunk(ALGO, CHUNK, &data, &d));
        let mut flipped = data.clone();
        flipped[0] ^= 0xff;
        assert!(!is_chunk(ALGO, CHUNK, &flipped, &d), "corrupt answer");
        assert!(!is_chunk(ALGO, CHUNK, &data[..CHUNK - 1], &hash::digest(ALGO, &data[..CHUNK - 1])), "short");
    }

    // ---- With a real redis-server and real peer servers ----

    /// A guest memory of `chunks` chunks.
    fn memory(chunks: usize) -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), chunks * CHUNK)]).unwrap()
    }

    /// Distinct, non-uniform content number `n`.
    fn content(n: u32) -> Vec<u8> {
        let mut x = 0x9e37_79b9u32 ^ n.wrapping_mul(0x85eb_ca6b);
        (0..CHUNK)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                x as u8
            })
            .collect()
    }

    fn join(redis: &RedisServer, mem: GuestMemoryMmap) -> SiteIndex {
        let opts = SiteOptions {
            index: Some(redis.url()),
            peer_listen: "127.0.0.1:0".into(),
            peer_advertise: None,
            wait: Duration::from_millis(100),
        };
        SiteIndex::start(&opts, mem, ALGO, CHUNK).unwrap()
    }

    /// Writes `data` at chunk `i` of the guest memory, as a migration stream installs it.
    fn write(site: &mut SiteIndex, mem: &GuestMemoryMmap, i: usize, data: &[u8]) {
        mem.write_slice(data, GuestAddress((i * CHUNK) as u64)).unwrap();
        site.on_write((i * CHUNK) as u64, Some(data));
    }

    /// Who the index says holds `data` (`SMEMBERS shrink:index:<digest>`).
    fn holders(redis: &RedisServer, data: &[u8]) -> Vec<String> {
        let mut r = Redis::connect(&Target::parse(&redis.url()).unwrap()).unwrap();
        let mut m = r.smembers_many(&[key(&hash::digest(ALGO, data))]).unwrap().remove(0);
        m.sort();
        m
    }

    fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
        let start = std::time::Instant::now();
        while !f() {
            assert!(start.elapsed() < Duration::from_secs(20), "{what}: did not happen within 20 s");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    #[test]
    fn overwriting_the_last_copy_of_a_chunk_srems_it_from_the_index() {
        let redis = RedisServer::start().unwrap();
        let mem = memory(4);
        let mut site = join(&redis, mem.clone());
        let me = vec![site.member().to_owned()];
        let (a, b, c) = (content(1), content(2), content(3));
        write(&mut site, &mem, 0, &a);
        write(&mut site, &mem, 1, &a);
        write(&mut site, &mem, 2, &b);
        site.flush();
        assert_eq!(holders(&redis, &a), me, "SADD of a");
        assert_eq!(holders(&redis, &b), me, "SADD of b");
        // One of the two copies of `a` is overwritten: this VMM still holds it.
        write(&mut site, &mem, 0, &c);
        site.flush();
        assert_eq!(holders(&redis, &a), me, "a is still in chunk 1");
        assert_eq!(holders(&redis, &c), me, "SADD of c");
        // Another hypervisor of the site holds `a` too.
        let other = "10.9.9.9:7100".to_owned();
        let mut r = Redis::connect(&Target::parse(&redis.url()).unwrap()).unwrap();
        r.sadd_many(&[(key(&hash::digest(ALGO, &a)), other.clone())]).unwrap();
        // The last copy of `a` is overwritten, and `b` becomes a uniform chunk: both SREMed,
        // and only this VMM's membership.
        write(&mut site, &mem, 1, &c);
        site.on_write(2 * CHUNK as u64, None);
        site.flush();
        assert_eq!(holders(&redis, &a), vec![other], "SREM of a once its last copy was overwritten");
        assert_eq!(holders(&redis, &b), Vec::<String>::new(), "SREM of b once overwritten by a uniform chunk");
        assert_eq!(holders(&redis, &c), me);
        assert_eq!(site.snapshot_stats().index_errors, 0);
    }

    #[test]
    fn a_corrupt_holder_is_caught_and_the_next_holder_serves_the_chunk() {
        const N: usize = 64;
        let redis = RedisServer::start().unwrap();
        let (mem_bad, mem_good, mem_new) = (memory(N), memory(N), memory(N));
        let mut bad = join(&redis, mem_bad.clone());
        let mut good = join(&redis, mem_good.clone());
        let mut new = join(&redis, mem_new.clone());
        for i in 0..N {
            write(&mut bad, &mem_bad, i, &content(i as u32));
            write(&mut good, &mem_good, i, &content(i as u32));
        }
        bad.flush();
        good.flush();
        bad.set_corrupt(true);
        let mut want = vec![good.member().to_owned(), bad.member().to_owned()];
        want.sort();
        assert_eq!(holders(&redis, &content(0)), want, "two holders of every chunk");

        let mut batch: Vec<(u64, Vec<u8>)> =
            (0..N).map(|i| ((i * CHUNK) as u64, hash::digest(ALGO, &content(i as u32)))).collect();
        let m = mem_new.clone();
        new.resolve(&mut batch, &mut |gpa, bytes| m.write_slice(bytes, GuestAddress(gpa)).unwrap());

        let st = new.snapshot_stats();
        assert!(batch.is_empty(), "{} chunks left for the source to send; {st:?}", batch.len());
        assert_eq!(st.peer, N as u64, "every chunk came from a peer: {st:?}");
        // With 64 chunks, the random first holder is the corrupt one for some (all but surely).
        assert!(st.corrupt_from_peer > 0, "the corrupt holder was asked: {st:?}");
        assert_eq!(bad.snapshot_stats().served, st.corrupt_from_peer, "everything the corrupt holder sent was caught");
        assert_eq!(
            st.next_holder, st.corrupt_from_peer,
            "each chunk the corrupt holder failed on, the next one served"
        );
        assert_eq!(
            good.snapshot_stats().served,
            N as u64,
            "the honest holder served every chunk, also the corrupt ones"
        );
        for i in 0..N {
            let mut got = vec![0u8; CHUNK];
            mem_new.read_slice(&mut got, GuestAddress((i * CHUNK) as u64)).unwrap();
            assert!(got == content(i as u32), "chunk {i} holds what it should");
        }
        // And the new holder registered them.
        new.flush();
        assert!(holders(&redis, &content(0)).contains(&new.member().to_owned()));
    }

    #[test]
    fn chunks_only_corrupt_holders_hold_are_left_for_the_source() {
        const N: usize = 8;
        let redis = RedisServer::start().unwrap();
        let (mem_bad, mem_new) = (memory(N), memory(N));
        let mut bad = join(&redis, mem_bad.clone());
        let mut new = join(&redis, mem_new.clone());
        for i in 0..N {
            write(&mut bad, &mem_bad, i, &content(300 + i as u32));
        }
        bad.flush();
        bad.set_corrupt(true);
        let mut batch: Vec<(u64, Vec<u8>)> =
            (0..N).map(|i| ((i * CHUNK) as u64, hash::digest(ALGO, &content(300 + i as u32)))).collect();
        let want = batch.clone();
        let m = mem_new.clone();
        new.resolve(&mut batch, &mut |gpa, bytes| m.write_slice(bytes, GuestAddress(gpa)).unwrap());
        let st = new.snapshot_stats();
        batch.sort();
        assert_eq!(batch, want, "every chunk is left for the source: {st:?}");
        assert_eq!((st.peer, st.corrupt_from_peer), (0, N as u64), "{st:?}");
        let mut got = vec![0u8; CHUNK];
        mem_new.read_slice(&mut got, GuestAddress(0)).unwrap();
        assert!(got.iter().all(|&b| b == 0), "nothing corrupt was installed");
    }

    #[test]
    fn an_unreachable_holder_is_skipped_for_the_next_one() {
        const N: usize = 16;
        let redis = RedisServer::start().unwrap();
        let (mem_good, mem_new) = (memory(N), memory(N));
        let mut good = join(&redis, mem_good.clone());
        let mut new = join(&redis, mem_new.clone());
        // A holder that is gone (nothing listens at its address any more).
        let gone = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().to_string();
        for i in 0..N {
            write(&mut good, &mem_good, i, &content(100 + i as u32));
            let k = key(&hash::digest(ALGO, &content(100 + i as u32)));
            Redis::connect(&Target::parse(&redis.url()).unwrap()).unwrap().sadd_many(&[(k, gone.clone())]).unwrap();
        }
        good.flush();
        let mut batch: Vec<(u64, Vec<u8>)> =
            (0..N).map(|i| ((i * CHUNK) as u64, hash::digest(ALGO, &content(100 + i as u32)))).collect();
        let m = mem_new.clone();
        new.resolve(&mut batch, &mut |gpa, bytes| m.write_slice(bytes, GuestAddress(gpa)).unwrap());
        let st = new.snapshot_stats();
        assert!(batch.is_empty(), "{} chunks left; {st:?}", batch.len());
        assert_eq!(st.peer, N as u64, "{st:?}");
        assert!(st.peer_errors > 0, "the gone holder was tried: {st:?}");
        assert!(st.next_holder > 0, "and then the next one: {st:?}");
        assert_eq!(good.snapshot_stats().served, N as u64);
    }

    #[test]
    fn after_the_index_restarts_empty_everything_held_is_registered_again() {
        let mut redis = RedisServer::start().unwrap();
        let mem = memory(64);
        let mut site = join(&redis, mem.clone());
        let me = vec![site.member().to_owned()];
        for i in 0..32 {
            write(&mut site, &mem, i, &content(200 + i as u32));
        }
        site.flush();
        assert_eq!(holders(&redis, &content(200)), me);
        assert_eq!(site.snapshot_stats().registered, 32);

        // The index goes away: the next update fails and is counted.
        redis.kill();
        write(&mut site, &mem, 32, &content(232));
        site.flush();
        let st = site.snapshot_stats();
        assert!(st.index_errors > 0, "{st:?}");
        assert!(st.warning.as_deref().unwrap_or("").contains("index Redis failed"), "{st:?}");
        assert_eq!(st.resyncs, 0);

        // It comes back empty: once the VMM uses it again, it registers everything it holds.
        redis.restart().unwrap();
        assert_eq!(holders(&redis, &content(200)), Vec::<String>::new(), "restarted empty");
        let mut next = 33;
        wait_for("a resync after the index came back", || {
            if next < 64 {
                write(&mut site, &mem, next, &content(200 + next as u32));
                next += 1;
            }
            site.flush();
            site.snapshot_stats().resyncs > 0
        });
        let st = site.snapshot_stats();
        assert_eq!(st.resyncs, 1, "{st:?}");
        for i in 0..next {
            assert_eq!(holders(&redis, &content(200 + i as u32)), me, "chunk {i} registered again: {st:?}");
        }
    }
}
