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
//! Each operation reads the raw table with one `iptables-save -t raw` and
//! changes it with at most one `iptables-restore --noflush -w 5` (atomic;
//! waits up to 5 s for the xtables lock), the programs on `PATH` (CAA's
//! go-iptables runs `iptables` once per check and change instead),
//! started from a thread inside the namespace. One process-wide lock
//! serialises the operations (read-then-change is not atomic). These
//! functions block: call them from `spawn_blocking` or use
//! [`super::tunnel`]'s async ones.

use std::io::Write;
use std::net::Ipv4Addr;
use std::process::{Command, Stdio};
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
    /// `iptables-save` or `iptables-restore` ran and failed.
    #[error("{program} failed ({status}): {stderr}")]
    Failed {
        /// The program.
        program: &'static str,
        /// Its exit status.
        status: String,
        /// What it printed on stderr.
        stderr: String,
    },
}

/// The programs the rules are read and written with; on `PATH`.
pub const PROGRAMS: [&str; 2] = ["iptables-save", "iptables-restore"];

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

/// The rule's line in an `iptables-restore` script: `command` (`-A` or
/// `-D`), the chain, the specification with the comment quoted.
fn rule_line(command: &str, chain: &Chain, rule: &NotrackRule) -> String {
    let spec: Vec<String> = rule_spec(chain, rule)
        .into_iter()
        .map(|word| {
            if word.contains(' ') {
                format!("\"{word}\"")
            } else {
                word
            }
        })
        .collect();
    format!("{command} {} {}", chain.name, spec.join(" "))
}

/// The raw table as `iptables-save -t raw` prints it, reduced to what
/// these functions need.
#[derive(Debug, Default)]
struct RawTable {
    /// The chains declared (`:NAME POLICY [p:b]`).
    chains: Vec<String>,
    /// The rules (`-A CHAIN …`), in order.
    rules: Vec<String>,
}

impl RawTable {
    /// Reads it in `netns` (one `iptables-save`).
    fn read(netns: &Netns) -> Result<Self, NotrackError> {
        let output = netns.command_output(Command::new("iptables-save").args(["-t", TABLE]))?;
        if !output.status.success() {
            return Err(NotrackError::Failed {
                program: "iptables-save",
                status: output.status.to_string(),
                stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
            });
        }
        let mut table = Self::default();
        for line in String::from_utf8_lossy(&output.stdout).lines() {
            if let Some(declaration) = line.strip_prefix(':') {
                table
                    .chains
                    .extend(declaration.split_whitespace().next().map(str::to_owned));
            } else if line.starts_with("-A ") {
                table.rules.push(line.to_owned());
            }
        }
        Ok(table)
    }

    /// Whether `chain` exists.
    fn has_chain(&self, chain: &Chain) -> bool {
        self.chains.iter().any(|name| name == chain.name)
    }

    /// How many jumps from its base chain to `chain` there are.
    fn jumps(&self, chain: &Chain) -> usize {
        let jump = format!("-A {} -j {}", chain.base, chain.name);
        self.rules.iter().filter(|line| **line == jump).count()
    }

    /// How many rules `chain` holds, ours or not.
    fn rule_count(&self, chain: &Chain) -> usize {
        let prefix = format!("-A {} ", chain.name);
        self.rules
            .iter()
            .filter(|line| line.starts_with(&prefix))
            .count()
    }

    /// Our rules in `chain`.
    fn notrack_rules(&self, chain: &Chain) -> Vec<NotrackRule> {
        self.rules
            .iter()
            .filter_map(|line| parse_rule(line, chain))
            .collect()
    }
}

/// Applies `commands` (lines of the raw table's section) in `netns` with
/// one `iptables-restore --noflush`, atomically; nothing to do runs
/// nothing.
fn apply(netns: &Netns, commands: &[String]) -> Result<(), NotrackError> {
    if commands.is_empty() {
        return Ok(());
    }
    let script = format!("*{TABLE}\n{}\nCOMMIT\n", commands.join("\n"));
    let output = netns.run(move || {
        let mut child = Command::new("iptables-restore")
            .args(["-w", "5", "--noflush"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        if let Some(mut stdin) = child.stdin.take() {
            stdin.write_all(script.as_bytes())?;
        }
        child.wait_with_output()
    })?;
    let output = output.map_err(|source| {
        NotrackError::Netns(NetnsError::Command {
            program: "iptables-restore".to_owned(),
            path: netns.path().to_path_buf(),
            source,
        })
    })?;
    if output.status.success() {
        return Ok(());
    }
    Err(NotrackError::Failed {
        program: "iptables-restore",
        status: output.status.to_string(),
        stderr: format!(
            "{} (input: {})",
            String::from_utf8_lossy(&output.stderr).trim(),
            commands.join("; ")
        ),
    })
}

/// Adds `rule` in `netns` (both chains, created with their jumps when
/// missing); a rule already there is kept, not doubled. Blocking; one
/// `iptables-save` and at most one `iptables-restore`.
///
/// # Errors
/// [`NotrackError::Netns`], [`NotrackError::Failed`].
pub fn add(netns: &Netns, rule: &NotrackRule) -> Result<(), NotrackError> {
    let _guard = LOCK
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let table = RawTable::read(netns)?;
    let mut commands = Vec::new();
    for chain in &CHAINS {
        if !table.has_chain(chain) {
            commands.push(format!(":{} - [0:0]", chain.name));
        }
        if table.jumps(chain) == 0 {
            commands.push(format!("-A {} -j {}", chain.base, chain.name));
        }
        if !table.notrack_rules(chain).contains(rule) {
            commands.push(rule_line("-A", chain, rule));
        }
    }
    apply(netns, &commands)
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

/// The tunnels' rules present in `netns` (one entry per VNI, from the
/// `peerpod-OUTPUT` chain, else `peerpod-PREROUTING`), sorted by VNI.
/// Blocking.
///
/// # Errors
/// [`NotrackError::Netns`], [`NotrackError::Failed`].
pub fn list(netns: &Netns) -> Result<Vec<NotrackRule>, NotrackError> {
    let _guard = LOCK
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let table = RawTable::read(netns)?;
    let mut rules: Vec<NotrackRule> = Vec::new();
    for chain in &CHAINS {
        for rule in table.notrack_rules(chain) {
            if !rules.iter().any(|known| known.vni == rule.vni) {
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

/// Removes the rules whose VNI `doomed` picks, and each chain left empty
/// with its jumps, in one `iptables-restore`; the caller holds [`LOCK`].
fn remove_locked(
    netns: &Netns,
    doomed: impl Fn(u32) -> bool,
) -> Result<Vec<NotrackRule>, NotrackError> {
    let table = RawTable::read(netns)?;
    let mut removed = Vec::new();
    let mut commands = Vec::new();
    for chain in &CHAINS {
        let mut left = table.rule_count(chain);
        for rule in table
            .notrack_rules(chain)
            .into_iter()
            .filter(|rule| doomed(rule.vni))
        {
            commands.push(rule_line("-D", chain, &rule));
            removed.push(rule);
            left -= 1;
        }
        if table.has_chain(chain) && left == 0 {
            for _ in 0..table.jumps(chain) {
                commands.push(format!("-D {} -j {}", chain.base, chain.name));
            }
            commands.push(format!("-X {}", chain.name));
        }
    }
    apply(netns, &commands)?;
    Ok(removed)
}

/// Parses one `iptables-save` line of ours, e.g.
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
