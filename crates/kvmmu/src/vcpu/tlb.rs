//! Software TLB (placeholder: being written).
