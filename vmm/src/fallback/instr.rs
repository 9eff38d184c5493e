//! The instructions the fallback emulates, as pure functions of the vCPU's registers and
//! guest memory. Each follows the instruction's definition in the Intel SDM and AMD APM
//! exactly, exceptions included (a fault leaves RIP on the instruction, a trap after it),
//! and is checked against the host CPU's own execution in `tests.rs`.

use ftvm_devices::GuestMem;
use iced_x86::{Code, Instruction, OpKind, Register};
use kvm_bindings::{kvm_regs, kvm_sregs};

use super::paging::{Access, Paging, WalkError};

const RFLAGS_CF: u64 = 1 << 0;
const RFLAGS_PF: u64 = 1 << 2;
const RFLAGS_AF: u64 = 1 << 4;
const RFLAGS_ZF: u64 = 1 << 6;
const RFLAGS_SF: u64 = 1 << 7;
const RFLAGS_OF: u64 = 1 << 11;
/// RFLAGS.AC.
pub const RFLAGS_AC: u64 = 1 << 18;
const CR0_MP: u64 = 1 << 1;
const CR0_EM: u64 = 1 << 2;
const CR0_TS: u64 = 1 << 3;
const CR0_NE: u64 = 1 << 5;
const CR4_OSFXSR: u64 = 1 << 9;
/// x87 status word: an unmasked exception is pending.
const FSW_ES: u16 = 1 << 7;
/// The MXCSR bits a CPU with DAZ accepts (MXCSR_MASK 0xffff); the rest are reserved.
const MXCSR_MASK: u32 = 0xffff;

/// Exception vectors.
pub mod vector {
    /// #UD.
    pub const UD: u8 = 6;
    /// #NM.
    pub const NM: u8 = 7;
    /// #BP.
    pub const BP: u8 = 3;
    /// #SS.
    pub const SS: u8 = 12;
    /// #GP.
    pub const GP: u8 = 13;
    /// #PF.
    pub const PF: u8 = 14;
    /// #MF.
    pub const MF: u8 = 16;
}

/// The vCPU state an instruction reads and writes.
#[derive(Debug, Clone)]
pub struct Cpu {
    /// General registers, RIP and RFLAGS.
    pub regs: kvm_regs,
    /// Control, segment and descriptor-table registers.
    pub sregs: kvm_sregs,
    /// The x87 status word.
    pub fsw: u16,
    /// MXCSR.
    pub mxcsr: u32,
    /// Whether the guest's CPUID offers SMAP (CLAC and STAC are #UD without it).
    pub smap: bool,
}

impl Cpu {
    /// The current privilege level (SS.DPL, as KVM reports it).
    pub fn cpl(&self) -> u8 {
        self.sregs.ss.dpl
    }

    /// The paging state for guest memory accesses.
    pub fn paging(&self) -> Paging {
        Paging {
            cr0: self.sregs.cr0,
            cr3: self.sregs.cr3,
            cr4: self.sregs.cr4,
            efer: self.sregs.efer,
            cpl: self.cpl(),
            rflags: self.regs.rflags,
        }
    }
}

/// An exception an instruction raises, ready to deliver.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exception {
    /// The vector.
    pub vector: u8,
    /// The error code pushed with it, for the vectors that have one.
    pub error_code: Option<u32>,
    /// The RIP pushed: the instruction's own for a fault, the next one for a trap.
    pub return_rip: u64,
    /// The faulting address for a #PF (CR2).
    pub cr2: Option<u64>,
}

/// What executing an instruction did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Effect {
    /// It completed: the state holds its results and RIP points after it.
    Completed,
    /// It raised an exception; the state is as before it, and the exception must be
    /// delivered.
    Raised(Exception),
}

/// Why an instruction was not executed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// The fallback does not emulate this instruction.
    #[error("not emulated by the fallback")]
    NotEmulated,
    /// A memory operand lies outside guest RAM.
    #[error("its memory operand at guest-physical {gpa:#x} is not RAM")]
    OperandNotRam {
        /// The guest-physical address.
        gpa: u64,
    },
    /// An x87 exception is pending with CR0.NE clear (reported on the FERR# pin, which
    /// this machine does not wire).
    #[error("an x87 exception is pending with CR0.NE clear (legacy FERR# reporting)")]
    LegacyFpuError,
}

impl Exception {
    fn fault(vector: u8, error_code: Option<u32>, insn: &Instruction) -> Self {
        Self {
            vector,
            error_code,
            return_rip: insn.ip(),
            cr2: None,
        }
    }
}

/// Executes `insn` (decoded at `cpu.regs.rip`) on `cpu` and `mem`.
pub fn execute(cpu: &mut Cpu, mem: &GuestMem, insn: &Instruction) -> Result<Effect, Refusal> {
    let raised =
        |vector, error_code| Ok(Effect::Raised(Exception::fault(vector, error_code, insn)));
    if insn.has_lock_prefix() {
        return raised(vector::UD, None);
    }
    let cr0 = cpu.sregs.cr0;
    match insn.code() {
        Code::Int3 => Ok(Effect::Raised(Exception {
            vector: vector::BP,
            error_code: None,
            return_rip: insn.next_ip(),
            cr2: None,
        })),
        Code::Wait => {
            if cr0 & CR0_TS != 0 && cr0 & CR0_MP != 0 {
                return raised(vector::NM, None);
            }
            if cpu.fsw & FSW_ES != 0 {
                if cr0 & CR0_NE == 0 {
                    return Err(Refusal::LegacyFpuError);
                }
                return raised(vector::MF, None);
            }
            complete(cpu, insn)
        }
        Code::Popcnt_r16_rm16 | Code::Popcnt_r32_rm32 | Code::Popcnt_r64_rm64 => {
            let size = insn.op0_register().size();
            let source = match read_operand(cpu, mem, insn, 1, size) {
                Ok(v) => v,
                Err(OperandError::Raise(e)) => return Ok(Effect::Raised(e)),
                Err(OperandError::Refused(r)) => return Err(r),
            };
            let count = u64::from(source.count_ones());
            write_gpr(&mut cpu.regs, insn.op0_register(), count);
            let flags = &mut cpu.regs.rflags;
            *flags &= !(RFLAGS_CF | RFLAGS_PF | RFLAGS_AF | RFLAGS_ZF | RFLAGS_SF | RFLAGS_OF);
            if source == 0 {
                *flags |= RFLAGS_ZF;
            }
            complete(cpu, insn)
        }
        Code::Clac | Code::Stac => {
            if !cpu.smap || cpu.cpl() != 0 {
                return raised(vector::UD, None);
            }
            if insn.code() == Code::Clac {
                cpu.regs.rflags &= !RFLAGS_AC;
            } else {
                cpu.regs.rflags |= RFLAGS_AC;
            }
            complete(cpu, insn)
        }
        Code::Ldmxcsr_m32 | Code::Stmxcsr_m32 => {
            if cr0 & CR0_EM != 0 || cpu.sregs.cr4 & CR4_OSFXSR == 0 {
                return raised(vector::UD, None);
            }
            if cr0 & CR0_TS != 0 {
                return raised(vector::NM, None);
            }
            if insn.code() == Code::Ldmxcsr_m32 {
                let value = match read_operand(cpu, mem, insn, 0, 4) {
                    Ok(v) => v as u32,
                    Err(OperandError::Raise(e)) => return Ok(Effect::Raised(e)),
                    Err(OperandError::Refused(r)) => return Err(r),
                };
                if value & !MXCSR_MASK != 0 {
                    return raised(vector::GP, Some(0));
                }
                cpu.mxcsr = value;
            } else {
                let bytes = cpu.mxcsr.to_le_bytes();
                match write_memory(cpu, mem, insn, 0, &bytes) {
                    Ok(()) => {}
                    Err(OperandError::Raise(e)) => return Ok(Effect::Raised(e)),
                    Err(OperandError::Refused(r)) => return Err(r),
                }
            }
            complete(cpu, insn)
        }
        _ => Err(Refusal::NotEmulated),
    }
}

fn complete(cpu: &mut Cpu, insn: &Instruction) -> Result<Effect, Refusal> {
    cpu.regs.rip = insn.next_ip();
    Ok(Effect::Completed)
}

enum OperandError {
    Raise(Exception),
    Refused(Refusal),
}

/// The value of operand `op` (`size` bytes, zero-extended).
fn read_operand(
    cpu: &Cpu,
    mem: &GuestMem,
    insn: &Instruction,
    op: u32,
    size: usize,
) -> Result<u64, OperandError> {
    match insn.op_kind(op) {
        OpKind::Register => Ok(read_gpr(&cpu.regs, insn.op_register(op))),
        OpKind::Memory => {
            let la = linear_address(cpu, insn, op);
            let mut buf = [0u8; 8];
            cpu.paging()
                .read(mem, la, &mut buf[..size], Access::Read, false)
                .map_err(|e| walk_error(e, insn))?;
            Ok(u64::from_le_bytes(buf))
        }
        _ => Err(OperandError::Refused(Refusal::NotEmulated)),
    }
}

fn write_memory(
    cpu: &Cpu,
    mem: &GuestMem,
    insn: &Instruction,
    op: u32,
    bytes: &[u8],
) -> Result<(), OperandError> {
    if insn.op_kind(op) != OpKind::Memory {
        return Err(OperandError::Refused(Refusal::NotEmulated));
    }
    let la = linear_address(cpu, insn, op);
    cpu.paging()
        .write(mem, la, bytes, false)
        .map_err(|e| walk_error(e, insn))
}

/// The linear address of memory operand `op` (segment bases apply only to FS and GS in
/// 64-bit mode).
fn linear_address(cpu: &Cpu, insn: &Instruction, op: u32) -> u64 {
    let regs = &cpu.regs;
    let sregs = &cpu.sregs;
    insn.virtual_address(op, 0, |reg, _, _| {
        Some(match reg {
            Register::FS => sregs.fs.base,
            Register::GS => sregs.gs.base,
            Register::ES | Register::CS | Register::SS | Register::DS => 0,
            r => read_gpr(regs, r),
        })
    })
    .unwrap_or(0)
}

fn walk_error(e: WalkError, insn: &Instruction) -> OperandError {
    match e {
        WalkError::PageFault {
            error_code,
            address,
        } => OperandError::Raise(Exception {
            cr2: Some(address),
            ..Exception::fault(vector::PF, Some(error_code), insn)
        }),
        WalkError::NonCanonical { .. } => {
            let stack = matches!(insn.memory_base(), Register::RSP | Register::RBP);
            let v = if stack { vector::SS } else { vector::GP };
            OperandError::Raise(Exception::fault(v, Some(0), insn))
        }
        WalkError::NotRam { gpa } => OperandError::Refused(Refusal::OperandNotRam { gpa }),
    }
}

fn gpr_slot(regs: &mut kvm_regs, full: Register) -> Option<&mut u64> {
    Some(match full {
        Register::RAX => &mut regs.rax,
        Register::RBX => &mut regs.rbx,
        Register::RCX => &mut regs.rcx,
        Register::RDX => &mut regs.rdx,
        Register::RSI => &mut regs.rsi,
        Register::RDI => &mut regs.rdi,
        Register::RSP => &mut regs.rsp,
        Register::RBP => &mut regs.rbp,
        Register::R8 => &mut regs.r8,
        Register::R9 => &mut regs.r9,
        Register::R10 => &mut regs.r10,
        Register::R11 => &mut regs.r11,
        Register::R12 => &mut regs.r12,
        Register::R13 => &mut regs.r13,
        Register::R14 => &mut regs.r14,
        Register::R15 => &mut regs.r15,
        _ => return None,
    })
}

fn is_high_byte(reg: Register) -> bool {
    matches!(
        reg,
        Register::AH | Register::BH | Register::CH | Register::DH
    )
}

/// The value of a general register of any size (zero-extended).
pub fn read_gpr(regs: &kvm_regs, reg: Register) -> u64 {
    let mut copy = *regs;
    let full = gpr_slot(&mut copy, reg.full_register()).map_or(0, |v| *v);
    if is_high_byte(reg) {
        return (full >> 8) & 0xff;
    }
    match reg.size() {
        1 => full & 0xff,
        2 => full & 0xffff,
        4 => full & 0xffff_ffff,
        _ => full,
    }
}

/// Writes a general register as an instruction does: a 32-bit write zero-extends, an 8-
/// or 16-bit write keeps the other bits.
pub fn write_gpr(regs: &mut kvm_regs, reg: Register, value: u64) {
    let size = reg.size();
    let high = is_high_byte(reg);
    let Some(slot) = gpr_slot(regs, reg.full_register()) else {
        return;
    };
    *slot = match (size, high) {
        (1, true) => (*slot & !0xff00) | ((value & 0xff) << 8),
        (1, false) => (*slot & !0xff) | (value & 0xff),
        (2, _) => (*slot & !0xffff) | (value & 0xffff),
        (4, _) => value & 0xffff_ffff,
        _ => value,
    };
}
