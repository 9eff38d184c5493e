//! Failover benchmark (needs root: the namespaces, veth links and bridged taps of the
//! pair tests). Prints two tables:
//! - the gap a client sees (`FTVM_BENCH_ONLY=gap`): per replication mode and heartbeat
//!   setting, [`KILLS`] SIGKILLs of the primary spread over the client's request cycle
//!   and the epoch, with the LAN delivering the guest's frames to both hosts (and, for
//!   comparison, without): a TCP client making SETs one at a time (the longest SET, the
//!   runs whose socket retransmitted, read from `TCP_INFO`, every SET read back) and a
//!   UDP client sending a numbered datagram to the guest's echo port every 2 ms (the
//!   datagrams never echoed);
//! - false failovers (`FTVM_BENCH_ONLY=detection`): a protected pair with a busy guest
//!   (the key-value service storing every SET on its disk, one client making SETs
//!   without pause) while two spinning threads keep both host cores busy, per heartbeat
//!   setting, for `FTVM_DETECTION_SECS` seconds (default 600): how many times the
//!   arbiter was claimed (the generation rose) although no host failed.
//!
//! Run with `cargo bench -p ftvm-coserver --bench failover` (see docs/PERFORMANCE.md).

#[path = "../../tests/common/mod.rs"]
mod common;
#[path = "../../tests/common/pair.rs"]
mod pair;

use std::collections::HashSet;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpStream, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ftvm_coserver::netns;
use pair::{
    protected_pair, spec, tcp_retransmits, CoServer, GuestSpec, PairNet, ReplicationMode, GUEST_IP,
    LIMIT,
};

/// Kills per mode and setting (`FTVM_BENCH_KILLS` for a shorter try).
const KILLS: u32 = 24;

fn kills() -> u32 {
    std::env::var("FTVM_BENCH_KILLS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(KILLS)
}
/// The kill moves by this much each run: 24 points over about one epoch (10 ms) and
/// some ten request cycles of the client.
const KILL_SPREAD: Duration = Duration::from_micros(437);
/// SETs before the kill, and in all.
const SETS_BEFORE: u32 = 50;
const SETS: u32 = 150;
/// SETs begun this long after the kill count as across the failover.
const NEAR_KILL: Duration = Duration::from_millis(100);
/// The UDP client's pace.
const UDP_EVERY: Duration = Duration::from_millis(2);

fn main() {
    let only = std::env::var("FTVM_BENCH_ONLY").ok();
    println!("ftvm failover benchmark (2 veth links and a bridged LAN in namespaces)\n");
    if only.is_none() || only.as_deref() == Some("gap") {
        gap_rows();
    }
    if only.is_none() || only.as_deref() == Some("detection") {
        detection_rows();
    }
}

fn gap_rows() {
    let kills = kills();
    println!(
        "| {kills} SIGKILLs of the primary under a TCP and a UDP client | longest SET (min / median / max of the runs' longest) | runs with a TCP retransmission | SETs lost | datagrams not echoed (of sent) | gratuitous ARP after the arbiter's answer (max) | longest SET away from the kill (max) |\n|---|---|---|---|---|---|---|"
    );
    for mirrored in [true, false] {
        let Ok(net) = PairNet::try_create(if mirrored { "gm" } else { "gu" }) else {
            println!("failover benchmark SKIPPED: needs root for network namespaces");
            return;
        };
        if mirrored {
            net.mirror_lan();
        }
        for mode in [ReplicationMode::Checkpoint, ReplicationMode::Lockstep] {
            // The mirrored LAN at both settings the detection rows compare; without it,
            // the one its gap is known at.
            let heartbeats: &[(u64, u32)] = if mirrored {
                &[(5, 3), (10, 3)]
            } else {
                &[(10, 3)]
            };
            for &heartbeat in heartbeats {
                let mut worst = Vec::new();
                let mut garp = Duration::ZERO;
                let mut away = Duration::ZERO;
                let (mut retransmitted, mut sets_lost, mut sent, mut lost) = (0, 0, 0, 0);
                for run in 0..kills {
                    let r = kill_run(&net, mode, heartbeat, KILL_SPREAD * run);
                    worst.push(r.worst_set);
                    retransmitted += u32::from(r.retransmits > 0);
                    sets_lost += r.sets_lost;
                    sent += r.datagrams_sent;
                    lost += r.datagrams_lost;
                    garp = garp.max(r.garp);
                    away = away.max(r.worst_set_away);
                }
                println!(
                    "| {}, heartbeat {} ms x {}, LAN {} | {} | {retransmitted} of {kills} | {sets_lost} | {lost} of {sent} | {:.2} ms | {:.1} ms |",
                    mode.name(),
                    heartbeat.0,
                    heartbeat.1,
                    if mirrored {
                        "delivering the guest's frames to both hosts"
                    } else {
                        "not mirrored (the bridge learns where the guest is)"
                    },
                    spread(&mut worst),
                    garp.as_secs_f64() * 1000.0,
                    away.as_secs_f64() * 1000.0
                );
            }
        }
    }
}

/// What one kill cost the clients.
struct KillRun {
    worst_set: Duration,
    /// The longest of the SETs that neither were in flight at the kill nor began within
    /// [`NEAR_KILL`] after it: what the loaded machine costs a SET without a failover.
    worst_set_away: Duration,
    retransmits: u32,
    /// Acknowledged SETs that did not read back.
    sets_lost: u32,
    datagrams_sent: u64,
    datagrams_lost: u64,
    /// The survivor's gratuitous ARP after the arbiter's answer (its log).
    garp: Duration,
}

/// A UDP client of the guest's echo port: one numbered datagram every [`UDP_EVERY`]
/// until stopped; counts what came back.
struct Echoes {
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicU64>,
    sender: std::thread::JoinHandle<()>,
    receiver: std::thread::JoinHandle<HashSet<u64>>,
}

impl Echoes {
    fn start(net: &PairNet) -> Self {
        // A socket keeps the namespace it was made in.
        let socket = net.in_lan(|| {
            let s = UdpSocket::bind("10.0.99.1:0").expect("udp bind");
            s.connect((GUEST_IP, 7)).expect("udp connect");
            s
        });
        socket
            .set_read_timeout(Some(Duration::from_millis(20)))
            .expect("timeout");
        let stop = Arc::new(AtomicBool::new(false));
        let sent = Arc::new(AtomicU64::new(0));
        let tx = socket.try_clone().expect("udp clone");
        let sender = std::thread::spawn({
            let (stop, sent) = (stop.clone(), sent.clone());
            move || {
                let mut n = 0u64;
                while !stop.load(Ordering::SeqCst) {
                    let mut d = n.to_le_bytes().to_vec();
                    d.resize(64, 0xa5);
                    if tx.send(&d).is_ok() {
                        n += 1;
                        sent.store(n, Ordering::SeqCst);
                    }
                    std::thread::sleep(UDP_EVERY);
                }
            }
        });
        let receiver = std::thread::spawn({
            let stop = stop.clone();
            move || {
                let mut got = HashSet::new();
                let mut buf = [0u8; 128];
                let mut quiet_since: Option<Instant> = None;
                loop {
                    match socket.recv(&mut buf) {
                        Ok(n) if n >= 8 => {
                            got.insert(u64::from_le_bytes(buf[..8].try_into().unwrap_or([0; 8])));
                            quiet_since = None;
                        }
                        _ => {
                            // After the stop, stragglers for half a second.
                            if stop.load(Ordering::SeqCst) {
                                let q = *quiet_since.get_or_insert_with(Instant::now);
                                if q.elapsed() > Duration::from_millis(500) {
                                    return got;
                                }
                            }
                        }
                    }
                }
            }
        });
        Self {
            stop,
            sent,
            sender,
            receiver,
        }
    }

    /// Stops sending; (sent, not echoed).
    fn finish(self) -> (u64, u64) {
        self.stop.store(true, Ordering::SeqCst);
        self.sender.join().expect("udp sender");
        let got = self.receiver.join().expect("udp receiver");
        let sent = self.sent.load(Ordering::SeqCst);
        let lost = (0..sent).filter(|n| !got.contains(n)).count() as u64;
        (sent, lost)
    }
}

fn kv(c: &mut BufReader<TcpStream>, req: &str) -> String {
    pair::kv(c, req).expect("a reply from the guest")
}

/// One failover: SIGKILL of the primary `delay` after the TCP client's 50th SET.
fn kill_run(
    net: &PairNet,
    mode: ReplicationMode,
    heartbeat: (u64, u32),
    delay: Duration,
) -> KillRun {
    let dir = tempfile::tempdir().expect("tempdir");
    let g = GuestSpec {
        heartbeat,
        mode,
        ..spec(&format!("workload=net ip={GUEST_IP}/24"), 8, true)
    };
    let (mut a, mut b) = protected_pair(net, dir.path(), &g);
    let echoes = Echoes::start(net);
    let (tx, rx) = std::sync::mpsc::channel();
    let mut c = net.in_lan(|| {
        let s = TcpStream::connect((GUEST_IP, 7000)).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(20)))
            .expect("timeout");
        BufReader::new(s)
    });
    let client = std::thread::spawn(move || {
        // When each SET began, and how long it took.
        let mut sets = Vec::new();
        let mut before = 0;
        for i in 0..SETS {
            if i == SETS_BEFORE {
                before = tcp_retransmits(c.get_ref());
                tx.send(()).expect("signal");
            }
            let t = Instant::now();
            assert_eq!(kv(&mut c, &format!("SET k{i} v{i}")), "OK");
            sets.push((t, t.elapsed()));
        }
        let retransmits = tcp_retransmits(c.get_ref()) - before;
        let lost = (0..SETS)
            .filter(|i| kv(&mut c, &format!("GET k{i}")) != format!("VALUE v{i}"))
            .count() as u32;
        (c, sets, retransmits, lost)
    });
    rx.recv().expect("client started");
    std::thread::sleep(delay);
    let killed = Instant::now();
    a.kill();
    let (mut c, sets, retransmits, sets_lost) = client.join().expect("client");
    let worst_set = sets.iter().map(|&(_, took)| took).max().unwrap_or_default();
    let worst_set_away = sets
        .iter()
        .filter(|&&(began, took)| began + took < killed || began > killed + NEAR_KILL)
        .map(|&(_, took)| took)
        .max()
        .unwrap_or_default();
    // Datagrams across the failover and some after it.
    std::thread::sleep(Duration::from_millis(200));
    let (datagrams_sent, datagrams_lost) = echoes.finish();
    let _ = kv(&mut c, "SHUTDOWN");
    finish(&mut b);
    if std::env::var("FTVM_BENCH_LOG").is_ok() {
        // The new primary's own account of the takeover.
        eprintln!(
            "--- {} kill after {delay:?}: worst SET {worst_set:?}, {retransmits} retransmissions",
            mode.name()
        );
        for l in b.log().lines().filter(|l| {
            std::env::var("FTVM_BENCH_LOG").as_deref() == Ok("all")
                || l.contains("takeover")
                || l.contains("frames")
                || l.contains("arbiter")
        }) {
            eprintln!("{l}");
        }
    }
    let garp =
        garp_from_log(&b.log()).unwrap_or_else(|| panic!("no gratuitous ARP line:\n{}", b.log()));
    KillRun {
        garp,
        worst_set,
        worst_set_away,
        retransmits,
        sets_lost,
        datagrams_sent,
        datagrams_lost,
    }
}

/// The new primary's own figure ("takeover: gratuitous ARP sent X ms after ...").
fn garp_from_log(log: &str) -> Option<Duration> {
    const LINE: &str = "takeover: gratuitous ARP sent ";
    let at = log.find(LINE)?;
    let ms: f64 = log[at + LINE.len()..].split(' ').next()?.parse().ok()?;
    Some(Duration::from_secs_f64(ms / 1000.0))
}

/// Waits for the survivor to end with its guest.
fn finish(b: &mut CoServer) {
    if b.wait(LIMIT).is_none() {
        panic!("the survivor did not end:\n{}", b.log());
    }
}

/// "min / median / max ms" of `v`.
fn spread(v: &mut [Duration]) -> String {
    v.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    format!(
        "{:.1} / {:.1} / {:.1} ms",
        ms(v[0]),
        ms(v[v.len() / 2]),
        ms(v[v.len() - 1])
    )
}

fn detection_rows() {
    let secs: u64 = std::env::var("FTVM_DETECTION_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(600);
    println!(
        "\n| heartbeat (both cores kept busy by two spinning threads, {secs} s each) | SETs made (one client, each stored on the guest's disk) | arbiter claims without a failure (generation rises) | a primary's stalls, the arbiter asked (no claim) | a real-time thread of the bench woken later than the peer timeout |\n|---|---|---|---|---|"
    );
    for (interval, misses) in [(5u64, 3u32), (10, 3)] {
        let Ok(net) = PairNet::try_create("fd") else {
            println!("failover benchmark SKIPPED: needs root for network namespaces");
            return;
        };
        let dir = tempfile::tempdir().expect("tempdir");
        let g = GuestSpec {
            heartbeat: (interval, misses),
            ..spec(&format!("workload=net ip={GUEST_IP}/24"), 64, true)
        };
        let (a, b) = protected_pair(&net, dir.path(), &g);
        let generation = |s: &CoServer| s.typed().generation;
        let start_generation = generation(&a).max(generation(&b));
        let stop = Arc::new(AtomicBool::new(false));
        let hogs: Vec<_> = (0..2)
            .map(|_| {
                let stop = stop.clone();
                std::thread::spawn(move || {
                    let mut x = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        x = std::hint::black_box(
                            x.wrapping_mul(6364136223846793005).wrapping_add(1),
                        );
                    }
                })
            })
            .collect();
        // How long this host stops a thread that should run every millisecond: one of
        // real-time priority (above the spinners and both CoServers' threads), so what it
        // sees is the host itself (our VM's vCPUs stopped), not the load.
        let stall = std::thread::spawn({
            let stop = stop.clone();
            move || {
                let _ = ftvm_coserver::priority::raise_current_thread();
                let (mut worst, mut over) = (Duration::ZERO, 0u32);
                while !stop.load(Ordering::Relaxed) {
                    let t = Instant::now();
                    std::thread::sleep(Duration::from_millis(1));
                    let late = t.elapsed().saturating_sub(Duration::from_millis(1));
                    worst = worst.max(late);
                    over += u32::from(late > Duration::from_millis(interval * 3));
                }
                (worst, over)
            }
        });
        let sets = Arc::new(AtomicU64::new(0));
        let client = std::thread::spawn({
            let (stop, sets, ns) = (stop.clone(), sets.clone(), net.ns[2].clone());
            move || {
                netns::enter(&ns).expect("client namespace");
                while !stop.load(Ordering::SeqCst) {
                    let Ok(s) = TcpStream::connect((GUEST_IP, 7000)) else {
                        std::thread::sleep(Duration::from_millis(100));
                        continue;
                    };
                    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
                    let mut c = BufReader::new(s);
                    let mut i = 0u64;
                    while !stop.load(Ordering::SeqCst) {
                        let req = format!("SET k{} v{i}\n", i % 1000);
                        let mut r = String::new();
                        if c.get_mut().write_all(req.as_bytes()).is_err()
                            || c.read_line(&mut r).unwrap_or(0) == 0
                        {
                            break;
                        }
                        i += 1;
                        sets.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        });
        let end = Instant::now() + Duration::from_secs(secs);
        let mut claims = 0;
        while Instant::now() < end {
            std::thread::sleep(Duration::from_secs(1));
            claims = generation(&a).max(generation(&b)) - start_generation;
        }
        stop.store(true, Ordering::SeqCst);
        for h in hogs {
            let _ = h.join();
        }
        let _ = client.join();
        let (worst_stall, stalls) = stall.join().unwrap_or_default();
        // Stalls of a whole process that the arbiter was asked about (no claim).
        let checks: usize = [&a, &b]
            .iter()
            .map(|s| {
                s.log()
                    .lines()
                    .filter(|l| l.contains("whether the peer took over"))
                    .count()
            })
            .sum();
        println!(
            "| {interval} ms x {misses} (peer lost after {} ms) | {} | {claims} | {checks} | {stalls}, longest {:.1} ms |",
            interval * u64::from(misses),
            sets.load(Ordering::Relaxed),
            worst_stall.as_secs_f64() * 1e3
        );
        if claims > 0 {
            for (name, s) in [("A", &a), ("B", &b)] {
                for l in s.log().lines().filter(|l| {
                    l.contains("asking the arbiter")
                        || l.contains("peer lost")
                        || l.contains("claim")
                }) {
                    eprintln!("{name}: {l}");
                }
            }
        }
        drop((a, b));
    }
}
