//! End-to-end tests of `ftvm run` / `ftvm restore` with the built-in test guest:
//! booting, determinism, snapshot exactness and bad input.

mod common;

use common::*;

/// A short counter workload that still exercises timers and interrupts.
const CMDLINE: &str = "workload=counter pages=96 steps=4 tick_ms=2";

fn run_counter(extra: &[&str]) -> Outcome {
    let mut args = vec!["run", "--cmdline", CMDLINE, "--report"];
    args.extend_from_slice(extra);
    ftvm_outcome(&args)
}

#[test]
fn default_run_boots_the_test_guest_and_exits_zero() {
    if !kvm_available("default_run") {
        return;
    }
    let o = ftvm_outcome(&["run"]);
    assert_eq!(o.code, 0, "stderr:\n{}", o.stderr);
    assert!(
        o.console.starts_with("ftvm-testguest: booted"),
        "console:\n{}",
        o.console
    );
    assert!(
        o.console.contains("counter: checksum"),
        "console:\n{}",
        o.console
    );
    assert!(
        o.console.contains("counter: done"),
        "console:\n{}",
        o.console
    );
    assert!(o.report.is_empty(), "no report without --report");
}

#[test]
fn runs_are_deterministic_whatever_the_idle_policy() {
    if !kvm_available("determinism") {
        return;
    }
    let a = run_counter(&[]);
    let b = run_counter(&[]);
    let c = run_counter(&["--idle", "skip"]);
    assert_eq!(a.code, 0, "stderr:\n{}", a.stderr);
    for k in ["exits", "exit-trace", "memory-hash", "exit-code"] {
        assert!(a.report.contains_key(k), "missing {k} in {:?}", a.report);
    }
    assert_eq!(a.report, b.report);
    assert_eq!(
        a.report, c.report,
        "idle pacing must not change what the guest sees"
    );
    assert_eq!(a.console, b.console);
    assert_eq!(a.console, c.console);
    let d = run_counter(&["--entropy-seed", "1", "--idle", "skip"]);
    assert_ne!(
        a.report["memory-hash"], d.report["memory-hash"],
        "the seed feeds the guest"
    );
}

#[test]
fn snapshot_and_restore_continue_exactly() {
    if !kvm_available("exactness") {
        return;
    }
    let full = run_counter(&["--idle", "skip"]);
    assert_eq!(full.code, 0, "stderr:\n{}", full.stderr);
    let total: u64 = full.report["exits"].parse().unwrap();
    assert!(
        total > 100,
        "the workload should make many exits, made {total}"
    );
    for n in [3, total / 2, total - 2] {
        let dir = tempfile::tempdir().unwrap();
        let n_s = n.to_string();
        let first = run_counter(&[
            "--idle",
            "skip",
            "--save-at-exit",
            &n_s,
            "--save",
            s(dir.path()),
        ]);
        assert_eq!(first.code, 0, "save at {n}: stderr:\n{}", first.stderr);
        assert_eq!(first.report["exits"], n_s);
        let second = ftvm_outcome(&["restore", s(dir.path()), "--report", "--idle", "skip"]);
        assert_eq!(second.code, 0, "restore at {n}: stderr:\n{}", second.stderr);
        assert_eq!(
            second.report, full.report,
            "report after a save at exit {n}"
        );
        assert_eq!(
            format!("{}{}", first.console, second.console),
            full.console,
            "console of both halves at exit {n}"
        );
    }
}

#[test]
fn saving_past_the_end_is_an_error() {
    if !kvm_available("save_past_end") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let o = run_counter(&[
        "--idle",
        "skip",
        "--save-at-exit",
        "100000000",
        "--save",
        s(dir.path()),
    ]);
    assert_clean_error(&o, "before exit 100000000");
    assert!(!dir.path().join("vm.state").exists());
}

/// Makes a snapshot of the counter guest midway, for the corruption tests.
fn midway_snapshot() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let o = run_counter(&[
        "--idle",
        "skip",
        "--save-at-exit",
        "200",
        "--save",
        s(dir.path()),
    ]);
    assert_eq!(o.code, 0, "stderr:\n{}", o.stderr);
    dir
}

fn restore(dir: &std::path::Path) -> Outcome {
    ftvm_outcome(&["restore", s(dir), "--idle", "skip"])
}

#[test]
fn damaged_snapshots_are_refused_with_a_clear_error() {
    if !kvm_available("damaged_snapshots") {
        return;
    }
    let state = |d: &tempfile::TempDir| d.path().join("vm.state");
    let memory = |d: &tempfile::TempDir| d.path().join("memory.bin");
    let edit = |p: std::path::PathBuf, f: &dyn Fn(&mut Vec<u8>)| {
        let mut b = std::fs::read(&p).unwrap();
        f(&mut b);
        std::fs::write(&p, b).unwrap();
    };

    let d = midway_snapshot();
    edit(state(&d), &|b| b.truncate(b.len() - 100));
    assert_clean_error(&restore(d.path()), "truncated");

    let d = midway_snapshot();
    edit(state(&d), &|b| b.truncate(20));
    assert_clean_error(&restore(d.path()), "truncated");

    let d = midway_snapshot();
    edit(memory(&d), &|b| b.truncate(b.len() - 4096));
    assert_clean_error(&restore(d.path()), "truncated");

    let d = midway_snapshot();
    edit(state(&d), &|b| {
        let i = b.len() / 2;
        b[i] ^= 0x40;
    });
    assert_clean_error(&restore(d.path()), "checksum mismatch");

    let d = midway_snapshot();
    edit(memory(&d), &|b| {
        let i = b.len() / 3;
        b[i] ^= 0x01;
    });
    assert_clean_error(&restore(d.path()), "checksum mismatch");

    let d = midway_snapshot();
    edit(state(&d), &|b| {
        b[8..12].copy_from_slice(&99u32.to_le_bytes())
    });
    assert_clean_error(&restore(d.path()), "format version 99");

    let d = midway_snapshot();
    edit(state(&d), &|b| b[0..8].copy_from_slice(b"NOTASNAP"));
    assert_clean_error(&restore(d.path()), "not an ftvm snapshot");

    let d = tempfile::tempdir().unwrap();
    assert_clean_error(&restore(d.path()), "vm.state");
}

#[test]
fn bad_kernels_and_memory_sizes_are_refused() {
    // These fail before KVM is touched, so they need no /dev/kvm.
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no-such-kernel");
    assert_clean_error(
        &ftvm_outcome(&["run", "--kernel", s(&missing)]),
        "cannot read kernel",
    );
    let text = dir.path().join("script.sh");
    std::fs::write(&text, "#!/bin/sh\necho not a kernel\n").unwrap();
    assert_clean_error(
        &ftvm_outcome(&["run", "--kernel", s(&text)]),
        "neither an ELF executable nor a Linux bzImage",
    );
    let empty = dir.path().join("empty");
    std::fs::write(&empty, "").unwrap();
    assert_clean_error(
        &ftvm_outcome(&["run", "--kernel", s(&empty)]),
        "neither an ELF",
    );
    let mut elf = b"\x7fELF\x02\x01\x01".to_vec();
    elf.resize(64, 0xee);
    let bad_elf = dir.path().join("bad.elf");
    std::fs::write(&bad_elf, elf).unwrap();
    assert_clean_error(
        &ftvm_outcome(&["run", "--kernel", s(&bad_elf)]),
        "ELF kernel cannot be loaded",
    );
    assert_clean_error(&ftvm_outcome(&["run", "--mem", "4"]), "out of range");
    let o = ftvm_outcome(&["run", "--save-at-exit", "5"]);
    assert_eq!(o.code, 2, "clap usage error expected:\n{}", o.stderr);
}

#[test]
fn a_guest_that_needs_more_memory_says_so() {
    if !kvm_available("guest_memory") {
        return;
    }
    let o = ftvm_outcome(&[
        "run",
        "--mem",
        "16",
        "--cmdline",
        "workload=counter pages=100000",
    ]);
    assert_eq!(
        o.code, 2,
        "the guest exits 2 on a bad parameter; stderr:\n{}",
        o.stderr
    );
    assert!(o.console.contains("error"), "console:\n{}", o.console);
}

#[test]
fn guest_crashes_are_reported() {
    if !kvm_available("guest_crash") {
        return;
    }
    let o = ftvm_outcome(&["run", "--cmdline", "workload=fault kind=ud", "--report"]);
    assert_clean_error(&o, "#UD");
    // The report comes before the error, without an exit code.
    assert!(o.report.contains_key("exits"), "{}", o.stderr);
    assert!(!o.report.contains_key("exit-code"), "{}", o.stderr);
    let o = ftvm_outcome(&["run", "--cmdline", "workload=fault kind=pf"]);
    assert_clean_error(&o, "#PF");
    let o = ftvm_outcome(&["run", "--cmdline", "workload=fault kind=panic"]);
    assert_clean_error(&o, "software panic");
    assert!(o.console.contains("panic"), "console:\n{}", o.console);
}

#[test]
fn missing_dev_kvm_is_a_clear_error() {
    if !root_available("missing_dev_kvm") {
        return;
    }
    // A private mount namespace with an empty /dev: the binary sees no /dev/kvm.
    let bin = env!("CARGO_BIN_EXE_ftvm");
    let out = std::process::Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c"])
        .arg(format!("mount -t tmpfs none /dev && exec {bin} run"))
        .output()
        .expect("spawn unshare");
    let o = outcome(&out);
    assert_clean_error(&o, "/dev/kvm");
}

#[test]
fn kernel_mode_instructions_the_host_may_not_emulate_run_exactly() {
    if !kvm_available("cpl0_fallback") {
        return;
    }
    // INT3, FWAIT, POPCNT, STMXCSR and LDMXCSR at CPL0: on a host whose KVM cannot
    // emulate them in guest kernel mode they go through the VMM's fallback, elsewhere
    // the CPU runs them; the guest checks the results either way.
    let args = ["run", "--cmdline", "workload=cpl0", "--report"];
    let a = ftvm_outcome(&args);
    assert_eq!(a.code, 0, "console:\n{}\nstderr:\n{}", a.console, a.stderr);
    assert!(a.console.contains("cpl0: ok"), "console:\n{}", a.console);
    let fallbacks = &a.report["fallbacks"];
    eprintln!("fallbacks on this host: {fallbacks}");
    let (total, detail) = fallbacks.split_once(' ').unwrap_or((fallbacks, ""));
    let total: u64 = total.parse().expect("a count");
    let mut sum = 0;
    for part in detail
        .trim_matches(|c| c == '(' || c == ')')
        .split(", ")
        .filter(|p| !p.is_empty())
    {
        let (mnemonic, n) = part.split_once(' ').expect("mnemonic and count");
        assert!(
            ["int3", "wait", "popcnt", "stmxcsr", "ldmxcsr"].contains(&mnemonic),
            "unexpected fallback {mnemonic} in {fallbacks}"
        );
        sum += n.parse::<u64>().expect("a count");
    }
    assert_eq!(sum, total, "{fallbacks}");
    let b = ftvm_outcome(&args);
    assert_eq!(a.report, b.report, "fallbacks are deterministic");
}

#[test]
fn the_cpu_template_is_chosen_on_the_command_line_or_refused_by_name() {
    if !kvm_available("cpu_template_cli") {
        return;
    }
    let host = run_counter(&[]);
    for template in ["emulated-kernel", "baseline"] {
        let o = run_counter(&["--cpu-template", template]);
        if o.code == 0 {
            // The test guest runs its work at CPL3, where it does not depend on CPUID.
            assert_eq!(o.console, host.console, "{template}");
        } else {
            assert_clean_error(
                &o,
                &format!("cannot offer CPU template {template}: its KVM lacks"),
            );
            eprintln!("{template}: {}", o.stderr.trim());
        }
    }
    let o = ftvm_outcome(&["run", "--cpu-template", "skylake"]);
    assert_eq!(o.code, 2, "a usage error; stderr:\n{}", o.stderr);
    assert!(
        o.stderr.contains("host, baseline, emulated-kernel"),
        "{}",
        o.stderr
    );
}
