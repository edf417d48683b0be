//! `lb-agent monitor`: datapath events through a BPF ring buffer (`LB_EVENTS`), gated by `LB_MONITOR` and rate
//! limited per CPU (`LB_MONITOR_RATE`). Only event paths (a new flow, a drop, a reject, a refused syscall) read the
//! gate; an established flow's packets never do.

/// `MonitorEvent.kind`: a new flow picked a backend (socket LB: a translated `connect()` or the first datagram of a
/// UDP socket to that backend; tc / XDP: a new conntrack flow).
pub const EVENT_NEW_FLOW: u8 = 1;
/// A packet was dropped; at the socket LB, a syscall failed with `EPERM`.
pub const EVENT_DROP: u8 = 2;
/// A packet was answered with a TCP RST / ICMP unreachable; at the socket LB, a syscall failed with `ECONNREFUSED`.
pub const EVENT_REJECT: u8 = 3;

/// `MonitorEvent.path`: where the event happened.
pub const PATH_SOCK: u8 = 1;
pub const PATH_TC: u8 = 2;
pub const PATH_XDP: u8 = 3;

/// The ring buffer's size in bytes (a power of two, a multiple of the page size): ~2300 events of 112 bytes (+8
/// bytes of header each) between two reads of the monitor (every 100 ms).
pub const EVENTS_RING_BYTES: u32 = 256 * 1024;

/// `LB_EVENTS` record, written by the programs, read by `lb-agent monitor`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct MonitorEvent {
    /// The client: the packet's source (tc, XDP), or the address of the socket's network namespace as the agent
    /// learned it (`LB_NETNS_ADDRS`; all zero when unknown) at the socket LB. 16-byte form, IPv4-mapped.
    pub saddr: [u8; 16],
    /// The destination the client asked for: VIP or node address.
    pub daddr: [u8; 16],
    /// The chosen backend (new flows; zero otherwise).
    pub backend: [u8; 16],
    /// Socket LB: the socket's network namespace cookie; 0 elsewhere.
    pub netns_cookie: u64,
    /// Ports, host order.
    pub sport: u16,
    pub dport: u16,
    pub backend_port: u16,
    pub proto: u8,
    /// `EVENT_*`.
    pub kind: u8,
    /// `PATH_*`.
    pub path: u8,
    /// 1 when the new flow's source is rewritten to the node's address (SNAT).
    pub snat: u8,
    pub _pad: [u8; 2],
    /// `reason::*`.
    pub reason: u32,
    pub service_id: u32,
    pub backend_id: u32,
    /// tc / XDP: the interface the packet arrived on.
    pub ifindex: u32,
    /// Zero. (The calling process would fit here, but its helpers need CAP_PERFMON in the socket hooks.)
    pub _reserved: [u8; 20],
    /// `bpf_jiffies64()` at the event.
    pub jiffies: u64,
}

/// `LB_MONITOR` value (array of one): whether someone is monitoring, and the rate limit. Written by
/// `lb-agent monitor` only.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct MonitorConfig {
    /// Events are emitted while `bpf_jiffies64()` is below this: a lease the monitor renews every second, so a
    /// monitor killed without cleaning up stops costing anything within `MONITOR_LEASE_S`.
    pub until_jiffies: u64,
    /// The kernel's tick rate, as `ConfigValue::hz`.
    pub hz: u32,
    /// Events per second per CPU (the token bucket's refill), and the bucket's depth.
    pub rate: u32,
    pub burst: u32,
    /// `1 << EVENT_*` bits: the kinds wanted.
    pub kinds: u32,
}

/// How long the monitor's lease lasts past its last renewal, in seconds.
pub const MONITOR_LEASE_S: u64 = 5;

/// `LB_MONITOR_RATE` value, per CPU: the token bucket and what it and the ring buffer cost.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct MonitorBucket {
    /// Tokens times `hz` (one event costs `hz`), so the refill needs no division.
    pub tokens: u64,
    pub last_jiffies: u64,
    /// Events not emitted because the bucket was empty.
    pub suppressed: u64,
    /// Events not emitted because the ring buffer was full (the monitor reads too slowly).
    pub lost: u64,
}
