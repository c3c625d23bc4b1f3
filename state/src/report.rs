//! An error and its causes on one line, for a message that is only
//! reported (a log line, a record's `last_error`, an API status).
//!
//! Errors here show their own context only and keep their cause as
//! [`source`](std::error::Error::source); whoever turns one into words joins
//! the two with [`report`].

/// `error` and its causes, `error: cause: cause`. A cause whose message the
/// line already holds is left out, so an error that quotes its source is
/// not said twice.
pub fn report(error: &(dyn std::error::Error + 'static)) -> String {
    let mut line = error.to_string();
    let mut cause = error.source();
    while let Some(e) = cause {
        let text = e.to_string();
        if !line.contains(&text) {
            line.push_str(": ");
            line.push_str(&text);
        }
        cause = e.source();
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("Journal write failed")]
    struct Outer(#[source] std::io::Error);

    #[derive(Debug, thiserror::Error)]
    #[error("Cannot open it: {0}")]
    struct Quoting(#[source] std::io::Error);

    #[test]
    fn each_cause_is_said_once() {
        let full = || std::io::Error::from_raw_os_error(28);
        let line = report(&Outer(full()));
        assert!(line.starts_with("Journal write failed: "), "{line}");
        assert_eq!(line.matches("No space left").count(), 1, "{line}");
        let line = report(&Quoting(full()));
        assert_eq!(line.matches("No space left").count(), 1, "{line}");
    }
}
