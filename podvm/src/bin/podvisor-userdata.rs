//! `podvisor-userdata`: provisions a pod VM from its user data — finds it
//! (a `cidata` volume, AWS IMDSv2, Azure IMDS, the IBM Cloud VPC metadata
//! service), parses it strictly, and writes only the allow-listed files
//! under `/run/peerpod/` and the initdata digest. Run once at boot, before
//! the kata agent and the forwarder. Logs file names, never contents.

use clap::Parser;
use podvisor_podvm::userdata::{Source, apply, find, parse};
use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// Where to look, in order, each round: cidata[:PATH], file:PATH,
    /// aws[:http://HOST:PORT], azure[:http://HOST:PORT],
    /// ibmcloud[:http://HOST:PORT]
    // The comment is also `--help` text, where brackets mark optional
    // parts, not links. The defaults cover every provider, so one image
    // boots anywhere; ibmcloud is last (why: `Source::IbmCloud`).
    #[allow(rustdoc::broken_intra_doc_links)]
    #[arg(long = "source", value_name = "SOURCE", default_values = ["cidata", "aws", "azure", "ibmcloud"])]
    sources: Vec<Source>,
    /// The root the files are written under (`<root>/run/peerpod/`)
    #[arg(long, value_name = "DIR", default_value = "/")]
    root: PathBuf,
    /// Seconds between two rounds of looking
    #[arg(long = "retry-interval", value_name = "SECONDS", default_value_t = 5)]
    retry_interval: u64,
    /// Seconds to look before giving up
    #[arg(long, value_name = "SECONDS", default_value_t = 180)]
    timeout: u64,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        // Colours only for a terminal: a serial console or a log file
        // gets plain text.
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let args = Args::parse();
    let result = find(
        &args.sources,
        Duration::from_secs(args.retry_interval),
        Duration::from_secs(args.timeout),
    )
    .and_then(|text| parse(&text))
    .and_then(|files| apply(&files, &args.root));
    match result {
        Ok(written) => {
            for path in written {
                tracing::info!(file = %path.display(), "written");
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            tracing::error!(error = %e, "provisioning failed");
            eprintln!("podvisor-userdata: {e}");
            ExitCode::FAILURE
        }
    }
}
