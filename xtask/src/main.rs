//! `cargo xtask`: the project's own build steps, which need more than cargo alone (the eBPF toolchain, root, a
//! topology of namespaces). One module per verb, as aya's xtask does.

mod bench;
mod build_ebpf;
mod demo;
mod e2e;
mod image;
mod setup;
mod test;
mod util;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "lb's build, setup, demo and test tasks")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Install what building and running lb needs (Debian packages, bpf-linker, bpffs), skipping what is present.
    Setup,
    /// Build the eBPF object (lb-ebpf) that lb-agent embeds.
    BuildEbpf(build_ebpf::Options),
    /// Run every test: formatting, lints, unit tests, and the root-only integration tests in namespaces.
    Test(test::Options),
    /// Build a demo topology on this host (namespaces only), run the agent on it and show it balancing.
    Demo,
    /// Kubernetes' e2e Service tests, ported, on a simulated 3-node cluster (namespaces, one agent per node).
    E2e(e2e::Options),
    /// Benchmarks side by side with kube-proxy's iptables and nftables datapaths; writes BENCHMARKS.md.
    Bench(bench::Options),
    /// Build deploy/Dockerfile into an image: docker if an engine answers, else podman on debootstrapped base images.
    Image(image::Options),
}

fn main() -> std::process::ExitCode {
    // Print the error chain, not a Debug dump with a backtrace: these are build steps, and the failing command's
    // own output is right above.
    match run(Cli::parse().command) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Setup => setup::run(),
        Command::BuildEbpf(opts) => build_ebpf::run(&opts),
        Command::Test(opts) => test::run(&opts),
        Command::Demo => demo::run(),
        Command::E2e(opts) => e2e::run(&opts),
        Command::Bench(opts) => bench::run(&opts),
        Command::Image(opts) => image::run(&opts),
    }
}
