//! Dirty tracking through the library, with a real guest: every page the guest reports
//! writing is in the dirty log, and an idle guest dirties only a handful of pages.

use std::time::{Duration, Instant};

use hypervisor::config::{SerialOutput, VmConfig};
use hypervisor::devices::serial::SharedBuffer;
use hypervisor::loader::KernelConfig;
use hypervisor::vmm::Vmm;

#[path = "common/mod.rs"]
mod common;

fn boot(cmdline: &str, mem: u64) -> (Vmm, SharedBuffer) {
    let buf = SharedBuffer::default();
    let cfg = VmConfig {
        name: "dirty".into(),
        mem_size: mem,
        kernel: KernelConfig { kernel: common::guest(), initrd: None, cmdline: cmdline.into() },
        serial: SerialOutput::Buffer(buf.clone()),
        start_paused: false,
        net: Vec::new(),
        disk: None,
    };
    let vmm = Vmm::boot(&cfg).expect("boot");
    (vmm, buf)
}

fn wait_for(buf: &SharedBuffer, needle: &str) {
    let start = Instant::now();
    while !buf.text().contains(needle) {
        assert!(start.elapsed() < Duration::from_secs(20), "no {needle:?}: {}", buf.text());
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn every_page_the_guest_writes_is_in_the_dirty_log() {
    let (mut vmm, buf) = boot("workload=mem mem=8M rate=256K memtrace=1", 128 << 20);
    wait_for(&buf, "wrote 0x");
    vmm.start_dirty_log().unwrap();
    let mark = buf.text().len();
    let mut log = vmm.dirty_log().unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    log.merge(&vmm.dirty_log().unwrap());
    std::thread::sleep(Duration::from_millis(1000));
    vmm.pause().unwrap();
    log.merge(&vmm.dirty_log().unwrap());
    let text = buf.text();
    // The first report after logging started may describe a write made just before it.
    let reported: Vec<u64> = text[mark..]
        .lines()
        .filter_map(|l| l.strip_prefix("wrote 0x"))
        .filter_map(|h| u64::from_str_radix(h.trim(), 16).ok())
        .skip(1)
        .collect();
    assert!(reported.len() > 100, "too few writes reported: {}", reported.len());
    let missing: Vec<_> = reported.iter().filter(|&&p| !log.is_dirty(p)).collect();
    assert!(
        missing.is_empty(),
        "{} of {} written pages not in the dirty log: {:x?}",
        missing.len(),
        reported.len(),
        &missing[..missing.len().min(8)]
    );
    // The log is not simply everything.
    assert!(log.count() < 2 * reported.len() + 64, "dirty {} for {} written", log.count(), reported.len());
    vmm.shutdown();
}

#[test]
fn an_idle_guest_dirties_only_a_handful_of_pages_per_second() {
    let (mut vmm, buf) = boot("workload=idle", 128 << 20);
    wait_for(&buf, "heartbeat 1\n");
    vmm.start_dirty_log().unwrap();
    vmm.dirty_log().unwrap();
    std::thread::sleep(Duration::from_secs(3));
    let log = vmm.dirty_log().unwrap();
    let per_second = log.count() as f64 / 3.0;
    assert!(per_second < 32.0, "idle guest dirtied {} pages in 3 s", log.count());
    assert!(log.count() > 0, "an idle guest still writes its tick counter and stack");
    // Stopping the log stops KVM's part; the VMM's own writes are still seen.
    vmm.stop_dirty_log().unwrap();
    vmm.shutdown();
}
