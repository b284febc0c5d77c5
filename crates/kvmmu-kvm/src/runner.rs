//! A real VM on `/dev/kvm`: memslots, one vCPU in 64-bit mode running the routines of
//! [`crate::guest`], and its exits decoded into kvmmu's vocabulary ([`KvmExit`]).
//!
//! Soundness: KVM reads and writes the host memory a memslot points at on behalf of the guest. A
//! VM with a vCPU therefore only accepts memslots inside the [`HostRegion`]s registered with it
//! ([`KvmVm::adopt`]), whose contract (`hostmem` module doc) keeps every Rust object out of them;
//! a VM without a vCPU never runs a guest, so its memslots may point anywhere (the memslot family
//! probes addresses at the edges of the user address space that way).

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use kvm_bindings::{KVM_MAX_CPUID_ENTRIES, kvm_regs, kvm_segment, kvm_userspace_memory_region};
use kvm_ioctls::{Kvm, VcpuExit as RawExit, VcpuFd, VmFd};

use crate::guest::{self, Routine};
use crate::hostmem::{HostMemError, HostRegion, PAGE};

/// `KVM_CAP_MULTI_ADDRESS_SPACE` (not in kvm-ioctls' `Cap` list).
const KVM_CAP_MULTI_ADDRESS_SPACE: libc::c_ulong = 118;
/// `KVM_GET_STATS_FD`: `_IO(KVMIO, 0xce)`.
const KVM_GET_STATS_FD: libc::c_ulong = 0xaece;
/// `KVM_CLEAR_DIRTY_LOG`: `_IOWR(KVMIO, 0xc0, struct kvm_clear_dirty_log)` (24 bytes).
const KVM_CLEAR_DIRTY_LOG: libc::c_ulong = 0xc018_aec0;
/// `KVM_RESET_DIRTY_RINGS`: `_IO(KVMIO, 0xc7)`.
const KVM_RESET_DIRTY_RINGS: libc::c_ulong = 0xaec7;
/// The vCPU mmap offset of the dirty ring, in pages (`KVM_DIRTY_LOG_PAGE_OFFSET` on x86).
const KVM_DIRTY_LOG_PAGE_OFFSET: u64 = 64;
/// `struct kvm_dirty_gfn` flags.
const KVM_DIRTY_GFN_F_DIRTY: u32 = 1;
const KVM_DIRTY_GFN_F_RESET: u32 = 2;
/// Bytes per `struct kvm_dirty_gfn` (`flags: u32, slot: u32, offset: u64`).
const DIRTY_GFN_BYTES: u64 = 16;

/// The vCPU's mmap'ed dirty ring (`KVM_CAP_DIRTY_LOG_RING`), shared with the kernel.
struct RingMap {
    ptr: *mut u8,
    entries: u64,
    /// Userspace's fetch index (next entry to look at).
    fetch: u64,
}

impl Drop for RingMap {
    fn drop(&mut self) {
        // SAFETY: `ptr` is the start of a mapping of exactly `entries * DIRTY_GFN_BYTES` bytes
        // that this RingMap created and nothing else unmaps; no reference into it outlives self.
        unsafe {
            libc::munmap(self.ptr.cast(), (self.entries * DIRTY_GFN_BYTES) as usize);
        }
    }
}

/// Why real KVM cannot be used here (the tests print it as their one skip line).
#[derive(Debug, thiserror::Error)]
pub enum KvmUnavailable {
    /// `/dev/kvm` is missing.
    #[error("/dev/kvm does not exist")]
    NoDevice,
    /// `/dev/kvm` exists but cannot be opened (permission) or KVM_CREATE_VM failed.
    #[error("cannot use /dev/kvm: {0}")]
    Open(String),
}

/// Why an operation on the real VM failed (setup problems, not guest-visible outcomes).
#[derive(Debug, thiserror::Error)]
pub enum KvmError {
    /// An ioctl failed during setup.
    #[error("{what}: {errno}")]
    Ioctl {
        /// Which operation.
        what: &'static str,
        /// The error.
        errno: kvm_ioctls::Error,
    },
    /// Host memory could not be set up.
    #[error(transparent)]
    HostMem(#[from] HostMemError),
    /// A memslot of a VM that runs a guest must lie inside a region the VM owns.
    #[error("memslot hva {hva:#x}+{size:#x} is outside the host regions this VM owns")]
    ForeignMemory {
        /// The requested host address.
        hva: u64,
        /// The requested size.
        size: u64,
    },
    /// The VM has no vCPU yet ([`KvmVm::enable_guest`] was not called).
    #[error("the VM has no vCPU")]
    NoVcpu,
}

fn ioctl(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> KvmError {
    move |errno| KvmError::Ioctl { what, errno }
}

/// What one run of a routine ended with, in kvmmu's vocabulary (`kvmmu::VcpuExit`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KvmExit {
    /// The routine reached its `hlt`: every access succeeded.
    Hlt,
    /// `KVM_EXIT_MMIO`: no memslot covers `gpa`, or a write to a read-only memslot (kvmmu's
    /// `NoMemslot` / `ReadonlyMemslot`).
    Mmio {
        /// The guest physical address.
        gpa: u64,
        /// A write (else a read).
        write: bool,
    },
    /// `KVM_RUN` failed with `-EFAULT` (kvmmu's `HostFault`): the host refused the page.
    HostFault {
        /// The gpa when the kernel reported `KVM_EXIT_MEMORY_FAULT`.
        gpa: Option<u64>,
    },
    /// Anything else (a shutdown, an entry failure, an unexpected errno): a harness problem.
    Other(String),
}

/// A finished run: how it ended and the registers at that point.
#[derive(Clone, Debug)]
pub struct RunOutcome {
    /// How the run ended.
    pub exit: KvmExit,
    /// General-purpose registers when it ended.
    pub regs: kvm_regs,
}

/// What the memslot ioctl answered: success or the errno.
pub type SlotResult = Result<(), i32>;

/// A real VM, with at most one vCPU.
pub struct KvmVm {
    // Field order is drop order: the vCPU and the VM go before the host memory they point at.
    ring: Option<RingMap>,
    ring_bytes: u32,
    vcpu: Option<VcpuFd>,
    vm: VmFd,
    kvm: Kvm,
    regions: Vec<Arc<HostRegion>>,
    reserved: Option<Arc<HostRegion>>,
    nr_address_spaces: usize,
}

impl std::fmt::Debug for KvmVm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvmVm")
            .field("has_vcpu", &self.vcpu.is_some())
            .field("regions", &self.regions.len())
            .field("nr_address_spaces", &self.nr_address_spaces)
            .finish()
    }
}

impl KvmVm {
    /// Opens `/dev/kvm` and creates a VM (no memslots, no vCPU).
    pub fn open() -> Result<KvmVm, KvmUnavailable> {
        if !std::path::Path::new("/dev/kvm").exists() {
            return Err(KvmUnavailable::NoDevice);
        }
        let kvm = Kvm::new().map_err(|e| KvmUnavailable::Open(format!("open: {e}")))?;
        let vm = kvm
            .create_vm()
            .map_err(|e| KvmUnavailable::Open(format!("KVM_CREATE_VM: {e}")))?;
        let nr = vm.check_extension_raw(KVM_CAP_MULTI_ADDRESS_SPACE).max(1) as usize;
        Ok(KvmVm {
            ring: None,
            ring_bytes: 0,
            vcpu: None,
            vm,
            kvm,
            regions: Vec::new(),
            reserved: None,
            nr_address_spaces: nr,
        })
    }

    /// Address spaces of this VM (`KVM_CAP_MULTI_ADDRESS_SPACE`, 2 with SMM on x86).
    pub fn nr_address_spaces(&self) -> usize {
        self.nr_address_spaces
    }

    /// User memslots per address space (`KVM_CAP_NR_MEMSLOTS`).
    pub fn nr_memslots(&self) -> usize {
        self.kvm.get_nr_memslots()
    }

    /// Registers host memory that memslots of this VM may point at once it runs a guest.
    pub fn adopt(&mut self, region: Arc<HostRegion>) {
        self.regions.push(region);
    }

    fn owns(&self, hva: u64, size: u64) -> bool {
        self.regions.iter().any(|r| {
            hva >= r.base()
                && hva
                    .checked_add(size)
                    .is_some_and(|end| end <= r.base() + r.len())
        })
    }

    /// `KVM_SET_USER_MEMORY_REGION` with `slot = as_id << 16 | id`: `Ok` or the errno. A VM that
    /// runs a guest refuses (with [`KvmError::ForeignMemory`], nothing done) a non-delete request
    /// outside its own regions.
    pub fn set_user_memory_region(
        &self,
        as_id: u16,
        id: u16,
        flags: u32,
        gpa: u64,
        size: u64,
        hva: u64,
    ) -> Result<SlotResult, KvmError> {
        if self.vcpu.is_some() && size != 0 && !self.owns(hva, size) {
            return Err(KvmError::ForeignMemory { hva, size });
        }
        let region = kvm_userspace_memory_region {
            slot: (u32::from(as_id) << 16) | u32::from(id),
            flags,
            guest_phys_addr: gpa,
            memory_size: size,
            userspace_addr: hva,
        };
        // SAFETY: KVM only reaches `hva` on behalf of a running guest, through the kernel's
        // fault-tolerant user-access paths. Without a vCPU no guest runs; with one, the range is
        // inside a HostRegion this VM holds an `Arc` of (checked above), which no Rust object
        // lives in (hostmem contract item 1) and which outlives the VM (field order).
        match unsafe { self.vm.set_user_memory_region(region) } {
            Ok(()) => Ok(Ok(())),
            Err(e) => Ok(Err(e.errno())),
        }
    }

    /// Creates the reserved region (page tables, GDT, routines) and its memslot, and one vCPU in
    /// 64-bit mode. Call once, before any test memslot.
    pub fn enable_guest(&mut self) -> Result<(), KvmError> {
        if self.vcpu.is_some() {
            return Ok(());
        }
        let reserved = Arc::new(HostRegion::new(guest::RESERVED_SIZE)?);
        reserved.write_bytes(0, &guest::reserved_image())?;
        let base = reserved.base();
        self.adopt(Arc::clone(&reserved));
        self.reserved = Some(Arc::clone(&reserved));
        let vcpu = self.vm.create_vcpu(0).map_err(ioctl("KVM_CREATE_VCPU"))?;
        if self.ring_bytes > 0 {
            self.ring = Some(map_ring(&vcpu, self.ring_bytes)?);
        }
        self.vcpu = Some(vcpu);
        self.set_user_memory_region(
            0,
            guest::RESERVED_SLOT,
            0,
            guest::RESERVED_GPA,
            guest::RESERVED_SIZE,
            base,
        )?
        .map_err(|e| KvmError::Ioctl {
            what: "reserved memslot",
            errno: kvm_ioctls::Error::new(e),
        })?;
        let cpuid = self
            .kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(ioctl("KVM_GET_SUPPORTED_CPUID"))?;
        let vcpu = self.vcpu.as_mut().ok_or(KvmError::NoVcpu)?;
        vcpu.set_cpuid2(&cpuid).map_err(ioctl("KVM_SET_CPUID2"))?;
        let mut sregs = vcpu.get_sregs().map_err(ioctl("KVM_GET_SREGS"))?;
        let code = kvm_segment {
            base: 0,
            limit: 0xffff_ffff,
            selector: 0x08,
            type_: 0xb,
            present: 1,
            dpl: 0,
            db: 0,
            s: 1,
            l: 1,
            g: 1,
            avl: 0,
            unusable: 0,
            padding: 0,
        };
        let data = kvm_segment {
            selector: 0x10,
            type_: 0x3,
            db: 1,
            l: 0,
            ..code
        };
        sregs.cs = code;
        sregs.ds = data;
        sregs.es = data;
        sregs.fs = data;
        sregs.gs = data;
        sregs.ss = data;
        sregs.gdt.base = guest::RESERVED_GPA + guest::GDT_OFFSET;
        sregs.gdt.limit = 23;
        sregs.cr3 = guest::RESERVED_GPA + guest::PML4_OFFSET;
        sregs.cr4 = 0x20; // PAE
        sregs.cr0 = 0x8005_0033; // PG | AM | WP | NE | ET | MP | PE
        sregs.efer = 0x500; // LMA | LME
        vcpu.set_sregs(&sregs).map_err(ioctl("KVM_SET_SREGS"))?;
        Ok(())
    }

    /// Writes the gpa list of [`Routine::StoreList`] (at most [`guest::LIST_CAPACITY`] entries).
    pub fn set_list(&self, gpas: &[u64]) -> Result<(), KvmError> {
        let reserved = self.reserved.as_ref().ok_or(KvmError::NoVcpu)?;
        let gpas = &gpas[..gpas.len().min(guest::LIST_CAPACITY)];
        let bytes: Vec<u8> = gpas.iter().flat_map(|g| g.to_le_bytes()).collect();
        reserved.write_bytes(guest::LIST_OFFSET, &bytes)?;
        Ok(())
    }

    /// Runs `routine` with `rdi`, `rsi`, `rdx` set, until its `hlt` or the first other exit. An
    /// MMIO exit is completed at once (reads see 0) without running further guest code, so the
    /// next run starts clean.
    pub fn run(
        &mut self,
        routine: Routine,
        rdi: u64,
        rsi: u64,
        rdx: u64,
    ) -> Result<RunOutcome, KvmError> {
        let vcpu = self.vcpu.as_mut().ok_or(KvmError::NoVcpu)?;
        let regs = kvm_regs {
            rip: routine.gpa(),
            rdi,
            rsi,
            rdx,
            rflags: 0x2,
            rsp: guest::RESERVED_GPA + guest::LIST_OFFSET,
            ..Default::default()
        };
        vcpu.set_regs(&regs).map_err(ioctl("KVM_SET_REGS"))?;
        let exit = loop {
            let exit = match vcpu.run() {
                Ok(RawExit::Hlt) => KvmExit::Hlt,
                Ok(RawExit::MmioRead(gpa, data)) => {
                    data.fill(0);
                    KvmExit::Mmio { gpa, write: false }
                }
                Ok(RawExit::MmioWrite(gpa, _)) => KvmExit::Mmio { gpa, write: true },
                Ok(RawExit::MemoryFault { gpa, .. }) => KvmExit::HostFault { gpa: Some(gpa) },
                Ok(RawExit::Intr) => continue,
                Ok(other) => KvmExit::Other(format!("{other:?}")),
                Err(e) if e.errno() == libc::EFAULT => KvmExit::HostFault { gpa: None },
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => continue,
                Err(e) => KvmExit::Other(format!("KVM_RUN: {e}")),
            };
            break exit;
        };
        let regs = vcpu.get_regs().map_err(ioctl("KVM_GET_REGS"))?;
        if matches!(exit, KvmExit::Mmio { .. }) {
            // Complete the emulated access now (immediate_exit: KVM finishes pending MMIO, then
            // returns -EINTR without entering the guest), so setting registers for the next run
            // is not undone by a late completion.
            vcpu.set_kvm_immediate_exit(1);
            let r = vcpu.run().map(|_| ());
            vcpu.set_kvm_immediate_exit(0);
            match r {
                Err(e) if e.errno() == libc::EINTR => {}
                Ok(()) => {}
                Err(e) => {
                    return Ok(RunOutcome {
                        exit: KvmExit::Other(format!("completing MMIO: {e}")),
                        regs,
                    });
                }
            }
        }
        Ok(RunOutcome { exit, regs })
    }

    /// `KVM_CHECK_EXTENSION` on the VM fd: 0 when `cap` is not supported.
    pub fn check_extension(&self, cap: u32) -> i32 {
        self.vm.check_extension_raw(libc::c_ulong::from(cap))
    }

    /// `KVM_ENABLE_CAP(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2)` with `MANUAL_PROTECT_ENABLE`, plus
    /// `INITIALLY_SET` if asked: `Ok` or the errno.
    pub fn enable_manual_dirty_log_protect(&self, initially_set: bool) -> SlotResult {
        let mut cap = kvm_bindings::kvm_enable_cap {
            cap: kvm_bindings::KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
            ..Default::default()
        };
        cap.args[0] = u64::from(kvm_bindings::KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE)
            | if initially_set {
                u64::from(kvm_bindings::KVM_DIRTY_LOG_INITIALLY_SET)
            } else {
                0
            };
        self.vm.enable_cap(&cap).map_err(|e| e.errno())
    }

    /// `KVM_GET_DIRTY_LOG` of slot `as_id << 16 | id` of `npages` pages: the bitmap (one bit per
    /// page, `npages.div_ceil(64)` words) or the errno.
    pub fn get_dirty_log(&self, as_id: u16, id: u16, npages: u64) -> Result<Vec<u64>, i32> {
        let slot = (u32::from(as_id) << 16) | u32::from(id);
        self.vm
            .get_dirty_log(slot, (npages * PAGE) as usize)
            .map_err(|e| e.errno())
    }

    /// `KVM_CLEAR_DIRTY_LOG` of pages `[first_page, first_page + num_pages)` of slot
    /// `as_id << 16 | id`, where `mask` (word `i` bit `b` = page `first_page + 64 * i + b`) is
    /// set: `Ok` or the errno. `mask` must hold `num_pages.div_ceil(64)` words (the kernel reads
    /// that many); a shorter mask is refused with `EINVAL` without calling the kernel.
    pub fn clear_dirty_log(
        &self,
        as_id: u16,
        id: u16,
        first_page: u64,
        num_pages: u32,
        mask: &[u64],
    ) -> SlotResult {
        if (mask.len() as u64) < u64::from(num_pages).div_ceil(64) {
            return Err(libc::EINVAL);
        }
        let mut words = mask.to_vec();
        let log = kvm_bindings::kvm_clear_dirty_log {
            slot: (u32::from(as_id) << 16) | u32::from(id),
            num_pages,
            first_page,
            __bindgen_anon_1: kvm_bindings::kvm_clear_dirty_log__bindgen_ty_1 {
                dirty_bitmap: words.as_mut_ptr().cast(),
            },
        };
        // SAFETY: KVM_CLEAR_DIRTY_LOG reads the struct and `num_pages.div_ceil(64)` words from
        // `dirty_bitmap`, which `words` holds (checked above) and outlives the call; the kernel
        // writes nothing back.
        let r = unsafe { libc::ioctl(self.vm.as_raw_fd(), KVM_CLEAR_DIRTY_LOG as _, &log) };
        if r < 0 {
            Err(std::io::Error::last_os_error()
                .raw_os_error()
                .unwrap_or(libc::EIO))
        } else {
            Ok(())
        }
    }

    /// `KVM_ENABLE_CAP(KVM_CAP_DIRTY_LOG_RING)` with a ring of `bytes` bytes per vCPU (16 per
    /// entry); call before [`KvmVm::enable_guest`], which then maps the vCPU's ring. `Ok` or the
    /// errno.
    pub fn enable_dirty_ring(&mut self, bytes: u32) -> SlotResult {
        if self.vcpu.is_some() {
            return Err(libc::EINVAL);
        }
        let mut cap = kvm_bindings::kvm_enable_cap {
            cap: kvm_bindings::KVM_CAP_DIRTY_LOG_RING,
            ..Default::default()
        };
        cap.args[0] = u64::from(bytes);
        self.vm.enable_cap(&cap).map_err(|e| e.errno())?;
        self.ring_bytes = bytes;
        Ok(())
    }

    /// Collects every dirty entry of the vCPU's ring as `(slot, offset)` in push order, marks
    /// them for reset, and calls `KVM_RESET_DIRTY_RINGS` (which write-protects their pages
    /// again). Call between runs only.
    pub fn harvest_dirty_ring(&mut self) -> Result<Vec<(u32, u64)>, KvmError> {
        let ring = self.ring.as_mut().ok_or(KvmError::NoVcpu)?;
        let mut out = Vec::new();
        loop {
            let at = (ring.fetch % ring.entries) * DIRTY_GFN_BYTES;
            // SAFETY: `at` is a 16-byte-aligned entry inside the mapping (`fetch % entries`);
            // the kernel writes entries concurrently only through atomic publication of `flags`,
            // which is read atomically here, and it writes `slot` and `offset` before
            // publishing (ordered by the Acquire below). `flags` is 4-byte aligned.
            let (flags, slot, offset) = unsafe {
                let e = ring.ptr.add(at as usize);
                let flags = &*e.cast::<AtomicU32>();
                // ORDERING: Acquire pairs with the kernel's release of DIRTY after it wrote
                // `slot` and `offset` (kvm_dirty_gfn_set_dirtied, smp_store_release).
                let f = flags.load(Ordering::Acquire);
                let slot = std::ptr::read_volatile(e.add(4).cast::<u32>());
                let offset = std::ptr::read_volatile(e.add(8).cast::<u64>());
                (f, slot, offset)
            };
            if flags & KVM_DIRTY_GFN_F_DIRTY == 0 {
                break;
            }
            out.push((slot, offset));
            // SAFETY: as above, the same entry.
            unsafe {
                let flags = &*ring.ptr.add(at as usize).cast::<AtomicU32>();
                // ORDERING: Release pairs with the kernel's acquire read of RESET in
                // KVM_RESET_DIRTY_RINGS (our reads of the entry happen before it is reused).
                flags.store(KVM_DIRTY_GFN_F_RESET, Ordering::Release);
            }
            ring.fetch += 1;
        }
        // SAFETY: KVM_RESET_DIRTY_RINGS takes no argument.
        let r = unsafe { libc::ioctl(self.vm.as_raw_fd(), KVM_RESET_DIRTY_RINGS as _) };
        if r < 0 {
            return Err(KvmError::Ioctl {
                what: "KVM_RESET_DIRTY_RINGS",
                errno: kvm_ioctls::Error::last(),
            });
        }
        Ok(out)
    }

    /// The VM's binary statistics (`KVM_GET_STATS_FD`), by name.
    pub fn vm_stats(&self) -> Result<crate::stats::KvmStats, crate::stats::StatsError> {
        stats_fd(self.vm.as_raw_fd()).and_then(|fd| crate::stats::KvmStats::read(&fd))
    }

    /// The vCPU's binary statistics (`KVM_GET_STATS_FD` on the vCPU fd), by name.
    pub fn vcpu_stats(&self) -> Result<crate::stats::KvmStats, crate::stats::StatsError> {
        let vcpu = self.vcpu.as_ref().ok_or(crate::stats::StatsError::NoVcpu)?;
        stats_fd(vcpu.as_raw_fd()).and_then(|fd| crate::stats::KvmStats::read(&fd))
    }

    /// Probes the host's limits for memslots: one past the largest accepted `hva + size`, and one
    /// past the largest accepted `gpa + size` (`kvm_mmu_max_gfn`). Needs a VM without memslots
    /// in slot 0 of address space 0; leaves none behind.
    pub fn probe_limits(&self) -> Result<HostLimits, KvmError> {
        let mut hva_end = None;
        for end in [1u64 << 57, (1 << 56) - PAGE, 1 << 47, (1 << 47) - PAGE] {
            if self.set_user_memory_region(0, 0, 0, 0, PAGE, end - PAGE)? == Ok(()) {
                self.set_user_memory_region(0, 0, 0, 0, 0, 0)?.ok();
                hva_end = Some(end);
                break;
            }
        }
        let mut gpa_end = None;
        for bits in (32..=57).rev() {
            let end = 1u64 << bits;
            if self.set_user_memory_region(0, 0, 0, end - PAGE, PAGE, 1 << 20)? == Ok(()) {
                self.set_user_memory_region(0, 0, 0, 0, 0, 0)?.ok();
                gpa_end = Some(end);
                break;
            }
        }
        Ok(HostLimits {
            hva_end: hva_end.unwrap_or(1 << 47),
            gpa_end: gpa_end.unwrap_or(1 << 36),
        })
    }
}

/// Limits of a host (or of kvmmu) that memslot requests are checked against.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HostLimits {
    /// One past the largest host address a memslot may end at.
    pub hva_end: u64,
    /// One past the largest guest physical address a memslot may end at.
    pub gpa_end: u64,
}

/// Maps the dirty ring of `vcpu` (`bytes` bytes at page offset `KVM_DIRTY_LOG_PAGE_OFFSET`).
fn map_ring(vcpu: &VcpuFd, bytes: u32) -> Result<RingMap, KvmError> {
    // SAFETY: a fresh shared mapping of the vCPU fd's ring pages, at an address the kernel
    // chooses; nothing else refers to it. Failure is checked below.
    let ptr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            bytes as usize,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            vcpu.as_raw_fd(),
            (KVM_DIRTY_LOG_PAGE_OFFSET * PAGE) as libc::off_t,
        )
    };
    if ptr == libc::MAP_FAILED {
        return Err(KvmError::Ioctl {
            what: "mmap of the dirty ring",
            errno: kvm_ioctls::Error::last(),
        });
    }
    Ok(RingMap {
        ptr: ptr.cast(),
        entries: u64::from(bytes) / DIRTY_GFN_BYTES,
        fetch: 0,
    })
}

fn stats_fd(fd: i32) -> Result<OwnedFd, crate::stats::StatsError> {
    // SAFETY: KVM_GET_STATS_FD takes no argument and returns a new fd or -1.
    let r = unsafe { libc::ioctl(fd, KVM_GET_STATS_FD as _) };
    if r < 0 {
        return Err(crate::stats::StatsError::Io(std::io::Error::last_os_error()));
    }
    // SAFETY: the kernel just returned this fd to us; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(r) })
}
