//! The public conformance suite against a real nats-server (2.11+), started
//! by the testkit on a free port.
#![cfg(all(feature = "conformance", feature = "nats"))]
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use async_nats::HeaderMap;
use leaseholder::conformance::{self, Harness};
use leaseholder::{Backend, BoxError, Key};
use leaseholder_testkit::NatsServer;

/// Where a child process (see `child`) finds the parent's server.
const URL_ENV: &str = "LEASEHOLDER_TEST_NATS_URL";

struct Nats {
    url: String,
    bucket: String,
    /// Owned by the parent test; a child only has the url.
    _server: Option<NatsServer>,
}

impl Harness for Nats {
    async fn backend(&self) -> Backend {
        let client = async_nats::connect(&self.url).await.unwrap();
        Backend::nats(client, &self.bucket)
    }

    async fn put_foreign(&self, key: &Key, value: &[u8], ttl: Duration) -> Result<(), BoxError> {
        let client = async_nats::connect(&self.url).await?;
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

    fn child(&self) -> Option<tokio::process::Command> {
        let mut cmd = tokio::process::Command::new(std::env::current_exe().ok()?);
        cmd.args(["--exact", "child", "--nocapture"])
            .env(URL_ENV, &self.url);
        Some(cmd)
    }
}

/// Not a test of its own: the entry point of the child processes the
/// suite's multi-process rows start (it does nothing when run directly).
#[tokio::test]
async fn child() {
    if let Ok(url) = std::env::var(URL_ENV) {
        let harness = Nats {
            url,
            bucket: "leases".into(),
            _server: None,
        };
        assert!(conformance::child_main(&harness).await);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_backend_passes_the_contract() {
    let server = NatsServer::start()
        .await
        .expect("nats-server 2.11+ (run scripts/setup)");
    let harness = Nats {
        url: server.url(),
        bucket: "leases".into(),
        _server: Some(server),
    };
    let report = conformance::run(&harness).await;
    println!("{report}");
    assert!(report.is_ok(), "{report}");
    assert!(report.unsupported.is_empty(), "{report}");
}
