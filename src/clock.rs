//! The wall clock, the one place the core reads the time (upload expiry, token lifetimes,
//! failed-login windows).
//!
//! The core owns no clock of its own: natively and on wasm32-wasip2 it asks `SystemTime`, but on
//! `wasm32-unknown-unknown` (Cloudflare Workers) `SystemTime::now()` panics, so the adapter
//! there installs the platform's clock (`Date.now()`) with [`set_clock`] before the first request.

use std::sync::OnceLock;

static CLOCK: OnceLock<fn() -> u64> = OnceLock::new();

/// Makes `millis_since_epoch` the core's clock, for platforms where `SystemTime` does not work.
/// The first call wins; later calls are ignored (a platform has one clock).
pub fn set_clock(millis_since_epoch: fn() -> u64) {
    let _ = CLOCK.set(millis_since_epoch);
}

/// Milliseconds since the Unix epoch.
pub(crate) fn now_millis() -> u64 {
    match CLOCK.get() {
        Some(clock) => clock(),
        None => std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64),
    }
}

/// Seconds since the Unix epoch.
pub(crate) fn now_secs() -> u64 {
    now_millis() / 1000
}
