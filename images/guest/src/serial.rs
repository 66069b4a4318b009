//! 8250/16550 UART on COM1 (I/O port 0x3f8), polled, transmit only.
//!
//! The writer holds no lock: all regular output comes from the main loop, and
//! the exception/panic paths print and then halt, so at worst an error message
//! is interleaved with a partial line.

use core::fmt;

use crate::cpu::{inb, outb};

const COM1: u16 = 0x3f8;
const THR: u16 = COM1; // transmit holding register (DLAB = 0)
const IER: u16 = COM1 + 1; // interrupt enable
const FCR: u16 = COM1 + 2; // FIFO control
const LCR: u16 = COM1 + 3; // line control
const MCR: u16 = COM1 + 4; // modem control
const LSR: u16 = COM1 + 5; // line status
const LSR_THR_EMPTY: u8 = 1 << 5;

/// Puts the UART in 8N1 mode with interrupts off and FIFOs enabled.
pub fn init() {
    outb(IER, 0x00);
    outb(LCR, 0x80); // DLAB: set the divisor
    outb(THR, 0x01); // 115200 baud (divisor low)
    outb(IER, 0x00); // divisor high
    outb(LCR, 0x03); // 8 data bits, no parity, 1 stop bit, DLAB off
    outb(FCR, 0x07); // enable and clear FIFOs
    outb(MCR, 0x03); // DTR | RTS
}

/// Writes one byte, waiting for the transmitter to have room.
fn write_byte(byte: u8) {
    // Bounded wait: an emulated UART is always ready; never hang on a broken one.
    for _ in 0..100_000 {
        if inb(LSR) & LSR_THR_EMPTY != 0 {
            break;
        }
        core::hint::spin_loop();
    }
    outb(THR, byte);
}

/// `core::fmt::Write` sink for the serial port.
pub struct Serial;

impl fmt::Write for Serial {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for b in s.bytes() {
            write_byte(b);
        }
        Ok(())
    }
}

#[doc(hidden)]
pub fn _print(args: fmt::Arguments) {
    use fmt::Write;
    let _ = Serial.write_fmt(args);
}

/// Prints to the serial console.
#[macro_export]
macro_rules! print {
    ($($arg:tt)*) => ($crate::serial::_print(format_args!($($arg)*)));
}

/// Prints to the serial console, with a trailing `\n`.
#[macro_export]
macro_rules! println {
    () => ($crate::print!("\n"));
    ($($arg:tt)*) => ($crate::serial::_print(format_args!("{}\n", format_args!($($arg)*))));
}
