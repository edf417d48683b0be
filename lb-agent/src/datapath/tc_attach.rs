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
    let mut out: Vec<String> = Vec::new();
    for (name, addr) in crate::host::interface_addresses() {
        if addresses.contains(&addr) && !out.contains(&name) {
            out.push(name);
        }
    }
    out
}
