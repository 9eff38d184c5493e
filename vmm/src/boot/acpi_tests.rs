use std::process::Command;

use super::*;

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

fn sums_to_zero(b: &[u8]) -> bool {
    b.iter().fold(0u8, |a, x| a.wrapping_add(*x)) == 0
}

fn by_signature<'a>(tables: &'a [Table], sig: &str) -> &'a Table {
    tables
        .iter()
        .find(|t| t.signature == sig)
        .unwrap_or_else(|| panic!("no {sig}"))
}

const MACHINE: Machine = Machine { virtio_devices: 2 };

#[test]
fn every_table_has_its_length_and_a_zero_checksum_and_they_do_not_overlap() {
    let tables = tables(&MACHINE);
    let rsdp = by_signature(&tables, "RSD PTR ");
    assert_eq!(rsdp.bytes.len(), 36);
    assert!(sums_to_zero(&rsdp.bytes[..20]), "RSDP v1 checksum");
    assert!(sums_to_zero(&rsdp.bytes), "RSDP extended checksum");
    assert_eq!(rsdp.bytes[15], 2, "ACPI 2.0+ RSDP");
    for t in tables.iter().filter(|t| t.signature != "RSD PTR ") {
        assert_eq!(&t.bytes[..4], t.signature.as_bytes());
        assert_eq!(
            u32_at(&t.bytes, 4) as usize,
            t.bytes.len(),
            "{} length",
            t.signature
        );
        assert!(sums_to_zero(&t.bytes), "{} checksum", t.signature);
        assert_eq!(&t.bytes[10..16], b"FTVM  ");
    }
    let mut spans: Vec<(u64, u64)> = tables
        .iter()
        .map(|t| (t.address, t.address + t.bytes.len() as u64))
        .collect();
    spans.sort_unstable();
    for w in spans.windows(2) {
        assert!(w[0].1 <= w[1].0, "overlap: {spans:x?}");
    }
    assert_eq!(spans[0].0, layout::ACPI_RSDP);
    assert!(spans.last().expect("tables").1 <= layout::ACPI_END);
    assert!(tables.iter().all(|t| t.address % 16 == 0));
}

#[test]
fn the_rsdp_leads_to_every_table() {
    let tables = tables(&MACHINE);
    let xsdt_addr = u64_at(&by_signature(&tables, "RSD PTR ").bytes, 24);
    let xsdt = by_signature(&tables, "XSDT");
    assert_eq!(xsdt.address, xsdt_addr);
    let entries: Vec<u64> = (36..xsdt.bytes.len())
        .step_by(8)
        .map(|at| u64_at(&xsdt.bytes, at))
        .collect();
    let fadt = by_signature(&tables, "FACP");
    let madt = by_signature(&tables, "APIC");
    assert_eq!(entries, vec![fadt.address, madt.address]);
    // X_DSDT at offset 140 of the FADT.
    assert_eq!(
        u64_at(&fadt.bytes, 140),
        by_signature(&tables, "DSDT").address
    );
}

#[test]
fn the_fadt_is_hardware_reduced_with_the_platform_sleep_and_reset_registers() {
    let tables = tables(&MACHINE);
    let fadt = &by_signature(&tables, "FACP").bytes;
    let flags = u32_at(fadt, 112);
    assert_ne!(flags & (1 << 20), 0, "HW_REDUCED_ACPI");
    assert_ne!(flags & (1 << 10), 0, "RESET_REG_SUP");
    // A GAS: space id (1 = system I/O), bit width, offset, access size, address.
    let gas = |at: usize| (fadt[at], fadt[at + 1], fadt[at + 3], u64_at(fadt, at + 4));
    let port = |r: u64| u64::from(PLATFORM_PORT_BASE) + r;
    assert_eq!(gas(116), (1, 8, 1, port(reg::RESET)), "RESET_REG");
    assert_eq!(fadt[128], RESET_VALUE);
    assert_eq!(
        gas(244),
        (1, 8, 1, port(reg::SLEEP_CONTROL)),
        "SLEEP_CONTROL_REG"
    );
    assert_eq!(
        gas(256),
        (1, 8, 1, port(reg::SLEEP_STATUS)),
        "SLEEP_STATUS_REG"
    );
    assert_eq!(
        u16_at(fadt, 109),
        (1 << 2) | (1 << 5),
        "no VGA, no CMOS RTC"
    );
}

#[test]
fn the_madt_names_the_lapic_the_ioapic_the_timer_override_and_the_nmi() {
    let tables = tables(&MACHINE);
    let madt = &by_signature(&tables, "APIC").bytes;
    assert_eq!(u32_at(madt, 36), layout::LAPIC_BASE as u32);
    assert_eq!(u32_at(madt, 40), 1, "PCAT_COMPAT");
    let mut structures = Vec::new();
    let mut at = 44;
    while at < madt.len() {
        let (kind, len) = (madt[at], madt[at + 1] as usize);
        structures.push((kind, madt[at..at + len].to_vec()));
        at += len;
    }
    assert_eq!(at, madt.len(), "structures fill the table exactly");
    let kinds: Vec<u8> = structures.iter().map(|(k, _)| *k).collect();
    assert_eq!(kinds, vec![0, 1, 2, 4]);
    let lapic = &structures[0].1;
    assert_eq!(
        (lapic[2], lapic[3], u32_at(lapic, 4)),
        (0, 0, 1),
        "uid 0, id 0, enabled"
    );
    let ioapic = &structures[1].1;
    assert_eq!((u32_at(ioapic, 4), u32_at(ioapic, 8)), (IOAPIC_BASE, 0));
    let iso = &structures[2].1;
    assert_eq!(
        (iso[2], iso[3], u32_at(iso, 4)),
        (0, 0, 2),
        "ISA IRQ 0 -> GSI 2"
    );
    let nmi = &structures[3].1;
    assert_eq!((nmi[2], nmi[5]), (0xff, 1), "LINT1 of all processors");
}

/// Disassembles `table` with ACPICA's `iasl` (Debian's acpica-tools), the decoder
/// Linux's own ACPI code comes from; `None` when it is not installed here.
fn iasl_disassemble(table: &Table) -> Option<String> {
    if Command::new("iasl").arg("-v").output().is_err() {
        assert!(
            std::env::var("FTVM_REQUIRE_KVM").as_deref() != Ok("1"),
            "iasl (acpica-tools) is required under FTVM_REQUIRE_KVM=1"
        );
        eprintln!("SKIPPED: iasl (acpica-tools) is not installed");
        return None;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let name = table.signature.trim().to_lowercase();
    let dat = dir.path().join(format!("{name}.dat"));
    std::fs::write(&dat, &table.bytes).expect("write table");
    let out = Command::new("iasl")
        .arg("-d")
        .arg(&dat)
        .current_dir(dir.path())
        .output()
        .expect("run iasl");
    let dsl = std::fs::read_to_string(dir.path().join(format!("{name}.dsl")));
    let log =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "iasl failed on {}:\n{log}",
        table.signature
    );
    assert!(!log.contains("Invalid checksum"), "{log}");
    Some(dsl.unwrap_or_else(|e| panic!("no disassembly of {}: {e}\n{log}", table.signature)))
}

/// The disassembly without its `//` comments and the whitespace that varies between
/// iasl versions.
fn squeezed(s: &str) -> String {
    s.lines()
        .map(|l| l.split("//").next().unwrap_or(""))
        .flat_map(str::split_whitespace)
        .collect::<Vec<_>>()
        .join(" ")
}

#[test]
fn acpica_decodes_the_dsdt_with_com1_and_every_virtio_device() {
    let tables = tables(&Machine { virtio_devices: 3 });
    let Some(dsl) = iasl_disassemble(by_signature(&tables, "DSDT")) else {
        return;
    };
    let s = squeezed(&dsl);
    assert!(s.contains("Device (COM1)"), "{dsl}");
    assert!(s.contains("EisaId (\"PNP0501\")"), "{dsl}");
    assert!(
        s.contains("IO (Decode16, 0x03F8, 0x03F8, 0x01, 0x08, )"),
        "{dsl}"
    );
    for i in 0..3u32 {
        let base = 0xd000_0000u32 + i * 0x1000;
        assert!(s.contains(&format!("Device (V00{i})")), "{dsl}");
        assert!(
            s.contains(&format!(
                "Memory32Fixed (ReadWrite, 0x{base:08X}, 0x00001000, )"
            )),
            "device {i}: {dsl}"
        );
        assert!(
            s.contains(&format!(
                "Interrupt (ResourceConsumer, Edge, ActiveHigh, Exclusive, ,, ) {{ 0x{:08X}, }}",
                5 + i
            )),
            "device {i}: {dsl}"
        );
    }
    assert_eq!(s.matches("\"LNRO0005\"").count(), 3, "{dsl}");
    assert!(
        s.contains("Name (_S5, Package (0x02) { 0x05, Zero })"),
        "{dsl}"
    );
}

#[test]
fn acpica_decodes_the_fadt_and_madt_without_complaint() {
    let tables = tables(&MACHINE);
    let Some(fadt) = iasl_disassemble(by_signature(&tables, "FACP")) else {
        return;
    };
    let f = squeezed(&fadt);
    assert!(f.contains("Hardware Reduced (V5) : 1"), "{fadt}");
    assert!(f.contains("Address : 000000000000063A"), "{fadt}");
    let madt = iasl_disassemble(by_signature(&tables, "APIC")).expect("iasl present");
    let m = squeezed(&madt);
    assert!(m.contains("Address : FEC00000"), "{madt}");
    assert!(m.contains("Interrupt : 00000002"), "{madt}");
}

#[test]
fn the_tables_are_written_to_guest_memory_and_too_many_devices_are_refused() {
    let mem = crate::memory::allocate(16).expect("memory");
    let rsdp = write(&mem, &MACHINE).expect("written");
    assert_eq!(rsdp, layout::ACPI_RSDP);
    for t in tables(&MACHINE) {
        let mut back = vec![0u8; t.bytes.len()];
        mem.read_slice(&mut back, GuestAddress(t.address))
            .expect("read");
        assert_eq!(back, t.bytes, "{}", t.signature);
    }
    let err = write(
        &mem,
        &Machine {
            virtio_devices: 3000,
        },
    )
    .expect_err("too large");
    assert!(matches!(err, BootError::AcpiTooLarge { .. }), "{err}");
}
