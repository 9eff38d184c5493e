//! Builds the freestanding test guest (`testguest/`, its own Cargo workspace) with a nested
//! `cargo build --release` for the host target, as a static non-PIE ELF linked at 1 MiB by
//! `testguest/linker.ld`, and copies it to `$OUT_DIR/ftvm-testguest` for `include_bytes!`.

use std::env;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The only Rust target available on the build machines; the guest is built for it with
/// freestanding code-generation and link flags.
const TARGET: &str = "x86_64-unknown-linux-gnu";
/// Name of the guest binary (package `ftvm-testguest`).
const BIN: &str = "ftvm-testguest";

/// Environment variables the nested cargo must not inherit (exact names).
const REMOVE_EXACT: &[&str] = &[
    "RUSTFLAGS",
    "CARGO_ENCODED_RUSTFLAGS",
    "CARGO_TARGET_DIR",
    "CARGO_BUILD_TARGET",
    "RUSTC_WRAPPER",
    "RUSTC_WORKSPACE_WRAPPER",
    "CARGO_MAKEFLAGS",
    "CARGO_PRIMARY_PACKAGE",
];
/// Environment variable prefixes the nested cargo must not inherit: the outer package's
/// build-script environment and configuration that would change the guest's build.
const REMOVE_PREFIXES: &[&str] = &[
    "CARGO_PROFILE_",
    "CARGO_CFG_",
    "CARGO_FEATURE_",
    "CARGO_PKG_",
    "CARGO_MANIFEST_",
    "CARGO_CRATE_",
    "CARGO_TARGET_",
    "CARGO_BUILD_",
    "__CARGO_",
];

/// The guest's rustflags: static, non-PIE, freestanding, linked by `linker_script`.
fn rustflags(linker_script: &Path) -> Vec<String> {
    let mut flags: Vec<String> = [
        "-Crelocation-model=static",
        "-Ccode-model=small",
        "-Ctarget-feature=+sse,+sse2",
        "-Clink-arg=-nostartfiles",
        "-Clink-arg=-nostdlib",
        "-Clink-arg=-static",
        "-Clink-arg=-no-pie",
        "-Clink-arg=-Wl,--build-id=none",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    flags.push(format!("-Clink-arg=-Wl,-T,{}", linker_script.display()));
    flags
}

fn main() {
    let manifest_dir =
        PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("OUT_DIR"));
    let guest_dir = manifest_dir.join("testguest");
    let linker_script = guest_dir.join("linker.ld");
    let cargo = env::var_os("CARGO").unwrap_or_else(|| OsString::from("cargo"));
    let target_dir = out_dir.join("testguest-target");

    for path in [
        "build.rs",
        "testguest/src",
        "testguest/Cargo.toml",
        "testguest/Cargo.lock",
        "testguest/linker.ld",
    ] {
        println!(
            "cargo:rerun-if-changed={}",
            manifest_dir.join(path).display()
        );
    }

    let mut cmd = Command::new(&cargo);
    cmd.arg("build")
        .arg("--release")
        .arg("--target")
        .arg(TARGET)
        .arg("--manifest-path")
        .arg(guest_dir.join("Cargo.toml"))
        .arg("--target-dir")
        .arg(&target_dir);
    for (key, _) in env::vars_os() {
        let Some(key) = key.to_str() else { continue };
        if REMOVE_EXACT.contains(&key) || REMOVE_PREFIXES.iter().any(|p| key.starts_with(p)) {
            cmd.env_remove(key);
        }
    }
    cmd.env(
        "CARGO_ENCODED_RUSTFLAGS",
        rustflags(&linker_script).join("\x1f"),
    );

    let output = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cargo:?} to build the test guest: {e}"));
    let stderr = String::from_utf8_lossy(&output.stderr);
    if !output.status.success() {
        panic!(
            "building the test guest failed ({}): {cmd:?}\n--- stdout ---\n{}\n--- stderr ---\n{stderr}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
        );
    }
    // The nested build's output is captured: surface its warnings.
    for line in stderr.lines().filter(|l| l.starts_with("warning")) {
        println!("cargo:warning=testguest: {line}");
    }

    let built = target_dir.join(TARGET).join("release").join(BIN);
    let dest = out_dir.join(BIN);
    std::fs::copy(&built, &dest)
        .unwrap_or_else(|e| panic!("cannot copy {} to {}: {e}", built.display(), dest.display()));
}
