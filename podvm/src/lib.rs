//! What runs inside a pod VM.
//!
//! - [`forwarder`]: listens on the forwarder port, terminates mutual TLS
//!   as `apf.json` says, and relays each connection to the kata agent's
//!   socket.
//! - [`userdata`]: provisioning from user data (`podvisor-userdata`): find
//!   it, parse it strictly, write the allow-listed `/run/peerpod` files and
//!   the initdata digest.
//! - [`initdata`]: the initdata document in its three forms (raw TOML,
//!   gzip + base64, parsed with its digest).
//! - [`network`]: pod networking primitives shared with the worker side
//!   (running work inside a network namespace).
//! - [`tls`]: the TLS policy (least version, cipher suites) both ends of
//!   the agent path share.
//! - `testing` (feature `testing`): test support for other crates' tests:
//!   finding these binaries, free loopback ports.

pub mod forwarder;
pub mod initdata;
pub mod network;
#[cfg(feature = "testing")]
pub mod testing;
pub mod tls;
pub mod userdata;
