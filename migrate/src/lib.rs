//! shrink's migration: the stream protocol ([`protocol`], pure and KVM-free), the pre-copy
//! engine ([`precopy`]), Shrinker's deduplication, both its source and its destination half
//! ([`shrinker`]), and cluster orchestration.
#![warn(missing_docs)]

pub mod args;
pub mod client;
pub mod cluster;
pub mod orchestrate;
pub mod precopy;
pub mod progress;
pub mod protocol;
pub mod shrinker;
pub mod stats;
