//! The local provider's configuration (the reference's `types.go`).

use crate::duration::parse_duration;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

/// Flags of `podvisor local`, each with its environment variable.
#[derive(clap::Args, Debug, Clone)]
pub struct LocalConfig {
    /// Directory holding each instance's state, user data and log
    /// [default: <state-dir>/local]
    // The comment is clap's help text, shown as written: `<state-dir>` is a
    // placeholder there, not HTML.
    #[allow(rustdoc::invalid_html_tags)]
    #[arg(long = "local-dir", env = "LOCAL_DIR", value_name = "DIR")]
    pub local_dir: Option<PathBuf>,

    /// The forwarder binary each instance runs
    /// [default: podvisor-forwarder next to the podvisor binary]
    #[arg(
        long = "forwarder-bin",
        env = "LOCAL_FORWARDER_BIN",
        value_name = "PATH"
    )]
    pub forwarder_bin: Option<PathBuf>,

    /// The kata agent socket each instance's forwarder relays to
    #[arg(
        long = "agent-socket",
        env = "LOCAL_AGENT_SOCKET",
        value_name = "PATH",
        default_value = "/run/kata-containers/agent.sock"
    )]
    pub agent_socket: PathBuf,

    /// Loopback range instance addresses are drawn from (within 127.0.0.0/8)
    #[arg(
        long = "address-range",
        env = "LOCAL_ADDRESS_RANGE",
        value_name = "CIDR",
        default_value = "127.64.0.0/10"
    )]
    pub address_range: AddressRange,

    /// Run each instance in a network namespace of its own, on a bridge
    /// of this daemon's namespace, as a cloud VM on its network (needs
    /// CAP_NET_ADMIN and CAP_SYS_ADMIN); addresses then come from
    /// --cloud-subnet
    #[arg(long = "netns-per-vm", env = "LOCAL_NETNS_PER_VM", value_parser = clap::builder::BoolishValueParser::new())]
    pub netns_per_vm: bool,

    /// With --netns-per-vm: the bridge the instances are plugged into
    /// (made if missing; at most 15 characters)
    #[arg(
        long = "cloud-bridge",
        env = "LOCAL_CLOUD_BRIDGE",
        value_name = "NAME",
        default_value = "pvcloud0"
    )]
    pub cloud_bridge: String,

    /// With --netns-per-vm: the instances' subnet; the bridge takes its
    /// first address, instances the others
    #[arg(
        long = "cloud-subnet",
        env = "LOCAL_CLOUD_SUBNET",
        value_name = "CIDR",
        default_value = "192.168.222.0/24"
    )]
    pub cloud_subnet: ipnet::Ipv4Net,

    /// Simulated cloud latency of each create (Go duration)
    #[arg(
        long = "create-delay",
        env = "LOCAL_CREATE_DELAY",
        value_name = "DURATION",
        default_value = "0s",
        value_parser = parse_duration
    )]
    pub create_delay: Duration,

    /// Simulated cloud latency of each delete (Go duration)
    #[arg(
        long = "delete-delay",
        env = "LOCAL_DELETE_DELAY",
        value_name = "DURATION",
        default_value = "0s",
        value_parser = parse_duration
    )]
    pub delete_delay: Duration,

    /// Simulated cloud latency of each lookup and listing (Go duration)
    #[arg(
        long = "lookup-delay",
        env = "LOCAL_LOOKUP_DELAY",
        value_name = "DURATION",
        default_value = "0s",
        value_parser = parse_duration
    )]
    pub lookup_delay: Duration,
}

/// An IPv4 range inside 127.0.0.0/8, written as CIDR.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AddressRange {
    /// The first address of the range.
    pub base: Ipv4Addr,
    /// The prefix length, 8 to 30.
    pub prefix: u8,
}

impl AddressRange {
    /// How many usable addresses the range has (network and broadcast excluded).
    pub fn usable(&self) -> u32 {
        (1u32 << (32 - self.prefix)) - 2
    }

    /// The `n`-th usable address (`n < usable()`).
    pub fn nth(&self, n: u32) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.base) + 1 + n % self.usable())
    }
}

impl FromStr for AddressRange {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (addr, prefix) = s
            .split_once('/')
            .ok_or_else(|| format!("'{s}' is not CIDR; write e.g. 127.64.0.0/10"))?;
        let addr: Ipv4Addr = addr
            .parse()
            .map_err(|_| format!("'{addr}' is not an IPv4 address"))?;
        let prefix: u8 = prefix
            .parse()
            .map_err(|_| format!("'{prefix}' is not a prefix length"))?;
        if !(8..=30).contains(&prefix) {
            return Err(format!("prefix /{prefix} must be between /8 and /30"));
        }
        if !addr.is_loopback() {
            return Err(format!(
                "{addr} is not a loopback address; use a range within 127.0.0.0/8"
            ));
        }
        let mask = u32::MAX << (32 - prefix);
        let base = Ipv4Addr::from(u32::from(addr) & mask);
        if base == Ipv4Addr::new(127, 0, 0, 0) && prefix == 8 {
            return Err("127.0.0.0/8 would hand out 127.0.0.1; use a smaller range".into());
        }
        Ok(Self { base, prefix })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn address_ranges_must_be_loopback_cidr() {
        let r: AddressRange = "127.64.0.0/10".parse().unwrap();
        assert_eq!(r.base, Ipv4Addr::new(127, 64, 0, 0));
        assert_eq!(r.usable(), (1 << 22) - 2);
        assert_eq!(r.nth(0), Ipv4Addr::new(127, 64, 0, 1));
        assert_eq!(r.nth(r.usable()), Ipv4Addr::new(127, 64, 0, 1), "wraps");
        let small: AddressRange = "127.9.9.5/30".parse().unwrap();
        assert_eq!(small.base, Ipv4Addr::new(127, 9, 9, 4));
        assert_eq!(
            (0..2).map(|n| small.nth(n)).collect::<Vec<_>>(),
            [Ipv4Addr::new(127, 9, 9, 5), Ipv4Addr::new(127, 9, 9, 6)]
        );
        for (bad, why) in [
            ("10.0.0.0/8", "not a loopback"),
            ("127.0.0.0/8", "127.0.0.1"),
            ("127.1.0.0", "not CIDR"),
            ("127.1.0.0/31", "between /8 and /30"),
            ("127.1.0.x/16", "not an IPv4"),
        ] {
            let err = bad.parse::<AddressRange>().unwrap_err();
            assert!(err.contains(why), "{bad}: {err}");
        }
    }
}
