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
    /// The marker of an incomplete replica cannot be written or removed.
    #[error("replica marker {path}: {source}")]
    Marker {
        /// The marker file.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
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
    pub fn reset(&mut self) -> Result<(), ReplicaError> {
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

    /// Applies copied pages (the session checked their order).
    pub fn copy_pages(&mut self, batch: &PageBatch) -> Result<(), ReplicaError> {
        self.last_epoch = None;
        Ok(self.standby.apply_pages(batch)?)
    }

    /// Applies a copied disk range or a write made during the copy.
    pub fn copy_disk(&mut self, w: &DiskWrite) -> Result<(), ReplicaError> {
        self.last_epoch = None;
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

    /// Applies checkpoint `epoch`, checked by the session: pages, state, disk writes
    /// (made durable if the guest flushed). A failure leaves the replica not ready.
    pub fn apply(&mut self, epoch: u64, staged: CheckpointSegment) -> Result<(), ReplicaError> {
        self.last_epoch = None;
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
        self.last_epoch = Some(epoch);
        self.inbound.retain(|(e, _)| *e > epoch);
        if !staged.outputs.is_empty() {
            self.unreleased.push((epoch, staged.outputs));
        }
        if staged.full {
            self.marker.clear()?;
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
    fn the_replica_applies_in_range_keeps_its_marker_until_a_full_copy_and_hands_over() {
        let dir = tempfile::tempdir().unwrap();
        let disk = dir.path().join("replica.img");
        std::fs::File::create(&disk)
            .unwrap()
            .set_len(1 << 20)
            .unwrap();
        let mut r = match Replica::new(16, Some(&disk), IncompleteMarker::new(dir.path())) {
            Ok(r) => r,
            Err(e) if std::env::var("FTVM_REQUIRE_KVM").as_deref() != Ok("1") => {
                eprintln!("SKIPPED: cannot create a standby VM: {e}");
                return;
            }
            Err(e) => panic!("FTVM_REQUIRE_KVM=1 but no standby VM: {e}"),
        };
        let marker = IncompleteMarker::new(dir.path());
        assert!(marker.is_set(), "set as soon as the node joins");
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
            flush: true,
            copy_messages: 1,
            outputs: vec![Output::Console(b"x".to_vec())],
        };
        assert!(
            r.apply(4, staged(true)).is_err(),
            "an empty state does not decode"
        );
        assert!(
            marker.is_set(),
            "a failed apply leaves the replica incomplete"
        );
        let data = std::fs::read(&disk).unwrap();
        assert_eq!(
            &data[512..1024],
            &[1u8; 512][..],
            "the disk write was applied"
        );
    }
}
