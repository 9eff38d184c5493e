//! An unmodified Linux kernel under `ftvm run`: the small kernel built from Debian's
//! linux-source-6.1 finds its virtio disk and network through the machine ftvm presents
//! (ACPI tables, the command-line announcement) and answers pings, and Debian's cloud
//! kernel finds the machine through ACPI. Kernels come from Debian packages
//! (guest-images/linux/), built or extracted once into target/linux.
//!
//! On our development hosts guest kernel mode is emulated, the emulator lacks
//! instructions Linux uses, and the CPUID a guest kernel reads there need not be its CPU
//! template's (HOST.md): the kernel command line also clears those features, and the
//! VMM's instruction fallback covers what no CPUID bit avoids. On a host that runs
//! guest kernel code natively neither is needed, and both are harmless.

mod common;
#[path = "common/linux.rs"]
mod linux;
#[path = "common/netns.rs"]
mod netns;
#[path = "common/pair.rs"]
mod pair;

use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use common::*;
use linux::EMULATED_KERNEL_FLAGS;

/// Kills the VM when the test ends, however it ends.
struct Vm(Child);

impl Drop for Vm {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn the_small_kernel_finds_its_disk_and_network_and_answers_pings() {
    if !kvm_available("linux_small") {
        return;
    }
    let Some(ns) = netns::NetNs::create("linux_small") else {
        return;
    };
    let kernel = linux::small_kernel();
    let dir = tempfile::tempdir().expect("temp dir");
    let disk = dir.path().join("disk.img");
    linux::partitioned_disk(&disk, 16);
    let initrd = dir.path().join("initrd.cpio");
    std::fs::write(&initrd, ftvm_guest_images::initramfs::idle_initramfs()).expect("initrd");
    let cmdline = format!(
        "console=ttyS0 {EMULATED_KERNEL_FLAGS} ip={}::{}:255.255.255.0::eth0:off panic=-1",
        netns::GUEST_IP,
        netns::HOST_IP
    );
    let started = Instant::now();
    let mut vm = Vm(ns
        .command(env!("CARGO_BIN_EXE_ftvm"))
        .args(["run", "--kernel"])
        .arg(&kernel)
        .arg("--initrd")
        .arg(&initrd)
        .arg("--disk")
        .arg(&disk)
        .args([
            "--tap",
            &ns.tap,
            "--mem",
            "128",
            "--cpu-template",
            "emulated-kernel",
        ])
        .args(["--cmdline", &cmdline])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn ftvm"));
    let console = ConsoleLines::new(vm.0.stdout.take().expect("stdout"));
    let log = console.wait_for("Run /init as init process", Duration::from_secs(300));
    let booted = started.elapsed();
    for needle in [
        "ACPI: Using ACPI (MADT) for SMP configuration information",
        "[vda] 32768 512-byte logical blocks",
        " vda: vda1 vda2",
        "IP-Config: Complete",
    ] {
        assert!(
            log.contains(needle),
            "{needle:?} missing from the boot log:\n{log}"
        );
    }
    let ping = ns
        .command("ping")
        .args(["-c", "20", "-i", "0.2", "-W", "5", netns::GUEST_IP])
        .output()
        .expect("run ping");
    let report = String::from_utf8_lossy(&ping.stdout);
    eprintln!(
        "booted to /init in {:.1} s; ping:\n{report}",
        booted.as_secs_f64()
    );
    assert!(
        report.contains("20 packets transmitted, 20 received"),
        "ping:\n{report}\nboot log:\n{log}"
    );
}

#[test]
fn debian_cloud_kernel_finds_the_machine_and_its_serial_console_through_acpi() {
    if !kvm_available("linux_debian") {
        return;
    }
    let kernel = linux::debian_cloud_kernel();
    let started = Instant::now();
    let mut vm = Vm(ftvm()
        .args(["run", "--kernel"])
        .arg(&kernel)
        .args(["--mem", "256", "--cpu-template", "emulated-kernel"])
        .args([
            "--cmdline",
            &format!("console=ttyS0 earlyprintk=serial,ttyS0,115200 {EMULATED_KERNEL_FLAGS}"),
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn ftvm"));
    let console = ConsoleLines::new(vm.0.stdout.take().expect("stdout"));
    let mut log = console.wait_for(
        "ACPI: Using ACPI (MADT) for SMP configuration information",
        Duration::from_secs(180),
    );
    eprintln!(
        "Debian's kernel found the MADT after {:.1} s",
        started.elapsed().as_secs_f64()
    );
    for needle in [
        "ACPI: RSDP 0x00000000000E0000",
        "ACPI: FACP",
        "ACPI: DSDT",
        "IOAPIC[0]: apic_id 0, version 17, address 0xfec00000, GSI 0-23",
        "ACPI: INT_SRC_OVR (bus 0 bus_irq 0 global_irq 2 dfl dfl)",
    ] {
        assert!(
            log.contains(needle),
            "{needle:?} missing from the boot log:\n{log}"
        );
    }
    // The serial console's driver line (the full boot to /init, about 10 minutes on our
    // hosts, is a bench row): COM1 is found as ACPI PnP device 00:00, from the DSDT.
    log.push_str(&console.wait_for("ttyS0 at I/O 0x3f8", Duration::from_secs(600)));
    eprintln!(
        "Debian's kernel registered its serial console after {:.1} s",
        started.elapsed().as_secs_f64()
    );
    for needle in [
        "ACPI: 1 ACPI AML tables successfully acquired and loaded",
        "ACPI: PM: (supports S0 S5)",
        "pnp: PnP ACPI: found 1 devices",
        "00:00: ttyS0 at I/O 0x3f8",
    ] {
        assert!(
            log.contains(needle),
            "{needle:?} missing from the boot log:\n{log}"
        );
    }
}

#[test]
fn a_checkpoint_pair_keeps_the_small_kernel_running_across_a_primary_kill() {
    let Some((net, dir)) = pair::setup("linux_pair", "l") else {
        return;
    };
    let initrd = dir.path().join("initrd.cpio");
    std::fs::write(&initrd, ftvm_guest_images::initramfs::idle_initramfs()).expect("initrd");
    let cmdline = format!(
        "console=ttyS0 {EMULATED_KERNEL_FLAGS} ip={}::10.0.99.1:255.255.255.0::eth0:off panic=-1",
        pair::GUEST_IP
    );
    let guest = pair::GuestSpec {
        linux: Some(pair::LinuxGuest {
            kernel: linux::small_kernel(),
            initrd,
            mem_mib: 128,
            cpu_template: ftvm_vmm::cpu_template::CpuTemplate::EmulatedKernel,
        }),
        ..pair::spec(&cmdline, 16, true)
    };
    let (mut a, mut b) = pair::protected_pair(&net, dir.path(), &guest);
    assert!(
        pair::wait_until(Duration::from_secs(300), || a
            .console()
            .contains("Run /init as init process")),
        "the kernel did not reach /init on the primary:\n{}\nA:\n{}",
        a.console(),
        a.log()
    );
    let lan = |args: &[&str]| {
        let mut c = std::process::Command::new("ip");
        c.args(["netns", "exec", &net.ns[2], "ping"]).args(args);
        c
    };
    let warm = lan(&["-c", "3", "-W", "5", pair::GUEST_IP])
        .output()
        .expect("ping");
    assert!(
        warm.status.success(),
        "{}",
        String::from_utf8_lossy(&warm.stdout)
    );
    // A ping every 10 ms for 12 s (ping -D stamps each reply with the wall clock); the
    // primary is killed 3 s in.
    let stream = lan(&["-D", "-i", "0.01", "-w", "12", "-W", "1", pair::GUEST_IP])
        .stdout(Stdio::piped())
        .spawn()
        .expect("ping stream");
    std::thread::sleep(Duration::from_secs(3));
    let unix_now = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock after 1970")
            .as_secs_f64()
    };
    let killed_at = unix_now();
    a.kill();
    let out = stream.wait_with_output().expect("ping stream output");
    let text = String::from_utf8_lossy(&out.stdout);
    // "[1764700000.123456] 64 bytes from 10.0.99.2: icmp_seq=5 ttl=64 time=9.80 ms"
    let replies: Vec<f64> = text
        .lines()
        .filter(|l| l.contains("icmp_seq="))
        .filter_map(|l| l.strip_prefix('[')?.split(']').next()?.parse().ok())
        .collect();
    let summary = text
        .lines()
        .find(|l| l.contains("packets transmitted"))
        .unwrap_or("no summary")
        .to_string();
    let silence = replies
        .windows(2)
        .map(|w| w[1] - w[0])
        .fold(0.0f64, f64::max);
    let after_kill = replies.iter().filter(|&&t| t > killed_at + 1.0).count();
    let line = format!(
        "Linux guest, checkpoint pair, SIGKILL of the primary under a ping every 10 ms: {summary}; longest time without a reply {:.0} ms; {after_kill} replies more than 1 s after the kill",
        silence * 1000.0
    );
    eprintln!("{line}");
    report(&line);
    assert_eq!(
        b.wait(Duration::ZERO),
        None,
        "the survivor runs:\n{}",
        b.log()
    );
    assert!(
        pair::wait_until(pair::LIMIT, || b.typed().role == "primary"),
        "B did not take over:\n{}",
        b.log()
    );
    assert!(
        after_kill > 100,
        "the survivor did not go on answering: {line}\n{text}\nB:\n{}",
        b.log()
    );
    assert!(
        !b.console().contains("Linux version"),
        "the survivor's guest booted again:\n{}",
        b.console()
    );
}
