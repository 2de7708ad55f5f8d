//! An in-process store: no server, leases expire on tokio's clock.
//!
//! A [`MemoryStore`] is shared by many candidates in one process; each
//! candidate talks to it through its own [`MemoryBackend`], which can inject
//! faults into that candidate's calls only (fail, hang, lose the reply,
//! delay, partition). Because expiry uses `tokio::time`, tests under
//! `#[tokio::test(start_paused = true)]` run a ttl in no wall time.
//!
//! ```
//! use std::time::Duration;
//! use leaseholder::{Backend, Leader, MemoryStore};
//!
//! # fn main() -> Result<(), leaseholder::Error> {
//! let store = MemoryStore::new();
//! let edge = store.backend();
//! let faults = edge.faults();
//! let leader = Leader::builder("jobs")
//!     .backend(Backend::new(edge))
//!     .ttl(Duration::from_secs(2))
//!     .build()?;
//! faults.fail_next(1); // the next call of this candidate fails
//! # let _ = leader;
//! # Ok(())
//! # }
//! ```

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::broadcast;
use tokio::task::AbortHandle;
use tokio::time::Instant;

use super::{
    Acquired, BackendEdge, Candidate, Claim, FencingToken, Holder, Key, LeaderId, Lease,
    LeaseValue, Prepared, Renewed, WatchEvent, WatchStream,
};
use crate::error::{BackendError, Op};

/// An in-process lease store. Cheap to clone; clones share the store.
#[derive(Clone, Default)]
pub struct MemoryStore {
    inner: Arc<StoreInner>,
}

struct StoreInner {
    state: Mutex<StoreState>,
    events: broadcast::Sender<WatchEvent>,
    delayed: Mutex<Vec<AbortHandle>>,
}

impl Default for StoreInner {
    fn default() -> Self {
        StoreInner {
            state: Mutex::default(),
            events: broadcast::channel(4096).0,
            delayed: Mutex::default(),
        }
    }
}

impl Drop for StoreInner {
    fn drop(&mut self) {
        for task in lock(&self.delayed).drain(..) {
            task.abort();
        }
    }
}

#[derive(Default)]
struct StoreState {
    entries: HashMap<Key, Entry>,
    /// Every entry by its expiry, earliest first: a sweep pops what has
    /// expired instead of scanning every entry, on every call.
    by_expiry: BTreeSet<(Instant, Key)>,
    /// The last token issued per key; never decreases, survives release.
    tokens: HashMap<Key, u64>,
    revision: u64,
    setups: u64,
    /// The candidate registry: per key, each candidate's stored entry and
    /// its expiry.
    candidates: HashMap<Key, HashMap<LeaderId, (Bytes, Instant)>>,
    /// Every registry entry by its expiry, earliest first.
    candidates_by_expiry: BTreeSet<(Instant, Key, LeaderId)>,
}

struct Entry {
    value: Bytes,
    token: Option<FencingToken>,
    revision: u64,
    expires_at: Instant,
}

impl StoreState {
    fn insert(&mut self, key: &Key, entry: Entry) {
        self.by_expiry.insert((entry.expires_at, key.clone()));
        if let Some(old) = self.entries.insert(key.clone(), entry) {
            self.by_expiry.remove(&(old.expires_at, key.clone()));
        }
    }

    fn remove(&mut self, key: &Key) -> Option<Entry> {
        let entry = self.entries.remove(key)?;
        self.by_expiry.remove(&(entry.expires_at, key.clone()));
        Some(entry)
    }

    /// Moves `key`'s expiry (the entry must exist).
    fn set_expiry(&mut self, key: &Key, at: Instant) {
        if let Some(entry) = self.entries.get_mut(key) {
            self.by_expiry.remove(&(entry.expires_at, key.clone()));
            entry.expires_at = at;
            self.by_expiry.insert((at, key.clone()));
        }
    }

    /// Writes a registry entry; `true` if the set changed (a new entry, or
    /// other contents), not for a plain renewal.
    fn put_candidate(
        &mut self,
        key: &Key,
        id: LeaderId,
        value: Bytes,
        expires_at: Instant,
    ) -> bool {
        self.candidates_by_expiry
            .insert((expires_at, key.clone(), id));
        let old = self
            .candidates
            .entry(key.clone())
            .or_default()
            .insert(id, (value.clone(), expires_at));
        match old {
            Some((old_value, old_at)) => {
                if old_at != expires_at {
                    self.candidates_by_expiry.remove(&(old_at, key.clone(), id));
                }
                old_value != value
            }
            None => true,
        }
    }

    /// Removes a registry entry; `true` if there was one.
    fn remove_candidate(&mut self, key: &Key, id: LeaderId) -> bool {
        let Some(entries) = self.candidates.get_mut(key) else {
            return false;
        };
        let Some((_, at)) = entries.remove(&id) else {
            return false;
        };
        if entries.is_empty() {
            self.candidates.remove(key);
        }
        self.candidates_by_expiry.remove(&(at, key.clone(), id));
        true
    }

    /// Removes the registry entries that expired by `now`; their keys.
    fn sweep_candidates(&mut self, now: Instant) -> Vec<Key> {
        let mut changed = Vec::new();
        while let Some((at, _, _)) = self.candidates_by_expiry.first() {
            if *at > now {
                break;
            }
            if let Some((_, key, id)) = self.candidates_by_expiry.pop_first() {
                if let Some(entries) = self.candidates.get_mut(&key) {
                    entries.remove(&id);
                    if entries.is_empty() {
                        self.candidates.remove(&key);
                    }
                }
                if !changed.contains(&key) {
                    changed.push(key);
                }
            }
        }
        changed
    }

    /// Removes the entries that expired by `now`; their keys.
    fn sweep(&mut self, now: Instant) -> Vec<Key> {
        let mut expired = Vec::new();
        while let Some((at, _)) = self.by_expiry.first() {
            if *at > now {
                break;
            }
            if let Some((_, key)) = self.by_expiry.pop_first() {
                self.entries.remove(&key);
                expired.push(key);
            }
        }
        expired
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every critical section below leaves the state consistent before it can
    // panic, so a poisoned lock is safe to keep using.
    m.lock().unwrap_or_else(|poison| poison.into_inner())
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> MemoryStore {
        MemoryStore::default()
    }

    /// A new client of this store, with its own fault injector.
    pub fn backend(&self) -> MemoryBackend {
        MemoryBackend {
            store: self.clone(),
            faults: Faults::default(),
            batched: false,
        }
    }

    /// Writes a raw value under `key` that lives for `ttl`, bypassing the
    /// lease rules: a foreign lease, as another program would leave it.
    pub fn put_raw(&self, key: &Key, value: impl Into<Bytes>, ttl: Duration) {
        let now = Instant::now();
        let mut state = self.lock_swept(now);
        state.revision += 1;
        let revision = state.revision;
        state.insert(
            key,
            Entry {
                value: value.into(),
                token: None,
                revision,
                expires_at: crate::campaign::core::later(now, ttl),
            },
        );
        drop(state);
        let _ = self
            .inner
            .events
            .send(WatchEvent::Updated(key.clone(), None));
    }

    /// Removes whatever is stored under `key`, as an operator would.
    pub fn force_delete(&self, key: &Key) {
        let removed = self.lock_swept(Instant::now()).remove(key);
        if removed.is_some() {
            let _ = self.inner.events.send(WatchEvent::Released(key.clone()));
        }
    }

    /// The last fencing token issued for `key`.
    pub fn last_token(&self, key: &Key) -> Option<FencingToken> {
        lock(&self.inner.state)
            .tokens
            .get(key)
            .copied()
            .map(FencingToken::new)
    }

    /// How many times `setup` has run.
    pub fn setups(&self) -> u64 {
        lock(&self.inner.state).setups
    }

    /// Locks the state after removing expired entries, and tells watchers
    /// about each one.
    fn lock_swept(&self, now: Instant) -> MutexGuard<'_, StoreState> {
        let mut state = lock(&self.inner.state);
        for key in state.sweep(now) {
            let _ = self.inner.events.send(WatchEvent::Released(key));
        }
        for key in state.sweep_candidates(now) {
            let _ = self.inner.events.send(WatchEvent::Candidates(key));
        }
        state
    }

    fn next_expiry(&self) -> Option<Instant> {
        let state = lock(&self.inner.state);
        let lease = state.by_expiry.first().map(|(at, _)| *at);
        let entry = state.candidates_by_expiry.first().map(|(at, _, _)| *at);
        match (lease, entry) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Writes a raw registry entry under `key` for candidate `id` that lives
    /// for `ttl`: another program's entry, or garbage.
    pub fn put_raw_candidate(
        &self,
        key: &Key,
        id: LeaderId,
        value: impl Into<Bytes>,
        ttl: Duration,
    ) {
        let now = Instant::now();
        let mut state = self.lock_swept(now);
        let changed = state.put_candidate(
            key,
            id,
            value.into(),
            crate::campaign::core::later(now, ttl),
        );
        drop(state);
        if changed {
            let _ = self.inner.events.send(WatchEvent::Candidates(key.clone()));
        }
    }

    fn apply(&self, call: &Call) -> Result<Reply, BackendError> {
        let now = Instant::now();
        let mut state = self.lock_swept(now);
        let event;
        let reply = match call {
            Call::Register(key, candidate, ttl) => {
                let at = crate::campaign::core::later(now, *ttl);
                if !state.put_candidate(key, candidate.id(), candidate.encode(), at) {
                    return Ok(Reply::Done);
                }
                event = WatchEvent::Candidates(key.clone());
                Reply::Done
            }
            Call::Deregister(key, id) => {
                if !state.remove_candidate(key, *id) {
                    return Ok(Reply::Done);
                }
                event = WatchEvent::Candidates(key.clone());
                Reply::Done
            }
            Call::Candidates(key) => {
                let list = state
                    .candidates
                    .get(key)
                    .into_iter()
                    .flat_map(|entries| entries.values())
                    .filter_map(|(value, _)| Candidate::decode(value).ok())
                    .collect();
                return Ok(Reply::Candidates(list));
            }
            Call::Candidate(key, id) => {
                let entry = state
                    .candidates
                    .get(key)
                    .and_then(|entries| entries.get(id))
                    .and_then(|(value, _)| Candidate::decode(value).ok());
                return Ok(Reply::Candidate(entry));
            }
            Call::Setup => {
                state.setups += 1;
                return Ok(Reply::Setup);
            }
            Call::Holder(key) => {
                return Ok(Reply::Holder(state.entries.get(key).map(|e| e.holder(now))));
            }
            Call::Keys => {
                return Ok(Reply::Keys(state.entries.keys().cloned().collect()));
            }
            Call::Acquire(key, claim, ttl) => {
                if let Some(entry) = state.entries.get(key) {
                    return Ok(Reply::Acquire(Acquired::Held(entry.holder(now))));
                }
                let token = state.tokens.get(key).copied().unwrap_or(0) + 1;
                state.tokens.insert(key.clone(), token);
                state.revision += 1;
                let lease = Lease::new(claim, FencingToken::new(token), state.revision);
                let entry = Entry {
                    value: lease.value().encode(),
                    token: Some(lease.token()),
                    revision: lease.revision(),
                    expires_at: crate::campaign::core::later(now, *ttl),
                };
                event = WatchEvent::Updated(key.clone(), Some(entry.holder(now)));
                state.insert(key, entry);
                Reply::Acquire(Acquired::Won(lease))
            }
            Call::Renew(key, lease, ttl) => {
                state.revision += 1;
                let revision = state.revision;
                match state.entries.get_mut(key) {
                    Some(entry) if entry.nonce() == Some(lease.nonce()) => {
                        entry.revision = revision;
                    }
                    _ => return Ok(Reply::Renew(Renewed::Lost)),
                }
                state.set_expiry(key, crate::campaign::core::later(now, *ttl));
                let holder = state.entries.get(key).map(|e| e.holder(now));
                event = WatchEvent::Updated(key.clone(), holder);
                Reply::Renew(Renewed::Renewed(lease.with_revision(revision)))
            }
            Call::Proclaim(key, lease, metadata, ttl) => {
                state.revision += 1;
                let revision = state.revision;
                let lease = lease
                    .with_metadata(metadata.clone())
                    .with_revision(revision);
                match state.entries.get_mut(key) {
                    Some(entry) if entry.nonce() == Some(lease.nonce()) => {
                        entry.revision = revision;
                        entry.value = lease.value().encode();
                    }
                    _ => return Ok(Reply::Renew(Renewed::Lost)),
                }
                state.set_expiry(key, crate::campaign::core::later(now, *ttl));
                let holder = state.entries.get(key).map(|e| e.holder(now));
                event = WatchEvent::Updated(key.clone(), holder);
                Reply::Renew(Renewed::Renewed(lease))
            }
            Call::Release(key, lease) => {
                let ours = state
                    .entries
                    .get(key)
                    .is_some_and(|e| e.nonce() == Some(lease.nonce()));
                if !ours {
                    return Ok(Reply::Release);
                }
                state.remove(key);
                event = WatchEvent::Released(key.clone());
                Reply::Release
            }
        };
        drop(state);
        let _ = self.inner.events.send(event);
        Ok(reply)
    }
}

impl Entry {
    fn nonce(&self) -> Option<super::Nonce> {
        LeaseValue::decode(&self.value).ok().map(|v| v.nonce)
    }

    fn holder(&self, now: Instant) -> Holder {
        Holder::decode(
            &self.value,
            self.token,
            self.revision,
            Some(self.expires_at.saturating_duration_since(now)),
        )
    }
}

impl fmt::Debug for MemoryStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = lock(&self.inner.state);
        f.debug_struct("MemoryStore")
            .field("leases", &state.entries.len())
            .field("revision", &state.revision)
            .finish()
    }
}

enum Call {
    Setup,
    Acquire(Key, Claim, Duration),
    Renew(Key, Lease, Duration),
    Release(Key, Lease),
    Holder(Key),
    Keys,
    Proclaim(Key, Lease, Bytes, Duration),
    Register(Key, Candidate, Duration),
    Deregister(Key, LeaderId),
    Candidates(Key),
    Candidate(Key, LeaderId),
}

impl Call {
    fn op(&self) -> Op {
        match self {
            Call::Proclaim(..) => Op::Proclaim,
            Call::Register(..) => Op::Register,
            Call::Deregister(..) => Op::Deregister,
            Call::Candidates(..) | Call::Candidate(..) => Op::Candidates,
            Call::Setup => Op::Setup,
            Call::Acquire(..) => Op::Acquire,
            Call::Renew(..) => Op::Renew,
            Call::Release(..) => Op::Release,
            Call::Holder(..) => Op::Holder,
            Call::Keys => Op::Keys,
        }
    }
}

enum Reply {
    Setup,
    Acquire(Acquired),
    Renew(Renewed),
    Release,
    Holder(Option<Holder>),
    Keys(Vec<Key>),
    Done,
    Candidates(Vec<Candidate>),
    Candidate(Option<Candidate>),
}

/// A fault to inject into one candidate's calls.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Fault {
    /// The call fails with [`BackendError::Unavailable`] and does nothing.
    Fail,
    /// The call never replies and does nothing (the campaign's timeout ends
    /// it).
    Hang,
    /// The call takes effect, but its reply is lost: it fails with
    /// [`BackendError::Unavailable`].
    LoseReply,
    /// The request arrives after the delay, takes effect then, and replies.
    /// It takes effect even if the caller gave up in the meantime, like a
    /// request stuck in the network.
    Delay(Duration),
}

/// A candidate's fault injector. Cheap to clone; clones control the same
/// [`MemoryBackend`].
#[derive(Clone, Default)]
pub struct Faults {
    inner: Arc<Mutex<FaultState>>,
}

#[derive(Default)]
struct FaultState {
    queue: VecDeque<(Option<Op>, Fault)>,
    always: Option<Fault>,
    partitioned: bool,
    calls: u64,
}

impl Faults {
    /// Queues `fault` for the next `n` calls (of any operation).
    pub fn inject(&self, fault: Fault, n: usize) {
        let mut state = lock(&self.inner);
        state.queue.extend(std::iter::repeat_n((None, fault), n));
    }

    /// Queues `fault` for the next `n` calls of `op` only; calls of other
    /// operations pass.
    pub fn inject_on(&self, op: Op, fault: Fault, n: usize) {
        let mut state = lock(&self.inner);
        state
            .queue
            .extend(std::iter::repeat_n((Some(op), fault), n));
    }

    /// The next `n` calls fail.
    pub fn fail_next(&self, n: usize) {
        self.inject(Fault::Fail, n);
    }

    /// The next `n` calls hang.
    pub fn hang_next(&self, n: usize) {
        self.inject(Fault::Hang, n);
    }

    /// The next `n` calls take effect but lose their reply.
    pub fn lose_reply_next(&self, n: usize) {
        self.inject(Fault::LoseReply, n);
    }

    /// Applies `fault` to every call from now on (after any queued faults),
    /// until [`clear`](Self::clear). `always(Fault::Hang)` is a store that
    /// stopped answering.
    pub fn always(&self, fault: Fault) {
        lock(&self.inner).always = Some(fault);
    }

    /// Cuts this candidate off the store: every call fails and its watch
    /// ends, until [`heal`](Self::heal).
    pub fn partition(&self) {
        lock(&self.inner).partitioned = true;
    }

    /// Ends a [`partition`](Self::partition).
    pub fn heal(&self) {
        lock(&self.inner).partitioned = false;
    }

    /// Drops every queued fault and an [`always`](Self::always) fault (a
    /// partition stays).
    pub fn clear(&self) {
        let mut state = lock(&self.inner);
        state.queue.clear();
        state.always = None;
    }

    /// `true` while partitioned.
    pub fn is_partitioned(&self) -> bool {
        lock(&self.inner).partitioned
    }

    /// How many calls this candidate has made (faulted ones included).
    pub fn calls(&self) -> u64 {
        lock(&self.inner).calls
    }

    fn take(&self, op: Op) -> Option<Fault> {
        let mut state = lock(&self.inner);
        state.calls += 1;
        if state.partitioned {
            return Some(Fault::Fail);
        }
        let queued = state
            .queue
            .iter()
            .position(|(only, _)| only.is_none_or(|o| o == op));
        match queued {
            Some(at) => state.queue.remove(at).map(|(_, fault)| fault),
            None => state.always,
        }
    }
}

impl fmt::Debug for Faults {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = lock(&self.inner);
        f.debug_struct("Faults")
            .field("queued", &state.queue.len())
            .field("partitioned", &state.partitioned)
            .finish()
    }
}

/// One candidate's client of a [`MemoryStore`], with its own [`Faults`].
#[derive(Clone, Debug)]
pub struct MemoryBackend {
    store: MemoryStore,
    faults: Faults,
    batched: bool,
}

#[derive(Debug, thiserror::Error)]
enum Injected {
    #[error("injected failure")]
    Fail,
    #[error("injected lost reply (the call took effect)")]
    LostReply,
    #[error("partitioned from the store")]
    Partitioned,
}

impl MemoryBackend {
    /// With `true`, this client says it [batches
    /// renewals](BackendEdge::batches_renewals), so that a [`Backend`](crate::Backend)
    /// on it gathers its campaigns' renewals into
    /// [`renew_many`](BackendEdge::renew_many) calls, each renewal of which
    /// meets this client's faults on its own (a fault queued for one call
    /// hits one renewal of a batch: a batch half applied). For tests of
    /// the batched path; it saves nothing in memory. Default: `false`.
    ///
    /// ```
    /// use leaseholder::{BackendEdge, MemoryStore};
    /// let store = MemoryStore::new();
    /// assert!(store.backend().batched(true).batches_renewals());
    /// assert!(!store.backend().batches_renewals());
    /// ```
    pub fn batched(mut self, on: bool) -> MemoryBackend {
        self.batched = on;
        self
    }

    /// This candidate's fault injector.
    pub fn faults(&self) -> Faults {
        self.faults.clone()
    }

    /// The store behind it.
    pub fn store(&self) -> &MemoryStore {
        &self.store
    }

    async fn call(&self, call: Call) -> Result<Reply, BackendError> {
        match self.faults.take(call.op()) {
            None => self.store.apply(&call),
            Some(Fault::Fail) if self.faults.is_partitioned() => {
                Err(BackendError::unavailable(Injected::Partitioned))
            }
            Some(Fault::Fail) => Err(BackendError::unavailable(Injected::Fail)),
            Some(Fault::Hang) => std::future::pending().await,
            Some(Fault::LoseReply) => {
                let _ = self.store.apply(&call);
                Err(BackendError::unavailable(Injected::LostReply))
            }
            Some(Fault::Delay(delay)) => {
                let store = self.store.clone();
                let task = tokio::spawn(async move {
                    tokio::time::sleep(delay).await;
                    store.apply(&call)
                });
                lock(&self.store.inner.delayed).push(task.abort_handle());
                match task.await {
                    Ok(reply) => reply,
                    Err(e) => Err(BackendError::unavailable(e)),
                }
            }
        }
    }
}

fn unexpected() -> BackendError {
    BackendError::fatal("memory store replied to a different call")
}

impl BackendEdge for MemoryBackend {
    fn name(&self) -> &'static str {
        "memory"
    }

    async fn setup(&self, _budget: Duration) -> Result<Prepared, BackendError> {
        match self.call(Call::Setup).await? {
            Reply::Setup => Ok(Prepared::Existing),
            _ => Err(unexpected()),
        }
    }

    async fn acquire(
        &self,
        key: &Key,
        claim: &Claim,
        ttl: Duration,
        _budget: Duration,
    ) -> Result<Acquired, BackendError> {
        match self
            .call(Call::Acquire(key.clone(), claim.clone(), ttl))
            .await?
        {
            Reply::Acquire(a) => Ok(a),
            _ => Err(unexpected()),
        }
    }

    async fn renew(
        &self,
        key: &Key,
        lease: &Lease,
        ttl: Duration,
        _budget: Duration,
    ) -> Result<Renewed, BackendError> {
        match self
            .call(Call::Renew(key.clone(), lease.clone(), ttl))
            .await?
        {
            Reply::Renew(r) => Ok(r),
            _ => Err(unexpected()),
        }
    }

    async fn release(
        &self,
        key: &Key,
        lease: &Lease,
        _budget: Duration,
    ) -> Result<(), BackendError> {
        match self.call(Call::Release(key.clone(), lease.clone())).await? {
            Reply::Release => Ok(()),
            _ => Err(unexpected()),
        }
    }

    async fn holder(&self, key: &Key, _budget: Duration) -> Result<Option<Holder>, BackendError> {
        match self.call(Call::Holder(key.clone())).await? {
            Reply::Holder(h) => Ok(h),
            _ => Err(unexpected()),
        }
    }

    async fn keys(&self, _budget: Duration) -> Result<Vec<Key>, BackendError> {
        match self.call(Call::Keys).await? {
            Reply::Keys(keys) => Ok(keys),
            _ => Err(unexpected()),
        }
    }

    async fn watch(&self) -> Result<Option<WatchStream>, BackendError> {
        if self.faults.is_partitioned() {
            return Err(BackendError::unavailable(Injected::Partitioned));
        }
        let state = WatchState {
            rx: self.store.inner.events.subscribe(),
            store: self.store.clone(),
            faults: self.faults.clone(),
        };
        let stream = futures_util::stream::unfold(state, |mut s| async move {
            let event = s.next().await?;
            Some((event, s))
        });
        Ok(Some(Box::pin(stream)))
    }

    fn watch_reports_expiry(&self) -> bool {
        true
    }

    fn batches_renewals(&self) -> bool {
        self.batched
    }

    fn supports_candidates(&self) -> bool {
        true
    }

    fn supports_proclaim(&self) -> bool {
        true
    }

    async fn proclaim(
        &self,
        key: &Key,
        lease: &Lease,
        metadata: &Bytes,
        ttl: Duration,
        _budget: Duration,
    ) -> Result<Renewed, BackendError> {
        match self
            .call(Call::Proclaim(
                key.clone(),
                lease.clone(),
                metadata.clone(),
                ttl,
            ))
            .await?
        {
            Reply::Renew(r) => Ok(r),
            _ => Err(unexpected()),
        }
    }

    async fn register(
        &self,
        key: &Key,
        candidate: &Candidate,
        ttl: Duration,
        _budget: Duration,
    ) -> Result<(), BackendError> {
        match self
            .call(Call::Register(key.clone(), candidate.clone(), ttl))
            .await?
        {
            Reply::Done => Ok(()),
            _ => Err(unexpected()),
        }
    }

    async fn deregister(
        &self,
        key: &Key,
        id: LeaderId,
        _budget: Duration,
    ) -> Result<(), BackendError> {
        match self.call(Call::Deregister(key.clone(), id)).await? {
            Reply::Done => Ok(()),
            _ => Err(unexpected()),
        }
    }

    async fn candidates(
        &self,
        key: &Key,
        _budget: Duration,
    ) -> Result<Vec<Candidate>, BackendError> {
        match self.call(Call::Candidates(key.clone())).await? {
            Reply::Candidates(list) => Ok(list),
            _ => Err(unexpected()),
        }
    }

    async fn candidate(
        &self,
        key: &Key,
        id: LeaderId,
        _budget: Duration,
    ) -> Result<Option<Candidate>, BackendError> {
        match self.call(Call::Candidate(key.clone(), id)).await? {
            Reply::Candidate(entry) => Ok(entry),
            _ => Err(unexpected()),
        }
    }
}

struct WatchState {
    rx: broadcast::Receiver<WatchEvent>,
    store: MemoryStore,
    faults: Faults,
}

impl WatchState {
    /// The next event, sweeping expired leases when the earliest expires;
    /// `None` (the stream ends) once this candidate is partitioned.
    async fn next(&mut self) -> Option<WatchEvent> {
        loop {
            if self.faults.is_partitioned() {
                return None;
            }
            let sweep_at = self.store.next_expiry();
            tokio::select! {
                received = self.rx.recv() => match received {
                    Ok(event) if self.faults.is_partitioned() => {
                        let _ = event;
                        return None;
                    }
                    Ok(event) => return Some(event),
                    Err(broadcast::error::RecvError::Lagged(_)) => return Some(WatchEvent::Resync),
                    Err(broadcast::error::RecvError::Closed) => return None,
                },
                () = sleep_until(sweep_at) => {
                    drop(self.store.lock_swept(Instant::now()));
                }
            }
        }
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::backend::{BackendEdge, Claim, LeaderId};

    fn consistent(store: &MemoryStore) {
        let state = lock(&store.inner.state);
        assert_eq!(state.entries.len(), state.by_expiry.len());
        for (key, entry) in &state.entries {
            assert!(state.by_expiry.contains(&(entry.expires_at, key.clone())));
        }
    }

    /// The expiry index follows every write: a renewal moves a lease's
    /// expiry, a release, a forced delete or a raw put over an entry
    /// replaces its place, and each lease expires exactly when its last
    /// write said.
    #[tokio::test(start_paused = true)]
    async fn the_expiry_index_follows_every_write() {
        let store = MemoryStore::new();
        let b = store.backend();
        let budget = Duration::from_secs(1);
        let ms = Duration::from_millis;
        let (k1, k2, k3) = (
            Key::new("k1").unwrap(),
            Key::new("k2").unwrap(),
            Key::new("k3").unwrap(),
        );
        let claim = || Claim::new(LeaderId::new(), Bytes::new());
        let Acquired::Won(l1) = b.acquire(&k1, &claim(), ms(100), budget).await.unwrap() else {
            panic!("k1 is free");
        };
        let Acquired::Won(l2) = b.acquire(&k2, &claim(), ms(300), budget).await.unwrap() else {
            panic!("k2 is free");
        };
        store.put_raw(&k3, &b"x"[..], ms(1000));
        store.put_raw(&k3, &b"y"[..], ms(200));
        consistent(&store);
        tokio::time::advance(ms(50)).await;
        assert!(matches!(
            b.renew(&k1, &l1, ms(400), budget).await.unwrap(),
            Renewed::Renewed(_)
        ));
        consistent(&store);
        // 310 ms: k2 (300) and k3 (200, its second put) are gone; k1 (450) is not.
        tokio::time::advance(ms(260)).await;
        assert!(b.holder(&k2, budget).await.unwrap().is_none());
        assert!(b.holder(&k3, budget).await.unwrap().is_none());
        assert!(b.holder(&k1, budget).await.unwrap().is_some());
        assert_eq!(
            b.renew(&k2, &l2, ms(400), budget).await.unwrap(),
            Renewed::Lost
        );
        consistent(&store);
        tokio::time::advance(ms(139)).await;
        assert!(b.holder(&k1, budget).await.unwrap().is_some());
        tokio::time::advance(ms(1)).await;
        assert!(b.holder(&k1, budget).await.unwrap().is_none());
        consistent(&store);
        // Release and forced delete leave no entry behind in the index.
        let Acquired::Won(l1) = b.acquire(&k1, &claim(), ms(100), budget).await.unwrap() else {
            panic!("k1 is free again");
        };
        b.release(&k1, &l1, budget).await.unwrap();
        b.acquire(&k2, &claim(), ms(100), budget).await.unwrap();
        store.force_delete(&k2);
        consistent(&store);
        assert!(lock(&store.inner.state).by_expiry.is_empty());
        assert_eq!(store.next_expiry(), None);
    }
}
