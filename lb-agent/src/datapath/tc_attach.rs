//! Attaches the per-packet programs (`lb_tc_ingress`, `lb_tc_egress`) to the node's external interfaces. tcx
//! (kernel 6.6+) through pinned bpf_links `links/tc-{in,eg}-<ifname>`, replaced only after the new link is attached
//! (as the socket programs' links, see `loader::attach_sock_programs`); the clsact qdisc with a netlink filter only
//! when tcx is unavailable, which the log says. `lb-agent cleanup` removes the pinned links with the others.

use std::fs;
use std::net::IpAddr;

use anyhow::Context;
use aya::Ebpf;
use aya::programs::links::FdLink;
use aya::programs::tc::{self, TcAttachOptions};
use aya::programs::{LinkOrder, SchedClassifier, TcAttachType};
use lb_common::prog_names;

use super::loader::PinDir;

/// Loads both tc programs (verifier) without attaching them.
pub fn load_tc_programs(ebpf: &mut Ebpf) -> anyhow::Result<()> {
    for name in [prog_names::TC_INGRESS, prog_names::TC_EGRESS] {
        let prog: &mut SchedClassifier = ebpf
            .program_mut(name)
            .with_context(|| format!("program {name} missing from the object"))?
            .try_into()
            .with_context(|| format!("program {name} is not a tc classifier"))?;
        prog.load()
            .with_context(|| format!("loading {name} (verifier)"))?;
    }
    Ok(())
}

/// Loads and attaches the tc programs to every device in `devices` (ingress and egress).
pub fn attach_tc_programs(
    ebpf: &mut Ebpf,
    devices: &[String],
    pins: &PinDir,
) -> anyhow::Result<()> {
    if devices.is_empty() {
        tracing::info!("no external devices: the per-packet programs are not attached");
        return Ok(());
    }
    load_tc_programs(ebpf)?;
    let link_dir = pins.links();
    fs::create_dir_all(&link_dir).with_context(|| format!("creating {}", link_dir.display()))?;
    for dev in devices {
        for (name, attach_type, tag) in [
            (prog_names::TC_INGRESS, TcAttachType::Ingress, "in"),
            (prog_names::TC_EGRESS, TcAttachType::Egress, "eg"),
        ] {
            let prog: &mut SchedClassifier = ebpf
                .program_mut(name)
                .with_context(|| format!("program {name} missing"))?
                .try_into()
                .with_context(|| format!("program {name} is not a tc classifier"))?;
            let pin = link_dir.join(format!("tc-{tag}-{dev}"));
            match prog.attach_with_options(
                dev,
                attach_type,
                TcAttachOptions::TcxOrder(LinkOrder::default()),
            ) {
                Ok(id) => {
                    let link: FdLink = prog
                        .take_link(id)
                        .with_context(|| format!("taking the tcx link of {name} on {dev}"))?
                        .try_into()
                        .with_context(|| {
                            format!("the tcx link of {name} on {dev} is not a bpf_link")
                        })?;
                    // bpffs refuses names with a dot (EPERM), hence ':new'.
                    let fresh = link_dir.join(format!("tc-{tag}-{dev}:new"));
                    let _ = fs::remove_file(&fresh);
                    drop(
                        link.pin(&fresh)
                            .with_context(|| format!("pinning the link of {name} on {dev}"))?,
                    );
                    if pin.exists() {
                        fs::remove_file(&pin).with_context(|| {
                            format!("removing the previous link {}", pin.display())
                        })?;
                    }
                    fs::rename(&fresh, &pin).with_context(|| {
                        format!("renaming {} to {}", fresh.display(), pin.display())
                    })?;
                }
                Err(e) => {
                    tracing::warn!(device = %dev, program = name, error = %e, "tcx attach failed; falling back to the clsact qdisc (netlink)");
                    // EEXIST: the qdisc is there already (a previous agent).
                    let _ = tc::qdisc_add_clsact(dev);
                    let id = prog
                        .attach_with_options(
                            dev,
                            attach_type,
                            TcAttachOptions::Netlink(Default::default()),
                        )
                        .with_context(|| format!("attaching {name} to {dev} with clsact"))?;
                    // A netlink filter outlives the process only if its link is not dropped (which detaches).
                    let link = prog.take_link(id)?;
                    std::mem::forget(link);
                }
            }
        }
        tracing::info!(device = %dev, "tc programs attached (ingress and egress)");
    }
    Ok(())
}

/// The interfaces that carry any of `addresses` (the node's InternalIP/ExternalIP), by name.
pub fn devices_with_addresses(addresses: &[IpAddr]) -> Vec<String> {
    let mut out = Vec::new();
    let mut ifap: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills ifap with a list we free below with freeifaddrs; on error it returns -1.
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
        // SAFETY: ifa_addr is non-null and its family says which sockaddr it is.
        let family = i32::from(unsafe { (*ifa.ifa_addr).sa_family });
        let addr = match family {
            libc::AF_INET => {
                // SAFETY: AF_INET means sockaddr_in.
                let sin = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in) };
                IpAddr::from(u32::from_be(sin.sin_addr.s_addr).to_be_bytes())
            }
            libc::AF_INET6 => {
                // SAFETY: AF_INET6 means sockaddr_in6.
                let sin6 = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in6) };
                IpAddr::from(sin6.sin6_addr.s6_addr)
            }
            _ => continue,
        };
        if addresses.contains(&addr) {
            // SAFETY: ifa_name is a NUL-terminated string valid until freeifaddrs.
            let name = unsafe { std::ffi::CStr::from_ptr(ifa.ifa_name) }
                .to_string_lossy()
                .into_owned();
            if !out.contains(&name) {
                out.push(name);
            }
        }
    }
    // SAFETY: ifap came from a successful getifaddrs and is freed once.
    unsafe { libc::freeifaddrs(ifap) };
    out
}
