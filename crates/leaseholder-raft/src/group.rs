//! The group: one member's Raft node, its state machine, and the handler
//! that serves lease operations on the member that leads the group
//! (forwarding them there from the others).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use leaseholder::{Backend, Key};
use openraft::error::{CheckIsLeaderError, ClientWriteError, RaftError};
use openraft::{BasicNode, Config, ServerState};
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use crate::error::GroupError;
use crate::net::{self, Envelope, Message, MessageReply, Network, Transport};
use crate::store::{MemoryLog, NodeId, Raft, StateMachine};
use crate::table::{self, Command, HolderWire, Judged, Outcome};

/// How many times a lease operation is passed on to the member named as
/// the leader before the caller gets [`ServeError::NoLeader`].
const MAX_HOPS: u8 = 3;

/// A lease operation, served on the member that leads the group.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) enum Request {
    Setup,
    Acquire {
        key: String,
        nonce: u128,
        id: [u8; 16],
        metadata: Vec<u8>,
        at_us: u64,
        ttl_us: u64,
    },
    Renew {
        key: String,
        nonce: u128,
        ttl_us: u64,
        metadata: Option<Vec<u8>>,
    },
    Release {
        key: String,
        nonce: u128,
    },
    Holder {
        key: String,
    },
    Keys,
    PutRaw {
        key: String,
        value: Vec<u8>,
        ttl_us: u64,
    },
    Register {
        key: String,
        id: [u8; 16],
        value: Vec<u8>,
        ttl_us: u64,
    },
    Deregister {
        key: String,
        id: [u8; 16],
    },
    Candidates {
        key: String,
    },
    /// Make exactly these the group's voting members (new ones added as
    /// learners first, until they caught up).
    SetMembers {
        members: Vec<(NodeId, String)>,
    },
}

/// The answer to a [`Request`].
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) enum Reply {
    Setup {
        created: bool,
    },
    Outcome(Outcome),
    Holder(Option<HolderWire>),
    Keys(Vec<String>),
    Candidates(Vec<Vec<u8>>),
    /// The membership change committed.
    Members,
}

/// Why a [`Request`] was not served.
#[derive(Clone, Debug, Serialize, Deserialize, thiserror::Error)]
pub(crate) enum ServeError {
    #[error("the group has no leader that this member can reach")]
    NoLeader,
    #[error("the group's leader did not answer within the budget")]
    Timeout,
    #[error("{0}")]
    Unavailable(String),
}

/// The name of a group whose builder was given none.
const DEFAULT_NAME: &str = "leaseholder";

/// What serving on this member found.
enum Here {
    /// Served.
    Done(Reply),
    /// Not the leader: pass it on to this one (if known).
    Elsewhere(Option<NodeId>),
}

pub(crate) struct GroupInner {
    pub(crate) id: NodeId,
    /// The group's name ([`PeerGroupBuilder::name`]), on every frame.
    pub(crate) name: Arc<str>,
    pub(crate) raft: Raft,
    pub(crate) machine: StateMachine,
    pub(crate) transport: Arc<dyn Transport>,
    pub(crate) members: BTreeMap<NodeId, String>,
    /// Tasks to stop with the member (the TCP listener).
    tasks: std::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>,
    /// Set by [`PeerGroup::shutdown`]: the TCP server closes its
    /// connections rather than answer for a stopped node.
    stopped: std::sync::atomic::AtomicBool,
}

impl GroupInner {
    /// Whether [`PeerGroup::shutdown`] was called.
    pub(crate) fn is_stopped(&self) -> bool {
        self.stopped.load(std::sync::atomic::Ordering::Acquire)
    }
}

/// One member of a peer group: the replicas of a service elect among
/// themselves, with no store, on a Raft group (openraft) of which each
/// replica is a member.
///
/// Build it with [`PeerGroup::builder`], take a [`Backend`] from
/// [`backend`](Self::backend), and campaign with [`leaseholder::Leader`]
/// as on any store. Deliver the frames other members send to
/// [`receive`](Self::receive).
#[derive(Clone)]
pub struct PeerGroup {
    inner: Arc<GroupInner>,
}

impl std::fmt::Debug for PeerGroup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerGroup")
            .field("id", &self.inner.id)
            .field("members", &self.inner.members)
            .finish_non_exhaustive()
    }
}

/// Builds a [`PeerGroup`] member: its id, every member's id and address, a
/// transport, the storage and the Raft timings.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), leaseholder_raft::GroupError> {
/// use leaseholder_raft::{LocalNet, PeerGroup};
///
/// let net = LocalNet::new();
/// let group = PeerGroup::builder()
///     .node_id(1)
///     .peers([(1, "local-1")])
///     .transport(net.transport(1))
///     .in_memory()
///     .start()
///     .await?;
/// net.attach(&group);
/// # group.shutdown().await;
/// # Ok(())
/// # }
/// ```
pub struct PeerGroupBuilder {
    name: String,
    node_id: Option<NodeId>,
    peers: Vec<(NodeId, String)>,
    transport: Option<Arc<dyn Transport>>,
    in_memory: bool,
    data_dir: Option<std::path::PathBuf>,
    listen: Option<String>,
    heartbeat: Duration,
    election: (Duration, Duration),
    join: bool,
    /// The built-in transport, when [`tcp`](Self::tcp) chose it.
    tcp: Option<Arc<crate::tcp::TcpTransport>>,
}

impl std::fmt::Debug for PeerGroupBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerGroupBuilder")
            .field("name", &self.name)
            .field("node_id", &self.node_id)
            .field("peers", &self.peers)
            .field("in_memory", &self.in_memory)
            .field("data_dir", &self.data_dir)
            .field("heartbeat", &self.heartbeat)
            .field("election", &self.election)
            .field("join", &self.join)
            .finish_non_exhaustive()
    }
}

impl PeerGroup {
    /// A builder with the default timings: heartbeat 50 ms, election
    /// timeout 150 to 300 ms.
    pub fn builder() -> PeerGroupBuilder {
        PeerGroupBuilder {
            name: DEFAULT_NAME.to_owned(),
            node_id: None,
            peers: Vec::new(),
            transport: None,
            in_memory: false,
            data_dir: None,
            listen: None,
            heartbeat: Duration::from_millis(50),
            election: (Duration::from_millis(150), Duration::from_millis(300)),
            join: false,
            tcp: None,
        }
    }

    /// This member's id.
    pub fn id(&self) -> NodeId {
        self.inner.id
    }

    pub(crate) fn inner(&self) -> &Arc<GroupInner> {
        &self.inner
    }

    /// A [`Backend`] on this group, to build [`leaseholder::Leader`]s
    /// with. Every call it makes is served by the member that leads the
    /// group, whichever member it is made on.
    pub fn backend(&self) -> Backend {
        Backend::new(crate::backend::RaftBackend::new(self.inner.clone()))
    }

    /// Handles a frame another member sent (through your [`Transport`])
    /// and returns the reply frame to send back.
    pub async fn receive(&self, frame: Bytes) -> Bytes {
        receive(&self.inner, frame).await
    }

    /// The member this one believes leads the group, if any.
    pub fn leader(&self) -> Option<NodeId> {
        self.inner.raft.metrics().borrow().current_leader
    }

    /// `true` while this member leads the group.
    pub fn is_leader(&self) -> bool {
        let m = self.inner.raft.metrics();
        let m = m.borrow();
        m.state == ServerState::Leader && m.current_leader == Some(self.inner.id)
    }

    /// Waits until this member knows a leader of the group, at most
    /// `timeout`; the leader's id.
    pub async fn wait_for_leader(&self, timeout: Duration) -> Result<NodeId, GroupError> {
        let mut metrics = self.inner.raft.metrics();
        let found = tokio::time::timeout(timeout, async {
            loop {
                if let Some(id) = metrics.borrow_and_update().current_leader {
                    return Ok(id);
                }
                if metrics.changed().await.is_err() {
                    return Err(GroupError::Stopped);
                }
            }
        })
        .await;
        found.unwrap_or(Err(GroupError::NoLeader(timeout)))
    }

    /// Writes `value` under `key`, bypassing the lease contract, to live
    /// `ttl`: what another program (or an operator) writing into the table
    /// would do. The value is read back as a lease if it decodes as one
    /// (with no token), else as a foreign lease. For tests (the
    /// conformance suite plants foreign values with it).
    pub async fn put_raw(&self, key: &Key, value: &[u8], ttl: Duration) -> Result<(), GroupError> {
        let request = Request::PutRaw {
            key: key.as_str().to_owned(),
            value: value.to_vec(),
            ttl_us: table::us(ttl),
        };
        serve(&self.inner, request, Duration::from_secs(10), 0)
            .await
            .map(|_| ())
            .map_err(|e| GroupError::Unavailable(e.to_string()))
    }

    /// The group's voting members as this member last learnt them: id and
    /// address, in id order.
    pub fn members(&self) -> Vec<(NodeId, String)> {
        let metrics = self.inner.raft.metrics();
        let m = metrics.borrow();
        let membership = m.membership_config.membership();
        membership
            .voter_ids()
            .map(|id| {
                let addr = membership
                    .get_node(&id)
                    .map(|n| n.addr.clone())
                    .unwrap_or_default();
                (id, addr)
            })
            .collect()
    }

    /// Makes exactly `members` (id and address) the group's voting
    /// members, at run time, from any member (the call is served by the
    /// member that leads the group). A new member must be running, started
    /// with [`join`](PeerGroupBuilder::join): it is added as a learner and
    /// caught up with the log first, then the change is committed by joint
    /// consensus (openraft's), so at every step a quorum of the old and of
    /// the new members agrees. A member left out stops being counted; shut
    /// it down once this returns.
    ///
    /// Leases are untouched: a lease lives in the replicated table, so a
    /// candidate that leads keeps its term, also when the member that led
    /// the group is removed (the next one times every lease from when it
    /// applied the lease's last write, as after any change of Raft
    /// leader).
    ///
    /// Fails with [`GroupError::Config`] for an empty list, an id listed
    /// twice or an empty address, and with [`GroupError::Unavailable`] if
    /// the change did not commit within `timeout` (it may still commit:
    /// read [`members`](Self::members) and call again, the call is
    /// idempotent).
    pub async fn set_members<A: Into<String>>(
        &self,
        members: impl IntoIterator<Item = (NodeId, A)>,
        timeout: Duration,
    ) -> Result<(), GroupError> {
        let mut list: Vec<(NodeId, String)> = Vec::new();
        for (id, addr) in members {
            let addr = addr.into();
            if addr.is_empty() {
                return Err(GroupError::Config(format!(
                    "member {id} has an empty address"
                )));
            }
            if list.iter().any(|(other, _)| *other == id) {
                return Err(GroupError::Config(format!("member {id} is listed twice")));
            }
            list.push((id, addr));
        }
        if list.is_empty() {
            return Err(GroupError::Config(
                "set_members needs at least one member".to_owned(),
            ));
        }
        match serve(
            &self.inner,
            Request::SetMembers { members: list },
            timeout,
            0,
        )
        .await
        {
            Ok(_) => Ok(()),
            Err(e) => Err(GroupError::Unavailable(e.to_string())),
        }
    }

    /// How many leases and registry entries this member's table holds
    /// (live or not).
    pub fn table_len(&self) -> (usize, usize) {
        self.inner.machine.lock().table.len()
    }

    /// Stops this member's Raft node (and its TCP listener; the
    /// connections its server accepted close at their next frame, so the
    /// peers dial again). Its backends fail from then on.
    pub async fn shutdown(&self) {
        self.inner
            .stopped
            .store(true, std::sync::atomic::Ordering::Release);
        for task in self
            .inner
            .tasks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain(..)
        {
            task.abort();
        }
        if let Err(e) = self.inner.raft.shutdown().await {
            tracing::warn!(member = self.inner.id, "raft shutdown: {e}");
        }
    }
}

/// What [`PeerGroupBuilder::check`] found: the id, the members, the transport.
type Checked = (NodeId, BTreeMap<NodeId, String>, Arc<dyn Transport>);

impl PeerGroupBuilder {
    /// Starts this member to join a group that runs already, instead of
    /// forming one: it waits, with an empty log, until a member of the
    /// group adds it with [`PeerGroup::set_members`]. The
    /// [`peers`](Self::peers) must still list this member (its address);
    /// the others' addresses come from the group.
    pub fn join(mut self) -> Self {
        self.join = true;
        self
    }

    /// This member's id: one of the [`peers`](Self::peers).
    pub fn node_id(mut self, id: NodeId) -> Self {
        self.node_id = Some(id);
        self
    }

    /// Every member of the group, this one included: id and the address
    /// its transport reaches it at. Every member must be given the same
    /// list when the group is first formed.
    pub fn peers<A: Into<String>>(mut self, peers: impl IntoIterator<Item = (NodeId, A)>) -> Self {
        self.peers = peers.into_iter().map(|(id, a)| (id, a.into())).collect();
        self
    }

    /// The transport to the other members.
    pub fn transport(mut self, transport: Arc<dyn Transport>) -> Self {
        self.transport = Some(transport);
        self.listen = None;
        self.tcp = None;
        self
    }

    /// Uses the built-in [`TcpTransport`](crate::TcpTransport): `start`
    /// listens on `listen` (this member's address in the
    /// [`peers`](Self::peers), or an address that reaches it, such as
    /// `0.0.0.0:7001`), and dials the other members at their addresses.
    pub fn tcp(mut self, listen: impl Into<String>) -> Self {
        let tcp = crate::tcp::TcpTransport::new();
        self.transport = Some(tcp.clone());
        self.tcp = Some(tcp);
        self.listen = Some(listen.into());
        self
    }

    /// With [`tcp`](Self::tcp): dials member `to` at `addr` instead of its
    /// address in the [`peers`](Self::peers), a link of this member's own
    /// (see [`TcpTransport::route`](crate::TcpTransport::route)). Ignored
    /// for other transports.
    pub fn tcp_route(self, to: NodeId, addr: impl Into<String>) -> Self {
        if let Some(tcp) = &self.tcp {
            tcp.route(to, addr);
        }
        self
    }

    /// Keeps the Raft log, the votes and the snapshot in `dir` (created if
    /// missing): every write is fsynced before the group counts it, so a
    /// member that restarts on the same directory remembers its votes and
    /// the log, and fencing tokens keep rising across restarts of every
    /// member. One directory per member; never two members on one.
    pub fn data_dir(mut self, dir: impl Into<std::path::PathBuf>) -> Self {
        self.data_dir = Some(dir.into());
        self
    }

    /// Keeps the Raft log and votes in memory only.
    ///
    /// **This gives up the group's guarantees across restarts.** A member
    /// that restarts comes back with no log and no record of its votes: it
    /// may vote twice in one Raft term (two leaders of one term are then
    /// possible), and if every member restarts the group starts over (the
    /// fencing tokens start again from a new base, still larger than the
    /// old ones, but the leases the old group granted are forgotten). For
    /// tests and examples only.
    pub fn in_memory(mut self) -> Self {
        self.in_memory = true;
        self
    }

    /// The group's name, the same on every member. Every frame carries it
    /// and the id of the member it is for, and a member refuses a frame
    /// for another group or member, so a stale address or a port reused by
    /// another group's member cannot feed one group's log into another.
    /// Give each group that runs on the same hosts a name of its own.
    /// Default `leaseholder`.
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = name.into();
        self
    }

    /// How often the Raft leader sends heartbeats. Default 50 ms.
    ///
    /// openraft also gives every append (a heartbeat or a batch of writes)
    /// one heartbeat interval to be answered: the round trip to a
    /// follower, its fsync included, must fit in it, or nothing commits
    /// while the followers, who still hear the heartbeats, keep the Raft
    /// leader in place. Raise it (and the election timeout with it) on
    /// slow links or disks.
    pub fn heartbeat(mut self, every: Duration) -> Self {
        self.heartbeat = every;
        self
    }

    /// The election timeout range: a follower that hears nothing from a
    /// leader for a random time in `min..max` stands for election.
    /// Default 150 to 300 ms.
    pub fn election_timeout(mut self, min: Duration, max: Duration) -> Self {
        self.election = (min, max);
        self
    }

    fn check(&self) -> Result<Checked, GroupError> {
        if self.name.is_empty() {
            return Err(GroupError::Config("name(..) is empty".to_owned()));
        }
        let id = self
            .node_id
            .ok_or(GroupError::Config("node_id(..) is required".to_owned()))?;
        if self.peers.is_empty() {
            return Err(GroupError::Config(
                "peers(..) is required: every member's id and address".to_owned(),
            ));
        }
        let mut members = BTreeMap::new();
        for (peer, addr) in &self.peers {
            if addr.is_empty() {
                return Err(GroupError::Config(format!(
                    "member {peer} has an empty address"
                )));
            }
            if members.insert(*peer, addr.clone()).is_some() {
                return Err(GroupError::Config(format!("member {peer} is listed twice")));
            }
        }
        if !members.contains_key(&id) {
            return Err(GroupError::Config(format!(
                "node_id {id} is not one of the peers {:?}",
                members.keys().collect::<Vec<_>>()
            )));
        }
        let transport = self
            .transport
            .clone()
            .ok_or(GroupError::Config("transport(..) is required".to_owned()))?;
        match (&self.data_dir, self.in_memory) {
            (None, false) => {
                return Err(GroupError::Config(
                    "choose the storage: data_dir(..) (durable) or in_memory() (tests only)"
                        .to_owned(),
                ));
            }
            (Some(dir), true) => {
                return Err(GroupError::Config(format!(
                    "both data_dir({}) and in_memory() given: choose one",
                    dir.display()
                )));
            }
            _ => {}
        }
        let (min, max) = self.election;
        if self.heartbeat.is_zero() || min <= self.heartbeat || max <= min {
            return Err(GroupError::Config(format!(
                "timings: need 0 < heartbeat ({:?}) < election min ({min:?}) < election max ({max:?})",
                self.heartbeat
            )));
        }
        if max > Duration::from_secs(60) {
            return Err(GroupError::Config(format!(
                "election max {max:?} is over 60 s"
            )));
        }
        Ok((id, members, transport))
    }

    /// Starts this member: its Raft node, and on a fresh log the group's
    /// formation with the peers given (every member does the same, with
    /// the same list; openraft makes that safe).
    pub async fn start(self) -> Result<PeerGroup, GroupError> {
        let (id, members, transport) = self.check()?;
        let name: Arc<str> = Arc::from(self.name.as_str());
        let listener = match &self.listen {
            Some(addr) => Some(tokio::net::TcpListener::bind(addr).await.map_err(|e| {
                GroupError::Unavailable(format!("member {id} cannot listen on {addr}: {e}"))
            })?),
            None => None,
        };
        let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        let config = Config {
            cluster_name: self.name.clone(),
            heartbeat_interval: ms(self.heartbeat),
            election_timeout_min: ms(self.election.0),
            election_timeout_max: ms(self.election.1),
            ..Default::default()
        }
        .validate()
        .map_err(|e| GroupError::Config(format!("raft config: {e}")))?;
        let (log, machine) = match &self.data_dir {
            Some(dir) => {
                let open = |what: &str, e: std::io::Error| {
                    GroupError::Unavailable(format!("{what} in {}: {e}", dir.display()))
                };
                (
                    MemoryLog::open(dir).map_err(|e| open("the log", e))?,
                    StateMachine::open(dir).map_err(|e| open("the snapshot", e))?,
                )
            }
            None => (MemoryLog::default(), StateMachine::new()),
        };
        let raft = Raft::new(
            id,
            Arc::new(config),
            Network {
                transport: transport.clone(),
                group: name.clone(),
            },
            log,
            machine.clone(),
        )
        .await
        .map_err(|e| GroupError::Unavailable(format!("raft did not start: {e}")))?;
        let initialized = raft
            .is_initialized()
            .await
            .map_err(|e| GroupError::Unavailable(e.to_string()))?;
        if !initialized && !self.join {
            let nodes: BTreeMap<NodeId, BasicNode> = members
                .iter()
                .map(|(id, addr)| (*id, BasicNode { addr: addr.clone() }))
                .collect();
            // Another member may have formed the group first: then this
            // one has a log by now and openraft refuses, which is fine.
            if let Err(e) = raft.initialize(nodes).await {
                tracing::debug!(member = id, "initialize: {e}");
            }
        }
        let group = PeerGroup {
            inner: Arc::new(GroupInner {
                id,
                name,
                raft,
                machine,
                transport,
                members,
                tasks: std::sync::Mutex::new(Vec::new()),
                stopped: std::sync::atomic::AtomicBool::new(false),
            }),
        };
        let timer = tokio::spawn(group.inner.machine.expiry_timer());
        group
            .inner
            .tasks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(timer);
        if let Some(listener) = listener {
            let tcp = self
                .tcp
                .clone()
                .unwrap_or_else(crate::tcp::TcpTransport::new);
            let server = tcp.serve(listener, &group);
            group
                .inner
                .tasks
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(server);
        }
        Ok(group)
    }
}

/// Handles one frame from another member.
pub(crate) async fn receive(inner: &Arc<GroupInner>, frame: Bytes) -> Bytes {
    let reply = match net::decode::<Envelope>(&frame) {
        Err(why) => MessageReply::Undecodable(why),
        Ok(Envelope { group, to, .. }) if *group != *inner.name || to != inner.id => {
            tracing::warn!(
                member = inner.id,
                group = %inner.name,
                "refused a frame for member {to} of group {group:?}: a peer's address for that member leads here"
            );
            MessageReply::Misdelivered(format!(
                "a frame for member {to} of group {group:?} reached member {} of group {:?}",
                inner.id, inner.name
            ))
        }
        Ok(Envelope { message, .. }) => receive_message(inner, message).await,
    };
    net::encode(&reply)
        .unwrap_or_else(|why| net::encode(&MessageReply::Undecodable(why)).unwrap_or_default())
}

/// Handles a message meant for this member.
async fn receive_message(inner: &Arc<GroupInner>, message: Message) -> MessageReply {
    match message {
        Message::Append(rpc) => MessageReply::Append(inner.raft.append_entries(rpc).await),
        Message::Vote(rpc) => MessageReply::Vote(inner.raft.vote(rpc).await),
        Message::Snapshot(rpc) => MessageReply::Snapshot(inner.raft.install_snapshot(rpc).await),
        Message::Client {
            request,
            budget_us,
            hops,
        } => MessageReply::Client(
            serve(inner, request, Duration::from_micros(budget_us), hops).await,
        ),
    }
}

/// Serves `request` on the member that leads the group: here, or passed
/// on to the leader this member knows of.
pub(crate) async fn serve(
    inner: &Arc<GroupInner>,
    request: Request,
    budget: Duration,
    hops: u8,
) -> Result<Reply, ServeError> {
    let deadline = Instant::now() + budget;
    let mut hops = hops;
    loop {
        let here = tokio::time::timeout_at(deadline, serve_here(inner, &request))
            .await
            .map_err(|_| ServeError::Timeout)??;
        let to = match here {
            Here::Done(reply) => return Ok(reply),
            Here::Elsewhere(Some(to)) if to != inner.id => to,
            Here::Elsewhere(_) => {
                // No leader known (an election under way): wait for one.
                let mut metrics = inner.raft.metrics();
                let known = tokio::time::timeout_at(deadline, async {
                    loop {
                        if metrics.changed().await.is_err() {
                            return false;
                        }
                        if metrics.borrow().current_leader.is_some() {
                            return true;
                        }
                    }
                })
                .await;
                match known {
                    Ok(true) => continue,
                    Ok(false) => return Err(ServeError::Unavailable("raft stopped".to_owned())),
                    Err(_) => return Err(ServeError::NoLeader),
                }
            }
        };
        if hops >= MAX_HOPS {
            return Err(ServeError::NoLeader);
        }
        hops += 1;
        let Some(addr) = leader_addr(inner, to) else {
            return Err(ServeError::NoLeader);
        };
        let left = deadline.saturating_duration_since(Instant::now());
        let message = Envelope {
            group: inner.name.to_string(),
            to,
            message: Message::Client {
                request: request.clone(),
                budget_us: table::us(left),
                hops,
            },
        };
        let frame = net::encode(&message).map_err(ServeError::Unavailable)?;
        let reply = inner
            .transport
            .call(to, &addr, frame, left)
            .await
            .map_err(|e| ServeError::Unavailable(format!("member {to}: {e}")))?;
        return match net::decode::<MessageReply>(&reply) {
            Ok(MessageReply::Client(result)) => result,
            Ok(MessageReply::Misdelivered(why)) => Err(ServeError::Unavailable(why)),
            Ok(_) => Err(ServeError::Unavailable(format!(
                "member {to} answered with another kind of reply"
            ))),
            Err(why) => Err(ServeError::Unavailable(format!("member {to}: {why}"))),
        };
    }
}

fn leader_addr(inner: &GroupInner, to: NodeId) -> Option<String> {
    let metrics = inner.raft.metrics();
    let m = metrics.borrow();
    m.membership_config
        .membership()
        .get_node(&to)
        .map(|n| n.addr.clone())
        .or_else(|| inner.members.get(&to).cloned())
}

/// Serves `request` if this member leads the group.
async fn serve_here(inner: &Arc<GroupInner>, request: &Request) -> Result<Here, ServeError> {
    let (term, leading, leader, state, member) = {
        let metrics = inner.raft.metrics();
        let m = metrics.borrow();
        (
            m.current_term,
            m.state == ServerState::Leader,
            m.current_leader,
            m.state,
            m.membership_config
                .membership()
                .nodes()
                .any(|(id, _)| *id == inner.id),
        )
    };
    // A member that has shut down, or is not (or no longer) in the group,
    // says so at once: waiting for a leader it will never hear of would
    // hold a caller (another member that still names it the leader, just
    // after it was removed) for the whole budget.
    if state == ServerState::Shutdown {
        return Err(ServeError::Unavailable(format!(
            "member {} has shut down",
            inner.id
        )));
    }
    if !member {
        return Err(ServeError::Unavailable(format!(
            "member {} is not in the group (removed, or not added yet)",
            inner.id
        )));
    }
    if !leading {
        return Ok(Here::Elsewhere(leader));
    }
    // Once per Raft term: catch the state machine up with everything
    // committed before this term, so that this member judges on the whole
    // table. Each lease already lasts a ttl from the moment this member
    // applied its last write, which came after the holder sent that write
    // (the holder's deadline counts from the send), so no lease ends here
    // sooner than its holder's deadline assumes, whichever clock the old
    // Raft leader timed it by; nothing needs extending at the takeover.
    let caught_up = inner.machine.lock().caught_up_term == Some(term);
    let mut linearized = false;
    if !caught_up {
        if let Some(elsewhere) = linearize(inner).await? {
            return Ok(elsewhere);
        }
        linearized = true;
        let mut m = inner.machine.lock();
        if m.caught_up_term != Some(term) {
            tracing::debug!(
                member = inner.id,
                term,
                "leading the group: caught up with the log"
            );
            m.caught_up_term = Some(term);
        }
    }
    match request {
        Request::Setup => {
            // Created if this call formed the table's genesis (two setups
            // racing may both say so; each then waits a ttl, harmlessly).
            // Acquires wait for the group to be a ttl old either way.
            let created = !inner.machine.lock().table.has_base();
            if let Some(elsewhere) = ensure_base(inner).await? {
                return Ok(elsewhere);
            }
            Ok(Here::Done(Reply::Setup { created }))
        }
        Request::Acquire {
            key,
            nonce,
            id,
            metadata,
            at_us,
            ttl_us,
        } => {
            if let Some(elsewhere) = ensure_base(inner).await? {
                return Ok(elsewhere);
            }
            let now = Instant::now();
            let quiet = inner.machine.lock().table.quiet_left(now, *ttl_us);
            if let Some(left) = quiet {
                // Held by nobody we know: a foreign holder that expires
                // when the group is a ttl old.
                return Ok(Here::Done(Reply::Outcome(Outcome::Held(Some(
                    HolderWire {
                        value: Vec::new(),
                        token: None,
                        revision: 0,
                        expires_in_us: Some(table::us(left)),
                    },
                )))));
            }
            let judged = inner.machine.lock().table.judge_acquire(key, now);
            match judged {
                Judged::Held(holder) => Ok(Here::Done(Reply::Outcome(Outcome::Held(Some(holder))))),
                Judged::Propose(expect) => {
                    write(
                        inner,
                        Command::Acquire {
                            key: key.clone(),
                            nonce: *nonce,
                            id: *id,
                            metadata: metadata.clone(),
                            at_us: *at_us,
                            ttl_us: *ttl_us,
                            expect,
                        },
                    )
                    .await
                }
            }
        }
        Request::Renew {
            key,
            nonce,
            ttl_us,
            metadata,
        } => {
            // The state machine is caught up for this term: a lease it
            // does not show live is not (a renewal in flight of the same
            // lease applies only if no acquire replaced it first).
            if !inner
                .machine
                .lock()
                .table
                .is_live(key, *nonce, Instant::now())
            {
                return Ok(Here::Done(Reply::Outcome(Outcome::Lost)));
            }
            write(
                inner,
                Command::Renew {
                    key: key.clone(),
                    nonce: *nonce,
                    ttl_us: *ttl_us,
                    metadata: metadata.clone(),
                },
            )
            .await
        }
        Request::Release { key, nonce } => {
            write(
                inner,
                Command::Release {
                    key: key.clone(),
                    nonce: *nonce,
                },
            )
            .await
        }
        Request::PutRaw { key, value, ttl_us } => {
            write(
                inner,
                Command::PutRaw {
                    key: key.clone(),
                    value: value.clone(),
                    ttl_us: *ttl_us,
                },
            )
            .await
        }
        Request::Register {
            key,
            id,
            value,
            ttl_us,
        } => {
            write(
                inner,
                Command::Register {
                    key: key.clone(),
                    id: *id,
                    value: value.clone(),
                    ttl_us: *ttl_us,
                },
            )
            .await
        }
        Request::Deregister { key, id } => {
            write(
                inner,
                Command::Deregister {
                    key: key.clone(),
                    id: *id,
                },
            )
            .await
        }
        Request::SetMembers { members } => set_members(inner, members).await,
        Request::Holder { key } => {
            if !linearized && let Some(elsewhere) = linearize(inner).await? {
                return Ok(elsewhere);
            }
            let holder = inner.machine.lock().table.holder(key, Instant::now());
            Ok(Here::Done(Reply::Holder(holder)))
        }
        Request::Keys => {
            if !linearized && let Some(elsewhere) = linearize(inner).await? {
                return Ok(elsewhere);
            }
            Ok(Here::Done(Reply::Keys(inner.machine.lock().table.keys())))
        }
        Request::Candidates { key } => {
            if !linearized && let Some(elsewhere) = linearize(inner).await? {
                return Ok(elsewhere);
            }
            let (list, expired) = {
                let m = inner.machine.lock();
                let now = Instant::now();
                (
                    m.table.candidates(key, now),
                    m.table.expired_candidates(key, now),
                )
            };
            if !expired.is_empty() {
                // Entries that expired are removed in the background, each
                // only if it was not written again meanwhile.
                let command = Command::Prune {
                    key: key.clone(),
                    entries: expired,
                };
                if let Err(e) = inner.raft.client_write_ff(command).await {
                    tracing::debug!("prune: {e}");
                }
            }
            Ok(Here::Done(Reply::Candidates(list)))
        }
    }
}

/// Confirms with a quorum that this member still leads and waits until
/// its state machine has applied everything committed (a linearizable
/// read). `Some` if another member leads.
async fn linearize(inner: &GroupInner) -> Result<Option<Here>, ServeError> {
    match inner.raft.ensure_linearizable().await {
        Ok(_) => Ok(None),
        Err(RaftError::APIError(CheckIsLeaderError::ForwardToLeader(f))) => {
            Ok(Some(Here::Elsewhere(f.leader_id)))
        }
        Err(RaftError::APIError(CheckIsLeaderError::QuorumNotEnough(q))) => Err(
            ServeError::Unavailable(format!("no quorum confirms this member's leadership: {q}")),
        ),
        Err(RaftError::Fatal(f)) => Err(ServeError::Unavailable(format!("raft stopped: {f}"))),
    }
}

/// Adds the members not yet in the group as learners (each call returns
/// once the learner has caught up with the log), then commits `members` as
/// the voters, by joint consensus.
async fn set_members(inner: &GroupInner, members: &[(NodeId, String)]) -> Result<Here, ServeError> {
    let known: Vec<NodeId> = {
        let metrics = inner.raft.metrics();
        let m = metrics.borrow();
        m.membership_config
            .membership()
            .nodes()
            .map(|(id, _)| *id)
            .collect()
    };
    for (id, addr) in members {
        if known.contains(id) {
            continue;
        }
        let node = BasicNode { addr: addr.clone() };
        if let Err(e) = inner.raft.add_learner(*id, node, true).await {
            return match e {
                RaftError::APIError(ClientWriteError::ForwardToLeader(f)) => {
                    Ok(Here::Elsewhere(f.leader_id))
                }
                other => Err(ServeError::Unavailable(format!(
                    "adding member {id} as a learner: {other}"
                ))),
            };
        }
    }
    let voters: std::collections::BTreeSet<NodeId> = members.iter().map(|(id, _)| *id).collect();
    match inner.raft.change_membership(voters, false).await {
        Ok(_) => Ok(Here::Done(Reply::Members)),
        Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f))) => {
            Ok(Here::Elsewhere(f.leader_id))
        }
        Err(e) => Err(ServeError::Unavailable(format!(
            "changing the members: {e}"
        ))),
    }
}

/// Fixes the token base if the group has none yet (its first entry).
async fn ensure_base(inner: &GroupInner) -> Result<Option<Here>, ServeError> {
    if inner.machine.lock().table.has_base() {
        return Ok(None);
    }
    let base = table::micros(SystemTime::now());
    write(inner, Command::Genesis { base }).await.map(|_| None)
}

/// Proposes `command` and waits until it is committed and applied here.
async fn write(inner: &GroupInner, command: Command) -> Result<Here, ServeError> {
    match inner.raft.client_write(command).await {
        Ok(response) => Ok(Here::Done(Reply::Outcome(response.data))),
        // Leadership moved while the write was proposed: it may still be
        // committed by the next leader, so it is not proposed again there
        // (the caller reads the key back, as after any lost reply).
        Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f))) => {
            Err(ServeError::Unavailable(format!(
                "leadership moved to {:?} while the write was proposed; it may still apply",
                f.leader_id
            )))
        }
        Err(RaftError::APIError(ClientWriteError::ChangeMembershipError(e))) => {
            Err(ServeError::Unavailable(e.to_string()))
        }
        Err(RaftError::Fatal(f)) => Err(ServeError::Unavailable(format!("raft stopped: {f}"))),
    }
}
