//! Named network namespaces (`ip netns`) and veth pairs between them.

use std::fs::File;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::run_cmd;

/// A named network namespace, `ip netns add`ed on creation with `lo` up, and `ip netns del`eted on drop.
///
/// Deleting the name frees the namespace (and the veth ends inside it) once no process is left in it, so drop the
/// processes first; [`crate::Topology`] does.
#[derive(Debug)]
pub struct NetNs {
    name: String,
}

impl NetNs {
    /// Creates the namespace `name` and brings its loopback up. Fails if the name exists: a leftover from another
    /// run must not be adopted (and then deleted) by this one.
    pub fn new(name: &str) -> Result<NetNs> {
        if Self::exists(name) {
            bail!("network namespace {name} already exists");
        }
        run_cmd("ip", &["netns", "add", name])?;
        // Guard first, so that a failure below still deletes the namespace.
        let ns = NetNs {
            name: name.to_owned(),
        };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The bind mount `ip netns` keeps the namespace alive with: /run/netns/<name>.
    pub fn path(&self) -> PathBuf {
        Self::path_of(&self.name)
    }

    fn path_of(name: &str) -> PathBuf {
        PathBuf::from("/run/netns").join(name)
    }

    /// Opens the namespace file, for `setns(fd, CLONE_NEWNET)`.
    pub fn open(&self) -> Result<File> {
        File::open(self.path()).with_context(|| format!("cannot open {}", self.path().display()))
    }

    /// Whether a namespace of this name exists (`ip netns add` creates /run/netns/<name>).
    pub fn exists(name: &str) -> bool {
        Self::path_of(name).exists()
    }

    /// Runs `ip -n <name> args...` and returns its stdout.
    pub fn ip(&self, args: &[&str]) -> Result<String> {
        let mut full = vec!["-n", self.name.as_str()];
        full.extend_from_slice(args);
        run_cmd("ip", &full)
    }

    /// Sets a sysctl inside the namespace, e.g. `("net.ipv4.ip_forward", "1")`. `ip netns exec` is fine here: only
    /// /proc/sys/net matters, and it is per network namespace.
    pub fn sysctl(&self, key: &str, value: &str) -> Result<()> {
        run_cmd(
            "ip",
            &[
                "netns",
                "exec",
                &self.name,
                "sysctl",
                "-q",
                "-w",
                &format!("{key}={value}"),
            ],
        )?;
        Ok(())
    }

    /// `ethtool -K <dev> <settings>` inside the namespace (offloads, GRO; `cargo xtask setup` installs ethtool).
    pub fn ethtool(&self, dev: &str, settings: &[&str]) -> Result<()> {
        let mut args = vec!["netns", "exec", &self.name, "ethtool", "-K", dev];
        args.extend_from_slice(settings);
        run_cmd("ip", &args)?;
        Ok(())
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        if let Err(e) = run_cmd("ip", &["netns", "del", &self.name]) {
            eprintln!(
                "lb-tests: cannot delete network namespace {}: {e:#}",
                self.name
            );
        }
    }
}

/// One end of a veth pair: an interface name inside a namespace.
#[derive(Debug, Clone)]
pub struct VethEnd {
    ns: String,
    name: String,
}

impl VethEnd {
    pub fn netns(&self) -> &str {
        &self.ns
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Adds an address in CIDR form (`10.244.1.1/24`, `fd00:244:1::1/64`). IPv6 addresses are added `nodad`, so they
    /// are usable at once instead of staying tentative for about a second.
    pub fn add_addr(&self, cidr: &str) -> Result<()> {
        let mut args = vec![
            "-n",
            self.ns.as_str(),
            "addr",
            "add",
            cidr,
            "dev",
            self.name.as_str(),
        ];
        if cidr.contains(':') {
            args.push("nodad");
        }
        run_cmd("ip", &args)?;
        Ok(())
    }

    pub fn up(&self) -> Result<()> {
        run_cmd("ip", &["-n", &self.ns, "link", "set", &self.name, "up"])?;
        Ok(())
    }

    /// Waits until IPv6 has seen the carrier: the kernel then adds the interface's `ff00::/8` multicast route.
    /// Before that, neighbour solicitations arriving on it are dropped (no route), so the first IPv6 exchange over
    /// a fresh link would wait for a retransmission, a second later.
    pub fn wait_ipv6_ready(&self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let routes = run_cmd(
                "ip",
                &[
                    "-n", &self.ns, "-6", "route", "show", "table", "local", "dev", &self.name,
                ],
            )?;
            if routes
                .lines()
                .any(|l| l.split_whitespace().any(|w| w == "ff00::/8"))
            {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!(
                    "IPv6 not ready on {} in {} after {timeout:?}",
                    self.name,
                    self.ns
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The interface index inside its namespace, e.g. to attach XDP or tc programs by index.
    pub fn ifindex(&self) -> Result<u32> {
        let out = run_cmd(
            "ip",
            &["-n", &self.ns, "-o", "link", "show", "dev", &self.name],
        )?;
        out.split(':')
            .next()
            .and_then(|s| s.trim().parse().ok())
            .with_context(|| format!("cannot parse ifindex from `{}`", out.trim()))
    }

    /// The MAC address, as `ip` prints it (`aa:bb:cc:dd:ee:ff`).
    pub fn mac(&self) -> Result<String> {
        let out = run_cmd(
            "ip",
            &["-n", &self.ns, "-o", "link", "show", "dev", &self.name],
        )?;
        let mut words = out.split_whitespace();
        words
            .find(|w| *w == "link/ether")
            .and_then(|_| words.next())
            .map(str::to_owned)
            .with_context(|| format!("no link/ether in `{}`", out.trim()))
    }
}

/// A veth pair created directly between two namespaces: neither end ever exists in the root namespace. The pair
/// disappears with either namespace; dropping it deletes it earlier, ignoring errors (the namespace may be gone).
#[derive(Debug)]
pub struct Veth {
    a: VethEnd,
    b: VethEnd,
}

impl Veth {
    /// Creates `a_name` in `a_ns` and its peer `b_name` in `b_ns` (names of at most 15 characters), both down.
    pub fn new(a_ns: &NetNs, a_name: &str, b_ns: &NetNs, b_name: &str) -> Result<Veth> {
        Self::create(a_ns, a_name, None, b_ns, b_name)
    }

    /// Like [`Veth::new`], with the interface index of the `a` end chosen (unique within `a_ns`).
    ///
    /// Why choose: two fresh namespaces both give their first interface index 2, and when an end's index equals
    /// its peer's index the kernel takes it for a plain device (`ifindex == iflink`) and delays its carrier event by
    /// up to a second (linkwatch). Until then IPv6 has no multicast route on it and drops neighbour solicitations,
    /// so the first IPv6 packets stall. [`Veth::up`] waits that out either way; distinct indexes make it instant.
    pub fn with_index(
        a_ns: &NetNs,
        a_name: &str,
        a_index: u32,
        b_ns: &NetNs,
        b_name: &str,
    ) -> Result<Veth> {
        Self::create(a_ns, a_name, Some(a_index), b_ns, b_name)
    }

    fn create(
        a_ns: &NetNs,
        a_name: &str,
        a_index: Option<u32>,
        b_ns: &NetNs,
        b_name: &str,
    ) -> Result<Veth> {
        for name in [a_name, b_name] {
            if name.len() > 15 {
                bail!("interface name {name} is longer than 15 characters");
            }
        }
        let index = a_index.map(|i| i.to_string());
        let mut args = vec!["link", "add", a_name, "netns", a_ns.name()];
        if let Some(index) = &index {
            args.extend(["index", index.as_str()]);
        }
        args.extend(["type", "veth", "peer", "name", b_name, "netns", b_ns.name()]);
        run_cmd("ip", &args)?;
        Ok(Veth {
            a: VethEnd {
                ns: a_ns.name().to_owned(),
                name: a_name.to_owned(),
            },
            b: VethEnd {
                ns: b_ns.name().to_owned(),
                name: b_name.to_owned(),
            },
        })
    }

    pub fn a(&self) -> &VethEnd {
        &self.a
    }

    pub fn b(&self) -> &VethEnd {
        &self.b
    }

    /// Brings both ends up and waits until IPv6 is ready on both (see [`VethEnd::wait_ipv6_ready`]).
    pub fn up(&self) -> Result<()> {
        self.a.up()?;
        self.b.up()?;
        self.a.wait_ipv6_ready(IPV6_READY)?;
        self.b.wait_ipv6_ready(IPV6_READY)
    }
}

/// Longer than the kernel's worst case (one linkwatch period, a second) with room for a loaded machine.
const IPV6_READY: Duration = Duration::from_secs(5);

impl Drop for Veth {
    fn drop(&mut self) {
        // Deleting one end deletes the pair. Failure is expected when the namespace is already gone.
        if NetNs::exists(&self.a.ns) {
            let _ = run_cmd("ip", &["-n", &self.a.ns, "link", "del", &self.a.name]);
        }
    }
}
