//! Routing device interrupt lines through the IOAPIC, from CPL3.
//!
//! The VMM raises a virtio device's GSI as an edge on the in-kernel IOAPIC; the guest
//! programs redirection entry *g* to vector `0x30 + g` (fixed delivery, physical
//! destination APIC 0, edge-triggered, active high, unmasked), whose stub counts it in
//! [`crate::boot::IRQ_COUNTS`]`[g]` (docs/guest-abi.md). The IOAPIC's 2 MiB page is mapped
//! user-accessible by `boot`, so this needs no CPL0 code: four MMIO writes per line.

use crate::boot::IRQ_BASE_VECTOR;

/// Guest-physical (= virtual) address of the IOAPIC's register-select register.
const IOREGSEL: usize = 0xfec0_0000;
/// Address of the IOAPIC's data window.
const IOWIN: usize = 0xfec0_0010;
/// Index of the low dword of redirection entry 0 (entry `g` is at `0x10 + 2 * g`).
const REDIR_BASE: u32 = 0x10;

/// Writes IOAPIC register `index`.
fn write(index: u32, value: u32) {
    // SAFETY: the IOAPIC page is mapped user-accessible and uncached by `boot`; these are
    // the aligned 32-bit accesses the IOAPIC requires, and they touch no Rust memory.
    unsafe {
        (IOREGSEL as *mut u32).write_volatile(index);
        (IOWIN as *mut u32).write_volatile(value);
    }
}

/// Routes IOAPIC pin `gsi` (1..=15) to vector `0x30 + gsi` on APIC 0: edge, active high,
/// fixed, physical, unmasked. The destination (high dword) is written first, so the entry
/// is unmasked only once it is complete.
pub fn route(gsi: u32) {
    debug_assert!((1..16).contains(&gsi));
    write(REDIR_BASE + 2 * gsi + 1, 0);
    write(REDIR_BASE + 2 * gsi, IRQ_BASE_VECTOR as u32 + gsi);
}
