//! Ends sockets the socket LB pointed at a backend that is gone, so clients get an error and reconnect to a live
//! backend instead of talking into the void (the stale UDP/DNS socket problem kube-proxy and Cilium users have
//! reported for years: a connected UDP socket keeps its translated destination forever).
//!
//! aya 0.14 cannot load kfunc calls, so `bpf_sock_destroy` from a socket iterator is out of reach; the kernel's
//! other way in is sock_diag's `SOCK_DESTROY` over netlink (CONFIG_INET_DIAG_DESTROY), which works per network
//! namespace. Which sockets to end is decided from lb's own records: `LB_SOCK_REVNAT` holds the cookie of every
//! socket the socket LB translated, with the backend it chose, and sock_diag reports each socket's cookie. A socket
//! is destroyed only if both its cookie is lb's and its destination is the departed backend.
//!
//! The namespaces searched are those of the processes in `/proc` and those pinned under [`NETNS_DIR`]: in a pod
//! without `hostPID` (the DaemonSet of `lb-agent manifests`) `/proc` shows only the agent's own processes, while containerd and
//! CRI-O pin every pod's network namespace there. Entering another namespace (`setns`) needs `CAP_SYS_ADMIN`,
//! `SOCK_DESTROY` needs `CAP_NET_ADMIN`; the agent's own namespace is searched without `setns`.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::fs::File;
use std::io;
use std::net::IpAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use lb_common::{BackendValue, PROTO_TCP, PROTO_UDP, SockRevNatKey, SockRevNatValue, addr_bytes};

const NETLINK_SOCK_DIAG: libc::c_int = 4;
const SOCK_DIAG_BY_FAMILY: u16 = 20;
const SOCK_DESTROY: u16 = 21;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_DUMP: u16 = 0x300;

/// `struct nlmsghdr`.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct NlMsgHdr {
    len: u32,
    ty: u16,
    flags: u16,
    seq: u32,
    pid: u32,
}

/// `struct inet_diag_sockid`: ports in network order; addresses as bytes (IPv4 in the first four).
#[repr(C)]
#[derive(Clone, Copy, Default, Debug)]
struct InetDiagSockId {
    sport: [u8; 2],
    dport: [u8; 2],
    src: [u8; 16],
    dst: [u8; 16],
    ifindex: u32,
    cookie: [u32; 2],
}

/// `struct inet_diag_req_v2`.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct InetDiagReqV2 {
    family: u8,
    protocol: u8,
    ext: u8,
    pad: u8,
    states: u32,
    id: InetDiagSockId,
}

/// `struct inet_diag_msg` (the part we read).
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct InetDiagMsg {
    family: u8,
    state: u8,
    timer: u8,
    retrans: u8,
    id: InetDiagSockId,
}

/// A backend sockets must no longer reach: its address, port and protocol, and the services it left.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Target {
    pub backend: BackendValue,
    /// Only sockets translated for these services are ended (the backend may still serve another).
    pub service_ids: BTreeSet<u32>,
}

/// Where `ip netns`, containerd and CRI-O pin network namespaces (the node's, mounted into the agent's pod).
pub const NETNS_DIR: &str = "/run/netns";

#[derive(Debug, Default)]
pub struct DestroyReport {
    pub namespaces: usize,
    pub destroyed: usize,
    /// Namespaces that could not be searched (a process exited meanwhile, a capability is missing, ...).
    pub errors: Vec<SockDestroyError>,
}

#[derive(Debug, thiserror::Error)]
pub enum SockDestroyError {
    #[error("entering {namespace}: {source}")]
    Enter {
        namespace: String,
        source: io::Error,
    },
    #[error("sock_diag in {namespace}: {source}")]
    Netlink {
        namespace: String,
        source: io::Error,
    },
    #[error("{namespace}: search thread panicked")]
    Panicked { namespace: String },
}

impl SockDestroyError {
    /// The capability whose absence explains this error, when the kernel said EPERM: `setns` into another network
    /// namespace checks `CAP_SYS_ADMIN`, sock_diag's `SOCK_DESTROY` checks `CAP_NET_ADMIN`.
    pub fn missing_capability(&self) -> Option<&'static str> {
        match self {
            SockDestroyError::Enter { source, .. }
                if source.raw_os_error() == Some(libc::EPERM) =>
            {
                Some("CAP_SYS_ADMIN")
            }
            SockDestroyError::Netlink { source, .. }
                if source.raw_os_error() == Some(libc::EPERM) =>
            {
                Some("CAP_NET_ADMIN")
            }
            _ => None,
        }
    }
}

/// Which (service, backend) departures end sockets: connected UDP sockets always (a UDP "connection" has no end
/// of its own); TCP connections only when the backend is deleted, not when it is merely terminating and still
/// listed in an EndpointSlice, so graceful termination keeps its established connections (as kube-proxy does).
pub fn targets(departed: &[(u32, BackendValue)], still_listed: &BTreeSet<IpAddr>) -> Vec<Target> {
    let mut by_backend: HashMap<BackendValue, BTreeSet<u32>> = HashMap::new();
    for (service_id, backend) in departed {
        let end = match backend.proto {
            PROTO_UDP => true,
            PROTO_TCP => !still_listed.contains(&backend.ip()),
            _ => false,
        };
        if end {
            by_backend.entry(*backend).or_default().insert(*service_id);
        }
    }
    let mut out: Vec<Target> = by_backend
        .into_iter()
        .map(|(backend, service_ids)| Target {
            backend,
            service_ids,
        })
        .collect();
    out.sort();
    out
}

/// The cookies of the sockets lb translated towards each target, from `LB_SOCK_REVNAT`.
pub fn cookies(
    revnat: &[(SockRevNatKey, SockRevNatValue)],
    targets: &[Target],
) -> HashMap<u64, BackendValue> {
    let mut out = HashMap::new();
    for (key, value) in revnat {
        for t in targets {
            if key.addr == t.backend.addr
                && key.port == t.backend.port
                && t.service_ids.contains(&value.service_id)
            {
                out.insert(key.cookie, t.backend);
            }
        }
    }
    out
}

/// Destroys, in every network namespace of the host, the sockets whose cookie is in `cookies` and whose destination
/// is that cookie's backend.
pub fn destroy(cookies: &HashMap<u64, BackendValue>) -> DestroyReport {
    let mut report = DestroyReport::default();
    if cookies.is_empty() {
        return report;
    }
    let protos: BTreeSet<u8> = cookies.values().map(|b| b.proto).collect();
    let own = ns_id(Path::new("/proc/thread-self/ns/net"));
    for ns in network_namespaces() {
        report.namespaces += 1;
        let cookies = cookies.clone();
        let protos = protos.clone();
        let path = ns.path.clone();
        // A new thread starts in this thread's namespace; the agent's own needs no setns (and so no CAP_SYS_ADMIN).
        let enter = Some(ns.id) != own;
        // setns affects only the calling thread, so each namespace gets a short-lived thread of its own.
        let result = std::thread::spawn(move || -> Result<usize, SockDestroyError> {
            let namespace = || path.display().to_string();
            if enter {
                enter_netns(&path).map_err(|source| SockDestroyError::Enter {
                    namespace: namespace(),
                    source,
                })?;
            }
            destroy_here(&cookies, &protos).map_err(|source| SockDestroyError::Netlink {
                namespace: namespace(),
                source,
            })
        })
        .join();
        match result {
            Ok(Ok(n)) => report.destroyed += n,
            Ok(Err(e)) => report.errors.push(e),
            Err(_) => report.errors.push(SockDestroyError::Panicked {
                namespace: ns.path.display().to_string(),
            }),
        }
    }
    report
}

/// A network namespace found on the host, and its identity (nsfs device and inode).
struct Namespace {
    path: PathBuf,
    id: (u64, u64),
}

fn ns_id(path: &Path) -> Option<(u64, u64)> {
    std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino()))
}

/// One path per distinct network namespace that has a process (sockets belong to processes) or is pinned under
/// [`NETNS_DIR`].
fn network_namespaces() -> Vec<Namespace> {
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    let mut add = |path: PathBuf| {
        // The process may exit at any moment; a namespace it alone held goes with it.
        if let Some(id) = ns_id(&path)
            && seen.insert(id)
        {
            out.push(Namespace { path, id });
        }
    };
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for entry in dir.flatten() {
            let name = entry.file_name();
            if name.to_string_lossy().bytes().all(|b| b.is_ascii_digit()) {
                add(entry.path().join("ns/net"));
            }
        }
    }
    if let Ok(dir) = std::fs::read_dir(NETNS_DIR) {
        for entry in dir.flatten() {
            add(entry.path());
        }
    }
    out
}

fn enter_netns(path: &PathBuf) -> io::Result<()> {
    let file = File::open(path)?;
    // SAFETY: setns on a valid namespace fd; it changes only this thread's network namespace.
    if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn netlink_socket() -> io::Result<OwnedFd> {
    // SAFETY: plain socket(2) call; the result is checked and owned below.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
            NETLINK_SOCK_DIAG,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a freshly created descriptor nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Searches the current namespace (of this thread) and destroys matching sockets; returns how many.
fn destroy_here(cookies: &HashMap<u64, BackendValue>, protos: &BTreeSet<u8>) -> io::Result<usize> {
    let fd = netlink_socket()?;
    let mut destroyed = 0;
    for &proto in protos {
        for family in [libc::AF_INET as u8, libc::AF_INET6 as u8] {
            for msg in dump(&fd, family, proto)? {
                let cookie = u64::from(msg.id.cookie[0]) | (u64::from(msg.id.cookie[1]) << 32);
                let Some(backend) = cookies.get(&cookie) else {
                    continue;
                };
                let dst = if family == libc::AF_INET as u8 {
                    let mut a = [0u8; 4];
                    a.copy_from_slice(&msg.id.dst[..4]);
                    addr_bytes(IpAddr::from(a))
                } else {
                    msg.id.dst
                };
                // Only a socket still pointing at the departed backend: an unconnected UDP socket picks afresh on
                // every sendmsg and needs nothing.
                if dst == backend.addr
                    && u16::from_be_bytes(msg.id.dport) == backend.port
                    && backend.proto == proto
                {
                    match sock_destroy(&fd, family, proto, msg.id) {
                        Ok(()) => destroyed += 1,
                        // Gone meanwhile: the goal is reached.
                        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
                        Err(e) => return Err(e),
                    }
                }
            }
        }
    }
    Ok(destroyed)
}

fn as_bytes<T: Copy>(v: &T) -> &[u8] {
    // SAFETY: T is a repr(C) plain-data struct without padding holes that matter to the kernel (all fields are
    // integers, and the kernel ignores the explicit pad byte); reading its bytes is sound.
    unsafe { std::slice::from_raw_parts((v as *const T).cast::<u8>(), size_of::<T>()) }
}

fn send(fd: &OwnedFd, ty: u16, flags: u16, req: &InetDiagReqV2) -> io::Result<()> {
    let hdr = NlMsgHdr {
        len: (size_of::<NlMsgHdr>() + size_of::<InetDiagReqV2>()) as u32,
        ty,
        flags,
        seq: 1,
        pid: 0,
    };
    let mut buf = Vec::with_capacity(hdr.len as usize);
    buf.extend_from_slice(as_bytes(&hdr));
    buf.extend_from_slice(as_bytes(req));
    // SAFETY: buf is a valid, initialised buffer of buf.len() bytes; the kernel is the destination (no address).
    let n = unsafe { libc::send(fd.as_raw_fd(), buf.as_ptr().cast(), buf.len(), 0) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn recv(fd: &OwnedFd, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: buf is a valid writable buffer of buf.len() bytes.
    let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
}

fn read<T: Copy + Default>(buf: &[u8], off: usize) -> Option<T> {
    if off + size_of::<T>() > buf.len() {
        return None;
    }
    // SAFETY: bounds checked above; read_unaligned copes with netlink's 4-byte alignment; T is plain data.
    Some(unsafe { std::ptr::read_unaligned(buf[off..].as_ptr().cast::<T>()) })
}

/// Walks the netlink messages of one datagram; `f` gets each message's type and payload. Returns true at
/// NLMSG_DONE.
fn for_each_message(
    data: &[u8],
    mut f: impl FnMut(u16, &[u8]) -> io::Result<()>,
) -> io::Result<bool> {
    let mut off = 0;
    while let Some(hdr) = read::<NlMsgHdr>(data, off) {
        let len = hdr.len as usize;
        if len < size_of::<NlMsgHdr>() || off + len > data.len() {
            break;
        }
        let payload = &data[off + size_of::<NlMsgHdr>()..off + len];
        match hdr.ty {
            NLMSG_DONE => return Ok(true),
            NLMSG_ERROR => {
                let err = read::<i32>(payload, 0).unwrap_or(0);
                if err != 0 {
                    return Err(io::Error::from_raw_os_error(-err));
                }
            }
            ty => f(ty, payload)?,
        }
        off += (len + 3) & !3;
    }
    Ok(false)
}

fn dump(fd: &OwnedFd, family: u8, proto: u8) -> io::Result<Vec<InetDiagMsg>> {
    let req = InetDiagReqV2 {
        family,
        protocol: proto,
        states: u32::MAX,
        ..InetDiagReqV2::default()
    };
    send(fd, SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST | NLM_F_DUMP, &req)?;
    let mut out = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = recv(fd, &mut buf)?;
        if n == 0 {
            return Ok(out);
        }
        let done = for_each_message(&buf[..n], |ty, payload| {
            if ty == SOCK_DIAG_BY_FAMILY
                && let Some(msg) = read::<InetDiagMsg>(payload, 0)
            {
                out.push(msg);
            }
            Ok(())
        })?;
        if done {
            return Ok(out);
        }
    }
}

fn sock_destroy(fd: &OwnedFd, family: u8, proto: u8, id: InetDiagSockId) -> io::Result<()> {
    let req = InetDiagReqV2 {
        family,
        protocol: proto,
        states: u32::MAX,
        id,
        ..InetDiagReqV2::default()
    };
    send(fd, SOCK_DESTROY, NLM_F_REQUEST | NLM_F_ACK, &req)?;
    let mut buf = vec![0u8; 4096];
    let n = recv(fd, &mut buf)?;
    for_each_message(&buf[..n], |_, _| Ok(())).map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backend(ip: &str, port: u16, proto: u8) -> BackendValue {
        BackendValue::new(ip.parse().expect("ip"), port, proto)
    }

    #[test]
    fn kernel_struct_sizes() {
        assert_eq!(size_of::<InetDiagSockId>(), 48);
        assert_eq!(size_of::<InetDiagReqV2>(), 56);
        assert_eq!(size_of::<NlMsgHdr>(), 16);
    }

    #[test]
    fn udp_departures_always_end_sockets_tcp_only_when_deleted() {
        let udp = backend("10.0.0.1", 53, PROTO_UDP);
        let tcp_terminating = backend("10.0.0.2", 80, PROTO_TCP);
        let tcp_deleted = backend("10.0.0.3", 80, PROTO_TCP);
        let listed: BTreeSet<IpAddr> = ["10.0.0.1", "10.0.0.2"]
            .iter()
            .map(|a| a.parse().expect("ip"))
            .collect();
        let t = targets(
            &[(1, udp), (2, tcp_terminating), (2, tcp_deleted), (3, udp)],
            &listed,
        );
        assert_eq!(
            t,
            vec![
                Target {
                    backend: udp,
                    service_ids: [1, 3].into()
                },
                Target {
                    backend: tcp_deleted,
                    service_ids: [2].into()
                },
            ]
        );
    }

    #[test]
    fn cookies_match_backend_and_service() {
        let b = backend("10.0.0.1", 53, PROTO_UDP);
        let key = |cookie, ip: &str, port| SockRevNatKey {
            cookie,
            addr: addr_bytes(ip.parse().expect("ip")),
            port,
            _pad: [0; 6],
        };
        let value = |service_id| SockRevNatValue {
            service_id,
            ..SockRevNatValue::default()
        };
        let revnat = vec![
            (key(1, "10.0.0.1", 53), value(7)),
            (key(2, "10.0.0.1", 53), value(8)),
            (key(3, "10.0.0.9", 53), value(7)),
            (key(4, "10.0.0.1", 54), value(7)),
        ];
        let c = cookies(
            &revnat,
            &[Target {
                backend: b,
                service_ids: [7].into(),
            }],
        );
        assert_eq!(c.keys().copied().collect::<BTreeSet<_>>(), [1].into());
    }

    #[test]
    fn netlink_error_messages_surface_as_errors() {
        let mut msg = Vec::new();
        let hdr = NlMsgHdr {
            len: 20,
            ty: NLMSG_ERROR,
            ..NlMsgHdr::default()
        };
        msg.extend_from_slice(as_bytes(&hdr));
        msg.extend_from_slice(&(-libc::EPERM).to_ne_bytes());
        let err = for_each_message(&msg, |_, _| Ok(())).expect_err("EPERM");
        assert_eq!(err.raw_os_error(), Some(libc::EPERM));
    }
}
