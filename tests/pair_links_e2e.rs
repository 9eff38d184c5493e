//! End-to-end tests of a pair's links under attack and of bounded waits: strangers and
//! replayed traffic on a link port, a secondary whose apply path stalls, and link
//! connections killed right after a copy. Real `ftvm coserver` processes in network
//! namespaces, as in `pair_e2e`.

#[path = "common/capture.rs"]
mod capture;
mod common;
#[path = "common/loopfs.rs"]
mod loopfs;
#[path = "common/pair.rs"]
mod pair;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::{Duration, Instant};

use pair::{
    field, paced_disk_with_b_on, protected_pair, setup, spec, wait_until, write_config, CoServer,
    LIMIT,
};

/// A counter guest that runs for about a minute.
const LONG_COUNTER: &str = "workload=counter pages=2400 steps=2400 tick_ms=25";
/// B's listening end of link 0, seen from host A's namespace.
const B_LINK0: &str = "10.1.1.2:7100";
/// The length of a link opening.
const OPENING: usize = ftvm_coserver::link::handshake::OPENING_LEN;
use ftvm_coserver::link::MAX_PENDING;
use loopfs::LoopFs;

/// Waits until A is still the protected primary and B its ready secondary of the same
/// generation, with no takeover logged.
fn still_protected(a: &CoServer, b: &CoServer, generation: u64) {
    let (sa, sb) = (a.typed(), b.typed());
    assert_eq!(sa.role, "primary", "{}", a.status_text());
    assert_eq!(sa.mode.as_deref(), Some("protected"), "{}", a.status_text());
    assert_eq!(sb.mode.as_deref(), Some("ready"), "{}", b.status_text());
    assert_eq!(
        sa.generation,
        generation,
        "a takeover happened:\n{}",
        a.log()
    );
    assert!(sa.guest_running);
    assert!(!b.log().contains("taking over"), "{}", b.log());
}

#[test]
fn strangers_on_a_link_port_change_nothing_and_hold_little_memory() {
    let Some((net, dir)) = setup("pair_strangers", "s") else {
        return;
    };
    let (a, b) = protected_pair(&net, dir.path(), &spec(LONG_COUNTER, 0, false));
    let generation = a.typed().generation;
    let before = b.typed().links[0].clone();
    let rss_before = b.rss_kib().expect("B's resident memory");
    let held = net.in_ns(0, || {
        let connect = || TcpStream::connect(B_LINK0).expect("connect to B's link port");
        // (a) What the listener sends first, written back: on the same connection
        // (reflected) and on new ones.
        let mut first = connect();
        first
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let mut opening = vec![0u8; OPENING];
        first.read_exact(&mut opening).expect("B's opening");
        let _ = first.write_all(&opening);
        for _ in 0..5 {
            let mut c = connect();
            let _ = c.write_all(&opening);
            let _ = c.write_all(&opening);
        }
        // Garbage.
        let _ = connect().write_all(&[0x5a; 200]);
        // (c) 200 connections, each announcing a 256 MiB frame and trickling bytes:
        // half after a well-formed opening, half in the middle of one.
        let mut held = Vec::new();
        for i in 0..200 {
            let mut c = connect();
            let mut head = ftvm_coserver::link::handshake::Opening::new(true, 0)
                .encode()
                .to_vec();
            if i % 2 == 0 {
                head.extend_from_slice(&(256u32 << 20).to_le_bytes());
            } else {
                head.truncate(30);
            }
            let _ = c.write_all(&head);
            held.push(c);
        }
        for _ in 0..50 {
            for c in &mut held {
                let _ = c.write_all(&[0xab; 16]);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        held
    });
    let rss_after = b.rss_kib().expect("B's resident memory");
    let after = b.typed().links[0].clone();
    println!(
        "B's resident memory {} -> {} KiB; link0 bad {} -> {}, auth-fail {} -> {}, evicted {} -> {}",
        rss_before,
        rss_after,
        before.bad_frames,
        after.bad_frames,
        before.auth_failures,
        after.auth_failures,
        before.evicted,
        after.evicted
    );
    assert!(
        rss_after < rss_before + 32 * 1024,
        "strangers made B hold {} KiB more",
        rss_after.saturating_sub(rss_before)
    );
    // Every stranger's connection was closed and counted, but the few still in their
    // handshake.
    let rejected = |l: &ftvm_coserver::link::LinkStatus| l.bad_frames + l.auth_failures + l.evicted;
    assert!(
        rejected(&after) >= rejected(&before) + 207 - MAX_PENDING as u64,
        "rejected {} of 207 strangers",
        rejected(&after) - rejected(&before)
    );
    assert!(
        after.bad_frames > before.bad_frames,
        "announced frames counted"
    );
    assert!(after.evicted > before.evicted, "stalled handshakes evicted");
    assert_eq!(after.connects, before.connects, "no stranger was installed");
    drop(held);
    std::thread::sleep(Duration::from_millis(500));
    still_protected(&a, &b, generation);
}

#[test]
fn link_traffic_recorded_from_an_earlier_session_of_the_pair_is_refused_when_replayed() {
    let Some((net, dir)) = setup("pair_replay", "r") else {
        return;
    };
    let cap = capture::start(&net.ns[0], "l1");
    let (a, b) = protected_pair(&net, dir.path(), &spec(LONG_COUNTER, 0, false));
    std::thread::sleep(Duration::from_secs(1));
    let segs = cap.stop();
    let a_to_b = capture::stream(&segs, 7100, true);
    let b_to_a = capture::stream(&segs, 7100, false);
    println!(
        "captured {} bytes A->B, {} bytes B->A on link 0",
        a_to_b.len(),
        b_to_a.len()
    );
    // The copy (LZ4-compressed: mostly zero pages) and checkpoints.
    assert!(a_to_b.len() > 64 << 10, "the copy went over link 0");
    assert!(
        !a_to_b.windows(16).any(|w| w == &b"workload=counter"[..]),
        "guest memory crossed the link unencrypted"
    );
    // B's process ends and a new one joins: the recording is of an earlier session now.
    let mut b = b;
    b.kill();
    let b = CoServer::start("b", &net.ns[1], &b.config);
    assert!(
        wait_until(LIMIT, || field(&a.status(), "mode") == "protected"
            && field(&b.status(), "mode") == "ready"),
        "B did not re-join:\n{}",
        b.log()
    );
    let generation = a.typed().generation;
    let before = b.typed().links[0].clone();
    net.in_ns(0, move || {
        // The whole recorded earlier session, as if from A (CopyStart, checkpoints,
        // heartbeats) and as if from B (Join, Acks), on fresh connections.
        for recorded in [&a_to_b, &b_to_a] {
            let mut c = TcpStream::connect(B_LINK0).expect("connect");
            c.set_write_timeout(Some(Duration::from_secs(2))).unwrap();
            let _ = c.write_all(&recorded[..recorded.len().min(4 << 20)]);
            std::thread::sleep(Duration::from_millis(200));
        }
    });
    let ok = wait_until(LIMIT, || {
        b.typed().links[0].auth_failures >= before.auth_failures + 2
    });
    let after = b.typed().links[0].clone();
    assert!(ok, "replays not counted: {after:?}");
    assert_eq!(after.connects, before.connects, "a replay was installed");
    std::thread::sleep(Duration::from_millis(500));
    still_protected(&a, &b, generation);
}

#[test]
fn a_secondary_whose_apply_stalls_is_dropped_within_the_ack_timeout_and_the_guest_runs_on() {
    let Some((net, dir)) = setup("pair_stall", "f") else {
        return;
    };
    let Some(fs) = LoopFs::for_test("pair_stall", dir.path(), 96) else {
        return;
    };
    let guest = paced_disk_with_b_on(fs.mount.clone());
    let (mut a, b) = protected_pair(&net, dir.path(), &guest);
    fs.freeze(true);
    let frozen_at = Instant::now();
    let degraded = wait_until(LIMIT, || field(&a.status(), "mode") == "degraded");
    let took = frozen_at.elapsed();
    let console_then = a.console().len();
    assert!(degraded, "A kept waiting for B:\n{}", a.status_text());
    println!("A degraded {} ms after B's replica froze", took.as_millis());
    assert!(a.log().contains("has not acknowledged"), "{}", a.log());
    assert!(
        wait_until(LIMIT, || a.console().len() > console_then),
        "the guest stopped on A"
    );
    fs.freeze(false);
    assert!(
        wait_until(LIMIT, || field(&a.status(), "mode") == "protected"
            && field(&b.status(), "mode") == "ready"),
        "B never re-joined:\nA:\n{}\nB:\n{}",
        a.status_text(),
        b.log()
    );
    assert_eq!(
        a.wait(LIMIT),
        Some(0),
        "the guest did not finish:\n{}",
        a.log()
    );
    assert!(
        a.console().contains("verified 3072 blocks ok"),
        "{}",
        a.console()
    );
}

#[test]
fn link_connections_killed_right_after_the_copy_end_protected_by_retry() {
    let Some((net, dir)) = setup("pair_sskill", "x") else {
        return;
    };
    let guest = spec(LONG_COUNTER, 8, false);
    let a = CoServer::start_initial("a", &net.ns[0], &write_config(dir.path(), 0, &guest));
    assert!(wait_until(LIMIT, || field(&a.status(), "role") == "primary"));
    let b = CoServer::start("b", &net.ns[1], &write_config(dir.path(), 1, &guest));
    assert!(
        wait_until(LIMIT, || matches!(
            field(&a.status(), "mode"),
            "awaiting-full-ack" | "protected"
        )),
        "{}",
        a.log()
    );
    let out = Command::new("ip")
        .args([
            "netns", "exec", &net.ns[0], "ss", "-K", "dport", "=", "7100",
        ])
        .output()
        .expect("ss");
    let killed = String::from_utf8_lossy(&out.stdout)
        .matches("ESTAB")
        .count();
    println!("killed {killed} link connections");
    assert!(killed >= 2, "ss -K found {killed} connections: {out:?}");
    assert!(
        wait_until(LIMIT, || field(&a.status(), "mode") == "protected"
            && field(&b.status(), "mode") == "ready"
            && a.typed().links.iter().all(|l| l.healthy && l.connects >= 2)),
        "not protected again:\nA:\n{}\n{}\nB:\n{}",
        a.status_text(),
        a.log(),
        b.log()
    );
}
