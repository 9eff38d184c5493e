//! Every transition of the role diagram (docs/protocol.md "Roles"), one session at a
//! time, without KVM, root or sockets.

use super::*;

pub(super) const TIMEOUT: Duration = Duration::from_millis(100);

pub(super) fn cfg(arbiter: ArbiterKind) -> SessionConfig {
    SessionConfig {
        node: "a".into(),
        arbiter,
        peer_timeout: TIMEOUT,
        ack_timeout: TIMEOUT,
        start_wait: Duration::from_millis(300),
        stall_limit: Duration::from_millis(120),
        silence_limit: Duration::from_millis(80),
        lockstep: None,
    }
}

pub(super) struct Clock(pub(super) Instant);

impl Clock {
    pub(super) fn at(&self, ms: u64) -> Instant {
        self.0 + Duration::from_millis(ms)
    }
}

/// A tick at `now` of a node that ran all along (its links kept sending), however
/// long since the last tick the test skipped.
pub(super) fn tick(s: &mut Session, now: Instant, peer_alive: bool) -> Vec<Action> {
    s.on(Input::Tick {
        now,
        peer_alive,
        silent: Duration::ZERO,
    })
}

/// A tick at `now` of a process that did not run since the last tick: neither its
/// event loop nor its links (frozen, or its host was).
pub(super) fn tick_after_freeze(s: &mut Session, now: Instant, peer_alive: bool) -> Vec<Action> {
    let gap = s
        .last_tick
        .map_or(Duration::ZERO, |t| now.saturating_duration_since(t));
    s.on(Input::Tick {
        now,
        peer_alive,
        silent: gap,
    })
}

/// The pair's data in these tests.
pub(super) const DATA: u64 = 7;

/// A replica recorded whole at generation `g`.
pub(super) fn whole(g: u64) -> Standing {
    Standing::Whole {
        data: DATA,
        generation: g,
        epoch: 0,
    }
}

/// A replica recorded half copied.
pub(super) fn half_copied() -> Standing {
    Standing::Incomplete {
        data: DATA,
        reason: Incomplete::Copying,
    }
}

/// Peer "b" (process session 1) says it is `role` in `generation`; a primary's disk is
/// live, any other's blank.
pub(super) fn says(s: &mut Session, role: Role, generation: u64) -> Vec<Action> {
    let standing = match role {
        Role::Primary => Standing::Live {
            data: DATA,
            generation,
        },
        _ => Standing::Blank,
    };
    says_fully(s, 1, role, generation, standing)
}

pub(super) fn says_fully(
    s: &mut Session,
    session: u64,
    role: Role,
    generation: u64,
    standing: Standing,
) -> Vec<Action> {
    s.on(Input::PeerSays {
        node: Some("b".into()),
        session,
        role,
        generation,
        standing,
    })
}

pub(super) fn msg(s: &mut Session, now: Instant, msg: Message) -> Vec<Action> {
    s.on(Input::Message { now, msg })
}

pub(super) fn won(g: u64) -> Input {
    Input::Claimed(Ok(Claim::Won { generation: g }))
}

pub(super) fn lost(g: u64) -> Input {
    Input::Claimed(Ok(Claim::Lost {
        generation: g,
        holder: "b".into(),
    }))
}

pub(super) fn line(s: &str) -> Output {
    Output::Console(s.as_bytes().to_vec())
}

pub(super) fn has(actions: &[Action], want: &Action) -> bool {
    actions.contains(want)
}

pub(super) fn released(actions: &[Action]) -> Vec<Output> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Release(o) => Some(o.clone()),
            _ => None,
        })
        .flatten()
        .collect()
}

/// A degraded primary of generation 1, booted at `c.at(400)`.
pub(super) fn primary(c: &Clock) -> Session {
    primary_with(c, cfg(ArbiterKind::Claims))
}

/// [`primary`] with the configuration `config`.
pub(super) fn primary_with(c: &Clock, config: SessionConfig) -> Session {
    let mut s = Session::new(config, 0, whole(0), c.0);
    tick(&mut s, c.at(0), false);
    assert!(has(&tick(&mut s, c.at(350), false), &Action::Claim));
    let a = s.on(won(1));
    assert!(has(&a, &Action::BootGuest) && has(&a, &Action::Generation(1)));
    assert_eq!(s.role(), Role::Primary);
    s
}

/// A protected primary: copy 1 (begun at epoch 1), completed at epoch 2 and acked.
pub(super) fn protected(c: &Clock) -> Session {
    protected_from(c, primary(c))
}

/// [`protected`], starting from the degraded primary `s`.
pub(super) fn protected_from(c: &Clock, mut s: Session) -> Session {
    tick(&mut s, c.at(400), true);
    msg(&mut s, c.at(400), Message::Join);
    assert_eq!(
        s.cut(1, vec![line("1")], c.at(401)),
        CutPlan::StartCopy {
            copy: 1,
            release: vec![line("1")],
            disk: DiskCopy::Whole,
        }
    );
    assert_eq!(
        s.output_policy(),
        OutputPolicy::Pass,
        "the copy is no replica yet"
    );
    assert!(s.full_cut(2, 1, c.at(402)));
    assert_eq!(s.output_policy(), OutputPolicy::Hold);
    let a = msg(
        &mut s,
        c.at(403),
        Message::Ack {
            position: 2,
            copy: 1,
        },
    );
    assert!(has(&a, &Action::Send(Message::Released { position: 2 })));
    assert_eq!(
        s.primary().map(|p| p.mode()),
        Some(Mode::Protected {
            copy: 1,
            full_epoch: 2
        })
    );
    s
}

#[test]
fn a_starting_node_joins_a_primary_it_hears() {
    let c = Clock(Instant::now());
    let mut s = Session::new(cfg(ArbiterKind::Claims), 0, whole(0), c.0);
    says(&mut s, Role::Primary, 0);
    let a = tick(&mut s, c.at(10), true);
    assert!(has(&a, &Action::NewReplica) && has(&a, &Action::Send(Message::Join)));
    assert_eq!(s.role(), Role::Secondary);
}

#[test]
fn a_starting_node_claims_only_after_the_wait_and_boots_only_when_it_wins() {
    let c = Clock(Instant::now());
    let mut s = Session::new(cfg(ArbiterKind::Claims), 3, whole(3), c.0);
    assert!(tick(&mut s, c.at(100), false).is_empty(), "still listening");
    assert!(has(&tick(&mut s, c.at(301), false), &Action::Claim));
    let a = s.on(Input::Claimed(Err("share missing".into())));
    assert!(matches!(&a[..], [Action::Alert(t)] if t.contains("share missing")));
    assert_eq!(s.role(), Role::Starting, "an unusable arbiter is never won");
    tick(&mut s, c.at(1100), false);
    let a = s.on(won(4));
    assert!(has(&a, &Action::BootGuest));
    assert_eq!((s.role(), s.generation()), (Role::Primary, 4));
}

#[test]
fn a_half_copied_host_never_boots_and_arbiter_none_boots_only_the_named_primary() {
    let c = Clock(Instant::now());
    let mut s = Session::new(cfg(ArbiterKind::Claims), 0, half_copied(), c.0);
    let a = tick(&mut s, c.at(1000), false);
    assert!(matches!(&a[..], [Action::Alert(t)] if t.contains("incomplete")));
    assert!(tick(&mut s, c.at(2000), false).is_empty(), "alerted once");
    let mut named = Session::new(cfg(ArbiterKind::None { starts: true }), 0, whole(0), c.0);
    assert!(has(&tick(&mut named, c.at(400), false), &Action::BootGuest));
    let mut other = Session::new(cfg(ArbiterKind::None { starts: false }), 0, whole(0), c.0);
    assert!(tick(&mut other, c.at(400), false).is_empty());
    assert_eq!(other.role(), Role::Starting);
}

#[test]
fn a_primary_copies_then_holds_outputs_until_each_epoch_is_acknowledged() {
    let c = Clock(Instant::now());
    let mut s = protected(&c);
    assert_eq!(
        s.cut(3, vec![line("3")], c.at(410)),
        CutPlan::Checkpoint {
            outputs: vec![line("3")]
        }
    );
    s.cut(4, vec![line("4")], c.at(411));
    let a = msg(
        &mut s,
        c.at(412),
        Message::Ack {
            position: 3,
            copy: 1,
        },
    );
    assert_eq!(released(&a), vec![line("3")], "only what was acknowledged");
    let a = msg(
        &mut s,
        c.at(413),
        Message::Ack {
            position: 4,
            copy: 1,
        },
    );
    assert_eq!(released(&a), vec![line("4")]);
    let p = s.primary().unwrap();
    assert_eq!((p.epoch(), p.acked()), (4, 4));
}

#[test]
fn acknowledgements_of_epochs_never_sent_or_of_another_copy_are_rejected() {
    let c = Clock(Instant::now());
    let mut s = protected(&c);
    s.cut(3, vec![line("3")], c.at(410));
    for (epoch, copy) in [(9, 1), (3, 7), (1, 1)] {
        let a = msg(
            &mut s,
            c.at(411),
            Message::Ack {
                position: epoch,
                copy,
            },
        );
        assert!(
            released(&a).is_empty(),
            "Ack {{{epoch}, {copy}}} released output"
        );
    }
    assert_eq!(s.primary().unwrap().rejected_acks(), 3);
    let mut d = primary(&c);
    let a = msg(
        &mut d,
        c.at(500),
        Message::Ack {
            position: 0,
            copy: 0,
        },
    );
    assert!(a.is_empty(), "nothing awaited while degraded");
}

#[test]
fn a_join_during_protection_releases_what_was_held_and_copies_again() {
    let c = Clock(Instant::now());
    let mut s = protected(&c);
    s.cut(3, vec![line("3")], c.at(410));
    let a = msg(&mut s, c.at(411), Message::Join);
    assert_eq!(released(&a), vec![line("3")], "the secondary holds nothing");
    assert!(matches!(
        s.cut(4, vec![], c.at(412)),
        CutPlan::StartCopy { copy: 4, .. }
    ));
    assert!(
        !s.full_cut(5, 1, c.at(413)),
        "the old copy's completion is refused"
    );
}

#[test]
fn a_primary_that_loses_its_secondary_degrades_if_it_wins_and_fences_if_it_loses() {
    let c = Clock(Instant::now());
    let mut s = protected(&c);
    s.cut(3, vec![line("3")], c.at(410));
    assert!(has(&tick(&mut s, c.at(420), false), &Action::Claim));
    let a = s.on(won(2));
    assert_eq!(released(&a), vec![line("3")]);
    assert_eq!(s.primary().unwrap().mode(), Mode::Degraded);
    assert_eq!(s.output_policy(), OutputPolicy::Pass);

    let mut f = protected(&c);
    f.cut(3, vec![line("3")], c.at(410));
    tick(&mut f, c.at(420), false);
    let a = f.on(lost(2));
    assert!(has(&a, &Action::Fence) && released(&a).is_empty());
    assert_eq!(f.role(), Role::Fenced);
    assert_eq!(f.output_policy(), OutputPolicy::Discard);
    assert_eq!(f.cut(4, vec![line("4")], c.at(430)), CutPlan::Stop);
    let a = msg(
        &mut f,
        c.at(431),
        Message::Ack {
            position: 3,
            copy: 1,
        },
    );
    assert!(released(&a).is_empty(), "nothing leaves a fenced node");
    let mut e = protected(&c);
    tick(&mut e, c.at(420), false);
    assert!(has(&e.on(Input::Claimed(Err("io".into()))), &Action::Fence));
}

#[test]
fn an_acknowledgement_that_never_comes_or_a_stall_sends_the_primary_to_the_arbiter() {
    let c = Clock(Instant::now());
    let mut s = protected(&c);
    s.cut(3, vec![line("3")], c.at(410));
    assert!(!has(&tick(&mut s, c.at(480), true), &Action::Claim));
    let a = tick(&mut s, c.at(515), true);
    assert!(
        has(&a, &Action::Claim),
        "heard, but silent about checkpoint 3: {a:?}"
    );
    // Frozen for longer than the peer timeout (its links silent too): the primary asks
    // the arbiter whether the peer took over meanwhile, and claims nothing.
    let frozen = || {
        let mut p = protected(&c);
        tick(&mut p, c.at(410), true);
        p.cut(3, vec![line("3")], c.at(411));
        let a = tick_after_freeze(&mut p, c.at(600), false);
        assert!(
            matches!(&a[..], [Action::Alert(t), Action::CheckArbiter] if t.contains("did not run")),
            "{a:?}"
        );
        p
    };
    // No takeover: it runs on, protected, and the peer (frozen with it, say) gets a
    // timeout to be heard again before the unanswered checkpoint or the silence counts.
    let mut p = frozen();
    assert!(p.on(Input::ArbiterChecked(Ok(Held::Unchanged))).is_empty());
    assert!(matches!(
        p.primary().map(|p| p.mode()),
        Some(Mode::Protected { .. })
    ));
    assert!(!has(&tick(&mut p, c.at(650), false), &Action::Claim));
    let a = msg(
        &mut p,
        c.at(651),
        Message::Ack {
            position: 3,
            copy: 1,
        },
    );
    assert_eq!(released(&a), vec![line("3")], "heard again");
    // Still not heard once that timeout is over: claimed as before.
    let mut g = frozen();
    g.on(Input::ArbiterChecked(Ok(Held::Unchanged)));
    assert!(!has(&tick(&mut g, c.at(690), false), &Action::Claim));
    assert!(has(&tick(&mut g, c.at(701), false), &Action::Claim));
    // The peer took over meanwhile: fenced, and the acknowledgement received before
    // releases nothing.
    let mut t = frozen();
    let a = t.on(Input::ArbiterChecked(Ok(Held::Taken {
        generation: 2,
        holder: "b".into(),
    })));
    assert!(has(&a, &Action::Fence), "{a:?}");
    let a = msg(
        &mut t,
        c.at(601),
        Message::Ack {
            position: 3,
            copy: 1,
        },
    );
    assert!(released(&a).is_empty());
    // An arbiter that cannot be read: a claim decides.
    let mut e = frozen();
    assert!(has(
        &e.on(Input::ArbiterChecked(Err("io".into()))),
        &Action::Claim
    ));
    // An event loop that was busy (or waited for a lock) while the links kept sending:
    // the peer heard this node all along, nothing to ask.
    let mut q = protected(&c);
    tick(&mut q, c.at(410), true);
    let a = q.on(Input::Tick {
        now: c.at(600),
        peer_alive: true,
        silent: Duration::from_millis(10),
    });
    assert!(!has(&a, &Action::Claim), "{a:?}");
}

#[test]
fn a_secondary_that_did_not_run_gives_the_primary_a_timeout_to_be_heard_again() {
    let c = Clock(Instant::now());
    let mut s = ready(&c);
    tick(&mut s, c.at(20), true);
    // Frozen with its host: the primary was not heard because this node was not
    // listening.
    assert!(!has(
        &tick_after_freeze(&mut s, c.at(300), false),
        &Action::Claim
    ));
    assert!(!has(&tick(&mut s, c.at(390), false), &Action::Claim));
    assert!(has(&tick(&mut s, c.at(401), false), &Action::Claim));
    // Heard again within that timeout: it follows on.
    let mut h = ready(&c);
    tick(&mut h, c.at(20), true);
    tick_after_freeze(&mut h, c.at(300), false);
    assert!(!has(&tick(&mut h, c.at(310), true), &Action::Claim));
    assert!(!has(&tick(&mut h, c.at(500), true), &Action::Claim));
    assert_eq!(h.role(), Role::Secondary);
    // One whose event loop ran all along claims at once.
    let mut r = ready(&c);
    assert!(has(&tick(&mut r, c.at(200), false), &Action::Claim));
}

#[test]
fn a_primary_hearing_a_higher_generation_fences() {
    let c = Clock(Instant::now());
    let mut s = protected(&c);
    let a = says(&mut s, Role::Primary, 5);
    assert!(has(&a, &Action::Fence) && has(&a, &Action::Generation(5)));
    assert_eq!(s.role(), Role::Fenced);
}

/// A secondary that has applied copy 7 completed at epoch 10.
pub(super) fn ready(c: &Clock) -> Session {
    let mut s = Session::new(cfg(ArbiterKind::Claims), 1, Standing::Blank, c.0);
    says(&mut s, Role::Primary, 1);
    tick(&mut s, c.at(10), true);
    assert_eq!(s.check_copy(7, 0), CopyCheck::Ignore, "no copy started yet");
    assert!(has(
        &msg(&mut s, c.at(11), Message::CopyStart { copy: 7 }),
        &Action::ResetReplica
    ));
    assert_eq!(s.check_copy(7, 0), CopyCheck::Apply);
    assert_eq!(s.check_copy(7, 1), CopyCheck::Apply);
    assert_eq!(s.check_checkpoint(10, true, 7, 2), CopyCheck::Apply);
    assert!(!s.replica().unwrap().is_ready(), "ready only once applied");
    let a = s.on(Input::CheckpointApplied {
        epoch: 10,
        full: true,
        copy: 7,
    });
    assert_eq!(
        a,
        vec![
            Action::Record(Standing::Incomplete {
                data: DATA,
                reason: Incomplete::Applying
            }),
            Action::Send(Message::Ack {
                position: 10,
                copy: 7
            })
        ],
        "acknowledged once applied; after a crash the replica is copied again"
    );
    assert!(s.replica().unwrap().is_ready());
    s
}

#[test]
fn a_secondary_takes_copies_in_order_and_checkpoints_that_follow() {
    let c = Clock(Instant::now());
    let mut s = Session::new(cfg(ArbiterKind::Claims), 1, Standing::Blank, c.0);
    says(&mut s, Role::Primary, 1);
    tick(&mut s, c.at(10), true);
    msg(&mut s, c.at(11), Message::CopyStart { copy: 5 });
    assert_eq!(s.check_copy(5, 0), CopyCheck::Apply);
    assert!(matches!(
        s.check_copy(5, 2),
        CopyCheck::Resync(ResyncReason::CopyOrder {
            got: 2,
            expected: 1
        })
    ));
    msg(&mut s, c.at(12), Message::CopyStart { copy: 9 });
    assert_eq!(
        s.check_copy(5, 1),
        CopyCheck::Ignore,
        "a late part of copy 5"
    );
    assert!(matches!(
        s.check_copy(11, 0),
        CopyCheck::Resync(ResyncReason::CopyUnknown { .. })
    ));
    assert_eq!(s.check_copy(9, 0), CopyCheck::Apply);
    assert!(
        matches!(s.check_checkpoint(20, true, 9, 3), CopyCheck::Resync(_)),
        "announced 3, took 1"
    );
    assert_eq!(
        s.check_checkpoint(20, true, 5, 1),
        CopyCheck::Ignore,
        "copy 5 cannot complete copy 9"
    );

    let mut r = ready(&c);
    assert_eq!(
        r.check_checkpoint(10, false, 0, 0),
        CopyCheck::Ignore,
        "already applied"
    );
    assert_eq!(r.check_checkpoint(11, false, 0, 0), CopyCheck::Apply);
    let a = r.on(Input::CheckpointApplied {
        epoch: 11,
        full: false,
        copy: 0,
    });
    assert_eq!(
        a,
        vec![Action::Send(Message::Ack {
            position: 11,
            copy: 7
        })]
    );
    assert!(matches!(
        r.check_checkpoint(13, false, 0, 0),
        CopyCheck::Resync(ResyncReason::Gap { got: 13, have: 11 })
    ));
    let a = r.on(Input::ApplyFailed("disk full".into()));
    let resync = Action::Send(Message::Resync {
        reason: "disk full".into(),
    });
    assert!(has(&a, &Action::ResetReplica) && has(&a, &resync), "{a:?}");
    assert!(!r.replica().unwrap().is_ready());
    // The next copy fails too: the new one is asked for after a back-off (twice the
    // acknowledgement timeout), not at once.
    tick(&mut r, c.at(20), true);
    let a = r.on(Input::ApplyFailed("disk full".into()));
    assert!(!has(&a, &resync), "{a:?}");
    assert!(!has(&tick(&mut r, c.at(200), true), &resync));
    assert!(has(&tick(&mut r, c.at(221), true), &resync));
}

#[test]
fn a_ready_secondary_takes_over_only_by_winning_and_a_half_copy_gives_up() {
    let c = Clock(Instant::now());
    let mut s = ready(&c);
    assert!(has(&tick(&mut s, c.at(200), false), &Action::Claim));
    let a = s.on(won(2));
    assert!(has(&a, &Action::TakeOver));
    assert_eq!(
        s.primary().map(|p| (p.epoch(), p.mode())),
        Some((10, Mode::Degraded))
    );
    assert!(
        matches!(s.cut(11, vec![], c.at(201)), CutPlan::Release(_)),
        "resumes after 10"
    );

    let mut l = ready(&c);
    tick(&mut l, c.at(200), false);
    assert!(has(&l.on(lost(2)), &Action::Fence));
    let mut n = ready(&c);
    tick(&mut n, c.at(200), false);
    let a = n.on(Input::Claimed(Ok(Claim::Refused)));
    assert!(matches!(&a[..], [Action::Alert(t)] if t.contains("not taking over")));
    assert_eq!(n.role(), Role::Secondary);

    let mut half = Session::new(cfg(ArbiterKind::Claims), 1, Standing::Blank, c.0);
    says(&mut half, Role::Primary, 1);
    tick(&mut half, c.at(10), true);
    let a = tick(&mut half, c.at(200), false);
    assert!(has(&a, &Action::DropReplica) && !has(&a, &Action::Claim));
    assert_eq!(half.role(), Role::Starting);
    let a = tick(&mut half, c.at(900), false);
    assert!(!has(&a, &Action::Claim), "its replica is incomplete: {a:?}");
}

#[test]
fn a_secondary_hearing_a_higher_generation_starts_over_and_an_unanswered_join_is_repeated() {
    let c = Clock(Instant::now());
    let mut s = ready(&c);
    let a = says(&mut s, Role::Primary, 3);
    assert!(has(&a, &Action::ResetReplica) && has(&a, &Action::Send(Message::Join)));
    assert!(!s.replica().unwrap().is_ready());
    let mut j = Session::new(cfg(ArbiterKind::Claims), 1, Standing::Blank, c.0);
    says(&mut j, Role::Primary, 1);
    tick(&mut j, c.at(10), true);
    assert!(!has(
        &tick(&mut j, c.at(100), true),
        &Action::Send(Message::Join)
    ));
    assert!(has(
        &tick(&mut j, c.at(111), true),
        &Action::Send(Message::Join)
    ));
    msg(&mut j, c.at(112), Message::CopyStart { copy: 1 });
    assert!(!has(
        &tick(&mut j, c.at(400), true),
        &Action::Send(Message::Join)
    ));
}

#[test]
fn a_fenced_node_rejoins_once_its_guest_has_stopped_and_a_primary_is_heard() {
    let c = Clock(Instant::now());
    let mut s = protected(&c);
    says(&mut s, Role::Primary, 5);
    assert_eq!(s.role(), Role::Fenced);
    assert!(tick(&mut s, c.at(500), true)
        .iter()
        .all(|a| matches!(a, Action::Alert(_))));
    assert_eq!(s.role(), Role::Fenced, "its guest still runs");
    s.on(Input::GuestEnded(Ok(0)));
    let a = tick(&mut s, c.at(510), true);
    assert!(has(&a, &Action::Send(Message::Join)));
    assert_eq!(s.role(), Role::Secondary);
}

#[test]
fn a_powered_off_guest_ends_the_pair_once_its_last_outputs_are_acknowledged() {
    let c = Clock(Instant::now());
    let mut s = protected(&c);
    s.cut(3, vec![line("bye")], c.at(410));
    assert!(
        s.powered_off(3, 7).is_empty(),
        "its last output is not acknowledged"
    );
    assert_eq!(s.exit_code(), None);
    let a = msg(
        &mut s,
        c.at(411),
        Message::Ack {
            position: 3,
            copy: 1,
        },
    );
    assert_eq!(released(&a), vec![line("bye")]);
    assert!(has(&a, &Action::Send(Message::Stopped { exit_code: 7 })));
    assert_eq!(s.exit_code(), Some(7));
    let mut d = primary(&c);
    let a = d.powered_off(5, 0);
    assert_eq!(
        a,
        vec![
            Action::Record(Standing::Whole {
                data: DATA,
                generation: 1,
                epoch: 5
            }),
            Action::Send(Message::Stopped { exit_code: 0 }),
            Action::Exit(0)
        ]
    );
    let mut sec = ready(&c);
    assert!(has(
        &msg(&mut sec, c.at(20), Message::Stopped { exit_code: 3 }),
        &Action::Exit(3)
    ));
}

#[test]
fn a_protected_primary_runs_at_most_sixteen_epochs_ahead() {
    let c = Clock(Instant::now());
    let mut s = protected(&c);
    for e in 3..=18 {
        s.cut(e, vec![], c.at(410));
    }
    assert_eq!(s.may_run(19), RunPermit::Wait);
    msg(
        &mut s,
        c.at(411),
        Message::Ack {
            position: 3,
            copy: 1,
        },
    );
    assert_eq!(s.may_run(19), RunPermit::Run);
    says(&mut s, Role::Primary, 9);
    assert_eq!(s.may_run(19), RunPermit::Stop, "fenced");
}

#[test]
fn a_copy_is_paced_by_what_the_secondary_has_applied() {
    let c = Clock(Instant::now());
    let mut s = primary(&c);
    tick(&mut s, c.at(400), true);
    msg(&mut s, c.at(400), Message::Join);
    s.cut(1, vec![], c.at(401));
    let open = |s: &Session, sent| {
        s.primary()
            .unwrap()
            .copy_window_open(1, &mut (0..sent).collect())
    };
    assert!(open(&s, 0) && open(&s, 7));
    assert!(!open(&s, 8), "eight messages in flight: wait");
    msg(
        &mut s,
        c.at(402),
        Message::CopyApplied {
            copy: 9,
            applied: 8,
        },
    );
    assert!(!open(&s, 8), "progress of another copy counts for nothing");
    msg(
        &mut s,
        c.at(402),
        Message::CopyApplied {
            copy: 1,
            applied: 3,
        },
    );
    assert!(open(&s, 10) && !open(&s, 11));
    assert!(
        !s.primary()
            .unwrap()
            .copy_window_open(2, &mut Default::default()),
        "not the copy in progress"
    );

    let mut r = Session::new(cfg(ArbiterKind::Claims), 1, Standing::Blank, c.0);
    says(&mut r, Role::Primary, 1);
    tick(&mut r, c.at(10), true);
    msg(&mut r, c.at(11), Message::CopyStart { copy: 1 });
    assert_eq!(r.check_copy(1, 0), CopyCheck::Apply);
    let a = r.on(Input::CopyPartApplied { copy: 1, index: 0 });
    assert_eq!(
        a,
        vec![Action::Send(Message::CopyApplied {
            copy: 1,
            applied: 1
        })]
    );
}
