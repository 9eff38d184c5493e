//! The follower against a real guest, without links: a recording VM plays the primary,
//! its state becomes the follower's standby, and its log is fed to the follower slice by
//! slice — one that retraces it, one whose end says otherwise.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ftvm_devices::world::live::IdlePacing;
use ftvm_devices::world::record::{take_logged, InputLog, RecordingWorld};
use ftvm_devices::world::{LiveWorld, SharedBuffer};
use ftvm_vmm::{RunLimits, Standby, Vm, VmConfig};

use super::lockstep::{Follower, Report};
use crate::protocol::{ExitPoint, LogSegment, Message};

/// The test guest's counter, recording its inputs; `None` (skipped) without KVM unless
/// FTVM_REQUIRE_KVM=1.
fn primary() -> Option<(Vm, Arc<Mutex<InputLog>>)> {
    let world =
        RecordingWorld::new(LiveWorld::new(SharedBuffer::default()).with_pacing(IdlePacing::Skip))
            .digest_disk_reads();
    let log = world.log_handle();
    let config = VmConfig {
        cpu_template: Default::default(),
        mem_mib: 64,
        kernel: ftvm_guest_images::TEST_GUEST_ELF.to_vec(),
        cmdline: "workload=counter pages=800 steps=400 tick_ms=1".into(),
        initrd: None,
        entropy_seed: 0,
        devices: Vec::new(),
        attachments: Default::default(),
    };
    match Vm::boot(&config, Box::new(world)) {
        Ok(vm) => Some((vm, log)),
        Err(e) if std::env::var("FTVM_REQUIRE_KVM").as_deref() != Ok("1") => {
            eprintln!("SKIPPED: cannot boot a VM: {e}");
            None
        }
        Err(e) => panic!("FTVM_REQUIRE_KVM=1 but no VM: {e}"),
    }
}

fn run_to(vm: &mut Vm, exit: u64) {
    let stop = vm
        .run(&RunLimits {
            max_exits: Some(exit),
            ..Default::default()
        })
        .expect("run");
    assert_eq!(vm.exits(), exit, "the guest stopped early: {stop:?}");
}

/// The next slice of `vm`'s log, through exit `exit`.
fn slice(vm: &mut Vm, log: &Mutex<InputLog>, exit: u64) -> LogSegment {
    run_to(vm, exit);
    LogSegment {
        end: ExitPoint {
            exit: vm.exits(),
            exit_trace: vm.exit_trace(),
            output_digest: vm.output_digest(),
        },
        memory: Some(vm.memory_sample(0, 16384).expect("sample").0),
        events: take_logged(log),
    }
}

fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < Duration::from_secs(30), "{what}");
        std::thread::sleep(Duration::from_millis(2));
    }
}

#[test]
fn a_follower_retraces_the_primary_and_reports_a_slice_that_ends_elsewhere() {
    let Some((mut vm, log)) = primary() else {
        return;
    };
    // The copy: the primary's memory and state at exit 300.
    run_to(&mut vm, 300);
    take_logged(&log);
    let mut standby = Standby::new(64).expect("standby");
    let touched = vm.touched_pages().expect("touched");
    standby
        .apply_pages(&vm.read_pages(touched.iter()).expect("pages"))
        .expect("apply");
    standby
        .set_state(&vm.capture_state().expect("state"))
        .expect("set state");
    let reports = Arc::new(Mutex::new(Vec::new()));
    let sink = reports.clone();
    let report: Report = Box::new(move |m| sink.lock().unwrap().push(m));
    let follower = Follower::start(standby, Vec::new(), false, report, None).expect("follower");

    // Two slices that retrace the primary, the second with a whole-memory sample.
    let first = slice(&mut vm, &log, 900);
    assert!(
        !first.events.is_empty(),
        "the counter idles: wake-ups logged"
    );
    assert!(follower.slice(1, first));
    assert!(follower.slice(2, slice(&mut vm, &log, 1500)));
    wait_for("the follower executes both slices", || {
        follower.status().executed == Some((2, 1500))
    });
    assert!(follower.status().diverged.is_none());
    wait_for("it reports where it is", || {
        reports.lock().unwrap().contains(&Message::Executed {
            position: 2,
            exit: 1500,
        })
    });

    // A slice whose end says the primary's guest made other output: a divergence,
    // named with its position.
    let mut third = slice(&mut vm, &log, 2100);
    third.end.output_digest ^= 1;
    assert!(follower.slice(3, third));
    wait_for("the divergence is reported", || {
        follower.status().diverged.is_some()
    });
    let d = follower.status().diverged.expect("diverged");
    assert_eq!(d.position, 3);
    assert!(d.why.contains("output digests differ"), "{}", d.why);
    assert!(
        !follower.slice(4, slice(&mut vm, &log, 2200)),
        "the follower has ended"
    );
}
