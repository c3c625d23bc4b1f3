use super::*;
use crate::record::InstanceSpec;
use std::collections::BTreeMap;

const T0: UnixMillis = 1_700_000_000_000;

fn config() -> MachineConfig {
    MachineConfig {
        max_create_attempts: 3,
        backoff: Backoff {
            base: Duration::from_millis(100),
            cap: Duration::from_secs(5),
        },
        pending_ttl: Duration::from_secs(600),
        failed_ttl: Duration::from_secs(3600),
    }
}

fn pending() -> InstanceRecord {
    InstanceRecord::pending("sb1", "web", "default", InstanceSpec::default(), T0)
}

fn instance(id: &str) -> InstanceRef {
    InstanceRef {
        id: id.into(),
        ips: vec!["127.0.0.9".parse().unwrap()],
    }
}

fn failure(retryable: bool) -> OpFailure {
    OpFailure {
        message: "boom".into(),
        retryable,
        retry_after: None,
    }
}

/// The persisted record in a command list, if any.
fn persisted(cmds: &[Command]) -> Option<&InstanceRecord> {
    cmds.iter().find_map(|c| match c {
        Command::Persist(r) => Some(&**r),
        _ => None,
    })
}

/// The epoch of the timer of `kind` that `cmds` schedule.
fn scheduled(cmds: &[Command], kind: TimerKind) -> u64 {
    cmds.iter()
        .find_map(|c| match c {
            Command::Schedule { kind: k, epoch, .. } if *k == kind => Some(*epoch),
            _ => None,
        })
        .unwrap_or_else(|| panic!("no {kind:?} timer in {cmds:?}"))
}

fn without_timers(cmds: Vec<Command>) -> Vec<Command> {
    cmds.into_iter()
        .filter(|c| !matches!(c, Command::Schedule { .. }))
        .collect()
}

/// A machine whose Pending record is durable.
fn created() -> PodVmMachine {
    let (mut m, cmds) = PodVmMachine::create(pending(), config(), 7);
    assert_eq!(cmds, vec![Command::Persist(Box::new(pending()))]);
    let cmds = m.on_event(Event::Persisted(Ok(())), T0);
    assert_eq!(without_timers(cmds), vec![Command::ReplyCreate(Ok(()))]);
    m
}

/// A machine that went through StartVM to Running with instance `i-1`.
fn running() -> PodVmMachine {
    let mut m = created();
    m.on_event(Event::Start(1), T0);
    m.on_event(Event::Persisted(Ok(())), T0);
    m.on_event(
        Event::Ensured(Ok(Ensured {
            instance: instance("i-1"),
            adopted: false,
        })),
        T0,
    );
    m.on_event(Event::Persisted(Ok(())), T0);
    m.on_event(Event::AgentReady, T0);
    let cmds = m.on_event(Event::Persisted(Ok(())), T0);
    assert_eq!(cmds, vec![Command::ReplyStart(1, Ok(()))]);
    m
}

#[test]
fn create_vm_journals_pending_before_answering() {
    let (mut m, cmds) = PodVmMachine::create(pending(), config(), 1);
    assert_eq!(
        cmds,
        vec![Command::Persist(Box::new(pending()))],
        "no answer before the write"
    );
    let cmds = m.on_event(Event::Persisted(Ok(())), T0);
    assert!(cmds.contains(&Command::ReplyCreate(Ok(()))));
    assert!(cmds.iter().any(|c| matches!(
        c,
        Command::Schedule {
            kind: TimerKind::Expiry,
            ..
        }
    )));
    assert_eq!(m.durable().unwrap().state, State::Pending);
}

#[test]
fn start_journals_creating_with_a_token_then_creates_then_probes_then_runs() {
    let mut m = created();
    let cmds = m.on_event(Event::Start(1), T0 + 1);
    let rec = persisted(&cmds).expect("Creating is journaled first");
    assert_eq!(rec.state, State::Creating);
    assert_eq!(rec.generation, 1);
    assert_eq!(
        rec.token.as_deref(),
        Some(idempotency_token("sb1", 1).as_str())
    );
    assert_eq!(
        cmds.len(),
        1,
        "no cloud call before the journal confirms: {cmds:?}"
    );

    let cmds = m.on_event(Event::Persisted(Ok(())), T0 + 2);
    assert_eq!(
        cmds,
        vec![Command::Ensure {
            first_attempt: true
        }]
    );

    let cmds = m.on_event(
        Event::Ensured(Ok(Ensured {
            instance: instance("i-1"),
            adopted: false,
        })),
        T0 + 3,
    );
    let rec = persisted(&cmds).expect("the instance id is journaled before probing");
    assert_eq!(rec.instance, Some(instance("i-1")));
    assert_eq!(cmds.len(), 1);

    let cmds = m.on_event(Event::Persisted(Ok(())), T0 + 4);
    assert_eq!(
        cmds,
        vec![Command::Probe {
            ip: "127.0.0.9".parse().unwrap()
        }]
    );

    let cmds = m.on_event(Event::AgentReady, T0 + 5);
    assert_eq!(persisted(&cmds).unwrap().state, State::Running);
    let cmds = m.on_event(Event::Persisted(Ok(())), T0 + 6);
    assert_eq!(cmds, vec![Command::ReplyStart(1, Ok(()))]);
}

#[test]
fn a_second_start_of_a_running_sandbox_succeeds_at_once() {
    let mut m = running();
    assert_eq!(
        m.on_event(Event::Start(2), T0),
        vec![Command::ReplyStart(2, Ok(()))]
    );
}

#[test]
fn concurrent_starts_share_one_creation() {
    let mut m = created();
    m.on_event(Event::Start(1), T0);
    assert!(m.on_event(Event::Start(2), T0).is_empty());
    let cmds = m.on_event(Event::Persisted(Ok(())), T0);
    assert_eq!(
        cmds,
        vec![Command::Ensure {
            first_attempt: true
        }]
    );
}

#[test]
fn stop_of_a_running_sandbox_acknowledges_after_journaling_then_deletes_then_forgets() {
    let mut m = running();
    let cmds = m.on_event(Event::Stop(9), T0);
    assert_eq!(persisted(&cmds).unwrap().state, State::Deleting);
    assert_eq!(cmds.len(), 1, "no ack before Deleting is durable");
    let cmds = m.on_event(Event::Persisted(Ok(())), T0);
    assert_eq!(
        cmds,
        vec![
            Command::ReplyStop(9, Ok(())),
            Command::Delete {
                instance_id: "i-1".into()
            }
        ]
    );
    let cmds = m.on_event(Event::Deleted(Ok(())), T0);
    assert_eq!(cmds, vec![Command::Forget]);
    assert!(m.is_forgotten());
    // Late callers of a forgotten sandbox.
    assert_eq!(
        m.on_event(Event::Stop(10), T0),
        vec![Command::ReplyStop(10, Ok(()))]
    );
}

#[test]
fn deletes_never_give_up() {
    let mut m = running();
    m.on_event(Event::Stop(9), T0);
    m.on_event(Event::Persisted(Ok(())), T0);
    for attempt in 1..=20u64 {
        let cmds = m.on_event(Event::Deleted(Err(failure(false))), T0);
        assert!(cmds.contains(&Command::Retrying(Operation::Delete)));
        let Some(Command::Schedule {
            kind: TimerKind::Retry,
            epoch,
            after,
        }) = cmds
            .iter()
            .find(|c| matches!(c, Command::Schedule { .. }))
            .cloned()
        else {
            panic!("retry scheduled: {cmds:?}")
        };
        assert!(after <= Duration::from_secs(5), "capped");
        // attempts and last_error are journaled, for operators and restarts.
        assert_eq!(persisted(&cmds).unwrap().attempts as u64, attempt);
        m.on_event(Event::Persisted(Ok(())), T0);
        let cmds = m.on_event(Event::Timer(TimerKind::Retry, epoch), T0 + attempt);
        assert!(
            cmds.contains(&Command::Delete {
                instance_id: "i-1".into()
            }),
            "attempt {attempt}: {cmds:?}"
        );
    }
    assert_eq!(m.target().attempts, 20);
    let cmds = m.on_event(Event::Deleted(Ok(())), T0);
    assert!(cmds.contains(&Command::Forget));
}

#[test]
fn stop_during_creation_acks_at_once_and_deletes_what_the_create_returns() {
    let mut m = created();
    m.on_event(Event::Start(1), T0);
    assert_eq!(
        m.on_event(Event::Persisted(Ok(())), T0),
        vec![Command::Ensure {
            first_attempt: true
        }]
    );
    // StopVM while the create is in flight: journaled and acknowledged
    // without waiting for the cloud.
    let cmds = m.on_event(Event::Stop(2), T0);
    assert_eq!(persisted(&cmds).unwrap().state, State::Deleting);
    let cmds = m.on_event(Event::Persisted(Ok(())), T0);
    assert!(cmds.contains(&Command::ReplyStop(2, Ok(()))));
    assert!(cmds.contains(&Command::ReplyStart(1, Err(StartError::Stopping))));
    assert!(
        !cmds
            .iter()
            .any(|c| matches!(c, Command::Find | Command::Delete { .. }))
    );
    // The create lands: the instance is journaled and deleted.
    let cmds = m.on_event(
        Event::Ensured(Ok(Ensured {
            instance: instance("i-7"),
            adopted: false,
        })),
        T0,
    );
    assert!(
        cmds.contains(&Command::Delete {
            instance_id: "i-7".into()
        }),
        "{cmds:?}"
    );
    let cmds = m.on_event(Event::Persisted(Ok(())), T0);
    assert!(cmds.is_empty(), "{cmds:?}");
    assert_eq!(
        m.on_event(Event::Deleted(Ok(())), T0),
        vec![Command::Forget]
    );
}

#[test]
fn stop_during_creation_whose_create_fails_looks_the_token_up_before_forgetting() {
    let mut m = created();
    m.on_event(Event::Start(1), T0);
    m.on_event(Event::Persisted(Ok(())), T0);
    m.on_event(Event::Stop(2), T0);
    m.on_event(Event::Persisted(Ok(())), T0);
    let cmds = m.on_event(Event::Ensured(Err(failure(true))), T0);
    assert!(
        cmds.contains(&Command::Find),
        "the failed create may have made it: {cmds:?}"
    );
    let cmds = m.on_event(Event::Found(Ok(Some(instance("i-late")))), T0);
    assert!(cmds.contains(&Command::Delete {
        instance_id: "i-late".into()
    }));
    // The write of last_error lands, then the write of the found instance.
    let cmds = m.on_event(Event::Persisted(Ok(())), T0);
    assert_eq!(persisted(&cmds).unwrap().instance, Some(instance("i-late")));
    // The delete returns while that write is in flight: forgetting waits for
    // it, or the late write would bring the record back.
    assert!(m.on_event(Event::Deleted(Ok(())), T0).is_empty());
    let cmds = m.on_event(Event::Persisted(Ok(())), T0);
    assert_eq!(cmds.last(), Some(&Command::Forget), "{cmds:?}");
}

#[test]
fn a_retryable_create_failure_retries_with_a_lookup_then_fails_after_the_limit() {
    let mut m = created();
    m.on_event(Event::Start(1), T0);
    m.on_event(Event::Persisted(Ok(())), T0);
    for attempt in 1..3 {
        let cmds = m.on_event(Event::Ensured(Err(failure(true))), T0);
        assert!(
            cmds.contains(&Command::Retrying(Operation::Create)),
            "{cmds:?}"
        );
        let epoch = scheduled(&cmds, TimerKind::Retry);
        m.on_event(Event::Persisted(Ok(())), T0); // last_error, attempts
        let cmds = m.on_event(Event::Timer(TimerKind::Retry, epoch), T0 + attempt);
        assert_eq!(
            cmds,
            vec![Command::Ensure {
                first_attempt: false
            }],
            "retries look up first"
        );
    }
    let cmds = m.on_event(Event::Ensured(Err(failure(true))), T0);
    let rec = persisted(&cmds).unwrap();
    assert_eq!(rec.state, State::Failed);
    assert_eq!(rec.last_error.as_deref(), Some("boom (after 3 attempt(s))"));
    let cmds = m.on_event(Event::Persisted(Ok(())), T0);
    assert!(cmds.contains(&Command::ReplyStart(
        1,
        Err(StartError::Failed("boom (after 3 attempt(s))".into()))
    )));
    assert!(
        cmds.contains(&Command::Find),
        "Failed still cleans up: {cmds:?}"
    );
    let cmds = m.on_event(Event::Found(Ok(None)), T0);
    let rec = persisted(&cmds).unwrap();
    assert!(rec.released && rec.state == State::Failed);
}

#[test]
fn a_permanent_create_failure_fails_at_once() {
    let mut m = created();
    m.on_event(Event::Start(1), T0);
    m.on_event(Event::Persisted(Ok(())), T0);
    let cmds = m.on_event(Event::Ensured(Err(failure(false))), T0);
    assert_eq!(persisted(&cmds).unwrap().state, State::Failed);
    assert!(!cmds.contains(&Command::Retrying(Operation::Create)));
}

#[test]
fn throttling_waits_at_least_the_retry_after() {
    let mut m = created();
    m.on_event(Event::Start(1), T0);
    m.on_event(Event::Persisted(Ok(())), T0);
    let f = OpFailure {
        message: "slow down".into(),
        retryable: true,
        retry_after: Some(Duration::from_secs(30)),
    };
    let cmds = m.on_event(Event::Ensured(Err(f)), T0);
    assert!(cmds.iter().any(|c| matches!(c, Command::Schedule { kind: TimerKind::Retry, after, .. } if *after >= Duration::from_secs(30))));
}

#[test]
fn an_unreachable_agent_fails_the_start_and_deletes_the_instance() {
    let mut m = created();
    m.on_event(Event::Start(1), T0);
    m.on_event(Event::Persisted(Ok(())), T0);
    m.on_event(
        Event::Ensured(Ok(Ensured {
            instance: instance("i-1"),
            adopted: false,
        })),
        T0,
    );
    m.on_event(Event::Persisted(Ok(())), T0);
    let cmds = m.on_event(Event::AgentUnreachable("no answer".into()), T0);
    assert_eq!(persisted(&cmds).unwrap().state, State::Failed);
    let cmds = m.on_event(Event::Persisted(Ok(())), T0);
    assert!(cmds.contains(&Command::ReplyStart(
        1,
        Err(StartError::Failed("no answer".into()))
    )));
    assert!(cmds.contains(&Command::Delete {
        instance_id: "i-1".into()
    }));
    let cmds = m.on_event(Event::Deleted(Ok(())), T0);
    let rec = persisted(&cmds).unwrap();
    assert!(rec.released && rec.instance.is_none());
    m.on_event(Event::Persisted(Ok(())), T0);
    // StartVM on a failed sandbox says why; StopVM removes it.
    assert_eq!(
        m.on_event(Event::Start(3), T0),
        vec![Command::ReplyStart(
            3,
            Err(StartError::Failed("no answer".into()))
        )]
    );
    m.on_event(Event::Stop(4), T0);
    let cmds = m.on_event(Event::Persisted(Ok(())), T0);
    assert_eq!(cmds, vec![Command::ReplyStop(4, Ok(())), Command::Forget]);
}

#[test]
fn a_failed_record_keeps_the_creation_attempts_through_its_cleanup() {
    let mut m = created();
    m.on_event(Event::Start(1), T0);
    m.on_event(Event::Persisted(Ok(())), T0);
    let cmds = m.on_event(Event::Ensured(Err(failure(true))), T0);
    let epoch = scheduled(&cmds, TimerKind::Retry);
    m.on_event(Event::Persisted(Ok(())), T0);
    m.on_event(Event::Timer(TimerKind::Retry, epoch), T0 + 1);
    m.on_event(
        Event::Ensured(Ok(Ensured {
            instance: instance("i-1"),
            adopted: false,
        })),
        T0,
    );
    m.on_event(Event::Persisted(Ok(())), T0);
    let cmds = m.on_event(Event::AgentUnreachable("no answer".into()), T0);
    let rec = persisted(&cmds).unwrap();
    assert_eq!((rec.state, rec.attempts), (State::Failed, 2));
    m.on_event(Event::Persisted(Ok(())), T0);
    // The cleanup's own failures back off, but do not count as attempts.
    for failed in 1..=3u64 {
        let cmds = m.on_event(Event::Deleted(Err(failure(true))), T0 + failed);
        assert!(cmds.contains(&Command::Retrying(Operation::Delete)));
        let epoch = scheduled(&cmds, TimerKind::Retry);
        assert_eq!(persisted(&cmds).unwrap().attempts, 2);
        m.on_event(Event::Persisted(Ok(())), T0 + failed);
        m.on_event(Event::Timer(TimerKind::Retry, epoch), T0 + failed);
    }
    let cmds = m.on_event(Event::Deleted(Ok(())), T0);
    let rec = persisted(&cmds).unwrap();
    assert!(rec.released);
    assert_eq!(rec.attempts, 2);
}

#[test]
fn stop_of_a_pending_sandbox_needs_no_cloud_call() {
    let mut m = created();
    m.on_event(Event::Stop(1), T0);
    assert_eq!(
        m.on_event(Event::Persisted(Ok(())), T0),
        vec![Command::ReplyStop(1, Ok(())), Command::Forget]
    );
}

#[test]
fn a_pending_sandbox_expires() {
    let mut m = created();
    // The expiry timer from the first write has epoch 1.
    let cmds = m.on_event(Event::Timer(TimerKind::Expiry, 1), T0 + 600_000);
    let rec = persisted(&cmds).unwrap();
    assert_eq!(rec.state, State::Deleting);
    assert!(
        rec.last_error
            .as_deref()
            .unwrap()
            .starts_with("StartVM did not arrive")
    );
    assert_eq!(
        m.on_event(Event::Persisted(Ok(())), T0),
        vec![Command::Forget]
    );
}

#[test]
fn stale_timers_are_ignored() {
    let mut m = created();
    assert!(
        m.on_event(Event::Timer(TimerKind::Expiry, 99), T0)
            .is_empty()
    );
    assert!(m.on_event(Event::Timer(TimerKind::Retry, 0), T0).is_empty());
}

#[test]
fn a_failed_creating_write_fails_start_and_stays_pending() {
    let mut m = created();
    m.on_event(Event::Start(1), T0);
    let cmds = m.on_event(Event::Persisted(Err("disk full".into())), T0);
    assert!(cmds.contains(&Command::ReplyStart(
        1,
        Err(StartError::Journal("disk full".into()))
    )));
    assert!(!cmds.iter().any(|c| matches!(c, Command::Ensure { .. })));
    assert_eq!(m.target().state, State::Pending);
    assert_eq!(m.target().token, None);
    m.on_event(Event::Persisted(Ok(())), T0); // the last_error write
    // A later StartVM works, with generation 1 still.
    let cmds = m.on_event(Event::Start(2), T0);
    assert_eq!(persisted(&cmds).unwrap().generation, 1);
}

#[test]
fn a_failed_first_write_fails_create_vm_and_forgets() {
    let (mut m, _) = PodVmMachine::create(pending(), config(), 1);
    let cmds = m.on_event(Event::Persisted(Err("read-only".into())), T0);
    assert_eq!(
        cmds,
        vec![
            Command::ReplyCreate(Err("read-only".into())),
            Command::Forget
        ]
    );
}

#[test]
fn a_failed_internal_write_is_retried() {
    let mut m = created();
    m.on_event(Event::Start(1), T0);
    m.on_event(Event::Persisted(Ok(())), T0);
    m.on_event(
        Event::Ensured(Ok(Ensured {
            instance: instance("i-1"),
            adopted: false,
        })),
        T0,
    );
    let cmds = m.on_event(Event::Persisted(Err("io".into())), T0);
    assert!(cmds.contains(&Command::Retrying(Operation::Journal)));
    // The waiting StartVM is answered, not left hanging on the journal.
    assert!(
        cmds.iter().any(|c| matches!(
            c,
            Command::ReplyStart(1, Err(StartError::Journal(why))) if why.starts_with("io")
        )),
        "{cmds:?}"
    );
    let epoch = scheduled(&cmds, TimerKind::JournalRetry);
    assert!(
        !cmds.iter().any(|c| matches!(c, Command::Probe { .. })),
        "no probe before the id is durable"
    );
    let cmds = m.on_event(Event::Timer(TimerKind::JournalRetry, epoch), T0);
    assert_eq!(persisted(&cmds).unwrap().instance, Some(instance("i-1")));
}

#[test]
fn a_failed_deleting_write_fails_stop_and_rolls_back_to_running() {
    let mut m = running();
    let cmds = m.on_event(Event::Stop(2), T0);
    assert_eq!(persisted(&cmds).unwrap().state, State::Deleting);
    let cmds = m.on_event(Event::Persisted(Err("disk full".into())), T0);
    assert!(
        cmds.contains(&Command::ReplyStop(
            2,
            Err("Could not journal the stop: disk full".into())
        )),
        "{cmds:?}"
    );
    assert_eq!(m.target().state, State::Running);
    assert!(
        !cmds.iter().any(|c| matches!(c, Command::Refused(_))),
        "{cmds:?}"
    );
}

/// Not a debug assertion: the refusal runs in release builds too.
#[test]
fn an_illegal_move_is_refused_and_reported_in_every_build() {
    let mut m = running();
    let before = m.target().clone();
    m.transition(State::Creating, T0 + 5);
    assert_eq!(m.target(), &before, "the state and its time are unchanged");
    let cmds = m.on_event(Event::AgentReady, T0);
    let refused = IllegalTransition {
        from: State::Running,
        to: State::Creating,
    };
    assert_eq!(cmds, vec![Command::Refused(refused)]);
    // Reported once.
    assert!(m.on_event(Event::AgentReady, T0).is_empty());
}

#[test]
fn a_rollback_the_table_does_not_allow_is_refused() {
    let mut m = created();
    m.on_event(Event::Start(1), T0);
    // Pretend the target had moved where the table cannot take Pending.
    m.target.state = State::Running;
    let cmds = m.on_event(Event::Persisted(Err("disk full".into())), T0);
    assert!(
        cmds.contains(&Command::Refused(IllegalTransition {
            from: State::Pending,
            to: State::Running,
        })),
        "{cmds:?}"
    );
    assert_eq!(m.target().state, State::Running);
}

fn recovered(state: State, with_instance: bool) -> PodVmMachine {
    let mut r = pending();
    r.state = state;
    if state != State::Pending {
        r.generation = 1;
        r.token = Some(idempotency_token("sb1", 1));
    }
    if with_instance {
        r.instance = Some(instance("i-1"));
    }
    PodVmMachine::recovered(r, config(), 3)
}

#[test]
fn recovery_keeps_a_young_pending_record_and_expires_an_old_one() {
    let mut m = recovered(State::Pending, false);
    let cmds = m.on_event(Event::Recover, T0 + 1000);
    assert!(cmds.contains(&Command::RecoveryDone(RecoveryAction::Kept)));
    assert!(cmds.contains(&Command::Schedule {
        kind: TimerKind::Expiry,
        epoch: 1,
        after: Duration::from_secs(599)
    }));
    let mut m = recovered(State::Pending, false);
    let cmds = m.on_event(Event::Recover, T0 + 601_000);
    assert!(cmds.contains(&Command::RecoveryDone(RecoveryAction::Expired)));
    assert_eq!(persisted(&cmds).unwrap().state, State::Deleting);
}

/// `sleeps_until` answers an instant exactly when recovery would only keep
/// the record and arm its expiry, and that instant is when the expiry falls
/// due — for every state, released or not, young, old, or from the future.
#[test]
fn a_record_sleeps_exactly_when_its_recovery_only_keeps_it() {
    let states = [
        State::Pending,
        State::Creating,
        State::Running,
        State::Deleting,
        State::Failed,
        State::Removed,
    ];
    let mut sleeping = 0;
    for state in states {
        for with_instance in [false, true] {
            for released in [false, true] {
                // Ages around both TTLs (600 s and 3,600 s), and a clock
                // that went back (negative age).
                for age_ms in [
                    -5_000i64, 0, 1, 599_999, 600_000, 601_000, 3_599_999, 3_600_000,
                ] {
                    let mut r = pending();
                    r.state = state;
                    if state != State::Pending {
                        r.generation = 1;
                        r.token = Some(idempotency_token("sb1", 1));
                        r.updated_at = T0 + 10;
                    }
                    if with_instance {
                        r.instance = Some(instance("i-1"));
                    }
                    r.released = released;
                    let now = T0.saturating_add_signed(age_ms);
                    let slept = PodVmMachine::sleeps_until(&r, &config(), now);
                    let cmds = PodVmMachine::recovered(r.clone(), config(), 3)
                        .on_event(Event::Recover, now);
                    let only_kept = match cmds.as_slice() {
                        [
                            Command::Schedule {
                                kind: TimerKind::Expiry,
                                after,
                                ..
                            },
                            Command::RecoveryDone(RecoveryAction::Kept),
                        ] if !after.is_zero() => Some(now + after.as_millis() as u64),
                        _ => None,
                    };
                    assert_eq!(
                        slept, only_kept,
                        "{state:?} instance={with_instance} released={released} age={age_ms} ms: {cmds:?}"
                    );
                    sleeping += usize::from(slept.is_some());
                }
            }
        }
    }
    // Young Pending records (any instance and release flags) and young
    // released Failed ones do sleep.
    assert!(sleeping >= 8, "{sleeping}");
}

#[test]
fn recovery_of_creating_without_an_instance_reissues_the_idempotent_create() {
    let mut m = recovered(State::Creating, false);
    let cmds = m.on_event(Event::Recover, T0);
    assert_eq!(
        cmds,
        vec![Command::Ensure {
            first_attempt: false
        }]
    );
    let cmds = m.on_event(
        Event::Ensured(Ok(Ensured {
            instance: instance("i-1"),
            adopted: true,
        })),
        T0,
    );
    assert!(cmds.contains(&Command::RecoveryDone(RecoveryAction::Adopted)));
    m.on_event(Event::Persisted(Ok(())), T0);
    let cmds = m.on_event(
        Event::Ensured(Ok(Ensured {
            instance: instance("i-1"),
            adopted: true,
        })),
        T0,
    );
    assert!(cmds.is_empty() || !cmds.contains(&Command::RecoveryDone(RecoveryAction::Adopted)));
}

#[test]
fn recovery_of_creating_with_an_instance_verifies_it_then_probes() {
    let mut m = recovered(State::Creating, true);
    assert_eq!(m.on_event(Event::Recover, T0), vec![Command::Find]);
    let cmds = m.on_event(Event::Found(Ok(Some(instance("i-1")))), T0);
    assert_eq!(
        cmds,
        vec![
            Command::RecoveryDone(RecoveryAction::Adopted),
            Command::Probe {
                ip: "127.0.0.9".parse().unwrap()
            }
        ]
    );
}

/// `i-1` as a provider sees it before it has an address.
fn unaddressed(id: &str) -> InstanceRef {
    InstanceRef {
        id: id.into(),
        ips: Vec::new(),
    }
}

#[test]
fn recovery_of_creating_whose_instance_has_no_address_yet_adopts_it_through_the_create() {
    let mut m = recovered(State::Creating, true);
    assert_eq!(m.on_event(Event::Recover, T0), vec![Command::Find]);
    // Found, but before its address (a libvirt domain before its lease).
    let cmds = m.on_event(Event::Found(Ok(Some(unaddressed("i-1")))), T0);
    assert!(cmds.contains(&Command::RecoveryDone(RecoveryAction::Adopted)));
    assert_eq!(persisted(&cmds).unwrap().instance, Some(unaddressed("i-1")));
    assert!(
        !cmds
            .iter()
            .any(|c| matches!(c, Command::Ensure { .. } | Command::Probe { .. })),
        "nothing before the journal has it: {cmds:?}"
    );
    let cmds = m.on_event(Event::Persisted(Ok(())), T0);
    assert_eq!(
        cmds,
        vec![Command::Ensure {
            first_attempt: false
        }],
        "the idempotent create waits for the address; nothing is failed"
    );
    let cmds = m.on_event(
        Event::Ensured(Ok(Ensured {
            instance: instance("i-1"),
            adopted: true,
        })),
        T0,
    );
    assert_eq!(persisted(&cmds).unwrap().instance, Some(instance("i-1")));
    let cmds = m.on_event(Event::Persisted(Ok(())), T0);
    assert_eq!(
        cmds,
        vec![Command::Probe {
            ip: "127.0.0.9".parse().unwrap()
        }]
    );
}

#[test]
fn a_create_that_names_no_address_is_retried_then_failed_after_the_limit() {
    let mut m = created();
    m.on_event(Event::Start(1), T0);
    m.on_event(Event::Persisted(Ok(())), T0);
    let no_address = || {
        Event::Ensured(Ok(Ensured {
            instance: unaddressed("i-1"),
            adopted: false,
        }))
    };
    for attempt in 1..3 {
        let cmds = m.on_event(no_address(), T0);
        assert!(
            cmds.contains(&Command::Retrying(Operation::Create)),
            "{cmds:?}"
        );
        assert!(
            !cmds.iter().any(|c| matches!(c, Command::Probe { .. })),
            "{cmds:?}"
        );
        let epoch = scheduled(&cmds, TimerKind::Retry);
        m.on_event(Event::Persisted(Ok(())), T0);
        let cmds = m.on_event(Event::Timer(TimerKind::Retry, epoch), T0 + attempt);
        assert_eq!(
            cmds,
            vec![Command::Ensure {
                first_attempt: false
            }]
        );
    }
    let cmds = m.on_event(no_address(), T0);
    let rec = persisted(&cmds).unwrap();
    assert_eq!(rec.state, State::Failed);
    assert_eq!(
        rec.last_error.as_deref(),
        Some("Instance i-1 has no IP address (after 3 attempt(s))")
    );
    let cmds = m.on_event(Event::Persisted(Ok(())), T0);
    assert!(
        cmds.contains(&Command::Find),
        "the failed create is looked up by its token and deleted: {cmds:?}"
    );
}

#[test]
fn recovery_of_running_verifies_the_instance_without_writing() {
    let mut m = recovered(State::Running, true);
    assert_eq!(m.on_event(Event::Recover, T0), vec![Command::Find]);
    let cmds = m.on_event(Event::Found(Ok(Some(instance("i-1")))), T0);
    assert_eq!(cmds, vec![Command::RecoveryDone(RecoveryAction::Verified)]);
    assert_eq!(
        m.on_event(Event::Start(5), T0),
        vec![Command::ReplyStart(5, Ok(()))]
    );
}

#[test]
fn recovery_of_running_whose_instance_vanished_marks_it_failed_and_released() {
    let mut m = recovered(State::Running, true);
    m.on_event(Event::Recover, T0);
    let cmds = m.on_event(Event::Found(Ok(None)), T0);
    assert!(cmds.contains(&Command::RecoveryDone(RecoveryAction::Vanished)));
    let rec = persisted(&cmds).unwrap();
    assert_eq!(rec.state, State::Failed);
    assert!(rec.released);
    assert_eq!(
        rec.last_error.as_deref(),
        Some("Instance i-1 no longer exists")
    );
}

#[test]
fn recovery_of_deleting_resumes_the_delete_or_the_lookup() {
    let mut m = recovered(State::Deleting, true);
    let cmds = m.on_event(Event::Recover, T0);
    assert_eq!(
        cmds,
        vec![
            Command::RecoveryDone(RecoveryAction::ResumedDelete),
            Command::Delete {
                instance_id: "i-1".into()
            }
        ]
    );
    let mut m = recovered(State::Deleting, false);
    let cmds = m.on_event(Event::Recover, T0);
    assert!(cmds.contains(&Command::Find));
    assert_eq!(
        m.on_event(Event::Found(Ok(None)), T0),
        vec![Command::Forget]
    );
}

#[test]
fn backoff_grows_caps_and_jitters_within_bounds() {
    let b = Backoff {
        base: Duration::from_millis(100),
        cap: Duration::from_secs(2),
    };
    assert_eq!(b.delay(1, 0.0), Duration::from_millis(50));
    assert_eq!(b.delay(1, 1.0), Duration::from_millis(100));
    assert_eq!(b.delay(3, 1.0), Duration::from_millis(400));
    assert_eq!(b.delay(30, 1.0), Duration::from_secs(2));
    assert_eq!(b.delay(u32::MAX, 0.5), Duration::from_millis(1500));
}

// ---------------------------------------------------------------------------
// Simulation: random interleavings, random failures, random crashes, against a
// model cloud. Whatever happens, a sandbox never has two live instances and
// nothing is left in the cloud once StopVM was acknowledged and work drained.

/// The model cloud: instances by id, each remembering its token.
#[derive(Default)]
struct Cloud {
    next: u32,
    live: BTreeMap<String, String>, // id -> token
    ever_created_per_token: BTreeMap<String, u32>,
}

impl Cloud {
    fn create(&mut self, token: &str) -> InstanceRef {
        self.next += 1;
        let id = format!("i-{}", self.next);
        self.live.insert(id.clone(), token.to_owned());
        *self
            .ever_created_per_token
            .entry(token.to_owned())
            .or_default() += 1;
        InstanceRef {
            id,
            ips: vec!["127.0.0.9".parse().unwrap()],
        }
    }
    fn find(&self, token: &str) -> Option<InstanceRef> {
        self.live
            .iter()
            .find(|(_, t)| t.as_str() == token)
            .map(|(id, _)| InstanceRef {
                id: id.clone(),
                ips: vec!["127.0.0.9".parse().unwrap()],
            })
    }
}

/// Outstanding work the simulated actor owes the machine.
#[derive(Default)]
struct Inflight {
    persist: Option<InstanceRecord>,
    provider: Option<Command>,
    timers: Vec<(TimerKind, u64)>,
}

fn run_simulation(seed: u64) {
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut cloud = Cloud::default();
    let mut journal: Option<InstanceRecord> = None; // what is on disk
    let mut history: Vec<State> = Vec::new();
    let mut inflight = Inflight::default();
    let (mut m, cmds) = PodVmMachine::create(pending(), config(), seed);
    let mut now = T0;
    let mut stop_acked = false;
    let mut stop_sent = false;
    let mut crashes = 0;
    let mut create_failed = false;
    let mut stop_ever_sent = false;
    let mut expiry_fired = false;
    let mut queue: Vec<Command> = cmds;

    for step in 0..400 {
        now += 1000;
        // Absorb the commands.
        for c in queue.drain(..) {
            match &c {
                Command::Persist(r) => {
                    assert!(
                        inflight.persist.is_none(),
                        "seed {seed}: two writes in flight"
                    );
                    if let Some(d) = m.durable() {
                        assert!(
                            d.state == r.state || check_transition(d.state, r.state).is_ok(),
                            "seed {seed}: illegal durable move {} -> {}",
                            d.state,
                            r.state
                        );
                    }
                    inflight.persist = Some((**r).clone());
                }
                Command::Ensure { first_attempt } => {
                    assert!(
                        inflight.provider.is_none(),
                        "seed {seed}: two calls in flight"
                    );
                    let d = m.durable().expect("durable before a cloud call");
                    assert_eq!(
                        d.state,
                        State::Creating,
                        "seed {seed}: create only when Creating is durable"
                    );
                    assert_eq!(d.token, m.target().token);
                    if *first_attempt {
                        let token = d.token.clone().unwrap();
                        assert!(
                            cloud.find(&token).is_none(),
                            "seed {seed}: a first attempt with an instance already made"
                        );
                    }
                    inflight.provider = Some(c.clone());
                }
                Command::Find | Command::Delete { .. } | Command::Probe { .. } => {
                    assert!(
                        inflight.provider.is_none(),
                        "seed {seed}: two calls in flight"
                    );
                    assert!(m.durable().is_some());
                    inflight.provider = Some(c.clone());
                }
                Command::Refused(illegal) => panic!("seed {seed}: {illegal}"),
                Command::ReplyStop(_, Ok(())) => stop_acked = true,
                Command::ReplyCreate(Err(_)) => create_failed = true,
                // A StopVM that could not be journaled fails; the caller retries.
                Command::ReplyStop(_, Err(_)) => stop_sent = false,
                Command::Schedule { kind, epoch, .. } => inflight.timers.push((*kind, *epoch)),
                Command::Forget => {
                    assert!(
                        stop_sent || journal.as_ref().map(|j| j.state) != Some(State::Running),
                        "seed {seed}: forgot a running sandbox nobody stopped"
                    );
                    journal = None;
                }
                _ => {}
            }
        }
        if m.is_forgotten() {
            break;
        }

        // Occasionally crash: keep only the journal and the cloud.
        if rng.u8(..100) < 4 && journal.is_some() && crashes < 3 {
            crashes += 1;
            let rec = journal.clone().unwrap();
            inflight = Inflight::default();
            // An unacknowledged StopVM died with the daemon: its caller saw
            // the failure and may call again.
            if !stop_acked {
                stop_sent = false;
            }
            // A create that was in flight may or may not have happened.
            m = PodVmMachine::recovered(rec, config(), seed + step);
            queue = m.on_event(Event::Recover, now);
            continue;
        }

        // Pick what happens next.
        let choice = rng.u8(..100);
        let event = if choice < 8 && !stop_sent && step > 3 {
            stop_sent = true;
            stop_ever_sent = true;
            Event::Stop(100)
        } else if choice < 16 {
            Event::Start(rng.u64(..))
        } else if choice < 50 && inflight.persist.is_some() {
            let r = inflight.persist.take().unwrap();
            if rng.u8(..100) < 10 {
                Event::Persisted(Err("io".into()))
            } else {
                if let Some(prev) = &journal {
                    history.push(prev.state);
                }
                journal = Some(r);
                Event::Persisted(Ok(()))
            }
        } else if choice < 85 && inflight.provider.is_some() {
            let call = inflight.provider.take().unwrap();
            let ok = rng.u8(..100) < 70;
            let token = m
                .durable()
                .and_then(|d| d.token.clone())
                .unwrap_or_default();
            match call {
                Command::Ensure { first_attempt } => {
                    let existing = if first_attempt {
                        None
                    } else {
                        cloud.find(&token)
                    };
                    if let Some(inst) = existing {
                        Event::Ensured(Ok(Ensured {
                            instance: inst,
                            adopted: true,
                        }))
                    } else if ok {
                        Event::Ensured(Ok(Ensured {
                            instance: cloud.create(&token),
                            adopted: false,
                        }))
                    } else {
                        // Half of the failures happen after the VM was made.
                        if rng.bool() {
                            cloud.create(&token);
                        }
                        Event::Ensured(Err(failure(rng.bool())))
                    }
                }
                Command::Find => {
                    if ok {
                        Event::Found(Ok(cloud.find(&token)))
                    } else {
                        Event::Found(Err(failure(true)))
                    }
                }
                Command::Delete { instance_id } => {
                    if ok {
                        cloud.live.remove(&instance_id);
                        Event::Deleted(Ok(()))
                    } else {
                        Event::Deleted(Err(failure(true)))
                    }
                }
                Command::Probe { .. } => {
                    if ok {
                        Event::AgentReady
                    } else {
                        Event::AgentUnreachable("timeout".into())
                    }
                }
                _ => unreachable!(),
            }
        } else if !inflight.timers.is_empty() {
            let i = rng.usize(..inflight.timers.len());
            let (k, e) = inflight.timers.swap_remove(i);
            expiry_fired |= k == TimerKind::Expiry;
            Event::Timer(k, e)
        } else if !stop_sent {
            stop_sent = true;
            stop_ever_sent = true;
            Event::Stop(100)
        } else {
            continue;
        };
        // At most one live instance per sandbox, always.
        let live = cloud.live.len();
        assert!(live <= 1, "seed {seed}: {live} live instances");
        queue = m.on_event(event, now);
    }

    // Drain: stop if nobody did, then let every operation succeed.
    if !m.is_forgotten() && !stop_sent {
        queue.extend(m.on_event(Event::Stop(100), now));
    }
    for _ in 0..200 {
        if m.is_forgotten() {
            break;
        }
        now += 1000;
        let mut next = Vec::new();
        for c in queue.drain(..) {
            match c {
                Command::Persist(r) => {
                    journal = Some(*r);
                    next.push(Event::Persisted(Ok(())));
                }
                Command::Ensure { .. } => {
                    let token = m.durable().and_then(|d| d.token.clone()).unwrap();
                    let inst = cloud.find(&token).unwrap_or_else(|| cloud.create(&token));
                    next.push(Event::Ensured(Ok(Ensured {
                        instance: inst,
                        adopted: false,
                    })));
                }
                Command::Find => {
                    let token = m
                        .durable()
                        .and_then(|d| d.token.clone())
                        .unwrap_or_default();
                    next.push(Event::Found(Ok(cloud.find(&token))));
                }
                Command::Delete { instance_id } => {
                    cloud.live.remove(&instance_id);
                    next.push(Event::Deleted(Ok(())));
                }
                Command::Probe { .. } => next.push(Event::AgentReady),
                Command::Schedule { kind, epoch, .. } => {
                    expiry_fired |= kind == TimerKind::Expiry;
                    next.push(Event::Timer(kind, epoch));
                }
                Command::ReplyStop(_, Ok(())) => stop_acked = true,
                Command::ReplyStop(_, Err(_)) => next.push(Event::Stop(102)),
                Command::Forget => journal = None,
                Command::Refused(illegal) => panic!("seed {seed}: {illegal}"),
                _ => {}
            }
        }
        // Answer any writes or calls that were in flight before the drain.
        if let Some(r) = inflight.persist.take() {
            journal = Some(r);
            next.push(Event::Persisted(Ok(())));
        }
        if let Some(call) = inflight.provider.take() {
            queue.push(call);
        }
        for (k, e) in inflight.timers.drain(..) {
            expiry_fired |= k == TimerKind::Expiry;
            next.push(Event::Timer(k, e));
        }
        for e in next {
            queue.extend(m.on_event(e, now));
        }
    }
    assert!(
        m.is_forgotten(),
        "seed {seed}: never finished: {:?}",
        m.target()
    );
    if !stop_acked {
        // Only an expiry (Pending or Failed TTL), a failed CreateVM, or a StopVM whose Deleting
        // write landed but whose answer died in a crash may end a sandbox
        // without an acknowledged stop; a StopVM that
        // comes after it still succeeds.
        let expired = create_failed || stop_ever_sent || expiry_fired;
        assert!(
            expired,
            "seed {seed}: ended without a stop: {:?}",
            m.target()
        );
        assert_eq!(
            m.on_event(Event::Stop(101), now),
            vec![Command::ReplyStop(101, Ok(()))]
        );
    }
    assert!(journal.is_none(), "seed {seed}: record left behind");
    assert!(
        cloud.live.is_empty(),
        "seed {seed}: leaked {:?}",
        cloud.live
    );
    // No record moved backwards in the lifecycle on disk.
    for pair in history.windows(2) {
        assert!(
            pair[0] == pair[1] || check_transition(pair[0], pair[1]).is_ok(),
            "seed {seed}: journal went {} -> {}",
            pair[0],
            pair[1]
        );
    }
}

#[test]
fn random_interleavings_failures_and_crashes_never_leak_or_duplicate() {
    for seed in 0..3000 {
        run_simulation(seed);
    }
}
