//! `vnetd`: a ViNe-style user-level virtual-network router for the site gateways.
//!
//! After a VM migrates from one site to another it keeps its IP address and its ARP
//! cache. `vnetd` runs on every site gateway, detects the move from what it sees on the
//! LAN (QEMU's RARP announcement, or a gratuitous ARP for an address another site
//! serves), and reconfigures the virtual network: a /32 host route with a higher
//! sequence number in every router's GNDT, the LNDTs updated, gratuitous and proxy ARP
//! on the source LAN, and directed ARP updates to the migrated VM on the destination
//! LAN (chapter 5 of the thesis, section 5.5).
//!
//! Modules: [`frames`] (ARP/RARP/IPv4 parse and build), [`tables`] (HWDT, LNDT, GNDT),
//! [`proto`] (authenticated router-to-router messages), [`router`] (the pure state
//! machine), [`daemon`] (pcap + mio event loop, control socket) and [`config`]. The
//! two-site testbed of its integration tests and benchmark is `shrink_tools::vnet`.

pub mod config;
#[cfg(feature = "daemon")]
pub mod daemon;
pub mod frames;
pub mod proto;
pub mod router;
pub mod tables;
