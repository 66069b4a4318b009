//! The image repository as a content source.
//!
//! Each site keeps an image repository: its copy of the base image (`base.qcow2`). The site's
//! index Redis knows the chunks of every image of the repository, so that a source VMM can tell
//! which of its memory pages or disk blocks equal base-image content, and a destination VMM can
//! read such content from its local copy of the base image instead of receiving it over the WAN.
//!
//! [`RepoIndex::build`] reads an image's guest-visible content (through a caller-supplied
//! reader, so the format does not matter here) and records, for every distinct chunk content,
//! the offset of its first occurrence. Uniform chunks (every byte equal, zero pages above all)
//! are not recorded: the migration sends those as a single byte anyway.
//!
//! # Redis keys
//!
//! All keys are binary-safe and start with [`KEY_PREFIX`] (`shrink:repo:`):
//!
//! | key | value |
//! |---|---|
//! | `shrink:repo:chunks:<image hex>:<algo>:<chunk>` | [`RepoIndex::encode`] of that image, digest algorithm and chunk size |
//! | `shrink:repo:file:<canonical absolute path>` | [`FileStamp::encode`]: the image digest and the file's size, mtime and inode |
//!
//! `<image hex>` is the lower-case hex SHA-256 of the image's whole guest-visible content, so
//! every site holding a copy of the same image (whatever its file name or qcow2 layout) agrees
//! on the first key; the second ties a file of this site to its content, and
//! [`image_of`] refuses a file modified or replaced after it was indexed ([`RepoError::Stale`]).
//!
//! # Encoded index (version 1, little-endian)
//!
//! | field | bytes |
//! |---|---|
//! | magic `SHRKREPO` | 8 |
//! | version (1) | u32 |
//! | image digest (SHA-256) | 32 |
//! | virtual size in bytes | u64 |
//! | digest algorithm: 1 = SHA-256, 2 = SHA-1 | u8 |
//! | chunk size (512, 1024, 2048 or 4096) | u32 |
//! | entry count N | u64 |
//! | N × (chunk digest, offset u64), offsets strictly increasing, chunk-aligned, below the size | N × (L + 8) |
//!
//! An image of 1 GiB at 4096-byte chunks has at most 262 144 entries, about 10 MB with SHA-256:
//! one Redis string.

use std::collections::HashMap;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use openssl::sha::Sha256;
use thiserror::Error;

use crate::hash::{digest, hex, Algo};
use crate::redis::{Redis, RedisError};

/// Prefix of every key of the image repository index.
pub const KEY_PREFIX: &[u8] = b"shrink:repo:";
/// The chunk sizes an index can be built for.
pub const CHUNK_SIZES: [usize; 4] = [512, 1024, 2048, 4096];
/// Size of the pieces [`RepoIndex::build`] reads the image in (the last one may be shorter).
pub const READ_PIECE: usize = 1 << 20;

const MAGIC: &[u8; 8] = b"SHRKREPO";
const VERSION: u32 = 1;
/// magic, version, image, size, algo, chunk, count.
const HEADER_LEN: usize = 8 + 4 + 32 + 8 + 1 + 4 + 8;
const STAMP_MAGIC: &[u8; 8] = b"SHRKSTMP";
const STAMP_VERSION: u32 = 1;
/// magic, version, image, size, mtime_ns, inode.
const STAMP_LEN: usize = 8 + 4 + 32 + 8 + 8 + 8;

/// Errors of this module.
#[derive(Debug, Error)]
pub enum RepoError {
    /// A file of the repository cannot be examined.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// Reading the image's content failed.
    #[error("reading the image at offset {offset}: {source}")]
    Read {
        /// Offset of the piece being read.
        offset: u64,
        /// Cause (from the caller's reader).
        source: std::io::Error,
    },
    /// The index Redis failed.
    #[error(transparent)]
    Redis(#[from] RedisError),
    /// No stamp for this file: it was never indexed (at this path).
    #[error("{} is not in the repository index: run `shrink-repo index` on it", path.display())]
    NotIndexed {
        /// The file.
        path: PathBuf,
    },
    /// The file's size, mtime or inode differ from when it was indexed.
    #[error("{} was modified since it was indexed: run `shrink-repo index` again", path.display())]
    Stale {
        /// The file.
        path: PathBuf,
    },
    /// No chunk index for this image, algorithm and chunk size.
    #[error(
        "no chunk index for image {image} ({algo}, {chunk} B chunks) in the repository index: \
         run `shrink-repo index --digest {algo} --chunk {chunk}` on the image"
    )]
    NoChunks {
        /// The image digest, hex.
        image: String,
        /// The digest algorithm asked for.
        algo: Algo,
        /// The chunk size asked for.
        chunk: usize,
    },
    /// An encoded index or stamp that does not decode, or not the one asked for.
    #[error("corrupt repository index: {0}")]
    Corrupt(String),
    /// The image's size is not a multiple of the chunk size.
    #[error("image size {size} is not a multiple of the chunk size {chunk}")]
    BadSize {
        /// The image's virtual size.
        size: u64,
        /// The chunk size.
        chunk: usize,
    },
    /// A chunk size that is not one of [`CHUNK_SIZES`].
    #[error("chunk size {0} is not supported (expected 512, 1024, 2048 or 4096)")]
    BadChunk(usize),
}

fn check_chunk(chunk: usize) -> Result<(), RepoError> {
    if CHUNK_SIZES.contains(&chunk) {
        Ok(())
    } else {
        Err(RepoError::BadChunk(chunk))
    }
}

fn algo_code(algo: Algo) -> u8 {
    match algo {
        Algo::Sha256 => 1,
        Algo::Sha1 => 2,
    }
}

fn algo_of_code(code: u8) -> Option<Algo> {
    match code {
        1 => Some(Algo::Sha256),
        2 => Some(Algo::Sha1),
        _ => None,
    }
}

/// Whether every byte of `c` equals its first.
fn uniform(c: &[u8]) -> bool {
    match c.split_first() {
        Some((first, rest)) => rest.iter().all(|b| b == first),
        None => true,
    }
}

/// The chunks of one image for one digest algorithm and chunk size: digest → offset of the
/// first chunk with that content (uniform chunks excluded).
#[derive(Clone, PartialEq, Eq)]
pub struct RepoIndex {
    /// SHA-256 of the image's whole guest-visible content (its virtual size in bytes, in order).
    pub image: [u8; 32],
    /// The image's virtual size in bytes.
    pub size: u64,
    /// The chunk digest algorithm.
    pub algo: Algo,
    /// The chunk size (one of [`CHUNK_SIZES`]).
    pub chunk: usize,
    chunks: HashMap<Vec<u8>, u64>,
}

impl std::fmt::Debug for RepoIndex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RepoIndex")
            .field("image", &hex(&self.image))
            .field("size", &self.size)
            .field("algo", &self.algo)
            .field("chunk", &self.chunk)
            .field("distinct_chunks", &self.chunks.len())
            .finish()
    }
}

impl RepoIndex {
    /// Builds the index of an image of `size` bytes whose content `read_at(offset, buf)` fills
    /// `buf` with, reading it in [`READ_PIECE`] pieces in order. `chunk` must be one of
    /// [`CHUNK_SIZES`] and divide `size`.
    pub fn build(
        size: u64,
        algo: Algo,
        chunk: usize,
        read_at: &mut dyn FnMut(u64, &mut [u8]) -> std::io::Result<()>,
    ) -> Result<RepoIndex, RepoError> {
        let mut v = RepoIndex::build_all(size, &[(algo, chunk)], read_at)?;
        v.pop().ok_or_else(|| RepoError::Corrupt("no index built".into()))
    }

    /// Like [`RepoIndex::build`] for several `(algorithm, chunk size)` pairs at once, reading
    /// the image only once; the indexes come back in the order of `specs`. Nothing is read when
    /// `specs` is empty.
    pub fn build_all(
        size: u64,
        specs: &[(Algo, usize)],
        read_at: &mut dyn FnMut(u64, &mut [u8]) -> std::io::Result<()>,
    ) -> Result<Vec<RepoIndex>, RepoError> {
        for &(_, chunk) in specs {
            check_chunk(chunk)?;
            if !size.is_multiple_of(chunk as u64) {
                return Err(RepoError::BadSize { size, chunk });
            }
        }
        if specs.is_empty() {
            return Ok(Vec::new());
        }
        let mut maps: Vec<HashMap<Vec<u8>, u64>> = specs.iter().map(|_| HashMap::new()).collect();
        let mut whole = Sha256::new();
        let mut buf = vec![0u8; size.min(READ_PIECE as u64) as usize];
        let mut offset = 0u64;
        while offset < size {
            let n = (size - offset).min(READ_PIECE as u64) as usize;
            let piece = &mut buf[..n];
            read_at(offset, piece).map_err(|source| RepoError::Read { offset, source })?;
            whole.update(piece);
            for (&(algo, chunk), map) in specs.iter().zip(maps.iter_mut()) {
                // `n` is a multiple of `chunk`: READ_PIECE and `size` both are.
                for (i, c) in piece.chunks_exact(chunk).enumerate() {
                    if uniform(c) {
                        continue;
                    }
                    map.entry(digest(algo, c)).or_insert(offset + (i * chunk) as u64);
                }
            }
            offset += n as u64;
        }
        let image = whole.finish();
        Ok(specs
            .iter()
            .zip(maps)
            .map(|(&(algo, chunk), chunks)| RepoIndex { image, size, algo, chunk, chunks })
            .collect())
    }

    /// Offset in the image of the first chunk whose digest is `digest`.
    pub fn offset(&self, digest: &[u8]) -> Option<u64> {
        self.chunks.get(digest).copied()
    }

    /// Whether some chunk of the image has digest `digest`.
    pub fn contains(&self, digest: &[u8]) -> bool {
        self.chunks.contains_key(digest)
    }

    /// Number of distinct (non-uniform) chunk contents.
    pub fn len(&self) -> usize {
        self.chunks.len()
    }

    /// Whether the image has no non-uniform chunk.
    pub fn is_empty(&self) -> bool {
        self.chunks.is_empty()
    }

    /// The digests of the distinct chunks, in no particular order.
    pub fn digests(&self) -> impl Iterator<Item = &[u8]> {
        self.chunks.keys().map(Vec::as_slice)
    }

    /// `(digest, offset)` of every distinct chunk, in no particular order.
    pub fn entries(&self) -> impl Iterator<Item = (&[u8], u64)> {
        self.chunks.iter().map(|(d, &o)| (d.as_slice(), o))
    }

    /// The Redis key this index is published under ([`chunks_key`]).
    pub fn key(&self) -> Vec<u8> {
        chunks_key(&self.image, self.algo, self.chunk)
    }

    /// The compact binary form (see the module documentation); entries sorted by offset, so
    /// equal indexes encode equally.
    pub fn encode(&self) -> Vec<u8> {
        let mut entries: Vec<(&Vec<u8>, u64)> = self.chunks.iter().map(|(d, &o)| (d, o)).collect();
        entries.sort_unstable_by_key(|&(_, o)| o);
        let mut out = Vec::with_capacity(HEADER_LEN + entries.len() * (self.algo.len() + 8));
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&VERSION.to_le_bytes());
        out.extend_from_slice(&self.image);
        out.extend_from_slice(&self.size.to_le_bytes());
        out.push(algo_code(self.algo));
        out.extend_from_slice(&(self.chunk as u32).to_le_bytes());
        out.extend_from_slice(&(entries.len() as u64).to_le_bytes());
        for (d, o) in entries {
            out.extend_from_slice(d);
            out.extend_from_slice(&o.to_le_bytes());
        }
        out
    }

    /// Decodes [`RepoIndex::encode`]'s output, checking the magic, version, algorithm, chunk
    /// size, lengths, and every offset (below the size, chunk-aligned, strictly increasing) and
    /// digest (no duplicates).
    pub fn decode(bytes: &[u8]) -> Result<RepoIndex, RepoError> {
        let bad = |m: String| RepoError::Corrupt(m);
        if bytes.len() < HEADER_LEN {
            return Err(bad(format!("truncated: {} bytes, the header alone is {HEADER_LEN}", bytes.len())));
        }
        let (header, body) = bytes.split_at(HEADER_LEN);
        let mut r = Reader(header);
        if r.take::<8>() != *MAGIC {
            return Err(bad("bad magic (not a shrink repository index)".into()));
        }
        let version = u32::from_le_bytes(r.take());
        if version != VERSION {
            return Err(bad(format!("unsupported version {version} (expected {VERSION})")));
        }
        let image: [u8; 32] = r.take();
        let size = u64::from_le_bytes(r.take());
        let [code] = r.take::<1>();
        let algo = algo_of_code(code).ok_or_else(|| bad(format!("unknown digest algorithm code {code}")))?;
        let chunk = u32::from_le_bytes(r.take()) as usize;
        if !CHUNK_SIZES.contains(&chunk) {
            return Err(bad(format!("chunk size {chunk} (expected 512, 1024, 2048 or 4096)")));
        }
        if !size.is_multiple_of(chunk as u64) {
            return Err(bad(format!("image size {size} is not a multiple of the chunk size {chunk}")));
        }
        let count = u64::from_le_bytes(r.take());
        let entry_len = algo.len() + 8;
        if count > size / chunk as u64 {
            return Err(bad(format!("{count} entries for an image of {} chunks", size / chunk as u64)));
        }
        let want = (count as usize).checked_mul(entry_len);
        if want != Some(body.len()) {
            return Err(bad(format!(
                "{count} entries of {entry_len} bytes announced, {} bytes of entries follow",
                body.len()
            )));
        }
        let mut chunks = HashMap::with_capacity(count as usize);
        let mut prev: Option<u64> = None;
        for (i, e) in body.chunks_exact(entry_len).enumerate() {
            let (d, o) = e.split_at(algo.len());
            let mut o8 = [0u8; 8];
            o8.copy_from_slice(o);
            let offset = u64::from_le_bytes(o8);
            if offset >= size {
                return Err(bad(format!("entry {i}: offset {offset} is beyond the image size {size}")));
            }
            if !offset.is_multiple_of(chunk as u64) {
                return Err(bad(format!("entry {i}: offset {offset} is not a multiple of the chunk size {chunk}")));
            }
            if prev.is_some_and(|p| offset <= p) {
                return Err(bad(format!("entry {i}: offset {offset} does not follow the previous one")));
            }
            prev = Some(offset);
            if chunks.insert(d.to_vec(), offset).is_some() {
                return Err(bad(format!("entry {i}: digest {} appears twice", hex(d))));
            }
        }
        Ok(RepoIndex { image, size, algo, chunk, chunks })
    }
}

/// Reads fixed-size fields off a slice whose length the caller checked.
struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn take<const N: usize>(&mut self) -> [u8; N] {
        let mut out = [0u8; N];
        let (head, rest) = self.0.split_at(N);
        out.copy_from_slice(head);
        self.0 = rest;
        out
    }
}

/// What the repository index records about an indexed file: its content's digest and enough
/// metadata to notice that the file was modified or replaced since.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FileStamp {
    /// SHA-256 of the image's guest-visible content ([`RepoIndex::image`]).
    pub image: [u8; 32],
    /// The file's size in bytes.
    pub size: u64,
    /// The file's modification time, in nanoseconds since the epoch.
    pub mtime_ns: i64,
    /// The file's inode number.
    pub inode: u64,
}

impl FileStamp {
    /// The stamp of the file at `path` as it is now, for content `image`.
    pub fn of_file(path: &Path, image: [u8; 32]) -> Result<FileStamp, RepoError> {
        let m = std::fs::metadata(path).map_err(|source| RepoError::Io { path: path.to_owned(), source })?;
        let mtime_ns = m.mtime().saturating_mul(1_000_000_000).saturating_add(m.mtime_nsec());
        Ok(FileStamp { image, size: m.size(), mtime_ns, inode: m.ino() })
    }

    /// Whether the file at `path` still has this stamp's size, mtime and inode.
    pub fn is_current(&self, path: &Path) -> Result<bool, RepoError> {
        let now = FileStamp::of_file(path, self.image)?;
        Ok(now == *self)
    }

    /// The fixed binary form: magic `SHRKSTMP`, version u32 (1), image digest (32 bytes), size
    /// u64, mtime in ns i64, inode u64, all little-endian (68 bytes).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(STAMP_LEN);
        out.extend_from_slice(STAMP_MAGIC);
        out.extend_from_slice(&STAMP_VERSION.to_le_bytes());
        out.extend_from_slice(&self.image);
        out.extend_from_slice(&self.size.to_le_bytes());
        out.extend_from_slice(&self.mtime_ns.to_le_bytes());
        out.extend_from_slice(&self.inode.to_le_bytes());
        out
    }

    /// Decodes [`FileStamp::encode`]'s output.
    pub fn decode(bytes: &[u8]) -> Result<FileStamp, RepoError> {
        if bytes.len() != STAMP_LEN {
            return Err(RepoError::Corrupt(format!("file stamp of {} bytes (expected {STAMP_LEN})", bytes.len())));
        }
        let mut r = Reader(bytes);
        if r.take::<8>() != *STAMP_MAGIC {
            return Err(RepoError::Corrupt("file stamp with a bad magic".into()));
        }
        let version = u32::from_le_bytes(r.take());
        if version != STAMP_VERSION {
            return Err(RepoError::Corrupt(format!("file stamp version {version} (expected {STAMP_VERSION})")));
        }
        Ok(FileStamp {
            image: r.take(),
            size: u64::from_le_bytes(r.take()),
            mtime_ns: i64::from_le_bytes(r.take()),
            inode: u64::from_le_bytes(r.take()),
        })
    }
}

/// `shrink:repo:chunks:<image hex>:<algo name>:<chunk>`: where the index of `image` for `algo`
/// and `chunk` is published.
pub fn chunks_key(image: &[u8; 32], algo: Algo, chunk: usize) -> Vec<u8> {
    let mut k = KEY_PREFIX.to_vec();
    k.extend_from_slice(format!("chunks:{}:{}:{chunk}", hex(image), algo.name()).as_bytes());
    k
}

/// `shrink:repo:file:<path>`: where the stamp of the file at `path` is published. [`publish`],
/// [`stamp_of`] and [`image_of`] pass the canonical absolute path (`std::fs::canonicalize`).
pub fn file_key(path: &Path) -> Vec<u8> {
    let mut k = KEY_PREFIX.to_vec();
    k.extend_from_slice(b"file:");
    k.extend_from_slice(path.as_os_str().as_bytes());
    k
}

fn canonical(path: &Path) -> Result<PathBuf, RepoError> {
    std::fs::canonicalize(path).map_err(|source| RepoError::Io { path: path.to_owned(), source })
}

/// Publishes `idx`, built from the image file at `path`: `SET`s its chunk index
/// ([`chunks_key`]) and the file's stamp ([`file_key`] of the canonical path), in one pipeline.
pub fn publish(redis: &mut Redis, path: &Path, idx: &RepoIndex) -> Result<(), RepoError> {
    let canon = canonical(path)?;
    let stamp = FileStamp::of_file(&canon, idx.image)?;
    redis.set_many(&[(idx.key(), idx.encode()), (file_key(&canon), stamp.encode())])?;
    Ok(())
}

/// The stamp published for the file at `path` (`None` when it was never indexed), whether or
/// not the file changed since.
pub fn stamp_of(redis: &mut Redis, path: &Path) -> Result<Option<FileStamp>, RepoError> {
    let canon = canonical(path)?;
    let v = redis.get_many(&[file_key(&canon)])?;
    match v.into_iter().next().flatten() {
        None => Ok(None),
        Some(bytes) => FileStamp::decode(&bytes)
            .map(Some)
            .map_err(|e| RepoError::Corrupt(format!("stamp of {}: {e}", canon.display()))),
    }
}

/// The content digest of the indexed file at `path`: [`RepoError::NotIndexed`] when it was
/// never indexed, [`RepoError::Stale`] when its size, mtime or inode changed since.
pub fn image_of(redis: &mut Redis, path: &Path) -> Result<[u8; 32], RepoError> {
    let stamp = stamp_of(redis, path)?.ok_or_else(|| RepoError::NotIndexed { path: path.to_owned() })?;
    if !stamp.is_current(path)? {
        return Err(RepoError::Stale { path: path.to_owned() });
    }
    Ok(stamp.image)
}

/// Loads the chunk index of `image` for `algo` and `chunk`: [`RepoError::NoChunks`] when none
/// was published, [`RepoError::Corrupt`] when it does not decode or is another image's.
pub fn load(redis: &mut Redis, image: &[u8; 32], algo: Algo, chunk: usize) -> Result<RepoIndex, RepoError> {
    check_chunk(chunk)?;
    let v = redis.get_many(&[chunks_key(image, algo, chunk)])?;
    let Some(bytes) = v.into_iter().next().flatten() else {
        return Err(RepoError::NoChunks { image: hex(image), algo, chunk });
    };
    let what = || format!("chunk index of image {} ({algo}, {chunk} B)", hex(image));
    let idx = RepoIndex::decode(&bytes).map_err(|e| RepoError::Corrupt(format!("{}: {e}", what())))?;
    if idx.image != *image || idx.algo != algo || idx.chunk != chunk {
        return Err(RepoError::Corrupt(format!(
            "{} holds the index of image {} ({}, {} B)",
            what(),
            hex(&idx.image),
            idx.algo,
            idx.chunk
        )));
    }
    Ok(idx)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A distinct, non-uniform chunk for every `n`.
    fn distinct(n: u64, len: usize) -> Vec<u8> {
        let mut out = Vec::with_capacity(len);
        let mut i = 0u64;
        while out.len() < len {
            out.extend(digest(Algo::Sha256, &[n.to_le_bytes(), i.to_le_bytes()].concat()));
            i += 1;
        }
        out.truncate(len);
        out
    }

    /// `pattern[i]`: `Some(n)` → chunk `distinct(n)`, `None` → a uniform chunk (byte `i`).
    fn image(pattern: &[Option<u64>], chunk: usize) -> Vec<u8> {
        let mut out = Vec::new();
        for (i, p) in pattern.iter().enumerate() {
            match p {
                Some(n) => out.extend(distinct(*n, chunk)),
                None => out.extend(std::iter::repeat_n(i as u8, chunk)),
            }
        }
        out
    }

    fn build_from(data: &[u8], algo: Algo, chunk: usize) -> Result<RepoIndex, RepoError> {
        let mut read = |off: u64, buf: &mut [u8]| {
            let off = off as usize;
            buf.copy_from_slice(&data[off..off + buf.len()]);
            Ok(())
        };
        RepoIndex::build(data.len() as u64, algo, chunk, &mut read)
    }

    #[test]
    fn build_records_first_offsets_and_skips_uniform_chunks() {
        let pattern = [Some(1), None, Some(2), Some(1), None, Some(3), Some(2), None];
        let data = image(&pattern, 4096);
        let idx = build_from(&data, Algo::Sha256, 4096).unwrap();
        assert_eq!(idx.len(), 3);
        assert!(!idx.is_empty());
        assert_eq!(idx.size, data.len() as u64);
        assert_eq!((idx.algo, idx.chunk), (Algo::Sha256, 4096));
        assert_eq!(idx.image, openssl::sha::sha256(&data), "image digest is the buffer's SHA-256");
        let d = |n| digest(Algo::Sha256, &distinct(n, 4096));
        assert_eq!(idx.offset(&d(1)), Some(0), "duplicates keep the first offset");
        assert_eq!(idx.offset(&d(2)), Some(2 * 4096));
        assert_eq!(idx.offset(&d(3)), Some(5 * 4096));
        assert!(idx.contains(&d(3)));
        assert!(!idx.contains(&digest(Algo::Sha256, &[0u8; 4096])), "zero chunk not recorded");
        assert!(!idx.contains(&digest(Algo::Sha256, &[1u8; 4096])), "uniform chunk not recorded");
        assert!(!idx.contains(&d(4)));
        let mut got: Vec<Vec<u8>> = idx.digests().map(<[u8]>::to_vec).collect();
        got.sort();
        let mut want = vec![d(1), d(2), d(3)];
        want.sort();
        assert_eq!(got, want);
        assert_eq!(idx.entries().count(), 3);
    }

    #[test]
    fn an_all_uniform_image_is_empty() {
        let data = image(&[None, None, None], 512);
        let idx = build_from(&data, Algo::Sha1, 512).unwrap();
        assert!(idx.is_empty());
        assert_eq!(idx.len(), 0);
        assert_eq!(idx.image, openssl::sha::sha256(&data));
        let empty = build_from(&[], Algo::Sha256, 4096).unwrap();
        assert!(empty.is_empty());
        assert_eq!(empty.image, openssl::sha::sha256(b""));
        assert_eq!(RepoIndex::decode(&empty.encode()).unwrap(), empty);
    }

    #[test]
    fn reads_in_one_mib_pieces_in_order() {
        // 2 MiB + 3 chunks: two full pieces and a short one; chunks straddle nothing.
        let n = 2 * READ_PIECE / 1024 + 3;
        let pattern: Vec<Option<u64>> = (0..n as u64).map(|i| if i % 5 == 4 { None } else { Some(i % 700) }).collect();
        let data = image(&pattern, 1024);
        let mut calls = Vec::new();
        let mut read = |off: u64, buf: &mut [u8]| {
            calls.push((off, buf.len()));
            buf.copy_from_slice(&data[off as usize..off as usize + buf.len()]);
            Ok(())
        };
        let idx = RepoIndex::build(data.len() as u64, Algo::Sha1, 1024, &mut read).unwrap();
        assert_eq!(calls, vec![(0, READ_PIECE), (READ_PIECE as u64, READ_PIECE), (2 * READ_PIECE as u64, 3 * 1024)]);
        assert_eq!(idx.image, openssl::sha::sha256(&data));
        // Contents 0..700 except those ≡ 4 (mod 5): 700 is a multiple of 5, so chunks with such
        // contents all fall on uniform slots.
        assert_eq!(idx.len(), 560);
        // Chunk 1027 (in the second piece) first holds content 1027 % 700 = 327.
        assert_eq!(idx.offset(&digest(Algo::Sha1, &distinct(327, 1024))), Some(327 * 1024));
        assert_eq!(idx.offset(&digest(Algo::Sha1, &distinct(3, 1024))), Some(3 * 1024));
    }

    #[test]
    fn build_all_equals_separate_builds() {
        let pattern: Vec<Option<u64>> = (0..40).map(|i| if i % 3 == 0 { None } else { Some(i % 7) }).collect();
        let data = image(&pattern, 4096);
        let specs = [(Algo::Sha256, 4096), (Algo::Sha1, 4096), (Algo::Sha256, 512), (Algo::Sha1, 2048)];
        let mut reads = 0;
        let mut read = |off: u64, buf: &mut [u8]| {
            reads += 1;
            buf.copy_from_slice(&data[off as usize..off as usize + buf.len()]);
            Ok(())
        };
        let all = RepoIndex::build_all(data.len() as u64, &specs, &mut read).unwrap();
        assert_eq!(reads, 1, "one pass for every spec");
        assert_eq!(all.len(), specs.len());
        for (idx, &(algo, chunk)) in all.iter().zip(&specs) {
            assert_eq!(*idx, build_from(&data, algo, chunk).unwrap(), "{algo} {chunk}");
            assert!(idx.digests().all(|d| d.len() == algo.len()));
        }
        assert!(RepoIndex::build_all(0, &[], &mut |_, _| panic!("nothing to read")).unwrap().is_empty());
    }

    #[test]
    fn bad_sizes_and_chunks_are_refused() {
        let mut never = |_: u64, _: &mut [u8]| -> std::io::Result<()> { panic!("must not read") };
        let e = RepoIndex::build(4096 * 3 + 512, Algo::Sha256, 4096, &mut never).unwrap_err();
        assert!(matches!(e, RepoError::BadSize { size: 12800, chunk: 4096 }), "{e}");
        assert!(e.to_string().contains("12800") && e.to_string().contains("4096"), "{e}");
        for chunk in [0, 1, 256, 3000, 8192] {
            let e = RepoIndex::build(8192, Algo::Sha256, chunk, &mut never).unwrap_err();
            assert!(matches!(e, RepoError::BadChunk(c) if c == chunk), "{e}");
            assert!(e.to_string().contains(&chunk.to_string()), "{e}");
        }
        let e = RepoIndex::build_all(8192, &[(Algo::Sha1, 4096), (Algo::Sha1, 100)], &mut never).unwrap_err();
        assert!(matches!(e, RepoError::BadChunk(100)), "{e}");
    }

    #[test]
    fn read_errors_name_the_offset() {
        let mut failing = |off: u64, _: &mut [u8]| {
            if off == 0 {
                Ok(())
            } else {
                Err(std::io::Error::other("disk on fire"))
            }
        };
        let e = RepoIndex::build(3 * READ_PIECE as u64, Algo::Sha256, 4096, &mut failing).unwrap_err();
        assert!(matches!(e, RepoError::Read { offset, .. } if offset == READ_PIECE as u64), "{e}");
        assert!(e.to_string().contains("disk on fire") && e.to_string().contains("1048576"), "{e}");
    }

    fn sample() -> RepoIndex {
        let pattern = [Some(1), None, Some(2), Some(1), Some(9), None, Some(3), Some(2)];
        build_from(&image(&pattern, 2048), Algo::Sha1, 2048).unwrap()
    }

    #[test]
    fn encode_decode_round_trip() {
        for algo in [Algo::Sha256, Algo::Sha1] {
            let data = image(&[Some(5), Some(6), None, Some(5), Some(7)], 512);
            let idx = build_from(&data, algo, 512).unwrap();
            let bytes = idx.encode();
            assert_eq!(&bytes[..8], b"SHRKREPO");
            assert_eq!(bytes.len(), HEADER_LEN + 3 * (algo.len() + 8));
            let back = RepoIndex::decode(&bytes).unwrap();
            assert_eq!(back, idx);
            assert_eq!(back.encode(), bytes, "deterministic");
            assert_eq!(back.offset(&digest(algo, &distinct(7, 512))), Some(4 * 512));
        }
    }

    /// Rewrites entry `i`'s offset of an encoded index.
    fn set_offset(bytes: &mut [u8], algo: Algo, i: usize, offset: u64) {
        let at = HEADER_LEN + i * (algo.len() + 8) + algo.len();
        bytes[at..at + 8].copy_from_slice(&offset.to_le_bytes());
    }

    fn corrupt(bytes: &[u8]) -> String {
        match RepoIndex::decode(bytes) {
            Err(e @ RepoError::Corrupt(_)) => e.to_string(),
            other => panic!("expected Corrupt, got {other:?}"),
        }
    }

    #[test]
    fn decode_rejects_what_is_wrong() {
        let idx = sample();
        let good = idx.encode();
        assert_eq!(idx.len(), 4);
        for n in 0..good.len() {
            let e = corrupt(&good[..n]);
            assert!(e.contains("truncated") || e.contains("entries"), "{n}: {e}");
        }
        let mut trailing = good.clone();
        trailing.push(0);
        assert!(corrupt(&trailing).contains("entries"));

        let mut b = good.clone();
        b[0] = b'X';
        assert!(corrupt(&b).contains("magic"));
        let mut b = good.clone();
        b[8] = 2;
        assert!(corrupt(&b).contains("version 2"));
        let mut b = good.clone();
        b[HEADER_LEN - 13] = 9;
        assert!(corrupt(&b).contains("algorithm code 9"));
        let mut b = good.clone();
        b[HEADER_LEN - 12..HEADER_LEN - 8].copy_from_slice(&1000u32.to_le_bytes());
        assert!(corrupt(&b).contains("chunk size 1000"));
        let mut b = good.clone();
        b[44..52].copy_from_slice(&(idx.size + 512).to_le_bytes());
        assert!(corrupt(&b).contains("not a multiple"));
        let mut b = good.clone();
        b[HEADER_LEN - 8..HEADER_LEN].copy_from_slice(&5u64.to_le_bytes());
        assert!(corrupt(&b).contains("5 entries"));
        let mut b = good.clone();
        b[HEADER_LEN - 8..HEADER_LEN].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(corrupt(&b).contains("entries"));

        let mut b = good.clone();
        set_offset(&mut b, Algo::Sha1, 3, idx.size);
        assert!(corrupt(&b).contains("beyond the image size"));
        let mut b = good.clone();
        set_offset(&mut b, Algo::Sha1, 1, 2048 * 2 + 1);
        assert!(corrupt(&b).contains("not a multiple of the chunk size"));
        let mut b = good.clone();
        set_offset(&mut b, Algo::Sha1, 1, 0);
        assert!(corrupt(&b).contains("does not follow"));
        // Entry 1's digest copied over entry 2's.
        let mut b = good.clone();
        let l = Algo::Sha1.len() + 8;
        let d1 = b[HEADER_LEN + l..HEADER_LEN + l + 20].to_vec();
        b[HEADER_LEN + 2 * l..HEADER_LEN + 2 * l + 20].copy_from_slice(&d1);
        assert!(corrupt(&b).contains("appears twice"));
    }

    #[test]
    fn stamps_round_trip_and_notice_changes() {
        let s = FileStamp { image: [7; 32], size: 1 << 30, mtime_ns: 1_700_000_000_123_456_789, inode: 42 };
        let b = s.encode();
        assert_eq!(b.len(), STAMP_LEN);
        assert_eq!(FileStamp::decode(&b).unwrap(), s);
        assert!(matches!(FileStamp::decode(&b[..60]), Err(RepoError::Corrupt(_))));
        let mut bad = b.clone();
        bad[3] = 0;
        assert!(FileStamp::decode(&bad).unwrap_err().to_string().contains("magic"));

        let dir = std::env::temp_dir().join(format!("shrink-repo-unit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("img");
        std::fs::write(&f, b"abc").unwrap();
        let st = FileStamp::of_file(&f, [1; 32]).unwrap();
        assert_eq!(st.size, 3);
        assert!(st.is_current(&f).unwrap());
        let file = std::fs::File::options().write(true).open(&f).unwrap();
        file.set_modified(std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_000_000)).unwrap();
        assert!(!st.is_current(&f).unwrap());
        let e = FileStamp::of_file(&dir.join("absent"), [0; 32]).unwrap_err();
        assert!(matches!(e, RepoError::Io { .. }) && e.to_string().contains("absent"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn keys() {
        let image = [0xab; 32];
        let k = chunks_key(&image, Algo::Sha1, 4096);
        assert_eq!(k, format!("shrink:repo:chunks:{}:sha1:4096", "ab".repeat(32)).into_bytes());
        assert_eq!(sample().key(), chunks_key(&sample().image, Algo::Sha1, 2048));
        assert_eq!(file_key(Path::new("/srv/images/base.qcow2")), b"shrink:repo:file:/srv/images/base.qcow2".to_vec());
        let e = RepoError::NoChunks { image: hex(&image), algo: Algo::Sha1, chunk: 512 };
        assert!(e.to_string().contains(&hex(&image)) && e.to_string().contains("--digest sha1 --chunk 512"), "{e}");
    }
}
