//! Writing a blob file for the directory host: on a thread of its own where threads exist, so
//! that receiving and hashing the next bytes (the request's task, in the core) overlaps with
//! copying the previous ones into the page cache and flushing them to the device.
//!
//! Measured before this (docs/PERFORMANCE.md, issue 13): a 1 GiB monolithic push used 2.8
//! CPU-seconds of the server, all on one thread, SHA-256 alone ~0.8 of them; the disk (`dd
//! conv=fsync`) and loopback were each 2.5-4x faster than the push. The work per byte is the
//! same here; it is split over two threads.

use std::fs::File;
use std::io::{self, Write};
use std::sync::mpsc::{Receiver, SyncSender};
use std::thread::JoinHandle;

use bytes::Bytes;

/// Objects are written inline until they pass this size, then on a writer thread. Measured
/// (docs/PERFORMANCE.md, issue 13, a noisy disk): for a 1 GiB monolithic push the thread's
/// median gain was 1.29x; a push in 16 MiB PATCHes, one object per PATCH, showed no gain with
/// a thread per part (0.75-0.9x in two runs), so the parts of a chunked push stay inline.
const WRITE_BEHIND_FROM: u64 = 32 * 1024 * 1024;
/// Chunks are handed to the writer thread in batches of at least this many bytes (a request
/// body arrives in pieces of a few KiB to a few hundred: one handoff per piece would cost more
/// in wakeups than it saves) ...
const BATCH_BYTES: usize = 256 * 1024;
/// ... and at most this many batches wait for it: a writer slower than the client holds the
/// request back (the send blocks) with at most ~2 MiB in between, so memory stays constant.
const QUEUED_BATCHES: usize = 8;

/// A file being written: inline at first, on a writer thread once it is large.
pub(super) struct WriteBehind {
    fsync: bool,
    /// Bytes written or queued so far.
    len: u64,
    /// A writer thread could not be started (wasm32-wasip2 has none): stay inline.
    inline_only: bool,
    state: State,
}

enum State {
    Inline {
        file: File,
        flush: EarlyFlush,
    },
    Thread {
        /// `None` once finished or failed.
        tx: Option<SyncSender<Vec<Bytes>>>,
        batch: Vec<Bytes>,
        batched: usize,
        thread: Option<JoinHandle<io::Result<()>>>,
    },
}

impl WriteBehind {
    /// Starts writing `file`; with `fsync`, flushes it early (see [`EarlyFlush`]) and syncs it
    /// in [`WriteBehind::finish`].
    pub(super) fn start(file: File, fsync: bool) -> WriteBehind {
        WriteBehind {
            fsync,
            len: 0,
            inline_only: cfg!(target_family = "wasm"),
            state: State::Inline {
                file,
                flush: EarlyFlush::default(),
            },
        }
    }

    /// Moves the writing to a thread of its own, if one can be started. Called before the
    /// inline early flush ever starts (it starts at the same size), so the thread's own
    /// [`EarlyFlush`] is the only one.
    fn go_behind(&mut self) {
        let State::Inline { file, .. } = &self.state else {
            return;
        };
        let Ok(dup) = file.try_clone() else {
            self.inline_only = true;
            return;
        };
        let (tx, rx) = std::sync::mpsc::sync_channel::<Vec<Bytes>>(QUEUED_BATCHES);
        let (fsync, len) = (self.fsync, self.len);
        match std::thread::Builder::new()
            .name("dockside-write".into())
            .spawn(move || write_all_from(dup, rx, len, fsync))
        {
            Ok(thread) => {
                self.state = State::Thread {
                    tx: Some(tx),
                    batch: Vec::new(),
                    batched: 0,
                    thread: Some(thread),
                }
            }
            Err(_) => self.inline_only = true,
        }
    }

    /// Writes `chunk` (or queues it for the writer thread). An error is the file's: a failed
    /// write, or a full disk seen by the writer thread earlier.
    pub(super) fn push(&mut self, chunk: Bytes) -> io::Result<()> {
        if let State::Inline { file, .. } = &mut self.state {
            file.write_all(&chunk)?;
            self.len += chunk.len() as u64;
            if self.len >= WRITE_BEHIND_FROM && !self.inline_only {
                self.go_behind();
            }
            if let State::Inline { file, flush } = &mut self.state
                && self.fsync
            {
                flush.written(file, self.len);
            }
            return Ok(());
        }
        self.len += chunk.len() as u64;
        let State::Thread { batch, batched, .. } = &mut self.state else {
            unreachable!("inline handled above");
        };
        *batched += chunk.len();
        batch.push(chunk);
        if *batched >= BATCH_BYTES {
            self.send()?;
        }
        Ok(())
    }

    fn send(&mut self) -> io::Result<()> {
        let State::Thread {
            tx, batch, batched, ..
        } = &mut self.state
        else {
            return Ok(());
        };
        let Some(sender) = tx else {
            return Err(io::Error::other("the blob writer has stopped"));
        };
        *batched = 0;
        if sender.send(std::mem::take(batch)).is_err() {
            // The writer stopped on an error: that error is the answer.
            *tx = None;
            return Err(self.join().err().unwrap_or_else(|| {
                io::Error::other("the blob writer stopped before the end of the blob")
            }));
        }
        Ok(())
    }

    fn join(&mut self) -> io::Result<()> {
        let State::Thread { tx, thread, .. } = &mut self.state else {
            return Ok(());
        };
        *tx = None; // the writer's queue ends: it finishes what it holds and returns
        match thread.take() {
            None => Ok(()),
            Some(t) => t
                .join()
                .unwrap_or_else(|_| Err(io::Error::other("the blob writer thread panicked"))),
        }
    }

    /// Writes what is left and, with `fsync`, waits for the file to be on the device. Blocks
    /// the calling thread for that final sync, as an inline `sync_all` would.
    pub(super) fn finish(mut self) -> io::Result<()> {
        let fsync = self.fsync;
        match &mut self.state {
            State::Inline { file, flush } => {
                if fsync {
                    flush.finish()?;
                    file.sync_all()?;
                }
                Ok(())
            }
            State::Thread { .. } => {
                self.send()?;
                self.join()
            }
        }
    }
}

impl Drop for WriteBehind {
    fn drop(&mut self) {
        // Abandoned (the client went away, or a write failed): let the writer end; the caller
        // removes the temporary file.
        let _ = self.join();
    }
}

/// The writer thread: writes each batch in order after the `len` bytes already written,
/// flushes early as it goes, syncs at the end. Returns at the first error, which drops `rx`
/// and so tells the sender.
fn write_all_from(
    mut file: File,
    rx: Receiver<Vec<Bytes>>,
    mut len: u64,
    fsync: bool,
) -> io::Result<()> {
    let mut flush = EarlyFlush::default();
    for batch in rx {
        for chunk in batch {
            file.write_all(&chunk)?;
            len += chunk.len() as u64;
        }
        if fsync {
            flush.written(&file, len);
        }
    }
    if fsync {
        flush.finish()?;
        file.sync_all()?;
    }
    Ok(())
}

/// An object is flushed to the device while it is still being written once it passes this
/// size (so that the fsync before its rename only waits for the tail)...
const EARLY_FLUSH_FROM: u64 = 32 * 1024 * 1024;
/// ... and asked again every time this much more has been written. Each flush is a journal
/// commit: smaller objects (16 MiB chunks of a chunked push) are only synced at their end.
const EARLY_FLUSH_STEP: u64 = 16 * 1024 * 1024;

/// Flushes a large object's pages to the device while the rest of it arrives. Without it, a
/// write only dirties the page cache (the kernel starts writeback at 10% of memory, more than
/// any blob), and the fsync before the rename then writes the whole object while the client
/// waits: a 1 GiB push was receiving for ~1.4 s, then flushing for ~1 s. Here a thread of its
/// own runs `fdatasync` back to back while the writer goes on, so receiving and flushing
/// overlap and the final fsync only flushes what arrived during the last pass.
///
/// The flush errors are kept and returned by [`EarlyFlush::finish`]: the flusher's descriptor
/// is a duplicate of the writer's, and Linux reports a writeback error once per open file, so
/// an error seen here would not be seen again by the final fsync.
///
/// Where threads cannot be started (wasm32-wasip2), the object is only synced at the end.
#[derive(Default)]
pub(super) struct EarlyFlush {
    /// The object's length at which the next flush is asked for.
    next: u64,
    worker: Option<FlushWorker>,
    /// No thread could be started: only the final fsync.
    off: bool,
}

struct FlushWorker {
    /// A request to flush; a request already queued stands for any number of later ones.
    ask: std::sync::mpsc::SyncSender<()>,
    thread: std::thread::JoinHandle<io::Result<()>>,
}

impl EarlyFlush {
    pub(super) fn written(&mut self, file: &File, len: u64) {
        if self.off || len < self.next.max(EARLY_FLUSH_FROM) {
            return;
        }
        self.next = len + EARLY_FLUSH_STEP;
        if self.worker.is_none() {
            let Ok(dup) = file.try_clone() else {
                self.off = true;
                return;
            };
            let (ask, asked) = std::sync::mpsc::sync_channel::<()>(1);
            let spawned = std::thread::Builder::new()
                .name("dockside-flush".into())
                .spawn(move || {
                    while asked.recv().is_ok() {
                        dup.sync_data()?;
                    }
                    Ok(())
                });
            match spawned {
                Ok(thread) => self.worker = Some(FlushWorker { ask, thread }),
                Err(_) => {
                    self.off = true;
                    return;
                }
            }
        }
        if let Some(w) = &self.worker {
            // Full: a flush is queued already, and it will cover these bytes too.
            let _ = w.ask.try_send(());
        }
    }

    /// Waits for the flush in progress, and says whether every flush succeeded.
    pub(super) fn finish(&mut self) -> io::Result<()> {
        match self.worker.take() {
            None => Ok(()),
            Some(FlushWorker { ask, thread }) => {
                drop(ask);
                thread
                    .join()
                    .unwrap_or_else(|_| Err(io::Error::other("the flush thread panicked")))
            }
        }
    }
}

impl Drop for EarlyFlush {
    fn drop(&mut self) {
        // A failed write: let the flusher end (its result no longer matters).
        let _ = self.finish();
    }
}
