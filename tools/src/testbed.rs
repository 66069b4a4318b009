//! The two-site testbed: the whole product on one machine, in network namespaces.
//!
//! ```text
//!            site A (VM network 10.1.0.0/24, hosts use 10.1.0.0/16)                site B (10.1.1.0/24)
//!  <n>-acl 10.1.0.100 ─┐                                                       ┌─ <n>-bcl 10.1.1.100
//!  <n>-ah1 [br0 taps]──┤ vlan ── lan0 <n>-agw (vnetd A, Redis :6379 :6380)      │
//!  <n>-ah2 [br0 taps]──┘ (<n>-asw)         eth0 172.16.1.253                   ...  (the same at B)
//!  <n>-ah1 eth0 172.16.1.11 ─┐ mgmt ─ eth0 <n>-art 172.16.1.254
//!  <n>-ah2 eth0 172.16.1.12 ─┘                wan0 192.168.100.1 ════ tbf ════ 192.168.100.2 wan0 <n>-brt
//! ```
//!
//! Every site has a LAN switch (`<n>-Xsw`, bridges `vlan` for the VMs and `mgmt` for the
//! hosts), compute hosts (`<n>-Xh1`, `<n>-Xh2`: `br0` on the VM LAN for the guests' taps,
//! `eth0` on the management LAN for migration and peer traffic), a ViNe gateway (`<n>-Xgw`:
//! `vnetd` on the VM LAN, the site's coordination and index `redis-server`s on the management
//! LAN), a border router (`<n>-Xrt`) and a client (`<n>-Xcl`) on the VM LAN. The border
//! routers are joined by the WAN, shaped with `tc tbf` in both directions; vnetd's tunnel
//! goes first on it (an `htb` with two priorities under the `tbf`), bulk migration traffic
//! after.
//!
//! Everything lives in namespaces named `<n>-*` and in the working directory: nothing in the
//! root namespace is touched. [`down`] removes it all, and [`Testbed::up`] calls it first.
//! The state a later command needs (what was built, which VMs run) is kept in
//! `<dir>/state.json` and `<dir>/vc.toml`, so `shrink-testbed up`, `boot`, `migrate` and `down`
//! can be separate commands.
//!
//! Each site has storage of its own, `<dir>/siteA` and `<dir>/siteB`: `repo/base.qcow2`, the
//! site's copy of the base image (indexed into the site's index Redis with `shrink-repo index`
//! at [`Testbed::up`]), and `disks/`, the overlays of the VMs its hosts run. Every process the
//! testbed starts on a host runs through `shrink-testbed isolate` ([`isolate`]), in a mount
//! namespace of its own where the other site's directory is an empty read-only tmpfs: a VMM at
//! site B cannot open site A's images, so a migration must carry the disk. The rest of the
//! working directory (logs, sockets, serial consoles, vc.toml) is seen by everyone.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use shrink_testutil::netns::{self, NetnsError};
use shrink_testutil::process::{bin_dir, build_hint, proc_state};
use shrink_testutil::util::{wait_for, WaitTimeout};

/// Errors of the testbed.
#[derive(Debug, thiserror::Error)]
pub enum TestbedError {
    /// A command failed.
    #[error(transparent)]
    Command(#[from] NetnsError),
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// Cause.
        source: std::io::Error,
    },
    /// Something needed is missing.
    #[error("{what} is missing: {hint}")]
    Missing {
        /// What.
        what: String,
        /// How to get it.
        hint: String,
    },
    /// Something did not happen in time.
    #[error(transparent)]
    Timeout(#[from] WaitTimeout),
    /// A process failed.
    #[error("{0}")]
    Failed(String),
    /// A QEMU of the baseline failed.
    #[error(transparent)]
    Qemu(#[from] shrink_testutil::qemu::QemuError),
    /// `shrink-repo index` failed on a site's repository image.
    #[error("indexing {image} with shrink-repo failed: {stderr}")]
    Index {
        /// The image.
        image: String,
        /// What shrink-repo printed on standard error.
        stderr: String,
    },
    /// Entering an isolated mount namespace failed ([`isolate`]).
    #[error("{what}: {source}")]
    Isolate {
        /// The step that failed (`unshare(CLONE_NEWNS)`, `mount tmpfs on DIR`...).
        what: String,
        /// Cause.
        source: nix::Error,
    },
}

/// Result alias.
pub type Result<T> = std::result::Result<T, TestbedError>;

fn io<T>(path: &Path, r: std::io::Result<T>) -> Result<T> {
    r.map_err(|source| TestbedError::Io { path: path.display().to_string(), source })
}

/// The programs and images the testbed runs.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Bins {
    /// `shrink-vmm`.
    pub vmm: PathBuf,
    /// `shrink-migrate`.
    pub migrate: PathBuf,
    /// `vnetd`.
    pub vnetd: PathBuf,
    /// `vnet-probe`.
    pub probe: PathBuf,
    /// The test guest kernel.
    pub guest: PathBuf,
    /// The base image (each site gets a copy of it at [`Testbed::up`]).
    pub base: PathBuf,
    /// `shrink-repo` (indexes a site's repository).
    pub repo: PathBuf,
    /// `shrink-testbed` (its `isolate` runs every process started on a host).
    pub testbed: PathBuf,
}

impl Bins {
    /// Binaries from `bin_dir` (default: `$SHRINK_BIN_DIR`, else the `target/<profile>`
    /// directory of whoever runs, [`bin_dir`]), images from `images` (default: the repository's
    /// `images/out`). Errors name what is missing and how to build it.
    pub fn find(bin_dir: Option<&Path>, images: Option<&Path>) -> Result<Bins> {
        let root = shrink_testutil::util::repo_root();
        let bin_dir = bin_dir.map(Path::to_owned).unwrap_or_else(self::bin_dir);
        let images = images.map(Path::to_owned).unwrap_or_else(|| root.join("images/out"));
        let b = Bins {
            vmm: bin_dir.join("shrink-vmm"),
            migrate: bin_dir.join("shrink-migrate"),
            vnetd: bin_dir.join("vnetd"),
            probe: bin_dir.join("vnet-probe"),
            guest: images.join("shrink-guest"),
            base: images.join("base.qcow2"),
            repo: bin_dir.join("shrink-repo"),
            testbed: bin_dir.join("shrink-testbed"),
        };
        for p in [&b.vmm, &b.migrate, &b.vnetd, &b.probe, &b.repo, &b.testbed] {
            if !p.is_file() {
                return Err(TestbedError::Missing { what: p.display().to_string(), hint: build_hint(&bin_dir) });
            }
        }
        for p in [&b.guest, &b.base] {
            if !p.is_file() {
                return Err(TestbedError::Missing { what: p.display().to_string(), hint: "run `make images`".into() });
            }
        }
        for (tool, pkg) in
            [("redis-server", "redis-server"), ("redis-cli", "redis-tools"), ("tc", "iproute2"), ("ethtool", "ethtool")]
        {
            if netns::run(&["sh", "-c", &format!("command -v {tool}")]).is_err() {
                return Err(TestbedError::Missing {
                    what: tool.into(),
                    hint: format!("apt-get install {pkg} (or `make deps`)"),
                });
            }
        }
        Ok(b)
    }
}

/// How to build the testbed.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Options {
    /// Prefix of every namespace (`<name>-...`).
    pub name: String,
    /// Working directory: state, configs, logs, sockets, and each site's storage
    /// (`siteA/`, `siteB/`).
    pub dir: PathBuf,
    /// WAN rate, as `tc` takes it (`100mbit`).
    pub wan_rate: String,
    /// Compute hosts per site.
    pub hosts_per_site: usize,
    /// One-way WAN delay, ms (0: none), added by a delay line between the border routers
    /// ([`crate::delayline`]).
    #[serde(default)]
    pub wan_delay_ms: u64,
}

/// The longest one-way WAN delay the testbed offers, ms.
pub const MAX_WAN_DELAY_MS: u64 = 1000;

impl Options {
    /// Defaults for testbed `name`: directory `/tmp/shrink-testbed-<name>`, 100 Mbit/s WAN
    /// without added delay, two hosts per site.
    pub fn new(name: &str) -> Options {
        Options {
            name: name.to_owned(),
            dir: default_dir(name),
            wan_rate: "100mbit".into(),
            hosts_per_site: 2,
            wan_delay_ms: 0,
        }
    }
}

/// The working directory of testbed `name` unless told otherwise.
pub fn default_dir(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("shrink-testbed-{name}"))
}

/// Bits per second of a `tc` rate such as `100mbit`, `1gbit`, `500kbit` (None if it is not one).
pub fn rate_bps(rate: &str) -> Option<u64> {
    let r = rate.trim().to_ascii_lowercase();
    let split = r.find(|c: char| !c.is_ascii_digit() && c != '.')?;
    let (num, unit) = r.split_at(split);
    let mult = match unit {
        "kbit" => 1e3,
        "mbit" => 1e6,
        "gbit" => 1e9,
        _ => return None,
    };
    let v = num.parse::<f64>().ok()? * mult;
    (v >= 1e5).then_some(v as u64)
}

/// A site.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Site {
    /// Site A (10.1.0.0/24, management 172.16.1.0/24).
    A,
    /// Site B (10.1.1.0/24, management 172.16.2.0/24).
    B,
}

impl Site {
    /// Both.
    pub const ALL: [Site; 2] = [Site::A, Site::B];
    /// `a` or `b` (in namespace names).
    pub fn letter(self) -> &'static str {
        match self {
            Site::A => "a",
            Site::B => "b",
        }
    }
    /// `siteA` or `siteB` (in vc.toml).
    pub fn name(self) -> &'static str {
        match self {
            Site::A => "siteA",
            Site::B => "siteB",
        }
    }
    /// vnetd's router name.
    pub fn router(self) -> &'static str {
        match self {
            Site::A => "A",
            Site::B => "B",
        }
    }
    fn n(self) -> u8 {
        match self {
            Site::A => 0,
            Site::B => 1,
        }
    }
    /// The other site.
    pub fn other(self) -> Site {
        match self {
            Site::A => Site::B,
            Site::B => Site::A,
        }
    }
    /// The site's VM network prefix, `10.1.0` or `10.1.1`.
    pub fn vm_net(self) -> String {
        format!("10.1.{}", self.n())
    }
    /// The management network prefix, `172.16.1` or `172.16.2`.
    pub fn mgmt_net(self) -> String {
        format!("172.16.{}", self.n() + 1)
    }
    /// The gateway's management address (vnetd's overlay, the Redis servers).
    pub fn gateway_addr(self) -> String {
        format!("{}.253", self.mgmt_net())
    }
    /// vnetd's router MAC.
    pub fn router_mac(self) -> String {
        format!("02:00:0a:01:{:02x}:fe", self.n())
    }
    /// The client's address on the VM LAN.
    pub fn client_ip(self) -> String {
        format!("{}.100", self.vm_net())
    }
    /// The coordination Redis URL (SET NX of chunks this site sent).
    pub fn coordination(self) -> String {
        format!("redis://{}:6379", self.gateway_addr())
    }
    /// The index Redis URL (chunks this site's hosts hold).
    pub fn index(self) -> String {
        format!("redis://{}:6380", self.gateway_addr())
    }
}

/// A VM of the testbed's cluster.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VmInfo {
    /// Its name (`vm1`...).
    pub name: String,
    /// Its address (site A's network).
    pub ip: String,
    /// Its MAC.
    pub mac: String,
}

impl VmInfo {
    /// VM `i` (1-based) of a cluster: `vm<i>` at 10.1.0.(10+i), MAC 52:54:00:10:00:<i>.
    pub fn nth(i: usize) -> VmInfo {
        VmInfo { name: format!("vm{i}"), ip: format!("10.1.0.{}", 10 + i), mac: format!("52:54:00:10:00:{i:02x}") }
    }

    /// Its guest's command line for `spec` (whichever VMM runs it).
    pub fn cmdline(&self, spec: &BootSpec) -> String {
        format!(
            "ip={}/16 gw=10.1.0.254 preload={} private={} workload={} {}",
            self.ip, spec.preload, spec.private, spec.workload, spec.extra
        )
    }
}

/// What to boot.
#[derive(Debug, Clone)]
pub struct BootSpec {
    /// How many VMs.
    pub vms: usize,
    /// Memory per VM (`256M`).
    pub mem: String,
    /// vCPUs per VM (`shrink-vmm --cpus`).
    pub cpus: u8,
    /// Bytes of the base image read into memory (OS content shared across VMs).
    pub preload: String,
    /// Bytes of pseudo-random memory private to each VM.
    pub private: String,
    /// Guest workload (`idle`, `mem`, `io`).
    pub workload: String,
    /// More of the guest's command line (`mem=16M rate=1M`, `iorate=1M`).
    pub extra: String,
    /// The VMMs migrate in clear text (`--plain-tcp`) instead of over TLS on the testbed's
    /// cluster key (to measure what TLS costs).
    pub plain_tcp: bool,
}

impl Default for BootSpec {
    fn default() -> BootSpec {
        BootSpec {
            vms: 4,
            mem: "256M".into(),
            cpus: 1,
            preload: "64M".into(),
            private: "28M".into(),
            workload: "idle".into(),
            extra: String::new(),
            plain_tcp: false,
        }
    }
}

/// The testbed's saved state.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct State {
    /// How it was built.
    pub opts: Options,
    /// What it runs.
    pub bins: Bins,
    /// The cluster booted by [`Testbed::boot`].
    pub vms: Vec<VmInfo>,
    /// It migrates in clear text ([`BootSpec::plain_tcp`]).
    #[serde(default)]
    pub plain_tcp: bool,
}

/// A testbed that is up.
pub struct Testbed {
    /// Its state.
    pub state: State,
}

/// What [`down`] removed.
#[derive(Debug, Default, Serialize)]
pub struct Removed {
    /// Namespaces deleted.
    pub namespaces: Vec<String>,
    /// Processes stopped.
    pub processes: usize,
    /// Whether the working directory was removed.
    pub dir: bool,
}

/// The namespaces of testbed `name` that exist now.
pub fn namespaces(name: &str) -> Vec<String> {
    let prefix = format!("{name}-");
    netns::run(&["ip", "netns", "list"])
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.starts_with(&prefix))
        .map(str::to_owned)
        .collect()
}

fn alive(pid: u32) -> bool {
    // A zombie has exited: only its parent's wait is missing.
    proc_state(pid).is_some_and(|s| s != 'Z')
}

fn kill(pid: u32, sig: &str) {
    let _ = netns::run(&["kill", sig, &pid.to_string()]);
}

/// Processes in the root namespace that belong to testbed `dir` (recorded in `dir/pids/`):
/// those whose command line still mentions `dir` (a recycled pid does not).
fn recorded_pids(dir: &Path) -> Vec<u32> {
    let mut out = Vec::new();
    let needle = format!("{}/", dir.display());
    for e in std::fs::read_dir(dir.join("pids")).into_iter().flatten().flatten() {
        let Some(pid) = std::fs::read_to_string(e.path()).ok().and_then(|s| s.trim().parse::<u32>().ok()) else {
            continue;
        };
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        if String::from_utf8_lossy(&cmdline).contains(&needle) {
            out.push(pid);
        }
    }
    out
}

/// The file that marks a directory as a testbed's working directory (only such a directory
/// is ever removed).
const MARKER: &str = ".shrink-testbed";

/// Checks a testbed name: it prefixes namespace names, so 1-24 letters, digits or `_`.
pub fn check_name(name: &str) -> Result<()> {
    if name.is_empty() || name.len() > 24 || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
        return Err(TestbedError::Failed(format!("testbed name '{name}': use 1-24 letters, digits or _")));
    }
    Ok(())
}

fn pids_of(name: &str, dir: &Path) -> Vec<u32> {
    let mut pids: Vec<u32> = namespaces(name).iter().flat_map(|ns| netns::pids(ns)).collect();
    pids.extend(recorded_pids(dir));
    pids.retain(|&p| alive(p));
    pids.sort_unstable();
    pids.dedup();
    pids
}

/// Removes testbed `name` (working directory `dir`): stops every process in its namespaces
/// and those it started outside them (SIGTERM, then SIGKILL after 3 s), deletes the namespaces
/// (and with them every bridge, veth and tap) and the directory — only if it is a testbed's
/// (it holds the marker `up` writes). Safe to call on a testbed that is half built, already
/// gone, or left behind by a crash.
pub fn down(name: &str, dir: &Path) -> Result<Removed> {
    check_name(name)?;
    if dir.exists()
        && !dir.join(MARKER).exists()
        && std::fs::read_dir(dir).map(|mut d| d.next().is_some()).unwrap_or(true)
    {
        return Err(TestbedError::Failed(format!(
            "{} is not a testbed's working directory (no {MARKER}): not touching it",
            dir.display()
        )));
    }
    let first = pids_of(name, dir);
    for &p in &first {
        kill(p, "-TERM");
    }
    // Those still running after 3 s are killed below.
    let _ = wait_for("the testbed's processes to stop", 3, || (!first.iter().any(|&p| alive(p))).then_some(()));
    // Then anything left, including what started in the meantime (a destination VMM being
    // launched), until nothing is left.
    let mut stopped = first.len();
    for _ in 0..20 {
        let left = pids_of(name, dir);
        if left.is_empty() {
            break;
        }
        stopped += left.iter().filter(|p| !first.contains(p)).count();
        for &p in &left {
            kill(p, "-KILL");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let nss = namespaces(name);
    let mut errors = Vec::new();
    for ns in &nss {
        if let Err(e) = netns::run(&["ip", "netns", "del", ns]) {
            errors.push(e.to_string());
        }
    }
    let had_dir = dir.join(MARKER).exists();
    if had_dir {
        if let Err(e) = std::fs::remove_dir_all(dir) {
            errors.push(format!("{}: {e}", dir.display()));
        }
    }
    if !errors.is_empty() {
        return Err(TestbedError::Failed(format!("testbed '{name}' not fully removed: {}", errors.join("; "))));
    }
    Ok(Removed { namespaces: nss, processes: stopped, dir: had_dir })
}

/// Starts `args` in namespace `ns`, detached (its own process group, outliving the caller),
/// output to `log`; its pid is recorded in `dir/pids/<tag>.pid`.
fn spawn_detached(dir: &Path, tag: &str, ns: &str, args: &[&str], log: &Path) -> Result<Child> {
    let f = io(log, std::fs::File::create(log))?;
    let f2 = io(log, f.try_clone())?;
    let child = Command::new("ip")
        .args(["netns", "exec", ns])
        .args(args)
        .stdin(Stdio::null())
        .stdout(f)
        .stderr(f2)
        .process_group(0)
        .spawn()
        .map_err(|e| TestbedError::Failed(format!("cannot start {}: {e}", args[0])))?;
    let pid = child.id();
    let pids = dir.join("pids");
    io(&pids, std::fs::create_dir_all(&pids))?;
    let pf = pids.join(format!("{tag}.pid"));
    io(&pf, std::fs::write(&pf, pid.to_string()))?;
    Ok(child)
}

/// Puts the calling process in a mount namespace of its own where every directory of `hide`
/// is an empty, read-only tmpfs (what `shrink-testbed isolate` does before it runs its
/// command). Nothing it mounts propagates back: `/` is made recursively private first. A
/// directory that cannot be hidden (it does not exist, not root) is an error, and the caller
/// must not go on to run anything.
pub fn isolate(hide: &[PathBuf]) -> Result<()> {
    use nix::mount::{mount, MsFlags};
    let err = |what: String| move |source| TestbedError::Isolate { what, source };
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS).map_err(err("unshare(CLONE_NEWNS)".into()))?;
    mount(None::<&str>, "/", None::<&str>, MsFlags::MS_REC | MsFlags::MS_PRIVATE, None::<&str>)
        .map_err(err("making / recursively private".into()))?;
    for d in hide {
        mount(
            Some("tmpfs"),
            d.as_path(),
            Some("tmpfs"),
            MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
            Some("size=4k,mode=0555"),
        )
        .map_err(err(format!("mounting an empty tmpfs on {}", d.display())))?;
    }
    Ok(())
}

/// ping's summary `rtt min/avg/max/mdev = 0.1/0.2/0.3/0.04 ms`, as numbers.
fn parse_ping_rtt(out: &str) -> Option<[f64; 4]> {
    let line = out.lines().find(|l| l.contains("min/avg/max"))?;
    let values = line.split('=').nth(1)?.split_whitespace().next()?;
    let v: Vec<f64> = values.split('/').filter_map(|x| x.parse().ok()).collect();
    v.try_into().ok()
}

/// `s` as a TOML basic string (JSON's escapes are TOML's).
fn toml_str(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_default()
}

fn tail(p: &Path) -> String {
    shrink_testutil::util::tail_lines(p, 8)
}

impl Testbed {
    /// Namespace of `role` (`asw`, `agw`, `art`, `ah1`, `acl`, ...).
    pub fn ns(&self, role: &str) -> String {
        format!("{}-{role}", self.state.opts.name)
    }

    /// The working directory.
    pub fn dir(&self) -> &Path {
        &self.state.opts.dir
    }

    /// A file in the working directory.
    pub fn path(&self, f: &str) -> PathBuf {
        self.dir().join(f)
    }

    /// Namespace of compute host `k` (1-based) of `site`.
    pub fn host_ns(&self, site: Site, k: usize) -> String {
        self.ns(&format!("{}h{k}", site.letter()))
    }

    /// The site whose compute host namespace `ns` is (None for any other namespace).
    pub fn host_site(&self, ns: &str) -> Option<Site> {
        Site::ALL.into_iter().find(|&s| (1..=self.state.opts.hosts_per_site).any(|k| self.host_ns(s, k) == ns))
    }

    /// The storage of `site`, `<dir>/siteA` or `<dir>/siteB` (absolute): what the other site's
    /// hosts do not see.
    pub fn site_dir(&self, site: Site) -> PathBuf {
        let dir = std::path::absolute(self.dir()).unwrap_or_else(|_| self.dir().to_owned());
        dir.join(site.name())
    }

    /// `site`'s image repository: its own copy of the base image, `<site dir>/repo/base.qcow2`,
    /// indexed in its index Redis.
    pub fn repository(&self, site: Site) -> PathBuf {
        self.site_dir(site).join("repo").join("base.qcow2")
    }

    /// Where `site`'s hosts keep the VMs' disks (overlays): `<site dir>/disks`.
    pub fn storage(&self, site: Site) -> PathBuf {
        self.site_dir(site).join("disks")
    }

    /// `args` as run isolated on a host of `site`: `shrink-testbed isolate --hide <the other
    /// site's dir> -- args...` (see [`isolate`]).
    pub fn isolated(&self, site: Site, args: &[&str]) -> Vec<String> {
        let mut v = vec![
            self.state.bins.testbed.display().to_string(),
            "isolate".into(),
            "--hide".into(),
            self.site_dir(site.other()).display().to_string(),
            "--".into(),
        ];
        v.extend(args.iter().map(|a| (*a).to_owned()));
        v
    }

    /// `site`'s launch template in vc.toml: how `shrink-migrate` runs a command on one of its
    /// hosts (in the host's network namespace, isolated from the other site's storage).
    pub fn launch_template(&self, site: Site) -> String {
        format!(
            "ip netns exec {{host}} {} isolate --hide {} -- {{cmd}}",
            self.state.bins.testbed.display(),
            self.site_dir(site.other()).display()
        )
    }

    /// Management address of compute host `k` of `site`.
    pub fn host_addr(site: Site, k: usize) -> String {
        format!("{}.{}", site.mgmt_net(), 10 + k)
    }

    /// Builds the testbed (removing what an earlier one with the same name left behind) and
    /// starts vnetd and the Redis servers at both sites.
    pub fn up(opts: Options, bins: Bins) -> Result<Testbed> {
        netns::available().map_err(|e| TestbedError::Missing { what: "root".into(), hint: e.to_string() })?;
        check_name(&opts.name)?;
        if rate_bps(&opts.wan_rate).is_none() {
            return Err(TestbedError::Failed(format!(
                "WAN rate '{}': give a number with kbit, mbit or gbit (e.g. 100mbit)",
                opts.wan_rate
            )));
        }
        if !(1..=8).contains(&opts.hosts_per_site) {
            return Err(TestbedError::Failed(format!("{} hosts per site: 1 to 8", opts.hosts_per_site)));
        }
        if opts.wan_delay_ms > MAX_WAN_DELAY_MS {
            return Err(TestbedError::Failed(format!(
                "WAN delay {} ms: at most {MAX_WAN_DELAY_MS} ms one way",
                opts.wan_delay_ms
            )));
        }
        down(&opts.name, &opts.dir)?;
        io(&opts.dir, std::fs::create_dir_all(&opts.dir))?;
        let marker = opts.dir.join(MARKER);
        io(
            &marker,
            std::fs::write(&marker, b"a shrink-testbed working directory: `shrink-testbed down` removes it\n"),
        )?;
        let tb = Testbed { state: State { opts, bins, vms: Vec::new(), plain_tcp: false } };
        tb.save()?;
        if let Err(e) = tb
            .make_storage()
            .and_then(|()| tb.build())
            .and_then(|()| tb.start_services())
            .and_then(|()| tb.index_repositories())
        {
            let _ = down(&tb.state.opts.name, tb.dir());
            return Err(e);
        }
        Ok(tb)
    }

    /// The testbed `name` that is up (working directory `dir`).
    pub fn open(name: &str, dir: &Path) -> Result<Testbed> {
        let p = dir.join("state.json");
        let text = std::fs::read_to_string(&p).map_err(|_| {
            TestbedError::Failed(format!("testbed '{name}' is not up (no {}): run `shrink-testbed up`", p.display()))
        })?;
        let state: State =
            serde_json::from_str(&text).map_err(|e| TestbedError::Failed(format!("{}: {e}", p.display())))?;
        if namespaces(name).is_empty() {
            return Err(TestbedError::Failed(format!(
                "testbed '{name}' has state in {} but no namespaces: run `shrink-testbed up`",
                dir.display()
            )));
        }
        Ok(Testbed { state })
    }

    /// Each site's storage: its copy of the base image and its disks directory. The paths go
    /// into launch templates, which `shrink-migrate` splits at white space: none is allowed.
    fn make_storage(&self) -> Result<()> {
        for p in [self.site_dir(Site::A), self.state.bins.testbed.clone()] {
            if p.to_string_lossy().contains(char::is_whitespace) {
                return Err(TestbedError::Failed(format!(
                    "'{}': the testbed's directory and binaries must have no white space in their paths \
                     (they go into vc.toml's launch templates)",
                    p.display()
                )));
            }
        }
        for s in Site::ALL {
            let (repo, disks) = (self.repository(s), self.storage(s));
            if let Some(d) = repo.parent() {
                io(d, std::fs::create_dir_all(d))?;
            }
            io(&disks, std::fs::create_dir_all(&disks))?;
            io(&repo, std::fs::copy(&self.state.bins.base, &repo))?;
        }
        Ok(())
    }

    /// Indexes each site's repository into its index Redis (`shrink-repo index`, from the
    /// site's gateway; both sites at once); what it prints goes to
    /// `<dir>/repo-index-<site>.log`. `up` indexes 4096-byte chunks.
    fn index_repositories(&self) -> Result<()> {
        self.index_repositories_at(&[4096])
    }

    /// The same for chunks of each size of `chunks` (SHA-256): a migration with another chunk
    /// size finds its base image's content there instead of reading the image.
    pub fn index_repositories_at(&self, chunks: &[u32]) -> Result<()> {
        let repo_bin = &self.state.bins.repo;
        let mut running = Vec::new();
        for s in Site::ALL {
            let repo = self.repository(s);
            let sizes: Vec<String> = chunks.iter().flat_map(|c| ["--chunk".to_owned(), c.to_string()]).collect();
            let child = Command::new("ip")
                .args(["netns", "exec", &self.ns(&format!("{}gw", s.letter()))])
                .arg(repo_bin)
                .args(["index", "--index", &s.index()])
                .args(&sizes)
                .arg(&repo)
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .map_err(|e| TestbedError::Failed(format!("cannot run {}: {e}", repo_bin.display())))?;
            running.push((s, repo, child));
        }
        let mut first_error = None;
        for (s, repo, child) in running {
            let out =
                child.wait_with_output().map_err(|e| TestbedError::Failed(format!("{}: {e}", repo_bin.display())))?;
            let log = self.path(&format!("repo-index-{}.log", s.letter()));
            io(&log, std::fs::write(&log, [&out.stdout[..], &out.stderr[..]].concat()))?;
            if !out.status.success() && first_error.is_none() {
                first_error = Some(TestbedError::Index {
                    image: repo.display().to_string(),
                    stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
                });
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    fn save(&self) -> Result<()> {
        let p = self.path("state.json");
        io(&p, std::fs::write(&p, serde_json::to_string_pretty(&self.state).unwrap_or_default()))
    }

    fn ip(&self, ns: &str, args: &[&str]) -> Result<()> {
        let mut v = vec!["ip", "-n", ns];
        v.extend_from_slice(args);
        netns::run(&v)?;
        Ok(())
    }

    pub(crate) fn exec(&self, ns: &str, args: &[&str]) -> Result<String> {
        let mut v = vec!["ip", "netns", "exec", ns];
        v.extend_from_slice(args);
        Ok(netns::run(&v)?)
    }

    /// A veth from `ns` (`ifname`, optional MAC and MTU) to bridge `br` of switch `sw` (port
    /// `port`).
    #[allow(clippy::too_many_arguments)]
    fn plug(&self, ns: &str, ifname: &str, mac: Option<&str>, mtu: &str, sw: &str, port: &str, br: &str) -> Result<()> {
        let mut args = vec!["link", "add", ifname];
        if let Some(m) = mac {
            args.extend(["address", m]);
        }
        args.extend(["mtu", mtu, "type", "veth", "peer", "name", port, "mtu", mtu, "netns", sw]);
        self.ip(ns, &args)?;
        self.ip(sw, &["link", "set", port, "master", br, "up"])?;
        self.ip(ns, &["link", "set", ifname, "up"])
    }

    fn build(&self) -> Result<()> {
        let o = &self.state.opts;
        let mut all = Vec::new();
        for s in Site::ALL {
            let l = s.letter();
            all.extend([format!("{l}sw"), format!("{l}gw"), format!("{l}rt"), format!("{l}cl")]);
            all.extend((1..=o.hosts_per_site).map(|k| format!("{l}h{k}")));
        }
        if o.wan_delay_ms > 0 {
            all.push("wan".into());
        }
        for role in &all {
            let ns = self.ns(role);
            netns::run(&["ip", "netns", "add", &ns])?;
            self.ip(&ns, &["link", "set", "lo", "up"])?;
            self.exec(
                &ns,
                &["sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1", "net.ipv6.conf.default.disable_ipv6=1"],
            )?;
        }
        for s in Site::ALL {
            let l = s.letter();
            let (sw, gw, rt, cl) = (
                self.ns(&format!("{l}sw")),
                self.ns(&format!("{l}gw")),
                self.ns(&format!("{l}rt")),
                self.ns(&format!("{l}cl")),
            );
            // The LAN switch: the VM network and the management network.
            for br in ["vlan", "mgmt"] {
                self.ip(&sw, &["link", "add", br, "type", "bridge", "stp_state", "0"])?;
                self.ip(&sw, &["link", "set", br, "up"])?;
            }
            // Gateway: vnetd on the VM LAN (no IP there; the kernel must not forward).
            self.plug(&gw, "lan0", Some(&s.router_mac()), "1500", &sw, "gw", "vlan")?;
            self.exec(&sw, &["ethtool", "-K", "gw", "tx", "off", "tso", "off", "gso", "off", "sg", "off"])?;
            self.exec(&gw, &["sysctl", "-qw", "net.ipv4.ip_forward=0"])?;
            self.plug(&gw, "eth0", None, "1600", &sw, "gwm", "mgmt")?;
            self.ip(&gw, &["addr", "add", &format!("{}/24", s.gateway_addr()), "dev", "eth0"])?;
            self.ip(&gw, &["route", "add", "172.16.0.0/16", "via", &format!("{}.254", s.mgmt_net())])?;
            // Border router.
            self.plug(&rt, "eth0", None, "1600", &sw, "rt", "mgmt")?;
            self.ip(&rt, &["addr", "add", &format!("{}.254/24", s.mgmt_net()), "dev", "eth0"])?;
            self.exec(&rt, &["sysctl", "-qw", "net.ipv4.ip_forward=1"])?;
            // Client on the VM LAN (the whole /16 on-link, like every host of the VM network).
            self.plug(&cl, "eth0", Some(&format!("02:00:0a:01:{:02x}:64", s.n())), "1500", &sw, "cl", "vlan")?;
            self.ip(&cl, &["addr", "add", &format!("{}/16", s.client_ip()), "dev", "eth0"])?;
            // Compute hosts.
            for k in 1..=o.hosts_per_site {
                let h = self.host_ns(s, k);
                self.ip(&h, &["link", "add", "br0", "type", "bridge", "stp_state", "0"])?;
                self.ip(&h, &["link", "set", "br0", "up"])?;
                let port = format!("h{k}");
                self.ip(&h, &["link", "add", "up0", "type", "veth", "peer", "name", &port, "netns", &sw])?;
                self.ip(&sw, &["link", "set", &port, "master", "vlan", "up"])?;
                self.ip(&h, &["link", "set", "up0", "master", "br0", "up"])?;
                self.plug(&h, "eth0", None, "1600", &sw, &format!("h{k}m"), "mgmt")?;
                self.ip(&h, &["addr", "add", &format!("{}/24", Self::host_addr(s, k)), "dev", "eth0"])?;
                self.ip(&h, &["route", "add", "172.16.0.0/16", "via", &format!("{}.254", s.mgmt_net())])?;
            }
        }
        // The WAN: a veth between the routers, or with a delay, one from each router to the
        // delay line's namespace.
        let (ra, rb) = (self.ns("art"), self.ns("brt"));
        if o.wan_delay_ms == 0 {
            self.ip(
                &ra,
                &[
                    "link", "add", "wan0", "mtu", "1600", "type", "veth", "peer", "name", "wan0", "mtu", "1600",
                    "netns", &rb,
                ],
            )?;
        } else {
            self.delay_line(&ra, &rb)?;
        }
        for (s, rt) in [(Site::A, &ra), (Site::B, &rb)] {
            let other = s.other();
            self.ip(rt, &["addr", "add", &format!("192.168.100.{}/24", s.n() + 1), "dev", "wan0"])?;
            self.ip(rt, &["link", "set", "wan0", "up"])?;
            self.ip(
                rt,
                &[
                    "route",
                    "add",
                    &format!("{}.0/24", other.mgmt_net()),
                    "via",
                    &format!("192.168.100.{}", other.n() + 1),
                ],
            )?;
            // The rate, with vnetd's tunnel (UDP 7800) ahead of bulk traffic.
            self.exec(
                rt,
                &[
                    "tc",
                    "qdisc",
                    "add",
                    "dev",
                    "wan0",
                    "root",
                    "handle",
                    "1:",
                    "tbf",
                    "rate",
                    &o.wan_rate,
                    "burst",
                    "64kb",
                    "latency",
                    "50ms",
                ],
            )?;
            self.exec(
                rt,
                &["tc", "qdisc", "add", "dev", "wan0", "parent", "1:1", "handle", "10:", "htb", "default", "20"],
            )?;
            for (class, prio) in [("10:10", "0"), ("10:20", "1")] {
                let r = &o.wan_rate;
                self.exec(
                    rt,
                    &[
                        "tc", "class", "add", "dev", "wan0", "parent", "10:", "classid", class, "htb", "rate", r,
                        "ceil", r, "prio", prio, "quantum", "1514",
                    ],
                )?;
            }
            // Each class queues at most 50 ms of traffic at the link rate, like the tbf alone
            // would (a longer queue only adds delay to every migration's last round trips).
            let limit = (rate_bps(&o.wan_rate).unwrap_or(100_000_000) / 8 / 20).max(64 * 1024).to_string();
            for (class, handle) in [("10:10", "11:"), ("10:20", "12:")] {
                self.exec(
                    rt,
                    &["tc", "qdisc", "add", "dev", "wan0", "parent", class, "handle", handle, "bfifo", "limit", &limit],
                )?;
            }
            for port in ["sport", "dport"] {
                self.exec(
                    rt,
                    &[
                        "tc", "filter", "add", "dev", "wan0", "parent", "10:", "protocol", "ip", "prio", "1", "u32",
                        "match", "ip", port, "7800", "0xffff", "flowid", "10:10",
                    ],
                )?;
            }
        }
        Ok(())
    }

    /// The routers' `wan0`s, each a veth into `<n>-wan` (`wa`, `wb`), and the delay line
    /// between those (`shrink-testbed delay-line`, its log `<dir>/delay-line.log`). Checksum and
    /// segmentation offloads are off on every end, so the line handles complete frames of the
    /// link's MTU (not 64 KiB aggregates, nor TCP segments whose checksum a NIC would fill in:
    /// forwarded as they are, those would arrive corrupt); it may hold twice the link rate × the
    /// delay in each direction.
    fn delay_line(&self, ra: &str, rb: &str) -> Result<()> {
        let o = &self.state.opts;
        let wan = self.ns("wan");
        for (rt, end) in [(ra, "wa"), (rb, "wb")] {
            self.ip(
                rt,
                &[
                    "link", "add", "wan0", "mtu", "1600", "type", "veth", "peer", "name", end, "mtu", "1600", "netns",
                    &wan,
                ],
            )?;
            self.ip(&wan, &["link", "set", end, "up"])?;
            for (ns, dev) in [(rt, "wan0"), (wan.as_str(), end)] {
                self.exec(ns, &["ethtool", "-K", dev, "tx", "off", "tso", "off", "gso", "off", "gro", "off"])?;
            }
        }
        let bps = rate_bps(&o.wan_rate).unwrap_or(100_000_000);
        let limit = (2 * bps / 8 * o.wan_delay_ms / 1000).max(1 << 20).to_string();
        let delay = o.wan_delay_ms.to_string();
        let bin = self.state.bins.testbed.display().to_string();
        let args = [bin.as_str(), "delay-line", "--delay-ms", &delay, "--limit-bytes", &limit, "wa", "wb"];
        spawn_detached(self.dir(), "delay-line", &wan, &args, &self.path("delay-line.log"))?;
        Ok(())
    }

    /// The WAN's round trip between the border routers: `count` pings 10 ms apart (56-byte
    /// payloads, through the shaping and the delay line), as ping's `(min, avg, max, mdev)`, ms.
    pub fn wan_rtt(&self, count: u32) -> Result<[f64; 4]> {
        let n = count.max(1).to_string();
        let out = self.exec(&self.ns("art"), &["ping", "-q", "-n", "-i", "0.01", "-c", &n, "192.168.100.2"])?;
        parse_ping_rtt(&out).ok_or_else(|| TestbedError::Failed(format!("no round-trip times from ping: {out}")))
    }

    /// vnetd's configuration for `site`.
    pub fn vnetd_config(&self, site: Site) -> String {
        let other = site.other();
        crate::vnet::two_site_config(&crate::vnet::SiteConfig {
            name: site.router(),
            router_mac: &site.router_mac(),
            router_ip: &format!("{}.254", site.vm_net()),
            listen: &format!("{}:7800", site.gateway_addr()),
            key: "shrink-testbed-key-0123456789abcdef",
            control_socket: &self.vnetd_socket(site),
            state_file: &self.path(&format!("vnetd-{}.epoch", site.letter())),
            lndt: &format!("{}.0/24", site.vm_net()),
            peer: other.router(),
            peer_address: &format!("{}:7800", other.gateway_addr()),
        })
    }

    /// vnetd's control socket at `site`.
    pub fn vnetd_socket(&self, site: Site) -> PathBuf {
        self.path(&format!("vnetd-{}.sock", site.letter()))
    }

    /// Starts `site`'s vnetd (detached, recorded in `pids/`), logging to `log`.
    fn spawn_vnetd(&self, site: Site, log: &Path) -> Result<()> {
        let l = site.letter();
        let gw = self.ns(&format!("{l}gw"));
        let cfg = self.path(&format!("vnetd-{l}.toml"));
        io(&cfg, std::fs::write(&cfg, self.vnetd_config(site)))?;
        let pcap = self.path(&format!("vnetd-{l}.pcap"));
        let vnetd = self.state.bins.vnetd.clone();
        spawn_detached(
            self.dir(),
            &format!("vnetd-{l}"),
            &gw,
            &[
                vnetd.to_str().unwrap_or("vnetd"),
                "--config",
                cfg.to_str().unwrap_or(""),
                "--pcap-out",
                pcap.to_str().unwrap_or(""),
            ],
            log,
        )?;
        Ok(())
    }

    /// `kill -9` of `site`'s vnetd (a gateway crash), then a new vnetd there, as an operator's
    /// supervisor would start it; returns once it answers on its control socket. Its log is
    /// `vnetd-<site>.restart<n>.log`.
    pub fn crash_and_restart_vnetd(&self, site: Site, n: u32) -> Result<()> {
        let l = site.letter();
        let pf = self.path(&format!("pids/vnetd-{l}.pid"));
        let pid: u32 = std::fs::read_to_string(&pf)
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .ok_or_else(|| TestbedError::Failed(format!("no vnetd pid in {}", pf.display())))?;
        kill(pid, "-KILL");
        wait_for(&format!("vnetd at {} (pid {pid}) to die", site.name()), 10, || (!alive(pid)).then_some(()))?;
        let log = self.path(&format!("vnetd-{l}.restart{n}.log"));
        self.spawn_vnetd(site, &log)?;
        let sock = self.vnetd_socket(site);
        wait_for(&format!("the restarted vnetd at {} (log {})", site.name(), log.display()), 20, || {
            netreconf::daemon::query_status(&sock).ok()
        })
        .map_err(|e| TestbedError::Failed(format!("{e}: {}", tail(&log))))?;
        Ok(())
    }

    fn start_services(&self) -> Result<()> {
        for s in Site::ALL {
            let l = s.letter();
            let gw = self.ns(&format!("{l}gw"));
            self.spawn_vnetd(s, &self.path(&format!("vnetd-{l}.log")))?;
            for (role, port) in [("coordination", 6379), ("index", 6380)] {
                let data = self.path(&format!("redis-{l}-{role}"));
                io(&data, std::fs::create_dir_all(&data))?;
                let port = port.to_string();
                spawn_detached(
                    self.dir(),
                    &format!("redis-{l}-{role}"),
                    &gw,
                    &[
                        "redis-server",
                        "--bind",
                        &s.gateway_addr(),
                        "--port",
                        &port,
                        "--save",
                        "",
                        "--appendonly",
                        "no",
                        "--protected-mode",
                        "no",
                        "--dir",
                        data.to_str().unwrap_or("."),
                    ],
                    &self.path(&format!("redis-{l}-{role}.log")),
                )?;
            }
        }
        for s in Site::ALL {
            let l = s.letter();
            let sock = self.vnetd_socket(s);
            let log = self.path(&format!("vnetd-{l}.log"));
            wait_for(&format!("vnetd at {} (log {})", s.name(), log.display()), 20, || {
                netreconf::daemon::query_status(&sock).ok()
            })
            .map_err(|e| TestbedError::Failed(format!("{e}: {}", tail(&log))))?;
            let gw = self.ns(&format!("{l}gw"));
            for port in ["6379", "6380"] {
                wait_for(&format!("redis-server {}:{port} at {}", s.gateway_addr(), s.name()), 20, || {
                    self.exec(&gw, &["redis-cli", "-h", &s.gateway_addr(), "-p", port, "ping"])
                        .ok()
                        .filter(|o| o.contains("PONG"))
                })?;
            }
        }
        Ok(())
    }

    /// Boots the cluster at site A, spread over its hosts, waits for every guest, and writes
    /// `vc.toml`. VM `i` is `vm<i>` at 10.1.0.(10+i), MAC 52:54:00:10:00:<i>.
    pub fn boot(&mut self, spec: &BootSpec) -> Result<()> {
        if !self.state.vms.is_empty() {
            return Err(TestbedError::Failed(
                "a cluster is already booted on this testbed: `shrink-testbed down` first".into(),
            ));
        }
        if !(1..=50).contains(&spec.vms) {
            return Err(TestbedError::Failed(format!("{} VMs: 1 to 50", spec.vms)));
        }
        let b = self.state.bins.clone();
        let hosts = self.state.opts.hosts_per_site;
        self.state.plain_tcp = spec.plain_tcp;
        let key = self.cluster_key()?.display().to_string();
        let transport: Vec<&str> = if spec.plain_tcp { vec!["--plain-tcp"] } else { vec!["--cluster-key", &key] };
        let cpus = spec.cpus.to_string();
        for i in 1..=spec.vms {
            let vm = VmInfo::nth(i);
            let ns = self.host_ns(Site::A, (i - 1) % hosts + 1);
            let cmdline = vm.cmdline(spec);
            let p = |ext: &str| self.path(&format!("{}.{ext}", vm.name)).display().to_string();
            let net = format!("tap={},mac={},bridge=br0", vm.name, vm.mac);
            let repo = self.repository(Site::A).display().to_string();
            let disk = self.storage(Site::A).join(format!("{}.qcow2", vm.name)).display().to_string();
            let args = [
                b.vmm.to_str().unwrap_or(""),
                "--kernel",
                b.guest.to_str().unwrap_or(""),
                "--mem",
                &spec.mem,
                "--cpus",
                &cpus,
                "--cmdline",
                &cmdline,
                "--name",
                &vm.name,
                "--image",
                &repo,
                "--disk",
                &disk,
                "--net",
                &net,
                "--api",
                &p("sock"),
                "--serial",
                &p("serial"),
            ];
            let args: Vec<&str> = args.iter().copied().chain(transport.iter().copied()).collect();
            let args = self.isolated(Site::A, &args);
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            spawn_detached(self.dir(), &vm.name, &ns, &args, &self.path(&format!("{}.log", vm.name)))?;
            self.state.vms.push(vm);
        }
        self.save()?;
        for vm in &self.state.vms {
            let serial = self.path(&format!("{}.serial", vm.name));
            let log = self.path(&format!("{}.log", vm.name));
            wait_for(&format!("{} to boot (serial {})", vm.name, serial.display()), 120, || {
                let t = std::fs::read_to_string(&serial).unwrap_or_default();
                t.contains("heartbeat 1\n").then_some(())
            })
            .map_err(|e| TestbedError::Failed(format!("{e}; its VMM says: {}", tail(&log))))?;
        }
        self.write_vc()
    }

    /// Takes `vms`, started by other means on this testbed (QEMU's, see
    /// [`crate::eval::qemu_live`]), as its cluster: the probes, [`Testbed::network_report`] and
    /// [`down`] then cover them.
    pub fn adopt(&mut self, vms: Vec<VmInfo>) -> Result<()> {
        if !self.state.vms.is_empty() {
            return Err(TestbedError::Failed("a cluster is already booted on this testbed".into()));
        }
        self.state.vms = vms;
        self.save()
    }

    /// The testbed's cluster key, `<dir>/cluster.key`, made when missing: every VMM of both
    /// sites reads it (it is outside both sites' storage).
    pub fn cluster_key(&self) -> Result<PathBuf> {
        let p = self.path("cluster.key");
        if !p.exists() {
            indexd::tls::ClusterKey::generate()
                .and_then(|k| k.write_new(&p))
                .map_err(|e| TestbedError::Failed(e.to_string()))?;
        }
        Ok(p)
    }

    /// The cluster description.
    pub fn vc_path(&self) -> PathBuf {
        self.path("vc.toml")
    }

    fn write_vc(&self) -> Result<()> {
        let b = &self.state.bins;
        let mut t = format!(
            "# The testbed's virtual cluster (written by `shrink-testbed boot`; `shrink-migrate` keeps\n\
             # each VM's host and api up to date as it moves). No migration_id: every run gets its own.\n\
             vmm = {}\nworkdir = {}\n{}\n\n",
            toml_str(&b.vmm.display().to_string()),
            toml_str(&self.dir().display().to_string()),
            if self.state.plain_tcp {
                "# Clear text between the hosts (booted with --plain-tcp).\nplain_tcp = true".to_owned()
            } else {
                format!(
                    "# TLS between the hosts, on this key (the same path on every host).\ncluster_key = {}",
                    toml_str(&self.path("cluster.key").display().to_string())
                )
            }
        );
        for s in Site::ALL {
            t += &format!(
                "[[sites]]\nname = \"{}\"\ncoordination = \"{}\"\nindex = \"{}\"\n\
                 # Run on a host of the site, in its network namespace, with the other site's storage hidden.\n\
                 launch = {}\ngateway = \"{}\"\n\
                 # The site's own storage: its copy of the base image (indexed in its index Redis), and\n\
                 # the directory of the disks (overlays) of the VMs its hosts run.\n\
                 repository = {}\nstorage = {}\n\n",
                s.name(),
                s.coordination(),
                s.index(),
                toml_str(&self.launch_template(s)),
                self.ns(&format!("{}gw", s.letter())),
                toml_str(&self.repository(s).display().to_string()),
                toml_str(&self.storage(s).display().to_string()),
            );
            for k in 1..=self.state.opts.hosts_per_site {
                t += &format!(
                    "[[sites.hosts]]\nname = \"{}\"\naddress = \"{}\"\n\n",
                    self.host_ns(s, k),
                    Self::host_addr(s, k)
                );
            }
        }
        for (i, vm) in self.state.vms.iter().enumerate() {
            t += &format!(
                "[[vms]]\nname = \"{}\"   # {} {}\nhost = \"{}\"\napi = \"{}\"\n\n",
                vm.name,
                vm.ip,
                vm.mac,
                self.host_ns(Site::A, i % self.state.opts.hosts_per_site + 1),
                self.path(&format!("{}.sock", vm.name)).display()
            );
        }
        let p = self.vc_path();
        io(&p, std::fs::write(&p, t))
    }

    /// Where every VM runs now, from `vc.toml`: (VM, site, host namespace, API socket).
    pub fn locations(&self) -> Result<Vec<(VmInfo, Site, String, PathBuf)>> {
        let p = self.vc_path();
        let text = io(&p, std::fs::read_to_string(&p))?;
        let c = migrate::cluster::Cluster::parse(&p.display().to_string(), &text)
            .map_err(|e| TestbedError::Failed(e.to_string()))?;
        let mut out = Vec::new();
        for vm in &self.state.vms {
            let v = c
                .file
                .vms
                .iter()
                .find(|v| v.name.get_ref() == &vm.name)
                .ok_or_else(|| TestbedError::Failed(format!("{}: {} is not in it", p.display(), vm.name)))?;
            let host = v.host.get_ref().clone();
            let site = if host.starts_with(&self.ns("b")) { Site::B } else { Site::A };
            out.push((vm.clone(), site, host, PathBuf::from(v.api.get_ref())));
        }
        Ok(out)
    }

    /// The serial console of the VMM that runs `vm` now.
    pub fn serial_of(api: &Path) -> PathBuf {
        api.with_extension("serial")
    }

    /// Starts UDP probes from the client of each site to every VM's echo port, every
    /// `interval_ms`, and waits until both probe (their `probe: ` line in `probe-<site>.log`).
    /// Stop them with [`Testbed::stop_probes`].
    pub fn start_probes(&self, interval_ms: u64) -> Result<()> {
        let stop = self.path("probe.stop");
        let _ = std::fs::remove_file(&stop);
        for s in Site::ALL {
            let l = s.letter();
            let out = self.path(&format!("probe-{l}.json"));
            let _ = std::fs::remove_file(&out);
            let iv = interval_ms.to_string();
            let mut args: Vec<String> = vec![
                self.state.bins.probe.display().to_string(),
                "probe".into(),
                "--interval-ms".into(),
                iv,
                "--stop-file".into(),
                stop.display().to_string(),
                "--out".into(),
                out.display().to_string(),
            ];
            for vm in &self.state.vms {
                args.push("--target".into());
                args.push(format!("{}={}:7", vm.name, vm.ip));
            }
            let a: Vec<&str> = args.iter().map(String::as_str).collect();
            spawn_detached(
                self.dir(),
                &format!("probe-{l}"),
                &self.ns(&format!("{l}cl")),
                &a,
                &self.path(&format!("probe-{l}.log")),
            )?;
        }
        for s in Site::ALL {
            let log = self.path(&format!("probe-{}.log", s.letter()));
            wait_for(&format!("the probe at {} starting ({})", s.name(), log.display()), 30, || {
                std::fs::read_to_string(&log).unwrap_or_default().contains("probe: ").then_some(())
            })
            .map_err(|e| TestbedError::Failed(format!("{e}: {}", tail(&log))))?;
        }
        Ok(())
    }

    /// Stops the probes; their reports, site A's client first.
    pub fn stop_probes(&self) -> Result<[Value; 2]> {
        let stop = self.path("probe.stop");
        io(&stop, std::fs::write(&stop, b""))?;
        let mut out = Vec::new();
        for s in Site::ALL {
            let p = self.path(&format!("probe-{}.json", s.letter()));
            let log = self.path(&format!("probe-{}.log", s.letter()));
            let text = wait_for(&format!("the probe report {}", p.display()), 10, || std::fs::read_to_string(&p).ok())
                .map_err(|e| TestbedError::Failed(format!("{e}: {}", tail(&log))))?;
            out.push(serde_json::from_str(&text).map_err(|e| TestbedError::Failed(format!("{}: {e}", p.display())))?);
        }
        let _ = std::fs::remove_file(&stop);
        let b = out.pop().unwrap_or_default();
        let a = out.pop().unwrap_or_default();
        Ok([a, b])
    }

    /// Runs `shrink-migrate --cluster vc.toml --dest <site>` with `extra` arguments; its
    /// progress bars go to this process's terminal when `show` is set. Returns the JSON report
    /// (also saved as `report-<tag>.json`) and the exit status.
    pub fn migrate(&self, dest: Site, extra: &[&str], tag: &str, show: bool) -> Result<(bool, Value)> {
        let report = self.path(&format!("report-{tag}.json"));
        let _ = std::fs::remove_file(&report);
        let log = self.path(&format!("migrate-{tag}.log"));
        let mut cmd = Command::new(&self.state.bins.migrate);
        cmd.args([
            "--cluster",
            self.vc_path().to_str().unwrap_or(""),
            "--dest",
            dest.name(),
            "--report",
            report.to_str().unwrap_or(""),
        ]);
        cmd.args(extra).stdin(Stdio::null());
        if show {
            cmd.stdout(Stdio::inherit()).stderr(Stdio::inherit());
        } else {
            let f = io(&log, std::fs::File::create(&log))?;
            cmd.stdout(io(&log, f.try_clone())?).stderr(f);
        }
        let mut child = cmd
            .spawn()
            .map_err(|e| TestbedError::Failed(format!("cannot run {}: {e}", self.state.bins.migrate.display())))?;
        let pids = self.path("pids");
        let pf = pids.join(format!("migrate-{tag}.pid"));
        io(&pf, std::fs::write(&pf, child.id().to_string()))?;
        let status = child.wait().map_err(|e| TestbedError::Failed(format!("shrink-migrate: {e}")))?;
        let _ = std::fs::remove_file(&pf);
        let text = std::fs::read_to_string(&report).map_err(|_| {
            TestbedError::Failed(format!(
                "shrink-migrate wrote no report ({status}): {}",
                if show { String::new() } else { tail(&log) }
            ))
        })?;
        let v = serde_json::from_str(&text).map_err(|e| TestbedError::Failed(format!("{}: {e}", report.display())))?;
        Ok((status.success(), v))
    }

    /// vnetd's status at `site`.
    pub fn vnetd_status(&self, site: Site) -> Result<Value> {
        netreconf::daemon::query_status(&self.vnetd_socket(site))
            .map_err(|e| TestbedError::Failed(format!("vnetd at {}: {e}", site.name())))
    }

    /// The /32 routes vnetd at `site` holds: (prefix, router, seq).
    pub fn host_routes(&self, site: Site) -> Result<Vec<(String, String, u64)>> {
        let st = self.vnetd_status(site)?;
        let mut out: Vec<(String, String, u64)> = st["gndt"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|r| r["prefix"].as_str().is_some_and(|p| p.ends_with("/32")))
            .map(|r| {
                (
                    r["prefix"].as_str().unwrap_or("").to_owned(),
                    r["router"].as_str().unwrap_or("").to_owned(),
                    r["seq"].as_u64().unwrap_or(0),
                )
            })
            .collect();
        out.sort();
        Ok(out)
    }

    /// Bytes sent into the WAN by each site's border router so far (A→B, B→A).
    pub fn wan_bytes(&self) -> Result<(u64, u64)> {
        let mut v = [0u64; 2];
        for (i, s) in Site::ALL.iter().enumerate() {
            let out =
                self.exec(&self.ns(&format!("{}rt", s.letter())), &["cat", "/sys/class/net/wan0/statistics/tx_bytes"])?;
            v[i] = out.trim().parse().unwrap_or(0);
        }
        Ok((v[0], v[1]))
    }

    /// Starts `args` in namespace `ns`, detached, output to `<dir>/<tag>.log`; [`down`] stops it.
    /// On a compute host it runs isolated from the other site's storage ([`Testbed::isolated`]).
    pub fn spawn(&self, tag: &str, ns: &str, args: &[&str]) -> Result<Child> {
        let log = self.path(&format!("{tag}.log"));
        match self.host_site(ns) {
            Some(site) => {
                let args = self.isolated(site, args);
                let args: Vec<&str> = args.iter().map(String::as_str).collect();
                spawn_detached(self.dir(), tag, ns, &args, &log)
            }
            None => spawn_detached(self.dir(), tag, ns, args, &log),
        }
    }

    /// What the network saw of each VM's move to `dest`: its downtime (from the migration
    /// report), what the clients of both sites lost and their longest gaps (from
    /// [`Testbed::stop_probes`]), and vnetd's timings at `dest` from the VM's first RARP frame:
    /// its IP known (detection), every router holding its /32 (reconfiguration), the first
    /// gratuitous or directed ARP out.
    pub fn network_report(&self, dest: Site, report: &Value, probes: &[Value; 2]) -> Vec<Value> {
        let st = self.vnetd_status(dest).unwrap_or_default();
        let recs: Vec<&Value> = st["migrations"]
            .as_array()
            .map(|a| a.iter().filter(|r| r["role"] == "destination").collect())
            .unwrap_or_default();
        let target = |p: &Value, vm: &str| {
            p["targets"].as_array().and_then(|a| a.iter().find(|t| t["name"] == vm)).cloned().unwrap_or_default()
        };
        self.state
            .vms
            .iter()
            .map(|vm| {
                let v = report["vms"].as_array().and_then(|a| a.iter().find(|v| v["vm"] == vm.name.as_str())).cloned().unwrap_or_default();
                // The latest move of this VM to `dest` (none if it did not move this time).
                let rec = recs
                    .iter()
                    .filter(|r| r["ip"] == vm.ip.as_str() && v["status"] == "completed")
                    .max_by_key(|r| r["seq"].as_u64().unwrap_or(0));
                let since = |k: &str| {
                    rec.and_then(|r| Some(r[k].as_u64()?.saturating_sub(r["detected_us"].as_u64()?) as f64 / 1000.0))
                };
                let (a, b) = (target(&probes[0], &vm.name), target(&probes[1], &vm.name));
                serde_json::json!({
                    "vm": vm.name, "status": v["status"], "downtime_ms": v["downtime_ms"],
                    "detected": rec.is_some(), "trigger": rec.map(|r| r["trigger"].clone()),
                    "detection_ms": since("resolved_us"), "reconfiguration_ms": since("all_acked_us"), "first_announce_ms": since("first_announce_us"),
                    "lost_a": a["lost"], "lost_b": b["lost"], "gap_a_ms": a["max_gap_ms"], "gap_b_ms": b["max_gap_ms"],
                    "answers_a_now": format!("{}/{}", a["tail_received"], a["tail_sent"]), "answers_b_now": format!("{}/{}", b["tail_received"], b["tail_sent"]),
                    "answering": a["tail_received"].as_u64().unwrap_or(0) > 0 && b["tail_received"].as_u64().unwrap_or(0) > 0,
                })
            })
            .collect()
    }

    /// Pauses every VM, writes a snapshot of each to `<dir>/snap-<vm>/` and resumes it; the
    /// memory images, in VM order.
    pub fn memory_images(&self) -> Result<Vec<PathBuf>> {
        let mut out = Vec::new();
        for (vm, _, _, api) in self.locations()? {
            let snap = self.path(&format!("snap-{}", vm.name));
            let _ = std::fs::remove_dir_all(&snap);
            let mut c = migrate::client::ApiClient::connect(&api)
                .map_err(|e| TestbedError::Failed(format!("{}: {e}", vm.name)))?;
            let mut call = |cmd: &str, args: Value| -> Result<()> {
                c.execute(cmd, args)
                    .map_err(|e| TestbedError::Failed(format!("{}: {cmd}: {e}", vm.name)))?
                    .map(|_| ())
                    .map_err(|e| TestbedError::Failed(format!("{}: {cmd}: {e}", vm.name)))
            };
            call("pause", serde_json::json!({}))?;
            let taken = call("snapshot", serde_json::json!({"path": snap}));
            // Resumed whatever the snapshot did.
            call("resume", serde_json::json!({}))?;
            taken?;
            out.push(snap.join("memory.img"));
        }
        Ok(out)
    }

    /// The last heartbeat number on a serial console.
    pub fn heartbeat(serial: &Path) -> Option<u64> {
        shrink_testutil::util::last_heartbeat(&std::fs::read_to_string(serial).unwrap_or_default())
    }

    /// A summary for `shrink-testbed status`.
    pub fn status(&self) -> Value {
        let mut procs = Vec::new();
        for e in std::fs::read_dir(self.path("pids")).into_iter().flatten().flatten() {
            let tag = e.file_name().to_string_lossy().trim_end_matches(".pid").to_owned();
            let pid = std::fs::read_to_string(e.path()).ok().and_then(|s| s.trim().parse::<u32>().ok()).unwrap_or(0);
            procs.push(serde_json::json!({"process": tag, "pid": pid, "running": alive(pid)}));
        }
        let vms: Vec<Value> = self
            .locations()
            .unwrap_or_default()
            .into_iter()
            .map(|(vm, site, host, api)| {
                serde_json::json!({"vm": vm.name, "ip": vm.ip, "mac": vm.mac, "site": site.name(), "host": host,
                    "api": api, "running": migrate::client::ApiClient::connect(&api).is_ok(), "heartbeat": Self::heartbeat(&Self::serial_of(&api))})
            })
            .collect();
        let routes: Vec<Value> = Site::ALL
            .iter()
            .map(|&s| serde_json::json!({"site": s.name(), "host_routes": self.host_routes(s).map(|r| serde_json::json!(r)).unwrap_or_else(|e| serde_json::json!(e.to_string()))}))
            .collect();
        let (ab, ba) = self.wan_bytes().unwrap_or((0, 0));
        serde_json::json!({
            "name": self.state.opts.name, "dir": self.dir(), "wan_rate": self.state.opts.wan_rate,
            "namespaces": namespaces(&self.state.opts.name), "processes": procs, "vms": vms,
            "vnetd": routes, "wan_bytes": {"a_to_b": ab, "b_to_a": ba}, "vc_toml": self.vc_path(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ping_round_trips_are_read_from_its_summary() {
        let out = "--- 192.168.100.2 ping statistics ---\n200 packets transmitted, 200 received, 0% packet loss, time 2400ms\nrtt min/avg/max/mdev = 100.051/100.210/101.377/0.141 ms\n";
        assert_eq!(parse_ping_rtt(out), Some([100.051, 100.210, 101.377, 0.141]));
        assert_eq!(parse_ping_rtt("100% packet loss"), None);
    }

    #[test]
    fn wan_rates_parse_like_tc_and_bad_ones_are_refused() {
        assert_eq!(rate_bps("100mbit"), Some(100_000_000));
        assert_eq!(rate_bps("1gbit"), Some(1_000_000_000));
        assert_eq!(rate_bps("2.5Gbit"), Some(2_500_000_000));
        assert_eq!(rate_bps("500kbit"), Some(500_000));
        for bad in ["100", "fast", "100mbps", "mbit", "10kbit"] {
            assert_eq!(rate_bps(bad), None, "{bad}");
        }
    }

    #[test]
    fn sites_have_the_documented_addresses() {
        assert_eq!((Site::A.vm_net(), Site::B.vm_net()), ("10.1.0".to_owned(), "10.1.1".to_owned()));
        assert_eq!(Site::B.coordination(), "redis://172.16.2.253:6379");
        assert_eq!(Site::A.index(), "redis://172.16.1.253:6380");
        assert_eq!(Testbed::host_addr(Site::B, 2), "172.16.2.12");
    }

    fn fake(dir: &str) -> Testbed {
        let p = |f: &str| PathBuf::from(format!("/opt/shrink/{f}"));
        let bins = Bins {
            vmm: p("shrink-vmm"),
            migrate: p("shrink-migrate"),
            vnetd: p("vnetd"),
            probe: p("vnet-probe"),
            guest: p("shrink-guest"),
            base: p("base.qcow2"),
            repo: p("shrink-repo"),
            testbed: p("shrink-testbed"),
        };
        let opts = Options { dir: dir.into(), ..Options::new("t") };
        Testbed { state: State { opts, bins, vms: Vec::new(), plain_tcp: false } }
    }

    #[test]
    fn each_site_has_its_storage_and_its_hosts_run_without_the_other_sites() {
        let tb = fake("/tmp/tb");
        assert_eq!(tb.repository(Site::A), Path::new("/tmp/tb/siteA/repo/base.qcow2"));
        assert_eq!(tb.storage(Site::B), Path::new("/tmp/tb/siteB/disks"));
        assert_eq!((tb.host_site("t-ah2"), tb.host_site("t-bh1")), (Some(Site::A), Some(Site::B)));
        assert_eq!((tb.host_site("t-agw"), tb.host_site("t-ah3")), (None, None));
        let cmd = vec!["/opt/shrink/shrink-vmm".to_owned(), "--name".into(), "vm 1".into()];
        assert_eq!(
            migrate::cluster::launch_argv(&tb.launch_template(Site::B), "t-bh1", &cmd),
            [
                "ip",
                "netns",
                "exec",
                "t-bh1",
                "/opt/shrink/shrink-testbed",
                "isolate",
                "--hide",
                "/tmp/tb/siteA",
                "--",
                "/opt/shrink/shrink-vmm",
                "--name",
                "vm 1"
            ]
        );
        assert_eq!(
            tb.isolated(Site::A, &["x"]),
            ["/opt/shrink/shrink-testbed", "isolate", "--hide", "/tmp/tb/siteB", "--", "x"]
        );
        assert_eq!(toml_str("a\"b\\c"), r#""a\"b\\c""#);
    }
}
