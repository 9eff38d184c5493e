//! What a CoServer reports: link alerts as links come and go, and the status the control
//! API serves.

use std::time::{Duration, Instant};

use super::Node;
use crate::control::{PeerStatus, Percentiles, Status};

impl Node {
    /// Alerts when a link is lost or restored.
    pub(super) fn watch_links(&mut self, alive: bool) {
        let status = self.links.status();
        for (i, l) in status.iter().enumerate() {
            if l.healthy {
                if !self.link_was_healthy[i]
                    && self
                        .alerts
                        .iter()
                        .any(|a| a.contains(&format!("{} lost", l.name)))
                {
                    self.alert(format!("{} restored", l.name));
                }
                self.link_was_healthy[i] = true;
            } else if self.link_was_healthy[i] {
                self.link_was_healthy[i] = false;
                if alive {
                    self.alert(format!(
                        "{} lost ({} -> {}); the pair carries on over the others",
                        l.name, l.local, l.peer
                    ));
                }
            }
        }
    }

    /// Publishes this node's status for the control API.
    pub(super) fn publish_status(&mut self, alive: bool) {
        let links = self.links.status();
        let sent: u64 = links.iter().map(|l| l.bytes_out).sum();
        let (t, _, rate) = self.bytes_sample;
        if t.elapsed() >= Duration::from_secs(1) {
            let (_, before, _) = self.bytes_sample;
            let r = ((sent - before.min(sent)) as f64 / t.elapsed().as_secs_f64()) as u64;
            self.bytes_sample = (Instant::now(), sent, r);
        } else {
            self.bytes_sample.2 = rate;
        }
        let session = self.session.lock();
        let peer = session.peer().clone();
        let mut st = Status {
            node: self.cfg.node.clone(),
            role: session.role().name().to_string(),
            arbiter: self.arbiter.describe(),
            generation: session.generation(),
            peer: PeerStatus {
                name: peer.name,
                role: peer.role.map(|r| r.name().to_string()),
                alive,
                last_heard_ms: self
                    .links
                    .last_heard()
                    .map(|t| t.elapsed().as_millis() as u64),
            },
            links,
            replication_bytes_per_s: self.bytes_sample.2,
            alerts: self.alerts.clone(),
            replica: Some(self.record.standing()),
            waiting: session.waiting().map(str::to_string),
            replication: self.cfg.replication.mode.name().to_string(),
            resyncs: session.resyncs(),
            executed: self.follower.as_ref().and_then(|f| f.status().executed),
            mirror: self.mirror.as_ref().map(|m| m.window().counts()),
            ..Status::default()
        };
        if let Some(p) = session.primary() {
            st.mode = Some(p.mode().name().to_string());
            st.epoch = p.epoch();
            st.acked_epoch = p.acked();
            st.rejected_acks = p.rejected_acks();
            st.output_commit_delay_us = Percentiles::of(p.delays_us());
            st.lag_exits = p.lag_exits();
            st.lag_us = p.lag_time().map(|t| t.as_micros() as u64);
        }
        if let Some(rep) = session.replica() {
            st.epoch = rep.last_epoch().unwrap_or(0);
            st.mode = Some(if rep.is_ready() { "ready" } else { "copying" }.to_string());
        }
        drop(session);
        if let Some(r) = &self.running {
            if let Ok(s) = r.stats.lock() {
                st.guest_running = s.finished.is_none();
                st.checkpoint_pause_us = Percentiles::of(&s.pauses_us);
                st.copy_left = s.sync_left;
                st.last_copy = s.last_copy;
            }
        }
        if let Ok(mut s) = self.status.lock() {
            *s = st;
        }
    }
}
