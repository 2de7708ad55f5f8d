//! The durable log: an append-only file of records in the member's data
//! directory, fsynced before openraft is told a write is done, and the
//! state machine's snapshot next to it.
//!
//! Each record is `len (u32, LE) | checksum (u64, LE, FNV-1a of the body) |
//! body (postcard)`. On start the file is replayed into memory; a record
//! cut short or failing its checksum at the tail (a crash while writing,
//! never acknowledged) ends the replay, and the file is truncated there.
//! Reads are served from memory. When the log is purged after a snapshot
//! and the file has grown to several times what is live, it is rewritten
//! into a new file that replaces the old one atomically.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use openraft::{Entry, LogId, RaftLogId, Vote};
use serde::{Deserialize, Serialize};

use crate::store::{NodeId, TypeConfig};

const LOG: &str = "raft.log";
const SNAPSHOT: &str = "snapshot.bin";
/// The file is rewritten when it holds more than this many bytes and
/// more than four times the live records' size.
const COMPACT_AT: u64 = 4 << 20;

#[derive(Serialize, Deserialize)]
enum Record {
    Entries(Vec<Entry<TypeConfig>>),
    Truncate(u64),
    Purge(LogId<NodeId>),
    Vote(Vote<NodeId>),
    Committed(Option<LogId<NodeId>>),
}

/// What a replay found.
#[derive(Default)]
pub(crate) struct Replayed {
    pub(crate) log: BTreeMap<u64, Entry<TypeConfig>>,
    pub(crate) last_purged: Option<LogId<NodeId>>,
    pub(crate) vote: Option<Vote<NodeId>>,
    pub(crate) committed: Option<LogId<NodeId>>,
}

/// The open log file.
pub(crate) struct LogFile {
    dir: PathBuf,
    file: File,
    size: u64,
}

fn fnv(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

fn frame(record: &Record) -> io::Result<Vec<u8>> {
    let body = postcard::to_stdvec(record).map_err(io::Error::other)?;
    let len = u32::try_from(body.len()).map_err(|_| io::Error::other("a log record over 4 GiB"))?;
    let mut out = Vec::with_capacity(body.len() + 12);
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&fnv(&body).to_le_bytes());
    out.extend_from_slice(&body);
    Ok(out)
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

impl Replayed {
    fn apply(&mut self, record: Record) {
        match record {
            Record::Entries(entries) => {
                for e in entries {
                    self.log.insert(e.get_log_id().index, e);
                }
            }
            Record::Truncate(index) => {
                let _ = self.log.split_off(&index);
            }
            Record::Purge(id) => {
                if self.last_purged < Some(id) {
                    self.last_purged = Some(id);
                }
                self.log = self.log.split_off(&(id.index + 1));
            }
            Record::Vote(v) => self.vote = Some(v),
            Record::Committed(c) => self.committed = c,
        }
    }
}

impl LogFile {
    /// Opens (or creates) the log in `dir` and replays it.
    pub(crate) fn open(dir: &Path) -> io::Result<(LogFile, Replayed)> {
        fs::create_dir_all(dir)?;
        let path = dir.join(LOG);
        let mut file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(&path)?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)?;
        let mut replayed = Replayed::default();
        let mut at = 0usize;
        while let Some(head) = bytes.get(at..at + 12) {
            let len = u32::from_le_bytes([head[0], head[1], head[2], head[3]]) as usize;
            let sum = u64::from_le_bytes([
                head[4], head[5], head[6], head[7], head[8], head[9], head[10], head[11],
            ]);
            let Some(body) = bytes.get(at + 12..at + 12 + len) else {
                break;
            };
            if fnv(body) != sum {
                break;
            }
            let Ok(record) = postcard::from_bytes::<Record>(body) else {
                break;
            };
            replayed.apply(record);
            at += 12 + len;
        }
        if at < bytes.len() {
            tracing::warn!(
                path = %path.display(),
                kept = at,
                dropped = bytes.len() - at,
                "the log ends in a record cut short (a crash while writing): dropped"
            );
            file.set_len(at as u64)?;
            file.sync_all()?;
        }
        Ok((
            LogFile {
                dir: dir.to_owned(),
                file,
                size: at as u64,
            },
            replayed,
        ))
    }

    fn write(&mut self, record: &Record) -> io::Result<()> {
        let bytes = frame(record)?;
        self.file.write_all(&bytes)?;
        self.file.sync_data()?;
        self.size += bytes.len() as u64;
        Ok(())
    }

    pub(crate) fn append(&mut self, entries: Vec<Entry<TypeConfig>>) -> io::Result<()> {
        self.write(&Record::Entries(entries))
    }

    pub(crate) fn truncate(&mut self, index: u64) -> io::Result<()> {
        self.write(&Record::Truncate(index))
    }

    pub(crate) fn vote(&mut self, vote: Vote<NodeId>) -> io::Result<()> {
        self.write(&Record::Vote(vote))
    }

    pub(crate) fn committed(&mut self, committed: Option<LogId<NodeId>>) -> io::Result<()> {
        self.write(&Record::Committed(committed))
    }

    /// Records the purge, and rewrites the file if it has grown to
    /// several times the live state (`state`, after the purge).
    pub(crate) fn purge(&mut self, id: LogId<NodeId>, state: &Replayed) -> io::Result<()> {
        self.write(&Record::Purge(id))?;
        if self.size < COMPACT_AT {
            return Ok(());
        }
        let mut live = Vec::new();
        if let Some(v) = state.vote {
            live.extend(frame(&Record::Vote(v))?);
        }
        live.extend(frame(&Record::Committed(state.committed))?);
        if let Some(p) = state.last_purged {
            live.extend(frame(&Record::Purge(p))?);
        }
        live.extend(frame(&Record::Entries(
            state.log.values().cloned().collect(),
        ))?);
        if (live.len() as u64).saturating_mul(4) > self.size {
            return Ok(());
        }
        let tmp = self.dir.join(format!("{LOG}.tmp"));
        {
            let mut f = File::create(&tmp)?;
            f.write_all(&live)?;
            f.sync_all()?;
        }
        fs::rename(&tmp, self.dir.join(LOG))?;
        sync_dir(&self.dir)?;
        self.file = OpenOptions::new()
            .read(true)
            .append(true)
            .open(self.dir.join(LOG))?;
        self.size = live.len() as u64;
        Ok(())
    }
}

/// Writes the state machine's snapshot (`meta` and `data`, already
/// encoded) into `dir` atomically.
pub(crate) fn save_snapshot(dir: &Path, bytes: &[u8]) -> io::Result<()> {
    let tmp = dir.join(format!("{SNAPSHOT}.tmp"));
    {
        let mut f = File::create(&tmp)?;
        f.write_all(&(fnv(bytes)).to_le_bytes())?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    fs::rename(&tmp, dir.join(SNAPSHOT))?;
    sync_dir(dir)
}

/// The snapshot saved in `dir`, if there is one that is whole.
pub(crate) fn load_snapshot(dir: &Path) -> io::Result<Option<Vec<u8>>> {
    let bytes = match fs::read(dir.join(SNAPSHOT)) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let Some((head, body)) = bytes.split_at_checked(8) else {
        return Err(io::Error::other("the snapshot file is cut short"));
    };
    let mut sum = [0u8; 8];
    sum.copy_from_slice(head);
    if u64::from_le_bytes(sum) != fnv(body) {
        return Err(io::Error::other("the snapshot file fails its checksum"));
    }
    Ok(Some(body.to_vec()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use openraft::{CommittedLeaderId, EntryPayload};

    fn entry(index: u64) -> Entry<TypeConfig> {
        Entry {
            log_id: LogId::new(CommittedLeaderId::new(1, 1), index),
            payload: EntryPayload::Blank,
        }
    }

    fn dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!(
            "leaseholder-raft-disk-{name}-{}",
            std::process::id()
        ));
        let _ = fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn a_replay_gives_back_what_was_written_and_drops_a_torn_tail() -> io::Result<()> {
        let d = dir("replay");
        {
            let (mut f, state) = LogFile::open(&d)?;
            assert!(state.log.is_empty());
            f.append((1..=5).map(entry).collect())?;
            f.truncate(4)?;
            f.vote(Vote::new(3, 2))?;
            f.committed(Some(*entry(3).get_log_id()))?;
        }
        // A crash while writing the next record: half a header.
        let mut raw = OpenOptions::new().append(true).open(d.join(LOG))?;
        raw.write_all(&[9, 0, 0])?;
        drop(raw);
        let size = fs::metadata(d.join(LOG))?.len();
        let (_, state) = LogFile::open(&d)?;
        assert_eq!(state.log.keys().copied().collect::<Vec<_>>(), vec![1, 2, 3]);
        assert_eq!(state.vote, Some(Vote::new(3, 2)));
        assert_eq!(state.committed.map(|c| c.index), Some(3));
        assert_eq!(
            fs::metadata(d.join(LOG))?.len(),
            size - 3,
            "the torn tail is cut off"
        );
        fs::remove_dir_all(&d)
    }

    #[test]
    fn a_purge_that_leaves_little_live_rewrites_the_file() -> io::Result<()> {
        let d = dir("compact");
        let (mut f, mut state) = LogFile::open(&d)?;
        // Enough entries to pass the compaction size.
        let big: Vec<_> = (1..=50_000)
            .map(|i| Entry {
                payload: EntryPayload::Normal(crate::table::Command::PutRaw {
                    key: format!("key-{i}"),
                    value: vec![7; 100],
                    ttl_us: 1,
                }),
                ..entry(i)
            })
            .collect();
        for chunk in big.chunks(10_000) {
            f.append(chunk.to_vec())?;
            for e in chunk {
                state.log.insert(e.get_log_id().index, e.clone());
            }
        }
        let before = fs::metadata(d.join(LOG))?.len();
        assert!(before > COMPACT_AT, "{before}");
        let purged = *entry(49_990).get_log_id();
        state.apply(Record::Purge(purged));
        f.purge(purged, &state)?;
        let after = fs::metadata(d.join(LOG))?.len();
        assert!(after * 100 < before, "{after} of {before}");
        let (_, back) = LogFile::open(&d)?;
        assert_eq!(back.log.len(), 10);
        assert_eq!(back.last_purged, Some(purged));
        fs::remove_dir_all(&d)
    }

    #[test]
    fn a_snapshot_is_saved_whole_or_reported() -> io::Result<()> {
        let d = dir("snapshot");
        fs::create_dir_all(&d)?;
        assert_eq!(load_snapshot(&d)?, None);
        save_snapshot(&d, b"table")?;
        assert_eq!(load_snapshot(&d)?, Some(b"table".to_vec()));
        let mut bytes = fs::read(d.join(SNAPSHOT))?;
        if let Some(last) = bytes.last_mut() {
            *last ^= 1;
        }
        fs::write(d.join(SNAPSHOT), bytes)?;
        assert!(load_snapshot(&d).is_err());
        fs::remove_dir_all(&d)
    }
}
