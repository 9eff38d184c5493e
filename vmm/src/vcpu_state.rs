//! Capture and restore of the whole KVM-side state of the VM: every piece of vCPU state
//! and the VM-level state in use (in-kernel PIC and IOAPIC, kvmclock).

use kvm_bindings::{
    kvm_clock_data, kvm_debugregs, kvm_fpu, kvm_irqchip, kvm_lapic_state, kvm_mp_state,
    kvm_msr_entry, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, CpuId, Msrs,
    KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
};
use kvm_ioctls::{Cap, Kvm, VcpuFd, VmFd};
use serde::{Deserialize, Serialize};

/// Errors of state capture and restore.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// A KVM ioctl failed.
    #[error("{what} failed: {source}")]
    Kvm {
        /// The ioctl.
        what: &'static str,
        /// Cause.
        source: kvm_ioctls::Error,
    },
    /// KVM accepted only part of an MSR list.
    #[error("KVM {op} only {done} of {total} MSRs (first refused: {first:#x})")]
    PartialMsrs {
        /// "read" or "wrote".
        op: &'static str,
        /// How many were accepted.
        done: usize,
        /// How many were asked.
        total: usize,
        /// The first MSR index refused.
        first: u32,
    },
    /// An MSR or CPUID list exceeds what KVM accepts.
    #[error("{0} list too long for KVM")]
    ListTooLong(&'static str),
    /// The snapshot needs a capability this host lacks.
    #[error("the snapshot holds {0} state, which this host's KVM does not support")]
    MissingCapability(&'static str),
}

fn kvm(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> StateError {
    move |source| StateError::Kvm { what, source }
}

/// Everything KVM holds for one vCPU.
#[derive(Serialize, Deserialize)]
pub struct VcpuState {
    /// CPUID table given to the vCPU.
    pub cpuid: CpuId,
    /// General registers.
    pub regs: kvm_regs,
    /// Segment, control and descriptor-table registers.
    pub sregs: kvm_sregs,
    /// Legacy FPU/SSE state (used when XSAVE is unavailable).
    pub fpu: FpuState,
    /// Extended state, when KVM supports KVM_GET_XSAVE.
    pub xsave: Option<kvm_xsave>,
    /// Extended control registers, when KVM supports them.
    pub xcrs: Option<kvm_xcrs>,
    /// Every saveable MSR.
    pub msrs: Msrs,
    /// Local APIC registers.
    pub lapic: kvm_lapic_state,
    /// Multiprocessing state.
    pub mp_state: kvm_mp_state,
    /// Pending exceptions, interrupts, NMIs and interrupt shadow.
    pub events: kvm_vcpu_events,
    /// Debug registers.
    pub debugregs: kvm_debugregs,
}

/// The legacy FPU/SSE image (`kvm_fpu`, which has no serde support of its own).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct FpuState {
    fpr: [[u8; 16]; 8],
    fcw: u16,
    fsw: u16,
    ftwx: u8,
    last_opcode: u16,
    last_ip: u64,
    last_dp: u64,
    xmm: [[u8; 16]; 16],
    mxcsr: u32,
}

impl From<&kvm_fpu> for FpuState {
    fn from(f: &kvm_fpu) -> Self {
        Self {
            fpr: f.fpr,
            fcw: f.fcw,
            fsw: f.fsw,
            ftwx: f.ftwx,
            last_opcode: f.last_opcode,
            last_ip: f.last_ip,
            last_dp: f.last_dp,
            xmm: f.xmm,
            mxcsr: f.mxcsr,
        }
    }
}

impl From<&FpuState> for kvm_fpu {
    fn from(f: &FpuState) -> Self {
        kvm_fpu {
            fpr: f.fpr,
            fcw: f.fcw,
            fsw: f.fsw,
            ftwx: f.ftwx,
            last_opcode: f.last_opcode,
            last_ip: f.last_ip,
            last_dp: f.last_dp,
            xmm: f.xmm,
            mxcsr: f.mxcsr,
            ..Default::default()
        }
    }
}

/// VM-level KVM state.
#[derive(Clone, Serialize, Deserialize)]
pub struct VmLevelState {
    /// Master PIC.
    pub pic_master: kvm_irqchip,
    /// Slave PIC.
    pub pic_slave: kvm_irqchip,
    /// IOAPIC.
    pub ioapic: kvm_irqchip,
    /// kvmclock.
    pub clock: kvm_clock_data,
}

/// Which optional pieces this host's KVM can save, and the MSRs it can round-trip.
#[derive(Debug, Clone)]
pub struct StateCaps {
    /// KVM_GET/SET_XSAVE.
    pub xsave: bool,
    /// KVM_GET/SET_XCRS.
    pub xcrs: bool,
    /// MSR indices that KVM reads and writes back.
    pub msr_indices: Vec<u32>,
}

impl StateCaps {
    /// Probes `kvm` and `vcpu`: optional state and the MSRs of KVM_GET_MSR_INDEX_LIST
    /// that can actually be read (some listed MSRs depend on CPUID).
    pub fn probe(kvm: &Kvm, vcpu: &VcpuFd) -> Result<Self, StateError> {
        let mut indices: Vec<u32> = kvm
            .get_msr_index_list()
            .map_err(kvm_err("KVM_GET_MSR_INDEX_LIST"))?
            .as_slice()
            .to_vec();
        loop {
            let mut msrs = msr_list(&indices)?;
            let n = vcpu.get_msrs(&mut msrs).map_err(kvm_err("KVM_GET_MSRS"))?;
            if n >= indices.len() {
                break;
            }
            tracing::debug!("MSR {:#x} cannot be read; not saved", indices[n]);
            indices.remove(n);
        }
        Ok(Self {
            xsave: kvm.check_extension(Cap::Xsave),
            xcrs: kvm.check_extension(Cap::Xcrs),
            msr_indices: indices,
        })
    }
}

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> StateError {
    kvm(what)
}

fn msr_list(indices: &[u32]) -> Result<Msrs, StateError> {
    let entries: Vec<kvm_msr_entry> = indices
        .iter()
        .map(|&index| kvm_msr_entry {
            index,
            ..Default::default()
        })
        .collect();
    Msrs::from_entries(&entries).map_err(|_| StateError::ListTooLong("MSR"))
}

/// Reads every piece of vCPU state. The vCPU must be out of KVM_RUN with no I/O
/// half-done (the caller completes pending I/O first).
pub fn capture_vcpu(
    vcpu: &VcpuFd,
    caps: &StateCaps,
    cpuid: &CpuId,
) -> Result<VcpuState, StateError> {
    let mut msrs = msr_list(&caps.msr_indices)?;
    let n = vcpu.get_msrs(&mut msrs).map_err(kvm("KVM_GET_MSRS"))?;
    if n < caps.msr_indices.len() {
        return Err(StateError::PartialMsrs {
            op: "read",
            done: n,
            total: caps.msr_indices.len(),
            first: caps.msr_indices[n],
        });
    }
    Ok(VcpuState {
        cpuid: cpuid.clone(),
        regs: vcpu.get_regs().map_err(kvm("KVM_GET_REGS"))?,
        sregs: vcpu.get_sregs().map_err(kvm("KVM_GET_SREGS"))?,
        fpu: FpuState::from(&vcpu.get_fpu().map_err(kvm("KVM_GET_FPU"))?),
        xsave: caps
            .xsave
            .then(|| vcpu.get_xsave().map_err(kvm("KVM_GET_XSAVE")))
            .transpose()?,
        xcrs: caps
            .xcrs
            .then(|| vcpu.get_xcrs().map_err(kvm("KVM_GET_XCRS")))
            .transpose()?,
        msrs,
        lapic: vcpu.get_lapic().map_err(kvm("KVM_GET_LAPIC"))?,
        mp_state: vcpu.get_mp_state().map_err(kvm("KVM_GET_MP_STATE"))?,
        events: vcpu.get_vcpu_events().map_err(kvm("KVM_GET_VCPU_EVENTS"))?,
        debugregs: vcpu.get_debug_regs().map_err(kvm("KVM_GET_DEBUGREGS"))?,
    })
}

/// Writes vCPU state back, in the order KVM requires:
/// 1. CPUID first: KVM validates MSRs, XSAVE layout and XCRs against it.
/// 2. MP state, then general registers, then special registers (which also set EFER,
///    CR0/CR4 and the APIC base).
/// 3. FPU, then XSAVE (a superset that overrides the FPU image), then XCRs.
/// 4. Debug registers.
/// 5. LAPIC after SREGS: SREGS carries the APIC base the LAPIC state is relative to.
/// 6. MSRs after the LAPIC: MSR_IA32_TSC_DEADLINE is only accepted with a LAPIC in place.
/// 7. vCPU events last: setting registers can clear pending exceptions and the
///    interrupt shadow, which the events restore.
pub fn restore_vcpu(vcpu: &VcpuFd, state: &VcpuState) -> Result<(), StateError> {
    vcpu.set_cpuid2(&state.cpuid)
        .map_err(kvm("KVM_SET_CPUID2"))?;
    vcpu.set_mp_state(state.mp_state)
        .map_err(kvm("KVM_SET_MP_STATE"))?;
    vcpu.set_regs(&state.regs).map_err(kvm("KVM_SET_REGS"))?;
    vcpu.set_sregs(&state.sregs).map_err(kvm("KVM_SET_SREGS"))?;
    vcpu.set_fpu(&kvm_fpu::from(&state.fpu))
        .map_err(kvm("KVM_SET_FPU"))?;
    if let Some(xsave) = &state.xsave {
        // SAFETY: the buffer is a `kvm_xsave` read by KVM_GET_XSAVE on a vCPU with the
        // same CPUID (restored above), so its size matches what KVM expects here.
        unsafe { vcpu.set_xsave(xsave) }.map_err(kvm("KVM_SET_XSAVE"))?;
    }
    if let Some(xcrs) = &state.xcrs {
        vcpu.set_xcrs(xcrs).map_err(kvm("KVM_SET_XCRS"))?;
    }
    vcpu.set_debug_regs(&state.debugregs)
        .map_err(kvm("KVM_SET_DEBUGREGS"))?;
    vcpu.set_lapic(&state.lapic).map_err(kvm("KVM_SET_LAPIC"))?;
    let n = vcpu.set_msrs(&state.msrs).map_err(kvm("KVM_SET_MSRS"))?;
    let total = state.msrs.as_slice().len();
    if n < total {
        return Err(StateError::PartialMsrs {
            op: "wrote",
            done: n,
            total,
            first: state.msrs.as_slice()[n].index,
        });
    }
    vcpu.set_vcpu_events(&state.events)
        .map_err(kvm("KVM_SET_VCPU_EVENTS"))
}

fn irqchip(vm: &VmFd, chip_id: u32) -> Result<kvm_irqchip, StateError> {
    let mut chip = kvm_irqchip {
        chip_id,
        ..Default::default()
    };
    vm.get_irqchip(&mut chip).map_err(kvm("KVM_GET_IRQCHIP"))?;
    Ok(chip)
}

/// Reads the VM-level state: both PICs, the IOAPIC and kvmclock.
pub fn capture_vm(vm: &VmFd) -> Result<VmLevelState, StateError> {
    Ok(VmLevelState {
        pic_master: irqchip(vm, KVM_IRQCHIP_PIC_MASTER)?,
        pic_slave: irqchip(vm, KVM_IRQCHIP_PIC_SLAVE)?,
        ioapic: irqchip(vm, KVM_IRQCHIP_IOAPIC)?,
        clock: vm.get_clock().map_err(kvm("KVM_GET_CLOCK"))?,
    })
}

/// Writes the VM-level state back. The irqchip must exist (created before the vCPU).
/// KVM_SET_CLOCK accepts only the clock value, so the flags KVM_GET_CLOCK reports
/// (TSC_STABLE, REALTIME, HOST_TSC) are cleared.
pub fn restore_vm(vm: &VmFd, state: &VmLevelState) -> Result<(), StateError> {
    for chip in [&state.pic_master, &state.pic_slave, &state.ioapic] {
        vm.set_irqchip(chip).map_err(kvm("KVM_SET_IRQCHIP"))?;
    }
    let clock = kvm_clock_data {
        clock: state.clock.clock,
        ..Default::default()
    };
    vm.set_clock(&clock).map_err(kvm("KVM_SET_CLOCK"))
}
