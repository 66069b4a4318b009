//! What `query-migrate` answers, as types: the VMM serializes them (`Outgoing::info_json`, the
//! control loop's destination answer) and `shrink-migrate` deserializes them, so no statistic
//! is read by key. Counters absent from an answer read as 0 (`#[serde(default)]`), so that an
//! older VMM's answers still parse; the fields themselves are named once, here.

use serde::{Deserialize, Serialize};

pub use crate::precopy::Status;
use crate::precopy::{MigrationInfo, ReceiveStats};
use crate::shrinker::DedupStats;

/// A source's `query-migrate`: QEMU's fields, and the dedup counters with deduplication.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct SourceQuery {
    /// QEMU's `query-migrate` fields.
    #[serde(flatten)]
    pub info: MigrationInfo,
    /// The coordination's counters (with deduplication).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dedup: Option<DedupStats>,
}

/// Where resolved chunks came from, and what went wrong on the way.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct SiteStats {
    /// Found in this guest's own memory (intra-VM duplicates).
    pub local: u64,
    /// Fetched from another hypervisor of the site.
    pub peer: u64,
    /// Read from this site's image repository (content of the base image).
    pub repository: u64,
    /// Of `local`, disk blocks.
    pub disk_local: u64,
    /// Of `peer`, disk blocks.
    pub disk_peer: u64,
    /// Of `repository`, disk blocks.
    pub disk_repository: u64,
    /// Peer answers that did not match their digest (dropped, another holder tried).
    pub corrupt_from_peer: u64,
    /// Contents (one per digest) fetched from a holder after another holder of them failed
    /// (a corrupt answer, unreachable, or no longer holding it) in the same resolution.
    pub next_holder: u64,
    /// Peers that could not be reached.
    pub peer_errors: u64,
    /// Index operations that failed (the index is then left alone: content comes from the source).
    pub index_errors: u64,
    /// Chunks this VMM registered in the site index.
    pub registered: u64,
    /// Chunks this VMM served to peers.
    pub served: u64,
    /// Times this VMM re-registered everything it holds after the index came back.
    pub resyncs: u64,
    /// Why the index is not used, if it is not.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub warning: Option<String>,
}

/// How a VM arrived: what its stream carried, and where digest-only content came from.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct IncomingStats {
    /// What the stream carried.
    #[serde(flatten)]
    pub stream: ReceiveStats,
    /// Where digest-only content came from (with deduplication).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub site: Option<SiteStats>,
}

/// A destination's `query-migrate` once its guest runs.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct DestinationQuery {
    /// `completed`.
    pub status: Status,
    /// How the VM arrived.
    pub incoming: IncomingStats,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_round_trip_and_absent_counters_are_absent() {
        let mut q = SourceQuery::default();
        q.info.status = Status::Completed;
        q.info.ram.transferred = 42;
        q.dedup = Some(DedupStats { duplicate: 7, ..Default::default() });
        let v = serde_json::to_value(&q).unwrap();
        assert_eq!((v["status"].as_str(), v["ram"]["transferred"].as_u64()), (Some("completed"), Some(42)));
        let back: SourceQuery = serde_json::from_value(v).unwrap();
        assert_eq!((back.info.ram.transferred, back.dedup.unwrap().duplicate), (42, 7));
        let none: SourceQuery = serde_json::from_value(serde_json::json!({})).unwrap();
        assert!(none.dedup.is_none() && none.info.status == Status::None);
        let d: DestinationQuery = serde_json::from_value(serde_json::json!(
            {"status": "completed", "incoming": {"full": 3, "site": {"peer": 5}}}
        ))
        .unwrap();
        assert_eq!((d.incoming.stream.full, d.incoming.site.unwrap().peer), (3, 5));
        assert!(serde_json::from_value::<SourceQuery>(serde_json::json!({"status": "exploded"})).is_err());
    }
}
