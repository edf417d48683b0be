//! lb's node agent as a library: the Kubernetes-to-datapath model, Maglev, the reconciler and map access, the
//! daemon and the operator CLI. The binary (`main.rs`) is a thin CLI over it; the integration tests use it directly.
//!
//! Imports run one way (`tests/module_layers.rs` holds the order): `state` and `maglev` <- `model` <- `source`
//! <- `datapath` <- `ops` <- `trace` <- `agent` <- `cli`, with `host` a leaf anyone may use.

pub mod agent;
pub mod build_info;
pub mod cli;
pub mod datapath;
pub mod host;
pub mod install;
pub mod maglev;
pub mod model;
pub mod netfilter_keeper;
pub mod ops;
pub mod source;
pub mod state;
pub mod trace;
