//! Everything that touches the kernel, and every writer of lb's maps: loading and pinning (`loader`, `pins`),
//! attaching (`tc_attach`, `xdp_attach`), map access behind a trait (`maps`, `packet_maps`, `map_error`), the
//! reconciler that writes the service maps (`reconcile`), the writer of the names map (`names`), ending stale
//! sockets (`sock_destroy`), and the read-only views the CLI and the metrics share (`inspect`, `listings`, `map_fill`, `attachments`,
//! with `display` and the counter tables of `counters`).

pub mod attachments;
pub mod clock;
pub mod counters;
pub mod display;
pub mod inspect;
pub mod listings;
pub mod loader;
pub mod lut;
mod map_batch;
pub mod map_error;
pub mod map_fill;
pub mod maps;
pub mod monitor;
pub mod names;
pub mod netns_addrs;
pub mod packet_maps;
pub mod pins;
mod rcu_fence;
pub mod reconcile;
pub mod slot_array;
pub mod sock_destroy;
pub mod tc_attach;
pub mod xdp_attach;
