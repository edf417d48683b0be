//! `LB_NETNS_ADDRS`: the address each network namespace's sockets send from, by namespace cookie, for the socket
//! LB's `loadBalancerSourceRanges` check (rule 9 holds for this node's pods and processes too).
//!
//! At `connect()` the kernel has not chosen a source address yet, so the socket program cannot read one. What it
//! can read is the socket's namespace cookie, and a pod's namespace has one address per family: its own. This
//! module learns them. It enters every namespace that holds a process of the agent's cgroup (the sockets the
//! programs see) or is pinned under `/run/netns` (where the container runtimes pin pods' namespaces; in a DaemonSet
//! without `hostPID`, `/proc` shows no pod process), reads the namespace's cookie (`SO_NETNS_COOKIE`) and its first
//! unicast IPv4 and IPv6 address, and writes the map's differences. The host's own namespace (the agent's, shared
//! by hostNetwork pods) gets the node's primary addresses, which is what kube-proxy sees as the source of the
//! node's own traffic.
//!
//! Namespaces are learned once (by the device and inode of their nsfs file) and forgotten when they disappear; one
//! learned before it had an address (a pod's namespace exists before its CNI plugin configures it) is entered again
//! at every refresh until it has one. A namespace created after the last refresh is unknown to the socket program, which counts it outside every range
//! until the next refresh (the agent refreshes after every sync and every few seconds while a Service needs it).
//! Entering another namespace needs `CAP_SYS_ADMIN`; without it only the host's entry is written, logged once.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::File;
use std::io;
use std::net::IpAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use aya::maps::{HashMap as BpfHashMap, MapData};
use lb_common::{NETNS_HAS_V4, NETNS_HAS_V6, NetnsAddrs, addr_bytes, map_names};

use super::map_error::{MapsError, open_pinned};

/// Where container runtimes (and `ip netns`) pin network namespaces.
const NETNS_DIR: &str = "/run/netns";

/// A namespace's identity while it exists: the device and inode of its nsfs file.
type NsId = (u64, u64);

/// Keeps `LB_NETNS_ADDRS` in step with the namespaces around.
pub struct NetnsAddrsWriter {
    map: BpfHashMap<MapData, u64, NetnsAddrs>,
    cgroup: PathBuf,
    /// Every namespace seen, learned or not (`None`: could not be read; not retried while it exists).
    learned: HashMap<NsId, Option<(u64, NetnsAddrs)>>,
    /// The host's entry: the agent's own namespace cookie and the node's addresses.
    host: Option<(u64, NetnsAddrs)>,
    /// What the map holds.
    written: BTreeMap<u64, NetnsAddrs>,
    /// The agent's own namespace, learned as the host, never entered.
    own: Option<NsId>,
    warned: bool,
}

/// What one refresh did, for the log.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Refresh {
    pub learned: usize,
    pub written: usize,
    pub deleted: usize,
}

impl NetnsAddrsWriter {
    /// Opens the pinned map and adopts what it holds (a previous agent's entries are kept until a refresh finds
    /// their namespaces gone). `cgroup` is the directory the socket programs are attached to.
    pub fn open(pins: &Path, cgroup: &Path) -> Result<Self, MapsError> {
        let map = open_pinned(pins, map_names::NETNS_ADDRS)?;
        let map = BpfHashMap::try_from(map).map_err(|source| MapsError::Layout {
            map: map_names::NETNS_ADDRS,
            source,
        })?;
        let written = map
            .iter()
            .filter_map(Result::ok)
            .collect::<BTreeMap<u64, NetnsAddrs>>();
        Ok(NetnsAddrsWriter {
            map,
            cgroup: cgroup.to_path_buf(),
            learned: HashMap::new(),
            host: None,
            written,
            own: ns_id(Path::new("/proc/self/ns/net")),
            warned: false,
        })
    }

    /// The host's entry: this namespace's cookie and the node's primary address of each family.
    pub fn set_host(&mut self, cookie: u64, node_addresses: &[IpAddr]) {
        self.host = Some((cookie, addresses(node_addresses.iter().copied())));
    }

    /// Finds the namespaces around, learns the new ones, forgets the vanished ones and writes the differences.
    pub fn refresh(&mut self) -> Refresh {
        let mut refresh = Refresh::default();
        let found = namespaces(&self.cgroup);
        let ids: HashSet<NsId> = found.iter().map(|(id, _)| *id).collect();
        self.learned.retain(|id, _| ids.contains(id));
        let new = to_learn(found, &self.learned, self.own);
        if !new.is_empty() {
            for (id, result) in learn(new) {
                match result {
                    Ok(v) => {
                        refresh.learned += 1;
                        self.learned.insert(id, Some(v));
                    }
                    // Without the capability nothing changes until a restart: remembered, not retried. Any other
                    // failure (a namespace vanishing as it is entered) is retried by the next refresh.
                    Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {
                        if !self.warned {
                            self.warned = true;
                            tracing::warn!(
                                error = %e,
                                "cannot enter the pods' network namespaces (CAP_SYS_ADMIN): the socket LB treats their connections to LoadBalancer IPs with loadBalancerSourceRanges as outside the ranges"
                            );
                        }
                        self.learned.insert(id, None);
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, "cannot read a network namespace's addresses")
                    }
                }
            }
        }
        let mut want: BTreeMap<u64, NetnsAddrs> =
            self.learned.values().flatten().copied().collect();
        if let Some((cookie, addrs)) = self.host {
            want.insert(cookie, addrs);
        }
        for (cookie, addrs) in &want {
            if self.written.get(cookie) == Some(addrs) {
                continue;
            }
            match self.map.insert(cookie, addrs, 0) {
                Ok(()) => {
                    self.written.insert(*cookie, *addrs);
                    refresh.written += 1;
                }
                Err(e) => {
                    tracing::warn!(cookie, error = %e, "cannot write a namespace's addresses")
                }
            }
        }
        let stale: Vec<u64> = self
            .written
            .keys()
            .filter(|c| !want.contains_key(c))
            .copied()
            .collect();
        for cookie in stale {
            match self.map.remove(&cookie) {
                Ok(()) => {
                    self.written.remove(&cookie);
                    refresh.deleted += 1;
                }
                Err(e) => {
                    tracing::warn!(cookie, error = %e, "cannot delete a namespace's addresses")
                }
            }
        }
        refresh
    }
}

/// The namespaces of `found` to enter: the new ones, and those learned before they had an address. A pod's
/// namespace exists (and is pinned) before its CNI plugin gives it an address; learned in that window and never
/// again, the pod would count as outside every source range for as long as it lives.
fn to_learn(
    found: Vec<(NsId, PathBuf)>,
    learned: &HashMap<NsId, Option<(u64, NetnsAddrs)>>,
    own: Option<NsId>,
) -> Vec<(NsId, PathBuf)> {
    found
        .into_iter()
        .filter(|(id, _)| {
            Some(*id) != own
                && match learned.get(id) {
                    None => true,
                    Some(Some((_, addrs))) => addrs.flags == 0,
                    Some(None) => false,
                }
        })
        .collect()
}

/// The first address of each family among `addrs`, as the map holds them.
fn addresses(addrs: impl Iterator<Item = IpAddr>) -> NetnsAddrs {
    let mut out = NetnsAddrs::default();
    for a in addrs {
        match a {
            IpAddr::V4(_) if out.flags & NETNS_HAS_V4 == 0 => {
                out.v4 = addr_bytes(a);
                out.flags |= NETNS_HAS_V4;
            }
            IpAddr::V6(_) if out.flags & NETNS_HAS_V6 == 0 => {
                out.v6 = addr_bytes(a);
                out.flags |= NETNS_HAS_V6;
            }
            _ => {}
        }
    }
    out
}

fn ns_id(path: &Path) -> Option<NsId> {
    std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino()))
}

/// One path per distinct namespace: those of the processes in `cgroup` (and its descendants), then those pinned
/// under `/run/netns`.
fn namespaces(cgroup: &Path) -> Vec<(NsId, PathBuf)> {
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    let mut add = |path: PathBuf| {
        // A process may exit at any moment, and its namespace with it.
        if let Some(id) = ns_id(&path)
            && seen.insert(id)
        {
            out.push((id, path));
        }
    };
    for pid in cgroup_pids(cgroup) {
        add(PathBuf::from(format!("/proc/{pid}/ns/net")));
    }
    if let Ok(dir) = std::fs::read_dir(NETNS_DIR) {
        for entry in dir.flatten() {
            add(entry.path());
        }
    }
    out
}

/// The processes of a cgroup v2 directory and its descendants (`cgroup.procs` of each).
fn cgroup_pids(dir: &Path) -> Vec<u32> {
    let mut pids = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        if let Ok(text) = std::fs::read_to_string(d.join("cgroup.procs")) {
            pids.extend(text.lines().filter_map(|l| l.trim().parse::<u32>().ok()));
        }
        if let Ok(entries) = std::fs::read_dir(&d) {
            stack.extend(
                entries
                    .flatten()
                    .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                    .map(|e| e.path()),
            );
        }
    }
    pids
}

/// Learns each namespace on one short-lived thread (setns changes only the calling thread's namespace, and a
/// thread that entered another namespace is not reused for anything else).
fn learn(namespaces: Vec<(NsId, PathBuf)>) -> Vec<(NsId, io::Result<(u64, NetnsAddrs)>)> {
    let worker = std::thread::spawn(move || {
        namespaces
            .into_iter()
            .map(|(id, path)| (id, learn_one(&path)))
            .collect::<Vec<_>>()
    });
    worker.join().unwrap_or_default()
}

/// Enters `path` (on the calling thread) and reads its cookie and addresses.
fn learn_one(path: &Path) -> io::Result<(u64, NetnsAddrs)> {
    let ns = File::open(path)?;
    // SAFETY: setns on a valid namespace fd; it changes only this thread's network namespace.
    if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let cookie = netns_cookie()?;
    let addrs = addresses(crate::host::unicast_addresses().into_iter());
    Ok((cookie, addrs))
}

/// `SO_NETNS_COOKIE` of an unbound socket in the calling thread's namespace (no bind: a pod's loopback may be
/// down).
fn netns_cookie() -> io::Result<u64> {
    // SAFETY: socket() has no memory arguments; the fd is owned at once.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh socket owned by nothing else.
    let socket = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut cookie = 0u64;
    let mut len = size_of::<u64>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `cookie`, a u64 we own, and updates `len`.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_NETNS_COOKIE,
            (&mut cookie as *mut u64).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cookie)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_address_of_each_family_is_kept() {
        let ips = ["10.244.0.5", "fd00::5", "10.244.0.6", "fd00::6"]
            .iter()
            .map(|s| s.parse::<IpAddr>().expect("address"));
        let a = addresses(ips);
        assert_eq!(a.flags, NETNS_HAS_V4 | NETNS_HAS_V6);
        assert_eq!(a.v4, addr_bytes("10.244.0.5".parse().expect("address")));
        assert_eq!(a.v6, addr_bytes("fd00::5".parse().expect("address")));
        let none = addresses(std::iter::empty());
        assert_eq!(none.flags, 0);
    }

    #[test]
    fn namespaces_without_an_address_are_entered_again() {
        let path = |n: u64| ((1, n), PathBuf::from(format!("/run/netns/ns{n}")));
        let found = vec![path(1), path(2), path(3), path(4), path(5)];
        let v4 = addresses(["10.244.0.5".parse().expect("address")].into_iter());
        let learned = HashMap::from([
            ((1, 2), Some((22, v4))),
            ((1, 3), Some((33, NetnsAddrs::default()))),
            ((1, 4), None),
        ]);
        let ids: Vec<NsId> = to_learn(found, &learned, Some((1, 5)))
            .into_iter()
            .map(|(id, _)| id)
            .collect();
        assert_eq!(
            ids,
            [(1, 1), (1, 3)],
            "new, and learned without an address; not the addressed, the unenterable or our own"
        );
    }

    #[test]
    fn cgroup_pids_come_from_the_whole_subtree() {
        let root = std::env::temp_dir().join(format!("lb-netns-addrs-test-{}", std::process::id()));
        let nested = root.join("pod-a").join("ctr");
        std::fs::create_dir_all(&nested).expect("directories");
        std::fs::write(root.join("cgroup.procs"), "1\n").expect("write");
        std::fs::write(root.join("pod-a").join("cgroup.procs"), "").expect("write");
        std::fs::write(nested.join("cgroup.procs"), "20\n21\n").expect("write");
        let mut pids = cgroup_pids(&root);
        pids.sort();
        let _ = std::fs::remove_dir_all(&root);
        assert_eq!(pids, [1, 20, 21]);
    }
}
