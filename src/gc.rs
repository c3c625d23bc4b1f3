//! The orphan GC's decision: which node-tagged instances no record owns,
//! and which of those it may delete.
//!
//! An instance is deleted only when this daemon's own journal, found intact
//! at start-up, says nobody owns it: it carries this journal's id
//! (`podvisor.io/journal`), no record holds its token or id, and it is older
//! than the grace period. Everything else unowned is left alone and
//! reported, with the reason, for an operator to decide.

use podvisor_providers::{Instance, TAG_JOURNAL, TAG_JOURNAL_SEQ, TAG_SANDBOX, TAG_TOKEN};
use podvisor_state::{InstanceRecord, UnixMillis};
use std::collections::{HashMap, HashSet};
use std::time::Duration;

/// What the GC knows besides the instances.
pub struct Ownership<'a> {
    /// Every durable record.
    pub records: &'a [InstanceRecord],
    /// Sandbox ids whose records sit in quarantine: their instances are
    /// never collected (the record may be readable by a newer podvisor).
    pub quarantined: &'a HashSet<String>,
    /// This daemon's journal id.
    pub journal_id: &'a str,
    /// Whether the journal was found intact (or fresh) at start-up; a
    /// journal in doubt never drives a delete.
    pub journal_trusted: bool,
    /// The journal's durable write sequence when it was opened.
    pub journal_seq_at_open: u64,
    /// Sandboxes this run of the daemon has known (created or recovered):
    /// their instances' sequence tags may be above `journal_seq_at_open`.
    pub known_sandboxes: &'a HashSet<String>,
}

// By hand: the records carry pods' initdata; their count says enough.
impl std::fmt::Debug for Ownership<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ownership")
            .field("records", &self.records.len())
            .field("quarantined", &self.quarantined)
            .field("journal_id", &self.journal_id)
            .field("journal_trusted", &self.journal_trusted)
            .field("journal_seq_at_open", &self.journal_seq_at_open)
            .field("known_sandboxes", &self.known_sandboxes)
            .finish()
    }
}

/// Why an unowned instance was left alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Spared {
    /// The journal may have lost the record that owns it.
    JournalInDoubt,
    /// Another journal answers for it: a daemon whose state directory was
    /// wiped, or a second daemon with this node's name.
    OtherJournal,
    /// It names no journal (made before journals had identities, or by
    /// hand): nobody can say it is an orphan.
    Untagged,
    /// An orphan, but younger than the grace period.
    WithinGrace,
}

impl Spared {
    /// Every reason, for metrics.
    pub const ALL: [Spared; 4] = [
        Spared::JournalInDoubt,
        Spared::OtherJournal,
        Spared::Untagged,
        Spared::WithinGrace,
    ];

    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Spared::JournalInDoubt => "journal_in_doubt",
            Spared::OtherJournal => "other_journal",
            Spared::Untagged => "untagged",
            Spared::WithinGrace => "within_grace",
        }
    }
}

/// One GC pass's decision.
#[derive(Debug, Default)]
pub struct Decision {
    /// Orphans of this journal, past the grace period: to delete.
    pub orphans: Vec<Instance>,
    /// Unowned instances left alone, and why.
    pub spared: Vec<(Instance, Spared)>,
    /// Set when an instance of this journal was created at a write the
    /// journal, as opened, does not hold: the journal is older than its
    /// instances (restored from a copy) and must be declared in doubt.
    pub journal_older_than: Option<(Instance, u64)>,
}

/// Decides one pass: see the module documentation. `first_seen` remembers
/// when the GC first saw each unowned instance that reports no creation
/// time (the grace counts from then); it is updated here.
pub fn select_orphans(
    instances: &[Instance],
    owners: &Ownership<'_>,
    first_seen: &mut HashMap<String, UnixMillis>,
    now: UnixMillis,
    grace: Duration,
) -> Decision {
    let tokens: HashSet<&str> = owners
        .records
        .iter()
        .filter_map(|r| r.token.as_deref())
        .collect();
    let ids: HashSet<&str> = owners
        .records
        .iter()
        .filter_map(|r| r.instance.as_ref().map(|i| i.id.as_str()))
        .collect();
    let grace_ms = grace.as_millis() as u64;
    let mut decision = Decision::default();
    let mut seen_now = HashSet::new();
    for instance in instances {
        let owned = ids.contains(instance.id.as_str())
            || instance
                .tags
                .get(TAG_TOKEN)
                .is_some_and(|t| tokens.contains(t.as_str()))
            || instance
                .tags
                .get(TAG_SANDBOX)
                .is_some_and(|s| owners.quarantined.contains(s));
        if owned {
            continue;
        }
        // Made at a write this journal did not hold when it was opened, by
        // a sandbox this run never knew: the journal is older than it.
        let made_after_open = instance
            .tags
            .get(TAG_JOURNAL_SEQ)
            .and_then(|s| s.parse::<u64>().ok())
            .filter(|seq| *seq > owners.journal_seq_at_open)
            .filter(|_| {
                !instance
                    .tags
                    .get(TAG_SANDBOX)
                    .is_some_and(|s| owners.known_sandboxes.contains(s))
            });
        let spared = match instance.tags.get(TAG_JOURNAL) {
            None => Some(Spared::Untagged),
            Some(j) if j != owners.journal_id => Some(Spared::OtherJournal),
            Some(_) if !owners.journal_trusted => Some(Spared::JournalInDoubt),
            Some(_) if made_after_open.is_some() => {
                if decision.journal_older_than.is_none() {
                    decision.journal_older_than =
                        made_after_open.map(|seq| (instance.clone(), seq));
                }
                Some(Spared::JournalInDoubt)
            }
            Some(_) => None,
        };
        if let Some(reason) = spared {
            decision.spared.push((instance.clone(), reason));
            continue;
        }
        seen_now.insert(instance.id.clone());
        let since = match instance.created_at {
            Some(t) => t,
            None => *first_seen.entry(instance.id.clone()).or_insert(now),
        };
        if now.saturating_sub(since) >= grace_ms {
            decision.orphans.push(instance.clone());
        } else {
            decision
                .spared
                .push((instance.clone(), Spared::WithinGrace));
        }
    }
    // Forget instances that are gone or owned now.
    first_seen.retain(|id, _| seen_now.contains(id));
    decision
}

#[cfg(test)]
mod tests {
    use super::*;
    use podvisor_providers::InstanceStatus;
    use podvisor_state::{InstanceRef, InstanceSpec};
    use std::collections::BTreeMap;

    const JOURNAL: &str = "0123456789abcdef0123456789abcdef";

    fn instance(id: &str, token: &str, sandbox: &str, created_at: Option<u64>) -> Instance {
        Instance {
            id: id.into(),
            name: format!("podvm-{id}"),
            ips: vec![],
            tags: BTreeMap::from([
                (TAG_TOKEN.into(), token.into()),
                (TAG_SANDBOX.into(), sandbox.into()),
                (TAG_JOURNAL.into(), JOURNAL.into()),
            ]),
            created_at,
            status: InstanceStatus::Running,
        }
    }

    fn record(id: &str, token: Option<&str>, instance: Option<&str>) -> InstanceRecord {
        let mut r = InstanceRecord::pending(id, "p", "n", InstanceSpec::default(), 0);
        r.token = token.map(str::to_owned);
        r.instance = instance.map(|i| InstanceRef {
            id: i.into(),
            ips: vec![],
        });
        r
    }

    #[test]
    fn only_old_unowned_instances_are_orphans() {
        let grace = Duration::from_secs(60);
        let now = 1_000_000;
        let instances = vec![
            instance("i-owned-by-token", "t1", "s1", Some(0)),
            instance("i-owned-by-id", "t-old", "s2", Some(0)),
            instance("i-orphan", "t9", "s9", Some(0)),
            instance("i-young", "t8", "s8", Some(now - 1000)),
            instance("i-quarantined", "t7", "sq", Some(0)),
        ];
        let records = vec![
            record("s1", Some("t1"), None),
            record("s2", Some("t2"), Some("i-owned-by-id")),
        ];
        let quarantined = HashSet::from(["sq".to_owned()]);
        let owners = Ownership {
            records: &records,
            quarantined: &quarantined,
            journal_id: JOURNAL,
            journal_trusted: true,
            journal_seq_at_open: 100,
            known_sandboxes: &HashSet::new(),
        };
        let mut first_seen = HashMap::new();
        let decision = select_orphans(&instances, &owners, &mut first_seen, now, grace);
        let ids: Vec<_> = decision.orphans.iter().map(|i| i.id.as_str()).collect();
        assert_eq!(ids, ["i-orphan"]);
        let spared: Vec<_> = decision
            .spared
            .iter()
            .map(|(i, why)| (i.id.as_str(), *why))
            .collect();
        assert_eq!(spared, [("i-young", Spared::WithinGrace)]);
    }

    #[test]
    fn only_this_intact_journal_s_instances_are_ever_deleted() {
        let grace = Duration::from_secs(60);
        let quarantined = HashSet::new();
        let mut foreign = instance("i-foreign", "t1", "s1", Some(0));
        foreign.tags.insert(TAG_JOURNAL.into(), "f".repeat(32));
        let mut untagged = instance("i-untagged", "t2", "s2", Some(0));
        untagged.tags.remove(TAG_JOURNAL);
        let ours = instance("i-ours", "t3", "s3", Some(0));
        let instances = vec![foreign, untagged, ours];
        for (trusted, deleted, ours_spared) in [
            (true, vec!["i-ours"], None),
            (false, vec![], Some(Spared::JournalInDoubt)),
        ] {
            let owners = Ownership {
                records: &[],
                quarantined: &quarantined,
                journal_id: JOURNAL,
                journal_trusted: trusted,
                journal_seq_at_open: 100,
                known_sandboxes: &HashSet::new(),
            };
            let d = select_orphans(&instances, &owners, &mut HashMap::new(), 1_000_000, grace);
            let ids: Vec<_> = d.orphans.iter().map(|i| i.id.as_str()).collect();
            assert_eq!(ids, deleted, "trusted: {trusted}");
            let mut spared: Vec<_> = d.spared.iter().map(|(i, w)| (i.id.as_str(), *w)).collect();
            spared.sort();
            let mut want = vec![
                ("i-foreign", Spared::OtherJournal),
                ("i-untagged", Spared::Untagged),
            ];
            if let Some(why) = ours_spared {
                want.push(("i-ours", why));
            }
            want.sort();
            assert_eq!(spared, want, "trusted: {trusted}");
        }
    }

    #[test]
    fn an_instance_made_after_what_the_journal_holds_puts_the_journal_in_doubt() {
        let quarantined = HashSet::new();
        let tagged = |id: &str, sandbox: &str, seq: &str| {
            let mut i = instance(id, &format!("t-{id}"), sandbox, Some(0));
            i.tags.insert(TAG_JOURNAL_SEQ.into(), seq.into());
            i
        };
        let instances = vec![
            tagged("i-old", "s-old", "90"),
            tagged("i-restored-away", "s-lost", "101"),
            tagged("i-this-run", "s-known", "150"),
        ];
        let known = HashSet::from(["s-known".to_owned()]);
        let owners = Ownership {
            records: &[],
            quarantined: &quarantined,
            journal_id: JOURNAL,
            journal_trusted: true,
            journal_seq_at_open: 100,
            known_sandboxes: &known,
        };
        let d = select_orphans(
            &instances,
            &owners,
            &mut HashMap::new(),
            1_000_000,
            Duration::from_secs(60),
        );
        let deleted: Vec<_> = d.orphans.iter().map(|i| i.id.as_str()).collect();
        // The old orphan and this run's are ordinary orphans; the one made
        // after the journal's last write is left, and condemns the journal.
        assert_eq!(deleted, ["i-old", "i-this-run"]);
        assert_eq!(
            d.spared
                .iter()
                .map(|(i, w)| (i.id.as_str(), *w))
                .collect::<Vec<_>>(),
            [("i-restored-away", Spared::JournalInDoubt)]
        );
        let (instance, seq) = d.journal_older_than.unwrap();
        assert_eq!((instance.id.as_str(), seq), ("i-restored-away", 101));
    }

    #[test]
    fn without_a_creation_time_the_grace_counts_from_first_sight() {
        let grace = Duration::from_secs(60);
        let quarantined = HashSet::new();
        let owners = Ownership {
            records: &[],
            quarantined: &quarantined,
            journal_id: JOURNAL,
            journal_trusted: true,
            journal_seq_at_open: 100,
            known_sandboxes: &HashSet::new(),
        };
        let mut first_seen = HashMap::new();
        let instances = vec![instance("i-x", "t", "s", None)];
        let mut pass = |now| select_orphans(&instances, &owners, &mut first_seen, now, grace);
        assert!(pass(1_000).orphans.is_empty());
        assert!(pass(50_000).orphans.is_empty());
        assert_eq!(pass(61_000).orphans.len(), 1);
        // Gone from the listing: forgotten.
        select_orphans(&[], &owners, &mut first_seen, 62_000, grace);
        assert!(first_seen.is_empty());
    }
}
