//! Workload `disk`: writes, flushes, reads back and verifies blocks on the first virtio-blk
//! device.
//!
//! Parameters: `blocks` (default 256, >= 1; 4 KiB blocks from sector 0), `gen` (default
//! 1), `mode` = `both` (default: write, flush, read back, verify) | `write` | `verify`, and
//! `batch` (blocks per request, 1 to 16, default 16), `pace_us` (sleep this long on the
//! platform timer after each request; default 0), `progress` (print progress every
//! this many blocks; default 1024) and `rounds` (default 1: repeat the whole run this
//! many times, round `r` (from 0) writing generation `gen + r` and printing
//! `disk: round R/N done` after it, for throughput measurements).
//!
//! Block `b` (sectors `8b..8b+8`), all integers little endian:
//!
//! | bytes | content |
//! |---|---|
//! | 0..8 | magic `FTVMBLK1` |
//! | 8..16 | block number `b` (u64) |
//! | 16..24 | generation `gen` (u64) |
//! | 24..32 | FNV-1a-64 of bytes 0..24 and 32..4096, in that order (u64) |
//! | 32..4096 | payload: u64 words `j` = 4..512 (at byte `8j`) |
//!
//! Payload word `j` is `splitmix64(seed + j)` (wrapping) with
//! `seed = splitmix64(splitmix64(gen) ^ b)`.
//!
//! Transfers are `batch` blocks (up to 64 KiB) per request. Output: `disk: wrote N blocks`,
//! `disk: verified N blocks ok` or `disk: verify FAILED at block B: <why>` (exit code 4);
//! a request the device rejects prints `disk: <write|read|flush> rejected by the device
//! (status S)` (exit code 3); no disk, a disk too small or bad parameters exit with 2.

use core::fmt::Write;

use super::splitmix64;
use crate::cmdline::Cmdline;
use crate::io::{power_off, sleep_until, time_ns};
use crate::virtio::blk::{Blk, BlkError, MAX_TRANSFER, SECTOR};
use crate::virtio::{self, noinit_zeroed, DEVICE_BLK};

/// Bytes of a block.
const BLOCK: usize = 4096;
/// Sectors of a block.
const SECTORS_PER_BLOCK: u64 = (BLOCK / SECTOR) as u64;
/// Most blocks per request.
const BATCH: usize = MAX_TRANSFER / BLOCK;
/// The block magic.
const MAGIC: &[u8; 8] = b"FTVMBLK1";
/// Byte offset of the checksum field.
const CHECKSUM_AT: usize = 24;
/// First payload byte.
const PAYLOAD_AT: usize = 32;
/// Progress is printed every this many blocks (for large runs only).
const PROGRESS_EVERY: u64 = 1024;
/// FNV-1a-64 offset basis and prime.
const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

/// What to do (parameter `mode`).
#[derive(Clone, Copy, PartialEq)]
enum Mode {
    /// Write, flush, read back and verify.
    Both,
    /// Write and flush only.
    Write,
    /// Read back and verify only.
    Verify,
}

/// Runs the workload.
pub fn run(cmdline: &mut Cmdline) -> ! {
    let blocks = cmdline.u64_or("blocks", 256);
    let generation = cmdline.u64_or("gen", 1);
    let batch = cmdline.u64_or("batch", BATCH as u64);
    let pace_us = cmdline.u64_or("pace_us", 0);
    let every = cmdline.u64_or("progress", PROGRESS_EVERY).max(1);
    let rounds = cmdline.u64_or("rounds", 1).max(1);
    let mode = match cmdline.get("mode").unwrap_or("both") {
        "both" => Mode::Both,
        "write" => Mode::Write,
        "verify" => Mode::Verify,
        other => fatal!("disk: unknown mode {other:?} (both, write or verify)"),
    };
    cmdline.finish();
    if blocks == 0 {
        fatal!("disk: blocks must be at least 1");
    }
    if !(1..=BATCH as u64).contains(&batch) {
        fatal!("disk: batch must be 1 to {BATCH}");
    }
    let Some(transport) = virtio::find(cmdline.devices(), DEVICE_BLK) else {
        fatal!("disk: no virtio-blk device");
    };
    let mut blk = match Blk::new(transport) {
        Ok(blk) => blk,
        Err(why) => fatal!("disk: cannot initialise the virtio-blk device: {why}"),
    };
    let capacity = blk.capacity();
    let ro = if blk.read_only() { ", read-only" } else { "" };
    println!("disk: {capacity} sectors{ro}");
    if blocks
        .checked_mul(SECTORS_PER_BLOCK)
        .is_none_or(|s| s > capacity)
    {
        fatal!(
            "disk: blocks={blocks} needs {} sectors, the disk has {capacity}",
            blocks.saturating_mul(SECTORS_PER_BLOCK)
        );
    }
    let buf = noinit_zeroed!([[u8; BLOCK]; BATCH]);
    for round in 0..rounds {
        let generation = generation.wrapping_add(round);
        one_round(
            &mut blk, &mut *buf, blocks, generation, batch, pace_us, every, mode,
        );
        if rounds > 1 {
            println!("disk: round {}/{rounds} done", round + 1);
        }
    }
    power_off(0)
}

/// One write and/or verify pass over `blocks` blocks of generation `generation`.
#[allow(clippy::too_many_arguments)]
fn one_round(
    blk: &mut Blk,
    buf: &mut [[u8; BLOCK]; BATCH],
    blocks: u64,
    generation: u64,
    batch: u64,
    pace_us: u64,
    every: u64,
    mode: Mode,
) {
    if mode != Mode::Verify {
        let mut block = 0;
        while block < blocks {
            let n = (blocks - block).min(batch) as usize;
            for (i, data) in buf[..n].iter_mut().enumerate() {
                fill_block(data, block + i as u64, generation);
            }
            let bytes = buf[..n].as_flattened();
            check(blk.write(block * SECTORS_PER_BLOCK, bytes), "write");
            block += n as u64;
            progress("written", block, blocks, every);
            pace(pace_us);
        }
        check(blk.flush(), "flush");
        println!("disk: wrote {blocks} blocks");
    }

    if mode != Mode::Write {
        let mut block = 0;
        while block < blocks {
            let n = (blocks - block).min(batch) as usize;
            let bytes = buf[..n].as_flattened_mut();
            check(blk.read(block * SECTORS_PER_BLOCK, bytes), "read");
            for (i, data) in buf[..n].iter().enumerate() {
                let b = block + i as u64;
                let mut why = Why::new();
                if !verify_block(data, b, generation, &mut why) {
                    println!("disk: verify FAILED at block {b}: {}", why.as_str());
                    power_off(4);
                }
            }
            block += n as u64;
            progress("verified", block, blocks, every);
            pace(pace_us);
        }
        println!("disk: verified {blocks} blocks ok");
    }
}

/// Sleeps `us` microseconds of virtual time (nothing for 0).
fn pace(us: u64) {
    if us > 0 {
        sleep_until(time_ns().saturating_add(us.saturating_mul(1000)));
    }
}

/// Prints progress every `every` blocks of a run longer than that.
fn progress(what: &str, done: u64, total: u64, every: u64) {
    if total > every && done.is_multiple_of(every) && done < total {
        println!("disk: {what} {done}/{total} blocks");
    }
}

/// Exits with code 3 if the device rejected a request (or 2 for a request the driver
/// refused, which the size checks above rule out).
fn check(result: Result<(), BlkError>, what: &str) {
    match result {
        Ok(()) => {}
        Err(BlkError::Status(status)) => {
            println!("disk: {what} rejected by the device (status {status})");
            power_off(3)
        }
        Err(BlkError::Range) => fatal!("disk: {what} outside the disk"),
    }
}

/// Fills `data` with block `block` of generation `generation`.
fn fill_block(data: &mut [u8; BLOCK], block: u64, generation: u64) {
    data[..8].copy_from_slice(MAGIC);
    data[8..16].copy_from_slice(&block.to_le_bytes());
    data[16..24].copy_from_slice(&generation.to_le_bytes());
    let seed = payload_seed(block, generation);
    for (j, word) in data.chunks_exact_mut(8).enumerate().skip(PAYLOAD_AT / 8) {
        word.copy_from_slice(&splitmix64(seed.wrapping_add(j as u64)).to_le_bytes());
    }
    let sum = checksum(data);
    data[CHECKSUM_AT..PAYLOAD_AT].copy_from_slice(&sum.to_le_bytes());
}

/// Checks block `block` of generation `generation`; on a mismatch, writes why to `why`.
fn verify_block(data: &[u8; BLOCK], block: u64, generation: u64, why: &mut Why) -> bool {
    let word = |at: usize| u64::from_le_bytes(data[at..at + 8].try_into().unwrap());
    let seed = payload_seed(block, generation);
    let bad_word = || {
        (PAYLOAD_AT / 8..BLOCK / 8)
            .find(|&j| word(8 * j) != splitmix64(seed.wrapping_add(j as u64)))
    };
    // `Why` never fails.
    let _ = if &data[..8] != MAGIC {
        write!(why, "bad magic {:02x?}", &data[..8])
    } else if word(8) != block {
        write!(why, "holds block {}", word(8))
    } else if word(16) != generation {
        write!(why, "generation {} (expected {generation})", word(16))
    } else if word(CHECKSUM_AT) != checksum(data) {
        write!(why, "checksum mismatch")
    } else if let Some(j) = bad_word() {
        write!(why, "payload mismatch at byte {}", 8 * j)
    } else {
        return true;
    };
    false
}

/// The payload seed of a block.
fn payload_seed(block: u64, generation: u64) -> u64 {
    splitmix64(splitmix64(generation) ^ block)
}

/// FNV-1a-64 of the block without its checksum field.
fn checksum(data: &[u8; BLOCK]) -> u64 {
    let bytes = data[..CHECKSUM_AT].iter().chain(&data[PAYLOAD_AT..]);
    bytes.fold(FNV_OFFSET, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(FNV_PRIME)
    })
}

/// A short failure description (truncated if longer than its buffer).
struct Why {
    buf: [u8; 96],
    len: usize,
}

impl Why {
    /// An empty description.
    fn new() -> Why {
        Why {
            buf: [0; 96],
            len: 0,
        }
    }

    /// The description (ASCII).
    fn as_str(&self) -> &str {
        core::str::from_utf8(&self.buf[..self.len]).unwrap_or("?")
    }
}

impl Write for Why {
    fn write_str(&mut self, s: &str) -> core::fmt::Result {
        let n = s.len().min(self.buf.len() - self.len);
        self.buf[self.len..self.len + n].copy_from_slice(&s.as_bytes()[..n]);
        self.len += n;
        Ok(())
    }
}
