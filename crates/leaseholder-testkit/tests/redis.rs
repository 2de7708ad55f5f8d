//! Real `redis-server` processes: standalone, Cluster and Sentinel.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use leaseholder_testkit::{
    Error, MIN_REDIS_VERSION, RedisCluster, RedisOptions, RedisSentinel, RedisServer,
    find_redis_cli, find_redis_server,
};
use tokio::time::timeout;

/// Bound on something that should succeed promptly.
const PATIENCE: Duration = Duration::from_secs(10);

/// Bound on a probe that should hang (against a paused server).
const SHORT: Duration = Duration::from_millis(300);

async fn start_with(options: RedisOptions) -> RedisServer {
    let started = Instant::now();
    let server = RedisServer::start_with(options)
        .await
        .unwrap_or_else(|e| panic!("starting redis-server failed (run scripts/setup?): {e}"));
    println!("redis-server ready in {:?}", started.elapsed());
    server
}

async fn cli(server: &RedisServer, args: &[&str]) -> String {
    timeout(PATIENCE, server.cli(args)).await.unwrap().unwrap()
}

async fn ping(server: &RedisServer) {
    timeout(PATIENCE, server.ping()).await.unwrap().unwrap();
}

#[test]
fn finds_supported_binaries() {
    for binary in [find_redis_server().unwrap(), find_redis_cli().unwrap()] {
        assert!(binary.is_file(), "{}", binary.display());
    }
}

#[tokio::test]
async fn starts_and_answers() {
    let server = start_with(RedisOptions::new()).await;
    assert_eq!(server.url(), format!("redis://127.0.0.1:{}", server.port()));
    assert_eq!(server.addr().port(), server.port());
    assert!(server.addr().ip().is_loopback());
    assert!(!server.is_sentinel());
    assert_eq!(server.cluster_bus_port(), None);
    let version = server.version_major_minor().expect("version parses");
    assert!(
        version >= MIN_REDIS_VERSION,
        "version {} is older than {MIN_REDIS_VERSION:?}",
        server.version()
    );
    ping(&server).await;

    assert_eq!(cli(&server, &["SET", "greeting", "hello"]).await, "OK");
    assert_eq!(cli(&server, &["GET", "greeting"]).await, "hello");
    assert_eq!(cli(&server, &["GET", "missing"]).await, "");
    let pid = cli(&server, &["INFO", "server"]).await;
    assert!(
        pid.contains(&format!("process_id:{}", server.pid())),
        "{pid}"
    );
    // The defaults: nothing persisted, the directory is the server's own.
    assert_eq!(
        cli(&server, &["CONFIG", "GET", "appendonly"]).await,
        "appendonly\nno"
    );
    // `save ""`: an empty value (the trailing newline is trimmed).
    assert_eq!(cli(&server, &["CONFIG", "GET", "save"]).await, "save");
    let dir = cli(&server, &["CONFIG", "GET", "dir"]).await;
    assert_eq!(dir, format!("dir\n{}", server.dir().display()));
    assert!(server.dir().join("redis.log").is_file());

    let dir = server.dir().to_owned();
    drop(server);
    assert!(!dir.exists(), "{} was not removed", dir.display());
}

#[tokio::test]
async fn an_error_reply_is_a_failed_command() {
    let server = start_with(RedisOptions::new()).await;
    cli(&server, &["SET", "text", "not a number"]).await;
    let error = timeout(PATIENCE, server.cli(&["INCR", "text"]))
        .await
        .unwrap()
        .unwrap_err();
    assert!(
        matches!(&error, Error::CommandFailed { output, .. } if output.contains("not an integer")),
        "{error:?}"
    );
}

#[tokio::test]
async fn extra_arguments_reach_the_server() {
    let server = start_with(RedisOptions::new().arg("maxmemory", "12mb").arg_values(
        "client-output-buffer-limit",
        ["pubsub", "1mb", "512kb", "30"],
    ))
    .await;
    assert_eq!(
        cli(&server, &["CONFIG", "GET", "maxmemory"]).await,
        "maxmemory\n12582912"
    );
    let limits = cli(&server, &["CONFIG", "GET", "client-output-buffer-limit"]).await;
    assert!(limits.contains("pubsub 1048576 524288 30"), "{limits}");
}

#[tokio::test]
async fn a_bad_option_fails_fast_with_the_servers_output() {
    let started = Instant::now();
    let error = RedisServer::start_with(RedisOptions::new().arg("no-such-option", "1"))
        .await
        .unwrap_err();
    assert!(
        matches!(&error, Error::CommandFailed { output, .. } if output.contains("no-such-option")),
        "{error:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[tokio::test]
async fn restart_without_persistence_forgets_the_data() {
    let mut server = start_with(RedisOptions::new()).await;
    let (port, pid) = (server.port(), server.pid());
    cli(&server, &["SET", "key", "value"]).await;

    server.restart().await.unwrap();
    assert_eq!(server.port(), port);
    assert_ne!(server.pid(), pid);
    ping(&server).await;
    assert_eq!(cli(&server, &["GET", "key"]).await, "");
}

#[tokio::test]
async fn restart_with_persistence_keeps_what_was_written_before_a_kill() {
    let mut server = start_with(RedisOptions::new().persistence(true)).await;
    assert_eq!(
        cli(&server, &["CONFIG", "GET", "appendfsync"]).await,
        "appendfsync\nalways"
    );
    let port = server.port();
    cli(&server, &["SET", "key", "value"]).await;
    cli(&server, &["RPUSH", "list", "a", "b"]).await;

    server.kill().await.unwrap();
    assert!(
        timeout(PATIENCE, server.ping()).await.unwrap().is_err(),
        "a killed server must not answer"
    );
    server.restart().await.unwrap();
    assert_eq!(server.port(), port);
    assert_eq!(cli(&server, &["GET", "key"]).await, "value");
    assert_eq!(cli(&server, &["LRANGE", "list", "0", "-1"]).await, "a\nb");

    // Restarting a running server works too, and keeps the data.
    cli(&server, &["SET", "second", "2"]).await;
    server.restart().await.unwrap();
    assert_eq!(cli(&server, &["MGET", "key", "second"]).await, "value\n2");
}

#[tokio::test]
async fn pause_makes_ping_time_out_and_resume_brings_it_back() {
    let server = start_with(RedisOptions::new()).await;
    server.pause().unwrap();
    assert!(
        timeout(SHORT, server.ping()).await.is_err(),
        "a paused server must not answer PING"
    );
    assert!(
        timeout(SHORT, server.cli(&["PING"])).await.is_err(),
        "a paused server must not answer redis-cli"
    );
    server.resume().unwrap();
    ping(&server).await;
}

#[tokio::test]
async fn a_paused_server_can_be_killed_and_restarted() {
    let mut server = start_with(RedisOptions::new()).await;
    server.pause().unwrap();
    server.kill().await.unwrap();
    server.restart().await.unwrap();
    ping(&server).await;
}

/// The port in a `MOVED <slot> <ip>:<port>` error.
fn moved_to(output: &str) -> u16 {
    let target = output
        .split_whitespace()
        .skip_while(|word| *word != "MOVED")
        .nth(2)
        .unwrap_or_else(|| panic!("no MOVED in {output:?}"));
    target.rsplit_once(':').unwrap().1.parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_comes_up_and_routes_keys_to_their_node() {
    let started = Instant::now();
    let mut cluster = RedisCluster::start(3)
        .await
        .unwrap_or_else(|e| panic!("starting a redis cluster failed (run scripts/setup?): {e}"));
    println!("3-node cluster ready in {:?}", started.elapsed());
    assert_eq!(cluster.len(), 3);
    assert!(!cluster.is_empty());
    assert_eq!(cluster.primary_count(), 3);
    let urls = cluster.urls();
    assert_eq!(urls.len(), 3);
    for (node, url) in cluster.nodes().iter().zip(&urls) {
        assert_eq!(&node.url(), url);
        assert!(node.cluster_bus_port().is_some());
        let info = cli(node, &["CLUSTER", "INFO"]).await;
        assert!(info.contains("cluster_state:ok"), "{info}");
        assert!(info.contains("cluster_slots_assigned:16384"), "{info}");
    }

    // redis-cli -c follows the redirection to the key's node; asked
    // directly, that node answers and the others redirect to it.
    let key = "leaseholder:lease";
    assert_eq!(
        cli(cluster.node(0), &["-c", "SET", key, "held"]).await,
        "OK"
    );
    let mut owner = None;
    for node in cluster.nodes() {
        match timeout(PATIENCE, node.cli(&["GET", key])).await.unwrap() {
            Ok(value) => {
                assert_eq!(value, "held");
                assert!(owner.is_none(), "two nodes answer for {key}");
                owner = Some(node.port());
            }
            Err(Error::CommandFailed { output, .. }) => {
                owner.get_or_insert(moved_to(&output));
                assert_eq!(Some(moved_to(&output)), owner, "{output}");
            }
            Err(e) => panic!("{e}"),
        }
    }
    let owner = owner.unwrap();
    let i = cluster
        .nodes()
        .iter()
        .position(|n| n.port() == owner)
        .unwrap();

    // The key's node goes down, the cluster fails, and comes back with it.
    cluster.kill(i).await.unwrap();
    let restarted = Instant::now();
    cluster.restart(i).await.unwrap();
    println!("node restarted and cluster ok in {:?}", restarted.elapsed());
    cluster.wait_ok().await.unwrap();
    // No persistence: the key is gone, but the node serves its slots again.
    assert_eq!(cli(cluster.node(i), &["GET", key]).await, "");
    assert_eq!(
        cli(cluster.node(0), &["-c", "SET", key, "again"]).await,
        "OK"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_with_replicas_comes_up_in_sync() {
    let started = Instant::now();
    let cluster = RedisCluster::start_with_replicas(3, 1).await.unwrap();
    println!("3x2-node cluster ready in {:?}", started.elapsed());
    assert_eq!(cluster.len(), 6);
    let mut roles = Vec::new();
    for node in cluster.nodes() {
        let replication = cli(node, &["INFO", "replication"]).await;
        if replication.contains("role:slave") {
            assert!(
                replication.contains("master_link_status:up"),
                "{replication}"
            );
            roles.push("replica");
        } else {
            roles.push("primary");
        }
    }
    assert_eq!(
        roles.iter().filter(|r| **r == "primary").count(),
        3,
        "{roles:?}"
    );
}

#[test]
fn a_cluster_needs_three_primaries() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let error = runtime.block_on(RedisCluster::start(2)).unwrap_err();
    assert!(
        error.to_string().contains("at least 3 primaries"),
        "{error}"
    );
}

async fn start_sentinel() -> RedisSentinel {
    let started = Instant::now();
    let group = RedisSentinel::start()
        .await
        .unwrap_or_else(|e| panic!("starting redis sentinel failed (run scripts/setup?): {e}"));
    println!("sentinel group ready in {:?}", started.elapsed());
    group
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sentinel_comes_up_and_a_forced_failover_moves_the_primary() {
    let mut group = start_sentinel().await;
    assert_eq!(group.master_name(), "leaseholder");
    assert_eq!(group.sentinel_urls().len(), 3);
    for (url, addr) in group.sentinel_urls().iter().zip(group.sentinel_addrs()) {
        assert_eq!(url, &format!("redis://{addr}"));
    }
    for sentinel in group.sentinels() {
        assert!(sentinel.is_sentinel());
        let master = cli(
            sentinel,
            &["SENTINEL", "get-master-addr-by-name", "leaseholder"],
        )
        .await;
        assert_eq!(master, format!("127.0.0.1\n{}", group.primary().port()));
    }
    let (old_primary, old_replica) = (group.primary().addr(), group.replica().addr());
    assert_eq!(group.current_primary_addr().await.unwrap(), old_primary);
    let replication = cli(group.replica(), &["INFO", "replication"]).await;
    assert!(
        replication.contains("master_link_status:up"),
        "{replication}"
    );

    // Written on the primary, and replicated before the failover.
    assert_eq!(cli(group.primary(), &["SET", "key", "before"]).await, "OK");
    assert_eq!(cli(group.primary(), &["WAIT", "1", "5000"]).await, "1");

    let started = Instant::now();
    let new_primary = group.failover().await.unwrap();
    println!("forced failover in {:?}", started.elapsed());
    assert_eq!(new_primary, old_replica);
    assert_eq!(group.primary().addr(), old_replica);
    assert_eq!(group.replica().addr(), old_primary);
    assert_eq!(group.current_primary_addr().await.unwrap(), old_replica);
    let replication = cli(group.primary(), &["INFO", "replication"]).await;
    assert!(replication.contains("role:master"), "{replication}");
    assert_eq!(cli(group.primary(), &["GET", "key"]).await, "before");
    assert_eq!(cli(group.primary(), &["SET", "key", "after"]).await, "OK");

    // Sentinel turns the old primary into a replica of the new one.
    let started = Instant::now();
    group.wait_replicated().await.unwrap();
    println!("old primary a replica in {:?}", started.elapsed());

    // Sentinel wrote the new roles into the servers' configuration files
    // (CONFIG REWRITE), so a restarted server keeps its role.
    let config = |server: &RedisServer| std::fs::read_to_string(server.dir().join("redis.conf"));
    let replica_config = config(group.replica()).unwrap();
    let replicaof = format!("replicaof 127.0.0.1 {}", group.primary().port());
    assert!(replica_config.contains(&replicaof), "{replica_config}");
    let primary_config = config(group.primary()).unwrap();
    assert!(!primary_config.contains("replicaof"), "{primary_config}");
    group.replica_mut().restart().await.unwrap();
    let replication = cli(group.replica(), &["INFO", "replication"]).await;
    assert!(replication.contains("role:slave"), "{replication}");
    group.wait_replicated().await.unwrap();
    assert_eq!(cli(group.replica(), &["GET", "key"]).await, "after");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sentinel_fails_over_when_the_primary_is_killed() {
    let mut group = start_sentinel().await;
    let old_replica = group.replica().addr();
    let killed = group.kill_primary().await.unwrap();
    let started = Instant::now();
    let new_primary = group.wait_primary_change(killed).await.unwrap();
    println!("failover after a kill in {:?}", started.elapsed());
    assert_eq!(new_primary, old_replica);
    assert_eq!(cli(group.primary(), &["SET", "key", "value"]).await, "OK");

    // The old primary comes back and the pair replicates again: as a
    // replica of the new primary, normally; if the Sentinels promote it
    // once more, the testkit follows them. Either way a write on the
    // primary reaches the replica.
    let started = Instant::now();
    group.replica_mut().restart().await.unwrap();
    group.wait_replicated().await.unwrap();
    println!(
        "pair replicating again in {:?}, primary {}",
        started.elapsed(),
        group.primary().addr()
    );
    assert_eq!(
        cli(group.primary(), &["SET", "after", "restart"]).await,
        "OK"
    );
    assert_eq!(cli(group.primary(), &["WAIT", "1", "5000"]).await, "1");
    // The replica acknowledged the write; it may still be finishing a
    // resync (the Sentinels can reconfigure it once more), so its read is
    // waited for, within a bound.
    let seen = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            // The Sentinels may still swap the roles: follow them.
            group.wait_replicated().await.unwrap();
            if cli(group.replica(), &["GET", "after"]).await == "restart" {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    assert!(
        seen.is_ok(),
        "the write after the restart never reached the replica"
    );
}
