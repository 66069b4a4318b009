//! `vnetd.toml`: one gateway's configuration. Every error is one line naming the field.

use std::collections::BTreeSet;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::frames::Mac;
use crate::tables::Prefix;

/// Errors of this module.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {path}: {err}")]
    Read { path: PathBuf, err: std::io::Error },
    #[error("config {path}, line {line}: {msg}")]
    Syntax { path: PathBuf, line: usize, msg: String },
    #[error("config {path}: field `{field}`: {msg}")]
    Field { path: PathBuf, field: String, msg: String },
}

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
struct RawPeer {
    name: String,
    address: String,
}

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
struct RawRoute {
    network: String,
    router: String,
}

#[derive(Deserialize, Debug, Default)]
#[serde(deny_unknown_fields)]
struct RawTimers {
    announce_count: Option<u32>,
    announce_interval_ms: Option<u64>,
    query_timeout_ms: Option<u64>,
    retransmit_ms: Option<u64>,
    retransmit_count: Option<u32>,
    hwdt_max_age_s: Option<u64>,
    max_clock_skew_s: Option<u64>,
    rarp_rate_per_s: Option<u32>,
    rarp_burst: Option<u32>,
    arp_queue_len: Option<usize>,
}

#[derive(Deserialize, Debug, Default)]
#[serde(deny_unknown_fields)]
struct RawProbe {
    enabled: Option<bool>,
    rate_per_s: Option<u32>,
    interval_s: Option<u64>,
    startup_rate_per_s: Option<u32>,
    remote_at_start: Option<bool>,
}

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    site: String,
    lan_interface: String,
    router_mac: String,
    router_ip: String,
    listen: String,
    key: Option<String>,
    key_file: Option<String>,
    control_socket: Option<String>,
    state_file: Option<String>,
    #[serde(default)]
    lndt: Vec<String>,
    #[serde(default)]
    peers: Vec<RawPeer>,
    #[serde(default)]
    gndt: Vec<RawRoute>,
    #[serde(default)]
    timers: RawTimers,
    #[serde(default)]
    probe: RawProbe,
}

/// A peer router.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    pub name: String,
    pub address: SocketAddr,
}

/// Tunables (all have defaults).
#[derive(Debug, Clone)]
pub struct Timers {
    /// How many times LAN announcements (gratuitous / directed ARP) are sent.
    pub announce_count: u32,
    /// Spacing of repeated announcements; > 1 s so Linux's `locktime` never hides one.
    pub announce_interval: Duration,
    /// How long to wait for peers to answer a who-has.
    pub query_timeout: Duration,
    /// First retransmission delay of a host route not yet acknowledged (doubles).
    pub retransmit: Duration,
    /// Retransmissions of a host route before giving up on a peer.
    pub retransmit_count: u32,
    /// HWDT entries not seen for this long are dropped.
    pub hwdt_max_age: Duration,
    /// Control messages whose timestamp is further than this from our clock are stale.
    pub max_clock_skew: Duration,
    /// Migration-detection frames (RARP, gratuitous ARP) accepted per second…
    pub rarp_rate_per_s: u32,
    /// …with this burst.
    pub rarp_burst: u32,
    /// Packets queued per destination while its MAC is being resolved.
    pub arp_queue_len: usize,
}

impl Default for Timers {
    fn default() -> Self {
        Timers {
            announce_count: 3,
            announce_interval: Duration::from_millis(1100),
            query_timeout: Duration::from_millis(1000),
            retransmit: Duration::from_millis(200),
            retransmit_count: 6,
            hwdt_max_age: Duration::from_secs(3600),
            max_clock_skew: Duration::from_secs(30),
            rarp_rate_per_s: 20,
            rarp_burst: 40,
            arp_queue_len: 32,
        }
    }
}

/// Active probing of the site's hosts: paced ARP requests from the router to every
/// address of its LNDT, so that the HWDT knows every active local host (and a VM that
/// leaves can be named from its MAC) even if the host never sends a frame the gateway
/// sees. Each sweep costs one 42-byte broadcast frame per address: 254 frames per /24.
#[derive(Debug, Clone)]
pub struct Probe {
    pub enabled: bool,
    /// Pace of the periodic sweeps (frames per second).
    pub rate_per_s: u32,
    /// Periodic sweeps start this far apart (the first one this long after the sweep at
    /// start ended).
    pub interval: Duration,
    /// Pace of the sweep at start (frames per second): after a restart the tables are empty.
    pub startup_rate_per_s: u32,
    /// The sweep at start also covers the other routers' prefixes, to find VMs that moved
    /// here while every router's state was lost.
    pub remote_at_start: bool,
}

impl Default for Probe {
    fn default() -> Self {
        Probe {
            enabled: true,
            rate_per_s: 20,
            interval: Duration::from_secs(60),
            startup_rate_per_s: 1000,
            remote_at_start: true,
        }
    }
}

/// Largest prefix a probe sweep covers (a /16).
pub const MAX_PROBED_PREFIX: u32 = 1 << 16;

/// A validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub site: String,
    pub lan_interface: String,
    pub router_mac: Mac,
    pub router_ip: Ipv4Addr,
    pub listen: SocketAddr,
    pub key: Vec<u8>,
    pub control_socket: Option<PathBuf>,
    /// Where vnetd keeps its last boot's epoch, so that a boot's epoch orders above every
    /// earlier one even if the clock was set back (none: the clock alone).
    pub state_file: Option<PathBuf>,
    pub lndt: Vec<Prefix>,
    pub peers: Vec<Peer>,
    pub gndt: Vec<(Prefix, String)>,
    pub timers: Timers,
    pub probe: Probe,
}

impl Config {
    /// Load and validate a file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|err| ConfigError::Read { path: path.to_path_buf(), err })?;
        Config::parse(&text, path)
    }

    /// Parse and validate text (`path` is only used in messages).
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| {
            let msg = e.message().replace('\n', " ");
            let Some(span) = e.span() else {
                return ConfigError::Syntax { path: path.to_path_buf(), line: 0, msg };
            };
            let line = text[..span.start.min(text.len())].matches('\n').count() + 1;
            match field_at(text, span.start) {
                // A value of the wrong type: name its field (and say where it is).
                Some(field) if !msg.starts_with("missing field") && !msg.starts_with("unknown field") => {
                    ConfigError::Field { path: path.to_path_buf(), field, msg: format!("{msg} (line {line})") }
                }
                _ => ConfigError::Syntax { path: path.to_path_buf(), line, msg },
            }
        })?;
        let field =
            |field: &str, msg: String| ConfigError::Field { path: path.to_path_buf(), field: field.to_string(), msg };
        let check_name = |f: &str, n: &str| -> Result<(), ConfigError> {
            if n.is_empty() || n.len() > crate::proto::MAX_NAME {
                return Err(field(f, format!("'{n}' must be 1 to 32 bytes long")));
            }
            Ok(())
        };
        check_name("site", &raw.site)?;
        if raw.lan_interface.is_empty() {
            return Err(field("lan_interface", "must not be empty".into()));
        }
        let router_mac: Mac =
            raw.router_mac.parse().map_err(|e: crate::frames::FrameError| field("router_mac", e.to_string()))?;
        if !router_mac.is_unicast() {
            return Err(field("router_mac", format!("{router_mac} is not a unicast MAC")));
        }
        let router_ip: Ipv4Addr = raw
            .router_ip
            .parse()
            .map_err(|_| field("router_ip", format!("'{}' is not an IPv4 address", raw.router_ip)))?;
        let listen: SocketAddr =
            raw.listen.parse().map_err(|_| field("listen", format!("'{}' is not an address:port", raw.listen)))?;
        let key = match (&raw.key, &raw.key_file) {
            (Some(k), None) => k.as_bytes().to_vec(),
            (None, Some(f)) => {
                let kp = resolve(path, f);
                let k = std::fs::read(&kp).map_err(|e| field("key_file", format!("{}: {e}", kp.display())))?;
                let s = String::from_utf8_lossy(&k).trim().as_bytes().to_vec();
                s
            }
            (Some(_), Some(_)) => return Err(field("key", "give either `key` or `key_file`, not both".into())),
            (None, None) => return Err(field("key", "missing (or give `key_file`)".into())),
        };
        if key.len() < 16 {
            return Err(field("key", format!("{} bytes is too short; use at least 16", key.len())));
        }
        let mut lndt = Vec::new();
        for (i, s) in raw.lndt.iter().enumerate() {
            lndt.push(s.parse::<Prefix>().map_err(|e| field(&format!("lndt[{i}]"), e.to_string()))?);
        }
        let mut names = BTreeSet::new();
        names.insert(raw.site.clone());
        let mut peers = Vec::new();
        for (i, p) in raw.peers.iter().enumerate() {
            check_name(&format!("peers[{i}].name"), &p.name)?;
            if !names.insert(p.name.clone()) {
                return Err(field(
                    &format!("peers[{i}].name"),
                    format!("'{}' is used twice (or is this site's name)", p.name),
                ));
            }
            let address: SocketAddr = p.address.parse().map_err(|_| {
                field(&format!("peers[{i}].address"), format!("'{}' is not an address:port", p.address))
            })?;
            peers.push(Peer { name: p.name.clone(), address });
        }
        let mut gndt = Vec::new();
        for (i, r) in raw.gndt.iter().enumerate() {
            let prefix: Prefix = r
                .network
                .parse()
                .map_err(|e: crate::tables::TableError| field(&format!("gndt[{i}].network"), e.to_string()))?;
            if !names.contains(&r.router) {
                return Err(field(
                    &format!("gndt[{i}].router"),
                    format!("'{}' is neither this site nor a peer", r.router),
                ));
            }
            if let Some((j, (_, other))) = gndt.iter().enumerate().find(|(_, (p, _))| *p == prefix) {
                let msg = if *other == r.router {
                    format!("{prefix} is listed twice (gndt[{j}] too)")
                } else {
                    format!("{prefix} is already routed to '{other}' by gndt[{j}]: one prefix, one router")
                };
                return Err(field(&format!("gndt[{i}].network"), msg));
            }
            gndt.push((prefix, r.router.clone()));
        }
        // Every LNDT entry lies in this site's part of the GNDT: an LNDT entry that the
        // GNDT routes to a peer would make both routers serve the same hosts.
        for (i, l) in lndt.iter().enumerate() {
            let owner = gndt.iter().filter(|(p, _)| p.len <= l.len && p.contains(l.addr)).max_by_key(|(p, _)| p.len);
            if let Some((p, r)) = owner {
                if *r != raw.site {
                    return Err(field(
                        &format!("lndt[{i}]"),
                        format!("{l} lies in {p}, which the GNDT routes to '{r}', not to this site '{}'", raw.site),
                    ));
                }
            }
        }
        let mut timers = Timers::default();
        let t = &raw.timers;
        // Bounds that keep every timer sum and product far from overflowing `Instant`.
        const DAY_MS: u64 = 86_400_000;
        for (name, v, max) in [
            ("timers.announce_interval_ms", t.announce_interval_ms, 60_000),
            ("timers.query_timeout_ms", t.query_timeout_ms, 600_000),
            ("timers.retransmit_ms", t.retransmit_ms, 60_000),
            ("timers.hwdt_max_age_s", t.hwdt_max_age_s, 366 * 86_400),
            ("timers.max_clock_skew_s", t.max_clock_skew_s, 86_400),
            ("probe.interval_s", raw.probe.interval_s, DAY_MS / 1000),
        ] {
            if let Some(v) = v.filter(|v| *v > max) {
                return Err(field(name, format!("{v} is more than the largest allowed, {max}")));
            }
        }
        if let Some(v) = t.retransmit_count.filter(|v| *v > 30) {
            return Err(field("timers.retransmit_count", format!("{v} is more than the largest allowed, 30")));
        }
        if let Some(v) = t.announce_count {
            if v == 0 || v > 20 {
                return Err(field("timers.announce_count", "must be 1..=20".into()));
            }
            timers.announce_count = v;
        }
        if let Some(v) = t.announce_interval_ms {
            timers.announce_interval = Duration::from_millis(v);
        }
        if let Some(v) = t.query_timeout_ms {
            timers.query_timeout = Duration::from_millis(v.max(1));
        }
        if let Some(v) = t.retransmit_ms {
            timers.retransmit = Duration::from_millis(v.max(1));
        }
        if let Some(v) = t.retransmit_count {
            timers.retransmit_count = v;
        }
        if let Some(v) = t.hwdt_max_age_s {
            timers.hwdt_max_age = Duration::from_secs(v);
        }
        if let Some(v) = t.max_clock_skew_s {
            timers.max_clock_skew = Duration::from_secs(v);
        }
        if let Some(v) = t.rarp_rate_per_s {
            if v == 0 {
                return Err(field("timers.rarp_rate_per_s", "must be > 0".into()));
            }
            timers.rarp_rate_per_s = v;
        }
        if let Some(v) = t.rarp_burst {
            timers.rarp_burst = v.max(1);
        }
        if let Some(v) = t.arp_queue_len {
            timers.arp_queue_len = v;
        }
        let mut probe = Probe::default();
        let q = &raw.probe;
        if let Some(v) = q.enabled {
            probe.enabled = v;
        }
        for (name, val, dst) in [
            ("probe.rate_per_s", q.rate_per_s, &mut probe.rate_per_s),
            ("probe.startup_rate_per_s", q.startup_rate_per_s, &mut probe.startup_rate_per_s),
        ] {
            if let Some(v) = val {
                if v == 0 || v > 100_000 {
                    return Err(field(name, format!("{v} must be 1..=100000 frames per second")));
                }
                *dst = v;
            }
        }
        if let Some(v) = q.interval_s {
            if v == 0 {
                return Err(field("probe.interval_s", "must be > 0".into()));
            }
            probe.interval = Duration::from_secs(v);
        }
        if let Some(v) = q.remote_at_start {
            probe.remote_at_start = v;
        }
        if probe.enabled {
            for (i, l) in lndt.iter().enumerate() {
                if l.len < 16 {
                    return Err(field(
                        &format!("lndt[{i}]"),
                        format!(
                            "{l} is larger than the /16 a probe sweep covers: split it or set probe.enabled = false"
                        ),
                    ));
                }
            }
        }
        Ok(Config {
            site: raw.site,
            lan_interface: raw.lan_interface,
            router_mac,
            router_ip,
            listen,
            key,
            control_socket: raw.control_socket.map(|s| resolve(path, &s)),
            state_file: raw.state_file.map(|s| resolve(path, &s)),
            lndt,
            peers,
            gndt,
            timers,
            probe,
        })
    }
}

/// The dotted name of the field whose value starts at byte `at` of `text`: the key on
/// that line, under the table header above it (`[timers]` → `timers.x`, the k-th
/// `[[peers]]` → `peers[k].x`).
fn field_at(text: &str, at: usize) -> Option<String> {
    let at = at.min(text.len());
    let line_start = text[..at].rfind('\n').map(|i| i + 1).unwrap_or(0);
    let line = text[line_start..].lines().next().unwrap_or("");
    let (key, _) = line.split_once('=')?;
    let key = key.trim().trim_matches('"');
    if key.is_empty() || key.starts_with('#') || key.starts_with('[') {
        return None;
    }
    let mut table: Option<String> = None;
    let mut counts: std::collections::HashMap<String, usize> = std::collections::HashMap::new();
    for l in text[..line_start].lines() {
        let l = l.trim();
        if let Some(name) = l.strip_prefix("[[").and_then(|r| r.split_once("]]")).map(|(n, _)| n.trim()) {
            let k = counts.entry(name.to_string()).or_insert(0);
            table = Some(format!("{name}[{k}]"));
            *k += 1;
        } else if let Some(name) = l.strip_prefix('[').and_then(|r| r.split_once(']')).map(|(n, _)| n.trim()) {
            table = Some(name.to_string());
        }
    }
    Some(match table {
        Some(t) => format!("{t}.{key}"),
        None => key.to_string(),
    })
}

fn resolve(config: &Path, p: &str) -> PathBuf {
    let p = PathBuf::from(p);
    if p.is_absolute() {
        p
    } else {
        config.parent().map(|d| d.join(&p)).unwrap_or(p)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) const EXAMPLE: &str = include_str!("../examples/site-a.toml");

    fn parse(t: &str) -> Result<Config, ConfigError> {
        Config::parse(t, Path::new("/etc/vnetd.toml"))
    }

    #[test]
    fn example_parses() {
        let c = parse(EXAMPLE).unwrap();
        assert_eq!(c.site, "A");
        assert_eq!(c.peers.len(), 1);
        assert_eq!(c.gndt.len(), 2);
        assert_eq!(c.timers.announce_count, 3);
        let b = parse(include_str!("../examples/site-b.toml")).unwrap();
        assert_eq!(b.site, "B");
    }

    #[test]
    fn errors_name_the_field() {
        let e = parse(&EXAMPLE.replace("02:00:0a:01:00:fe", "02:00:0a:01:00")).unwrap_err();
        let s = e.to_string();
        assert!(s.contains("`router_mac`"), "{s}");
        assert!(!s.contains('\n'));
        let e = parse(&EXAMPLE.replace("router = \"B\"", "router = \"Q\"")).unwrap_err();
        assert!(e.to_string().contains("gndt[1].router"), "{e}");
        let e = parse(&EXAMPLE.replace("site = \"A\"", "")).unwrap_err();
        assert!(e.to_string().contains("site"), "{e}");
        assert!(!e.to_string().contains('\n'), "{e}");
        let e = parse(&EXAMPLE.replace("10.1.0.0/24\"]", "10.1.0.1/24\"]")).unwrap_err();
        assert!(e.to_string().contains("lndt[0]"), "{e}");
        let e = parse(&EXAMPLE.replace("192.168.100.2:7800", "nowhere")).unwrap_err();
        assert!(e.to_string().contains("peers[0].address"), "{e}");
        let e = parse(&format!("{EXAMPLE}\nbogus = 1\n")).unwrap_err();
        assert!(e.to_string().contains("bogus"), "{e}");
    }

    #[test]
    fn type_errors_name_the_field() {
        let e = parse(&EXAMPLE.replace("announce_count = 3", "announce_count = \"three\"")).unwrap_err();
        assert!(e.to_string().contains("field `timers.announce_count`"), "{e}");
        assert!(!e.to_string().contains('\n'), "{e}");
        let e = parse(&EXAMPLE.replace("site = \"A\"", "site = 7")).unwrap_err();
        assert!(e.to_string().contains("field `site`"), "{e}");
        let e = parse(&EXAMPLE.replace("address = \"192.168.100.2:7800\"", "address = [1]")).unwrap_err();
        assert!(e.to_string().contains("field `peers[0].address`"), "{e}");
        let e = parse(&EXAMPLE.replace("router = \"B\"", "router = false")).unwrap_err();
        assert!(e.to_string().contains("field `gndt[1].router`"), "{e}");
        let e = parse(&format!("{EXAMPLE}\n[probe]\nenabled = \"yes\"\n")).unwrap_err();
        assert!(e.to_string().contains("field `probe.enabled`"), "{e}");
        // Not a type error: still the line.
        let e = parse(&format!("{EXAMPLE}\nx = = 1\n")).unwrap_err();
        assert!(e.to_string().contains("line"), "{e}");
    }

    #[test]
    fn conflicting_gndt_and_lndt_entries_are_refused() {
        let twice = EXAMPLE.replace("network = \"10.1.1.0/24\"", "network = \"10.1.0.0/24\"");
        let e = parse(&twice).unwrap_err();
        let s = e.to_string();
        assert!(s.contains("gndt[1].network") && s.contains("already routed to 'A'"), "{s}");
        let dup = format!("{EXAMPLE}\n[[gndt]]\nnetwork = \"10.1.1.0/24\"\nrouter = \"B\"\n");
        let e = parse(&dup).unwrap_err();
        assert!(e.to_string().contains("gndt[2].network") && e.to_string().contains("listed twice"), "{e}");
        let e =
            parse(&EXAMPLE.replace("lndt = [\"10.1.0.0/24\"]", "lndt = [\"10.1.0.0/24\", \"10.1.1.7\"]")).unwrap_err();
        let s = e.to_string();
        assert!(s.contains("lndt[1]") && s.contains("routes to 'B'"), "{s}");
        // A host of this site's prefix is fine.
        parse(&EXAMPLE.replace("lndt = [\"10.1.0.0/24\"]", "lndt = [\"10.1.0.0/24\", \"10.1.0.7\"]")).unwrap();
    }

    #[test]
    fn probe_settings() {
        let c = parse(EXAMPLE).unwrap();
        assert!(c.probe.enabled);
        let c =
            parse(&format!("{EXAMPLE}\n[probe]\nrate_per_s = 5\ninterval_s = 2\nremote_at_start = false\n")).unwrap();
        assert_eq!((c.probe.rate_per_s, c.probe.interval, c.probe.remote_at_start), (5, Duration::from_secs(2), false));
        let e = parse(&format!("{EXAMPLE}\n[probe]\nrate_per_s = 0\n")).unwrap_err();
        assert!(e.to_string().contains("probe.rate_per_s"), "{e}");
        let e = parse(&EXAMPLE.replace("lndt = [\"10.1.0.0/24\"]", "lndt = [\"10.0.0.0/8\"]")).unwrap_err();
        assert!(e.to_string().contains("probe"), "{e}");
    }
}
