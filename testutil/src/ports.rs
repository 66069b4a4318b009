//! Free TCP ports for test servers.

use std::net::TcpListener;
use std::sync::atomic::{AtomicU64, Ordering};

/// Ports [`free_port`] hands out when the kernel's ephemeral range cannot be read.
const FALLBACK_POOL: (u16, u16) = (10_000, 32_768);
/// Ports each process gets to itself before it runs into the next process's block.
const BLOCK: u32 = 256;

/// The ports [`free_port`] hands out: below the kernel's ephemeral range
/// (`net.ipv4.ip_local_port_range`), where neither `bind(port 0)` nor an outgoing connection
/// of any process ever lands, from 10000 (or, when that range starts too low, above it).
fn pool() -> (u16, u16) {
    let range = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").ok().and_then(|t| {
        let mut it = t.split_whitespace().map(|n| n.parse::<u32>().ok());
        Some((it.next()??, it.next()??))
    });
    match range {
        Some((lo, _)) if lo >= u32::from(FALLBACK_POOL.0) + 4 * BLOCK => (FALLBACK_POOL.0, lo as u16),
        Some((_, hi)) if hi + 4 * BLOCK < 65_535 => ((hi + 1) as u16, 65_535),
        _ => FALLBACK_POOL,
    }
}

/// The `n`-th port of this process in a pool of `span` ports: processes start at different
/// blocks (by process id), and a process walks on from its block through the whole pool.
fn nth_port(pool: (u16, u16), pid: u32, n: u32) -> u16 {
    let span = u32::from(pool.1 - pool.0);
    let blocks = (span / BLOCK).max(1);
    let start = (pid % blocks) * BLOCK;
    pool.0 + ((start + n) % span) as u16
}

/// A TCP port on 127.0.0.1 that is free now and unlikely to be taken before it is used: each call
/// gets the next port of a process-wide sequence outside the kernel's ephemeral range (so no
/// ephemeral bind or connection of another process lands on it), starting at a block chosen
/// by the process id (so concurrent test processes use different ports), checked with a bind.
/// Another program choosing fixed ports may still take it before the caller binds: servers
/// started on it should retry on another port when the bind fails, as [`RedisServer`] does.
pub fn free_port() -> u16 {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let pool = pool();
    let span = u64::from(pool.1 - pool.0);
    for _ in 0..span {
        let n = (NEXT.fetch_add(1, Ordering::Relaxed) % span) as u32;
        let port = nth_port(pool, std::process::id(), n);
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    // Every port of the pool is in use: one the kernel finds free.
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("cannot bind an ephemeral loopback port")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_come_from_a_per_process_block_outside_the_ephemeral_range() {
        let pool = (10_000, 32_768);
        let span = u32::from(pool.1 - pool.0);
        for pid in [1, 4242, 99_999] {
            let ports: std::collections::HashSet<u16> = (0..span).map(|n| nth_port(pool, pid, n)).collect();
            assert_eq!(ports.len(), span as usize, "every port of the pool once");
            assert!(ports.iter().all(|&p| (pool.0..pool.1).contains(&p)));
        }
        // Neighbouring processes start one block apart.
        assert_eq!(nth_port(pool, 7, 0) + BLOCK as u16, nth_port(pool, 8, 0));
        assert_eq!(nth_port(pool, 7, 1), nth_port(pool, 7, 0) + 1);
        // This machine's pool: a few blocks, outside its ephemeral range (unless that range
        // leaves no room and the fallback is used).
        let (lo, hi) = super::pool();
        assert!(hi > lo && u32::from(hi - lo) >= 2 * BLOCK, "pool {lo}..{hi}: too small");
        if let Some((elo, ehi)) = ephemeral_range() {
            assert!(
                (lo, hi) == FALLBACK_POOL || hi <= elo || lo > ehi,
                "pool {lo}..{hi} overlaps the ephemeral range {elo}-{ehi}"
            );
        }
    }

    fn ephemeral_range() -> Option<(u16, u16)> {
        let t = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").ok()?;
        let mut it = t.split_whitespace().map(|n| n.parse().ok());
        Some((it.next()??, it.next()??))
    }

    #[test]
    fn free_ports_are_distinct_bindable_and_not_ephemeral() {
        let eph = ephemeral_range();
        let ports: Vec<u16> = (0..50).map(|_| free_port()).collect();
        let distinct: std::collections::HashSet<_> = ports.iter().collect();
        assert_eq!(distinct.len(), ports.len(), "{ports:?}");
        for p in ports {
            TcpListener::bind(("127.0.0.1", p)).unwrap();
            if let Some((lo, hi)) = eph {
                assert!(!(lo..=hi).contains(&p), "{p} is in the ephemeral range {lo}-{hi}");
            }
        }
    }
}
