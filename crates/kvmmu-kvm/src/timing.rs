//! Timing side by side (filled in below).
