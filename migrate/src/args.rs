//! The arguments of the VMM's `migrate` command: one typed struct that the VMM parses (unknown
//! fields refused) and that `shrink-migrate` and the orchestrator build, so the three cannot
//! drift apart.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::precopy::Params;
use crate::protocol::DigestKind;
use crate::shrinker::DedupConfig;

/// A `migrate` request that cannot be carried out.
#[derive(Debug, thiserror::Error)]
pub enum ArgsError {
    /// Not the shape of [`MigrateArgs`] (a missing, unknown or mistyped field).
    #[error("migrate arguments: {0}")]
    Shape(#[from] serde_json::Error),
    /// A field with a value out of its range.
    #[error("migrate argument \"{field}\": {why}")]
    Invalid {
        /// The field.
        field: &'static str,
        /// Why.
        why: String,
    },
}

/// The `migrate` command's arguments (QEMU's names where QEMU has one).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MigrateArgs {
    /// The destination, `tcp:HOST:PORT`.
    pub uri: String,
    /// Longest acceptable pause of the guest, ms (300).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub downtime_limit_ms: Option<u64>,
    /// Upper bound of the sending rate, bytes/s.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_bandwidth: Option<u64>,
    /// Give up after this many dirty passes without converging.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_iterations: Option<u32>,
    /// Throttle a guest that dirties memory faster than the link carries it.
    #[serde(default)]
    pub auto_converge: bool,
    /// Send a digest of all memory at pause; the destination refuses on a mismatch.
    #[serde(default)]
    pub verify: bool,
    /// Send full chunks compressed with zstd when that makes them at least an eighth smaller.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub compress: bool,
    /// How long a destination may neither answer nor take the stream, ms (120 000).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verdict_timeout_ms: Option<u64>,
    /// The source site's index Redis, where its image repository is indexed (`shrink-repo
    /// index`): there the source finds the digest of its disk's base image (to learn whether
    /// the destination's repository holds it) and, with deduplication, its content (which then
    /// travels as digests). Without it the source reads the base image to find out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repository: Option<String>,
    /// Do not send content equal to the base image's as repository digests (the disk still
    /// sends only its own blocks when the destination holds the base image).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub no_repository_content: bool,
    /// Cross-VM deduplication (Shrinker); plain pre-copy without it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dedup: Option<DedupArgs>,
}

/// The `dedup` object of [`MigrateArgs`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DedupArgs {
    /// The source site's coordination Redis (`redis://HOST:PORT`, or several for a cluster);
    /// empty for none (one VM moving alone: only content the destination's repository holds
    /// travels as digests).
    pub coordination: String,
    /// The namespace of the coordination keys: the run of the cluster migration this VM's move
    /// is part of (`shrink-migrate` passes `<migration_id>.<nonce>`; every VM of one run shares it).
    pub migration_id: String,
    /// The destination site.
    pub dest_site: String,
    /// `sha256` or `sha1`.
    #[serde(default = "default_digest")]
    pub digest: String,
    /// Chunk size: 512, 1024, 2048 or 4096 bytes.
    #[serde(default = "default_chunk")]
    pub chunk: u32,
    /// Lifetime of the coordination keys, seconds.
    #[serde(default = "default_ttl")]
    pub ttl_s: u64,
}

fn default_digest() -> String {
    "sha256".into()
}
fn default_chunk() -> u32 {
    4096
}
/// The coordination keys' default lifetime, seconds.
pub const DEFAULT_TTL_S: u64 = 3600;

fn default_ttl() -> u64 {
    DEFAULT_TTL_S
}

impl MigrateArgs {
    /// Parses the arguments of a `migrate` request.
    pub fn from_json(v: &serde_json::Value) -> Result<MigrateArgs, ArgsError> {
        Ok(MigrateArgs::deserialize(v)?)
    }

    /// The arguments as a `migrate` request's JSON.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::to_value(self).expect("MigrateArgs is plain data")
    }

    /// The engine's parameters, and the dedup configuration if any.
    pub fn params(&self) -> Result<(Params, Option<DedupConfig>), ArgsError> {
        let mut p = Params::default();
        if let Some(ms) = self.downtime_limit_ms {
            p.downtime_limit = Duration::from_millis(ms);
        }
        if let Some(ms) = self.verdict_timeout_ms {
            if ms == 0 {
                return Err(ArgsError::Invalid { field: "verdict_timeout_ms", why: "must be at least 1".into() });
            }
            p.verdict_timeout = Duration::from_millis(ms);
        }
        p.max_bandwidth = self.max_bandwidth;
        p.max_iterations = self.max_iterations;
        p.auto_converge = self.auto_converge;
        p.verify = self.verify;
        p.compress = self.compress;
        let Some(d) = &self.dedup else { return Ok((p, None)) };
        let algo = indexd::hash::Algo::parse(&d.digest)
            .map_err(|e| ArgsError::Invalid { field: "dedup.digest", why: e.to_string() })?;
        if !crate::protocol::CHUNK_SIZES.contains(&(d.chunk as usize)) {
            return Err(ArgsError::Invalid {
                field: "dedup.chunk",
                why: format!("{} is not one of {:?}", d.chunk, crate::protocol::CHUNK_SIZES),
            });
        }
        p.chunk_size = d.chunk as usize;
        p.digest = DigestKind::of(algo);
        let cfg = DedupConfig {
            coordination: d.coordination.clone(),
            migration_id: d.migration_id.clone(),
            dest_site: d.dest_site.clone(),
            algo,
            ttl_s: d.ttl_s,
        };
        Ok((p, Some(cfg)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn arguments_parse_into_parameters() {
        let a = MigrateArgs::from_json(&json!({"uri": "tcp:10.0.0.2:7000", "downtime_limit_ms": 100,
            "max_bandwidth": 12500000, "max_iterations": 30, "auto_converge": true}))
        .unwrap();
        let (p, d) = a.params().unwrap();
        assert_eq!(a.uri, "tcp:10.0.0.2:7000");
        assert_eq!(p.downtime_limit, Duration::from_millis(100));
        assert_eq!(
            (p.max_bandwidth, p.max_iterations, p.auto_converge, p.verify),
            (Some(12_500_000), Some(30), true, false)
        );
        assert!(d.is_none());
        assert_eq!(MigrateArgs::from_json(&a.to_json()).unwrap(), a, "what is built is what is parsed");
    }

    #[test]
    fn dedup_arguments_take_defaults_and_are_checked() {
        let v = json!({"uri": "tcp:h:1", "dedup": {"coordination": "redis://a:6379", "migration_id": "m", "dest_site": "B"}});
        let (p, d) = MigrateArgs::from_json(&v).unwrap().params().unwrap();
        let d = d.unwrap();
        assert_eq!(
            (p.chunk_size, p.digest, d.ttl_s, d.algo),
            (4096, DigestKind::Sha256, 3600, indexd::hash::Algo::Sha256)
        );
        let mut bad = v.clone();
        bad["dedup"]["chunk"] = json!(3000);
        let e = MigrateArgs::from_json(&bad).unwrap().params().unwrap_err().to_string();
        assert!(e.contains("dedup.chunk") && e.contains("3000"), "{e}");
        bad["dedup"]["chunk"] = json!(512);
        bad["dedup"]["digest"] = json!("md5");
        let e = MigrateArgs::from_json(&bad).unwrap().params().unwrap_err().to_string();
        assert!(e.contains("dedup.digest"), "{e}");
    }

    #[test]
    fn bad_requests_name_the_field() {
        let e = |v: serde_json::Value| MigrateArgs::from_json(&v).unwrap_err().to_string();
        assert!(e(json!({})).contains("missing field `uri`"));
        assert!(e(json!({"uri": "tcp:a:1", "speed": 1})).contains("unknown field `speed`"));
        assert!(e(json!({"uri": "tcp:a:1", "max_bandwidth": -5})).contains("invalid value"));
        assert!(e(json!({"uri": "tcp:a:1", "dedup": {"coordination": "x", "migration_id": "m"}})).contains("dest_site"));
        assert!(e(json!({"uri": "tcp:a:1", "verify": "yes"})).contains("invalid type"));
        let z = MigrateArgs::from_json(&json!({"uri": "tcp:a:1", "verdict_timeout_ms": 0})).unwrap();
        assert!(z.params().unwrap_err().to_string().contains("verdict_timeout_ms"));
    }
}
