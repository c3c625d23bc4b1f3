//! libvirt's errors as provider errors: the class the daemon acts on, and
//! libvirt's own error number name (`VIR_ERR_NO_DOMAIN`) as the code.

use crate::error::ProviderError;
use virt::error::ErrorNumber;
use virt::sys;

/// Maps a libvirt error to the daemon's classes, naming what was being
/// done (`what`) and keeping libvirt's error number as the code.
pub(super) fn classify(what: impl std::fmt::Display, e: &virt::error::Error) -> ProviderError {
    let message = format!("{what}: {}", e.message());
    let code = e.code();
    let error = if code.is_any(vec![
        ErrorNumber::NoDomain,
        ErrorNumber::NoStorageVolume,
        ErrorNumber::NoStoragePool,
        ErrorNumber::NoNetwork,
    ]) {
        ProviderError::not_found(message)
    } else if code.is_any(vec![
        ErrorNumber::NoConnect,
        ErrorNumber::Rpc,
        ErrorNumber::OperationTimeout,
        ErrorNumber::SystemError,
        ErrorNumber::InternalError,
        ErrorNumber::OperationFailed,
        ErrorNumber::ResourceBusy,
        ErrorNumber::AgentUnresponsive,
        ErrorNumber::OperationAborted,
        ErrorNumber::AuthUnavailable,
    ]) {
        ProviderError::transient(message)
    } else {
        // Bad XML, unsupported configuration, denied, invalid arguments, ...
        ProviderError::permanent(message)
    };
    error.with_code(code_of(e))
}

/// libvirt's name of the error number of `e` (`VIR_ERR_NO_DOMAIN`), for a
/// provider error made from it by hand.
pub(super) fn code_of(e: &virt::error::Error) -> String {
    code_name(e.code().to_raw())
}

/// libvirt's name of error number `raw` (`VIR_ERR_NO_DOMAIN` for 42), as
/// `virterror.h` spells it; `VIR_ERR_<number>` for a number newer than the
/// bindings.
pub(super) fn code_name(raw: sys::virErrorNumber) -> String {
    match NAMES.iter().find(|(number, _)| *number == raw) {
        Some((_, name)) => (*name).to_owned(),
        None => format!("VIR_ERR_{raw}"),
    }
}

/// Every error number of `virterror.h` the bindings know, by its C name.
macro_rules! names {
    ($($name:ident),* $(,)?) => {
        &[$((sys::$name, stringify!($name))),*]
    };
}

/// Error number → name.
const NAMES: &[(sys::virErrorNumber, &str)] = names![
    VIR_ERR_OK,
    VIR_ERR_INTERNAL_ERROR,
    VIR_ERR_NO_MEMORY,
    VIR_ERR_NO_SUPPORT,
    VIR_ERR_UNKNOWN_HOST,
    VIR_ERR_NO_CONNECT,
    VIR_ERR_INVALID_CONN,
    VIR_ERR_INVALID_DOMAIN,
    VIR_ERR_INVALID_ARG,
    VIR_ERR_OPERATION_FAILED,
    VIR_ERR_GET_FAILED,
    VIR_ERR_POST_FAILED,
    VIR_ERR_HTTP_ERROR,
    VIR_ERR_SEXPR_SERIAL,
    VIR_ERR_NO_XEN,
    VIR_ERR_XEN_CALL,
    VIR_ERR_OS_TYPE,
    VIR_ERR_NO_KERNEL,
    VIR_ERR_NO_ROOT,
    VIR_ERR_NO_SOURCE,
    VIR_ERR_NO_TARGET,
    VIR_ERR_NO_NAME,
    VIR_ERR_NO_OS,
    VIR_ERR_NO_DEVICE,
    VIR_ERR_NO_XENSTORE,
    VIR_ERR_DRIVER_FULL,
    VIR_ERR_CALL_FAILED,
    VIR_ERR_XML_ERROR,
    VIR_ERR_DOM_EXIST,
    VIR_ERR_OPERATION_DENIED,
    VIR_ERR_OPEN_FAILED,
    VIR_ERR_READ_FAILED,
    VIR_ERR_PARSE_FAILED,
    VIR_ERR_CONF_SYNTAX,
    VIR_ERR_WRITE_FAILED,
    VIR_ERR_XML_DETAIL,
    VIR_ERR_INVALID_NETWORK,
    VIR_ERR_NETWORK_EXIST,
    VIR_ERR_SYSTEM_ERROR,
    VIR_ERR_RPC,
    VIR_ERR_GNUTLS_ERROR,
    VIR_ERR_NO_DOMAIN,
    VIR_ERR_NO_NETWORK,
    VIR_ERR_INVALID_MAC,
    VIR_ERR_AUTH_FAILED,
    VIR_ERR_INVALID_STORAGE_POOL,
    VIR_ERR_INVALID_STORAGE_VOL,
    VIR_ERR_NO_STORAGE_POOL,
    VIR_ERR_NO_STORAGE_VOL,
    VIR_ERR_INVALID_NODE_DEVICE,
    VIR_ERR_NO_NODE_DEVICE,
    VIR_ERR_NO_SECURITY_MODEL,
    VIR_ERR_OPERATION_INVALID,
    VIR_ERR_NO_INTERFACE,
    VIR_ERR_INVALID_INTERFACE,
    VIR_ERR_MULTIPLE_INTERFACES,
    VIR_ERR_INVALID_NWFILTER,
    VIR_ERR_NO_NWFILTER,
    VIR_ERR_BUILD_FIREWALL,
    VIR_ERR_INVALID_SECRET,
    VIR_ERR_NO_SECRET,
    VIR_ERR_CONFIG_UNSUPPORTED,
    VIR_ERR_OPERATION_TIMEOUT,
    VIR_ERR_MIGRATE_PERSIST_FAILED,
    VIR_ERR_HOOK_SCRIPT_FAILED,
    VIR_ERR_INVALID_DOMAIN_SNAPSHOT,
    VIR_ERR_NO_DOMAIN_SNAPSHOT,
    VIR_ERR_INVALID_STREAM,
    VIR_ERR_ARGUMENT_UNSUPPORTED,
    VIR_ERR_STORAGE_PROBE_FAILED,
    VIR_ERR_STORAGE_POOL_BUILT,
    VIR_ERR_SNAPSHOT_REVERT_RISKY,
    VIR_ERR_OPERATION_ABORTED,
    VIR_ERR_AUTH_CANCELLED,
    VIR_ERR_NO_DOMAIN_METADATA,
    VIR_ERR_MIGRATE_UNSAFE,
    VIR_ERR_OVERFLOW,
    VIR_ERR_BLOCK_COPY_ACTIVE,
    VIR_ERR_OPERATION_UNSUPPORTED,
    VIR_ERR_SSH,
    VIR_ERR_AGENT_UNRESPONSIVE,
    VIR_ERR_RESOURCE_BUSY,
    VIR_ERR_ACCESS_DENIED,
    VIR_ERR_DBUS_SERVICE,
    VIR_ERR_STORAGE_VOL_EXIST,
    VIR_ERR_CPU_INCOMPATIBLE,
    VIR_ERR_XML_INVALID_SCHEMA,
    VIR_ERR_MIGRATE_FINISH_OK,
    VIR_ERR_AUTH_UNAVAILABLE,
    VIR_ERR_NO_SERVER,
    VIR_ERR_NO_CLIENT,
    VIR_ERR_AGENT_UNSYNCED,
    VIR_ERR_LIBSSH,
    VIR_ERR_DEVICE_MISSING,
    VIR_ERR_INVALID_NWFILTER_BINDING,
    VIR_ERR_NO_NWFILTER_BINDING,
    VIR_ERR_INVALID_DOMAIN_CHECKPOINT,
    VIR_ERR_NO_DOMAIN_CHECKPOINT,
    VIR_ERR_NO_DOMAIN_BACKUP,
    VIR_ERR_INVALID_NETWORK_PORT,
    VIR_ERR_NETWORK_PORT_EXIST,
    VIR_ERR_NO_NETWORK_PORT,
    VIR_ERR_NO_HOSTNAME,
    VIR_ERR_CHECKPOINT_INCONSISTENT,
    VIR_ERR_MULTIPLE_DOMAINS,
    VIR_ERR_NO_NETWORK_METADATA,
    VIR_ERR_AGENT_COMMAND_TIMEOUT,
    VIR_ERR_AGENT_COMMAND_FAILED,
    VIR_ERR_INVALID_ENCR_KEY_SECRET
];

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorClass;
    use virt::connect::Connect;

    #[test]
    fn error_numbers_are_named_as_libvirt_spells_them() {
        assert_eq!(code_name(sys::VIR_ERR_NO_DOMAIN), "VIR_ERR_NO_DOMAIN");
        assert_eq!(
            code_name(sys::VIR_ERR_NO_STORAGE_VOL),
            "VIR_ERR_NO_STORAGE_VOL"
        );
        assert_eq!(code_name(sys::VIR_ERR_OK), "VIR_ERR_OK");
        assert_eq!(code_name(9999), "VIR_ERR_9999");
    }

    #[test]
    fn a_missing_domain_on_the_test_driver_is_not_found_with_libvirts_code() {
        virt::error::clear_error_callback();
        let conn = Connect::open(Some("test:///default")).expect("libvirt's test driver opens");
        let e = conn
            .lookup_domain_by_name("podvisor-no-such-domain")
            .expect_err("the test driver has no such domain");
        let err = classify("Looking up domain podvisor-no-such-domain", &e);
        assert_eq!(err.class, ErrorClass::NotFound, "{err}");
        assert_eq!(err.code(), Some("VIR_ERR_NO_DOMAIN"));
        assert!(
            err.message
                .starts_with("Looking up domain podvisor-no-such-domain: "),
            "{err}"
        );
        let e = conn
            .define_domain_xml("<domain>not a domain")
            .expect_err("bad XML is refused");
        let err = classify("Defining a domain", &e);
        assert_eq!(err.class, ErrorClass::Permanent, "{err}");
        assert_eq!(err.code(), Some("VIR_ERR_XML_DETAIL"));
    }
}
