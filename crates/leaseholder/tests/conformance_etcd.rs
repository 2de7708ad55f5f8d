//! The public conformance suite against real etcd servers started by the
//! testkit on free ports: a single member, and a cluster of three.
#![cfg(all(feature = "conformance", feature = "etcd"))]
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use leaseholder::conformance::{self, Harness};
use leaseholder::{Backend, BoxError, Claim, EtcdBackend, Key, LeaderId};
use leaseholder_testkit::{EtcdCluster, EtcdServer};

/// Where a child process (see `child`) finds the parent's members: their
/// endpoints, separated by commas.
const ENDPOINTS_ENV: &str = "LEASEHOLDER_TEST_ETCD_ENDPOINTS";

struct Etcd {
    endpoints: Vec<String>,
    /// Owned by the parent test; a child only has the endpoints.
    _servers: Option<Servers>,
}

#[allow(dead_code)]
enum Servers {
    One(Box<EtcdServer>),
    Cluster(EtcdCluster),
}

impl Etcd {
    fn etcd(&self) -> EtcdBackend {
        EtcdBackend::builder()
            .endpoints(self.endpoints.clone())
            .build()
            .unwrap()
    }
}

impl Harness for Etcd {
    async fn backend(&self) -> Backend {
        // Its own client and shared lease, as another process would have.
        Backend::etcd(self.etcd())
    }

    async fn put_foreign(&self, key: &Key, value: &[u8], ttl: Duration) -> Result<(), BoxError> {
        let name = self.etcd().lease_key(key);
        let mut client = etcd_client::Client::connect(self.endpoints.clone(), None).await?;
        let secs = i64::try_from(ttl.as_secs().max(1))?;
        let lease = client.lease_grant(secs, None).await?.id();
        client
            .put(
                name,
                value,
                Some(etcd_client::PutOptions::new().with_lease(lease)),
            )
            .await?;
        Ok(())
    }

    fn ttl(&self) -> Duration {
        // etcd leases have whole-second ttls.
        Duration::from_secs(1)
    }

    fn expiry_slack(&self) -> Duration {
        // etcd looks for expired leases every 500 ms, and a ttl below its
        // minimum (1.5 election timeouts, rounded up to a second) is
        // raised to it.
        Duration::from_millis(1200)
    }

    fn child(&self) -> Option<tokio::process::Command> {
        let mut cmd = tokio::process::Command::new(std::env::current_exe().ok()?);
        cmd.args(["--exact", "child", "--nocapture"])
            .env(ENDPOINTS_ENV, self.endpoints.join(","));
        Some(cmd)
    }
}

/// Not a test of its own: the entry point of the child processes the
/// suite's multi-process rows start (it does nothing when run directly).
#[tokio::test]
async fn child() {
    if let Ok(endpoints) = std::env::var(ENDPOINTS_ENV) {
        let harness = Etcd {
            endpoints: endpoints.split(',').map(str::to_owned).collect(),
            _servers: None,
        };
        assert!(conformance::child_main(&harness).await);
    }
}

/// On a new cluster the first acquire writes the epoch marker and every
/// acquire waits one ttl (see the backend's docs; `etcd.rs` tests that
/// wait): do it before the rows, which are not about it.
async fn plant_epoch(harness: &Etcd) {
    let backend = Harness::backend(harness).await;
    backend.setup().await.unwrap();
    let key = Key::new("conformance-epoch").unwrap();
    let claim = Claim::new(LeaderId::new(), Default::default());
    let held = backend.acquire(&key, &claim, harness.ttl()).await.unwrap();
    assert!(
        matches!(held, leaseholder::Acquired::Held(ref h) if h.is_foreign()),
        "a new cluster's first acquire should wait for the epoch: {held:?}"
    );
    tokio::time::sleep(harness.ttl() + harness.expiry_slack()).await;
}

async fn passes(harness: Etcd) {
    plant_epoch(&harness).await;
    let report = conformance::run(&harness).await;
    println!("{report}");
    assert!(report.is_ok(), "{report}");
    assert!(report.unsupported.is_empty(), "{report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_single_member_passes_the_contract() {
    let server = EtcdServer::start()
        .await
        .expect("etcd 3.4+ (run scripts/setup)");
    passes(Etcd {
        endpoints: vec![server.endpoint()],
        _servers: Some(Servers::One(Box::new(server))),
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_cluster_passes_the_contract() {
    let cluster = EtcdCluster::start(3)
        .await
        .expect("a 3-member etcd cluster (etcd 3.4+; run scripts/setup)");
    passes(Etcd {
        endpoints: cluster.endpoints(),
        _servers: Some(Servers::Cluster(cluster)),
    })
    .await;
}
