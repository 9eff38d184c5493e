//! End-to-end tests of a CoServer pair: two real `ftvm coserver` processes in network
//! namespaces joined by two real veth links, each with a real tap bridged to a client
//! LAN the test creates.

mod common;
#[path = "common/pair.rs"]
mod pair;

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::*;
use pair::{field, wait_until, write_config, CoServer, GuestSpec, PairNet, GUEST_IP};

const LIMIT: Duration = Duration::from_secs(60);
/// 20 ms heartbeats, peer lost after 200 ms: clear of false failovers on a loaded
/// machine running other tests.
const HEARTBEAT: (u64, u32) = (20, 10);

/// Starts A, waits until it runs the guest, starts B and waits until the pair is
/// protected.
fn protected_pair(net: &PairNet, dir: &std::path::Path, guest: &GuestSpec) -> (CoServer, CoServer) {
    let ca = write_config(dir, 0, guest);
    let cb = write_config(dir, 1, guest);
    let a = CoServer::start("a", &net.ns[0], &ca);
    assert!(
        wait_until(LIMIT, || field(&a.status(), "role") == "primary"),
        "A never became primary:\n{}",
        a.log()
    );
    let b = CoServer::start("b", &net.ns[1], &cb);
    assert!(
        wait_until(LIMIT, || field(&a.status(), "mode") == "protected"
            && field(&b.status(), "mode") == "ready"),
        "the pair never became protected:\nA:\n{}\nB:\n{}",
        a.log(),
        b.log()
    );
    (a, b)
}

fn setup(test: &str, tag: &str) -> Option<(PairNet, tempfile::TempDir)> {
    if !kvm_available(test) || !root_available(test) {
        return None;
    }
    let net = PairNet::create(test, tag)?;
    Some((net, tempfile::tempdir().unwrap()))
}

#[test]
fn killing_the_primary_mid_disk_workload_loses_and_repeats_no_output() {
    let Some((net, dir)) = setup("pair_kill_disk", "k") else {
        return;
    };
    let cmdline = "workload=disk blocks=3072 batch=1";
    // The uninterrupted run, for comparison.
    let img = dir.path().join("solo.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(16 << 20)
        .unwrap();
    let solo = ftvm_outcome(&[
        "run",
        "--mem",
        "64",
        "--disk",
        s(&img),
        "--cmdline",
        cmdline,
    ]);
    assert_eq!(solo.code, 0, "{}", solo.stderr);

    let guest = GuestSpec {
        cmdline: cmdline.into(),
        disk_mib: 16,
        network: false,
        heartbeat: HEARTBEAT,
    };
    let (mut a, mut b) = protected_pair(&net, dir.path(), &guest);
    assert!(
        wait_until(LIMIT, || a.console().contains("disk: written 1024/")),
        "no progress on A:\n{}",
        a.console()
    );
    a.kill();
    let code = b.wait(LIMIT);
    assert_eq!(code, Some(0), "B did not finish the guest:\n{}", b.log());
    let combined = a.console() + &b.console();
    assert!(
        !b.console().is_empty(),
        "B released nothing; A ran to the end?"
    );
    assert_eq!(
        combined, solo.console,
        "A's and B's console together must be the uninterrupted run's, each line once"
    );
    assert!(
        b.log().contains("taking over from checkpoint"),
        "{}",
        b.log()
    );
}

fn kv(stream: &mut BufReader<TcpStream>, request: &str) -> std::io::Result<String> {
    stream
        .get_mut()
        .write_all(format!("{request}\n").as_bytes())?;
    let mut reply = String::new();
    if stream.read_line(&mut reply)? == 0 {
        return Err(std::io::Error::other("connection closed"));
    }
    Ok(reply.trim_end().to_string())
}

#[test]
fn a_tcp_client_keeps_its_connection_and_every_acknowledged_set_across_failover() {
    let Some((net, dir)) = setup("pair_kill_kv", "n") else {
        return;
    };
    let guest = GuestSpec {
        cmdline: format!("workload=net ip={GUEST_IP}/24"),
        disk_mib: 8,
        network: true,
        heartbeat: HEARTBEAT,
    };
    let (mut a, mut b) = protected_pair(&net, dir.path(), &guest);
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let client = std::thread::scope(|scope| {
        let killer = scope.spawn(move || {
            // Kill the primary once the client is well under way.
            rx.recv().unwrap();
            a.kill();
            a
        });
        let client = net.in_lan(move || {
            let addr = format!("{GUEST_IP}:7000").parse().unwrap();
            let s = TcpStream::connect_timeout(&addr, Duration::from_secs(10)).expect("connect");
            s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
            let mut c = BufReader::new(s);
            let mut acked = Vec::new();
            let mut worst = Duration::ZERO;
            for i in 0..300u32 {
                if i == 100 {
                    tx.send(()).unwrap();
                }
                let t = Instant::now();
                let reply =
                    kv(&mut c, &format!("SET k{i} v{i}")).expect("SET over the same connection");
                assert_eq!(reply, "OK", "SET k{i}");
                acked.push(i);
                worst = worst.max(t.elapsed());
            }
            for &i in &acked {
                assert_eq!(
                    kv(&mut c, &format!("GET k{i}")).unwrap(),
                    format!("VALUE v{i}")
                );
            }
            assert_eq!(kv(&mut c, "SHUTDOWN").unwrap(), "BYE");
            (acked.len(), worst)
        });
        let a = killer.join().unwrap();
        (client, a)
    });
    let ((acked, worst), a_after) = client;
    drop(a_after);
    println!("client outage across the failover (longest SET): {worst:?}; {acked} SETs acknowledged and read back");
    assert_eq!(b.wait(LIMIT), Some(0), "B:\n{}", b.log());
}

#[test]
fn one_link_down_changes_nothing_for_the_guest_but_raises_an_alert() {
    let Some((net, dir)) = setup("pair_one_link", "o") else {
        return;
    };
    let guest = GuestSpec {
        cmdline: "workload=counter pages=800 steps=400 tick_ms=25".into(),
        disk_mib: 0,
        network: false,
        heartbeat: HEARTBEAT,
    };
    let (a, b) = protected_pair(&net, dir.path(), &guest);
    net.link(1, false);
    let alerted = wait_until(LIMIT, || {
        a.status()
            .and_then(|s| s.get("alerts").cloned())
            .is_some_and(|al| al.to_string().contains("link0 lost"))
    });
    assert!(alerted, "no alert:\n{}", a.status_text());
    let before = a.console().len();
    std::thread::sleep(Duration::from_millis(500));
    let (sa, sb) = (a.status(), b.status());
    assert_eq!(field(&sa, "role"), "primary", "{}", a.status_text());
    assert_eq!(field(&sa, "mode"), "protected", "{}", a.status_text());
    assert_eq!(field(&sb, "role"), "secondary", "{}", b.status_text());
    assert!(a.console().len() > before, "the guest stopped");
    assert!(b.console().is_empty(), "B must not run the guest");
    println!("{}", a.status_text());
    net.link(1, true);
}

#[test]
fn with_all_links_down_the_arbiter_lets_exactly_one_run() {
    let Some((net, dir)) = setup("pair_split", "s") else {
        return;
    };
    let guest = GuestSpec {
        cmdline: "workload=counter pages=800 steps=400 tick_ms=25".into(),
        disk_mib: 0,
        network: false,
        heartbeat: HEARTBEAT,
    };
    let (a, b) = protected_pair(&net, dir.path(), &guest);
    net.link(1, false);
    net.link(2, false);
    let settled = wait_until(LIMIT, || {
        let roles = [
            field(&a.status(), "role").to_string(),
            field(&b.status(), "role").to_string(),
        ];
        roles.contains(&"fenced".to_string()) && roles.contains(&"primary".to_string())
    });
    assert!(settled, "A:\n{}\nB:\n{}", a.status_text(), b.status_text());
    let running: Vec<bool> = [&a, &b]
        .iter()
        .map(|n| {
            n.status()
                .and_then(|s| s.get("guest_running").and_then(|v| v.as_bool()))
                .unwrap_or(false)
        })
        .collect();
    assert_eq!(running.iter().filter(|&&r| r).count(), 1, "{running:?}");
    // The fenced one stays fenced and emits nothing more.
    let fenced = if field(&a.status(), "role") == "fenced" {
        &a
    } else {
        &b
    };
    let before = fenced.console().len();
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(fenced.console().len(), before);
    println!("A:\n{}\nB:\n{}", a.status_text(), b.status_text());
}

#[test]
fn a_restarted_coserver_rejoins_the_survivor_and_the_pair_is_protected_again() {
    let Some((net, dir)) = setup("pair_rejoin", "r") else {
        return;
    };
    let guest = GuestSpec {
        cmdline: "workload=counter pages=800 steps=400 tick_ms=25".into(),
        disk_mib: 4,
        network: false,
        heartbeat: HEARTBEAT,
    };
    let (mut a, b) = protected_pair(&net, dir.path(), &guest);
    a.kill();
    assert!(
        wait_until(LIMIT, || field(&b.status(), "role") == "primary"),
        "{}",
        b.log()
    );
    // The same host comes back with its old configuration and state: it has not heard
    // the new generation, so it must join rather than claim.
    let a = CoServer::start("a", &net.ns[0], &dir.path().join("a.toml"));
    assert!(
        wait_until(LIMIT, || field(&b.status(), "mode") == "protected"
            && field(&a.status(), "mode") == "ready"),
        "no re-protection:\nA:\n{}\nB:\n{}",
        a.log(),
        b.status_text()
    );
    assert!(
        a.console().is_empty(),
        "the rejoined node must not run the guest"
    );
    assert!(
        b.status_text().contains("generation 2"),
        "{}",
        b.status_text()
    );
}

#[test]
fn the_demo_kills_its_primary_and_the_guest_finishes_on_the_other_coserver() {
    if !kvm_available("demo") {
        return;
    }
    // As root the demo runs with a network and a TCP client; otherwise disk only.
    let network = if root_available("demo") { "on" } else { "off" };
    let o = run_ftvm(&[
        "demo",
        "--network",
        network,
        "--kill-after",
        "0.5",
        "--blocks",
        "1024",
    ]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert_eq!(
        o.status.code(),
        Some(0),
        "{out}\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(out.contains("== killing the primary, CoServer a"), "{out}");
    assert!(out.contains("== CoServer b took over"), "{out}");
    let finished = if network == "on" {
        "[client] all 300 acknowledged SETs read back after the failover"
    } else {
        "[guest via b] disk: verified 1024 blocks ok"
    };
    assert!(out.contains(finished), "{out}");
}
