//! A child's console (stdout) read line by line on a thread, so that waiting for a line
//! has a time limit even when the guest has gone quiet.

use std::io::{BufRead, BufReader};
use std::process::ChildStdout;
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// The guest's console lines, read on a thread so that waiting for one has a time limit
/// even when the guest has gone quiet.
pub struct ConsoleLines(mpsc::Receiver<String>);

impl ConsoleLines {
    /// Reads `out` line by line on a thread.
    pub fn new(out: ChildStdout) -> Self {
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                if tx.send(line + "\n").is_err() {
                    break;
                }
            }
        });
        Self(rx)
    }

    /// Lines up to and including the first that contains `needle`.
    pub fn wait_for(&self, needle: &str, limit: Duration) -> String {
        let deadline = Instant::now() + limit;
        let mut seen = String::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.0.recv_timeout(left) {
                Ok(line) => {
                    seen.push_str(&line);
                    if line.contains(needle) {
                        return seen;
                    }
                }
                Err(e) => panic!("did not see {needle:?} ({e}); console so far:\n{seen}"),
            }
        }
    }

    /// Every remaining line, until the guest's console closes.
    pub fn rest(self, limit: Duration) -> String {
        let deadline = Instant::now() + limit;
        let mut seen = String::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.0.recv_timeout(left) {
                Ok(line) => seen.push_str(&line),
                Err(mpsc::RecvTimeoutError::Disconnected) => return seen,
                Err(e) => panic!("console did not close ({e}); so far:\n{seen}"),
            }
        }
    }
}
