//! The crate's error types.
//!
//! [`Error`] is what the public API returns. [`BackendError`] is what a
//! [`BackendEdge`](crate::BackendEdge) returns; the campaign wraps it in
//! [`Error::Backend`] together with the operation and key that failed.
//! [`ConfigError`] comes only from [`LeaderBuilder::build`](crate::LeaderBuilder::build):
//! once a [`Leader`](crate::Leader) is built, its configuration never fails.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use crate::backend::{FencingToken, Key, LeaderId};

/// A boxed error, as carried by [`Error::Work`] and the `source` of
/// [`BackendError`].
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Everything that can go wrong in the public API.
///
/// The wording of `Display` is not part of the API; match on the variant.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The configuration was rejected (only from `build()`, or from the first
    /// use of a [`Leader::new`](crate::Leader::new) handle whose key is invalid).
    #[error("invalid configuration")]
    Config(#[from] ConfigError),

    /// The store failed in a way that retrying will not fix (unsupported
    /// server, wrong bucket or table settings, permission denied), or a
    /// one-shot call such as [`Leader::current_leader`](crate::Leader::current_leader)
    /// failed.
    #[error("{op} failed for key {key}")]
    Backend {
        /// The operation that failed.
        op: Op,
        /// The key it failed for.
        key: Key,
        /// What the store said (shared: a campaign that stops reports it to
        /// every caller waiting on it).
        #[source]
        source: Arc<BackendError>,
    },

    /// Leadership for `key` was lost while the caller expected to lead.
    #[error("leadership of key {key} was lost (term with fencing token {token})")]
    Lost {
        /// The key.
        key: Key,
        /// The fencing token of the term that was lost.
        token: FencingToken,
    },

    /// The work passed to `acquire_and_run` or `do_while_leader` returned an
    /// error. The lease was released before this was returned.
    #[error("the leader's work failed")]
    Work(#[source] BoxError),

    /// The work panicked. The panic did not unwind into the campaign; the
    /// lease was released before this was returned.
    #[error("the leader's work for key {key} panicked")]
    Panicked {
        /// The key whose work panicked.
        key: Key,
    },

    /// The campaign task itself panicked (a bug in leaseholder, or in a
    /// backend's synchronous method). It was contained: the term's token
    /// fired, the work was dropped and awaited, and the campaign stopped;
    /// a lease left in the store expires there. A panic inside a backend
    /// call is reported as [`Error::Backend`] with
    /// [`BackendError::Panicked`] instead.
    #[error("the campaign for key {key} panicked: {message}")]
    CampaignPanicked {
        /// The key.
        key: Key,
        /// The panic's message, if it had one.
        message: String,
    },

    /// Another `acquire_and_run` or `do_while_leader` is already running work
    /// on this `Leader`. Each handle runs one piece of work at a time.
    #[error("work is already running for key {key} on this handle")]
    AlreadyRunning {
        /// The key.
        key: Key,
    },

    /// The `Leader` was shut down; it does not campaign again.
    #[error("the leader for key {key} has been shut down")]
    Shutdown {
        /// The key.
        key: Key,
    },

    /// [`Leader::proclaim`](crate::Leader::proclaim) was called while this
    /// candidate does not lead.
    #[error("not leading key {key}")]
    NotLeading {
        /// The key.
        key: Key,
    },

    /// [`Leader::resign_to`](crate::Leader::resign_to) named a candidate
    /// that is not live in the key's registry (or this candidate itself).
    /// The leader did not step down.
    #[error("{candidate} is not a live candidate for key {key}")]
    NotACandidate {
        /// The key.
        key: Key,
        /// The candidate named.
        candidate: LeaderId,
    },
}

impl Error {
    /// `true` if retrying the same call later may succeed (a store that is
    /// unreachable right now). `false` for configuration errors, fatal store
    /// errors and errors of the user's work.
    pub fn is_transient(&self) -> bool {
        match self {
            Error::Backend { source, .. } => source.is_transient(),
            _ => false,
        }
    }

    /// `true` if this is [`Error::Lost`].
    pub fn is_lost(&self) -> bool {
        matches!(self, Error::Lost { .. })
    }
}

/// The store operation an [`Error::Backend`] refers to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Op {
    /// [`BackendEdge::setup`](crate::BackendEdge::setup).
    Setup,
    /// [`BackendEdge::acquire`](crate::BackendEdge::acquire).
    Acquire,
    /// [`BackendEdge::renew`](crate::BackendEdge::renew).
    Renew,
    /// [`BackendEdge::release`](crate::BackendEdge::release).
    Release,
    /// [`BackendEdge::holder`](crate::BackendEdge::holder).
    Holder,
    /// [`BackendEdge::keys`](crate::BackendEdge::keys).
    Keys,
    /// [`BackendEdge::watch`](crate::BackendEdge::watch).
    Watch,
    /// [`BackendEdge::proclaim`](crate::BackendEdge::proclaim).
    Proclaim,
    /// [`BackendEdge::register`](crate::BackendEdge::register).
    Register,
    /// [`BackendEdge::deregister`](crate::BackendEdge::deregister).
    Deregister,
    /// [`BackendEdge::candidates`](crate::BackendEdge::candidates).
    Candidates,
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Op::Setup => "setup",
            Op::Acquire => "acquire",
            Op::Renew => "renew",
            Op::Release => "release",
            Op::Holder => "holder",
            Op::Keys => "keys",
            Op::Watch => "watch",
            Op::Proclaim => "proclaim",
            Op::Register => "register",
            Op::Deregister => "deregister",
            Op::Candidates => "candidates",
        })
    }
}

/// What a [`BackendEdge`](crate::BackendEdge) reports when an operation fails.
///
/// The variant tells the campaign what to do: transient errors
/// ([`is_transient`](Self::is_transient)) are retried with backoff; the
/// others stop the campaign and are returned to the caller.
///
/// A transient error on a write (`acquire`, `renew`) is treated as
/// *ambiguous*: the write may have taken effect. The campaign reads the key
/// back and compares the lease's nonce before it believes either way.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BackendError {
    /// The store could not be reached, or the connection broke. Transient.
    #[error("store unavailable")]
    Unavailable(#[source] BoxError),

    /// No reply came within the time the campaign allowed. Transient; the
    /// request may still take effect.
    #[error("no reply within {0:?}")]
    Timeout(Duration),

    /// The store's server is too old or lacks a capability.
    #[error("unsupported server: {what}; needs {needed}")]
    Unsupported {
        /// What is missing, e.g. "per-message TTL (nats-server 2.9.25)".
        what: String,
        /// What is needed, e.g. "nats-server 2.11 or newer".
        needed: String,
    },

    /// The bucket, table or other store object exists with settings that
    /// break the lease contract.
    #[error("store misconfigured: {problem}; {fix}")]
    Misconfigured {
        /// What is wrong.
        problem: String,
        /// What to change.
        fix: String,
    },

    /// The store refused the request for lack of permission.
    #[error("permission denied")]
    Denied(#[source] BoxError),

    /// Any other error the store reported that retrying will not fix.
    #[error("store error")]
    Fatal(#[source] BoxError),

    /// The backend panicked in this call. Not retried: the campaign gives
    /// up its term (the token fires first) and stops, as for
    /// [`Fatal`](Self::Fatal).
    #[error("the backend panicked in {op}: {message}")]
    Panicked {
        /// The call that panicked.
        op: Op,
        /// The panic's message, if it had one.
        message: String,
    },
}

impl BackendError {
    /// `true` for errors the campaign retries ([`Unavailable`](Self::Unavailable),
    /// [`Timeout`](Self::Timeout)).
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            BackendError::Unavailable(_) | BackendError::Timeout(_)
        )
    }

    /// Shorthand for [`BackendError::Unavailable`] from any error.
    pub fn unavailable(err: impl Into<BoxError>) -> Self {
        BackendError::Unavailable(err.into())
    }

    /// Shorthand for [`BackendError::Denied`] from any error. Its message
    /// should name what was refused (the subject, the table), since the
    /// variant's own says only "permission denied".
    pub fn denied(err: impl Into<BoxError>) -> Self {
        BackendError::Denied(err.into())
    }

    /// Shorthand for [`BackendError::Fatal`] from any error.
    pub fn fatal(err: impl Into<BoxError>) -> Self {
        BackendError::Fatal(err.into())
    }

    /// An error of the same kind and message, for each renewal of a batch
    /// that failed as a whole ([`BackendEdge::renew_many`](crate::BackendEdge::renew_many)
    /// answers every renewal with its own result). A source error is
    /// carried as its message chain (`a: b: c`), since errors do not clone.
    ///
    /// ```
    /// use leaseholder::BackendError;
    /// let e = BackendError::unavailable("connection reset");
    /// let copy = e.replicate();
    /// assert!(copy.is_transient());
    /// assert_eq!(copy.to_string(), e.to_string());
    /// ```
    pub fn replicate(&self) -> BackendError {
        fn chain(e: &BoxError) -> BoxError {
            let mut text = e.to_string();
            let mut source = e.source();
            while let Some(s) = source {
                text.push_str(": ");
                text.push_str(&s.to_string());
                source = s.source();
            }
            text.into()
        }
        match self {
            BackendError::Unavailable(e) => BackendError::Unavailable(chain(e)),
            BackendError::Timeout(d) => BackendError::Timeout(*d),
            BackendError::Unsupported { what, needed } => BackendError::Unsupported {
                what: what.clone(),
                needed: needed.clone(),
            },
            BackendError::Misconfigured { problem, fix } => BackendError::Misconfigured {
                problem: problem.clone(),
                fix: fix.clone(),
            },
            BackendError::Denied(e) => BackendError::Denied(chain(e)),
            BackendError::Fatal(e) => BackendError::Fatal(chain(e)),
            BackendError::Panicked { op, message } => BackendError::Panicked {
                op: *op,
                message: message.clone(),
            },
        }
    }

    /// [`BackendError::Panicked`] from a caught panic's payload.
    pub(crate) fn panicked(op: Op, payload: &(dyn std::any::Any + Send)) -> Self {
        BackendError::Panicked {
            op,
            message: panic_message(payload),
        }
    }
}

/// The message of a caught panic, if it carried one.
pub(crate) fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "(no message)".to_owned()
    }
}

/// A configuration rejected by [`LeaderBuilder::build`](crate::LeaderBuilder::build).
///
/// Each variant names the setting and the rule it broke.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// No backend was given to the builder.
    #[error("no backend: call .backend(..) on the builder")]
    MissingBackend,

    /// The key is empty.
    #[error("key is empty")]
    EmptyKey,

    /// The key is longer than the limit.
    #[error("key is {len} bytes long; the limit is {max}")]
    KeyTooLong {
        /// Its length in bytes.
        len: usize,
        /// The limit.
        max: usize,
    },

    /// The key holds a character the backend cannot store.
    #[error("key {key:?} contains {ch:?}, which the {backend} backend cannot store ({rule})")]
    KeyCharacter {
        /// The key as given.
        key: String,
        /// The first offending character.
        ch: char,
        /// The backend's name.
        backend: &'static str,
        /// The backend's rule for keys.
        rule: &'static str,
    },

    /// A key the backend rejects for another reason.
    #[error("key {key:?} is not valid for the {backend} backend: {rule}")]
    KeyRejected {
        /// The key as given.
        key: String,
        /// The backend's name.
        backend: &'static str,
        /// The rule it broke.
        rule: &'static str,
    },

    /// A backend's own settings are invalid (a table name, a connection
    /// string, a pool size).
    #[error("{backend} backend: {problem}")]
    Backend {
        /// The backend's name.
        backend: &'static str,
        /// What is wrong, and what to change.
        problem: String,
    },

    /// The ttl is shorter than the backend can express.
    #[error("ttl {ttl:?} is below {min:?}, the shortest the {backend} backend supports")]
    TtlTooShort {
        /// The ttl given.
        ttl: Duration,
        /// The backend's minimum.
        min: Duration,
        /// The backend's name.
        backend: &'static str,
    },

    /// `drift_margin` must be greater than zero and less than half the ttl.
    #[error("drift_margin {drift:?} must be > 0 and < ttl/2 (ttl is {ttl:?})")]
    DriftMargin {
        /// The drift margin.
        drift: Duration,
        /// The ttl.
        ttl: Duration,
    },

    /// `renew_interval` leaves no room for one retry before the deadline.
    #[error(
        "renew_interval {renew:?} is too long: ttl - drift_margin ({usable:?}) must be at least \
         2 x renew_interval x (1 + jitter), so a failed renewal can be retried before the deadline"
    )]
    RenewInterval {
        /// The renew interval.
        renew: Duration,
        /// ttl - drift margin.
        usable: Duration,
    },

    /// A duration setting that must be greater than zero is zero.
    #[error("{field} must be greater than zero")]
    Zero {
        /// The setting's name.
        field: &'static str,
    },

    /// A duration setting is longer than
    /// [`MAX_INTERVAL`](crate::MAX_INTERVAL) allows.
    #[error("{field} {value:?} is too long; the limit is {max:?}")]
    TooLong {
        /// The setting's name.
        field: &'static str,
        /// The value given.
        value: Duration,
        /// The limit.
        max: Duration,
    },

    /// A duration setting is shorter than
    /// [`MIN_INTERVAL`](crate::MIN_INTERVAL) allows.
    #[error("{field} {value:?} is too short; the minimum is {min:?}")]
    TooShort {
        /// The setting's name.
        field: &'static str,
        /// The value given.
        value: Duration,
        /// The minimum.
        min: Duration,
    },

    /// A registry setting (priority, preemption, `.registry(true)`) on a
    /// backend that keeps no candidate registry.
    #[error(
        "the {backend} backend keeps no candidate registry, which priority, preemption and \
         Leader::candidates need"
    )]
    NoRegistry {
        /// The backend's name.
        backend: &'static str,
    },

    /// A registry setting was given with `.registry(false)`.
    #[error("{setting} needs the candidate registry, which .registry(false) turned off")]
    NeedsRegistry {
        /// The setting that needs it.
        setting: &'static str,
    },

    /// `jitter` must be a fraction in `[0, 1)`.
    #[error("jitter {0} must be in [0, 1)")]
    Jitter(String),

    /// The minimum backoff is above the maximum.
    #[error("backoff minimum {min:?} is above its maximum {max:?}")]
    Backoff {
        /// The minimum.
        min: Duration,
        /// The maximum.
        max: Duration,
    },

    /// The metadata is larger than the limit.
    #[error("metadata is {len} bytes; the limit is {max}")]
    MetadataTooLarge {
        /// Its size.
        len: usize,
        /// The limit.
        max: usize,
    },
}
