//! openraft's storage for the group: the log (in memory) and the state
//! machine that applies it to the lease [`Table`].

// openraft's storage error is large; it is openraft's type.
#![allow(clippy::result_large_err)]

use std::fmt::Debug;
use std::io::Cursor;
use std::ops::RangeBounds;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use leaseholder::WatchEvent;
use openraft::storage::{LogFlushed, RaftLogStorage, RaftStateMachine, Snapshot};
use openraft::{
    BasicNode, Entry, EntryPayload, LogId, LogState, RaftLogId, RaftLogReader, RaftSnapshotBuilder,
    SnapshotMeta, StorageError, StorageIOError, StoredMembership, Vote,
};
use tokio::sync::{Notify, broadcast};
use tokio::time::Instant;

use crate::disk::{self, LogFile, Replayed};
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

/// The Raft log, served from memory; with a data directory every write
/// is also in the log file, fsynced before openraft hears it is done.
#[derive(Clone, Default)]
pub(crate) struct MemoryLog {
    inner: Arc<Mutex<LogInner>>,
}

#[derive(Default)]
struct LogInner {
    state: Replayed,
    disk: Option<LogFile>,
}

fn io_err(e: &std::io::Error) -> StorageError<NodeId> {
    StorageIOError::write_logs(e).into()
}

impl MemoryLog {
    /// Runs `f` on the log: on a blocking thread if the log has a file
    /// (its writes fsync, which must not stall the runtime's workers),
    /// else here.
    async fn with<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut LogInner) -> T + Send + 'static,
    ) -> Result<T, StorageError<NodeId>> {
        if lock(&self.inner).disk.is_none() {
            return Ok(f(&mut lock(&self.inner)));
        }
        let inner = Arc::clone(&self.inner);
        tokio::task::spawn_blocking(move || f(&mut lock(&inner)))
            .await
            .map_err(|e| io_err(&std::io::Error::other(e)))
    }
}

impl MemoryLog {
    /// The log of the data directory `dir`, replayed.
    pub(crate) fn open(dir: &Path) -> std::io::Result<MemoryLog> {
        let (file, state) = LogFile::open(dir)?;
        Ok(MemoryLog {
            inner: Arc::new(Mutex::new(LogInner {
                state,
                disk: Some(file),
            })),
        })
    }
}

impl RaftLogReader<TypeConfig> for MemoryLog {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + Send>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry<TypeConfig>>, StorageError<NodeId>> {
        Ok(lock(&self.inner)
            .state
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
            .state
            .log
            .values()
            .next_back()
            .map(|e| *e.get_log_id())
            .or(inner.state.last_purged);
        Ok(LogState {
            last_purged_log_id: inner.state.last_purged,
            last_log_id: last,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> Result<(), StorageError<NodeId>> {
        let vote = *vote;
        self.with(move |inner| {
            if let Some(d) = inner.disk.as_mut() {
                d.vote(vote).map_err(|e| io_err(&e))?;
            }
            inner.state.vote = Some(vote);
            Ok(())
        })
        .await?
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<NodeId>>, StorageError<NodeId>> {
        Ok(lock(&self.inner).state.vote)
    }

    async fn save_committed(
        &mut self,
        committed: Option<LogId<NodeId>>,
    ) -> Result<(), StorageError<NodeId>> {
        self.with(move |inner| {
            if let Some(d) = inner.disk.as_mut() {
                d.committed(committed).map_err(|e| io_err(&e))?;
            }
            inner.state.committed = committed;
            Ok(())
        })
        .await?
    }

    async fn read_committed(&mut self) -> Result<Option<LogId<NodeId>>, StorageError<NodeId>> {
        Ok(lock(&self.inner).state.committed)
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
        let entries: Vec<Entry<TypeConfig>> = entries.into_iter().collect();
        let written = self
            .with(move |inner| {
                let written = match inner.disk.as_mut() {
                    Some(d) => d.append(entries.clone()),
                    None => Ok(()),
                };
                if written.is_ok() {
                    for entry in entries {
                        inner.state.log.insert(entry.get_log_id().index, entry);
                    }
                }
                written
            })
            .await?;
        match written {
            Ok(()) => {
                callback.log_io_completed(Ok(()));
                Ok(())
            }
            Err(e) => {
                let err = io_err(&e);
                callback.log_io_completed(Err(e));
                Err(err)
            }
        }
    }

    async fn truncate(&mut self, log_id: LogId<NodeId>) -> Result<(), StorageError<NodeId>> {
        self.with(move |inner| {
            if let Some(d) = inner.disk.as_mut() {
                d.truncate(log_id.index).map_err(|e| io_err(&e))?;
            }
            let _ = inner.state.log.split_off(&log_id.index);
            Ok(())
        })
        .await?
    }

    async fn purge(&mut self, log_id: LogId<NodeId>) -> Result<(), StorageError<NodeId>> {
        self.with(move |inner| {
            if inner.state.last_purged < Some(log_id) {
                inner.state.last_purged = Some(log_id);
            }
            let keep = inner.state.log.split_off(&(log_id.index + 1));
            inner.state.log = keep;
            if let Some(d) = inner.disk.as_mut() {
                d.purge(log_id, &inner.state).map_err(|e| io_err(&e))?;
            }
            Ok(())
        })
        .await?
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
    /// up with everything committed before it.
    pub(crate) caught_up_term: Option<u64>,
    /// When the expiry timer ([`StateMachine::run_expiry`]) wakes next:
    /// the earliest deadline of a live lease it has not told of yet.
    next_expiry: Option<Instant>,
}

/// The state machine openraft drives, shared with the group's request
/// handler.
#[derive(Clone)]
pub(crate) struct StateMachine {
    inner: Arc<Mutex<Machine>>,
    events: broadcast::Sender<WatchEvent>,
    /// Wakes the expiry timer when a write set a deadline earlier than the
    /// one it sleeps until.
    expiry: Arc<Notify>,
    /// Where the snapshot is kept (a durable member), if anywhere.
    dir: Option<PathBuf>,
}

/// A snapshot as saved in the data directory.
#[derive(serde::Serialize, serde::Deserialize)]
struct Saved {
    meta: SnapshotMeta<NodeId, BasicNode>,
    data: Vec<u8>,
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
                next_expiry: None,
            })),
            events,
            expiry: Arc::new(Notify::new()),
            dir: None,
        }
    }

    /// Tells this member's watchers, with [`WatchEvent::Released`], of each
    /// lease that expires on this member's clock, once per write, so that
    /// followers try the key at once rather than at their own timers (the
    /// expiry hint plus a spread of up to a tenth of the retry interval).
    /// Runs until the member is gone (`machine` no longer upgrades) or the
    /// task is aborted at shutdown.
    ///
    /// Only a wake-up: the Raft leader still judges every acquire on its
    /// own deadlines, so a member whose clock ends a lease before the
    /// leader's does costs the follower one acquire that finds it held.
    async fn run_expiry(
        machine: std::sync::Weak<Mutex<Machine>>,
        expiry: Arc<Notify>,
        events: broadcast::Sender<WatchEvent>,
    ) {
        loop {
            let Some(inner) = machine.upgrade() else {
                return;
            };
            let (expired, next) = {
                let mut m = lock(&inner);
                let (expired, next) = m.table.tell_expired(Instant::now());
                m.next_expiry = next;
                (expired, next)
            };
            drop(inner);
            for key in expired {
                if let Ok(key) = leaseholder::Key::new(key) {
                    // No subscriber is fine: nobody watches.
                    let _ = events.send(WatchEvent::Released(key));
                }
            }
            match next {
                Some(at) => {
                    tokio::select! {
                        () = tokio::time::sleep_until(at) => {}
                        () = expiry.notified() => {}
                    }
                }
                None => expiry.notified().await,
            }
        }
    }

    /// The expiry timer of this machine ([`run_expiry`](Self::run_expiry)),
    /// as a future to spawn.
    pub(crate) fn expiry_timer(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        StateMachine::run_expiry(
            Arc::downgrade(&self.inner),
            self.expiry.clone(),
            self.events.clone(),
        )
    }

    /// Wakes the expiry timer if a write since the last call set a deadline
    /// earlier than the one it sleeps until (or it sleeps with none).
    fn wake_expiry(&self, m: &mut Machine) {
        if let Some(earliest) = m.table.take_earliest_set()
            && m.next_expiry.is_none_or(|next| earliest < next)
        {
            m.next_expiry = Some(earliest);
            self.expiry.notify_one();
        }
    }

    /// The state machine of the data directory `dir`: its saved snapshot
    /// if there is one (openraft applies the log's committed entries after
    /// it), with every entry lasting a full ttl from now.
    pub(crate) fn open(dir: &Path) -> std::io::Result<StateMachine> {
        let mut sm = StateMachine::new();
        sm.dir = Some(dir.to_owned());
        if let Some(bytes) = disk::load_snapshot(dir)? {
            let saved: Saved = postcard::from_bytes(&bytes).map_err(std::io::Error::other)?;
            let mut table: Table =
                postcard::from_bytes(&saved.data).map_err(std::io::Error::other)?;
            table.arm(Instant::now());
            let mut m = sm.lock();
            m.table = table;
            m.last_applied = saved.meta.last_log_id;
            m.membership = saved.meta.last_membership.clone();
            m.snapshot = Some((saved.meta, saved.data));
            drop(m);
        }
        Ok(sm)
    }

    /// Saves the snapshot, if this member is durable.
    fn save(
        &self,
        meta: &SnapshotMeta<NodeId, BasicNode>,
        data: &[u8],
    ) -> Result<(), StorageError<NodeId>> {
        let Some(dir) = &self.dir else {
            return Ok(());
        };
        let saved = Saved {
            meta: meta.clone(),
            data: data.to_vec(),
        };
        let bytes = postcard::to_stdvec(&saved)
            .map_err(|e| StorageIOError::write_snapshot(Some(meta.signature()), &e))?;
        disk::save_snapshot(dir, &bytes)
            .map_err(|e| StorageIOError::write_snapshot(Some(meta.signature()), &e).into())
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
        drop(m);
        self.save(&meta, &data)?;
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
            self.wake_expiry(&mut m);
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
        self.save(meta, &data)?;
        {
            let mut m = self.lock();
            m.table = table;
            m.last_applied = meta.last_log_id;
            m.membership = meta.last_membership.clone();
            m.snapshot = Some((meta.clone(), data));
            m.caught_up_term = None;
            // A new table: the timer looks at it afresh.
            m.next_expiry = None;
            self.wake_expiry(&mut m);
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
