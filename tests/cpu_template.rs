//! CPU templates against a real VM: the guest's CPUID is the template's and travels in
//! its state, and a standby (a secondary's VM) on a host that cannot offer it refuses the
//! state, naming what is missing.

#[path = "common/kvm.rs"]
mod kvm;

use ftvm_devices::world::live::IdlePacing;
use ftvm_devices::world::{LiveWorld, SharedBuffer};
use ftvm_guest_images::TEST_GUEST_ELF;
use ftvm_vmm::cpu_template::{self, CpuTemplate, TemplateError};
use ftvm_vmm::snapshot;
use ftvm_vmm::{RunLimits, Standby, Vm, VmConfig, VmError};

fn boot(template: CpuTemplate) -> Result<Vm, VmError> {
    let config = VmConfig {
        cpu_template: template,
        mem_mib: 64,
        kernel: TEST_GUEST_ELF.to_vec(),
        cmdline: "workload=counter pages=8 steps=2 tick_ms=1".into(),
        initrd: None,
        entropy_seed: 0,
        devices: Vec::new(),
        attachments: Default::default(),
    };
    let world = LiveWorld::new(SharedBuffer::default()).with_pacing(IdlePacing::Skip);
    Vm::boot(&config, Box::new(world))
}

fn supported() -> kvm_bindings::CpuId {
    kvm_ioctls::Kvm::new()
        .expect("/dev/kvm")
        .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
        .expect("KVM_GET_SUPPORTED_CPUID")
}

#[test]
fn the_guest_state_carries_the_templates_cpuid_and_a_host_lacking_it_refuses_it() {
    if !kvm::kvm_available("cpu_template") {
        return;
    }
    let template = CpuTemplate::EmulatedKernel;
    let mut vm = match boot(template) {
        Ok(vm) => vm,
        Err(VmError::CpuTemplate(e @ TemplateError::HostLacks { .. })) => {
            // A host may lack even this template; then its refusal is the behaviour.
            eprintln!("this host cannot offer {template}: {e}");
            return;
        }
        Err(e) => panic!("boot: {e}"),
    };
    vm.run(&RunLimits {
        max_exits: Some(50),
        ..Default::default()
    })
    .expect("run");
    let bytes = vm.capture_state().expect("state");
    let state = snapshot::decode_state(&bytes, "test").expect("decodes");
    let expected = cpu_template::build(template, &supported()).expect("offered");
    assert_eq!(
        cpu_template::offered(&state.vcpu.cpuid),
        cpu_template::offered(&expected),
        "the state carries the template's CPUID"
    );

    // A standby here accepts it.
    let mut standby = Standby::new(64).expect("standby");
    standby
        .set_state(&bytes)
        .expect("this host offers the template");

    // The same state claiming a feature this host's KVM lacks is refused by name.
    let host = cpu_template::offered(&supported());
    let (leaf, bit, name) = [(7u32, 16u32, "avx512f"), (7, 5, "avx2"), (1, 28, "avx")]
        .into_iter()
        .find(|(_, _, name)| !host.contains(name))
        .expect("this host lacks one of avx512f, avx2, avx");
    let mut foreign = snapshot::decode_state(&bytes, "test").expect("decodes");
    for e in foreign.vcpu.cpuid.as_mut_slice() {
        if e.function == leaf && e.index == 0 {
            if leaf == 7 {
                e.ebx |= 1 << bit;
            } else {
                e.ecx |= 1 << bit;
            }
        }
    }
    let foreign = snapshot::encode_state(&foreign).expect("encodes");
    let mut standby = Standby::new(64).expect("standby");
    let err = standby.set_state(&foreign).expect_err("refused");
    assert!(
        matches!(err, VmError::CpuTemplate(TemplateError::CannotRestore { ref missing }) if missing == &vec![name.to_string()]),
        "{err}"
    );
    assert!(err.to_string().contains(name), "{err}");
}
