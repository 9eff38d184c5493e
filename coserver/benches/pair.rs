//! CoServer pair benchmark (needs root: it builds the namespaces, veth links and bridged
//! taps of the pair tests). Prints a table:
//! - protection overhead: the progress rate of three workloads (`counter` writing memory,
//!   `disk` writing and verifying its disk, a TCP client's key-value SETs against `net`),
//!   standalone and as a protected pair, measured in one run;
//! - the counter run's checkpoint pause, output-commit delay and replication traffic over
//!   a range of epoch lengths;
//! - checkpoint pause and replication traffic of an idle guest;
//! - takeover: from SIGKILL of the primary to the secondary reporting itself primary, and
//!   the longest TCP key-value SET a client saw across that failover (the outage it
//!   observed), 8 runs per setting: heartbeats 10 ms x 3 and 20 ms x 10, and 10 ms x 3
//!   with a client route whose minimum retransmission timeout is 10 ms;
//! - lockstep and checkpoint side by side: the same workloads' rates, the key-value
//!   SETs' output delay, replication traffic busy and idle, and the takeover measured
//!   inside the new primary (`FTVM_BENCH_ONLY=modes` runs these rows alone).
//!
//! Run with `cargo bench -p ftvm-coserver --bench pair` (see docs/PERFORMANCE.md).

#[path = "../../tests/common/mod.rs"]
mod common;
#[path = "../../tests/common/pair.rs"]
mod pair;

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use ftvm_coserver::netns;
use pair::{
    field, protected_pair, wait_until, CoServer, GuestSpec, PairNet, ReplicationMode, GUEST_IP,
    LIMIT,
};

/// A workload whose progress rate is measured between two console lines.
struct Progress {
    /// What the table calls it.
    name: &'static str,
    cmdline: &'static str,
    /// Disk replica (MiB; 0: none).
    disk_mib: u64,
    from: &'static str,
    to: &'static str,
    /// Units of work between the two lines, and their name.
    units: f64,
    unit: &'static str,
}

const COUNTER: Progress = Progress {
    name: "`counter` (each step writes 6 pages and prints a line)",
    cmdline: "workload=counter pages=12000 steps=2000 tick_ms=0",
    disk_mib: 0,
    from: "counter: step 200/",
    to: "counter: step 1800/",
    units: 1600.0,
    unit: "steps/s",
};

const DISK: Progress = Progress {
    name: "`disk` (rounds of writing, flushing and verifying 8 MiB in 64 KiB requests)",
    cmdline: "workload=disk blocks=2048 batch=16 rounds=120 progress=1000000",
    disk_mib: 16,
    from: "disk: round 20/",
    to: "disk: round 100/",
    // 80 rounds of 8 MiB written and 8 MiB read.
    units: 80.0 * 16.0,
    unit: "MiB/s",
};

/// SETs a client makes for the key-value rate (`FTVM_BENCH_SETS` sets another count).
const SETS: u32 = 400;

fn sets() -> u32 {
    std::env::var("FTVM_BENCH_SETS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(SETS)
}

fn spec(cmdline: &str, disk_mib: u64, network: bool, epoch_ms: u64) -> GuestSpec {
    spec_in(
        ReplicationMode::Checkpoint,
        cmdline,
        disk_mib,
        network,
        epoch_ms,
    )
}

fn spec_in(
    mode: ReplicationMode,
    cmdline: &str,
    disk_mib: u64,
    network: bool,
    epoch_ms: u64,
) -> GuestSpec {
    GuestSpec {
        cmdline: cmdline.into(),
        disk_mib,
        network,
        heartbeat: (20, 10),
        epoch_ms,
        b_disk_dir: None,
        arbiter: pair::TestArbiter::Shared,
        mode,
        linux: None,
    }
}

/// The rate of `w` run alone (`ftvm run`), from the arrival times of its two lines.
fn standalone_rate(w: &Progress) -> f64 {
    let dir = tempfile::tempdir().expect("tempdir");
    let img = dir.path().join("solo.img");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ftvm"));
    cmd.args([
        "run",
        "--mem",
        "64",
        "--idle",
        "skip",
        "--cmdline",
        w.cmdline,
    ]);
    if w.disk_mib > 0 {
        std::fs::File::create(&img)
            .and_then(|f| f.set_len(w.disk_mib << 20))
            .expect("disk image");
        cmd.arg("--disk").arg(&img);
    }
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn ftvm");
    let out = BufReader::new(child.stdout.take().expect("stdout"));
    let (mut from, mut to) = (None, None);
    for line in out.lines().map_while(Result::ok) {
        if line.starts_with(w.from) {
            from = Some(Instant::now());
        }
        if line.starts_with(w.to) {
            to = Some(Instant::now());
        }
    }
    let _ = child.wait();
    let (Some(f), Some(t)) = (from, to) else {
        panic!("standalone {} printed no progress", w.name)
    };
    w.units / t.duration_since(f).as_secs_f64()
}

/// The rate of `w` on protected primary `a`, polling its released console.
fn pair_rate(a: &CoServer, w: &Progress) -> f64 {
    assert!(
        wait_until(LIMIT, || a.console().contains(w.from)),
        "{}",
        a.console()
    );
    let from = Instant::now();
    assert!(
        wait_until(LIMIT, || a.console().contains(w.to)),
        "{}",
        a.console()
    );
    w.units / from.elapsed().as_secs_f64()
}

/// SETs per second a client in the LAN gets from the guest's key-value service (the
/// guest is told to power off afterwards).
fn kv_rate(net: &PairNet) -> f64 {
    kv_run(net, true).0
}

/// [`sets`] SETs one at a time from a client in the LAN: the rate and each SET's time;
/// the guest is told to power off afterwards if `shutdown`.
fn kv_run(net: &PairNet, shutdown: bool) -> (f64, Vec<Duration>) {
    let _ = netns::ip(&["-n", &net.ns[2], "neigh", "flush", "all"]);
    netns::run_in(&net.ns[2], move || {
        if pinned() {
            let _ = common::pin_thread(0);
        }
        let start = Instant::now();
        let s = loop {
            match TcpStream::connect_timeout(
                &format!("{GUEST_IP}:7000").parse().expect("address"),
                Duration::from_secs(1),
            ) {
                Ok(s) => break s,
                Err(e) if start.elapsed() > LIMIT => panic!("connect: {e}"),
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        };
        s.set_read_timeout(Some(Duration::from_secs(20)))
            .expect("timeout");
        let mut c = BufReader::new(s);
        let sets = sets();
        let mut each = Vec::with_capacity(sets as usize);
        let t = Instant::now();
        for i in 0..sets {
            let one = Instant::now();
            assert_eq!(kv(&mut c, &format!("SET k{} v{i}", i % 2000)), "OK");
            each.push(one.elapsed());
        }
        let rate = f64::from(sets) / t.elapsed().as_secs_f64();
        if shutdown {
            let _ = kv(&mut c, "SHUTDOWN");
        }
        (rate, each)
    })
    .expect("client in the LAN")
}

/// The key-value rate of a standalone guest on host A's tap.
fn standalone_kv_rate(net: &PairNet) -> f64 {
    standalone_kv_run(net).0
}

/// [`kv_run`] against a standalone guest on host A's tap.
fn standalone_kv_run(net: &PairNet) -> (f64, Vec<Duration>) {
    let dir = tempfile::tempdir().expect("tempdir");
    let img = dir.path().join("kv.img");
    std::fs::File::create(&img)
        .and_then(|f| f.set_len(8 << 20))
        .expect("disk image");
    let child = Command::new("ip")
        .args(["netns", "exec", &net.ns[0], env!("CARGO_BIN_EXE_ftvm")])
        .args(["run", "--mem", "64", "--tap", "tap0", "--disk"])
        .arg(&img)
        .arg("--cmdline")
        .arg(format!("workload=net ip={GUEST_IP}/24"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .expect("spawn ftvm");
    // Killed if the client fails: a guest left running would load every later run.
    struct Guest(std::process::Child);
    impl Drop for Guest {
        fn drop(&mut self) {
            if !matches!(self.0.try_wait(), Ok(Some(_))) {
                let _ = self.0.kill();
            }
            let _ = self.0.wait();
        }
    }
    let mut guest = Guest(child);
    if pinned() {
        pin_process(guest.0.id(), 0);
    }
    let run = kv_run(net, true);
    let _ = guest.0.wait();
    run
}

fn pct(status: &Option<serde_json::Value>, key: &str) -> String {
    let get = |q: &str| {
        status
            .as_ref()
            .and_then(|s| s.get(key))
            .and_then(|p| p.get(q))
            .and_then(|v| v.as_u64())
            .map_or("-".to_string(), |v| format!("{v} µs"))
    };
    format!("p50 {}, p99 {}", get("p50"), get("p99"))
}

fn kv(c: &mut BufReader<TcpStream>, req: &str) -> String {
    c.get_mut()
        .write_all(format!("{req}\n").as_bytes())
        .expect("send");
    let mut r = String::new();
    c.read_line(&mut r).expect("reply");
    r.trim_end().to_string()
}

fn ratio_row(name: &str, unit: &str, solo: f64, pair: f64) {
    println!(
        "| {name}: standalone / protected pair ({unit}) | {solo:.1} / {pair:.1} (pair at {:.0}% of standalone) |",
        pair / solo * 100.0
    );
}

fn bytes_per_s(status: &Option<serde_json::Value>) -> f64 {
    status
        .as_ref()
        .and_then(|s| s.get("replication_bytes_per_s"))
        .and_then(|v| v.as_u64())
        .unwrap_or(0) as f64
}

fn main() {
    let Ok(net) = PairNet::try_create("bench") else {
        println!("pair benchmark SKIPPED: needs root for network namespaces");
        return;
    };
    println!("ftvm pair benchmark (2 veth links in namespaces, heartbeat 20 ms x 10)\n");
    println!("| figure | value |\n|---|---|");

    // FTVM_BENCH_ONLY=takeover (or modes, or kv) runs those rows alone.
    let only = std::env::var("FTVM_BENCH_ONLY").ok();
    if only.is_none() {
        overhead_rows(&net);
    }
    if only.is_none() || only.as_deref() == Some("takeover") {
        takeover_rows(&net);
    }
    if only.is_none() || only.as_deref() == Some("modes") {
        modes_rows(&net);
    }
    if only.as_deref() == Some("kv") {
        kv_rows(&net);
    }
}

/// With `FTVM_BENCH_PIN` set, the kv rows pin each host's work to one core, as two
/// hosts would keep it apart: the primary (or the standalone guest) and the client on
/// core 0, the secondary on core 1.
fn pinned() -> bool {
    std::env::var("FTVM_BENCH_PIN").is_ok()
}

/// Pins every thread of process `pid` (and those it starts later) to `cpu`.
fn pin_process(pid: u32, cpu: usize) {
    let status = Command::new("taskset")
        .args(["-a", "-p", "-c", &cpu.to_string(), &pid.to_string()])
        .stdout(Stdio::null())
        .status()
        .expect("taskset");
    assert!(status.success(), "taskset {pid}");
}

/// `FTVM_BENCH_ONLY=kv`: the key-value rows alone, standalone and lockstep alternated
/// `FTVM_BENCH_ROUNDS` times (default 3), each round's ratio measured in that round.
fn kv_rows(net: &PairNet) {
    let rounds: u32 = std::env::var("FTVM_BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    println!("\n| round | standalone SETs/s (p50, p99) | lockstep SETs/s (p50, p99) | ratio | added p50 | output delay |\n|---|---|---|---|---|---|");
    for round in 1..=rounds {
        let (solo, mut solo_each) = standalone_kv_run(net);
        let s = percentiles(&mut solo_each);
        let dir = tempfile::tempdir().expect("tempdir");
        let g = spec_in(
            ReplicationMode::Lockstep,
            &format!("workload=net ip={GUEST_IP}/24"),
            8,
            true,
            10,
        );
        let (a, b) = protected_pair(net, dir.path(), &g);
        if pinned() {
            pin_process(a.pid().expect("primary's pid"), 0);
            pin_process(b.pid().expect("secondary's pid"), 1);
        }
        if std::env::var("FTVM_BENCH_PIN_FOLLOWER").is_ok() {
            // Diagnosis: every thread on core 0 but the secondary's guest on core 1, so
            // the output's round trip crosses no core.
            pin_process(a.pid().expect("primary's pid"), 0);
            let pid = b.pid().expect("secondary's pid");
            pin_process(pid, 0);
            for t in std::fs::read_dir(format!("/proc/{pid}/task"))
                .expect("tasks")
                .flatten()
            {
                let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
                if comm.trim() == "vcpu-follow" {
                    let tid: u32 = t.file_name().to_string_lossy().parse().expect("tid");
                    pin_process(tid, 1);
                }
            }
        }
        let (rate, mut each) = kv_run(net, false);
        let p = percentiles(&mut each);
        let delay = pct(&a.status(), "output_commit_delay_us");
        if std::env::var("FTVM_BENCH_DIST").is_ok() {
            let at = |q: f64| each[((each.len() - 1) as f64 * q).round() as usize];
            let over = |ms: f64| each.iter().filter(|d| d.as_secs_f64() * 1e3 > ms).count();
            println!(
                "lockstep SETs: p75 {:?} p90 {:?} p95 {:?} max {:?}; over 1 ms {}, over 2 ms {}, over 5 ms {} of {}",
                at(0.75), at(0.9), at(0.95), at(1.0), over(1.0), over(2.0), over(5.0), each.len()
            );
        }
        drop((a, b));
        println!(
            "| {round} | {solo:.0} ({:.0} µs, {:.0} µs) | {rate:.0} ({:.0} µs, {:.0} µs) | {:.0}% | {:.0} µs | {delay} |",
            s.0 * 1e6,
            s.1 * 1e6,
            p.0 * 1e6,
            p.1 * 1e6,
            rate / solo * 100.0,
            (p.0 - s.0) * 1e6
        );
    }
}

/// Lockstep and checkpoint side by side, each figure of both modes from this run.
fn modes_rows(net: &PairNet) {
    const MODES: [ReplicationMode; 2] = [ReplicationMode::Checkpoint, ReplicationMode::Lockstep];
    println!("\n| lockstep and checkpoint (epoch 10 ms), one run | checkpoint | lockstep |\n|---|---|---|");
    for w in [&COUNTER, &DISK] {
        let solo = standalone_rate(w);
        let cells: Vec<String> = MODES
            .iter()
            .map(|&mode| {
                let dir = tempfile::tempdir().expect("tempdir");
                let g = spec_in(mode, w.cmdline, w.disk_mib, false, 10);
                let (a, b) = protected_pair(net, dir.path(), &g);
                let rate = pair_rate(&a, w);
                let mbit = bytes_per_s(&a.status()) * 8.0 / 1e6;
                drop((a, b));
                format!("{:.0}% ({mbit:.1} Mbit/s replicated)", rate / solo * 100.0)
            })
            .collect();
        println!(
            "| {}: protected / standalone ({solo:.1} {} standalone) | {} | {} |",
            w.name, w.unit, cells[0], cells[1]
        );
    }
    let (solo, mut solo_each) = standalone_kv_run(net);
    let solo_p = percentiles(&mut solo_each);
    let mut kv_cells = Vec::new();
    let mut delay_cells = Vec::new();
    let mut added_cells = Vec::new();
    let mut rtt_cells = Vec::new();
    let mut idle_cells = Vec::new();
    for mode in MODES {
        let dir = tempfile::tempdir().expect("tempdir");
        let g = spec_in(mode, &format!("workload=net ip={GUEST_IP}/24"), 8, true, 10);
        let (a, b) = protected_pair(net, dir.path(), &g);
        // Idle first (no client yet): the traffic over a few seconds.
        std::thread::sleep(Duration::from_secs(3));
        idle_cells.push(format!(
            "{:.1} kbit/s",
            bytes_per_s(&a.status()) * 8.0 / 1000.0
        ));
        // The links' heartbeat round trip (reader task to reader task, no node thread)
        // sampled during the run, beside the slices' acknowledgement delay.
        let done = std::sync::atomic::AtomicBool::new(false);
        let (rate, mut each, mut rtts) = std::thread::scope(|scope| {
            let sampler = scope.spawn(|| {
                let mut rtts = Vec::new();
                while !done.load(std::sync::atomic::Ordering::Relaxed) {
                    rtts.extend(a.typed().links.iter().filter_map(|l| l.rtt_ms));
                    std::thread::sleep(Duration::from_millis(50));
                }
                rtts
            });
            let (rate, each) = kv_run(net, false);
            done.store(true, std::sync::atomic::Ordering::Relaxed);
            (rate, each, sampler.join().unwrap_or_default())
        });
        rtts.sort_by(f64::total_cmp);
        rtt_cells.push(match rtts.len() {
            0 => "-".to_string(),
            n => format!(
                "p50 {:.0} µs, max {:.0} µs ({n} samples)",
                rtts[n / 2] * 1000.0,
                rtts[n - 1] * 1000.0
            ),
        });
        let p = percentiles(&mut each);
        kv_cells.push(format!("{:.0}% ({rate:.0} SETs/s)", rate / solo * 100.0));
        added_cells.push(format!(
            "p50 {:.0} µs, p99 {:.0} µs",
            (p.0 - solo_p.0) * 1e6,
            (p.1 - solo_p.1) * 1e6
        ));
        delay_cells.push(pct(&a.status(), "output_commit_delay_us"));
        drop((a, b));
    }
    println!("| TCP key-value SETs, one client, one at a time: protected / standalone ({solo:.0} SETs/s standalone) | {} | {} |", kv_cells[0], kv_cells[1]);
    println!("| time a SET takes, protected minus standalone (standalone p50 {:.0} µs, p99 {:.0} µs) | {} | {} |", solo_p.0 * 1e6, solo_p.1 * 1e6, added_cells[0], added_cells[1]);
    println!(
        "| link heartbeat round trip during those SETs (link tasks only) | {} | {} |",
        rtt_cells[0], rtt_cells[1]
    );
    println!("| output delay of those SETs' replies: from the end of their epoch (lockstep: slice, ended at the exit after the frame) to their release | {} | {} |", delay_cells[0], delay_cells[1]);
    println!(
        "| replication traffic of the idle `net` guest (all links, incl. heartbeats) | {} | {} |",
        idle_cells[0], idle_cells[1]
    );
    let mut inside: Vec<Vec<Duration>> = vec![Vec::new(), Vec::new()];
    for run in 0..MODE_TAKEOVER_RUNS {
        for (i, mode) in MODES.into_iter().enumerate() {
            inside[i].push(takeover_run(net, mode, 10, 3, KILL_SPREAD * run).inside);
        }
    }
    println!(
        "| takeover after SIGKILL under a client, heartbeat 10 ms x 3 (detection 30 ms): the old primary last heard to the first output released (new primary's log) | {} | {} |",
        spread(&mut inside[0]),
        spread(&mut inside[1])
    );
}

/// (p50, p99) of `v`, in seconds.
fn percentiles(v: &mut [Duration]) -> (f64, f64) {
    v.sort();
    let at = |q: f64| v[((v.len() - 1) as f64 * q).round() as usize].as_secs_f64();
    (at(0.5), at(0.99))
}

/// Failover runs per mode in the side-by-side rows.
const MODE_TAKEOVER_RUNS: u32 = 8;

/// Protection overhead, epoch sweep and idle figures.
fn overhead_rows(net: &PairNet) {
    // Protection overhead, standalone vs pair, each measured in this run (epoch 10 ms).
    for w in [&COUNTER, &DISK] {
        let solo = standalone_rate(w);
        let dir = tempfile::tempdir().expect("tempdir");
        let (a, b) = protected_pair(net, dir.path(), &spec(w.cmdline, w.disk_mib, false, 10));
        let rate = pair_rate(&a, w);
        ratio_row(w.name, w.unit, solo, rate);
        drop((a, b));
    }
    let solo = standalone_kv_rate(net);
    let dir = tempfile::tempdir().expect("tempdir");
    let kv_guest = spec(&format!("workload=net ip={GUEST_IP}/24"), 8, true, 10);
    let (a, b) = protected_pair(net, dir.path(), &kv_guest);
    let rate = kv_rate(net);
    ratio_row(
        "TCP key-value SETs, one client, one at a time (each waits for its epoch's acknowledgement)",
        "SETs/s",
        solo,
        rate,
    );
    drop((a, b));

    // The counter over a range of epoch lengths.
    let solo = standalone_rate(&COUNTER);
    for epoch_ms in [5u64, 10, 20, 50] {
        let dir = tempfile::tempdir().expect("tempdir");
        let (a, b) = protected_pair(net, dir.path(), &spec(COUNTER.cmdline, 0, false, epoch_ms));
        let rate = pair_rate(&a, &COUNTER);
        let st = a.status();
        println!(
            "| epoch {epoch_ms} ms, busy counter: progress / pause / output-commit delay / replication | {:.0}% of standalone; {}; {}; {:.1} Mbit/s |",
            rate / solo * 100.0,
            pct(&st, "checkpoint_pause_us"),
            pct(&st, "output_commit_delay_us"),
            bytes_per_s(&st) * 8.0 / 1e6
        );
        drop((a, b));
    }

    // An idle guest: pauses and replication traffic.
    let dir = tempfile::tempdir().expect("tempdir");
    let (a, b) = protected_pair(net, dir.path(), &kv_guest);
    std::thread::sleep(Duration::from_secs(3));
    let st = a.status();
    println!(
        "| checkpoint pause, idle guest (`net` workload, no clients) | {} |",
        pct(&st, "checkpoint_pause_us")
    );
    println!(
        "| replication traffic, idle guest (all links, incl. heartbeats) | {:.1} kbit/s |",
        bytes_per_s(&st) * 8.0 / 1000.0
    );
    drop((a, b));
}

/// Takeover after SIGKILL under a TCP client, per heartbeat setting.
fn takeover_rows(net: &PairNet) {
    // Takeover after SIGKILL, with a TCP client: two heartbeat settings with clients as
    // they come, and one with a client whose route has a short minimum retransmission
    // timeout.
    for (interval, misses, rto_min) in [(10u64, 3u32, None), (20, 10, None), (10, 3, Some("10ms"))]
    {
        let mut takeovers = Vec::new();
        let mut inside = Vec::new();
        let mut worst_set = Vec::new();
        let client_route = |rto: &str| {
            let mut args = vec![
                "-n",
                &net.ns[2],
                "route",
                "replace",
                "10.0.99.0/24",
                "dev",
                "br0",
            ];
            args.extend(["src", "10.0.99.1", "rto_min", rto]);
            netns::ip(&args).expect("client route");
        };
        if let Some(rto) = rto_min {
            client_route(rto);
        }
        for run in 0..TAKEOVER_RUNS {
            let r = takeover_run(
                net,
                ReplicationMode::Checkpoint,
                interval,
                misses,
                KILL_SPREAD * run,
            );
            takeovers.push(r.status);
            inside.push(r.inside);
            worst_set.push(r.worst_set);
        }
        if rto_min.is_some() {
            // Back to the kernel's default.
            client_route("200ms");
        }
        let retransmitted = worst_set
            .iter()
            .filter(|d| **d > Duration::from_millis(150))
            .count();
        let client = rto_min.map_or(String::new(), |r| format!(", client route `rto_min {r}`"));
        println!(
            "| takeover after SIGKILL, heartbeat {interval} ms x {misses}{client}: kill to `primary` in status (incl. ~20 ms status polling) | {} |",
            spread(&mut takeovers)
        );
        println!(
            "| takeover inside the new primary, same runs: the old primary last heard to the first output released (its own log) | {} |",
            spread(&mut inside)
        );
        println!(
            "| client-observed outage, same runs: the longest SET across the failover | {}; {retransmitted} of {TAKEOVER_RUNS} runs waited for the client's TCP retransmission |",
            spread(&mut worst_set)
        );
    }
}

/// Failover runs per setting (the kill moves by [`KILL_SPREAD`] each run, across the
/// client's request cycle and the epoch).
const TAKEOVER_RUNS: u32 = 16;
const KILL_SPREAD: Duration = Duration::from_micros(1300);

/// What one failover measured.
struct Takeover {
    /// SIGKILL to the secondary reporting itself primary (polled through status).
    status: Duration,
    /// Inside the new primary: the old one last heard to its first released output.
    inside: Duration,
    /// The client's longest SET.
    worst_set: Duration,
}

/// The new primary's own figure from its log ("takeover: first output X ms after ...").
fn takeover_from_log(log: &str) -> Option<Duration> {
    let at = log.find("takeover: first output ")?;
    let rest = &log[at + "takeover: first output ".len()..];
    let ms: f64 = rest.split(' ').next()?.parse().ok()?;
    Some(Duration::from_secs_f64(ms / 1000.0))
}

/// One failover under a TCP client: SIGKILL of the primary while the client makes SETs
/// one at a time, `delay` after its 50th.
fn takeover_run(
    net: &PairNet,
    mode: ReplicationMode,
    interval: u64,
    misses: u32,
    delay: Duration,
) -> Takeover {
    let dir = tempfile::tempdir().expect("tempdir");
    let g = GuestSpec {
        heartbeat: (interval, misses),
        ..spec_in(mode, &format!("workload=net ip={GUEST_IP}/24"), 8, true, 10)
    };
    let (mut a, b) = protected_pair(net, dir.path(), &g);
    let (tx, rx) = std::sync::mpsc::channel();
    let client = std::thread::spawn({
        let ns = net.ns[2].clone();
        move || {
            netns::enter(&ns).expect("client namespace");
            let s = TcpStream::connect((GUEST_IP, 7000)).expect("connect");
            s.set_read_timeout(Some(Duration::from_secs(20)))
                .expect("timeout");
            let mut c = BufReader::new(s);
            let mut worst = Duration::ZERO;
            for i in 0..150 {
                if i == 50 {
                    tx.send(()).expect("signal");
                }
                let t = Instant::now();
                assert_eq!(kv(&mut c, &format!("SET k{i} v{i}")), "OK");
                worst = worst.max(t.elapsed());
            }
            for i in 0..150 {
                assert_eq!(kv(&mut c, &format!("GET k{i}")), format!("VALUE v{i}"));
            }
            let _ = kv(&mut c, "SHUTDOWN");
            worst
        }
    });
    rx.recv().expect("client started");
    std::thread::sleep(delay);
    let t = Instant::now();
    a.kill();
    assert!(
        wait_until(LIMIT, || field(&b.status(), "role") == "primary"),
        "{}",
        b.log()
    );
    let status = t.elapsed();
    let worst_set = client.join().expect("client");
    let log = b.log();
    let inside = takeover_from_log(&log).unwrap_or_else(|| panic!("no takeover line:\n{log}"));
    if std::env::var("FTVM_BENCH_LOG").is_ok() {
        // The new primary's own account of the takeover, step by step.
        for l in log
            .lines()
            .filter(|l| l.contains("takeover:") || l.contains("arbiter claim"))
        {
            eprintln!("{l}");
        }
    }
    Takeover {
        status,
        inside,
        worst_set,
    }
}

/// "min / median / max ms" of `v`.
fn spread(v: &mut [Duration]) -> String {
    v.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    format!(
        "{:.1} / {:.1} / {:.1} ms (min / median / max of {})",
        ms(v[0]),
        ms(v[v.len() / 2]),
        ms(v[v.len() - 1]),
        v.len()
    )
}
