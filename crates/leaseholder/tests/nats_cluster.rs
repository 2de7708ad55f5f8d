//! The `Leader` on a 3-node nats-server cluster with a replicated (R3)
//! bucket: the conformance suite passes against it, and a leader whose only
//! node dies is replaced by a leader on the surviving nodes.
#![cfg(feature = "nats")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use async_nats::jetstream::stream::{self, DiscardPolicy};
use leaseholder::{Backend, Error, Leader, State};
use leaseholder_testkit::{NatsCluster, WorkLog};
use tokio::time::{Instant, timeout};

mod support;
use support::wait_any_leader;

const WAIT: Duration = Duration::from_secs(30);

const BUCKET: &str = "leases";

/// The servers in a comma-separated URL list (async-nats parses a `&str`
/// as one URL, so a list is passed as a `Vec`).
fn servers(urls: &str) -> Vec<async_nats::ServerAddr> {
    urls.split(',').map(|url| url.parse().unwrap()).collect()
}

async fn cluster() -> NatsCluster {
    let t0 = Instant::now();
    let cluster = NatsCluster::start(3)
        .await
        .expect("a 3-node cluster of nats-server 2.11+ is needed: run scripts/setup");
    println!("3-node cluster ready in {:?}", t0.elapsed());
    cluster
}

/// Creates the bucket's stream replicated on all three nodes, as the
/// backend's setup would have created it with one replica; returns the
/// name of the server leading the stream.
async fn create_replicated_bucket(urls: &str, bucket: &str) -> String {
    let client = async_nats::connect(servers(urls)).await.unwrap();
    let js = async_nats::jetstream::new(client);
    let config = stream::Config {
        name: format!("KV_{bucket}"),
        subjects: vec![format!("$KV.{bucket}.>")],
        max_messages_per_subject: 1,
        allow_rollup: true,
        deny_delete: true,
        allow_direct: true,
        discard: DiscardPolicy::New,
        allow_message_ttl: true,
        subject_delete_marker_ttl: Some(Duration::from_secs(60)),
        num_replicas: 3,
        // As setup would: tokens keep increasing if the bucket is ever
        // re-created (setup refuses a bucket without this).
        first_sequence: Some(
            u64::try_from(
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_micros(),
            )
            .unwrap(),
        ),
        ..Default::default()
    };
    // A young cluster can time out placing an R3 stream while its peers
    // catch up with the meta leader; creating the same config again is
    // idempotent, so retry until it lands.
    let deadline = Instant::now() + WAIT;
    let mut stream = loop {
        match js.create_stream(config.clone()).await {
            Ok(stream) => break stream,
            Err(e) if Instant::now() < deadline => {
                println!("creating the R3 stream: {e}; retrying");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => panic!("the R3 stream was not created within {WAIT:?}: {e}"),
        }
    };
    let info = stream.info().await.unwrap();
    assert_eq!(info.config.num_replicas, 3);
    info.cluster
        .as_ref()
        .and_then(|c| c.leader.clone())
        .expect("the replicated stream has a leader")
}

#[cfg(feature = "conformance")]
mod conformance_on_a_cluster {
    use std::time::Duration;

    use async_nats::HeaderMap;
    use leaseholder::conformance::{self, Harness};
    use leaseholder::{Backend, BoxError, Key};
    use leaseholder_testkit::NatsCluster;

    use super::{BUCKET, cluster, create_replicated_bucket, servers};

    struct Nats {
        cluster: NatsCluster,
        bucket: String,
    }

    impl Harness for Nats {
        async fn backend(&self) -> Backend {
            let client = async_nats::connect(servers(&self.cluster.urls()))
                .await
                .unwrap();
            Backend::nats(client, &self.bucket)
        }

        async fn put_foreign(
            &self,
            key: &Key,
            value: &[u8],
            ttl: Duration,
        ) -> Result<(), BoxError> {
            let client = async_nats::connect(servers(&self.cluster.urls())).await?;
            let js = async_nats::jetstream::new(client);
            let mut headers = HeaderMap::new();
            headers.insert("Nats-TTL", format!("{}s", ttl.as_secs().max(1)).as_str());
            js.publish_with_headers(
                format!("$KV.{}.{key}", self.bucket),
                headers,
                value.to_vec().into(),
            )
            .await?
            .await?;
            Ok(())
        }

        fn ttl(&self) -> Duration {
            Duration::from_secs(1)
        }

        fn expiry_slack(&self) -> Duration {
            Duration::from_secs(2)
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn nats_cluster_passes_the_contract() {
        let cluster = cluster().await;
        create_replicated_bucket(&cluster.urls(), BUCKET).await;
        let harness = Nats {
            cluster,
            bucket: BUCKET.into(),
        };
        let report = conformance::run(&harness).await;
        println!("{report}");
        assert!(report.is_ok(), "{report}\n{:#?}", report.failed);
        // Only the multi-process row may be unsupported: this harness starts
        // no child processes (the single-node real-server suites do).
        assert!(
            report
                .unsupported
                .iter()
                .all(|(row, _)| row.contains("process")),
            "{report}"
        );
    }
}

/// A leader whose client talks to `urls` only: servers the cluster
/// advertises are ignored, so losing those nodes cuts it off.
async fn leader(urls: &str, ttl: Duration) -> Leader {
    let client = async_nats::ConnectOptions::new()
        .ignore_discovered_servers()
        .connect(servers(urls))
        .await
        .unwrap();
    Leader::builder("scheduler")
        .backend(Backend::nats(client, BUCKET))
        .ttl(ttl)
        .build()
        .unwrap()
}

/// Runs `acquire_and_run` on `l`: the work records its interval in `log`
/// as `who`; the first term is sent back.
fn run(
    l: &Leader,
    who: &str,
    log: &WorkLog,
) -> (
    tokio::task::JoinHandle<Result<(), Error>>,
    tokio::sync::oneshot::Receiver<leaseholder::Term>,
) {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let tx = std::sync::Arc::new(std::sync::Mutex::new(Some(tx)));
    let (l, who, log) = (l.clone(), who.to_owned(), log.clone());
    let task = tokio::spawn(async move {
        l.acquire_and_run(move |term| {
            let (tx, who, log) = (tx.clone(), who.clone(), log.clone());
            async move {
                let _working = log.begin(who, term.fencing_token().get());
                if let Some(tx) = tx.lock().unwrap().take() {
                    let _ = tx.send(term.clone());
                }
                term.cancelled().await;
                Ok::<_, std::io::Error>(())
            }
        })
        .await
    });
    (task, rx)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn losing_the_leaders_node_hands_over_to_a_leader_on_the_others() {
    let mut cluster = cluster().await;
    let stream_leader = create_replicated_bucket(&cluster.urls(), BUCKET).await;
    // A talks to the node leading the bucket's stream: killing it takes
    // away both A's link and the stream's leader.
    let i = cluster
        .nodes()
        .iter()
        .position(|n| n.name() == stream_leader)
        .expect("the stream leader is a node of the cluster");
    let ttl = Duration::from_secs(2);
    let a = leader(&cluster.url(i), ttl).await;
    let b = leader(&cluster.urls_except(i), ttl).await;
    let log = WorkLog::new();
    let (ta, term) = run(&a, "a", &log);
    let term = timeout(WAIT, term).await.unwrap().unwrap();
    let (tb, _) = run(&b, "b", &log);
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

    cluster.kill(i).await.unwrap();
    let killed = Instant::now();
    // A cannot renew through a dead node: its work is cancelled. The two
    // survivors keep a quorum: B is elected through them.
    let next = timeout(WAIT, log.wait_for_start(2)).await.unwrap();
    assert_eq!(next.who, "b");
    assert!(term.is_cancelled() && !term.is_valid());
    let ended = timeout(WAIT, log.wait_for_end(0))
        .await
        .expect("A's work ends")
        .end
        .expect("an ended interval has an end");
    println!(
        "killed node {i} (stream leader {stream_leader}): A's work ended {:?} after the kill; \
         B's began {:?} after the kill",
        ended - killed,
        next.start - killed
    );
    assert!(next.token > term.fencing_token().get());
    b.shutdown().await.unwrap();
    let tb: Result<(), Error> = tb.await.unwrap();
    tb.unwrap();
    log.assert_safe();
    ta.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_restarted_under_a_connected_candidate_does_not_end_its_campaign() {
    let mut cluster = cluster().await;
    let stream_leader = create_replicated_bucket(&cluster.urls(), BUCKET).await;
    // A talks to the node leading the bucket's stream, and only to it:
    // while that node restarts A's requests fail, then go to a node whose
    // JetStream is still catching up (no responders, no stream leader).
    let i = cluster
        .nodes()
        .iter()
        .position(|n| n.name() == stream_leader)
        .expect("the stream leader is a node of the cluster");
    let ttl = Duration::from_secs(2);
    let a = leader(&cluster.url(i), ttl).await;
    let b = leader(&cluster.urls_except(i), ttl).await;
    let log = WorkLog::new();
    let (ta, first) = run(&a, "a", &log);
    let first = timeout(WAIT, first).await.unwrap().unwrap();
    let (tb, _) = run(&b, "b", &log);
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

    // A quick restart (A's lease may survive it), then a node down for
    // longer than the ttl (B takes over) and back.
    let t0 = Instant::now();
    cluster.restart(i).await.unwrap();
    println!(
        "node {i} (stream leader {stream_leader}) back after {:?}",
        t0.elapsed()
    );
    let token = a_leads_again(&a, &b, &ta).await;
    println!(
        "A leads {:?} after the restart with token {token} (first term {}, {})",
        t0.elapsed(),
        first.fencing_token(),
        if first.is_valid() {
            "still valid"
        } else {
            "ended"
        }
    );
    assert!(token >= first.fencing_token());
    // A's work for that term starts just after its state says it leads:
    // count the intervals once it has.
    let terms = loop {
        let all = log.intervals();
        if all.iter().any(|t| t.who == "a" && t.token == token.get()) {
            break all.len();
        }
        timeout(WAIT, log.wait_for_start(all.len() + 1))
            .await
            .unwrap();
    };
    cluster.kill(i).await.unwrap();
    let killed = Instant::now();
    let next = timeout(WAIT, log.wait_for_start(terms + 1)).await.unwrap();
    assert_eq!(next.who, "b");
    cluster.restart(i).await.unwrap();
    println!(
        "node {i} killed: B led {:?} later; node back {:?} after the kill",
        next.start - killed,
        killed.elapsed()
    );
    let again = a_leads_again(&a, &b, &ta).await;
    println!(
        "A leads again {:?} after the kill, token {again}",
        killed.elapsed()
    );
    assert!(again > token);
    a.shutdown().await.unwrap();
    b.shutdown().await.unwrap();
    ta.await.unwrap().unwrap();
    tb.await.unwrap().unwrap();
    log.assert_safe();
}

/// Waits until A leads, making B resign whenever B leads (B then waits a
/// retry interval before it campaigns again, so a campaigning A gets the
/// key). Fails if A's campaign ends. A's token.
async fn a_leads_again(
    a: &Leader,
    b: &Leader,
    ta: &tokio::task::JoinHandle<Result<(), Error>>,
) -> leaseholder::FencingToken {
    let deadline = Instant::now() + WAIT;
    loop {
        assert!(
            !a.state().borrow().is_stopped() && !ta.is_finished(),
            "A's campaign ended"
        );
        let who = timeout(
            deadline.saturating_duration_since(Instant::now()),
            wait_any_leader(&[a, b]),
        )
        .await
        .expect("A did not lead again");
        if who == 0
            && let Some(token) = a.fencing_token()
        {
            return token;
        }
        if who == 1 {
            b.resign().await.unwrap();
        }
    }
}
