#![allow(clippy::unwrap_used, clippy::expect_used)]
use std::time::Duration;

use leaseholder::{Backend, Leader, MemoryStore, State};

fn leader(store: &MemoryStore) -> Leader {
    Leader::builder("k")
        .backend(Backend::memory(store))
        .ttl(Duration::from_secs(3))
        .build()
        .unwrap()
}

#[tokio::test(start_paused = true)]
async fn one_leads_then_hands_over() {
    let store = MemoryStore::new();
    let a = leader(&store);
    let b = leader(&store);
    let ta = tokio::spawn({
        let a = a.clone();
        async move { a.start(Default::default()).await }
    });
    let mut sa = a.state();
    tokio::time::timeout(Duration::from_secs(5), sa.wait_for(State::is_leader))
        .await
        .unwrap()
        .unwrap();
    let tb = tokio::spawn({
        let b = b.clone();
        async move { b.start(Default::default()).await }
    });
    let mut sb = b.state();
    tokio::time::timeout(
        Duration::from_secs(5),
        sb.wait_for(|s| {
            matches!(
                s,
                State::Follower {
                    leader: Some(_),
                    ..
                }
            )
        }),
    )
    .await
    .unwrap()
    .unwrap();
    let t0 = tokio::time::Instant::now();
    a.resign().await.unwrap();
    tokio::time::timeout(Duration::from_secs(5), sb.wait_for(State::is_leader))
        .await
        .unwrap()
        .unwrap();
    println!("handoff took {:?}", t0.elapsed());
    assert!(t0.elapsed() < Duration::from_millis(50));
    a.shutdown().await.unwrap();
    b.shutdown().await.unwrap();
    ta.await.unwrap().unwrap();
    tb.await.unwrap().unwrap();
}
