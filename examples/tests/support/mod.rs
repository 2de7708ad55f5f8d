//! Servers for the example tests, with the lease bucket or table already
//! created (`mod support;`). A candidate whose own setup creates it waits
//! one ttl before its first acquire (it may replace one deleted under a
//! running leader), which these tests are not about.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::process::Stdio;
use std::time::Duration;

use leaseholder_testkit::{
    ChildGuard, EtcdServer, NatsServer, PostgresServer, RedisServer, TempDir,
};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::ChildStdin;
use tokio::sync::mpsc;
use tokio::time::{Instant, timeout_at};

/// The longest a copy of an example may take to print a line a test
/// waits for.
pub(crate) const LINE_WAIT: Duration = Duration::from_secs(60);

/// The message a test gives when PostgreSQL is not installed.
pub(crate) const NO_POSTGRES: &str = "PostgreSQL 15+: run scripts/setup";

/// A fresh PostgreSQL with the lease table created.
pub(crate) async fn postgres_with_table() -> PostgresServer {
    let server = PostgresServer::start().await.expect(NO_POSTGRES);
    leaseholder::Backend::postgres(
        leaseholder::PostgresBackend::builder()
            .url(server.url())
            .build()
            .unwrap(),
    )
    .setup()
    .await
    .unwrap();
    server
}

/// A fresh nats-server with the KV bucket `bucket` created.
pub(crate) async fn nats_with_bucket(bucket: &str) -> NatsServer {
    let server = NatsServer::start()
        .await
        .expect("nats-server 2.11+: run scripts/setup");
    let client = async_nats::connect(server.url()).await.unwrap();
    leaseholder::Backend::nats(client, bucket)
        .setup()
        .await
        .unwrap();
    server
}

/// A SQLite file in a fresh temporary directory (removed with the
/// returned guard), with the lease table created; and the candidate's
/// store argument for it, `sqlite:<path>`.
pub(crate) async fn sqlite_with_table() -> (TempDir, String) {
    let dir = TempDir::new("leaseholder-sqlite").unwrap();
    let path = dir.path().join("leases.db");
    leaseholder::Backend::sqlite(
        leaseholder::SqliteBackend::builder()
            .path(&path)
            .build()
            .unwrap(),
    )
    .setup()
    .await
    .unwrap();
    (dir, format!("sqlite:{}", path.display()))
}

/// A fresh redis-server whose epoch marker says it has been in use for a
/// long time (on a fresh store, the backend's setup writes the marker and
/// every acquisition waits one ttl after it, which these tests are not
/// about; `crates/leaseholder/tests/redis.rs` tests that wait).
pub(crate) async fn redis_in_use() -> RedisServer {
    let server = RedisServer::start()
        .await
        .expect("redis-server 7+: run scripts/setup");
    let out = server
        .cli(&["SET", "leaseholder:epoch", "0"])
        .await
        .unwrap();
    assert_eq!(out.trim(), "OK");
    server
}

/// A fresh single-member etcd whose epoch marker (`leaseholder/epoch`)
/// says it has been in use for a long time (on a new cluster, the first
/// acquire writes the marker and every acquire waits one ttl after it,
/// which these tests are not about; see the module docs of
/// `crates/leaseholder/src/backend/etcd.rs`).
pub(crate) async fn etcd_in_use() -> EtcdServer {
    let server = EtcdServer::start()
        .await
        .expect("etcd 3.4+ (run scripts/setup)");
    let out = server
        .ctl(&["put", "leaseholder/epoch", "0"])
        .await
        .unwrap();
    assert_eq!(out.trim(), "OK");
    server
}

/// The candidate's store argument for `server`: `etcd://127.0.0.1:PORT`.
pub(crate) fn etcd_url(server: &EtcdServer) -> String {
    format!("etcd://{}", server.addr())
}

/// The path of example `name`, which cargo builds next to the test
/// binaries (`target/<profile>/examples/`) when it builds all the tests,
/// but not for `--test operability` alone: then the binary may be missing
/// or older than its source, and this says so.
pub(crate) fn example(name: &str) -> std::path::PathBuf {
    let exe = std::env::current_exe().unwrap();
    let profile_dir = exe.parent().and_then(|deps| deps.parent()).unwrap();
    let path = profile_dir.join("examples").join(name);
    let source = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("{name}.rs"));
    let modified = |p: &std::path::Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    assert!(
        modified(&path) >= modified(&source),
        "{} is missing or older than {}: build the examples first \
         (`cargo build -p leaseholder-examples --examples`, or run the tests without `--test`)",
        path.display(),
        source.display()
    );
    path
}

/// One line a copy printed (or `EOF` when its stdout closed): the copy's
/// index, when the test read it, and the line.
#[derive(Clone, Debug)]
pub(crate) struct Line {
    pub(crate) copy: usize,
    pub(crate) at: Instant,
    pub(crate) text: String,
}

/// Copies of one example as processes, and every line they printed, in
/// the order the test read them (each copy's own lines in the order it
/// printed them).
pub(crate) struct Copies {
    pub(crate) procs: Vec<ChildGuard>,
    /// Each copy's stdin, if it was started with one to write to
    /// ([`spawn_program`](Self::spawn_program)).
    stdins: Vec<Option<ChildStdin>>,
    tx: mpsc::UnboundedSender<Line>,
    rx: mpsc::UnboundedReceiver<Line>,
    pub(crate) seen: Vec<Line>,
}

impl Copies {
    pub(crate) fn new() -> Copies {
        let (tx, rx) = mpsc::unbounded_channel();
        Copies {
            procs: Vec::new(),
            stdins: Vec::new(),
            tx,
            rx,
            seen: Vec::new(),
        }
    }

    /// Starts a copy of example `name` with `envs` set; its index.
    pub(crate) fn spawn(&mut self, name: &str, envs: &[(&str, &str)]) -> usize {
        let mut cmd = tokio::process::Command::new(example(name));
        cmd.envs(envs.iter().copied());
        self.start(cmd)
    }

    /// Starts `program` with `args` and `envs` as one more copy, its stdin
    /// a pipe for [`send`](Self::send); its index.
    pub(crate) fn spawn_program(
        &mut self,
        program: impl AsRef<std::ffi::OsStr>,
        args: &[String],
        envs: &[(&str, String)],
    ) -> usize {
        let mut cmd = tokio::process::Command::new(program);
        cmd.args(args)
            .envs(envs.iter().map(|(k, v)| (*k, v.as_str())))
            .stdin(Stdio::piped());
        self.start(cmd)
    }

    fn start(&mut self, mut cmd: tokio::process::Command) -> usize {
        cmd.stdout(Stdio::piped()).stderr(Stdio::inherit());
        let mut guard = ChildGuard::spawn(&mut cmd).unwrap();
        let stdout = guard.child_mut().stdout.take().unwrap();
        let stdin = guard.child_mut().stdin.take();
        let copy = self.procs.len();
        let tx = self.tx.clone();
        tokio::spawn(async move {
            let mut lines = BufReader::new(stdout).lines();
            while let Ok(Some(text)) = lines.next_line().await {
                let _ = tx.send(Line {
                    copy,
                    at: Instant::now(),
                    text,
                });
            }
            let _ = tx.send(Line {
                copy,
                at: Instant::now(),
                text: "EOF".into(),
            });
        });
        self.procs.push(guard);
        self.stdins.push(stdin);
        copy
    }

    /// Writes `line` and a newline to the stdin of `copy` (started with
    /// [`spawn_program`](Self::spawn_program)).
    pub(crate) async fn send(&mut self, copy: usize, line: &str) {
        let stdin = self.stdins[copy]
            .as_mut()
            .unwrap_or_else(|| panic!("copy {copy} has no stdin to write to"));
        stdin
            .write_all(format!("{line}\n").as_bytes())
            .await
            .unwrap_or_else(|e| panic!("writing to copy {copy}: {e}"));
        stdin.flush().await.unwrap();
    }

    /// Waits until `done`, called on every line seen so far after each new
    /// one, returns `Some`; at most [`LINE_WAIT`].
    pub(crate) async fn until_seen<T>(
        &mut self,
        what: &str,
        mut done: impl FnMut(&[Line]) -> Option<T>,
    ) -> T {
        if let Some(found) = done(&self.seen) {
            return found;
        }
        let deadline = Instant::now() + LINE_WAIT;
        loop {
            let Ok(next) = timeout_at(deadline, self.rx.recv()).await else {
                panic!("no {what} within {LINE_WAIT:?}; seen: {:#?}", self.texts());
            };
            self.seen.push(next.expect("the copies hold a sender"));
            if let Some(found) = done(&self.seen) {
                return found;
            }
        }
    }

    /// The first line, seen or still to come, that `want` matches; waits
    /// at most [`LINE_WAIT`].
    pub(crate) async fn until(&mut self, what: &str, want: impl Fn(&Line) -> bool) -> Line {
        if let Some(line) = self.seen.iter().find(|l| want(l)) {
            return line.clone();
        }
        let deadline = Instant::now() + LINE_WAIT;
        loop {
            let Ok(next) = timeout_at(deadline, self.rx.recv()).await else {
                panic!("no {what} within {LINE_WAIT:?}; seen: {:#?}", self.texts());
            };
            let line = next.expect("the copies hold a sender");
            self.seen.push(line.clone());
            if want(&line) {
                return line;
            }
        }
    }

    /// Where `line` is in [`seen`](Self::seen).
    pub(crate) fn position(&self, line: &Line) -> usize {
        self.seen
            .iter()
            .position(|l| l.copy == line.copy && l.at == line.at && l.text == line.text)
            .unwrap()
    }

    /// Every line seen, as `copy: text`, but for the `WRITE` lines of the
    /// candidate binary (one per 50 ms while it leads).
    pub(crate) fn texts(&self) -> Vec<String> {
        self.seen
            .iter()
            .filter(|l| !l.text.starts_with("WRITE "))
            .map(|l| format!("{}: {}", l.copy, l.text))
            .collect()
    }
}
