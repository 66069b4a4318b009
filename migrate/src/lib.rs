//! shrink's migration: the stream protocol ([`protocol`], pure and KVM-free), and — as they
//! land — the pre-copy engine, source-side deduplication and cluster orchestration.
#![warn(missing_docs)]

pub mod args;
pub mod client;
pub mod cluster;
pub mod dedup;
pub mod keys;
pub mod orchestrate;
pub mod precopy;
pub mod protocol;
pub mod stats;
