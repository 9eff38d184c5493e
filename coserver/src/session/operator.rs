//! What the operator asks of a running pair: a switchover (the primary hands the guest
//! to its protected secondary) and a secondary's leave.
//!
//! ```text
//! primary, protected --(switchover)--> guest stops at its next cut (Final)
//!          --(Ack of that cut; its outputs released)--> Handover sent, fenced
//!          --(its guest stopped; the new primary heard)--> secondary (Join)
//! secondary, ready --(Handover)--> claim: won --> primary (take over)
//! secondary --(leave)--> replica recorded Left, Leave sent, exit 0
//! primary --(Leave)--> degraded (held output released; no claim)
//! ```

use super::{Action, ArbiterKind, Session, State};
use crate::protocol::{Incomplete, Message, Role};

impl Session {
    /// The operator asks this node to hand the guest to its secondary. `Ok`: what
    /// happens now; `Err`: why not.
    pub fn switchover(&mut self) -> Result<String, String> {
        if self.cfg.arbiter != ArbiterKind::Claims {
            return Err(
                "a switchover needs an arbiter that grants takeovers (arbiter kind none names one node the primary)"
                    .into(),
            );
        }
        let peer = self.peer.name.clone().unwrap_or_else(|| "the peer".into());
        let alive = self.peer.alive;
        let State::Primary(p) = &mut self.state else {
            return Err(format!(
                "this node is {}, not the primary: ask the primary",
                self.role().name()
            ));
        };
        if !alive {
            return Err(format!("{peer} is not heard"));
        }
        p.request_handover()?;
        self.last_alert = Some(format!("switchover to {peer} requested"));
        Ok(format!(
            "switchover to {peer}: the guest stops at its next cut and {peer} takes it over once it holds that cut"
        ))
    }

    /// The operator takes this secondary out of the pair: its replica is recorded
    /// incomplete (it takes nothing over), the primary is told, and the node exits.
    /// `Ok`: the actions (the record first); `Err`: why not.
    pub fn leave(&mut self) -> Result<Vec<Action>, String> {
        match self.role() {
            Role::Secondary => {}
            Role::Primary => {
                return Err(
                    "this node is the primary: switch over first (ftvm ctl switchover), then ask it to leave as the secondary"
                        .into(),
                )
            }
            other => {
                return Err(format!(
                    "this node is {}, not a secondary of a pair: stop its process instead",
                    other.name()
                ))
            }
        }
        let mut out = Vec::new();
        self.record_incomplete(&mut out, Incomplete::Left);
        out.push(Action::Send(Message::Leave));
        out.push(Action::DropReplica);
        self.alert(
            &mut out,
            "leaving the pair (ftvm ctl leave): the primary runs on degraded; start this CoServer again to rejoin".into(),
        );
        self.state = State::Fenced {
            guest_stopped: true,
            handed_over: None,
            kept: false,
        };
        out.push(Action::Exit(0));
        self.note_exit(&out);
        Ok(out)
    }

    /// The operator vouches that the other host is gone for good and has this waiting
    /// node run the guest from its own replica (recorded whole or live), whatever
    /// generation the arbiter holds: it claims above it and boots. `Ok`: the actions;
    /// `Err`: why not.
    pub fn force_primary(&mut self) -> Result<Vec<Action>, String> {
        if !matches!(self.state, State::Starting { .. }) {
            return Err(format!(
                "this node is {}: force-primary is for a starting node that waits",
                self.role().name()
            ));
        }
        if self.cfg.arbiter != ArbiterKind::Claims {
            return Err(
                "arbiter kind none: the configuration names the node that starts the guest".into(),
            );
        }
        if self.peer.alive {
            let peer = self.peer.name.clone().unwrap_or_else(|| "the peer".into());
            return Err(format!(
                "{peer} is heard: the pair decides which node runs the guest (force-primary is for a host whose peer is gone for good)"
            ));
        }
        if self.standing.position().is_none() {
            return Err(format!(
                "this host's replica is {}: it does not hold the guest whole (docs/operations.md, \"Choosing an arbiter\", says how to run from this disk anyway)",
                self.standing.describe()
            ));
        }
        self.forced = true;
        self.claim_lost = None;
        self.arbiter_error = None;
        let mut out = Vec::new();
        self.alert(
            &mut out,
            format!(
                "force-primary: the operator says the other host is gone for good; starting the guest from this host's replica ({}); what the guest did elsewhere after it is lost",
                self.standing.describe()
            ),
        );
        out.push(Action::Claim);
        Ok(out)
    }

    /// A protected primary's secondary left the pair: degraded, without the arbiter
    /// (the secondary recorded its replica incomplete before it said so).
    pub(super) fn peer_left(&mut self, out: &mut Vec<Action>) {
        self.peer.left = true;
        let peer = self
            .peer
            .name
            .clone()
            .unwrap_or_else(|| "the secondary".into());
        self.degrade(
            out,
            format!(
                "{peer} left the pair (ftvm ctl leave): running degraded until a secondary joins"
            ),
        );
    }

    /// The switchover's last step on the primary: the guest stopped after a position
    /// the secondary acknowledged, and its outputs were released: hand over and fence.
    pub(super) fn hand_over_if_due(&mut self, out: &mut Vec<Action>) {
        let State::Primary(p) = &self.state else {
            return;
        };
        let Some(position) = p.handover_due() else {
            return;
        };
        let peer = self.peer.name.clone().unwrap_or_else(|| "the peer".into());
        out.push(Action::Send(Message::Handover { position }));
        self.fence(
            out,
            format!("switchover: the guest stopped here after position {position}, which {peer} holds; {peer} takes it over and this node becomes its secondary"),
            true,
        );
        if let State::Fenced { handed_over, .. } = &mut self.state {
            *handed_over = Some(position);
        }
    }

    /// The primary handed the guest over after `position`: a ready secondary claims it
    /// (and, while the claim fails, claims again at every tick).
    pub(super) fn handed_over(&mut self, out: &mut Vec<Action>, position: u64) {
        let State::Secondary(s) = &mut self.state else {
            return;
        };
        s.primary_gone = true;
        s.handed_over = true;
        match s.progress.ready_epoch() {
            Some(held) => {
                if held != position {
                    tracing::warn!(
                        held,
                        position,
                        "handover at another position than the replica holds"
                    );
                }
                self.alert(
                    out,
                    format!("switchover: the primary handed the guest over after position {position}; claiming the arbiter"),
                );
                out.push(Action::Claim);
            }
            None => self.alert(
                out,
                "switchover: the primary handed the guest over, but this replica is not ready"
                    .into(),
            ),
        }
    }
}
