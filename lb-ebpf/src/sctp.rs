//! SCTP: the CRC32c update of a port rewrite, and the unpinned map its reduction step is read from.

use aya_ebpf::{
    bindings::BPF_F_RECOMPUTE_CSUM, btf_maps::Array, macros::btf_map, programs::TcContext,
};
use lb_common::{CRC32C_STEP, crc32c_port_delta};

/// 0 -> `lb_common::CRC32C_STEP`: the CRC32c reduction table, rewritten by the tc programs before each SCTP port
/// rewrite and read through a second lookup, so neither LLVM nor the verifier sees it as constants (see
/// `CRC32C_STEP` for why that matters). Created by the object, never pinned, never read by the agent.
#[btf_map]
pub static LB_CRC_STEP: Array<[u32; 2], 1> = Array::new();

/// Folds an SCTP port change into the packet's CRC32c field (`l4 + 8`) without reading the chunks:
/// `lb_common::crc32c_port_delta` says why the XOR is exact. `old` and `new` are the port pairs (source in the
/// high half), host order. A packet whose CRC was wrong stays wrong; one whose CRC the stack has not computed yet
/// (CHECKSUM_PARTIAL: the field is filled in at transmission over the rewritten bytes) gets a value that is
/// overwritten then. Returns 0, or -1 when the length is impossible or a helper failed.
#[inline(always)]
pub fn sctp_crc_update(ctx: &TcContext, l4: usize, ip_end: usize, old: u32, new: u32) -> i32 {
    // The common header (12 bytes) at least; the IP length fields cannot describe more than 65535 bytes.
    let len = ip_end.wrapping_sub(l4);
    if !(12..=0xffff).contains(&len) {
        return -1;
    }
    let delta = lb_sctp_crc_delta(old ^ new, len as u32);
    if delta > u64::from(u32::MAX) {
        return -1;
    }
    let Ok(field) = ctx.load::<[u8; 4]>(l4 + 8) else {
        return -1;
    };
    // The field holds the CRC little-endian (RFC 9260 appendix A), so the delta applies as a little-endian word.
    let field = (u32::from_le_bytes(field) ^ delta as u32).to_le_bytes();
    match ctx.store(l4 + 8, &field, u64::from(BPF_F_RECOMPUTE_CSUM)) {
        Ok(()) => 0,
        Err(_) => -1,
    }
}

/// The CRC32c change of an SCTP packet of `len` bytes whose port pair changes by `ports_xor` (old ^ new, source in
/// the high half): `lb_common::crc32c_port_delta`, or [`DELTA_FAILED`] when the step map cannot be read.
///
/// A global function (exported, so BTF marks it `BTF_FUNC_GLOBAL`): the verifier checks it once, on its own, with
/// its two arguments as unknown scalars, and each call site only sees a scalar return. As a static subprogram its
/// constant-count loops (then 33 GF(2) multiplications of 32 steps) were verified again for every caller state
/// reaching the rewrite: ~430k of `lb_tc_ingress`'s 490k processed instructions, 75k in all now (kernel 6.18). The
/// arguments are scalars only, as a global function's must be.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn lb_sctp_crc_delta(ports_xor: u32, len: u32) -> u64 {
    // Written through one lookup and read through another: LLVM cannot forward the stores to the loads, so the
    // step stays a memory read (see `CRC32C_STEP`).
    let Some(w) = LB_CRC_STEP.get_ptr_mut(0) else {
        return DELTA_FAILED;
    };
    // SAFETY: an array slot is valid for the program run.
    unsafe { w.write(CRC32C_STEP) };
    let Some(step) = LB_CRC_STEP.get_ptr(0) else {
        return DELTA_FAILED;
    };
    // SAFETY: as above; only read.
    let step = unsafe { &*step };
    // The delta is linear in the port change, so old ^ new against zero gives the same value as old against new.
    u64::from(crc32c_port_delta(
        ports_xor.to_be_bytes(),
        [0; 4],
        len,
        step,
    ))
}

/// [`lb_sctp_crc_delta`]'s failure: outside the `u32` range of a delta.
const DELTA_FAILED: u64 = 1 << 32;
