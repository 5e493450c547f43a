//! Request helpers shared by the router and access control: query strings, percent-decoding,
//! header values. A module of its own so that `registry` and `auth` need not import each other.

use http::{HeaderMap, header};

use crate::error::{Error, ErrorCode};

pub(crate) type Result<T> = std::result::Result<T, Error>;

/// Decodes `%XX` escapes (a client may send `sha256%3A...`). Invalid escapes stay as they are,
/// and then fail validation.
pub(crate) fn percent_decode(s: &str) -> String {
    if !s.contains('%') {
        return s.to_owned();
    }
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && let Some(v) = s
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
        {
            out.push(v);
            i += 3;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Query parameters, decoded as Go's `url.ParseQuery` does (`+` is a space), since clients
/// written in Go encode them that way.
pub(crate) struct Query(pub(crate) Vec<(String, String)>);

impl Query {
    pub(crate) fn parse(q: &str) -> Self {
        Query(
            q.split('&')
                .filter(|p| !p.is_empty())
                .map(|p| {
                    let (k, v) = p.split_once('=').unwrap_or((p, ""));
                    (
                        percent_decode(&k.replace('+', " ")),
                        percent_decode(&v.replace('+', " ")),
                    )
                })
                .collect(),
        )
    }

    pub(crate) fn get(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    pub(crate) fn all(&self, key: &str) -> impl Iterator<Item = &str> {
        self.0
            .iter()
            .filter(move |(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

/// Percent-encodes a query value for a `Link` header.
pub(crate) fn query_escape(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

pub(crate) fn header_str(h: &HeaderMap, name: impl header::AsHeaderName) -> Option<&str> {
    h.get(name).and_then(|v| v.to_str().ok()).map(str::trim)
}

/// The request's `Content-Length`, if it sent a valid one.
pub(crate) fn content_length(h: &HeaderMap) -> Result<Option<u64>> {
    match header_str(h, header::CONTENT_LENGTH) {
        None => Ok(None),
        Some(v) => v.parse().map(Some).map_err(|_| {
            Error::bad_request(ErrorCode::SizeInvalid, "Content-Length is not a number")
        }),
    }
}
