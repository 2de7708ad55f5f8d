//! The `peer_group` example as three OS processes on loopback with nothing
//! else running: they form a Raft group over TCP and one leads the
//! scheduler; SIGTERM hands over at once, with a larger token; with the
//! next leader killed (SIGKILL) one copy is left, without a quorum, and
//! nobody leads; a copy restarted on its data directory brings the quorum
//! back, and the token keeps rising.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use leaseholder_testkit::{TempDir, free_port};
use tokio::time::{Instant, timeout};

mod support;
use support::*;

/// The example's ttl.
const TTL: Duration = Duration::from_secs(2);

fn leading(line: &Line) -> bool {
    line.text.starts_with("leading with fencing token ")
}

fn token_of(line: &Line) -> u64 {
    line.text
        .strip_prefix("leading with fencing token ")
        .unwrap()
        .parse()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_processes_elect_a_scheduler_hand_over_and_need_a_quorum() {
    let dir = TempDir::new("leaseholder-peer-group-example").unwrap();
    let peers: Vec<String> = (1..=3)
        .map(|id| format!("{id}=127.0.0.1:{}", free_port().unwrap()))
        .collect();
    let peers = peers.join(",");
    let data = dir.path().to_str().unwrap().to_owned();
    let mut copies = Copies::new();
    // Copy i (0, 1, 2) is member i + 1; a restarted member is a new copy.
    let spawn = |copies: &mut Copies, id: u64| {
        let id = id.to_string();
        copies.spawn(
            "peer_group",
            &[
                ("PEER_ID", id.as_str()),
                ("PEERS", peers.as_str()),
                ("PEER_GROUP_DIR", data.as_str()),
            ],
        )
    };
    for id in 1..=3 {
        spawn(&mut copies, id);
    }
    let member = |copy: usize, restarted: &[(usize, u64)]| {
        restarted
            .iter()
            .find(|(c, _)| *c == copy)
            .map_or(copy as u64 + 1, |(_, id)| *id)
    };

    let first = copies.until("a leader", leading).await;
    let t1 = token_of(&first);
    println!("member {} leads with token {t1}", first.copy + 1);

    // Graceful: SIGTERM releases the lease, another copy leads at once.
    let stop = Instant::now();
    copies.procs[first.copy].terminate().unwrap();
    let second = copies
        .until("the next leader", |l| leading(l) && l.at > first.at)
        .await;
    let t2 = token_of(&second);
    assert_ne!(second.copy, first.copy);
    assert!(t2 > t1, "token {t2} after {t1}");
    println!(
        "member {} leads with token {t2}, {:?} after the SIGTERM",
        second.copy + 1,
        second.at - stop
    );
    let status = timeout(LINE_WAIT, copies.procs[first.copy].wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "{status:?}: {:#?}", copies.texts());
    let ended = copies
        .until("the old leader's term end", |l| {
            l.copy == first.copy && l.text == "term ended"
        })
        .await;
    assert!(
        ended.at <= second.at,
        "the old term ended after the new one began: {:#?}",
        copies.texts()
    );

    // SIGKILL the new leader: one member of three is left, no quorum,
    // nobody leads (safety over liveness).
    copies.procs[second.copy].kill().await.unwrap();
    let killed = Instant::now();
    let after_kill =
        |l: &Line| leading(l) && l.at > second.at && l.copy != first.copy && l.copy != second.copy;
    let nobody = timeout(
        TTL * 3,
        copies.until("a leader without a quorum", after_kill),
    )
    .await;
    assert!(
        nobody.is_err(),
        "a copy led with one member of three: {:#?}",
        copies.texts()
    );

    // The first member comes back on its data directory: a quorum again.
    let back = spawn(&mut copies, first.copy as u64 + 1);
    let restarted = [(back, first.copy as u64 + 1)];
    let third = copies
        .until("a leader once the quorum is back", |l| {
            leading(l) && l.at > killed
        })
        .await;
    let t3 = token_of(&third);
    assert!(t3 > t2, "token {t3} after {t2}");
    println!(
        "member {} leads with token {t3} after member {} came back",
        member(third.copy, &restarted),
        first.copy + 1
    );
    for p in copies.procs.iter() {
        let _ = p.terminate();
    }
}
