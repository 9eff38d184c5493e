//! Delivery of an exception the fallback raised, as the CPU delivers one in 64-bit mode
//! from CPL0 to a CPL0 handler: the IDT gate, the interrupt stack table, the 16-byte
//! aligned frame (SS, RSP, RFLAGS, CS, RIP and the error code), the new CS loaded from
//! the GDT, and RFLAGS cleared as the gate's type says.
//!
//! Anything else (a privilege change, a missing or malformed gate, a fault while the
//! frame is pushed, which would be a double fault) is refused with its reason rather
//! than approximated.

use ftvm_devices::GuestMem;
use kvm_bindings::kvm_segment;

use super::instr::{Cpu, Exception};
use super::paging::{Access, WalkError};
use crate::boot::cpu::segment_from_descriptor;

const RFLAGS_TF: u64 = 1 << 8;
const RFLAGS_IF: u64 = 1 << 9;
const RFLAGS_NT: u64 = 1 << 14;
const RFLAGS_RF: u64 = 1 << 16;
const RFLAGS_VM: u64 = 1 << 17;
const GATE_INTERRUPT: u8 = 0xe;
const GATE_TRAP: u8 = 0xf;

/// Why an exception could not be delivered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeliveryError {
    /// Only delivery from CPL0 is supported.
    #[error("the guest is at CPL{0}, the fallback delivers exceptions from CPL0 only")]
    NotKernelMode(u8),
    /// The vector lies beyond the IDT's limit.
    #[error("vector {0} lies beyond the IDT limit")]
    BeyondIdt(u8),
    /// The gate is absent or of a type 64-bit mode does not allow.
    #[error("the IDT gate of vector {vector} is not a present 64-bit interrupt or trap gate ({gate:#034x})")]
    BadGate {
        /// The vector.
        vector: u8,
        /// The 16-byte gate.
        gate: u128,
    },
    /// The gate's code segment is not a present 64-bit CPL0 code segment.
    #[error(
        "the handler's code segment {selector:#x} is not a present 64-bit ring-0 code segment"
    )]
    BadCodeSegment {
        /// The gate's selector.
        selector: u16,
    },
    /// A table or the stack could not be accessed (the CPU would raise a double fault).
    #[error("reading {what} failed: {cause:?}")]
    Access {
        /// What was accessed.
        what: &'static str,
        /// The failure.
        cause: WalkError,
    },
}

fn read<const N: usize>(
    cpu: &Cpu,
    mem: &GuestMem,
    linear: u64,
    what: &'static str,
) -> Result<[u8; N], DeliveryError> {
    let mut buf = [0u8; N];
    cpu.paging()
        .read(mem, linear, &mut buf, Access::Read, true)
        .map_err(|cause| DeliveryError::Access { what, cause })?;
    Ok(buf)
}

/// Delivers `ex` on `cpu`: afterwards the state is that at the handler's first
/// instruction.
pub fn deliver(cpu: &mut Cpu, mem: &GuestMem, ex: &Exception) -> Result<(), DeliveryError> {
    if cpu.cpl() != 0 {
        return Err(DeliveryError::NotKernelMode(cpu.cpl()));
    }
    let idt = cpu.sregs.idt;
    let offset = u64::from(ex.vector) * 16;
    if offset + 15 > u64::from(idt.limit) {
        return Err(DeliveryError::BeyondIdt(ex.vector));
    }
    let gate = u128::from_le_bytes(read::<16>(cpu, mem, idt.base + offset, "the IDT gate")?);
    let gate_type = ((gate >> 40) & 0xf) as u8;
    let present = (gate >> 47) & 1 == 1;
    if !present || !matches!(gate_type, GATE_INTERRUPT | GATE_TRAP) {
        return Err(DeliveryError::BadGate {
            vector: ex.vector,
            gate,
        });
    }
    let handler = (gate & 0xffff) as u64
        | (((gate >> 48) & 0xffff) as u64) << 16
        | (((gate >> 64) & 0xffff_ffff) as u64) << 32;
    let selector = ((gate >> 16) & 0xffff) as u16;
    let ist = ((gate >> 32) & 7) as u64;
    let cs = code_segment(cpu, mem, selector)?;

    let mut rsp = cpu.regs.rsp;
    if ist != 0 {
        let tss = cpu.sregs.tr.base;
        rsp = u64::from_le_bytes(read::<8>(cpu, mem, tss + 0x24 + (ist - 1) * 8, "the TSS")?);
    }
    rsp &= !0xf;
    let mut frame: Vec<u64> = vec![
        u64::from(cpu.sregs.ss.selector),
        cpu.regs.rsp,
        cpu.regs.rflags,
        u64::from(cpu.sregs.cs.selector),
        ex.return_rip,
    ];
    if let Some(code) = ex.error_code {
        frame.push(u64::from(code));
    }
    // The frame is written from its lowest address up: the last value pushed first.
    let bytes: Vec<u8> = frame.iter().rev().flat_map(|v| v.to_le_bytes()).collect();
    let top = rsp.wrapping_sub(bytes.len() as u64);
    cpu.paging()
        .write(mem, top, &bytes, true)
        .map_err(|cause| DeliveryError::Access {
            what: "the exception frame on the stack",
            cause,
        })?;

    if let Some(cr2) = ex.cr2 {
        cpu.sregs.cr2 = cr2;
    }
    cpu.regs.rsp = top;
    cpu.regs.rip = handler;
    cpu.regs.rflags &= !(RFLAGS_TF | RFLAGS_NT | RFLAGS_RF | RFLAGS_VM);
    if gate_type == GATE_INTERRUPT {
        cpu.regs.rflags &= !RFLAGS_IF;
    }
    cpu.sregs.cs = cs;
    Ok(())
}

/// The segment register form of the code segment `selector` names in the GDT.
fn code_segment(cpu: &Cpu, mem: &GuestMem, selector: u16) -> Result<kvm_segment, DeliveryError> {
    let bad = DeliveryError::BadCodeSegment { selector };
    let gdt = cpu.sregs.gdt;
    let index = u64::from(selector & !7);
    if selector & 4 != 0 || index == 0 || index + 7 > u64::from(gdt.limit) {
        return Err(bad);
    }
    let d = u64::from_le_bytes(read::<8>(cpu, mem, gdt.base + index, "the GDT")?);
    let mut cs = segment_from_descriptor(d, selector & !3);
    let code = cs.s == 1 && cs.type_ & 0x8 != 0;
    if !code || cs.present == 0 || cs.l == 0 || cs.db == 1 || cs.dpl != 0 {
        return Err(bad);
    }
    // Loading the descriptor marks it accessed, as the CPU does.
    const ACCESSED: u64 = 1 << 40;
    if d & ACCESSED == 0 {
        cpu.paging()
            .write(mem, gdt.base + index, &(d | ACCESSED).to_le_bytes(), true)
            .map_err(|cause| DeliveryError::Access {
                what: "the GDT",
                cause,
            })?;
    }
    cs.type_ |= 1;
    Ok(cs)
}
