//! The public conformance suite against a real nats-server (2.11+), started
//! by the testkit on a free port.
#![cfg(all(feature = "conformance", feature = "nats"))]
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use async_nats::HeaderMap;
use leaseholder::conformance::{self, Harness};
use leaseholder::{Backend, BoxError, Key};
use leaseholder_testkit::NatsServer;

struct Nats {
    server: NatsServer,
    bucket: String,
}

impl Harness for Nats {
    async fn backend(&self) -> Backend {
        let client = async_nats::connect(self.server.url()).await.unwrap();
        Backend::nats(client, &self.bucket)
    }

    async fn put_foreign(&self, key: &Key, value: &[u8], ttl: Duration) -> Result<(), BoxError> {
        let client = async_nats::connect(self.server.url()).await?;
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
async fn nats_backend_passes_the_contract() {
    let server = NatsServer::start()
        .await
        .expect("nats-server 2.11+ (run scripts/setup)");
    let harness = Nats {
        server,
        bucket: "leases".into(),
    };
    let report = conformance::run(&harness).await;
    println!("{report}");
    assert!(report.is_ok(), "{report}");
    assert!(report.unsupported.is_empty(), "{report}");
}
