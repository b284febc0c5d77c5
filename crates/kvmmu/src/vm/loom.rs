//! Under loom only the small protocols of the VM layer are compiled: the vCPU request protocol
//! (TLB-flush handshake), the invalidation counters and the dirty ring's entry protocol.

#[path = "dirty_ring_core.rs"]
pub mod dirty_ring_core;
#[path = "request.rs"]
pub mod request;
#[path = "seq.rs"]
pub mod seq;
