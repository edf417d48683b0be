//! Incremental Internet checksum arithmetic (RFC 1624: `HC' = ~(~HC + ~m + m')` per changed 16-bit word), shared by
//! the tc rewrite and `lb_xdp`. Words are taken as they sit in memory; the one's complement sum does not depend on
//! byte order as long as every word is read and the result written the same way.

/// The 16-bit word at `off` of an address, as it sits in memory.
#[inline(always)]
pub fn word(a: &[u8; 16], off: usize) -> u16 {
    // SAFETY: every caller passes an even `off` <= 14, so both bytes lie inside the array; unaligned read.
    unsafe { a.as_ptr().add(off).cast::<u16>().read_unaligned() }
}

/// `~old + new` of one 16-bit word (RFC 1624's `~m + m'`).
#[inline(always)]
pub fn word_diff(old: u16, new: u16) -> u64 {
    u64::from(!old) + u64::from(new)
}

/// The change of two 16-byte addresses, word by word. For IPv4-mapped forms the 12-byte prefix's words cancel
/// (`~w + w` is 0xffff, one's complement zero), so the same sum serves both families.
#[inline(always)]
pub fn sum_diff16(old: &[u8; 16], new: &[u8; 16]) -> u64 {
    let mut d = 0;
    let mut i = 0;
    while i < 16 {
        d += word_diff(word(old, i), word(new, i));
        i += 2;
    }
    d
}

/// A sum of word changes folded to 32 bits: the `__wsum` difference `bpf_l3/l4_csum_replace` take with size 0 (what
/// `bpf_csum_diff` returns, without the helper call).
#[inline(always)]
pub fn to_wsum(delta: u64) -> u32 {
    let mut d = delta;
    d = (d & 0xffff_ffff) + (d >> 32);
    d = (d & 0xffff_ffff) + (d >> 32);
    d as u32
}

/// RFC 1624 eqn. 3: the new checksum field from the old one and the sum of `~m + m'` over the changed words.
#[inline(always)]
pub fn apply_delta(old: u16, delta: u64) -> u16 {
    let mut sum = u64::from(!old) + delta;
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}
