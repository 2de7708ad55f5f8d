//! Three candidates in one process on the in-memory backend: one leads, it
//! resigns and the next takes over at once, then that one crashes and the
//! last takes over when its lease expires. Prints the measured times.
//!
//! Run: `cargo run -p leaseholder-examples --example quickstart`

use std::time::Duration;

use leaseholder::{Backend, Faults, Leader, MemoryStore, Term};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;

const TTL: Duration = Duration::from_secs(1);

struct Candidate {
    name: &'static str,
    leader: Leader,
    faults: Faults,
    task: JoinHandle<Result<(), leaseholder::Error>>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let store = MemoryStore::new();
    let (started_tx, mut started) = mpsc::unbounded_channel::<(&'static str, Term, Instant)>();

    let t0 = Instant::now();
    let mut candidates = Vec::new();
    for name in ["alpha", "bravo", "charlie"] {
        let edge = store.backend();
        let faults = edge.faults();
        let leader = Leader::builder("quickstart")
            .backend(Backend::new(edge))
            .ttl(TTL)
            .metadata(name)
            .build()?;
        let task = tokio::spawn({
            let leader = leader.clone();
            let started_tx = started_tx.clone();
            async move {
                leader
                    .acquire_and_run(move |term| {
                        let started_tx = started_tx.clone();
                        async move {
                            let _ = started_tx.send((name, term.clone(), Instant::now()));
                            // The leader-only job: tick until leadership ends.
                            let mut ticks = tokio::time::interval(Duration::from_millis(100));
                            while !term.is_cancelled() {
                                tokio::select! {
                                    _ = ticks.tick() => {}
                                    () = term.cancelled() => {}
                                }
                            }
                            Ok::<_, anyhow::Error>(())
                        }
                    })
                    .await
            }
        });
        candidates.push(Candidate {
            name,
            leader,
            faults,
            task,
        });
    }

    let (first, term, at) = next_start(&mut started).await?;
    println!(
        "{first} leads (fencing token {}) after {:.1?}",
        term.fencing_token(),
        at - t0
    );

    // 1. Graceful handoff: the leader resigns.
    let resigned = Instant::now();
    let leading = find(&candidates, first)?;
    leading.leader.resign().await?;
    let (second, term2, at2) = next_start(&mut started).await?;
    let handoff = at2 - resigned;
    println!(
        "{first} resigned; {second} leads (token {}) {handoff:.1?} later",
        term2.fencing_token()
    );

    // 2. Crash: the new leader's process dies without releasing.
    let crashed = find(&candidates, second)?;
    crashed.faults.partition();
    crashed.task.abort();
    let crash_at = Instant::now();
    let (third, term3, at3) = next_start(&mut started).await?;
    let failover = at3 - crash_at;
    println!(
        "{second} crashed; {third} leads (token {}) {failover:.1?} later (ttl {TTL:?})",
        term3.fencing_token()
    );

    println!();
    println!("graceful handoff: {:>8.2} ms", handoff.as_secs_f64() * 1e3);
    println!(
        "crash failover:   {:>8.2} ms  (the lease had to expire: ttl {} ms)",
        failover.as_secs_f64() * 1e3,
        TTL.as_millis()
    );
    println!(
        "fencing tokens:   {} < {} < {}",
        term.fencing_token(),
        term2.fencing_token(),
        term3.fencing_token()
    );

    for c in candidates {
        if c.name != second {
            c.leader.shutdown().await?;
            c.task.await??;
        }
    }
    Ok(())
}

async fn next_start(
    started: &mut mpsc::UnboundedReceiver<(&'static str, Term, Instant)>,
) -> anyhow::Result<(&'static str, Term, Instant)> {
    tokio::time::timeout(TTL * 10, started.recv())
        .await?
        .ok_or_else(|| anyhow::anyhow!("every candidate stopped"))
}

fn find<'a>(candidates: &'a [Candidate], name: &str) -> anyhow::Result<&'a Candidate> {
    candidates
        .iter()
        .find(|c| c.name == name)
        .ok_or_else(|| anyhow::anyhow!("no candidate {name}"))
}
