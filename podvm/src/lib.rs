//! What runs inside a pod VM.
//!
//! - [`forwarder`]: listens on the forwarder port and relays each connection
//!   to the kata agent's socket. (TLS and `apf.json` come with the agent-path
//!   work; today it relays bytes.)
//! - [`userdata`]: provisioning from user data (`podvisor-userdata`): find
//!   it, parse it strictly, write the allow-listed `/run/peerpod` files and
//!   the initdata digest.
//! - [`testing`]: finding these binaries from other crates' tests.

pub mod forwarder;
pub mod testing;
pub mod userdata;
