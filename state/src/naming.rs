//! Deterministic names: the instance name and the idempotency token.

use sha2::{Digest, Sha256};

/// Longest instance name: a DNS label, and the limit every provider accepts.
pub const MAX_INSTANCE_NAME: usize = 63;
/// Longest pod part of an instance name, as in the reference.
const MAX_POD_PART: usize = 48;
/// Longest idempotency token: EC2's `ClientToken` limit.
pub const MAX_TOKEN_LEN: usize = 64;

/// The instance name the reference gives a pod VM:
/// `podvm-<pod>-<first 8 chars of sandbox id>`, lower-cased, with every
/// character outside `[a-z0-9-]` mapped to `-`, the pod part cut to keep the
/// name within 63 characters.
pub fn instance_name(pod_name: &str, sandbox_id: &str) -> String {
    let pod: String = sanitize(pod_name).chars().take(MAX_POD_PART).collect();
    let sandbox: String = sanitize(sandbox_id).chars().take(8).collect();
    let name = format!("podvm-{pod}-{sandbox}");
    debug_assert!(name.len() <= MAX_INSTANCE_NAME);
    name
}

fn sanitize(s: &str) -> String {
    s.chars()
        .map(|c| {
            let c = c.to_ascii_lowercase();
            if c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' {
                c
            } else {
                '-'
            }
        })
        .collect()
}

/// The idempotency token of one creation attempt series of a sandbox:
/// `pv-<32 hex of SHA-256(sandbox id)>-g<generation>`.
///
/// It is derived, not random, so that a recovered `Creating` record and the
/// provider agree on it; hashing keeps any sandbox id within EC2's 64 ASCII
/// characters and within the characters every provider accepts in a tag.
pub fn idempotency_token(sandbox_id: &str, generation: u64) -> String {
    let digest = Sha256::digest(sandbox_id.as_bytes());
    let token = format!("pv-{}-g{generation}", &hex::encode(digest)[..32]);
    debug_assert!(token.len() <= MAX_TOKEN_LEN);
    token
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instance_name_follows_the_reference_pattern() {
        assert_eq!(
            instance_name("nginx-7d9", "3f2a9c1b00ffeeddccbbaa99"),
            "podvm-nginx-7d9-3f2a9c1b"
        );
    }

    #[test]
    fn instance_name_maps_foreign_characters_and_lower_cases() {
        assert_eq!(
            instance_name("My_Pod.v1", "ABCDEF12345"),
            "podvm-my-pod-v1-abcdef12"
        );
    }

    #[test]
    fn instance_name_never_exceeds_63_characters() {
        let pod = "p".repeat(200);
        let name = instance_name(&pod, &"a".repeat(64));
        assert_eq!(name.len(), MAX_INSTANCE_NAME);
        assert!(name.starts_with("podvm-ppp") && name.ends_with("-aaaaaaaa"));
    }

    #[test]
    fn token_is_stable_short_and_changes_with_generation() {
        let id = "f".repeat(64);
        let t1 = idempotency_token(&id, 1);
        assert_eq!(t1, idempotency_token(&id, 1));
        assert_ne!(t1, idempotency_token(&id, 2));
        assert_ne!(t1, idempotency_token("other", 1));
        assert!(idempotency_token(&id, u64::MAX).len() <= MAX_TOKEN_LEN);
        assert!(t1.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'));
    }
}
