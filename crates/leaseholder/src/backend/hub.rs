//! One watch subscription per backend, demultiplexed to the keys' campaigns.
//!
//! The first [`Subscription`] starts a watcher task. The task calls
//! `BackendEdge::watch`, forwards each event to the subscribers of its key
//! (and [`WatchEvent::Resync`] to all), and when the stream ends it sends
//! `Resync` (followers that were waiting for the watch read the store and
//! go by its expiry hints), reconnects with capped backoff and sends
//! `Resync` again once it is back, since events may have been missed. The task ends when the backend is dropped
//! (its `Hub` aborts it) or when the backend cannot watch.
//!
//! A store call that succeeds while the watcher is backing off
//! ([`Hub::kick`]) cuts the backoff short: the link is back, so the watch
//! reconnects at once (at most every [`BACKOFF_MIN`]) instead of up to
//! [`BACKOFF_MAX`] later, and a follower whose link healed hears of the
//! next release when it happens.
//!
//! The task is started by the first subscription on the runtime it runs
//! on; if it has ended (that runtime was shut down, or a panic in the
//! backend's stream ended it), the next subscription starts it again on
//! the caller's runtime. A panic while polling the backend's stream ends
//! that stream like a broken connection.
//!
//! Lock order: only `Hub::state` is ever locked, never across an `.await`.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use futures_channel::mpsc;
use futures_util::StreamExt;
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::{Key, Nonce, WatchEvent, WatchStream};
use crate::error::BackendError;

const BACKOFF_MIN: Duration = Duration::from_millis(50);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

#[derive(Default)]
pub(crate) struct Hub {
    state: Arc<Mutex<State>>,
    /// Woken by [`Hub::kick`]; the watcher waits on it while backing off.
    kick: Arc<Notify>,
}

/// One subscriber of a key.
struct Sub {
    id: u64,
    tx: mpsc::UnboundedSender<WatchEvent>,
    /// A leader's own lease: its `Updated` events (the echo of each of its
    /// renewals) are not delivered; a leader makes nothing of them, and
    /// waking every leader for each of its own renewals is most of what
    /// many keys cost (issue 17). Events of any other holder, releases and
    /// resyncs still are.
    mute: Option<Nonce>,
}

#[derive(Default)]
struct State {
    subs: HashMap<Key, Vec<Sub>>,
    next_id: u64,
    task: Option<JoinHandle<()>>,
    /// The backend said it cannot watch: do not ask again.
    no_watch: bool,
    /// A watch stream is connected.
    up: bool,
}

fn lock(state: &Mutex<State>) -> MutexGuard<'_, State> {
    // A panic while holding this lock cannot leave the map inconsistent
    // (every critical section is a single insert, remove or iteration), so a
    // poisoned lock is safe to keep using.
    state.lock().unwrap_or_else(|poison| poison.into_inner())
}

impl Hub {
    pub(crate) fn subscribe<C, F>(&self, key: &Key, connect: C) -> Subscription
    where
        C: Fn() -> F + Send + 'static,
        F: Future<Output = Option<Result<Option<WatchStream>, BackendError>>> + Send + 'static,
    {
        let (tx, rx) = mpsc::unbounded();
        let mut state = lock(&self.state);
        let id = state.next_id;
        state.next_id += 1;
        state
            .subs
            .entry(key.clone())
            .or_default()
            .push(Sub { id, tx, mute: None });
        let ended = state.task.as_ref().is_none_or(JoinHandle::is_finished);
        if ended && !state.no_watch {
            let weak = Arc::downgrade(&self.state);
            state.task = Some(tokio::spawn(run(weak, self.kick.clone(), connect)));
        }
        Subscription {
            key: key.clone(),
            id,
            rx,
            hub: Arc::downgrade(&self.state),
        }
    }
}

impl Hub {
    /// A store call succeeded: if the watcher is backing off after a broken
    /// watch, it reconnects now.
    pub(crate) fn kick(&self) {
        self.kick.notify_waiters();
    }
}

impl Drop for Hub {
    fn drop(&mut self) {
        if let Some(task) = lock(&self.state).task.take() {
            task.abort();
        }
    }
}

fn dispatch(state: &Weak<Mutex<State>>, event: WatchEvent) -> bool {
    let Some(state) = state.upgrade() else {
        return false;
    };
    let state = lock(&state);
    match &event {
        WatchEvent::Updated(key, Some(holder)) => {
            for sub in state.subs.get(key).into_iter().flatten() {
                if !sub.mute.is_some_and(|n| holder.is_nonce(n)) {
                    let _ = sub.tx.unbounded_send(event.clone());
                }
            }
        }
        WatchEvent::Released(key)
        | WatchEvent::Updated(key, None)
        | WatchEvent::Candidates(key) => {
            for sub in state.subs.get(key).into_iter().flatten() {
                let _ = sub.tx.unbounded_send(event.clone());
            }
        }
        WatchEvent::Resync => {
            for sub in state.subs.values().flatten() {
                let _ = sub.tx.unbounded_send(WatchEvent::Resync);
            }
        }
    }
    true
}

async fn run<C, F>(state: Weak<Mutex<State>>, kick: Arc<Notify>, connect: C)
where
    C: Fn() -> F,
    F: Future<Output = Option<Result<Option<WatchStream>, BackendError>>>,
{
    let mut backoff = BACKOFF_MIN;
    loop {
        match connect().await {
            None => return,
            Some(Ok(None)) => {
                tracing::debug!("backend has no watch; followers poll");
                if let Some(state) = state.upgrade() {
                    lock(&state).no_watch = true;
                }
                return;
            }
            Some(Ok(Some(mut stream))) => {
                backoff = BACKOFF_MIN;
                set_up(&state, true);
                if !dispatch(&state, WatchEvent::Resync) {
                    return;
                }
                while let Some(event) = next_event(&mut stream).await {
                    if !dispatch(&state, event) {
                        return;
                    }
                }
                drop(stream);
                set_up(&state, false);
                // Followers that wait for the watch to tell them (no
                // expiry hint, a watch that reports expiry) read the store
                // now, and go by its hints until the watch is back.
                if !dispatch(&state, WatchEvent::Resync) {
                    return;
                }
                tracing::debug!("watch stream ended; reconnecting");
            }
            Some(Err(error)) => {
                tracing::warn!(%error, "watch failed; followers fall back to timers");
            }
        }
        let started = Instant::now();
        tokio::select! {
            () = tokio::time::sleep(backoff) => {
                backoff = (backoff * 2).min(BACKOFF_MAX);
            }
            () = kick.notified() => {
                // The store answers again: reconnect now, but never more
                // often than every BACKOFF_MIN.
                tokio::time::sleep_until(started + BACKOFF_MIN).await;
                backoff = BACKOFF_MIN;
            }
        }
    }
}

fn set_up(state: &Weak<Mutex<State>>, up: bool) {
    if let Some(state) = state.upgrade() {
        lock(&state).up = up;
    }
}

/// The stream's next event; `None` when it ends, or when polling it
/// panicked (treated as a broken connection).
async fn next_event(stream: &mut WatchStream) -> Option<WatchEvent> {
    use std::panic::{AssertUnwindSafe, catch_unwind};
    use std::task::Poll;
    let mut broken = false;
    std::future::poll_fn(|cx| {
        if broken {
            return Poll::Ready(None);
        }
        match catch_unwind(AssertUnwindSafe(|| stream.poll_next_unpin(cx))) {
            Ok(poll) => poll,
            Err(payload) => {
                broken = true;
                let message = crate::error::panic_message(&*payload);
                tracing::error!(%message, "the backend's watch stream panicked; reconnecting");
                Poll::Ready(None)
            }
        }
    })
    .await
}

/// The watch events of one key, from its backend's single watch.
///
/// Dropping it unsubscribes. The queue is a `futures` channel, which
/// allocates per event, rather than tokio's, which allocates 32 slots per
/// subscription up front (5 KiB a key).
#[derive(Debug)]
pub struct Subscription {
    key: Key,
    id: u64,
    rx: mpsc::UnboundedReceiver<WatchEvent>,
    hub: Weak<Mutex<State>>,
}

impl Subscription {
    /// `true` once the backend's watch is connected (the events of this
    /// key are delivered from now on), or if the backend cannot watch.
    pub(crate) fn is_live(&self) -> bool {
        self.hub.upgrade().is_none_or(|state| {
            let state = lock(&state);
            state.up || state.no_watch
        })
    }

    /// Stops (with `Some`) or resumes (`None`) delivering the `Updated`
    /// events whose holder has this nonce: a leader's own renewals.
    pub(crate) fn mute(&self, nonce: Option<Nonce>) {
        if let Some(state) = self.hub.upgrade() {
            let mut state = lock(&state);
            let sub = state
                .subs
                .get_mut(&self.key)
                .and_then(|list| list.iter_mut().find(|s| s.id == self.id));
            if let Some(sub) = sub {
                sub.mute = nonce;
            }
        }
    }

    /// The next event. Pending forever if the backend cannot watch or was
    /// dropped; use it in a `select!` beside timers.
    pub async fn next(&mut self) -> WatchEvent {
        match self.rx.next().await {
            Some(event) => event,
            None => std::future::pending().await,
        }
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        if let Some(state) = self.hub.upgrade() {
            let mut state = lock(&state);
            if let Some(list) = state.subs.get_mut(&self.key) {
                list.retain(|s| s.id != self.id);
                if list.is_empty() {
                    state.subs.remove(&self.key);
                }
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::backend::{Claim, FencingToken, Holder, LeaderId, Lease};

    fn holder_of(lease: &Lease) -> Holder {
        Holder::decode(
            &lease.value().encode(),
            Some(lease.token()),
            lease.revision(),
            None,
        )
    }

    /// A muted subscriber misses only the `Updated` events of its own
    /// lease; another holder's, releases and resyncs still come, and after
    /// unmuting its own come again.
    #[tokio::test]
    async fn a_muted_subscriber_misses_only_its_own_leases_updates() {
        let (events, rx) = mpsc::unbounded::<WatchEvent>();
        let rx = Arc::new(Mutex::new(Some(rx)));
        let hub = Hub::default();
        let key = Key::new("k").unwrap();
        let mut sub = hub.subscribe(&key, move || {
            let rx = rx.lock().unwrap().take();
            async move { rx.map(|rx| Ok(Some(Box::pin(rx) as WatchStream))) }
        });
        assert_eq!(sub.next().await, WatchEvent::Resync);
        let ours = Lease::new(
            &Claim::new(LeaderId::new(), Default::default()),
            FencingToken::new(1),
            1,
        );
        let theirs = Lease::new(
            &Claim::new(LeaderId::new(), Default::default()),
            FencingToken::new(2),
            1,
        );
        let own = WatchEvent::Updated(key.clone(), Some(holder_of(&ours)));
        let other = WatchEvent::Updated(key.clone(), Some(holder_of(&theirs)));
        sub.mute(Some(ours.nonce()));
        for e in [
            own.clone(),
            other.clone(),
            own.clone(),
            WatchEvent::Updated(key.clone(), None),
            WatchEvent::Released(key.clone()),
            WatchEvent::Resync,
        ] {
            events.unbounded_send(e).unwrap();
        }
        assert_eq!(sub.next().await, other);
        assert_eq!(sub.next().await, WatchEvent::Updated(key.clone(), None));
        assert_eq!(sub.next().await, WatchEvent::Released(key.clone()));
        assert_eq!(sub.next().await, WatchEvent::Resync);
        sub.mute(None);
        events.unbounded_send(own.clone()).unwrap();
        assert_eq!(sub.next().await, own);
    }
}
