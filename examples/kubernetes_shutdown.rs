//! A leader-only worker as it would run in a Kubernetes pod, on PostgreSQL:
//! on SIGTERM it finishes the unit of work in progress, releases the lease,
//! and exits 0, so the next replica takes over at once instead of a ttl
//! later.
//!
//! Run two copies against one database, each in its own terminal:
//!
//! ```sh
//! DATABASE_URL=postgres://postgres@localhost:5432/postgres \
//!     cargo run -p leaseholder-examples --example kubernetes_shutdown
//! ```
//!
//! One prints `leading with fencing token T` and a `unit N started` /
//! `unit N done` pair every 200 ms; the other waits. Send the leader
//! SIGTERM, as the kubelet does when it stops a pod (`kill -TERM <pid>`, or
//! Ctrl-C): it prints `SIGTERM: draining`, then `unit N done` for the unit
//! it was in the middle of, then `drained after X ms, lease released`, and
//! exits 0. The other copy prints `leading with fencing token` with a larger
//! token a few milliseconds later. Kill the leader with SIGKILL instead and
//! the other copy waits for the lease to expire (the ttl, 10 s).

use std::time::Duration;

use leaseholder::{Backend, Leader, PostgresBackend, Term};
use tokio::signal::unix::{SignalKind, signal};
use tokio::time::Instant;

/// How long `shutdown()` lets the work finish (renewing the lease all the
/// while) before it drops the work and releases anyway.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);
/// How long one unit of work takes.
const UNIT: Duration = Duration::from_millis(200);

#[tokio::main]
async fn main() {
    if let Err(e) = run().await {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

async fn run() -> anyhow::Result<()> {
    let url = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@localhost:5432/postgres".into());
    let leader = Leader::builder("kubernetes-shutdown")
        .backend(Backend::postgres(
            PostgresBackend::builder().url(&url).build()?,
        ))
        .ttl(Duration::from_secs(10))
        .drain_timeout(DRAIN_TIMEOUT)
        .metadata(format!("pid {}", std::process::id()))
        .build()?;
    match tokio::time::timeout(Duration::from_secs(5), leader.setup()).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => anyhow::bail!(
            "PostgreSQL at {url}: {:#} (start PostgreSQL or set DATABASE_URL)",
            anyhow::Error::new(e)
        ),
        Err(_) => anyhow::bail!(
            "no PostgreSQL answered at {url} within 5 s (start PostgreSQL or set DATABASE_URL)"
        ),
    }
    // What the pod's terminationGracePeriodSeconds must cover: the drain,
    // the release (one statement, normally milliseconds; an attempt that
    // hangs is cut off at the renew interval), and a margin. Past the grace
    // period the kubelet sends SIGKILL, nothing is released, and the
    // successor waits for the lease to expire (a ttl).
    let config = leader.config();
    let budget = config.drain_timeout() + config.renew_interval() + Duration::from_secs(1);
    println!("candidate {} campaigning on {url}", leader.leader_id());
    println!(
        "shutdown budget: drain_timeout {:.1} s + release attempt {:.1} s (renew interval) \
         + margin 1.0 s = {:.1} s: set terminationGracePeriodSeconds to {} or more",
        config.drain_timeout().as_secs_f64(),
        config.renew_interval().as_secs_f64(),
        budget.as_secs_f64(),
        budget.as_secs_f64().ceil(),
    );

    let mut sigterm = signal(SignalKind::terminate())?;
    let runner = leader.clone();
    let mut campaign = tokio::spawn(async move { runner.acquire_and_run(work).await });
    let name = tokio::select! {
        _ = sigterm.recv() => "SIGTERM",
        _ = tokio::signal::ctrl_c() => "SIGINT",
        // The campaign only ends by itself on a fatal store error.
        ended = &mut campaign => return Ok(ended??),
    };
    let started = Instant::now();
    if leader.fencing_token().is_some() {
        println!("{name}: draining");
        // Cancels the term's token, keeps renewing while the work finishes
        // its unit (at most DRAIN_TIMEOUT), then releases the lease.
        leader.shutdown().await?;
        println!(
            "drained after {} ms, lease released",
            started.elapsed().as_millis()
        );
    } else {
        println!("{name}: not leading, stopping");
        leader.shutdown().await?;
    }
    campaign.await??;
    Ok(())
}

/// The leader-only work: units of work, one after another, until the term's
/// token fires. A unit that has started is finished, never cut short.
async fn work(term: Term) -> anyhow::Result<()> {
    println!("leading with fencing token {}", term.fencing_token());
    let mut n = 0;
    // On shutdown the work has the drain timeout to finish its unit. If the
    // lease is *lost* instead, it has only about half the drift margin
    // (0.5 s at ttl 10 s) before it is dropped: keep units short, or make
    // them safe to cut off and fence their writes (examples/fenced_write.rs).
    while !term.is_cancelled() {
        n += 1;
        println!("unit {n} started");
        tokio::time::sleep(UNIT).await; // the job itself
        println!("unit {n} done");
    }
    Ok(())
}
