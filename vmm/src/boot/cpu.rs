//! The vCPU's state at kernel entry: boot GDT and identity page tables in guest memory,
//! 64-bit long-mode segment and control registers, general registers per the Linux
//! 64-bit boot protocol, FPU defaults, and a software-enabled local APIC.

use ftvm_devices::GuestMem;
use kvm_bindings::{kvm_fpu, kvm_msr_entry, kvm_regs, kvm_segment, kvm_sregs, Msrs};
use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress};

use super::BootError;
use crate::layout;

const X86_CR0_PE: u64 = 1 << 0;
const X86_CR0_ET: u64 = 1 << 4;
const X86_CR0_PG: u64 = 1 << 31;
const X86_CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MISC_ENABLE_FAST_STRING: u64 = 1;

/// Boot GDT: null, null, `__BOOT_CS` (0x10), `__BOOT_DS` (0x18), and a TSS (0x20) so TR
/// holds a usable segment at entry.
pub const BOOT_GDT_ENTRIES: [u64; 5] = [
    0,
    0,
    gdt_entry(0xa09b, 0, 0xfffff),
    gdt_entry(0xc093, 0, 0xfffff),
    gdt_entry(0x808b, 0, 0xfffff),
];
/// Selector of the boot code segment.
pub const BOOT_CS: u16 = 0x10;
/// Selector of the boot data segment.
pub const BOOT_DS: u16 = 0x18;
/// Selector of the boot TSS.
pub const BOOT_TSS: u16 = 0x20;

/// Encodes a GDT descriptor from flags (access byte in bits 0-7, granularity nibble in
/// bits 12-15), base and limit.
const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << 32)
        | ((flags as u64 & 0xf0ff) << 40)
        | ((limit as u64 & 0x000f_0000) << 32)
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0x0000_ffff)
}

/// The KVM segment register form of GDT entry `index`.
fn segment(index: usize) -> kvm_segment {
    segment_from_descriptor(BOOT_GDT_ENTRIES[index], (index * 8) as u16)
}

/// The KVM segment register form of the 8-byte code or data segment descriptor `e`,
/// loaded with `selector`.
pub fn segment_from_descriptor(e: u64, selector: u16) -> kvm_segment {
    let limit = ((e & 0xffff) | ((e >> 32) & 0xf_0000)) as u32;
    let g = ((e >> 55) & 1) as u8;
    kvm_segment {
        base: ((e >> 16) & 0xff_ffff | ((e >> 32) & 0xff00_0000)),
        limit: if g == 1 { (limit << 12) | 0xfff } else { limit },
        selector,
        type_: ((e >> 40) & 0xf) as u8,
        present: ((e >> 47) & 1) as u8,
        dpl: ((e >> 45) & 3) as u8,
        db: ((e >> 54) & 1) as u8,
        s: ((e >> 44) & 1) as u8,
        l: ((e >> 53) & 1) as u8,
        g,
        avl: ((e >> 52) & 1) as u8,
        unusable: if (e >> 47) & 1 == 1 { 0 } else { 1 },
        padding: 0,
    }
}

/// Writes the boot GDT, an empty IDT and page tables identity-mapping the first 4 GiB
/// with 2 MiB pages (PML4 -> one PDPT -> four PDs).
pub fn write_boot_tables(mem: &GuestMem) -> Result<(), BootError> {
    let write = |what, bytes: &[u8], at: u64| {
        mem.write_slice(bytes, GuestAddress(at))
            .map_err(|_| BootError::Write { what })
    };
    let gdt: Vec<u8> = BOOT_GDT_ENTRIES
        .iter()
        .flat_map(|e| e.to_le_bytes())
        .collect();
    write("the boot GDT", &gdt, layout::BOOT_GDT)?;
    write("the boot IDT", &0u64.to_le_bytes(), layout::BOOT_IDT)?;
    const PRESENT_WRITABLE: u64 = 0x3;
    const HUGE: u64 = 0x80;
    write(
        "the PML4",
        &(layout::PDPT | PRESENT_WRITABLE).to_le_bytes(),
        layout::PML4,
    )?;
    let pdpt: Vec<u8> = (0..4u64)
        .flat_map(|i| ((layout::PD + i * 4096) | PRESENT_WRITABLE).to_le_bytes())
        .collect();
    write("the PDPT", &pdpt, layout::PDPT)?;
    let pds: Vec<u8> = (0..2048u64)
        .flat_map(|i| ((i << 21) | HUGE | PRESENT_WRITABLE).to_le_bytes())
        .collect();
    write("the page directories", &pds, layout::PD)
}

/// Errors of vCPU configuration.
#[derive(Debug, thiserror::Error)]
pub enum CpuError {
    /// A KVM vCPU ioctl failed.
    #[error("KVM refused {what}: {source}")]
    Kvm {
        /// The ioctl.
        what: &'static str,
        /// Cause.
        source: kvm_ioctls::Error,
    },
    /// An MSR list could not be built (more entries than KVM accepts).
    #[error("too many MSRs for one KVM_SET_MSRS call")]
    MsrList,
}

fn kvm(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> CpuError {
    move |source| CpuError::Kvm { what, source }
}

/// Sets the vCPU up to enter a kernel at `entry` in 64-bit mode with RSI pointing at
/// boot_params, as the Linux 64-bit boot protocol asks.
pub fn configure(vcpu: &VcpuFd, entry: u64) -> Result<(), CpuError> {
    let mut sregs: kvm_sregs = vcpu.get_sregs().map_err(kvm("KVM_GET_SREGS"))?;
    let code = segment(2);
    let data = segment(3);
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = segment(4);
    sregs.gdt.base = layout::BOOT_GDT;
    sregs.gdt.limit = (std::mem::size_of_val(&BOOT_GDT_ENTRIES) - 1) as u16;
    sregs.idt.base = layout::BOOT_IDT;
    sregs.idt.limit = 7;
    sregs.cr3 = layout::PML4;
    sregs.cr4 |= X86_CR4_PAE;
    sregs.cr0 |= X86_CR0_PE | X86_CR0_ET | X86_CR0_PG;
    sregs.efer |= EFER_LME | EFER_LMA;
    vcpu.set_sregs(&sregs).map_err(kvm("KVM_SET_SREGS"))?;

    let regs = kvm_regs {
        rflags: 0x2,
        rip: entry,
        rsp: layout::BOOT_STACK,
        rbp: layout::BOOT_STACK,
        rsi: layout::ZERO_PAGE,
        ..Default::default()
    };
    vcpu.set_regs(&regs).map_err(kvm("KVM_SET_REGS"))?;

    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu).map_err(kvm("KVM_SET_FPU"))?;

    let msrs = Msrs::from_entries(&[kvm_msr_entry {
        index: MSR_IA32_MISC_ENABLE,
        data: MISC_ENABLE_FAST_STRING,
        ..Default::default()
    }])
    .map_err(|_| CpuError::MsrList)?;
    vcpu.set_msrs(&msrs).map_err(kvm("KVM_SET_MSRS"))?;
    configure_lapic(vcpu)
}

/// Local APIC register offsets.
const APIC_SPIV: usize = 0xf0;
const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_EXTINT: u32 = 0x7;
const APIC_MODE_NMI: u32 = 0x4;

fn set_apic_reg(regs: &mut [std::os::raw::c_char; 1024], offset: usize, value: u32) {
    for (i, b) in value.to_le_bytes().into_iter().enumerate() {
        regs[offset + i] = b as std::os::raw::c_char;
    }
}

fn get_apic_reg(regs: &[std::os::raw::c_char; 1024], offset: usize) -> u32 {
    let b = |i: usize| regs[offset + i] as u8;
    u32::from_le_bytes([b(0), b(1), b(2), b(3)])
}

/// Software-enables the local APIC (SVR = 0x1ff) with LINT0 as ExtINT and LINT1 as NMI,
/// the state firmware leaves for an OS.
fn configure_lapic(vcpu: &VcpuFd) -> Result<(), CpuError> {
    let mut lapic = vcpu.get_lapic().map_err(kvm("KVM_GET_LAPIC"))?;
    let lvt0 = get_apic_reg(&lapic.regs, APIC_LVT0);
    set_apic_reg(
        &mut lapic.regs,
        APIC_LVT0,
        (lvt0 & !0x700) | (APIC_MODE_EXTINT << 8),
    );
    let lvt1 = get_apic_reg(&lapic.regs, APIC_LVT1);
    set_apic_reg(
        &mut lapic.regs,
        APIC_LVT1,
        (lvt1 & !0x700) | (APIC_MODE_NMI << 8),
    );
    set_apic_reg(&mut lapic.regs, APIC_SPIV, 0x1ff);
    vcpu.set_lapic(&lapic).map_err(kvm("KVM_SET_LAPIC"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory;

    #[test]
    fn boot_segments_follow_the_linux_protocol() {
        let cs = segment(2);
        assert_eq!(cs.selector, BOOT_CS);
        assert_eq!(
            (cs.l, cs.db, cs.present, cs.type_, cs.s, cs.dpl),
            (1, 0, 1, 0xb, 1, 0)
        );
        assert_eq!(cs.limit, 0xffff_ffff);
        let ds = segment(3);
        assert_eq!(ds.selector, BOOT_DS);
        assert_eq!((ds.l, ds.db, ds.present, ds.type_, ds.s), (0, 1, 1, 0x3, 1));
        let tr = segment(4);
        assert_eq!(tr.selector, BOOT_TSS);
        assert_eq!((tr.type_, tr.s, tr.present), (0xb, 0, 1));
    }

    #[test]
    fn page_tables_identity_map_four_gib() {
        let mem = memory::allocate(16).unwrap();
        write_boot_tables(&mem).unwrap();
        let pml4: u64 = mem.read_obj(GuestAddress(layout::PML4)).unwrap();
        assert_eq!(pml4, layout::PDPT | 3);
        for i in 0..4u64 {
            let pdpte: u64 = mem.read_obj(GuestAddress(layout::PDPT + 8 * i)).unwrap();
            assert_eq!(pdpte, (layout::PD + 4096 * i) | 3);
        }
        // Translate a few addresses through the tables.
        for gpa in [0u64, 0x20_1234, 0xfee0_0000, 0xffff_ffff] {
            let pde: u64 = mem
                .read_obj(GuestAddress(layout::PD + (gpa >> 21) * 8))
                .unwrap();
            assert_eq!(pde & 0x83, 0x83, "present, writable, 2 MiB");
            assert_eq!((pde & !0x1f_ffff) | (gpa & 0x1f_ffff), gpa);
        }
    }
}
