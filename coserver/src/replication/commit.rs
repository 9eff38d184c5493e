//! Output commit: the primary's World, which holds every output of an epoch until the
//! secondary acknowledges that epoch's checkpoint, records the epoch's disk writes for
//! the checkpoint, and ends epochs (at their deadline, or early when the guest idles
//! with output waiting).

use std::collections::VecDeque;
use std::fs::File;
use std::io::Write;
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use ftvm_devices::world::{IdleRequest, Wake, World, WorldError};

use crate::protocol::{DiskWrite, Message, Output};

/// How long an epoch may last while the guest idles with nothing to commit (no output,
/// no disk write): an idle guest costs a checkpoint per wake-up, or one per this period,
/// rather than one per epoch length.
const IDLE_EPOCH: Duration = Duration::from_millis(100);

/// Where released outputs go.
pub struct Sinks {
    /// Console bytes.
    pub console: Box<dyn Write + Send>,
    /// Frames (a second handle on the tap), if the guest has a network.
    pub tap: Option<File>,
}

struct State {
    /// Whether outputs wait for acknowledgement (a secondary holds a full copy).
    holding: bool,
    /// Whether disk writes are recorded (a secondary is being fed).
    recording: bool,
    outputs: Vec<Output>,
    writes: Vec<DiskWrite>,
    flushed: bool,
    /// Sealed epochs waiting for their acknowledgement: (epoch, sealed at, outputs).
    pending: VecDeque<(u64, Instant, Vec<Output>)>,
    deadline: Instant,
    started: Instant,
    pause: bool,
    sinks: Sinks,
    /// Output-commit delays of released epochs (µs), for status.
    delays_us: Vec<u64>,
    /// The running epoch.
    epoch: u64,
    /// Where received frames are forwarded while holding.
    forward: Option<Sender<Message>>,
    /// This node lost the arbiter: nothing is released any more.
    discarded: bool,
}

/// The output-commit state shared by the primary's World, its epoch loop and the
/// thread that receives acknowledgements.
#[derive(Clone)]
pub struct Commit(Arc<Mutex<State>>);

fn lock(m: &Mutex<State>) -> MutexGuard<'_, State> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// What an epoch leaves for its checkpoint.
#[derive(Debug, Default)]
pub struct Sealed {
    /// Disk writes in order.
    pub writes: Vec<DiskWrite>,
    /// Whether the guest flushed.
    pub flushed: bool,
    /// The outputs held under the epoch (empty when not holding).
    pub outputs: Vec<Output>,
}

impl Commit {
    /// Output commit releasing to `sinks`; it starts degraded (nothing held).
    pub fn new(sinks: Sinks) -> Self {
        Self(Arc::new(Mutex::new(State {
            holding: false,
            recording: false,
            outputs: Vec::new(),
            writes: Vec::new(),
            flushed: false,
            pending: VecDeque::new(),
            deadline: Instant::now(),
            started: Instant::now(),
            pause: false,
            sinks,
            delays_us: Vec::new(),
            epoch: 0,
            forward: None,
            discarded: false,
        })))
    }

    /// Forwards the frames the guest receives to `out` while outputs are held.
    pub fn forward_inbound(&self, out: Sender<Message>) {
        lock(&self.0).forward = Some(out);
    }

    fn inbound(&self, frame: &[u8]) {
        let s = lock(&self.0);
        if let (true, Some(out)) = (s.holding, &s.forward) {
            let _ = out.send(Message::Inbound {
                epoch: s.epoch,
                frame: frame.to_vec(),
            });
        }
    }

    /// Starts epoch `epoch`, which ends by `length` from now.
    pub fn start_epoch(&self, epoch: u64, length: Duration) {
        let mut s = lock(&self.0);
        s.epoch = epoch;
        s.started = Instant::now();
        s.deadline = s.started + length;
        s.pause = false;
    }

    /// Ends the epoch: its outputs are held under `epoch` (or released at once when not
    /// holding); returns its disk writes.
    pub fn seal(&self, epoch: u64) -> Sealed {
        let mut s = lock(&self.0);
        let outputs = std::mem::take(&mut s.outputs);
        let mut sealed = Sealed {
            writes: std::mem::take(&mut s.writes),
            flushed: std::mem::take(&mut s.flushed),
            outputs: Vec::new(),
        };
        if s.discarded {
            // Nothing more reaches the world from a fenced node.
        } else if s.holding {
            if !outputs.is_empty() {
                sealed.outputs = outputs.clone();
                s.pending.push_back((epoch, Instant::now(), outputs));
            }
        } else {
            release(&mut s.sinks, outputs);
        }
        let _ = s.sinks.console.flush();
        sealed
    }

    /// The secondary holds `epoch`: release everything sealed up to it.
    pub fn acked(&self, epoch: u64) {
        let mut s = lock(&self.0);
        let now = Instant::now();
        while s.pending.front().is_some_and(|(e, _, _)| *e <= epoch) {
            if let Some((_, at, outputs)) = s.pending.pop_front() {
                let delay = now.duration_since(at).as_micros() as u64;
                s.delays_us.push(delay);
                release(&mut s.sinks, outputs);
            }
        }
        if s.delays_us.len() > 4096 {
            s.delays_us.drain(..2048);
        }
    }

    /// Holds outputs from now on (a secondary holds a full copy) or not (degraded:
    /// everything held so far is released).
    pub fn set_holding(&self, holding: bool) {
        let mut s = lock(&self.0);
        if s.discarded {
            return;
        }
        s.holding = holding;
        if !holding {
            let pending: Vec<_> = s.pending.drain(..).collect();
            for (_, _, outputs) in pending {
                release(&mut s.sinks, outputs);
            }
        }
    }

    /// Records disk writes for a secondary (from a full copy on) or not.
    pub fn set_recording(&self, recording: bool) {
        let mut s = lock(&self.0);
        s.recording = recording;
        if !recording {
            s.writes.clear();
        }
    }

    /// Drops every held output and every later one, for good (this node lost the
    /// arbiter: its unacknowledged epochs never happened for the world).
    pub fn discard(&self) {
        let mut s = lock(&self.0);
        s.discarded = true;
        s.pending.clear();
        s.outputs.clear();
        s.holding = true;
        s.sinks.tap = None;
    }

    /// Releases outputs at once (those a dead primary may not have released).
    pub fn release_now(&self, outputs: Vec<Output>) {
        let mut s = lock(&self.0);
        if s.discarded {
            return;
        }
        release(&mut s.sinks, outputs);
    }

    /// Sends a frame of the VMM's own at once (a gratuitous ARP on takeover).
    pub fn announce(&self, frame: &[u8]) {
        let mut s = lock(&self.0);
        if let Some(tap) = &mut s.sinks.tap {
            if let Err(e) = tap.write(frame) {
                tracing::warn!("announcement not sent: {e}");
            }
        }
    }

    /// Recent output-commit delays (µs).
    pub fn delays_us(&self) -> Vec<u64> {
        lock(&self.0).delays_us.clone()
    }

    fn output(&self, o: Output) {
        let mut s = lock(&self.0);
        if s.discarded {
            return;
        }
        if s.holding || !s.pending.is_empty() {
            s.outputs.push(o);
        } else {
            // Degraded: nothing to wait for.
            release(&mut s.sinks, vec![o]);
        }
    }
}

/// Writes outputs to their sinks. The console is flushed at line ends (and when an epoch
/// is sealed), not per byte: a degraded primary releases each exit's byte at once.
fn release(sinks: &mut Sinks, outputs: Vec<Output>) {
    let mut line_end = false;
    for o in outputs {
        match o {
            Output::Console(b) => {
                line_end |= b.contains(&b'\n');
                if let Err(e) = sinks.console.write_all(&b) {
                    tracing::warn!("console output dropped: {e}");
                }
            }
            Output::Frame(f) => {
                if let Some(tap) = &mut sinks.tap {
                    if let Err(e) = tap.write(&f) {
                        tracing::debug!("frame dropped by the tap: {e}");
                    }
                }
            }
        }
    }
    if line_end {
        let _ = sinks.console.flush();
    }
}

/// The primary's World: a live World whose outputs pass through [`Commit`].
pub struct CommitWorld {
    inner: Box<dyn World>,
    commit: Commit,
    /// Frames to deliver before the tap's (received by a dead primary after the
    /// checkpoint this VM resumed from).
    redeliver: VecDeque<Vec<u8>>,
}

impl CommitWorld {
    /// Wraps `inner` (which does the disk and input work; its own console and frame
    /// output are bypassed).
    pub fn new(inner: Box<dyn World>, commit: Commit) -> Self {
        Self {
            inner,
            commit,
            redeliver: VecDeque::new(),
        }
    }

    /// Delivers `frames` to the guest first.
    pub fn with_redelivery(mut self, frames: Vec<Vec<u8>>) -> Self {
        self.redeliver = frames.into();
        self
    }
}

impl World for CommitWorld {
    fn console_output(&mut self, bytes: &[u8]) {
        self.commit.output(Output::Console(bytes.to_vec()));
    }

    fn transmit(&mut self, frame: &[u8]) {
        self.commit.output(Output::Frame(frame.to_vec()));
    }

    fn receive(&mut self, exit: u64) -> Result<Option<Vec<u8>>, WorldError> {
        if let Some(frame) = self.redeliver.pop_front() {
            return Ok(Some(frame));
        }
        let frame = self.inner.receive(exit)?;
        if let Some(f) = &frame {
            self.commit.inbound(f);
        }
        Ok(frame)
    }

    fn console_input(&mut self, exit: u64, max: usize) -> Result<Option<Vec<u8>>, WorldError> {
        self.inner.console_input(exit, max)
    }

    fn has_network(&self) -> bool {
        self.inner.has_network()
    }

    fn disk_read(&mut self, disk: usize, offset: u64, buf: &mut [u8]) -> Result<(), WorldError> {
        self.inner.disk_read(disk, offset, buf)
    }

    fn disk_write(&mut self, disk: usize, offset: u64, data: &[u8]) -> Result<(), WorldError> {
        self.inner.disk_write(disk, offset, data)?;
        let mut s = lock(&self.commit.0);
        if s.recording {
            s.writes.push(DiskWrite {
                offset,
                data: data.to_vec(),
            });
        }
        Ok(())
    }

    fn disk_flush(&mut self, disk: usize) -> Result<(), WorldError> {
        self.inner.disk_flush(disk)?;
        lock(&self.commit.0).flushed = true;
        Ok(())
    }

    fn idle(&mut self, request: &IdleRequest) -> Result<Wake, WorldError> {
        if !self.redeliver.is_empty() {
            return Ok(Wake {
                at_ns: request.now_ns,
            });
        }
        let deadline = {
            let mut s = lock(&self.commit.0);
            if s.holding && !s.outputs.is_empty() {
                // Output is waiting and the guest has nothing to do: end the epoch now
                // rather than hold the output for the rest of it.
                s.pause = true;
                return Ok(Wake {
                    at_ns: request.now_ns,
                });
            }
            if s.outputs.is_empty() && s.writes.is_empty() && !s.flushed {
                s.deadline.max(s.started + IDLE_EPOCH)
            } else {
                s.deadline
            }
        };
        let mut req = *request;
        req.give_up_at = Some(deadline);
        self.inner.idle(&req)
    }

    fn set_virtual_now(&mut self, now_ns: u64) {
        self.inner.set_virtual_now(now_ns);
    }

    fn flush(&mut self) {
        self.inner.flush();
    }

    fn pause_requested(&mut self) -> bool {
        let s = lock(&self.commit.0);
        s.pause || Instant::now() >= s.deadline
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Clone, Default)]
    struct Console(Arc<Mutex<Vec<u8>>>);

    impl Write for Console {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn line(s: &str) -> Output {
        Output::Console(s.as_bytes().to_vec())
    }

    #[test]
    fn held_outputs_leave_on_acknowledgement_or_degrade_and_never_after_a_discard() {
        let console = Console::default();
        let released = || String::from_utf8(console.0.lock().unwrap().clone()).unwrap();
        let c = Commit::new(Sinks {
            console: Box::new(console.clone()),
            tap: None,
        });
        c.set_holding(true);
        c.start_epoch(1, Duration::from_millis(10));
        c.output(line("one\n"));
        assert_eq!(c.seal(1).outputs, vec![line("one\n")]);
        assert_eq!(released(), "", "held until acknowledged");
        c.acked(1);
        assert_eq!(released(), "one\n");
        c.start_epoch(2, Duration::from_millis(10));
        c.output(line("two\n"));
        c.seal(2);
        c.set_holding(false);
        assert_eq!(released(), "one\ntwo\n", "degraded: released at once");
        c.set_holding(true);
        c.start_epoch(3, Duration::from_millis(10));
        c.output(line("three\n"));
        c.seal(3);
        c.discard();
        c.set_holding(false);
        c.acked(3);
        c.output(line("four\n"));
        c.seal(4);
        c.release_now(vec![line("five\n")]);
        assert_eq!(
            released(),
            "one\ntwo\n",
            "a fenced node releases nothing more"
        );
    }
}
