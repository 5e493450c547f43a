//! The Cloudflare Worker (workers-rs 0.8, `wasm32-unknown-unknown`): `workers/build.sh` builds
//! it (`cargo build --no-default-features --features workers`, then wasm-bindgen's glue),
//! `wrangler dev` / `wrangler deploy` run it with the `wrangler.toml` at the repository root,
//! through the entry point `workers/entry.mjs`.
//!
//! It only translates. workers-rs hands over the request as an `http::Request` whose body
//! streams, and takes the core's `http::Response` back as it is. Blobs are objects in the R2
//! bucket bound as `BLOBS` ([`R2Blobs`]); keys are in one Durable Object of the class
//! [`RegistryKeys`](crate::hosts::durable::RegistryKeys) bound as `KEYS` ([`DurableKv`], which says why not Workers KV). The core's
//! clock is the platform's (`Date.now()`: `SystemTime` does not work on this target).
//!
//! Settings are the Worker's variables and secrets (`[vars]` in `wrangler.toml`,
//! `wrangler secret put`): the `DOCKSIDE_*` settings of [`Config::from_settings`], and
//! `DOCKSIDE_R2_PREFIX` (a key prefix in the bucket, empty by default). A broken setting answers
//! every request with 500 rather than serve with a configuration nobody asked for.
//!
//! The client address (for the failed-login counts) is Cloudflare's `CF-Connecting-IP`.
//!
//! A body whose length is known (blobs whole or in ranges, manifests) leaves through a
//! `FixedLengthStream`: workerd sends a plain `ReadableStream` chunked, dropping the core's
//! `Content-Length`, which the spec has GET blob answer with (`/work/shared/reference`,
//! "Pulling blobs"; clients check it against the descriptor).

use http_body::Body as _;
use worker::wasm_bindgen::JsValue;
use worker::web_sys;
use worker::{Context, Env, HttpRequest, event};

use crate::hosts::durable::DurableKv;
use crate::hosts::r2::R2Blobs;
use crate::observe::AccessRecord;
use crate::{Body, Config, Registry, RegistryResponse};

/// The name of the one Durable Object that holds every key.
const KEYS_OBJECT: &str = "registry";

#[event(fetch)]
async fn fetch(mut req: HttpRequest, env: Env, _ctx: Context) -> worker::Result<web_sys::Response> {
    crate::clock::set_clock(|| worker::js_sys::Date::now() as u64);
    let start = worker::js_sys::Date::now();
    if let Some(addr) = req
        .headers()
        .get("cf-connecting-ip")
        .and_then(|v| v.to_str().ok())
        .and_then(crate::throttle::parse_addr)
    {
        req.extensions_mut().insert(crate::ClientAddr(addr));
    }
    let (method, path, headers) = (
        req.method().clone(),
        req.uri().path().to_owned(),
        req.headers().clone(),
    );
    let resp = match open(&env) {
        Ok(registry) => registry.handle(req).await,
        Err(msg) => {
            worker::console_error!("dockside: {msg}");
            plain_error(&msg)
        }
    };
    // The access record (route class, status, latency, bytes, failures): one JSON line per
    // request on the Worker's log, its metrics.
    let ms = worker::js_sys::Date::now() - start;
    worker::console_log!(
        "{}",
        AccessRecord::of(&method, &path, &headers, &resp, ms).to_json()
    );
    with_length(resp)
}

/// The response for workerd, its body through a `FixedLengthStream` of the body's exact length
/// when that is known, so that it goes out with `Content-Length` instead of chunked.
fn with_length(resp: RegistryResponse<R2Blobs>) -> worker::Result<web_sys::Response> {
    let length = resp.body().size_hint().exact();
    let js = web_sys::Response::from(worker::Response::try_from(resp)?);
    let (Some(length), Some(body)) = (length, js.body()) else {
        return Ok(js);
    };
    let fixed = if let Ok(small) = u32::try_from(length) {
        worker::worker_sys::FixedLengthStream::new(small)
    } else {
        worker::worker_sys::FixedLengthStream::new_big_int(worker::js_sys::BigInt::from(length))
    }?;
    let piped = body.pipe_to(&fixed.writable());
    // The pipe fails when the source does (an R2 read cut short): the client sees the body end
    // early, and the log says why.
    worker::wasm_bindgen_futures::spawn_local(async move {
        if let Err(e) = worker::wasm_bindgen_futures::JsFuture::from(piped).await {
            worker::console_error!("dockside: response body: {e:?}");
        }
    });
    let init = web_sys::ResponseInit::new();
    init.set_status(js.status());
    init.set_headers(&JsValue::from(js.headers()));
    Ok(web_sys::Response::new_with_opt_readable_stream_and_init(
        Some(&fixed.readable()),
        &init,
    )?)
}

fn open(env: &Env) -> Result<Registry<DurableKv, R2Blobs>, String> {
    let setting = |k: &str| {
        env.var(k)
            .map(|v| v.to_string())
            .or_else(|_| env.secret(k).map(|v| v.to_string()))
            .ok()
            .filter(|v| !v.trim().is_empty())
    };
    let config =
        Config::from_settings(setting).map_err(|e| format!("invalid configuration: {e}"))?;
    let bucket = env
        .bucket("BLOBS")
        .map_err(|e| format!("no R2 bucket bound as BLOBS: {e}"))?;
    let keys = env
        .durable_object("KEYS")
        .map_err(|e| format!("no Durable Object namespace bound as KEYS: {e}"))?;
    let kv = DurableKv::open(&keys, KEYS_OBJECT).map_err(|e| e.to_string())?;
    let prefix = setting("DOCKSIDE_R2_PREFIX").unwrap_or_default();
    Ok(Registry::new(kv, R2Blobs::new(bucket, prefix), config))
}

/// A response built here, for failures before the core runs, in the spec's error envelope.
fn plain_error(msg: &str) -> RegistryResponse<R2Blobs> {
    let mut resp = http::Response::new(Body::full(crate::Error::unknown_json(msg)));
    *resp.status_mut() = http::StatusCode::INTERNAL_SERVER_ERROR;
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    resp
}
