//! What a CoServer reports: link alerts as links come and go, and the status the control
//! API serves.

use std::time::{Duration, Instant};

use super::Node;
use crate::control::{CopyProgress, PeerStatus, Percentiles, Status};

/// Percentiles sort their window (up to 4096 samples, tens of µs): the status recomputes
/// them at most this often, not at every turn of the event loop.
const PERCENTILES_EVERY: Duration = Duration::from_millis(100);

/// What the published status computes over time.
pub(super) struct Samples {
    /// Bytes sent on the links when last sampled, and when; the rate then.
    bytes: (Instant, u64, u64),
    /// The copy's bytes left when last sampled, and when; its rate then.
    copy: Option<(Instant, u64, u64)>,
    /// The output-commit delay and checkpoint-pause percentiles, and when computed.
    percentiles: Option<(Instant, Percentiles, Percentiles)>,
}

impl Default for Samples {
    fn default() -> Self {
        Self {
            bytes: (Instant::now(), 0, 0),
            copy: None,
            percentiles: None,
        }
    }
}

impl Samples {
    /// The links' send rate, sampled over a second or more, from `sent` bytes so far.
    fn bytes_per_s(&mut self, sent: u64) -> u64 {
        let (t, before, rate) = self.bytes;
        if t.elapsed() < Duration::from_secs(1) {
            return rate;
        }
        let r = (sent.saturating_sub(before) as f64 / t.elapsed().as_secs_f64()) as u64;
        self.bytes = (Instant::now(), sent, r);
        r
    }

    /// Whether the percentiles are due again.
    fn percentiles_due(&self) -> bool {
        self.percentiles
            .as_ref()
            .is_none_or(|(at, ..)| at.elapsed() >= PERCENTILES_EVERY)
    }
}

impl Node {
    /// Alerts when a link is lost or restored.
    pub(super) fn watch_links(&mut self, alive: bool) {
        let status = self.links.status();
        // A peer that left closes its links: expected, not alerted.
        let alive = alive && !self.session.lock().peer().left;
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

    /// The running copy's progress from what it has left (`left`) and began with
    /// (`began`), pages and disk bytes each; its rate over the last second or more.
    fn copy_progress(
        &mut self,
        left: Option<(usize, u64)>,
        began: Option<(usize, u64)>,
    ) -> Option<CopyProgress> {
        let bytes = |(pages, disk): (usize, u64)| pages as u64 * 4096 + disk;
        let (Some(left), Some(began)) = (left.map(bytes), began.map(bytes)) else {
            self.samples.copy = None;
            return None;
        };
        let now = Instant::now();
        let (at, before, rate) = *self.samples.copy.get_or_insert((now, left, 0));
        let rate = if now.duration_since(at) >= Duration::from_secs(1) {
            let r =
                (before.saturating_sub(left) as f64 / now.duration_since(at).as_secs_f64()) as u64;
            self.samples.copy = Some((now, left, r));
            r
        } else {
            rate
        };
        Some(CopyProgress {
            total_bytes: began.max(left),
            copied_bytes: began.saturating_sub(left),
            bytes_per_s: rate,
            eta_s: (rate > 0).then(|| left as f64 / rate as f64),
        })
    }

    /// Publishes this node's status for the control API.
    pub(super) fn publish_status(&mut self, alive: bool) {
        let links = self.links.status();
        let sent: u64 = links.iter().map(|l| l.bytes_out).sum();
        let replication_bytes_per_s = self.samples.bytes_per_s(sent);
        // The windows are copied under their locks when due, and sorted after.
        let due = self.samples.percentiles_due();
        let mut delays_us = None;
        let mut pauses_us = None;
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
            replication_bytes_per_s,
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
            if due {
                delays_us = Some(p.delays_us().to_vec());
            }
            st.output_commit_delay_hist = p.delay_histogram().clone();
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
                if due {
                    pauses_us = Some(s.pauses_us.clone());
                }
                st.checkpoint_pause_hist = s.pause_hist.clone();
                st.copy_left = s.sync_left;
                st.last_copy = s.last_copy;
            }
        }
        if due {
            self.samples.percentiles = Some((
                Instant::now(),
                delays_us.map_or_else(Percentiles::default, Percentiles::of),
                pauses_us.map_or_else(Percentiles::default, Percentiles::of),
            ));
        }
        if let Some((_, delay, pause)) = &self.samples.percentiles {
            st.output_commit_delay_us = delay.clone();
            st.checkpoint_pause_us = pause.clone();
        }
        st.copy = self.copy_progress(st.copy_left, st.last_copy);
        if let Ok(mut s) = self.status.lock() {
            *s = st;
        }
    }
}
