//! `aya::Pod` for every map type, so the agent can read and write them (feature `user`).

use crate::*;

// SAFETY: every type is #[repr(C)], made only of integers and integer arrays, with explicit padding fields, so
// any bit pattern is valid and there are no implicit padding bytes.
unsafe impl aya::Pod for ServiceKey {}
unsafe impl aya::Pod for ServiceValue {}
unsafe impl aya::Pod for BackendValue {}
unsafe impl aya::Pod for AffinityKey {}
unsafe impl aya::Pod for AffinityValue {}
unsafe impl aya::Pod for SockRevNatKey {}
unsafe impl aya::Pod for SockRevNatValue {}
unsafe impl aya::Pod for NetnsAddrs {}
unsafe impl aya::Pod for ServiceStats {}
unsafe impl aya::Pod for BackendStats {}
unsafe impl aya::Pod for CtKey {}
unsafe impl aya::Pod for CtValue {}
unsafe impl aya::Pod for ConfigValue {}
unsafe impl aya::Pod for SrcRangeData {}
unsafe impl aya::Pod for TraceValue {}
unsafe impl aya::Pod for ServiceNameValue {}
unsafe impl aya::Pod for FragKey {}
unsafe impl aya::Pod for FragValue {}
unsafe impl aya::Pod for XdpL2Value {}
unsafe impl aya::Pod for MonitorEvent {}
unsafe impl aya::Pod for MonitorConfig {}
unsafe impl aya::Pod for MonitorBucket {}
