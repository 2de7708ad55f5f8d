//! The CLI on a SQLite file that the leaders of this process share with
//! it: the election scenario, and setup.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::Duration;

use leaseholder::{Backend, SqliteBackend};
use leaseholder_testkit::TempDir;
use predicates::prelude::*;
use support::{cli, election};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_on_sqlite() {
    let dir = TempDir::new("leaseholder-cli-sqlite").unwrap();
    let path = dir.path().join("leases.db");
    let url = format!("sqlite://{}?table=leases", path.display());

    cli(&url, &["setup", "--dry-run"], None)
        .await
        .success()
        .stdout(
            predicate::str::contains(r#"CREATE TABLE IF NOT EXISTS "leases""#)
                .and(predicate::str::contains("dry run")),
        );
    cli(&url, &["setup"], None).await.success();

    election(
        &url,
        || {
            Backend::sqlite(
                SqliteBackend::builder()
                    .path(&path)
                    .table("leases")
                    .build()
                    .unwrap(),
            )
        },
        Duration::from_secs(2),
        // Without the registry: with it, a follower on SQLite can hold off
        // for the leader forever (each renewal's change wakes it to hold
        // off again, and the leader renews on each wake-up; seen here, a
        // library issue of the registry on a polling watch).
        false,
    )
    .await;
}
