//! The lease contract: the [`BackendEdge`] trait every store implements, the
//! values it trades in, and [`Backend`], the cheap, shareable handle the
//! campaign uses.
//!
//! # The contract
//!
//! A backend stores, per [`Key`], at most one *lease*. A lease carries a
//! random [`Nonce`] minted by the campaign for each attempt, a
//! [`FencingToken`], the candidate's [`LeaderId`] and small metadata.
//! Ownership is the nonce, never the candidate id: two handles with the same
//! id never adopt each other's lease.
//!
//! | method | must |
//! |---|---|
//! | [`setup`](BackendEdge::setup) | be idempotent and safe when many candidates call it at once |
//! | [`acquire`](BackendEdge::acquire) | atomically create a lease if none is live, with a token greater than every token ever issued for the key; else report the holder. Never overwrite a live lease |
//! | [`renew`](BackendEdge::renew) | atomically extend the lease with this nonce; [`Renewed::Lost`] if it is gone or another's. Never resurrect an expired lease |
//! | [`release`](BackendEdge::release) | end the lease only if it still has this nonce (compare-and-delete); idempotent; never make a later token smaller |
//! | [`holder`](BackendEdge::holder) | return the live lease with an expiry hint |
//! | [`keys`](BackendEdge::keys) | optionally list the keys that may hold a lease (for operators) |
//! | [`watch`](BackendEdge::watch) | optionally stream change events for all keys |
//! | [`proclaim`](BackendEdge::proclaim) | optionally: as `renew`, and replace the lease's metadata |
//! | [`register`](BackendEdge::register), [`deregister`](BackendEdge::deregister), [`candidates`](BackendEdge::candidates) | optionally keep the candidate registry: entries that expire by the store's clock, listed live |
//!
//! **Whose clock.** Expiry is decided by the store's clock (a message TTL, a
//! database's `clock_timestamp()`, an in-process tokio clock); two
//! machines' clocks are never compared. The expiry hint returned by
//! [`holder`](BackendEdge::holder) only times followers' wake-ups; the
//! leader's deadline comes from its own monotonic clock. An *embedded*
//! store (a file several processes of one host share) has no server clock:
//! use the host's monotonic clock (`CLOCK_BOOTTIME`, which all processes of
//! the host share and which counts suspend), stored together with the
//! host's boot id so that a lease written before a reboot reads as expired,
//! never the wall clock, which can be set back or forward under a running
//! leader. No conformance row can tell a wall clock from a monotonic one:
//! this is on you.
//!
//! **Dropped calls.** The campaign bounds each call by its budget and drops
//! the future when that passes; the request may still land (like a reply
//! lost in the network). Every write must therefore be safe to apply late:
//! an acquire that lands after its caller gave up creates a lease that
//! expires unused; a renewal that lands late extends only a lease whose
//! nonce still matches.
//!
//! **Tokens** stay below 2^63, so that they fit a signed 64-bit integer
//! downstream.
//!
//! **Ambiguous replies.** A write whose reply was lost may have taken
//! effect. The campaign then calls [`holder`](BackendEdge::holder) and
//! compares nonces, so `holder` must return the nonce of the lease it sees.
//!
//! **Foreign values.** A value the backend cannot decode (another library's,
//! garbage) is a live lease held by someone unknown: report it as
//! [`Holder::foreign`], never as free and never by panicking.
//!
//! The [`conformance`](crate::conformance) module (feature `conformance`)
//! checks every row of this contract against a real store.

mod batch;
pub mod blocking;
mod candidate;
#[cfg(any(feature = "postgres", feature = "redis"))]
mod clock;
#[cfg(feature = "etcd")]
#[cfg_attr(docsrs, doc(cfg(feature = "etcd")))]
pub mod etcd;
mod hub;
pub mod memory;
#[cfg(feature = "nats")]
#[cfg_attr(docsrs, doc(cfg(feature = "nats")))]
pub mod nats;
#[cfg(feature = "postgres")]
#[cfg_attr(docsrs, doc(cfg(feature = "postgres")))]
pub mod postgres;
#[cfg(feature = "redis")]
#[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
pub mod redis;
#[cfg(feature = "sqlite")]
#[cfg_attr(docsrs, doc(cfg(feature = "sqlite")))]
pub mod sqlite;
mod value;

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use futures_core::Stream;

use crate::error::{BackendError, ConfigError, Op};

pub use batch::Renewal;
pub use candidate::Candidate;
pub(crate) use candidate::{best, first_choice, named};
pub use hub::Subscription;

/// The budget [`Backend`]'s methods without one (`setup`, `acquire`,
/// `release`, `holder`) pass to the [`BackendEdge`]: 30 s. The campaign
/// always passes its own, shorter one (the `*_within` methods).
pub const DEFAULT_BUDGET: Duration = Duration::from_secs(30);
pub use value::{DecodeError, LeaseValue};

/// The longest key, in bytes, that any backend accepts.
pub const MAX_KEY_LEN: usize = 256;

/// The largest candidate metadata, in bytes.
pub const MAX_METADATA_LEN: usize = 512;

/// The name of a lease: one leader per key.
///
/// Cheap to clone. Built by [`Key::new`], which applies the rules every
/// backend shares (not empty, at most [`MAX_KEY_LEN`] bytes, no control
/// characters); a backend may add its own in
/// [`BackendEdge::validate_key`].
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Key(Arc<str>);

impl Key {
    /// Checks the rules every backend shares and returns the key.
    ///
    /// ```
    /// use leaseholder::Key;
    /// assert!(Key::new("scheduler").is_ok());
    /// assert!(Key::new("").is_err());
    /// ```
    pub fn new(key: impl AsRef<str>) -> Result<Key, ConfigError> {
        let key = key.as_ref();
        if key.is_empty() {
            return Err(ConfigError::EmptyKey);
        }
        if key.len() > MAX_KEY_LEN {
            return Err(ConfigError::KeyTooLong {
                len: key.len(),
                max: MAX_KEY_LEN,
            });
        }
        if let Some(ch) = key.chars().find(|c| c.is_control()) {
            return Err(ConfigError::KeyCharacter {
                key: key.to_owned(),
                ch,
                backend: "any",
                rule: "control characters are never allowed",
            });
        }
        Ok(Key(key.into()))
    }

    /// A key that skipped the checks (only to name a rejected key).
    pub(crate) fn unchecked(key: &str) -> Key {
        Key(key.into())
    }

    /// The key as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl AsRef<str> for Key {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

/// A candidate's identity: a UUID v7, new for every [`Leader`](crate::Leader).
///
/// It tells followers and observers *who* leads. It never decides
/// ownership of a lease; the per-term [`Nonce`] does.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LeaderId(uuid::Uuid);

impl LeaderId {
    /// A new, time-ordered id.
    pub fn new() -> LeaderId {
        LeaderId(uuid::Uuid::now_v7())
    }

    /// The id as a UUID.
    pub fn as_uuid(&self) -> uuid::Uuid {
        self.0
    }

    /// The id's 16 bytes.
    pub const fn as_bytes(&self) -> &[u8; 16] {
        self.0.as_bytes()
    }
}

impl Default for LeaderId {
    fn default() -> Self {
        LeaderId::new()
    }
}

impl From<uuid::Uuid> for LeaderId {
    fn from(value: uuid::Uuid) -> Self {
        LeaderId(value)
    }
}

impl From<LeaderId> for uuid::Uuid {
    fn from(value: LeaderId) -> Self {
        value.0
    }
}

impl fmt::Debug for LeaderId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "LeaderId({})", self.0)
    }
}

impl fmt::Display for LeaderId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

/// A random 128-bit value minted for each acquisition attempt. It is what
/// makes a lease *ours*.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Nonce(u128);

impl Nonce {
    /// A fresh random nonce.
    pub fn random() -> Nonce {
        Nonce(uuid::Uuid::new_v4().as_u128())
    }

    /// From raw bits (decoding, tests).
    pub const fn from_u128(bits: u128) -> Nonce {
        Nonce(bits)
    }

    /// The raw bits.
    pub const fn as_u128(&self) -> u128 {
        self.0
    }

    /// The 16 bytes, big-endian: how a backend stores the nonce in a
    /// binary column or field.
    ///
    /// ```
    /// use leaseholder::Nonce;
    /// let n = Nonce::random();
    /// assert_eq!(Nonce::from_bytes(n.to_bytes()), n);
    /// ```
    pub const fn to_bytes(&self) -> [u8; 16] {
        self.0.to_be_bytes()
    }

    /// From the bytes of [`to_bytes`](Self::to_bytes).
    pub const fn from_bytes(bytes: [u8; 16]) -> Nonce {
        Nonce(u128::from_be_bytes(bytes))
    }
}

impl fmt::Debug for Nonce {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Nonce({:08x}..)", (self.0 >> 96) as u32)
    }
}

/// A number that grows with every term of a key: each lease gets a token
/// strictly greater than every token issued before it for the same key.
///
/// Pass it along with every write the leader makes downstream, and have the
/// downstream store reject writes with a token lower than the highest it has
/// seen. That is the only protection against a leader that was paused (GC,
/// SIGSTOP, a VM migration) past its lease and acts once before it notices.
///
/// **Range.** Backends issue tokens below 2^63, so that a token fits a
/// signed 64-bit SQL integer (`bigint`) downstream; a backend of your own
/// must too. Tokens taken from a clock in microseconds (PostgreSQL, NATS
/// sequences seeded from it) stay below that for about 290,000 years.
///
/// ```
/// use leaseholder::FencingToken;
/// assert!(FencingToken::new(7) > FencingToken::new(3));
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FencingToken(u64);

impl FencingToken {
    /// Wraps a raw token.
    pub const fn new(value: u64) -> FencingToken {
        FencingToken(value)
    }

    /// The raw value.
    pub const fn get(&self) -> u64 {
        self.0
    }
}

impl fmt::Display for FencingToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

impl From<FencingToken> for u64 {
    fn from(value: FencingToken) -> Self {
        value.0
    }
}

/// What a candidate asks a backend to store when it tries to acquire a key.
#[derive(Clone, Debug)]
pub struct Claim {
    /// The nonce that will identify the lease.
    pub nonce: Nonce,
    /// The candidate's id.
    pub id: LeaderId,
    /// The candidate's metadata (at most [`MAX_METADATA_LEN`] bytes).
    pub metadata: Bytes,
    /// The candidate's wall clock when it asked; informational only.
    pub at: SystemTime,
}

impl Claim {
    /// A claim with a fresh nonce.
    pub fn new(id: LeaderId, metadata: Bytes) -> Claim {
        Claim {
            nonce: Nonce::random(),
            id,
            metadata,
            at: SystemTime::now(),
        }
    }

    /// The value to store for this claim with the token the store assigned.
    pub fn value(&self, token: FencingToken) -> LeaseValue {
        LeaseValue {
            nonce: self.nonce,
            id: self.id,
            token: Some(token),
            acquired_at: self.at,
            metadata: self.metadata.clone(),
        }
    }
}

/// A lease this candidate holds, as returned by
/// [`acquire`](BackendEdge::acquire) and [`renew`](BackendEdge::renew).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Lease {
    nonce: Nonce,
    token: FencingToken,
    revision: u64,
    id: LeaderId,
    metadata: Bytes,
    acquired_at: SystemTime,
}

impl Lease {
    /// The lease created for `claim`, with the token and the store revision
    /// (a version number the backend may use for compare-and-set; `0` if it
    /// has none).
    pub fn new(claim: &Claim, token: FencingToken, revision: u64) -> Lease {
        Lease {
            nonce: claim.nonce,
            token,
            revision,
            id: claim.id,
            metadata: claim.metadata.clone(),
            acquired_at: claim.at,
        }
    }

    /// The same lease with other metadata (after a
    /// [`proclaim`](BackendEdge::proclaim)).
    pub fn with_metadata(&self, metadata: Bytes) -> Lease {
        Lease {
            metadata,
            ..self.clone()
        }
    }

    /// The same lease at a new store revision (after a renewal).
    pub fn with_revision(&self, revision: u64) -> Lease {
        Lease {
            revision,
            ..self.clone()
        }
    }

    /// The lease's nonce.
    pub fn nonce(&self) -> Nonce {
        self.nonce
    }
    /// The lease's fencing token.
    pub fn token(&self) -> FencingToken {
        self.token
    }
    /// The store revision of the last write.
    pub fn revision(&self) -> u64 {
        self.revision
    }
    /// The holder's id.
    pub fn id(&self) -> LeaderId {
        self.id
    }
    /// The holder's metadata.
    pub fn metadata(&self) -> &Bytes {
        &self.metadata
    }
    /// When the holder acquired it, by the holder's wall clock.
    pub fn acquired_at(&self) -> SystemTime {
        self.acquired_at
    }

    /// The value to store for this lease.
    pub fn value(&self) -> LeaseValue {
        LeaseValue {
            nonce: self.nonce,
            id: self.id,
            token: Some(self.token),
            acquired_at: self.acquired_at,
            metadata: self.metadata.clone(),
        }
    }

    /// The lease seen from outside, with an expiry hint.
    pub fn holder(&self, expires_in: Option<Duration>) -> Holder {
        Holder {
            id: Some(self.id),
            nonce: Some(self.nonce),
            token: Some(self.token),
            metadata: self.metadata.clone(),
            acquired_at: Some(self.acquired_at),
            revision: self.revision,
            expires_in,
        }
    }

    /// The lease a [`Holder`] shows, as a value to pass to
    /// [`release`](BackendEdge::release): how an operator ends *someone
    /// else's* term (see [`Backend::force_release_within`], which also
    /// reads the key back). `None` for a [foreign](Holder::is_foreign)
    /// holder, or one whose token or acquisition time the store did not
    /// show: nothing we could compare on.
    ///
    /// The release still compares on the nonce (and, where the backend
    /// keeps one, the term), so a lease built from a holder read a while
    /// ago never ends a newer term of the key.
    ///
    /// ```
    /// use leaseholder::{Claim, FencingToken, Holder, LeaderId, Lease};
    ///
    /// let lease = Lease::new(&Claim::new(LeaderId::new(), Default::default()), FencingToken::new(7), 3);
    /// let seen = lease.holder(None);
    /// assert_eq!(Lease::from_holder(&seen), Some(lease));
    /// assert_eq!(Lease::from_holder(&Holder::foreign(3, None)), None);
    /// ```
    pub fn from_holder(holder: &Holder) -> Option<Lease> {
        Some(Lease {
            nonce: holder.nonce?,
            token: holder.token?,
            revision: holder.revision,
            id: holder.id?,
            metadata: holder.metadata.clone(),
            acquired_at: holder.acquired_at?,
        })
    }
}

/// Who holds a key, as the store shows it.
///
/// A holder whose value could not be decoded is *foreign*
/// ([`is_foreign`](Self::is_foreign)): a live lease of someone unknown.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Holder {
    id: Option<LeaderId>,
    nonce: Option<Nonce>,
    token: Option<FencingToken>,
    metadata: Bytes,
    acquired_at: Option<SystemTime>,
    revision: u64,
    expires_in: Option<Duration>,
}

impl Holder {
    /// The holder of a decoded value. `token` is the store's token when the
    /// backend keeps it outside the value (it wins over the value's own).
    pub fn from_value(
        value: &LeaseValue,
        token: Option<FencingToken>,
        revision: u64,
        expires_in: Option<Duration>,
    ) -> Holder {
        Holder {
            id: Some(value.id),
            nonce: Some(value.nonce),
            token: token.or(value.token),
            metadata: value.metadata.clone(),
            acquired_at: Some(value.acquired_at),
            revision,
            expires_in,
        }
    }

    /// Decodes a stored value; a value that does not decode gives a
    /// [foreign](Self::foreign) holder.
    pub fn decode(
        bytes: &[u8],
        token: Option<FencingToken>,
        revision: u64,
        expires_in: Option<Duration>,
    ) -> Holder {
        match LeaseValue::decode(bytes) {
            Ok(value) => Holder::from_value(&value, token, revision, expires_in),
            Err(_) => Holder::foreign(revision, expires_in),
        }
    }

    /// A live lease whose value we cannot read.
    pub fn foreign(revision: u64, expires_in: Option<Duration>) -> Holder {
        Holder {
            id: None,
            nonce: None,
            token: None,
            metadata: Bytes::new(),
            acquired_at: None,
            revision,
            expires_in,
        }
    }

    /// The leader's id; `None` for a foreign lease.
    pub fn id(&self) -> Option<LeaderId> {
        self.id
    }
    /// The lease's nonce; `None` for a foreign lease.
    pub fn nonce(&self) -> Option<Nonce> {
        self.nonce
    }
    /// The lease's fencing token; `None` for a foreign lease.
    pub fn token(&self) -> Option<FencingToken> {
        self.token
    }
    /// The leader's metadata (empty for a foreign lease).
    pub fn metadata(&self) -> &Bytes {
        &self.metadata
    }
    /// When the leader acquired the lease, by the leader's wall clock.
    pub fn since(&self) -> Option<SystemTime> {
        self.acquired_at
    }
    /// The store's revision of the lease's last write.
    pub fn revision(&self) -> u64 {
        self.revision
    }
    /// How long until the store expires the lease unless it is renewed, as
    /// far as the backend can tell. A hint for waking up, not a deadline.
    pub fn expires_in(&self) -> Option<Duration> {
        self.expires_in
    }
    /// `true` if the value could not be decoded.
    pub fn is_foreign(&self) -> bool {
        self.nonce.is_none()
    }
    /// `true` if this is the lease with `nonce`.
    pub fn is_nonce(&self, nonce: Nonce) -> bool {
        self.nonce == Some(nonce)
    }
}

/// What [`BackendEdge::setup`] found.
///
/// A store object (bucket, table) that had to be created may be the
/// re-creation of one that was deleted under a running fleet: a leader of
/// the old object may still be inside its deadline, and nothing in the new
/// object says so. A campaign whose setup reports [`Prepared::Created`]
/// therefore waits one ttl before its first acquire.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Prepared {
    /// The bucket or table was there already (or the store needs none).
    Existing,
    /// This call created the bucket or table.
    Created,
}

/// What [`Backend::force_release_within`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ForceReleased {
    /// The term is over: the key no longer holds the lease with the
    /// holder's nonce (this call ended it, or it had just ended). `now` is
    /// what the key holds, read right after: `None` (free) or the next
    /// term, whose token is larger than the ended one's.
    Ended {
        /// The fencing token of the ended term.
        token: FencingToken,
        /// The key's holder right after.
        now: Option<Holder>,
    },
    /// The holder is foreign (a value we cannot decode, or one without a
    /// token): there is nothing to compare on, so nothing was done.
    Foreign,
}

/// The result of [`BackendEdge::acquire`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Acquired {
    /// The key was free; this is our new lease.
    Won(Lease),
    /// Someone holds a live lease.
    Held(Holder),
}

/// The result of [`BackendEdge::renew`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Renewed {
    /// The lease was extended by a full ttl from the store's point of view,
    /// by a request this call sent.
    Renewed(Lease),
    /// The lease was extended by a full ttl from a request sent at this
    /// instant, which may be before this call began: for a store where one
    /// request keeps many keys alive (etcd's shared lease), a renewal can
    /// be answered by a keep-alive already sent for other keys.
    ///
    /// The campaign credits the earlier of this instant and the time it
    /// called `renew` (so an instant later than the call costs nothing but
    /// margin), and schedules the key's next renewal one renew interval
    /// after it, so that keys answered by one request stay in step and
    /// share the next one too.
    ///
    /// A backend that answers `SentAt` must not change the lease's
    /// revision when it renews (the keep-alive writes no key): after a
    /// renewal whose reply was lost, the campaign reads the key back and
    /// takes a new revision as proof that *its own* renewal landed, which
    /// credits its own send time, not the earlier one this variant allows.
    /// The conformance suite checks it.
    ///
    /// ```
    /// use leaseholder::{Claim, FencingToken, LeaderId, Lease, Renewed};
    /// use tokio::time::Instant;
    ///
    /// let lease = Lease::new(&Claim::new(LeaderId::new(), Default::default()), FencingToken::new(7), 1);
    /// let sent = Instant::now();
    /// let reply = Renewed::SentAt(lease.clone(), sent);
    /// assert_eq!(reply.lease(), Some(&lease));
    /// assert_eq!(reply.sent_at(), Some(sent));
    /// ```
    SentAt(Lease, tokio::time::Instant),
    /// The lease with this nonce is no longer live (expired, released, or
    /// replaced). Final: the campaign never tries to revive it.
    Lost,
}

impl Renewed {
    /// The renewed lease, unless it was lost.
    pub fn lease(&self) -> Option<&Lease> {
        match self {
            Renewed::Renewed(lease) | Renewed::SentAt(lease, _) => Some(lease),
            Renewed::Lost => None,
        }
    }

    /// The instant a [`Renewed::SentAt`] reports.
    pub fn sent_at(&self) -> Option<tokio::time::Instant> {
        match self {
            Renewed::SentAt(_, at) => Some(*at),
            Renewed::Renewed(_) | Renewed::Lost => None,
        }
    }
}

/// A change a backend's watch reports.
///
/// A watch is a hint: the campaign re-reads the store before acting on it,
/// and a follower whose watch says nothing still wakes by the holder's
/// expiry hint and its retry interval. What each event makes a follower do:
///
/// | event | follower |
/// |---|---|
/// | `Released(key)` | tries to acquire at once, after a random spread of at most 1 ms, so that followers do not all call at the same instant |
/// | `Updated(key, Some(holder))` | no store call: a new leader is published, and the next wake-up moves to the holder's expiry hint; an event older than what it last read is ignored. Without a hint, a backend whose watch reports expiry makes the follower set no timer at all (the watch will say when the lease ends); other backends' followers keep their timers |
/// | `Updated(key, None)` | nothing; the follower keeps its timers (so a backend that can attach the holder saves its followers' calls: with `None` an idle follower re-reads at every retry or expiry, with `Some` it makes no calls while the leader renews) |
/// | `Resync` | tries to acquire at once (it may have missed a release) |
///
/// A leader that sees another holder's `Updated`, a `Released` or a
/// `Resync` for its key renews at once to find out whether it still leads.
///
/// The watch hub sends `Resync` to every key itself each time the
/// backend's watch stream ends and each time it (re)connects; a backend
/// sends it when it may have lost events (a lagging subscription) or when
/// it cannot tell which key changed (a watch that polls a change counter).
///
/// If the backend does not say that its watch reports expiry
/// ([`BackendEdge::watch_reports_expiry`]), followers wake at each
/// lease's expiry hint. If it does, a `Released` is expected when a lease
/// expires, and a follower that has no expiry hint (a holder read or
/// event without one) sets no timer: while its watch is up, such a
/// backend should leave the hint out, and put it in while the watch is
/// down (the hub's `Resync` at the end of a stream makes followers read
/// again then), so that idle followers make no store calls at all.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum WatchEvent {
    /// The key became free (released, deleted, or expired).
    Released(Key),
    /// The key was written: acquired or renewed. Carries the holder when the
    /// backend has it at hand.
    Updated(Key, Option<Holder>),
    /// Events may have been missed (reconnect, lag), or something changed
    /// and the backend cannot tell what: re-read every key.
    Resync,
    /// The candidate registry of the key changed: an entry was added,
    /// removed or rewritten with other contents (not a plain renewal of an
    /// entry, which would flood every watcher). Optional: a backend that
    /// cannot tell sends nothing, and leaders read the registry at each
    /// renew interval anyway.
    Candidates(Key),
}

/// The stream [`BackendEdge::watch`] returns. It ends when the
/// subscription breaks; the backend's watcher then calls `watch` again.
pub type WatchStream = Pin<Box<dyn Stream<Item = WatchEvent> + Send + 'static>>;

/// A store that can hold leases: implement this for your own store, and run
/// the [`conformance`](crate::conformance) suite against it.
///
/// The module docs above give the contract. Methods are called by one
/// campaign task per key, at most one at a time per key; different keys'
/// calls run concurrently. The campaign bounds every call with a timeout and
/// drops the future when it passes, so a call must be cancel safe in the
/// ordinary sense: a dropped call may or may not have taken effect, exactly
/// like a reply lost in the network.
///
/// # The budget of a call
///
/// Every method that talks to the store gets a `budget`: how long the
/// campaign will wait for this call before it drops it (and, for `renew`,
/// the time left before the leader's deadline). A store that can bound a
/// request on its side (a statement or lock timeout, a busy timeout, a
/// request deadline) should bound it by `budget`, so that a call the
/// campaign gave up on does not keep a connection busy or take effect long
/// after. Safety never depends on it: the campaign treats a call past its
/// budget as ambiguous and reads the key back. Budgets the campaign uses:
/// `acquire` ttl − drift margin, `renew` the time left before the deadline,
/// `holder` and `release` at most the renew interval, `setup` the renew
/// interval; all are cut shorter while the campaign stops. Calls through
/// [`Backend`]'s methods without `_within` pass the ttl (`acquire`,
/// `renew`) or [`DEFAULT_BUDGET`].
///
/// # Implementing
///
/// ```
/// use std::time::Duration;
/// use leaseholder::{Acquired, BackendEdge, BackendError, Claim, Holder, Key, Lease, Prepared, Renewed};
///
/// struct MyStore;
///
/// impl BackendEdge for MyStore {
///     fn name(&self) -> &'static str { "my-store" }
///     async fn setup(&self, budget: Duration) -> Result<Prepared, BackendError> { Ok(Prepared::Existing) }
///     async fn acquire(&self, key: &Key, claim: &Claim, ttl: Duration, budget: Duration) -> Result<Acquired, BackendError> {
///         todo!("atomically create the lease if the key is free")
///     }
///     async fn renew(&self, key: &Key, lease: &Lease, ttl: Duration, budget: Duration) -> Result<Renewed, BackendError> {
///         todo!("extend the lease if its nonce still matches")
///     }
///     async fn release(&self, key: &Key, lease: &Lease, budget: Duration) -> Result<(), BackendError> {
///         todo!("compare-and-delete on the nonce")
///     }
///     async fn holder(&self, key: &Key, budget: Duration) -> Result<Option<Holder>, BackendError> {
///         todo!("the live lease, decoded with Holder::decode")
///     }
/// }
/// ```
pub trait BackendEdge: Send + Sync + 'static {
    /// A short name for messages, e.g. `"nats"`.
    fn name(&self) -> &'static str;

    /// The shortest ttl this store can express. Default: 1 ms.
    fn min_ttl(&self) -> Duration {
        Duration::from_millis(1)
    }

    /// Extra rules for keys, beyond those of [`Key::new`]. Called by
    /// `build()`. Default: accept.
    fn validate_key(&self, key: &Key) -> Result<(), ConfigError> {
        let _ = key;
        Ok(())
    }

    /// Creates or validates what the store needs (bucket, table).
    ///
    /// Idempotent; safe when many candidates call it at once. An existing
    /// object with settings that break the contract gives
    /// [`BackendError::Misconfigured`] saying what to change.
    ///
    /// Returns [`Prepared::Created`] if this call created the object,
    /// [`Prepared::Existing`] otherwise. Report `Created` whenever in doubt:
    /// it costs one ttl of waiting before the first acquire, while a wrong
    /// `Existing` after a re-creation can let a new leader in beside one of
    /// the old object that has not noticed yet.
    ///
    /// `budget`: see [the trait docs](BackendEdge#the-budget-of-a-call).
    fn setup(
        &self,
        budget: Duration,
    ) -> impl Future<Output = Result<Prepared, BackendError>> + Send;

    /// Atomically: if `key` has no live lease, create one for `claim` with a
    /// token strictly greater than every token ever issued for `key`, live
    /// for at least `ttl` by the store's clock, and return it; otherwise
    /// return the current holder. Never overwrites a live lease.
    ///
    /// `budget`: see [the trait docs](BackendEdge#the-budget-of-a-call). A
    /// lease won after it has passed is given back unused.
    fn acquire(
        &self,
        key: &Key,
        claim: &Claim,
        ttl: Duration,
        budget: Duration,
    ) -> impl Future<Output = Result<Acquired, BackendError>> + Send;

    /// Atomically extends the lease with `lease`'s nonce to at least `ttl`
    /// from now by the store's clock, keeping its token. Returns
    /// [`Renewed::Lost`] if that lease is no longer live; never resurrects
    /// an expired lease. If the lease is still ours under a newer revision
    /// (an earlier renewal whose reply was lost), renew that one rather than
    /// reporting `Lost`.
    ///
    /// `budget` is the time left before the leader's deadline: by then the
    /// campaign drops the call and gives the term up, so a renewal that
    /// takes effect later is of no use. A store that can bound how long the
    /// server works on a request (a statement or lock timeout) should bound
    /// it by `budget`, so that a renewal never takes effect after its
    /// leader gave up. Stores that cannot may ignore it: safety does not
    /// depend on it, only how soon an abandoned lease frees up.
    fn renew(
        &self,
        key: &Key,
        lease: &Lease,
        ttl: Duration,
        budget: Duration,
    ) -> impl Future<Output = Result<Renewed, BackendError>> + Send;

    /// `true` if [`renew_many`](Self::renew_many) sends many keys'
    /// renewals to the store together (one statement, one pipeline), and
    /// [`Backend`] should therefore gather the renewals its campaigns make
    /// at about the same time and hand them over in one call. Default:
    /// `false`; then every renewal goes to [`renew`](Self::renew) alone.
    fn batches_renewals(&self) -> bool {
        false
    }

    /// Renews several leases, of different keys, and answers each with its
    /// own result, in the order given: the result vector has exactly one
    /// entry per renewal. Each renewal means exactly what
    /// [`renew`](Self::renew) with its fields means (atomic per key, never
    /// resurrects an expired lease, `budget` the time left before that
    /// leader's deadline); nothing is atomic across keys. A failure of the
    /// whole request gives every renewal an error of its kind
    /// ([`BackendError::replicate`]).
    ///
    /// The campaigns call it only if
    /// [`batches_renewals`](Self::batches_renewals) says so, never with
    /// two renewals of one lease; two renewals of one key (two candidates
    /// sharing a backend) have different nonces, and at most one of them
    /// holds the key. A key whose renewal gets an error is renewed alone
    /// (with `renew`) until that succeeds. Default: each renewal's
    /// [`renew`](Self::renew), all at once.
    fn renew_many(
        &self,
        renewals: &[Renewal],
    ) -> impl Future<Output = Vec<Result<Renewed, BackendError>>> + Send {
        futures_util::future::join_all(
            renewals
                .iter()
                .map(|r| self.renew(&r.key, &r.lease, r.ttl, r.budget)),
        )
    }

    /// Ends the lease only if it still has `lease`'s nonce. Idempotent.
    /// Must not make the next token smaller.
    ///
    /// `budget`: see [the trait docs](BackendEdge#the-budget-of-a-call).
    fn release(
        &self,
        key: &Key,
        lease: &Lease,
        budget: Duration,
    ) -> impl Future<Output = Result<(), BackendError>> + Send;

    /// The live lease for `key`, if any, with an expiry hint.
    ///
    /// The holder's [revision](Holder::revision) must be the one the
    /// lease's last write (acquire, renew, proclaim) returned, and the same
    /// on every read until the next write: after a renewal whose reply was
    /// lost, the campaign reads the key back and takes any other revision
    /// as proof that the renewal landed. A revision computed from the time
    /// of the read breaks that (the conformance row
    /// `revision_changes_only_with_a_write` checks it).
    ///
    /// `budget`: see [the trait docs](BackendEdge#the-budget-of-a-call).
    fn holder(
        &self,
        key: &Key,
        budget: Duration,
    ) -> impl Future<Output = Result<Option<Holder>, BackendError>> + Send;

    /// Every key of this backend that may hold a lease, in any order, for
    /// operators (`leaseholder list`): the keys of live leases, and
    /// possibly keys whose lease has ended (a row kept for its term, an
    /// expiry marker). Callers read each key with
    /// [`holder`](Self::holder), which decides. A name in the store that
    /// is not a valid [`Key`] is left out. Not atomic: a key acquired
    /// while the listing runs may be missing.
    ///
    /// Never called by the campaign. Default:
    /// [`BackendError::Unsupported`].
    ///
    /// `budget`: see [the trait docs](BackendEdge#the-budget-of-a-call).
    fn keys(
        &self,
        budget: Duration,
    ) -> impl Future<Output = Result<Vec<Key>, BackendError>> + Send {
        let _ = budget;
        async { Err(no_listing()) }
    }

    /// One subscription to change events for all keys of this backend, or
    /// `None` if the store cannot watch (then followers poll). Default:
    /// `None`.
    fn watch(&self) -> impl Future<Output = Result<Option<WatchStream>, BackendError>> + Send {
        async { Ok(None) }
    }

    /// `true` if the watch reports expiry as [`WatchEvent::Released`]. When
    /// it does and the watch is up, idle followers make no store calls at
    /// all. Default: `false`.
    fn watch_reports_expiry(&self) -> bool {
        false
    }

    /// `true` if this backend keeps a candidate registry
    /// ([`register`](Self::register), [`deregister`](Self::deregister),
    /// [`candidates`](Self::candidates)). Default: `false`; then a
    /// `Leader` with a priority or preemption is refused at `build()`, and
    /// the others campaign without a registry entry.
    fn supports_candidates(&self) -> bool {
        false
    }

    /// Writes `candidate`'s entry in the registry of `key` (creating or
    /// replacing the entry with its id), to live at least `ttl` by the
    /// store's clock unless written again. Entries of a key are listed by
    /// [`candidates`](Self::candidates); an entry not written again for a
    /// ttl drops out of the list by the store's own expiry, with no
    /// comparison of clocks. Independent of the lease: writing an entry
    /// never touches the key's lease, and the registry may live in a
    /// separate store object.
    ///
    /// Default: [`BackendError::Unsupported`].
    fn register(
        &self,
        key: &Key,
        candidate: &Candidate,
        ttl: Duration,
        budget: Duration,
    ) -> impl Future<Output = Result<(), BackendError>> + Send {
        let _ = (key, candidate, ttl, budget);
        async { Err(no_registry()) }
    }

    /// `true` if this backend can replace a live lease's metadata within
    /// its term ([`proclaim`](Self::proclaim)). Default: `false`; then
    /// [`Leader::proclaim`](crate::Leader::proclaim) fails without a store
    /// call.
    fn supports_proclaim(&self) -> bool {
        false
    }

    /// Atomically, if the lease with `lease`'s nonce is live: replace its
    /// metadata with `metadata` and extend it exactly as
    /// [`renew`](Self::renew) does (same token, at least `ttl` from now by
    /// the store's clock), and return the renewed lease carrying the new
    /// metadata; [`Renewed::Lost`] otherwise. Holders read afterwards show
    /// the new metadata. Like a renewal, it must be safe to apply late,
    /// and it never resurrects an expired lease. `budget` as for `renew`.
    ///
    /// Default: [`BackendError::Unsupported`].
    fn proclaim(
        &self,
        key: &Key,
        lease: &Lease,
        metadata: &Bytes,
        ttl: Duration,
        budget: Duration,
    ) -> impl Future<Output = Result<Renewed, BackendError>> + Send {
        let _ = (key, lease, metadata, ttl, budget);
        async { Err(no_proclaim()) }
    }

    /// Removes the entry of candidate `id` from the registry of `key`.
    /// Idempotent. Default: [`BackendError::Unsupported`].
    fn deregister(
        &self,
        key: &Key,
        id: LeaderId,
        budget: Duration,
    ) -> impl Future<Output = Result<(), BackendError>> + Send {
        let _ = (key, id, budget);
        async { Err(no_registry()) }
    }

    /// The live entries of the registry of `key`, in any order. An entry
    /// that does not decode ([`Candidate::decode`]) is left out. Default:
    /// [`BackendError::Unsupported`].
    fn candidates(
        &self,
        key: &Key,
        budget: Duration,
    ) -> impl Future<Output = Result<Vec<Candidate>, BackendError>> + Send {
        let _ = (key, budget);
        async { Err(no_registry()) }
    }

    /// The live entry of candidate `id` in the registry of `key`, if there
    /// is one that decodes. A follower reads the last holder's entry when
    /// the key becomes free, to learn whom that holder named to go next
    /// ([`Candidate::nominee`]): one entry, however many candidates wait,
    /// so a handoff among hundreds of followers costs each of them one
    /// small read instead of the whole list.
    ///
    /// Default: [`candidates`](Self::candidates), filtered (correct, but it
    /// reads every entry: a backend that can read one entry should).
    fn candidate(
        &self,
        key: &Key,
        id: LeaderId,
        budget: Duration,
    ) -> impl Future<Output = Result<Option<Candidate>, BackendError>> + Send {
        let list = self.candidates(key, budget);
        async move { Ok(list.await?.into_iter().find(|c| c.id() == id)) }
    }
}

/// The error the registry methods' defaults return.
fn no_registry() -> BackendError {
    BackendError::Unsupported {
        what: "a candidate registry".to_owned(),
        needed: "a backend that implements BackendEdge::register, deregister and candidates"
            .to_owned(),
    }
}

/// The error the key listing's defaults return.
fn no_listing() -> BackendError {
    BackendError::Unsupported {
        what: "listing keys".to_owned(),
        needed: "a backend that implements BackendEdge::keys".to_owned(),
    }
}

/// The error the proclaim method's defaults return.
fn no_proclaim() -> BackendError {
    BackendError::Unsupported {
        what: "proclaim (replacing a live lease's metadata)".to_owned(),
        needed: "a backend that implements BackendEdge::proclaim".to_owned(),
    }
}

type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Runs one backend call, turning a panic in it (while creating the future
/// or while polling it) into [`BackendError::Panicked`]. A backend is a
/// public extension point, and client libraries panic too: a panic must
/// end like a fatal store error, never unwind into the campaign.
async fn guarded<'a, T>(
    op: Op,
    make: impl FnOnce() -> BoxFuture<'a, Result<T, BackendError>>,
) -> Result<T, BackendError> {
    use std::panic::{AssertUnwindSafe, catch_unwind};
    use std::task::Poll;
    let mut call = match catch_unwind(AssertUnwindSafe(make)) {
        Ok(call) => call,
        Err(payload) => return Err(BackendError::panicked(op, &*payload)),
    };
    // The future is never polled again after it panicked: `Ready` ends it.
    std::future::poll_fn(
        |cx| match catch_unwind(AssertUnwindSafe(|| call.as_mut().poll(cx))) {
            Ok(poll) => poll,
            Err(payload) => Poll::Ready(Err(BackendError::panicked(op, &*payload))),
        },
    )
    .await
}

/// How the batcher of a backend sends a batch: [`Backend::renew_many`];
/// `None` once the backend is dropped.
fn sender(inner: std::sync::Weak<Inner>) -> batch::SendFn {
    Arc::new(move |renewals: Vec<Renewal>| {
        let inner = inner.clone();
        Box::pin(async move {
            let backend = Backend {
                inner: inner.upgrade()?,
            };
            Some(backend.renew_many(&renewals).await)
        }) as batch::Sent
    })
}

/// The object-safe twin of [`BackendEdge`].
trait DynEdge: Send + Sync + 'static {
    fn name(&self) -> &'static str;
    fn min_ttl(&self) -> Duration;
    fn validate_key(&self, key: &Key) -> Result<(), ConfigError>;
    fn setup(&self, budget: Duration) -> BoxFuture<'_, Result<Prepared, BackendError>>;
    fn acquire<'a>(
        &'a self,
        key: &'a Key,
        claim: &'a Claim,
        ttl: Duration,
        budget: Duration,
    ) -> BoxFuture<'a, Result<Acquired, BackendError>>;
    fn renew<'a>(
        &'a self,
        key: &'a Key,
        lease: &'a Lease,
        ttl: Duration,
        budget: Duration,
    ) -> BoxFuture<'a, Result<Renewed, BackendError>>;
    fn release<'a>(
        &'a self,
        key: &'a Key,
        lease: &'a Lease,
        budget: Duration,
    ) -> BoxFuture<'a, Result<(), BackendError>>;
    fn holder<'a>(
        &'a self,
        key: &'a Key,
        budget: Duration,
    ) -> BoxFuture<'a, Result<Option<Holder>, BackendError>>;
    fn keys(&self, budget: Duration) -> BoxFuture<'_, Result<Vec<Key>, BackendError>>;
    fn watch(&self) -> BoxFuture<'_, Result<Option<WatchStream>, BackendError>>;
    fn watch_reports_expiry(&self) -> bool;
    fn batches_renewals(&self) -> bool;
    fn renew_many<'a>(
        &'a self,
        renewals: &'a [Renewal],
    ) -> BoxFuture<'a, Vec<Result<Renewed, BackendError>>>;
    fn supports_candidates(&self) -> bool;
    fn supports_proclaim(&self) -> bool;
    fn proclaim<'a>(
        &'a self,
        key: &'a Key,
        lease: &'a Lease,
        metadata: &'a Bytes,
        ttl: Duration,
        budget: Duration,
    ) -> BoxFuture<'a, Result<Renewed, BackendError>>;
    fn register<'a>(
        &'a self,
        key: &'a Key,
        candidate: &'a Candidate,
        ttl: Duration,
        budget: Duration,
    ) -> BoxFuture<'a, Result<(), BackendError>>;
    fn deregister<'a>(
        &'a self,
        key: &'a Key,
        id: LeaderId,
        budget: Duration,
    ) -> BoxFuture<'a, Result<(), BackendError>>;
    fn candidates<'a>(
        &'a self,
        key: &'a Key,
        budget: Duration,
    ) -> BoxFuture<'a, Result<Vec<Candidate>, BackendError>>;
    fn candidate<'a>(
        &'a self,
        key: &'a Key,
        id: LeaderId,
        budget: Duration,
    ) -> BoxFuture<'a, Result<Option<Candidate>, BackendError>>;
}

impl<T: BackendEdge> DynEdge for T {
    fn name(&self) -> &'static str {
        BackendEdge::name(self)
    }
    fn min_ttl(&self) -> Duration {
        BackendEdge::min_ttl(self)
    }
    fn validate_key(&self, key: &Key) -> Result<(), ConfigError> {
        BackendEdge::validate_key(self, key)
    }
    fn setup(&self, budget: Duration) -> BoxFuture<'_, Result<Prepared, BackendError>> {
        Box::pin(BackendEdge::setup(self, budget))
    }
    fn acquire<'a>(
        &'a self,
        key: &'a Key,
        claim: &'a Claim,
        ttl: Duration,
        budget: Duration,
    ) -> BoxFuture<'a, Result<Acquired, BackendError>> {
        Box::pin(BackendEdge::acquire(self, key, claim, ttl, budget))
    }
    fn renew<'a>(
        &'a self,
        key: &'a Key,
        lease: &'a Lease,
        ttl: Duration,
        budget: Duration,
    ) -> BoxFuture<'a, Result<Renewed, BackendError>> {
        Box::pin(BackendEdge::renew(self, key, lease, ttl, budget))
    }
    fn release<'a>(
        &'a self,
        key: &'a Key,
        lease: &'a Lease,
        budget: Duration,
    ) -> BoxFuture<'a, Result<(), BackendError>> {
        Box::pin(BackendEdge::release(self, key, lease, budget))
    }
    fn holder<'a>(
        &'a self,
        key: &'a Key,
        budget: Duration,
    ) -> BoxFuture<'a, Result<Option<Holder>, BackendError>> {
        Box::pin(BackendEdge::holder(self, key, budget))
    }
    fn keys(&self, budget: Duration) -> BoxFuture<'_, Result<Vec<Key>, BackendError>> {
        Box::pin(BackendEdge::keys(self, budget))
    }
    fn watch(&self) -> BoxFuture<'_, Result<Option<WatchStream>, BackendError>> {
        Box::pin(BackendEdge::watch(self))
    }
    fn watch_reports_expiry(&self) -> bool {
        BackendEdge::watch_reports_expiry(self)
    }
    fn batches_renewals(&self) -> bool {
        BackendEdge::batches_renewals(self)
    }
    fn renew_many<'a>(
        &'a self,
        renewals: &'a [Renewal],
    ) -> BoxFuture<'a, Vec<Result<Renewed, BackendError>>> {
        Box::pin(BackendEdge::renew_many(self, renewals))
    }
    fn supports_candidates(&self) -> bool {
        BackendEdge::supports_candidates(self)
    }
    fn supports_proclaim(&self) -> bool {
        BackendEdge::supports_proclaim(self)
    }
    fn proclaim<'a>(
        &'a self,
        key: &'a Key,
        lease: &'a Lease,
        metadata: &'a Bytes,
        ttl: Duration,
        budget: Duration,
    ) -> BoxFuture<'a, Result<Renewed, BackendError>> {
        Box::pin(BackendEdge::proclaim(
            self, key, lease, metadata, ttl, budget,
        ))
    }
    fn register<'a>(
        &'a self,
        key: &'a Key,
        candidate: &'a Candidate,
        ttl: Duration,
        budget: Duration,
    ) -> BoxFuture<'a, Result<(), BackendError>> {
        Box::pin(BackendEdge::register(self, key, candidate, ttl, budget))
    }
    fn deregister<'a>(
        &'a self,
        key: &'a Key,
        id: LeaderId,
        budget: Duration,
    ) -> BoxFuture<'a, Result<(), BackendError>> {
        Box::pin(BackendEdge::deregister(self, key, id, budget))
    }
    fn candidates<'a>(
        &'a self,
        key: &'a Key,
        budget: Duration,
    ) -> BoxFuture<'a, Result<Vec<Candidate>, BackendError>> {
        Box::pin(BackendEdge::candidates(self, key, budget))
    }
    fn candidate<'a>(
        &'a self,
        key: &'a Key,
        id: LeaderId,
        budget: Duration,
    ) -> BoxFuture<'a, Result<Option<Candidate>, BackendError>> {
        Box::pin(BackendEdge::candidate(self, key, id, budget))
    }
}

/// A store connection shared by many [`Leader`](crate::Leader)s.
///
/// Cheap to clone: clones share the store client and one watch subscription,
/// demultiplexed to the keys' campaigns. A process campaigning for many keys
/// should build one `Backend` and pass clones of it.
///
/// ```
/// use leaseholder::{Backend, MemoryStore};
/// let store = MemoryStore::new();
/// let backend = Backend::memory(&store);
/// let shared = backend.clone();
/// # let _ = shared;
/// ```
#[derive(Clone)]
pub struct Backend {
    inner: Arc<Inner>,
}

struct Inner {
    edge: Box<dyn DynEdge>,
    hub: hub::Hub,
    /// Gathers renewals for `renew_many`, if the edge batches them.
    batcher: batch::Batcher,
    /// `Some(when)` if the first successful setup created the store object.
    setup: tokio::sync::OnceCell<Option<tokio::time::Instant>>,
}

impl Backend {
    /// Wraps any [`BackendEdge`].
    pub fn new(edge: impl BackendEdge) -> Backend {
        Backend {
            inner: Arc::new(Inner {
                edge: Box::new(edge),
                hub: hub::Hub::default(),
                batcher: batch::Batcher::default(),
                setup: tokio::sync::OnceCell::new(),
            }),
        }
    }

    /// A backend on the NATS JetStream KV bucket `bucket` (feature `nats`).
    #[cfg(feature = "nats")]
    #[cfg_attr(docsrs, doc(cfg(feature = "nats")))]
    pub fn nats(client: async_nats::Client, bucket: &str) -> Backend {
        Backend::new(nats::NatsBackend::new(client, bucket))
    }

    /// A backend on a PostgreSQL table (feature `postgres`); see
    /// [`PostgresBackend`](postgres::PostgresBackend).
    #[cfg(feature = "postgres")]
    #[cfg_attr(docsrs, doc(cfg(feature = "postgres")))]
    pub fn postgres(backend: postgres::PostgresBackend) -> Backend {
        Backend::new(backend)
    }

    /// A backend on Redis: one server, a Sentinel group or a Cluster
    /// (feature `redis`); see [`RedisBackend`](redis::RedisBackend).
    #[cfg(feature = "redis")]
    #[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
    pub fn redis(backend: redis::RedisBackend) -> Backend {
        Backend::new(backend)
    }

    /// A backend on etcd 3.4 or newer (feature `etcd`): one etcd lease per
    /// backend keeps every key it holds alive; see
    /// [`EtcdBackend`](etcd::EtcdBackend).
    #[cfg(feature = "etcd")]
    #[cfg_attr(docsrs, doc(cfg(feature = "etcd")))]
    pub fn etcd(backend: etcd::EtcdBackend) -> Backend {
        Backend::new(backend)
    }

    /// A backend on a SQLite file shared by the processes of one host
    /// (feature `sqlite`), run on tokio's blocking pool; see
    /// [`SqliteBackend`](sqlite::SqliteBackend).
    #[cfg(feature = "sqlite")]
    #[cfg_attr(docsrs, doc(cfg(feature = "sqlite")))]
    pub fn sqlite(backend: sqlite::SqliteBackend) -> Backend {
        Backend::blocking(backend)
    }

    /// A backend on a store with a synchronous client, run on tokio's
    /// blocking pool; see [`blocking`].
    pub fn blocking(edge: impl blocking::BlockingBackendEdge) -> Backend {
        Backend::new(blocking::Blocking::new(edge))
    }

    /// A backend on an in-process [`MemoryStore`](memory::MemoryStore).
    pub fn memory(store: &memory::MemoryStore) -> Backend {
        Backend::new(store.backend())
    }

    /// The backend's name.
    pub fn name(&self) -> &'static str {
        self.inner.edge.name()
    }

    /// See [`BackendEdge::min_ttl`].
    pub fn min_ttl(&self) -> Duration {
        self.inner.edge.min_ttl()
    }

    /// See [`BackendEdge::validate_key`].
    pub fn validate_key(&self, key: &Key) -> Result<(), ConfigError> {
        self.inner.edge.validate_key(key)
    }

    /// See [`BackendEdge::setup`]. Runs once per `Backend` (and its
    /// clones) after it first succeeds: many `Leader`s sharing a backend set
    /// the store up once, and every later call reports what the first one
    /// found. The budget is [`DEFAULT_BUDGET`].
    pub async fn setup(&self) -> Result<Prepared, BackendError> {
        self.setup_within(DEFAULT_BUDGET).await
    }

    /// [`setup`](Self::setup) with the time it may take.
    pub async fn setup_within(&self, budget: Duration) -> Result<Prepared, BackendError> {
        Ok(match self.setup_at(budget).await? {
            Some(_) => Prepared::Created,
            None => Prepared::Existing,
        })
    }

    /// Like [`setup`](Self::setup): `Some(when)` (tokio's clock) if the
    /// store object was created by this backend's setup.
    pub(crate) async fn setup_at(
        &self,
        budget: Duration,
    ) -> Result<Option<tokio::time::Instant>, BackendError> {
        self.inner
            .setup
            .get_or_try_init(|| async {
                Ok(
                    match guarded(Op::Setup, || self.inner.edge.setup(budget)).await? {
                        Prepared::Created => Some(tokio::time::Instant::now()),
                        _ => None,
                    },
                )
            })
            .await
            .copied()
    }

    /// See [`BackendEdge::acquire`]; the budget is `ttl`.
    pub async fn acquire(
        &self,
        key: &Key,
        claim: &Claim,
        ttl: Duration,
    ) -> Result<Acquired, BackendError> {
        self.acquire_within(key, claim, ttl, ttl).await
    }

    /// See [`BackendEdge::acquire`].
    pub async fn acquire_within(
        &self,
        key: &Key,
        claim: &Claim,
        ttl: Duration,
        budget: Duration,
    ) -> Result<Acquired, BackendError> {
        self.kicked(
            guarded(Op::Acquire, || {
                self.inner.edge.acquire(key, claim, ttl, budget)
            })
            .await,
        )
    }

    /// See [`BackendEdge::renew`]; the budget is `ttl`.
    pub async fn renew(
        &self,
        key: &Key,
        lease: &Lease,
        ttl: Duration,
    ) -> Result<Renewed, BackendError> {
        self.renew_within(key, lease, ttl, ttl).await
    }

    /// See [`BackendEdge::renew`].
    pub async fn renew_within(
        &self,
        key: &Key,
        lease: &Lease,
        ttl: Duration,
        budget: Duration,
    ) -> Result<Renewed, BackendError> {
        let inner = &self.inner;
        let batches = inner.edge.batches_renewals();
        if !batches || inner.batcher.is_alone(key) {
            let result = guarded(Op::Renew, || inner.edge.renew(key, lease, ttl, budget)).await;
            if batches && result.is_ok() {
                inner.batcher.rejoin(key);
            }
            return self.kicked(result);
        }
        let renewal = Renewal::new(key.clone(), lease.clone(), ttl, budget);
        let weak = Arc::downgrade(&self.inner);
        let result = inner.batcher.renew(renewal, move || sender(weak)).await;
        self.kicked(result)
    }

    /// See [`BackendEdge::renew_many`]: the renewals in one call, whether
    /// or not the backend [batches renewals](BackendEdge::batches_renewals)
    /// (the campaigns' renewals through [`renew_within`](Self::renew_within)
    /// are gathered into such calls when it does). One result per renewal,
    /// in order; a panic in the backend is `Panicked` for each.
    pub async fn renew_many(&self, renewals: &[Renewal]) -> Vec<Result<Renewed, BackendError>> {
        let n = renewals.len();
        let results = guarded(Op::Renew, || {
            Box::pin(async { Ok(self.inner.edge.renew_many(renewals).await) })
        })
        .await;
        let mut results = match results {
            Ok(results) => results,
            Err(e) => batch::each(e, n),
        };
        results.truncate(n);
        while results.len() < n {
            results.push(Err(BackendError::unavailable(
                "renew_many gave no result for this renewal (a backend bug)",
            )));
        }
        if results.iter().any(Result::is_ok) {
            self.inner.hub.kick();
        }
        results
    }

    /// See [`BackendEdge::release`]; the budget is [`DEFAULT_BUDGET`].
    pub async fn release(&self, key: &Key, lease: &Lease) -> Result<(), BackendError> {
        self.release_within(key, lease, DEFAULT_BUDGET).await
    }

    /// See [`BackendEdge::release`].
    pub async fn release_within(
        &self,
        key: &Key,
        lease: &Lease,
        budget: Duration,
    ) -> Result<(), BackendError> {
        self.kicked(guarded(Op::Release, || self.inner.edge.release(key, lease, budget)).await)
    }

    /// See [`BackendEdge::holder`]; the budget is [`DEFAULT_BUDGET`].
    pub async fn holder(&self, key: &Key) -> Result<Option<Holder>, BackendError> {
        self.holder_within(key, DEFAULT_BUDGET).await
    }

    /// See [`BackendEdge::holder`].
    pub async fn holder_within(
        &self,
        key: &Key,
        budget: Duration,
    ) -> Result<Option<Holder>, BackendError> {
        self.kicked(guarded(Op::Holder, || self.inner.edge.holder(key, budget)).await)
    }

    /// See [`BackendEdge::keys`]: sorted, without duplicates. The budget
    /// is [`DEFAULT_BUDGET`].
    pub async fn keys(&self) -> Result<Vec<Key>, BackendError> {
        self.keys_within(DEFAULT_BUDGET).await
    }

    /// See [`BackendEdge::keys`]: sorted, without duplicates.
    pub async fn keys_within(&self, budget: Duration) -> Result<Vec<Key>, BackendError> {
        let mut keys = self.kicked(guarded(Op::Keys, || self.inner.edge.keys(budget)).await)?;
        keys.sort();
        keys.dedup();
        Ok(keys)
    }

    /// Every key with a live lease and its holder, sorted by key: one
    /// [`keys`](BackendEdge::keys) call, then one
    /// [`holder`](BackendEdge::holder) read per key (each with the whole
    /// `budget`), leaving out keys that turn out free. Not a snapshot: each
    /// holder is as its own read found it.
    pub async fn holders_within(
        &self,
        budget: Duration,
    ) -> Result<Vec<(Key, Holder)>, BackendError> {
        let mut found = Vec::new();
        for key in self.keys_within(budget).await? {
            if let Some(holder) = self.holder_within(&key, budget).await? {
                found.push((key, holder));
            }
        }
        Ok(found)
    }

    /// Ends the term `holder` shows (a holder read from this key), whoever
    /// holds it: an operator's forced release. The next candidate takes
    /// over at once, with a larger token.
    ///
    /// It is an ordinary [`release`](BackendEdge::release) of
    /// [`Lease::from_holder`], so it compares on the lease's nonce: if the
    /// key has moved on to a newer term since `holder` was read, that term
    /// is left alone. The key is then read back: [`ForceReleased::Ended`]
    /// with what it holds now. A [foreign](Holder::is_foreign) holder is
    /// left alone ([`ForceReleased::Foreign`]).
    ///
    /// **What the old leader sees.** Its work is not stopped by the store:
    /// its campaign finds the lease gone at its next renewal (at once on
    /// backends whose watch reports the release, else within one renew
    /// interval), cancels the work's token and becomes a follower. Until
    /// then, its work and the next leader's may overlap: only fencing
    /// tokens protect writes made in that window (the old leader's token is
    /// smaller). Prefer [`Leader::resign`](crate::Leader::resign) where you
    /// can reach the leader's process.
    ///
    /// A second call for the same holder finds the term ended and reports
    /// `Ended` again: idempotent.
    pub async fn force_release_within(
        &self,
        key: &Key,
        holder: &Holder,
        budget: Duration,
    ) -> Result<ForceReleased, BackendError> {
        let Some(lease) = Lease::from_holder(holder) else {
            return Ok(ForceReleased::Foreign);
        };
        self.release_within(key, &lease, budget).await?;
        let now = self.holder_within(key, budget).await?;
        if now.as_ref().is_some_and(|h| h.is_nonce(lease.nonce())) {
            return Err(BackendError::unavailable(format!(
                "the lease of key {key} with token {} was still there after its release",
                lease.token()
            )));
        }
        Ok(ForceReleased::Ended {
            token: lease.token(),
            now,
        })
    }

    /// A call that succeeded shows the store reachable: a watch that is
    /// backing off reconnects now.
    fn kicked<T>(&self, result: Result<T, BackendError>) -> Result<T, BackendError> {
        if result.is_ok() {
            self.inner.hub.kick();
        }
        result
    }

    /// See [`BackendEdge::watch_reports_expiry`].
    pub fn watch_reports_expiry(&self) -> bool {
        self.inner.edge.watch_reports_expiry()
    }

    /// See [`BackendEdge::supports_candidates`].
    pub fn supports_candidates(&self) -> bool {
        self.inner.edge.supports_candidates()
    }

    /// See [`BackendEdge::supports_proclaim`].
    pub fn supports_proclaim(&self) -> bool {
        self.inner.edge.supports_proclaim()
    }

    /// See [`BackendEdge::proclaim`].
    pub async fn proclaim_within(
        &self,
        key: &Key,
        lease: &Lease,
        metadata: &Bytes,
        ttl: Duration,
        budget: Duration,
    ) -> Result<Renewed, BackendError> {
        self.kicked(
            guarded(Op::Proclaim, || {
                self.inner.edge.proclaim(key, lease, metadata, ttl, budget)
            })
            .await,
        )
    }

    /// See [`BackendEdge::register`].
    pub async fn register_within(
        &self,
        key: &Key,
        candidate: &Candidate,
        ttl: Duration,
        budget: Duration,
    ) -> Result<(), BackendError> {
        self.kicked(
            guarded(Op::Register, || {
                self.inner.edge.register(key, candidate, ttl, budget)
            })
            .await,
        )
    }

    /// See [`BackendEdge::deregister`].
    pub async fn deregister_within(
        &self,
        key: &Key,
        id: LeaderId,
        budget: Duration,
    ) -> Result<(), BackendError> {
        self.kicked(
            guarded(Op::Deregister, || {
                self.inner.edge.deregister(key, id, budget)
            })
            .await,
        )
    }

    /// See [`BackendEdge::candidates`]; the budget is [`DEFAULT_BUDGET`].
    pub async fn candidates(&self, key: &Key) -> Result<Vec<Candidate>, BackendError> {
        self.candidates_within(key, DEFAULT_BUDGET).await
    }

    /// See [`BackendEdge::candidates`].
    pub async fn candidates_within(
        &self,
        key: &Key,
        budget: Duration,
    ) -> Result<Vec<Candidate>, BackendError> {
        self.kicked(guarded(Op::Candidates, || self.inner.edge.candidates(key, budget)).await)
    }

    /// See [`BackendEdge::candidate`]; the budget is [`DEFAULT_BUDGET`].
    pub async fn candidate(
        &self,
        key: &Key,
        id: LeaderId,
    ) -> Result<Option<Candidate>, BackendError> {
        self.candidate_within(key, id, DEFAULT_BUDGET).await
    }

    /// See [`BackendEdge::candidate`].
    pub async fn candidate_within(
        &self,
        key: &Key,
        id: LeaderId,
        budget: Duration,
    ) -> Result<Option<Candidate>, BackendError> {
        self.kicked(
            guarded(Op::Candidates, || {
                self.inner.edge.candidate(key, id, budget)
            })
            .await,
        )
    }

    /// Subscribes to the watch events of one key. The first subscription
    /// starts the backend's single watcher task; it stops when the last
    /// `Backend` clone is dropped. Must be called inside a tokio runtime.
    pub fn subscribe(&self, key: &Key) -> Subscription {
        let weak = Arc::downgrade(&self.inner);
        self.inner.hub.subscribe(key, move || {
            let weak = weak.clone();
            async move {
                match weak.upgrade() {
                    Some(inner) => Some(guarded(Op::Watch, || inner.edge.watch()).await),
                    None => None,
                }
            }
        })
    }
}

impl fmt::Debug for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Backend")
            .field("name", &self.name())
            .finish_non_exhaustive()
    }
}
