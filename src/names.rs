//! Validated repository names, tags and upload ids. Storage keys are only ever built from these
//! types (see [`crate::layout`]), so no string from a request reaches a key or a path unchecked.

use std::fmt;

use crate::error::{Error, ErrorCode};

/// A repository name matching the spec's grammar (distribution-spec, "Pulling manifests"):
/// `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*(\/[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*)*`.
///
/// Because no component can start with `_`, the `_layers`, `_manifests`... key segments of the
/// storage layout can never collide with a name.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RepoName(String);

/// Longest component (between two `/`) of a repository name.
pub const MAX_COMPONENT: usize = 200;

impl RepoName {
    pub fn parse(s: &str, max_len: usize) -> Result<Self, Error> {
        let invalid = |why: String| {
            Error::bad_request(
                ErrorCode::NameInvalid,
                format!(
                    "invalid repository name {:?}: {why}",
                    s.chars().take(300).collect::<String>()
                ),
            )
        };
        if s.is_empty() {
            return Err(invalid("empty".into()));
        }
        if s.len() > max_len {
            return Err(invalid(format!("longer than {max_len} characters")));
        }
        for component in s.split('/') {
            // Each component becomes a file or directory name in the directory host, where
            // names are limited to 255 bytes; nobody needs a component near that long.
            if component.len() > MAX_COMPONENT {
                return Err(invalid(format!(
                    "a path component is longer than {MAX_COMPONENT} characters"
                )));
            }
            if !valid_component(component) {
                return Err(invalid(format!(
                    "component {component:?} must be lowercase letters and digits, \
                     separated by '.', '_', '__' or dashes"
                )));
            }
        }
        Ok(RepoName(s.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

fn valid_component(c: &str) -> bool {
    let b = c.as_bytes();
    let alnum = |x: u8| x.is_ascii_lowercase() || x.is_ascii_digit();
    if b.is_empty() || !alnum(b[0]) || !alnum(b[b.len() - 1]) {
        return false;
    }
    let mut i = 0;
    while i < b.len() {
        if alnum(b[i]) {
            i += 1;
            continue;
        }
        // A separator run: ".", "_", "__" or one or more "-".
        let start = i;
        while i < b.len() && !alnum(b[i]) {
            i += 1;
        }
        let sep = &c[start..i];
        let ok = sep == "." || sep == "_" || sep == "__" || sep.bytes().all(|x| x == b'-');
        if !ok {
            return false;
        }
    }
    true
}

impl fmt::Display for RepoName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A tag: `[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Tag(String);

impl Tag {
    pub fn parse(s: &str) -> Result<Self, Error> {
        let b = s.as_bytes();
        let ok = !b.is_empty()
            && b.len() <= 128
            && (b[0].is_ascii_alphanumeric() || b[0] == b'_')
            && b[1..]
                .iter()
                .all(|&x| x.is_ascii_alphanumeric() || matches!(x, b'.' | b'_' | b'-'));
        if ok {
            Ok(Tag(s.to_owned()))
        } else {
            Err(Error::bad_request(
                ErrorCode::TagInvalid,
                format!(
                    "invalid tag {:?}: at most 128 of [A-Za-z0-9_.-], not starting with '.' or '-'",
                    s.chars().take(160).collect::<String>()
                ),
            ))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Tag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// An upload session id: a random UUID (v4) in its lowercase 36-character form.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct UploadId(String);

impl UploadId {
    /// A fresh random id. Randomness comes from the host (`getrandom`: the OS natively,
    /// `wasi:random` on wasm32-wasip2).
    pub fn random() -> Result<Self, crate::error::StoreError> {
        let mut b = [0u8; 16];
        getrandom::fill(&mut b)
            .map_err(|e| crate::error::StoreError::new(format!("no randomness: {e}")))?;
        b[6] = (b[6] & 0x0f) | 0x40;
        b[8] = (b[8] & 0x3f) | 0x80;
        let h = crate::digest::to_hex(&b);
        Ok(UploadId(format!(
            "{}-{}-{}-{}-{}",
            &h[0..8],
            &h[8..12],
            &h[12..16],
            &h[16..20],
            &h[20..32]
        )))
    }

    /// Parses an id from a URL. Anything that is not one of our ids is `BLOB_UPLOAD_UNKNOWN`.
    pub fn parse(s: &str) -> Result<Self, Error> {
        let ok = s.len() == 36
            && s.bytes().enumerate().all(|(i, c)| match i {
                8 | 13 | 18 | 23 => c == b'-',
                _ => matches!(c, b'0'..=b'9' | b'a'..=b'f'),
            });
        if ok {
            Ok(UploadId(s.to_owned()))
        } else {
            Err(Error::not_found(
                ErrorCode::BlobUploadUnknown,
                "unknown upload session",
            ))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for UploadId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for good in [
            "a",
            "library/ubuntu",
            "a.b_c__d---e/f0",
            "x/y/z",
            "0",
            "my-org/my_repo",
        ] {
            assert!(RepoName::parse(good, 255).is_ok(), "{good}");
        }
        for bad in [
            "",
            "A",
            "a/",
            "/a",
            "a//b",
            "a..b",
            "a___b",
            "_a",
            "a_",
            "a/_layers",
            "a/../b",
            "..",
            "a b",
            "a.-b",
        ] {
            assert!(RepoName::parse(bad, 255).is_err(), "{bad}");
        }
        assert!(RepoName::parse(&"a".repeat(256), 255).is_err());
        assert!(RepoName::parse(&"a".repeat(201), 255).is_err());
        assert!(RepoName::parse(&format!("{}/{}", "a".repeat(200), "b".repeat(54)), 255).is_ok());
    }

    #[test]
    fn tags() {
        for good in ["latest", "v1.0.0", "_x", "A-b_c.d", &"a".repeat(128)] {
            assert!(Tag::parse(good).is_ok(), "{good}");
        }
        for bad in ["", ".x", "-x", "a/b", "a:b", &"a".repeat(129), "sha256:abc"] {
            assert!(Tag::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn upload_ids() {
        let id = UploadId::random().unwrap();
        assert_eq!(UploadId::parse(id.as_str()).unwrap(), id);
        assert!(UploadId::parse("../../etc").is_err());
        assert!(UploadId::parse(&id.as_str().to_uppercase()).is_err());
    }
}
