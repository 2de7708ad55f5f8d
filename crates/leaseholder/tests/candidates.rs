//! The candidate registry, priority, preemption and `resign_to` on the
//! memory backend under paused time: who goes first, who preempts whom and
//! when, what a dead preferred candidate costs, and that none of it lets two
//! candidates' work overlap or a token go down ([`WorkLog`]).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use leaseholder::{
    Acquired, Backend, BackendEdge, BackendError, Candidate, Claim, ConfigError, Error, Holder,
    Key, Leader, LeaderId, Lease, MemoryStore, Observer, Prepared, Renewed, State, Waiting,
};
use leaseholder_testkit::WorkLog;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::{Instant, sleep, timeout};

const TTL: Duration = Duration::from_secs(3);
/// ttl/3, the default.
const RENEW: Duration = Duration::from_secs(1);
/// ttl/10, the default.
const HOLDOFF: Duration = Duration::from_millis(300);
/// Generous bound for waiting on a state; paused time makes it free.
const WAIT: Duration = Duration::from_secs(120);

fn key() -> Key {
    Key::new("job").unwrap()
}

fn build(store: &MemoryStore, priority: i32) -> Leader {
    Leader::builder("job")
        .backend(Backend::memory(store))
        .ttl(TTL)
        .priority(priority)
        .build()
        .unwrap()
}

/// Runs `acquire_and_run` on `l`, recording each term's work in `log` as
/// `who`; the work runs until its token fires.
fn run(l: &Leader, who: &str, log: &WorkLog) -> JoinHandle<Result<(), Error>> {
    let (l, who, log) = (l.clone(), who.to_owned(), log.clone());
    tokio::spawn(async move {
        l.acquire_and_run(move |term| {
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

async fn wait(state: &mut watch::Receiver<State>, what: impl FnMut(&State) -> bool) -> State {
    timeout(WAIT, state.wait_for(what))
        .await
        .expect("state not reached in time")
        .expect("state channel closed")
        .clone()
}

async fn leads(l: &Leader) -> State {
    wait(&mut l.state(), State::is_leader).await
}

/// Waits until `l` follows a leader it has seen.
async fn held(l: &Leader) {
    wait(&mut l.state(), |s| {
        matches!(
            s,
            State::Follower {
                waiting: Waiting::Held,
                ..
            }
        )
    })
    .await;
}

/// Waits until the registry of the store shows `leader`'s entry naming
/// `who` to go next (and, if given, `entries` entries in all).
async fn names(store: &MemoryStore, leader: LeaderId, who: LeaderId, entries: Option<usize>) {
    let observer = Observer::new("job", Backend::memory(store), Duration::from_secs(10)).unwrap();
    let mut seen = observer.watch_candidates();
    timeout(
        WAIT,
        seen.wait_for(|list| {
            list.as_ref().is_some_and(|list| {
                entries.is_none_or(|n| list.len() == n)
                    && list.iter().any(|c| {
                        c.id() == leader && c.nominee().is_some_and(|(next, _)| next == who)
                    })
            })
        }),
    )
    .await
    .expect("the leader did not name its successor")
    .unwrap();
}

async fn stop(l: &Leader, task: JoinHandle<Result<(), Error>>) {
    timeout(WAIT, l.shutdown()).await.unwrap().unwrap();
    timeout(WAIT, task).await.unwrap().unwrap().unwrap();
}

/// The candidates a registry read shows, as (priority, id).
async fn live(l: &Leader) -> Vec<(i32, LeaderId)> {
    l.candidates()
        .await
        .unwrap()
        .iter()
        .map(|c| (c.priority(), c.id()))
        .collect()
}

/// Priorities 1, 5 and 10, started in every order, end with 10 leading
/// (a lower one that got there first is preempted after its minimum term);
/// when 10 shuts down, 5 takes over at once and 1 never leads after it.
#[tokio::test(start_paused = true)]
async fn priorities_1_5_and_10_in_any_order_end_with_10_leading_then_5() {
    let orders: [[i32; 3]; 6] = [
        [1, 5, 10],
        [1, 10, 5],
        [5, 1, 10],
        [5, 10, 1],
        [10, 1, 5],
        [10, 5, 1],
    ];
    for order in orders {
        let store = MemoryStore::new();
        let log = WorkLog::new();
        let mut running = Vec::new();
        for p in order {
            let l = build(&store, p);
            let task = run(&l, &format!("p{p}"), &log);
            running.push((p, l, task));
            sleep(Duration::from_millis(50)).await;
        }
        let by = |p: i32| running.iter().position(|(q, _, _)| *q == p).unwrap();
        let (ten, five, one) = (by(10), by(5), by(1));
        leads(&running[ten].1).await;
        // It stays: nobody preempts the highest priority.
        let token = running[ten].1.fencing_token().unwrap();
        sleep(3 * TTL).await;
        assert_eq!(
            running[ten].1.fencing_token(),
            Some(token),
            "order {order:?}"
        );
        // 10 shuts down: 5 goes first, 1 holds off.
        let (_, l10, t10) = running.remove(ten);
        let mut s1 = running[if one > ten { one - 1 } else { one }].1.state();
        let shut = Instant::now();
        stop(&l10, t10).await;
        let five_at = if five > ten { five - 1 } else { five };
        leads(&running[five_at].1).await;
        assert!(
            shut.elapsed() < HOLDOFF,
            "order {order:?}: 5 took {:?}",
            shut.elapsed()
        );
        assert!(!s1.borrow_and_update().is_leader());
        for (_, l, task) in running {
            stop(&l, task).await;
        }
        log.assert_safe();
    }
}

/// A candidate of priority 20 that starts beside a leader of priority 10
/// (whose term has passed its minimum) takes over within one renew
/// interval plus the drain, with a larger token and no overlap.
#[tokio::test(start_paused = true)]
async fn a_new_candidate_of_higher_priority_preempts_within_one_renew_interval() {
    let store = MemoryStore::new();
    let log = WorkLog::new();
    let ten = build(&store, 10);
    let t10 = run(&ten, "p10", &log);
    let first = leads(&ten).await.token().unwrap();
    sleep(TTL + Duration::from_millis(10)).await;
    let twenty = build(&store, 20);
    let started = Instant::now();
    let t20 = run(&twenty, "p20", &log);
    let second = leads(&twenty).await.token().unwrap();
    let took = started.elapsed();
    assert!(second > first);
    // The leader reads the registry at its next renew interval (the
    // memory store's watch also says so at once) and the work drains
    // promptly.
    assert!(took <= RENEW, "preemption took {took:?}");
    // The preempted leader keeps campaigning, as a follower.
    let s10 = ten.state().borrow().clone();
    assert!(matches!(s10, State::Follower { .. }), "{s10:?}");
    stop(&twenty, t20).await;
    stop(&ten, t10).await;
    log.assert_safe();
    let who: Vec<_> = log.intervals().into_iter().map(|i| i.who).collect();
    assert_eq!(who[..2], ["p10", "p20"]);
}

/// A preferred candidate that appears right after a term began waits for
/// the minimum term (default: one ttl) before it takes over.
#[tokio::test(start_paused = true)]
async fn a_leader_is_not_preempted_before_its_minimum_term() {
    let store = MemoryStore::new();
    let log = WorkLog::new();
    let low = build(&store, 1);
    let t1 = run(&low, "p1", &log);
    leads(&low).await;
    let began = Instant::now();
    let high = build(&store, 2);
    let t2 = run(&high, "p2", &log);
    leads(&high).await;
    let after = began.elapsed();
    assert!(after >= TTL, "preempted after {after:?}");
    assert!(after <= TTL + RENEW, "preempted only after {after:?}");
    stop(&high, t2).await;
    stop(&low, t1).await;
    log.assert_safe();
}

/// Equal priorities never preempt, and `.preemptible(false)` keeps a
/// leader in place whatever comes.
#[tokio::test(start_paused = true)]
async fn equal_priorities_and_a_non_preemptible_leader_are_never_preempted() {
    let store = MemoryStore::new();
    let log = WorkLog::new();
    let a = build(&store, 5);
    let ta = run(&a, "a", &log);
    leads(&a).await;
    let b = build(&store, 5);
    let tb = run(&b, "b", &log);
    sleep(5 * TTL).await;
    assert!(a.state().borrow().is_leader());
    stop(&b, tb).await;
    stop(&a, ta).await;

    let fixed = Leader::builder("job")
        .backend(Backend::memory(&store))
        .ttl(TTL)
        .priority(0)
        .preemptible(false)
        .build()
        .unwrap();
    let tf = run(&fixed, "fixed", &log);
    leads(&fixed).await;
    let high = build(&store, 100);
    let th = run(&high, "high", &log);
    sleep(5 * TTL).await;
    assert!(fixed.state().borrow().is_leader());
    stop(&high, th).await;
    stop(&fixed, tf).await;
    log.assert_safe();
    assert_eq!(log.intervals().len(), 2, "no leadership moved");
}

/// A preferred candidate that died (its entry still live, as after a
/// SIGKILL) costs the others the hold-off once, never a ttl; meanwhile
/// they say whom they hold off for.
#[tokio::test(start_paused = true)]
async fn a_dead_preferred_candidate_costs_at_most_the_holdoff() {
    let store = MemoryStore::new();
    let log = WorkLog::new();
    let a = build(&store, 1);
    let ta = run(&a, "a", &log);
    leads(&a).await;
    let b = build(&store, 1);
    let tb = run(&b, "b", &log);
    // b starts by holding off for a (equal priority, longer waiting),
    // then finds it leading.
    let mut sb = b.state();
    wait(&mut sb, |s| {
        matches!(
            s,
            State::Follower {
                waiting: Waiting::Held,
                ..
            }
        )
    })
    .await;
    let dead = LeaderId::new();
    store.put_raw_candidate(
        &key(),
        dead,
        Candidate::new(dead, 100, "dead").encode(),
        Duration::from_secs(60),
    );
    // a, reading the registry on its change, names the new best candidate
    // its successor; b reads that name when a lets go.
    names(&store, a.leader_id(), dead, None).await;
    let released = Instant::now();
    a.resign().await.unwrap();
    let held = wait(&mut sb, |s| {
        matches!(
            s,
            State::Follower {
                waiting: Waiting::HoldingOff { .. },
                ..
            }
        )
    })
    .await;
    assert!(
        matches!(held, State::Follower { waiting: Waiting::HoldingOff { preferred }, .. } if preferred == dead)
    );
    leads(&b).await;
    let took = released.elapsed();
    assert!(took >= HOLDOFF, "b did not hold off: {took:?}");
    assert!(
        took <= HOLDOFF + Duration::from_millis(10),
        "b took {took:?}"
    );
    stop(&a, ta).await;
    stop(&b, tb).await;
    log.assert_safe();
}

/// `resign_to` hands the key to the named candidate while the others hold
/// off; an unknown candidate is refused and the leader keeps leading.
#[tokio::test(start_paused = true)]
async fn resign_to_hands_over_to_the_named_candidate() {
    let store = MemoryStore::new();
    let log = WorkLog::new();
    let a = build(&store, 0);
    let ta = run(&a, "a", &log);
    leads(&a).await;
    // b has the higher priority, but a names c.
    let b = build(&store, 0);
    let tb = run(&b, "b", &log);
    sleep(Duration::from_millis(10)).await;
    let c = build(&store, 0);
    let tc = run(&c, "c", &log);
    sleep(Duration::from_millis(10)).await;
    assert_eq!(live(&a).await.len(), 3);

    let stranger = LeaderId::new();
    let err = a.resign_to(stranger).await.unwrap_err();
    assert!(
        matches!(err, Error::NotACandidate { candidate, .. } if candidate == stranger),
        "{err:?}"
    );
    let err = a.resign_to(a.leader_id()).await.unwrap_err();
    assert!(matches!(err, Error::NotACandidate { .. }), "{err:?}");
    assert!(a.state().borrow().is_leader());

    let first = a.fencing_token().unwrap();
    let mut sb = b.state();
    a.resign_to(c.leader_id()).await.unwrap();
    let next = leads(&c).await.token().unwrap();
    assert!(next > first);
    // b, the longest-waiting, would have gone first; it held off for c.
    let seen = wait(&mut sb, |s| {
        matches!(s, State::Follower { waiting: Waiting::Held, leader: Some(h), .. } if h.token() == Some(next))
    })
    .await;
    assert!(matches!(seen, State::Follower { .. }));
    // Not leading: nothing to hand over.
    a.resign_to(b.leader_id()).await.unwrap();
    assert!(c.state().borrow().is_leader());
    for (l, t) in [(a, ta), (b, tb), (c, tc)] {
        stop(&l, t).await;
    }
    log.assert_safe();
    assert_eq!(log.intervals().len(), 2, "a, then c: {:?}", log.intervals());
}

/// A high-priority candidate that comes for 100 ms and goes for 100 ms,
/// again and again, preempts the steady leader at most once per minimum
/// term: every term of the steady leader but the last lasts at least the
/// minimum term (a flapper's own term ends when it goes), and no work
/// overlaps.
#[tokio::test(start_paused = true)]
async fn a_flapping_preferred_candidate_moves_leadership_at_most_once_per_min_term() {
    let store = MemoryStore::new();
    let log = WorkLog::new();
    let steady = build(&store, 5);
    let ts = run(&steady, "steady", &log);
    leads(&steady).await;
    let began = Instant::now();
    let window = Duration::from_secs(30);
    let mut n = 0;
    while began.elapsed() < window {
        let flap = build(&store, 10);
        let tf = run(&flap, &format!("flap{n}"), &log);
        sleep(Duration::from_millis(100)).await;
        stop(&flap, tf).await;
        sleep(Duration::from_millis(100)).await;
        n += 1;
    }
    stop(&steady, ts).await;
    log.assert_safe();
    let intervals = log.intervals();
    let steady_terms: Vec<_> = intervals.iter().filter(|i| i.who == "steady").collect();
    for t in &steady_terms[..steady_terms.len() - 1] {
        let lasted = t.end.unwrap() - t.start;
        assert!(lasted >= TTL, "a steady term lasted only {lasted:?}");
    }
    // So at most one preemption per minimum term. (Between them, a
    // flapper that leaves hands a free key to the next one that comes
    // while the steady leader waits out its quiet period after stepping
    // down: that is a free key going to the preferred candidate, not a
    // preemption.)
    let most = (window.as_millis() / TTL.as_millis()) as usize + 1;
    assert!(
        (3..=most).contains(&steady_terms.len()),
        "{} steady terms in {window:?} (at most {most}, and preempted at all)",
        steady_terms.len()
    );
    assert!(n > 100, "the candidate flapped {n} times");
}

/// The registry lists live candidates in the order in which they go
/// first; a shut-down candidate leaves at once, a dead one when its entry
/// expires (one ttl after its last write); an observer's watch follows.
#[tokio::test(start_paused = true)]
async fn the_registry_lists_live_candidates_and_forgets_dead_ones() {
    let store = MemoryStore::new();
    let observer = Observer::new("job", Backend::memory(&store), Duration::from_secs(10)).unwrap();
    let mut seen = observer.watch_candidates();
    let a_edge = store.backend();
    let a_faults = a_edge.faults();
    let a = Leader::builder("job")
        .backend(Backend::new(a_edge))
        .ttl(TTL)
        .priority(3)
        .metadata("a")
        .build()
        .unwrap();
    let ta = tokio::spawn({
        let a = a.clone();
        async move { a.start(Default::default()).await }
    });
    let b = build(&store, 7);
    let tb = tokio::spawn({
        let b = b.clone();
        async move { b.start(Default::default()).await }
    });
    let both = timeout(
        WAIT,
        seen.wait_for(|c| c.as_ref().is_some_and(|c| c.len() == 2)),
    )
    .await
    .unwrap()
    .unwrap()
    .clone()
    .unwrap();
    assert_eq!(
        both.iter().map(Candidate::priority).collect::<Vec<_>>(),
        [7, 3]
    );
    assert_eq!(both[1].metadata().as_ref(), b"a");
    assert_eq!(
        live(&a).await,
        [(7, b.leader_id()), (3, a.leader_id())],
        "Leader::candidates agrees"
    );
    assert_eq!(observer.candidates().await.unwrap(), both);

    // b shuts down: its entry goes at once.
    b.shutdown().await.unwrap();
    tb.await.unwrap().unwrap();
    let gone = Instant::now();
    timeout(
        WAIT,
        seen.wait_for(|c| c.as_ref().is_some_and(|c| c.len() == 1)),
    )
    .await
    .unwrap()
    .unwrap();
    assert!(gone.elapsed() < Duration::from_millis(10));

    // a is cut off (as if killed): its entry expires within a ttl.
    a_faults.partition();
    let cut = Instant::now();
    timeout(
        WAIT,
        seen.wait_for(|c| c.as_ref().is_some_and(|c| c.is_empty())),
    )
    .await
    .unwrap()
    .unwrap();
    assert!(cut.elapsed() <= TTL, "expired after {:?}", cut.elapsed());
    a_faults.heal();
    a.shutdown().await.unwrap();
    ta.await.unwrap().unwrap();
}

/// A store without a registry.
struct NoRegistry;

impl BackendEdge for NoRegistry {
    fn name(&self) -> &'static str {
        "no-registry"
    }
    async fn setup(&self, _: Duration) -> Result<Prepared, BackendError> {
        Ok(Prepared::Existing)
    }
    async fn acquire(
        &self,
        _: &Key,
        _: &Claim,
        _: Duration,
        _: Duration,
    ) -> Result<Acquired, BackendError> {
        Err(BackendError::unavailable("unused"))
    }
    async fn renew(
        &self,
        _: &Key,
        _: &Lease,
        _: Duration,
        _: Duration,
    ) -> Result<Renewed, BackendError> {
        Err(BackendError::unavailable("unused"))
    }
    async fn release(&self, _: &Key, _: &Lease, _: Duration) -> Result<(), BackendError> {
        Ok(())
    }
    async fn holder(&self, _: &Key, _: Duration) -> Result<Option<Holder>, BackendError> {
        Ok(None)
    }
}

/// Registry settings are checked at `build()`: a backend without a
/// registry, a setting that needs it with `.registry(false)`, a hold-off
/// out of range; without them a leader keeps no entry.
#[tokio::test(start_paused = true)]
async fn registry_settings_are_checked_at_build_time() {
    let none = || Leader::builder("job").backend(Backend::new(NoRegistry));
    assert!(matches!(
        none().priority(1).build().unwrap_err(),
        ConfigError::NoRegistry {
            backend: "no-registry"
        }
    ));
    assert!(matches!(
        none().registry(true).build().unwrap_err(),
        ConfigError::NoRegistry { .. }
    ));
    assert!(!none().build().unwrap().config().registry());
    let store = MemoryStore::new();
    let mem = || {
        Leader::builder("job")
            .backend(Backend::memory(&store))
            .ttl(TTL)
    };
    assert!(matches!(
        mem().registry(false).priority(3).build().unwrap_err(),
        ConfigError::NeedsRegistry {
            setting: "priority"
        }
    ));
    assert!(matches!(
        mem().holdoff(TTL).build().unwrap_err(),
        ConfigError::TooLong {
            field: "holdoff",
            ..
        }
    ));
    assert!(matches!(
        mem()
            .holdoff(Duration::from_micros(10))
            .build()
            .unwrap_err(),
        ConfigError::TooShort {
            field: "holdoff",
            ..
        }
    ));
    let cfg = mem().min_term(Duration::from_secs(30)).build().unwrap();
    assert!(cfg.config().registry());
    assert_eq!(cfg.config().min_term(), Duration::from_secs(30));
    assert_eq!(cfg.config().holdoff(), HOLDOFF);
    assert!(cfg.config().preemptible());

    // Without the registry: no entry, and resign_to is refused.
    let plain = mem().build().unwrap();
    let tp = tokio::spawn({
        let p = plain.clone();
        async move { p.start(Default::default()).await }
    });
    leads(&plain).await;
    assert!(plain.candidates().await.unwrap().is_empty());
    assert!(matches!(
        plain.resign_to(LeaderId::new()).await.unwrap_err(),
        Error::Config(ConfigError::NeedsRegistry {
            setting: "resign_to"
        })
    ));
    plain.shutdown().await.unwrap();
    tp.await.unwrap().unwrap();
}

/// `proclaim` replaces the leader's metadata within its term: one write,
/// the same token, seen by followers and `current_leader`, kept for later
/// terms; refused when not leading, too large, or on a backend without it;
/// `Error::Lost` if the term ends before the store confirms it.
#[tokio::test(start_paused = true)]
async fn proclaim_updates_the_metadata_within_the_term() {
    let store = MemoryStore::new();
    let edge = store.backend();
    let faults = edge.faults();
    let a = Leader::builder("job")
        .backend(Backend::new(edge))
        .ttl(TTL)
        .metadata("v1")
        .build()
        .unwrap();
    let ta = tokio::spawn({
        let a = a.clone();
        async move { a.start(Default::default()).await }
    });
    let token = leads(&a).await.token().unwrap();
    let b = build(&store, 0);
    let tb = tokio::spawn({
        let b = b.clone();
        async move { b.start(Default::default()).await }
    });
    let mut sb = b.state();
    wait(
        &mut sb,
        |s| matches!(s, State::Follower { leader: Some(h), .. } if h.metadata().as_ref() == b"v1"),
    )
    .await;

    a.proclaim("v2").await.unwrap();
    assert_eq!(a.fencing_token(), Some(token), "no new election");
    let now = a.current_leader().await.unwrap().unwrap();
    assert_eq!(now.metadata().as_ref(), b"v2");
    assert_eq!(now.token(), Some(token));
    // The follower's state follows (the memory watch carries holders).
    wait(&mut sb, |s| matches!(s, State::Follower { leader: Some(h), .. } if h.metadata().as_ref() == b"v2" && h.token() == Some(token))).await;
    let seen = b.current_leader().await.unwrap().unwrap();
    assert_eq!(seen.metadata().as_ref(), b"v2");

    assert!(matches!(
        b.proclaim("x").await.unwrap_err(),
        Error::NotLeading { .. }
    ));
    assert!(matches!(
        a.proclaim(vec![0u8; 513]).await.unwrap_err(),
        Error::Config(ConfigError::MetadataTooLarge { len: 513, .. })
    ));

    // A later term carries the proclaimed metadata.
    a.resign().await.unwrap();
    leads(&b).await;
    b.shutdown().await.unwrap();
    tb.await.unwrap().unwrap();
    leads(&a).await;
    assert_eq!(
        a.current_leader()
            .await
            .unwrap()
            .unwrap()
            .metadata()
            .as_ref(),
        b"v2"
    );

    // Cut off: the proclaim cannot be confirmed, and the term ends.
    let token = a.fencing_token().unwrap();
    faults.partition();
    let err = a.proclaim("v3").await.unwrap_err();
    assert!(
        matches!(err, Error::Lost { token: t, .. } if t == token),
        "{err:?}"
    );
    faults.heal();
    a.shutdown().await.unwrap();
    ta.await.unwrap().unwrap();

    // A backend without it: refused without a store call.
    let none = Leader::builder("job")
        .backend(Backend::new(NoRegistry))
        .build()
        .unwrap();
    let err = none.proclaim("x").await.unwrap_err();
    assert!(
        matches!(&err, Error::Backend { op: leaseholder::Op::Proclaim, source, .. } if matches!(**source, BackendError::Unsupported { .. })),
        "{err:?}"
    );
}

/// The memory backend, counting the registry reads and the writes of every
/// candidate that shares it.
#[derive(Clone)]
struct Counted {
    inner: leaseholder::MemoryBackend,
    counts: std::sync::Arc<Counts>,
}

#[derive(Default)]
struct Counts {
    lists: std::sync::atomic::AtomicU64,
    entries: std::sync::atomic::AtomicU64,
    lease_writes: std::sync::atomic::AtomicU64,
}

impl Counts {
    fn get(&self) -> (u64, u64, u64) {
        use std::sync::atomic::Ordering::Relaxed;
        (
            self.lists.load(Relaxed),
            self.entries.load(Relaxed),
            self.lease_writes.load(Relaxed),
        )
    }
}

fn bump(n: &std::sync::atomic::AtomicU64) {
    n.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
}

impl BackendEdge for Counted {
    fn name(&self) -> &'static str {
        "counted-memory"
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
        bump(&self.counts.lease_writes);
        self.inner.acquire(key, claim, ttl, budget).await
    }
    async fn renew(
        &self,
        key: &Key,
        lease: &Lease,
        ttl: Duration,
        budget: Duration,
    ) -> Result<Renewed, BackendError> {
        self.inner.renew(key, lease, ttl, budget).await
    }
    async fn release(
        &self,
        key: &Key,
        lease: &Lease,
        budget: Duration,
    ) -> Result<(), BackendError> {
        bump(&self.counts.lease_writes);
        self.inner.release(key, lease, budget).await
    }
    async fn holder(&self, key: &Key, budget: Duration) -> Result<Option<Holder>, BackendError> {
        self.inner.holder(key, budget).await
    }
    async fn watch(&self) -> Result<Option<leaseholder::WatchStream>, BackendError> {
        self.inner.watch().await
    }
    fn watch_reports_expiry(&self) -> bool {
        self.inner.watch_reports_expiry()
    }
    fn supports_candidates(&self) -> bool {
        true
    }
    async fn register(
        &self,
        key: &Key,
        candidate: &Candidate,
        ttl: Duration,
        budget: Duration,
    ) -> Result<(), BackendError> {
        self.inner.register(key, candidate, ttl, budget).await
    }
    async fn deregister(
        &self,
        key: &Key,
        id: LeaderId,
        budget: Duration,
    ) -> Result<(), BackendError> {
        self.inner.deregister(key, id, budget).await
    }
    async fn candidates(
        &self,
        key: &Key,
        budget: Duration,
    ) -> Result<Vec<Candidate>, BackendError> {
        bump(&self.counts.lists);
        self.inner.candidates(key, budget).await
    }
    async fn candidate(
        &self,
        key: &Key,
        id: LeaderId,
        budget: Duration,
    ) -> Result<Option<Candidate>, BackendError> {
        bump(&self.counts.entries);
        self.inner.candidate(key, id, budget).await
    }
}

/// A leader names its successor in its registry entry, so a graceful
/// handoff among many followers costs each follower one read of one entry
/// (never the whole list), and the store two lease writes: the release and
/// the successor's acquire. The others hold off for the named successor.
#[tokio::test(start_paused = true)]
async fn a_handoff_among_many_followers_reads_one_entry_each() {
    const FOLLOWERS: usize = 40;
    let store = MemoryStore::new();
    let counted = Counted {
        inner: store.backend(),
        counts: Default::default(),
    };
    let backend = Backend::new(counted.clone());
    let log = WorkLog::new();
    let make = |priority| {
        Leader::builder("job")
            .backend(backend.clone())
            .ttl(TTL)
            .priority(priority)
            .build()
            .unwrap()
    };
    let a = make(1);
    let ta = run(&a, "a", &log);
    leads(&a).await;
    let mut followers = Vec::new();
    for i in 0..FOLLOWERS {
        // One follower of priority 2 is the successor; the leader is not
        // preempted by it before its minimum term.
        let f = make(if i == FOLLOWERS / 2 { 2 } else { 1 });
        let t = run(&f, &format!("f{i}"), &log);
        followers.push((f, t));
    }
    let successor = followers[FOLLOWERS / 2].0.leader_id();
    names(&store, a.leader_id(), successor, Some(FOLLOWERS + 1)).await;
    for (f, _) in &followers {
        held(f).await;
    }
    let (lists, entries, writes) = counted.counts.get();
    a.resign().await.unwrap();
    leads(&followers[FOLLOWERS / 2].0).await;
    // Every hold-off has passed, and nobody else tried.
    sleep(HOLDOFF * 2).await;
    let (lists2, entries2, writes2) = counted.counts.get();
    assert_eq!(
        writes2 - writes,
        2,
        "lease writes: the release and one acquire"
    );
    assert!(
        entries2 - entries >= FOLLOWERS as u64,
        "each follower (and a) reads a's entry: {}",
        entries2 - entries
    );
    // The new leader reads the whole list to name its own successor; no
    // follower does.
    assert!(
        lists2 - lists <= 3,
        "{} whole-registry reads during the handoff",
        lists2 - lists
    );
    for (f, t) in followers {
        stop(&f, t).await;
    }
    stop(&a, ta).await;
    log.assert_safe();
}

/// A follower whose registry read fails at once tries only when the
/// hold-off since the read has passed: a store that answers some
/// followers' reads and fails others' costs a hold-off, not an acquire per
/// failed read racing the preferred candidate.
#[tokio::test(start_paused = true)]
async fn a_failed_registry_read_costs_the_holdoff_not_a_race() {
    let store = MemoryStore::new();
    let log = WorkLog::new();
    let a = build(&store, 1);
    let ta = run(&a, "a", &log);
    leads(&a).await;
    let b_edge = store.backend();
    let b_faults = b_edge.faults();
    let b = Leader::builder("job")
        .backend(Backend::new(b_edge))
        .ttl(TTL)
        .priority(1)
        .build()
        .unwrap();
    let tb = run(&b, "b", &log);
    held(&b).await;
    // b's next registry read (of a's entry, when a lets go) fails.
    b_faults.inject_on(leaseholder::Op::Candidates, leaseholder::Fault::Fail, 1);
    let released = Instant::now();
    a.resign().await.unwrap();
    leads(&b).await;
    let took = released.elapsed();
    assert!(
        took >= HOLDOFF,
        "b tried at once after a failed read: {took:?}"
    );
    assert!(
        took <= HOLDOFF + Duration::from_millis(10),
        "b took {took:?}"
    );
    stop(&a, ta).await;
    stop(&b, tb).await;
    log.assert_safe();
}

/// A follower whose registry read is still out when the preferred
/// candidate takes the key (the new holder's watch event comes first)
/// follows that holder: it neither holds off nor tries against the live
/// lease once its read answers.
#[tokio::test(start_paused = true)]
async fn a_follower_whose_read_is_overtaken_by_the_new_holder_makes_no_acquire() {
    let store = MemoryStore::new();
    let log = WorkLog::new();
    let a = build(&store, 1);
    let ta = run(&a, "a", &log);
    leads(&a).await;
    let s = build(&store, 2);
    let ts = run(&s, "s", &log);
    let slow = Counted {
        inner: store.backend(),
        counts: Default::default(),
    };
    let slow_faults = slow.inner.faults();
    let f = Leader::builder("job")
        .backend(Backend::new(slow.clone()))
        .ttl(TTL)
        .priority(1)
        .build()
        .unwrap();
    let tf = run(&f, "f", &log);
    for l in [&s, &f] {
        held(l).await;
    }
    // a names s (priority 2) its successor before it lets go.
    names(&store, a.leader_id(), s.leader_id(), None).await;
    // f's next registry read answers 100 ms late.
    slow_faults.inject_on(
        leaseholder::Op::Candidates,
        leaseholder::Fault::Delay(Duration::from_millis(100)),
        1,
    );
    let (_, _, before) = slow.counts.get();
    a.resign().await.unwrap();
    leads(&s).await;
    // Past f's late read and any hold-off it could have started.
    sleep(HOLDOFF * 3).await;
    let (_, _, after) = slow.counts.get();
    assert_eq!(after - before, 0, "f tried against s's live lease");
    assert!(matches!(
        *f.state().borrow(),
        State::Follower {
            waiting: Waiting::Held,
            ..
        }
    ));
    stop(&f, tf).await;
    stop(&s, ts).await;
    stop(&a, ta).await;
    log.assert_safe();
}

/// A preferred candidate registers only once it could take the lease: its
/// setup done. The leader is preempted when the preferred candidate is
/// ready, not while its setup is still out (which would leave the key to
/// a hold-off and the old leader again), and the preferred candidate's
/// work starts at once after the old leader's ends.
#[tokio::test(start_paused = true)]
async fn a_preferred_candidate_preempts_only_once_its_setup_is_done() {
    const SETUP: Duration = Duration::from_millis(800);
    let store = MemoryStore::new();
    let log = WorkLog::new();
    let ten = build(&store, 10);
    let t10 = run(&ten, "p10", &log);
    leads(&ten).await;
    sleep(TTL + Duration::from_millis(10)).await;
    let edge = store.backend();
    edge.faults()
        .inject_on(leaseholder::Op::Setup, leaseholder::Fault::Delay(SETUP), 1);
    let twenty = Leader::builder("job")
        .backend(Backend::new(edge))
        .ttl(TTL)
        .priority(20)
        .build()
        .unwrap();
    let started = Instant::now();
    let t20 = run(&twenty, "p20", &log);
    leads(&twenty).await;
    let took = started.elapsed();
    assert!(took >= SETUP, "p20 led {took:?} after it started");
    assert!(took <= SETUP + RENEW, "preemption took {took:?}");
    let terms = log.intervals();
    let who: Vec<_> = terms.iter().map(|i| i.who.as_str()).collect();
    assert_eq!(who, ["p10", "p20"], "leadership moved once");
    let ended = terms[0].end.expect("p10's work ended before p20's began");
    assert!(
        ended - started >= SETUP,
        "p10 was preempted {:?} after p20 started, while p20 was still setting up",
        ended - started
    );
    let gap = terms[1].start - ended;
    assert!(gap < HOLDOFF, "p20's work began {gap:?} after p10's ended");
    stop(&twenty, t20).await;
    stop(&ten, t10).await;
    log.assert_safe();
}
