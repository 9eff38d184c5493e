//! Virtual time: a clock that advances only by rules the VMM controls, so that what the
//! guest reads is a function of its exit sequence and can be reproduced or recorded.

use serde::{Deserialize, Serialize};

/// Virtual nanoseconds added by every VM exit.
pub const NS_PER_EXIT: u64 = 1_000;

/// The guest's clock, in nanoseconds since boot.
///
/// It advances by [`NS_PER_EXIT`] at every VM exit and jumps forward to a timer deadline
/// when the guest idles waiting for it. Nothing else moves it; in particular host time
/// never leaks into it (pacing against the host clock is the run loop's business and
/// changes only how long the host waits, not what the guest reads).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VirtualClock {
    now_ns: u64,
}

impl VirtualClock {
    /// Current virtual time.
    pub fn now_ns(&self) -> u64 {
        self.now_ns
    }

    /// Accounts one VM exit.
    pub fn tick_exit(&mut self) {
        self.now_ns = self.now_ns.saturating_add(NS_PER_EXIT);
    }

    /// Moves the clock forward to `deadline_ns` (never backward).
    pub fn advance_to(&mut self, deadline_ns: u64) {
        self.now_ns = self.now_ns.max(deadline_ns);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn advances_by_exits_and_jumps_but_never_back() {
        let mut c = VirtualClock::default();
        c.tick_exit();
        c.tick_exit();
        assert_eq!(c.now_ns(), 2 * NS_PER_EXIT);
        c.advance_to(10_000);
        assert_eq!(c.now_ns(), 10_000);
        c.advance_to(5);
        assert_eq!(c.now_ns(), 10_000);
    }
}
