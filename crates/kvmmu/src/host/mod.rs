//! The primary MMU (placeholder: being written).
