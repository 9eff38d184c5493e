//! Linux guest images for the tests, built from Debian packages by the scripts in
//! `guest-images/linux/` and cached under `target/linux` (built once per machine; the
//! scripts skip what is up to date).

#![allow(dead_code)]

use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;

/// Kernel command-line flags for hosts whose emulated guest kernel mode lacks XSAVE,
/// SSE3-4.2, AES, PCLMUL, AVX, F16C, FMA, CMPXCHG16B, POPCNT and SMAP (feature numbers of
/// Linux's `cpufeatures.h`): there the CPUID a guest kernel reads need not be its CPU
/// template's (HOST.md). Harmless on a host that runs guest kernel code natively.
pub const EMULATED_KERNEL_FLAGS: &str =
    "noxsave clearcpuid=128,129,137,140,141,147,148,151,153,154,156,157,308";

/// The workspace root.
fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the crate lies in the workspace")
        .to_path_buf()
}

/// Where the images are cached.
fn cache() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("target"))
        .join("linux")
}

/// Runs `script OUT_DIR` from `guest-images/linux/` and returns `OUT_DIR/output`;
/// panics with the script's output if it fails.
fn build(script: &str, output: &str) -> PathBuf {
    let out = cache();
    std::fs::create_dir_all(&out).expect("create target/linux");
    let started = std::time::Instant::now();
    let result = Command::new("bash")
        .arg(root().join("guest-images/linux").join(script))
        .arg(&out)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {script}: {e}"));
    assert!(
        result.status.success(),
        "{script} failed:\n{}\n{}",
        String::from_utf8_lossy(&result.stdout),
        String::from_utf8_lossy(&result.stderr)
    );
    eprintln!(
        "{script}: ready in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    out.join(output)
}

/// The small kernel (Debian's linux-source-6.1, tinyconfig + small.config).
pub fn small_kernel() -> PathBuf {
    static KERNEL: OnceLock<PathBuf> = OnceLock::new();
    KERNEL
        .get_or_init(|| build("small-kernel.sh", "vmlinux-small"))
        .clone()
}

/// Debian 12's cloud kernel, decompressed to its ELF vmlinux.
pub fn debian_cloud_kernel() -> PathBuf {
    static KERNEL: OnceLock<PathBuf> = OnceLock::new();
    KERNEL
        .get_or_init(|| build("debian-cloud-kernel.sh", "vmlinux-debian-cloud"))
        .clone()
}

/// Writes a disk image of `mib` MiB with an MBR partition table of two Linux
/// partitions: 1 MiB-3 MiB and 3 MiB to the end.
pub fn partitioned_disk(path: &std::path::Path, mib: u64) {
    let sectors = (mib << 20) / 512;
    let mut mbr = [0u8; 512];
    let mut entry = |slot: usize, start: u64, count: u64| {
        let e = &mut mbr[0x1be + 16 * slot..0x1be + 16 * (slot + 1)];
        e[4] = 0x83; // Linux
        e[8..12].copy_from_slice(&(start as u32).to_le_bytes());
        e[12..16].copy_from_slice(&(count as u32).to_le_bytes());
    };
    entry(0, 2048, 4096);
    entry(1, 6144, sectors - 6144);
    mbr[510] = 0x55;
    mbr[511] = 0xaa;
    let f = std::fs::File::create(path).expect("create disk image");
    f.set_len(mib << 20).expect("size disk image");
    std::os::unix::fs::FileExt::write_all_at(&f, &mbr, 0).expect("write MBR");
}
