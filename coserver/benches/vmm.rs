//! VMM core benchmark: prints a table of start-up, exit, state-capture and snapshot
//! figures. Run with `cargo bench -p ftvm-coserver --bench vmm` (see docs/PERFORMANCE.md).

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use ftvm_devices::world::live::IdlePacing;
use ftvm_devices::world::{LiveWorld, SharedBuffer};
use ftvm_guest_images::TEST_GUEST_ELF;
use ftvm_vmm::{RunLimits, RunStop, Vm, VmConfig};

fn boot(mem_mib: u64, cmdline: &str) -> Vm {
    let config = VmConfig {
        cpu_template: Default::default(),
        mem_mib,
        kernel: TEST_GUEST_ELF.to_vec(),
        cmdline: cmdline.to_string(),
        initrd: None,
        entropy_seed: 0,
        devices: Vec::new(),
        attachments: Default::default(),
    };
    Vm::boot(
        &config,
        Box::new(LiveWorld::new(SharedBuffer::default()).with_pacing(IdlePacing::Skip)),
    )
    .expect("boot")
}

fn percentile(v: &mut [Duration], p: f64) -> Duration {
    v.sort();
    v[((v.len() - 1) as f64 * p).round() as usize]
}

fn us(d: Duration) -> String {
    format!("{:.1} µs", d.as_secs_f64() * 1e6)
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1e3)
}

/// Process start to the first console line of `ftvm run`.
fn startup() -> (Duration, Duration) {
    let mut samples = Vec::new();
    for _ in 0..20 {
        let start = Instant::now();
        let mut child = Command::new(env!("CARGO_BIN_EXE_ftvm"))
            .args(["run", "--idle", "skip"])
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn ftvm");
        let mut out = BufReader::new(child.stdout.take().expect("stdout"));
        let mut line = String::new();
        out.read_line(&mut line).expect("read");
        samples.push(start.elapsed());
        // Drain the rest so the guest's console never hits a closed pipe.
        std::io::copy(&mut out, &mut std::io::sink()).expect("drain");
        let _ = child.wait();
    }
    (percentile(&mut samples, 0.5), percentile(&mut samples, 0.0))
}

/// Average wall time per exit of a run that is almost only exits.
fn exit_round_trip() -> (u64, Duration) {
    let mut vm = boot(64, "workload=counter pages=400 steps=400 tick_ms=0");
    let start = Instant::now();
    let stop = vm.run(&RunLimits::default()).expect("run");
    assert_eq!(stop, RunStop::PowerOff(0));
    (vm.exits(), start.elapsed() / vm.exits() as u32)
}

/// vCPU + VM-level + device state capture (including completing pending I/O).
fn capture() -> (usize, Duration, Duration) {
    let mut vm = boot(64, "workload=counter pages=64 steps=64 tick_ms=1");
    vm.run(&RunLimits {
        max_exits: Some(300),
        ..Default::default()
    })
    .expect("run");
    let mut samples = Vec::new();
    let mut size = 0;
    for _ in 0..200 {
        let t = Instant::now();
        size = vm.capture_state_size().expect("capture");
        samples.push(t.elapsed());
    }
    (
        size,
        percentile(&mut samples, 0.5),
        percentile(&mut samples, 0.99),
    )
}

fn main() {
    println!("ftvm VMM core benchmark\n");
    let (p50, min) = startup();
    println!(
        "| start-up to first console line (ftvm run, 20 runs) | p50 {} | min {} |",
        ms(p50),
        ms(min)
    );
    let (exits, per_exit) = exit_round_trip();
    println!(
        "| exit round trip (PIO from CPL3, {exits} exits) | {} per exit | |",
        us(per_exit)
    );
    let (size, p50, p99) = capture();
    println!(
        "| state capture (vCPU + VM + devices, {size} bytes) | p50 {} | p99 {} |",
        us(p50),
        us(p99)
    );
    println!();
    println!("| guest memory | dirty | pages in snapshot | save | restore | memory.bin |");
    println!("|---|---|---|---|---|---|");
    for mem_mib in [64u64, 256, 1024] {
        for pct in [1u64, 10, 100] {
            let work_pages = ((mem_mib - 4) << 20) / 4096;
            let pages = (work_pages * pct / 100).max(1);
            let mut vm = boot(
                mem_mib,
                &format!("workload=counter pages={pages} steps=1 tick_ms=0"),
            );
            assert_eq!(
                vm.run(&RunLimits::default()).expect("run"),
                RunStop::PowerOff(0)
            );
            let dir = tempfile::tempdir().expect("tempdir");
            let t = Instant::now();
            let sizes = vm.save(dir.path()).expect("save");
            let save = t.elapsed();
            drop(vm);
            let t = Instant::now();
            let restored = Vm::restore(
                dir.path(),
                Box::new(LiveWorld::new(SharedBuffer::default()).with_pacing(IdlePacing::Skip)),
            )
            .expect("restore");
            let restore = t.elapsed();
            drop(restored);
            println!(
                "| {mem_mib} MiB | {pct}% | {} | {} | {} | {} MiB |",
                sizes.memory_bytes / 4096,
                ms(save),
                ms(restore),
                sizes.memory_bytes >> 20
            );
        }
    }
}
