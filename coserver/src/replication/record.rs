//! What this host's disk replica holds, recorded durably in the state directory
//! (`state_dir/replica`): the identity of the pair's data, the position it is
//! consistent with, and whether it is whole, live or incomplete. A CoServer boots the
//! guest from its own disk only when this record says the replica is whole (or the guest
//! last ran on it) and the peer does not hold a newer one (`crate::session`).
//!
//! The record is replaced atomically: written to a temporary file, fsynced, renamed over
//! the old one, and the directory fsynced, so a crash leaves the old record or the new
//! one, never a torn one.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::durable;
use crate::protocol::{Incomplete, Standing};

/// The data identity of every guest without a disk.
pub const DISKLESS: u64 = 1;

/// The record's file name in the state directory.
pub const FILE: &str = "replica";
/// The marker earlier versions wrote while a copy was under way; still honoured.
const LEGACY_MARKER: &str = "replica-incomplete";

/// Errors of the replica record.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    /// The record cannot be read or written.
    #[error("replica record {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// The record does not parse: it is never taken for blank.
    #[error("replica record {path} is damaged ({source}); move it away only if you know what this host's disk holds")]
    Damaged {
        /// The file.
        path: PathBuf,
        /// Cause.
        source: serde_json::Error,
    },
    /// `--initial-primary` on a host whose replica holds part of the pair's data.
    #[error("this host's replica holds {0}: it cannot be designated as the pair's data (designate the host whose disk holds the guest, or discard this replica with --discard-replica)")]
    NotDesignable(String),
}

#[derive(Serialize, Deserialize)]
struct OnDisk {
    version: u32,
    replica: Standing,
}

/// The durable record of what this host's replica holds.
#[derive(Debug, Clone)]
pub struct ReplicaRecord {
    dir: PathBuf,
    standing: Standing,
}

impl ReplicaRecord {
    /// Loads the record from `state_dir` (blank if none; a damaged one is an error).
    pub fn load(state_dir: &Path) -> Result<Self, RecordError> {
        let path = state_dir.join(FILE);
        let standing = match std::fs::read(&path) {
            Ok(bytes) => {
                serde_json::from_slice::<OnDisk>(&bytes)
                    .map_err(|source| RecordError::Damaged {
                        path: path.clone(),
                        source,
                    })?
                    .replica
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                if state_dir.join(LEGACY_MARKER).exists() {
                    Standing::Incomplete {
                        data: 0,
                        reason: Incomplete::Copying,
                    }
                } else {
                    Standing::Blank
                }
            }
            Err(source) => return Err(RecordError::Io { path, source }),
        };
        Ok(Self {
            dir: state_dir.to_path_buf(),
            standing,
        })
    }

    /// What the replica holds, as recorded.
    pub fn standing(&self) -> Standing {
        self.standing
    }

    /// Where the record lives.
    pub fn path(&self) -> PathBuf {
        self.dir.join(FILE)
    }

    /// Records `standing` durably (a no-op if it is what is recorded).
    pub fn set(&mut self, standing: Standing) -> Result<(), RecordError> {
        if standing == self.standing && self.path().exists() {
            return Ok(());
        }
        let path = self.path();
        let io = |p: &Path| {
            let p = p.to_path_buf();
            move |source| RecordError::Io { path: p, source }
        };
        let text = serde_json::to_vec_pretty(&OnDisk {
            version: 1,
            replica: standing,
        })
        .map_err(|source| RecordError::Damaged {
            path: path.clone(),
            source,
        })?;
        durable::replace(&path, &text).map_err(io(&path))?;
        let legacy = self.dir.join(LEGACY_MARKER);
        if legacy.exists() {
            std::fs::remove_file(&legacy).map_err(io(&legacy))?;
            durable::sync_dir(&self.dir).map_err(io(&self.dir))?;
        }
        self.standing = standing;
        Ok(())
    }

    /// The operator designates this host's replica as the pair's data (a first
    /// deployment, or a replica moved away to start over from this disk): a blank
    /// record becomes whole data of a new identity at `generation` (the highest this
    /// node knows, so no generation it knows of is newer); a whole or live one is left
    /// as it is; an incomplete one is refused.
    pub fn designate(&mut self, generation: u64) -> Result<bool, RecordError> {
        match self.standing {
            Standing::Blank => {
                let mut id = [0u8; 8];
                crate::link::handshake::fill_random(&mut id);
                self.set(Standing::Whole {
                    data: u64::from_le_bytes(id),
                    generation,
                    epoch: 0,
                })?;
                Ok(true)
            }
            Standing::Whole { .. } | Standing::Live { .. } => Ok(false),
            s @ Standing::Incomplete { .. } => Err(RecordError::NotDesignable(s.describe())),
        }
    }

    /// A guest without a disk: its (empty) data is the same on every host, so any
    /// host may boot it.
    pub fn designate_diskless(&mut self) -> Result<(), RecordError> {
        self.set(Standing::Whole {
            data: DISKLESS,
            generation: 0,
            epoch: 0,
        })
    }

    /// The operator discards what this replica holds: it joins a primary and is
    /// overwritten by a copy.
    pub fn discard(&mut self) -> Result<(), RecordError> {
        self.set(Standing::Blank)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_record_survives_a_reload_and_a_damaged_one_is_an_error_not_blank() {
        let d = tempfile::tempdir().unwrap();
        let mut r = ReplicaRecord::load(d.path()).unwrap();
        assert_eq!(r.standing(), Standing::Blank);
        assert!(r.designate(3).unwrap(), "a blank replica is designated");
        let Standing::Whole {
            data,
            generation: 3,
            ..
        } = r.standing()
        else {
            panic!("{:?}", r.standing());
        };
        assert!(
            !r.designate(3).unwrap(),
            "designating twice changes nothing"
        );
        assert_eq!(
            ReplicaRecord::load(d.path()).unwrap().standing(),
            r.standing()
        );
        r.set(Standing::Incomplete {
            data,
            reason: Incomplete::Applying,
        })
        .unwrap();
        let again = ReplicaRecord::load(d.path()).unwrap();
        assert_eq!(again.standing(), r.standing());
        assert!(
            matches!(r.designate(3), Err(RecordError::NotDesignable(_))),
            "an incomplete replica is never designated"
        );
        std::fs::write(d.path().join(FILE), "{ not json").unwrap();
        assert!(matches!(
            ReplicaRecord::load(d.path()),
            Err(RecordError::Damaged { .. })
        ));
    }

    #[test]
    fn the_marker_of_earlier_versions_reads_as_an_incomplete_copy() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join(LEGACY_MARKER), "x").unwrap();
        let mut r = ReplicaRecord::load(d.path()).unwrap();
        assert!(matches!(r.standing(), Standing::Incomplete { .. }));
        r.discard().unwrap();
        assert!(!d.path().join(LEGACY_MARKER).exists());
        assert_eq!(
            ReplicaRecord::load(d.path()).unwrap().standing(),
            Standing::Blank
        );
    }
}
