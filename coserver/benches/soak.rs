//! The long fault soak: a protected pair under a key-value client takes
//! `FTVM_SOAK_FAULTS` (default 40) faults drawn from `FTVM_SOAK_SEED` (hexadecimal,
//! default 0x5eed0040) and prints the table of docs/PERFORMANCE.md; exits 1 if any
//! check failed. `FTVM_SOAK_MODE=lockstep` runs the pair in lockstep mode (default
//! checkpoint). Needs root and /dev/kvm.
//!
//! Run with `cargo bench -p ftvm-coserver --bench soak`.

#[path = "../../tests/common/mod.rs"]
mod common;
#[path = "../../tests/common/pair.rs"]
mod pair;
#[path = "../../tests/common/soak.rs"]
mod soak;

fn main() {
    let env = |name: &str| std::env::var(name).ok();
    let faults = env("FTVM_SOAK_FAULTS")
        .and_then(|n| n.parse().ok())
        .unwrap_or(40usize);
    let seed = env("FTVM_SOAK_SEED")
        .and_then(|s| u64::from_str_radix(s.trim_start_matches("0x"), 16).ok())
        .unwrap_or(0x5eed_0040);
    let Some((net, dir)) = pair::setup("soak", "l") else {
        eprintln!("soak: needs root and /dev/kvm");
        std::process::exit(2);
    };
    let mode = match env("FTVM_SOAK_MODE").as_deref() {
        None | Some("checkpoint") => pair::ReplicationMode::Checkpoint,
        Some("lockstep") => pair::ReplicationMode::Lockstep,
        Some(other) => {
            eprintln!("soak: FTVM_SOAK_MODE={other}: expected checkpoint or lockstep");
            std::process::exit(2);
        }
    };
    println!(
        "soak: {faults} faults, seed {seed:#x}, {} mode",
        mode.name()
    );
    let r = soak::run(&net, dir.path(), seed, faults, &soak::Plan::all(mode));
    println!("{}", r.table());
    if !r.clean() {
        std::process::exit(1);
    }
}
