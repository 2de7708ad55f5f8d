//! The CLI against a real etcd member: the election scenario under a key
//! prefix, a foreign value, and an unreachable member.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::Duration;

use leaseholder::{Backend, EtcdBackend, Key};
use leaseholder_testkit::{EtcdServer, free_port};
use predicates::prelude::*;
use support::{cli, election};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_on_etcd() {
    let server = EtcdServer::start()
        .await
        .expect("etcd 3.4+ (run scripts/setup)");
    let addr = server.addr();
    let url = format!("etcd://{addr}/billing");
    let etcd = || EtcdBackend::builder().url(&url).build().unwrap();

    cli(&url, &["setup", "--dry-run"], None)
        .await
        .success()
        .stdout(
            predicate::str::contains("lease of a key: billing/lease/KEY")
                .and(predicate::str::contains("dry run")),
        );
    cli(&url, &["setup"], None).await.success();

    election(&url, || Backend::etcd(etcd()), Duration::from_secs(2), true).await;

    // A foreign value: shown, never released.
    let name = etcd().lease_key(&Key::new("foreign").unwrap());
    let mut client = etcd_client::Client::connect([server.endpoint()], None)
        .await
        .unwrap();
    client.put(name, "not a lease", None).await.unwrap();
    cli(&url, &["show", "foreign"], None)
        .await
        .success()
        .stdout(predicate::str::contains("a foreign value"));
    cli(&url, &["release", "foreign", "--force", "--yes"], None)
        .await
        .failure()
        .code(5);

    let nowhere = format!("etcd://127.0.0.1:{}", free_port().unwrap());
    cli(&nowhere, &["--timeout", "1s", "list"], None)
        .await
        .failure()
        .code(3);
}
