//! Which guest chunks of this VMM hold which content.
//!
//! A destination VMM installs chunks (pages) by address and content digest; when another VM of
//! the cluster needs a chunk with the same content, the VMM finds one of its chunks holding it
//! ([`ContentIndex::lookup`]) and serves or copies it. When the guest overwrites a chunk, the
//! caller tells the index ([`ContentIndex::insert`] with the new digest, or
//! [`ContentIndex::remove`] for content that is not indexed, like a zero page); when a digest is
//! then held by no chunk at all, the index says so, so the caller can withdraw this VMM from the
//! digest's holders in Redis (`SREM`).
//!
//! # Layout
//!
//! Built for hundreds of thousands to millions of chunks:
//!
//! - each distinct digest lives once, inline in a slot (`[u8; 32]`, no per-digest heap
//!   allocation), with its holder count and the head of a doubly linked list of its chunks;
//! - a `hashbrown::HashTable<u32>` maps digests to slot numbers (4 bytes per entry, the digest is
//!   not stored twice);
//! - a `HashMap<u64, Node>` maps each chunk address to its slot and its neighbours in the slot's
//!   list, so every operation is O(1) — also for content held by thousands of chunks.
//!
//! About 32 bytes per chunk plus 52 per distinct digest, before hash-table slack.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

use hashbrown::HashTable;

/// The longest digest the index stores (SHA-256).
pub const MAX_DIGEST_LEN: usize = 32;

/// End of a holder list.
const NIL: u64 = u64::MAX;

/// One distinct digest.
#[derive(Clone, Copy)]
struct Slot {
    digest: [u8; MAX_DIGEST_LEN],
    len: u8,
    /// Chunks holding this digest; 0 = free slot.
    count: u32,
    /// First chunk of the holder list.
    head: u64,
}

impl Slot {
    fn digest(&self) -> &[u8] {
        &self.digest[..self.len as usize]
    }
}

/// One indexed chunk.
#[derive(Clone, Copy)]
struct Node {
    slot: u32,
    prev: u64,
    next: u64,
}

/// Which guest chunks hold which content. See the module documentation.
#[derive(Default)]
pub struct ContentIndex {
    chunks: HashMap<u64, Node, BuildHasherDefault<AddrHasher>>,
    slots: Vec<Slot>,
    free: Vec<u32>,
    table: HashTable<u32>,
}

impl std::fmt::Debug for ContentIndex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ContentIndex").field("chunks", &self.len()).field("distinct", &self.distinct()).finish()
    }
}

impl ContentIndex {
    /// An empty index.
    pub fn new() -> ContentIndex {
        ContentIndex::default()
    }

    /// An empty index with room for `chunks` chunks and as many distinct digests.
    pub fn with_capacity(chunks: usize) -> ContentIndex {
        ContentIndex {
            chunks: HashMap::with_capacity_and_hasher(chunks, Default::default()),
            slots: Vec::with_capacity(chunks),
            free: Vec::new(),
            table: HashTable::with_capacity(chunks),
        }
    }

    /// Chunk at guest address `gpa` now holds content `digest`. Returns the digest it held
    /// before, if any, and whether that old digest is now held by no chunk at all (so the caller
    /// `SREM`s it). Re-inserting the digest a chunk already holds changes nothing and returns
    /// `Some((digest, false))`.
    ///
    /// # Panics
    ///
    /// When `digest` is longer than [`MAX_DIGEST_LEN`] bytes, or `gpa` is `u64::MAX`.
    pub fn insert(&mut self, gpa: u64, digest: &[u8]) -> Option<(Vec<u8>, bool)> {
        assert!(
            digest.len() <= MAX_DIGEST_LEN,
            "ContentIndex: digest of {} bytes (at most {MAX_DIGEST_LEN})",
            digest.len()
        );
        assert!(gpa != NIL, "ContentIndex: address u64::MAX is reserved");
        let mut old = None;
        if let Some(node) = self.chunks.get(&gpa) {
            let slot = &self.slots[node.slot as usize];
            if slot.digest() == digest {
                return Some((digest.to_vec(), false));
            }
            old = self.unlink(gpa);
        }
        let slot = self.slot_for(digest);
        self.link(gpa, slot);
        old
    }

    /// Chunk at `gpa` was overwritten with content not indexed (e.g. a zero page). Returns the
    /// digest it held, if any, and whether that digest is now held by no chunk at all.
    pub fn remove(&mut self, gpa: u64) -> Option<(Vec<u8>, bool)> {
        self.unlink(gpa)
    }

    /// Some chunk holding `digest`.
    pub fn lookup(&self, digest: &[u8]) -> Option<u64> {
        self.find(digest).map(|s| self.slots[s as usize].head)
    }

    /// How many chunks hold `digest`.
    pub fn holders(&self, digest: &[u8]) -> usize {
        self.find(digest).map_or(0, |s| self.slots[s as usize].count as usize)
    }

    /// The digest chunk `gpa` holds, if it is indexed.
    pub fn digest_at(&self, gpa: u64) -> Option<&[u8]> {
        self.chunks.get(&gpa).map(|n| self.slots[n.slot as usize].digest())
    }

    /// Number of chunks indexed.
    pub fn len(&self) -> usize {
        self.chunks.len()
    }

    /// Whether no chunk is indexed.
    pub fn is_empty(&self) -> bool {
        self.chunks.is_empty()
    }

    /// Number of distinct digests.
    pub fn distinct(&self) -> usize {
        self.table.len()
    }

    /// Every distinct digest (for `SREM` when the VM goes away).
    pub fn digests(&self) -> Vec<Vec<u8>> {
        self.slots.iter().filter(|s| s.count > 0).map(|s| s.digest().to_vec()).collect()
    }

    /// Forgets everything.
    pub fn clear(&mut self) {
        self.chunks.clear();
        self.slots.clear();
        self.free.clear();
        self.table.clear();
    }

    fn find(&self, digest: &[u8]) -> Option<u32> {
        let slots = &self.slots;
        self.table.find(digest_hash(digest), |&s| slots[s as usize].digest() == digest).copied()
    }

    /// The slot of `digest`, created when new.
    fn slot_for(&mut self, digest: &[u8]) -> u32 {
        if let Some(s) = self.find(digest) {
            return s;
        }
        let mut slot = Slot { digest: [0; MAX_DIGEST_LEN], len: digest.len() as u8, count: 0, head: NIL };
        slot.digest[..digest.len()].copy_from_slice(digest);
        let s = match self.free.pop() {
            Some(s) => {
                self.slots[s as usize] = slot;
                s
            }
            None => {
                let s = u32::try_from(self.slots.len()).expect("ContentIndex: 2^32 digests");
                self.slots.push(slot);
                s
            }
        };
        let slots = &self.slots;
        self.table.insert_unique(digest_hash(digest), s, |&t| digest_hash(slots[t as usize].digest()));
        s
    }

    /// Puts chunk `gpa` (not indexed) at the head of `slot`'s holder list.
    fn link(&mut self, gpa: u64, slot: u32) {
        let s = &mut self.slots[slot as usize];
        let next = s.head;
        s.head = gpa;
        s.count += 1;
        if next != NIL {
            if let Some(n) = self.chunks.get_mut(&next) {
                n.prev = gpa;
            }
        }
        self.chunks.insert(gpa, Node { slot, prev: NIL, next });
    }

    /// Takes chunk `gpa` out of its holder list; frees the slot when it was the last holder.
    fn unlink(&mut self, gpa: u64) -> Option<(Vec<u8>, bool)> {
        let node = self.chunks.remove(&gpa)?;
        if node.prev != NIL {
            if let Some(p) = self.chunks.get_mut(&node.prev) {
                p.next = node.next;
            }
        } else {
            self.slots[node.slot as usize].head = node.next;
        }
        if node.next != NIL {
            if let Some(n) = self.chunks.get_mut(&node.next) {
                n.prev = node.prev;
            }
        }
        let s = &mut self.slots[node.slot as usize];
        s.count -= 1;
        let digest = s.digest().to_vec();
        let gone = s.count == 0;
        if gone {
            let hash = digest_hash(&digest);
            let id = node.slot;
            if let Ok(entry) = self.table.find_entry(hash, |&t| t == id) {
                entry.remove();
            }
            self.slots[id as usize].head = NIL;
            self.free.push(id);
        }
        Some((digest, gone))
    }
}

/// A 64-bit finaliser (MurmurHash3's fmix64): every input bit affects every output bit, so
/// page-aligned addresses and short test digests spread over the table like random digests do.
fn mix(mut x: u64) -> u64 {
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
    x ^= x >> 33;
    x = x.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    x ^ (x >> 33)
}

fn digest_hash(d: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    let mut b = [0u8; 8];
    let n = d.len().min(8);
    a[..n].copy_from_slice(&d[..n]);
    let rest = d.get(8..).unwrap_or(&[]);
    let m = rest.len().min(8);
    b[..m].copy_from_slice(&rest[..m]);
    mix(u64::from_le_bytes(a) ^ mix(u64::from_le_bytes(b) ^ d.len() as u64))
}

/// Hasher for chunk addresses (`u64` keys only).
#[derive(Default)]
struct AddrHasher(u64);

impl Hasher for AddrHasher {
    fn finish(&self) -> u64 {
        mix(self.0)
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }
    fn write_u64(&mut self, i: u64) {
        self.0 ^= i;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::{BTreeMap, BTreeSet};

    fn d(n: u8) -> Vec<u8> {
        crate::hash::digest(crate::hash::Algo::Sha256, &[n])
    }

    #[test]
    fn insert_lookup_overwrite() {
        let mut ix = ContentIndex::new();
        assert!(ix.is_empty());
        assert_eq!(ix.insert(0x1000, &d(1)), None);
        assert_eq!(ix.insert(0x2000, &d(1)), None);
        assert_eq!(ix.insert(0x3000, &d(2)), None);
        assert_eq!((ix.len(), ix.distinct()), (3, 2));
        assert!(matches!(ix.lookup(&d(1)), Some(0x1000 | 0x2000)));
        assert_eq!(ix.lookup(&d(2)), Some(0x3000));
        assert_eq!(ix.lookup(&d(3)), None);
        assert_eq!(ix.holders(&d(1)), 2);

        // Overwrite one holder of d1: d1 still held.
        assert_eq!(ix.insert(0x1000, &d(3)), Some((d(1), false)));
        assert_eq!(ix.lookup(&d(1)), Some(0x2000));
        assert_eq!(ix.digest_at(0x1000), Some(&d(3)[..]));
        // Same content again: nothing changes.
        assert_eq!(ix.insert(0x1000, &d(3)), Some((d(3), false)));
        assert_eq!((ix.len(), ix.distinct()), (3, 3));
        // Overwrite the last holder of d2: gone.
        assert_eq!(ix.insert(0x3000, &d(1)), Some((d(2), true)));
        assert_eq!(ix.lookup(&d(2)), None);
        assert_eq!((ix.len(), ix.distinct()), (3, 2));
    }

    #[test]
    fn remove_and_last_holder() {
        let mut ix = ContentIndex::new();
        ix.insert(1, &d(1));
        ix.insert(2, &d(1));
        assert_eq!(ix.remove(3), None);
        assert_eq!(ix.remove(1), Some((d(1), false)));
        assert_eq!(ix.lookup(&d(1)), Some(2));
        assert_eq!(ix.remove(2), Some((d(1), true)));
        assert_eq!(ix.lookup(&d(1)), None);
        assert_eq!(ix.remove(2), None);
        assert!(ix.is_empty());
        assert_eq!(ix.distinct(), 0);
        assert!(ix.digests().is_empty());
        // A freed slot is reused cleanly.
        ix.insert(5, &d(9));
        assert_eq!(ix.lookup(&d(9)), Some(5));
        assert_eq!(ix.digests(), vec![d(9)]);
    }

    #[test]
    fn mixed_lengths() {
        let mut ix = ContentIndex::new();
        let s1 = crate::hash::digest(crate::hash::Algo::Sha1, b"x");
        ix.insert(1, &s1);
        ix.insert(2, &d(1));
        ix.insert(3, b"ab");
        assert_eq!(ix.lookup(&s1), Some(1));
        assert_eq!(ix.lookup(&s1[..19]), None);
        assert_eq!(ix.lookup(b"ab"), Some(3));
        assert_eq!(ix.distinct(), 3);
    }

    #[test]
    #[should_panic(expected = "digest of 33 bytes")]
    fn too_long_digest_panics() {
        ContentIndex::new().insert(0, &[0; 33]);
    }

    /// Random operations against a naive model.
    #[test]
    fn matches_model() {
        let mut ix = ContentIndex::new();
        let mut model: BTreeMap<u64, Vec<u8>> = BTreeMap::new();
        let mut x = shrink_testutil::util::XorShift::new(0x1234_5678_9abc_def1);
        let mut rnd = move || x.next_u64();
        for _ in 0..50_000 {
            let gpa = (rnd() % 2000) << 12;
            let content = (rnd() % 300) as u8;
            let holders = |m: &BTreeMap<u64, Vec<u8>>, dg: &[u8]| m.values().filter(|v| *v == dg).count();
            if rnd() % 4 == 0 {
                let got = ix.remove(gpa);
                let want = model.remove(&gpa).map(|old| {
                    let gone = holders(&model, &old) == 0;
                    (old, gone)
                });
                assert_eq!(got, want);
            } else {
                let dg = d(content);
                let got = ix.insert(gpa, &dg);
                let want = model.insert(gpa, dg.clone()).map(|old| {
                    let gone = holders(&model, &old) == 0;
                    (old, gone)
                });
                assert_eq!(got, want);
            }
            if rnd() % 64 == 0 {
                let dg = d((rnd() % 300) as u8);
                match ix.lookup(&dg) {
                    Some(g) => assert_eq!(model.get(&g), Some(&dg)),
                    None => assert_eq!(holders(&model, &dg), 0),
                }
            }
        }
        assert_eq!(ix.len(), model.len());
        let want: BTreeSet<Vec<u8>> = model.values().cloned().collect();
        let got: BTreeSet<Vec<u8>> = ix.digests().into_iter().collect();
        assert_eq!(got, want);
        assert_eq!(ix.distinct(), want.len());
        for dg in &want {
            assert_eq!(ix.holders(dg), model.values().filter(|v| *v == dg).count());
        }
    }

    #[test]
    fn many_chunks() {
        let mut ix = ContentIndex::with_capacity(300_000);
        for i in 0..300_000u64 {
            let dg = crate::hash::digest(crate::hash::Algo::Sha1, &(i % 100_000).to_le_bytes());
            ix.insert(i << 12, &dg);
        }
        assert_eq!((ix.len(), ix.distinct()), (300_000, 100_000));
        for i in 0..100_000u64 {
            ix.remove(i << 12);
        }
        assert_eq!((ix.len(), ix.distinct()), (200_000, 100_000));
    }
}
