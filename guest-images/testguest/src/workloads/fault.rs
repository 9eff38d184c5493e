//! Workload `fault`: crashes on purpose, so that the VMM's crash reporting can be tested.
//!
//! Parameter `kind`: `pf` (a CPL3 write to the unmapped address 0x1_0000_0008: #PF,
//! vector 14), `ud` (`ud2`: #UD, vector 6) or `panic` (a Rust panic: GUEST_PANIC 0x100).

use crate::cmdline::Cmdline;

/// An address beyond the guest's mappings (only 0-1 GiB and parts of 3-4 GiB are mapped).
const UNMAPPED: u64 = 0x1_0000_0008;

/// Runs the workload.
pub fn run(cmdline: &mut Cmdline) -> ! {
    let Some(kind) = cmdline.get("kind") else {
        fatal!("fault: missing parameter kind (pf, ud or panic)");
    };
    cmdline.finish();
    if !matches!(kind, "pf" | "ud" | "panic") {
        fatal!("fault: unknown kind {kind:?} (pf, ud or panic)");
    }
    println!("fault: triggering {kind}");
    match kind {
        "pf" => {
            // SAFETY: deliberately faults: the address is not mapped, so the write raises
            // #PF, whose stub reports it to the VMM and halts; no memory is modified.
            unsafe { (UNMAPPED as *mut u64).write_volatile(0xdead) };
            unreachable!("the write to {UNMAPPED:#x} did not fault");
        }
        "ud" => {
            // SAFETY: `ud2` raises #UD, whose stub reports it to the VMM and halts.
            unsafe { core::arch::asm!("ud2", options(noreturn, nostack)) }
        }
        _ => panic!("requested by workload"),
    }
}
