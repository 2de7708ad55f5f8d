//! Renewals gathered per backend and sent together
//! ([`BackendEdge::renew_many`](super::BackendEdge::renew_many)).
//!
//! A campaign that renews hands its renewal to the [`Batcher`] of its
//! [`Backend`](super::Backend) and waits for that renewal's own result. A
//! driver task (one per backend, started by the first renewal on the
//! caller's runtime and again if it has ended) waits until a renewal is
//! queued, gathers for a short window from the oldest one (at most
//! [`GATHER_MAX`], and at most an eighth of the shortest budget queued), then
//! sends everything queued, in calls of at most [`BATCH_MAX`] renewals, each
//! call in a task of its own so that gathering goes on meanwhile.
//!
//! What keeps the lease contract:
//!
//! - A renewal's budget shrinks by the time it waited in the queue: the
//!   store is told the leader's real deadline (the time it handed the
//!   renewal over, plus its budget), never a later one. A renewal whose
//!   budget ran out in the queue is answered `Timeout` without being sent.
//! - The campaign dates the extension from when it handed the renewal
//!   over, which is before the store received it: the wait in the queue
//!   only shortens the term the leader believes in.
//! - A renewal whose caller has gone (its campaign gave the call up, or
//!   stopped) is not sent. One already sent is a call whose reply was
//!   lost, which every campaign already handles (it reads the key back).
//! - Every renewal gets a result of its own; a reply vector of the wrong
//!   length is a backend bug, and the renewals it leaves out get
//!   `Unavailable` (a lost reply). A panic in the backend's `renew_many`
//!   gives every renewal of that call `Panicked`.
//! - A key whose renewal fails in a batch is renewed alone, with
//!   `BackendEdge::renew`, until one of its renewals succeeds: its retries
//!   (paced by its campaign's backoff, before its deadline) do not wait
//!   for, or depend on, other keys'.
//!
//! Lock order: only `Queue::state` is locked, never across an `.await`.

use std::collections::HashSet;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::{Notify, oneshot};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::{Key, Lease, Renewed};
use crate::error::BackendError;

/// The longest a renewal waits for others to join it.
pub(crate) const GATHER_MAX: Duration = Duration::from_millis(20);

/// The most renewals in one `renew_many` call.
pub(crate) const BATCH_MAX: usize = 1024;

/// One lease to renew in a [`renew_many`](super::BackendEdge::renew_many)
/// call: the arguments of [`renew`](super::BackendEdge::renew) for one key.
///
/// ```
/// use std::time::Duration;
/// use leaseholder::{Claim, FencingToken, Key, LeaderId, Lease, Renewal};
///
/// let lease = Lease::new(&Claim::new(LeaderId::new(), Default::default()), FencingToken::new(3), 1);
/// let r = Renewal::new(Key::new("jobs").unwrap(), lease, Duration::from_secs(10), Duration::from_secs(6));
/// assert_eq!(r.key.as_str(), "jobs");
/// assert_eq!(r.budget, Duration::from_secs(6));
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Renewal {
    /// The key.
    pub key: Key,
    /// The lease to extend (its nonce, token and revision).
    pub lease: Lease,
    /// How long the lease should live from now, by the store's clock.
    pub ttl: Duration,
    /// The time left before this leader's deadline (see
    /// [`renew`](super::BackendEdge::renew)).
    pub budget: Duration,
}

impl Renewal {
    /// A renewal of `lease` on `key`.
    pub fn new(key: Key, lease: Lease, ttl: Duration, budget: Duration) -> Renewal {
        Renewal {
            key,
            lease,
            ttl,
            budget,
        }
    }
}

/// `e` as the result of each of `n` renewals: the first gets `e` itself
/// (its source error, a SQLSTATE, intact), the others copies.
pub(crate) fn each<T>(e: BackendError, n: usize) -> Vec<Result<T, BackendError>> {
    let mut out = Vec::with_capacity(n);
    if n > 0 {
        out.extend((1..n).map(|_| Err(e.replicate())));
        out.insert(0, Err(e));
    }
    out
}

/// The results of one call, one per renewal; `None` if the backend is gone.
pub(crate) type Sent =
    Pin<Box<dyn Future<Output = Option<Vec<Result<Renewed, BackendError>>>> + Send>>;

/// Sends one batch (the backend's `renew_many`, guarded).
pub(crate) type SendFn = Arc<dyn Fn(Vec<Renewal>) -> Sent + Send + Sync>;

/// The renewal queue of one backend.
#[derive(Default)]
pub(crate) struct Batcher {
    queue: Arc<Queue>,
}

#[derive(Default)]
struct Queue {
    state: Mutex<State>,
    notify: Notify,
}

#[derive(Default)]
struct State {
    items: Vec<Item>,
    /// When the gathering ends: the earliest of the queued renewals' own
    /// ends (queued + the smaller of `GATHER_MAX` and an eighth of the
    /// budget). `None` while the queue is empty.
    close: Option<Instant>,
    driver: Option<JoinHandle<()>>,
    /// Keys whose last batched renewal failed: renewed alone until one
    /// succeeds.
    alone: HashSet<Key>,
}

struct Item {
    renewal: Renewal,
    queued: Instant,
    reply: oneshot::Sender<Result<Renewed, BackendError>>,
}

fn lock(m: &Mutex<State>) -> MutexGuard<'_, State> {
    m.lock().unwrap_or_else(|poison| poison.into_inner())
}

impl Drop for Batcher {
    fn drop(&mut self) {
        if let Some(driver) = lock(&self.queue.state).driver.take() {
            driver.abort();
        }
    }
}

impl Batcher {
    /// `true` if `key`'s renewals go alone for now (its last batched one
    /// failed).
    pub(crate) fn is_alone(&self, key: &Key) -> bool {
        lock(&self.queue.state).alone.contains(key)
    }

    /// A renewal of `key` sent alone succeeded: it may join batches again.
    pub(crate) fn rejoin(&self, key: &Key) {
        lock(&self.queue.state).alone.remove(key);
    }

    /// Queues `renewal` for the next batch and waits for its result.
    pub(crate) async fn renew(
        &self,
        renewal: Renewal,
        send: impl FnOnce() -> SendFn,
    ) -> Result<Renewed, BackendError> {
        let (tx, rx) = oneshot::channel();
        let earlier = {
            let mut state = lock(&self.queue.state);
            let queued = Instant::now();
            let close = queued + GATHER_MAX.min(renewal.budget / 8);
            state.items.push(Item {
                renewal,
                queued,
                reply: tx,
            });
            if state.driver.as_ref().is_none_or(JoinHandle::is_finished) {
                state.driver = Some(tokio::spawn(drive(self.queue.clone(), send())));
            }
            let earlier = state.close.is_none_or(|c| close < c);
            if earlier {
                state.close = Some(close);
            }
            earlier
        };
        // The driver looks again only when the gathering must end sooner.
        if earlier {
            self.queue.notify.notify_one();
        }
        rx.await.unwrap_or_else(|_| {
            Err(BackendError::unavailable(
                "the renewal's batch was dropped before it was answered (its runtime shut down)",
            ))
        })
    }
}

/// The driver: gathers, then sends, until the backend is dropped.
async fn drive(queue: Arc<Queue>, send: SendFn) {
    loop {
        // Wait for a renewal, then until the gathering ends (which a
        // renewal with a short budget can bring forward).
        loop {
            let close = lock(&queue.state).close;
            match close {
                None => queue.notify.notified().await,
                Some(close) if close <= Instant::now() => break,
                Some(close) => {
                    tokio::select! {
                        () = tokio::time::sleep_until(close) => break,
                        () = queue.notify.notified() => {}
                    }
                }
            }
        }
        let items = {
            let mut state = lock(&queue.state);
            state.close = None;
            std::mem::take(&mut state.items)
        };
        let now = Instant::now();
        let mut ready = Vec::with_capacity(items.len());
        for mut item in items {
            if item.reply.is_closed() {
                continue;
            }
            let waited = now.saturating_duration_since(item.queued);
            let Some(left) = item
                .renewal
                .budget
                .checked_sub(waited)
                .filter(|d| !d.is_zero())
            else {
                let _ = item
                    .reply
                    .send(Err(BackendError::Timeout(item.renewal.budget)));
                continue;
            };
            item.renewal.budget = left;
            ready.push(item);
        }
        while !ready.is_empty() {
            let rest = ready.split_off(ready.len().min(BATCH_MAX));
            let chunk = std::mem::replace(&mut ready, rest);
            tokio::spawn(answer(queue.clone(), send.clone(), chunk));
        }
    }
}

/// Sends one batch and answers each of its renewals.
async fn answer(queue: Arc<Queue>, send: SendFn, items: Vec<Item>) {
    let renewals: Vec<Renewal> = items.iter().map(|i| i.renewal.clone()).collect();
    let n = renewals.len();
    // A call that never ends (a hung connection) must not hold its
    // renewals' answers forever: past the longest budget in it, every
    // caller has given up anyway.
    let longest = renewals.iter().map(|r| r.budget).max().unwrap_or_default();
    let results = match tokio::time::timeout(longest, send(renewals)).await {
        Ok(results) => results,
        Err(_) => Some(
            (0..n)
                .map(|_| Err(BackendError::Timeout(longest)))
                .collect(),
        ),
    };
    let mut results = match results {
        Some(results) => {
            if results.len() != n {
                tracing::error!(
                    renewals = n,
                    results = results.len(),
                    "renew_many answered the wrong number of renewals (a backend bug); \
                     the renewals left out count as lost replies"
                );
            }
            results.into_iter().map(Some).collect::<Vec<_>>()
        }
        None => Vec::new(),
    };
    results.resize_with(n, || None);
    let mut failed = Vec::new();
    for (item, result) in items.into_iter().zip(results) {
        let result = result.unwrap_or_else(|| {
            Err(BackendError::unavailable(
                "no result for this renewal in its batch",
            ))
        });
        if result.is_err() {
            failed.push(item.renewal.key.clone());
        }
        let _ = item.reply.send(result);
    }
    if !failed.is_empty() {
        lock(&queue.state).alone.extend(failed);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::backend::{Claim, FencingToken, LeaderId};
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn renewal(key: &str, budget: Duration) -> Renewal {
        let lease = Lease::new(
            &Claim::new(LeaderId::new(), Default::default()),
            FencingToken::new(1),
            1,
        );
        Renewal::new(
            Key::new(key).unwrap(),
            lease,
            Duration::from_secs(10),
            budget,
        )
    }

    /// Each call's renewals: key and budget.
    type Calls = Arc<Mutex<Vec<Vec<(String, Duration)>>>>;

    /// A sender that records each batch's budgets and answers with `f`.
    fn sender(
        calls: Calls,
        answer: impl Fn(&[Renewal]) -> Vec<Result<Renewed, BackendError>> + Send + Sync + 'static,
    ) -> SendFn {
        let answer = Arc::new(answer);
        Arc::new(move |batch: Vec<Renewal>| {
            calls.lock().unwrap().push(
                batch
                    .iter()
                    .map(|r| (r.key.as_str().to_owned(), r.budget))
                    .collect(),
            );
            let answer = answer.clone();
            Box::pin(async move { Some(answer(&batch)) }) as Sent
        })
    }

    fn ok_all(batch: &[Renewal]) -> Vec<Result<Renewed, BackendError>> {
        batch
            .iter()
            .map(|r| Ok(Renewed::Renewed(r.lease.clone())))
            .collect()
    }

    #[tokio::test(start_paused = true)]
    async fn renewals_made_together_go_in_one_call_with_their_budget_less_the_wait() {
        let calls = Arc::new(Mutex::new(Vec::new()));
        let batcher = Arc::new(Batcher::default());
        let send = sender(calls.clone(), ok_all);
        let started = Instant::now();
        let mut joins = Vec::new();
        for i in 0..5 {
            let (b, s) = (batcher.clone(), send.clone());
            joins.push(tokio::spawn(async move {
                b.renew(renewal(&format!("k{i}"), Duration::from_secs(4)), || s)
                    .await
            }));
        }
        for j in joins {
            assert!(matches!(j.await.unwrap(), Ok(Renewed::Renewed(_))));
        }
        let calls = calls.lock().unwrap();
        assert_eq!(calls.len(), 1, "one call for five renewals: {calls:?}");
        assert_eq!(calls[0].len(), 5);
        for (_, budget) in &calls[0] {
            assert_eq!(*budget, Duration::from_secs(4) - GATHER_MAX);
        }
        assert_eq!(started.elapsed(), GATHER_MAX);
    }

    #[tokio::test(start_paused = true)]
    async fn a_short_budget_shortens_the_gathering() {
        let calls = Arc::new(Mutex::new(Vec::new()));
        let batcher = Arc::new(Batcher::default());
        let send = sender(calls.clone(), ok_all);
        let started = Instant::now();
        // A long-budget renewal opens a 20 ms window; one queued 4 ms
        // later with 40 ms left ends it 5 ms after that, and both go.
        let (b, s) = (batcher.clone(), send.clone());
        let first =
            tokio::spawn(
                async move { b.renew(renewal("long", Duration::from_secs(4)), || s).await },
            );
        tokio::task::yield_now().await;
        tokio::time::advance(Duration::from_millis(4)).await;
        let short = batcher
            .renew(renewal("short", Duration::from_millis(40)), || send)
            .await;
        assert!(short.is_ok());
        assert!(first.await.unwrap().is_ok());
        assert_eq!(started.elapsed(), Duration::from_millis(9));
        let calls = calls.lock().unwrap();
        assert_eq!(calls.len(), 1, "{calls:?}");
        assert_eq!(
            calls[0],
            vec![
                (
                    "long".to_owned(),
                    Duration::from_secs(4) - Duration::from_millis(9)
                ),
                ("short".to_owned(), Duration::from_millis(35)),
            ]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_renewal_with_no_budget_left_is_not_sent() {
        let calls = Arc::new(Mutex::new(Vec::new()));
        let batcher = Arc::new(Batcher::default());
        let send = sender(calls.clone(), ok_all);
        let (b, s) = (batcher.clone(), send.clone());
        let first =
            tokio::spawn(
                async move { b.renew(renewal("long", Duration::from_secs(4)), || s).await },
            );
        tokio::task::yield_now().await;
        let none = batcher
            .renew(renewal("none", Duration::ZERO), || send)
            .await;
        assert!(matches!(none, Err(BackendError::Timeout(_))), "{none:?}");
        assert!(first.await.unwrap().is_ok());
        let calls = calls.lock().unwrap();
        assert_eq!(calls.len(), 1);
        assert_eq!(calls[0].len(), 1, "only the long one was sent: {calls:?}");
        assert_eq!(calls[0][0].0, "long");
    }

    #[tokio::test(start_paused = true)]
    async fn a_renewal_whose_caller_gave_up_is_not_sent() {
        let calls = Arc::new(Mutex::new(Vec::new()));
        let batcher = Arc::new(Batcher::default());
        let send = sender(calls.clone(), ok_all);
        let (b, s) = (batcher.clone(), send.clone());
        let gone =
            tokio::spawn(
                async move { b.renew(renewal("gone", Duration::from_secs(4)), || s).await },
            );
        tokio::task::yield_now().await;
        gone.abort();
        let _ = gone.await;
        let kept = batcher
            .renew(renewal("kept", Duration::from_secs(4)), || send)
            .await;
        assert!(kept.is_ok());
        let calls = calls.lock().unwrap();
        assert_eq!(calls.len(), 1);
        assert_eq!(calls[0].len(), 1);
        assert_eq!(calls[0][0].0, "kept");
    }

    #[tokio::test(start_paused = true)]
    async fn each_renewal_gets_its_own_result_and_a_failed_key_goes_alone() {
        let calls = Arc::new(Mutex::new(Vec::new()));
        let batcher = Arc::new(Batcher::default());
        // Half applied: "bad" fails, the others are renewed; and one
        // result short: the last renewal gets none.
        let send = sender(calls.clone(), |batch| {
            let mut out: Vec<_> = batch
                .iter()
                .map(|r| {
                    if r.key.as_str() == "bad" {
                        Err(BackendError::unavailable("row locked"))
                    } else {
                        Ok(Renewed::Lost)
                    }
                })
                .collect();
            if batch.len() == 3 {
                out.pop();
            }
            out
        });
        let mut joins = Vec::new();
        for key in ["good", "bad", "short"] {
            let (b, s) = (batcher.clone(), send.clone());
            joins.push(tokio::spawn(async move {
                b.renew(renewal(key, Duration::from_secs(4)), || s).await
            }));
            tokio::task::yield_now().await;
        }
        let results: Vec<_> = futures_util::future::join_all(joins)
            .await
            .into_iter()
            .map(Result::unwrap)
            .collect();
        assert!(matches!(results[0], Ok(Renewed::Lost)), "{results:?}");
        assert!(matches!(results[1], Err(BackendError::Unavailable(_))));
        assert!(matches!(results[2], Err(BackendError::Unavailable(_))));
        assert!(!batcher.is_alone(&Key::new("good").unwrap()));
        assert!(batcher.is_alone(&Key::new("bad").unwrap()));
        assert!(batcher.is_alone(&Key::new("short").unwrap()));
        batcher.rejoin(&Key::new("bad").unwrap());
        assert!(!batcher.is_alone(&Key::new("bad").unwrap()));
    }

    #[tokio::test(start_paused = true)]
    async fn a_backend_gone_answers_every_renewal_unavailable() {
        let batcher = Batcher::default();
        let send: SendFn = Arc::new(|_| Box::pin(async { None }) as Sent);
        let r = batcher
            .renew(renewal("k", Duration::from_secs(4)), || send)
            .await;
        assert!(matches!(r, Err(BackendError::Unavailable(_))), "{r:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn more_renewals_than_a_call_takes_are_split() {
        let calls = Arc::new(Mutex::new(Vec::new()));
        let batcher = Arc::new(Batcher::default());
        let sends = Arc::new(AtomicUsize::new(0));
        let counted = sends.clone();
        let inner = sender(calls.clone(), ok_all);
        let send: SendFn = Arc::new(move |b| {
            counted.fetch_add(1, Ordering::Relaxed);
            inner(b)
        });
        let mut joins = Vec::new();
        for i in 0..BATCH_MAX + 10 {
            let (b, s) = (batcher.clone(), send.clone());
            joins.push(tokio::spawn(async move {
                b.renew(renewal(&format!("k{i}"), Duration::from_secs(4)), || s)
                    .await
            }));
        }
        for j in joins {
            assert!(j.await.unwrap().is_ok());
        }
        assert_eq!(sends.load(Ordering::Relaxed), 2);
        let calls = calls.lock().unwrap();
        assert_eq!(calls[0].len() + calls[1].len(), BATCH_MAX + 10);
        assert!(calls.iter().all(|c| c.len() <= BATCH_MAX));
    }
}
