//! Dirty tracking through the library, with a real guest: every page the guest reports
//! writing is in the dirty log, and an idle guest dirties only a handful of pages.

use std::time::Duration;

use hypervisor::config::{SerialOutput, VmConfig};
use hypervisor::devices::serial::SharedBuffer;
use hypervisor::loader::KernelConfig;
use hypervisor::vmm::Vmm;
use shrink_testutil::util::wait_until;
use vm_memory::{Bytes, GuestAddress};

#[path = "common/mod.rs"]
mod common;

fn boot(cmdline: &str, mem: u64) -> (Vmm, SharedBuffer) {
    let buf = SharedBuffer::default();
    let cfg = VmConfig {
        name: "dirty".into(),
        mem_size: mem,
        vcpus: 1,
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
    wait_until(&format!("{needle:?} on the console"), Duration::from_secs(20), || {
        buf.text().contains(needle).then_some(())
    });
}

/// The guest's `memtrace` reports (`wrote 0x<gpa>`) in `text`, complete lines only: a guest
/// paused in the middle of a report has printed part of an address.
fn reported_writes(text: &str) -> Vec<u64> {
    let complete = text.rfind('\n').map_or("", |end| &text[..end]);
    complete
        .lines()
        .filter_map(|l| l.strip_prefix("wrote 0x"))
        .filter_map(|h| u64::from_str_radix(h.trim(), 16).ok())
        .collect()
}

#[test]
fn every_page_the_guest_writes_is_in_the_dirty_log() {
    let (mut vmm, buf) = boot("workload=mem mem=8M rate=256K memtrace=1", 128 << 20);
    wait_for(&buf, "wrote 0x");
    vmm.start_dirty_log().unwrap();
    let mark = buf.text().len();
    let mut log = vmm.dirty_log().unwrap();
    // Two fetches of the log, each after the guest has reported more writes.
    for more in [150, 300] {
        wait_until(&format!("{more} writes reported by the guest"), Duration::from_secs(60), || {
            (reported_writes(&buf.text()[mark..]).len() >= more).then_some(())
        });
        log.merge(&vmm.dirty_log().unwrap());
    }
    vmm.pause().unwrap();
    log.merge(&vmm.dirty_log().unwrap());
    let text = buf.text();
    // The first report after logging started may describe a write made just before it.
    let reported: Vec<u64> = reported_writes(&text[mark..]).into_iter().skip(1).collect();
    assert!(reported.len() >= 299, "too few writes reported: {}", reported.len());
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
fn an_idle_guest_dirties_only_a_handful_of_pages_and_the_vmms_own_writes_outlive_the_log() {
    let (mut vmm, buf) = boot("workload=idle", 128 << 20);
    wait_for(&buf, "heartbeat 1\n");
    vmm.start_dirty_log().unwrap();
    vmm.dirty_log().unwrap();
    // Two heartbeats of guest time: its tick counter, stack and serial buffers, nothing more.
    wait_for(&buf, "heartbeat 3\n");
    let log = vmm.dirty_log().unwrap();
    assert!(log.count() > 0, "an idle guest still writes its tick counter and stack");
    assert!(log.count() < 64, "an idle guest dirtied {} pages in two heartbeats", log.count());
    // Stopping the log stops KVM's part: the guest's writes are no longer seen. The VMM's own
    // writes (devices, migration) go through vm-memory's bitmap and still are.
    vmm.stop_dirty_log().unwrap();
    vmm.dirty_log().unwrap();
    let gpa = (128 << 20) - 4096;
    vmm.memory().write_obj(0x5eed_u64, GuestAddress(gpa)).unwrap();
    wait_for(&buf, "heartbeat 5\n");
    let after = vmm.dirty_log().unwrap();
    assert!(after.is_dirty(gpa), "the VMM's own write at {gpa:#x} is not in the log");
    assert_eq!(after.count(), 1, "only the VMM's write, not the guest's, once logging stopped");
    vmm.shutdown();
}
