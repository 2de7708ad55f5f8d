//! [`LeaderBuilder`]: every setting of a [`Leader`], checked once in
//! [`build`](LeaderBuilder::build).

use std::time::Duration;

use bytes::Bytes;

use crate::Leader;
use crate::backend::{Backend, Key, MAX_METADATA_LEN};
use crate::error::ConfigError;

/// The longest ttl, renew, retry, drift or backoff setting `build()`
/// accepts: one year. Longer values are refused with
/// [`ConfigError::TooLong`], so that no instant the campaign computes can
/// overflow. (`drain_timeout` has no upper bound.)
pub const MAX_INTERVAL: Duration = Duration::from_secs(365 * 24 * 3600);

/// The shortest renew, retry, backoff or drain setting `build()` accepts:
/// one millisecond. Shorter (non-zero) values are refused with
/// [`ConfigError::TooShort`]: they would only make the campaign spin
/// against the store.
pub const MIN_INTERVAL: Duration = Duration::from_millis(1);

fn at_most(field: &'static str, value: Duration) -> Result<(), ConfigError> {
    if value > MAX_INTERVAL {
        return Err(ConfigError::TooLong {
            field,
            value,
            max: MAX_INTERVAL,
        });
    }
    Ok(())
}

fn at_least(field: &'static str, value: Duration) -> Result<(), ConfigError> {
    if value < MIN_INTERVAL {
        return Err(ConfigError::TooShort {
            field,
            value,
            min: MIN_INTERVAL,
        });
    }
    Ok(())
}

/// The validated settings of a [`Leader`]. Read them with
/// [`Leader::config`].
#[derive(Clone, Debug)]
pub struct LeaderConfig {
    pub(crate) key: Key,
    pub(crate) timing: Timing,
    pub(crate) metadata: Bytes,
    pub(crate) candidacy: Candidacy,
}

/// The registry settings, validated (see [`LeaderBuilder::registry`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Candidacy {
    pub(crate) registry: bool,
    pub(crate) priority: i32,
    pub(crate) preemptible: bool,
    pub(crate) min_term: Duration,
    pub(crate) holdoff: Duration,
}

/// The timing settings, validated (see [`LeaderBuilder`]).
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct Timing {
    pub(crate) ttl: Duration,
    pub(crate) renew_interval: Duration,
    pub(crate) retry_interval: Duration,
    pub(crate) drift_margin: Duration,
    pub(crate) jitter: f64,
    pub(crate) drain_timeout: Duration,
    pub(crate) backoff_min: Duration,
    pub(crate) backoff_max: Duration,
}

impl LeaderConfig {
    /// The key campaigned for.
    pub fn key(&self) -> &Key {
        &self.key
    }
    /// The lease's time to live in the store.
    pub fn ttl(&self) -> Duration {
        self.timing.ttl
    }
    /// How often the leader renews (before jitter).
    pub fn renew_interval(&self) -> Duration {
        self.timing.renew_interval
    }
    /// How often a follower retries when it has no better hint.
    pub fn retry_interval(&self) -> Duration {
        self.timing.retry_interval
    }
    /// How much earlier than the store the leader gives up its lease.
    pub fn drift_margin(&self) -> Duration {
        self.timing.drift_margin
    }
    /// The jitter fraction applied to intervals.
    pub fn jitter(&self) -> f64 {
        self.timing.jitter
    }
    /// How long shutdown and resign wait for the work to return.
    pub fn drain_timeout(&self) -> Duration {
        self.timing.drain_timeout
    }
    /// The backoff range for store errors.
    pub fn backoff(&self) -> (Duration, Duration) {
        (self.timing.backoff_min, self.timing.backoff_max)
    }
    /// The candidate's metadata.
    pub fn metadata(&self) -> &Bytes {
        &self.metadata
    }
    /// Whether this candidate keeps an entry in the candidate registry.
    pub fn registry(&self) -> bool {
        self.candidacy.registry
    }
    /// The candidate's priority (higher is preferred).
    pub fn priority(&self) -> i32 {
        self.candidacy.priority
    }
    /// Whether a candidate of higher priority may preempt this one.
    pub fn preemptible(&self) -> bool {
        self.candidacy.preemptible
    }
    /// How long a term lasts at least before a preemption.
    pub fn min_term(&self) -> Duration {
        self.candidacy.min_term
    }
    /// How long this candidate lets a preferred one try first.
    pub fn holdoff(&self) -> Duration {
        self.candidacy.holdoff
    }
}

/// Builds a [`Leader`]; every rule is checked in [`build`](Self::build), so
/// a built `Leader` never fails on its configuration.
///
/// ```
/// use std::time::Duration;
/// use leaseholder::{Backend, Leader, MemoryStore};
///
/// let store = MemoryStore::new();
/// let leader = Leader::builder("scheduler")
///     .backend(Backend::memory(&store))
///     .ttl(Duration::from_secs(10))
///     .metadata("10.0.0.7:8080")
///     .build()
///     .unwrap();
/// assert_eq!(leader.config().renew_interval(), Duration::from_secs(10) / 3);
///
/// // Rules are checked at build time:
/// let err = Leader::builder("scheduler")
///     .backend(Backend::memory(&store))
///     .ttl(Duration::from_secs(10))
///     .renew_interval(Duration::from_secs(5))
///     .build()
///     .unwrap_err();
/// assert!(err.to_string().contains("renew_interval"));
/// ```
#[derive(Debug)]
#[must_use = "call .build() to get a Leader"]
pub struct LeaderBuilder {
    key: String,
    backend: Option<Backend>,
    ttl: Duration,
    renew_interval: Option<Duration>,
    retry_interval: Option<Duration>,
    drift_margin: Option<Duration>,
    jitter: f64,
    drain_timeout: Duration,
    backoff: Option<(Duration, Duration)>,
    metadata: Bytes,
    registry: Option<bool>,
    priority: Option<i32>,
    preemptible: Option<bool>,
    min_term: Option<Duration>,
    holdoff: Option<Duration>,
}

impl LeaderBuilder {
    pub(crate) fn new(key: impl Into<String>) -> LeaderBuilder {
        LeaderBuilder {
            key: key.into(),
            backend: None,
            ttl: Duration::from_secs(10),
            renew_interval: None,
            retry_interval: None,
            drift_margin: None,
            jitter: 0.1,
            drain_timeout: Duration::from_secs(10),
            backoff: None,
            metadata: Bytes::new(),
            registry: None,
            priority: None,
            preemptible: None,
            min_term: None,
            holdoff: None,
        }
    }

    /// The store to hold the lease in. Required.
    pub fn backend(mut self, backend: Backend) -> Self {
        self.backend = Some(backend);
        self
    }

    /// The lease's time to live in the store. Default 10 s. A crashed
    /// leader is replaced within about one ttl; a shorter ttl fails over
    /// faster and costs more store writes (about three per ttl). At least
    /// the backend's minimum (1 s for stores with second resolution), at
    /// most [`MAX_INTERVAL`] (one year).
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.ttl = ttl;
        self
    }

    /// How often the leader renews. Default ttl/3. Must satisfy
    /// `ttl - drift_margin >= 2 x renew_interval x (1 + jitter)`, so that a
    /// renewal that fails can be retried before the deadline. At least
    /// [`MIN_INTERVAL`] (1 ms).
    pub fn renew_interval(mut self, interval: Duration) -> Self {
        self.renew_interval = Some(interval);
        self
    }

    /// How often a follower retries when neither a watch event nor the
    /// holder's expiry wakes it sooner. Default ttl/5. Between
    /// [`MIN_INTERVAL`] and [`MAX_INTERVAL`].
    pub fn retry_interval(mut self, interval: Duration) -> Self {
        self.retry_interval = Some(interval);
        self
    }

    /// How much earlier than the store's expiry the leader considers its
    /// lease lost: the allowance for clock-rate drift between this host and
    /// the store, and for scheduling delay. Default max(100 ms, ttl/10), but
    /// at most ttl/4. Must be > 0 and < ttl/2.
    pub fn drift_margin(mut self, margin: Duration) -> Self {
        self.drift_margin = Some(margin);
        self
    }

    /// The random fraction by which intervals are shortened, so candidates
    /// do not act in lockstep. Default 0.1. In `[0, 1)`.
    pub fn jitter(mut self, jitter: f64) -> Self {
        self.jitter = jitter;
        self
    }

    /// How long [`Leader::shutdown`] and [`Leader::resign`] wait for the
    /// work to return after its token is cancelled, while the lease is still
    /// renewed. When it passes, the work is dropped, then the lease released.
    /// Default 10 s; at least [`MIN_INTERVAL`]. `Duration::MAX` means no
    /// limit: wait as long as the work takes (the lease is renewed
    /// meanwhile; if it is lost, the work is still dropped before anyone
    /// else can lead).
    pub fn drain_timeout(mut self, timeout: Duration) -> Self {
        self.drain_timeout = timeout;
        self
    }

    /// The range of the capped, jittered exponential backoff after store
    /// errors. Default 50 ms up to the retry interval. The minimum is at
    /// least [`MIN_INTERVAL`], both at most [`MAX_INTERVAL`].
    pub fn backoff(mut self, min: Duration, max: Duration) -> Self {
        self.backoff = Some((min, max));
        self
    }

    /// Small data followers and observers see about the leader (an
    /// address, a hostname). At most 512 bytes.
    pub fn metadata(mut self, metadata: impl Into<Bytes>) -> Self {
        self.metadata = metadata.into();
        self
    }

    /// Keep an entry in the key's candidate registry, so that
    /// [`Leader::candidates`] lists this candidate, a free key goes to the
    /// preferred candidate first, and a candidate of higher priority can
    /// preempt the leader. Default: off, unless [`priority`](Self::priority),
    /// [`preemptible`](Self::preemptible), [`min_term`](Self::min_term) or
    /// [`holdoff`](Self::holdoff) is set. The backend must keep a registry
    /// ([`BackendEdge::supports_candidates`](crate::BackendEdge::supports_candidates)),
    /// else `build()` fails with [`ConfigError::NoRegistry`].
    ///
    /// The cost: one store write per renew interval for every candidate
    /// (the entry's renewal), plus, for the leader, one read of the
    /// registry per renew interval; a follower reads it once each time the
    /// key becomes free. Without the registry an idle follower makes no
    /// store calls at all on a backend whose watch reports expiry.
    ///
    /// ```
    /// use leaseholder::{Backend, Leader, MemoryStore};
    ///
    /// let store = MemoryStore::new();
    /// let leader = Leader::builder("scheduler")
    ///     .backend(Backend::memory(&store))
    ///     .priority(10) // turns the registry on
    ///     .build()
    ///     .unwrap();
    /// assert!(leader.config().registry());
    /// ```
    pub fn registry(mut self, on: bool) -> Self {
        self.registry = Some(on);
        self
    }

    /// This candidate's priority: higher is preferred. Default 0. When the
    /// key is free, a candidate that sees a live candidate of higher
    /// priority in the registry lets it try first (for at most the
    /// [`holdoff`](Self::holdoff)); a live candidate of strictly higher
    /// priority preempts the leader once its term has lasted
    /// [`min_term`](Self::min_term). Equal priorities never preempt; among
    /// them, the longest-waiting candidate goes first. Turns the registry
    /// on.
    pub fn priority(mut self, priority: i32) -> Self {
        self.priority = Some(priority);
        self
    }

    /// Whether a live candidate of strictly higher priority may make this
    /// candidate step down while it leads. Default `true`. A preempted
    /// leader hands over as [`Leader::resign_to`] does: its work's token
    /// fires, the lease is renewed while the work drains, then released,
    /// and the preferred candidate goes first. Turns the registry on.
    pub fn preemptible(mut self, preemptible: bool) -> Self {
        self.preemptible = Some(preemptible);
        self
    }

    /// The shortest term before a preemption: a candidate of higher
    /// priority that appears earlier waits until the term has lasted this
    /// long, so that candidates that come and go cannot move leadership
    /// more than once per `min_term`. Default: the ttl. At most
    /// [`MAX_INTERVAL`]. Turns the registry on.
    pub fn min_term(mut self, min_term: Duration) -> Self {
        self.min_term = Some(min_term);
        self
    }

    /// How long a follower lets a preferred candidate try first when the
    /// key becomes free, before it tries itself. A dead or slow preferred
    /// candidate costs at most this, never a ttl. Default ttl/10, at most
    /// 1 s. Between [`MIN_INTERVAL`] and ttl/2. Turns the registry on.
    pub fn holdoff(mut self, holdoff: Duration) -> Self {
        self.holdoff = Some(holdoff);
        self
    }

    /// Checks every rule and builds the [`Leader`].
    pub fn build(self) -> Result<Leader, ConfigError> {
        let backend = self.backend.clone().ok_or(ConfigError::MissingBackend)?;
        let config = self.validate(&backend)?;
        Ok(Leader::from_config(config, backend))
    }

    /// The settings as given, unchecked, for a `Leader::new` handle whose
    /// key was rejected: it reports that error instead of campaigning.
    pub(crate) fn unchecked(&self) -> LeaderConfig {
        let ttl = self.ttl;
        let retry = self.retry_interval.unwrap_or(ttl / 5);
        LeaderConfig {
            key: Key::unchecked(&self.key),
            timing: Timing {
                ttl,
                renew_interval: self.renew_interval.unwrap_or(ttl / 3),
                retry_interval: retry,
                drift_margin: self.drift_margin.unwrap_or(ttl / 10),
                jitter: self.jitter,
                drain_timeout: self.drain_timeout,
                backoff_min: Duration::from_millis(50),
                backoff_max: retry,
            },
            metadata: self.metadata.clone(),
            candidacy: Candidacy {
                registry: false,
                priority: self.priority.unwrap_or(0),
                preemptible: self.preemptible.unwrap_or(true),
                min_term: self.min_term.unwrap_or(ttl),
                holdoff: self.holdoff.unwrap_or(ttl / 10),
            },
        }
    }

    /// The registry settings: on if asked for, or implied by a registry
    /// setting; refused on a backend without a registry.
    fn candidacy(&self, backend: &Backend, ttl: Duration) -> Result<Candidacy, ConfigError> {
        let implied = [
            ("priority", self.priority.is_some()),
            ("preemptible", self.preemptible.is_some()),
            ("min_term", self.min_term.is_some()),
            ("holdoff", self.holdoff.is_some()),
        ]
        .into_iter()
        .find(|(_, set)| *set)
        .map(|(name, _)| name);
        let registry = match (self.registry, implied) {
            (Some(false), Some(setting)) => {
                return Err(ConfigError::NeedsRegistry { setting });
            }
            (Some(on), _) => on,
            (None, implied) => implied.is_some(),
        };
        if registry && !backend.supports_candidates() {
            return Err(ConfigError::NoRegistry {
                backend: backend.name(),
            });
        }
        let min_term = self.min_term.unwrap_or(ttl);
        at_most("min_term", min_term)?;
        let holdoff = self
            .holdoff
            .unwrap_or_else(|| (ttl / 10).min(Duration::from_secs(1)).max(MIN_INTERVAL));
        at_least("holdoff", holdoff)?;
        if holdoff > ttl / 2 {
            return Err(ConfigError::TooLong {
                field: "holdoff",
                value: holdoff,
                max: ttl / 2,
            });
        }
        Ok(Candidacy {
            registry,
            priority: self.priority.unwrap_or(0),
            preemptible: self.preemptible.unwrap_or(true),
            min_term,
            holdoff,
        })
    }

    pub(crate) fn validate(&self, backend: &Backend) -> Result<LeaderConfig, ConfigError> {
        let key = Key::new(&self.key)?;
        backend.validate_key(&key)?;
        let ttl = self.ttl;
        if ttl.is_zero() {
            return Err(ConfigError::Zero { field: "ttl" });
        }
        // Bounds first, so that no rule below (and no instant the campaign
        // computes later) can overflow.
        at_most("ttl", ttl)?;
        for (field, value) in [
            ("renew_interval", self.renew_interval),
            ("retry_interval", self.retry_interval),
            ("drift_margin", self.drift_margin),
            ("backoff minimum", self.backoff.map(|b| b.0)),
            ("backoff maximum", self.backoff.map(|b| b.1)),
        ] {
            if let Some(value) = value {
                at_most(field, value)?;
            }
        }
        if ttl < backend.min_ttl() {
            return Err(ConfigError::TtlTooShort {
                ttl,
                min: backend.min_ttl(),
                backend: backend.name(),
            });
        }
        if !(self.jitter.is_finite() && (0.0..1.0).contains(&self.jitter)) {
            return Err(ConfigError::Jitter(self.jitter.to_string()));
        }
        let drift = self
            .drift_margin
            .unwrap_or_else(|| (ttl / 10).max(Duration::from_millis(100)).min(ttl / 4));
        if drift.is_zero() || drift >= ttl / 2 {
            return Err(ConfigError::DriftMargin { drift, ttl });
        }
        let renew = self.renew_interval.unwrap_or(ttl / 3);
        if renew.is_zero() {
            return Err(ConfigError::Zero {
                field: "renew_interval",
            });
        }
        at_least("renew_interval", renew)?;
        let usable = ttl - drift;
        if usable.as_secs_f64() < 2.0 * renew.as_secs_f64() * (1.0 + self.jitter) {
            return Err(ConfigError::RenewInterval { renew, usable });
        }
        let retry = self.retry_interval.unwrap_or(ttl / 5);
        if retry.is_zero() {
            return Err(ConfigError::Zero {
                field: "retry_interval",
            });
        }
        at_least("retry_interval", retry)?;
        if self.drain_timeout.is_zero() {
            return Err(ConfigError::Zero {
                field: "drain_timeout",
            });
        }
        // No upper bound: Duration::MAX means "as long as the work takes".
        at_least("drain_timeout", self.drain_timeout)?;
        let (backoff_min, backoff_max) = self
            .backoff
            .unwrap_or((Duration::from_millis(50).min(retry), retry));
        if backoff_min.is_zero() {
            return Err(ConfigError::Zero {
                field: "backoff minimum",
            });
        }
        at_least("backoff minimum", backoff_min)?;
        if backoff_min > backoff_max {
            return Err(ConfigError::Backoff {
                min: backoff_min,
                max: backoff_max,
            });
        }
        if self.metadata.len() > MAX_METADATA_LEN {
            return Err(ConfigError::MetadataTooLarge {
                len: self.metadata.len(),
                max: MAX_METADATA_LEN,
            });
        }
        let candidacy = self.candidacy(backend, ttl)?;
        Ok(LeaderConfig {
            key,
            candidacy,
            timing: Timing {
                ttl,
                renew_interval: renew,
                retry_interval: retry,
                drift_margin: drift,
                jitter: self.jitter,
                drain_timeout: self.drain_timeout,
                backoff_min,
                backoff_max,
            },
            metadata: self.metadata.clone(),
        })
    }
}
