//! The arbiter's answers: taking over, degrading or fencing, and what a fence records.

use super::{Action, Mode, Session, State};
use crate::arbiter::{Claim, Held};
use crate::protocol::{Incomplete, Standing};

impl Session {
    /// Stops the guest here. `superseded`: another node runs the guest now, so this
    /// disk is no longer the pair's data (an arbiter that could not be asked says
    /// nothing of the sort).
    pub(super) fn fence(&mut self, out: &mut Vec<Action>, why: String, superseded: bool) {
        if superseded && self.standing.position().is_some() {
            let data = self.data_id();
            self.record(
                out,
                Standing::Incomplete {
                    data,
                    reason: Incomplete::Superseded,
                },
            );
        }
        let guest_stopped = !matches!(self.state, State::Primary(_));
        out.push(Action::Fence);
        self.state = State::Fenced {
            guest_stopped,
            handed_over: None,
            kept: false,
        };
        self.alert(out, why);
    }

    /// The answer to a primary's check after its links fell silent.
    pub(super) fn arbiter_checked(&mut self, out: &mut Vec<Action>, result: Result<Held, String>) {
        let State::Primary(p) = &self.state else {
            return;
        };
        if p.mode() == Mode::Degraded {
            return;
        }
        match result {
            Ok(Held::Unchanged | Held::NoTakeovers) => {
                tracing::info!("the arbiter shows no takeover: running on as primary");
            }
            Ok(Held::Taken { generation, holder }) => self.fence(
                out,
                format!("this node did not run for about the peer timeout and {holder} won the arbiter meanwhile (generation {generation}): fencing"),
                true,
            ),
            Err(e) => {
                // Unknown: a claim decides (one that cannot be made fences).
                self.alert(out, format!("the arbiter cannot be read ({e}): claiming it"));
                out.push(Action::Claim);
            }
        }
    }

    pub(super) fn claimed(&mut self, out: &mut Vec<Action>, result: Result<Claim, String>) {
        match (&self.state, result) {
            (State::Starting { .. }, Ok(Claim::Won { generation })) => {
                self.record_live(out, generation);
                self.raise_generation(out, generation);
                self.alert(out, format!("no primary heard: won the arbiter (generation {generation}); starting the guest"));
                self.become_primary(out, 0, Action::BootGuest);
            }
            (State::Starting { .. }, Ok(Claim::Lost { generation, holder }))
                if std::mem::take(&mut self.forced) =>
            {
                // The operator vouches that the holder is gone for good: this node
                // learns its generation from the arbiter and claims the next one.
                self.alert(
                    out,
                    format!("force-primary: {holder} holds generation {generation}; claiming generation {}", generation + 1),
                );
                self.raise_generation(out, generation);
                out.push(Action::Claim);
            }
            (State::Starting { .. }, Ok(Claim::Lost { generation, holder })) => {
                // Not learned from the arbiter itself: only a peer that is heard can
                // vouch for a generation, or a stale node could win the next one. No
                // new claim until the peer is heard: it ran the guest after this host.
                let why = format!(
                    "{holder} holds generation {generation} of the arbiter (it started the guest meanwhile, or ran it after this host's replica); waiting to hear it (start it; if that host is gone for good, see \"Choosing an arbiter\" in docs/operations.md, then restart this CoServer)"
                );
                self.arbiter_error = None;
                self.claim_lost = Some(why.clone());
                self.alert(out, format!("waiting, the guest is not booted here: {why}"));
                self.waiting = Some(why);
                self.restart_wait();
            }
            (State::Starting { .. }, Ok(Claim::Refused)) => self.restart_wait(),
            (State::Starting { .. }, Err(e)) => {
                let why = format!("no primary heard, and the arbiter cannot be used: {e}");
                self.alert_once(out, why.clone());
                self.arbiter_error = Some(why.clone());
                self.waiting = Some(why);
                self.restart_wait();
            }
            (State::Primary(p), claim) => {
                if p.mode() == Mode::Degraded {
                    return;
                }
                match claim {
                    Ok(Claim::Won { generation }) => {
                        self.record_live(out, generation);
                        self.raise_generation(out, generation);
                        self.degrade(out, format!("secondary lost; won the arbiter (generation {generation}); running degraded"));
                    }
                    Ok(Claim::Refused) => {
                        self.degrade(out, "secondary lost; running degraded (arbiter none)".into())
                    }
                    Ok(Claim::Lost { generation, holder }) => self.fence(
                        out,
                        format!("secondary lost and {holder} won the arbiter (generation {generation}): fencing"),
                        true,
                    ),
                    Err(e) => self.fence(
                        out,
                        format!("secondary lost and the arbiter cannot be used ({e}): fencing"),
                        false,
                    ),
                }
            }
            (State::Secondary(s), claim) => {
                let Some(epoch) = s.progress.ready_epoch() else {
                    return;
                };
                let handed_over = s.handed_over;
                let why = if handed_over {
                    "switchover"
                } else {
                    "primary lost"
                };
                match claim {
                    Ok(Claim::Won { generation }) => {
                        // The announcement, the record (the guest is about to run on
                        // this disk), then the guest; the claim itself is durable in
                        // the arbiter, so persisting the generation can follow.
                        self.take_over(out, epoch, generation);
                        if let (State::Primary(p), true) = (&mut self.state, handed_over) {
                            // The old primary's guest stopped at `epoch` too: it may
                            // rejoin from there.
                            p.resumed_from_handover(epoch);
                        }
                        self.raise_generation(out, generation);
                        self.alert(out, format!("{why}; won the arbiter (generation {generation}); {}", self.takeover_from(epoch)));
                    }
                    Ok(Claim::Lost { generation, holder }) => self.fence(
                        out,
                        format!("{why} and {holder} holds the arbiter (generation {generation}): fencing"),
                        true,
                    ),
                    Ok(Claim::Refused) => {
                        self.alert_once(out, format!("{why}; not taking over (arbiter none)"))
                    }
                    // Nothing runs here: try again at the next tick.
                    Err(e) => {
                        self.alert_once(out, format!("{why}; the arbiter cannot be used: {e}"))
                    }
                }
            }
            (State::Fenced { .. }, _) => {}
        }
    }

    pub(super) fn restart_wait(&mut self) {
        if let (State::Starting { since }, Some(now)) = (&mut self.state, self.last_tick) {
            *since = now;
        }
    }

    pub(super) fn degrade(&mut self, out: &mut Vec<Action>, why: String) {
        if let State::Primary(p) = &mut self.state {
            let released = p.degrade();
            if !released.is_empty() {
                out.push(Action::Release(released));
            }
        }
        self.finish(out);
        self.alert(out, why);
    }
}
