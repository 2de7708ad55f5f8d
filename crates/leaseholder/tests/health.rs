//! The health hook: it turns unhealthy when the store has been unreachable
//! for longer than the ttl, or when work outlives its term's deadline, and
//! healthy again when that ends; `health()` and `health_watch()` agree.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use leaseholder::{Backend, Faults, Health, Leader, MemoryStore, State};
use tokio::sync::watch;
use tokio::time::{Instant, timeout};

const WAIT: Duration = Duration::from_secs(60);

fn candidate(store: &MemoryStore, ttl: Duration) -> (Leader, Faults) {
    let edge = store.backend();
    let faults = edge.faults();
    let leader = Leader::builder("job")
        .backend(Backend::new(edge))
        .ttl(ttl)
        .build()
        .unwrap();
    (leader, faults)
}

async fn wait_health(h: &mut watch::Receiver<Health>, what: impl FnMut(&Health) -> bool) -> Health {
    timeout(WAIT, h.wait_for(what))
        .await
        .expect("health not reached in time")
        .unwrap()
        .clone()
}

#[tokio::test(start_paused = true)]
async fn a_store_unreachable_for_longer_than_the_ttl_turns_unhealthy_until_it_is_back() {
    let store = MemoryStore::new();
    let ttl = Duration::from_secs(3);
    let (a, faults) = candidate(&store, ttl);
    let mut health = a.health_watch();
    let task = tokio::spawn({
        let a = a.clone();
        async move { a.start(Default::default()).await }
    });
    timeout(WAIT, a.state().wait_for(State::is_leader))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(a.health(), Health::Healthy);

    faults.partition();
    let mut state = a.state();
    let since = match timeout(WAIT, state.wait_for(|s| matches!(s, State::Unknown { .. })))
        .await
        .unwrap()
        .unwrap()
        .clone()
    {
        State::Unknown { since, .. } => since,
        _ => unreachable!(),
    };
    // Unknown, but for less than a ttl: still healthy.
    assert_eq!(a.health(), Health::Healthy);
    let flipped = wait_health(&mut health, |h| !h.is_healthy()).await;
    assert_eq!(flipped, Health::StoreUnreachable { since });
    let at = Instant::now();
    assert!(at >= since + ttl, "flipped {:?} after Unknown", at - since);
    assert!(
        at <= since + ttl + Duration::from_millis(10),
        "{:?}",
        at - since
    );
    assert_eq!(a.health(), flipped);
    println!("unhealthy {:?} after the store went away", at - since);

    faults.heal();
    wait_health(&mut health, Health::is_healthy).await;
    assert_eq!(a.health(), Health::Healthy);
    a.shutdown().await.unwrap();
    task.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn work_that_outlives_its_deadline_turns_unhealthy_until_it_stops() {
    let store = MemoryStore::new();
    let ttl = Duration::from_secs(1);
    let (a, faults) = candidate(&store, ttl);
    let mut health = a.health_watch();
    let release = Arc::new(AtomicBool::new(false));
    let (started_tx, started) = tokio::sync::oneshot::channel();
    let task = tokio::spawn({
        let (a, release) = (a.clone(), release.clone());
        let started_tx = std::sync::Mutex::new(Some(started_tx));
        async move {
            a.acquire_and_run(move |term| {
                let release = release.clone();
                let started_tx = started_tx.lock().unwrap().take();
                async move {
                    if let Some(tx) = started_tx {
                        let _ = tx.send(term.deadline());
                    }
                    // Work that never reaches an `.await`: it blocks its
                    // thread, so neither its token nor an abort can stop
                    // it. (Bounded, so the test cannot hang.)
                    let until = std::time::Instant::now() + Duration::from_secs(20);
                    while !release.load(Ordering::SeqCst) && std::time::Instant::now() < until {
                        std::thread::sleep(Duration::from_millis(5));
                    }
                    Ok::<_, std::io::Error>(())
                }
            })
            .await
        }
    });
    timeout(WAIT, started).await.unwrap().unwrap();
    // The leader can no longer renew: its deadline passes with the work
    // still blocking.
    faults.partition();
    let flipped = wait_health(&mut health, |h| matches!(h, Health::WorkOverran { .. })).await;
    let Health::WorkOverran { deadline } = flipped else {
        unreachable!()
    };
    let late = Instant::now().saturating_duration_since(deadline);
    println!("unhealthy {late:?} after the term's deadline");
    assert!(late >= a.config().drift_margin() / 2, "{late:?}");
    assert!(matches!(a.health(), Health::WorkOverran { .. }));

    // The work finally stops: no overrun any more (the store may by now
    // have been down for a ttl; healing it makes the leader healthy).
    release.store(true, Ordering::SeqCst);
    wait_health(&mut health, |h| !matches!(h, Health::WorkOverran { .. })).await;
    faults.heal();
    wait_health(&mut health, Health::is_healthy).await;
    a.shutdown().await.unwrap();
    let _ = timeout(WAIT, task).await.unwrap().unwrap();
}
