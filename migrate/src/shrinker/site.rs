//! Shrinker's destination half, for one VMM: which of this guest's chunks hold which content
//! (an index kept correct as chunks are overwritten), their registration in the destination
//! site's index Redis (`SADD digest host:port`, `SREM` when the last chunk with a digest is
//! gone), a peer server that hands chunks to the site's other hypervisors, and the resolution of
//! digest-only chunks ([`SiteIndex::resolve`]): this guest's own memory first, then a holder
//! found with `SRANDMEMBER` (another one when it fails), every chunk verified against its digest
//! before it is installed.
//!
//! The guest's memory is read through [`ChunkMemory`] (copies, never slices over it); the
//! decisions — what to register, whom to ask in which round — are in `policy.rs`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use indexd::hash::{self, Algo};
use indexd::index::ContentIndex;
use indexd::peer::{ChunkSource, PeerClient, PeerServer};
use indexd::redis::{Redis, Target};

use super::keys::index_key;
use super::policy::{
    first_holders, index_changes, is_chunk, need_all_holders, next_round, split_updates, untried, HOLDER_ROUNDS,
};
use super::ChunkMemory;
use crate::stats::SiteStats;

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
    /// How peer fetches travel between this site's hosts (TLS on the cluster key, or plain).
    pub transport: indexd::tls::Transport,
}

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
    /// The index refuses this VMM's password.
    #[error("index Redis: the server refuses the password ({0})")]
    Refused(String),
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
    mem: Arc<dyn ChunkMemory>,
    index: Arc<Mutex<ContentIndex>>,
    algo: Algo,
    chunk: usize,
}

impl GuestChunks {
    /// A copy of the chunk at `gpa`, if the memory can be read there.
    fn read(&self, gpa: u64) -> Option<Vec<u8>> {
        let mut buf = vec![0u8; self.chunk];
        self.mem.read_chunk(gpa, &mut buf).ok()?;
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
    /// This site's copy of the base image and its content index (a source of content).
    repo: Option<(Arc<indexd::repo::RepoIndex>, Arc<dyn ChunkMemory>)>,
    /// Index updates not pushed yet: per key, whether this VMM holds it (the last word wins,
    /// so a digest dropped and regained between two flushes stays registered).
    pending: HashMap<Vec<u8>, bool>,
    /// Counters.
    pub stats: SiteStats,
}

impl SiteIndex {
    /// Joins the site: starts the peer server and connects to the index. `mem` is this guest's
    /// memory, read to serve peers and to resolve chunks locally; `algo` and `chunk` are the
    /// stream's digest and chunk size.
    pub fn start(
        opts: &SiteOptions,
        mem: Arc<dyn ChunkMemory>,
        algo: Algo,
        chunk: usize,
    ) -> Result<SiteIndex, SiteIndexError> {
        let index = Arc::new(Mutex::new(ContentIndex::new()));
        let chunks = Arc::new(GuestChunks { mem, index: index.clone(), algo, chunk });
        let server = PeerServer::start(&opts.peer_listen, chunks.clone(), &opts.transport)
            .map_err(|source| SiteIndexError::PeerServer { addr: opts.peer_listen.clone(), source })?;
        let member = opts.peer_advertise.clone().unwrap_or_else(|| server.local_addr().to_string());
        let mut stats = SiteStats::default();
        let target = match &opts.index {
            None => None,
            Some(url) => Some(Target::parse(url).map_err(|source| SiteIndexError::Index { url: url.clone(), source })?),
        };
        let url = opts.index.clone().unwrap_or_default();
        let redis = match &target {
            None => None,
            Some(t) => match Redis::connect(t).and_then(|mut r| r.ping().map(|()| r)) {
                Ok(r) => Some(r),
                // A password the index refuses is a configuration to fix: the migration fails.
                Err(e) if e.is_auth() => {
                    return Err(SiteIndexError::Refused(indexd::redis::redact(&e.to_string(), &url)));
                }
                Err(e) => {
                    let msg = format!(
                        "index Redis unreachable ({e}): missing content comes from the source until it answers"
                    );
                    let msg = indexd::redis::redact(&msg, &url);
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
            peers: PeerClient::new(Duration::from_secs(2), opts.transport.clone()),
            server,
            pending: HashMap::new(),
            repo: None,
            stats,
        })
    }

    /// Makes this site's copy of the base image a source of content: `image` reads it (offsets
    /// for addresses), `idx` says where each content is in it (of this stream's algorithm and
    /// chunk size).
    pub fn set_repository(&mut self, idx: Arc<indexd::repo::RepoIndex>, image: Arc<dyn ChunkMemory>) {
        self.repo = Some((idx, image));
    }

    /// The address peers use for this VMM.
    #[cfg(test)]
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
                .map(|d| (index_key(&d), self.member.clone()))
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

    /// Content with digest `digest` (already checked) was installed at `gpa`.
    pub fn on_write_verified(&mut self, gpa: u64, digest: &[u8]) {
        self.record(gpa, Some(digest));
    }

    /// Chunk `gpa` now holds content `digest` (`None`: not indexed content).
    fn record(&mut self, gpa: u64, digest: Option<&[u8]>) {
        let mut index = self.index.lock().expect("index poisoned");
        let old = match digest {
            Some(d) => index.insert(gpa, d),
            None => index.remove(gpa),
        };
        if self.target.is_some() {
            // `gone`: no chunk holds the old digest any more (ContentIndex frees it then).
            let old = old.as_ref().map(|(od, gone)| (od.as_slice(), *gone));
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
            match self.chunks.chunk(&d) {
                Some(bytes) => {
                    self.stats.local += gpas.len() as u64;
                    self.stats.disk_local += on_disk(&gpas);
                    self.install(mem_write, &gpas, &bytes, &d);
                }
                None => left.push((d, gpas)),
            }
        }
        // 2. This site's image repository (content of the base image).
        if let Some((idx, image)) = self.repo.clone() {
            let mut buf = vec![0u8; self.chunk];
            let mut rest = Vec::with_capacity(left.len());
            for (d, gpas) in left {
                let found = idx.offset(&d).is_some_and(|off| {
                    image.read_chunk(off, &mut buf).is_ok() && is_chunk(self.algo, self.chunk, &buf, &d)
                });
                if found {
                    self.stats.repository += gpas.len() as u64;
                    self.stats.disk_repository += on_disk(&gpas);
                    let bytes = buf.clone();
                    self.install(mem_write, &gpas, &bytes, &d);
                } else {
                    rest.push((d, gpas));
                }
            }
            left = rest;
        }
        // 3. Other hypervisors of the site: a random holder, then the others.
        if !left.is_empty() && self.index().is_some() {
            let keys: Vec<Vec<u8>> = left.iter().map(|(d, _)| index_key(d)).collect();
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
                        let keys: Vec<Vec<u8>> = again.iter().map(|&i| index_key(&left[i].0)).collect();
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
                    // One request at a time: what one answered is kept when a later one fails.
                    let per = indexd::peer::MAX_DIGESTS;
                    for part in idx.chunks(per).zip(digests.chunks(per)) {
                        match self.peers.fetch(&peer, part.1) {
                            Ok(answers) => {
                                for (&i, a) in part.0.iter().zip(answers) {
                                    let Some(bytes) = a else { continue };
                                    if !is_chunk(self.algo, self.chunk, &bytes, &left[i].0) {
                                        self.stats.corrupt_from_peer += 1;
                                        continue;
                                    }
                                    let (d, gpas) = &left[i];
                                    self.stats.peer += gpas.len() as u64;
                                    self.stats.disk_peer += on_disk(gpas);
                                    if tried[i].len() > 1 {
                                        self.stats.next_holder += 1;
                                    }
                                    self.install(mem_write, gpas, &bytes, d);
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

/// How many of `gpas` are disk addresses.
fn on_disk(gpas: &[u64]) -> u64 {
    gpas.iter().filter(|&&g| g >= crate::protocol::DISK_SPACE).count() as u64
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
                .map(|d| (index_key(&d), self.member.clone()))
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

    use shrink_testutil::redis::RedisServer;
    use shrink_testutil::util::wait_until;

    use crate::shrinker::ChunkMemoryError;

    const CHUNK: usize = 4096;
    const ALGO: Algo = Algo::Sha256;

    // With a real redis-server and real peer servers; the pure decisions are tested in
    // `policy.rs`.

    /// A guest memory in a vector, read and written by copy, like the VMM's.
    struct TestMemory(Mutex<Vec<u8>>);

    impl TestMemory {
        fn write(&self, gpa: u64, data: &[u8]) {
            let start = gpa as usize;
            self.0.lock().unwrap()[start..start + data.len()].copy_from_slice(data);
        }

        fn read(&self, gpa: u64) -> Vec<u8> {
            let mut buf = vec![0u8; CHUNK];
            self.read_chunk(gpa, &mut buf).unwrap();
            buf
        }
    }

    impl ChunkMemory for TestMemory {
        fn read_chunk(&self, gpa: u64, buf: &mut [u8]) -> Result<(), ChunkMemoryError> {
            let mem = self.0.lock().unwrap();
            let start = gpa as usize;
            let src = start
                .checked_add(buf.len())
                .and_then(|end| mem.get(start..end))
                .ok_or(ChunkMemoryError::OutOfRange { gpa, len: buf.len() })?;
            buf.copy_from_slice(src);
            Ok(())
        }
    }

    /// A guest memory of `chunks` chunks.
    fn memory(chunks: usize) -> Arc<TestMemory> {
        Arc::new(TestMemory(Mutex::new(vec![0u8; chunks * CHUNK])))
    }

    /// Distinct, non-uniform content number `n`.
    fn content(n: u32) -> Vec<u8> {
        shrink_testutil::util::XorShift::new(n.into()).bytes(CHUNK)
    }

    fn join(redis: &RedisServer, mem: Arc<TestMemory>) -> SiteIndex {
        let opts = SiteOptions {
            index: Some(redis.url()),
            peer_listen: "127.0.0.1:0".into(),
            peer_advertise: None,
            wait: Duration::from_millis(100),
            transport: indexd::tls::Transport::Plain,
        };
        SiteIndex::start(&opts, mem, ALGO, CHUNK).unwrap()
    }

    /// Writes `data` at chunk `i` of the guest memory, as a migration stream installs it.
    fn write(site: &mut SiteIndex, mem: &TestMemory, i: usize, data: &[u8]) {
        mem.write((i * CHUNK) as u64, data);
        site.on_write((i * CHUNK) as u64, Some(data));
    }

    /// Who the index says holds `data` (`SMEMBERS shrink:index:<digest>`).
    fn holders(redis: &RedisServer, data: &[u8]) -> Vec<String> {
        let mut r = Redis::connect(&Target::parse(&redis.url()).unwrap()).unwrap();
        let mut m = r.smembers_many(&[index_key(&hash::digest(ALGO, data))]).unwrap().remove(0);
        m.sort();
        m
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
        r.sadd_many(&[(index_key(&hash::digest(ALGO, &a)), other.clone())]).unwrap();
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
        new.resolve(&mut batch, &mut |gpa, bytes| m.write(gpa, bytes));

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
            let got = mem_new.read((i * CHUNK) as u64);
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
        new.resolve(&mut batch, &mut |gpa, bytes| m.write(gpa, bytes));
        let st = new.snapshot_stats();
        batch.sort();
        assert_eq!(batch, want, "every chunk is left for the source: {st:?}");
        assert_eq!((st.peer, st.corrupt_from_peer), (0, N as u64), "{st:?}");
        let got = mem_new.read(0);
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
            let k = index_key(&hash::digest(ALGO, &content(100 + i as u32)));
            Redis::connect(&Target::parse(&redis.url()).unwrap()).unwrap().sadd_many(&[(k, gone.clone())]).unwrap();
        }
        good.flush();
        let mut batch: Vec<(u64, Vec<u8>)> =
            (0..N).map(|i| ((i * CHUNK) as u64, hash::digest(ALGO, &content(100 + i as u32)))).collect();
        let m = mem_new.clone();
        new.resolve(&mut batch, &mut |gpa, bytes| m.write(gpa, bytes));
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
        wait_until("a resync after the index came back", Duration::from_secs(20), || {
            if next < 64 {
                write(&mut site, &mem, next, &content(200 + next as u32));
                next += 1;
            }
            site.flush();
            (site.snapshot_stats().resyncs > 0).then_some(())
        });
        let st = site.snapshot_stats();
        assert_eq!(st.resyncs, 1, "{st:?}");
        for i in 0..next {
            assert_eq!(holders(&redis, &content(200 + i as u32)), me, "chunk {i} registered again: {st:?}");
        }
    }
}
