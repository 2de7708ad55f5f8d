//! `chaos`: candidate processes campaigning for one key on a real server
//! while faults are injected at random, then a check of DESIGN.md's safety
//! property.
//!
//! ```text
//! chaos [--duration 120s] [--seed N] [--candidates 4] [--store nats|postgres|sqlite|redis|etcd] [--priorities] [--long]
//! ```
//!
//! It starts the server (nats-server 2.11+, PostgreSQL 15+, redis-server
//! 7+, or a 3-member etcd 3.4+ cluster, as installed by `scripts/setup`),
//! one TCP proxy per candidate (etcd: one per candidate and member), and
//! N candidate processes (this binary, `chaos candidate …`) on one key,
//! each through its own proxy, with a 2 s ttl. For `--duration` it injects a fault every
//! one to three seconds, chosen with a generator seeded by `--seed` (the
//! seed is printed first, so a run can be repeated; the timing of the
//! processes is not under its control, so a repeat follows the same fault
//! schedule, not the same interleaving):
//!
//! - kill: `SIGKILL` a candidate, start a new one in its slot up to a ttl later;
//! - pause: `SIGSTOP` a candidate for 0.25 to 2.5 ttl, then `SIGCONT`;
//! - cut: close a candidate's link to the server for 0.25 to 2.5 ttl;
//! - blackhole: hold every byte on a candidate's link for as long, then
//!   deliver them;
//! - restart: kill the server and start it again (same port, same data;
//!   Redis keeps an append-only file, fsynced on every write);
//! - wipe (Redis only): the server loses its data while the leaders lead,
//!   by `FLUSHALL` or by a restart with its append-only files deleted (a
//!   server without persistence). The backend's epoch marker keeps every
//!   acquire out for a ttl, so this costs a ttl with no leader.
//! - member-kill, member-pause (etcd only): `SIGKILL` one of the three
//!   members (the Raft leader half of the time) and start it again 0.25
//!   to 2.5 ttl later, or `SIGSTOP` it for as long; one member at a time,
//!   and the next only once the cluster is healthy again, so the cluster
//!   keeps its quorum. etcd's restart is the quorum loss: two members
//!   killed, kept down for up to 1.25 ttl, started again one after the
//!   other.
//!
//! With SQLite (no server, no link) the faults are kills, pauses and
//! stalls of the file, counted as restarts. Half-way through a run, a
//! kind of fault not injected yet is taken in place of the one drawn, so
//! every kind the store has is injected.
//!
//! Faults pick the leader seven times in ten. Afterwards every fault is
//! undone, a leader must appear (liveness), every candidate is stopped
//! with `SIGTERM`, and the checker (see `src/chaos/check.rs` for how
//! intervals are bounded) verifies that no two work intervals overlap
//! unless the older term's process was frozen, that fencing tokens
//! strictly increase in START order, and that the fenced sink (the
//! harness, fed every write in the order the writes left their processes)
//! refused only writes from terms that a pause or a cut had disturbed.
//! Exits non-zero on any violation.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, bail};

#[path = "../chaos/mod.rs"]
mod chaos;
#[path = "../etcd_epoch.rs"]
mod etcd_epoch;

use chaos::check::FaultKind;
use chaos::harness::{Options, Store};

const USAGE: &str = "usage: chaos [--duration 120s] [--seed N] [--candidates 4] [--store nats|postgres|sqlite|redis|etcd] [--long]";

/// `120`, `120s`, `1500ms`, `2m`.
fn parse_duration(s: &str) -> anyhow::Result<Duration> {
    let (num, unit) = match s.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => s.split_at(i),
        None => (s, "s"),
    };
    let n: u64 = num.parse().with_context(|| format!("duration {s:?}"))?;
    Ok(match unit {
        "ms" => Duration::from_millis(n),
        "s" => Duration::from_secs(n),
        "m" | "min" => Duration::from_secs(n * 60),
        _ => bail!("duration {s:?}: use ms, s or m"),
    })
}

fn parse_args(args: &[String]) -> anyhow::Result<Options> {
    let mut opts = Options {
        duration: Duration::from_secs(120),
        seed: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64 % 1_000_000_000),
        candidates: 4,
        store: Store::Nats,
        ttl: Duration::from_secs(2),
        write_delay: Duration::from_millis(200),
        priorities: false,
    };
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        let mut value = || {
            it.next()
                .with_context(|| format!("{flag} needs a value\n{USAGE}"))
        };
        match flag.as_str() {
            "--duration" => opts.duration = parse_duration(value()?)?,
            "--long" => opts.duration = Duration::from_secs(20 * 60),
            "--priorities" => opts.priorities = true,
            "--seed" => opts.seed = value()?.parse().context("--seed")?,
            "--candidates" => opts.candidates = value()?.parse().context("--candidates")?,
            "--store" => {
                opts.store = match value()?.as_str() {
                    "nats" => Store::Nats,
                    "postgres" => Store::Postgres,
                    "sqlite" => Store::Sqlite,
                    "redis" => Store::Redis,
                    "etcd" => Store::Etcd,
                    other => bail!("--store {other}: nats, postgres, sqlite, redis or etcd"),
                }
            }
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other => bail!("unknown argument {other:?}\n{USAGE}"),
        }
    }
    if opts.candidates < 2 {
        bail!("--candidates must be at least 2");
    }
    Ok(opts)
}

fn ms(us: u64) -> String {
    format!("{:.1} ms", us as f64 / 1000.0)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("candidate") {
        return chaos::candidate::run(&args[1..]).await;
    }
    let opts = parse_args(&args)?;
    let store = match opts.store {
        Store::Nats => "nats",
        Store::Postgres => "postgres",
        Store::Sqlite => "sqlite",
        Store::Redis => "redis",
        Store::Etcd => "etcd",
    };
    println!(
        "chaos: seed {} (repeat the fault schedule with --seed {}), store {store}, {} candidates{}, {} s, ttl {} ms, write delay {} ms",
        opts.seed,
        opts.seed,
        opts.candidates,
        if opts.priorities {
            " with priorities 0, 5, 10"
        } else {
            ""
        },
        opts.duration.as_secs(),
        opts.ttl.as_millis(),
        opts.write_delay.as_millis(),
    );
    let seed = opts.seed;
    let outcome = chaos::harness::run(opts).await?;
    let r = &outcome.report;

    println!(
        "\n== chaos summary (seed {seed}, store {store}, {}) ==",
        outcome.server
    );
    println!(
        "transitions: {} ({} terms; {} LOST lines)",
        r.transitions(),
        r.terms.len(),
        r.lost
    );
    let by_kind: Vec<String> = outcome
        .faults
        .iter()
        .map(|(k, n)| format!("{} {n}", k.name()))
        .collect();
    let total: usize = outcome.faults.values().sum();
    println!("faults injected: {} (total {total})", by_kind.join(", "));
    let causes: Vec<String> = r
        .rejected_by_cause
        .iter()
        .map(|(c, n)| format!("{c} {n}"))
        .collect();
    println!(
        "sink: {} writes accepted, {} stale writes rejected{}; {} accepted after a successor had started but before it wrote",
        r.accepted,
        r.rejected,
        if causes.is_empty() {
            String::new()
        } else {
            format!(" (term disturbed by: {})", causes.join(", "))
        },
        r.accepted_after_successor_started,
    );
    match &r.largest_overlap_between {
        Some((a, b)) => println!(
            "largest overlap: {} between {} and {} (times from the start); {} overlaps, excused by a pause: {}",
            ms(r.largest_overlap),
            a.show(outcome.origin),
            b.show(outcome.origin),
            r.excused_overlaps
                + r.violations
                    .iter()
                    .filter(|v| v.contains("overlap"))
                    .count(),
            r.excused_overlaps
        ),
        None => println!("largest overlap: none"),
    }
    println!(
        "paused leaders worked on after SIGCONT for at most {}; {} terms started late after a pause",
        ms(r.longest_work_after_resume),
        r.late_starts
    );
    match &outcome.liveness {
        Ok(after) => println!(
            "liveness: a leader {:.1} s after healing",
            after.as_secs_f64()
        ),
        Err(e) => println!("liveness: FAILED: {e}"),
    }
    if let Some(step) = &outcome.clock_step {
        println!("warning: {step}");
    }
    for e in &outcome.unexpected_exits {
        println!("anomaly: {e}");
    }
    for v in &r.violations {
        println!("VIOLATION: {v}");
    }
    let count = |k| outcome.faults.get(&k).copied().unwrap_or(0);
    println!(
        "CHAOS seed={seed} kill={} pause={} cut={} blackhole={} restart={} wipe={} member_kill={} member_pause={} transitions={} rejected={} largest_overlap_us={} violations={} anomalies={}",
        count(FaultKind::Kill),
        count(FaultKind::Pause),
        count(FaultKind::Cut),
        count(FaultKind::Blackhole),
        count(FaultKind::Restart),
        count(FaultKind::Wipe),
        count(FaultKind::MemberKill),
        count(FaultKind::MemberPause),
        r.transitions(),
        r.rejected,
        r.largest_overlap,
        r.violations.len(),
        outcome.unexpected_exits.len() + usize::from(outcome.liveness.is_err()),
    );
    if !r.violations.is_empty() {
        bail!("{} safety violations (seed {seed})", r.violations.len());
    }
    if outcome.liveness.is_err() || !outcome.unexpected_exits.is_empty() {
        bail!("the run was safe but not healthy (seed {seed}): see above");
    }
    println!("chaos: OK");
    Ok(())
}
