//! Redis (feature `redis`), on redis-rs: a standalone server, a Sentinel
//! group, or a Cluster (Redis 7 or newer).
//!
//! # Key layout
//!
//! Every key of one lease shares a hash tag, so that a script can touch
//! them all in a Cluster:
//!
//! | key | holds | expires |
//! |---|---|---|
//! | `{<prefix>:<key>}:lease` | the lease: our encoded value (nonce, holder id, token, metadata) | `PX` ttl, by the server's clock |
//! | `{<prefix>:<key>}:token` | the last token issued for the key | never |
//! | `<prefix>:epoch` (Cluster: `<prefix>:epoch:{<tag>}`, one per hash slot) | when the data under it started (the server's clock, µs) | never |
//! | `{<prefix>:<key>}:candidates` | the candidate registry: a hash from candidate id (32 hex digits) to its encoded [`Candidate`] | `PEXPIREAT` the last entry's expiry, so an abandoned key's registry disappears |
//! | `{<prefix>:<key>}:candidates:expiry` | a sorted set: each candidate id, scored by its entry's expiry on the server's clock (µs) | as the hash |
//!
//! Events go to the pub/sub channel `<prefix>:events`.
//!
//! # Operations
//!
//! Each is one Lua script (`EVALSHA`, loaded again with `EVAL` when the
//! server has forgotten it), atomic on the server, and every expiry is the
//! server's own (`PX`, `PTTL`):
//!
//! | op | script |
//! |---|---|
//! | acquire | if the lease key exists, return it and its `PTTL`. Else, if the epoch marker is missing or younger than one ttl, refuse (see below). Else the token is `max(last token + 1, the server's TIME in µs)`, written to the token key and into the value, which is `SET … PX ttl`; `PUBLISH` the new holder |
//! | renew | if the stored nonce is ours and the server's clock is still before the leader's deadline (mapped to it from earlier replies, early rather than late), `PEXPIRE` by the ttl and `PUBLISH` the holder with its expiry; a missing or replaced lease is [`Renewed::Lost`]. An expired key is gone, so it cannot be revived |
//! | proclaim | as renew, but `SET … PX ttl` instead of `PEXPIRE`: the stored value's head (nonce, holder id, token, acquired at) kept as it is, followed by the new metadata; `PUBLISH` the holder with it |
//! | release | compare-and-delete on the nonce, the token key kept; `PUBLISH` the release |
//! | holder | the value, its `PTTL` (the expiry hint) and its `PEXPIRETIME` (the revision); a value we cannot decode, or a key of another type, is a foreign holder |
//! | register | remove the key's expired entries (`ZRANGEBYSCORE … -inf now`, `HDEL`, `ZREMRANGEBYSCORE`); `HSET` the entry if it is new or its value changed; `ZADD` its expiry, the server's `TIME` + ttl; `PEXPIREAT` both keys to the latest expiry; `PUBLISH` a registry change only if an entry was added, rewritten with other contents or removed (never for a plain renewal) |
//! | deregister | `HDEL` + `ZREM` of the entry; `PUBLISH` a registry change if it was live |
//! | candidates | the ids scored after the server's `TIME` (`ZRANGEBYSCORE … (now +inf`), then their values (`HGET`); entries that do not decode are left out |
//! | candidate | one id's score (`ZSCORE`), and its value (`HGET`) if that is after the server's `TIME` |
//!
//! A lease's revision is its stored expiry (`PEXPIRETIME`), which every
//! script that writes the lease returns and every read shows unchanged
//! until the next write: a read-back after a renewal's lost reply sees a
//! new revision only if that renewal landed.
//!
//! The registry never touches the lease keys, nor they it. Its entries
//! expire by the server's clock too, judged in the scripts (an expired
//! entry is listed by nobody, whether or not a later `register` has
//! removed it yet).
//! # Data loss: the epoch marker
//!
//! A Redis without persistence that restarts, a `FLUSHDB`, or a failover to
//! a replica that missed the last writes lose leases *while their holders
//! still lead*: the holder learns of it only at its next renewal. A
//! candidate that acquired at once would lead beside it. So every acquire
//! also checks an epoch marker (one per database, or one per hash slot in a
//! Cluster, since a script cannot reach other slots), written when the
//! data under it began: if it is missing, the script writes it, and no
//! acquisition under it succeeds until it is one ttl old. By then every
//! holder of a lost lease has passed its deadline. [`setup`](BackendEdge::setup)
//! writes the markers of a fresh store (and reports
//! [`Prepared::Created`]), so only data loss costs a ttl of waiting.
//!
//! Tokens survive the loss too: a token taken from the server's clock in
//! microseconds is larger than every earlier one, as long as the server's
//! clock (the new primary's, after a failover) has not gone back.
//!
//! # Limits
//!
//! - **Replication is asynchronous.** After a Sentinel or Cluster failover
//!   the new primary may have missed the last renewals: a lease can then
//!   end earlier than its holder's deadline, and a candidate can lead
//!   beside it for the rest of that deadline (at most a ttl). The epoch
//!   marker does not help when the marker itself was replicated. Fencing
//!   tokens still rise (they come from the clock), so a downstream that
//!   checks them refuses the old leader's writes once the new one wrote.
//! - **Eviction.** With `maxmemory` set, any policy but `noeviction` may
//!   evict a live lease. [`setup`](BackendEdge::setup) refuses such a
//!   server with [`BackendError::Misconfigured`] (if `CONFIG GET` is
//!   allowed; managed services that forbid it are not checked).
//! - **Clocks.** Redis expires keys by its wall clock: keep it from being
//!   stepped (NTP slewing is fine). In a Cluster, the deadline check of a
//!   renewal uses the clock of the node that holds the key.
//!
//! # Watch
//!
//! One pub/sub connection per backend (a Cluster broadcasts `PUBLISH` to
//! every node, so any node will do), pinged every
//! [`watch_ping`](RedisBuilder::watch_ping) so that a silent link is
//! noticed; after a reconnect the hub sends `Resync`. A registry change is
//! published as `C <key>` and becomes [`WatchEvent::Candidates`]; an entry
//! that expires unrenewed is not reported (nothing reports expiry), and
//! leaders read the registry each renew interval anyway. Keyspace
//! notifications are not used (they are off by default and lost across a
//! reconnect). Nothing reports an expiry, so followers also wake at the
//! holder's expiry hint, which every renewal's event moves: an idle
//! follower makes no store call while its leader renews.
//!
//! # Connections
//!
//! One multiplexed connection (Cluster: one cluster connection) shared by
//! every key. It is replaced after an I/O error, a dropped link, a
//! `READONLY` reply (a demoted primary) or a call that got no reply within
//! its budget (a link that went silent would otherwise never be noticed);
//! through Sentinel, each new connection asks the sentinels for the current
//! primary.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use futures_util::StreamExt;
use redis::aio::{ConnectionLike, MultiplexedConnection};
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use redis::sentinel::{SentinelClient, SentinelNodeConnectionInfo, SentinelServerType};
use redis::{
    AsyncConnectionConfig, Client, Cmd, ErrorKind, IntoConnectionInfo, Pipeline, RedisError,
    RedisFuture, Script, ServerErrorKind, Value,
};
use tokio::time::Instant;

use super::clock::ServerClock;
use super::{
    Acquired, BackendEdge, Candidate, Claim, FencingToken, Holder, Key, LeaderId, Lease, Prepared,
    Renewed, WatchEvent, WatchStream,
};
use crate::error::{BackendError, ConfigError};

/// The key prefix when none is given.
pub const DEFAULT_PREFIX: &str = "leaseholder";

/// The longest prefix accepted.
pub const MAX_PREFIX_LEN: usize = 128;

const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
const DEFAULT_WATCH_PING: Duration = Duration::from_secs(1);
const DEFAULT_SENTINEL_PORT: u16 = 26379;
const NAME: &str = "redis";
const SLOTS: u16 = 16384;
/// The oldest server accepted.
const MIN_VERSION: (u32, u32) = (7, 0);
/// How many marker scripts a Cluster setup has in flight.
const SETUP_CONCURRENCY: usize = 256;

/// Tokens and times pass through Lua's doubles: exact below 2^53 (µs of
/// the Unix clock reach it in the year 2255).
const LUA_EXACT: u64 = 1 << 53;

const LUA_COMMON: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local function int(n) return string.format('%.0f', n) end
local function expires(k) return redis.call('PEXPIRETIME', k) end
local function get(k)
  local v = redis.pcall('GET', k)
  if type(v) == 'table' then return '' end
  return v
end
";

/// KEYS: lease, token, epoch. ARGV: value, ttl ms, channel, key.
/// Returns {0, value, pttl, now, expiry} (held), {1, token, now, expiry}
/// (won) or {2, quiet ms, now} (the epoch is younger than a ttl); the
/// expiry is `PEXPIRETIME`, the lease's revision.
const ACQUIRE: &str = r"
local ttl = tonumber(ARGV[2])
local cur = get(KEYS[1])
if cur then
  return {0, cur, redis.call('PTTL', KEYS[1]), int(now), expires(KEYS[1])}
end
local epoch = tonumber(get(KEYS[3]))
if not epoch then
  redis.call('SET', KEYS[3], int(now))
  epoch = now
end
local quiet = epoch + ttl * 1000 - now
if quiet > 0 then
  return {2, int(math.ceil(quiet / 1000)), int(now)}
end
local last = tonumber(get(KEYS[2])) or 0
if last >= 9007199254740992 then
  return redis.error_reply('LHTOKEN ' .. KEYS[2] .. ' holds ' .. int(last) .. ', beyond the tokens this backend can count (2^53)')
end
local token = math.max(last + 1, now)
redis.call('SET', KEYS[2], int(token))
local b = {}
local n = token
for i = 8, 1, -1 do
  b[i] = string.char(n % 256)
  n = math.floor(n / 256)
end
local v = string.sub(ARGV[1], 1, 35) .. table.concat(b) .. string.sub(ARGV[1], 44)
redis.call('SET', KEYS[1], v, 'PX', ARGV[2])
local e = expires(KEYS[1])
redis.call('PUBLISH', ARGV[3], 'U ' .. ARGV[2] .. ' ' .. e .. ' ' .. ARGV[4] .. '\n' .. v)
return {1, int(token), int(now), e}
";

/// KEYS: lease. ARGV: nonce, ttl ms, the deadline on the server's clock in
/// µs ('' if unknown), channel, key. Returns {1, now, expiry} (renewed:
/// the new `PEXPIRETIME`), {0, now} (lost) or {-1, now} (too late: nothing
/// changed).
const RENEW: &str = r"
local cur = get(KEYS[1])
if not cur or string.sub(cur, 4, 19) ~= ARGV[1] then
  return {0, int(now)}
end
local deadline = tonumber(ARGV[3])
if deadline and now >= deadline then
  return {-1, int(now)}
end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
local e = expires(KEYS[1])
redis.call('PUBLISH', ARGV[4], 'U ' .. ARGV[2] .. ' ' .. e .. ' ' .. ARGV[5] .. '\n' .. cur)
return {1, int(now), e}
";

/// KEYS: lease. ARGV: as for `RENEW`, then the tail of the new value (the
/// metadata's length and the metadata, from byte 52 on). The stored head
/// (nonce, holder id, token, acquired at) is kept as it is. Returns as
/// `RENEW` does.
const PROCLAIM: &str = r"
local cur = get(KEYS[1])
if not cur or string.sub(cur, 4, 19) ~= ARGV[1] then
  return {0, int(now)}
end
local deadline = tonumber(ARGV[3])
if deadline and now >= deadline then
  return {-1, int(now)}
end
local v = string.sub(cur, 1, 51) .. ARGV[6]
redis.call('SET', KEYS[1], v, 'PX', ARGV[2])
local e = expires(KEYS[1])
redis.call('PUBLISH', ARGV[4], 'U ' .. ARGV[2] .. ' ' .. e .. ' ' .. ARGV[5] .. '\n' .. v)
return {1, int(now), e}
";

/// The bytes of an encoded value before the metadata's length: magic,
/// version, nonce, holder id, token, acquired at. `PROCLAIM` keeps them.
const VALUE_HEAD: usize = 2 + 1 + 16 + 16 + 8 + 8;

/// KEYS: lease. ARGV: nonce, channel, key. Returns 1 if it deleted.
const RELEASE: &str = r"
local cur = get(KEYS[1])
if cur and string.sub(cur, 4, 19) == ARGV[1] then
  redis.call('DEL', KEYS[1])
  redis.call('PUBLISH', ARGV[2], 'R ' .. ARGV[3])
  return 1
end
return 0
";

/// KEYS: lease. Returns {0, now} (free) or {1, now, value, pttl, expiry}.
const HOLDER: &str = r"
local cur = get(KEYS[1])
if not cur then
  return {0, int(now)}
end
return {1, int(now), cur, redis.call('PTTL', KEYS[1]), expires(KEYS[1])}
";

/// KEYS: epoch. Returns 1 if it wrote the marker.
const MARK: &str = r"
if get(KEYS[1]) then
  return 0
end
redis.call('SET', KEYS[1], int(now))
return 1
";

/// KEYS: registry hash, expiry set. ARGV: id, value, ttl ms, channel,
/// key. Returns 1 if the registry changed (an entry added, rewritten with
/// other contents, or an expired one removed), else 0.
const REGISTER: &str = r"
local changed = 0
local gone = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', int(now))
if #gone > 0 then
  for i = 1, #gone do
    redis.call('HDEL', KEYS[1], gone[i])
  end
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', int(now))
  changed = 1
end
if redis.call('HGET', KEYS[1], ARGV[1]) ~= ARGV[2] then
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
  changed = 1
end
redis.call('ZADD', KEYS[2], int(now + tonumber(ARGV[3]) * 1000), ARGV[1])
local last = redis.call('ZRANGE', KEYS[2], -1, -1, 'WITHSCORES')
local until_ms = int(math.ceil(tonumber(last[2]) / 1000) + 1)
redis.call('PEXPIREAT', KEYS[1], until_ms)
redis.call('PEXPIREAT', KEYS[2], until_ms)
if changed == 1 then
  redis.call('PUBLISH', ARGV[4], 'C ' .. ARGV[5])
end
return changed
";

/// KEYS: registry hash, expiry set. ARGV: id, channel, key. Returns 1 if
/// a live entry was removed.
const DEREGISTER: &str = r"
local at = tonumber(redis.call('ZSCORE', KEYS[2], ARGV[1]))
local n = redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('ZREM', KEYS[2], ARGV[1])
if n > 0 and at and at > now then
  redis.call('PUBLISH', ARGV[2], 'C ' .. ARGV[3])
  return 1
end
return 0
";

/// KEYS: registry hash, expiry set. Returns the values of the live
/// entries.
const CANDIDATES: &str = r"
local ids = redis.call('ZRANGEBYSCORE', KEYS[2], '(' .. int(now), '+inf')
local out = {}
for i = 1, #ids do
  local v = redis.call('HGET', KEYS[1], ids[i])
  if v then
    out[#out + 1] = v
  end
end
return out
";

/// KEYS: registry hash, expiry set. ARGV: id. Returns the live entry's
/// value, or nil.
const CANDIDATE: &str = r"
local at = redis.call('ZSCORE', KEYS[2], ARGV[1])
if at and tonumber(at) > now then
  return redis.call('HGET', KEYS[1], ARGV[1])
end
return false
";

struct Scripts {
    register: Script,
    deregister: Script,
    candidates: Script,
    candidate: Script,
    acquire: Script,
    renew: Script,
    proclaim: Script,
    release: Script,
    holder: Script,
    mark: Script,
}

fn scripts() -> &'static Scripts {
    static SCRIPTS: OnceLock<Scripts> = OnceLock::new();
    SCRIPTS.get_or_init(|| {
        let s = |body: &str| Script::new(&format!("{LUA_COMMON}{body}"));
        Scripts {
            register: s(REGISTER),
            deregister: s(DEREGISTER),
            candidates: s(CANDIDATES),
            candidate: s(CANDIDATE),
            acquire: s(ACQUIRE),
            renew: s(RENEW),
            proclaim: s(PROCLAIM),
            release: s(RELEASE),
            holder: s(HOLDER),
            mark: s(MARK),
        }
    })
}

/// Redis as a lease store. Build one with [`RedisBackend::builder`], then
/// wrap it with [`Backend::redis`](crate::Backend::redis). Cheap to clone;
/// build one per process and share it (one connection, one subscription).
///
/// ```no_run
/// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
/// use leaseholder::{Backend, Leader, RedisBackend};
///
/// let redis = RedisBackend::builder()
///     .url("redis://cache.internal:6379/0")
///     .prefix("billing")
///     .build()?;
/// let leader = Leader::builder("nightly-report")
///     .backend(Backend::redis(redis))
///     .build()?;
/// leader.setup().await?;
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct RedisBackend {
    inner: Arc<Inner>,
}

struct Inner {
    target: Target,
    prefix: String,
    channel: String,
    connect_timeout: Duration,
    watch: bool,
    watch_ping: Duration,
    /// The shared connection and its generation.
    link: Mutex<Option<(u64, Conn)>>,
    /// Held while a new connection is made, so that keys waiting for one
    /// share it.
    connecting: tokio::sync::Mutex<()>,
    generation: AtomicU64,
    /// Per key: the offset of the clock of the node that holds it.
    clocks: Mutex<HashMap<Key, ServerClock>>,
    /// Which Cluster seed the next subscription tries.
    next_seed: AtomicU64,
}

enum Target {
    Single(Client),
    Sentinel {
        client: tokio::sync::Mutex<SentinelClient>,
        master: String,
    },
    Cluster {
        client: ClusterClient,
        seeds: Vec<Client>,
    },
}

impl Target {
    fn kind(&self) -> &'static str {
        match self {
            Target::Single(_) => "standalone",
            Target::Sentinel { .. } => "sentinel",
            Target::Cluster { .. } => "cluster",
        }
    }
}

#[derive(Clone)]
enum Conn {
    Single(MultiplexedConnection),
    Cluster(ClusterConnection),
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Single(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Single(c) => c.req_packed_commands(cmd, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(cmd, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
        }
    }
}

impl fmt::Debug for RedisBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisBackend")
            .field("mode", &self.inner.target.kind())
            .field(
                "master",
                &match &self.inner.target {
                    Target::Sentinel { master, .. } => Some(master),
                    _ => None,
                },
            )
            .field("prefix", &self.inner.prefix)
            .field("watch", &self.inner.watch)
            .finish_non_exhaustive()
    }
}

/// Where a [`RedisBuilder`] connects.
enum Spec {
    Url(String),
    Client(Client),
    Cluster(Vec<String>),
}

/// Builds a [`RedisBackend`]; every setting is checked by
/// [`build`](Self::build), which connects to nothing (the first call
/// does).
#[must_use]
pub struct RedisBuilder {
    spec: Option<Spec>,
    prefix: String,
    connect_timeout: Duration,
    watch: bool,
    watch_ping: Duration,
}

impl fmt::Debug for RedisBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisBuilder")
            .field("prefix", &self.prefix)
            .field("connect_timeout", &self.connect_timeout)
            .field("watch", &self.watch)
            .field("watch_ping", &self.watch_ping)
            .finish_non_exhaustive()
    }
}

impl RedisBackend {
    /// A builder with the defaults: prefix [`DEFAULT_PREFIX`], connect
    /// timeout 1 s, watch on, pinged every second. Give it a
    /// [`url`](RedisBuilder::url), a [`client`](RedisBuilder::client) or
    /// [`cluster`](RedisBuilder::cluster) seeds.
    pub fn builder() -> RedisBuilder {
        RedisBuilder {
            spec: None,
            prefix: DEFAULT_PREFIX.to_owned(),
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            watch: true,
            watch_ping: DEFAULT_WATCH_PING,
        }
    }

    /// The key prefix.
    pub fn prefix(&self) -> &str {
        &self.inner.prefix
    }

    /// The name of the key that holds `key`'s lease,
    /// `{<prefix>:<key>}:lease`.
    pub fn lease_key(&self, key: &Key) -> String {
        format!("{{{}:{}}}:lease", self.inner.prefix, key.as_str())
    }

    /// The name of the key that holds `key`'s last token,
    /// `{<prefix>:<key>}:token`.
    pub fn token_key(&self, key: &Key) -> String {
        format!("{{{}:{}}}:token", self.inner.prefix, key.as_str())
    }

    /// The name of the hash that holds `key`'s candidate registry,
    /// `{<prefix>:<key>}:candidates`: candidate id (32 hex digits) to its
    /// encoded entry.
    pub fn candidates_key(&self, key: &Key) -> String {
        format!("{{{}:{}}}:candidates", self.inner.prefix, key.as_str())
    }

    /// The name of the sorted set that holds the expiry of each entry of
    /// `key`'s candidate registry (the server's clock, µs),
    /// `{<prefix>:<key>}:candidates:expiry`.
    pub fn candidates_expiry_key(&self, key: &Key) -> String {
        format!(
            "{{{}:{}}}:candidates:expiry",
            self.inner.prefix,
            key.as_str()
        )
    }

    /// The name of the epoch marker that guards `key` (see the module
    /// docs): `<prefix>:epoch`, or in a Cluster the marker of the key's
    /// hash slot.
    pub fn epoch_key(&self, key: &Key) -> String {
        match self.inner.target {
            Target::Cluster { .. } => {
                self.slot_epoch_key(hash_slot(self.lease_key(key).as_bytes()))
            }
            _ => format!("{}:epoch", self.inner.prefix),
        }
    }

    /// The pub/sub channel, `<prefix>:events`.
    pub fn channel(&self) -> &str {
        &self.inner.channel
    }

    fn slot_epoch_key(&self, slot: u16) -> String {
        format!("{}:epoch:{{{}}}", self.inner.prefix, slot_tag(slot))
    }

    /// The shared connection, made if there is none.
    async fn conn(&self) -> Result<(u64, Conn), BackendError> {
        if let Some(current) = self.current() {
            return Ok(current);
        }
        let _connecting = self.inner.connecting.lock().await;
        if let Some(current) = self.current() {
            return Ok(current);
        }
        let conn = self.connect().await.map_err(|e| classify(&e))?;
        let generation = self.inner.generation.fetch_add(1, Ordering::Relaxed);
        *lock(&self.inner.link) = Some((generation, conn.clone()));
        Ok((generation, conn))
    }

    fn current(&self) -> Option<(u64, Conn)> {
        lock(&self.inner.link).clone()
    }

    /// Drops the connection of `generation` (if it is still the current
    /// one): the next call makes a new one.
    fn discard(&self, generation: u64) {
        let mut link = lock(&self.inner.link);
        if link.as_ref().is_some_and(|(g, _)| *g == generation) {
            *link = None;
        }
    }

    fn conn_config(&self) -> AsyncConnectionConfig {
        // No response timeout of its own: every call is bounded by its
        // budget, and a call that overruns it replaces the connection.
        AsyncConnectionConfig::new()
            .set_connection_timeout(Some(self.inner.connect_timeout))
            .set_response_timeout(None)
    }

    async fn connect(&self) -> Result<Conn, RedisError> {
        match &self.inner.target {
            Target::Single(client) => Ok(Conn::Single(
                client
                    .get_multiplexed_async_connection_with_config(&self.conn_config())
                    .await?,
            )),
            Target::Sentinel { client, .. } => {
                let primary = client.lock().await.async_get_client().await?;
                Ok(Conn::Single(
                    primary
                        .get_multiplexed_async_connection_with_config(&self.conn_config())
                        .await?,
                ))
            }
            Target::Cluster { client, .. } => {
                Ok(Conn::Cluster(client.get_async_connection().await?))
            }
        }
    }

    /// Runs `script` within `budget`. Returns the reply and when it came.
    /// A renewal by `script` (the renew script, or the proclaim script
    /// with the value's `tail` to write): the nonce, the ttl, the leader's
    /// deadline on the server's clock; `-1` from the script means it came
    /// after that deadline and changed nothing.
    async fn extend(
        &self,
        key: &Key,
        lease: &Lease,
        script: &Script,
        tail: Option<&[u8]>,
        ttl: Duration,
        budget: Duration,
    ) -> Result<Renewed, BackendError> {
        let deadline = Instant::now() + budget;
        let nonce = lease.nonce().to_bytes();
        let ttl_ms = ttl_ms(ttl);
        let server_deadline = self
            .server_deadline_us(key, deadline)
            .map(|us| us.to_string())
            .unwrap_or_default();
        let ttl_text = ttl_ms.to_string();
        let mut args: Vec<&[u8]> = vec![
            &nonce,
            ttl_text.as_bytes(),
            server_deadline.as_bytes(),
            self.inner.channel.as_bytes(),
            key.as_str().as_bytes(),
        ];
        args.extend(tail);
        let (reply, received) = self
            .run(script, &[&self.lease_key(key)], &args, budget)
            .await?;
        let items = array(reply)?;
        let (status, now) = (
            items.first().and_then(int_of),
            items.get(1).and_then(int_of),
        );
        let (Some(status), Some(now)) = (status, now) else {
            return Err(unexpected(&Value::Array(items)));
        };
        self.sample(key, now, received);
        match status {
            1 => match items.get(2).and_then(int_of) {
                Some(expiry) => Ok(Renewed::Renewed(lease.with_revision(revision(expiry)))),
                None => Err(unexpected(&Value::Array(items))),
            },
            // Reached the server after the leader's deadline: it changed
            // nothing, like a reply that never came.
            -1 => Err(BackendError::Timeout(budget)),
            _ => {
                self.forget_clock(key);
                Ok(Renewed::Lost)
            }
        }
    }

    async fn run(
        &self,
        script: &Script,
        keys: &[&str],
        args: &[&[u8]],
        budget: Duration,
    ) -> Result<(Value, Instant), BackendError> {
        let until = Instant::now() + budget;
        let (generation, mut conn) = tokio::time::timeout_at(until, self.conn())
            .await
            .map_err(|_| BackendError::Timeout(budget))??;
        let mut call = script.prepare_invoke();
        for key in keys {
            call.key(*key);
        }
        for arg in args {
            call.arg(*arg);
        }
        match tokio::time::timeout_at(until, call.invoke_async::<Value>(&mut conn)).await {
            Ok(Ok(value)) => Ok((value, Instant::now())),
            Ok(Err(e)) => {
                if replaces_connection(&e) {
                    self.discard(generation);
                }
                Err(classify(&e))
            }
            Err(_) => {
                // No reply within the budget: the link may have gone
                // silent (a blackhole sends no reset), so make a new one.
                self.discard(generation);
                Err(BackendError::Timeout(budget))
            }
        }
    }

    /// Runs a plain command within `budget`.
    async fn command(&self, cmd: &Cmd, budget: Duration) -> Result<Value, BackendError> {
        let until = Instant::now() + budget;
        let (generation, mut conn) = tokio::time::timeout_at(until, self.conn())
            .await
            .map_err(|_| BackendError::Timeout(budget))??;
        match tokio::time::timeout_at(until, cmd.query_async::<Value>(&mut conn)).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(e)) => {
                if replaces_connection(&e) {
                    self.discard(generation);
                }
                Err(classify(&e))
            }
            Err(_) => {
                self.discard(generation);
                Err(BackendError::Timeout(budget))
            }
        }
    }

    fn sample(&self, key: &Key, server_us: i64, received: Instant) {
        lock(&self.inner.clocks)
            .entry(key.clone())
            .or_default()
            .sample(server_us, received);
    }

    fn server_deadline_us(&self, key: &Key, deadline: Instant) -> Option<i64> {
        lock(&self.inner.clocks)
            .get(key)
            .and_then(|clock| clock.server_deadline_us(deadline))
    }

    fn forget_clock(&self, key: &Key) {
        lock(&self.inner.clocks).remove(key);
    }

    /// The server's version, as `INFO server` reports it.
    async fn check_version(&self, budget: Duration) -> Result<(), BackendError> {
        let reply = match self.command(redis::cmd("INFO").arg("server"), budget).await {
            Ok(reply) => reply,
            // A role that may not run INFO: nothing to check.
            Err(BackendError::Denied(e)) => {
                tracing::debug!(error = %e, "INFO refused; the server's version is not checked");
                return Ok(());
            }
            Err(e) => return Err(e),
        };
        // A Cluster answers for every node.
        for info in per_node(&reply) {
            let info = text(info);
            let version = info
                .lines()
                .find_map(|line| line.strip_prefix("redis_version:"))
                .map(str::trim)
                .unwrap_or("unknown");
            match parse_version(version) {
                Some(v) if v >= MIN_VERSION => {}
                _ => {
                    return Err(BackendError::Unsupported {
                        what: format!("Redis {version}"),
                        needed: "Redis 7.0 or newer".to_owned(),
                    });
                }
            }
        }
        Ok(())
    }

    /// Refuses a server that may evict keys (a live lease among them).
    async fn check_eviction(&self, budget: Duration) -> Result<(), BackendError> {
        let reply = self
            .command(
                redis::cmd("CONFIG")
                    .arg("GET")
                    .arg("maxmemory")
                    .arg("maxmemory-policy"),
                budget,
            )
            .await;
        let reply = match reply {
            Ok(reply) => reply,
            Err(e) if !e.is_transient() => {
                // Managed services often forbid CONFIG.
                tracing::debug!(error = %e, "CONFIG GET refused; eviction settings not checked");
                return Ok(());
            }
            Err(e) => return Err(e),
        };
        for node in per_node(&reply) {
            let settings = config_pairs(node);
            let maxmemory = settings.get("maxmemory").map_or("0", String::as_str);
            let policy = settings
                .get("maxmemory-policy")
                .map_or("noeviction", String::as_str);
            if maxmemory != "0" && policy != "noeviction" {
                return Err(BackendError::Misconfigured {
                    problem: format!(
                        "maxmemory is {maxmemory} with maxmemory-policy {policy}: Redis may evict a live lease"
                    ),
                    fix: "set maxmemory-policy noeviction (or maxmemory 0)".to_owned(),
                });
            }
        }
        Ok(())
    }

    /// Writes the epoch markers that are missing; `true` if it wrote any.
    ///
    /// In a Cluster, each range of slots a node serves is checked by the
    /// marker of its first slot: a node loses its data all at once, so if
    /// that one is there the range's are too, and only a range whose first
    /// marker was missing (a fresh cluster, a node that lost its data) has
    /// all of its markers written. A marker missing anyway (a slot migrated
    /// from such a node) is written by the first acquire under it, which
    /// then waits a ttl: the script, not this, keeps the rule.
    async fn mark(&self, budget: Duration) -> Result<bool, BackendError> {
        let script = &scripts().mark;
        let until = Instant::now() + budget;
        let left = move || until.saturating_duration_since(Instant::now());
        let Target::Cluster { .. } = self.inner.target else {
            let key = format!("{}:epoch", self.inner.prefix);
            let (reply, _) = self.run(script, &[&key], &[], budget).await?;
            return Ok(int_of(&reply) == Some(1));
        };
        let ranges = slot_ranges(
            &self
                .command(redis::cmd("CLUSTER").arg("SLOTS"), left())
                .await?,
        );
        if ranges.is_empty() {
            return Err(BackendError::unavailable(
                "CLUSTER SLOTS lists no slots: the cluster is not ready",
            ));
        }
        let mut created = false;
        for (first, last) in ranges {
            let key = self.slot_epoch_key(first);
            let (reply, _) = self.run(script, &[&key], &[], left()).await?;
            if int_of(&reply) != Some(1) {
                continue;
            }
            created = true;
            let mut replies = futures_util::stream::iter(first.saturating_add(1)..=last)
                .map(|slot| {
                    let key = self.slot_epoch_key(slot);
                    async move { self.run(script, &[&key], &[], left()).await }
                })
                .buffer_unordered(SETUP_CONCURRENCY);
            while let Some(reply) = replies.next().await {
                reply?;
            }
        }
        Ok(created)
    }

    async fn pubsub(&self) -> Result<redis::aio::PubSub, RedisError> {
        match &self.inner.target {
            Target::Single(client) => client.get_async_pubsub().await,
            Target::Sentinel { client, .. } => {
                let primary = client.lock().await.async_get_client().await?;
                primary.get_async_pubsub().await
            }
            Target::Cluster { seeds, .. } => {
                // PUBLISH reaches every node of a Cluster: any will do.
                // Each attempt tries the next seed, so a dead node is
                // passed over.
                let n = self.inner.next_seed.fetch_add(1, Ordering::Relaxed);
                let len = u64::try_from(seeds.len()).unwrap_or(1).max(1);
                let i = usize::try_from(n % len).unwrap_or(0);
                match seeds.get(i) {
                    Some(seed) => seed.get_async_pubsub().await,
                    None => Err(RedisError::from((
                        ErrorKind::InvalidClientConfig,
                        "no cluster seed to subscribe on",
                    ))),
                }
            }
        }
    }
}

impl RedisBuilder {
    /// Where the server is:
    ///
    /// - `redis://[user:password@]host[:port][/db]` (or `redis+unix:///path`):
    ///   one server;
    /// - `redis+sentinel://[user:password@]host[:port][,host[:port]…]/<master name>[/db]`:
    ///   a Sentinel group (port 26379 by default); the credentials and
    ///   database are the primary's, the sentinels take none.
    ///
    /// For a Cluster, give its seeds to [`cluster`](Self::cluster).
    pub fn url(mut self, url: impl Into<String>) -> Self {
        self.spec = Some(Spec::Url(url.into()));
        self
    }

    /// An existing client for one server.
    pub fn client(mut self, client: Client) -> Self {
        self.spec = Some(Spec::Client(client));
        self
    }

    /// A Cluster, by the URLs (`redis://host:port`) of some of its nodes.
    pub fn cluster<I, S>(mut self, seeds: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.spec = Some(Spec::Cluster(seeds.into_iter().map(Into::into).collect()));
        self
    }

    /// The prefix of every key and of the channel (default
    /// [`DEFAULT_PREFIX`]). Not empty, at most [`MAX_PREFIX_LEN`] bytes, no
    /// `{`, `}` or control characters. Fleets sharing one server keep
    /// apart by their prefix.
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// How long making a connection may take (default 1 s).
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Subscribe to the channel for prompt handoffs (default `true`).
    /// Without it, followers poll at the holder's expiry and their retry
    /// interval.
    pub fn watch(mut self, watch: bool) -> Self {
        self.watch = watch;
        self
    }

    /// How often the subscription connection is pinged (default 1 s): a
    /// link that went silent is replaced after one missed reply.
    pub fn watch_ping(mut self, every: Duration) -> Self {
        self.watch_ping = every;
        self
    }

    /// Checks the settings and builds the backend. It connects to nothing
    /// yet.
    pub fn build(self) -> Result<RedisBackend, ConfigError> {
        check_prefix(&self.prefix)?;
        for (name, value) in [
            ("connect_timeout", self.connect_timeout),
            ("watch_ping", self.watch_ping),
        ] {
            if value < Duration::from_millis(1) || value > crate::MAX_INTERVAL {
                return Err(config(format!(
                    "{name} is {value:?}; it must be between 1 ms and {:?}",
                    crate::MAX_INTERVAL
                )));
            }
        }
        let target = match self.spec {
            None => {
                return Err(config(
                    "no server: call .url(..), .client(..) or .cluster(..) on the builder"
                        .to_owned(),
                ));
            }
            Some(Spec::Client(client)) => Target::Single(client),
            Some(Spec::Url(url)) if url.starts_with("redis+sentinel://") => sentinel(&url)?,
            Some(Spec::Url(url)) => Target::Single(
                Client::open(url.as_str())
                    .map_err(|e| config(format!("bad url {}: {e}", redact(&url))))?,
            ),
            Some(Spec::Cluster(seeds)) => {
                if seeds.is_empty() {
                    return Err(config("cluster(..) needs at least one seed".to_owned()));
                }
                let clients = seeds
                    .iter()
                    .map(|seed| {
                        Client::open(seed.as_str())
                            .map_err(|e| config(format!("bad cluster seed {}: {e}", redact(seed))))
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                let client = ClusterClient::builder(seeds.iter().map(String::as_str))
                    .connection_timeout(self.connect_timeout)
                    .build()
                    .map_err(|e| config(format!("bad cluster seeds: {e}")))?;
                Target::Cluster {
                    client,
                    seeds: clients,
                }
            }
        };
        Ok(RedisBackend {
            inner: Arc::new(Inner {
                target,
                channel: format!("{}:events", self.prefix),
                prefix: self.prefix,
                connect_timeout: self.connect_timeout,
                watch: self.watch,
                watch_ping: self.watch_ping,
                link: Mutex::new(None),
                connecting: tokio::sync::Mutex::new(()),
                generation: AtomicU64::new(0),
                clocks: Mutex::new(HashMap::new()),
                next_seed: AtomicU64::new(0),
            }),
        })
    }
}

fn config(problem: String) -> ConfigError {
    ConfigError::Backend {
        backend: NAME,
        problem,
    }
}

fn check_prefix(prefix: &str) -> Result<(), ConfigError> {
    if prefix.is_empty() {
        return Err(config("the prefix is empty".to_owned()));
    }
    if prefix.len() > MAX_PREFIX_LEN {
        return Err(config(format!(
            "the prefix is {} bytes long; the limit is {MAX_PREFIX_LEN}",
            prefix.len()
        )));
    }
    if let Some(ch) = prefix
        .chars()
        .find(|c| *c == '{' || *c == '}' || c.is_control())
    {
        return Err(config(format!(
            "the prefix {prefix:?} contains {ch:?}; braces (hash tags) and control characters are not allowed"
        )));
    }
    Ok(())
}

/// The URL with its password hidden, for error messages.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            format!("{}://***@{}", &url[..scheme], &url[at + 1..])
        }
        _ => url.to_owned(),
    }
}

/// Parses `redis+sentinel://[user:password@]host[:port][,host[:port]…]/<master>[/db]`.
fn sentinel(url: &str) -> Result<Target, ConfigError> {
    let shown = redact(url);
    let bad = |why: &str| config(format!("bad sentinel url {shown}: {why}"));
    let rest = url
        .strip_prefix("redis+sentinel://")
        .ok_or_else(|| bad("it must start with redis+sentinel://"))?;
    if rest.contains('?') || rest.contains('#') {
        return Err(bad("query parameters are not supported"));
    }
    let (auth, rest) = match rest.rsplit_once('@') {
        Some((auth, rest)) => (Some(auth), rest),
        None => (None, rest),
    };
    let (hosts, path) = rest
        .split_once('/')
        .ok_or_else(|| bad("the master's name must follow the sentinels, as /<name>"))?;
    let mut parts = path.split('/');
    let master = parts
        .next()
        .filter(|m| !m.is_empty())
        .ok_or_else(|| bad("the master's name is empty"))?;
    let db = match parts.next() {
        None | Some("") => 0,
        Some(db) => db
            .parse::<i64>()
            .map_err(|_| bad("the database must be a number"))?,
    };
    if parts.next().is_some_and(|p| !p.is_empty()) {
        return Err(bad("too many path segments"));
    }
    let sentinels = hosts
        .split(',')
        .map(|host| {
            if host.is_empty() {
                return Err(bad("an empty sentinel address"));
            }
            let has_port = match host.rfind(']') {
                Some(close) => host[close..].contains(':'),
                None => host.contains(':'),
            };
            let address = if has_port {
                format!("redis://{host}")
            } else {
                format!("redis://{host}:{DEFAULT_SENTINEL_PORT}")
            };
            address
                .as_str()
                .into_connection_info()
                .map_err(|e| bad(&format!("sentinel address {host}: {e}")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let node = match auth {
        Some(auth) => format!("redis://{auth}@localhost/{db}"),
        None => format!("redis://localhost/{db}"),
    };
    let node = node
        .as_str()
        .into_connection_info()
        .map_err(|e| bad(&format!("credentials or database: {e}")))?;
    let node = SentinelNodeConnectionInfo::default()
        .set_redis_connection_info(node.redis_settings().clone());
    let client = SentinelClient::build(
        sentinels,
        master.to_owned(),
        Some(node),
        SentinelServerType::Master,
    )
    .map_err(|e| bad(&e.to_string()))?;
    Ok(Target::Sentinel {
        client: tokio::sync::Mutex::new(client),
        master: master.to_owned(),
    })
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Every critical section is one read or write of the value.
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Whether an error means the connection is no good any more.
fn replaces_connection(e: &RedisError) -> bool {
    e.is_io_error()
        || e.is_connection_dropped()
        || e.is_connection_refusal()
        || e.is_timeout()
        || e.is_unrecoverable_error()
        || matches!(
            e.kind(),
            ErrorKind::Server(ServerErrorKind::ReadOnly | ServerErrorKind::MasterDown)
        )
}

/// What the campaign should make of a Redis error.
fn classify(e: &RedisError) -> BackendError {
    let unavailable = || BackendError::unavailable(e.clone());
    if e.is_io_error() || e.is_connection_dropped() || e.is_connection_refusal() || e.is_timeout() {
        return unavailable();
    }
    match e.kind() {
        ErrorKind::AuthenticationFailed => BackendError::denied(e.clone()),
        ErrorKind::Io
        | ErrorKind::ClusterConnectionNotFound
        | ErrorKind::MasterNameNotFoundBySentinel
        | ErrorKind::NoValidReplicasFoundBySentinel
        | ErrorKind::EmptySentinelList => unavailable(),
        ErrorKind::Server(kind) => match kind {
            ServerErrorKind::BusyLoading
            | ServerErrorKind::TryAgain
            | ServerErrorKind::ClusterDown
            | ServerErrorKind::MasterDown
            | ServerErrorKind::ReadOnly
            | ServerErrorKind::Moved
            | ServerErrorKind::Ask => unavailable(),
            ServerErrorKind::NoPerm => BackendError::denied(e.clone()),
            _ => by_code(e),
        },
        _ => by_code(e),
    }
}

/// Errors the client does not name, by their code.
fn by_code(e: &RedisError) -> BackendError {
    match e.code() {
        // Out of memory, a busy script, too few replicas, a failing
        // snapshot that stops writes: the server may recover.
        Some("OOM" | "BUSY" | "NOREPLICAS" | "MISCONF" | "LOADING" | "UNBLOCKED") => {
            BackendError::unavailable(e.clone())
        }
        Some("NOAUTH" | "WRONGPASS" | "NOPERM") => BackendError::denied(e.clone()),
        Some("LHTOKEN") => BackendError::Misconfigured {
            problem: e.detail().unwrap_or("a token key holds a value beyond 2^53").to_owned(),
            fix: "delete the token key only if no leader of the key is running; tokens then continue from the server's clock".to_owned(),
        },
        _ => BackendError::fatal(e.clone()),
    }
}

fn int_of(value: &Value) -> Option<i64> {
    match value {
        Value::Int(n) => Some(*n),
        Value::BulkString(bytes) => std::str::from_utf8(bytes).ok()?.parse().ok(),
        Value::SimpleString(s) => s.parse().ok(),
        _ => None,
    }
}

fn bytes_of(value: &Value) -> Option<&[u8]> {
    match value {
        Value::BulkString(bytes) => Some(bytes),
        Value::SimpleString(s) => Some(s.as_bytes()),
        _ => None,
    }
}

fn text(value: &Value) -> String {
    match value {
        Value::VerbatimString { text, .. } => text.clone(),
        other => bytes_of(other)
            .map(|b| String::from_utf8_lossy(b).into_owned())
            .unwrap_or_default(),
    }
}

/// The replies of each node: a Cluster answers a command sent to every
/// node with a map from node to reply.
fn per_node(value: &Value) -> Vec<&Value> {
    match value {
        Value::Map(pairs)
            if pairs.iter().all(|(_, v)| {
                matches!(
                    v,
                    Value::Array(_)
                        | Value::Map(_)
                        | Value::BulkString(_)
                        | Value::VerbatimString { .. }
                )
            }) && !pairs.is_empty()
                && pairs.iter().all(|(k, _)| text(k).contains(':')) =>
        {
            pairs.iter().map(|(_, v)| v).collect()
        }
        other => vec![other],
    }
}

/// `CONFIG GET`'s reply (a flat array in RESP2, a map in RESP3).
fn config_pairs(value: &Value) -> HashMap<String, String> {
    match value {
        Value::Array(items) => items
            .chunks(2)
            .filter_map(|pair| match pair {
                [k, v] => Some((text(k), text(v))),
                _ => None,
            })
            .collect(),
        Value::Map(pairs) => pairs.iter().map(|(k, v)| (text(k), text(v))).collect(),
        _ => HashMap::new(),
    }
}

fn parse_version(version: &str) -> Option<(u32, u32)> {
    let mut parts = version.split('.');
    Some((parts.next()?.parse().ok()?, parts.next()?.parse().ok()?))
}

/// The `(first, last)` slot ranges of a `CLUSTER SLOTS` reply.
fn slot_ranges(value: &Value) -> Vec<(u16, u16)> {
    let Value::Array(ranges) = value else {
        return Vec::new();
    };
    ranges
        .iter()
        .filter_map(|range| {
            let Value::Array(fields) = range else {
                return None;
            };
            let first = u16::try_from(int_of(fields.first()?)?).ok()?;
            let last = u16::try_from(int_of(fields.get(1)?)?).ok()?;
            (first <= last && last < SLOTS).then_some((first, last))
        })
        .collect()
}

/// A script's array reply.
fn array(value: Value) -> Result<Vec<Value>, BackendError> {
    match value {
        Value::Array(items) => Ok(items),
        other => Err(unexpected(&other)),
    }
}

/// `text` with Redis glob patterns' special characters escaped.
fn glob_escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for ch in text.chars() {
        if matches!(ch, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(ch);
    }
    out
}

fn unexpected(value: &Value) -> BackendError {
    BackendError::fatal(format!(
        "unexpected reply from a leaseholder script: {value:?}"
    ))
}

/// A `PTTL` reply as an expiry hint: `None` for a key without expiry.
fn expiry_hint(pttl: i64) -> Option<Duration> {
    u64::try_from(pttl).ok().map(Duration::from_millis)
}

/// The revision of a lease: its expiry as the server stores it
/// (`PEXPIRETIME`, Unix ms), in µs. Every read of an unchanged lease shows
/// the same one, and a renewal in a later millisecond moves it: the
/// campaign takes a changed revision on a read-back as proof that an
/// unanswered renewal landed. (A revision made of the read's own time, as
/// `TIME` + `PTTL`, differs between reads of an unchanged lease, and so
/// once credited a renewal that never happened.) A key without an expiry
/// (`-1`, a foreign value) or gone (`-2`) is revision 0.
fn revision(expiry_ms: i64) -> u64 {
    u64::try_from(expiry_ms.max(0).saturating_mul(1000)).unwrap_or(0)
}

/// A ttl in whole milliseconds, rounded up: the store never expires a
/// lease before the ttl asked for.
fn ttl_ms(ttl: Duration) -> u64 {
    let ms = ttl.as_nanos().div_ceil(1_000_000);
    u64::try_from(ms).unwrap_or(u64::MAX).max(1)
}

/// The hash slot of a key name, as Redis Cluster computes it (CRC16
/// XMODEM of the hash tag, or of the whole name).
fn hash_slot(name: &[u8]) -> u16 {
    let tagged = name.iter().position(|b| *b == b'{').and_then(|open| {
        let rest = &name[open + 1..];
        let close = rest.iter().position(|b| *b == b'}')?;
        (close > 0).then(|| &rest[..close])
    });
    crc16(tagged.unwrap_or(name)) % SLOTS
}

fn crc16(data: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for byte in data {
        crc ^= u16::from(*byte) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc
}

/// A short hash tag for each slot: the smallest number whose decimal
/// string hashes to it.
fn slot_tag(slot: u16) -> &'static str {
    static TAGS: OnceLock<Vec<String>> = OnceLock::new();
    let tags = TAGS.get_or_init(|| {
        let mut tags = vec![String::new(); usize::from(SLOTS)];
        let mut missing = usize::from(SLOTS);
        let mut n: u64 = 0;
        while missing > 0 {
            let tag = n.to_string();
            let slot = usize::from(crc16(tag.as_bytes()) % SLOTS);
            if tags[slot].is_empty() {
                tags[slot] = tag;
                missing -= 1;
            }
            n += 1;
        }
        tags
    });
    tags.get(usize::from(slot)).map_or("0", String::as_str)
}

/// A published event: `U <ttl ms> <expiry, Unix ms> <key>\n<value>`, `R <key>`
/// or `C <key>` (the key's registry changed). Anything else is ignored.
fn event_from(payload: &[u8]) -> Option<WatchEvent> {
    if let Some(key) = payload.strip_prefix(b"R ") {
        let key = Key::new(std::str::from_utf8(key).ok()?).ok()?;
        return Some(WatchEvent::Released(key));
    }
    if let Some(key) = payload.strip_prefix(b"C ") {
        let key = Key::new(std::str::from_utf8(key).ok()?).ok()?;
        return Some(WatchEvent::Candidates(key));
    }
    let rest = payload.strip_prefix(b"U ")?;
    let newline = rest.iter().position(|b| *b == b'\n')?;
    let (head, value) = (&rest[..newline], &rest[newline + 1..]);
    let head = std::str::from_utf8(head).ok()?;
    let mut fields = head.splitn(3, ' ');
    let ttl: u64 = fields.next()?.parse().ok()?;
    let rev = revision(fields.next()?.parse().ok()?);
    let key = Key::new(fields.next()?).ok()?;
    let holder = Holder::decode(value, None, rev, Some(Duration::from_millis(ttl)));
    Some(WatchEvent::Updated(key, Some(holder)))
}

/// Aborts a task when dropped (the subscription's pump).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl BackendEdge for RedisBackend {
    fn name(&self) -> &'static str {
        NAME
    }

    async fn setup(&self, budget: Duration) -> Result<Prepared, BackendError> {
        let until = Instant::now() + budget;
        let left = || until.saturating_duration_since(Instant::now());
        self.check_version(left()).await?;
        self.check_eviction(left()).await?;
        if self.mark(left()).await? {
            Ok(Prepared::Created)
        } else {
            Ok(Prepared::Existing)
        }
    }

    async fn acquire(
        &self,
        key: &Key,
        claim: &Claim,
        ttl: Duration,
        budget: Duration,
    ) -> Result<Acquired, BackendError> {
        // The script writes the token into the value (bytes 36..43).
        let value = claim.value(FencingToken::new(0)).encode();
        let ttl_ms = ttl_ms(ttl).to_string();
        let (lease_key, token_key, epoch_key) = (
            self.lease_key(key),
            self.token_key(key),
            self.epoch_key(key),
        );
        let (reply, received) = self
            .run(
                &scripts().acquire,
                &[&lease_key, &token_key, &epoch_key],
                &[
                    &value,
                    ttl_ms.as_bytes(),
                    self.inner.channel.as_bytes(),
                    key.as_str().as_bytes(),
                ],
                budget,
            )
            .await?;
        let items = array(reply)?;
        match items.first().and_then(int_of) {
            Some(1) => {
                let token = items.get(1).and_then(int_of);
                let now = items.get(2).and_then(int_of);
                let expiry = items.get(3).and_then(int_of);
                let (Some(token), Some(now), Some(expiry)) = (token, now, expiry) else {
                    return Err(unexpected(&Value::Array(items)));
                };
                self.sample(key, now, received);
                let token = u64::try_from(token).unwrap_or(0);
                if token == 0 || token >= LUA_EXACT {
                    return Err(unexpected(&Value::Array(items)));
                }
                let rev = revision(expiry);
                Ok(Acquired::Won(Lease::new(
                    claim,
                    FencingToken::new(token),
                    rev,
                )))
            }
            Some(0) => {
                let value = items.get(1).and_then(bytes_of).unwrap_or_default();
                let pttl = items.get(2).and_then(int_of).unwrap_or(-1);
                let expiry = items.get(4).and_then(int_of).unwrap_or(-1);
                Ok(Acquired::Held(Holder::decode(
                    value,
                    None,
                    revision(expiry),
                    expiry_hint(pttl),
                )))
            }
            Some(2) => {
                // The data under this key's epoch marker is younger than a
                // ttl: a lease lost with earlier data may still be led.
                let quiet = items.get(1).and_then(int_of).unwrap_or(0);
                tracing::info!(
                    %key,
                    quiet_ms = quiet,
                    "the store's data is younger than a ttl (new, flushed, or restarted without persistence); waiting before the first acquisition"
                );
                Ok(Acquired::Held(Holder::foreign(0, expiry_hint(quiet))))
            }
            _ => Err(unexpected(&Value::Array(items))),
        }
    }

    async fn renew(
        &self,
        key: &Key,
        lease: &Lease,
        ttl: Duration,
        budget: Duration,
    ) -> Result<Renewed, BackendError> {
        self.extend(key, lease, &scripts().renew, None, ttl, budget)
            .await
    }

    async fn release(
        &self,
        key: &Key,
        lease: &Lease,
        budget: Duration,
    ) -> Result<(), BackendError> {
        let nonce = lease.nonce().to_bytes();
        self.run(
            &scripts().release,
            &[&self.lease_key(key)],
            &[
                &nonce,
                self.inner.channel.as_bytes(),
                key.as_str().as_bytes(),
            ],
            budget,
        )
        .await?;
        self.forget_clock(key);
        Ok(())
    }

    async fn holder(&self, key: &Key, budget: Duration) -> Result<Option<Holder>, BackendError> {
        let (reply, received) = self
            .run(&scripts().holder, &[&self.lease_key(key)], &[], budget)
            .await?;
        let items = array(reply)?;
        match items.first().and_then(int_of) {
            Some(0) => Ok(None),
            Some(1) => {
                let now = items.get(1).and_then(int_of).unwrap_or(0);
                // A lease adopted by a read-back (its acquire's reply was
                // lost) renews with a deadline check from here on.
                self.sample(key, now, received);
                let value = items.get(2).and_then(bytes_of).unwrap_or_default();
                let pttl = items.get(3).and_then(int_of).unwrap_or(-1);
                let expiry = items.get(4).and_then(int_of).unwrap_or(-1);
                Ok(Some(Holder::decode(
                    value,
                    None,
                    revision(expiry),
                    expiry_hint(pttl),
                )))
            }
            _ => Err(unexpected(&Value::Array(items))),
        }
    }

    /// `SCAN` for `{<prefix>:*}:lease` (one server, or a Sentinel group's
    /// primary). A Cluster spreads keys over its primaries, and a `SCAN`
    /// reaches one node: listing is unsupported there.
    async fn keys(&self, budget: Duration) -> Result<Vec<Key>, BackendError> {
        if let Target::Cluster { .. } = self.inner.target {
            return Err(BackendError::Unsupported {
                what: "listing keys on a Redis Cluster (SCAN reaches one node)".to_owned(),
                needed: "one Redis server or a Sentinel group; on a Cluster, name the keys"
                    .to_owned(),
            });
        }
        let until = Instant::now() + budget;
        let head = format!("{{{}:", self.inner.prefix);
        let pattern = format!("{}*}}:lease", glob_escape(&head));
        let mut cursor = 0u64;
        let mut keys = Vec::new();
        loop {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(BackendError::Timeout(budget));
            }
            let mut cmd = redis::cmd("SCAN");
            cmd.arg(cursor)
                .arg("MATCH")
                .arg(&pattern)
                .arg("COUNT")
                .arg(1000);
            let items = array(self.command(&cmd, left).await?)?;
            let (Some(next), Some(Value::Array(names))) =
                (items.first().and_then(int_of), items.get(1))
            else {
                return Err(unexpected(&Value::Array(items)));
            };
            keys.extend(
                names
                    .iter()
                    .filter_map(bytes_of)
                    .filter_map(|name| std::str::from_utf8(name).ok())
                    .filter_map(|name| name.strip_prefix(head.as_str())?.strip_suffix("}:lease"))
                    .filter_map(|key| Key::new(key).ok()),
            );
            cursor = u64::try_from(next).unwrap_or(0);
            if cursor == 0 {
                return Ok(keys);
            }
        }
    }

    async fn watch(&self) -> Result<Option<WatchStream>, BackendError> {
        if !self.inner.watch {
            return Ok(None);
        }
        let timeout = self.inner.connect_timeout;
        let pubsub = tokio::time::timeout(timeout, self.pubsub())
            .await
            .map_err(|_| BackendError::Timeout(timeout))?
            .map_err(|e| classify(&e))?;
        let (mut sink, mut messages) = pubsub.split();
        tokio::time::timeout(timeout, sink.subscribe(&self.inner.channel))
            .await
            .map_err(|_| BackendError::Timeout(timeout))?
            .map_err(|e| classify(&e))?;
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let every = self.inner.watch_ping;
        let pump = tokio::spawn(async move {
            let mut ping = tokio::time::interval(every);
            ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    message = messages.next() => {
                        let Some(message) = message else {
                            tracing::debug!("redis subscription ended");
                            break;
                        };
                        if let Some(event) = event_from(message.get_payload_bytes())
                            && tx.send(event).is_err()
                        {
                            break;
                        }
                    }
                    _ = ping.tick() => {
                        let pong = tokio::time::timeout(every, sink.ping::<Value>()).await;
                        if !matches!(pong, Ok(Ok(_))) {
                            tracing::debug!("redis subscription did not answer its ping");
                            break;
                        }
                    }
                }
            }
        });
        let events =
            futures_util::stream::unfold((rx, AbortOnDrop(pump)), |(mut rx, pump)| async move {
                let event = rx.recv().await?;
                Some((event, (rx, pump)))
            });
        Ok(Some(Box::pin(events)))
    }

    fn supports_candidates(&self) -> bool {
        true
    }

    fn supports_proclaim(&self) -> bool {
        true
    }

    async fn proclaim(
        &self,
        key: &Key,
        lease: &Lease,
        metadata: &bytes::Bytes,
        ttl: Duration,
        budget: Duration,
    ) -> Result<Renewed, BackendError> {
        // A renewal (the same checks, the same expiry) that also writes
        // the new metadata behind the stored head.
        let lease = lease.with_metadata(metadata.clone());
        let value = lease.value().encode();
        let tail = value.get(VALUE_HEAD..).unwrap_or_default();
        self.extend(key, &lease, &scripts().proclaim, Some(tail), ttl, budget)
            .await
    }

    async fn register(
        &self,
        key: &Key,
        candidate: &Candidate,
        ttl: Duration,
        budget: Duration,
    ) -> Result<(), BackendError> {
        let (id, value, ttl) = (
            field(candidate.id()),
            candidate.encode(),
            ttl_ms(ttl).to_string(),
        );
        self.run(
            &scripts().register,
            &[&self.candidates_key(key), &self.candidates_expiry_key(key)],
            &[
                id.as_bytes(),
                &value,
                ttl.as_bytes(),
                self.inner.channel.as_bytes(),
                key.as_str().as_bytes(),
            ],
            budget,
        )
        .await?;
        Ok(())
    }

    async fn deregister(
        &self,
        key: &Key,
        id: LeaderId,
        budget: Duration,
    ) -> Result<(), BackendError> {
        let id = field(id);
        self.run(
            &scripts().deregister,
            &[&self.candidates_key(key), &self.candidates_expiry_key(key)],
            &[
                id.as_bytes(),
                self.inner.channel.as_bytes(),
                key.as_str().as_bytes(),
            ],
            budget,
        )
        .await?;
        Ok(())
    }

    async fn candidates(
        &self,
        key: &Key,
        budget: Duration,
    ) -> Result<Vec<Candidate>, BackendError> {
        let (reply, _) = self
            .run(
                &scripts().candidates,
                &[&self.candidates_key(key), &self.candidates_expiry_key(key)],
                &[],
                budget,
            )
            .await?;
        Ok(array(reply)?
            .iter()
            .filter_map(bytes_of)
            .filter_map(|value| Candidate::decode(value).ok())
            .collect())
    }

    async fn candidate(
        &self,
        key: &Key,
        id: LeaderId,
        budget: Duration,
    ) -> Result<Option<Candidate>, BackendError> {
        let field = field(id);
        let (reply, _) = self
            .run(
                &scripts().candidate,
                &[&self.candidates_key(key), &self.candidates_expiry_key(key)],
                &[field.as_bytes()],
                budget,
            )
            .await?;
        Ok(bytes_of(&reply)
            .and_then(|value| Candidate::decode(value).ok())
            .filter(|c| c.id() == id))
    }
}

/// A candidate's field in the registry hash: its id in 32 hex digits.
fn field(id: LeaderId) -> String {
    id.as_uuid().simple().to_string()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::backend::{LeaderId, LeaseValue, Nonce};
    use bytes::Bytes;
    use std::time::UNIX_EPOCH;

    #[test]
    fn slots_match_redis() {
        // Values from the Redis Cluster specification and `CLUSTER KEYSLOT`.
        assert_eq!(crc16(b"123456789"), 0x31c3);
        assert_eq!(hash_slot(b"foo"), 12182);
        assert_eq!(hash_slot(b"{user1000}.following"), hash_slot(b"user1000"));
        assert_eq!(hash_slot(b"foo{}{bar}"), crc16(b"foo{}{bar}") % SLOTS);
        for slot in [0, 1, 777, SLOTS - 1] {
            assert_eq!(
                hash_slot(format!("x{{{}}}", slot_tag(slot)).as_bytes()),
                slot
            );
        }
    }

    #[test]
    fn every_key_of_a_lease_shares_a_slot() {
        let backend = RedisBackend::builder()
            .cluster(["redis://127.0.0.1:1"])
            .prefix("app")
            .build()
            .unwrap();
        for key in ["a", "scheduler", "with } brace", "{tagged}", "}"] {
            let key = Key::new(key).unwrap();
            let slot = hash_slot(backend.lease_key(&key).as_bytes());
            assert_eq!(hash_slot(backend.token_key(&key).as_bytes()), slot, "{key}");
            assert_eq!(hash_slot(backend.epoch_key(&key).as_bytes()), slot, "{key}");
            for name in [
                backend.candidates_key(&key),
                backend.candidates_expiry_key(&key),
            ] {
                assert_eq!(hash_slot(name.as_bytes()), slot, "{key}");
            }
        }
    }

    #[test]
    fn bad_settings_are_refused_at_build() {
        let url = |u: &str| RedisBackend::builder().url(u).build();
        assert!(url("redis://127.0.0.1:6379/0").is_ok());
        assert!(url("redis+sentinel://127.0.0.1:26379,127.0.0.1:26380/mymaster/1").is_ok());
        assert!(url("redis+sentinel://u:p@[::1],h2:5/m").is_ok());
        for bad in [
            "http://x",
            "redis+sentinel://127.0.0.1:26379",
            "redis+sentinel://127.0.0.1:26379/",
            "redis+sentinel://h/m/notanumber",
            "redis+sentinel://h/m?x=1",
            "redis+sentinel://,h/m",
        ] {
            assert!(url(bad).is_err(), "{bad}");
        }
        assert!(RedisBackend::builder().build().is_err());
        assert!(
            RedisBackend::builder()
                .cluster(Vec::<String>::new())
                .build()
                .is_err()
        );
        for prefix in ["", "a{b", "a}b", "a\nb", &"p".repeat(MAX_PREFIX_LEN + 1)] {
            let r = RedisBackend::builder()
                .url("redis://127.0.0.1")
                .prefix(prefix)
                .build();
            assert!(r.is_err(), "{prefix:?}");
        }
        let r = RedisBackend::builder()
            .url("redis://127.0.0.1")
            .watch_ping(Duration::ZERO)
            .build();
        assert!(r.is_err());
        let e = url("redis+sentinel://user:secret@h/m/x")
            .unwrap_err()
            .to_string();
        assert!(!e.contains("secret"), "{e}");
    }

    #[test]
    fn events_round_trip_and_junk_is_ignored() {
        let value = LeaseValue {
            nonce: Nonce::random(),
            id: LeaderId::new(),
            token: Some(FencingToken::new(77)),
            acquired_at: UNIX_EPOCH + Duration::from_millis(1_700_000_000_000),
            metadata: Bytes::from_static(b"host a\nb"),
        };
        let mut payload = b"U 3000 1234 my key\n".to_vec();
        payload.extend_from_slice(&value.encode());
        match event_from(&payload) {
            Some(WatchEvent::Updated(key, Some(h))) => {
                assert_eq!(key.as_str(), "my key");
                assert_eq!(h.nonce(), Some(value.nonce));
                assert_eq!(h.token(), Some(FencingToken::new(77)));
                assert_eq!(h.revision(), 1_234_000, "the expiry in ms, as µs");
                assert_eq!(h.expires_in(), Some(Duration::from_millis(3000)));
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            event_from(b"R k"),
            Some(WatchEvent::Released(Key::new("k").unwrap()))
        );
        assert_eq!(
            event_from(b"C a key"),
            Some(WatchEvent::Candidates(Key::new("a key").unwrap()))
        );
        for junk in [
            &b""[..],
            b"R ",
            b"C ",
            b"U 1 2",
            b"U x 2 k\nv",
            b"X k",
            b"U 1 2 \n",
        ] {
            assert_eq!(event_from(junk), None, "{junk:?}");
        }
        // A value that is not ours is a foreign holder, not an error.
        match event_from(b"U 10 1 k\nnot ours") {
            Some(WatchEvent::Updated(_, Some(h))) => assert!(h.is_foreign()),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn ttl_rounds_up_to_whole_milliseconds() {
        assert_eq!(ttl_ms(Duration::from_micros(1500)), 2);
        assert_eq!(ttl_ms(Duration::from_millis(300)), 300);
        assert_eq!(ttl_ms(Duration::from_nanos(1)), 1);
        assert_eq!(ttl_ms(Duration::MAX), u64::MAX);
    }

    #[test]
    fn the_token_goes_where_the_value_keeps_it() {
        // The acquire script writes bytes 36..43 (1-based) of the value.
        let claim = Claim::new(LeaderId::new(), Bytes::from_static(b"m"));
        let mut bytes = claim.value(FencingToken::new(0)).encode().to_vec();
        bytes[35..43].copy_from_slice(&0x0102_0304_0506u64.to_be_bytes());
        let value = LeaseValue::decode(&bytes).unwrap();
        assert_eq!(value.token, Some(FencingToken::new(0x0102_0304_0506)));
        assert_eq!(value.nonce, claim.nonce);
        // And the renew and release scripts compare bytes 4..19: the nonce.
        assert_eq!(&bytes[3..19], &claim.nonce.to_bytes());
    }
}
