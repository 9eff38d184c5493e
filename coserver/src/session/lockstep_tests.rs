//! Lockstep mode's rules in the session: the bound on the secondary's lag, what the
//! primary records for it, and a diverged replica asking for a new copy.

use super::tests::*;
use super::*;

const MAX_LAG: u64 = 1000;
const MAX_LAG_TIME: Duration = Duration::from_millis(50);

fn lockstep_cfg() -> SessionConfig {
    SessionConfig {
        lockstep: Some(LockstepLimits {
            max_lag_exits: MAX_LAG,
            max_lag: MAX_LAG_TIME,
        }),
        ..cfg(ArbiterKind::Claims)
    }
}

/// A protected lockstep primary whose guest stood at exit 500 when the copy ended.
fn protected_lockstep(c: &Clock) -> Session {
    let mut s = primary_with(c, lockstep_cfg());
    s.note_slice(2, 500, vec![], c.0);
    let s = protected_from(c, s);
    assert_eq!(s.primary().and_then(|p| p.lag_exits()), Some(0));
    s
}

#[test]
fn a_lockstep_primary_waits_for_a_lagging_secondary_and_drops_one_that_stops() {
    let c = Clock(Instant::now());
    let mut s = protected_lockstep(&c);
    assert!(
        !s.records_disk_writes(),
        "the secondary's guest makes its own disk writes"
    );
    s.note_slice(3, 500 + MAX_LAG, vec![], c.at(410));
    s.cut(3, vec![], c.at(410));
    assert_eq!(s.may_run(4), RunPermit::Run, "at the bound");
    s.note_slice(4, 501 + MAX_LAG, vec![], c.at(411));
    s.cut(4, vec![], c.at(411));
    assert_eq!(s.may_run(5), RunPermit::Wait, "beyond the bound");
    assert_eq!(s.primary().and_then(|p| p.lag_exits()), Some(MAX_LAG + 1));
    msg(
        &mut s,
        c.at(412),
        Message::Executed {
            position: 3,
            exit: 600,
        },
    );
    assert_eq!(s.may_run(5), RunPermit::Run, "the secondary advanced");
    // Executing nothing more while the primary waits: dropped after the ack timeout,
    // through the arbiter, never waited on for ever.
    s.note_slice(5, 700 + MAX_LAG, vec![], c.at(413));
    s.cut(5, vec![], c.at(413));
    for ack in 3..=5 {
        msg(
            &mut s,
            c.at(413),
            Message::Ack {
                position: ack,
                copy: 1,
            },
        );
    }
    assert_eq!(s.may_run(6), RunPermit::Wait);
    assert!(!has(&tick(&mut s, c.at(414), true), &Action::Claim));
    assert!(!has(&tick(&mut s, c.at(480), true), &Action::Claim));
    assert!(
        has(&tick(&mut s, c.at(520), true), &Action::Claim),
        "stalled longer than the ack timeout"
    );
    s.on(won(2));
    assert_eq!(s.primary().map(|p| p.mode()), Some(Mode::Degraded));
    assert_eq!(s.may_run(6), RunPermit::Run);
    assert_eq!(s.primary().and_then(|p| p.lag_exits()), None);
}

#[test]
fn an_execution_report_beyond_what_was_cut_is_not_believed() {
    let c = Clock(Instant::now());
    let mut s = protected_lockstep(&c);
    s.note_slice(3, 900, vec![], c.at(410));
    s.cut(3, vec![], c.at(410));
    msg(
        &mut s,
        c.at(411),
        Message::Executed {
            position: 7,
            exit: 5000,
        },
    );
    assert_eq!(
        s.primary().and_then(|p| p.lag_exits()),
        Some(400),
        "position 7 was never cut"
    );
}

#[test]
fn a_diverged_replica_is_unready_at_once_and_asks_for_a_new_copy_without_back_off() {
    let c = Clock(Instant::now());
    let mut s = ready(&c);
    for round in 1..=3u64 {
        let a = s.on(Input::Diverged {
            why: "output digests differ".into(),
            at: None,
        });
        assert!(has(&a, &Action::ResetReplica), "{a:?}");
        assert!(
            a.iter().any(|x| matches!(x, Action::Send(Message::Resync { reason }) if reason.contains("digests"))),
            "asked at once, every time: {a:?}"
        );
        assert!(!s.replica().unwrap().is_ready());
        assert_eq!(s.resyncs(), round);
    }
    let mut p = protected(&c);
    msg(
        &mut p,
        c.at(420),
        Message::Resync {
            reason: "diverged".into(),
        },
    );
    assert_eq!(p.resyncs(), 1, "the primary counts the copies asked of it");
}

fn range(offset: u64, len: u64) -> crate::protocol::DiskRange {
    crate::protocol::DiskRange { offset, len }
}

#[test]
fn a_diverged_replica_is_repaired_with_the_disk_ranges_written_since_it_last_checked_equal() {
    let c = Clock(Instant::now());
    let mut s = protected_lockstep(&c);
    s.note_slice(3, 600, vec![range(0, 512)], c.at(410));
    s.cut(3, vec![], c.at(410));
    s.note_slice(4, 700, vec![range(4096, 512)], c.at(411));
    s.cut(4, vec![line("4")], c.at(411));
    s.note_slice(5, 800, vec![range(8192, 1024)], c.at(412));
    s.cut(5, vec![], c.at(412));
    msg(
        &mut s,
        c.at(413),
        Message::Executed {
            position: 3,
            exit: 600,
        },
    );
    let a = msg(
        &mut s,
        c.at(414),
        Message::Diverged {
            position: 4,
            reason: "output digests differ".into(),
            written: vec![range(4608, 512), range(1 << 20, 4096)],
        },
    );
    assert_eq!(
        released(&a),
        vec![line("4")],
        "degraded: held output leaves"
    );
    assert_eq!(s.resyncs(), 1);
    assert_eq!(
        s.cut(6, vec![], c.at(415)),
        CutPlan::StartCopy {
            copy: 6,
            release: vec![],
            // Slice 3 was checked equal; 4 and 5 were not, and the replica wrote in 4.
            disk: DiskCopy::Ranges(vec![
                range(4096, 1024),
                range(8192, 1024),
                range(1 << 20, 4096)
            ]),
        }
    );
    // A divergence reported while this node does not hold outputs (it copies, or ran
    // degraded: not every write was noted) is repaired with the whole disk.
    msg(
        &mut s,
        c.at(416),
        Message::Diverged {
            position: 6,
            reason: "late".into(),
            written: vec![range(0, 512)],
        },
    );
    assert!(matches!(
        s.cut(7, vec![], c.at(416)),
        CutPlan::StartCopy {
            disk: DiskCopy::Whole,
            ..
        }
    ));
    // A secondary that holds nothing gets everything, even if a repair was pending.
    msg(
        &mut s,
        c.at(416),
        Message::Diverged {
            position: 7,
            reason: "x".into(),
            written: vec![],
        },
    );
    msg(&mut s, c.at(417), Message::Join);
    assert!(matches!(
        s.cut(8, vec![], c.at(418)),
        CutPlan::StartCopy {
            disk: DiskCopy::Whole,
            ..
        }
    ));
}

#[test]
fn a_lockstep_primary_waits_while_its_secondary_is_further_behind_than_the_time_bound() {
    let c = Clock(Instant::now());
    let mut s = protected_lockstep(&c);
    s.note_slice(3, 510, vec![], c.at(410));
    s.cut(3, vec![], c.at(410));
    tick(&mut s, c.at(440), true);
    assert_eq!(s.may_run(4), RunPermit::Run, "30 ms behind");
    assert_eq!(
        s.primary().and_then(|p| p.lag_time()),
        Some(Duration::from_millis(30))
    );
    tick(&mut s, c.at(470), true);
    assert_eq!(
        s.may_run(4),
        RunPermit::Wait,
        "60 ms behind: a takeover would take that long"
    );
    msg(
        &mut s,
        c.at(471),
        Message::Executed {
            position: 3,
            exit: 510,
        },
    );
    assert_eq!(s.may_run(4), RunPermit::Run);
    assert_eq!(s.primary().and_then(|p| p.lag_time()), Some(Duration::ZERO));
}

#[test]
fn the_quick_path_takes_only_plain_acknowledgements_and_leaves_the_rest_untouched() {
    let c = Clock(Instant::now());
    // The full copy's acknowledgement makes the pair protected (an alert): not quick.
    let mut s = primary(&c);
    tick(&mut s, c.at(400), true);
    msg(&mut s, c.at(400), Message::Join);
    s.cut(1, vec![], c.at(401));
    assert!(s.full_cut(2, 1, c.at(402)));
    assert_eq!(s.quick_ack(2, 1, c.at(403)), None);
    let a = msg(
        &mut s,
        c.at(403),
        Message::Ack {
            position: 2,
            copy: 1,
        },
    );
    assert!(
        a.iter().any(|x| matches!(x, Action::Alert(_))),
        "left for the event loop: {a:?}"
    );

    // A plain acknowledgement: the outputs it releases and the `Released` to send.
    assert!(matches!(
        s.cut(3, vec![line("x")], c.at(410)),
        CutPlan::Checkpoint { .. }
    ));
    assert_eq!(
        s.quick_ack(3, 1, c.at(411)),
        Some(vec![
            Action::Release(vec![line("x")]),
            Action::Send(Message::Released { position: 3 })
        ])
    );
    // An acknowledgement after a stall this node has not noticed yet (no tick for
    // longer than the stall limit): left for the event loop, which asks the arbiter
    // before believing it.
    s.cut(4, vec![line("y")], c.at(412));
    assert_eq!(s.quick_ack(4, 1, c.at(530)), None);
    let a = tick_after_freeze(&mut s, c.at(530), true);
    assert!(has(&a, &Action::CheckArbiter), "{a:?}");
    // (The node answers in the same turn, which the quick path waits for.) The peer
    // took over meanwhile: nothing is quick any more.
    s.on(Input::ArbiterChecked(Ok(crate::arbiter::Held::Taken {
        generation: 2,
        holder: "b".into(),
    })));
    assert_eq!(s.quick_ack(4, 1, c.at(531)), None, "fenced");

    // After the guest powered off, the acknowledgement ends the pair: not quick.
    let mut s = protected(&c);
    tick(&mut s, c.at(404), true);
    s.cut(3, vec![line("z")], c.at(405));
    assert!(
        s.powered_off(3, 0).is_empty(),
        "its output is not acknowledged yet"
    );
    assert_eq!(s.quick_ack(3, 1, c.at(406)), None);
    let a = msg(
        &mut s,
        c.at(406),
        Message::Ack {
            position: 3,
            copy: 1,
        },
    );
    assert!(
        has(&a, &Action::Send(Message::Stopped { exit_code: 0 })),
        "{a:?}"
    );
}

#[test]
fn the_quick_path_takes_only_the_slice_that_follows() {
    let c = Clock(Instant::now());
    let mut s = ready(&c);
    assert_eq!(s.quick_slice(10), None, "already applied");
    assert_eq!(
        s.quick_slice(12),
        None,
        "a gap: the event loop asks for a copy"
    );
    assert_eq!(
        s.quick_slice(11),
        Some(vec![Action::Send(Message::Ack {
            position: 11,
            copy: 7
        })])
    );
    assert_eq!(s.check_checkpoint(11, false, 0, 0), CopyCheck::Ignore);
    assert_eq!(s.check_checkpoint(12, false, 0, 0), CopyCheck::Apply);
    let mut p = protected(&c);
    assert_eq!(p.quick_slice(3), None, "a primary follows no log");
}
