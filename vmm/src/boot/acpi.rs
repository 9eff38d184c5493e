//! ACPI tables describing the machine to a distribution kernel, built with the rust-vmm
//! `acpi_tables` crate: RSDP, XSDT, FADT (hardware-reduced ACPI, with the sleep control
//! and reset registers of the platform device, so `poweroff` and `reboot` work), MADT
//! (the local APIC, the IOAPIC, the ISA interrupt override and the LINT1 NMI) and a DSDT
//! naming COM1 and every virtio-mmio device (`LNRO0005`, the id Linux's virtio-mmio
//! driver matches).
//!
//! The tables lie in the legacy BIOS area from [`layout::ACPI_RSDP`], where a kernel that
//! is not told the RSDP's address finds it by scanning; `boot_params.acpi_rsdp_addr`
//! names it too.

use acpi_tables::aml::{
    Device, EISAName, Interrupt, Memory32Fixed, Name, Package, Path, ResourceTemplate, Scope, IO,
};
use acpi_tables::fadt::{FADTBuilder, Flags, PmProfile};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::madt::{
    EnabledStatus, IoApic, LocalInterruptController, ProcessorLocalApic, MADT,
};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::Aml;
use ftvm_devices::platform::{reg, PLATFORM_PORT_BASE};
use ftvm_devices::serial::{COM1_GSI, COM1_PORT_BASE, COM1_PORT_LEN};
use ftvm_devices::virtio;
use ftvm_devices::GuestMem;
use vm_memory::{Bytes, GuestAddress};
use zerocopy::byteorder::little_endian::{U16, U32};
use zerocopy::{Immutable, IntoBytes};

use super::BootError;
use crate::layout;

const OEM_ID: [u8; 6] = *b"FTVM  ";
const OEM_TABLE_ID: [u8; 8] = *b"FTVMMACH";
const OEM_REVISION: u32 = 1;
/// Address of the IOAPIC.
pub const IOAPIC_BASE: u32 = 0xfec0_0000;
/// The SLP_TYP value of S5 (soft off) in `\_S5_`; the platform device powers off when
/// the guest writes it with SLP_EN.
pub const S5_SLP_TYP: u8 = 5;
/// The value the guest writes to the reset register to reboot.
pub const RESET_VALUE: u8 = 1;

/// MADT Interrupt Source Override (type 2).
#[repr(C, packed)]
#[derive(Clone, Copy, Debug, IntoBytes, Immutable)]
struct InterruptSourceOverride {
    r#type: u8,
    length: u8,
    bus: u8,
    source: u8,
    gsi: U32,
    flags: U16,
}

impl Aml for InterruptSourceOverride {
    fn to_aml_bytes(&self, sink: &mut dyn acpi_tables::AmlSink) {
        sink.vec(self.as_bytes());
    }
}

/// MADT Local APIC NMI (type 4).
#[repr(C, packed)]
#[derive(Clone, Copy, Debug, IntoBytes, Immutable)]
struct LocalApicNmi {
    r#type: u8,
    length: u8,
    processor_uid: u8,
    flags: U16,
    lint: u8,
}

impl Aml for LocalApicNmi {
    fn to_aml_bytes(&self, sink: &mut dyn acpi_tables::AmlSink) {
        sink.vec(self.as_bytes());
    }
}

/// One table and where it goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Table {
    /// Its signature ("RSD PTR " for the RSDP, which has no standard header).
    pub signature: String,
    /// Guest-physical address.
    pub address: u64,
    /// Its bytes.
    pub bytes: Vec<u8>,
}

/// The machine the tables describe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Machine {
    /// Number of virtio-mmio devices (slot `i` at `virtio::MMIO_BASE + i * MMIO_SIZE`,
    /// GSI `virtio::GSI_BASE + i`).
    pub virtio_devices: usize,
}

fn aml_bytes(aml: &dyn Aml) -> Vec<u8> {
    let mut v = Vec::new();
    aml.to_aml_bytes(&mut v);
    v
}

/// AML already encoded (a device built in its own scope, whose parts it borrowed).
struct Encoded(Vec<u8>);

impl Aml for Encoded {
    fn to_aml_bytes(&self, sink: &mut dyn acpi_tables::AmlSink) {
        sink.vec(&self.0);
    }
}

/// A device with `_HID`, `_UID` and `_CRS`.
fn device(name: &str, hid: &dyn Aml, uid: u8, resources: Vec<&dyn Aml>) -> Encoded {
    let crs = ResourceTemplate::new(resources);
    let hid = Name::new("_HID".into(), hid);
    let uid = Name::new("_UID".into(), &uid);
    let crs = Name::new("_CRS".into(), &crs);
    Encoded(aml_bytes(&Device::new(
        Path::new(name),
        vec![&hid, &uid, &crs],
    )))
}

/// COM1: a 16550 (`PNP0501`) at its legacy ports and interrupt line.
fn com1() -> Encoded {
    let io = IO::new(COM1_PORT_BASE, COM1_PORT_BASE, 1, COM1_PORT_LEN as u8);
    let irq = Interrupt::new(true, true, false, false, COM1_GSI);
    device("COM1", &EISAName::new("PNP0501"), 0, vec![&io, &irq])
}

/// Virtio-mmio slot `i` (`LNRO0005`): its register window and interrupt line.
fn virtio_mmio(i: usize) -> Encoded {
    let base = virtio::MMIO_BASE + i as u64 * virtio::MMIO_SIZE;
    let window = Memory32Fixed::new(true, base as u32, virtio::MMIO_SIZE as u32);
    // The devices pulse their line: edge-triggered, active high.
    let irq = Interrupt::new(true, true, false, false, virtio::GSI_BASE + i as u32);
    let hid: &'static str = "LNRO0005";
    device(&format!("V{i:03X}"), &hid, i as u8, vec![&window, &irq])
}

/// The DSDT: `\_SB_` with COM1 and the virtio-mmio devices, and `\_S5_`.
fn dsdt(machine: &Machine) -> Vec<u8> {
    let mut table = Sdt::new(*b"DSDT", 36, 6, OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    let mut devices = vec![com1()];
    devices.extend((0..machine.virtio_devices).map(virtio_mmio));
    let children: Vec<&dyn Aml> = devices.iter().map(|d| d as &dyn Aml).collect();
    Scope::new("\\_SB_".into(), children).to_aml_bytes(&mut table);
    // \_S5_: the SLP_TYP values (PM1a, PM1b) of soft off.
    Name::new("_S5_".into(), &Package::new(vec![&S5_SLP_TYP, &0u8])).to_aml_bytes(&mut table);
    table.update_checksum();
    table.as_slice().to_vec()
}

fn fadt(dsdt_addr: u64) -> Vec<u8> {
    let io_byte = |port: u64| {
        GAS::new(
            AddressSpace::SystemIo,
            8,
            0,
            AccessSize::ByteAccess,
            u64::from(PLATFORM_PORT_BASE) + port,
        )
    };
    let mut fadt = FADTBuilder::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION)
        .dsdt_64(dsdt_addr)
        .flag(Flags::HwReducedAcpi)
        .flag(Flags::ResetRegSup)
        .flag(Flags::PwrButton)
        .flag(Flags::SlpButton)
        .preferred_pm_profile(PmProfile::EnterpriseServer);
    fadt.sleep_control_reg = io_byte(reg::SLEEP_CONTROL);
    fadt.sleep_status_reg = io_byte(reg::SLEEP_STATUS);
    fadt.reset_reg = io_byte(reg::RESET);
    fadt.reset_value = RESET_VALUE;
    // IA-PC boot architecture: no VGA (bit 2), no CMOS RTC (bit 5).
    fadt.iapc_boot_arch = ((1u16 << 2) | (1 << 5)).into();
    aml_bytes(&fadt.finalize())
}

fn madt() -> Vec<u8> {
    let mut madt = MADT::new(
        OEM_ID,
        OEM_TABLE_ID,
        OEM_REVISION,
        LocalInterruptController::Address(layout::LAPIC_BASE as u32),
    );
    madt.add_structure(ProcessorLocalApic::new(0, 0, EnabledStatus::Enabled));
    madt.add_structure(IoApic::new(0, IOAPIC_BASE, 0));
    // ISA IRQ 0 (the timer) is wired to GSI 2, as on every PC; flags 0: bus default
    // polarity and trigger.
    madt.add_structure(InterruptSourceOverride {
        r#type: 2,
        length: 10,
        bus: 0,
        source: 0,
        gsi: 2.into(),
        flags: 0.into(),
    });
    // LINT1 of every processor (uid 0xff) is the NMI line.
    madt.add_structure(LocalApicNmi {
        r#type: 4,
        length: 6,
        processor_uid: 0xff,
        flags: 0.into(),
        lint: 1,
    });
    let mut bytes = aml_bytes(&madt);
    // MADT flags: PCAT_COMPAT (the 8259 pair exists and is masked by the guest).
    set_u32(&mut bytes, 40, 1);
    fix_checksum(&mut bytes, 9);
    bytes
}

fn set_u32(bytes: &mut [u8], at: usize, v: u32) {
    bytes[at..at + 4].copy_from_slice(&v.to_le_bytes());
}

/// Sets the byte at `at` so that all bytes of `bytes` sum to zero.
fn fix_checksum(bytes: &mut [u8], at: usize) {
    bytes[at] = 0;
    let sum = bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b));
    bytes[at] = 0u8.wrapping_sub(sum);
}

/// The tables for `machine`, laid out from [`layout::ACPI_RSDP`]: RSDP, XSDT, FADT,
/// MADT, DSDT, each 16-byte aligned.
pub fn tables(machine: &Machine) -> Vec<Table> {
    let align = |a: u64| (a + 15) & !15;
    let rsdp_addr = layout::ACPI_RSDP;
    let xsdt_addr = align(rsdp_addr + Rsdp::len() as u64);
    // The XSDT has two entries: 36 + 2 * 8 bytes.
    let fadt_addr = align(xsdt_addr + 36 + 16);
    let fadt_bytes_len = acpi_tables::fadt::FADT::len() as u64;
    let madt_addr = align(fadt_addr + fadt_bytes_len);
    let madt_bytes = madt();
    let dsdt_addr = align(madt_addr + madt_bytes.len() as u64);
    let dsdt_bytes = dsdt(machine);
    let fadt_bytes = fadt(dsdt_addr);
    let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    xsdt.add_entry(fadt_addr);
    xsdt.add_entry(madt_addr);
    let table = |signature: &str, address, bytes| Table {
        signature: signature.to_string(),
        address,
        bytes,
    };
    vec![
        table(
            "RSD PTR ",
            rsdp_addr,
            aml_bytes(&Rsdp::new(OEM_ID, xsdt_addr)),
        ),
        table("XSDT", xsdt_addr, aml_bytes(&xsdt)),
        table("FACP", fadt_addr, fadt_bytes),
        table("APIC", madt_addr, madt_bytes),
        table("DSDT", dsdt_addr, dsdt_bytes),
    ]
}

/// Writes the tables for `machine` into guest memory; returns the RSDP's address.
pub fn write(mem: &GuestMem, machine: &Machine) -> Result<u64, BootError> {
    let tables = tables(machine);
    let end = tables
        .iter()
        .map(|t| t.address + t.bytes.len() as u64)
        .max()
        .unwrap_or(layout::ACPI_RSDP);
    if end > layout::ACPI_END {
        return Err(BootError::AcpiTooLarge {
            end,
            limit: layout::ACPI_END,
        });
    }
    for t in &tables {
        mem.write_slice(&t.bytes, GuestAddress(t.address))
            .map_err(|_| BootError::Write {
                what: "the ACPI tables",
            })?;
    }
    Ok(layout::ACPI_RSDP)
}

#[cfg(test)]
#[path = "acpi_tests.rs"]
mod tests;
