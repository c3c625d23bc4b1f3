//! What runs inside a pod VM.
//!
//! - [`forwarder`]: listens on the forwarder port, terminates mutual TLS
//!   as `apf.json` says, and relays each connection to the kata agent's
//!   socket.
//! - [`userdata`]: provisioning from user data (`podvisor-userdata`): find
//!   it, parse it strictly, write the allow-listed `/run/peerpod` files and
//!   the initdata digest.
//! - [`tls`]: the TLS policy (least version, cipher suites) both ends of
//!   the agent path share.
//! - [`testing`]: finding these binaries from other crates' tests.

pub mod forwarder;
pub mod testing;
pub mod tls;
pub mod userdata;
