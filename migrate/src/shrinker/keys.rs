//! Shrinker's Redis keys, both halves in one namespace, `shrink:`:
//!
//! | key | where | what |
//! |---|---|---|
//! | `shrink:coord:<run>:<dest site>:<digest>` (run: `<migration id>.<nonce>`) | the source site's coordination Redis | `SET NX` with a TTL: the first source VMM to send a chunk's content in full wins, the others send its digest |
//! | `shrink:index:<digest>` | the destination site's index Redis | the set of peer servers (`HOST:PORT`) holding the chunk (`SADD`, `SREM`, `SRANDMEMBER`, `SMEMBERS`) |
//!
//! Digests are raw bytes (32 for SHA-256, 20 for SHA-1), appended to the prefix.

/// The namespace literal, for the constants built from it (`concat!` takes literals only).
macro_rules! namespace {
    () => {
        "shrink:"
    };
}

/// The namespace of every key.
pub const NAMESPACE: &str = namespace!();

/// The prefix of the destination site index's keys (in [`NAMESPACE`] by construction).
pub const INDEX_PREFIX: &[u8] = concat!(namespace!(), "index:").as_bytes();

/// The prefix of one run's coordination keys toward `dest_site`.
pub fn coordination_prefix(migration_id: &str, dest_site: &str) -> Vec<u8> {
    format!("{NAMESPACE}coord:{migration_id}:{dest_site}:").into_bytes()
}

/// `prefix` followed by `digest`.
pub fn with_digest(prefix: &[u8], digest: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(prefix.len() + digest.len());
    k.extend_from_slice(prefix);
    k.extend_from_slice(digest);
    k
}

/// The site-index key of a digest.
pub fn index_key(digest: &[u8]) -> Vec<u8> {
    with_digest(INDEX_PREFIX, digest)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_halves_share_the_namespace() {
        assert_eq!(index_key(&[0x01, 0xff, 0x00]), b"shrink:index:\x01\xff\x00".to_vec());
        assert_eq!(with_digest(&coordination_prefix("m1", "siteB"), &[7]), b"shrink:coord:m1:siteB:\x07".to_vec());
    }

    #[test]
    fn keys_are_the_prefix_and_the_raw_digest() {
        assert_eq!(index_key(&[]), b"shrink:index:".to_vec());
    }
}
