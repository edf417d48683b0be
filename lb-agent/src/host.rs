//! The host's own network interfaces, read with getifaddrs(3): the fallback NodePort addresses and the default
//! tc devices both come from here.

use std::net::IpAddr;

/// Every (interface name, address) pair of this network namespace, in the kernel's order.
pub fn interface_addresses() -> Vec<(String, IpAddr)> {
    let mut out = Vec::new();
    let mut ifap: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills ifap with a list freed below with freeifaddrs; on error it returns -1 and we return.
    if unsafe { libc::getifaddrs(&mut ifap) } != 0 {
        return out;
    }
    let mut cur = ifap;
    while !cur.is_null() {
        // SAFETY: cur is a node of the list getifaddrs returned, valid until freeifaddrs.
        let ifa = unsafe { &*cur };
        cur = ifa.ifa_next;
        if ifa.ifa_addr.is_null() || ifa.ifa_name.is_null() {
            continue;
        }
        // SAFETY: ifa_addr is non-null and points to a sockaddr whose family says which struct it is.
        let family = i32::from(unsafe { (*ifa.ifa_addr).sa_family });
        let addr = match family {
            libc::AF_INET => {
                // SAFETY: family AF_INET means the sockaddr is a sockaddr_in.
                let sin = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in) };
                IpAddr::from(u32::from_be(sin.sin_addr.s_addr).to_be_bytes())
            }
            libc::AF_INET6 => {
                // SAFETY: family AF_INET6 means the sockaddr is a sockaddr_in6.
                let sin6 = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in6) };
                IpAddr::from(sin6.sin6_addr.s6_addr)
            }
            _ => continue,
        };
        // SAFETY: ifa_name is a NUL-terminated string valid until freeifaddrs.
        let name = unsafe { std::ffi::CStr::from_ptr(ifa.ifa_name) }
            .to_string_lossy()
            .into_owned();
        out.push((name, addr));
    }
    // SAFETY: ifap came from a successful getifaddrs and is freed once.
    unsafe { libc::freeifaddrs(ifap) };
    out
}

/// The host's own unicast addresses (not loopback, not link-local), for NodePorts when no Node object says which.
pub fn unicast_addresses() -> Vec<IpAddr> {
    let mut out = Vec::new();
    for (_, addr) in interface_addresses() {
        let link_local = matches!(addr, IpAddr::V6(a) if a.segments()[0] & 0xffc0 == 0xfe80);
        if !addr.is_loopback() && !link_local && !out.contains(&addr) {
            out.push(addr);
        }
    }
    out
}

/// The cookie of this process's network namespace (`SO_NETNS_COOKIE`, Linux 5.14+), the value
/// `bpf_get_netns_cookie` returns for sockets of the same namespace.
pub fn netns_cookie() -> std::io::Result<u64> {
    let socket = std::net::UdpSocket::bind("127.0.0.1:0")
        .or_else(|_| std::net::UdpSocket::bind("[::1]:0"))?;
    let mut cookie = 0u64;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `cookie`, which is a u64 we own, and updates `len`.
    let rc = unsafe {
        libc::getsockopt(
            std::os::fd::AsRawFd::as_raw_fd(&socket),
            libc::SOL_SOCKET,
            libc::SO_NETNS_COOKIE,
            (&mut cookie as *mut u64).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(cookie)
}

/// Capability numbers (linux/capability.h) the datapath's kernel checks name.
pub mod cap {
    pub const NET_ADMIN: u32 = 12;
    pub const SYS_ADMIN: u32 = 21;
    pub const PERFMON: u32 = 38;
    pub const BPF: u32 = 39;
}

/// This process's effective capability set (`CapEff` of /proc/self/status), as a bit mask by capability number.
pub fn effective_capabilities() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    parse_cap_eff(&status)
}

fn parse_cap_eff(status: &str) -> Option<u64> {
    let hex = status.lines().find_map(|l| l.strip_prefix("CapEff:"))?;
    u64::from_str_radix(hex.trim(), 16).ok()
}

/// The capabilities loading and attaching lb's programs needs that `effective` lacks, by the kernel's rules:
/// bpf() itself wants `CAP_BPF`, networking program types (sock_addr, tc, XDP) `CAP_NET_ADMIN`, and the verifier
/// applies its unprivileged rules (pointer arithmetic on map values, speculation masking) without `CAP_PERFMON`.
/// `CAP_SYS_ADMIN` stands in for all three (the kernel's `bpf_capable()`, `bpf_net_capable()`, `perfmon_capable()`).
pub fn missing_datapath_capabilities(effective: u64) -> Vec<&'static str> {
    let has = |c: u32| effective & (1u64 << c) != 0;
    if has(cap::SYS_ADMIN) {
        return Vec::new();
    }
    [
        (cap::BPF, "CAP_BPF"),
        (cap::NET_ADMIN, "CAP_NET_ADMIN"),
        (cap::PERFMON, "CAP_PERFMON"),
    ]
    .into_iter()
    .filter(|(c, _)| !has(*c))
    .map(|(_, name)| name)
    .collect()
}

/// The running kernel's release (`uname -r`), or `unknown`.
pub fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "unknown".to_owned())
}

#[cfg(test)]
mod capability_tests {
    use super::*;

    #[test]
    fn cap_eff_is_read_as_hex() {
        let status = "Name:\tx\nCapPrm:\t0000000000000001\nCapEff:\t000000c000001000\n";
        assert_eq!(
            parse_cap_eff(status),
            Some((1 << cap::BPF) | (1 << cap::PERFMON) | (1 << cap::NET_ADMIN))
        );
        assert_eq!(parse_cap_eff("Name:\tx\n"), None);
    }

    #[test]
    fn sys_admin_stands_in_for_the_bpf_capabilities() {
        assert!(missing_datapath_capabilities(1 << cap::SYS_ADMIN).is_empty());
        let all = (1 << cap::BPF) | (1 << cap::PERFMON) | (1 << cap::NET_ADMIN);
        assert!(missing_datapath_capabilities(all).is_empty());
        assert_eq!(
            missing_datapath_capabilities(all & !(1 << cap::PERFMON)),
            ["CAP_PERFMON"]
        );
        assert_eq!(
            missing_datapath_capabilities(0),
            ["CAP_BPF", "CAP_NET_ADMIN", "CAP_PERFMON"]
        );
    }
}
