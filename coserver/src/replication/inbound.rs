//! The secondary's own copy of the guest's inbound traffic: what its tap hears of the
//! frames addressed to the guest (the LAN delivers them to both hosts, docs/operations.md
//! "A gap-free failover"), matched against what the primary's guest took, so that a
//! takeover delivers, in order, exactly the frames the old primary's guest never took —
//! including those that reached the old primary's port after it died.
//!
//! Both hosts' ports receive the LAN's frames in one order. The primary reports the
//! frames its guest took, in the order it took them (a lockstep slice's `Packet` events;
//! checkpoint mode's `Inbound` messages), and every one of them is a frame its tap
//! read, so the taken frames are a subsequence of the heard ones. Matching walks both
//! streams: a taken frame found in the window drops it and every frame heard before it
//! (those the primary's guest skipped, or that never reached the primary's port); one
//! not heard yet waits (this tap can lag the primary's), and counts as missed once a
//! later taken frame is found heard (the order says this tap never got it), when it has
//! waited [`MISS_AFTER`], or at the takeover. The window is pure logic, without I/O; the
//! tap is read by `replication::mirror`.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use xxhash_rust::xxh3::xxh3_64;

/// Frames at most kept heard and not yet taken (the oldest are dropped beyond).
pub const MAX_FRAMES: usize = 8192;
/// Bytes at most kept heard and not yet taken.
pub const MAX_BYTES: usize = 16 << 20;
/// Taken frames at most waiting to be heard.
pub const MAX_WAITING: usize = 8192;
/// How long a taken frame waits to be heard before it counts as missed.
pub const MISS_AFTER: Duration = Duration::from_millis(500);

/// What the window has seen, for status.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MirrorCounts {
    /// Frames heard on this host's tap (addressed to the guest).
    pub heard: u64,
    /// Taken frames found heard.
    pub matched: u64,
    /// Taken frames never heard here (unicast ones mean the LAN does not deliver the
    /// guest's frames to this host).
    pub missed: u64,
    /// Heard frames dropped unmatched because the window was full.
    pub overflowed: u64,
    /// Whether the last unicast frame the primary's guest took was heard here: `None`
    /// before any.
    pub unicast_heard: Option<bool>,
}

struct Heard {
    hash: u64,
    frame: Vec<u8>,
}

struct Taken {
    hash: u64,
    unicast: bool,
    at: Instant,
}

/// The frames heard and not yet known taken, and the taken ones not yet heard.
#[derive(Default)]
pub struct InboundWindow {
    heard: VecDeque<Heard>,
    /// How many frames of each digest `heard` holds.
    heard_digests: HashMap<u64, u32>,
    bytes: usize,
    waiting: VecDeque<Taken>,
    counts: MirrorCounts,
}

/// Whether an Ethernet frame is addressed to one station (not broadcast or multicast).
pub fn is_unicast(frame: &[u8]) -> bool {
    frame.first().is_some_and(|b| b & 1 == 0)
}

impl InboundWindow {
    /// An empty window.
    pub fn new() -> Self {
        Self::default()
    }

    /// What it has seen.
    pub fn counts(&self) -> MirrorCounts {
        self.counts
    }

    /// Frames heard and not known taken.
    pub fn held(&self) -> usize {
        self.heard.len()
    }

    /// This host's tap heard `frame` (addressed to the guest).
    pub fn heard(&mut self, frame: Vec<u8>, now: Instant) {
        let hash = xxh3_64(&frame);
        self.counts.heard += 1;
        self.bytes += frame.len();
        *self.heard_digests.entry(hash).or_default() += 1;
        self.heard.push_back(Heard { hash, frame });
        while self.heard.len() > MAX_FRAMES || self.bytes > MAX_BYTES {
            self.drop_heard(1);
            self.counts.overflowed += 1;
        }
        // A taken frame heard only now: the ones taken before it that are not heard
        // by now never will be.
        if let Some(k) = self.waiting.iter().position(|t| t.hash == hash) {
            self.settle_found();
            for _ in 0..k.min(self.waiting.len()) {
                if self.waiting.front().is_some_and(|t| t.hash == hash) {
                    break;
                }
                self.missed();
            }
        }
        self.settle(now);
    }

    /// The primary's guest took `frame`.
    pub fn taken(&mut self, frame: &[u8], now: Instant) {
        let hash = xxh3_64(frame);
        self.waiting.push_back(Taken {
            hash,
            unicast: is_unicast(frame),
            at: now,
        });
        while self.waiting.len() > MAX_WAITING {
            self.missed();
        }
        self.settle_found();
        // Heard already, yet others taken before it wait: those were never heard.
        if self.heard_digests.contains_key(&hash) {
            while self.waiting.len() > 1 {
                self.missed();
                self.settle_found();
            }
        }
        self.settle(now);
    }

    /// At a takeover, once everything this tap had heard is in and everything the old
    /// primary's guest is known to have taken is noted: the frames its guest never
    /// took, in the order heard. The window is empty afterwards.
    pub fn take_untaken(&mut self) -> Vec<Vec<u8>> {
        while !self.waiting.is_empty() {
            self.settle_found();
            self.missed();
        }
        self.bytes = 0;
        self.heard_digests.clear();
        self.heard.drain(..).map(|h| h.frame).collect()
    }

    /// A full copy's state is applied: the primary's guest had taken every frame up to
    /// the one of digest `last` (none if `None`). Frames heard up to its first
    /// occurrence are dropped; if it was never heard here (the LAN does not deliver the
    /// guest's frames here, or the window overflowed), all are, since none can be
    /// placed after it. What was waiting to be heard is forgotten: it is in the state.
    pub fn align(&mut self, last: Option<u64>) {
        self.waiting.clear();
        let Some(last) = last else {
            return;
        };
        let upto = self
            .heard
            .iter()
            .position(|h| h.hash == last)
            .map_or(self.heard.len(), |i| i + 1);
        self.drop_heard(upto);
    }

    /// Forgets everything held (a guest that starts afresh).
    pub fn clear(&mut self) {
        self.heard.clear();
        self.heard_digests.clear();
        self.waiting.clear();
        self.bytes = 0;
    }

    fn drop_heard(&mut self, n: usize) {
        for h in self.heard.drain(..n) {
            self.bytes -= h.frame.len();
            if let Some(c) = self.heard_digests.get_mut(&h.hash) {
                *c -= 1;
                if *c == 0 {
                    self.heard_digests.remove(&h.hash);
                }
            }
        }
    }

    fn missed(&mut self) {
        if let Some(t) = self.waiting.pop_front() {
            self.counts.missed += 1;
            if t.unicast {
                self.counts.unicast_heard = Some(false);
            }
        }
    }

    /// Matches what can be matched, and gives up on taken frames waited on too long.
    fn settle(&mut self, now: Instant) {
        self.settle_found();
        while self
            .waiting
            .front()
            .is_some_and(|t| now.saturating_duration_since(t.at) >= MISS_AFTER)
        {
            self.missed();
            self.settle_found();
        }
    }

    /// Matches taken frames found heard, from the first waiting.
    fn settle_found(&mut self) {
        while let Some(t) = self.waiting.front() {
            if !self.heard_digests.contains_key(&t.hash) {
                return;
            }
            let Some(i) = self.heard.iter().position(|h| h.hash == t.hash) else {
                return;
            };
            if t.unicast {
                self.counts.unicast_heard = Some(true);
            }
            self.drop_heard(i + 1);
            self.waiting.pop_front();
            self.counts.matched += 1;
        }
    }
}

#[cfg(test)]
#[path = "inbound_tests.rs"]
mod tests;
