//! Workload `cpl0`: runs INT3, FWAIT, POPCNT (of a register and of memory), STMXCSR and
//! LDMXCSR at CPL0 and checks their results from CPL3, so that a VMM's fallback for
//! instructions its host's KVM cannot emulate in guest kernel mode can be tested.
//!
//! The CPL3 part executes INT3; the #BP gate (DPL3) enters `ftvm_bp` in [`crate::boot`],
//! which, for a #BP from CPL3, runs the instructions at CPL0 with
//! [`CPL0_RESULTS`] as inputs and outputs and returns. Prints `cpl0: ok` and exits 0, or
//! names the first wrong result and exits 4.

use core::ptr::{addr_of, addr_of_mut};

/// Inputs and outputs of the CPL0 self-test (offsets are those `ftvm_bp` uses):
/// 0 where the self-test's INT3 should return to, 1 where it did return to, 2 POPCNT of
/// a register, 3 RFLAGS after it, 4 POPCNT of memory, 5 MXCSR before (low half) and
/// after the LDMXCSR (high half), 6 the POPCNT input, 7 the MXCSR to load.
#[no_mangle]
pub static mut CPL0_RESULTS: [u64; 8] = [0; 8];

/// The POPCNT input: sparse and dense parts.
const POPCNT_INPUT: u64 = 0xf0f0_1234_0000_00ff;
/// The MXCSR loaded: every exception masked, flush-to-zero, round toward zero.
const MXCSR: u64 = 0xff80;
const RFLAGS_ZF: u64 = 1 << 6;

/// Runs the workload.
pub fn run(cmdline: &mut crate::cmdline::Cmdline) -> ! {
    cmdline.finish();
    let results = addr_of_mut!(CPL0_RESULTS) as *mut u64;
    // SAFETY: the workload is the only code running; the CPL0 self-test reads and
    // writes the array only while the INT3 below is being handled.
    unsafe {
        results.add(6).write_volatile(POPCNT_INPUT);
        results.add(7).write_volatile(MXCSR);
        core::arch::asm!("int3");
    }
    // SAFETY: as above; the self-test is done.
    let r: [u64; 8] = unsafe { addr_of!(CPL0_RESULTS).read_volatile() };
    let expected_count = u64::from(POPCNT_INPUT.count_ones());
    println!("cpl0: int3 returned to {:#x} (expected {:#x})", r[1], r[0]);
    println!(
        "cpl0: popcnt {} (flags {:#x}), of memory {}",
        r[2], r[3], r[4]
    );
    println!("cpl0: mxcsr {:#x} then {:#x}", r[5] & 0xffff_ffff, r[5] >> 32);
    let checks = [
        (r[1] == r[0] && r[0] != 0, "int3 return address"),
        (r[2] == expected_count, "popcnt of a register"),
        (r[3] & RFLAGS_ZF == 0, "flags after popcnt"),
        (r[4] == expected_count, "popcnt of memory"),
        (r[5] >> 32 == MXCSR, "mxcsr loaded"),
    ];
    for (ok, what) in checks {
        if !ok {
            println!("cpl0: FAILED: {what}");
            crate::io::power_off(4);
        }
    }
    println!("cpl0: ok");
    crate::io::power_off(0)
}
