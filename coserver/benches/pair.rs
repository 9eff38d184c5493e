//! CoServer pair benchmark (needs root: it builds the namespaces, veth links and bridged
//! taps of the pair tests). Prints a table:
//! - protection overhead: the guest's progress rate (console lines per second) of a
//!   memory-writing `counter` run, standalone and as a protected pair, in one run;
//! - checkpoint pause and output-commit delay of that run; checkpoint pause and
//!   replication traffic of an idle guest (the `net` workload with no clients);
//! - takeover: from SIGKILL of the primary to the secondary reporting itself primary, and
//!   the longest TCP key-value SET a client saw across that failover.
//!
//! Run with `cargo bench -p ftvm-coserver --bench pair` (see docs/PERFORMANCE.md).

#[path = "../../tests/common/pair.rs"]
mod pair;

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use pair::{field, wait_until, write_config, CoServer, GuestSpec, PairNet, GUEST_IP};

const LIMIT: Duration = Duration::from_secs(60);
/// Console lines between which the progress rate is measured.
const FROM_STEP: u32 = 200;
const TO_STEP: u32 = 1800;
const BUSY: &str = "workload=counter pages=12000 steps=2000 tick_ms=0";

fn protected(net: &PairNet, dir: &std::path::Path, g: &GuestSpec) -> (CoServer, CoServer) {
    let a = CoServer::start("a", &net.ns[0], &write_config(dir, 0, g));
    assert!(
        wait_until(LIMIT, || field(&a.status(), "role") == "primary"),
        "{}",
        a.log()
    );
    let b = CoServer::start("b", &net.ns[1], &write_config(dir, 1, g));
    assert!(
        wait_until(LIMIT, || field(&a.status(), "mode") == "protected"),
        "A:\n{}\nB:\n{}",
        a.log(),
        b.log()
    );
    (a, b)
}

fn step_line(n: u32) -> String {
    format!("counter: step {n}/")
}

/// Seconds between the console lines of steps FROM_STEP and TO_STEP of a standalone run.
fn standalone_rate() -> f64 {
    let mut child = Command::new(env!("CARGO_BIN_EXE_ftvm"))
        .args(["run", "--mem", "64", "--idle", "skip", "--cmdline", BUSY])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn ftvm");
    let out = BufReader::new(child.stdout.take().expect("stdout"));
    let (mut from, mut to) = (None, None);
    for line in out.lines().map_while(Result::ok) {
        if line.starts_with(&step_line(FROM_STEP)) {
            from = Some(Instant::now());
        }
        if line.starts_with(&step_line(TO_STEP)) {
            to = Some(Instant::now());
        }
    }
    let _ = child.wait();
    let (Some(f), Some(t)) = (from, to) else {
        panic!("standalone run printed no steps")
    };
    f64::from(TO_STEP - FROM_STEP) / t.duration_since(f).as_secs_f64()
}

/// Polls A's released console for the two step lines.
fn pair_rate(a: &CoServer) -> f64 {
    let seen = |n| a.console().contains(&step_line(n));
    assert!(wait_until(LIMIT, || seen(FROM_STEP)), "{}", a.console());
    let from = Instant::now();
    assert!(wait_until(LIMIT, || seen(TO_STEP)), "{}", a.console());
    f64::from(TO_STEP - FROM_STEP) / from.elapsed().as_secs_f64()
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

fn main() {
    let Ok(net) = PairNet::try_create("bench") else {
        println!("pair benchmark SKIPPED: needs root for network namespaces");
        return;
    };
    println!("ftvm pair benchmark (2 veth links in namespaces, epoch_ms 10)\n");
    println!("| figure | value |\n|---|---|");

    // Protection overhead, standalone vs pair, measured in one run.
    let solo = standalone_rate();
    let dir = tempfile::tempdir().expect("tempdir");
    let busy = GuestSpec {
        cmdline: BUSY.into(),
        disk_mib: 0,
        network: false,
        heartbeat: (20, 10),
    };
    let (a, b) = protected(&net, dir.path(), &busy);
    let rate = pair_rate(&a);
    let st = a.status();
    println!(
        "| counter progress, standalone / protected pair (steps/s; each step writes 6 pages) | {solo:.0} / {rate:.0} (pair at {:.0}% of standalone) |",
        rate / solo * 100.0
    );
    println!(
        "| checkpoint pause, busy guest | {} |",
        pct(&st, "checkpoint_pause_us")
    );
    println!(
        "| output-commit delay, busy guest | {} |",
        pct(&st, "output_commit_delay_us")
    );
    drop((a, b));

    // An idle guest: pauses and replication traffic.
    let dir = tempfile::tempdir().expect("tempdir");
    let idle = GuestSpec {
        cmdline: format!("workload=net ip={GUEST_IP}/24"),
        disk_mib: 8,
        network: true,
        heartbeat: (20, 10),
    };
    let (a, b) = protected(&net, dir.path(), &idle);
    std::thread::sleep(Duration::from_secs(3));
    let st = a.status();
    let bytes = st
        .as_ref()
        .and_then(|s| s.get("replication_bytes_per_s"))
        .and_then(|v| v.as_u64())
        .unwrap_or(0);
    println!(
        "| checkpoint pause, idle guest (`net` workload, no clients) | {} |",
        pct(&st, "checkpoint_pause_us")
    );
    println!(
        "| replication traffic, idle guest (all links, incl. heartbeats) | {:.1} kbit/s |",
        bytes as f64 * 8.0 / 1000.0
    );
    drop((a, b));

    // Takeover after SIGKILL, two heartbeat settings, with a TCP client.
    for (interval, misses) in [(10u64, 3u32), (20, 10)] {
        let mut takeovers = Vec::new();
        let mut worst_set = Vec::new();
        for _ in 0..3 {
            let dir = tempfile::tempdir().expect("tempdir");
            let g = GuestSpec {
                cmdline: format!("workload=net ip={GUEST_IP}/24"),
                disk_mib: 8,
                network: true,
                heartbeat: (interval, misses),
            };
            let (mut a, b) = protected(&net, dir.path(), &g);
            let (tx, rx) = std::sync::mpsc::channel();
            let client = std::thread::spawn({
                let ns = net.ns[2].clone();
                move || {
                    let file = std::fs::File::open(format!("/run/netns/{ns}")).expect("netns");
                    use std::os::fd::AsRawFd;
                    // SAFETY: setns on this thread only, with a valid namespace fd.
                    let r = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
                    assert_eq!(r, 0);
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
                    let _ = kv(&mut c, "SHUTDOWN");
                    worst
                }
            });
            rx.recv().expect("client started");
            let t = Instant::now();
            a.kill();
            assert!(
                wait_until(LIMIT, || field(&b.status(), "role") == "primary"),
                "{}",
                b.log()
            );
            takeovers.push(t.elapsed());
            worst_set.push(client.join().expect("client"));
            drop(b);
        }
        let ms = |v: &[Duration]| {
            v.iter()
                .map(|d| format!("{:.0}", d.as_secs_f64() * 1000.0))
                .collect::<Vec<_>>()
                .join(", ")
        };
        println!(
            "| takeover after SIGKILL, heartbeat {interval} ms x {misses} (3 runs; kill to `primary` in status, incl. ~20 ms status polling) | {} ms |",
            ms(&takeovers)
        );
        println!(
            "| longest TCP SET across that failover, same runs (client TCP retransmission included) | {} ms |",
            ms(&worst_set)
        );
    }
}
