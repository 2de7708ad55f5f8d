//! [`BlockingBackendEdge`]: the lease contract for a store with a
//! synchronous client (SQLite, an embedded key-value store, a C library),
//! and [`Blocking`], which runs it on tokio's blocking pool as a
//! [`BackendEdge`].
//!
//! The methods are plain functions with owned arguments: no `async`, no
//! lifetimes to thread through a `spawn_blocking` closure. Each call runs on
//! a thread of tokio's blocking pool (`tokio::task::spawn_blocking`).
//!
//! # A call the campaign drops
//!
//! The campaign bounds every call by its budget (see [the
//! contract](BackendEdge#the-budget-of-a-call)) and drops the call's future
//! when the budget passes. A blocking function cannot be interrupted: it
//! runs on its thread until it returns, and what it returns is thrown away.
//! It may or may not have taken effect, like any call whose reply was lost,
//! and the campaign reads the key back before it believes either. So bound
//! the work on the store's side by `budget` (SQLite's busy timeout, a lock
//! timeout), or a stuck store keeps blocking-pool threads busy after the
//! campaign has moved on.
//!
//! A panic in a method is caught and reported as
//! [`BackendError::Panicked`], which stops the campaign like a fatal error.
//!
//! # Watching
//!
//! A synchronous store has no push channel, so [`Blocking`] polls:
//! [`changes`](BlockingBackendEdge::changes) is called every
//! [`poll_interval`](BlockingBackendEdge::poll_interval) on the blocking
//! pool, and what it returns is delivered as watch events. Return
//! [`WatchEvent::Resync`] when something changed but you cannot tell what
//! (every follower of the backend then re-reads its key), and nothing when
//! nothing changed (SQLite: `PRAGMA data_version`).
//!
//! ```
//! use std::collections::HashMap;
//! use std::sync::Mutex;
//! use std::time::Duration;
//! use leaseholder::BlockingBackendEdge;
//! use leaseholder::{Acquired, Backend, BackendError, Claim, Holder, Key, Lease, Prepared, Renewed};
//!
//! struct MyStore {
//!     db: Mutex<HashMap<String, Vec<u8>>>, // a synchronous client
//! }
//!
//! impl BlockingBackendEdge for MyStore {
//!     fn name(&self) -> &'static str { "my-store" }
//!     fn setup(&self, _budget: Duration) -> Result<Prepared, BackendError> { Ok(Prepared::Existing) }
//!     fn acquire(&self, key: Key, claim: Claim, ttl: Duration, budget: Duration) -> Result<Acquired, BackendError> {
//!         todo!("in one transaction, bounded by `budget`: create the lease if the key is free")
//!     }
//!     fn renew(&self, key: Key, lease: Lease, ttl: Duration, budget: Duration) -> Result<Renewed, BackendError> {
//!         todo!("extend the lease if its nonce still matches")
//!     }
//!     fn release(&self, key: Key, lease: Lease, budget: Duration) -> Result<(), BackendError> {
//!         todo!("compare-and-delete on the nonce")
//!     }
//!     fn holder(&self, key: Key, budget: Duration) -> Result<Option<Holder>, BackendError> {
//!         todo!("the live lease, decoded with Holder::decode")
//!     }
//! }
//!
//! let backend = Backend::blocking(MyStore { db: Mutex::default() });
//! # let _ = backend;
//! ```

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use super::{
    Acquired, BackendEdge, Candidate, Claim, Holder, Key, LeaderId, Lease, Prepared, Renewed,
    WatchEvent, WatchStream,
};
use crate::error::{BackendError, ConfigError, Op};

/// The lease contract with plain, blocking functions; wrap it in
/// [`Blocking`] (or call [`Backend::blocking`](super::Backend::blocking)).
///
/// Each method has the meaning of its namesake in [`BackendEdge`], whose
/// docs are the contract. The module docs say what happens to a call the
/// campaign drops.
pub trait BlockingBackendEdge: Send + Sync + 'static {
    /// A short name for messages, e.g. `"sqlite"`.
    fn name(&self) -> &'static str;

    /// See [`BackendEdge::min_ttl`]. Default: 1 ms.
    fn min_ttl(&self) -> Duration {
        Duration::from_millis(1)
    }

    /// See [`BackendEdge::validate_key`]. Default: accept.
    fn validate_key(&self, key: &Key) -> Result<(), ConfigError> {
        let _ = key;
        Ok(())
    }

    /// See [`BackendEdge::setup`].
    fn setup(&self, budget: Duration) -> Result<Prepared, BackendError>;

    /// See [`BackendEdge::acquire`].
    fn acquire(
        &self,
        key: Key,
        claim: Claim,
        ttl: Duration,
        budget: Duration,
    ) -> Result<Acquired, BackendError>;

    /// See [`BackendEdge::renew`].
    fn renew(
        &self,
        key: Key,
        lease: Lease,
        ttl: Duration,
        budget: Duration,
    ) -> Result<Renewed, BackendError>;

    /// See [`BackendEdge::release`].
    fn release(&self, key: Key, lease: Lease, budget: Duration) -> Result<(), BackendError>;

    /// See [`BackendEdge::holder`].
    fn holder(&self, key: Key, budget: Duration) -> Result<Option<Holder>, BackendError>;

    /// See [`BackendEdge::keys`]. Default: [`BackendError::Unsupported`].
    fn keys(&self, budget: Duration) -> Result<Vec<Key>, BackendError> {
        let _ = budget;
        Err(super::no_listing())
    }

    /// How often [`changes`](Self::changes) is polled, or `None` (the
    /// default) for no watch: followers then wake by expiry hints and the
    /// retry interval.
    fn poll_interval(&self) -> Option<Duration> {
        None
    }

    /// The changes since the last call: empty if nothing changed,
    /// [`WatchEvent::Resync`] if something did but not what. An error ends
    /// the watch; it is opened again with backoff. Default: nothing.
    fn changes(&self) -> Result<Vec<WatchEvent>, BackendError> {
        Ok(Vec::new())
    }

    /// See [`BackendEdge::watch_reports_expiry`]. Default: `false`.
    fn watch_reports_expiry(&self) -> bool {
        false
    }

    /// See [`BackendEdge::supports_candidates`]. Default: `false`.
    fn supports_candidates(&self) -> bool {
        false
    }

    /// See [`BackendEdge::supports_proclaim`]. Default: `false`.
    fn supports_proclaim(&self) -> bool {
        false
    }

    /// See [`BackendEdge::proclaim`]. Default:
    /// [`BackendError::Unsupported`].
    fn proclaim(
        &self,
        key: Key,
        lease: Lease,
        metadata: Bytes,
        ttl: Duration,
        budget: Duration,
    ) -> Result<Renewed, BackendError> {
        let _ = (key, lease, metadata, ttl, budget);
        Err(super::no_proclaim())
    }

    /// See [`BackendEdge::register`]. Default:
    /// [`BackendError::Unsupported`].
    fn register(
        &self,
        key: Key,
        candidate: Candidate,
        ttl: Duration,
        budget: Duration,
    ) -> Result<(), BackendError> {
        let _ = (key, candidate, ttl, budget);
        Err(super::no_registry())
    }

    /// See [`BackendEdge::deregister`]. Default:
    /// [`BackendError::Unsupported`].
    fn deregister(&self, key: Key, id: LeaderId, budget: Duration) -> Result<(), BackendError> {
        let _ = (key, id, budget);
        Err(super::no_registry())
    }

    /// See [`BackendEdge::candidates`]. Default:
    /// [`BackendError::Unsupported`].
    fn candidates(&self, key: Key, budget: Duration) -> Result<Vec<Candidate>, BackendError> {
        let _ = (key, budget);
        Err(super::no_registry())
    }

    /// See [`BackendEdge::candidate`]. Default:
    /// [`candidates`](Self::candidates), filtered.
    fn candidate(
        &self,
        key: Key,
        id: LeaderId,
        budget: Duration,
    ) -> Result<Option<Candidate>, BackendError> {
        Ok(self
            .candidates(key, budget)?
            .into_iter()
            .find(|c| c.id() == id))
    }
}

/// Runs a [`BlockingBackendEdge`] on tokio's blocking pool as a
/// [`BackendEdge`]. Cheap to clone.
#[derive(Debug)]
pub struct Blocking<T> {
    inner: Arc<T>,
}

impl<T> Clone for Blocking<T> {
    fn clone(&self) -> Self {
        Blocking {
            inner: self.inner.clone(),
        }
    }
}

impl<T: BlockingBackendEdge> Blocking<T> {
    /// Wraps `edge`.
    pub fn new(edge: T) -> Blocking<T> {
        Blocking {
            inner: Arc::new(edge),
        }
    }

    /// The wrapped store.
    pub fn get_ref(&self) -> &T {
        &self.inner
    }

    /// Runs `call` on the blocking pool; a panic in it is
    /// [`BackendError::Panicked`].
    async fn run<R: Send + 'static>(
        &self,
        op: Op,
        call: impl FnOnce(&T) -> Result<R, BackendError> + Send + 'static,
    ) -> Result<R, BackendError> {
        let inner = self.inner.clone();
        match tokio::task::spawn_blocking(move || call(&inner)).await {
            Ok(result) => result,
            Err(e) if e.is_panic() => Err(BackendError::panicked(op, &*e.into_panic())),
            // The runtime is shutting down.
            Err(e) => Err(BackendError::unavailable(e)),
        }
    }
}

impl<T: BlockingBackendEdge> BackendEdge for Blocking<T> {
    fn name(&self) -> &'static str {
        self.inner.name()
    }

    fn min_ttl(&self) -> Duration {
        self.inner.min_ttl()
    }

    fn validate_key(&self, key: &Key) -> Result<(), ConfigError> {
        self.inner.validate_key(key)
    }

    async fn setup(&self, budget: Duration) -> Result<Prepared, BackendError> {
        self.run(Op::Setup, move |s| s.setup(budget)).await
    }

    async fn acquire(
        &self,
        key: &Key,
        claim: &Claim,
        ttl: Duration,
        budget: Duration,
    ) -> Result<Acquired, BackendError> {
        let (key, claim) = (key.clone(), claim.clone());
        self.run(Op::Acquire, move |s| s.acquire(key, claim, ttl, budget))
            .await
    }

    async fn renew(
        &self,
        key: &Key,
        lease: &Lease,
        ttl: Duration,
        budget: Duration,
    ) -> Result<Renewed, BackendError> {
        let (key, lease) = (key.clone(), lease.clone());
        self.run(Op::Renew, move |s| s.renew(key, lease, ttl, budget))
            .await
    }

    async fn release(
        &self,
        key: &Key,
        lease: &Lease,
        budget: Duration,
    ) -> Result<(), BackendError> {
        let (key, lease) = (key.clone(), lease.clone());
        self.run(Op::Release, move |s| s.release(key, lease, budget))
            .await
    }

    async fn holder(&self, key: &Key, budget: Duration) -> Result<Option<Holder>, BackendError> {
        let key = key.clone();
        self.run(Op::Holder, move |s| s.holder(key, budget)).await
    }

    async fn keys(&self, budget: Duration) -> Result<Vec<Key>, BackendError> {
        self.run(Op::Keys, move |s| s.keys(budget)).await
    }

    async fn watch(&self) -> Result<Option<WatchStream>, BackendError> {
        let Some(every) = self.inner.poll_interval() else {
            return Ok(None);
        };
        let every = every.max(Duration::from_millis(1));
        let this = self.clone();
        let stream = futures_util::stream::unfold(
            (this, std::collections::VecDeque::new()),
            move |(this, mut queued)| async move {
                loop {
                    if let Some(event) = queued.pop_front() {
                        return Some((event, (this, queued)));
                    }
                    tokio::time::sleep(every).await;
                    match this.run(Op::Watch, |s| s.changes()).await {
                        Ok(events) => queued.extend(events),
                        Err(error) => {
                            tracing::debug!(%error, "polling the store for changes failed");
                            return None;
                        }
                    }
                }
            },
        );
        Ok(Some(Box::pin(stream)))
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
        metadata: &Bytes,
        ttl: Duration,
        budget: Duration,
    ) -> Result<Renewed, BackendError> {
        let (key, lease, metadata) = (key.clone(), lease.clone(), metadata.clone());
        self.run(Op::Proclaim, move |s| {
            s.proclaim(key, lease, metadata, ttl, budget)
        })
        .await
    }

    async fn register(
        &self,
        key: &Key,
        candidate: &Candidate,
        ttl: Duration,
        budget: Duration,
    ) -> Result<(), BackendError> {
        let (key, candidate) = (key.clone(), candidate.clone());
        self.run(Op::Register, move |s| {
            s.register(key, candidate, ttl, budget)
        })
        .await
    }

    async fn deregister(
        &self,
        key: &Key,
        id: LeaderId,
        budget: Duration,
    ) -> Result<(), BackendError> {
        let key = key.clone();
        self.run(Op::Deregister, move |s| s.deregister(key, id, budget))
            .await
    }

    async fn candidates(
        &self,
        key: &Key,
        budget: Duration,
    ) -> Result<Vec<Candidate>, BackendError> {
        let key = key.clone();
        self.run(Op::Candidates, move |s| s.candidates(key, budget))
            .await
    }

    async fn candidate(
        &self,
        key: &Key,
        id: LeaderId,
        budget: Duration,
    ) -> Result<Option<Candidate>, BackendError> {
        let key = key.clone();
        self.run(Op::Candidates, move |s| s.candidate(key, id, budget))
            .await
    }
}
