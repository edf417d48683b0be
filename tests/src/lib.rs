//! Root-only test harness for lb: network namespaces joined by veth pairs, a cgroup v2 for the client processes,
//! a bpffs pin directory, and process guards, all removed on drop, even when the test panics.
//!
//! Network safety: everything here sends packets only inside namespaces it creates. Veth pairs are created
//! directly between two such namespaces and never touch the root namespace, and nothing adds a route out of them.
//!
//! Names are unique per process and call ([`unique_token`]), so tests in one binary and test binaries running side
//! by side do not collide.
//!
//! ```no_run
//! # fn main() -> anyhow::Result<()> {
//! use std::time::Duration;
//! // In an integration test of this package: `let probe = lb_tests::probe!();`
//! let probe = lb_tests::Probe::new("target/debug/lb-probe");
//! let mut topo = lb_tests::Topology::star(2)?;
//! topo.serve(&probe, &[8080], &[5353])?;
//! let addr = topo.backend(0).addr_v4(8080);
//! let lines = topo.in_client(probe.tcp_cmd(addr, 3)).run(Duration::from_secs(10))?.probe_lines()?;
//! assert!(lines.iter().all(|l| l.backend.as_deref() == Some("backend-0")));
//! # Ok(())
//! # }
//! ```

pub mod agent;
pub mod apiserver;
pub mod bench;
pub mod bpffs;
pub mod caps;
pub mod cgroup;
pub mod cluster;
pub mod netns;
pub mod node_agent;
pub mod probe;
pub mod process;
pub mod topology;

use std::io::Write;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

use anyhow::{Context, Result, bail};

pub use agent::Agent;
pub use apiserver::ApiServer;
pub use bpffs::BpfDir;
pub use cgroup::Cgroup;
pub use netns::{NetNs, Veth, VethEnd};
pub use probe::{Probe, ProbeLine};
pub use process::{Child, Cmd, Output};
pub use topology::{Backend, Topology};

/// A [`Probe`] for the `lb-probe` binary of this package. Expands `env!("CARGO_BIN_EXE_lb-probe")` at the call
/// site, which cargo defines only for this package's integration tests and binaries.
#[macro_export]
macro_rules! probe {
    () => {
        $crate::Probe::new(env!("CARGO_BIN_EXE_lb-probe"))
    };
}

/// Returns true when the test may run. Without root: panics when `CI=true` (a CI run must not pass by skipping),
/// otherwise prints why the test is skipped and returns false, so the caller returns early.
pub fn require_root(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!(
            "{test}: needs root (CI=true, so it may not be skipped); run `sudo -E cargo test -p lb-tests`"
        );
    }
    // Written to the stderr handle rather than with eprintln!: libtest captures the print macros and shows them
    // only for failing tests, and a skip must be visible on a passing run.
    let _ = writeln!(
        std::io::stderr(),
        "{test}: skipped: needs root (run `sudo -E cargo test -p lb-tests`)"
    );
    false
}

/// A short token unique to this process and call: `<pid>-<counter>`, both in base 36, so that interface names
/// built from it stay within the kernel's 15 characters (pids need at most 5 digits, counters 1 or 2).
pub fn unique_token() -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    format!("{}-{}", base36(std::process::id()), base36(n))
}

fn base36(mut n: u32) -> String {
    const DIGITS: &[u8; 36] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    let mut out = Vec::new();
    loop {
        out.push(DIGITS[(n % 36) as usize]);
        n /= 36;
        if n == 0 {
            break;
        }
    }
    out.reverse();
    String::from_utf8(out).unwrap_or_default()
}

/// Runs `program args...` to completion and returns its stdout; fails with its stderr when it exits non-zero.
pub fn run_cmd(program: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("cannot run {program}"))?;
    if !out.status.success() {
        bail!(
            "`{program} {}` failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Mount points of a filesystem type, from /proc/mounts.
pub fn mounts_of_type(fstype: &str) -> Result<Vec<String>> {
    let mounts = std::fs::read_to_string("/proc/mounts").context("cannot read /proc/mounts")?;
    Ok(mounts
        .lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let (_dev, dir, ty) = (fields.next()?, fields.next()?, fields.next()?);
            (ty == fstype).then(|| unescape_mount_path(dir))
        })
        .collect())
}

/// /proc/mounts escapes space, tab, newline and backslash as octal (`\040`).
fn unescape_mount_path(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && i + 3 < bytes.len()
            && bytes[i + 1..i + 4]
                .iter()
                .all(|b| (b'0'..=b'7').contains(b))
        {
            let v = (bytes[i + 1] - b'0') * 64 + (bytes[i + 2] - b'0') * 8 + (bytes[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod unit {
    use super::*;

    #[test]
    fn unique_tokens_differ_and_stay_short() {
        let (a, b) = (unique_token(), unique_token());
        assert_ne!(a, b);
        assert!(a.len() <= 9, "token {a} too long for interface names");
    }

    #[test]
    fn mount_paths_are_unescaped() {
        assert_eq!(unescape_mount_path(r"/a\040b"), "/a b");
        assert_eq!(
            unescape_mount_path("/sys/fs/cgroup/unified"),
            "/sys/fs/cgroup/unified"
        );
    }
}
