//! Work over a stream of bytes (hashing it, writing it to a file) done on a thread of its own
//! once the stream is large, so that it overlaps with receiving the next bytes.
//!
//! A 1 GiB push does three things to every byte: the request's task receives it, the core
//! hashes it ([`crate::body::Hashing`]), the directory host copies it into the page cache
//! (`hosts/fs_write.rs`). One after the other on one thread, the push is bound by that thread
//! (docs/PERFORMANCE.md, issue 13): SHA-256 alone is half of it. Each stage here runs behind the
//! task on a thread of its own and receives the chunks (reference-counted [`Bytes`], not copies)
//! in batches through a bounded queue, so memory stays constant: a stage slower than the client
//! blocks the sender once `QUEUED_BATCHES` batches wait.
//!
//! This is no I/O and no runtime: a plain `std` thread, where there are threads. On wasm (Spin,
//! `wasi:http`, Workers) everything stays inline, as it does for small streams: a thread costs
//! tens of microseconds to start, nothing next to hashing 4 MiB (~3 ms).

use std::io;

use bytes::Bytes;

#[cfg(target_family = "wasm")]
pub(crate) use inline::Behind;
#[cfg(not(target_family = "wasm"))]
pub(crate) use threaded::Behind;

#[cfg(not(target_family = "wasm"))]
mod threaded;

/// What a stage does with the bytes, in order.
pub(crate) trait Sink: Send + 'static {
    fn write(&mut self, chunk: &Bytes) -> io::Result<()>;
    /// Called after each batch on the thread (and after each chunk inline).
    fn batch_done(&mut self) {}
}

#[cfg(target_family = "wasm")]
mod inline {
    use std::io;

    use bytes::Bytes;

    use super::Sink;

    /// A stage, on wasm: always inline, there are no threads to start. (The threaded stage
    /// is not even compiled there: with it, rust-lld 22 crashed (SIGSEGV in
    /// `ElemSection::writeBody`) linking the debug wasm32-wasip2 library.)
    pub(crate) struct Behind<S: Sink> {
        sink: S,
    }

    impl<S: Sink> Behind<S> {
        pub(crate) fn new(_name: &'static str, sink: S) -> Self {
            Behind { sink }
        }

        pub(crate) fn push(&mut self, chunk: Bytes) -> io::Result<()> {
            self.sink.write(&chunk)?;
            self.sink.batch_done();
            Ok(())
        }

        pub(crate) fn finish(self) -> io::Result<S> {
            Ok(self.sink)
        }
    }
}
