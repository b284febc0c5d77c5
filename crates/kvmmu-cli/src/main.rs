//! The `kvmmu` command (placeholder: being written).
fn main() {}
