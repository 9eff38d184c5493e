//! The operator's switchover and leave on the simulated pair of `pair_tests` (whose
//! invariants are checked at every step: no output above an acknowledgement, one
//! primary per generation, takeovers only from a ready replica).

use super::pair_tests::{protect, protected_world, run, Step, World};
use super::*;
use crate::protocol::Incomplete;

fn settle(w: &mut World, rounds: usize) {
    for _ in 0..rounds {
        run(w, &[Step::Advance(20), Step::Settle]);
    }
}

#[test]
fn a_switchover_hands_the_guest_to_the_secondary_and_the_old_primary_rejoins() {
    let mut w = protected_world();
    let msg = w.hosts[0].session.switchover().expect("accepted");
    assert!(msg.contains("b"), "{msg}");
    assert_eq!(
        w.hosts[0].session.switchover().unwrap_err(),
        "a switchover is already under way"
    );
    // The next cut is the guest's last here; it runs no further until handed over.
    run(&mut w, &[Step::Cut(0)]);
    let last = w.hosts[0].session.primary().map(|p| p.epoch()).unwrap();
    assert_eq!(
        w.hosts[0].session.primary().and_then(|p| p.handover()),
        Some(Handover::Final { position: last })
    );
    assert_eq!(w.hosts[0].session.may_run(last + 1), RunPermit::Wait);
    run(&mut w, &[Step::Cut(0)]);
    assert_eq!(
        w.hosts[0].session.primary().map(|p| p.epoch()),
        Some(last),
        "no cut after the last"
    );
    // Acknowledged: handed over; B claims and takes over, A fences and rejoins B.
    run(&mut w, &[Step::Settle, Step::Settle]);
    assert_eq!(w.hosts[1].session.role(), Role::Primary);
    assert_eq!(
        w.acted.get(&2),
        Some(&1),
        "B runs the guest in generation 2"
    );
    assert!(matches!(
        w.hosts[0].session.standing(),
        Standing::Incomplete {
            reason: Incomplete::Superseded | Incomplete::Copying,
            ..
        }
    ));
    settle(&mut w, 4);
    assert_eq!(w.hosts[0].session.role(), Role::Secondary, "A joined B");
    // And back: B, once protected again, hands the guest to A.
    protect(&mut w, 1);
    w.hosts[1].session.switchover().expect("B is protected");
    run(&mut w, &[Step::Cut(1), Step::Settle, Step::Settle]);
    assert_eq!(w.hosts[0].session.role(), Role::Primary);
    assert_eq!(
        w.acted.get(&3),
        Some(&0),
        "A runs the guest in generation 3"
    );
    assert_eq!(w.acted.len(), 3, "nobody booted the guest afresh");
}

#[test]
fn a_switchover_is_refused_unless_this_node_is_a_protected_primary() {
    let mut w = World::new();
    for _ in 0..6 {
        run(&mut w, &[Step::Advance(50)]);
    }
    run(&mut w, &[Step::Advance(10), Step::Settle]);
    let refused = w.hosts[0].session.switchover().unwrap_err();
    assert!(refused.contains("not protected"), "{refused}");
    let refused = w.hosts[1].session.switchover().unwrap_err();
    assert!(refused.contains("not the primary"), "{refused}");
}

#[test]
fn a_switchover_is_called_off_when_the_secondary_is_lost_before_it_acknowledges() {
    let mut w = protected_world();
    w.hosts[0].session.switchover().expect("accepted");
    run(&mut w, &[Step::Pause(1, 100_000), Step::Cut(0)]);
    let last = w.hosts[0].session.primary().map(|p| p.epoch()).unwrap();
    settle(&mut w, 10);
    let p = w.hosts[0].session.primary().expect("A is still primary");
    assert_eq!(p.mode(), Mode::Degraded);
    assert_eq!(p.handover(), None);
    assert_eq!(w.hosts[0].session.may_run(last + 1), RunPermit::Run);
}

#[test]
fn a_secondary_leaves_without_a_claim_and_joins_again() {
    let mut w = protected_world();
    let refused = w.hosts[0].session.leave().unwrap_err();
    assert!(refused.contains("switch over first"), "{refused}");
    let claims = w.arbiter.len();
    let actions = w.hosts[1].session.leave().expect("a secondary may leave");
    // The replica is recorded out of the pair before the primary hears of it.
    let record = actions
        .iter()
        .position(|a| {
            matches!(
                a,
                Action::Record(Standing::Incomplete {
                    reason: Incomplete::Left,
                    ..
                })
            )
        })
        .expect("recorded as left");
    let told = actions
        .iter()
        .position(|a| *a == Action::Send(Message::Leave))
        .expect("told the primary");
    assert!(record < told);
    assert!(actions.contains(&Action::Exit(0)));
    w.execute(1, actions).unwrap();
    run(&mut w, &[Step::Settle]);
    let p = w.hosts[0].session.primary().expect("A runs on");
    assert_eq!(p.mode(), Mode::Degraded);
    assert!(w.hosts[0].session.peer().left);
    // B's process ends; no claim while it is gone.
    run(&mut w, &[Step::Pause(1, 1_000)]);
    settle(&mut w, 10);
    assert_eq!(w.arbiter.len(), claims, "nobody asked the arbiter");
    assert_eq!(w.hosts[0].session.role(), Role::Primary);
    // Started again: it joins as any new secondary.
    run(&mut w, &[Step::Restart(1)]);
    settle(&mut w, 4);
    assert_eq!(w.hosts[1].session.role(), Role::Secondary);
    assert!(!w.hosts[0].session.peer().left);
    protect(&mut w, 0);
    assert!(matches!(
        w.hosts[0].session.primary().map(|p| p.mode()),
        Some(Mode::Protected { .. })
    ));
}

/// Messages waiting on either link towards node `n`.
fn queued(w: &World, n: usize) -> Vec<Message> {
    (0..2)
        .flat_map(|l| w.links[l][n].iter().map(|(_, _, m)| m.clone()))
        .collect()
}

#[test]
fn the_old_primary_rejoins_from_the_position_its_kept_guest_holds() {
    let mut w = protected_world();
    w.hosts[0].session.switchover().expect("accepted");
    run(&mut w, &[Step::Cut(0), Step::Settle, Step::Settle]);
    let b = &w.hosts[1].session;
    assert_eq!(b.role(), Role::Primary);
    let position = b.primary().map(|p| p.epoch()).unwrap();
    assert!(b.primary().is_some_and(|p| p.tracks_since_resume()));
    assert_eq!(w.hosts[0].session.handed_over_at(), Some(position));
    // A's epoch loop kept its stopped guest's memory; once it has ended and B is
    // heard, A asks for what changed since.
    w.hosts[0].session.on(Input::GuestKept);
    run(&mut w, &[Step::Advance(20), Step::Advance(20)]);
    assert!(
        queued(&w, 1).contains(&Message::Rejoin { position }),
        "{:?}",
        queued(&w, 1)
    );
    run(&mut w, &[Step::Settle]);
    let now = w.now();
    let plan = w.hosts[1].session.cut(position + 1, vec![], now);
    assert!(
        matches!(
            plan,
            CutPlan::StartCopy {
                disk: DiskCopy::SinceResume,
                ..
            }
        ),
        "{plan:?}"
    );
    assert!(!w.hosts[1]
        .session
        .primary()
        .is_some_and(|p| p.tracks_since_resume()));
}

#[test]
fn a_rejoin_from_another_position_or_a_plain_join_gets_a_full_copy() {
    for msg in [Message::Rejoin { position: 1 }, Message::Join] {
        let mut w = protected_world();
        w.hosts[0].session.switchover().expect("accepted");
        run(&mut w, &[Step::Cut(0), Step::Settle, Step::Settle]);
        let now = w.now();
        let b = &mut w.hosts[1].session;
        let position = b.primary().map(|p| p.epoch()).unwrap();
        b.on(Input::Message { now, msg });
        let plan = b.cut(position + 1, vec![], now);
        assert!(
            matches!(
                plan,
                CutPlan::StartCopy {
                    disk: DiskCopy::Whole,
                    ..
                }
            ),
            "{plan:?}"
        );
    }
}

#[test]
fn force_primary_runs_the_guest_from_a_stale_replica_once_the_other_host_is_gone() {
    let mut w = protected_world();
    // A stops; B takes over in generation 2 and stops too; A comes back alone.
    run(&mut w, &[Step::Pause(0, 100_000)]);
    settle(&mut w, 8);
    assert_eq!(w.acted.get(&2), Some(&1), "B ran the guest in generation 2");
    run(&mut w, &[Step::Pause(1, 1_000_000), Step::Restart(0)]);
    settle(&mut w, 20);
    let a = &mut w.hosts[0].session;
    assert_eq!(a.role(), Role::Starting);
    assert!(
        a.waiting()
            .is_some_and(|why| why.contains("holds generation 2")),
        "{:?}",
        a.waiting()
    );
    let actions = a.force_primary().expect("accepted");
    w.execute(0, actions).unwrap();
    assert_eq!(w.hosts[0].session.role(), Role::Primary);
    assert_eq!(
        w.acted.get(&3),
        Some(&0),
        "A runs the guest in generation 3"
    );
    assert_eq!(w.hosts[0].session.generation(), 3);
    let refused = w.hosts[0].session.force_primary().unwrap_err();
    assert!(refused.contains("this node is primary"), "{refused}");
}

#[test]
fn force_primary_is_refused_while_the_peer_is_heard() {
    let mut w = World::new();
    run(&mut w, &[Step::Advance(50), Step::Advance(50)]);
    assert_eq!(w.hosts[1].session.role(), Role::Starting);
    let refused = w.hosts[1].session.force_primary().unwrap_err();
    assert!(refused.contains("a is heard"), "{refused}");
}

#[test]
fn force_primary_refuses_a_replica_that_does_not_hold_the_guest_whole() {
    let mut w = protected_world();
    // B's replica is recorded incomplete (applying) while it follows A; A stops and B
    // is restarted alone.
    run(&mut w, &[Step::Pause(0, 1_000_000), Step::Restart(1)]);
    settle(&mut w, 10);
    let refused = w.hosts[1].session.force_primary().unwrap_err();
    assert!(
        refused.contains("does not hold the guest whole"),
        "{refused}"
    );
}
