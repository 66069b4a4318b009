//! `indexd`: the pieces of a cluster migration that let pages identical across VMs cross the WAN
//! once (Shrinker).
//!
//! - [`hash`]: chunk digests (SHA-256 or SHA-1, through OpenSSL).
//! - [`redis`]: the Redis index client — one Redis server or a Redis Cluster behind one type —
//!   with pipelined `SET NX` (source-site coordination) and `SADD`/`SREM`/`SRANDMEMBER`/`SMEMBERS`
//!   (destination-site holders of each digest).
//! - [`index`]: which guest chunks of this VMM hold which content.
//! - [`peer`]: serve and fetch chunks by digest between the hypervisors of one site, in batches.
//! - [`repo`]: the site's image repository as a content source: the chunks of each base image,
//!   published in the index Redis (`shrink-repo index`).
//! - [`tls`]: mutually authenticated TLS 1.3 between the cluster's hosts, from a cluster key.

pub mod hash;
pub mod index;
pub mod peer;
pub mod redis;
pub mod repo;
pub mod tls;

pub use hash::{digest, Algo, HashError};
pub use index::ContentIndex;
pub use peer::{ChunkSource, PeerClient, PeerError, PeerServer};
pub use redis::{Redis, RedisError, Target};

#[cfg(test)]
mod tests {
    fn send<T: Send>() {}
    fn send_sync<T: Send + Sync>() {}

    /// The migration engine moves these into worker threads.
    #[test]
    fn thread_safety() {
        send::<crate::Redis>();
        send::<crate::PeerClient>();
        send_sync::<crate::PeerServer>();
        send_sync::<crate::ContentIndex>();
    }
}
