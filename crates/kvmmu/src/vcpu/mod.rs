//! vCPUs (placeholder: being written).
pub mod tlb;
