//! TDP MMU (placeholder: being written).
