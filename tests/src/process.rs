//! Processes started inside a test namespace and cgroup, killed and reaped on drop.

use std::ffi::{CString, OsStr, OsString};
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde::de::DeserializeOwned;

use crate::probe::ProbeLine;
use crate::{Cgroup, NetNs, unique_token};

/// How often waits poll: short enough not to slow tests, long enough not to spin.
const POLL: Duration = Duration::from_millis(5);

/// A command to start in a network namespace and cgroup, both optional.
///
/// The namespace is entered with `setns` after `fork`, not with `ip netns exec`: that also makes a private mount
/// namespace with /sys remounted, which hides /sys/fs/bpf and the cgroup2 mount from the process.
#[derive(Debug, Clone)]
pub struct Cmd {
    program: OsString,
    args: Vec<OsString>,
    envs: Vec<(OsString, OsString)>,
    netns: Option<PathBuf>,
    cgroup_procs: Option<PathBuf>,
    label: Option<String>,
}

impl Cmd {
    pub fn new(program: impl AsRef<OsStr>) -> Cmd {
        Cmd {
            program: program.as_ref().to_owned(),
            args: Vec::new(),
            envs: Vec::new(),
            netns: None,
            cgroup_procs: None,
            label: None,
        }
    }

    pub fn arg(mut self, arg: impl AsRef<OsStr>) -> Cmd {
        self.args.push(arg.as_ref().to_owned());
        self
    }

    pub fn args<I: IntoIterator<Item = S>, S: AsRef<OsStr>>(mut self, args: I) -> Cmd {
        self.args
            .extend(args.into_iter().map(|a| a.as_ref().to_owned()));
        self
    }

    pub fn env(mut self, key: impl AsRef<OsStr>, value: impl AsRef<OsStr>) -> Cmd {
        self.envs
            .push((key.as_ref().to_owned(), value.as_ref().to_owned()));
        self
    }

    /// Runs the process inside this namespace.
    pub fn netns(mut self, ns: &NetNs) -> Cmd {
        self.netns = Some(ns.path());
        self
    }

    /// Runs the process inside the namespace at `path` (a [`NetNs::path`]), when given.
    pub fn netns_path(mut self, path: Option<&Path>) -> Cmd {
        if let Some(p) = path {
            self.netns = Some(p.to_path_buf());
        }
        self
    }

    /// Runs the process inside this cgroup (it joins before exec, so even its first syscall is inside).
    pub fn cgroup(mut self, cgroup: &Cgroup) -> Cmd {
        self.cgroup_procs = Some(cgroup.procs_path());
        self
    }

    /// A name for messages and log files; defaults to the program's file name.
    pub fn label(mut self, label: &str) -> Cmd {
        self.label = Some(label.to_owned());
        self
    }

    fn label_or_program(&self) -> String {
        self.label.clone().unwrap_or_else(|| {
            Path::new(&self.program)
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| "child".to_owned())
        })
    }

    /// Starts the process with stdin from /dev/null and stdout and stderr to files (a pipe nobody reads would
    /// block a long-running server once full).
    ///
    /// The process gets SIGKILL when the thread that spawned it exits (PR_SET_PDEATHSIG), so that nothing outlives
    /// a test process that dies without unwinding. Keep the [`Child`] on the spawning thread, as tests naturally do.
    pub fn spawn(&self) -> Result<Child> {
        let label = self.label_or_program();
        let base =
            std::env::temp_dir().join(format!("lb-tests-{}-{}", unique_token(), sanitize(&label)));
        let stdout_path = base.with_extension("out");
        let stderr_path = base.with_extension("err");
        let stdout = File::create(&stdout_path)
            .with_context(|| format!("cannot create {}", stdout_path.display()))?;
        let stderr = File::create(&stderr_path)
            .with_context(|| format!("cannot create {}", stderr_path.display()))?;

        let mut command = Command::new(&self.program);
        command
            .args(&self.args)
            .envs(self.envs.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr);

        // Opened here, before fork: only async-signal-safe calls are allowed between fork and exec. The file is
        // close-on-exec, and lives until spawn has returned.
        let netns_file = match &self.netns {
            Some(path) => {
                Some(File::open(path).with_context(|| format!("cannot open {}", path.display()))?)
            }
            None => None,
        };
        let netns_fd = netns_file.as_ref().map(|f| f.as_raw_fd());
        let cgroup_procs = match &self.cgroup_procs {
            Some(path) => Some(CString::new(path.as_os_str().as_bytes())?),
            None => None,
        };

        // SAFETY: the closure runs in the child between fork and exec and calls only async-signal-safe functions
        // (open, write, close, getpid, setns, prctl) on data prepared before the fork; it allocates nothing.
        unsafe {
            command.pre_exec(move || {
                // Join before exec so that every socket the program opens is created inside the cgroup: a socket
                // keeps the cgroup it was created in, and cgroup sock_addr programs go by that.
                if let Some(procs) = &cgroup_procs {
                    join_cgroup(procs)?;
                }
                if let Some(fd) = netns_fd
                    && libc::setns(fd, libc::CLONE_NEWNET) != 0
                {
                    return Err(std::io::Error::last_os_error());
                }
                // If the test process dies without running its destructors (abort, SIGKILL), take the child along.
                // This fires when the spawning *thread* exits, which for a test is after its guards have dropped.
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = command
            .spawn()
            .with_context(|| format!("cannot start {label} ({:?})", self.program));
        drop(netns_file);
        let child = match child {
            Ok(child) => child,
            Err(e) => {
                let _ = std::fs::remove_file(&stdout_path);
                let _ = std::fs::remove_file(&stderr_path);
                return Err(e);
            }
        };
        Ok(Child {
            inner: child,
            label,
            stdout_path,
            stderr_path,
            status: None,
        })
    }

    /// Runs the process to completion, failing if it does not exit within `timeout` (it is then killed) or exits
    /// unsuccessfully. Use [`Cmd::output`] to see the output of a failing command instead.
    pub fn run(&self, timeout: Duration) -> Result<Output> {
        let out = self.output(timeout)?;
        if !out.status.success() {
            bail!(
                "{} failed ({}):\nstderr: {}\nstdout: {}",
                self.label_or_program(),
                out.status,
                out.stderr.trim(),
                out.stdout.trim()
            );
        }
        Ok(out)
    }

    /// Runs the process to completion and returns its status and output, whatever the status. Fails only if it
    /// cannot start or does not exit within `timeout` (it is then killed).
    pub fn output(&self, timeout: Duration) -> Result<Output> {
        let mut child = self.spawn()?;
        match child.wait_timeout(timeout)? {
            Some(status) => Ok(Output {
                status,
                stdout: child.stdout(),
                stderr: child.stderr(),
            }),
            None => {
                child.kill();
                bail!(
                    "{} did not exit within {timeout:?}:\nstderr: {}\nstdout: {}",
                    child.label,
                    child.stderr().trim(),
                    child.stdout().trim()
                )
            }
        }
    }
}

/// Writes the calling process's pid to `procs` (a cgroup.procs file). Async-signal-safe: no allocation.
fn join_cgroup(procs: &CString) -> std::io::Result<()> {
    // SAFETY: getpid cannot fail; open, write and close get a valid NUL-terminated path, a live stack buffer with
    // its length, and the fd open returned.
    unsafe {
        let mut buf = [0u8; 16];
        let mut n = libc::getpid() as u32;
        let mut start = buf.len();
        loop {
            start -= 1;
            buf[start] = b'0' + (n % 10) as u8;
            n /= 10;
            if n == 0 {
                break;
            }
        }
        let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let len = buf.len() - start;
        let written = libc::write(fd, buf[start..].as_ptr().cast(), len);
        let err = std::io::Error::last_os_error();
        libc::close(fd);
        if written != len as isize {
            return Err(err);
        }
    }
    Ok(())
}

fn sanitize(label: &str) -> String {
    label
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// A running process. Drop kills it (SIGKILL), reaps it and removes its log files; if the thread is panicking,
/// it first prints the end of its stderr and stdout, which libtest then shows with the failure.
#[derive(Debug)]
pub struct Child {
    inner: std::process::Child,
    label: String,
    stdout_path: PathBuf,
    stderr_path: PathBuf,
    status: Option<ExitStatus>,
}

impl Child {
    pub fn pid(&self) -> u32 {
        self.inner.id()
    }

    pub fn label(&self) -> &str {
        &self.label
    }

    /// Everything the process has written to stdout so far.
    pub fn stdout(&self) -> String {
        std::fs::read(&self.stdout_path)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// Everything the process has written to stderr so far.
    pub fn stderr(&self) -> String {
        std::fs::read(&self.stderr_path)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    pub fn stdout_path(&self) -> &Path {
        &self.stdout_path
    }

    pub fn stderr_path(&self) -> &Path {
        &self.stderr_path
    }

    /// The complete JSON lines of stdout so far, parsed as `T` (a line still being written is left out).
    pub fn stdout_json<T: DeserializeOwned>(&self) -> Result<Vec<T>> {
        let text = self.stdout();
        let complete = match text.rfind('\n') {
            Some(end) => &text[..=end],
            None => "",
        };
        parse_json_lines(complete)
    }

    /// [`Child::stdout_json`] as lb-probe lines.
    pub fn probe_lines(&self) -> Result<Vec<ProbeLine>> {
        self.stdout_json()
    }

    /// Waits until a complete stdout line satisfies `pred` and returns it. Fails at the deadline, or as soon as
    /// the process exits without printing one, with its stderr in the message.
    pub fn wait_for_line(
        &mut self,
        timeout: Duration,
        pred: impl Fn(&str) -> bool,
    ) -> Result<String> {
        let deadline = Instant::now() + timeout;
        loop {
            // Read the status before the output, so that output written just before exiting is not missed.
            let exited = self.try_wait()?;
            let text = self.stdout();
            let complete = text.rfind('\n').map_or("", |end| &text[..end]);
            if let Some(line) = complete.lines().find(|l| pred(l)) {
                return Ok(line.to_owned());
            }
            if let Some(status) = exited {
                bail!(
                    "{} exited ({status}) before the awaited line:\nstderr: {}",
                    self.label,
                    self.stderr().trim()
                );
            }
            if Instant::now() >= deadline {
                bail!(
                    "{} printed no awaited line within {timeout:?}:\nstderr: {}\nstdout: {}",
                    self.label,
                    self.stderr().trim(),
                    text.trim()
                );
            }
            std::thread::sleep(POLL);
        }
    }

    /// The exit status if the process has exited (it is reaped then).
    pub fn try_wait(&mut self) -> Result<Option<ExitStatus>> {
        if self.status.is_none() {
            self.status = self
                .inner
                .try_wait()
                .with_context(|| format!("cannot wait for {}", self.label))?;
        }
        Ok(self.status)
    }

    /// Waits up to `timeout` for the process to exit.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Result<Option<ExitStatus>> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_wait()? {
                return Ok(Some(status));
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
            std::thread::sleep(POLL);
        }
    }

    /// Sends a signal, unless the process has already been reaped (its pid may be reused then).
    pub fn signal(&mut self, signal: libc::c_int) -> Result<()> {
        if self.try_wait()?.is_some() {
            return Ok(());
        }
        // SAFETY: kill has no memory-safety preconditions; the pid is our unreaped child, so it is not reused.
        if unsafe { libc::kill(self.inner.id() as libc::pid_t, signal) } != 0 {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("cannot signal {}", self.label));
        }
        Ok(())
    }

    /// SIGTERM, then SIGKILL if it has not exited after `grace`; returns the exit status.
    pub fn terminate(&mut self, grace: Duration) -> Result<ExitStatus> {
        self.signal(libc::SIGTERM)?;
        if let Some(status) = self.wait_timeout(grace)? {
            return Ok(status);
        }
        self.kill();
        self.status
            .with_context(|| format!("{} did not exit after SIGKILL", self.label))
    }

    /// SIGKILL and reap. Never fails: it runs from Drop too.
    pub fn kill(&mut self) {
        if self.status.is_some() {
            return;
        }
        let _ = self.inner.kill();
        match self.inner.wait() {
            Ok(status) => self.status = Some(status),
            // Cannot happen for our own unreaped child; record something so kill is not retried.
            Err(_) => self.status = Some(ExitStatus::from_raw(libc::SIGKILL)),
        }
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!(
                "--- {} (pid {}, {:?}) stderr (end):\n{}\n--- {} stdout (end):\n{}",
                self.label,
                self.inner.id(),
                self.status,
                tail(&self.stderr(), 4096),
                self.label,
                tail(&self.stdout(), 4096)
            );
        }
        let _ = std::fs::remove_file(&self.stdout_path);
        let _ = std::fs::remove_file(&self.stderr_path);
    }
}

fn tail(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut start = s.len() - max;
    while !s.is_char_boundary(start) {
        start += 1;
    }
    &s[start..]
}

/// What a process run to completion printed.
#[derive(Debug, Clone)]
pub struct Output {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Output {
    /// Each stdout line parsed as JSON `T`.
    pub fn json_lines<T: DeserializeOwned>(&self) -> Result<Vec<T>> {
        parse_json_lines(&self.stdout)
    }

    /// Each stdout line as an lb-probe line.
    pub fn probe_lines(&self) -> Result<Vec<ProbeLine>> {
        self.json_lines()
    }
}

fn parse_json_lines<T: DeserializeOwned>(text: &str) -> Result<Vec<T>> {
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            serde_json::from_str(l)
                .with_context(|| format!("not a JSON line of the expected shape: {l}"))
        })
        .collect()
}
