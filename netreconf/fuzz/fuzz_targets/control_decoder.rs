//! Fuzz the router-to-router message decoder, and the router's handling of arbitrary
//! (correctly authenticated) messages.
#![no_main]

use libfuzzer_sys::fuzz_target;
use netreconf::config::Config;
use netreconf::proto::{self, Auth};
use netreconf::router::{Now, Router};

fuzz_target!(|data: &[u8]| {
    let _ = proto::decode_unauthenticated(data);
    let text = include_str!("../../examples/site-a.toml")
        .replace("max_clock_skew_s = 30", "max_clock_skew_s = 1000000000");
    let cfg = Config::parse(&text, std::path::Path::new("fuzz.toml")).expect("example config");
    let auth = Auth::new(&cfg.key).expect("key");
    let _ = proto::decode(&auth, data);
    let now = Now::current();
    let peer = cfg.peers[0].address;
    let mut r = Router::new(cfg, now).expect("router");
    r.handle_datagram(&now, peer, data);
    if let Ok(sealed) = proto::seal(&auth, data) {
        r.handle_datagram(&now, peer, &sealed);
        r.handle_datagram(&now, peer, &sealed);
    }
    r.handle_timers(&now.after(std::time::Duration::from_secs(5)));
    let _ = r.take_actions();
    let _ = r.status(&now);
});
