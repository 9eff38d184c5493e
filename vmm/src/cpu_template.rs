//! CPU templates: the CPUID a guest sees, chosen by ftvm rather than by whichever host
//! boots it.
//!
//! A template starts from what this host's KVM supports (`KVM_GET_SUPPORTED_CPUID`) and,
//! in every *feature register* ([`FEATURE_REGISTERS`]), keeps exactly the features the
//! template names. Booting refuses a host that lacks one of them, naming it. The table a
//! guest booted with is its CPUID for life: snapshots and checkpoints carry it, and a
//! restore (or a secondary receiving a checkpoint) refuses a host that cannot offer
//! every feature in it ([`check_offered`]).
//!
//! Templates:
//! - `host`: everything this host's KVM supports, unchanged.
//! - `baseline`: the x86-64-v2 level (SSE3, SSSE3, SSE4.1/4.2, POPCNT, CMPXCHG16B,
//!   LAHF/SAHF) and the architectural basics every x86-64 server has; no AVX, XSAVE,
//!   AES, SMEP/SMAP, PCID or speculation-control bits. Any two hosts that offer it give a
//!   guest the same feature bits.
//! - `emulated-kernel`: `baseline` without the instructions a KVM that *emulates* guest
//!   kernel mode (a nested, page-table based hypervisor, see HOST.md) fails on: it hides
//!   SSE3, SSSE3, SSE4.1, SSE4.2, POPCNT and CMPXCHG16B (and, like `baseline`, XSAVE, AVX,
//!   AES, PCLMULQDQ and SMAP), leaving x86-64-v1 with LAHF/SAHF. INT3 and FWAIT, which no
//!   CPUID bit controls, and what a guest runs although its CPUID says no, go through the
//!   VMM's instruction fallback ([`crate::fallback`]).

use std::fmt;
use std::str::FromStr;

use kvm_bindings::{kvm_cpuid_entry2, CpuId};
use serde::{Deserialize, Serialize};

/// A named CPU template.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CpuTemplate {
    /// What this host's KVM supports.
    #[default]
    Host,
    /// x86-64-v2 and the architectural basics.
    Baseline,
    /// `baseline` without what an emulated guest kernel mode lacks.
    EmulatedKernel,
}

impl CpuTemplate {
    /// Every template.
    pub const ALL: [CpuTemplate; 3] = [Self::Host, Self::Baseline, Self::EmulatedKernel];

    /// Its name in configurations and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Self::Host => "host",
            Self::Baseline => "baseline",
            Self::EmulatedKernel => "emulated-kernel",
        }
    }

    /// The features the template offers, or `None` for everything the host has.
    fn features(self) -> Option<Vec<&'static str>> {
        match self {
            Self::Host => None,
            Self::Baseline => Some(BASELINE.to_vec()),
            Self::EmulatedKernel => Some(
                BASELINE
                    .iter()
                    .copied()
                    .filter(|f| !EMULATED_KERNEL_HIDES.contains(f))
                    .collect(),
            ),
        }
    }
}

impl fmt::Display for CpuTemplate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for CpuTemplate {
    type Err = TemplateError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|t| t.name() == s)
            .ok_or_else(|| TemplateError::Unknown(s.to_string()))
    }
}

/// Errors of CPU templates.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TemplateError {
    /// No template has this name.
    #[error("unknown CPU template {0:?} (known: host, baseline, emulated-kernel)")]
    Unknown(String),
    /// The host cannot offer the template.
    #[error("this host cannot offer CPU template {template}: its KVM lacks {}", .missing.join(", "))]
    HostLacks {
        /// The template.
        template: CpuTemplate,
        /// The features it lacks.
        missing: Vec<String>,
    },
    /// The host cannot offer the CPUID a saved guest runs with.
    #[error("this host cannot run the saved guest: its KVM lacks CPU features the guest was given: {}", .missing.join(", "))]
    CannotRestore {
        /// The features the host lacks.
        missing: Vec<String>,
    },
}

/// A CPUID output register.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reg {
    /// EAX.
    Eax,
    /// EBX.
    Ebx,
    /// ECX.
    Ecx,
    /// EDX.
    Edx,
}

/// A register of a CPUID leaf whose bits are features.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FeatureRegister {
    /// The leaf (EAX input).
    pub leaf: u32,
    /// The subleaf (ECX input).
    pub subleaf: u32,
    /// The register.
    pub reg: Reg,
    /// Bits that reflect guest-controlled state (CR4.OSXSAVE, CR4.PKE) rather than a
    /// feature: a template neither requires nor checks them.
    pub dynamic: u32,
}

/// The feature registers templates control.
pub const FEATURE_REGISTERS: [FeatureRegister; 7] = [
    FeatureRegister {
        leaf: 1,
        subleaf: 0,
        reg: Reg::Ecx,
        dynamic: 1 << 27,
    },
    FeatureRegister {
        leaf: 1,
        subleaf: 0,
        reg: Reg::Edx,
        dynamic: 0,
    },
    FeatureRegister {
        leaf: 7,
        subleaf: 0,
        reg: Reg::Ebx,
        dynamic: 0,
    },
    FeatureRegister {
        leaf: 7,
        subleaf: 0,
        reg: Reg::Ecx,
        dynamic: 1 << 4,
    },
    FeatureRegister {
        leaf: 7,
        subleaf: 0,
        reg: Reg::Edx,
        dynamic: 0,
    },
    FeatureRegister {
        leaf: 0x8000_0001,
        subleaf: 0,
        reg: Reg::Ecx,
        dynamic: 0,
    },
    FeatureRegister {
        leaf: 0x8000_0001,
        subleaf: 0,
        reg: Reg::Edx,
        dynamic: 0,
    },
];

/// A named feature bit.
#[derive(Debug, Clone, Copy)]
struct Feature {
    name: &'static str,
    leaf: u32,
    reg: Reg,
    bit: u8,
}

const fn f(name: &'static str, leaf: u32, reg: Reg, bit: u8) -> Feature {
    Feature {
        name,
        leaf,
        reg,
        bit,
    }
}

/// Feature names (Linux's `/proc/cpuinfo` spelling), for templates and for messages.
const FEATURES: &[Feature] = &[
    f("fpu", 1, Reg::Edx, 0),
    f("vme", 1, Reg::Edx, 1),
    f("de", 1, Reg::Edx, 2),
    f("pse", 1, Reg::Edx, 3),
    f("tsc", 1, Reg::Edx, 4),
    f("msr", 1, Reg::Edx, 5),
    f("pae", 1, Reg::Edx, 6),
    f("mce", 1, Reg::Edx, 7),
    f("cx8", 1, Reg::Edx, 8),
    f("apic", 1, Reg::Edx, 9),
    f("sep", 1, Reg::Edx, 11),
    f("mtrr", 1, Reg::Edx, 12),
    f("pge", 1, Reg::Edx, 13),
    f("mca", 1, Reg::Edx, 14),
    f("cmov", 1, Reg::Edx, 15),
    f("pat", 1, Reg::Edx, 16),
    f("pse36", 1, Reg::Edx, 17),
    f("clflush", 1, Reg::Edx, 19),
    f("mmx", 1, Reg::Edx, 23),
    f("fxsr", 1, Reg::Edx, 24),
    f("sse", 1, Reg::Edx, 25),
    f("sse2", 1, Reg::Edx, 26),
    f("ss", 1, Reg::Edx, 27),
    f("ht", 1, Reg::Edx, 28),
    f("pni", 1, Reg::Ecx, 0),
    f("pclmulqdq", 1, Reg::Ecx, 1),
    f("monitor", 1, Reg::Ecx, 3),
    f("vmx", 1, Reg::Ecx, 5),
    f("ssse3", 1, Reg::Ecx, 9),
    f("fma", 1, Reg::Ecx, 12),
    f("cx16", 1, Reg::Ecx, 13),
    f("pdcm", 1, Reg::Ecx, 15),
    f("pcid", 1, Reg::Ecx, 17),
    f("sse4_1", 1, Reg::Ecx, 19),
    f("sse4_2", 1, Reg::Ecx, 20),
    f("x2apic", 1, Reg::Ecx, 21),
    f("movbe", 1, Reg::Ecx, 22),
    f("popcnt", 1, Reg::Ecx, 23),
    f("tsc_deadline_timer", 1, Reg::Ecx, 24),
    f("aes", 1, Reg::Ecx, 25),
    f("xsave", 1, Reg::Ecx, 26),
    f("avx", 1, Reg::Ecx, 28),
    f("f16c", 1, Reg::Ecx, 29),
    f("rdrand", 1, Reg::Ecx, 30),
    f("hypervisor", 1, Reg::Ecx, 31),
    f("fsgsbase", 7, Reg::Ebx, 0),
    f("tsc_adjust", 7, Reg::Ebx, 1),
    f("bmi1", 7, Reg::Ebx, 3),
    f("hle", 7, Reg::Ebx, 4),
    f("avx2", 7, Reg::Ebx, 5),
    f("smep", 7, Reg::Ebx, 7),
    f("bmi2", 7, Reg::Ebx, 8),
    f("erms", 7, Reg::Ebx, 9),
    f("invpcid", 7, Reg::Ebx, 10),
    f("rtm", 7, Reg::Ebx, 11),
    f("avx512f", 7, Reg::Ebx, 16),
    f("rdseed", 7, Reg::Ebx, 18),
    f("adx", 7, Reg::Ebx, 19),
    f("smap", 7, Reg::Ebx, 20),
    f("clflushopt", 7, Reg::Ebx, 23),
    f("clwb", 7, Reg::Ebx, 24),
    f("sha_ni", 7, Reg::Ebx, 29),
    f("umip", 7, Reg::Ecx, 2),
    f("pku", 7, Reg::Ecx, 3),
    f("vaes", 7, Reg::Ecx, 9),
    f("vpclmulqdq", 7, Reg::Ecx, 10),
    f("rdpid", 7, Reg::Ecx, 22),
    f("md_clear", 7, Reg::Edx, 10),
    f("spec_ctrl", 7, Reg::Edx, 26),
    f("stibp", 7, Reg::Edx, 27),
    f("flush_l1d", 7, Reg::Edx, 28),
    f("arch_capabilities", 7, Reg::Edx, 29),
    f("ssbd", 7, Reg::Edx, 31),
    f("lahf_lm", 0x8000_0001, Reg::Ecx, 0),
    f("abm", 0x8000_0001, Reg::Ecx, 5),
    f("sse4a", 0x8000_0001, Reg::Ecx, 6),
    f("3dnowprefetch", 0x8000_0001, Reg::Ecx, 8),
    f("syscall", 0x8000_0001, Reg::Edx, 11),
    f("nx", 0x8000_0001, Reg::Edx, 20),
    f("mmxext", 0x8000_0001, Reg::Edx, 22),
    f("fxsr_opt", 0x8000_0001, Reg::Edx, 25),
    f("pdpe1gb", 0x8000_0001, Reg::Edx, 26),
    f("rdtscp", 0x8000_0001, Reg::Edx, 27),
    f("lm", 0x8000_0001, Reg::Edx, 29),
];

/// The `baseline` template's features.
const BASELINE: &[&str] = &[
    "fpu",
    "vme",
    "de",
    "pse",
    "tsc",
    "msr",
    "pae",
    "mce",
    "cx8",
    "apic",
    "sep",
    "mtrr",
    "pge",
    "mca",
    "cmov",
    "pat",
    "pse36",
    "clflush",
    "mmx",
    "fxsr",
    "sse",
    "sse2",
    "pni",
    "ssse3",
    "cx16",
    "sse4_1",
    "sse4_2",
    "popcnt",
    "hypervisor",
    "lahf_lm",
    "syscall",
    "nx",
    "lm",
];

/// What `emulated-kernel` removes from `baseline`.
pub const EMULATED_KERNEL_HIDES: &[&str] = &["pni", "ssse3", "cx16", "sse4_1", "sse4_2", "popcnt"];

fn value(e: &kvm_cpuid_entry2, reg: Reg) -> u32 {
    match reg {
        Reg::Eax => e.eax,
        Reg::Ebx => e.ebx,
        Reg::Ecx => e.ecx,
        Reg::Edx => e.edx,
    }
}

fn value_mut(e: &mut kvm_cpuid_entry2, reg: Reg) -> &mut u32 {
    match reg {
        Reg::Eax => &mut e.eax,
        Reg::Ebx => &mut e.ebx,
        Reg::Ecx => &mut e.ecx,
        Reg::Edx => &mut e.edx,
    }
}

fn find(cpuid: &CpuId, leaf: u32, subleaf: u32) -> Option<&kvm_cpuid_entry2> {
    cpuid
        .as_slice()
        .iter()
        .find(|e| e.function == leaf && e.index == subleaf)
}

/// The bits of `reg` set in `cpuid` (0 if the leaf is absent).
fn bits(cpuid: &CpuId, r: &FeatureRegister) -> u32 {
    find(cpuid, r.leaf, r.subleaf).map_or(0, |e| value(e, r.reg))
}

/// The name of feature bit `bit` of `r` (`leaf 0x7 ebx bit 5` when it has none).
fn name_of(r: &FeatureRegister, bit: u8) -> String {
    FEATURES
        .iter()
        .find(|f| f.leaf == r.leaf && f.reg == r.reg && f.bit == bit)
        .map_or_else(
            || format!("leaf {:#x} {:?} bit {bit}", r.leaf, r.reg).to_lowercase(),
            |f| f.name.to_string(),
        )
}

fn names(r: &FeatureRegister, mask: u32) -> impl Iterator<Item = String> + '_ {
    (0..32u8)
        .filter(move |b| mask & (1 << b) != 0)
        .map(move |b| name_of(r, b))
}

/// The mask of `r`'s bits a feature list names.
fn mask(r: &FeatureRegister, features: &[&str]) -> u32 {
    FEATURES
        .iter()
        .filter(|f| f.leaf == r.leaf && f.reg == r.reg && features.contains(&f.name))
        .fold(0, |m, f| m | (1 << f.bit))
}

/// The CPUID table `template` gives a guest on a host whose KVM supports `supported`.
pub fn build(template: CpuTemplate, supported: &CpuId) -> Result<CpuId, TemplateError> {
    let Some(features) = template.features() else {
        return Ok(supported.clone());
    };
    let mut missing = Vec::new();
    for r in &FEATURE_REGISTERS {
        let want = mask(r, &features) & !r.dynamic;
        missing.extend(names(r, want & !bits(supported, r)));
    }
    if !missing.is_empty() {
        return Err(TemplateError::HostLacks { template, missing });
    }
    let mut cpuid = supported.clone();
    for e in cpuid.as_mut_slice() {
        let (function, index) = (e.function, e.index);
        for r in FEATURE_REGISTERS
            .iter()
            .filter(|r| r.leaf == function && r.subleaf == index)
        {
            *value_mut(e, r.reg) &= mask(r, &features) | r.dynamic;
        }
        // Leaf 7's further subleaves hold more features; none is offered.
        if e.function == 7 && e.index == 0 {
            e.eax = 0;
        }
        if e.function == 7 && e.index > 0 {
            (e.eax, e.ebx, e.ecx, e.edx) = (0, 0, 0, 0);
        }
        // Without XSAVE the XSAVE state leaf describes nothing.
        if e.function == 0xd && !features.contains(&"xsave") {
            (e.eax, e.ebx, e.ecx, e.edx) = (0, 0, 0, 0);
        }
    }
    Ok(cpuid)
}

/// Refuses a host whose KVM (`supported`) lacks a feature the guest's table `guest`
/// offers.
pub fn check_offered(guest: &CpuId, supported: &CpuId) -> Result<(), TemplateError> {
    let mut missing = Vec::new();
    for r in &FEATURE_REGISTERS {
        let lacking = bits(guest, r) & !bits(supported, r) & !r.dynamic;
        missing.extend(names(r, lacking));
    }
    if missing.is_empty() {
        Ok(())
    } else {
        Err(TemplateError::CannotRestore { missing })
    }
}

/// The names of the features `cpuid` offers, in table order (for reports and tests).
pub fn offered(cpuid: &CpuId) -> Vec<&'static str> {
    FEATURES
        .iter()
        .filter(|f| {
            FEATURE_REGISTERS
                .iter()
                .find(|r| r.leaf == f.leaf && r.reg == f.reg)
                .is_some_and(|r| bits(cpuid, r) & (1 << f.bit) != 0)
        })
        .map(|f| f.name)
        .collect()
}

#[cfg(test)]
#[path = "cpu_template_tests.rs"]
mod tests;
