//! How members talk: the [`Transport`] a user implements (or the built-in
//! ones), the messages it carries, and their versioned codec.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use bytes::Bytes;
use openraft::BasicNode;
use openraft::error::{
    InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use serde::{Deserialize, Serialize};

use crate::group::{GroupInner, Reply, Request, ServeError};
use crate::store::{NodeId, TypeConfig};

/// The version of the wire format: the first byte of every frame.
/// Version 2 addresses every request to a group and a member.
pub const WIRE_VERSION: u8 = 2;

/// The future a [`Transport`] returns.
pub type CallFuture<'a> = Pin<Box<dyn Future<Output = Result<Bytes, TransportError>> + Send + 'a>>;

/// Carries the group's messages between members: a request frame to one
/// member, its reply frame back.
///
/// Implement it to run the group over links of your own (a message bus, an
/// existing RPC layer, a test network): send `frame` to member `to` (at
/// `addr`, the address it has in the membership), have that member pass it
/// to [`PeerGroup::receive`](crate::PeerGroup::receive), and return what
/// `receive` returned. Frames are opaque bytes, versioned by their first
/// byte; deliver them unchanged. Give up after `timeout` with
/// [`TransportError::Timeout`].
///
/// A reply that is lost, a member that is down, a link that is cut: all
/// are a [`TransportError`]; Raft retries, and no error of the transport
/// can make two members lead the group at once.
///
/// ```
/// use std::time::Duration;
/// use bytes::Bytes;
/// use leaseholder_raft::{CallFuture, NodeId, Transport, TransportError};
///
/// struct Nowhere;
///
/// impl Transport for Nowhere {
///     fn call(&self, to: NodeId, addr: &str, frame: Bytes, timeout: Duration) -> CallFuture<'_> {
///         let addr = addr.to_owned();
///         Box::pin(async move { Err(TransportError::Unreachable(format!("member {to} at {addr}"))) })
///     }
/// }
/// ```
pub trait Transport: Send + Sync + 'static {
    /// Sends `frame` to member `to` at `addr` and returns its reply.
    fn call(&self, to: NodeId, addr: &str, frame: Bytes, timeout: Duration) -> CallFuture<'_>;
}

/// Why a [`Transport`] call failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TransportError {
    /// The member could not be reached (down, refused, link cut).
    #[error("member unreachable: {0}")]
    Unreachable(String),
    /// No reply within the timeout; the message may have been delivered.
    #[error("no reply within {0:?}")]
    Timeout(Duration),
    /// The link broke or failed otherwise.
    #[error("transport failed: {0}")]
    Failed(String),
}

/// A request frame's contents: the group and member it is for, and the
/// message. A member refuses a frame meant for another group or member
/// ([`MessageReply::Misdelivered`]): a stale address, a port reused by
/// another process or a misconfigured peer list must never feed one
/// group's log into another's.
#[derive(Serialize, Deserialize)]
pub(crate) struct Envelope {
    pub(crate) group: String,
    pub(crate) to: NodeId,
    pub(crate) message: Message,
}

/// A message between members.
#[derive(Serialize, Deserialize)]
pub(crate) enum Message {
    Append(AppendEntriesRequest<TypeConfig>),
    Vote(VoteRequest<NodeId>),
    Snapshot(InstallSnapshotRequest<TypeConfig>),
    /// A lease operation forwarded to the member that leads the group.
    Client {
        request: Request,
        budget_us: u64,
        hops: u8,
    },
}

/// The reply to a [`Message`].
#[derive(Serialize, Deserialize)]
pub(crate) enum MessageReply {
    Append(Result<AppendEntriesResponse<NodeId>, RaftError<NodeId>>),
    Vote(Result<VoteResponse<NodeId>, RaftError<NodeId>>),
    Snapshot(Result<InstallSnapshotResponse<NodeId>, RaftError<NodeId, InstallSnapshotError>>),
    Client(Result<Reply, ServeError>),
    /// The frame could not be decoded (another wire version, garbage).
    Undecodable(String),
    /// The frame was for another group or member: the sender's address
    /// for its peer leads somewhere else.
    Misdelivered(String),
}

/// Encodes a value as a frame: the version byte, then postcard.
pub(crate) fn encode<T: Serialize>(value: &T) -> Result<Bytes, String> {
    let mut out = vec![WIRE_VERSION];
    postcard::to_io(value, &mut out).map_err(|e| e.to_string())?;
    Ok(Bytes::from(out))
}

/// Decodes a frame of [`encode`].
pub(crate) fn decode<'a, T: Deserialize<'a>>(frame: &'a [u8]) -> Result<T, String> {
    match frame.split_first() {
        Some((&WIRE_VERSION, body)) => postcard::from_bytes(body).map_err(|e| e.to_string()),
        Some((v, _)) => Err(format!(
            "wire version {v}, this build speaks {WIRE_VERSION}"
        )),
        None => Err("empty frame".to_owned()),
    }
}

/// openraft's network over a [`Transport`].
#[derive(Clone)]
pub(crate) struct Network {
    pub(crate) transport: Arc<dyn Transport>,
    /// The group's name, on every frame.
    pub(crate) group: Arc<str>,
}

pub(crate) struct Link {
    transport: Arc<dyn Transport>,
    group: Arc<str>,
    target: NodeId,
    addr: String,
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = Link;

    async fn new_client(&mut self, target: NodeId, node: &BasicNode) -> Link {
        Link {
            transport: self.transport.clone(),
            group: self.group.clone(),
            target,
            addr: node.addr.clone(),
        }
    }
}

impl Link {
    async fn rpc<E: std::error::Error>(
        &self,
        message: Message,
        timeout: Duration,
    ) -> Result<MessageReply, RPCError<NodeId, BasicNode, E>> {
        let envelope = Envelope {
            group: self.group.to_string(),
            to: self.target,
            message,
        };
        let frame =
            encode(&envelope).map_err(|e| RPCError::Network(NetworkError::new(&Text(e))))?;
        let reply = self
            .transport
            .call(self.target, &self.addr, frame, timeout)
            .await
            .map_err(|e| match e {
                TransportError::Unreachable(_) => RPCError::Unreachable(Unreachable::new(&e)),
                _ => RPCError::Network(NetworkError::new(&e)),
            })?;
        match decode(&reply) {
            // Whoever answers at that address is not the peer: as good as
            // unreachable (openraft backs off), never a reply to apply.
            Ok(MessageReply::Misdelivered(why)) => {
                Err(RPCError::Unreachable(Unreachable::new(&Text(why))))
            }
            Ok(reply) => Ok(reply),
            Err(e) => Err(RPCError::Network(NetworkError::new(&Text(e)))),
        }
    }
}

/// A message as an error.
#[derive(Debug)]
struct Text(String);

impl std::fmt::Display for Text {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Text {}

fn unexpected<E: std::error::Error>(reply: MessageReply) -> RPCError<NodeId, BasicNode, E> {
    let what = match reply {
        MessageReply::Undecodable(why) => format!("the member could not decode the frame: {why}"),
        MessageReply::Misdelivered(why) => why,
        _ => "a reply of another kind".to_owned(),
    };
    RPCError::Network(NetworkError::new(&Text(what)))
}

impl RaftNetwork<TypeConfig> for Link {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        match self.rpc(Message::Append(rpc), option.hard_ttl()).await? {
            MessageReply::Append(r) => {
                r.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
            }
            other => Err(unexpected(other)),
        }
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<NodeId>,
        RPCError<NodeId, BasicNode, RaftError<NodeId, InstallSnapshotError>>,
    > {
        match self.rpc(Message::Snapshot(rpc), option.hard_ttl()).await? {
            MessageReply::Snapshot(r) => {
                r.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
            }
            other => Err(unexpected(other)),
        }
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        match self.rpc(Message::Vote(rpc), option.hard_ttl()).await? {
            MessageReply::Vote(r) => {
                r.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
            }
            other => Err(unexpected(other)),
        }
    }
}

/// An in-process network of groups, for tests and examples that run every
/// member in one process: each member's [`transport`](Self::transport)
/// delivers frames straight to the other members'
/// [`receive`](crate::PeerGroup::receive), and links can be cut to make
/// partitions.
///
/// ```
/// use leaseholder_raft::LocalNet;
///
/// let net = LocalNet::new();
/// let t1 = net.transport(1);
/// net.isolate(1); // member 1 can neither send nor receive
/// net.heal();
/// # let _ = t1;
/// ```
#[derive(Default)]
pub struct LocalNet {
    members: Mutex<HashMap<NodeId, Weak<GroupInner>>>,
    cut: Mutex<HashSet<(NodeId, NodeId)>>,
}

impl std::fmt::Debug for LocalNet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalNet").finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl LocalNet {
    /// An empty network.
    pub fn new() -> Arc<LocalNet> {
        Arc::new(LocalNet::default())
    }

    /// The transport member `from` sends with.
    pub fn transport(self: &Arc<Self>, from: NodeId) -> Arc<dyn Transport> {
        Arc::new(LocalLink {
            net: Arc::downgrade(self),
            from,
        })
    }

    /// Makes `group` reachable as its member id.
    pub fn attach(&self, group: &crate::PeerGroup) {
        lock(&self.members).insert(group.id(), Arc::downgrade(group.inner()));
    }

    /// Cuts the link between `a` and `b`, both ways.
    pub fn cut(&self, a: NodeId, b: NodeId) {
        let mut cut = lock(&self.cut);
        cut.insert((a, b));
        cut.insert((b, a));
    }

    /// Cuts every link of `member`.
    pub fn isolate(&self, member: NodeId) {
        let ids: Vec<NodeId> = lock(&self.members).keys().copied().collect();
        for other in ids {
            if other != member {
                self.cut(member, other);
            }
        }
    }

    /// Restores every link.
    pub fn heal(&self) {
        lock(&self.cut).clear();
    }
}

struct LocalLink {
    net: Weak<LocalNet>,
    from: NodeId,
}

impl Transport for LocalLink {
    fn call(&self, to: NodeId, _addr: &str, frame: Bytes, timeout: Duration) -> CallFuture<'_> {
        Box::pin(async move {
            let net = self
                .net
                .upgrade()
                .ok_or_else(|| TransportError::Unreachable("the network is gone".to_owned()))?;
            if lock(&net.cut).contains(&(self.from, to)) {
                return Err(TransportError::Unreachable(format!(
                    "link {} to {to} is cut",
                    self.from
                )));
            }
            let member = lock(&net.members).get(&to).and_then(Weak::upgrade);
            let Some(member) = member else {
                return Err(TransportError::Unreachable(format!(
                    "member {to} is not up"
                )));
            };
            let reply = tokio::time::timeout(timeout, crate::group::receive(&member, frame))
                .await
                .map_err(|_| TransportError::Timeout(timeout))?;
            // A reply across a link cut meanwhile is lost.
            if lock(&net.cut).contains(&(to, self.from)) {
                return Err(TransportError::Timeout(timeout));
            }
            Ok(reply)
        })
    }
}
