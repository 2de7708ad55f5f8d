//! Campaigns for a key on NATS JetStream KV and leads until Ctrl-C.
//!
//! Run two or more at once against one server, and stop the leader with
//! Ctrl-C (it releases: another takes over at once) or kill it (another
//! takes over when its lease expires):
//!
//! ```sh
//! NATS_URL=localhost:4222 cargo run -p leaseholder-examples --example nats
//! ```
//!
//! Needs nats-server 2.11 or newer with JetStream (`nats-server -js`).

use std::time::Duration;

use leaseholder::{Backend, Leader};

#[tokio::main]
async fn main() {
    if let Err(e) = run().await {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

async fn run() -> anyhow::Result<()> {
    let url = std::env::var("NATS_URL").unwrap_or_else(|_| "localhost:4222".into());
    let client = match tokio::time::timeout(Duration::from_secs(5), async_nats::connect(&url)).await
    {
        Ok(Ok(client)) => client,
        Ok(Err(e)) => anyhow::bail!(
            "cannot connect to NATS at {url}: {e} (start `nats-server -js` or set NATS_URL)"
        ),
        Err(_) => anyhow::bail!(
            "no NATS server answered at {url} within 5 s (start `nats-server -js` or set NATS_URL)"
        ),
    };
    let leader = Leader::builder("example")
        .backend(Backend::nats(client, "leaseholder_example"))
        .ttl(Duration::from_secs(10))
        .metadata(format!("pid {}", std::process::id()))
        .build()?;
    // Fail fast on an old server or a misconfigured bucket.
    leader.setup().await?;
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
