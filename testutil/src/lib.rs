//! shrink's test utilities (a dev-only crate: product crates list it under
//! `[dev-dependencies]`; the tools crate, which runs testbeds, depends on it too):
//!
//! - [`fs`]: temporary directories removed on drop;
//! - [`ports`]: free loopback ports outside the kernel's ephemeral range;
//! - [`util`]: waiting on conditions (never a fixed sleep), log tails, the machine, bench output;
//! - [`process`]: child processes killed on drop, in a namespace or in the background;
//! - [`netns`]: network namespaces as hosts, veth pairs as links (shaped like WANs), bridges;
//! - [`world`]: hosts on one switch, with `redis-server`s inside them;
//! - [`redis`]: real `redis-server` processes, single or a three-node Redis Cluster;
//! - [`qemu`]: QEMU launched on the project's CPU model, and a QMP client.
//!
//! Everything is created with unique names and removed on drop, even when the test panics.
#![warn(missing_docs)]

pub mod fs;
pub mod netns;
pub mod ports;
pub mod process;
pub mod qemu;
pub mod redis;
pub mod util;
pub mod world;
