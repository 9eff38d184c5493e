//! The secondary following the primary's stream: which copy parts and checkpoints it
//! applies, acknowledging only what it applied, and starting over when it cannot.

use super::{Action, CopyCheck, Incomplete, Message, ReplicaProgress, Session, State};

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

    pub(super) fn apply_failed(&mut self, out: &mut Vec<Action>, why: String) {
        if let State::Secondary(s) = &mut self.state {
            s.progress = ReplicaProgress::default();
            s.join_sent = self.last_tick;
            s.primary_gone = false;
            self.record_incomplete(out, Incomplete::Copying);
            out.push(Action::ResetReplica);
            self.alert(
                out,
                format!("replica cannot follow ({why}); not ready; asking for a new copy"),
            );
            out.push(Action::Send(Message::Resync { reason: why }));
        }
    }
}
