//! Loading a kernel into guest memory: an ELF kernel (vmlinux or the built-in test
//! guest) or a bzImage, entered in 64-bit mode through the Linux 64-bit boot protocol
//! with a command line and an optional initrd.

pub mod acpi;
pub mod cpu;
pub mod linux;

use std::io::Cursor;

use ftvm_devices::GuestMem;
use linux_loader::cmdline::Cmdline;
use linux_loader::loader::{bzimage::BzImage, elf::Elf, KernelLoader};
use vm_memory::GuestAddress;

use crate::layout;

/// Errors of kernel loading.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// The image is neither an ELF file nor a bzImage.
    #[error("the kernel image is neither an ELF executable nor a Linux bzImage")]
    NotAKernel,
    /// The ELF image is not a loadable x86-64 kernel.
    #[error("the ELF kernel cannot be loaded: {0}")]
    Elf(linux_loader::loader::Error),
    /// The bzImage cannot be loaded.
    #[error("the bzImage cannot be loaded: {0}")]
    BzImage(linux_loader::loader::Error),
    /// The bzImage has no 64-bit entry point.
    #[error("the bzImage does not support the 64-bit boot protocol (boot protocol {version:#x}, xloadflags {xloadflags:#x})")]
    Not64Bit {
        /// Boot protocol version of the image.
        version: u16,
        /// Its xloadflags.
        xloadflags: u16,
    },
    /// The kernel does not fit in guest memory.
    #[error("the kernel ends at {end:#x}, beyond the {mem_mib} MiB of guest memory")]
    TooLarge {
        /// End of the kernel image.
        end: u64,
        /// Guest memory size.
        mem_mib: u64,
    },
    /// An ELF segment lies outside guest memory or past the end of the file.
    #[error("the ELF kernel's segments do not fit in {mem_mib} MiB of guest memory, or the file is truncated")]
    ElfSegments {
        /// Guest memory size.
        mem_mib: u64,
    },
    /// The command line is invalid or too long.
    #[error("invalid kernel command line: {0}")]
    Cmdline(linux_loader::cmdline::Error),
    /// The command line could not be written.
    #[error("cannot write the command line into guest memory: {0}")]
    CmdlineWrite(linux_loader::loader::Error),
    /// Writing a boot structure failed.
    #[error("cannot write {what} into guest memory")]
    Write {
        /// What was being written.
        what: &'static str,
    },
    /// The ACPI tables do not fit in their area.
    #[error("the ACPI tables end at {end:#x}, beyond their area's end {limit:#x}")]
    AcpiTooLarge {
        /// End of the tables.
        end: u64,
        /// End of the area.
        limit: u64,
    },
    /// The initrd does not fit.
    #[error("the initrd ({size} bytes) does not fit in guest memory between the kernel end {kernel_end:#x} and {limit:#x}")]
    InitrdTooLarge {
        /// Initrd size.
        size: u64,
        /// End of the kernel.
        kernel_end: u64,
        /// Highest address the initrd may reach.
        limit: u64,
    },
}

/// What the VMM boots.
#[derive(Debug, Clone, Copy)]
pub struct BootImage<'a> {
    /// The kernel file's bytes (ELF or bzImage).
    pub kernel: &'a [u8],
    /// The kernel command line.
    pub cmdline: &'a str,
    /// An optional initial ramdisk.
    pub initrd: Option<&'a [u8]>,
    /// The machine to describe in ACPI tables (written from [`layout::ACPI_RSDP`]), or
    /// `None` for none.
    pub acpi: Option<acpi::Machine>,
}

/// The kind of kernel that was loaded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelKind {
    /// An ELF kernel entered at `e_entry`.
    Elf,
    /// A bzImage entered at its 64-bit entry point.
    BzImage,
}

/// Where to enter the loaded kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BootEntry {
    /// The 64-bit entry point.
    pub entry: u64,
    /// The kind of kernel.
    pub kind: KernelKind,
}

/// Whether `bytes` start like a Linux bzImage ("HdrS" at 0x202).
pub fn is_bzimage(bytes: &[u8]) -> bool {
    bytes.get(0x202..0x206) == Some(b"HdrS")
}

/// Loads the kernel, initrd, command line and boot_params into `mem`, ready for
/// [`cpu::configure`] to enter it.
pub fn load(mem: &GuestMem, mem_mib: u64, image: &BootImage) -> Result<BootEntry, BootError> {
    let cmdline =
        Cmdline::try_from(image.cmdline, layout::CMDLINE_MAX).map_err(BootError::Cmdline)?;
    let himem = Some(GuestAddress(layout::HIMEM_START));
    let (loaded, kind) = if image.kernel.starts_with(b"\x7fELF") {
        let r =
            Elf::load(mem, None, &mut Cursor::new(image.kernel), himem).map_err(|e| match e {
                linux_loader::loader::Error::Elf(
                    linux_loader::loader::elf::Error::ReadKernelImage,
                ) => BootError::ElfSegments { mem_mib },
                e => BootError::Elf(e),
            })?;
        (r, KernelKind::Elf)
    } else if is_bzimage(image.kernel) {
        let r = BzImage::load(mem, None, &mut Cursor::new(image.kernel), himem)
            .map_err(BootError::BzImage)?;
        (r, KernelKind::BzImage)
    } else {
        return Err(BootError::NotAKernel);
    };
    let kernel_end = match kind {
        KernelKind::Elf => loaded.kernel_end,
        KernelKind::BzImage => loaded.kernel_load.0 + image.kernel.len() as u64,
    };
    if !crate::memory::in_ram(
        mem,
        layout::HIMEM_START,
        kernel_end.saturating_sub(layout::HIMEM_START),
    ) {
        return Err(BootError::TooLarge {
            end: kernel_end,
            mem_mib,
        });
    }
    let entry = match (kind, loaded.setup_header) {
        (KernelKind::BzImage, Some(hdr)) => {
            // The 64-bit entry is 0x200 past the protected-mode code, from protocol
            // 2.12 on, when the kernel says it has one (XLF_KERNEL_64).
            let (version, xloadflags) = (hdr.version, hdr.xloadflags);
            if version < 0x020c || xloadflags & 1 == 0 {
                return Err(BootError::Not64Bit {
                    version,
                    xloadflags,
                });
            }
            loaded.kernel_load.0 + 0x200
        }
        _ => loaded.kernel_load.0,
    };
    linux_loader::loader::load_cmdline(mem, GuestAddress(layout::CMDLINE), &cmdline)
        .map_err(BootError::CmdlineWrite)?;
    let initrd = match image.initrd {
        Some(data) => Some(linux::load_initrd(
            mem,
            data,
            kernel_end,
            loaded.setup_header.as_ref(),
        )?),
        None => None,
    };
    let cmdline_len = image.cmdline.len() as u32 + 1;
    let rsdp = match &image.acpi {
        Some(machine) => Some(acpi::write(mem, machine)?),
        None => None,
    };
    linux::write_boot_params(mem, loaded.setup_header, cmdline_len, initrd, rsdp)?;
    cpu::write_boot_tables(mem)?;
    Ok(BootEntry { entry, kind })
}
