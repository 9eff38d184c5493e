//! Workload `dirty`, for the VMM's dirty-page tracking tests.
//!
//! Parameters: `pages` and `dma`, comma-separated lists (possibly empty, at most 64
//! entries each) of workload page indices. The guest pre-touches every listed page, writes
//! `MARKER` 1, then writes one non-zero u64 at offset `8 * k` of the `k`-th `pages` page and
//! has the platform device fill each `dma` page (4096 bytes, ENTROPY_FILL), then writes
//! `MARKER` 2. Between the markers it writes no other memory than those pages, its stack
//! and interrupt counters.

use super::{check_pages_fit, page_addr};
use crate::cmdline::Cmdline;
use crate::io::{entropy_fill, marker, power_off};
use crate::PAGE_SIZE;

/// Runs the workload.
pub fn run(cmdline: &mut Cmdline, ram_end: u64) -> ! {
    let pages = cmdline.list("pages");
    let dma = cmdline.list("dma");
    cmdline.finish();
    let (pages, dma) = (pages.as_slice(), dma.as_slice());
    for (name, list) in [("pages", pages), ("dma", dma)] {
        for &page in list {
            let count = page.saturating_add(1);
            check_pages_fit("dirty", format_args!("{name}: page {page}"), count, ram_end);
        }
    }

    for &page in pages.iter().chain(dma) {
        let ptr = page_addr(page) as *mut u64;
        // SAFETY: the page lies in mapped RAM at or above WORK_BASE (checked above),
        // which nothing else uses.
        unsafe { ptr.write_volatile(ptr.read_volatile()) };
    }
    marker(1);
    for (k, &page) in pages.iter().enumerate() {
        let ptr = page_addr(page) as *mut u64;
        // SAFETY: as above; k < 64, so the word lies inside the page.
        unsafe { ptr.add(k).write_volatile(dirty_value(page, k)) };
    }
    for &page in dma {
        if !entropy_fill(page_addr(page), PAGE_SIZE as u32) {
            crate::fatal_exit(3, format_args!("dirty: ENTROPY_FILL of page {page} failed"));
        }
    }
    marker(2);
    println!(
        "dirty: wrote {} pages, filled {} pages",
        pages.len(),
        dma.len()
    );
    power_off(0)
}

/// The (non-zero) value written at word `k` of page `page`.
fn dirty_value(page: u64, k: usize) -> u64 {
    0xd1d7_0000_0000_0000 | (page << 8) | (k as u64 + 1)
}
