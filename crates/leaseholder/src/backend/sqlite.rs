//! SQLite (feature `sqlite`): one file that the processes of one host
//! share, with no server, on [rusqlite](https://docs.rs/rusqlite) with
//! SQLite compiled in.
//!
//! One table holds the leases of any number of keys, one row per key,
//! never deleted (a released lease keeps its row, so the next term's token
//! is still larger):
//!
//! ```sql
//! CREATE TABLE IF NOT EXISTS "leaseholder_leases" (
//!     key        TEXT PRIMARY KEY NOT NULL,
//!     term       INTEGER NOT NULL,  -- the fencing token
//!     nonce      BLOB,              -- NULL when free
//!     value      BLOB,              -- holder id and metadata
//!     expires_at INTEGER,           -- CLOCK_BOOTTIME nanoseconds; NULL when free
//!     boot_id    TEXT,              -- the boot that clock belongs to
//!     revision   INTEGER NOT NULL
//! ) STRICT;
//! ```
//!
//! A second table in the same file, named after the first, holds the
//! candidate registry, one row per entry:
//!
//! ```sql
//! CREATE TABLE IF NOT EXISTS "leaseholder_leases_candidates" (
//!     key        TEXT NOT NULL,
//!     id         BLOB NOT NULL,     -- the candidate's id (16 bytes)
//!     value      BLOB NOT NULL,     -- the encoded entry
//!     expires_at INTEGER NOT NULL,  -- CLOCK_BOOTTIME nanoseconds
//!     boot_id    TEXT NOT NULL,     -- the boot that clock belongs to
//!     PRIMARY KEY (key, id)
//! ) STRICT, WITHOUT ROWID;
//! ```
//!
//! **Expiry by the host's monotonic clock.** A lease expires at
//! `expires_at`, in nanoseconds of the host's `CLOCK_BOOTTIME` (which,
//! unlike `CLOCK_MONOTONIC`, keeps counting while the machine is
//! suspended), stored with the boot id the kernel gives
//! (`/proc/sys/kernel/random/boot_id`). Every process on the host reads
//! the same clock, so they agree on expiry; a row written during another
//! boot is expired, since every process that held it is gone. Registry
//! entries expire by the same clock and boot id. The wall
//! clock is never used for expiry: stepping it (NTP, an operator) changes
//! nothing.
//!
//! **Tokens.** An acquire sets `term = max(term + 1, wall-clock µs since
//! the epoch)`: the wall clock only seeds tokens, so even a deleted and
//! re-created file issues larger tokens, as long as the wall clock has not
//! gone back. Tokens stay below 2^63.
//!
//! | op | how |
//! |---|---|
//! | setup | `BEGIN IMMEDIATE`; creates the table if it is missing (then [`Prepared::Created`]), and checks an existing table's columns |
//! | acquire | `BEGIN IMMEDIATE`; reads the row; if it is free, expired, or from another boot, writes the new lease with the next token |
//! | renew | `BEGIN IMMEDIATE`; extends the row if nonce and term match and it has not expired, and only if the leader's deadline (the call's budget) has not passed |
//! | proclaim | `BEGIN IMMEDIATE`; one `UPDATE` with the renewal's conditions that also writes the value with the new metadata (the token stays in `term`) |
//! | release | `BEGIN IMMEDIATE`; clears nonce, value and expiry if nonce and term match, keeping `term` |
//! | holder | one `SELECT`: the row if it is live, with the time left |
//! | register | `BEGIN IMMEDIATE`; deletes the key's expired entries (or ones from another boot), then inserts the entry or replaces the one with its id (`ON CONFLICT (key, id) DO UPDATE`), expiring a ttl from now |
//! | deregister | `BEGIN IMMEDIATE`; deletes the entry |
//! | candidates | one `SELECT` of the key's entries of this boot that expire after now |
//! | candidate | the same `SELECT` for one `(key, id)` entry |
//! | watch | polls `PRAGMA data_version` (it changes when another connection commits) every [`poll_interval`](SqliteBuilder::poll_interval); a change wakes every follower of the backend to re-read its key |
//!
//! Setup also creates the registry table if it is missing (in a file made
//! by an earlier version too) and removes every expired entry. The watch
//! sends no [`WatchEvent::Candidates`]: `data_version` cannot tell a
//! registry change from a renewal, and leaders read the registry at each
//! renew interval anyway. Every registry write is a commit, so it wakes
//! the followers of the *other* processes on the file for a re-read of
//! their keys, as a leader's renewal does.
//!
//! **The file.** The database runs in WAL mode (readers never wait for the
//! writer) with `synchronous = FULL` (a committed token survives a power
//! loss). Every write takes the write lock with `BEGIN IMMEDIATE`; the busy
//! timeout of each call is the call's budget, so a call never waits for
//! the lock longer than the campaign waits for it. The file must be on a
//! local filesystem: WAL needs shared memory between the processes, which
//! network filesystems (NFS, SMB) do not provide, and their locks are not
//! to be trusted. One host only.
//!
//! **A file deleted or replaced while in use** ends every term at once: a
//! renewal reports [`Renewed::Lost`], and an acquire or holder read is
//! [`BackendError::Misconfigured`], so the campaign stops rather than
//! carry on beside leaders of the new file. Start the process again: the
//! new backend's setup creates the table, reports [`Prepared::Created`],
//! and its campaigns wait one ttl before they acquire.
//!
//! **Errors.** `SQLITE_BUSY`, `SQLITE_LOCKED`, I/O errors, a full disk
//! and running out of memory are transient: the campaign retries them. A
//! read-only file and permission denied are [`BackendError::Denied`]; a
//! file that cannot be opened, is not a database or is corrupt is
//! [`BackendError::Misconfigured`], naming the file; anything else is
//! [`BackendError::Fatal`].
//!
//! **Platform.** Linux (and Android): the boot id and `CLOCK_BOOTTIME` are
//! Linux's. Elsewhere every call fails with
//! [`BackendError::Unsupported`].

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, TryLockError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rusqlite::{Connection, ErrorCode, OptionalExtension, TransactionBehavior, params};

use super::blocking::BlockingBackendEdge;
use super::{
    Acquired, Candidate, Claim, FencingToken, Holder, Key, LeaderId, Lease, Prepared, Renewed,
    WatchEvent,
};
use crate::error::{BackendError, ConfigError};

const DEFAULT_TABLE: &str = "leaseholder_leases";
const DEFAULT_POLL_INTERVAL: Duration = Duration::from_millis(20);

/// A SQLite file as a lease store for the processes of one host. Build
/// one with [`SqliteBackend::builder`], then wrap it with
/// [`Backend::sqlite`](crate::Backend::sqlite). Cheap to clone; clones
/// share one connection.
///
/// ```no_run
/// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
/// use leaseholder::{Backend, Leader, SqliteBackend};
///
/// let db = SqliteBackend::builder()
///     .path("/var/lib/myapp/leases.db")
///     .build()?;
/// let leader = Leader::builder("nightly-report")
///     .backend(Backend::sqlite(db))
///     .build()?;
/// leader.setup().await?; // creates the file and the table if missing
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct SqliteBackend {
    inner: Arc<Inner>,
}

struct Inner {
    path: PathBuf,
    table: String,
    /// The registry's table: `<table>_candidates`.
    candidates_table: String,
    poll_interval: Option<Duration>,
    sql: Sql,
    /// The connection, opened by the first call.
    conn: Mutex<Option<Conn>>,
    /// Set once the file was found deleted or replaced: the backend's
    /// leases are gone for good.
    moved: AtomicBool,
    /// Commits through this connection (`data_version` does not count
    /// them).
    local_writes: AtomicU64,
    /// `data_version` and `local_writes` as the last poll saw them.
    seen: Mutex<Option<(i64, u64)>>,
}

struct Conn {
    db: Connection,
    /// The file's device and inode when it was opened.
    file: Option<(u64, u64)>,
}

impl fmt::Debug for SqliteBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SqliteBackend")
            .field("path", &self.inner.path)
            .field("table", &self.inner.table)
            .field("poll_interval", &self.inner.poll_interval)
            .finish_non_exhaustive()
    }
}

/// Builds a [`SqliteBackend`]; every setting is checked by
/// [`build`](Self::build).
#[derive(Debug, Default)]
#[must_use]
pub struct SqliteBuilder {
    path: Option<PathBuf>,
    table: Option<String>,
    poll_interval: Option<Option<Duration>>,
}

impl SqliteBuilder {
    /// The database file (required). Created with the table by
    /// [`setup`](crate::Backend::setup) if it does not exist; its
    /// directory must. Every process on the host that campaigns for the
    /// same keys must name the same file, on a local filesystem.
    pub fn path(mut self, path: impl AsRef<Path>) -> Self {
        self.path = Some(path.as_ref().to_owned());
        self
    }

    /// The table's name; default `leaseholder_leases`. ASCII letters,
    /// digits and `_`, starting with a letter or `_`, at most 64 bytes, and
    /// not starting with `sqlite_`. The candidate registry's table is
    /// named after it, `<table>_candidates`.
    pub fn table(mut self, table: impl Into<String>) -> Self {
        self.table = Some(table.into());
        self
    }

    /// How often the watch polls the file for commits of other processes
    /// (`PRAGMA data_version`, a read of shared memory: cheap); default
    /// 20 ms. It bounds how soon a follower hears of a release. `None`
    /// turns the watch off: followers then wake at the lease's expiry and
    /// by the retry interval. At least 1 ms, at most 10 s.
    pub fn poll_interval(mut self, every: Option<Duration>) -> Self {
        self.poll_interval = Some(every);
        self
    }

    /// Checks the settings and builds the backend. Opens nothing yet: the
    /// first call opens the file.
    pub fn build(self) -> Result<SqliteBackend, ConfigError> {
        let bad = |problem: String| ConfigError::Backend {
            backend: "sqlite",
            problem,
        };
        let path = self
            .path
            .ok_or_else(|| bad("no database file: call .path(..)".into()))?;
        if path.as_os_str().is_empty() {
            return Err(bad("the path is empty".into()));
        }
        if path.to_str() == Some(":memory:") {
            return Err(bad(
                "\":memory:\" is private to one connection: give a file that every process \
                 opens"
                    .into(),
            ));
        }
        let table = self.table.unwrap_or_else(|| DEFAULT_TABLE.into());
        check_table_name(&table).map_err(bad)?;
        let poll_interval = self.poll_interval.unwrap_or(Some(DEFAULT_POLL_INTERVAL));
        if let Some(every) = poll_interval
            && !(Duration::from_millis(1)..=Duration::from_secs(10)).contains(&every)
        {
            return Err(bad(format!(
                "poll_interval {every:?} is outside 1 ms ..= 10 s"
            )));
        }
        let candidates_table = format!("{table}_candidates");
        let sql = Sql::new(&table, &candidates_table);
        Ok(SqliteBackend {
            inner: Arc::new(Inner {
                path,
                table,
                candidates_table,
                poll_interval,
                sql,
                conn: Mutex::new(None),
                moved: AtomicBool::new(false),
                local_writes: AtomicU64::new(0),
                seen: Mutex::new(None),
            }),
        })
    }
}

fn check_table_name(name: &str) -> Result<(), String> {
    let bad = |rule: &str| Err(format!("table name {name:?} is not allowed: {rule}"));
    if name.is_empty() || name.len() > 64 {
        return bad("it must be 1 to 64 bytes long");
    }
    if name.to_ascii_lowercase().starts_with("sqlite_") {
        return bad("names starting with sqlite_ are SQLite's own");
    }
    let mut chars = name.chars();
    if !chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
    {
        return bad("it must start with a letter or '_'");
    }
    if !chars.all(|c| c.is_ascii_alphanumeric() || c == '_') {
        return bad("use only ASCII letters, digits and '_'");
    }
    Ok(())
}

/// The statements, with the table name filled in once.
struct Sql {
    create: String,
    exists: String,
    columns: String,
    select: String,
    keys: String,
    upsert: String,
    renew: String,
    proclaim: String,
    release: String,
    create_candidates: String,
    sweep_candidates: String,
    expire_candidates: String,
    put_candidate: String,
    delete_candidate: String,
    select_candidates: String,
    select_candidate: String,
}

impl Sql {
    fn new(table: &str, candidates: &str) -> Sql {
        let t = format!("\"{table}\"");
        let c = format!("\"{candidates}\"");
        Sql {
            create_candidates: format!(
                "CREATE TABLE IF NOT EXISTS {c} (\n\
                 \x20   key        TEXT NOT NULL,\n\
                 \x20   id         BLOB NOT NULL,\n\
                 \x20   value      BLOB NOT NULL,\n\
                 \x20   expires_at INTEGER NOT NULL,\n\
                 \x20   boot_id    TEXT NOT NULL,\n\
                 \x20   PRIMARY KEY (key, id)\n\
                 ) STRICT, WITHOUT ROWID"
            ),
            // ?1 boot id, ?2 now.
            sweep_candidates: format!("DELETE FROM {c} WHERE boot_id <> ?1 OR expires_at <= ?2"),
            // ?1 key, ?2 boot id, ?3 now.
            expire_candidates: format!(
                "DELETE FROM {c} WHERE key = ?1 AND (boot_id <> ?2 OR expires_at <= ?3)"
            ),
            put_candidate: format!(
                "INSERT INTO {c} (key, id, value, expires_at, boot_id) \
                 VALUES (?1, ?2, ?3, ?4, ?5) \
                 ON CONFLICT (key, id) DO UPDATE SET value = excluded.value, \
                   expires_at = excluded.expires_at, boot_id = excluded.boot_id"
            ),
            delete_candidate: format!("DELETE FROM {c} WHERE key = ?1 AND id = ?2"),
            // ?1 key, ?2 boot id, ?3 now.
            select_candidates: format!(
                "SELECT value FROM {c} WHERE key = ?1 AND boot_id = ?2 AND expires_at > ?3"
            ),
            // ?1 key, ?2 id, ?3 boot id, ?4 now.
            select_candidate: format!(
                "SELECT value FROM {c} \
                  WHERE key = ?1 AND id = ?2 AND boot_id = ?3 AND expires_at > ?4"
            ),
            create: format!(
                "CREATE TABLE IF NOT EXISTS {t} (\n\
                 \x20   key        TEXT PRIMARY KEY NOT NULL,\n\
                 \x20   term       INTEGER NOT NULL,\n\
                 \x20   nonce      BLOB,\n\
                 \x20   value      BLOB,\n\
                 \x20   expires_at INTEGER,\n\
                 \x20   boot_id    TEXT,\n\
                 \x20   revision   INTEGER NOT NULL\n\
                 ) STRICT"
            ),
            exists: "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = ?1".into(),
            columns: "SELECT name, type, pk FROM pragma_table_info(?1)".into(),
            select: format!(
                "SELECT term, value, expires_at, boot_id, revision FROM {t} WHERE key = ?1"
            ),
            // Every key with a lease that may be live (`holder` decides).
            keys: format!("SELECT key FROM {t} WHERE expires_at IS NOT NULL"),
            upsert: format!(
                "INSERT INTO {t} (key, term, nonce, value, expires_at, boot_id, revision) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7) \
                 ON CONFLICT (key) DO UPDATE SET term = excluded.term, nonce = excluded.nonce, \
                   value = excluded.value, expires_at = excluded.expires_at, \
                   boot_id = excluded.boot_id, revision = excluded.revision"
            ),
            // ?1 expires_at, ?2 key, ?3 nonce, ?4 term, ?5 boot id, ?6 now.
            renew: format!(
                "UPDATE {t} SET expires_at = ?1, revision = revision + 1 \
                 WHERE key = ?2 AND nonce = ?3 AND term = ?4 AND boot_id = ?5 \
                   AND expires_at > ?6 \
                 RETURNING revision"
            ),
            // As `renew`, and ?7 the new value.
            proclaim: format!(
                "UPDATE {t} SET expires_at = ?1, value = ?7, revision = revision + 1 \
                 WHERE key = ?2 AND nonce = ?3 AND term = ?4 AND boot_id = ?5 \
                   AND expires_at > ?6 \
                 RETURNING revision"
            ),
            release: format!(
                "UPDATE {t} SET nonce = NULL, value = NULL, expires_at = NULL, boot_id = NULL, \
                   revision = revision + 1 \
                 WHERE key = ?1 AND nonce = ?2 AND term = ?3"
            ),
        }
    }
}

/// The host's clock for expiry: `CLOCK_BOOTTIME` in nanoseconds, and the
/// boot it belongs to.
mod clock {
    use std::sync::OnceLock;

    use crate::error::BackendError;

    /// Nanoseconds since boot.
    #[cfg(any(target_os = "linux", target_os = "android"))]
    pub(super) fn now_ns() -> Result<i64, BackendError> {
        let ts = rustix::time::clock_gettime(rustix::time::ClockId::Boottime);
        let ns = i128::from(ts.tv_sec) * 1_000_000_000 + i128::from(ts.tv_nsec);
        i64::try_from(ns).map_err(|_| BackendError::fatal("CLOCK_BOOTTIME out of range"))
    }

    #[cfg(not(any(target_os = "linux", target_os = "android")))]
    pub(super) fn now_ns() -> Result<i64, BackendError> {
        Err(unsupported())
    }

    #[cfg(not(any(target_os = "linux", target_os = "android")))]
    fn unsupported() -> BackendError {
        BackendError::Unsupported {
            what: "a boot id and CLOCK_BOOTTIME on this platform".into(),
            needed: "Linux".into(),
        }
    }

    /// This boot's id, read once.
    pub(super) fn boot_id() -> Result<&'static str, BackendError> {
        static BOOT_ID: OnceLock<Result<String, String>> = OnceLock::new();
        let id = BOOT_ID.get_or_init(|| {
            const PATH: &str = "/proc/sys/kernel/random/boot_id";
            match std::fs::read_to_string(PATH) {
                Ok(id) if !id.trim().is_empty() => Ok(id.trim().to_owned()),
                Ok(_) => Err(format!("{PATH} is empty")),
                Err(e) => Err(format!("reading {PATH}: {e}")),
            }
        });
        match id {
            Ok(id) => Ok(id),
            Err(problem) => Err(BackendError::Unsupported {
                what: format!("the host's boot id ({problem})"),
                needed: "Linux with /proc mounted".into(),
            }),
        }
    }
}

/// The wall clock in µs since the epoch: only to seed tokens.
fn wall_micros() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
}

fn nanos(d: Duration) -> i64 {
    i64::try_from(d.as_nanos()).unwrap_or(i64::MAX)
}

/// One row as [`Sql::select`] reads it.
struct Row {
    term: i64,
    value: Option<Vec<u8>>,
    expires_at: Option<i64>,
    boot_id: Option<String>,
    revision: i64,
}

impl Row {
    fn read(r: &rusqlite::Row<'_>) -> rusqlite::Result<Row> {
        Ok(Row {
            term: r.get(0)?,
            value: r.get(1)?,
            expires_at: r.get(2)?,
            boot_id: r.get(3)?,
            revision: r.get(4)?,
        })
    }

    /// The live lease in this row, if any, at `now` of boot `boot`.
    fn live(&self, now: i64, boot: &str) -> Option<Holder> {
        let expires_at = self.expires_at?;
        if self.boot_id.as_deref() != Some(boot) || expires_at <= now {
            return None;
        }
        let left = Duration::from_nanos(u64::try_from(expires_at - now).unwrap_or(0));
        Some(Holder::decode(
            self.value.as_deref().unwrap_or_default(),
            u64::try_from(self.term).ok().map(FencingToken::new),
            u64::try_from(self.revision).unwrap_or(0),
            Some(left),
        ))
    }
}

/// Why a call failed.
enum Fail {
    /// The table or the file the backend opened is gone: so are its
    /// leases. Carries what happened.
    Gone(String),
    /// Anything else.
    Other(BackendError),
}

impl From<BackendError> for Fail {
    fn from(e: BackendError) -> Fail {
        Fail::Other(e)
    }
}

/// A failure inside a call, before it is classified.
enum SqlFail {
    /// SQLite's.
    Sql(rusqlite::Error),
    /// Ours (a clock, a budget), already classified.
    Backend(BackendError),
}

impl From<rusqlite::Error> for SqlFail {
    fn from(e: rusqlite::Error) -> SqlFail {
        SqlFail::Sql(e)
    }
}

impl From<BackendError> for SqlFail {
    fn from(e: BackendError) -> SqlFail {
        SqlFail::Backend(e)
    }
}

impl SqliteBackend {
    /// Starts building a backend.
    pub fn builder() -> SqliteBuilder {
        SqliteBuilder::default()
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// The table's name.
    pub fn table(&self) -> &str {
        &self.inner.table
    }

    /// The candidate registry's table: `<table>_candidates`.
    pub fn candidates_table(&self) -> &str {
        &self.inner.candidates_table
    }

    /// The statements that create the lease table and the registry's table
    /// (what [`setup`](crate::Backend::setup) runs when they are missing).
    ///
    /// ```
    /// let db = leaseholder::SqliteBackend::builder().path("leases.db").table("leases").build()?;
    /// assert!(db.ddl().starts_with(r#"CREATE TABLE IF NOT EXISTS "leases""#));
    /// assert!(db.ddl().contains(r#"CREATE TABLE IF NOT EXISTS "leases_candidates""#));
    /// # Ok::<(), leaseholder::ConfigError>(())
    /// ```
    pub fn ddl(&self) -> String {
        format!(
            "{};\n{};\n",
            self.inner.sql.create, self.inner.sql.create_candidates
        )
    }

    fn missing_table(&self) -> String {
        format!(
            "table \"{}\" does not exist in {} (never created, or dropped while in use)",
            self.inner.table,
            self.inner.path.display()
        )
    }

    /// Maps an error; the file or table being gone is [`Fail::Gone`].
    fn classify(&self, e: SqlFail) -> Fail {
        let path = self.inner.path.display();
        let e = match e {
            SqlFail::Backend(e) => return Fail::Other(e),
            SqlFail::Sql(e) => e,
        };
        let rusqlite::Error::SqliteFailure(failure, message) = &e else {
            return Fail::Other(BackendError::fatal(format!("{path}: {e}")));
        };
        match failure.code {
            ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked => {
                Fail::Other(BackendError::unavailable(format!("{path}: {e}")))
            }
            ErrorCode::SystemIoFailure
            | ErrorCode::DiskFull
            | ErrorCode::OutOfMemory
            | ErrorCode::FileLockingProtocolFailed
            | ErrorCode::SchemaChanged => {
                Fail::Other(BackendError::unavailable(format!("{path}: {e}")))
            }
            ErrorCode::ReadOnly
                if failure.extended_code == rusqlite::ffi::SQLITE_READONLY_DBMOVED =>
            {
                self.inner.moved.store(true, Ordering::Release);
                Fail::Gone(self.moved_message())
            }
            ErrorCode::ReadOnly => Fail::Other(BackendError::denied(format!(
                "{path} is read-only for this process ({e}): the file, its directory, and its \
                 -wal and -shm files must be writable"
            ))),
            ErrorCode::PermissionDenied | ErrorCode::AuthorizationForStatementDenied => {
                Fail::Other(BackendError::denied(format!("{path}: {e}")))
            }
            ErrorCode::CannotOpen => Fail::Other(BackendError::Misconfigured {
                problem: format!("cannot open {path} ({failure})"),
                fix: "give a path in an existing directory that this process may write, on a \
                      local filesystem"
                    .into(),
            }),
            ErrorCode::DatabaseCorrupt | ErrorCode::NotADatabase => {
                Fail::Other(BackendError::Misconfigured {
                    problem: format!("{path} is not a SQLite database, or it is corrupt: {e}"),
                    fix: "point the backend at another file (tokens stay larger: they are \
                          seeded from the wall clock)"
                        .into(),
                })
            }
            _ if message.as_deref().is_some_and(|m| {
                m.starts_with("no such table") && m.contains(self.inner.candidates_table.as_str())
            }) =>
            {
                // The lease table is there (or this would have named it):
                // a file set up by an earlier version.
                Fail::Other(BackendError::Misconfigured {
                    problem: format!(
                        "table \"{}\" does not exist in {path}",
                        self.inner.candidates_table
                    ),
                    fix: "run setup (Backend::setup, or a Leader's campaign, creates it)".into(),
                })
            }
            _ if message
                .as_deref()
                .is_some_and(|m| m.starts_with("no such table")) =>
            {
                Fail::Gone(self.missing_table())
            }
            _ => Fail::Other(BackendError::fatal(format!("{path}: {e}"))),
        }
    }

    /// What a call that found the table or file gone reports when it
    /// cannot report `Lost`.
    fn gone(&self, why: String) -> BackendError {
        BackendError::Misconfigured {
            problem: why,
            fix: "start the process again: a new backend's setup creates the table and \
                  waits one ttl before its first acquire. A running campaign stops rather \
                  than lead on a new file beside leaders of the old one"
                .into(),
        }
    }

    /// Opens the file ([`open`](Self::open)), trying again until `deadline`
    /// while SQLite answers busy or locked: switching a new file to WAL mode
    /// takes an exclusive lock that another process opening it at the same
    /// moment may hold, and SQLite can report that without waiting out its
    /// busy timeout.
    fn open_until(&self, deadline: Instant) -> Result<Conn, SqlFail> {
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.open(left) {
                Err(e) if is_busy(&e) && Instant::now() + OPEN_RETRY < deadline => {
                    std::thread::sleep(OPEN_RETRY);
                }
                other => return other,
            }
        }
    }

    /// Opens the file: WAL mode, full sync.
    fn open(&self, budget: Duration) -> Result<Conn, SqlFail> {
        let db = Connection::open(&self.inner.path)?;
        db.busy_timeout(budget)?;
        let mode: String = db.query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(BackendError::Misconfigured {
                problem: format!(
                    "{} cannot be put in WAL mode (journal_mode is {mode})",
                    self.inner.path.display()
                ),
                fix: "use a file on a local filesystem".into(),
            }
            .into());
        }
        db.execute_batch("PRAGMA synchronous = FULL")?;
        Ok(Conn {
            db,
            file: file_id(&self.inner.path),
        })
    }

    /// Runs `call` on the connection (opened if need be), waiting at most
    /// `budget` for the connection and for SQLite's locks.
    fn with_conn<R>(
        &self,
        budget: Duration,
        call: impl FnOnce(&mut Connection, Instant) -> Result<R, SqlFail>,
    ) -> Result<R, Fail> {
        let deadline = Instant::now() + budget;
        if self.inner.moved.load(Ordering::Acquire) {
            return Err(Fail::Gone(self.moved_message()));
        }
        let mut guard = self.lock(deadline, budget)?;
        let left = deadline.saturating_duration_since(Instant::now());
        if guard.is_none() {
            *guard = Some(self.open_until(deadline).map_err(|e| self.classify(e))?);
        }
        let conn = guard
            .as_mut()
            .ok_or_else(|| Fail::Other(BackendError::fatal("the connection did not open")))?;
        if conn.file.is_some() && file_id(&self.inner.path) != conn.file {
            self.inner.moved.store(true, Ordering::Release);
            return Err(Fail::Gone(self.moved_message()));
        }
        conn.db
            .busy_timeout(left.min(Duration::from_millis(i32::MAX as u64)))
            .map_err(|e| self.classify(e.into()))?;
        call(&mut conn.db, deadline).map_err(|e| self.classify(e))
    }

    fn moved_message(&self) -> String {
        format!(
            "{} was deleted or replaced while in use",
            self.inner.path.display()
        )
    }

    /// Takes the connection, waiting until `deadline` at most. A poisoned
    /// lock (a panic mid-call) drops the connection: it is opened again.
    fn lock(
        &self,
        deadline: Instant,
        budget: Duration,
    ) -> Result<MutexGuard<'_, Option<Conn>>, Fail> {
        loop {
            match self.inner.conn.try_lock() {
                Ok(guard) => return Ok(guard),
                Err(TryLockError::Poisoned(poisoned)) => {
                    let mut guard = poisoned.into_inner();
                    *guard = None;
                    self.inner.conn.clear_poison();
                    return Ok(guard);
                }
                Err(TryLockError::WouldBlock) => {
                    if Instant::now() >= deadline {
                        return Err(Fail::Other(BackendError::Timeout(budget)));
                    }
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
        }
    }

    fn wrote(&self) {
        self.inner.local_writes.fetch_add(1, Ordering::AcqRel);
    }

    /// Begins a write transaction, and checks the budget has not passed
    /// while it waited for the lock.
    fn begin<'c>(
        db: &'c mut Connection,
        deadline: Instant,
        budget: Duration,
    ) -> Result<rusqlite::Transaction<'c>, SqlFail> {
        let tx = db.transaction_with_behavior(TransactionBehavior::Immediate)?;
        if Instant::now() >= deadline {
            return Err(BackendError::Timeout(budget).into());
        }
        Ok(tx)
    }
}

/// The pause between two tries to open a file that SQLite reports busy.
const OPEN_RETRY: Duration = Duration::from_millis(5);

/// Whether `e` is SQLite's busy or locked answer.
fn is_busy(e: &SqlFail) -> bool {
    matches!(
        e,
        SqlFail::Sql(rusqlite::Error::SqliteFailure(failure, _))
            if matches!(failure.code, ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked)
    )
}

/// The file's device and inode, to notice it being replaced.
#[cfg(unix)]
fn file_id(path: &Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    match std::fs::metadata(path) {
        Ok(meta) => Some((meta.dev(), meta.ino())),
        // Gone: compares unequal to the id taken at open.
        Err(_) => None,
    }
}

#[cfg(not(unix))]
fn file_id(_path: &Path) -> Option<(u64, u64)> {
    None
}

/// The lease table's columns and types.
const LEASE_COLUMNS: &[(&str, &str)] = &[
    ("key", "TEXT"),
    ("term", "INTEGER"),
    ("nonce", "BLOB"),
    ("value", "BLOB"),
    ("expires_at", "INTEGER"),
    ("boot_id", "TEXT"),
    ("revision", "INTEGER"),
];

/// The registry table's columns and types.
const CANDIDATE_COLUMNS: &[(&str, &str)] = &[
    ("key", "TEXT"),
    ("id", "BLOB"),
    ("value", "BLOB"),
    ("expires_at", "INTEGER"),
    ("boot_id", "TEXT"),
];

fn nonce_bytes(lease: &Lease) -> [u8; 16] {
    lease.nonce().to_bytes()
}

fn term_of(lease: &Lease) -> i64 {
    i64::try_from(lease.token().get()).unwrap_or(i64::MAX)
}

impl BlockingBackendEdge for SqliteBackend {
    fn name(&self) -> &'static str {
        "sqlite"
    }

    fn setup(&self, budget: Duration) -> Result<Prepared, BackendError> {
        clock::boot_id()?;
        clock::now_ns()?;
        let sql = &self.inner.sql;
        let table = self.inner.table.clone();
        let result = self.with_conn(budget, |db, deadline| {
            let tx = Self::begin(db, deadline, budget)?;
            let exists: i64 = tx.query_row(&sql.exists, [&table], |r| r.get(0))?;
            let prepared = if exists == 0 {
                tx.execute_batch(&sql.create)?;
                Prepared::Created
            } else {
                Prepared::Existing
            };
            let mut found = Vec::new();
            {
                let mut stmt = tx.prepare(&sql.columns)?;
                let mut rows = stmt.query([&table])?;
                while let Some(row) = rows.next()? {
                    let name: String = row.get(0)?;
                    let ty: String = row.get(1)?;
                    let pk: i64 = row.get(2)?;
                    found.push((name, ty, pk));
                }
            }
            self.check_columns(&self.inner.table, &found, LEASE_COLUMNS, &["key"])?;
            tx.execute_batch(&sql.create_candidates)?;
            let mut found = Vec::new();
            {
                let mut stmt = tx.prepare(&sql.columns)?;
                let mut rows = stmt.query([&self.inner.candidates_table])?;
                while let Some(row) = rows.next()? {
                    let name: String = row.get(0)?;
                    let ty: String = row.get(1)?;
                    let pk: i64 = row.get(2)?;
                    found.push((name, ty, pk));
                }
            }
            self.check_columns(
                &self.inner.candidates_table,
                &found,
                CANDIDATE_COLUMNS,
                &["key", "id"],
            )?;
            tx.execute(
                &sql.sweep_candidates,
                params![clock::boot_id()?, clock::now_ns()?],
            )?;
            tx.commit()?;
            Ok(prepared)
        });
        match result {
            Ok(prepared) => {
                if prepared == Prepared::Created {
                    self.wrote();
                }
                Ok(prepared)
            }
            Err(Fail::Gone(why)) => Err(self.gone(why)),
            Err(Fail::Other(e)) => Err(e),
        }
    }

    fn acquire(
        &self,
        key: Key,
        claim: Claim,
        ttl: Duration,
        budget: Duration,
    ) -> Result<Acquired, BackendError> {
        let boot = clock::boot_id()?;
        let sql = &self.inner.sql;
        let result = self.with_conn(budget, |db, deadline| {
            let tx = Self::begin(db, deadline, budget)?;
            let now = clock::now_ns()?;
            let row = tx
                .query_row(&sql.select, [key.as_str()], Row::read)
                .optional()?;
            if let Some(holder) = row.as_ref().and_then(|r| r.live(now, boot)) {
                return Ok(Acquired::Held(holder));
            }
            let (term, revision) = row.map_or((0, 0), |r| (r.term, r.revision));
            let token = term
                .checked_add(1)
                .ok_or_else(|| BackendError::fatal("the key's fencing tokens are used up"))?
                .max(wall_micros())
                .max(1);
            let revision = revision.saturating_add(1);
            let lease = Lease::new(
                &claim,
                FencingToken::new(token.unsigned_abs()),
                revision.unsigned_abs(),
            );
            tx.execute(
                &sql.upsert,
                params![
                    key.as_str(),
                    token,
                    &claim.nonce.to_bytes()[..],
                    &lease.value().encode()[..],
                    now.saturating_add(nanos(ttl)),
                    boot,
                    revision
                ],
            )?;
            tx.commit()?;
            Ok(Acquired::Won(lease))
        });
        match result {
            Ok(acquired) => {
                if matches!(acquired, Acquired::Won(_)) {
                    self.wrote();
                }
                Ok(acquired)
            }
            Err(Fail::Gone(why)) => Err(self.gone(why)),
            Err(Fail::Other(e)) => Err(e),
        }
    }

    fn renew(
        &self,
        key: Key,
        lease: Lease,
        ttl: Duration,
        budget: Duration,
    ) -> Result<Renewed, BackendError> {
        let boot = clock::boot_id()?;
        let sql = &self.inner.sql;
        let result = self.with_conn(budget, |db, deadline| {
            // Past the deadline (the budget) the leader has given up: a
            // renewal then would only keep an abandoned lease alive.
            let tx = Self::begin(db, deadline, budget)?;
            let now = clock::now_ns()?;
            let revision: Option<i64> = tx
                .query_row(
                    &sql.renew,
                    params![
                        now.saturating_add(nanos(ttl)),
                        key.as_str(),
                        &nonce_bytes(&lease)[..],
                        term_of(&lease),
                        boot,
                        now
                    ],
                    |r| r.get(0),
                )
                .optional()?;
            match revision {
                Some(revision) => {
                    tx.commit()?;
                    Ok(Some(revision))
                }
                None => Ok(None),
            }
        });
        match result {
            Ok(Some(revision)) => {
                self.wrote();
                Ok(Renewed::Renewed(
                    lease.with_revision(revision.unsigned_abs()),
                ))
            }
            Ok(None) => Ok(Renewed::Lost),
            // No lease outlives its table or file.
            Err(Fail::Gone(_)) => Ok(Renewed::Lost),
            Err(Fail::Other(e)) => Err(e),
        }
    }

    fn supports_proclaim(&self) -> bool {
        true
    }

    fn proclaim(
        &self,
        key: Key,
        lease: Lease,
        metadata: bytes::Bytes,
        ttl: Duration,
        budget: Duration,
    ) -> Result<Renewed, BackendError> {
        let boot = clock::boot_id()?;
        let sql = &self.inner.sql;
        // The value as the acquire wrote it, with the new metadata: the
        // token stays in `term` (and in the value, as it was).
        let lease = lease.with_metadata(metadata);
        let value = lease.value().encode();
        let result = self.with_conn(budget, |db, deadline| {
            // As for a renewal: past the deadline the leader has given up.
            let tx = Self::begin(db, deadline, budget)?;
            let now = clock::now_ns()?;
            let revision: Option<i64> = tx
                .query_row(
                    &sql.proclaim,
                    params![
                        now.saturating_add(nanos(ttl)),
                        key.as_str(),
                        &nonce_bytes(&lease)[..],
                        term_of(&lease),
                        boot,
                        now,
                        &value[..]
                    ],
                    |r| r.get(0),
                )
                .optional()?;
            match revision {
                Some(revision) => {
                    tx.commit()?;
                    Ok(Some(revision))
                }
                None => Ok(None),
            }
        });
        match result {
            Ok(Some(revision)) => {
                self.wrote();
                Ok(Renewed::Renewed(
                    lease.with_revision(revision.unsigned_abs()),
                ))
            }
            Ok(None) => Ok(Renewed::Lost),
            // No lease outlives its table or file.
            Err(Fail::Gone(_)) => Ok(Renewed::Lost),
            Err(Fail::Other(e)) => Err(e),
        }
    }

    fn release(&self, key: Key, lease: Lease, budget: Duration) -> Result<(), BackendError> {
        let sql = &self.inner.sql;
        let result = self.with_conn(budget, |db, deadline| {
            let tx = Self::begin(db, deadline, budget)?;
            let n = tx.execute(
                &sql.release,
                params![key.as_str(), &nonce_bytes(&lease)[..], term_of(&lease)],
            )?;
            tx.commit()?;
            Ok(n)
        });
        match result {
            Ok(n) => {
                if n > 0 {
                    self.wrote();
                }
                Ok(())
            }
            // Nothing left to release.
            Err(Fail::Gone(_)) => Ok(()),
            Err(Fail::Other(e)) => Err(e),
        }
    }

    fn holder(&self, key: Key, budget: Duration) -> Result<Option<Holder>, BackendError> {
        let boot = clock::boot_id()?;
        let sql = &self.inner.sql;
        let result = self.with_conn(budget, |db, _| {
            let row = db
                .query_row(&sql.select, [key.as_str()], Row::read)
                .optional()?;
            let now = clock::now_ns()?;
            Ok(row.and_then(|r| r.live(now, boot)))
        });
        match result {
            Ok(holder) => Ok(holder),
            Err(Fail::Gone(why)) => Err(self.gone(why)),
            Err(Fail::Other(e)) => Err(e),
        }
    }

    fn keys(&self, budget: Duration) -> Result<Vec<Key>, BackendError> {
        let sql = &self.inner.sql;
        let result = self.with_conn(budget, |db, _| {
            let mut stmt = db.prepare(&sql.keys)?;
            let names = stmt
                .query_map([], |row| row.get::<_, String>(0))?
                .collect::<Result<Vec<_>, _>>()?;
            Ok(names)
        });
        match result {
            Ok(names) => Ok(names.iter().filter_map(|n| Key::new(n).ok()).collect()),
            Err(Fail::Gone(why)) => Err(self.gone(why)),
            Err(Fail::Other(e)) => Err(e),
        }
    }

    fn supports_candidates(&self) -> bool {
        true
    }

    fn register(
        &self,
        key: Key,
        candidate: Candidate,
        ttl: Duration,
        budget: Duration,
    ) -> Result<(), BackendError> {
        let boot = clock::boot_id()?;
        let sql = &self.inner.sql;
        let value = candidate.encode();
        let result = self.with_conn(budget, |db, deadline| {
            let tx = Self::begin(db, deadline, budget)?;
            let now = clock::now_ns()?;
            tx.execute(&sql.expire_candidates, params![key.as_str(), boot, now])?;
            tx.execute(
                &sql.put_candidate,
                params![
                    key.as_str(),
                    &candidate.id().as_bytes()[..],
                    &value[..],
                    now.saturating_add(nanos(ttl)),
                    boot
                ],
            )?;
            tx.commit()?;
            Ok(())
        });
        self.registry_result(result)
    }

    fn deregister(&self, key: Key, id: LeaderId, budget: Duration) -> Result<(), BackendError> {
        let sql = &self.inner.sql;
        let result = self.with_conn(budget, |db, deadline| {
            let tx = Self::begin(db, deadline, budget)?;
            tx.execute(
                &sql.delete_candidate,
                params![key.as_str(), &id.as_bytes()[..]],
            )?;
            tx.commit()?;
            Ok(())
        });
        self.registry_result(result)
    }

    fn candidates(&self, key: Key, budget: Duration) -> Result<Vec<Candidate>, BackendError> {
        let boot = clock::boot_id()?;
        let sql = &self.inner.sql;
        let result = self.with_conn(budget, |db, _| {
            let now = clock::now_ns()?;
            let mut stmt = db.prepare(&sql.select_candidates)?;
            let mut rows = stmt.query(params![key.as_str(), boot, now])?;
            let mut list = Vec::new();
            while let Some(row) = rows.next()? {
                let value: Vec<u8> = row.get(0)?;
                if let Ok(candidate) = Candidate::decode(&value) {
                    list.push(candidate);
                }
            }
            Ok(list)
        });
        self.registry_result(result)
    }

    fn candidate(
        &self,
        key: Key,
        id: LeaderId,
        budget: Duration,
    ) -> Result<Option<Candidate>, BackendError> {
        let boot = clock::boot_id()?;
        let sql = &self.inner.sql;
        let result = self.with_conn(budget, |db, _| {
            let now = clock::now_ns()?;
            let mut stmt = db.prepare(&sql.select_candidate)?;
            let mut rows = stmt.query(params![key.as_str(), &id.as_bytes()[..], boot, now])?;
            let mut found = None;
            if let Some(row) = rows.next()? {
                let value: Vec<u8> = row.get(0)?;
                found = Candidate::decode(&value).ok().filter(|c| c.id() == id);
            }
            Ok(found)
        });
        self.registry_result(result)
    }

    fn poll_interval(&self) -> Option<Duration> {
        self.inner.poll_interval
    }

    /// [`WatchEvent::Resync`] when a commit happened since the last poll
    /// (another connection's, by `PRAGMA data_version`, or this one's);
    /// nothing otherwise. A connection busy with a call is skipped: the
    /// next poll sees the change.
    fn changes(&self) -> Result<Vec<WatchEvent>, BackendError> {
        let version = {
            let mut guard = match self.inner.conn.try_lock() {
                Ok(guard) => guard,
                Err(_) => return Ok(Vec::new()),
            };
            if guard.is_none() {
                let budget = self.inner.poll_interval.unwrap_or(DEFAULT_POLL_INTERVAL);
                match self.open(budget) {
                    Ok(conn) => *guard = Some(conn),
                    Err(e) => return Err(self.error_of(e)),
                }
            }
            let Some(conn) = guard.as_mut() else {
                return Ok(Vec::new());
            };
            match conn
                .db
                .query_row("PRAGMA data_version", [], |r| r.get::<_, i64>(0))
            {
                Ok(version) => version,
                Err(e) => return Err(self.error_of(e.into())),
            }
        };
        let now = (version, self.inner.local_writes.load(Ordering::Acquire));
        let mut seen = self
            .inner
            .seen
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let changed = *seen != Some(now);
        *seen = Some(now);
        Ok(if changed {
            vec![WatchEvent::Resync]
        } else {
            Vec::new()
        })
    }
}

impl SqliteBackend {
    /// A registry call's outcome: the file gone is an error (there is no
    /// `Lost` to report).
    fn registry_result<R>(&self, result: Result<R, Fail>) -> Result<R, BackendError> {
        match result {
            Ok(r) => Ok(r),
            Err(Fail::Gone(why)) => Err(self.gone(why)),
            Err(Fail::Other(e)) => Err(e),
        }
    }

    fn error_of(&self, e: SqlFail) -> BackendError {
        match self.classify(e) {
            Fail::Gone(why) => self.gone(why),
            Fail::Other(e) => e,
        }
    }

    /// Checks that `table` has the columns `want` (name, type) and the
    /// primary key `pk`, from its `pragma_table_info` rows `found`.
    fn check_columns(
        &self,
        table: &str,
        found: &[(String, String, i64)],
        want: &[(&str, &str)],
        pk: &[&str],
    ) -> Result<(), BackendError> {
        let path = self.inner.path.display();
        let fix = || {
            "use a new table (SqliteBuilder::table), or re-create this one from \
             SqliteBackend::ddl()"
                .to_owned()
        };
        for &(name, ty) in want {
            let column = found.iter().find(|(n, _, _)| n.eq_ignore_ascii_case(name));
            match column {
                Some((_, t, _)) if t.eq_ignore_ascii_case(ty) => {}
                other => {
                    return Err(BackendError::Misconfigured {
                        problem: format!(
                            "table \"{table}\" in {path} has no column {name} of type {ty} \
                             (found {})",
                            other.map_or("none", |(_, t, _)| t.as_str())
                        ),
                        fix: fix(),
                    });
                }
            }
        }
        let mut keys: Vec<(i64, &str)> = found
            .iter()
            .filter(|(_, _, at)| *at > 0)
            .map(|(n, _, at)| (*at, n.as_str()))
            .collect();
        keys.sort_unstable();
        let keys: Vec<&str> = keys.into_iter().map(|(_, n)| n).collect();
        if keys.len() != pk.len() || keys.iter().zip(pk).any(|(k, p)| !k.eq_ignore_ascii_case(p)) {
            return Err(BackendError::Misconfigured {
                problem: format!(
                    "table \"{table}\" in {path} must have the primary key ({}), not ({})",
                    pk.join(", "),
                    keys.join(", ")
                ),
                fix: fix(),
            });
        }
        Ok(())
    }
}
