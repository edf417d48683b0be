//! `cargo xtask test`: everything CI runs. Set-up and the eBPF build come first when missing, then formatting,
//! lints, and every test of the workspace, the root-only namespace tests included; among them the ported upstream
//! e2e Service tests on a simulated cluster (`lb-tests`' `e2e` target, what `cargo xtask e2e` runs alone), whose
//! own harness prints a line per case and fails the run on any failure.

use std::process::Command;

use anyhow::bail;

use crate::util::{exec, is_root, workspace_root};
use crate::{build_ebpf, setup};

#[derive(clap::Args)]
pub struct Options {
    /// Skip `cargo fmt --check` and clippy (quicker local iteration).
    #[arg(long)]
    pub no_lint: bool,
    /// Extra arguments passed to `cargo test` after `--` (e.g. a test name filter).
    #[arg(last = true)]
    pub test_args: Vec<String>,
}

pub fn run(opts: &Options) -> anyhow::Result<()> {
    let ci = std::env::var("CI").is_ok_and(|v| v == "true" || v == "1");
    if !is_root() {
        if ci {
            bail!(
                "the integration tests load BPF programs and create namespaces: CI must run them as root"
            );
        }
        eprintln!(
            "test: not root, so the namespace tests will report themselves skipped; run as root for the full suite"
        );
    }
    if is_root() && !setup::is_complete() {
        setup::run()?;
    }
    build_ebpf::run(&build_ebpf::Options { release: true })?;
    let root = workspace_root();
    if !opts.no_lint {
        exec(
            Command::new("cargo")
                .current_dir(&root)
                .args(["fmt", "--all", "--check"]),
        )?;
        exec(Command::new("cargo").current_dir(&root).args([
            "clippy",
            "--workspace",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ]))?;
    }
    exec(
        Command::new("cargo")
            .current_dir(&root)
            .args([
                "test",
                "--workspace",
                "--exclude",
                "lb-ebpf",
                "--no-fail-fast",
                "--",
            ])
            .args(&opts.test_args),
    )
}
