//! The operator API: a CoServer's status and the operator's actions over HTTP, served
//! on the CoServer's tokio runtime (`server`), and the `ftvm ctl` client (`client`).
//!
//! - `GET /status`: the [`Status`] as JSON; `GET /metrics`: the same in the Prometheus
//!   text format (`metrics`); `GET /`: a read-only status page refreshing itself
//!   (`page`).
//! - `POST /actions/{switchover,leave,reload}`: an [`OperatorAction`], carried out by
//!   the node's event loop and answered with an [`ActionAnswer`]. Accepted from the
//!   loopback interface, and from elsewhere only with the token kept in the state
//!   directory (`token`).

mod client;
mod metrics;
mod page;
mod server;
mod token;

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

pub use client::{act, fetch, fetch_text};
pub use metrics::render_metrics;
pub use server::{serve, ActionRequest, Requests};
pub use token::{load_or_create_token, TOKEN_FILE};

use crate::link::LinkStatus;

/// Errors of the control API.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// The server cannot listen.
    #[error("control API cannot listen on {addr}: {message}")]
    Listen {
        /// Address.
        addr: SocketAddr,
        /// Cause.
        message: String,
    },
    /// The client cannot reach a CoServer.
    #[error("cannot reach the CoServer at {addr}: {source}")]
    Connect {
        /// Address.
        addr: String,
        /// Cause.
        source: std::io::Error,
    },
    /// The answer is not a status.
    #[error("unexpected answer from {addr}: {message}")]
    Answer {
        /// Address.
        addr: String,
        /// What is wrong.
        message: String,
    },
    /// The CoServer refused the action.
    #[error("{action} refused: {message}")]
    Refused {
        /// The action.
        action: &'static str,
        /// Why.
        message: String,
    },
    /// The action token cannot be read or created.
    #[error("control token {path}: {source}")]
    Token {
        /// Its file.
        path: std::path::PathBuf,
        /// Cause.
        source: std::io::Error,
    },
}

/// What an operator asks a running CoServer to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OperatorAction {
    /// A protected primary hands the guest to its secondary.
    Switchover,
    /// A secondary leaves the pair cleanly (the primary runs on degraded).
    Leave,
    /// Re-read the configuration file (new peer link addresses).
    Reload,
    /// A starting node that waits runs the guest from its own replica, the operator
    /// vouching that the other host is gone for good.
    ForcePrimary,
}

impl OperatorAction {
    /// Every action.
    pub const ALL: [OperatorAction; 4] = [
        OperatorAction::Switchover,
        OperatorAction::Leave,
        OperatorAction::Reload,
        OperatorAction::ForcePrimary,
    ];

    /// Its name in the API's path.
    pub fn name(self) -> &'static str {
        match self {
            OperatorAction::Switchover => "switchover",
            OperatorAction::Leave => "leave",
            OperatorAction::Reload => "reload",
            OperatorAction::ForcePrimary => "force-primary",
        }
    }

    /// The action called `name`.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|a| a.name() == name)
    }
}

/// The answer to an action.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ActionAnswer {
    /// Whether the CoServer does it.
    pub accepted: bool,
    /// What it does, or why not.
    pub message: String,
}

/// The progress of a copy to a joining secondary (primary).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct CopyProgress {
    /// Bytes of memory and disk the copy had to send when it began (pages the guest
    /// dirtied again meanwhile are sent again and not counted).
    pub total_bytes: u64,
    /// Bytes of those sent so far.
    pub copied_bytes: u64,
    /// Bytes copied per second (last second).
    pub bytes_per_s: u64,
    /// Seconds left at that rate.
    pub eta_s: Option<f64>,
}

impl CopyProgress {
    /// The copy as a progress bar `width` characters wide, with its figures.
    pub fn bar(&self, width: usize) -> String {
        let done = if self.total_bytes == 0 {
            1.0
        } else {
            (self.copied_bytes as f64 / self.total_bytes as f64).min(1.0)
        };
        let filled = (done * width as f64).round() as usize;
        let mib = |b: u64| b as f64 / (1 << 20) as f64;
        format!(
            "[{}{}] {:3.0}% {:.1} of {:.1} MiB, {:.1} MiB/s, {} left",
            "#".repeat(filled),
            "-".repeat(width - filled.min(width)),
            done * 100.0,
            mib(self.copied_bytes),
            mib(self.total_bytes),
            mib(self.bytes_per_s),
            self.eta_s.map_or("?".to_string(), |s| format!("{s:.1} s"))
        )
    }
}

/// Percentiles of a recent sample.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Percentiles {
    /// Median.
    pub p50: Option<u64>,
    /// 99th percentile.
    pub p99: Option<u64>,
    /// Sample size.
    pub samples: usize,
}

impl Percentiles {
    /// Percentiles of the samples `v` (sorted in place).
    pub fn of(mut v: Vec<u64>) -> Self {
        v.sort_unstable();
        let at = |q: f64| (!v.is_empty()).then(|| v[((v.len() - 1) as f64 * q).round() as usize]);
        Self {
            p50: at(0.5),
            p99: at(0.99),
            samples: v.len(),
        }
    }
}

/// Upper bounds (µs) of the buckets of a [`Histogram`].
pub const HISTOGRAM_BOUNDS_US: [u64; 12] = [
    50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000,
];

/// A cumulative histogram of durations, as Prometheus keeps one: for each upper bound
/// of [`HISTOGRAM_BOUNDS_US`], how many observations were at most that long.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Histogram {
    /// (upper bound µs, observations at most that long), bounds ascending.
    pub buckets: Vec<(u64, u64)>,
    /// Observations.
    pub count: u64,
    /// Their sum (µs).
    pub sum_us: u64,
}

impl Histogram {
    /// Counts one observation of `us` microseconds.
    pub fn observe(&mut self, us: u64) {
        if self.buckets.is_empty() {
            self.buckets = HISTOGRAM_BOUNDS_US.iter().map(|b| (*b, 0)).collect();
        }
        for (bound, n) in &mut self.buckets {
            if us <= *bound {
                *n += 1;
            }
        }
        self.count += 1;
        self.sum_us += us;
    }
}

/// What the peer looks like from here.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct PeerStatus {
    /// Its node name, once known.
    pub name: Option<String>,
    /// Its role as it last said.
    pub role: Option<String>,
    /// Heard within the heartbeat timeout.
    pub alive: bool,
    /// Time since it was last heard (ms).
    pub last_heard_ms: Option<u64>,
}

/// A CoServer's status.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Status {
    /// This node.
    pub node: String,
    /// starting / primary / secondary / fenced.
    pub role: String,
    /// For a primary: degraded / syncing / awaiting-full-ack / protected.
    pub mode: Option<String>,
    /// Whether this node runs the guest now.
    pub guest_running: bool,
    /// The arbiter and the highest generation this node knows.
    pub arbiter: String,
    /// Generation.
    pub generation: u64,
    /// The peer.
    pub peer: PeerStatus,
    /// Each link.
    pub links: Vec<LinkStatus>,
    /// Last epoch sealed (primary) or applied (secondary).
    pub epoch: u64,
    /// Highest epoch acknowledged (primary).
    pub acked_epoch: u64,
    /// Checkpoint pause (µs).
    pub checkpoint_pause_us: Percentiles,
    /// Output-commit delay (µs).
    pub output_commit_delay_us: Percentiles,
    /// Every checkpoint pause of the guest running here (since it started here).
    #[serde(default)]
    pub checkpoint_pause_hist: Histogram,
    /// Every output-commit delay since this node became primary.
    #[serde(default)]
    pub output_commit_delay_hist: Histogram,
    /// Replication bytes per second sent over all links (last second).
    pub replication_bytes_per_s: u64,
    /// Acknowledgements rejected: for an epoch never sent, or of another copy.
    #[serde(default)]
    pub rejected_acks: u64,
    /// Pages and disk bytes still to copy to a joining secondary.
    pub copy_left: Option<(usize, u64)>,
    /// The copy to a joining secondary, while one runs (primary).
    #[serde(default)]
    pub copy: Option<CopyProgress>,
    /// Pages and disk bytes the last copy to a secondary began with.
    #[serde(default)]
    pub last_copy: Option<(usize, u64)>,
    /// What this host's disk replica holds, as recorded in its state directory.
    #[serde(default)]
    pub replica: Option<crate::protocol::Standing>,
    /// Why a starting node does not start the guest, while it waits.
    #[serde(default)]
    pub waiting: Option<String>,
    /// The replication mode: checkpoint or lockstep.
    #[serde(default)]
    pub replication: String,
    /// Lockstep: how many exits the secondary's guest is behind the primary's (primary,
    /// while protected).
    #[serde(default)]
    pub lag_exits: Option<u64>,
    /// Lockstep: how long ago (µs) the oldest slice the secondary's guest has not
    /// executed was cut (primary, while protected).
    #[serde(default)]
    pub lag_us: Option<u64>,
    /// Lockstep: the last position the replica's guest executed and its exit there
    /// (secondary).
    #[serde(default)]
    pub executed: Option<(u64, u64)>,
    /// New copies asked for since this process started: by a secondary whose lockstep
    /// replica diverged, or of a primary by its secondary.
    #[serde(default)]
    pub resyncs: u64,
    /// What this host's tap hears of the guest's inbound frames while the guest runs
    /// on the peer (`unicast_heard`: whether the LAN delivers the guest's frames here
    /// too, which a takeover without a gap needs); `None` while the guest runs here or
    /// without a tap.
    #[serde(default)]
    pub mirror: Option<crate::replication::inbound::MirrorCounts>,
    /// Alerts, oldest first.
    pub alerts: Vec<String>,
}

fn opt(v: Option<u64>, unit: &str) -> String {
    v.map_or("-".to_string(), |v| format!("{v} {unit}"))
}

/// The status for people.
pub fn render(s: &Status) -> String {
    let mut out = format!(
        "node {}: {}{}{}\n",
        s.node,
        s.role,
        s.mode
            .as_ref()
            .map(|m| format!(" ({m})"))
            .unwrap_or_default(),
        if s.guest_running {
            ", guest running"
        } else {
            ""
        }
    );
    out += &format!(
        "peer: {} {} {}\n",
        s.peer.name.as_deref().unwrap_or("?"),
        s.peer.role.as_deref().unwrap_or("?"),
        if s.peer.alive { "alive" } else { "not heard" }
    );
    out += &format!("arbiter: {} (generation {})\n", s.arbiter, s.generation);
    if let Some(r) = &s.replica {
        out += &format!("replica: {}\n", r.describe());
    }
    if let Some(w) = &s.waiting {
        out += &format!("waiting: {w}\n");
    }
    for l in &s.links {
        out += &format!(
            "{}: {} -> {} {} {} rtt {} in {} out {} bad {} auth-fail {} evicted {}\n",
            l.name,
            l.local,
            l.peer,
            if l.healthy { "up" } else { "DOWN" },
            if l.encrypted {
                "encrypted"
            } else {
                "authenticated"
            },
            l.rtt_ms.map_or("-".into(), |r| format!("{r:.3} ms")),
            l.frames_in,
            l.frames_out,
            l.bad_frames,
            l.auth_failures,
            l.evicted
        );
    }
    out += &format!(
        "epochs: {} (acked {})\ncheckpoint pause: p50 {} p99 {}\noutput-commit delay: p50 {} p99 {}\nreplication: {} bytes/s\n",
        s.epoch,
        s.acked_epoch,
        opt(s.checkpoint_pause_us.p50, "µs"),
        opt(s.checkpoint_pause_us.p99, "µs"),
        opt(s.output_commit_delay_us.p50, "µs"),
        opt(s.output_commit_delay_us.p99, "µs"),
        s.replication_bytes_per_s
    );
    if !s.replication.is_empty() {
        out += &format!("replication mode: {}", s.replication);
        if let Some(lag) = s.lag_exits {
            out += &format!(", secondary {lag} exits behind");
        }
        if let Some(us) = s.lag_us {
            out += &format!(" ({:.1} ms)", us as f64 / 1000.0);
        }
        if let Some((position, exit)) = s.executed {
            out += &format!(", executed position {position} (exit {exit})");
        }
        out += &format!(", resyncs {}\n", s.resyncs);
    }
    if let Some(m) = &s.mirror {
        out += &format!(
            "guest's inbound frames heard here: {} ({} matched, {} missed, {} dropped) - {}\n",
            m.heard,
            m.matched,
            m.missed,
            m.overflowed,
            match m.unicast_heard {
                Some(true) => "the LAN delivers them here too: a takeover loses none",
                Some(false) => "NOT delivered here by the LAN: frames in flight at a takeover wait for the client to resend",
                None => "not known yet",
            }
        );
    }
    if let Some(c) = &s.copy {
        out += &format!("copy to secondary: {}\n", c.bar(30));
    } else if let Some((pages, bytes)) = s.copy_left {
        out += &format!("copy to secondary: {pages} pages and {bytes} disk bytes left\n");
    }
    for a in &s.alerts {
        out += &format!("alert: {a}\n");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles() {
        let p = Percentiles::of(vec![5, 1, 3, 2, 4]);
        assert_eq!((p.p50, p.p99, p.samples), (Some(3), Some(5), 5));
        assert_eq!(Percentiles::of(Vec::new()).p50, None);
    }

    #[test]
    fn histograms_count_cumulatively() {
        let mut h = Histogram::default();
        for us in [40, 100, 101, 3_000, 1_000_000] {
            h.observe(us);
        }
        let at = |bound| h.buckets.iter().find(|(b, _)| *b == bound).map(|(_, n)| *n);
        assert_eq!(
            (at(50), at(100), at(250), at(5_000), at(250_000)),
            (Some(1), Some(2), Some(3), Some(4), Some(4))
        );
        assert_eq!((h.count, h.sum_us), (5, 1_003_241));
    }

    #[test]
    fn actions_are_named_both_ways() {
        for a in OperatorAction::ALL {
            assert_eq!(OperatorAction::from_name(a.name()), Some(a));
        }
        assert_eq!(OperatorAction::from_name("reboot"), None);
    }

    #[test]
    fn copy_progress_bar() {
        let c = CopyProgress {
            total_bytes: 100 << 20,
            copied_bytes: 25 << 20,
            bytes_per_s: 50 << 20,
            eta_s: Some(1.5),
        };
        assert_eq!(
            c.bar(8),
            "[##------]  25% 25.0 of 100.0 MiB, 50.0 MiB/s, 1.5 s left"
        );
        let done = CopyProgress {
            copied_bytes: 100 << 20,
            ..c
        };
        assert!(done.bar(4).starts_with("[####] 100%"), "{}", done.bar(4));
    }
}
