//! Where the core's `tracing` events go in the components: one JSON line each on stderr, which
//! Spin writes to its component log (`.spin/logs/<component>_stderr.txt`) and `wasmtime serve`
//! to its own stderr. Without a subscriber they were dropped, and with them the one place a
//! storage failure's detail is kept (the client only sees "internal storage error").
//!
//! Hand-written rather than `tracing-subscriber`'s: events are few (warnings and errors), spans
//! are not used by the core, and the component stays small.

use std::fmt;
use std::sync::Once;

use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Level, Metadata, Subscriber};

/// Installs the subscriber once per instance (each request may be a fresh instance).
pub(crate) fn install() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // Fails only if another subscriber was installed first, which then gets the events.
        let _ = tracing::subscriber::set_global_default(StderrJson);
    });
}

struct StderrJson;

impl Subscriber for StderrJson {
    fn enabled(&self, meta: &Metadata<'_>) -> bool {
        // INFO, WARN and ERROR (tracing orders levels by verbosity: ERROR is the smallest).
        *meta.level() <= Level::INFO
    }

    fn new_span(&self, _: &Attributes<'_>) -> Id {
        Id::from_u64(1)
    }

    fn record(&self, _: &Id, _: &Record<'_>) {}

    fn record_follows_from(&self, _: &Id, _: &Id) {}

    fn event(&self, event: &Event<'_>) {
        let meta = event.metadata();
        let mut fields = Fields(serde_json::Map::new());
        fields
            .0
            .insert("level".into(), meta.level().as_str().into());
        fields.0.insert("target".into(), meta.target().into());
        event.record(&mut fields);
        eprintln!("{}", serde_json::Value::Object(fields.0));
    }

    fn enter(&self, _: &Id) {}

    fn exit(&self, _: &Id) {}
}

/// An event's fields (`message` among them) as JSON members.
struct Fields(serde_json::Map<String, serde_json::Value>);

impl Visit for Fields {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().into(), value.into());
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.0.insert(field.name().into(), value.into());
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.0.insert(field.name().into(), value.into());
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.0.insert(field.name().into(), value.into());
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.0
            .insert(field.name().into(), format!("{value:?}").into());
    }
}
