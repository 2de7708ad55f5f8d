//! noleader 0.1.3's example program on leaseholder: the crate path is the
//! only change to its code. Two lines are added so it can run unattended:
//! the server address comes from `NATS_URL` (default `localhost:4222`, as
//! in noleader's example), and the program stops after a few seconds,
//! releasing the lease on the way out.
//!
//! ```sh
//! NATS_URL=localhost:4222 cargo run -p leaseholder-examples --example noleader_compat
//! ```
//!
//! Needs nats-server 2.11 or newer with JetStream (`nats-server -js`).

use leaseholder::noleader::Leader;
use tracing_subscriber::EnvFilter;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::from_default_env()
                .add_directive("leaseholder=debug".parse()?)
                .add_directive("info".parse()?),
        )
        .init();

    let mybucket = "mytestbucket";
    let mykey = "basic";
    // Added: the address from NATS_URL.
    let url = std::env::var("NATS_URL").unwrap_or_else(|_| "localhost:4222".into());
    let client = async_nats::connect(url).await?;
    let leader = Leader::new_nats(mykey, mybucket, client);
    let leader_id = leader.leader_id().await.to_string();

    tracing::info!("creating bucket");
    leader.create_bucket().await?;

    let run = leader.acquire_and_run({
        move |token| {
            let leader_id = leader_id.clone();
            async move {
                loop {
                    if token.is_cancelled() {
                        return Ok(());
                    }
                    tracing::info!(leader_id, "do work as leader");
                    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                }
            }
        }
    });

    // Added: stop after 3 s, releasing the lease.
    tokio::select! {
        result = run => result?,
        () = tokio::time::sleep(std::time::Duration::from_secs(3)) => {
            leader.inner().shutdown().await?;
            tracing::info!("stopped after 3 s");
        }
    }
    Ok(())
}
