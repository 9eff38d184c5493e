//! End-to-end tests of restart safety, one per way a pair used to lose data: which disk
//! is the pair's data at a first start, a primary's CoServer restarted faster than the
//! failure timeout, two primaries from arbiter directories that are not one, and a
//! secondary whose replica's file system is full. Real `ftvm coserver` processes in
//! network namespaces, as in `pair_e2e`.

mod common;
#[path = "common/loopfs.rs"]
mod loopfs;
#[path = "common/pair.rs"]
mod pair;

use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use ftvm_coserver::protocol::Standing;
use pair::{
    get_keys, kv, kv_connect, protected_pair, set_keys, setup, spec, wait_until, write_config,
    CoServer, GuestSpec, TestArbiter, COUNTER, GUEST_IP, LIMIT,
};

/// Writes `blocks` blocks of generation `gen` onto the disk image `img` with a lone
/// `ftvm run`.
fn write_blocks(img: &Path, blocks: u32, gen: u32) {
    let cmdline = format!("workload=disk blocks={blocks} gen={gen} mode=write");
    let o = ftvm_outcome(&[
        "run",
        "--mem",
        "64",
        "--disk",
        s(img),
        "--cmdline",
        &cmdline,
    ]);
    assert_eq!(o.code, 0, "{}", o.stderr);
}

#[test]
fn a_blank_replica_never_boots_and_the_designated_data_is_never_copied_over() {
    let Some((net, dir)) = setup("pair_first_start", "i") else {
        return;
    };
    let template = dir.path().join("template.img");
    std::fs::File::create(&template)
        .unwrap()
        .set_len(8 << 20)
        .unwrap();
    write_blocks(&template, 256, 5);
    let data = std::fs::read(&template).unwrap();
    // The guest only reads A's data and exits 0 if every block is A's.
    let guest = spec("workload=disk blocks=256 gen=5 mode=verify", 8, false);
    for round in 0..11 {
        let d = dir.path().join(format!("round{round}"));
        std::fs::create_dir_all(&d).unwrap();
        let (ca, cb) = (write_config(&d, 0, &guest), write_config(&d, 1, &guest));
        std::fs::copy(&template, d.join("disk-a.img")).unwrap();
        let (mut a, mut b);
        if round == 0 {
            // B, holding nothing, first: it waits however long, and says why.
            b = CoServer::start("b", &net.ns[1], &cb);
            assert!(
                wait_until(LIMIT, || b
                    .typed()
                    .waiting
                    .is_some_and(|w| w.contains("--initial-primary"))),
                "B does not say why it waits:\n{}",
                b.status_text()
            );
            std::thread::sleep(Duration::from_millis(1000));
            assert_eq!(b.typed().role, "starting", "{}", b.log());
            a = CoServer::start_initial("a", &net.ns[0], &ca);
        } else {
            // Both at once, B a hair first.
            b = CoServer::start("b", &net.ns[1], &cb);
            a = CoServer::start_initial("a", &net.ns[0], &ca);
        }
        assert_eq!(
            a.wait(LIMIT),
            Some(0),
            "round {round}: the guest must run on A's data:\nA:\n{}\n{}\nB:\n{}",
            a.console(),
            a.log(),
            b.log()
        );
        assert!(a.console().contains("blocks ok"), "{}", a.console());
        assert!(b.console().is_empty(), "round {round}: B ran the guest");
        assert!(
            !b.log().contains("starting the guest"),
            "round {round}: B booted:\n{}",
            b.log()
        );
        assert!(
            std::fs::read(d.join("disk-a.img")).unwrap() == data,
            "round {round}: A's data was overwritten"
        );
        b.kill();
    }
}

/// A protected pair with 200 ms × 5 heartbeats; the primary's CoServer is killed and
/// started again at once while a client makes SETs over one connection; every SET it
/// saw acknowledged must read back from the same connection (a rebooted guest has
/// neither the connection nor the keys).
fn primary_restarted_at_once(test: &str, tag: &str, arbiter: TestArbiter) {
    let Some((net, dir)) = setup(test, tag) else {
        return;
    };
    let guest = GuestSpec {
        heartbeat: (200, 5),
        arbiter,
        ..spec(&format!("workload=net ip={GUEST_IP}/24"), 8, true)
    };
    let (a, mut b) = protected_pair(&net, dir.path(), &guest);
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let ns_a = net.ns[0].clone();
    let restarter = std::thread::spawn(move || {
        let mut a = a;
        rx.recv().unwrap();
        a.kill();
        let killed = Instant::now();
        let config = a.config.clone();
        let restarted = CoServer::start("a", &ns_a, &config);
        (a, restarted, killed.elapsed())
    });
    let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
    let lan = net.ns[2].clone();
    let client = std::thread::spawn(move || {
        ftvm_coserver::netns::run_in(&lan, move || {
            let mut c = kv_connect();
            let worst = set_keys(&mut c, 300, 100, &tx);
            get_keys(&mut c, 300);
            // The test checks the pair first, then the guest is shut down.
            let _ = done_rx.recv();
            assert_eq!(kv(&mut c, "SHUTDOWN").unwrap(), "BYE");
            worst
        })
        .expect("client thread in the LAN namespace")
    });
    let (old_a, a, restart_gap) = restarter.join().unwrap();
    drop(old_a);
    assert!(
        restart_gap < Duration::from_millis(500),
        "restarted after {restart_gap:?}"
    );
    assert!(
        wait_until(LIMIT, || a.typed().role == "secondary"),
        "the restarted A did not join B:\nA:\n{}\nB:\n{}",
        a.log(),
        b.log()
    );
    assert!(b.log().contains("restarted"), "B:\n{}", b.log());
    assert!(
        !a.log().contains("starting the guest"),
        "the restarted A booted the guest:\n{}",
        a.log()
    );
    done_tx.send(()).unwrap();
    let worst = client.join().expect("client");
    let line = format!(
        "primary CoServer restarted within 0.5 s ({test}): 300 SETs acknowledged and read back over one connection, longest SET {worst:?}"
    );
    println!("{line}");
    report(&line);
    assert_eq!(b.wait(LIMIT), Some(0), "B:\n{}", b.log());
}

#[test]
fn a_primary_restarted_within_half_a_second_is_taken_over_and_keeps_every_set() {
    primary_restarted_at_once("pair_restart_fast", "r", TestArbiter::Shared);
}

#[test]
fn with_arbiter_none_a_restarted_named_primary_joins_its_ready_peer() {
    primary_restarted_at_once("pair_restart_none", "o", TestArbiter::NoneNamingA);
}

#[test]
fn nodes_with_arbiter_directories_of_their_own_never_stay_two_primaries() {
    let Some((net, dir)) = setup("pair_own_arbiters", "w") else {
        return;
    };
    let guest = GuestSpec {
        arbiter: TestArbiter::OwnDirectories,
        ..spec(COUNTER, 0, false)
    };
    // Cut off from each other at start, each wins generation 1 in its own directory.
    net.link(1, false);
    net.link(2, false);
    let a = CoServer::start("a", &net.ns[0], &write_config(dir.path(), 0, &guest));
    let b = CoServer::start("b", &net.ns[1], &write_config(dir.path(), 1, &guest));
    assert!(
        wait_until(LIMIT, || a.typed().role == "primary"
            && b.typed().role == "primary"),
        "A:\n{}\nB:\n{}",
        a.log(),
        b.log()
    );
    net.link(1, true);
    net.link(2, true);
    let links_up = Instant::now();
    // Each status sample of B: while it hears A it must not stay primary.
    let mut heard_as_primary = Duration::ZERO;
    let mut last = Instant::now();
    let mut resolved = None;
    while links_up.elapsed() < LIMIT && resolved.is_none() {
        let sb = b.typed();
        let now = Instant::now();
        if sb.peer.alive && sb.role == "primary" {
            heard_as_primary += now - last;
        }
        if sb.role != "primary" && !sb.role.is_empty() {
            resolved = Some(now);
        }
        last = now;
        std::thread::sleep(Duration::from_millis(5));
    }
    let resolved = resolved.unwrap_or_else(|| panic!("still two primaries:\nB:\n{}", b.log()));
    let line = format!(
        "two primaries from arbiter directories of their own: B fenced {:?} after the links came up (reconnection included); B was seen primary while hearing A for {heard_as_primary:?}",
        resolved - links_up
    );
    println!("{line}");
    report(&line);
    // One failure timeout (200 ms) at most, plus the status polling.
    assert!(heard_as_primary < Duration::from_millis(600), "{line}");
    assert_eq!(
        a.typed().role,
        "primary",
        "A, whose name sorts first, keeps it"
    );
    let alerts = b.typed().alerts.join("\n") + &a.typed().alerts.join("\n");
    assert!(alerts.contains("two primaries"), "{alerts}");
    assert!(
        alerts.contains("not one directory"),
        "the differing arbiter directories are named:\n{alerts}"
    );
}

#[test]
fn a_secondary_whose_replica_file_system_fills_up_turns_unready_and_never_takes_over() {
    let Some((net, dir)) = setup("pair_full_fs", "u") else {
        return;
    };
    let Some(fs) = loopfs::LoopFs::for_test("pair_full_fs", dir.path(), 40) else {
        return;
    };
    let guest = pair::paced_disk_with_b_on(fs.mount.clone());
    let (mut a, b) = protected_pair(&net, dir.path(), &guest);
    let filled = fs.fill();
    assert!(
        wait_until(LIMIT, || b.typed().mode.as_deref() != Some("ready")),
        "B stayed ready on a full file system:\n{}",
        b.log()
    );
    let alerts = b.typed().alerts.join("\n");
    assert!(
        alerts.contains("No space left"),
        "B names why it cannot follow:\n{alerts}"
    );
    a.kill();
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(3) {
        assert_ne!(
            b.typed().role,
            "primary",
            "B took over from a replica it could not apply"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(!b.log().contains("taking over"), "{}", b.log());
    assert!(
        matches!(b.replica(), Some(Standing::Incomplete { .. })),
        "{:?}",
        b.replica()
    );
    println!("the full file system took {filled} bytes of filler");
}
