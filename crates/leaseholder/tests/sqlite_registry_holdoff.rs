//! A regression test: on SQLite with the candidate registry on, a follower
//! that started while a leader held the key held off for that leader (the
//! registry ranked it first) and never learned that it led: each poll of
//! the file woke it with a `Resync` and it held off anew, while the
//! leader's registry traffic kept the file changing. Seen at 9a46b57; it
//! now learns the leader within the hold-off and one poll.
#![cfg(feature = "sqlite")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use leaseholder::{Backend, Leader, SqliteBackend, State};
use leaseholder_testkit::TempDir;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registered_follower_on_sqlite_sees_the_leader() {
    let dir = TempDir::new("sqlite-registry-holdoff").unwrap();
    let path = dir.path().join("leases.db");
    let candidate = || {
        Leader::builder("k")
            .backend(Backend::sqlite(
                SqliteBackend::builder().path(&path).build().unwrap(),
            ))
            .ttl(Duration::from_secs(2))
            .registry(true)
            .build()
            .unwrap()
    };
    let a = candidate();
    let run_a = a.clone();
    let task_a = tokio::spawn(async move { run_a.start(Default::default()).await });
    a.state().wait_for(State::is_leader).await.unwrap();
    let b = candidate();
    let run_b = b.clone();
    let task_b = tokio::spawn(async move { run_b.start(Default::default()).await });
    let id = a.leader_id();
    let mut state = b.state();
    let seen = tokio::time::timeout(
        Duration::from_secs(5),
        state.wait_for(
            |s| matches!(s, State::Follower { leader: Some(h), .. } if h.id() == Some(id)),
        ),
    )
    .await
    .is_ok();
    assert!(seen, "b: {:?}", *b.state().borrow());
    a.shutdown().await.unwrap();
    b.shutdown().await.unwrap();
    let _ = (task_a.await, task_b.await);
}
