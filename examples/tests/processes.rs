//! Candidates as separate OS processes on a real nats-server, a real
//! PostgreSQL, a real redis-server, a real etcd and a SQLite file: graceful
//! handoff (SIGTERM) and crash failover (SIGKILL) measured at ttl 10 s
//! (SQLite, Redis, etcd: 2 s), five processes racing on one SQLite file, and
//! a leader process paused (SIGSTOP) past its ttl whose stale writes a
//! fenced sink refuses.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::VecDeque;
use std::process::Stdio;
use std::time::Duration;

use leaseholder_testkit::ChildGuard;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::sync::mpsc;
use tokio::time::{Instant, timeout_at};

mod support;
use support::*;

/// The longest any single wait for an event may take.
const WAIT: Duration = Duration::from_secs(60);

/// One line a candidate printed, with the candidate's index and the time
/// the test read it.
type Event = (usize, Instant, String);

/// A downstream store guarded by fencing tokens: it refuses every write
/// whose token is below the highest it has accepted.
#[derive(Default, Debug)]
struct Sink {
    highest: u64,
    accepted: u64,
    /// `(candidate, token)` of every refused write.
    rejected: Vec<(usize, u64)>,
}

impl Sink {
    fn write(&mut self, from: usize, token: u64) {
        if token >= self.highest {
            self.highest = token;
            self.accepted += 1;
        } else {
            self.rejected.push((from, token));
        }
    }
}

/// Candidate processes on one key, and everything they printed.
struct Fleet {
    url: String,
    key: &'static str,
    ttl: Duration,
    write_delay: Duration,
    procs: Vec<ChildGuard>,
    tx: mpsc::UnboundedSender<Event>,
    rx: mpsc::UnboundedReceiver<Event>,
    sink: Sink,
    /// Events read but not yet waited for.
    backlog: VecDeque<Event>,
    /// The last lines read, for failure messages.
    log: Vec<String>,
}

impl Fleet {
    fn new(url: String, key: &'static str, ttl: Duration, write_delay: Duration) -> Fleet {
        let (tx, rx) = mpsc::unbounded_channel();
        Fleet {
            url,
            key,
            ttl,
            write_delay,
            procs: Vec::new(),
            tx,
            rx,
            sink: Sink::default(),
            backlog: VecDeque::new(),
            log: Vec::new(),
        }
    }

    /// Starts one more candidate and waits until it campaigns.
    async fn spawn(&mut self) -> usize {
        self.spawn_with(&[]).await
    }

    /// Starts one more candidate with `env` in its environment and waits
    /// until it campaigns.
    async fn spawn_with(&mut self, env: &[(&str, String)]) -> usize {
        let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_leaseholder-candidate"));
        cmd.envs(env.iter().map(|(k, v)| (*k, v.as_str())));
        cmd.args([
            self.url.clone(),
            self.key.to_owned(),
            self.ttl.as_millis().to_string(),
            self.write_delay.as_millis().to_string(),
        ])
        .stdout(Stdio::piped());
        let mut guard = ChildGuard::spawn(&mut cmd).unwrap();
        let stdout = guard.child_mut().stdout.take().unwrap();
        let index = self.procs.len();
        let tx = self.tx.clone();
        tokio::spawn(async move {
            let mut lines = BufReader::new(stdout).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                let _ = tx.send((index, Instant::now(), line));
            }
        });
        self.procs.push(guard);
        self.until("READY", |i, l| i == index && l == "READY").await;
        index
    }

    /// Returns the first event `want` matches, for at most [`WAIT`] in all
    /// (other candidates' lines keep arriving, so a per-line timeout would
    /// never fire). Events not matched are kept for later waits, except
    /// writes, which go to the sink as they are read.
    async fn until(&mut self, what: &str, mut want: impl FnMut(usize, &str) -> bool) -> Event {
        if let Some(at) = self.backlog.iter().position(|(i, _, l)| want(*i, l)) {
            return self.backlog.remove(at).expect("the position is in range");
        }
        let deadline = Instant::now() + WAIT;
        loop {
            let Ok(next) = timeout_at(deadline, self.rx.recv()).await else {
                panic!("no {what} within {WAIT:?}; last events: {:#?}", self.log);
            };
            let (i, at, line) = next.expect("the fleet holds a sender");
            if let Some(token) = line.strip_prefix("WRITE ") {
                self.sink.write(i, token.parse().unwrap());
            } else {
                self.log.push(format!("{i}: {line}"));
                if self.log.len() > 100 {
                    self.log.drain(..50);
                }
            }
            if want(i, &line) {
                return (i, at, line);
            }
            if !line.starts_with("WRITE ") {
                self.backlog.push_back((i, at, line));
            }
        }
    }

    /// Starts `n` more candidates at once, then waits until all campaign.
    async fn spawn_many(&mut self, n: usize) -> Vec<usize> {
        let first = self.procs.len();
        for index in first..first + n {
            let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_leaseholder-candidate"));
            cmd.args([
                self.url.clone(),
                self.key.to_owned(),
                self.ttl.as_millis().to_string(),
                self.write_delay.as_millis().to_string(),
            ])
            .stdout(Stdio::piped());
            let mut guard = ChildGuard::spawn(&mut cmd).unwrap();
            let stdout = guard.child_mut().stdout.take().unwrap();
            let tx = self.tx.clone();
            tokio::spawn(async move {
                let mut lines = BufReader::new(stdout).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    let _ = tx.send((index, Instant::now(), line));
                }
            });
            self.procs.push(guard);
        }
        for index in first..first + n {
            self.until("READY", |i, l| i == index && l == "READY").await;
        }
        (first..first + n).collect()
    }

    /// Waits for the next `START`: who, when, and the term's token.
    async fn next_start(&mut self) -> (usize, Instant, u64) {
        let (i, at, line) = self
            .until("work start", |_, l| l.starts_with("START "))
            .await;
        (i, at, line["START ".len()..].parse().unwrap())
    }
}

fn median_max(mut v: Vec<Duration>) -> (Duration, Duration) {
    v.sort();
    (v[v.len() / 2], v[v.len() - 1])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handoff_and_crash_failover_between_processes_at_ttl_10s_on_nats() {
    let server = nats_with_bucket("leases").await;
    handoff_and_crash_failover(
        "NATS",
        server.url(),
        Duration::from_secs(10),
        Duration::ZERO,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handoff_and_crash_failover_between_processes_at_ttl_10s_on_postgres() {
    let server = postgres_with_table().await;
    handoff_and_crash_failover(
        "PostgreSQL",
        server.url(),
        Duration::from_secs(10),
        Duration::ZERO,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handoff_and_crash_failover_between_processes_at_ttl_2s_on_sqlite() {
    let (_dir, url) = sqlite_with_table().await;
    handoff_and_crash_failover("SQLite", url, Duration::from_secs(2), Duration::ZERO).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handoff_and_crash_failover_between_processes_at_ttl_2s_on_redis() {
    let server = redis_in_use().await;
    handoff_and_crash_failover(
        "Redis",
        server.url(),
        Duration::from_secs(2),
        Duration::ZERO,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handoff_and_crash_failover_between_processes_at_ttl_2s_on_etcd() {
    let server = etcd_in_use().await;
    // etcd looks for expired leases every 500 ms.
    handoff_and_crash_failover(
        "etcd",
        etcd_url(&server),
        Duration::from_secs(2),
        Duration::from_millis(500),
    )
    .await;
}

/// Five candidate processes started at once on one SQLite file: exactly
/// one leads at a time (each successor's work starts after its
/// predecessor's stopped, and the fenced sink refuses no write), and the
/// tokens of successive terms increase, over ten SIGTERM handoffs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_processes_race_on_one_sqlite_file_and_one_leads_at_a_time() {
    let (_dir, url) = sqlite_with_table().await;
    let ttl = Duration::from_secs(2);
    let mut fleet = Fleet::new(url, "race", ttl, Duration::ZERO);
    fleet.spawn_many(5).await;
    let (mut leader, _, mut token) = fleet.next_start().await;
    let mut tokens = vec![token];
    let mut handoffs = Vec::new();
    for _ in 0..10 {
        let t0 = Instant::now();
        fleet.procs[leader].terminate().unwrap();
        let stop = format!("STOP {token}");
        let (_, stopped, _) = fleet
            .until("the leader's work stop", |i, l| i == leader && l == stop)
            .await;
        let (next, at, next_token) = fleet.next_start().await;
        assert_ne!(next, leader);
        assert!(next_token > token, "{next_token} after {token}");
        assert!(
            stopped <= at,
            "the successor started before the leader stopped"
        );
        handoffs.push(at - t0);
        fleet
            .until("the leader's exit", |i, l| i == leader && l == "EXIT")
            .await;
        // Keep five in the race.
        fleet.spawn_many(1).await;
        (leader, token) = (next, next_token);
        tokens.push(token);
    }
    // No second START is waiting: the last leader is the only one.
    assert!(
        !fleet
            .backlog
            .iter()
            .any(|(_, _, l)| l.starts_with("START ")),
        "{:?}",
        fleet.backlog
    );
    let (hm, hx) = median_max(handoffs.clone());
    println!("SQLite, 5 processes: SIGTERM handoff median {hm:?}, max {hx:?}; tokens {tokens:?}");
    assert!(hx < ttl / 5, "{handoffs:?}");
    assert!(fleet.sink.rejected.is_empty(), "{:?}", fleet.sink);
    assert!(fleet.sink.accepted > 0);
}

/// Three candidate processes on `url`; five rounds of: SIGTERM the leader
/// (graceful handoff), start a replacement, SIGKILL the new leader (crash
/// failover), start a replacement. Prints median and max of each.
/// `expiry_lag` is how long after its deadline the store may take to
/// notice that a lease expired, on top of the tolerance every store gets
/// (etcd: its lessor looks for expired leases every 500 ms).
async fn handoff_and_crash_failover(store: &str, url: String, ttl: Duration, expiry_lag: Duration) {
    let mut fleet = Fleet::new(url, "jobs", ttl, Duration::ZERO);
    for _ in 0..3 {
        fleet.spawn().await;
    }
    let (mut leader, _, mut token) = fleet.next_start().await;
    let (mut handoffs, mut failovers) = (Vec::new(), Vec::new());
    for _ in 0..5 {
        // Graceful: SIGTERM drains the work and releases the lease; a
        // follower's watch sees the release and takes over.
        let t0 = Instant::now();
        fleet.procs[leader].terminate().unwrap();
        let stop = format!("STOP {token}");
        let (_, stopped, _) = fleet
            .until("the leader's work stop", |i, l| i == leader && l == stop)
            .await;
        let (next, at, next_token) = fleet.next_start().await;
        assert_ne!(next, leader);
        assert!(next_token > token, "{next_token} after {token}");
        assert!(
            stopped <= at,
            "the successor started before the leader stopped"
        );
        handoffs.push(at - t0);
        fleet
            .until("the leader's exit", |i, l| i == leader && l == "EXIT")
            .await;
        fleet.spawn().await;

        // Crash: SIGKILL releases nothing; the lease has to expire first.
        let t0 = Instant::now();
        fleet.procs[next].kill().await.unwrap();
        let (after, at, after_token) = fleet.next_start().await;
        assert_ne!(after, next);
        assert!(after_token > next_token, "{after_token} after {next_token}");
        failovers.push(at - t0);
        fleet.spawn().await;
        (leader, token) = (after, after_token);
    }
    let (hm, hx) = median_max(handoffs.clone());
    let (fm, fx) = median_max(failovers.clone());
    println!(
        "{store}: graceful handoff (SIGTERM -> successor's work starts), ttl {ttl:?}, 5 runs: median {hm:?}, max {hx:?}; all {handoffs:?}"
    );
    println!(
        "{store}: crash failover (SIGKILL -> successor's work starts), ttl {ttl:?}, 5 runs: median {fm:?}, max {fx:?}; all {failovers:?}"
    );
    // A handoff is driven by the watch, not by the retry timer (2 s).
    assert!(hx < ttl / 5, "{handoffs:?}");
    // A failover waits for the store to expire the lease, renewed at most
    // a renew interval before the kill: about a ttl, never much more.
    assert!(fx <= ttl + ttl / 5 + expiry_lag, "{failovers:?}");
    assert!(fleet.sink.rejected.is_empty(), "{:?}", fleet.sink);
    assert!(fleet.sink.accepted > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_process_paused_past_its_ttl_is_refused_by_the_fence() {
    let server = nats_with_bucket("leases").await;
    a_paused_leader_is_refused_by_the_fence(server.url()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_process_paused_past_its_ttl_is_refused_by_the_fence_on_redis() {
    let server = redis_in_use().await;
    a_paused_leader_is_refused_by_the_fence(server.url()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_process_paused_past_its_ttl_is_refused_by_the_fence_on_etcd() {
    let server = etcd_in_use().await;
    a_paused_leader_is_refused_by_the_fence(etcd_url(&server)).await;
}

/// SIGSTOP the leader's process past its ttl: a successor leads, and once
/// the old leader thaws, the writes it had queued reach the fenced sink
/// after the successor's, and every one is refused.
async fn a_paused_leader_is_refused_by_the_fence(url: String) {
    // Each write sits 300 ms in the candidate's outbox, so the writes a
    // leader issued just before it froze go out after it thaws.
    let mut fleet = Fleet::new(
        url,
        "fenced",
        Duration::from_secs(2),
        Duration::from_millis(300),
    );
    let a = fleet.spawn().await;
    let (first, _, stale) = fleet.next_start().await;
    assert_eq!(first, a);
    let write = format!("WRITE {stale}");
    fleet
        .until("a write from the first leader", |i, l| i == a && l == write)
        .await;
    let b = fleet.spawn().await;

    // Freeze the leader's whole process past its ttl: B takes over.
    fleet.procs[a].pause().unwrap();
    let (next, _, fresh) = fleet.next_start().await;
    assert_eq!(next, b);
    assert!(fresh > stale);
    let write = format!("WRITE {fresh}");
    fleet
        .until("a write from the new leader", |i, l| i == b && l == write)
        .await;
    assert!(fleet.sink.rejected.is_empty(), "{:?}", fleet.sink);

    // Thaw A. Its queued writes carry the old token and reach the sink
    // after B's; the fence refuses every one. A then learns it lost.
    fleet.procs[a].resume().unwrap();
    let lost = format!("LOST {stale}");
    fleet
        .until("the old leader's loss", |i, l| i == a && l == lost)
        .await;
    // Give the outbox its delay to drain whatever is left.
    let drained = format!("WRITE {fresh}");
    for _ in 0..10 {
        fleet
            .until("more writes from the new leader", |i, l| {
                i == b && l == drained
            })
            .await;
    }
    println!("sink after the pause: {:?}", fleet.sink);
    assert!(
        !fleet.sink.rejected.is_empty(),
        "no stale write reached the sink: {:?}",
        fleet.sink
    );
    assert!(
        fleet
            .sink
            .rejected
            .iter()
            .all(|&(from, token)| from == a && token == stale),
        "{:?}",
        fleet.sink
    );
    assert_eq!(fleet.sink.highest, fresh);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn noleaders_example_program_runs_on_nats_with_only_the_crate_path_changed() {
    let server = nats_with_bucket("mytestbucket").await;
    let run = |url: String| {
        let mut cmd = tokio::process::Command::new(example("noleader_compat"));
        cmd.env("NATS_URL", url)
            .env("NO_COLOR", "1")
            .env("RUST_LOG", "info")
            .kill_on_drop(true);
        cmd.output()
    };
    let output = tokio::time::timeout(WAIT, run(server.url()))
        .await
        .unwrap()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains("do work as leader"), "{stdout}\n{stderr}");
    assert!(stdout.contains("stopped after 3 s"), "{stdout}\n{stderr}");

    // It released on the way out: a second run leads at once, again.
    let output = tokio::time::timeout(WAIT, run(server.url()))
        .await
        .unwrap()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.contains("do work as leader"), "{stdout}");

    // Nothing listening: an error message and a failing exit, no panic.
    let free = leaseholder_testkit::free_port().unwrap();
    let output = tokio::time::timeout(WAIT, run(format!("nats://127.0.0.1:{free}")))
        .await
        .unwrap()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(stderr.contains("Error"), "{stderr}");
}

/// Runs example `name` with `env` until it leads, then sends SIGINT (as
/// Ctrl-C would) and checks it drains, releases and exits cleanly; then
/// runs it against a port where nothing listens and checks for a clear
/// error instead of a panic.
async fn example_leads_and_stops_on_ctrl_c(name: &str, var: &str, url: String, nothing: String) {
    let mut cmd = tokio::process::Command::new(example(name));
    cmd.env(var, &url)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = ChildGuard::spawn(&mut cmd).unwrap();
    let stdout = child.child_mut().stdout.take().unwrap();
    let mut lines = BufReader::new(stdout).lines();
    timeout_at(Instant::now() + WAIT, async {
        while let Some(line) = lines.next_line().await.unwrap() {
            if line.starts_with("leading with fencing token") {
                return;
            }
        }
        panic!("{name} exited before it led");
    })
    .await
    .unwrap();
    let pid = child.pid().to_string();
    assert!(
        std::process::Command::new("kill")
            .args(["-INT", &pid])
            .status()
            .unwrap()
            .success()
    );
    let mut rest = Vec::new();
    while let Some(line) = timeout_at(Instant::now() + WAIT, lines.next_line())
        .await
        .unwrap()
        .unwrap()
    {
        rest.push(line);
    }
    let status = timeout_at(Instant::now() + WAIT, child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "{status:?}: {rest:?}");
    assert!(rest.iter().any(|l| l == "leadership ended"), "{rest:?}");

    let output = tokio::time::timeout(
        WAIT,
        tokio::process::Command::new(example(name))
            .env(var, &nothing)
            .kill_on_drop(true)
            .output(),
    )
    .await
    .unwrap()
    .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(stderr.starts_with("error: "), "{stderr}");
    assert!(stderr.contains(&nothing), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    println!("{name} with nothing listening: {}", stderr.trim());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_nats_example_leads_stops_on_ctrl_c_and_explains_a_missing_server() {
    let server = nats_with_bucket("leaseholder_example").await;
    let free = leaseholder_testkit::free_port().unwrap();
    example_leads_and_stops_on_ctrl_c(
        "nats",
        "NATS_URL",
        server.url(),
        format!("nats://127.0.0.1:{free}"),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_postgres_example_leads_stops_on_ctrl_c_and_explains_a_missing_server() {
    let server = postgres_with_table().await;
    let free = leaseholder_testkit::free_port().unwrap();
    example_leads_and_stops_on_ctrl_c(
        "postgres",
        "DATABASE_URL",
        server.url(),
        format!("postgres://postgres@127.0.0.1:{free}/postgres"),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sqlite_example_leads_stops_on_ctrl_c_and_explains_a_missing_directory() {
    let (dir, url) = sqlite_with_table().await;
    let path = url.trim_start_matches("sqlite:").to_owned();
    let nowhere = dir.path().join("missing").join("leases.db");
    example_leads_and_stops_on_ctrl_c("sqlite", "LEASES_DB", path, nowhere.display().to_string())
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_redis_example_leads_stops_on_ctrl_c_and_explains_a_missing_server() {
    let server = redis_in_use().await;
    // The example's own prefix: its epoch marker, as in use for long.
    let out = server.cli(&["SET", "example:epoch", "0"]).await.unwrap();
    assert_eq!(out.trim(), "OK");
    let free = leaseholder_testkit::free_port().unwrap();
    example_leads_and_stops_on_ctrl_c(
        "redis",
        "REDIS_URL",
        server.url(),
        format!("redis://127.0.0.1:{free}"),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_etcd_example_leads_stops_on_ctrl_c_and_explains_a_missing_server() {
    let server = etcd_in_use().await;
    // The example's own prefix: its epoch marker, as in use for long.
    let out = server.ctl(&["put", "example/epoch", "0"]).await.unwrap();
    assert_eq!(out.trim(), "OK");
    let free = leaseholder_testkit::free_port().unwrap();
    example_leads_and_stops_on_ctrl_c(
        "etcd",
        "ETCD_URL",
        etcd_url(&server),
        format!("etcd://127.0.0.1:{free}"),
    )
    .await;
}

/// A preferred candidate (priority 100) that is SIGKILLed while its
/// registry entry is still live costs the others the hold-off (ttl/10 =
/// 200 ms at ttl 2 s) once, never a ttl: the leader (priority 1, a
/// minimum term long enough that the preferred one cannot preempt it) is
/// SIGTERMed, and the other follower (priority 1) holds off for the dead
/// one, then leads.
async fn a_killed_preferred_candidate_costs_the_holdoff(store: &str, url: String) {
    let ttl = Duration::from_secs(2);
    let holdoff = ttl / 10;
    let mut fleet = Fleet::new(url, "preferred", ttl, Duration::ZERO);
    let low = [
        ("LEASEHOLDER_PRIORITY", "1".to_owned()),
        ("LEASEHOLDER_MIN_TERM_MS", "600000".to_owned()),
    ];
    let leader = fleet.spawn_with(&low).await;
    let (first, _, token) = fleet.next_start().await;
    assert_eq!(first, leader);
    let other = fleet.spawn_with(&low).await;
    fleet
        .until("registered", |i, l| i == other && l == "REGISTERED")
        .await;
    let preferred = fleet
        .spawn_with(&[("LEASEHOLDER_PRIORITY", "100".to_owned())])
        .await;
    fleet
        .until("registered", |i, l| i == preferred && l == "REGISTERED")
        .await;
    fleet.procs[preferred].kill().await.unwrap();
    let t0 = Instant::now();
    fleet.procs[leader].terminate().unwrap();
    let (next, at, next_token) = fleet.next_start().await;
    let took = at - t0;
    println!(
        "{store}: SIGTERM with a SIGKILLed preferred candidate -> successor's work starts in {took:?} (hold-off {holdoff:?})"
    );
    assert_eq!(next, other);
    assert!(next_token > token);
    assert!(took >= holdoff, "the follower did not hold off: {took:?}");
    assert!(
        took < holdoff + Duration::from_millis(500),
        "it took {took:?}"
    );
    assert!(fleet.sink.rejected.is_empty(), "{:?}", fleet.sink);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_preferred_candidate_costs_the_holdoff_on_nats() {
    let server = nats_with_bucket("leases").await;
    a_killed_preferred_candidate_costs_the_holdoff("NATS", server.url()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_preferred_candidate_costs_the_holdoff_on_postgres() {
    let server = postgres_with_table().await;
    a_killed_preferred_candidate_costs_the_holdoff("PostgreSQL", server.url()).await;
}
