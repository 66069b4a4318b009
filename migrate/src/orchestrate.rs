//! `shrink-migrate --cluster vc.toml --dest SITE`: moves a virtual cluster. Starts a destination
//! VMM for every VM on a host of the destination site (through the site's launch template),
//! migrates all VMs at once with deduplication across them, follows them with a progress bar
//! each, and reports where every page came from.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use indicatif::{MultiProgress, ProgressBar, ProgressStyle};

use crate::progress::{describe, Lines, Mode, Snapshot, Stall};
use serde::Serialize;

use crate::args::{DedupArgs, MigrateArgs};
use crate::client::{ApiClient, QueryError, QUERY_MIGRATE};
use crate::cluster::{launch_argv, relocate, Cluster, ClusterError, Move, Relocation};
use crate::stats::{DestinationQuery, SourceQuery, Status};

/// How to run the cluster migration.
#[derive(Debug, Clone)]
pub struct ClusterOptions {
    /// The description.
    pub file: PathBuf,
    /// Destination site.
    pub dest: String,
    /// Plain pre-copy (the baseline).
    pub no_dedup: bool,
    /// Content equal to the base image's is not sent as repository digests (the disks still
    /// carry only their own blocks): what the repository adds, measured.
    pub no_repository: bool,
    /// Dedup granularity.
    pub chunk: u32,
    /// Digest algorithm name.
    pub digest: String,
    /// End-to-end memory check.
    pub verify: bool,
    /// Downtime limit per VM.
    pub downtime_limit_ms: u64,
    /// First TCP port of destination VMMs (one per VM; peer servers use +100).
    pub port_base: u16,
    /// How progress is shown (bars on a terminal, else lines).
    pub progress: crate::progress::Mode,
    /// Rewrite the moved VMs' `host` and `api` in the cluster file afterwards.
    pub update_file: bool,
    /// How long a destination waits without progress for content other VMs' streams bring,
    /// before it pulls it from its source (None: [`pull_wait_ms`] of the cluster's size).
    pub pull_wait_ms: Option<u64>,
    /// Coordinate in an earlier run's namespace (its report's `run_id`) instead of a fresh one:
    /// a later wave of one move, whose content the VMs that run moved still hold at the
    /// destination. None: a namespace of this run's own.
    pub join_run: Option<String>,
}

/// The default wait for content in flight: every VM's stream gets about 1/N of the WAN, so
/// content another stream carries takes longer to arrive the more VMs move at once — 250 ms
/// per VM, from half a second to three.
pub fn pull_wait_ms(vms: usize) -> u64 {
    (250 * vms as u64).clamp(500, 3000)
}

/// Where a migration's chunks came from, and what it cost; for one VM or summed over many.
#[derive(Debug, Clone, Copy, Serialize, Default)]
pub struct Counts {
    /// Chunks sent in full.
    pub full: u64,
    /// Chunks sent as a digest only.
    pub deduplicated: u64,
    /// Uniform chunks (one byte each).
    pub uniform: u64,
    /// Digest-only chunks found in the VM's own memory at the destination.
    pub local: u64,
    /// Digest-only chunks fetched from other hypervisors of the destination site.
    pub fetched_from_peers: u64,
    /// Digest-only chunks pulled back from the source.
    pub pulled: u64,
    /// Peer answers that did not match their digest (dropped; the content came from elsewhere).
    pub corrupt_from_peers: u64,
    /// Peers that could not be reached.
    pub peer_errors: u64,
    /// Failed index operations (the index was then left alone).
    pub index_errors: u64,
    /// Digest-only chunks read from the destination site's image repository (base-image
    /// content).
    pub repository: u64,
    /// Bytes on the migration stream (what crosses the WAN).
    pub wan_bytes: u64,
    /// Of the chunks sent in full, those that travelled compressed (zstd).
    pub compressed: u64,
    /// Bytes compression saved on the stream (as the source counted them).
    pub compression_saved_bytes: u64,
    /// Of the above, disk blocks (the rest is memory).
    pub disk: DiskCounts,
}

/// The disk blocks' part of [`Counts`].
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq, Eq)]
pub struct DiskCounts {
    /// Blocks sent in full.
    pub full: u64,
    /// Blocks sent as a digest only.
    pub deduplicated: u64,
    /// Uniform blocks.
    pub uniform: u64,
    /// Found in the VM's own memory or disk at the destination.
    pub local: u64,
    /// Fetched from other hypervisors of the destination site.
    pub fetched_from_peers: u64,
    /// Read from the destination site's image repository.
    pub repository: u64,
    /// Pulled back from the source.
    pub pulled: u64,
    /// Bytes of disk entries on the stream.
    pub wan_bytes: u64,
}

impl std::ops::AddAssign for DiskCounts {
    fn add_assign(&mut self, o: DiskCounts) {
        self.full += o.full;
        self.deduplicated += o.deduplicated;
        self.uniform += o.uniform;
        self.local += o.local;
        self.fetched_from_peers += o.fetched_from_peers;
        self.repository += o.repository;
        self.pulled += o.pulled;
        self.wan_bytes += o.wan_bytes;
    }
}

impl std::ops::AddAssign for Counts {
    fn add_assign(&mut self, o: Counts) {
        self.full += o.full;
        self.deduplicated += o.deduplicated;
        self.uniform += o.uniform;
        self.local += o.local;
        self.fetched_from_peers += o.fetched_from_peers;
        self.pulled += o.pulled;
        self.corrupt_from_peers += o.corrupt_from_peers;
        self.peer_errors += o.peer_errors;
        self.index_errors += o.index_errors;
        self.repository += o.repository;
        self.wan_bytes += o.wan_bytes;
        self.compressed += o.compressed;
        self.compression_saved_bytes += o.compression_saved_bytes;
        self.disk += o.disk;
    }
}

/// One VM's outcome.
#[derive(Debug, Clone, Serialize, Default)]
pub struct VmReport {
    /// VM name.
    pub vm: String,
    /// From and to hosts.
    pub from: String,
    /// Destination host.
    pub to: String,
    /// `completed` or `failed`.
    pub status: Status,
    /// Why it failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Where the chunks came from.
    #[serde(flatten)]
    pub counts: Counts,
    /// Milliseconds from start to the guest running at the destination.
    pub total_time_ms: u64,
    /// Milliseconds the guest was paused.
    pub downtime_ms: u64,
    /// Passes.
    pub passes: u64,
    /// Warnings (coordination or index unavailable: degraded, still correct).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
    /// Files removed from the source site once the VM ran at the destination (`host:path`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub removed: Vec<String>,
}

/// The whole cluster's outcome.
#[derive(Debug, Clone, Serialize)]
pub struct ClusterReport {
    /// Migration id.
    pub migration_id: String,
    /// This run's coordination namespace: the migration id and a nonce of the run.
    pub run_id: String,
    /// Destination site.
    pub dest: String,
    /// Whether deduplication was on.
    pub dedup: bool,
    /// Chunk size.
    pub chunk: u32,
    /// Digest.
    pub digest: String,
    /// Per VM.
    pub vms: Vec<VmReport>,
    /// The sums over the VMs.
    #[serde(flatten)]
    pub counts: Counts,
    /// Milliseconds until the last VM ran at the destination.
    pub total_time_ms: u64,
    /// VMs that failed (and run at the source).
    pub failed: usize,
    /// Whether the cluster file now lists the moved VMs where they run.
    pub cluster_file_updated: bool,
    /// Why it could not be updated.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cluster_file_error: Option<String>,
}

fn wait_socket(p: &Path, log: &Path, timeout: Duration) -> Result<(), OrchestrateError> {
    let start = Instant::now();
    while !p.exists() {
        if start.elapsed() > timeout {
            let tail = std::fs::read_to_string(log).unwrap_or_default();
            return Err(OrchestrateError::NotStarted { api: p.display().to_string(), log: tail.trim().to_owned() });
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// Why a cluster migration could not run (each VM's own failure is in its report instead).
#[derive(Debug, thiserror::Error)]
pub enum OrchestrateError {
    /// A source VMM does not migrate the way the cluster file says.
    #[error("{vm}: {why}")]
    Transport {
        /// The VM.
        vm: String,
        /// What differs.
        why: String,
    },
    /// The cluster file.
    #[error(transparent)]
    Cluster(#[from] ClusterError),
    /// Every VM already runs at the destination.
    #[error("every VM is already at {0}")]
    NothingToMove(String),
    /// A file or directory of the migration.
    #[error("{path}: {source}")]
    Io {
        /// The path.
        path: String,
        /// Cause.
        source: std::io::Error,
    },
    /// A destination VMM could not be started.
    #[error("cannot run {argv:?}: {source}")]
    Launch {
        /// What was run.
        argv: Vec<String>,
        /// Cause.
        source: std::io::Error,
    },
    /// A VM's source VMM does not answer on its API socket (nothing was started).
    #[error("{vm}: its VMM does not answer at {api} ({why}); nothing was started (is vc.toml up to date?)")]
    SourceUnreachable {
        /// The VM.
        vm: String,
        /// Its API socket.
        api: String,
        /// What went wrong.
        why: String,
    },
    /// The file a moving VM's disk would go to exists already.
    #[error("{vm}: {path} already exists on {host} (a disk from an earlier run?): remove it, or give the site another storage directory")]
    DiskExists {
        /// The VM.
        vm: String,
        /// The destination host.
        host: String,
        /// The file.
        path: String,
    },
    /// A destination VMM did not come up.
    #[error("destination VMM did not start (no {api}): {log}")]
    NotStarted {
        /// The API socket it should have made.
        api: String,
        /// The end of its log.
        log: String,
    },
    /// A VMM's API could not be reached.
    #[error("{api}: {source}")]
    Api {
        /// Its socket.
        api: String,
        /// Cause.
        source: std::io::Error,
    },
    /// A VMM refused a command.
    #[error("{api}: {command}: {source}")]
    Refused {
        /// Its socket.
        api: String,
        /// The command.
        command: &'static str,
        /// What it said.
        source: crate::client::CommandError,
    },
    /// A VMM's answer is not what this version expects.
    #[error("{api}: unexpected {command} answer: {source}")]
    Answer {
        /// Its socket.
        api: String,
        /// The command.
        command: &'static str,
        /// Cause.
        source: serde_json::Error,
    },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> OrchestrateError + '_ {
    move |source| OrchestrateError::Io { path: path.display().to_string(), source }
}

/// What a cluster migration will do, decided before anything starts.
struct Plan {
    cluster: Cluster,
    moves: Vec<Move>,
    id: String,
    /// The namespace of this run's coordination keys ([`run_id`]).
    run: String,
    workdir: PathBuf,
    vmm: PathBuf,
}

/// The namespace of one run's coordination keys: the cluster's migration id (a label the
/// operator may fix in `vc.toml`, and reuse) and a nonce of this run. A run never finds the
/// keys an earlier run with the same id left (they live for the TTL), so it never takes
/// content for already sent that no destination holds.
fn run_id(migration_id: &str, nonce: u64) -> String {
    format!("{migration_id}.{nonce:016x}")
}

/// The namespace a run coordinates in: the earlier run's it joins (`--join-run`), else a
/// fresh one of its own ([`run_id`]).
fn run_namespace(join_run: Option<&str>, migration_id: &str, nonce: u64) -> String {
    join_run.map_or_else(|| run_id(migration_id, nonce), str::to_owned)
}

/// A fresh random number (the kernel's), or, should that fail, one from the time and the pid.
fn nonce() -> u64 {
    use std::io::Read;
    let mut b = [0u8; 8];
    match std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut b)) {
        Ok(()) => u64::from_ne_bytes(b),
        Err(_) => {
            let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
            (t.as_nanos() as u64) ^ (u64::from(std::process::id()) << 32)
        }
    }
}

/// A destination VMM started for one move.
struct Destination {
    api: PathBuf,
    port: u16,
}

/// Reads the cluster file and decides the moves, the migration ID, the working directory and
/// the VMM binary.
fn plan(opts: &ClusterOptions) -> Result<Plan, OrchestrateError> {
    let text = std::fs::read_to_string(&opts.file).map_err(io_err(&opts.file))?;
    let cluster = Cluster::parse(&opts.file.display().to_string(), &text)?;
    let moves = cluster.plan(&opts.dest)?;
    if moves.is_empty() {
        return Err(OrchestrateError::NothingToMove(opts.dest.clone()));
    }
    let id = cluster.file.migration_id.clone().unwrap_or_else(|| {
        format!(
            "{}-{}",
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0),
            std::process::id()
        )
    });
    let workdir = PathBuf::from(cluster.file.workdir.clone().unwrap_or_else(|| format!("/tmp/shrink-migrate-{id}")));
    std::fs::create_dir_all(&workdir).map_err(io_err(&workdir))?;
    let vmm = cluster.file.vmm.clone().map(PathBuf::from).unwrap_or_else(|| {
        std::env::current_exe()
            .ok()
            .and_then(|p| p.parent().map(|d| d.join("shrink-vmm")))
            .unwrap_or_else(|| PathBuf::from("shrink-vmm"))
    });
    let run = run_namespace(opts.join_run.as_deref(), &id, nonce());
    Ok(Plan { cluster, moves, id, run, workdir, vmm })
}

/// Whether a Redis URL list names a user or password.
fn has_userinfo(urls: &str) -> bool {
    urls.split(',').any(|u| {
        let rest = u.trim().split_once("://").map_or("", |(_, r)| r);
        rest.split('/').next().unwrap_or("").contains('@')
    })
}

/// Writes `text` to `path`, readable by this user only.
fn write_private(path: &Path, text: &str) -> Result<(), OrchestrateError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let _ = std::fs::remove_file(path);
    let mut f =
        std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path).map_err(io_err(path))?;
    f.write_all(text.as_bytes()).map_err(io_err(path))
}

/// Starts a destination VMM for every move, through the destination site's launch template
/// (as an argv: no value passes through a local shell), and waits for their API sockets (each
/// binds its migration port before its socket appears).
fn launch(plan: &Plan, opts: &ClusterOptions) -> Result<Vec<Destination>, OrchestrateError> {
    let dest = plan.cluster.site(&opts.dest).expect("planned");
    let mut dests = Vec::new();
    for (i, m) in plan.moves.iter().enumerate() {
        let port = opts.port_base + i as u16;
        let peer = opts.port_base + 100 + i as u16;
        let file = |ext: &str| plan.workdir.join(format!("{}-{}.{ext}", m.vm, opts.dest));
        let (api, serial, log) = (file("sock"), file("serial"), file("log"));
        let _ = std::fs::remove_file(&api);
        let mut cmd: Vec<String> = vec![plan.vmm.display().to_string()];
        cmd.extend(["--incoming".into(), format!("tcp:{}:{port}", m.to_address)]);
        cmd.extend(["--api".into(), api.display().to_string(), "--serial".into(), serial.display().to_string()]);
        cmd.extend(["--name".into(), m.vm.clone()]);
        // TLS on the cluster key (its path on the host; the key itself never travels), or the
        // explicit clear text the file asks for.
        match &plan.cluster.file.cluster_key {
            Some(k) => cmd.extend(["--cluster-key".into(), k.get_ref().clone()]),
            None => cmd.push("--plain-tcp".into()),
        }
        // The VM's disk goes to this site's storage, on this site's copy of its base image, in
        // a file that does not exist yet: what is there after a failed move is this run's.
        // The site index's URL may carry a password: it goes through a file only this user
        // reads, never on the command line.
        let index_url = dest.index.get_ref().clone();
        let index_arg = if has_userinfo(&index_url) {
            let f = file("redis");
            write_private(&f, &index_url)?;
            format!("@{}", f.display())
        } else {
            index_url
        };
        if let (Some(repo), Some(storage)) = (&dest.repository, &dest.storage) {
            let overlay = Path::new(storage.get_ref()).join(format!("{}.qcow2", m.vm));
            let o = overlay.display().to_string();
            if run_on(dest.launch.get_ref(), &m.to_host, &["test", "!", "-e", &o]).is_err() {
                return Err(OrchestrateError::DiskExists { vm: m.vm.clone(), host: m.to_host.clone(), path: o });
            }
            cmd.extend(["--image".into(), repo.get_ref().clone(), "--disk".into(), overlay.display().to_string()]);
            cmd.extend(["--repository".into(), index_arg.clone()]);
        }
        if !opts.no_dedup {
            let listen = format!("{}:{peer}", m.to_address);
            let wait = opts.pull_wait_ms.unwrap_or_else(|| pull_wait_ms(plan.moves.len()));
            cmd.extend(["--index".into(), index_arg.clone()]);
            cmd.extend(["--peer-listen".into(), listen.clone(), "--peer-advertise".into(), listen]);
            cmd.extend(["--pull-wait-ms".into(), wait.to_string()]);
        }
        let argv = launch_argv(dest.launch.get_ref(), &m.to_host, &cmd);
        let logf = std::fs::File::create(&log).map_err(io_err(&log))?;
        use std::os::unix::process::CommandExt;
        Command::new(&argv[0])
            .args(&argv[1..])
            .stdin(Stdio::null())
            .stdout(logf.try_clone().map_err(io_err(&log))?)
            .stderr(logf)
            // Its own process group: the guest must outlive this command (and its Ctrl-C).
            .process_group(0)
            .spawn()
            .map_err(|source| OrchestrateError::Launch { argv: argv.clone(), source })?;
        dests.push((Destination { api: api.clone(), port }, log));
    }
    for (d, log) in &dests {
        wait_socket(&d.api, log, Duration::from_secs(30))?;
    }
    Ok(dests.into_iter().map(|(d, _)| d).collect())
}

/// One VM's migration being followed.
struct Live {
    m: Move,
    /// The source VM's disk overlays (removed from the source site once the VM runs at the
    /// destination).
    disks: Vec<String>,
    bar: ProgressBar,
    /// When its stream last sent something.
    stall: Stall,
    /// Its final answer, once it has one.
    done: Option<SourceQuery>,
    /// Its latest answer.
    last: SourceQuery,
    started: Instant,
}

/// A failed migration's answer, for one that never got to give its own.
fn failed(error: String) -> SourceQuery {
    let mut q = SourceQuery::default();
    q.info.status = Status::Failed;
    q.info.error = Some(error);
    q
}

/// Tells every source VMM to migrate to its destination, all at once.
fn start(plan: &Plan, opts: &ClusterOptions, dests: &[Destination], multi: &MultiProgress) -> Vec<Live> {
    let style = ProgressStyle::with_template("{prefix:>8} {bar:30} {bytes:>10}/{total_bytes:<10} {msg}")
        .unwrap_or_else(|_| ProgressStyle::default_bar());
    let mut live = Vec::new();
    for (m, Destination { port, .. }) in plan.moves.iter().zip(dests) {
        let bar = multi.add(ProgressBar::new(0));
        bar.set_style(style.clone());
        bar.set_prefix(m.vm.clone());
        let from = plan.cluster.site(&m.from_site).expect("planned");
        let args = MigrateArgs {
            uri: format!("tcp:{}:{port}", m.to_address),
            downtime_limit_ms: Some(opts.downtime_limit_ms),
            verify: opts.verify,
            // Shrink compresses the full chunks it sends (when it pays); plain pre-copy, the
            // baseline, does not.
            compress: !opts.no_dedup,
            // Where the source site's image repository is indexed.
            repository: Some(from.index.get_ref().to_owned()),
            no_repository_content: opts.no_repository,
            dedup: (!opts.no_dedup).then(|| DedupArgs {
                coordination: from.coordination.get_ref().to_owned(),
                migration_id: plan.run.clone(),
                dest_site: opts.dest.clone(),
                digest: opts.digest.clone(),
                chunk: opts.chunk,
                ttl_s: crate::args::DEFAULT_TTL_S,
            }),
            ..MigrateArgs::default()
        }
        .to_json();
        let disks = source_disks(Path::new(&m.api));
        let result = ApiClient::connect(Path::new(&m.api))
            .map_err(|e| format!("{}: cannot reach its VMM at {}: {e}", m.vm, m.api))
            .and_then(|mut c| c.execute("migrate", args).map_err(|e| e.to_string()))
            .and_then(|r| r.map_err(|e| format!("{}: migrate: {e}", m.vm)));
        let done = result.err().map(|e| {
            if opts.progress == Mode::Lines {
                eprintln!("shrink-migrate: {}: failed: {e}", m.vm);
            }
            bar.finish_with_message(format!("failed: {e}"));
            failed(e)
        });
        let now = Instant::now();
        live.push(Live {
            m: m.clone(),
            disks,
            bar,
            stall: Stall::new(now),
            done,
            last: SourceQuery::default(),
            started: now,
        });
    }
    live
}

/// Polls every source until each migration has ended, showing progress as `mode` says: a
/// stream that sends nothing for [`crate::progress::STALL_AFTER`] is shown as stalled.
fn follow(live: &mut [Live], dests: &[Destination], mode: Mode) {
    let mut lines = Lines::new(Instant::now());
    loop {
        let mut running = 0;
        let print_lines = mode == Mode::Lines && lines.due(Instant::now());
        for (l, d) in live.iter_mut().zip(dests) {
            if l.done.is_some() {
                continue;
            }
            running += 1;
            match query::<SourceQuery>(Path::new(&l.m.api)) {
                Ok(q) => {
                    let (i, ram) = (&q.info, &q.info.ram);
                    let snapshot = Snapshot::of(i);
                    let stalled = l.stall.observe(snapshot.sent, Instant::now());
                    l.bar.set_length(ram.total);
                    l.bar.set_position(ram.total.saturating_sub(ram.remaining));
                    l.bar.set_message(describe(&snapshot, stalled));
                    let status = i.status.as_str();
                    if matches!(i.status, Status::Completed | Status::Failed | Status::Cancelled) {
                        let end = match &i.error {
                            Some(e) => format!("{status} in {} ms: {e}", i.total_time),
                            None => format!("{status} in {} ms", i.total_time),
                        };
                        if mode == Mode::Lines {
                            eprintln!("shrink-migrate: {}: {end}", l.m.vm);
                        }
                        l.bar.finish_with_message(end);
                        l.done = Some(q);
                    } else {
                        if print_lines {
                            eprintln!("shrink-migrate: {}: {}", l.m.vm, describe(&snapshot, stalled));
                        }
                        l.last = q;
                    }
                }
                Err(e) => {
                    // The source VMM exits once the destination confirmed. But it may also have
                    // died: only a destination running the guest makes this a completion.
                    let mut q = l.last.clone();
                    if query::<DestinationQuery>(&d.api).is_ok_and(|q| q.status == Status::Completed) {
                        q.info.status = Status::Completed;
                        q.info.total_time = l.started.elapsed().as_millis() as u64;
                        if mode == Mode::Lines {
                            eprintln!("shrink-migrate: {}: completed (the destination runs it)", l.m.vm);
                        }
                        l.bar.finish_with_message("completed");
                    } else {
                        q.info.status = Status::Failed;
                        q.info.error =
                            Some(format!("the source VMM is gone ({e}) and the destination does not run the guest"));
                        if mode == Mode::Lines {
                            eprintln!("shrink-migrate: {}: failed: the source VMM is gone", l.m.vm);
                        }
                        l.bar.finish_with_message("failed: source VMM gone");
                    }
                    l.done = Some(q);
                }
            }
        }
        if running == 0 {
            return;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The overlays of the VMM at `api` (from its `status`); none when it does not say.
fn source_disks(api: &Path) -> Vec<String> {
    let Ok(mut c) = ApiClient::connect(api) else { return Vec::new() };
    let Ok(Ok(status)) = c.execute("status", serde_json::json!({})) else { return Vec::new() };
    status["devices"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|d| d["overlay"].as_str().map(str::to_owned))
        // Only a path that means the same on the host as here is ever removed.
        .filter(|p| Path::new(p).is_absolute())
        .collect()
}

/// Checks, before anything starts, that every source VMM answers. (The VMMs, which are the
/// ones that reach the sites' Redis services, refuse a password the services refuse.)
fn preflight(plan: &Plan) -> Result<(), OrchestrateError> {
    // Every source answers: a run never starts destinations for VMs it cannot move.
    for m in &plan.moves {
        let answer = ApiClient::connect(Path::new(&m.api))
            .map_err(|e| e.to_string())
            .and_then(|mut c| c.execute("status", serde_json::json!({})).map_err(|e| e.to_string()))
            .and_then(|r| r.map_err(|e| e.to_string()));
        let status = match answer {
            Ok(s) => s,
            Err(why) => return Err(OrchestrateError::SourceUnreachable { vm: m.vm.clone(), api: m.api.clone(), why }),
        };
        check_transport(plan, &m.vm, &status)?;
    }
    Ok(())
}

/// The source VMM migrates the way the cluster file says: TLS on the same cluster key (when
/// the key file is readable here, its fingerprint is compared), or plain TCP.
fn check_transport(plan: &Plan, vm: &str, status: &serde_json::Value) -> Result<(), OrchestrateError> {
    let file = &plan.cluster.file;
    let want = if file.cluster_key.is_some() { "tls" } else { "plain" };
    let mismatch = |why: String| Err(OrchestrateError::Transport { vm: vm.to_owned(), why });
    match status["transport"].as_str() {
        Some(t) if t == want => {}
        Some("plain") => {
            return mismatch(
                "its VMM migrates over plain TCP, and vc.toml asks for TLS: restart it with --cluster-key".into(),
            )
        }
        Some(_) => {
            return mismatch(
                "its VMM migrates over TLS, and vc.toml says plain_tcp = true: give vc.toml its \
                             cluster_key"
                    .into(),
            )
        }
        None => {
            return mismatch(format!(
                "its VMM was started without --cluster-key or --plain-tcp, and cannot migrate ({want} asked for)"
            ))
        }
    }
    let here = file
        .cluster_key
        .as_ref()
        .and_then(|k| indexd::tls::ClusterKey::load(Path::new(k.get_ref())).ok())
        .map(|key| key.fingerprint());
    match (here, status["cluster_key"].as_str()) {
        (Some(here), Some(there)) if here != there => mismatch(format!(
            "its VMM holds another cluster key (fingerprint {there}) than vc.toml's cluster_key ({here})"
        )),
        _ => Ok(()),
    }
}

/// Where the destination of `m` writes the VM's disk, if its site has storage.
fn dest_overlay(plan: &Plan, opts: &ClusterOptions, m: &Move) -> Option<String> {
    let dest = plan.cluster.site(&opts.dest)?;
    let storage = dest.storage.as_ref()?;
    Some(Path::new(storage.get_ref()).join(format!("{}.qcow2", m.vm)).display().to_string())
}

/// Runs `cmd` on `host` through the launch template (an argv, no local shell).
fn run_on(template: &str, host: &str, cmd: &[&str]) -> Result<(), OrchestrateError> {
    let cmd: Vec<String> = cmd.iter().map(|s| s.to_string()).collect();
    let argv = launch_argv(template, host, &cmd);
    let out = Command::new(&argv[0])
        .args(&argv[1..])
        .stdin(Stdio::null())
        .output()
        .map_err(|source| OrchestrateError::Launch { argv: argv.clone(), source })?;
    if out.status.success() {
        return Ok(());
    }
    let why = String::from_utf8_lossy(&out.stderr).trim().to_owned();
    Err(OrchestrateError::Launch { argv, source: std::io::Error::other(format!("{}: {why}", out.status)) })
}

/// The cluster's report from every VM's, and the cluster file updated to where they now run.
fn report(
    plan: Plan,
    opts: &ClusterOptions,
    live: Vec<Live>,
    dests: &[Destination],
    total_time_ms: u64,
) -> ClusterReport {
    // Where every page came from: the sources' and the destinations' figures.
    let mut vms = Vec::new();
    let mut moved = Vec::new();
    for (l, d) in live.into_iter().zip(dests) {
        let mut r = vm_report(&l.m, l.done.unwrap_or_default(), &d.api, opts.chunk);
        if r.status == Status::Completed {
            moved.push(Relocation { vm: l.m.vm.clone(), host: l.m.to_host.clone(), api: d.api.display().to_string() });
            // Nothing stays behind at the old site once the guest runs at the new one, with its
            // disk: the destination says so (a source that sent its `Commit` has stopped, but
            // the `Commit` may not have arrived; then the old disk is all there is).
            let runs_there = query::<DestinationQuery>(&d.api).is_ok_and(|q| q.status == Status::Completed);
            if !runs_there && !l.disks.is_empty() {
                r.warnings.push(format!(
                    "the destination does not say it runs the guest: its disk stays at {} ({})",
                    l.m.from_host,
                    l.disks.join(", ")
                ));
            }
            let from = plan.cluster.site(&l.m.from_site).expect("planned");
            for disk in l.disks.iter().filter(|_| runs_there) {
                match run_on(from.launch.get_ref(), &l.m.from_host, &["rm", "-f", "--", disk]) {
                    Ok(()) => r.removed.push(format!("{}:{disk}", l.m.from_host)),
                    Err(e) => r.warnings.push(format!("the source's disk {disk} stays at {}: {e}", l.m.from_host)),
                }
            }
        } else {
            // The move failed and the guest runs at the source: the destination VMM this run
            // started goes (`quit`; it has not started the guest, and removes the disk it
            // began), and so does what a dead one left.
            if let Ok(mut c) = ApiClient::connect(&d.api) {
                let _ = c.execute("quit", serde_json::json!({}));
            }
            let gone = (0..50).any(|_| {
                std::thread::sleep(Duration::from_millis(100));
                query::<serde_json::Value>(&d.api).is_err()
            });
            if gone {
                let _ = std::fs::remove_file(&d.api);
            } else {
                r.warnings.push(format!("the destination VMM at {} did not quit", d.api.display()));
            }
            if let (Some(overlay), true) = (dest_overlay(&plan, opts, &l.m), gone) {
                let dest = plan.cluster.site(&opts.dest).expect("planned");
                if let Err(e) = run_on(dest.launch.get_ref(), &l.m.to_host, &["rm", "-f", "--", &overlay]) {
                    r.warnings.push(format!("the partial disk {overlay} at {} stays: {e}", l.m.to_host));
                }
            }
        }
        vms.push(r);
    }
    // The cluster file says where the VMs run now (so the next move starts from there).
    let (mut cluster_file_updated, mut cluster_file_error) = (false, None);
    if opts.update_file && !moved.is_empty() {
        match update_cluster_file(&opts.file, &moved) {
            Ok(()) => cluster_file_updated = true,
            Err(e) => cluster_file_error = Some(e.to_string()),
        }
    }
    let mut counts = Counts::default();
    for v in &vms {
        counts += v.counts;
    }
    ClusterReport {
        migration_id: plan.id,
        run_id: plan.run,
        dest: opts.dest.clone(),
        dedup: !opts.no_dedup,
        chunk: opts.chunk,
        digest: if opts.no_dedup { "none".into() } else { opts.digest.clone() },
        counts,
        failed: vms.iter().filter(|v| v.status != Status::Completed).count(),
        total_time_ms,
        vms,
        cluster_file_updated,
        cluster_file_error,
    }
}

/// Runs a cluster migration: plan, launch the destinations, start every migration, follow
/// them, report, and record where the VMs now run.
pub fn run(opts: &ClusterOptions) -> Result<ClusterReport, OrchestrateError> {
    let plan = plan(opts)?;
    preflight(&plan)?;
    let dests = launch(&plan, opts)?;
    let started = Instant::now();
    let multi = if opts.progress == Mode::Bars {
        MultiProgress::new()
    } else {
        MultiProgress::with_draw_target(indicatif::ProgressDrawTarget::hidden())
    };
    let mut live = start(&plan, opts, &dests, &multi);
    follow(&mut live, &dests, opts.progress);
    let total_time_ms = started.elapsed().as_millis() as u64;
    Ok(report(plan, opts, live, &dests, total_time_ms))
}

/// Rewrites `file` in place (atomically) with the VMs' new hosts and sockets.
fn update_cluster_file(file: &Path, moved: &[Relocation]) -> Result<(), OrchestrateError> {
    let name = file.display().to_string();
    let text = std::fs::read_to_string(file).map_err(io_err(file))?;
    let out = relocate(&name, &text, moved)?;
    // Rewrite the file itself (a symlink stays one), through a temporary file beside it with
    // the same permissions.
    let file = &std::fs::canonicalize(file).map_err(io_err(file))?;
    let tmp = file.with_extension("toml.tmp");
    let r = std::fs::write(&tmp, out)
        .and_then(|()| std::fs::metadata(file).and_then(|m| std::fs::set_permissions(&tmp, m.permissions())))
        .and_then(|()| std::fs::rename(&tmp, file));
    if r.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    r.map_err(io_err(file))
}

/// `query-migrate` of the VMM at `api` (on a connection of its own), as `T`.
fn query<T: serde::de::DeserializeOwned>(api: &Path) -> Result<T, OrchestrateError> {
    let name = || api.display().to_string();
    ApiClient::connect(api).map_err(QueryError::Io).and_then(|mut c| c.query_migrate()).map_err(|e| match e {
        QueryError::Io(source) => OrchestrateError::Api { api: name(), source },
        QueryError::Refused(source) => OrchestrateError::Refused { api: name(), command: QUERY_MIGRATE, source },
        QueryError::Answer(source) => OrchestrateError::Answer { api: name(), command: QUERY_MIGRATE, source },
    })
}

fn vm_report(m: &Move, src: SourceQuery, dest_api: &Path, chunk: u32) -> VmReport {
    let (i, ram) = (&src.info, &src.info.ram);
    // What the source sent, in chunks (its memory counters are in pages, QEMU's way): the
    // figures of a move that failed; a completed one takes the destination's.
    let per_page = (crate::precopy::PAGE_SIZE as u64 / u64::from(chunk.max(1))).max(1);
    let disk_full = i.disk.as_ref().map_or(0, |d| d.normal);
    let disk_uniform = i.disk.as_ref().map_or(0, |d| d.duplicate);
    let mut r = VmReport {
        vm: m.vm.clone(),
        from: m.from_host.clone(),
        to: m.to_host.clone(),
        status: i.status,
        error: i.error.clone(),
        total_time_ms: i.total_time,
        downtime_ms: i.downtime.unwrap_or(0),
        passes: ram.dirty_sync_count,
        counts: Counts {
            wan_bytes: ram.transferred,
            full: ram.normal_bytes / u64::from(chunk.max(1)) + disk_full,
            uniform: ram.duplicate * per_page + disk_uniform,
            deduplicated: ram.deduplicated + i.disk.as_ref().map_or(0, |d| d.deduplicated),
            pulled: ram.pulled,
            compressed: ram.compressed,
            compression_saved_bytes: ram.compression_saved_bytes,
            disk: DiskCounts {
                wan_bytes: i.disk.as_ref().map_or(0, |d| d.transferred),
                deduplicated: i.disk.as_ref().map_or(0, |d| d.deduplicated),
                full: disk_full,
                uniform: disk_uniform,
                ..DiskCounts::default()
            },
            ..Counts::default()
        },
        ..Default::default()
    };
    if let Some(w) = src.dedup.as_ref().and_then(|d| d.warning.clone()) {
        r.warnings.push(w);
    }
    if let Some(w) = i.disk.as_ref().and_then(|d| d.warning.clone()) {
        r.warnings.push(w);
    }
    if i.status != Status::Completed {
        return r;
    }
    match query::<DestinationQuery>(dest_api) {
        Ok(d) => {
            let (s, c) = (&d.incoming.stream, &mut r.counts);
            c.full = s.full;
            c.uniform = s.uniform;
            c.deduplicated = s.digest;
            c.pulled = s.pulled;
            c.compressed = s.compressed;
            c.disk.full = s.disk_full;
            c.disk.uniform = s.disk_uniform;
            c.disk.deduplicated = s.disk_digest;
            c.disk.pulled = s.disk_pulled;
            if let Some(site) = &d.incoming.site {
                c.local = site.local;
                c.fetched_from_peers = site.peer;
                c.repository = site.repository;
                c.disk.local = site.disk_local;
                c.disk.fetched_from_peers = site.disk_peer;
                c.disk.repository = site.disk_repository;
                c.corrupt_from_peers = site.corrupt_from_peer;
                c.peer_errors = site.peer_errors;
                c.index_errors = site.index_errors;
                if let Some(w) = &site.warning {
                    r.warnings.push(w.clone());
                }
            }
        }
        Err(e) => r.warnings.push(format!("the destination's figures are missing: {e}")),
    }
    r
}

/// The report as a person reads it.
pub fn print_report(r: &ClusterReport) {
    let mb = |b: u64| b as f64 / 1e6;
    println!(
        "cluster migration {} to {} ({}, {}-byte chunks, {})",
        r.migration_id,
        r.dest,
        if r.dedup { "deduplicated" } else { "plain pre-copy" },
        r.chunk,
        r.digest
    );
    println!(
        "{:<10} {:<8} {:<8} {:>9} {:>9} {:>9} {:>8} {:>8} {:>8} {:>7} {:>9} {:>8} {:>8}",
        "vm",
        "from",
        "to",
        "full",
        "dedup",
        "uniform",
        "local",
        "peers",
        "repo",
        "pulled",
        "WAN MB",
        "time ms",
        "down ms"
    );
    let disk_line = |d: &DiskCounts| {
        println!(
            "{:<10} {:<8} {:<8} {:>9} {:>9} {:>9} {:>8} {:>8} {:>8} {:>7} {:>9.1}",
            "  of which",
            "disk",
            "",
            d.full,
            d.deduplicated,
            d.uniform,
            d.local,
            d.fetched_from_peers,
            d.repository,
            d.pulled,
            mb(d.wan_bytes)
        )
    };
    for v in &r.vms {
        println!(
            "{:<10} {:<8} {:<8} {:>9} {:>9} {:>9} {:>8} {:>8} {:>8} {:>7} {:>9.1} {:>8} {:>8}{}",
            v.vm,
            v.from,
            v.to,
            v.counts.full,
            v.counts.deduplicated,
            v.counts.uniform,
            v.counts.local,
            v.counts.fetched_from_peers,
            v.counts.repository,
            v.counts.pulled,
            mb(v.counts.wan_bytes),
            v.total_time_ms,
            v.downtime_ms,
            if v.status == Status::Completed {
                String::new()
            } else {
                format!("  {}: {}", v.status.as_str(), v.error.clone().unwrap_or_default())
            }
        );
        let c = &v.counts;
        if c.disk != DiskCounts::default() {
            disk_line(&c.disk);
        }
        if c.corrupt_from_peers + c.peer_errors + c.index_errors > 0 {
            println!(
                "           fallbacks: {} corrupt peer answers, {} unreachable peers, {} index errors",
                c.corrupt_from_peers, c.peer_errors, c.index_errors
            );
        }
        for w in &v.warnings {
            println!("           warning: {w}");
        }
    }
    println!(
        "{:<10} {:<8} {:<8} {:>9} {:>9} {:>9} {:>8} {:>8} {:>8} {:>7} {:>9.1} {:>8}",
        "total",
        "",
        "",
        r.counts.full,
        r.counts.deduplicated,
        r.counts.uniform,
        r.counts.local,
        r.counts.fetched_from_peers,
        r.counts.repository,
        r.counts.pulled,
        mb(r.counts.wan_bytes),
        r.total_time_ms
    );
    if r.counts.disk != DiskCounts::default() {
        disk_line(&r.counts.disk);
    }
    if r.failed > 0 {
        println!("{} VM(s) failed and keep running at the source", r.failed);
    }
    if r.cluster_file_updated {
        println!("the cluster file now lists the moved VMs at {} (their new hosts and API sockets)", r.dest);
    }
    if let Some(e) = &r.cluster_file_error {
        println!("warning: the cluster file could not be updated: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::{nonce, run_id, run_namespace, vm_report, Move, Path, SourceQuery, Status};

    #[test]
    fn urls_with_a_user_or_password_are_told_apart() {
        assert!(super::has_userinfo("redis://:pw@h:1"));
        assert!(super::has_userinfo("redis://h:1,redis://u:pw@h:2"));
        assert!(!super::has_userinfo("redis://h:1/0"));
        assert!(!super::has_userinfo("redis://h:1,redis://h:2"));
    }

    #[test]
    fn a_failed_vms_report_counts_what_its_source_sent() {
        let m = Move {
            vm: "v".into(),
            api: "/nonexistent".into(),
            from_site: "A".into(),
            from_host: "a".into(),
            to_host: "b".into(),
            to_address: "10.0.0.2".into(),
        };
        let mut q = SourceQuery::default();
        q.info.status = Status::Failed;
        q.info.ram.transferred = 9 << 20;
        q.info.ram.normal_bytes = 2048 * 4096;
        q.info.ram.duplicate = 100;
        q.info.disk = Some(crate::precopy::DiskStats { normal: 7, duplicate: 3, ..Default::default() });
        let r = vm_report(&m, q, Path::new("/nonexistent.sock"), 1024);
        assert_eq!((r.counts.full, r.counts.uniform), (8192 + 7, 400 + 3), "{r:?}");
        assert_eq!((r.counts.disk.full, r.counts.disk.uniform), (7, 3));
    }

    #[test]
    fn runs_with_one_migration_id_never_share_coordination_keys() {
        let (a, b) = (run_namespace(None, "demo", nonce()), run_namespace(None, "demo", nonce()));
        assert!(a.starts_with("demo.") && b.starts_with("demo."), "{a} {b}");
        assert_ne!(a, b, "two runs of one id");
        assert_eq!(run_id("demo", 0xab), "demo.00000000000000ab");
        assert_eq!(run_namespace(None, "demo", 0xab), "demo.00000000000000ab", "a fresh namespace");
    }

    #[test]
    fn a_run_that_joins_an_earlier_one_coordinates_in_its_namespace() {
        let earlier = run_namespace(None, "demo", 0xab);
        assert_eq!(run_namespace(Some(&earlier), "demo", 0xcd), earlier);
        assert_eq!(run_namespace(Some(&earlier), "other-id", 0xcd), earlier, "whatever this run's own id");
    }

    #[test]
    fn the_wait_for_content_in_flight_grows_with_the_streams_sharing_the_wan() {
        assert_eq!([1, 2, 4, 8, 16, 64].map(super::pull_wait_ms), [500, 500, 1000, 2000, 3000, 3000]);
    }
}
