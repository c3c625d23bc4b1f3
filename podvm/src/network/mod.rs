//! Pod networking primitives shared by both ends of the tunnel (the
//! worker node's daemon and the pod VM's forwarder), and the pod VM's end.
//!
//! - [`config`]: `apf.json`'s `pod-network` ([`config::PodNetwork`]), in
//!   CAA's JSON shape.
//! - [`link`]: a link's name and VNI from its netlink message.
//! - [`netns`]: run code, netlink requests and commands inside a given
//!   network namespace without moving the caller's thread.
//! - [`podnode`]: the pod VM's end: the pod namespace with the VXLAN
//!   tunnel to the worker as its interface ([`podnode::PodNode`]).

pub mod config;
pub mod link;
pub mod netns;
pub mod podnode;
