//! Redirected-device benchmark: disk throughput and IOPS of the built-in guest's `disk`
//! workload, and network round trip and throughput between a host client and the guest's
//! `net` workload over a real tap in a namespace this benchmark makes (needs root; the
//! network rows are skipped with a reason otherwise). Prints a table.
//!
//! Run with `cargo bench -p ftvm-coserver --bench devices` (see docs/PERFORMANCE.md).

#[path = "../../tests/common/netns.rs"]
mod netns;

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpStream, UdpSocket};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const BLOCK: u64 = 4096;

fn percentile(v: &mut [Duration], p: f64) -> Duration {
    v.sort();
    v[((v.len() - 1) as f64 * p).round() as usize]
}

fn us(d: Duration) -> String {
    format!("{:.0} µs", d.as_secs_f64() * 1e6)
}

fn image(path: &Path, mib: u64) {
    let f = std::fs::File::create(path).expect("create image");
    f.set_len(mib << 20).expect("size image");
}

/// Reads console lines until one contains `needle`; returns when it arrived.
fn line_time(out: &mut impl BufRead, needle: &str) -> Instant {
    let mut line = String::new();
    loop {
        line.clear();
        if out.read_line(&mut line).expect("read console") == 0 {
            panic!("console ended before {needle:?}");
        }
        if line.contains(needle) {
            return Instant::now();
        }
    }
}

/// One `disk` run of `blocks` 4 KiB blocks, `batch` per request: (write+flush,
/// read+verify) wall times, taken from the arrival of the guest's phase lines on the
/// console.
fn disk_run(blocks: u64, batch: u64) -> (Duration, Duration) {
    let dir = tempfile::tempdir().expect("tempdir");
    let img = dir.path().join("bench.img");
    image(&img, ((blocks * BLOCK) >> 20) + 4);
    let mut child = Command::new(env!("CARGO_BIN_EXE_ftvm"))
        .args(["run", "--disk"])
        .arg(&img)
        .args([
            "--cmdline",
            &format!("workload=disk blocks={blocks} gen=3 batch={batch}"),
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn ftvm");
    let mut out = BufReader::new(child.stdout.take().expect("stdout"));
    let start = line_time(&mut out, " sectors");
    let wrote = line_time(&mut out, "disk: wrote ");
    let verified = line_time(&mut out, "blocks ok");
    assert!(
        child.wait().expect("wait").success(),
        "disk workload failed"
    );
    (wrote - start, verified - wrote)
}

fn disk_rows() {
    println!("| disk (virtio-blk on a file; one request in flight) | write, then one flush | read + verify |");
    println!("|---|---|---|");
    for (blocks, batch) in [(8192u64, 16u64), (4096, 1)] {
        let (w, r) = disk_run(blocks, batch);
        let mib = (blocks * BLOCK) as f64 / (1 << 20) as f64;
        let requests = blocks.div_ceil(batch) as f64;
        let row = |d: Duration| {
            format!(
                "{:.1} MiB/s, {:.0} requests/s",
                mib / d.as_secs_f64(),
                requests / d.as_secs_f64()
            )
        };
        println!(
            "| {mib:.0} MiB in {} KiB requests | {} | {} |",
            batch * BLOCK / 1024,
            row(w),
            row(r)
        );
    }
}

struct NetGuest {
    ns: netns::NetNs,
    child: Child,
    _dir: tempfile::TempDir,
}

fn start_net_guest() -> Result<NetGuest, String> {
    let ns = netns::NetNs::try_create("bench").map_err(|e| format!("no namespace/tap: {e}"))?;
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let img = dir.path().join("kv.img");
    image(&img, 8);
    let mut child = ns
        .command(env!("CARGO_BIN_EXE_ftvm"))
        .args(["run", "--tap", &ns.tap, "--disk"])
        .arg(&img)
        .args([
            "--cmdline",
            &format!("workload=net ip={}/24", netns::GUEST_IP),
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|e| format!("spawn ftvm: {e}"))?;
    let mut out = BufReader::new(child.stdout.take().expect("stdout"));
    line_time(&mut out, "net: up");
    // Keep draining the console so the guest never blocks on a full pipe.
    std::thread::spawn(move || std::io::copy(&mut out, &mut std::io::sink()));
    Ok(NetGuest {
        ns,
        child,
        _dir: dir,
    })
}

/// `ping` round trips: (min, avg, max) as ping prints them, in ms.
fn ping(ns: &netns::NetNs) -> String {
    let out = ns
        .command("ping")
        .args(["-q", "-c", "200", "-i", "0.005", "-W", "1", netns::GUEST_IP])
        .output()
        .expect("run ping");
    let text = String::from_utf8_lossy(&out.stdout);
    let loss = text
        .lines()
        .find(|l| l.contains("packet loss"))
        .unwrap_or("?")
        .to_string();
    let rtt = text
        .lines()
        .find(|l| l.starts_with("rtt"))
        .and_then(|l| l.split('=').nth(1))
        .unwrap_or("?")
        .trim()
        .to_string();
    format!("min/avg/max/mdev {rtt} ({loss})")
}

struct NetFigures {
    udp_rtt: (Duration, Duration),
    udp_lost: usize,
    udp_mib_s: f64,
    set_rate: f64,
    set_p50: Duration,
    get_rate: f64,
    get_p50: Duration,
}

fn kv(stream: &mut BufReader<TcpStream>, request: &str) -> String {
    stream
        .get_mut()
        .write_all(format!("{request}\n").as_bytes())
        .expect("send request");
    let mut reply = String::new();
    stream.read_line(&mut reply).expect("read reply");
    reply.trim_end().to_string()
}

/// UDP echo and TCP key-value figures, measured from inside the namespace.
fn net_client() -> NetFigures {
    let guest_udp = format!("{}:7", netns::GUEST_IP);
    let udp = UdpSocket::bind("0.0.0.0:0").expect("bind");
    udp.set_read_timeout(Some(Duration::from_millis(200)))
        .expect("timeout");
    let mut buf = [0u8; 2048];

    // Round trips of 64-byte datagrams, one at a time; a late echo of an earlier one is
    // skipped.
    udp.set_read_timeout(Some(Duration::from_secs(2)))
        .expect("timeout");
    let mut rtts = Vec::new();
    let mut lost = 0;
    for i in 0..1000u32 {
        let msg = [i.to_le_bytes().as_slice(), &[0x5a; 60]].concat();
        let t = Instant::now();
        udp.send_to(&msg, &guest_udp).expect("send");
        loop {
            match udp.recv_from(&mut buf) {
                Ok((n, _)) if buf[..n] == msg[..] => {
                    rtts.push(t.elapsed());
                    break;
                }
                Ok(_) => continue,
                Err(_) => {
                    lost += 1;
                    break;
                }
            }
        }
    }
    let udp_rtt = (percentile(&mut rtts, 0.5), percentile(&mut rtts, 0.99));

    // Throughput: 1024-byte datagrams, up to 4 in flight, 4000 sent.
    let payload = [0xa5u8; 1024];
    let (mut sent, mut echoed, mut inflight) = (0usize, 0usize, 0usize);
    let t = Instant::now();
    while sent < 4000 || inflight > 0 {
        while sent < 4000 && inflight < 4 {
            udp.send_to(&payload, &guest_udp).expect("send");
            sent += 1;
            inflight += 1;
        }
        match udp.recv_from(&mut buf) {
            Ok((n, _)) => {
                echoed += n;
                inflight -= 1;
            }
            Err(_) => {
                lost += inflight;
                inflight = 0;
            }
        }
    }
    let udp_mib_s = echoed as f64 / (1 << 20) as f64 / t.elapsed().as_secs_f64();

    // Key-value: durable SETs then GETs on one connection, 100-byte values.
    let addr = format!("{}:7000", netns::GUEST_IP);
    let s = TcpStream::connect_timeout(&addr.parse().expect("addr"), Duration::from_secs(10))
        .expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    s.set_nodelay(true).expect("nodelay");
    let mut c = BufReader::new(s);
    let value = "v".repeat(100);
    let mut run = |op: &str| {
        let mut lat = Vec::new();
        let t = Instant::now();
        for i in 0..500 {
            let req = if op == "SET" {
                format!("SET key{i} {value}")
            } else {
                format!("GET key{i}")
            };
            let r = Instant::now();
            let reply = kv(&mut c, &req);
            lat.push(r.elapsed());
            assert!(reply == "OK" || reply.starts_with("VALUE"), "{op}: {reply}");
        }
        (500.0 / t.elapsed().as_secs_f64(), percentile(&mut lat, 0.5))
    };
    let (set_rate, set_p50) = run("SET");
    let (get_rate, get_p50) = run("GET");
    assert_eq!(kv(&mut c, "SHUTDOWN"), "BYE");
    NetFigures {
        udp_rtt,
        udp_lost: lost,
        udp_mib_s,
        set_rate,
        set_p50,
        get_rate,
        get_p50,
    }
}

fn net_rows() {
    println!("| network (virtio-net on a tap, host client in the namespace) | value |");
    println!("|---|---|");
    let mut guest = match start_net_guest() {
        Ok(g) => g,
        Err(e) => {
            println!("| skipped | {e} |");
            return;
        }
    };
    println!(
        "| ICMP echo, 200 pings 5 ms apart (ms) | {} |",
        ping(&guest.ns)
    );
    let f = guest.ns.run(net_client);
    println!(
        "| UDP echo round trip, 64 B, 1000 sequential | p50 {}, p99 {} |",
        us(f.udp_rtt.0),
        us(f.udp_rtt.1)
    );
    println!(
        "| UDP echo throughput, 1 KiB datagrams, 4 in flight | {:.2} MiB/s echoed ({} datagrams lost of 5000) |",
        f.udp_mib_s, f.udp_lost
    );
    println!(
        "| TCP key-value SET (durable: disk write + flush before OK), 500 | {:.0} /s, p50 {} |",
        f.set_rate,
        us(f.set_p50)
    );
    println!(
        "| TCP key-value GET (read from disk), 500 | {:.0} /s, p50 {} |",
        f.get_rate,
        us(f.get_p50)
    );
    let status = guest.child.wait().expect("wait");
    assert!(status.success(), "guest exit {status:?}");
}

fn main() {
    println!("ftvm redirected-device benchmark\n");
    disk_rows();
    println!();
    net_rows();
}
