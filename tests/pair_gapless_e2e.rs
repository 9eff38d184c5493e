//! End-to-end tests of a failover without a gap: the LAN delivers the guest's frames to
//! both hosts, the secondary keeps what its tap hears, and a request that reached only
//! a dying primary is answered by the survivor on the same connection without the
//! client's TCP resending it (read from the client socket's `TCP_INFO`). Without the
//! mirrored LAN the same kill still loses nothing acknowledged: the client resends.

mod common;
#[path = "common/pair.rs"]
mod pair;

use std::time::{Duration, Instant};

use common::*;
use pair::{
    get_keys, kv, kv_connect, protected_pair, setup, spec, tcp_retransmits, wait_until, CoServer,
    GuestSpec, PairNet, ReplicationMode, GUEST_IP, LIMIT,
};

/// Peer lost after 100 ms: a request the survivor answers comes well inside the
/// client's first retransmission (a tail-loss probe with one segment out waits about
/// 200 ms more than two round trips).
const HEARTBEAT: (u64, u32) = (20, 5);

fn guest(mode: ReplicationMode) -> GuestSpec {
    GuestSpec {
        heartbeat: HEARTBEAT,
        mode,
        ..spec(&format!("workload=net ip={GUEST_IP}/24"), 8, true)
    }
}

/// What a client saw of one request sent to a primary stopped (then killed) before it
/// read the request.
struct Outcome {
    waited: Duration,
    retransmits: u32,
}

/// SETs 50 keys over one connection, freezes the primary `a`, sends SET k50, kills `a`
/// 5 ms later and waits for the answer on the same connection; reads everything back.
fn a_request_to_a_dying_primary(net: &PairNet, mut a: CoServer) -> Outcome {
    let mut c = net.in_lan(kv_connect);
    for i in 0..50 {
        assert_eq!(kv(&mut c, &format!("SET k{i} v{i}")).unwrap(), "OK");
    }
    let before = tcp_retransmits(c.get_ref());
    a.pause();
    let sent = Instant::now();
    let reply = std::thread::scope(|scope| {
        let killer = scope.spawn(|| {
            std::thread::sleep(Duration::from_millis(5));
            a.kill();
        });
        let reply = kv(&mut c, "SET k50 v50");
        killer.join().expect("killer");
        reply
    });
    let waited = sent.elapsed();
    assert_eq!(
        reply.expect("the survivor answers on the same connection"),
        "OK"
    );
    let retransmits = tcp_retransmits(c.get_ref()) - before;
    get_keys(&mut c, 51);
    assert_eq!(kv(&mut c, "SHUTDOWN").unwrap(), "BYE");
    Outcome {
        waited,
        retransmits,
    }
}

fn answered_without_a_retransmission(test: &str, tag: &str, mode: ReplicationMode) {
    let Some((net, dir)) = setup(test, tag) else {
        return;
    };
    net.mirror_lan();
    let (a, mut b) = protected_pair(&net, dir.path(), &guest(mode));
    // The secondary hears the guest's unicast frames once a client talks to it.
    let mut c = net.in_lan(kv_connect);
    assert_eq!(kv(&mut c, "SET warm up").unwrap(), "OK");
    assert!(
        wait_until(LIMIT, || b.typed().mirror.and_then(|m| m.unicast_heard)
            == Some(true)),
        "the secondary does not say it hears the guest's frames: {:?}",
        b.typed().mirror
    );
    drop(c);
    let o = a_request_to_a_dying_primary(&net, a);
    let line = format!(
        "{} pair, mirrored LAN: a request sent to a frozen primary (killed 5 ms later) answered by the survivor after {:?}, {} retransmissions",
        mode.name(),
        o.waited,
        o.retransmits
    );
    println!("{line}");
    report(&line);
    assert_eq!(
        o.retransmits,
        0,
        "the client had to resend: {line}\nB:\n{}",
        b.log()
    );
    assert_eq!(b.wait(LIMIT), Some(0), "B:\n{}", b.log());
    assert!(
        b.log()
            .contains("delivering frames the old primary's guest never took"),
        "{}",
        b.log()
    );
}

#[test]
fn a_request_sent_to_a_dying_primary_is_answered_by_the_checkpoint_survivor_without_a_retransmission(
) {
    answered_without_a_retransmission("pair_gapless_checkpoint", "g", ReplicationMode::Checkpoint);
}

#[test]
fn a_request_sent_to_a_dying_primary_is_answered_by_the_lockstep_survivor_without_a_retransmission()
{
    answered_without_a_retransmission("pair_gapless_lockstep", "h", ReplicationMode::Lockstep);
}

#[test]
fn without_the_mirrored_lan_the_same_kill_loses_nothing_acknowledged_and_the_client_resends() {
    let Some((net, dir)) = setup("pair_gapless_unmirrored", "u") else {
        return;
    };
    let (a, mut b) = protected_pair(&net, dir.path(), &guest(ReplicationMode::Checkpoint));
    let mut c = net.in_lan(kv_connect);
    assert_eq!(kv(&mut c, "SET warm up").unwrap(), "OK");
    assert!(
        wait_until(LIMIT, || b.typed().mirror.and_then(|m| m.unicast_heard)
            == Some(false)),
        "the secondary does not say the LAN keeps the guest's frames from it: {:?}",
        b.typed().mirror
    );
    drop(c);
    let o = a_request_to_a_dying_primary(&net, a);
    let line = format!(
        "checkpoint pair, LAN not mirrored: the same request answered after {:?}, {} retransmissions",
        o.waited, o.retransmits
    );
    println!("{line}");
    report(&line);
    assert!(
        o.retransmits >= 1,
        "the request cannot have reached the survivor but by a resend: {line}"
    );
    assert_eq!(b.wait(LIMIT), Some(0), "B:\n{}", b.log());
}
