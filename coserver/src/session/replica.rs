//! The secondary's side of the session: which copy it is receiving, which copy message
//! and checkpoint it takes next, and whether its replica is whole.

/// What to do with a copy message or a checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CopyCheck {
    /// Apply it (a checkpoint: it is acknowledged first).
    Apply,
    /// Stale (of an earlier copy, or before any copy began): ignore it.
    Ignore,
    /// The replica cannot follow (a gap, reordering, or a copy never started): start
    /// over and ask for a new copy.
    Resync(ResyncReason),
}

/// Why a replica cannot follow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ResyncReason {
    /// A copy message out of order, or a full checkpoint after the wrong count.
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
    /// A checkpoint that does not follow the last one applied.
    #[error("checkpoint {got} does not follow {have}")]
    Gap {
        /// The epoch received.
        got: u64,
        /// The last epoch applied.
        have: u64,
    },
}

/// A replica's progress.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReplicaProgress {
    /// The copy being received (its start seen) and the next message's index.
    copying: Option<(u64, u64)>,
    /// The full copy the applied state descends from, and the last epoch applied.
    applied: Option<(u64, u64)>,
}

impl ReplicaProgress {
    /// Whether the checkpoint (or slice) at `epoch` is the one to apply next: it
    /// follows the last applied, and no copy is in progress.
    pub(super) fn follows(&self, epoch: u64) -> bool {
        self.copying.is_none() && self.applied.is_some_and(|(_, e)| epoch == e + 1)
    }

    /// Whether a full copy is applied (the replica can take over).
    pub fn is_ready(&self) -> bool {
        self.applied.is_some() && self.copying.is_none()
    }

    /// The checkpoint a takeover resumes from, if ready.
    pub fn ready_epoch(&self) -> Option<u64> {
        self.applied
            .filter(|_| self.copying.is_none())
            .map(|(_, e)| e)
    }

    /// The last epoch applied.
    pub fn last_epoch(&self) -> Option<u64> {
        self.applied.map(|(_, e)| e)
    }

    /// The full copy the applied state descends from (0: none).
    pub fn copy_id(&self) -> u64 {
        self.applied.map_or(0, |(c, _)| c)
    }

    pub(super) fn start_copy(&mut self, copy: u64) {
        *self = Self {
            copying: Some((copy, 0)),
            applied: None,
        };
    }

    /// Whether a message of copy `copy` belongs to the copy in progress.
    fn of_this_copy(&self, copy: u64) -> Result<bool, ResyncReason> {
        match self.copying {
            Some((current, _)) if copy == current => Ok(true),
            Some((current, _)) if copy > current => {
                Err(ResyncReason::CopyUnknown { got: copy, current })
            }
            _ => Ok(false),
        }
    }

    pub(super) fn copy_part(&mut self, copy: u64, index: u64) -> CopyCheck {
        match self.of_this_copy(copy) {
            Err(r) => return CopyCheck::Resync(r),
            Ok(false) => return CopyCheck::Ignore,
            Ok(true) => {}
        }
        let Some((_, next)) = &mut self.copying else {
            return CopyCheck::Ignore;
        };
        if index != *next {
            return CopyCheck::Resync(ResyncReason::CopyOrder {
                got: index,
                expected: *next,
            });
        }
        *next += 1;
        CopyCheck::Apply
    }

    pub(super) fn checkpoint(
        &mut self,
        epoch: u64,
        full: bool,
        copy: u64,
        messages: u64,
    ) -> CopyCheck {
        if full {
            match self.of_this_copy(copy) {
                Err(r) => return CopyCheck::Resync(r),
                Ok(false) => return CopyCheck::Ignore,
                Ok(true) => {}
            }
            let next = self.copying.map_or(0, |(_, n)| n);
            if messages != next {
                return CopyCheck::Resync(ResyncReason::CopyOrder {
                    got: messages,
                    expected: next,
                });
            }
            return CopyCheck::Apply;
        }
        match self.applied {
            // Before the first full copy (or while one runs) ordinary checkpoints are
            // those of an earlier copy's primary: nothing to follow yet.
            None => CopyCheck::Ignore,
            Some(_) if self.copying.is_some() => CopyCheck::Ignore,
            Some((c, e)) if epoch == e + 1 => {
                self.applied = Some((c, epoch));
                CopyCheck::Apply
            }
            Some((_, e)) if epoch <= e => CopyCheck::Ignore,
            Some((_, e)) => CopyCheck::Resync(ResyncReason::Gap {
                got: epoch,
                have: e,
            }),
        }
    }

    /// The full checkpoint of `copy` at `epoch` is applied and durable.
    pub(super) fn full_applied(&mut self, epoch: u64, copy: u64) -> bool {
        if self.copying.is_some_and(|(c, _)| c == copy) {
            self.copying = None;
            self.applied = Some((copy, epoch));
            true
        } else {
            false
        }
    }
}
