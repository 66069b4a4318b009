//! `vnetd`: the site gateway router. See netreconf/README.md.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use netreconf::config::Config;
use netreconf::daemon::{self, Options};

#[derive(Parser, Debug)]
#[command(name = "vnetd", version, about = "ViNe-style virtual-network router that follows migrating VMs")]
struct Cli {
    /// Configuration file (TOML; see examples/site-a.toml).
    #[arg(long, value_name = "FILE", required_unless_present_any = ["status", "check"])]
    config: Option<PathBuf>,
    /// Write every frame captured and injected to this pcap file (`tcpdump -r` reads it).
    #[arg(long, value_name = "FILE")]
    pcap_out: Option<PathBuf>,
    /// Print the JSON status (tables, counters, migrations) of the vnetd listening on SOCKET.
    #[arg(long, value_name = "SOCKET")]
    status: Option<PathBuf>,
    /// Validate the configuration file and exit.
    #[arg(long, value_name = "FILE")]
    check: Option<PathBuf>,
    /// Start even if the kernel forwards IPv4 (it would route the same packets).
    #[arg(long)]
    allow_kernel_forwarding: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(sock) = cli.status {
        return match daemon::query_status(&sock) {
            Ok(v) => {
                use std::io::Write;
                // A closed pipe (`| head`) is not an error worth a panic.
                let _ = writeln!(std::io::stdout(), "{}", serde_json::to_string_pretty(&v).unwrap_or_default());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("vnetd: cannot query {}: {e}", sock.display());
                ExitCode::FAILURE
            }
        };
    }
    if let Some(path) = cli.check {
        return match Config::load(&path) {
            Ok(c) => {
                println!(
                    "{}: OK (site {}, {} peers, {} GNDT routes)",
                    path.display(),
                    c.site,
                    c.peers.len(),
                    c.gndt.len()
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("vnetd: {e}");
                ExitCode::FAILURE
            }
        };
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("VNETD_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let Some(path) = cli.config else {
        eprintln!("vnetd: --config FILE is required");
        return ExitCode::FAILURE;
    };
    let config = match Config::load(&path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("vnetd: {e}");
            return ExitCode::FAILURE;
        }
    };
    match daemon::run(Options { config, pcap_out: cli.pcap_out, allow_kernel_forwarding: cli.allow_kernel_forwarding })
    {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vnetd: {e}");
            ExitCode::FAILURE
        }
    }
}
