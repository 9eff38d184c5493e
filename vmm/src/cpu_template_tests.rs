use kvm_bindings::{kvm_cpuid_entry2, CpuId};

use super::*;

fn entry(function: u32, index: u32, regs: [u32; 4]) -> kvm_cpuid_entry2 {
    kvm_cpuid_entry2 {
        function,
        index,
        eax: regs[0],
        ebx: regs[1],
        ecx: regs[2],
        edx: regs[3],
        ..Default::default()
    }
}

/// A host offering every feature bit, with leaves templates must leave alone.
fn everything() -> CpuId {
    CpuId::from_entries(&[
        entry(0, 0, [0xd, 0x756e_6547, 0x6c65_746e, 0x4965_6e69]),
        entry(1, 0, [0x000a_0f11, 0x0001_0800, u32::MAX, u32::MAX]),
        entry(7, 0, [2, u32::MAX, u32::MAX, u32::MAX]),
        entry(7, 1, [u32::MAX, 0, 0, 0]),
        entry(0xd, 0, [0x7, 0x340, 0x340, 0]),
        entry(
            0x4000_0000,
            0,
            [0x4000_0001, 0x4b4d_564b, 0x564b_4d56, 0x4d],
        ),
        entry(0x8000_0001, 0, [0, 0, u32::MAX, u32::MAX]),
    ])
    .expect("a small table")
}

fn without(mut cpuid: CpuId, feature: &str) -> CpuId {
    let f = FEATURES.iter().find(|f| f.name == feature).expect("known");
    for e in cpuid.as_mut_slice() {
        if e.function == f.leaf && e.index == 0 {
            *value_mut(e, f.reg) &= !(1 << f.bit);
        }
    }
    cpuid
}

fn leaf(cpuid: &CpuId, function: u32, index: u32) -> kvm_cpuid_entry2 {
    *find(cpuid, function, index).expect("leaf present")
}

#[test]
fn baseline_offers_exactly_its_features_and_leaves_other_leaves_alone() {
    let host = everything();
    let cpuid = build(CpuTemplate::Baseline, &host).expect("offered");
    let mut want: Vec<&str> = BASELINE.to_vec();
    want.sort_unstable();
    let mut got = offered(&cpuid);
    got.sort_unstable();
    assert_eq!(got, want);
    // Dynamic bits stay as KVM reports them (KVM keeps OSXSAVE in step with CR4).
    assert_ne!(leaf(&cpuid, 1, 0).ecx & (1 << 27), 0);
    assert_eq!(leaf(&cpuid, 7, 0).eax, 0, "no further leaf-7 subleaves");
    assert_eq!(leaf(&cpuid, 7, 1).eax, 0);
    assert_eq!(leaf(&cpuid, 0xd, 0).eax, 0, "no XSAVE state without XSAVE");
    for (function, index) in [(0, 0), (0x4000_0000, 0)] {
        assert_eq!(leaf(&cpuid, function, index), leaf(&host, function, index));
    }
    assert_eq!(
        leaf(&cpuid, 1, 0).eax,
        leaf(&host, 1, 0).eax,
        "family/model kept"
    );
}

#[test]
fn emulated_kernel_hides_what_an_emulated_kernel_mode_lacks() {
    let cpuid = build(CpuTemplate::EmulatedKernel, &everything()).expect("offered");
    let got = offered(&cpuid);
    for hidden in EMULATED_KERNEL_HIDES
        .iter()
        .chain(&["xsave", "avx", "smap", "aes"])
    {
        assert!(!got.contains(hidden), "{hidden} offered: {got:?}");
    }
    for kept in ["sse2", "lahf_lm", "lm", "nx", "hypervisor", "cmov"] {
        assert!(got.contains(&kept), "{kept} missing: {got:?}");
    }
    assert_eq!(got.len(), BASELINE.len() - EMULATED_KERNEL_HIDES.len());
}

#[test]
fn a_host_without_a_template_feature_is_refused_by_name() {
    let host = without(without(everything(), "popcnt"), "lahf_lm");
    let err = build(CpuTemplate::Baseline, &host).expect_err("refused");
    assert_eq!(
        err,
        TemplateError::HostLacks {
            template: CpuTemplate::Baseline,
            missing: vec!["popcnt".into(), "lahf_lm".into()]
        }
    );
    assert!(err.to_string().contains("popcnt, lahf_lm"), "{err}");
    // The template that hides POPCNT still needs LAHF/SAHF.
    assert!(build(CpuTemplate::EmulatedKernel, &host).is_err());
    let host = without(everything(), "popcnt");
    assert!(build(CpuTemplate::EmulatedKernel, &host).is_ok());
    assert_eq!(
        build(CpuTemplate::Host, &host).expect("host").as_slice(),
        host.as_slice()
    );
}

#[test]
fn two_different_hosts_give_a_guest_the_same_feature_bits() {
    let big = everything();
    let mut small = without(without(everything(), "avx512f"), "x2apic");
    for e in small.as_mut_slice() {
        if e.function == 7 && e.index == 0 {
            e.ecx = 0;
            e.edx = 0;
        }
    }
    for t in [CpuTemplate::Baseline, CpuTemplate::EmulatedKernel] {
        let a = build(t, &big).expect("big host");
        let b = build(t, &small).expect("small host");
        for r in &FEATURE_REGISTERS {
            assert_eq!(
                bits(&a, r) & !r.dynamic,
                bits(&b, r) & !r.dynamic,
                "{t} {r:?}"
            );
        }
    }
}

#[test]
fn a_saved_table_is_refused_on_a_host_lacking_its_features_by_name() {
    let guest = everything();
    let host = without(without(everything(), "avx2"), "rdtscp");
    let err = check_offered(&guest, &host).expect_err("refused");
    assert_eq!(
        err,
        TemplateError::CannotRestore {
            missing: vec!["avx2".into(), "rdtscp".into()]
        }
    );
    // A guest built with a template the host offers is accepted; OSXSAVE is state.
    let baseline = build(CpuTemplate::Baseline, &everything()).expect("offered");
    let mut host = without(everything(), "avx2");
    for e in host.as_mut_slice() {
        if e.function == 1 {
            e.ecx &= !(1 << 27);
        }
    }
    assert_eq!(check_offered(&baseline, &host), Ok(()));
    // A bit without a name is still named.
    let mut odd = build(CpuTemplate::Baseline, &everything()).expect("offered");
    for e in odd.as_mut_slice() {
        if e.function == 7 && e.index == 0 {
            e.ebx |= 1 << 2;
        }
    }
    let mut host = everything();
    for e in host.as_mut_slice() {
        if e.function == 7 && e.index == 0 {
            e.ebx &= !(1 << 2);
        }
    }
    let err = check_offered(&odd, &host).expect_err("refused");
    assert!(err.to_string().contains("leaf 0x7 ebx bit 2"), "{err}");
}

#[test]
fn templates_are_named_as_in_configurations() {
    for t in CpuTemplate::ALL {
        assert_eq!(t.name().parse::<CpuTemplate>(), Ok(t));
        let toml = format!("t = \"{}\"", t.name());
        #[derive(serde::Deserialize)]
        struct W {
            t: CpuTemplate,
        }
        let w: W = toml::from_str(&toml).expect("parses");
        assert_eq!(w.t, t);
    }
    let err = "skylake".parse::<CpuTemplate>().expect_err("unknown");
    assert!(
        err.to_string().contains("host, baseline, emulated-kernel"),
        "{err}"
    );
}

#[test]
fn this_hosts_kvm_offers_the_templates_or_says_what_it_lacks() {
    let Ok(kvm) = kvm_ioctls::Kvm::new() else {
        assert!(
            std::env::var_os("FTVM_REQUIRE_KVM").is_none(),
            "FTVM_REQUIRE_KVM is set but /dev/kvm cannot be opened"
        );
        eprintln!("skipped: no /dev/kvm");
        return;
    };
    let supported = kvm
        .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
        .expect("KVM_GET_SUPPORTED_CPUID");
    eprintln!("this host's KVM offers: {}", offered(&supported).join(" "));
    for t in CpuTemplate::ALL {
        match build(t, &supported) {
            Ok(cpuid) => {
                assert_eq!(check_offered(&cpuid, &supported), Ok(()), "{t}");
                eprintln!("{t}: {}", offered(&cpuid).join(" "));
            }
            Err(e) => {
                assert!(matches!(e, TemplateError::HostLacks { .. }), "{e}");
                eprintln!("{t}: {e}");
            }
        }
    }
}
