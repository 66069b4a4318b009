//! virtio-blk on a qcow2 overlay (through `imago`, synchronous) whose backing file is the shared
//! base image, as clouds give each VM its own copy-on-write disk. The base is opened read-only
//! and never written; flush requests reach the overlay's file.
//!
//! For live migration a disk offers [`DiskHandle`]: reads of its guest-visible content, the
//! blocks its own overlay holds ([`allocated_blocks`]: the first pass sends only those when the
//! destination has the same base image), and a log of the blocks the guest writes
//! ([`DirtyBlocks`], as KVM's dirty log for memory). A destination writes the arriving blocks
//! into a fresh overlay ([`create_overlay`]) on its own copy of the base image, or into a
//! standalone image when it has none.

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use imago::file::File as ImagoFile;
use imago::qcow2::Qcow2;
use imago::{
    FormatAccess, FormatCreateBuilder, FormatDriverBuilder, PermissiveImplicitOpenGate, Storage, StorageCreateOptions,
};
use serde::{Deserialize, Serialize};
use virtio_queue::{QueueOwnedT, QueueT};
use vm_memory::ByteValued;
use vmm_sys_util::eventfd::EventFd;

use super::worker::{Handler, Worker};
use super::{ActivateContext, ActivateError, Interrupt, SharedQueues, VirtioDevice, TYPE_BLOCK, VIRTIO_F_VERSION_1};
use crate::vstate::memory::GuestMemoryMmap;

const VIRTIO_BLK_F_FLUSH: u64 = 1 << 9;
const QUEUE_SIZES: [u16; 1] = [256];
const SECTOR: u64 = 512;
const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
const T_GET_ID: u32 = 8;
const S_OK: u8 = 0;
const S_IOERR: u8 = 1;
const S_UNSUPP: u8 = 2;
/// Largest single request we accept (Linux sends at most a few MiB).
const MAX_REQUEST: usize = 32 << 20;
const QCOW2_MAGIC: &[u8; 4] = b"QFI\xfb";

/// Errors opening disks.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    /// The base image cannot be read.
    #[error("base image {path}: {source}")]
    Base {
        /// The file.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// The base image is not qcow2.
    #[error("base image {0} is not a qcow2 image")]
    NotQcow2(PathBuf),
    /// The overlay could not be created or opened.
    #[error("disk overlay {path}: {source}")]
    Overlay {
        /// The file.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// An existing overlay belongs to another base image.
    #[error("disk overlay {path} is backed by {found}, not by {expected}")]
    WrongBacking {
        /// The overlay.
        path: PathBuf,
        /// Its backing file.
        found: String,
        /// The base given.
        expected: String,
    },
}

/// `--image BASE [--disk OVERLAY]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskConfig {
    /// The shared base image (read-only).
    pub base: PathBuf,
    /// The VM's overlay (created if absent).
    pub overlay: PathBuf,
    /// The "overlay" holds the whole disk, with no backing file (a disk migrated to a site
    /// whose repository lacks its base image).
    #[serde(default)]
    pub standalone: bool,
}

/// Size of a dirty-log block (the page size of memory's dirty log).
pub const BLOCK: u64 = 4096;

/// The blocks of a disk written while logging is on (one bit per [`BLOCK`]), set once a write
/// has completed: a block whose bit was taken and read may have been read half-written, but its
/// bit is then set again.
#[derive(Debug)]
pub struct DirtyBlocks {
    on: std::sync::atomic::AtomicBool,
    words: Vec<AtomicU64>,
}

impl DirtyBlocks {
    /// A log for a disk of `size` bytes, off.
    pub fn new(size: u64) -> DirtyBlocks {
        let blocks = size.div_ceil(BLOCK) as usize;
        DirtyBlocks {
            on: std::sync::atomic::AtomicBool::new(false),
            words: (0..blocks.div_ceil(64)).map(|_| AtomicU64::new(0)).collect(),
        }
    }
    /// Starts logging (from a clean log).
    pub fn start(&self) {
        for w in &self.words {
            w.store(0, Ordering::SeqCst);
        }
        self.on.store(true, Ordering::SeqCst);
    }
    /// Stops logging.
    pub fn stop(&self) {
        self.on.store(false, Ordering::SeqCst);
    }
    /// Records a completed write of `len` bytes at `offset`.
    pub fn mark(&self, offset: u64, len: u64) {
        if len == 0 || !self.on.load(Ordering::SeqCst) {
            return;
        }
        for b in offset / BLOCK..=(offset + len - 1) / BLOCK {
            if let Some(w) = self.words.get((b / 64) as usize) {
                w.fetch_or(1 << (b % 64), Ordering::SeqCst);
            }
        }
    }
    /// The blocks written since the last call (bit per block), clearing them.
    pub fn take(&self) -> Vec<u64> {
        self.words.iter().map(|w| w.swap(0, Ordering::SeqCst)).collect()
    }
}

/// What a migration needs of a VM's disk.
#[derive(Clone)]
pub struct DiskHandle {
    /// The open overlay (the device's own instance).
    pub disk: Arc<Disk>,
    /// Blocks written by the guest.
    pub dirty: Arc<DirtyBlocks>,
    /// How the disk was opened.
    pub config: DiskConfig,
}

impl DiskHandle {
    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.disk.size()
    }
}

/// The blocks (bit per [`BLOCK`]) whose content the top layer of `disk` holds itself, data or
/// explicit zeroes: the rest reads through to the backing file (or as zeroes without one).
pub fn allocated_blocks(disk: &Disk) -> std::io::Result<Vec<u64>> {
    use imago::ShallowMapping;
    let size = disk.size();
    let mut bits = vec![0u64; size.div_ceil(BLOCK).div_ceil(64) as usize];
    let mut off = 0u64;
    while off < size {
        let (mapping, len) = disk.get_shallow_mapping(off, size - off)?;
        let own = match mapping {
            ShallowMapping::Indirect { .. } | ShallowMapping::Eof { .. } => false,
            ShallowMapping::Zero { explicit, .. } => explicit,
            _ => true,
        };
        if len == 0 {
            return Err(std::io::Error::other(format!("no mapping at offset {off} of {size}")));
        }
        if own {
            for b in off / BLOCK..(off + len).div_ceil(BLOCK) {
                bits[(b / 64) as usize] |= 1 << (b % 64);
            }
        }
        off += len;
    }
    Ok(bits)
}

/// Opens a qcow2 image read-only (the whole chain under it).
pub fn open_read_only(path: &Path) -> Result<Disk, DiskError> {
    check_qcow2(path)?;
    let img = Qcow2::<ImagoFile>::builder_path(path)
        .write(false)
        .open(PermissiveImplicitOpenGate::default())
        .map_err(|source| DiskError::Base { path: path.to_owned(), source })?;
    Ok(FormatAccess::new(img))
}

/// Creates the fresh overlay a migrated disk of `size` bytes is written into: on `cfg.base`,
/// or standalone (`cfg.standalone`). An existing file is never overwritten.
pub fn create_overlay(cfg: &DiskConfig, size: u64) -> Result<Disk, DiskError> {
    let ov = &cfg.overlay;
    let ov_err = |source| DiskError::Overlay { path: ov.clone(), source };
    if ov.exists() {
        return Err(ov_err(std::io::Error::new(
            std::io::ErrorKind::AlreadyExists,
            "already exists (a migrated disk is written into a new file: remove it, or name another)",
        )));
    }
    let base = if cfg.standalone {
        None
    } else {
        let base =
            std::fs::canonicalize(&cfg.base).map_err(|source| DiskError::Base { path: cfg.base.clone(), source })?;
        check_qcow2(&base)?;
        Some(base)
    };
    let file = ImagoFile::create_open(StorageCreateOptions::new().filename(ov).overwrite(false)).map_err(ov_err)?;
    let builder = Qcow2::<ImagoFile>::create_builder(file).size(size);
    let made = match base {
        None => builder.create(),
        Some(base) => builder.backing(base.display().to_string(), "qcow2".into()).create(),
    };
    // A half-made file must not block the next attempt.
    let opened = made.map_err(ov_err).and_then(|()| open_overlay(cfg));
    if opened.is_err() {
        let _ = std::fs::remove_file(ov);
    }
    opened
}

/// An open overlay.
pub type Disk = FormatAccess<ImagoFile>;

fn check_qcow2(path: &Path) -> Result<(), DiskError> {
    let mut magic = [0u8; 4];
    let mut f = std::fs::File::open(path).map_err(|source| DiskError::Base { path: path.to_owned(), source })?;
    match f.read_exact(&mut magic) {
        Ok(()) if &magic == QCOW2_MAGIC => Ok(()),
        _ => Err(DiskError::NotQcow2(path.to_owned())),
    }
}

/// Opens the VM's overlay, creating it on `base` when it does not exist yet.
pub fn open_overlay(cfg: &DiskConfig) -> Result<Disk, DiskError> {
    if cfg.standalone {
        let ov = &cfg.overlay;
        let ov_err = |source| DiskError::Overlay { path: ov.clone(), source };
        check_qcow2(ov).map_err(|_| ov_err(std::io::Error::other("not a qcow2 image")))?;
        let img = Qcow2::<ImagoFile>::builder_path(ov)
            .write(true)
            .open(PermissiveImplicitOpenGate::default())
            .map_err(ov_err)?;
        if let Some(b) = img.implicit_backing_file() {
            return Err(DiskError::WrongBacking { path: ov.clone(), found: b.clone(), expected: "none".into() });
        }
        return Ok(FormatAccess::new(img));
    }
    let base = std::fs::canonicalize(&cfg.base).map_err(|source| DiskError::Base { path: cfg.base.clone(), source })?;
    check_qcow2(&base)?;
    let base_err = |source| DiskError::Base { path: base.clone(), source };
    let base_img = Qcow2::<ImagoFile>::builder_path(&base)
        .write(false)
        .open(PermissiveImplicitOpenGate::default())
        .map_err(base_err)?;
    let size = FormatAccess::new(base_img).size();
    let ov = &cfg.overlay;
    let ov_err = |source| DiskError::Overlay { path: ov.clone(), source };
    if !ov.exists() {
        let file = ImagoFile::create_open(StorageCreateOptions::new().filename(ov).overwrite(false)).map_err(ov_err)?;
        Qcow2::<ImagoFile>::create_builder(file)
            .size(size)
            .backing(base.display().to_string(), "qcow2".into())
            .create()
            .map_err(ov_err)?;
    } else {
        check_qcow2(ov).map_err(|_| ov_err(std::io::Error::other("not a qcow2 image")))?;
    }
    let overlay =
        Qcow2::<ImagoFile>::builder_path(ov).write(true).open(PermissiveImplicitOpenGate::default()).map_err(ov_err)?;
    let found = overlay.implicit_backing_file().cloned().unwrap_or_default();
    let found_abs = ov.parent().unwrap_or(Path::new(".")).join(&found);
    if std::fs::canonicalize(&found_abs).ok().as_deref() != Some(base.as_path()) {
        return Err(DiskError::WrongBacking { path: ov.clone(), found, expected: base.display().to_string() });
    }
    Ok(FormatAccess::new(overlay))
}

#[derive(Clone, Copy, Default, Debug)]
#[repr(C)]
struct RequestHeader {
    type_: u32,
    _reserved: u32,
    sector: u64,
}

// SAFETY: plain integers, no padding (4 + 4 + 8 bytes), any bit pattern is valid.
unsafe impl ByteValued for RequestHeader {}

/// Counters of a disk.
#[derive(Debug, Default)]
pub struct BlockStats {
    /// Bytes read by the guest.
    pub read_bytes: AtomicU64,
    /// Bytes written by the guest.
    pub write_bytes: AtomicU64,
    /// Flush requests.
    pub flushes: AtomicU64,
    /// Requests that failed with an I/O error.
    pub errors: AtomicU64,
}

/// A virtio-blk device.
pub struct Block {
    name: String,
    disk: Arc<Disk>,
    dirty: Arc<DirtyBlocks>,
    capacity: u64,
    worker: Option<Worker>,
    stats: Arc<BlockStats>,
}

impl Block {
    /// A block device on `disk`.
    pub fn new(name: String, disk: Disk) -> Block {
        let capacity = disk.size() / SECTOR;
        let dirty = Arc::new(DirtyBlocks::new(disk.size()));
        Block { name, disk: Arc::new(disk), dirty, capacity, worker: None, stats: Arc::new(BlockStats::default()) }
    }

    /// What a migration needs of this disk.
    pub fn handle(&self, config: DiskConfig) -> DiskHandle {
        DiskHandle { disk: self.disk.clone(), dirty: self.dirty.clone(), config }
    }

    /// Counters.
    pub fn stats(&self) -> Arc<BlockStats> {
        self.stats.clone()
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        TYPE_BLOCK
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }
    fn avail_features(&self) -> u64 {
        VIRTIO_F_VERSION_1 | VIRTIO_BLK_F_FLUSH
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // Only `capacity` (u64 sectors at offset 0) is offered.
        super::read_config_bytes(&self.capacity.to_le_bytes(), offset, data);
    }
    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        let [evt]: [EventFd; 1] = ctx.queue_evts.try_into().map_err(|_| ActivateError::BadQueue(0))?;
        let handler = BlockHandler {
            mem: ctx.mem,
            queues: ctx.queues,
            evt,
            disk: self.disk.clone(),
            dirty: self.dirty.clone(),
            capacity: self.capacity,
            interrupt: ctx.interrupt,
            id: self.name.clone(),
            stats: self.stats.clone(),
        };
        self.worker = Some(Worker::spawn(&self.name, handler).map_err(ActivateError::Worker)?);
        Ok(())
    }
    fn worker(&mut self) -> &mut Option<Worker> {
        &mut self.worker
    }
    fn pause(&mut self) {
        if let Some(w) = &self.worker {
            w.pause();
        }
        // A paused VM's disk is consistent on disk (snapshots, migration).
        if let Err(e) = self.disk.flush() {
            tracing::warn!("{}: flush on pause: {e}", self.name);
        }
    }
    fn name(&self) -> &str {
        &self.name
    }
}

struct BlockHandler {
    mem: GuestMemoryMmap,
    queues: SharedQueues,
    evt: EventFd,
    disk: Arc<Disk>,
    dirty: Arc<DirtyBlocks>,
    capacity: u64,
    interrupt: Arc<Interrupt>,
    id: String,
    stats: Arc<BlockStats>,
}

/// Outcome of one request: bytes written into guest buffers (data plus status).
enum Outcome {
    Done(u32),
    /// The guest broke the protocol.
    Broken(String),
}

impl BlockHandler {
    fn in_range(&self, sector: u64, len: usize) -> bool {
        (len as u64).is_multiple_of(SECTOR)
            && sector.checked_add(len as u64 / SECTOR).is_some_and(|end| end <= self.capacity)
    }

    fn request(&self, chain: virtio_queue::DescriptorChain<&GuestMemoryMmap>) -> Outcome {
        let mut reader = match chain.clone().reader(&self.mem) {
            Ok(r) => r,
            Err(e) => return Outcome::Broken(format!("request chain: {e:?}")),
        };
        let mut writer = match chain.writer(&self.mem) {
            Ok(w) => w,
            Err(e) => return Outcome::Broken(format!("request chain: {e:?}")),
        };
        let Ok(hdr) = reader.read_obj::<RequestHeader>() else {
            return Outcome::Broken("request shorter than its header".into());
        };
        let writable = writer.available_bytes();
        if writable == 0 {
            return Outcome::Broken("request without a status byte".into());
        }
        let data_len = writable - 1;
        let offset = hdr.sector.saturating_mul(SECTOR);
        let (status, data) = match hdr.type_ {
            T_IN if data_len > MAX_REQUEST => return Outcome::Broken(format!("read of {data_len} bytes")),
            T_IN if !self.in_range(hdr.sector, data_len) => (S_IOERR, Vec::new()),
            T_IN => {
                let mut buf = vec![0u8; data_len];
                match self.disk.read(&mut buf[..], offset) {
                    Ok(()) => {
                        self.stats.read_bytes.fetch_add(data_len as u64, Ordering::Relaxed);
                        (S_OK, buf)
                    }
                    Err(e) => {
                        tracing::warn!("{}: read at {offset}: {e}", self.id);
                        (S_IOERR, Vec::new())
                    }
                }
            }
            T_OUT => {
                let len = reader.available_bytes();
                if len > MAX_REQUEST {
                    return Outcome::Broken(format!("write of {len} bytes"));
                }
                if !self.in_range(hdr.sector, len) {
                    (S_IOERR, Vec::new())
                } else {
                    let mut buf = vec![0u8; len];
                    if let Err(e) = reader.read_exact(&mut buf) {
                        return Outcome::Broken(format!("write buffer: {e}"));
                    }
                    let written = self.disk.write(&buf[..], offset);
                    // Logged after the write: a migration that read the block meanwhile sends
                    // it again. (A failed write may have changed part of it: logged too.)
                    self.dirty.mark(offset, len as u64);
                    match written {
                        Ok(()) => {
                            self.stats.write_bytes.fetch_add(len as u64, Ordering::Relaxed);
                            (S_OK, Vec::new())
                        }
                        Err(e) => {
                            tracing::warn!("{}: write at {offset}: {e}", self.id);
                            (S_IOERR, Vec::new())
                        }
                    }
                }
            }
            T_FLUSH => {
                self.stats.flushes.fetch_add(1, Ordering::Relaxed);
                match self.disk.flush() {
                    Ok(()) => (S_OK, Vec::new()),
                    Err(e) => {
                        tracing::warn!("{}: flush: {e}", self.id);
                        (S_IOERR, Vec::new())
                    }
                }
            }
            T_GET_ID => {
                let mut id = self.id.as_bytes().to_vec();
                id.resize(20.min(data_len), 0);
                (S_OK, id)
            }
            _ => (S_UNSUPP, Vec::new()),
        };
        if status == S_IOERR {
            self.stats.errors.fetch_add(1, Ordering::Relaxed);
        }
        // Data first, then the status byte in the last writable byte.
        if let Err(e) = writer.write_all(&data) {
            return Outcome::Broken(format!("data buffer: {e}"));
        }
        let skip = data_len - data.len();
        if skip > 0 {
            // Leave unread buffer space alone; only the status byte follows.
            if let Err(e) = writer.write_all(&vec![0u8; skip]) {
                return Outcome::Broken(format!("data buffer: {e}"));
            }
        }
        if let Err(e) = writer.write_all(&[status]) {
            return Outcome::Broken(format!("status byte: {e}"));
        }
        Outcome::Done((data.len() + 1) as u32)
    }

    fn process(&mut self) {
        let mut used = false;
        while !self.interrupt.failed() {
            let mut qs = self.queues.lock().expect("queues poisoned");
            let q = &mut qs[0];
            let chain = match q.iter(&self.mem) {
                Ok(mut it) => it.next(),
                Err(e) => {
                    self.interrupt.fail(format!("block ring: {e:?}"));
                    return;
                }
            };
            let Some(chain) = chain else { break };
            let head = chain.head_index();
            match self.request(chain) {
                Outcome::Done(len) => {
                    if let Err(e) = q.add_used(&self.mem, head, len) {
                        self.interrupt.fail(format!("block used ring: {e:?}"));
                        return;
                    }
                    used = true;
                }
                Outcome::Broken(why) => {
                    self.interrupt.fail(why);
                    return;
                }
            }
        }
        if used {
            super::notify_used(&self.queues, 0, &self.mem, &self.interrupt);
        }
    }
}

impl Handler for BlockHandler {
    fn sources(&self) -> Vec<(RawFd, bool)> {
        vec![(self.evt.as_raw_fd(), false)]
    }
    fn handle(&mut self, _: usize) {
        let _ = self.evt.read();
        self.process();
    }
    fn process_all(&mut self) {
        let _ = self.evt.read();
        self.process();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_base_images_are_named() {
        let dir = vmm_sys_util::tempdir::TempDir::new().unwrap();
        let raw = dir.as_path().join("base.raw");
        std::fs::write(&raw, vec![0u8; 4096]).unwrap();
        let cfg = DiskConfig { base: raw.clone(), overlay: dir.as_path().join("ov.qcow2"), standalone: false };
        let e = open_overlay(&cfg).unwrap_err().to_string();
        assert!(e.contains("is not a qcow2 image") && e.contains("base.raw"), "{e}");
        let cfg = DiskConfig {
            base: dir.as_path().join("missing.qcow2"),
            overlay: dir.as_path().join("ov.qcow2"),
            standalone: false,
        };
        let e = open_overlay(&cfg).unwrap_err().to_string();
        assert!(e.contains("missing.qcow2") && e.contains("No such file"), "{e}");
    }

    #[test]
    fn overlays_are_created_on_the_base_and_reused() {
        let dir = vmm_sys_util::tempdir::TempDir::new().unwrap();
        let base = dir.as_path().join("base.qcow2");
        let file = ImagoFile::create_open(StorageCreateOptions::new().filename(&base)).unwrap();
        Qcow2::<ImagoFile>::create_builder(file).size(1 << 20).create().unwrap();
        {
            let b = Qcow2::<ImagoFile>::builder_path(&base)
                .write(true)
                .open(PermissiveImplicitOpenGate::default())
                .unwrap();
            FormatAccess::new(b).write(&[0xab; 512][..], 4096).unwrap();
        }
        let before = std::fs::read(&base).unwrap();
        let cfg = DiskConfig { base: base.clone(), overlay: dir.as_path().join("vm1.qcow2"), standalone: false };
        {
            let disk = open_overlay(&cfg).unwrap();
            assert_eq!(disk.size(), 1 << 20);
            let mut buf = [0u8; 512];
            disk.read(&mut buf[..], 4096).unwrap();
            assert_eq!(buf, [0xab; 512], "reads fall through to the base");
            disk.write(&[0xcd; 512][..], 4096).unwrap();
            disk.flush().unwrap();
        }
        let disk = open_overlay(&cfg).unwrap();
        let mut buf = [0u8; 512];
        disk.read(&mut buf[..], 4096).unwrap();
        assert_eq!(buf, [0xcd; 512], "the overlay keeps the write");
        assert_eq!(std::fs::read(&base).unwrap(), before, "the base is never written");
        // An overlay of another base is refused.
        let other = dir.as_path().join("other.qcow2");
        std::fs::copy(&base, &other).unwrap();
        let e = open_overlay(&DiskConfig { base: other, overlay: cfg.overlay.clone(), standalone: false })
            .unwrap_err()
            .to_string();
        assert!(e.contains("is backed by"), "{e}");
    }

    #[test]
    fn allocated_blocks_are_the_overlays_own_and_writes_are_logged() {
        let dir = vmm_sys_util::tempdir::TempDir::new().unwrap();
        let base = dir.as_path().join("base.qcow2");
        let file = ImagoFile::create_open(StorageCreateOptions::new().filename(&base)).unwrap();
        Qcow2::<ImagoFile>::create_builder(file).size(4 << 20).create().unwrap();
        let cfg = DiskConfig { base: base.clone(), overlay: dir.as_path().join("vm.qcow2"), standalone: false };
        let disk = create_overlay(&cfg, 4 << 20).unwrap();
        assert!(allocated_blocks(&disk).unwrap().iter().all(|&w| w == 0), "a fresh overlay holds nothing");
        disk.write(&[1u8; 4096][..], 3 * 65536).unwrap();
        let bits = allocated_blocks(&disk).unwrap();
        // qcow2 allocates whole 64 KiB clusters: blocks 48..64.
        let set: Vec<u64> = (0..1024).filter(|b| bits[(b / 64) as usize] & (1 << (b % 64)) != 0).collect();
        assert_eq!(set, (48..64).collect::<Vec<_>>());
        let e = create_overlay(&cfg, 4 << 20).unwrap_err().to_string();
        assert!(e.contains("already exists"), "{e}");
        // Standalone images open without a backing file, and refuse one.
        let sa = DiskConfig { base: base.clone(), overlay: dir.as_path().join("sa.qcow2"), standalone: true };
        drop(create_overlay(&sa, 4 << 20).unwrap());
        open_overlay(&sa).unwrap();
        let e = open_overlay(&DiskConfig { standalone: true, ..cfg.clone() }).unwrap_err().to_string();
        assert!(e.contains("is backed by"), "{e}");
        // The dirty log: off, on, taken.
        let log = DirtyBlocks::new(1 << 20);
        log.mark(0, 4096);
        assert!(log.take().iter().all(|&w| w == 0));
        log.start();
        log.mark(4095, 2);
        log.mark(10 * 4096, 8192);
        assert_eq!(log.take()[0], 0b11 | (0b11 << 10));
        assert!(log.take().iter().all(|&w| w == 0));
    }
}
