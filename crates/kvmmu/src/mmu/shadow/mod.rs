//! The shadow MMU (placeholder: being written).
pub mod rmap;
