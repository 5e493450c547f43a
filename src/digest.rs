//! Content digests (image-spec `descriptor.md`, "Digests"), and a hasher whose running state can
//! be saved to the key-value store between two requests of a chunked upload.

use std::fmt;

use sha2::digest::common::hazmat::SerializableState;
use sha2::{Digest as _, Sha256, Sha512};

use crate::error::{Error, ErrorCode};

/// The digest algorithms dockside verifies. Any other algorithm is answered with 400
/// `DIGEST_INVALID` (distribution-spec, "Pushing blobs": unsupported algorithms SHOULD be 400).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Algorithm {
    Sha256,
    Sha512,
}

impl Algorithm {
    pub fn as_str(self) -> &'static str {
        match self {
            Algorithm::Sha256 => "sha256",
            Algorithm::Sha512 => "sha512",
        }
    }

    fn hex_len(self) -> usize {
        match self {
            Algorithm::Sha256 => 64,
            Algorithm::Sha512 => 128,
        }
    }

    pub fn parse(s: &str) -> Result<Self, Error> {
        match s {
            "sha256" => Ok(Algorithm::Sha256),
            "sha512" => Ok(Algorithm::Sha512),
            other => Err(Error::bad_request(
                ErrorCode::DigestInvalid,
                format!("unsupported digest algorithm {other:?}: use sha256 or sha512"),
            )),
        }
    }
}

/// A parsed, validated digest: `<algorithm>:<lowercase hex>`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Digest {
    alg: Algorithm,
    hex: String,
}

impl Digest {
    /// Parses and validates a digest string. Anything malformed or of an unsupported algorithm
    /// is 400 `DIGEST_INVALID`.
    pub fn parse(s: &str) -> Result<Self, Error> {
        let invalid = |why: &str| {
            Error::bad_request(
                ErrorCode::DigestInvalid,
                format!("invalid digest {:?}: {why}", truncate(s)),
            )
        };
        let (alg, hex) = s
            .split_once(':')
            .ok_or_else(|| invalid("expected <algorithm>:<hex>"))?;
        let alg = Algorithm::parse(alg)?;
        if hex.len() != alg.hex_len() {
            return Err(invalid(&format!(
                "{} digests have {} hex characters",
                alg.as_str(),
                alg.hex_len()
            )));
        }
        if !hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            return Err(invalid("the encoded part must be lowercase hex"));
        }
        Ok(Digest {
            alg,
            hex: hex.to_owned(),
        })
    }

    pub fn algorithm(&self) -> Algorithm {
        self.alg
    }

    pub fn hex(&self) -> &str {
        &self.hex
    }

    /// The digest of `data` under `alg`.
    pub fn of(alg: Algorithm, data: &[u8]) -> Self {
        let mut h = Hasher::new(alg);
        h.update(data);
        h.finish()
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.alg.as_str(), self.hex)
    }
}

fn truncate(s: &str) -> String {
    s.chars().take(160).collect()
}

/// A running SHA-256 or SHA-512 whose state serializes (sha2 0.11 `SerializableState`), so an
/// upload can continue on another instance: the state rides in the upload record.
#[derive(Clone)]
pub enum Hasher {
    Sha256(Sha256),
    Sha512(Sha512),
}

impl Hasher {
    pub fn new(alg: Algorithm) -> Self {
        match alg {
            Algorithm::Sha256 => Hasher::Sha256(Sha256::new()),
            Algorithm::Sha512 => Hasher::Sha512(Sha512::new()),
        }
    }

    pub fn update(&mut self, data: &[u8]) {
        match self {
            Hasher::Sha256(h) => h.update(data),
            Hasher::Sha512(h) => h.update(data),
        }
    }

    pub fn finish(self) -> Digest {
        let (alg, bytes) = match self {
            Hasher::Sha256(h) => (Algorithm::Sha256, h.finalize().to_vec()),
            Hasher::Sha512(h) => (Algorithm::Sha512, h.finalize().to_vec()),
        };
        Digest {
            alg,
            hex: to_hex(&bytes),
        }
    }

    /// The running state as lowercase hex.
    pub fn save(&self) -> String {
        match self {
            Hasher::Sha256(h) => to_hex(&h.serialize()),
            Hasher::Sha512(h) => to_hex(&h.serialize()),
        }
    }

    /// Restores a state written by [`Hasher::save`]; `None` if it is corrupt.
    pub fn restore(alg: Algorithm, state: &str) -> Option<Self> {
        let bytes = from_hex(state)?;
        Some(match alg {
            Algorithm::Sha256 => {
                let arr = bytes.as_slice().try_into().ok()?;
                Hasher::Sha256(Sha256::deserialize(arr).ok()?)
            }
            Algorithm::Sha512 => {
                let arr = bytes.as_slice().try_into().ok()?;
                Hasher::Sha512(Sha512::deserialize(arr).ok()?)
            }
        })
    }
}

pub(crate) fn to_hex(bytes: &[u8]) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(HEX[(b >> 4) as usize] as char);
        s.push(HEX[(b & 15) as usize] as char);
    }
    s
}

fn from_hex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    let nib = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    };
    s.as_bytes()
        .chunks(2)
        .map(|p| Some(nib(p[0])? << 4 | nib(p[1])?))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_rejects() {
        let d = Digest::parse(
            "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
        )
        .unwrap();
        assert_eq!(d, Digest::of(Algorithm::Sha256, b""));
        for bad in [
            "",
            "sha256",
            "sha256:",
            "md5:d41d8cd98f00b204e9800998ecf8427e",
            "sha256:E3B0C44298FC1C149AFBF4C8996FB92427AE41E4649B934CA495991B7852B855",
            "sha256:e3b0",
            "sha256:../../../../etc/passwd",
        ] {
            assert!(Digest::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn state_round_trips_mid_stream() {
        for alg in [Algorithm::Sha256, Algorithm::Sha512] {
            let mut h = Hasher::new(alg);
            h.update(b"hello ");
            let saved = h.save();
            let mut h2 = Hasher::restore(alg, &saved).unwrap();
            h2.update(b"world");
            assert_eq!(h2.finish(), Digest::of(alg, b"hello world"));
            assert!(Hasher::restore(alg, "zz").is_none());
            assert!(Hasher::restore(alg, &saved[2..]).is_none());
        }
    }
}
