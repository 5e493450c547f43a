//! The Spin component (spin-sdk 6.0, Spin 4.x): `spin build && spin up` with the `spin.toml`
//! at the repository root.
//!
//! It only translates. Spin's request is already an `http::Request` whose body streams, and
//! the core's response streams back as it is. Spin gives a component a key-value store and no
//! blob store, so blobs are chunked into the key-value store ([`KvBlobs`]).
//!
//! Spin may run a fresh instance per request or serve several requests at once from one
//! instance: nothing here is kept between requests, and there are no globals.

use std::rc::Rc;

use spin_sdk::http::{IntoResponse, Request};
use spin_sdk::key_value::Store;

use crate::error::StoreError;
use crate::host::{KeyValue, page_of};
use crate::kvblobs::KvReader;
use crate::{Body, Config, KvBlobs, Registry};

type Response = http::Response<Body<KvReader<SpinKv>>>;

#[spin_sdk::http_service]
async fn handle(req: Request) -> impl IntoResponse {
    let resp: Response = respond(req).await;
    resp
}

async fn respond(req: Request) -> Response {
    let store = match Store::open_default().await {
        Ok(s) => SpinKv(Rc::new(s)),
        Err(e) => {
            // The registry's error envelope needs a registry; answer in the same shape.
            let body = serde_json::json!({"errors": [{"code": "UNKNOWN",
                "message": format!("cannot open the key-value store \"default\": {e:?}")}]});
            return http::Response::builder()
                .status(500)
                .header("content-type", "application/json")
                .body(Body::full(body.to_string()))
                .expect("a valid response");
        }
    };
    let registry = Registry::new(store.clone(), KvBlobs::new(store), Config::default());
    registry.handle(req).await
}

/// Spin's key-value store as the core's [`KeyValue`]. Cloning shares the store.
#[derive(Clone)]
struct SpinKv(Rc<Store>);

fn store_error(e: spin_sdk::key_value::Error) -> StoreError {
    StoreError::new(format!("spin key-value: {e:?}"))
}

impl KeyValue for SpinKv {
    async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        self.0.get(key).await.map_err(store_error)
    }

    async fn set(&self, key: &str, value: &[u8]) -> Result<(), StoreError> {
        self.0.set(key, value).await.map_err(store_error)
    }

    async fn delete(&self, key: &str) -> Result<(), StoreError> {
        self.0.delete(key).await.map_err(store_error)
    }

    /// Spin lists every key of the store, with no prefix filter and no order: each listing
    /// (a tags list, the catalog, a referrers list) reads all keys, chunk keys included.
    async fn list(
        &self,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<String>, StoreError> {
        let mut keys = self.0.get_keys().await;
        let mut matching = Vec::new();
        while let Some(k) = keys.next().await {
            if k.starts_with(prefix) {
                matching.push(k);
            }
        }
        keys.result().await.map_err(store_error)?;
        Ok(page_of(matching, prefix, after, limit))
    }
}
