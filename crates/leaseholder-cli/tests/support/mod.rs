//! What every store's CLI test shares: the binary, two `Leader`s in this
//! process campaigning for one key, and the scenario that drives the CLI
//! against them (list, show, watch a handover, a forced release).
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::process::Stdio;
use std::sync::Mutex;
use std::time::Duration;

use assert_cmd::Command;
use leaseholder::{Backend, Error, Leader, LeaderId, State, Term};
use leaseholder_testkit::WorkLog;
use predicates::prelude::*;
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::sync::mpsc::UnboundedReceiver;
use tokio::task::JoinHandle;
use tokio::time::timeout;

/// The binary under test.
pub(crate) const BIN: &str = env!("CARGO_BIN_EXE_leaseholder");

/// How long a test waits for any one state.
pub(crate) const WAIT: Duration = Duration::from_secs(20);

/// The key the scenario campaigns for.
pub(crate) const KEY: &str = "scheduler";

/// Runs `leaseholder --store <store> <args…>` (stdin from `input`) on the
/// blocking pool, so that the leaders of this process keep running.
pub(crate) async fn cli(
    store: &str,
    args: &[&str],
    input: Option<&str>,
) -> assert_cmd::assert::Assert {
    let mut all = vec!["--store".to_owned(), store.to_owned()];
    all.extend(args.iter().map(|a| (*a).to_owned()));
    let input = input.map(str::to_owned);
    tokio::task::spawn_blocking(move || {
        let mut cmd = Command::new(BIN);
        cmd.args(&all).timeout(WAIT);
        if let Some(input) = input {
            cmd.write_stdin(input);
        }
        cmd.assert()
    })
    .await
    .expect("the CLI's thread")
}

/// The stdout of a successful run, as JSON.
pub(crate) async fn cli_json(store: &str, args: &[&str]) -> Value {
    let assert = cli(store, args, None).await.success();
    let text = String::from_utf8_lossy(&assert.get_output().stdout).into_owned();
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

/// A candidate for [`KEY`] with `metadata`, with the candidate registry
/// on or off.
pub(crate) fn leader(backend: Backend, metadata: &str, ttl: Duration, registry: bool) -> Leader {
    Leader::builder(KEY)
        .backend(backend)
        .ttl(ttl)
        .metadata(metadata.to_owned())
        .registry(registry)
        .build()
        .expect("a valid leader")
}

/// Runs `l`'s work: it records its interval in `log`, reports each term,
/// and waits for the term's token.
pub(crate) fn run(
    l: &Leader,
    who: &str,
    log: &WorkLog,
) -> (JoinHandle<Result<(), Error>>, UnboundedReceiver<Term>) {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let (l, who, log) = (l.clone(), who.to_owned(), log.clone());
    let task = tokio::spawn(async move {
        l.acquire_and_run(move |term| {
            let (tx, who, log) = (tx.clone(), who.clone(), log.clone());
            async move {
                let _working = log.begin(who, term.fencing_token().get());
                let _ = tx.send(term.clone());
                term.cancelled().await;
                Ok::<_, std::io::Error>(())
            }
        })
        .await
    });
    (task, rx)
}

/// The next term `terms` reports, within [`WAIT`].
pub(crate) async fn next_term(terms: &mut UnboundedReceiver<Term>, who: &str) -> Term {
    timeout(WAIT, terms.recv())
        .await
        .unwrap_or_else(|_| panic!("{who} did not lead within {WAIT:?}"))
        .expect("the work's channel")
}

/// Waits until `l`'s state satisfies `ok`, within [`WAIT`].
pub(crate) async fn wait_state(l: &Leader, what: &str, ok: impl Fn(&State) -> bool) {
    let mut state = l.state();
    timeout(WAIT, state.wait_for(|s| ok(s)))
        .await
        .unwrap_or_else(|_| {
            panic!(
                "{what}: not within {WAIT:?}; state {:?}",
                *l.state().borrow()
            )
        })
        .expect("the state channel");
}

/// A downstream store that refuses writes carrying a token below the
/// highest it has seen (the fenced write of the docs).
#[derive(Default)]
pub(crate) struct FencedSink {
    highest: Mutex<u64>,
}

impl FencedSink {
    pub(crate) fn write(&self, token: u64) -> Result<(), u64> {
        let mut highest = self.highest.lock().unwrap();
        if token < *highest {
            return Err(*highest);
        }
        *highest = token;
        Ok(())
    }
}

fn id(l: &Leader) -> String {
    l.leader_id().to_string()
}

/// The entry of [`KEY`] in a `list --json` reply.
fn listed(list: &Value) -> &Value {
    list.as_array()
        .expect("an array")
        .iter()
        .find(|e| e["key"] == KEY)
        .unwrap_or_else(|| panic!("{KEY} not listed: {list}"))
}

/// Reads `watch --json` lines until one satisfies `ok`.
async fn watch_until(
    lines: &mut tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
    what: &str,
    ok: impl Fn(&Value) -> bool,
) -> Value {
    let read = async {
        loop {
            let line = lines
                .next_line()
                .await
                .expect("the watch's stdout")
                .unwrap_or_else(|| panic!("watch ended before {what}"));
            let value: Value =
                serde_json::from_str(&line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
            if ok(&value) {
                return value;
            }
        }
    };
    timeout(WAIT, read)
        .await
        .unwrap_or_else(|_| panic!("watch did not show {what} within {WAIT:?}"))
}

/// The whole scenario on the store `url`, with `backend` making a new
/// client of the same store for each candidate, and the candidates in the
/// registry if `registry`:
///
/// 1. `a` leads, `b` follows; `list` (table and JSON) and `show` (text and
///    JSON, with both candidates) show `a`, its token and metadata;
/// 2. `watch` sees the handover when `a` resigns: `b` with a larger token;
/// 3. `release --force` refused without `--force`, and not confirmed on
///    stdin `n`: `b` still leads;
/// 4. `release --force --yes` ends `b`'s term: it says so, `a` leads with a
///    larger token, `b` steps down, and `b`'s fenced write is refused.
pub(crate) async fn election(
    url: &str,
    backend: impl Fn() -> Backend,
    ttl: Duration,
    registry: bool,
) {
    let log = WorkLog::new();
    let a = leader(backend(), "node-a", ttl, registry);
    let (task_a, mut terms_a) = run(&a, "a", &log);
    let first = next_term(&mut terms_a, "a").await;
    let b = leader(backend(), "node-b", ttl, registry);
    let (task_b, mut terms_b) = run(&b, "b", &log);
    let a_id: LeaderId = a.leader_id();
    wait_state(
        &b,
        "b follows a",
        |s| matches!(s, State::Follower { leader: Some(h), .. } if h.id() == Some(a_id)),
    )
    .await;
    let token = first.fencing_token().get();

    // 1. list and show.
    let list = cli_json(url, &["list", "--json"]).await;
    let entry = listed(&list);
    assert_eq!(entry["holder"], id(&a), "{list}");
    assert_eq!(entry["token"], token, "{list}");
    assert_eq!(entry["metadata"], "node-a", "{list}");
    assert_eq!(entry["foreign"], false, "{list}");
    cli(url, &["list"], None).await.success().stdout(
        predicate::str::contains("KEY")
            .and(predicate::str::contains("TOKEN"))
            .and(predicate::str::contains(KEY))
            .and(predicate::str::contains(id(&a)))
            .and(predicate::str::contains(token.to_string()))
            .and(predicate::str::contains("node-a"))
            // Not a terminal: no colour.
            .and(predicate::str::contains("\x1b[").not()),
    );
    let shown = cli_json(url, &["show", KEY, "--json"]).await;
    assert_eq!(shown["held"], true, "{shown}");
    assert_eq!(shown["holder"], id(&a), "{shown}");
    assert_eq!(shown["token"], token, "{shown}");
    let candidates: Vec<&str> = shown["candidates"]
        .as_array()
        .unwrap_or_else(|| panic!("no candidates: {shown}"))
        .iter()
        .filter_map(|c| c["id"].as_str())
        .collect();
    let registered = if registry { 2 } else { 0 };
    assert_eq!(candidates.len(), registered, "{shown}");
    if registry {
        assert!(candidates.contains(&id(&a).as_str()), "{shown}");
        assert!(candidates.contains(&id(&b).as_str()), "{shown}");
    }
    cli(url, &["show", KEY], None).await.success().stdout(
        predicate::str::contains(format!("holder:     {}", id(&a)))
            .and(predicate::str::contains(format!("token:      {token}")))
            .and(predicate::str::contains("metadata:   node-a"))
            .and(predicate::str::contains(if registry {
                "candidates: 2"
            } else {
                "candidates: none registered"
            })),
    );

    // 2. watch sees the handover.
    let mut watch = tokio::process::Command::new(BIN)
        .args(["--store", url, "watch", KEY, "--json", "--poll", "500ms"])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .expect("start watch");
    let mut lines = BufReader::new(watch.stdout.take().expect("stdout")).lines();
    let seen = watch_until(&mut lines, "a leading", |v| v["state"] == "held").await;
    assert_eq!(seen["holder"], id(&a), "{seen}");
    timeout(WAIT, a.resign())
        .await
        .expect("resign in time")
        .expect("resign");
    let second = next_term(&mut terms_b, "b").await;
    let seen = watch_until(&mut lines, "b leading", |v| v["holder"] == id(&b)).await;
    assert_eq!(seen["token"], second.fencing_token().get(), "{seen}");
    assert!(second.fencing_token() > first.fencing_token());
    let _ = watch.kill().await;
    // A resignation is a clean handover: no overlap.
    log.assert_safe();

    // 3. Refusals.
    cli(url, &["release", KEY], None)
        .await
        .failure()
        .code(2)
        .stderr(predicate::str::contains("--force"));
    cli(url, &["release", KEY, "--force"], Some("n\n"))
        .await
        .failure()
        .code(8)
        .stderr(predicate::str::contains("not confirmed"));
    assert_eq!(b.fencing_token(), Some(second.fencing_token()));

    // 4. The forced release.
    let b_token = second.fencing_token().get();
    cli(url, &["release", KEY, "--force", "--yes"], None)
        .await
        .success()
        .stdout(predicate::str::contains(format!(
            "released key {KEY}: holder {} (token {b_token}, metadata node-b), token {b_token} ended",
            id(&b)
        )));
    // The follower takes over (the old leader, having lost its lease,
    // lets the others try first).
    let third = match timeout(WAIT, terms_a.recv()).await {
        Ok(Some(t)) => t,
        _ => panic!(
            "a did not lead: a {:?}, b {:?}, b's next term {:?}",
            *a.state().borrow(),
            *b.state().borrow(),
            terms_b.try_recv().map(|t| t.fencing_token())
        ),
    };
    assert!(
        third.fencing_token() > second.fencing_token(),
        "{:?} after {:?}",
        third.fencing_token(),
        second.fencing_token()
    );
    // The old leader finds out and cancels its work.
    timeout(WAIT, second.cancelled())
        .await
        .expect("b's term was cancelled");
    wait_state(&b, "b follows", |s| !s.is_leader()).await;
    // Fencing: the new leader writes, then the old one's write is refused.
    let sink = FencedSink::default();
    sink.write(third.fencing_token().get())
        .expect("the new leader's write");
    assert_eq!(
        sink.write(b_token),
        Err(third.fencing_token().get()),
        "the old leader's fenced write"
    );
    let list = cli_json(url, &["list", "--json"]).await;
    assert_eq!(listed(&list)["holder"], id(&a), "{list}");
    assert_eq!(
        listed(&list)["token"],
        third.fencing_token().get(),
        "{list}"
    );

    for (l, task) in [(&a, task_a), (&b, task_b)] {
        timeout(WAIT, l.shutdown())
            .await
            .expect("shutdown in time")
            .expect("shutdown");
        let _ = timeout(WAIT, task).await;
    }
}
