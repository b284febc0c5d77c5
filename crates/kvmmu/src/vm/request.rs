//! vCPU requests and remote TLB flushes (placeholder: being written).
