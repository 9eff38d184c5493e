//! Port I/O, the console (COM1) and the ftvm platform device (docs/guest-abi.md).
//!
//! Everything here runs at CPL3: the TSS I/O permission bitmap opens exactly the UART
//! (0x3f8-0x3ff) and the platform device (0x600-0x63f). Time and entropy come only from
//! the platform device (never `rdtsc`/`rdrand`, which this VMM cannot make deterministic,
//! except [`host_tsc`] for the key-value service's `TSC` command).

use core::arch::asm;
use core::fmt;
use core::sync::atomic::Ordering;

use crate::boot::IRQ_COUNTS;

/// COM1 transmit holding register (write) and receive buffer register (read).
const COM1_THR: u16 = 0x3f8;
/// COM1 interrupt enable register.
const COM1_IER: u16 = 0x3f9;
/// COM1 line status register.
const COM1_LSR: u16 = 0x3fd;
/// Line status: a received byte is waiting.
const LSR_DATA_READY: u8 = 0x01;
/// Interrupt enable: received data available.
const IER_RX_AVAILABLE: u8 = 0x01;
/// COM1's interrupt line (GSI).
pub const COM1_GSI: u32 = 4;
/// Platform device: stop the VM with the written exit code.
const POWER_OFF: u16 = 0x600;
/// Platform device: virtual time in ns, low half (latches the high half).
const TIME_LO: u16 = 0x604;
/// Platform device: latched high half of the virtual time.
const TIME_HI: u16 = 0x608;
/// Platform device: 32 bits of entropy.
const ENTROPY: u16 = 0x60c;
/// Platform device: timer deadline, low half.
const TIMER_LO: u16 = 0x610;
/// Platform device: timer deadline, high half; writing it arms the timer.
const TIMER_HI: u16 = 0x614;
/// Platform device: idle until an event is pending.
const WAIT: u16 = 0x618;
/// Platform device: cancel the armed timer.
const TIMER_DISARM: u16 = 0x61c;
/// Platform device: DMA address for ENTROPY_FILL, low half.
const DMA_ADDR_LO: u16 = 0x620;
/// Platform device: DMA address for ENTROPY_FILL, high half.
const DMA_ADDR_HI: u16 = 0x624;
/// Platform device: fill this many bytes at the DMA address with entropy.
const ENTROPY_FILL: u16 = 0x628;
/// Platform device: 0 if the last ENTROPY_FILL succeeded.
const FILL_STATUS: u16 = 0x62c;
/// Platform device: the guest crashed (exception vector or [`SOFTWARE_PANIC`]).
pub const GUEST_PANIC: u16 = 0x630;
/// Platform device: progress marker.
const MARKER: u16 = 0x634;
/// GUEST_PANIC value for a software panic.
pub const SOFTWARE_PANIC: u32 = 0x100;

/// The host's time stamp counter, read with `rdtsc`: the one deliberately
/// nondeterministic input of this guest (the `TSC` command of the key-value service),
/// for the tests of lockstep's divergence detection. Nothing else may use it.
pub fn host_tsc() -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: rdtsc reads the time stamp counter into two registers; no memory is
    // accessed.
    unsafe { asm!("rdtsc", out("eax") lo, out("edx") hi, options(nomem, nostack, preserves_flags)) };
    (u64::from(hi) << 32) | u64::from(lo)
}

/// Writes a byte to an I/O port.
#[inline(always)]
fn outb(port: u16, value: u8) {
    // SAFETY: port I/O to a port opened in the TSS bitmap; no Rust memory is accessed.
    // Not `nomem`: the VMM may observe guest memory at an exit, so prior writes must be
    // done.
    unsafe { asm!("out dx, al", in("dx") port, in("al") value, options(nostack, preserves_flags)) };
}

/// Reads a byte from an I/O port.
#[inline(always)]
fn inb(port: u16) -> u8 {
    let value: u8;
    // SAFETY: port I/O to a port opened in the TSS bitmap; no Rust memory is accessed.
    unsafe { asm!("in al, dx", in("dx") port, out("al") value, options(nostack, preserves_flags)) };
    value
}

/// Writes a 32-bit value to an I/O port.
#[inline(always)]
fn outl(port: u16, value: u32) {
    // SAFETY: as in `outb`; a platform register may make the device write guest memory
    // (ENTROPY_FILL), which is why the asm is not `nomem`.
    unsafe {
        asm!("out dx, eax", in("dx") port, in("eax") value, options(nostack, preserves_flags))
    };
}

/// Reads a 32-bit value from an I/O port.
#[inline(always)]
fn inl(port: u16) -> u32 {
    let value: u32;
    // SAFETY: port I/O to a port opened in the TSS bitmap; no Rust memory is accessed.
    unsafe {
        asm!("in eax, dx", in("dx") port, out("eax") value, options(nostack, preserves_flags))
    };
    value
}

/// The serial console: byte writes to COM1 (the VMM's transmitter is always ready).
pub struct Console;

impl fmt::Write for Console {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for byte in s.bytes() {
            outb(COM1_THR, byte);
        }
        Ok(())
    }
}

/// Enables COM1's received-data interrupt, so that console input ends a
/// [`wait_for_event`] (route [`COM1_GSI`] through the IOAPIC first).
pub fn console_rx_interrupts() {
    outb(COM1_IER, IER_RX_AVAILABLE);
}

/// A byte of console input, if one is waiting.
pub fn console_read() -> Option<u8> {
    (inb(COM1_LSR) & LSR_DATA_READY != 0).then(|| inb(COM1_THR))
}

/// Prints `args` and a newline to the console (used by `println!`).
pub fn print_line(args: fmt::Arguments<'_>) {
    use fmt::Write;
    // Console never fails.
    let _ = Console.write_fmt(args);
    let _ = Console.write_str("\n");
}

/// Virtual time in ns since boot.
pub fn time_ns() -> u64 {
    let lo = inl(TIME_LO);
    let hi = inl(TIME_HI);
    (u64::from(hi) << 32) | u64::from(lo)
}

/// 32 bits from the VM's entropy stream.
pub fn entropy_u32() -> u32 {
    inl(ENTROPY)
}

/// 64 bits from the VM's entropy stream (two reads, low half first).
pub fn entropy_u64() -> u64 {
    let lo = entropy_u32();
    let hi = entropy_u32();
    (u64::from(hi) << 32) | u64::from(lo)
}

/// Arms the platform timer for the absolute virtual time `deadline_ns`; it raises
/// vector 0x30 when due.
pub fn arm_timer(deadline_ns: u64) {
    outl(TIMER_LO, deadline_ns as u32);
    outl(TIMER_HI, (deadline_ns >> 32) as u32);
}

/// Cancels an armed timer.
#[allow(dead_code)]
pub fn disarm_timer() {
    outl(TIMER_DISARM, 0);
}

/// Idles until an event is pending; the VMM injects it before the guest resumes.
pub fn wait_for_event() {
    outl(WAIT, 0);
}

/// Number of platform timer interrupts taken so far.
pub fn timer_irqs() -> u64 {
    IRQ_COUNTS[0].load(Ordering::SeqCst)
}

/// Sleeps until the platform timer armed for `deadline_ns` has fired.
pub fn sleep_until(deadline_ns: u64) {
    let before = timer_irqs();
    arm_timer(deadline_ns);
    while timer_irqs() == before {
        wait_for_event();
    }
}

/// Makes the platform device fill `len` bytes at guest-physical `addr` with entropy
/// (device DMA). Returns whether the device reported success.
pub fn entropy_fill(addr: u64, len: u32) -> bool {
    outl(DMA_ADDR_LO, addr as u32);
    outl(DMA_ADDR_HI, (addr >> 32) as u32);
    outl(ENTROPY_FILL, len);
    inl(FILL_STATUS) == 0
}

/// Writes a progress marker.
pub fn marker(value: u32) {
    outl(MARKER, value);
}

/// Reports a guest crash to the VMM (`SOFTWARE_PANIC` or an exception vector).
pub fn report_panic(value: u32) {
    outl(GUEST_PANIC, value);
}

/// Stops the VM with exit code `code`.
pub fn power_off(code: u32) -> ! {
    outl(POWER_OFF, code);
    // `hlt` is privileged at CPL3; the VMM does not resume the guest after POWER_OFF.
    loop {
        core::hint::spin_loop();
    }
}
