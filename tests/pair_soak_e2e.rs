//! The short run of the fault soak (`common/soak.rs`): 8 faults from a stated seed
//! against a protected pair under a key-value client. The long run is the `soak`
//! benchmark (docs/PERFORMANCE.md).

mod common;
#[path = "common/pair.rs"]
mod pair;
#[path = "common/soak.rs"]
mod soak;

/// The short run's seed (`FTVM_SOAK_SEED`, hexadecimal, to try another).
const SEED: u64 = 0x5eed_0011;
/// The short run's faults: one of each kind.
const FAULTS: usize = 8;

#[test]
fn a_short_fault_soak_loses_no_acknowledged_write_and_never_runs_two_primaries() {
    let Some((net, dir)) = pair::setup("pair_soak", "s") else {
        return;
    };
    let seed = std::env::var("FTVM_SOAK_SEED")
        .ok()
        .and_then(|s| u64::from_str_radix(s.trim_start_matches("0x"), 16).ok())
        .unwrap_or(SEED);
    let r = soak::run(
        &net,
        dir.path(),
        seed,
        FAULTS,
        &soak::Plan::all(pair::ReplicationMode::Checkpoint),
    );
    let table = r.table();
    println!("{table}");
    common::report(&format!(
        "fault soak, {FAULTS} faults (seed {seed:#x}): {} lost, {} split-brain samples, {} unexpected reboots, longest outage {:.0} ms",
        r.lost.len(),
        r.split_brain_samples,
        r.unexpected_reboots,
        r.longest_outage.as_secs_f64() * 1000.0
    ));
    assert!(r.clean(), "{table}");
    assert_eq!(
        r.faults.len(),
        FAULTS,
        "every kind of fault ran once:\n{table}"
    );
    assert!(r.sets > 0 && r.samples > 0, "{table}");
}
