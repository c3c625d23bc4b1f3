//! EC2's errors as provider error classes: what the daemon should do about
//! each failure (retry, slow down, call it gone, or give up with the reason).

use crate::error::{ErrorClass, ProviderError};
use aws_sdk_ec2::config::http::HttpResponse;
use aws_sdk_ec2::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use std::time::Duration;

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
        SdkError::DispatchFailure(_) => ProviderError::transient(format!(
            "EC2 {what}: cannot reach the endpoint: {}",
            DisplayErrorContext(err)
        )),
        SdkError::ResponseError(context) => ProviderError::transient(format!(
            "EC2 {what}: unreadable response (HTTP {}): {}",
            context.raw().status().as_u16(),
            DisplayErrorContext(err)
        )),
        // The request could not be built: credentials that do not load, a
        // bad endpoint. Trying again will not change that.
        SdkError::ConstructionFailure(_) => ProviderError::config(format!(
            "EC2 {what}: the request could not be made: {}",
            DisplayErrorContext(err)
        )),
        _ => ProviderError::transient(format!("EC2 {what}: {}", DisplayErrorContext(err))),
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
}
