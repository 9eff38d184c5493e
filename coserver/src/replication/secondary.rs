//! The secondary's replica: a standby VM and this host's disk replica, to which the
//! primary's copy and checkpoints are applied.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use ftvm_vmm::{PageBatch, Standby, VmError};

use crate::protocol::{DiskWrite, Output};

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
    /// A copy message out of order, or a copy that is incomplete.
    #[error("copy message {got} where {expected} was due")]
    CopyOrder {
        /// The index received (or the count announced).
        got: u64,
        /// The index expected (or the count received).
        expected: u64,
    },
    /// A checkpoint that does not follow the last one.
    #[error("checkpoint {got} does not follow {have:?}")]
    Gap {
        /// The epoch received.
        got: u64,
        /// The last epoch applied.
        have: Option<u64>,
    },
}

/// A checkpoint received whole, before it is applied.
#[derive(Debug)]
pub struct Staged {
    /// Epoch.
    pub epoch: u64,
    /// Completes a full copy.
    pub full: bool,
    /// Encoded VM state.
    pub state: Vec<u8>,
    /// Pages.
    pub pages: PageBatch,
    /// Disk writes.
    pub disk_writes: Vec<DiskWrite>,
    /// Whether to make the disk durable.
    pub flush: bool,
    /// For a full checkpoint: the copy messages that preceded it.
    pub copy_messages: u64,
    /// The epoch's outputs.
    pub outputs: Vec<Output>,
}

/// What a secondary hands to its takeover.
pub struct Takeover {
    /// The standby VM.
    pub standby: Standby,
    /// The checkpoint it resumes from.
    pub epoch: u64,
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
    ready: bool,
    /// A copy was started (its first message seen), so a completing checkpoint yields a
    /// whole replica.
    copying: bool,
    /// The next copy message's index.
    copy_next: u64,
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
            .field("ready", &self.ready)
            .finish_non_exhaustive()
    }
}

impl Replica {
    /// Pre-creates the standby VM and opens the disk replica.
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
            ready: false,
            copying: false,
            copy_next: 0,
            inbound: Vec::new(),
            unreleased: Vec::new(),
        })
    }

    /// Whether a full copy is applied (the replica can take over).
    pub fn ready(&self) -> bool {
        self.ready
    }

    /// The last epoch applied.
    pub fn last_epoch(&self) -> Option<u64> {
        self.last_epoch
    }

    /// A new copy begins (or the replica fell behind): it cannot take over until the
    /// copy completes.
    pub fn reset(&mut self) {
        self.ready = false;
        self.copying = false;
        self.copy_next = 0;
        self.last_epoch = None;
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

    /// A full copy begins.
    pub fn start_copy(&mut self) {
        self.reset();
        self.copying = true;
    }

    /// Takes copy message `index` in order (it must be the next of a started copy).
    fn next_copy(&mut self, index: u64) -> Result<(), ReplicaError> {
        self.ready = false;
        if !self.copying || index != self.copy_next {
            return Err(ReplicaError::CopyOrder {
                got: index,
                expected: self.copy_next,
            });
        }
        self.copy_next += 1;
        Ok(())
    }

    /// Applies copied pages (copy message `index`).
    pub fn copy_pages(&mut self, index: u64, batch: &PageBatch) -> Result<(), ReplicaError> {
        self.next_copy(index)?;
        Ok(self.standby.apply_pages(batch)?)
    }

    /// Applies a copied disk range or a write made during the copy (copy message
    /// `index`).
    pub fn copy_disk(&mut self, index: u64, w: &DiskWrite) -> Result<(), ReplicaError> {
        self.next_copy(index)?;
        self.write_disk(w)
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

    /// Checks that a received checkpoint can be applied next (so it may be acknowledged).
    pub fn check(&self, staged: &Staged) -> Result<(), ReplicaError> {
        if staged.full && self.copying && staged.copy_messages != self.copy_next {
            return Err(ReplicaError::CopyOrder {
                got: staged.copy_messages,
                expected: self.copy_next,
            });
        }
        if (staged.full && self.copying) || self.last_epoch.is_some_and(|e| staged.epoch == e + 1) {
            Ok(())
        } else {
            Err(ReplicaError::Gap {
                got: staged.epoch,
                have: self.last_epoch,
            })
        }
    }

    /// Applies a checked checkpoint: pages, state, disk writes (made durable if the guest
    /// flushed). A failure leaves the replica not ready.
    pub fn apply(&mut self, staged: Staged) -> Result<(), ReplicaError> {
        self.check(&staged)?;
        self.ready = false;
        self.standby.apply_pages(&staged.pages)?;
        for w in &staged.disk_writes {
            self.write_disk(w)?;
        }
        if staged.flush || staged.full {
            if let Some((f, path, _)) = &self.disk {
                f.sync_data().map_err(|source| ReplicaError::Disk {
                    path: path.clone(),
                    source,
                })?;
            }
        }
        self.standby.set_state(&staged.state)?;
        self.last_epoch = Some(staged.epoch);
        self.inbound.retain(|(e, _)| *e > staged.epoch);
        if !staged.outputs.is_empty() {
            self.unreleased.push((staged.epoch, staged.outputs));
        }
        self.ready = true;
        self.copying = false;
        Ok(())
    }

    /// Makes the disk replica durable and hands over the standby VM for takeover, with
    /// what the old primary may have left undone: outputs of applied epochs it may not
    /// have released, and frames its guest received after the last applied checkpoint.
    pub fn into_standby(self) -> Result<Takeover, ReplicaError> {
        if let Some((f, path, _)) = &self.disk {
            f.sync_all().map_err(|source| ReplicaError::Disk {
                path: path.clone(),
                source,
            })?;
        }
        Ok(Takeover {
            standby: self.standby,
            epoch: self.last_epoch.unwrap_or(0),
            outputs: self.unreleased.into_iter().flat_map(|(_, o)| o).collect(),
            frames: self.inbound.into_iter().map(|(_, f)| f).collect(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn replica(disk: &Path) -> Option<Replica> {
        match Replica::new(16, Some(disk)) {
            Ok(r) => Some(r),
            Err(e) if std::env::var("FTVM_REQUIRE_KVM").as_deref() != Ok("1") => {
                eprintln!("SKIPPED: cannot create a standby VM: {e}");
                None
            }
            Err(e) => panic!("FTVM_REQUIRE_KVM=1 but no standby VM: {e}"),
        }
    }

    fn staged(epoch: u64, full: bool, copy_messages: u64) -> Staged {
        Staged {
            epoch,
            full,
            state: Vec::new(),
            pages: PageBatch::default(),
            disk_writes: Vec::new(),
            flush: false,
            copy_messages,
            outputs: Vec::new(),
        }
    }

    #[test]
    fn copies_must_arrive_whole_and_in_order_and_checkpoints_must_follow() {
        let dir = tempfile::tempdir().unwrap();
        let disk = dir.path().join("replica.img");
        std::fs::File::create(&disk)
            .unwrap()
            .set_len(1 << 20)
            .unwrap();
        let Some(mut r) = replica(&disk) else { return };
        let w = |offset| DiskWrite {
            offset,
            data: vec![1; 512],
        };
        assert!(r.copy_disk(0, &w(0)).is_err(), "no copy started");
        r.start_copy();
        r.copy_disk(0, &w(0)).unwrap();
        assert!(
            matches!(
                r.copy_disk(2, &w(512)),
                Err(ReplicaError::CopyOrder {
                    got: 2,
                    expected: 1
                })
            ),
            "a skipped message is detected"
        );
        r.start_copy();
        r.copy_disk(0, &w(0)).unwrap();
        r.copy_pages(1, &PageBatch::default()).unwrap();
        assert!(r.check(&staged(7, true, 3)).is_err(), "announced 3, took 2");
        r.check(&staged(7, true, 2)).unwrap();
        assert!(
            r.copy_disk(2, &w((1 << 20) - 256)).is_err(),
            "beyond the replica"
        );
        // Epoch continuity after a copy is applied is checked by `check` as well.
        assert!(
            r.check(&staged(9, false, 0)).is_err(),
            "no epoch applied yet"
        );
        assert!(!r.ready());
    }
}
