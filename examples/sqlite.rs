//! Several processes on one host elect one leader on a SQLite file, with
//! no server, and the leader leads until Ctrl-C.
//!
//! Start two or more in separate terminals with the same file, and stop the
//! leader with Ctrl-C (it releases: another takes over within one poll of
//! the file, about 20 ms) or kill it (another takes over when its lease
//! expires, within one ttl):
//!
//! ```sh
//! LEASES_DB=/tmp/leases.db cargo run -p leaseholder-examples --example sqlite
//! ```
//!
//! The file and the table `leaseholder_leases` are created if missing. The
//! file must be on a local filesystem (not NFS), and every process must
//! run on this host.

use std::time::Duration;

use leaseholder::{Backend, Leader, SqliteBackend};

#[tokio::main]
async fn main() {
    if let Err(e) = run().await {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

async fn run() -> anyhow::Result<()> {
    let path = std::env::var("LEASES_DB").unwrap_or_else(|_| "/tmp/leaseholder-example.db".into());
    let db = SqliteBackend::builder().path(&path).build()?;
    let leader = Leader::builder("example")
        .backend(Backend::sqlite(db))
        .ttl(Duration::from_secs(5))
        .metadata(format!("pid {}", std::process::id()))
        .build()?;
    // Creates the file and the table, or says what is wrong with them (a
    // directory that does not exist, a file that is not a database).
    if let Err(e) = leader.setup().await {
        anyhow::bail!("SQLite file {path}: {} (set LEASES_DB)", chain(&e));
    }
    println!("candidate {} campaigning on {path}", leader.leader_id());

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
