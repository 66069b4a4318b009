//! The three ViNe tables: HWDT (IP ↔ MAC seen on the LAN), LNDT (local hosts allowed to
//! use the virtual network) and GNDT (networks → router, longest prefix wins, /32 host
//! routes carry an EVPN-style sequence number).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::frames::Mac;

/// Errors of this module.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TableError {
    /// A prefix string that does not parse.
    #[error("bad IPv4 prefix '{0}' (expected a.b.c.d/len or a.b.c.d)")]
    BadPrefix(String),
    /// A prefix with host bits set.
    #[error("prefix '{0}' has host bits set (did you mean {1}?)")]
    HostBits(String, String),
}

/// An IPv4 prefix.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Prefix {
    pub addr: Ipv4Addr,
    pub len: u8,
}

impl Prefix {
    /// A /32.
    pub fn host(ip: Ipv4Addr) -> Prefix {
        Prefix { addr: ip, len: 32 }
    }

    fn mask(len: u8) -> u32 {
        if len == 0 {
            0
        } else {
            u32::MAX << (32 - u32::from(len))
        }
    }

    /// Does the prefix contain `ip`?
    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & Self::mask(self.len) == u32::from(self.addr)
    }

    /// Number of addresses.
    pub fn size(&self) -> u64 {
        1u64 << (32 - u32::from(self.len))
    }

    /// The addresses a host may use: all but the network and broadcast addresses (a /31
    /// and a /32 have none of those).
    pub fn hosts(&self) -> impl Iterator<Item = Ipv4Addr> {
        let base = u64::from(u32::from(self.addr));
        let n = self.size();
        let (first, last) = if self.len >= 31 { (0, n) } else { (1, n - 1) };
        (first..last).map(move |i| Ipv4Addr::from((base + i) as u32))
    }
}

impl fmt::Display for Prefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

impl fmt::Debug for Prefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl std::str::FromStr for Prefix {
    type Err = TableError;
    fn from_str(s: &str) -> Result<Self, TableError> {
        let (a, l) = match s.split_once('/') {
            Some((a, l)) => (a, l),
            None => (s, "32"),
        };
        let addr: Ipv4Addr = a.trim().parse().map_err(|_| TableError::BadPrefix(s.into()))?;
        let len: u8 = l.trim().parse().map_err(|_| TableError::BadPrefix(s.into()))?;
        if len > 32 {
            return Err(TableError::BadPrefix(s.into()));
        }
        let masked = Ipv4Addr::from(u32::from(addr) & Prefix::mask(len));
        if masked != addr {
            return Err(TableError::HostBits(s.into(), format!("{masked}/{len}")));
        }
        Ok(Prefix { addr, len })
    }
}

impl Serialize for Prefix {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

// ---------------------------------------------------------------- HWDT

/// One HWDT entry.
#[derive(Clone, Copy, Debug)]
pub struct HwEntry {
    pub mac: Mac,
    pub first_seen: Instant,
    pub last_seen: Instant,
}

/// HardWare Description Table: IP ↔ MAC learned from every ARP seen on the LAN.
#[derive(Default, Debug)]
pub struct Hwdt {
    by_ip: BTreeMap<Ipv4Addr, HwEntry>,
}

impl Hwdt {
    /// Learn (or refresh) `ip → mac`. Returns true if the mapping is new or changed.
    pub fn learn(&mut self, ip: Ipv4Addr, mac: Mac, now: Instant) -> bool {
        match self.by_ip.get_mut(&ip) {
            Some(e) if e.mac == mac => {
                e.last_seen = now;
                false
            }
            _ => {
                self.by_ip.insert(ip, HwEntry { mac, first_seen: now, last_seen: now });
                true
            }
        }
    }

    /// MAC of `ip`.
    pub fn mac_of(&self, ip: Ipv4Addr) -> Option<Mac> {
        self.by_ip.get(&ip).map(|e| e.mac)
    }

    /// The most recently seen IP that `mac` used.
    pub fn ip_of(&self, mac: Mac) -> Option<Ipv4Addr> {
        self.by_ip.iter().filter(|(_, e)| e.mac == mac).max_by_key(|(_, e)| e.last_seen).map(|(ip, _)| *ip)
    }

    /// Forget `ip`.
    pub fn remove(&mut self, ip: Ipv4Addr) -> Option<HwEntry> {
        self.by_ip.remove(&ip)
    }

    /// Drop entries not seen for `max_age`. Returns how many were dropped.
    pub fn expire(&mut self, now: Instant, max_age: Duration) -> usize {
        let before = self.by_ip.len();
        self.by_ip.retain(|_, e| now.saturating_duration_since(e.last_seen) <= max_age);
        before - self.by_ip.len()
    }

    /// All entries.
    pub fn iter(&self) -> impl Iterator<Item = (&Ipv4Addr, &HwEntry)> {
        self.by_ip.iter()
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.by_ip.len()
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.by_ip.is_empty()
    }
}

// ---------------------------------------------------------------- LNDT

/// Local Network Description Table: hosts of this site allowed to use the virtual network.
/// Configured as hosts and/or prefixes; a migrated IP is moved in (host entry) or out
/// (exclusion from a configured prefix).
#[derive(Default, Debug, Clone)]
pub struct Lndt {
    prefixes: Vec<Prefix>,
    hosts: BTreeSet<Ipv4Addr>,
    excluded: BTreeSet<Ipv4Addr>,
}

impl Lndt {
    /// Build from configured entries.
    pub fn new(entries: &[Prefix]) -> Lndt {
        let mut l = Lndt::default();
        for p in entries {
            if p.len == 32 {
                l.hosts.insert(p.addr);
            } else {
                l.prefixes.push(*p);
            }
        }
        l
    }

    /// Is `ip` allowed (local)?
    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        self.hosts.contains(&ip) || (!self.excluded.contains(&ip) && self.prefixes.iter().any(|p| p.contains(ip)))
    }

    /// A migrated host arrived here.
    pub fn add(&mut self, ip: Ipv4Addr) {
        self.excluded.remove(&ip);
        self.hosts.insert(ip);
    }

    /// A host left for another site.
    pub fn remove(&mut self, ip: Ipv4Addr) {
        self.hosts.remove(&ip);
        if self.prefixes.iter().any(|p| p.contains(ip)) {
            self.excluded.insert(ip);
        }
    }

    /// Configured prefixes.
    pub fn prefixes(&self) -> &[Prefix] {
        &self.prefixes
    }

    /// Single hosts (configured, or migrated here).
    pub fn hosts(&self) -> impl Iterator<Item = Ipv4Addr> + '_ {
        self.hosts.iter().copied()
    }

    /// JSON view.
    pub fn view(&self) -> LndtView {
        LndtView {
            prefixes: self.prefixes.clone(),
            hosts: self.hosts.iter().copied().collect(),
            excluded: self.excluded.iter().copied().collect(),
        }
    }
}

/// JSON view of the LNDT.
#[derive(Serialize, Debug)]
pub struct LndtView {
    pub prefixes: Vec<Prefix>,
    pub hosts: Vec<Ipv4Addr>,
    pub excluded: Vec<Ipv4Addr>,
}

// ---------------------------------------------------------------- GNDT

/// One GNDT route.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Route {
    pub prefix: Prefix,
    /// Name of the router that serves the prefix.
    pub router: String,
    /// Sequence number (host routes; 0 for configured network routes).
    pub seq: u64,
}

/// Result of offering a /32 to the GNDT.
#[derive(Debug, PartialEq, Eq)]
pub enum HostUpdate {
    /// Installed; carries the router that served the IP before (by longest prefix).
    Installed { previous: Option<String> },
    /// Same owner and sequence as installed (a retransmission).
    Duplicate,
    /// Older than what is installed; carries the installed sequence number.
    Stale { installed_seq: u64 },
}

/// Global Network Description Table.
#[derive(Default, Debug, Clone)]
pub struct Gndt {
    // Keyed by (len, addr) so iteration from the back gives the longest prefixes first.
    routes: BTreeMap<(u8, Ipv4Addr), Route>,
}

impl Gndt {
    /// Insert a configured network route.
    pub fn insert(&mut self, prefix: Prefix, router: &str, seq: u64) {
        self.routes.insert((prefix.len, prefix.addr), Route { prefix, router: router.to_string(), seq });
    }

    /// Longest-prefix match.
    pub fn lookup(&self, ip: Ipv4Addr) -> Option<&Route> {
        // Host routes first (exact), then scan longest to shortest.
        if let Some(r) = self.routes.get(&(32, ip)) {
            return Some(r);
        }
        self.routes.values().rev().find(|r| r.prefix.contains(ip))
    }

    /// The /32 for `ip`, if any.
    pub fn host_route(&self, ip: Ipv4Addr) -> Option<&Route> {
        self.routes.get(&(32, ip))
    }

    /// Offer a /32 `ip → router` with `seq`. The higher sequence wins; on equal sequence
    /// numbers with different routers, the lexicographically larger router name wins so
    /// that every router converges to the same choice.
    pub fn offer_host(&mut self, ip: Ipv4Addr, router: &str, seq: u64) -> HostUpdate {
        if let Some(cur) = self.routes.get(&(32, ip)) {
            if cur.seq == seq && cur.router == router {
                return HostUpdate::Duplicate;
            }
            if seq < cur.seq || (seq == cur.seq && router < cur.router.as_str()) {
                return HostUpdate::Stale { installed_seq: cur.seq };
            }
        }
        let previous = self.lookup(ip).map(|r| r.router.clone());
        self.insert(Prefix::host(ip), router, seq);
        HostUpdate::Installed { previous }
    }

    /// Highest sequence number known for `ip` (0 if none).
    pub fn host_seq(&self, ip: Ipv4Addr) -> u64 {
        self.host_route(ip).map(|r| r.seq).unwrap_or(0)
    }

    /// All routes, longest prefix first.
    pub fn routes(&self) -> impl Iterator<Item = &Route> {
        self.routes.values().rev()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    #[test]
    fn prefix_parse() {
        let p: Prefix = "10.1.0.0/24".parse().unwrap();
        assert!(p.contains(ip("10.1.0.200")));
        assert!(!p.contains(ip("10.1.1.1")));
        assert_eq!("10.1.0.5".parse::<Prefix>().unwrap().len, 32);
        assert!(matches!("10.1.0.5/24".parse::<Prefix>(), Err(TableError::HostBits(..))));
        assert!("10.1.0.0/33".parse::<Prefix>().is_err());
        assert!("nonsense".parse::<Prefix>().is_err());
        assert!("0.0.0.0/0".parse::<Prefix>().unwrap().contains(ip("1.2.3.4")));
    }

    #[test]
    fn gndt_longest_prefix_and_host_routes() {
        let mut g = Gndt::default();
        g.insert("10.1.0.0/24".parse().unwrap(), "A", 0);
        g.insert("10.1.1.0/24".parse().unwrap(), "B", 0);
        g.insert("10.0.0.0/8".parse().unwrap(), "C", 0);
        assert_eq!(g.lookup(ip("10.1.0.10")).unwrap().router, "A");
        assert_eq!(g.lookup(ip("10.2.0.10")).unwrap().router, "C");
        assert!(g.lookup(ip("192.168.0.1")).is_none());
        assert_eq!(g.offer_host(ip("10.1.0.10"), "B", 1), HostUpdate::Installed { previous: Some("A".into()) });
        assert_eq!(g.lookup(ip("10.1.0.10")).unwrap().router, "B");
        assert_eq!(g.lookup(ip("10.1.0.11")).unwrap().router, "A");
        assert_eq!(g.offer_host(ip("10.1.0.10"), "B", 1), HostUpdate::Duplicate);
        assert_eq!(g.offer_host(ip("10.1.0.10"), "A", 1), HostUpdate::Stale { installed_seq: 1 });
        assert_eq!(g.offer_host(ip("10.1.0.10"), "C", 1), HostUpdate::Installed { previous: Some("B".into()) });
        assert_eq!(g.offer_host(ip("10.1.0.10"), "A", 0), HostUpdate::Stale { installed_seq: 1 });
        assert!(matches!(g.offer_host(ip("10.1.0.10"), "A", 2), HostUpdate::Installed { .. }));
        assert_eq!(g.host_seq(ip("10.1.0.10")), 2);
        let first = g.routes().next().unwrap();
        assert_eq!(first.prefix.len, 32);
    }

    #[test]
    fn lndt_moves() {
        let mut l = Lndt::new(&["10.1.0.0/24".parse().unwrap(), "10.9.9.9".parse().unwrap()]);
        assert!(l.contains(ip("10.1.0.10")));
        assert!(l.contains(ip("10.9.9.9")));
        l.remove(ip("10.1.0.10"));
        assert!(!l.contains(ip("10.1.0.10")));
        assert!(l.contains(ip("10.1.0.11")));
        l.add(ip("10.1.0.10"));
        assert!(l.contains(ip("10.1.0.10")));
        l.add(ip("10.1.1.5"));
        assert!(l.contains(ip("10.1.1.5")));
        l.remove(ip("10.1.1.5"));
        assert!(!l.contains(ip("10.1.1.5")));
        assert_eq!(l.view().excluded.len(), 0);
    }

    #[test]
    fn hwdt_learn_and_age() {
        let mut h = Hwdt::default();
        let t0 = Instant::now();
        let m1 = Mac([2, 0, 0, 0, 0, 1]);
        assert!(h.learn(ip("10.1.0.1"), m1, t0));
        assert!(!h.learn(ip("10.1.0.1"), m1, t0));
        assert_eq!(h.ip_of(m1), Some(ip("10.1.0.1")));
        assert_eq!(h.mac_of(ip("10.1.0.1")), Some(m1));
        assert_eq!(h.expire(t0 + Duration::from_secs(10), Duration::from_secs(5)), 1);
        assert!(h.is_empty());
    }
}
