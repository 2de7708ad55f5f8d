//! Three processes on one host elect a scheduler among themselves, with
//! nothing else running: each process is a member of a peer group (a Raft
//! group over TCP, the crate `leaseholder-raft`) and a candidate for the
//! `scheduler` key on the group's backend.
//!
//! Run three copies, each in its own terminal:
//!
//! ```sh
//! PEER_ID=1 cargo run -p leaseholder-examples --example peer_group
//! PEER_ID=2 cargo run -p leaseholder-examples --example peer_group
//! PEER_ID=3 cargo run -p leaseholder-examples --example peer_group
//! ```
//!
//! Each prints `member N of 3 on ADDR`; once two of them run, the group
//! has a quorum and one copy prints `leading with fencing token T`, then
//! `job N` every half second; the others wait. Stop the leader with
//! Ctrl-C (or SIGTERM): it releases the lease and another copy prints
//! `leading with fencing token` with a larger token a few milliseconds
//! later. Kill it with SIGKILL instead and another leads about a ttl (2 s)
//! later. With only one copy left the group has no quorum and nobody leads
//! (safety over liveness) until a second copy is back.
//!
//! `PEERS` names the members (default
//! `1=127.0.0.1:7101,2=127.0.0.1:7102,3=127.0.0.1:7103`); each keeps its
//! Raft log in `PEER_GROUP_DIR/m<id>` (default: `leaseholder-peer-group`
//! under the system's temp dir), fsynced, so a copy that restarts rejoins
//! with its log and tokens keep rising. Start from empty directories to
//! form a new group.

use std::time::Duration;

use anyhow::Context;
use leaseholder::Leader;
use leaseholder_raft::PeerGroup;
use tokio::signal::unix::{SignalKind, signal};

const TTL: Duration = Duration::from_secs(2);
const DEFAULT_PEERS: &str = "1=127.0.0.1:7101,2=127.0.0.1:7102,3=127.0.0.1:7103";

#[tokio::main]
async fn main() {
    if let Err(e) = run().await {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

async fn run() -> anyhow::Result<()> {
    let id: u64 = std::env::var("PEER_ID")
        .context("set PEER_ID to this copy's member id (1, 2 or 3)")?
        .parse()
        .context("PEER_ID must be a number")?;
    let peers = leaseholder_raft::parse_members(
        &std::env::var("PEERS").unwrap_or_else(|_| DEFAULT_PEERS.into()),
    )
    .context("PEERS")?;
    let addr = peers
        .iter()
        .find(|(peer, _)| *peer == id)
        .map(|(_, addr)| addr.clone())
        .with_context(|| format!("PEER_ID {id} is not one of the PEERS"))?;
    let dir = std::env::var_os("PEER_GROUP_DIR")
        .map_or_else(
            || std::env::temp_dir().join("leaseholder-peer-group"),
            Into::into,
        )
        .join(format!("m{id}"));

    let group = PeerGroup::builder()
        .node_id(id)
        .peers(peers.clone())
        .tcp(addr.clone())
        .data_dir(&dir)
        .start()
        .await?;
    println!("member {id} of {} on {addr}", peers.len());

    let leader = Leader::builder("scheduler")
        .backend(group.backend())
        .ttl(TTL)
        .metadata(format!("member {id}"))
        .build()?;
    let campaign = tokio::spawn({
        let leader = leader.clone();
        async move {
            leader
                .acquire_and_run(|term| async move {
                    println!("leading with fencing token {}", term.fencing_token());
                    let mut jobs = tokio::time::interval(Duration::from_millis(500));
                    let mut n = 0u64;
                    loop {
                        tokio::select! {
                            _ = jobs.tick() => {
                                n += 1;
                                println!("job {n}");
                            }
                            () = term.cancelled() => break,
                        }
                    }
                    println!("term ended");
                    Ok::<_, std::io::Error>(())
                })
                .await
        }
    });

    let mut term = signal(SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    println!("stopping: releasing the lease");
    leader.shutdown().await?;
    campaign.await??;
    group.shutdown().await;
    println!("stopped");
    Ok(())
}
