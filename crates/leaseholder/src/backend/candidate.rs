//! The candidate registry: who campaigns for a key, with what priority.
//!
//! Every campaigning [`Leader`](crate::Leader) (unless built with
//! `.registry(false)`) keeps one entry per key in the store, beside the
//! lease: its id, priority, metadata and since when it campaigns. The entry
//! lives for the lease's ttl by the store's clock and is written again at
//! every renew interval, so a candidate that dies drops out of the list one
//! ttl later without anyone comparing clocks; a candidate that shuts down
//! removes its entry at once.
//!
//! The registry is advisory: it decides who *tries* first, never who may
//! lead. Leadership is still the lease alone, so a stale, missing or
//! forged entry can cost a hold-off or an extra acquire, never a second
//! leader.
//!
//! # Layout of a stored entry (version 1, integers big-endian)
//!
//! | bytes | field |
//! |---|---|
//! | 2 | magic `b"LC"` |
//! | 1 | version, `1` |
//! | 16 | candidate id (UUID) |
//! | 4 | priority (signed) |
//! | 8 | since, milliseconds since the Unix epoch (candidate's clock) |
//! | 1 | flags: bit 0, a nomination follows |
//! | 16 + 8 | nominee id and the fencing token of the term that nominated it (if flagged) |
//! | 2 | metadata length |
//! | n | metadata |

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::{Bytes, BytesMut};

use super::{DecodeError, FencingToken, LeaderId, MAX_METADATA_LEN};

const MAGIC: &[u8; 2] = b"LC";
const VERSION: u8 = 1;

/// One candidate's entry in the registry of a key.
///
/// ```
/// use leaseholder::{Candidate, LeaderId};
///
/// let me = Candidate::new(LeaderId::new(), 10, "zone-a");
/// let stored = me.encode();
/// assert_eq!(Candidate::decode(&stored)?.priority(), 10);
/// # Ok::<(), leaseholder::backend::DecodeError>(())
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Candidate {
    id: LeaderId,
    priority: i32,
    metadata: Bytes,
    since: SystemTime,
    nominee: Option<(LeaderId, FencingToken)>,
}

impl Candidate {
    /// An entry for candidate `id`, campaigning since now.
    pub fn new(id: LeaderId, priority: i32, metadata: impl Into<Bytes>) -> Candidate {
        Candidate {
            id,
            priority,
            metadata: metadata.into(),
            since: SystemTime::now(),
            nominee: None,
        }
    }

    /// The same entry with `since` set (the candidate's wall clock).
    pub fn with_since(mut self, since: SystemTime) -> Candidate {
        self.since = since;
        self
    }

    /// The same entry nominating `nominee` to take over from the term with
    /// fencing token `token` (see [`Leader::resign_to`](crate::Leader::resign_to)).
    pub fn with_nominee(mut self, nominee: Option<(LeaderId, FencingToken)>) -> Candidate {
        self.nominee = nominee;
        self
    }

    /// The candidate's id.
    pub fn id(&self) -> LeaderId {
        self.id
    }
    /// Its priority: higher is preferred.
    pub fn priority(&self) -> i32 {
        self.priority
    }
    /// Its metadata (at most [`MAX_METADATA_LEN`] bytes once stored).
    pub fn metadata(&self) -> &Bytes {
        &self.metadata
    }
    /// Since when it campaigns, by its own wall clock (informational, and
    /// the tie-break between equal priorities: the longest-waiting first).
    pub fn since(&self) -> SystemTime {
        self.since
    }
    /// The candidate this one, as leader of the term with the given token,
    /// handed over to.
    pub fn nominee(&self) -> Option<(LeaderId, FencingToken)> {
        self.nominee
    }

    /// Encodes the entry.
    pub fn encode(&self) -> Bytes {
        let meta = &self.metadata[..self.metadata.len().min(MAX_METADATA_LEN)];
        let mut out = BytesMut::with_capacity(2 + 1 + 16 + 4 + 8 + 1 + 24 + 2 + meta.len());
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&[VERSION]);
        out.extend_from_slice(self.id.as_bytes());
        out.extend_from_slice(&self.priority.to_be_bytes());
        let millis = self
            .since
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        out.extend_from_slice(&millis.to_be_bytes());
        match self.nominee {
            Some((id, token)) => {
                out.extend_from_slice(&[1]);
                out.extend_from_slice(id.as_bytes());
                out.extend_from_slice(&token.get().to_be_bytes());
            }
            None => out.extend_from_slice(&[0]),
        }
        // At most MAX_METADATA_LEN (512) bytes: fits in u16.
        out.extend_from_slice(&(meta.len() as u16).to_be_bytes());
        out.extend_from_slice(meta);
        out.freeze()
    }

    /// Decodes a stored entry. Anything else (another program's value, a
    /// version this build cannot read) is an error; the registry leaves
    /// such entries out of the list.
    pub fn decode(bytes: &[u8]) -> Result<Candidate, DecodeError> {
        let mut r = Reader(bytes);
        if r.take(2)? != MAGIC {
            return Err(DecodeError::NotOurs);
        }
        let version = r.take(1)?[0];
        if version != VERSION {
            return Err(DecodeError::Version(version));
        }
        let id = LeaderId::from(uuid::Uuid::from_bytes(r.array()?));
        let priority = i32::from_be_bytes(r.array()?);
        let since = UNIX_EPOCH + Duration::from_millis(u64::from_be_bytes(r.array()?));
        let nominee = match r.take(1)?[0] {
            0 => None,
            1 => {
                let who = LeaderId::from(uuid::Uuid::from_bytes(r.array()?));
                let token = u64::from_be_bytes(r.array()?);
                Some((who, FencingToken::new(token)))
            }
            _ => return Err(DecodeError::Malformed),
        };
        let len = usize::from(u16::from_be_bytes(r.array()?));
        if len > MAX_METADATA_LEN {
            return Err(DecodeError::Malformed);
        }
        let metadata = Bytes::copy_from_slice(r.take(len)?);
        if !r.0.is_empty() {
            return Err(DecodeError::Malformed);
        }
        Ok(Candidate {
            id,
            priority,
            metadata,
            since,
            nominee,
        })
    }

    /// The order in which candidates go first: higher priority, then the
    /// longest-waiting, then the smaller id (so every reader agrees).
    /// `Less` if `self` goes before `other`.
    pub(crate) fn rank(&self, other: &Candidate) -> std::cmp::Ordering {
        (other.priority, self.since, self.id).cmp(&(self.priority, other.since, other.id))
    }
}

/// The candidate of `candidates` that goes first ([`Candidate::rank`]).
pub(crate) fn best<'a>(
    candidates: impl IntoIterator<Item = &'a Candidate>,
) -> Option<&'a Candidate> {
    candidates.into_iter().min_by(|a, b| a.rank(b))
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if self.0.len() < n {
            return Err(DecodeError::Malformed);
        }
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        Ok(head)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        let mut out = [0; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }
}

/// Whom the last holder's registry `entry` named to go next after its term
/// with fencing token `token`, if anyone. The name is trusted without a
/// check that the nominee is still live: the holder named it from a list
/// it read at most a renew interval earlier, and a nominee that died since
/// costs the others one hold-off.
pub(crate) fn named(entry: Option<&Candidate>, token: FencingToken) -> Option<LeaderId> {
    entry
        .and_then(|c| c.nominee)
        .filter(|(_, t)| *t == token)
        .map(|(who, _)| who)
}

/// Who should try first for a key that just became free, given the live
/// `candidates`, and the last holder seen (its id and token), if any:
///
/// 1. the candidate the last holder nominated during that very term (by
///    [`resign_to`](crate::Leader::resign_to) or a preemption), if it is
///    live; a follower that never saw who held the key takes the live
///    nomination of the latest term (the highest token) instead, since
///    nominations are cleared a renew interval after their term;
/// 2. else the best live candidate other than the last holder (which just
///    stepped down, or died): highest priority, then longest-waiting, then
///    smallest id.
///
/// `None` if nobody qualifies (then everyone tries).
pub(crate) fn first_choice(
    candidates: &[Candidate],
    last: Option<(LeaderId, Option<FencingToken>)>,
) -> Option<LeaderId> {
    let live = |who: &LeaderId| candidates.iter().any(|c| c.id == *who);
    let nominee = match last {
        Some((holder, Some(token))) => candidates
            .iter()
            .find(|c| c.id == holder)
            .and_then(|c| c.nominee)
            .filter(|(_, t)| *t == token)
            .map(|(who, _)| who),
        Some(_) => None,
        None => candidates
            .iter()
            .filter_map(|c| c.nominee)
            .filter(|(who, _)| live(who))
            .max_by_key(|(_, t)| *t)
            .map(|(who, _)| who),
    };
    if let Some(who) = nominee.filter(|who| live(who)) {
        return Some(who);
    }
    let skip = last.map(|(id, _)| id);
    best(candidates.iter().filter(|c| Some(c.id) != skip)).map(|c| c.id)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn at(ms: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_millis(ms)
    }

    #[test]
    fn an_entry_round_trips_and_garbage_is_refused() {
        let c = Candidate::new(LeaderId::new(), -3, &b"meta"[..])
            .with_since(at(1_700_000_000_123))
            .with_nominee(Some((LeaderId::new(), FencingToken::new(42))));
        assert_eq!(Candidate::decode(&c.encode()).unwrap(), c);
        let plain = Candidate::new(LeaderId::new(), i32::MAX, Bytes::new()).with_since(at(5));
        assert_eq!(Candidate::decode(&plain.encode()).unwrap(), plain);
        assert_eq!(Candidate::decode(b"xx"), Err(DecodeError::NotOurs));
        assert_eq!(Candidate::decode(b"LC"), Err(DecodeError::Malformed));
        assert_eq!(Candidate::decode(b"LC\x09"), Err(DecodeError::Version(9)));
        let mut long = plain.encode().to_vec();
        long.push(0);
        assert_eq!(Candidate::decode(&long), Err(DecodeError::Malformed));
        let encoded = c.encode();
        for cut in 0..encoded.len() {
            assert!(Candidate::decode(&encoded[..cut]).is_err(), "cut at {cut}");
        }
    }

    #[test]
    fn the_first_choice_is_the_nominee_else_the_best_other_than_the_last_holder() {
        let (a, b, c) = (LeaderId::new(), LeaderId::new(), LeaderId::new());
        let t7 = FencingToken::new(7);
        let list = vec![
            Candidate::new(a, 10, Bytes::new()).with_since(at(3)),
            Candidate::new(b, 5, Bytes::new()).with_since(at(1)),
            Candidate::new(c, 5, Bytes::new()).with_since(at(2)),
        ];
        assert_eq!(first_choice(&list, None), Some(a));
        // The last holder (a) is skipped: of b and c, b waited longest.
        assert_eq!(first_choice(&list, Some((a, Some(t7)))), Some(b));
        // a nominated c in term 7.
        let mut nominated = list.clone();
        nominated[0] = nominated[0].clone().with_nominee(Some((c, t7)));
        assert_eq!(first_choice(&nominated, Some((a, Some(t7)))), Some(c));
        // A nomination from another term counts for nothing.
        assert_eq!(
            first_choice(&nominated, Some((a, Some(FencingToken::new(8))))),
            Some(b)
        );
        // A nominee that is gone counts for nothing.
        assert_eq!(first_choice(&nominated[..2], Some((a, Some(t7)))), Some(b));
        // A follower that never saw the holder takes the latest live
        // nomination.
        let mut two = nominated.clone();
        two[1] = two[1].clone().with_nominee(Some((a, FencingToken::new(3))));
        assert_eq!(first_choice(&two, None), Some(c));
        assert_eq!(first_choice(&[], None), None);
        assert_eq!(first_choice(&list[..1], Some((a, None))), None);
    }
}
