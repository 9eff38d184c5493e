//! The node's quick path: a link reader that decodes an acknowledgement (primary), or
//! the next slice of the log or a release (lockstep secondary), handles it itself,
//! without waking the node's event loop — each saves one thread hop on the way of
//! every released output. It does so only between the node's turns: the node holds
//! the turn lock while it handles anything, and the reader only tries it (a busy node
//! gets the message through its queue, as before). The session decides what is quick
//! (`Session::quick_ack`, `Session::quick_slice`); what the node runs (its commit, its
//! follower) is refreshed here at the end of every turn.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use crate::link::{Outbox, QuickHandler};
use crate::protocol::{Message, Segment};
use crate::replication::commit::Commit;
use crate::replication::lockstep::SliceInbox;
use crate::session::{Action, SharedSession};

/// What the quick path acts on, as the node left it at the end of its last turn.
#[derive(Default)]
pub(super) struct Turn {
    /// The running guest's output commit (primary).
    pub commit: Option<Commit>,
    /// The replica's running guest (lockstep secondary).
    pub slices: Option<SliceInbox>,
    /// Actions the quick path could not carry out at once (the commit or the outbox
    /// busy), in order, for the node's next turn; no message is handled quickly while
    /// any wait.
    pub deferred: Vec<Action>,
}

/// The link readers' way in to the node.
pub(super) struct QuickPath {
    session: Arc<SharedSession>,
    out: Outbox,
    turn: Mutex<Turn>,
}

impl QuickPath {
    pub fn new(session: Arc<SharedSession>, out: Outbox) -> Arc<Self> {
        Arc::new(Self {
            session,
            out,
            turn: Mutex::new(Turn::default()),
        })
    }

    /// The node's turn: held while the node handles anything.
    pub fn turn(&self) -> MutexGuard<'_, Turn> {
        self.turn.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Carries out the session's actions without waiting for a thread of normal
    /// priority: what cannot be done at once (the commit or the outbox busy), and
    /// everything after it, is left to the node's next turn, in order.
    fn carry_out(&self, turn: &mut Turn, actions: Vec<Action>) {
        for action in actions {
            if !turn.deferred.is_empty() {
                turn.deferred.push(action);
                continue;
            }
            match action {
                Action::Send(m) => {
                    if let Err(m) = self.out.try_send_small(m) {
                        turn.deferred.push(Action::Send(*m));
                    }
                }
                Action::Release(outputs) => {
                    if let Some(c) = &turn.commit {
                        if let Err(outputs) = c.try_release(outputs) {
                            turn.deferred.push(Action::Release(outputs));
                        }
                    }
                }
                other => turn.deferred.push(other),
            }
        }
    }
}

impl QuickHandler for QuickPath {
    fn offer(&self, msg: Message) -> Option<Message> {
        // A node in its turn (or one that panicked in it) gets the message queued, and
        // so does every message while actions wait for the node's next turn.
        let Ok(mut turn) = self.turn.try_lock() else {
            return Some(msg);
        };
        if !turn.deferred.is_empty() {
            return Some(msg);
        }
        match msg {
            Message::Ack { position, copy } if turn.commit.is_some() => {
                // Never waits for the session (the vCPU thread may hold it).
                let quick = self
                    .session
                    .try_lock()
                    .and_then(|mut s| s.quick_ack(position, copy, Instant::now()));
                let Some(actions) = quick else {
                    return Some(Message::Ack { position, copy });
                };
                // The epoch loop may be waiting for this acknowledgement.
                self.session.notify();
                self.carry_out(&mut turn, actions);
                None
            }
            Message::Segment {
                position,
                segment: Segment::Log(slice),
            } => {
                let inbox = turn.slices.clone().filter(SliceInbox::running);
                let quick = inbox
                    .as_ref()
                    .and_then(|_| self.session.try_lock()?.quick_slice(position));
                let (Some(inbox), Some(actions)) = (inbox, quick) else {
                    return Some(Message::Segment {
                        position,
                        segment: Segment::Log(slice),
                    });
                };
                // Acknowledged on receipt, before the follower thread is woken.
                self.carry_out(&mut turn, actions);
                if !inbox.slice(position, slice) {
                    // Its thread ended: it diverged, which the node reports at its
                    // next turn.
                    tracing::debug!(position, "slice not taken: the follower has ended");
                }
                None
            }
            Message::Released { position } => match turn.slices.as_ref() {
                // Noted for the follower without waking it or the node.
                Some(inbox) => {
                    inbox.released(position);
                    None
                }
                None => Some(Message::Released { position }),
            },
            other => Some(other),
        }
    }
}
