//! A small world of hosts for cross-crate tests: network namespaces joined through a switch
//! (a bridge in its own namespace), optionally with a shaped link, and `redis-server`
//! processes running inside them. Everything is removed on drop.

use std::path::Path;
use std::process::{Child, Stdio};
use std::time::Duration;

use crate::netns::{self, run, Netns, NetnsError};
use crate::redis::cluster_state_ok;
use crate::util::{wait_for, wait_until};

/// A host: a namespace with an address on the switch.
pub struct Host {
    /// The short name given to [`World::new`].
    pub name: String,
    /// The namespace (its name is the host name used in launch templates).
    pub ns: Netns,
    /// Its address.
    pub addr: String,
}

/// Hosts on one switch.
pub struct World {
    /// The switch.
    pub switch: Netns,
    /// The hosts, in the order given.
    pub hosts: Vec<Host>,
    redis: Vec<Child>,
}

impl World {
    /// Hosts `(suffix, address/24)` on a switch; links of hosts listed in `shaped` are limited
    /// to `rate` (`tc tbf`) in both directions.
    pub fn new(tag: &str, hosts: &[(&str, &str)], shaped: &[&str], rate: &str) -> Result<World, NetnsError> {
        let t = netns::unique_tag();
        let switch = Netns::new(&format!("{tag}sw{t}"))?;
        netns::bridge(&switch, "sw0")?;
        let mut out = Vec::new();
        for (i, (name, addr)) in hosts.iter().enumerate() {
            let ns = Netns::new(&format!("{tag}{name}{t}"))?;
            let (h, s) = (format!("h{i}{t}"), format!("s{i}{t}"));
            run(&["ip", "link", "add", &h, "type", "veth", "peer", "name", &s])?;
            run(&["ip", "link", "set", &h, "netns", ns.name()])?;
            run(&["ip", "link", "set", &s, "netns", switch.name()])?;
            ns.exec(&["ip", "addr", "add", &format!("{addr}/24"), "dev", &h])?;
            ns.exec(&["ip", "link", "set", &h, "up"])?;
            switch.exec(&["ip", "link", "set", &s, "master", "sw0"])?;
            switch.exec(&["ip", "link", "set", &s, "up"])?;
            if shaped.contains(name) {
                ns.exec(&[
                    "tc", "qdisc", "add", "dev", &h, "root", "tbf", "rate", rate, "burst", "64kb", "latency", "50ms",
                ])?;
                switch.exec(&[
                    "tc", "qdisc", "add", "dev", &s, "root", "tbf", "rate", rate, "burst", "64kb", "latency", "50ms",
                ])?;
            }
            out.push(Host { name: name.to_string(), ns, addr: addr.to_string() });
        }
        Ok(World { switch, hosts: out, redis: Vec::new() })
    }

    /// The host called `name` (its short name).
    pub fn host(&self, name: &str) -> &Host {
        self.hosts.iter().find(|h| h.name == name).expect("host exists")
    }

    /// Starts `redis-server` on `host` at `port`; returns its index (for [`World::kill_redis`]).
    pub fn redis(&mut self, host: &str, port: u16, dir: &Path, cluster: bool) -> usize {
        let h = self.host(host);
        let data = dir.join(format!("redis-{}-{port}", h.addr));
        std::fs::create_dir_all(&data).unwrap();
        let mut args = vec![
            "--port".to_owned(),
            port.to_string(),
            "--bind".to_owned(),
            h.addr.clone(),
            "--save".to_owned(),
            String::new(),
            "--appendonly".to_owned(),
            "no".to_owned(),
            "--dir".to_owned(),
            data.display().to_string(),
            "--protected-mode".to_owned(),
            "no".to_owned(),
        ];
        if cluster {
            args.extend([
                "--cluster-enabled".into(),
                "yes".into(),
                "--cluster-config-file".into(),
                format!("nodes-{port}.conf"),
            ]);
        }
        let child =
            h.ns.command("redis-server")
                .args(&args)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("redis-server is installed (make deps)");
        let addr = h.addr.clone();
        let ns = h.ns.name().to_owned();
        self.redis.push(child);
        let port = port.to_string();
        wait_until(&format!("redis on {addr}:{port} starting"), Duration::from_secs(10), || {
            run(&["ip", "netns", "exec", &ns, "redis-cli", "-h", &addr, "-p", &port, "ping"])
                .is_ok_and(|o| o.contains("PONG"))
                .then_some(())
        });
        self.redis.len() - 1
    }

    /// A three-node Redis Cluster on `host`; returns its URL list for shrink (comma-separated).
    pub fn redis_cluster(&mut self, host: &str, ports: [u16; 3], dir: &Path) -> String {
        for p in ports {
            self.redis(host, p, dir, true);
        }
        let h = self.host(host);
        let nodes: Vec<String> = ports.iter().map(|p| format!("{}:{p}", h.addr)).collect();
        let mut args = vec!["redis-cli", "--cluster", "create"];
        args.extend(nodes.iter().map(String::as_str));
        args.extend(["--cluster-replicas", "0", "--cluster-yes"]);
        h.ns.exec(&args).expect("redis-cli --cluster create");
        // Every node, as `RedisCluster` does: a node that has not taken in the new
        // configuration yet still answers `cluster_state:fail`.
        for p in ports {
            let mut info = String::new();
            wait_for(&format!("cluster_state:ok on {}:{p}", h.addr), 20, || {
                info =
                    h.ns.exec(&["redis-cli", "-h", &h.addr, "-p", &p.to_string(), "cluster", "info"])
                        .unwrap_or_default();
                cluster_state_ok(&info).then_some(())
            })
            .unwrap_or_else(|e| panic!("{e}: {info}"));
        }
        nodes.iter().map(|n| format!("redis://{n}")).collect::<Vec<_>>().join(",")
    }

    /// Stops Redis number `i` (as [`World::redis`] returned).
    pub fn kill_redis(&mut self, i: usize) {
        let _ = self.redis[i].kill();
        let _ = self.redis[i].wait();
    }

    /// `redis-cli -h ADDR -p PORT ARGS...` inside `host`'s namespace, for the Redis on that host;
    /// its output (in redis-cli's raw form: one line per array element).
    pub fn redis_cli(&self, host: &str, port: u16, args: &[&str]) -> Result<String, NetnsError> {
        let h = self.host(host);
        let port = port.to_string();
        let mut full = vec!["redis-cli", "-h", &h.addr, "-p", &port];
        full.extend_from_slice(args);
        h.ns.exec(&full)
    }

    /// The processes running in `host`'s namespace, each with its command line (what the
    /// world's own processes and those launched into its namespaces are: nothing else).
    pub fn processes(&self, host: &str) -> Vec<(u32, Vec<String>)> {
        netns::pids(self.host(host).ns.name())
            .into_iter()
            .filter_map(|pid| {
                let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
                let args = cmdline
                    .split(|&b| b == 0)
                    .filter(|a| !a.is_empty())
                    .map(|a| String::from_utf8_lossy(a).into_owned())
                    .collect();
                Some((pid, args))
            })
            .collect()
    }
}

impl Drop for World {
    fn drop(&mut self) {
        for c in &mut self.redis {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
