//! `cargo xtask demo`: prepares the machine and the binaries, then runs `lb-demo` (in the lb-tests package, which
//! owns the namespace topology code shared with the tests).

use std::process::Command;

use anyhow::bail;

use crate::util::{exec, is_root, workspace_root};
use crate::{build_ebpf, setup};

pub fn run() -> anyhow::Result<()> {
    if !is_root() {
        bail!("the demo loads BPF programs and creates network namespaces: run it as root");
    }
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
    exec(
        Command::new(root.join("target/release/lb-demo"))
            .arg("--agent")
            .arg(root.join("target/release/lb-agent"))
            .arg("--probe")
            .arg(root.join("target/release/lb-probe"))
            .arg("--manifest")
            .arg(root.join("examples/demo.yaml")),
    )
}
