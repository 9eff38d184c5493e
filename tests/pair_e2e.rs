//! End-to-end tests of a CoServer pair: two real `ftvm coserver` processes in network
//! namespaces joined by two real veth links, each with a real tap bridged to a client
//! LAN the test creates.

mod common;
#[path = "common/pair.rs"]
mod pair;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use std::net::SocketAddr;

use common::*;

use ftvm_coserver::protocol::{Incomplete, Standing};
use pair::{
    field, protected_pair, sets_across_a_primary_kill, setup, solo_console, spec, test_config,
    wait_until, write_config, ArbiterConfig, CoServer, Config, LinkConfig, COUNTER, GUEST_IP,
    LIMIT,
};

/// A disk guest long enough to pause a node, fail over and copy again while it runs
/// (about twelve seconds, pacing its requests).
const LONG_DISK: &str = "workload=disk blocks=3072 batch=1 pace_us=2000 progress=256";

#[test]
fn killing_the_primary_mid_disk_workload_loses_and_repeats_no_output() {
    let Some((net, dir)) = setup("pair_kill_disk", "k") else {
        return;
    };
    let cmdline = "workload=disk blocks=3072 batch=1";
    // The uninterrupted run, for comparison.
    let solo = solo_console(dir.path(), cmdline, 16);
    let (mut a, mut b) = protected_pair(&net, dir.path(), &spec(cmdline, 16, false));
    assert!(
        wait_until(LIMIT, || a.console().contains("disk: written 1024/")),
        "no progress on A:\n{}",
        a.console()
    );
    a.kill();
    let code = b.wait(LIMIT);
    assert_eq!(code, Some(0), "B did not finish the guest:\n{}", b.log());
    assert!(
        !b.console().is_empty(),
        "B released nothing; A ran to the end?"
    );
    // At least once across a failover (docs/protocol.md): the epoch A released just
    // before it died, its `Released` not yet sent, is emitted again by B, so B may
    // start with the line A ended with. Nothing else repeats and nothing is lost.
    let (a_console, b_console) = (a.console(), b.console());
    let last_of_a = a_console.lines().last().unwrap_or_default();
    let b_rest = match b_console.split_once('\n') {
        Some((first, rest)) if !last_of_a.is_empty() && first == last_of_a => rest.to_string(),
        _ => b_console.clone(),
    };
    assert_eq!(
        a_console + &b_rest,
        solo,
        "A's and B's console together must be the uninterrupted run's, each line once (but the one at the takeover)"
    );
    assert!(
        b.log().contains("taking over from checkpoint"),
        "{}",
        b.log()
    );
}

#[test]
fn a_tcp_client_keeps_its_connection_and_every_acknowledged_set_across_failover() {
    let Some((net, dir)) = setup("pair_kill_kv", "n") else {
        return;
    };
    let guest = spec(&format!("workload=net ip={GUEST_IP}/24"), 8, true);
    let (a, mut b) = protected_pair(&net, dir.path(), &guest);
    let (acked, worst) = (300, sets_across_a_primary_kill(&net, a, 300, 100));
    let line = format!("primary SIGKILL: client outage across the failover (longest SET) {worst:?}; {acked} SETs acknowledged and read back");
    println!("{line}");
    report(&line);
    assert_eq!(b.wait(LIMIT), Some(0), "B:\n{}", b.log());
}

#[test]
fn one_link_down_changes_nothing_for_the_guest_but_raises_an_alert() {
    let Some((net, dir)) = setup("pair_one_link", "o") else {
        return;
    };
    let (a, b) = protected_pair(&net, dir.path(), &spec(COUNTER, 0, false));
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
    let (a, b) = protected_pair(&net, dir.path(), &spec(COUNTER, 0, false));
    net.link(1, false);
    net.link(2, false);
    let settled = wait_until(LIMIT, || {
        let roles = [
            field(&a.status(), "role").to_string(),
            field(&b.status(), "role").to_string(),
        ];
        roles.contains(&"fenced".to_string()) && roles.contains(&"primary".to_string())
    });
    assert!(
        settled,
        "A:\n{}\n{}\nB:\n{}\n{}",
        a.status_text(),
        a.log(),
        b.status_text(),
        b.log()
    );
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
    let (mut a, b) = protected_pair(&net, dir.path(), &spec(COUNTER, 4, false));
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

#[test]
fn a_primary_paused_past_the_timeout_fences_when_it_resumes_and_rejoins_as_secondary() {
    let Some((net, dir)) = setup("pair_pause_primary", "p") else {
        return;
    };
    let solo = solo_console(dir.path(), LONG_DISK, 16);
    let (mut a, mut b) = protected_pair(&net, dir.path(), &spec(LONG_DISK, 16, false));
    assert!(
        wait_until(LIMIT, || a.console().contains("disk: written 256/")),
        "no progress on A:\n{}",
        a.console()
    );
    a.pause();
    let took_over = wait_until(LIMIT, || field(&b.status(), "role") == "primary");
    // A stays frozen a while after B runs the guest: everything it held is stale now.
    std::thread::sleep(Duration::from_millis(300));
    let frozen = a.console();
    a.resume();
    assert!(took_over, "B did not take over:\n{}", b.log());
    assert!(
        wait_until(LIMIT, || field(&a.status(), "mode") == "ready"
            && field(&b.status(), "mode") == "protected"),
        "A did not rejoin B:\nA:\n{}\nB:\n{}",
        a.log(),
        b.log()
    );
    assert!(a.log().contains("fencing"), "{}", a.log());
    assert_eq!(b.wait(LIMIT), Some(0), "B:\n{}", b.log());
    assert_eq!(a.wait(LIMIT), Some(0), "A:\n{}", a.log());
    assert_eq!(
        a.console(),
        frozen,
        "the old primary released output after it resumed"
    );
    assert_eq!(
        a.console() + &b.console(),
        solo,
        "A's and B's console together must be the uninterrupted run's, each line once"
    );
}

#[test]
fn a_secondary_paused_past_the_timeout_is_copied_again_and_can_still_take_over() {
    let Some((net, dir)) = setup("pair_pause_secondary", "q") else {
        return;
    };
    let solo = solo_console(dir.path(), LONG_DISK, 16);
    let (mut a, mut b) = protected_pair(&net, dir.path(), &spec(LONG_DISK, 16, false));
    assert!(
        wait_until(LIMIT, || a.console().contains("disk: written 256/")),
        "no progress on A:\n{}",
        a.console()
    );
    b.pause();
    let degraded = wait_until(LIMIT, || field(&a.status(), "mode") == "degraded");
    std::thread::sleep(Duration::from_millis(300));
    b.resume();
    assert!(degraded, "A did not go on alone:\n{}", a.log());
    assert!(
        a.status_text().contains("generation 2"),
        "{}",
        a.status_text()
    );
    // B's replica missed what A ran alone: it must be copied again before it counts.
    assert!(
        wait_until(LIMIT, || field(&a.status(), "mode") == "protected"
            && field(&b.status(), "mode") == "ready"),
        "no re-protection:\nA:\n{}\nB:\n{}",
        a.log(),
        b.log()
    );
    assert!(
        !a.console().contains("disk: verified"),
        "the guest ended before the failover; lengthen LONG_DISK"
    );
    a.kill();
    assert_eq!(
        b.wait(LIMIT),
        Some(0),
        "B did not finish the guest:\n{}",
        b.log()
    );
    assert_eq!(
        a.console() + &b.console(),
        solo,
        "B took over from a stale replica"
    );
}

#[test]
fn a_partition_during_the_copy_keeps_the_primary_and_the_half_copy_never_boots() {
    let Some((net, dir)) = setup("pair_copy_split", "c") else {
        return;
    };
    // A large disk replica: the copy takes seconds.
    let guest = spec(COUNTER, 256, false);
    let a = CoServer::start_initial("a", &net.ns[0], &write_config(dir.path(), 0, &guest));
    assert!(
        wait_until(LIMIT, || field(&a.status(), "role") == "primary"),
        "{}",
        a.log()
    );
    let b = CoServer::start("b", &net.ns[1], &write_config(dir.path(), 1, &guest));
    assert!(
        wait_until(LIMIT, || field(&b.status(), "mode") == "copying"),
        "B never started copying:\n{}",
        b.log()
    );
    net.link(1, false);
    net.link(2, false);
    assert!(
        wait_until(LIMIT, || a
            .status_text()
            .contains("won the arbiter (generation 2)")),
        "A did not claim the arbiter when it lost its secondary mid-copy:\n{}",
        a.status_text()
    );
    assert!(
        wait_until(LIMIT, || b.status_text().contains("incomplete copy")),
        "B:\n{}",
        b.status_text()
    );
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        field(&b.status(), "role"),
        "starting",
        "{}",
        b.status_text()
    );
    assert!(b.console().is_empty(), "B booted a half-copied guest");
    assert_eq!(field(&a.status(), "role"), "primary");
    net.link(1, true);
    net.link(2, true);
    assert!(
        wait_until(LIMIT, || field(&a.status(), "mode") == "protected"
            && field(&b.status(), "mode") == "ready"),
        "no protection after the partition healed:\nA:\n{}\nB:\n{}",
        a.log(),
        b.log()
    );
    assert!(b.console().is_empty(), "B must not run the guest");
    assert!(
        matches!(
            b.replica(),
            Some(Standing::Incomplete {
                reason: Incomplete::Applying,
                ..
            })
        ),
        "B follows the stream: after a crash of its host it is copied again: {:?}",
        b.replica()
    );
}

#[test]
fn a_node_whose_copy_was_cut_short_never_boots_the_guest_even_after_a_restart() {
    let Some((net, dir)) = setup("pair_copy_kill", "h") else {
        return;
    };
    let guest = spec(COUNTER, 256, false);
    let mut a = CoServer::start_initial("a", &net.ns[0], &write_config(dir.path(), 0, &guest));
    assert!(
        wait_until(LIMIT, || field(&a.status(), "role") == "primary"),
        "{}",
        a.log()
    );
    let cb = write_config(dir.path(), 1, &guest);
    let mut b = CoServer::start("b", &net.ns[1], &cb);
    assert!(
        wait_until(LIMIT, || field(&b.status(), "mode") == "copying"),
        "B never started copying:\n{}",
        b.log()
    );
    a.kill();
    for round in ["after the primary died", "after a restart"] {
        assert!(
            wait_until(LIMIT, || b.status_text().contains("incomplete copy")),
            "{round}: B:\n{}",
            b.status_text()
        );
        std::thread::sleep(Duration::from_millis(500));
        assert_eq!(field(&b.status(), "role"), "starting", "{round}");
        assert!(
            b.console().is_empty(),
            "{round}: B booted a half-copied guest"
        );
        assert!(
            matches!(
                b.replica(),
                Some(Standing::Incomplete {
                    reason: Incomplete::Copying,
                    ..
                })
            ),
            "{round}: {:?}",
            b.replica()
        );
        b.kill();
        b = CoServer::start("b", &net.ns[1], &cb);
    }
}

/// The configuration of a CoServer that never finds a peer (links and control on
/// loopback ports from `port`, arbiter directory `arbiter`), as `edit` changes it.
fn lone_config(dir: &Path, arbiter: &Path, port: u16, edit: impl FnOnce(&mut Config)) -> PathBuf {
    let link = |n: u16| LinkConfig {
        local: SocketAddr::from(([127, 0, 0, 1], port + 2 * n)),
        peer: SocketAddr::from(([127, 0, 0, 1], port + 2 * n + 1)),
    };
    let mut config = test_config(
        "a",
        dir.join("state"),
        vec![link(0), link(1)],
        ArbiterConfig::SharedStorage {
            path: arbiter.to_path_buf(),
        },
    );
    // Its own control port: lone CoServers run in this machine's namespace.
    config.control.listen = SocketAddr::from(([127, 0, 0, 1], port + 4));
    edit(&mut config);
    let cfg = dir.join("a.toml");
    std::fs::write(&cfg, config.to_toml().unwrap()).unwrap();
    cfg
}

#[test]
fn a_coserver_refuses_to_start_without_its_arbiter_directory() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("not-mounted/ftvm-arbiter");
    let cfg = lone_config(dir.path(), &missing, 47101, |_| {});
    let o = run_ftvm(&["coserver", "--config", s(&cfg)]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(125), "{err}");
    assert!(
        err.contains(&missing.display().to_string()) && err.contains("does not exist"),
        "{err}"
    );
    assert!(
        !missing.exists(),
        "the arbiter directory must never be created"
    );
}

#[test]
fn a_coserver_refuses_to_start_without_its_tap() {
    // Checked at startup, not first at a takeover: a secondary that cannot take the
    // guest's network would fail the pair exactly when it is needed.
    let dir = tempfile::tempdir().unwrap();
    let arbiter = dir.path().join("arbiter");
    std::fs::create_dir(&arbiter).unwrap();
    let cfg = lone_config(dir.path(), &arbiter, 47111, |c| {
        c.guest.ip = "10.0.99.2".parse().ok();
        c.host.tap = Some("ftvmnotap9".into());
    });
    let o = run_ftvm(&["coserver", "--config", s(&cfg)]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(125), "{err}");
    assert!(err.contains("tap ftvmnotap9 does not exist"), "{err}");
    assert!(
        !err.contains("looking for a peer"),
        "checked before starting: {err}"
    );
}

#[test]
fn a_coserver_refuses_an_arbiter_directory_of_another_identity_and_a_half_copy_as_initial_data() {
    let dir = tempfile::tempdir().unwrap();
    let (used, other) = (dir.path().join("used"), dir.path().join("other"));
    std::fs::create_dir(&used).unwrap();
    std::fs::create_dir(&other).unwrap();
    let init = |d: &Path| {
        let o = run_ftvm(&["arbiter", "init", s(d)]);
        assert_eq!(o.status.code(), Some(0), "{o:?}");
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    let id = init(&used);
    assert_eq!(init(&used), id, "an identity is written once");
    assert_ne!(init(&other), id);
    // This node used `used` (as its state directory says) and is now pointed at `other`
    // (a wrong path, or another share mounted there).
    let state = dir.path().join("state");
    std::fs::create_dir_all(&state).unwrap();
    let used_id = std::fs::read_to_string(used.join("arbiter-id")).unwrap();
    std::fs::write(state.join("arbiter-id"), &used_id).unwrap();
    let cfg = lone_config(dir.path(), &other, 47121, |_| {});
    let o = run_ftvm(&["coserver", "--config", s(&cfg)]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(125), "{err}");
    assert!(
        err.contains(used_id.trim()) && err.contains("wrong directory"),
        "{err}"
    );
    // A replica recorded half copied (by an earlier version's marker) is never
    // designated as the pair's data.
    let second = dir.path().join("second");
    std::fs::create_dir_all(second.join("state")).unwrap();
    let cfg = lone_config(&second, &used, 47131, |_| {});
    std::fs::write(second.join("state/replica-incomplete"), "x").unwrap();
    let o = run_ftvm(&["coserver", "--config", s(&cfg), "--initial-primary"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(125), "{err}");
    assert!(err.contains("cannot be designated"), "{err}");
}

/// Runs `ftvm coserver` on `cfg` for at most `limit`: its exit code (None if it was
/// still running and was killed) and its stderr.
fn coserver_for(cfg: &Path, limit: Duration) -> (Option<i32>, String) {
    let mut child = ftvm()
        .args(["coserver", "--config", s(cfg)])
        .env("FTVM_LOG", "info")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn coserver");
    let start = Instant::now();
    let code = loop {
        if let Ok(Some(st)) = child.try_wait() {
            break st.code();
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut err = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = std::io::Read::read_to_string(&mut e, &mut err);
    }
    (code, err)
}

#[test]
fn a_claim_that_reached_the_arbiter_before_its_holder_crashed_is_still_its_own() {
    // Node a's claim of generation 1 reached the shared directory, then a died before
    // it recorded anything (an error after the link, an NFS reply lost, a crash): its
    // next process, knowing generation 0, claims generation 1 again and finds it is its
    // own. A claim named for the other node is lost, and the node says who holds it.
    for (holder, boots) in [("a", true), ("b", false)] {
        let dir = tempfile::tempdir().unwrap();
        let arbiter = dir.path().join("arbiter");
        std::fs::create_dir(&arbiter).unwrap();
        std::fs::write(arbiter.join("gen-1"), holder).unwrap();
        let cfg = lone_config(dir.path(), &arbiter, 47141, |c| {
            c.guest.cmdline = "workload=counter steps=3 tick_ms=1".into();
        });
        let (code, err) = coserver_for(&cfg, Duration::from_secs(if boots { 60 } else { 3 }));
        if boots {
            assert_eq!(code, Some(0), "{err}");
            assert!(err.contains("won the arbiter (generation 1)"), "{err}");
        } else {
            assert_eq!(code, None, "it must wait, not boot or fail:\n{err}");
            assert!(err.contains("b holds generation 1"), "{err}");
            assert!(!err.contains("won the arbiter"), "{err}");
        }
    }
}
