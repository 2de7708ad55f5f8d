//! The blocking adapter: a synchronous lease store (a `Mutex` and the
//! host's monotonic clock, as an embedded store would have) run through
//! `Backend::blocking` passes the conformance suite (its candidate registry
//! too, through the adapter), its watch is polled, and a panic in a
//! blocking call stops the campaign like a fatal error.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use leaseholder::conformance::{self, Harness};
use leaseholder::{
    Acquired, Backend, BackendError, BlockingBackendEdge, BoxError, Candidate, Claim, Error,
    FencingToken, Holder, Key, Leader, LeaderId, Lease, LeaseValue, Op, Prepared, Renewed, State,
    WatchEvent,
};

#[derive(Default)]
struct Table {
    entries: HashMap<Key, Entry>,
    /// The last token issued per key: kept across release and expiry.
    tokens: HashMap<Key, u64>,
    revision: u64,
    /// Bumped by every write, for `changes`.
    writes: u64,
    /// The candidate registry: each entry and its expiry.
    candidates: HashMap<(Key, LeaderId), (Bytes, Instant)>,
}

struct Entry {
    value: Bytes,
    token: Option<FencingToken>,
    revision: u64,
    expires_at: Instant,
}

impl Entry {
    fn holder(&self, now: Instant) -> Holder {
        Holder::decode(
            &self.value,
            self.token,
            self.revision,
            Some(self.expires_at.saturating_duration_since(now)),
        )
    }

    fn nonce(&self) -> Option<leaseholder::Nonce> {
        LeaseValue::decode(&self.value).ok().map(|v| v.nonce)
    }
}

/// A synchronous store: every call takes the lock, sweeps expired leases
/// by the host's monotonic clock, and returns.
#[derive(Clone, Default)]
struct SyncStore {
    table: Arc<Mutex<Table>>,
}

impl SyncStore {
    fn lock(&self) -> std::sync::MutexGuard<'_, Table> {
        let mut t = self.table.lock().unwrap();
        let now = Instant::now();
        t.entries.retain(|_, e| e.expires_at > now);
        t.candidates.retain(|_, (_, at)| *at > now);
        t
    }
}

/// Each key's nonce and revision as `changes` last saw them, and the
/// store's write count then.
type Seen = (HashMap<Key, (Option<leaseholder::Nonce>, u64)>, u64);

/// One client of the store, with its own view of `changes`.
struct Client {
    store: SyncStore,
    /// What `changes` last saw: each key's nonce and revision, and the
    /// write count.
    seen: Mutex<Seen>,
    /// Panic in this renewal (counting from 1).
    panic_on_renewal: Option<u32>,
    renewals: AtomicU32,
}

impl Client {
    fn new(store: &SyncStore) -> Client {
        Client {
            store: store.clone(),
            seen: Mutex::default(),
            panic_on_renewal: None,
            renewals: AtomicU32::new(0),
        }
    }
}

impl BlockingBackendEdge for Client {
    fn name(&self) -> &'static str {
        "sync-test-store"
    }

    fn setup(&self, _budget: Duration) -> Result<Prepared, BackendError> {
        Ok(Prepared::Existing)
    }

    fn acquire(
        &self,
        key: Key,
        claim: Claim,
        ttl: Duration,
        _budget: Duration,
    ) -> Result<Acquired, BackendError> {
        let now = Instant::now();
        let mut t = self.store.lock();
        if let Some(e) = t.entries.get(&key) {
            return Ok(Acquired::Held(e.holder(now)));
        }
        let token = t.tokens.get(&key).copied().unwrap_or(0) + 1;
        t.tokens.insert(key.clone(), token);
        t.revision += 1;
        t.writes += 1;
        let lease = Lease::new(&claim, FencingToken::new(token), t.revision);
        t.entries.insert(
            key,
            Entry {
                value: lease.value().encode(),
                token: Some(lease.token()),
                revision: lease.revision(),
                expires_at: now + ttl,
            },
        );
        Ok(Acquired::Won(lease))
    }

    fn renew(
        &self,
        key: Key,
        lease: Lease,
        ttl: Duration,
        _budget: Duration,
    ) -> Result<Renewed, BackendError> {
        let n = self.renewals.fetch_add(1, Ordering::SeqCst) + 1;
        if self.panic_on_renewal == Some(n) {
            panic!("injected panic in blocking renewal {n}");
        }
        let now = Instant::now();
        let mut t = self.store.lock();
        t.revision += 1;
        let revision = t.revision;
        match t.entries.get_mut(&key) {
            Some(e) if e.nonce() == Some(lease.nonce()) => {
                e.revision = revision;
                e.expires_at = now + ttl;
                t.writes += 1;
                Ok(Renewed::Renewed(lease.with_revision(revision)))
            }
            _ => Ok(Renewed::Lost),
        }
    }

    fn supports_proclaim(&self) -> bool {
        true
    }

    fn proclaim(
        &self,
        key: Key,
        lease: Lease,
        metadata: Bytes,
        ttl: Duration,
        _budget: Duration,
    ) -> Result<Renewed, BackendError> {
        let now = Instant::now();
        let mut t = self.store.lock();
        t.revision += 1;
        let revision = t.revision;
        let lease = lease.with_metadata(metadata).with_revision(revision);
        match t.entries.get_mut(&key) {
            Some(e) if e.nonce() == Some(lease.nonce()) => {
                e.value = lease.value().encode();
                e.revision = revision;
                e.expires_at = now + ttl;
                t.writes += 1;
                Ok(Renewed::Renewed(lease))
            }
            _ => Ok(Renewed::Lost),
        }
    }

    fn release(&self, key: Key, lease: Lease, _budget: Duration) -> Result<(), BackendError> {
        let mut t = self.store.lock();
        if t.entries
            .get(&key)
            .is_some_and(|e| e.nonce() == Some(lease.nonce()))
        {
            t.entries.remove(&key);
            t.writes += 1;
        }
        Ok(())
    }

    fn holder(&self, key: Key, _budget: Duration) -> Result<Option<Holder>, BackendError> {
        let now = Instant::now();
        Ok(self.store.lock().entries.get(&key).map(|e| e.holder(now)))
    }

    fn poll_interval(&self) -> Option<Duration> {
        Some(Duration::from_millis(5))
    }

    /// What changed since the last call, by comparing the table with what
    /// the last call saw: a key gone is `Released`, a key written
    /// `Updated` with its holder.
    fn changes(&self) -> Result<Vec<WatchEvent>, BackendError> {
        let now = Instant::now();
        let t = self.store.lock();
        let mut guard = self.seen.lock().unwrap();
        let (seen, writes) = &mut *guard;
        let mut events = Vec::new();
        seen.retain(|key, _| {
            let live = t.entries.contains_key(key);
            if !live {
                events.push(WatchEvent::Released(key.clone()));
            }
            live
        });
        for (key, e) in &t.entries {
            let now_seen = (e.nonce(), e.revision);
            if seen.insert(key.clone(), now_seen) != Some(now_seen) {
                events.push(WatchEvent::Updated(key.clone(), Some(e.holder(now))));
            }
        }
        // Writes between two polls may have left no trace (an acquire and
        // its release), also beside another key's change: say that
        // something changed.
        if *writes != t.writes {
            events.push(WatchEvent::Resync);
        }
        *writes = t.writes;
        Ok(events)
    }

    fn watch_reports_expiry(&self) -> bool {
        true
    }

    fn supports_candidates(&self) -> bool {
        true
    }

    fn register(
        &self,
        key: Key,
        candidate: Candidate,
        ttl: Duration,
        _budget: Duration,
    ) -> Result<(), BackendError> {
        let at = Instant::now() + ttl;
        self.store
            .lock()
            .candidates
            .insert((key, candidate.id()), (candidate.encode(), at));
        Ok(())
    }

    fn deregister(&self, key: Key, id: LeaderId, _budget: Duration) -> Result<(), BackendError> {
        self.store.lock().candidates.remove(&(key, id));
        Ok(())
    }

    fn candidates(&self, key: Key, _budget: Duration) -> Result<Vec<Candidate>, BackendError> {
        Ok(self
            .store
            .lock()
            .candidates
            .iter()
            .filter(|((k, _), _)| *k == key)
            .filter_map(|(_, (value, _))| Candidate::decode(value).ok())
            .collect())
    }
}

struct SyncHarness(SyncStore);

impl Harness for SyncHarness {
    async fn backend(&self) -> Backend {
        Backend::blocking(Client::new(&self.0))
    }

    async fn put_foreign(&self, key: &Key, value: &[u8], ttl: Duration) -> Result<(), BoxError> {
        let mut t = self.0.lock();
        t.revision += 1;
        let revision = t.revision;
        t.entries.insert(
            key.clone(),
            Entry {
                value: Bytes::copy_from_slice(value),
                token: None,
                revision,
                expires_at: Instant::now() + ttl,
            },
        );
        Ok(())
    }

    fn ttl(&self) -> Duration {
        Duration::from_millis(500)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blocking_store_passes_the_lease_contract() {
    let report = conformance::run(&SyncHarness(SyncStore::default())).await;
    println!("{report}");
    assert!(report.is_ok(), "{report}");
    // The registry's calls reach the blocking store.
    assert!(
        report
            .passed
            .iter()
            .filter(|r| r.starts_with("registry_"))
            .count()
            == 3,
        "{report}"
    );
    // So do proclaims.
    assert!(
        report
            .passed
            .contains(&"proclaim_replaces_the_metadata_and_renews"),
        "{report}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_polled_watch_hands_over_a_release() {
    let store = SyncStore::default();
    let make = || {
        Leader::builder("job")
            .backend(Backend::blocking(Client::new(&store)))
            .ttl(Duration::from_secs(10))
            .build()
            .unwrap()
    };
    let (a, b) = (make(), make());
    let start = |l: &Leader| {
        let l = l.clone();
        tokio::spawn(async move { l.start(Default::default()).await })
    };
    let ta = start(&a);
    tokio::time::timeout(
        Duration::from_secs(10),
        a.state().wait_for(State::is_leader),
    )
    .await
    .unwrap()
    .unwrap();
    let tb = start(&b);
    tokio::time::timeout(
        Duration::from_secs(10),
        b.state().wait_for(|s| {
            matches!(
                s,
                State::Follower {
                    leader: Some(_),
                    ..
                }
            )
        }),
    )
    .await
    .unwrap()
    .unwrap();
    let released = Instant::now();
    a.shutdown().await.unwrap();
    // The follower hears of the release from the polled watch, long before
    // its timers (retry 2 s, expiry 10 s) would wake it.
    tokio::time::timeout(
        Duration::from_secs(10),
        b.state().wait_for(State::is_leader),
    )
    .await
    .unwrap()
    .unwrap();
    let took = released.elapsed();
    println!("handoff through the polled watch: {took:?}");
    assert!(took < Duration::from_secs(1), "{took:?}");
    b.shutdown().await.unwrap();
    ta.await.unwrap().unwrap();
    tb.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_in_a_blocking_call_stops_the_campaign_like_a_fatal_error() {
    let store = SyncStore::default();
    let mut client = Client::new(&store);
    client.panic_on_renewal = Some(2);
    let a = Leader::builder("job")
        .backend(Backend::blocking(client))
        .ttl(Duration::from_secs(1))
        .build()
        .unwrap();
    let result = tokio::time::timeout(
        Duration::from_secs(30),
        a.acquire_and_run(|term| async move {
            term.cancelled().await;
            Ok::<_, std::io::Error>(())
        }),
    )
    .await
    .unwrap();
    match result {
        Err(Error::Backend { op, source, .. }) => {
            assert_eq!(op, Op::Renew);
            assert!(
                matches!(&*source, BackendError::Panicked { message, .. } if message.contains("renewal 2")),
                "{source:?}"
            );
        }
        other => panic!("{other:?}"),
    }
    assert!(a.state().borrow().is_stopped());
}
