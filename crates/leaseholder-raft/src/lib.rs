//! A peer group with no store: the replicas of a service elect a leader
//! among themselves on a Raft group (the [openraft] engine) of which each
//! replica is a member, and the group is a [`leaseholder::Backend`] like
//! any store, so [`leaseholder::Leader`] works on it unchanged: terms,
//! fencing tokens, deadlines, handoff, observers, candidates.
//!
//! ```
//! # #[tokio::main(flavor = "multi_thread", worker_threads = 2)]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use std::time::Duration;
//! use leaseholder::Leader;
//! use leaseholder_raft::{LocalNet, PeerGroup};
//!
//! // Three members in one process, linked by an in-process network
//! // (real deployments give each process its own member and a transport
//! // between them).
//! let net = LocalNet::new();
//! let peers = [(1, "m1"), (2, "m2"), (3, "m3")];
//! let mut members = Vec::new();
//! for id in 1..=3 {
//!     let group = PeerGroup::builder()
//!         .node_id(id)
//!         .peers(peers)
//!         .transport(net.transport(id))
//!         .in_memory()
//!         .start()
//!         .await?;
//!     net.attach(&group);
//!     members.push(group);
//! }
//! members[0].wait_for_leader(Duration::from_secs(10)).await?;
//!
//! let leader = Leader::builder("scheduler")
//!     .backend(members[1].backend())
//!     .ttl(Duration::from_secs(2))
//!     .build()?;
//! leader
//!     .acquire_and_run(|term| async move {
//!         println!("leading with token {}", term.fencing_token());
//!         Ok::<_, std::io::Error>(())
//!     })
//!     .await?;
//! leader.shutdown().await?;
//! # for m in &members { m.shutdown().await; }
//! # Ok(())
//! # }
//! ```
//!
//! # How the group keeps the lease contract
//!
//! - **A replicated lease table.** Acquire, renew, release and the
//!   candidate registry are commands in the Raft log, applied in log order
//!   by every member; reads (`holder`, `candidates`) are linearizable, on
//!   the member that leads the group after a quorum confirms it still
//!   does. Every call a member's backend makes is served there, forwarded
//!   over the transport.
//! - **Expiry on the Raft leader's clock.** Each member times every lease
//!   on its own monotonic clock from the moment it applied the lease's
//!   last write. The member that leads the group judges expiry, and an
//!   acquire of an expired lease carries that lease's revision as a
//!   condition, so a renewal that landed first makes the acquire fail.
//!   When a member takes over the group's leadership it first applies
//!   everything committed before, then judges by its own deadlines. It
//!   applied every write after the holder sent it, and the holder's
//!   deadline counts from the send, so no lease ends sooner than its
//!   holder's deadline assumes, whatever the old leader's clock said, and
//!   nothing is extended at the takeover. (etcd's lessor extends every
//!   lease by a full ttl when its leader changes because its keep-alives
//!   are not in the log; every renewal here is, so that would only make a
//!   lease whose holder died with the Raft leader outlive its ttl by the
//!   election.)
//! - **A deposed leader cannot grant.** Writes need a quorum to commit and
//!   reads a quorum's confirmation, so a member cut off in a minority
//!   neither grants nor renews, and openraft's leader lease keeps the
//!   majority from electing a new leader while the old one's is live.
//! - **Fencing tokens.** A lease's token is the log index of the acquire
//!   that created it plus the group's base (its birth in microseconds), so
//!   tokens rise for the group's whole life.
//! - **A new group waits a ttl.** A group formed again from empty data
//!   directories knows nothing of the old group's leases, which may still
//!   be led: no acquire succeeds until the group is one ttl old, measured
//!   on the Raft leader's monotonic clock from when it applied the group's
//!   first entry (later than the group's birth, never earlier); an acquire
//!   before then finds a foreign holder that expires at that moment.
//!
//! # Storage and transport
//!
//! A member keeps its log, votes and snapshot in its data directory
//! ([`PeerGroupBuilder::data_dir`]), fsynced before the group counts a
//! write; [`PeerGroupBuilder::in_memory`] is for tests (read what it gives
//! up). Members talk over the built-in [`TcpTransport`]
//! ([`PeerGroupBuilder::tcp`]), your own [`Transport`], or the in-process
//! [`LocalNet`].
//!
//! # Membership
//!
//! The members are explicit: every member is started with the same
//! [`peers`](PeerGroupBuilder::peers) when the group is first formed. To
//! change them at run time, start a new member with
//! [`join`](PeerGroupBuilder::join) (it forms no group of its own) and
//! call [`PeerGroup::set_members`] on any member with the new list: new
//! members are added as learners and caught up first, then the change
//! commits by joint consensus. Leases live in the replicated table, so a
//! term survives a change of members, also the removal of the member that
//! leads the group.
//!
//! [openraft]: https://docs.rs/openraft

mod backend;
mod disk;
mod error;
mod group;
mod members;
mod net;
mod store;
mod table;
mod tcp;

pub use error::GroupError;
pub use group::{PeerGroup, PeerGroupBuilder};
pub use members::parse_members;
pub use net::{CallFuture, LocalNet, Transport, TransportError, WIRE_VERSION};
pub use store::NodeId;
pub use tcp::{DEFAULT_MAX_FRAME, TcpTransport};
