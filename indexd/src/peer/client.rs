//! The peer client: blocking batch fetches, one kept connection per peer.

use std::collections::HashMap;
use std::io::{self, BufReader, ErrorKind, Write};
use std::net::{TcpStream as StdTcpStream, ToSocketAddrs};
use std::time::Duration;

use super::wire::{encode_request, read_response, PeerError, ResponseError, MAX_DIGESTS};
use super::LOG_TARGET;
use crate::tls::{Stream, Transport};

struct PeerConn {
    writer: Stream,
    reader: BufReader<Stream>,
}

/// Fetches chunks from the site's peers; keeps one connection per peer address and reconnects
/// after a failure.
pub struct PeerClient {
    timeout: Duration,
    transport: Transport,
    conns: HashMap<String, PeerConn>,
}

impl std::fmt::Debug for PeerClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerClient")
            .field("timeout", &self.timeout)
            .field("transport", &self.transport.name())
            .field("peers", &self.conns.len())
            .finish()
    }
}

impl PeerClient {
    /// A client whose connects, reads and writes each give up after `timeout`, and whose
    /// connections use `transport`.
    pub fn new(timeout: Duration, transport: Transport) -> PeerClient {
        let timeout = if timeout.is_zero() { Duration::from_millis(1) } else { timeout };
        PeerClient { timeout, transport, conns: HashMap::new() }
    }

    /// Fetches many chunks from one peer in one request/response exchange (one per 4096
    /// digests). `Ok(v)`: `v[i]` is `Some(bytes)` when the peer had `digests[i]`, `None`
    /// otherwise. Does NOT verify the bytes.
    pub fn fetch(&mut self, peer: &str, digests: &[Vec<u8>]) -> Result<Vec<Option<Vec<u8>>>, PeerError> {
        let mut out = Vec::with_capacity(digests.len());
        for batch in digests.chunks(MAX_DIGESTS) {
            let req = encode_request(batch)?;
            out.extend(self.exchange(peer, &req, batch.len())?);
        }
        Ok(out)
    }

    /// Drops the connection to `peer`, if any.
    pub fn disconnect(&mut self, peer: &str) {
        self.conns.remove(peer);
    }

    fn connect(&self, peer: &str) -> Result<PeerConn, PeerError> {
        let err = |source| PeerError::Connect { peer: peer.to_string(), source };
        let mut last = io::Error::new(ErrorKind::InvalidInput, "address resolves to nothing");
        for sa in peer.to_socket_addrs().map_err(err)? {
            match StdTcpStream::connect_timeout(&sa, self.timeout) {
                Ok(s) => {
                    s.set_nodelay(true).map_err(err)?;
                    s.set_read_timeout(Some(self.timeout)).map_err(err)?;
                    s.set_write_timeout(Some(self.timeout)).map_err(err)?;
                    let s = self
                        .transport
                        .connect(s)
                        .map_err(|source| PeerError::Tls { peer: peer.to_string(), source })?;
                    let r = s.try_clone().map_err(err)?;
                    return Ok(PeerConn { writer: s, reader: BufReader::with_capacity(256 * 1024, r) });
                }
                Err(e) => last = e,
            }
        }
        Err(err(last))
    }

    fn exchange(&mut self, peer: &str, req: &[u8], n: usize) -> Result<Vec<Option<Vec<u8>>>, PeerError> {
        for attempt in 0..2 {
            let reused = self.conns.contains_key(peer);
            if !reused {
                let c = self.connect(peer)?;
                self.conns.insert(peer.to_string(), c);
            }
            let Some(c) = self.conns.get_mut(peer) else { unreachable!("inserted above") };
            let result =
                c.writer.write_all(req).map_err(ResponseError::Io).and_then(|()| read_response(&mut c.reader, n));
            match result {
                Ok(v) => return Ok(v),
                Err(e) => {
                    self.conns.remove(peer);
                    let e = match e {
                        ResponseError::Io(source) => {
                            let timeout = matches!(source.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut);
                            // A kept connection the peer closed since (restart): once more, afresh.
                            if attempt == 0 && reused && !timeout {
                                tracing::debug!(
                                    target: LOG_TARGET,
                                    peer,
                                    error = %source,
                                    "peer connection lost; retrying on a new one"
                                );
                                continue;
                            }
                            PeerError::Io { peer: peer.to_string(), source }
                        }
                        ResponseError::Protocol(reason) => PeerError::Protocol { peer: peer.to_string(), reason },
                        ResponseError::Refused(message) => PeerError::Refused { peer: peer.to_string(), message },
                    };
                    return Err(e);
                }
            }
        }
        unreachable!("the second attempt returns")
    }
}
