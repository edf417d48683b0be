//! lb-bench: `cargo xtask bench`'s program. `run` measures everything and writes BENCHMARKS.md and
//! bench/results/*.json (see `lb_tests::bench`); the other subcommands are its workers, started inside the
//! benchmark's namespaces (the server in the backend namespace, the load generators in the client namespace).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Result;
use clap::{Parser, Subcommand};
use lb_tests::bench::{self, load};

#[derive(Parser)]
#[command(
    name = "lb-bench",
    about = "lb's benchmarks side by side with kube-proxy (run as root)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the benchmarks and write BENCHMARKS.md and bench/results/.
    Run {
        /// CI-sized: shorter phases, fewer repetitions.
        #[arg(long)]
        quick: bool,
        /// The lb-agent binary to run.
        #[arg(long)]
        agent: PathBuf,
        /// Where BENCHMARKS.md and bench/results/ go (the workspace root).
        #[arg(long)]
        out: PathBuf,
        /// The command line to print in BENCHMARKS.md.
        #[arg(long, default_value = "lb-bench run")]
        command: String,
        /// Only these parts: maglev, control, scale, packet, traffic (repeatable).
        #[arg(long)]
        only: Vec<String>,
        /// Targeted runs: services in the control-plane part instead of the plan's.
        #[arg(long)]
        control_services: Option<usize>,
        /// Targeted runs: service counts of the scale part instead of the plan's (repeatable).
        #[arg(long = "scale-count")]
        scale_counts: Vec<usize>,
        /// Targeted runs: service counts of the per-packet part instead of the plan's (repeatable).
        #[arg(long = "packet-count")]
        packet_counts: Vec<usize>,
        /// Targeted runs: BPF_PROG_TEST_RUN runs per per-packet cell instead of the plan's.
        #[arg(long)]
        packet_runs: Option<usize>,
        /// Compare these eBPF objects (repeatable) on the per-packet rows at the first --packet-count, in
        /// interleaved rounds, instead of the normal run; prints medians with their spread and writes
        /// bench/results/packet-compare.json.
        #[arg(long = "packet-object")]
        packet_objects: Vec<PathBuf>,
        /// Rounds of a --packet-object comparison (each runs --packet-runs per cell and object).
        #[arg(long, default_value_t = 5)]
        packet_rounds: usize,
        /// Targeted runs: service counts of the traffic part instead of the plan's (repeatable).
        #[arg(long = "traffic-count")]
        traffic_counts: Vec<usize>,
        /// Targeted runs: seconds per TCP_CRR phase instead of the plan's.
        #[arg(long)]
        crr_seconds: Option<f64>,
    },
    /// The real agent's peak RSS, RSS after its first sync and time to programmed, for several agent binaries
    /// interleaved run by run (a change against its baseline). Prints a Markdown table; writes nothing.
    Memory {
        /// `label=path` of an lb-agent binary (repeatable; the first is the baseline by convention).
        #[arg(long = "agent", required = true, value_parser = parse_agent)]
        agents: Vec<(String, PathBuf)>,
        /// Services in the workload (repeatable).
        #[arg(long = "services", required = true)]
        services: Vec<usize>,
        #[arg(long, default_value_t = 10)]
        endpoints: usize,
        #[arg(long, default_value_t = 3)]
        runs: usize,
        /// Where the agent reads the objects from (repeatable).
        #[arg(long = "source", value_enum, default_values_t = [bench::memory::Source::Manifest])]
        sources: Vec<bench::memory::Source>,
    },
    /// One EndpointSlice update through the in-process API server to the service entry switched (the control-plane
    /// section's cell), for several agent binaries interleaved run by run, with the agents' own timing of each
    /// part. Prints a Markdown table; writes nothing.
    ApiUpdate {
        /// `label=path` of an lb-agent binary (repeatable; the first is the baseline by convention).
        #[arg(long = "agent", required = true, value_parser = parse_agent)]
        agents: Vec<(String, PathBuf)>,
        #[arg(long, default_value_t = 10_000)]
        services: usize,
        #[arg(long, default_value_t = 10)]
        endpoints: usize,
        /// Updates per run.
        #[arg(long, default_value_t = 50)]
        changes: usize,
        #[arg(long, default_value_t = 3)]
        runs: usize,
    },
    /// Worker: serve TCP_CRR, bulk and UDP on a port until killed.
    Serve {
        #[arg(long)]
        port: u16,
        /// Addresses to answer UDP on, one socket each (repeatable).
        #[arg(long = "udp-addr")]
        udp_addrs: Vec<std::net::Ipv4Addr>,
    },
    /// Worker: TCP_CRR to the targets (round robin); prints one JSON result.
    Crr {
        #[arg(long = "to", required = true)]
        to: Vec<SocketAddr>,
        #[arg(long)]
        duration_ms: u64,
        /// Upper bound on connections, whatever the duration.
        #[arg(long, default_value_t = 2_000_000)]
        max: u64,
    },
    /// Worker: a UDP flood on one connected socket; prints one JSON result.
    Udp {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long)]
        duration_ms: u64,
        #[arg(long, default_value_t = 64)]
        payload: usize,
        #[arg(long, default_value_t = 100_000_000)]
        max: u64,
    },
    /// Worker: one TCP bulk upload; prints one JSON result.
    Bulk {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long)]
        duration_ms: u64,
    },
}

fn main() -> std::process::ExitCode {
    match run(Cli::parse().command) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("lb-bench: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(command: Command) -> Result<()> {
    // Workers never run longer than this, whatever they are asked.
    const CAP: Duration = Duration::from_secs(120);
    let capped = |ms: u64| Duration::from_millis(ms).min(CAP);
    match command {
        Command::Run {
            quick,
            agent,
            out,
            command,
            only,
            control_services,
            scale_counts,
            packet_counts,
            packet_runs,
            packet_objects,
            packet_rounds,
            traffic_counts,
            crr_seconds,
        } => bench::run(&bench::RunOptions {
            quick,
            agent,
            out,
            command,
            only,
            control_services,
            scale_counts,
            packet_counts,
            packet_runs,
            packet_objects,
            packet_rounds,
            traffic_counts,
            crr_seconds,
        }),
        Command::Memory {
            agents,
            services,
            endpoints,
            runs,
            sources,
        } => bench::memory::run(&bench::memory::Options {
            agents,
            services,
            endpoints,
            runs,
            sources,
        })
        .map(drop),
        Command::ApiUpdate {
            agents,
            services,
            endpoints,
            changes,
            runs,
        } => bench::api_update::run(&bench::api_update::Options {
            agents,
            services,
            endpoints,
            changes,
            runs,
        }),
        Command::Serve { port, udp_addrs } => load::serve(port, &udp_addrs),
        Command::Crr {
            to,
            duration_ms,
            max,
        } => print(&load::crr(&to, capped(duration_ms), max)?),
        Command::Udp {
            to,
            duration_ms,
            payload,
            max,
        } => print(&load::udp_flood(to, payload, capped(duration_ms), max)?),
        Command::Bulk { to, duration_ms } => print(&load::tcp_bulk(to, capped(duration_ms))?),
    }
}

fn parse_agent(s: &str) -> Result<(String, PathBuf), String> {
    let (label, path) = s
        .split_once('=')
        .ok_or_else(|| format!("expected label=path, got {s:?}"))?;
    Ok((label.to_owned(), PathBuf::from(path)))
}

fn print<T: serde::Serialize>(v: &T) -> Result<()> {
    println!("{}", serde_json::to_string(v)?);
    Ok(())
}
