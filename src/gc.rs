//! The orphan GC's decision: which node-tagged instances no record owns.

use podvisor_providers::{Instance, TAG_SANDBOX, TAG_TOKEN};
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
}

/// The instances to delete: tagged for this node, owned by no record (by
/// token or instance id), not belonging to a quarantined record, and older
/// than `grace` — by their creation time, or, when the provider does not
/// report one, by when the GC first saw them (`first_seen`, updated here).
pub fn select_orphans(
    instances: &[Instance],
    owners: &Ownership<'_>,
    first_seen: &mut HashMap<String, UnixMillis>,
    now: UnixMillis,
    grace: Duration,
) -> Vec<Instance> {
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
    let mut orphans = Vec::new();
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
        seen_now.insert(instance.id.clone());
        let since = match instance.created_at {
            Some(t) => t,
            None => *first_seen.entry(instance.id.clone()).or_insert(now),
        };
        if now.saturating_sub(since) >= grace_ms {
            orphans.push(instance.clone());
        }
    }
    // Forget instances that are gone or owned now.
    first_seen.retain(|id, _| seen_now.contains(id));
    orphans
}

#[cfg(test)]
mod tests {
    use super::*;
    use podvisor_providers::InstanceStatus;
    use podvisor_state::{InstanceRef, InstanceSpec};
    use std::collections::BTreeMap;

    fn instance(id: &str, token: &str, sandbox: &str, created_at: Option<u64>) -> Instance {
        Instance {
            id: id.into(),
            name: format!("podvm-{id}"),
            ips: vec![],
            tags: BTreeMap::from([
                (TAG_TOKEN.into(), token.into()),
                (TAG_SANDBOX.into(), sandbox.into()),
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
        };
        let mut first_seen = HashMap::new();
        let orphans = select_orphans(&instances, &owners, &mut first_seen, now, grace);
        let ids: Vec<_> = orphans.iter().map(|i| i.id.as_str()).collect();
        assert_eq!(ids, ["i-orphan"]);
    }

    #[test]
    fn without_a_creation_time_the_grace_counts_from_first_sight() {
        let grace = Duration::from_secs(60);
        let quarantined = HashSet::new();
        let owners = Ownership {
            records: &[],
            quarantined: &quarantined,
        };
        let mut first_seen = HashMap::new();
        let instances = vec![instance("i-x", "t", "s", None)];
        assert!(select_orphans(&instances, &owners, &mut first_seen, 1_000, grace).is_empty());
        assert!(select_orphans(&instances, &owners, &mut first_seen, 50_000, grace).is_empty());
        assert_eq!(
            select_orphans(&instances, &owners, &mut first_seen, 61_000, grace).len(),
            1
        );
        // Gone from the listing: forgotten.
        select_orphans(&[], &owners, &mut first_seen, 62_000, grace);
        assert!(first_seen.is_empty());
    }
}
