//! The secondary's replica: a standby VM and this host's disk replica, to which the
//! primary's copy and checkpoints are applied.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use ftvm_vmm::{PageBatch, Standby, VmError};

use crate::protocol::{CheckpointSegment, DiskWrite, Output};

/// Errors of the replica.
#[derive(Debug, thiserror::Error)]
pub enum ReplicaError {
    /// The standby VM refused something.
    #[error(transparent)]
    Vm(#[from] VmError),
    /// The disk replica failed.
    #[error("disk replica {path}: {source}")]
    Disk {
        /// The file.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// Disk data for a node without a disk, or beyond its end.
    #[error("disk write at {offset} (+{len}) does not fit the replica ({size} bytes)")]
    DiskRange {
        /// Offset.
        offset: u64,
        /// Length.
        len: usize,
        /// Replica size.
        size: u64,
    },
    /// A checkpoint the session rejected (the session checks order first).
    #[error("{0}")]
    Order(#[from] crate::session::ResyncReason),
}

/// What a secondary hands to its takeover.
pub struct Takeover {
    /// The standby VM.
    pub standby: Standby,
    /// Outputs to release before the guest runs.
    pub outputs: Vec<Output>,
    /// Frames to re-deliver to the guest.
    pub frames: Vec<Vec<u8>>,
}

/// The standby VM and disk replica.
pub struct Replica {
    standby: Standby,
    disk: Option<(File, PathBuf, u64)>,
    last_epoch: Option<u64>,
    /// Frames the primary's guest received after the last applied checkpoint.
    inbound: Vec<(u64, Vec<u8>)>,
    /// Outputs of applied epochs the primary has not yet said it released.
    unreleased: Vec<(u64, Vec<Output>)>,
}

/// Frames kept for re-delivery at most.
const MAX_INBOUND: usize = 8192;

impl std::fmt::Debug for Replica {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Replica")
            .field("last_epoch", &self.last_epoch)
            .finish_non_exhaustive()
    }
}

impl Replica {
    /// Pre-creates the standby VM and opens the disk replica (the node has recorded
    /// the replica incomplete before).
    pub fn new(mem_mib: u64, disk: Option<&Path>) -> Result<Self, ReplicaError> {
        let disk = match disk {
            Some(p) => {
                let err = |source| ReplicaError::Disk {
                    path: p.to_path_buf(),
                    source,
                };
                let f = OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open(p)
                    .map_err(err)?;
                let size = f.metadata().map_err(err)?.len();
                Some((f, p.to_path_buf(), size))
            }
            None => None,
        };
        Ok(Self {
            standby: Standby::new(mem_mib)?,
            disk,
            last_epoch: None,
            inbound: Vec::new(),
            unreleased: Vec::new(),
        })
    }

    /// The last epoch applied.
    pub fn last_epoch(&self) -> Option<u64> {
        self.last_epoch
    }

    /// A new copy begins (or the replica fell behind): it cannot take over until the
    /// copy completes.
    pub fn reset(&mut self) {
        self.last_epoch = None;
        // What the primary released or received before the new copy is no business of
        // a takeover from it.
        self.unreleased.clear();
        self.inbound.clear();
    }

    /// Keeps a frame the primary's guest received in `epoch`, unless that epoch's
    /// checkpoint is already applied.
    pub fn note_inbound(&mut self, epoch: u64, frame: Vec<u8>) {
        if self.last_epoch.is_some_and(|e| epoch <= e) || self.inbound.len() >= MAX_INBOUND {
            return;
        }
        self.inbound.push((epoch, frame));
    }

    /// The primary released every epoch up to `epoch`.
    pub fn released(&mut self, epoch: u64) {
        self.unreleased.retain(|(e, _)| *e > epoch);
    }

    /// Applies copied pages (the session checked their order).
    pub fn copy_pages(&mut self, batch: &PageBatch) -> Result<(), ReplicaError> {
        self.last_epoch = None;
        Ok(self.standby.apply_pages(batch)?)
    }

    /// Applies a copied disk range or a write made during the copy. A range of zeros
    /// is punched out of the replica file rather than written: the replica stays as
    /// sparse as the primary's disk, and a full file system shows when the guest
    /// writes there, not before.
    pub fn copy_disk(&mut self, w: &DiskWrite) -> Result<(), ReplicaError> {
        self.last_epoch = None;
        if w.data.len() >= 4096 && w.data.iter().all(|&b| b == 0) && self.punch(w).is_ok() {
            return Ok(());
        }
        self.write_disk(w)
    }

    /// Deallocates a range (reads as zeros); an error leaves it to be written.
    fn punch(&self, w: &DiskWrite) -> std::io::Result<()> {
        use std::os::fd::AsRawFd;
        let Some((f, _, size)) = &self.disk else {
            return Err(std::io::ErrorKind::NotFound.into());
        };
        if w.offset
            .checked_add(w.data.len() as u64)
            .is_none_or(|end| end > *size)
        {
            return Err(std::io::ErrorKind::InvalidInput.into());
        }
        // SAFETY: fallocate on a file descriptor this replica owns, with a range inside
        // the file; it touches no memory of this process.
        let r = unsafe {
            libc::fallocate(
                f.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                w.offset as libc::off_t,
                w.data.len() as libc::off_t,
            )
        };
        if r == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    }

    fn write_disk(&mut self, w: &DiskWrite) -> Result<(), ReplicaError> {
        let Some((f, path, size)) = &self.disk else {
            return Err(ReplicaError::DiskRange {
                offset: w.offset,
                len: w.data.len(),
                size: 0,
            });
        };
        if w.offset
            .checked_add(w.data.len() as u64)
            .is_none_or(|end| end > *size)
        {
            return Err(ReplicaError::DiskRange {
                offset: w.offset,
                len: w.data.len(),
                size: *size,
            });
        }
        f.write_all_at(&w.data, w.offset)
            .map_err(|source| ReplicaError::Disk {
                path: path.clone(),
                source,
            })
    }

    /// Makes every write applied so far durable on the disk replica.
    pub fn sync(&self) -> Result<(), ReplicaError> {
        match &self.disk {
            Some((f, path, _)) => f.sync_data().map_err(|source| ReplicaError::Disk {
                path: path.clone(),
                source,
            }),
            None => Ok(()),
        }
    }

    /// Applies checkpoint `epoch`, checked by the session: pages, disk writes, state.
    /// The writes keep the guest's flush order: those before a flush are durable before
    /// any after it is written, and an epoch holding a flush (or completing a copy) is
    /// durable when this returns, so its acknowledgement may follow. A failure leaves
    /// the replica not ready.
    pub fn apply(&mut self, epoch: u64, staged: CheckpointSegment) -> Result<(), ReplicaError> {
        self.last_epoch = None;
        self.standby.apply_pages(&staged.pages)?;
        let mut flushes = staged.flushes.iter().map(|&n| n as usize).peekable();
        for (i, w) in staged.disk_writes.iter().enumerate() {
            if flushes.next_if(|&n| n <= i).is_some() {
                while flushes.next_if(|&n| n <= i).is_some() {}
                self.sync()?;
            }
            self.write_disk(w)?;
        }
        if flushes.next().is_some() || staged.full {
            self.sync()?;
        }
        self.standby.set_state(&staged.state)?;
        self.last_epoch = Some(epoch);
        self.inbound.retain(|(e, _)| *e > epoch);
        if !staged.outputs.is_empty() {
            self.unreleased.push((epoch, staged.outputs));
        }
        Ok(())
    }

    /// Hands over the standby VM for takeover, with
    /// what the old primary may have left undone: outputs of applied epochs it may not
    /// have released, and frames its guest received after the last applied checkpoint.
    ///
    /// The disk replica is not synced here: every write the guest flushed was made
    /// durable when its checkpoint was applied, and the others may be lost by a crash
    /// as on any disk with a volatile cache; the takeover does not wait for them.
    pub fn into_standby(self) -> Result<Takeover, ReplicaError> {
        Ok(Takeover {
            standby: self.standby,
            outputs: self.unreleased.into_iter().flat_map(|(_, o)| o).collect(),
            frames: self.inbound.into_iter().map(|(_, f)| f).collect(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_replica_applies_in_range_and_a_failed_apply_leaves_it_not_ready() {
        let dir = tempfile::tempdir().unwrap();
        let disk = dir.path().join("replica.img");
        std::fs::File::create(&disk)
            .unwrap()
            .set_len(1 << 20)
            .unwrap();
        let mut r = match Replica::new(16, Some(&disk)) {
            Ok(r) => r,
            Err(e) if std::env::var("FTVM_REQUIRE_KVM").as_deref() != Ok("1") => {
                eprintln!("SKIPPED: cannot create a standby VM: {e}");
                return;
            }
            Err(e) => panic!("FTVM_REQUIRE_KVM=1 but no standby VM: {e}"),
        };
        let w = |offset| DiskWrite {
            offset,
            data: vec![1; 512],
        };
        r.copy_disk(&w(0)).unwrap();
        assert!(
            matches!(
                r.copy_disk(&w((1 << 20) - 256)),
                Err(ReplicaError::DiskRange { .. })
            ),
            "beyond the replica"
        );
        let staged = |full| CheckpointSegment {
            full,
            copy: 3,
            state: Vec::new(),
            pages: PageBatch::default(),
            disk_writes: vec![w(512)],
            flushes: vec![1],
            copy_messages: 1,
            outputs: vec![Output::Console(b"x".to_vec())],
            last_frame: None,
        };
        assert!(
            r.apply(4, staged(true)).is_err(),
            "an empty state does not decode"
        );
        assert_eq!(
            r.last_epoch(),
            None,
            "a failed apply leaves the replica not ready"
        );
        let data = std::fs::read(&disk).unwrap();
        assert_eq!(
            &data[512..1024],
            &[1u8; 512][..],
            "the disk write was applied"
        );
    }
}
