//! A bus of address ranges (port I/O or MMIO) mapped to devices.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// A device on a bus: accesses come with the offset from the device's base.
pub trait BusDevice: Send {
    /// A guest read of `data.len()` bytes at `offset`.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// A guest write of `data` at `offset`.
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// Errors while building a bus.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    /// Two devices claim overlapping ranges.
    #[error("bus range {base:#x}+{len:#x} overlaps another device")]
    Overlap {
        /// Base of the rejected range.
        base: u64,
        /// Its length.
        len: u64,
    },
    /// A zero-length range.
    #[error("bus range at {0:#x} is empty")]
    Empty(u64),
}

/// A shared device on the bus.
pub type SharedDevice = Arc<Mutex<dyn BusDevice>>;

/// Address ranges → devices. Built before the vCPUs start, then only read.
#[derive(Default, Clone)]
pub struct Bus {
    devices: BTreeMap<u64, (u64, SharedDevice)>,
}

impl Bus {
    /// An empty bus.
    pub fn new() -> Bus {
        Bus::default()
    }

    /// Maps `device` at `base..base+len`.
    pub fn insert(&mut self, base: u64, len: u64, device: SharedDevice) -> Result<(), BusError> {
        if len == 0 {
            return Err(BusError::Empty(base));
        }
        let overlaps_prev = self.devices.range(..=base).next_back().is_some_and(|(b, (l, _))| b + l > base);
        let overlaps_next = self.devices.range(base..).next().is_some_and(|(b, _)| *b < base + len);
        if overlaps_prev || overlaps_next {
            return Err(BusError::Overlap { base, len });
        }
        self.devices.insert(base, (len, device));
        Ok(())
    }

    fn find(&self, addr: u64) -> Option<(u64, &SharedDevice)> {
        let (base, (len, dev)) = self.devices.range(..=addr).next_back()?;
        (addr < base + len).then_some((addr - base, dev))
    }

    /// Dispatches a read; returns false (and leaves `data` alone) when nothing is mapped there.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr) {
            Some((offset, dev)) => {
                dev.lock().expect("device lock poisoned").read(offset, data);
                true
            }
            None => false,
        }
    }

    /// Dispatches a write; returns false when nothing is mapped there.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.find(addr) {
            Some((offset, dev)) => {
                dev.lock().expect("device lock poisoned").write(offset, data);
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Echo(Vec<(u64, Vec<u8>)>);
    impl BusDevice for Echo {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.0.push((offset, data.to_vec()));
        }
    }

    #[test]
    fn dispatches_by_range_and_rejects_overlaps() {
        let mut bus = Bus::new();
        let dev = Arc::new(Mutex::new(Echo(Vec::new())));
        bus.insert(0x3f8, 8, dev.clone()).unwrap();
        assert!(bus.insert(0x3f0, 9, dev.clone()).is_err());
        assert!(bus.insert(0x3ff, 1, dev.clone()).is_err());
        assert!(bus.insert(0x3f8, 0, dev.clone()).is_err());
        bus.insert(0x400, 1, dev.clone()).unwrap();
        let mut b = [0u8; 1];
        assert!(bus.read(0x3fd, &mut b));
        assert_eq!(b[0], 5);
        assert!(!bus.read(0x3f7, &mut b));
        assert!(bus.write(0x3f8, b"x"));
        assert!(!bus.write(0x401, &[0]));
        assert_eq!(dev.lock().unwrap().0, vec![(0, vec![b'x'])]);
    }
}
