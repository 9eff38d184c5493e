//! The Linux 64-bit boot protocol structures: boot_params (zero page) with its setup
//! header, e820 map and command line pointer, and initrd placement.

use ftvm_devices::GuestMem;
use linux_loader::configurator::{linux::LinuxBootConfigurator, BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use super::BootError;
use crate::layout::{self, PAGE_SIZE};

/// e820 type of usable RAM.
pub const E820_RAM: u32 = 1;
/// `type_of_loader` for a loader without an assigned id.
const LOADER_UNDEFINED: u8 = 0xff;
/// "HdrS".
const HDRS_MAGIC: u32 = 0x5372_6448;
/// Highest initrd address of kernels that do not state one (protocol < 2.03).
const DEFAULT_INITRD_ADDR_MAX: u64 = 0x37ff_ffff;
/// `loadflags` bit: the kernel may use the heap up to `heap_end_ptr`; set so the kernel
/// knows the loader is 2.01+.
const CAN_USE_HEAP: u8 = 0x80;

/// The e820 map of `mem`: conventional memory below the EBDA, then RAM from 1 MiB in
/// every region.
pub fn e820_map(mem: &GuestMem) -> Vec<boot_e820_entry> {
    let mut map = vec![boot_e820_entry {
        addr: 0,
        size: layout::EBDA_START,
        r#type: E820_RAM,
    }];
    for region in mem.iter() {
        let start = region.start_addr().0.max(layout::HIMEM_START);
        let end = region.start_addr().0 + region.len();
        if end > start {
            map.push(boot_e820_entry {
                addr: start,
                size: end - start,
                r#type: E820_RAM,
            });
        }
    }
    map
}

/// Writes boot_params at [`layout::ZERO_PAGE`]: the kernel's own setup header (for a
/// bzImage) completed with the loader's fields, the command line pointer, the initrd
/// and the e820 map.
pub fn write_boot_params(
    mem: &GuestMem,
    header: Option<setup_header>,
    cmdline_len: u32,
    initrd: Option<(u64, u64)>,
    acpi_rsdp: Option<u64>,
) -> Result<(), BootError> {
    let mut params = boot_params::default();
    if let Some(h) = header {
        params.hdr = h;
    } else {
        params.hdr.kernel_alignment = 0x0100_0000;
    }
    params.hdr.type_of_loader = LOADER_UNDEFINED;
    params.hdr.boot_flag = 0xaa55;
    params.hdr.header = HDRS_MAGIC;
    params.hdr.loadflags |= CAN_USE_HEAP;
    params.hdr.cmd_line_ptr = layout::CMDLINE as u32;
    params.hdr.cmdline_size = cmdline_len;
    if let Some((addr, size)) = initrd {
        params.hdr.ramdisk_image = addr as u32;
        params.hdr.ramdisk_size = size as u32;
    }
    if let Some(rsdp) = acpi_rsdp {
        params.acpi_rsdp_addr = rsdp;
    }
    let map = e820_map(mem);
    params.e820_entries = map.len() as u8;
    for (slot, entry) in params.e820_table.iter_mut().zip(map) {
        *slot = entry;
    }
    LinuxBootConfigurator::write_bootparams::<GuestMem>(
        &BootParams::new::<boot_params>(&params, GuestAddress(layout::ZERO_PAGE)),
        mem,
    )
    .map_err(|_| BootError::Write {
        what: "boot_params",
    })
}

/// Places the initrd at the highest page-aligned address below both the end of low
/// RAM and the kernel's `initrd_addr_max`, above the kernel. Returns (address, size).
pub fn load_initrd(
    mem: &GuestMem,
    data: &[u8],
    kernel_end: u64,
    header: Option<&setup_header>,
) -> Result<(u64, u64), BootError> {
    let size = data.len() as u64;
    let addr_max = match header.map(|h| h.initrd_addr_max) {
        Some(m) if m != 0 => u64::from(m),
        _ => DEFAULT_INITRD_ADDR_MAX,
    };
    let low_end = mem
        .iter()
        .next()
        .map(|r| r.start_addr().0 + r.len())
        .unwrap_or(0);
    let limit = low_end.min(addr_max + 1);
    let too_large = BootError::InitrdTooLarge {
        size,
        kernel_end,
        limit,
    };
    let addr = limit.checked_sub(size).ok_or(too_large)? & !(PAGE_SIZE - 1);
    if addr < kernel_end {
        return Err(BootError::InitrdTooLarge {
            size,
            kernel_end,
            limit,
        });
    }
    mem.write_slice(data, GuestAddress(addr))
        .map_err(|_| BootError::Write { what: "the initrd" })?;
    Ok((addr, size))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::boot::{load, BootImage, KernelKind};
    use crate::memory;

    /// A minimal bzImage: 4 setup sectors + boot sector, a "HdrS" setup header of
    /// protocol 2.15 with a 64-bit entry, and 8 KiB of "kernel".
    fn fake_bzimage() -> Vec<u8> {
        let setup_sects = 4u8;
        let mut img = vec![0u8; (setup_sects as usize + 1) * 512 + 8192];
        img[0x1f1] = setup_sects;
        img[0x1fe] = 0x55;
        img[0x1ff] = 0xaa;
        img[0x202..0x206].copy_from_slice(b"HdrS");
        img[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes());
        img[0x211] = 0x01; // loadflags: LOADED_HIGH
        img[0x214..0x218].copy_from_slice(&0x10_0000u32.to_le_bytes()); // code32_start
        img[0x22c..0x230].copy_from_slice(&0x7fff_ffffu32.to_le_bytes()); // initrd_addr_max
        img[0x236..0x238].copy_from_slice(&0x0001u16.to_le_bytes()); // xloadflags: KERNEL_64
        let kernel_start = (setup_sects as usize + 1) * 512;
        img[kernel_start..kernel_start + 4].copy_from_slice(b"KERN");
        img
    }

    fn zero_page(mem: &GuestMem) -> boot_params {
        mem.read_obj(GuestAddress(layout::ZERO_PAGE)).unwrap()
    }

    #[test]
    fn bzimage_is_loaded_with_the_64_bit_protocol() {
        let mem = memory::allocate(64).unwrap();
        let initrd = vec![0xabu8; 3 * 4096 + 17];
        let entry = load(
            &mem,
            64,
            &BootImage {
                kernel: &fake_bzimage(),
                cmdline: "console=ttyS0 panic=1",
                initrd: Some(&initrd),
                acpi: None,
            },
        )
        .unwrap();
        assert_eq!(entry.kind, KernelKind::BzImage);
        assert_eq!(
            entry.entry, 0x10_0200,
            "64-bit entry is code32_start + 0x200"
        );
        let mut kern = [0u8; 4];
        mem.read_slice(&mut kern, GuestAddress(0x10_0000)).unwrap();
        assert_eq!(&kern, b"KERN");

        let p = zero_page(&mem);
        let hdr = p.hdr;
        assert_eq!({ hdr.header }, HDRS_MAGIC);
        assert_eq!({ hdr.boot_flag }, 0xaa55);
        assert_eq!({ hdr.type_of_loader }, 0xff);
        assert_eq!({ hdr.version }, 0x020f, "the kernel's own header is kept");
        assert_eq!({ hdr.cmd_line_ptr }, layout::CMDLINE as u32);
        assert_eq!({ hdr.cmdline_size }, 22);
        let mut cmd = [0u8; 22];
        mem.read_slice(&mut cmd, GuestAddress(layout::CMDLINE))
            .unwrap();
        assert_eq!(&cmd, b"console=ttyS0 panic=1\0");

        let (rd_addr, rd_size) = ({ hdr.ramdisk_image } as u64, { hdr.ramdisk_size } as u64);
        assert_eq!(rd_size, initrd.len() as u64);
        assert_eq!(rd_addr % PAGE_SIZE, 0);
        assert!(rd_addr + rd_size <= 64 << 20);
        assert!(
            rd_addr + rd_size > (64 << 20) - PAGE_SIZE,
            "placed at the top of RAM"
        );
        let mut rd = vec![0u8; initrd.len()];
        mem.read_slice(&mut rd, GuestAddress(rd_addr)).unwrap();
        assert_eq!(rd, initrd);

        assert_eq!(p.e820_entries, 2);
        let e = p.e820_table;
        assert_eq!(
            ({ e[0].addr }, { e[0].size }, { e[0].r#type }),
            (0, layout::EBDA_START, E820_RAM)
        );
        assert_eq!(
            ({ e[1].addr }, { e[1].size }, { e[1].r#type }),
            (
                layout::HIMEM_START,
                (64 << 20) - layout::HIMEM_START,
                E820_RAM
            )
        );
    }

    #[test]
    fn e820_covers_ram_above_the_mmio_hole() {
        let mem = memory::allocate(4096 + 512).unwrap();
        let map = e820_map(&mem);
        assert_eq!(map.len(), 3);
        assert_eq!(
            ({ map[1].addr }, { map[1].size }),
            (
                layout::HIMEM_START,
                layout::MMIO_HOLE_START - layout::HIMEM_START
            )
        );
        assert_eq!(
            ({ map[2].addr }, { map[2].size }),
            (layout::MMIO_HOLE_END, (1 << 30) + (512 << 20))
        );
    }

    #[test]
    fn old_or_32_bit_only_bzimage_is_refused() {
        let mem = memory::allocate(64).unwrap();
        let mut img = fake_bzimage();
        img[0x236] = 0; // no XLF_KERNEL_64
        let err = load(
            &mem,
            64,
            &BootImage {
                kernel: &img,
                cmdline: "",
                initrd: None,
                acpi: None,
            },
        )
        .unwrap_err();
        assert!(matches!(err, BootError::Not64Bit { .. }), "{err}");
    }

    #[test]
    fn initrd_that_cannot_fit_is_refused() {
        let mem = memory::allocate(16).unwrap();
        let initrd = vec![0u8; 15 << 20];
        let err = load(
            &mem,
            16,
            &BootImage {
                kernel: &fake_bzimage(),
                cmdline: "",
                initrd: Some(&initrd),
                acpi: None,
            },
        )
        .unwrap_err();
        assert!(matches!(err, BootError::InitrdTooLarge { .. }), "{err}");
    }

    #[test]
    fn elf_that_does_not_fit_is_refused() {
        let guest = ftvm_guest_images::TEST_GUEST_ELF;
        // The test guest loads up to ~1.2 MiB: fine in 8 MiB; a truncated file is not.
        let mem = memory::allocate(8).unwrap();
        let entry = load(
            &mem,
            8,
            &BootImage {
                kernel: guest,
                cmdline: "",
                initrd: None,
                acpi: None,
            },
        )
        .unwrap();
        assert_eq!(entry.kind, KernelKind::Elf);
        assert!(entry.entry >= layout::HIMEM_START);
        let truncated = &guest[..guest.len() / 2];
        let err = load(
            &mem,
            8,
            &BootImage {
                kernel: truncated,
                cmdline: "",
                initrd: None,
                acpi: None,
            },
        )
        .unwrap_err();
        assert!(
            matches!(err, BootError::ElfSegments { mem_mib: 8 }),
            "{err}"
        );
    }

    #[test]
    fn garbage_and_bad_cmdline_are_refused() {
        let mem = memory::allocate(16).unwrap();
        let err = load(
            &mem,
            16,
            &BootImage {
                kernel: b"#!/bin/sh\necho hi\n",
                cmdline: "",
                initrd: None,
                acpi: None,
            },
        )
        .unwrap_err();
        assert!(matches!(err, BootError::NotAKernel));
        let long = "x".repeat(layout::CMDLINE_MAX + 1);
        let err = load(
            &mem,
            16,
            &BootImage {
                kernel: &fake_bzimage(),
                cmdline: &long,
                initrd: None,
                acpi: None,
            },
        )
        .unwrap_err();
        assert!(matches!(err, BootError::Cmdline(_)), "{err}");
        let mut truncated_elf = b"\x7fELF\x02\x01\x01".to_vec();
        truncated_elf.resize(40, 0);
        let err = load(
            &mem,
            16,
            &BootImage {
                kernel: &truncated_elf,
                cmdline: "",
                initrd: None,
                acpi: None,
            },
        )
        .unwrap_err();
        assert!(matches!(err, BootError::Elf(_)), "{err}");
    }
}
