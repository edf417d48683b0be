//! Map keys and values shared by lb's eBPF programs (`lb-ebpf`) and its agent (`lb-agent`).
//!
//! Every type here is `#[repr(C)]` with explicit padding fields, so the layout the kernel sees, the layout BTF
//! describes (and bpftool prints by field) and the layout the agent writes are the same, with no uninitialised bytes
//! in map keys.
//!
//! Byte order, once for all types: **addresses** are 16-byte arrays in network byte order (IPv4 as the IPv4-mapped
//! IPv6 address `::ffff:a.b.c.d`, so one map serves both families); **ports** are in host byte order, so that
//! `bpftool map dump` shows `80`, not `20480`. The programs convert ports at the edge; the agent uses the
//! constructors below.
#![no_std]

mod addr;
mod affinity;
mod config;
mod conntrack;
mod consts;
mod crc32c;
mod fragment;
mod monitor;
mod names;
mod nets;
#[cfg(feature = "user")]
mod pod;
mod service;
mod sock;
mod verdict;

pub use addr::*;
pub use affinity::*;
pub use config::*;
pub use conntrack::*;
pub use consts::*;
pub use crc32c::*;
pub use fragment::*;
pub use monitor::*;
pub use names::{map_names, prog_names};
pub use nets::*;
pub use service::*;
pub use sock::*;
pub use verdict::*;

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::size_of;

    // The kernel side and BTF see these sizes; a change here is a map layout change that forces a pin migration.
    #[test]
    fn layouts_have_no_implicit_padding() {
        assert_eq!(size_of::<ServiceKey>(), 20);
        assert_eq!(size_of::<ServiceValue>(), 40);
        assert_eq!(size_of::<SlotBlock>(), LUT_BLOCK_BYTES as usize);
        assert_eq!(size_of::<BackendValue>(), 20);
        assert_eq!(size_of::<AffinityKey>(), 32);
        assert_eq!(size_of::<AffinityValue>(), 24);
        assert_eq!(size_of::<SockRevNatKey>(), 32);
        assert_eq!(size_of::<SockRevNatValue>(), 24);
        assert_eq!(size_of::<NetnsAddrs>(), 40);
        assert_eq!(size_of::<ServiceStats>(), 40);
        assert_eq!(size_of::<BackendStats>(), 24);
        assert_eq!(size_of::<CtKey>(), 40);
        assert_eq!(size_of::<MonitorEvent>(), 112);
        assert_eq!(size_of::<MonitorConfig>(), 24);
        assert_eq!(size_of::<MonitorBucket>(), 32);
        assert_eq!(size_of::<CtValue>(), 64);
        assert_eq!(size_of::<ConfigValue>(), 72);
        assert_eq!(size_of::<SrcRangeData>(), 20);
        assert_eq!(size_of::<TraceValue>(), 24);
        assert_eq!(size_of::<ServiceNameValue>(), 152);
        assert_eq!(size_of::<FragKey>(), 40);
        assert_eq!(size_of::<FragValue>(), 56);
        assert_eq!(size_of::<XdpL2Value>(), 24);
    }

    #[test]
    fn addresses_round_trip_through_the_map_form() {
        use core::net::{IpAddr, Ipv4Addr, Ipv6Addr};
        let v4 = IpAddr::V4(Ipv4Addr::new(10, 96, 0, 10));
        let v6 = IpAddr::V6(Ipv6Addr::new(0xfd00, 0x96, 0, 0, 0, 0, 0, 10));
        assert_eq!(addr_from_bytes(addr_bytes(v4)), v4);
        assert_eq!(addr_from_bytes(addr_bytes(v6)), v6);
        assert_eq!(ServiceKey::new(v4, 80, PROTO_TCP, SCOPE_INTERNAL).ip(), v4);
    }

    #[test]
    fn service_names_round_trip_and_truncate_on_char_boundaries() {
        assert_eq!(
            ServiceNameValue::new("ns/web:http", 0).name(),
            "ns/web:http"
        );
        // Two-byte characters straddle the cut: 143 bytes available, so the last one must be dropped whole.
        let mut bytes = [0u8; 2 * SERVICE_NAME_LEN];
        for pair in bytes.chunks_mut(2) {
            pair.copy_from_slice("é".as_bytes());
        }
        let long = core::str::from_utf8(&bytes).expect("utf-8");
        let v = ServiceNameValue::new(long, 0);
        assert!(v.name().len() < SERVICE_NAME_LEN && v.name().chars().all(|c| c == 'é'));
    }

    /// CRC32c bit by bit, as RFC 9260 appendix A defines it (the reference the incremental update must match).
    fn crc32c(data: &[u8]) -> u32 {
        let mut crc = !0u32;
        for &b in data {
            crc ^= u32::from(b);
            for _ in 0..8 {
                crc = if crc & 1 != 0 {
                    (crc >> 1) ^ CRC32C_POLY
                } else {
                    crc >> 1
                };
            }
        }
        !crc
    }

    #[test]
    fn crc32c_port_delta_matches_a_full_recomputation() {
        // A deterministic pseudo-random walk over lengths (all multiples of 4 from 12 to 9000, the jumbo MTU),
        // contents and port changes; the checksum field is zero while computing, as SCTP defines it.
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let mut packet = [0u8; 9000];
        for len in (12..=9000usize).step_by(4) {
            for b in packet[..len].iter_mut() {
                *b = next() as u8;
            }
            packet[8..12].fill(0);
            let old_crc = crc32c(&packet[..len]);
            let old: [u8; 4] = packet[..4].try_into().expect("4 bytes");
            let new = (next() as u32).to_be_bytes();
            packet[..4].copy_from_slice(&new);
            let new_crc = crc32c(&packet[..len]);
            assert_eq!(
                old_crc ^ crc32c_port_delta(old, new, len as u32, &CRC32C_STEP),
                new_crc,
                "length {len}"
            );
        }
        // No change, no delta.
        assert_eq!(
            crc32c_port_delta([1, 2, 3, 4], [1, 2, 3, 4], 100, &CRC32C_STEP),
            0
        );
        // RFC 3720 B.4's CRC32c test vector: 32 bytes of zeros.
        assert_eq!(crc32c(&[0u8; 32]), 0x8a91_36aa);
    }

    #[test]
    fn v4_mapped_round_trips() {
        let a = v4_mapped([10, 96, 0, 1]);
        assert!(is_v4_mapped(&a));
        assert_eq!(&a[12..], &[10, 96, 0, 1]);
        let mut v6 = [0u8; 16];
        v6[0] = 0xfd;
        assert!(!is_v4_mapped(&v6));
    }
}
