//! Members linked by the built-in TCP transport on loopback, each with its
//! data directory: the conformance suite over TCP, and a member that
//! restarts on its port and directory rejoining the group (the others
//! dial it again), and members whose every link runs through a testkit
//! proxy of its own (`TcpTransport::route`), so that one can be cut off.

mod support;

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use leaseholder::conformance::{self, Harness};
use leaseholder::{Backend, BoxError, Key, Leader};
use leaseholder_raft::PeerGroup;
use leaseholder_testkit::{TcpProxy, TempDir, free_port};

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
            dir: TempDir::new(&format!("leaseholder-raft-tcp-{name}"))
                .unwrap_or_else(|e| panic!("{e}")),
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
        member_of("leaseholder", id, &self.peers, self.dir.path()).await
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
    support::age_for_the_rows(&g).await;
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

/// Three members over TCP, each dialing each other member through a proxy
/// of its own (one per directed link).
struct Proxied {
    _dir: TempDir,
    members: Vec<PeerGroup>,
    /// `(from, to)` (member ids) to the proxy `from` dials `to` through.
    links: HashMap<(u64, u64), TcpProxy>,
}

impl Proxied {
    async fn new(n: u64) -> Proxied {
        let dir = TempDir::new("leaseholder-raft-proxied").unwrap_or_else(|e| panic!("{e}"));
        let peers: Vec<(u64, String)> = (1..=n)
            .map(|i| {
                let port = free_port().unwrap_or_else(|e| panic!("free port: {e}"));
                (i, format!("127.0.0.1:{port}"))
            })
            .collect();
        let mut links = HashMap::new();
        for (from, _) in &peers {
            for (to, addr) in &peers {
                if from != to {
                    let upstream = addr.parse().unwrap_or_else(|e| panic!("{addr}: {e}"));
                    let proxy = TcpProxy::start(upstream)
                        .await
                        .unwrap_or_else(|e| panic!("proxy: {e}"));
                    links.insert((*from, *to), proxy);
                }
            }
        }
        let mut members = Vec::new();
        for (id, addr) in &peers {
            let mut builder = PeerGroup::builder()
                .node_id(*id)
                .peers(peers.clone())
                .tcp(addr.clone())
                .data_dir(dir.path().join(format!("m{id}")));
            for ((from, to), proxy) in &links {
                if from == id {
                    builder = builder.tcp_route(*to, proxy.addr().to_string());
                }
            }
            let member = builder
                .start()
                .await
                .unwrap_or_else(|e| panic!("member {id}: {e}"));
            members.push(member);
        }
        for m in &members {
            m.wait_for_leader(Duration::from_secs(20))
                .await
                .unwrap_or_else(|e| panic!("member {}: {e}", m.id()));
        }
        Proxied {
            _dir: dir,
            members,
            links,
        }
    }

    /// Cuts (or restores) every link from and to member `id`.
    fn cut(&self, id: u64, cut: bool) {
        for ((from, to), proxy) in &self.links {
            if *from == id || *to == id {
                if cut {
                    proxy.cut();
                } else {
                    proxy.restore();
                }
            }
        }
    }

    /// The index of the member that leads the group, once one says so.
    async fn raft_leader(&self) -> usize {
        tokio::time::timeout(Duration::from_secs(20), async {
            loop {
                if let Some(i) = self.members.iter().position(PeerGroup::is_leader) {
                    return i;
                }
                let _ = self.members[0]
                    .wait_for_leader(Duration::from_millis(20))
                    .await;
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .unwrap_or_else(|_| panic!("no member leads the group"))
    }
}

/// Every link of the member that leads the group runs through a proxy;
/// cutting them puts it in a minority of one while it runs on. Its
/// candidate's term ends (no renewal commits), a candidate on the majority
/// side then leads with a larger token, and once the links are back the
/// cut-off member follows again. The traffic went through the proxies:
/// the routes took effect.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_raft_leader_cut_off_through_its_proxies_ends_its_term_before_a_new_one() {
    const TTL: Duration = Duration::from_millis(1500);
    let g = Proxied::new(3).await;
    let mut log = support::Log::new(TTL);
    let r = g.raft_leader().await;
    let rid = g.members[r].id();
    assert!(
        g.links
            .iter()
            .filter(|((from, _), _)| *from == rid)
            .all(|(_, p)| p.connections() > 0),
        "the leader dials every follower through its proxy"
    );
    let mut leaders = vec![log.candidate(r, &g.members[r])];
    let (who, token) = log.started(Duration::from_secs(10)).await;
    assert_eq!(who, r);
    for i in (0..3).filter(|&i| i != r) {
        leaders.push(log.candidate(i, &g.members[i]));
    }
    g.cut(g.members[r].id(), true);
    let (ended, _) = log.ended(TTL * 2).await;
    assert_eq!(ended, r);
    let (next, next_token) = log.started(TTL * 4).await;
    assert_ne!(next, r, "the cut-off member's candidate led again");
    assert!(next_token > token);
    g.cut(g.members[r].id(), false);
    let back = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            if let Some(leader) = g.members[r].leader()
                && leader != g.members[r].id()
            {
                return leader;
            }
            let _ = g.members[r]
                .wait_for_leader(Duration::from_millis(20))
                .await;
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    assert!(
        back.is_ok(),
        "the healed member never followed the new leader"
    );
    support::stop(leaders).await;
    log.check();
    for m in &g.members {
        m.shutdown().await;
    }
}

/// Starts member `id` of `peers` (named `name`) over TCP, durable in `dir`.
async fn member_of(
    name: &str,
    id: u64,
    peers: &[(u64, String)],
    dir: &std::path::Path,
) -> PeerGroup {
    let addr = peers
        .iter()
        .find(|(i, _)| *i == id)
        .map(|(_, a)| a.clone())
        .unwrap_or_default();
    PeerGroup::builder()
        .name(name)
        .node_id(id)
        .peers(peers.to_vec())
        .tcp(addr)
        .data_dir(dir.join(format!("{name}-m{id}")))
        .start()
        .await
        .unwrap_or_else(|e| panic!("{name} member {id}: {e}"))
}

/// A peer list whose address for one member leads to a member of another
/// group (a stale address, a port reused): that member refuses every
/// frame meant for another member or group, so neither group's log
/// reaches the other. Group `a` names member 3 at the address of group
/// `b`'s only member (id 1: the ids differ); group `c`, named otherwise,
/// names its member 1 there (the same id: only the name differs). Both
/// elect among their two running members, and `b` goes on alone, its
/// leases its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_refuses_frames_meant_for_another_member_or_group() {
    let dir = TempDir::new("leaseholder-raft-misdelivered").unwrap_or_else(|e| panic!("{e}"));
    let port = || {
        format!(
            "127.0.0.1:{}",
            free_port().unwrap_or_else(|e| panic!("{e}"))
        )
    };
    let b_addr = port();
    let b_peers = vec![(1, b_addr.clone())];
    let b = member_of("b", 1, &b_peers, dir.path()).await;
    b.wait_for_leader(Duration::from_secs(20))
        .await
        .unwrap_or_else(|e| panic!("b: {e}"));
    let a_peers = vec![(1, port()), (2, port()), (3, b_addr.clone())];
    let c_peers = vec![(1, b_addr.clone()), (2, port()), (3, port())];
    let a1 = member_of("a", 1, &a_peers, dir.path()).await;
    let a2 = member_of("a", 2, &a_peers, dir.path()).await;
    let c2 = member_of("c", 2, &c_peers, dir.path()).await;
    let c3 = member_of("c", 3, &c_peers, dir.path()).await;
    for m in [&a1, &a2, &c2, &c3] {
        m.wait_for_leader(Duration::from_secs(20))
            .await
            .unwrap_or_else(|e| panic!("member {}: {e}", m.id()));
    }
    let ttl = Duration::from_secs(30);
    let a_key = Key::new("of-a").unwrap_or_else(|e| panic!("{e}"));
    let c_key = Key::new("of-c").unwrap_or_else(|e| panic!("{e}"));
    a1.put_raw(&a_key, b"a", ttl)
        .await
        .unwrap_or_else(|e| panic!("a: {e}"));
    c2.put_raw(&c_key, b"c", ttl)
        .await
        .unwrap_or_else(|e| panic!("c: {e}"));
    // Both groups have sent appends, votes and heartbeats to b's address
    // all along; b still leads its own group of one, and holds only its
    // own keys.
    let b_key = Key::new("of-b").unwrap_or_else(|e| panic!("{e}"));
    b.put_raw(&b_key, b"b", ttl)
        .await
        .unwrap_or_else(|e| panic!("b no longer serves: {e}"));
    assert!(b.is_leader(), "b lost the lead of its own group");
    assert_eq!(b.members(), b_peers);
    let backend = b.backend();
    for (key, theirs) in [(&a_key, "a"), (&c_key, "c")] {
        let held = backend
            .holder(key)
            .await
            .unwrap_or_else(|e| panic!("b: {e}"));
        assert!(held.is_none(), "group {theirs}'s lease reached b: {held:?}");
    }
    assert!(
        backend
            .holder(&b_key)
            .await
            .unwrap_or_else(|e| panic!("b: {e}"))
            .is_some()
    );
    for m in [&a1, &a2, &c2, &c3, &b] {
        m.shutdown().await;
    }
}
