//! The `Leader` on a real nats-server: server version check, bucket
//! validation, handoff through the KV watch, failover after a crash whose
//! link the testkit proxy cut.
#![cfg(feature = "nats")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::time::Duration;

use leaseholder::{Backend, BackendError, ConfigError, Error, Leader, Op, Prepared, State};
use leaseholder_testkit::{DEBIAN_NATS_SERVER, NatsServer, TcpProxy, WorkLog};
use tokio::time::{Instant, timeout};

mod support;
use support::{run_reporting_terms, wait_any_leader};

const WAIT: Duration = Duration::from_secs(30);

async fn server() -> NatsServer {
    NatsServer::start()
        .await
        .expect("nats-server 2.11+ is needed: run scripts/setup")
}

/// A server whose bucket exists already. A campaign whose own setup
/// creates the bucket waits one ttl before its first acquire (the bucket
/// may replace one deleted under a running leader), which the tests that
/// use this are not about.
async fn prepared_server() -> NatsServer {
    let s = server().await;
    let client = async_nats::connect(s.url()).await.unwrap();
    assert_eq!(
        Backend::nats(client, "leases").setup().await.unwrap(),
        Prepared::Created
    );
    s
}

/// Campaigns on `l` until the campaign fails; its error.
async fn campaign_error(l: &Leader) -> Error {
    timeout(
        WAIT,
        l.acquire_and_run(|_| async { Ok::<_, std::io::Error>(()) }),
    )
    .await
    .expect("the campaign fails within the wait")
    .expect_err("the campaign fails")
}

/// The `problem` and `fix` of a `Misconfigured` store error, or a panic
/// that shows what came instead.
fn misconfigured(e: &BackendError) -> (&str, &str) {
    match e {
        BackendError::Misconfigured { problem, fix } => (problem, fix),
        other => panic!("expected Misconfigured, got {other:?}"),
    }
}

/// The store error of an `Error::Backend` from `op`.
fn backend_source(err: &Error, op: Op) -> &BackendError {
    match err {
        Error::Backend { op: o, source, .. } if *o == op => source,
        other => panic!("expected a {op} error, got {other:?}"),
    }
}

async fn leader(url: &str, ttl: Duration) -> Leader {
    let client = async_nats::connect(url).await.unwrap();
    Leader::builder("scheduler")
        .backend(Backend::nats(client, "leases"))
        .ttl(ttl)
        .build()
        .unwrap()
}

fn started(l: &Leader) -> tokio::task::JoinHandle<Result<(), Error>> {
    let l = l.clone();
    tokio::spawn(async move { l.start(Default::default()).await })
}

#[tokio::test]
async fn nats_2_9_is_refused_with_the_version_needed() {
    let old = NatsServer::start_with(Path::new(DEBIAN_NATS_SERVER))
        .await
        .expect("Debian's nats-server 2.9 is needed for this test: run scripts/setup");
    assert!(old.version().starts_with("2.9"), "{}", old.version());
    let l = leader(&old.url(), Duration::from_secs(2)).await;
    let err = campaign_error(&l).await;
    match &err {
        Error::Backend {
            op: Op::Setup,
            source,
            ..
        } => match &**source {
            BackendError::Unsupported { needed, .. } => {
                assert!(needed.contains("2.11"), "{needed}")
            }
            other => panic!("{other:?}"),
        },
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn a_bucket_without_limit_markers_is_rejected_with_what_to_change() {
    let s = server().await;
    let client = async_nats::connect(s.url()).await.unwrap();
    async_nats::jetstream::new(client.clone())
        .create_key_value(async_nats::jetstream::kv::Config {
            bucket: "leases".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let err = Backend::nats(client, "leases").setup().await.unwrap_err();
    match err {
        BackendError::Misconfigured { fix, .. } => assert!(fix.contains("limit markers"), "{fix}"),
        other => panic!("{other:?}"),
    }
}

/// A candidate campaigning with work that records itself in a `WorkLog`.
struct Candidate {
    leader: Leader,
    task: tokio::task::JoinHandle<Result<(), Error>>,
}

impl Candidate {
    async fn start(url: &str, ttl: Duration, who: &str, log: &WorkLog) -> Candidate {
        let leader = leader(url, ttl).await;
        let (task, _terms) = run_reporting_terms(&leader, who, log);
        Candidate { leader, task }
    }

    async fn stop(self) {
        self.leader.shutdown().await.unwrap();
        self.task.await.unwrap().unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resign_hands_over_through_the_watch() {
    let s = prepared_server().await;
    let ttl = Duration::from_secs(10);
    let log = WorkLog::new();
    let mut fleet = Vec::new();
    for i in 0..3 {
        fleet.push(Candidate::start(&s.url(), ttl, &format!("c{i}"), &log).await);
    }
    let mut took = Vec::new();
    for round in 0..5 {
        // Every candidate is campaigning, one of them leads.
        for c in &fleet {
            timeout(
                WAIT,
                c.leader.state().wait_for(|s| {
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
        let i = fleet
            .iter()
            .position(|c| c.leader.state().borrow().is_leader())
            .unwrap();
        let terms = log.intervals().len();
        let t0 = Instant::now();
        fleet[i].leader.resign().await.unwrap();
        // The successor's work start, as the work itself recorded it.
        let next = timeout(WAIT, log.wait_for_start(terms + 1)).await.unwrap();
        took.push(next.start - t0);
        // The resigner leaves; a new candidate joins for the next round.
        fleet.swap_remove(i).stop().await;
        fleet.push(Candidate::start(&s.url(), ttl, &format!("c{}", round + 3), &log).await);
    }
    for c in fleet {
        c.stop().await;
    }
    log.assert_safe();
    let mut sorted = took.clone();
    sorted.sort();
    println!(
        "graceful handoff on NATS (resign -> successor's work starts), ttl 10 s, {} runs: \
         median {:?}, max {:?}; all {took:?}",
        took.len(),
        sorted[sorted.len() / 2],
        sorted[sorted.len() - 1]
    );
    // Through the watch: far below the 2 s retry interval and the ttl.
    assert!(sorted[sorted.len() - 1] < ttl / 5, "{took:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_off_leader_is_replaced_after_its_lease_expires() {
    let s = prepared_server().await;
    let proxy = TcpProxy::start(s.addr()).await.unwrap();
    let ttl = Duration::from_secs(2);
    let log = WorkLog::new();
    let a = leader(&format!("nats://{}", proxy.addr()), ttl).await;
    let b = leader(&s.url(), ttl).await;
    let (ta, mut rx) = run_reporting_terms(&a, "a", &log);
    let term = timeout(WAIT, rx.recv()).await.unwrap().unwrap();
    let (tb, _) = run_reporting_terms(&b, "b", &log);
    let mut sb = b.state();
    timeout(
        WAIT,
        sb.wait_for(|s| {
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
    proxy.cut();
    let cut = Instant::now();
    // A's token fires at its deadline, before the store lets B in.
    let next = timeout(WAIT, log.wait_for_start(2)).await.unwrap();
    assert_eq!(next.who, "b");
    let ended = timeout(WAIT, log.wait_for_end(0))
        .await
        .expect("A's work ends")
        .end
        .expect("an ended interval has an end");
    println!(
        "A's work ended {:?} after the cut; B's began {:?} after the cut",
        ended - cut,
        next.start - cut
    );
    assert!(term.is_cancelled());
    // A's deadline is ttl - drift after its last renewal, which was sent
    // at most a renew interval before the cut.
    assert!(ended - cut < ttl, "{:?}", ended - cut);
    b.shutdown().await.unwrap();
    tb.await.unwrap().unwrap();
    ta.abort();
    log.assert_safe();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_campaign_recovers_after_the_server_restarts_on_its_data_dir() {
    let mut s = prepared_server().await;
    let ttl = Duration::from_secs(2);
    let a = leader(&s.url(), ttl).await;
    let b = leader(&s.url(), ttl).await;
    let log = WorkLog::new();
    let (ta, _) = run_reporting_terms(&a, "a", &log);
    let (tb, _) = run_reporting_terms(&b, "b", &log);
    let first = timeout(WAIT, wait_any_leader(&[&a, &b])).await.unwrap();
    let before = [&a, &b][first].fencing_token().unwrap();
    s.restart().await.unwrap();
    // Whoever leads after the restart has a larger token, with no action
    // from the user: clients reconnect and campaigns retry.
    let t0 = Instant::now();
    loop {
        let i = timeout(WAIT, wait_any_leader(&[&a, &b])).await.unwrap();
        if let Some(token) = [&a, &b][i].fencing_token()
            && token > before
        {
            break;
        }
        assert!(t0.elapsed() < WAIT, "no new term after the restart");
        // The old term is still live (renewals resumed): end it to force
        // a new one through the restarted server.
        [&a, &b][i].resign().await.unwrap();
    }
    a.shutdown().await.unwrap();
    b.shutdown().await.unwrap();
    ta.await.unwrap().unwrap();
    tb.await.unwrap().unwrap();
    log.assert_safe();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_server_past_the_ttl_cancels_the_leader_then_recovers() {
    let s = prepared_server().await;
    let ttl = Duration::from_secs(2);
    let a = leader(&s.url(), ttl).await;
    let b = leader(&s.url(), ttl).await;
    let log = WorkLog::new();
    let (ta, mut rx) = run_reporting_terms(&a, "a", &log);
    let term = timeout(WAIT, rx.recv()).await.unwrap().unwrap();
    let (tb, _) = run_reporting_terms(&b, "b", &log);
    timeout(
        WAIT,
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
    s.pause().unwrap();
    // No renewal can succeed: the token fires by the deadline.
    timeout(WAIT, term.cancelled()).await.unwrap();
    assert!(!term.is_valid());
    s.resume().unwrap();
    // After the resume one of them wins a new term with a larger token.
    let next = timeout(WAIT, log.wait_for_start(2)).await.unwrap();
    assert!(next.token > term.fencing_token().get());
    a.shutdown().await.unwrap();
    b.shutdown().await.unwrap();
    ta.await.unwrap().unwrap();
    tb.await.unwrap().unwrap();
    log.assert_safe();
}

/// What noleader 0.1.3 writes: the leader's UUID as 16 raw bytes, with a
/// per-message TTL (`create_with_ttl`).
async fn put_noleader_value(url: &str, key: &str, ttl: Duration) {
    let client = async_nats::connect(url).await.unwrap();
    let js = async_nats::jetstream::new(client);
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Nats-TTL", format!("{}s", ttl.as_secs()).as_str());
    let uuid = *b"\x8f\x1b\x6c\x3a\x52\x0e\x4d\x1f\x9a\x7e\x33\x0c\x12\xab\xcd\xef";
    js.publish_with_headers(format!("$KV.leases.{key}"), headers, uuid.to_vec().into())
        .await
        .unwrap()
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_noleader_value_is_a_foreign_lease_until_it_expires() {
    let s = prepared_server().await;
    let ttl = Duration::from_secs(10);
    // The bucket exists before A's setup: after creating it, A would wait
    // one ttl before its first acquire, past the foreign value's expiry.
    leader(&s.url(), ttl).await.setup().await.unwrap();
    let a = leader(&s.url(), ttl).await;
    a.setup().await.unwrap();
    let foreign_ttl = Duration::from_secs(2);
    // Taken before the publish: the server stamps the value, and starts
    // its TTL, after this instant (taken after, the reply's trip back
    // would count against the ttl).
    let written = Instant::now();
    put_noleader_value(&s.url(), "scheduler", foreign_ttl).await;

    let ta = started(&a);
    let mut sa = a.state();
    let seen = timeout(
        WAIT,
        sa.wait_for(|s| {
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
    .unwrap()
    .clone();
    let State::Follower {
        leader: Some(holder),
        ..
    } = seen
    else {
        unreachable!()
    };
    assert!(holder.is_foreign(), "{holder:?}");
    assert_eq!(holder.token(), None);
    // The hint comes from the message's timestamp and TTL header.
    let hint = holder.expires_in().expect("an expiry hint");
    assert!(hint <= foreign_ttl, "{hint:?}");
    let current = a.current_leader().await.unwrap().unwrap();
    assert!(current.is_foreign());

    // Respected until the store expires it; then A leads.
    timeout(WAIT, sa.wait_for(State::is_leader))
        .await
        .unwrap()
        .unwrap();
    let took = written.elapsed();
    println!("foreign value written {took:?} before A led");
    assert!(took >= foreign_ttl, "{took:?}");
    a.shutdown().await.unwrap();
    ta.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn followers_see_the_leaders_expiry_hint() {
    let s = prepared_server().await;
    let ttl = Duration::from_secs(4);
    let a = leader(&s.url(), ttl).await;
    let ta = started(&a);
    timeout(WAIT, a.state().wait_for(State::is_leader))
        .await
        .unwrap()
        .unwrap();
    let b = leader(&s.url(), ttl).await;
    let holder = b.current_leader().await.unwrap().unwrap();
    assert_eq!(holder.id(), Some(a.leader_id()), "{holder:?}");
    assert_eq!(holder.token(), a.fencing_token());
    let hint = holder.expires_in().expect("an expiry hint");
    // Renewed at most a renew interval ago (ttl/3), with the TTL rounded
    // up to whole seconds; loopback clocks agree.
    assert!(hint <= ttl, "{hint:?}");
    assert!(
        hint >= ttl - ttl / 3 - Duration::from_millis(500),
        "{hint:?}"
    );
    a.shutdown().await.unwrap();
    ta.await.unwrap().unwrap();
}

#[tokio::test]
async fn a_bucket_whose_sequences_start_at_1_is_rejected() {
    let s = server().await;
    let client = async_nats::connect(s.url()).await.unwrap();
    // A bucket made by hand (as `nats kv add` would) with every other
    // setting right.
    async_nats::jetstream::new(client.clone())
        .create_stream(async_nats::jetstream::stream::Config {
            name: "KV_leases".into(),
            subjects: vec!["$KV.leases.>".into()],
            max_messages_per_subject: 1,
            allow_rollup: true,
            deny_delete: true,
            allow_direct: true,
            discard: async_nats::jetstream::stream::DiscardPolicy::New,
            allow_message_ttl: true,
            subject_delete_marker_ttl: Some(Duration::from_secs(60)),
            ..Default::default()
        })
        .await
        .unwrap();
    let err = Backend::nats(client, "leases").setup().await.unwrap_err();
    match err {
        BackendError::Misconfigured { problem, fix } => {
            assert!(problem.contains("go back to 1"), "{problem}");
            assert!(fix.contains("first_seq"), "{fix}");
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_keep_increasing_when_the_bucket_is_deleted_and_created_again() {
    let s = server().await;
    // Each round's setup creates the bucket, so each campaign waits one
    // ttl before its first acquire: a short one keeps the test short.
    let ttl = Duration::from_secs(2);
    let mut tokens = Vec::new();
    for _ in 0..3 {
        let a = leader(&s.url(), ttl).await;
        let ta = started(&a);
        timeout(WAIT, a.state().wait_for(State::is_leader))
            .await
            .unwrap()
            .unwrap();
        tokens.push(a.fencing_token().unwrap());
        a.shutdown().await.unwrap();
        ta.await.unwrap().unwrap();
        // The operator deletes the bucket; the next setup creates it anew.
        let client = async_nats::connect(s.url()).await.unwrap();
        assert!(
            async_nats::jetstream::new(client)
                .delete_stream("KV_leases")
                .await
                .unwrap()
                .success
        );
    }
    println!("tokens across re-created buckets: {tokens:?}");
    assert!(tokens.windows(2).all(|w| w[0] < w[1]), "{tokens:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bucket_deleted_under_a_leader_stops_the_campaign_and_is_not_recreated() {
    let s = prepared_server().await;
    let ttl = Duration::from_secs(2);
    let a = leader(&s.url(), ttl).await;
    let (ta, mut terms) = run_reporting_terms(&a, "a", &WorkLog::new());
    let term = timeout(WAIT, terms.recv()).await.unwrap().unwrap();
    let client = async_nats::connect(s.url()).await.unwrap();
    let js = async_nats::jetstream::new(client);
    assert!(js.delete_stream("KV_leases").await.unwrap().success);
    // The next renewal finds no bucket: the work is cancelled and the
    // campaign ends with an error that says what is wrong.
    timeout(WAIT, term.cancelled()).await.unwrap();
    let err = timeout(WAIT, ta).await.unwrap().unwrap().unwrap_err();
    match &err {
        Error::Backend { source, .. } => match &**source {
            BackendError::Misconfigured { problem, fix } => {
                assert!(problem.contains("was deleted"), "{problem}");
                assert!(fix.contains("setup()"), "{fix}");
            }
            other => panic!("{other:?}"),
        },
        other => panic!("{other}"),
    }
    println!("{}", chain(&err));
    assert!(a.state().borrow().is_stopped());
    // Nobody re-created the bucket.
    assert!(js.get_stream("KV_leases").await.is_err());
}

/// A `BackendEdge` that counts the store calls it passes on.
struct Counting {
    inner: leaseholder::NatsBackend,
    calls: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl Counting {
    fn count(&self) {
        self.calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }
}

impl leaseholder::BackendEdge for Counting {
    fn name(&self) -> &'static str {
        "counting-nats"
    }
    fn min_ttl(&self) -> Duration {
        self.inner.min_ttl()
    }
    async fn setup(&self, budget: Duration) -> Result<leaseholder::Prepared, BackendError> {
        self.inner.setup(budget).await
    }
    async fn acquire(
        &self,
        key: &leaseholder::Key,
        claim: &leaseholder::Claim,
        ttl: Duration,
        budget: Duration,
    ) -> Result<leaseholder::Acquired, BackendError> {
        self.count();
        self.inner.acquire(key, claim, ttl, budget).await
    }
    async fn renew(
        &self,
        key: &leaseholder::Key,
        lease: &leaseholder::Lease,
        ttl: Duration,
        budget: Duration,
    ) -> Result<leaseholder::Renewed, BackendError> {
        self.count();
        self.inner.renew(key, lease, ttl, budget).await
    }
    async fn release(
        &self,
        key: &leaseholder::Key,
        lease: &leaseholder::Lease,
        budget: Duration,
    ) -> Result<(), BackendError> {
        self.count();
        self.inner.release(key, lease, budget).await
    }
    async fn holder(
        &self,
        key: &leaseholder::Key,
        budget: Duration,
    ) -> Result<Option<leaseholder::Holder>, BackendError> {
        self.count();
        self.inner.holder(key, budget).await
    }
    async fn watch(&self) -> Result<Option<leaseholder::WatchStream>, BackendError> {
        self.inner.watch().await
    }
    fn watch_reports_expiry(&self) -> bool {
        self.inner.watch_reports_expiry()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_follower_makes_no_store_calls_while_the_leader_renews() {
    let s = prepared_server().await;
    let ttl = Duration::from_secs(2);
    let a = leader(&s.url(), ttl).await;
    let ta = started(&a);
    timeout(WAIT, a.state().wait_for(State::is_leader))
        .await
        .unwrap()
        .unwrap();
    let calls = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let client = async_nats::connect(s.url()).await.unwrap();
    let b = Leader::builder("scheduler")
        .backend(Backend::new(Counting {
            inner: leaseholder::NatsBackend::new(client, "leases"),
            calls: calls.clone(),
        }))
        .ttl(ttl)
        .build()
        .unwrap();
    let tb = started(&b);
    timeout(
        WAIT,
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
    // Measurement windows, not waits for a state. Startup first: when the
    // watch connects it re-reads the key once (events may have been missed
    // before), so the count starts half a ttl later.
    tokio::time::sleep(ttl / 2).await;
    let before = calls.load(std::sync::atomic::Ordering::SeqCst);
    // Then three ttls in which the leader renews about nine times.
    tokio::time::sleep(ttl * 3).await;
    let during = calls.load(std::sync::atomic::Ordering::SeqCst) - before;
    println!("follower store calls in 3 ttl while the leader renewed: {during}");
    assert_eq!(during, 0);
    assert!(a.state().borrow().is_leader());
    // And it still takes over at once when the leader leaves.
    let t0 = Instant::now();
    a.shutdown().await.unwrap();
    timeout(WAIT, b.state().wait_for(State::is_leader))
        .await
        .unwrap()
        .unwrap();
    assert!(t0.elapsed() < ttl / 2, "{:?}", t0.elapsed());
    b.shutdown().await.unwrap();
    ta.await.unwrap().unwrap();
    tb.await.unwrap().unwrap();
}

/// The error and its sources, as one line.
fn chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(e) = source {
        text.push_str(": ");
        text.push_str(&e.to_string());
        source = e.source();
    }
    text
}

async fn connect_as(url: &str, user: &str) -> async_nats::Client {
    async_nats::ConnectOptions::with_user_and_password(user.into(), user.into())
        .connect(url)
        .await
        .unwrap()
}

fn leader_on(client: async_nats::Client, bucket: &str, ttl: Duration) -> Leader {
    Leader::builder("scheduler")
        .backend(Backend::nats(client, bucket))
        .ttl(ttl)
        .build()
        .unwrap()
}

/// Users whose password is their name: `admin` may do anything, `denied`
/// may not publish to the bucket's subjects, `listed` may publish only to
/// the JetStream API and the permissions request.
const USERS: &str = r#"
authorization { users = [
  { user: admin, password: admin }
  { user: denied, password: denied, permissions: { publish: { deny: ["$KV.leases.>"] } } }
  { user: listed, password: listed, permissions: { publish: { allow: ["$JS.API.>", "$SYS.REQ.USER.INFO"] } } }
  { user: worker, password: worker }
] }
"#;

/// Asserts that `err` is a `Denied` from the NATS backend naming `subject`.
fn assert_denied(err: &Error, subject: &str) {
    let Error::Backend { source, .. } = err else {
        panic!("{}", chain(err));
    };
    let BackendError::Denied(inner) = &**source else {
        panic!("not Denied: {}", chain(err));
    };
    let denied = inner
        .downcast_ref::<leaseholder::backend::nats::PublishDenied>()
        .expect("a PublishDenied");
    assert_eq!(denied.subject, subject);
    assert!(chain(err).contains(subject), "{}", chain(err));
    assert!(!err.is_transient());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_who_may_not_publish_to_the_bucket_is_denied_naming_the_subject() {
    let s = NatsServer::start_with_config(USERS)
        .await
        .expect("nats-server 2.11+ is needed: run scripts/setup");
    let admin = connect_as(&s.url(), "admin").await;
    Backend::nats(admin, "leases").setup().await.unwrap();
    for user in ["denied", "listed"] {
        let l = leader_on(
            connect_as(&s.url(), user).await,
            "leases",
            Duration::from_secs(10),
        );
        let t0 = Instant::now();
        let err = timeout(
            WAIT,
            l.acquire_and_run(|_| async { Ok::<_, std::io::Error>(()) }),
        )
        .await
        .expect("a denial stops the campaign; it is not retried")
        .unwrap_err();
        println!("{user}: after {:?}: {}", t0.elapsed(), chain(&err));
        assert!(
            matches!(
                err,
                Error::Backend {
                    op: Op::Acquire,
                    ..
                }
            ),
            "{err:?}"
        );
        assert_denied(&err, "$KV.leases.scheduler");
        assert!(l.state().borrow().is_stopped());
        // Told at once, from the permissions setup read, not after a
        // publish timed out.
        assert!(t0.elapsed() < Duration::from_secs(2), "{:?}", t0.elapsed());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn permissions_taken_away_from_a_running_leader_end_its_campaign_as_denied() {
    let mut s = NatsServer::start_with_config(USERS)
        .await
        .expect("nats-server 2.11+ is needed: run scripts/setup");
    let admin = connect_as(&s.url(), "admin").await;
    Backend::nats(admin, "leases").setup().await.unwrap();
    let ttl = Duration::from_secs(2);
    let l = leader_on(connect_as(&s.url(), "worker").await, "leases", ttl);
    let (task, mut terms) = run_reporting_terms(&l, "worker", &WorkLog::new());
    let term = timeout(WAIT, terms.recv()).await.unwrap().unwrap();
    // The operator takes the bucket away from `worker` while it leads:
    // its renewals go unanswered (the server's -ERR goes to the client's
    // event callback only).
    let revoked = USERS.replace(
        "{ user: worker, password: worker }",
        r#"{ user: worker, password: worker, permissions: { publish: { deny: ["$KV.leases.>"] } } }"#,
    );
    s.reload_config(&revoked).unwrap();
    let t0 = Instant::now();
    timeout(WAIT, term.cancelled()).await.unwrap();
    let err = timeout(WAIT, task).await.unwrap().unwrap().unwrap_err();
    println!(
        "campaign ended {:?} after the reload: {}",
        t0.elapsed(),
        chain(&err)
    );
    assert_denied(&err, "$KV.leases.scheduler");
    assert!(l.state().borrow().is_stopped());
    let _ = &mut s;
}

#[tokio::test]
async fn an_invalid_bucket_name_is_a_config_error_at_build() {
    let s = server().await;
    let client = async_nats::connect(s.url()).await.unwrap();
    for bad in ["bad name!", "a.b", "leases>", ""] {
        let err = Leader::builder("scheduler")
            .backend(Backend::nats(client.clone(), bad))
            .build()
            .unwrap_err();
        match &err {
            ConfigError::Backend { backend, problem } => {
                assert_eq!(*backend, "nats");
                assert!(problem.contains("A-Z a-z 0-9 - _"), "{problem}");
                assert!(problem.contains(&format!("{bad:?}")), "{problem}");
            }
            other => panic!("{other:?}"),
        }
        assert!(leaseholder::NatsBackend::try_new(client.clone(), bad).is_err());
        assert!(
            leaseholder::Observer::new(
                "scheduler",
                Backend::nats(client.clone(), bad),
                Duration::from_secs(1)
            )
            .is_err()
        );
        // Setup, called directly, refuses it too, without touching the
        // server.
        let err = Backend::nats(client.clone(), bad)
            .setup()
            .await
            .unwrap_err();
        let (problem, _) = misconfigured(&err);
        assert!(problem.contains("A-Z a-z 0-9 - _"), "{problem}");
    }
    assert!(leaseholder::NatsBackend::try_new(client, "leases_2-x").is_ok());
}

fn now_micros() -> u64 {
    u64::try_from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_micros(),
    )
    .unwrap()
}

/// A bucket made by hand with every setting setup wants, and `max_age`.
async fn bucket_with_max_age(js: &async_nats::jetstream::Context, bucket: &str, max_age: Duration) {
    js.create_stream(async_nats::jetstream::stream::Config {
        name: format!("KV_{bucket}"),
        subjects: vec![format!("$KV.{bucket}.>")],
        max_messages_per_subject: 1,
        allow_rollup: true,
        deny_delete: true,
        allow_direct: true,
        discard: async_nats::jetstream::stream::DiscardPolicy::New,
        allow_message_ttl: true,
        subject_delete_marker_ttl: Some(Duration::from_secs(60)),
        max_age,
        first_sequence: Some(now_micros()),
        ..Default::default()
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_age_must_be_at_least_twice_each_leases_ttl() {
    let s = server().await;
    let client = async_nats::connect(s.url()).await.unwrap();
    let js = async_nats::jetstream::new(client.clone());
    bucket_with_max_age(&js, "aged30", Duration::from_secs(30)).await;
    bucket_with_max_age(&js, "aged5", Duration::from_secs(5)).await;
    bucket_with_max_age(&js, "aged1", Duration::from_secs(1)).await;

    // Accepted: 30 s >= 2 x 10 s, and 5 s >= 2 x 2 s.
    for (bucket, ttl) in [("aged30", 10), ("aged5", 2)] {
        let l = leader_on(client.clone(), bucket, Duration::from_secs(ttl));
        let task = started(&l);
        timeout(WAIT, l.state().wait_for(State::is_leader))
            .await
            .unwrap()
            .unwrap();
        l.shutdown().await.unwrap();
        task.await.unwrap().unwrap();
    }

    // Refused at the first acquire, naming max_age and the ttl.
    let l = leader_on(client.clone(), "aged5", Duration::from_secs(10));
    let err = campaign_error(&l).await;
    println!("{}", chain(&err));
    let (problem, fix) = misconfigured(backend_source(&err, Op::Acquire));
    assert!(problem.contains("max_age is 5s"), "{problem}");
    assert!(problem.contains("ttl 10s"), "{problem}");
    assert!(fix.contains("at least 20s"), "{fix}");

    // Below 2 s no lease fits: setup says so.
    let err = Backend::nats(client, "aged1").setup().await.unwrap_err();
    let (problem, _) = misconfigured(&err);
    assert!(problem.contains("max_age"), "{problem}");
}

#[tokio::test]
async fn setup_reports_created_then_existing() {
    let s = server().await;
    let first = Backend::nats(async_nats::connect(s.url()).await.unwrap(), "leases");
    assert_eq!(first.setup().await.unwrap(), Prepared::Created);
    // The same backend reports what its first setup found.
    assert_eq!(first.setup().await.unwrap(), Prepared::Created);
    let second = Backend::nats(async_nats::connect(s.url()).await.unwrap(), "leases");
    assert_eq!(second.setup().await.unwrap(), Prepared::Existing);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bucket_recreated_under_a_running_leader_lets_nobody_in_beside_it() {
    let s = prepared_server().await;
    let ttl = Duration::from_secs(3);
    let log = WorkLog::new();
    let a = leader(&s.url(), ttl).await;
    let (ta, mut terms) = run_reporting_terms(&a, "a", &log);
    let first = timeout(WAIT, terms.recv()).await.unwrap().unwrap();
    // The operator deletes the bucket; a new candidate on a fresh client
    // starts at once, and its setup creates the bucket again, empty. A is
    // still inside its deadline: nothing in the new bucket says so.
    let js = async_nats::jetstream::new(async_nats::connect(s.url()).await.unwrap());
    assert!(js.delete_stream("KV_leases").await.unwrap().success);
    let deleted = Instant::now();
    let b = leader(&s.url(), ttl).await;
    let (tb, mut b_terms) = run_reporting_terms(&b, "b", &log);
    // A's next renewal finds the bucket gone (the campaign stops) or
    // empty (the term is lost): either way its work ends.
    timeout(WAIT, first.cancelled()).await.unwrap();
    if !a.state().borrow().is_stopped() {
        // A campaigns on the new bucket and may lead again: make room.
        a.shutdown().await.unwrap();
    }
    // B's work has begun (and is in the log) when its term is sent.
    timeout(WAIT, b_terms.recv()).await.unwrap().unwrap();
    let b_term = log.intervals().into_iter().rfind(|i| i.who == "b").unwrap();
    println!(
        "A ({:?}); B's work began {:?} after the deletion with token {} (A's first: {})",
        ta.is_finished(),
        b_term.start - deleted,
        b_term.token,
        first.fencing_token()
    );
    // B's setup created the bucket, so B waited one ttl before acquiring.
    assert!(
        b_term.start - deleted >= ttl,
        "{:?}",
        b_term.start - deleted
    );
    assert!(b_term.token > first.fencing_token().get());
    b.shutdown().await.unwrap();
    tb.await.unwrap().unwrap();
    ta.abort();
    log.assert_safe();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bucket_made_by_hand_without_per_message_ttl_is_misconfigured_not_retried() {
    let s = server().await;
    let client = async_nats::connect(s.url()).await.unwrap();
    let js = async_nats::jetstream::new(client.clone());
    // As `nats kv add` or an operator's script would make it, written to
    // before setup could reject it (setup was never called here).
    js.create_stream(async_nats::jetstream::stream::Config {
        name: "KV_plain".into(),
        subjects: vec!["$KV.plain.>".into()],
        max_messages_per_subject: 1,
        first_sequence: Some(now_micros()),
        ..Default::default()
    })
    .await
    .unwrap();
    let backend = Backend::nats(client, "plain");
    let key = leaseholder::Key::new("scheduler").unwrap();
    let claim = leaseholder::Claim::new(leaseholder::LeaderId::new(), Default::default());
    let err = backend
        .acquire(&key, &claim, Duration::from_secs(10))
        .await
        .unwrap_err();
    let (problem, fix) = misconfigured(&err);
    println!("{problem}; {fix}");
    assert!(problem.contains("per-message TTL is disabled"), "{problem}");
    assert!(fix.contains("allow_msg_ttl"), "{fix}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bucket_full_under_discard_new_is_misconfigured_saying_which_limit() {
    let s = prepared_server().await;
    let client = async_nats::connect(s.url()).await.unwrap();
    let js = async_nats::jetstream::new(client.clone());
    let ttl = Duration::from_secs(10);
    // One key leads; then someone caps the stream at the one message it
    // holds (discard new, as setup made it).
    let a = leader(&s.url(), ttl).await;
    let ta = started(&a);
    timeout(WAIT, a.state().wait_for(State::is_leader))
        .await
        .unwrap()
        .unwrap();
    let mut config = js
        .get_stream("KV_leases")
        .await
        .unwrap()
        .info()
        .await
        .unwrap()
        .config
        .clone();
    config.max_messages = 1;
    js.update_stream(config).await.unwrap();
    // A second key cannot be written: its campaign stops with what to
    // change, rather than retrying forever.
    let other = Leader::builder("other")
        .backend(Backend::nats(client, "leases"))
        .ttl(ttl)
        .build()
        .unwrap();
    let err = campaign_error(&other).await;
    println!("{}", chain(&err));
    let (problem, fix) = misconfigured(backend_source(&err, Op::Acquire));
    assert!(problem.contains("maximum messages exceeded"), "{problem}");
    assert!(fix.contains("max_msgs"), "{fix}");
    a.shutdown().await.unwrap();
    ta.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_observer_on_a_slow_link_never_goes_back_to_an_ended_term() {
    use leaseholder::{Observed, Observer};
    let s = prepared_server().await;
    let proxy = TcpProxy::start(s.addr()).await.unwrap();
    proxy.set_delay(Duration::from_millis(250));
    let slow = async_nats::connect(format!("nats://{}", proxy.addr()))
        .await
        .unwrap();
    let observer = Observer::new(
        "scheduler",
        Backend::nats(slow, "leases"),
        Duration::from_secs(1),
    )
    .unwrap();
    // Every value the observer's watch publishes, in order.
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::<Observed>::new()));
    let mut rx = observer.watch();
    let recorder = {
        let seen = seen.clone();
        tokio::spawn(async move {
            seen.lock().unwrap().push(rx.borrow_and_update().clone());
            while rx.changed().await.is_ok() {
                seen.lock().unwrap().push(rx.borrow_and_update().clone());
            }
        })
    };
    let ttl = Duration::from_secs(10);
    let log = WorkLog::new();
    let mut fleet = Vec::new();
    for i in 0..3 {
        fleet.push(Candidate::start(&s.url(), ttl, &format!("c{i}"), &log).await);
    }
    let mut tokens = Vec::new();
    for _ in 0..5 {
        let leaders: Vec<&Leader> = fleet.iter().map(|c| &c.leader).collect();
        let i = timeout(WAIT, wait_any_leader(&leaders)).await.unwrap();
        let token = fleet[i].leader.fencing_token().unwrap();
        tokens.push(token);
        // The observer reports this term before the next handoff.
        timeout(
            WAIT,
            observer
                .watch()
                .wait_for(|o| o.holder().and_then(|h| h.token()) == Some(token)),
        )
        .await
        .unwrap()
        .unwrap();
        fleet[i].leader.resign().await.unwrap();
        // The next term begins (a resigner waits before it campaigns).
        let leaders: Vec<&Leader> = fleet.iter().map(|c| &c.leader).collect();
        timeout(WAIT, async {
            loop {
                let j = wait_any_leader(&leaders).await;
                if leaders[j].fencing_token().is_some_and(|t| t > token) {
                    break;
                }
                let mut states: Vec<_> = leaders.iter().map(|l| l.state()).collect();
                let changes = states.iter_mut().map(|s| Box::pin(s.changed()));
                let _ = futures_util::future::select_all(changes).await;
            }
        })
        .await
        .unwrap();
    }
    let last = {
        let leaders: Vec<&Leader> = fleet.iter().map(|c| &c.leader).collect();
        let i = timeout(WAIT, wait_any_leader(&leaders)).await.unwrap();
        fleet[i].leader.fencing_token().unwrap()
    };
    timeout(
        WAIT,
        observer
            .watch()
            .wait_for(|o| o.holder().and_then(|h| h.token()) == Some(last)),
    )
    .await
    .unwrap()
    .unwrap();
    // A measurement window, not a wait for a state: replies still on the
    // slow link land in it.
    tokio::time::sleep(Duration::from_secs(2)).await;
    recorder.abort();
    for c in fleet {
        c.stop().await;
    }
    log.assert_safe();
    let seen = seen.lock().unwrap().clone();
    let held: Vec<u64> = seen
        .iter()
        .filter_map(|o| o.holder().and_then(|h| h.token()).map(|t| t.get()))
        .collect();
    let compact: Vec<String> = seen
        .iter()
        .map(|o| match o {
            Observed::Held(h) => format!(
                "Held(token {}, rev {})",
                h.token().map_or(0, |t| t.get()),
                h.revision()
            ),
            other => format!("{other:?}"),
        })
        .collect();
    println!("leaders' tokens {tokens:?} then {last}; the observer reported {compact:?}");
    for pair in held.windows(2) {
        assert!(
            pair[0] < pair[1],
            "the observer went back from term {} to {} (or reported a term twice): {compact:#?}",
            pair[0],
            pair[1]
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_whose_link_healed_takes_over_promptly_after_a_resign() {
    let s = prepared_server().await;
    let proxy = TcpProxy::start(s.addr()).await.unwrap();
    let ttl = Duration::from_secs(10);
    let log = WorkLog::new();
    let l = leader(&s.url(), ttl).await;
    let (tl, mut terms) = run_reporting_terms(&l, "l", &log);
    timeout(WAIT, terms.recv()).await.unwrap().unwrap();
    let f = leader(&format!("nats://{}", proxy.addr()), ttl).await;
    let (tf, _) = run_reporting_terms(&f, "f", &log);
    timeout(
        WAIT,
        f.state().wait_for(|s| {
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
    // F's link is down long enough for its watch to back off to the
    // longest pause between reconnects (5 s). A fault's duration, not a
    // wait for a state.
    proxy.cut();
    tokio::time::sleep(Duration::from_secs(8)).await;
    proxy.restore();
    // F's client is back.
    timeout(WAIT, proxy.wait_connections(1)).await.unwrap();
    assert!(l.state().borrow().is_leader());
    let t0 = Instant::now();
    l.resign().await.unwrap();
    // F learns of the release from its watch, far sooner than from its
    // retry timer (ttl/5) or a ttl of quiet; L itself waits a retry
    // interval before campaigning again.
    let took = timeout(
        Duration::from_millis(2500),
        f.state().wait_for(State::is_leader),
    )
    .await
    .map(|_| t0.elapsed());
    println!("F led {took:?} after the resign");
    let f_led = took.is_ok();
    l.shutdown().await.unwrap();
    f.shutdown().await.unwrap();
    tl.await.unwrap().unwrap();
    tf.await.unwrap().unwrap();
    log.assert_safe();
    assert!(f_led, "F did not lead within 2.5 s of the resign");
}
