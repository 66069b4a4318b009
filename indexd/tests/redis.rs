//! `indexd::redis` against real `redis-server` processes (single server and a three-node
//! cluster) started by the tests on free loopback ports.

use std::collections::BTreeSet;
use std::time::Instant;

use indexd::hash::{digest, Algo};
use indexd::redis::{Redis, RedisError, Target};
use shrink_testutil::ports::free_port;
use shrink_testutil::redis::{RedisCluster, RedisServer};

fn server() -> RedisServer {
    RedisServer::start().unwrap_or_else(|e| panic!("cannot start redis-server for the test: {e}"))
}

fn cluster() -> RedisCluster {
    RedisCluster::start().unwrap_or_else(|e| panic!("cannot start a Redis Cluster for the test: {e}"))
}

/// Binary keys: a prefix and a raw digest (with NULs, 0xff, braces in some of them).
fn keys(tag: &str, n: usize) -> Vec<Vec<u8>> {
    (0..n)
        .map(|i| {
            let mut k = format!("shrink:{tag}:").into_bytes();
            k.extend(digest(Algo::Sha1, &(i as u64).to_le_bytes()));
            if i % 97 == 0 {
                k.extend_from_slice(b"\0{x}\xff");
            }
            k
        })
        .collect()
}

fn raw(url: &str) -> redis::Connection {
    redis::Client::open(url).and_then(|c| c.get_connection()).expect("raw connection")
}

fn set_nx_semantics(r: &mut Redis) {
    let ks = keys("nx", 500);
    assert!(r.set_nx_many(&ks[..300], 60).unwrap().iter().all(|&b| b), "first SET NX claims");
    let v = r.set_nx_many(&ks, 60).unwrap();
    assert_eq!(v.len(), 500);
    assert!(v[..300].iter().all(|&b| !b), "second SET NX of the same keys: not new");
    assert!(v[300..].iter().all(|&b| b), "keys not set before: new");
    assert!(r.set_nx_many(&ks, 60).unwrap().iter().all(|&b| !b));
    assert_eq!(r.set_nx_many(&[], 60).unwrap(), Vec::<bool>::new());
    // The same key twice in one batch: only the first is new.
    let dup = vec![b"shrink:dup".to_vec(), b"shrink:dup".to_vec()];
    assert_eq!(r.set_nx_many(&dup, 60).unwrap(), vec![true, false]);
}

fn sets_round_trip(r: &mut Redis) {
    let ks = keys("holders", 300);
    let holders = ["10.0.0.1:7000", "10.0.0.2:7000", "10.0.0.3:7000"];
    // Key i is held by the first i % 4 holders (0..=3).
    let mut entries = Vec::new();
    for (i, k) in ks.iter().enumerate() {
        for h in &holders[..i % 4] {
            entries.push((k.clone(), h.to_string()));
        }
    }
    r.sadd_many(&entries).unwrap();
    r.sadd_many(&entries).unwrap(); // idempotent
    let members = r.smembers_many(&ks).unwrap();
    let random = r.srandmember_many(&ks).unwrap();
    for i in 0..ks.len() {
        let want: BTreeSet<String> = holders[..i % 4].iter().map(|s| s.to_string()).collect();
        let got: BTreeSet<String> = members[i].iter().cloned().collect();
        assert_eq!(got, want, "SMEMBERS of key {i}");
        match &random[i] {
            None => assert!(want.is_empty(), "SRANDMEMBER of key {i}: None but held"),
            Some(m) => assert!(want.contains(m), "SRANDMEMBER of key {i}: {m} not a holder"),
        }
    }
    // Withdraw the first holder everywhere.
    let gone: Vec<_> = entries.iter().filter(|(_, h)| h == holders[0]).cloned().collect();
    r.srem_many(&gone).unwrap();
    r.srem_many(&gone).unwrap(); // removing what is not there is fine
    let members = r.smembers_many(&ks).unwrap();
    let random = r.srandmember_many(&ks).unwrap();
    for i in 0..ks.len() {
        let want: BTreeSet<String> = holders[1.min(i % 4)..i % 4].iter().map(|s| s.to_string()).collect();
        assert_eq!(members[i].iter().cloned().collect::<BTreeSet<_>>(), want, "after SREM, key {i}");
        assert_eq!(random[i].is_some(), !want.is_empty(), "after SREM, key {i}");
    }
    // Absent keys.
    let absent = keys("absent", 3);
    assert_eq!(r.smembers_many(&absent).unwrap(), vec![Vec::<String>::new(); 3]);
    assert_eq!(r.srandmember_many(&absent).unwrap(), vec![None; 3]);
}

#[test]
fn single_set_nx_first_and_second() {
    let s = server();
    let mut r = Redis::connect(&Target::parse(&s.url()).unwrap()).unwrap();
    set_nx_semantics(&mut r);
}

#[test]
fn single_set_nx_ttl() {
    let s = server();
    let mut r = Redis::connect(&Target::parse(&s.url()).unwrap()).unwrap();
    let ks = keys("ttl", 3);
    r.set_nx_many(&ks[..1], 120).unwrap();
    r.set_nx_many(&ks[1..2], 0).unwrap();
    let mut c = raw(&s.url());
    let ttl: i64 = redis::cmd("TTL").arg(&ks[0]).query(&mut c).unwrap();
    assert!((1..=120).contains(&ttl), "TTL of a key set with EX 120: {ttl}");
    let ttl: i64 = redis::cmd("TTL").arg(&ks[1]).query(&mut c).unwrap();
    assert_eq!(ttl, -1, "ttl_s = 0: no expiry");
    let v: Vec<u8> = redis::cmd("GET").arg(&ks[0]).query(&mut c).unwrap();
    assert_eq!(v, b"1");
    // An expired key can be claimed again (expire it by hand rather than waiting).
    let _: i64 = redis::cmd("PEXPIRE").arg(&ks[0]).arg(1).query(&mut c).unwrap();
    let mut tries = 0;
    while redis::cmd("EXISTS").arg(&ks[0]).query::<i64>(&mut c).unwrap() == 1 {
        tries += 1;
        assert!(tries < 10_000, "key never expired");
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    assert_eq!(r.set_nx_many(&ks[..1], 120).unwrap(), vec![true]);
}

#[test]
fn single_sets_round_trip() {
    let s = server();
    let mut r = Redis::connect(&Target::parse(&s.url()).unwrap()).unwrap();
    sets_round_trip(&mut r);
}

#[test]
fn single_pipeline_of_ten_thousand() {
    let s = server();
    let mut r = Redis::connect(&Target::parse(&s.url()).unwrap()).unwrap();
    let ks = keys("big", 10_000);
    let v = r.set_nx_many(&ks, 60).unwrap();
    assert_eq!(v.len(), 10_000);
    assert!(v.iter().all(|&b| b));
    let mut c = raw(&s.url());
    let n: i64 = redis::cmd("DBSIZE").query(&mut c).unwrap();
    assert_eq!(n, 10_000);
    let entries: Vec<_> = ks.iter().map(|k| (k.clone(), "127.0.0.1:1".to_string())).collect();
    // SET keys are strings: SADD on them is a WRONGTYPE error, reported, and the connection
    // stays usable.
    let e = r.sadd_many(&entries[..3]).unwrap_err();
    assert!(e.to_string().contains("WRONGTYPE"), "{e}");
    let set_keys = keys("bigset", 10_000);
    let entries: Vec<_> = set_keys.iter().map(|k| (k.clone(), "127.0.0.1:1".to_string())).collect();
    r.sadd_many(&entries).unwrap();
    let v = r.srandmember_many(&set_keys).unwrap();
    assert!(v.iter().all(|m| m.as_deref() == Some("127.0.0.1:1")));
}

#[test]
fn single_reconnects_after_restart() {
    let mut s = server();
    let mut r = Redis::connect(&Target::parse(&s.url()).unwrap()).unwrap();
    let ks = keys("restart", 100);
    let sk = keys("restart-set", 1);
    assert!(r.set_nx_many(&ks, 60).unwrap().iter().all(|&b| b));
    r.sadd_many(&[(sk[0].clone(), "h:1".into())]).unwrap();

    // Restarted between two calls: the next call works (the data went with the old server).
    s.restart().unwrap();
    assert!(r.set_nx_many(&ks, 60).unwrap().iter().all(|&b| b), "SET NX after restart");
    s.restart().unwrap();
    assert_eq!(r.srandmember_many(&sk).unwrap(), vec![None]);
    r.sadd_many(&[(sk[0].clone(), "h:1".into())]).unwrap();
    assert_eq!(r.srandmember_many(&sk).unwrap(), vec![Some("h:1".to_string())]);

    // Down during a call: an error naming the target; back up: works again.
    s.kill();
    let e = r.smembers_many(&sk).unwrap_err();
    assert!(e.to_string().contains(&s.url()), "{e}");
    let e = r.set_nx_many(&ks, 60).unwrap_err();
    assert!(e.to_string().contains(&s.url()), "{e}");
    s.restart().unwrap();
    assert_eq!(r.smembers_many(&sk).unwrap(), vec![Vec::<String>::new()]);
    assert!(r.set_nx_many(&ks[..1], 60).unwrap()[0]);
}

#[test]
fn unreachable_is_a_clear_error() {
    let port = free_port();
    let url = format!("redis://127.0.0.1:{port}");
    let t0 = Instant::now();
    let e = Redis::connect(&Target::parse(&url).unwrap()).unwrap_err();
    eprintln!("unreachable single server: {e} (after {:?})", t0.elapsed());
    assert!(matches!(e, RedisError::Connect { .. }), "{e}");
    assert!(e.to_string().contains(&url), "{e}");

    let t = format!("redis://127.0.0.1:{},redis://127.0.0.1:{}", free_port(), free_port());
    let t0 = Instant::now();
    let e = Redis::connect(&Target::parse(&t).unwrap()).unwrap_err();
    eprintln!("unreachable cluster: {e} (after {:?})", t0.elapsed());
    assert!(matches!(e, RedisError::Connect { .. }), "{e}");
}

#[test]
fn cluster_operations() {
    let c = cluster();
    let target = Target::parse(&c.target_string()).unwrap();
    assert!(matches!(target, Target::Cluster(ref v) if v.len() == 3));
    let mut r = Redis::connect(&target).unwrap();
    set_nx_semantics(&mut r);
    sets_round_trip(&mut r);

    // Many keys over all slots, in one call; every node gets its share.
    let ks = keys("cluster-big", 5000);
    assert!(r.set_nx_many(&ks, 60).unwrap().iter().all(|&b| b));
    assert!(r.set_nx_many(&ks, 60).unwrap().iter().all(|&b| !b));
    let mut total = 0;
    for n in c.nodes() {
        let size: i64 = n.cli(&["dbsize"]).unwrap().trim().parse().unwrap();
        assert!(size > 1000, "node {} holds {size} keys: not spread", n.port());
        total += size;
    }
    // set_nx_semantics: 500 + 1 (dup); sets_round_trip: 225 non-empty sets, minus the 75 that
    // only had the withdrawn holder; this test: 5000.
    assert_eq!(total, 501 + 150 + 5000);
}

#[test]
fn cluster_through_one_seed() {
    let c = cluster();
    let mut r = Redis::connect(&Target::Cluster(vec![c.urls()[1].clone()])).unwrap();
    let ks = keys("seed", 1000);
    assert!(r.set_nx_many(&ks, 60).unwrap().iter().all(|&b| b));
    let entries: Vec<_> = ks.iter().map(|k| ([k.as_slice(), b":h"].concat(), "h:1".to_string())).collect();
    r.sadd_many(&entries).unwrap();
    let keys2: Vec<_> = entries.iter().map(|(k, _)| k.clone()).collect();
    assert!(r.smembers_many(&keys2).unwrap().iter().all(|m| m == &["h:1".to_string()]));
}

#[test]
fn cluster_survives_a_node_restart() {
    let mut c = cluster();
    let mut r = Redis::connect(&Target::parse(&c.target_string()).unwrap()).unwrap();
    let ks = keys("cluster-restart", 3000);
    assert!(r.set_nx_many(&ks, 60).unwrap().iter().all(|&b| b));
    c.restart_node(0).unwrap();
    // The restarted node lost its keys; the others kept theirs. The first call works.
    let v = r.set_nx_many(&ks, 60).unwrap();
    let new = v.iter().filter(|&&b| b).count();
    assert!(new > 500 && new < 2500, "{new} keys new after one node of three restarted");
    let sk = keys("cluster-restart-set", 300);
    let entries: Vec<_> = sk.iter().map(|k| (k.clone(), "h:1".to_string())).collect();
    r.sadd_many(&entries).unwrap();
    assert!(r.srandmember_many(&sk).unwrap().iter().all(|m| m.as_deref() == Some("h:1")));
}
