//! The `ftvm` command's library: running a guest (`run`, snapshots, recordings) and the
//! CoServer pair (configuration, links, protocol, arbiter, replication, the node's role
//! state machine, its control API and the demo). The binary (`src/main.rs`) only parses
//! the command line and dispatches here; end-to-end tests use the link codec too.

pub mod arbiter;
pub mod attach;
pub mod cli;
pub mod config;
pub mod control;
pub mod ctl;
pub mod demo;
pub mod durable;
pub mod link;
pub mod netns;
pub mod node;
pub mod priority;
pub mod protocol;
pub mod recording;
pub mod replication;
pub mod run;
pub mod session;
