//! `leaseholder-bench [--quick] [--out DIR] [--no-noleader] [--scale [N,N,...]]`: leader election
//! benchmarks on the memory backend, a real nats-server, a real PostgreSQL,
//! a real redis-server and a real (single-member) etcd, with noleader
//! 0.1.2 on the same nats-server. See `scripts/bench`.

mod counting;
mod etcd_epoch;
mod fleet;
mod peer_group;
mod registry;
mod report;
mod scale_graph;
mod scenarios;
mod stats;
mod timeline;

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use leaseholder::MemoryStore;
use leaseholder_testkit::{EtcdServer, NatsServer, PostgresServer, RedisServer};
use tokio::time::Instant;

use crate::fleet::{Fleet, MemFleet, ProcFleet};
use crate::report::Row;
use crate::scenarios::{Store, Timed};

#[derive(Clone)]
struct Opts {
    quick: bool,
    out: PathBuf,
    noleader: bool,
    /// Only the registry rows (`--registry-only`), for a quick look.
    registry_only: bool,
    /// Only the scale rows, at these key counts (`--scale [N,N,...]`), with
    /// their graph.
    scale: Option<Vec<usize>>,
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    // Diagnostics: `RUST_LOG=leaseholder=trace` logs every campaign step
    // (to stderr, with the time since start), e.g. to see where a handoff
    // spends its time. Off by default: the figures are taken without it.
    if std::env::var_os("RUST_LOG").is_some() {
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_timer(tracing_subscriber::fmt::time::uptime())
            .with_writer(std::io::stderr)
            .init();
    }
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("scale-worker") {
        return scale_worker(&args[1..]).await;
    }
    let mut opts = Opts {
        quick: false,
        out: PathBuf::from("bench-results"),
        noleader: true,
        registry_only: false,
        scale: None,
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--quick" => opts.quick = true,
            "--no-noleader" => opts.noleader = false,
            "--registry-only" => {
                opts.registry_only = true;
                opts.noleader = false;
            }
            "--out" => opts.out = PathBuf::from(it.next().context("--out DIR")?),
            "--peer-group" => {}
            "--scale" => {
                let keys = match it.as_slice().first() {
                    Some(list) if !list.starts_with("--") => {
                        it.next();
                        list.split(',')
                            .map(|n| n.replace('_', "").parse::<usize>())
                            .collect::<Result<Vec<_>, _>>()
                            .context("--scale N,N,...: key counts")?
                    }
                    _ => vec![1, 100, 1_000, 10_000, 100_000],
                };
                anyhow::ensure!(
                    keys.iter().all(|&n| n > 0),
                    "--scale: key counts must be positive"
                );
                opts.scale = Some(keys);
            }
            other => anyhow::bail!(
                "unknown argument {other:?}; usage: leaseholder-bench [--quick] [--out DIR] [--no-noleader] [--registry-only] [--scale [N,N,...]] [--peer-group]"
            ),
        }
    }
    let out_given = args.iter().any(|a| a == "--out");
    if args.iter().any(|a| a == "--peer-group") {
        if !out_given {
            opts.out = opts.out.join("peer-group");
        }
        return peer_group_only(&opts.out, opts.quick).await;
    }
    if let Some(keys) = opts.scale.clone() {
        if !out_given {
            opts.out = opts.out.join("scale");
        }
        return scale_only(&opts.out, &keys).await;
    }
    if opts.quick && !out_given {
        opts.out = opts.out.join("quick");
    }
    run(opts).await
}

/// `scale-worker <memory|nats|postgres|redis|etcd> <url> <keys> <ttl-ms> <window-ms>`:
/// one process, one client, `keys` leaders; prints one `SCALE` line.
async fn scale_worker(args: &[String]) -> anyhow::Result<()> {
    let [kind, url, keys, ttl, window] = args else {
        anyhow::bail!(
            "usage: scale-worker <memory|nats|postgres|redis|etcd> <url> <keys> <ttl-ms> <window-ms>"
        );
    };
    let store = match kind.as_str() {
        "memory" => Store::Memory(MemoryStore::new()),
        "nats" => Store::Nats(url.clone()),
        "postgres" => Store::Postgres(url.clone()),
        "redis" => Store::Redis(url.clone()),
        "etcd" => Store::Etcd(url.clone()),
        other => anyhow::bail!("unknown store {other:?}"),
    };
    let result = scenarios::scale(
        &store,
        keys.parse()?,
        Duration::from_millis(ttl.parse()?),
        Duration::from_millis(window.parse()?),
    )
    .await;
    match result {
        Ok(s) => {
            println!("{}", s.to_line());
            Ok(())
        }
        Err(e) => {
            // For the parent's report.
            println!("SCALE-FAILED {e:#}");
            Err(e)
        }
    }
}

/// The `bench-candidate` binary next to this one; built if missing.
fn candidate_exe() -> anyhow::Result<PathBuf> {
    let me = std::env::current_exe()?;
    let exe = me.with_file_name("bench-candidate");
    if !exe.exists() {
        let release = me.components().any(|c| c.as_os_str() == "release");
        let mut cmd =
            std::process::Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
        cmd.args([
            "build",
            "-p",
            "leaseholder-bench",
            "--bin",
            "bench-candidate",
        ]);
        if release {
            cmd.arg("--release");
        }
        let status = cmd.status().context("building bench-candidate")?;
        anyhow::ensure!(
            status.success() && exe.exists(),
            "could not build {}",
            exe.display()
        );
    }
    Ok(exe)
}

fn slug(s: &str) -> String {
    let mut out: String = s
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .collect();
    while out.contains("--") {
        out = out.replace("--", "-");
    }
    out.trim_matches('-').to_owned()
}

struct Sink {
    dir: PathBuf,
    rows: Vec<Row>,
}

impl Sink {
    #[allow(clippy::too_many_arguments)]
    fn timed(
        &mut self,
        backend: &str,
        imp: &'static str,
        scenario: &str,
        t: Timed,
        target: Option<(String, f64)>,
    ) -> anyhow::Result<()> {
        let svg = match t.svg {
            Some(svg) => {
                let name = format!(
                    "timelines/{}.svg",
                    slug(&format!("{backend} {imp} {scenario}"))
                );
                report::write(&self.dir, &name, &svg)?;
                Some(name)
            }
            None => None,
        };
        self.rows.push(Row {
            backend: backend.to_owned(),
            imp,
            scenario: scenario.to_owned(),
            unit: "ms",
            samples: t.samples,
            target,
            svg,
            note: t.note.unwrap_or_default(),
        });
        Ok(())
    }

    fn figure(
        &mut self,
        backend: &str,
        scenario: String,
        unit: &'static str,
        samples: Vec<f64>,
        target: Option<(String, f64)>,
        note: String,
    ) {
        self.rows.push(Row {
            backend: backend.to_owned(),
            imp: "leaseholder",
            scenario,
            unit,
            samples,
            target,
            svg: None,
            note,
        });
    }
}

/// The longest ttl of any scenario (first election, steady state, scale,
/// and the full run's first handoff and crash rounds).
const LONGEST_TTL: Duration = Duration::from_secs(10);

fn log(start: Instant, what: &str) {
    eprintln!("[{:>6.1} s] {what}", start.elapsed().as_secs_f64());
}

async fn fleet_scenarios<F: Fleet>(
    sink: &mut Sink,
    opts: &Opts,
    backend: &str,
    mut make: impl FnMut(&str, Duration) -> F,
    start: Instant,
) -> anyhow::Result<()> {
    if opts.registry_only {
        return Ok(());
    }
    let runs = if opts.quick { 10 } else { 30 };
    log(
        start,
        &format!("{backend}: first election, {runs} runs of 3 candidates"),
    );
    let t = scenarios::first_election(
        |key| make(key, Duration::from_secs(10)),
        &format!("{backend}-{}", uuid::Uuid::now_v7().simple()),
        runs,
        3,
        Duration::from_secs(30),
        &format!("{backend}: first election"),
    )
    .await?;
    sink.timed(
        backend,
        "leaseholder",
        "first election (3 candidates)",
        t,
        Some(("p99 <= 50 ms".into(), 50.0)),
    )?;
    let ttls: &[u64] = if opts.quick { &[2] } else { &[10, 2] };
    for &ttl_s in ttls {
        let ttl = Duration::from_secs(ttl_s);
        let rounds = if opts.quick { 5 } else { 10 };
        log(
            start,
            &format!("{backend}: handoff and crash failover, ttl {ttl_s} s, {rounds} rounds"),
        );
        let key = format!("{backend}-hc-{ttl_s}-{}", uuid::Uuid::now_v7().simple());
        let handoff_target = (backend != "memory").then(|| ("p99 <= 5 ms".to_owned(), 5.0));
        handoff_rows(
            sink,
            backend,
            &mut make(&key, ttl),
            ttl_s,
            rounds,
            handoff_target,
            "crash failover",
        )
        .await?;
    }
    Ok(())
}

/// Graceful handoff and crash failover on `fleet` (ttl `ttl_s`), `rounds`
/// each: the two rows, the failover one named `failover` and held to ttl
/// + 100 ms.
async fn handoff_rows<F: Fleet>(
    sink: &mut Sink,
    backend: &str,
    fleet: &mut F,
    ttl_s: u64,
    rounds: usize,
    handoff_target: Option<(String, f64)>,
    failover_name: &str,
) -> anyhow::Result<Vec<f64>> {
    let ttl = Duration::from_secs(ttl_s);
    let (_, handoff, failover) = scenarios::handoff_and_crash(
        fleet,
        rounds,
        true,
        true,
        ttl * 3 + Duration::from_secs(10),
        &format!("{backend} ttl {ttl_s} s"),
    )
    .await?;
    sink.timed(
        backend,
        "leaseholder",
        &format!("graceful handoff (ttl {ttl_s} s)"),
        handoff,
        handoff_target,
    )?;
    let limit = (ttl_s * 1000 + 100) as f64;
    let samples = failover.samples.clone();
    sink.timed(
        backend,
        "leaseholder",
        &format!("{failover_name} (ttl {ttl_s} s)"),
        failover,
        Some((format!("p99 <= ttl + 100 ms = {limit} ms"), limit)),
    )?;
    Ok(samples)
}

async fn steady_and_scale(
    sink: &mut Sink,
    opts: &Opts,
    store: &Store,
    url: &str,
    start: Instant,
) -> anyhow::Result<()> {
    if opts.registry_only {
        return Ok(());
    }
    let backend = store.name();
    let ttl = Duration::from_secs(10);
    let window = Duration::from_secs(if opts.quick { 10 } else { 60 });
    log(
        start,
        &format!("{backend}: steady state, 3 candidates, ttl 10 s, {window:?}"),
    );
    let key = format!("steady-{}", uuid::Uuid::now_v7().simple());
    let s = scenarios::steady(store, &key, ttl, window).await?;
    let per_min = |n: u64| n as f64 * 60.0 / s.window.as_secs_f64();
    let note = format!(
        "ttl {:?}, window {:?}; leader: {} renew, {} acquire, {} release, {} read{}",
        s.ttl,
        s.window,
        s.leader.renew,
        s.leader.acquire,
        s.leader.release,
        s.leader.holder,
        if s.leader_changed {
            "; LEADER CHANGED during the window"
        } else {
            ""
        }
    );
    sink.figure(
        backend,
        "steady: leader store ops per minute".into(),
        "ops/min",
        vec![per_min(s.leader.total())],
        None,
        note,
    );
    let per_ttl = s.leader.writes() as f64 * s.ttl.as_secs_f64() / s.window.as_secs_f64();
    sink.figure(
        backend,
        "steady: leader store writes per ttl".into(),
        "writes/ttl",
        vec![per_ttl],
        Some(("<= 4".into(), 4.0)),
        String::new(),
    );
    let followers: Vec<f64> = s.followers.iter().map(|f| per_min(f.total())).collect();
    let fnote = s
        .followers
        .iter()
        .map(|f| format!("{} acquire, {} read", f.acquire, f.holder))
        .collect::<Vec<_>>()
        .join("; ");
    sink.figure(
        backend,
        "steady: idle follower store ops per minute (each)".into(),
        "ops/min",
        followers,
        Some(("0 while the watch is up".into(), 0.0)),
        fnote,
    );

    let keys: &[usize] = if opts.quick {
        &[1, 100, 1000]
    } else {
        &[1, 100, 1000, 10_000]
    };
    // etcd's keep-alives per renew interval want whole intervals (ttl 10 s:
    // 3.3 s each): 3 of them in a quick run rather than 1.5.
    let window = Duration::from_secs(match (opts.quick, backend) {
        (true, "etcd") => 10,
        (true, _) => 5,
        (false, _) => 20,
    });
    scale_rows(sink, backend, url, keys, window, start).await?;
    Ok(())
}

/// Runs a scale worker per key count and adds its rows; returns what each
/// measured.
async fn scale_rows(
    sink: &mut Sink,
    backend: &str,
    url: &str,
    keys: &[usize],
    window: Duration,
    start: Instant,
) -> anyhow::Result<Vec<scenarios::Scale>> {
    let ttl = LONGEST_TTL;
    let mut measured = Vec::new();
    for &n in keys {
        log(
            start,
            &format!("{backend}: scale, {n} keys in one process, window {window:?}"),
        );
        let out = tokio::time::timeout(
            scenarios::ready_limit(n) + window + Duration::from_secs(120),
            tokio::process::Command::new(std::env::current_exe()?)
                .args([
                    "scale-worker",
                    backend,
                    url,
                    &n.to_string(),
                    &ttl.as_millis().to_string(),
                    &window.as_millis().to_string(),
                ])
                .stderr(std::process::Stdio::inherit())
                .kill_on_drop(true)
                .output(),
        )
        .await
        .context("scale worker timed out")??;
        let stdout = String::from_utf8_lossy(&out.stdout);
        let Some(line) = stdout.lines().find(|l| l.starts_with("SCALE ")) else {
            let why = stdout
                .lines()
                .find_map(|l| l.strip_prefix("SCALE-FAILED "))
                .unwrap_or("no report");
            sink.figure(
                backend,
                format!("scale {n} keys"),
                "",
                vec![],
                None,
                format!("worker failed ({}): {why}", out.status),
            );
            continue;
        };
        let s = scenarios::Scale::from_line(line)?;
        let note = format!(
            "ttl 10 s; all led after {:.0} ms; window {:.1} s; {} renewals, {} lost terms",
            s.ready_ms, s.window_s, s.renewals, s.lost
        );
        sink.figure(
            backend,
            format!("scale {n} keys: CPU, % of one core"),
            "%",
            vec![s.cpu_pct],
            Some(("<= 5 % (10,000 keys)".into(), 5.0)),
            note,
        );
        sink.figure(
            backend,
            format!("scale {n} keys: resident memory per key"),
            "KiB",
            vec![s.rss_kib / n as f64],
            Some(("<= 4 KiB (10,000 keys)".into(), 4.0)),
            format!("VmRSS delta {:.0} KiB", s.rss_kib),
        );
        sink.figure(
            backend,
            format!("scale {n} keys: renew lateness p99"),
            "% of interval",
            vec![s.late_p99_pct],
            Some(("<= 10 %".into(), 10.0)),
            format!(
                "{} of {} renewals late by > 10 % of the interval",
                s.late, s.renewals
            ),
        );
        let renew = ttl / 3;
        let intervals = s.window_s / renew.as_secs_f64();
        if let Some(sent) = s.keep_alives {
            sent_row(sink, backend, n, sent, intervals, s.window_s);
        }
        // Batched renewals: at most one request per gathering window
        // (20 ms), whatever the key count.
        let bound = (backend == "postgres").then(|| {
            let most = renew.as_secs_f64() / 0.020;
            (
                format!("<= {most:.0}, any key count (one per 20 ms window)"),
                most,
            )
        });
        sink.figure(
            backend,
            format!("scale {n} keys: renewal requests per renew interval"),
            "per interval",
            vec![s.requests as f64 / intervals],
            bound,
            format!(
                "{} requests carried {} renewals in {:.1} s",
                s.requests, s.renewals, s.window_s
            ),
        );
        measured.push(s);
    }
    Ok(measured)
}

/// `--scale`: only the scale rows, on the memory store, a real nats-server
/// and a real PostgreSQL, at each key count, and the graph of CPU and
/// memory against the key count (`scale.svg`).
async fn scale_only(out: &Path, keys: &[usize]) -> anyhow::Result<()> {
    let start = Instant::now();
    let mut sink = Sink {
        dir: out.to_path_buf(),
        rows: Vec::new(),
    };
    log(start, "starting nats-server and PostgreSQL");
    let nats = NatsServer::start()
        .await
        .context("nats-server 2.11+ is needed: run scripts/setup")?;
    let pg = PostgresServer::start()
        .await
        .context("PostgreSQL 15+ is needed: run scripts/setup")?;
    Store::Nats(nats.url()).prepare().await?;
    Store::Postgres(pg.url()).prepare().await?;
    let window = Duration::from_secs(10);
    let mut points = Vec::new();
    for (backend, url) in [
        ("memory", "-".to_owned()),
        ("nats", nats.url()),
        ("postgres", pg.url()),
    ] {
        for s in scale_rows(&mut sink, backend, &url, keys, window, start).await? {
            points.push(scale_graph::Point {
                backend: backend.to_owned(),
                keys: s.keys,
                cpu_pct: s.cpu_pct,
                rss_kib: s.rss_kib,
            });
        }
    }
    let svg = scale_graph::svg(
        "one process, one client, n keys (ttl 10 s): CPU and resident memory",
        &points,
    );
    report::write(out, "scale.svg", &svg)?;
    let wall = start.elapsed();
    let cpus = std::thread::available_parallelism().map_or(0, usize::from);
    let meta = [
        ("mode", "--scale".to_owned()),
        ("wall_time_s", format!("{:.1}", wall.as_secs_f64())),
        ("nats_server", nats.version().to_owned()),
        ("postgres", pg.version().to_owned()),
        ("cpus", cpus.to_string()),
    ];
    report::write(out, "results.json", &report::json(&sink.rows, &meta))?;
    let header = format!(
        "# leaseholder scale results\n\nRun by `scripts/bench --scale`; wall time {:.0} s on {cpus} CPUs \
shared with other work, so figures are noisy. nats-server {}, PostgreSQL {}. Each row is a worker process \
holding n keys on one client (one `Backend`), ttl 10 s, measured over a {}-s window once every key leads: \
CPU of the whole process, resident memory it grew by since before the first key, renewal lateness \
(past the renewal's due time, in % of the renew interval) and renewal requests (one per renewal sent \
alone, one per batch). Graph: [scale.svg](scale.svg).\n",
        wall.as_secs_f64(),
        nats.version(),
        pg.version(),
        window.as_secs()
    );
    let md = report::markdown(&sink.rows, &header);
    report::write(out, "RESULTS.md", &md)?;
    println!("{md}");
    Ok(())
}

/// `--peer-group`: the peer group's rows (three members in this process
/// over loopback TCP, durable, a candidate on each): first election,
/// graceful handoff and crash failover (a crash takes the candidate's
/// member down too), and the idle cost per member.
async fn peer_group_only(out: &Path, quick: bool) -> anyhow::Result<()> {
    let start = Instant::now();
    let mut sink = Sink {
        dir: out.to_path_buf(),
        rows: Vec::new(),
    };
    let backend = "peer group";
    let runs = if quick { 5 } else { 20 };
    log(start, &format!("{backend}: first election, {runs} runs"));
    // A group younger than 10 minutes reports its setup as a creation, so
    // a candidate's first acquire waits one ttl (a group formed again from
    // empty directories knows nothing of the old one's leaders): on a new
    // group the first election takes a ttl by design.
    let first_ttl = Duration::from_secs(2);
    let mut t = scenarios::first_election(
        |key| peer_group::RaftFleet::new(key, first_ttl),
        "peer-group",
        runs,
        3,
        Duration::from_secs(30),
        &format!("{backend}: first election"),
    )
    .await?;
    let limit = first_ttl.as_secs_f64() * 1000.0 + 100.0;
    t.note.get_or_insert_with(|| {
        "a new group waits one ttl before its first acquire, by design".to_owned()
    });
    sink.timed(
        backend,
        "leaseholder",
        "first election on a new group (3 candidates, ttl 2 s)",
        t,
        Some((format!("p99 <= ttl + 100 ms = {limit} ms"), limit)),
    )?;
    let ttls: &[u64] = if quick { &[2] } else { &[2, 10] };
    for &ttl_s in ttls {
        let ttl = Duration::from_secs(ttl_s);
        let rounds = if quick { 5 } else { 20 };
        log(
            start,
            &format!("{backend}: handoff and crash failover, ttl {ttl_s} s, {rounds} rounds"),
        );
        let mut fleet = peer_group::RaftFleet::new("handoff", ttl);
        let failovers = handoff_rows(
            &mut sink,
            backend,
            &mut fleet,
            ttl_s,
            rounds,
            Some(("p99 <= 10 ms".into(), 10.0)),
            "crash failover, member down with it",
        )
        .await?;
        // The same crashes, split by the role of the member that went
        // down: a Raft follower, or the Raft leader too (then the new Raft
        // leader lets every lease last a full ttl from its takeover, which
        // comes an election timeout after the crash).
        let limit = (ttl_s * 1000 + 100) as f64;
        for (raft_leader, name, target) in [
            (
                false,
                "crash failover, member a Raft follower",
                Some((format!("p99 <= ttl + 100 ms = {limit} ms"), limit)),
            ),
            (true, "crash failover, member the Raft leader", None),
        ] {
            let samples: Vec<f64> = failovers
                .iter()
                .zip(fleet.killed_raft_leader())
                .filter(|(_, was)| **was == raft_leader)
                .map(|(ms, _)| *ms)
                .collect();
            let note = (samples.is_empty()).then(|| "no crash of this kind in the run".to_owned());
            sink.timed(
                backend,
                "leaseholder",
                &format!("{name} (ttl {ttl_s} s)"),
                scenarios::Timed {
                    samples,
                    svg: None,
                    note,
                },
                target,
            )?;
        }
    }
    let window = Duration::from_secs(if quick { 10 } else { 30 });
    log(start, &format!("{backend}: idle cost, {window:?}"));
    let idle = peer_group::idle(Duration::from_secs(10), window).await?;
    sink.figure(
        backend,
        "idle: frames sent per second, each member".into(),
        "frames/s",
        idle.frames_per_s.clone(),
        None,
        format!(
            "one leader holding a lease (ttl 10 s) over {:.1} s; heartbeats every 50 ms",
            idle.window.as_secs_f64()
        ),
    );
    sink.figure(
        backend,
        "idle: CPU per member".into(),
        "% of a core",
        vec![idle.cpu_pct_per_member],
        None,
        "the process's CPU over the window, divided by the 3 members".into(),
    );
    let wall = start.elapsed();
    let cpus = std::thread::available_parallelism().map_or(0, usize::from);
    let meta = [
        ("mode", "--peer-group".to_owned()),
        ("quick", quick.to_string()),
        ("wall_time_s", format!("{:.1}", wall.as_secs_f64())),
        ("cpus", cpus.to_string()),
    ];
    report::write(out, "results.json", &report::json(&sink.rows, &meta))?;
    let header = format!(
        "# leaseholder peer group results\n\nRun by `scripts/bench --peer-group{}`; wall time {:.0} s on {cpus} CPUs. \
Three members of a `leaseholder-raft` group in one process, over the built-in TCP transport on loopback, each \
with its data directory (fsynced), heartbeat 50 ms, election timeout 150 to 300 ms, and a candidate on each \
member. A graceful handoff is the leader's `shutdown()`; a crash takes its member down with it (one process), \
and its replacement starts the member again on its port and directory.\n",
        if quick { " --quick" } else { "" },
        wall.as_secs_f64(),
    );
    let md = report::markdown(&sink.rows, &header);
    report::write(out, "RESULTS.md", &md)?;
    println!("{md}");
    Ok(())
}

/// The keep-alives a process holding `n` keys sent per renew interval
/// (etcd's shared lease: about one, whatever `n`).
fn sent_row(sink: &mut Sink, backend: &str, n: usize, sent: u64, intervals: f64, window_s: f64) {
    sink.figure(
        backend,
        format!("scale {n} keys: keep-alives per renew interval"),
        "per interval",
        vec![sent as f64 / intervals],
        Some(("about 1 (<= 1.5)".into(), 1.5)),
        format!(
            "{sent} keep-alives and grants in {window_s:.1} s = {intervals:.2} renew intervals of 3.3 s"
        ),
    );
}

/// noleader on the NATS server: one fleet times the first election and a
/// graceful handoff (SIGTERM), another, at the same time, a crash (SIGKILL).
async fn noleader_scenarios(
    exe: PathBuf,
    url: String,
    quick: bool,
) -> anyhow::Result<Vec<(String, Timed)>> {
    let rounds = if quick { 1 } else { 3 };
    let wait = Duration::from_secs(if quick { 140 } else { 240 });
    let id = uuid::Uuid::now_v7().simple().to_string();
    let mut a = ProcFleet::new(
        exe.clone(),
        "noleader",
        &url,
        &format!("nl-handoff-{id}"),
        Duration::from_secs(60),
    );
    let mut b = ProcFleet::new(
        exe,
        "noleader",
        &url,
        &format!("nl-crash-{id}"),
        Duration::from_secs(60),
    );
    let (ra, rb) = tokio::join!(
        scenarios::handoff_and_crash(&mut a, rounds, true, false, wait, "nats noleader"),
        scenarios::handoff_and_crash(&mut b, rounds, false, true, wait, "nats noleader"),
    );
    let (first_a, handoff, _) = ra?;
    let (first_b, _, failover) = rb?;
    let mut first = first_a;
    first.samples.extend(first_b.samples);
    first.note = first.note.or(first_b.note);
    Ok(vec![
        ("first election (3 candidates)".into(), first),
        ("graceful handoff (ttl 60 s, fixed)".into(), handoff),
        ("crash failover (ttl 60 s, fixed)".into(), failover),
    ])
}

/// Registry rows: store calls per graceful handoff with 3, 50 and 500
/// registered followers, and preemption handoffs.
async fn registry_scenarios(
    sink: &mut Sink,
    opts: &Opts,
    store: &Store,
    start: Instant,
) -> anyhow::Result<()> {
    let backend = store.name();
    let ttl = Duration::from_secs(2);
    for n in [3, 50, 500] {
        log(
            start,
            &format!("{backend}: registry, graceful handoff with {n} followers"),
        );
        let key = format!("bench-registry-{n}-{}", std::process::id());
        // A handoff that cannot be measured (a follower that never
        // follows, a successor that never leads) fails the bench: a row
        // left out would hide it.
        let c = registry::handoff_cost(store, &key, n, ttl)
            .await
            .with_context(|| {
                format!("{backend}: graceful handoff with {n} registered followers")
            })?;
        let note = format!(
            "ttl 2 s; in {:.0} ms from resign(): {} lease writes + {} registry entries \
             changed; reads: {} of one entry, {} of the whole registry; {} unchanged \
             registry renewals (periodic, not caused by the handoff)",
            c.window.as_secs_f64() * 1e3,
            c.lease_writes,
            c.registry_changes,
            c.entry_reads,
            c.registry_lists,
            c.registry_renewals
        );
        sink.figure(
            backend,
            format!(
                "registry: graceful handoff, {} followers: store writes",
                c.followers
            ),
            "writes",
            vec![(c.lease_writes + c.registry_changes) as f64],
            Some(("<= 5".to_owned(), 5.0)),
            note,
        );
        sink.figure(
            backend,
            format!(
                "registry: graceful handoff, {} followers: time",
                c.followers
            ),
            "ms",
            vec![c.took.as_secs_f64() * 1e3],
            None,
            "resign() to the successor's work start".to_owned(),
        );
    }
    let rounds = if opts.quick { 5 } else { 20 };
    log(start, &format!("{backend}: registry, {rounds} preemptions"));
    let prefix = format!("bench-{}", std::process::id());
    let (handover, from_start) = registry::preemption(store, &prefix, rounds, ttl).await?;
    sink.figure(
        backend,
        "registry: preemption handoff (step-down to the preferred's work start)".to_owned(),
        "ms",
        handover,
        Some(("p99 <= 10 ms".to_owned(), 10.0)),
        "ttl 2 s, min_term 200 ms; from the leader's token firing to priority 20's work start"
            .to_owned(),
    );
    sink.figure(
        backend,
        "registry: preemption (the preferred's start to its work start)".to_owned(),
        "ms",
        from_start,
        None,
        "includes the leader noticing the new candidate: a registry event, else its next \
         renew interval (667 ms)"
            .to_owned(),
    );
    Ok(())
}

async fn run(opts: Opts) -> anyhow::Result<()> {
    let start = Instant::now();
    let exe = candidate_exe()?;
    let mut sink = Sink {
        dir: opts.out.clone(),
        rows: Vec::new(),
    };
    let _ = std::fs::remove_dir_all(opts.out.join("timelines"));

    // Memory: candidates are tasks in this process.
    let mem = MemoryStore::new();
    fleet_scenarios(
        &mut sink,
        &opts,
        "memory",
        |key, ttl| MemFleet::new(&mem, key, ttl),
        start,
    )
    .await?;
    registry_scenarios(&mut sink, &opts, &Store::Memory(mem.clone()), start).await?;

    log(start, "starting nats-server");
    let nats = NatsServer::start()
        .await
        .context("nats-server 2.11+ is needed: run scripts/setup")?;
    let noleader = opts.noleader.then(|| {
        log(
            start,
            "nats: noleader 0.1.2 runs in the background (first election, handoff, crash)",
        );
        tokio::spawn(noleader_scenarios(exe.clone(), nats.url(), opts.quick))
    });
    let nats_url = nats.url();
    Store::Nats(nats_url.clone()).prepare().await?;
    fleet_scenarios(
        &mut sink,
        &opts,
        "nats",
        |key, ttl| ProcFleet::new(exe.clone(), "leaseholder", &nats_url, key, ttl),
        start,
    )
    .await?;

    log(start, "starting PostgreSQL");
    let pg = PostgresServer::start()
        .await
        .context("PostgreSQL 15+ is needed: run scripts/setup")?;
    let pg_url = pg.url();
    Store::Postgres(pg_url.clone()).prepare().await?;

    // Redis: setup writes the epoch marker of this fresh server (one per
    // database, shared by every key), and no acquire succeeds until the
    // marker is one ttl old (the acquiring campaign's ttl): the server
    // cannot tell a fresh store from one that lost its data. That is paid
    // once per server (and again after a data loss), not per key or per
    // election, so the honest steady state, and what the Redis rows time,
    // is a marker older than every ttl: it is written now, PostgreSQL's
    // scenarios run meanwhile, and the Redis ones start once it is
    // LONGEST_TTL old. Every first election is then on a fresh key under
    // an old marker.
    log(start, "starting redis-server");
    let redis = RedisServer::start()
        .await
        .context("redis-server 7+ is needed: run scripts/setup")?;
    let redis_url = redis.url();
    Store::Redis(redis_url.clone()).prepare().await?;
    let redis_quiet_until = Instant::now() + LONGEST_TTL;

    // etcd (a single member, like the other servers): the first acquire
    // on it writes the epoch marker, and no acquire succeeds until the
    // fresh marker's lease has expired. Paid here, once per server, like
    // Redis's marker: `prepare` campaigns on a throwaway key until it
    // leads, so every etcd row runs under a settled marker.
    log(start, "starting etcd");
    let etcd = EtcdServer::start()
        .await
        .context("etcd 3.4+ is needed: run scripts/setup")?;
    let etcd_url = format!("etcd://{}", etcd.addr());
    Store::Etcd(etcd_url.clone()).prepare().await?;

    fleet_scenarios(
        &mut sink,
        &opts,
        "postgres",
        |key, ttl| ProcFleet::new(exe.clone(), "leaseholder", &pg_url, key, ttl),
        start,
    )
    .await?;

    if Instant::now() < redis_quiet_until {
        log(start, "redis: waiting until the epoch marker is a ttl old");
        tokio::time::sleep_until(redis_quiet_until).await;
    }
    fleet_scenarios(
        &mut sink,
        &opts,
        "redis",
        |key, ttl| ProcFleet::new(exe.clone(), "leaseholder", &redis_url, key, ttl),
        start,
    )
    .await?;
    fleet_scenarios(
        &mut sink,
        &opts,
        "etcd",
        |key, ttl| ProcFleet::new(exe.clone(), "leaseholder", &etcd_url, key, ttl),
        start,
    )
    .await?;

    steady_and_scale(
        &mut sink,
        &opts,
        &Store::Memory(mem.clone()),
        "memory",
        start,
    )
    .await?;
    steady_and_scale(
        &mut sink,
        &opts,
        &Store::Nats(nats_url.clone()),
        &nats_url,
        start,
    )
    .await?;
    steady_and_scale(
        &mut sink,
        &opts,
        &Store::Postgres(pg_url.clone()),
        &pg_url,
        start,
    )
    .await?;
    steady_and_scale(
        &mut sink,
        &opts,
        &Store::Redis(redis_url.clone()),
        &redis_url,
        start,
    )
    .await?;
    steady_and_scale(
        &mut sink,
        &opts,
        &Store::Etcd(etcd_url.clone()),
        &etcd_url,
        start,
    )
    .await?;

    for store in [
        Store::Nats(nats_url.clone()),
        Store::Postgres(pg_url.clone()),
        Store::Redis(redis_url.clone()),
        Store::Etcd(etcd_url.clone()),
    ] {
        registry_scenarios(&mut sink, &opts, &store, start).await?;
    }

    if let Some(task) = noleader {
        log(start, "waiting for noleader");
        for (scenario, t) in task.await?? {
            sink.timed("nats", "noleader", &scenario, t, None)?;
        }
    }
    // Ours first, noleader's rows after ours, per backend.
    let wall = start.elapsed();
    let mode = if opts.quick { "--quick" } else { "full" };
    let cpus = std::thread::available_parallelism().map_or(0, usize::from);
    let meta = [
        ("mode", mode.to_owned()),
        ("wall_time_s", format!("{:.1}", wall.as_secs_f64())),
        ("nats_server", nats.version().to_owned()),
        ("postgres", pg.version().to_owned()),
        ("redis_server", redis.version().to_owned()),
        ("etcd", etcd.version().to_owned()),
        ("cpus", cpus.to_string()),
        ("noleader", "0.1.2".to_owned()),
    ];
    report::write(&opts.out, "results.json", &report::json(&sink.rows, &meta))?;
    let header = format!(
        "# leaseholder benchmark results ({mode})\n\nRun by `scripts/bench{}`; wall time {:.0} s on {cpus} CPUs shared with other work, so figures are noisy. \
nats-server {}, PostgreSQL {}, redis-server {}, etcd {} (one member), noleader 0.1.2 on the same nats-server. Times in ms from the action (SIGTERM, SIGKILL, or letting all candidates campaign) to the successor's work start, \
measured by the bench process reading the candidates' stdout. NATS, PostgreSQL, Redis and etcd candidates are separate processes; memory candidates are tasks in the bench process. \
Redis rows run once the server's epoch marker is older than every ttl, etcd rows once its fresh-cluster marker has expired (each is written once per server: see `src/main.rs`). \
Registry rows run their candidates as `Leader`s in the bench process (the leader on a client of its own, the followers on one shared client). \
Targets are checked against p99 (single figures: their value). Raw samples: `results.json`.\n",
        if opts.quick { " --quick" } else { "" },
        wall.as_secs_f64(),
        nats.version(),
        pg.version(),
        redis.version(),
        etcd.version()
    );
    let md = report::markdown(&sink.rows, &header);
    report::write(&opts.out, "RESULTS.md", &md)?;
    println!("{md}");
    log(
        start,
        &format!(
            "done: {}",
            Path::new(&opts.out).join("RESULTS.md").display()
        ),
    );
    Ok(())
}
