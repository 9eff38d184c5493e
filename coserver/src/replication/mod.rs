//! Checkpoint replication: the primary's epoch loop and output commit, and the
//! secondary's replica.

pub mod commit;
pub mod garp;
pub mod primary;
pub mod record;
pub mod secondary;
