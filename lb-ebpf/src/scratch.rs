//! Per-CPU working state of one program run, kept off the 512-byte BPF stack, and the unpinned maps that hold it.
//!
//! Kernel 6.18's verifier sums the frames of a BPF-to-BPF call chain and refuses more than 512 bytes ("combined
//! stack size of 3 calls is 624. Too large"). Every piece of per-packet state (the parsed packet, the conntrack keys
//! and entries being built, the chosen service and backend, the outcome, the reject buffers) therefore lives in one
//! per-CPU map value, looked up once by the entry point and passed down as `&mut`: a pointer to a map value costs no
//! stack, and map helpers take map values as keys and values directly.
//!
//! These maps are created by the object, never pinned and never read by the agent (they are not in
//! `lb_common::map_names`).

use aya_ebpf::{btf_maps::PerCpuArray, macros::btf_map};
use lb_common::{
    BackendValue, ConfigValue, CtKey, CtValue, FragKey, FragValue, ServiceKey, ServiceValue,
    SrcRangeData, XdpL2Value,
};

use crate::packet::Packet;
use crate::reject::RejectBufs;
use crate::rewrite::Nat;

/// `LB_SCRATCH` slots: one per program, so an egress run never sees an ingress run's state even if the kernel ever
/// ran one inside the other on a CPU (tc programs run with bottom halves disabled, so today it does not).
pub const SCRATCH_INGRESS: u32 = 0;
pub const SCRATCH_EGRESS: u32 = 1;
pub const SCRATCH_SLOTS: usize = 2;

/// slot (`SCRATCH_INGRESS` / `SCRATCH_EGRESS`) -> [`TcScratch`], per CPU: one tc program run's working state.
#[btf_map]
pub static LB_SCRATCH: PerCpuArray<TcScratch, SCRATCH_SLOTS> = PerCpuArray::new();

/// 0 -> [`XdpScratch`], per CPU: one `lb_xdp` run's working state. Its own map, not a slot of `LB_SCRATCH`: XDP
/// and tc run back to back on the same packet and CPU (generic XDP even inside the same receive call), and sharing
/// a value would let one program's leftovers be read as the other's state.
#[btf_map]
pub static LB_XDP_SCRATCH: PerCpuArray<XdpScratch, 1> = PerCpuArray::new();

/// What happened to a packet, for the counters and `lb-agent trace`. Plain integers only (no `bool`, no enum): it
/// is part of a map value's BTF.
#[repr(C)]
pub struct Outcome {
    pub verdict: u32,
    pub reason: u32,
    pub service_id: u32,
    pub backend_id: u32,
    pub snat: u32,
    pub action: i32,
}

/// One tc packet run's working state.
#[repr(C)]
pub struct TcScratch {
    pub cfg: ConfigValue,
    pub pkt: Packet,
    pub out: Outcome,
    /// The conntrack key being looked up or written.
    pub key: CtKey,
    /// The key of a hit entry's other direction, or of the entry written next to `key`.
    pub other: CtKey,
    /// A copy of the conntrack entry being followed, or the forward entry being written.
    pub ct: CtValue,
    /// The reply entry being written (the SNAT reply entry has the same value).
    pub rev: CtValue,
    /// The rewrite to apply.
    pub nat: Nat,
    /// The chosen service and backend of a new flow.
    pub svc_key: ServiceKey,
    pub svc: ServiceValue,
    pub backend_id: u32,
    /// Whether the new flow gets the node's SNAT address (rule 6), and that address for the packet's family.
    pub snat: u32,
    pub backend: BackendValue,
    pub snat_addr: [u8; 16],
    pub rej: RejectBufs,
    /// The fragment entry being looked up or written (first fragments and later fragments only).
    pub fkey: FragKey,
    pub fval: FragValue,
    /// The learned L2 header being written (egress, `CONFIG_FLAG_XDP` only).
    pub l2: XdpL2Value,
    /// `FRAG_HOOK_INGRESS` or `FRAG_HOOK_EGRESS`: which program runs, for the fragment keys.
    pub hook: u8,
}

/// XDP's rewrite to apply: new addresses (16-byte form) and ports (host order).
#[repr(C)]
pub struct XdpNat {
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
    pub sport: u16,
    pub dport: u16,
    pub _pad: u32,
}

/// One `lb_xdp` run's working state.
#[repr(C)]
pub struct XdpScratch {
    pub pkt: Packet,
    /// The first entry's key (`CT_DIR_FWD`: the SNAT reply or the forward entry) and the second one's
    /// (`CT_DIR_REPLY`: the reply or the SNAT entry), which is also the `LB_XDP_L2` key.
    pub key: CtKey,
    pub other: CtKey,
    pub ct: CtValue,
    pub ct2: CtValue,
    pub l2: XdpL2Value,
    pub nat: XdpNat,
    pub svc_key: ServiceKey,
    pub range: SrcRangeData,
    /// Jiffies per second (`ct::hz`).
    pub hz: u64,
    /// `ConfigValue::backend_epoch`, for `ct::backend_alive`.
    pub epoch: u32,
}

/// This tc program's per-CPU scratch value (`slot`: `SCRATCH_INGRESS` or `SCRATCH_EGRESS`).
#[inline(always)]
pub fn tc(slot: u32) -> Option<&'static mut TcScratch> {
    let ptr = LB_SCRATCH.get_ptr_mut(slot)?;
    // SAFETY: a per-CPU array slot is valid for the whole program run, and only this run uses it on this CPU
    // (one slot per program, and a tc program is not preempted by another run of itself on the same CPU).
    Some(unsafe { &mut *ptr })
}

/// `lb_xdp`'s per-CPU scratch value.
#[inline(always)]
pub fn xdp() -> Option<&'static mut XdpScratch> {
    let ptr = LB_XDP_SCRATCH.get_ptr_mut(0)?;
    // SAFETY: a per-CPU array slot is valid for the whole program run, and only this program uses this map; an XDP
    // program is not preempted by another run of itself on the same CPU.
    Some(unsafe { &mut *ptr })
}
