//! Everything that touches the kernel: loading and pinning (`loader`, `pins`), map access behind a trait (`maps`),
//! the reconciler that is the maps' only writer (`reconcile`), and read-only views for the CLI (`inspect`).

pub mod inspect;
pub mod listings;
pub mod loader;
mod map_batch;
pub mod maps;
pub mod names;
pub mod netns_addrs;
pub mod packet_maps;
pub mod pins;
pub mod reconcile;
pub mod sock_destroy;
pub mod tc_attach;
pub mod xdp_attach;
