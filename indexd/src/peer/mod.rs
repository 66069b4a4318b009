//! Serve and fetch chunks by digest between the hypervisors of one site.
//!
//! A destination VMM that needs content another VMM of its site already holds asks that VMM's
//! [`PeerServer`] for it with a [`PeerClient`], a whole batch of digests per request. The server
//! answers from its [`ChunkSource`] (which re-checks that the chunk still hashes to the digest);
//! the requester verifies what it receives, since the peer may have been overwritten, be broken,
//! or lie.
//!
//! # Wire protocol (version 1)
//!
//! TCP, little-endian integers, one request then its response, in turn, on a connection that
//! stays open for further requests.
//!
//! Request (client → server):
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 4 | magic `"SHKQ"` |
//! | 4 | 1 | version: 1 |
//! | 5 | 1 | operation: 1 = FETCH |
//! | 6 | 1 | digest length `L`, 1..=64 (20 for SHA-1, 32 for SHA-256) |
//! | 7 | 1 | reserved, 0 |
//! | 8 | 4 | `N`, number of digests, 1..=[`MAX_DIGESTS`] (4096) |
//! | 12 | `N`×`L` | the digests |
//!
//! Response (server → client):
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 4 | magic `"SHKA"` |
//! | 4 | 1 | version: 1 |
//! | 5 | 1 | status: 0 = OK, 1 = bad request, 2 = unsupported version |
//! | 6 | 2 | reserved, 0 |
//! | 8 | 4 | OK: `N` (the request's); error: length `M` of a message, ≤ 1024 |
//! | 12 | … | OK: `N` entries in request order; error: `M` bytes of UTF-8 message, then the server closes the connection |
//!
//! Entry:
//!
//! | size | field |
//! |---|---|
//! | 4 | chunk length `C` ≤ [`MAX_CHUNK`] (65536), or `0xFFFF_FFFF` = not held |
//! | `C` | the chunk's bytes (absent when not held) |
//!
//! # Bounds
//!
//! The server reads at most one request ahead (12 + 4096 × 64 bytes = 256 KiB), refuses any
//! header outside the limits above with an error response, produces a response while the socket
//! drains (at most about 1 MiB buffered per connection, whatever the batch), and serves at most
//! [`MAX_CONNECTIONS`] connections. The client refuses responses whose magic, version, count or
//! lengths are out of bounds. A client batch larger than 4096 digests goes as consecutive
//! requests on the same connection.
//!
//! # Layout
//!
//! - `wire`: the request and response encoding and decoding above, pure functions over byte
//!   buffers and [`Read`](std::io::Read)ers, and [`PeerError`], the error type of the whole module.
//! - `server`: [`PeerServer`], a `mio` event loop on its own thread that reads requests, answers
//!   them from a [`ChunkSource`] as the socket drains, and counts what it served.
//! - `client`: [`PeerClient`], blocking fetches that keep one connection per peer and split large
//!   batches into consecutive requests.
//!
//! What callers use is re-exported here (the paths are `indexd::peer::X`): the server, the
//! client, their error, the bounds above, and the request and response encoders and statuses
//! that tests use to speak the protocol by hand. The rest of `wire` stays inside the module.

mod client;
mod server;
mod wire;

pub use client::PeerClient;
pub use server::{ChunkSource, PeerServer, MAX_CONNECTIONS};
pub use wire::{
    encode_request, encode_response_header, PeerError, MAX_CHUNK, MAX_DIGESTS, STATUS_BAD_REQUEST, STATUS_BAD_VERSION,
    STATUS_OK,
};

/// The target of this module's log events, the same for all its files (it was one file).
const LOG_TARGET: &str = "indexd::peer";
