//! The `Leader` API on the memory backend under paused time: every timing
//! path (renew deadline, retry, backoff, drain) and every row of the
//! `acquire_and_run` table.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use leaseholder::{
    Acquired, Backend, BackendEdge, BackendError, Claim, Error, Faults, Holder, Key, Leader, Lease,
    MemoryStore, Op, Renewed, State, Status,
};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::{Instant, timeout};

const TTL: Duration = Duration::from_secs(3);
/// Generous bound for waiting on a state; paused time makes it free.
const WAIT: Duration = Duration::from_secs(60);

fn candidate(store: &MemoryStore) -> (Leader, Faults) {
    let edge = store.backend();
    let faults = edge.faults();
    let leader = Leader::builder("job")
        .backend(Backend::new(edge))
        .ttl(TTL)
        .build()
        .unwrap();
    (leader, faults)
}

fn key() -> Key {
    Key::new("job").unwrap()
}

async fn wait(state: &mut watch::Receiver<State>, what: impl FnMut(&State) -> bool) -> State {
    timeout(WAIT, state.wait_for(what))
        .await
        .expect("state not reached in time")
        .expect("state channel closed")
        .clone()
}

fn started(leader: &Leader) -> JoinHandle<Result<(), Error>> {
    let leader = leader.clone();
    tokio::spawn(async move { leader.start(Default::default()).await })
}

/// Shuts every leader down (drain, release) and checks its `start` task
/// returned `Ok`.
async fn stop(leaders: Vec<(Leader, JoinHandle<Result<(), Error>>)>) {
    for (leader, _) in &leaders {
        leader.shutdown().await.unwrap();
    }
    for (_, task) in leaders {
        task.await.unwrap().unwrap();
    }
}

/// A store view that is not any candidate's, for asserting on the store.
async fn holder(store: &MemoryStore) -> Option<Holder> {
    Backend::memory(store).holder(&key()).await.unwrap()
}

#[tokio::test(start_paused = true)]
async fn deadline_cancels_the_token_before_the_store_expires_the_lease() {
    let store = MemoryStore::new();
    let (a, faults) = candidate(&store);
    let (b, _) = candidate(&store);
    let (term_tx, mut term_rx) = tokio::sync::mpsc::unbounded_channel();
    let runner = tokio::spawn({
        let a = a.clone();
        async move {
            a.acquire_and_run(move |term| {
                let term_tx = term_tx.clone();
                async move {
                    term_tx.send(term.clone()).unwrap();
                    term.cancelled().await;
                    Ok::<_, std::io::Error>(())
                }
            })
            .await
        }
    });
    let term = timeout(WAIT, term_rx.recv()).await.unwrap().unwrap();
    let tb = started(&b);
    // From now on every call of A hangs: renewals never come back.
    faults.always(leaseholder::Fault::Hang);
    timeout(WAIT, term.cancelled()).await.unwrap();
    let cancelled_at = Instant::now();
    // The store still holds A's lease when A gives up: the drift margin.
    let still = holder(&store)
        .await
        .expect("lease expired before the token fired");
    assert!(still.is_nonce(still.nonce().unwrap()));
    assert_eq!(still.token(), Some(term.fencing_token()));
    let left = still.expires_in().unwrap();
    assert!(
        left >= a.config().drift_margin(),
        "only {left:?} left in the store"
    );
    assert!(!term.is_valid());
    assert!(term.check().unwrap_err().is_lost());
    // B takes over after the store expires the lease, not before.
    let mut sb = b.state();
    let state = wait(&mut sb, State::is_leader).await;
    assert!(Instant::now() >= cancelled_at + left);
    assert!(state.token().unwrap() > term.fencing_token());
    stop(vec![(b, tb)]).await;
    faults.clear();
    drop(runner);
}

#[tokio::test(start_paused = true)]
async fn failed_renewal_is_retried_before_the_deadline() {
    let store = MemoryStore::new();
    let (a, faults) = candidate(&store);
    let ta = started(&a);
    let mut sa = a.state();
    let token = wait(&mut sa, State::is_leader).await.token().unwrap();
    let deadline = a.current_term().unwrap().deadline();
    // The next renewal and its read-back fail; the retry must come well
    // before the deadline, so leadership is kept.
    faults.inject_on(Op::Renew, leaseholder::Fault::Fail, 1);
    faults.inject_on(Op::Holder, leaseholder::Fault::Fail, 1);
    let calls = faults.calls();
    let term = a.current_term().unwrap();
    // Advance the paused clock to the old deadline: by then the failed
    // renewal was retried and the deadline moved on.
    tokio::time::sleep_until(deadline).await;
    assert!(term.deadline() > deadline);
    assert!(
        faults.calls() >= calls + 3,
        "renew, read-back, retried renew"
    );
    assert!(!term.is_cancelled());
    assert!(term.is_valid());
    assert_eq!(a.fencing_token(), Some(token));
    stop(vec![(a, ta)]).await;
}

#[tokio::test(start_paused = true)]
async fn lost_renewal_reply_is_adopted_on_read_back() {
    let store = MemoryStore::new();
    let (a, faults) = candidate(&store);
    let ta = started(&a);
    let mut sa = a.state();
    wait(&mut sa, State::is_leader).await;
    let term = a.current_term().unwrap();
    let before = term.deadline();
    faults.inject_on(Op::Renew, leaseholder::Fault::LoseReply, 1);
    let calls = faults.calls();
    // At the next renewal the reply is lost; the read-back shows the renewal
    // took effect, so the deadline moves without another renew. The renewal
    // is due within one renew interval (jitter only shortens it), and may
    // fall on its very end: look a quarter interval later, well before the
    // one after it (at least 1.8 intervals in).
    let interval = a.config().renew_interval();
    tokio::time::sleep(interval + interval / 4).await;
    assert!(term.deadline() > before);
    assert_eq!(faults.calls(), calls + 2, "renew, read-back");
    assert!(!term.is_cancelled());
    stop(vec![(a, ta)]).await;
}

#[tokio::test(start_paused = true)]
async fn lost_acquire_reply_is_adopted_on_read_back() {
    let store = MemoryStore::new();
    let (a, faults) = candidate(&store);
    faults.inject_on(Op::Acquire, leaseholder::Fault::LoseReply, 1);
    let ta = started(&a);
    let mut sa = a.state();
    let began = Instant::now();
    let token = wait(&mut sa, State::is_leader).await.token().unwrap();
    // Adopted at once by reading back, not after the lease expired.
    assert!(began.elapsed() < TTL);
    assert_eq!(store.last_token(&key()), Some(token));
    stop(vec![(a, ta)]).await;
}

#[tokio::test(start_paused = true)]
async fn resign_hands_over_through_the_watch_at_once() {
    let store = MemoryStore::new();
    let (a, _) = candidate(&store);
    let (b, _) = candidate(&store);
    let ta = started(&a);
    let mut sa = a.state();
    let first = wait(&mut sa, State::is_leader).await.token().unwrap();
    let tb = started(&b);
    let mut sb = b.state();
    wait(&mut sb, |s| {
        matches!(
            s,
            State::Follower {
                leader: Some(_),
                ..
            }
        )
    })
    .await;
    let t0 = Instant::now();
    a.resign().await.unwrap();
    let second = wait(&mut sb, State::is_leader).await.token().unwrap();
    // No timer had to fire: the handoff took no (paused) time at all,
    // far less than a retry interval.
    assert!(
        t0.elapsed() < b.config().retry_interval() / 10,
        "{:?}",
        t0.elapsed()
    );
    assert!(second > first);
    // A does not grab it back: it stays a follower of B.
    assert_eq!(a.is_leader(), Status::Candidate);
    stop(vec![(a, ta), (b, tb)]).await;
}

#[tokio::test(start_paused = true)]
async fn shutdown_keeps_renewing_until_slow_work_has_drained() {
    let store = MemoryStore::new();
    let (a, _) = candidate(&store);
    let (b, _) = candidate(&store);
    let drained = Arc::new(Mutex::new(None));
    let runner = tokio::spawn({
        let a = a.clone();
        let drained = drained.clone();
        async move {
            a.acquire_and_run(move |term| {
                let drained = drained.clone();
                async move {
                    term.cancelled().await;
                    // Slow cleanup: longer than the ttl, shorter than the
                    // drain timeout (10 s).
                    tokio::time::sleep(TTL * 2).await;
                    *drained.lock().unwrap() = Some(Instant::now());
                    Ok::<_, std::io::Error>(())
                }
            })
            .await
        }
    });
    let mut sa = a.state();
    let token = wait(&mut sa, State::is_leader).await.token().unwrap();
    let tb = started(&b);
    let mut sb = b.state();
    wait(&mut sb, |s| {
        matches!(
            s,
            State::Follower {
                leader: Some(_),
                ..
            }
        )
    })
    .await;
    let asked = Instant::now();
    let stopping = tokio::spawn({
        let a = a.clone();
        async move { a.shutdown().await }
    });
    let state = wait(&mut sb, State::is_leader).await;
    let done = drained
        .lock()
        .unwrap()
        .expect("B led before A's work drained");
    assert!(done >= asked + TTL * 2);
    assert!(Instant::now() >= done);
    assert!(state.token().unwrap() > token);
    // Handed over at once when the drain ended, not after an expiry.
    assert!(Instant::now() - done < Duration::from_millis(50));
    stopping.await.unwrap().unwrap();
    runner.await.unwrap().unwrap();
    stop(vec![(b, tb)]).await;
}

#[tokio::test(start_paused = true)]
async fn drain_timeout_drops_work_that_ignores_its_token_then_releases() {
    let store = MemoryStore::new();
    let edge = store.backend();
    let a = Leader::builder("job")
        .backend(Backend::new(edge))
        .ttl(TTL)
        .drain_timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    let runner = tokio::spawn({
        let a = a.clone();
        async move {
            a.acquire_and_run(|_term| async {
                std::future::pending::<()>().await;
                Ok::<_, std::io::Error>(())
            })
            .await
        }
    });
    let mut sa = a.state();
    wait(&mut sa, State::is_leader).await;
    let t0 = Instant::now();
    a.shutdown().await.unwrap();
    let took = t0.elapsed();
    assert!(took >= Duration::from_secs(5), "{took:?}");
    assert!(took < Duration::from_secs(6), "{took:?}");
    assert!(holder(&store).await.is_none(), "released after the drop");
    assert!(runner.await.unwrap().is_ok());
}

#[tokio::test(start_paused = true)]
async fn crashed_leader_is_replaced_after_the_ttl() {
    let store = MemoryStore::new();
    let (a, faults) = candidate(&store);
    let (b, _) = candidate(&store);
    let ta = started(&a);
    let mut sa = a.state();
    let first = wait(&mut sa, State::is_leader).await.token().unwrap();
    let tb = started(&b);
    let mut sb = b.state();
    wait(&mut sb, |s| {
        matches!(
            s,
            State::Follower {
                leader: Some(_),
                ..
            }
        )
    })
    .await;
    // "Crash": A's link dies and its task is gone; nothing is released.
    faults.partition();
    let left = holder(&store).await.unwrap().expires_in().unwrap();
    let crashed = Instant::now();
    ta.abort();
    let second = wait(&mut sb, State::is_leader).await.token().unwrap();
    let took = crashed.elapsed();
    assert!(
        took >= left,
        "took over {took:?} after the crash, lease had {left:?}"
    );
    // Woken by the expiry (watch or hint), not a later poll.
    assert!(took <= left + b.config().retry_interval(), "{took:?}");
    assert!(second > first);
    stop(vec![(b, tb)]).await;
}

/// Records the instant of every call and fails them all.
#[derive(Clone, Default)]
struct AlwaysDown {
    calls: Arc<Mutex<Vec<Instant>>>,
}

impl AlwaysDown {
    fn fail(&self) -> BackendError {
        self.calls.lock().unwrap().push(Instant::now());
        BackendError::unavailable("down")
    }
}

impl BackendEdge for AlwaysDown {
    fn name(&self) -> &'static str {
        "always-down"
    }
    async fn setup(&self, _: Duration) -> Result<leaseholder::Prepared, BackendError> {
        Err(self.fail())
    }
    async fn acquire(
        &self,
        _: &Key,
        _: &Claim,
        _: Duration,
        _: Duration,
    ) -> Result<Acquired, BackendError> {
        Err(self.fail())
    }
    async fn renew(
        &self,
        _: &Key,
        _: &Lease,
        _: Duration,
        _: Duration,
    ) -> Result<Renewed, BackendError> {
        Err(self.fail())
    }
    async fn release(&self, _: &Key, _: &Lease, _: Duration) -> Result<(), BackendError> {
        Err(self.fail())
    }
    async fn holder(&self, _: &Key, _: Duration) -> Result<Option<Holder>, BackendError> {
        Err(self.fail())
    }
}

#[tokio::test(start_paused = true)]
async fn store_errors_back_off_exponentially_up_to_the_cap() {
    let down = AlwaysDown::default();
    let (min, max) = (Duration::from_millis(100), Duration::from_secs(2));
    let a = Leader::builder("job")
        .backend(Backend::new(down.clone()))
        .ttl(Duration::from_secs(10))
        .backoff(min, max)
        .jitter(0.1)
        .build()
        .unwrap();
    let ta = started(&a);
    let mut sa = a.state();
    // Transient errors show as Unknown, never as a stale leader.
    let state = wait(&mut sa, |s| matches!(s, State::Unknown { .. })).await;
    assert!(!state.is_leader());
    tokio::time::sleep(Duration::from_secs(60)).await;
    let calls = down.calls.lock().unwrap().clone();
    let gaps: Vec<Duration> = calls.windows(2).map(|w| w[1] - w[0]).collect();
    assert!(gaps.len() > 20, "{gaps:?}");
    for (n, gap) in gaps.iter().enumerate() {
        let ideal = min.saturating_mul(1 << n.min(20)).min(max);
        assert!(*gap <= ideal, "gap {n} is {gap:?}, over {ideal:?}");
        assert!(
            *gap >= ideal.mul_f64(0.9),
            "gap {n} is {gap:?}, under {ideal:?} - 10%"
        );
    }
    assert!(gaps.iter().rev().take(10).all(|g| *g >= max.mul_f64(0.9)));
    stop(vec![(a, ta)]).await;
}

#[tokio::test(start_paused = true)]
async fn transient_errors_show_unknown_then_recover() {
    let store = MemoryStore::new();
    let (a, faults) = candidate(&store);
    faults.partition();
    let ta = started(&a);
    let mut sa = a.state();
    wait(&mut sa, |s| matches!(s, State::Unknown { .. })).await;
    faults.heal();
    wait(&mut sa, State::is_leader).await;
    stop(vec![(a, ta)]).await;
}

/// A backend whose setup says the server is unsupported.
struct Unsupported;

impl BackendEdge for Unsupported {
    fn name(&self) -> &'static str {
        "unsupported"
    }
    async fn setup(&self, _: Duration) -> Result<leaseholder::Prepared, BackendError> {
        Err(BackendError::Unsupported {
            what: "per-message TTL".into(),
            needed: "server 2.11".into(),
        })
    }
    async fn acquire(
        &self,
        _: &Key,
        _: &Claim,
        _: Duration,
        _: Duration,
    ) -> Result<Acquired, BackendError> {
        unreachable!("no acquire after a failed setup")
    }
    async fn renew(
        &self,
        _: &Key,
        _: &Lease,
        _: Duration,
        _: Duration,
    ) -> Result<Renewed, BackendError> {
        unreachable!()
    }
    async fn release(&self, _: &Key, _: &Lease, _: Duration) -> Result<(), BackendError> {
        unreachable!()
    }
    async fn holder(&self, _: &Key, _: Duration) -> Result<Option<Holder>, BackendError> {
        unreachable!()
    }
}

#[tokio::test(start_paused = true)]
async fn fatal_store_errors_are_returned_at_once() {
    let a = Leader::builder("job")
        .backend(Backend::new(Unsupported))
        .build()
        .unwrap();
    let calls = Arc::new(AtomicUsize::new(0));
    let err = timeout(
        WAIT,
        a.acquire_and_run({
            let calls = calls.clone();
            move |_| {
                calls.fetch_add(1, Ordering::SeqCst);
                async { Ok::<_, std::io::Error>(()) }
            }
        }),
    )
    .await
    .unwrap()
    .unwrap_err();
    assert!(
        matches!(&err, Error::Backend { op: Op::Setup, source, .. }
            if matches!(**source, BackendError::Unsupported { .. })),
        "{err:?}"
    );
    assert!(!err.is_transient());
    assert_eq!(calls.load(Ordering::SeqCst), 0);
    assert!(a.state().borrow().is_stopped());
}

#[tokio::test(start_paused = true)]
async fn work_done_while_leading_releases_and_returns_ok() {
    let store = MemoryStore::new();
    let (a, _) = candidate(&store);
    let tokens = Arc::new(Mutex::new(Vec::new()));
    a.acquire_and_run({
        let tokens = tokens.clone();
        move |term| {
            tokens.lock().unwrap().push(term.fencing_token());
            async { Ok::<_, std::io::Error>(()) }
        }
    })
    .await
    .unwrap();
    assert_eq!(tokens.lock().unwrap().len(), 1);
    assert!(holder(&store).await.is_none(), "released before returning");
    assert!(a.state().borrow().is_stopped());
    // The handle can run again: a new term with a larger token.
    a.acquire_and_run({
        let tokens = tokens.clone();
        move |term| {
            tokens.lock().unwrap().push(term.fencing_token());
            async { Ok::<_, std::io::Error>(()) }
        }
    })
    .await
    .unwrap();
    let tokens = tokens.lock().unwrap();
    assert!(tokens[1] > tokens[0]);
}

#[tokio::test(start_paused = true)]
async fn work_error_releases_and_is_returned() {
    let store = MemoryStore::new();
    let (a, _) = candidate(&store);
    let (b, _) = candidate(&store);
    let tb = started(&b);
    let mut sb = b.state();
    wait(&mut sb, State::is_leader).await;
    b.resign().await.unwrap();
    let err = a
        .acquire_and_run(|_| async { Err::<(), _>(std::io::Error::other("boom")) })
        .await
        .unwrap_err();
    match &err {
        Error::Work(e) => assert_eq!(e.to_string(), "boom"),
        other => panic!("{other:?}"),
    }
    assert!(
        holder(&store)
            .await
            .is_none_or(|h| h.id() != Some(a.leader_id()))
    );
    // B takes over at once (release, not expiry).
    let t0 = Instant::now();
    wait(&mut sb, State::is_leader).await;
    assert!(t0.elapsed() < TTL / 2);
    stop(vec![(b, tb)]).await;
}

#[tokio::test(start_paused = true)]
async fn work_panic_releases_and_is_returned() {
    let store = MemoryStore::new();
    let (a, _) = candidate(&store);
    let err = a
        .acquire_and_run(|_| async {
            if true {
                panic!("work panicked on purpose");
            }
            Ok::<_, std::io::Error>(())
        })
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Panicked { .. }), "{err:?}");
    assert!(holder(&store).await.is_none(), "released after the panic");
    // The campaign survived the panic and stopped cleanly.
    assert!(a.state().borrow().is_stopped());
}

#[tokio::test(start_paused = true)]
async fn work_is_run_again_after_leadership_is_lost() {
    let store = MemoryStore::new();
    let (a, faults) = candidate(&store);
    let (b, _) = candidate(&store);
    let (runs_tx, mut runs) = tokio::sync::mpsc::unbounded_channel();
    let runner = tokio::spawn({
        let a = a.clone();
        async move {
            a.acquire_and_run(move |term| {
                runs_tx.send(term.fencing_token()).unwrap();
                async move {
                    term.cancelled().await;
                    Ok::<_, std::io::Error>(())
                }
            })
            .await
        }
    });
    let mut sa = a.state();
    wait(&mut sa, State::is_leader).await;
    // A loses: an operator deletes the key and B takes it at once.
    let tb = started(&b);
    store.force_delete(&key());
    let mut sb = b.state();
    wait(&mut sb, State::is_leader).await;
    wait(&mut sa, |s| !s.is_leader()).await;
    // B steps down; A runs its work again in a new term.
    stop(vec![(b, tb)]).await;
    wait(&mut sa, State::is_leader).await;
    let first = timeout(WAIT, runs.recv()).await.unwrap().unwrap();
    let second = timeout(WAIT, runs.recv()).await.unwrap().unwrap();
    assert!(second > first, "{first} then {second}");
    a.shutdown().await.unwrap();
    assert!(runner.await.unwrap().is_ok());
    faults.clear();
}

#[tokio::test(start_paused = true)]
async fn dropping_acquire_and_run_cancels_the_work_and_releases() {
    let store = MemoryStore::new();
    let (a, _) = candidate(&store);
    let (b, _) = candidate(&store);
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let runner = tokio::spawn({
        let a = a.clone();
        async move {
            a.acquire_and_run(move |term| {
                let tx = tx.clone();
                async move {
                    tx.send(term.clone()).unwrap();
                    std::future::pending::<()>().await;
                    Ok::<_, std::io::Error>(())
                }
            })
            .await
        }
    });
    let term = timeout(WAIT, rx.recv()).await.unwrap().unwrap();
    let tb = started(&b);
    let mut sb = b.state();
    wait(&mut sb, |s| {
        matches!(
            s,
            State::Follower {
                leader: Some(_),
                ..
            }
        )
    })
    .await;
    runner.abort();
    let t0 = Instant::now();
    wait(&mut sb, State::is_leader).await;
    assert!(term.is_cancelled());
    assert!(
        t0.elapsed() < TTL / 2,
        "released, not expired: {:?}",
        t0.elapsed()
    );
    stop(vec![(b, tb)]).await;
}

#[tokio::test(start_paused = true)]
async fn one_runner_per_handle_and_no_campaign_after_shutdown() {
    let store = MemoryStore::new();
    let (a, _) = candidate(&store);
    let runner = tokio::spawn({
        let a = a.clone();
        async move {
            a.acquire_and_run(|term| async move {
                term.cancelled().await;
                Ok::<_, std::io::Error>(())
            })
            .await
        }
    });
    let mut sa = a.state();
    wait(&mut sa, State::is_leader).await;
    let err = a
        .acquire_and_run(|_| async { Ok::<_, std::io::Error>(()) })
        .await
        .unwrap_err();
    assert!(matches!(err, Error::AlreadyRunning { .. }), "{err:?}");
    stop(vec![(a.clone(), runner)]).await;
    a.shutdown().await.unwrap(); // idempotent
    let err = a.start(Default::default()).await.unwrap_err();
    assert!(matches!(err, Error::Shutdown { .. }), "{err:?}");
}

#[tokio::test(start_paused = true)]
async fn many_keys_share_one_backend() {
    let store = MemoryStore::new();
    let backend = Backend::memory(&store);
    let leaders: Vec<Leader> = (0..50)
        .map(|i| {
            Leader::builder(format!("key-{i}"))
                .backend(backend.clone())
                .ttl(TTL)
                .build()
                .unwrap()
        })
        .collect();
    let tasks: Vec<_> = leaders.iter().map(started).collect();
    for l in &leaders {
        wait(&mut l.state(), State::is_leader).await;
    }
    assert_eq!(store.setups(), 1, "one setup per backend, not per key");
    for l in &leaders {
        l.shutdown().await.unwrap();
    }
    for t in tasks {
        t.await.unwrap().unwrap();
    }
}

#[tokio::test(start_paused = true)]
async fn followers_make_no_store_calls_while_the_watch_is_up() {
    let store = MemoryStore::new();
    let (a, _) = candidate(&store);
    let (b, b_faults) = candidate(&store);
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
    let before = b_faults.calls();
    tokio::time::sleep(TTL * 20).await;
    assert_eq!(
        b_faults.calls(),
        before,
        "an idle follower called the store"
    );
    stop(vec![(a, ta), (b, tb)]).await;
}

#[tokio::test(start_paused = true)]
async fn the_leader_writes_about_three_times_per_ttl() {
    let store = MemoryStore::new();
    let (a, faults) = candidate(&store);
    let ta = started(&a);
    wait(&mut a.state(), State::is_leader).await;
    let before = faults.calls();
    tokio::time::sleep(TTL * 10).await;
    let per_ttl = (faults.calls() - before) as f64 / 10.0;
    assert!((3.0..=4.0).contains(&per_ttl), "{per_ttl} writes per ttl");
    stop(vec![(a, ta)]).await;
}

#[tokio::test(start_paused = true)]
async fn observer_sees_terms_change_without_campaigning() {
    use leaseholder::{Observed, Observer};
    let store = MemoryStore::new();
    let (a, _) = candidate(&store);
    let (b, _) = candidate(&store);
    let observer = Observer::new("job", Backend::memory(&store), Duration::from_secs(1)).unwrap();
    let mut seen = observer.watch();
    timeout(WAIT, seen.wait_for(|o| *o == Observed::Vacant))
        .await
        .unwrap()
        .unwrap();
    let ta = started(&a);
    let o = timeout(WAIT, seen.wait_for(|o| o.holder().is_some()))
        .await
        .unwrap()
        .unwrap()
        .clone();
    assert_eq!(o.holder().unwrap().id(), Some(a.leader_id()));
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
    a.resign().await.unwrap();
    let o = timeout(
        WAIT,
        seen.wait_for(|o| o.holder().is_some_and(|h| h.id() == Some(b.leader_id()))),
    )
    .await
    .unwrap()
    .unwrap()
    .clone();
    assert!(o.holder().unwrap().token() > Some(leaseholder::FencingToken::new(0)));
    stop(vec![(a, ta), (b, tb)]).await;
    drop(observer);
}

#[tokio::test(start_paused = true)]
async fn followers_see_the_leader_and_its_metadata() {
    let store = MemoryStore::new();
    let a = Leader::builder("job")
        .backend(Backend::memory(&store))
        .metadata("10.0.0.7:8080")
        .build()
        .unwrap();
    let (b, _) = candidate(&store);
    let ta = started(&a);
    wait(&mut a.state(), State::is_leader).await;
    let tb = started(&b);
    let state = wait(&mut b.state(), |s| {
        matches!(
            s,
            State::Follower {
                leader: Some(_),
                ..
            }
        )
    })
    .await;
    let State::Follower {
        leader: Some(h), ..
    } = state
    else {
        unreachable!()
    };
    assert_eq!(h.id(), Some(a.leader_id()));
    assert_eq!(&h.metadata()[..], b"10.0.0.7:8080");
    assert_eq!(
        b.current_leader().await.unwrap().unwrap().id(),
        Some(a.leader_id())
    );
    stop(vec![(a, ta), (b, tb)]).await;
}

#[tokio::test(start_paused = true)]
async fn dropping_do_while_leader_under_start_drops_the_work_and_releases() {
    let store = MemoryStore::new();
    let (a, _) = candidate(&store);
    let (b, _) = candidate(&store);
    let ta = started(&a);
    wait(&mut a.state(), State::is_leader).await;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let runner = tokio::spawn({
        let a = a.clone();
        async move {
            a.do_while_leader(move |term| {
                let tx = tx.clone();
                async move {
                    tx.send(term.clone()).unwrap();
                    std::future::pending::<()>().await;
                    Ok::<_, std::io::Error>(())
                }
            })
            .await
        }
    });
    let term = timeout(WAIT, rx.recv()).await.unwrap().unwrap();
    let tb = started(&b);
    let mut sb = b.state();
    wait(&mut sb, |s| {
        matches!(
            s,
            State::Follower {
                leader: Some(_),
                ..
            }
        )
    })
    .await;
    // The campaign belongs to `start`; dropping the work's runner drops the
    // work and gives the lease up, and the campaign goes on.
    runner.abort();
    let t0 = Instant::now();
    wait(&mut sb, State::is_leader).await;
    assert!(
        t0.elapsed() < TTL / 2,
        "released, not expired: {:?}",
        t0.elapsed()
    );
    assert!(term.is_cancelled());
    assert!(matches!(*a.state().borrow(), State::Follower { .. }));
    stop(vec![(a, ta), (b, tb)]).await;
}
