//! The 8250 UART on COM1 (`0x3f8`, IRQ 4), emulated by `vm-superio`; its interrupt line is an
//! irqfd.

use std::io::Write;

use serde::{Deserialize, Serialize};
use vm_superio::serial::{NoEvents, SerialState};
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use super::bus::BusDevice;

/// COM1 base port.
pub const COM1_PORT: u64 = 0x3f8;
/// COM1 IRQ (GSI).
pub const COM1_IRQ: u32 = 4;

/// Errors of the serial device.
#[derive(Debug, thiserror::Error)]
pub enum SerialError {
    /// Creating the interrupt eventfd failed.
    #[error("cannot create the serial interrupt eventfd: {0}")]
    EventFd(std::io::Error),
    /// The saved state is invalid.
    #[error("invalid saved serial state: {0}")]
    State(String),
}

/// Raises the serial IRQ by writing to an eventfd registered as an irqfd.
pub struct IrqTrigger(pub EventFd);

impl Trigger for IrqTrigger {
    type E = std::io::Error;
    fn trigger(&self) -> Result<(), Self::E> {
        self.0.write(1)
    }
}

/// Saved registers of the UART (vm-superio's [`SerialState`], serialisable).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[allow(missing_docs)]
pub struct SerialSnapshot {
    pub baud_divisor_low: u8,
    pub baud_divisor_high: u8,
    pub interrupt_enable: u8,
    pub interrupt_identification: u8,
    pub line_control: u8,
    pub line_status: u8,
    pub modem_control: u8,
    pub modem_status: u8,
    pub scratch: u8,
    pub in_buffer: Vec<u8>,
}

/// The COM1 device.
pub struct SerialDevice {
    serial: Serial<IrqTrigger, NoEvents, Box<dyn Write + Send>>,
}

impl SerialDevice {
    /// A UART writing guest output to `out`, raising its interrupt through `irq`.
    pub fn new(irq: EventFd, out: Box<dyn Write + Send>) -> SerialDevice {
        SerialDevice { serial: Serial::new(IrqTrigger(irq), out) }
    }

    /// A UART restored from a snapshot.
    pub fn from_snapshot(
        snap: &SerialSnapshot,
        irq: EventFd,
        out: Box<dyn Write + Send>,
    ) -> Result<SerialDevice, SerialError> {
        let state = SerialState {
            baud_divisor_low: snap.baud_divisor_low,
            baud_divisor_high: snap.baud_divisor_high,
            interrupt_enable: snap.interrupt_enable,
            interrupt_identification: snap.interrupt_identification,
            line_control: snap.line_control,
            line_status: snap.line_status,
            modem_control: snap.modem_control,
            modem_status: snap.modem_status,
            scratch: snap.scratch,
            in_buffer: snap.in_buffer.clone(),
        };
        let serial = Serial::from_state(&state, IrqTrigger(irq), NoEvents, out)
            .map_err(|e| SerialError::State(format!("{e:?}")))?;
        Ok(SerialDevice { serial })
    }

    /// The registers, for a snapshot.
    pub fn snapshot(&self) -> SerialSnapshot {
        let s = self.serial.state();
        SerialSnapshot {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        }
    }

    /// Flushes buffered guest output.
    pub fn flush(&mut self) {
        let _ = self.serial.writer_mut().flush();
    }
}

impl BusDevice for SerialDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if data.len() == 1 && offset < 8 {
            data[0] = self.serial.read(offset as u8);
        } else {
            data.fill(0xff);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if data.len() == 1 && offset < 8 {
            if let Err(e) = self.serial.write(offset as u8, data[0]) {
                tracing::warn!("serial write: {e:?}");
            }
        }
    }
}

/// A `Write` that appends to a shared buffer: lets tests and the API read the console.
#[derive(Clone, Default)]
pub struct SharedBuffer(pub std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl SharedBuffer {
    /// A copy of everything written so far, as text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().expect("buffer lock poisoned")).into_owned()
    }
}

impl Write for SharedBuffer {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("buffer lock poisoned").extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_reaches_the_writer_and_state_round_trips() {
        let buf = SharedBuffer::default();
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut dev = SerialDevice::new(irq.try_clone().unwrap(), Box::new(buf.clone()));
        for b in b"hi\n" {
            dev.write(0, &[*b]);
        }
        dev.write(7, &[0x5a]); // scratch register
        let mut lsr = [0u8];
        dev.read(5, &mut lsr);
        assert_ne!(lsr[0] & 0x20, 0, "THR empty");
        assert_eq!(buf.text(), "hi\n");
        let snap = dev.snapshot();
        assert_eq!(snap.scratch, 0x5a);
        let mut back = SerialDevice::from_snapshot(&snap, irq, Box::new(std::io::sink())).unwrap();
        let mut s = [0u8];
        back.read(7, &mut s);
        assert_eq!(s[0], 0x5a);
    }
}
