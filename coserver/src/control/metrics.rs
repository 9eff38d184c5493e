//! The status in the Prometheus text exposition format (version 0.0.4), for `GET
//! /metrics`.

use std::fmt::Write;

use super::{Histogram, Status};

/// Roles and modes a node reports, one series each (the current one is 1).
const ROLES: [&str; 4] = ["starting", "primary", "secondary", "fenced"];
const MODES: [&str; 6] = [
    "degraded",
    "syncing",
    "awaiting-full-ack",
    "protected",
    "copying",
    "ready",
];

/// Writes metric families: `# HELP` and `# TYPE` once each, then its samples.
struct Families {
    out: String,
    node: String,
}

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

impl Families {
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.out, "# HELP {name} {help}");
        let _ = writeln!(self.out, "# TYPE {name} {kind}");
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: f64) {
        let mut l = format!("node=\"{}\"", escape(&self.node));
        for (k, v) in labels {
            let _ = write!(l, ",{k}=\"{}\"", escape(v));
        }
        let _ = writeln!(self.out, "{name}{{{l}}} {value}");
    }

    fn one(&mut self, name: &str, kind: &str, help: &str, value: f64) {
        self.family(name, kind, help);
        self.sample(name, &[], value);
    }

    /// A histogram in seconds of durations counted in µs.
    fn histogram_us(&mut self, name: &str, help: &str, h: &Histogram) {
        self.family(name, "histogram", help);
        for (bound, n) in &h.buckets {
            let le = format!("{}", *bound as f64 / 1e6);
            self.sample(&format!("{name}_bucket"), &[("le", &le)], *n as f64);
        }
        self.sample(&format!("{name}_bucket"), &[("le", "+Inf")], h.count as f64);
        self.sample(&format!("{name}_sum"), &[], h.sum_us as f64 / 1e6);
        self.sample(&format!("{name}_count"), &[], h.count as f64);
    }
}

fn flag(b: bool) -> f64 {
    if b {
        1.0
    } else {
        0.0
    }
}

/// The status `s` as Prometheus metrics.
pub fn render_metrics(s: &Status) -> String {
    let mut f = Families {
        out: String::new(),
        node: s.node.clone(),
    };
    f.family(
        "ftvm_role",
        "gauge",
        "The node's role (1 for the current one).",
    );
    for r in ROLES {
        f.sample("ftvm_role", &[("role", r)], flag(s.role == r));
    }
    f.family(
        "ftvm_mode",
        "gauge",
        "A primary's replication mode, or a secondary's replica (1 for the current one).",
    );
    for m in MODES {
        f.sample(
            "ftvm_mode",
            &[("mode", m)],
            flag(s.mode.as_deref() == Some(m)),
        );
    }
    f.family(
        "ftvm_replication_info",
        "gauge",
        "The replication mode the node is configured with.",
    );
    f.sample(
        "ftvm_replication_info",
        &[("replication", &s.replication)],
        1.0,
    );
    f.one(
        "ftvm_guest_running",
        "gauge",
        "Whether the guest runs on this node.",
        flag(s.guest_running),
    );
    f.one(
        "ftvm_generation",
        "gauge",
        "The highest arbiter generation this node knows.",
        s.generation as f64,
    );
    f.family("ftvm_peer_alive", "gauge", "Whether the peer is heard.");
    f.sample(
        "ftvm_peer_alive",
        &[
            ("peer", s.peer.name.as_deref().unwrap_or("")),
            ("peer_role", s.peer.role.as_deref().unwrap_or("")),
        ],
        flag(s.peer.alive),
    );
    if let Some(ms) = s.peer.last_heard_ms {
        f.one(
            "ftvm_peer_last_heard_seconds",
            "gauge",
            "Time since the peer was last heard.",
            ms as f64 / 1e3,
        );
    }
    let link = |f: &mut Families,
                name: &str,
                kind: &str,
                help: &str,
                v: &dyn Fn(&crate::link::LinkStatus) -> Option<f64>| {
        f.family(name, kind, help);
        for l in &s.links {
            if let Some(value) = v(l) {
                f.sample(
                    name,
                    &[("link", &l.name), ("local", &l.local), ("peer", &l.peer)],
                    value,
                );
            }
        }
    };
    link(
        &mut f,
        "ftvm_link_up",
        "gauge",
        "Whether the link is connected and heard.",
        &|l| Some(flag(l.healthy)),
    );
    link(
        &mut f,
        "ftvm_link_rtt_seconds",
        "gauge",
        "The link's last measured round trip.",
        &|l| l.rtt_ms.map(|r| r / 1e3),
    );
    link(
        &mut f,
        "ftvm_link_frames_received_total",
        "counter",
        "Frames received and accepted.",
        &|l| Some(l.frames_in as f64),
    );
    link(
        &mut f,
        "ftvm_link_frames_sent_total",
        "counter",
        "Frames queued for sending.",
        &|l| Some(l.frames_out as f64),
    );
    link(
        &mut f,
        "ftvm_link_received_bytes_total",
        "counter",
        "Bytes received in accepted frames.",
        &|l| Some(l.bytes_in as f64),
    );
    link(
        &mut f,
        "ftvm_link_sent_bytes_total",
        "counter",
        "Bytes queued for sending.",
        &|l| Some(l.bytes_out as f64),
    );
    link(
        &mut f,
        "ftvm_link_bad_frames_total",
        "counter",
        "Connections dropped for not speaking the protocol.",
        &|l| Some(l.bad_frames as f64),
    );
    link(
        &mut f,
        "ftvm_link_auth_failures_total",
        "counter",
        "Connections or frames that failed authentication.",
        &|l| Some(l.auth_failures as f64),
    );
    f.one(
        "ftvm_position",
        "gauge",
        "The last epoch or log position sealed (primary) or applied (secondary).",
        s.epoch as f64,
    );
    f.one(
        "ftvm_acked_position",
        "gauge",
        "The highest position the secondary acknowledged (primary).",
        s.acked_epoch as f64,
    );
    f.histogram_us(
        "ftvm_checkpoint_pause_seconds",
        "The guest's pause at each cut, since it started on this node.",
        &s.checkpoint_pause_hist,
    );
    f.histogram_us(
        "ftvm_output_commit_delay_seconds",
        "How long released output waited for the secondary, since this node became primary.",
        &s.output_commit_delay_hist,
    );
    f.one(
        "ftvm_replication_bytes_per_second",
        "gauge",
        "Bytes sent to the peer over all links in the last second.",
        s.replication_bytes_per_s as f64,
    );
    f.one(
        "ftvm_rejected_acks_total",
        "counter",
        "Acknowledgements rejected (of no position sent, or of another copy).",
        s.rejected_acks as f64,
    );
    f.one(
        "ftvm_resyncs_total",
        "counter",
        "New copies asked for since this process started.",
        s.resyncs as f64,
    );
    if let Some(lag) = s.lag_exits {
        f.one(
            "ftvm_lockstep_lag_exits",
            "gauge",
            "Exits the secondary's guest is behind (lockstep primary).",
            lag as f64,
        );
    }
    if let Some(c) = &s.copy {
        f.one(
            "ftvm_copy_total_bytes",
            "gauge",
            "Bytes the running copy to a secondary began with.",
            c.total_bytes as f64,
        );
        f.one(
            "ftvm_copy_copied_bytes",
            "gauge",
            "Bytes of the running copy sent so far.",
            c.copied_bytes as f64,
        );
        f.one(
            "ftvm_copy_bytes_per_second",
            "gauge",
            "The running copy's rate.",
            c.bytes_per_s as f64,
        );
    }
    f.one(
        "ftvm_alerts",
        "gauge",
        "Alerts the node holds (the last 100).",
        s.alerts.len() as f64,
    );
    f.out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_sample_line_is_well_formed() {
        let s = Status {
            node: "a \"quoted\"".into(),
            role: "primary".into(),
            mode: Some("protected".into()),
            links: vec![crate::link::LinkStatus {
                name: "link0".into(),
                healthy: true,
                rtt_ms: Some(0.25),
                ..Default::default()
            }],
            ..Status::default()
        };
        let m = render_metrics(&s);
        assert!(
            m.contains("ftvm_role{node=\"a \\\"quoted\\\"\",role=\"primary\"} 1"),
            "{m}"
        );
        assert!(
            m.contains("ftvm_mode{node=\"a \\\"quoted\\\"\",mode=\"protected\"} 1"),
            "{m}"
        );
        assert!(
            m.contains(",link=\"link0\",local=\"\",peer=\"\"} 0.00025"),
            "{m}"
        );
        for line in m.lines().filter(|l| !l.starts_with('#')) {
            let (series, value) = line.rsplit_once(' ').expect(line);
            assert!(value.parse::<f64>().is_ok(), "{line}");
            assert!(
                series.starts_with("ftvm_") && series.ends_with('}'),
                "{line}"
            );
        }
    }

    #[test]
    fn histograms_are_cumulative_buckets_in_seconds() {
        let mut h = Histogram::default();
        h.observe(120);
        let m = render_metrics(&Status {
            checkpoint_pause_hist: h,
            ..Status::default()
        });
        for expected in [
            "# TYPE ftvm_checkpoint_pause_seconds histogram",
            "ftvm_checkpoint_pause_seconds_bucket{node=\"\",le=\"0.0001\"} 0",
            "ftvm_checkpoint_pause_seconds_bucket{node=\"\",le=\"0.00025\"} 1",
            "ftvm_checkpoint_pause_seconds_bucket{node=\"\",le=\"+Inf\"} 1",
            "ftvm_checkpoint_pause_seconds_sum{node=\"\"} 0.00012",
            "ftvm_checkpoint_pause_seconds_count{node=\"\"} 1",
        ] {
            assert!(m.contains(expected), "{expected}:\n{m}");
        }
    }
}
