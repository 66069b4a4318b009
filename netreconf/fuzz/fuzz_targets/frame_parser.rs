//! Fuzz the LAN frame parser and the router's handling of arbitrary captured frames.
#![no_main]

use libfuzzer_sys::fuzz_target;
use netreconf::config::Config;
use netreconf::frames::{self, Frame};
use netreconf::router::{Now, Router};

fuzz_target!(|data: &[u8]| {
    if let Ok(Frame::Ipv4 { packet, .. }) = frames::parse(data) {
        let mut p = packet.to_vec();
        let _ = frames::decrement_ttl(&mut p);
        let _ = frames::ipv4_addrs(&p);
    }
    let cfg = Config::parse(
        include_str!("../../examples/site-a.toml"),
        std::path::Path::new("fuzz.toml"),
    )
    .expect("example config");
    let now = Now::current();
    let mut r = Router::new(cfg, now).expect("router");
    // The same bytes twice, then the timers: exercises learning, detection, proxy ARP
    // and the data path.
    r.handle_frame(&now, data);
    r.handle_frame(&now, data);
    r.handle_timers(&now.after(std::time::Duration::from_secs(5)));
    let _ = r.take_actions();
    let _ = r.status(&now);
});
