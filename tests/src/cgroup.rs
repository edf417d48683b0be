//! A child cgroup of the cgroup v2 hierarchy, for attaching cgroup/sock_addr programs to the client processes only.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::mounts_of_type;

/// A directory under the cgroup2 mount. Drop kills whatever is still inside, waits for it to leave, and removes
/// the directory.
#[derive(Debug)]
pub struct Cgroup {
    path: PathBuf,
}

impl Cgroup {
    /// Creates `<cgroup2 mount>/<name>`. The mount is looked up in /proc/mounts: it is not /sys/fs/cgroup on every
    /// machine (here /sys/fs/cgroup/unified, under a v1 tmpfs).
    pub fn new(name: &str) -> Result<Cgroup> {
        let root = Self::root()?;
        let path = root.join(name);
        std::fs::create_dir(&path)
            .with_context(|| format!("cannot create cgroup {}", path.display()))?;
        Ok(Cgroup { path })
    }

    /// The cgroup2 mount point (the first one in /proc/mounts).
    pub fn root() -> Result<PathBuf> {
        match mounts_of_type("cgroup2")?.into_iter().next() {
            Some(dir) => Ok(PathBuf::from(dir)),
            None => bail!("no cgroup2 mount in /proc/mounts"),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `<path>/cgroup.procs`: write a pid there to move that process in.
    pub fn procs_path(&self) -> PathBuf {
        self.path.join("cgroup.procs")
    }

    /// Opens the cgroup directory, e.g. to attach a program to it.
    pub fn open(&self) -> Result<File> {
        File::open(&self.path).with_context(|| format!("cannot open {}", self.path.display()))
    }

    /// Moves a running process into the cgroup. Prefer [`crate::Cmd::cgroup`], which does it before exec.
    pub fn add_pid(&self, pid: u32) -> Result<()> {
        std::fs::write(self.procs_path(), pid.to_string())
            .with_context(|| format!("cannot add pid {pid} to {}", self.path.display()))
    }

    /// The pids currently in the cgroup (not in its descendants).
    pub fn pids(&self) -> Result<Vec<u32>> {
        let text = std::fs::read_to_string(self.procs_path())
            .with_context(|| format!("cannot read {}", self.procs_path().display()))?;
        Ok(text.lines().filter_map(|l| l.trim().parse().ok()).collect())
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(5);
        if let Err(e) = remove_tree(&self.path, deadline) {
            eprintln!(
                "lb-tests: cannot remove cgroup {}: {e}",
                self.path.display()
            );
        }
    }
}

/// Kills every process in the cgroup at `path` and its descendants, then removes them, deepest first.
fn remove_tree(path: &Path, deadline: Instant) -> std::io::Result<()> {
    // cgroup.kill (Linux 5.14) kills the whole subtree at once, including processes forking meanwhile.
    let _ = std::fs::write(path.join("cgroup.kill"), "1");
    let children = match std::fs::read_dir(path) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    // A test (or the program under test) may have made child cgroups; rmdir fails while any exists.
    for entry in children.flatten() {
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            remove_tree(&entry.path(), deadline)?;
        }
    }
    // rmdir fails with EBUSY while a process is inside, and a killed process takes a moment to exit, so kill
    // (again, for kernels without cgroup.kill) and retry until the deadline. Exited but unreaped processes no
    // longer count as members in cgroup v2, so this does not wait for their parents.
    loop {
        let procs = std::fs::read_to_string(path.join("cgroup.procs")).unwrap_or_default();
        for pid in procs
            .lines()
            .filter_map(|l| l.trim().parse::<libc::pid_t>().ok())
        {
            // SAFETY: kill has no memory-safety preconditions; the pid was just read from cgroup.procs.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        match std::fs::remove_dir(path) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) if Instant::now() >= deadline => return Err(e),
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}
