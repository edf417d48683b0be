//! The reader's side of `lb-agent monitor`: the pinned ring buffer `LB_EVENTS`, the gate `LB_MONITOR` (a lease this
//! reader renews) and the per-CPU rate-limit buckets `LB_MONITOR_RATE` (lb-ebpf `events.rs` is the writer's side).
//!
//! A BPF ring buffer has one consumer position: two readers would each get a random half of the events. The reader
//! therefore holds an abstract Unix socket named after the pin directory (`@lb-agent-monitor:<dir>`) for its
//! lifetime; a second one finds the name taken and is refused. The kernel frees the name when the process dies,
//! however it dies.

use std::os::linux::net::SocketAddrExt as _;
use std::os::unix::net::{SocketAddr, UnixListener};
use std::path::Path;

use aya::maps::{Array, Map, MapData, PerCpuArray, RingBuf};
use lb_common::{MONITOR_LEASE_S, MonitorBucket, MonitorConfig, MonitorEvent, map_names};

use super::clock::{jiffies_now, kernel_hz};

#[derive(Debug, thiserror::Error)]
pub enum MonitorError {
    #[error(
        "no {map} pinned in {dir}: the agent there predates `lb-agent monitor` or is not running (see --bpffs)"
    )]
    NotPinned { map: &'static str, dir: String },
    #[error("opening {map}: {source}")]
    Map {
        map: &'static str,
        source: aya::maps::MapError,
    },
    #[error(
        "another `lb-agent monitor` already reads the events of {0}: a ring buffer has one reader, and two would \
         each see part of the events; stop the other one (or watch its output)"
    )]
    Busy(String),
    #[error("binding the monitor's lock socket: {0}")]
    Lock(std::io::Error),
}

/// What the reader asks of the programs.
#[derive(Clone, Copy, Debug)]
pub struct Settings {
    /// Events per second per CPU, and the burst allowed above that.
    pub rate: u32,
    pub burst: u32,
    /// `1 << EVENT_*` bits.
    pub kinds: u32,
}

/// Events the programs did not emit, summed over CPUs since the maps were created.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Missed {
    /// Over the rate limit.
    pub suppressed: u64,
    /// The ring buffer was full.
    pub lost: u64,
}

/// The one reader of a node's events. Dropping it ends the lease, so the programs stop emitting at once.
pub struct Monitor {
    ring: RingBuf<MapData>,
    gate: Array<MapData, MonitorConfig>,
    buckets: PerCpuArray<MapData, MonitorBucket>,
    settings: Settings,
    hz: u32,
    _lock: UnixListener,
}

fn open(dir: &Path, name: &'static str) -> Result<MapData, MonitorError> {
    let path = dir.join(name);
    if !path.exists() {
        return Err(MonitorError::NotPinned {
            map: name,
            dir: dir.display().to_string(),
        });
    }
    MapData::from_pin(&path).map_err(|source| MonitorError::Map { map: name, source })
}

impl Monitor {
    /// Takes the reader's lock, opens the maps and turns the events on.
    pub fn start(dir: &Path, settings: Settings) -> Result<Monitor, MonitorError> {
        let name = format!("lb-agent-monitor:{}", dir.display());
        let addr = SocketAddr::from_abstract_name(name.as_bytes()).map_err(MonitorError::Lock)?;
        let lock = UnixListener::bind_addr(&addr).map_err(|e| {
            if e.kind() == std::io::ErrorKind::AddrInUse {
                MonitorError::Busy(dir.display().to_string())
            } else {
                MonitorError::Lock(e)
            }
        })?;
        let map_err = |map| move |source| MonitorError::Map { map, source };
        let ring = RingBuf::try_from(Map::RingBuf(open(dir, map_names::EVENTS)?))
            .map_err(map_err(map_names::EVENTS))?;
        let gate = Array::try_from(Map::Array(open(dir, map_names::MONITOR)?))
            .map_err(map_err(map_names::MONITOR))?;
        let buckets = PerCpuArray::try_from(Map::PerCpuArray(open(dir, map_names::MONITOR_RATE)?))
            .map_err(map_err(map_names::MONITOR_RATE))?;
        let mut monitor = Monitor {
            ring,
            gate,
            buckets,
            settings,
            hz: kernel_hz(),
            _lock: lock,
        };
        // Records left from an earlier reader (the lease outlives a killed one by a few seconds) are old news.
        while monitor.ring.next().is_some() {}
        monitor.renew()?;
        Ok(monitor)
    }

    /// Extends the lease by `MONITOR_LEASE_S`; call at least every second.
    pub fn renew(&mut self) -> Result<(), MonitorError> {
        let hz = self.hz;
        let cfg = MonitorConfig {
            until_jiffies: jiffies_now(hz) + MONITOR_LEASE_S * u64::from(hz),
            hz,
            rate: self.settings.rate,
            burst: self.settings.burst.max(1),
            kinds: self.settings.kinds,
        };
        self.gate
            .set(0, cfg, 0)
            .map_err(|source| MonitorError::Map {
                map: map_names::MONITOR,
                source,
            })
    }

    /// The next record in the ring, if any (never blocks: the programs submit without a wakeup, so the caller
    /// polls).
    pub fn next_event(&mut self) -> Option<MonitorEvent> {
        let item = self.ring.next()?;
        if item.len() < size_of::<MonitorEvent>() {
            return None;
        }
        // SAFETY: the record holds at least one MonitorEvent (checked above); `read_unaligned` copies it out of the
        // ring's pages, which any bit pattern fits (`Pod`).
        Some(unsafe { item.as_ptr().cast::<MonitorEvent>().read_unaligned() })
    }

    /// Events suppressed by the rate limit and lost to a full ring, summed over CPUs.
    pub fn missed(&self) -> Missed {
        self.buckets
            .get(&0, 0)
            .map(|per_cpu| {
                per_cpu.iter().fold(Missed::default(), |m, b| Missed {
                    suppressed: m.suppressed.wrapping_add(b.suppressed),
                    lost: m.lost.wrapping_add(b.lost),
                })
            })
            .unwrap_or_default()
    }
}

impl Drop for Monitor {
    fn drop(&mut self) {
        if let Err(e) = self.gate.set(0, MonitorConfig::default(), 0) {
            tracing::warn!(error = %e, "could not end the monitor's lease; the programs stop emitting within {MONITOR_LEASE_S} s");
        }
    }
}
