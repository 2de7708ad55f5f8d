//! The scenarios: first election, graceful handoff, crash failover (on
//! any [`Fleet`]), steady state and scale (in process, counted at the
//! client).

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use leaseholder::{
    Backend, EtcdBackend, Leader, MemoryStore, NatsBackend, PostgresBackend, RedisBackend,
};
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::counting::{Counting, Counts, Snapshot};
use crate::fleet::{Ev, Fleet};
use crate::stats::ms;
use crate::timeline;

/// A store the in-process scenarios can open clients of.
#[derive(Clone)]
pub(crate) enum Store {
    Memory(MemoryStore),
    Nats(String),
    Postgres(String),
    Redis(String),
    /// `etcd://host:port[,…]`.
    Etcd(String),
}

/// The key prefix of the bench's Redis clients and candidates (like the
/// NATS bucket, `bench`).
pub(crate) const REDIS_PREFIX: &str = "bench";

/// A Redis backend of the bench on `url`.
pub(crate) fn redis_backend(url: &str) -> anyhow::Result<RedisBackend> {
    Ok(RedisBackend::builder()
        .url(url)
        .prefix(REDIS_PREFIX)
        .build()?)
}

/// The key prefix of the bench's etcd clients and candidates (`bench`,
/// like the others).
pub(crate) const ETCD_PREFIX: &str = "bench";

/// An etcd backend of the bench on `url` (`etcd://host:port[,…]`).
pub(crate) fn etcd_backend(url: &str) -> anyhow::Result<EtcdBackend> {
    Ok(EtcdBackend::builder()
        .url(url)
        .prefix(ETCD_PREFIX)
        .build()?)
}

impl Store {
    pub(crate) fn name(&self) -> &'static str {
        match self {
            Store::Memory(_) => "memory",
            Store::Nats(_) => "nats",
            Store::Postgres(_) => "postgres",
            Store::Redis(_) => "redis",
            Store::Etcd(_) => "etcd",
        }
    }

    /// Creates the bucket or table (the one the bench's candidates use) on
    /// a throwaway, uncounted backend. A candidate whose own setup creates
    /// it waits one ttl before its first acquire (the object may replace
    /// one deleted under a running leader): the figures are not about
    /// that wait, so every scenario runs after this.
    ///
    /// Redis has nothing to create, but its setup writes the epoch marker
    /// of a fresh server, and no acquire succeeds until the marker is one
    /// ttl old: the caller waits for that (see `main.rs`).
    ///
    /// etcd has nothing to create either; the first acquire on a cluster
    /// writes its epoch marker, and none succeeds for a ttl after: this
    /// campaigns on a throwaway key until it leads (see `etcd_epoch.rs`).
    pub(crate) async fn prepare(&self) -> anyhow::Result<()> {
        match self {
            Store::Memory(_) => {}
            Store::Nats(url) => {
                let client = async_nats::connect(url.as_str()).await?;
                Backend::nats(client, "bench")
                    .setup()
                    .await
                    .context("creating the NATS bucket")?;
            }
            Store::Postgres(url) => {
                let pg = PostgresBackend::builder().url(url.clone()).build()?;
                Backend::postgres(pg)
                    .setup()
                    .await
                    .context("creating the PostgreSQL table")?;
            }
            Store::Redis(url) => {
                Backend::redis(redis_backend(url)?)
                    .setup()
                    .await
                    .context("writing the Redis epoch marker")?;
            }
            Store::Etcd(url) => {
                crate::etcd_epoch::settle(
                    etcd_backend(url)?,
                    Duration::from_secs(2),
                    Duration::from_secs(30),
                )
                .await
                .context("waiting out the etcd epoch marker")?;
            }
        }
        Ok(())
    }

    /// A new client (connection or pool) of the store, counted.
    pub(crate) async fn client(
        &self,
        renew_interval: Duration,
    ) -> anyhow::Result<(Backend, Arc<Counts>)> {
        Ok(match self {
            Store::Memory(store) => {
                let (edge, counts) = Counting::new(store.backend(), renew_interval);
                (Backend::new(edge), counts)
            }
            Store::Nats(url) => {
                let client = async_nats::connect(url.as_str()).await?;
                let (edge, counts) =
                    Counting::new(NatsBackend::new(client, "bench"), renew_interval);
                (Backend::new(edge), counts)
            }
            Store::Postgres(url) => {
                let pg = PostgresBackend::builder().url(url.clone()).build()?;
                let (edge, counts) = Counting::new(pg, renew_interval);
                (Backend::new(edge), counts)
            }
            Store::Redis(url) => {
                let (edge, counts) = Counting::new(redis_backend(url)?, renew_interval);
                (Backend::new(edge), counts)
            }
            Store::Etcd(url) => {
                let etcd = etcd_backend(url)?;
                let probe = etcd.clone();
                let (edge, counts) = Counting::new(etcd, renew_interval);
                let _ = counts
                    .keep_alives
                    .set(Box::new(move || probe.keep_alives_sent()));
                (Backend::new(edge), counts)
            }
        })
    }
}

/// One timed sample and the SVG of the first one.
#[derive(Default)]
pub(crate) struct Timed {
    pub(crate) samples: Vec<f64>,
    pub(crate) svg: Option<String>,
    /// Why fewer samples than asked for were taken, if so.
    pub(crate) note: Option<String>,
}

fn window_svg(title: &str, log: &[crate::fleet::Event], t0: Instant, at: Instant) -> String {
    let d = at.saturating_duration_since(t0);
    let pad = (d / 2).max(Duration::from_micros(200));
    let from = t0.checked_sub(pad).unwrap_or(t0);
    timeline::svg(title, log, t0, from, at + pad)
}

/// `runs` first elections among `n` new candidates each, on a fresh key:
/// the time from letting every candidate campaign to the first work start.
pub(crate) async fn first_election<F: Fleet>(
    mut make: impl FnMut(&str) -> F,
    prefix: &str,
    runs: usize,
    n: usize,
    wait: Duration,
    title: &str,
) -> anyhow::Result<Timed> {
    let mut out = Timed::default();
    for r in 0..runs {
        let key = format!("{prefix}-first-{r}");
        let mut fleet = make(&key);
        for _ in 0..n {
            fleet.spawn().await?;
        }
        let t0 = Instant::now();
        for i in 0..n {
            fleet.go(i).await?;
        }
        let started = fleet
            .events()
            .until(t0 + wait, |e| matches!(e.ev, Ev::Start(_)))
            .await;
        match started {
            Some(e) => {
                out.samples.push(ms(e.at - t0));
                if out.svg.is_none() {
                    // Let the rows settle a moment so followers show.
                    out.svg = Some(window_svg(title, &fleet.events().log, t0, e.at));
                }
            }
            None => out.note = Some(format!("no leader within {wait:?}")),
        }
        fleet.close().await;
        if out.note.is_some() {
            break;
        }
    }
    Ok(out)
}

/// Three candidates on `key`; `rounds` times: shut the leader down
/// gracefully and time until its successor's work starts, start a
/// replacement; then (if `crash`) kill the new leader and time until the
/// next one's work starts, start a replacement. Also returns the first
/// election of the fleet.
pub(crate) async fn handoff_and_crash<F: Fleet>(
    fleet: &mut F,
    rounds: usize,
    graceful: bool,
    crash: bool,
    wait: Duration,
    title: &str,
) -> anyhow::Result<(Timed, Timed, Timed)> {
    let (mut first, mut handoff, mut failover) =
        (Timed::default(), Timed::default(), Timed::default());
    for _ in 0..3 {
        fleet.spawn().await?;
    }
    let t0 = Instant::now();
    for i in 0..3 {
        fleet.go(i).await?;
    }
    let Some(e) = fleet
        .events()
        .until(t0 + wait, |e| matches!(e.ev, Ev::Start(_)))
        .await
    else {
        let note = format!("no first leader within {wait:?}");
        first.note = Some(note.clone());
        handoff.note = Some(note.clone());
        failover.note = Some(note);
        return Ok((first, handoff, failover));
    };
    first.samples.push(ms(e.at - t0));
    first.svg = Some(window_svg(
        &format!("{title}: first election"),
        &fleet.events().log,
        t0,
        e.at,
    ));
    let mut leader = e.who;
    for _ in 0..rounds {
        if !graceful {
            // Crash only.
        } else {
            let t0 = Instant::now();
            fleet.terminate(leader)?;
            let old = leader;
            let Some(e) = fleet
                .events()
                .until(t0 + wait, |e| e.who != old && matches!(e.ev, Ev::Start(_)))
                .await
            else {
                handoff.note = Some(format!("no successor within {wait:?}"));
                break;
            };
            handoff.samples.push(ms(e.at - t0));
            if handoff.svg.is_none() {
                handoff.svg = Some(window_svg(
                    &format!("{title}: graceful handoff (SIGTERM)"),
                    &fleet.events().log,
                    t0,
                    e.at,
                ));
            }
            leader = e.who;
            let new = fleet.spawn().await?;
            fleet.go(new).await?;
        }
        if !crash {
            continue;
        }
        let t0 = Instant::now();
        fleet.kill(leader).await?;
        let old = leader;
        let Some(e) = fleet
            .events()
            .until(t0 + wait, |e| e.who != old && matches!(e.ev, Ev::Start(_)))
            .await
        else {
            failover.note = Some(format!("no successor within {wait:?}"));
            break;
        };
        failover.samples.push(ms(e.at - t0));
        if failover.svg.is_none() {
            failover.svg = Some(window_svg(
                &format!("{title}: crash failover (SIGKILL)"),
                &fleet.events().log,
                t0,
                e.at,
            ));
        }
        leader = e.who;
        let new = fleet.spawn().await?;
        fleet.go(new).await?;
    }
    fleet.close().await;
    Ok((first, handoff, failover))
}

/// Store operations of one leader and two idle followers on one key, each
/// with its own client, over `window`.
pub(crate) struct Steady {
    pub(crate) ttl: Duration,
    pub(crate) window: Duration,
    pub(crate) leader: Snapshot,
    pub(crate) followers: Vec<Snapshot>,
    pub(crate) leader_changed: bool,
}

pub(crate) async fn steady(
    store: &Store,
    key: &str,
    ttl: Duration,
    window: Duration,
) -> anyhow::Result<Steady> {
    let renew = ttl / 3;
    let (tx, mut rx) = mpsc::unbounded_channel::<usize>();
    let mut cands = Vec::new();
    for i in 0..3 {
        let (backend, counts) = store.client(renew).await?;
        let leader = Leader::builder(key)
            .backend(backend)
            .ttl(ttl)
            .renew_interval(renew)
            .build()?;
        leader.setup().await?;
        let tx = tx.clone();
        let task = tokio::spawn({
            let leader = leader.clone();
            async move {
                leader
                    .acquire_and_run(|term| {
                        let tx = tx.clone();
                        async move {
                            let _ = tx.send(i);
                            term.cancelled().await;
                            Ok::<_, std::convert::Infallible>(())
                        }
                    })
                    .await
            }
        });
        cands.push((leader, counts, task));
    }
    let first = tokio::time::timeout(Duration::from_secs(30), rx.recv())
        .await
        .context("no leader within 30 s")?
        .context("no leader")?;
    // Let followers finish their first acquire attempt and watch setup.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before: Vec<Snapshot> = cands.iter().map(|c| c.1.snapshot()).collect();
    tokio::time::sleep(window).await;
    let after: Vec<Snapshot> = cands.iter().map(|c| c.1.snapshot()).collect();
    let leader_changed = rx.try_recv().is_ok();
    let mut followers = Vec::new();
    let mut leader = Snapshot::default();
    for (i, (a, b)) in after.iter().zip(&before).enumerate() {
        if i == first {
            leader = a.since(b);
        } else {
            followers.push(a.since(b));
        }
    }
    for (l, _, task) in cands {
        let _ = tokio::time::timeout(Duration::from_secs(10), l.shutdown()).await;
        task.abort();
    }
    Ok(Steady {
        ttl,
        window,
        leader,
        followers,
        leader_changed,
    })
}

/// What a scale worker measured.
#[derive(Clone, Debug, Default)]
pub(crate) struct Scale {
    pub(crate) keys: usize,
    pub(crate) ready_ms: f64,
    pub(crate) window_s: f64,
    pub(crate) cpu_pct: f64,
    pub(crate) rss_kib: f64,
    pub(crate) renewals: usize,
    pub(crate) late: usize,
    pub(crate) late_p99_pct: f64,
    pub(crate) lost: usize,
    /// Keep-alives (and grants) the backend sent in the window, where it
    /// counts them (etcd's shared lease).
    pub(crate) keep_alives: Option<u64>,
    /// Renewal requests sent in the window: one per renewal sent alone,
    /// one per batch (`renew_many`).
    pub(crate) requests: u64,
}

impl Scale {
    pub(crate) fn to_line(&self) -> String {
        format!(
            "SCALE {} {} {} {} {} {} {} {} {} {} {}",
            self.keys,
            self.ready_ms,
            self.window_s,
            self.cpu_pct,
            self.rss_kib,
            self.renewals,
            self.late,
            self.late_p99_pct,
            self.lost,
            self.keep_alives
                .map_or_else(|| "-".to_owned(), |n| n.to_string()),
            self.requests,
        )
    }

    pub(crate) fn from_line(line: &str) -> anyhow::Result<Scale> {
        let f: Vec<&str> = line
            .strip_prefix("SCALE ")
            .context("not a SCALE line")?
            .split(' ')
            .collect();
        anyhow::ensure!(f.len() == 11, "bad SCALE line {line:?}");
        Ok(Scale {
            keys: f[0].parse()?,
            ready_ms: f[1].parse()?,
            window_s: f[2].parse()?,
            cpu_pct: f[3].parse()?,
            rss_kib: f[4].parse()?,
            renewals: f[5].parse()?,
            late: f[6].parse()?,
            late_p99_pct: f[7].parse()?,
            lost: f[8].parse()?,
            keep_alives: match f[9] {
                "-" => None,
                n => Some(n.parse()?),
            },
            requests: f[10].parse()?,
        })
    }
}

/// How long a scale worker waits for all its keys to lead: 120 s, and
/// 2 ms more per key (100,000 keys: 320 s).
pub(crate) fn ready_limit(keys: usize) -> Duration {
    Duration::from_secs(120) + Duration::from_millis(2) * u32::try_from(keys).unwrap_or(u32::MAX)
}

/// `keys` leaders over one client in this process (a worker process of
/// its own): CPU and resident memory per key, and renewal lateness, over
/// `window` once every key leads.
pub(crate) async fn scale(
    store: &Store,
    keys: usize,
    ttl: Duration,
    window: Duration,
) -> anyhow::Result<Scale> {
    let renew = ttl / 3;
    let (backend, counts) = store.client(renew).await?;
    backend.setup().await?;
    let rss0 = crate::stats::rss_kib()?;
    let (tx, mut rx) = mpsc::unbounded_channel::<bool>();
    let prefix = uuid::Uuid::now_v7().simple().to_string();
    let t0 = Instant::now();
    let mut leaders = Vec::with_capacity(keys);
    let mut tasks = Vec::with_capacity(keys);
    for i in 0..keys {
        let leader = Leader::builder(format!("scale-{prefix}-{i}"))
            .backend(backend.clone())
            .ttl(ttl)
            .renew_interval(renew)
            .build()?;
        let tx = tx.clone();
        tasks.push(tokio::spawn({
            let leader = leader.clone();
            async move {
                leader
                    .acquire_and_run(|term| {
                        let tx = tx.clone();
                        async move {
                            let _ = tx.send(true);
                            term.cancelled().await;
                            let _ = tx.send(false);
                            Ok::<_, std::convert::Infallible>(())
                        }
                    })
                    .await
            }
        }));
        leaders.push(leader);
    }
    let mut leading = 0;
    let allowed = ready_limit(keys);
    let deadline = t0 + allowed;
    while leading < keys {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(true)) => leading += 1,
            Ok(Some(false)) => leading -= 1,
            _ => anyhow::bail!(
                "only {leading} of {keys} keys led at once within {} s",
                allowed.as_secs()
            ),
        }
    }
    let ready_ms = ms(t0.elapsed());
    tokio::time::sleep(Duration::from_secs(1)).await;
    let _ = counts.take_lateness();
    let rss1 = crate::stats::rss_kib()?;
    let sent = || counts.keep_alives.get().map(|f| f());
    let sent0 = sent();
    let requests0 = counts
        .renew_calls
        .load(std::sync::atomic::Ordering::Relaxed);
    let cpu0 = crate::stats::cpu_time()?;
    let w0 = Instant::now();
    tokio::time::sleep(window).await;
    let cpu1 = crate::stats::cpu_time()?;
    let elapsed = w0.elapsed();
    let keep_alives = sent().zip(sent0).map(|(b, a)| b - a);
    let requests = counts
        .renew_calls
        .load(std::sync::atomic::Ordering::Relaxed)
        - requests0;
    let lateness = counts.take_lateness();
    let mut lost = 0;
    while let Ok(up) = rx.try_recv() {
        if !up {
            lost += 1;
        }
    }
    let limit = renew / 10;
    let late = lateness.iter().filter(|d| **d > limit).count();
    let pcts: Vec<f64> = lateness
        .iter()
        .map(|d| d.as_secs_f64() / renew.as_secs_f64() * 100.0)
        .collect();
    let late_p99_pct = crate::stats::summarize(&pcts).map_or(0.0, |s| s.p99);
    let out = Scale {
        keys,
        ready_ms,
        window_s: elapsed.as_secs_f64(),
        cpu_pct: (cpu1 - cpu0).as_secs_f64() / elapsed.as_secs_f64() * 100.0,
        rss_kib: rss1.saturating_sub(rss0) as f64,
        renewals: lateness.len(),
        late,
        late_p99_pct,
        lost,
        keep_alives,
        requests,
    };
    for task in tasks {
        task.abort();
    }
    Ok(out)
}
