//! Servers for the example tests, with the lease bucket or table already
//! created (`mod support;`). A candidate whose own setup creates it waits
//! one ttl before its first acquire (it may replace one deleted under a
//! running leader), which these tests are not about.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use leaseholder_testkit::{EtcdServer, NatsServer, PostgresServer, RedisServer, TempDir};

/// The message a test gives when PostgreSQL is not installed.
pub(crate) const NO_POSTGRES: &str = "PostgreSQL 15+: run scripts/setup";

/// A fresh PostgreSQL with the lease table created.
pub(crate) async fn postgres_with_table() -> PostgresServer {
    let server = PostgresServer::start().await.expect(NO_POSTGRES);
    leaseholder::Backend::postgres(
        leaseholder::PostgresBackend::builder()
            .url(server.url())
            .build()
            .unwrap(),
    )
    .setup()
    .await
    .unwrap();
    server
}

/// A fresh nats-server with the KV bucket `bucket` created.
pub(crate) async fn nats_with_bucket(bucket: &str) -> NatsServer {
    let server = NatsServer::start()
        .await
        .expect("nats-server 2.11+: run scripts/setup");
    let client = async_nats::connect(server.url()).await.unwrap();
    leaseholder::Backend::nats(client, bucket)
        .setup()
        .await
        .unwrap();
    server
}

/// A SQLite file in a fresh temporary directory (removed with the
/// returned guard), with the lease table created; and the candidate's
/// store argument for it, `sqlite:<path>`.
pub(crate) async fn sqlite_with_table() -> (TempDir, String) {
    let dir = TempDir::new("leaseholder-sqlite").unwrap();
    let path = dir.path().join("leases.db");
    leaseholder::Backend::sqlite(
        leaseholder::SqliteBackend::builder()
            .path(&path)
            .build()
            .unwrap(),
    )
    .setup()
    .await
    .unwrap();
    (dir, format!("sqlite:{}", path.display()))
}

/// A fresh redis-server whose epoch marker says it has been in use for a
/// long time (on a fresh store, the backend's setup writes the marker and
/// every acquisition waits one ttl after it, which these tests are not
/// about; `crates/leaseholder/tests/redis.rs` tests that wait).
pub(crate) async fn redis_in_use() -> RedisServer {
    let server = RedisServer::start()
        .await
        .expect("redis-server 7+: run scripts/setup");
    let out = server
        .cli(&["SET", "leaseholder:epoch", "0"])
        .await
        .unwrap();
    assert_eq!(out.trim(), "OK");
    server
}

/// A fresh single-member etcd whose epoch marker (`leaseholder/epoch`)
/// says it has been in use for a long time (on a new cluster, the first
/// acquire writes the marker and every acquire waits one ttl after it,
/// which these tests are not about; see the module docs of
/// `crates/leaseholder/src/backend/etcd.rs`).
pub(crate) async fn etcd_in_use() -> EtcdServer {
    let server = EtcdServer::start()
        .await
        .expect("etcd 3.4+ (run scripts/setup)");
    let out = server
        .ctl(&["put", "leaseholder/epoch", "0"])
        .await
        .unwrap();
    assert_eq!(out.trim(), "OK");
    server
}

/// The candidate's store argument for `server`: `etcd://127.0.0.1:PORT`.
pub(crate) fn etcd_url(server: &EtcdServer) -> String {
    format!("etcd://{}", server.addr())
}
