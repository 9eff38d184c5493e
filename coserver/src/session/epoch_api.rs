//! The session's side facing the primary's epoch loop (on the vCPU thread): what each
//! cut becomes, the end of a copy, the guest's power-off, and whether the loop may run.

use std::time::Instant;

use super::{Action, CutPlan, Session, State};
use crate::protocol::{DiskRange, Output};

impl Session {
    /// The primary's epoch loop ends epoch `epoch` with `outputs` (held by the World
    /// under [`super::OutputPolicy::Hold`]): what to do with them and with the cut.
    pub fn cut(&mut self, epoch: u64, outputs: Vec<Output>, now: Instant) -> CutPlan {
        match &mut self.state {
            State::Primary(p) => p.cut(epoch, outputs, now),
            _ => CutPlan::Stop,
        }
    }

    /// The epoch loop built the checkpoint completing copy `copy` at `epoch`: whether
    /// to send it (the copy may have been abandoned meanwhile).
    pub fn full_cut(&mut self, epoch: u64, copy: u64, now: Instant) -> bool {
        match &mut self.state {
            State::Primary(p) => p.full_cut(epoch, copy, now),
            _ => false,
        }
    }

    /// Lockstep: the slice about to be cut at `position`, at `now`; the primary's guest
    /// stands at `exit` and wrote `written` in it (the lag is bounded by the one and the
    /// time, a repair of a diverged replica's disk sends the other).
    pub fn note_slice(&mut self, position: u64, exit: u64, written: Vec<DiskRange>, now: Instant) {
        if let State::Primary(p) = &mut self.state {
            p.note_slice(position, exit, written, now);
        }
    }

    /// The guest powered off at the end of `epoch`: the pair ends once its outputs are
    /// acknowledged (or at once while degraded).
    pub fn powered_off(&mut self, epoch: u64, code: u32) -> Vec<Action> {
        let State::Primary(p) = &mut self.state else {
            return Vec::new();
        };
        p.powered_off(epoch, code);
        let mut out = Vec::new();
        self.finish(&mut out);
        self.note_exit(&out);
        out
    }

    /// The primary's pair end, once nothing of the powered-off guest waits: its disk
    /// ends whole at the last epoch, then the peer is told and the node exits.
    pub(super) fn finish(&mut self, out: &mut Vec<Action>) {
        let State::Primary(p) = &mut self.state else {
            return;
        };
        let epoch = p.powered_off_at().unwrap_or_else(|| p.epoch());
        let finish = p.take_finish();
        if finish.is_empty() {
            return;
        }
        self.record_whole(out, epoch);
        out.extend(finish);
    }

    /// Whether the epoch loop may run epoch `next` now (a protected primary runs at
    /// most a few epochs ahead of its acknowledgements; a fenced one not at all).
    pub fn may_run(&self, next: u64) -> RunPermit {
        match &self.state {
            State::Primary(p) => p.may_run(next),
            _ => RunPermit::Stop,
        }
    }
}

/// Whether the epoch loop may go on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunPermit {
    /// Run the next epoch.
    Run,
    /// Wait for acknowledgements.
    Wait,
    /// Stop the guest (this node is no longer primary).
    Stop,
}
