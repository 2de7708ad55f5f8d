//! Known issue, kept as an ignored test to reproduce it: on SQLite with the
//! candidate registry on, a follower that starts while a leader holds the
//! key holds off for that leader (the registry ranks it first) and never
//! learns that it leads. Each poll of the file wakes the follower with a
//! `Resync`, and it holds off anew; the leader renews on each wake-up
//! (every ~20 ms, the poll interval), which keeps the file changing. Seen
//! on main at 9a46b57 too. Run with `--run-ignored only`.
#![cfg(feature = "sqlite")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use leaseholder::{Backend, Leader, SqliteBackend, State};
use leaseholder_testkit::TempDir;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "known issue: the registry's hold-off never ends on SQLite's polling watch"]
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
