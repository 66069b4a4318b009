//! shrink's tools, as a library their binaries and the integration tests share:
//!
//! - [`testbed`]: two sites in network namespaces on one machine (LANs, compute hosts, vnetd
//!   gateways, Redis, a shaped WAN), behind `shrink-testbed`;
//! - [`eval`]: the evaluation's runs and plots, behind `shrink-bench`;
//! - [`vnet`]: vnetd's own two-site testbed, behind `vnetd-bench` and vnetd's two-site tests;
//! - [`delayline`]: the WAN's one-way delay, in user space (`shrink-testbed delay-line`).
//!
//! `indexd-bench` measures the content index, Redis and the peer fetch path.
#![warn(missing_docs)]

pub mod delayline;
pub mod eval;
pub mod testbed;
pub mod vnet;
