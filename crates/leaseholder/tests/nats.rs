//! The `Leader` on a real nats-server: server version check, bucket
//! validation, handoff through the KV watch, failover after a crash whose
//! link the testkit proxy cut.
#![cfg(feature = "nats")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::time::Duration;

use leaseholder::{Backend, BackendError, Error, Leader, Op, State};
use leaseholder_testkit::{DEBIAN_NATS_SERVER, NatsServer, TcpProxy};
use tokio::time::{Instant, timeout};

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

/// Runs `acquire_and_run` on `l` with work that reports each term and
/// waits for its token.
fn run_reporting_terms(
    l: &Leader,
) -> (
    tokio::task::JoinHandle<Result<(), Error>>,
    tokio::sync::mpsc::UnboundedReceiver<leaseholder::Term>,
) {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let l = l.clone();
    let task = tokio::spawn(async move {
        l.acquire_and_run(move |term| {
            let tx = tx.clone();
            async move {
                tx.send(term.clone()).unwrap();
                term.cancelled().await;
                Ok::<_, std::io::Error>(())
            }
        })
        .await
    });
    (task, rx)
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resign_hands_over_through_the_watch() {
    let s = server().await;
    let ttl = Duration::from_secs(10);
    let a = leader(&s.url(), ttl).await;
    let b = leader(&s.url(), ttl).await;
    let ta = started(&a);
    timeout(WAIT, a.state().wait_for(State::is_leader))
        .await
        .unwrap()
        .unwrap();
    let tb = started(&b);
    let mut sb = b.state();
    timeout(
        WAIT,
        sb.wait_for(|s| matches!(s, State::Follower { leader: Some(_) })),
    )
    .await
    .unwrap()
    .unwrap();
    let first = a.fencing_token().unwrap();
    let t0 = Instant::now();
    a.resign().await.unwrap();
    timeout(WAIT, sb.wait_for(State::is_leader))
        .await
        .unwrap()
        .unwrap();
    let took = t0.elapsed();
    println!("handoff on NATS took {took:?}");
    // Through the watch: far below the 2 s retry interval and the ttl.
    assert!(took < ttl / 5, "{took:?}");
    assert!(b.fencing_token().unwrap() > first);
    a.shutdown().await.unwrap();
    b.shutdown().await.unwrap();
    ta.await.unwrap().unwrap();
    tb.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_off_leader_is_replaced_after_its_lease_expires() {
    let s = server().await;
    let proxy = TcpProxy::start(s.addr()).await.unwrap();
    let ttl = Duration::from_secs(2);
    let a = leader(&format!("nats://{}", proxy.addr()), ttl).await;
    let b = leader(&s.url(), ttl).await;
    let (ta, mut rx) = run_reporting_terms(&a);
    let term = timeout(WAIT, rx.recv()).await.unwrap().unwrap();
    let tb = started(&b);
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
    timeout(WAIT, term.cancelled()).await.unwrap();
    let cancelled = Instant::now();
    timeout(WAIT, sb.wait_for(State::is_leader))
        .await
        .unwrap()
        .unwrap();
    let took_over = Instant::now();
    println!(
        "token fired {:?} after the cut; B led {:?} after the cut",
        cancelled - cut,
        took_over - cut
    );
    assert!(cancelled <= took_over);
    assert!(b.fencing_token().unwrap() > term.fencing_token());
    b.shutdown().await.unwrap();
    tb.await.unwrap().unwrap();
    ta.abort();
}

/// Waits until some leader of `leaders` leads; its index.
async fn wait_any_leader(leaders: &[&Leader]) -> usize {
    let mut states: Vec<_> = leaders.iter().map(|l| l.state()).collect();
    loop {
        if let Some(i) = states.iter().position(|s| s.borrow().is_leader()) {
            return i;
        }
        let changes = states.iter_mut().map(|s| Box::pin(s.changed()));
        let _ = futures_util::future::select_all(changes).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_campaign_recovers_after_the_server_restarts_on_its_data_dir() {
    let mut s = server().await;
    let ttl = Duration::from_secs(2);
    let a = leader(&s.url(), ttl).await;
    let b = leader(&s.url(), ttl).await;
    let (ta, tb) = (started(&a), started(&b));
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
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_server_past_the_ttl_cancels_the_leader_then_recovers() {
    let s = server().await;
    let ttl = Duration::from_secs(2);
    let a = leader(&s.url(), ttl).await;
    let (ta, mut rx) = run_reporting_terms(&a);
    let term = timeout(WAIT, rx.recv()).await.unwrap().unwrap();
    s.pause().unwrap();
    // No renewal can succeed: the token fires by the deadline.
    timeout(WAIT, term.cancelled()).await.unwrap();
    assert!(!term.is_valid());
    s.resume().unwrap();
    // After the resume the campaign wins a new term with a larger token.
    let next = timeout(WAIT, rx.recv()).await.unwrap().unwrap();
    assert!(next.fencing_token() > term.fencing_token());
    a.shutdown().await.unwrap();
    ta.await.unwrap().unwrap();
}
