//! The provider error: what failed, and what the caller should do about it.

use std::fmt;
use std::time::Duration;

/// How a failed provider call should be handled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorClass {
    /// May succeed if tried again (network trouble, a 5xx, no capacity now).
    Transient,
    /// The cloud asked us to slow down; retry after the given delay.
    Throttled,
    /// The instance (or the thing named) does not exist.
    NotFound,
    /// Will fail again however often it is tried (bad parameter, no permission).
    Permanent,
    /// The provider's configuration is wrong; fix the flags.
    Config,
}

impl ErrorClass {
    /// How a REST cloud's failed request is handled, from its HTTP status
    /// alone (IBM Cloud and Azure Resource Manager alike): 429 is
    /// throttled; 5xx, 408 and 409 (another operation holds the resource)
    /// are transient; 401 and 403 are configuration (the credentials or
    /// their permissions); 404 is not found (a create's caller turns it
    /// into permanent: what is missing is an image or a subnet); any other
    /// 4xx is permanent. A provider refines it by the cloud's error code.
    pub fn from_http_status(status: u16) -> Self {
        match status {
            429 => ErrorClass::Throttled,
            408 | 409 => ErrorClass::Transient,
            s if s >= 500 => ErrorClass::Transient,
            401 | 403 => ErrorClass::Config,
            404 => ErrorClass::NotFound,
            _ => ErrorClass::Permanent,
        }
    }

    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorClass::Transient => "transient",
            ErrorClass::Throttled => "throttled",
            ErrorClass::NotFound => "not_found",
            ErrorClass::Permanent => "permanent",
            ErrorClass::Config => "config",
        }
    }
}

/// A failed provider call: its class (what the daemon does about it), the
/// cloud's own error code when there is one, and a message for people.
///
/// Code that decides something from an error reads [`class`](Self::class)
/// or [`code`](Self::code), never the message: the message is only reported.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProviderError {
    /// How to handle it.
    pub class: ErrorClass,
    /// The cloud's own name for the failure, as the cloud spells it: EC2's
    /// API error code (`InvalidInstanceID.NotFound`, `InvalidInstanceType`),
    /// libvirt's error number name (`VIR_ERR_NO_DOMAIN`), the OS error of a
    /// local call (`ENOENT`). `None` when the failure is podvisor's own
    /// (a refused input, a timeout) or the cloud gave no code.
    pub code: Option<String>,
    /// What went wrong, naming the thing and the cause; never a secret.
    pub message: String,
    /// For `Throttled`: the least delay before the next try.
    pub retry_after: Option<Duration>,
}

impl ProviderError {
    fn new(class: ErrorClass, message: impl Into<String>) -> Self {
        Self {
            class,
            code: None,
            message: message.into(),
            retry_after: None,
        }
    }
    /// A failure that may pass.
    pub fn transient(message: impl Into<String>) -> Self {
        Self::new(ErrorClass::Transient, message)
    }
    /// The cloud's rate limit.
    pub fn throttled(message: impl Into<String>, retry_after: Option<Duration>) -> Self {
        Self {
            retry_after,
            ..Self::new(ErrorClass::Throttled, message)
        }
    }
    /// The thing does not exist.
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(ErrorClass::NotFound, message)
    }
    /// A failure that will repeat.
    pub fn permanent(message: impl Into<String>) -> Self {
        Self::new(ErrorClass::Permanent, message)
    }
    /// Wrong configuration.
    pub fn config(message: impl Into<String>) -> Self {
        Self::new(ErrorClass::Config, message)
    }

    /// The same error, carrying the cloud's own error `code`.
    #[must_use]
    pub fn with_code(mut self, code: impl Into<String>) -> Self {
        self.code = Some(code.into());
        self
    }

    /// The same error, unless it says a thing named by the configuration
    /// does not exist (`NotFound`): then a `Config` error naming the flag
    /// to fix, `<flag>: <what> does not exist: <message>` (`flag` as
    /// `--image-id (IBMCLOUD_PODVM_IMAGE_ID)`). For a check of an image, a
    /// subnet or a host the operator configured.
    #[must_use]
    pub fn missing_is_config(self, flag: &str, what: impl fmt::Display) -> Self {
        if self.class == ErrorClass::NotFound {
            Self::config(format!("{flag}: {what} does not exist: {}", self.message))
        } else {
            self
        }
    }

    /// The cloud's own error code, if it gave one: the `code` field,
    /// borrowed, for matching (`e.code() == Some("InvalidInstanceType")`).
    pub fn code(&self) -> Option<&str> {
        self.code.as_deref()
    }

    /// Whether trying again may help.
    pub fn is_retryable(&self) -> bool {
        matches!(self.class, ErrorClass::Transient | ErrorClass::Throttled)
    }
}

impl fmt::Display for ProviderError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for ProviderError {}

impl From<ProviderError> for podvisor_state::OpFailure {
    fn from(e: ProviderError) -> Self {
        Self {
            retryable: e.is_retryable(),
            retry_after: e.retry_after,
            message: e.message,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use podvisor_state::OpFailure;

    #[test]
    fn a_missing_configured_thing_is_a_config_error_naming_the_flag() {
        let e = ProviderError::not_found("HTTP 404 ResourceNotFound")
            .missing_is_config("--imageid (AZURE_IMAGE_ID)", "image /x");
        assert_eq!(e.class, ErrorClass::Config);
        assert_eq!(
            e.message,
            "--imageid (AZURE_IMAGE_ID): image /x does not exist: HTTP 404 ResourceNotFound"
        );
        let other = ProviderError::transient("HTTP 503").missing_is_config("--x", "y");
        assert_eq!(other, ProviderError::transient("HTTP 503"));
    }

    #[test]
    fn only_transient_and_throttled_errors_are_retryable() {
        let cases = [
            (ProviderError::transient("t"), true),
            (
                ProviderError::throttled("s", Some(Duration::from_secs(2))),
                true,
            ),
            (ProviderError::not_found("n"), false),
            (ProviderError::permanent("p"), false),
            (ProviderError::config("c"), false),
        ];
        for (e, retryable) in cases {
            assert_eq!(e.is_retryable(), retryable, "{:?}", e.class);
        }
    }

    #[test]
    fn errors_map_to_machine_failures_keeping_message_and_delay() {
        let f: OpFailure =
            ProviderError::throttled("RequestLimitExceeded", Some(Duration::from_secs(3))).into();
        assert_eq!(
            f,
            OpFailure {
                message: "RequestLimitExceeded".into(),
                retryable: true,
                retry_after: Some(Duration::from_secs(3))
            }
        );
        let f: OpFailure = ProviderError::permanent("InvalidAMIID.Malformed").into();
        assert!(!f.retryable);
    }

    #[test]
    fn the_cloud_code_rides_beside_the_class_and_stays_out_of_the_message() {
        let e = ProviderError::not_found("Instance i-0123 does not exist")
            .with_code("InvalidInstanceID.NotFound");
        assert_eq!(e.class, ErrorClass::NotFound);
        assert_eq!(e.code(), Some("InvalidInstanceID.NotFound"));
        assert_eq!(e.to_string(), "Instance i-0123 does not exist");
        assert_eq!(ProviderError::transient("timed out").code(), None);
        // The machine's failure keeps what it acts on; the code is the
        // provider's business.
        let f: OpFailure = e.into();
        assert_eq!(f.message, "Instance i-0123 does not exist");
        assert!(!f.retryable);
    }

    #[test]
    fn class_labels_are_stable() {
        let labels: Vec<_> = [
            ErrorClass::Transient,
            ErrorClass::Throttled,
            ErrorClass::NotFound,
            ErrorClass::Permanent,
            ErrorClass::Config,
        ]
        .iter()
        .map(|c| c.as_str())
        .collect();
        assert_eq!(
            labels,
            ["transient", "throttled", "not_found", "permanent", "config"]
        );
    }
}
