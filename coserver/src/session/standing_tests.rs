//! Restart safety, one session at a time: which replica may boot, a restarted peer,
//! two primaries of one generation, what the replica record says (docs/protocol.md
//! "Restart safety").

use super::tests::*;
use super::*;

#[test]
fn only_the_newest_whole_replica_boots_and_differing_data_boots_nowhere() {
    let c = Clock(Instant::now());
    let waits = |s: &mut Session, at: u64, alive: bool, why: &str| {
        let a = tick(s, c.at(at), alive);
        assert!(!has(&a, &Action::Claim), "{a:?}");
        assert_eq!(s.role(), Role::Starting);
        let w = s.waiting().unwrap_or_default().to_string();
        assert!(w.contains(why), "waiting: {w:?}, expected {why:?}");
    };
    // Never designated: waits however long, and says how to designate.
    let mut blank = Session::new(cfg(ArbiterKind::Claims), 0, Standing::Blank, c.0);
    waits(&mut blank, 5000, false, "--initial-primary");
    // Designated, the peer blank: claims after the wait.
    let mut a = Session::new(cfg(ArbiterKind::Claims), 0, whole(0), c.0);
    says_fully(&mut a, 1, Role::Starting, 0, Standing::Blank);
    assert!(has(&tick(&mut a, c.at(400), true), &Action::Claim));
    let boot = a.on(won(1));
    assert_eq!(
        boot[..2],
        [
            Action::Record(Standing::Live {
                data: DATA,
                generation: 1
            }),
            Action::Generation(1)
        ],
        "the disk is recorded live before the guest boots on it"
    );
    assert!(has(&boot, &Action::BootGuest));
    // The peer's replica of the same data is newer: wait for it.
    let mut old = Session::new(cfg(ArbiterKind::Claims), 1, whole(1), c.0);
    let newer = Standing::Live {
        data: DATA,
        generation: 2,
    };
    says_fully(&mut old, 1, Role::Starting, 1, newer);
    waits(&mut old, 400, true, "newer");
    // Other data on the peer: neither boots, and the status names the choice.
    let mut x = Session::new(cfg(ArbiterKind::Claims), 0, whole(0), c.0);
    let other = Standing::Whole {
        data: 99,
        generation: 0,
        epoch: 0,
    };
    says_fully(&mut x, 1, Role::Starting, 0, other);
    waits(&mut x, 400, true, "--discard-replica");
    // A replica older than a generation this node learnt: the guest ran on elsewhere.
    let mut stale = Session::new(cfg(ArbiterKind::Claims), 3, whole(2), c.0);
    waits(&mut stale, 400, false, "older than generation 3");
}

/// A ready secondary of a primary named by arbiter `none` (this node not named), of
/// copy 1 completed at epoch 5; its record is checked on the way.
fn ready_under_arbiter_none(c: &Clock) -> Session {
    let mut n = Session::new(
        cfg(ArbiterKind::None { starts: false }),
        0,
        Standing::Blank,
        c.0,
    );
    says(&mut n, Role::Primary, 0);
    tick(&mut n, c.at(10), true);
    msg(&mut n, c.at(11), Message::CopyStart { copy: 1 });
    assert_eq!(
        n.standing(),
        Standing::Incomplete {
            data: DATA,
            reason: Incomplete::Copying
        },
        "a joining replica takes its primary's data identity"
    );
    assert_eq!(n.check_checkpoint(5, true, 1, 0), CopyCheck::Apply);
    n.on(Input::CheckpointApplied {
        epoch: 5,
        full: true,
        copy: 1,
    });
    assert!(n.replica().is_some_and(|r| r.is_ready()));
    n
}

#[test]
fn a_restarted_primary_process_is_taken_over_and_never_boots_beside_a_ready_replica() {
    let c = Clock(Instant::now());
    // Shared-storage arbiter: the ready secondary claims when the peer's new process
    // says hello, long before the peer timeout.
    let mut s = ready(&c);
    let a = says_fully(&mut s, 2, Role::Starting, 1, whole(0));
    assert!(has(&a, &Action::Claim), "{a:?}");
    let a = s.on(won(2));
    assert!(has(&a, &Action::TakeOver));
    assert_eq!(s.role(), Role::Primary);
    // The address moves first (it touches no data), then the replica is recorded
    // live, then the guest starts on it.
    let at = |want: fn(&Action) -> bool| a.iter().position(want).expect("action");
    assert!(
        at(|x| *x == Action::Announce) < at(|x| matches!(x, Action::Record(Standing::Live { .. })))
            && at(|x| matches!(x, Action::Record(Standing::Live { .. })))
                < at(|x| *x == Action::TakeOver),
        "{a:?}"
    );
    // Arbiter none: the new process itself says the old guest is gone.
    let mut n = ready_under_arbiter_none(&c);
    let a = says_fully(&mut n, 2, Role::Starting, 0, whole(0));
    assert!(has(&a, &Action::TakeOver), "{a:?}");
    assert!(has(&a, &Action::Announce), "{a:?}");
    // The restarted node itself, hearing the ready replica, never boots.
    let mut r = Session::new(cfg(ArbiterKind::None { starts: true }), 0, whole(0), c.0);
    let ready_replica = Standing::Whole {
        data: DATA,
        generation: 0,
        epoch: 5,
    };
    says_fully(&mut r, 1, Role::Secondary, 0, ready_replica);
    let a = tick(&mut r, c.at(1000), true);
    assert!(!has(&a, &Action::BootGuest), "{a:?}");
    says_fully(&mut r, 1, Role::Primary, 0, ready_replica);
    assert!(has(&tick(&mut r, c.at(1010), true), &Action::NewReplica));
    assert_eq!(r.role(), Role::Secondary);
}

#[test]
fn two_primaries_of_one_generation_leave_the_one_whose_name_sorts_first() {
    let c = Clock(Instant::now());
    // This node is "a": it keeps the guest.
    let mut s = primary(&c);
    let a = says(&mut s, Role::Primary, 1);
    assert!(!has(&a, &Action::Fence));
    assert_eq!(s.role(), Role::Primary);
    // A node named "c" hearing "b" fences.
    let mut other = Session::new(
        SessionConfig {
            node: "c".into(),
            ..cfg(ArbiterKind::Claims)
        },
        0,
        whole(0),
        c.0,
    );
    tick(&mut other, c.at(0), false);
    tick(&mut other, c.at(350), false);
    other.on(won(1));
    let a = says(&mut other, Role::Primary, 1);
    assert!(has(&a, &Action::Fence), "{a:?}");
    assert_eq!(other.role(), Role::Fenced);
}

#[test]
fn after_a_primary_restart_an_unanswered_claim_is_retried_and_a_new_guest_is_copied_not_taken_over()
{
    let c = Clock(Instant::now());
    // The arbiter cannot be used at first: the claim is repeated at each tick although
    // the restarted peer is heard.
    let mut s = ready(&c);
    assert!(has(
        &says_fully(&mut s, 2, Role::Starting, 1, whole(0)),
        &Action::Claim
    ));
    s.on(Input::Claimed(Err("share missing".into())));
    assert!(has(&tick(&mut s, c.at(30), true), &Action::Claim));
    assert!(has(&s.on(won(2)), &Action::TakeOver));
    // Arbiter none, the new process already runs a guest of its own: this replica is
    // of the old guest, so it is copied again, never taken over from.
    let mut n = ready_under_arbiter_none(&c);
    let live = Standing::Live {
        data: DATA,
        generation: 0,
    };
    let a = says_fully(&mut n, 2, Role::Primary, 0, live);
    assert!(!has(&a, &Action::TakeOver), "{a:?}");
    assert!(has(&a, &Action::ResetReplica) && has(&a, &Action::Send(Message::Join)));
}

#[test]
fn a_starting_node_that_loses_its_claim_says_who_holds_the_guest_and_a_loser_is_superseded() {
    let c = Clock(Instant::now());
    let mut s = Session::new(cfg(ArbiterKind::Claims), 1, whole(1), c.0);
    assert!(has(&tick(&mut s, c.at(301), false), &Action::Claim));
    s.on(lost(2));
    assert_eq!(s.role(), Role::Starting, "lost: waits for the primary");
    assert_eq!(
        s.generation(),
        1,
        "a generation is never learnt from the arbiter"
    );
    for at in [400, 1000, 5000] {
        let a = tick(&mut s, c.at(at), false);
        assert!(
            !has(&a, &Action::Claim),
            "no new claim before the peer is heard"
        );
        let w = s.waiting().unwrap_or_default();
        assert!(w.contains("b holds generation 2"), "{w}");
    }
    // A primary that loses the arbiter to its peer no longer holds the pair's data.
    let mut p = protected(&c);
    tick(&mut p, c.at(700), false);
    p.on(lost(2));
    assert_eq!(p.role(), Role::Fenced);
    assert!(matches!(
        p.standing(),
        Standing::Incomplete {
            reason: Incomplete::Superseded,
            ..
        }
    ));
}

#[test]
fn a_waiting_node_says_why_while_the_arbiter_cannot_be_used_or_names_another_primary() {
    let c = Clock(Instant::now());
    let mut s = Session::new(cfg(ArbiterKind::Claims), 0, whole(0), c.0);
    assert!(has(&tick(&mut s, c.at(301), false), &Action::Claim));
    s.on(Input::Claimed(Err("share missing".into())));
    for at in [310, 500] {
        tick(&mut s, c.at(at), false);
        let w = s.waiting().unwrap_or_default();
        assert!(w.contains("share missing"), "{w}");
    }
    assert!(
        has(&tick(&mut s, c.at(700), false), &Action::Claim),
        "an unusable arbiter is asked again"
    );
    let mut other = Session::new(cfg(ArbiterKind::None { starts: false }), 0, whole(0), c.0);
    tick(&mut other, c.at(1000), false);
    let w = other.waiting().unwrap_or_default();
    assert!(w.contains("arbiter none names the other node"), "{w}");
}
