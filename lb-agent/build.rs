//! Embeds the eBPF object when `cargo xtask build-ebpf` has built it, so the agent binary is self-contained. Without
//! it the agent still builds (plain `cargo build` needs no eBPF toolchain) and asks for `--bpf-object` at run time.
//!
//! Also writes what `lb-agent --version` prints: the commit the tree was built from and the SHA-256 of the embedded
//! object, so an image and a binary built from the same tree can be told apart from different ones at a glance.

use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    println!("cargo::rustc-check-cfg=cfg(lb_embedded_ebpf)");
    println!("cargo::rerun-if-env-changed=LB_EBPF_OBJECT");
    println!("cargo::rerun-if-env-changed=LB_COMMIT");
    let manifest = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").unwrap_or_default());
    let path = match std::env::var_os("LB_EBPF_OBJECT") {
        Some(p) => PathBuf::from(p),
        None => {
            let release = manifest.join("../target/ebpf/bpfel-unknown-none/release/lb-ebpf");
            let debug = manifest.join("../target/ebpf/bpfel-unknown-none/debug/lb-ebpf");
            // Watch both so a later `cargo xtask build-ebpf` triggers a re-embed.
            println!("cargo::rerun-if-changed={}", release.display());
            println!("cargo::rerun-if-changed={}", debug.display());
            if release.exists() { release } else { debug }
        }
    };
    let object = if path.exists() {
        println!("cargo::rustc-cfg=lb_embedded_ebpf");
        println!("cargo::rustc-env=LB_EBPF_OBJECT={}", path.display());
        match std::fs::read(&path) {
            Ok(bytes) => format!("sha256:{}", hex(&sha2::Sha256::digest(&bytes))),
            Err(e) => format!("unreadable ({e})"),
        }
    } else {
        "none embedded (give --bpf-object at run time)".to_owned()
    };
    let commit = commit(&manifest);
    let version = std::env::var("CARGO_PKG_VERSION").unwrap_or_default();
    let short = commit.get(..12).unwrap_or(&commit);
    let out = PathBuf::from(std::env::var_os("OUT_DIR").unwrap_or_default());
    let write = |name: &str, text: String| {
        if let Err(e) = std::fs::write(out.join(name), text) {
            println!("cargo::warning=cannot write {name}: {e}");
        }
    };
    write("version.txt", format!("{version} ({short})"));
    write(
        "long_version.txt",
        format!(
            "{version}\ncommit: {commit}\nebpf-object: {object}\n\
             licence: Apache-2.0 (lb-agent); MIT OR GPL-2.0 (the embedded eBPF object)"
        ),
    );
}

use sha2::Digest as _;

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// `LB_COMMIT` when the build is given it (the image build has no `.git`: `cargo xtask image` passes it), else what
/// git says about the tree, `-dirty` when tracked files differ from the commit at the time this script runs.
fn commit(manifest: &Path) -> String {
    if let Ok(c) = std::env::var("LB_COMMIT")
        && !c.trim().is_empty()
    {
        return c.trim().to_owned();
    }
    let git = |args: &[&str]| -> Option<String> {
        let out = Command::new("git")
            .current_dir(manifest)
            .args(args)
            .output()
            .ok()?;
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
    };
    let Some(head) = git(&["rev-parse", "HEAD"]) else {
        return "unknown (no git metadata and no LB_COMMIT)".to_owned();
    };
    // Re-run when HEAD moves or the index changes (a commit, a checkout, `git add`).
    for file in ["HEAD", "index"] {
        if let Some(p) = git(&["rev-parse", "--git-path", file]) {
            println!("cargo::rerun-if-changed={}", manifest.join(p).display());
        }
    }
    if let Some(r) = git(&["symbolic-ref", "-q", "HEAD"])
        && let Some(p) = git(&["rev-parse", "--git-path", &r])
    {
        println!("cargo::rerun-if-changed={}", manifest.join(p).display());
    }
    let dirty =
        git(&["status", "--porcelain", "--untracked-files=no"]).is_some_and(|s| !s.is_empty());
    if dirty { format!("{head}-dirty") } else { head }
}
