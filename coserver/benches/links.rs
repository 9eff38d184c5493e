//! Link benchmark: two link sets on loopback in one process (two links each, as in a
//! pair), one streaming incompressible 1 MiB messages to the other. For encryption on
//! and off it prints the goodput (each message crosses both links, so the links carry
//! twice that), the CPU time of both ends per Gbit/s of goodput, and the heartbeat round
//! trip seen while the bulk data flows (heartbeats go ahead of bulk chunks). First, the
//! floor under any round trip between two CoServers here: bare TCP between two threads
//! on one core and on two.
//!
//! Run with `cargo bench -p ftvm-coserver --bench links` (see docs/PERFORMANCE.md).

use std::time::{Duration, Instant};

#[path = "../../tests/common/mod.rs"]
mod common;
use common::pin_thread;

use ftvm_coserver::link::handshake::fill_random;
use ftvm_coserver::link::test_support::{local, options, pair_configs};
use ftvm_coserver::link::{Event, Links};
use ftvm_coserver::protocol::Message;

/// Bytes sent per setting.
const TOTAL: usize = 1 << 30;
/// Message size.
const MESSAGE: usize = 1 << 20;
/// Messages queued per link at most before the sender waits.
const WINDOW: usize = 32;

fn cpu_seconds() -> f64 {
    // SAFETY: getrusage writes into the zeroed struct we pass; no other precondition.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: as above; RUSAGE_SELF is always valid.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) };
    let t = |tv: libc::timeval| tv.tv_sec as f64 + tv.tv_usec as f64 / 1e6;
    t(u.ru_utime) + t(u.ru_stime)
}

struct Row {
    encrypt: bool,
    mbit: f64,
    cpu_per_gbit: f64,
    rtt_max_ms: f64,
}

fn measure(encrypt: bool) -> Row {
    let (xs, ys) = pair_configs();
    let opts = options(b"bench-key-0123456789", encrypt);
    let (x, _xrx) = Links::start(&xs, opts.clone(), local("x", 64)).expect("links x");
    let (y, mut yrx) = Links::start(&ys, opts, local("y", 64)).expect("links y");
    let start = Instant::now();
    while x.status().iter().filter(|s| s.healthy).count() < 2 {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "links never came up"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let mut data = vec![0u8; MESSAGE];
    fill_random(&mut data);
    let count = TOTAL / MESSAGE;
    let receiver = std::thread::spawn(move || {
        let mut got = 0;
        while got < count {
            match yrx.recv_timeout(Duration::from_secs(10)) {
                Ok(Event::Message(_)) => got += 1,
                Ok(_) => {}
                Err(e) => panic!("receiver: {e:?} after {got} messages"),
            }
        }
        y
    });
    let cpu0 = cpu_seconds();
    let t0 = Instant::now();
    let mut rtt_max: f64 = 0.0;
    for i in 0..count {
        while x.backlog().unwrap_or(0) >= WINDOW {
            std::thread::sleep(Duration::from_micros(200));
        }
        let msg = Message::Inbound {
            position: i as u64,
            frame: data.clone(),
        };
        x.send(&msg).expect("send");
        if i % 16 == 0 {
            for l in x.status() {
                rtt_max = rtt_max.max(l.rtt_ms.unwrap_or(0.0));
            }
        }
    }
    let y = receiver.join().expect("receiver");
    let secs = t0.elapsed().as_secs_f64();
    let cpu = cpu_seconds() - cpu0;
    x.shutdown();
    y.shutdown();
    let gbit = (TOTAL as f64 * 8.0) / 1e9;
    Row {
        encrypt,
        mbit: gbit * 1000.0 / secs,
        cpu_per_gbit: cpu / gbit,
        rtt_max_ms: rtt_max,
    }
}

/// Round trips of the bare-TCP floor rows.
const ROUND_TRIPS: usize = 20_000;

/// The round trip of 64 bytes over one loopback TCP connection between two threads
/// pinned to `cpus`, with nothing of ours in between: the floor under any message's
/// round trip between two CoServers on this machine. Returns (p50, p99) in µs.
fn bare_round_trip(cpus: (usize, usize)) -> (f64, f64) {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("address");
    let echo = std::thread::spawn(move || {
        pin_thread(cpus.1);
        let (mut s, _) = listener.accept().expect("accept");
        s.set_nodelay(true).expect("nodelay");
        let mut buf = [0u8; 64];
        while s.read_exact(&mut buf).is_ok() {
            if s.write_all(&buf).is_err() {
                break;
            }
        }
    });
    // A thread of its own: a pinned main thread would pin what it starts later.
    let mut times = std::thread::spawn(move || {
        pin_thread(cpus.0);
        let mut s = std::net::TcpStream::connect(addr).expect("connect");
        s.set_nodelay(true).expect("nodelay");
        let mut buf = [0u8; 64];
        let mut times = Vec::with_capacity(ROUND_TRIPS);
        for _ in 0..ROUND_TRIPS {
            let t = Instant::now();
            s.write_all(&buf).expect("write");
            s.read_exact(&mut buf).expect("read");
            times.push(t.elapsed());
        }
        times
    })
    .join()
    .expect("client thread");
    let _ = echo.join();
    times.sort();
    let us = |q: f64| times[((times.len() - 1) as f64 * q) as usize].as_secs_f64() * 1e6;
    (us(0.5), us(0.99))
}

fn main() {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!("bare TCP round trip, 64 bytes, {ROUND_TRIPS} times, two threads:");
    for (name, cpus) in [("same core", (0, 0)), ("two cores", (0, 1))] {
        if cpus.1 >= cores {
            println!("{name:<10} skipped: {cores} core(s)");
            continue;
        }
        let (p50, p99) = bare_round_trip(cpus);
        println!("{name:<10} p50 {p50:.0} µs, p99 {p99:.0} µs");
    }
    println!(
        "links: {} MiB of incompressible 1 MiB messages over 2 loopback links (each message on both)",
        TOTAL >> 20
    );
    println!(
        "{:<14} {:>14} {:>22} {:>26}",
        "encryption", "goodput Mbit/s", "CPU s per Gbit (both)", "heartbeat RTT max (ms)"
    );
    for encrypt in [true, false] {
        let r = measure(encrypt);
        println!(
            "{:<14} {:>14.0} {:>22.3} {:>26.2}",
            if r.encrypt { "on" } else { "off (auth)" },
            r.mbit,
            r.cpu_per_gbit,
            r.rtt_max_ms
        );
    }
}
