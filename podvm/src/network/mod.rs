//! Pod networking primitives shared by both ends of the tunnel (the
//! worker node's daemon and the pod VM's forwarder).
//!
//! - [`netns`]: run code, netlink requests and commands inside a given
//!   network namespace without moving the caller's thread.

pub mod config;
pub mod netns;
