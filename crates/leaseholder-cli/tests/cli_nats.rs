//! The CLI against a real nats-server (2.11+, with JetStream): the
//! election scenario, setup, and the errors of a missing bucket, a foreign
//! value and an unreachable server.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::Duration;

use leaseholder::Backend;
use leaseholder_testkit::{NatsServer, free_port};
use predicates::prelude::*;
use support::{KEY, cli, election};

const BUCKET: &str = "leases";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_on_nats() {
    let server = NatsServer::start()
        .await
        .expect("nats-server 2.11+ (run scripts/setup)");
    let url = format!("{}?bucket={BUCKET}", server.url());

    // setup: prints the bucket's settings, then creates it; again: valid.
    cli(&url, &["setup", "--dry-run"], None)
        .await
        .success()
        .stdout(
            predicate::str::contains("stream: KV_leases")
                .and(predicate::str::contains("allow_msg_ttl: true"))
                .and(predicate::str::contains("dry run")),
        );
    cli(&url, &["setup"], None)
        .await
        .success()
        .stdout(predicate::str::ends_with("created\n"));
    cli(&url, &["setup"], None)
        .await
        .success()
        .stdout(predicate::str::ends_with(
            "exists, and its settings are valid\n",
        ));
    cli(&url, &["list"], None)
        .await
        .success()
        .stdout("no key is held\n");
    // Reading a key's candidates never creates the registry's bucket.
    cli(&url, &["show", KEY], None).await.success().stdout(
        predicate::str::contains("the key is free")
            .and(predicate::str::contains("none registered")),
    );
    let js = async_nats::jetstream::new(async_nats::connect(server.url()).await.unwrap());
    assert!(js.get_stream("KV_leases_candidates").await.is_err());

    let nats_url = server.url();
    let connect = || {
        let nats_url = nats_url.clone();
        async move { async_nats::connect(nats_url).await.unwrap() }
    };
    let (c1, c2) = (connect().await, connect().await);
    let clients = std::sync::Mutex::new(vec![c2, c1]);
    election(
        &url,
        || Backend::nats(clients.lock().unwrap().pop().unwrap(), BUCKET),
        Duration::from_secs(2),
        true,
    )
    .await;

    // A foreign value (noleader's, garbage): shown, never released.
    let client = connect().await;
    let js = async_nats::jetstream::new(client);
    js.publish(format!("$KV.{BUCKET}.foreign"), "not a lease".into())
        .await
        .unwrap()
        .await
        .unwrap();
    cli(&url, &["show", "foreign"], None)
        .await
        .success()
        .stdout(predicate::str::contains("a foreign value"));
    cli(&url, &["release", "foreign", "--force", "--yes"], None)
        .await
        .failure()
        .code(5)
        .stderr(predicate::str::contains("not a leaseholder lease"));
    cli(&url, &["show", "foreign"], None)
        .await
        .success()
        .stdout(predicate::str::contains("a foreign value"));
    // Every key (the leaders have shut down; the foreign value is left),
    // as many lines as asked for.
    let line = cli(&url, &["watch", "--json", "--count", "1"], None)
        .await
        .success();
    let line: serde_json::Value =
        serde_json::from_slice(&line.get_output().stdout).expect("one JSON line");
    assert_eq!(line["key"], "foreign", "{line}");
    assert_eq!(line["state"], "held", "{line}");
    assert_eq!(line["foreign"], true, "{line}");
    // Colour on request.
    cli(&url, &["--color", "always", "list"], None)
        .await
        .success()
        .stdout(predicate::str::contains("\x1b[").and(predicate::str::contains("(foreign value)")));

    // A bucket that does not exist.
    let missing = format!("{}?bucket=nope", server.url());
    cli(&missing, &["list"], None)
        .await
        .failure()
        .code(4)
        .stderr(predicate::str::contains("bucket nope").and(predicate::str::contains("setup")));
    cli(&missing, &["show", KEY], None).await.failure().code(4);

    // A bad URL, and a server that is not there.
    cli(&server.url(), &["list"], None)
        .await
        .failure()
        .code(2)
        .stderr(predicate::str::contains("?bucket="));
    let nowhere = format!("nats://127.0.0.1:{}?bucket={BUCKET}", free_port().unwrap());
    cli(&nowhere, &["--timeout", "1s", "list"], None)
        .await
        .failure()
        .code(3)
        .stderr(predicate::str::contains("cannot connect"));
}
