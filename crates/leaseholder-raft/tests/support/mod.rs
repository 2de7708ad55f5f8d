//! What the peer-group tests share: candidates whose work is logged on
//! the one process clock, and the check of that log.

#![allow(dead_code)]

use std::sync::{Arc, Mutex};
use std::time::Duration;

use leaseholder::Leader;
use leaseholder::conformance::Harness;
use leaseholder_raft::PeerGroup;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::{Instant, timeout};

#[derive(Clone, Copy, Debug)]
pub(crate) struct Work {
    pub(crate) who: usize,
    pub(crate) token: u64,
    pub(crate) start: Instant,
    pub(crate) end: Option<Instant>,
}

#[derive(Debug)]
pub(crate) enum Ev {
    Started(usize, u64),
    Ended(usize, u64),
}

pub(crate) struct Log {
    ttl: Duration,
    work: Arc<Mutex<Vec<Work>>>,
    tx: mpsc::UnboundedSender<Ev>,
    rx: mpsc::UnboundedReceiver<Ev>,
}

impl Log {
    /// A log whose candidates campaign with `ttl`.
    pub(crate) fn new(ttl: Duration) -> Log {
        let (tx, rx) = mpsc::unbounded_channel();
        Log {
            ttl,
            work: Arc::new(Mutex::new(Vec::new())),
            tx,
            rx,
        }
    }

    /// Starts candidate `who` on `member`'s backend.
    pub(crate) fn candidate(&self, who: usize, member: &PeerGroup) -> (Leader, JoinHandle<()>) {
        let leader = Leader::builder("job")
            .backend(member.backend())
            .ttl(self.ttl)
            .build()
            .unwrap_or_else(|e| panic!("build: {e}"));
        let work = self.work.clone();
        let tx = self.tx.clone();
        let task = tokio::spawn({
            let leader = leader.clone();
            async move {
                let _ = leader
                    .acquire_and_run(move |term| {
                        let work = work.clone();
                        let tx = tx.clone();
                        async move {
                            let token = term.fencing_token().get();
                            let i = {
                                let mut w = work.lock().unwrap_or_else(|p| p.into_inner());
                                w.push(Work {
                                    who,
                                    token,
                                    start: Instant::now(),
                                    end: None,
                                });
                                w.len() - 1
                            };
                            let _ = tx.send(Ev::Started(who, token));
                            term.cancelled().await;
                            work.lock().unwrap_or_else(|p| p.into_inner())[i].end =
                                Some(Instant::now());
                            let _ = tx.send(Ev::Ended(who, token));
                            Ok::<_, std::io::Error>(())
                        }
                    })
                    .await;
            }
        });
        (leader, task)
    }

    pub(crate) async fn next(&mut self, within: Duration) -> Option<Ev> {
        timeout(within, self.rx.recv()).await.ok().flatten()
    }

    pub(crate) async fn started(&mut self, within: Duration) -> (usize, u64) {
        let deadline = Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.next(left).await {
                Some(Ev::Started(who, token)) => return (who, token),
                Some(Ev::Ended(..)) => continue,
                None => panic!("no term started within {within:?}"),
            }
        }
    }

    pub(crate) async fn ended(&mut self, within: Duration) -> (usize, u64) {
        match self.next(within).await {
            Some(Ev::Ended(who, token)) => (who, token),
            other => panic!("expected a term to end within {within:?}, got {other:?}"),
        }
    }

    /// No two terms' work overlaps (one process, one clock: not at all),
    /// and tokens rise in the order the terms began.
    pub(crate) fn check(&self) {
        let mut work = self.work.lock().unwrap_or_else(|p| p.into_inner()).clone();
        work.sort_by_key(|w| w.start);
        for pair in work.windows(2) {
            let (a, b) = (pair[0], pair[1]);
            let a_end = a
                .end
                .unwrap_or_else(|| panic!("{a:?} still runs while {b:?} started"));
            assert!(
                a_end <= b.start,
                "overlap: candidate {} and {}: {a:?} and {b:?}",
                a.who,
                b.who
            );
            assert!(a.token < b.token, "tokens out of order: {a:?} then {b:?}");
        }
    }
}

/// Shuts the candidates down and waits for their tasks.
pub(crate) async fn stop(leaders: Vec<(Leader, JoinHandle<()>)>) {
    for (leader, task) in leaders {
        let _ = leader.shutdown().await;
        let _ = timeout(Duration::from_secs(10), task).await;
    }
}

/// Sets the group up and waits until it is older than the longest ttl the
/// conformance rows ask for (20 × the harness's, the registry rows'
/// lease): on a new group no acquire succeeds until it is a ttl old (the
/// group's own tests check that wait), which is not what the rows are
/// about.
pub(crate) async fn age_for_the_rows<H: Harness>(h: &H) {
    h.backend()
        .await
        .setup()
        .await
        .unwrap_or_else(|e| panic!("setup: {e}"));
    tokio::time::sleep(h.ttl() * 20 + Duration::from_millis(100)).await;
}
