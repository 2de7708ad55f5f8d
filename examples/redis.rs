//! Candidates elect one leader on Redis, and the leader leads until Ctrl-C.
//!
//! Start two or more in separate terminals against the same server, and
//! stop the leader with Ctrl-C (it releases: another takes over within a
//! few milliseconds, told by pub/sub) or kill it (another takes over when
//! its lease expires, within one ttl):
//!
//! ```sh
//! redis-server --port 6379 --save '' --appendonly no &
//! REDIS_URL=redis://127.0.0.1:6379 cargo run -p leaseholder-examples --example redis
//! ```
//!
//! `REDIS_URL` may also name a Sentinel group,
//! `redis+sentinel://127.0.0.1:26379/mymaster`, or, with `REDIS_CLUSTER=1`,
//! a comma-separated list of Cluster nodes.

use std::time::Duration;

use leaseholder::{Backend, Leader, RedisBackend};

#[tokio::main]
async fn main() {
    if let Err(e) = run().await {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

async fn run() -> anyhow::Result<()> {
    let url = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let builder = if std::env::var("REDIS_CLUSTER").as_deref() == Ok("1") {
        RedisBackend::builder().cluster(url.split(','))
    } else {
        RedisBackend::builder().url(url.as_str())
    };
    let redis = builder.prefix("example").build()?;
    let leader = Leader::builder("example")
        .backend(Backend::redis(redis))
        .ttl(Duration::from_secs(5))
        .metadata(format!("pid {}", std::process::id()))
        .build()?;
    // Checks the server (version, eviction policy) and writes the epoch
    // marker of a fresh database.
    if let Err(e) = leader.setup().await {
        anyhow::bail!("Redis at {url}: {} (set REDIS_URL)", chain(&e));
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
