//! `indexd-bench`: throughput of the pieces of `indexd` on this machine, as one JSON object on
//! standard output. Starts its own `redis-server` (and a three-node cluster with `--cluster`)
//! on loopback ports.
//!
//! ```sh
//! target/release/indexd-bench --cluster > bench/results/indexd.json   # what `make bench` runs
//! ```

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use indexd::hash::{digest, Algo};
use indexd::peer::{ChunkSource, PeerClient, PeerServer};
use indexd::redis::{Redis, Target};
use indexd::tls::{ClusterKey, Tls, Transport};
use indexd::ContentIndex;
use shrink_testutil::redis::{RedisCluster, RedisServer};
use shrink_testutil::util::{host_info, utc_now};

fn keys(tag: &str, n: usize) -> Vec<Vec<u8>> {
    (0..n)
        .map(|i| {
            let mut k = format!("b:{tag}:").into_bytes();
            k.extend(digest(Algo::Sha1, &(i as u64).to_le_bytes()));
            k
        })
        .collect()
}

/// Operations per second of `op` over `total` keys in batches of `batch`.
fn redis_rate(r: &mut Redis, tag: &str, total: usize, batch: usize, op: &str) -> f64 {
    let ks = keys(tag, total);
    let entries: Vec<_> = ks.iter().map(|k| (k.clone(), "10.0.0.1:7000".to_string())).collect();
    let t0 = Instant::now();
    for (i, c) in ks.chunks(batch).enumerate() {
        match op {
            "set_nx" => drop(r.set_nx_many(c, 600).expect("set_nx_many")),
            "sadd" => r.sadd_many(&entries[i * batch..i * batch + c.len()]).expect("sadd_many"),
            "srandmember" => drop(r.srandmember_many(c).expect("srandmember_many")),
            _ => unreachable!(),
        }
    }
    total as f64 / t0.elapsed().as_secs_f64()
}

fn redis_figures(r: &mut Redis, name: &str) -> Vec<String> {
    let mut out = Vec::new();
    for batch in [1usize, 64, 1024, 8192] {
        let total = if batch == 1 { 20_000 } else { 200_000 };
        let set_nx = redis_rate(r, &format!("{name}-nx-{batch}"), total, batch, "set_nx");
        let sadd = redis_rate(r, &format!("{name}-s-{batch}"), total, batch, "sadd");
        let srand = redis_rate(r, &format!("{name}-s-{batch}"), total, batch, "srandmember");
        out.push(format!(
            "{{\"target\": \"{name}\", \"batch\": {batch}, \"set_nx_ops_per_s\": {set_nx:.0}, \"sadd_ops_per_s\": {sadd:.0}, \"srandmember_ops_per_s\": {srand:.0}}}"
        ));
        eprintln!("redis {name} batch {batch}: SET NX {set_nx:.0}/s, SADD {sadd:.0}/s, SRANDMEMBER {srand:.0}/s");
    }
    out
}

/// Chunks in memory; with `verify`, re-hashed before being served (as a VMM does).
struct MapSource {
    chunks: HashMap<Vec<u8>, Vec<u8>>,
    verify: bool,
}

impl ChunkSource for MapSource {
    fn chunk(&self, d: &[u8]) -> Option<Vec<u8>> {
        let c = self.chunks.get(d)?;
        (!self.verify || digest(Algo::Sha256, c) == d).then(|| c.clone())
    }
}

/// Fetches batches of 1024 4-KiB chunks; returns a JSON object and prints a line.
fn peer_figures(pages: &[Vec<u8>], digests: &[Vec<u8>], verify: bool, transport: &Transport) -> String {
    let chunks = digests.iter().cloned().zip(pages.iter().cloned()).collect();
    let server =
        PeerServer::start("127.0.0.1:0", Arc::new(MapSource { chunks, verify }), transport).expect("peer server");
    let peer = format!("127.0.0.1:{}", server.local_addr().port());
    let mut client = PeerClient::new(Duration::from_secs(10), transport.clone());
    client.fetch(&peer, &digests[..1]).expect("warm-up");
    let rounds = 50;
    let mut lat = Vec::new();
    let t0 = Instant::now();
    for r in 0..rounds {
        let b = &digests[(r % 8) * 1024..(r % 8 + 1) * 1024];
        let t = Instant::now();
        let got = client.fetch(&peer, b).expect("fetch");
        lat.push(t.elapsed().as_secs_f64() * 1e3);
        assert!(got.iter().all(Option::is_some));
    }
    let secs = t0.elapsed().as_secs_f64();
    lat.sort_by(f64::total_cmp);
    let mib_s = (rounds * 1024 * 4096) as f64 / secs / (1 << 20) as f64;
    let chunks_s = (rounds * 1024) as f64 / secs;
    let (med, min) = (lat[lat.len() / 2], lat[0]);
    let tr = transport.name();
    eprintln!(
        "peer fetch ({tr}), 1024 x 4 KiB per batch, server re-hashes: {verify}: median {med:.2} ms, min {min:.2} ms, {mib_s:.0} MiB/s, {chunks_s:.0} chunks/s"
    );
    format!(
        "{{\"transport\": \"{tr}\", \"batch\": 1024, \"chunk_bytes\": 4096, \"server_verifies\": {verify}, \"median_ms\": {med:.3}, \"min_ms\": {min:.3}, \"mib_per_s\": {mib_s:.0}, \"chunks_per_s\": {chunks_s:.0}}}"
    )
}

fn main() {
    let with_cluster = std::env::args().any(|a| a == "--cluster");
    let mut sections =
        vec![format!("\"date\": {}", serde_json::Value::from(utc_now())), format!("\"host\": {}", host_info())];

    // Redis.
    let server = RedisServer::start().unwrap_or_else(|e| {
        eprintln!("indexd-bench: {e}");
        std::process::exit(1)
    });
    let mut r = Redis::connect(&Target::Single(server.url())).expect("connect");
    let mut redis = redis_figures(&mut r, "single");
    drop(r);
    drop(server);
    if with_cluster {
        let c = RedisCluster::start().unwrap_or_else(|e| {
            eprintln!("indexd-bench: {e}");
            std::process::exit(1)
        });
        let mut r = Redis::connect(&Target::parse(&c.target_string()).expect("target")).expect("connect");
        redis.extend(redis_figures(&mut r, "cluster3"));
    }
    sections.push(format!("\"redis\": [{}]", redis.join(", ")));

    // Peer fetch: batches of 1024 distinct 4 KiB chunks (server verifies each, as a VMM does).
    let n = 8192;
    let pages: Vec<Vec<u8>> =
        (0..n as u64).map(|i| (0..4096u64).map(|j| (i.wrapping_mul(31) ^ j.wrapping_mul(7)) as u8).collect()).collect();
    let digests: Vec<Vec<u8>> = pages.iter().map(|p| digest(Algo::Sha256, p)).collect();
    // Over TLS (as deployed) and plain TCP: what TLS costs a fetch.
    let tls = Transport::Tls(Arc::new(Tls::new(&ClusterKey::generate().expect("key")).expect("TLS")));
    let peer: Vec<String> = [&tls, &Transport::Plain]
        .into_iter()
        .flat_map(|t| [peer_figures(&pages, &digests, true, t), peer_figures(&pages, &digests, false, t)])
        .collect();
    sections.push(format!("\"peer_fetch\": [{}]", peer.join(", ")));

    // Content index: 1 M chunks, 500 k distinct SHA-256 digests.
    let chunks = 1_000_000u64;
    let ds: Vec<Vec<u8>> = (0..chunks / 2).map(|i| digest(Algo::Sha256, &i.to_le_bytes())).collect();
    let rss0 = rss_kib();
    let t = Instant::now();
    let mut ix = ContentIndex::new();
    for i in 0..chunks {
        ix.insert(i << 12, &ds[(i % (chunks / 2)) as usize]);
    }
    let insert_ns = t.elapsed().as_nanos() as f64 / chunks as f64;
    let t = Instant::now();
    let mut found = 0;
    for d in &ds {
        found += usize::from(ix.lookup(d).is_some());
    }
    let lookup_ns = t.elapsed().as_nanos() as f64 / ds.len() as f64;
    let rss = rss_kib().saturating_sub(rss0);
    assert_eq!(found, ds.len());
    eprintln!(
        "content index: {} chunks, {} distinct: insert {insert_ns:.0} ns, lookup {lookup_ns:.0} ns, ~{} MiB resident ({:.0} B/chunk)",
        ix.len(),
        ix.distinct(),
        rss / 1024,
        rss as f64 * 1024.0 / chunks as f64
    );
    sections.push(format!(
        "\"content_index\": {{\"chunks\": {}, \"distinct\": {}, \"insert_ns\": {insert_ns:.0}, \"lookup_ns\": {lookup_ns:.0}, \"resident_kib\": {rss}}}",
        ix.len(),
        ix.distinct()
    ));

    println!("{{{}}}", sections.join(", "));
}

/// Resident set size of this process in KiB (0 when unknown).
fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        })
        .unwrap_or(0)
}
