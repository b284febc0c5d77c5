//! The VM (placeholder: being written).
pub mod memslot;
pub mod request;
