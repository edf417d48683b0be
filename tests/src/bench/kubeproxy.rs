//! The rule sets kube-proxy would write for a service set, in its iptables and nftables modes, and the timing of
//! loading them. Loaded only inside a network namespace the benchmark created (iptables and nftables state is per
//! network namespace), never in the root namespace.
//!
//! Shapes follow kube-proxy's `pkg/proxy/iptables/proxier.go` and `pkg/proxy/nftables/proxier.go`
//! (`syncProxyRules`) for ClusterIP and NodePort services with Cluster traffic policy, no affinity:
//! - iptables (nat table): `KUBE-SERVICES` has one rule per service port jumping to `KUBE-SVC-<hash>`; that chain
//!   marks off-cluster sources with `KUBE-MARK-MASQ`, then picks an endpoint with `-m statistic --mode random
//!   --probability 1/(n-i)` (the last one unconditionally) and jumps to `KUBE-SEP-<hash>`, which marks hairpin
//!   traffic and DNATs. NodePorts go through `KUBE-NODEPORTS`, reached from the last rule of `KUBE-SERVICES`
//!   (`--dst-type LOCAL`). `KUBE-POSTROUTING` masquerades marked packets. (Releases before 1.28 put the masquerade
//!   rule in `KUBE-SERVICES` as a second rule per service; the current shape is the
//!   kinder one for iptables: half the linear list.)
//! - nftables (table `ip kube-proxy`): a `service-ips` verdict map keyed by `daddr . l4proto . dport`, one
//!   `service-*` chain per service port doing the masquerade mark and `numgen random mod n vmap { i : goto
//!   endpoint-* }`, one `endpoint-*` chain per endpoint doing the DNAT.
//!
//! Chain names use kube-proxy's layout (`KUBE-SVC-` + 16 base32 characters); the hash here is FNV-1a rather than
//! SHA-256, which changes nothing the kernel sees but the letters.

use std::fmt::Write as _;
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use super::workload::{CLUSTER_CIDR, Svc, TARGET_PORT};

/// kube-proxy's masquerade mark bit (`--iptables-masquerade-bit` 14).
const MASQ_MARK: &str = "0x4000";

fn hash16(parts: &[&str]) -> String {
    const ALPHABET: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut out = String::with_capacity(16);
    for round in 0..2u8 {
        for p in parts {
            for &b in p.as_bytes().iter().chain(&[0, round]) {
                h = (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3);
            }
        }
        let mut x = h;
        for _ in 0..8 {
            out.push(ALPHABET[(x & 31) as usize] as char);
            x >>= 5;
        }
    }
    out
}

fn svc_chain(s: &Svc) -> String {
    format!("KUBE-SVC-{}", hash16(&[&s.port_name(), s.proto.lower()]))
}

fn sep_chain(s: &Svc, ep: Ipv4Addr) -> String {
    format!(
        "KUBE-SEP-{}",
        hash16(&[
            &s.port_name(),
            s.proto.lower(),
            &format!("{ep}:{TARGET_PORT}")
        ])
    )
}

/// The chains kube-proxy hooks into the built-in ones once, with `iptables -I` (not part of each restore).
pub fn iptables_base() -> String {
    "*nat\n:KUBE-SERVICES - [0:0]\n:KUBE-POSTROUTING - [0:0]\n:KUBE-MARK-MASQ - [0:0]\n:KUBE-NODEPORTS - [0:0]\n\
     -A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
     -A OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
     -A POSTROUTING -m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING\nCOMMIT\n"
        .to_owned()
}

/// The full `iptables-restore --noflush` input of one kube-proxy sync: every kube chain declared (which flushes
/// it) and refilled; `deleted` chains are removed.
pub fn iptables_restore(svcs: &[Svc], deleted: &[String]) -> String {
    let rules: usize = svcs.iter().map(|s| 3 + 3 * s.endpoints.len()).sum();
    let mut out = String::with_capacity(rules * 160);
    out.push_str("*nat\n:KUBE-SERVICES - [0:0]\n:KUBE-POSTROUTING - [0:0]\n:KUBE-MARK-MASQ - [0:0]\n:KUBE-NODEPORTS - [0:0]\n");
    // A chain to delete is declared too: that flushes it, and -X only removes an empty chain (kube-proxy does
    // the same).
    for chain in deleted {
        let _ = writeln!(out, ":{chain} - [0:0]");
    }
    for s in svcs {
        let _ = writeln!(out, ":{} - [0:0]", svc_chain(s));
        if s.node_port.is_some() {
            let _ = writeln!(out, ":KUBE-EXT-{} - [0:0]", &svc_chain(s)[9..]);
        }
        for &ep in &s.endpoints {
            let _ = writeln!(out, ":{} - [0:0]", sep_chain(s, ep));
        }
    }
    let _ = writeln!(
        out,
        "-A KUBE-POSTROUTING -m mark ! --mark {MASQ_MARK}/{MASQ_MARK} -j RETURN\n\
         -A KUBE-POSTROUTING -j MARK --xor-mark {MASQ_MARK}\n\
         -A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE --random-fully\n\
         -A KUBE-MARK-MASQ -j MARK --or-mark {MASQ_MARK}"
    );
    for s in svcs {
        let (name, svc, p) = (s.port_name(), svc_chain(s), s.proto.lower());
        let _ = writeln!(
            out,
            "-A KUBE-SERVICES -m comment --comment \"{name} cluster IP\" -m {p} -p {p} -d {vip}/32 --dport {port} -j {svc}",
            vip = s.vip,
            port = s.port
        );
        if let Some(np) = s.node_port {
            let _ = writeln!(
                out,
                "-A KUBE-NODEPORTS -m comment --comment {name} -m {p} -p {p} --dport {np} -j KUBE-EXT-{}",
                &svc[9..]
            );
        }
        let _ = writeln!(
            out,
            "-A {svc} -m comment --comment \"{name} cluster IP\" -m {p} -p {p} -d {vip}/32 --dport {port} ! -s {CLUSTER_CIDR} -j KUBE-MARK-MASQ",
            vip = s.vip,
            port = s.port
        );
        let n = s.endpoints.len();
        for (i, &ep) in s.endpoints.iter().enumerate() {
            let sep = sep_chain(s, ep);
            if i + 1 < n {
                let _ = writeln!(
                    out,
                    "-A {svc} -m comment --comment \"{name} -> {ep}:{TARGET_PORT}\" -m statistic --mode random --probability {:.10} -j {sep}",
                    1.0 / (n - i) as f64
                );
            } else {
                let _ = writeln!(
                    out,
                    "-A {svc} -m comment --comment \"{name} -> {ep}:{TARGET_PORT}\" -j {sep}"
                );
            }
        }
        for &ep in &s.endpoints {
            let sep = sep_chain(s, ep);
            let _ = writeln!(
                out,
                "-A {sep} -m comment --comment {name} -s {ep}/32 -j KUBE-MARK-MASQ\n\
                 -A {sep} -m comment --comment {name} -m {p} -p {p} -j DNAT --to-destination {ep}:{TARGET_PORT}"
            );
        }
    }
    // NodePort chains: KUBE-EXT-<hash> marks for masquerade and goes to the service chain (Cluster policy).
    for s in svcs.iter().filter(|s| s.node_port.is_some()) {
        let svc = svc_chain(s);
        let _ = writeln!(
            out,
            "-A KUBE-EXT-{h} -m comment --comment \"masquerade traffic for {name} external destinations\" -j KUBE-MARK-MASQ\n-A KUBE-EXT-{h} -j {svc}",
            h = &svc[9..],
            name = s.port_name()
        );
    }
    out.push_str("-A KUBE-SERVICES -m comment --comment \"kubernetes service nodeports; NOTE: this must be the last rule in this chain\" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS\n");
    for chain in deleted {
        let _ = writeln!(out, "-X {chain}");
    }
    out.push_str("COMMIT\n");
    out
}

/// The chains of `svc`'s endpoints that `after` no longer has (what a sync deletes).
pub fn removed_sep_chains(before: &Svc, after: &Svc) -> Vec<String> {
    before
        .endpoints
        .iter()
        .filter(|ep| !after.endpoints.contains(ep))
        .map(|&ep| sep_chain(before, ep))
        .collect()
}

fn nft_svc_chain(s: &Svc) -> String {
    format!(
        "service-{}-{}/{}/{}",
        &hash16(&[&s.port_name(), s.proto.lower()])[..8],
        super::workload::NAMESPACE,
        s.name,
        s.proto.lower()
    )
}

fn nft_ep_chain(s: &Svc, ep: Ipv4Addr) -> String {
    format!(
        "endpoint-{}-{}/{}/{}__{ep}/{TARGET_PORT}",
        &hash16(&[&s.port_name(), s.proto.lower(), &ep.to_string()])[..8],
        super::workload::NAMESPACE,
        s.name,
        s.proto.lower()
    )
}

/// The whole `table ip kube-proxy` of one nftables-mode sync (`nft -f`). Chain priorities are numeric (`dstnat` =
/// -100, `srcnat` = 100): nft 1.0.6 refuses the names for the output hook.
pub fn nft_ruleset(svcs: &[Svc]) -> String {
    let mut out = String::with_capacity(svcs.len() * 1800);
    let _ = writeln!(
        out,
        "add table ip kube-proxy {{ comment \"rules for kube-proxy\" ; }}\n\
         flush table ip kube-proxy\n\
         add chain ip kube-proxy mark-for-masquerade\n\
         add rule ip kube-proxy mark-for-masquerade mark set mark or {MASQ_MARK}\n\
         add chain ip kube-proxy masquerading {{ type nat hook postrouting priority 100 ; }}\n\
         add rule ip kube-proxy masquerading mark and {MASQ_MARK} == 0 return\n\
         add rule ip kube-proxy masquerading mark set mark xor {MASQ_MARK}\n\
         add rule ip kube-proxy masquerading masquerade fully-random\n\
         add map ip kube-proxy service-ips {{ type ipv4_addr . inet_proto . inet_service : verdict ; comment \"ClusterIP, ExternalIP and LoadBalancer IP traffic\" ; }}\n\
         add map ip kube-proxy service-nodeports {{ type inet_proto . inet_service : verdict ; comment \"NodePort traffic\" ; }}\n\
         add chain ip kube-proxy services\n\
         add rule ip kube-proxy services ip daddr . meta l4proto . th dport vmap @service-ips\n\
         add rule ip kube-proxy services fib daddr type local ip daddr != 127.0.0.0/8 meta l4proto . th dport vmap @service-nodeports\n\
         add chain ip kube-proxy nat-prerouting {{ type nat hook prerouting priority -100 ; }}\n\
         add rule ip kube-proxy nat-prerouting jump services\n\
         add chain ip kube-proxy nat-output {{ type nat hook output priority -100 ; }}\n\
         add rule ip kube-proxy nat-output jump services"
    );
    for s in svcs {
        nft_service(&mut out, s);
        let p = s.proto.lower();
        let _ = writeln!(
            out,
            "add element ip kube-proxy service-ips {{ {vip} . {p} . {port} : goto {chain} }}",
            vip = s.vip,
            port = s.port,
            chain = nft_svc_chain(s)
        );
        if let Some(np) = s.node_port {
            let _ = writeln!(
                out,
                "add element ip kube-proxy service-nodeports {{ {p} . {np} : goto {chain} }}",
                chain = nft_svc_chain(s)
            );
        }
    }
    out
}

/// One service's chain and its endpoints' chains.
fn nft_service(out: &mut String, s: &Svc) {
    for &ep in &s.endpoints {
        nft_endpoint(out, s, ep);
    }
    let chain = nft_svc_chain(s);
    let _ = writeln!(out, "add chain ip kube-proxy {chain}");
    nft_service_rules(out, s);
}

fn nft_endpoint(out: &mut String, s: &Svc, ep: Ipv4Addr) {
    let chain = nft_ep_chain(s, ep);
    let _ = writeln!(
        out,
        "add chain ip kube-proxy {chain}\n\
         add rule ip kube-proxy {chain} ip saddr {ep} jump mark-for-masquerade\n\
         add rule ip kube-proxy {chain} meta l4proto {p} dnat to {ep}:{TARGET_PORT}",
        p = s.proto.lower()
    );
}

fn nft_service_rules(out: &mut String, s: &Svc) {
    let chain = nft_svc_chain(s);
    let p = s.proto.lower();
    let _ = writeln!(
        out,
        "add rule ip kube-proxy {chain} ip daddr {vip} {p} dport {port} ip saddr != {CLUSTER_CIDR} jump mark-for-masquerade",
        vip = s.vip,
        port = s.port
    );
    let _ = write!(
        out,
        "add rule ip kube-proxy {chain} numgen random mod {} vmap {{ ",
        s.endpoints.len()
    );
    for (i, &ep) in s.endpoints.iter().enumerate() {
        let sep = if i == 0 { "" } else { ", " };
        let _ = write!(out, "{sep}{i} : goto {}", nft_ep_chain(s, ep));
    }
    out.push_str(" }\n");
}

/// The partial transaction the nftables proxier writes when one service's endpoints change: new endpoint chains,
/// the service chain flushed and refilled, vanished endpoint chains deleted.
pub fn nft_endpoint_change(before: &Svc, after: &Svc) -> String {
    let mut out = String::new();
    for &ep in after
        .endpoints
        .iter()
        .filter(|ep| !before.endpoints.contains(ep))
    {
        nft_endpoint(&mut out, after, ep);
    }
    let _ = writeln!(out, "flush chain ip kube-proxy {}", nft_svc_chain(after));
    nft_service_rules(&mut out, after);
    for &ep in before
        .endpoints
        .iter()
        .filter(|ep| !after.endpoints.contains(ep))
    {
        let _ = writeln!(
            out,
            "delete chain ip kube-proxy {}",
            nft_ep_chain(before, ep)
        );
    }
    out
}

/// Runs `program args` inside network namespace `ns` (`ip netns exec`: iptables and nft need only the network
/// namespace) with `input` on stdin; returns the wall time. Bounded by `timeout`.
pub fn timed_load(
    ns: &str,
    program: &str,
    args: &[&str],
    input: &str,
    timeout: Duration,
) -> Result<Duration> {
    use std::io::Write;
    use std::process::{Command, Stdio};
    let mut child = Command::new("ip")
        .args(["netns", "exec", ns, program])
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {program} in {ns}"))?;
    let started = Instant::now();
    {
        let mut stdin = child.stdin.take().context("no stdin")?;
        stdin
            .write_all(input.as_bytes())
            .with_context(|| format!("feeding {program}"))?;
    }
    loop {
        if let Some(status) = child.try_wait()? {
            let elapsed = started.elapsed();
            if !status.success() {
                let mut err = String::new();
                if let Some(mut e) = child.stderr.take() {
                    use std::io::Read;
                    let _ = e.read_to_string(&mut err);
                }
                bail!("{program} failed in {ns} ({status}): {}", err.trim());
            }
            return Ok(elapsed);
        }
        if started.elapsed() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            bail!("{program} did not finish within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

#[cfg(test)]
mod tests {
    use super::super::workload::services;
    use super::*;

    #[test]
    fn iptables_rules_pick_each_endpoint_with_kube_proxy_probabilities() {
        let s = &services(1, 4, false)[0];
        let rules = iptables_restore(std::slice::from_ref(s), &[]);
        for p in ["0.2500000000", "0.3333333333", "0.5000000000"] {
            assert!(rules.contains(&format!("--probability {p}")), "{rules}");
        }
        assert_eq!(rules.matches("-j DNAT --to-destination").count(), 4);
        assert!(
            svc_chain(s).len() <= 28,
            "iptables chain names hold 28 characters"
        );
    }

    #[test]
    fn nft_change_replaces_only_the_changed_endpoint() {
        let before = services(1, 3, false).remove(0);
        let mut after = before.clone();
        after.endpoints[2] = Ipv4Addr::new(10, 200, 0, 1);
        let tx = nft_endpoint_change(&before, &after);
        assert_eq!(tx.matches("add chain").count(), 1, "{tx}");
        assert_eq!(tx.matches("delete chain").count(), 1, "{tx}");
        assert!(tx.contains("numgen random mod 3"), "{tx}");
    }
}
