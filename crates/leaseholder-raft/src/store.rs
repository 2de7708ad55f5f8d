//! openraft's storage for the group: the log (in memory) and the state
//! machine that applies it to the lease [`Table`].

// openraft's storage error is large; it is openraft's type.
#![allow(clippy::result_large_err)]

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::io::Cursor;
use std::ops::RangeBounds;
use std::sync::{Arc, Mutex, MutexGuard};

use leaseholder::WatchEvent;
use openraft::storage::{LogFlushed, RaftLogStorage, RaftStateMachine, Snapshot};
use openraft::{
    BasicNode, Entry, EntryPayload, LogId, LogState, RaftLogId, RaftLogReader, RaftSnapshotBuilder,
    SnapshotMeta, StorageError, StorageIOError, StoredMembership, Vote,
};
use tokio::sync::broadcast;
use tokio::time::Instant;

use crate::table::{Command, Outcome, Table};

/// A member's id in the group.
pub type NodeId = u64;

openraft::declare_raft_types!(
    /// The group's openraft types: commands of the lease table in the log.
    pub(crate) TypeConfig:
        D = Command,
        R = Outcome,
        NodeId = NodeId,
        Node = BasicNode,
);

pub(crate) type Raft = openraft::Raft<TypeConfig>;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The log in memory: lost when the process ends (see the crate docs on
/// what that gives up).
#[derive(Clone, Default)]
pub(crate) struct MemoryLog {
    inner: Arc<Mutex<LogInner>>,
}

#[derive(Default)]
struct LogInner {
    last_purged: Option<LogId<NodeId>>,
    log: BTreeMap<u64, Entry<TypeConfig>>,
    committed: Option<LogId<NodeId>>,
    vote: Option<Vote<NodeId>>,
}

impl RaftLogReader<TypeConfig> for MemoryLog {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + Send>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry<TypeConfig>>, StorageError<NodeId>> {
        Ok(lock(&self.inner)
            .log
            .range(range)
            .map(|(_, e)| e.clone())
            .collect())
    }
}

impl RaftLogStorage<TypeConfig> for MemoryLog {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError<NodeId>> {
        let inner = lock(&self.inner);
        let last = inner
            .log
            .values()
            .next_back()
            .map(|e| *e.get_log_id())
            .or(inner.last_purged);
        Ok(LogState {
            last_purged_log_id: inner.last_purged,
            last_log_id: last,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> Result<(), StorageError<NodeId>> {
        lock(&self.inner).vote = Some(*vote);
        Ok(())
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<NodeId>>, StorageError<NodeId>> {
        Ok(lock(&self.inner).vote)
    }

    async fn save_committed(
        &mut self,
        committed: Option<LogId<NodeId>>,
    ) -> Result<(), StorageError<NodeId>> {
        lock(&self.inner).committed = committed;
        Ok(())
    }

    async fn read_committed(&mut self) -> Result<Option<LogId<NodeId>>, StorageError<NodeId>> {
        Ok(lock(&self.inner).committed)
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<TypeConfig>,
    ) -> Result<(), StorageError<NodeId>>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + Send,
        I::IntoIter: Send,
    {
        {
            let mut inner = lock(&self.inner);
            for entry in entries {
                inner.log.insert(entry.get_log_id().index, entry);
            }
        }
        callback.log_io_completed(Ok(()));
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId<NodeId>) -> Result<(), StorageError<NodeId>> {
        let mut inner = lock(&self.inner);
        let _ = inner.log.split_off(&log_id.index);
        Ok(())
    }

    async fn purge(&mut self, log_id: LogId<NodeId>) -> Result<(), StorageError<NodeId>> {
        let mut inner = lock(&self.inner);
        if inner.last_purged < Some(log_id) {
            inner.last_purged = Some(log_id);
        }
        let keep = inner.log.split_off(&(log_id.index + 1));
        inner.log = keep;
        Ok(())
    }
}

/// The state of one member's state machine.
pub(crate) struct Machine {
    pub(crate) table: Table,
    last_applied: Option<LogId<NodeId>>,
    membership: StoredMembership<NodeId, BasicNode>,
    snapshot: Option<(SnapshotMeta<NodeId, BasicNode>, Vec<u8>)>,
    snapshots: u64,
    /// The Raft term in which this member, as the Raft leader, last caught
    /// up and extended every lease (see [`Table::extend_all`]).
    pub(crate) caught_up_term: Option<u64>,
}

/// The state machine openraft drives, shared with the group's request
/// handler.
#[derive(Clone)]
pub(crate) struct StateMachine {
    inner: Arc<Mutex<Machine>>,
    events: broadcast::Sender<WatchEvent>,
}

impl StateMachine {
    pub(crate) fn new() -> StateMachine {
        let (events, _) = broadcast::channel(1024);
        StateMachine {
            inner: Arc::new(Mutex::new(Machine {
                table: Table::default(),
                last_applied: None,
                membership: StoredMembership::default(),
                snapshot: None,
                snapshots: 0,
                caught_up_term: None,
            })),
            events,
        }
    }

    /// The machine, locked (never across an await).
    pub(crate) fn lock(&self) -> MutexGuard<'_, Machine> {
        lock(&self.inner)
    }

    /// A subscription to the events of every applied write.
    pub(crate) fn subscribe(&self) -> broadcast::Receiver<WatchEvent> {
        self.events.subscribe()
    }

    fn build(&self) -> Result<Snapshot<TypeConfig>, StorageError<NodeId>> {
        let mut m = self.lock();
        let data =
            postcard::to_stdvec(&m.table).map_err(|e| StorageIOError::read_state_machine(&e))?;
        m.snapshots += 1;
        let snapshot_id = match m.last_applied {
            Some(last) => format!("{}-{}-{}", last.leader_id, last.index, m.snapshots),
            None => format!("--{}", m.snapshots),
        };
        let meta = SnapshotMeta {
            last_log_id: m.last_applied,
            last_membership: m.membership.clone(),
            snapshot_id,
        };
        m.snapshot = Some((meta.clone(), data.clone()));
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(data)),
        })
    }
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachine {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError<NodeId>> {
        self.build()
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotBuilder = Self;

    async fn applied_state(
        &mut self,
    ) -> Result<(Option<LogId<NodeId>>, StoredMembership<NodeId, BasicNode>), StorageError<NodeId>>
    {
        let m = self.lock();
        Ok((m.last_applied, m.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Outcome>, StorageError<NodeId>>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + Send,
        I::IntoIter: Send,
    {
        let mut outcomes = Vec::new();
        let mut events = Vec::new();
        {
            let mut m = self.lock();
            let now = Instant::now();
            for entry in entries {
                m.last_applied = Some(entry.log_id);
                match entry.payload {
                    EntryPayload::Blank => outcomes.push(Outcome::Done),
                    EntryPayload::Normal(command) => {
                        let (outcome, event) = m.table.apply(&command, entry.log_id.index, now);
                        outcomes.push(outcome);
                        events.extend(event);
                    }
                    EntryPayload::Membership(membership) => {
                        m.membership = StoredMembership::new(Some(entry.log_id), membership);
                        outcomes.push(Outcome::Done);
                    }
                }
            }
        }
        for event in events {
            // No subscriber is fine: nobody watches.
            let _ = self.events.send(event);
        }
        Ok(outcomes)
    }

    async fn begin_receiving_snapshot(
        &mut self,
    ) -> Result<Box<Cursor<Vec<u8>>>, StorageError<NodeId>> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<NodeId, BasicNode>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError<NodeId>> {
        let data = snapshot.into_inner();
        let mut table: Table = postcard::from_bytes(&data)
            .map_err(|e| StorageIOError::read_snapshot(Some(meta.signature()), &e))?;
        // The snapshot has no clock: every entry lasts a full ttl from now.
        table.arm(Instant::now());
        {
            let mut m = self.lock();
            m.table = table;
            m.last_applied = meta.last_log_id;
            m.membership = meta.last_membership.clone();
            m.snapshot = Some((meta.clone(), data));
            m.caught_up_term = None;
        }
        let _ = self.events.send(WatchEvent::Resync);
        Ok(())
    }

    async fn get_current_snapshot(
        &mut self,
    ) -> Result<Option<Snapshot<TypeConfig>>, StorageError<NodeId>> {
        Ok(self.lock().snapshot.clone().map(|(meta, data)| Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(data)),
        }))
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }
}
