//! The SQLite backend on real files in temporary directories: the
//! conformance suite with a new connection per candidate (as separate
//! processes would have), tokens across release and a re-created file,
//! setup's report and checks, a leader and a follower on one file
//! handing over through the polled watch (resign) and by expiry (crash),
//! and the candidate registry's table (created on an older file, checked,
//! entries of another boot or past their expiry never listed).
#![cfg(all(feature = "conformance", feature = "sqlite"))]
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use leaseholder::conformance::{self, Harness};
use leaseholder::{
    Acquired, Backend, BackendError, BoxError, Candidate, Claim, Error, Key, Leader, LeaderId,
    Prepared, Renewed, SqliteBackend, State,
};
use leaseholder_testkit::{TempDir, WorkLog};
use tokio::time::{Instant, timeout};

const WAIT: Duration = Duration::from_secs(30);

fn sqlite(path: &Path) -> Backend {
    Backend::sqlite(SqliteBackend::builder().path(path).build().unwrap())
}

/// CLOCK_BOOTTIME in ns and the boot id, as the backend stores them.
fn host_clock() -> (i64, String) {
    let ts = rustix::time::clock_gettime(rustix::time::ClockId::Boottime);
    let ns = ts.tv_sec * 1_000_000_000 + ts.tv_nsec;
    let boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap();
    (ns, boot.trim().to_owned())
}

/// Where a child process (see `child`) finds the parent's file.
const PATH_ENV: &str = "LEASEHOLDER_TEST_SQLITE_PATH";

struct Sqlite {
    /// Owned by the parent test; a child only has the path.
    _dir: Option<TempDir>,
    path: PathBuf,
}

impl Sqlite {
    fn new() -> Sqlite {
        let dir = TempDir::new("leaseholder-sqlite").unwrap();
        let path = dir.path().join("leases.db");
        Sqlite {
            _dir: Some(dir),
            path,
        }
    }
}

impl Harness for Sqlite {
    async fn backend(&self) -> Backend {
        // A new connection to the same file, as another process would have.
        sqlite(&self.path)
    }

    async fn put_foreign(&self, key: &Key, value: &[u8], ttl: Duration) -> Result<(), BoxError> {
        let db = rusqlite::Connection::open(&self.path)?;
        db.busy_timeout(Duration::from_secs(5))?;
        let ddl = SqliteBackend::builder().path(&self.path).build()?.ddl();
        db.execute_batch(&ddl)?;
        let (now, boot) = host_clock();
        let expires = now + i64::try_from(ttl.as_nanos())?;
        db.execute(
            "INSERT INTO leaseholder_leases (key, term, nonce, value, expires_at, boot_id, revision) \
             VALUES (?1, 1, NULL, ?2, ?3, ?4, 1) \
             ON CONFLICT (key) DO UPDATE SET nonce = NULL, value = excluded.value, \
               expires_at = excluded.expires_at, boot_id = excluded.boot_id, \
               revision = revision + 1",
            rusqlite::params![key.as_str(), value, expires, boot],
        )?;
        Ok(())
    }

    fn ttl(&self) -> Duration {
        Duration::from_millis(500)
    }

    fn child(&self) -> Option<tokio::process::Command> {
        let mut cmd = tokio::process::Command::new(std::env::current_exe().ok()?);
        cmd.args(["--exact", "child", "--nocapture"])
            .env(PATH_ENV, &self.path);
        Some(cmd)
    }
}

/// Not a test of its own: the entry point of the child processes the
/// suite's multi-process rows start (it does nothing when run directly).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn child() {
    if let Some(path) = std::env::var_os(PATH_ENV) {
        let harness = Sqlite {
            _dir: None,
            path: PathBuf::from(path),
        };
        assert!(conformance::child_main(&harness).await);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_passes_the_lease_contract() {
    let report = conformance::run(&Sqlite::new()).await;
    println!("{report}");
    assert!(report.is_ok(), "{report}");
    // The rows in separate processes run too: processes sharing one file
    // are what this backend is for.
    assert!(report.unsupported.is_empty(), "{report}");
}

fn claim() -> Claim {
    Claim::new(LeaderId::new(), Bytes::from_static(b"host-a"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_increase_across_release_and_a_recreated_file() {
    let h = Sqlite::new();
    let key = Key::new("job").unwrap();
    let ttl = Duration::from_secs(5);
    let a = sqlite(&h.path);
    assert_eq!(a.setup().await.unwrap(), Prepared::Created);
    let mut tokens = Vec::new();
    let mut last = None;
    for _ in 0..5 {
        let Acquired::Won(lease) = a.acquire(&key, &claim(), ttl).await.unwrap() else {
            panic!("the key is free");
        };
        // Another connection sees it, with its token.
        let seen = sqlite(&h.path).holder(&key).await.unwrap().unwrap();
        assert!(seen.is_nonce(lease.nonce()));
        assert_eq!(seen.token(), Some(lease.token()));
        assert!(seen.expires_in().unwrap() <= ttl);
        tokens.push(lease.token().get());
        a.release(&key, &lease).await.unwrap();
        assert!(a.holder(&key).await.unwrap().is_none());
        last = Some(lease);
    }
    // Delete the file (and its WAL) and let a new backend re-create it.
    for suffix in ["", "-wal", "-shm"] {
        let mut p = h.path.clone().into_os_string();
        p.push(suffix);
        let _ = std::fs::remove_file(p);
    }
    let b = sqlite(&h.path);
    assert_eq!(b.setup().await.unwrap(), Prepared::Created);
    let Acquired::Won(lease) = b.acquire(&key, &claim(), ttl).await.unwrap() else {
        panic!("the new file is empty");
    };
    tokens.push(lease.token().get());
    println!("tokens: {tokens:?}");
    assert!(tokens.windows(2).all(|w| w[0] < w[1]), "{tokens:?}");
    assert!(tokens.iter().all(|&t| t < 1 << 63));

    // The backend of the deleted file: its leases are gone, and it stops
    // rather than lead beside the new file's leaders.
    let old = last.unwrap();
    assert_eq!(a.renew(&key, &old, ttl).await.unwrap(), Renewed::Lost);
    a.release(&key, &old).await.unwrap();
    match a.acquire(&key, &claim(), ttl).await {
        Err(BackendError::Misconfigured { problem, .. }) => {
            assert!(problem.contains("deleted or replaced"), "{problem}");
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn setup_reports_created_then_existing_and_checks_the_table() {
    let h = Sqlite::new();
    // Many candidates at once: exactly one creates the table.
    let backends: Vec<Backend> = (0..8).map(|_| sqlite(&h.path)).collect();
    let results = futures_util::future::join_all(backends.iter().map(Backend::setup)).await;
    let created = results
        .iter()
        .filter(|r| matches!(r, Ok(Prepared::Created)))
        .count();
    assert_eq!(created, 1, "{results:?}");
    assert!(results.iter().all(Result::is_ok), "{results:?}");
    assert_eq!(sqlite(&h.path).setup().await.unwrap(), Prepared::Existing);

    // A table of the same name with other columns.
    let db = rusqlite::Connection::open(&h.path).unwrap();
    db.execute_batch("CREATE TABLE other (key TEXT PRIMARY KEY, term TEXT)")
        .unwrap();
    let b = Backend::sqlite(
        SqliteBackend::builder()
            .path(&h.path)
            .table("other")
            .build()
            .unwrap(),
    );
    match b.setup().await {
        Err(BackendError::Misconfigured { problem, fix }) => {
            assert!(problem.contains("term of type INTEGER"), "{problem}");
            assert!(fix.contains("ddl"), "{fix}");
        }
        other => panic!("{other:?}"),
    }

    // A file that is not a database.
    let junk = h.path.with_file_name("junk.db");
    std::fs::write(&junk, vec![0x42; 8192]).unwrap();
    match sqlite(&junk).setup().await {
        Err(BackendError::Misconfigured { problem, .. }) => {
            assert!(problem.contains("not a SQLite database"), "{problem}");
            assert!(problem.contains("junk.db"), "{problem}");
        }
        other => panic!("{other:?}"),
    }

    // A directory that does not exist.
    let nowhere = h.path.with_file_name("missing").join("leases.db");
    match sqlite(&nowhere).setup().await {
        Err(BackendError::Misconfigured { problem, .. }) => {
            assert!(problem.contains("cannot open"), "{problem}");
        }
        other => panic!("{other:?}"),
    }

    // Settings are checked at build time.
    for bad in ["", "sqlite_x", "1abc", "a-b", "a\"b"] {
        let e = SqliteBackend::builder()
            .path(&h.path)
            .table(bad)
            .build()
            .unwrap_err();
        assert!(
            matches!(
                e,
                leaseholder::ConfigError::Backend {
                    backend: "sqlite",
                    ..
                }
            ),
            "{e:?}"
        );
    }
    assert!(SqliteBackend::builder().build().is_err());
    assert!(SqliteBackend::builder().path(":memory:").build().is_err());
}

fn leader_on(path: &Path, ttl: Duration) -> Leader {
    Leader::builder("scheduler")
        .backend(sqlite(path))
        .ttl(ttl)
        .build()
        .unwrap()
}

async fn work(term: leaseholder::Term, who: String, log: WorkLog) -> Result<(), std::io::Error> {
    let _working = log.begin(who, term.fencing_token().get());
    term.cancelled().await;
    Ok(())
}

fn run(l: &Leader, who: &str, log: &WorkLog) -> tokio::task::JoinHandle<Result<(), Error>> {
    let (l, who, log) = (l.clone(), who.to_owned(), log.clone());
    tokio::spawn(async move {
        l.acquire_and_run(move |term| work(term, who.clone(), log.clone()))
            .await
    })
}

async fn wait_following(l: &Leader) {
    timeout(
        WAIT,
        l.state().wait_for(|s| {
            matches!(
                s,
                State::Follower {
                    leader: Some(_),
                    ..
                }
            )
        }),
    )
    .await
    .unwrap()
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_takes_over_at_once_after_resign_through_the_polled_watch() {
    let h = Sqlite::new();
    sqlite(&h.path).setup().await.unwrap();
    // ttl 10 s: the retry timer (2 s) and expiry would be far slower than
    // the watch.
    let ttl = Duration::from_secs(10);
    let log = WorkLog::new();
    let a = leader_on(&h.path, ttl);
    let ta = run(&a, "a", &log);
    timeout(WAIT, a.state().wait_for(State::is_leader))
        .await
        .unwrap()
        .unwrap();
    let mut took = Vec::new();
    let (mut leader, mut follower) = (a, leader_on(&h.path, ttl));
    let mut tasks = vec![ta, run(&follower, "b", &log)];
    for round in 0..5 {
        wait_following(&follower).await;
        let terms = log.intervals().len();
        let t0 = Instant::now();
        leader.resign().await.unwrap();
        let next = timeout(WAIT, log.wait_for_start(terms + 1)).await.unwrap();
        took.push(next.start.duration_since(t0));
        assert_eq!(next.who, if round % 2 == 0 { "b" } else { "a" });
        std::mem::swap(&mut leader, &mut follower);
    }
    leader.shutdown().await.unwrap();
    follower.shutdown().await.unwrap();
    for t in tasks.drain(..) {
        t.await.unwrap().unwrap();
    }
    log.assert_safe();
    let tokens: Vec<u64> = log.intervals().iter().map(|i| i.token).collect();
    assert!(tokens.windows(2).all(|w| w[0] < w[1]), "{tokens:?}");
    let mut sorted = took.clone();
    sorted.sort();
    println!(
        "SQLite resign handoff (resign -> successor's work starts), ttl 10 s, 5 runs: median \
         {:?}, max {:?}; all {took:?}",
        sorted[2], sorted[4]
    );
    assert!(sorted[4] < Duration::from_secs(1), "{took:?}");
}

#[test]
fn a_follower_takes_over_within_about_a_ttl_after_the_leader_crashes() {
    let h = Sqlite::new();
    let ttl = Duration::from_secs(2);
    let log = WorkLog::new();
    // The leader runs on a runtime of its own; shutting it down in the
    // background drops its tasks mid-flight, releasing nothing: a crash.
    let crashed = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let a = leader_on(&h.path, ttl);
    crashed.block_on(async {
        sqlite(&h.path).setup().await.unwrap();
    });
    let ta = crashed.spawn({
        let (a, log) = (a.clone(), log.clone());
        async move {
            a.acquire_and_run(move |term| work(term, "a".into(), log.clone()))
                .await
        }
    });
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        timeout(WAIT, a.state().wait_for(State::is_leader))
            .await
            .unwrap()
            .unwrap();
        let b = leader_on(&h.path, ttl);
        let tb = run(&b, "b", &log);
        wait_following(&b).await;
        let t0 = Instant::now();
        drop(ta);
        crashed.shutdown_background();
        let next = timeout(WAIT, log.wait_for_start(2)).await.unwrap();
        let took = next.start.duration_since(t0);
        println!("SQLite crash failover (leader's runtime dropped -> follower's work starts), ttl 2 s: {took:?}");
        assert_eq!(next.who, "b");
        // The lease was renewed at most a renew interval (ttl/3) before the
        // crash, so it expires within a ttl; the follower wakes at its
        // expiry hint.
        assert!(took <= ttl + ttl / 4, "{took:?}");
        assert!(took >= ttl / 2, "{took:?}: the lease cannot have expired yet");
        b.shutdown().await.unwrap();
        tb.await.unwrap().unwrap();
    });
    log.assert_safe();
    let tokens: Vec<u64> = log.intervals().iter().map(|i| i.token).collect();
    assert!(tokens[0] < tokens[1], "{tokens:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_table_ends_the_term_and_stops_acquires() {
    let h = Sqlite::new();
    let key = Key::new("job").unwrap();
    let ttl = Duration::from_secs(5);
    let a = sqlite(&h.path);
    a.setup().await.unwrap();
    let Acquired::Won(lease) = a.acquire(&key, &claim(), ttl).await.unwrap() else {
        panic!("the key is free");
    };
    let db = rusqlite::Connection::open(&h.path).unwrap();
    db.execute_batch("DROP TABLE leaseholder_leases").unwrap();
    assert_eq!(a.renew(&key, &lease, ttl).await.unwrap(), Renewed::Lost);
    a.release(&key, &lease).await.unwrap();
    match a.acquire(&key, &claim(), ttl).await {
        Err(BackendError::Misconfigured { problem, .. }) => {
            assert!(problem.contains("does not exist"), "{problem}");
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        a.holder(&key).await,
        Err(BackendError::Misconfigured { .. })
    ));
}

/// The registry's table: setup adds it to a file that has only the lease
/// table (made by an earlier version) and reports `Existing`, refuses one
/// with other columns, and removes expired entries; an entry is listed only
/// while it is of this boot and its expiry on `CLOCK_BOOTTIME` is ahead;
/// registering with the table missing says to run setup.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_registry_table_is_set_up_and_expires_by_the_host_clock() {
    let h = Sqlite::new();
    let eb = SqliteBackend::builder().path(&h.path).build().unwrap();
    let b = Backend::sqlite(eb.clone());
    let key = Key::new("job").unwrap();
    let c = Candidate::new(LeaderId::new(), 1, &b"a"[..]);
    let ttl = Duration::from_secs(30);
    // An older file: the lease table only.
    let db = rusqlite::Connection::open(&h.path).unwrap();
    db.busy_timeout(WAIT).unwrap();
    let lease_ddl = eb.ddl();
    let lease_ddl = lease_ddl.split_inclusive(';').next().unwrap();
    db.execute_batch(lease_ddl).unwrap();
    match b.register_within(&key, &c, ttl, WAIT).await {
        Err(BackendError::Misconfigured { problem, fix }) => {
            assert!(problem.contains(eb.candidates_table()), "{problem}");
            assert!(fix.contains("setup"), "{fix}");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(b.setup().await.unwrap(), Prepared::Existing);
    b.register_within(&key, &c, ttl, WAIT).await.unwrap();
    let ids = |list: Vec<Candidate>| list.iter().map(Candidate::id).collect::<Vec<_>>();
    assert_eq!(ids(b.candidates(&key).await.unwrap()), vec![c.id()]);

    // Rows planted as another boot's, or expired by the host's clock, are
    // not listed; the next register of the key and the next setup remove
    // them.
    let (now, boot) = host_clock();
    let table = eb.candidates_table().to_owned();
    let plant = |id: LeaderId, key: &str, expires_at: i64, boot: &str| {
        let value = Candidate::new(id, 0, &b""[..]).encode();
        db.execute(
            &format!(
                "INSERT INTO \"{table}\" (key, id, value, expires_at, boot_id) \
                 VALUES (?1, ?2, ?3, ?4, ?5)"
            ),
            rusqlite::params![key, &id.as_bytes()[..], &value[..], expires_at, boot],
        )
        .unwrap();
    };
    let far = now + 3_600_000_000_000;
    plant(LeaderId::new(), "job", far, "another-boot");
    plant(LeaderId::new(), "job", now - 1, &boot);
    plant(LeaderId::new(), "other", now - 1, &boot);
    let rows = |key: &str| -> i64 {
        db.query_row(
            &format!("SELECT count(*) FROM \"{table}\" WHERE key = ?1"),
            [key],
            |r| r.get(0),
        )
        .unwrap()
    };
    assert_eq!(rows("job"), 3);
    assert_eq!(ids(b.candidates(&key).await.unwrap()), vec![c.id()]);
    b.register_within(&key, &c, ttl, WAIT).await.unwrap();
    assert_eq!(rows("job"), 1);
    assert_eq!(rows("other"), 1);
    // (A Backend runs its setup once: a new one, as a new process.)
    assert_eq!(sqlite(&h.path).setup().await.unwrap(), Prepared::Existing);
    assert_eq!(rows("other"), 0);
    assert_eq!(rows("job"), 1);

    // A registry table of that name with other columns.
    db.execute_batch(
        "CREATE TABLE bad (key TEXT PRIMARY KEY, term INTEGER NOT NULL, nonce BLOB, value BLOB, \
           expires_at INTEGER, boot_id TEXT, revision INTEGER NOT NULL) STRICT; \
         CREATE TABLE bad_candidates (key TEXT, id TEXT, PRIMARY KEY (key, id))",
    )
    .unwrap();
    let bad = Backend::sqlite(
        SqliteBackend::builder()
            .path(&h.path)
            .table("bad")
            .build()
            .unwrap(),
    );
    match bad.setup().await {
        Err(BackendError::Misconfigured { problem, .. }) => {
            assert!(problem.contains("bad_candidates"), "{problem}");
            assert!(problem.contains("id of type BLOB"), "{problem}");
        }
        other => panic!("{other:?}"),
    }
}

/// `Leader::proclaim` on a real file: the leader's new metadata is what
/// another client reads, under the same token, with no new election.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proclaim_is_seen_by_another_client_with_the_same_token() {
    let h = Sqlite::new();
    let ttl = Duration::from_secs(2);
    let a = Leader::builder("scheduler")
        .backend(sqlite(&h.path))
        .ttl(ttl)
        .metadata("starting")
        .build()
        .unwrap();
    let ta = tokio::spawn({
        let a = a.clone();
        async move { a.start(Default::default()).await }
    });
    timeout(WAIT, a.state().wait_for(State::is_leader))
        .await
        .unwrap()
        .unwrap();
    let token = a.fencing_token().unwrap();
    let other = leader_on(&h.path, ttl);
    let before = other.current_leader().await.unwrap().unwrap();
    assert_eq!(before.metadata().as_ref(), b"starting");

    timeout(WAIT, a.proclaim("serving at 10.0.0.7:8080"))
        .await
        .unwrap()
        .unwrap();
    let seen = other.current_leader().await.unwrap().unwrap();
    assert_eq!(seen.metadata().as_ref(), b"serving at 10.0.0.7:8080");
    assert_eq!(seen.token(), Some(token));
    assert_eq!(seen.id(), Some(a.leader_id()));
    assert_eq!(a.fencing_token(), Some(token), "no new election");

    a.shutdown().await.unwrap();
    ta.await.unwrap().unwrap();
}
