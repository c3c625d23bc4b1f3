//! What runs inside a pod VM.
//!
//! - [`forwarder`]: listens on the forwarder port and relays each connection
//!   to the kata agent's socket. (TLS and `apf.json` come with the agent-path
//!   work; today it relays bytes.)
//! - [`testing`]: finding the forwarder binary from other crates' tests.

pub mod forwarder;
pub mod testing;
