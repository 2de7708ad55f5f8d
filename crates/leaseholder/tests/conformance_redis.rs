//! The public conformance suite against real Redis servers started by the
//! testkit on free ports: a standalone server, and a Cluster of three
//! primaries.
#![cfg(all(feature = "conformance", feature = "redis"))]
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use leaseholder::conformance::{self, Harness};
use leaseholder::{Backend, BoxError, Key, RedisBackend};
use leaseholder_testkit::{RedisCluster, RedisServer};

/// Where a child process (see `child`) finds the parent's servers: one URL,
/// or several separated by commas for a Cluster.
const URL_ENV: &str = "LEASEHOLDER_TEST_REDIS_URLS";

struct Redis {
    urls: Vec<String>,
    cluster: bool,
    /// Owned by the parent test; a child only has the urls.
    _servers: Option<Servers>,
}

#[allow(dead_code)]
enum Servers {
    One(Box<RedisServer>),
    Cluster(RedisCluster),
}

impl Redis {
    fn builder(&self) -> leaseholder::RedisBuilder {
        if self.cluster {
            RedisBackend::builder().cluster(self.urls.clone())
        } else {
            RedisBackend::builder().url(self.urls[0].clone())
        }
    }
}

impl Harness for Redis {
    async fn backend(&self) -> Backend {
        // Its own connection and subscription, as another process would have.
        Backend::redis(self.builder().build().unwrap())
    }

    async fn put_foreign(&self, key: &Key, value: &[u8], ttl: Duration) -> Result<(), BoxError> {
        let name = self.builder().build()?.lease_key(key);
        let ms = u64::try_from(ttl.as_millis())?;
        let mut set = redis::cmd("SET");
        set.arg(&name).arg(value).arg("PX").arg(ms);
        if self.cluster {
            let client = redis::cluster::ClusterClient::new(self.urls.clone())?;
            let mut conn = client.get_async_connection().await?;
            set.query_async::<()>(&mut conn).await?;
        } else {
            let client = redis::Client::open(self.urls[0].as_str())?;
            let mut conn = client.get_multiplexed_async_connection().await?;
            set.query_async::<()>(&mut conn).await?;
        }
        Ok(())
    }

    fn ttl(&self) -> Duration {
        Duration::from_millis(500)
    }

    fn expiry_slack(&self) -> Duration {
        // Redis hides an expired key from every read at once (and deletes
        // it lazily): exact, by the server's clock.
        Duration::from_millis(300)
    }

    fn child(&self) -> Option<tokio::process::Command> {
        let mut cmd = tokio::process::Command::new(std::env::current_exe().ok()?);
        cmd.args(["--exact", "child", "--nocapture"])
            .env(URL_ENV, self.urls.join(","))
            .env(
                "LEASEHOLDER_TEST_REDIS_CLUSTER",
                if self.cluster { "1" } else { "0" },
            );
        Some(cmd)
    }
}

/// Not a test of its own: the entry point of the child processes the
/// suite's multi-process rows start (it does nothing when run directly).
#[tokio::test]
async fn child() {
    if let Ok(urls) = std::env::var(URL_ENV) {
        let cluster = std::env::var("LEASEHOLDER_TEST_REDIS_CLUSTER").as_deref() == Ok("1");
        let harness = Redis {
            urls: urls.split(',').map(str::to_owned).collect(),
            cluster,
            _servers: None,
        };
        assert!(conformance::child_main(&harness).await);
    }
}

async fn passes(harness: Redis) {
    // A store in use for longer than the longest ttl the rows ask for
    // (20 × 500 ms, the registry rows' lease): on a fresh store every
    // acquisition waits one ttl after setup writes the epoch markers (see
    // the backend's docs; the failure tests in `redis.rs` check that
    // wait), which is not what the rows are about.
    let prepared = harness.backend().await.setup().await.unwrap();
    assert_eq!(prepared, leaseholder::Prepared::Created);
    tokio::time::sleep(harness.ttl() * 20 + Duration::from_millis(100)).await;
    let cluster = harness.cluster;
    let report = conformance::run(&harness).await;
    println!("{report}");
    assert!(report.is_ok(), "{report}");
    if cluster {
        // A Cluster cannot list its keys (SCAN reaches one node).
        assert_eq!(
            report
                .unsupported
                .iter()
                .map(|(row, _)| *row)
                .collect::<Vec<_>>(),
            ["keys_lists_held_keys"],
            "{report}"
        );
    } else {
        assert!(report.unsupported.is_empty(), "{report}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_standalone_passes_the_contract() {
    let server = RedisServer::start()
        .await
        .expect("redis-server 7+ (run scripts/setup)");
    passes(Redis {
        urls: vec![server.url()],
        cluster: false,
        _servers: Some(Servers::One(Box::new(server))),
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_cluster_passes_the_contract() {
    let cluster = RedisCluster::start(3).await.expect(
        "a Redis Cluster of 3 primaries (redis-server and redis-cli 7+; run scripts/setup)",
    );
    passes(Redis {
        urls: cluster.urls(),
        cluster: true,
        _servers: Some(Servers::Cluster(cluster)),
    })
    .await;
}
