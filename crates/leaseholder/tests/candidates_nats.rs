//! The candidate registry on a real nats-server (2.11+): priorities,
//! preemption, `resign_to` and equal priorities (the scenarios of
//! `registry/mod.rs`), and what the NATS backend adds: the registry's own
//! bucket (one replica, per-message TTL, outside the lease bucket's watch),
//! keys with dots listed apart, and a user who may not create the registry
//! bucket told what to create while its leases work as before.
#![cfg(feature = "nats")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod registry;

use std::time::Duration;

use leaseholder::backend::nats::NatsBackend;
use leaseholder::{Backend, BackendError, Candidate, Claim, Key, LeaderId, WatchEvent};
use leaseholder_testkit::NatsServer;
use registry::{Store, TTL};
use tokio::time::{sleep, timeout};

struct Nats {
    url: String,
    /// `None` in a child process: the parent runs the server.
    _server: Option<NatsServer>,
}

impl Store for Nats {
    async fn backend(&self) -> Backend {
        Backend::nats(
            async_nats::connect(self.url.as_str()).await.unwrap(),
            "leases",
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
        registry::child_main(&Nats { url, _server: None }).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_preferred_candidate_costs_at_most_the_holdoff() {
    let nats = store().await;
    registry::a_killed_preferred_candidate_costs_at_most_the_holdoff(&nats, nats.child()).await;
}

/// A fresh server with the lease bucket set up, so that candidates acquire
/// at once rather than wait one ttl after creating it.
async fn store() -> Nats {
    let server = NatsServer::start()
        .await
        .expect("nats-server 2.11+ is needed: run scripts/setup");
    let nats = Nats {
        url: server.url(),
        _server: Some(server),
    };
    timeout(registry::WAIT, nats.backend().await.setup())
        .await
        .unwrap()
        .unwrap();
    nats
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn priorities_1_5_10_end_with_10_then_5() {
    registry::priorities_end_with_the_highest_leading_then_the_next(&store().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn priority_20_preempts_priority_10_within_one_renew_interval() {
    // The newcomer's setup and first registration, the leader's
    // nomination, drain and release, and the newcomer's read and acquire.
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

/// Entries live in `leases_candidates` (one replica, per-message TTL),
/// never in the lease bucket: its watch sees none of them, and a key's
/// lease stays free. Keys `a` and `a.b` list only their own entries.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entries_live_in_their_own_bucket_and_dotted_keys_list_apart() {
    let nats = store().await;
    let client = async_nats::connect(nats.url.as_str()).await.unwrap();
    assert_eq!(
        NatsBackend::new(client.clone(), "leases").registry_bucket(),
        "leases_candidates"
    );
    let b = nats.backend().await;
    let (a, ab, abc) = (
        Key::new("a").unwrap(),
        Key::new("a.b").unwrap(),
        Key::new("a.b.c").unwrap(),
    );
    let mut watched = [b.subscribe(&a), b.subscribe(&ab)];
    let long = TTL * 10;
    let on_a = Candidate::new(LeaderId::new(), 1, "on a");
    let on_ab = Candidate::new(LeaderId::new(), 2, "on a.b");
    b.register_within(&a, &on_a, long, long).await.unwrap();
    b.register_within(&ab, &on_ab, long, long).await.unwrap();
    let ids = |list: Vec<Candidate>| list.iter().map(Candidate::id).collect::<Vec<_>>();
    assert_eq!(ids(b.candidates(&a).await.unwrap()), [on_a.id()]);
    assert_eq!(ids(b.candidates(&ab).await.unwrap()), [on_ab.id()]);
    assert!(b.candidates(&abc).await.unwrap().is_empty());
    assert!(b.holder(&a).await.unwrap().is_none());
    // The lease bucket's watch saw nothing of them.
    sleep(Duration::from_millis(300)).await;
    for sub in &mut watched {
        while let Ok(event) = timeout(Duration::from_millis(10), sub.next()).await {
            assert_eq!(
                event,
                WatchEvent::Resync,
                "the lease watch saw a registry entry"
            );
        }
    }
    let js = async_nats::jetstream::new(client);
    let leases = js.get_stream("KV_leases").await.unwrap();
    assert_eq!(leases.cached_info().state.subjects_count, 0);
    let registry = js.get_stream("KV_leases_candidates").await.unwrap();
    let config = &registry.cached_info().config;
    assert_eq!(config.num_replicas, 1);
    assert!(config.allow_message_ttl && config.allow_direct);
    assert_eq!(registry.cached_info().state.messages, 2);
    // A deregistered entry leaves a delete marker that expires itself.
    b.deregister_within(&a, on_a.id(), long).await.unwrap();
    assert!(b.candidates(&a).await.unwrap().is_empty());
    assert_eq!(ids(b.candidates(&ab).await.unwrap()), [on_ab.id()]);
    b.deregister_within(&ab, on_ab.id(), long).await.unwrap();
    let mut registry = registry;
    let emptied = async {
        loop {
            if registry.info().await.unwrap().state.messages == 0 {
                return;
            }
            sleep(Duration::from_millis(100)).await;
        }
    };
    timeout(Duration::from_secs(5), emptied)
        .await
        .expect("the delete markers did not expire");
}

/// Users whose password is their name: `admin` may do anything, `leaser`
/// may not create the registry bucket.
const USERS: &str = r#"
authorization { users = [
  { user: admin, password: admin }
  { user: leaser, password: leaser, permissions: { publish: { deny: ["$JS.API.STREAM.CREATE.KV_leases_candidates"] } } }
] }
"#;

/// A user who may not create the registry bucket gets `Misconfigured`
/// saying what to create, from the registry calls only: its leases work.
/// Once an operator has created the bucket, the registry works for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registry_bucket_the_user_may_not_create_is_misconfigured_saying_what_to_create() {
    let s = NatsServer::start_with_config(USERS)
        .await
        .expect("nats-server 2.11+ is needed: run scripts/setup");
    let connect = |user: &'static str| {
        let url = s.url();
        async move {
            async_nats::ConnectOptions::with_user_and_password(user.into(), user.into())
                .connect(url)
                .await
                .unwrap()
        }
    };
    let admin = Backend::nats(connect("admin").await, "leases");
    admin.setup().await.unwrap();
    let leaser = Backend::nats(connect("leaser").await, "leases");
    leaser.setup().await.unwrap();
    let key = Key::new("job").unwrap();
    let me = Candidate::new(LeaderId::new(), 1, "");
    match leaser.register_within(&key, &me, TTL, TTL).await {
        Err(BackendError::Misconfigured { problem, fix }) => {
            println!("{problem}\n{fix}");
            assert!(problem.contains("leases_candidates"), "{problem}");
            assert!(fix.contains("KV_leases_candidates"), "{fix}");
            assert!(fix.contains("allow_msg_ttl"), "{fix}");
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        leaser.candidates(&key).await,
        Err(BackendError::Misconfigured { .. })
    ));
    // The lease works as before.
    let claim = Claim::new(LeaderId::new(), Default::default());
    let won = leaser.acquire(&key, &claim, TTL).await.unwrap();
    assert!(matches!(won, leaseholder::Acquired::Won(_)), "{won:?}");
    // An operator creates it (here: the backend of a user who may).
    admin.register_within(&key, &me, TTL, TTL).await.unwrap();
    leaser.register_within(&key, &me, TTL, TTL).await.unwrap();
    let listed = leaser.candidates(&key).await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].id(), me.id());
}

/// A lease bucket whose name is where another lease bucket's registry goes
/// (`jobs_candidates` for `jobs`) is not taken for that registry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_bucket_named_like_a_registry_is_not_used_as_one() {
    let nats = store().await;
    let client = async_nats::connect(nats.url.as_str()).await.unwrap();
    Backend::nats(client.clone(), "jobs_candidates")
        .setup()
        .await
        .unwrap();
    let jobs = Backend::nats(client, "jobs");
    jobs.setup().await.unwrap();
    let key = Key::new("job").unwrap();
    let me = Candidate::new(LeaderId::new(), 1, "");
    match jobs.register_within(&key, &me, TTL, TTL).await {
        Err(BackendError::Misconfigured { problem, .. }) => {
            assert!(problem.contains("is a lease bucket"), "{problem}")
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proclaim_is_seen_by_followers_and_current_leader() {
    registry::proclaim_is_seen_by_followers_and_current_leader(&store().await).await;
}
