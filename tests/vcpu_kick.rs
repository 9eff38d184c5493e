//! A kick ends the vCPU's KVM_RUN at once from another thread, even while the guest
//! computes without a single VM exit; without one, the run would go on for seconds.

#[path = "common/kvm.rs"]
mod kvm;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ftvm_devices::world::{IdleRequest, SharedBuffer, Wake, World, WorldError};
use ftvm_guest_images::TEST_GUEST_ELF;
use ftvm_vmm::{RunLimits, RunStop, Vm, VmConfig};

/// A World that asks for the VM back once `stop` is set (as the pair's World does when
/// an epoch is cut or the node fences).
struct StopWorld {
    console: SharedBuffer,
    stop: Arc<AtomicBool>,
}

impl World for StopWorld {
    fn console_output(&mut self, bytes: &[u8]) {
        std::io::Write::write_all(&mut self.console.clone(), bytes).expect("console");
    }

    fn idle(&mut self, request: &IdleRequest) -> Result<Wake, WorldError> {
        Ok(Wake {
            at_ns: request.now_ns,
        })
    }

    fn pause_requested(&mut self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }
}

fn text(b: &SharedBuffer) -> String {
    String::from_utf8_lossy(&b.contents()).into_owned()
}

#[test]
fn a_kick_ends_a_guest_that_computes_without_exits_at_once() {
    if !kvm::kvm_available("vcpu_kick") {
        return;
    }
    let console = SharedBuffer::default();
    let stop = Arc::new(AtomicBool::new(false));
    let config = VmConfig {
        cpu_template: Default::default(),
        mem_mib: 64,
        kernel: TEST_GUEST_ELF.to_vec(),
        // Seconds of SplitMix64 steps with no VM exit (bounded, should the kick fail).
        cmdline: "workload=spin rounds=5000000000".into(),
        initrd: None,
        entropy_seed: 0,
        devices: Vec::new(),
        attachments: Default::default(),
    };
    let world = StopWorld {
        console: console.clone(),
        stop: stop.clone(),
    };
    let (tx, rx) = std::sync::mpsc::channel();
    let runner = std::thread::spawn(move || {
        let mut vm = Vm::boot(&config, Box::new(world)).expect("boot");
        tx.send(vm.arm_kick().expect("arm the kick"))
            .expect("hand over the kick");
        let stop = vm.run(&RunLimits::default()).expect("run");
        (stop, Instant::now())
    });
    let kick = rx.recv().expect("kick handle");
    // Let the guest get into its loop.
    let start = Instant::now();
    while !text(&console).contains("spin:") && start.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(5));
    }
    std::thread::sleep(Duration::from_millis(200));
    stop.store(true, Ordering::SeqCst);
    let kicked = Instant::now();
    kick.kick();
    let (result, returned) = runner.join().expect("vCPU thread");
    let took = returned.duration_since(kicked);
    println!("KVM_RUN ended {} µs after the kick", took.as_micros());
    assert_eq!(result, RunStop::Paused);
    assert!(
        !text(&console).contains("spin: done"),
        "the guest finished instead of being stopped"
    );
    assert!(took < Duration::from_millis(500), "the kick took {took:?}");
    // Kicking a VM that is gone does nothing.
    kick.kick();
}
