//! The epoch wait of a fresh etcd cluster, paid before a run starts.
//!
//! On a cluster with no epoch marker, the first acquire writes it (and the
//! `fresh` marker, bound to a lease of its own ttl), and no acquire
//! succeeds until the fresh marker has expired: the backend cannot tell a
//! new cluster from one that lost its data under a running fleet (see
//! leaseholder's etcd module docs). That is paid once per cluster and
//! prefix, not per key or per election, so the bench and the chaos
//! harness pay it before they start, on a throwaway key, and what they
//! time or check is a cluster whose marker is already settled. Included by
//! both binaries (`#[path]`).

use std::time::Duration;

use anyhow::Context as _;
use leaseholder::{Backend, EtcdBackend, Leader};
use tokio::time::Instant;

/// Campaigns on a throwaway key through `backend` (ttl `ttl`) until it
/// leads, then shuts down (releasing the key). Returns how long that
/// took: about one ttl on a fresh cluster, an acquire's time on a settled
/// one.
pub(crate) async fn settle(
    backend: EtcdBackend,
    ttl: Duration,
    patience: Duration,
) -> anyhow::Result<Duration> {
    let started = Instant::now();
    let leader = Leader::builder(format!("epoch-{}", uuid::Uuid::now_v7().simple()))
        .backend(Backend::etcd(backend))
        .ttl(ttl)
        .build()?;
    leader.setup().await.context("etcd setup")?;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<()>();
    let task = tokio::spawn({
        let leader = leader.clone();
        async move {
            leader
                .acquire_and_run(|term| {
                    let tx = tx.clone();
                    async move {
                        let _ = tx.send(());
                        term.cancelled().await;
                        Ok::<_, std::convert::Infallible>(())
                    }
                })
                .await
        }
    });
    let led = tokio::time::timeout(patience, rx.recv()).await;
    let _ = tokio::time::timeout(Duration::from_secs(10), leader.shutdown()).await;
    task.abort();
    led.ok()
        .flatten()
        .with_context(|| format!("no acquire on etcd succeeded within {patience:?}"))?;
    Ok(started.elapsed())
}
