//! The peer's messages as the session takes them: the primary's side of the stream
//! (joins, acknowledgements, a secondary's repair or leave) and the secondary's (a new
//! copy, a handover, the pair's end).

use std::time::Instant;

use super::{AckOutcome, Action, Session, State};
use crate::protocol::{DiskRange, Incomplete, Message};

impl Session {
    pub(super) fn message(&mut self, out: &mut Vec<Action>, now: Instant, msg: Message) {
        match (&mut self.state, msg) {
            (State::Primary(p), Message::Rejoin { position }) => {
                let (released, delta) = p.rejoin(position);
                if !released.is_empty() {
                    out.push(Action::Release(released));
                }
                if !delta {
                    tracing::info!(
                        position,
                        "rejoin from a position this primary did not resume at: a full copy"
                    );
                }
            }
            (State::Primary(p), Message::Join) => {
                let released = p.restart_copy();
                if !released.is_empty() {
                    out.push(Action::Release(released));
                }
            }
            (State::Primary(p), Message::CopyApplied { copy, applied }) => {
                p.copy_applied(copy, applied)
            }
            (State::Primary(p), Message::Executed { position, exit }) => {
                p.executed(position, exit, now)
            }
            (
                State::Primary(p),
                Message::Diverged {
                    position,
                    reason,
                    written,
                },
            ) => {
                self.resyncs += 1;
                let (released, ranges) = p.repair_copy(written);
                if !released.is_empty() {
                    out.push(Action::Release(released));
                }
                let what = match ranges {
                    Some(r) => format!(
                        "memory and {} disk ranges ({} bytes)",
                        r.len(),
                        DiskRange::total(&r)
                    ),
                    None => "memory and the whole disk".to_string(),
                };
                self.alert(
                    out,
                    format!("the secondary's guest diverged at position {position} ({reason}): repairing it with a copy of {what}"),
                );
            }
            (State::Primary(p), Message::Resync { reason }) => {
                self.resyncs += 1;
                let released = p.restart_copy();
                if !released.is_empty() {
                    out.push(Action::Release(released));
                }
                self.alert(out, format!("secondary asks for a new copy: {reason}"));
            }
            (
                State::Primary(p),
                Message::Ack {
                    position: epoch,
                    copy,
                },
            ) => match p.ack(epoch, copy, now) {
                AckOutcome::Accepted {
                    protected,
                    released,
                } => {
                    if !released.is_empty() {
                        out.push(Action::Release(released));
                    }
                    out.push(Action::Send(Message::Released { position: epoch }));
                    if protected {
                        self.alert(
                            out,
                            "secondary holds a full copy: the pair is protected".into(),
                        );
                    }
                    self.finish(out);
                    self.hand_over_if_due(out);
                }
                AckOutcome::Rejected => {
                    tracing::warn!(
                        epoch,
                        copy,
                        "acknowledgement of no checkpoint sent rejected"
                    )
                }
            },
            (State::Primary(_), Message::Leave) => self.peer_left(out),
            (State::Secondary(_), Message::Handover { position }) => {
                self.handed_over(out, position)
            }
            (State::Secondary(s), Message::CopyStart { copy }) => {
                s.join_sent = None;
                s.progress.start_copy(copy);
                self.record_incomplete(out, Incomplete::Copying);
                out.push(Action::ResetReplica);
            }
            (State::Secondary(s), Message::Stopped { exit_code }) => {
                // The primary stops only once every checkpoint is acknowledged, that
                // is applied here: a ready replica ends whole.
                if let Some(epoch) = s.progress.ready_epoch() {
                    self.record_whole(out, epoch);
                }
                out.push(Action::Exit(exit_code as i32));
            }
            (_, other) => {
                tracing::debug!(
                    kind = other.kind(),
                    role = self.role().name(),
                    "message ignored"
                )
            }
        }
    }
}
