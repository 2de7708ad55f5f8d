//! The drop-in module keeps noleader 0.1.3's shapes: closures taking a
//! `CancellationToken` and returning `anyhow::Result<()>`, async getters.
#![cfg(feature = "noleader")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use leaseholder::noleader::{Leader, Status};
use leaseholder::{Backend, MemoryStore};
use tokio::time::timeout;
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(60);

#[tokio::test(start_paused = true)]
async fn start_and_do_while_leader_as_in_noleader() {
    let store = MemoryStore::new();
    let leader = Leader::new("election_key", Backend::memory(&store));
    leader.create_bucket().await.unwrap();
    let id: uuid::Uuid = leader.leader_id().await;
    assert_eq!(id, leader.inner().leader_id().as_uuid());
    assert_eq!(leader.is_leader().await, Status::Candidate);

    let stop = CancellationToken::new();
    let election = tokio::spawn({
        let leader = leader.clone();
        let stop = stop.clone();
        async move { leader.start(stop).await }
    });
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let work = tokio::spawn({
        let leader = leader.clone();
        async move {
            leader
                .do_while_leader(move |token: CancellationToken| {
                    let tx = tx.clone();
                    async move {
                        tx.send(()).unwrap();
                        token.cancelled().await;
                        Ok(())
                    }
                })
                .await
        }
    });
    timeout(WAIT, rx.recv()).await.unwrap().unwrap();
    assert_eq!(leader.is_leader().await, Status::Leader);
    stop.cancel();
    timeout(WAIT, election).await.unwrap().unwrap().unwrap();
    timeout(WAIT, work).await.unwrap().unwrap().unwrap();
    assert_eq!(leader.is_leader().await, Status::Candidate);
    let probe = Backend::memory(&store);
    let key = leaseholder::Key::new("election_key").unwrap();
    assert!(
        probe.holder(&key).await.unwrap().is_none(),
        "released on stop"
    );
}

#[tokio::test(start_paused = true)]
async fn acquire_and_run_returns_the_work_error() {
    let store = MemoryStore::new();
    let leader = Leader::new("election_key", Backend::memory(&store));
    let leader_id = leader.leader_id().await.to_string();
    let err = leader
        .acquire_and_run({
            move |token| {
                let leader_id = leader_id.clone();
                async move {
                    if token.is_cancelled() {
                        return Ok(());
                    }
                    anyhow::bail!("leader {leader_id} failed on purpose")
                }
            }
        })
        .await
        .unwrap_err();
    assert!(format!("{err:#}").contains("failed on purpose"), "{err:#}");
}

#[tokio::test(start_paused = true)]
async fn acquire_and_run_reruns_work_that_returns_ok_until_shutdown() {
    let store = MemoryStore::new();
    let leader = Leader::new("election_key", Backend::memory(&store));
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let run = tokio::spawn({
        let leader = leader.clone();
        async move {
            leader
                .acquire_and_run(move |_token| {
                    let tx = tx.clone();
                    async move {
                        tx.send(()).unwrap();
                        Ok(())
                    }
                })
                .await
        }
    });
    // noleader runs the work again and again while it may lead.
    for _ in 0..3 {
        timeout(WAIT, rx.recv()).await.unwrap().unwrap();
    }
    leader.inner().shutdown().await.unwrap();
    timeout(WAIT, run).await.unwrap().unwrap().unwrap();
}

#[tokio::test]
async fn invalid_key_is_an_error_not_a_panic() {
    let leader = Leader::new("", Backend::memory(&MemoryStore::new()));
    let err = leader.start(CancellationToken::new()).await.unwrap_err();
    assert!(err.to_string().contains("invalid configuration"), "{err:#}");
}
