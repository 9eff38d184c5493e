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
    /// A message of a copy whose start was never received.
    #[error("message of copy {got} while copy {current} is in progress")]
    CopyUnknown {
        /// The copy named by the message.
        got: u64,
        /// The copy in progress.
        current: u64,
    },
    /// The marker of an incomplete replica cannot be written or removed.
    #[error("replica marker {path}: {source}")]
    Marker {
        /// The marker file.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
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
    /// For a full checkpoint: the copy it completes.
    pub copy: u64,
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

/// A file in the state directory saying this host's memory and disk do not hold a whole
/// copy of the guest: set from the moment a node joins a primary until its first full
/// copy is applied (and again whenever it starts over). A node where it is set never
/// boots the guest on its own, as its disk may be half copied.
#[derive(Debug, Clone)]
pub struct IncompleteMarker {
    path: PathBuf,
}

impl IncompleteMarker {
    /// The marker of the node whose state directory is `state_dir`.
    pub fn new(state_dir: &Path) -> Self {
        Self {
            path: state_dir.join("replica-incomplete"),
        }
    }

    /// Where it lives.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether it is set.
    pub fn is_set(&self) -> bool {
        self.path.exists()
    }

    fn err(&self) -> impl FnOnce(std::io::Error) -> ReplicaError + '_ {
        |source| ReplicaError::Marker {
            path: self.path.clone(),
            source,
        }
    }

    /// Sets it, durably, before anything of a copy touches the replica.
    pub fn set(&self) -> Result<(), ReplicaError> {
        if self.is_set() {
            return Ok(());
        }
        std::fs::write(
            &self.path,
            "this host's replica holds an incomplete copy of the guest; it joins a primary \
             instead of booting the guest from it\n",
        )
        .map_err(self.err())?;
        sync_parent(&self.path).map_err(self.err())
    }

    /// Clears it once a full copy is applied and durable.
    pub fn clear(&self) -> Result<(), ReplicaError> {
        match std::fs::remove_file(&self.path) {
            Ok(()) => sync_parent(&self.path).map_err(self.err()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(self.err()(e)),
        }
    }
}

fn sync_parent(path: &Path) -> std::io::Result<()> {
    match path.parent() {
        Some(dir) => File::open(dir)?.sync_all(),
        None => Ok(()),
    }
}

/// The standby VM and disk replica.
pub struct Replica {
    standby: Standby,
    disk: Option<(File, PathBuf, u64)>,
    marker: IncompleteMarker,
    last_epoch: Option<u64>,
    ready: bool,
    /// The copy in progress (its start seen), so a completing checkpoint yields a whole
    /// replica.
    copying: Option<u64>,
    /// The full copy the applied state descends from.
    copy_id: u64,
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
    /// Sets the incomplete-replica marker, pre-creates the standby VM and opens the disk
    /// replica.
    pub fn new(
        mem_mib: u64,
        disk: Option<&Path>,
        marker: IncompleteMarker,
    ) -> Result<Self, ReplicaError> {
        marker.set()?;
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
            marker,
            last_epoch: None,
            ready: false,
            copying: None,
            copy_id: 0,
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

    /// The full copy the applied state descends from (named in acknowledgements).
    pub fn copy_id(&self) -> u64 {
        self.copy_id
    }

    /// A new copy begins (or the replica fell behind): it cannot take over until the
    /// copy completes.
    pub fn reset(&mut self) -> Result<(), ReplicaError> {
        self.ready = false;
        self.copying = None;
        self.copy_next = 0;
        self.last_epoch = None;
        // What the primary released or received before the new copy is no business of
        // a takeover from it.
        self.unreleased.clear();
        self.inbound.clear();
        self.marker.set()
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

    /// Full copy `copy` begins.
    pub fn start_copy(&mut self, copy: u64) -> Result<(), ReplicaError> {
        self.reset()?;
        self.copying = Some(copy);
        Ok(())
    }

    /// Whether a message of copy `copy` belongs to the copy in progress (`Ok(false)`:
    /// a late message of an earlier copy, or one before any copy began, is ignored).
    fn of_this_copy(&self, copy: u64) -> Result<bool, ReplicaError> {
        match self.copying {
            Some(current) if copy == current => Ok(true),
            Some(current) if copy > current => {
                Err(ReplicaError::CopyUnknown { got: copy, current })
            }
            _ => Ok(false),
        }
    }

    /// Takes copy message `index` of copy `copy` in order (it must be the next of the
    /// copy in progress). `Ok(false)`: stale, ignored.
    fn next_copy(&mut self, copy: u64, index: u64) -> Result<bool, ReplicaError> {
        if !self.of_this_copy(copy)? {
            tracing::debug!(copy, index, "message of an earlier copy ignored");
            return Ok(false);
        }
        self.ready = false;
        if index != self.copy_next {
            return Err(ReplicaError::CopyOrder {
                got: index,
                expected: self.copy_next,
            });
        }
        self.copy_next += 1;
        Ok(true)
    }

    /// Applies copied pages (message `index` of copy `copy`).
    pub fn copy_pages(
        &mut self,
        copy: u64,
        index: u64,
        batch: &PageBatch,
    ) -> Result<(), ReplicaError> {
        if self.next_copy(copy, index)? {
            self.standby.apply_pages(batch)?;
        }
        Ok(())
    }

    /// Applies a copied disk range or a write made during the copy (message `index` of
    /// copy `copy`).
    pub fn copy_disk(&mut self, copy: u64, index: u64, w: &DiskWrite) -> Result<(), ReplicaError> {
        if self.next_copy(copy, index)? {
            self.write_disk(w)?;
        }
        Ok(())
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

    /// Checks whether a received checkpoint can be applied next (so it may be
    /// acknowledged): `Ok(true)` if so, `Ok(false)` if it is stale (of an earlier copy,
    /// or arriving before any copy completed) and is ignored, an error if the replica
    /// cannot follow.
    pub fn check(&self, staged: &Staged) -> Result<bool, ReplicaError> {
        if staged.full {
            if !self.of_this_copy(staged.copy)? {
                return Ok(false);
            }
            if staged.copy_messages != self.copy_next {
                return Err(ReplicaError::CopyOrder {
                    got: staged.copy_messages,
                    expected: self.copy_next,
                });
            }
            return Ok(true);
        }
        match self.last_epoch {
            // Before the first full copy (or while one runs) ordinary checkpoints are
            // those of an earlier copy's primary: nothing to follow yet.
            None => Ok(false),
            Some(_) if self.copying.is_some() => Ok(false),
            Some(e) if staged.epoch == e + 1 => Ok(true),
            Some(e) if staged.epoch <= e => Ok(false),
            Some(_) => Err(ReplicaError::Gap {
                got: staged.epoch,
                have: self.last_epoch,
            }),
        }
    }

    /// Applies a checked checkpoint: pages, state, disk writes (made durable if the guest
    /// flushed). A failure leaves the replica not ready.
    pub fn apply(&mut self, staged: Staged) -> Result<(), ReplicaError> {
        if !self.check(&staged)? {
            return Ok(());
        }
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
        if staged.full {
            self.marker.clear()?;
            self.copy_id = staged.copy;
        }
        self.ready = true;
        self.copying = None;
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

    fn replica(disk: &Path, state: &Path) -> Option<Replica> {
        match Replica::new(16, Some(disk), IncompleteMarker::new(state)) {
            Ok(r) => Some(r),
            Err(e) if std::env::var("FTVM_REQUIRE_KVM").as_deref() != Ok("1") => {
                eprintln!("SKIPPED: cannot create a standby VM: {e}");
                None
            }
            Err(e) => panic!("FTVM_REQUIRE_KVM=1 but no standby VM: {e}"),
        }
    }

    fn staged(epoch: u64, full: bool, copy: u64, copy_messages: u64) -> Staged {
        Staged {
            epoch,
            full,
            copy,
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
        let Some(mut r) = replica(&disk, dir.path()) else {
            return;
        };
        let marker = IncompleteMarker::new(dir.path());
        assert!(marker.is_set(), "set as soon as the node joins");
        let w = |offset| DiskWrite {
            offset,
            data: vec![1; 512],
        };
        r.copy_disk(5, 0, &w(0)).unwrap();
        assert_eq!(r.copy_next, 0, "no copy started: ignored");
        r.start_copy(5).unwrap();
        r.copy_disk(5, 0, &w(0)).unwrap();
        assert!(
            matches!(
                r.copy_disk(5, 2, &w(512)),
                Err(ReplicaError::CopyOrder {
                    got: 2,
                    expected: 1
                })
            ),
            "a skipped message is detected"
        );
        r.start_copy(9).unwrap();
        r.copy_disk(9, 0, &w(0)).unwrap();
        r.copy_disk(5, 1, &w(512)).unwrap();
        assert_eq!(
            r.copy_next, 1,
            "a late message of copy 5 is not part of copy 9"
        );
        assert!(
            matches!(
                r.copy_pages(11, 1, &PageBatch::default()),
                Err(ReplicaError::CopyUnknown {
                    got: 11,
                    current: 9
                })
            ),
            "a copy whose start was lost is detected"
        );
        r.copy_pages(9, 1, &PageBatch::default()).unwrap();
        assert!(
            r.check(&staged(7, true, 9, 3)).is_err(),
            "announced 3, took 2"
        );
        assert!(
            !r.check(&staged(7, true, 5, 2)).unwrap(),
            "the completing checkpoint of copy 5 cannot complete copy 9"
        );
        assert!(r.check(&staged(7, true, 9, 2)).unwrap());
        assert!(
            r.copy_disk(9, 2, &w((1 << 20) - 256)).is_err(),
            "beyond the replica"
        );
        assert!(
            !r.check(&staged(9, false, 0, 0)).unwrap(),
            "ordinary checkpoints before the copy completes are ignored"
        );
        assert!(!r.ready());
        assert!(marker.is_set());
    }
}
