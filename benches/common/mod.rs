//! What the benchmarks share.

/// The count after the flag `name` on the command line (`--writes 500`),
/// or `default` when the flag is absent.
///
/// # Panics
///
/// When the value after the flag is not a whole number.
pub fn arg(name: &str, default: usize) -> usize {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .map_or(default, |v| v.parse().expect("a count"))
}
