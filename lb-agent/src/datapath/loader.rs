//! Loads lb's object with every map pinned under one directory, and attaches the socket-LB programs to a cgroup
//! through pinned bpf_links, so the datapath outlives the agent (a `kill -9` or an upgrade leaves it in place).

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use aya::programs::links::FdLink;
use aya::programs::{CgroupAttachMode, CgroupSockAddr};
use aya::{Ebpf, EbpfLoader};
use lb_common::{map_names, prog_names};

use super::maps::PinnedMaps;
use super::pins::{self, Capacities};

/// The object built by `cargo xtask build-ebpf`, when it existed at build time.
#[cfg(lb_embedded_ebpf)]
static EMBEDDED: Option<&[u8]> = Some(aya::include_bytes_aligned!(env!("LB_EBPF_OBJECT")));
#[cfg(not(lb_embedded_ebpf))]
static EMBEDDED: Option<&[u8]> = None;

/// Where the pins live: maps directly in `dir`, links in `dir/links`.
#[derive(Clone, Debug)]
pub struct PinDir {
    pub dir: PathBuf,
}

impl PinDir {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    pub fn links(&self) -> PathBuf {
        self.dir.join("links")
    }

    pub fn map(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
}

/// Reads the object to load: `--bpf-object` if given, else the embedded one.
pub fn object_bytes(path: Option<&Path>) -> anyhow::Result<Vec<u8>> {
    match (path, EMBEDDED) {
        (Some(p), _) => fs::read(p).with_context(|| format!("reading eBPF object {}", p.display())),
        (None, Some(bytes)) => Ok(bytes.to_vec()),
        (None, None) => bail!(
            "this lb-agent was built without the eBPF object: run `cargo xtask build-ebpf --release` and rebuild, or \
             pass --bpf-object <path>"
        ),
    }
}

/// Mounts bpffs at /sys/fs/bpf when nothing is mounted there (bare machines, some container setups), as Cilium's
/// agent does; without it no pin survives the process.
pub fn ensure_bpffs(pin_dir: &Path) -> anyhow::Result<()> {
    let root = Path::new("/sys/fs/bpf");
    if pin_dir.starts_with(root) && !is_bpffs(root) {
        tracing::info!("mounting bpffs at /sys/fs/bpf");
        fs::create_dir_all(root).context("creating /sys/fs/bpf")?;
        let status = std::process::Command::new("mount")
            .args(["-t", "bpf", "bpf", "/sys/fs/bpf"])
            .status()
            .context("running mount")?;
        if !status.success() {
            bail!("mounting bpffs at /sys/fs/bpf failed ({status})");
        }
    }
    Ok(())
}

fn is_bpffs(path: &Path) -> bool {
    let Ok(mounts) = fs::read_to_string("/proc/mounts") else {
        return false;
    };
    mounts.lines().any(|l| {
        let mut f = l.split_whitespace();
        f.next();
        f.next() == Some(path.to_string_lossy().as_ref()) && f.next() == Some("bpf")
    })
}

/// A loaded datapath: the object (programs) and its pinned maps.
pub struct Datapath {
    pub ebpf: Ebpf,
    pub maps: PinnedMaps,
    /// Pins moved aside because they no longer matched; commit once the new maps are filled.
    pub migration: pins::Migration,
}

/// Loads the object, reusing matching pins and migrating the rest.
pub fn load(object: &[u8], pins: &PinDir, caps: &Capacities) -> anyhow::Result<Datapath> {
    ensure_bpffs(&pins.dir)?;
    fs::create_dir_all(&pins.dir)
        .with_context(|| format!("creating pin directory {}", pins.dir.display()))?;
    let specs = caps.specs();
    let migration = pins::prepare(&pins.dir, &specs)?;
    let mut loader = EbpfLoader::new();
    for spec in &specs {
        loader.map_max_entries(spec.name, spec.max_entries);
        loader.map_pin_path(spec.name, pins.map(spec.name));
    }
    let mut ebpf = match loader.load(object) {
        Ok(ebpf) => ebpf,
        Err(e) => {
            migration.revert();
            return Err(e).context("loading the eBPF object");
        }
    };
    let maps = match PinnedMaps::from_ebpf(&mut ebpf, &pins.dir) {
        Ok(m) => m,
        Err(e) => {
            migration.revert();
            return Err(e).context("opening the loaded maps");
        }
    };
    Ok(Datapath {
        ebpf,
        maps,
        migration,
    })
}

/// Attaches the socket-LB programs to `cgroup` and pins each link as `links/<program>`. A link pinned by a
/// previous agent is replaced only after the new one is attached, so there is no moment without socket LB (both
/// run for an instant; the second sees an already translated address and leaves it alone).
pub fn attach_sock_programs(ebpf: &mut Ebpf, cgroup: &Path, pins: &PinDir) -> anyhow::Result<()> {
    let link_dir = pins.links();
    fs::create_dir_all(&link_dir).with_context(|| format!("creating {}", link_dir.display()))?;
    let cgroup_fd = fs::File::open(cgroup).with_context(|| {
        format!(
            "opening cgroup {} (a cgroup v2 directory)",
            cgroup.display()
        )
    })?;
    for name in prog_names::SOCK_ALL {
        let prog: &mut CgroupSockAddr = ebpf
            .program_mut(name)
            .with_context(|| format!("program {name} missing from the object"))?
            .try_into()
            .with_context(|| format!("program {name} is not a cgroup sock_addr program"))?;
        prog.load()
            .with_context(|| format!("loading {name} (verifier)"))?;
        // Cgroup bpf_links take no attach flags (the kernel answers EINVAL) and always coexist with other programs,
        // as BPF_F_ALLOW_MULTI would; `Single` is the mode that passes flags 0.
        let id = prog
            .attach(&cgroup_fd, CgroupAttachMode::Single)
            .with_context(|| format!("attaching {name} to {}", cgroup.display()))?;
        let link: FdLink = prog
            .take_link(id)
            .with_context(|| format!("taking the link of {name}"))?
            .try_into()
            .with_context(|| format!("{name} was attached without a bpf_link (kernel < 5.7?)"))?;
        let pin = link_dir.join(name);
        // bpffs refuses names with a dot (EPERM), hence ':new'.
        let fresh = link_dir.join(format!("{name}:new"));
        let _ = fs::remove_file(&fresh);
        // The pin keeps the link (and the program) alive after the agent exits; the returned handle may drop.
        drop(
            link.pin(&fresh)
                .with_context(|| format!("pinning the link of {name}"))?,
        );
        if pin.exists() {
            fs::remove_file(&pin)
                .with_context(|| format!("removing the previous link {}", pin.display()))?;
        }
        fs::rename(&fresh, &pin)
            .with_context(|| format!("renaming {} to {}", fresh.display(), pin.display()))?;
    }
    Ok(())
}

/// Removes every link and map lb pinned under `pins` (like kube-proxy `--cleanup`): unpinning a link detaches its
/// program, and maps go once nothing references them.
pub fn cleanup(pins: &PinDir) -> anyhow::Result<Vec<PathBuf>> {
    let mut removed = Vec::new();
    let link_dir = pins.links();
    if link_dir.exists() {
        for entry in
            fs::read_dir(&link_dir).with_context(|| format!("reading {}", link_dir.display()))?
        {
            let path = entry?.path();
            fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
            removed.push(path);
        }
        fs::remove_dir(&link_dir).with_context(|| format!("removing {}", link_dir.display()))?;
    }
    for name in map_names::ALL.iter().chain(&map_names::AGENT_CREATED) {
        for path in [
            pins.map(name),
            pins.dir.join(format!("{name}:pending")),
            pins.dir.join(format!("{name}:next")),
        ] {
            if path.exists() {
                fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
                removed.push(path);
            }
        }
    }
    if pins.dir.exists()
        && fs::read_dir(&pins.dir)
            .map(|mut d| d.next().is_none())
            .unwrap_or(false)
    {
        fs::remove_dir(&pins.dir).with_context(|| format!("removing {}", pins.dir.display()))?;
    }
    Ok(removed)
}

/// The cgroup v2 mount point (not always /sys/fs/cgroup: on hybrid hosts it is /sys/fs/cgroup/unified).
pub fn cgroup2_root() -> anyhow::Result<PathBuf> {
    let mounts = fs::read_to_string("/proc/mounts").context("reading /proc/mounts")?;
    mounts
        .lines()
        .find_map(|l| {
            let mut f = l.split_whitespace();
            let (_, dir, ty) = (f.next()?, f.next()?, f.next()?);
            (ty == "cgroup2").then(|| PathBuf::from(dir))
        })
        .context("no cgroup2 filesystem is mounted (lb needs cgroup v2 for socket load balancing)")
}
