//! Linux guests under `ftvm run` (docs/PERFORMANCE.md, "Linux guests"): for the small
//! kernel built from Debian's linux-source-6.1, the time from `ftvm run` to "Run /init"
//! and to its first ping reply; for Debian 12's cloud kernel, the time to "Run /init";
//! and the instruction fallbacks each boot takes (a boot whose /init exits at once, so
//! the kernel panics, reboots and `ftvm run` ends with its report).
//!
//! Run as root: `cargo bench -p ftvm-coserver --bench linux`. `FTVM_BENCH_ONLY=small`
//! skips Debian's kernel (about 7 minutes on our hosts).

#[path = "../../tests/common/mod.rs"]
mod common;
#[path = "../../tests/common/linux.rs"]
mod linux;
#[path = "../../tests/common/netns.rs"]
mod netns;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::ConsoleLines;
use linux::EMULATED_KERNEL_FLAGS;

struct Boot {
    to_init: Duration,
    total: Duration,
    fallbacks: String,
    exits: String,
}

/// Boots `kernel` with an initramfs whose /init exits, to the end of the run.
fn boot_to_the_end(kernel: &Path, dir: &Path, mem: &str) -> Boot {
    let initrd = dir.join("exit.cpio");
    std::fs::write(&initrd, ftvm_guest_images::initramfs::exiting_initramfs()).expect("initrd");
    let started = Instant::now();
    let mut child = Command::new(env!("CARGO_BIN_EXE_ftvm"))
        .args(["run", "--kernel"])
        .arg(kernel)
        .arg("--initrd")
        .arg(&initrd)
        .args([
            "--mem",
            mem,
            "--cpu-template",
            "emulated-kernel",
            "--report",
        ])
        .args([
            "--cmdline",
            &format!("console=ttyS0 {EMULATED_KERNEL_FLAGS} panic=-1"),
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn ftvm");
    let console = ConsoleLines::new(child.stdout.take().expect("stdout"));
    console.wait_for("Run /init as init process", Duration::from_secs(900));
    let to_init = started.elapsed();
    let out = child.wait_with_output().expect("ftvm ends");
    let total = started.elapsed();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    let field = |k: &str| {
        stderr
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{k}: ")))
            .unwrap_or("?")
            .to_string()
    };
    if field("exits") == "?" {
        // No report: the run ended with an error; show how.
        eprintln!(
            "{} ended without a report (status {:?}):\n{}",
            kernel.display(),
            out.status.code(),
            stderr.lines().rev().take(5).collect::<Vec<_>>().join("\n")
        );
    }
    Boot {
        to_init,
        total,
        fallbacks: field("fallbacks"),
        exits: field("exits"),
    }
}

/// Time from `ftvm run` to the small kernel's first ping reply.
fn first_ping(kernel: &Path, dir: &Path) -> Duration {
    let ns = netns::NetNs::create("linux_bench").expect("namespace");
    let initrd = dir.join("idle.cpio");
    std::fs::write(&initrd, ftvm_guest_images::initramfs::idle_initramfs()).expect("initrd");
    let started = Instant::now();
    let mut child = ns
        .command(env!("CARGO_BIN_EXE_ftvm"))
        .args(["run", "--kernel"])
        .arg(kernel)
        .arg("--initrd")
        .arg(&initrd)
        .args([
            "--tap",
            &ns.tap,
            "--mem",
            "128",
            "--cpu-template",
            "emulated-kernel",
        ])
        .args([
            "--cmdline",
            &format!(
                "console=ttyS0 {EMULATED_KERNEL_FLAGS} ip={}::{}:255.255.255.0::eth0:off",
                netns::GUEST_IP,
                netns::HOST_IP
            ),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn ftvm");
    let answered = loop {
        let ok = ns
            .command("ping")
            .args(["-c", "1", "-W", "1", netns::GUEST_IP])
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false);
        if ok {
            break started.elapsed();
        }
        assert!(
            started.elapsed() < Duration::from_secs(600),
            "no ping reply in 600 s"
        );
    };
    let _ = child.kill();
    let _ = child.wait();
    answered
}

fn main() {
    assert!(
        common::kvm_available("linux bench") && common::root_available("linux bench"),
        "the Linux bench needs /dev/kvm and root"
    );
    let dir = tempfile::tempdir().expect("temp dir");
    let small = linux::small_kernel();
    println!("| kernel | to \"Run /init\" | to the first ping reply | run to its end (/init exits, panic, reboot) | exits | fallbacks per boot |");
    println!("|---|---|---|---|---|---|");
    let ping = first_ping(&small, dir.path());
    let b = boot_to_the_end(&small, dir.path(), "128");
    println!(
        "| small (linux-source-6.1, tinyconfig + small.config) | {:.1} s | {:.1} s | {:.1} s | {} | {} |",
        b.to_init.as_secs_f64(),
        ping.as_secs_f64(),
        b.total.as_secs_f64(),
        b.exits,
        b.fallbacks
    );
    if std::env::var("FTVM_BENCH_ONLY").as_deref() == Ok("small") {
        return;
    }
    let debian = linux::debian_cloud_kernel();
    let b = boot_to_the_end(&debian, dir.path(), "256");
    println!(
        "| Debian 12 cloud (6.1, unmodified) | {:.1} s | - | {:.1} s | {} | {} |",
        b.to_init.as_secs_f64(),
        b.total.as_secs_f64(),
        b.exits,
        b.fallbacks
    );
}
