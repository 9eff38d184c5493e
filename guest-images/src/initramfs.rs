//! A minimal initramfs for Linux guests on hosts that cannot run Linux userspace.
//!
//! On our development hosts a guest's first system call never reaches its kernel
//! (HOST.md: SYSCALL does not switch to guest kernel mode), so no real `/init` can run.
//! [`idle_initramfs`] holds an `/init` that never makes a system call (`pause` in a
//! loop) and `/dev/console`: the kernel finishes booting, runs it, and keeps serving its
//! devices and network (ARP, ICMP) from interrupts.

/// The idle `/init`'s code: `pause; jmp pause`.
const IDLE: &[u8] = &[0xf3, 0x90, 0xeb, 0xfc];
/// The exiting `/init`'s code: `mov eax, 60; xor edi, edi; syscall; ud2` (exit(0); on a
/// host where its system call faults, the fault kills it just the same).
const EXIT: &[u8] = &[0xb8, 0x3c, 0, 0, 0, 0x31, 0xff, 0x0f, 0x05, 0x0f, 0x0b];

/// The idle `/init` program: a static x86-64 ELF executable whose code is `pause; jmp
/// pause`.
pub fn idle_init_elf() -> Vec<u8> {
    init_elf(IDLE)
}

/// A static x86-64 ELF executable running `code`.
fn init_elf(code: &[u8]) -> Vec<u8> {
    const BASE: u64 = 0x40_0000;
    const EHDR: u64 = 64;
    const PHDR: u64 = 56;
    let entry = BASE + EHDR + PHDR;
    let total = EHDR + PHDR + code.len() as u64;
    let mut elf = Vec::with_capacity(total as usize);
    // ELF header: 64-bit, little endian, version 1, System V ABI; ET_EXEC, x86-64.
    elf.extend_from_slice(&[0x7f, b'E', b'L', b'F', 2, 1, 1, 0]);
    elf.extend_from_slice(&[0; 8]);
    elf.extend_from_slice(&2u16.to_le_bytes()); // e_type: ET_EXEC
    elf.extend_from_slice(&0x3eu16.to_le_bytes()); // e_machine: x86-64
    elf.extend_from_slice(&1u32.to_le_bytes()); // e_version
    elf.extend_from_slice(&entry.to_le_bytes()); // e_entry
    elf.extend_from_slice(&EHDR.to_le_bytes()); // e_phoff
    elf.extend_from_slice(&0u64.to_le_bytes()); // e_shoff
    elf.extend_from_slice(&0u32.to_le_bytes()); // e_flags
    elf.extend_from_slice(&(EHDR as u16).to_le_bytes()); // e_ehsize
    elf.extend_from_slice(&(PHDR as u16).to_le_bytes()); // e_phentsize
    elf.extend_from_slice(&1u16.to_le_bytes()); // e_phnum
    elf.extend_from_slice(&[0; 6]); // e_shentsize, e_shnum, e_shstrndx
                                    // One PT_LOAD of the whole file, read + execute.
    elf.extend_from_slice(&1u32.to_le_bytes()); // p_type: PT_LOAD
    elf.extend_from_slice(&5u32.to_le_bytes()); // p_flags: R | X
    elf.extend_from_slice(&0u64.to_le_bytes()); // p_offset
    elf.extend_from_slice(&BASE.to_le_bytes()); // p_vaddr
    elf.extend_from_slice(&BASE.to_le_bytes()); // p_paddr
    elf.extend_from_slice(&total.to_le_bytes()); // p_filesz
    elf.extend_from_slice(&total.to_le_bytes()); // p_memsz
    elf.extend_from_slice(&0x1000u64.to_le_bytes()); // p_align
    elf.extend_from_slice(code);
    elf
}

/// One entry of a `newc` cpio archive (the format the kernel unpacks).
fn cpio_entry(out: &mut Vec<u8>, ino: u32, name: &str, mode: u32, rdev: (u32, u32), data: &[u8]) {
    let fields = [
        ino,
        mode,
        0, // uid
        0, // gid
        1, // nlink
        0, // mtime
        data.len() as u32,
        0, // devmajor
        0, // devminor
        rdev.0,
        rdev.1,
        name.len() as u32 + 1,
        0, // check
    ];
    out.extend_from_slice(b"070701");
    for f in fields {
        out.extend_from_slice(format!("{f:08x}").as_bytes());
    }
    out.extend_from_slice(name.as_bytes());
    out.push(0);
    while out.len() % 4 != 0 {
        out.push(0);
    }
    out.extend_from_slice(data);
    while out.len() % 4 != 0 {
        out.push(0);
    }
}

/// A `newc` cpio initramfs holding `/dev`, `/dev/console` and the idle `/init`.
pub fn idle_initramfs() -> Vec<u8> {
    initramfs(&idle_init_elf())
}

/// An initramfs whose `/init` exits at once: the kernel then panics ("Attempted to kill
/// init"), and with `panic=-1` reboots, which ends `ftvm run` (boot benchmarks use it).
pub fn exiting_initramfs() -> Vec<u8> {
    initramfs(&init_elf(EXIT))
}

fn initramfs(init: &[u8]) -> Vec<u8> {
    const DIR: u32 = 0o040_755;
    const CHAR_DEVICE: u32 = 0o020_600;
    const EXECUTABLE: u32 = 0o100_755;
    let mut out = Vec::new();
    cpio_entry(&mut out, 1, "dev", DIR, (0, 0), &[]);
    cpio_entry(&mut out, 2, "dev/console", CHAR_DEVICE, (5, 1), &[]);
    cpio_entry(&mut out, 3, "init", EXECUTABLE, (0, 0), init);
    cpio_entry(&mut out, 0, "TRAILER!!!", 0, (0, 0), &[]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Serialises the tests that write an executable and then run it. While one test
    /// holds its new file open for writing, a `fork` in another test's spawn copies
    /// that descriptor into the child until the child's `exec`, and an `exec` of the
    /// file in that window fails with "Text file busy" (ETXTBSY).
    static WRITE_THEN_EXEC: std::sync::Mutex<()> = std::sync::Mutex::new(());

    /// Writes `elf` as an executable file in a fresh temporary directory and runs
    /// `check` on its path; the directory is removed after.
    fn with_executable(name: &str, elf: &[u8], check: impl FnOnce(&std::path::Path)) {
        let _one_at_a_time = WRITE_THEN_EXEC
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let dir = std::env::temp_dir().join(format!("ftvm-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join("init");
        std::fs::write(&path, elf).expect("write");
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .expect("chmod");
        check(&path);
        std::fs::remove_dir_all(&dir).expect("clean up");
    }

    #[test]
    fn the_init_is_an_executable_the_host_can_run() {
        // The host kernel loads and starts it: it then spins, so it is killed.
        with_executable("idle-init", &idle_init_elf(), |path| {
            let mut child = std::process::Command::new(path)
                .spawn()
                .expect("exec the init");
            std::thread::sleep(std::time::Duration::from_millis(200));
            assert!(
                child.try_wait().expect("wait").is_none(),
                "it keeps running"
            );
            child.kill().expect("kill");
            child.wait().expect("reap");
        });
    }

    #[test]
    fn the_exiting_init_exits_with_status_0_on_the_host() {
        with_executable("exit-init", &init_elf(EXIT), |path| {
            let status = std::process::Command::new(path).status().expect("exec");
            assert_eq!(status.code(), Some(0));
        });
    }

    #[test]
    fn the_archive_lists_its_entries_in_newc_form() {
        let a = idle_initramfs();
        assert_eq!(a.len() % 4, 0);
        let text = String::from_utf8_lossy(&a);
        assert_eq!(text.matches("070701").count(), 4);
        for name in ["dev\0", "dev/console\0", "init\0", "TRAILER!!!\0"] {
            assert!(text.contains(name), "{name}");
        }
        // The init's size field is its ELF's length.
        let at = a
            .windows(5)
            .position(|w| w == b"init\0")
            .expect("init entry");
        let header = &a[at - 110..at];
        let size = u32::from_str_radix(std::str::from_utf8(&header[54..62]).unwrap(), 16).unwrap();
        assert_eq!(size as usize, idle_init_elf().len());
    }
}
