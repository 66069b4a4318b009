//! Live storage migration between two shrink-vmm processes, each site with its own copy of the
//! base image and its own overlay directory: real guests writing their disks during the
//! migration, real qcow2 files checked with `qemu-img`, a real `redis-server` for the
//! repository index and the deduplication.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use hypervisor::devices::virtio::block;
use serde_json::json;
use shrink_testutil::ports::free_port;
use shrink_testutil::redis::RedisServer;

const BOOT: Duration = Duration::from_secs(20);

fn run(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd).args(args).output().unwrap_or_else(|e| panic!("{cmd}: {e}"));
    assert!(
        out.status.success(),
        "{cmd} {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A base image at `path` whose first 8 MiB hold pseudo-random content (from `seed`), the rest
/// unallocated.
fn make_base(path: &Path, seed: u64) {
    let raw = path.with_extension("raw");
    let mut rng = shrink_testutil::util::XorShift::new(seed);
    let mut data: Vec<u8> = (0..(8 << 20) / 8).flat_map(|_| rng.next_u64().to_le_bytes()).collect();
    data.resize(64 << 20, 0);
    std::fs::write(&raw, &data).unwrap();
    run("qemu-img", &["convert", "-q", "-f", "raw", "-O", "qcow2", raw.to_str().unwrap(), path.to_str().unwrap()]);
    std::fs::remove_file(&raw).unwrap();
}

/// Two sites' storage: `siteA/base.qcow2` and `siteB/base.qcow2` (the same content unless
/// `other_base`), and each site's overlay directory.
struct Sites {
    dir: TempDir,
}

impl Sites {
    fn new(tag: &str, other_base: bool) -> Sites {
        let dir = TempDir::new(tag).unwrap();
        for s in ["siteA", "siteB"] {
            std::fs::create_dir_all(dir.path().join(s)).unwrap();
        }
        make_base(&dir.path().join("siteA/base.qcow2"), 7);
        if other_base {
            make_base(&dir.path().join("siteB/base.qcow2"), 99);
        } else {
            std::fs::copy(dir.path().join("siteA/base.qcow2"), dir.path().join("siteB/base.qcow2")).unwrap();
        }
        Sites { dir }
    }
    fn p(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }
    fn s(&self, rel: &str) -> String {
        self.p(rel).display().to_string()
    }
}

/// Boots the source guest on site A's storage: the io workload writes its disk (reading back
/// and checking what it wrote) at `iorate`, `preload` reads the base image into memory.
fn source(sites: &Sites, cmdline: &str) -> VmProcess {
    source_in(None, sites, cmdline)
}

/// [`source`] in network namespace `ns`.
fn source_in(ns: Option<&str>, sites: &Sites, cmdline: &str) -> VmProcess {
    let g = guest();
    let (base, ov) = (sites.s("siteA/base.qcow2"), sites.s("siteA/vm.qcow2"));
    let args = [
        "--kernel",
        g.to_str().unwrap(),
        "--mem",
        "128M",
        "--cmdline",
        cmdline,
        "--name",
        "vm",
        "--image",
        &base,
        "--disk",
        &ov,
    ];
    let src = VmProcess::spawn_in(ns, sites.dir.path(), "src", &args, &[]);
    src.wait_for("heartbeat 2\n", BOOT);
    src
}
fn destination(sites: &Sites, uri: &str, extra: &[&str], env: &[(&str, &str)]) -> VmProcess {
    let (base, ov) = (sites.s("siteB/base.qcow2"), sites.s("siteB/vm.qcow2"));
    let mut args = vec!["--incoming", uri, "--image", &base, "--disk", &ov];
    args.extend_from_slice(extra);
    VmProcess::spawn_in(None, sites.dir.path(), "dst", &args, env)
}

/// `qemu-img check` accepts the image.
fn check(path: &Path) {
    run("qemu-img", &["check", "-U", "-q", path.to_str().unwrap()]);
}

/// The guest's io workload read back what it wrote, and kept working after the migration.
fn io_is_sound(vm: &VmProcess) {
    vm.wait_for("heartbeat ", Duration::from_secs(10));
    let n = vm.last_heartbeat().unwrap();
    vm.wait_for(&format!("heartbeat {}\n", n + 2), Duration::from_secs(10));
    let text = vm.serial_text();
    assert!(!text.contains("io: mismatch") && !text.contains("io: request failed"), "{text}");
    // Complete lines only: the guest may be writing the last one.
    let complete = &text[..text.rfind('\n').map_or(0, |i| i + 1)];
    let reads: Vec<u64> =
        complete.lines().filter_map(|l| l.strip_prefix("io: read=")?.split_whitespace().next()?.parse().ok()).collect();
    assert!(reads.len() >= 2 && reads[reads.len() - 1] > reads[0], "the io workload goes on: {reads:?}");
}

#[test]
fn a_writing_guests_disk_moves_with_it_and_matches_the_source_at_the_switch_over() {
    let sites = Sites::new("stor-live", false);
    let uri = format!("tcp:127.0.0.1:{}", free_port());
    // The destination holds its verdict for 3 s once everything has arrived: the source is
    // paused then, and both overlays are as they were at the switch-over.
    let dst = destination(&sites, &uri, &[], &[("SHRINK_TEST_STALL_BEFORE_VERDICT_MS", "3000")]);
    let src = source(&sites, "workload=io iorate=2M ioarea=8M preload=4M");
    src.exec("migrate", json!({"uri": uri, "verify": true, "max_bandwidth": 20_000_000}));
    // Wait for the stall (the source paused), then compare the two disks as the guest sees them.
    shrink_testutil::util::wait_until("the switch-over", Duration::from_secs(60), || {
        (src.exec("status", json!({}))["state"] == "paused").then_some(())
    });
    // The source is paused: its disk is as at the switch-over. The destination's becomes equal
    // once it has installed the last pass and flushed (before its 3 s stall); no moment of the
    // stall may show it different.
    let copy = sites.p("siteB/at-switch-over.qcow2");
    let compare = || {
        std::fs::copy(sites.p("siteB/vm.qcow2"), &copy).unwrap();
        Command::new("qemu-img")
            .args(["compare", "-U", "-f", "qcow2", "-F", "qcow2"])
            .arg(sites.p("siteA/vm.qcow2"))
            .arg(&copy)
            .output()
            .unwrap()
    };
    let t = Instant::now();
    let mut cmp = compare();
    while !cmp.status.success() && t.elapsed() < Duration::from_millis(2000) {
        std::thread::sleep(Duration::from_millis(100));
        cmp = compare();
    }
    assert!(cmp.status.success(), "guest-visible content differs: {}", String::from_utf8_lossy(&cmp.stdout));
    std::thread::sleep(Duration::from_millis(300));
    let again = compare();
    assert!(again.status.success(), "it changed during the stall: {}", String::from_utf8_lossy(&again.stdout));
    let info = wait_migration(&src, Duration::from_secs(60));
    assert_eq!(info["status"], "completed", "{info}");
    let disk = &info["disk"];
    assert_eq!(disk["held"], json!([true]), "{info}");
    assert_eq!(disk["total"].as_u64(), Some(64 << 20), "{info}");
    // Only the overlay's own blocks crossed (the io area and what it touched), not the base.
    assert!(disk["normal"].as_u64().unwrap() < 8 << 20 >> 12, "{info}");
    assert!(disk["normal"].as_u64().unwrap() > 0, "{info}");
    let dst_q = dst.exec("query-migrate", json!({}));
    assert!(dst_q["incoming"]["disk_entries"].as_u64().unwrap() > 0, "{dst_q}");
    check(&sites.p("siteB/vm.qcow2"));
    let backing = run("qemu-img", &["info", "-U", sites.s("siteB/vm.qcow2").as_str()]);
    assert!(backing.contains(&sites.s("siteB/base.qcow2")), "the new overlay is on site B's base: {backing}");
    io_is_sound(&dst);
    // Site A's files were never written by the destination: its base is as made.
    check(&sites.p("siteA/vm.qcow2"));
}

#[test]
fn a_destination_with_another_base_image_gets_the_whole_disk_in_a_standalone_image() {
    let sites = Sites::new("stor-other", true);
    let uri = format!("tcp:127.0.0.1:{}", free_port());
    let dst = destination(&sites, &uri, &[], &[]);
    let src = source(&sites, "workload=io iorate=1M ioarea=4M preload=2M");
    src.exec("migrate", json!({"uri": uri}));
    let info = wait_migration(&src, Duration::from_secs(90));
    assert_eq!(info["status"], "completed", "{info}");
    assert_eq!(info["disk"]["held"], json!([false]), "{info}");
    let warning = info["disk"]["warning"].as_str().unwrap_or_default();
    assert!(warning.contains("disk 0") && warning.contains("travels too"), "{info}");
    // The base's 8 MiB of pattern crossed too.
    assert!(info["disk"]["normal"].as_u64().unwrap() >= 8 << 20 >> 12, "{info}");
    check(&sites.p("siteB/vm.qcow2"));
    let meta = run("qemu-img", &["info", "-U", sites.s("siteB/vm.qcow2").as_str()]);
    assert!(!meta.contains("backing file"), "standalone: {meta}");
    io_is_sound(&dst);
}

#[test]
fn a_failed_or_cancelled_disk_migration_leaves_the_source_intact_and_no_partial_overlay() {
    let sites = Sites::new("stor-fail", false);
    // Cancelled mid-way: the destination removes the overlay it began.
    let uri = format!("tcp:127.0.0.1:{}", free_port());
    let mut dst = destination(&sites, &uri, &[], &[]);
    let src = source(&sites, "workload=io iorate=1M ioarea=8M preload=4M");
    src.exec("migrate", json!({"uri": uri, "max_bandwidth": 1_000_000}));
    shrink_testutil::util::wait_until("the overlay begun at B", Duration::from_secs(30), || {
        sites.p("siteB/vm.qcow2").exists().then_some(())
    });
    src.exec("migrate_cancel", json!({}));
    let info = wait_migration(&src, Duration::from_secs(30));
    assert_eq!(info["status"], "cancelled", "{info}");
    let _ = dst.wait_exit(Duration::from_secs(10));
    assert!(!sites.p("siteB/vm.qcow2").exists(), "the partial overlay was removed");
    // The destination refuses an overlay that exists (a new file is written, nothing overwritten).
    std::fs::write(sites.p("siteB/vm.qcow2"), b"precious").unwrap();
    let uri = format!("tcp:127.0.0.1:{}", free_port());
    let mut dst = destination(&sites, &uri, &[], &[]);
    src.exec("migrate", json!({"uri": uri}));
    let info = wait_migration(&src, Duration::from_secs(30));
    assert_eq!(info["status"], "failed", "{info}");
    assert!(info["error-desc"].as_str().unwrap().contains("already exists"), "{info}");
    let _ = dst.wait_exit(Duration::from_secs(10));
    assert_eq!(std::fs::read(sites.p("siteB/vm.qcow2")).unwrap(), b"precious", "nothing overwritten");
    std::fs::remove_file(sites.p("siteB/vm.qcow2")).unwrap();
    // Killed during the passes: the guest goes on at the source with its disk.
    let uri = format!("tcp:127.0.0.1:{}", free_port());
    let mut dst = destination(&sites, &uri, &[], &[]);
    src.exec("migrate", json!({"uri": uri, "max_bandwidth": 1_000_000}));
    shrink_testutil::util::wait_until("the overlay begun at B", Duration::from_secs(30), || {
        sites.p("siteB/vm.qcow2").exists().then_some(())
    });
    std::thread::sleep(Duration::from_millis(500));
    dst.child.kill().unwrap();
    let info = wait_migration(&src, Duration::from_secs(40));
    assert_eq!(info["status"], "failed", "{info}");
    io_is_sound(&src);
    assert_eq!(src.exec("status", json!({}))["state"], "running");
    src.exec("pause", json!({}));
    check(&sites.p("siteA/vm.qcow2"));
}

#[test]
fn base_image_content_comes_from_the_destinations_repository() {
    let Ok(redis) = RedisServer::start() else {
        panic!("redis-server is needed (package redis-server)");
    };
    let sites = Sites::new("stor-repo", false);
    // Index both sites' repositories (one Redis plays both sites' index here).
    for s in ["siteA", "siteB"] {
        let path = sites.p(&format!("{s}/base.qcow2"));
        let img = block::open_read_only(&path).unwrap();
        let idx =
            indexd::repo::RepoIndex::build(img.size(), indexd::hash::Algo::Sha256, 4096, &mut |o, b| img.read(b, o))
                .unwrap();
        let mut r = indexd::redis::Redis::connect(&indexd::redis::Target::parse(&redis.url()).unwrap()).unwrap();
        indexd::repo::publish(&mut r, &path, &idx).unwrap();
    }
    let uri = format!("tcp:127.0.0.1:{}", free_port());
    let peer = format!("127.0.0.1:{}", free_port());
    let dst = destination(&sites, &uri, &["--index", &redis.url(), "--peer-listen", &peer], &[]);
    // The guest reads 4 MiB of the base image into memory: those pages are base content.
    let src = source(&sites, "workload=io iorate=1M ioarea=4M preload=4M");
    // As `shrink-migrate --vm --repository URL` asks it: one VM alone, no coordination.
    src.exec(
        "migrate",
        json!({"uri": uri, "verify": true, "repository": redis.url(),
               "dedup": {"coordination": "", "migration_id": "single", "dest_site": "destination"}}),
    );
    let info = wait_migration(&src, Duration::from_secs(60));
    assert_eq!(info["status"], "completed", "{info}");
    let from_repo = info["dedup"]["repository"].as_u64().unwrap();
    assert!(from_repo >= 1000, "the preloaded pages travelled as digests: {info}");
    assert_eq!(info["dedup"]["degraded"].as_u64(), Some(0), "no coordination is not a failed one: {info}");
    assert!(info["dedup"]["warning"].is_null(), "{info}");
    let q = dst.exec("query-migrate", json!({}));
    let site = &q["incoming"]["site"];
    assert!(site["repository"].as_u64().unwrap() >= 1000, "{q}");
    assert_eq!(q["incoming"]["pulled"].as_u64(), Some(0), "{q}");
    assert!(!dst.stderr_text().contains("read the whole image"), "the index was used: {}", dst.stderr_text());
    check(&sites.p("siteB/vm.qcow2"));
    io_is_sound(&dst);
}

#[test]
fn a_link_dropped_in_the_last_pass_leaves_the_guest_and_its_disk_at_the_source_only() {
    use shrink_testutil::netns::{self, Netns};
    netns::available().unwrap();
    let t = netns::unique_tag();
    let (a, b) = (Netns::new(&format!("sta{t}")).unwrap(), Netns::new(&format!("stb{t}")).unwrap());
    netns::link(&a, "10.98.0.1/24", &b, "10.98.0.2/24", None).unwrap();
    let sites = Sites::new("stor-link", false);
    let uri = "tcp:10.98.0.2:7000";
    // Everything has arrived and the source is paused, waiting for the verdict, when the link
    // goes down: the destination holds its verdict 6 s, the source gives up after 2.5 s.
    let (base, ov) = (sites.s("siteB/base.qcow2"), sites.s("siteB/vm.qcow2"));
    let mut dst = VmProcess::spawn_in(
        Some(b.name()),
        sites.dir.path(),
        "dst",
        &["--incoming", uri, "--image", &base, "--disk", &ov],
        &[("SHRINK_TEST_STALL_BEFORE_VERDICT_MS", "6000")],
    );
    let src = source_in(Some(a.name()), &sites, "workload=io iorate=1M ioarea=8M preload=4M");
    src.exec("migrate", json!({"uri": uri, "verdict_timeout_ms": 2500}));
    shrink_testutil::util::wait_until("the switch-over", Duration::from_secs(60), || {
        (src.exec("status", json!({}))["state"] == "paused").then_some(())
    });
    for ns in [&a, &b] {
        let links = ns.exec(&["ip", "-o", "link", "show"]).unwrap();
        for l in links.lines() {
            let name = l.split(':').nth(1).unwrap_or("").trim().split('@').next().unwrap_or("").to_owned();
            if name.starts_with("va") || name.starts_with("vb") {
                ns.exec(&["ip", "link", "set", &name, "down"]).unwrap();
            }
        }
    }
    let info = wait_migration(&src, Duration::from_secs(30));
    assert_eq!(info["status"], "failed", "{info}");
    // The guest runs at the source, exactly once: its disk is sound and it goes on using it.
    io_is_sound(&src);
    assert_eq!(src.exec("status", json!({}))["state"], "running");
    // The destination never starts it: without the source's Commit it gives up, and removes
    // the disk it wrote (its unacknowledged verdict gives the connection up after 45 s).
    let _ = dst.wait_exit(Duration::from_secs(90));
    assert!(!dst.serial_text().contains("heartbeat"), "the guest started at the destination too");
    assert!(!sites.p("siteB/vm.qcow2").exists(), "the partial overlay was removed");
    src.exec("pause", json!({}));
    check(&sites.p("siteA/vm.qcow2"));
}
