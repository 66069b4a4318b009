//! The VMM's two ends of a live migration, on top of `migrate::precopy`.
//!
//! - Outgoing: the API command `migrate` starts a thread that connects to the destination and
//!   runs the pre-copy [`Sender`]; it copies guest memory out chunk by chunk (vm-memory's
//!   volatile accessors, no vCPU pause needed) and asks the control loop
//!   (through [`VmmCaller`]) for everything else: dirty logs, pause, resume, state, throttle.
//!   The process exits once the destination confirms the guest runs there.
//! - Incoming: `shrink-vmm --incoming tcp:ADDR:PORT` accepts one connection, installs the guest
//!   as it arrives, builds the VM from the saved state with its own devices, tells the source,
//!   then starts the guest and announces it (RARP) on its NICs.
//!
//! Disks migrate with the memory, as chunks of their own address space
//! ([`migrate::protocol::disk_addr`]): the first pass carries the blocks the VM's overlay holds
//! (every block when the destination lacks the base image), later passes the blocks the guest
//! wrote meanwhile (virtio-blk's [`DirtyBlocks`](crate::devices::virtio::block::DirtyBlocks)),
//! and the last ones travel while the guest and its devices are paused. The destination writes
//! them into a fresh overlay on its own copy of the base image (`--image`, `--disk`), and
//! removes it if the migration fails.

use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use indexd::tls::{Stream, Transport};
use migrate::args::MigrateArgs;
use migrate::precopy::{
    self, Dedup, EndpointError, MigrationInfo, NoDedup, Params, ReceiveOptions, Sink, Source, Status,
};
use migrate::protocol::{disk_addr, disk_of, DiskInfo, Hello, Region};
use migrate::shrinker::{ChunkMemory, ChunkMemoryError, DedupConfig, DedupStats, RedisDedup, SiteIndex, SiteOptions};
use serde_json::Value;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use crate::config::SerialOutput;
use crate::control::{ControlMsg, VmmCaller};
use crate::devices::virtio::block::{self, Disk, DiskConfig, DiskHandle};
use crate::snapshot::SnapshotState;
use crate::vmm::{DeviceConfig, RunState, Vmm};
use crate::vstate::memory::GuestMemoryMmap;

/// What keeps a migration from starting, or an incoming one from ending with a running VM.
#[derive(Debug, thiserror::Error)]
pub enum MigrationSetupError {
    /// A migration URI this VMM does not take.
    #[error("migration URI '{uri}': {why}")]
    Uri {
        /// The URI.
        uri: String,
        /// What is wrong with it.
        why: String,
    },
    /// The `migrate` command's arguments.
    #[error(transparent)]
    Args(#[from] migrate::args::ArgsError),
    /// A socket operation failed.
    #[error("{what} {addr}: {source}")]
    Socket {
        /// The operation.
        what: &'static str,
        /// The address.
        addr: String,
        /// Cause.
        source: std::io::Error,
    },
    /// A service the migration needs refuses it (its message names which, secrets masked).
    #[error("{0}")]
    Refused(String),
    /// The TLS handshake with the other end failed.
    #[error(transparent)]
    Tls(#[from] indexd::tls::TlsError),
    /// The migration thread could not be started.
    #[error("cannot start the migration thread: {0}")]
    Thread(std::io::Error),
    /// SIGINT, SIGTERM or `quit` while waiting for the incoming migration.
    #[error("terminated while waiting for the incoming migration on {0}")]
    Terminated(String),
    /// The incoming migration failed.
    #[error("incoming migration from {peer}: {source}")]
    Incoming {
        /// The source.
        peer: String,
        /// Cause.
        source: precopy::MigrationError,
    },
}

/// Why a VMM started without either transport flag does not migrate.
pub const NO_TRANSPORT: &str = "migrating needs --cluster-key FILE (TLS between the cluster's hosts) or, on a \
                                trusted network only, --plain-tcp";

fn socket_err(what: &'static str, addr: impl ToString) -> impl FnOnce(std::io::Error) -> MigrationSetupError {
    move |source| MigrationSetupError::Socket { what, addr: addr.to_string(), source }
}

/// Parses `tcp:HOST:PORT` into something to connect to or bind.
pub fn parse_tcp_uri(uri: &str) -> Result<String, MigrationSetupError> {
    let bad = |why: String| MigrationSetupError::Uri { uri: uri.to_owned(), why };
    let rest = uri.strip_prefix("tcp:").ok_or_else(|| bad("only tcp:HOST:PORT is supported".into()))?;
    let (host, port) = rest.rsplit_once(':').ok_or_else(|| bad("missing :PORT".into()))?;
    port.parse::<u16>().map_err(|_| bad(format!("'{port}' is not a port number")))?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    Ok(if host.contains(':') { format!("[{host}]:{port}") } else { format!("{host}:{port}") })
}

/// Copies guest memory at `gpa` into `buf` with vm-memory's volatile accessors (the guest or a
/// peer-server thread may touch it meanwhile).
fn read_guest(mem: &GuestMemoryMmap, gpa: u64, buf: &mut [u8]) -> Result<(), EndpointError> {
    mem.read_slice(buf, GuestAddress(gpa)).map_err(|e| EndpointError::Memory {
        gpa,
        len: buf.len(),
        reason: e.to_string(),
    })
}

/// Writes `data` to guest memory at `gpa` with vm-memory's volatile accessors.
fn write_guest(mem: &GuestMemoryMmap, gpa: u64, data: &[u8]) -> Result<(), EndpointError> {
    mem.write_slice(data, GuestAddress(gpa)).map_err(|e| EndpointError::Memory {
        gpa,
        len: data.len(),
        reason: e.to_string(),
    })
}

/// Reads `buf.len()` bytes at chunk address `addr` of disk `disk`.
fn read_disk(disk: &Disk, addr: u64, off: u64, buf: &mut [u8]) -> Result<(), EndpointError> {
    disk.read(&mut *buf, off).map_err(|e| EndpointError::Memory { gpa: addr, len: buf.len(), reason: e.to_string() })
}

/// Writes `data` at chunk address `addr` (byte `off` of `disk`).
fn write_disk(disk: &Disk, addr: u64, off: u64, data: &[u8]) -> Result<(), EndpointError> {
    disk.write(data, off).map_err(|e| EndpointError::Memory { gpa: addr, len: data.len(), reason: e.to_string() })
}

/// The guest's disks as chunk reads see them (replaced once the restored VM has its own).
type SharedDisks = Arc<Mutex<Vec<Arc<Disk>>>>;

/// Guest memory and disks as Shrinker's destination half reads them (to serve peers and to
/// resolve chunks from this guest's own content): copies with vm-memory's volatile accessors,
/// never slices; disk blocks through the disk.
struct GuestChunkMemory {
    mem: GuestMemoryMmap,
    disks: SharedDisks,
}

impl ChunkMemory for GuestChunkMemory {
    fn read_chunk(&self, gpa: u64, buf: &mut [u8]) -> Result<(), ChunkMemoryError> {
        let len = buf.len();
        let unreadable =
            |e: Box<dyn std::error::Error + Send + Sync>| ChunkMemoryError::Unreadable { gpa, len, source: e };
        if let Some((i, off)) = disk_of(gpa) {
            let disk = self.disks.lock().expect("disks poisoned").get(i).cloned();
            let disk = disk.ok_or(ChunkMemoryError::OutOfRange { gpa, len })?;
            return disk.read(&mut *buf, off).map_err(|e| unreadable(Box::new(e)));
        }
        self.mem.read_slice(buf, GuestAddress(gpa)).map_err(|e| unreadable(Box::new(e)))
    }
}

fn regions_of(mem: &GuestMemoryMmap) -> Vec<Region> {
    mem.iter().map(|r| Region { gpa: r.start_addr().0, len: r.len() }).collect()
}

/// The first pass's bitmap of a disk: the blocks its overlay holds, or all of them.
fn disk_first_pass(d: &DiskHandle, held: bool) -> Result<Vec<u64>, EndpointError> {
    if held {
        return block::allocated_blocks(&d.disk).map_err(EndpointError::of("disk allocation map"));
    }
    // (Disk sizes are whole blocks: `disks()` refuses others.)
    Ok(precopy::full_bitmap(d.size()))
}

/// The source VM as the pre-copy engine sees it.
struct VmmSource {
    mem: GuestMemoryMmap,
    disks: Vec<DiskHandle>,
    /// The digest of each disk's base image (none for a standalone disk).
    bases: Vec<Option<[u8; 32]>>,
    /// Whether content equal to the first disk's base image is sent as digests.
    repository_content: bool,
    /// The guest was paused before the migration paused it: it stays paused (here if the
    /// migration fails, at the destination if it succeeds).
    user_paused: bool,
    caller: VmmCaller,
    name: String,
}

impl VmmSource {
    /// Runs `f` on the VMM in the control loop; `op` names it in errors.
    fn on_vmm<R: Send + 'static, E: std::error::Error + Send + Sync + 'static>(
        &self,
        op: &'static str,
        f: impl FnOnce(&mut Vmm) -> Result<R, E> + Send + 'static,
    ) -> Result<R, EndpointError> {
        self.caller.call(f).map_err(EndpointError::of(op))?.map_err(EndpointError::of(op))
    }
}

impl Source for VmmSource {
    fn regions(&self) -> Vec<Region> {
        let mut r = regions_of(&self.mem);
        r.extend(self.disks.iter().enumerate().map(|(i, d)| Region { gpa: disk_addr(i, 0), len: d.size() }));
        r
    }
    fn disks(&mut self) -> Result<Vec<DiskInfo>, EndpointError> {
        self.disks
            .iter()
            .zip(&self.bases)
            .enumerate()
            .map(|(i, (d, &base))| {
                if !d.size().is_multiple_of(block::BLOCK) {
                    return Err(EndpointError::failed("disk", format!("{} bytes: not a multiple of 4 KiB", d.size())));
                }
                Ok(DiskInfo { size: d.size(), base, repository_content: i == 0 && self.repository_content })
            })
            .collect()
    }
    fn first_pass(&mut self, regions: &[Region], held: &[bool]) -> Result<Vec<Vec<u64>>, EndpointError> {
        let mut maps: Vec<Vec<u64>> =
            regions.iter().filter(|r| !migrate::protocol::is_disk(r)).map(|r| precopy::full_bitmap(r.len)).collect();
        for (d, &h) in self.disks.iter().zip(held) {
            maps.push(disk_first_pass(d, h)?);
        }
        Ok(maps)
    }
    fn read_chunk(&self, gpa: u64, buf: &mut [u8]) -> Result<(), EndpointError> {
        match disk_of(gpa) {
            Some((i, off)) => {
                let d = self.disks.get(i).ok_or(EndpointError::Memory {
                    gpa,
                    len: buf.len(),
                    reason: "no such disk".into(),
                })?;
                read_disk(&d.disk, gpa, off, buf)
            }
            None => read_guest(&self.mem, gpa, buf),
        }
    }
    fn start_dirty_log(&mut self) -> Result<(), EndpointError> {
        // Disks first: a block written between the two is logged (and sent again) anyway.
        for d in &self.disks {
            d.dirty.start();
        }
        self.on_vmm("start dirty log", |v| v.start_dirty_log())
    }
    fn stop_dirty_log(&mut self) -> Result<(), EndpointError> {
        for d in &self.disks {
            d.dirty.stop();
        }
        self.on_vmm("stop dirty log", |v| v.stop_dirty_log())
    }
    fn dirty_log(&mut self) -> Result<Vec<Vec<u64>>, EndpointError> {
        let log = self.on_vmm("dirty log", |v| v.dirty_log())?;
        let mut maps: Vec<Vec<u64>> = log.regions.into_iter().map(|r| r.bitmap).collect();
        maps.extend(self.disks.iter().map(|d| d.dirty.take()));
        Ok(maps)
    }
    fn pause(&mut self) -> Result<(), EndpointError> {
        let was_running = self.on_vmm("pause", |v| {
            let running = *v.state() == RunState::Running;
            v.pause().map(|()| running)
        })?;
        self.user_paused = !was_running;
        Ok(())
    }
    fn resume(&mut self) -> Result<(), EndpointError> {
        if self.user_paused {
            return Ok(());
        }
        self.on_vmm("resume", |v| v.resume())
    }
    fn vm_state(&mut self) -> Result<Vec<u8>, EndpointError> {
        let op = "save VM state";
        let mut state = self.on_vmm(op, |v| v.save_state())?;
        state.paused = self.user_paused;
        serde_json::to_vec(&state).map_err(EndpointError::of(op))
    }
    fn set_throttle(&mut self, percent: u8) {
        let _ = self.caller.call(move |v| v.set_throttle(percent));
    }
    fn name(&self) -> String {
        self.name.clone()
    }
    fn memory_digest(&mut self) -> Result<[u8; 32], EndpointError> {
        Ok(crate::vstate::memory::sha256_all(&self.mem))
    }
}

/// All of `migrate`'s arguments: the destination's address, the engine's parameters and the
/// dedup configuration.
pub fn parse_migrate_args(args: &Value) -> Result<(String, Params, Option<DedupConfig>), MigrationSetupError> {
    let a = MigrateArgs::from_json(args)?;
    let addr = parse_tcp_uri(&a.uri)?;
    let (params, dedup) = a.params()?;
    Ok((addr, params, dedup))
}

/// The digest of each disk's base image, and with deduplication the content index of the first
/// disk's (its chunks then travel as digests when the destination's repository holds it).
fn disk_bases(
    disks: &[DiskHandle],
    repository: Option<&str>,
    chunks: Option<(indexd::hash::Algo, usize)>,
) -> Result<DiskBases, crate::repository::RepositoryError> {
    let mut bases = DiskBases { digests: Vec::new(), content: None };
    for (i, d) in disks.iter().enumerate() {
        if d.config.standalone {
            bases.digests.push(None);
            continue;
        }
        let want = if i == 0 { chunks } else { None };
        let b = crate::repository::base_image(repository, &d.config.base, want)?;
        bases.digests.push(Some(b.image));
        if i == 0 {
            bases.content = b.content;
        }
    }
    Ok(bases)
}

/// The digests of a VM's disks' base images, and the content of the first one's.
struct DiskBases {
    digests: Vec<Option<[u8; 32]>>,
    content: Option<Arc<indexd::repo::RepoIndex>>,
}

/// An outgoing migration in progress (or finished).
pub struct Outgoing {
    info: Arc<Mutex<MigrationInfo>>,
    dedup: Option<Arc<Mutex<DedupStats>>>,
    cancel: Arc<AtomicBool>,
    socket: Arc<Mutex<Option<Stream>>>,
    thread: Option<JoinHandle<()>>,
}

impl Outgoing {
    /// Starts migrating `vmm` as `args` (the `migrate` command's arguments) ask.
    pub fn start(
        vmm: &Vmm,
        args: &Value,
        transport: &Transport,
        caller: VmmCaller,
    ) -> Result<Outgoing, MigrationSetupError> {
        let transport = transport.clone();
        let (addr, params, dedup_cfg) = parse_migrate_args(args)?;
        let margs = MigrateArgs::from_json(args)?;
        let repository = margs.repository;
        let info = Arc::new(Mutex::new(MigrationInfo { status: Status::Setup, ..Default::default() }));
        // Coordination is set up here, so that an unreachable service is reported at once.
        let coordination = match &dedup_cfg {
            None => None,
            Some(cfg) => Some(RedisDedup::connect(cfg).map_err(|e| {
                MigrationSetupError::Refused(indexd::redis::redact(
                    &format!("coordination Redis: the server refuses the password ({e})"),
                    &cfg.coordination,
                ))
            })?),
        };
        let dedup_stats = coordination.as_ref().map(|d| d.stats.clone());
        // The base image's content index, unless its content is not to travel as digests.
        let chunks = dedup_cfg.as_ref().filter(|_| !margs.no_repository_content).map(|c| (c.algo, params.chunk_size));
        let cancel = Arc::new(AtomicBool::new(false));
        let socket = Arc::new(Mutex::new(None));
        let disks = vmm.disks();
        let mut source = VmmSource {
            mem: vmm.memory().clone(),
            bases: Vec::new(),
            repository_content: false,
            user_paused: false,
            disks,
            caller: caller.clone(),
            name: vmm.name().to_owned(),
        };
        let (i, c, s) = (info.clone(), cancel.clone(), socket.clone());
        let thread = std::thread::Builder::new()
            .name("migration".into())
            .spawn(move || {
                // The base images' digests (and content): from the repository index, or by
                // reading the images, here in the migration thread while the guest runs.
                let bases = disk_bases(&source.disks, repository.as_deref(), chunks).map_err(|e| e.to_string());
                let result = bases.map(|b| -> Box<dyn Dedup + Send> {
                    source.bases = b.digests;
                    source.repository_content = b.content.is_some() && coordination.is_some();
                    match (coordination, b.content) {
                        (Some(d), Some(repo)) => Box::new(d.with_repository(repo)),
                        (Some(d), None) => Box::new(d),
                        (None, _) => Box::new(NoDedup),
                    }
                });
                let result = result.and_then(|dedup| {
                    let window = CONNECT_WINDOW.min(params.verdict_timeout);
                    connect(&addr, &transport, params.verdict_timeout, window, &c)
                        .map_err(|e| e.to_string())
                        .map(|s| (s, dedup))
                });
                let result = result.and_then(|(stream, dedup)| {
                    // A destination that neither answers nor takes the stream for this long
                    // is given up on, and the guest runs here again.
                    let t = params.verdict_timeout;
                    stream
                        .set_read_timeout(Some(t))
                        .and_then(|_| stream.set_write_timeout(Some(t)))
                        .map_err(|e| format!("migration socket to {addr}: {e}"))?;
                    let back = stream.try_clone().map_err(|e| format!("migration socket to {addr}: {e}"))?;
                    *s.lock().expect("socket lock poisoned") = stream.try_clone().ok();
                    if c.load(Ordering::SeqCst) {
                        return Err("cancelled".into());
                    }
                    precopy::Sender::new(&mut source, dedup, stream, back, params, i.clone(), c.clone())
                        .run()
                        .map_err(|e| e.to_string())
                });
                // Close the connection whatever happened: a destination that was late must see the
                // end of the stream, not a `Commit`, and so never start the guest.
                if let Some(sock) = s.lock().expect("socket lock poisoned").take() {
                    let _ = sock.shutdown(std::net::Shutdown::Both);
                }
                let ok = match result {
                    Ok(_) => true,
                    Err(e) => {
                        let mut info = i.lock().expect("migration info poisoned");
                        if !matches!(info.status, Status::Failed | Status::Cancelled) {
                            info.status = if c.load(Ordering::SeqCst) { Status::Cancelled } else { Status::Failed };
                            info.error = Some(e);
                        }
                        false
                    }
                };
                caller_done(&caller, ok);
            })
            .map_err(MigrationSetupError::Thread)?;
        Ok(Outgoing { info, dedup: dedup_stats, cancel, socket, thread: Some(thread) })
    }

    /// A copy of the statistics.
    pub fn info(&self) -> MigrationInfo {
        self.info.lock().expect("migration info poisoned").clone()
    }

    /// The statistics as `query-migrate` shows them (QEMU's, plus deduplication).
    pub fn info_json(&self) -> Value {
        let q = migrate::stats::SourceQuery {
            info: self.info(),
            dedup: self.dedup.as_ref().map(|d| d.lock().expect("dedup stats poisoned").clone()),
        };
        serde_json::to_value(q).unwrap_or(Value::Null)
    }

    /// Whether the migration thread still runs.
    pub fn running(&self) -> bool {
        self.thread.as_ref().is_some_and(|t| !t.is_finished())
    }

    /// Aborts the migration: the guest keeps (or goes back to) running here.
    pub fn cancel(&self) {
        self.cancel.store(true, Ordering::SeqCst);
        if let Some(s) = self.socket.lock().expect("socket lock poisoned").as_ref() {
            // Unblocks a write stuck on a slow or dead link.
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }
}

fn caller_done(caller: &VmmCaller, ok: bool) {
    // Nobody to tell if the control loop is gone (the VMM is exiting).
    let _ = caller.send(ControlMsg::MigrationDone(ok));
}

/// TCP keepalive on a migration connection: a peer whose host is gone is noticed after
/// `KEEPALIVE_IDLE_S + KEEPALIVE_COUNT × KEEPALIVE_INTERVAL_S` of silence (25 s), also while
/// the connection is idle (the destination waiting for its peers, the source for a verdict).
const KEEPALIVE_IDLE_S: u32 = 10;
const KEEPALIVE_INTERVAL_S: u32 = 5;
const KEEPALIVE_COUNT: u32 = 3;

/// How long a destination waits for the source's stream to go on. The source is quiet only
/// briefly in the usual case, but for long in some (hashing a large guest for `verify`, a low
/// `max_bandwidth`); a host that is gone is noticed by keepalive much sooner, so this only ends
/// the wait on a source process that is stuck without closing the connection.
const INCOMING_IDLE_TIMEOUT: Duration = Duration::from_secs(600);

/// How long data the destination wrote (its verdict, a pull) may stay unacknowledged before it
/// gives the connection up (`TCP_USER_TIMEOUT`): keepalive only watches an idle connection, and
/// a source gone while such a write is in flight would otherwise be retried for about 15
/// minutes. (The source's bound is its verdict timeout: a busy destination that does not read
/// for a while, its receive window closed, is not a dead one.)
const DEST_USER_TIMEOUT_MS: u32 = 45_000;

/// Sets the options every migration connection has: no Nagle delay, TCP keepalive, a bound on
/// unacknowledged data of `user_timeout_ms`.
fn tune(s: &TcpStream, user_timeout_ms: u32) -> std::io::Result<()> {
    use nix::sys::socket::{setsockopt, sockopt};
    s.set_nodelay(true)?;
    setsockopt(s, sockopt::TcpUserTimeout, &user_timeout_ms)?;
    setsockopt(s, sockopt::KeepAlive, &true)?;
    setsockopt(s, sockopt::TcpKeepIdle, &KEEPALIVE_IDLE_S)?;
    setsockopt(s, sockopt::TcpKeepInterval, &KEEPALIVE_INTERVAL_S)?;
    setsockopt(s, sockopt::TcpKeepCount, &KEEPALIVE_COUNT)?;
    Ok(())
}

/// How long the source keeps trying to connect to its destination (a destination VMM still
/// starting, an ARP entry gone stale, a lost SYN), at most: then the migration fails, and the
/// guest never stopped.
const CONNECT_WINDOW: Duration = Duration::from_secs(30);

/// The pause before connection attempt `attempt` + 1 (0-based): 100 ms, doubling, at most 2 s.
fn connect_backoff(attempt: u32) -> Duration {
    Duration::from_millis(100u64.saturating_mul(1 << attempt.min(5)).min(2000))
}

/// Connects to `addr`, trying again for up to `window` (and until `cancel`), with the
/// connection options of [`tune`], and makes the `transport`'s handshake (not retried: a peer
/// that answers with another key or no TLS is not going to change its mind). The error is the
/// last attempt's, with how long it tried.
fn connect(
    addr: &str,
    transport: &Transport,
    user_timeout: Duration,
    window: Duration,
    cancel: &AtomicBool,
) -> Result<Stream, MigrationSetupError> {
    let user_timeout_ms = user_timeout.as_millis().min(u32::MAX as u128) as u32;
    let start = std::time::Instant::now();
    let mut attempt = 0;
    loop {
        let addrs: Vec<_> = addr.to_socket_addrs().map_err(socket_err("cannot resolve", addr))?.collect();
        let mut last = socket_err("cannot resolve", addr)(std::io::ErrorKind::NotFound.into());
        for a in addrs {
            let left = window.saturating_sub(start.elapsed()).max(Duration::from_millis(100));
            match TcpStream::connect_timeout(&a, left.min(Duration::from_secs(10))) {
                Ok(s) => {
                    tune(&s, user_timeout_ms).map_err(socket_err("migration socket to", a))?;
                    if attempt > 0 {
                        tracing::info!("connected to {a} at attempt {}", attempt + 1);
                    }
                    return Ok(transport.connect(s)?);
                }
                Err(e) => last = socket_err("cannot connect to", a)(e),
            }
        }
        let pause = connect_backoff(attempt);
        if cancel.load(Ordering::SeqCst) || start.elapsed() + pause >= window {
            tracing::warn!("{last} (tried for {:.1} s)", start.elapsed().as_secs_f64());
            return Err(last);
        }
        tracing::debug!("{last}: trying again in {pause:?}");
        std::thread::sleep(pause);
        attempt += 1;
    }
}

/// Options of the destination VM: what the command line gives.
pub struct IncomingOptions {
    /// VM name override.
    pub name: Option<String>,
    /// Serial output.
    pub serial: SerialOutput,
    /// Device backends on this host (None: those recorded by the source).
    pub devices: Option<Vec<DeviceConfig>>,
    /// This host's part in its site's content index (Shrinker's content-based addressing).
    pub site: Option<SiteOptions>,
    /// Where this site's image repository is indexed (default: the site index).
    pub repository: Option<String>,
}

struct VmmSink {
    opts: IncomingOptions,
    mem: Option<GuestMemoryMmap>,
    vmm: Option<Vmm>,
    site: Option<SiteIndex>,
    /// The stream's digest and chunk size.
    chunks: Option<(indexd::hash::Algo, usize)>,
    /// The migrated disks being written, in order (shared with the peer server's reads).
    disks: SharedDisks,
    /// The overlays this migration created: removed unless the guest starts here.
    created: Vec<std::path::PathBuf>,
    started: bool,
    /// The guest was paused at the source: it is restored paused and stays so.
    keep_paused: bool,
}

impl VmmSink {
    fn mem(&self) -> &GuestMemoryMmap {
        self.mem.as_ref().expect("prepare() ran")
    }

    fn disk(&self, gpa: u64, i: usize) -> Result<Arc<Disk>, EndpointError> {
        self.disks.lock().expect("disks poisoned").get(i).cloned().ok_or(EndpointError::Memory {
            gpa,
            len: 0,
            reason: "no such disk".into(),
        })
    }

    /// The disk configurations given on the command line, in order.
    fn disk_configs(&mut self) -> Vec<&mut DiskConfig> {
        self.opts
            .devices
            .iter_mut()
            .flatten()
            .filter_map(|d| match d {
                DeviceConfig::Block(c) => Some(c),
                DeviceConfig::Net(_) => None,
            })
            .collect()
    }

    /// Sets up disk `i` (`info` from the source): a fresh overlay on this site's copy of the
    /// base image when it is the source's, a standalone image otherwise. Returns whether the
    /// disk starts as the source's base layer, and why not.
    fn setup_disk(&mut self, i: usize, info: &DiskInfo) -> Result<(bool, Option<String>), EndpointError> {
        let repository = self.opts.repository.clone().or_else(|| self.opts.site.as_ref().and_then(|s| s.index.clone()));
        let chunks = self.chunks;
        let cfg = self.disk_configs().into_iter().nth(i).map(|c| c.clone());
        let mut cfg = cfg.ok_or_else(|| {
            EndpointError::failed(
                "disks",
                "the guest has a disk: give --image (this site's copy of its base image) and --disk (where its overlay goes)",
            )
        })?;
        let mut why = None;
        let mut content = None;
        cfg.standalone = match info.base {
            // A source disk without a base goes into a standalone image, which starts as
            // zeroes as the source's did: held.
            None => true,
            Some(source) => {
                let want = chunks.filter(|_| i == 0 && info.repository_content);
                match crate::repository::base_image(repository.as_deref(), &cfg.base, want) {
                    Ok(b) if b.image == source => {
                        content = b.content;
                        false
                    }
                    Ok(b) => {
                        let here = b.image;
                        why = Some(format!(
                            "disk {i}: this site's base image {} is {}, the source's is {}: its content travels too",
                            cfg.base.display(),
                            indexd::hash::hex(&here),
                            indexd::hash::hex(&source)
                        ));
                        true
                    }
                    Err(e) => {
                        why = Some(format!(
                            "disk {i}: this site's repository has no base image for it ({e}): its content travels too"
                        ));
                        true
                    }
                }
            }
        };
        let held = why.is_none();
        let disk = block::create_overlay(&cfg, info.size).map_err(EndpointError::of("disk overlay"))?;
        self.created.push(cfg.overlay.clone());
        if disk.size() != info.size {
            return Err(EndpointError::failed(
                "disk overlay",
                format!("{} bytes for a {}-byte disk", disk.size(), info.size),
            ));
        }
        if let (Some(idx), Some(site)) = (content, self.site.as_mut()) {
            let image = crate::repository::ImageReader::open(&cfg.base).map_err(EndpointError::of("base image"))?;
            site.set_repository(idx, Arc::new(image));
        }
        self.disks.lock().expect("disks poisoned").push(Arc::new(disk));
        if let Some(c) = self.disk_configs().into_iter().nth(i) {
            *c = cfg;
        }
        Ok((held, why))
    }
}

impl Drop for VmmSink {
    fn drop(&mut self) {
        if self.started {
            return;
        }
        // The guest does not run here: its partial disks go (the source's are untouched).
        self.disks.lock().unwrap_or_else(|e| e.into_inner()).clear();
        for p in &self.created {
            match std::fs::remove_file(p) {
                Ok(()) => tracing::info!("removed the partial disk {}", p.display()),
                Err(e) => tracing::warn!("cannot remove the partial disk {}: {e}", p.display()),
            }
        }
    }
}

impl Sink for VmmSink {
    fn prepare(&mut self, hello: &Hello, regions: &[Region]) -> Result<(), EndpointError> {
        let ranges: Vec<(GuestAddress, usize)> = regions
            .iter()
            .filter(|r| !migrate::protocol::is_disk(r))
            .map(|r| (GuestAddress(r.gpa), r.len as usize))
            .collect();
        let expected = crate::arch::layout::ram_ranges(hello.mem_size);
        if ranges != expected {
            return Err(EndpointError::failed(
                "guest memory layout",
                format!("{ranges:x?} is not what this VMM builds for {} bytes", hello.mem_size),
            ));
        }
        let mem = GuestMemoryMmap::from_ranges(&ranges).map_err(EndpointError::of("allocate guest memory"))?;
        self.chunks = hello.digest.algo().map(|a| (a, hello.chunk_size as usize));
        if let (Some(site), Some(algo)) = (&self.opts.site, hello.digest.algo()) {
            let chunks = Arc::new(GuestChunkMemory { mem: mem.clone(), disks: self.disks.clone() });
            let index = SiteIndex::start(site, chunks, algo, hello.chunk_size as usize)
                .map_err(EndpointError::of("site index"))?;
            self.site = Some(index);
        }
        self.mem = Some(mem);
        Ok(())
    }

    fn disks(&mut self, disks: &[DiskInfo]) -> Result<(Vec<bool>, String), EndpointError> {
        let given = self.disk_configs().len();
        if given != disks.len() {
            return Err(EndpointError::failed(
                "disks",
                format!(
                    "the guest has {} disk(s), the command line gives {given} (--image: this site's copy of the base image, --disk: where the overlay goes)",
                    disks.len()
                ),
            ));
        }
        let mut held = Vec::new();
        let mut why = Vec::new();
        for (i, d) in disks.iter().enumerate() {
            let (h, w) = self.setup_disk(i, d)?;
            held.push(h);
            why.extend(w);
        }
        for w in &why {
            tracing::warn!("{w}");
        }
        Ok((held, why.join("; ")))
    }

    fn on_write(&mut self, gpa: u64, data: Option<&[u8]>) {
        if let Some(site) = self.site.as_mut() {
            site.on_write(gpa, data);
        }
    }

    fn on_write_verified(&mut self, gpa: u64, _data: &[u8], digest: &[u8]) {
        if let Some(site) = self.site.as_mut() {
            site.on_write_verified(gpa, digest);
        }
    }

    fn resolve(&mut self, batch: &mut Vec<(u64, Vec<u8>)>) -> Result<(), EndpointError> {
        let Some(site) = self.site.as_mut() else { return Ok(()) };
        let mem = self.mem.as_ref().expect("prepare() ran");
        let disks = self.disks.lock().expect("disks poisoned").clone();
        let mut failed = None;
        site.resolve(batch, &mut |gpa, bytes| {
            // Chunks are in guest memory or a disk (checked when the stream named them): a
            // failure here fails the migration rather than leaving a chunk unwritten.
            let r = match disk_of(gpa) {
                Some((i, off)) => match disks.get(i) {
                    Some(d) => write_disk(d, gpa, off, bytes),
                    None => Err(EndpointError::Memory { gpa, len: bytes.len(), reason: "no such disk".into() }),
                },
                None => write_guest(mem, gpa, bytes),
            };
            if let Err(e) = r {
                failed.get_or_insert(e);
            }
        });
        failed.map_or(Ok(()), Err)
    }

    fn flush(&mut self) {
        if let Some(site) = self.site.as_mut() {
            site.flush();
        }
    }

    fn write_chunk(&mut self, gpa: u64, data: &[u8]) -> Result<(), EndpointError> {
        match disk_of(gpa) {
            Some((i, off)) => write_disk(&*self.disk(gpa, i)?, gpa, off, data),
            None => write_guest(self.mem(), gpa, data),
        }
    }

    fn fill_chunk(&mut self, gpa: u64, byte: u8, len: usize) -> Result<(), EndpointError> {
        const MAX_CHUNK: usize = migrate::protocol::CHUNK_SIZES[migrate::protocol::CHUNK_SIZES.len() - 1];
        if let (Some((i, off)), 0) = (disk_of(gpa), byte) {
            // Zeroes over a base image: qcow2's zero clusters where whole clusters are zeroed.
            return self.disk(gpa, i)?.write_zeroes(off, len as u64).map_err(|e| EndpointError::Memory {
                gpa,
                len,
                reason: e.to_string(),
            });
        }
        let fill = [byte; MAX_CHUNK];
        let data = fill.get(..len).ok_or(EndpointError::Memory { gpa, len, reason: "larger than a chunk".into() })?;
        self.write_chunk(gpa, data)
    }

    fn memory_digest(&mut self) -> Result<[u8; 32], EndpointError> {
        Ok(crate::vstate::memory::sha256_all(self.mem()))
    }

    fn restore(&mut self, state: &[u8]) -> Result<(), EndpointError> {
        // The migrated disks are complete: on disk, and closed before the VM opens them.
        {
            let mut disks = self.disks.lock().expect("disks poisoned");
            for d in disks.iter() {
                d.flush().map_err(EndpointError::of("flush the migrated disk"))?;
            }
            disks.clear();
        }
        // The VM opens them again by name: they must still be there (else it would create an
        // empty overlay over the base).
        if let Some(gone) = self.created.iter().find(|p| !p.exists()) {
            return Err(EndpointError::failed("restore", format!("the migrated disk {} is gone", gone.display())));
        }
        // Test hook: hold the destination between "everything arrived" and its verdict, so
        // that tests can kill it while the source is paused and waiting (or compare the disks).
        if let Some(stall) = crate::test_hooks::stall_before_verdict() {
            std::thread::sleep(stall);
        }
        let t = std::time::Instant::now();
        let state: SnapshotState = serde_json::from_slice(state).map_err(EndpointError::of("parse VM state"))?;
        self.keep_paused = state.paused;
        let parsed = t.elapsed();
        let mem = self.mem.take().ok_or(EndpointError::failed("restore", "VM state before memory"))?;
        let devices = self.opts.devices.clone();
        let vmm = Vmm::restore_with(state, mem, self.opts.name.take(), &self.opts.serial, true, devices)
            .map_err(EndpointError::of("restore"))?;
        // Peers now read the VM's own disks.
        *self.disks.lock().expect("disks poisoned") = vmm.disks().into_iter().map(|d| d.disk).collect();
        tracing::info!("restore: state parsed in {parsed:?}, VM rebuilt in {:?}", t.elapsed() - parsed);
        self.vmm = Some(vmm);
        Ok(())
    }

    fn start(&mut self) -> Result<(), EndpointError> {
        let vmm = self.vmm.as_mut().ok_or(EndpointError::failed("start", "no VM to start"))?;
        // A guest its user had paused stays paused (as QEMU's run state travels): `resume` runs it.
        if !self.keep_paused {
            vmm.resume().map_err(EndpointError::of("start"))?;
        }
        self.started = true;
        vmm.announce_self();
        Ok(())
    }
}

pub use migrate::stats::IncomingStats;

/// Listens for an incoming migration on `uri` (`tcp:HOST:PORT`). Bind before announcing the
/// VMM as ready (its API socket): a source told to migrate may connect at once.
pub fn listen(uri: &str) -> Result<TcpListener, MigrationSetupError> {
    let addr = parse_tcp_uri(uri)?;
    TcpListener::bind(&addr).map_err(socket_err("cannot listen on", &addr))
}

/// Waits for one incoming migration on `listener` (from [`listen`]; `on_connected` is called
/// when the source has connected) and returns the running VM,
/// and the site index membership that keeps serving its content to peers (drop it when the VM
/// goes away).
pub fn incoming(
    listener: TcpListener,
    opts: IncomingOptions,
    transport: &Transport,
    on_connected: impl FnOnce(),
) -> Result<(Vmm, IncomingStats, Option<SiteIndex>), MigrationSetupError> {
    let addr = listener.local_addr().map_err(socket_err("incoming listener", "?"))?;
    // Polled, so that SIGINT, SIGTERM and `quit` end the wait.
    listener.set_nonblocking(true).map_err(socket_err("incoming listener", addr))?;
    let (stream, peer) = loop {
        let (tcp, peer) = match listener.accept() {
            Ok(s) => s,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if crate::control::terminating() {
                    return Err(MigrationSetupError::Terminated(addr.to_string()));
                }
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
            Err(e) => return Err(socket_err("accept on", addr)(e)),
        };
        tcp.set_nonblocking(false).map_err(socket_err("incoming migration socket from", peer))?;
        // A connection that fails the handshake (another cluster key, no TLS, a port scan) is
        // not the source: the wait goes on.
        match transport.accept(tcp) {
            Ok(s) => break (s, peer),
            Err(e) => tracing::warn!("incoming connection refused: {e}"),
        }
    };
    drop(listener);
    on_connected();
    tracing::info!("incoming migration from {peer} ({transport})");
    let back = tune(stream.tcp(), DEST_USER_TIMEOUT_MS)
        .and_then(|_| stream.set_read_timeout(Some(INCOMING_IDLE_TIMEOUT)))
        .and_then(|_| stream.try_clone())
        .map_err(socket_err("incoming migration socket from", peer))?;
    let wait = opts.site.as_ref().map(|s| s.wait).unwrap_or(ReceiveOptions::default().wait);
    let mut sink = VmmSink {
        opts,
        mem: None,
        vmm: None,
        site: None,
        chunks: None,
        disks: Arc::new(Mutex::new(Vec::new())),
        created: Vec::new(),
        started: false,
        keep_paused: false,
    };
    // Test hook: no pulling from the source, to see a migration fail when every fallback is down.
    let pull = !crate::test_hooks::no_pull();
    let opts = ReceiveOptions { wait, pull, cancelled: Some(crate::control::terminating), ..ReceiveOptions::default() };
    let failed = |source| MigrationSetupError::Incoming { peer: peer.to_string(), source };
    let stats = precopy::receive_with(&mut sink, stream, back, opts).map_err(failed)?;
    let vmm =
        sink.vmm.take().ok_or_else(|| failed(precopy::MigrationError::Invalid("it ended without a VM".into())))?;
    let site = sink.site.take();
    Ok((vmm, IncomingStats { stream: stats, site: site.as_ref().map(|s| s.snapshot_stats()) }, site))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uris_and_arguments() {
        assert_eq!(parse_tcp_uri("tcp:127.0.0.1:4444").unwrap(), "127.0.0.1:4444");
        assert_eq!(parse_tcp_uri("tcp:[::1]:4444").unwrap(), "[::1]:4444");
        assert!(parse_tcp_uri("unix:/x").unwrap_err().to_string().contains("only tcp"));
        assert!(parse_tcp_uri("tcp:host").unwrap_err().to_string().contains("missing :PORT"));
        assert!(parse_tcp_uri("tcp:host:http").unwrap_err().to_string().contains("not a port"));
        let (a, p, d) =
            parse_migrate_args(&serde_json::json!({"uri": "tcp:10.0.0.2:7000", "max_iterations": 30})).unwrap();
        assert_eq!((a.as_str(), p.max_iterations, d.is_none()), ("10.0.0.2:7000", Some(30), true));
        let e = |v| parse_migrate_args(&v).unwrap_err().to_string();
        assert!(e(serde_json::json!({"uri": "unix:/x"})).contains("only tcp"));
        assert!(e(serde_json::json!({"uri": "tcp:a:1", "speed": 1})).contains("speed"));
        let wrong = e(serde_json::json!({"uri": 5}));
        assert!(wrong.contains("invalid type") && !wrong.contains("missing"), "{wrong}");
    }

    #[test]
    fn connect_attempts_back_off_from_100_ms_to_2_s() {
        let ms: Vec<u128> = (0..8).map(|a| connect_backoff(a).as_millis()).collect();
        assert_eq!(ms, [100, 200, 400, 800, 1600, 2000, 2000, 2000]);
        assert_eq!(connect_backoff(u32::MAX), Duration::from_secs(2));
    }

    /// A destination that starts listening only after the source tried is reached; one that
    /// never listens is given up after the window, and a cancel ends the tries at once.
    #[test]
    fn connect_tries_again_within_its_window() {
        let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = probe.local_addr().unwrap();
        drop(probe);
        let late = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(500));
            let l = std::net::TcpListener::bind(addr).unwrap();
            l.accept().map(|_| ())
        });
        let no = AtomicBool::new(false);
        let t = std::time::Instant::now();
        connect(&addr.to_string(), &Transport::Plain, Duration::from_secs(5), Duration::from_secs(10), &no)
            .expect("connected late");
        assert!(t.elapsed() >= Duration::from_millis(500));
        late.join().unwrap().unwrap();

        let t = std::time::Instant::now();
        let e = connect(&addr.to_string(), &Transport::Plain, Duration::from_secs(5), Duration::from_millis(700), &no)
            .unwrap_err();
        assert!(e.to_string().contains("cannot connect to"), "{e}");
        assert!(t.elapsed() >= Duration::from_millis(300) && t.elapsed() < Duration::from_secs(5));
        let cancelled = AtomicBool::new(true);
        let t = std::time::Instant::now();
        assert!(connect(
            &addr.to_string(),
            &Transport::Plain,
            Duration::from_secs(5),
            Duration::from_secs(30),
            &cancelled
        )
        .is_err());
        assert!(t.elapsed() < Duration::from_secs(2), "a cancel stops the tries");
    }
}
