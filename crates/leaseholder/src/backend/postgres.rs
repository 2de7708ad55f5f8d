//! PostgreSQL (feature `postgres`), on tokio-postgres.
//!
//! One table holds the leases of any number of keys, one row per key,
//! forever (a released lease keeps its row, so the next term's token is
//! still larger):
//!
//! ```sql
//! CREATE TABLE IF NOT EXISTS "public"."leaseholder_leases" (
//!     key        text PRIMARY KEY,
//!     term       bigint NOT NULL,     -- the fencing token
//!     nonce      bytea,               -- NULL when free
//!     value      bytea,               -- holder id and metadata
//!     expires_at timestamptz,         -- NULL when free
//!     revision   bigint NOT NULL
//! );
//! ```
//!
//! The candidate registry has a table of its own beside it, named after it
//! (`<table>_candidates`; see [`PostgresBackend::candidates_table`]), one
//! row per candidate of a key:
//!
//! ```sql
//! CREATE TABLE IF NOT EXISTS "public"."leaseholder_leases_candidates" (
//!     key        text NOT NULL,
//!     id         uuid NOT NULL,        -- the candidate's id
//!     value      bytea NOT NULL,       -- the encoded Candidate
//!     expires_at timestamptz NOT NULL,
//!     PRIMARY KEY (key, id)
//! );
//! ```
//!
//! [`PostgresBackend::ddl`] gives the statements for a configured schema and
//! table, for a role that may not create tables at run time.
//!
//! How the lease contract maps onto it, each operation one statement with
//! every value a bound parameter, and every expiry judged by the server's
//! `clock_timestamp()` (not `now()`, which is the start of the transaction):
//!
//! | op | statement |
//! |---|---|
//! | setup | under a transaction-scoped advisory lock (so that candidates starting together do not race on DDL): whether the table exists, then `CREATE SCHEMA/TABLE IF NOT EXISTS` for both tables, unless auto-creation is off; then check the tables' columns (the candidates table's only if it exists: without auto-creation, a deployment that has only the lease table keeps working, and only the registry calls fail, naming the DDL to run). Reports [`Prepared::Created`] if the lease table was missing |
//! | acquire | `INSERT … ON CONFLICT (key) DO UPDATE … WHERE` the row is free or expired, setting `term = greatest(term + 1, <server clock in µs>)`; returns the new lease, or the holder when nothing was written; notifies the new holder |
//! | renew | `UPDATE … WHERE key, nonce and term match AND expires_at > clock_timestamp() AND` the server's clock is before the leader's deadline (mapped to the server's clock from earlier replies, early rather than late), with `statement_timeout`/`lock_timeout` = the time left: a renewal that reaches the server after the leader gave up changes nothing |
//! | proclaim | the renew statement, also setting `value` to the lease with the new metadata: the same match on key, nonce and term, the same `expires_at > clock_timestamp()` and deadline check, the same timeouts; notifies the holder with its new value |
//! | release | `UPDATE` the row to free (nonce, value and expiry cleared, term kept) if nonce and term match; notifies `r<key>` |
//! | holder | the row if `expires_at > clock_timestamp()`, with the exact time left by the server's clock |
//! | watch | `LISTEN` on one dedicated connection per backend. Acquire and renew notify the holder with its expiry (`u<term>:<revision>:<ttl ms>:<value hex>:<key>`), release notifies `r<key>`: an idle follower makes no call while its leader renews, and wakes at the expiry the last renewal set, since nothing notifies an expiry. A change of a key's registry notifies `c<key>`, which is [`WatchEvent::Candidates`] |
//! | register | one upsert of the `(key, id)` row with `expires_at = clock_timestamp() + ttl`, which in the same statement deletes the key's expired rows (those no other transaction holds: `FOR UPDATE SKIP LOCKED`), and notifies `c<key>` only if the entry was not live or its value changed: a plain renewal notifies nothing |
//! | deregister | `DELETE` the `(key, id)` row; notifies `c<key>` if it was live |
//! | candidates | `SELECT value … WHERE key = $1 AND expires_at > clock_timestamp()`; values that do not decode are left out |
//! | candidate | the same for one `(key, id)` row, by its primary key |
//!
//! The token is the server's clock in microseconds when the term began (or
//! the previous term + 1, if larger), so even a dropped and re-created table
//! issues larger tokens, as long as the server's clock has not gone back.
//!
//! **Every statement is bounded on the server.** Acquire, renew, release,
//! holder and the registry's calls each run in a transaction of their own,
//! sent as one pipeline:
//! `BEGIN; SET LOCAL statement_timeout = …; SET LOCAL lock_timeout = …`,
//! the statement (parsed, bound and executed in the same flight, as an
//! unnamed statement: no prepared statement stays behind on the connection,
//! so `DEALLOCATE ALL`, a connection pooler or a server restart cannot leave
//! a stale one), and `COMMIT`. `SET LOCAL` ends with the transaction, so
//! nothing leaks into a pooled connection, and a call the campaign gave up
//! on cannot keep a connection busy for long: the server cancels it. Setup
//! runs its statements in one transaction with the same settings. The
//! bounds:
//!
//! | op | the server gives up after |
//! |---|---|
//! | renew, proclaim | the time left before the leader's deadline (the campaign's budget), less a little for the reply |
//! | acquire | a third of the ttl asked for, and at most [`statement_timeout`](PostgresBuilder::statement_timeout) (the campaign allows ttl - drift margin, always more) |
//! | release, holder, setup, register, deregister, candidates | [`statement_timeout`](PostgresBuilder::statement_timeout) (default 1 s), and at most a third of the shortest ttl this backend has been asked for: the default renew interval, by which the campaign gives these calls up |
//!
//! **Errors.** Connection failures, statement and lock timeouts, transaction
//! rollbacks (serialization failure `40001`, deadlock `40P01`), operator
//! intervention (`57P01` admin shutdown, `57P03` cannot connect now), a
//! read-only transaction (`25006`, as on a standby after a failover, until
//! the application reaches the new primary), an unknown prepared statement
//! (`26000`), insufficient resources and system errors are transient: the
//! campaign retries them. Permission denied is [`BackendError::Denied`];
//! anything else is [`BackendError::Fatal`].
//!
//! **A dropped table** (`42P01`) ends a term at once: a renewal reports
//! [`Renewed::Lost`] (no lease outlives its table) and
//! a release has nothing left to do. An acquire or holder read on a missing
//! table is [`BackendError::Misconfigured`], so a running campaign stops and
//! says so: it does not re-create the table itself, since a table created
//! under running leaders must be followed by one ttl of waiting, which only
//! a new [`Backend`](crate::Backend)'s setup (reporting
//! [`Prepared::Created`]) arranges. Re-create it by
//! starting the process again (setup creates it when
//! [`create_table`](PostgresBuilder::create_table) is on) or with your
//! migrations ([`PostgresBackend::ddl`]).

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;

use bytes::Bytes;
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use futures_util::{FutureExt, StreamExt};
use tokio_postgres::error::SqlState;
use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::{AsyncMessage, NoTls, Row};

use super::clock::ServerClock;
use super::{
    Acquired, BackendEdge, Candidate, Claim, FencingToken, Holder, Key, LeaderId, Lease,
    LeaseValue, Prepared, Renewal, Renewed, WatchEvent, WatchStream,
};
use crate::error::{BackendError, ConfigError};

const DEFAULT_SCHEMA: &str = "public";
const DEFAULT_TABLE: &str = "leaseholder_leases";
const DEFAULT_POOL_SIZE: usize = 4;
const DEFAULT_STATEMENT_TIMEOUT: Duration = Duration::from_secs(1);

/// A statement's parameters with their types (sent with the statement, so
/// it needs no prepare round trip).
type Params<'a> = [(&'a (dyn ToSql + Sync), Type)];

/// A PostgreSQL table as a lease store. Build one with
/// [`PostgresBackend::builder`], then wrap it with
/// [`Backend::postgres`](crate::Backend::postgres).
///
/// ```no_run
/// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
/// use leaseholder::{Backend, Leader, PostgresBackend};
///
/// let pg = PostgresBackend::builder()
///     .url("postgres://app@db.internal/app")
///     .table("leases")
///     .build()?;
/// let leader = Leader::builder("nightly-report")
///     .backend(Backend::postgres(pg))
///     .build()?;
/// leader.setup().await?; // creates the table if it is missing
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct PostgresBackend {
    inner: Arc<Inner>,
}

struct Inner {
    pool: Pool,
    /// Where the `LISTEN` connection goes; `None`: no watch.
    listen: Option<tokio_postgres::Config>,
    schema: String,
    table: String,
    /// The candidate registry's table, beside `table`.
    candidates_table: String,
    create_table: bool,
    channel: String,
    sql: Sql,
    clock: ServerClock,
    /// The configured bound on setup, holder and release (and the cap on
    /// acquire).
    statement_timeout: Duration,
    /// The shortest ttl acquire or renew was called with, in µs
    /// (`u64::MAX` before the first).
    min_ttl_us: AtomicU64,
    /// Renewals of many keys in one statement (`renew_many`).
    batch_renewals: bool,
    /// Renewal statements sent (one per renewal alone, one per batch).
    renew_statements: AtomicU64,
    /// Acquires admitted to the pool at once: all its connections but one.
    acquiring: tokio::sync::Semaphore,
}

impl fmt::Debug for PostgresBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PostgresBackend")
            .field("schema", &self.inner.schema)
            .field("table", &self.inner.table)
            .field("channel", &self.inner.channel)
            .field("create_table", &self.inner.create_table)
            .field("listens", &self.inner.listen.is_some())
            .finish_non_exhaustive()
    }
}

/// Builds a [`PostgresBackend`]; every setting is checked by
/// [`build`](Self::build).
#[derive(Default)]
#[must_use]
pub struct PostgresBuilder {
    url: Option<String>,
    config: Option<tokio_postgres::Config>,
    pool: Option<Pool>,
    listen: Option<tokio_postgres::Config>,
    schema: Option<String>,
    table: Option<String>,
    create_table: Option<bool>,
    pool_size: Option<usize>,
    statement_timeout: Option<Duration>,
    batch_renewals: Option<bool>,
}

impl fmt::Debug for PostgresBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PostgresBuilder")
            .field("schema", &self.schema)
            .field("table", &self.table)
            .field("pool", &self.pool.is_some())
            .finish_non_exhaustive()
    }
}

impl PostgresBuilder {
    /// Connect with a connection string (`postgres://user@host:port/db` or
    /// `host=… user=…`). The backend owns a small pool of connections (see
    /// [`pool_size`](Self::pool_size)) and reconnects them, and listens on
    /// one more. TLS is not supported this way: pass a [`pool`](Self::pool)
    /// built with your TLS connector.
    pub fn url(mut self, url: impl Into<String>) -> Self {
        self.url = Some(url.into());
        self
    }

    /// Connect with a parsed [`tokio_postgres::Config`], as with
    /// [`url`](Self::url).
    pub fn config(mut self, config: tokio_postgres::Config) -> Self {
        self.config = Some(config);
        self
    }

    /// Use your own deadpool-postgres pool for lease operations. A pool's
    /// connections cannot receive notifications, so to let followers hear
    /// releases at once, also give a [`listen`](Self::listen) config;
    /// without one, followers fall back to the lease's expiry and the retry
    /// interval.
    pub fn pool(mut self, pool: Pool) -> Self {
        self.pool = Some(pool);
        self
    }

    /// Where the `LISTEN` connection goes (with a [`pool`](Self::pool);
    /// with a URL or config, that is used). Without TLS.
    pub fn listen(mut self, config: tokio_postgres::Config) -> Self {
        self.listen = Some(config);
        self
    }

    /// The table's schema; default `public`.
    pub fn schema(mut self, schema: impl Into<String>) -> Self {
        self.schema = Some(schema.into());
        self
    }

    /// The table's name; default `leaseholder_leases`.
    pub fn table(mut self, table: impl Into<String>) -> Self {
        self.table = Some(table.into());
        self
    }

    /// Whether `setup` creates the schema and table when they are missing
    /// (default `true`). With `false`, a missing table is a
    /// [`BackendError::Misconfigured`] that points at
    /// [`PostgresBackend::ddl`].
    pub fn create_table(mut self, create: bool) -> Self {
        self.create_table = Some(create);
        self
    }

    /// How many connections the backend's own pool keeps (with a URL or
    /// config; default 4). The `LISTEN` connection is one more.
    pub fn pool_size(mut self, size: usize) -> Self {
        self.pool_size = Some(size);
        self
    }

    /// The longest the server may work on a setup, holder or release call,
    /// and on an acquire (which is also held to a third of its ttl): sets
    /// `statement_timeout` and `lock_timeout` for that call's transaction
    /// only (`SET LOCAL`). Default 1 s. Holder, release and setup are also
    /// held to a third of the shortest ttl this backend has been asked for
    /// (the default renew interval: the campaign gives these calls up after
    /// one renew interval). If you configure a renew interval shorter than a
    /// third of the ttl, set this to it. Renewals are bounded by the time
    /// left before the leader's deadline instead.
    ///
    /// A call the server gives up on is a transient error; the campaign
    /// retries it.
    pub fn statement_timeout(mut self, timeout: Duration) -> Self {
        self.statement_timeout = Some(timeout);
        self
    }

    /// Whether renewals of many keys go to the server together: the
    /// campaigns of one [`Backend`](crate::Backend) hand their renewals to
    /// it, and it sends those made within a few milliseconds of each
    /// other as one statement (an `UPDATE … FROM unnest(…)` that checks
    /// and extends each lease as a single renewal would, and notifies
    /// each renewed key's followers). Default `true`. A process holding
    /// one key gains nothing from it but loses little (a renewal waits at
    /// most 20 ms, and at most an eighth of its budget, for others).
    ///
    /// ```
    /// use leaseholder::{BackendEdge, PostgresBackend};
    /// let pg = PostgresBackend::builder().url("postgres://localhost/app").build()?;
    /// assert!(pg.batches_renewals());
    /// let one_by_one = PostgresBackend::builder()
    ///     .url("postgres://localhost/app")
    ///     .batch_renewals(false)
    ///     .build()?;
    /// assert!(!one_by_one.batches_renewals());
    /// # Ok::<(), leaseholder::ConfigError>(())
    /// ```
    pub fn batch_renewals(mut self, on: bool) -> Self {
        self.batch_renewals = Some(on);
        self
    }

    /// Checks the settings and builds the backend. Connects to nothing yet.
    pub fn build(self) -> Result<PostgresBackend, ConfigError> {
        let schema = self.schema.unwrap_or_else(|| DEFAULT_SCHEMA.into());
        let table = self.table.unwrap_or_else(|| DEFAULT_TABLE.into());
        check_identifier("schema", &schema)?;
        check_identifier("table", &table)?;
        let pool_size = self.pool_size.unwrap_or(DEFAULT_POOL_SIZE);
        if pool_size == 0 {
            return Err(ConfigError::Backend {
                backend: "postgres",
                problem: "pool_size is 0".into(),
            });
        }
        let statement_timeout = self.statement_timeout.unwrap_or(DEFAULT_STATEMENT_TIMEOUT);
        if statement_timeout < Duration::from_millis(1) {
            return Err(ConfigError::Backend {
                backend: "postgres",
                problem: format!(
                    "statement_timeout {statement_timeout:?} is below 1 ms (PostgreSQL counts \
                     whole milliseconds, and 0 turns the timeout off)"
                ),
            });
        }
        let config =
            match (self.url, self.config) {
                (Some(_), Some(_)) => {
                    return Err(ConfigError::Backend {
                        backend: "postgres",
                        problem: "both url and config are set: give one".into(),
                    });
                }
                (Some(url), None) => Some(url.parse::<tokio_postgres::Config>().map_err(|e| {
                    ConfigError::Backend {
                        backend: "postgres",
                        problem: format!("the connection string does not parse: {e}"),
                    }
                })?),
                (None, config) => config,
            };
        let (pool, listen) = match (self.pool, config) {
            (Some(_), Some(_)) => {
                return Err(ConfigError::Backend {
                    backend: "postgres",
                    problem:
                        "both a pool and a url/config are set: give one (and `listen` for the pool)"
                            .into(),
                });
            }
            (Some(pool), None) => (pool, self.listen),
            (None, Some(config)) => {
                let manager = Manager::from_config(
                    config.clone(),
                    NoTls,
                    ManagerConfig {
                        // Verified: a connection that died (server restart)
                        // is replaced before it is handed out.
                        recycling_method: RecyclingMethod::Verified,
                    },
                );
                let pool = Pool::builder(manager)
                    .max_size(pool_size)
                    .build()
                    .map_err(|e| ConfigError::Backend {
                        backend: "postgres",
                        problem: format!("building the connection pool: {e}"),
                    })?;
                (pool, Some(self.listen.unwrap_or(config)))
            }
            (None, None) => {
                return Err(ConfigError::Backend {
                    backend: "postgres",
                    problem: "no connection: call .url(..), .config(..) or .pool(..)".into(),
                });
            }
        };
        let pool_max = pool.status().max_size;
        let channel = channel_name(&schema, &table);
        let candidates_table = candidates_table_name(&table);
        let sql = Sql::new(
            &quoted(&schema, &table),
            &quoted(&schema, &candidates_table),
        );
        Ok(PostgresBackend {
            inner: Arc::new(Inner {
                pool,
                listen,
                create_table: self.create_table.unwrap_or(true),
                channel,
                sql,
                schema,
                table,
                candidates_table,
                clock: ServerClock::default(),
                statement_timeout,
                min_ttl_us: AtomicU64::new(u64::MAX),
                batch_renewals: self.batch_renewals.unwrap_or(true),
                renew_statements: AtomicU64::new(0),
                acquiring: tokio::sync::Semaphore::new(pool_max.saturating_sub(1).max(1)),
            }),
        })
    }
}

/// Identifiers are checked, not just quoted: letters, digits and `_`,
/// starting with a letter or `_`, at most 63 bytes (PostgreSQL's limit).
fn check_identifier(what: &'static str, name: &str) -> Result<(), ConfigError> {
    let bad = |rule: &str| ConfigError::Backend {
        backend: "postgres",
        problem: format!("{what} name {name:?} is not allowed: {rule}"),
    };
    if name.is_empty() || name.len() > 63 {
        return Err(bad("it must be 1 to 63 bytes long"));
    }
    let mut chars = name.chars();
    if !chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
    {
        return Err(bad("it must start with a letter or '_'"));
    }
    if !chars.all(|c| c.is_ascii_alphanumeric() || c == '_') {
        return Err(bad("use only ASCII letters, digits and '_'"));
    }
    Ok(())
}

/// `"schema"."table"`; both were checked by [`check_identifier`], and
/// quoting keeps their case.
fn quoted(schema: &str, table: &str) -> String {
    format!("\"{schema}\".\"{table}\"")
}

/// A channel name under PostgreSQL's 63-byte limit, the same for every
/// backend on one table: `leaseholder_` and a 64-bit FNV-1a hash of the
/// qualified table name.
fn channel_name(schema: &str, table: &str) -> String {
    let hash = fnv1a(schema.bytes().chain([b'.']).chain(table.bytes()));
    format!("leaseholder_{hash:016x}")
}

/// 64-bit FNV-1a.
fn fnv1a(bytes: impl IntoIterator<Item = u8>) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in bytes {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    hash
}

/// The registry's table beside `table`: `<table>_candidates`, or, if that
/// is longer than PostgreSQL's 63 bytes, the table's first 43 bytes, `_`,
/// 8 hex digits of a hash of the whole name and `_candidates`, so that two
/// long names still differ. `table` passed [`check_identifier`] (ASCII).
fn candidates_table_name(table: &str) -> String {
    const SUFFIX: &str = "_candidates";
    if table.len() + SUFFIX.len() <= 63 {
        return format!("{table}{SUFFIX}");
    }
    let hash = fnv1a(table.bytes()) as u32;
    format!("{}_{hash:08x}{SUFFIX}", &table[..63 - 9 - SUFFIX.len()])
}

/// The statements, with the table name filled in once.
struct Sql {
    create: String,
    create_candidates: String,
    columns: String,
    acquire: String,
    renew: String,
    renew_many: String,
    proclaim: String,
    release: String,
    holder: String,
    keys: String,
    register: String,
    deregister: String,
    candidates: String,
    candidate: String,
}

/// The server's clock in microseconds since the epoch.
const NOW_MICROS: &str = "(extract(epoch from clock_timestamp()) * 1000000)::bigint";

/// The renewal's statement; `set` adds to what it writes (a proclaim's
/// `value = $7, `), every condition the same.
///
/// $1 key, $2 nonce, $3 term, $4 ttl in seconds, $5 the leader's deadline
/// on the server's clock in µs (NULL: not known yet), $6 channel. One row:
/// the new revision (NULL if nothing was renewed), the server's clock, and
/// whether the deadline had passed. A renewal notifies the holder with its
/// new expiry (and, after a proclaim, its new value), so that followers
/// move their wake-up instead of re-reading.
fn renew_sql(table: &str, set: &str) -> String {
    format!(
        "WITH renewed AS (\
           UPDATE {table} SET {set}\
             expires_at = clock_timestamp() + make_interval(secs => $4), \
             revision = revision + 1 \
           WHERE key = $1 AND nonce = $2 AND term = $3 \
             AND expires_at > clock_timestamp() \
             AND ($5::bigint IS NULL OR {NOW_MICROS} < $5::bigint) \
           RETURNING revision, term, value) \
         SELECT (SELECT revision FROM renewed), {NOW_MICROS}, \
                coalesce({NOW_MICROS} >= $5::bigint, false), \
                (SELECT pg_notify($6, 'u' || term || ':' || revision || ':' || \
                        ceil($4 * 1000)::bigint || ':' || encode(value, 'hex') || \
                        ':' || $1) IS NULL FROM renewed)"
    )
}

/// The renewal of many leases in one statement: each row of the input
/// checked and extended exactly as [`renew_sql`] does one, and notified
/// the same way.
///
/// $1 keys, $2 nonces, $3 terms, $4 ttls in seconds, $5 the leaders'
/// deadlines on the server's clock in µs (NULL: not known yet), $6
/// channel. One row per input, in order: its position (from 1), the new
/// revision (NULL if not renewed), the server's clock, and whether its
/// deadline had passed. Renewals of one key with different nonces (two
/// candidates sharing a backend) each join the row only if they hold it.
fn renew_many_sql(table: &str) -> String {
    format!(
        "WITH input AS (\
           SELECT * FROM unnest($1::text[], $2::bytea[], $3::int8[], $4::float8[], $5::int8[]) \
             WITH ORDINALITY AS i(key, nonce, term, secs, deadline, n)), \
         renewed AS (\
           UPDATE {table} AS l SET \
             expires_at = clock_timestamp() + make_interval(secs => i.secs), \
             revision = l.revision + 1 \
           FROM input i \
           WHERE l.key = i.key AND l.nonce = i.nonce AND l.term = i.term \
             AND l.expires_at > clock_timestamp() \
             AND (i.deadline IS NULL OR {NOW_MICROS} < i.deadline) \
           RETURNING i.n, l.revision, l.term, l.value, l.key, i.secs), \
         notified AS MATERIALIZED (\
           SELECT n, revision, pg_notify($6, 'u' || term || ':' || revision || ':' || \
                  ceil(secs * 1000)::bigint || ':' || encode(value, 'hex') || ':' || key) \
                  IS NULL AS quiet \
           FROM renewed) \
         SELECT i.n, r.revision, {NOW_MICROS}, \
                coalesce({NOW_MICROS} >= i.deadline, false), r.quiet \
         FROM input i LEFT JOIN notified r ON r.n = i.n ORDER BY i.n"
    )
}

impl Sql {
    fn new(table: &str, candidates: &str) -> Sql {
        Sql {
            create: format!(
                "CREATE TABLE IF NOT EXISTS {table} (\n\
                 \x20   key        text PRIMARY KEY,\n\
                 \x20   term       bigint NOT NULL,\n\
                 \x20   nonce      bytea,\n\
                 \x20   value      bytea,\n\
                 \x20   expires_at timestamptz,\n\
                 \x20   revision   bigint NOT NULL\n\
                 )"
            ),
            create_candidates: format!(
                "CREATE TABLE IF NOT EXISTS {candidates} (\n\
                 \x20   key        text NOT NULL,\n\
                 \x20   id         uuid NOT NULL,\n\
                 \x20   value      bytea NOT NULL,\n\
                 \x20   expires_at timestamptz NOT NULL,\n\
                 \x20   PRIMARY KEY (key, id)\n\
                 )"
            ),
            columns: "SELECT column_name::text, data_type::text FROM information_schema.columns \
                 WHERE table_schema = $1 AND table_name = $2"
                .into(),
            // $1 key, $2 nonce, $3 value, $4 ttl in seconds, $5 channel.
            // Either the insert/take-over wrote a row (won), or the outer
            // select returns the row that stopped it (held).
            acquire: format!(
                "WITH won AS (\
                   INSERT INTO {table} AS l (key, term, nonce, value, expires_at, revision) \
                   VALUES ($1, greatest(1, {NOW_MICROS}), $2, $3, \
                           clock_timestamp() + make_interval(secs => $4), 1) \
                   ON CONFLICT (key) DO UPDATE SET \
                     term = greatest(l.term + 1, {NOW_MICROS}), \
                     nonce = excluded.nonce, value = excluded.value, \
                     expires_at = excluded.expires_at, revision = l.revision + 1 \
                   WHERE l.expires_at IS NULL OR l.expires_at <= clock_timestamp() \
                   RETURNING term, revision) \
                 SELECT true AS won, w.term, w.revision, NULL::bytea AS value, \
                        NULL::float8 AS left_s, \
                        pg_notify($5, 'u' || w.term || ':' || w.revision || ':' || \
                                  ceil($4 * 1000)::bigint || ':' || encode($3::bytea, 'hex') || \
                                  ':' || $1) IS NULL AS notified, \
                        {NOW_MICROS} AS server_us \
                   FROM won w \
                 UNION ALL \
                 SELECT false, h.term, h.revision, h.value, \
                        extract(epoch from h.expires_at - clock_timestamp())::float8, false, \
                        {NOW_MICROS} \
                   FROM {table} h \
                  WHERE h.key = $1 AND h.expires_at > clock_timestamp() \
                    AND NOT EXISTS (SELECT 1 FROM won)"
            ),
            renew: renew_sql(table, ""),
            renew_many: renew_many_sql(table),
            // The renewal, also setting the value ($7): the same checks.
            proclaim: renew_sql(table, "value = $7, "),
            // $1 key, $2 nonce, $3 term, $4 channel.
            release: format!(
                "WITH freed AS (\
                   UPDATE {table} SET nonce = NULL, value = NULL, expires_at = NULL, \
                     revision = revision + 1 \
                   WHERE key = $1 AND nonce = $2 AND term = $3 \
                   RETURNING key) \
                 SELECT pg_notify($4, 'r' || key) IS NULL FROM freed"
            ),
            // $1 key.
            holder: format!(
                "SELECT term, revision, value, \
                        extract(epoch from expires_at - clock_timestamp())::float8 \
                   FROM {table} WHERE key = $1 AND expires_at > clock_timestamp()"
            ),
            // Every key with a live lease (`holder` reads each).
            keys: format!("SELECT key FROM {table} WHERE expires_at > clock_timestamp()"),
            // $1 key, $2 id (text), $3 value, $4 ttl in seconds, $5 channel.
            // Every CTE sees the rows as they were when the statement began:
            // `old` is the live entry before the write. Expired rows of the
            // key go too, but none that another transaction holds (two
            // candidates sweeping each other's rows would deadlock). Only a
            // new entry, a revived one or new contents notify.
            register: format!(
                "WITH old AS (\
                   SELECT value FROM {candidates} \
                    WHERE key = $1 AND id = $2::uuid AND expires_at > clock_timestamp()), \
                 stale AS (\
                   SELECT id FROM {candidates} \
                    WHERE key = $1 AND id <> $2::uuid AND expires_at <= clock_timestamp() \
                    FOR UPDATE SKIP LOCKED), \
                 swept AS (\
                   DELETE FROM {candidates} c USING stale s WHERE c.key = $1 AND c.id = s.id), \
                 written AS (\
                   INSERT INTO {candidates} AS c (key, id, value, expires_at) \
                   VALUES ($1, $2::uuid, $3, clock_timestamp() + make_interval(secs => $4)) \
                   ON CONFLICT (key, id) DO UPDATE SET \
                     value = excluded.value, expires_at = excluded.expires_at \
                   RETURNING 1) \
                 SELECT pg_notify($5, 'c' || $1) IS NULL FROM written \
                  WHERE NOT EXISTS (SELECT 1 FROM old WHERE old.value = $3)"
            ),
            // $1 key, $2 id (text), $3 channel.
            deregister: format!(
                "WITH gone AS (\
                   DELETE FROM {candidates} WHERE key = $1 AND id = $2::uuid \
                   RETURNING expires_at) \
                 SELECT pg_notify($3, 'c' || $1) IS NULL FROM gone \
                  WHERE expires_at > clock_timestamp()"
            ),
            // $1 key.
            candidates: format!(
                "SELECT value FROM {candidates} WHERE key = $1 AND expires_at > clock_timestamp()"
            ),
            // $1 key, $2 id (text).
            candidate: format!(
                "SELECT value FROM {candidates} \
                  WHERE key = $1 AND id = $2::uuid AND expires_at > clock_timestamp()"
            ),
        }
    }
}

impl PostgresBackend {
    /// Starts building a backend.
    pub fn builder() -> PostgresBuilder {
        PostgresBuilder::default()
    }

    /// The statements that create the schema, the lease table and the
    /// candidate registry's table, for a DBA to run when the application's
    /// role may not create tables (then build with
    /// [`create_table(false)`](PostgresBuilder::create_table)). The role
    /// needs `SELECT, INSERT, UPDATE` on the lease table, and `SELECT,
    /// INSERT, UPDATE, DELETE` on the candidates table (used only by
    /// `Leader`s with the registry on; without it they fail with
    /// [`BackendError::Misconfigured`] naming these statements, and
    /// everything else works).
    ///
    /// ```
    /// let pg = leaseholder::PostgresBackend::builder()
    ///     .url("postgres://localhost/app")
    ///     .schema("ops")
    ///     .build()?;
    /// let ddl = pg.ddl();
    /// assert!(ddl.contains(r#"CREATE TABLE IF NOT EXISTS "ops"."leaseholder_leases" ("#));
    /// assert!(ddl.contains(r#"CREATE TABLE IF NOT EXISTS "ops"."leaseholder_leases_candidates" ("#));
    /// # Ok::<(), leaseholder::ConfigError>(())
    /// ```
    pub fn ddl(&self) -> String {
        format!(
            "CREATE SCHEMA IF NOT EXISTS \"{}\";\n{};\n{};\n",
            self.inner.schema, self.inner.sql.create, self.inner.sql.create_candidates
        )
    }

    /// The schema and table.
    pub fn table(&self) -> (&str, &str) {
        (&self.inner.schema, &self.inner.table)
    }

    /// The candidate registry's table, in the same schema:
    /// `<table>_candidates` (for a table name longer than 52 bytes, its
    /// first 43 bytes, a hash of the whole name and `_candidates`, within
    /// PostgreSQL's 63).
    ///
    /// ```
    /// let pg = leaseholder::PostgresBackend::builder()
    ///     .url("postgres://localhost/app")
    ///     .table("leases")
    ///     .build()?;
    /// assert_eq!(pg.candidates_table(), "leases_candidates");
    /// # Ok::<(), leaseholder::ConfigError>(())
    /// ```
    pub fn candidates_table(&self) -> &str {
        &self.inner.candidates_table
    }

    /// The `LISTEN`/`NOTIFY` channel of this table.
    pub fn channel(&self) -> &str {
        &self.inner.channel
    }

    /// How many renewal statements this backend (and its clones) has sent:
    /// one per renewal sent alone, one per batch of renewals
    /// ([`batch_renewals`](PostgresBuilder::batch_renewals)). The bench
    /// divides it by the renew intervals it watched.
    pub fn renew_statements(&self) -> u64 {
        self.inner.renew_statements.load(Ordering::Relaxed)
    }

    async fn client(&self) -> Result<deadpool_postgres::Object, BackendError> {
        self.inner.pool.get().await.map_err(|e| match e {
            deadpool_postgres::PoolError::Backend(e) => classify(e),
            other => BackendError::unavailable(other),
        })
    }

    fn missing_table(&self) -> BackendError {
        BackendError::Misconfigured {
            problem: format!(
                "table \"{}\".\"{}\" does not exist (never created, or dropped while in use)",
                self.inner.schema, self.inner.table
            ),
            fix: "re-create it: with create_table(true) (the default) the setup of a new \
                  Backend does, and its campaigns wait one ttl before they acquire; or run the \
                  statements from PostgresBackend::ddl() (migrations) as a role that may create \
                  tables. A running campaign stops rather than re-create the table under \
                  leaders of the old one"
                .into(),
        }
    }

    fn missing_candidates_table(&self) -> BackendError {
        BackendError::Misconfigured {
            problem: format!(
                "the candidate registry's table \"{}\".\"{}\" does not exist (the lease table \
                 is used as before; only Leaders with the registry on need it)",
                self.inner.schema, self.inner.candidates_table
            ),
            fix: format!(
                "create it: run the CREATE TABLE \"{}\".\"{}\" of PostgresBackend::ddl() as a role \
                 that may create tables, or let setup create it (create_table(true), the \
                 default); or build the Leaders without the registry",
                self.inner.schema, self.inner.candidates_table
            ),
        }
    }

    /// Maps an error from a registry statement; a missing table is named.
    fn registry_error(&self, e: tokio_postgres::Error) -> BackendError {
        if e.code() == Some(&SqlState::UNDEFINED_TABLE) {
            return self.missing_candidates_table();
        }
        classify(e)
    }

    /// Maps an error from a lease statement; a missing table is named.
    fn error(&self, e: tokio_postgres::Error) -> BackendError {
        if e.code() == Some(&SqlState::UNDEFINED_TABLE) {
            return self.missing_table();
        }
        classify(e)
    }

    /// Remembers the shortest ttl seen, which bounds the calls that get no
    /// budget of their own.
    fn note_ttl(&self, ttl: Duration) {
        let us = u64::try_from(ttl.as_micros()).unwrap_or(u64::MAX);
        self.inner.min_ttl_us.fetch_min(us, Ordering::Relaxed);
    }

    /// The server-side bound on setup, holder and release (and the cap on
    /// acquire): the configured statement timeout, at most a third of the
    /// shortest ttl seen.
    fn bound(&self) -> Duration {
        let third = Duration::from_micros(self.inner.min_ttl_us.load(Ordering::Relaxed)) / 3;
        self.inner.statement_timeout.min(third)
    }

    /// Runs one statement in a transaction of its own, bounded on the
    /// server until `until`, as one pipeline: `BEGIN` and the timeouts
    /// (`SET LOCAL`: they end with the transaction, so a pooled connection
    /// is left as it was; `SET` takes no parameters, `ms` is a number), the
    /// statement (parse, bind and execute of an unnamed statement: no
    /// prepare round trip and no prepared statement left behind), and
    /// `COMMIT` all leave on the first poll, so the server commits right
    /// after the statement, with no round trip in between. If the statement
    /// fails, the `COMMIT` rolls back. Dropped after the first poll, the
    /// whole transaction still runs, within its bound; before it, nothing
    /// was sent.
    ///
    /// The outer error is a failure of the connection, `BEGIN` or `COMMIT`
    /// (classified); the inner one the statement's own, for the caller to
    /// map. Returns the rows and when the reply came.
    async fn pipelined(
        client: &tokio_postgres::Client,
        sql: &str,
        params: &Params<'_>,
        until: Instant,
    ) -> Result<Result<(Vec<Row>, Instant), tokio_postgres::Error>, BackendError> {
        let ms = server_budget(until.saturating_duration_since(Instant::now()));
        let begin =
            format!("BEGIN; SET LOCAL statement_timeout = {ms}; SET LOCAL lock_timeout = {ms}");
        let (begun, rows, committed) = tokio::join!(
            client.batch_execute(&begin),
            client.query_typed(sql, params),
            client.batch_execute("COMMIT"),
        );
        let received = Instant::now();
        if committed.is_err() {
            // A COMMIT that failed (cancelled by the very statement timeout
            // it ran under, say) leaves the transaction open and aborted,
            // and the pool would hand the connection out like that: end it
            // here. Sent on the first poll; its reply is not waited for.
            let _ = client.batch_execute("ROLLBACK").now_or_never();
        }
        begun.map_err(classify)?;
        match rows {
            Ok(rows) => {
                committed.map_err(classify)?;
                Ok(Ok((rows, received)))
            }
            // The COMMIT rolled back (or failed with the connection).
            Err(e) => Ok(Err(e)),
        }
    }

    async fn check_columns(
        &self,
        client: &tokio_postgres::Transaction<'_>,
    ) -> Result<(), BackendError> {
        let rows = client
            .query(
                &self.inner.sql.columns,
                &[&self.inner.schema, &self.inner.table],
            )
            .await
            .map_err(classify)?;
        if rows.is_empty() {
            return Err(self.missing_table());
        }
        let want = [
            ("key", "text"),
            ("term", "bigint"),
            ("nonce", "bytea"),
            ("value", "bytea"),
            ("expires_at", "timestamp with time zone"),
            ("revision", "bigint"),
        ];
        for (name, ty) in want {
            let found = rows.iter().find_map(|row| {
                let column: String = row.try_get(0).ok()?;
                (column == name).then(|| row.try_get::<_, String>(1).ok())?
            });
            if found.as_deref() != Some(ty) {
                return Err(BackendError::Misconfigured {
                    problem: format!(
                        "table \"{}\".\"{}\" has no column {name} of type {ty} (found {})",
                        self.inner.schema,
                        self.inner.table,
                        found.as_deref().unwrap_or("none")
                    ),
                    fix: "use a new table, or re-create this one from PostgresBackend::ddl()"
                        .into(),
                });
            }
        }
        Ok(())
    }

    /// Checks the candidates table's columns, if it exists (without
    /// auto-creation, a deployment may have only the lease table).
    async fn check_candidate_columns(
        &self,
        client: &tokio_postgres::Transaction<'_>,
    ) -> Result<(), BackendError> {
        let rows = client
            .query(
                &self.inner.sql.columns,
                &[&self.inner.schema, &self.inner.candidates_table],
            )
            .await
            .map_err(classify)?;
        if rows.is_empty() {
            tracing::debug!(
                table = %self.inner.candidates_table,
                "the candidate registry's table does not exist; registry calls will fail"
            );
            return Ok(());
        }
        let want = [
            ("key", "text"),
            ("id", "uuid"),
            ("value", "bytea"),
            ("expires_at", "timestamp with time zone"),
        ];
        for (name, ty) in want {
            let found = rows.iter().find_map(|row| {
                let column: String = row.try_get(0).ok()?;
                (column == name).then(|| row.try_get::<_, String>(1).ok())?
            });
            if found.as_deref() != Some(ty) {
                return Err(BackendError::Misconfigured {
                    problem: format!(
                        "the candidate registry's table \"{}\".\"{}\" has no column {name} of \
                         type {ty} (found {})",
                        self.inner.schema,
                        self.inner.candidates_table,
                        found.as_deref().unwrap_or("none")
                    ),
                    fix: "drop it and let setup create it, or re-create it from \
                          PostgresBackend::ddl()"
                        .into(),
                });
            }
        }
        Ok(())
    }

    /// `holder` on a connection the caller holds.
    async fn holder_on(
        &self,
        client: &tokio_postgres::Client,
        key: &Key,
        until: Instant,
    ) -> Result<Option<Holder>, BackendError> {
        let key = key.as_str();
        let params: [(&(dyn ToSql + Sync), Type); 1] = [(&key, Type::TEXT)];
        let (rows, _) = Self::pipelined(client, &self.inner.sql.holder, &params, until)
            .await?
            .map_err(|e| self.error(e))?;
        let Some(row) = rows.into_iter().next() else {
            return Ok(None);
        };
        let get = |row: &Row| -> Result<_, tokio_postgres::Error> {
            Ok((
                row.try_get::<_, i64>(0)?,
                row.try_get::<_, i64>(1)?,
                row.try_get::<_, Option<Vec<u8>>>(2)?,
                row.try_get::<_, Option<f64>>(3)?,
            ))
        };
        let (term, revision, value, left_s) = get(&row).map_err(BackendError::unavailable)?;
        Ok(Some(Self::holder_from(term, revision, value, left_s)))
    }

    /// A renewal, or with `proclaimed` a proclaim: the renewal's UPDATE
    /// also setting the value to the lease with that metadata.
    async fn extend(
        &self,
        key: &Key,
        lease: &Lease,
        proclaimed: Option<&Bytes>,
        ttl: Duration,
        budget: Duration,
    ) -> Result<Renewed, BackendError> {
        self.note_ttl(ttl);
        // The leader gives the term up at `deadline`; after that, this
        // renewal must not take effect.
        let deadline = Instant::now() + budget;
        let client = self.client().await?;
        let nonce = lease.nonce().as_u128().to_be_bytes();
        let nonce = &nonce[..];
        let term = i64::try_from(lease.token().get()).unwrap_or(i64::MAX);
        let secs = ttl.as_secs_f64();
        let key = key.as_str();
        // The UPDATE itself checks the deadline on the server's clock, so
        // a renewal that reaches the server late (a slow link, a queue)
        // changes nothing. The timeouts (the time left) stop a renewal
        // stuck behind a lock or a slow server from tying up the
        // connection past the deadline.
        let server_deadline = self.inner.clock.server_deadline_us(deadline);
        // A proclaim stores the lease with its new metadata, encoded as
        // acquire encodes it (the token is the `term` column).
        let lease = match proclaimed {
            Some(metadata) => lease.with_metadata(metadata.clone()),
            None => lease.clone(),
        };
        let value = proclaimed.map(|_| {
            LeaseValue {
                token: None,
                ..lease.value()
            }
            .encode()
        });
        let value = value.as_deref();
        let mut params: Vec<(&(dyn ToSql + Sync), Type)> = vec![
            (&key, Type::TEXT),
            (&nonce, Type::BYTEA),
            (&term, Type::INT8),
            (&secs, Type::FLOAT8),
            (&server_deadline, Type::INT8),
            (&self.inner.channel, Type::TEXT),
        ];
        let sql = match &value {
            Some(value) => {
                params.push((value, Type::BYTEA));
                &self.inner.sql.proclaim
            }
            None => &self.inner.sql.renew,
        };
        self.inner.renew_statements.fetch_add(1, Ordering::Relaxed);
        let (rows, received) = match Self::pipelined(&client, sql, &params, deadline).await? {
            Ok(reply) => reply,
            // The table is gone, and every lease in it: the term ends
            // now, like any other loss.
            Err(e) if e.code() == Some(&SqlState::UNDEFINED_TABLE) => {
                tracing::warn!(error = %e, "the lease table is gone; the term is lost");
                return Ok(Renewed::Lost);
            }
            Err(e) => return Err(classify(e)),
        };
        let row = rows
            .into_iter()
            .next()
            .ok_or_else(|| BackendError::unavailable("the renewal returned no row"))?;
        let (revision, server_us, late) =
            (|| -> Result<(Option<i64>, i64, bool), tokio_postgres::Error> {
                Ok((row.try_get(0)?, row.try_get(1)?, row.try_get(2)?))
            })()
            .map_err(BackendError::unavailable)?;
        self.inner.clock.sample(server_us, received);
        match revision {
            Some(revision) => Ok(Renewed::Renewed(
                lease.with_revision(u64::try_from(revision).unwrap_or(0)),
            )),
            // Too late to count: not a loss the store decided, the same as
            // no reply before the deadline.
            None if late => Err(BackendError::Timeout(budget)),
            None => Ok(Renewed::Lost),
        }
    }

    /// Many renewals in one statement ([`renew_many_sql`]), one result
    /// each, in order.
    async fn extend_many(&self, renewals: &[Renewal]) -> Vec<Result<Renewed, BackendError>> {
        let n = renewals.len();
        let every = |e: BackendError| super::batch::each(e, n);
        let Some(longest) = renewals.iter().map(|r| r.budget).max() else {
            return Vec::new();
        };
        for r in renewals {
            self.note_ttl(r.ttl);
        }
        // Each leader's deadline goes to the server with its renewal, and
        // the row is extended only before it. The statement is bounded by
        // the latest of them, not the soonest: one renewal retried just
        // before its deadline must not cancel the statement for every key
        // in the batch. A row extended in time may then commit after its
        // leader gave up, which only keeps an abandoned lease a little
        // longer (the contract allows it; safety never depends on it).
        let now = Instant::now();
        let until = now + longest;
        let client = match self.client().await {
            Ok(client) => client,
            Err(e) => return every(e),
        };
        let keys: Vec<&str> = renewals.iter().map(|r| r.key.as_str()).collect();
        let nonces: Vec<[u8; 16]> = renewals
            .iter()
            .map(|r| r.lease.nonce().as_u128().to_be_bytes())
            .collect();
        let nonces: Vec<&[u8]> = nonces.iter().map(|b| &b[..]).collect();
        let terms: Vec<i64> = renewals
            .iter()
            .map(|r| i64::try_from(r.lease.token().get()).unwrap_or(i64::MAX))
            .collect();
        let secs: Vec<f64> = renewals.iter().map(|r| r.ttl.as_secs_f64()).collect();
        let deadlines: Vec<Option<i64>> = renewals
            .iter()
            .map(|r| self.inner.clock.server_deadline_us(now + r.budget))
            .collect();
        let params: [(&(dyn ToSql + Sync), Type); 6] = [
            (&keys, Type::TEXT_ARRAY),
            (&nonces, Type::BYTEA_ARRAY),
            (&terms, Type::INT8_ARRAY),
            (&secs, Type::FLOAT8_ARRAY),
            (&deadlines, Type::INT8_ARRAY),
            (&self.inner.channel, Type::TEXT),
        ];
        self.inner.renew_statements.fetch_add(1, Ordering::Relaxed);
        let reply = Self::pipelined(&client, &self.inner.sql.renew_many, &params, until).await;
        let (rows, received) = match reply {
            Ok(Ok(reply)) => reply,
            // The table is gone, and every lease in it.
            Ok(Err(e)) if e.code() == Some(&SqlState::UNDEFINED_TABLE) => {
                tracing::warn!(error = %e, "the lease table is gone; the terms are lost");
                return (0..n).map(|_| Ok(Renewed::Lost)).collect();
            }
            Ok(Err(e)) => return every(classify(e)),
            Err(e) => return every(e),
        };
        let mut results: Vec<Option<Result<Renewed, BackendError>>> =
            (0..n).map(|_| None).collect();
        let mut sampled = false;
        for row in rows {
            let Ok((at, revision, server_us, late)) =
                (|| -> Result<(i64, Option<i64>, i64, bool), tokio_postgres::Error> {
                    Ok((
                        row.try_get(0)?,
                        row.try_get(1)?,
                        row.try_get(2)?,
                        row.try_get(3)?,
                    ))
                })()
            else {
                continue;
            };
            if !sampled {
                self.inner.clock.sample(server_us, received);
                sampled = true;
            }
            let Some(i) = usize::try_from(at).ok().and_then(|at| at.checked_sub(1)) else {
                continue;
            };
            let (Some(slot), Some(r)) = (results.get_mut(i), renewals.get(i)) else {
                continue;
            };
            *slot = Some(match revision {
                Some(revision) => Ok(Renewed::Renewed(
                    r.lease.with_revision(u64::try_from(revision).unwrap_or(0)),
                )),
                None if late => Err(BackendError::Timeout(r.budget)),
                None => Ok(Renewed::Lost),
            });
        }
        results
            .into_iter()
            .map(|r| {
                r.unwrap_or_else(|| {
                    Err(BackendError::unavailable(
                        "the batched renewal returned no row for this key",
                    ))
                })
            })
            .collect()
    }

    fn holder_from(
        term: i64,
        revision: i64,
        value: Option<Vec<u8>>,
        left_s: Option<f64>,
    ) -> Holder {
        let expires_in = left_s
            .filter(|s| s.is_finite() && *s > 0.0)
            .and_then(|s| Duration::try_from_secs_f64(s).ok());
        let token = u64::try_from(term).ok().map(FencingToken::new);
        let revision = u64::try_from(revision).unwrap_or(0);
        match value {
            Some(value) => Holder::decode(&value, token, revision, expires_in),
            None => Holder::foreign(revision, expires_in),
        }
    }
}

/// How long the server may work on a call, in ms: the budget, less a
/// little for the reply to travel back, and never zero (zero disables the
/// timeouts).
fn server_budget(budget: Duration) -> u128 {
    let margin = (budget / 10).min(Duration::from_millis(50));
    (budget.saturating_sub(margin)).as_millis().max(1)
}

/// Sorts a tokio-postgres error into the campaign's kinds.
fn classify(e: tokio_postgres::Error) -> BackendError {
    match e.code().map(is_transient_sqlstate) {
        // No SQLSTATE: the connection broke, or the reply did not parse.
        None | Some(Some(true)) => BackendError::unavailable(e),
        Some(None) => BackendError::Denied(Box::new(e)),
        Some(Some(false)) => BackendError::Fatal(Box::new(e)),
    }
}

/// `Some(true)`: worth retrying; `Some(false)`: fatal; `None`: permission
/// denied.
fn is_transient_sqlstate(code: &SqlState) -> Option<bool> {
    if *code == SqlState::INSUFFICIENT_PRIVILEGE {
        return None;
    }
    let transient = [
        // Cancelled by statement_timeout, lock_timeout.
        SqlState::QUERY_CANCELED,
        SqlState::LOCK_NOT_AVAILABLE,
        // A read-only transaction: a standby after a failover, or a
        // primary being demoted, until the application reaches the new
        // primary.
        SqlState::READ_ONLY_SQL_TRANSACTION,
        // The session was ended by idle_in_transaction_session_timeout.
        SqlState::IDLE_IN_TRANSACTION_SESSION_TIMEOUT,
        // The connection was handed out inside a failed transaction (a
        // pool shared with an application that left one open, or a COMMIT
        // cancelled by its timeout): the state of a session, not of the
        // store. The call's own COMMIT ends that transaction, so the next
        // call on the connection works.
        SqlState::IN_FAILED_SQL_TRANSACTION,
        // A prepared statement the server no longer has (DEALLOCATE ALL, a
        // pooler, a restart); this backend prepares none, but a pool shared
        // with others may.
        SqlState::INVALID_SQL_STATEMENT_NAME,
    ];
    // Connection exceptions, transaction rollbacks (serialization failure,
    // deadlock), insufficient resources, operator intervention (admin or
    // crash shutdown, cannot connect now), system errors: all worth
    // retrying.
    let class = code.code().get(..2).unwrap_or("");
    Some(transient.contains(code) || matches!(class, "08" | "40" | "53" | "57" | "58"))
}

impl BackendEdge for PostgresBackend {
    fn name(&self) -> &'static str {
        "postgres"
    }

    async fn setup(&self, budget: Duration) -> Result<Prepared, BackendError> {
        let bound = self.bound().min(budget);
        let mut client = self.client().await?;
        let mut prepared = Prepared::Existing;
        // One transaction, its statements bounded on the server: dropped
        // part way (the campaign's timeout), it rolls back.
        let tx = client.transaction().await.map_err(classify)?;
        let ms = server_budget(bound);
        tx.batch_execute(&format!(
            "SET LOCAL statement_timeout = {ms}; SET LOCAL lock_timeout = {ms}"
        ))
        .await
        .map_err(classify)?;
        if self.inner.create_table {
            // Serialize DDL among candidates starting at once: concurrent
            // CREATE TABLE IF NOT EXISTS can fail on the catalog's unique
            // index. The lock ends with the transaction.
            tx.query(
                "SELECT pg_advisory_xact_lock(hashtext($1))",
                &[&format!("leaseholder:{}", self.inner.channel)],
            )
            .await
            .map_err(classify)?;
            // Under the lock: whether the table is there before the DDL.
            let found = tx
                .query_one(
                    "SELECT count(*) FROM information_schema.tables \
                     WHERE table_schema = $1 AND table_name = $2",
                    &[&self.inner.schema, &self.inner.table],
                )
                .await
                .map_err(classify)?;
            let count: i64 = found.try_get(0).map_err(classify)?;
            if count == 0 {
                prepared = Prepared::Created;
            }
            tx.batch_execute(&self.ddl()).await.map_err(classify)?;
        }
        self.check_columns(&tx).await?;
        self.check_candidate_columns(&tx).await?;
        tx.commit().await.map_err(classify)?;
        Ok(prepared)
    }

    async fn acquire(
        &self,
        key: &Key,
        claim: &Claim,
        ttl: Duration,
        budget: Duration,
    ) -> Result<Acquired, BackendError> {
        self.note_ttl(ttl);
        let called = Instant::now();
        // The campaign waits ttl - drift margin (more than ttl/2) for an
        // acquire; the server gives up well before.
        let bound = self.bound().min(ttl / 3).min(budget);
        // A burst of acquires (thousands of keys starting at once) must
        // not queue for every connection of the pool: renewals waiting
        // behind them would miss their deadlines, and acquires that waited
        // past their bound would still cost a round trip each. All but one
        // of the pool's connections may wait for or run acquires; the
        // others wait here, in order, as long as they can while keeping
        // their whole bound for the statement, else fail with `Timeout`
        // (their campaigns back off and retry).
        let admitted = tokio::time::timeout_at(
            called + budget.saturating_sub(bound),
            self.inner.acquiring.acquire(),
        )
        .await;
        let Ok(Ok(_admitted)) = admitted else {
            return Err(BackendError::Timeout(called.elapsed()));
        };
        let until = (Instant::now() + bound).min(called + budget);
        let client = self.client().await?;
        let value = LeaseValue {
            token: None,
            ..claim.value(FencingToken::new(0))
        }
        .encode();
        let nonce = claim.nonce.as_u128().to_be_bytes();
        let (key_s, nonce_b, value_b) = (key.as_str(), &nonce[..], &value[..]);
        let secs = ttl.as_secs_f64();
        let params: [(&(dyn ToSql + Sync), Type); 5] = [
            (&key_s, Type::TEXT),
            (&nonce_b, Type::BYTEA),
            (&value_b, Type::BYTEA),
            (&secs, Type::FLOAT8),
            (&self.inner.channel, Type::TEXT),
        ];
        let (rows, received) = Self::pipelined(&client, &self.inner.sql.acquire, &params, until)
            .await?
            .map_err(|e| self.error(e))?;
        let Some(row) = rows.into_iter().next() else {
            // Nothing written, and nothing live visible to this statement's
            // snapshot: a concurrent acquire committed after it began.
            // Read again (on the same connection: a pool of one has no
            // other).
            return match self.holder_on(&client, key, until).await? {
                Some(h) => Ok(Acquired::Held(h)),
                None => Err(BackendError::unavailable(
                    "the key changed during acquire; retry",
                )),
            };
        };
        let get = |row: &Row| -> Result<_, tokio_postgres::Error> {
            Ok((
                row.try_get::<_, bool>(0)?,
                row.try_get::<_, i64>(1)?,
                row.try_get::<_, i64>(2)?,
                row.try_get::<_, Option<Vec<u8>>>(3)?,
                row.try_get::<_, Option<f64>>(4)?,
                row.try_get::<_, i64>(6)?,
            ))
        };
        let (won, term, revision, value, left_s, server_us) =
            get(&row).map_err(BackendError::unavailable)?;
        self.inner.clock.sample(server_us, received);
        if won {
            let token = u64::try_from(term)
                .map_err(|_| BackendError::Fatal(format!("negative term {term}").into()))?;
            let revision = u64::try_from(revision).unwrap_or(0);
            Ok(Acquired::Won(Lease::new(
                claim,
                FencingToken::new(token),
                revision,
            )))
        } else {
            Ok(Acquired::Held(Self::holder_from(
                term, revision, value, left_s,
            )))
        }
    }

    async fn renew(
        &self,
        key: &Key,
        lease: &Lease,
        ttl: Duration,
        budget: Duration,
    ) -> Result<Renewed, BackendError> {
        self.extend(key, lease, None, ttl, budget).await
    }

    fn batches_renewals(&self) -> bool {
        self.inner.batch_renewals
    }

    async fn renew_many(&self, renewals: &[Renewal]) -> Vec<Result<Renewed, BackendError>> {
        self.extend_many(renewals).await
    }

    fn supports_proclaim(&self) -> bool {
        true
    }

    async fn proclaim(
        &self,
        key: &Key,
        lease: &Lease,
        metadata: &Bytes,
        ttl: Duration,
        budget: Duration,
    ) -> Result<Renewed, BackendError> {
        self.extend(key, lease, Some(metadata), ttl, budget).await
    }

    async fn release(
        &self,
        key: &Key,
        lease: &Lease,
        budget: Duration,
    ) -> Result<(), BackendError> {
        let until = Instant::now() + self.bound().min(budget);
        let client = self.client().await?;
        let nonce = lease.nonce().as_u128().to_be_bytes();
        let nonce = &nonce[..];
        let term = i64::try_from(lease.token().get()).unwrap_or(i64::MAX);
        let key = key.as_str();
        let params: [(&(dyn ToSql + Sync), Type); 4] = [
            (&key, Type::TEXT),
            (&nonce, Type::BYTEA),
            (&term, Type::INT8),
            (&self.inner.channel, Type::TEXT),
        ];
        match Self::pipelined(&client, &self.inner.sql.release, &params, until).await? {
            Ok(_) => Ok(()),
            // No table, no lease: nothing left to release.
            Err(e) if e.code() == Some(&SqlState::UNDEFINED_TABLE) => Ok(()),
            Err(e) => Err(classify(e)),
        }
    }

    async fn holder(&self, key: &Key, budget: Duration) -> Result<Option<Holder>, BackendError> {
        let until = Instant::now() + self.bound().min(budget);
        let client = self.client().await?;
        self.holder_on(&client, key, until).await
    }

    async fn keys(&self, budget: Duration) -> Result<Vec<Key>, BackendError> {
        let until = Instant::now() + self.bound().min(budget);
        let client = self.client().await?;
        let (rows, _) = Self::pipelined(&client, &self.inner.sql.keys, &[], until)
            .await?
            .map_err(|e| self.error(e))?;
        Ok(rows
            .iter()
            .filter_map(|row| row.try_get::<_, String>(0).ok())
            .filter_map(|name| Key::new(name).ok())
            .collect())
    }

    fn supports_candidates(&self) -> bool {
        true
    }

    async fn register(
        &self,
        key: &Key,
        candidate: &Candidate,
        ttl: Duration,
        budget: Duration,
    ) -> Result<(), BackendError> {
        let until = Instant::now() + self.bound().min(budget);
        let client = self.client().await?;
        let id = candidate.id().as_uuid().to_string();
        let value = candidate.encode();
        let (key, value) = (key.as_str(), &value[..]);
        let secs = ttl.as_secs_f64();
        let params: [(&(dyn ToSql + Sync), Type); 5] = [
            (&key, Type::TEXT),
            (&id, Type::TEXT),
            (&value, Type::BYTEA),
            (&secs, Type::FLOAT8),
            (&self.inner.channel, Type::TEXT),
        ];
        Self::pipelined(&client, &self.inner.sql.register, &params, until)
            .await?
            .map_err(|e| self.registry_error(e))?;
        Ok(())
    }

    async fn deregister(
        &self,
        key: &Key,
        id: LeaderId,
        budget: Duration,
    ) -> Result<(), BackendError> {
        let until = Instant::now() + self.bound().min(budget);
        let client = self.client().await?;
        let id = id.as_uuid().to_string();
        let key = key.as_str();
        let params: [(&(dyn ToSql + Sync), Type); 3] = [
            (&key, Type::TEXT),
            (&id, Type::TEXT),
            (&self.inner.channel, Type::TEXT),
        ];
        Self::pipelined(&client, &self.inner.sql.deregister, &params, until)
            .await?
            .map_err(|e| self.registry_error(e))?;
        Ok(())
    }

    async fn candidates(
        &self,
        key: &Key,
        budget: Duration,
    ) -> Result<Vec<Candidate>, BackendError> {
        let until = Instant::now() + self.bound().min(budget);
        let client = self.client().await?;
        let key = key.as_str();
        let params: [(&(dyn ToSql + Sync), Type); 1] = [(&key, Type::TEXT)];
        let (rows, _) = Self::pipelined(&client, &self.inner.sql.candidates, &params, until)
            .await?
            .map_err(|e| self.registry_error(e))?;
        Ok(rows
            .iter()
            .filter_map(|row| row.try_get::<_, Vec<u8>>(0).ok())
            .filter_map(|value| Candidate::decode(&value).ok())
            .collect())
    }

    async fn candidate(
        &self,
        key: &Key,
        id: LeaderId,
        budget: Duration,
    ) -> Result<Option<Candidate>, BackendError> {
        let until = Instant::now() + self.bound().min(budget);
        let client = self.client().await?;
        let (key, wanted) = (key.as_str(), id);
        let id = id.as_uuid().to_string();
        let params: [(&(dyn ToSql + Sync), Type); 2] = [(&key, Type::TEXT), (&id, Type::TEXT)];
        let (rows, _) = Self::pipelined(&client, &self.inner.sql.candidate, &params, until)
            .await?
            .map_err(|e| self.registry_error(e))?;
        Ok(rows
            .first()
            .and_then(|row| row.try_get::<_, Vec<u8>>(0).ok())
            .and_then(|value| Candidate::decode(&value).ok())
            .filter(|c| c.id() == wanted))
    }

    async fn watch(&self) -> Result<Option<WatchStream>, BackendError> {
        let Some(config) = self.inner.listen.clone() else {
            return Ok(None);
        };
        let (client, mut connection) = config.connect(NoTls).await.map_err(classify)?;
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        // The connection's messages: notifications are forwarded; the
        // stream ends when the connection does.
        let pump = tokio::spawn(async move {
            let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
            while let Some(message) = messages.next().await {
                match message {
                    Ok(AsyncMessage::Notification(n)) => {
                        if tx.send(n.payload().to_owned()).is_err() {
                            break;
                        }
                    }
                    Ok(_) => {}
                    Err(e) => {
                        tracing::debug!(error = %e, "postgres LISTEN connection ended");
                        break;
                    }
                }
            }
        });
        client
            .batch_execute(&format!("LISTEN \"{}\"", self.inner.channel))
            .await
            .map_err(classify)?;
        // The stream owns the client (dropping it closes the connection)
        // and ends when the pump does.
        let events = futures_util::stream::unfold(
            (rx, client, AbortOnDrop(pump)),
            |(mut rx, client, pump)| async move {
                loop {
                    let payload = rx.recv().await?;
                    if let Some(event) = event_from(&payload) {
                        return Some((event, (rx, client, pump)));
                    }
                }
            },
        );
        Ok(Some(Box::pin(events)))
    }
}

/// Aborts a task when dropped (the LISTEN connection's pump, when nobody
/// watches any more).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// `u…`: acquired or renewed (see [`updated_from`]); `a<key>`: acquired;
/// `r<key>`: released; `c<key>`: the key's registry changed. Anything else
/// is ignored.
fn event_from(payload: &str) -> Option<WatchEvent> {
    let (kind, rest) = payload.split_at_checked(1)?;
    match kind {
        "u" => updated_from(rest),
        "a" => Some(WatchEvent::Updated(Key::new(rest).ok()?, None)),
        "r" => Some(WatchEvent::Released(Key::new(rest).ok()?)),
        "c" => Some(WatchEvent::Candidates(Key::new(rest).ok()?)),
        _ => None,
    }
}

/// `<term>:<revision>:<ttl ms>:<value in hex>:<key>`, as acquire and renew
/// notify it: the holder, with its full ttl as the expiry hint.
fn updated_from(rest: &str) -> Option<WatchEvent> {
    let mut fields = rest.splitn(5, ':');
    let term: i64 = fields.next()?.parse().ok()?;
    let revision: i64 = fields.next()?.parse().ok()?;
    let ttl_ms: u64 = fields.next()?.parse().ok()?;
    let value = hex(fields.next()?)?;
    let key = Key::new(fields.next()?).ok()?;
    let holder = PostgresBackend::holder_from(
        term,
        revision,
        Some(value),
        Some(Duration::from_millis(ttl_ms).as_secs_f64()),
    );
    Some(WatchEvent::Updated(key, Some(holder)))
}

/// Decodes lowercase or uppercase hex.
fn hex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    text.as_bytes()
        .chunks(2)
        .map(|pair| {
            let digit = |b: u8| (b as char).to_digit(16);
            u8::try_from(digit(pair[0])? * 16 + digit(pair[1])?).ok()
        })
        .collect()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::{
        PostgresBackend, candidates_table_name, channel_name, check_identifier, event_from,
        is_transient_sqlstate, server_budget,
    };
    use crate::backend::WatchEvent;
    use std::time::Duration;
    use tokio_postgres::error::SqlState;

    #[test]
    fn identifiers_are_checked_not_just_quoted() {
        for good in ["leases", "_x", "Leases_2", &"a".repeat(63)] {
            assert!(check_identifier("table", good).is_ok(), "{good}");
        }
        for bad in [
            "",
            "2x",
            "a-b",
            "le\"ases",
            "x; DROP TABLE y",
            "täble",
            &"a".repeat(64),
        ] {
            assert!(check_identifier("table", bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn candidates_tables_fit_and_differ_by_table() {
        assert_eq!(candidates_table_name("leases"), "leases_candidates");
        let longest_plain = "a".repeat(52);
        assert_eq!(
            candidates_table_name(&longest_plain),
            format!("{longest_plain}_candidates")
        );
        let (a, b) = (
            format!("{}x", "a".repeat(62)),
            format!("{}y", "a".repeat(62)),
        );
        let (ca, cb) = (candidates_table_name(&a), candidates_table_name(&b));
        assert_ne!(ca, cb);
        for name in [&ca, &cb, &candidates_table_name(&"b".repeat(53))] {
            assert!(name.len() <= 63, "{name}");
            assert!(name.ends_with("_candidates"), "{name}");
            assert!(check_identifier("table", name).is_ok(), "{name}");
        }
    }

    #[test]
    fn channel_names_fit_and_differ_by_table() {
        let a = channel_name("public", "leases");
        assert_eq!(a, channel_name("public", "leases"));
        assert_ne!(a, channel_name("public", "leases2"));
        assert_ne!(a, channel_name("publi", "cleases"));
        assert!(a.len() < 64);
    }

    #[test]
    fn notifications_parse_and_junk_is_ignored() {
        assert!(
            matches!(event_from("rjobs"), Some(WatchEvent::Released(k)) if k.as_str() == "jobs")
        );
        assert!(
            matches!(event_from("ajobs"), Some(WatchEvent::Updated(k, None)) if k.as_str() == "jobs")
        );
        assert!(
            matches!(event_from("cjobs:a"), Some(WatchEvent::Candidates(k)) if k.as_str() == "jobs:a")
        );
        assert!(event_from("c").is_none());
        let value = crate::backend::LeaseValue {
            nonce: crate::backend::Nonce::random(),
            id: crate::backend::LeaderId::new(),
            token: None,
            acquired_at: std::time::UNIX_EPOCH,
            metadata: bytes::Bytes::from_static(b"m:x"),
        };
        let hexed: String = value.encode().iter().map(|b| format!("{b:02x}")).collect();
        match event_from(&format!("u42:7:2500:{hexed}:a:key")) {
            Some(WatchEvent::Updated(k, Some(h))) => {
                assert_eq!(k.as_str(), "a:key");
                assert_eq!(h.token().map(|t| t.get()), Some(42));
                assert_eq!(h.revision(), 7);
                assert_eq!(h.nonce(), Some(value.nonce));
                assert_eq!(h.expires_in(), Some(Duration::from_millis(2500)));
            }
            other => panic!("{other:?}"),
        }
        // A value that is not ours: a foreign holder. Malformed: ignored.
        assert!(matches!(
            event_from("u1:1:10:00ff:k"),
            Some(WatchEvent::Updated(_, Some(h))) if h.is_foreign()
        ));
        for junk in [
            "u1:1:10:0:k",
            "u1:1:10:zz:k",
            "u1:x:10:00:k",
            "u1:1:10:00",
            "u",
        ] {
            assert!(event_from(junk).is_none(), "{junk}");
        }
        assert!(event_from("").is_none());
        assert!(event_from("x").is_none());
        assert!(event_from("zjobs").is_none());
    }

    #[test]
    fn the_server_gets_less_than_the_budget_but_never_zero() {
        assert_eq!(server_budget(Duration::from_secs(3)), 2950);
        assert_eq!(server_budget(Duration::from_millis(100)), 90);
        assert_eq!(server_budget(Duration::ZERO), 1);
    }

    #[test]
    fn sqlstates_of_failover_conflict_and_shutdown_are_transient() {
        for code in [
            "25006", "25P02", "26000", "40001", "40P01", "57P01", "57P03", "57014", "55P03",
            "08006", "53300",
        ] {
            assert_eq!(
                is_transient_sqlstate(&SqlState::from_code(code)),
                Some(true),
                "{code}"
            );
        }
        for code in ["42P01", "42601", "23505", "25001", "0A000"] {
            assert_eq!(
                is_transient_sqlstate(&SqlState::from_code(code)),
                Some(false),
                "{code}"
            );
        }
        assert_eq!(is_transient_sqlstate(&SqlState::from_code("42501")), None);
    }

    #[test]
    fn bad_settings_fail_at_build_time() {
        let err = |b: super::PostgresBuilder| b.build().unwrap_err().to_string();
        assert!(err(PostgresBackend::builder()).contains("no connection"));
        assert!(
            err(PostgresBackend::builder()
                .url("postgres://x/y")
                .table("bad name"))
            .contains("table name")
        );
        assert!(err(PostgresBackend::builder().url("postgres://x:notaport/y")).contains("parse"));
        assert!(
            err(PostgresBackend::builder()
                .url("postgres://x/y")
                .pool_size(0))
            .contains("pool_size")
        );
        assert!(
            err(PostgresBackend::builder()
                .url("postgres://x/y")
                .statement_timeout(std::time::Duration::ZERO))
            .contains("statement_timeout")
        );
    }
}
