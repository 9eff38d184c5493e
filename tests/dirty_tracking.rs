//! The dirty-page API against a real guest: pages the guest writes (KVM's log) and
//! pages a device writes by DMA (the VMM's bitmap) come back exactly, nothing missing.

#[path = "common/kvm.rs"]
mod kvm;

use ftvm_devices::world::live::IdlePacing;
use ftvm_devices::world::{LiveWorld, SharedBuffer};
use ftvm_guest_images::{PAGE_SIZE, TEST_GUEST_ELF, WORK_BASE};
use ftvm_vmm::{RunLimits, RunStop, Vm, VmConfig};

fn boot(cmdline: &str) -> (Vm, SharedBuffer) {
    let console = SharedBuffer::default();
    let config = VmConfig {
        cpu_template: Default::default(),
        mem_mib: 64,
        kernel: TEST_GUEST_ELF.to_vec(),
        cmdline: cmdline.to_string(),
        initrd: None,
        entropy_seed: 0,
        devices: Vec::new(),
        attachments: Default::default(),
    };
    let vm = Vm::boot(
        &config,
        Box::new(LiveWorld::new(console.clone()).with_pacing(IdlePacing::Skip)),
    )
    .expect("boot");
    (vm, console)
}

fn run_to_marker(vm: &mut Vm, marker: u32) {
    let stop = vm
        .run(&RunLimits {
            stop_at_marker: Some(marker),
            ..Default::default()
        })
        .expect("run");
    assert_eq!(stop, RunStop::Marker(marker));
}

#[test]
fn guest_and_device_writes_are_reported_exactly() {
    if !kvm::kvm_available("dirty_tracking") {
        return;
    }
    let guest_pages = [0u64, 3, 17, 100, 101, 900];
    let dma_pages = [5u64, 64, 2000];
    let list = |p: &[u64]| {
        p.iter()
            .map(|x| x.to_string())
            .collect::<Vec<_>>()
            .join(",")
    };
    let (mut vm, console) = boot(&format!(
        "workload=dirty pages={} dma={}",
        list(&guest_pages),
        list(&dma_pages)
    ));
    run_to_marker(&mut vm, 1);
    let before = vm.take_dirty_pages().expect("dirty pages");
    assert!(!before.is_empty(), "boot and pre-touch dirty pages");
    run_to_marker(&mut vm, 2);
    let dirty = vm.take_dirty_pages().expect("dirty pages");

    let expected: Vec<u64> = guest_pages
        .iter()
        .chain(&dma_pages)
        .map(|p| WORK_BASE + p * PAGE_SIZE)
        .collect();
    for gpa in &expected {
        assert!(
            dirty.contains(*gpa),
            "page {gpa:#x} written between the markers is missing"
        );
    }
    // Anything else must be the guest's own image, stacks and tables (below WORK_BASE).
    for gpa in dirty.iter() {
        assert!(
            expected.contains(&gpa) || (0x10_0000..WORK_BASE).contains(&gpa),
            "unexpected dirty page {gpa:#x}"
        );
    }
    let own: Vec<u64> = dirty.iter().filter(|g| !expected.contains(g)).collect();
    assert!(
        own.len() <= 8,
        "guest bookkeeping pages should be few: {own:x?}"
    );

    // The set is consumed: nothing is dirty until the guest runs again.
    assert!(vm.take_dirty_pages().expect("dirty pages").is_empty());
    let stop = vm.run(&RunLimits::default()).expect("run to the end");
    assert_eq!(stop, RunStop::PowerOff(0));
    let out = String::from_utf8_lossy(&console.contents()).to_string();
    assert!(
        out.contains("dirty: wrote 6 pages, filled 3 pages"),
        "console:\n{out}"
    );
}

#[test]
fn a_restored_vm_reports_only_new_writes() {
    if !kvm::kvm_available("dirty_after_restore") {
        return;
    }
    let (mut vm, _console) = boot("workload=dirty pages=7 dma=9");
    run_to_marker(&mut vm, 1);
    let dir = tempfile::tempdir().expect("tempdir");
    vm.save(dir.path()).expect("save");
    let mut restored = Vm::restore(
        dir.path(),
        Box::new(LiveWorld::new(SharedBuffer::default()).with_pacing(IdlePacing::Skip)),
    )
    .expect("restore");
    assert!(
        restored.take_dirty_pages().expect("dirty").is_empty(),
        "restore is the baseline"
    );
    run_to_marker(&mut restored, 2);
    let dirty = restored.take_dirty_pages().expect("dirty");
    assert!(dirty.contains(WORK_BASE + 7 * PAGE_SIZE));
    assert!(dirty.contains(WORK_BASE + 9 * PAGE_SIZE));
    // The original, which kept running after the save, and the copy end identically.
    assert_eq!(
        vm.run(&RunLimits::default()).expect("run"),
        RunStop::PowerOff(0)
    );
    assert_eq!(
        restored.run(&RunLimits::default()).expect("run"),
        RunStop::PowerOff(0)
    );
    assert_eq!(vm.exit_trace(), restored.exit_trace());
    assert_eq!(
        vm.memory_hash().expect("hash"),
        restored.memory_hash().expect("hash")
    );
}
