//! A [`BackendEdge`] wrapper that counts store operations at the client and
//! times renewals against the schedule.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use leaseholder::{
    Acquired, BackendEdge, BackendError, Candidate, Claim, ConfigError, Holder, Key, LeaderId,
    Lease, Renewal, Renewed, WatchStream,
};

/// Operation counts, shared by the wrapper and the bench.
#[derive(Default)]
pub(crate) struct Counts {
    pub(crate) acquire: AtomicU64,
    /// Renewals (each key's, batched or not).
    pub(crate) renew: AtomicU64,
    /// Renewal requests: one per renewal sent alone, one per batch.
    pub(crate) renew_calls: AtomicU64,
    pub(crate) release: AtomicU64,
    pub(crate) holder: AtomicU64,
    pub(crate) setup: AtomicU64,
    pub(crate) watch: AtomicU64,
    pub(crate) register: AtomicU64,
    pub(crate) deregister: AtomicU64,
    pub(crate) candidates: AtomicU64,
    /// Reads of one registry entry.
    pub(crate) candidate: AtomicU64,
    /// Registry writes whose entry differs from the one this candidate
    /// wrote before (a new entry, a nomination, new metadata), as opposed
    /// to renewals of the same entry.
    pub(crate) register_changes: AtomicU64,
    last_entries: Mutex<HashMap<(Key, LeaderId), bytes::Bytes>>,
    /// How many keep-alives the wrapped backend has sent, where it counts
    /// them (etcd: `EtcdBackend::keep_alives_sent`).
    pub(crate) keep_alives: OnceLock<KeepAlives>,
    timing: Mutex<Timing>,
}

/// Reads a backend's keep-alive counter.
pub(crate) type KeepAlives = Box<dyn Fn() -> u64 + Send + Sync>;

#[derive(Default)]
struct Timing {
    /// When the campaign may send the next renewal at the latest, per key:
    /// the last acquire or renew reply plus the renew interval (the campaign
    /// schedules the next renewal at reply + renew interval shortened by up
    /// to the jitter).
    due: HashMap<Key, Instant>,
    /// How late each renewal was sent, past `due`.
    lateness: Vec<Duration>,
}

/// A snapshot of the counts.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Snapshot {
    pub(crate) acquire: u64,
    pub(crate) renew: u64,
    pub(crate) release: u64,
    pub(crate) holder: u64,
    pub(crate) register: u64,
    pub(crate) deregister: u64,
    pub(crate) candidates: u64,
    pub(crate) candidate: u64,
    pub(crate) register_changes: u64,
}

impl Snapshot {
    /// Operations that write to the store.
    pub(crate) fn writes(&self) -> u64 {
        self.acquire + self.renew + self.release
    }
    pub(crate) fn total(&self) -> u64 {
        self.writes() + self.holder
    }
    pub(crate) fn since(&self, before: &Snapshot) -> Snapshot {
        Snapshot {
            acquire: self.acquire - before.acquire,
            renew: self.renew - before.renew,
            release: self.release - before.release,
            holder: self.holder - before.holder,
            register: self.register - before.register,
            deregister: self.deregister - before.deregister,
            candidates: self.candidates - before.candidates,
            candidate: self.candidate - before.candidate,
            register_changes: self.register_changes - before.register_changes,
        }
    }
}

impl Counts {
    pub(crate) fn snapshot(&self) -> Snapshot {
        Snapshot {
            acquire: self.acquire.load(Ordering::Relaxed),
            renew: self.renew.load(Ordering::Relaxed),
            release: self.release.load(Ordering::Relaxed),
            holder: self.holder.load(Ordering::Relaxed),
            register: self.register.load(Ordering::Relaxed),
            deregister: self.deregister.load(Ordering::Relaxed),
            candidates: self.candidates.load(Ordering::Relaxed),
            candidate: self.candidate.load(Ordering::Relaxed),
            register_changes: self.register_changes.load(Ordering::Relaxed),
        }
    }

    fn timing(&self) -> MutexGuard<'_, Timing> {
        self.timing
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Takes the renewal lateness samples gathered so far.
    pub(crate) fn take_lateness(&self) -> Vec<Duration> {
        std::mem::take(&mut self.timing().lateness)
    }
}

/// Counts every call to the wrapped edge.
pub(crate) struct Counting<E> {
    inner: E,
    counts: Arc<Counts>,
    renew_interval: Duration,
}

impl<E: BackendEdge> Counting<E> {
    /// Wraps `inner`; `renew_interval` is the leaders' configured interval.
    pub(crate) fn new(inner: E, renew_interval: Duration) -> (Counting<E>, Arc<Counts>) {
        let counts = Arc::new(Counts::default());
        (
            Counting {
                inner,
                counts: counts.clone(),
                renew_interval,
            },
            counts,
        )
    }
}

impl<E> Counting<E> {
    /// A renewal of `key` leaves now: counted, and timed against its due
    /// instant.
    fn sending(&self, key: &Key) {
        self.counts.renew.fetch_add(1, Ordering::Relaxed);
        let sent = Instant::now();
        let mut timing = self.counts.timing();
        if let Some(due) = timing.due.remove(key) {
            let late = sent.saturating_duration_since(due);
            timing.lateness.push(late);
        }
    }

    /// The renewal of `key` was answered: the next one is due a renew
    /// interval from now.
    fn answered(&self, key: &Key, res: &Result<Renewed, BackendError>) {
        if let Ok(Renewed::Renewed(_) | Renewed::SentAt(..)) = res {
            let due = Instant::now() + self.renew_interval;
            self.counts.timing().due.insert(key.clone(), due);
        }
    }
}

impl<E: BackendEdge> BackendEdge for Counting<E> {
    fn name(&self) -> &'static str {
        self.inner.name()
    }

    fn min_ttl(&self) -> Duration {
        self.inner.min_ttl()
    }

    fn validate_key(&self, key: &Key) -> Result<(), ConfigError> {
        self.inner.validate_key(key)
    }

    async fn setup(&self, budget: Duration) -> Result<leaseholder::Prepared, BackendError> {
        self.counts.setup.fetch_add(1, Ordering::Relaxed);
        self.inner.setup(budget).await
    }

    async fn acquire(
        &self,
        key: &Key,
        claim: &Claim,
        ttl: Duration,
        budget: Duration,
    ) -> Result<Acquired, BackendError> {
        self.counts.acquire.fetch_add(1, Ordering::Relaxed);
        let res = self.inner.acquire(key, claim, ttl, budget).await;
        if let Ok(Acquired::Won(_)) = &res {
            let due = Instant::now() + self.renew_interval;
            self.counts.timing().due.insert(key.clone(), due);
        }
        res
    }

    async fn renew(
        &self,
        key: &Key,
        lease: &Lease,
        ttl: Duration,
        budget: Duration,
    ) -> Result<Renewed, BackendError> {
        self.counts.renew_calls.fetch_add(1, Ordering::Relaxed);
        self.sending(key);
        let res = self.inner.renew(key, lease, ttl, budget).await;
        self.answered(key, &res);
        res
    }

    fn batches_renewals(&self) -> bool {
        self.inner.batches_renewals()
    }

    async fn renew_many(&self, renewals: &[Renewal]) -> Vec<Result<Renewed, BackendError>> {
        self.counts.renew_calls.fetch_add(1, Ordering::Relaxed);
        for r in renewals {
            self.sending(&r.key);
        }
        let results = self.inner.renew_many(renewals).await;
        for (r, res) in renewals.iter().zip(&results) {
            self.answered(&r.key, res);
        }
        results
    }

    async fn release(
        &self,
        key: &Key,
        lease: &Lease,
        budget: Duration,
    ) -> Result<(), BackendError> {
        self.counts.release.fetch_add(1, Ordering::Relaxed);
        self.counts.timing().due.remove(key);
        self.inner.release(key, lease, budget).await
    }

    async fn holder(&self, key: &Key, budget: Duration) -> Result<Option<Holder>, BackendError> {
        self.counts.holder.fetch_add(1, Ordering::Relaxed);
        self.inner.holder(key, budget).await
    }

    async fn watch(&self) -> Result<Option<WatchStream>, BackendError> {
        self.counts.watch.fetch_add(1, Ordering::Relaxed);
        self.inner.watch().await
    }

    fn watch_reports_expiry(&self) -> bool {
        self.inner.watch_reports_expiry()
    }

    fn supports_candidates(&self) -> bool {
        self.inner.supports_candidates()
    }

    fn supports_proclaim(&self) -> bool {
        self.inner.supports_proclaim()
    }

    async fn proclaim(
        &self,
        key: &Key,
        lease: &Lease,
        metadata: &bytes::Bytes,
        ttl: Duration,
        budget: Duration,
    ) -> Result<Renewed, BackendError> {
        self.counts.renew.fetch_add(1, Ordering::Relaxed);
        self.inner.proclaim(key, lease, metadata, ttl, budget).await
    }

    async fn register(
        &self,
        key: &Key,
        candidate: &Candidate,
        ttl: Duration,
        budget: Duration,
    ) -> Result<(), BackendError> {
        self.counts.register.fetch_add(1, Ordering::Relaxed);
        let value = candidate.encode();
        let old = self
            .counts
            .last_entries
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert((key.clone(), candidate.id()), value.clone());
        if old.as_ref() != Some(&value) {
            self.counts.register_changes.fetch_add(1, Ordering::Relaxed);
        }
        self.inner.register(key, candidate, ttl, budget).await
    }

    async fn deregister(
        &self,
        key: &Key,
        id: LeaderId,
        budget: Duration,
    ) -> Result<(), BackendError> {
        self.counts.deregister.fetch_add(1, Ordering::Relaxed);
        self.inner.deregister(key, id, budget).await
    }

    async fn candidates(
        &self,
        key: &Key,
        budget: Duration,
    ) -> Result<Vec<Candidate>, BackendError> {
        self.counts.candidates.fetch_add(1, Ordering::Relaxed);
        self.inner.candidates(key, budget).await
    }

    async fn candidate(
        &self,
        key: &Key,
        id: LeaderId,
        budget: Duration,
    ) -> Result<Option<Candidate>, BackendError> {
        self.counts.candidate.fetch_add(1, Ordering::Relaxed);
        self.inner.candidate(key, id, budget).await
    }
}
