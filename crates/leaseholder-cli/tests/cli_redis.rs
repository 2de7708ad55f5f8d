//! The CLI against a real redis-server: the election scenario under a key
//! prefix, a foreign value, and an unreachable server.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::Duration;

use leaseholder::{Backend, Key, RedisBackend};
use leaseholder_testkit::{RedisServer, free_port};
use predicates::prelude::*;
use support::{cli, election};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_on_redis() {
    let server = RedisServer::start()
        .await
        .expect("redis-server 7+ (run scripts/setup)");
    let url = format!("{}?prefix=billing", server.url());
    let redis = || {
        RedisBackend::builder()
            .url(server.url())
            .prefix("billing")
            .build()
            .unwrap()
    };

    cli(&url, &["setup", "--dry-run"], None)
        .await
        .success()
        .stdout(
            predicate::str::contains("lease of a key: {billing:KEY}:lease")
                .and(predicate::str::contains("dry run")),
        );
    cli(&url, &["setup"], None).await.success();
    cli(&url, &["list"], None)
        .await
        .success()
        .stdout("no key is held\n");

    election(
        &url,
        || Backend::redis(redis()),
        Duration::from_secs(2),
        true,
    )
    .await;

    // Another fleet's prefix is not listed.
    cli(
        &format!("{}?prefix=other", server.url()),
        &["list", "--json"],
        None,
    )
    .await
    .success()
    .stdout("[]\n");

    // A foreign value: shown, never released.
    let name = redis().lease_key(&Key::new("foreign").unwrap());
    let client = redis::Client::open(server.url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    redis::cmd("SET")
        .arg(&name)
        .arg("not a lease")
        .arg("PX")
        .arg(60_000)
        .query_async::<()>(&mut conn)
        .await
        .unwrap();
    cli(&url, &["list"], None)
        .await
        .success()
        .stdout(predicate::str::contains("(foreign value)"));
    cli(&url, &["release", "foreign", "--force", "--yes"], None)
        .await
        .failure()
        .code(5)
        .stderr(predicate::str::contains("not a leaseholder lease"));

    let nowhere = format!("redis://127.0.0.1:{}", free_port().unwrap());
    cli(&nowhere, &["--timeout", "1s", "list"], None)
        .await
        .failure()
        .code(3);
}
