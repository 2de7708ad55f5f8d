//! The peer group (`leaseholder-raft`) in the bench: three members in this
//! process, over the built-in TCP transport on loopback, each with its
//! data directory (fsynced), and a candidate on each member, as three
//! replicas of a service would run.
//!
//! A graceful stop is the candidate's `shutdown()` (its member runs on);
//! a crash takes the member down with the candidate (one process), and
//! the candidate that replaces it starts the member again on its port and
//! directory. Idle cost: three members and one leader holding a lease,
//! messages sent per member and CPU of the process over a window.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::Context;
use leaseholder::Leader;
use leaseholder_raft::{CallFuture, NodeId, PeerGroup, TcpTransport, Transport};
use leaseholder_testkit::{TempDir, free_port};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::fleet::{Ev, Events, Fleet};

/// The members of a bench group.
const MEMBERS: usize = 3;

/// A [`TcpTransport`] that counts the frames it sends.
struct Counted {
    tcp: Arc<TcpTransport>,
    sent: Arc<AtomicU64>,
}

impl Transport for Counted {
    fn call(
        &self,
        to: NodeId,
        addr: &str,
        frame: bytes::Bytes,
        timeout: Duration,
    ) -> CallFuture<'_> {
        self.sent.fetch_add(1, Ordering::Relaxed);
        self.tcp.call(to, addr, frame, timeout)
    }
}

/// One member's slot: its address, directory, the running member (if up)
/// and the frames it has sent.
struct Slot {
    id: NodeId,
    addr: String,
    member: Option<PeerGroup>,
    /// The member's TCP server (its listener), stopped with it.
    server: Option<JoinHandle<()>>,
    sent: Arc<AtomicU64>,
}

/// Three members on loopback TCP, each with a data directory.
pub(crate) struct Group {
    dir: TempDir,
    peers: Vec<(NodeId, String)>,
    slots: Vec<Slot>,
}

impl Group {
    pub(crate) async fn start() -> anyhow::Result<Group> {
        let dir = TempDir::new("leaseholder-bench-peer-group")?;
        let mut peers = Vec::new();
        for i in 0..MEMBERS {
            peers.push((i as NodeId + 1, format!("127.0.0.1:{}", free_port()?)));
        }
        let slots = peers
            .iter()
            .map(|(id, addr)| Slot {
                id: *id,
                addr: addr.clone(),
                member: None,
                server: None,
                sent: Arc::new(AtomicU64::new(0)),
            })
            .collect();
        let mut group = Group { dir, peers, slots };
        for i in 0..MEMBERS {
            group.up(i).await?;
        }
        group.settled().await?;
        Ok(group)
    }

    /// Starts member `i` (again) on its port and directory.
    async fn up(&mut self, i: usize) -> anyhow::Result<()> {
        let slot = &self.slots[i];
        let tcp = TcpTransport::new();
        let transport = Arc::new(Counted {
            tcp: tcp.clone(),
            sent: slot.sent.clone(),
        });
        let member = PeerGroup::builder()
            .node_id(slot.id)
            .peers(self.peers.clone())
            .transport(transport)
            .data_dir(self.dir.path().join(format!("m{}", slot.id)))
            .start()
            .await
            .with_context(|| format!("starting member {}", slot.id))?;
        // The port may still be held a moment by the server that stopped.
        let until = Instant::now() + Duration::from_secs(10);
        let listener = loop {
            match tokio::net::TcpListener::bind(&slot.addr).await {
                Ok(l) => break l,
                Err(_) if Instant::now() < until => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(e) => return Err(e).with_context(|| format!("listening on {}", slot.addr)),
            }
        };
        self.slots[i].server = Some(tcp.serve(listener, &member));
        self.slots[i].member = Some(member);
        Ok(())
    }

    /// Waits until every running member names a leader.
    async fn settled(&self) -> anyhow::Result<()> {
        for slot in &self.slots {
            if let Some(m) = &slot.member {
                m.wait_for_leader(Duration::from_secs(20)).await?;
            }
        }
        Ok(())
    }

    /// Member `i`, if it runs.
    fn member(&self, i: usize) -> Option<&PeerGroup> {
        self.slots[i].member.as_ref()
    }

    /// Stops member `i` (a crash of its process: nothing is released).
    async fn down(&mut self, i: usize) {
        if let Some(server) = self.slots[i].server.take() {
            server.abort();
        }
        if let Some(m) = self.slots[i].member.take() {
            m.shutdown().await;
        }
    }

    /// Frames sent by every member so far.
    fn sent(&self) -> Vec<u64> {
        self.slots
            .iter()
            .map(|s| s.sent.load(Ordering::Relaxed))
            .collect()
    }

    pub(crate) async fn close(&mut self) {
        for i in 0..MEMBERS {
            self.down(i).await;
        }
    }
}

/// A candidate: its leader handle, its member slot, its task, and whether
/// it still holds its slot (from its start until it is stopped or killed).
struct Cand {
    leader: Leader,
    slot: usize,
    task: Option<JoinHandle<()>>,
    holds_slot: bool,
}

/// Candidates on a [`Group`]: at most one per member, as one process each.
pub(crate) struct RaftFleet {
    /// Started by the first `spawn`.
    group: Option<Group>,
    key: String,
    ttl: Duration,
    cands: Vec<Cand>,
    events: Events,
    /// For each kill, in order: whether the member that went down led the
    /// Raft group then.
    killed_raft_leader: Vec<bool>,
}

impl RaftFleet {
    pub(crate) fn new(key: &str, ttl: Duration) -> RaftFleet {
        RaftFleet {
            group: None,
            key: key.to_owned(),
            ttl,
            cands: Vec::new(),
            events: Events::new(),
            killed_raft_leader: Vec::new(),
        }
    }

    /// For each kill so far, in order: whether its member led the Raft
    /// group when it went down.
    pub(crate) fn killed_raft_leader(&self) -> &[bool] {
        &self.killed_raft_leader
    }

    /// A member with no candidate.
    fn free_slot(&self) -> Option<usize> {
        (0..MEMBERS).find(|&slot| !self.cands.iter().any(|c| c.slot == slot && c.holds_slot))
    }
}

impl Fleet for RaftFleet {
    fn events(&mut self) -> &mut Events {
        &mut self.events
    }

    async fn spawn(&mut self) -> anyhow::Result<usize> {
        let slot = self.free_slot().context("every member has a candidate")?;
        if self.group.is_none() {
            self.group = Some(Group::start().await?);
        }
        let group = self.group.as_mut().context("the group")?;
        if group.member(slot).is_none() {
            group.up(slot).await?;
            group.settled().await?;
        }
        let member = group.member(slot).context("the member is down")?;
        let leader = Leader::builder(self.key.clone())
            .backend(member.backend())
            .ttl(self.ttl)
            .build()?;
        leader.setup().await?;
        let who = self.cands.len();
        self.cands.push(Cand {
            leader,
            slot,
            task: None,
            holds_slot: true,
        });
        self.events.mark(who, Ev::Ready);
        tracing::debug!(who, slot, "peer-group candidate ready");
        Ok(who)
    }

    async fn go(&mut self, i: usize) -> anyhow::Result<()> {
        let leader = self.cands[i].leader.clone();
        self.cands[i].task = Some(crate::fleet::campaign(leader, i, self.events.sender()));
        Ok(())
    }

    fn terminate(&mut self, i: usize) -> anyhow::Result<()> {
        self.events.mark(i, Ev::Term);
        self.cands[i].holds_slot = false;
        let leader = self.cands[i].leader.clone();
        tokio::spawn(async move { leader.shutdown().await });
        Ok(())
    }

    async fn kill(&mut self, i: usize) -> anyhow::Result<()> {
        self.events.mark(i, Ev::Kill);
        self.cands[i].holds_slot = false;
        // The member first, as in a crash of their process: the candidate,
        // dropped next, must not reach the group to release its lease.
        let slot = self.cands[i].slot;
        tracing::debug!(who = i, slot, "peer-group candidate and member killed");
        if let Some(group) = self.group.as_mut() {
            let leading = group.member(slot).is_some_and(PeerGroup::is_leader);
            self.killed_raft_leader.push(leading);
            group.down(slot).await;
        }
        if let Some(task) = self.cands[i].task.take() {
            task.abort();
        }
        Ok(())
    }

    async fn close(&mut self) {
        for c in &mut self.cands {
            if c.task.as_ref().is_some_and(|t| !t.is_finished()) {
                let _ = tokio::time::timeout(Duration::from_secs(5), c.leader.shutdown()).await;
            }
            if let Some(task) = c.task.take() {
                task.abort();
            }
        }
        if let Some(group) = self.group.as_mut() {
            group.close().await;
        }
    }
}

/// What one member costs while the group idles with one leader holding a
/// lease: frames sent per second (each member) and the process's CPU,
/// per member, in % of one core.
pub(crate) struct Idle {
    pub(crate) frames_per_s: Vec<f64>,
    pub(crate) cpu_pct_per_member: f64,
    pub(crate) window: Duration,
}

pub(crate) async fn idle(ttl: Duration, window: Duration) -> anyhow::Result<Idle> {
    let mut group = Group::start().await?;
    let member = group.member(0).context("member 1")?.clone();
    let leader = Leader::builder("idle")
        .backend(member.backend())
        .ttl(ttl)
        .build()?;
    let mut state = leader.state();
    let task = tokio::spawn({
        let leader = leader.clone();
        async move {
            let _ = leader
                .acquire_and_run(|term| async move {
                    term.cancelled().await;
                    Ok::<_, std::convert::Infallible>(())
                })
                .await;
        }
    });
    tokio::time::timeout(Duration::from_secs(30), state.wait_for(|s| s.is_leader()))
        .await
        .context("no leader on the peer group within 30 s")??;
    let (sent0, cpu0, t0) = (group.sent(), crate::stats::cpu_time()?, Instant::now());
    tokio::time::sleep(window).await;
    let (sent1, cpu1, elapsed) = (group.sent(), crate::stats::cpu_time()?, t0.elapsed());
    let secs = elapsed.as_secs_f64();
    let frames_per_s = sent0
        .iter()
        .zip(&sent1)
        .map(|(a, b)| (b - a) as f64 / secs)
        .collect();
    let cpu_pct = (cpu1 - cpu0).as_secs_f64() / secs * 100.0;
    let _ = leader.shutdown().await;
    let _ = task.await;
    group.close().await;
    Ok(Idle {
        frames_per_s,
        cpu_pct_per_member: cpu_pct / MEMBERS as f64,
        window: elapsed,
    })
}
