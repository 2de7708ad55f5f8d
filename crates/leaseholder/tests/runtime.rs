//! Real time, multi-thread runtime: work runs on other worker threads than
//! the campaigns. Three candidates hand over (resign) and fail over (a
//! crash); every work interval is logged and checked: none overlap, tokens
//! increase.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::{Arc, Mutex};
use std::time::Duration;

use leaseholder::{Backend, FencingToken, Leader, MemoryStore, State};
use tokio::time::timeout;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Event {
    Start(usize, FencingToken),
    Stop(usize),
}

type Log = Arc<Mutex<Vec<Event>>>;

/// Logs `Stop` when the work ends, however it ends (returned or dropped).
struct StopGuard(Log, usize);

impl Drop for StopGuard {
    fn drop(&mut self) {
        self.0.lock().unwrap().push(Event::Stop(self.1));
    }
}

fn check(log: &[Event]) {
    let mut running: Option<usize> = None;
    let mut last = None;
    for e in log {
        match *e {
            Event::Start(c, token) => {
                assert!(
                    running.is_none(),
                    "{c} started while {running:?} ran: {log:?}"
                );
                assert!(
                    last.is_none_or(|t| token > t),
                    "token {token} not increasing: {log:?}"
                );
                running = Some(c);
                last = Some(token);
            }
            Event::Stop(c) => {
                assert_eq!(running, Some(c), "{log:?}");
                running = None;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn handoff_and_failover_on_the_multi_thread_runtime() {
    let ttl = Duration::from_millis(600);
    let store = MemoryStore::new();
    let log: Log = Arc::default();
    let mut leaders = Vec::new();
    let mut faults = Vec::new();
    let mut tasks = Vec::new();
    let (started_tx, mut started) = tokio::sync::mpsc::unbounded_channel();
    for c in 0..3 {
        let started_tx = started_tx.clone();
        let edge = store.backend();
        faults.push(edge.faults());
        let leader = Leader::builder("rt")
            .backend(Backend::new(edge))
            .ttl(ttl)
            .build()
            .unwrap();
        let log = log.clone();
        tasks.push(tokio::spawn({
            let leader = leader.clone();
            async move {
                leader
                    .acquire_and_run(move |term| {
                        let log = log.clone();
                        let started_tx = started_tx.clone();
                        async move {
                            log.lock()
                                .unwrap()
                                .push(Event::Start(c, term.fencing_token()));
                            started_tx.send(c).unwrap();
                            let _stop = StopGuard(log, c);
                            while !term.is_cancelled() {
                                // Busy leader-only work with await points.
                                tokio::select! {
                                    () = tokio::time::sleep(Duration::from_millis(3)) => {}
                                    () = term.cancelled() => {}
                                }
                            }
                            Ok::<_, std::io::Error>(())
                        }
                    })
                    .await
            }
        }));
        leaders.push(leader);
    }
    let mut next = async || {
        timeout(Duration::from_secs(10), started.recv())
            .await
            .unwrap()
            .unwrap()
    };
    let first = next().await;
    // Handoff.
    leaders[first].resign().await.unwrap();
    let second = next().await;
    assert_ne!(second, first);
    // Crash: cut its link and drop its task; nothing is released.
    faults[second].partition();
    tasks[second].abort();
    let third = next().await;
    assert_ne!(third, second);
    for (i, l) in leaders.iter().enumerate() {
        if i != second {
            l.shutdown().await.unwrap();
        }
    }
    for (i, t) in tasks.into_iter().enumerate() {
        if i != second {
            t.await.unwrap().unwrap();
        }
    }
    let log = log.lock().unwrap().clone();
    assert!(log.len() >= 5, "{log:?}");
    check(&log);
    assert!(matches!(*leaders[third].state().borrow(), State::Stopped));
}
