//! Members linked by the built-in TCP transport on loopback, each with its
//! data directory: the conformance suite over TCP, and a member that
//! restarts on its port and directory rejoining the group (the others
//! dial it again).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use leaseholder::conformance::{self, Harness};
use leaseholder::{Backend, BoxError, Key, Leader};
use leaseholder_raft::PeerGroup;
use leaseholder_testkit::free_port;

struct TempDir(std::path::PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        TempDir(std::env::temp_dir().join(format!(
            "leaseholder-raft-tcp-{name}-{}-{nanos}",
            std::process::id()
        )))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

struct Tcp {
    dir: TempDir,
    peers: Vec<(u64, String)>,
    members: Vec<Option<PeerGroup>>,
    next: AtomicUsize,
}

impl Tcp {
    async fn new(n: u64, name: &str) -> Tcp {
        let peers: Vec<(u64, String)> = (1..=n)
            .map(|i| {
                let port = free_port().unwrap_or_else(|e| panic!("free port: {e}"));
                (i, format!("127.0.0.1:{port}"))
            })
            .collect();
        let mut tcp = Tcp {
            dir: TempDir::new(name),
            peers,
            members: Vec::new(),
            next: AtomicUsize::new(0),
        };
        for id in 1..=n {
            let m = tcp.start(id).await;
            tcp.members.push(Some(m));
        }
        for m in tcp.members.iter().flatten() {
            m.wait_for_leader(Duration::from_secs(20))
                .await
                .unwrap_or_else(|e| panic!("member {}: {e}", m.id()));
        }
        tcp
    }

    async fn start(&self, id: u64) -> PeerGroup {
        let addr = self
            .peers
            .iter()
            .find(|(i, _)| *i == id)
            .map(|(_, a)| a.clone())
            .unwrap_or_default();
        PeerGroup::builder()
            .node_id(id)
            .peers(self.peers.clone())
            .tcp(addr)
            .data_dir(self.dir.0.join(format!("m{id}")))
            .start()
            .await
            .unwrap_or_else(|e| panic!("member {id}: {e}"))
    }

    fn member(&self, i: usize) -> &PeerGroup {
        self.members[i]
            .as_ref()
            .unwrap_or_else(|| panic!("member {i} is down"))
    }

    async fn shutdown(&mut self) {
        for m in self.members.iter_mut() {
            if let Some(m) = m.take() {
                m.shutdown().await;
            }
        }
    }
}

impl Harness for Tcp {
    async fn backend(&self) -> Backend {
        let live: Vec<&PeerGroup> = self.members.iter().flatten().collect();
        let i = self.next.fetch_add(1, Ordering::Relaxed) % live.len();
        live[i].backend()
    }

    async fn put_foreign(&self, key: &Key, value: &[u8], ttl: Duration) -> Result<(), BoxError> {
        self.member(0).put_raw(key, value, ttl).await?;
        Ok(())
    }

    fn ttl(&self) -> Duration {
        Duration::from_millis(600)
    }

    fn expiry_slack(&self) -> Duration {
        Duration::from_millis(300)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_three_member_group_over_tcp_passes_the_contract() {
    let mut g = Tcp::new(3, "conformance").await;
    let report = conformance::run(&g).await;
    println!("{report}");
    assert!(report.is_ok(), "{report}");
    assert_eq!(report.passed.len(), 21, "{report}");
    g.shutdown().await;
}

/// Member 3 restarts on its port and directory while member 2 is down:
/// the group can only commit if 3 rejoined (1 and 3 are the majority), so
/// a candidate leading afterwards proves the other side dialled again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_restarting_on_its_port_and_directory_rejoins() {
    let mut g = Tcp::new(3, "rejoin").await;
    if let Some(m) = g.members[2].take() {
        m.shutdown().await;
    }
    let back = g.start(3).await;
    g.members[2] = Some(back);
    if let Some(m) = g.members[1].take() {
        m.shutdown().await;
    }
    let leader = Leader::builder("after-restart")
        .backend(g.member(0).backend())
        .ttl(Duration::from_secs(1))
        .build()
        .unwrap_or_else(|e| panic!("build: {e}"));
    let (tx, rx) = tokio::sync::oneshot::channel();
    let task = tokio::spawn({
        let leader = leader.clone();
        async move {
            let mut tx = Some(tx);
            let _ = leader
                .acquire_and_run(move |term| {
                    let tx = tx.take();
                    async move {
                        if let Some(tx) = tx {
                            let _ = tx.send(term.fencing_token());
                        }
                        term.cancelled().await;
                        Ok::<_, std::io::Error>(())
                    }
                })
                .await;
        }
    });
    let token = tokio::time::timeout(Duration::from_secs(20), rx)
        .await
        .unwrap_or_else(|_| panic!("no term with members 1 and 3 up"))
        .unwrap_or_else(|_| panic!("the candidate stopped"));
    assert!(token.get() > 0);
    let _ = leader.shutdown().await;
    let _ = task.await;
    g.shutdown().await;
}
