//! Chunk digests: SHA-256 (the default: collision resistant, safe for a cross-VM index) or SHA-1
//! (the Shrinker paper's choice, faster on hosts without SHA-NI but with practical chosen-prefix
//! collisions). Both go through OpenSSL's one-shot functions.

use thiserror::Error;

/// Errors of this module.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum HashError {
    /// The name is neither `sha256` nor `sha1`.
    #[error("unknown hash algorithm {0:?} (expected \"sha256\" or \"sha1\")")]
    UnknownAlgo(String),
}

/// A digest algorithm.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Algo {
    /// SHA-256, 32-byte digests.
    Sha256,
    /// SHA-1, 20-byte digests.
    Sha1,
}

impl Algo {
    /// Length of a digest in bytes: 32 for SHA-256, 20 for SHA-1.
    #[allow(clippy::len_without_is_empty)]
    pub fn len(self) -> usize {
        match self {
            Algo::Sha256 => 32,
            Algo::Sha1 => 20,
        }
    }

    /// Parses `"sha256"` or `"sha1"` (ASCII case-insensitive; `"sha-256"`/`"sha-1"` too).
    pub fn parse(s: &str) -> Result<Algo, HashError> {
        match s.to_ascii_lowercase().as_str() {
            "sha256" | "sha-256" => Ok(Algo::Sha256),
            "sha1" | "sha-1" => Ok(Algo::Sha1),
            _ => Err(HashError::UnknownAlgo(s.to_string())),
        }
    }

    /// The canonical name, accepted back by [`Algo::parse`].
    pub fn name(self) -> &'static str {
        match self {
            Algo::Sha256 => "sha256",
            Algo::Sha1 => "sha1",
        }
    }
}

impl std::fmt::Display for Algo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Algo {
    type Err = HashError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Algo::parse(s)
    }
}

/// The digest of `data` with `algo` (`algo.len()` bytes).
pub fn digest(algo: Algo, data: &[u8]) -> Vec<u8> {
    match algo {
        Algo::Sha256 => openssl::sha::sha256(data).to_vec(),
        Algo::Sha1 => openssl::sha::sha1(data).to_vec(),
    }
}

/// Whether `data` hashes to `expected` with `algo` (what a requester checks on a fetched chunk).
pub fn verify(algo: Algo, data: &[u8], expected: &[u8]) -> bool {
    expected.len() == algo.len() && digest(algo, data) == expected
}

/// Lower-case hex of `bytes` (logs and messages).
pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_vectors() {
        // FIPS 180-2 examples.
        assert_eq!(
            hex(&digest(Algo::Sha256, b"abc")),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(hex(&digest(Algo::Sha256, b"")), "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
        assert_eq!(hex(&digest(Algo::Sha1, b"abc")), "a9993e364706816aba3e25717850c26c9cd0d89d");
        assert_eq!(hex(&digest(Algo::Sha1, b"")), "da39a3ee5e6b4b0d3255bfef95601890afd80709");
        assert_eq!(
            hex(&digest(Algo::Sha1, b"abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq")),
            "84983e441c3bd26ebaae4aa1f95129e5e54670f1"
        );
        // A zero page.
        assert_eq!(
            hex(&digest(Algo::Sha256, &[0u8; 4096])),
            "ad7facb2586fc6e966c004d7d1d16b024f5805ff7cb47c7a85dabd8b48892ca7"
        );
    }

    #[test]
    fn lengths_names_parse() {
        for a in [Algo::Sha256, Algo::Sha1] {
            assert_eq!(digest(a, b"x").len(), a.len());
            assert_eq!(Algo::parse(a.name()), Ok(a));
            assert_eq!(a.name().parse::<Algo>(), Ok(a));
        }
        assert_eq!(Algo::Sha256.len(), 32);
        assert_eq!(Algo::Sha1.len(), 20);
        assert_eq!(Algo::parse("SHA256"), Ok(Algo::Sha256));
        assert_eq!(Algo::parse("sha-1"), Ok(Algo::Sha1));
        let e = Algo::parse("md5").unwrap_err();
        assert!(e.to_string().contains("md5"), "{e}");
    }

    #[test]
    fn verify_checks_content_and_length() {
        let d = digest(Algo::Sha1, b"page");
        assert!(verify(Algo::Sha1, b"page", &d));
        assert!(!verify(Algo::Sha1, b"pagf", &d));
        assert!(!verify(Algo::Sha256, b"page", &d));
    }
}
