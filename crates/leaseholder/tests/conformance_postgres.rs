//! The public conformance suite against a real PostgreSQL server, started
//! by the testkit on a free port with a temporary data directory.
#![cfg(all(feature = "conformance", feature = "postgres"))]
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use leaseholder::conformance::{self, Harness};
use leaseholder::{Backend, BoxError, Key, PostgresBackend};
use leaseholder_testkit::PostgresServer;

/// Where a child process (see `child`) finds the parent's server.
const URL_ENV: &str = "LEASEHOLDER_TEST_POSTGRES_URL";

struct Postgres {
    url: String,
    /// Owned by the parent test; a child only has the url.
    _server: Option<PostgresServer>,
}

impl Harness for Postgres {
    async fn backend(&self) -> Backend {
        // Its own pool and LISTEN connection, as another process would have.
        Backend::postgres(
            PostgresBackend::builder()
                .url(&self.url)
                .pool_size(2)
                .build()
                .unwrap(),
        )
    }

    async fn put_foreign(&self, key: &Key, value: &[u8], ttl: Duration) -> Result<(), BoxError> {
        let (client, connection) =
            tokio_postgres::connect(&self.url, tokio_postgres::NoTls).await?;
        tokio::spawn(connection);
        client
            .execute(
                "INSERT INTO public.leaseholder_leases AS l \
                   (key, term, nonce, value, expires_at, revision) \
                 VALUES ($1, 1, '\\x00'::bytea, $2, clock_timestamp() + make_interval(secs => $3), 1) \
                 ON CONFLICT (key) DO UPDATE SET nonce = excluded.nonce, value = excluded.value, \
                   expires_at = excluded.expires_at, revision = l.revision + 1",
                &[&key.as_str(), &value, &ttl.as_secs_f64()],
            )
            .await?;
        Ok(())
    }

    fn ttl(&self) -> Duration {
        Duration::from_millis(500)
    }

    fn expiry_slack(&self) -> Duration {
        // Expiry is judged by the server's clock at each read: exact.
        Duration::from_millis(300)
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
        let harness = Postgres { url, _server: None };
        assert!(conformance::child_main(&harness).await);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_backend_passes_the_contract() {
    let server = PostgresServer::start()
        .await
        .expect("PostgreSQL 15+ (run scripts/setup)");
    let harness = Postgres {
        url: server.url(),
        _server: Some(server),
    };
    let report = conformance::run(&harness).await;
    println!("{report}");
    assert!(report.is_ok(), "{report}");
    assert!(report.unsupported.is_empty(), "{report}");
}
