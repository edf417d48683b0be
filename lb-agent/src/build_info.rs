//! What this binary is: its version, the commit it was built from, and the SHA-256 of the eBPF object it embeds
//! (written by build.rs). `lb-agent --version` prints them; an image and a binary built from the same tree print
//! the same lines (the object's source paths are remapped, so the object does not depend on where the tree is).

/// `0.1.0 (<commit, 12 characters>)`: `lb-agent -V`.
pub const VERSION: &str = include_str!(concat!(env!("OUT_DIR"), "/version.txt"));
/// Version, `commit: <hash>[-dirty]`, `ebpf-object: sha256:<hash>`, `licence: ...`: `lb-agent --version`.
pub const LONG_VERSION: &str = include_str!(concat!(env!("OUT_DIR"), "/long_version.txt"));

/// The `commit:` line's value.
pub fn commit() -> &'static str {
    field("commit: ")
}

/// The `ebpf-object:` line's value (`sha256:<hex>`, or why there is none).
pub fn ebpf_object() -> &'static str {
    field("ebpf-object: ")
}

fn field(prefix: &str) -> &'static str {
    LONG_VERSION
        .lines()
        .find_map(|l| l.strip_prefix(prefix))
        .unwrap_or("unknown")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_long_version_names_the_commit_and_the_object() {
        assert!(LONG_VERSION.starts_with(env!("CARGO_PKG_VERSION")));
        assert!(
            !commit().is_empty() && commit() != "unknown",
            "{LONG_VERSION}"
        );
        let object = ebpf_object();
        match object.strip_prefix("sha256:") {
            Some(hex) => assert!(
                hex.len() == 64 && hex.chars().all(|c| c.is_ascii_hexdigit()),
                "{object}"
            ),
            None => assert!(object.starts_with("none embedded"), "{object}"),
        }
        assert_eq!(
            field("licence: "),
            "Apache-2.0 (lb-agent); MIT OR GPL-2.0 (the embedded eBPF object)",
            "the licence line must match Cargo.toml's (lb-agent, lb-ebpf)"
        );
    }
}
