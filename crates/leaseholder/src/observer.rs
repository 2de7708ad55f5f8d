//! [`Observer`]: who leads a key, without campaigning.

use std::fmt;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::backend::{Backend, Candidate, Holder, Key, WatchEvent};
use crate::error::{BackendError, ConfigError};

/// What an [`Observer`] knows about a key.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Observed {
    /// Not read yet, or the store cannot be reached: who leads is unknown.
    Unknown,
    /// Nobody holds the key.
    Vacant,
    /// Someone holds the key.
    Held(Holder),
}

impl Observed {
    /// The holder, if the key is held.
    pub fn holder(&self) -> Option<&Holder> {
        match self {
            Observed::Held(h) => Some(h),
            _ => None,
        }
    }

    /// `true` if a holder of the same term as `h` is observed.
    fn is_term_of(&self, h: &Holder) -> bool {
        match self {
            Observed::Held(a) => {
                a.nonce() == h.nonce() && a.token() == h.token() && a.id() == h.id()
            }
            _ => false,
        }
    }

    /// `true` if it is the same lease (nonce and token) as `other`,
    /// whatever renewals happened between.
    fn same_term(&self, other: &Observed) -> bool {
        match (self, other) {
            (Observed::Held(a), Observed::Held(b)) => {
                a.nonce() == b.nonce() && a.token() == b.token() && a.id() == b.id()
            }
            (Observed::Unknown, Observed::Unknown) | (Observed::Vacant, Observed::Vacant) => true,
            _ => false,
        }
    }
}

/// Watches who leads a key without campaigning for it.
///
/// It reads the key once, then re-reads on every watch event of the
/// backend that may mean a new term, at the current lease's expiry (stores
/// such as PostgreSQL send nothing when a lease expires), and every `poll`
/// interval otherwise. The value changes only when the term changes (a
/// renewal is not a change), and only from a read: an event that was
/// queued behind a newer read can never make it report an ended term
/// again after its successor.
///
/// Dropping the observer stops its task.
///
/// ```
/// use std::time::Duration;
/// use leaseholder::{Backend, MemoryStore, Observed, Observer};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let store = MemoryStore::new();
/// let observer = Observer::new("scheduler", Backend::memory(&store), Duration::from_secs(1))?;
/// let mut seen = observer.watch();
/// let now = seen.wait_for(|o| *o != Observed::Unknown).await?.clone();
/// assert_eq!(now, Observed::Vacant);
/// # Ok(())
/// # }
/// ```
pub struct Observer {
    key: Key,
    backend: Backend,
    poll: Duration,
    rx: watch::Receiver<Observed>,
    task: JoinHandle<()>,
    candidates: std::sync::OnceLock<(CandidatesRx, JoinHandle<()>)>,
}

type CandidatesRx = watch::Receiver<Option<Vec<Candidate>>>;

impl Observer {
    /// Starts observing `key`; `poll` bounds the time between reads when
    /// no event or expiry comes sooner. Must be called inside a tokio
    /// runtime.
    pub fn new(key: &str, backend: Backend, poll: Duration) -> Result<Observer, ConfigError> {
        let key = Key::new(key)?;
        backend.validate_key(&key)?;
        if poll.is_zero() {
            return Err(ConfigError::Zero { field: "poll" });
        }
        if poll > crate::MAX_INTERVAL {
            return Err(ConfigError::TooLong {
                field: "poll",
                value: poll,
                max: crate::MAX_INTERVAL,
            });
        }
        let (tx, rx) = watch::channel(Observed::Unknown);
        let task = tokio::spawn(observe(backend.clone(), key.clone(), poll, tx));
        Ok(Observer {
            key,
            backend,
            poll,
            rx,
            task,
            candidates: std::sync::OnceLock::new(),
        })
    }

    /// The key observed.
    pub fn key(&self) -> &Key {
        &self.key
    }

    /// What is known now.
    pub fn current(&self) -> Observed {
        self.rx.borrow().clone()
    }

    /// A receiver that sees every change of term.
    pub fn watch(&self) -> watch::Receiver<Observed> {
        self.rx.clone()
    }

    /// The live candidates in the key's registry (one read), in the order
    /// in which they would go first: highest priority, then the
    /// longest-waiting. Fails on a backend without a registry.
    pub async fn candidates(&self) -> Result<Vec<Candidate>, BackendError> {
        read_candidates(&self.backend, &self.key, self.poll).await
    }

    /// A receiver of the key's live candidates, in the order of
    /// [`candidates`](Self::candidates); `None` until the first read and
    /// while the store cannot be read. It is read again on every registry
    /// event of the backend's watch and at least every `poll` (entries that
    /// expire make no event on most stores), and changes only when the
    /// list does. The first call starts a task of its own, which stops
    /// with the observer. Must be called inside a tokio runtime.
    ///
    /// ```
    /// use std::time::Duration;
    /// use leaseholder::{Backend, Leader, MemoryStore, Observer};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let store = MemoryStore::new();
    /// let observer = Observer::new("k", Backend::memory(&store), Duration::from_secs(1))?;
    /// let mut seen = observer.watch_candidates();
    /// let leader = Leader::builder("k").backend(Backend::memory(&store)).priority(3).build()?;
    /// let runner = leader.clone();
    /// tokio::spawn(async move { runner.start(Default::default()).await });
    /// let live = seen.wait_for(|c| c.as_ref().is_some_and(|c| !c.is_empty())).await?.clone();
    /// assert_eq!(live.unwrap_or_default()[0].priority(), 3);
    /// # leader.shutdown().await?;
    /// # Ok(())
    /// # }
    /// ```
    pub fn watch_candidates(&self) -> watch::Receiver<Option<Vec<Candidate>>> {
        self.candidates
            .get_or_init(|| {
                let (tx, rx) = watch::channel(None);
                let task = tokio::spawn(observe_candidates(
                    self.backend.clone(),
                    self.key.clone(),
                    self.poll,
                    tx,
                ));
                (rx, task)
            })
            .0
            .clone()
    }
}

impl Drop for Observer {
    fn drop(&mut self) {
        self.task.abort();
        if let Some((_, task)) = self.candidates.get() {
            task.abort();
        }
    }
}

/// One read of the registry, bounded by `limit`, in the order in which
/// candidates go first.
pub(crate) async fn read_candidates(
    backend: &Backend,
    key: &Key,
    limit: Duration,
) -> Result<Vec<Candidate>, BackendError> {
    let limit = limit.max(Duration::from_millis(1));
    let mut list = tokio::time::timeout(limit, backend.candidates_within(key, limit))
        .await
        .unwrap_or(Err(BackendError::Timeout(limit)))?;
    list.sort_by(Candidate::rank);
    Ok(list)
}

async fn observe_candidates(
    backend: Backend,
    key: Key,
    poll: Duration,
    tx: watch::Sender<Option<Vec<Candidate>>>,
) {
    let mut subscription = backend.subscribe(&key);
    let mut failures = 0u32;
    loop {
        let now = Instant::now();
        let next = match read_candidates(&backend, &key, poll).await {
            Ok(list) => {
                failures = 0;
                tx.send_if_modified(|current| {
                    let changed = current.as_ref() != Some(&list);
                    if changed {
                        *current = Some(list);
                    }
                    changed
                });
                now + poll
            }
            Err(error) => {
                tracing::debug!(%error, key = %key, "observer cannot read the registry");
                failures = failures.saturating_add(1);
                tx.send_if_modified(|current| current.take().is_some());
                now + backoff(failures, poll)
            }
        };
        loop {
            tokio::select! {
                () = tokio::time::sleep_until(next) => break,
                event = subscription.next() => match event {
                    WatchEvent::Candidates(_) | WatchEvent::Resync => break,
                    _ => {}
                },
            }
        }
    }
}

impl fmt::Debug for Observer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Observer")
            .field("key", &self.key)
            .field("observed", &*self.rx.borrow())
            .finish()
    }
}

async fn observe(backend: Backend, key: Key, poll: Duration, tx: watch::Sender<Observed>) {
    let mut subscription = backend.subscribe(&key);
    let mut failures = 0u32;
    loop {
        let now = Instant::now();
        let next = match tokio::time::timeout(poll, backend.holder_within(&key, poll)).await {
            Ok(Ok(holder)) => {
                failures = 0;
                let wake = holder
                    .as_ref()
                    .and_then(Holder::expires_in)
                    .map_or(poll, |left| {
                        left.saturating_add(Duration::from_millis(1)).min(poll)
                    });
                let seen = holder.map_or(Observed::Vacant, Observed::Held);
                publish(&tx, seen);
                now + wake
            }
            Ok(Err(error)) => {
                tracing::debug!(%error, key = %key, "observer cannot read the store");
                failures = failures.saturating_add(1);
                publish(&tx, Observed::Unknown);
                now + backoff(failures, poll)
            }
            Err(_) => {
                failures = failures.saturating_add(1);
                publish(&tx, Observed::Unknown);
                now + backoff(failures, poll)
            }
        };
        // Wait for the next reason to read.
        loop {
            tokio::select! {
                () = tokio::time::sleep_until(next) => break,
                event = subscription.next() => match event {
                    // A renewal of the term already reported: nothing new.
                    WatchEvent::Updated(_, Some(holder))
                        if tx.borrow().is_term_of(&holder) => {}
                    // The registry changed, not the lease.
                    WatchEvent::Candidates(_) => {}
                    // Anything else may be a new term: read, and publish
                    // what the store says now.
                    _ => break,
                },
            }
        }
    }
}

fn publish(tx: &watch::Sender<Observed>, seen: Observed) {
    tx.send_if_modified(|current| {
        if current.same_term(&seen) {
            false
        } else {
            *current = seen;
            true
        }
    });
}

fn backoff(failures: u32, cap: Duration) -> Duration {
    Duration::from_millis(50)
        .saturating_mul(1 << failures.min(16))
        .min(cap)
}
