//! Writing a blob file for the directory host: on a thread of its own once it is large
//! ([`crate::behind`]), so that receiving and hashing the next bytes (the request's task and the
//! core's hashing thread) overlap with copying the previous ones into the page cache; and, with
//! fsync on, handing what is written to the device as it goes, so that the fsync before the
//! rename only waits for the tail.
//!
//! Measured (docs/PERFORMANCE.md, issue 13), 1 GiB pushes on this 2-core machine: all on one
//! thread, a monolithic push used 2.8 CPU-seconds of the server and ran at ~370-500 MB/s; a
//! chunked push in 16 MiB PATCHes waited ~9 ms for each part's fsync, ~0.6 s per GiB.

use std::fs::File;
use std::io::{self, Write};

use bytes::Bytes;

use crate::behind::{Behind, Sink};

/// A blob file being written: inline at first, on a thread of its own once it is large
/// ([`crate::behind`]).
pub(super) struct WriteBehind {
    out: Behind<FileSink>,
}

struct FileSink {
    file: File,
    /// Bytes written so far.
    len: u64,
    /// Bytes handed to the kernel's writeback so far ([`start_writeback`]).
    started: u64,
    fsync: bool,
}

impl Sink for FileSink {
    fn write(&mut self, chunk: &Bytes) -> io::Result<()> {
        self.file.write_all(chunk)?;
        self.len += chunk.len() as u64;
        Ok(())
    }

    fn batch_done(&mut self) {
        if self.fsync && self.len - self.started >= WRITEBACK_STEP {
            start_writeback(&self.file, self.started, self.len - self.started);
            self.started = self.len;
        }
    }
}

impl WriteBehind {
    /// Starts writing `file`; with `fsync`, starts its writeback as it goes (every
    /// [`WRITEBACK_STEP`]) and syncs it in [`WriteBehind::finish`].
    pub(super) fn start(file: File, fsync: bool) -> WriteBehind {
        WriteBehind {
            out: Behind::new(
                "dockside-write",
                FileSink {
                    file,
                    len: 0,
                    started: 0,
                    fsync,
                },
            ),
        }
    }

    /// Writes `chunk` (or queues it for the writer thread). An error is the file's: a failed
    /// write, or a full disk seen by the writer thread earlier.
    pub(super) fn push(&mut self, chunk: Bytes) -> io::Result<()> {
        self.out.push(chunk)
    }

    /// Writes what is left and, with `fsync`, waits for the file to be on the device.
    pub(super) fn finish(self) -> io::Result<()> {
        let sink = self.out.finish()?;
        if sink.fsync {
            sink.file.sync_all()?;
        }
        Ok(())
    }
}

/// With fsync on, the kernel is asked to start writing a file to the device every time this
/// much more of it has been written. Without it, a write only dirties the page cache (the
/// kernel starts writeback on its own at 10% of memory, more than any blob), and the fsync
/// before the rename wrote the whole object while the client waited: ~1 s for a 1 GiB push,
/// ~9 ms for each 16 MiB part of a chunked one. Measured steps: 1 MiB, 2, 4 and 8: 4 was the
/// fastest for both (docs/PERFORMANCE.md).
const WRITEBACK_STEP: u64 = 4 * 1024 * 1024;

/// Asks the kernel to start writing `len` bytes from `from` to the device, without waiting:
/// `sync_file_range(SYNC_FILE_RANGE_WRITE)`. The final fsync then only waits for what is still
/// in flight. An error is not lost: writeback errors are kept on the file and reported by that
/// fsync.
#[cfg(all(target_os = "linux", feature = "server"))]
fn start_writeback(file: &File, from: u64, len: u64) {
    use std::os::fd::AsRawFd;
    // SAFETY: sync_file_range takes integers only; the descriptor is `file`'s, open for as long
    // as the borrow lasts.
    let _ = unsafe {
        libc::sync_file_range(
            file.as_raw_fd(),
            from as libc::off64_t,
            len as libc::off64_t,
            libc::SYNC_FILE_RANGE_WRITE,
        )
    };
}

#[cfg(not(all(target_os = "linux", feature = "server")))]
fn start_writeback(_file: &File, _from: u64, _len: u64) {}
