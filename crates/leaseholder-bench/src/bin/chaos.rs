//! `chaos`: candidate processes campaigning for one key on a real server
//! while faults are injected at random, then a check of DESIGN.md's safety
//! property.
//!
//! ```text
//! chaos [--duration 120s] [--seed N] [--candidates 4 (raft: 3)] [--store nats|postgres|sqlite|redis|etcd|raft]
//!       [--cluster 3] [--keys 1] [--ttl 2s] [--drift D | --clock-rates R,R,..] [--priorities]
//!       [--report DIR] [--long]
//! ```
//!
//! `--keys K`: every candidate campaigns for K keys at once on one backend,
//! each key checked on its own. `--cluster 3` (NATS): a 3-node cluster, the
//! lease bucket replicated on all three, with the member faults etcd gets.
//! `--clock-rates`: the candidates of those slots run on a tokio clock that
//! much faster or slower (`--drift D`: `1-D,1+D`); see `check.rs` for how
//! an overlap from such a clock is judged. `--report DIR`: JSON and SVG
//! timelines (see `src/chaos/report.rs`).
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
//! With `--store raft` there is no server: the candidates (3 by default,
//! an odd number) are the members of a peer group (`leaseholder-raft` over
//! TCP, each with its fsynced log in a data directory kept across its
//! restarts), and every link between two members runs through a proxy of
//! its own. A kill or pause of a candidate is one of a member too; a cut
//! or blackhole acts on every link into and out of the candidate's member
//! (a partition of that member); the restart is a quorum loss, every
//! member but one killed and started again on its directory up to 1.25
//! ttl later.
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

const USAGE: &str = "usage: chaos [--duration 120s] [--seed N] [--candidates 4 (raft: 3)] [--store nats|postgres|sqlite|redis|etcd|raft] [--cluster 3] [--keys 1] [--ttl 2s] [--drift D | --clock-rates R,R,..] [--priorities] [--report DIR] [--long]";

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
        keys: 1,
        clock_rates: Vec::new(),
        cluster: 1,
        report: None,
    };
    let mut candidates_given = false;
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
            "--candidates" => {
                opts.candidates = value()?.parse().context("--candidates")?;
                candidates_given = true;
            }
            "--keys" => opts.keys = value()?.parse().context("--keys")?,
            "--cluster" => opts.cluster = value()?.parse().context("--cluster")?,
            "--ttl" => opts.ttl = parse_duration(value()?)?,
            "--report" => opts.report = Some(value()?.into()),
            "--drift" => {
                let d: f64 = value()?.parse().context("--drift")?;
                if !(0.0..0.9).contains(&d) {
                    bail!("--drift {d}: from 0 to 0.9 (a fraction of real time)");
                }
                opts.clock_rates = vec![1.0 - d, 1.0 + d];
            }
            "--clock-rates" => {
                opts.clock_rates = value()?
                    .split(',')
                    .map(|r| r.trim().parse::<f64>().context("--clock-rates"))
                    .collect::<anyhow::Result<_>>()?;
                if let Some(r) = opts.clock_rates.iter().find(|r| !(0.1..=10.0).contains(*r)) {
                    bail!("--clock-rates: {r} is not from 0.1 to 10");
                }
            }
            "--store" => {
                opts.store = match value()?.as_str() {
                    "nats" => Store::Nats,
                    "postgres" => Store::Postgres,
                    "sqlite" => Store::Sqlite,
                    "redis" => Store::Redis,
                    "etcd" => Store::Etcd,
                    "raft" => Store::Raft,
                    other => bail!("--store {other}: nats, postgres, sqlite, redis, etcd or raft"),
                }
            }
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other => bail!("unknown argument {other:?}\n{USAGE}"),
        }
    }
    if opts.store == Store::Raft {
        // The candidates are the group's members: an odd number of them.
        if !candidates_given {
            opts.candidates = 3;
        }
        if opts.candidates < 3 || opts.candidates.is_multiple_of(2) {
            bail!(
                "--candidates {} with --store raft: the candidates are the peer group's members, 3, 5 or another odd number",
                opts.candidates
            );
        }
    }
    if opts.candidates < 2 {
        bail!("--candidates must be at least 2");
    }
    if !(1..=10_000).contains(&opts.keys) {
        bail!("--keys {}: from 1 to 10,000", opts.keys);
    }
    if opts.ttl < Duration::from_secs(1) || opts.ttl > Duration::from_secs(60) {
        bail!("--ttl: from 1 s to 60 s (NATS and Redis count whole seconds)");
    }
    if opts.cluster != 1 && !(opts.cluster == 3 && matches!(opts.store, Store::Nats | Store::Etcd))
    {
        bail!("--cluster 3 is for --store nats (etcd always runs 3 members)");
    }
    if opts.clock_rates.len() > opts.candidates {
        bail!("--clock-rates: more rates than candidates");
    }
    Ok(opts)
}

fn ms(us: u64) -> String {
    format!("{:.1} ms", us as f64 / 1000.0)
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("candidate") {
        // `LEASEHOLDER_CHAOS_LOG=leaseholder=debug` (a tracing filter) makes
        // every candidate log to the harness's standard error, each line
        // with the candidate's pid: for finding out what a failed run did.
        if let Ok(filter) = std::env::var("LEASEHOLDER_CHAOS_LOG") {
            let pid = std::process::id();
            tracing_subscriber::fmt()
                .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
                .with_writer(std::io::stderr)
                .with_ansi(false)
                .fmt_fields(tracing_subscriber::fmt::format::DefaultFields::new())
                .event_format(tracing_subscriber::fmt::format().with_target(false))
                .with_span_events(tracing_subscriber::fmt::format::FmtSpan::NONE)
                .init();
            tracing::info!(pid, "chaos candidate logging");
        }
        // A candidate with a scaled clock runs on a paused current-thread
        // runtime whose clock it moves itself (see `drive_clock`).
        let runtime = if chaos::candidate::clock_rate()?.is_some() {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .start_paused(true)
                .build()?
        } else {
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()?
        };
        return runtime.block_on(chaos::candidate::run(&args[1..]));
    }
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?
        .block_on(harness_main(&args))
}

async fn harness_main(args: &[String]) -> anyhow::Result<()> {
    let opts = parse_args(args)?;
    let store = match opts.store {
        Store::Nats => "nats",
        Store::Postgres => "postgres",
        Store::Sqlite => "sqlite",
        Store::Redis => "redis",
        Store::Etcd => "etcd",
        Store::Raft => "raft",
    };
    let drift_margin = chaos::harness::drift_margin(opts.ttl)?;
    let rates: Vec<String> = opts
        .clock_rates
        .iter()
        .enumerate()
        .filter(|(_, r)| (**r - 1.0).abs() > f64::EPSILON)
        .map(|(slot, r)| format!("slot {slot} {r}x"))
        .collect();
    println!(
        "chaos: seed {} (repeat the fault schedule with --seed {}), store {store}{}, {} candidates x {} keys{}, {} s, ttl {} ms (drift margin {} ms), write delay {} ms{}",
        opts.seed,
        opts.seed,
        if opts.cluster > 1 {
            format!(" ({}-node cluster)", opts.cluster)
        } else {
            String::new()
        },
        opts.candidates,
        opts.keys,
        if opts.priorities {
            " with priorities 0, 5, 10"
        } else {
            ""
        },
        opts.duration.as_secs(),
        opts.ttl.as_millis(),
        drift_margin.as_millis(),
        opts.write_delay.as_millis(),
        if rates.is_empty() {
            String::new()
        } else {
            format!(", clocks: {}", rates.join(", "))
        },
    );
    let seed = opts.seed;
    let ttl = opts.ttl;
    let report_dir = opts.report.clone();
    let opts_json = serde_json::json!({
        "seed": seed,
        "store": store,
        "cluster": opts.cluster,
        "candidates": opts.candidates,
        "keys": opts.keys,
        "duration_s": opts.duration.as_secs(),
        "ttl_ms": opts.ttl.as_millis() as u64,
        "drift_margin_ms": drift_margin.as_millis() as u64,
        "write_delay_ms": opts.write_delay.as_millis() as u64,
        "clock_rates": opts.clock_rates,
        "priorities": opts.priorities,
    });
    let tolerated = opts
        .clock_rates
        .iter()
        .map(|r| (1.0 - r).abs())
        .fold(0.0f64, f64::max);
    let outcome = chaos::harness::run(opts).await?;
    let r = &outcome.report;

    println!(
        "\n== chaos summary (seed {seed}, store {store}, {}) ==",
        outcome.server
    );
    println!(
        "transitions: {} over {} keys ({} terms; {} LOST lines)",
        r.transitions(),
        outcome.record.events.len(),
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
    if !rates.is_empty() {
        println!(
            "clocks: {}; overlaps from a clock slower than the margin allows ({:.1}%): {} (largest {}); largest drift in the run: {:.1}%, {}",
            rates.join(", "),
            drift_margin.as_secs_f64() / ttl.as_secs_f64() * 100.0,
            r.drift_overlaps,
            ms(r.largest_drift_overlap),
            tolerated * 100.0,
            if r.drift_overlaps > 0 {
                "beyond the stated limit: the overlaps above are what the margin guards against"
            } else if r.violations.is_empty() {
                "tolerated (no overlap)"
            } else {
                "see the violations"
            }
        );
    }
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
    let anomalies = outcome.unexpected_exits.len() + usize::from(outcome.liveness.is_err());
    if let Some(dir) = &report_dir {
        let mut summary = opts_json;
        if let Some(obj) = summary.as_object_mut() {
            let faults: serde_json::Map<String, serde_json::Value> = outcome
                .faults
                .iter()
                .map(|(k, n)| (k.name().to_owned(), serde_json::json!(n)))
                .collect();
            let extra = serde_json::json!({
                "server": outcome.server,
                "faults": faults,
                "transitions": r.transitions(),
                "terms": r.terms.len(),
                "lost_lines": r.lost,
                "writes_accepted": r.accepted,
                "writes_refused": r.rejected,
                "refused_by_cause": r.rejected_by_cause,
                "accepted_after_successor_started": r.accepted_after_successor_started,
                "overlaps_excused_by_pause": r.excused_overlaps,
                "overlaps_from_drift_beyond_margin": r.drift_overlaps,
                "largest_overlap_us": r.largest_overlap,
                "largest_overlap_between": r.largest_overlap_between.as_ref().map(|(a, b)| {
                    [a.show(outcome.origin).to_string(), b.show(outcome.origin).to_string()]
                }),
                "largest_drift_overlap_us": r.largest_drift_overlap,
                "longest_work_after_resume_us": r.longest_work_after_resume,
                "late_starts": r.late_starts,
                "liveness_s": outcome.liveness.as_ref().ok().map(Duration::as_secs_f64),
                "liveness_error": outcome.liveness.as_ref().err(),
                "anomalies": outcome.unexpected_exits,
                "violations": r.violations,
            });
            if let Some(extra) = extra.as_object() {
                obj.extend(extra.clone());
            }
        }
        let files = chaos::report::write(dir, summary, &outcome.record, r)?;
        println!("report: {} in {}", files.join(", "), dir.display());
    }
    println!(
        "CHAOS seed={seed} store={store} keys={} kill={} pause={} cut={} blackhole={} restart={} wipe={} member_kill={} member_pause={} member_cut={} transitions={} rejected={} largest_overlap_us={} drift_overlaps={} violations={} anomalies={}",
        outcome.record.events.len(),
        count(FaultKind::Kill),
        count(FaultKind::Pause),
        count(FaultKind::Cut),
        count(FaultKind::Blackhole),
        count(FaultKind::Restart),
        count(FaultKind::Wipe),
        count(FaultKind::MemberKill),
        count(FaultKind::MemberPause),
        count(FaultKind::MemberCut),
        r.transitions(),
        r.rejected,
        r.largest_overlap,
        r.drift_overlaps,
        r.violations.len(),
        anomalies,
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
