//! The CPL0 part of the test guest: the entry point `_start`, page tables, GDT, TSS (with
//! the I/O permission bitmap that opens the UART and platform ports to CPL3), IDT, and the
//! exception and interrupt stubs.
//!
//! Guest kernel mode is instruction-emulated on the development hosts (~1.2 M
//! instructions/s, see `HOST.md`), so everything here is kept to about a thousand
//! instructions: tables that need no run-time information are initialised statically (and
//! live in `.data`, so they need not be cleared), and all real work runs at CPL3 in
//! [`crate::user_main`]. The code run at CPL0 is deliberately plain integer code (no SSE),
//! which also keeps it within what an instruction emulator supports.

use core::arch::global_asm;
use core::ptr::{addr_of, addr_of_mut};
use core::sync::atomic::AtomicU64;

/// Kernel code segment selector.
const KERNEL_CS: u64 = 0x08;
/// Kernel data segment selector.
const KERNEL_DS: u64 = 0x10;
/// User data segment selector with RPL 3.
const USER_SS: u64 = 0x18 | 3;
/// User code segment selector with RPL 3.
const USER_CS: u64 = 0x20 | 3;
/// TSS selector.
const TSS_SEL: u64 = 0x28;

/// First vector of the external interrupts (0x30: platform timer, 0x31-0x3f: devices).
pub const IRQ_BASE_VECTOR: usize = 0x30;
/// Number of external interrupt vectors handled.
pub const IRQ_VECTORS: usize = 16;

/// Page-table entry bit: present.
const PTE_P: u64 = 1 << 0;
/// Page-table entry bit: writable.
const PTE_W: u64 = 1 << 1;
/// Page-table entry bit: user-accessible.
const PTE_U: u64 = 1 << 2;
/// Page-table entry bit: write-through.
const PTE_PWT: u64 = 1 << 3;
/// Page-table entry bit: cache disable.
const PTE_PCD: u64 = 1 << 4;
/// Page-directory entry bit: 2 MiB page.
const PTE_PS: u64 = 1 << 7;
/// Size of a large (2 MiB) page.
const LARGE_PAGE: u64 = 2 << 20;
/// Guest RAM mapped by PD0 at most (and the RAM the workloads may use).
pub const MAX_MAPPED_RAM: u64 = 1 << 30;
/// The image itself needs the first 4 MiB mapped whatever the e820 table says.
const MIN_MAPPED_RAM: u64 = 4 << 20;
/// A PD0 entry for user-accessible RAM.
const PD0_FLAGS: u64 = PTE_P | PTE_W | PTE_U | PTE_PS;
/// Index in PD3 (which maps 3-4 GiB) of the virtio MMIO window.
const PD3_MMIO_INDEX: u64 = (0xD000_0000 - 0xC000_0000) >> 21;
/// The PD3 entry of the virtio MMIO window: uncached, user-accessible.
const PD3_MMIO_ENTRY: u64 = 0xD000_0000 | PTE_P | PTE_W | PTE_U | PTE_PS | PTE_PCD | PTE_PWT;
/// Index in PD3 of the IOAPIC.
const PD3_IOAPIC_INDEX: u64 = (0xFEC0_0000 - 0xC000_0000) >> 21;
/// The PD3 entry of the IOAPIC: uncached, user-accessible (the devices' interrupt lines are
/// routed from CPL3, see `crate::ioapic`).
const PD3_IOAPIC_ENTRY: u64 = 0xFEC0_0000 | PTE_P | PTE_W | PTE_U | PTE_PS | PTE_PCD | PTE_PWT;
/// Index in PD3 of the local APIC.
const PD3_LAPIC_INDEX: u64 = (0xFEE0_0000 - 0xC000_0000) >> 21;
/// The PD3 entry of the local APIC: uncached, supervisor only.
const PD3_LAPIC_ENTRY: u64 = 0xFEE0_0000 | PTE_P | PTE_W | PTE_PS | PTE_PCD | PTE_PWT;

/// Interrupts taken per vector 0x30..=0x3f; incremented (`lock inc`) by the IRQ stubs and
/// read from CPL3. Index 0 counts platform timer interrupts.
pub static IRQ_COUNTS: [AtomicU64; IRQ_VECTORS] = [const { AtomicU64::new(0) }; IRQ_VECTORS];

/// The GDT: null, kernel code64 (0x08), kernel data (0x10), user data (0x18, DPL3), user
/// code64 (0x20, DPL3), 64-bit TSS (0x28, two slots, filled in by [`cpl0_init`]). The
/// accessed bits are preset so that the CPU need not write them.
#[repr(C, align(16))]
struct Gdt([u64; 7]);

/// The GDT (see [`Gdt`]).
static mut GDT: Gdt = Gdt([
    0,
    0x00af_9b00_0000_ffff,
    0x00cf_9300_0000_ffff,
    0x00cf_f300_0000_ffff,
    0x00af_fb00_0000_ffff,
    0,
    0,
]);

/// Ports 0..IOMAP_PORTS are described by the I/O permission bitmap; all others are denied.
const IOMAP_PORTS: usize = 0x640;
/// Bytes of the I/O permission bitmap, including the trailing 0xff byte.
const IOMAP_BYTES: usize = IOMAP_PORTS / 8 + 1;

/// A 64-bit task-state segment followed by its I/O permission bitmap.
#[repr(C, packed)]
struct Tss {
    /// Reserved.
    reserved0: u32,
    /// Stack pointers for CPL0-2; RSP0 is used on interrupts from CPL3.
    rsp: [u64; 3],
    /// Reserved.
    reserved1: u64,
    /// Interrupt stack table (unused).
    ist: [u64; 7],
    /// Reserved.
    reserved2: u64,
    /// Reserved.
    reserved3: u16,
    /// Offset of `iomap` from the start of the TSS.
    iomap_base: u16,
    /// The I/O permission bitmap (bit set = port denied) and its trailing 0xff byte.
    iomap: [u8; IOMAP_BYTES],
}

/// Offset of the I/O permission bitmap in the TSS.
const IOMAP_BASE: u16 = 104;
/// The TSS segment limit (size - 1).
const TSS_LIMIT: u64 = core::mem::size_of::<Tss>() as u64 - 1;
const _: () = assert!(core::mem::offset_of!(Tss, iomap) == IOMAP_BASE as usize);

/// The TSS, 16-byte aligned.
#[repr(C, align(16))]
struct AlignedTss(Tss);

/// Whether CPL3 may access `port`: the COM1 UART and the platform device.
const fn port_allowed(port: usize) -> bool {
    matches!(port, 0x3f8..=0x3ff | 0x600..=0x63f)
}

/// The I/O permission bitmap (a set bit denies the port), computed at compile time.
const fn iomap() -> [u8; IOMAP_BYTES] {
    let mut map = [0xff; IOMAP_BYTES];
    let mut port = 0;
    while port < IOMAP_PORTS {
        if port_allowed(port) {
            map[port / 8] &= !(1 << (port % 8));
        }
        port += 1;
    }
    map
}

/// The TSS; RSP0 is filled in by [`cpl0_init`].
static mut TSS: AlignedTss = AlignedTss(Tss {
    reserved0: 0,
    rsp: [0; 3],
    reserved1: 0,
    ist: [0; 7],
    reserved2: 0,
    reserved3: 0,
    iomap_base: IOMAP_BASE,
    iomap: iomap(),
});

/// The IDT: 256 gates of 16 bytes; vectors 0-31 and 0x30-0x3f are filled in by
/// [`cpl0_init`]. It is placed in `.data` so that its zeros come from the file.
#[repr(C, align(16))]
struct Idt([[u64; 2]; 256]);

/// The IDT (see [`Idt`]).
#[link_section = ".data.ftvm_idt"]
static mut IDT: Idt = Idt([[0; 2]; 256]);

/// The constant part of an IDT gate: selector 0x08, present, DPL0, 64-bit interrupt gate.
const GATE_BITS: u64 = (KERNEL_CS << 16) | (0x8e << 40);

extern "C" {
    /// Page directory mapping 0-1 GiB; filled in by [`cpl0_init`] (defined below in asm).
    static mut ftvm_pd0: [u64; 512];
    /// Addresses of the 32 exception stubs.
    static ftvm_exc_stubs: [u64; 32];
    /// Addresses of the 16 interrupt stubs (vectors 0x30-0x3f).
    static ftvm_irq_stubs: [u64; IRQ_VECTORS];
    /// Top of the 16 KiB kernel stack (linker script).
    static __kstack_top: u8;
}

/// Returns the end of the highest RAM region below 4 GiB according to the e820 table of
/// the `boot_params` at `boot_params` (0 if there is none).
pub fn ram_top(boot_params: u64) -> u64 {
    const FOUR_GIB: u64 = 1 << 32;
    let bp = boot_params as *const u8;
    // SAFETY: the boot protocol guarantees a readable zero page at `boot_params`; the
    // offsets are those of `e820_entries` and `e820_table` (at most 128 entries, which
    // end inside the page). Unaligned reads are used for the packed 20-byte entries.
    unsafe {
        let count = (bp.add(0x1e8).read() as usize).min(128);
        let mut top = 0;
        for i in 0..count {
            let entry = bp.add(0x2d0 + 20 * i);
            let addr = (entry as *const u64).read_unaligned();
            let size = (entry.add(8) as *const u64).read_unaligned();
            let kind = (entry.add(16) as *const u32).read_unaligned();
            if kind == 1 && addr < FOUR_GIB {
                top = top.max(addr.saturating_add(size).min(FOUR_GIB));
            }
        }
        top
    }
}

/// CPL0 initialisation called by `_start` (on the kernel stack, SSE enabled): maps the
/// RAM in PD0, fills in RSP0 and the TSS descriptor, and fills in the IDT gates. The
/// rest (loading the tables, CR3, IRETQ to CPL3) is done by `_start`.
extern "C" fn cpl0_init(boot_params: u64) {
    let mapped = ram_top(boot_params).clamp(MIN_MAPPED_RAM, MAX_MAPPED_RAM);
    let large_pages = mapped.div_ceil(LARGE_PAGE) as usize;
    // SAFETY: runs once, single-threaded, with interrupts disabled, before any of these
    // tables is in use; all indices are in bounds (large_pages <= 512, IDT vectors < 256,
    // GDT slots 5 and 6 of 7). Volatile writes keep the loops plain integer code.
    unsafe {
        let pd0 = addr_of_mut!(ftvm_pd0) as *mut u64;
        for i in 0..large_pages {
            pd0.add(i)
                .write_volatile((i as u64 * LARGE_PAGE) | PD0_FLAGS);
        }

        let kstack_top = addr_of!(__kstack_top) as u64;
        addr_of_mut!(TSS.0.rsp[0]).write_unaligned(kstack_top);

        let tss = addr_of!(TSS) as u64;
        let gdt = addr_of_mut!(GDT.0) as *mut u64;
        let tss_low =
            TSS_LIMIT | ((tss & 0xff_ffff) << 16) | (0x89 << 40) | (((tss >> 24) & 0xff) << 56);
        gdt.add(5).write_volatile(tss_low);
        gdt.add(6).write_volatile(tss >> 32);

        // The upper halves of the gates stay 0: the linker script keeps the image below
        // 4 GiB.
        let idt = addr_of_mut!(IDT.0) as *mut [u64; 2];
        let exc = addr_of!(ftvm_exc_stubs) as *const u64;
        for v in 0..32 {
            set_gate(idt.add(v), exc.add(v).read());
        }
        // #BP may be raised from CPL3 (DPL3 gate): the `cpl0` workload's way in.
        let bp = idt.add(3) as *mut u64;
        bp.write_volatile(bp.read_volatile() | (3 << 45));
        let irq = addr_of!(ftvm_irq_stubs) as *const u64;
        for i in 0..IRQ_VECTORS {
            set_gate(idt.add(IRQ_BASE_VECTOR + i), irq.add(i).read());
        }
    }
}

/// Writes the low half of the IDT gate at `gate` for a handler at `handler` (< 4 GiB).
///
/// # Safety
/// `gate` must point into the IDT, which must not be in use.
#[inline(always)]
unsafe fn set_gate(gate: *mut [u64; 2], handler: u64) {
    let low = GATE_BITS | (handler & 0xffff) | ((handler & 0xffff_0000) << 32);
    // SAFETY: guaranteed by the caller.
    unsafe { (gate as *mut u64).write_volatile(low) };
}

// The entry point. Boot state (docs/guest-abi.md): long mode, CPL0, IF=0, RSI = zero
// page. Masks both 8259 PICs (the VMM leaves LINT0 in ExtINT mode for Linux; device
// interrupts must arrive only through the IOAPIC), clears .bss (__bss_start/__bss_end are
// 16-byte aligned), switches to the kernel stack, enables SSE (CR0.EM=0, MP=1, TS=0;
// CR4.OSFXSR|OSXMMEXCPT) and clears CR4.PGE (to flush any global boot translations), SMEP
// and SMAP (the stubs run from user-accessible pages), before any Rust code runs. After
// `cpl0_init` it loads the GDT, IDT, TR, segment registers and CR3, and IRETQs to
// `user_main(boot_params)` at CPL3 with IF=1.
global_asm!(
    ".section .text._start, \"ax\"",
    ".globl _start",
    "_start:",
    "    cli",
    "    mov al, 0xff",
    "    out 0x21, al",
    "    out 0xa1, al",
    "    mov r12, rsi",
    "    lea rdi, [rip + __bss_start]",
    "    lea rcx, [rip + __bss_end]",
    "    sub rcx, rdi",
    "    shr rcx, 3",
    "    xor eax, eax",
    "    rep stosq",
    "    lea rsp, [rip + __kstack_top]",
    "    mov rax, cr0",
    "    and rax, -13",      // clear EM (bit 2) and TS (bit 3)
    "    or rax, 2",         // set MP (bit 1)
    "    mov cr0, rax",
    "    mov rax, cr4",
    "    and rax, -3145857", // ~0x300080: clear PGE (7), SMEP (20), SMAP (21)
    "    or rax, 0x600",     // set OSFXSR (9), OSXMMEXCPT (10)
    "    mov cr4, rax",
    "    mov rdi, r12",
    "    call {init}",
    "    lgdt [rip + ftvm_gdt_ptr]",
    "    lidt [rip + ftvm_idt_ptr]",
    "    mov ax, {tss_sel}",
    "    ltr ax",
    "    mov ax, {kernel_ds}",
    "    mov ds, ax",
    "    mov es, ax",
    "    mov ss, ax",
    "    xor eax, eax",
    "    mov fs, ax",
    "    mov gs, ax",
    "    push {kernel_cs}",
    "    lea rax, [rip + 2f]",
    "    push rax",
    "    retfq",
    "2:",
    "    lea rax, [rip + ftvm_pml4]",
    "    mov cr3, rax",
    "    push {user_ss}",
    "    lea rax, [rip + __ustack_top - 8]",
    "    push rax",
    "    push 0x202",
    "    push {user_cs}",
    "    lea rax, [rip + {user_main}]",
    "    push rax",
    "    mov rdi, r12",
    "    iretq",
    "",
    // Exception stubs: [RSP] = vector, error code (0 pushed here if the CPU pushes none),
    // RIP, CS, RFLAGS, RSP, SS; the vector goes to GUEST_PANIC.
    ".section .text.ftvm_stubs, \"ax\"",
    ".irp v, 0,1,2,4,5,6,7,9,15,16,18,19,20,22,23,24,25,26,27,28,31",
    "ftvm_exc_\\v:",
    "    push 0",
    "    push \\v",
    "    jmp ftvm_exc_common",
    ".endr",
    ".irp v, 8,10,11,12,13,14,17,21,29,30",
    "ftvm_exc_\\v:",
    "    push \\v",
    "    jmp ftvm_exc_common",
    ".endr",
    "ftvm_exc_common:",
    "    mov eax, [rsp]",
    "    mov dx, {guest_panic}",
    "    out dx, eax",
    "2:",
    "    cli",
    "    hlt",
    "    jmp 2b",
    // #BP. From CPL3 (the `cpl0` workload's INT3): run INT3, FWAIT, POPCNT, STMXCSR and
    // LDMXCSR at CPL0 on CPL0_RESULTS (see workloads/cpl0.rs) and return. From CPL0 (the
    // self-test's own INT3): record the return address and return.
    "ftvm_exc_3:",
    "    test byte ptr [rsp + 8], 3",
    "    jz 3f",
    "    push rax",
    "    push rcx",
    "    push rdx",
    "    lea rdx, [rip + CPL0_RESULTS]",
    "    lea rax, [rip + 4f]",
    "    mov [rdx], rax",
    "    int3",
    "4:",
    "    fwait",
    "    mov rax, [rdx + 48]",
    "    popcnt rcx, rax",
    "    mov [rdx + 16], rcx",
    "    pushfq",
    "    pop rax",
    "    mov [rdx + 24], rax",
    "    popcnt rcx, qword ptr [rdx + 48]",
    "    mov [rdx + 32], rcx",
    "    stmxcsr dword ptr [rdx + 40]",
    "    ldmxcsr dword ptr [rdx + 56]",
    "    stmxcsr dword ptr [rdx + 44]",
    "    ldmxcsr dword ptr [rdx + 40]",
    "    pop rdx",
    "    pop rcx",
    "    pop rax",
    "    iretq",
    "3:",
    "    push rax",
    "    mov rax, [rsp + 8]",
    "    mov [rip + CPL0_RESULTS + 8], rax",
    "    pop rax",
    "    iretq",
    // Interrupt stubs for vectors 0x30-0x3f: count, EOI, return. No SSE, only RAX.
    ".irp i, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15",
    "ftvm_irq_\\i:",
    "    push rax",
    "    lock inc qword ptr [rip + {irq_counts} + 8 * \\i]",
    "    mov eax, {lapic_eoi}",
    "    mov dword ptr [rax], 0",
    "    pop rax",
    "    iretq",
    ".endr",
    "",
    ".section .rodata.ftvm_stubs, \"a\"",
    ".balign 8",
    ".globl ftvm_exc_stubs",
    "ftvm_exc_stubs:",
    ".irp v, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31",
    "    .quad ftvm_exc_\\v",
    ".endr",
    ".globl ftvm_irq_stubs",
    "ftvm_irq_stubs:",
    ".irp i, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15",
    "    .quad ftvm_irq_\\i",
    ".endr",
    "",
    // Page tables: PML4[0] -> PDPT; PDPT[0] -> PD0 (RAM, filled in at boot), PDPT[3] ->
    // PD3 (virtio MMIO window, IOAPIC and local APIC).
    ".section .data.ftvm_pagetables, \"aw\", @progbits",
    ".balign 4096",
    "ftvm_pml4:",
    "    .quad ftvm_pdpt + {table}",
    "    .fill 511, 8, 0",
    "ftvm_pdpt:",
    "    .quad ftvm_pd0 + {table}",
    "    .quad 0",
    "    .quad 0",
    "    .quad ftvm_pd3 + {table}",
    "    .fill 508, 8, 0",
    "ftvm_pd3:",
    "    .fill {mmio_index}, 8, 0",
    "    .quad {mmio_entry}",
    "    .fill {ioapic_index} - {mmio_index} - 1, 8, 0",
    "    .quad {ioapic_entry}",
    "    .fill {lapic_index} - {ioapic_index} - 1, 8, 0",
    "    .quad {lapic_entry}",
    "    .fill 511 - {lapic_index}, 8, 0",
    ".globl ftvm_pd0",
    "ftvm_pd0:",
    "    .fill 512, 8, 0",
    "",
    ".section .data.ftvm_dtptr, \"aw\", @progbits",
    ".balign 8",
    "    .word 0",
    "ftvm_gdt_ptr:",
    "    .word {gdt_limit}",
    "    .quad {gdt}",
    ".balign 8",
    "    .word 0",
    "ftvm_idt_ptr:",
    "    .word {idt_limit}",
    "    .quad {idt}",
    init = sym cpl0_init,
    user_main = sym crate::user_main,
    irq_counts = sym IRQ_COUNTS,
    gdt = sym GDT,
    idt = sym IDT,
    tss_sel = const TSS_SEL,
    kernel_cs = const KERNEL_CS,
    kernel_ds = const KERNEL_DS,
    user_ss = const USER_SS,
    user_cs = const USER_CS,
    guest_panic = const crate::io::GUEST_PANIC,
    lapic_eoi = const 0xfee0_00b0u32,
    table = const PTE_P | PTE_W | PTE_U,
    mmio_index = const PD3_MMIO_INDEX,
    mmio_entry = const PD3_MMIO_ENTRY,
    ioapic_index = const PD3_IOAPIC_INDEX,
    ioapic_entry = const PD3_IOAPIC_ENTRY,
    lapic_index = const PD3_LAPIC_INDEX,
    lapic_entry = const PD3_LAPIC_ENTRY,
    gdt_limit = const core::mem::size_of::<Gdt>() - 1,
    idt_limit = const core::mem::size_of::<Idt>() - 1,
);
