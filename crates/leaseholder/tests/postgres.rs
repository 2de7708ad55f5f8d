//! The `Leader` on a real PostgreSQL server: handoff through LISTEN/NOTIFY,
//! hostile key names, table setup (concurrent, or left to a DBA), tokens
//! across a re-created table, a user's own pool, and 1,000 keys on one
//! LISTEN connection.
#![cfg(feature = "postgres")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::{Arc, Mutex};
use std::time::Duration;

use leaseholder::{
    Backend, BackendError, Error, Leader, Observed, Observer, PostgresBackend, Prepared, State,
};
use leaseholder_testkit::{PostgresServer, WorkLog};
use tokio::time::{Instant, timeout};

mod support;

const WAIT: Duration = Duration::from_secs(30);

/// A fresh server without the lease table.
async fn fresh_server() -> PostgresServer {
    PostgresServer::start()
        .await
        .expect("PostgreSQL 15+ is needed: run scripts/setup")
}

/// A fresh server with the lease table created, so that the candidates'
/// setups find it (`Prepared::Existing`) and acquire at once, rather than
/// wait one ttl as after creating it.
async fn server() -> PostgresServer {
    let s = fresh_server().await;
    timeout(WAIT, backend(&s.url()).setup())
        .await
        .expect("setup within 30 s")
        .unwrap();
    s
}

fn backend(url: &str) -> Backend {
    Backend::postgres(PostgresBackend::builder().url(url).build().unwrap())
}

fn leader_on(backend: &Backend, key: &str, ttl: Duration) -> Leader {
    Leader::builder(key)
        .backend(backend.clone())
        .ttl(ttl)
        .build()
        .unwrap()
}

/// Runs `acquire_and_run` on `l` with work that records its interval in
/// `log` as `who` and waits for its token.
fn run(l: &Leader, who: &str, log: &WorkLog) -> tokio::task::JoinHandle<Result<(), Error>> {
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

async fn wait_campaigning(l: &Leader) {
    timeout(
        WAIT,
        l.state().wait_for(|s| {
            s.is_leader()
                || matches!(
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
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resign_hands_over_through_notify() {
    let s = server().await;
    let ttl = Duration::from_secs(10);
    let log = WorkLog::new();
    // Each candidate with its own backend (pool and LISTEN connection), as
    // separate processes would have.
    let mut fleet: Vec<(Leader, _)> = Vec::new();
    for i in 0..3 {
        let l = leader_on(&backend(&s.url()), "scheduler", ttl);
        let task = run(&l, &format!("c{i}"), &log);
        fleet.push((l, task));
    }
    let mut took = Vec::new();
    for round in 0..5 {
        for (l, _) in &fleet {
            wait_campaigning(l).await;
        }
        let i = fleet
            .iter()
            .position(|(l, _)| l.state().borrow().is_leader())
            .unwrap();
        let terms = log.intervals().len();
        let t0 = Instant::now();
        fleet[i].0.resign().await.unwrap();
        let next = timeout(WAIT, log.wait_for_start(terms + 1)).await.unwrap();
        took.push(next.start - t0);
        let (l, task) = fleet.swap_remove(i);
        l.shutdown().await.unwrap();
        task.await.unwrap().unwrap();
        let l = leader_on(&backend(&s.url()), "scheduler", ttl);
        let task = run(&l, &format!("c{}", round + 3), &log);
        fleet.push((l, task));
    }
    for (l, task) in fleet {
        l.shutdown().await.unwrap();
        task.await.unwrap().unwrap();
    }
    log.assert_safe();
    let mut sorted = took.clone();
    sorted.sort();
    println!(
        "graceful handoff on PostgreSQL (resign -> successor's work starts), ttl 10 s, {} runs: \
         median {:?}, max {:?}; all {took:?}",
        took.len(),
        sorted[sorted.len() / 2],
        sorted[sorted.len() - 1]
    );
    // Through NOTIFY: far below the 2 s retry interval.
    assert!(sorted[sorted.len() - 1] < ttl / 5, "{took:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_key_names_are_stored_as_plain_values() {
    let s = server().await;
    let b = backend(&s.url());
    let ttl = Duration::from_secs(5);
    let keys = [
        "'; DROP TABLE leaseholder_leases; --",
        "\"public\".\"leaseholder_leases\"",
        "back\\slash and 'quotes' and $1 and %s",
        "ünïcödé/キー/🔑",
        "a key with spaces; SELECT pg_sleep(10)",
    ];
    for key in keys {
        let l = leader_on(&b, key, ttl);
        let task = tokio::spawn({
            let l = l.clone();
            async move { l.start(Default::default()).await }
        });
        timeout(WAIT, l.state().wait_for(State::is_leader))
            .await
            .unwrap()
            .unwrap();
        let holder = l.current_leader().await.unwrap().unwrap();
        assert_eq!(holder.id(), Some(l.leader_id()), "{key}");
        l.shutdown().await.unwrap();
        task.await.unwrap().unwrap();
    }
    // The table is intact and holds exactly these keys, byte for byte.
    let client = s.connect().await.unwrap();
    let rows = client
        .query(
            "SELECT key FROM public.leaseholder_leases ORDER BY key",
            &[],
        )
        .await
        .unwrap();
    let mut stored: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
    let mut want: Vec<String> = keys.iter().map(|k| (*k).to_owned()).collect();
    stored.sort();
    want.sort();
    assert_eq!(stored, want);
}

#[tokio::test]
async fn hostile_table_and_schema_names_are_rejected_at_build_time() {
    for (schema, table) in [
        ("public", "leases; DROP TABLE x"),
        ("public", "lea\"ses"),
        ("pub lic", "leases"),
        ("public", ""),
        ("public", "1leases"),
    ] {
        let err = PostgresBackend::builder()
            .url("postgres://postgres@127.0.0.1:1/postgres")
            .schema(schema)
            .table(table)
            .build()
            .unwrap_err();
        let text = err.to_string();
        assert!(text.contains("name"), "{text}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_candidates_setting_up_at_once_all_succeed() {
    let s = server().await;
    let mut tasks = Vec::new();
    for _ in 0..16 {
        let pg = PostgresBackend::builder()
            .url(s.url())
            .schema("fresh")
            .table("leases")
            .pool_size(1)
            .build()
            .unwrap();
        tasks.push(tokio::spawn(
            async move { Backend::postgres(pg).setup().await },
        ));
    }
    for task in tasks {
        timeout(WAIT, task).await.unwrap().unwrap().unwrap();
    }
    let client = s.connect().await.unwrap();
    let n: i64 = client
        .query_one(
            "SELECT count(*) FROM information_schema.tables \
             WHERE table_schema = 'fresh' AND table_name = 'leases'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_auto_creation_a_missing_table_is_a_typed_error_until_the_ddl_runs() {
    let s = server().await;
    let pg = PostgresBackend::builder()
        .url(s.url())
        .schema("ops")
        .table("leases")
        .create_table(false)
        .build()
        .unwrap();
    let ddl = pg.ddl();
    // Both tables: the leases and the candidate registry's, beside them.
    assert!(
        ddl.contains(r#"CREATE TABLE IF NOT EXISTS "ops"."leases" ("#),
        "{ddl}"
    );
    assert!(
        ddl.contains(r#"CREATE TABLE IF NOT EXISTS "ops"."leases_candidates" ("#),
        "{ddl}"
    );
    let b = Backend::postgres(pg);
    match b.setup().await.unwrap_err() {
        BackendError::Misconfigured { problem, fix } => {
            assert!(
                problem.contains("\"ops\".\"leases\" does not exist"),
                "{problem}"
            );
            assert!(fix.contains("ddl()"), "{fix}");
        }
        other => panic!("{other:?}"),
    }
    // A campaign reports the same, and stops.
    let l = leader_on(&b, "job", Duration::from_secs(5));
    let err = timeout(WAIT, l.start(Default::default()))
        .await
        .unwrap()
        .unwrap_err();
    match &err {
        Error::Backend { source, .. } => {
            assert!(
                matches!(**source, BackendError::Misconfigured { .. }),
                "{source}"
            );
            assert!(source.to_string().contains("does not exist"), "{source}");
        }
        other => panic!("{other}"),
    }
    // The DBA runs the exported DDL; setup then passes.
    s.connect()
        .await
        .unwrap()
        .batch_execute(&ddl)
        .await
        .unwrap();
    b.setup().await.unwrap();
    let n: i64 = s
        .connect()
        .await
        .unwrap()
        .query_one(
            "SELECT count(*) FROM information_schema.tables \
             WHERE table_schema = 'ops' AND table_name = 'leases_candidates'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 1, "the DDL creates the candidates table");
    // A table with the wrong shape is refused with what to change.
    let client = s.connect().await.unwrap();
    client
        .batch_execute("CREATE TABLE public.wrong (key text PRIMARY KEY, term int)")
        .await
        .unwrap();
    let wrong = Backend::postgres(
        PostgresBackend::builder()
            .url(s.url())
            .table("wrong")
            .build()
            .unwrap(),
    );
    match wrong.setup().await.unwrap_err() {
        BackendError::Misconfigured { problem, .. } => {
            assert!(problem.contains("column term of type bigint"), "{problem}")
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_keep_increasing_when_the_table_is_dropped_and_created_again() {
    let s = server().await;
    // Each re-creation costs a ttl before the first acquire.
    let ttl = Duration::from_secs(3);
    let mut tokens = Vec::new();
    for _ in 0..3 {
        // A new backend each time, so setup runs again.
        let l = leader_on(&backend(&s.url()), "scheduler", ttl);
        let task = tokio::spawn({
            let l = l.clone();
            async move { l.start(Default::default()).await }
        });
        timeout(WAIT, l.state().wait_for(State::is_leader))
            .await
            .unwrap()
            .unwrap();
        tokens.push(l.fencing_token().unwrap());
        l.shutdown().await.unwrap();
        task.await.unwrap().unwrap();
        s.connect()
            .await
            .unwrap()
            .batch_execute("DROP TABLE public.leaseholder_leases")
            .await
            .unwrap();
    }
    println!("tokens across re-created tables: {tokens:?}");
    assert!(tokens.windows(2).all(|w| w[0] < w[1]), "{tokens:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_users_own_pool_with_a_listen_config_hands_over_through_notify() {
    let s = server().await;
    let config: tokio_postgres::Config = s.url().parse().unwrap();
    let make = || {
        let manager = deadpool_postgres::Manager::new(config.clone(), tokio_postgres::NoTls);
        let pool = deadpool_postgres::Pool::builder(manager)
            .max_size(2)
            .build()
            .unwrap();
        Backend::postgres(
            PostgresBackend::builder()
                .pool(pool)
                .listen(config.clone())
                .build()
                .unwrap(),
        )
    };
    let ttl = Duration::from_secs(10);
    let log = WorkLog::new();
    let a = leader_on(&make(), "pooled", ttl);
    let b = leader_on(&make(), "pooled", ttl);
    let ta = run(&a, "a", &log);
    timeout(WAIT, a.state().wait_for(State::is_leader))
        .await
        .unwrap()
        .unwrap();
    let tb = run(&b, "b", &log);
    wait_campaigning(&b).await;
    let t0 = Instant::now();
    a.resign().await.unwrap();
    let next = timeout(WAIT, log.wait_for_start(2)).await.unwrap();
    assert_eq!(next.who, "b");
    println!("handoff with a user's pool: {:?}", next.start - t0);
    assert!(next.start - t0 < ttl / 5);
    a.shutdown().await.unwrap();
    b.shutdown().await.unwrap();
    ta.await.unwrap().unwrap();
    tb.await.unwrap().unwrap();
    log.assert_safe();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_keys_share_one_listen_connection() {
    let s = server().await;
    // A ttl so long that a follower's retry (a fifth of it: two minutes)
    // never comes within WAIT: a handover seen within WAIT came through
    // NOTIFY.
    let ttl = Duration::from_secs(600);
    const KEYS: usize = 1000;
    let owners = backend(&s.url());
    let heirs = backend(&s.url());
    let keys: Vec<String> = (0..KEYS).map(|i| format!("job-{i:04}")).collect();
    let first: Vec<Leader> = keys.iter().map(|k| leader_on(&owners, k, ttl)).collect();
    let t0 = Instant::now();
    let tasks: Vec<_> = first
        .iter()
        .map(|l| {
            let l = l.clone();
            tokio::spawn(async move { l.start(Default::default()).await })
        })
        .collect();
    for l in &first {
        timeout(WAIT, l.state().wait_for(State::is_leader))
            .await
            .unwrap()
            .unwrap();
    }
    println!("{KEYS} keys led after {:?}", t0.elapsed());
    let second: Vec<Leader> = keys.iter().map(|k| leader_on(&heirs, k, ttl)).collect();
    let heir_tasks: Vec<_> = second
        .iter()
        .map(|l| {
            let l = l.clone();
            tokio::spawn(async move { l.start(Default::default()).await })
        })
        .collect();
    for l in &second {
        wait_campaigning(l).await;
    }
    // One LISTEN connection per backend, not one per key.
    let client = s.connect().await.unwrap();
    let listening: i64 = client
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE query LIKE 'LISTEN %'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(listening, 2, "one per backend");
    let connections: i64 = client
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    println!("client connections for 2 x {KEYS} candidates (and this one): {connections}");
    assert!(connections <= 2 * 5 + 1, "{connections}");
    // Every owner resigns: every heir takes over through NOTIFY, all of
    // them within WAIT, long before the first retry (ttl / 5).
    assert!(WAIT < ttl / 5);
    let t0 = Instant::now();
    for l in &first {
        l.shutdown().await.unwrap();
    }
    timeout(WAIT, async {
        for l in &second {
            l.state().wait_for(State::is_leader).await.unwrap();
        }
    })
    .await
    .expect("every heir took over through NOTIFY, before any retry");
    println!("{KEYS} keys handed over in {:?}", t0.elapsed());
    for l in &second {
        l.shutdown().await.unwrap();
    }
    for task in tasks.into_iter().chain(heir_tasks) {
        task.await.unwrap().unwrap();
    }
}

/// 200 keys on one backend renew in shared statements: over three renew
/// intervals the backend sends at most half as many renewal statements as
/// the store saw renewals (each renewal moves its row's revision by one),
/// and every term survives with its token; with batching off, one
/// statement per renewal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_keys_on_one_backend_renew_in_shared_statements() {
    let s = server().await;
    let ttl = Duration::from_secs(3);
    for batched in [true, false] {
        let pg = PostgresBackend::builder()
            .url(s.url())
            .batch_renewals(batched)
            .build()
            .unwrap();
        let owners = Backend::postgres(pg.clone());
        let many = support::Many::lead(&owners, &format!("batch-{batched}"), 200, ttl).await;
        let tokens = many.tokens();
        let r0 = many.revisions(&owners).await;
        let s0 = pg.renew_statements();
        let r1 = many.wait_renewed(&owners, &r0, 3).await;
        let statements = pg.renew_statements() - s0;
        let renewals: u64 = r1.iter().zip(&r0).map(|(b, a)| b - a).sum();
        println!("batched {batched}: {renewals} renewals in {statements} statements");
        if batched {
            assert!(
                statements * 2 <= renewals,
                "{statements} statements for {renewals} renewals"
            );
        } else {
            // Read at slightly different instants: a renewal in flight
            // at either end may be counted on one side only.
            assert!(
                statements + 200 >= renewals && renewals + 200 >= statements,
                "{statements} statements for {renewals} renewals"
            );
        }
        assert_eq!(many.tokens(), tokens, "no term was lost");
        many.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn setup_reports_created_the_first_time_and_existing_after() {
    let s = fresh_server().await;
    let first = backend(&s.url());
    assert_eq!(first.setup().await.unwrap(), Prepared::Created);
    // The same Backend reports what its first setup found.
    assert_eq!(first.setup().await.unwrap(), Prepared::Created);
    // A new Backend finds the table.
    assert_eq!(backend(&s.url()).setup().await.unwrap(), Prepared::Existing);
    let dba = Backend::postgres(
        PostgresBackend::builder()
            .url(s.url())
            .create_table(false)
            .build()
            .unwrap(),
    );
    assert_eq!(dba.setup().await.unwrap(), Prepared::Existing);
    // Dropped, it is created again, and said so.
    s.connect()
        .await
        .unwrap()
        .batch_execute("DROP TABLE public.leaseholder_leases")
        .await
        .unwrap();
    assert_eq!(backend(&s.url()).setup().await.unwrap(), Prepared::Created);
}

/// Every value `rx` takes from now on, the current one first.
fn record<T: Clone + Send + Sync + 'static>(
    mut rx: tokio::sync::watch::Receiver<T>,
) -> (tokio::task::JoinHandle<()>, Arc<Mutex<Vec<T>>>) {
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

/// A PostgreSQL follower polls (the watch reports no expiry): each poll
/// reads the same leader again, with a new revision and expiry hint. Its
/// `state()` must change once for the term, not once per poll.
///
/// Fails until the core stops re-publishing an unchanged leader (being
/// fixed on main).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_polling_follower_publishes_a_steady_leader_once() {
    let s = server().await;
    let ttl = Duration::from_secs(1);
    let a = leader_on(&backend(&s.url()), "steady", ttl);
    let ta = tokio::spawn({
        let a = a.clone();
        async move { a.start(Default::default()).await }
    });
    let token = timeout(WAIT, a.state().wait_for(State::is_leader))
        .await
        .unwrap()
        .unwrap()
        .token()
        .unwrap();
    let b = leader_on(&backend(&s.url()), "steady", ttl);
    let (recorder, seen) = record(b.state());
    let tb = tokio::spawn({
        let b = b.clone();
        async move { b.start(Default::default()).await }
    });
    timeout(
        WAIT,
        b.state().wait_for(
            |s| matches!(s, State::Follower { leader: Some(h), .. } if h.token() == Some(token)),
        ),
    )
    .await
    .unwrap()
    .unwrap();
    // Three ttls of a steady leader: the length of the observation.
    tokio::time::sleep(3 * ttl).await;
    assert_eq!(a.fencing_token(), Some(token), "the leader changed");
    recorder.abort();
    let seen = seen.lock().unwrap().clone();
    let of_term = seen
        .iter()
        .filter(
            |s| matches!(s, State::Follower { leader: Some(h), .. } if h.token() == Some(token)),
        )
        .count();
    println!(
        "follower: {} state changes over 3 ttls, {of_term} for the leader's term: {seen:?}",
        seen.len()
    );
    assert_eq!(of_term, 1, "the same leader was published {of_term} times");
    // Before it: only the states of starting up.
    assert!(
        seen.iter()
            .take_while(|s| !matches!(
                s,
                State::Follower {
                    leader: Some(_),
                    ..
                }
            ))
            .all(|s| matches!(s, State::Idle | State::Follower { leader: None, .. })),
        "{seen:?}"
    );
    a.shutdown().await.unwrap();
    b.shutdown().await.unwrap();
    ta.await.unwrap().unwrap();
    tb.await.unwrap().unwrap();
}

/// An observer over several handoffs: it publishes each term once, and the
/// terms' tokens strictly increase.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_observer_publishes_each_term_once_with_increasing_tokens() {
    let s = server().await;
    let ttl = Duration::from_secs(2);
    let log = WorkLog::new();
    let observer = Observer::new("observed", backend(&s.url()), ttl).unwrap();
    let (recorder, seen) = record(observer.watch());
    let mut fleet: Vec<(Leader, _)> = Vec::new();
    for i in 0..3 {
        let l = leader_on(&backend(&s.url()), "observed", ttl);
        let task = run(&l, &format!("c{i}"), &log);
        fleet.push((l, task));
    }
    let mut tokens = Vec::new();
    for _ in 0..4 {
        for (l, _) in &fleet {
            wait_campaigning(l).await;
        }
        let (leader, _) = fleet
            .iter()
            .find(|(l, _)| l.state().borrow().is_leader())
            .unwrap();
        let token = leader.fencing_token().unwrap();
        // The observer has seen this term before it ends.
        timeout(
            WAIT,
            observer
                .watch()
                .wait_for(|o| o.holder().and_then(|h| h.token()) == Some(token)),
        )
        .await
        .unwrap()
        .unwrap();
        tokens.push(token);
        let terms = log.intervals().len();
        leader.resign().await.unwrap();
        timeout(WAIT, log.wait_for_start(terms + 1)).await.unwrap();
    }
    recorder.abort();
    for (l, task) in fleet {
        l.shutdown().await.unwrap();
        task.await.unwrap().unwrap();
    }
    log.assert_safe();
    let seen = seen.lock().unwrap().clone();
    let held: Vec<_> = seen
        .iter()
        .filter_map(|o| o.holder().and_then(|h| h.token()))
        .collect();
    println!("observer: {} values, held tokens {held:?}", seen.len());
    assert!(
        held.windows(2).all(|w| w[0] < w[1]),
        "a term was published twice or out of order: {seen:?}"
    );
    for t in &tokens {
        assert_eq!(held.iter().filter(|h| *h == t).count(), 1, "{t}: {seen:?}");
    }
    // Nothing but who holds the key, or that nobody does, in between.
    assert!(
        seen.iter().skip(1).all(|o| *o != Observed::Unknown),
        "{seen:?}"
    );
}
