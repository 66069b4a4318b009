//! `shrink-bench --quick`: one small point of every family of the evaluation, so the harness
//! that `make bench` runs keeps working (the figures themselves belong to `make bench`).

use std::process::Command;

use serde_json::Value;
use shrink_testutil::netns;

fn u(v: &Value) -> u64 {
    v.as_u64().unwrap_or(0)
}

/// Removes the bench's testbed if the test fails half-way.
struct Down(String);
impl Drop for Down {
    fn drop(&mut self) {
        let _ = shrink_tools::testbed::down(&self.0, &shrink_tools::testbed::default_dir(&self.0));
    }
}

#[test]
fn the_quick_evaluation_measures_every_family_and_draws_the_plots() {
    netns::available().unwrap();
    let name = format!("bq{}", netns::unique_tag());
    let _down = Down(name.clone());
    assert!(
        shrink_testutil::qemu::binary().is_some(),
        "qemu-system-x86_64 is needed for the baseline (make deps installs it)"
    );
    let out = std::env::temp_dir().join(format!("shrink-bench-quick-{name}"));
    let _ = std::fs::remove_dir_all(&out);
    let r = Command::new(env!("CARGO_BIN_EXE_shrink-bench"))
        .args(["--quick", "--name", &name, "--out", out.to_str().unwrap()])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&r.stderr);
    assert!(r.status.success(), "{err}");
    let doc: Value = serde_json::from_str(&std::fs::read_to_string(out.join("eval.json")).unwrap()).unwrap();
    let points = doc["points"].as_array().unwrap();
    let families: Vec<&str> = points.iter().map(|p| p["family"].as_str().unwrap()).collect();
    assert_eq!(
        families,
        ["size", "workload", "workload", "bandwidth", "granularity", "latency", "tls", "tls"],
        "{err}"
    );
    let transports: Vec<&str> = points.iter().map(|p| p["transport"].as_str().unwrap()).collect();
    assert_eq!(transports, ["tls", "tls", "tls", "tls", "tls", "tls", "tls", "plain"], "TLS unless measured without");
    // The latency family's WAN holds every frame 20 ms each way; the others' add nothing.
    for p in points {
        let (delay, rtt_min) = (u(&p["wan_delay_ms"]), p["wan_rtt_ms"]["min"].as_f64().unwrap());
        assert_eq!(delay, if p["family"] == "latency" { 20 } else { 0 }, "{p:#}");
        if delay > 0 {
            assert!(rtt_min >= 2.0 * delay as f64, "the delay line delays: {}", p["wan_rtt_ms"]);
        } else {
            assert!(rtt_min < 20.0, "no delay line: {}", p["wan_rtt_ms"]);
        }
    }
    for p in points {
        assert!(p.get("error").is_none(), "{p:#}");
        let s = &p["shrink"];
        assert_eq!((s["ok"].as_bool(), u(&s["failed"])), (Some(true), 0), "{p:#}");
        assert!(u(&s["wan_link_bytes"]) >= u(&s["wan_bytes"]), "the stream crossed the shaped WAN: {s:#}");
        assert!(s["machine_cpu_s"].as_f64().unwrap() > 0.0, "{s:#}");
        for n in s["network"].as_array().unwrap() {
            assert_eq!(n["answering"], true, "{n}");
            assert!(
                n["detection_ms"].as_f64().is_some() && n["reconfiguration_ms"].as_f64().is_some(),
                "vnetd saw the move: {n}"
            );
        }
        if p["family"] == "granularity" || p["family"] == "tls" {
            assert!(p["no_dedup"].is_null() && p["qemu"].is_null() && p["qemu_zstd"].is_null());
            assert_eq!(u(&p["chunk"]), if p["family"] == "tls" { 4096 } else { 1024 });
        } else {
            assert_eq!(p["no_dedup"]["ok"], true, "{p:#}");
            for n in p["no_dedup"]["network"].as_array().unwrap() {
                assert_eq!(n["answering"], true, "back at site A: {n}");
            }
            // Both live QEMU variants moved every VM, and the network saw each move: the
            // guests answer at site B, vnetd detected them from QEMU's own RARP.
            for key in ["qemu", "qemu_zstd"] {
                let q = &p[key];
                assert!(q.is_object() && u(&q["failed"]) == 0, "{key}: {p:#}");
                assert_eq!(q["vms"].as_array().unwrap().len() as u64, u(&p["vms"]), "{key}: {q:#}");
                assert!(u(&q["wan_net_bytes"]) > 0, "{key}: {q:#}");
                assert!(q["vms"].as_array().unwrap().iter().all(|v| v["downtime_ms"].is_u64()), "{key}: {q:#}");
                for n in q["network"].as_array().unwrap() {
                    assert_eq!(n["answering"], true, "{key}: {n}");
                    assert_eq!(n["detected"], true, "{key}: vnetd saw QEMU's RARP: {n}");
                }
            }
            // multifd + zstd compresses: fewer bytes on the link than plain QEMU for the same
            // guests (their private memory is random, their OS content and zero pages are not).
            assert!(u(&p["qemu_zstd"]["wan_net_bytes"]) < u(&p["qemu"]["wan_net_bytes"]), "{p:#}");
        }
    }
    // Two idle VMs from one image: dedup sends less than plain pre-copy, and no less than the bound
    // (an uncompressed bound: what compression saved counts back).
    let size = &points[0];
    assert!(u(&size["shrink"]["wan_bytes"]) < u(&size["no_dedup"]["wan_bytes"]), "{size:#}");
    let saved = u(&size["shrink"]["report"]["compression_saved_bytes"]);
    assert!(u(&size["shrink"]["wan_bytes"]) + saved >= u(&size["lower_bound"]["bytes"]), "{size:#}");
    assert!(u(&size["shrink"]["deduplicated"]) > 0);
    assert!(doc["source_pipeline"]["hash_and_coordination_pages_per_s"].as_f64().unwrap() > 0.0);
    for f in [
        "fig-size.png",
        "fig-workload-time.png",
        "fig-workload-bytes.png",
        "fig-bandwidth.png",
        "fig-granularity.png",
        "fig-tls.png",
        "fig-latency.png",
        "fig-network.png",
    ] {
        let b = std::fs::read(out.join(f)).unwrap_or_else(|e| panic!("{f}: {e}"));
        assert_eq!(&b[..4], b"\x89PNG", "{f}");
    }
    assert!(shrink_tools::testbed::namespaces(&name).is_empty(), "the bench left its testbed up");
    let _ = std::fs::remove_dir_all(&out);
}
