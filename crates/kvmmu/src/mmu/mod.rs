//! The arch MMU (placeholder: being written).
pub mod spte;
pub mod tdp;
