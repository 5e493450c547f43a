//! The one error type of the core, and how it becomes an HTTP response.
//!
//! Client mistakes carry the spec's error code (distribution-spec, "Error Codes"), an HTTP status
//! and a message that says what to fix. Storage failures are 500s with an opaque message: the
//! detail goes to the log, never to the client.

use http::StatusCode;
use serde_json::Value;

/// A failure of a host store (key-value or blob). Opaque to clients: they see the status of
/// its [`StoreErrorKind`] and a generic message; the detail goes to the log.
#[derive(Debug, Clone, thiserror::Error)]
#[error("storage error: {message}")]
pub struct StoreError {
    pub message: String,
    pub kind: StoreErrorKind,
}

/// What kind of storage failure, for the status a client gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreErrorKind {
    /// Anything else: 500.
    Other,
    /// The store cannot be reached, times out, or throttles: 503 with `Retry-After`, since
    /// trying again later may well work.
    Unavailable,
    /// The store is out of space: 507.
    Full,
}

impl StoreError {
    pub fn new(msg: impl Into<String>) -> Self {
        StoreError {
            message: msg.into(),
            kind: StoreErrorKind::Other,
        }
    }

    /// A store that cannot be reached, timed out or throttled (answered 503).
    pub fn unavailable(msg: impl Into<String>) -> Self {
        StoreError {
            message: msg.into(),
            kind: StoreErrorKind::Unavailable,
        }
    }
}

impl From<std::io::Error> for StoreError {
    fn from(e: std::io::Error) -> Self {
        let kind = match e.kind() {
            std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded => {
                StoreErrorKind::Full
            }
            std::io::ErrorKind::TimedOut => StoreErrorKind::Unavailable,
            _ => StoreErrorKind::Other,
        };
        StoreError {
            message: e.to_string(),
            kind,
        }
    }
}

/// The error codes of the distribution spec (`code-1` .. `code-14`), plus the legacy `TAG_INVALID`
/// the spec allows clients to meet, and `UNKNOWN` for server-side failures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    BlobUnknown,
    BlobUploadInvalid,
    BlobUploadUnknown,
    DigestInvalid,
    ManifestBlobUnknown,
    ManifestInvalid,
    ManifestUnknown,
    NameInvalid,
    NameUnknown,
    SizeInvalid,
    Unauthorized,
    Denied,
    Unsupported,
    TooManyRequests,
    TagInvalid,
    Unknown,
}

impl ErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BlobUnknown => "BLOB_UNKNOWN",
            ErrorCode::BlobUploadInvalid => "BLOB_UPLOAD_INVALID",
            ErrorCode::BlobUploadUnknown => "BLOB_UPLOAD_UNKNOWN",
            ErrorCode::DigestInvalid => "DIGEST_INVALID",
            ErrorCode::ManifestBlobUnknown => "MANIFEST_BLOB_UNKNOWN",
            ErrorCode::ManifestInvalid => "MANIFEST_INVALID",
            ErrorCode::ManifestUnknown => "MANIFEST_UNKNOWN",
            ErrorCode::NameInvalid => "NAME_INVALID",
            ErrorCode::NameUnknown => "NAME_UNKNOWN",
            ErrorCode::SizeInvalid => "SIZE_INVALID",
            ErrorCode::Unauthorized => "UNAUTHORIZED",
            ErrorCode::Denied => "DENIED",
            ErrorCode::Unsupported => "UNSUPPORTED",
            ErrorCode::TooManyRequests => "TOOMANYREQUESTS",
            ErrorCode::TagInvalid => "TAG_INVALID",
            ErrorCode::Unknown => "UNKNOWN",
        }
    }
}

/// A failed request: a spec error code, the HTTP status to answer with, a message for the
/// client, optional JSON detail, and extra headers (e.g. `Range` on a 416 during an upload).
#[derive(Debug, Clone, thiserror::Error)]
#[error("{status} {}: {message}", code.as_str())]
pub struct Error {
    pub code: ErrorCode,
    pub status: StatusCode,
    pub message: String,
    pub detail: Option<Value>,
    pub headers: Vec<(http::HeaderName, String)>,
}

impl Error {
    pub fn new(code: ErrorCode, status: StatusCode, message: impl Into<String>) -> Self {
        Error {
            code,
            status,
            message: message.into(),
            detail: None,
            headers: Vec::new(),
        }
    }

    pub fn with_detail(mut self, detail: Value) -> Self {
        self.detail = Some(detail);
        self
    }

    pub fn with_header(mut self, name: http::HeaderName, value: impl Into<String>) -> Self {
        self.headers.push((name, value.into()));
        self
    }

    pub(crate) fn bad_request(code: ErrorCode, message: impl Into<String>) -> Self {
        Error::new(code, StatusCode::BAD_REQUEST, message)
    }

    pub(crate) fn not_found(code: ErrorCode, message: impl Into<String>) -> Self {
        Error::new(code, StatusCode::NOT_FOUND, message)
    }

    /// The JSON envelope of the spec: `{"errors":[{"code","message","detail"}]}`.
    /// The envelope of an `UNKNOWN` error with `message`: what the adapters answer when a
    /// request fails before the core runs (a store that cannot be opened, a bad setting).
    pub fn unknown_json(message: impl Into<String>) -> Vec<u8> {
        Error::new(
            ErrorCode::Unknown,
            StatusCode::INTERNAL_SERVER_ERROR,
            message,
        )
        .to_json()
    }

    pub fn to_json(&self) -> Vec<u8> {
        let mut entry = serde_json::json!({
            "code": self.code.as_str(),
            "message": self.message,
        });
        if let Some(d) = &self.detail {
            entry["detail"] = d.clone();
        }
        serde_json::to_vec(&serde_json::json!({ "errors": [entry] }))
            .expect("a JSON value always serializes")
    }
}

impl From<StoreError> for Error {
    fn from(e: StoreError) -> Self {
        // The detail is logged here, once, and kept from the client.
        tracing::error!(error = %e.message, kind = ?e.kind, "storage failure");
        match e.kind {
            StoreErrorKind::Other => Error::new(
                ErrorCode::Unknown,
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal storage error",
            ),
            StoreErrorKind::Unavailable => Error::new(
                ErrorCode::Unknown,
                StatusCode::SERVICE_UNAVAILABLE,
                "storage is unavailable; try again later",
            )
            .with_header(http::header::RETRY_AFTER, "5"),
            StoreErrorKind::Full => Error::new(
                ErrorCode::Unknown,
                StatusCode::INSUFFICIENT_STORAGE,
                "storage is full",
            ),
        }
    }
}
