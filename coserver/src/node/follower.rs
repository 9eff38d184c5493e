//! A lockstep secondary's running replica (`replication::lockstep::Follower`): started
//! when the full copy is applied, settled at the pair's end, and its divergences
//! reported to the session.

use std::time::{Duration, Instant};

use ftvm_devices::backend::disk::DiskFile;

use super::{Node, NodeError};
use crate::replication::lockstep::{Divergence, Follower};
use crate::replication::mirror::Mirror;
use crate::session::Input;

impl Node {
    /// Lockstep: waits (bounded) until the replica's guest has executed every slice it
    /// holds; one that diverged or does not get there leaves the replica incomplete.
    pub(super) fn settle_follower(&mut self) -> Result<(), NodeError> {
        let Some(f) = &self.follower else {
            return Ok(());
        };
        let held = self.session.lock().replica().and_then(|r| r.last_epoch());
        let limit = Instant::now() + self.cfg.ack_timeout().max(Duration::from_secs(10));
        let outcome = loop {
            let st = f.status();
            if let Some(d) = st.diverged {
                break Err(d.why);
            }
            if st.executed.map(|(p, _)| p) >= held {
                break Ok(());
            }
            if Instant::now() > limit {
                break Err(
                    "the replica's guest did not execute the rest of the log in time".into(),
                );
            }
            std::thread::sleep(Duration::from_millis(1));
        };
        match outcome {
            Ok(()) => Ok(()),
            // The pair ends: nothing to repair, the replica is just not whole.
            Err(why) => self.input(Input::Diverged { why, at: None }),
        }
    }

    /// Lockstep: the full copy is applied; its guest starts following the log.
    pub(super) fn start_follower(&mut self) -> Result<(), NodeError> {
        let Some(replica) = self.replica.take() else {
            return Err(NodeError::Guest("no replica to follow with".into()));
        };
        let standby = replica.into_standby()?.standby;
        let mut disks = Vec::new();
        if let Some(p) = &self.cfg.host.disk {
            disks.push(DiskFile::open(p, false).map_err(|e| NodeError::Guest(e.to_string()))?);
        }
        let out = self.out.clone();
        let follower = Follower::start(
            standby,
            disks,
            self.cfg.host.tap.is_some(),
            Box::new(move |m| out.send_small(m)),
            self.mirror.as_ref().map(Mirror::window),
        )?;
        self.follower = Some(follower);
        Ok(())
    }

    /// Lockstep: tells the session if the replica's guest diverged (it is repaired);
    /// whether it had.
    pub(super) fn report_divergence(&mut self) -> Result<bool, NodeError> {
        let diverged = self.follower.as_ref().and_then(|f| f.status().diverged);
        let Some(Divergence {
            why,
            position,
            written,
        }) = diverged
        else {
            return Ok(false);
        };
        self.input(Input::Diverged {
            why,
            at: Some((position, written)),
        })?;
        Ok(true)
    }
}
