//! The control API: a CoServer's status as JSON over HTTP (`GET /status`, served on the
//! CoServer's tokio runtime), and the `ftvm ctl` client that prints it.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};

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
    /// Percentiles of `values`.
    pub fn of(values: &[u64]) -> Self {
        let mut v = values.to_vec();
        v.sort_unstable();
        let at = |q: f64| (!v.is_empty()).then(|| v[((v.len() - 1) as f64 * q).round() as usize]);
        Self {
            p50: at(0.5),
            p99: at(0.99),
            samples: v.len(),
        }
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
    /// Replication bytes per second sent over all links (last second).
    pub replication_bytes_per_s: u64,
    /// Acknowledgements rejected: for an epoch never sent, or of another copy.
    #[serde(default)]
    pub rejected_acks: u64,
    /// Pages and disk bytes still to copy to a joining secondary.
    pub copy_left: Option<(usize, u64)>,
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

/// Serves `status` on `addr` (HTTP, `GET /status` as JSON) as a task of `runtime`.
pub fn serve(
    addr: SocketAddr,
    status: Arc<Mutex<Status>>,
    runtime: &tokio::runtime::Handle,
) -> Result<(), ControlError> {
    let listen = |e: std::io::Error| ControlError::Listen {
        addr,
        message: e.to_string(),
    };
    let std_listener = std::net::TcpListener::bind(addr).map_err(listen)?;
    std_listener.set_nonblocking(true).map_err(listen)?;
    let listener = {
        let _guard = runtime.enter();
        tokio::net::TcpListener::from_std(std_listener).map_err(listen)?
    };
    let app = axum::Router::new()
        .route(
            "/status",
            axum::routing::get(move || {
                let s = status.lock().map(|s| s.clone()).unwrap_or_default();
                async move { axum::Json(s) }
            }),
        )
        .fallback(|| async {
            (
                axum::http::StatusCode::NOT_FOUND,
                axum::Json(serde_json::json!({ "error": "not found; try /status" })),
            )
        });
    runtime.spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!("control API stopped: {e}");
        }
    });
    Ok(())
}

/// Fetches the status from the CoServer at `addr` (host:port).
pub fn fetch(addr: &str) -> Result<Status, ControlError> {
    let connect = |source| ControlError::Connect {
        addr: addr.to_string(),
        source,
    };
    let mut s = TcpStream::connect(addr).map_err(connect)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(connect)?;
    write!(s, "GET /status HTTP/1.0\r\nHost: {addr}\r\n\r\n").map_err(connect)?;
    let mut answer = String::new();
    s.read_to_string(&mut answer).map_err(connect)?;
    let bad = |message: String| ControlError::Answer {
        addr: addr.to_string(),
        message,
    };
    let (head, body) = answer
        .split_once("\r\n\r\n")
        .ok_or_else(|| bad("no HTTP header".into()))?;
    if !head.starts_with("HTTP/1.") || head.split_whitespace().nth(1).is_none_or(|c| c != "200") {
        return Err(bad(head.lines().next().unwrap_or("").to_string()));
    }
    serde_json::from_str(body).map_err(|e| bad(e.to_string()))
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
    if let Some((pages, bytes)) = s.copy_left {
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
        let p = Percentiles::of(&[5, 1, 3, 2, 4]);
        assert_eq!((p.p50, p.p99, p.samples), (Some(3), Some(5), 5));
        assert_eq!(Percentiles::of(&[]).p50, None);
    }

    #[test]
    fn status_is_served_and_fetched() {
        let status = Arc::new(Mutex::new(Status {
            node: "a".into(),
            role: "primary".into(),
            ..Status::default()
        }));
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        serve(addr, status, rt.handle()).unwrap();
        let got = fetch(&addr.to_string()).unwrap();
        assert_eq!((got.node.as_str(), got.role.as_str()), ("a", "primary"));
        assert!(render(&got).starts_with("node a: primary"));
        assert!(fetch("127.0.0.1:1").is_err());
    }
}
