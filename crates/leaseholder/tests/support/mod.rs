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
