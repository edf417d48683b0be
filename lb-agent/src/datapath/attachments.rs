//! What the pinned links say is attached, read from the pins alone (for `lb-agent status` with or without an
//! agent): the socket-LB programs and their cgroup, the tc programs per device (tcx links), and XDP per device with
//! its mode. Each link is asked for its `bpf_link_info`, so a link whose device is gone (the kernel leaves such a
//! tcx or XDP link defunct, `ifindex` 0) is told from a live one. clsact filters are not pinned and do not show
//! here; a running agent reports them.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use lb_common::prog_names;
use serde::{Deserialize, Serialize};

/// A socket-LB program's link.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SockLink {
    pub program: String,
    /// The cgroup v2 id the link attaches to (its directory's inode number).
    pub cgroup_id: u64,
    /// The cgroup's directory, when it was found under the cgroup v2 mount.
    pub cgroup: Option<String>,
}

/// A tc or XDP link on one device.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceLink {
    /// The device as the pin names it.
    pub device: String,
    /// `ingress` / `egress` for tc, `native` / `generic` for XDP.
    pub kind: String,
    /// The device's ifindex the kernel reports; 0: the device is gone and the link defunct.
    pub ifindex: u32,
}

/// Every link pinned under `<pins>/links`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attachments {
    pub sock: Vec<SockLink>,
    pub tc: Vec<DeviceLink>,
    pub xdp: Vec<DeviceLink>,
    /// Pins that could not be read as links (name, error).
    pub unreadable: Vec<(String, String)>,
}

const BPF_OBJ_GET: libc::c_long = 7;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;

/// `union bpf_attr` for `BPF_OBJ_GET`.
#[repr(C)]
#[derive(Default)]
struct ObjGetAttr {
    pathname: u64,
    bpf_fd: u32,
    file_flags: u32,
    path_fd: i32,
    _pad: u32,
}

/// `union bpf_attr` for `BPF_OBJ_GET_INFO_BY_FD`.
#[repr(C)]
#[derive(Default)]
struct InfoAttr {
    bpf_fd: u32,
    info_len: u32,
    info: u64,
}

/// The start of `struct bpf_link_info` (type, id, prog_id) and its union, which the fields used here read at fixed
/// offsets: `cgroup.cgroup_id` (u64), `tcx.ifindex` / `xdp.ifindex` (u32).
#[repr(C, align(8))]
struct LinkInfo {
    type_: u32,
    id: u32,
    prog_id: u32,
    _pad: u32,
    union: [u8; 112],
}

fn sys_bpf<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<libc::c_long> {
    // SAFETY: `attr` is an exclusively borrowed `#[repr(C)]` prefix of `union bpf_attr` for `cmd` with its size
    // passed; the pointers in it (a path string, an info buffer of `info_len` bytes) outlive the call.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *mut T as *mut libc::c_void,
            std::mem::size_of::<T>() as libc::c_uint,
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// The id of the program a pinned link attaches (`bpf_link_info.prog_id`): what the bench reads `lb_connect4`'s
/// run-time statistics by.
pub fn link_prog_id(path: &Path) -> io::Result<u32> {
    link_info(path).map(|info| info.prog_id)
}

/// Opens a pinned link and reads its `bpf_link_info`.
fn link_info(path: &Path) -> io::Result<LinkInfo> {
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let mut get = ObjGetAttr {
        pathname: c.as_ptr() as u64,
        ..ObjGetAttr::default()
    };
    let fd = sys_bpf(BPF_OBJ_GET, &mut get)?;
    // SAFETY: BPF_OBJ_GET returned a new file descriptor that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    let mut info = LinkInfo {
        type_: 0,
        id: 0,
        prog_id: 0,
        _pad: 0,
        union: [0; 112],
    };
    let mut attr = InfoAttr {
        bpf_fd: fd.as_raw_fd() as u32,
        info_len: std::mem::size_of::<LinkInfo>() as u32,
        info: &mut info as *mut LinkInfo as u64,
    };
    sys_bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr)?;
    Ok(info)
}

fn u32_at(b: &[u8; 112], at: usize) -> u32 {
    u32::from_ne_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn u64_at(b: &[u8; 112], at: usize) -> u64 {
    let mut x = [0u8; 8];
    x.copy_from_slice(&b[at..at + 8]);
    u64::from_ne_bytes(x)
}

/// The directory of cgroup `id` under the cgroup v2 mount (a cgroup's id is its directory's inode number).
fn cgroup_path(root: &Path, id: u64) -> Option<PathBuf> {
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        if std::fs::metadata(&dir).is_ok_and(|m| m.ino() == id) {
            return Some(dir);
        }
        if let Ok(entries) = std::fs::read_dir(&dir) {
            stack.extend(
                entries
                    .filter_map(Result::ok)
                    .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                    .map(|e| e.path()),
            );
        }
    }
    None
}

/// Reads every link pinned under `<pins>/links`.
pub fn read(pins: &Path) -> Attachments {
    let mut out = Attachments::default();
    let Ok(entries) = std::fs::read_dir(pins.join("links")) else {
        return out;
    };
    let mut names: Vec<String> = entries
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        // A link being swapped in by a starting agent.
        .filter(|n| !n.ends_with(":new"))
        .collect();
    names.sort();
    let cgroup_root = super::loader::cgroup2_root().ok();
    for name in names {
        let info = match link_info(&pins.join("links").join(&name)) {
            Ok(i) => i,
            Err(e) => {
                out.unreadable.push((name, e.to_string()));
                continue;
            }
        };
        if prog_names::SOCK_ALL.contains(&name.as_str()) {
            let cgroup_id = u64_at(&info.union, 0);
            out.sock.push(SockLink {
                program: name,
                cgroup_id,
                cgroup: cgroup_root
                    .as_deref()
                    .and_then(|r| cgroup_path(r, cgroup_id))
                    .map(|p| p.display().to_string()),
            });
            continue;
        }
        let device = |rest: &str| rest.replace(':', ".");
        let ifindex = u32_at(&info.union, 0);
        let link = match name.split_once('-') {
            Some(("tc", rest)) => rest.split_once('-').map(|(dir, dev)| {
                let kind = if dir == "in" { "ingress" } else { "egress" };
                (false, kind, device(dev))
            }),
            Some(("xdp", rest)) => rest.split_once('-').map(|(mode, dev)| {
                let kind = if mode == "drv" { "native" } else { "generic" };
                (true, kind, device(dev))
            }),
            _ => None,
        };
        match link {
            Some((xdp, kind, device)) => {
                let l = DeviceLink {
                    device,
                    kind: kind.to_owned(),
                    ifindex,
                };
                if xdp { out.xdp.push(l) } else { out.tc.push(l) }
            }
            None => out.unreadable.push((name, "not a link lb pins".to_owned())),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_info_layout_matches_the_kernels() {
        // `struct bpf_link_info`: three u32 then a union aligned to 8 (it holds u64s).
        assert_eq!(std::mem::offset_of!(LinkInfo, union), 16);
        assert_eq!(std::mem::size_of::<ObjGetAttr>(), 24);
    }

    #[test]
    fn without_pins_nothing_is_attached() {
        assert_eq!(read(Path::new("/nonexistent/lb")), Attachments::default());
    }
}
