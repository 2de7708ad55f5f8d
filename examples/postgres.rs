//! Campaigns for a key on PostgreSQL and leads until Ctrl-C.
//!
//! Run two or more at once against one database, and stop the leader with
//! Ctrl-C (it releases: another takes over at once, through LISTEN/NOTIFY)
//! or kill it (another takes over when its lease expires):
//!
//! ```sh
//! DATABASE_URL=postgres://postgres@localhost/postgres \
//!     cargo run -p leaseholder-examples --example postgres
//! ```
//!
//! The table `public.leaseholder_leases` is created if it is missing.

use std::time::Duration;

use leaseholder::{Backend, Leader, PostgresBackend};

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
    let pg = PostgresBackend::builder().url(&url).build()?;
    let leader = Leader::builder("example")
        .backend(Backend::postgres(pg))
        .ttl(Duration::from_secs(10))
        .metadata(format!("pid {}", std::process::id()))
        .build()?;
    // Creates the table, or says what is wrong; fails fast when nothing
    // answers rather than retrying forever.
    match tokio::time::timeout(Duration::from_secs(5), leader.setup()).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => anyhow::bail!(
            "PostgreSQL at {url}: {} (start PostgreSQL or set DATABASE_URL)",
            chain(&e)
        ),
        Err(_) => anyhow::bail!(
            "no PostgreSQL answered at {url} within 5 s (start PostgreSQL or set DATABASE_URL)"
        ),
    }
    println!("candidate {} campaigning on {url}", leader.leader_id());

    let stopper = leader.clone();
    tokio::spawn(async move {
        let _ = tokio::signal::ctrl_c().await;
        println!("Ctrl-C: draining and releasing");
        let _ = stopper.shutdown().await;
    });

    leader
        .acquire_and_run(|term| async move {
            println!("leading with fencing token {}", term.fencing_token());
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            while !term.is_cancelled() {
                tokio::select! {
                    _ = tick.tick() => println!("  working (token {})", term.fencing_token()),
                    () = term.cancelled() => {}
                }
            }
            println!("leadership ended");
            Ok::<_, anyhow::Error>(())
        })
        .await?;
    Ok(())
}

/// An error and its causes on one line.
fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
