//! Helpers shared by the real-server test files (`mod support;`).
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use leaseholder::{Error, Leader, State};
use leaseholder_testkit::WorkLog;
use tokio::task::JoinHandle;
use tokio::time::timeout;

/// Runs `acquire_and_run` on `l` with work that records its interval in
/// `log` as `who`, reports each term, and waits for its token.
pub(crate) fn run_reporting_terms(
    l: &Leader,
    who: &str,
    log: &WorkLog,
) -> (
    tokio::task::JoinHandle<Result<(), Error>>,
    tokio::sync::mpsc::UnboundedReceiver<leaseholder::Term>,
) {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let (l, who, log) = (l.clone(), who.to_owned(), log.clone());
    let task = tokio::spawn(async move {
        l.acquire_and_run(move |term| {
            let (tx, who, log) = (tx.clone(), who.clone(), log.clone());
            async move {
                let _working = log.begin(who, term.fencing_token().get());
                // The test may not be listening.
                let _ = tx.send(term.clone());
                term.cancelled().await;
                Ok::<_, std::io::Error>(())
            }
        })
        .await
    });
    (task, rx)
}

/// Waits until some leader of `leaders` leads; its index.
pub(crate) async fn wait_any_leader(leaders: &[&Leader]) -> usize {
    let mut states: Vec<_> = leaders.iter().map(|l| l.state()).collect();
    loop {
        if let Some(i) = states.iter().position(|s| s.borrow().is_leader()) {
            return i;
        }
        let changes = states.iter_mut().map(|s| Box::pin(s.changed()));
        let _ = futures_util::future::select_all(changes).await;
    }
}

/// How long the helpers wait for a state.
const WAIT: Duration = Duration::from_secs(30);

/// Shuts `l` down and joins its `acquire_and_run` task.
pub(crate) async fn stop(l: &Leader, task: JoinHandle<Result<(), Error>>) {
    timeout(WAIT, l.shutdown())
        .await
        .expect("shutdown within 30 s")
        .unwrap();
    timeout(WAIT, task)
        .await
        .expect("the campaign ends after shutdown")
        .unwrap()
        .unwrap();
}

/// Waits until `l` leads with `token`, or follows a leader with `token`.
pub(crate) async fn wait_sees(l: &Leader, token: u64) -> State {
    let mut state = l.state();
    timeout(
        WAIT,
        state.wait_for(|s| match s {
            State::Leader { token: t, .. } => t.get() == token,
            State::Follower {
                leader: Some(holder),
                ..
            } => holder.token().map(|t| t.get()) == Some(token),
            _ => false,
        }),
    )
    .await
    .unwrap_or_else(|_| {
        panic!(
            "no sight of term {token} within 30 s: {:?}",
            l.state().borrow()
        )
    })
    .unwrap()
    .clone()
}

/// Many leaders on one backend, for the batched-renewal tests: one per key,
/// each campaigning with [`Leader::start`] until [`Many::stop`].
pub(crate) struct Many {
    pub(crate) keys: Vec<leaseholder::Key>,
    pub(crate) leaders: Vec<Leader>,
    tasks: Vec<JoinHandle<Result<(), Error>>>,
}

impl Many {
    /// Starts `n` leaders on `backend` (keys `{prefix}-0000`, ...) and
    /// waits until every one leads.
    pub(crate) async fn lead(
        backend: &leaseholder::Backend,
        prefix: &str,
        n: usize,
        ttl: Duration,
    ) -> Many {
        let many = Many::start(backend, prefix, n, ttl);
        for l in &many.leaders {
            timeout(
                Duration::from_secs(60),
                l.state().wait_for(State::is_leader),
            )
            .await
            .expect("every key led within 60 s")
            .unwrap();
        }
        many
    }

    /// How many of them lead now.
    pub(crate) fn leading(&self) -> usize {
        self.leaders
            .iter()
            .filter(|l| l.state().borrow().is_leader())
            .count()
    }

    /// Starts `n` leaders on `backend` (keys `{prefix}-0000`, ...).
    pub(crate) fn start(
        backend: &leaseholder::Backend,
        prefix: &str,
        n: usize,
        ttl: Duration,
    ) -> Many {
        let keys: Vec<leaseholder::Key> = (0..n)
            .map(|i| leaseholder::Key::new(format!("{prefix}-{i:04}")).unwrap())
            .collect();
        let leaders: Vec<Leader> = keys
            .iter()
            .map(|k| {
                Leader::builder(k.as_str())
                    .backend(backend.clone())
                    .ttl(ttl)
                    .build()
                    .unwrap()
            })
            .collect();
        let tasks = leaders
            .iter()
            .map(|l| {
                let l = l.clone();
                tokio::spawn(async move { l.start(Default::default()).await })
            })
            .collect();
        Many {
            keys,
            leaders,
            tasks,
        }
    }

    /// Each leader's fencing token.
    pub(crate) fn tokens(&self) -> Vec<Option<leaseholder::FencingToken>> {
        self.leaders.iter().map(Leader::fencing_token).collect()
    }

    /// Each key's revision in the store (every renewal moves it by one).
    pub(crate) async fn revisions(&self, backend: &leaseholder::Backend) -> Vec<u64> {
        let mut out = Vec::with_capacity(self.keys.len());
        for k in &self.keys {
            let holder = backend.holder(k).await.unwrap();
            out.push(holder.map_or(0, |h| h.revision()));
        }
        out
    }

    /// Waits (reading the store every 200 ms, at most 60 s) until every
    /// key has been renewed at least `times` more since `from`; returns
    /// the revisions then.
    pub(crate) async fn wait_renewed(
        &self,
        backend: &leaseholder::Backend,
        from: &[u64],
        times: u64,
    ) -> Vec<u64> {
        timeout(Duration::from_secs(60), async {
            loop {
                let now = self.revisions(backend).await;
                if now.iter().zip(from).all(|(n, f)| *n >= f + times) {
                    return now;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        })
        .await
        .expect("every key renewed within 60 s")
    }

    /// Shuts every leader down; each campaign ends `Ok`.
    pub(crate) async fn stop(self) {
        for l in &self.leaders {
            l.shutdown().await.unwrap();
        }
        for t in self.tasks {
            t.await.unwrap().unwrap();
        }
    }
}
