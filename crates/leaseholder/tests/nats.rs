//! The `Leader` on a real nats-server: server version check, bucket
//! validation, handoff through the KV watch, failover after a crash whose
//! link the testkit proxy cut.
#![cfg(feature = "nats")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::time::Duration;

use leaseholder::{Backend, BackendError, Error, Leader, Op, State};
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
    let err = timeout(
        WAIT,
        l.acquire_and_run(|_| async { Ok::<_, std::io::Error>(()) }),
    )
    .await
    .unwrap()
    .unwrap_err();
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
    let s = server().await;
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
                    s.is_leader() || matches!(s, State::Follower { leader: Some(_) })
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
    let s = server().await;
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
        sb.wait_for(|s| matches!(s, State::Follower { leader: Some(_) })),
    )
    .await
    .unwrap()
    .unwrap();
    proxy.cut();
    let cut = Instant::now();
    // A's token fires at its deadline, before the store lets B in.
    let next = timeout(WAIT, log.wait_for_start(2)).await.unwrap();
    assert_eq!(next.who, "b");
    let ended = log.intervals()[0].end.expect("A's work has ended");
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
    let mut s = server().await;
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
    let s = server().await;
    let ttl = Duration::from_secs(2);
    let a = leader(&s.url(), ttl).await;
    let b = leader(&s.url(), ttl).await;
    let log = WorkLog::new();
    let (ta, mut rx) = run_reporting_terms(&a, "a", &log);
    let term = timeout(WAIT, rx.recv()).await.unwrap().unwrap();
    let (tb, _) = run_reporting_terms(&b, "b", &log);
    timeout(
        WAIT,
        b.state()
            .wait_for(|s| matches!(s, State::Follower { leader: Some(_) })),
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
    let s = server().await;
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
        sa.wait_for(|s| matches!(s, State::Follower { leader: Some(_) })),
    )
    .await
    .unwrap()
    .unwrap()
    .clone();
    let State::Follower {
        leader: Some(holder),
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
    let s = server().await;
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
    let ttl = Duration::from_secs(10);
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
    let s = server().await;
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
        Error::Backend { source, .. } => {
            assert!(
                matches!(**source, BackendError::Misconfigured { .. }),
                "{err}"
            );
        }
        other => panic!("{other}"),
    }
    println!("{err}");
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
    async fn setup(&self) -> Result<leaseholder::Prepared, BackendError> {
        self.inner.setup().await
    }
    async fn acquire(
        &self,
        key: &leaseholder::Key,
        claim: &leaseholder::Claim,
        ttl: Duration,
    ) -> Result<leaseholder::Acquired, BackendError> {
        self.count();
        self.inner.acquire(key, claim, ttl).await
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
    ) -> Result<(), BackendError> {
        self.count();
        self.inner.release(key, lease).await
    }
    async fn holder(
        &self,
        key: &leaseholder::Key,
    ) -> Result<Option<leaseholder::Holder>, BackendError> {
        self.count();
        self.inner.holder(key).await
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
    let s = server().await;
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
        b.state()
            .wait_for(|s| matches!(s, State::Follower { leader: Some(_) })),
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
