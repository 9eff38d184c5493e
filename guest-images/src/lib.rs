//! Guest images built into ftvm.
//!
//! [`TEST_GUEST_ELF`] is ftvm's built-in test guest (`testguest/`): a tiny x86-64 kernel
//! booted through the Linux 64-bit boot protocol that does a few hundred instructions of
//! set-up at CPL0 and runs its workloads at CPL3 (docs/guest-abi.md describes the machine
//! it expects). It prints `ftvm-testguest: booted, N MiB RAM, cmdline "..."` first and
//! selects a workload from the command line:
//!
//! - `workload=counter [pages=256] [steps=8] [tick_ms=10]`: fills `pages` pages from
//!   [`WORK_BASE`] with SplitMix64 words seeded from the entropy port, in `steps` steps,
//!   sleeping `tick_ms` on the platform timer after each; prints `counter: step ...`,
//!   `counter: checksum <16 hex digits>`, `counter: done`; exit code 0.
//! - `workload=dirty pages=A,B,.. dma=C,D,..`: pre-touches the listed pages, MARKER 1,
//!   writes one u64 into each `pages` page and has the platform device ENTROPY_FILL each
//!   `dma` page, MARKER 2; exit code 0 (3 if a fill fails).
//! - `workload=echo`: prints `echo: ready`, echoes each console input line as
//!   `echo: <line>`; the line `quit` prints `echo: bye` and powers off with exit code 0.
//! - `workload=fault kind=pf|ud|panic`: crashes on purpose (GUEST_PANIC 14, 6 or 0x100).
//! - `workload=disk [blocks=256] [gen=1] [mode=both|write|verify] [batch=16] [pace_us=0] [progress=1024]`: writes
//!   `blocks` 4 KiB blocks, `batch` per request (magic `FTVMBLK1`, block number, generation, FNV-1a-64 checksum, SplitMix64
//!   payload) from sector 0 of the first virtio-blk device, flushes, reads them back and
//!   verifies them; prints `disk: wrote N blocks` / `disk: verified N blocks ok`; exit code
//!   0, 4 on a verify failure (`disk: verify FAILED at block B: ...`), 3 if the device
//!   rejects a request (`disk: write rejected by the device (status S)`), 2 without a disk.
//! - `workload=net [ip=10.0.99.2/24] [udp=7] [kv=7000]`: on the first virtio-net device
//!   (smoltcp), answers ARP and ICMP echo, echoes UDP on `udp`, and serves `SET k v` /
//!   `GET k` / `SHUTDOWN` lines on TCP port `kv` with values stored durably on the first
//!   virtio-blk device (`ERR no disk` without one); prints `net: up <ip>/<prefix> mac
//!   <mac>` when ready; `SHUTDOWN` answers `BYE` and powers off with exit code 0.
//!
//! The virtio devices are found through the `virtio_mmio.device=` tokens the VMM appends
//! to the command line. A bad command line prints `ftvm-testguest: error: ...` and exits
//! with code 2.

#![warn(missing_docs)]

pub mod initramfs;

/// The test guest kernel: a static, non-PIE x86-64 ELF executable whose PT_LOAD segments
/// (physical = virtual addresses) lie in [1 MiB, 4 MiB); entry point `_start` at 1 MiB.
pub const TEST_GUEST_ELF: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/ftvm-testguest"));

/// The test guest's default command line.
pub const DEFAULT_CMDLINE: &str = "workload=counter";

/// Guest-physical address of the test guest's first workload page (page `i` is at
/// `WORK_BASE + i * PAGE_SIZE`); the guest image lies below it.
pub const WORK_BASE: u64 = 0x40_0000;

/// Size of a workload page.
pub const PAGE_SIZE: u64 = 4096;

#[cfg(test)]
mod tests {
    use super::*;

    fn u16_at(b: &[u8], off: usize) -> u16 {
        u16::from_le_bytes(b[off..off + 2].try_into().unwrap())
    }

    fn u32_at(b: &[u8], off: usize) -> u32 {
        u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
    }

    fn u64_at(b: &[u8], off: usize) -> u64 {
        u64::from_le_bytes(b[off..off + 8].try_into().unwrap())
    }

    #[test]
    fn elf_header_is_x86_64_exec() {
        let elf = TEST_GUEST_ELF;
        assert_eq!(&elf[..4], b"\x7fELF");
        assert_eq!(elf[4], 2, "ELFCLASS64");
        assert_eq!(elf[5], 1, "little endian");
        assert_eq!(u16_at(elf, 16), 2, "ET_EXEC (not ET_DYN)");
        assert_eq!(u16_at(elf, 18), 62, "EM_X86_64");
        assert!(u64_at(elf, 24) >= 0x10_0000, "entry point below 1 MiB");
    }

    #[test]
    fn load_segments_lie_between_1_mib_and_work_base() {
        let elf = TEST_GUEST_ELF;
        let entry = u64_at(elf, 24);
        let phoff = u64_at(elf, 32) as usize;
        let phentsize = u16_at(elf, 54) as usize;
        let phnum = u16_at(elf, 56) as usize;
        assert_eq!(phentsize, 56);
        let mut loads = 0;
        let mut entry_found = false;
        for i in 0..phnum {
            let ph = &elf[phoff + i * phentsize..phoff + (i + 1) * phentsize];
            let kind = u32_at(ph, 0);
            assert!(kind != 2 && kind != 3, "PT_DYNAMIC or PT_INTERP segment");
            if kind != 1 {
                continue;
            }
            loads += 1;
            let (flags, offset, vaddr, paddr) =
                (u32_at(ph, 4), u64_at(ph, 8), u64_at(ph, 16), u64_at(ph, 24));
            let (filesz, memsz) = (u64_at(ph, 32), u64_at(ph, 40));
            assert_eq!(paddr, vaddr, "segment {i}: physical != virtual address");
            assert!(paddr >= 0x10_0000, "segment {i} starts below 1 MiB");
            assert!(
                paddr + memsz <= WORK_BASE,
                "segment {i} ends above WORK_BASE"
            );
            assert!(filesz <= memsz);
            assert!(offset + filesz <= elf.len() as u64);
            if flags & 1 != 0 && (paddr..paddr + memsz).contains(&entry) {
                entry_found = true;
            }
        }
        assert!(loads > 0, "no PT_LOAD segment");
        assert!(
            entry_found,
            "entry point not in an executable PT_LOAD segment"
        );
    }
}
