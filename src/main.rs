//! `podvisor [global flags] <provider> [provider flags]`.

use podvisor::cli::{CliError, Invocation, parse};
use std::process::ExitCode;

fn main() -> ExitCode {
    match parse(std::env::args_os()) {
        Ok(Invocation::Version) => {
            println!("podvisor {}", env!("CARGO_PKG_VERSION"));
            ExitCode::SUCCESS
        }
        Ok(Invocation::Client {
            name,
            matches,
            endpoints,
        }) => podvisor::client::run(&name, &matches, &endpoints),
        Ok(Invocation::Journal { action, state_dir }) => {
            podvisor::daemon::journal_command(action, &state_dir)
        }
        Ok(Invocation::Run {
            global,
            manager,
            provider,
        }) => podvisor::daemon::run(*global, manager, provider),
        // clap prints help, version and its own errors with the right exit code.
        Err(CliError::Clap(e)) => e.exit(),
        Err(e @ CliError::Config(_)) => {
            eprintln!("{e}");
            ExitCode::from(2)
        }
    }
}
