//! Network namespaces, veth links and bridges for tests (root and iproute2 required).

use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

/// Errors setting up test networks.
#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    /// Not root.
    #[error("network-namespace tests need root")]
    NotRoot,
    /// `ip` does not run.
    #[error("iproute2 is needed: {0}")]
    NoIproute2(Box<NetnsError>),
    /// A command failed.
    #[error("`{cmd}` failed: {stderr}")]
    Command {
        /// The command line.
        cmd: String,
        /// What it printed.
        stderr: String,
    },
    /// The command could not run.
    #[error("cannot run `{cmd}`: {source}")]
    Spawn {
        /// The command line.
        cmd: String,
        /// Cause.
        source: std::io::Error,
    },
}

/// Runs a command; its standard output, or an error naming it.
pub fn run(args: &[&str]) -> Result<String, NetnsError> {
    let cmd = args.join(" ");
    let out: Output = Command::new(args[0])
        .args(&args[1..])
        .stdin(Stdio::null())
        .output()
        .map_err(|source| NetnsError::Spawn { cmd: cmd.clone(), source })?;
    if !out.status.success() {
        return Err(NetnsError::Command { cmd, stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned() });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs a command inside namespace `ns` (by name); its standard output, or an error naming it.
pub fn nsrun(ns: &str, args: &[&str]) -> Result<String, NetnsError> {
    let mut v = vec!["ip", "netns", "exec", ns];
    v.extend_from_slice(args);
    run(&v)
}

/// A unique short tag for names (interface names are limited to 15 bytes).
pub fn unique_tag() -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    format!("{:x}{:x}", std::process::id() % 0xfffff, N.fetch_add(1, Ordering::SeqCst))
}

/// A network namespace, deleted on drop.
pub struct Netns {
    name: String,
}

impl Netns {
    /// Creates namespace `name` with its loopback up.
    pub fn new(name: &str) -> Result<Netns, NetnsError> {
        let _ = run(&["ip", "netns", "del", name]);
        run(&["ip", "netns", "add", name])?;
        let ns = Netns { name: name.to_owned() };
        ns.exec(&["ip", "link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// The namespace's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Runs a command inside the namespace.
    pub fn exec(&self, args: &[&str]) -> Result<String, NetnsError> {
        let mut full = vec!["ip", "netns", "exec", &self.name];
        full.extend_from_slice(args);
        run(&full)
    }

    /// `vnet-probe udp-rtt` (the workspace's build, [`crate::process::workspace_bin`]: panics
    /// if it is not built) from inside the namespace: `count` UDP echoes to `to`, one every
    /// `interval_us`; its JSON summary (`sent`, `received`, RTT percentiles).
    pub fn udp_rtt(&self, to: &str, count: u32, interval_us: u32) -> Result<serde_json::Value, NetnsError> {
        let probe = crate::process::workspace_bin("vnet-probe");
        let probe = probe.to_str().unwrap_or("vnet-probe");
        let (count, interval) = (count.to_string(), interval_us.to_string());
        let out = self.exec(&[probe, "udp-rtt", "--to", to, "--count", &count, "--interval-us", &interval])?;
        Ok(serde_json::from_str(out.lines().last().unwrap_or("{}")).unwrap_or(serde_json::Value::Null))
    }

    /// A `Command` that runs `program` inside the namespace.
    pub fn command(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name, program]);
        c
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Processes still inside keep the namespace alive; kill them first.
        for pid in pids(&self.name) {
            let _ = run(&["kill", "-9", &pid.to_string()]);
        }
        let _ = run(&["ip", "netns", "del", &self.name]);
    }
}

/// The processes in namespace `ns` (by name; `ip netns pids`), none if it does not exist.
pub fn pids(ns: &str) -> Vec<u32> {
    run(&["ip", "netns", "pids", ns]).unwrap_or_default().split_whitespace().filter_map(|p| p.parse().ok()).collect()
}

/// Joins two namespaces with a veth pair addressed `a_ip`/`b_ip` (CIDR), optionally shaped to
/// `rate` (e.g. "100mbit") in both directions with `tc tbf`.
pub fn link(a: &Netns, a_ip: &str, b: &Netns, b_ip: &str, rate: Option<&str>) -> Result<(), NetnsError> {
    let tag = unique_tag();
    let (va, vb) = (format!("va{tag}"), format!("vb{tag}"));
    run(&["ip", "link", "add", &va, "type", "veth", "peer", "name", &vb])?;
    run(&["ip", "link", "set", &va, "netns", a.name()])?;
    run(&["ip", "link", "set", &vb, "netns", b.name()])?;
    for (ns, dev, ip) in [(a, &va, a_ip), (b, &vb, b_ip)] {
        ns.exec(&["ip", "addr", "add", ip, "dev", dev])?;
        ns.exec(&["ip", "link", "set", dev, "up"])?;
        if let Some(rate) = rate {
            // A token bucket the size of a few packets keeps the link honest.
            ns.exec(&[
                "tc", "qdisc", "add", "dev", dev, "root", "tbf", "rate", rate, "burst", "64kb", "latency", "50ms",
            ])?;
        }
    }
    Ok(())
}

/// Creates bridge `name` inside `ns` (up), returning its name.
pub fn bridge(ns: &Netns, name: &str) -> Result<String, NetnsError> {
    ns.exec(&["ip", "link", "add", name, "type", "bridge"])?;
    ns.exec(&["ip", "link", "set", name, "up"])?;
    Ok(name.to_owned())
}

/// Whether tests can build namespaces here (root, iproute2).
pub fn available() -> Result<(), NetnsError> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return Err(NetnsError::NotRoot);
    }
    run(&["ip", "-V"]).map(|_| ()).map_err(|e| NetnsError::NoIproute2(Box::new(e)))
}
