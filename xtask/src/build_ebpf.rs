//! `cargo xtask build-ebpf`: the nested cargo build of lb-ebpf with Debian's rustc (the only one here that can
//! build `core` for bpfel), into its own target directory so the two compilers never share fingerprints.

use std::path::PathBuf;
use std::process::Command;

use anyhow::{Context, bail};

use crate::setup::EBPF_RUSTC;
use crate::util::{exec, workspace_root};

#[derive(clap::Args, Default)]
pub struct Options {
    /// Accepted for older scripts; the object is always built with the release profile. A debug build is of no
    /// use here: core's debug assertions push `lb_xdp` over the 512-byte BPF stack, and its unoptimised panic
    /// paths are static functions libbpf and aya cannot load.
    #[arg(long, hide = true)]
    pub release: bool,
}

/// Where the object lands; lb-agent's build script looks here to embed it.
pub fn object_path() -> PathBuf {
    workspace_root().join("target/ebpf/bpfel-unknown-none/release/lb-ebpf")
}

/// The prefix the workspace's own paths get inside the object. The object carries source paths (DWARF and BTF line
/// info); mapped to one fixed prefix, the same tree gives the same object wherever it is checked out (a worktree
/// here, `/src` in the image build), so `lb-agent --version` can name it by its hash and an image can be compared
/// with a binary built beside it. Cargo's registry is under the same `$HOME/.cargo` (root's) in both.
const REMAPPED_ROOT: &str = "/lb";

/// A `--config` value adding `--remap-path-prefix` to the target's rustflags (cargo joins it with
/// lb-ebpf/.cargo/config.toml's list rather than replacing it, which `RUSTFLAGS` would do).
fn remap_flags(root: &std::path::Path) -> String {
    format!(
        "target.bpfel-unknown-none.rustflags=[\"--remap-path-prefix={}={REMAPPED_ROOT}\"]",
        root.display()
    )
}

pub fn run(opts: &Options) -> anyhow::Result<()> {
    if !std::path::Path::new(EBPF_RUSTC).exists() {
        bail!("{EBPF_RUSTC} is missing: run `cargo xtask setup` first");
    }
    let root = workspace_root();
    let mut cmd = Command::new("cargo");
    cmd.current_dir(root.join("lb-ebpf"))
        .args(["--config", &remap_flags(&root)])
        .args([
            "build",
            "-Z",
            "build-std=core",
            "--target",
            "bpfel-unknown-none",
        ])
        .arg("--target-dir")
        .arg(root.join("target/ebpf"))
        .env("RUSTC", EBPF_RUSTC)
        .env("RUSTC_BOOTSTRAP", "1")
        // An inherited (even empty) encoded flags variable overrides .cargo/config.toml and drops `--btf`.
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env_remove("RUSTFLAGS")
        .env_remove("RUSTC_WRAPPER")
        .env_remove("RUSTC_WORKSPACE_WRAPPER");
    let _ = opts.release;
    cmd.arg("--release");
    exec(&mut cmd)?;
    let obj = object_path();
    let meta =
        std::fs::metadata(&obj).with_context(|| format!("expected object at {}", obj.display()))?;
    eprintln!("build-ebpf: {} ({} bytes)", obj.display(), meta.len());
    Ok(())
}
