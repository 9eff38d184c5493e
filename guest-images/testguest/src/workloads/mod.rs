//! The workloads, selected by `workload=NAME` on the command line:
//!
//! - `counter` (`pages`, `steps`, `tick_ms`): fills pages with pseudo-random words in
//!   steps, sleeping on the platform timer between steps; prints a checksum.
//! - `dirty` (`pages`, `dma`): writes the listed pages and has the platform device fill
//!   others, between markers 1 and 2 (for dirty-page tracking tests).
//! - `fault` (`kind` = `pf` | `ud` | `panic`): crashes on purpose.
//! - `disk` (`blocks`, `gen`, `mode`): writes and verifies blocks on the virtio disk.
//! - `net` (`ip`, `udp`, `kv`): ARP, ICMP echo, UDP echo and a TCP key-value service
//!   stored on the virtio disk, over virtio-net with smoltcp.
//! - `echo`: echoes console input lines until `quit`.
//! - `cpl0`: runs INT3, FWAIT, POPCNT, STMXCSR and LDMXCSR at CPL0 and checks them.

mod counter;
pub mod cpl0;
mod dirty;
mod disk;
mod echo;
mod fault;
mod kv;
mod kvproto;
mod net;
mod spin;

use core::fmt;

use crate::cmdline::Cmdline;
use crate::{MIB, PAGE_SIZE, WORK_BASE};

/// Runs the workload `cmdline` names; never returns (powers off).
pub fn run(cmdline: &mut Cmdline, ram_end: u64) -> ! {
    match cmdline.workload {
        "counter" => counter::run(cmdline, ram_end),
        "dirty" => dirty::run(cmdline, ram_end),
        "fault" => fault::run(cmdline),
        "disk" => disk::run(cmdline),
        "net" => net::run(cmdline),
        "echo" => echo::run(cmdline),
        "spin" => spin::run(cmdline),
        "cpl0" => cpl0::run(cmdline),
        other => {
            fatal!("unknown workload {other:?} (known: counter, dirty, fault, disk, net, echo, spin, cpl0)")
        }
    }
}

/// Guest-physical (= virtual) address of workload page `index`.
fn page_addr(index: u64) -> u64 {
    WORK_BASE + index * PAGE_SIZE
}

/// Fails (exit code 2) unless workload pages `0..count` lie in RAM below `ram_end`.
fn check_pages_fit(workload: &str, what: fmt::Arguments<'_>, count: u64, ram_end: u64) {
    let needed = count
        .checked_mul(PAGE_SIZE)
        .and_then(|bytes| bytes.checked_add(WORK_BASE));
    match needed {
        Some(end) if end <= ram_end => {}
        _ => fatal!(
            "{workload}: {what} needs {} MiB of RAM, only {} MiB available",
            needed.map_or(u64::MAX, |end| end.div_ceil(MIB)),
            ram_end / MIB
        ),
    }
}

/// SplitMix64: the pseudo-random word generator of the workloads.
fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}
