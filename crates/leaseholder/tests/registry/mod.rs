//! Candidate registry scenarios on a real store, shared by
//! `candidates_nats.rs` and `candidates_postgres.rs` (`mod registry;`):
//! priorities, preemption after the minimum term, `resign_to`, and equal
//! priorities that never preempt. Each candidate has a backend of its own
//! (its own connection), as separate processes would; every scenario checks
//! that no two terms' work overlapped and that tokens went up
//! ([`WorkLog::assert_safe`]).
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::future::Future;
use std::time::Duration;

use leaseholder::{Backend, Error, Holder, Key, Leader, LeaderId, State, Waiting, WatchEvent};
use leaseholder_testkit::WorkLog;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::{Instant, sleep, timeout};

/// The lease ttl of every candidate here.
pub(crate) const TTL: Duration = Duration::from_secs(2);
/// The minimum term before a preemption.
pub(crate) const MIN_TERM: Duration = Duration::from_secs(2);
/// Generous bound on waiting for a state.
pub(crate) const WAIT: Duration = Duration::from_secs(60);

/// Where the scenarios get their backends: a new one (new connection) per
/// call, on one store.
pub(crate) trait Store {
    fn backend(&self) -> impl Future<Output = Backend>;
    /// This test binary as a command that runs its `child` entry point
    /// ([`child_main`]) on the same store.
    fn child(&self) -> tokio::process::Command;
}

/// A candidate for `key` with `priority`, ttl 2 s and minimum term 2 s.
pub(crate) async fn candidate(store: &impl Store, key: &str, priority: i32) -> Leader {
    Leader::builder(key)
        .backend(store.backend().await)
        .ttl(TTL)
        .priority(priority)
        .min_term(MIN_TERM)
        .build()
        .unwrap()
}

/// Runs `acquire_and_run` on `l`, recording each term's work in `log` as
/// `who`; the work runs until its token fires.
pub(crate) fn run(l: &Leader, who: &str, log: &WorkLog) -> JoinHandle<Result<(), Error>> {
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

pub(crate) async fn wait(
    state: &mut watch::Receiver<State>,
    what: impl FnMut(&State) -> bool,
) -> State {
    timeout(WAIT, state.wait_for(what))
        .await
        .expect("state not reached in time")
        .expect("state channel closed")
        .clone()
}

pub(crate) async fn leads(l: &Leader) -> State {
    wait(&mut l.state(), State::is_leader).await
}

pub(crate) async fn stop(l: &Leader, task: JoinHandle<Result<(), Error>>) {
    timeout(WAIT, l.shutdown()).await.unwrap().unwrap();
    timeout(WAIT, task).await.unwrap().unwrap().unwrap();
}

/// Waits until `l`'s registry read lists exactly the candidates `ids`
/// (registration runs beside the campaign, so a follower's state says
/// nothing about it). Polls the store, within [`WAIT`].
pub(crate) async fn until_listed(l: &Leader, ids: &[LeaderId]) {
    let polled = async {
        loop {
            let mut listed: Vec<_> = l
                .candidates()
                .await
                .unwrap()
                .iter()
                .map(|c| c.id())
                .collect();
            listed.sort();
            let mut want = ids.to_vec();
            want.sort();
            if listed == want {
                return;
            }
            sleep(Duration::from_millis(20)).await;
        }
    };
    timeout(WAIT, polled)
        .await
        .expect("the registry did not list the candidates in time");
}

/// Waits until `l`'s own entry is in the registry (polling the store,
/// within [`WAIT`]).
pub(crate) async fn registered(l: &Leader) {
    let id = l.leader_id();
    let polled = async {
        while !l
            .candidates()
            .await
            .is_ok_and(|list| list.iter().any(|c| c.id() == id))
        {
            sleep(Duration::from_millis(10)).await;
        }
    };
    timeout(WAIT, polled)
        .await
        .expect("the candidate did not register in time");
}

/// (1) Priorities 1, 5 and 10, started in that order, end with 10 leading
/// (the lower one that got there first is preempted once its term has
/// lasted the minimum term), and 10 stays; when 10 shuts down, 5 leads and
/// 1 does not.
pub(crate) async fn priorities_end_with_the_highest_leading_then_the_next(store: &impl Store) {
    let log = WorkLog::new();
    let key = "registry-priorities";
    let mut running = Vec::new();
    for p in [1, 5, 10] {
        let l = candidate(store, key, p).await;
        let task = run(&l, &format!("p{p}"), &log);
        running.push((l, task));
        sleep(Duration::from_millis(50)).await;
    }
    let (l10, t10) = running.pop().unwrap();
    let (l5, t5) = running.pop().unwrap();
    let (l1, t1) = running.pop().unwrap();
    let started = Instant::now();
    leads(&l10).await;
    println!("10 leads {:?} after the last start", started.elapsed());
    // It stays: nobody preempts the highest priority.
    let token = l10.fencing_token().unwrap();
    sleep(2 * TTL).await;
    assert_eq!(l10.fencing_token(), Some(token), "10 was preempted");
    // 10 shuts down: 5 goes first, 1 holds off.
    let terms = log.intervals().len();
    let shut = Instant::now();
    stop(&l10, t10).await;
    leads(&l5).await;
    // Its work runs (before it stops).
    timeout(WAIT, log.wait_for_start(terms + 1)).await.unwrap();
    println!("5 leads {:?} after 10 began to shut down", shut.elapsed());
    assert!(!l1.state().borrow().is_leader());
    stop(&l5, t5).await;
    stop(&l1, t1).await;
    log.assert_safe();
    let who: Vec<_> = log.intervals().into_iter().map(|i| i.who).collect();
    println!("terms: {who:?}");
    assert_eq!(who[who.len() - 2..], ["p10", "p5"], "{who:?}");
}

/// (2) A candidate of priority 20 that starts beside a leader of priority
/// 10 whose term is older than the minimum takes over within one renew
/// interval plus `allowance`, with a larger token and no overlap.
pub(crate) async fn a_higher_priority_preempts_within_one_renew_interval(
    store: &impl Store,
    allowance: Duration,
) {
    let log = WorkLog::new();
    let key = "registry-preempt";
    let ten = candidate(store, key, 10).await;
    let renew = ten.config().renew_interval();
    let t10 = run(&ten, "p10", &log);
    let first = leads(&ten).await.token().unwrap();
    sleep(MIN_TERM + Duration::from_millis(100)).await;
    let twenty = candidate(store, key, 20).await;
    let started = Instant::now();
    let t20 = run(&twenty, "p20", &log);
    let second = leads(&twenty).await.token().unwrap();
    let took = started.elapsed();
    timeout(WAIT, log.wait_for_start(2)).await.unwrap();
    println!("preempted {took:?} after the start (renew interval {renew:?})");
    assert!(second > first, "{second:?} after {first:?}");
    assert!(
        took <= renew + allowance,
        "the preemption took {took:?}, more than one renew interval ({renew:?}) + {allowance:?}"
    );
    // The preempted leader campaigns on, as a follower.
    let s10 = ten.state().borrow().clone();
    assert!(matches!(s10, State::Follower { .. }), "{s10:?}");
    stop(&twenty, t20).await;
    stop(&ten, t10).await;
    log.assert_safe();
    let who: Vec<_> = log.intervals().into_iter().map(|i| i.who).collect();
    assert_eq!(who, ["p10", "p20"]);
}

/// (3) `resign_to` hands the key to the named one of two followers, though
/// the other has waited longer (and would go first otherwise).
pub(crate) async fn resign_to_hands_over_to_the_named_follower(store: &impl Store) {
    let log = WorkLog::new();
    let key = "registry-resign-to";
    let a = candidate(store, key, 0).await;
    let ta = run(&a, "a", &log);
    let first = leads(&a).await.token().unwrap();
    let b = candidate(store, key, 0).await;
    let tb = run(&b, "b", &log);
    sleep(Duration::from_millis(20)).await;
    let c = candidate(store, key, 0).await;
    let tc = run(&c, "c", &log);
    until_listed(&a, &[a.leader_id(), b.leader_id(), c.leader_id()]).await;
    // Both followers know whom they follow (a follower still in its first
    // hold-off has not tried the key, so it cannot tell whose nomination
    // counts when the key comes free).
    for f in [&b, &c] {
        wait(&mut f.state(), |s| {
            matches!(s, State::Follower { leader: Some(h), waiting: Waiting::Held, .. } if h.token() == Some(first))
        })
        .await;
    }
    let t0 = Instant::now();
    a.resign_to(c.leader_id()).await.unwrap();
    let next = leads(&c).await.token().unwrap();
    println!("c leads {:?} after resign_to", t0.elapsed());
    timeout(WAIT, log.wait_for_start(2)).await.unwrap();
    assert!(next > first);
    assert!(!b.state().borrow().is_leader());
    for (l, t) in [(a, ta), (b, tb), (c, tc)] {
        stop(&l, t).await;
    }
    log.assert_safe();
    let who: Vec<_> = log.intervals().into_iter().map(|i| i.who).collect();
    assert_eq!(who, ["a", "c"]);
}

/// (4) Equal priorities never preempt: the first leader keeps its term for
/// several ttls while another candidate of its priority waits.
pub(crate) async fn equal_priorities_never_preempt(store: &impl Store) {
    let log = WorkLog::new();
    let key = "registry-equal";
    let a = candidate(store, key, 5).await;
    let ta = run(&a, "a", &log);
    let token = leads(&a).await.token().unwrap();
    let b = candidate(store, key, 5).await;
    let tb = run(&b, "b", &log);
    until_listed(&a, &[a.leader_id(), b.leader_id()]).await;
    sleep(3 * TTL).await;
    assert_eq!(a.fencing_token(), Some(token), "a was preempted");
    assert!(!b.state().borrow().is_leader());
    stop(&b, tb).await;
    stop(&a, ta).await;
    log.assert_safe();
    assert_eq!(log.intervals().len(), 1, "{:?}", log.intervals());
}

/// (5) A candidate of higher priority that comes for 100 ms (from its
/// registration) and goes for 100 ms, again and again for 10 s, preempts the steady leader at most
/// once per minimum term: every term of the steady leader but the last
/// lasts at least the minimum term, and no work overlaps.
pub(crate) async fn a_flapping_candidate_preempts_at_most_once_per_min_term(store: &impl Store) {
    let log = WorkLog::new();
    let key = "registry-flapping";
    let steady = candidate(store, key, 5).await;
    let ts = run(&steady, "steady", &log);
    leads(&steady).await;
    let began = Instant::now();
    let window = Duration::from_secs(10);
    let mut n = 0;
    while began.elapsed() < window {
        let flap = candidate(store, key, 10).await;
        let tf = run(&flap, &format!("flap{n}"), &log);
        // A candidate registers once it has set up the store and its
        // watch is up (tens of ms on a loaded machine): it flaps for 100
        // ms from then, so that the leader can see it at all.
        registered(&flap).await;
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
        // The minimum term counts from the term's start as the campaign
        // saw it; the work starts a moment later.
        assert!(
            lasted + Duration::from_millis(50) >= MIN_TERM,
            "a steady term lasted only {lasted:?}"
        );
    }
    println!(
        "{} flaps, {} terms, {} of the steady leader",
        n,
        intervals.len(),
        steady_terms.len()
    );
    assert!(steady_terms.len() >= 2, "the flapper never preempted");
    let most = (window.as_millis() / MIN_TERM.as_millis()) as usize + 2;
    assert!(
        steady_terms.len() <= most,
        "{} steady terms in {window:?} (at most {most})",
        steady_terms.len()
    );
    assert!(n >= 20, "the candidate flapped only {n} times");
}

/// The next [`WatchEvent::Candidates`] of `sub` within `within`, skipping
/// other events.
pub(crate) async fn next_candidates_event(
    sub: &mut leaseholder::backend::Subscription,
    within: Duration,
) -> Option<WatchEvent> {
    timeout(within, async {
        loop {
            let event = sub.next().await;
            if matches!(event, WatchEvent::Candidates(_)) {
                return event;
            }
        }
    })
    .await
    .ok()
}

/// (5) `Leader::proclaim` replaces the leader's metadata within its term:
/// the same fencing token and no new term, another client's
/// `current_leader()` reads the new metadata, and the backend's watch
/// (both backends' carry holders) brings it to every follower as an
/// `Updated` holder with that token.
///
/// A follower's `State` does not show it: the campaign publishes a
/// follower's state again only when the leader's term changes (nonce and
/// token), so it keeps the holder of the term's first event; the follower
/// is checked to stay a follower of the same term.
pub(crate) async fn proclaim_is_seen_by_followers_and_current_leader(store: &impl Store) {
    let key = "registry-proclaim";
    let leader = |backend: Backend, metadata: &'static str| {
        Leader::builder(key)
            .backend(backend)
            .ttl(TTL)
            .metadata(metadata)
            .build()
            .unwrap()
    };
    let log = WorkLog::new();
    let a = leader(store.backend().await, "v1");
    let ta = run(&a, "a", &log);
    let token = leads(&a).await.token().unwrap();
    let b = leader(store.backend().await, "b");
    let tb = run(&b, "b", &log);
    let mut sb = b.state();
    wait(
        &mut sb,
        |s| matches!(s, State::Follower { leader: Some(h), .. } if h.metadata().as_ref() == b"v1"),
    )
    .await;
    // A watcher of its own, up once it has heard one of a's renewals
    // (one per renew interval).
    let watcher = store.backend().await;
    let mut sub = watcher.subscribe(&Key::new(key).unwrap());
    next_holder(&mut sub, |h| h.metadata().as_ref() == b"v1").await;

    timeout(WAIT, a.proclaim("v2")).await.unwrap().unwrap();
    assert_eq!(a.fencing_token(), Some(token), "no new election");
    assert!(a.state().borrow().is_leader());
    // Another client (its own connection) reads it from the store.
    let seen = b.current_leader().await.unwrap().unwrap();
    assert_eq!(seen.metadata().as_ref(), b"v2", "{seen:?}");
    assert_eq!(seen.token(), Some(token));
    assert_eq!(seen.id(), Some(a.leader_id()));
    // The watch carries it, with the term's token.
    let heard = next_holder(&mut sub, |h| h.metadata().as_ref() == b"v2").await;
    assert_eq!(heard.token(), Some(token), "{heard:?}");
    assert_eq!(heard.id(), Some(a.leader_id()), "{heard:?}");
    // The follower still follows the same term.
    let state = b.state().borrow().clone();
    assert!(
        matches!(&state, State::Follower { leader: Some(h), .. } if h.token() == Some(token)),
        "{state:?}"
    );

    stop(&b, tb).await;
    stop(&a, ta).await;
    log.assert_safe();
    assert_eq!(log.intervals().len(), 1, "{:?}", log.intervals());
}

/// The next holder `sub` reports (within [`WAIT`]) that passes `what`,
/// skipping other events.
pub(crate) async fn next_holder(
    sub: &mut leaseholder::backend::Subscription,
    mut what: impl FnMut(&Holder) -> bool,
) -> Holder {
    timeout(WAIT, async {
        loop {
            if let WatchEvent::Updated(_, Some(h)) = sub.next().await
                && what(&h)
            {
                return h;
            }
        }
    })
    .await
    .expect("the watch did not report the holder in time")
}

/// The environment variable that makes a test binary's `child` entry
/// point run a candidate: `<key> <priority>`.
pub(crate) const CHILD_ENV: &str = "LEASEHOLDER_REGISTRY_CHILD";
/// The environment variable that gives the child the store's URL.
pub(crate) const URL_ENV: &str = "LEASEHOLDER_REGISTRY_URL";

/// This test binary, to run its `child` entry point ([`child_main`])
/// against the store at `url`.
pub(crate) fn child_command(url: &str) -> tokio::process::Command {
    let exe = std::env::current_exe().expect("the test binary's path");
    let mut cmd = tokio::process::Command::new(exe);
    cmd.args(["--exact", "child", "--nocapture"])
        .env(URL_ENV, url);
    cmd
}

/// The `child` entry point of a test binary: with [`CHILD_ENV`] set, runs
/// one candidate on `store`, prints `ID <leader id>` once the registry
/// lists it, and campaigns until the process is killed. Without it, does
/// nothing.
pub(crate) async fn child_main(store: &impl Store) {
    let Ok(spec) = std::env::var(CHILD_ENV) else {
        return;
    };
    let (key, priority) = spec.split_once(' ').expect("<key> <priority>");
    let l = candidate(store, key, priority.parse().expect("a priority")).await;
    let log = WorkLog::new();
    let _task = run(&l, "child", &log);
    registered(&l).await;
    println!("ID {}", l.leader_id());
    std::future::pending::<()>().await;
}

/// Starts `child` (a [`child_main`] command) as a candidate of `priority`
/// for `key`; returns the process and its leader id, once it is listed.
pub(crate) async fn spawn_child(
    mut child: tokio::process::Command,
    key: &str,
    priority: i32,
) -> (tokio::process::Child, String) {
    use tokio::io::AsyncBufReadExt;
    let mut process = child
        .env(CHILD_ENV, format!("{key} {priority}"))
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("the test binary runs as a child");
    let stdout = process.stdout.take().expect("piped stdout");
    let mut lines = tokio::io::BufReader::new(stdout).lines();
    let id = timeout(WAIT, async {
        while let Some(line) = lines.next_line().await.expect("the child's stdout") {
            if let Some(id) = line.strip_prefix("ID ") {
                return id.to_owned();
            }
        }
        panic!("the child exited before it registered");
    })
    .await
    .expect("the child registered in time");
    (process, id)
}

/// (7) A preferred candidate in another process, killed by SIGKILL while
/// the leader names it its successor (its registry entry is still live):
/// at the handoff the other follower holds off for it, saying so, and
/// takes the key once the hold-off has passed: the dead candidate costs
/// the hold-off once, never a ttl.
pub(crate) async fn a_killed_preferred_candidate_costs_at_most_the_holdoff(
    store: &impl Store,
    child: tokio::process::Command,
) {
    let log = WorkLog::new();
    let key = "registry-killed-preferred";
    // Not preemptible: the preferred candidate waits for the handoff.
    let a = Leader::builder(key)
        .backend(store.backend().await)
        .ttl(TTL)
        .priority(1)
        .preemptible(false)
        .build()
        .unwrap();
    let ta = run(&a, "a", &log);
    let first = leads(&a).await.token().unwrap();
    let b = candidate(store, key, 1).await;
    let holdoff = b.config().holdoff();
    let tb = run(&b, "b", &log);
    let (mut preferred, id) = spawn_child(child, key, 10).await;
    // a names the child its successor; b follows a.
    let named = async {
        loop {
            let list = a.candidates().await.unwrap();
            if list.iter().any(|c| {
                c.id() == a.leader_id()
                    && c.nominee().is_some_and(|(next, _)| next.to_string() == id)
            }) {
                return;
            }
            sleep(Duration::from_millis(20)).await;
        }
    };
    timeout(WAIT, named).await.expect("a named the child");
    wait(&mut b.state(), |s| {
        matches!(
            s,
            State::Follower {
                waiting: Waiting::Held,
                ..
            }
        )
    })
    .await;
    preferred.start_kill().unwrap();
    timeout(WAIT, preferred.wait()).await.unwrap().unwrap();
    let released = Instant::now();
    a.resign().await.unwrap();
    let held = wait(&mut b.state(), |s| {
        s.is_leader()
            || matches!(
                s,
                State::Follower {
                    waiting: Waiting::HoldingOff { .. },
                    ..
                }
            )
    })
    .await;
    assert!(
        matches!(&held, State::Follower { waiting: Waiting::HoldingOff { preferred }, .. } if preferred.to_string() == id),
        "b did not hold off for the killed candidate: {held:?}"
    );
    let second = leads(&b).await.token().unwrap();
    let took = released.elapsed();
    println!("b led {took:?} after the resign (hold-off {holdoff:?}, ttl {TTL:?})");
    assert!(took >= holdoff, "b did not wait out the hold-off: {took:?}");
    assert!(
        took < TTL,
        "the killed candidate cost {took:?}, a ttl ({TTL:?}) or more"
    );
    assert!(second > first, "{second:?} after {first:?}");
    // b's work starts a moment after its state says it leads.
    let next = timeout(WAIT, log.wait_for_start(2)).await.unwrap();
    assert_eq!(next.who, "b");
    stop(&b, tb).await;
    stop(&a, ta).await;
    log.assert_safe();
    let who: Vec<_> = log.intervals().into_iter().map(|i| i.who).collect();
    assert_eq!(who, ["a", "b"]);
}
