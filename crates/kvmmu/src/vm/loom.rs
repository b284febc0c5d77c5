//! Under loom only the small protocols of the VM layer are compiled: the vCPU request protocol
//! (TLB-flush handshake) and the invalidation counters.

#[path = "request.rs"]
pub mod request;
#[path = "seq.rs"]
pub mod seq;
