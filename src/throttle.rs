//! Brute-force protection: failed password checks (Basic credentials on `/v2/`, logins at
//! `/token`) are counted in the key-value store, so the count holds across instances (on edge
//! hosts every request may land on a fresh one), and past a limit every password check is
//! refused with 429 `TOOMANYREQUESTS` and `Retry-After` until the window passes.
//!
//! Three counts, each one key ([`crate::layout`]), each with its own limit ([`LoginLimits`]):
//!
//! - per user name and client address (tight, default 10): what one source guessing one
//!   account meets first;
//! - per user name from anywhere (looser, default 100): bounds guessing spread over many
//!   addresses;
//! - per client address over every name (default 50): bounds password spraying from one
//!   source.
//!
//! The trade-off (README, "Brute-force protection"): a lockout refuses the right password too
//! (otherwise guessing would go on, only slower), so whoever can fail logins for a name can
//! lock its owner out. The tight count keys on the address, so an attacker locks a user out
//! only from the attacker's own address; locking the user out everywhere takes the looser
//! per-user count, i.e. ten times the failures from at least ten addresses, sustained.
//! Without a known client address (an adapter that cannot tell, see [`ClientAddr`]) the tight
//! count is per user name alone: security wins over availability there.
//!
//! Windows are fixed and stored in the record: a count starts with its first failure and
//! lapses `window` seconds later, so no background job is needed and a lockout never lasts
//! longer than the window. Refused attempts are not counted and cost no password check.
//! Checks run before the password is tried and failures are added after, so guesses already
//! in flight when a limit is reached still count but are not refused: a burst overshoots by
//! at most the checks running at once (natively bounded by `--max-password-checks` and its
//! queue). A successful login deletes its own (user name, address) count, so a user who
//! mistyped starts afresh; the per-user and per-address counts are never reset by a success,
//! since an attacker with an account of their own could otherwise clear them.
//! Every name is counted, whether a user has it or not: a name that never locked would tell
//! which names are users.

use std::net::IpAddr;

use http::{StatusCode, header};
use serde::Deserialize;
use serde_json::json;
use sha2::{Digest as _, Sha256};

use crate::counters::{Update, update};
use crate::error::{Error, ErrorCode, StoreError};
use crate::host::{BlobStore, KeyValue};
use crate::layout;
use crate::registry::Registry;

/// The address of the client, as the adapter saw it (the peer of the connection, or what its
/// platform reports), set as a request extension. Without it, failed logins are counted per
/// user name only. With [`crate::Config::trust_forwarded_for`], the last entry of
/// `X-Forwarded-For` (what the proxy in front appended) is used instead.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientAddr(pub IpAddr);

/// Limits on failed logins. A limit of 0 turns that count off; a window of 0 turns all off.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoginLimits {
    /// Seconds a count lasts from its first failure: also the longest lockout.
    pub window_secs: u64,
    /// Failures of one user name from one client address per window.
    pub per_user_address: u64,
    /// Failures of one user name from every address per window.
    pub per_user: u64,
    /// Failures from one client address, whatever the names, per window.
    pub per_address: u64,
}

impl Default for LoginLimits {
    fn default() -> Self {
        LoginLimits {
            window_secs: 60,
            per_user_address: 10,
            per_user: 100,
            per_address: 50,
        }
    }
}

/// The client's address: with `trust_forwarded_for`, the last parseable entry of the last
/// `X-Forwarded-For` header (a proxy appends the address it saw; earlier entries are whatever
/// the client sent), else the adapter's [`ClientAddr`].
pub(crate) fn client_address(
    parts: &http::request::Parts,
    trust_forwarded_for: bool,
) -> Option<IpAddr> {
    let forwarded = trust_forwarded_for
        .then(|| parts.headers.get_all("x-forwarded-for").iter().next_back())
        .flatten()
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.rsplit(',').next())
        .and_then(parse_addr);
    forwarded.or_else(|| parts.extensions.get::<ClientAddr>().map(|c| c.0))
}

/// An IP address, with or without a port (`1.2.3.4:5`, `[::1]:5`).
pub fn parse_addr(s: &str) -> Option<IpAddr> {
    let s = s.trim();
    s.parse::<IpAddr>()
        .ok()
        .or_else(|| s.parse::<std::net::SocketAddr>().ok().map(|a| a.ip()))
}

/// How an address is counted: IPv4 as is (an IPv4-mapped IPv6 address too), IPv6 by its /64,
/// the block one host usually has (counting single IPv6 addresses would let one host try
/// 2^64 of them).
fn address_key(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => v4.to_string(),
            None => {
                let s = v6.segments();
                std::net::Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0).to_string()
            }
        },
    }
}

#[derive(Deserialize)]
struct Failures {
    start: u64,
    count: u64,
}

/// What [`LoginThrottle::admit`] saw, for [`LoginThrottle::record`].
pub(crate) struct Admitted {
    /// A (user name, address) count is running: a success deletes it.
    own_count: bool,
}

/// The throttle for one request: its store, limits, client address and clock.
pub(crate) struct LoginThrottle<'a, K> {
    kv: &'a K,
    limits: &'a LoginLimits,
    address: Option<String>,
    now: u64,
}

impl<'a, K: KeyValue> LoginThrottle<'a, K> {
    pub(crate) fn new(
        kv: &'a K,
        limits: &'a LoginLimits,
        client: Option<IpAddr>,
        now: u64,
    ) -> Self {
        LoginThrottle {
            kv,
            limits,
            address: client.map(address_key),
            now,
        }
    }

    /// The counts a login for `user` touches: (key, limit), the (user, address) one first.
    fn counts(&self, user: &str) -> Vec<(String, u64)> {
        let l = self.limits;
        if l.window_secs == 0 {
            return Vec::new();
        }
        let user = crate::digest::to_hex(&Sha256::digest(user.as_bytes()));
        let mut out = Vec::new();
        if l.per_user_address > 0 {
            out.push((
                layout::login_failures_user_address(self.address.as_deref(), &user),
                l.per_user_address,
            ));
        }
        if l.per_user > 0 {
            out.push((layout::login_failures_user(&user), l.per_user));
        }
        if let Some(a) = &self.address
            && l.per_address > 0
        {
            out.push((layout::login_failures_address(a), l.per_address));
        }
        out
    }

    /// The running count of a record, if its window has not passed.
    fn live(&self, raw: Option<&[u8]>) -> Option<Failures> {
        let f: Failures = serde_json::from_slice(raw?).ok()?;
        (self.now < f.start.saturating_add(self.limits.window_secs)).then_some(f)
    }

    /// Before a password check for `user`: 429 if any of its counts reached its limit.
    pub(crate) async fn admit(&self, user: &str) -> Result<Admitted, Error> {
        let mut wait = 0;
        let mut own_count = false;
        for (i, (key, limit)) in self.counts(user).into_iter().enumerate() {
            let Some(f) = self.live(self.kv.get(&key).await?.as_deref()) else {
                continue;
            };
            own_count |= i == 0 && self.limits.per_user_address > 0;
            if f.count >= limit {
                let ends = f.start.saturating_add(self.limits.window_secs);
                wait = wait.max(ends - self.now);
            }
        }
        if wait > 0 {
            return Err(Error::new(
                ErrorCode::TooManyRequests,
                StatusCode::TOO_MANY_REQUESTS,
                format!("too many failed logins: no password is checked for {wait} s"),
            )
            .with_header(header::RETRY_AFTER, wait.to_string()));
        }
        Ok(Admitted { own_count })
    }

    /// After a password check for `user`: a failure adds to every count; a success deletes
    /// the (user name, address) count if one was running.
    pub(crate) async fn record(&self, user: &str, ok: bool, seen: Admitted) -> Result<(), Error> {
        let counts = self.counts(user);
        if ok {
            if seen.own_count
                && let Some((key, _)) = counts.first()
            {
                self.kv.delete(key).await?;
            }
            return Ok(());
        }
        for (key, _) in counts {
            let added = update(self.kv, &key, |raw| {
                let (start, count) = match self.live(raw) {
                    Some(f) => (f.start, f.count + 1),
                    None => (self.now, 1),
                };
                Update::Write(json!({"start": start, "count": count}), ())
            })
            .await?;
            if added.is_none() {
                // Many failures racing on one count: this one is lost (the others are not).
                tracing::warn!(
                    key,
                    "a failed login could not be counted: too much contention"
                );
            }
        }
        Ok(())
    }
}

impl<K: KeyValue, B: BlobStore> Registry<K, B> {
    /// Deletes the failed-login counts whose window has passed (they no longer count; this
    /// only frees their keys, e.g. those of names tried once). Returns how many it deleted.
    /// The native server runs it with the stale-upload purge; a count that a failure renews
    /// while this runs may lose that one failure.
    pub async fn purge_login_failures(&self) -> Result<usize, StoreError> {
        let now = crate::auth::now_secs();
        let window = self.config.login_limits.window_secs;
        let mut removed = 0;
        // One listing (see `purge_stale_uploads`).
        for k in self
            .kv
            .list(layout::login_failures_prefix(), None, usize::MAX)
            .await?
        {
            let raw = self.kv.get(&k).await?;
            let live = raw
                .as_deref()
                .and_then(|r| serde_json::from_slice::<Failures>(r).ok())
                .is_some_and(|f| now < f.start.saturating_add(window));
            if !live {
                self.kv.delete(&k).await?;
                removed += 1;
            }
        }
        Ok(removed)
    }
}
