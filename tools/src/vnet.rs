//! vnetd's two-site testbed in network namespaces, shared by its integration tests
//! (`tests/tests/vnet_two_sites.rs`) and `vnetd-bench`, with the UDP streams both run across
//! a move. Needs root, iproute2 (`ip`, `ss`) and ethtool; everything is removed on drop, even
//! when a test panics.
//!
//! ```text
//!   <p>-a1 (10.1.0.1/16)   <p>-vm (10.1.0.10/16)          <p>-b1 (10.1.1.1/16)
//!        eth0                   eth0                            eth0
//!         |                      |  (moved between bridges)       |
//!   [<p>-swa: bridge brA  pa1 pvm pra]                 [<p>-swb: bridge brB  pb1 (pvm) prb]
//!                                  |                                     |
//!                     <p>-ra: lan0 (vnetd A)  wan0 ===== wan0  <p>-rb: lan0 (vnetd B)
//!                                192.168.100.1/24      192.168.100.2/24
//! ```
//! Site A serves 10.1.0.0/24 (gateway 10.1.0.254), site B 10.1.1.0/24 (10.1.1.254);
//! hosts use the whole 10.1.0.0/16 as their subnet (routing optimisation, §5.5.4).

use netreconf::frames::Mac;
use serde_json::Value;
use shrink_testutil::netns;
pub use shrink_testutil::netns::{nsrun, run, NetnsError};
pub use shrink_testutil::process::{Proc, ProcessError};
pub use shrink_testutil::util::{wait_for, WaitTimeout};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

/// Errors of this module.
#[derive(Debug, thiserror::Error)]
pub enum TestbedError {
    /// Not root.
    #[error("the vnetd testbed needs root (network namespaces); run the tests as root")]
    NotRoot,
    /// A tool is missing (the tool, its Debian package).
    #[error("`{0}` not found: install it (apt-get install {1})")]
    MissingTool(&'static str, &'static str),
    /// A command failed.
    #[error("command failed: {cmd}: {stderr}")]
    Command {
        /// The command.
        cmd: String,
        /// What it said.
        stderr: String,
    },
    /// A namespace command failed.
    #[error(transparent)]
    Netns(#[from] NetnsError),
    /// A process could not be run or waited for.
    #[error(transparent)]
    Process(#[from] ProcessError),
    /// Files.
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    /// Something did not happen in time.
    #[error(transparent)]
    Timeout(#[from] WaitTimeout),
    /// Something else went wrong (what, and what was seen).
    #[error("{0}")]
    Failed(String),
}

/// Result alias.
pub type Result<T> = std::result::Result<T, TestbedError>;

/// MAC of host A1.
pub const A1_MAC: Mac = Mac([0x02, 0x00, 0x0a, 0x01, 0x00, 0x01]);
/// MAC of host B1.
pub const B1_MAC: Mac = Mac([0x02, 0x00, 0x0a, 0x01, 0x01, 0x01]);
/// MAC of the VM (QEMU's default OUI).
pub const VM_MAC: Mac = Mac([0x52, 0x54, 0x00, 0x12, 0x34, 0x56]);
/// MAC of router A on LAN A.
pub const RA_MAC: Mac = Mac([0x02, 0x00, 0x0a, 0x01, 0x00, 0xfe]);
/// MAC of router B on LAN B.
pub const RB_MAC: Mac = Mac([0x02, 0x00, 0x0a, 0x01, 0x01, 0xfe]);
/// A1's address.
pub const A1_IP: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 1);
/// B1's address.
pub const B1_IP: Ipv4Addr = Ipv4Addr::new(10, 1, 1, 1);
/// The VM's address (site A's network).
pub const VM_IP: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 10);
/// MAC of the second VM ("vm2", a VM of site B).
pub const VM2_MAC: Mac = Mac([0x52, 0x54, 0x00, 0x12, 0x34, 0x57]);
/// IP of the second VM.
pub const VM2_IP: Ipv4Addr = Ipv4Addr::new(10, 1, 1, 10);
/// Overlay address of router A.
pub const RA_WAN: &str = "192.168.100.1:7800";
/// Overlay address of router B.
pub const RB_WAN: &str = "192.168.100.2:7800";
/// The shared key used by the testbed.
pub const KEY: &str = "testbed-shared-key-0123456789abcdef";

/// Check that the testbed can run: root and `ip` (as [`netns::available`] checks), `ethtool`.
pub fn preflight() -> Result<()> {
    netns::available().map_err(|e| match e {
        NetnsError::NotRoot => TestbedError::NotRoot,
        _ => TestbedError::MissingTool("ip", "iproute2"),
    })?;
    let tool = "ethtool";
    let found =
        std::env::var_os("PATH").map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file())).unwrap_or(false)
            || Path::new("/usr/sbin").join(tool).is_file()
            || Path::new("/sbin").join(tool).is_file();
    if !found {
        return Err(TestbedError::MissingTool(tool, "ethtool"));
    }
    Ok(())
}

/// One router of the project's two-site world (site A 10.1.0.0/24 behind router "A", site B
/// 10.1.1.0/24 behind router "B").
pub struct SiteConfig<'a> {
    /// This router's name ("A" or "B").
    pub name: &'a str,
    /// Its MAC on the LAN.
    pub router_mac: &'a str,
    /// The gateway address it answers for.
    pub router_ip: &'a str,
    /// Overlay address, `IP:PORT`.
    pub listen: &'a str,
    /// The shared key.
    pub key: &'a str,
    /// Control socket.
    pub control_socket: &'a Path,
    /// Where vnetd records its boot's epoch.
    pub state_file: &'a Path,
    /// Its LAN's prefix.
    pub lndt: &'a str,
    /// The other router's name.
    pub peer: &'a str,
    /// The other router's overlay address.
    pub peer_address: &'a str,
}

/// vnetd's configuration file for a router of the two-site world.
pub fn two_site_config(c: &SiteConfig) -> String {
    format!(
        r#"site = "{name}"
lan_interface = "lan0"
router_mac = "{mac}"
router_ip = "{ip}"
listen = "{listen}"
key = "{key}"
control_socket = "{sock}"
state_file = "{state}"
lndt = ["{lndt}"]

[[peers]]
name = "{peer}"
address = "{peer_addr}"

[[gndt]]
network = "10.1.0.0/24"
router = "A"

[[gndt]]
network = "10.1.1.0/24"
router = "B"
"#,
        name = c.name,
        mac = c.router_mac,
        ip = c.router_ip,
        listen = c.listen,
        key = c.key,
        sock = c.control_socket.display(),
        state = c.state_file.display(),
        lndt = c.lndt,
        peer = c.peer,
        peer_addr = c.peer_address,
    )
}

/// Which site.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Site {
    /// Site A (10.1.0.0/24).
    A,
    /// Site B (10.1.1.0/24).
    B,
}

/// The two-site world.
pub struct TwoSites {
    /// The prefix of its namespaces' names.
    pub prefix: String,
    /// Its configuration files, captures and logs.
    pub dir: PathBuf,
    namespaces: Vec<String>,
    /// The two routers' vnetd processes, once started.
    pub vnetd: Vec<Proc>,
    /// Where the VM is now.
    pub vm_site: Site,
    /// TOML appended to both routers' configuration (e.g. a `[probe]` table).
    pub extra_config: String,
    /// vnetd starts per site (names the logs of restarts).
    starts: [u32; 2],
    keep_dir: bool,
}

impl TwoSites {
    /// Namespace name of a role ("a1", "b1", "vm", "ra", "rb", "swa", "swb").
    pub fn ns(&self, role: &str) -> String {
        format!("{}-{}", self.prefix, role)
    }

    /// Build the topology. `tag` must be unique among concurrently running tests.
    pub fn build(tag: &str) -> Result<TwoSites> {
        preflight()?;
        let prefix = format!("vn{}{}", std::process::id(), tag);
        let dir = std::env::temp_dir().join(&prefix);
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        let mut tb = TwoSites {
            prefix,
            dir,
            namespaces: Vec::new(),
            vnetd: Vec::new(),
            vm_site: Site::A,
            extra_config: String::new(),
            starts: [0; 2],
            keep_dir: std::env::var_os("VNETD_KEEP").is_some(),
        };
        tb.setup()?;
        Ok(tb)
    }

    fn setup(&mut self) -> Result<()> {
        for role in ["swa", "swb", "ra", "rb", "a1", "b1", "vm", "vm2"] {
            let ns = self.ns(role);
            run(&["ip", "netns", "add", &ns])?;
            self.namespaces.push(ns.clone());
            run(&["ip", "-n", &ns, "link", "set", "lo", "up"])?;
            nsrun(&ns, &["sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1"])?;
            nsrun(&ns, &["sysctl", "-qw", "net.ipv6.conf.default.disable_ipv6=1"])?;
        }
        for (sw, br) in [("swa", "brA"), ("swb", "brB")] {
            let ns = self.ns(sw);
            run(&["ip", "-n", &ns, "link", "add", br, "type", "bridge", "stp_state", "0"])?;
            run(&["ip", "-n", &ns, "link", "set", br, "up"])?;
        }
        // Hosts and VM.
        let hosts = [
            ("a1", "pa1", "swa", "brA", A1_MAC, "10.1.0.1/16"),
            ("vm", "pvm", "swa", "brA", VM_MAC, "10.1.0.10/16"),
            ("b1", "pb1", "swb", "brB", B1_MAC, "10.1.1.1/16"),
            ("vm2", "pvm2", "swb", "brB", VM2_MAC, "10.1.1.10/16"),
        ];
        for (role, port, sw, br, mac, addr) in hosts {
            self.attach(role, "eth0", &mac.to_string(), port, sw, br)?;
            let ns = self.ns(role);
            run(&["ip", "-n", &ns, "addr", "add", addr, "dev", "eth0"])?;
        }
        // A migrated VM keeps its ARP cache: moving the link must not flush it.
        for vm in ["vm", "vm2"] {
            let _ = nsrun(&self.ns(vm), &["sysctl", "-qw", "net.ipv4.conf.eth0.arp_evict_nocarrier=0"]);
        }
        // Routers.
        for (role, port, sw, br, mac) in [("ra", "pra", "swa", "brA", RA_MAC), ("rb", "prb", "swb", "brB", RB_MAC)] {
            self.attach(role, "lan0", &mac.to_string(), port, sw, br)?;
            let ns = self.ns(role);
            // The kernel of the gateway must not route what vnetd routes.
            nsrun(&ns, &["sysctl", "-qw", "net.ipv4.ip_forward=0"])?;
            // The bridge port feeding vnetd segments and checksums what it hands over
            // (veth otherwise passes GSO super-packets with unfinished checksums).
            nsrun(&self.ns(sw), &["ethtool", "-K", port, "tx", "off", "tso", "off", "gso", "off", "sg", "off"])?;
        }
        let (ra, rb) = (self.ns("ra"), self.ns("rb"));
        run(&[
            "ip", "-n", &ra, "link", "add", "wan0", "mtu", "1600", "type", "veth", "peer", "name", "wan0", "netns",
            &rb, "mtu", "1600",
        ])?;
        run(&["ip", "-n", &ra, "addr", "add", "192.168.100.1/24", "dev", "wan0"])?;
        run(&["ip", "-n", &rb, "addr", "add", "192.168.100.2/24", "dev", "wan0"])?;
        run(&["ip", "-n", &ra, "link", "set", "wan0", "up"])?;
        run(&["ip", "-n", &rb, "link", "set", "wan0", "up"])?;
        Ok(())
    }

    /// veth `ifname` in `role` (with `mac`), peer `port` enslaved to `br` in `sw`.
    fn attach(&self, role: &str, ifname: &str, mac: &str, port: &str, sw: &str, br: &str) -> Result<()> {
        let (ns, swns) = (self.ns(role), self.ns(sw));
        run(&[
            "ip", "-n", &ns, "link", "add", ifname, "address", mac, "type", "veth", "peer", "name", port, "netns",
            &swns,
        ])?;
        run(&["ip", "-n", &swns, "link", "set", port, "master", br, "up"])?;
        run(&["ip", "-n", &ns, "link", "set", ifname, "up"])?;
        Ok(())
    }

    /// The vnetd configuration of a site.
    pub fn config_text(&self, site: Site) -> String {
        let (name, mac, ip, listen, peer, peer_addr, lndt, sock) = match site {
            Site::A => ("A", RA_MAC, "10.1.0.254", RA_WAN, "B", RB_WAN, "10.1.0.0/24", "a.sock"),
            Site::B => ("B", RB_MAC, "10.1.1.254", RB_WAN, "A", RA_WAN, "10.1.1.0/24", "b.sock"),
        };
        let mut text = two_site_config(&SiteConfig {
            name,
            router_mac: &mac.to_string(),
            router_ip: ip,
            listen,
            key: KEY,
            control_socket: &self.dir.join(sock),
            state_file: &self.dir.join(format!("{name}.epoch")),
            lndt,
            peer,
            peer_address: peer_addr,
        });
        text.push_str(&self.extra_config);
        text
    }

    /// Control socket of a site's vnetd.
    pub fn socket(&self, site: Site) -> PathBuf {
        self.dir.join(match site {
            Site::A => "a.sock",
            Site::B => "b.sock",
        })
    }

    /// pcap-out file of a site's vnetd.
    pub fn pcap(&self, site: Site) -> PathBuf {
        self.dir.join(match site {
            Site::A => "a.pcap",
            Site::B => "b.pcap",
        })
    }

    /// Start vnetd on both routers and wait for their control sockets.
    pub fn start_vnetd(&mut self, vnetd: &Path) -> Result<()> {
        for site in [Site::A, Site::B] {
            let p = self.spawn_vnetd(vnetd, site)?;
            self.vnetd.push(p);
        }
        for site in [Site::A, Site::B] {
            self.wait_vnetd(site)?;
        }
        Ok(())
    }

    fn index(site: Site) -> usize {
        match site {
            Site::A => 0,
            Site::B => 1,
        }
    }

    /// Spawns `site`'s vnetd (config written afresh, `--pcap-out` appended to); its log is
    /// `vnetd-ra.log`, then `vnetd-ra.2.log`, … for restarts.
    fn spawn_vnetd(&mut self, vnetd: &Path, site: Site) -> Result<Proc> {
        let (role, cfg) = match site {
            Site::A => ("ra", "a.toml"),
            Site::B => ("rb", "b.toml"),
        };
        let cfgp = self.dir.join(cfg);
        std::fs::write(&cfgp, self.config_text(site))?;
        let n = &mut self.starts[Self::index(site)];
        *n += 1;
        let log = if *n == 1 { format!("vnetd-{role}.log") } else { format!("vnetd-{role}.{n}.log") };
        Ok(Proc::spawn(
            &format!("vnetd-{role}"),
            &self.ns(role),
            &[
                vnetd.to_str().unwrap_or("vnetd"),
                "--config",
                cfgp.to_str().unwrap_or(""),
                "--pcap-out",
                self.pcap(site).to_str().unwrap_or(""),
            ],
            self.dir.join(log),
        )?)
    }

    /// Waits until `site`'s vnetd answers on its control socket.
    pub fn wait_vnetd(&mut self, site: Site) -> Result<()> {
        let sock = self.socket(site);
        let procs = &mut self.vnetd;
        wait_for(&format!("vnetd {site:?} control socket"), 20, || {
            for p in procs.iter_mut() {
                if !p.alive() {
                    return Some(Err(TestbedError::Command {
                        cmd: p.name.clone(),
                        stderr: format!("exited early: {}", p.log_text()),
                    }));
                }
            }
            if netreconf::daemon::query_status(&sock).is_ok() {
                Some(Ok(()))
            } else {
                None
            }
        })?
    }

    /// `kill -9` of `site`'s vnetd (its control socket file stays behind, as after a crash).
    pub fn kill_vnetd(&mut self, site: Site) {
        self.vnetd[Self::index(site)].stop();
    }

    /// Starts `site`'s vnetd again after [`TwoSites::kill_vnetd`] (without waiting for it).
    pub fn restart_vnetd(&mut self, vnetd: &Path, site: Site) -> Result<()> {
        let p = self.spawn_vnetd(vnetd, site)?;
        self.vnetd[Self::index(site)] = p;
        Ok(())
    }

    /// Stop both vnetd processes.
    pub fn stop_vnetd(&mut self) {
        for p in &mut self.vnetd {
            p.stop();
        }
        self.vnetd.clear();
    }

    /// Status JSON of a site's vnetd.
    pub fn status(&self, site: Site) -> Result<serde_json::Value> {
        Ok(netreconf::daemon::query_status(&self.socket(site))?)
    }

    /// Move the VM's link to the other site's bridge (the VM keeps MAC, IP, ARP cache).
    pub fn move_vm(&mut self, to: Site) -> Result<()> {
        self.move_port("pvm", to)?;
        self.vm_site = to;
        Ok(())
    }

    /// Move the second VM ("vm2", at site B at first) to `to`'s bridge.
    pub fn move_vm2(&mut self, to: Site) -> Result<()> {
        self.move_port("pvm2", to)
    }

    fn move_port(&self, port: &str, to: Site) -> Result<()> {
        let (from_sw, to_sw, br) = match to {
            Site::A => (self.ns("swb"), self.ns("swa"), "brA"),
            Site::B => (self.ns("swa"), self.ns("swb"), "brB"),
        };
        run(&["ip", "-n", &from_sw, "link", "set", port, "netns", &to_sw])?;
        run(&["ip", "-n", &to_sw, "link", "set", port, "master", br, "up"])?;
        Ok(())
    }

    /// MAC of `ip` in the neighbour table of `role` (None if absent or incomplete/failed).
    pub fn neigh(&self, role: &str, ip: Ipv4Addr) -> Option<Mac> {
        let out = nsrun(&self.ns(role), &["ip", "neigh", "show", &ip.to_string(), "dev", "eth0"]).ok()?;
        let mut it = out.split_whitespace();
        while let Some(w) = it.next() {
            if w == "lladdr" {
                return it.next()?.parse().ok();
            }
        }
        None
    }

    /// Wait until `role`'s neighbour entry for `ip` is `mac`.
    pub fn wait_neigh(&self, role: &str, ip: Ipv4Addr, mac: Mac, secs: u64) -> Result<()> {
        Ok(wait_for(&format!("{role}: neighbour {ip} -> {mac} (now {:?})", self.neigh(role, ip)), secs, || {
            (self.neigh(role, ip) == Some(mac)).then_some(())
        })?)
    }

    /// One ping from `role` to `ip` succeeds within `secs` (retrying).
    pub fn ping(&self, role: &str, ip: Ipv4Addr, secs: u64) -> Result<()> {
        let ns = self.ns(role);
        let ips = ip.to_string();
        Ok(wait_for(&format!("ping {role} -> {ip}"), secs, || {
            nsrun(&ns, &["ping", "-c", "1", "-W", "1", "-n", "-q", &ips]).ok().map(|_| ())
        })?)
    }

    /// Dump logs (for failures).
    pub fn dump_logs(&self) {
        for p in &self.vnetd {
            eprintln!("==== {} ({}) ====\n{}", p.name, p.log.display(), p.log_text());
        }
        for site in [Site::A, Site::B] {
            if let Ok(s) = self.status(site) {
                eprintln!("==== status {site:?} ====\n{}", serde_json::to_string_pretty(&s).unwrap_or_default());
            }
        }
    }
}

/// The /32 for `ip` in a vnetd status dump: (router, seq).
pub fn host_route(st: &Value, ip: Ipv4Addr) -> Option<(String, u64)> {
    st["gndt"].as_array()?.iter().find_map(|r| {
        (r["prefix"] == format!("{ip}/32"))
            .then(|| (r["router"].as_str().unwrap_or("").to_string(), r["seq"].as_u64().unwrap_or(0)))
    })
}

/// Waits (15 s) until both sites route the VM's /32 to `router` with one sequence number of
/// at least `min_seq` (a move's sequence number is at least the µs time it was detected:
/// pass [`netreconf::router::wall_us`] taken before the move); returns it. The error shows
/// the GNDT of the site that does not.
pub fn wait_route(tb: &TwoSites, router: &str, min_seq: u64) -> Result<u64> {
    wait_host_route(tb, VM_IP, router, min_seq)
}

/// [`wait_route`] for the host `ip`.
pub fn wait_host_route(tb: &TwoSites, ip: Ipv4Addr, router: &str, min_seq: u64) -> Result<u64> {
    wait_for(&format!("both GNDTs: {ip}/32 -> {router} with seq >= {min_seq}"), 15, || {
        let a = host_route(&tb.status(Site::A).ok()?, ip)?;
        let b = host_route(&tb.status(Site::B).ok()?, ip)?;
        (a == b && a.0 == router && a.1 >= min_seq).then_some(a.1)
    })
    .map_err(|e| {
        let gndt = |site| tb.status(site).ok().map(|s| s["gndt"].clone());
        TestbedError::Failed(format!("{e}; GNDT A: {:?}; GNDT B: {:?}", gndt(Site::A), gndt(Site::B)))
    })
}

/// A 1 kHz UDP stream between two namespaces of the testbed (`vnet-probe udp-send` to
/// `vnet-probe udp-recv`), from [`start_stream`] to [`stop_stream`].
pub struct Stream {
    recv: Proc,
    send: Proc,
    stop: PathBuf,
    stop_send: PathBuf,
    out: PathBuf,
    send_out: PathBuf,
}

/// Starts stream `name` from `from` to `dst:port` in `to` (roles, as [`TwoSites::ns`] takes):
/// the receiver first, and the sender once the receiver's socket is bound. Runs the
/// workspace's `vnet-probe` ([`shrink_testutil::process::workspace_bin`]).
pub fn start_stream(tb: &TwoSites, from: &str, to: &str, dst: Ipv4Addr, port: u16, name: &str) -> Result<Stream> {
    let probe = shrink_testutil::process::workspace_bin("vnet-probe");
    let probe = probe.to_str().unwrap_or("vnet-probe");
    // Each side has a stop file of its own: the receiver is only told to stop when the end
    // of the stream does not arrive.
    let stop = tb.dir.join(format!("{name}.stop"));
    let stop_send = tb.dir.join(format!("{name}.stop-send"));
    let out = tb.dir.join(format!("{name}.json"));
    let send_out = tb.dir.join(format!("{name}-send.json"));
    for f in [&stop, &stop_send, &out, &send_out] {
        let _ = std::fs::remove_file(f);
    }
    let addr = format!("{dst}:{port}");
    let recv = Proc::spawn_out(
        &format!("{name}-recv"),
        &tb.ns(to),
        &[probe, "udp-recv", "--bind", &addr, "--stop-file", stop.to_str().unwrap_or("")],
        out.clone(),
        tb.dir.join(format!("{name}-recv.log")),
    )?;
    // The receiver's socket is bound before the sender starts.
    wait_for(&format!("udp-recv bound to {addr} in {to}"), 15, || {
        let out = nsrun(&tb.ns(to), &["ss", "-Hlun", "src", &addr]).ok()?;
        (!out.trim().is_empty()).then_some(())
    })
    .map_err(|e| TestbedError::Failed(format!("{e}: {}", recv.log_text())))?;
    let send = Proc::spawn_out(
        &format!("{name}-send"),
        &tb.ns(from),
        &[probe, "udp-send", "--to", &addr, "--interval-us", "1000", "--stop-file", stop_send.to_str().unwrap_or("")],
        send_out.clone(),
        tb.dir.join(format!("{name}-send.log")),
    )?;
    Ok(Stream { recv, send, stop, stop_send, out, send_out })
}

/// Stops the sender and waits for the receiver to get the end of the stream. Returns the
/// receiver's report (`received`, `lost`, `last_seq`, `max_gap_ms`, `end_of_stream`, ...)
/// with the sender's count added as `sent`.
pub fn stop_stream(mut s: Stream) -> Result<Value> {
    std::fs::write(&s.stop_send, b"stop")?;
    s.send.wait(10)?;
    // udp-send ends with an end-of-stream marker on the stream's path, after its last
    // datagram; udp-recv exits when the marker arrives. If it never does, stop the receiver
    // anyway: its report says what is missing (`end_of_stream` false).
    let recv = &mut s.recv;
    if wait_for("udp-recv to receive the end of the stream", 15, || (!recv.alive()).then_some(())).is_err() {
        std::fs::write(&s.stop, b"stop")?;
        s.recv.wait(10)?;
    }
    let text = std::fs::read_to_string(&s.out).unwrap_or_default();
    let mut v: Value = serde_json::from_str(text.trim())
        .map_err(|e| TestbedError::Failed(format!("udp-recv output {text:?}: {e}")))?;
    let sent: Value =
        serde_json::from_str(std::fs::read_to_string(&s.send_out).unwrap_or_default().trim()).unwrap_or(Value::Null);
    v["sent"] = sent["sent"].clone();
    Ok(v)
}

impl Drop for TwoSites {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.dump_logs();
        }
        self.stop_vnetd();
        for ns in self.namespaces.iter().rev() {
            let _ = run(&["ip", "netns", "del", ns]);
        }
        if !self.keep_dir {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}
