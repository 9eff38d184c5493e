//! The inbound window's matching, case by case and against random streams.

use std::time::{Duration, Instant};

use proptest::prelude::*;
use proptest::test_runner::{Config, RngAlgorithm, TestRng, TestRunner};

use super::*;

/// A unicast frame to the guest, told apart by `id`.
fn frame(id: u32) -> Vec<u8> {
    let mut f = vec![
        0x52, 0x54, 0, 0x12, 0x34, 0x56, 0x02, 0, 0, 0, 0, 1, 0x08, 0,
    ];
    f.extend_from_slice(&id.to_le_bytes());
    f
}

/// A broadcast frame (an ARP request), told apart by `id`.
fn broadcast(id: u32) -> Vec<u8> {
    let mut f = frame(id);
    f[..6].copy_from_slice(&[0xff; 6]);
    f
}

fn window(heard: &[u32], taken: &[u32], now: Instant) -> InboundWindow {
    let mut w = InboundWindow::new();
    for &h in heard {
        w.heard(frame(h), now);
    }
    for &t in taken {
        w.taken(&frame(t), now);
    }
    w
}

fn untaken(w: &mut InboundWindow) -> Vec<Vec<u8>> {
    w.take_untaken()
}

fn frames(ids: &[u32]) -> Vec<Vec<u8>> {
    ids.iter().map(|&i| frame(i)).collect()
}

#[test]
fn frames_heard_after_the_last_taken_are_the_ones_delivered() {
    let now = Instant::now();
    let mut w = window(&[1, 2, 3, 4], &[1, 2], now);
    assert_eq!(w.held(), 2);
    assert_eq!(untaken(&mut w), frames(&[3, 4]));
    let c = w.counts();
    assert_eq!((c.heard, c.matched, c.missed), (4, 2, 0));
    assert_eq!(c.unicast_heard, Some(true));
    assert_eq!(w.held(), 0, "empty afterwards");
}

#[test]
fn a_tap_that_lags_the_primary_matches_when_it_catches_up() {
    let now = Instant::now();
    let mut w = window(&[], &[1, 2], now);
    assert_eq!(w.counts().missed, 0, "waits");
    for h in [1, 2, 3] {
        w.heard(frame(h), now);
    }
    assert_eq!(untaken(&mut w), frames(&[3]));
    assert_eq!(w.counts().matched, 2);
}

#[test]
fn a_frame_the_primary_skipped_is_dropped_with_those_before_a_taken_one() {
    let now = Instant::now();
    let mut w = window(&[1, 9, 2, 3], &[1, 2], now);
    assert_eq!(untaken(&mut w), frames(&[3]));
}

#[test]
fn a_taken_frame_never_heard_is_missed_once_a_later_one_is_heard() {
    let now = Instant::now();
    let mut w = window(&[], &[1, 2], now);
    w.heard(frame(2), now);
    let c = w.counts();
    assert_eq!((c.matched, c.missed), (1, 1));
    assert_eq!(c.unicast_heard, Some(true), "the last one was heard");
    w.heard(frame(3), now);
    // Taken while its successor is already heard.
    let mut w2 = window(&[5, 6], &[], now);
    w2.taken(&frame(4), now);
    w2.taken(&frame(5), now);
    assert_eq!(w2.counts().missed, 1);
    assert_eq!(untaken(&mut w2), frames(&[6]));
    assert_eq!(untaken(&mut w), frames(&[3]));
}

#[test]
fn without_a_mirrored_lan_unicast_frames_are_missed_and_status_says_so() {
    let now = Instant::now();
    let mut w = InboundWindow::new();
    w.heard(broadcast(1), now);
    w.taken(&broadcast(1), now);
    assert_eq!(w.counts().unicast_heard, None, "only a broadcast so far");
    w.taken(&frame(2), now);
    assert_eq!(w.counts().missed, 0, "waits for it");
    w.heard(broadcast(3), now + MISS_AFTER);
    let c = w.counts();
    assert_eq!((c.matched, c.missed), (1, 1));
    assert_eq!(c.unicast_heard, Some(false));
    assert_eq!(untaken(&mut w), vec![broadcast(3)]);
}

#[test]
fn identical_frames_are_matched_first_heard_first() {
    let now = Instant::now();
    let mut w = window(&[1, 1, 2], &[1], now);
    assert_eq!(untaken(&mut w), frames(&[1, 2]));
}

#[test]
fn the_window_is_bounded_and_counts_what_it_dropped() {
    let now = Instant::now();
    let mut w = InboundWindow::new();
    let n = MAX_FRAMES as u32 + 10;
    for h in 0..n {
        w.heard(frame(h), now);
    }
    assert_eq!(w.held(), MAX_FRAMES);
    assert_eq!(w.counts().overflowed, 10);
    assert_eq!(untaken(&mut w).first(), Some(&frame(10)), "the oldest went");
    for t in 0..MAX_WAITING as u32 + 5 {
        w.taken(&frame(t), now);
    }
    assert_eq!(w.counts().missed, 5);
    w.clear();
    assert_eq!(untaken(&mut w), Vec::<Vec<u8>>::new());
}

/// One way the two streams can unfold: the LAN's frames in order, which of them the
/// primary's guest took (it died after the last), which this tap heard, and in which
/// order the two reports interleave.
#[derive(Debug, Clone)]
struct Streams {
    taken: Vec<u32>,
    heard: Vec<u32>,
    /// `true`: the next report is a heard frame.
    order: Vec<bool>,
}

fn streams() -> impl Strategy<Value = Streams> {
    (1u32..60).prop_flat_map(|n| {
        (
            Just(n),
            // Each frame: taken by the primary's guest (before it died), heard here.
            proptest::collection::vec((any::<u8>(), any::<u8>()), n as usize),
            0..=n,
            proptest::collection::vec(any::<bool>(), 2 * n as usize),
        )
            .prop_map(|(n, coins, died_after, order)| {
                let taken = (0..died_after)
                    .filter(|&i| coins[i as usize].0 % 8 != 0)
                    .collect();
                let heard = (0..n).filter(|&i| coins[i as usize].1 % 6 != 0).collect();
                Streams {
                    taken,
                    heard,
                    order,
                }
            })
    })
}

/// The random streams' seed and count: a run is repeatable and ends by itself.
const SEED: [u8; 32] = *b"ftvm inbound window streams 0001";
const CASES: u32 = 512;

/// Whatever the interleaving: no frame the primary's guest took is delivered again, and
/// every frame heard after the last one it took is delivered, in order.
#[test]
fn a_takeover_delivers_every_untaken_frame_heard_after_the_last_taken_and_no_taken_one() {
    let mut runner = TestRunner::new_with_rng(
        Config {
            cases: CASES,
            failure_persistence: None,
            ..Config::default()
        },
        TestRng::from_seed(RngAlgorithm::ChaCha, &SEED),
    );
    let delivered = std::cell::Cell::new(0usize);
    let result = runner.run(&streams(), |s| {
        let now = Instant::now();
        let mut w = InboundWindow::new();
        let (mut h, mut t) = (s.heard.iter(), s.taken.iter());
        for heard_next in s.order.iter().copied() {
            let next = if heard_next {
                h.next().map(|&i| (true, i))
            } else {
                t.next().map(|&i| (false, i))
            };
            match next {
                Some((true, i)) => w.heard(frame(i), now),
                Some((false, i)) => w.taken(&frame(i), now),
                None => {}
            }
        }
        for &i in h {
            w.heard(frame(i), now);
        }
        for &i in t {
            w.taken(&frame(i), now);
        }
        let out: Vec<u32> = w
            .take_untaken()
            .iter()
            .map(|f| u32::from_le_bytes([f[14], f[15], f[16], f[17]]))
            .collect();
        delivered.set(delivered.get() + out.len());
        for i in &out {
            prop_assert!(
                !s.taken.contains(i),
                "taken frame {i} delivered again: {out:?}"
            );
        }
        prop_assert!(out.windows(2).all(|p| p[0] < p[1]), "out of order: {out:?}");
        let last_taken = s.taken.last().copied();
        let owed: Vec<u32> = s
            .heard
            .iter()
            .copied()
            .filter(|&i| last_taken.is_none_or(|l| i > l))
            .collect();
        for i in &owed {
            prop_assert!(
                out.contains(i),
                "frame {i} lost: delivered {out:?}, owed {owed:?}"
            );
        }
        Ok(())
    });
    println!(
        "{CASES} stream pairs (seed {:?}): {} frames delivered at their takeovers",
        std::str::from_utf8(&SEED).unwrap_or("?"),
        delivered.get()
    );
    if let Err(e) = result {
        panic!("{e}");
    }
    assert!(
        delivered.get() > 0,
        "no stream left a frame to deliver: the test explores too little"
    );
}

#[test]
fn a_taken_frame_waits_at_most_miss_after() {
    let t0 = Instant::now();
    let mut w = window(&[], &[1], t0);
    w.heard(broadcast(7), t0 + MISS_AFTER - Duration::from_millis(1));
    assert_eq!(w.counts().missed, 0);
    w.heard(broadcast(8), t0 + MISS_AFTER);
    assert_eq!(w.counts().missed, 1);
}

#[test]
fn a_full_copy_aligns_the_window_after_the_last_frame_its_state_took() {
    let now = Instant::now();
    let digest = |id| xxhash_rust::xxh3::xxh3_64(&frame(id));
    let mut w = window(&[1, 2, 3, 4], &[9], now);
    w.align(Some(digest(2)));
    assert_eq!(
        w.counts().missed,
        0,
        "what waited is in the state, not missed"
    );
    assert_eq!(untaken(&mut w), frames(&[3, 4]));
    // Never heard here: nothing can be placed after it.
    let mut w = window(&[1, 2], &[], now);
    w.align(Some(digest(7)));
    assert_eq!(untaken(&mut w), Vec::<Vec<u8>>::new());
    // The guest never took a frame: everything heard is owed.
    let mut w = window(&[1, 2], &[], now);
    w.align(None);
    assert_eq!(untaken(&mut w), frames(&[1, 2]));
}
