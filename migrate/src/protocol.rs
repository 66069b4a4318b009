//! The migration stream: a versioned, self-checking sequence of records on a byte stream
//! (a TCP connection), with the same framing on the back channel from destination to source.
//!
//! # Framing
//!
//! Every record is a 16-byte header followed by its payload:
//!
//! | offset | size | field                                                            |
//! |--------|------|------------------------------------------------------------------|
//! | 0      | 4    | magic `SHRK`                                                     |
//! | 4      | 1    | record type (below)                                              |
//! | 5      | 1    | flags (0)                                                        |
//! | 6      | 2    | reserved (0)                                                     |
//! | 8      | 4    | payload length, little-endian, at most [`MAX_PAYLOAD`]           |
//! | 12     | 4    | CRC-32 (IEEE) of bytes 4..12 of the header and of the payload    |
//!
//! All integers are little-endian. A decoder rejects a bad magic, an unknown type, non-zero
//! flags or reserved bytes, an oversized length, a checksum mismatch, a truncated stream and
//! any payload whose own structure does not add up — before the receiver acts on it.
//!
//! # Records, source → destination
//!
//! | type | record         | payload                                                                 |
//! |------|----------------|-------------------------------------------------------------------------|
//! | 1    | `Hello`        | version u32, chunk size u32, digest kind u8, 3 × 0, memory size u64, VM name (UTF-8, rest) |
//! | 2    | `MemoryLayout` | region count u32, then per region: guest physical address u64, length u64 |
//! | 3    | `Pages`        | entry count u32, then entries (below)                                    |
//! | 4    | `VmState`      | opaque bytes: vCPU, VM and device state as the VMM encodes it           |
//! | 5    | `Iteration`    | pass number u32, bytes still dirty u64 (progress, not needed to restore) |
//! | 6    | `End`          | page entries sent u64, payload bytes sent u64 (checked by the receiver) |
//! | 7    | `Verify`       | SHA-256 (32 bytes) of all guest memory at pause, in address order (optional; sent before `End`) |
//! | 8    | `PullDone`     | chunks sent u32: closes the answer (`Pages` records of full chunks) to a `Pull` |
//! | 9    | `Sync`         | sequence u32: "answer when you have caught up" (sent before the switch-over) |
//! | 10   | `Commit`       | empty: the source has stopped its copy of the guest after a positive `Verdict`; only now may the destination start it |
//! | 11   | `Disks`        | disk count u32, then per disk: size u64, flags u8 (bit 0: a base image digest follows; bit 1: content equal to the base image's is sent as digests, to be read from the destination's repository), 7 × 0, base image SHA-256 (32 bytes, zero without one) |
//!
//! A page entry is a u64 whose low 3 bits are the kind and whose other bits are the chunk's
//! guest physical address (chunks are aligned, so the low bits are free, as in QEMU's format):
//!
//! | kind | entry      | data after the u64                          |
//! |------|------------|---------------------------------------------|
//! | 0    | full       | the chunk (chunk-size bytes)                |
//! | 1    | uniform    | one byte: every byte of the chunk has it    |
//! | 2    | digest     | the chunk's digest (32 bytes SHA-256, 20 bytes SHA-1): the destination finds the content elsewhere |
//! | 3    | compressed | length u32 (less than the chunk size), then the chunk compressed with zstd (one frame) |
//!
//! # Records, destination → source (back channel)
//!
//! | type | record    | payload                                                                |
//! |------|-----------|------------------------------------------------------------------------|
//! | 16   | `Verdict` | status u8 (0 = every page is in place and the VM is restored, ready to start; 1 = failed), message (UTF-8, rest) |
//! | 17   | `Pull`    | count u32, then per chunk: guest physical address u64, digest (stream digest length): content no peer could supply |
//! | 18   | `SyncAck` | sequence u32, chunks still waiting for content u64: everything before the `Sync` is installed |
//! | 19   | `Repository` | disk count u32, then per disk u8 (1: this site's disk starts as the source's base layer — same base image, or neither has one), message (UTF-8, rest: why not) |
//!
//! # Disks
//!
//! A VM's disks are chunks too, in their own address space: chunk addresses at or above
//! [`DISK_SPACE`] are disk offsets, disk `i` at `DISK_SPACE + i × DISK_SPAN` ([`disk_addr`],
//! [`disk_of`]). `MemoryLayout` lists the memory regions, then one region per disk; `Hello`'s
//! memory size counts the memory regions only. Disk chunks travel in the same `Pages` records,
//! with the same digests, and are pulled with the same `Pull`.
//!
//! # Sequence
//!
//! `Hello`, `MemoryLayout`, with disks `Disks` (the source then waits for the destination's
//! `Repository`: which disks need only the blocks of the source's top layer), then per pass
//! zero or more `Pages` and an `Iteration`; after the
//! source pauses the guest: the last `Pages`, `VmState`, (`Verify`), `End`. With deduplication,
//! the destination may then ask for the chunks it could not find at its site with `Pull`
//! records, each answered by `Pages` and `PullDone` (the source is paused: the content is stable
//! and must match the digest). The destination then sends one `Verdict`. Only a `Verdict` with
//! status 0 lets the source stop its copy of the guest; it answers with `Commit`, and only a
//! `Commit` lets the destination start its copy. A source that gives up before the verdict (a
//! destination that stopped answering) closes the connection and resumes its guest: the
//! destination, finding no `Commit`, never starts it. So the guest never runs twice.

use std::io::{Read, Write};

/// Protocol version written by this code.
pub const VERSION: u32 = 3;
/// Record magic.
pub const MAGIC: &[u8; 4] = b"SHRK";
/// Largest payload accepted (a page batch is far smaller).
pub const MAX_PAYLOAD: u32 = 64 << 20;
/// Size of the record header.
pub const HEADER_LEN: usize = 16;

const T_HELLO: u8 = 1;
const T_LAYOUT: u8 = 2;
const T_PAGES: u8 = 3;
const T_VM_STATE: u8 = 4;
const T_ITERATION: u8 = 5;
const T_END: u8 = 6;
const T_VERIFY: u8 = 7;
const T_PULL_DONE: u8 = 8;
const T_SYNC: u8 = 9;
const T_COMMIT: u8 = 10;
const T_DISKS: u8 = 11;
const T_SYNC_ACK: u8 = 18;
const T_REPOSITORY: u8 = 19;
const T_PULL: u8 = 17;
const T_VERDICT: u8 = 16;

const KIND_FULL: u64 = 0;
const KIND_UNIFORM: u64 = 1;
const KIND_DIGEST: u64 = 2;
const KIND_ZSTD: u64 = 3;
const KIND_MASK: u64 = 7;

/// Errors decoding (or writing) a stream.
#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    /// The underlying stream failed.
    #[error("migration stream I/O: {0}")]
    Io(#[from] std::io::Error),
    /// A compressed chunk that does not decompress to one chunk.
    #[error("compressed chunk: {0}")]
    Decompress(String),
    /// The stream ended inside a record.
    #[error("migration stream truncated: {0}")]
    Truncated(&'static str),
    /// Not a shrink migration stream.
    #[error("bad record magic {0:02x?} (not a shrink migration stream)")]
    BadMagic([u8; 4]),
    /// Unknown record type.
    #[error("unknown record type {0}")]
    UnknownType(u8),
    /// Flags or reserved bytes set.
    #[error("record type {0}: reserved header bits set")]
    Reserved(u8),
    /// Payload too long.
    #[error("record type {kind}: payload of {len} bytes exceeds the {MAX_PAYLOAD}-byte limit")]
    TooLong {
        /// Record type.
        kind: u8,
        /// Announced length.
        len: u32,
    },
    /// Checksum mismatch.
    #[error("record type {kind}: checksum mismatch (expected {expected:#010x}, computed {computed:#010x})")]
    Checksum {
        /// Record type.
        kind: u8,
        /// From the header.
        expected: u32,
        /// Over the data.
        computed: u32,
    },
    /// A payload whose structure is wrong.
    #[error("malformed {record} record: {why}")]
    Malformed {
        /// Record name.
        record: &'static str,
        /// What is wrong.
        why: String,
    },
    /// A protocol version this code does not speak.
    #[error("protocol version {0} is not supported (this side speaks version {VERSION})")]
    Version(u32),
}

fn malformed(record: &'static str, why: impl Into<String>) -> ProtocolError {
    ProtocolError::Malformed { record, why: why.into() }
}

/// The digest used for digest-only entries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DigestKind {
    /// No digest entries in this stream (plain pre-copy).
    None,
    /// SHA-256 (32 bytes), the default.
    Sha256,
    /// SHA-1 (20 bytes), the Shrinker paper's configuration.
    Sha1,
}

/// The chunk sizes a stream may use (bytes).
pub const CHUNK_SIZES: [usize; 4] = [512, 1024, 2048, 4096];

/// ORs the dirty bitmap `more` into `into` (bit `i % 64` of word `i / 64` is page or chunk `i`
/// of a region; the VMM's dirty logs and the sender's pass bitmaps both have this layout).
pub fn or_bitmap(into: &mut [u64], more: &[u64]) {
    for (x, y) in into.iter_mut().zip(more) {
        *x |= y;
    }
}

impl DigestKind {
    /// The kind of digests `algo` makes.
    pub fn of(algo: indexd::hash::Algo) -> DigestKind {
        match algo {
            indexd::hash::Algo::Sha256 => DigestKind::Sha256,
            indexd::hash::Algo::Sha1 => DigestKind::Sha1,
        }
    }

    /// The hash function, when there is one.
    pub fn algo(self) -> Option<indexd::hash::Algo> {
        match self {
            DigestKind::None => None,
            DigestKind::Sha256 => Some(indexd::hash::Algo::Sha256),
            DigestKind::Sha1 => Some(indexd::hash::Algo::Sha1),
        }
    }

    /// Digest length in bytes (0 without a hash function).
    pub fn digest_len(self) -> usize {
        self.algo().map_or(0, indexd::hash::Algo::len)
    }

    /// Whether digest entries are allowed.
    pub fn is_none(self) -> bool {
        self == DigestKind::None
    }

    fn code(self) -> u8 {
        match self {
            DigestKind::None => 0,
            DigestKind::Sha256 => 1,
            DigestKind::Sha1 => 2,
        }
    }

    fn from_code(c: u8) -> Option<DigestKind> {
        match c {
            0 => Some(DigestKind::None),
            1 => Some(DigestKind::Sha256),
            2 => Some(DigestKind::Sha1),
            _ => None,
        }
    }
}

/// The first record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    /// Protocol version of the sender.
    pub version: u32,
    /// Deduplication granularity: 512, 1024, 2048 or 4096 bytes.
    pub chunk_size: u32,
    /// Digest of digest-only entries.
    pub digest: DigestKind,
    /// Guest memory size.
    pub mem_size: u64,
    /// VM name.
    pub name: String,
}

/// Chunk addresses at or above this are disk offsets (see the module documentation).
pub const DISK_SPACE: u64 = 1 << 63;
/// The address span of one disk (64 PiB).
pub const DISK_SPAN: u64 = 1 << 56;
/// Most disks one VM may migrate with.
pub const MAX_DISKS: usize = 16;

/// The chunk address of byte `offset` of disk `disk`.
pub fn disk_addr(disk: usize, offset: u64) -> u64 {
    DISK_SPACE + disk as u64 * DISK_SPAN + offset
}

/// The disk and offset of a chunk address in the disk space; `None` for guest memory.
pub fn disk_of(addr: u64) -> Option<(usize, u64)> {
    (addr >= DISK_SPACE).then(|| (((addr - DISK_SPACE) / DISK_SPAN) as usize, (addr - DISK_SPACE) % DISK_SPAN))
}

/// Whether a region of the layout is a disk.
pub fn is_disk(r: &Region) -> bool {
    r.gpa >= DISK_SPACE
}

/// A disk of the migrating VM (`Disks` record).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DiskInfo {
    /// Size in bytes.
    pub size: u64,
    /// SHA-256 of the guest-visible content of its base image (the layer below the VM's own
    /// overlay), if it has one.
    pub base: Option<[u8; 32]>,
    /// Whether the source sends content equal to the base image's as digests (to be read from
    /// the destination's repository when it holds the image).
    pub repository_content: bool,
}

/// A guest memory region.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Region {
    /// Guest physical address.
    pub gpa: u64,
    /// Length in bytes.
    pub len: u64,
}

/// One entry of a `Pages` record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Chunk<'a> {
    /// The whole chunk.
    Full(&'a [u8]),
    /// Every byte equals this one.
    Uniform(u8),
    /// Only the digest: the content is to be found elsewhere.
    Digest(&'a [u8]),
    /// The whole chunk, compressed with zstd ([`decompress`] gives it back).
    Compressed(&'a [u8]),
}

/// The chunk of `chunk_size` bytes a [`Chunk::Compressed`] entry holds.
pub fn decompress(data: &[u8], chunk_size: usize) -> Result<Vec<u8>, ProtocolError> {
    let out = zstd::bulk::decompress(data, chunk_size).map_err(|e| ProtocolError::Decompress(e.to_string()))?;
    if out.len() != chunk_size {
        return Err(ProtocolError::Decompress(format!("{} bytes, not {chunk_size}", out.len())));
    }
    Ok(out)
}

/// `data` compressed with zstd (level 1), when that makes its entry at least an eighth smaller
/// than the chunk in full; `None` when it does not pay.
pub fn compress(data: &[u8]) -> Option<Vec<u8>> {
    let c = zstd::bulk::compress(data, 1).ok()?;
    (c.len() + 4 <= data.len() - data.len() / 8).then_some(c)
}

/// A decoded `Pages` record: entries are parsed lazily from the (already validated) payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pages {
    payload: Vec<u8>,
    count: u32,
    chunk_size: usize,
    digest_len: usize,
}

impl Pages {
    /// Number of entries.
    pub fn len(&self) -> usize {
        self.count as usize
    }

    /// Whether the record is empty.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// The entries: (guest physical address, chunk).
    pub fn iter(&self) -> PagesIter<'_> {
        PagesIter { pages: self, pos: 4, left: self.count }
    }

    /// Size of the encoded payload.
    pub fn payload_len(&self) -> usize {
        self.payload.len()
    }
}

/// Iterator over a [`Pages`] record.
pub struct PagesIter<'a> {
    pages: &'a Pages,
    pos: usize,
    left: u32,
}

impl<'a> Iterator for PagesIter<'a> {
    type Item = (u64, Chunk<'a>);
    fn next(&mut self) -> Option<Self::Item> {
        if self.left == 0 {
            return None;
        }
        self.left -= 1;
        let p = &self.pages.payload;
        let word = u64::from_le_bytes(p[self.pos..self.pos + 8].try_into().ok()?);
        self.pos += 8;
        let addr = word & !KIND_MASK;
        let chunk = match word & KIND_MASK {
            KIND_FULL => {
                let c = &p[self.pos..self.pos + self.pages.chunk_size];
                self.pos += self.pages.chunk_size;
                Chunk::Full(c)
            }
            KIND_UNIFORM => {
                self.pos += 1;
                Chunk::Uniform(p[self.pos - 1])
            }
            KIND_ZSTD => {
                let n = u32::from_le_bytes(p[self.pos..self.pos + 4].try_into().ok()?) as usize;
                let c = &p[self.pos + 4..self.pos + 4 + n];
                self.pos += 4 + n;
                Chunk::Compressed(c)
            }
            _ => {
                let d = &p[self.pos..self.pos + self.pages.digest_len];
                self.pos += self.pages.digest_len;
                Chunk::Digest(d)
            }
        };
        Some((addr, chunk))
    }
}

/// A decoded record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record {
    /// Stream header.
    Hello(Hello),
    /// Guest memory layout.
    MemoryLayout(Vec<Region>),
    /// A batch of chunks.
    Pages(Pages),
    /// Opaque VM state.
    VmState(Vec<u8>),
    /// End of a pass.
    Iteration {
        /// Pass number, from 1.
        pass: u32,
        /// Bytes still dirty after it.
        remaining: u64,
    },
    /// End of the stream.
    End {
        /// Page entries sent.
        entries: u64,
        /// Payload bytes of `Pages` records sent.
        page_bytes: u64,
    },
    /// Digest of all guest memory at pause.
    Verify([u8; 32]),
    /// Chunks the destination asks the source for: (address, digest).
    Pull(Vec<(u64, Vec<u8>)>),
    /// End of the answer to a `Pull`.
    PullDone(u32),
    /// The source asks the destination to catch up before it pauses the guest.
    Sync(u32),
    /// The source stopped its copy: the destination may start the guest.
    Commit,
    /// The destination has installed everything before the `Sync`.
    SyncAck {
        /// The `Sync`'s sequence number.
        seq: u32,
        /// Digest-only chunks still waiting for their content.
        pending: u64,
    },
    /// The source's disks.
    Disks(Vec<DiskInfo>),
    /// The destination's answer to `Disks`.
    Repository {
        /// Per disk: whether the destination's disk starts as the source's base layer, so that
        /// only the source's own blocks need to travel.
        held: Vec<bool>,
        /// Why not, when a disk is not held.
        message: String,
    },
    /// The destination's answer.
    Verdict {
        /// Whether the guest runs at the destination.
        ok: bool,
        /// Explanation.
        message: String,
    },
}

impl Record {
    /// The record's name, for messages.
    pub fn name(&self) -> &'static str {
        match self {
            Record::Hello(_) => "Hello",
            Record::MemoryLayout(_) => "MemoryLayout",
            Record::Pages(_) => "Pages",
            Record::VmState(_) => "VmState",
            Record::Iteration { .. } => "Iteration",
            Record::End { .. } => "End",
            Record::Verify(_) => "Verify",
            Record::Pull(_) => "Pull",
            Record::PullDone(_) => "PullDone",
            Record::Sync(_) => "Sync",
            Record::Commit => "Commit",
            Record::SyncAck { .. } => "SyncAck",
            Record::Verdict { .. } => "Verdict",
            Record::Disks(_) => "Disks",
            Record::Repository { .. } => "Repository",
        }
    }
}

fn read_full<R: Read>(r: &mut R, buf: &mut [u8], what: &'static str) -> Result<bool, ProtocolError> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]) {
            Ok(0) if got == 0 && what == "record header" => return Ok(false),
            Ok(0) => return Err(ProtocolError::Truncated(what)),
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(true)
}

/// Writes one record.
pub fn write_record<W: Write>(w: &mut W, kind: u8, payload: &[u8]) -> Result<(), ProtocolError> {
    let len = u32::try_from(payload.len())
        .ok()
        .filter(|&l| l <= MAX_PAYLOAD)
        .ok_or(ProtocolError::TooLong { kind, len: payload.len().min(u32::MAX as usize) as u32 })?;
    let mut hdr = [0u8; HEADER_LEN];
    hdr[..4].copy_from_slice(MAGIC);
    hdr[4] = kind;
    hdr[8..12].copy_from_slice(&len.to_le_bytes());
    let mut crc = crc32fast::Hasher::new();
    crc.update(&hdr[4..12]);
    crc.update(payload);
    hdr[12..16].copy_from_slice(&crc.finalize().to_le_bytes());
    w.write_all(&hdr)?;
    w.write_all(payload)?;
    Ok(())
}

/// Stream state a decoder needs to parse page entries (from `Hello`).
#[derive(Debug, Clone, Copy)]
pub struct StreamParams {
    /// Chunk size.
    pub chunk_size: usize,
    /// Digest kind.
    pub digest: DigestKind,
}

/// Reads records; page entries are parsed with the chunk size and digest of the `Hello`.
pub struct Decoder {
    params: Option<StreamParams>,
}

impl Default for Decoder {
    fn default() -> Self {
        Self::new()
    }
}

impl Decoder {
    /// A decoder before `Hello`.
    pub fn new() -> Decoder {
        Decoder { params: None }
    }

    /// A decoder for the back channel of a stream with these parameters (it sees no `Hello`).
    pub fn with_params(params: StreamParams) -> Decoder {
        Decoder { params: Some(params) }
    }

    /// Reads the next record; `Ok(None)` at a clean end of stream (between records).
    pub fn read<R: Read>(&mut self, r: &mut R) -> Result<Option<Record>, ProtocolError> {
        let mut hdr = [0u8; HEADER_LEN];
        if !read_full(r, &mut hdr, "record header")? {
            return Ok(None);
        }
        let magic: [u8; 4] = hdr[..4].try_into().expect("4 bytes");
        if &magic != MAGIC {
            return Err(ProtocolError::BadMagic(magic));
        }
        let kind = hdr[4];
        if hdr[5] != 0 || hdr[6] != 0 || hdr[7] != 0 {
            return Err(ProtocolError::Reserved(kind));
        }
        let len = u32::from_le_bytes(hdr[8..12].try_into().expect("4 bytes"));
        if len > MAX_PAYLOAD {
            return Err(ProtocolError::TooLong { kind, len });
        }
        if !matches!(
            kind,
            T_HELLO
                | T_LAYOUT
                | T_PAGES
                | T_VM_STATE
                | T_ITERATION
                | T_END
                | T_VERIFY
                | T_PULL_DONE
                | T_SYNC
                | T_COMMIT
                | T_PULL
                | T_SYNC_ACK
                | T_VERDICT
                | T_DISKS
                | T_REPOSITORY
        ) {
            return Err(ProtocolError::UnknownType(kind));
        }
        let mut payload = vec![0u8; len as usize];
        read_full(r, &mut payload, "record payload")?;
        let expected = u32::from_le_bytes(hdr[12..16].try_into().expect("4 bytes"));
        let mut crc = crc32fast::Hasher::new();
        crc.update(&hdr[4..12]);
        crc.update(&payload);
        let computed = crc.finalize();
        if computed != expected {
            return Err(ProtocolError::Checksum { kind, expected, computed });
        }
        self.decode(kind, payload).map(Some)
    }

    /// Decodes a payload (after framing and checksum were checked).
    pub fn decode(&mut self, kind: u8, payload: Vec<u8>) -> Result<Record, ProtocolError> {
        let u32_at = |p: &[u8], o: usize| u32::from_le_bytes(p[o..o + 4].try_into().expect("4 bytes"));
        let u64_at = |p: &[u8], o: usize| u64::from_le_bytes(p[o..o + 8].try_into().expect("8 bytes"));
        match kind {
            T_HELLO => {
                if payload.len() < 20 {
                    return Err(malformed("Hello", format!("{} bytes, need at least 20", payload.len())));
                }
                let version = u32_at(&payload, 0);
                if version != VERSION {
                    return Err(ProtocolError::Version(version));
                }
                let chunk_size = u32_at(&payload, 4);
                if !CHUNK_SIZES.contains(&(chunk_size as usize)) {
                    return Err(malformed("Hello", format!("chunk size {chunk_size} (one of {CHUNK_SIZES:?})")));
                }
                let digest = DigestKind::from_code(payload[8])
                    .ok_or_else(|| malformed("Hello", format!("digest kind {}", payload[8])))?;
                if payload[9..12] != [0, 0, 0] {
                    return Err(malformed("Hello", "padding not zero"));
                }
                let mem_size = u64_at(&payload, 12);
                let name = String::from_utf8(payload[20..].to_vec())
                    .map_err(|_| malformed("Hello", "VM name is not UTF-8"))?;
                self.params = Some(StreamParams { chunk_size: chunk_size as usize, digest });
                Ok(Record::Hello(Hello { version, chunk_size, digest, mem_size, name }))
            }
            T_LAYOUT => {
                if payload.len() < 4 {
                    return Err(malformed("MemoryLayout", "no region count"));
                }
                let n = u32_at(&payload, 0) as usize;
                if payload.len() != 4 + n.saturating_mul(16) {
                    return Err(malformed("MemoryLayout", format!("{} regions in {} bytes", n, payload.len())));
                }
                let regions: Vec<Region> = (0..n)
                    .map(|i| Region { gpa: u64_at(&payload, 4 + i * 16), len: u64_at(&payload, 12 + i * 16) })
                    .collect();
                for r in &regions {
                    if r.gpa % 4096 != 0 || r.len % 4096 != 0 || r.gpa.checked_add(r.len).is_none() {
                        return Err(malformed(
                            "MemoryLayout",
                            format!("region {:#x}+{:#x} not page aligned", r.gpa, r.len),
                        ));
                    }
                    if is_disk(r) && (r.len > DISK_SPAN || !(r.gpa - DISK_SPACE).is_multiple_of(DISK_SPAN)) {
                        return Err(malformed(
                            "MemoryLayout",
                            format!("disk region {:#x}+{:#x} is not one whole disk", r.gpa, r.len),
                        ));
                    }
                    if !is_disk(r) && r.gpa + r.len > DISK_SPACE {
                        return Err(malformed(
                            "MemoryLayout",
                            format!("memory region {:#x} reaches the disk space", r.gpa),
                        ));
                    }
                }
                Ok(Record::MemoryLayout(regions))
            }
            T_PAGES => {
                let params = self.params.ok_or_else(|| malformed("Pages", "before Hello"))?;
                if payload.len() < 4 {
                    return Err(malformed("Pages", "no entry count"));
                }
                let count = u32_at(&payload, 0);
                let mut pos = 4usize;
                for i in 0..count {
                    if payload.len() < pos + 8 {
                        return Err(malformed("Pages", format!("entry {i} of {count} truncated")));
                    }
                    let word = u64_at(&payload, pos);
                    pos += 8;
                    let addr = word & !KIND_MASK;
                    if !addr.is_multiple_of(params.chunk_size as u64) {
                        return Err(malformed(
                            "Pages",
                            format!("address {addr:#x} not aligned to the {}-byte chunk", params.chunk_size),
                        ));
                    }
                    let data = match word & KIND_MASK {
                        KIND_FULL => params.chunk_size,
                        KIND_UNIFORM => 1,
                        KIND_ZSTD => {
                            if payload.len() < pos + 4 {
                                return Err(malformed("Pages", format!("entry {i} of {count} truncated")));
                            }
                            let n = u32_at(&payload, pos) as usize;
                            if n == 0 || n >= params.chunk_size {
                                return Err(malformed("Pages", format!("compressed entry of {n} bytes")));
                            }
                            4 + n
                        }
                        KIND_DIGEST if !params.digest.is_none() => params.digest.digest_len(),
                        KIND_DIGEST => return Err(malformed("Pages", "digest entry in a stream without digests")),
                        k => return Err(malformed("Pages", format!("entry kind {k}"))),
                    };
                    if payload.len() < pos + data {
                        return Err(malformed("Pages", format!("entry {i} of {count} truncated")));
                    }
                    pos += data;
                }
                if pos != payload.len() {
                    return Err(malformed("Pages", format!("{} trailing bytes", payload.len() - pos)));
                }
                Ok(Record::Pages(Pages {
                    payload,
                    count,
                    chunk_size: params.chunk_size,
                    digest_len: params.digest.digest_len(),
                }))
            }
            T_VM_STATE => Ok(Record::VmState(payload)),
            T_ITERATION => {
                if payload.len() != 12 {
                    return Err(malformed("Iteration", format!("{} bytes, expected 12", payload.len())));
                }
                Ok(Record::Iteration { pass: u32_at(&payload, 0), remaining: u64_at(&payload, 4) })
            }
            T_END => {
                if payload.len() != 16 {
                    return Err(malformed("End", format!("{} bytes, expected 16", payload.len())));
                }
                Ok(Record::End { entries: u64_at(&payload, 0), page_bytes: u64_at(&payload, 8) })
            }
            T_VERIFY => {
                let d: [u8; 32] = payload
                    .as_slice()
                    .try_into()
                    .map_err(|_| malformed("Verify", format!("{} bytes, expected 32", payload.len())))?;
                Ok(Record::Verify(d))
            }
            T_PULL_DONE => {
                if payload.len() != 4 {
                    return Err(malformed("PullDone", format!("{} bytes, expected 4", payload.len())));
                }
                Ok(Record::PullDone(u32_at(&payload, 0)))
            }
            T_SYNC => {
                if payload.len() != 4 {
                    return Err(malformed("Sync", format!("{} bytes, expected 4", payload.len())));
                }
                Ok(Record::Sync(u32_at(&payload, 0)))
            }
            T_COMMIT => {
                if !payload.is_empty() {
                    return Err(malformed("Commit", format!("{} bytes, expected none", payload.len())));
                }
                Ok(Record::Commit)
            }
            T_SYNC_ACK => {
                if payload.len() != 12 {
                    return Err(malformed("SyncAck", format!("{} bytes, expected 12", payload.len())));
                }
                Ok(Record::SyncAck { seq: u32_at(&payload, 0), pending: u64_at(&payload, 4) })
            }
            T_PULL => {
                let params = self.params.ok_or_else(|| malformed("Pull", "before Hello"))?;
                let dl = params.digest.digest_len();
                if params.digest.is_none() {
                    return Err(malformed("Pull", "in a stream without digests"));
                }
                if payload.len() < 4 {
                    return Err(malformed("Pull", "no count"));
                }
                let n = u32_at(&payload, 0) as usize;
                if payload.len() != 4 + n.saturating_mul(8 + dl) {
                    return Err(malformed("Pull", format!("{n} entries in {} bytes", payload.len())));
                }
                Ok(Record::Pull(
                    (0..n)
                        .map(|i| {
                            let o = 4 + i * (8 + dl);
                            (u64_at(&payload, o), payload[o + 8..o + 8 + dl].to_vec())
                        })
                        .collect(),
                ))
            }
            T_DISKS => {
                if payload.len() < 4 {
                    return Err(malformed("Disks", "no disk count"));
                }
                let n = u32_at(&payload, 0) as usize;
                if n > MAX_DISKS || payload.len() != 4 + n * 48 {
                    return Err(malformed(
                        "Disks",
                        format!("{n} disks in {} bytes (at most {MAX_DISKS})", payload.len()),
                    ));
                }
                let mut disks = Vec::with_capacity(n);
                for i in 0..n {
                    let o = 4 + i * 48;
                    let flags = payload[o + 8];
                    if flags > 3 || flags == 2 || payload[o + 9..o + 16].iter().any(|&b| b != 0) {
                        return Err(malformed("Disks", format!("disk {i}: flags or padding")));
                    }
                    let digest: [u8; 32] = payload[o + 16..o + 48].try_into().expect("32 bytes");
                    if flags & 1 == 0 && digest != [0; 32] {
                        return Err(malformed("Disks", format!("disk {i}: a digest without its flag")));
                    }
                    disks.push(DiskInfo {
                        size: u64_at(&payload, o),
                        base: (flags & 1 == 1).then_some(digest),
                        repository_content: flags & 2 == 2,
                    });
                }
                Ok(Record::Disks(disks))
            }
            T_REPOSITORY => {
                if payload.len() < 4 {
                    return Err(malformed("Repository", "no disk count"));
                }
                let n = u32_at(&payload, 0) as usize;
                if n > MAX_DISKS || payload.len() < 4 + n {
                    return Err(malformed("Repository", format!("{n} disks in {} bytes", payload.len())));
                }
                if payload[4..4 + n].iter().any(|&b| b > 1) {
                    return Err(malformed("Repository", "a flag other than 0 or 1"));
                }
                let held = payload[4..4 + n].iter().map(|&b| b == 1).collect();
                let message = String::from_utf8(payload[4 + n..].to_vec())
                    .map_err(|_| malformed("Repository", "message is not UTF-8"))?;
                Ok(Record::Repository { held, message })
            }
            T_VERDICT => {
                if payload.is_empty() || payload[0] > 1 {
                    return Err(malformed("Verdict", "status must be 0 or 1"));
                }
                let message = String::from_utf8(payload[1..].to_vec())
                    .map_err(|_| malformed("Verdict", "message is not UTF-8"))?;
                Ok(Record::Verdict { ok: payload[0] == 0, message })
            }
            other => Err(ProtocolError::UnknownType(other)),
        }
    }
}

/// Writes `Hello`.
pub fn write_hello<W: Write>(w: &mut W, h: &Hello) -> Result<(), ProtocolError> {
    let mut p = Vec::with_capacity(20 + h.name.len());
    p.extend_from_slice(&h.version.to_le_bytes());
    p.extend_from_slice(&h.chunk_size.to_le_bytes());
    p.push(h.digest.code());
    p.extend_from_slice(&[0, 0, 0]);
    p.extend_from_slice(&h.mem_size.to_le_bytes());
    p.extend_from_slice(h.name.as_bytes());
    write_record(w, T_HELLO, &p)
}

/// Writes `MemoryLayout`.
pub fn write_layout<W: Write>(w: &mut W, regions: &[Region]) -> Result<(), ProtocolError> {
    let mut p = Vec::with_capacity(4 + regions.len() * 16);
    p.extend_from_slice(&(regions.len() as u32).to_le_bytes());
    for r in regions {
        p.extend_from_slice(&r.gpa.to_le_bytes());
        p.extend_from_slice(&r.len.to_le_bytes());
    }
    write_record(w, T_LAYOUT, &p)
}

/// Writes `VmState`.
pub fn write_vm_state<W: Write>(w: &mut W, state: &[u8]) -> Result<(), ProtocolError> {
    write_record(w, T_VM_STATE, state)
}

/// Writes `Iteration`.
pub fn write_iteration<W: Write>(w: &mut W, pass: u32, remaining: u64) -> Result<(), ProtocolError> {
    let mut p = [0u8; 12];
    p[..4].copy_from_slice(&pass.to_le_bytes());
    p[4..].copy_from_slice(&remaining.to_le_bytes());
    write_record(w, T_ITERATION, &p)
}

/// Writes `End`.
pub fn write_end<W: Write>(w: &mut W, entries: u64, page_bytes: u64) -> Result<(), ProtocolError> {
    let mut p = [0u8; 16];
    p[..8].copy_from_slice(&entries.to_le_bytes());
    p[8..].copy_from_slice(&page_bytes.to_le_bytes());
    write_record(w, T_END, &p)
}

/// Writes `Verify`.
pub fn write_verify<W: Write>(w: &mut W, digest: &[u8; 32]) -> Result<(), ProtocolError> {
    write_record(w, T_VERIFY, digest)
}

/// Writes `Pull`.
pub fn write_pull<W: Write>(w: &mut W, entries: &[(u64, Vec<u8>)]) -> Result<(), ProtocolError> {
    let mut p = Vec::with_capacity(4 + entries.len() * 40);
    p.extend_from_slice(&(entries.len() as u32).to_le_bytes());
    for (gpa, d) in entries {
        p.extend_from_slice(&gpa.to_le_bytes());
        p.extend_from_slice(d);
    }
    write_record(w, T_PULL, &p)
}

/// Writes `PullDone`.
pub fn write_pull_done<W: Write>(w: &mut W, chunks: u32) -> Result<(), ProtocolError> {
    write_record(w, T_PULL_DONE, &chunks.to_le_bytes())
}

/// Writes `Sync`.
pub fn write_sync<W: Write>(w: &mut W, seq: u32) -> Result<(), ProtocolError> {
    write_record(w, T_SYNC, &seq.to_le_bytes())
}

/// Writes `Commit`.
pub fn write_commit<W: Write>(w: &mut W) -> Result<(), ProtocolError> {
    write_record(w, T_COMMIT, &[])
}

/// Writes `SyncAck`.
pub fn write_sync_ack<W: Write>(w: &mut W, seq: u32, pending: u64) -> Result<(), ProtocolError> {
    let mut p = [0u8; 12];
    p[..4].copy_from_slice(&seq.to_le_bytes());
    p[4..].copy_from_slice(&pending.to_le_bytes());
    write_record(w, T_SYNC_ACK, &p)
}

/// Writes `Verdict`.
pub fn write_verdict<W: Write>(w: &mut W, ok: bool, message: &str) -> Result<(), ProtocolError> {
    let mut p = vec![if ok { 0 } else { 1 }];
    p.extend_from_slice(message.as_bytes());
    write_record(w, T_VERDICT, &p)
}

/// Writes `Disks`.
pub fn write_disks<W: Write>(w: &mut W, disks: &[DiskInfo]) -> Result<(), ProtocolError> {
    let mut p = Vec::with_capacity(4 + disks.len() * 48);
    p.extend_from_slice(&(disks.len() as u32).to_le_bytes());
    for d in disks {
        p.extend_from_slice(&d.size.to_le_bytes());
        p.push(d.base.is_some() as u8 | ((d.base.is_some() && d.repository_content) as u8) << 1);
        p.extend_from_slice(&[0; 7]);
        p.extend_from_slice(&d.base.unwrap_or([0; 32]));
    }
    write_record(w, T_DISKS, &p)
}

/// Writes `Repository`.
pub fn write_repository<W: Write>(w: &mut W, held: &[bool], message: &str) -> Result<(), ProtocolError> {
    let mut p = Vec::with_capacity(4 + held.len() + message.len());
    p.extend_from_slice(&(held.len() as u32).to_le_bytes());
    p.extend(held.iter().map(|&h| h as u8));
    p.extend_from_slice(message.as_bytes());
    write_record(w, T_REPOSITORY, &p)
}

/// Accumulates page entries into `Pages` records of about `target` bytes.
pub struct PagesBuilder {
    buf: Vec<u8>,
    count: u32,
    chunk_size: usize,
    digest_len: usize,
    target: usize,
}

impl PagesBuilder {
    /// A builder for chunks of `chunk_size` bytes and digests of `digest`.
    pub fn new(chunk_size: usize, digest: DigestKind, target: usize) -> PagesBuilder {
        let mut buf = Vec::with_capacity(target + chunk_size + 16);
        buf.extend_from_slice(&[0, 0, 0, 0]);
        PagesBuilder { buf, count: 0, chunk_size, digest_len: digest.digest_len(), target }
    }

    /// Adds a full chunk.
    pub fn full(&mut self, addr: u64, data: &[u8]) {
        debug_assert_eq!(data.len(), self.chunk_size);
        self.buf.extend_from_slice(&(addr | KIND_FULL).to_le_bytes());
        self.buf.extend_from_slice(data);
        self.count += 1;
    }

    /// Adds a chunk compressed with zstd (`data`, from [`compress`]).
    pub fn compressed(&mut self, addr: u64, data: &[u8]) {
        debug_assert!(!data.is_empty() && data.len() < self.chunk_size);
        self.buf.extend_from_slice(&(addr | KIND_ZSTD).to_le_bytes());
        self.buf.extend_from_slice(&(data.len() as u32).to_le_bytes());
        self.buf.extend_from_slice(data);
        self.count += 1;
    }

    /// Adds a uniform chunk.
    pub fn uniform(&mut self, addr: u64, byte: u8) {
        self.buf.extend_from_slice(&(addr | KIND_UNIFORM).to_le_bytes());
        self.buf.push(byte);
        self.count += 1;
    }

    /// Adds a digest-only chunk.
    pub fn digest(&mut self, addr: u64, digest: &[u8]) {
        debug_assert_eq!(digest.len(), self.digest_len);
        self.buf.extend_from_slice(&(addr | KIND_DIGEST).to_le_bytes());
        self.buf.extend_from_slice(digest);
        self.count += 1;
    }

    /// Whether the batch reached its target size.
    pub fn is_full(&self) -> bool {
        self.buf.len() >= self.target
    }

    /// Entries in the batch.
    pub fn len(&self) -> u32 {
        self.count
    }

    /// Whether the batch is empty.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Writes the batch as one `Pages` record (if not empty) and starts a new one; returns the
    /// payload bytes written.
    pub fn flush<W: Write>(&mut self, w: &mut W) -> Result<usize, ProtocolError> {
        if self.count == 0 {
            return Ok(0);
        }
        self.buf[..4].copy_from_slice(&self.count.to_le_bytes());
        write_record(w, T_PAGES, &self.buf)?;
        let n = self.buf.len();
        self.buf.truncate(4);
        self.count = 0;
        Ok(n)
    }
}

/// Whether every byte of `chunk` is equal; returns that byte.
pub fn uniform_byte(chunk: &[u8]) -> Option<u8> {
    let first = *chunk.first()?;
    let word = u64::from_ne_bytes([first; 8]);
    let (pre, mid, post) = {
        // SAFETY: any byte pattern is a valid u64; align_to only yields aligned middles.
        unsafe { chunk.align_to::<u64>() }
    };
    (pre.iter().all(|&b| b == first) && mid.iter().all(|&w| w == word) && post.iter().all(|&b| b == first))
        .then_some(first)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn or_bitmap_adds_every_set_bit_and_clears_none() {
        let mut a = vec![0b0101, 0, u64::MAX];
        or_bitmap(&mut a, &[0b0011, 1 << 63, 0]);
        assert_eq!(a, vec![0b0111, 1 << 63, u64::MAX]);
    }

    fn hello(digest: DigestKind, chunk: u32) -> Hello {
        Hello { version: VERSION, chunk_size: chunk, digest, mem_size: 1 << 30, name: "vm1".into() }
    }

    fn stream() -> Vec<u8> {
        let mut s = Vec::new();
        write_hello(&mut s, &hello(DigestKind::Sha256, 4096)).unwrap();
        write_layout(&mut s, &[Region { gpa: 0, len: 1 << 30 }]).unwrap();
        let mut b = PagesBuilder::new(4096, DigestKind::Sha256, 1 << 20);
        b.full(0x1000, &[7u8; 4096]);
        b.uniform(0x2000, 0);
        b.digest(0x3000, &[9u8; 32]);
        b.flush(&mut s).unwrap();
        write_iteration(&mut s, 1, 4096).unwrap();
        write_vm_state(&mut s, b"{\"vcpus\":[]}").unwrap();
        write_end(&mut s, 3, 4 + 8 + 4096 + 8 + 1 + 8 + 32).unwrap();
        s
    }

    #[test]
    fn compressed_chunks_round_trip_and_are_checked() {
        let text: Vec<u8> = (0..4096u32).map(|i| b"shrink moves clusters "[i as usize % 22]).collect();
        let c = compress(&text).expect("text compresses");
        let mut x = 88172645463325252u64;
        let noise: Vec<u8> = (0..4096)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        assert!(compress(&noise).is_none(), "noise does not pay");
        let mut s = Vec::new();
        write_hello(&mut s, &hello(DigestKind::None, 4096)).unwrap();
        let mut b = PagesBuilder::new(4096, DigestKind::None, 1 << 20);
        b.compressed(0x5000, &c);
        b.uniform(0x6000, 3);
        b.flush(&mut s).unwrap();
        let mut d = Decoder::new();
        let mut r = &s[..];
        let _ = d.read(&mut r).unwrap();
        let Some(Record::Pages(p)) = d.read(&mut r).unwrap() else { panic!() };
        let e: Vec<_> = p.iter().collect();
        assert_eq!(e[0], (0x5000, Chunk::Compressed(&c)));
        assert_eq!(decompress(&c, 4096).unwrap(), text);
        assert!(decompress(&c, 2048).is_err(), "a chunk of another size is refused");
        assert!(decompress(b"not zstd", 4096).is_err());
        // A compressed entry as long as a chunk is malformed.
        let mut s = Vec::new();
        write_hello(&mut s, &hello(DigestKind::None, 512)).unwrap();
        let mut bad = Vec::new();
        bad.extend_from_slice(&1u32.to_le_bytes());
        bad.extend_from_slice(&(0x1000u64 | 3).to_le_bytes());
        bad.extend_from_slice(&512u32.to_le_bytes());
        bad.extend_from_slice(&[0; 512]);
        write_record(&mut s, T_PAGES, &bad).unwrap();
        let mut d = Decoder::new();
        let mut r = &s[..];
        let _ = d.read(&mut r).unwrap();
        assert!(d.read(&mut r).unwrap_err().to_string().contains("compressed entry of 512 bytes"));
    }

    #[test]
    fn disks_and_their_repository_answer_round_trip() {
        assert_eq!(disk_of(disk_addr(0, 0x1000)), Some((0, 0x1000)));
        assert_eq!(disk_of(disk_addr(3, DISK_SPAN - 4096)), Some((3, DISK_SPAN - 4096)));
        assert_eq!(disk_of(0x1000), None);
        let disks = [
            DiskInfo { size: 1 << 30, base: Some([7; 32]), repository_content: true },
            DiskInfo { size: 1 << 20, base: None, repository_content: false },
        ];
        let mut s = Vec::new();
        write_hello(&mut s, &hello(DigestKind::Sha256, 4096)).unwrap();
        let layout = [
            Region { gpa: 0, len: 1 << 30 },
            Region { gpa: disk_addr(0, 0), len: 1 << 30 },
            Region { gpa: disk_addr(1, 0), len: 1 << 20 },
        ];
        write_layout(&mut s, &layout).unwrap();
        write_disks(&mut s, &disks).unwrap();
        let mut b = PagesBuilder::new(4096, DigestKind::Sha256, 1 << 20);
        b.full(disk_addr(0, 0x2000), &[1; 4096]);
        b.digest(disk_addr(1, 0), &[2; 32]);
        b.flush(&mut s).unwrap();
        write_repository(&mut s, &[true, false], "disk 1: no base image here").unwrap();
        let mut d = Decoder::new();
        let mut r = &s[..];
        let recs: Vec<Record> = std::iter::from_fn(|| d.read(&mut r).unwrap()).collect();
        assert_eq!(recs[1], Record::MemoryLayout(layout.to_vec()));
        assert_eq!(recs[2], Record::Disks(disks.to_vec()));
        let Record::Pages(p) = &recs[3] else { panic!() };
        let e: Vec<_> = p.iter().collect();
        assert_eq!(
            e,
            vec![(disk_addr(0, 0x2000), Chunk::Full(&[1; 4096])), (disk_addr(1, 0), Chunk::Digest(&[2; 32]))]
        );
        assert_eq!(
            recs[4],
            Record::Repository { held: vec![true, false], message: "disk 1: no base image here".into() }
        );
        // A disk region that is not one whole disk, a memory region reaching the disk space.
        for bad in [
            Region { gpa: disk_addr(0, 4096), len: 4096 },
            Region { gpa: disk_addr(0, 0), len: DISK_SPAN + 4096 },
            Region { gpa: DISK_SPACE - 4096, len: 8192 },
        ] {
            let mut s = Vec::new();
            write_layout(&mut s, &[bad]).unwrap();
            let e = Decoder::new().read(&mut &s[..]).unwrap_err().to_string();
            assert!(e.contains("MemoryLayout"), "{e}");
        }
    }

    #[test]
    fn round_trip() {
        let s = stream();
        let mut d = Decoder::new();
        let mut r = &s[..];
        let recs: Vec<Record> = std::iter::from_fn(|| d.read(&mut r).unwrap()).collect();
        assert_eq!(recs.len(), 6);
        assert_eq!(recs[0], Record::Hello(hello(DigestKind::Sha256, 4096)));
        assert_eq!(recs[1], Record::MemoryLayout(vec![Region { gpa: 0, len: 1 << 30 }]));
        let Record::Pages(p) = &recs[2] else { panic!() };
        let entries: Vec<_> = p.iter().collect();
        assert_eq!(
            entries,
            vec![(0x1000, Chunk::Full(&[7u8; 4096])), (0x2000, Chunk::Uniform(0)), (0x3000, Chunk::Digest(&[9u8; 32]))]
        );
        assert_eq!(recs[3], Record::Iteration { pass: 1, remaining: 4096 });
        assert_eq!(recs[5], Record::End { entries: 3, page_bytes: 4157 });
        assert_eq!(p.payload_len(), 4157);
    }

    #[test]
    fn every_corruption_is_caught() {
        let s = stream();
        // Flip each byte of the stream in turn: decoding must fail (never succeed silently with
        // different content, never panic).
        for i in 0..s.len() {
            let mut bad = s.clone();
            bad[i] ^= 0x5a;
            let mut d = Decoder::new();
            let mut r = &bad[..];
            let mut failed = false;
            loop {
                match d.read(&mut r) {
                    Ok(Some(_)) => {}
                    Ok(None) => break,
                    Err(_) => {
                        failed = true;
                        break;
                    }
                }
            }
            assert!(failed, "corruption at byte {i} went unnoticed");
        }
    }

    #[test]
    fn truncation_and_garbage() {
        let s = stream();
        for cut in [1, 15, 16, 17, 100, s.len() - 1] {
            let mut d = Decoder::new();
            let mut r = &s[..cut];
            let res: Result<Vec<_>, _> = std::iter::from_fn(|| d.read(&mut r).transpose()).collect();
            assert!(matches!(res, Err(ProtocolError::Truncated(_))), "cut at {cut}: {res:?}");
        }
        let mut d = Decoder::new();
        assert!(matches!(d.read(&mut &b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"[..]), Err(ProtocolError::BadMagic(_))));
        assert!(d.read(&mut &b""[..]).unwrap().is_none());
    }

    #[test]
    fn semantic_checks() {
        let mut d = Decoder::new();
        let mut p = Vec::new();
        p.extend_from_slice(&1u32.to_le_bytes());
        p.extend_from_slice(&(0x1000u64 | KIND_FULL).to_le_bytes());
        assert!(matches!(d.decode(T_PAGES, p.clone()), Err(ProtocolError::Malformed { .. })), "pages before hello");
        d.decode(T_HELLO, {
            let mut s = Vec::new();
            write_hello(&mut s, &hello(DigestKind::None, 1024)).unwrap();
            s[HEADER_LEN..].to_vec()
        })
        .unwrap();
        // A digest entry in a stream without digests.
        let mut q = 1u32.to_le_bytes().to_vec();
        q.extend_from_slice(&(0x400u64 | KIND_DIGEST).to_le_bytes());
        assert!(d.decode(T_PAGES, q).unwrap_err().to_string().contains("without digests"));
        // Misaligned address for 1 KiB chunks.
        let mut q = 1u32.to_le_bytes().to_vec();
        q.extend_from_slice(&(0x200u64 | KIND_UNIFORM).to_le_bytes());
        q.push(0);
        assert!(d.decode(T_PAGES, q).unwrap_err().to_string().contains("not aligned"));
        // Wrong version.
        let mut h = Vec::new();
        write_hello(&mut h, &Hello { version: 9, ..hello(DigestKind::Sha1, 4096) }).unwrap();
        assert!(matches!(Decoder::new().decode(T_HELLO, h[HEADER_LEN..].to_vec()), Err(ProtocolError::Version(9))));
        // Oversized announcement.
        let mut big = stream()[..HEADER_LEN].to_vec();
        big[8..12].copy_from_slice(&(MAX_PAYLOAD + 1).to_le_bytes());
        assert!(matches!(Decoder::new().read(&mut &big[..]), Err(ProtocolError::TooLong { .. })));
    }

    #[test]
    fn pulls() {
        let mut s = Vec::new();
        write_hello(&mut s, &hello(DigestKind::Sha1, 4096)).unwrap();
        write_pull(&mut s, &[(0x1000, vec![1; 20]), (0x5000, vec![2; 20])]).unwrap();
        write_pull_done(&mut s, 2).unwrap();
        let mut d = Decoder::new();
        let mut r = &s[..];
        d.read(&mut r).unwrap();
        assert_eq!(d.read(&mut r).unwrap().unwrap(), Record::Pull(vec![(0x1000, vec![1; 20]), (0x5000, vec![2; 20])]));
        assert_eq!(d.read(&mut r).unwrap().unwrap(), Record::PullDone(2));
        // A pull in a plain stream makes no sense.
        let mut s = Vec::new();
        write_hello(&mut s, &hello(DigestKind::None, 4096)).unwrap();
        write_pull(&mut s, &[(0x1000, vec![])]).unwrap();
        let mut d = Decoder::new();
        let mut r = &s[..];
        d.read(&mut r).unwrap();
        assert!(d.read(&mut r).unwrap_err().to_string().contains("without digests"));
    }

    #[test]
    fn verdicts() {
        let mut s = Vec::new();
        write_verdict(&mut s, false, "checksum error").unwrap();
        let r = Decoder::new().read(&mut &s[..]).unwrap().unwrap();
        assert_eq!(r, Record::Verdict { ok: false, message: "checksum error".into() });
    }

    #[test]
    fn uniform_detection() {
        assert_eq!(uniform_byte(&[0u8; 4096]), Some(0));
        assert_eq!(uniform_byte(&[0xffu8; 512]), Some(0xff));
        let mut c = vec![3u8; 4096];
        c[4095] = 4;
        assert_eq!(uniform_byte(&c), None);
        assert_eq!(uniform_byte(&c[1..]), None);
        assert_eq!(uniform_byte(&[]), None);
    }
}
