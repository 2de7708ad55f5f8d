//! The public conformance suite against a 3-member group in one process:
//! every row of the lease contract, with the rows' clients spread over the
//! three members (calls on a follower are forwarded to the leader).

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use leaseholder::conformance::{self, Harness};
use leaseholder::{Backend, BoxError, Key};
use leaseholder_raft::{LocalNet, PeerGroup};
use leaseholder_testkit::TempDir;

struct Group {
    _net: Arc<LocalNet>,
    _dir: Option<TempDir>,
    members: Vec<PeerGroup>,
    next: AtomicUsize,
}

/// `n` members, durable (each in its own data directory) or in memory.
async fn group(n: u64, durable: bool) -> Group {
    let net = LocalNet::new();
    let dir = durable
        .then(|| TempDir::new("leaseholder-raft-conformance").unwrap_or_else(|e| panic!("{e}")));
    let peers: Vec<(u64, String)> = (1..=n).map(|i| (i, format!("m{i}"))).collect();
    let mut members = Vec::new();
    for id in 1..=n {
        let builder = PeerGroup::builder()
            .node_id(id)
            .peers(peers.clone())
            .transport(net.transport(id));
        let builder = match &dir {
            Some(dir) => builder.data_dir(dir.path().join(format!("m{id}"))),
            None => builder.in_memory(),
        };
        let member = builder
            .start()
            .await
            .unwrap_or_else(|e| panic!("member {id}: {e}"));
        net.attach(&member);
        members.push(member);
    }
    for m in &members {
        m.wait_for_leader(Duration::from_secs(20))
            .await
            .unwrap_or_else(|e| panic!("member {}: {e}", m.id()));
    }
    Group {
        _net: net,
        _dir: dir,
        members,
        next: AtomicUsize::new(0),
    }
}

impl Harness for Group {
    async fn backend(&self) -> Backend {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.members.len();
        self.members[i].backend()
    }

    async fn put_foreign(&self, key: &Key, value: &[u8], ttl: Duration) -> Result<(), BoxError> {
        self.members[0].put_raw(key, value, ttl).await?;
        Ok(())
    }

    fn ttl(&self) -> Duration {
        Duration::from_millis(600)
    }

    fn expiry_slack(&self) -> Duration {
        Duration::from_millis(300)
    }
}

async fn passes(durable: bool) {
    let g = group(3, durable).await;
    support::age_for_the_rows(&g).await;
    let report = conformance::run(&g).await;
    println!("{report}");
    assert!(report.is_ok(), "{report}");
    assert!(
        report
            .unsupported
            .iter()
            .all(|(row, _)| row.contains("process")),
        "{report}"
    );
    assert_eq!(report.passed.len(), 21, "{report}");
    for m in &g.members {
        m.shutdown().await;
    }
}

/// Three members, each with its data directory (every write fsynced).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_three_member_durable_group_passes_the_contract() {
    passes(true).await;
}

/// Three members with their logs in memory.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_three_member_group_in_memory_passes_the_contract() {
    passes(false).await;
}
