//! A health signal for readiness probes and alerts.

use std::sync::Mutex;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

/// Whether a [`Leader`](crate::Leader)'s campaign is in a state that
/// whoever runs the service should hear of, from
/// [`Leader::health`](crate::Leader::health) (computed when called) or
/// [`Leader::health_watch`](crate::Leader::health_watch).
///
/// Losing or not winning leadership is healthy: that is the election
/// working. These are not:
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// use leaseholder::{Backend, Health, Leader, MemoryStore};
///
/// let leader = Leader::builder("jobs")
///     .backend(Backend::memory(&MemoryStore::new()))
///     .build()
///     .unwrap();
/// assert_eq!(leader.health(), Health::Healthy);
/// // e.g. in a readiness handler:
/// let ready = leader.health().is_healthy();
/// # assert!(ready);
/// # }
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Health {
    /// Nothing to report.
    Healthy,
    /// A term's work was still running after the term's deadline, past the
    /// moment the campaign drops lingering work (deadline + half the drift
    /// margin): it blocks the runtime thread or never reaches an `.await`.
    /// Another candidate may lead while it runs; only fenced writes are
    /// safe. Healthy again once the work has stopped.
    WorkOverran {
        /// The term's deadline.
        deadline: Instant,
    },
    /// The store has been unreachable for longer than the ttl (the state
    /// has been [`State::Unknown`](crate::State::Unknown) since `since`).
    StoreUnreachable {
        /// Since when.
        since: Instant,
    },
}

impl Health {
    /// `true` for [`Health::Healthy`].
    pub fn is_healthy(&self) -> bool {
        matches!(self, Health::Healthy)
    }
}

/// The facts health is computed from, kept by the campaign task.
#[derive(Default)]
struct Facts {
    /// While work runs: its term's deadline.
    work_deadline: Option<Instant>,
    /// While the state is `Unknown`: since when.
    unknown_since: Option<Instant>,
}

/// Shared between the handles and the campaign task.
pub(crate) struct HealthCell {
    facts: Mutex<Facts>,
    watch: watch::Sender<Health>,
    ttl: Duration,
    grace: Duration,
}

impl HealthCell {
    pub(crate) fn new(ttl: Duration, drift_margin: Duration) -> HealthCell {
        HealthCell {
            facts: Mutex::default(),
            watch: watch::Sender::new(Health::Healthy),
            ttl,
            grace: drift_margin / 2,
        }
    }

    fn facts(&self) -> std::sync::MutexGuard<'_, Facts> {
        // Two plain fields: a poisoned lock leaves nothing half-done.
        self.facts
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Health at `now`, and when it next changes by time alone.
    fn at(&self, now: Instant) -> (Health, Option<Instant>) {
        let facts = self.facts();
        let mut next = None;
        if let Some(deadline) = facts.work_deadline {
            let at = deadline + self.grace;
            if now >= at {
                return (Health::WorkOverran { deadline }, None);
            }
            next = Some(at);
        }
        if let Some(since) = facts.unknown_since {
            let at = since + self.ttl;
            if now >= at {
                return (Health::StoreUnreachable { since }, None);
            }
            next = Some(next.map_or(at, |n: Instant| n.min(at)));
        }
        (Health::Healthy, next)
    }

    /// Health now, computed from the facts (works even while the campaign
    /// task cannot run, e.g. when the work blocks the runtime).
    pub(crate) fn now(&self) -> Health {
        self.at(Instant::now()).0
    }

    pub(crate) fn subscribe(&self) -> watch::Receiver<Health> {
        self.watch.subscribe()
    }

    pub(crate) fn set_work(&self, deadline: Option<Instant>) {
        self.facts().work_deadline = deadline;
    }

    pub(crate) fn set_unknown(&self, since: Option<Instant>) {
        self.facts().unknown_since = since;
    }

    /// Publishes the health at `now` if it changed; returns when to look
    /// again.
    pub(crate) fn publish(&self, now: Instant) -> Option<Instant> {
        let (health, next) = self.at(now);
        self.watch.send_if_modified(|h| {
            let changed = *h != health;
            *h = health;
            changed
        });
        next
    }
}
