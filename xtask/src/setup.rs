//! `cargo xtask setup`: the verified toolchain recipe (docs/development.md), idempotent. Every step checks first and says what it
//! does, so a second run is quick and silent about work it skips.

use std::path::Path;
use std::process::Command;

use anyhow::{Context, bail};

use crate::util::{exec, install_packages, is_root, missing_packages, succeeds};

/// Debian packages: the eBPF compiler (rustc-web 1.96 on LLVM 22 with core's sources), LLVM 22 for bpf-linker,
/// bpftool, and the network tools the tests, demo and benchmarks use.
pub const PACKAGES: &[&str] = &[
    "rustc-web",
    "rust-web-src",
    "llvm-22-dev",
    "libpolly-22-dev",
    "bpftool",
    "iproute2",
    "iptables",
    "nftables",
    "iputils-ping",
    // The per-packet tests read the agent's /metrics inside a namespace with it.
    "curl",
    "ethtool",
];

/// The rustc that can build `core` for bpfel (rustup's toolchains have no rust-src here).
pub const EBPF_RUSTC: &str = "/usr/bin/rustc";
const LLVM_PREFIX: &str = "/usr/lib/llvm-22";

pub fn run() -> anyhow::Result<()> {
    if !is_root() {
        bail!("cargo xtask setup installs Debian packages and mounts bpffs: run it as root");
    }
    // Exactly the verified recipe (docs/development.md).
    install_packages("setup", PACKAGES)?;
    install_bpf_linker()?;
    mount_bpffs()?;
    eprintln!("setup: done");
    Ok(())
}

/// True when everything setup provides is already there (so `demo` and `test` can skip it).
pub fn is_complete() -> bool {
    missing_packages(PACKAGES).is_empty() && bpf_linker_ok() && bpffs_mounted()
}

fn bpf_linker_ok() -> bool {
    succeeds(Command::new("bpf-linker").arg("--version"))
}

fn install_bpf_linker() -> anyhow::Result<()> {
    if bpf_linker_ok() {
        eprintln!("setup: bpf-linker present");
        return Ok(());
    }
    eprintln!("setup: installing bpf-linker against LLVM 22 (LLVM_PREFIX={LLVM_PREFIX})");
    // bpf-linker's build reads LLVM_PREFIX; without it it takes the first llvm-config on PATH (LLVM 14 here).
    exec(
        Command::new("cargo")
            .args([
                "install",
                "bpf-linker",
                "--no-default-features",
                "--features",
                "llvm-22",
            ])
            .env("LLVM_PREFIX", LLVM_PREFIX),
    )
}

pub fn bpffs_mounted() -> bool {
    mount_type("/sys/fs/bpf").as_deref() == Some("bpf")
}

fn mount_type(path: &str) -> Option<String> {
    let mounts = std::fs::read_to_string("/proc/mounts").ok()?;
    mounts.lines().rev().find_map(|l| {
        let mut f = l.split_whitespace();
        let (_dev, dir, ty) = (f.next()?, f.next()?, f.next()?);
        (dir == path).then(|| ty.to_string())
    })
}

fn mount_bpffs() -> anyhow::Result<()> {
    if bpffs_mounted() {
        eprintln!("setup: bpffs mounted at /sys/fs/bpf");
        return Ok(());
    }
    eprintln!("setup: mounting bpffs at /sys/fs/bpf");
    std::fs::create_dir_all(Path::new("/sys/fs/bpf")).context("creating /sys/fs/bpf")?;
    exec(Command::new("mount").args(["-t", "bpf", "bpf", "/sys/fs/bpf"]))
}
