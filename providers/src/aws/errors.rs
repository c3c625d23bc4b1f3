//! EC2's errors as provider error classes: what the daemon should do about
//! each failure (retry, slow down, call it gone, or give up with the reason).

use crate::error::{ErrorClass, ProviderError};
use aws_sdk_ec2::config::http::HttpResponse;
use aws_sdk_ec2::error::{ProvideErrorMetadata, SdkError};
use std::time::Duration;

/// How to give the provider AWS credentials: the reference's ways, in the
/// order the SDK's default chain tries them.
pub(crate) const CREDENTIALS_HINT: &str = "give AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, AWS_PROFILE (~/.aws), IRSA (AWS_ROLE_ARN, AWS_WEB_IDENTITY_TOKEN_FILE) or an instance profile";

/// An SDK error and its causes as one line of sentences, `error: cause:
/// cause` — never the `Debug` dump the SDK's `DisplayErrorContext` ends
/// with. Line breaks in a cause (a profile file's parse error) become
/// spaces.
pub(crate) fn sentences(err: &(dyn std::error::Error + 'static)) -> String {
    podvisor_state::report(err)
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}

/// The least wait after EC2 throttled us (its own retry guidance starts at ~1 s).
const THROTTLE_BACKOFF: Duration = Duration::from_secs(1);

/// Codes of EC2's rate limits.
const THROTTLING: &[&str] = &[
    "RequestLimitExceeded",
    "Throttling",
    "ThrottlingException",
    "ThrottledException",
    "RequestThrottled",
    "RequestThrottledException",
    "TooManyRequestsException",
    "EC2ThrottledException",
    "SlowDown",
    "PriorRequestNotComplete",
];

/// Codes that mean "no capacity for this now": another try (later, or in
/// another moment of the zone's life) may succeed.
const NO_CAPACITY: &[&str] = &[
    "InsufficientInstanceCapacity",
    "InsufficientHostCapacity",
    "InsufficientReservedInstanceCapacity",
    "InsufficientCapacity",
    "InsufficientAddressCapacity",
    "InsufficientFreeAddressesInSubnet",
    "Unsupported",
];

/// Codes of EC2's own trouble, or of a state that passes on its own.
const SERVER_TROUBLE: &[&str] = &[
    "InternalError",
    "InternalFailure",
    "ServiceUnavailable",
    "Unavailable",
    "IncorrectInstanceState",
    "IncorrectState",
    "ConcurrentTagAccess",
];

/// Codes of bad credentials or missing permissions: fix the configuration.
const ACCESS: &[&str] = &[
    "AuthFailure",
    "UnauthorizedOperation",
    "InvalidClientTokenId",
    "SignatureDoesNotMatch",
    "OptInRequired",
    "Blocked",
    "PendingVerification",
    "ExpiredToken",
    "RequestExpired",
];

/// EC2's code for an instance it does not have (or no longer lists).
pub(crate) const INSTANCE_NOT_FOUND: &str = "InvalidInstanceID.NotFound";

/// EC2's code for an instance type it does not offer.
pub(crate) const INVALID_INSTANCE_TYPE: &str = "InvalidInstanceType";

/// Whether EC2 said the thing named does not exist: by EC2's convention,
/// every such code ends in `.NotFound` (`InvalidAssociationID.NotFound`,
/// `InvalidAllocationID.NotFound`, ...).
pub(crate) fn names_a_missing_thing(e: &ProviderError) -> bool {
    e.code().is_some_and(|code| code.ends_with(".NotFound"))
}

/// The class of an EC2 error response, from its code and HTTP status.
pub fn classify(code: Option<&str>, status: Option<u16>) -> ErrorClass {
    let code = code.unwrap_or("");
    if THROTTLING.contains(&code) || matches!(status, Some(429 | 503)) {
        return ErrorClass::Throttled;
    }
    if NO_CAPACITY.contains(&code) || SERVER_TROUBLE.contains(&code) {
        return ErrorClass::Transient;
    }
    if ACCESS.contains(&code) {
        return ErrorClass::Config;
    }
    if code == INSTANCE_NOT_FOUND {
        return ErrorClass::NotFound;
    }
    if !code.is_empty() && status.is_none_or(|s| s < 500) {
        // InvalidParameter*, *.Malformed, other *.NotFound (an image, a
        // subnet), MissingParameter, IdempotentParameterMismatch, ...
        return ErrorClass::Permanent;
    }
    match status {
        Some(s) if s >= 500 => ErrorClass::Transient,
        Some(s) if s >= 400 => ErrorClass::Permanent,
        _ => ErrorClass::Transient,
    }
}

/// A failed SDK call of operation `what` (`RunInstances`, ...), classified,
/// with EC2's error code kept as the error's [`code`](ProviderError::code)
/// and, with EC2's message, in its message.
pub fn from_sdk<E>(what: &str, err: &SdkError<E, HttpResponse>) -> ProviderError
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
{
    match err {
        SdkError::ServiceError(context) => {
            let status = Some(context.raw().status().as_u16());
            let code = err.code();
            let class = classify(code, status);
            let reason = match (code, err.message()) {
                (Some(code), Some(message)) => format!("{code}: {message}"),
                (Some(code), None) => code.to_owned(),
                (None, Some(message)) => message.to_owned(),
                (None, None) => match status {
                    Some(s) => format!("HTTP {s}"),
                    None => "an error without a code".to_owned(),
                },
            };
            let hint = if code.is_some_and(|c| NO_CAPACITY.contains(&c)) {
                " (no capacity for this request now; will try again)"
            } else {
                ""
            };
            let message = format!("EC2 {what} failed: {reason}{hint}");
            let error = match class {
                ErrorClass::Throttled => ProviderError::throttled(message, Some(THROTTLE_BACKOFF)),
                ErrorClass::Transient => ProviderError::transient(message),
                ErrorClass::NotFound => ProviderError::not_found(message),
                ErrorClass::Permanent => ProviderError::permanent(message),
                ErrorClass::Config => ProviderError::config(message),
            };
            match code {
                Some(code) => error.with_code(code),
                None => error,
            }
        }
        SdkError::TimeoutError(_) => ProviderError::transient(format!("EC2 {what} timed out")),
        SdkError::DispatchFailure(failure) => {
            let cause = sentences(err);
            if failure.is_io() || failure.is_timeout() {
                ProviderError::transient(format!(
                    "EC2 {what}: cannot reach the endpoint: {cause}; check the network and --aws-endpoint (AWS_ENDPOINT_URL)"
                ))
            } else if failure.is_user() {
                ProviderError::config(format!(
                    "EC2 {what}: the request cannot be sent: {cause}; check --aws-endpoint (AWS_ENDPOINT_URL)"
                ))
            } else if failure.as_other().is_some() {
                // The HTTP client's own failure, which it classified.
                ProviderError::transient(format!("EC2 {what}: {cause}"))
            } else {
                // Unclassified, before the request left: the SDK could not
                // resolve credentials (or sign with them). At start-up that
                // stops the daemon (`build`); later it is a refresh (IRSA,
                // instance profile) that may pass.
                ProviderError::transient(format!(
                    "EC2 {what}: the request was not sent: {cause}; check the AWS credentials"
                ))
            }
        }
        SdkError::ResponseError(context) => ProviderError::transient(format!(
            "EC2 {what}: unreadable response (HTTP {}): {}",
            context.raw().status().as_u16(),
            sentences(err)
        )),
        // The request could not be built: credentials that do not load, a
        // bad endpoint. Trying again will not change that.
        SdkError::ConstructionFailure(_) => ProviderError::config(format!(
            "EC2 {what}: the request could not be made: {}",
            sentences(err)
        )),
        _ => ProviderError::transient(format!("EC2 {what}: {}", sentences(err))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use aws_sdk_ec2::error::ErrorMetadata;
    use aws_sdk_ec2::operation::run_instances::RunInstancesError;
    use aws_smithy_types::body::SdkBody;

    #[test]
    fn ec2_codes_map_to_the_classes_the_daemon_acts_on() {
        use ErrorClass::*;
        let cases = [
            (Some("RequestLimitExceeded"), Some(503), Throttled),
            (Some("RequestLimitExceeded"), Some(400), Throttled),
            (Some("Throttling"), Some(400), Throttled),
            (None, Some(503), Throttled),
            (None, Some(429), Throttled),
            (Some("ServiceUnavailable"), Some(503), Throttled),
            (Some("InsufficientInstanceCapacity"), Some(500), Transient),
            (Some("Unsupported"), Some(400), Transient),
            (Some("InternalError"), Some(500), Transient),
            (Some("IncorrectInstanceState"), Some(400), Transient),
            (None, Some(500), Transient),
            (None, Some(502), Transient),
            (Some("SomethingNew"), Some(500), Transient),
            (Some("InvalidInstanceID.NotFound"), Some(400), NotFound),
            (Some("InvalidAMIID.NotFound"), Some(400), Permanent),
            (Some("InvalidSubnetID.NotFound"), Some(400), Permanent),
            (Some("InvalidParameterValue"), Some(400), Permanent),
            (Some("InvalidParameterCombination"), Some(400), Permanent),
            (Some("InvalidInstanceID.Malformed"), Some(400), Permanent),
            (Some("IdempotentParameterMismatch"), Some(400), Permanent),
            (Some("MissingParameter"), Some(400), Permanent),
            (None, Some(400), Permanent),
            (Some("UnauthorizedOperation"), Some(403), Config),
            (Some("AuthFailure"), Some(401), Config),
            (Some("OptInRequired"), Some(401), Config),
        ];
        for (code, status, want) in cases {
            assert_eq!(classify(code, status), want, "{code:?} {status:?}");
        }
    }

    fn service_error(code: &str, message: &str, status: u16) -> ProviderError {
        let meta = ErrorMetadata::builder().code(code).message(message).build();
        let raw = HttpResponse::new(status.try_into().unwrap(), SdkBody::from("<Response/>"));
        let err: SdkError<RunInstancesError, HttpResponse> =
            SdkError::service_error(RunInstancesError::generic(meta), raw);
        from_sdk("RunInstances", &err)
    }

    #[test]
    fn sdk_errors_keep_the_code_and_message_and_are_classified() {
        let e = service_error(
            "InvalidAMIID.NotFound",
            "The image id '[ami-12345678]' does not exist",
            400,
        );
        assert_eq!(e.class, ErrorClass::Permanent);
        assert_eq!(e.code(), Some("InvalidAMIID.NotFound"));
        assert_eq!(
            e.message,
            "EC2 RunInstances failed: InvalidAMIID.NotFound: The image id '[ami-12345678]' does not exist"
        );
        let e = service_error("RequestLimitExceeded", "Request limit exceeded.", 503);
        assert_eq!(e.class, ErrorClass::Throttled);
        assert_eq!(e.code(), Some("RequestLimitExceeded"));
        assert!(e.retry_after.is_some());
        let e = service_error(
            "InsufficientInstanceCapacity",
            "We currently do not have sufficient m6a.large capacity",
            500,
        );
        assert_eq!(e.class, ErrorClass::Transient);
        assert!(e.message.contains("no capacity"), "{}", e.message);
        let e = service_error("UnauthorizedOperation", "You are not authorized", 403);
        assert_eq!(e.class, ErrorClass::Config);
    }

    #[test]
    fn every_service_error_carries_ec2s_code_whatever_its_class() {
        for (code, status, class) in [
            (INSTANCE_NOT_FOUND, 400, ErrorClass::NotFound),
            ("InvalidAllocationID.NotFound", 400, ErrorClass::Permanent),
            (INVALID_INSTANCE_TYPE, 400, ErrorClass::Permanent),
            ("InsufficientInstanceCapacity", 500, ErrorClass::Transient),
            ("AuthFailure", 401, ErrorClass::Config),
        ] {
            let e = service_error(code, "whatever EC2 says", status);
            assert_eq!((e.class, e.code()), (class, Some(code)), "{e}");
        }
        // A missing thing is told by its code alone, never by the message.
        assert!(names_a_missing_thing(&service_error(
            "InvalidAssociationID.NotFound",
            "The association does not exist",
            400
        )));
        assert!(!names_a_missing_thing(&service_error(
            "InvalidParameterValue",
            "Value InvalidAssociationID.NotFound is not valid",
            400
        )));
        // A response without a code has none to keep.
        let raw = HttpResponse::new(503.try_into().unwrap(), SdkBody::from("<Response/>"));
        let err: SdkError<RunInstancesError, HttpResponse> = SdkError::service_error(
            RunInstancesError::generic(ErrorMetadata::builder().build()),
            raw,
        );
        assert_eq!(from_sdk("RunInstances", &err).code(), None);
    }

    #[test]
    fn transport_failures_are_transient() {
        let err: SdkError<RunInstancesError, HttpResponse> =
            SdkError::timeout_error("read timed out");
        let e = from_sdk("RunInstances", &err);
        assert_eq!(e.class, ErrorClass::Transient);
        assert_eq!(e.code(), None, "no response, no EC2 code");
        assert_eq!(e.message, "EC2 RunInstances timed out");
        let raw = HttpResponse::new(502.try_into().unwrap(), SdkBody::from("garbage"));
        let err: SdkError<RunInstancesError, HttpResponse> =
            SdkError::response_error("not XML", raw);
        let e = from_sdk("RunInstances", &err);
        assert_eq!(e.class, ErrorClass::Transient);
        assert!(e.message.contains("HTTP 502"), "{}", e.message);
        let err: SdkError<RunInstancesError, HttpResponse> =
            SdkError::construction_failure("no credentials");
        assert_eq!(from_sdk("RunInstances", &err).class, ErrorClass::Config);
    }

    /// An error with a cause, as the HTTP stack nests them.
    #[derive(Debug, thiserror::Error)]
    #[error("{what}")]
    struct Nested {
        what: &'static str,
        #[source]
        cause: Option<Box<Nested>>,
    }

    /// What no operator should read: pieces of a Rust `Debug` dump.
    fn assert_sentences(message: &str) {
        for debug in ["{", "Some(", "kind:", "source:", "DispatchFailure("] {
            assert!(!message.contains(debug), "{debug} in {message}");
        }
        assert!(
            message.len() < 300,
            "{} characters: {message}",
            message.len()
        );
    }

    #[test]
    fn dispatch_failures_say_their_causes_as_sentences_not_debug() {
        use aws_sdk_ec2::error::ConnectorError;
        let refused = || {
            Box::new(Nested {
                what: "tcp connect error",
                cause: Some(Box::new(Nested {
                    what: "Connection refused (os error 111)",
                    cause: None,
                })),
            })
        };
        let err: SdkError<RunInstancesError, HttpResponse> =
            SdkError::dispatch_failure(ConnectorError::io(refused()));
        let e = from_sdk("RunInstances", &err);
        assert_eq!(e.class, ErrorClass::Transient);
        assert_eq!(
            e.message,
            "EC2 RunInstances: cannot reach the endpoint: dispatch failure: io error: tcp connect error: Connection refused (os error 111); check the network and --aws-endpoint (AWS_ENDPOINT_URL)"
        );
        assert_sentences(&e.message);

        // Before the request leaves: credentials that did not load (the
        // SDK's own words); a refresh may pass, so it is tried again.
        let not_loaded = Box::new(Nested {
            what: "the credential provider was not enabled",
            cause: Some(Box::new(Nested {
                what: "no providers in chain provided credentials",
                cause: None,
            })),
        });
        let err: SdkError<RunInstancesError, HttpResponse> =
            SdkError::dispatch_failure(ConnectorError::other(not_loaded, None));
        let e = from_sdk("RunInstances", &err);
        assert_eq!(e.class, ErrorClass::Transient);
        assert!(!e.message.contains("cannot reach"), "{}", e.message);
        assert!(
            e.message
                .starts_with("EC2 RunInstances: the request was not sent: ")
                && e.message
                    .contains("no providers in chain provided credentials")
                && e.message.ends_with("check the AWS credentials"),
            "{}",
            e.message
        );
        assert_sentences(&e.message);

        let err: SdkError<RunInstancesError, HttpResponse> =
            SdkError::dispatch_failure(ConnectorError::user(refused()));
        let e = from_sdk("RunInstances", &err);
        assert_eq!(e.class, ErrorClass::Config);
        assert_sentences(&e.message);
    }

    #[test]
    fn sentences_join_the_cause_chain_on_one_line() {
        let err = Nested {
            what: "error parsing profile file:\n  line 3",
            cause: Some(Box::new(Nested {
                what: "unexpected '['",
                cause: None,
            })),
        };
        assert_eq!(
            sentences(&err),
            "error parsing profile file: line 3: unexpected '['"
        );
    }
}
