//! `indexd::peer`: a real server and client over loopback.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::time::Duration;

use indexd::hash::{digest, verify, Algo};
use indexd::peer::{self, ChunkSource, PeerClient, PeerError, PeerServer};
use indexd::tls::{ClusterKey, Tls, Transport};
use shrink_testutil::util::XorShift;

/// Chunks in memory, checked against their digest before being served (as a VMM does).
struct MapSource {
    algo: Algo,
    chunks: HashMap<Vec<u8>, Vec<u8>>,
}

impl ChunkSource for MapSource {
    fn chunk(&self, d: &[u8]) -> Option<Vec<u8>> {
        let c = self.chunks.get(d)?;
        verify(self.algo, c, d).then(|| c.clone())
    }
}

fn page(i: u64, len: usize) -> Vec<u8> {
    XorShift::new(i).bytes(len)
}

/// This test cluster's TLS (one key for every server and client of the process).
fn tls() -> Transport {
    static T: std::sync::OnceLock<Transport> = std::sync::OnceLock::new();
    T.get_or_init(other_cluster).clone()
}

/// TLS on a key of its own.
fn other_cluster() -> Transport {
    Transport::Tls(Arc::new(Tls::new(&ClusterKey::generate().unwrap()).unwrap()))
}

/// A server holding pages 0..n (4 KiB) and their SHA-256 digests, over TLS.
fn serve(n: u64) -> (PeerServer, Vec<Vec<u8>>, Vec<Vec<u8>>) {
    serve_on(n, &tls())
}

fn serve_on(n: u64, transport: &Transport) -> (PeerServer, Vec<Vec<u8>>, Vec<Vec<u8>>) {
    let pages: Vec<_> = (0..n).map(|i| page(i, 4096)).collect();
    let digests: Vec<_> = pages.iter().map(|p| digest(Algo::Sha256, p)).collect();
    let src = MapSource { algo: Algo::Sha256, chunks: digests.iter().cloned().zip(pages.iter().cloned()).collect() };
    let server = PeerServer::start("127.0.0.1:0", Arc::new(src), transport).unwrap();
    (server, digests, pages)
}

fn addr(s: &PeerServer) -> String {
    format!("127.0.0.1:{}", s.local_addr().port())
}

#[test]
fn batch_hits_and_misses() {
    let (server, digests, pages) = serve(100);
    let mut client = PeerClient::new(Duration::from_secs(5), tls());
    let missing: Vec<_> = (1000..1010u64).map(|i| digest(Algo::Sha256, &page(i, 4096))).collect();
    // Interleave hits and misses.
    let mut ask = Vec::new();
    for i in 0..100 {
        ask.push(digests[i].clone());
        if i % 10 == 0 {
            ask.push(missing[i / 10].clone());
        }
    }
    let got = client.fetch(&addr(&server), &ask).unwrap();
    assert_eq!(got.len(), ask.len());
    let mut hit = 0;
    for (d, g) in ask.iter().zip(&got) {
        match digests.iter().position(|x| x == d) {
            Some(i) => {
                assert_eq!(g.as_ref(), Some(&pages[i]));
                hit += 1;
            }
            None => assert_eq!(g, &None),
        }
    }
    assert_eq!(hit, 100);
    assert_eq!(server.served(), 100);
    assert_eq!(server.not_found(), 10);
    // The connection is kept and reused.
    let got = client.fetch(&addr(&server), &digests[..1]).unwrap();
    assert_eq!(got[0].as_ref(), Some(&pages[0]));
    assert_eq!(client.fetch(&addr(&server), &[]).unwrap(), Vec::<Option<Vec<u8>>>::new());
}

#[test]
fn batches_larger_than_one_request() {
    let (server, digests, pages) = serve(500);
    let mut client = PeerClient::new(Duration::from_secs(5), tls());
    // 10 000 digests: three requests of at most 4096 on one connection.
    let ask: Vec<_> = (0..10_000).map(|i| digests[i % 500].clone()).collect();
    let got = client.fetch(&addr(&server), &ask).unwrap();
    assert_eq!(got.len(), 10_000);
    for (i, g) in got.iter().enumerate() {
        assert_eq!(g.as_ref(), Some(&pages[i % 500]), "entry {i}");
    }
    assert_eq!(server.served(), 10_000);
}

#[test]
fn sha1_digests() {
    let pages: Vec<_> = (0..10).map(|i| page(i, 4096)).collect();
    let digests: Vec<_> = pages.iter().map(|p| digest(Algo::Sha1, p)).collect();
    let src = MapSource { algo: Algo::Sha1, chunks: digests.iter().cloned().zip(pages.iter().cloned()).collect() };
    let server = PeerServer::start("0.0.0.0:0", Arc::new(src), &tls()).unwrap();
    let got = PeerClient::new(Duration::from_secs(5), tls()).fetch(&addr(&server), &digests).unwrap();
    assert_eq!(got.into_iter().map(Option::unwrap).collect::<Vec<_>>(), pages);
}

#[test]
fn corrupt_mode_is_detected_by_verification() {
    let (server, digests, _) = serve(20);
    let mut client = PeerClient::new(Duration::from_secs(5), tls());
    server.set_corrupt(true);
    let got = client.fetch(&addr(&server), &digests).unwrap();
    for (d, g) in digests.iter().zip(&got) {
        let g = g.as_ref().expect("served");
        assert!(!verify(Algo::Sha256, g, d), "a corrupted chunk must not verify");
    }
    server.set_corrupt(false);
    let got = client.fetch(&addr(&server), &digests).unwrap();
    for (d, g) in digests.iter().zip(&got) {
        assert!(verify(Algo::Sha256, g.as_ref().unwrap(), d));
    }
}

#[test]
fn client_refuses_bad_batches() {
    let (server, _, _) = serve(1);
    let mut client = PeerClient::new(Duration::from_secs(5), tls());
    let e = client.fetch(&addr(&server), &[vec![1; 20], vec![1; 32]]).unwrap_err();
    assert!(matches!(e, PeerError::BadRequest(_)), "{e}");
    let e = client.fetch(&addr(&server), &[vec![]]).unwrap_err();
    assert!(matches!(e, PeerError::BadRequest(_)), "{e}");
}

/// Reads whatever the server answers until it closes (or 5 s of silence).
fn read_all(s: &mut TcpStream) -> Vec<u8> {
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut v = Vec::new();
    let _ = s.read_to_end(&mut v);
    v
}

#[test]
fn garbage_does_not_hurt_the_server() {
    // Plain TCP, so that the garbage reaches the protocol (over TLS it fails the handshake).
    let (server, digests, pages) = serve_on(10, &Transport::Plain);
    let a = addr(&server);

    // Not the protocol at all: a refusal, then the server closes.
    let mut s = TcpStream::connect(&a).unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let r = read_all(&mut s);
    assert_eq!(&r[..4], b"SHKA");
    assert_eq!(r[5], peer::STATUS_BAD_REQUEST);

    // A future version: "unsupported version".
    let mut req = peer::encode_request(&digests[..1]).unwrap();
    req[4] = 9;
    let mut s = TcpStream::connect(&a).unwrap();
    s.write_all(&req).unwrap();
    let r = read_all(&mut s);
    assert_eq!(r[5], peer::STATUS_BAD_VERSION);

    // Huge counts and lengths are refused from the header alone (no allocation).
    for (count, dlen) in [(u32::MAX, 32u8), (4097, 32), (1, 0), (1, 200)] {
        let mut h = Vec::new();
        h.extend_from_slice(b"SHKQ");
        h.extend_from_slice(&[1, 1, dlen, 0]);
        h.extend_from_slice(&count.to_le_bytes());
        let mut s = TcpStream::connect(&a).unwrap();
        s.write_all(&h).unwrap();
        let r = read_all(&mut s);
        assert_eq!(r[5], peer::STATUS_BAD_REQUEST, "count {count}, digest length {dlen}");
    }

    // Random bytes, half a header, half a request, then gone.
    let mut rnd = XorShift::new(42);
    for len in [1usize, 7, 11, 12, 100, 5000, 300_000] {
        let mut s = TcpStream::connect(&a).unwrap();
        let junk = rnd.bytes(len);
        let _ = s.write_all(&junk);
    }
    let req = peer::encode_request(&digests).unwrap();
    TcpStream::connect(&a).unwrap().write_all(&req[..req.len() / 2]).unwrap();

    // Connections that ask and never read (the response is produced as the socket drains).
    let big: Vec<_> = (0..4096).map(|i| digests[i % 10].clone()).collect();
    let req = peer::encode_request(&big).unwrap();
    let mut idle = Vec::new();
    for _ in 0..4 {
        let mut s = TcpStream::connect(&a).unwrap();
        for _ in 0..4 {
            s.write_all(&req).unwrap();
        }
        idle.push(s);
    }

    // Connections that stay open doing nothing.
    let quiet: Vec<_> = (0..50).map(|_| TcpStream::connect(&a).unwrap()).collect();

    // The server still answers.
    let got = PeerClient::new(Duration::from_secs(5), Transport::Plain).fetch(&a, &digests).unwrap();
    assert_eq!(got.into_iter().map(Option::unwrap).collect::<Vec<_>>(), pages);
    drop(idle);
    drop(quiet);
}

#[test]
fn dead_or_silent_server_is_an_error() {
    let (server, digests, _) = serve(3);
    let a = addr(&server);
    let mut client = PeerClient::new(Duration::from_millis(500), tls());
    assert!(client.fetch(&a, &digests).is_ok());
    drop(server);
    // The kept connection is dead and nothing listens any more.
    let e = client.fetch(&a, &digests).unwrap_err();
    assert!(matches!(e, PeerError::Connect { .. } | PeerError::Io { .. }), "{e}");
    assert!(e.to_string().contains(&a), "{e}");

    // Accepts and never answers: a timeout error, not a hang.
    let silent = TcpListener::bind("127.0.0.1:0").unwrap();
    let sa = format!("127.0.0.1:{}", silent.local_addr().unwrap().port());
    let e = client.fetch(&sa, &digests).unwrap_err();
    assert!(matches!(e, PeerError::Tls { .. }), "{e}");
    assert!(e.to_string().contains("no answer in time"), "{e}");
    let e = PeerClient::new(Duration::from_millis(500), Transport::Plain).fetch(&sa, &digests).unwrap_err();
    assert!(matches!(e, PeerError::Io { .. }), "{e}");

    // Answers garbage: a protocol error (plain TCP), a failed handshake (TLS).
    let mut client = PeerClient::new(Duration::from_millis(500), Transport::Plain);
    let liar = TcpListener::bind("127.0.0.1:0").unwrap();
    let la = format!("127.0.0.1:{}", liar.local_addr().unwrap().port());
    let t = std::thread::spawn(move || {
        let (mut s, _) = liar.accept().unwrap();
        let mut b = [0u8; 12];
        let _ = s.read(&mut b);
        let mut r = Vec::new();
        peer::encode_response_header(&mut r, peer::STATUS_OK, 3);
        r.extend_from_slice(&u32::MAX.to_le_bytes());
        r.extend_from_slice(&(1u32 << 30).to_le_bytes()); // a 1 GiB "chunk"
        let _ = s.write_all(&r);
        std::thread::sleep(Duration::from_millis(200));
    });
    let e = client.fetch(&la, &digests).unwrap_err();
    assert!(matches!(e, PeerError::Protocol { .. }), "{e}");
    t.join().unwrap();
}

#[test]
fn client_reconnects_to_a_restarted_peer() {
    let (server, digests, pages) = serve(3);
    let port = server.local_addr().port();
    let a = addr(&server);
    let mut client = PeerClient::new(Duration::from_secs(5), tls());
    assert!(client.fetch(&a, &digests).is_ok());
    drop(server);
    let src = MapSource { algo: Algo::Sha256, chunks: digests.iter().cloned().zip(pages.iter().cloned()).collect() };
    let server = PeerServer::start(&format!("127.0.0.1:{port}"), Arc::new(src), &tls()).unwrap();
    // The first fetch after the restart works on a new connection.
    let got = client.fetch(&a, &digests).unwrap();
    assert_eq!(got[2].as_ref(), Some(&pages[2]));
    assert_eq!(server.served(), 3);
}

#[test]
fn many_clients_at_once() {
    let (server, digests, pages) = serve(64);
    let a = addr(&server);
    let digests = Arc::new(digests);
    let pages = Arc::new(pages);
    let threads: Vec<_> = (0..8)
        .map(|t| {
            let (a, digests, pages) = (a.clone(), digests.clone(), pages.clone());
            std::thread::spawn(move || {
                let mut c = PeerClient::new(Duration::from_secs(10), tls());
                for round in 0..20 {
                    let ask: Vec<_> = (0..64).map(|i| digests[(i + t + round) % 64].clone()).collect();
                    let got = c.fetch(&a, &ask).unwrap();
                    for (i, g) in got.iter().enumerate() {
                        assert_eq!(g.as_ref(), Some(&pages[(i + t + round) % 64]));
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    assert_eq!(server.served(), 8 * 20 * 64);
}

#[test]
fn over_tls_only_the_same_cluster_is_served_and_garbage_fails_the_handshake() {
    let (server, digests, pages) = serve(10);
    let a = addr(&server);
    // Another cluster key: refused by the handshake, naming why.
    let e = PeerClient::new(Duration::from_secs(5), other_cluster()).fetch(&a, &digests).unwrap_err();
    assert!(matches!(e, PeerError::Tls { .. }), "{e}");
    assert!(e.to_string().contains("another cluster key"), "{e}");
    // A plain-TCP client: the server answers nothing in clear text.
    let mut s = TcpStream::connect(&a).unwrap();
    s.write_all(&peer::encode_request(&digests).unwrap()).unwrap();
    let r = read_all(&mut s);
    assert!(!r.windows(4).any(|w| w == b"SHKA"), "no clear-text answer");
    assert!(!r.windows(64).any(|w| pages.iter().any(|p| p.starts_with(w))), "no page in clear text");
    // Garbage, half handshakes, and silent connections.
    let mut rnd = XorShift::new(7);
    for len in [1usize, 5, 300, 70_000] {
        let _ = TcpStream::connect(&a).unwrap().write_all(&rnd.bytes(len));
    }
    let quiet: Vec<_> = (0..20).map(|_| TcpStream::connect(&a).unwrap()).collect();
    // The cluster's clients are still served, with chunks identical to the pages.
    let got = PeerClient::new(Duration::from_secs(5), tls()).fetch(&a, &digests).unwrap();
    assert_eq!(got.into_iter().map(Option::unwrap).collect::<Vec<_>>(), pages);
    drop(quiet);
}
