//! The secondary following the primary's stream: which copy parts and checkpoints it
//! applies, acknowledging only what it applied, and starting over when it cannot.

use std::time::{Duration, Instant};

use super::{Action, CopyCheck, Incomplete, Message, ReplicaProgress, Session, State};

/// The longest wait before asking for a new copy after repeated apply failures.
const MAX_RESYNC_BACKOFF: Duration = Duration::from_secs(30);

impl Session {
    /// Whether a copy message (`index` of copy `copy`) is the next the replica takes.
    pub fn check_copy(&mut self, copy: u64, index: u64) -> CopyCheck {
        let State::Secondary(s) = &mut self.state else {
            return CopyCheck::Ignore;
        };
        s.progress.copy_part(copy, index)
    }

    /// Whether a checkpoint can be applied next. The driver applies it and reports
    /// [`Input::CheckpointApplied`], which acknowledges it: nothing is acknowledged that
    /// is not applied (and durable where the guest flushed).
    pub fn check_checkpoint(
        &mut self,
        epoch: u64,
        full: bool,
        copy: u64,
        copy_messages: u64,
    ) -> CopyCheck {
        let State::Secondary(s) = &mut self.state else {
            return CopyCheck::Ignore;
        };
        s.progress.checkpoint(epoch, full, copy, copy_messages)
    }

    pub(super) fn checkpoint_applied(
        &mut self,
        out: &mut Vec<Action>,
        epoch: u64,
        full: bool,
        copy: u64,
    ) {
        let State::Secondary(s) = &mut self.state else {
            return;
        };
        if full {
            if !s.progress.full_applied(epoch, copy) {
                return;
            }
            s.failures = 0;
            // Whole in memory and on disk now; after a crash of this host its disk is
            // some checkpoint behind the primary's and is copied again.
            self.record_incomplete(out, Incomplete::Applying);
            out.push(Action::Send(Message::Ack {
                position: epoch,
                copy,
            }));
        } else if s.progress.last_epoch() == Some(epoch) {
            out.push(Action::Send(Message::Ack {
                position: epoch,
                copy: s.progress.copy_id(),
            }));
        }
    }

    /// A lockstep replica diverged: it is unready at once and asks for a new copy at
    /// once (a divergence is the guest's doing, not a failing host, so no back-off): a
    /// repair when it knows where it diverged and what its guest wrote there (its disk
    /// is the primary's but for those ranges), a whole copy otherwise.
    pub(super) fn diverged(
        &mut self,
        out: &mut Vec<Action>,
        why: String,
        at: Option<(u64, Vec<crate::protocol::DiskRange>)>,
    ) {
        let State::Secondary(s) = &mut self.state else {
            return;
        };
        s.progress = ReplicaProgress::default();
        s.primary_gone = false;
        s.handed_over = false;
        s.join_sent = self.last_tick;
        self.resyncs += 1;
        self.record_incomplete(out, Incomplete::Copying);
        out.push(Action::ResetReplica);
        self.alert(
            out,
            format!("the replica's guest diverged from the primary's ({why}); not ready; asking for a new copy"),
        );
        out.push(Action::Send(match at {
            Some((position, written)) => Message::Diverged {
                position,
                reason: why,
                written,
            },
            None => Message::Resync { reason: why },
        }));
    }

    /// An apply failed: the replica is unready at once. The first failure asks for a
    /// new copy at once; while copies keep failing (a full file system, a failing
    /// disk) the next is asked for after a back-off that doubles up to 30 s, so a
    /// replica that cannot be written does not keep the primary copying.
    pub(super) fn apply_failed(&mut self, out: &mut Vec<Action>, why: String) {
        let State::Secondary(s) = &mut self.state else {
            return;
        };
        s.progress = ReplicaProgress::default();
        s.primary_gone = false;
        s.handed_over = false;
        s.failures += 1;
        let now = self.last_tick.unwrap_or_else(Instant::now);
        let delay = if s.failures == 1 {
            None
        } else {
            let doubled = self
                .cfg
                .ack_timeout
                .saturating_mul(1 << (s.failures - 1).min(16));
            Some(doubled.min(MAX_RESYNC_BACKOFF))
        };
        match delay {
            None => {
                s.join_sent = Some(now);
                out.push(Action::Send(Message::Resync {
                    reason: why.clone(),
                }));
            }
            Some(d) => {
                s.join_sent = None;
                s.resync_at = Some((now + d, why.clone()));
            }
        }
        self.record_incomplete(out, Incomplete::Copying);
        out.push(Action::ResetReplica);
        let when = match delay {
            None => "asking for a new copy".to_string(),
            Some(d) => format!("asking for a new copy in {} ms", d.as_millis()),
        };
        self.alert(
            out,
            format!("replica cannot follow ({why}); not ready; {when}"),
        );
    }
}
