//! Real etcd processes: a single member and a 3-member cluster.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use leaseholder_testkit::{
    ETCD_ELECTION_TIMEOUT, EtcdCluster, EtcdServer, MIN_ETCD_VERSION, etcd_version_accepted,
    find_etcd, find_etcdctl,
};
use tokio::time::timeout;

/// Bound on something that should succeed promptly (`etcdctl` itself gives
/// up after 2 s without a connection, 5 s without an answer).
const PATIENCE: Duration = Duration::from_secs(10);

/// Bound on a probe that should hang (against a paused server).
const SHORT: Duration = Duration::from_millis(300);

async fn start() -> EtcdServer {
    let started = Instant::now();
    let server = EtcdServer::start()
        .await
        .unwrap_or_else(|e| panic!("starting etcd failed (run scripts/setup?): {e}"));
    println!("etcd ready in {:?}", started.elapsed());
    server
}

async fn ctl(server: &EtcdServer, args: &[&str]) -> String {
    timeout(PATIENCE, server.ctl(args)).await.unwrap().unwrap()
}

async fn ping(server: &EtcdServer) {
    timeout(PATIENCE, server.ping()).await.unwrap().unwrap();
}

#[test]
fn finds_supported_binaries() {
    for binary in [find_etcd().unwrap(), find_etcdctl().unwrap()] {
        assert!(binary.is_file(), "{}", binary.display());
    }
}

#[tokio::test]
async fn starts_and_answers() {
    let server = start().await;
    assert_eq!(
        server.endpoint(),
        format!("http://127.0.0.1:{}", server.client_port())
    );
    assert_eq!(server.addr().port(), server.client_port());
    assert!(server.addr().ip().is_loopback());
    assert_ne!(server.peer_port(), server.client_port());
    assert!(
        etcd_version_accepted(server.version()),
        "version {} is older than {MIN_ETCD_VERSION:?}",
        server.version()
    );
    ping(&server).await;

    // A single member is its own leader.
    let status = timeout(PATIENCE, server.status()).await.unwrap().unwrap();
    assert_eq!(status.member_id, server.member_id());
    assert!(status.is_leader(), "{status:?}");
    assert_eq!(status.version, server.version());

    assert_eq!(ctl(&server, &["put", "greeting", "hello"]).await, "OK");
    assert_eq!(ctl(&server, &["get", "greeting"]).await, "greeting\nhello");
    assert_eq!(
        ctl(&server, &["get", "greeting", "--print-value-only"]).await,
        "hello"
    );
    assert_eq!(ctl(&server, &["get", "missing"]).await, "");
    let members = ctl(&server, &["member", "list"]).await;
    assert!(members.contains(server.name()), "{members}");
    assert!(members.contains(&server.endpoint()), "{members}");
    assert!(
        members.contains(&format!("{:x}", server.member_id())),
        "{members}"
    );
    assert!(server.dir().join("data").join("member").is_dir());
    assert!(server.dir().join("etcd.log").is_file());

    let dir = server.dir().to_owned();
    drop(server);
    assert!(!dir.exists(), "{} was not removed", dir.display());
}

#[tokio::test]
async fn a_failed_command_is_an_error_with_etcdctls_output() {
    let server = start().await;
    let error = timeout(PATIENCE, server.ctl(&["no-such-command"]))
        .await
        .unwrap()
        .unwrap_err();
    let message = error.to_string();
    assert!(message.contains("no-such-command"), "{message}");
    // A server-side error: a transaction on a lease that does not exist.
    let error = timeout(PATIENCE, server.ctl(&["put", "k", "v", "--lease=1234abcd"]))
        .await
        .unwrap()
        .unwrap_err();
    assert!(
        error.to_string().contains("requested lease not found"),
        "{error}"
    );
}

#[tokio::test]
async fn restart_keeps_the_ports_and_the_data() {
    let mut server = start().await;
    let (client_port, peer_port, pid) = (server.client_port(), server.peer_port(), server.pid());
    let member_id = server.member_id();
    ctl(&server, &["put", "key", "value"]).await;

    server.kill().await.unwrap();
    assert!(
        timeout(PATIENCE, server.ping()).await.unwrap().is_err(),
        "a killed server must not answer"
    );
    let started = Instant::now();
    server.restart().await.unwrap();
    println!("killed member restarted in {:?}", started.elapsed());
    assert_eq!(
        (server.client_port(), server.peer_port()),
        (client_port, peer_port)
    );
    assert_ne!(server.pid(), pid);
    assert_eq!(server.member_id(), member_id);
    assert_eq!(
        ctl(&server, &["get", "key", "--print-value-only"]).await,
        "value"
    );

    // Restarting a running server works too, and keeps the data.
    ctl(&server, &["put", "second", "2"]).await;
    server.restart().await.unwrap();
    assert_eq!(
        ctl(&server, &["get", "", "--prefix", "--keys-only"]).await,
        "key\n\nsecond"
    );
}

#[tokio::test]
async fn pause_makes_ping_time_out_and_resume_brings_it_back() {
    let server = start().await;
    server.pause().unwrap();
    assert!(
        timeout(SHORT, server.ping()).await.is_err(),
        "a paused server must not answer GET /health"
    );
    assert!(
        timeout(SHORT, server.status()).await.is_err(),
        "a paused server must not answer a status request"
    );
    server.resume().unwrap();
    ping(&server).await;
    assert_eq!(ctl(&server, &["put", "k", "v"]).await, "OK");
}

#[tokio::test]
async fn a_paused_server_can_be_killed_and_restarted() {
    let mut server = start().await;
    server.pause().unwrap();
    server.kill().await.unwrap();
    server.restart().await.unwrap();
    ping(&server).await;
}

#[tokio::test]
async fn two_servers_run_side_by_side() {
    let (a, b) = tokio::join!(start(), start());
    assert_ne!(a.client_port(), b.client_port());
    ctl(&a, &["put", "k", "a"]).await;
    assert_eq!(ctl(&b, &["get", "k"]).await, "");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_survives_the_loss_of_its_leader_and_takes_it_back() {
    let started = Instant::now();
    let mut cluster = EtcdCluster::start(3)
        .await
        .unwrap_or_else(|e| panic!("starting an etcd cluster failed (run scripts/setup?): {e}"));
    println!("3-member cluster ready in {:?}", started.elapsed());
    assert_eq!(cluster.len(), 3);
    assert!(!cluster.is_empty());
    let endpoints = cluster.endpoints();
    assert_eq!(endpoints.len(), 3);
    for (member, endpoint) in cluster.members().iter().zip(&endpoints) {
        assert_eq!(&member.endpoint(), endpoint);
    }

    // One leader, and every member knows it.
    let leader = cluster.leader_index().await.unwrap();
    let leader_id = cluster.member(leader).member_id();
    for member in cluster.members() {
        let status = timeout(PATIENCE, member.status()).await.unwrap().unwrap();
        assert_eq!(status.leader, leader_id, "{status:?}");
        assert_eq!(status.is_leader(), member.member_id() == leader_id);
    }
    let status = timeout(PATIENCE, cluster.ctl(&["endpoint", "status"]))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(status.lines().count(), 3, "{status}");
    assert_eq!(
        status
            .lines()
            .filter(|line| line.contains(", true, "))
            .count(),
        1,
        "{status}"
    );
    let members = ctl(cluster.member(0), &["member", "list"]).await;
    assert_eq!(members.lines().count(), 3, "{members}");

    // Written through one member, read through another.
    let follower = (leader + 1) % 3;
    assert_eq!(
        ctl(cluster.member(leader), &["put", "k", "before"]).await,
        "OK"
    );
    assert_eq!(
        ctl(
            cluster.member(follower),
            &["get", "k", "--print-value-only"]
        )
        .await,
        "before"
    );

    // The leader dies; the other two elect a new one and take writes.
    cluster.kill(leader).await.unwrap();
    let killed = Instant::now();
    let new_leader = cluster.wait_leader().await.unwrap();
    let elected = killed.elapsed();
    println!(
        "new leader {new_leader} (was {leader}) in {elected:?} (election timeout {ETCD_ELECTION_TIMEOUT:?})"
    );
    assert_ne!(new_leader, leader);
    assert_eq!(
        ctl(cluster.member(follower), &["put", "k", "after"]).await,
        "OK"
    );
    // Through every endpoint, the dead one included.
    let put = timeout(PATIENCE, cluster.ctl(&["put", "k2", "after"])).await;
    assert_eq!(put.unwrap().unwrap(), "OK");
    assert!(
        timeout(PATIENCE, cluster.member(leader).ping())
            .await
            .unwrap()
            .is_err(),
        "a killed member must not answer"
    );

    // The killed member rejoins with its data and catches up.
    let restarted = Instant::now();
    cluster.restart(leader).await.unwrap();
    println!("killed member rejoined in {:?}", restarted.elapsed());
    assert_eq!(
        ctl(cluster.member(leader), &["get", "k", "--print-value-only"]).await,
        "after"
    );
    assert_eq!(cluster.member(leader).member_id(), leader_id);
    let members = ctl(cluster.member(leader), &["member", "list"]).await;
    assert_eq!(members.lines().count(), 3, "{members}");
    cluster.wait_healthy().await.unwrap();
    assert!(cluster.leader_index().await.is_ok());
}

/// The first member among `members` that says it is the Raft leader,
/// asked until `PATIENCE` runs out.
async fn leader_among(cluster: &EtcdCluster, members: &[usize]) -> Option<usize> {
    timeout(PATIENCE, async {
        loop {
            for &i in members {
                if let Ok(Ok(status)) = timeout(SHORT, cluster.member(i).status()).await
                    && status.is_leader()
                {
                    return i;
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_isolated_leader_steps_down_the_others_elect_one_and_it_rejoins_when_healed() {
    let cluster = EtcdCluster::start(3)
        .await
        .unwrap_or_else(|e| panic!("starting an etcd cluster failed (run scripts/setup?): {e}"));
    let leader = cluster.leader_index().await.unwrap();
    let others: Vec<usize> = (0..3).filter(|&i| i != leader).collect();
    for member in cluster.members() {
        assert_ne!(member.advertised_peer_port(), member.peer_port());
    }
    assert_eq!(
        ctl(cluster.member(leader), &["put", "k", "before"]).await,
        "OK"
    );

    cluster.isolate(leader).unwrap();
    let cut = Instant::now();
    // The majority elects a leader among themselves...
    let new_leader = leader_among(&cluster, &others)
        .await
        .expect("the majority elects a leader");
    println!(
        "m{new_leader} leads {:?} after m{leader} was cut off",
        cut.elapsed()
    );
    // ...and the cut-off member steps down (etcd checks its quorum).
    let stepped_down = timeout(PATIENCE, async {
        loop {
            match timeout(SHORT, cluster.member(leader).status()).await {
                Ok(Ok(status)) if !status.is_leader() => return,
                _ => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    })
    .await;
    assert!(
        stepped_down.is_ok(),
        "the isolated leader never stepped down"
    );
    // Its clients still reach it, but without a quorum it takes no write.
    let put = timeout(
        PATIENCE,
        cluster
            .member(leader)
            .ctl(&["put", "k", "cut", "--command-timeout=1s"]),
    )
    .await
    .expect("etcdctl gives up by its command timeout");
    assert!(put.is_err(), "a write through the isolated member: {put:?}");
    assert_eq!(
        ctl(cluster.member(new_leader), &["put", "k", "during"]).await,
        "OK"
    );

    // Healed, it rejoins and catches up.
    cluster.heal(leader);
    timeout(Duration::from_secs(40), cluster.wait_healthy())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        ctl(cluster.member(leader), &["get", "k", "--print-value-only"]).await,
        "during"
    );
}

#[test]
fn a_cluster_needs_a_member() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let error = runtime.block_on(EtcdCluster::start(0)).unwrap_err();
    assert!(error.to_string().contains("at least 1 member"), "{error}");
}
