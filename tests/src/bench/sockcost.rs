//! What the socket LB's `connect()` hook costs per call, with real sockets: cgroup sock_addr programs cannot be run
//! through BPF_PROG_TEST_RUN, so the kernel's own accounting (`bpf_prog_info.run_time_ns / run_cnt`, kept only
//! while run-time statistics are enabled) is read around real connections from the client's cgroup.
//!
//! Two legs, interleaved in rounds (the order alternating) so that drift on a noisy machine falls on both: TCP
//! connections to the measured ClusterIP (a service hit: backend choice and the socket's reverse-NAT record) and
//! to a backend address directly (no service: the hook's lookups miss and it returns). Statistics are enabled with
//! `BPF_ENABLE_STATS`, whose file descriptor is held for these rounds only: the kernel turns them off when it is
//! closed, even if the bench dies, so the 60-80 ns they add to every program run never leaks into other timings.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use anyhow::{Context, Result, bail};
use serde::Serialize;

use super::stats::{Summary, summarize};

#[derive(Debug, Serialize)]
pub struct Connect4Cost {
    pub rounds: usize,
    /// Connections per leg and round (as many as the leg's time allowed; the mean over rounds).
    pub connects_per_leg: f64,
    /// ns per `lb_connect4` run, one value per round: to a ClusterIP.
    pub vip_ns: Summary,
    /// To a non-service address (a backend directly).
    pub plain_ns: Summary,
    /// Per-round ratio vip / plain.
    pub ratio: Summary,
}

/// Runs `rounds` interleaved rounds; `connect(to_vip)` makes one leg's connections from the client's cgroup.
/// `link_pin`: the agent's pinned link of `lb_connect4`, which names the program measured.
pub fn measure(
    link_pin: &Path,
    rounds: usize,
    mut connect: impl FnMut(bool) -> Result<()>,
) -> Result<Connect4Cost> {
    let prog_id = link_prog_id(link_pin)
        .with_context(|| format!("reading the link {}", link_pin.display()))?;
    let stats = aya::sys::enable_stats(aya::sys::Stats::RunTime)
        .context("enabling run-time statistics (BPF_ENABLE_STATS)")?;
    let mut vip = Vec::new();
    let mut plain = Vec::new();
    let mut ratio = Vec::new();
    let mut connects = 0u64;
    for round in 0..rounds {
        let mut leg = |to_vip: bool| -> Result<(f64, u64)> {
            let (t0, n0) = prog_stats(prog_id)?;
            connect(to_vip)?;
            let (t1, n1) = prog_stats(prog_id)?;
            let n = n1.saturating_sub(n0);
            if n == 0 {
                bail!("lb_connect4 did not run (is the client in the agent's cgroup?)");
            }
            Ok((t1.saturating_sub(t0) as f64 / n as f64, n))
        };
        let (v, p, n) = if round % 2 == 0 {
            let (v, nv) = leg(true)?;
            let (p, np) = leg(false)?;
            (v, p, nv + np)
        } else {
            let (p, np) = leg(false)?;
            let (v, nv) = leg(true)?;
            (v, p, nv + np)
        };
        connects += n;
        vip.push(v);
        plain.push(p);
        ratio.push(v / p);
    }
    drop(stats);
    Ok(Connect4Cost {
        rounds,
        connects_per_leg: connects as f64 / (2 * rounds.max(1)) as f64,
        vip_ns: summarize(&mut vip),
        plain_ns: summarize(&mut plain),
        ratio: summarize(&mut ratio),
    })
}

/// The run time (ns) and run count of program `id`.
fn prog_stats(id: u32) -> Result<(u64, u64)> {
    for info in aya::programs::loaded_programs() {
        let info = info.context("listing loaded programs")?;
        if info.id() == id {
            return Ok((info.run_time().as_nanos() as u64, info.run_count()));
        }
    }
    bail!("program {id} is gone")
}

const BPF_OBJ_GET: libc::c_long = 7;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;

#[repr(C)]
#[derive(Default)]
struct ObjGetAttr {
    pathname: u64,
    bpf_fd: u32,
    file_flags: u32,
}

#[repr(C)]
#[derive(Default)]
struct InfoAttr {
    bpf_fd: u32,
    info_len: u32,
    info: u64,
}

/// The id of the program a pinned link attaches (`bpf_link_info.prog_id`, the third `u32`).
fn link_prog_id(pin: &Path) -> io::Result<u32> {
    let c = CString::new(pin.as_os_str().as_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let mut get = ObjGetAttr {
        pathname: c.as_ptr() as u64,
        ..ObjGetAttr::default()
    };
    let fd = sys_bpf(BPF_OBJ_GET, &mut get)?;
    // SAFETY: BPF_OBJ_GET returned a new descriptor nobody else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    let mut info = [0u32; 32];
    let mut attr = InfoAttr {
        bpf_fd: fd.as_raw_fd() as u32,
        info_len: size_of_val(&info) as u32,
        info: info.as_mut_ptr() as u64,
    };
    sys_bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr)?;
    Ok(info[2])
}

fn sys_bpf<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<libc::c_long> {
    // SAFETY: `attr` is a live `#[repr(C)]` prefix of `union bpf_attr` for `cmd`, its size is passed, and every
    // pointer in it points at memory that outlives the call.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *mut T as *mut libc::c_void,
            size_of::<T>() as libc::c_uint,
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}
