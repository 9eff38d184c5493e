//! The fallback's instructions against the host CPU's own execution of them (the host
//! runs them in this process; the exceptions they raise come back as signals carrying
//! the CPU's trap number and RIP), and its page walk and exception delivery against a
//! small machine built in guest memory.

use std::arch::asm;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use ftvm_devices::GuestMem;
use iced_x86::{Decoder, DecoderOptions, Instruction};
use kvm_bindings::{kvm_dtable, kvm_regs, kvm_segment, kvm_sregs};
use vm_memory::{Bytes, GuestAddress};

use super::instr::{self, vector, Cpu, Effect, Exception};
use super::paging::{Access, WalkError};
use super::{step, FallbackError};

// The test machine: identity-mapped first 8 MiB (2 MiB pages, supervisor, writable),
// except a 4 KiB-page table for 2-4 MiB whose page 0x20_1000 is read-only and page
// 0x20_2000 not present; a GDT with a 64-bit CPL0 code segment at 0x08, an IDT, a TSS.
const PML4: u64 = 0x1000;
const PDPT: u64 = 0x2000;
const PD: u64 = 0x3000;
const PT: u64 = 0x4000;
const GDT: u64 = 0x5000;
const IDT: u64 = 0x6000;
const TSS: u64 = 0x7000;
const CODE: u64 = 0x10_0000;
const DATA: u64 = 0x18_0000;
const STACK_TOP: u64 = 0x1f_0000;
const IST1_TOP: u64 = 0x1e_0000;
const READ_ONLY: u64 = 0x20_1000;
const ABSENT: u64 = 0x20_2000;
const HANDLER_BP: u64 = 0x11_0000;
const HANDLER_PF: u64 = 0x11_1000;
const HANDLER_GP: u64 = 0x11_2000;

fn machine() -> (GuestMem, Cpu) {
    let mem = crate::memory::allocate(16).expect("16 MiB of guest memory");
    let w = |v: u64, at: u64| mem.write_obj(v, GuestAddress(at)).expect("in RAM");
    w(PDPT | 3, PML4);
    w(PD | 3, PDPT);
    w(0x83, PD); // 0-2 MiB
    w(PT | 3, PD + 8); // 2-4 MiB in 4 KiB pages
    for i in 0..512u64 {
        let page = 0x20_0000 + i * 4096;
        let flags = match page {
            READ_ONLY => 0x1,
            ABSENT => 0,
            _ => 0x3,
        };
        w(page | flags, PT + i * 8);
    }
    w(0x40_0000 | 0x83, PD + 16);
    w(0x60_0000 | 0x83, PD + 24);
    // GDT: null, code64 DPL0 (accessed bit clear), data.
    w(0x00af_9a00_0000_ffff, GDT + 8);
    w(0x00cf_9300_0000_ffff, GDT + 16);
    // IST1 in the TSS.
    w(IST1_TOP, TSS + 0x24);
    let gate = |v: u64, handler: u64, ist: u64, type_: u64| {
        let low = (handler & 0xffff)
            | (0x08 << 16)
            | (ist << 32)
            | ((0x80 | type_) << 40)
            | ((handler & 0xffff_0000) << 32);
        w(low, IDT + v * 16);
        w(handler >> 32, IDT + v * 16 + 8);
    };
    gate(3, HANDLER_BP, 0, 0xf); // trap gate
    gate(14, HANDLER_PF, 1, 0xe); // interrupt gate on IST1
    gate(13, HANDLER_GP, 0, 0xe);
    let code = kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector: 0x08,
        type_: 0xb,
        present: 1,
        dpl: 0,
        db: 0,
        s: 1,
        l: 1,
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    };
    let data = kvm_segment {
        selector: 0x10,
        type_: 0x3,
        l: 0,
        db: 1,
        ..code
    };
    let sregs = kvm_sregs {
        cs: code,
        ss: data,
        ds: data,
        es: data,
        gdt: kvm_dtable {
            base: GDT,
            limit: 23,
            ..Default::default()
        },
        idt: kvm_dtable {
            base: IDT,
            limit: 256 * 16 - 1,
            ..Default::default()
        },
        tr: kvm_segment {
            base: TSS,
            limit: 0x67,
            selector: 0x18,
            type_: 0xb,
            present: 1,
            ..Default::default()
        },
        cr0: 0x8001_0033, // PG, WP, NE, ET, MP, PE
        cr3: PML4,
        cr4: 0x620,  // PAE, OSFXSR, OSXMMEXCPT
        efer: 0xd00, // LMA, LME, NXE
        ..Default::default()
    };
    let regs = kvm_regs {
        rip: CODE,
        rsp: STACK_TOP - 8,
        rflags: 0x246,
        ..Default::default()
    };
    let cpu = Cpu {
        regs,
        sregs,
        fsw: 0,
        mxcsr: 0x1f80,
        smap: true,
    };
    (mem, cpu)
}

/// Puts `bytes` at the CPU's RIP and executes them through the fallback.
fn run(mem: &GuestMem, cpu: &mut Cpu, bytes: &[u8]) -> Result<super::Executed, FallbackError> {
    mem.write_slice(bytes, GuestAddress(cpu.regs.rip))
        .expect("code in RAM");
    step(cpu, mem)
}

fn decode(bytes: &[u8], rip: u64) -> Instruction {
    Decoder::with_ip(64, bytes, rip, DecoderOptions::NONE).decode()
}

/// Executes `bytes`, decoded at the host address `site` where the host ran them, on the
/// test machine (after `prepare`), and asserts the fallback raises what the host raised:
/// `trap` (the host's trap number and RIP), with `error_code`. Returns the CPU after.
fn assert_raises_as_on_the_host(
    bytes: &[u8],
    site: u64,
    trap: (u64, u64),
    error_code: Option<u32>,
    prepare: impl FnOnce(&GuestMem, &mut Cpu),
) -> Cpu {
    let (trapno, rip) = trap;
    let (mem, mut cpu) = machine();
    prepare(&mem, &mut cpu);
    cpu.regs.rip = site;
    let insn = decode(bytes, site);
    let effect = instr::execute(&mut cpu, &mem, &insn).expect("emulated");
    assert_eq!(
        effect,
        Effect::Raised(Exception {
            vector: trapno as u8,
            error_code,
            return_rip: rip,
            cr2: None
        })
    );
    cpu
}

// ---- the host CPU's own execution ----

static TRAPNO: AtomicU64 = AtomicU64::new(u64::MAX);
static TRAP_RIP: AtomicU64 = AtomicU64::new(0);
static RESUME: AtomicU64 = AtomicU64::new(0);
/// The host-execution tests install process-wide signal handlers: one at a time.
static HOST_TRAPS: Mutex<()> = Mutex::new(());

extern "C" fn on_trap(_sig: libc::c_int, _info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid ucontext_t to an SA_SIGINFO handler; the
    // registers are read and RIP is moved to the resume point the test set.
    unsafe {
        let uc = ctx as *mut libc::ucontext_t;
        let gregs = &mut (*uc).uc_mcontext.gregs;
        TRAPNO.store(gregs[libc::REG_TRAPNO as usize] as u64, Ordering::SeqCst);
        TRAP_RIP.store(gregs[libc::REG_RIP as usize] as u64, Ordering::SeqCst);
        gregs[libc::REG_RIP as usize] = RESUME.load(Ordering::SeqCst) as i64;
    }
}

/// Installs [`on_trap`] for SIGTRAP, SIGFPE and SIGSEGV while `f` runs; returns the
/// trap number and RIP of the exception `f` raised, if any.
fn host_trap(f: impl FnOnce()) -> Option<(u64, u64)> {
    let _one = HOST_TRAPS.lock().unwrap_or_else(|e| e.into_inner());
    TRAPNO.store(u64::MAX, Ordering::SeqCst);
    let signals = [libc::SIGTRAP, libc::SIGFPE, libc::SIGSEGV];
    // SAFETY: sigaction is plain data; all zeros is a valid value.
    let mut old: [libc::sigaction; 3] = [unsafe { std::mem::zeroed() }; 3];
    for (sig, old) in signals.iter().zip(old.iter_mut()) {
        // SAFETY: installs a handler that only touches atomics and the interrupted
        // context; the previous action is restored below.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_trap as *const () as usize;
            sa.sa_flags = libc::SA_SIGINFO;
            assert_eq!(libc::sigaction(*sig, &sa, old), 0);
        }
    }
    f();
    for (sig, old) in signals.iter().zip(old.iter()) {
        // SAFETY: restores the action saved above.
        unsafe { assert_eq!(libc::sigaction(*sig, old, std::ptr::null_mut()), 0) };
    }
    let trapno = TRAPNO.load(Ordering::SeqCst);
    (trapno != u64::MAX).then(|| (trapno, TRAP_RIP.load(Ordering::SeqCst)))
}

#[test]
fn int3_is_a_trap_with_rip_after_it_as_on_the_host() {
    let mut site = 0u64;
    let mut after = 0u64;
    let trap = host_trap(|| {
        // SAFETY: INT3 raises SIGTRAP; the handler resumes at label 2 (after it).
        unsafe {
            asm!(
                "lea {site}, [rip + 3f]",
                "lea {after}, [rip + 2f]",
                "mov [{resume}], {after}",
                "3:",
                "int3",
                "2:",
                site = out(reg) site,
                after = out(reg) after,
                resume = in(reg) RESUME.as_ptr(),
            );
        }
    });
    let trap = trap.expect("the host raised #BP");
    assert_eq!(after, site + 1);
    assert_raises_as_on_the_host(&[0xcc], site, trap, None, |_, _| {});
}

#[test]
fn fwait_without_a_pending_x87_exception_does_nothing_but_advance_as_on_the_host() {
    let mut before = 0u64;
    let mut after = 1u64;
    let trap = host_trap(|| {
        // SAFETY: FNINIT masks every x87 exception, so FWAIT raises nothing; the
        // flags are read around it.
        unsafe {
            asm!(
                "fninit",
                "pushfq",
                "pop {b}",
                "fwait",
                "pushfq",
                "pop {a}",
                b = out(reg) before,
                a = out(reg) after,
            );
        }
    });
    assert_eq!(trap, None);
    assert_eq!(before, after);
    let (mem, mut cpu) = machine();
    let start = cpu.clone();
    let done = run(&mem, &mut cpu, &[0x9b]).expect("emulated");
    assert_eq!(done.next_rip, start.regs.rip + 1);
    assert_eq!(
        kvm_regs {
            rip: start.regs.rip + 1,
            ..start.regs
        },
        cpu.regs
    );
}

#[test]
fn fwait_with_a_pending_unmasked_x87_exception_raises_mf_on_itself_as_on_the_host() {
    let mut site = 0u64;
    let mut fsw_before = 0u16;
    let cw: u16 = 0x037b; // every exception masked but divide-by-zero
    let trap = host_trap(|| {
        // SAFETY: 1/0 with #Z unmasked leaves an x87 exception pending (FSW.ES); the
        // FWAIT reports it as #MF (SIGFPE), the handler resumes at label 2, which clears
        // the exception and resets the FPU.
        unsafe {
            asm!(
                "fninit",
                "fldcw [{cw}]",
                "fldz",
                "fld1",
                "fdivrp st(1), st",
                "fnstsw [{fsw}]",
                "lea {site}, [rip + 3f]",
                "lea rax, [rip + 2f]",
                "mov [{resume}], rax",
                "3:",
                "fwait",
                "2:",
                "fnclex",
                "fninit",
                cw = in(reg) &cw as *const u16,
                fsw = in(reg) &mut fsw_before as *mut u16,
                site = out(reg) site,
                resume = in(reg) RESUME.as_ptr(),
                out("rax") _,
            );
        }
    });
    let trap = trap.expect("the host raised #MF");
    assert_ne!(
        fsw_before & 0x80,
        0,
        "the host's FSW shows the pending exception"
    );
    let cpu =
        assert_raises_as_on_the_host(&[0x9b], site, trap, None, |_, cpu| cpu.fsw = fsw_before);
    assert_eq!(cpu.regs.rip, site, "a fault leaves RIP on the instruction");
}

/// A 64-bit xorshift stream for operand values (seeded; the values are printed on a
/// mismatch).
fn values(seed: u64, n: usize) -> Vec<u64> {
    let mut x = seed;
    let mut v = vec![0, u64::MAX, 1, 1 << 63, 0xffff_0000, 0x8000];
    while v.len() < n {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        // Mix sparse and dense values.
        v.push(if x & 1 == 0 {
            x
        } else {
            x & (x >> 11) & (x >> 23)
        });
    }
    v
}

const ARITH_FLAGS: u64 = 0x8d5; // OF SF ZF AF PF CF

#[test]
fn popcnt_of_registers_matches_the_host_at_every_operand_size() {
    assert!(std::arch::is_x86_feature_detected!("popcnt"));
    // popcnt rax, rdx / popcnt eax, edx / popcnt ax, dx
    let encodings: [(&[u8], u32); 3] = [
        (&[0xf3, 0x48, 0x0f, 0xb8, 0xc2], 64),
        (&[0xf3, 0x0f, 0xb8, 0xc2], 32),
        (&[0x66, 0xf3, 0x0f, 0xb8, 0xc2], 16),
    ];
    let dest_before = 0x1234_5678_9abc_def0u64;
    for (i, source) in values(0x9e37_79b9_7f4a_7c15, 200).into_iter().enumerate() {
        for (bytes, bits) in encodings {
            let (mut host_rax, mut host_flags): (u64, u64) = (dest_before, 0);
            // SAFETY: POPCNT of registers; the flags are read right after it. The
            // flags are set to all ones first, to see which POPCNT clears.
            unsafe {
                match bits {
                    64 => asm!("push {all}", "popfq", "popcnt rax, rdx", "pushfq", "pop {f}",
                        all = in(reg) 0x8d5u64, f = out(reg) host_flags,
                        inout("rax") host_rax, in("rdx") source),
                    32 => asm!("push {all}", "popfq", "popcnt eax, edx", "pushfq", "pop {f}",
                        all = in(reg) 0x8d5u64, f = out(reg) host_flags,
                        inout("rax") host_rax, in("rdx") source),
                    _ => asm!("push {all}", "popfq", "popcnt ax, dx", "pushfq", "pop {f}",
                        all = in(reg) 0x8d5u64, f = out(reg) host_flags,
                        inout("rax") host_rax, in("rdx") source),
                }
            }
            let (mem, mut cpu) = machine();
            cpu.regs.rax = dest_before;
            cpu.regs.rdx = source;
            cpu.regs.rflags = 0x2 | ARITH_FLAGS;
            run(&mem, &mut cpu, bytes).expect("emulated");
            assert_eq!(
                (cpu.regs.rax, cpu.regs.rflags & ARITH_FLAGS),
                (host_rax, host_flags & ARITH_FLAGS),
                "value {i} = {source:#x}, {bits}-bit"
            );
            assert_eq!(cpu.regs.rip, CODE + bytes.len() as u64);
        }
    }
}

#[test]
fn popcnt_of_memory_reads_through_the_guest_page_tables_as_the_host_reads_its_own() {
    // popcnt rcx, [rdx + rsi*8 + 0x10]
    let bytes = [0xf3, 0x48, 0x0f, 0xb8, 0x4c, 0xf2, 0x10];
    for source in values(7, 50) {
        let host: u64;
        let cell = [0u64, 0, 0, source, 0];
        // SAFETY: reads cell[3] = [base + 1*8 + 0x10], inside the array.
        unsafe {
            asm!("popcnt rcx, [rdx + rsi*8 + 0x10]", out("rcx") host,
                in("rdx") cell.as_ptr(), in("rsi") 1u64);
        }
        let (mem, mut cpu) = machine();
        // The operand straddles the read-only page's start: two translations.
        let at = READ_ONLY - 4;
        mem.write_obj(source, GuestAddress(at)).expect("in RAM");
        cpu.regs.rdx = at - 0x18;
        cpu.regs.rsi = 1;
        run(&mem, &mut cpu, &bytes).expect("emulated");
        assert_eq!(cpu.regs.rcx, host, "value {source:#x}");
    }
}

#[test]
fn ldmxcsr_and_stmxcsr_match_the_host_and_reserved_bits_raise_gp() {
    for value in [0x1f80u32, 0x9fc0, 0x0000, 0xffff, 0x1f80 | 0x40] {
        let mut host_after = 0u32;
        let mut saved = 0u32;
        // SAFETY: saves MXCSR, loads `value` (all bits of it valid on this host, which
        // has DAZ), reads it back and restores the saved one.
        unsafe {
            asm!("stmxcsr [{s}]", "ldmxcsr [{v}]", "stmxcsr [{a}]", "ldmxcsr [{s}]",
                s = in(reg) &mut saved as *mut u32, v = in(reg) &value as *const u32,
                a = in(reg) &mut host_after as *mut u32);
        }
        let (mem, mut cpu) = machine();
        // ldmxcsr [rax]; stmxcsr [rax + 4]
        mem.write_obj(value, GuestAddress(DATA)).expect("in RAM");
        cpu.regs.rax = DATA;
        run(&mem, &mut cpu, &[0x0f, 0xae, 0x10]).expect("emulated");
        assert_eq!(cpu.mxcsr, host_after);
        run(&mem, &mut cpu, &[0x0f, 0xae, 0x58, 0x04]).expect("emulated");
        let stored: u32 = mem.read_obj(GuestAddress(DATA + 4)).expect("in RAM");
        assert_eq!(stored, host_after);
    }
    let reserved = 0x1_1f80u32;
    let mut site = 0u64;
    let trap = host_trap(|| {
        // SAFETY: LDMXCSR of a reserved bit raises #GP (SIGSEGV) before loading
        // anything; the handler resumes at label 2.
        unsafe {
            asm!("lea {site}, [rip + 3f]", "lea rax, [rip + 2f]", "mov [{resume}], rax",
                "3:", "ldmxcsr [{v}]", "2:",
                site = out(reg) site, v = in(reg) &reserved as *const u32,
                resume = in(reg) RESUME.as_ptr(), out("rax") _);
        }
    });
    let trap = trap.expect("the host raised #GP");
    assert_eq!(trap.1, site);
    let cpu = assert_raises_as_on_the_host(&[0x0f, 0xae, 0x10], site, trap, Some(0), |mem, cpu| {
        mem.write_obj(reserved, GuestAddress(DATA)).expect("in RAM");
        cpu.regs.rax = DATA;
    });
    assert_eq!(cpu.mxcsr, 0x1f80, "nothing loaded");
}

#[test]
fn clac_and_stac_set_ac_at_cpl0_and_are_undefined_without_smap() {
    let (mem, mut cpu) = machine();
    run(&mem, &mut cpu, &[0x0f, 0x01, 0xcb]).expect("stac");
    assert_ne!(cpu.regs.rflags & instr::RFLAGS_AC, 0);
    run(&mem, &mut cpu, &[0x0f, 0x01, 0xca]).expect("clac");
    assert_eq!(cpu.regs.rflags & instr::RFLAGS_AC, 0);
    cpu.smap = false;
    let insn = decode(&[0x0f, 0x01, 0xca], cpu.regs.rip);
    let effect = instr::execute(&mut cpu, &mem, &insn).expect("emulated");
    assert!(matches!(
        effect,
        Effect::Raised(Exception {
            vector: vector::UD,
            ..
        })
    ));
}

// ---- delivery and paging ----

#[test]
fn int3_is_delivered_through_the_idt_with_the_frame_the_cpu_pushes() {
    let (mem, mut cpu) = machine();
    cpu.regs.rsp = STACK_TOP - 0x28; // not 16-byte aligned: delivery aligns it
    let start = cpu.clone();
    let done = run(&mem, &mut cpu, &[0xcc]).expect("delivered");
    assert_eq!(done.next_rip, HANDLER_BP);
    assert_eq!(cpu.regs.rip, HANDLER_BP);
    let aligned = start.regs.rsp & !0xf;
    assert_eq!(cpu.regs.rsp, aligned - 40);
    let frame: Vec<u64> = (0..5)
        .map(|i| {
            mem.read_obj(GuestAddress(cpu.regs.rsp + 8 * i))
                .expect("stack")
        })
        .collect();
    assert_eq!(
        frame,
        vec![CODE + 1, 0x08, start.regs.rflags, start.regs.rsp, 0x10]
    );
    // A trap gate leaves IF set; the code descriptor was marked accessed.
    assert_ne!(cpu.regs.rflags & (1 << 9), 0);
    let desc: u64 = mem.read_obj(GuestAddress(GDT + 8)).expect("gdt");
    assert_ne!(desc & (1 << 40), 0);
    assert_eq!(cpu.sregs.cs.selector, 0x08);
    assert_eq!(cpu.sregs.cs.l, 1);
}

#[test]
fn a_memory_operand_on_an_absent_page_delivers_pf_with_cr2_on_the_ist_stack() {
    let (mem, mut cpu) = machine();
    // stmxcsr [rax]
    cpu.regs.rax = ABSENT + 0x10;
    let start = cpu.clone();
    run(&mem, &mut cpu, &[0x0f, 0xae, 0x18]).expect("delivered");
    assert_eq!(cpu.regs.rip, HANDLER_PF);
    assert_eq!(cpu.sregs.cr2, ABSENT + 0x10);
    assert_eq!(cpu.regs.rsp, IST1_TOP - 48);
    let frame: Vec<u64> = (0..6)
        .map(|i| {
            mem.read_obj(GuestAddress(cpu.regs.rsp + 8 * i))
                .expect("stack")
        })
        .collect();
    // Error code: not present, write, supervisor.
    assert_eq!(
        frame,
        vec![0b010, CODE, 0x08, start.regs.rflags, start.regs.rsp, 0x10]
    );
    // An interrupt gate clears IF.
    assert_eq!(cpu.regs.rflags & (1 << 9), 0);
}

#[test]
fn the_page_walk_checks_write_protection_and_sets_accessed_and_dirty_bits() {
    let (mem, cpu) = machine();
    let paging = cpu.paging();
    let pte = |page: u64| -> u64 {
        mem.read_obj(GuestAddress(PT + ((page - 0x20_0000) / 4096) * 8))
            .expect("pt")
    };
    assert_eq!(
        paging.translate(&mem, READ_ONLY + 8, Access::Write, false),
        Err(WalkError::PageFault {
            error_code: 0b011,
            address: READ_ONLY + 8
        })
    );
    assert_eq!(
        paging.translate(&mem, READ_ONLY + 8, Access::Read, false),
        Ok(READ_ONLY + 8)
    );
    assert_eq!(pte(READ_ONLY) & 0x60, 0x20, "accessed, not dirty");
    let page = 0x20_3000;
    assert_eq!(paging.translate(&mem, page, Access::Write, false), Ok(page));
    assert_eq!(pte(page) & 0x60, 0x60, "accessed and dirty");
    assert_eq!(
        paging.translate(&mem, 0x0000_8000_0000_0000, Access::Read, false),
        Err(WalkError::NonCanonical {
            address: 0x0000_8000_0000_0000
        })
    );
    // With CR0.WP clear, a supervisor write to a read-only page succeeds.
    let mut no_wp = paging;
    no_wp.cr0 &= !(1 << 16);
    assert!(no_wp
        .translate(&mem, READ_ONLY, Access::Write, false)
        .is_ok());
}

#[test]
fn an_instruction_the_fallback_does_not_know_stops_with_its_bytes_mnemonic_and_rip() {
    let (mem, mut cpu) = machine();
    cpu.regs.rdi = DATA;
    // cmpxchg16b [rdi]
    let err = run(&mem, &mut cpu, &[0x48, 0x0f, 0xc7, 0x0f]).expect_err("refused");
    let line = err.to_string();
    assert!(matches!(err, FallbackError::Unsupported { .. }), "{line}");
    assert!(line.contains("cmpxchg16b"), "{line}");
    assert!(line.contains("48 0f c7 0f"), "{line}");
    assert!(line.contains(&format!("{CODE:#x}")), "{line}");
    assert_eq!(cpu.regs.rip, CODE, "nothing executed");
}
