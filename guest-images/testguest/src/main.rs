//! ftvm's built-in test guest: a tiny freestanding x86-64 kernel booted through the Linux
//! 64-bit boot protocol (docs/guest-abi.md).
//!
//! `_start` (in [`boot`]) runs a few hundred instructions at CPL0 to install its own page
//! tables, GDT, TSS (I/O bitmap) and IDT, then drops to CPL3 in [`user_main`], which parses
//! the command line and runs a workload (see [`workloads`]). Console output goes to COM1;
//! time, timer, entropy, markers and power-off go through the platform ports. Virtio-mmio
//! devices announced on the command line are driven from CPL3 too (see [`virtio`]).
//!
//! Exit codes: 0 success, 2 bad command line or parameters (or a missing device), 3 a
//! device request failed, 4 a verification failed.

#![no_std]
#![no_main]

/// Prints a formatted line to the console.
macro_rules! println {
    ($($arg:tt)*) => {
        $crate::io::print_line(format_args!($($arg)*))
    };
}

/// Prints `ftvm-testguest: error: <message>` and powers off with exit code 2.
macro_rules! fatal {
    ($($arg:tt)*) => {
        $crate::fatal_exit(2, format_args!($($arg)*))
    };
}

mod boot;
mod cmdline;
mod io;
mod ioapic;
mod mem;
mod virtio;
mod workloads;

use core::fmt;

/// Byte address of the first workload page (4 MiB).
pub const WORK_BASE: u64 = 0x40_0000;
/// Size of a workload page.
pub const PAGE_SIZE: u64 = 4096;
/// One MiB.
const MIB: u64 = 1 << 20;

/// The CPL3 entry point, entered by `_start` with IRETQ (IF=1).
pub extern "C" fn user_main(boot_params: u64) -> ! {
    let ram_end = boot::ram_top(boot_params).min(boot::MAX_MAPPED_RAM);
    let line = cmdline::read(boot_params);
    let shown = match line {
        Ok(s) | Err(s) => s,
    };
    println!(
        "ftvm-testguest: booted, {} MiB RAM, cmdline \"{}\"",
        ram_end / MIB,
        shown
    );
    let Ok(line) = line else {
        fatal!("the command line is not UTF-8");
    };
    let mut cmdline = cmdline::Cmdline::parse(line);
    workloads::run(&mut cmdline, ram_end)
}

/// Prints `ftvm-testguest: error: <args>` and powers off with exit code `code`.
pub fn fatal_exit(code: u32, args: fmt::Arguments<'_>) -> ! {
    println!("ftvm-testguest: error: {args}");
    io::power_off(code)
}

/// Prints the panic and reports it to the VMM (GUEST_PANIC = 0x100).
#[panic_handler]
fn panic(info: &core::panic::PanicInfo<'_>) -> ! {
    match info.location() {
        Some(loc) => println!(
            "ftvm-testguest: panic: {} at {}:{}",
            info.message(),
            loc.file(),
            loc.line()
        ),
        None => println!("ftvm-testguest: panic: {}", info.message()),
    }
    io::report_panic(io::SOFTWARE_PANIC);
    loop {
        core::hint::spin_loop();
    }
}
