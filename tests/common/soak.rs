//! A randomized fault soak of a protected pair (the test `pair_soak_e2e` runs 8 faults,
//! the benchmark `soak` 40): the guest serves its TCP key-value store (on its disk) to
//! a client that SETs keys over one connection, while faults drawn from a stated seed
//! hit the pair — SIGKILL and restart of either CoServer (within 1 s or after 2 s),
//! SIGSTOP beyond the failure timeout, one link down, all links down, all links cut in
//! one direction, a partition during a copy, both CoServers killed and restarted. After each fault, once the pair
//! is protected again, it checks that one CoServer runs the guest, that every SET the
//! client saw acknowledged reads back (each GET reads the guest's disk), and that the
//! guest's uptime never went back (it was not rebooted) unless both CoServers were down.
//! A monitor samples both CoServers' status throughout and counts samples where both
//! were primaries releasing output.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::io::BufReader;
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, TryRecvError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::pair::{
    kv, protected_pair, spec, status_in, wait_until, CoServer, GuestSpec, PairNet, ReplicationMode,
    GUEST_IP, HEARTBEAT, LIMIT,
};

/// A fault the soak injects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Fault {
    /// SIGKILL of one CoServer, started again within a second.
    KillRestartFast,
    /// SIGKILL of one CoServer, started again after two seconds.
    KillRestartSlow,
    /// SIGSTOP of one CoServer for three failure timeouts, then SIGCONT.
    Stop,
    /// One link down for a second.
    OneLinkDown,
    /// Every link down for a second (the arbiter decides).
    AllLinksDown,
    /// Every link cut in one direction for a second: one host hears the other but is
    /// not heard.
    OneWayCut,
    /// The secondary restarted, and every link cut while it is being copied.
    PartitionDuringCopy,
    /// Both CoServers killed and started again: the guest reboots from its disk.
    RestartBoth,
}

/// Every kind of fault.
pub const KINDS: [Fault; 8] = [
    Fault::KillRestartFast,
    Fault::KillRestartSlow,
    Fault::Stop,
    Fault::OneLinkDown,
    Fault::AllLinksDown,
    Fault::OneWayCut,
    Fault::PartitionDuringCopy,
    Fault::RestartBoth,
];

impl Fault {
    /// Its name in the table.
    pub fn name(self) -> &'static str {
        match self {
            Fault::KillRestartFast => "SIGKILL, restart < 1 s",
            Fault::KillRestartSlow => "SIGKILL, restart after 2 s",
            Fault::Stop => "SIGSTOP past the timeout",
            Fault::OneLinkDown => "one link down",
            Fault::AllLinksDown => "all links down",
            Fault::OneWayCut => "all links cut one way",
            Fault::PartitionDuringCopy => "partition during a copy",
            Fault::RestartBoth => "both CoServers restarted",
        }
    }
}

/// splitmix64: the soak's random numbers, reproducible from the seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// What a soak saw.
#[derive(Debug, Default)]
pub struct SoakReport {
    /// The seed.
    pub seed: u64,
    /// Faults injected, by kind.
    pub faults: BTreeMap<Fault, u32>,
    /// Distinct keys whose SET was acknowledged (their last value is checked).
    pub keys: usize,
    /// SETs acknowledged.
    pub sets: u64,
    /// Acknowledged SETs whose value did not read back.
    pub lost: Vec<String>,
    /// Status samples where both CoServers were primaries releasing output.
    pub split_brain_samples: u32,
    /// Status samples taken.
    pub samples: u32,
    /// Guest reboots seen while at least one CoServer kept running.
    pub unexpected_reboots: u32,
    /// Guest reboots after both CoServers were down.
    pub expected_reboots: u32,
    /// After a fault, checks where not exactly one CoServer said it runs the guest
    /// (whatever its role).
    pub not_one_running: u32,
    /// The client's longest wait between two acknowledged SETs, over faults the guest
    /// kept running through.
    pub longest_outage: Duration,
    /// The same over faults that rebooted the guest (both CoServers down).
    pub longest_outage_reboot: Duration,
    /// The longest client outage by kind of fault.
    pub outage_by_fault: BTreeMap<Fault, Duration>,
    /// The longest time from the end of a fault to a protected pair.
    pub longest_recovery: Duration,
    /// What went wrong otherwise (no recovery, client errors).
    pub failures: Vec<String>,
    /// The whole run.
    pub elapsed: Duration,
}

impl SoakReport {
    /// The table for people and PERFORMANCE.md.
    pub fn table(&self) -> String {
        let mut t = format!(
            "fault soak: seed {:#x}, {} faults in {:.0} s\n| fault | count | longest client outage |\n|---|---|---|\n",
            self.seed,
            self.faults.values().sum::<u32>(),
            self.elapsed.as_secs_f64()
        );
        for (f, n) in &self.faults {
            let outage = self.outage_by_fault.get(f).copied().unwrap_or_default();
            t += &format!(
                "| {} | {n} | {:.0} ms |\n",
                f.name(),
                outage.as_secs_f64() * 1000.0
            );
        }
        t += &format!(
            "| check | result |\n|---|---|\n\
             | SETs acknowledged (distinct keys checked) | {} ({}) |\n\
             | acknowledged writes lost | {} |\n\
             | split-brain samples (both primaries releasing) | {} of {} |\n\
             | checks after a fault where not exactly one CoServer ran the guest | {} |\n\
             | unexpected guest reboots | {} |\n\
             | guest reboots after both CoServers were down | {} |\n\
             | longest client outage (between two acknowledged SETs), guest kept running | {:.0} ms |\n\
             | longest client outage, both CoServers restarted (guest rebooted) | {:.0} ms |\n\
             | longest recovery to protected | {:.1} s |\n\
             | other failures | {} |\n",
            self.sets,
            self.keys,
            self.lost.len(),
            self.split_brain_samples,
            self.samples,
            self.not_one_running,
            self.unexpected_reboots,
            self.expected_reboots,
            self.longest_outage.as_secs_f64() * 1000.0,
            self.longest_outage_reboot.as_secs_f64() * 1000.0,
            self.longest_recovery.as_secs_f64(),
            self.failures.len()
        );
        for f in self.lost.iter().chain(&self.failures).take(10) {
            t += &format!("- {f}\n");
        }
        t
    }

    /// Whether every check held.
    pub fn clean(&self) -> bool {
        self.lost.is_empty()
            && self.split_brain_samples == 0
            && self.unexpected_reboots == 0
            && self.not_one_running == 0
            && self.expected_reboots == self.faults.get(&Fault::RestartBoth).copied().unwrap_or(0)
            && self.failures.is_empty()
    }
}

/// Keys the client cycles through (the guest's table holds 8192 on an 8 MiB disk).
const KEYS: u32 = 2000;

/// What the client has seen.
#[derive(Default)]
struct Seen {
    acked: BTreeMap<u32, u32>,
    since_check: Vec<u32>,
    sets: u64,
    last_uptime: u64,
    reboots: u32,
    /// The longest wait between two acknowledged SETs since the last check.
    outage: Duration,
    errors: Vec<String>,
}

/// What a check found: the acknowledged SETs that did not read back, and the longest
/// outage since the previous check.
struct Checked {
    lost: Vec<String>,
    outage: Duration,
}

enum Cmd {
    /// GET the keys set since the last check (all keys if `all`); answer what was lost.
    Check {
        all: bool,
        answer: mpsc::Sender<Checked>,
    },
    Stop,
}

fn connect() -> std::io::Result<BufReader<TcpStream>> {
    let addr = format!("{GUEST_IP}:7000")
        .parse()
        .map_err(std::io::Error::other)?;
    let s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    Ok(BufReader::new(s))
}

/// Notes the guest's uptime from an `UPTIME` reply; a value below the last seen is a
/// reboot.
fn note_uptime(reply: &str, seen: &Mutex<Seen>) -> std::io::Result<()> {
    let ns = reply
        .strip_prefix("UPTIME ")
        .and_then(|n| n.parse::<u64>().ok())
        .ok_or_else(|| std::io::Error::other(format!("UPTIME answered {reply:?}")))?;
    let mut s = seen.lock().unwrap_or_else(|e| e.into_inner());
    if ns < s.last_uptime {
        s.reboots += 1;
    }
    s.last_uptime = ns;
    Ok(())
}

/// One request, reconnecting (for at most `LIMIT`) when the connection breaks.
fn request(
    conn: &mut Option<BufReader<TcpStream>>,
    seen: &Mutex<Seen>,
    line: &str,
) -> Result<String, String> {
    let start = Instant::now();
    loop {
        if conn.is_none() {
            match connect() {
                Ok(mut c) => {
                    // A new connection: was the guest rebooted meanwhile?
                    if kv(&mut c, "UPTIME").is_ok_and(|r| note_uptime(&r, seen).is_ok()) {
                        *conn = Some(c);
                    }
                }
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        }
        if let Some(c) = conn.as_mut() {
            match kv(c, line) {
                Ok(reply) => return Ok(reply),
                Err(_) => *conn = None,
            }
        }
        if start.elapsed() > LIMIT {
            return Err(format!("no answer to {line:?} for {LIMIT:?}"));
        }
    }
}

fn client(seen: Arc<Mutex<Seen>>, cmds: mpsc::Receiver<Cmd>, seed: u64) {
    let lock = || seen.lock().unwrap_or_else(|e| e.into_inner());
    let mut conn = None;
    let mut rng = Rng(seed ^ 0x5eed);
    let mut i: u32 = 0;
    let mut last_ok = Instant::now();
    loop {
        match cmds.try_recv() {
            Ok(Cmd::Stop) | Err(TryRecvError::Disconnected) => return,
            Ok(Cmd::Check { all, answer }) => {
                let keys: Vec<(u32, u32)> = {
                    let mut s = lock();
                    let mut keys: Vec<u32> = std::mem::take(&mut s.since_check);
                    if all {
                        keys = s.acked.keys().copied().collect();
                    } else if !s.acked.is_empty() {
                        // And a sample of older keys.
                        let all_keys: Vec<u32> = s.acked.keys().copied().collect();
                        for _ in 0..100 {
                            keys.push(all_keys[rng.below(all_keys.len() as u64) as usize]);
                        }
                    }
                    keys.sort_unstable();
                    keys.dedup();
                    keys.into_iter().map(|k| (k, s.acked[&k])).collect()
                };
                let mut lost = Vec::new();
                match request(&mut conn, &seen, "UPTIME") {
                    Ok(r) => {
                        if let Err(e) = note_uptime(&r, &seen) {
                            lost.push(e.to_string());
                        }
                    }
                    Err(e) => lost.push(e),
                }
                for (k, v) in keys {
                    match request(&mut conn, &seen, &format!("GET k{k}")) {
                        Ok(r) if r == format!("VALUE v{v}") => {}
                        Ok(r) => lost.push(format!("k{k}: acknowledged v{v}, read {r:?}")),
                        Err(e) => {
                            // The guest cannot be reached: the check ends here.
                            lost.push(format!("k{k}: {e}"));
                            break;
                        }
                    }
                }
                let outage = std::mem::take(&mut lock().outage);
                let _ = answer.send(Checked { lost, outage });
                last_ok = Instant::now();
                continue;
            }
            Err(TryRecvError::Empty) => {}
        }
        let (key, value) = (i % KEYS, i);
        match request(&mut conn, &seen, &format!("SET k{key} v{value}")) {
            Ok(r) if r == "OK" => {
                let mut s = lock();
                s.acked.insert(key, value);
                s.since_check.push(key);
                s.sets += 1;
                s.outage = s.outage.max(last_ok.elapsed());
                last_ok = Instant::now();
                i += 1;
            }
            Ok(r) => {
                lock().errors.push(format!("SET k{key}: {r:?}"));
                conn = None;
            }
            Err(e) => {
                lock().errors.push(e);
                return;
            }
        }
        if i.is_multiple_of(64) {
            if let Ok(r) = request(&mut conn, &seen, "UPTIME") {
                let _ = note_uptime(&r, &seen);
            }
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// The pair's CoServers, by index (0: A, 1: B).
struct Nodes<'a> {
    net: &'a PairNet,
    nodes: [Option<CoServer>; 2],
}

impl Nodes<'_> {
    fn config(&self, n: usize) -> std::path::PathBuf {
        self.nodes[n]
            .as_ref()
            .map(|c| c.config.clone())
            .unwrap_or_default()
    }

    fn kill(&mut self, n: usize) -> std::path::PathBuf {
        let config = self.config(n);
        if let Some(mut c) = self.nodes[n].take() {
            c.kill();
        }
        config
    }

    fn start(&mut self, n: usize, config: &std::path::Path) {
        self.nodes[n] = Some(CoServer::start(["a", "b"][n], &self.net.ns[n], config));
    }

    fn node(&self, n: usize) -> &CoServer {
        self.nodes[n].as_ref().expect("node runs")
    }

    /// (primary, secondary) once the pair is protected.
    fn protected(&self) -> Option<(usize, usize)> {
        let s = [self.node(0).typed(), self.node(1).typed()];
        let mode = |n: usize| s[n].mode.as_deref().unwrap_or("");
        (0..2).find_map(|p| {
            let q = 1 - p;
            (s[p].role == "primary"
                && mode(p) == "protected"
                && s[q].role == "secondary"
                && mode(q) == "ready")
                .then_some((p, q))
        })
    }

    fn logs(&self) -> String {
        format!(
            "A:\n{}\nB:\n{}",
            tail(&self.node(0).log()),
            tail(&self.node(1).log())
        )
    }
}

fn tail(log: &str) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

/// Samples both CoServers' status until `stop`; counts samples with two primaries
/// releasing output.
fn monitor(ns: [String; 2], stop: Arc<AtomicBool>) -> (u32, u32) {
    let (mut split, mut samples) = (0, 0);
    while !stop.load(Ordering::Relaxed) {
        let s = [status_in(&ns[0]), status_in(&ns[1])];
        samples += 1;
        let releasing = |s: &Option<ftvm_coserver::control::Status>| {
            s.as_ref().is_some_and(|s| {
                s.role == "primary"
                    && s.guest_running
                    && matches!(s.mode.as_deref(), Some("degraded" | "syncing"))
            })
        };
        if releasing(&s[0]) && releasing(&s[1]) {
            split += 1;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    (split, samples)
}

/// What a soak runs: the pair's replication mode, the kinds of fault drawn, and whom
/// they hit.
#[derive(Debug, Clone)]
pub struct Plan {
    /// The replication mode.
    pub mode: ReplicationMode,
    /// The kinds of fault drawn from.
    pub kinds: Vec<Fault>,
    /// Every fault hits the primary (otherwise either node, at random).
    pub primary_only: bool,
}

impl Plan {
    /// Every kind of fault on either node, in `mode`.
    pub fn all(mode: ReplicationMode) -> Self {
        Self {
            mode,
            kinds: KINDS.to_vec(),
            primary_only: false,
        }
    }
}

/// Runs `count` faults drawn from `seed` and `plan` against a pair in `net`, in `dir`.
pub fn run(
    net: &PairNet,
    dir: &std::path::Path,
    seed: u64,
    count: usize,
    plan: &Plan,
) -> SoakReport {
    let started = Instant::now();
    let mut report = SoakReport {
        seed,
        ..SoakReport::default()
    };
    let guest = GuestSpec {
        mode: plan.mode,
        ..spec(&format!("workload=net ip={GUEST_IP}/24"), 8, true)
    };
    let timeout = Duration::from_millis(HEARTBEAT.0 * u64::from(HEARTBEAT.1));
    let (a, b) = protected_pair(net, dir, &guest);
    let mut nodes = Nodes {
        net,
        nodes: [Some(a), Some(b)],
    };
    let seen = Arc::new(Mutex::new(Seen::default()));
    let (cmd_tx, cmd_rx) = mpsc::channel();
    let lan = net.ns[2].clone();
    let client_seen = seen.clone();
    let client = std::thread::spawn(move || {
        ftvm_coserver::netns::run_in(&lan, move || client(client_seen, cmd_rx, seed))
    });
    let stop = Arc::new(AtomicBool::new(false));
    let monitor = std::thread::spawn({
        let (ns, stop) = ([net.ns[0].clone(), net.ns[1].clone()], stop.clone());
        move || monitor(ns, stop)
    });
    let mut rng = Rng(seed);
    let mut order: Vec<Fault> = plan.kinds.clone();
    // Every kind once (in a random order) when the run is long enough, then at random.
    for i in (1..order.len()).rev() {
        order.swap(i, rng.below(i as u64 + 1) as usize);
    }
    let check = |all: bool| {
        let (tx, rx) = mpsc::channel();
        cmd_tx.send(Cmd::Check { all, answer: tx }).ok()?;
        rx.recv_timeout(Duration::from_secs(300)).ok()
    };
    let mut reboots_counted = 0;
    for n in 0..count {
        let mut fault = if n < order.len() {
            order[n]
        } else {
            plan.kinds[rng.below(plan.kinds.len() as u64) as usize]
        };
        std::thread::sleep(Duration::from_millis(500 + rng.below(1500)));
        let Some((p, s)) = nodes.protected() else {
            report
                .failures
                .push(format!("fault {n}: the pair is not protected before it"));
            break;
        };
        let target = if plan.primary_only || rng.below(2) == 0 {
            p
        } else {
            s
        };
        match fault {
            Fault::KillRestartFast | Fault::KillRestartSlow => {
                let config = nodes.kill(target);
                let delay = if fault == Fault::KillRestartFast {
                    Duration::from_millis(50 + rng.below(900))
                } else {
                    Duration::from_secs(2)
                };
                std::thread::sleep(delay);
                nodes.start(target, &config);
            }
            Fault::Stop => {
                nodes.node(target).pause();
                std::thread::sleep(timeout * 3);
                nodes.node(target).resume();
            }
            Fault::OneLinkDown => {
                let link = 1 + rng.below(2) as u32;
                net.link(link, false);
                std::thread::sleep(Duration::from_secs(1));
                net.link(link, true);
            }
            Fault::AllLinksDown => {
                net.link(1, false);
                net.link(2, false);
                std::thread::sleep(Duration::from_secs(1));
                net.link(1, true);
                net.link(2, true);
            }
            Fault::OneWayCut => {
                // What the chosen node sends is lost; it still hears the other.
                net.cut_one_way(target, true);
                std::thread::sleep(Duration::from_secs(1));
                net.cut_one_way(target, false);
            }
            Fault::PartitionDuringCopy => {
                let config = nodes.kill(s);
                nodes.start(s, &config);
                // Cut as soon as the restarted node says it joins (its own log, read
                // without a process spawn); a partition during a copy only if the copy
                // had not completed by then, otherwise it counts as all links down.
                let joined = wait_until(LIMIT, || {
                    nodes.node(s).log().contains("joining as secondary")
                });
                net.link(1, false);
                net.link(2, false);
                if !joined || nodes.node(s).log().contains("full copy applied") {
                    fault = Fault::AllLinksDown;
                }
                std::thread::sleep(timeout * 3);
                net.link(1, true);
                net.link(2, true);
            }
            Fault::RestartBoth => {
                let cp = nodes.kill(p);
                let cs = nodes.kill(s);
                std::thread::sleep(Duration::from_millis(200));
                nodes.start(s, &cs);
                nodes.start(p, &cp);
            }
        }
        *report.faults.entry(fault).or_default() += 1;
        let ended = Instant::now();
        if !wait_until(LIMIT, || nodes.protected().is_some()) {
            report.failures.push(format!(
                "fault {n} ({}): not protected again within {LIMIT:?}\n{}",
                fault.name(),
                nodes.logs()
            ));
            break;
        }
        report.longest_recovery = report.longest_recovery.max(ended.elapsed());
        let running = (0..2)
            .filter(|&i| nodes.node(i).typed().guest_running)
            .count();
        if running != 1 {
            report.not_one_running += 1;
        }
        let checked = check(false);
        if let Some(c) = &checked {
            let worst = report.outage_by_fault.entry(fault).or_default();
            *worst = (*worst).max(c.outage);
        }
        match checked {
            Some(c) if fault == Fault::RestartBoth => {
                report.lost.extend(c.lost);
                report.longest_outage_reboot = report.longest_outage_reboot.max(c.outage);
            }
            Some(c) => {
                report.lost.extend(c.lost);
                report.longest_outage = report.longest_outage.max(c.outage);
            }
            None => report
                .failures
                .push(format!("fault {n}: the client did not answer")),
        }
        // Reboots the client saw since the previous check: the guest may reboot only
        // when both CoServers were down, and then exactly once.
        let reboots = seen.lock().map(|s| s.reboots).unwrap_or(0);
        let new = reboots - reboots_counted;
        reboots_counted = reboots;
        if fault == Fault::RestartBoth {
            report.expected_reboots += new.min(1);
            report.unexpected_reboots += new.saturating_sub(1);
        } else {
            report.unexpected_reboots += new;
        }
        println!(
            "soak: fault {n} {} on {} done; recovered in {:.1} s",
            fault.name(),
            ["A", "B"][target],
            ended.elapsed().as_secs_f64()
        );
    }
    match check(true) {
        Some(c) => report.lost.extend(c.lost),
        None => report
            .failures
            .push("final check: the client did not answer".into()),
    }
    let reboots = seen.lock().map(|s| s.reboots).unwrap_or(0);
    report.unexpected_reboots += reboots - reboots_counted;
    let _ = cmd_tx.send(Cmd::Stop);
    stop.store(true, Ordering::Relaxed);
    // A client stuck in a request is left behind (every request ends within LIMIT).
    if !wait_until(LIMIT * 2, || client.is_finished()) {
        report.failures.push("the client did not stop".into());
    } else if !matches!(client.join(), Ok(Ok(()))) {
        report.failures.push("the client thread failed".into());
    }
    let (split, samples) = monitor.join().unwrap_or((u32::MAX, 0));
    report.split_brain_samples = split;
    report.samples = samples;
    let s = seen.lock().unwrap_or_else(|e| e.into_inner());
    report.keys = s.acked.len();
    report.sets = s.sets;
    report.failures.extend(s.errors.iter().cloned());
    report.elapsed = started.elapsed();
    report
}
