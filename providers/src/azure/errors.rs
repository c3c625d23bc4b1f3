//! Azure's error answers, classified in one place.
//!
//! Azure Resource Manager answers errors as
//! `{"error": {"code", "message", "target", "details": [...]}}` (ARM's
//! "Common error response", Microsoft Learn, "Azure Resource Manager API
//! guidelines"); the compute resource provider answers some throttling
//! (`429`) with the inner object bare, `{"code", "message", "details"}`
//! (Microsoft Learn, "Troubleshooting API throttling errors"). Both are
//! read. The code is kept as the error's [`code`](ProviderError::code);
//! the code, message and target go into its message (and so the pod VM's
//! `last_error`).

use crate::error::{ErrorClass, ProviderError};
use serde::Deserialize;
use std::time::Duration;

/// How a failed request is handled, from its HTTP status alone:
/// [`ErrorClass::from_http_status`] (a 409 is another operation holding
/// the VM: "Operation … is not allowed since …"). [`from_response`] refines
/// it by ARM's code.
pub fn classify(status: u16) -> ErrorClass {
    ErrorClass::from_http_status(status)
}

/// ARM's error object (`error` of the common error response, or bare).
#[derive(Debug, Deserialize, Default, Clone, PartialEq, Eq)]
pub struct ArmError {
    /// The error code (`ResourceNotFound`, `OperationNotAllowed`…).
    #[serde(default)]
    pub code: Option<String>,
    /// What went wrong, in Azure's words.
    #[serde(default)]
    pub message: Option<String>,
    /// The part of the request it is about (`vmSize`, `imageReference`).
    #[serde(default)]
    pub target: Option<String>,
}

#[derive(Debug, Deserialize)]
struct Wrapped {
    error: ArmError,
}

/// The error object of an answer body, in either shape; empty if neither.
pub fn parse(body: &[u8]) -> ArmError {
    if let Ok(w) = serde_json::from_slice::<Wrapped>(body) {
        return w.error;
    }
    serde_json::from_slice::<ArmError>(body).unwrap_or_default()
}

/// `Azure <what>: <code>: <message> (target <target>)`, bounded.
pub fn describe(what: &str, status: Option<u16>, error: &ArmError) -> String {
    let mut text = format!("Azure {what}:");
    if let Some(status) = status {
        text.push_str(&format!(" HTTP {status}"));
    }
    if let Some(code) = &error.code {
        text.push_str(&format!(" {code}"));
    }
    if let Some(message) = &error.message {
        text.push_str(&format!(": {}", bounded(message)));
    }
    if let Some(target) = &error.target {
        text.push_str(&format!(" (target {})", bounded(target)));
    }
    text
}

/// At most 500 characters of a cloud's text.
fn bounded(text: &str) -> String {
    const MAX: usize = 500;
    match text.char_indices().nth(MAX) {
        Some((at, _)) => format!("{}…", &text[..at]),
        None => text.to_owned(),
    }
}

/// The error of a request `what` (`create VM podvm-x`) answered `status`
/// with `body` and, for 429/503, `retry_after`. The body is Azure's own
/// text, never a request's: no secret reaches it.
pub fn from_response(
    what: &str,
    status: u16,
    body: &[u8],
    retry_after: Option<Duration>,
) -> ProviderError {
    let error = parse(body);
    let text = describe(what, Some(status), &error);
    let code = error.code.as_deref().unwrap_or("");
    // A 409 is usually another operation holding the VM, which passes;
    // a size the region cannot give or a spent quota does not pass by
    // retrying (each retry would be a PUT spent).
    let class = if status == 409
        && ["SkuNotAvailable", "QuotaExceeded"]
            .iter()
            .any(|c| c.eq_ignore_ascii_case(code))
    {
        ErrorClass::Permanent
    } else {
        classify(status)
    };
    let err = match class {
        ErrorClass::Throttled => ProviderError::throttled(text, retry_after),
        ErrorClass::Transient => ProviderError::transient(text),
        ErrorClass::Config => ProviderError::config(format!(
            "{text} (check the credentials and the role assigned to them)"
        )),
        ErrorClass::NotFound => ProviderError::not_found(text),
        ErrorClass::Permanent => ProviderError::permanent(text),
    };
    match error.code {
        Some(code) => err.with_code(code),
        None => err,
    }
}

/// A long-running operation that ended `Failed` or `Canceled`: its error
/// code and message in the error. Allocation failures and internal errors
/// are transient (a retry may land elsewhere); anything else permanent.
pub fn from_operation(what: &str, status: &str, error: &ArmError) -> ProviderError {
    let text = describe(&format!("{what} ended {status}"), None, error);
    let code = error.code.clone().unwrap_or_default();
    let transient = status.eq_ignore_ascii_case("Canceled")
        || [
            "AllocationFailed",
            "ZonalAllocationFailed",
            "OverconstrainedAllocationRequest",
            "OverconstrainedZonalAllocationRequest",
            "InternalExecutionError",
            "InternalOperationError",
            "InternalServerError",
            "OSProvisioningTimedOut",
            "VMStartTimedOut",
            "RetryableError",
            "Conflict",
            "OperationPreempted",
            "TooManyRequests",
        ]
        .iter()
        .any(|c| c.eq_ignore_ascii_case(&code));
    let err = if transient {
        ProviderError::transient(text)
    } else {
        ProviderError::permanent(text)
    };
    if code.is_empty() {
        err
    } else {
        err.with_code(code)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_error_shapes_are_read() {
        let arm = br#"{"error":{"code":"ResourceNotFound","message":"gone","target":"vm"}}"#;
        let bare = br#"{"code":"OperationNotAllowed","message":"slow down","details":[]}"#;
        assert_eq!(parse(arm).code.as_deref(), Some("ResourceNotFound"));
        assert_eq!(parse(bare).code.as_deref(), Some("OperationNotAllowed"));
        assert_eq!(parse(b"<html>").code, None);
        let e = from_response("get VM x", 404, arm, None);
        assert_eq!(e.class, ErrorClass::NotFound);
        assert_eq!(e.code(), Some("ResourceNotFound"));
        assert!(
            e.message
                .contains("HTTP 404 ResourceNotFound: gone (target vm)"),
            "{}",
            e.message
        );
        let e = from_response("create VM x", 429, bare, Some(Duration::from_secs(7)));
        assert_eq!(e.class, ErrorClass::Throttled);
        assert_eq!(e.retry_after, Some(Duration::from_secs(7)));
        assert_eq!(
            from_response("x", 409, b"", None).class,
            ErrorClass::Transient
        );
        let sku = br#"{"error":{"code":"SkuNotAvailable","message":"not in eastus"}}"#;
        assert_eq!(
            from_response("x", 409, sku, None).class,
            ErrorClass::Permanent
        );
        assert_eq!(from_response("x", 403, b"", None).class, ErrorClass::Config);
        assert_eq!(
            from_response("x", 412, b"", None).class,
            ErrorClass::Permanent
        );
        assert!(from_response("x", 400, &[b'a'; 5000], None).message.len() < 600);
    }

    #[test]
    fn failed_operations_keep_their_code() {
        let e = from_operation(
            "create VM x",
            "Failed",
            &ArmError {
                code: Some("AllocationFailed".into()),
                message: Some("no capacity".into()),
                target: None,
            },
        );
        assert_eq!(e.class, ErrorClass::Transient);
        assert_eq!(e.code(), Some("AllocationFailed"));
        assert!(e.message.contains("ended Failed"), "{}", e.message);
        let e = from_operation(
            "create VM x",
            "Failed",
            &ArmError {
                code: Some("InvalidParameter".into()),
                ..ArmError::default()
            },
        );
        assert_eq!(e.class, ErrorClass::Permanent);
    }
}
