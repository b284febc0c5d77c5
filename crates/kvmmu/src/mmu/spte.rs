//! SPTE format (placeholder: being written).
