//! The guest-physical memory map ftvm builds: where boot structures live, where RAM is,
//! and the MMIO hole below 4 GiB.

use vm_memory::GuestAddress;

/// Page size of the guest and of dirty tracking.
pub const PAGE_SIZE: u64 = 4096;
/// Boot GDT (Linux `__BOOT_CS` = 0x10, `__BOOT_DS` = 0x18).
pub const BOOT_GDT: u64 = 0x500;
/// Boot IDT (empty; the kernel installs its own).
pub const BOOT_IDT: u64 = 0x520;
/// Linux `boot_params` ("zero page").
pub const ZERO_PAGE: u64 = 0x7000;
/// Initial stack pointer.
pub const BOOT_STACK: u64 = 0x8ff0;
/// Boot page tables: PML4, one PDPT, four PDs identity-mapping 4 GiB with 2 MiB pages.
pub const PML4: u64 = 0x9000;
/// Boot PDPT.
pub const PDPT: u64 = 0xa000;
/// First of the four boot PDs.
pub const PD: u64 = 0xb000;
/// Kernel command line.
pub const CMDLINE: u64 = 0x20000;
/// Longest command line accepted, including its NUL (Linux x86 `COMMAND_LINE_SIZE`).
pub const CMDLINE_MAX: usize = 2048;
/// The ACPI RSDP, followed by the other ACPI tables (in the legacy BIOS area, where a
/// kernel scans for the RSDP).
pub const ACPI_RSDP: u64 = 0xe0000;
/// End of the ACPI tables' area.
pub const ACPI_END: u64 = 0x10_0000;
/// End of low conventional memory reported to the guest (start of the EBDA).
pub const EBDA_START: u64 = 0x9fc00;
/// Start of high memory; kernels load at or above it.
pub const HIMEM_START: u64 = 0x10_0000;
/// Start of the 32-bit MMIO hole (devices, IOAPIC, LAPIC).
pub const MMIO_HOLE_START: u64 = 0xc000_0000;
/// End of the MMIO hole; RAM beyond 3 GiB continues here.
pub const MMIO_HOLE_END: u64 = 0x1_0000_0000;
/// Physical address of the local APIC.
pub const LAPIC_BASE: u64 = 0xfee0_0000;
/// Smallest guest memory accepted, in MiB.
pub const MIN_MEM_MIB: u64 = 8;
/// Largest guest memory accepted, in MiB.
pub const MAX_MEM_MIB: u64 = 256 * 1024;

/// The RAM regions for a guest of `mem_bytes`: one region below the MMIO hole and, for
/// more than 3 GiB, a second one from 4 GiB.
pub fn ram_regions(mem_bytes: u64) -> Vec<(GuestAddress, usize)> {
    let low = mem_bytes.min(MMIO_HOLE_START);
    let mut regions = vec![(GuestAddress(0), low as usize)];
    if mem_bytes > low {
        regions.push((GuestAddress(MMIO_HOLE_END), (mem_bytes - low) as usize));
    }
    regions
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_guest_has_one_region() {
        assert_eq!(ram_regions(128 << 20), vec![(GuestAddress(0), 128 << 20)]);
    }

    #[test]
    fn large_guest_skips_the_mmio_hole() {
        let r = ram_regions(4 << 30);
        assert_eq!(r.len(), 2);
        assert_eq!(r[0], (GuestAddress(0), MMIO_HOLE_START as usize));
        assert_eq!(r[1], (GuestAddress(MMIO_HOLE_END), 1 << 30));
    }
}
