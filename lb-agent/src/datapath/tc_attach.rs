//! Attaches the per-packet programs (`lb_tc_ingress`, `lb_tc_egress`) to the node's external interfaces. tcx
//! (kernel 6.6+) through pinned bpf_links `links/tc-{in,eg}-<ifname>`, replaced only after the new link is attached
//! (as the socket programs' links, see `loader::attach_sock_programs`); the clsact qdisc with a netlink filter only
//! when tcx is unavailable (or `--tc-attach clsact` asks for it), which the log says. `lb-agent cleanup` removes
//! the pinned links with the others, and the clsact filters of these programs on every interface of its network
//! namespace ([`detach_clsact_filters`]: a netlink filter has no pin to find it by).

use std::fs;
use std::net::IpAddr;

use anyhow::Context;
use aya::Ebpf;
use aya::programs::links::FdLink;
use aya::programs::tc::{self, TcAttachOptions};
use aya::programs::{LinkOrder, SchedClassifier, TcAttachType};
use lb_common::prog_names;

use super::loader::PinDir;

/// `--tc-attach`: how the per-packet programs attach.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum TcAttachMode {
    /// tcx links; the clsact qdisc only where tcx is unavailable.
    Auto,
    /// tcx links only: an attach failure is an error.
    Tcx,
    /// Netlink filters on the clsact qdisc, even where tcx works.
    Clsact,
}

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

/// Loads and attaches the tc programs to every device in `devices` (ingress and egress). Returns how each device
/// got them: `tcx`, or `clsact` when either direction went through the qdisc.
pub fn attach_tc_programs(
    ebpf: &mut Ebpf,
    devices: &[String],
    pins: &PinDir,
    mode: TcAttachMode,
) -> anyhow::Result<Vec<(String, &'static str)>> {
    // A device dropped from `--devices` (or all of them, `--devices none`) must stop translating, not keep the
    // previous agent's programs until `lb-agent cleanup`.
    detach_from_other_devices(pins, devices)?;
    if devices.is_empty() {
        tracing::info!("no external devices: the per-packet programs are not attached");
        return Ok(Vec::new());
    }
    load_tc_programs(ebpf)?;
    let mut attached = Vec::new();
    let link_dir = pins.links();
    fs::create_dir_all(&link_dir).with_context(|| format!("creating {}", link_dir.display()))?;
    for dev in devices {
        let mut how = "tcx";
        for (name, attach_type, tag) in [
            (prog_names::TC_INGRESS, TcAttachType::Ingress, "in"),
            (prog_names::TC_EGRESS, TcAttachType::Egress, "eg"),
        ] {
            let prog: &mut SchedClassifier = ebpf
                .program_mut(name)
                .with_context(|| format!("program {name} missing"))?
                .try_into()
                .with_context(|| format!("program {name} is not a tc classifier"))?;
            let pin_dev = super::pins::device_pin_name(dev);
            let pin = link_dir.join(format!("tc-{tag}-{pin_dev}"));
            // None: not tried (`--tc-attach clsact`).
            let tcx = (mode != TcAttachMode::Clsact).then(|| {
                prog.attach_with_options(
                    dev,
                    attach_type,
                    TcAttachOptions::TcxOrder(LinkOrder::default()),
                )
            });
            match tcx {
                Some(Ok(id)) => {
                    let link: FdLink = prog
                        .take_link(id)
                        .with_context(|| format!("taking the tcx link of {name} on {dev}"))?
                        .try_into()
                        .with_context(|| {
                            format!("the tcx link of {name} on {dev} is not a bpf_link")
                        })?;
                    // bpffs refuses names with a dot (EPERM), hence ':new'.
                    let fresh = link_dir.join(format!("tc-{tag}-{pin_dev}:new"));
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
                Some(Err(e)) if mode == TcAttachMode::Tcx => {
                    return Err(e).with_context(|| {
                        format!("attaching {name} to {dev} with tcx (--tc-attach tcx)")
                    });
                }
                failed => {
                    how = "clsact";
                    match failed {
                        Some(Err(e)) => {
                            tracing::warn!(device = %dev, program = name, error = %e, "tcx attach failed; falling back to the clsact qdisc (netlink)");
                        }
                        _ => {
                            tracing::info!(device = %dev, program = name, "attaching with the clsact qdisc (netlink), as --tc-attach clsact asks");
                        }
                    }
                    // EEXIST: the qdisc is there already (a previous agent).
                    let _ = tc::qdisc_add_clsact(dev);
                    // A previous agent's filter of this program would stay in front of the new one (each attach
                    // adds a filter at a new priority): replace it. Its tcx link, if any, goes with the pin.
                    let _ = tc::qdisc_detach_program(dev, attach_type, name);
                    if pin.exists() {
                        fs::remove_file(&pin).with_context(|| {
                            format!("removing the previous link {}", pin.display())
                        })?;
                    }
                    let id = prog
                        .attach_with_options(
                            dev,
                            attach_type,
                            TcAttachOptions::Netlink(Default::default()),
                        )
                        .with_context(|| format!("attaching {name} to {dev} with clsact"))?;
                    // A netlink filter outlives the process only if its link is not dropped (which detaches).
                    let link = prog.take_link(id)?;
                    #[expect(
                        clippy::mem_forget,
                        reason = "dropping the link would detach the filter this agent leaves in place"
                    )]
                    std::mem::forget(link);
                }
            }
        }
        tracing::info!(device = %dev, "tc programs attached (ingress and egress)");
        attached.push((dev.clone(), how));
    }
    Ok(attached)
}

/// Removes what a previous agent attached to interfaces that are not in `devices`: its pinned tcx links (unpinning
/// a link no process holds detaches it) and lb's clsact filters. Returns the interfaces it detached from.
pub fn detach_from_other_devices(pins: &PinDir, devices: &[String]) -> anyhow::Result<Vec<String>> {
    let mut detached = Vec::new();
    let link_dir = pins.links();
    if link_dir.exists() {
        let keep: Vec<String> = devices
            .iter()
            .flat_map(|d| {
                let d = super::pins::device_pin_name(d);
                [format!("tc-in-{d}"), format!("tc-eg-{d}")]
            })
            .collect();
        for entry in
            fs::read_dir(&link_dir).with_context(|| format!("reading {}", link_dir.display()))?
        {
            let entry = entry.with_context(|| format!("reading {}", link_dir.display()))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(dev) = name
                .strip_prefix("tc-in-")
                .or_else(|| name.strip_prefix("tc-eg-"))
            else {
                continue;
            };
            if keep.contains(&name) {
                continue;
            }
            fs::remove_file(entry.path())
                .with_context(|| format!("removing {}", entry.path().display()))?;
            tracing::info!(pin = %name, "device no longer in --devices: removed its pinned tc link");
            let dev = dev.trim_end_matches(":new").replace(':', ".");
            if !detached.contains(&dev) {
                detached.push(dev);
            }
        }
    }
    for dev in interface_names() {
        if devices.contains(&dev) {
            continue;
        }
        for (name, attach_type) in [
            (prog_names::TC_INGRESS, TcAttachType::Ingress),
            (prog_names::TC_EGRESS, TcAttachType::Egress),
        ] {
            if tc::qdisc_detach_program(&dev, attach_type, name).is_ok() {
                tracing::info!(device = %dev, program = name, "device no longer in --devices: removed its clsact filter");
                if !detached.contains(&dev) {
                    detached.push(dev.clone());
                }
            }
        }
    }
    Ok(detached)
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

/// Removes the clsact filters of lb's tc programs from every interface of this network namespace; returns
/// `<program> on <interface>` for each interface that had one. For `lb-agent cleanup`.
pub fn detach_clsact_filters() -> Vec<String> {
    let mut removed = Vec::new();
    for dev in interface_names() {
        for (name, attach_type) in [
            (prog_names::TC_INGRESS, TcAttachType::Ingress),
            (prog_names::TC_EGRESS, TcAttachType::Egress),
        ] {
            // NotFound (no such filter) and "no clsact qdisc" alike mean nothing to remove.
            if tc::qdisc_detach_program(&dev, attach_type, name).is_ok() {
                removed.push(format!("{name} on {dev}"));
            }
        }
    }
    removed
}

/// Every interface of this network namespace (if_nameindex asks the kernel through the current namespace, unlike
/// /sys/class/net, which shows the namespace sysfs was mounted in).
fn interface_names() -> Vec<String> {
    let mut out = Vec::new();
    // SAFETY: if_nameindex has no preconditions; a null result means failure.
    let list = unsafe { libc::if_nameindex() };
    if list.is_null() {
        return out;
    }
    let mut i = 0;
    loop {
        // SAFETY: the array ends with an entry whose index is 0; we stop there.
        let entry = unsafe { &*list.add(i) };
        if entry.if_index == 0 || entry.if_name.is_null() {
            break;
        }
        // SAFETY: if_name is a NUL-terminated string owned by the list, alive until if_freenameindex.
        let name = unsafe { std::ffi::CStr::from_ptr(entry.if_name) };
        out.push(name.to_string_lossy().into_owned());
        i += 1;
    }
    // SAFETY: list came from if_nameindex and is freed once.
    unsafe { libc::if_freenameindex(list) };
    out
}
