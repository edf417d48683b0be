//! A pin directory on bpffs, for the maps and links a test's agent pins.

use std::ffi::CString;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use anyhow::{Context, Result, bail};

use crate::mounts_of_type;

/// Where bpffs is expected, by convention (the agent pins under it too).
pub const BPFFS: &str = "/sys/fs/bpf";

/// A directory under /sys/fs/bpf, removed recursively on drop. Removing a pinned link detaches its program unless
/// something else still holds the link; removing a pinned map frees it once no program uses it.
#[derive(Debug)]
pub struct BpfDir {
    path: PathBuf,
}

impl BpfDir {
    /// Mounts bpffs at /sys/fs/bpf if it is not mounted (bare machines have none) and creates `/sys/fs/bpf/<name>`.
    pub fn new(name: &str) -> Result<BpfDir> {
        ensure_bpffs()?;
        let path = Path::new(BPFFS).join(name);
        std::fs::create_dir(&path)
            .with_context(|| format!("cannot create pin directory {}", path.display()))?;
        Ok(BpfDir { path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `<dir>/<name>`, for a pin path.
    pub fn join(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }
}

impl Drop for BpfDir {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.path)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            eprintln!(
                "lb-tests: cannot remove pin directory {}: {e}",
                self.path.display()
            );
        }
    }
}

/// Mounts bpffs at /sys/fs/bpf unless a bpf filesystem is already mounted there.
pub fn ensure_bpffs() -> Result<()> {
    // Serialized so that two tests of one binary do not stack two mounts (the second would hide pins made in the
    // first). Separate test binaries run one after the other under `cargo test`.
    static MOUNTING: Mutex<()> = Mutex::new(());
    let _guard = MOUNTING
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    if mounts_of_type("bpf")?.iter().any(|dir| dir == BPFFS) {
        return Ok(());
    }
    let (source, target, fstype) = (c"bpf", CString::new(BPFFS)?, c"bpf");
    // SAFETY: all pointers are NUL-terminated strings that outlive the call; bpffs takes no data argument.
    let rc = unsafe {
        libc::mount(
            source.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        bail!(
            "cannot mount bpffs at {BPFFS}: {}",
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}
