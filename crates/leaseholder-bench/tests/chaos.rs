//! The chaos harness for two minutes on a real nats-server (kills, pauses,
//! link cuts and blackholes, server restarts), for one on a SQLite file
//! (kills, pauses, file stalls), for one on a real redis-server (the
//! NATS faults, and the server losing its data), for one on a real
//! 3-member etcd cluster (the NATS faults, a member killed or paused, and
//! a quorum loss) and for one on a peer group whose members are the
//! candidates (member kills, pauses and partitions, quorum losses): no
//! safety violation, every kind of fault injected, and leadership
//! changing hands several times.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;
use std::time::{Duration, Instant};

use leaseholder_testkit::{MIN_NATS_VERSION, find_etcd, find_nats_server, find_redis_server};

/// Reads `key=value` from the harness's closing `CHAOS …` line.
fn field(line: &str, key: &str) -> u64 {
    line.split_ascii_whitespace()
        .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
        .unwrap_or_else(|| panic!("no {key}= in {line:?}"))
        .parse()
        .unwrap()
}

/// Runs the chaos binary with `args`; its closing `CHAOS …` line, after
/// printing its summary and checking that it succeeded with no violation
/// and at least 5 transitions.
fn chaos(args: &[&str]) -> String {
    let started = Instant::now();
    let output = Command::new(env!("CARGO_BIN_EXE_chaos"))
        .args(args)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    // The summary is what a failure is diagnosed from (with its seed).
    let summary = stdout
        .find("== chaos summary")
        .map_or(&stdout[..], |at| &stdout[at..]);
    println!("{summary}\n(in {:?})", started.elapsed());
    assert!(
        output.status.success(),
        "chaos failed ({}):\n{stdout}\n{stderr}",
        output.status
    );
    let line = stdout
        .lines()
        .find(|l| l.starts_with("CHAOS "))
        .unwrap_or_else(|| panic!("no CHAOS line:\n{stdout}\n{stderr}"));
    assert_eq!(field(line, "violations"), 0, "{line}");
    assert!(
        field(line, "transitions") >= 5,
        "too few leadership transitions: {line}"
    );
    line.to_owned()
}

#[test]
fn two_minutes_of_chaos_on_nats_keep_the_safety_property() {
    find_nats_server(MIN_NATS_VERSION, None)
        .expect("nats-server 2.11+ is needed for the chaos test: run scripts/setup");
    let started = Instant::now();
    // Nextest stops a test after 5 minutes: the run takes about 2 min 10 s.
    let line = chaos(&["--duration", "120s"]);
    for kind in ["kill", "pause", "cut", "blackhole", "restart"] {
        assert!(field(&line, kind) > 0, "no {kind} fault injected: {line}");
    }
    assert!(started.elapsed() < Duration::from_secs(240));
}

#[test]
fn a_minute_of_chaos_on_a_sqlite_file_keeps_the_safety_property() {
    let started = Instant::now();
    let line = chaos(&["--duration", "60s", "--store", "sqlite"]);
    // No link and no server: kills, pauses and stalls of the file (counted
    // as restarts) only.
    for kind in ["kill", "pause", "restart"] {
        assert!(field(&line, kind) > 0, "no {kind} fault injected: {line}");
    }
    assert_eq!(field(&line, "cut") + field(&line, "blackhole"), 0, "{line}");
    assert!(started.elapsed() < Duration::from_secs(180));
}

#[test]
fn a_minute_of_chaos_on_redis_keeps_the_safety_property() {
    find_redis_server().expect("redis-server 7+ is needed for the chaos test: run scripts/setup");
    let started = Instant::now();
    let line = chaos(&["--duration", "60s", "--store", "redis"]);
    // Restarts keep the data (an append-only file fsynced on every
    // write); wipes lose it (FLUSHALL, or a restart without the file), and
    // the epoch marker must keep a successor out until the lost leases'
    // holders have passed their deadlines.
    for kind in ["kill", "pause", "cut", "blackhole", "restart", "wipe"] {
        assert!(field(&line, kind) > 0, "no {kind} fault injected: {line}");
    }
    assert!(started.elapsed() < Duration::from_secs(180));
}

#[test]
fn a_minute_of_chaos_on_etcd_keeps_the_safety_property() {
    find_etcd().expect("etcd 3.4+ is needed for the chaos test: run scripts/setup");
    let started = Instant::now();
    let line = chaos(&["--duration", "60s", "--store", "etcd"]);
    // A 3-member cluster: one member killed (and started again), paused or
    // cut off from its peers at a time keeps the quorum; its restart is a quorum loss (two
    // members down, then back one after the other). Leases live on the
    // cluster, and a new Raft leader only extends them.
    for kind in [
        "kill",
        "pause",
        "cut",
        "blackhole",
        "restart",
        "member_kill",
        "member_pause",
        "member_cut",
    ] {
        assert!(field(&line, kind) > 0, "no {kind} fault injected: {line}");
    }
    assert_eq!(field(&line, "wipe"), 0, "{line}");
    assert!(started.elapsed() < Duration::from_secs(180));
}

#[test]
fn a_minute_of_chaos_on_a_peer_group_keeps_the_safety_property() {
    let started = Instant::now();
    // Three candidates that are the members of a peer group: kills and
    // pauses of members, a member's links cut or blackholed (a
    // partition), and quorum losses (restart).
    let line = chaos(&["--duration", "60s", "--store", "raft", "--keys", "3"]);
    for kind in ["kill", "pause", "cut", "blackhole", "restart"] {
        assert!(field(&line, kind) > 0, "no {kind} fault injected: {line}");
    }
    assert!(started.elapsed() < Duration::from_secs(180));
}

#[test]
fn a_minute_of_chaos_with_priorities_on_postgres_keeps_the_safety_property() {
    // Candidates with registry entries of priorities 0, 5 and 10: besides
    // the faults, leaders are preempted (after a minimum term of one ttl)
    // and followers hold off for preferred candidates, some of them
    // killed or paused.
    let started = Instant::now();
    let line = chaos(&["--duration", "60s", "--store", "postgres", "--priorities"]);
    for kind in ["kill", "pause", "cut", "blackhole", "restart"] {
        assert!(field(&line, kind) > 0, "no {kind} fault injected: {line}");
    }
    assert!(started.elapsed() < Duration::from_secs(180));
}

#[test]
fn a_minute_of_chaos_on_ten_keys_and_a_nats_cluster_keeps_the_safety_property() {
    // Ten keys per candidate on one backend, each checked on its own; a
    // 3-node cluster with the lease bucket on all three (members killed,
    // paused, cut off from their peers, a quorum loss); slot 0's clock 5%
    // slow and slot 1's 5% fast, inside the 10% drift margin, so an
    // overlap from either is a violation. The report is written.
    find_nats_server(MIN_NATS_VERSION, None)
        .expect("nats-server 2.11+ is needed for the chaos test: run scripts/setup");
    let dir = leaseholder_testkit::TempDir::new("leaseholder-chaos-report").unwrap();
    let report = dir.path().join("report");
    let started = Instant::now();
    let line = chaos(&[
        "--duration",
        "60s",
        "--store",
        "nats",
        "--cluster",
        "3",
        "--keys",
        "10",
        "--ttl",
        "1s",
        "--clock-rates",
        "0.95,1.05",
        "--report",
        report.to_str().unwrap(),
    ]);
    assert_eq!(field(&line, "keys"), 10, "{line}");
    assert_eq!(field(&line, "drift_overlaps"), 0, "{line}");
    for kind in [
        "kill",
        "pause",
        "cut",
        "blackhole",
        "member_kill",
        "member_pause",
        "member_cut",
    ] {
        assert!(field(&line, kind) > 0, "no {kind} fault injected: {line}");
    }
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(report.join("report.json")).unwrap())
            .unwrap();
    assert_eq!(json["keys"], 10);
    assert_eq!(json["per_key"].as_array().unwrap().len(), 10);
    assert_eq!(
        json["transitions"].as_u64().unwrap(),
        field(&line, "transitions")
    );
    for key in 0..3 {
        let svg = std::fs::read_to_string(report.join(format!("timeline-key{key}.svg"))).unwrap();
        assert!(svg.starts_with("<svg") && svg.contains("<rect"), "{svg}");
    }
    assert!(started.elapsed() < Duration::from_secs(240));
}
