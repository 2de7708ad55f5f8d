//! The CLI against a real PostgreSQL: setup (DDL, create, validate), the
//! election scenario on a table in its own schema, and the errors of a
//! missing table and an unreachable server.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::Duration;

use leaseholder::{Backend, PostgresBackend};
use leaseholder_testkit::{PostgresServer, free_port};
use predicates::prelude::*;
use support::{KEY, cli, election};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_on_postgres() {
    let server = PostgresServer::start()
        .await
        .expect("PostgreSQL 15+ (run scripts/setup)");
    let url = format!("{}?table=ops.leases", server.url());

    cli(&url, &["setup", "--dry-run"], None)
        .await
        .success()
        .stdout(
            predicate::str::contains(r#"CREATE SCHEMA IF NOT EXISTS "ops";"#)
                .and(predicate::str::contains(
                    r#"CREATE TABLE IF NOT EXISTS "ops"."leases" ("#,
                ))
                .and(predicate::str::contains("dry run")),
        );
    // Nothing was created: the table is missing.
    cli(&url, &["list"], None).await.failure().code(4).stderr(
        predicate::str::contains(r#"table "ops"."leases" does not exist"#)
            .and(predicate::str::contains("\n").count(1)),
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

    let pg_url = server.url();
    election(
        &url,
        || {
            Backend::postgres(
                PostgresBackend::builder()
                    .url(&pg_url)
                    .schema("ops")
                    .table("leases")
                    .build()
                    .unwrap(),
            )
        },
        Duration::from_secs(2),
        true,
    )
    .await;

    cli(
        &format!("{}?table=nope", server.url()),
        &["show", KEY],
        None,
    )
    .await
    .failure()
    .code(4)
    .stderr(predicate::str::contains(
        r#""public"."nope" does not exist"#,
    ));
    let nowhere = format!(
        "postgres://postgres@127.0.0.1:{}/postgres",
        free_port().unwrap()
    );
    cli(&nowhere, &["--timeout", "1s", "list"], None)
        .await
        .failure()
        .code(3);
}
