//! vCPUs (placeholder: being written).
