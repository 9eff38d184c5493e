//! The fallback for instructions the host's KVM fails to emulate in guest kernel mode.
//!
//! Some KVM hosts emulate guest kernel code instead of running it (a nested, page-table
//! based hypervisor does; see HOST.md), and their emulator lacks instructions Linux uses.
//! KVM then returns `KVM_EXIT_INTERNAL_ERROR` (emulation failure) with RIP on the
//! instruction. The VMM fetches the instruction through the guest's page tables,
//! decodes it with `iced-x86`, and executes the ones [`instr`] supports exactly, an
//! exception they raise included ([`deliver`]); anything else stops the VM with one line
//! naming the instruction's bytes, mnemonic and RIP. On a host whose KVM runs or
//! emulates these instructions itself the path is never taken.
//!
//! A fallback is a VM exit like any other: deterministic (the same instruction at the
//! same exit on every run) and recorded in the exit trace.

pub mod deliver;
pub mod instr;
pub mod paging;
#[cfg(test)]
mod tests;

use std::collections::BTreeMap;

use ftvm_devices::GuestMem;
use iced_x86::{Decoder, DecoderOptions, Formatter, Instruction, IntelFormatter, Mnemonic};
use kvm_bindings::{kvm_fpu, kvm_regs, kvm_sregs, kvm_xsave};
use kvm_ioctls::VcpuFd;

use self::deliver::DeliveryError;
use self::instr::{Cpu, Effect, Refusal};
use self::paging::{Access, WalkError};

/// The longest x86 instruction.
const MAX_INSN: usize = 15;
const EFER_LMA: u64 = 1 << 10;

/// Why the fallback could not continue the guest.
#[derive(Debug, thiserror::Error)]
pub enum FallbackError {
    /// A vCPU ioctl failed.
    #[error("{what} failed during the instruction fallback: {source}")]
    Kvm {
        /// The ioctl.
        what: &'static str,
        /// Cause.
        source: kvm_ioctls::Error,
    },
    /// The vCPU is not in 64-bit mode.
    #[error("KVM could not emulate an instruction at rip {rip:#x}, outside 64-bit mode (the fallback handles 64-bit code only)")]
    NotLongMode {
        /// RIP.
        rip: u64,
    },
    /// The instruction could not be fetched.
    #[error(
        "KVM could not emulate the instruction at rip {rip:#x}, and fetching it failed: {cause:?}"
    )]
    Fetch {
        /// RIP.
        rip: u64,
        /// The failure.
        cause: WalkError,
    },
    /// The bytes at RIP are no valid instruction.
    #[error("KVM could not emulate the instruction at rip {rip:#x} (bytes {bytes}), which does not decode")]
    Undecodable {
        /// RIP.
        rip: u64,
        /// The bytes fetched, in hex.
        bytes: String,
    },
    /// The fallback does not execute this instruction.
    #[error("KVM could not emulate `{text}` at rip {rip:#x} (bytes {bytes}) in guest kernel mode, and ftvm's fallback does not either: {why}")]
    Unsupported {
        /// RIP.
        rip: u64,
        /// The instruction's bytes, in hex.
        bytes: String,
        /// The instruction in Intel syntax.
        text: String,
        /// Why.
        why: Refusal,
    },
    /// The exception the instruction raised could not be delivered.
    #[error("`{text}` at rip {rip:#x} raised vector {vector}, which the fallback could not deliver: {cause}")]
    Delivery {
        /// RIP.
        rip: u64,
        /// The instruction in Intel syntax.
        text: String,
        /// The vector.
        vector: u8,
        /// Why.
        cause: DeliveryError,
    },
}

fn kvm(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> FallbackError {
    move |source| FallbackError::Kvm { what, source }
}

/// One instruction the fallback executed.
#[derive(Debug, Clone, Copy)]
pub struct Executed {
    /// Its RIP.
    pub rip: u64,
    /// Its mnemonic.
    pub mnemonic: Mnemonic,
    /// Its first bytes (for the exit trace), little-endian, zero-padded.
    pub head: [u8; 8],
    /// RIP after it (the handler's first instruction if it raised an exception).
    pub next_rip: u64,
}

/// Instructions executed by the fallback since the VM was created, per mnemonic.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FallbackCounts {
    counts: BTreeMap<String, u64>,
}

impl FallbackCounts {
    /// Counts one instruction.
    pub fn note(&mut self, mnemonic: Mnemonic) {
        *self
            .counts
            .entry(format!("{mnemonic:?}").to_lowercase())
            .or_default() += 1;
    }

    /// All instructions executed.
    pub fn total(&self) -> u64 {
        self.counts.values().sum()
    }

    /// Per mnemonic (lower case), in name order.
    pub fn by_mnemonic(&self) -> impl Iterator<Item = (&str, u64)> {
        self.counts.iter().map(|(k, v)| (k.as_str(), *v))
    }
}

impl std::fmt::Display for FallbackCounts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.total())?;
        if self.total() > 0 {
            let parts: Vec<String> = self
                .by_mnemonic()
                .map(|(m, n)| format!("{m} {n}"))
                .collect();
            write!(f, " ({})", parts.join(", "))?;
        }
        Ok(())
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(" ")
}

fn intel(insn: &Instruction) -> String {
    let mut text = String::new();
    IntelFormatter::new().format(insn, &mut text);
    text
}

/// The instruction at the CPU's RIP: fetched (as much of [`MAX_INSN`] bytes as is
/// mapped) and decoded.
fn fetch(cpu: &Cpu, mem: &GuestMem) -> Result<(Instruction, Vec<u8>), FallbackError> {
    let rip = cpu.regs.rip;
    let linear = cpu.sregs.cs.base.wrapping_add(rip);
    let paging = cpu.paging();
    let mut bytes = vec![0u8; MAX_INSN];
    if paging
        .read(mem, linear, &mut bytes, Access::Fetch, false)
        .is_err()
    {
        // The instruction may end on its page with the next one unmapped.
        let first = 4096 - (linear & 0xfff) as usize;
        bytes.truncate(first.min(MAX_INSN));
        paging
            .read(mem, linear, &mut bytes, Access::Fetch, false)
            .map_err(|cause| FallbackError::Fetch { rip, cause })?;
    }
    let mut decoder = Decoder::with_ip(64, &bytes, rip, DecoderOptions::NONE);
    let insn = decoder.decode();
    if insn.is_invalid() {
        return Err(FallbackError::Undecodable {
            rip,
            bytes: hex(&bytes),
        });
    }
    bytes.truncate(insn.len());
    Ok((insn, bytes))
}

/// Executes the instruction at `cpu`'s RIP on `cpu` and `mem`: the pure core of
/// [`execute_at_rip`], which reads and writes the vCPU around it.
pub fn step(cpu: &mut Cpu, mem: &GuestMem) -> Result<Executed, FallbackError> {
    let rip = cpu.regs.rip;
    if cpu.sregs.efer & EFER_LMA == 0 || cpu.sregs.cs.l == 0 {
        return Err(FallbackError::NotLongMode { rip });
    }
    let (insn, bytes) = fetch(cpu, mem)?;
    let mut head = [0u8; 8];
    let n = bytes.len().min(8);
    head[..n].copy_from_slice(&bytes[..n]);
    let effect = instr::execute(cpu, mem, &insn).map_err(|why| FallbackError::Unsupported {
        rip,
        bytes: hex(&bytes),
        text: intel(&insn),
        why,
    })?;
    if let Effect::Raised(ex) = effect {
        deliver::deliver(cpu, mem, &ex).map_err(|cause| FallbackError::Delivery {
            rip,
            text: intel(&insn),
            vector: ex.vector,
            cause,
        })?;
    }
    Ok(Executed {
        rip,
        mnemonic: insn.mnemonic(),
        head,
        next_rip: cpu.regs.rip,
    })
}

/// Where the vCPU's x87 status word and MXCSR are read and written: the XSAVE image
/// when KVM offers it (some hosts' KVM_GET_FPU reports MXCSR as 0), else `kvm_fpu`.
enum FpuImage {
    Xsave(Box<kvm_xsave>),
    Legacy(Box<kvm_fpu>),
}

/// 32-bit words of the XSAVE legacy area: FCW and FSW share word 0; MXCSR is word 6.
const XSAVE_FSW_WORD: usize = 0;
const XSAVE_MXCSR_WORD: usize = 6;

impl FpuImage {
    fn read(vcpu: &VcpuFd, xsave: bool) -> Result<Self, FallbackError> {
        Ok(if xsave {
            Self::Xsave(Box::new(vcpu.get_xsave().map_err(kvm("KVM_GET_XSAVE"))?))
        } else {
            Self::Legacy(Box::new(vcpu.get_fpu().map_err(kvm("KVM_GET_FPU"))?))
        })
    }

    fn fsw(&self) -> u16 {
        match self {
            Self::Xsave(x) => (x.region[XSAVE_FSW_WORD] >> 16) as u16,
            Self::Legacy(f) => f.fsw,
        }
    }

    fn mxcsr(&self) -> u32 {
        match self {
            Self::Xsave(x) => x.region[XSAVE_MXCSR_WORD],
            Self::Legacy(f) => f.mxcsr,
        }
    }

    fn write_mxcsr(mut self, vcpu: &VcpuFd, mxcsr: u32) -> Result<(), FallbackError> {
        match &mut self {
            Self::Xsave(x) => {
                x.region[XSAVE_MXCSR_WORD] = mxcsr;
                // SAFETY: the buffer is the `kvm_xsave` KVM_GET_XSAVE just filled for
                // this vCPU, with one word changed.
                unsafe { vcpu.set_xsave(x) }.map_err(kvm("KVM_SET_XSAVE"))
            }
            Self::Legacy(f) => {
                f.mxcsr = mxcsr;
                vcpu.set_fpu(f).map_err(kvm("KVM_SET_FPU"))
            }
        }
    }
}

/// Executes the instruction KVM failed to emulate at the vCPU's RIP, and puts the
/// results back into the vCPU. `smap`: whether the guest's CPUID offers SMAP; `xsave`:
/// whether KVM offers KVM_GET_XSAVE.
pub fn execute_at_rip(
    vcpu: &VcpuFd,
    mem: &GuestMem,
    smap: bool,
    xsave: bool,
) -> Result<(Executed, kvm_regs), FallbackError> {
    let regs = vcpu.get_regs().map_err(kvm("KVM_GET_REGS"))?;
    let sregs: kvm_sregs = vcpu.get_sregs().map_err(kvm("KVM_GET_SREGS"))?;
    let fpu = FpuImage::read(vcpu, xsave)?;
    let mut cpu = Cpu {
        regs,
        sregs,
        fsw: fpu.fsw(),
        mxcsr: fpu.mxcsr(),
        smap,
    };
    let done = step(&mut cpu, mem)?;
    if cpu.mxcsr != fpu.mxcsr() {
        fpu.write_mxcsr(vcpu, cpu.mxcsr)?;
    }
    if cpu.sregs.cs != sregs.cs || cpu.sregs.cr2 != sregs.cr2 {
        vcpu.set_sregs(&cpu.sregs).map_err(kvm("KVM_SET_SREGS"))?;
    }
    vcpu.set_regs(&cpu.regs).map_err(kvm("KVM_SET_REGS"))?;
    tracing::trace!(rip = format_args!("{:#x}", done.rip), mnemonic = ?done.mnemonic, "instruction fallback");
    Ok((done, cpu.regs))
}
