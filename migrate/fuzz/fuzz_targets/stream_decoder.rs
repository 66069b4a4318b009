//! Arbitrary bytes into the migration stream decoder: it must return records or an error,
//! never panic, and never read past what a record announced.
#![no_main]

use libfuzzer_sys::fuzz_target;
use migrate::protocol::{Decoder, Record};

fuzz_target!(|data: &[u8]| {
    let mut d = Decoder::new();
    let mut r = data;
    // Also exercise payload parsing directly, without the checksum in the way.
    if let Some((&kind, payload)) = data.split_first() {
        let _ = Decoder::new().decode(kind, payload.to_vec());
    }
    while let Ok(Some(rec)) = d.read(&mut r) {
        if let Record::Pages(p) = rec {
            for (addr, _chunk) in p.iter() {
                std::hint::black_box(addr);
            }
        }
    }
});
