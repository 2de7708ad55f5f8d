//! The PostgreSQL backend under failures, on a real server: the leader's
//! link cut by a proxy, a server restart, a pool exhausted by the user's own
//! queries, a renewal blocked on the lease row's lock or slowed by the
//! network, a lost LISTEN connection, a paused server; a row lock that
//! must not starve a one-connection pool, the SQLSTATEs of a failover, a
//! conflict or a shutdown (transient), and a table dropped under a leader.
//!
//! `a_renewal_slowed_by_the_network_cannot_extend_the_lease_after_the_deadline`
//! checks that no renewal commits after its leader gave up (see its doc
//! comment); it failed before renewals carried the deadline. Safety is not
//! at stake there, only how soon an abandoned lease frees up.
//!
//! Every test checks safety (the work of two terms never overlaps and
//! tokens strictly increase, as the work itself recorded it in a
//! [`WorkLog`]) and liveness (a new leader within a bound). Where a test
//! compares the leader's local times with the lease's expiry in the store,
//! it reads `expires_at - clock_timestamp()` from the server and adds it to
//! the local instant the query was sent: a lower bound of the expiry on the
//! local clock (server and tests share the machine's clock).
#![cfg(feature = "postgres")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use leaseholder::{
    Acquired, Backend, BackendError, Claim, Error, Key, Leader, LeaderId, Op, PostgresBackend,
    Prepared, Renewed, State,
};
use leaseholder_testkit::{PostgresServer, TcpProxy, WorkLog};
use tokio::task::JoinHandle;
use tokio::time::{Instant, timeout};
use tokio_postgres::{Client, NoTls};

mod support;
use support::{run_reporting_terms, stop, wait_any_leader, wait_sees};

const WAIT: Duration = Duration::from_secs(30);

/// The key every test campaigns for (each test has its own server).
const KEY: &str = "scheduler";

/// Pause between two reads of a server catalog or of the lease row.
const POLL: Duration = Duration::from_millis(20);

/// A fresh server with the lease table created, so that the candidates'
/// setups find it (`Prepared::Existing`) and acquire at once, rather than
/// wait one ttl as after creating it.
async fn server() -> PostgresServer {
    let s = PostgresServer::start()
        .await
        .expect("PostgreSQL 15+ is needed: run scripts/setup");
    timeout(WAIT, backend(&s.url()).setup())
        .await
        .expect("setup within 30 s")
        .unwrap();
    s
}

fn url_of(addr: SocketAddr) -> String {
    format!("postgres://postgres@{addr}/postgres")
}

/// A backend with its own pool and LISTEN connection, both to `url`.
fn backend(url: &str) -> Backend {
    Backend::postgres(PostgresBackend::builder().url(url).build().unwrap())
}

fn leader_on(backend: Backend, ttl: Duration) -> Leader {
    Leader::builder(KEY)
        .backend(backend)
        .ttl(ttl)
        .build()
        .unwrap()
}

async fn connect(s: &PostgresServer) -> Client {
    timeout(WAIT, s.connect())
        .await
        .expect("connecting to postgres within 30 s")
        .unwrap()
}

/// `t` moved by `secs` (which may be negative).
fn shifted(t: Instant, secs: f64) -> Instant {
    if secs >= 0.0 {
        t + Duration::from_secs_f64(secs)
    } else {
        t.checked_sub(Duration::from_secs_f64(-secs)).unwrap_or(t)
    }
}

/// The lease row as the server sees it.
#[derive(Debug)]
struct LeaseRow {
    term: u64,
    /// A nonce is set: the lease is held (perhaps expired).
    held: bool,
    revision: i64,
    /// `expires_at` in seconds since the epoch.
    expires_epoch: Option<f64>,
    /// A lower bound of `expires_at` on the local clock.
    expires: Option<Instant>,
}

/// The lease row's columns that [`lease_row_from`] reads.
const ROW_COLUMNS: &str = "term, nonce IS NOT NULL, revision, \
                           extract(epoch from expires_at)::float8, \
                           extract(epoch from expires_at - clock_timestamp())::float8";

/// Reads the lease row, and `extra` columns after [`ROW_COLUMNS`].
fn row_query(extra: &str) -> String {
    format!("SELECT {ROW_COLUMNS}{extra} FROM public.leaseholder_leases WHERE key = $1")
}

fn lease_row_from(row: &tokio_postgres::Row, sent: Instant) -> LeaseRow {
    let left: Option<f64> = row.get(4);
    LeaseRow {
        term: u64::try_from(row.get::<_, i64>(0)).unwrap(),
        held: row.get(1),
        revision: row.get(2),
        expires_epoch: row.get(3),
        expires: left.map(|left| shifted(sent, left)),
    }
}

async fn lease_row(c: &Client) -> LeaseRow {
    let sent = Instant::now();
    let row = c.query_one(&row_query(""), &[&KEY]).await.unwrap();
    lease_row_from(&row, sent)
}

/// The pids of the sessions whose last statement was a `LISTEN`.
async fn listen_pids(s: &PostgresServer) -> Vec<i32> {
    let c = connect(s).await;
    c.query(
        "SELECT pid FROM pg_stat_activity \
         WHERE query LIKE 'LISTEN %' AND pid <> pg_backend_pid() ORDER BY pid",
        &[],
    )
    .await
    .unwrap()
    .iter()
    .map(|r| r.get(0))
    .collect()
}

/// Polls `pg_stat_activity` until exactly `n` LISTEN sessions are open,
/// none of them in `old`.
async fn wait_listen_sessions(s: &PostgresServer, n: usize, old: &[i32]) -> Vec<i32> {
    let mut last = Vec::new();
    let found = timeout(WAIT, async {
        loop {
            last = listen_pids(s).await;
            if last.len() == n && last.iter().all(|pid| !old.contains(pid)) {
                return last.clone();
            }
            tokio::time::sleep(POLL).await;
        }
    })
    .await;
    found.unwrap_or_else(|_| {
        panic!("not {n} new LISTEN sessions within 30 s (old {old:?}, last seen {last:?})")
    })
}

/// Lines of the server's log that report a statement cancelled by a
/// timeout, with the statement that follows each.
fn timeout_cancellations(s: &PostgresServer) -> Vec<String> {
    let log = std::fs::read_to_string(s.dir().join("postgres.log")).unwrap_or_default();
    let lines: Vec<&str> = log.lines().collect();
    lines
        .iter()
        .enumerate()
        .filter(|(_, l)| {
            l.contains("canceling statement due to lock timeout")
                || l.contains("canceling statement due to statement timeout")
        })
        .map(|(i, l)| {
            // The server logs the context, then the statement.
            let statement = lines
                .iter()
                .skip(i + 1)
                .take(3)
                .find_map(|l| l.split_once("STATEMENT:").map(|(_, s)| s.trim()))
                .unwrap_or("?");
            format!("{} | {statement}", l.trim())
        })
        .collect()
}

// ----- 1. the leader's link cut ------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_cut_off_by_a_proxy_stops_before_its_lease_expires_and_is_replaced() {
    let s = server().await;
    let proxy = TcpProxy::start(s.addr()).await.unwrap();
    let ttl = Duration::from_secs(2);
    let log = WorkLog::new();
    // A's pool and LISTEN connection go through the proxy; B's do not.
    let a = leader_on(backend(&url_of(proxy.addr())), ttl);
    let b = leader_on(backend(&s.url()), ttl);
    let (ta, mut terms) = run_reporting_terms(&a, "a", &log);
    let term = timeout(WAIT, terms.recv()).await.unwrap().unwrap();
    let token = term.fencing_token().get();
    let (tb, _) = run_reporting_terms(&b, "b", &log);
    wait_sees(&b, token).await;

    proxy.cut();
    let cut = Instant::now();
    timeout(WAIT, proxy.wait_connections(0))
        .await
        .expect("the proxy closes every connection");
    // Every renewal A saw confirmed committed before its reply went
    // through the proxy, so before now: the row holds A's final expiry
    // (or a later one, if a renewal's reply was lost in the cut).
    let c = connect(&s).await;
    let row = lease_row(&c).await;
    assert_eq!(row.term, token, "{row:?}");
    assert!(row.held, "{row:?}");
    let expires = row.expires.expect("A's lease has an expiry");

    let next = timeout(WAIT, log.wait_for_start(2))
        .await
        .expect("B leads within 30 s of the cut");
    assert_eq!(next.who, "b");
    assert!(next.token > token);
    assert!(term.is_cancelled());
    let ended = timeout(WAIT, log.wait_for_end(0))
        .await
        .expect("A's work ends")
        .end
        .expect("an ended interval has an end");
    println!(
        "cut: A's work ended {:?} after the cut, its lease expired in the store {:?} after it \
         (A stopped {:?} early), B began {:?} after the cut",
        ended.saturating_duration_since(cut),
        expires.saturating_duration_since(cut),
        expires.saturating_duration_since(ended),
        next.start.saturating_duration_since(cut),
    );
    // A's token fired before the store could let anyone in...
    assert!(
        ended < expires,
        "A worked {:?} past its lease's expiry in the store",
        ended - expires
    );
    // ...and B got in only once the store had expired A's lease.
    assert!(
        next.start > expires,
        "B began {:?} before A's lease expired in the store",
        expires - next.start
    );

    // The link heals: A campaigns again and follows B.
    proxy.restore();
    wait_sees(&a, next.token).await;
    stop(&b, tb).await;
    stop(&a, ta).await;
    log.assert_safe();
}

// ----- 2. the server restarted -------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_campaign_recovers_after_the_server_restarts_and_resign_still_uses_notify() {
    let mut s = server().await;
    let ttl = Duration::from_secs(10);
    let log = WorkLog::new();
    let mut fleet = Vec::new();
    for who in ["c0", "c1", "c2", "c3"] {
        let l = leader_on(backend(&s.url()), ttl);
        let (task, _) = run_reporting_terms(&l, who, &log);
        fleet.push((l, task));
    }
    let leaders: Vec<&Leader> = fleet.iter().map(|(l, _)| l).collect();
    let first = timeout(WAIT, wait_any_leader(&leaders)).await.unwrap();
    let before = leaders[first].fencing_token().unwrap().get();
    for l in &leaders {
        wait_sees(l, before).await;
    }
    let old_listeners = wait_listen_sessions(&s, 4, &[]).await;
    let row_before = lease_row(&connect(&s).await).await;
    // Changes published from here on come from store calls made after the
    // restart.
    let mut states: Vec<_> = leaders.iter().map(|l| l.state()).collect();
    for st in &mut states {
        st.borrow_and_update();
    }

    let t0 = Instant::now();
    s.restart().await.unwrap();
    let restarted = t0.elapsed();
    // No user action from here on.
    wait_listen_sessions(&s, 4, &old_listeners).await;
    let listening = t0.elapsed();

    // The leader's campaign is back: it renewed through a new pool
    // connection (the row's revision moved on), or its term ended and it
    // campaigns again like the others.
    let c = connect(&s).await;
    let row = timeout(WAIT, async {
        loop {
            let row = lease_row(&c).await;
            if row.term != before || row.revision > row_before.revision {
                return row;
            }
            tokio::time::sleep(POLL).await;
        }
    })
    .await
    .expect("the lease is renewed or taken after the restart");
    // Every follower's campaign is back: each leads or follows a known
    // leader. (A follower that made no store call while the server was
    // down still follows the same term, and publishes nothing new: a
    // state changes once per term. That each campaign really is alive is
    // shown below, where every candidate must see each new term.)
    for (i, st) in states.iter_mut().enumerate() {
        if i == first && row.term == before {
            continue;
        }
        let known = |now: &State| {
            now.is_leader()
                || matches!(
                    now,
                    State::Follower {
                        leader: Some(_),
                        ..
                    }
                )
        };
        if timeout(WAIT, st.wait_for(known)).await.is_err() {
            panic!("c{i} did not recover: {:?}", st.borrow());
        }
    }
    let recovered = t0.elapsed();
    println!(
        "restart: server back after {restarted:?}, LISTEN sessions back after {listening:?}, \
         every campaign back after {recovered:?} (lease row now {row:?})"
    );

    // Some candidate leads with a larger token than before the restart,
    // and a resign hands over through NOTIFY: far below the retry
    // interval (2 s), and the followers' expiry timers (up to 10 s).
    let mut took = Vec::new();
    let mut token = before;
    for _ in 0..3 {
        let i = timeout(WAIT, wait_any_leader(&leaders)).await.unwrap();
        let Some(current) = leaders[i].fencing_token() else {
            continue;
        };
        // Every follower follows the current term. One that resigned holds
        // off for a retry interval (2 s) afterwards, and learns of its
        // successor from the renewal's notification meanwhile, so this
        // does not wait for that: with four candidates and three resigns,
        // one candidate that has not resigned is always there to take over.
        for l in &leaders {
            wait_sees(l, current.get()).await;
        }
        let terms = log.intervals().len();
        let t0 = Instant::now();
        leaders[i].resign().await.unwrap();
        let next = timeout(WAIT, log.wait_for_start(terms + 1))
            .await
            .expect("a successor within 30 s of the resign");
        took.push(next.start - t0);
        assert!(next.token > current.get() && next.token > before);
        token = next.token;
    }
    println!(
        "restart: resign handoffs after the restart, ttl 10 s: {took:?}; tokens {before} -> {token}"
    );
    assert!(token > before);
    assert!(!took.is_empty());
    for t in &took {
        assert!(
            *t < Duration::from_secs(1),
            "a handoff took {t:?}: not through NOTIFY ({took:?})"
        );
    }
    for (l, task) in fleet {
        stop(&l, task).await;
    }
    log.assert_safe();
}

// ----- 3. the user's pool exhausted --------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_exhausted_by_the_users_queries_ends_the_term_before_the_lease_expires() {
    let s = server().await;
    let ttl = Duration::from_secs(2);
    let log = WorkLog::new();
    let config: tokio_postgres::Config = s.url().parse().unwrap();
    let pool =
        deadpool_postgres::Pool::builder(deadpool_postgres::Manager::new(config.clone(), NoTls))
            .max_size(2)
            .build()
            .unwrap();
    let a = leader_on(
        Backend::postgres(
            PostgresBackend::builder()
                .pool(pool.clone())
                .listen(config.clone())
                .build()
                .unwrap(),
        ),
        ttl,
    );
    let b = leader_on(backend(&s.url()), ttl);
    let (ta, mut terms) = run_reporting_terms(&a, "a", &log);
    let term = timeout(WAIT, terms.recv()).await.unwrap().unwrap();
    let token = term.fencing_token().get();
    let (tb, _) = run_reporting_terms(&b, "b", &log);
    wait_sees(&b, token).await;
    let mut sa = a.state();
    assert!(sa.borrow_and_update().is_leader());

    // The application's own queries take every connection of the pool (a
    // renewal in flight gives its connection back first).
    let held = timeout(WAIT, async {
        let first = pool.get().await.unwrap();
        let second = pool.get().await.unwrap();
        [first, second]
    })
    .await
    .expect("the pool's connections within 30 s");
    let exhausted = Instant::now();
    println!("pool: exhausted, {:?}", pool.status());
    // No renewal of A can run from here on: the row holds A's final expiry.
    let c = connect(&s).await;
    let row = lease_row(&c).await;
    assert_eq!(row.term, token, "{row:?}");
    let expires = row.expires.expect("A's lease has an expiry");

    timeout(WAIT, term.cancelled())
        .await
        .expect("A's token fires");
    // Leadership is not lost silently: the state leaves Leader, then
    // reports the store unreachable while A's calls wait for the pool.
    let left = timeout(WAIT, sa.wait_for(|s| !s.is_leader()))
        .await
        .unwrap()
        .unwrap()
        .clone();
    assert!(
        matches!(
            left,
            State::Follower { leader: None, .. } | State::Unknown { .. }
        ),
        "{left:?}"
    );
    let next = timeout(WAIT, log.wait_for_start(2))
        .await
        .expect("B leads within 30 s");
    assert_eq!(next.who, "b");
    assert!(next.token > token);
    let unknown = timeout(WAIT, sa.wait_for(|s| matches!(s, State::Unknown { .. })))
        .await
        .expect("A reports the store unreachable while the pool is exhausted")
        .unwrap()
        .clone();
    let ended = timeout(WAIT, log.wait_for_end(0))
        .await
        .expect("A's work ends")
        .end
        .expect("an ended interval has an end");
    println!(
        "pool: A's work ended {:?} after the pool ran dry, its lease expired in the store {:?} \
         after it (A stopped {:?} early), B began {:?} after it; A's state then: {unknown:?}",
        ended.saturating_duration_since(exhausted),
        expires.saturating_duration_since(exhausted),
        expires.saturating_duration_since(ended),
        next.start.saturating_duration_since(exhausted),
    );
    assert!(
        ended < expires,
        "A worked {:?} past its lease's expiry in the store",
        ended - expires
    );
    assert!(next.start > expires);

    // The application gives its connections back: A campaigns again,
    // follows B, and takes over when B resigns.
    drop(held);
    wait_sees(&a, next.token).await;
    let t0 = Instant::now();
    b.resign().await.unwrap();
    let again = timeout(WAIT, log.wait_for_start(3))
        .await
        .expect("A leads again within 30 s");
    println!("pool: A took over {:?} after B resigned", again.start - t0);
    assert_eq!(again.who, "a");
    assert!(again.token > next.token);
    stop(&a, ta).await;
    stop(&b, tb).await;
    log.assert_safe();
}

// ----- 4. a renewal blocked on the row lock ------------------------------

/// Records every update of the lease table, in the updating transaction:
/// a row here means the update committed.
const AUDIT: &str = "
CREATE TABLE lease_audit (
    id          bigserial PRIMARY KEY,
    at          timestamptz NOT NULL DEFAULT clock_timestamp(),
    old_term    bigint,
    new_term    bigint,
    old_nonce   bytea,
    new_nonce   bytea,
    old_expires timestamptz,
    new_expires timestamptz
);
CREATE FUNCTION lease_audit() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO lease_audit (old_term, new_term, old_nonce, new_nonce, old_expires, new_expires)
    VALUES (OLD.term, NEW.term, OLD.nonce, NEW.nonce, OLD.expires_at, NEW.expires_at);
    RETURN NEW;
END $$;
CREATE TRIGGER lease_audit AFTER UPDATE ON public.leaseholder_leases
    FOR EACH ROW EXECUTE FUNCTION lease_audit();
";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renewal_blocked_on_the_row_lock_cannot_extend_the_lease_after_the_deadline() {
    let s = server().await;
    let ttl = Duration::from_secs(2);
    let log = WorkLog::new();
    let a = leader_on(backend(&s.url()), ttl);
    let b = leader_on(backend(&s.url()), ttl);
    a.setup().await.unwrap();
    let c = connect(&s).await;
    c.batch_execute(AUDIT).await.unwrap();
    let (ta, mut terms) = run_reporting_terms(&a, "a", &log);
    let term = timeout(WAIT, terms.recv()).await.unwrap().unwrap();
    let token = term.fencing_token().get();
    let (tb, _) = run_reporting_terms(&b, "b", &log);
    wait_sees(&b, token).await;

    // Another session locks the lease row (waiting for a renewal in flight
    // to commit first) and keeps it locked.
    let mut blocker = connect(&s).await;
    let tx = blocker.transaction().await.unwrap();
    let sent = Instant::now();
    let locked = tx
        .query_one(&format!("{} FOR UPDATE", row_query("")), &[&KEY])
        .await
        .unwrap();
    let locked_at = Instant::now();
    let row = lease_row_from(&locked, sent);
    assert_eq!(row.term, token, "{row:?}");
    assert!(row.held, "{row:?}");
    let expires = row.expires.expect("A's lease has an expiry");
    let expires_epoch = row.expires_epoch.unwrap();
    let audited: i64 = tx
        .query_one("SELECT coalesce(max(id), 0) FROM lease_audit", &[])
        .await
        .unwrap()
        .get(0);

    // A's renewals wait for the lock until their server-side timeouts; no
    // renewal succeeds, so the token fires at the deadline.
    timeout(WAIT, term.cancelled())
        .await
        .expect("A's token fires");
    let fired = Instant::now();
    let deadline = term.deadline();
    // A gives up for good, so that B is the next leader.
    let a_stopping = tokio::spawn({
        let a = a.clone();
        async move { a.shutdown().await }
    });
    // What still waits for the lock now that A has given up (A's release
    // and the candidates' acquires may; a renewal should not).
    let waiting: Vec<String> = c
        .query(
            "SELECT left(regexp_replace(query, '\\s+', ' ', 'g'), 70) || ' (waiting ' || \
                    round(extract(epoch from clock_timestamp() - query_start)::numeric, 3) || \
                    ' s)' \
               FROM pg_stat_activity WHERE wait_event_type = 'Lock'",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    tx.rollback().await.unwrap();
    let unlocked = Instant::now();
    let after = lease_row(&c).await;

    let next = timeout(WAIT, log.wait_for_start(2))
        .await
        .expect("B leads within 30 s of the unlock");
    timeout(WAIT, a_stopping)
        .await
        .expect("A shuts down")
        .unwrap()
        .unwrap();
    let ended = timeout(WAIT, log.wait_for_end(0))
        .await
        .expect("A's work ends")
        .end
        .expect("an ended interval has an end");
    let cancellations = timeout_cancellations(&s);
    // Renewals of A's term that committed after the row was locked: they
    // could only run after the unlock, when A had given up.
    let (late, late_expiry): (i64, Option<f64>) = {
        let r = c
            .query_one(
                "SELECT count(*), max(extract(epoch from new_expires))::float8 FROM lease_audit \
                  WHERE id > $1 AND new_term = $2 AND new_nonce IS NOT NULL \
                    AND old_nonce = new_nonce AND new_expires > old_expires",
                &[&audited, &i64::try_from(token).unwrap()],
            )
            .await
            .unwrap();
        (r.get(0), r.get(1))
    };
    let drift = a.config().drift_margin();
    println!(
        "lock: row locked {:?} before A's deadline; A's token fired {:?} after the lock \
         ({:?} after its deadline), its work ended {:?} before the store's expiry; \
         unlocked {:?} after the lock; B began {:?} after the unlock",
        deadline.saturating_duration_since(locked_at),
        fired - locked_at,
        fired.saturating_duration_since(deadline),
        expires.saturating_duration_since(ended),
        unlocked - locked_at,
        next.start.saturating_duration_since(unlocked),
    );
    println!("lock: waiting for the lock when A gave up: {waiting:?}");
    println!("lock: statements cancelled by their timeouts: {cancellations:#?}");
    println!("lock: row right after the unlock: {after:?}");

    // A's renewals hit their server-side timeouts while the row was locked.
    assert!(
        cancellations.iter().any(|l| l.contains("UPDATE")),
        "no renewal was cancelled by lock_timeout/statement_timeout: {cancellations:#?}"
    );
    // The token fired by the deadline, which came before the store's expiry.
    assert!(ended <= deadline + drift / 2, "{:?}", ended - deadline);
    assert!(ended < expires, "{:?}", ended - expires);
    // No renewal took effect after A gave up: the lease was not extended.
    assert_eq!(
        late, 0,
        "{late} renewal(s) of A's term committed after the row was unlocked, extending the \
         lease to {late_expiry:?} (was {expires_epoch})"
    );
    if after.term == token && after.held {
        let now_epoch = after.expires_epoch.unwrap();
        assert!(
            now_epoch <= expires_epoch + 0.01,
            "A's lease was extended by {:.3} s after A gave up",
            now_epoch - expires_epoch
        );
    }
    // B leads next, with a larger token.
    assert_eq!(next.who, "b");
    assert!(next.token > token);
    let final_row = lease_row(&c).await;
    assert!(final_row.term > token, "{final_row:?}");
    stop(&b, tb).await;
    timeout(WAIT, ta).await.unwrap().unwrap().unwrap();
    log.assert_safe();
}

/// The same property as above with the renewal slowed by the network
/// instead of a lock: 400 ms of latency each way on the leader's link, set
/// right after a renewal, so that the next renewal, sent well before the
/// deadline, reaches the server after it.
///
/// This failed before the renewal carried the leader's deadline on the
/// server's clock and went out as one pipeline (BEGIN, timeouts, UPDATE,
/// COMMIT): the timeouts only count from when a statement reaches the
/// server, and the COMMIT was a round trip of its own, so a late COMMIT
/// extended the abandoned lease by most of a ttl.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renewal_slowed_by_the_network_cannot_extend_the_lease_after_the_deadline() {
    const DELAY: Duration = Duration::from_millis(400);
    let s = server().await;
    let proxy = TcpProxy::start(s.addr()).await.unwrap();
    let ttl = Duration::from_secs(2);
    let log = WorkLog::new();
    let a = leader_on(backend(&url_of(proxy.addr())), ttl);
    let b = leader_on(backend(&s.url()), ttl);
    a.setup().await.unwrap();
    let c = connect(&s).await;
    c.batch_execute(AUDIT).await.unwrap();
    let (ta, mut terms) = run_reporting_terms(&a, "a", &log);
    let term = timeout(WAIT, terms.recv()).await.unwrap().unwrap();
    let token = term.fencing_token().get();
    let (tb, _) = run_reporting_terms(&b, "b", &log);
    wait_sees(&b, token).await;

    // Wait for a renewal to commit, let its reply pass the proxy, then slow
    // the link down: the next renewal (sent about ttl/3 after the last one,
    // with a budget of about 1.15 s) takes a round trip for the pool's
    // connection check, then its one pipeline (BEGIN, timeouts, UPDATE,
    // COMMIT) reaches the server 1.2 s after it was sent: after the
    // deadline. (With 175 ms, as when the renewal took three round trips,
    // it now renews in time.)
    let r0 = lease_row(&c).await.revision;
    timeout(WAIT, async {
        while lease_row(&c).await.revision == r0 {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    })
    .await
    .expect("A renews");
    tokio::time::sleep(Duration::from_millis(50)).await;
    proxy.set_delay(DELAY);
    let slowed = Instant::now();

    let gave_up = timeout(ttl, term.cancelled()).await.is_ok();
    let fired = Instant::now();
    // What the store holds when A gives up, and how far the audit went.
    let sent = Instant::now();
    let at_fire = c
        .query_one(
            &row_query(
                ", (SELECT coalesce(max(id), 0) FROM lease_audit), \
                 extract(epoch from clock_timestamp())::float8",
            ),
            &[&KEY],
        )
        .await
        .unwrap();
    let audited: i64 = at_fire.get(5);
    let fired_epoch: f64 = at_fire.get(6);
    let at_fire = lease_row_from(&at_fire, sent);

    let next = timeout(WAIT, log.wait_for_start(2))
        .await
        .expect("B leads within 30 s");
    proxy.set_delay(Duration::ZERO);
    // Renewals of A's term that committed after A's token fired, and when
    // their UPDATE ran (by the server's clock, from the token's firing).
    let (late, late_expiry, late_update): (i64, Option<f64>, Option<f64>) = {
        let r = c
            .query_one(
                "SELECT count(*), max(extract(epoch from new_expires))::float8, \
                        max(extract(epoch from at))::float8 - $3 FROM lease_audit \
                  WHERE id > $1 AND new_term = $2 AND new_nonce IS NOT NULL \
                    AND old_nonce = new_nonce AND new_expires > old_expires",
                &[&audited, &i64::try_from(token).unwrap(), &fired_epoch],
            )
            .await
            .unwrap();
        (r.get(0), r.get(1), r.get(2))
    };
    let expires = at_fire.expires.expect("A's lease has an expiry");
    println!(
        "latency: A's token fired {:?} after the link slowed ({gave_up}); the lease then \
         expired {:?} later by the store's clock; B began {:?} after that expiry",
        fired - slowed,
        expires.saturating_duration_since(fired),
        next.start.saturating_duration_since(expires),
    );
    assert_eq!(next.who, "b");
    assert!(next.token > token);
    stop(&b, tb).await;
    stop(&a, ta).await;
    log.assert_safe();
    if gave_up {
        assert_eq!(
            late,
            0,
            "a renewal of A's term committed after A's token fired (its UPDATE ran {late_update:?} \
             s from the firing, its COMMIT after): it moved the abandoned lease's expiry {:.3} s \
             later (to {late_expiry:?}, from {:?}), and B got in {:?} after the expiry A's last \
             confirmed renewal had set",
            late_expiry.unwrap_or_default() - at_fire.expires_epoch.unwrap_or_default(),
            at_fire.expires_epoch,
            next.start.saturating_duration_since(expires),
        );
    }
}

// ----- 5. the LISTEN connection lost -------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_terminated_listen_session_is_reestablished_and_resign_uses_notify_again() {
    let s = server().await;
    let ttl = Duration::from_secs(10);
    let log = WorkLog::new();
    let a = leader_on(backend(&s.url()), ttl);
    let b = leader_on(backend(&s.url()), ttl);
    let (ta, mut terms) = run_reporting_terms(&a, "a", &log);
    let term = timeout(WAIT, terms.recv()).await.unwrap().unwrap();
    let (tb, _) = run_reporting_terms(&b, "b", &log);
    wait_sees(&b, term.fencing_token().get()).await;

    let old = wait_listen_sessions(&s, 2, &[]).await;
    let c = connect(&s).await;
    let killed: i64 = c
        .query_one(
            "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
              WHERE query LIKE 'LISTEN %' AND pid <> pg_backend_pid()) t",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(killed, 2);
    let t0 = Instant::now();
    let new = wait_listen_sessions(&s, 2, &old).await;
    println!(
        "listen: sessions {old:?} terminated, {new:?} listening {:?} later",
        t0.elapsed()
    );

    // B follows with its LISTEN connection back: A's resign reaches it
    // through NOTIFY, far below the retry interval (2 s) and B's expiry
    // timer (up to 10 s).
    let t0 = Instant::now();
    a.resign().await.unwrap();
    let next = timeout(WAIT, log.wait_for_start(2))
        .await
        .expect("B leads within 30 s of the resign");
    let took = next.start - t0;
    println!("listen: handoff after the LISTEN sessions came back: {took:?}");
    assert_eq!(next.who, "b");
    assert!(took < Duration::from_secs(1), "{took:?}");
    stop(&a, ta).await;
    stop(&b, tb).await;
    log.assert_safe();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn while_listen_is_down_followers_fall_back_to_the_leases_expiry() {
    let s = server().await;
    // The LISTEN connections go through the proxy, the pools do not.
    let proxy = TcpProxy::start(s.addr()).await.unwrap();
    let listen: tokio_postgres::Config = url_of(proxy.addr()).parse().unwrap();
    let ttl = Duration::from_secs(2);
    let make = || {
        leader_on(
            Backend::postgres(
                PostgresBackend::builder()
                    .url(s.url())
                    .listen(listen.clone())
                    .build()
                    .unwrap(),
            ),
            ttl,
        )
    };
    let log = WorkLog::new();
    let a = make();
    let b = make();
    let (ta, mut terms) = run_reporting_terms(&a, "a", &log);
    let term = timeout(WAIT, terms.recv()).await.unwrap().unwrap();
    let (tb, _) = run_reporting_terms(&b, "b", &log);
    wait_sees(&b, term.fencing_token().get()).await;
    wait_listen_sessions(&s, 2, &[]).await;

    // The LISTEN connections are lost and cannot come back.
    proxy.cut();
    wait_listen_sessions(&s, 0, &[]).await;
    // A leaves and releases its lease; nobody hears of it. B wakes at the
    // lease's expiry as it last saw it (at most a ttl away, plus a little
    // jitter): it does not wait for a notification that never comes.
    let t0 = Instant::now();
    stop(&a, ta).await;
    let next = timeout(WAIT, log.wait_for_start(2))
        .await
        .expect("B leads within 30 s of A's leaving");
    let took = next.start - t0;
    println!("listen down: B took over {took:?} after A left (ttl {ttl:?})");
    assert_eq!(next.who, "b");
    assert!(next.token > term.fencing_token().get());
    assert!(took < ttl + Duration::from_secs(1), "{took:?}");

    // The link heals: both LISTEN connections come back (A's backend
    // still exists, and keeps its watch).
    proxy.restore();
    let t0 = Instant::now();
    wait_listen_sessions(&s, 2, &[]).await;
    println!(
        "listen down: LISTEN sessions back {:?} after the link healed",
        t0.elapsed()
    );
    stop(&b, tb).await;
    log.assert_safe();
}

// ----- 6. the server paused ----------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_paused_past_the_ttl_cancels_the_leader_by_its_deadline_then_recovers() {
    let s = server().await;
    let ttl = Duration::from_secs(2);
    let log = WorkLog::new();
    let a = leader_on(backend(&s.url()), ttl);
    let b = leader_on(backend(&s.url()), ttl);
    let (ta, mut terms) = run_reporting_terms(&a, "a", &log);
    let term = timeout(WAIT, terms.recv()).await.unwrap().unwrap();
    let token = term.fencing_token().get();
    let (tb, _) = run_reporting_terms(&b, "b", &log);
    wait_sees(&b, token).await;

    s.pause().unwrap();
    let paused = Instant::now();
    // No renewal can succeed: the token fires by the deadline.
    timeout(WAIT, term.cancelled())
        .await
        .expect("A's token fires while the server is paused");
    let fired = paused.elapsed();
    assert!(!term.is_valid());
    let deadline = term.deadline();
    // Paused for longer than the ttl.
    tokio::time::sleep_until(paused + ttl + Duration::from_secs(1)).await;
    s.resume().unwrap();
    let resumed = Instant::now();

    let next = timeout(WAIT, log.wait_for_start(2))
        .await
        .expect("a new term within 30 s of the resume");
    let ended = timeout(WAIT, log.wait_for_end(0))
        .await
        .expect("A's work ends")
        .end
        .expect("an ended interval has an end");
    let drift = a.config().drift_margin();
    println!(
        "pause: A's token fired {fired:?} into the pause (deadline {:?} into it), its work \
         ended {:?} into it; resumed {:?} into it; {} began a term {:?} into it",
        deadline.saturating_duration_since(paused),
        ended.saturating_duration_since(paused),
        resumed - paused,
        next.who,
        next.start.saturating_duration_since(paused),
    );
    // Renewed at most at the pause: the deadline is less than a ttl into
    // the pause, and the work stopped by it.
    assert!(deadline < paused + ttl, "{:?}", deadline - paused);
    assert!(ended <= deadline + drift / 2, "{:?}", ended - deadline);
    assert!(next.token > token);
    stop(&a, ta).await;
    stop(&b, tb).await;
    log.assert_safe();
}

// ----- 7. every statement bounded on the server --------------------------

/// Every state `l` publishes from now on, the current one first.
fn record_states(l: &Leader) -> (JoinHandle<()>, Arc<Mutex<Vec<State>>>) {
    let mut rx = l.state();
    let seen = Arc::new(Mutex::new(vec![rx.borrow_and_update().clone()]));
    let task = tokio::spawn({
        let seen = seen.clone();
        async move {
            while rx.changed().await.is_ok() {
                let now = rx.borrow_and_update().clone();
                seen.lock().unwrap().push(now);
            }
        }
    });
    (task, seen)
}

/// The SQLSTATE of the server error behind `e`, if any.
fn sqlstate(e: &BackendError) -> Option<String> {
    let source = std::error::Error::source(e)?;
    let pg = source.downcast_ref::<tokio_postgres::Error>()?;
    Some(pg.code()?.code().to_owned())
}

/// The lease row's revision for `key`.
async fn revision_of(c: &Client, key: &str) -> i64 {
    c.query_one(
        "SELECT revision FROM public.leaseholder_leases WHERE key = $1",
        &[&key],
    )
    .await
    .unwrap()
    .get(0)
}

/// Waits until the row of `key` has moved past `revision` (a renewal
/// committed).
async fn wait_renewed_past(c: &Client, key: &str, revision: i64) -> i64 {
    timeout(WAIT, async {
        loop {
            let now = revision_of(c, key).await;
            if now > revision {
                return now;
            }
            tokio::time::sleep(POLL).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("no renewal of {key} past revision {revision} within 30 s"))
}

/// Asserts that every state in `seen` is `Leader` with `token`.
fn assert_led_throughout(seen: &Mutex<Vec<State>>, token: u64) {
    let seen = seen.lock().unwrap();
    assert!(
        seen.iter()
            .all(|s| s.token().map(|t| t.get()) == Some(token)),
        "the leader left its term {token}: {seen:?}"
    );
}

/// A key B's row locked by another session for longer than the ttl: B's
/// candidate waits on the lock, but its acquire is cancelled by the server
/// after a third of the ttl, so on a pool of ONE connection, shared with
/// key A's leader, A's renewals still get the connection in time. Before
/// acquire was bounded on the server, the blocked acquire kept the only
/// connection busy after the campaign had dropped it, and A lost its term.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_lock_held_past_the_ttl_on_one_key_does_not_cost_another_keys_leader_its_term() {
    let s = server().await;
    let ttl = Duration::from_secs(2);
    let shared = Backend::postgres(
        PostgresBackend::builder()
            .url(s.url())
            .pool_size(1)
            .build()
            .unwrap(),
    );
    let on = |key: &str| {
        Leader::builder(key)
            .backend(shared.clone())
            .ttl(ttl)
            .build()
            .unwrap()
    };
    let c = connect(&s).await;
    // B's row exists, free.
    c.execute(
        "INSERT INTO public.leaseholder_leases (key, term, revision) VALUES ('b', 1, 1)",
        &[],
    )
    .await
    .unwrap();
    let (log_a, log_b) = (WorkLog::new(), WorkLog::new());
    let a = on("a");
    let (ta, mut terms) = run_reporting_terms(&a, "a", &log_a);
    let term = timeout(WAIT, terms.recv()).await.unwrap().unwrap();
    let token = term.fencing_token().get();
    let (recorder, seen) = record_states(&a);

    let mut blocker = connect(&s).await;
    let tx = blocker.transaction().await.unwrap();
    tx.query(
        "SELECT * FROM public.leaseholder_leases WHERE key = 'b' FOR UPDATE",
        &[],
    )
    .await
    .unwrap();
    let locked = Instant::now();
    let b = on("b");
    let (recorder_b, seen_b) = record_states(&b);
    let (tb, _) = run_reporting_terms(&b, "b", &log_b);
    let before = revision_of(&c, "a").await;
    // The lock is held for three ttls: the length of the scenario, not a
    // wait for a state.
    tokio::time::sleep(3 * ttl).await;
    let during = revision_of(&c, "a").await;
    let cancellations = timeout_cancellations(&s);
    let b_while_locked = seen_b.lock().unwrap().clone();
    // Taken before the rollback is sent: B's waiting acquire may go
    // through, and B's work start, before the rollback's reply is back.
    let unlocked = Instant::now();
    tx.rollback().await.unwrap();

    timeout(WAIT, b.state().wait_for(State::is_leader))
        .await
        .expect("B leads once the lock is gone")
        .unwrap();
    let b_began = timeout(WAIT, log_b.wait_for_start(1)).await.unwrap().start;
    println!(
        "row lock: held {:?}; A renewed {} times meanwhile; B led {:?} after the unlock; \
         cancelled by the server: {}",
        unlocked - locked,
        during - before,
        b_began.saturating_duration_since(unlocked),
        cancellations.len()
    );
    // B was blocked while the lock was held...
    assert!(b_began > unlocked, "B led while its row was locked");
    assert!(
        !b_while_locked.iter().any(State::is_leader),
        "B led while its row was locked: {b_while_locked:?}"
    );
    // ...because the server cancelled its acquires, not the campaign alone.
    assert!(
        cancellations.iter().any(|l| l.contains("INSERT")),
        "no acquire was cancelled by lock_timeout: {cancellations:#?}"
    );
    // A kept its term throughout, and renewed while B's acquires waited.
    assert!(
        during - before >= 4,
        "A renewed {} times in 3 ttls",
        during - before
    );
    assert!(!term.is_cancelled());
    assert_led_throughout(&seen, token);
    assert_eq!(log_a.intervals().len(), 1);
    recorder.abort();
    recorder_b.abort();
    stop(&a, ta).await;
    stop(&b, tb).await;
    log_a.assert_safe();
    log_b.assert_safe();
}

// ----- 8. SQLSTATEs of a failover, a conflict, a shutdown ----------------

/// Raises `fault.code` from the lease table's writes while the sequence
/// `fault_seq` is at most `fault.times` (a sequence, since a raised error
/// rolls back everything else).
const FAULT: &str = "
CREATE TABLE fault (code text NOT NULL, times bigint NOT NULL);
CREATE SEQUENCE fault_seq;
CREATE FUNCTION fault() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE c text; t bigint;
BEGIN
    SELECT code, times INTO c, t FROM fault;
    -- Nested, so that nextval runs only while a fault is set.
    IF c IS NOT NULL THEN
        IF nextval('fault_seq') <= t THEN
            RAISE EXCEPTION 'injected %', c USING ERRCODE = c;
        END IF;
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER fault BEFORE INSERT OR UPDATE ON public.leaseholder_leases
    FOR EACH ROW EXECUTE FUNCTION fault();
";

/// The SQLSTATEs a real deployment sees from a failover (25006 read-only),
/// a conflict (40001 serialization failure, 40P01 deadlock), a shutdown or
/// restart (57P01, 57P03) and a lost prepared statement (26000).
const TRANSIENT: [&str; 6] = ["25006", "40001", "40P01", "57P01", "57P03", "26000"];

/// Makes the next `times` writes of the lease table fail with `code`.
async fn inject(c: &Client, code: &str, times: i64) {
    c.batch_execute("TRUNCATE fault; SELECT setval('fault_seq', 1, false)")
        .await
        .unwrap();
    c.execute("INSERT INTO fault VALUES ($1, $2)", &[&code, &times])
        .await
        .unwrap();
}

/// Waits until the injected faults have been raised.
async fn wait_injected(c: &Client, times: i64) {
    timeout(WAIT, async {
        loop {
            let row = c
                .query_one("SELECT last_value, is_called FROM fault_seq", &[])
                .await
                .unwrap();
            let (last, called): (i64, bool) = (row.get(0), row.get(1));
            if called && last >= times {
                return;
            }
            tokio::time::sleep(POLL).await;
        }
    })
    .await
    .expect("the injected faults are raised within 30 s");
}

/// Each SQLSTATE, raised by the server on the lease table's writes, is a
/// transient error of acquire, renew and release, and carries its code.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failover_conflict_and_shutdown_sqlstates_are_transient_errors_of_every_write() {
    let s = server().await;
    let c = connect(&s).await;
    c.batch_execute(FAULT).await.unwrap();
    let b = backend(&s.url());
    let key = Key::new("direct").unwrap();
    let ttl = Duration::from_secs(10);
    let claim = Claim::new(LeaderId::new(), Default::default());
    let lease = match b.acquire(&key, &claim, ttl).await.unwrap() {
        Acquired::Won(lease) => lease,
        held => panic!("{held:?}"),
    };
    for code in TRANSIENT {
        inject(&c, code, i64::MAX).await;
        let other = Claim::new(LeaderId::new(), Default::default());
        let errors = [
            (
                "acquire",
                b.acquire(&Key::new("other").unwrap(), &other, ttl)
                    .await
                    .err(),
            ),
            ("renew", b.renew(&key, &lease, ttl).await.err()),
            ("release", b.release(&key, &lease).await.err()),
        ];
        for (op, e) in errors {
            let e = e.unwrap_or_else(|| panic!("{op} succeeded under {code}"));
            assert!(e.is_transient(), "{op} under {code}: {e:?}");
            assert_eq!(sqlstate(&e).as_deref(), Some(code), "{op}: {e:?}");
        }
        // Reads are not writes: the holder is still there.
        let holder = b.holder(&key).await.unwrap().unwrap();
        assert!(holder.is_nonce(lease.nonce()));
    }
    c.batch_execute("TRUNCATE fault").await.unwrap();
    assert!(matches!(
        b.renew(&key, &lease, ttl).await.unwrap(),
        Renewed::Renewed(_)
    ));
}

/// A burst of acquires (1,000 new keys at once, each INSERT held 20 ms by
/// a trigger) on a backend with a pool of two: the leader of another key
/// on the same backend keeps renewing through it and keeps its term, and
/// new keys get their leaders meanwhile. Acquires may wait for, or hold,
/// at most half the pool; without that limit the renewals queued behind
/// the burst (every late acquire still costs a round trip, and its
/// campaign retries) missed their deadline and the term was lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_acquires_does_not_starve_the_renewals_of_a_leader() {
    let s = server().await;
    let c = connect(&s).await;
    let pg = PostgresBackend::builder()
        .url(s.url())
        .pool_size(2)
        .build()
        .unwrap();
    let b = Backend::postgres(pg);
    let ttl = Duration::from_secs(2);
    let held = support::Many::lead(&b, "held", 1, ttl).await;
    let token = held.tokens();
    c.batch_execute(
        "CREATE FUNCTION slow() RETURNS trigger LANGUAGE plpgsql AS $$ \
         BEGIN PERFORM pg_sleep(0.02); RETURN NEW; END $$; \
         CREATE TRIGGER slow BEFORE INSERT ON public.leaseholder_leases \
             FOR EACH ROW EXECUTE FUNCTION slow();",
    )
    .await
    .unwrap();
    let reader = backend(&s.url());
    let r0 = held.revisions(&reader).await;
    let burst = support::Many::start(&b, "burst", 1000, ttl);
    // Five renewals (about 3.3 s) under the burst.
    held.wait_renewed(&reader, &r0, 5).await;
    assert_eq!(
        held.tokens(),
        token,
        "the leader lost its term to the burst"
    );
    assert!(held.leaders[0].state().borrow().is_leader());
    let led = burst.leading();
    println!("{led} of 1000 new keys led during the leader's five renewals");
    assert!(led > 0, "no new key led");
    burst.stop().await;
    held.stop().await;
}

/// 50 keys renewing in shared statements: a batch that the server fails
/// as a whole (a serialization failure on its first row) fails every
/// renewal in it; each of those keys retries alone before its deadline,
/// and every term survives with its token, the keys renewing on (in
/// batches again) after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_of_renewals_failed_by_the_server_costs_no_term() {
    let s = server().await;
    let c = connect(&s).await;
    c.batch_execute(FAULT).await.unwrap();
    let pg = PostgresBackend::builder().url(s.url()).build().unwrap();
    let b = Backend::postgres(pg.clone());
    let many = support::Many::lead(&b, "failed-batch", 50, Duration::from_secs(3)).await;
    let tokens = many.tokens();
    let r0 = many.revisions(&b).await;
    inject(&c, "40001", 1).await;
    wait_injected(&c, 1).await;
    let r1 = many.wait_renewed(&b, &r0, 3).await;
    assert_eq!(many.tokens(), tokens, "a failed batch cost a term");
    for (l, t) in many.leaders.iter().zip(&tokens) {
        assert!(l.state().borrow().is_leader());
        assert_eq!(l.current_term().map(|t| t.fencing_token()), *t);
    }
    // And they batch again: fewer statements than renewals.
    let s1 = pg.renew_statements();
    let r2 = many.wait_renewed(&b, &r1, 3).await;
    let statements = pg.renew_statements() - s1;
    let renewals: u64 = r2.iter().zip(&r1).map(|(b, a)| b - a).sum();
    assert!(
        statements < renewals,
        "{statements} statements for {renewals} renewals after the failure"
    );
    many.stop().await;
}

/// The same SQLSTATEs under a running leader: each fails two renewals in a
/// row; the campaign retries and keeps its term through every one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_keeps_its_term_through_renewals_failing_with_each_transient_sqlstate() {
    let s = server().await;
    let c = connect(&s).await;
    c.batch_execute(FAULT).await.unwrap();
    let ttl = Duration::from_secs(6);
    let log = WorkLog::new();
    let a = leader_on(backend(&s.url()), ttl);
    let (ta, mut terms) = run_reporting_terms(&a, "a", &log);
    let term = timeout(WAIT, terms.recv()).await.unwrap().unwrap();
    let token = term.fencing_token().get();
    let (recorder, seen) = record_states(&a);
    for code in TRANSIENT {
        inject(&c, code, 2).await;
        wait_injected(&c, 2).await;
        let failed_at = revision_of(&c, KEY).await;
        // A renewal after the failures commits: the campaign is alive and
        // still on its term.
        wait_renewed_past(&c, KEY, failed_at).await;
        println!("{code}: two renewals failed; the next one renewed term {token}");
        assert!(!term.is_cancelled(), "{code} cost the term");
    }
    assert!(!ta.is_finished());
    assert_led_throughout(&seen, token);
    recorder.abort();
    stop(&a, ta).await;
    assert_eq!(log.intervals().len(), 1);
    log.assert_safe();
}

/// A failover to a standby, as the application sees it: every new
/// connection is read-only (SQLSTATE 25006 on every write) until the
/// database is writable again. The leader's term ends at its deadline, the
/// campaign reports the store unreachable and keeps trying, and leads again
/// once writes succeed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_only_database_is_transient_and_the_campaign_leads_again_once_it_is_writable() {
    const TERMINATE: &str = "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
                             WHERE datname = current_database() AND pid <> pg_backend_pid() \
                               AND backend_type = 'client backend'";
    let s = server().await;
    let ttl = Duration::from_secs(2);
    let log = WorkLog::new();
    let a = leader_on(backend(&s.url()), ttl);
    let (ta, mut terms) = run_reporting_terms(&a, "a", &log);
    let term = timeout(WAIT, terms.recv()).await.unwrap().unwrap();
    let token = term.fencing_token().get();
    let (recorder, seen) = record_states(&a);
    // This session keeps the default it started with: read-write.
    let c = connect(&s).await;
    c.batch_execute("ALTER DATABASE postgres SET default_transaction_read_only = on")
        .await
        .unwrap();
    c.batch_execute(TERMINATE).await.unwrap();
    let failed_over = Instant::now();

    timeout(WAIT, term.cancelled())
        .await
        .expect("A's term ends while the database is read-only");
    let ended = Instant::now();
    // What the campaign's writes get: 25006, transient.
    let probe = backend(&s.url());
    let claim = Claim::new(LeaderId::new(), Default::default());
    let e = probe
        .acquire(&Key::new("probe").unwrap(), &claim, ttl)
        .await
        .expect_err("a write on a read-only database fails");
    assert!(e.is_transient(), "{e:?}");
    assert_eq!(sqlstate(&e).as_deref(), Some("25006"), "{e:?}");
    // The campaign keeps trying (its acquires fail; its reads show the
    // key free, or the store down).
    let now = a.state().borrow().clone();
    assert!(
        !ta.is_finished(),
        "the campaign stopped on a read-only store"
    );
    assert!(!now.is_stopped() && !now.is_leader(), "{now:?}");
    recorder.abort();
    println!(
        "read-only: A's token fired {:?} after the failover; A then: {now:?}; {} states \
         published while read-only",
        ended.saturating_duration_since(failed_over),
        seen.lock().unwrap().len()
    );

    c.batch_execute("ALTER DATABASE postgres SET default_transaction_read_only = off")
        .await
        .unwrap();
    c.batch_execute(TERMINATE).await.unwrap();
    let writable = Instant::now();
    let next = timeout(WAIT, log.wait_for_start(2))
        .await
        .expect("A leads again within 30 s of the database being writable");
    println!(
        "read-only: A led again {:?} after the database was writable",
        next.start - writable
    );
    assert_eq!(next.who, "a");
    assert!(next.token > token);
    stop(&a, ta).await;
    log.assert_safe();
}

/// 57P01 for real: the server terminates the pool's session while its
/// acquire waits on a row lock; the error carries the code and is
/// transient, and the backend's next call works on a new connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_terminated_session_is_a_transient_error_and_the_next_call_reconnects() {
    let s = server().await;
    let c = connect(&s).await;
    c.execute(
        "INSERT INTO public.leaseholder_leases (key, term, revision) VALUES ('locked', 1, 1)",
        &[],
    )
    .await
    .unwrap();
    let b = Backend::postgres(
        PostgresBackend::builder()
            .url(s.url())
            .pool_size(1)
            .statement_timeout(Duration::from_secs(20))
            .build()
            .unwrap(),
    );
    let key = Key::new("locked").unwrap();
    let ttl = Duration::from_secs(60);
    let mut blocker = connect(&s).await;
    let tx = blocker.transaction().await.unwrap();
    tx.query(
        "SELECT * FROM public.leaseholder_leases WHERE key = 'locked' FOR UPDATE",
        &[],
    )
    .await
    .unwrap();
    let acquiring = tokio::spawn({
        let (b, key) = (b.clone(), key.clone());
        async move {
            let claim = Claim::new(LeaderId::new(), Default::default());
            b.acquire(&key, &claim, ttl).await
        }
    });
    // The acquire waits on the lock; terminate its session.
    let pid: i32 = timeout(WAIT, async {
        loop {
            if let Some(row) = c
                .query_opt(
                    "SELECT pid FROM pg_stat_activity WHERE wait_event_type = 'Lock' \
                       AND query LIKE '%INSERT INTO%'",
                    &[],
                )
                .await
                .unwrap()
            {
                return row.get(0);
            }
            tokio::time::sleep(POLL).await;
        }
    })
    .await
    .expect("the acquire waits on the lock");
    c.execute("SELECT pg_terminate_backend($1)", &[&pid])
        .await
        .unwrap();
    let e = timeout(WAIT, acquiring)
        .await
        .unwrap()
        .unwrap()
        .expect_err("the terminated acquire fails");
    println!("terminated: {e:?}");
    assert!(e.is_transient(), "{e:?}");
    assert_eq!(sqlstate(&e).as_deref(), Some("57P01"), "{e:?}");
    tx.rollback().await.unwrap();
    let claim = Claim::new(LeaderId::new(), Default::default());
    assert!(matches!(
        b.acquire(&key, &claim, ttl).await.unwrap(),
        Acquired::Won(_)
    ));
}

/// 26000 for real: the application runs `DEALLOCATE ALL` on the pool it
/// shares with the backend (as a pooler or a server restart would lose the
/// prepared statements). The leader keeps renewing: the backend prepares no
/// statement that could be lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deallocate_all_on_a_shared_pool_does_not_disturb_the_leader() {
    let s = server().await;
    let config: tokio_postgres::Config = s.url().parse().unwrap();
    let pool =
        deadpool_postgres::Pool::builder(deadpool_postgres::Manager::new(config.clone(), NoTls))
            .max_size(1)
            .build()
            .unwrap();
    let ttl = Duration::from_secs(2);
    let log = WorkLog::new();
    let a = leader_on(
        Backend::postgres(
            PostgresBackend::builder()
                .pool(pool.clone())
                .listen(config)
                .build()
                .unwrap(),
        ),
        ttl,
    );
    let (ta, mut terms) = run_reporting_terms(&a, "a", &log);
    let term = timeout(WAIT, terms.recv()).await.unwrap().unwrap();
    let token = term.fencing_token().get();
    let (recorder, seen) = record_states(&a);
    let c = connect(&s).await;
    for _ in 0..3 {
        {
            let own = timeout(WAIT, pool.get()).await.unwrap().unwrap();
            // The application's own prepared statement, then all dropped.
            own.prepare_cached("SELECT 1").await.unwrap();
            own.batch_execute("DEALLOCATE ALL").await.unwrap();
        }
        let r = revision_of(&c, KEY).await;
        wait_renewed_past(&c, KEY, r).await;
    }
    assert!(!term.is_cancelled());
    assert_led_throughout(&seen, token);
    recorder.abort();
    stop(&a, ta).await;
    log.assert_safe();
}

/// 25P02 for real: the application hands a connection of the pool it
/// shares with the backend back inside a failed transaction (the same
/// state a COMMIT cancelled by its statement timeout leaves). The backend's
/// next call on it fails with "current transaction is aborted": a
/// transient error of the session (the call's own COMMIT ends that
/// transaction), never a fatal one that stops the campaign. The leader
/// keeps its term through it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_left_in_a_failed_transaction_costs_one_call_not_the_campaign() {
    let s = server().await;
    let config: tokio_postgres::Config = s.url().parse().unwrap();
    let pool =
        deadpool_postgres::Pool::builder(deadpool_postgres::Manager::new(config.clone(), NoTls))
            .max_size(1)
            .build()
            .unwrap();
    let ttl = Duration::from_secs(2);
    let log = WorkLog::new();
    let a = leader_on(
        Backend::postgres(
            PostgresBackend::builder()
                .pool(pool.clone())
                .listen(config)
                .build()
                .unwrap(),
        ),
        ttl,
    );
    let (ta, mut terms) = run_reporting_terms(&a, "a", &log);
    let term = timeout(WAIT, terms.recv()).await.unwrap().unwrap();
    let token = term.fencing_token().get();
    let (recorder, seen) = record_states(&a);
    let c = connect(&s).await;
    for _ in 0..3 {
        {
            let own = timeout(WAIT, pool.get()).await.unwrap().unwrap();
            own.batch_execute("BEGIN").await.unwrap();
            let e = own.batch_execute("SELECT 1/0").await.unwrap_err();
            assert_eq!(
                e.code(),
                Some(&tokio_postgres::error::SqlState::DIVISION_BY_ZERO)
            );
            // Back to the pool, inside the failed transaction.
        }
        let r = revision_of(&c, KEY).await;
        wait_renewed_past(&c, KEY, r).await;
    }
    assert!(!term.is_cancelled(), "the leader lost its term");
    assert_led_throughout(&seen, token);
    recorder.abort();
    stop(&a, ta).await;
    log.assert_safe();
}

// ----- 9. the table dropped ----------------------------------------------

/// On a dropped table (42P01) a renewal reports `Lost` and a release has
/// nothing to do, while acquire and holder say the table is gone. A
/// campaign's term ends at its next renewal (not at its deadline), and the
/// campaign stops with `Misconfigured` from its next acquire.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_table_ends_the_term_at_once_and_the_campaign_stops_misconfigured() {
    let s = server().await;
    let c = connect(&s).await;
    let b = backend(&s.url());
    let key = Key::new("direct").unwrap();
    let ttl = Duration::from_secs(10);
    let claim = Claim::new(LeaderId::new(), Default::default());
    let Acquired::Won(lease) = b.acquire(&key, &claim, ttl).await.unwrap() else {
        panic!("the key is free");
    };
    c.batch_execute("DROP TABLE public.leaseholder_leases")
        .await
        .unwrap();
    assert_eq!(b.renew(&key, &lease, ttl).await.unwrap(), Renewed::Lost);
    b.release(&key, &lease).await.unwrap();
    for e in [
        b.holder(&key).await.unwrap_err(),
        b.acquire(&key, &claim, ttl).await.unwrap_err(),
    ] {
        match &e {
            BackendError::Misconfigured { problem, fix } => {
                assert!(problem.contains("does not exist"), "{problem}");
                assert!(fix.contains("setup") && fix.contains("ddl()"), "{fix}");
            }
            other => panic!("{other:?}"),
        }
    }

    // The same under a campaign.
    backend(&s.url()).setup().await.unwrap();
    let ttl = Duration::from_secs(3);
    let log = WorkLog::new();
    let a = leader_on(backend(&s.url()), ttl);
    let (ta, mut terms) = run_reporting_terms(&a, "a", &log);
    let term = timeout(WAIT, terms.recv()).await.unwrap().unwrap();
    let deadline = term.deadline();
    c.batch_execute("DROP TABLE public.leaseholder_leases")
        .await
        .unwrap();
    let dropped = Instant::now();
    let result = timeout(WAIT, ta).await.unwrap().unwrap();
    let ended = log.intervals()[0].end.unwrap();
    println!(
        "dropped: A's work ended {:?} after the drop ({:?} before its deadline): {result:?}",
        ended.saturating_duration_since(dropped),
        deadline.saturating_duration_since(ended)
    );
    // Ended by the next renewal, at most a renew interval (plus jitter)
    // after the drop.
    let renew = a.config().renew_interval();
    assert!(ended < dropped + renew + renew / 5 + Duration::from_millis(500));
    // The renewal said Lost; the acquire after it said why the campaign
    // stops.
    match result {
        Err(Error::Backend { op, source, .. }) => {
            assert_eq!(op, Op::Acquire);
            assert!(
                matches!(&*source, BackendError::Misconfigured { problem, .. }
                    if problem.contains("does not exist")),
                "{source:?}"
            );
        }
        other => panic!("{other:?}"),
    }
    log.assert_safe();
}

/// The table dropped under a running leader, and a new candidate started
/// on a fresh `Backend`: its setup re-creates the table and reports
/// `Created`, so it waits one ttl before its first acquire; the old leader
/// loses its term at its next renewal. No two terms overlap and the new
/// leader's token is larger.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_dropped_under_a_leader_and_created_again_costs_one_ttl_and_issues_a_larger_token()
{
    let s = server().await;
    let ttl = Duration::from_secs(2);
    let log = WorkLog::new();
    let a = leader_on(backend(&s.url()), ttl);
    let (ta, mut terms) = run_reporting_terms(&a, "a", &log);
    let term = timeout(WAIT, terms.recv()).await.unwrap().unwrap();
    let token = term.fencing_token().get();

    let c = connect(&s).await;
    c.batch_execute("DROP TABLE public.leaseholder_leases")
        .await
        .unwrap();
    let fresh = backend(&s.url());
    assert_eq!(fresh.setup().await.unwrap(), Prepared::Created);
    let created = Instant::now();
    let b = leader_on(fresh, ttl);
    let (tb, _) = run_reporting_terms(&b, "b", &log);

    // A's term ends at its next renewal; A then stops (the table was
    // missing at its acquire) or campaigns on the new table: either way it
    // leaves now, so that B can lead.
    timeout(WAIT, term.cancelled())
        .await
        .expect("A's term ends");
    let a_ended = Instant::now();
    // Stopped by the missing table, or shut down here.
    let fine = |r: Result<(), Error>| match r {
        Ok(()) | Err(Error::Shutdown { .. }) => {}
        Err(Error::Backend { op, source, .. }) => {
            assert_eq!(op, Op::Acquire);
            assert!(
                matches!(*source, BackendError::Misconfigured { .. }),
                "{source:?}"
            );
        }
        Err(e) => panic!("{e:?}"),
    };
    fine(timeout(WAIT, a.shutdown()).await.unwrap());
    fine(timeout(WAIT, ta).await.unwrap().unwrap());
    timeout(WAIT, b.state().wait_for(State::is_leader))
        .await
        .expect("B leads")
        .unwrap();
    // B's work starts just after its state says it leads.
    let b_term = timeout(WAIT, async {
        loop {
            let all = log.intervals();
            if let Some(b) = all.iter().find(|i| i.who == "b") {
                return b.clone();
            }
            log.wait_for_start(all.len() + 1).await;
        }
    })
    .await
    .expect("B's work starts");
    println!(
        "re-created: A's term ended {:?} after the re-creation; B led {:?} after it \
         (token {token} -> {})",
        a_ended.saturating_duration_since(created),
        b_term.start - created,
        b_term.token
    );
    assert!(
        b_term.start >= created + ttl,
        "B acquired {:?} after creating the table, within one ttl",
        b_term.start - created
    );
    assert!(b_term.token > token);
    stop(&b, tb).await;
    log.assert_safe();
}
