//! The versioned encoding of a lease value.
//!
//! Layout of version 1 (all integers big-endian):
//!
//! | bytes | field |
//! |---|---|
//! | 2 | magic `b"LH"` |
//! | 1 | version, `1` |
//! | 16 | nonce |
//! | 16 | leader id (UUID) |
//! | 8 | fencing token, `0` if the store keeps it elsewhere |
//! | 8 | acquired at, milliseconds since the Unix epoch (holder's clock) |
//! | 2 | metadata length |
//! | n | metadata |
//!
//! A later version may append fields; a decoder of version 1 ignores bytes
//! past the metadata only if the version byte says so.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::{Bytes, BytesMut};

use super::{FencingToken, LeaderId, MAX_METADATA_LEN, Nonce};

const MAGIC: &[u8; 2] = b"LH";
const VERSION: u8 = 1;
const HEADER: usize = 2 + 1 + 16 + 16 + 8 + 8 + 2;

/// A lease as stored: what [`encode`](Self::encode) writes and
/// [`decode`](Self::decode) reads.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeaseValue {
    /// The lease's nonce.
    pub nonce: Nonce,
    /// The holder's id.
    pub id: LeaderId,
    /// The fencing token, when the store keeps it in the value.
    pub token: Option<FencingToken>,
    /// When the holder acquired the lease, by its wall clock (millisecond
    /// precision once encoded).
    pub acquired_at: SystemTime,
    /// The holder's metadata.
    pub metadata: Bytes,
}

/// Why a stored value could not be decoded. The campaign treats such a value
/// as a lease held by someone unknown.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// Not a leaseholder value.
    #[error("not a leaseholder value")]
    NotOurs,
    /// A version this build cannot read.
    #[error("unknown value version {0}")]
    Version(u8),
    /// The value is cut short or its lengths disagree.
    #[error("malformed value")]
    Malformed,
}

impl LeaseValue {
    /// Encodes the value.
    pub fn encode(&self) -> Bytes {
        let meta = &self.metadata[..self.metadata.len().min(MAX_METADATA_LEN)];
        let mut out = BytesMut::with_capacity(HEADER + meta.len());
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&[VERSION]);
        out.extend_from_slice(&self.nonce.as_u128().to_be_bytes());
        out.extend_from_slice(self.id.as_bytes());
        out.extend_from_slice(&self.token.map_or(0, |t| t.get()).to_be_bytes());
        let millis = self
            .acquired_at
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        out.extend_from_slice(&millis.to_be_bytes());
        // `meta` is at most MAX_METADATA_LEN (512) bytes, so it fits in u16.
        out.extend_from_slice(&(meta.len() as u16).to_be_bytes());
        out.extend_from_slice(meta);
        out.freeze()
    }

    /// Decodes a value written by [`encode`](Self::encode).
    pub fn decode(bytes: &[u8]) -> Result<LeaseValue, DecodeError> {
        if bytes.len() < 3 || &bytes[..2] != MAGIC {
            return Err(DecodeError::NotOurs);
        }
        if bytes[2] != VERSION {
            return Err(DecodeError::Version(bytes[2]));
        }
        if bytes.len() < HEADER {
            return Err(DecodeError::Malformed);
        }
        let mut at = 3;
        let mut take = |n: usize| {
            let s = &bytes[at..at + n];
            at += n;
            s
        };
        let nonce = u128::from_be_bytes(array(take(16))?);
        let id = uuid::Uuid::from_bytes(array(take(16))?);
        let token = u64::from_be_bytes(array(take(8))?);
        let millis = u64::from_be_bytes(array(take(8))?);
        let len = usize::from(u16::from_be_bytes(array(take(2))?));
        if bytes.len() != HEADER + len || len > MAX_METADATA_LEN {
            return Err(DecodeError::Malformed);
        }
        Ok(LeaseValue {
            nonce: Nonce::from_u128(nonce),
            id: LeaderId::from(id),
            token: (token != 0).then_some(FencingToken::new(token)),
            acquired_at: UNIX_EPOCH + Duration::from_millis(millis),
            metadata: Bytes::copy_from_slice(&bytes[HEADER..]),
        })
    }
}

fn array<const N: usize>(s: &[u8]) -> Result<[u8; N], DecodeError> {
    s.try_into().map_err(|_| DecodeError::Malformed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample(meta: &[u8]) -> LeaseValue {
        LeaseValue {
            nonce: Nonce::random(),
            id: LeaderId::new(),
            token: Some(FencingToken::new(42)),
            acquired_at: UNIX_EPOCH + Duration::from_millis(1_700_000_000_123),
            metadata: Bytes::copy_from_slice(meta),
        }
    }

    #[test]
    fn round_trip() {
        let v = sample(b"host-a:8080");
        assert_eq!(LeaseValue::decode(&v.encode()), Ok(v));
        let mut none = sample(b"");
        none.token = None;
        assert_eq!(LeaseValue::decode(&none.encode()), Ok(none));
    }

    #[test]
    fn foreign_values_do_not_decode() {
        // noleader stores a bare 16-byte UUID.
        let uuid = uuid::Uuid::new_v4();
        assert_eq!(
            LeaseValue::decode(uuid.as_bytes()),
            Err(DecodeError::NotOurs)
        );
        assert_eq!(LeaseValue::decode(b""), Err(DecodeError::NotOurs));
        assert_eq!(LeaseValue::decode(b"LH\x09"), Err(DecodeError::Version(9)));
        let v = sample(b"abc").encode();
        assert_eq!(
            LeaseValue::decode(&v[..v.len() - 1]),
            Err(DecodeError::Malformed)
        );
    }

    proptest! {
        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..128)) {
            let _ = LeaseValue::decode(&bytes);
            let mut framed = b"LH\x01".to_vec();
            framed.extend_from_slice(&bytes);
            let _ = LeaseValue::decode(&framed);
        }

        #[test]
        fn round_trips(meta in proptest::collection::vec(any::<u8>(), 0..MAX_METADATA_LEN), token in 1u64..) {
            let mut v = sample(&meta);
            v.token = Some(FencingToken::new(token));
            prop_assert_eq!(LeaseValue::decode(&v.encode()), Ok(v));
        }
    }
}
