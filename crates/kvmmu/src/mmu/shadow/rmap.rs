//! Reverse maps (placeholder: being written).
