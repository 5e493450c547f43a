//! The stage on a thread of its own (native only): see the parent module.

use std::io;
use std::sync::mpsc::{Receiver, SyncSender};
use std::thread::JoinHandle;

use bytes::Bytes;

use super::Sink;

/// Streams stay inline until they pass this size. Low enough that each 16 MiB part of a
/// chunked push goes behind too: measured 32 MiB against 4 (docs/PERFORMANCE.md), 4 was as
/// fast for monolithic pushes and faster for chunked ones.
pub(crate) const BEHIND_FROM: u64 = 4 * 1024 * 1024;
/// Chunks are handed over in batches of at least this many bytes (a request body arrives in
/// pieces of a few KiB to a few hundred: one handoff per piece would cost more in wakeups than
/// it saves) ...
const BATCH_BYTES: usize = 256 * 1024;
/// ... and at most this many batches wait: ~2 MiB per stage and stream.
const QUEUED_BATCHES: usize = 8;

/// A stage: inline at first, on a thread of its own once its stream passes [`BEHIND_FROM`].
pub(crate) struct Behind<S: Sink> {
    name: &'static str,
    len: u64,
    /// A thread could not be started: stay inline.
    inline_only: bool,
    state: State<S>,
}

enum State<S> {
    Inline(S),
    Thread {
        /// `None` once closed (finished, or the thread failed).
        tx: Option<SyncSender<Vec<Bytes>>>,
        batch: Vec<Bytes>,
        batched: usize,
        thread: Option<JoinHandle<io::Result<S>>>,
    },
    /// Finished or failed: the sink is gone.
    Done,
}

impl<S: Sink> Behind<S> {
    /// A stage over `sink`; its thread, if one starts, is called `name`.
    pub(crate) fn new(name: &'static str, sink: S) -> Self {
        Behind {
            name,
            len: 0,
            inline_only: false,
            state: State::Inline(sink),
        }
    }

    /// Hands `chunk` to the sink (or queues it for the thread). An error is the sink's: this
    /// chunk's, or one the thread met earlier.
    pub(crate) fn push(&mut self, chunk: Bytes) -> io::Result<()> {
        self.len += chunk.len() as u64;
        match &mut self.state {
            State::Inline(sink) => {
                sink.write(&chunk)?;
                sink.batch_done();
                if self.len >= BEHIND_FROM && !self.inline_only {
                    self.go_behind();
                }
                Ok(())
            }
            State::Thread { batch, batched, .. } => {
                *batched += chunk.len();
                batch.push(chunk);
                if *batched >= BATCH_BYTES {
                    self.send()?;
                }
                Ok(())
            }
            State::Done => Err(io::Error::other(format!("{} has stopped", self.name))),
        }
    }

    /// Moves the sink onto a thread of its own, if one can be started and fewer than
    /// [`MAX_ON_THREADS`] stages are on threads already.
    fn go_behind(&mut self) {
        let State::Inline(_) = &self.state else {
            return;
        };
        let Some(seat) = Seat::take() else {
            self.inline_only = true;
            return;
        };
        let State::Inline(sink) = std::mem::replace(&mut self.state, State::Done) else {
            unreachable!("checked above");
        };
        let (tx, rx) = std::sync::mpsc::sync_channel::<Vec<Bytes>>(QUEUED_BATCHES);
        // The sink moves into the thread; were the spawn to fail it would be lost with the
        // closure, so it waits in a slot the closure takes it from.
        let slot = std::sync::Arc::new(std::sync::Mutex::new(Some(sink)));
        let theirs = slot.clone();
        let spawned = std::thread::Builder::new()
            .name(self.name.into())
            .spawn(move || {
                let _seat = seat; // given back when the thread ends, however it ends
                let sink = theirs.lock().ok().and_then(|mut s| s.take());
                run(sink.ok_or_else(|| io::Error::other("no sink"))?, rx)
            });
        match spawned {
            Ok(thread) => {
                self.state = State::Thread {
                    tx: Some(tx),
                    batch: Vec::new(),
                    batched: 0,
                    thread: Some(thread),
                }
            }
            Err(_) => {
                self.inline_only = true;
                let sink = slot.lock().ok().and_then(|mut s| s.take());
                self.state = sink.map_or(State::Done, State::Inline);
            }
        }
    }

    fn send(&mut self) -> io::Result<()> {
        let State::Thread {
            tx, batch, batched, ..
        } = &mut self.state
        else {
            return Ok(());
        };
        let Some(sender) = tx else {
            return Err(io::Error::other(format!("{} has stopped", self.name)));
        };
        if batch.is_empty() {
            return Ok(());
        }
        *batched = 0;
        if sender.send(std::mem::take(batch)).is_err() {
            // The thread stopped on an error: that error is the answer.
            *tx = None;
            return Err(match self.join() {
                Err(e) => e,
                Ok(_) => io::Error::other(format!("{} stopped early", self.name)),
            });
        }
        Ok(())
    }

    /// Closes the queue and waits for the thread to finish what it holds.
    fn join(&mut self) -> io::Result<S> {
        match std::mem::replace(&mut self.state, State::Done) {
            State::Inline(sink) => Ok(sink),
            State::Done => Err(io::Error::other(format!("{} has stopped", self.name))),
            State::Thread { tx, thread, .. } => {
                drop(tx); // the thread's queue ends: it finishes what it holds and returns
                match thread {
                    None => Err(io::Error::other(format!("{} has stopped", self.name))),
                    Some(t) => t.join().unwrap_or_else(|_| {
                        Err(io::Error::other(format!("{} panicked", self.name)))
                    }),
                }
            }
        }
    }

    /// Hands over what is left, waits for the thread, and gives the sink back.
    pub(crate) fn finish(mut self) -> io::Result<S> {
        self.send()?;
        self.join()
    }
}

impl<S: Sink> Drop for Behind<S> {
    fn drop(&mut self) {
        // Abandoned (the client went away, or a write failed): let the thread end.
        if let State::Thread { .. } = self.state {
            let _ = self.join();
        }
    }
}

/// At most this many stages run on threads at once, all streams together; past it, a large
/// stream stays inline. More threads than cores gain nothing, and each holds up to ~2 MiB of
/// queued chunks: 64 bound that memory (128 MiB) and the threads a burst of pushes can start.
const MAX_ON_THREADS: usize = 64;

static ON_THREADS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// One of the [`MAX_ON_THREADS`] places, given back when dropped.
struct Seat;

impl Seat {
    fn take() -> Option<Seat> {
        use std::sync::atomic::Ordering::Relaxed;
        ON_THREADS
            .fetch_update(Relaxed, Relaxed, |n| (n < MAX_ON_THREADS).then_some(n + 1))
            .ok()
            .map(|_| Seat)
    }
}

impl Drop for Seat {
    fn drop(&mut self) {
        ON_THREADS.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// The thread: every batch in order, then the sink back. Returns at the first error, which
/// drops `rx` and so tells the sender.
fn run<S: Sink>(mut sink: S, rx: Receiver<Vec<Bytes>>) -> io::Result<S> {
    for batch in rx {
        for chunk in &batch {
            sink.write(chunk)?;
        }
        sink.batch_done();
    }
    Ok(sink)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Sums the bytes it sees, and fails at a given length; says when it is dropped.
    struct Sum {
        total: u64,
        fail_at: Option<u64>,
        batches: u32,
        dropped: std::sync::Arc<std::sync::atomic::AtomicBool>,
    }

    impl Drop for Sum {
        fn drop(&mut self) {
            self.dropped
                .store(true, std::sync::atomic::Ordering::SeqCst);
        }
    }

    impl Sink for Sum {
        fn write(&mut self, chunk: &Bytes) -> io::Result<()> {
            self.total += chunk.len() as u64;
            if self.fail_at.is_some_and(|f| self.total >= f) {
                return Err(io::Error::other("full"));
            }
            Ok(())
        }
        fn batch_done(&mut self) {
            self.batches += 1;
        }
    }

    fn sum(fail_at: Option<u64>) -> Sum {
        Sum {
            total: 0,
            fail_at,
            batches: 0,
            dropped: Default::default(),
        }
    }

    const MIB: usize = 1024 * 1024;

    /// Tests that look at whether a stage went on a thread take turns: one of them takes every
    /// seat for a while.
    static SEATS: std::sync::Mutex<()> = std::sync::Mutex::new(());

    fn seats() -> std::sync::MutexGuard<'static, ()> {
        SEATS.lock().unwrap_or_else(|p| p.into_inner())
    }

    #[test]
    fn a_large_stream_goes_behind_and_every_byte_arrives_in_order() {
        let _turn = seats();
        let mut b = Behind::new("test-behind", sum(None));
        for _ in 0..48 {
            b.push(Bytes::from(vec![1u8; MIB])).unwrap();
        }
        assert!(
            matches!(b.state, State::Thread { .. }),
            "past 4 MiB on a thread"
        );
        let s = b.finish().unwrap();
        assert_eq!(s.total, 48 * MIB as u64);
        // 4 inline chunks, then 44 MiB in batches of at least 256 KiB (each chunk is one).
        assert_eq!(s.batches, 48);
    }

    #[test]
    fn a_small_stream_stays_inline() {
        let mut b = Behind::new("test-behind", sum(None));
        b.push(Bytes::from_static(b"hello")).unwrap();
        assert!(matches!(b.state, State::Inline(_)));
        assert_eq!(b.finish().unwrap().total, 5);
    }

    #[test]
    fn an_error_on_the_thread_is_the_answer_of_a_later_push_or_the_finish() {
        let mut b = Behind::new("test-behind", sum(Some(40 * MIB as u64)));
        let mut failed = None;
        for i in 0..200 {
            if let Err(e) = b.push(Bytes::from(vec![0u8; MIB])) {
                failed = Some((i, e));
                break;
            }
        }
        let e = match failed {
            Some((i, e)) => {
                assert!(i >= 40, "not before the failure: {i}");
                e
            }
            None => b.finish().err().expect("the sink failed"),
        };
        assert_eq!(e.to_string(), "full");
    }

    #[test]
    fn past_the_most_threads_a_large_stream_stays_inline() {
        // Every seat taken: the next large stream is hashed or written inline, and still right.
        let _turn = seats();
        let mib = Bytes::from(vec![7u8; MIB]);
        let mut held = Vec::new();
        while Seat::take().map(|s| held.push(s)).is_some() {}
        let mut b = Behind::new("test-behind", sum(None));
        for _ in 0..8 {
            b.push(mib.clone()).unwrap();
        }
        assert!(matches!(b.state, State::Inline(_)), "no seat: inline");
        drop(held);
        assert_eq!(b.finish().unwrap().total, 8 * MIB as u64);
        // Seats given back: the next one goes behind.
        let mut b = Behind::new("test-behind", sum(None));
        for _ in 0..8 {
            b.push(mib.clone()).unwrap();
        }
        assert!(
            matches!(b.state, State::Thread { .. }),
            "a seat: on a thread"
        );
        b.finish().unwrap();
    }

    #[test]
    fn dropping_a_stage_on_a_thread_ends_the_thread() {
        let _turn = seats();
        let sink = sum(None);
        let dropped = sink.dropped.clone();
        let mut b = Behind::new("test-behind", sink);
        for _ in 0..8 {
            b.push(Bytes::from(vec![0u8; MIB])).unwrap();
        }
        assert!(matches!(b.state, State::Thread { .. }));
        drop(b);
        // The thread saw its queue end and returned the sink, and the drop waited for it.
        assert!(dropped.load(std::sync::atomic::Ordering::SeqCst));
    }
}
