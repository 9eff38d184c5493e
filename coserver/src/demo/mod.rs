//! `ftvm demo`: a CoServer pair on this machine. Two CoServers on two loopback links run
//! the built-in guest with a disk; the demo shows their status, kills the primary with
//! SIGKILL partway, and shows the guest carrying on on the other CoServer.
//!
//! Without network (not root, or `--network off`) the guest runs the `disk` workload,
//! slowed to one block per request, to a clean disk verification. With network (root),
//! the demo makes a namespace of its own with a bridge and a tap per CoServer, the guest
//! runs the `net` workload, and a TCP client SETs keys over one connection across the
//! failover and reads them all back.

mod network;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{self, Receiver, Sender};
use std::time::{Duration, Instant};

use crate::config::{
    ArbiterConfig, Config, ControlConfig, GuestConfig, HeartbeatConfig, HostConfig, LinkConfig,
    ReplicationConfig, SecurityConfig,
};
use crate::control;

/// Errors of the demo.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    /// Setting up files or processes.
    #[error("demo: {0}")]
    Setup(String),
}

/// Options of the demo.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    /// Seconds of protected running before the primary is killed.
    pub kill_after: Duration,
    /// Blocks the guest's disk workload writes and verifies.
    pub blocks: u64,
    /// Keep the demo's directory (configs, disk replicas) here instead of a temporary one.
    pub dir: Option<PathBuf>,
    /// Give the guest a network and run a TCP client (needs root).
    pub network: bool,
    /// How the pair replicates the guest.
    pub mode: crate::protocol::ReplicationMode,
}

struct Member {
    name: &'static str,
    control: String,
    child: Child,
}

fn setup(e: impl std::fmt::Display) -> DemoError {
    DemoError::Setup(e.to_string())
}

/// A free loopback port.
fn free_port() -> Result<u16, DemoError> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").map_err(setup)?;
    Ok(l.local_addr().map_err(setup)?.port())
}

/// The configuration of demo member `name`: links on loopback ports (`(local, peer)`
/// pairs), the control API on `control`, the guest's command line and tap, the
/// replication mode.
fn config(
    dir: &Path,
    name: &str,
    links: &[(u16, u16)],
    control: u16,
    (cmdline, tap): (String, Option<String>),
    mode: crate::protocol::ReplicationMode,
) -> Config {
    let lo = |port| SocketAddr::from(([127, 0, 0, 1], port));
    Config {
        node: name.into(),
        guest: GuestConfig {
            kernel: None,
            cmdline,
            mem_mib: 64,
            mac: "52:54:00:f7:00:01".into(),
            ip: tap.as_ref().and_then(|_| network::GUEST_IP.parse().ok()),
            cpu_template: Default::default(),
            initrd: None,
            inputs: None,
        },
        host: HostConfig {
            disk: Some(dir.join(format!("disk-{name}.img"))),
            tap,
            state_dir: dir.join(format!("state-{name}")),
        },
        links: links
            .iter()
            .map(|&(local, peer)| LinkConfig {
                local: lo(local),
                peer: lo(peer),
            })
            .collect(),
        heartbeat: HeartbeatConfig {
            interval_ms: 20,
            misses: 5,
            ..HeartbeatConfig::default()
        },
        replication: ReplicationConfig {
            mode,
            epoch_ms: 10,
            ..ReplicationConfig::default()
        },
        arbiter: ArbiterConfig::SharedStorage {
            path: dir.join("arbiter"),
        },
        control: ControlConfig {
            listen: lo(control),
        },
        security: SecurityConfig {
            psk: Some("ftvm-demo-pre-shared-key".into()),
            psk_file: None,
            encrypt: true,
        },
    }
}

/// Console lines of both members, tagged, with arrival times.
type Lines = Receiver<(&'static str, Instant, String)>;

fn spawn(
    name: &'static str,
    cfg: &Path,
    control: String,
    tx: Sender<(&'static str, Instant, String)>,
) -> Result<Member, DemoError> {
    let exe = std::env::current_exe().map_err(setup)?;
    let mut cmd = Command::new(exe);
    cmd.args(["coserver", "--config"]).arg(cfg);
    if name == "a" {
        // A fresh pair: A's disk is the pair's data (B's blank replica is copied over).
        cmd.arg("--initial-primary");
    }
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(setup)?;
    let out = child.stdout.take().ok_or_else(|| setup("no stdout"))?;
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines() {
            let Ok(line) = line else { break };
            if tx.send((name, Instant::now(), line)).is_err() {
                break;
            }
        }
    });
    Ok(Member {
        name,
        control,
        child,
    })
}

fn status_line(m: &Member) -> String {
    match control::fetch(&m.control) {
        Ok(s) => format!(
            "{}: {}{} epoch {} pause p50 {} µs commit p50 {} µs",
            m.name,
            s.role,
            s.mode.map(|m| format!(" ({m})")).unwrap_or_default(),
            s.epoch,
            s.checkpoint_pause_us
                .p50
                .map_or("-".into(), |v| v.to_string()),
            s.output_commit_delay_us
                .p50
                .map_or("-".into(), |v| v.to_string()),
        ),
        Err(_) => format!("{}: not answering", m.name),
    }
}

fn drain(lines: &Lines) {
    while let Ok((who, _, line)) = lines.try_recv() {
        println!("[guest via {who}] {line}");
    }
}

/// Runs the demo; returns the guest's exit code.
pub fn run(opts: &DemoOptions) -> Result<i32, DemoError> {
    let tmp;
    let dir = match &opts.dir {
        Some(d) => {
            std::fs::create_dir_all(d).map_err(setup)?;
            d.clone()
        }
        None => {
            tmp = tempfile::tempdir().map_err(setup)?;
            tmp.path().to_path_buf()
        }
    };
    // The arbiter's directory, as an operator makes it once on the shared storage.
    std::fs::create_dir_all(dir.join("arbiter")).map_err(setup)?;
    let net = if opts.network {
        println!("== making network namespace with a bridge (10.0.99.1/24) and two taps");
        Some(network::DemoNet::create().map_err(setup)?)
    } else {
        None
    };
    let disk_mib = (opts.blocks * 4096).div_ceil(1 << 20) + 1;
    let guest = |name: &str| match net {
        Some(_) => (
            format!("workload=net ip={}/24", network::GUEST_IP),
            Some(format!("tap{name}")),
        ),
        None => (
            format!(
                "workload=disk blocks={} batch=1 pace_us=1000 progress=256",
                opts.blocks
            ),
            None,
        ),
    };
    let ports: Vec<u16> = (0..6).map(|_| free_port()).collect::<Result<_, _>>()?;
    let (la, lb) = (
        [(ports[0], ports[1]), (ports[2], ports[3])],
        [(ports[1], ports[0]), (ports[3], ports[2])],
    );
    let (tx, lines) = mpsc::channel();
    let mut members = Vec::new();
    for (name, links, control) in [("a", la, ports[4]), ("b", lb, ports[5])] {
        let img = dir.join(format!("disk-{name}.img"));
        std::fs::File::create(&img)
            .and_then(|f| f.set_len(disk_mib << 20))
            .map_err(setup)?;
        let cfg = dir.join(format!("{name}.toml"));
        let text = config(&dir, name, &links, control, guest(name), opts.mode)
            .to_toml()
            .map_err(setup)?;
        std::fs::write(&cfg, text).map_err(setup)?;
        println!(
            "== starting CoServer {name} ({}, {} mode)",
            cfg.display(),
            opts.mode.name()
        );
        members.push(spawn(
            name,
            &cfg,
            format!("127.0.0.1:{control}"),
            tx.clone(),
        )?);
        std::thread::sleep(Duration::from_millis(800));
    }
    drop(tx);
    let (go, ready) = mpsc::channel();
    let client = net
        .as_ref()
        .map(|_| std::thread::spawn(move || network::client(ready, 300)));
    let mut go = Some(go);
    let start = Instant::now();
    let mut protected_at = None;
    let mut killed = None;
    let mut next_status = Instant::now();
    loop {
        drain(&lines);
        if Instant::now() >= next_status {
            next_status = Instant::now() + Duration::from_millis(500);
            let line: Vec<String> = members.iter().map(status_line).collect();
            println!("== status: {}", line.join(" | "));
            if protected_at.is_none() && line.iter().any(|l| l.contains("(protected)")) {
                protected_at = Some(Instant::now());
                if let Some(go) = go.take() {
                    let _ = go.send(());
                }
            }
        }
        if killed.is_none() && protected_at.is_some_and(|t| t.elapsed() >= opts.kill_after) {
            if let Some(i) = members
                .iter()
                .position(|m| status_line(m).contains(": primary"))
            {
                println!(
                    "== killing the primary, CoServer {} (SIGKILL)",
                    members[i].name
                );
                let t = Instant::now();
                let _ = members[i].child.kill();
                let _ = members[i].child.wait();
                killed = Some(members[i].name);
                let other = &members[1 - i];
                while t.elapsed() < Duration::from_secs(10)
                    && !control::fetch(&other.control).is_ok_and(|s| s.role == "primary")
                {
                    std::thread::sleep(Duration::from_millis(5));
                }
                println!(
                    "== CoServer {} took over {:.1} ms after the kill",
                    other.name,
                    t.elapsed().as_secs_f64() * 1000.0
                );
            }
        }
        let mut done = None;
        for m in &mut members {
            if Some(m.name) == killed {
                continue;
            }
            if let Ok(Some(s)) = m.child.try_wait() {
                done = Some((m.name, s.code().unwrap_or(125)));
            }
        }
        if let Some((name, code)) = done {
            std::thread::sleep(Duration::from_millis(100));
            drain(&lines);
            for m in &mut members {
                let _ = m.child.kill();
                let _ = m.child.wait();
            }
            println!("== the guest powered off on CoServer {name} with exit code {code}");
            drop(go);
            if let Some(c) = client {
                if c.is_finished() {
                    match c.join() {
                        Ok(Ok(())) => {}
                        Ok(Err(e)) => return Err(setup(format!("the client failed: {e}"))),
                        Err(_) => return Err(setup("the client thread panicked")),
                    }
                }
            }
            drop(net);
            return Ok(code);
        }
        if start.elapsed() > Duration::from_secs(300) {
            for m in &mut members {
                let _ = m.child.kill();
            }
            return Err(setup("the guest did not finish within 5 minutes"));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
