//! Keeps netfilter's connection tracking and NAT running in the node's network namespace while lb leaves
//! connections kube-proxy set up to it (`--pass-untracked-tcp`, implied by `--coexist-with-kube-proxy`).
//!
//! Why: the kernel registers conntrack's hooks in a network namespace only while some rule needs them, and NAT's
//! only while a NAT chain exists. kube-proxy's rules are often the only ones: when they are removed (`kube-proxy
//! --cleanup`, or the nftables proxier's table deleted), conntrack stops looking packets up and its entries stop
//! translating, so every connection kube-proxy had DNATed is answered with a reset by the node itself, although
//! its entry is still listed. A table of lb's own with one conntrack-matching rule and an empty NAT chain keeps both
//! registered; it changes no packet (`tests/migration.rs` fails without it). `lb-agent cleanup` removes it, and so
//! does an agent started without the flag.

use std::io::Write;
use std::process::{Command, Stdio};

use anyhow::{Context, bail};

/// The table, in the `inet` family (IPv4 and IPv6).
pub const TABLE: &str = "lb-keep-conntrack";

/// The table's whole definition: recreated each time (`nft -f` applies it as one transaction).
fn ruleset() -> String {
    format!(
        "table inet {TABLE}\n\
         delete table inet {TABLE}\n\
         table inet {TABLE} {{\n\
         \tcomment \"lb: keeps conntrack and NAT running for connections kube-proxy set up (lb-agent --pass-untracked-tcp)\"\n\
         \tchain conntrack {{\n\
         \t\ttype filter hook prerouting priority filter; policy accept;\n\
         \t\tct state invalid counter\n\
         \t}}\n\
         \tchain nat {{\n\
         \t\ttype nat hook postrouting priority srcnat; policy accept;\n\
         \t}}\n\
         }}\n"
    )
}

fn nft(args: &[&str], input: Option<&str>) -> anyhow::Result<std::process::Output> {
    let mut child = Command::new("nft")
        .args(args)
        .stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("running nft (the nftables package)")?;
    if let (Some(text), Some(mut stdin)) = (input, child.stdin.take()) {
        stdin.write_all(text.as_bytes()).context("writing to nft")?;
    }
    child.wait_with_output().context("waiting for nft")
}

/// Installs (or refreshes) the table in this process's network namespace.
pub fn keep() -> anyhow::Result<()> {
    let out = nft(&["-f", "-"], Some(&ruleset()))?;
    if !out.status.success() {
        bail!(
            "nft -f failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Removes the table if it is there; whether it was.
pub fn release() -> anyhow::Result<bool> {
    let listed = nft(&["list", "table", "inet", TABLE], None)?;
    if !listed.status.success() {
        return Ok(false);
    }
    let out = nft(&["delete", "table", "inet", TABLE], None)?;
    if !out.status.success() {
        bail!(
            "nft delete table inet {TABLE} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_ruleset_recreates_one_table_with_a_conntrack_rule_and_a_nat_chain() {
        let r = super::ruleset();
        assert!(
            r.starts_with("table inet lb-keep-conntrack\ndelete table inet lb-keep-conntrack\n")
        );
        assert!(r.contains("ct state invalid counter"), "{r}");
        assert!(r.contains("type nat hook postrouting"), "{r}");
        assert!(
            !r.contains("drop") && !r.contains("dnat") && !r.contains("snat to"),
            "changes no packet: {r}"
        );
    }
}
