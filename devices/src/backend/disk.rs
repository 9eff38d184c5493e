//! A raw disk image file.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// Sector size of the virtio-blk interface.
pub const SECTOR_SIZE: u64 = 512;

/// Errors opening a disk image.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    /// The image cannot be opened.
    #[error("cannot open disk image {path}: {source}")]
    Open {
        /// The image.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// The image is smaller than one sector.
    #[error("disk image {0} is smaller than one 512-byte sector")]
    TooSmall(PathBuf),
}

/// An open raw image.
#[derive(Debug)]
pub struct DiskFile {
    file: File,
    path: PathBuf,
    read_only: bool,
    capacity_sectors: u64,
}

impl DiskFile {
    /// Opens `path`, read-only if `read_only`. The capacity is the file size in whole
    /// sectors.
    pub fn open(path: &Path, read_only: bool) -> Result<Self, DiskError> {
        let open_err = |source| DiskError::Open {
            path: path.to_path_buf(),
            source,
        };
        let file = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(path)
            .map_err(open_err)?;
        let len = file.metadata().map_err(open_err)?.len();
        if len < SECTOR_SIZE {
            return Err(DiskError::TooSmall(path.to_path_buf()));
        }
        Ok(Self {
            file,
            path: path.to_path_buf(),
            read_only,
            capacity_sectors: len / SECTOR_SIZE,
        })
    }

    /// The image's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether the guest may not write.
    pub fn read_only(&self) -> bool {
        self.read_only
    }

    /// Capacity in 512-byte sectors.
    pub fn capacity_sectors(&self) -> u64 {
        self.capacity_sectors
    }

    /// Reads `buf.len()` bytes at `offset`.
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }

    /// Writes `data` at `offset`.
    pub fn write_at(&self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        if self.read_only {
            return Err(std::io::Error::from(std::io::ErrorKind::PermissionDenied));
        }
        self.file.write_all_at(data, offset)
    }

    /// Makes written data durable.
    pub fn flush(&self) -> std::io::Result<()> {
        if self.read_only {
            return Ok(());
        }
        self.file.sync_data()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capacity_read_write_and_read_only() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.img");
        std::fs::write(&p, vec![0u8; 4096 + 100]).unwrap();
        let d = DiskFile::open(&p, false).unwrap();
        assert_eq!(d.capacity_sectors(), 8);
        d.write_at(1024, b"xyz").unwrap();
        d.flush().unwrap();
        let ro = DiskFile::open(&p, true).unwrap();
        let mut b = [0u8; 3];
        ro.read_at(1024, &mut b).unwrap();
        assert_eq!(&b, b"xyz");
        assert!(ro.write_at(0, b"no").is_err());
    }

    #[test]
    fn missing_and_tiny_images_are_clear_errors() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.img");
        let e = DiskFile::open(&missing, false).unwrap_err().to_string();
        assert!(
            e.contains("cannot open disk image") && e.contains("missing.img"),
            "{e}"
        );
        let tiny = dir.path().join("tiny.img");
        std::fs::write(&tiny, [0u8; 10]).unwrap();
        assert!(matches!(
            DiskFile::open(&tiny, false),
            Err(DiskError::TooSmall(_))
        ));
    }
}
