//! Replication: the primary's epoch loop and output commit, the secondary's replica
//! (checkpoint mode) and its follower (lockstep mode).

pub mod commit;
pub mod garp;
pub mod inbound;
pub mod lockstep;
#[cfg(test)]
mod lockstep_tests;
pub mod mirror;
pub mod primary;
pub mod record;
pub mod secondary;
