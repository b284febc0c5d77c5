//! The minimal 64-bit guest: identity-mapped page tables, a GDT and a few routines, assembled here
//! as bytes, all in one reserved guest region (its own memslot) that no test operation touches.
//!
//! Layout of the reserved region (offsets from [`RESERVED_GPA`]):
//!
//! | offset | contents |
//! |---|---|
//! | `0x0000` | PML4: entry 0 → PDPT |
//! | `0x1000` | PDPT: entries 0..4 → the four page directories |
//! | `0x2000..0x6000` | four PDs of 2 MiB leaves: guest virtual = guest physical over `[0, 4 GiB)` |
//! | `0x6000` | GDT: null, 64-bit code (`0x08`), data (`0x10`) |
//! | `0x7000` | the routines ([`Routine`]) |
//! | `0x10000..` | the gpa list of [`Routine::StoreList`] |
//!
//! Guest page tables use 2 MiB leaves, so the guest itself never needs more than six table pages;
//! the host backs everything with 4 KiB pages, and KVM's MMU maps 4 KiB at a time.

/// Guest physical base of the reserved region (2 MiB below 4 GiB).
pub const RESERVED_GPA: u64 = 0xffe0_0000;
/// Size of the reserved region.
pub const RESERVED_SIZE: u64 = 0x10_0000;
/// Tests may use guest physical addresses below this (the identity map covers `[0, 4 GiB)`, and
/// the reserved region sits above it).
pub const GUEST_GPA_LIMIT: u64 = 0xc000_0000;
/// Slot id of the reserved region (the highest user slot, which the data tests never use).
pub const RESERVED_SLOT: u16 = 32763;

/// Offset of the PML4 in the reserved region.
pub const PML4_OFFSET: u64 = 0x0;
const PDPT_OFFSET: u64 = 0x1000;
const PD_OFFSET: u64 = 0x2000;
/// Offset of the GDT in the reserved region.
pub const GDT_OFFSET: u64 = 0x6000;
/// Offset of the routines in the reserved region.
pub const CODE_OFFSET: u64 = 0x7000;
/// Offset of the gpa list of [`Routine::StoreList`].
pub const LIST_OFFSET: u64 = 0x1_0000;
/// Entries the gpa list holds.
pub const LIST_CAPACITY: usize = ((RESERVED_SIZE - LIST_OFFSET) / 8) as usize;

/// A routine of the guest. Each starts at its own fixed offset in the code page and ends in `hlt`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Routine {
    /// `mov [rdi], rsi; hlt`: one 8-byte write.
    Store,
    /// `mov rax, [rdi]; hlt`: one 8-byte read, the value in `rax`.
    Load,
    /// For `rcx` from 0 while `rcx < rdx`: `mov rax, [rdi + rcx*8]; mov [rax], rsi + rcx`; then
    /// `hlt`. `rcx` tells how far it got when an access exits.
    StoreList,
    /// For `rdi` from its value while `rdi < rdx`, step 4 KiB: `mov [rdi], rsi`; then `hlt` (the
    /// populate / re-touch loop of the timing workload).
    StoreStride,
    /// For `rdi` from its value while `rdi < rdx`, step 4 KiB: `mov rax, [rdi]`; then `hlt` (the
    /// re-touch loop of the timing workload, reads as in the default run).
    LoadStride,
    /// `hlt` alone.
    Halt,
}

impl Routine {
    /// Every routine, in code-page order.
    pub const ALL: [Routine; 6] = [
        Routine::Store,
        Routine::Load,
        Routine::StoreList,
        Routine::StoreStride,
        Routine::LoadStride,
        Routine::Halt,
    ];

    /// Offset of the routine from the start of the code page.
    pub fn offset(self) -> u64 {
        match self {
            Routine::Store => 0x00,
            Routine::Load => 0x10,
            Routine::StoreList => 0x20,
            Routine::StoreStride => 0x60,
            Routine::LoadStride => 0xa0,
            Routine::Halt => 0xe0,
        }
    }

    /// The guest physical (= virtual) address of the routine.
    pub fn gpa(self) -> u64 {
        RESERVED_GPA + CODE_OFFSET + self.offset()
    }

    /// The machine code.
    pub fn bytes(self) -> Vec<u8> {
        const HLT: u8 = 0xf4;
        match self {
            // mov [rdi], rsi
            Routine::Store => vec![0x48, 0x89, 0x37, HLT],
            // mov rax, [rdi]
            Routine::Load => vec![0x48, 0x8b, 0x07, HLT],
            Routine::StoreList => {
                let mut c = vec![0x31, 0xc9]; // xor ecx, ecx
                let top = c.len();
                c.extend([0x48, 0x39, 0xd1]); // cmp rcx, rdx
                c.extend([0x73, 0x00]); // jae done (patched)
                let jae = c.len() - 1;
                c.extend([0x48, 0x8b, 0x04, 0xcf]); // mov rax, [rdi + rcx*8]
                c.extend([0x49, 0x89, 0xf0]); // mov r8, rsi
                c.extend([0x49, 0x01, 0xc8]); // add r8, rcx
                c.extend([0x4c, 0x89, 0x00]); // mov [rax], r8
                c.extend([0x48, 0xff, 0xc1]); // inc rcx
                c.extend([0xeb, 0x00]); // jmp top (patched)
                let jmp = c.len() - 1;
                c[jmp] = rel8(top, c.len());
                c[jae] = rel8(c.len(), jae + 1);
                c.push(HLT);
                c
            }
            Routine::StoreStride | Routine::LoadStride => {
                let mut c = Vec::new();
                let top = c.len();
                c.extend([0x48, 0x39, 0xd7]); // cmp rdi, rdx
                c.extend([0x73, 0x00]); // jae done (patched)
                let jae = c.len() - 1;
                if self == Routine::StoreStride {
                    c.extend([0x48, 0x89, 0x37]); // mov [rdi], rsi
                } else {
                    c.extend([0x48, 0x8b, 0x07]); // mov rax, [rdi]
                }
                c.extend([0x48, 0x81, 0xc7, 0x00, 0x10, 0x00, 0x00]); // add rdi, 0x1000
                c.extend([0xeb, 0x00]); // jmp top (patched)
                let jmp = c.len() - 1;
                c[jmp] = rel8(top, c.len());
                c[jae] = rel8(c.len(), jae + 1);
                c.push(HLT);
                c
            }
            Routine::Halt => vec![HLT],
        }
    }
}

/// The rel8 displacement of a jump whose next instruction is at `next` to `target`.
fn rel8(target: usize, next: usize) -> u8 {
    let d = target as i64 - next as i64;
    debug_assert!((-128..128).contains(&d), "rel8 out of range");
    d as i8 as u8
}

/// The contents of the reserved region's first pages: page tables, GDT and code, as one image to
/// copy at offset 0.
pub fn reserved_image() -> Vec<u8> {
    let mut img = vec![0u8; (CODE_OFFSET + 0x1000) as usize];
    let put = |img: &mut Vec<u8>, off: u64, v: u64| {
        img[off as usize..off as usize + 8].copy_from_slice(&v.to_le_bytes());
    };
    const P: u64 = 1; // present
    const RW: u64 = 2;
    const PS: u64 = 1 << 7; // 2 MiB leaf
    put(&mut img, PML4_OFFSET, (RESERVED_GPA + PDPT_OFFSET) | P | RW);
    for pd in 0..4u64 {
        let pd_off = PD_OFFSET + pd * 0x1000;
        put(
            &mut img,
            PDPT_OFFSET + pd * 8,
            (RESERVED_GPA + pd_off) | P | RW,
        );
        for e in 0..512u64 {
            let gpa = (pd << 30) | (e << 21);
            put(&mut img, pd_off + e * 8, gpa | P | RW | PS);
        }
    }
    // GDT: null; code: present, DPL 0, S, execute/read, L; data: present, S, read/write, G, DB.
    put(&mut img, GDT_OFFSET + 8, 0x00af_9b00_0000_ffff);
    put(&mut img, GDT_OFFSET + 16, 0x00cf_9300_0000_ffff);
    for r in Routine::ALL {
        let off = (CODE_OFFSET + r.offset()) as usize;
        let b = r.bytes();
        img[off..off + b.len()].copy_from_slice(&b);
    }
    img
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routines_fit_their_slots_and_end_in_hlt() {
        let mut offs: Vec<_> = Routine::ALL.iter().map(|r| (r.offset(), *r)).collect();
        offs.sort_by_key(|o| o.0);
        for w in offs.windows(2) {
            let len = w[0].1.bytes().len() as u64;
            assert!(w[0].0 + len <= w[1].0, "{:?} overlaps {:?}", w[0].1, w[1].1);
        }
        for r in Routine::ALL {
            assert_eq!(r.bytes().last(), Some(&0xf4), "{r:?} ends in hlt");
        }
    }

    #[test]
    fn identity_map_covers_the_guest_limit_and_the_reserved_region() {
        let img = reserved_image();
        let pd_entry = |gpa: u64| {
            let pd = gpa >> 30;
            let e = (gpa >> 21) & 511;
            let off = (PD_OFFSET + pd * 0x1000 + e * 8) as usize;
            u64::from_le_bytes(img[off..off + 8].try_into().unwrap())
        };
        for gpa in [0, GUEST_GPA_LIMIT - 1, RESERVED_GPA] {
            assert_eq!(pd_entry(gpa) & !0xfff, gpa & !((1 << 21) - 1));
        }
    }
}
