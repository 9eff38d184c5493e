//! Guest linear addresses through the guest's own page tables, as the CPU walks them in
//! long mode (4-level, or 5-level with CR4.LA57): present, writable and user bits checked
//! for the access, accessed and dirty bits set, and a page fault's error code computed
//! exactly when the walk fails.

use ftvm_devices::GuestMem;
use vm_memory::{Bytes, GuestAddress};

const PTE_P: u64 = 1 << 0;
const PTE_W: u64 = 1 << 1;
const PTE_U: u64 = 1 << 2;
const PTE_A: u64 = 1 << 5;
const PTE_D: u64 = 1 << 6;
const PTE_PS: u64 = 1 << 7;
const PTE_NX: u64 = 1 << 63;
/// Physical-address bits of a table entry (bits 12-51).
const PTE_ADDR: u64 = 0x000f_ffff_ffff_f000;
const CR0_WP: u64 = 1 << 16;
const CR4_LA57: u64 = 1 << 12;
const CR4_SMAP: u64 = 1 << 21;
const CR4_SMEP: u64 = 1 << 20;
const EFER_NXE: u64 = 1 << 11;
const RFLAGS_AC: u64 = 1 << 18;

/// Page-fault error-code bits.
const PF_PRESENT: u32 = 1 << 0;
const PF_WRITE: u32 = 1 << 1;
const PF_USER: u32 = 1 << 2;
const PF_RSVD: u32 = 1 << 3;
const PF_FETCH: u32 = 1 << 4;

/// What an access is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// A data read.
    Read,
    /// A data write.
    Write,
    /// An instruction fetch.
    Fetch,
}

/// The paging state of the vCPU.
#[derive(Debug, Clone, Copy)]
pub struct Paging {
    /// CR0.
    pub cr0: u64,
    /// CR3.
    pub cr3: u64,
    /// CR4.
    pub cr4: u64,
    /// EFER.
    pub efer: u64,
    /// The current privilege level.
    pub cpl: u8,
    /// RFLAGS (its AC bit lifts SMAP for explicit supervisor accesses).
    pub rflags: u64,
}

/// Why a linear address could not be used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WalkError {
    /// The access faults: the guest gets a #PF with this error code and CR2.
    PageFault {
        /// The #PF error code.
        error_code: u32,
        /// The faulting linear address (CR2).
        address: u64,
    },
    /// A table or the page itself lies outside guest RAM (the guest maps MMIO or
    /// nothing there): the VMM cannot complete the access.
    NotRam {
        /// The guest-physical address.
        gpa: u64,
    },
    /// The address is not canonical: the guest gets a #GP(0) (or #SS for stack accesses).
    NonCanonical {
        /// The linear address.
        address: u64,
    },
}

impl Paging {
    /// Translates `linear` for `access`, as an explicit access at the current privilege
    /// (`implicit`: a supervisor access the CPU makes itself, e.g. to the IDT or a stack
    /// during exception delivery, which SMAP and the user bit do not restrict for CPL0).
    /// Sets the accessed bits along the walk and the dirty bit of the page for writes.
    pub fn translate(
        &self,
        mem: &GuestMem,
        linear: u64,
        access: Access,
        implicit: bool,
    ) -> Result<u64, WalkError> {
        let la57 = self.cr4 & CR4_LA57 != 0;
        let bits = if la57 { 57 } else { 48 };
        let shifted = (linear as i64) << (64 - bits) >> (64 - bits);
        if shifted as u64 != linear {
            return Err(WalkError::NonCanonical { address: linear });
        }
        let user = self.cpl == 3 && !implicit;
        let fault = |extra: u32| WalkError::PageFault {
            error_code: extra
                | if user { PF_USER } else { 0 }
                | match access {
                    Access::Write => PF_WRITE,
                    Access::Fetch => PF_FETCH,
                    Access::Read => 0,
                },
            address: linear,
        };
        let levels: u32 = if la57 { 5 } else { 4 };
        let mut table = self.cr3 & PTE_ADDR;
        // The permissions of a translation are the most restrictive along the walk.
        let mut writable = true;
        let mut user_page = true;
        let mut no_exec = false;
        let mut entries: Vec<(u64, u64)> = Vec::with_capacity(levels as usize);
        for level in (1..=levels).rev() {
            let index = (linear >> (12 + 9 * (level - 1))) & 0x1ff;
            let entry_gpa = table + index * 8;
            let entry: u64 = mem
                .read_obj(GuestAddress(entry_gpa))
                .map_err(|_| WalkError::NotRam { gpa: entry_gpa })?;
            if entry & PTE_P == 0 {
                return Err(fault(0));
            }
            if entry & PTE_NX != 0 && self.efer & EFER_NXE == 0 {
                return Err(fault(PF_PRESENT | PF_RSVD));
            }
            writable &= entry & PTE_W != 0;
            user_page &= entry & PTE_U != 0;
            no_exec |= entry & PTE_NX != 0;
            entries.push((entry_gpa, entry));
            let large = entry & PTE_PS != 0 && (level == 2 || level == 3);
            if level == 1 || large {
                let page_bits = 12 + 9 * (level - 1);
                let page_mask = (1u64 << page_bits) - 1;
                let gpa = (entry & PTE_ADDR & !page_mask) | (linear & page_mask);
                self.check(access, user, implicit, writable, user_page, no_exec)
                    .map_err(|()| fault(PF_PRESENT))?;
                self.set_accessed(mem, &entries, access)?;
                return Ok(gpa);
            }
            table = entry & PTE_ADDR;
        }
        unreachable!("the walk ends at level 1 at the latest")
    }

    /// The permission checks of a present translation.
    fn check(
        &self,
        access: Access,
        user: bool,
        implicit: bool,
        writable: bool,
        user_page: bool,
        no_exec: bool,
    ) -> Result<(), ()> {
        if user && !user_page {
            return Err(());
        }
        match access {
            Access::Write if !writable && (user || self.cr0 & CR0_WP != 0) => return Err(()),
            Access::Fetch if no_exec && self.efer & EFER_NXE != 0 => return Err(()),
            Access::Fetch if !user && user_page && self.cr4 & CR4_SMEP != 0 => return Err(()),
            _ => {}
        }
        let smap_applies = !user
            && user_page
            && access != Access::Fetch
            && self.cr4 & CR4_SMAP != 0
            && (implicit || self.rflags & RFLAGS_AC == 0);
        if smap_applies {
            return Err(());
        }
        Ok(())
    }

    /// Sets the accessed bit of every entry of the walk, and the dirty bit of the last
    /// one for a write, as the CPU does.
    fn set_accessed(
        &self,
        mem: &GuestMem,
        entries: &[(u64, u64)],
        access: Access,
    ) -> Result<(), WalkError> {
        let last = entries.len() - 1;
        for (i, &(gpa, entry)) in entries.iter().enumerate() {
            let mut updated = entry | PTE_A;
            if i == last && access == Access::Write {
                updated |= PTE_D;
            }
            if updated != entry {
                mem.write_obj(updated, GuestAddress(gpa))
                    .map_err(|_| WalkError::NotRam { gpa })?;
            }
        }
        Ok(())
    }

    /// Reads `buf.len()` bytes at `linear`, page by page.
    pub fn read(
        &self,
        mem: &GuestMem,
        linear: u64,
        buf: &mut [u8],
        access: Access,
        implicit: bool,
    ) -> Result<(), WalkError> {
        let mut done = 0;
        while done < buf.len() {
            let la = linear.wrapping_add(done as u64);
            let n = (buf.len() - done).min(4096 - (la & 0xfff) as usize);
            let gpa = self.translate(mem, la, access, implicit)?;
            mem.read_slice(&mut buf[done..done + n], GuestAddress(gpa))
                .map_err(|_| WalkError::NotRam { gpa })?;
            done += n;
        }
        Ok(())
    }

    /// Writes `buf` at `linear`. Every page is translated (and may fault) before any
    /// byte is written, so a faulting write changes nothing.
    pub fn write(
        &self,
        mem: &GuestMem,
        linear: u64,
        buf: &[u8],
        implicit: bool,
    ) -> Result<(), WalkError> {
        let mut pieces = Vec::with_capacity(2);
        let mut done = 0;
        while done < buf.len() {
            let la = linear.wrapping_add(done as u64);
            let n = (buf.len() - done).min(4096 - (la & 0xfff) as usize);
            pieces.push((self.translate(mem, la, Access::Write, implicit)?, done, n));
            done += n;
        }
        for (gpa, at, n) in pieces {
            mem.write_slice(&buf[at..at + n], GuestAddress(gpa))
                .map_err(|_| WalkError::NotRam { gpa })?;
        }
        Ok(())
    }
}
