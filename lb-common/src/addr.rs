//! lb's 16-byte address form (IPv4 as `::ffff:a.b.c.d`, network byte order) and its conversions.

/// Converts an IPv4 address (octets in network order) to lb's 16-byte form, `::ffff:a.b.c.d`.
#[inline(always)]
pub const fn v4_mapped(octets: [u8; 4]) -> [u8; 16] {
    [
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, octets[0], octets[1], octets[2], octets[3],
    ]
}

/// Whether a 16-byte address is the IPv4-mapped form of an IPv4 address.
#[inline(always)]
pub const fn is_v4_mapped(addr: &[u8; 16]) -> bool {
    addr[0] == 0
        && addr[1] == 0
        && addr[2] == 0
        && addr[3] == 0
        && addr[4] == 0
        && addr[5] == 0
        && addr[6] == 0
        && addr[7] == 0
        && addr[8] == 0
        && addr[9] == 0
        && addr[10] == 0xff
        && addr[11] == 0xff
}

/// Converts an address to lb's 16-byte form (IPv4 becomes `::ffff:a.b.c.d`).
#[inline(always)]
pub const fn addr_bytes(addr: core::net::IpAddr) -> [u8; 16] {
    match addr {
        core::net::IpAddr::V4(a) => v4_mapped(a.octets()),
        core::net::IpAddr::V6(a) => a.octets(),
    }
}

/// Converts lb's 16-byte form back; IPv4-mapped addresses become IPv4.
pub fn addr_from_bytes(bytes: [u8; 16]) -> core::net::IpAddr {
    if is_v4_mapped(&bytes) {
        core::net::IpAddr::V4(core::net::Ipv4Addr::new(
            bytes[12], bytes[13], bytes[14], bytes[15],
        ))
    } else {
        core::net::IpAddr::V6(core::net::Ipv6Addr::from(bytes))
    }
}
