//! Campaign hardening on the memory store, under paused time: panics are
//! contained, no setting overflows the clock, a late reply never revives a
//! term, stops and followers stay bounded, observers and followers never go
//! back, and a healed link reconnects the watch at once.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use leaseholder::{
    Acquired, Backend, BackendEdge, BackendError, Claim, ConfigError, Error, Faults, Holder, Key,
    Leader, LeaderBuilder, Lease, MemoryBackend, MemoryStore, Observed, Observer, Op, Prepared,
    Renewed, State, Term, WatchStream,
};
use leaseholder_testkit::WorkLog;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::{Instant, timeout};

const TTL: Duration = Duration::from_secs(2);
/// Generous: paused time advances instantly.
const WAIT: Duration = Duration::from_secs(120);

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

async fn wait(state: &mut watch::Receiver<State>, what: impl FnMut(&State) -> bool) -> State {
    timeout(WAIT, state.wait_for(what))
        .await
        .expect("state not reached in time")
        .expect("state channel closed")
        .clone()
}

// ----- a wrapping backend with faults the memory store has not ------------

#[derive(Clone, Copy, PartialEq, Eq)]
enum WatchMode {
    /// The memory store's own watch.
    Normal,
    /// A watch that never yields and never ends, but claims to report
    /// expiry (a stalled server-side watch).
    Stalled,
    /// No watch: followers poll (as on a store without one).
    None,
}

struct Wrap {
    inner: MemoryBackend,
    renewals: AtomicU32,
    /// Panic (while polling) on this renewal, counting from 1.
    panic_on_renewal: Option<u32>,
    /// Panic in the synchronous `watch_reports_expiry`, which the campaign
    /// task calls itself.
    panic_in_sync: bool,
    watch: WatchMode,
}

impl Wrap {
    fn new(inner: MemoryBackend) -> Wrap {
        Wrap {
            inner,
            renewals: AtomicU32::new(0),
            panic_on_renewal: None,
            panic_in_sync: false,
            watch: WatchMode::Normal,
        }
    }
}

impl BackendEdge for Wrap {
    fn name(&self) -> &'static str {
        "wrapped-memory"
    }
    async fn setup(&self, budget: Duration) -> Result<Prepared, BackendError> {
        self.inner.setup(budget).await
    }
    async fn acquire(
        &self,
        key: &Key,
        claim: &Claim,
        ttl: Duration,
        budget: Duration,
    ) -> Result<Acquired, BackendError> {
        self.inner.acquire(key, claim, ttl, budget).await
    }
    async fn renew(
        &self,
        key: &Key,
        lease: &Lease,
        ttl: Duration,
        budget: Duration,
    ) -> Result<Renewed, BackendError> {
        let n = self.renewals.fetch_add(1, Ordering::SeqCst) + 1;
        if self.panic_on_renewal == Some(n) {
            panic!("injected panic in renewal {n}");
        }
        self.inner.renew(key, lease, ttl, budget).await
    }
    async fn release(
        &self,
        key: &Key,
        lease: &Lease,
        budget: Duration,
    ) -> Result<(), BackendError> {
        self.inner.release(key, lease, budget).await
    }
    async fn holder(&self, key: &Key, budget: Duration) -> Result<Option<Holder>, BackendError> {
        self.inner.holder(key, budget).await
    }
    async fn watch(&self) -> Result<Option<WatchStream>, BackendError> {
        match self.watch {
            WatchMode::Normal => self.inner.watch().await,
            WatchMode::Stalled => Ok(Some(Box::pin(futures_util::stream::pending()))),
            WatchMode::None => Ok(None),
        }
    }
    fn watch_reports_expiry(&self) -> bool {
        if self.panic_in_sync {
            panic!("injected panic in watch_reports_expiry");
        }
        self.watch != WatchMode::None
    }
}

fn started(l: &Leader) -> JoinHandle<Result<(), Error>> {
    let l = l.clone();
    tokio::spawn(async move { l.start(Default::default()).await })
}

fn builder(key: &str, backend: Backend) -> LeaderBuilder {
    Leader::builder(key).backend(backend).ttl(TTL)
}

fn candidate(store: &MemoryStore) -> (Leader, Faults) {
    let edge = store.backend();
    let faults = edge.faults();
    (builder("job", Backend::new(edge)).build().unwrap(), faults)
}

/// Runs `acquire_and_run` with work that logs its interval as `who` and
/// returns when its token fires.
fn run_logged(l: &Leader, who: &str, log: &WorkLog) -> JoinHandle<Result<(), Error>> {
    let (l, who, log) = (l.clone(), who.to_owned(), log.clone());
    tokio::spawn(async move {
        l.acquire_and_run(move |term: Term| {
            let (who, log) = (who.clone(), log.clone());
            async move {
                let _working = log.begin(who, term.fencing_token().get());
                term.cancelled().await;
                Ok::<_, std::io::Error>(())
            }
        })
        .await
    })
}

/// Like [`run_logged`], but once its token fires the work takes another
/// ten ttl to return: on a loss of leadership only the campaign dropping it
/// (by half the drift margin after the deadline) ends it in time.
fn run_lingering(l: &Leader, who: &str, log: &WorkLog) -> JoinHandle<Result<(), Error>> {
    let (l, who, log) = (l.clone(), who.to_owned(), log.clone());
    let linger = l.config().ttl() * 10;
    tokio::spawn(async move {
        l.acquire_and_run(move |term: Term| {
            let (who, log) = (who.clone(), log.clone());
            async move {
                let _working = log.begin(who, term.fencing_token().get());
                term.cancelled().await;
                tokio::time::sleep(linger).await;
                Ok::<_, std::io::Error>(())
            }
        })
        .await
    })
}

// ----- 1. panic containment -----------------------------------------------

#[tokio::test(start_paused = true)]
async fn a_backend_that_panics_on_its_third_renewal_stops_like_a_fatal_error() {
    let store = MemoryStore::new();
    let log = WorkLog::new();
    let mut edge = Wrap::new(store.backend());
    edge.panic_on_renewal = Some(3);
    let a = builder("job", Backend::new(edge)).build().unwrap();
    let ta = run_logged(&a, "a", &log);
    wait(&mut a.state(), State::is_leader).await;
    let (b, _) = candidate(&store);
    let tb = run_logged(&b, "b", &log);

    let result = timeout(WAIT, ta).await.unwrap().unwrap();
    match &result {
        Err(Error::Backend { op, source, .. }) => {
            assert_eq!(*op, Op::Renew);
            assert!(
                matches!(&**source, BackendError::Panicked { op: Op::Renew, message } if message.contains("renewal 3")),
                "{source:?}"
            );
        }
        other => panic!("expected a backend error, got {other:?}"),
    }
    assert!(a.state().borrow().is_stopped());
    // Every later call says why, instead of hanging or saying Ok.
    assert!(matches!(a.shutdown().await, Err(Error::Backend { .. })));
    assert!(matches!(a.resign().await, Err(Error::Backend { .. })));
    // The other candidate takes over (the lease was released).
    wait(&mut b.state(), State::is_leader).await;
    b.shutdown().await.unwrap();
    tb.await.unwrap().unwrap();
    log.assert_safe();
    assert_eq!(log.intervals().len(), 2);
}

#[tokio::test(start_paused = true)]
async fn a_panic_in_the_campaign_task_is_contained() {
    let store = MemoryStore::new();
    let mut edge = Wrap::new(store.backend());
    edge.panic_in_sync = true;
    let a = builder("job", Backend::new(edge)).build().unwrap();
    let task = started(&a);
    let result = timeout(WAIT, task).await.unwrap().unwrap();
    assert!(
        matches!(&result, Err(Error::CampaignPanicked { message, .. }) if message.contains("watch_reports_expiry")),
        "{result:?}"
    );
    assert!(a.state().borrow().is_stopped());
    assert!(matches!(
        a.shutdown().await,
        Err(Error::CampaignPanicked { .. })
    ));
}

// ----- 2. time arithmetic -------------------------------------------------

#[test]
fn every_duration_setting_at_duration_max_is_refused_by_name_or_works() {
    let store = MemoryStore::new();
    let b = || builder("job", Backend::memory(&store));
    let max = Duration::MAX;
    let cases: Vec<(&str, LeaderBuilder)> = vec![
        ("ttl", b().ttl(max)),
        ("renew_interval", b().renew_interval(max)),
        ("retry_interval", b().retry_interval(max)),
        ("drift_margin", b().drift_margin(max)),
        ("backoff minimum", b().backoff(max, max)),
        ("backoff maximum", b().backoff(ms(50), max)),
    ];
    for (field, builder) in cases {
        match builder.build() {
            Err(ConfigError::TooLong { field: f, .. }) => assert_eq!(f, field),
            other => panic!("{field} at Duration::MAX: {other:?}"),
        }
    }
    // drain_timeout(Duration::MAX) means "no limit".
    let l = b().drain_timeout(max).build().unwrap();
    assert_eq!(l.config().drain_timeout(), max);
}

#[test]
fn settings_below_the_smallest_accepted_are_refused_by_name() {
    let store = MemoryStore::new();
    let b = || builder("job", Backend::memory(&store));
    let tiny = Duration::from_nanos(1);
    let cases: Vec<(&str, LeaderBuilder)> = vec![
        ("renew_interval", b().renew_interval(tiny)),
        ("retry_interval", b().retry_interval(tiny)),
        ("backoff minimum", b().backoff(tiny, ms(50))),
        ("drain_timeout", b().drain_timeout(tiny)),
    ];
    for (field, builder) in cases {
        match builder.build() {
            Err(ConfigError::TooShort { field: f, .. }) => assert_eq!(f, field),
            other => panic!("{field} at 1 ns: {other:?}"),
        }
    }
}

/// Two candidates, the leader cut off from the store mid-term with work
/// that ignores its token, then healed: the work is dropped before the
/// other candidate leads, tokens rise.
async fn partition_scenario(make: impl Fn(Backend) -> LeaderBuilder) {
    let store = MemoryStore::new();
    let log = WorkLog::new();
    let edge_a = store.backend();
    let faults_a = edge_a.faults();
    let a = make(Backend::new(edge_a)).build().unwrap();
    let b = make(Backend::memory(&store)).build().unwrap();
    let ta = run_lingering(&a, "a", &log);
    wait(&mut a.state(), State::is_leader).await;
    let tb = run_lingering(&b, "b", &log);
    let ttl = a.config().ttl();
    tokio::time::sleep(ttl / 2).await;
    faults_a.partition();
    wait(&mut b.state(), State::is_leader).await;
    faults_a.heal();
    tokio::time::sleep(ttl * 3).await;
    for l in [&a, &b] {
        l.shutdown().await.unwrap();
    }
    ta.await.unwrap().unwrap();
    tb.await.unwrap().unwrap();
    log.assert_safe();
    assert!(log.intervals().len() >= 2, "{:?}", log.intervals());
}

#[tokio::test(start_paused = true)]
async fn drain_timeout_max_under_a_partition_never_overlaps() {
    // The reproduction: the first end of a term used to overflow `Instant`
    // and panic the campaign, leaving the work running beside the next
    // leader.
    partition_scenario(|b| builder("job", b).drain_timeout(Duration::MAX)).await;
}

#[tokio::test(start_paused = true)]
async fn drain_timeout_max_waits_for_the_work_while_renewing() {
    let store = MemoryStore::new();
    let log = WorkLog::new();
    let a = builder("job", Backend::memory(&store))
        .drain_timeout(Duration::MAX)
        .build()
        .unwrap();
    let (b, _) = candidate(&store);
    // Work that needs 5 ttl to wind down once its token fires.
    let (la, lg) = (a.clone(), log.clone());
    let ta = tokio::spawn(async move {
        la.acquire_and_run(move |term: Term| {
            let lg = lg.clone();
            async move {
                let _working = lg.begin("a", term.fencing_token().get());
                term.cancelled().await;
                tokio::time::sleep(TTL * 5).await;
                Ok::<_, std::io::Error>(())
            }
        })
        .await
    });
    wait(&mut a.state(), State::is_leader).await;
    let tb = run_logged(&b, "b", &log);
    let asked = Instant::now();
    a.shutdown().await.unwrap();
    assert!(
        asked.elapsed() >= TTL * 5,
        "shutdown did not wait for the work"
    );
    ta.await.unwrap().unwrap();
    wait(&mut b.state(), State::is_leader).await;
    b.shutdown().await.unwrap();
    tb.await.unwrap().unwrap();
    log.assert_safe();
}

#[tokio::test(start_paused = true)]
async fn the_smallest_accepted_settings_never_overlap_under_a_partition() {
    let store = MemoryStore::new();
    let min = leaseholder::MIN_INTERVAL;
    // The smallest ttl the memory store accepts with default intervals
    // (the retry interval, ttl/5, must be at least 1 ms).
    let smallest_ttl = ms(5);
    assert!(
        builder("job", Backend::memory(&store))
            .ttl(smallest_ttl - Duration::from_micros(1))
            .build()
            .is_err()
    );
    partition_scenario(|b| builder("job", b).ttl(smallest_ttl)).await;
    partition_scenario(|b| builder("job", b).renew_interval(min)).await;
    partition_scenario(|b| builder("job", b).retry_interval(min)).await;
    partition_scenario(|b| builder("job", b).drift_margin(Duration::from_nanos(1))).await;
    partition_scenario(|b| builder("job", b).backoff(min, min)).await;
    partition_scenario(|b| builder("job", b).drain_timeout(min)).await;
}

// ----- 3. no revival after the deadline ------------------------------------

#[tokio::test(start_paused = true)]
async fn work_that_returns_after_its_deadline_is_not_job_done() {
    let store = MemoryStore::new();
    let (a, faults) = candidate(&store);
    let (tx, mut terms) = tokio::sync::mpsc::unbounded_channel();
    let runner = a.clone();
    let task = tokio::spawn(async move {
        runner
            .acquire_and_run(move |term: Term| {
                let tx = tx.clone();
                async move {
                    let _ = tx.send(term.fencing_token());
                    // Block across the deadline (renewals hang meanwhile),
                    // watching validity: once false, never true again.
                    let deadline = term.deadline();
                    tokio::time::sleep_until(deadline).await;
                    let mut seen_invalid = false;
                    for _ in 0..20 {
                        let valid = term.is_valid();
                        assert!(!(seen_invalid && valid), "the term came back to life");
                        seen_invalid |= !valid;
                        tokio::task::yield_now().await;
                    }
                    assert!(seen_invalid);
                    Ok::<_, std::io::Error>(())
                }
            })
            .await
    });
    let first = timeout(WAIT, terms.recv()).await.unwrap().unwrap();
    faults.always(leaseholder::Fault::Hang);
    // The work returns Ok after its deadline: the runner goes on
    // campaigning instead of returning "job done".
    wait(&mut a.state(), |s| !s.is_leader()).await;
    faults.clear();
    let second = timeout(WAIT, terms.recv()).await.unwrap().unwrap();
    assert!(second > first);
    assert!(!task.is_finished());
    a.shutdown().await.unwrap();
    task.await.unwrap().unwrap();
}

// ----- 7 and 12. shutdown stays bounded --------------------------------------

#[tokio::test(start_paused = true)]
async fn shutdown_while_an_acquire_hangs_returns_within_one_call_timeout() {
    let store = MemoryStore::new();
    let (a, faults) = candidate(&store);
    faults.inject_on(Op::Acquire, leaseholder::Fault::Hang, 1);
    let task = started(&a);
    // Let the acquire go out.
    while faults.calls() < 2 {
        tokio::time::sleep(ms(1)).await;
    }
    let asked = Instant::now();
    a.shutdown().await.unwrap();
    let took = asked.elapsed();
    // + 1 ms: tokio's timers round up to the millisecond.
    assert!(
        took <= a.config().renew_interval() + ms(1),
        "shutdown took {took:?}; the bound is one call timeout ({:?})",
        a.config().renew_interval()
    );
    task.await.unwrap().unwrap();
}

#[tokio::test(start_paused = true)]
async fn shutdown_while_a_read_back_hangs_returns_within_one_call_timeout() {
    let store = MemoryStore::new();
    let (a, faults) = candidate(&store);
    // The acquire's reply is lost, and the read-back hangs.
    faults.inject_on(Op::Acquire, leaseholder::Fault::LoseReply, 1);
    faults.inject_on(Op::Holder, leaseholder::Fault::Hang, 1);
    let task = started(&a);
    while faults.calls() < 3 {
        tokio::time::sleep(ms(1)).await;
    }
    let asked = Instant::now();
    a.shutdown().await.unwrap();
    assert!(asked.elapsed() <= a.config().renew_interval() + ms(1));
    task.await.unwrap().unwrap();
}

#[tokio::test(start_paused = true)]
async fn shutdown_with_a_hanging_renewal_returns_within_drain_plus_one_call() {
    let store = MemoryStore::new();
    let (a, faults) = candidate(&store);
    let drain = ms(100);
    let runner = a.clone();
    let task = tokio::spawn(async move {
        runner
            .acquire_and_run(move |term: Term| async move {
                term.cancelled().await;
                tokio::time::sleep(drain).await;
                Ok::<_, std::io::Error>(())
            })
            .await
    });
    wait(&mut a.state(), State::is_leader).await;
    // The store stops answering just before the next renewal.
    faults.always(leaseholder::Fault::Hang);
    tokio::time::sleep(a.config().renew_interval() + ms(10)).await;
    let asked = Instant::now();
    a.shutdown().await.unwrap();
    let took = asked.elapsed();
    // + 1 ms: tokio's timers round up to the millisecond.
    let bound = drain + a.config().renew_interval() + ms(1);
    assert!(took <= bound, "shutdown took {took:?}, bound {bound:?}");
    task.await.unwrap().unwrap();
}

// ----- 8. followers stay bounded --------------------------------------------

#[tokio::test(start_paused = true)]
async fn a_follower_whose_watch_stalls_takes_over_within_ttl_plus_retry() {
    let store = MemoryStore::new();
    let (a, a_faults) = candidate(&store);
    let ta = started(&a);
    wait(&mut a.state(), State::is_leader).await;
    let mut edge = Wrap::new(store.backend());
    edge.watch = WatchMode::Stalled;
    let b = builder("job", Backend::new(edge)).build().unwrap();
    let tb = started(&b);
    wait(&mut b.state(), |s| {
        matches!(
            s,
            State::Follower {
                leader: Some(_),
                ..
            }
        )
    })
    .await;
    tokio::time::sleep(TTL * 3).await;
    // The leader crashes: cut off, its task gone, nothing released.
    a_faults.partition();
    ta.abort();
    let crashed = Instant::now();
    wait(&mut b.state(), State::is_leader).await;
    let took = crashed.elapsed();
    let bound = TTL + b.config().retry_interval();
    assert!(took <= bound, "failover took {took:?}, bound {bound:?}");
    b.shutdown().await.unwrap();
    tb.await.unwrap().unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_release_still_hands_over_within_milliseconds() {
    // Followers spread their acquires over at most 1 ms after a release
    // (the spread itself: `campaign::model` scenario
    // `released_events_wake_followers_at_spread_instants`).
    let store = MemoryStore::new();
    let (a, _) = candidate(&store);
    let ta = started(&a);
    wait(&mut a.state(), State::is_leader).await;
    let followers: Vec<Leader> = (0..4).map(|_| candidate(&store).0).collect();
    let mut tasks = Vec::new();
    for f in &followers {
        tasks.push(started(f));
    }
    for f in &followers {
        wait(&mut f.state(), |s| {
            matches!(
                s,
                State::Follower {
                    leader: Some(_),
                    ..
                }
            )
        })
        .await;
    }
    let released = Instant::now();
    a.resign().await.unwrap();
    let led: Vec<&Leader> = followers.iter().collect();
    let mut states: Vec<_> = led.iter().map(|l| l.state()).collect();
    timeout(WAIT, async {
        loop {
            if states.iter().any(|s| s.borrow().is_leader()) {
                return;
            }
            let changes = states.iter_mut().map(|s| Box::pin(s.changed()));
            let _ = futures_util::future::select_all(changes).await;
        }
    })
    .await
    .unwrap();
    // + 1 ms: tokio's timers round up to the millisecond.
    assert!(released.elapsed() <= ms(2), "{:?}", released.elapsed());
    a.shutdown().await.unwrap();
    for f in &followers {
        f.shutdown().await.unwrap();
    }
    ta.await.unwrap().unwrap();
    for t in tasks {
        t.await.unwrap().unwrap();
    }
}

// ----- 9. smaller ones --------------------------------------------------------

#[tokio::test]
async fn current_leader_on_a_handle_with_an_invalid_key_is_a_config_error() {
    let store = MemoryStore::new();
    let l = Leader::new("", Backend::memory(&store));
    assert!(matches!(l.current_leader().await, Err(Error::Config(_))));
}

#[test]
fn the_watch_hub_starts_again_on_a_new_runtime() {
    let store = MemoryStore::new();
    let backend = Backend::memory(&store);
    let rt = || {
        tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
            .unwrap()
    };
    // A first runtime subscribes (starting the watch), then goes away.
    rt().block_on(async {
        let l = builder("job", backend.clone()).build().unwrap();
        let task = started(&l);
        wait(&mut l.state(), State::is_leader).await;
        l.shutdown().await.unwrap();
        task.await.unwrap().unwrap();
    });
    // On a second runtime a follower on the same backend still hears of a
    // release at once (by the watch, not a ttl later by its timers).
    rt().block_on(async {
        let (a, _) = candidate(&store);
        let ta = started(&a);
        wait(&mut a.state(), State::is_leader).await;
        let b = builder("job", backend.clone()).build().unwrap();
        let tb = started(&b);
        wait(&mut b.state(), |s| {
            matches!(
                s,
                State::Follower {
                    leader: Some(_),
                    ..
                }
            )
        })
        .await;
        let released = Instant::now();
        a.shutdown().await.unwrap();
        wait(&mut b.state(), State::is_leader).await;
        assert!(released.elapsed() < ms(100), "{:?}", released.elapsed());
        b.shutdown().await.unwrap();
        ta.await.unwrap().unwrap();
        tb.await.unwrap().unwrap();
    });
}

// ----- 10. never back, never twice --------------------------------------------

#[tokio::test(start_paused = true)]
async fn an_observer_with_slow_reads_never_reports_an_ended_term_again() {
    let store = MemoryStore::new();
    let observer_edge = store.backend();
    let observer_faults = observer_edge.faults();
    // Every read of the observer lands 250 ms after it is sent, while the
    // watch events keep coming promptly.
    observer_faults.always(leaseholder::Fault::Delay(ms(250)));
    let observer = Observer::new("job", Backend::new(observer_edge), ms(400)).unwrap();
    let mut seen = observer.watch();
    let recorder = tokio::spawn(async move {
        let mut tokens = Vec::new();
        while seen.changed().await.is_ok() {
            if let Observed::Held(h) = &*seen.borrow_and_update() {
                tokens.push(h.token().unwrap().get());
            }
        }
        tokens
    });
    // Leaders that renew every 50 ms, so that renewals of the old term are
    // queued while a read is in flight.
    let cands: Vec<Leader> = (0..3)
        .map(|_| {
            builder("job", Backend::memory(&store))
                .renew_interval(ms(50))
                .build()
                .unwrap()
        })
        .collect();
    let mut tasks = Vec::new();
    for c in &cands {
        tasks.push(started(c));
    }
    for _ in 0..6 {
        let leader = loop {
            if let Some(c) = cands.iter().find(|c| c.state().borrow().is_leader()) {
                break c.clone();
            }
            tokio::time::sleep(ms(1)).await;
        };
        // Hand over while one of the observer's reads is in flight, after
        // a few renewals: the read lands after the handoff, the renewals'
        // events are queued behind it.
        let calls = observer_faults.calls();
        while observer_faults.calls() == calls {
            tokio::time::sleep(ms(1)).await;
        }
        tokio::time::sleep(ms(120)).await;
        leader.resign().await.unwrap();
        tokio::time::sleep(ms(400)).await;
    }
    for c in &cands {
        c.shutdown().await.unwrap();
    }
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    drop(observer);
    let tokens = recorder.await.unwrap();
    assert!(tokens.len() >= 4, "{tokens:?}");
    assert!(
        tokens.windows(2).all(|w| w[0] < w[1]),
        "an observed term came back, or was reported twice: {tokens:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_polling_follower_publishes_each_leader_once() {
    let store = MemoryStore::new();
    let (a, _) = candidate(&store);
    let ta = started(&a);
    wait(&mut a.state(), State::is_leader).await;
    let mut edge = Wrap::new(store.backend());
    edge.watch = WatchMode::None;
    let b = builder("job", Backend::new(edge)).build().unwrap();
    let mut states = b.state();
    let counter = tokio::spawn(async move {
        let mut followers = 0;
        while states.changed().await.is_ok() {
            if matches!(
                &*states.borrow_and_update(),
                State::Follower {
                    leader: Some(_),
                    ..
                }
            ) {
                followers += 1;
            }
        }
        followers
    });
    let tb = started(&b);
    // Several polls (retry ttl/5, expiry hints) with one steady leader.
    tokio::time::sleep(TTL * 5).await;
    b.shutdown().await.unwrap();
    a.shutdown().await.unwrap();
    tb.await.unwrap().unwrap();
    ta.await.unwrap().unwrap();
    drop(b);
    let followers = timeout(WAIT, counter).await.unwrap().unwrap();
    assert_eq!(
        followers, 1,
        "the same leader was published {followers} times"
    );
}

// ----- 11. handoff right after a healed link -------------------------------

#[tokio::test(start_paused = true)]
async fn a_healed_link_reconnects_the_watch_at_once() {
    let store = MemoryStore::new();
    let ttl = Duration::from_secs(10);
    let a = builder("job", Backend::memory(&store))
        .ttl(ttl)
        .build()
        .unwrap();
    let edge_b = store.backend();
    let faults_b = edge_b.faults();
    let b = builder("job", Backend::new(edge_b))
        .ttl(ttl)
        .build()
        .unwrap();
    let ta = started(&a);
    wait(&mut a.state(), State::is_leader).await;
    let tb = started(&b);
    wait(&mut b.state(), |s| {
        matches!(
            s,
            State::Follower {
                leader: Some(_),
                ..
            }
        )
    })
    .await;
    // B's link is down long enough for the watch's backoff to reach its
    // cap (5 s), then comes back; B's next store call succeeds.
    faults_b.partition();
    tokio::time::sleep(Duration::from_secs(12)).await;
    faults_b.heal();
    let calls = faults_b.calls();
    while faults_b.calls() == calls {
        tokio::time::sleep(ms(10)).await;
    }
    wait(&mut b.state(), |s| {
        matches!(
            s,
            State::Follower {
                leader: Some(_),
                ..
            }
        )
    })
    .await;
    tokio::time::sleep(ms(200)).await;
    // The leader steps down: B hears of it by the watch at once.
    let released = Instant::now();
    a.resign().await.unwrap();
    wait(&mut b.state(), State::is_leader).await;
    let took = released.elapsed();
    assert!(took < ms(100), "B took over {took:?} after the release");
    a.shutdown().await.unwrap();
    b.shutdown().await.unwrap();
    ta.await.unwrap().unwrap();
    tb.await.unwrap().unwrap();
}
