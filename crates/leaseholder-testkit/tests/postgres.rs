//! Real PostgreSQL servers.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

use leaseholder_testkit::{
    Error, MIN_POSTGRES_VERSION, POSTGRES_MAX_CONNECTIONS, PostgresServer, TempDir, find_postgres,
};
use tokio::time::timeout;
use tokio_postgres::Client;

/// Bound on something that should succeed promptly.
const PATIENCE: Duration = Duration::from_secs(10);

/// Bound on a query that should hang (against a paused server).
const SHORT: Duration = Duration::from_millis(300);

async fn start() -> PostgresServer {
    let started = Instant::now();
    let server = PostgresServer::start()
        .await
        .unwrap_or_else(|e| panic!("starting postgres failed (run scripts/setup?): {e}"));
    println!("postgres ready in {:?}", started.elapsed());
    server
}

async fn connect(server: &PostgresServer) -> Client {
    timeout(PATIENCE, server.connect()).await.unwrap().unwrap()
}

/// The single value `sql` returns, as text.
async fn query_one(client: &Client, sql: &str) -> String {
    let row = timeout(PATIENCE, client.query_one(sql, &[]))
        .await
        .unwrap()
        .unwrap();
    row.get(0)
}

/// `(pid, start time)` of a process, which identifies it even if its PID
/// is reused, or `None` if there is no such process.
fn process_identity(pid: u32) -> Option<(u32, String)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, after_name) = stat.rsplit_once(')')?;
    // Field 22 of stat is the start time; field 3 (the state) is the first
    // after the name.
    let start_time = after_name.split_whitespace().nth(19)?.to_owned();
    Some((pid, start_time))
}

/// Whether the process identified by `identity` still exists (as anything,
/// even a zombie).
fn still_exists(identity: &(u32, String)) -> bool {
    process_identity(identity.0).as_ref() == Some(identity)
}

#[tokio::test]
async fn starts_and_answers_a_query() {
    let server = start().await;
    assert_eq!(
        server.url(),
        format!("postgres://postgres@127.0.0.1:{}/postgres", server.port())
    );
    assert_eq!(server.addr().port(), server.port());
    assert!(server.addr().ip().is_loopback());
    let major = server.major_version().expect("version parses");
    assert!(
        major >= MIN_POSTGRES_VERSION,
        "version {} is older than {MIN_POSTGRES_VERSION}",
        server.version()
    );
    assert!(server.data_dir().join("PG_VERSION").is_file());

    let client = connect(&server).await;
    let row = timeout(PATIENCE, client.query_one("SELECT 1 + 1", &[]))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(row.get::<_, i32>(0), 2);
    assert_eq!(
        query_one(&client, "SHOW server_version").await,
        server.version()
    );
    assert_eq!(
        query_one(&client, "SHOW max_connections").await,
        POSTGRES_MAX_CONNECTIONS.to_string()
    );
    assert_eq!(query_one(&client, "SHOW fsync").await, "off");
    assert_eq!(query_one(&client, "SELECT current_user").await, "postgres");
    assert_eq!(
        timeout(PATIENCE, server.ping()).await.unwrap().unwrap(),
        server.version()
    );
}

#[tokio::test]
async fn accepts_many_connections() {
    let server = start().await;
    let mut clients = Vec::new();
    for _ in 0..150 {
        clients.push(connect(&server).await);
    }
    for client in &clients {
        assert_eq!(query_one(client, "SELECT 'ok'").await, "ok");
    }
}

#[tokio::test]
async fn restart_keeps_the_port_and_the_data() {
    let mut server = start().await;
    let port = server.port();
    let pid = server.pid();
    {
        let client = connect(&server).await;
        client
            .batch_execute("CREATE TABLE kept (v text); INSERT INTO kept VALUES ('before')")
            .await
            .unwrap();
    }

    server.kill().await.unwrap();
    assert!(
        timeout(PATIENCE, server.connect()).await.unwrap().is_err(),
        "a killed server must not accept connections"
    );

    let started = Instant::now();
    server.restart().await.unwrap();
    println!("postgres restarted in {:?}", started.elapsed());
    assert_eq!(server.port(), port);
    assert_ne!(server.pid(), pid);
    let client = connect(&server).await;
    assert_eq!(query_one(&client, "SELECT v FROM kept").await, "before");
    client
        .batch_execute("INSERT INTO kept VALUES ('between')")
        .await
        .unwrap();

    // Restarting a running server, with a client connected, works too; the
    // client's connection ends.
    server.restart().await.unwrap();
    assert_eq!(server.port(), port);
    assert!(
        timeout(PATIENCE, client.simple_query("SELECT 1"))
            .await
            .unwrap()
            .is_err(),
        "a connection to the old process must be closed"
    );
    let client = connect(&server).await;
    assert_eq!(
        query_one(&client, "SELECT string_agg(v, ',' ORDER BY v) FROM kept").await,
        "before,between"
    );
}

#[tokio::test]
async fn pause_makes_queries_time_out_and_resume_recovers() {
    let server = start().await;
    let client = connect(&server).await;
    assert_eq!(query_one(&client, "SELECT 'before'").await, "before");

    server.pause().unwrap();
    assert!(
        timeout(SHORT, client.simple_query("SELECT 1"))
            .await
            .is_err(),
        "a paused server must not answer on an open connection"
    );
    assert!(
        timeout(SHORT, server.connect()).await.is_err(),
        "a paused server must not accept a new session"
    );

    server.resume().unwrap();
    assert_eq!(query_one(&client, "SELECT 'after'").await, "after");
    let fresh = connect(&server).await;
    assert_eq!(query_one(&fresh, "SELECT 'fresh'").await, "fresh");
}

#[tokio::test]
async fn a_paused_server_can_be_killed_and_restarted() {
    let mut server = start().await;
    server.pause().unwrap();
    timeout(PATIENCE, server.kill()).await.unwrap().unwrap();
    server.restart().await.unwrap();
    let client = connect(&server).await;
    assert_eq!(query_one(&client, "SELECT 'back'").await, "back");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_servers_run_side_by_side() {
    let (a, b) = tokio::join!(start(), start());
    assert_ne!(a.port(), b.port());
    assert_ne!(a.dir(), b.dir());
    let (ca, cb) = (connect(&a).await, connect(&b).await);
    ca.batch_execute("CREATE TABLE only_in_a ()").await.unwrap();
    cb.batch_execute("CREATE TABLE only_in_b ()").await.unwrap();
    let tables =
        "SELECT string_agg(tablename, ',') FROM pg_tables WHERE tablename LIKE 'only_in_%'";
    assert_eq!(query_one(&ca, tables).await, "only_in_a");
    assert_eq!(query_one(&cb, tables).await, "only_in_b");
}

#[tokio::test]
async fn drop_leaves_no_process_or_directory_behind() {
    let server = start().await;
    let client = connect(&server).await;
    assert_eq!(query_one(&client, "SELECT 1::text").await, "1");
    let dir = server.dir().to_owned();
    let mut pids = vec![server.pid()];
    pids.extend(server.child_pids());
    // The postmaster, its auxiliary processes and this client's backend.
    assert!(pids.len() >= 3, "{pids:?}");
    let processes: Vec<_> = pids
        .iter()
        .filter_map(|&pid| process_identity(pid))
        .collect();
    assert_eq!(processes.len(), pids.len(), "{pids:?}");

    drop(server);
    // Drop waits for the postmaster, which reaps its children before it
    // exits: nothing is left, not even a zombie, and no waiting is needed.
    let left: Vec<_> = processes.iter().filter(|p| still_exists(p)).collect();
    assert!(left.is_empty(), "left behind: {left:?}");
    assert!(!dir.exists(), "{} was not removed", dir.display());
    assert!(
        timeout(PATIENCE, client.simple_query("SELECT 1"))
            .await
            .unwrap()
            .is_err()
    );
}

#[tokio::test]
async fn kill_leaves_no_process_behind() {
    let mut server = start().await;
    let _client = connect(&server).await;
    let mut pids = vec![server.pid()];
    pids.extend(server.child_pids());
    let processes: Vec<_> = pids
        .iter()
        .filter_map(|&pid| process_identity(pid))
        .collect();

    server.kill().await.unwrap();
    let left: Vec<_> = processes.iter().filter(|p| still_exists(p)).collect();
    assert!(left.is_empty(), "left behind: {left:?}");
    assert!(server.child_pids().is_empty());
    assert!(server.pause().is_err(), "a killed server cannot be paused");
}

#[test]
fn missing_version_names_the_setup_script() {
    let error = find_postgres(99).unwrap_err();
    assert!(
        matches!(error, Error::MissingBinary { .. }),
        "unexpected error: {error:?}"
    );
    let message = error.to_string();
    assert!(message.contains("scripts/setup"), "{message}");
    assert!(message.contains(">= 99"), "{message}");
}

#[test]
fn finds_an_installed_postgres() {
    let bin_dir = find_postgres(MIN_POSTGRES_VERSION)
        .unwrap_or_else(|e| panic!("no postgres (run scripts/setup): {e}"));
    assert!(bin_dir.join("postgres").is_file(), "{}", bin_dir.display());
    assert!(bin_dir.join("initdb").is_file(), "{}", bin_dir.display());
}

#[tokio::test]
async fn a_server_that_exits_fails_fast_with_its_output() {
    let bin = TempDir::new("testkit-fake-postgres").unwrap();
    for (name, script) in [
        ("initdb", "#!/bin/sh\nexit 0\n"),
        (
            "postgres",
            "#!/bin/sh\necho 'fake postgres gives up' >&2\nexit 3\n",
        ),
    ] {
        let path = bin.path().join(name);
        std::fs::write(&path, script).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    std::fs::set_permissions(bin.path(), std::fs::Permissions::from_mode(0o755)).unwrap();

    let started = Instant::now();
    let error = PostgresServer::start_with(bin.path()).await.unwrap_err();
    assert!(
        matches!(&error, Error::CommandFailed { output, .. } if output.contains("fake postgres gives up")),
        "unexpected error: {error:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(5));
    assert!(Path::new(bin.path()).is_dir());
}
