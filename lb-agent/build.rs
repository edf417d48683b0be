//! Embeds the eBPF object when `cargo xtask build-ebpf` has built it, so the agent binary is self-contained. Without
//! it the agent still builds (plain `cargo build` needs no eBPF toolchain) and asks for `--bpf-object` at run time.

use std::path::PathBuf;

fn main() {
    println!("cargo::rustc-check-cfg=cfg(lb_embedded_ebpf)");
    println!("cargo::rerun-if-env-changed=LB_EBPF_OBJECT");
    let path = match std::env::var_os("LB_EBPF_OBJECT") {
        Some(p) => PathBuf::from(p),
        None => {
            let manifest =
                PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").unwrap_or_default());
            let release = manifest.join("../target/ebpf/bpfel-unknown-none/release/lb-ebpf");
            let debug = manifest.join("../target/ebpf/bpfel-unknown-none/debug/lb-ebpf");
            // Watch both so a later `cargo xtask build-ebpf` triggers a re-embed.
            println!("cargo::rerun-if-changed={}", release.display());
            println!("cargo::rerun-if-changed={}", debug.display());
            if release.exists() { release } else { debug }
        }
    };
    if path.exists() {
        println!("cargo::rustc-cfg=lb_embedded_ebpf");
        println!("cargo::rustc-env=LB_EBPF_OBJECT={}", path.display());
    }
}
