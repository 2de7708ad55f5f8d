//! The operability examples on a real PostgreSQL: `kubernetes_shutdown`
//! drains and hands over on SIGTERM with no leaderless gap, and
//! `fenced_write`'s statement refuses a stale leader's write.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Stdio;
use std::time::Duration;

use leaseholder::{Backend, Leader, PostgresBackend};
use leaseholder_testkit::ChildGuard;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::time::{Instant, timeout};

mod support;
use support::*;
use tokio_util::sync::CancellationToken;

// The example's SQL and functions, compiled here as a module (its `main`
// is unused).
#[allow(dead_code)]
#[path = "../fenced_write.rs"]
mod fenced_write;

/// The longest any single wait for an event may take.
const WAIT: Duration = Duration::from_secs(60);

fn token_in(line: &Line) -> u64 {
    line.text
        .strip_prefix("leading with fencing token ")
        .unwrap()
        .parse()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubernetes_shutdown_drains_the_unit_in_progress_then_hands_over_at_once() {
    let server = postgres_with_table().await;
    let url = server.url();
    // The table exists before the copies start: a copy whose own setup
    // creates it waits one ttl before its first acquire (the table may
    // replace one dropped under a running leader), which would delay the
    // handoff measured here.
    Backend::postgres(PostgresBackend::builder().url(&url).build().unwrap())
        .setup()
        .await
        .unwrap();
    let mut copies = Copies::new();
    copies.spawn("kubernetes_shutdown", &[("DATABASE_URL", &url)]);
    copies.spawn("kubernetes_shutdown", &[("DATABASE_URL", &url)]);
    let leading = |l: &Line| l.text.starts_with("leading with fencing token ");
    let first = copies.until("leader", leading).await;
    let (leader, other, t1) = (first.copy, 1 - first.copy, token_in(&first));

    // A handle that only reads the lease (it never campaigns). One read
    // now, so that its connection is open before the drain.
    let reader = Leader::builder("kubernetes-shutdown")
        .backend(Backend::postgres(
            PostgresBackend::builder().url(&url).build().unwrap(),
        ))
        .ttl(Duration::from_secs(10))
        .build()
        .unwrap();
    let holder = reader.current_leader().await.unwrap().unwrap();
    assert_eq!(holder.token().map(|t| t.get()), Some(t1));

    // SIGTERM right after a unit has started: that unit (200 ms) is in
    // progress when the signal arrives.
    let started = copies
        .until("the leader's second unit", |l| {
            l.copy == leader && l.text == "unit 2 started"
        })
        .await;
    let sigterm = Instant::now();
    copies.procs[leader].terminate().unwrap();
    let draining = copies
        .until("the leader's drain", |l| {
            l.copy == leader && l.text == "SIGTERM: draining"
        })
        .await;
    // While the unit drains, the first copy still holds the lease.
    let holder = reader.current_leader().await.unwrap().unwrap();
    assert_eq!(
        holder.token().map(|t| t.get()),
        Some(t1),
        "the lease changed hands during the drain"
    );
    let done = copies
        .until("the unit in progress done", |l| {
            l.copy == leader && l.text == "unit 2 done"
        })
        .await;
    let drained = copies
        .until("the leader's release", |l| {
            l.copy == leader && l.text.starts_with("drained after ")
        })
        .await;
    let next = copies
        .until("the successor", |l| l.copy == other && leading(l))
        .await;
    copies
        .until("the leader's exit", |l| l.copy == leader && l.text == "EOF")
        .await;
    let status = timeout(WAIT, copies.procs[leader].wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "{status:?}: {:#?}", copies.texts());

    // The leader's last lines, in its own order: the signal, the unit that
    // was in progress, the release. It started no unit after the signal.
    let after: Vec<&str> = copies.seen[copies.position(&started) + 1..]
        .iter()
        .filter(|l| l.copy == leader)
        .map(|l| l.text.as_str())
        .collect();
    assert_eq!(
        after,
        [
            "SIGTERM: draining",
            "unit 2 done",
            drained.text.as_str(),
            "EOF"
        ],
        "{:#?}",
        copies.texts()
    );
    // The successor: a larger token, not before the drained unit was done
    // (its lease was held until then), and well within the ttl of the
    // release: the watch hands over, not the lease's expiry.
    let t2 = token_in(&next);
    assert!(t2 > t1, "{t2} after {t1}");
    assert!(
        next.at > done.at,
        "the successor led during the drain: {:#?}",
        copies.texts()
    );
    let handoff = next.at.saturating_duration_since(drained.at);
    assert!(handoff < Duration::from_secs(2), "{handoff:?}");
    println!(
        "kubernetes_shutdown: SIGTERM -> `draining` read {:?}, -> unit done {:?}, \
         -> `{}` read {:?}, -> successor leads {:?} (release line -> successor {:?}); \
         tokens {t1} -> {t2}",
        draining.at - sigterm,
        done.at - sigterm,
        drained.text,
        drained.at - sigterm,
        next.at - sigterm,
        handoff,
    );
    println!("{:#?}", copies.texts());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fenced_write_refuses_a_stale_leaders_write() {
    let server = postgres_with_table().await;
    let client = server.connect().await.unwrap();
    client
        .batch_execute(fenced_write::CREATE_TABLE)
        .await
        .unwrap();
    let candidate = || {
        Leader::builder("fenced")
            .backend(Backend::postgres(
                PostgresBackend::builder()
                    .url(server.url())
                    .build()
                    .unwrap(),
            ))
            .ttl(Duration::from_secs(10))
            .build()
            .unwrap()
    };
    let campaign = |leader: &Leader| {
        let leader = leader.clone();
        tokio::spawn(async move { leader.start(CancellationToken::new()).await })
    };
    let lead = |leader: &Leader| {
        let mut state = leader.state();
        async move {
            timeout(WAIT, state.wait_for(|s| s.is_leader()))
                .await
                .unwrap()
                .unwrap();
        }
    };

    // A leads: term t1.
    let a = candidate();
    let a_run = campaign(&a);
    lead(&a).await;
    let a_term = a.current_term().unwrap();
    let t1 = a_term.fencing_token();

    // A steps down (as if it had been paused past its ttl); B leads: t2.
    let b = candidate();
    let b_run = campaign(&b);
    a.shutdown().await.unwrap();
    a_run.await.unwrap().unwrap();
    lead(&b).await;
    let b_term = b.current_term().unwrap();
    let t2 = b_term.fencing_token();
    assert!(t2 > t1, "{t2} after {t1}");

    // B writes twice with the same token: `fence <= $1` accepts both.
    for _ in 0..2 {
        assert!(
            fenced_write::write_fenced(&client, b_term.check().unwrap())
                .await
                .unwrap()
        );
    }
    // A's write with its old token arrives now (it was queued before A
    // lost its lease): refused, 0 rows.
    assert!(!a_term.is_valid());
    assert!(
        !fenced_write::write_fenced(&client, t1).await.unwrap(),
        "a write with the stale token {t1} was applied after {t2}"
    );
    let (value, fence) = fenced_write::read_counter(&client).await.unwrap();
    assert_eq!((value, fence), (2, i64::try_from(t2.get()).unwrap()));
    println!(
        "fenced_write: tokens {t1} (stale, refused) < {t2} (2 writes): counter {value}, fence {fence}"
    );

    b.shutdown().await.unwrap();
    b_run.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fenced_write_example_counts_across_runs() {
    let server = postgres_with_table().await;
    let run = || {
        tokio::process::Command::new(example("fenced_write"))
            .env("DATABASE_URL", server.url())
            .kill_on_drop(true)
            .output()
    };
    let mut fences = Vec::new();
    for expected in [3, 6] {
        let output = timeout(WAIT, run()).await.unwrap().unwrap();
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success(),
            "{stdout}\n{}",
            String::from_utf8_lossy(&output.stderr)
        );
        assert_eq!(
            stdout.matches("write accepted with fencing token").count(),
            3,
            "{stdout}"
        );
        let last = stdout.lines().last().unwrap();
        let fence: u64 = last
            .strip_prefix(&format!("counter {expected}, fence "))
            .unwrap_or_else(|| panic!("{stdout}"))
            .parse()
            .unwrap();
        assert!(
            stdout.contains(&format!("leading with fencing token {fence}\n")),
            "{stdout}"
        );
        fences.push(fence);
    }
    assert!(fences[1] > fences[0], "{fences:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_examples_explain_a_missing_server() {
    let free = leaseholder_testkit::free_port().unwrap();
    let nothing = format!("postgres://postgres@127.0.0.1:{free}/postgres");
    for name in ["kubernetes_shutdown", "fenced_write"] {
        let output = timeout(
            WAIT,
            tokio::process::Command::new(example(name))
                .env("DATABASE_URL", &nothing)
                .kill_on_drop(true)
                .output(),
        )
        .await
        .unwrap()
        .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(1), "{name}: {stderr}");
        assert!(stderr.starts_with("error: "), "{name}: {stderr}");
        assert!(stderr.contains(&nothing), "{name}: {stderr}");
        assert!(!stderr.contains("panicked"), "{name}: {stderr}");
        println!("{name} with nothing listening: {}", stderr.trim());
    }
}

/// `GET path` on 127.0.0.1:`port`: the status code and the body.
async fn get(port: u16, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut socket = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    socket
        .write_all(format!("GET {path} HTTP/1.1\r\nhost: localhost\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut response = String::new();
    socket.read_to_string(&mut response).await.unwrap();
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap();
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readiness_example_serves_the_health_hook() {
    let port = leaseholder_testkit::free_port().unwrap();
    let mut cmd = tokio::process::Command::new(example("readiness"));
    cmd.env("PORT", port.to_string()).stdout(Stdio::piped());
    let mut child = ChildGuard::spawn(&mut cmd).unwrap();
    let mut lines = BufReader::new(child.child_mut().stdout.take().unwrap()).lines();
    timeout(WAIT, async {
        while let Some(line) = lines.next_line().await.unwrap() {
            if line.starts_with("listening on") {
                return;
            }
        }
        panic!("the example exited before it listened");
    })
    .await
    .unwrap();
    assert_eq!(get(port, "/ready").await, (200, "healthy".to_owned()));
    // It campaigns alone, so it leads (soon: poll the endpoint).
    timeout(WAIT, async {
        while get(port, "/leader").await != (200, "Leader".to_owned()) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .unwrap();
    assert_eq!(get(port, "/nope").await.0, 404);
}
