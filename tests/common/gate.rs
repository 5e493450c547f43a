//! A TCP gate in front of an upstream for the mirror's streaming tests: connections are
//! forwarded, and bytes from the upstream pass only within a budget (all connections
//! together), so a test can hold the upstream part-way through a blob.

#![allow(dead_code)]

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;

/// Forwards connections to the upstream; bytes from the upstream pass only within `budget`
/// (all connections together), so the test decides how much the upstream has "sent".
pub struct Gate {
    budget: AtomicU64,
    sent: AtomicU64,
    changed: Notify,
}

impl Gate {
    pub fn set_budget(&self, b: u64) {
        self.budget.store(b, Ordering::SeqCst);
        self.changed.notify_waiters();
    }

    pub fn open(&self) {
        self.set_budget(u64::MAX);
    }

    pub fn sent(&self) -> u64 {
        self.sent.load(Ordering::SeqCst)
    }
}

pub async fn gate(upstream: std::net::SocketAddr, budget: u64) -> (String, Arc<Gate>) {
    let gate = Arc::new(Gate {
        budget: AtomicU64::new(budget),
        sent: AtomicU64::new(0),
        changed: Notify::new(),
    });
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let g = gate.clone();
    tokio::spawn(async move {
        while let Ok((c, _)) = l.accept().await {
            let g = g.clone();
            tokio::spawn(async move {
                let Ok(u) = TcpStream::connect(upstream).await else {
                    return;
                };
                let (mut cr, mut cw) = c.into_split();
                let (mut ur, mut uw) = u.into_split();
                tokio::spawn(async move {
                    let _ = tokio::io::copy(&mut cr, &mut uw).await;
                    let _ = uw.shutdown().await;
                });
                let mut buf = vec![0u8; 64 * 1024];
                loop {
                    let allowed = loop {
                        let changed = g.changed.notified();
                        let (b, s) = (g.budget.load(Ordering::SeqCst), g.sent());
                        if s < b {
                            break usize::try_from(b - s).unwrap_or(usize::MAX).min(buf.len());
                        }
                        changed.await;
                    };
                    let n = match ur.read(&mut buf[..allowed]).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => n,
                    };
                    g.sent.fetch_add(n as u64, Ordering::SeqCst);
                    if cw.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
                let _ = cw.shutdown().await;
            });
        }
    });
    (format!("http://{addr}"), gate)
}
