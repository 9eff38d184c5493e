//! The session's quick path: the two messages a link reader may hand it directly,
//! without the node's event loop, because what they do is only to send and release —
//! a plain acknowledgement on a protected primary, and the next slice of the log on a
//! lockstep secondary. Anything else, or either of them in any other state, is left to
//! the event loop (the session is untouched then).

use std::time::Instant;

use super::{Action, Mode, Session, State};
use crate::protocol::Message;

impl Session {
    /// A protected primary's acknowledgement of `position` (of copy `copy`): handled
    /// as [`Session::on`] would and its actions returned (outputs to release, the
    /// `Released` to send), or `None`, untouched, when it may do more than that — the
    /// full copy's acknowledgement, the pair's end after a power-off, a switchover, or a stall not
    /// yet noticed (this node did not tick within the stall limit: an acknowledgement
    /// that waited out a stall must not release output before the stall is handled).
    pub fn quick_ack(&mut self, position: u64, copy: u64, now: Instant) -> Option<Vec<Action>> {
        let fresh = self
            .last_tick
            .is_some_and(|t| now.saturating_duration_since(t) <= self.cfg.stall_limit);
        let State::Primary(p) = &self.state else {
            return None;
        };
        if !fresh
            || !matches!(p.mode(), Mode::Protected { .. })
            || p.powered_off_at().is_some()
            || p.handover().is_some()
        {
            return None;
        }
        let mut out = Vec::new();
        self.message(&mut out, now, Message::Ack { position, copy });
        debug_assert!(out.iter().all(Action::is_quick), "{out:?}");
        Some(out)
    }

    /// A lockstep secondary's next slice of the log, at `position`: taken (the
    /// acknowledgement to send is returned) when it is the one that follows the last
    /// taken; `None`, untouched, for any other (stale, out of order, before a copy).
    /// The caller hands the slice to the replica's running guest.
    pub fn quick_slice(&mut self, position: u64) -> Option<Vec<Action>> {
        let State::Secondary(s) = &mut self.state else {
            return None;
        };
        if !s.progress.follows(position) {
            return None;
        }
        let check = s.progress.checkpoint(position, false, 0, 0);
        debug_assert_eq!(check, super::CopyCheck::Apply);
        let mut out = Vec::new();
        self.checkpoint_applied(&mut out, position, false, 0);
        debug_assert!(out.iter().all(Action::is_quick), "{out:?}");
        Some(out)
    }
}

impl Action {
    /// Whether a link reader can carry the action out itself (a message to send,
    /// outputs to release).
    pub fn is_quick(&self) -> bool {
        matches!(self, Action::Send(_) | Action::Release(_))
    }
}
