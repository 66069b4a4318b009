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
    // A session with peer "B" (epoch 1), then the same bytes bound to it: the sender's epoch
    // and the receiver's epoch (the fields after the sender's name) set to the session's, so
    // the logic behind the epoch checks is reached too.
    let hello = proto::Message {
        sender: "B".into(),
        epoch: 1,
        peer_epoch: r.epoch(),
        seq: 1,
        timestamp_us: now.wall_us,
        body: proto::Body::Hello { adopted: true, ask: true },
    };
    if let Ok(h) = proto::encode(&auth, &hello) {
        r.handle_datagram(&now, peer, &h);
    }
    if let Some(&n) = data.get(5) {
        let at = 6 + usize::from(n);
        if data.len() >= at + 16 {
            let mut bound = data.to_vec();
            bound[at..at + 8].copy_from_slice(&1u64.to_be_bytes());
            bound[at + 8..at + 16].copy_from_slice(&r.epoch().to_be_bytes());
            if let Ok(sealed) = proto::seal(&auth, &bound) {
                r.handle_datagram(&now, peer, &sealed);
            }
        }
    }
    r.handle_timers(&now.after(std::time::Duration::from_secs(5)));
    let _ = r.take_actions();
    let _ = r.status(&now);
});
