//! Real host memory for real guests: an anonymous private mapping of this process, and the host
//! memory operations that mirror kvmmu's [`kvmmu::HostMm`] ones (`munmap`, `mprotect`,
//! `madvise(MADV_DONTNEED)`, `mmap(MAP_FIXED)` at the same address).
//!
//! This module is the only place that calls `mmap` and friends. The contract that keeps it sound
//! (cited by the `SAFETY` comments here and in `runner`):
//! 1. A [`HostRegion`] owns `[base, base + len)` of this process's address space from `new` until
//!    drop: nothing else in this crate maps, unmaps or dereferences it, and no Rust reference into it
//!    is ever created (KVM and the guest are the only ones that access its bytes, through the
//!    kernel's user-copy and GUP paths, which tolerate unmapped or protected pages with `-EFAULT`).
//! 2. Operations take offsets and lengths that are checked to be page aligned and inside the region,
//!    so no call can touch memory outside it.
//! 3. A hole made by [`HostRegion::munmap`] is at most [`MAX_HOLE`] bytes and is refilled or left
//!    as a hole until drop; while a hole exists, a foreign small mapping (e.g. another vCPU's
//!    `kvm_run` page) could land in it, and a memslot pointing at the hole would then let a guest
//!    write into it. The differential tests therefore serialise every real-KVM run in a process
//!    (one global lock, [`crate::kvm_lock`]) and create no vCPU while a hole exists.

use std::io;

/// Page size of the host and of the guest (4 KiB).
pub const PAGE: u64 = 4096;

/// The largest hole [`HostRegion::munmap`] makes (contract item 3): smaller than glibc's smallest
/// mmap'd allocation (128 KiB), so the allocator never places a chunk in it.
pub const MAX_HOLE: u64 = 64 * 1024;

/// Why a host memory operation failed.
#[derive(Debug, thiserror::Error)]
pub enum HostMemError {
    /// The range is not page aligned, is empty, or leaves the region.
    #[error("range +{offset:#x}..+{len:#x} is not a page-aligned, non-empty part of the region")]
    BadRange {
        /// Offset of the range in the region.
        offset: u64,
        /// Length of the range.
        len: u64,
    },
    /// A hole larger than [`MAX_HOLE`] was requested.
    #[error("munmap of {len:#x} bytes exceeds the {MAX_HOLE:#x}-byte hole limit")]
    HoleTooLarge {
        /// The requested length.
        len: u64,
    },
    /// The system call failed.
    #[error("{call} failed: {source}")]
    Sys {
        /// Which call.
        call: &'static str,
        /// The errno.
        source: io::Error,
    },
}

/// An anonymous, private, read-write mapping of `len` bytes (4 KiB pages, transparent huge pages
/// off so that KVM maps it 4 KiB at a time like kvmmu's host does below 2 MiB).
#[derive(Debug)]
pub struct HostRegion {
    base: u64,
    len: u64,
}

/// Protection for [`HostRegion::mprotect`] and [`HostRegion::mmap_fixed`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HostProt {
    /// `PROT_READ`.
    Read,
    /// `PROT_READ | PROT_WRITE`.
    ReadWrite,
}

impl HostProt {
    fn bits(self) -> libc::c_int {
        match self {
            HostProt::Read => libc::PROT_READ,
            HostProt::ReadWrite => libc::PROT_READ | libc::PROT_WRITE,
        }
    }
}

fn sys(call: &'static str) -> HostMemError {
    HostMemError::Sys {
        call,
        source: io::Error::last_os_error(),
    }
}

impl HostRegion {
    /// Maps `len` bytes (a positive multiple of [`PAGE`]) of fresh zeroed memory.
    pub fn new(len: u64) -> Result<HostRegion, HostMemError> {
        if len == 0 || !len.is_multiple_of(PAGE) {
            return Err(HostMemError::BadRange { offset: 0, len });
        }
        // SAFETY: a fresh anonymous mapping at an address the kernel chooses aliases nothing.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(sys("mmap"));
        }
        let region = HostRegion {
            base: p as u64,
            len,
        };
        region.no_huge(0, len)?;
        Ok(region)
    }

    /// First host virtual address of the region.
    pub fn base(&self) -> u64 {
        self.base
    }

    /// Length in bytes.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether the region is empty (never: `new` refuses it).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn check(&self, offset: u64, len: u64) -> Result<*mut libc::c_void, HostMemError> {
        let ok = len != 0
            && offset.is_multiple_of(PAGE)
            && len.is_multiple_of(PAGE)
            && offset.checked_add(len).is_some_and(|end| end <= self.len);
        if !ok {
            return Err(HostMemError::BadRange { offset, len });
        }
        Ok((self.base + offset) as *mut libc::c_void)
    }

    fn no_huge(&self, offset: u64, len: u64) -> Result<(), HostMemError> {
        let p = self.check(offset, len)?;
        // SAFETY: advice on a range of our own region (contract items 1, 2); no data changes.
        if unsafe { libc::madvise(p, len as usize, libc::MADV_NOHUGEPAGE) } != 0 {
            return Err(sys("madvise(MADV_NOHUGEPAGE)"));
        }
        Ok(())
    }

    /// `munmap` of part of the region: accesses there fault until [`HostRegion::mmap_fixed`].
    pub fn munmap(&self, offset: u64, len: u64) -> Result<(), HostMemError> {
        if len > MAX_HOLE {
            return Err(HostMemError::HoleTooLarge { len });
        }
        let p = self.check(offset, len)?;
        // SAFETY: the range is ours (contract items 1, 2) and no Rust reference points into it; the
        // hole stays within the size contract item 3 allows.
        if unsafe { libc::munmap(p, len as usize) } != 0 {
            return Err(sys("munmap"));
        }
        Ok(())
    }

    /// `mmap(MAP_FIXED)` of fresh zeroed memory at part of the region, replacing whatever was
    /// there (a hole or old pages).
    pub fn mmap_fixed(&self, offset: u64, len: u64, prot: HostProt) -> Result<(), HostMemError> {
        let p = self.check(offset, len)?;
        // SAFETY: MAP_FIXED only replaces pages of our own region (contract items 1, 2), which no
        // Rust reference points into.
        let q = unsafe {
            libc::mmap(
                p,
                len as usize,
                prot.bits(),
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if q == libc::MAP_FAILED {
            return Err(sys("mmap(MAP_FIXED)"));
        }
        self.no_huge(offset, len)
    }

    /// `mprotect` of part of the region.
    pub fn mprotect(&self, offset: u64, len: u64, prot: HostProt) -> Result<(), HostMemError> {
        let p = self.check(offset, len)?;
        // SAFETY: a range of our own region (contract items 1, 2); nothing in Rust reads or writes
        // it, so no access can be invalidated by the change.
        if unsafe { libc::mprotect(p, len as usize, prot.bits()) } != 0 {
            return Err(sys("mprotect"));
        }
        Ok(())
    }

    /// `madvise(MADV_DONTNEED)`: the pages' contents are dropped; the next access reads zeros.
    pub fn madvise_dontneed(&self, offset: u64, len: u64) -> Result<(), HostMemError> {
        let p = self.check(offset, len)?;
        // SAFETY: a range of our own region (contract items 1, 2), read by no Rust code.
        if unsafe { libc::madvise(p, len as usize, libc::MADV_DONTNEED) } != 0 {
            return Err(sys("madvise(MADV_DONTNEED)"));
        }
        Ok(())
    }

    /// Faults every page of the region in, writable (`MADV_POPULATE_WRITE`), so that a guest's
    /// first touch measures KVM's fault path and not the host's page allocator.
    pub fn populate_write(&self) -> Result<(), HostMemError> {
        const MADV_POPULATE_WRITE: libc::c_int = 23;
        // SAFETY: the whole region is ours (contract item 1); populating changes no contents.
        if unsafe {
            libc::madvise(
                self.base as *mut libc::c_void,
                self.len as usize,
                MADV_POPULATE_WRITE,
            )
        } != 0
        {
            return Err(sys("madvise(MADV_POPULATE_WRITE)"));
        }
        Ok(())
    }

    /// Writes `bytes` at `offset` (setup of guest code and page tables only).
    pub fn write_bytes(&self, offset: u64, bytes: &[u8]) -> Result<(), HostMemError> {
        let len = bytes.len() as u64;
        let ok = offset.checked_add(len).is_some_and(|end| end <= self.len);
        if !ok {
            return Err(HostMemError::BadRange { offset, len });
        }
        // SAFETY: the destination lies inside our region (checked above), is mapped read-write
        // (setup writes happen before any munmap/mprotect of the region, and callers use them only
        // on the reserved region that no test operation touches), and no Rust reference aliases
        // it (contract item 1).
        unsafe {
            std::ptr::copy_nonoverlapping(
                bytes.as_ptr(),
                (self.base + offset) as *mut u8,
                bytes.len(),
            )
        };
        Ok(())
    }
}

impl Drop for HostRegion {
    fn drop(&mut self) {
        // SAFETY: the region is ours (contract item 1); munmap of holes inside it is harmless.
        // Memslots pointing at it belong to VMs that the owner drops first (runner field order).
        unsafe { libc::munmap(self.base as *mut libc::c_void, self.len as usize) };
    }
}
