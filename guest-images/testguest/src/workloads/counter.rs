//! Workload `counter`: writes `pages` pages (from `WORK_BASE`) with SplitMix64 words in
//! `steps` steps, printing progress and sleeping `tick_ms` on the platform timer after
//! each step, then prints an FNV-1a checksum of the pages read back.
//!
//! Parameters (decimal): `pages` (default 256, >= 1), `steps` (default 8,
//! 1 <= steps <= pages), `tick_ms` (default 10).

use super::{check_pages_fit, page_addr, splitmix64};
use crate::cmdline::Cmdline;
use crate::io::{entropy_u64, power_off, sleep_until, time_ns};

/// u64 words per page.
const WORDS: u64 = crate::PAGE_SIZE / 8;

/// Runs the workload.
pub fn run(cmdline: &mut Cmdline, ram_end: u64) -> ! {
    let pages = cmdline.u64_or("pages", 256);
    let steps = cmdline.u64_or("steps", 8);
    let tick_ms = cmdline.u64_or("tick_ms", 10);
    cmdline.finish();
    if pages == 0 {
        fatal!("counter: pages must be at least 1");
    }
    if steps == 0 || steps > pages {
        fatal!("counter: steps={steps} must be between 1 and pages={pages}");
    }
    let Some(tick_ns) = tick_ms.checked_mul(1_000_000) else {
        fatal!("counter: tick_ms={tick_ms} is too large");
    };
    check_pages_fit("counter", format_args!("pages={pages}"), pages, ram_end);

    let seed = entropy_u64();
    let per_step = pages / steps;
    for step in 0..steps {
        let first = step * per_step;
        let end = if step == steps - 1 {
            pages
        } else {
            first + per_step
        };
        for page in first..end {
            fill_page(seed, page);
        }
        println!(
            "counter: step {}/{steps} pages {end}/{pages} t={}us",
            step + 1,
            time_ns() / 1000
        );
        sleep_until(time_ns().saturating_add(tick_ns));
    }

    let mut hash = FNV_OFFSET;
    for page in 0..pages {
        let base = page_addr(page) as *const u64;
        for word in 0..WORDS as usize {
            // SAFETY: the page lies in mapped RAM (checked above) and was written above.
            let value = unsafe { base.add(word).read_volatile() };
            hash = (hash ^ value).wrapping_mul(FNV_PRIME);
        }
    }
    println!("counter: checksum {hash:016x}");
    println!("counter: done");
    power_off(0)
}

/// Writes word `j` of page `page` as `splitmix64(seed ^ (page << 16) ^ j)`.
fn fill_page(seed: u64, page: u64) {
    let base = page_addr(page) as *mut u64;
    for word in 0..WORDS {
        let value = splitmix64(seed ^ (page << 16) ^ word);
        // SAFETY: the caller checked that the page lies in mapped RAM at or above
        // WORK_BASE, which nothing else uses.
        unsafe { base.add(word as usize).write_volatile(value) };
    }
}

/// FNV-1a-64 offset basis.
const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
/// FNV-1a-64 prime (applied per u64 word).
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;
