//! `podvisor journal status|accept-loss|adopt`: the journal in
//! `--state-dir`, read and repaired with the daemon stopped.

use crate::cli::JournalAction;
use podvisor_state::{Journal, SledJournal};
use std::process::ExitCode;

/// `podvisor journal status|accept-loss`: prints the journal's identity and
/// integrity as JSON (after accepting, what it was before). Exit 0, or 1
/// with the reason (a running daemon holds the journal's lock).
pub fn journal_command(action: JournalAction, state_dir: &std::path::Path) -> ExitCode {
    // As the daemon: nothing it writes is readable beyond its owner.
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
    let dir = state_dir.join("journal");
    if !dir.is_dir() {
        eprintln!("podvisor: there is no journal at {}", dir.display());
        return ExitCode::FAILURE;
    }
    let result = match action {
        JournalAction::Status => SledJournal::open(&dir)
            .map(|j| serde_json::json!({ "journal": j.identity().id, "integrity": j.verdict() })),
        JournalAction::AcceptLoss => SledJournal::accept_loss(&dir)
            .map(|before| serde_json::json!({ "accepted": true, "integrity_before": before })),
        JournalAction::Adopt {
            sandbox,
            token,
            pod,
        } => match adoption_record(&sandbox, &token, &pod) {
            Err(why) => {
                eprintln!("podvisor: {why}");
                return ExitCode::from(2);
            }
            Ok(record) => SledJournal::open(&dir).and_then(|j| {
                if j.get(&record.sandbox_id)?.is_some() {
                    return Ok(serde_json::json!({
                        "adopted": false,
                        "why": format!("sandbox {} has a record already", record.sandbox_id),
                    }));
                }
                j.put(&record)?;
                j.flush()?;
                Ok(serde_json::json!({
                    "adopted": true,
                    "sandbox": record.sandbox_id,
                    "instance_name": record.instance_name,
                }))
            }),
        },
    };
    match result {
        Ok(report) => {
            println!("{report}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("podvisor: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The record that adopts a lost instance: `Creating` with the instance's
/// token, which start-up recovery looks up at the provider, adopts, probes
/// and brings to `Running` — exactly what it does for a create that was cut
/// off by a crash. The token must be the sandbox's own (it is derived from
/// the sandbox id), so a mistyped id or token is refused.
fn adoption_record(
    sandbox: &str,
    token: &str,
    pod: &str,
) -> Result<podvisor_state::InstanceRecord, String> {
    crate::api::validate_sandbox_id(sandbox).map_err(|e| format!("--sandbox: {e}"))?;
    let (namespace, name) = pod
        .split_once('/')
        .filter(|(ns, name)| crate::api::annotations::is_pod_identity(name, ns))
        .ok_or_else(|| {
            format!(
                "--pod {} is not <namespace>/<name> of a Kubernetes pod",
                crate::api::annotations::shown(pod)
            )
        })?;
    let generation = token
        .rsplit_once("-g")
        .and_then(|(_, g)| g.parse::<u64>().ok())
        .filter(|g| podvisor_state::idempotency_token(sandbox, *g) == token)
        .ok_or_else(|| {
            format!(
                "--token {} is not an idempotency token of sandbox {sandbox} (pv-<hash of the sandbox id>-g<generation>)",
                crate::api::annotations::shown(token)
            )
        })?;
    let now = podvisor_state::now_millis();
    let mut record = podvisor_state::InstanceRecord::pending(
        sandbox,
        name,
        namespace,
        podvisor_state::InstanceSpec::default(),
        now,
    );
    record.state = podvisor_state::State::Creating;
    record.generation = generation;
    record.token = Some(token.to_owned());
    Ok(record)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adoption_takes_only_the_sandbox_s_own_token_and_a_real_pod_name() {
        let sandbox = "3f2a9c1b".repeat(8);
        let token = podvisor_state::idempotency_token(&sandbox, 2);
        let record = adoption_record(&sandbox, &token, "shop/web-1").unwrap();
        assert_eq!(record.state, podvisor_state::State::Creating);
        assert_eq!(record.generation, 2);
        assert_eq!(record.token.as_deref(), Some(token.as_str()));
        assert_eq!(record.instance_name, "podvm-web-1-3f2a9c1b");
        assert_eq!(
            (record.pod_namespace.as_str(), record.pod_name.as_str()),
            ("shop", "web-1")
        );

        let other = podvisor_state::idempotency_token(&"0".repeat(64), 2);
        for (token, pod, why) in [
            (other.as_str(), "shop/web-1", "--token"),
            ("pv-x-g1", "shop/web-1", "--token"),
            (token.as_str(), "web-1", "--pod"),
            (token.as_str(), "shop/Web", "--pod"),
        ] {
            let e = adoption_record(&sandbox, token, pod).unwrap_err();
            assert!(e.starts_with(why), "{e}");
        }
        assert!(
            adoption_record("a/b", &token, "shop/web-1")
                .unwrap_err()
                .starts_with("--sandbox")
        );
    }
}
