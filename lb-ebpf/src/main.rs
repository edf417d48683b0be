//! lb's kernel side: the socket load balancer (eight cgroup sock_addr programs) and the per-packet datapath (tc
//! ingress/egress on the node's external interfaces, `tc`, `packet`, `reject`; the XDP fast path in front of it, `xdp`). The socket forward hooks (connect,
//! sendmsg) turn a Service VIP into a backend before the socket ever sends a packet; the reverse hooks (recvmsg,
//! getpeername) show the application the VIP again. Maps in `maps`, the two cores in `sock`, backend choice in
//! `select`, counters in `stats`; this file only attaches.
//!
//! The programs are built for `bpfel-unknown-none` only (`cargo xtask build-ebpf`). On the host, `cargo build`
//! compiles a stub `main`, and `cargo clippy` (cfg `clippy`) also checks the programs, whose code is plain Rust.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

#[cfg(any(target_arch = "bpf", clippy))]
mod csum;
#[cfg(any(target_arch = "bpf", clippy))]
mod ct;
#[cfg(any(target_arch = "bpf", clippy))]
mod events;
#[cfg(any(target_arch = "bpf", clippy))]
mod maps;
#[cfg(any(target_arch = "bpf", clippy))]
mod packet;
#[cfg(any(target_arch = "bpf", clippy))]
mod reject;
#[cfg(any(target_arch = "bpf", clippy))]
mod rewrite;
#[cfg(any(target_arch = "bpf", clippy))]
mod scratch;
#[cfg(any(target_arch = "bpf", clippy))]
mod sctp;
#[cfg(any(target_arch = "bpf", clippy))]
mod select;
#[cfg(any(target_arch = "bpf", clippy))]
mod sock;
#[cfg(any(target_arch = "bpf", clippy))]
mod stats;
#[cfg(any(target_arch = "bpf", clippy))]
mod tc;
#[cfg(any(target_arch = "bpf", clippy))]
mod xdp;

/// The XDP fast path on the same interfaces (`--xdp`); the core is in `xdp`.
#[cfg(any(target_arch = "bpf", clippy))]
mod xdp_programs {
    use aya_ebpf::{macros::xdp, programs::XdpContext};

    #[xdp]
    pub fn lb_xdp(ctx: XdpContext) -> u32 {
        crate::xdp::run(&ctx)
    }
}

/// The per-packet programs on the node's external interfaces (tcx or clsact); the cores are in `tc`.
#[cfg(any(target_arch = "bpf", clippy))]
mod tc_programs {
    use aya_ebpf::{macros::classifier, programs::TcContext};

    #[classifier]
    pub fn lb_tc_ingress(ctx: TcContext) -> i32 {
        crate::tc::ingress(&ctx)
    }

    #[classifier]
    pub fn lb_tc_egress(ctx: TcContext) -> i32 {
        crate::tc::egress(&ctx)
    }

    /// Does nothing and passes the packet on: never attached, it is the floor `cargo xtask bench` runs through
    /// BPF_PROG_TEST_RUN beside `lb_tc_ingress`, so the per-packet numbers can be read as "cost above an empty
    /// program" (the test-run machinery itself costs tens of nanoseconds per packet).
    #[classifier]
    pub fn lb_noop(_ctx: TcContext) -> i32 {
        // TC_ACT_UNSPEC: continue with the next program, as an absent one would.
        -1
    }
}

/// The attach points, named as `lb_common::prog_names` says; libbpf section names `cgroup/<hook>`.
#[cfg(any(target_arch = "bpf", clippy))]
mod programs {
    use aya_ebpf::{macros::cgroup_sock_addr, programs::SockAddrContext};

    use crate::sock::{Family, SYS_PROCEED, xlate_fwd, xlate_rev};

    #[cgroup_sock_addr(connect4)]
    pub fn lb_connect4(ctx: SockAddrContext) -> i32 {
        match xlate_fwd(&ctx, Family::V4) {
            Ok(verdict) => verdict,
            Err(_) => SYS_PROCEED,
        }
    }

    #[cgroup_sock_addr(connect6)]
    pub fn lb_connect6(ctx: SockAddrContext) -> i32 {
        match xlate_fwd(&ctx, Family::V6) {
            Ok(verdict) => verdict,
            Err(_) => SYS_PROCEED,
        }
    }

    #[cgroup_sock_addr(sendmsg4)]
    pub fn lb_sendmsg4(ctx: SockAddrContext) -> i32 {
        match xlate_fwd(&ctx, Family::V4) {
            Ok(verdict) => verdict,
            Err(_) => SYS_PROCEED,
        }
    }

    #[cgroup_sock_addr(sendmsg6)]
    pub fn lb_sendmsg6(ctx: SockAddrContext) -> i32 {
        match xlate_fwd(&ctx, Family::V6) {
            Ok(verdict) => verdict,
            Err(_) => SYS_PROCEED,
        }
    }

    // recvmsg and getpeername must return 1 (the verifier enforces it): they can only rewrite, never fail.

    #[cgroup_sock_addr(recvmsg4)]
    pub fn lb_recvmsg4(ctx: SockAddrContext) -> i32 {
        xlate_rev(&ctx, Family::V4);
        SYS_PROCEED
    }

    #[cgroup_sock_addr(recvmsg6)]
    pub fn lb_recvmsg6(ctx: SockAddrContext) -> i32 {
        xlate_rev(&ctx, Family::V6);
        SYS_PROCEED
    }

    #[cgroup_sock_addr(getpeername4)]
    pub fn lb_getpeername4(ctx: SockAddrContext) -> i32 {
        xlate_rev(&ctx, Family::V4);
        SYS_PROCEED
    }

    #[cgroup_sock_addr(getpeername6)]
    pub fn lb_getpeername6(ctx: SockAddrContext) -> i32 {
        xlate_rev(&ctx, Family::V6);
        SYS_PROCEED
    }
}

/// The object's license as the kernel sees it, the crate's own (`MIT OR GPL-2.0`, lb-ebpf/Cargo.toml). The kernel
/// reads "Dual MIT/GPL" as GPL-compatible (`license_is_gpl_compatible`), which GPL-only helpers such as
/// `bpf_fib_lookup` require.
#[cfg(target_arch = "bpf")]
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";

#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[cfg(not(target_arch = "bpf"))]
fn main() {}
