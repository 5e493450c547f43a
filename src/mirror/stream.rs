//! Streaming a blob to the first client while it is fetched from upstream and written to the
//! store (docs/DESIGN.md, "Mirror: streaming a blob while it is fetched").
//!
//! The core has no task of its own, and a response body built in generic code cannot be
//! proven `Send` (the store's write future is an opaque `impl Future`), so the request's own
//! future keeps driving the fetch: it hands the adapter an early response whose body is a
//! bounded [`PipeBody`], then runs the store write with a [`Tee`] source that copies each chunk
//! into the pipe. The adapter, which knows the concrete stores, runs that future to its end
//! (natively it already runs each request as a task). The client therefore pulls at the pace
//! of the upstream, the store and itself (the pipe holds at most [`PIPE_BYTES`]).
//!
//! The last chunk is held back until the digest is checked and the blob is committed: a blob
//! that fails verification ends the client's body with an error (the transfer aborts, never a
//! clean end), and a client that saw the whole body finds the blob stored.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::{Pin, pin};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Frame, SizeHint};

use crate::body::{Hashing, ReadError};
use crate::error::StoreError;
use crate::host::{ByteSource, KeyValue};
use crate::mirror::upstream::{UpBody, UpstreamClient};

/// At most this many bytes wait between the store write and a slow client.
const PIPE_BYTES: usize = 4 << 20;

/// Lets the core answer a request before its future ends: the adapter inserts one in the
/// request's extensions with what to do with the response (send it to the client), and keeps
/// running the request's future after it fired. Adapters that insert none get the whole
/// response at the end, as for any other request (the first client of a mirrored blob then
/// waits until it is fetched and verified).
#[derive(Clone)]
pub struct EarlyResponse(Arc<Mutex<Option<Deliver>>>);

type Deliver = Box<dyn FnOnce(http::Response<PipeBody>) + Send>;

impl EarlyResponse {
    pub fn new(deliver: impl FnOnce(http::Response<PipeBody>) + Send + 'static) -> Self {
        EarlyResponse(Arc::new(Mutex::new(Some(Box::new(deliver)))))
    }

    /// Hands `resp` over; false if a response was already handed over.
    pub(crate) fn deliver(&self, resp: http::Response<PipeBody>) -> bool {
        let f = lock(&self.0).take();
        match f {
            Some(f) => {
                f(resp);
                true
            }
            None => false,
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

struct State {
    queue: VecDeque<Bytes>,
    queued: usize,
    /// Set by the sender: a clean end, or why the transfer is aborted.
    end: Option<Result<(), String>>,
    receiver_gone: bool,
    rx_waker: Option<Waker>,
    tx_waker: Option<Waker>,
}

/// The body of an early response: bytes the fetch passes on, ending with an error (so the
/// adapter breaks the connection or resets the stream) unless the fetch committed the blob.
pub struct PipeBody {
    state: Arc<Mutex<State>>,
    len: Option<u64>,
}

/// The fetch's end of the pipe. Dropped without [`PipeSender::finish`], it aborts the body.
pub(crate) struct PipeSender {
    state: Arc<Mutex<State>>,
}

pub(crate) fn pipe(len: Option<u64>) -> (PipeSender, PipeBody) {
    let state = Arc::new(Mutex::new(State {
        queue: VecDeque::new(),
        queued: 0,
        end: None,
        receiver_gone: false,
        rx_waker: None,
        tx_waker: None,
    }));
    (
        PipeSender {
            state: state.clone(),
        },
        PipeBody { state, len },
    )
}

impl PipeSender {
    /// Queues `b` once there is room; false when the client has gone away.
    pub(crate) async fn send(&self, b: Bytes) -> bool {
        let mut b = Some(b);
        std::future::poll_fn(|cx| {
            let mut s = lock(&self.state);
            if s.receiver_gone {
                return Poll::Ready(false);
            }
            if s.queued >= PIPE_BYTES {
                s.tx_waker = Some(cx.waker().clone());
                return Poll::Pending;
            }
            let b = b.take().expect("polled after ready");
            s.queued += b.len();
            s.queue.push_back(b);
            let w = s.rx_waker.take();
            drop(s);
            if let Some(w) = w {
                w.wake();
            }
            Poll::Ready(true)
        })
        .await
    }

    /// Ends the body cleanly (after the blob was verified and committed).
    pub(crate) fn finish(self) {
        self.end(Ok(()));
    }

    pub(crate) fn abort(self, why: impl Into<String>) {
        self.end(Err(why.into()));
    }

    fn end(&self, r: Result<(), String>) {
        let mut s = lock(&self.state);
        if s.end.is_none() {
            s.end = Some(r);
        }
        let w = s.rx_waker.take();
        drop(s);
        if let Some(w) = w {
            w.wake();
        }
    }
}

impl Drop for PipeSender {
    fn drop(&mut self) {
        self.end(Err("the upstream fetch was abandoned".to_owned()));
    }
}

impl http_body::Body for PipeBody {
    type Data = Bytes;
    type Error = StoreError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, StoreError>>> {
        let mut s = lock(&self.state);
        if let Some(b) = s.queue.pop_front() {
            s.queued -= b.len();
            let w = s.tx_waker.take();
            drop(s);
            if let Some(w) = w {
                w.wake();
            }
            return Poll::Ready(Some(Ok(Frame::data(b))));
        }
        match &s.end {
            Some(Ok(())) => Poll::Ready(None),
            Some(Err(why)) => Poll::Ready(Some(Err(StoreError::unavailable(why.clone())))),
            None => {
                s.rx_waker = Some(cx.waker().clone());
                Poll::Pending
            }
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self.len {
            Some(n) => SizeHint::with_exact(n),
            None => SizeHint::default(),
        }
    }
}

impl Drop for PipeBody {
    fn drop(&mut self) {
        let mut s = lock(&self.state);
        s.receiver_gone = true;
        s.queue.clear();
        let w = s.tx_waker.take();
        drop(s);
        if let Some(w) = w {
            w.wake();
        }
    }
}

/// A fetch's lease on a digest (`layout::mirror_lease`), renewed while the fetch runs so that
/// a fetch longer than `lease_secs` keeps it: a third of the way through each term, by
/// compare-and-swap from the value last written (a lease lost meanwhile is not taken back).
pub(crate) struct LeaseKeeper<'a, K> {
    pub kv: &'a K,
    pub key: String,
    pub owner: String,
    pub current: Vec<u8>,
    pub lease_secs: u64,
    pub renew_at: u64,
    pub lost: bool,
}

impl<K: KeyValue> LeaseKeeper<'_, K> {
    pub(crate) fn value(owner: &str, expires: u64) -> Vec<u8> {
        serde_json::to_vec(&serde_json::json!({ "owner": owner, "expires": expires }))
            .expect("serializes")
    }

    pub(crate) fn renew_after(lease_secs: u64, now: u64) -> u64 {
        now + (lease_secs / 3).max(1)
    }

    async fn renew_if_due(&mut self) {
        let now = crate::auth::now_secs();
        if self.lost || now < self.renew_at {
            return;
        }
        let next = Self::value(&self.owner, now + self.lease_secs);
        match self
            .kv
            .compare_and_swap(&self.key, Some(&self.current), &next)
            .await
        {
            Ok(true) => {
                self.current = next;
                self.renew_at = Self::renew_after(self.lease_secs, now);
            }
            Ok(false) => {
                // Expired and taken by another fetcher: both write the same verified bytes,
                // so this one goes on; only the extra upstream transfer is lost.
                tracing::warn!(key = %self.key, "mirror lease lost during a fetch; another fetch may run");
                self.lost = true;
            }
            Err(e) => {
                tracing::warn!(key = %self.key, error = %e.message, "renewing a mirror lease failed");
                self.renew_at = now + 1;
            }
        }
    }
}

/// The upstream body as the store write's source: hashed and counted ([`Hashing`]), the
/// lease renewed as it goes (also while the upstream or the client stalls), and each chunk
/// passed on to the client's pipe one chunk late (the last is released only once the blob is
/// verified and stored).
pub(crate) struct Tee<'a, K> {
    pub src: Hashing<UpBody>,
    pub pipe: Option<PipeSender>,
    pub held: Option<Bytes>,
    pub lease: LeaseKeeper<'a, K>,
    pub timer: &'a dyn UpstreamClient,
}

impl<K: KeyValue> ByteSource for Tee<'_, K> {
    type Error = ReadError;

    async fn next_chunk(&mut self) -> Option<Result<Bytes, ReadError>> {
        let Tee {
            src,
            pipe,
            held,
            lease,
            timer,
        } = self;
        let chunk = renewing(lease, *timer, src.next_chunk()).await;
        if let (Some(Ok(b)), Some(pipe)) = (&chunk, &*pipe)
            && let Some(prev) = held.replace(b.clone())
            && !renewing(lease, *timer, pipe.send(prev)).await
        {
            // The client went away: the fetch is abandoned (the write fails and cleans up,
            // the lease is released; the next client starts again).
            return Some(Err(ReadError::Body("the client went away".to_owned())));
        }
        chunk
    }
}

/// Awaits `f`, renewing `lease` whenever it falls due meanwhile (natively; on wasm32 only
/// before it).
async fn renewing<K: KeyValue, F: Future>(
    lease: &mut LeaseKeeper<'_, K>,
    timer: &dyn UpstreamClient,
    f: F,
) -> F::Output {
    // The wasi:http component's executor slowed a streamed fetch 80-fold with a timer in every
    // poll (measured: 32 MiB in 41 s against 0.5 s), so the components renew between chunks
    // only: a stall longer than `lease_secs` there lets another instance fetch too.
    if cfg!(target_arch = "wasm32") {
        lease.renew_if_due().await;
        return f.await;
    }
    let mut f = pin!(f);
    loop {
        lease.renew_if_due().await;
        if lease.lost {
            return f.await;
        }
        let wait = lease
            .renew_at
            .saturating_sub(crate::auth::now_secs())
            .max(1);
        let mut nap = timer.sleep_boxed(Duration::from_secs(wait));
        let mut fp = f.as_mut();
        let woke = std::future::poll_fn(|cx| {
            if let Poll::Ready(v) = fp.as_mut().poll(cx) {
                return Poll::Ready(Some(v));
            }
            nap.as_mut().poll(cx).map(|()| None)
        })
        .await;
        match woke {
            Some(v) => return v,
            // A host whose timer returns at once would spin here: then no renewals.
            None if crate::auth::now_secs() < lease.renew_at => return f.await,
            None => {}
        }
    }
}

/// What is left to send once the blob is committed.
pub(crate) struct Finish {
    pub pipe: PipeSender,
    pub last: Option<Bytes>,
}

impl Finish {
    pub(crate) async fn finish(self) {
        if let Some(b) = self.last
            && !self.pipe.send(b).await
        {
            return;
        }
        self.pipe.finish();
    }
}
