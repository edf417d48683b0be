//! SCTP's CRC32c, as far as the datapath needs it: the change a port rewrite makes to the checksum field.

/// CRC32c's generator polynomial, bit-reflected (Castagnoli; SCTP, RFC 9260 appendix A).
pub const CRC32C_POLY: u32 = 0x82f6_3b78;

/// The reduction table of one CRC32c shift step: `[0, CRC32C_POLY]`, indexed by the bit that falls out.
///
/// The eBPF programs read it from a map rather than a constant on purpose (kernel 6.18, LLVM 22): with a constant,
/// LLVM turns the step into a select, i.e. a branch or a `(x << 63) s>> 63 & C` mask on a packet-derived bit, and
/// the verifier forks on each of those (the mask form splits the state without a join to prune at), so 32 steps
/// became 2^32 paths ("BPF program is too large. Processed 1000001 insn"). A load from map memory at a 0/4 offset is
/// one unknown value for the verifier and no fork.
pub const CRC32C_STEP: [u32; 2] = [0, CRC32C_POLY];

/// `a * b mod P` over GF(2) for polynomials in CRC32c's reflected form (bit 31 is the coefficient of x^0, bit 0
/// that of x^31). `a` should be a constant the verifier knows (its bits pick what is added); `b` may come from the
/// packet. `step` is [`CRC32C_STEP`].
#[inline(always)]
pub fn crc32c_mulmod(a: u32, b: u32, step: &[u32; 2]) -> u32 {
    let mut b = b;
    let mut product = 0u32;
    let mut i = 0;
    while i < 32 {
        // Coefficient of x^i in `a`, as an all-ones or all-zeros mask; `b` is the original b * x^i here.
        product ^= b & 0u32.wrapping_sub((a >> (31 - i)) & 1);
        // b * x: shift towards x^31, and reduce by P when x^32 falls out.
        b = (b >> 1) ^ step[(b & 1) as usize];
        i += 1;
    }
    product
}

/// How an SCTP packet's CRC32c field changes when its first 4 bytes (source and destination port) change from
/// `old` to `new` and nothing else does: `new_field = old_field ^ delta` with the field read as a little-endian
/// `u32` (as SCTP stores it), for a packet of `len` bytes (common header and chunks, so at least 12). `step` is
/// [`CRC32C_STEP`] (see there why it is a parameter).
///
/// Why it holds: write CRC(m) = raw(~0, m) ^ ~0, where raw(s, m) is the CRC register after feeding m to the
/// register s. raw is affine: raw(s, m) = raw(s, 0) ^ raw(0, m), and linear in m. For two packets of the same
/// length that differ in bytes 0..4 by D (the checksum field counts as zero in both, RFC 9260 §6.8), CRC(a) ^ CRC(b)
/// = raw(0, D followed by len - 4 zero bytes). Feeding D's 4 bytes to the zero register gives r; each further zero
/// byte multiplies the register by x^8 mod P, so the result is r * x^(8 (len - 4)) mod P, computed as
/// a product of up to 16 precomputed factors x^(8 * 2^k) (len < 65536). The field is the CRC little-endian, so XOR
/// applies to it as it is. An incoming packet with a wrong CRC keeps a wrong one (nothing is recomputed from scratch), and the work does not
/// depend on the packet's size or on reading its chunks. `crc32c_port_delta_matches_a_full_recomputation` checks
/// it against a bitwise CRC32c for every length up to 9000 bytes.
#[inline(always)]
pub fn crc32c_port_delta(old: [u8; 4], new: [u8; 4], len: u32, step: &[u32; 2]) -> u32 {
    // raw(0, D): the 4 bytes XORed into the zero register (reflected CRCs take bytes little-endian first), then 32
    // shift steps.
    let mut r = u32::from_le_bytes([
        old[0] ^ new[0],
        old[1] ^ new[1],
        old[2] ^ new[2],
        old[3] ^ new[3],
    ]);
    let mut i = 0;
    while i < 32 {
        r = (r >> 1) ^ step[(r & 1) as usize];
        i += 1;
    }
    // r * x^(8 * zeros) mod P, multiplying r by x^(8 * 2^k) for every bit k set in `zeros` (constants).
    let zeros = len.saturating_sub(4) & 0xffff;
    let mut k = 0;
    while k < 16 {
        if (zeros >> k) & 1 != 0 {
            r = crc32c_mulmod(X8_POW2[k], r, step);
        }
        k += 1;
    }
    r
}

/// `x^(8 * 2^k) mod P` for k in 0..16, in reflected form: the factors [`crc32c_port_delta`] multiplies by, computed
/// at compile time (squaring x^8 in the program instead doubled its work and the verifier's).
const X8_POW2: [u32; 16] = {
    let mut t = [0u32; 16];
    // x^8: bit 31 - 8 in reflected form.
    let mut square = 1u32 << (31 - 8);
    let mut k = 0;
    while k < 16 {
        t[k] = square;
        square = crc32c_mulmod_const(square, square);
        k += 1;
    }
    t
};

/// [`crc32c_mulmod`] for constants (the reduction from [`CRC32C_POLY`] directly).
const fn crc32c_mulmod_const(a: u32, b: u32) -> u32 {
    let mut b = b;
    let mut product = 0u32;
    let mut i = 0;
    while i < 32 {
        if (a >> (31 - i)) & 1 != 0 {
            product ^= b;
        }
        b = if b & 1 != 0 {
            (b >> 1) ^ CRC32C_POLY
        } else {
            b >> 1
        };
        i += 1;
    }
    product
}
