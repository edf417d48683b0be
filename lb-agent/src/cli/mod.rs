//! The subcommands. Each parses its flags and calls into the library; nothing here is datapath logic.

pub mod cleanup;
pub mod run;
pub mod services;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum OutputFormat {
    Table,
    Json,
}

/// The pin directory flag every subcommand shares.
#[derive(Clone, Debug, clap::Args)]
pub struct PinArgs {
    /// Directory (on bpffs) where lb pins its maps and links.
    #[arg(long, default_value = "/sys/fs/bpf/lb", env = "LB_BPFFS")]
    pub bpffs: PathBuf,
}

pub fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("LB_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colours only on a terminal: journald, kubectl logs and files should get plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

#[derive(Parser)]
#[command(
    name = "lb-agent",
    version,
    about = "lb: an eBPF service load balancer for Kubernetes (kube-proxy replacement)"
)]
struct Cli {
    /// Log format: `text` or `json`.
    #[arg(long, global = true, default_value = "text", env = "LB_LOG_FORMAT")]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the agent: load the datapath, program it from the manifests, and keep it in sync.
    Run(Box<run::RunArgs>),
    /// List the programmed services and their backends, read from the pinned maps.
    Services(services::ServicesArgs),
    /// Remove every program link and map lb pinned (like kube-proxy --cleanup).
    Cleanup(cleanup::CleanupArgs),
}

/// The `lb-agent` command line, as a function so test binaries can embed exactly this agent.
pub fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    let result = match cli.command {
        Command::Run(args) => run::run(*args),
        Command::Services(args) => services::run(&args),
        Command::Cleanup(args) => cleanup::run(&args),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("lb-agent: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
