//! Attaches the XDP fast path (`lb_xdp`, `--xdp`) to the same interfaces as the tc programs, through pinned
//! bpf_links `links/xdp-{drv,skb}-<ifname>` (the mode is in the name, so a restart knows what is attached).
//!
//! An interface holds one XDP program per mode and never a native and a generic one at once, so unlike the tc
//! links a new link cannot be attached next to the old one. A restart therefore swaps the program inside the pinned
//! link (`bpf_link_update`, atomic: no packet sees no program) when its mode is acceptable; otherwise the old link
//! is unpinned (which detaches it) and a new one attached. XDP is only an accelerator in front of tc, so the short
//! gap that leaves costs speed, never correctness. Without `--xdp`, pinned XDP links are removed. `lb-agent
//! cleanup` removes them with every other link.

use std::fs;
use std::path::Path;

use anyhow::Context;
use aya::Ebpf;
use aya::programs::links::{FdLink, PinnedLink};
use aya::programs::xdp::XdpLink;
use aya::programs::{Xdp, XdpMode};
use lb_common::prog_names;

use super::loader::PinDir;

/// `--xdp-mode`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum XdpModeChoice {
    /// Native (driver) mode where the driver supports it, generic (SKB) mode otherwise; the log says which.
    Auto,
    /// Native (driver) mode only: the agent fails if the driver has no XDP support.
    Native,
    /// Generic (SKB) mode: works on every interface, after the kernel has built the socket buffer.
    Generic,
}

impl XdpModeChoice {
    /// The modes to try, in order.
    fn modes(self) -> &'static [XdpMode] {
        match self {
            Self::Auto => &[XdpMode::Driver, XdpMode::Skb],
            Self::Native => &[XdpMode::Driver],
            Self::Generic => &[XdpMode::Skb],
        }
    }
}

/// The pin name's mode tag, and the name the log uses.
fn tag(mode: XdpMode) -> (&'static str, &'static str) {
    match mode {
        XdpMode::Driver => ("drv", "native"),
        _ => ("skb", "generic"),
    }
}

const PIN_PREFIX: &str = "xdp-";

fn pin_name(mode: XdpMode, dev: &str) -> String {
    format!(
        "{PIN_PREFIX}{}-{}",
        tag(mode).0,
        super::pins::device_pin_name(dev)
    )
}

/// Attaches `lb_xdp` to every device in `devices` in the chosen mode, replacing what a previous agent pinned.
/// Returns the mode that took effect per device.
pub fn attach_xdp(
    ebpf: &mut Ebpf,
    devices: &[String],
    choice: XdpModeChoice,
    pins: &PinDir,
) -> anyhow::Result<Vec<(String, &'static str)>> {
    let link_dir = pins.links();
    fs::create_dir_all(&link_dir).with_context(|| format!("creating {}", link_dir.display()))?;
    let name = prog_names::XDP;
    let prog: &mut Xdp = ebpf
        .program_mut(name)
        .with_context(|| format!("program {name} missing from the object"))?
        .try_into()
        .with_context(|| format!("program {name} is not an XDP program"))?;
    prog.load()
        .with_context(|| format!("loading {name} (verifier)"))?;
    // Links of devices no longer in the list go.
    for pin in xdp_pins(&link_dir)? {
        let keep = devices
            .iter()
            .any(|d| pin_for_device(&pin, d, &[XdpMode::Driver, XdpMode::Skb]));
        if !keep {
            remove_pin(&link_dir.join(&pin))?;
        }
    }
    let mut out = Vec::new();
    for dev in devices {
        let mode = attach_one(prog, dev, choice, &link_dir)?;
        tracing::info!(device = %dev, mode = tag(mode).1, "XDP fast path attached");
        out.push((dev.clone(), tag(mode).1));
    }
    Ok(out)
}

fn attach_one(
    prog: &mut Xdp,
    dev: &str,
    choice: XdpModeChoice,
    link_dir: &Path,
) -> anyhow::Result<XdpMode> {
    let name = prog_names::XDP;
    // A link a previous agent pinned in an acceptable mode: swap the program inside it.
    for &mode in choice.modes() {
        let pin = link_dir.join(pin_name(mode, dev));
        if !pin.exists() {
            continue;
        }
        match replace_in_pinned(prog, &pin) {
            Ok(()) => return Ok(mode),
            Err(e) => {
                tracing::warn!(device = %dev, error = %format!("{e:#}"), "the pinned XDP link could not take the new program; attaching a new link");
                remove_pin(&pin)?;
            }
        }
    }
    // Links in the other mode would make the kernel refuse the new one (EEXIST: native and generic at once).
    for mode in [XdpMode::Driver, XdpMode::Skb] {
        let pin = link_dir.join(pin_name(mode, dev));
        if pin.exists() {
            remove_pin(&pin)?;
        }
    }
    let mut last_error = None;
    for &mode in choice.modes() {
        match prog.attach(dev, mode) {
            Ok(id) => {
                let link = prog
                    .take_link(id)
                    .with_context(|| format!("taking the XDP link on {dev}"))?;
                let link: FdLink = link.try_into().with_context(|| {
                    format!("XDP on {dev} was attached without a bpf_link (kernel < 5.9?)")
                })?;
                let pin = link_dir.join(pin_name(mode, dev));
                drop(
                    link.pin(&pin)
                        .with_context(|| format!("pinning the XDP link of {name} on {dev}"))?,
                );
                return Ok(mode);
            }
            Err(e) => {
                tracing::info!(device = %dev, mode = tag(mode).1, error = %e, "XDP attach refused in this mode");
                last_error = Some(e);
            }
        }
    }
    Err(anyhow::anyhow!(
        "attaching {name} to {dev} ({choice:?} mode): {}",
        last_error.map(|e| e.to_string()).unwrap_or_default()
    ))
}

/// Swaps `prog` into the pinned XDP link at `pin` (bpf_link_update: atomic).
fn replace_in_pinned(prog: &mut Xdp, pin: &Path) -> anyhow::Result<()> {
    let pinned = PinnedLink::from_pin(pin).with_context(|| format!("opening {}", pin.display()))?;
    let link = XdpLink::try_from(FdLink::from(pinned))
        .with_context(|| format!("{} is not an XDP link", pin.display()))?;
    let id = prog
        .attach_to_link(link)
        .context("bpf_link_update of the pinned XDP link")?;
    // The pin keeps the link; this process's handle only closes its descriptor when dropped.
    let _ = prog.take_link(id);
    Ok(())
}

fn pin_for_device(pin: &str, dev: &str, modes: &[XdpMode]) -> bool {
    modes.iter().any(|&m| pin == pin_name(m, dev))
}

/// The XDP link pins under `link_dir`.
fn xdp_pins(link_dir: &Path) -> anyhow::Result<Vec<String>> {
    let mut out = Vec::new();
    if !link_dir.exists() {
        return Ok(out);
    }
    for entry in
        fs::read_dir(link_dir).with_context(|| format!("reading {}", link_dir.display()))?
    {
        let name = entry?.file_name().to_string_lossy().into_owned();
        if name.starts_with(PIN_PREFIX) {
            out.push(name);
        }
    }
    Ok(out)
}

/// Unpinning an XDP bpf_link that no process holds detaches it.
fn remove_pin(pin: &Path) -> anyhow::Result<()> {
    fs::remove_file(pin).with_context(|| format!("removing {}", pin.display()))?;
    tracing::info!(pin = %pin.display(), "removed a pinned XDP link");
    Ok(())
}

/// Without `--xdp`: removes every XDP link a previous agent pinned (detaching it). Returns how many.
pub fn detach_xdp(pins: &PinDir) -> anyhow::Result<usize> {
    let link_dir = pins.links();
    let found = xdp_pins(&link_dir)?;
    for pin in &found {
        remove_pin(&link_dir.join(pin))?;
    }
    Ok(found.len())
}
