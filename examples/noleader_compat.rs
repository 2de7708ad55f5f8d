//! noleader's README example, on leaseholder: only the crate path changed
//! (and, until the NATS backend lands, the in-memory store stands in for
//! `Leader::new_nats(key, bucket, client)`).
//!
//! Run: `cargo run -p leaseholder-examples --example noleader_compat`
//! (it stops by itself after a few seconds).

use leaseholder::noleader::Leader;
use tracing_subscriber::EnvFilter;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // Set up logging
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::from_default_env()
                .add_directive("leaseholder=debug".parse()?)
                .add_directive("info".parse()?),
        )
        .init();

    let key = "election_key";
    let store = leaseholder::MemoryStore::new();

    // Create a new leader election instance
    let leader = Leader::new(key, leaseholder::Backend::memory(&store));
    let leader_id = leader.leader_id().await.to_string();

    // Ensure the KV bucket exists
    leader.create_bucket().await?;

    // Attempts to acquire election loop, will call inner function if it
    // wins, if it loses it will retry over again.
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

    // Not in noleader's example: stop after a few seconds, releasing the
    // lease on the way out.
    tokio::select! {
        result = run => result?,
        () = tokio::time::sleep(std::time::Duration::from_secs(3)) => {
            leader.inner().shutdown().await?;
            tracing::info!("stopped after 3 s");
        }
    }
    Ok(())
}
