//! End-to-end tests of lockstep mode: two real `ftvm coserver` processes in network
//! namespaces, the secondary's guest replaying the primary's input log; a killed
//! primary's guest continues on the secondary without a restore, and a guest that
//! diverges on purpose (the key-value service's `TSC` command reads the host's time
//! stamp counter) is detected and repaired.

mod common;
#[path = "common/pair.rs"]
mod pair;

use common::*;
use pair::{
    get_keys, kv, kv_connect, lockstep, protected_pair, set_keys, setup, solo_console, wait_until,
    GUEST_IP, LIMIT,
};

#[test]
fn a_lockstep_secondary_runs_the_guest_and_a_primary_kill_loses_and_repeats_no_output() {
    let Some((net, dir)) = setup("pair_lockstep_kill_disk", "l") else {
        return;
    };
    let cmdline = "workload=disk blocks=3072 batch=1";
    let solo = solo_console(dir.path(), cmdline, 16);
    let (mut a, mut b) = protected_pair(&net, dir.path(), &lockstep(cmdline, 16, false));
    assert!(
        wait_until(LIMIT, || a.console().contains("disk: written 1024/")),
        "no progress on A:\n{}",
        a.console()
    );
    let (sa, sb) = (a.typed(), b.typed());
    assert_eq!(
        (sa.replication.as_str(), sb.replication.as_str()),
        ("lockstep", "lockstep")
    );
    assert!(
        sa.lag_exits.is_some(),
        "a protected lockstep primary reports its secondary's lag: {sa:?}"
    );
    let executed = |b: &pair::CoServer| b.typed().executed.map_or(0, |(_, exit)| exit);
    let before = executed(&b);
    assert!(
        wait_until(LIMIT, || executed(&b) > before),
        "the secondary's guest does not advance:\n{}",
        b.log()
    );
    a.kill();
    let code = b.wait(LIMIT);
    assert_eq!(code, Some(0), "B did not finish the guest:\n{}", b.log());
    assert!(
        !b.console().is_empty(),
        "B released nothing; A ran to the end?"
    );
    assert_eq!(
        a.console() + &b.console(),
        solo,
        "A's and B's console together must be the uninterrupted run's, each line once"
    );
    let log = b.log();
    assert!(
        log.contains("runs on live from the end of the log") && !log.contains("from checkpoint"),
        "B must continue its own running guest, not restore one:\n{log}"
    );
    assert_eq!(b.typed().resyncs, 0, "the disk workload is deterministic");
}

#[test]
fn a_tcp_client_keeps_its_connection_and_every_acknowledged_set_across_a_lockstep_failover() {
    let Some((net, dir)) = setup("pair_lockstep_kill_kv", "m") else {
        return;
    };
    let guest = lockstep(&format!("workload=net ip={GUEST_IP}/24"), 8, true);
    let (mut a, mut b) = protected_pair(&net, dir.path(), &guest);
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let (worst, a_after) = std::thread::scope(|scope| {
        let killer = scope.spawn(move || {
            rx.recv().unwrap();
            a.kill();
            a
        });
        let worst = net.in_lan(move || {
            let mut c = kv_connect();
            let worst = set_keys(&mut c, 300, 100, &tx);
            get_keys(&mut c, 300);
            assert_eq!(kv(&mut c, "SHUTDOWN").unwrap(), "BYE");
            worst
        });
        (worst, killer.join().unwrap())
    });
    drop(a_after);
    let line = format!("lockstep, primary SIGKILL: longest SET across the failover {worst:?}; 300 SETs acknowledged and read back");
    println!("{line}");
    report(&line);
    assert_eq!(b.wait(LIMIT), Some(0), "B:\n{}", b.log());
    assert!(
        b.log().contains("runs on live from the end of the log"),
        "{}",
        b.log()
    );
}

#[test]
fn a_guest_that_reads_the_host_tsc_diverges_is_repaired_and_still_fails_over_without_loss() {
    let Some((net, dir)) = setup("pair_lockstep_diverge", "d") else {
        return;
    };
    let guest = lockstep(&format!("workload=net ip={GUEST_IP}/24"), 8, true);
    let (mut a, mut b) = protected_pair(&net, dir.path(), &guest);
    let resyncs = |b: &pair::CoServer| b.typed().resyncs;
    let protected = |a: &pair::CoServer, b: &pair::CoServer| {
        a.typed().mode.as_deref() == Some("protected") && b.typed().mode.as_deref() == Some("ready")
    };
    // A socket keeps the namespace it was made in: the test thread uses it after.
    let mut c = net.in_lan(kv_connect);
    for round in 0..3u32 {
        let before = resyncs(&b);
        let reply = kv(&mut c, "TSC").expect("TSC");
        assert!(
            reply.starts_with("TSC ") && reply[4..].parse::<u64>().is_ok(),
            "round {round}: {reply}"
        );
        assert!(
            wait_until(LIMIT, || resyncs(&b) > before),
            "round {round}: the divergence was not detected:\nB:\n{}",
            b.log()
        );
        assert!(
            wait_until(LIMIT, || protected(&a, &b)),
            "round {round}: the pair is not protected again:\nA:\n{}\nB:\n{}",
            a.log(),
            b.log()
        );
        for i in 0..20 {
            let key = round * 20 + i;
            assert_eq!(kv(&mut c, &format!("SET k{key} v{key}")).unwrap(), "OK");
        }
    }
    assert!(
        b.log().contains("diverged"),
        "the divergence is named in B's log:\n{}",
        b.log()
    );
    // A takeover after the repairs loses nothing acknowledged.
    a.kill();
    get_keys(&mut c, 60);
    assert_eq!(kv(&mut c, "SHUTDOWN").unwrap(), "BYE");
    assert_eq!(b.wait(LIMIT), Some(0), "B:\n{}", b.log());
}
