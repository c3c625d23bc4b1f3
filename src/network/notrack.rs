//! The raw-table NOTRACK rules that keep the tunnels' UDP flows out of
//! conntrack in the host network namespace.
//!
//! Source: CAA `pkg/podnetwork/tunneler/vxlan/iptables.go`. Two chains of
//! the `raw` table, each jumped to from its base chain: `peerpod-OUTPUT`
//! (from `OUTPUT`) holds, per tunnel,
//! `-m comment --comment "peerpod [vni:N]" -d POD_VM_IP -p udp -m udp --dport PORT -j NOTRACK`
//! and `peerpod-PREROUTING` (from `PREROUTING`) the same with
//! `-s POD_VM_IP`. A chain left empty is removed with its jump.
//!
//! The rules are changed by the `iptables` program (the one on `PATH`, as
//! CAA's go-iptables does), started from a thread inside the namespace, with
//! `-w` (wait for the xtables lock) and one process-wide lock around each
//! operation (a chain's check-then-create is not atomic). These functions
//! block: call them from `spawn_blocking` or use [`super::tunnel`]'s async
//! ones.

use std::net::Ipv4Addr;
use std::process::Command;
use std::sync::Mutex;

use podvisor_podvm::network::netns::{Netns, NetnsError};
use serde::{Deserialize, Serialize};

/// The chain for the tunnels' outgoing UDP (source: CAA `iptables.go`,
/// `iptablesOutputChainName`).
pub const OUTPUT_CHAIN: &str = "peerpod-OUTPUT";
/// The chain for the tunnels' incoming UDP (source: CAA `iptables.go`,
/// `iptablesPreRoutingChainName`).
pub const PREROUTING_CHAIN: &str = "peerpod-PREROUTING";

/// One tunnel's NOTRACK rules (a rule in each chain).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct NotrackRule {
    /// The tunnel's VNI (its rules' comment is `peerpod [vni:N]`).
    pub vni: u32,
    /// The pod VM's IP: the destination of outgoing and the source of
    /// incoming tunnel packets.
    pub pod_vm_ip: Ipv4Addr,
    /// The tunnel's UDP destination port.
    pub port: u16,
}

/// What went wrong.
#[derive(Debug, thiserror::Error)]
pub enum NotrackError {
    /// The host namespace cannot be used, or `iptables` cannot be started.
    #[error("Cannot run iptables")]
    Netns(#[from] NetnsError),
    /// `iptables` ran and failed.
    #[error("iptables {args} failed ({status}): {stderr}")]
    Failed {
        /// Its arguments.
        args: String,
        /// Its exit status.
        status: String,
        /// What it printed on stderr.
        stderr: String,
    },
}

/// One `iptables` operation at a time in this process.
static LOCK: Mutex<()> = Mutex::new(());

/// The table of both chains.
const TABLE: &str = "raw";

/// A chain of ours, its base chain, and which side of the packet the pod
/// VM's IP is on.
struct Chain {
    /// Ours.
    name: &'static str,
    /// The built-in chain that jumps to ours.
    base: &'static str,
    /// `-d` (outgoing) or `-s` (incoming).
    address_flag: &'static str,
}

/// Both chains, in CAA's order.
const CHAINS: [Chain; 2] = [
    Chain {
        name: OUTPUT_CHAIN,
        base: "OUTPUT",
        address_flag: "-d",
    },
    Chain {
        name: PREROUTING_CHAIN,
        base: "PREROUTING",
        address_flag: "-s",
    },
];

/// The rules' comment (source: CAA `iptables.go`, `iptablesRules`).
#[must_use]
pub fn comment(vni: u32) -> String {
    format!("peerpod [vni:{vni}]")
}

/// The rule's specification in `chain`, as CAA writes it.
fn rule_spec(chain: &Chain, rule: &NotrackRule) -> Vec<String> {
    [
        "-m",
        "comment",
        "--comment",
        &comment(rule.vni),
        chain.address_flag,
        &rule.pod_vm_ip.to_string(),
        "-p",
        "udp",
        "-m",
        "udp",
        "--dport",
        &rule.port.to_string(),
        "-j",
        "NOTRACK",
    ]
    .map(str::to_owned)
    .to_vec()
}

/// Runs `iptables -w -t raw ARGS…` in `netns`; `Ok(true)` on exit 0,
/// `Ok(false)` on exit 1 when `one_is_no` (what `-C` and `-S CHAIN` answer
/// for "no such rule/chain"), else an error.
fn iptables(netns: &Netns, args: &[String], one_is_no: bool) -> Result<bool, NotrackError> {
    Ok(iptables_output(netns, args, one_is_no)?.is_some())
}

/// As [`iptables`], returning stdout on success.
fn iptables_output(
    netns: &Netns,
    args: &[String],
    one_is_no: bool,
) -> Result<Option<String>, NotrackError> {
    let output = netns.command_output(
        Command::new("iptables")
            .args(["-w", "5", "-t", TABLE])
            .args(args),
    )?;
    if output.status.success() {
        return Ok(Some(String::from_utf8_lossy(&output.stdout).into_owned()));
    }
    if one_is_no && output.status.code() == Some(1) {
        return Ok(None);
    }
    Err(NotrackError::Failed {
        args: args.join(" "),
        status: output.status.to_string(),
        stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
    })
}

/// Turns `&str`s into the argument vector.
fn args(parts: &[&str]) -> Vec<String> {
    parts.iter().map(|part| (*part).to_owned()).collect()
}

/// Adds `rule` in `netns` (both chains, created with their jumps when
/// missing); a rule already there is kept, not doubled. Blocking.
///
/// # Errors
/// [`NotrackError::Netns`], [`NotrackError::Failed`].
pub fn add(netns: &Netns, rule: &NotrackRule) -> Result<(), NotrackError> {
    let _guard = LOCK
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    for chain in &CHAINS {
        if !iptables(netns, &args(&["-S", chain.name]), true)? {
            iptables(netns, &args(&["-N", chain.name]), false)?;
        }
        let jump = args(&[chain.base, "-j", chain.name]);
        if !iptables(netns, &[vec!["-C".to_owned()], jump.clone()].concat(), true)? {
            iptables(netns, &[vec!["-A".to_owned()], jump].concat(), false)?;
        }
        let spec = rule_spec(chain, rule);
        let check = [args(&["-C", chain.name]), spec.clone()].concat();
        if !iptables(netns, &check, true)? {
            iptables(netns, &[args(&["-A", chain.name]), spec].concat(), false)?;
        }
    }
    Ok(())
}

/// Removes every rule of `vni` from both chains in `netns`, and a chain
/// left empty with its jump; absent rules or chains are not an error.
/// Returns how many rules were removed. Blocking.
///
/// # Errors
/// [`NotrackError::Netns`], [`NotrackError::Failed`].
pub fn remove(netns: &Netns, vni: u32) -> Result<usize, NotrackError> {
    let _guard = LOCK
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    remove_locked(netns, |rule_vni| rule_vni == vni).map(|removed| removed.len())
}

/// The tunnels' rules present in `netns` (one entry per rule of the
/// `peerpod-OUTPUT` chain, else of `peerpod-PREROUTING`), sorted by VNI.
/// Blocking.
///
/// # Errors
/// [`NotrackError::Netns`], [`NotrackError::Failed`].
pub fn list(netns: &Netns) -> Result<Vec<NotrackRule>, NotrackError> {
    let _guard = LOCK
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let mut rules = Vec::new();
    for chain in &CHAINS {
        for rule in chain_rules(netns, chain)? {
            if !rules
                .iter()
                .any(|known: &NotrackRule| known.vni == rule.vni)
            {
                rules.push(rule);
            }
        }
    }
    rules.sort_by_key(|rule| rule.vni);
    Ok(rules)
}

/// Removes the rules of every VNI for which `owned` is false (the
/// daemon's GC: VNIs no record owns), and chains left empty. Returns the
/// rules removed (one per rule). Blocking.
///
/// # Errors
/// [`NotrackError::Netns`], [`NotrackError::Failed`].
pub fn sweep(netns: &Netns, owned: impl Fn(u32) -> bool) -> Result<Vec<NotrackRule>, NotrackError> {
    let _guard = LOCK
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    remove_locked(netns, |vni| !owned(vni))
}

/// Removes the rules whose VNI `doomed` picks; the caller holds [`LOCK`].
fn remove_locked(
    netns: &Netns,
    doomed: impl Fn(u32) -> bool,
) -> Result<Vec<NotrackRule>, NotrackError> {
    let mut removed = Vec::new();
    for chain in &CHAINS {
        for rule in chain_rules(netns, chain)?
            .into_iter()
            .filter(|rule| doomed(rule.vni))
        {
            let spec = rule_spec(chain, &rule);
            iptables(netns, &[args(&["-D", chain.name]), spec].concat(), false)?;
            removed.push(rule);
        }
        // A chain exists and is empty: remove its jumps, then it.
        let Some(listing) = iptables_output(netns, &args(&["-S", chain.name]), true)? else {
            continue;
        };
        if listing.lines().any(|line| line.starts_with("-A ")) {
            continue;
        }
        let jump = args(&[chain.base, "-j", chain.name]);
        while iptables(netns, &[vec!["-C".to_owned()], jump.clone()].concat(), true)? {
            iptables(
                netns,
                &[vec!["-D".to_owned()], jump.clone()].concat(),
                false,
            )?;
        }
        iptables(netns, &args(&["-X", chain.name]), false)?;
    }
    Ok(removed)
}

/// Our rules in `chain` (none when the chain does not exist). Rules
/// without our comment are left out.
fn chain_rules(netns: &Netns, chain: &Chain) -> Result<Vec<NotrackRule>, NotrackError> {
    let listing = iptables_output(netns, &args(&["-S", chain.name]), true)?.unwrap_or_default();
    Ok(listing
        .lines()
        .filter_map(|line| parse_rule(line, chain))
        .collect())
}

/// Parses one `iptables -S` line of ours, e.g.
/// `-A peerpod-OUTPUT -d 192.168.1.2/32 -p udp -m comment --comment "peerpod [vni:555000]" -m udp --dport 4789 -j NOTRACK`.
fn parse_rule(line: &str, chain: &Chain) -> Option<NotrackRule> {
    let rest = line
        .strip_prefix("-A ")?
        .strip_prefix(chain.name)?
        .strip_prefix(' ')?;
    let vni = rest
        .split("\"peerpod [vni:")
        .nth(1)?
        .split("]\"")
        .next()?
        .parse()
        .ok()?;
    let mut words = rest.split_whitespace();
    let mut pod_vm_ip = None;
    let mut port = None;
    while let Some(word) = words.next() {
        if word == chain.address_flag {
            let address = words.next()?;
            let address = address.strip_suffix("/32").unwrap_or(address);
            pod_vm_ip = address.parse().ok();
        } else if word == "--dport" {
            port = words.next()?.parse().ok();
        }
    }
    Some(NotrackRule {
        vni,
        pod_vm_ip: pod_vm_ip?,
        port: port?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_listed_rule_parses_back_to_what_was_added() {
        let line = "-A peerpod-OUTPUT -d 192.168.1.2/32 -p udp -m comment --comment \"peerpod [vni:555000]\" -m udp --dport 4789 -j NOTRACK";
        assert_eq!(
            parse_rule(line, &CHAINS[0]),
            Some(NotrackRule {
                vni: 555_000,
                pod_vm_ip: Ipv4Addr::new(192, 168, 1, 2),
                port: 4789
            })
        );
        let line = "-A peerpod-PREROUTING -s 10.0.0.9/32 -p udp -m comment --comment \"peerpod [vni:7]\" -m udp --dport 8472 -j NOTRACK";
        assert_eq!(
            parse_rule(line, &CHAINS[1]).map(|rule| (rule.vni, rule.port)),
            Some((7, 8472))
        );
    }

    #[test]
    fn lines_that_are_not_ours_are_skipped() {
        assert_eq!(parse_rule("-N peerpod-OUTPUT", &CHAINS[0]), None);
        assert_eq!(
            parse_rule(
                "-A peerpod-OUTPUT -d 1.2.3.4/32 -p udp -m udp --dport 1 -j NOTRACK",
                &CHAINS[0]
            ),
            None
        );
        assert_eq!(
            parse_rule(
                "-A peerpod-OUTPUTX -d 1.2.3.4/32 -m comment --comment \"peerpod [vni:1]\" -p udp --dport 1",
                &CHAINS[0]
            )
            .map(|rule| rule.vni),
            // "peerpod-OUTPUTX" shares the prefix; the chain name must end.
            None
        );
    }
}
