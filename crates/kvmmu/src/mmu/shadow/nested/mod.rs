//! Nested TDP (`paging_tmpl.h`, EPT flavour): the EPT12 format L1 writes, and the indirect
//! shadow pages (EPT02) that map L2 through it.

pub mod ept12;
