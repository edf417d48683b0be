//! `cargo xtask e2e`: Kubernetes' e2e Service tests, ported, on a simulated three-node cluster with one real agent per
//! node (`tests/tests/e2e/`, harness in `tests/src/cluster/`). xtask only prepares the machine and the eBPF object;
//! `cargo xtask test` runs the same target with the rest of the workspace's tests.

use std::process::Command;

use anyhow::bail;

use crate::util::{exec, is_root, workspace_root};
use crate::{build_ebpf, setup};

#[derive(clap::Args)]
pub struct Options {
    /// Case name filters (substrings, e.g. `affinity` or `services/nodeport`) and `--list`, after `--`.
    #[arg(last = true)]
    pub args: Vec<String>,
}

pub fn run(opts: &Options) -> anyhow::Result<()> {
    let listing = opts.args.iter().any(|a| a == "--list");
    if !is_root() && !listing {
        bail!(
            "the e2e cluster is made of network namespaces, cgroups and loaded BPF programs: run as root"
        );
    }
    if is_root() && !setup::is_complete() {
        setup::run()?;
    }
    build_ebpf::run(&build_ebpf::Options { release: true })?;
    exec(
        Command::new("cargo")
            .current_dir(workspace_root())
            .args(["test", "-p", "lb-tests", "--test", "e2e", "--"])
            .args(&opts.args),
    )
}
