//! A small ext4 file system on a loop device, for tests of a replica whose file system
//! freezes or fills up; unmounted on drop.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

/// A loop-mounted ext4 file system.
pub struct LoopFs {
    /// Where it is mounted.
    pub mount: PathBuf,
}

/// Runs `cmd` with `args`; its stderr on failure.
pub fn run(cmd: &str, args: &[&str]) -> Result<(), String> {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .map_err(|e| format!("{cmd}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{cmd} {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

impl LoopFs {
    /// Makes and mounts a file system of `mib` MiB in `dir`.
    pub fn create(dir: &Path, mib: u64) -> Result<Self, String> {
        let image = dir.join("fs.img");
        let mount = dir.join("loopfs");
        std::fs::create_dir_all(&mount).map_err(|e| e.to_string())?;
        let f = std::fs::File::create(&image).map_err(|e| e.to_string())?;
        f.set_len(mib << 20).map_err(|e| e.to_string())?;
        run("mkfs.ext4", &["-q", "-F", &image.display().to_string()])?;
        run(
            "mount",
            &[
                "-o",
                "loop",
                &image.display().to_string(),
                &mount.display().to_string(),
            ],
        )?;
        Ok(Self { mount })
    }

    /// A file system of `mib` MiB for `test`: under FTVM_REQUIRE_KVM=1 a failure
    /// panics; otherwise the test prints why it skips and gets `None`.
    pub fn for_test(test: &str, dir: &Path, mib: u64) -> Option<Self> {
        match Self::create(dir, mib) {
            Ok(fs) => Some(fs),
            Err(e) if std::env::var("FTVM_REQUIRE_KVM").as_deref() != Ok("1") => {
                eprintln!("{test}: SKIPPED: no loop-mounted filesystem: {e}");
                None
            }
            Err(e) => panic!("{test}: FTVM_REQUIRE_KVM=1 but no loop-mounted filesystem: {e}"),
        }
    }

    /// Freezes (or thaws) it with fsfreeze: writes block until thawed.
    pub fn freeze(&self, frozen: bool) {
        let flag = if frozen { "-f" } else { "-u" };
        run("fsfreeze", &[flag, &self.mount.display().to_string()]).expect("fsfreeze");
    }

    /// Fills it: a file takes every free block; returns the bytes it took.
    pub fn fill(&self) -> u64 {
        use std::io::Write;
        let path = self.mount.join("filler");
        let mut f = std::fs::File::create(&path).expect("filler");
        let chunk = vec![0xa5u8; 1 << 20];
        let mut written = 0u64;
        loop {
            match f.write(&chunk) {
                Ok(0) | Err(_) => break,
                Ok(n) => written += n as u64,
            }
        }
        // Whatever the page cache accepted must reach the blocks too.
        let _ = f.sync_all();
        written
    }
}

impl Drop for LoopFs {
    fn drop(&mut self) {
        let m = self.mount.display().to_string();
        let _ = run("fsfreeze", &["-u", &m]);
        let _ = run("umount", &["-l", &m]);
    }
}
