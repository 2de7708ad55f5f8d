//! Real `nats-server` processes.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::time::Duration;

use leaseholder_testkit::{
    DEBIAN_NATS_SERVER, Error, MIN_NATS_VERSION, NatsCluster, NatsServer, find_nats_server,
};
use tokio::time::timeout;

/// Bound on a probe that should succeed promptly.
const PATIENCE: Duration = Duration::from_secs(10);

/// Bound on a probe that should hang (against a paused server).
const SHORT: Duration = Duration::from_millis(300);

async fn start() -> NatsServer {
    NatsServer::start()
        .await
        .unwrap_or_else(|e| panic!("starting nats-server failed (run scripts/setup?): {e}"))
}

#[tokio::test]
async fn starts_ready_with_a_supported_version() {
    let server = start().await;
    assert_eq!(server.url(), format!("nats://127.0.0.1:{}", server.port()));
    assert_eq!(server.addr().port(), server.port());
    assert!(server.addr().ip().is_loopback());
    let version = server.version_major_minor().expect("version parses");
    assert!(
        version >= MIN_NATS_VERSION,
        "version {} is older than {MIN_NATS_VERSION:?}",
        server.version()
    );
    let pinged = timeout(PATIENCE, server.ping()).await.unwrap().unwrap();
    assert_eq!(pinged, server.version());
    assert!(server.dir().join("jetstream").is_dir());
}

#[tokio::test]
async fn restart_keeps_the_port_and_answers_again() {
    let mut server = start().await;
    let port = server.port();
    let pid = server.pid();

    server.kill().await.unwrap();
    assert!(
        timeout(PATIENCE, server.ping()).await.unwrap().is_err(),
        "a killed server must not answer"
    );

    server.restart().await.unwrap();
    assert_eq!(server.port(), port);
    assert_ne!(server.pid(), pid);
    timeout(PATIENCE, server.ping()).await.unwrap().unwrap();

    // Restarting a running server works too.
    server.restart().await.unwrap();
    assert_eq!(server.port(), port);
    timeout(PATIENCE, server.ping()).await.unwrap().unwrap();
}

#[tokio::test]
async fn pause_stops_answers_and_resume_brings_them_back() {
    let server = start().await;
    server.pause().unwrap();
    assert!(
        timeout(SHORT, server.ping()).await.is_err(),
        "a paused server must not answer PING"
    );
    server.resume().unwrap();
    timeout(PATIENCE, server.ping()).await.unwrap().unwrap();
}

#[tokio::test]
async fn two_servers_run_side_by_side() {
    let (a, b) = tokio::join!(start(), start());
    assert_ne!(a.port(), b.port());
    assert_ne!(a.name(), b.name());
    assert_ne!(a.dir(), b.dir());
    timeout(PATIENCE, a.ping()).await.unwrap().unwrap();
    timeout(PATIENCE, b.ping()).await.unwrap().unwrap();
}

#[test]
fn missing_version_names_the_setup_script() {
    let error = find_nats_server((99, 0), None).unwrap_err();
    assert!(
        matches!(error, Error::MissingBinary { .. }),
        "unexpected error: {error:?}"
    );
    let message = error.to_string();
    assert!(message.contains("scripts/setup"), "{message}");
    assert!(message.contains("99.0"), "{message}");
}

/// Debian's 2.9 build is the "unsupported server" of the backend tests, so
/// it must be installed: this fails (rather than skips) without it.
#[tokio::test]
async fn debian_nats_server_2_9_starts() {
    assert!(
        Path::new(DEBIAN_NATS_SERVER).is_file(),
        "{DEBIAN_NATS_SERVER} is missing; install it with scripts/setup"
    );
    let binary = find_nats_server((2, 9), Some((2, 9)))
        .unwrap_or_else(|e| panic!("no nats-server 2.9 (run scripts/setup): {e}"));
    let server = NatsServer::start_with(&binary).await.unwrap();
    assert_eq!(server.version_major_minor(), Some((2, 9)));
    assert!(server.version().starts_with("2.9."), "{}", server.version());

    let server = NatsServer::start_version((2, 9), Some((2, 9)))
        .await
        .unwrap();
    assert_eq!(server.version_major_minor(), Some((2, 9)));
}

#[tokio::test]
async fn a_binary_that_exits_fails_fast_instead_of_waiting() {
    let started = std::time::Instant::now();
    let error = NatsServer::start_with(Path::new("/bin/false"))
        .await
        .unwrap_err();
    assert!(
        matches!(error, Error::CommandFailed { .. }),
        "unexpected error: {error:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_three_node_cluster_survives_losing_a_node() {
    let started = std::time::Instant::now();
    let mut cluster = NatsCluster::start(3)
        .await
        .unwrap_or_else(|e| panic!("starting a nats cluster failed (run scripts/setup?): {e}"));
    println!("3-node cluster ready in {:?}", started.elapsed());
    assert_eq!(cluster.len(), 3);
    let urls = cluster.urls();
    assert_eq!(urls.split(',').count(), 3, "{urls}");
    let names: std::collections::HashSet<_> = cluster.nodes().iter().map(|n| n.name()).collect();
    assert_eq!(names.len(), 3);
    for node in cluster.nodes() {
        assert!(urls.contains(&node.url()), "{urls}");
        timeout(PATIENCE, node.ping()).await.unwrap().unwrap();
    }
    for i in 0..3 {
        let jsz = timeout(PATIENCE, cluster.jsz(i)).await.unwrap().unwrap();
        assert!(jsz.contains("\"meta_cluster\""), "{jsz}");
    }

    cluster.kill(1).await.unwrap();
    assert!(
        timeout(PATIENCE, cluster.node(1).ping())
            .await
            .unwrap()
            .is_err(),
        "a killed node must not answer"
    );
    for i in [0, 2] {
        timeout(PATIENCE, cluster.node(i).ping())
            .await
            .unwrap()
            .unwrap();
    }
    assert!(!cluster.urls_except(1).contains(&cluster.url(1)));

    cluster.restart(1).await.unwrap();
    for node in cluster.nodes() {
        timeout(PATIENCE, node.ping()).await.unwrap().unwrap();
    }
}

/// Polls `routes(i)` (every 50 ms, within [`PATIENCE`]) until `ok` holds.
async fn routes_until(cluster: &NatsCluster, i: usize, what: &str, ok: impl Fn(usize) -> bool) {
    let mut last = None;
    let reached = timeout(PATIENCE, async {
        loop {
            if let Ok(n) = cluster.routes(i).await {
                last = Some(n);
                if ok(n) {
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    assert!(reached.is_ok(), "node {i}: {what}; routes: {last:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_isolated_node_has_no_route_until_healed_and_its_clients_still_reach_it() {
    let cluster = NatsCluster::start(3)
        .await
        .unwrap_or_else(|e| panic!("starting a nats cluster failed (run scripts/setup?): {e}"));
    for i in 0..3 {
        routes_until(&cluster, i, "routes to both peers", |n| n >= 2).await;
    }
    // Every route runs through the per-link proxies.
    assert!(cluster.link(0, 1).connections() + cluster.link(1, 0).connections() > 0);

    cluster.isolate(0);
    routes_until(&cluster, 0, "no route once isolated", |n| n == 0).await;
    for i in [1, 2] {
        routes_until(&cluster, i, "its route to the other peer only", |n| n > 0).await;
    }
    // No route around the proxies: node 0 learned its peers' addresses
    // from their gossip, and every one of them refuses. Both sides keep
    // redialling meanwhile (NATS retries a route every second).
    let held = async {
        for _ in 0..30 {
            assert_eq!(
                cluster.routes(0).await.unwrap(),
                0,
                "a route around the cut"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    timeout(PATIENCE, held).await.unwrap();
    // Its clients still reach it.
    timeout(PATIENCE, cluster.node(0).ping())
        .await
        .unwrap()
        .unwrap();

    cluster.heal(0);
    routes_until(&cluster, 0, "routes again once healed", |n| n >= 2).await;
}
