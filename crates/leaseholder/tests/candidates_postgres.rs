//! The candidate registry on a real PostgreSQL server: priorities,
//! preemption, `resign_to` and equal priorities (the scenarios of
//! `registry/mod.rs`), and what the PostgreSQL backend adds: notifications
//! only when a key's registry changes (never for a renewal), and a
//! deployment that has only the lease table.
#![cfg(feature = "postgres")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod registry;

use std::time::Duration;

use leaseholder::{
    Acquired, Backend, BackendError, Candidate, Claim, Key, LeaderId, PostgresBackend, Prepared,
    WatchEvent,
};
use leaseholder_testkit::{PostgresServer, WorkLog};
use registry::{Store, TTL, next_candidates_event};
use tokio::time::timeout;

struct Postgres {
    url: String,
    /// `None` in a child process: the parent runs the server.
    server: Option<PostgresServer>,
}

impl Store for Postgres {
    async fn backend(&self) -> Backend {
        Backend::postgres(
            PostgresBackend::builder()
                .url(self.url.as_str())
                .pool_size(2)
                .build()
                .unwrap(),
        )
    }

    fn child(&self) -> tokio::process::Command {
        registry::child_command(&self.url)
    }
}

/// Not a test of its own: the entry point of the candidate processes that
/// [`registry::spawn_child`] starts (it does nothing when run directly).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn child() {
    if let Ok(url) = std::env::var(registry::URL_ENV) {
        registry::child_main(&Postgres { url, server: None }).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_preferred_candidate_costs_at_most_the_holdoff() {
    let pg = store().await;
    registry::a_killed_preferred_candidate_costs_at_most_the_holdoff(&pg, pg.child()).await;
}

/// A fresh server with the tables set up, so that candidates acquire at
/// once rather than wait one ttl after creating them.
async fn store() -> Postgres {
    let server = PostgresServer::start()
        .await
        .expect("PostgreSQL 15+ is needed: run scripts/setup");
    let pg = Postgres {
        url: server.url(),
        server: Some(server),
    };
    timeout(registry::WAIT, pg.backend().await.setup())
        .await
        .unwrap()
        .unwrap();
    pg
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn priorities_1_5_10_end_with_10_then_5() {
    registry::priorities_end_with_the_highest_leading_then_the_next(&store().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn priority_20_preempts_priority_10_within_one_renew_interval() {
    registry::a_higher_priority_preempts_within_one_renew_interval(
        &store().await,
        Duration::from_millis(500),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resign_to_hands_over_to_the_named_follower() {
    registry::resign_to_hands_over_to_the_named_follower(&store().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn equal_priorities_never_preempt() {
    registry::equal_priorities_never_preempt(&store().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flapping_candidate_preempts_at_most_once_per_min_term() {
    registry::a_flapping_candidate_preempts_at_most_once_per_min_term(&store().await).await;
}

/// A new entry, new contents and a removal each notify once; a candidate
/// that renews its entry (here a `Leader`, idle, alone) notifies nothing
/// after its first write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_a_change_of_the_registry_notifies_never_a_renewal() {
    let pg = store().await;
    let watcher = pg.backend().await;
    let writer = pg.backend().await;
    let key = Key::new("registry-notify").unwrap();
    let mut sub = watcher.subscribe(&key);
    let long = TTL * 10;
    // The LISTEN connection comes up beside the test: write new contents
    // until one is heard.
    let probe = LeaderId::new();
    let mut heard = false;
    for n in 0..100 {
        let entry = Candidate::new(probe, 0, format!("probe {n}"));
        writer
            .register_within(&key, &entry, long, long)
            .await
            .unwrap();
        if next_candidates_event(&mut sub, Duration::from_millis(100))
            .await
            .is_some()
        {
            heard = true;
            break;
        }
    }
    assert!(heard, "no notification for new contents");
    // The same contents again: a renewal, no notification.
    let same = Candidate::new(probe, 0, "steady");
    writer
        .register_within(&key, &same, long, long)
        .await
        .unwrap();
    assert_eq!(
        next_candidates_event(&mut sub, Duration::from_secs(1)).await,
        Some(WatchEvent::Candidates(key.clone()))
    );
    for _ in 0..3 {
        writer
            .register_within(&key, &same, long, long)
            .await
            .unwrap();
    }
    assert_eq!(
        next_candidates_event(&mut sub, Duration::from_millis(300)).await,
        None,
        "a renewal notified"
    );
    writer.deregister_within(&key, probe, long).await.unwrap();
    assert_eq!(
        next_candidates_event(&mut sub, Duration::from_secs(1)).await,
        Some(WatchEvent::Candidates(key.clone()))
    );
    // Removing what is not there notifies nothing.
    writer.deregister_within(&key, probe, long).await.unwrap();
    assert_eq!(
        next_candidates_event(&mut sub, Duration::from_millis(300)).await,
        None
    );

    // An idle leader renews its entry every renew interval: one
    // notification, for its first write, over five intervals.
    let log = WorkLog::new();
    let l = registry::candidate(&pg, key.as_str(), 1).await;
    let renew = l.config().renew_interval();
    let task = registry::run(&l, "idle", &log);
    registry::leads(&l).await;
    let mut seen = 0;
    let window = tokio::time::Instant::now() + 5 * renew;
    while let Some(event) = next_candidates_event(
        &mut sub,
        window.saturating_duration_since(tokio::time::Instant::now()),
    )
    .await
    {
        assert_eq!(event, WatchEvent::Candidates(key.clone()));
        seen += 1;
    }
    println!("{seen} notification(s) over 5 renew intervals of {renew:?}");
    assert_eq!(seen, 1, "renewals notified");
    assert_eq!(l.candidates().await.unwrap().len(), 1);
    registry::stop(&l, task).await;
    // Its shutdown removed the entry: one more.
    assert!(
        next_candidates_event(&mut sub, Duration::from_secs(1))
            .await
            .is_some()
    );
    log.assert_safe();
}

/// A deployment that has only the lease table, with auto-creation off:
/// setup passes and leases work as before; only the registry calls fail,
/// with `Misconfigured` naming the DDL. Once the DBA has run it, the
/// registry works. With auto-creation on, setup creates the table beside
/// the existing lease table (and reports the lease table as existing).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deployment_with_only_the_lease_table_keeps_working() {
    let pg = store().await;
    let client = pg.server.as_ref().unwrap().connect().await.unwrap();
    client
        .batch_execute("DROP TABLE public.leaseholder_leases_candidates")
        .await
        .unwrap();
    let built = PostgresBackend::builder()
        .url(pg.url.as_str())
        .create_table(false)
        .build()
        .unwrap();
    assert_eq!(built.candidates_table(), "leaseholder_leases_candidates");
    let ddl = built.ddl();
    assert!(
        ddl.contains(r#"CREATE TABLE IF NOT EXISTS "public"."leaseholder_leases_candidates" ("#),
        "{ddl}"
    );
    let b = Backend::postgres(built);
    assert_eq!(b.setup().await.unwrap(), Prepared::Existing);
    let key = Key::new("job").unwrap();
    let claim = Claim::new(LeaderId::new(), Default::default());
    let lease = match b.acquire(&key, &claim, TTL).await.unwrap() {
        Acquired::Won(lease) => lease,
        other => panic!("{other:?}"),
    };
    let me = Candidate::new(LeaderId::new(), 1, "");
    for err in [
        b.register_within(&key, &me, TTL, TTL).await.unwrap_err(),
        b.candidates(&key).await.unwrap_err(),
        b.deregister_within(&key, me.id(), TTL).await.unwrap_err(),
    ] {
        match err {
            BackendError::Misconfigured { problem, fix } => {
                assert!(
                    problem.contains(r#""public"."leaseholder_leases_candidates" does not exist"#),
                    "{problem}"
                );
                assert!(fix.contains("ddl()"), "{fix}");
            }
            other => panic!("{other:?}"),
        }
    }
    b.release(&key, &lease).await.unwrap();
    // The DBA runs the DDL (idempotent for the lease table).
    client.batch_execute(&ddl).await.unwrap();
    b.setup().await.unwrap();
    b.register_within(&key, &me, TTL, TTL).await.unwrap();
    assert_eq!(b.candidates(&key).await.unwrap().len(), 1);

    // With auto-creation on, setup creates it beside the lease table.
    client
        .batch_execute("DROP TABLE public.leaseholder_leases_candidates")
        .await
        .unwrap();
    let auto = pg.backend().await;
    assert_eq!(auto.setup().await.unwrap(), Prepared::Existing);
    auto.register_within(&key, &me, TTL, TTL).await.unwrap();
    assert_eq!(auto.candidates(&key).await.unwrap().len(), 1);

    // A candidates table of the wrong shape is refused with what to do.
    client
        .batch_execute(
            "DROP TABLE public.leaseholder_leases_candidates; \
             CREATE TABLE public.leaseholder_leases_candidates (key text, id bytea)",
        )
        .await
        .unwrap();
    // (A new backend: a backend runs its setup once.)
    match pg.backend().await.setup().await.unwrap_err() {
        BackendError::Misconfigured { problem, .. } => {
            assert!(problem.contains("column id of type uuid"), "{problem}")
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proclaim_is_seen_by_followers_and_current_leader() {
    registry::proclaim_is_seen_by_followers_and_current_leader(&store().await).await;
}
