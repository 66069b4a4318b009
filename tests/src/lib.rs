//! Helpers for tests that cross crates and hosts: network namespaces as hosts, veth pairs as
//! links (optionally shaped with `tc tbf` like a WAN), bridges as LANs. Everything is created
//! with unique names and removed on drop, even when the test panics.
#![warn(missing_docs)]

pub mod eval;
pub mod netns;
pub mod qemu;
pub mod testbed;
pub mod util;
pub mod world;
