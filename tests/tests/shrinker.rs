//! Shrinker end to end: virtual clusters of real KVM guests built from one base image move
//! from site A to site B with `shrink-migrate --cluster`, with real `redis-server`s for the
//! coordination (site A) and index (site B) services, and real faults.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use migrate::client::ApiClient;
use migrate::shrinker::keys::INDEX_PREFIX;
use serde_json::{json, Value};
use shrink_testutil::fs::TempDir;
use shrink_testutil::netns;
use shrink_testutil::process::{workspace_bin, Bg};
use shrink_testutil::util::{cluster_key, heartbeats, image, last_heartbeat, wait_text, wait_until};
use shrink_testutil::world::World;

/// Site A has one hypervisor (a1, with the coordination Redis), site B two (b1 with the
/// index Redis, b2).
struct Sites {
    dir: TempDir,
    world: World,
    vms: Vec<(String, Bg)>,
}

const A1: &str = "10.77.0.11";
const B1: &str = "10.77.0.21";
const B2: &str = "10.77.0.22";

impl Sites {
    fn new(tag: &str) -> Sites {
        netns::available().unwrap();
        let dir = TempDir::new(tag).unwrap();
        let world = World::new(tag, &[("a1", A1), ("b1", B1), ("b2", B2)], &[], "").unwrap();
        // Each site's storage: its repository (the base image, a hard link here to save the
        // copy: it is never written) and the directory its hosts keep VMs' disks in.
        for site in ["siteA", "siteB"] {
            std::fs::create_dir_all(dir.path().join(site).join("disks")).unwrap();
            std::fs::create_dir_all(dir.path().join(site).join("repo")).unwrap();
            let repo = dir.path().join(site).join("repo/base.qcow2");
            if std::fs::hard_link(image("base.qcow2"), &repo).is_err() {
                std::fs::copy(image("base.qcow2"), &repo).unwrap();
            }
        }
        Sites { dir, world, vms: Vec::new() }
    }

    /// Site `site`'s copy of the base image.
    fn repo(&self, site: &str) -> PathBuf {
        self.path(&format!("{site}/repo/base.qcow2"))
    }

    /// Indexes each site's repository in its Redis (`shrink-repo index`, in a host of the site);
    /// an index that cannot be reached is left out (the VMMs then read the image instead).
    fn index_repositories(&self, a: &str, b: &str) {
        for (site, host, url) in [("siteA", "a1", a), ("siteB", "b1", b)] {
            let repo = self.repo(site);
            let out = self
                .world
                .host(host)
                .ns
                .command(workspace_bin("shrink-repo").to_str().unwrap())
                .args(["index", "--index", url])
                .arg(&repo)
                .output()
                .unwrap();
            if !out.status.success() {
                eprintln!("shrink-repo index {url}: {}", String::from_utf8_lossy(&out.stderr));
            }
        }
    }

    fn path(&self, f: &str) -> PathBuf {
        self.dir.path().join(f)
    }

    /// Boots a VM at site A from the base image.
    fn boot(&mut self, name: &str, cmdline: &str) {
        let a1 = self.world.host("a1");
        let mut cmd = a1.ns.command(workspace_bin("shrink-vmm").to_str().unwrap());
        cmd.args([
            "--kernel",
            image("shrink-guest").to_str().unwrap(),
            "--mem",
            "128M",
            "--cmdline",
            cmdline,
            "--name",
            name,
        ]);
        cmd.arg("--image").arg(self.repo("siteA"));
        cmd.arg("--disk").arg(self.path(&format!("siteA/disks/{name}.qcow2")));
        cmd.arg("--api").arg(self.path(&format!("{name}.sock")));
        cmd.arg("--serial").arg(self.path(&format!("{name}.serial")));
        cmd.arg("--cluster-key").arg(cluster_key());
        let bg = Bg::spawn(cmd, &self.path(&format!("{name}.log")));
        self.vms.push((name.to_owned(), bg));
    }

    /// Redis at both sites (coordination at a1:6379, index at b1:6380), the VMs `names` booted
    /// at site A (`cmdline` of each one's index) and ready, and their vc.toml.
    fn simple_cluster(&mut self, names: &[&str], cmdline: impl Fn(usize) -> String) -> PathBuf {
        let d = self.dir.path().to_owned();
        self.world.redis("a1", 6379, &d, false);
        self.world.redis("b1", 6380, &d, false);
        for (i, n) in names.iter().enumerate() {
            self.boot(n, &cmdline(i));
        }
        self.wait_ready();
        self.vc(
            "vc.toml",
            names,
            &format!("redis://{A1}:6379"),
            &format!("redis://{B1}:6380"),
            "ip netns exec {host} {cmd}",
        )
    }

    fn wait_ready(&self) {
        for (name, _) in &self.vms {
            wait_text(&self.path(&format!("{name}.serial")), "heartbeat 1\n", Duration::from_secs(60));
        }
    }

    /// Writes vc.toml for `names`; `launch_b` is site B's launch template.
    fn vc(&self, file: &str, names: &[&str], coordination: &str, index: &str, launch_b: &str) -> PathBuf {
        self.vc_id(file, &format!("{file}-{}", netns::unique_tag()), names, coordination, index, launch_b)
    }

    /// The same with migration id `id`. An id alone does not make waves deduplicate against
    /// each other: every run coordinates under `<id>.<nonce>` of its own, and a later wave
    /// joins an earlier wave's run with `--join-run RUN_ID` (the run id its report names).
    fn vc_id(&self, file: &str, id: &str, names: &[&str], coordination: &str, index: &str, launch_b: &str) -> PathBuf {
        let host = |n: &str| self.world.host(n).ns.name().to_owned();
        // Site A's repository is indexed in its coordination Redis (it has no index of its own).
        self.index_repositories(coordination, index);
        let storage = |site: &str| {
            format!(
                "repository = \"{}\"\nstorage = \"{}\"\n",
                self.repo(site).display(),
                self.path(&format!("{site}/disks")).display()
            )
        };
        let mut t = format!(
            "migration_id = \"{id}\"\nvmm = \"{}\"\nworkdir = \"{}\"\ncluster_key = \"{}\"\n\n",
            workspace_bin("shrink-vmm").display(),
            self.dir.path().display(),
            cluster_key().display()
        );
        t += &format!(
            "[[sites]]\nname = \"siteA\"\ncoordination = \"{coordination}\"\nindex = \"{coordination}\"\nlaunch = \"ip netns exec {{host}} {{cmd}}\"\n{}\n[[sites.hosts]]\nname = \"{}\"\naddress = \"{A1}\"\n\n",
            storage("siteA"),
            host("a1")
        );
        t += &format!(
            "[[sites]]\nname = \"siteB\"\ncoordination = \"redis://{B1}:6391\"\nindex = \"{index}\"\nlaunch = \"{launch_b}\"\n{}\n[[sites.hosts]]\nname = \"{}\"\naddress = \"{B1}\"\n\n[[sites.hosts]]\nname = \"{}\"\naddress = \"{B2}\"\n\n",
            storage("siteB"),
            host("b1"),
            host("b2")
        );
        for n in names {
            t += &format!(
                "[[vms]]\nname = \"{n}\"\nhost = \"{}\"\napi = \"{}\"\n\n",
                host("a1"),
                self.path(&format!("{n}.sock")).display()
            );
        }
        let p = self.path(file);
        std::fs::write(&p, t).unwrap();
        p
    }

    /// Runs shrink-migrate --cluster; returns (exit code, JSON report or stderr).
    fn migrate(&self, vc: &Path, extra: &[&str]) -> (i32, Value, String) {
        self.migrate_with(vc, &[&["--no-repository"], extra].concat())
    }

    /// The same without `--no-repository` in the arguments of its own.
    fn migrate_with(&self, vc: &Path, extra: &[&str]) -> (i32, Value, String) {
        let out = Command::new(workspace_bin("shrink-migrate"))
            // (`migrate`: the tests of the cross-VM machinery take base-image content from the
            // VMs' streams and peers, not from site B's repository; see the repository test.)
            .args(["--cluster", vc.to_str().unwrap(), "--dest", "siteB", "--json", "--verify"])
            .args(extra)
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let report = serde_json::from_str(&stdout).unwrap_or(Value::Null);
        (out.status.code().unwrap_or(-1), report, String::from_utf8_lossy(&out.stderr).into_owned())
    }

    /// The VM's guest runs at the destination and its heartbeat carries on from the source's.
    fn assert_moved(&mut self, name: &str) {
        // The source VMM is gone, so that its console is final.
        let (_, bg) = self.vms.iter_mut().find(|(n, _)| n == name).unwrap();
        wait_until(&format!("{name}: the source VMM exiting"), Duration::from_secs(10), || bg.0.try_wait().unwrap());
        let src_serial = std::fs::read_to_string(self.path(&format!("{name}.serial"))).unwrap();
        let last = last_heartbeat(&src_serial).expect("source heartbeats");
        let dst = self.path(&format!("{name}-siteB.serial"));
        let dst_serial = wait_text(&dst, &format!("heartbeat {}\n", last + 2), Duration::from_secs(10));
        // The console goes on where it stopped (a line the guest was printing at the switch-over
        // ends at the destination): no heartbeat lost, none repeated.
        let joined = heartbeats(&format!("{src_serial}{dst_serial}"));
        let at = joined.iter().position(|&h| h == last).expect("the source's last heartbeat");
        assert_eq!(
            joined.get(at + 1..at + 3),
            Some(&[last + 1, last + 2][..]),
            "{name}: the destination continues the heartbeat"
        );
    }

    /// The VM still runs at the source.
    fn assert_still_at_source(&self, name: &str) {
        let serial = self.path(&format!("{name}.serial"));
        let n = last_heartbeat(&std::fs::read_to_string(&serial).unwrap()).unwrap();
        wait_text(&serial, &format!("heartbeat {}\n", n + 2), Duration::from_secs(6));
    }

    /// The destination VMM of `vm` (shrink-migrate starts it in a host namespace of site B,
    /// which this test made): its process id and arguments.
    fn dest_vmm(&self, vm: &str) -> Option<(u32, Vec<String>)> {
        ["b1", "b2"].iter().flat_map(|h| self.world.processes(h)).find(|(_, args)| {
            args.iter().any(|a| a == "--incoming") && args.windows(2).any(|w| w[0] == "--name" && w[1] == vm)
        })
    }

    /// The address `vm`'s destination VMM is registered under in the site index.
    fn member(&self, vm: &str) -> String {
        let (_, args) = self.dest_vmm(vm).unwrap_or_else(|| panic!("{vm}: no destination VMM"));
        args.windows(2).find(|w| w[0] == "--peer-advertise").map(|w| w[1].clone()).expect("--peer-advertise")
    }

    /// `cmd` on `vm`'s destination VMM.
    fn dest(&self, vm: &str, cmd: &str, args: Value) -> Value {
        api(&self.path(&format!("{vm}-siteB.sock")), cmd, args)
    }

    /// The site-index counters of `vm`'s destination VMM.
    fn dest_site(&self, vm: &str) -> Value {
        self.dest(vm, "query-migrate", json!({}))["incoming"]["site"].clone()
    }

    /// The digests (hex) of every page of `vm`'s guest at its destination now.
    fn dest_pages(&self, vm: &str) -> HashSet<String> {
        let f = self.path(&format!("{vm}-siteB.pages"));
        self.dest(vm, "memory-digest", json!({"pages": f.to_str().unwrap()}));
        let bytes = std::fs::read(&f).unwrap();
        bytes.chunks(32).map(|d| d.iter().map(|b| format!("{b:02x}")).collect()).collect()
    }
}

/// Runs API command `cmd` on the VMM at `sock`.
fn api(sock: &Path, cmd: &str, args: Value) -> Value {
    ApiClient::connect(sock)
        .and_then(|mut c| c.execute(cmd, args))
        .unwrap_or_else(|e| panic!("{}: {cmd}: {e}", sock.display()))
        .unwrap_or_else(|e| panic!("{}: {cmd}: {e}", sock.display()))
}

/// What the site index at `host:port` holds: per member (a hypervisor's peer address), the
/// digests (hex) it is listed for. Read with one Lua script (the keys are binary).
fn index_members(world: &World, host: &str, port: u16) -> HashMap<String, HashSet<String>> {
    let prefix = std::str::from_utf8(INDEX_PREFIX).expect("the index prefix is text");
    // Lua strings are 1-based: the digest starts right after the prefix.
    let list = format!(
        "local out = {{}} \
        for _, k in ipairs(redis.call('KEYS', '{prefix}*')) do \
          local hex = string.gsub(string.sub(k, {}), '.', function(c) return string.format('%02x', string.byte(c)) end) \
          for _, m in ipairs(redis.call('SMEMBERS', k)) do out[#out + 1] = m .. ' ' .. hex end \
        end \
        return out",
        prefix.len() + 1
    );
    let text = world.redis_cli(host, port, &["EVAL", &list, "0"]).unwrap();
    let mut by_member: HashMap<String, HashSet<String>> = HashMap::new();
    for l in text.lines() {
        if let Some((m, d)) = l.trim().split_once(' ') {
            by_member.entry(m.to_owned()).or_default().insert(d.to_owned());
        }
    }
    by_member
}

impl Drop for Sites {
    fn drop(&mut self) {
        // Destination VMMs started through the launch template live in the namespaces, which
        // the World removes (killing what is inside).
        self.vms.clear();
    }
}

fn vm_cmdline(i: usize) -> String {
    format!("preload=32M private=1M seed={}", 1000 + i)
}

fn u(v: &Value) -> u64 {
    v.as_u64().unwrap_or(0)
}

#[test]
fn a_cluster_moves_with_dedup_for_far_fewer_wan_bytes_than_plain_precopy() {
    let mut s = Sites::new("sk");
    let names = ["vm1", "vm2", "vm3", "vm4"];
    let vc = s.simple_cluster(&names, vm_cmdline);
    let (code, r, err) = s.migrate(&vc, &[]);
    assert_eq!(code, 0, "{err}\n{r}");
    assert_eq!(u(&r["failed"]), 0, "{r}");
    for n in names {
        s.assert_moved(n);
        // Without a terminal, each VM's end is a line of its own.
        assert!(err.contains(&format!("shrink-migrate: {n}: completed in ")), "{err}");
    }
    // Pages shared by the VMs crossed once: the others found them at site B.
    assert!(u(&r["deduplicated"]) > 3 * 4000, "{r}");
    assert!(u(&r["fetched_from_peers"]) > 0, "VMs on the other host fetched from peers: {r}");
    // Every digest was resolved, but for the few whose page a later pass sent again in full.
    let resolved = u(&r["local"]) + u(&r["fetched_from_peers"]) + u(&r["pulled"]);
    assert!(resolved <= u(&r["deduplicated"]) && resolved + 50 >= u(&r["deduplicated"]), "{r}");

    // The same cluster, plain pre-copy.
    let names2 = ["pv1", "pv2", "pv3", "pv4"];
    for (i, n) in names2.iter().enumerate() {
        s.boot(n, &vm_cmdline(i));
    }
    for n in names2 {
        wait_text(&s.path(&format!("{n}.serial")), "heartbeat 1\n", Duration::from_secs(60));
    }
    let vc2 = s.vc(
        "vc-plain.toml",
        &names2,
        &format!("redis://{A1}:6379"),
        &format!("redis://{B1}:6380"),
        "ip netns exec {host} {cmd}",
    );
    let (code, plain, err) = s.migrate(&vc2, &["--no-dedup", "--port-base", "7600"]);
    assert_eq!(code, 0, "{err}\n{plain}");
    let (with, without) = (u(&r["wan_bytes"]) as f64, u(&plain["wan_bytes"]) as f64);
    eprintln!("WAN bytes: dedup {with:.0}, plain {without:.0} ({:.1} %)", with / without * 100.0);
    for v in r["vms"].as_array().unwrap() {
        eprintln!("{}: downtime {} ms, total {} ms", v["vm"], v["downtime_ms"], v["total_time_ms"]);
    }
    assert!(with < 0.6 * without, "dedup {with} vs plain {without}");
    assert_eq!(u(&plain["deduplicated"]), 0);
}

#[test]
fn the_destination_sites_repository_supplies_base_image_content_and_the_disks_move() {
    let mut s = Sites::new("sr2");
    let names = ["rp1", "rp2"];
    // Each guest reads 32 MiB of the base image into memory and writes its disk.
    let vc = s.simple_cluster(&names, |i| format!("{} workload=io iorate=512K ioarea=4M", vm_cmdline(i)));
    let (code, r, err) = s.migrate_with(&vc, &[]);
    assert_eq!(code, 0, "{err}\n{r}");
    assert_eq!(u(&r["failed"]), 0, "{r}");
    for n in names {
        s.assert_moved(n);
        // The guest's disk came along: it reads back what it wrote before the move.
        let serial = s.path(&format!("{n}-siteB.serial"));
        // Two reports at the destination: the second covers reads of blocks written before.
        let text = wait_until(&format!("{n}: two io reports at B"), Duration::from_secs(10), || {
            let t = std::fs::read_to_string(&serial).unwrap_or_default();
            (t.matches("io: read=").count() >= 2).then_some(t)
        });
        assert!(!text.contains("io: mismatch") && !text.contains("io: request failed"), "{n}: {text}");
        assert!(!s.path(&format!("siteA/disks/{n}.qcow2")).exists(), "{n}: its disk stays at site A");
        let ok = Command::new("qemu-img")
            .args(["check", "-U", "-q"])
            .arg(s.path(&format!("siteB/disks/{n}.qcow2")))
            .status()
            .unwrap();
        assert!(ok.success(), "{n}: qemu-img check");
    }
    // The preloaded pages are base-image content: digests, read from site B's own base image.
    assert!(u(&r["repository"]) > 2 * 4000, "{r}");
    assert!(u(&r["disk"]["full"]) + u(&r["disk"]["uniform"]) > 0, "{r}");
    // (The io workload rewrites blocks while they travel: a few digests find no holder.)
    assert!(u(&r["pulled"]) < 100, "{r}");
}

#[test]
fn a_redis_password_the_service_refuses_fails_the_move_and_is_never_shown() {
    let mut s = Sites::new("sw");
    let names = ["pw1"];
    let _ = s.simple_cluster(&names, vm_cmdline);
    s.world.redis_cli("a1", 6379, &["CONFIG", "SET", "requirepass", "right-one"]).unwrap();
    let vc = s.vc(
        "vc-pw.toml",
        &names,
        &format!("redis://:wrong-one@{A1}:6379"),
        &format!("redis://{B1}:6380"),
        "ip netns exec {host} {cmd}",
    );
    let (code, r, err) = s.migrate(&vc, &[]);
    assert_eq!(code, 1, "{err}\n{r}");
    let v = &r["vms"][0];
    assert_eq!(v["status"], "failed", "{r}");
    assert!(v["error"].as_str().unwrap().contains("refuses the password"), "{r}");
    let all = format!("{r}{err}");
    assert!(!all.contains("wrong-one"), "the password was shown: {all}");
    s.assert_still_at_source("pw1");
    // The destination VMM that run started is gone again.
    wait_until("the failed run's destination VMM to quit", Duration::from_secs(10), || {
        s.dest_vmm("pw1").is_none().then_some(())
    });
    // The right passwords, the index's too: the move goes through, and no password is on a
    // destination VMM's command line (it reads the index's URL from a private file).
    s.world.redis_cli("b1", 6380, &["CONFIG", "SET", "requirepass", "index-secret"]).unwrap();
    let vc = s.vc(
        "vc-pw2.toml",
        &names,
        &format!("redis://:right-one@{A1}:6379"),
        &format!("redis://:index-secret@{B1}:6380"),
        "ip netns exec {host} {cmd}",
    );
    let (code, r, err) = s.migrate(&vc, &["--port-base", "7300"]);
    assert_eq!(code, 0, "{err}\n{r}");
    s.assert_moved("pw1");
    let (_, argv) = s.dest_vmm("pw1").expect("the destination VMM runs");
    let argv = argv.join(" ");
    assert!(argv.contains("--index @") && !argv.contains("index-secret"), "{argv}");
    let all = format!("{r}{err}");
    assert!(!all.contains("right-one") && !all.contains("index-secret"), "a password was shown: {all}");
}

#[test]
fn intra_vm_duplicates_are_deduplicated_for_a_single_vm() {
    let mut s = Sites::new("si");
    let d = s.dir.path().to_owned();
    s.world.redis("a1", 6379, &d, false);
    s.world.redis("b1", 6380, &d, false);
    // The base image's first 64 MiB hold a few dozen duplicate pages.
    s.boot("solo", "preload=64M seed=7");
    s.wait_ready();
    let vc = s.vc(
        "vc.toml",
        &["solo"],
        &format!("redis://{A1}:6379"),
        &format!("redis://{B1}:6380"),
        "ip netns exec {host} {cmd}",
    );
    let (code, r, err) = s.migrate(&vc, &[]);
    assert_eq!(code, 0, "{err}\n{r}");
    let vm = &r["vms"][0];
    assert!(u(&vm["deduplicated"]) >= 40, "{vm}");
    assert_eq!(u(&vm["local"]), u(&vm["deduplicated"]), "found in its own memory: {vm}");
    assert_eq!(u(&vm["pulled"]), 0, "{vm}");
    s.assert_moved("solo");
}

#[test]
fn the_same_with_three_node_redis_clusters() {
    let mut s = Sites::new("sc");
    let d = s.dir.path().to_owned();
    let coordination = s.world.redis_cluster("a1", [7001, 7002, 7003], &d);
    let index = s.world.redis_cluster("b1", [7011, 7012, 7013], &d);
    let names = ["cv1", "cv2", "cv3"];
    for (i, n) in names.iter().enumerate() {
        s.boot(n, &vm_cmdline(i));
    }
    s.wait_ready();
    let vc = s.vc("vc.toml", &names, &coordination, &index, "ip netns exec {host} {cmd}");
    let (code, r, err) = s.migrate(&vc, &[]);
    assert_eq!(code, 0, "{err}\n{r}");
    assert!(u(&r["deduplicated"]) > 2 * 4000, "{r}");
    assert!(u(&r["fetched_from_peers"]) > 0, "{r}");
    for n in names {
        s.assert_moved(n);
    }
}

#[test]
fn faults_degrade_but_never_corrupt() {
    let mut s = Sites::new("sf");
    let d = s.dir.path().to_owned();
    let coord = s.world.redis("a1", 6379, &d, false);
    s.world.redis("b1", 6380, &d, false);

    // 1. Coordination Redis stopped before the migration: plain pre-copy, with a warning.
    s.boot("f1", &vm_cmdline(0));
    s.boot("f2", &vm_cmdline(1));
    s.wait_ready();
    s.world.kill_redis(coord);
    let vc = s.vc(
        "vc1.toml",
        &["f1", "f2"],
        &format!("redis://{A1}:6379"),
        &format!("redis://{B1}:6380"),
        "ip netns exec {host} {cmd}",
    );
    let (code, r, err) = s.migrate(&vc, &[]);
    assert_eq!(code, 0, "{err}\n{r}");
    assert_eq!(u(&r["deduplicated"]), 0, "{r}");
    assert!(r["vms"][0]["warnings"].to_string().contains("coordination"), "{r}");
    s.assert_moved("f1");
    s.assert_moved("f2");
    s.world.redis("a1", 6379, &d, false);

    // 2. One holder of the content serves corrupted chunks, another holder serves it right:
    //    the corrupt answers are caught by the digest check, and the chunks come from the
    //    honest holder instead of the source. An index of its own: the VMs moved in part 1
    //    still serve the same OS content.
    s.world.redis("b1", 6381, &d, false);
    let index2 = format!("redis://{B1}:6381");
    let id = format!("faults-{}", netns::unique_tag());
    // Wave 1: g1 and g2 move and both hold the shared content at site B.
    s.boot("g1", &vm_cmdline(2));
    s.boot("g2", &vm_cmdline(3));
    for n in ["g1", "g2"] {
        wait_text(&s.path(&format!("{n}.serial")), "heartbeat 1\n", Duration::from_secs(60));
    }
    let vc =
        s.vc_id("vc2.toml", &id, &["g1", "g2"], &format!("redis://{A1}:6379"), &index2, "ip netns exec {host} {cmd}");
    let (code, r, err) = s.migrate(&vc, &["--port-base", "7700"]);
    assert_eq!(code, 0, "{err}\n{r}");
    s.assert_moved("g1");
    s.assert_moved("g2");
    // g1 turns bad.
    s.dest("g1", "set-peer-corrupt", json!({"on": true}));
    let served = |s: &Sites, vm: &str| u(&s.dest_site(vm)["served"]);
    let (bad0, good0) = (served(&s, "g1"), served(&s, "g2"));
    // Wave 2: g3, joining wave 1's run (a migration id alone is not enough: every run
    // coordinates under a nonce of its own), so that its shared content crosses as digests
    // that g1 and g2 both hold.
    let run = r["run_id"].as_str().expect("the report names its run").to_owned();
    assert!(run.starts_with(&format!("{id}.")), "{run}");
    s.boot("g3", &vm_cmdline(4));
    wait_text(&s.path("g3.serial"), "heartbeat 1\n", Duration::from_secs(60));
    let vc = s.vc_id("vc2b.toml", &id, &["g3"], &format!("redis://{A1}:6379"), &index2, "ip netns exec {host} {cmd}");
    let (code, r, err) = s.migrate(&vc, &["--port-base", "7750", "--join-run", &run]);
    assert_eq!(code, 0, "{err}\n{r}");
    s.assert_moved("g3");
    let g3 = &r["vms"][0];
    let (bad, good) = (served(&s, "g1") - bad0, served(&s, "g2") - good0);
    let site = s.dest_site("g3");
    let (corrupt, next) = (u(&site["corrupt_from_peer"]), u(&site["next_holder"]));
    eprintln!("g3: {g3}\n{site}\ncorrupt holder served {bad}, honest holder served {good}");
    assert!(u(&g3["deduplicated"]) > 1000, "the shared content crossed as digests: {g3}");
    assert!(corrupt > 0, "the corrupt holder was asked and caught: {site}");
    assert_eq!(corrupt, bad, "every chunk the corrupt holder served was caught: {site}");
    assert!(next > 0, "chunks the corrupt holder failed on were fetched from the next holder: {site}");
    assert!(good >= next, "the honest holder served them ({good} chunks): {site}");
    assert!(
        u(&g3["pulled"]) < corrupt,
        "what the corrupt holder failed on came from the honest holder, not from the source: {g3}"
    );

    // 3. Every fallback down (no index, no pull): the VMs that need content from elsewhere fail
    //    cleanly and keep running at the source.
    s.boot("h1", &vm_cmdline(5));
    s.boot("h2", &vm_cmdline(6));
    for n in ["h1", "h2"] {
        wait_text(&s.path(&format!("{n}.serial")), "heartbeat 1\n", Duration::from_secs(60));
    }
    let vc = s.vc(
        "vc3.toml",
        &["h1", "h2"],
        &format!("redis://{A1}:6379"),
        &format!("redis://{B1}:6999"),
        "ip netns exec {host} env SHRINK_TEST_NO_PULL=1 {cmd}",
    );
    let (code, r, err) = s.migrate(&vc, &["--port-base", "7900"]);
    assert_ne!(code, 0, "{r}");
    let failed: Vec<&Value> = r["vms"]
        .as_array()
        .unwrap_or_else(|| panic!("no report: {err}"))
        .iter()
        .filter(|v| v["status"] != "completed")
        .collect();
    assert!(!failed.is_empty(), "{r}");
    for v in failed {
        assert!(v["error"].as_str().unwrap().contains("pulling from the source is off"), "{v}");
        s.assert_still_at_source(v["vm"].as_str().unwrap());
    }
}

#[test]
fn index_restart_and_a_dead_destination_during_the_migration() {
    let mut s = Sites::new("sr");
    let d = s.dir.path().to_owned();
    s.world.redis("a1", 6379, &d, false);
    let index = s.world.redis("b1", 6380, &d, false);
    let names = ["r1", "r2", "r3", "r4"];
    for (i, n) in names.iter().enumerate() {
        s.boot(n, &format!("preload=32M private=1M seed={} workload=mem mem=8M rate=1M", 2000 + i));
    }
    s.wait_ready();
    let vc = s.vc(
        "vc.toml",
        &names,
        &format!("redis://{A1}:6379"),
        &format!("redis://{B1}:6380"),
        "ip netns exec {host} {cmd}",
    );
    let vc2 = vc.clone();
    let migration = std::thread::spawn(move || {
        let out = Command::new(workspace_bin("shrink-migrate"))
            .args(["--cluster", vc2.to_str().unwrap(), "--dest", "siteB", "--json", "--verify", "--no-repository"])
            .output()
            .unwrap();
        (
            out.status.code(),
            serde_json::from_slice::<Value>(&out.stdout).unwrap_or(Value::Null),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    });
    // As soon as r1's destination VMM is up (its API socket exists: shrink-migrate waits for
    // it), kill it, by its process id, found in this test's namespaces.
    let (pid, _) = wait_until("r1's destination VMM starting", Duration::from_secs(30), || {
        s.path("r1-siteB.sock").exists().then(|| s.dest_vmm("r1")).flatten()
    });
    let killed = Command::new("kill").arg(pid.to_string()).status().unwrap();
    assert!(killed.success(), "r1's destination VMM (pid {pid}) was killed");

    // Kill the index Redis in the middle of the others' first pass, once a destination has
    // registered chunks: its source has more passes to come, so that destination uses the
    // index again while it is down, and must register again what it registered before.
    let others = ["r2", "r3", "r4"];
    let query = |sock: &str| -> Option<Value> {
        ApiClient::connect(&s.path(sock)).and_then(|mut c| c.execute("query-migrate", json!({}))).ok()?.ok()
    };
    // (A destination VMM shows its counters only once its guest runs: the index itself tells.)
    let (vm, phase, before) =
        wait_until("a source in its first pass whose destination registered chunks", Duration::from_secs(60), || {
            let keys: u64 = s.world.redis_cli("b1", 6380, &["DBSIZE"]).ok()?.trim().parse().ok()?;
            if keys == 0 {
                return None;
            }
            let members = index_members(&s.world, "b1", 6380);
            let found = others.iter().find_map(|n| {
                let q = query(&format!("{n}.sock"))?;
                let (_, args) = s.dest_vmm(n)?;
                let member = args.windows(2).find(|w| w[0] == "--peer-advertise").map(|w| w[1].clone())?;
                (q["status"] == "active"
                    && u(&q["ram"]["dirty-sync-count"]) == 0
                    && members.get(&member).is_some_and(|m| !m.is_empty()))
                .then(|| (n.to_string(), q))
            });
            found.map(|(n, q)| (n, q, members))
        });
    eprintln!("index Redis killed while {vm} migrates: {}", phase["ram"]);
    s.world.kill_redis(index);
    // That destination notices (its next index update fails); then the index comes back, empty.
    wait_until(&format!("{vm}'s destination VMM failing on the dead index"), Duration::from_secs(60), || {
        std::fs::read_to_string(s.path(&format!("{vm}-siteB.log")))
            .unwrap_or_default()
            .contains("index Redis failed")
            .then_some(())
    });
    eprintln!("{vm}'s destination saw the index fail");
    s.world.redis("b1", 6380, &d, false);

    let (code, r, err) = migration.join().unwrap();
    let vms = r["vms"].as_array().unwrap_or_else(|| panic!("{err}"));
    let r1 = vms.iter().find(|v| v["vm"] == "r1").unwrap();
    assert_ne!(r1["status"], "completed", "r1 lost its destination: {r}");
    s.assert_still_at_source("r1");
    for v in vms.iter().filter(|v| v["vm"] != "r1") {
        assert_eq!(v["status"], "completed", "{v}");
        s.assert_moved(v["vm"].as_str().unwrap());
    }
    assert_eq!(code, Some(1), "one VM failed");

    // The failures were counted, and the VMMs that used the index again after it came back
    // registered again everything they held: what each had registered before the restart and
    // still holds is in the new index under its address.
    let errors: u64 = vms.iter().map(|v| u(&v["index_errors"])).sum();
    assert!(errors > 0, "index errors reported: {r}");
    let after = index_members(&s.world, "b1", 6380);
    let (mut resynced, mut checked) = (Vec::new(), 0);
    for vm in others {
        let site = s.dest_site(vm);
        eprintln!("{vm}: {site}");
        if u(&site["resyncs"]) == 0 {
            continue;
        }
        resynced.push(vm);
        let member = s.member(vm);
        let held = s.dest_pages(vm);
        let expected: Vec<&String> =
            before.get(&member).map(|b| b.iter().filter(|d| held.contains(*d)).collect()).unwrap_or_default();
        let now = after.get(&member).cloned().unwrap_or_default();
        let missing = expected.iter().filter(|d| !now.contains(**d)).count();
        eprintln!("{vm} ({member}): {} chunks registered before the restart and held now", expected.len());
        checked += expected.len();
        assert_eq!(
            missing,
            0,
            "{vm} ({member}): {missing} of the {} chunks it registered before the index restart and still holds are not in the new index: {site}",
            expected.len()
        );
    }
    assert!(
        resynced.contains(&vm.as_str()),
        "{vm}'s destination did not re-register its chunks after the index restart: {r}"
    );
    assert!(checked > 0, "{resynced:?} had registered nothing before the restart");
}

/// Without a terminal, `shrink-migrate` prints a line per VM every 5 s and one when it ends. A
/// stream that stops moving (its destination VMM stopped for 16 s) is shown as stalled, and the
/// move completes once it moves again.
#[test]
fn without_a_terminal_progress_comes_as_lines_and_a_stalled_stream_says_so() {
    let mut s = Sites::new("sl");
    let vc = s.simple_cluster(&["st1"], |_| "preload=64M private=1M seed=77 workload=mem mem=16M rate=2M".into());
    let vc2 = vc.clone();
    let migration = std::thread::spawn(move || {
        Command::new(workspace_bin("shrink-migrate"))
            .args(["--cluster", vc2.to_str().unwrap(), "--dest", "siteB", "--json", "--no-repository"])
            .output()
            .unwrap()
    });
    let pid = wait_until("st1 sending its memory", Duration::from_secs(60), || {
        let q = ApiClient::connect(&s.path("st1.sock"))
            .and_then(|mut c| c.execute("query-migrate", json!({})))
            .ok()?
            .ok()?;
        (q["status"] == "active" && u(&q["ram"]["transferred"]) > 0).then(|| s.dest_vmm("st1")).flatten()
    })
    .0;
    assert!(Command::new("kill").args(["-STOP", &pid.to_string()]).status().unwrap().success());
    std::thread::sleep(Duration::from_secs(16));
    assert!(Command::new("kill").args(["-CONT", &pid.to_string()]).status().unwrap().success());
    let out = migration.join().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    let lines: Vec<&str> = err.lines().filter(|l| l.starts_with("shrink-migrate: st1: ")).collect();
    assert!(lines.iter().any(|l| l.contains(" pass ") && l.contains("% of memory")), "progress lines: {err}");
    assert!(
        lines.iter().any(|l| l.contains("STALLED: nothing sent for 1")),
        "the stopped stream shown as stalled (10 to 16 s): {err}"
    );
    assert!(lines.last().is_some_and(|l| l.contains("completed in ")), "{err}");
    s.assert_moved("st1");
}

#[test]
fn a_malformed_cluster_description_names_the_line_and_field() {
    let dir = TempDir::new("svc").unwrap();
    let p = dir.path().join("vc.toml");
    std::fs::write(
        &p,
        "plain_tcp = true\n[[sites]]\nname = \"siteA\"\ncoordination = \"redis://x:1\"\nindex = \"redis://x:2\"\nlaunch = \"{cmd}\"\n[[sites.hosts]]\nname = \"a\"\naddress = \"10.0.0.1\"\n\n[[sites]]\nname = \"siteB\"\ncoordination = \"redis://y:1\"\nindex = \"mysql://y:2\"\nlaunch = \"{cmd}\"\n[[sites.hosts]]\nname = \"b\"\naddress = \"10.0.0.2\"\n\n[[vms]]\nname = \"v\"\nhost = \"a\"\napi = \"/x\"\n",
    )
    .unwrap();
    let out = Command::new(workspace_bin("shrink-migrate"))
        .args(["--cluster", p.to_str().unwrap(), "--dest", "siteB"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1));
    assert!(err.contains("vc.toml:14: sites[1].index: bad Redis URL \"mysql://y:2\""), "{err}");
    let out = Command::new(workspace_bin("shrink-migrate"))
        .args(["--cluster", p.to_str().unwrap(), "--dest", "siteC"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("index"), "bad file first");
}

#[test]
fn sub_page_chunks_deduplicate_at_their_granularity() {
    let mut s = Sites::new("sp");
    let d = s.dir.path().to_owned();
    s.world.redis("a1", 6379, &d, false);
    s.world.redis("b1", 6380, &d, false);
    s.boot("sub1", "preload=16M private=1M seed=11");
    s.boot("sub2", "preload=16M private=1M seed=12");
    s.wait_ready();
    let vc = s.vc(
        "vc.toml",
        &["sub1", "sub2"],
        &format!("redis://{A1}:6379"),
        &format!("redis://{B1}:6380"),
        "ip netns exec {host} {cmd}",
    );
    let (code, r, err) = s.migrate(&vc, &["--chunk", "1024", "--digest", "sha1"]);
    assert_eq!(code, 0, "{err}\n{r}");
    assert_eq!(r["chunk"], 1024, "{r}");
    assert_eq!(r["digest"], "sha1", "{r}");
    // Counted in 1 KiB chunks: the image's first 16 MiB hold about 3.4 MB of non-uniform data,
    // shared by both VMs, so a couple of thousand chunks cross once.
    assert!(u(&r["deduplicated"]) > 1500, "{r}");
    assert!(u(&r["fetched_from_peers"]) + u(&r["local"]) > 1500, "{r}");
    for n in ["sub1", "sub2"] {
        s.assert_moved(n);
    }
}
