//! Helpers shared by the end-to-end tests: KVM availability (strict under
//! FTVM_REQUIRE_KVM=1), running the `ftvm` binary, and parsing its report.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Output};

mod console;
mod kvm;
#[allow(unused_imports)]
pub use console::ConsoleLines;
#[allow(unused_imports)]
pub use kvm::*;

/// A command running the `ftvm` binary under test. Its stdin (the guest's console input)
/// is empty unless the test sets it.
pub fn ftvm() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_ftvm"));
    c.stdin(std::process::Stdio::null());
    c
}

/// Runs `ftvm` with `args`.
pub fn run_ftvm(args: &[&str]) -> Output {
    ftvm().args(args).output().expect("spawn ftvm")
}

/// A finished `ftvm` invocation, split into console output and report.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// Process exit code.
    pub code: i32,
    /// stdout: the guest's console bytes.
    pub console: String,
    /// Report fields (exits, exit-trace, memory-hash, output-digest, fallbacks,
    /// exit-code) from stderr.
    pub report: BTreeMap<String, String>,
    /// stderr.
    pub stderr: String,
}

const REPORT_KEYS: [&str; 6] = [
    "exits",
    "exit-trace",
    "memory-hash",
    "output-digest",
    "fallbacks",
    "exit-code",
];

/// Splits an invocation into console (stdout, exactly the guest's bytes) and the
/// report lines `ftvm --report` prints on stderr.
pub fn outcome(out: &Output) -> Outcome {
    let console = String::from_utf8_lossy(&out.stdout).to_string();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    let report = stderr
        .lines()
        .filter_map(|l| l.split_once(": "))
        .filter(|(k, _)| REPORT_KEYS.contains(k))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    assert!(!stderr.contains("panicked"), "ftvm panicked:\n{stderr}");
    Outcome {
        code: out.status.code().unwrap_or(-1),
        console,
        report,
        stderr,
    }
}

/// Runs `ftvm` and returns its outcome.
pub fn ftvm_outcome(args: &[&str]) -> Outcome {
    outcome(&run_ftvm(args))
}

/// Asserts that `ftvm` failed with the VMM error code, one `ftvm: error:` line naming
/// `needle`, and no panic.
pub fn assert_clean_error(o: &Outcome, needle: &str) {
    assert_eq!(
        o.code, 125,
        "expected the VMM error exit code; stderr:\n{}",
        o.stderr
    );
    let lines: Vec<&str> = o
        .stderr
        .lines()
        .filter(|l| l.starts_with("ftvm: error:"))
        .collect();
    assert_eq!(
        lines.len(),
        1,
        "one error line expected, stderr:\n{}",
        o.stderr
    );
    assert!(
        lines[0].contains(needle),
        "error line should mention {needle:?}: {}",
        lines[0]
    );
}

/// A path as &str.
pub fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// Adds `line` to the test report that `scripts/test` prints after the summary (test
/// output is otherwise only shown for failing tests).
pub fn report(line: &str) {
    use std::io::Write;
    let path = Path::new(env!("CARGO_TARGET_TMPDIR")).join("ftvm-test-report.txt");
    if let Ok(mut f) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
    {
        let _ = writeln!(f, "{line}");
    }
}

/// Pins the calling thread to core `cpu` (false if the kernel refused). Threads it
/// starts later inherit the pin.
pub fn pin_thread(cpu: usize) -> bool {
    // SAFETY: a zeroed cpu_set_t is empty; CPU_SET writes within it; sched_setaffinity
    // reads it for the calling thread (0).
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) == 0
    }
}
