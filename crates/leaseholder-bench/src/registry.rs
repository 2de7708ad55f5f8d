//! Candidate-registry scenarios: what a graceful handoff costs in store
//! calls with many registered followers, and how fast a preemption hands
//! the key to the preferred candidate. Candidates are `Leader`s in this
//! process: the leader on a counted client of its own, every follower on
//! one shared counted client (the calls are counted the same whatever the
//! connection; 500 connections would measure the server's connection
//! handling instead).

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use leaseholder::{Backend, Error, Leader, State, Waiting};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::{Instant, timeout};

use crate::counting::{Counts, Snapshot};
use crate::scenarios::Store;

/// What one graceful handoff among `followers` registered followers cost.
pub(crate) struct HandoffCost {
    pub(crate) followers: usize,
    /// From `resign()` to a follower leading.
    pub(crate) took: Duration,
    /// Lease writes (acquires, renewals, releases) by everyone, from the
    /// resign until every hold-off has passed.
    pub(crate) lease_writes: u64,
    /// Registry writes that changed an entry (a nomination, a successor
    /// named), in that window: caused by the handoff.
    pub(crate) registry_changes: u64,
    /// Reads of the whole registry by everyone in that window.
    pub(crate) registry_lists: u64,
    /// Reads of one registry entry (the last holder's) in that window.
    pub(crate) entry_reads: u64,
    /// Registry writes in that window that renewed an entry unchanged (the
    /// periodic renewals, which go on whether or not anyone hands over).
    pub(crate) registry_renewals: u64,
    pub(crate) window: Duration,
}

const WAIT: Duration = Duration::from_secs(60);

fn build(key: &str, backend: &Backend, ttl: Duration, priority: i32) -> anyhow::Result<Leader> {
    Ok(Leader::builder(key)
        .backend(backend.clone())
        .ttl(ttl)
        .priority(priority)
        .min_term(Duration::from_millis(200))
        .build()?)
}

/// Runs `acquire_and_run` with work that reports its start and the moment
/// its token fires.
fn run(
    l: &Leader,
    events: mpsc::UnboundedSender<(usize, &'static str, Instant)>,
    who: usize,
) -> JoinHandle<Result<(), Error>> {
    let l = l.clone();
    tokio::spawn(async move {
        l.acquire_and_run(move |term| {
            let events = events.clone();
            async move {
                let _ = events.send((who, "start", Instant::now()));
                term.cancelled().await;
                let _ = events.send((who, "cancelled", Instant::now()));
                Ok::<_, std::io::Error>(())
            }
        })
        .await
    })
}

async fn wait_state(l: &Leader, what: impl FnMut(&State) -> bool) -> anyhow::Result<()> {
    timeout(WAIT, l.state().wait_for(what))
        .await
        .context("state not reached in time")??;
    Ok(())
}

fn sum(a: &Arc<Counts>, b: &Arc<Counts>) -> Snapshot {
    let (x, y) = (a.snapshot(), b.snapshot());
    Snapshot {
        acquire: x.acquire + y.acquire,
        renew: x.renew + y.renew,
        release: x.release + y.release,
        holder: x.holder + y.holder,
        register: x.register + y.register,
        deregister: x.deregister + y.deregister,
        candidates: x.candidates + y.candidates,
        candidate: x.candidate + y.candidate,
        register_changes: x.register_changes + y.register_changes,
    }
}

/// One graceful handoff (`resign()`) with `n` registered, idle followers.
pub(crate) async fn handoff_cost(
    store: &Store,
    key: &str,
    n: usize,
    ttl: Duration,
) -> anyhow::Result<HandoffCost> {
    let interval = ttl / 3;
    let (lb, lc) = store.client(interval).await?;
    let (fb, fc) = store.client(interval).await?;
    if !lb.supports_candidates() {
        bail!("the {} backend keeps no candidate registry", lb.name());
    }
    let (tx, mut rx) = mpsc::unbounded_channel();
    let leader = build(key, &lb, ttl, 0)?;
    let mut tasks = vec![(leader.clone(), run(&leader, tx.clone(), 0))];
    wait_state(&leader, State::is_leader).await?;
    let mut followers = Vec::new();
    for i in 0..n {
        let f = build(key, &fb, ttl, 0)?;
        tasks.push((f.clone(), run(&f, tx.clone(), i + 1)));
        followers.push(f);
    }
    // Every follower registered and following the leader.
    for f in &followers {
        wait_state(f, |s| {
            matches!(
                s,
                State::Follower {
                    waiting: Waiting::Held,
                    ..
                }
            )
        })
        .await?;
    }
    let until = Instant::now() + WAIT;
    while leader.candidates().await?.len() < n + 1 {
        if Instant::now() > until {
            bail!("not every follower registered within {WAIT:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    while rx.try_recv().is_ok() {}
    let before = sum(&lc, &fc);
    let t0 = Instant::now();
    leader.resign().await?;
    let took = loop {
        match timeout(WAIT, rx.recv()).await {
            Ok(Some((who, "start", at))) if who != 0 => break at - t0,
            Ok(Some(_)) => {}
            _ => bail!("no follower led within {WAIT:?}"),
        }
    };
    // Every hold-off has passed (the default hold-off is ttl/10).
    let window = took + ttl / 10 + Duration::from_millis(200);
    tokio::time::sleep_until(t0 + window).await;
    let d = sum(&lc, &fc).since(&before);
    for (l, _) in &tasks {
        l.shutdown().await?;
    }
    for (_, t) in tasks {
        t.await??;
    }
    Ok(HandoffCost {
        followers: n,
        took,
        lease_writes: d.acquire + d.renew + d.release,
        registry_changes: d.register_changes,
        registry_lists: d.candidates,
        entry_reads: d.candidate,
        registry_renewals: (d.register + d.deregister).saturating_sub(d.register_changes),
        window,
    })
}

/// `rounds` preemptions: a leader of priority 10 (term past its minimum of
/// 200 ms), then a new candidate of priority 20. Returns, per round, the
/// time from the leader's token firing (it acted on the preferred
/// candidate's claim) to the preferred candidate's work start, and the
/// time from the preferred candidate's start to its work start.
pub(crate) async fn preemption(
    store: &Store,
    prefix: &str,
    rounds: usize,
    ttl: Duration,
) -> anyhow::Result<(Vec<f64>, Vec<f64>)> {
    let interval = ttl / 3;
    let (mut handover, mut from_start) = (Vec::new(), Vec::new());
    for r in 0..rounds {
        let key = format!("{prefix}-preempt-{r}");
        let (a, _) = store.client(interval).await?;
        let (b, _) = store.client(interval).await?;
        if !a.supports_candidates() {
            bail!("the {} backend keeps no candidate registry", a.name());
        }
        let (tx, mut rx) = mpsc::unbounded_channel();
        let low = build(&key, &a, ttl, 10)?;
        let tl = run(&low, tx.clone(), 0);
        wait_state(&low, State::is_leader).await?;
        tokio::time::sleep(Duration::from_millis(250)).await;
        while rx.try_recv().is_ok() {}
        let high = build(&key, &b, ttl, 20)?;
        let started = Instant::now();
        let th = run(&high, tx.clone(), 1);
        let mut cancelled = None;
        let began = loop {
            match timeout(WAIT, rx.recv()).await {
                Ok(Some((0, "cancelled", at))) => cancelled = Some(at),
                Ok(Some((1, "start", at))) => break at,
                Ok(Some(_)) => {}
                _ => bail!("no preemption within {WAIT:?}"),
            }
        };
        let cancelled =
            cancelled.context("the preferred candidate led before the leader stepped down")?;
        handover.push((began - cancelled).as_secs_f64() * 1e3);
        from_start.push((began - started).as_secs_f64() * 1e3);
        for (l, t) in [(high, th), (low, tl)] {
            l.shutdown().await?;
            t.await??;
        }
    }
    Ok((handover, from_start))
}
