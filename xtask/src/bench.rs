//! `cargo xtask bench`: prepares the machine and the binaries, then runs `lb-bench` (in the lb-tests package, which
//! owns the namespace harness). xtask only orchestrates; what is measured and how lives in `tests/src/bench/`.

use std::process::Command;

use anyhow::bail;

use crate::util::{exec, is_root, workspace_root};
use crate::{build_ebpf, setup};

#[derive(clap::Args)]
pub struct Options {
    /// A CI-sized run (under 5 minutes): fewer repetitions and shorter traffic phases, same scenarios.
    #[arg(long)]
    pub quick: bool,
    /// Extra arguments for `lb-bench run` (see `lb-bench run --help`), e.g. `--only maglev`.
    #[arg(last = true)]
    pub bench_args: Vec<String>,
}

pub fn run(opts: &Options) -> anyhow::Result<()> {
    if !is_root() {
        bail!(
            "the benchmarks load BPF programs, create network namespaces and load iptables/nftables rules inside \
             them: run as root"
        );
    }
    // iptables and nftables come with setup's package list; the benchmark compares against them.
    if !setup::is_complete() {
        setup::run()?;
    }
    build_ebpf::run(&build_ebpf::Options { release: true })?;
    let root = workspace_root();
    exec(Command::new("cargo").current_dir(&root).args([
        "build",
        "--release",
        "-p",
        "lb-agent",
        "-p",
        "lb-tests",
        "--bins",
    ]))?;
    let mut cmd = Command::new(root.join("target/release/lb-bench"));
    cmd.arg("run")
        .arg("--agent")
        .arg(root.join("target/release/lb-agent"))
        .arg("--out")
        .arg(&root)
        .arg("--command")
        .arg(if opts.quick {
            "cargo xtask bench --quick"
        } else {
            "cargo xtask bench"
        });
    if opts.quick {
        cmd.arg("--quick");
    }
    exec(cmd.args(&opts.bench_args))
}
