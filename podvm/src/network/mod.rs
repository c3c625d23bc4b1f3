//! The pod VM side of the pod network.

pub mod config;
