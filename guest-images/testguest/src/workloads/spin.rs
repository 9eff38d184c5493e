//! Workload `spin`: computes for a while without a single VM exit (no port, no MMIO,
//! no memory beyond its registers), then prints the result and powers off. It stands
//! for a guest that keeps its vCPU busy, so that the VMM's way of ending `KVM_RUN` from
//! another thread can be tested.
//!
//! Parameter `rounds` (decimal, default 1000000000): SplitMix64 steps to compute.

use super::splitmix64;
use crate::cmdline::Cmdline;
use crate::io::power_off;

/// Runs the workload.
pub fn run(cmdline: &mut Cmdline) -> ! {
    let rounds = cmdline.u64_or("rounds", 1_000_000_000);
    cmdline.finish();
    println!("spin: {rounds} rounds");
    let mut x = 0u64;
    for i in 0..rounds {
        x = splitmix64(x ^ i);
    }
    println!("spin: done {x:#x}");
    power_off(0)
}
