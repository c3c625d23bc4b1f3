//! Durations written as Go writes them (`5m`, `1h30m`, `1.5s`, `300ms`), as
//! the reference's flags and ConfigMaps do.

use std::time::Duration;

/// Parses a Go duration string. Negative durations are refused: no podvisor
/// setting means anything by them.
///
/// # Errors
/// A message quoting `text` when it is empty, negative, has a number
/// without a unit, a bad number or an unknown unit, or is too long for a
/// [`Duration`].
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let s = text.trim();
    if s == "0" {
        return Ok(Duration::ZERO);
    }
    if s.is_empty() {
        return Err("an empty duration; write e.g. 30s, 5m or 1h30m".into());
    }
    if s.starts_with('-') {
        return Err(format!("'{text}' is negative"));
    }
    let s = s.strip_prefix('+').unwrap_or(s);
    let mut total = 0f64;
    let mut rest = s;
    while !rest.is_empty() {
        let num_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        if num_len == 0 {
            return Err(format!(
                "'{text}' is not a duration: a number must come before each unit"
            ));
        }
        let number: f64 = rest[..num_len].parse().map_err(|_| {
            format!(
                "'{text}' is not a duration: bad number '{}'",
                &rest[..num_len]
            )
        })?;
        rest = &rest[num_len..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let unit = &rest[..unit_len];
        let seconds = match unit {
            "ns" => 1e-9,
            "us" | "µs" | "μs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            "" => return Err(format!("'{text}' has no unit; use ns, us, ms, s, m or h")),
            other => {
                return Err(format!(
                    "'{text}' has an unknown unit '{other}'; use ns, us, ms, s, m or h"
                ));
            }
        };
        total += number * seconds;
        rest = &rest[unit_len..];
    }
    Duration::try_from_secs_f64(total).map_err(|_| format!("'{text}' is too long"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_durations_parse() {
        let cases = [
            ("0", Duration::ZERO),
            ("5m", Duration::from_secs(300)),
            ("1h30m", Duration::from_secs(5400)),
            ("1.5s", Duration::from_millis(1500)),
            ("300ms", Duration::from_millis(300)),
            ("2h45m10s", Duration::from_secs(2 * 3600 + 45 * 60 + 10)),
            ("10us", Duration::from_micros(10)),
            ("+3s", Duration::from_secs(3)),
        ];
        for (text, want) in cases {
            assert_eq!(parse_duration(text), Ok(want), "{text}");
        }
    }

    #[test]
    fn bad_durations_say_why() {
        for (text, why) in [
            ("", "empty"),
            ("5", "no unit"),
            ("5x", "unknown unit 'x'"),
            ("m", "a number must come before"),
            ("-5s", "negative"),
            ("1..2s", "bad number"),
        ] {
            let err = parse_duration(text).unwrap_err();
            assert!(err.contains(why), "{text}: {err}");
        }
    }
}
