//! Restart safety: which node may boot the guest from its own disk, what a restarted
//! peer means, and two primaries that hear each other.
//!
//! - A node boots the guest only from a replica recorded whole or live, at least as
//!   new as any generation it knows of, when the peer heard holds neither newer data,
//!   nor other data, nor a ready replica, nor runs the guest.
//! - A new process of the peer (a new session in its hello) is a failure of the old
//!   one: a ready secondary takes over from its replica (through the arbiter, or at
//!   once with `arbiter = none`, the new process itself saying the old guest is gone).
//! - Two primaries of one generation (arbiter directories that are not one) resolve
//!   by a fixed rule: the node whose name sorts first keeps the guest.

use std::time::Instant;

use super::{Action, ArbiterKind, Mode, Session, State};
use crate::protocol::{Role, Standing};

impl Session {
    /// Why this node may not boot the guest from its own disk now (`alive`: the peer
    /// is heard), or `None` when it may.
    pub(super) fn boot_blocker(&mut self, alive: bool) -> Option<String> {
        if alive {
            self.claim_lost = None;
        } else if let Some(why) = &self.claim_lost {
            return Some(why.clone());
        }
        let own = match self.standing {
            Standing::Blank => {
                return Some(
                    "this host's replica holds no pair data; waiting for a primary to copy from \
                     (first deployment: start the host whose disk holds the guest with \
                     --initial-primary)"
                        .into(),
                )
            }
            Standing::Incomplete { reason, .. } => {
                return Some(format!(
                    "this host holds an incomplete copy of the guest ({}); waiting for a primary to copy from",
                    reason.describe()
                ))
            }
            s => s,
        };
        let position = own.position()?;
        if position.0 < self.generation {
            return Some(format!(
                "this host's replica ({}) is older than generation {}, in which the guest ran elsewhere; waiting for a primary to copy from",
                own.describe(),
                self.generation
            ));
        }
        if !alive {
            return None;
        }
        let peer = self.peer.name.clone().unwrap_or_else(|| "the peer".into());
        if self.peer.role == Some(Role::Secondary)
            && matches!(self.peer.standing, Some(Standing::Whole { .. }))
        {
            return Some(format!(
                "{peer} holds a ready replica of the running guest and takes over from it; waiting to join"
            ));
        }
        let theirs = self.peer.standing?;
        match (theirs.data(), theirs.position()) {
            (Some(d), Some(_)) if Some(d) != own.data() => Some(format!(
                "both hosts hold pair data and it differs (this host: {}; {peer}: {}): neither starts the guest. \
                 Choose the host whose data to keep and restart the other with --discard-replica",
                own.describe(),
                theirs.describe()
            )),
            (Some(_), Some(p)) if p > position => Some(format!(
                "{peer}'s replica is newer ({}; this host: {}); waiting for it to start the guest",
                theirs.describe(),
                own.describe()
            )),
            _ => None,
        }
    }

    /// The peer's process changed (it restarted); `was` is the role its old process
    /// had, `now` the role its new one says.
    pub(super) fn peer_restarted(&mut self, out: &mut Vec<Action>, was: Option<Role>, now: Role) {
        match (&mut self.state, was) {
            (State::Secondary(_), Some(Role::Primary)) if now == Role::Primary => {
                // The new process already runs a guest of its own (it did not hear this
                // node in time): this replica is of the old guest. Copy the new one.
                self.copy_again(out, "the primary's CoServer restarted and runs a guest of its own: asking for a new copy".into());
            }
            (State::Secondary(s), Some(Role::Primary)) => {
                let Some(epoch) = s.progress.ready_epoch() else {
                    let now = self.last_tick.unwrap_or_else(Instant::now);
                    self.primary_gone_before_ready(out, now);
                    return;
                };
                match self.cfg.arbiter {
                    ArbiterKind::Claims => {
                        // Claimed at once, and again at every tick until answered (an
                        // arbiter that cannot be used now may be later).
                        s.primary_gone = true;
                        self.alert(out, "the primary's CoServer restarted (a new process): its guest is gone; asking the arbiter to take over".into());
                        out.push(Action::Claim);
                    }
                    ArbiterKind::None { .. } => {
                        // The new process says the old one, and its guest, are gone:
                        // nobody else can run the guest, so no arbiter is needed.
                        self.alert(out, format!("the primary's CoServer restarted (a new process): its guest is gone; {}", self.takeover_from(epoch)));
                        let g = self.generation;
                        self.take_over(out, epoch, g);
                    }
                }
            }
            (State::Primary(p), Some(Role::Secondary)) if p.mode() != Mode::Degraded => {
                let released = p.restart_copy();
                if !released.is_empty() {
                    out.push(Action::Release(released));
                }
                self.alert(
                    out,
                    "the secondary's CoServer restarted (a new process): its replica is gone; unprotected until it has joined again".into(),
                );
            }
            _ => {}
        }
    }

    /// The primary is gone while this node's copy was incomplete: it waits, never
    /// boots its half copy.
    pub(super) fn primary_gone_before_ready(&mut self, out: &mut Vec<Action>, now: Instant) {
        self.alert(out, "primary lost before the copy completed; this host's replica stays recorded incomplete; waiting for a primary".into());
        out.push(Action::DropReplica);
        self.state = State::Starting { since: now };
    }

    /// The peer says it is primary in `generation`: two primaries of one generation
    /// mean the arbiter did not arbitrate (each node used a directory of its own). The
    /// node whose name sorts first keeps the guest; the other fences at once.
    pub(super) fn two_primaries(&mut self, out: &mut Vec<Action>, role: Role, generation: u64) {
        if role != Role::Primary
            || generation != self.generation
            || !matches!(self.state, State::Primary(_))
        {
            return;
        }
        let Some(peer) = self.peer.name.clone() else {
            return;
        };
        if peer.as_str() < self.cfg.node.as_str() {
            self.fence(
                out,
                format!(
                    "two primaries in generation {generation}: {peer} also runs the guest (do both nodes use the same arbiter directory?); {peer}, whose name sorts first, keeps it: fencing"
                ),
                true,
            );
        } else {
            self.alert_once(
                out,
                format!(
                    "two primaries in generation {generation}: {peer} also runs the guest (do both nodes use the same arbiter directory?); this node's name sorts first: {peer} fences"
                ),
            );
        }
    }
}
