//! Candidates elect one leader on etcd, and the leader leads until Ctrl-C.
//!
//! Start two or more in separate terminals against the same cluster, and
//! stop the leader with Ctrl-C (it releases: another takes over within a
//! few milliseconds, told by its watch) or kill it (another takes over when
//! its lease expires, within about one ttl):
//!
//! ```sh
//! etcd --data-dir "$(mktemp -d)" &
//! ETCD_URL=etcd://127.0.0.1:2379 cargo run -p leaseholder-examples --example etcd
//! ```
//!
//! `ETCD_URL` may name several members of a cluster,
//! `etcd://10.0.0.1:2379,10.0.0.2:2379,10.0.0.3:2379`, and a key prefix
//! after them, `etcd://127.0.0.1:2379/billing` (default `example`).
//!
//! On a new cluster the first candidate writes the epoch marker, and every
//! candidate then waits one ttl before it may lead (a cluster re-created
//! under a running fleet must not let anyone lead while an old leader may
//! still think it does).

use std::time::Duration;

use leaseholder::{Backend, EtcdBackend, Leader};

#[tokio::main]
async fn main() {
    if let Err(e) = run().await {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

async fn run() -> anyhow::Result<()> {
    let url = std::env::var("ETCD_URL").unwrap_or_else(|_| "etcd://127.0.0.1:2379".into());
    // A prefix in the URL replaces this one.
    let etcd = EtcdBackend::builder().prefix("example").url(&url).build()?;
    let leader = Leader::builder("example")
        .backend(Backend::etcd(etcd))
        // etcd leases have whole-second ttls.
        .ttl(Duration::from_secs(5))
        .metadata(format!("pid {}", std::process::id()))
        .build()?;
    // Checks the server (reachable, etcd 3.4 or newer).
    if let Err(e) = leader.setup().await {
        anyhow::bail!("etcd at {url}: {} (set ETCD_URL)", chain(&e));
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
