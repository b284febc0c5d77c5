//! Memslots (placeholder: being written).
