//! IBM Cloud's error answers, classified in one place.
//!
//! VPC, Global Tagging and Global Search answer errors as
//! `{"errors": [{"code", "message", "more_info", "target": {"name", "type"}}],
//! "trace": "<id>"}` (IBM Cloud API docs, "Error handling"); IAM as
//! `{"errorCode": "BXNIM…", "errorMessage": "…", "context": {…}}`. The
//! code is kept as the error's [`code`](ProviderError::code), the message,
//! target and trace go into its message (and so the pod VM's `last_error`).

use crate::error::{ErrorClass, ProviderError};
use serde::Deserialize;
use std::time::Duration;

/// VPC: a name (instance, boot volume) already in use.
pub const UNIQUE_FAILED: &str = "validation_unique_failed";

/// How a failed request is handled, from its HTTP status:
/// [`ErrorClass::from_http_status`] (a 409 is another operation holding
/// the instance, or a `pending` instance refusing deletion; the client has
/// already retried a 401 with a fresh token).
pub fn classify(status: u16) -> ErrorClass {
    ErrorClass::from_http_status(status)
}

#[derive(Debug, Deserialize, Default)]
struct Body {
    #[serde(default)]
    errors: Vec<Item>,
    trace: Option<String>,
    #[serde(rename = "errorCode")]
    error_code: Option<String>,
    #[serde(rename = "errorMessage")]
    error_message: Option<String>,
}

#[derive(Debug, Deserialize)]
struct Item {
    code: Option<String>,
    message: Option<String>,
    target: Option<Target>,
}

#[derive(Debug, Deserialize)]
struct Target {
    name: Option<String>,
}

/// The error of a request `what` (`create instance podvm-x`) answered
/// `status` with `body` and, for 429/503, `retry_after`: classified, IBM's
/// code kept, its message, target and trace in the message. The body is
/// IBM's own text, never a request's: no secret reaches it.
pub fn from_response(
    what: &str,
    status: u16,
    body: &[u8],
    retry_after: Option<Duration>,
) -> ProviderError {
    let parsed: Body = serde_json::from_slice(body).unwrap_or_default();
    let first = parsed.errors.into_iter().next();
    let (code, message, target) = match first {
        Some(item) => (item.code, item.message, item.target.and_then(|t| t.name)),
        None => (parsed.error_code, parsed.error_message, None),
    };
    let class = classify(status);
    let mut text = format!("IBM Cloud {what}: HTTP {status}");
    if let Some(code) = &code {
        text.push_str(&format!(" {code}"));
    }
    if let Some(message) = &message {
        text.push_str(&format!(": {}", clip(message)));
    }
    if let Some(target) = target {
        text.push_str(&format!(" (target {})", clip(&target)));
    }
    if let Some(trace) = parsed.trace {
        text.push_str(&format!(" [trace {}]", clip(&trace)));
    }
    let error = match class {
        ErrorClass::Throttled => ProviderError::throttled(text, retry_after),
        ErrorClass::Transient => ProviderError::transient(text),
        ErrorClass::NotFound => ProviderError::not_found(text),
        ErrorClass::Permanent => ProviderError::permanent(text),
        ErrorClass::Config => ProviderError::config(text),
    };
    let error = match (class, retry_after) {
        (ErrorClass::Transient, Some(wait)) => ProviderError {
            retry_after: Some(wait),
            ..error
        },
        _ => error,
    };
    match code {
        Some(code) => error.with_code(clip(&code)),
        None => error,
    }
}

/// A request that got no answer (connect, TLS, timeout, a cut
/// connection): transient, without the URL's query (no secret is in one,
/// but a listing cursor is noise).
pub fn from_transport(what: &str, err: &reqwest::Error) -> ProviderError {
    let kind = if err.is_timeout() {
        "timed out"
    } else if err.is_connect() {
        "could not connect"
    } else if err.is_decode() || err.is_body() {
        "answer could not be read"
    } else {
        "request failed"
    };
    let mut source: &dyn std::error::Error = err;
    while let Some(inner) = source.source() {
        source = inner;
    }
    ProviderError::transient(format!("IBM Cloud {what}: {kind}: {source}"))
}

/// A 2xx answer whose body is not what IBM documents. The parser's own
/// message is left out: it may quote a value of the answer (an IAM
/// answer holds the access token).
pub fn malformed(what: &str, err: &serde_json::Error) -> ProviderError {
    ProviderError::transient(format!(
        "IBM Cloud {what}: the answer is not the documented JSON (line {}, column {})",
        err.line(),
        err.column()
    ))
}

/// Cuts text from a server to 300 characters, on a character boundary.
fn clip(s: &str) -> String {
    match s.char_indices().nth(300) {
        Some((at, _)) => format!("{}…", &s[..at]),
        None => s.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vpc_errors_keep_code_message_target_and_trace() {
        let body = br#"{"errors":[{"code":"validation_unique_failed","message":"Provided Name (podvm-a) is not unique","target":{"name":"name","type":"field"}}],"trace":"7c2f","status_code":400}"#;
        let e = from_response("create instance podvm-a", 400, body, None);
        assert_eq!(e.class, ErrorClass::Permanent);
        assert_eq!(e.code(), Some(UNIQUE_FAILED));
        assert_eq!(
            e.message,
            "IBM Cloud create instance podvm-a: HTTP 400 validation_unique_failed: \
             Provided Name (podvm-a) is not unique (target name) [trace 7c2f]"
        );
    }

    #[test]
    fn statuses_classify_as_the_daemon_needs() {
        let cases = [
            (429, ErrorClass::Throttled),
            (503, ErrorClass::Transient),
            (500, ErrorClass::Transient),
            (409, ErrorClass::Transient),
            (408, ErrorClass::Transient),
            (401, ErrorClass::Config),
            (403, ErrorClass::Config),
            (404, ErrorClass::NotFound),
            (400, ErrorClass::Permanent),
        ];
        for (status, class) in cases {
            assert_eq!(classify(status), class, "{status}");
        }
    }

    #[test]
    fn throttling_carries_its_wait_and_iam_errors_their_code() {
        let e = from_response("list", 429, b"", Some(Duration::from_secs(7)));
        assert_eq!(e.class, ErrorClass::Throttled);
        assert_eq!(e.retry_after, Some(Duration::from_secs(7)));
        let e = from_response(
            "IAM token",
            400,
            br#"{"errorCode":"BXNIM0415E","errorMessage":"Provided API key could not be found"}"#,
            None,
        );
        assert_eq!(e.code(), Some("BXNIM0415E"));
        assert!(e.message.contains("could not be found"), "{e}");
        let long = format!(
            r#"{{"errors":[{{"code":"x","message":"{}"}}]}}"#,
            "é".repeat(500)
        );
        let e = from_response("x", 400, long.as_bytes(), None);
        assert!(e.message.chars().count() < 400, "{}", e.message.len());
    }
}
