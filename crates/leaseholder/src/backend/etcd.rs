//! etcd (feature `etcd`), on etcd-client: a single member or a cluster,
//! etcd 3.4 or newer.
//!
//! # One lease for every key
//!
//! Like etcd's own concurrency `Session`, a backend keeps **one etcd lease**
//! (per distinct ttl, in whole seconds) and binds every key it holds to it.
//! A term is its key bound to that lease: renewing a thousand keys is one
//! keep-alive of the shared lease, not a thousand writes.
//!
//! - A renewal is answered by a keep-alive whose send time is at most
//!   [`ttl / 6`](SHARE_FRACTION) old, or by the next one: several keys'
//!   renewals share one request, and each key's deadline follows the send
//!   time of the keep-alive that carried it ([`Renewed::SentAt`]); the
//!   campaign then schedules the key's next renewal one interval after that
//!   send time, so the keys of a process fall into step and a process sends
//!   about one keep-alive per renew interval whatever its number of keys.
//! - An acquire first makes sure of a keep-alive (or a grant) *sent after
//!   the acquire began*, so that the key it binds lives at least a ttl from
//!   then, and then runs one transaction: if the key does not exist, put
//!   it with the lease. The key's create revision is the term's identity.
//! - A lease that is gone (expired while the link was down, or revoked by
//!   an operator) ends every term on it: etcd deletes all its keys at once,
//!   the watch reports each deletion, and every renewal on it is
//!   [`Renewed::Lost`]. The next acquire grants a new lease.
//! - A proclaim (new metadata within the term) is a write: a keep-alive
//!   (or grant) *sent after the proclaim began*, as for an acquire, then one
//!   transaction: if the key still has its create revision, its lease and
//!   the revision the term last knew, put the value with the new metadata on
//!   the same lease; else read it (still ours at a later revision: an
//!   earlier proclaim whose reply was lost landed; put again over that
//!   one). The put moves the key's revision, which holders report, and the
//!   proclaim returns it ([`Renewed::Renewed`]).
//! - Releasing one key deletes that key (compare on its create revision),
//!   never the lease.
//! - A key whose campaign stopped renewing it for a whole ttl (a term that
//!   ended while its release could not reach the server) would otherwise be
//!   kept alive by the other keys' keep-alives: each keep-alive round
//!   deletes such keys first.
//!
//! # Key layout
//!
//! | key | holds | lease |
//! |---|---|---|
//! | `<prefix>/lease/<key>` | our encoded value (nonce, holder id, metadata; the token is not stored) | the backend's shared lease |
//! | `<prefix>/epoch` | when this cluster's data began: the base of every token (µs since the Unix epoch, decimal) | none |
//! | `<prefix>/fresh` | present for one ttl after the epoch was written | its own |
//! | `<prefix>/cand/<key>/<id>` | a candidate registry entry: the encoded [`Candidate`]; `<id>` is the candidate's id in 32 hex digits, and `<key>` has `%` and `/` written as `%25` and `%2F`, so that no key's entries list under another's (`a` and `a/b`) | the backend's shared lease for the entry's ttl |
//!
//! # The candidate registry
//!
//! An entry is bound to the same shared lease as the keys, so it lives as
//! long as its process keeps that lease alive, and a crashed process's
//! entries go with its lease, by etcd's clock:
//!
//! | op | requests |
//! |---|---|
//! | register | a keep-alive (or grant) of the shared lease *sent after the call began*, shared with every key and entry of the process that needs one at the same time; then a put of the entry only if it is new to this backend, its value changed, or its lease did (a lease that was lost took its entries with it). A plain renewal is the keep-alive alone: no write. While the watch is down, or once after each reconnect, the entry is checked instead by a transaction that puts it unless its value and lease are as written |
//! | deregister | a delete of the entry |
//! | candidates | one range read of `<prefix>/cand/<key>/`; an entry that does not decode, or whose value names another id than its key, is left out |
//! | candidate | one read of `<prefix>/cand/<key>/<id>`, left out on the same terms |
//!
//! An entry whose candidate stopped registering it without deregistering
//! (a deregister that could not reach the server) would be kept alive by
//! the shared lease: the first keep-alive a ttl after its last register
//! deletes it. The watch maps every put and delete under `<prefix>/cand/`
//! (including deletes by a lease's expiry) to [`WatchEvent::Candidates`];
//! renewals put nothing, so they send nothing.
//!
//! # Tokens
//!
//! A term's fencing token is `base + create revision`, where `base` is the
//! epoch marker's value. Revisions strictly increase for the life of a
//! cluster, so tokens do; a cluster that lost its data (a new cluster on
//! empty data directories) starts with a new epoch whose base is the
//! creating host's clock in µs, larger than every token of the old cluster
//! unless the old one made more than a million writes a second over its
//! life, or the creating host's clock is behind.
//!
//! # Data loss: the epoch marker
//!
//! An acquire is refused (the key reads as held by someone unknown) while
//! the epoch marker is missing or the `fresh` marker exists. The first
//! acquire that finds no epoch writes both, `fresh` bound to a lease of its
//! own ttl, so that on a cluster re-created under a running fleet nobody
//! acquires until every leader of the old cluster has passed its deadline.
//! The first start on a new cluster therefore waits one ttl.
//!
//! # Watch
//!
//! One watch on `<prefix>/` per backend, resumed after a reconnect from the
//! revision after the last one it saw; a revision already compacted away
//! gives [`WatchEvent::Resync`] and a watch from the present. Expiry is
//! reported (etcd deletes the keys of an expired lease, and the watch sees
//! each deletion), so idle followers make no store calls: while the watch
//! is up, holders carry no expiry hint and followers set no timer; while it
//! is down, reads carry the lease's remaining ttl as the hint.
//!
//! The same watch tells the backend when one of its own keys was deleted
//! or overwritten by someone else (an operator's `etcdctl del`, a `put`
//! over it): the next renewal of that key reads it back and reports
//! [`Renewed::Lost`]. While the watch is down, and once after each
//! reconnect, every renewal reads its key to check it is still bound to
//! the lease.
//!
//! # Limits
//!
//! - etcd leases have whole-second ttls, and etcd raises a ttl below its
//!   minimum (one and a half election timeouts, rounded up) to it: the
//!   shortest ttl is one second ([`min_ttl`](BackendEdge::min_ttl)), and a
//!   lease may outlive its ttl by up to a second (a later failover, never an
//!   earlier expiry). A new etcd leader also extends every lease by its ttl.
//! - etcd checks for expired leases every 500 ms: a crashed leader's key is
//!   freed up to that much after its ttl.
//! - Requests go to any healthy member, with `require_leader` set, so a
//!   member cut off from its cluster refuses at once rather than hanging.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, KeyValue, PutOptions, Txn,
    TxnOp, TxnOpResponse, TxnResponse, WatchOptions,
};
use tokio::sync::watch;
use tokio::time::Instant;

use super::value::LeaseValue;
use super::{
    Acquired, BackendEdge, Candidate, Claim, FencingToken, Holder, Key, LeaderId, Lease, Nonce,
    Prepared, Renewed, WatchEvent, WatchStream,
};
use crate::error::{BackendError, ConfigError};

/// The key prefix when none is given.
pub const DEFAULT_PREFIX: &str = "leaseholder";

/// The longest prefix accepted.
pub const MAX_PREFIX_LEN: usize = 128;

/// A renewal may be answered by a keep-alive sent up to `ttl /
/// SHARE_FRACTION` before it was asked for. With the default renew
/// interval (ttl / 3) that is half an interval: the deadline it gives is
/// at most that much shorter than a keep-alive of its own would give.
pub const SHARE_FRACTION: u32 = 6;

/// The oldest etcd accepted.
const MIN_VERSION: (u32, u32) = (3, 4);
const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
const DEFAULT_WATCH_PING: Duration = Duration::from_secs(1);
/// etcd refuses longer leases (`MaxLeaseTTL`).
const MAX_LEASE_TTL_SECS: i64 = 9_000_000_000;
/// How often an idle connection is pinged (HTTP/2): well above etcd's
/// default `--grpc-keepalive-min-time` of 5 s. A silent link is noticed
/// sooner by each call's budget.
const HTTP2_PING: Duration = Duration::from_secs(10);
const NAME: &str = "etcd";

/// Builds an [`EtcdBackend`]; see [`EtcdBackend::builder`].
#[derive(Clone, Default)]
#[must_use]
pub struct EtcdBuilder {
    endpoints: Vec<String>,
    client: Option<Client>,
    prefix: Option<String>,
    connect_timeout: Option<Duration>,
    watch_ping: Option<Duration>,
    user: Option<(String, String)>,
    /// A URL given to [`url`](Self::url) that is not `etcd://…`.
    bad_url: Option<String>,
}

impl std::fmt::Debug for EtcdBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdBuilder")
            .field("endpoints", &self.endpoints)
            .field("client", &self.client.is_some())
            .field("prefix", &self.prefix)
            .field("connect_timeout", &self.connect_timeout)
            .field("watch_ping", &self.watch_ping)
            .field("user", &self.user.as_ref().map(|(name, _)| name))
            .finish()
    }
}

impl EtcdBuilder {
    /// One member's client address, `host:port` or `http://host:port`
    /// (call again, or use [`endpoints`](Self::endpoints), for a cluster).
    pub fn endpoint(mut self, endpoint: impl Into<String>) -> Self {
        self.endpoints.push(endpoint.into());
        self
    }

    /// The client addresses of the cluster's members. Requests go to any
    /// healthy one.
    pub fn endpoints<I, S>(mut self, endpoints: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.endpoints.extend(endpoints.into_iter().map(Into::into));
        self
    }

    /// Endpoints (and a prefix) from one URL: `etcd://host:port[,host:port…][/prefix]`,
    /// for a command line or an environment variable. Checked by
    /// [`build`](Self::build), like the other settings.
    ///
    /// ```
    /// use leaseholder::EtcdBackend;
    ///
    /// let backend = EtcdBackend::builder()
    ///     .url("etcd://10.0.0.1:2379,10.0.0.2:2379/billing")
    ///     .build()
    ///     .unwrap();
    /// assert_eq!(backend.prefix(), "billing");
    /// assert!(EtcdBackend::builder().url("http://x:1").build().is_err());
    /// ```
    pub fn url(mut self, url: &str) -> Self {
        match url.strip_prefix("etcd://") {
            Some(rest) => {
                let (hosts, prefix) = match rest.split_once('/') {
                    Some((hosts, prefix)) => (hosts, Some(prefix)),
                    None => (rest, None),
                };
                self.endpoints.extend(hosts.split(',').map(str::to_owned));
                if let Some(prefix) = prefix {
                    self.prefix = Some(prefix.to_owned());
                }
            }
            None => self.bad_url = Some(url.to_owned()),
        }
        self
    }

    /// An etcd-client [`Client`] you built (TLS, your own options), instead
    /// of endpoints. Connect it with `require_leader` set, so that a member
    /// cut off from its cluster refuses at once.
    pub fn client(mut self, client: Client) -> Self {
        self.client = Some(client);
        self
    }

    /// The prefix of every key this backend writes (default
    /// [`DEFAULT_PREFIX`]): `<prefix>/lease/<key>`, `<prefix>/epoch`,
    /// `<prefix>/fresh`, `<prefix>/cand/…`. At most [`MAX_PREFIX_LEN`]
    /// bytes, no control characters, not ending with `/`.
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = Some(prefix.into());
        self
    }

    /// How long connecting to a member may take (default 1 s).
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = Some(timeout);
        self
    }

    /// How long the watch may stay silent before the backend asks the
    /// server for a progress report; with no answer within as long again,
    /// the watch is taken for dead and reopened on a new connection
    /// (default 1 s). A watch that went silent would otherwise leave idle
    /// followers waiting for events that cannot come.
    pub fn watch_ping(mut self, ping: Duration) -> Self {
        self.watch_ping = Some(ping);
        self
    }

    /// The user and password, for a cluster with authentication on.
    pub fn user(mut self, name: impl Into<String>, password: impl Into<String>) -> Self {
        self.user = Some((name.into(), password.into()));
        self
    }

    /// Checks every setting; connects to nothing.
    ///
    /// ```
    /// use leaseholder::{EtcdBackend, Key};
    ///
    /// let backend = EtcdBackend::builder().endpoint("127.0.0.1:2379").build().unwrap();
    /// assert_eq!(backend.lease_key(&Key::new("jobs").unwrap()), "leaseholder/lease/jobs");
    ///
    /// let err = EtcdBackend::builder().build().unwrap_err();
    /// assert!(err.to_string().contains("no endpoint"));
    /// let err = EtcdBackend::builder().endpoint("https://e:2379").build().unwrap_err();
    /// assert!(err.to_string().contains("TLS"));
    /// ```
    pub fn build(self) -> Result<EtcdBackend, ConfigError> {
        if let Some(url) = &self.bad_url {
            return Err(config(format!(
                "URL {url:?} is not etcd://host:port[,host:port…][/prefix]"
            )));
        }
        let prefix = self.prefix.unwrap_or_else(|| DEFAULT_PREFIX.to_owned());
        check_prefix(&prefix)?;
        let connect_timeout = self.connect_timeout.unwrap_or(DEFAULT_CONNECT_TIMEOUT);
        if connect_timeout < Duration::from_millis(1) || connect_timeout > crate::MAX_INTERVAL {
            return Err(config(format!(
                "connect_timeout {connect_timeout:?} is outside 1 ms to one year"
            )));
        }
        let watch_ping = self.watch_ping.unwrap_or(DEFAULT_WATCH_PING);
        if watch_ping < Duration::from_millis(1) || watch_ping > crate::MAX_INTERVAL {
            return Err(config(format!(
                "watch_ping {watch_ping:?} is outside 1 ms to one year"
            )));
        }
        let source = match (self.client, self.endpoints.is_empty()) {
            (Some(_), false) => {
                return Err(config(
                    "both a client and endpoints were given; give one".to_owned(),
                ));
            }
            (Some(client), true) => Source::Client(Box::new(client)),
            (None, true) => {
                return Err(config(
                    "no endpoint: call .endpoint(..), .endpoints(..) or .client(..)".to_owned(),
                ));
            }
            (None, false) => {
                for endpoint in &self.endpoints {
                    check_endpoint(endpoint)?;
                }
                let mut options = ConnectOptions::new()
                    .with_connect_timeout(connect_timeout)
                    // etcd closes a connection that pings more often than
                    // its --grpc-keepalive-min-time (5 s by default), which
                    // would break the watch every few seconds.
                    .with_keep_alive(HTTP2_PING, connect_timeout.max(HTTP2_PING))
                    .with_require_leader(true);
                if let Some((name, password)) = &self.user {
                    if name.is_empty() {
                        return Err(config("the user name is empty".to_owned()));
                    }
                    options = options.with_user(name.clone(), password.clone());
                }
                Source::Endpoints(self.endpoints, Box::new(options))
            }
        };
        Ok(EtcdBackend {
            inner: Arc::new(Inner {
                lease_prefix: format!("{prefix}/lease/"),
                cand_prefix: format!("{prefix}/cand/"),
                epoch_key: format!("{prefix}/epoch"),
                fresh_key: format!("{prefix}/fresh"),
                prefix,
                source,
                watch_ping,
                client: Mutex::new(None),
                connecting: tokio::sync::Mutex::new(()),
                keepers: Mutex::new(HashMap::new()),
                held: Mutex::new(HashMap::new()),
                abandoned: Mutex::new(Vec::new()),
                entries: Mutex::new(Entries::default()),
                watch: WatchState::default(),
                highest_token: AtomicU64::new(0),
                base: AtomicU64::new(0),
                answered: Mutex::new(None),
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
    if let Some(ch) = prefix.chars().find(|c| c.is_control()) {
        return Err(config(format!(
            "the prefix {prefix:?} contains the control character {ch:?}"
        )));
    }
    if prefix.ends_with('/') {
        return Err(config(format!(
            "the prefix {prefix:?} ends with '/': the backend adds the separator"
        )));
    }
    Ok(())
}

fn check_endpoint(endpoint: &str) -> Result<(), ConfigError> {
    if endpoint.starts_with("https://") {
        return Err(config(format!(
            "endpoint {endpoint:?}: TLS is not built in; connect an etcd_client::Client \
             with TLS yourself and pass it to .client(..)"
        )));
    }
    let rest = endpoint.strip_prefix("http://").unwrap_or(endpoint);
    let bad = rest.is_empty()
        || rest.contains('/')
        || rest.chars().any(|c| c.is_whitespace() || c.is_control())
        || !rest
            .rsplit_once(':')
            .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok());
    if bad {
        return Err(config(format!(
            "endpoint {endpoint:?} is not host:port or http://host:port"
        )));
    }
    Ok(())
}

enum Source {
    Endpoints(Vec<String>, Box<ConnectOptions>),
    Client(Box<Client>),
}

/// A lease store on etcd; see the [module docs](self).
///
/// ```no_run
/// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
/// use leaseholder::{Backend, EtcdBackend, Leader};
///
/// let etcd = EtcdBackend::builder()
///     .endpoints(["10.0.0.1:2379", "10.0.0.2:2379", "10.0.0.3:2379"])
///     .prefix("billing")
///     .build()?;
/// let leader = Leader::builder("nightly-invoices")
///     .backend(Backend::etcd(etcd))
///     .build()?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct EtcdBackend {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for EtcdBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdBackend")
            .field("prefix", &self.inner.prefix)
            .finish_non_exhaustive()
    }
}

struct Inner {
    prefix: String,
    lease_prefix: String,
    cand_prefix: String,
    epoch_key: String,
    fresh_key: String,
    source: Source,
    watch_ping: Duration,
    /// Connected on first use (etcd-client connects lazily per request
    /// anyway; this only runs authentication once), and again after a call
    /// that got no reply ([`EtcdBackend::reset_client`]).
    client: Mutex<Option<Client>>,
    /// Held while connecting, so that one call connects at a time.
    connecting: tokio::sync::Mutex<()>,
    /// One shared lease per ttl in whole seconds.
    keepers: Mutex<HashMap<i64, Arc<Keeper>>>,
    /// The keys this backend holds (or may hold: an acquire in flight).
    held: Mutex<HashMap<Key, Held>>,
    /// Keys this backend may still hold under a nonce its campaign gave
    /// up: a later acquire of the key (with a new nonce) replaced their
    /// [`Held`] entry. An acquire whose reply was lost, and whose read-back
    /// failed until the campaign stopped asking, may still have written
    /// the key; bound to the shared lease, which the backend's other keys
    /// keep alive, it would never expire. Deleted once untouched for a ttl,
    /// like any key nobody renews ([`EtcdBackend::sweep`]).
    abandoned: Mutex<Vec<(Key, Held)>>,
    /// The registry entries this backend wrote.
    entries: Mutex<Entries>,
    watch: WatchState,
    /// The largest token this backend has issued or read, so that a new
    /// epoch's base is above it even if the host clock is behind.
    highest_token: AtomicU64,
    /// The epoch base last read (0: not known), for the holders of watch
    /// events.
    base: AtomicU64,
    /// When a transaction last got its reply: a call that times out
    /// replaces the connection only if nothing answered since it was sent
    /// (a silent link), not because its own budget was short while the
    /// link carried other replies.
    answered: Mutex<Option<Instant>>,
}

/// One key this backend holds.
#[derive(Clone, Debug)]
struct Held {
    nonce: Nonce,
    /// The shared lease the key is bound to.
    lease: i64,
    /// The key's create revision; `None` while an acquire's outcome is
    /// unknown.
    create_rev: Option<i64>,
    /// The watch generation in which the binding was last confirmed by a
    /// read (or written); while it is the current generation and the watch
    /// is up, the watch vouches for the key.
    checked_gen: u64,
    /// The last acquire or renew call for the key: a key not asked for in a
    /// whole ttl has no live term and is deleted.
    touched: Instant,
    ttl: Duration,
}

impl Held {
    /// `true` if no campaign has asked for the key in a whole ttl.
    fn untouched_since(&self, now: Instant) -> bool {
        self.touched.checked_add(self.ttl).is_some_and(|t| t < now)
    }
}

/// The registry entries a backend wrote, as it wrote them.
#[derive(Default)]
struct Entries {
    by_slot: HashMap<(Key, LeaderId), Entry>,
    /// The highest revision of a registry event the watch has applied to
    /// `by_slot`: an entry recorded with a lower revision may have missed
    /// one, so the watch does not vouch for it.
    last_event: i64,
}

/// One registry entry as this backend put it.
#[derive(Clone, Debug)]
struct Entry {
    value: bytes::Bytes,
    /// The shared lease it is bound to.
    lease: i64,
    /// The revision of its put (or of the read that checked it).
    revision: i64,
    /// The watch generation in which it was put or checked; while it is the
    /// current one and the watch is up, the watch vouches for the entry.
    checked_gen: u64,
    /// The last register call for it: an entry not registered in a whole
    /// ttl is deleted (the shared lease would keep it alive).
    touched: Instant,
    ttl: Duration,
}

impl Entry {
    fn untouched_since(&self, now: Instant) -> bool {
        self.touched.checked_add(self.ttl).is_some_and(|t| t < now)
    }
}

#[derive(Default)]
struct WatchState {
    /// A watch stream is up and being read.
    up: AtomicBool,
    /// Increased each time a watch stream starts.
    generation: AtomicU64,
    /// The last revision the watch has delivered completely (0: none).
    revision: AtomicI64,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every critical section is a few map operations: a panic inside one
    // cannot leave the state inconsistent.
    m.lock().unwrap_or_else(|poison| poison.into_inner())
}

impl EtcdBackend {
    /// A builder; give it endpoints or a client.
    pub fn builder() -> EtcdBuilder {
        EtcdBuilder::default()
    }

    /// The key prefix.
    pub fn prefix(&self) -> &str {
        &self.inner.prefix
    }

    /// The etcd key that holds `key`'s lease: `<prefix>/lease/<key>`.
    pub fn lease_key(&self, key: &Key) -> String {
        format!("{}{}", self.inner.lease_prefix, key.as_str())
    }

    /// The etcd key of candidate `id`'s entry in the registry of `key`:
    /// `<prefix>/cand/<key>/<id in 32 hex digits>`, with `%` and `/` in
    /// the key written as `%25` and `%2F`.
    ///
    /// ```
    /// use leaseholder::{EtcdBackend, Key, LeaderId};
    ///
    /// let backend = EtcdBackend::builder().endpoint("127.0.0.1:2379").build().unwrap();
    /// let id = LeaderId::new();
    /// let name = backend.candidate_key(&Key::new("jobs/a").unwrap(), id);
    /// assert_eq!(name, format!("leaseholder/cand/jobs%2Fa/{}", id.as_uuid().simple()));
    /// ```
    pub fn candidate_key(&self, key: &Key, id: LeaderId) -> String {
        format!("{}{}", self.candidates_prefix(key), id.as_uuid().simple())
    }

    /// The prefix of every entry of `key`'s registry: `<prefix>/cand/<key>/`.
    fn candidates_prefix(&self, key: &Key) -> String {
        format!("{}{}/", self.inner.cand_prefix, escape_key(key.as_str()))
    }

    /// The etcd key of the epoch marker: `<prefix>/epoch`.
    pub fn epoch_key(&self) -> &str {
        &self.inner.epoch_key
    }

    /// The etcd key of the fresh-cluster marker: `<prefix>/fresh`.
    pub fn fresh_key(&self) -> &str {
        &self.inner.fresh_key
    }

    /// The ids of the shared leases this backend holds now (one per ttl in
    /// whole seconds), for operators and tests: `etcdctl lease revoke <id
    /// in hex>` ends every term on it.
    pub fn lease_ids(&self) -> Vec<i64> {
        let keepers: Vec<Arc<Keeper>> = lock(&self.inner.keepers).values().cloned().collect();
        let mut ids: Vec<i64> = keepers
            .iter()
            .filter_map(|k| lock(&k.state).lease)
            .collect();
        ids.sort_unstable();
        ids
    }

    /// How many keep-alives (and grants) this backend has sent, for the
    /// bench: with many keys it stays near one per renew interval.
    pub fn keep_alives_sent(&self) -> u64 {
        let keepers: Vec<Arc<Keeper>> = lock(&self.inner.keepers).values().cloned().collect();
        keepers.iter().map(|k| k.sent.load(Ordering::Relaxed)).sum()
    }

    async fn client(&self, budget: Duration) -> Result<Client, BackendError> {
        if let Some(client) = lock(&self.inner.client).clone() {
            return Ok(client);
        }
        let Ok(_connecting) = tokio::time::timeout(budget, self.inner.connecting.lock()).await
        else {
            return Err(BackendError::Timeout(budget));
        };
        if let Some(client) = lock(&self.inner.client).clone() {
            return Ok(client);
        }
        let client = match &self.inner.source {
            Source::Client(client) => (**client).clone(),
            Source::Endpoints(endpoints, options) => {
                match tokio::time::timeout(
                    budget,
                    Client::connect(endpoints.clone(), Some((**options).clone())),
                )
                .await
                {
                    Ok(Ok(client)) => client,
                    Ok(Err(e)) => return Err(error(e)),
                    Err(_) => return Err(BackendError::Timeout(budget)),
                }
            }
        };
        *lock(&self.inner.client) = Some(client.clone());
        Ok(client)
    }

    /// A call got no reply within its budget: the next call connects
    /// anew, so that a link that went silent (its connection still open,
    /// nothing crossing it) is not used again. A client given to the
    /// builder is kept.
    fn reset_client(&self) {
        if matches!(self.inner.source, Source::Endpoints(..)) {
            lock(&self.inner.client).take();
        }
    }

    /// Runs `txn` within `budget`.
    async fn txn(&self, txn: Txn, budget: Duration) -> Result<TxnResponse, BackendError> {
        self.txn_raw(txn, budget).await?.map_err(error)
    }

    /// Runs `txn` within `budget`; the outer error is a timeout or no
    /// connection, the inner one etcd's.
    async fn txn_raw(
        &self,
        txn: Txn,
        budget: Duration,
    ) -> Result<Result<TxnResponse, etcd_client::Error>, BackendError> {
        let until = Instant::now() + budget;
        let client = self.client(budget).await?;
        let sent = Instant::now();
        let left = until.saturating_duration_since(sent);
        let mut kv = client.kv_client();
        match tokio::time::timeout(left, kv.txn(txn)).await {
            Ok(result) => {
                *lock(&self.inner.answered) = Some(Instant::now());
                Ok(result)
            }
            Err(_) => {
                if lock(&self.inner.answered).is_none_or(|at| at < sent) {
                    self.reset_client();
                }
                Err(BackendError::Timeout(budget))
            }
        }
    }

    fn keeper(&self, ttl: Duration) -> Arc<Keeper> {
        let secs = ttl_secs(ttl);
        lock(&self.inner.keepers)
            .entry(secs)
            .or_insert_with(|| {
                Arc::new(Keeper {
                    ttl_secs: secs,
                    state: Mutex::new(KState::default()),
                    sent: AtomicU64::new(0),
                })
            })
            .clone()
    }

    /// The epoch base from an epoch marker read, if the marker is there.
    fn base_of(&self, kv: Option<&KeyValue>) -> Option<u64> {
        let base: u64 = std::str::from_utf8(kv?.value()).ok()?.trim().parse().ok()?;
        self.inner.base.store(base, Ordering::Relaxed);
        Some(base)
    }

    fn token(&self, base: u64, create_rev: i64) -> Option<FencingToken> {
        let token = base.checked_add(u64::try_from(create_rev).ok()?)?;
        self.inner.highest_token.fetch_max(token, Ordering::Relaxed);
        Some(FencingToken::new(token))
    }

    /// The holder that `kv` (a lease key) shows, with the epoch `base`.
    async fn holder_of(&self, kv: &KeyValue, base: Option<u64>, budget: Duration) -> Holder {
        let token = base.and_then(|b| self.token(b, kv.create_revision()));
        let revision = u64::try_from(kv.mod_revision()).unwrap_or(0);
        let hint = self.hint(kv.lease(), budget).await;
        match token {
            Some(token) => Holder::decode(kv.value(), Some(token), revision, hint),
            // A key under a missing or unreadable epoch: nobody we know.
            None => Holder::foreign(revision, hint),
        }
    }

    /// The expiry hint for a key bound to `lease`: none while the watch is
    /// up (it reports the deletion), the lease's remaining ttl otherwise.
    async fn hint(&self, lease: i64, budget: Duration) -> Option<Duration> {
        if lease == 0 || self.watch_up() {
            return None;
        }
        let client = self.client(budget).await.ok()?;
        let mut leases = client.lease_client();
        let reply = tokio::time::timeout(budget, leases.time_to_live(lease, None))
            .await
            .ok()?
            .ok()?;
        let secs = u64::try_from(reply.ttl()).ok()?;
        Some(Duration::from_secs(secs.max(1)))
    }

    fn watch_up(&self) -> bool {
        self.inner.watch.up.load(Ordering::Acquire)
    }

    fn generation(&self) -> u64 {
        self.inner.watch.generation.load(Ordering::Acquire)
    }

    /// Reads `key`'s lease key and the epoch marker in one transaction.
    async fn read(
        &self,
        key: &Key,
        budget: Duration,
    ) -> Result<(Option<KeyValue>, Option<u64>), BackendError> {
        let txn = Txn::new().and_then(vec![
            TxnOp::get(self.lease_key(key), None),
            TxnOp::get(self.inner.epoch_key.clone(), None),
        ]);
        let reply = self.txn(txn, budget).await?;
        let mut gets = ranges(&reply);
        let kv = gets.next().flatten();
        let epoch = gets.next().flatten();
        Ok((kv, self.base_of(epoch.as_ref())))
    }

    /// Writes the epoch marker and the fresh marker (bound to a new lease
    /// of `ttl`) if there is no epoch marker.
    async fn plant_epoch(&self, ttl: Duration, budget: Duration) -> Result<(), BackendError> {
        let until = Instant::now() + budget;
        let left = || until.saturating_duration_since(Instant::now());
        let client = self.client(left()).await?;
        let mut leases = client.lease_client();
        let fresh = match tokio::time::timeout(left(), leases.grant(ttl_secs(ttl), None)).await {
            Ok(Ok(reply)) => reply.id(),
            Ok(Err(e)) => return Err(error(e)),
            Err(_) => {
                self.reset_client();
                return Err(BackendError::Timeout(budget));
            }
        };
        let now_us = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX / 2));
        let base = now_us.max(
            self.inner
                .highest_token
                .load(Ordering::Relaxed)
                .saturating_add(1),
        );
        let txn = Txn::new()
            .when(vec![Compare::create_revision(
                self.inner.epoch_key.clone(),
                CompareOp::Equal,
                0,
            )])
            .and_then(vec![
                TxnOp::put(self.inner.epoch_key.clone(), base.to_string(), None),
                TxnOp::put(
                    self.inner.fresh_key.clone(),
                    "a new epoch: no acquisition until this expires",
                    Some(PutOptions::new().with_lease(fresh)),
                ),
            ]);
        let reply = self.txn(txn, left()).await?;
        if reply.succeeded() {
            tracing::warn!(
                prefix = %self.inner.prefix,
                "no epoch marker: a new or emptied etcd cluster; acquisitions wait one ttl"
            );
        }
        Ok(())
    }

    /// The held entry for `key` if it has `nonce`.
    fn held(&self, key: &Key, nonce: Nonce) -> Option<Held> {
        lock(&self.inner.held)
            .get(key)
            .filter(|h| h.nonce == nonce)
            .cloned()
    }

    fn forget(&self, key: &Key, nonce: Nonce) {
        let mut held = lock(&self.inner.held);
        if held.get(key).is_some_and(|h| h.nonce == nonce) {
            held.remove(key);
        }
    }

    /// Confirms from the store that `key` is bound to one of our leases
    /// with `nonce`; updates or drops the held entry.
    async fn check(
        &self,
        key: &Key,
        nonce: Nonce,
        budget: Duration,
    ) -> Result<Option<Held>, BackendError> {
        let generation = self.generation();
        let (kv, _) = self.read(key, budget).await?;
        let ours = kv.as_ref().filter(|kv| {
            kv.lease() != 0
                && LeaseValue::decode(kv.value()).is_ok_and(|v| v.nonce == nonce)
                && self.lease_ids().contains(&kv.lease())
        });
        let mut held = lock(&self.inner.held);
        match ours {
            Some(kv) => {
                let entry = held.entry(key.clone()).or_insert_with(|| Held {
                    nonce,
                    lease: kv.lease(),
                    create_rev: None,
                    checked_gen: generation,
                    touched: Instant::now(),
                    ttl: Duration::from_secs(1),
                });
                entry.nonce = nonce;
                entry.lease = kv.lease();
                entry.create_rev = Some(kv.create_revision());
                entry.checked_gen = generation;
                Ok(Some(entry.clone()))
            }
            None => {
                if held.get(key).is_some_and(|h| h.nonce == nonce) {
                    held.remove(key);
                }
                Ok(None)
            }
        }
    }

    /// Deletes keys that no campaign has asked for in a whole ttl (their
    /// terms are over): the shared lease would keep them alive.
    async fn sweep(&self, lease: i64, budget: Duration) {
        let now = Instant::now();
        let stale: Vec<(Key, Held)> = lock(&self.inner.held)
            .iter()
            .filter(|(_, h)| h.lease == lease && h.untouched_since(now))
            .map(|(k, h)| (k.clone(), h.clone()))
            .collect();
        for (key, held) in &stale {
            let rev = match held.create_rev {
                Some(rev) => Some(rev),
                None => match self.check(key, held.nonce, budget).await {
                    Ok(Some(h)) => h.create_rev,
                    Ok(None) => None,
                    Err(_) => continue,
                },
            };
            let Some(rev) = rev else {
                self.forget(key, held.nonce);
                continue;
            };
            if self.delete_created(key, rev, budget).await.is_ok() {
                tracing::info!(%key, "deleted a key whose term ended unreleased");
                self.forget(key, held.nonce);
            }
        }
        let abandoned: Vec<(Key, Held)> = lock(&self.inner.abandoned)
            .iter()
            .filter(|(_, h)| h.lease == lease && h.untouched_since(now))
            .cloned()
            .collect();
        for (key, held) in &abandoned {
            let Ok((kv, _)) = self.read(key, budget).await else {
                continue;
            };
            let ours = kv.filter(|kv| is_bound(kv, held));
            let gone = match ours {
                Some(kv) => {
                    let deleted = self
                        .delete_created(key, kv.create_revision(), budget)
                        .await
                        .is_ok();
                    if deleted {
                        tracing::info!(%key, "deleted a key an abandoned acquire had written");
                    }
                    deleted
                }
                None => true,
            };
            if gone {
                self.drop_abandoned(key, held.nonce);
            }
        }
    }

    /// Forgets the abandoned entry of `key` with `nonce`.
    fn drop_abandoned(&self, key: &Key, nonce: Nonce) {
        lock(&self.inner.abandoned).retain(|(k, h)| !(k == key && h.nonce == nonce));
    }

    /// The abandoned entry that `kv` (the key as read) is bound to, if it
    /// has gone a ttl without a call: nothing can lead on it any more, so
    /// the key may be deleted.
    fn abandoned_and_stale(&self, key: &Key, kv: &KeyValue) -> Option<Held> {
        let now = Instant::now();
        lock(&self.inner.abandoned)
            .iter()
            .find(|(k, h)| k == key && is_bound(kv, h) && h.untouched_since(now))
            .map(|(_, h)| h.clone())
    }

    /// Deletes `key` if it is still the one created at revision `rev`.
    async fn delete_created(
        &self,
        key: &Key,
        rev: i64,
        budget: Duration,
    ) -> Result<(), BackendError> {
        let txn = Txn::new()
            .when(vec![Compare::create_revision(
                self.lease_key(key),
                CompareOp::Equal,
                rev,
            )])
            .and_then(vec![TxnOp::delete(self.lease_key(key), None)]);
        self.txn(txn, budget).await.map(drop)
    }
}

/// Whether `kv` (a lease key as read) is the one `held` describes: bound
/// to its shared lease, with its nonce.
fn is_bound(kv: &KeyValue, held: &Held) -> bool {
    kv.lease() == held.lease && LeaseValue::decode(kv.value()).is_ok_and(|v| v.nonce == held.nonce)
}

/// The whole-second ttl of an etcd lease for `ttl`: rounded up, at least 1.
fn ttl_secs(ttl: Duration) -> i64 {
    let secs = ttl
        .as_secs()
        .saturating_add(u64::from(ttl.subsec_nanos() > 0));
    i64::try_from(secs.max(1)).unwrap_or(i64::MAX)
}

/// A key as it appears in registry entry names: `%` and `/` written as
/// `%25` and `%2F`, so that it contains no `/`.
fn escape_key(key: &str) -> String {
    let mut out = String::with_capacity(key.len());
    for ch in key.chars() {
        match ch {
            '%' => out.push_str("%25"),
            '/' => out.push_str("%2F"),
            ch => out.push(ch),
        }
    }
    out
}

/// The key [`escape_key`] wrote, or `None` for anything it cannot write.
fn unescape_key(escaped: &str) -> Option<String> {
    let mut out = String::with_capacity(escaped.len());
    let mut rest = escaped;
    while let Some(at) = rest.find(['%', '/']) {
        out.push_str(&rest[..at]);
        let tail = &rest[at..];
        if let Some(after) = tail.strip_prefix("%25") {
            out.push('%');
            rest = after;
        } else if let Some(after) = tail.strip_prefix("%2F") {
            out.push('/');
            rest = after;
        } else {
            return None;
        }
    }
    out.push_str(rest);
    Some(out)
}

/// A candidate id as entry names spell it: 32 lowercase hex digits.
fn parse_id(hex: &str) -> Option<LeaderId> {
    if hex.len() != 32
        || !hex
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        return None;
    }
    uuid::Uuid::try_parse(hex).ok().map(LeaderId::from)
}

/// The key and candidate id of a registry entry's name, after
/// `<prefix>/cand/`.
fn parse_candidate_name(name: &str) -> Option<(Key, LeaderId)> {
    let (key, id) = name.split_once('/')?;
    let key = Key::new(unescape_key(key)?).ok()?;
    Some((key, parse_id(id)?))
}

/// The results of a transaction's range operations, in order.
fn ranges(reply: &TxnResponse) -> impl Iterator<Item = Option<KeyValue>> {
    reply.op_responses().into_iter().filter_map(|op| match op {
        TxnOpResponse::Get(get) => Some(get.kvs().first().cloned()),
        _ => None,
    })
}

/// Maps etcd-client's errors onto the lease contract's.
fn error(e: etcd_client::Error) -> BackendError {
    use tonic::Code;
    match e {
        etcd_client::Error::GRpcStatus(status) => match status.code() {
            Code::PermissionDenied | Code::Unauthenticated => BackendError::denied(status),
            Code::InvalidArgument | Code::FailedPrecondition | Code::Unimplemented => {
                // "requested lease not found" comes as NotFound; a txn with
                // too many operations as InvalidArgument.
                BackendError::fatal(status)
            }
            _ => BackendError::unavailable(status),
        },
        etcd_client::Error::InvalidArgs(_)
        | etcd_client::Error::InvalidUri(_)
        | etcd_client::Error::Utf8Error(_)
        | etcd_client::Error::InvalidMetadataValue(_)
        | etcd_client::Error::EndpointsNotManaged => BackendError::fatal(e),
        _ => BackendError::unavailable(e),
    }
}

/// `true` for etcd's "requested lease not found" (a put or keep-alive on a
/// lease that expired or was revoked).
fn lease_gone(e: &etcd_client::Error) -> bool {
    match e {
        etcd_client::Error::GRpcStatus(status) => {
            status.code() == tonic::Code::NotFound && status.message().contains("lease not found")
        }
        etcd_client::Error::LeaseKeepAliveError(message) => message.contains("lease not found"),
        _ => false,
    }
}

// ----- the shared lease -------------------------------------------------

/// One shared lease and its keep-alives.
struct Keeper {
    ttl_secs: i64,
    state: Mutex<KState>,
    /// Keep-alives and grants sent.
    sent: AtomicU64,
}

#[derive(Default)]
struct KState {
    /// The lease, once granted (cleared when it is gone).
    lease: Option<i64>,
    /// The send time of the latest confirmed keep-alive (or grant) of it.
    confirmed: Option<Instant>,
    /// The keep-alive in flight.
    flight: Option<Flight>,
    /// Numbers flights, so that a dropped driver clears only its own.
    next_flight: u64,
}

struct Flight {
    id: u64,
    sent: Instant,
    done: watch::Receiver<Option<Outcome>>,
}

#[derive(Clone, Debug)]
enum Outcome {
    /// The lease is alive, confirmed by a request sent at this instant.
    Alive(i64, Instant),
    /// The lease is gone; a new one will be granted on the next request.
    Gone(i64),
    /// The request failed without a verdict.
    Failed(String, bool),
}

/// Clears the flight if its driver is dropped before it finished.
struct FlightGuard<'a> {
    keeper: &'a Keeper,
    id: u64,
}

impl Drop for FlightGuard<'_> {
    fn drop(&mut self) {
        let mut state = lock(&self.keeper.state);
        if state.flight.as_ref().is_some_and(|f| f.id == self.id) {
            state.flight = None;
        }
    }
}

enum Step {
    Done(Outcome),
    /// Wait for the flight; `true` if it was sent late enough for us.
    Wait(watch::Receiver<Option<Outcome>>, bool),
    Drive(u64, Instant, Option<i64>, watch::Sender<Option<Outcome>>),
}

impl Keeper {
    fn ttl(&self) -> Duration {
        Duration::from_secs(u64::try_from(self.ttl_secs).unwrap_or(u64::MAX))
    }

    /// A confirmation that the lease lives for a ttl from an instant no
    /// earlier than `not_before`: the latest one if it is recent enough,
    /// the one in flight if it was sent late enough, else a new keep-alive
    /// (or a grant, if there is no lease).
    async fn confirm(&self, backend: &EtcdBackend, not_before: Instant) -> Outcome {
        loop {
            let step = {
                let mut state = lock(&self.state);
                match (&state.lease, &state.confirmed, &state.flight) {
                    (Some(id), Some(at), _) if *at >= not_before => {
                        Step::Done(Outcome::Alive(*id, *at))
                    }
                    (_, _, Some(flight)) => {
                        Step::Wait(flight.done.clone(), flight.sent >= not_before)
                    }
                    (lease, confirmed, None) => {
                        let now = Instant::now();
                        // Not confirmed for over a ttl (and a second of
                        // etcd's rounding): no term on it is live, and the
                        // lease has expired or is about to. Grant a new one
                        // rather than spend a round trip on a keep-alive
                        // that would say so (a follower's acquire after a
                        // release is one request shorter).
                        let stale = confirmed.is_some_and(|at| {
                            at.checked_add(self.ttl() + Duration::from_secs(1))
                                .is_some_and(|gone| gone < now)
                        });
                        let lease = if stale {
                            state.lease = None;
                            state.confirmed = None;
                            None
                        } else {
                            *lease
                        };
                        let (tx, rx) = watch::channel(None);
                        let id = state.next_flight;
                        state.next_flight += 1;
                        let sent = Instant::now();
                        state.flight = Some(Flight { id, sent, done: rx });
                        Step::Drive(id, sent, lease, tx)
                    }
                }
            };
            match step {
                Step::Done(outcome) => return outcome,
                Step::Wait(mut rx, joined) => {
                    // Err: the driver was dropped (its caller gave up): go
                    // round, and drive one ourselves.
                    if let Ok(outcome) = rx.wait_for(Option::is_some).await {
                        let outcome = outcome
                            .clone()
                            .unwrap_or(Outcome::Failed("keep-alive abandoned".to_owned(), true));
                        // A flight sent too early for us: its verdict only
                        // counts if it says the lease is gone or the store
                        // failed; else go round for another.
                        match outcome {
                            Outcome::Alive(..) if !joined => {}
                            other => return other,
                        }
                    }
                }
                Step::Drive(id, sent, lease, tx) => {
                    let guard = FlightGuard { keeper: self, id };
                    self.sent.fetch_add(1, Ordering::Relaxed);
                    let outcome = self.send(backend, lease, sent).await;
                    {
                        let mut state = lock(&self.state);
                        match &outcome {
                            Outcome::Alive(id, at) => {
                                if state.lease != Some(*id) {
                                    state.lease = Some(*id);
                                    state.confirmed = None;
                                }
                                state.confirmed = Some(state.confirmed.map_or(*at, |c| c.max(*at)));
                            }
                            Outcome::Gone(id) => {
                                if state.lease == Some(*id) {
                                    state.lease = None;
                                    state.confirmed = None;
                                }
                            }
                            Outcome::Failed(..) => {}
                        }
                    }
                    drop(guard);
                    let _ = tx.send(Some(outcome.clone()));
                    if let Outcome::Gone(id) = &outcome {
                        // Every key and registry entry on it is gone with
                        // it: the next register puts its entry again.
                        lock(&backend.inner.held).retain(|_, h| h.lease != *id);
                        lock(&backend.inner.abandoned).retain(|(_, h)| h.lease != *id);
                        lock(&backend.inner.entries)
                            .by_slot
                            .retain(|_, e| e.lease != *id);
                    }
                    if let Outcome::Alive(id, _) = &outcome {
                        let now = Instant::now();
                        let stale = lock(&backend.inner.held)
                            .values()
                            .any(|h| h.lease == *id && h.untouched_since(now))
                            || lock(&backend.inner.abandoned)
                                .iter()
                                .any(|(_, h)| h.lease == *id && h.untouched_since(now));
                        if stale {
                            let backend = backend.clone();
                            let budget = self.ttl();
                            let id = *id;
                            tokio::spawn(async move { backend.sweep(id, budget).await });
                        }
                        let live = backend.lease_ids();
                        let stale = {
                            let mut entries = lock(&backend.inner.entries);
                            // Unregistered entries on a lease no longer
                            // kept alive went (or go) with it.
                            entries
                                .by_slot
                                .retain(|_, e| live.contains(&e.lease) || !e.untouched_since(now));
                            entries
                                .by_slot
                                .values()
                                .any(|e| e.lease == *id && e.untouched_since(now))
                        };
                        if stale {
                            let backend = backend.clone();
                            let budget = self.ttl();
                            let id = *id;
                            tokio::spawn(async move { backend.sweep_entries(id, budget).await });
                        }
                    }
                    return outcome;
                }
            }
        }
    }

    /// One keep-alive of `lease`, or a grant of a new lease.
    async fn send(&self, backend: &EtcdBackend, lease: Option<i64>, sent: Instant) -> Outcome {
        let budget = self.ttl();
        let client = match backend.client(budget).await {
            Ok(client) => client,
            Err(e) => return Outcome::Failed(e.to_string(), e.is_transient()),
        };
        let mut leases = client.lease_client();
        match lease {
            Some(id) => match tokio::time::timeout(budget, leases.keep_alive(id)).await {
                // The first reply had a positive ttl (etcd-client checks):
                // alive. The stream is dropped; one request per round.
                Ok(Ok(_)) => Outcome::Alive(id, sent),
                Ok(Err(e)) if lease_gone(&e) => Outcome::Gone(id),
                Ok(Err(e)) => {
                    let e = error(e);
                    Outcome::Failed(e.to_string(), e.is_transient())
                }
                Err(_) => {
                    backend.reset_client();
                    Outcome::Failed(format!("no keep-alive reply within {budget:?}"), true)
                }
            },
            None => match tokio::time::timeout(budget, leases.grant(self.ttl_secs, None)).await {
                Ok(Ok(reply)) => {
                    tracing::debug!(
                        lease = reply.id(),
                        ttl = reply.ttl(),
                        "granted a shared lease"
                    );
                    Outcome::Alive(reply.id(), sent)
                }
                Ok(Err(e)) => {
                    let e = error(e);
                    Outcome::Failed(e.to_string(), e.is_transient())
                }
                Err(_) => {
                    backend.reset_client();
                    Outcome::Failed(format!("no grant reply within {budget:?}"), true)
                }
            },
        }
    }
}

fn failed(message: String, transient: bool) -> BackendError {
    if transient {
        BackendError::unavailable(message)
    } else {
        BackendError::fatal(message)
    }
}

async fn within<T>(
    budget: Duration,
    fut: impl std::future::Future<Output = Result<T, BackendError>>,
) -> Result<T, BackendError> {
    match tokio::time::timeout(budget, fut).await {
        Ok(result) => result,
        Err(_) => Err(BackendError::Timeout(budget)),
    }
}

impl BackendEdge for EtcdBackend {
    fn name(&self) -> &'static str {
        NAME
    }

    fn min_ttl(&self) -> Duration {
        Duration::from_secs(1)
    }

    fn validate_key(&self, key: &Key) -> Result<(), ConfigError> {
        if let Some(ch) = key.as_str().chars().find(|c| c.is_control()) {
            return Err(ConfigError::KeyCharacter {
                key: key.as_str().to_owned(),
                ch,
                backend: NAME,
                rule: "etcd keys here are printable text",
            });
        }
        Ok(())
    }

    async fn setup(&self, budget: Duration) -> Result<Prepared, BackendError> {
        let until = Instant::now() + budget;
        let client = self.client(budget).await?;
        let left = until.saturating_duration_since(Instant::now());
        let mut maintenance = client.maintenance_client();
        let status = match tokio::time::timeout(left, maintenance.status()).await {
            Ok(Ok(status)) => status,
            Ok(Err(e)) => return Err(error(e)),
            Err(_) => {
                self.reset_client();
                return Err(BackendError::Timeout(budget));
            }
        };
        let version = status.version().to_owned();
        match parse_version(&version) {
            Some(v) if v >= MIN_VERSION => {}
            _ => {
                return Err(BackendError::Unsupported {
                    what: format!("etcd {version}"),
                    needed: "etcd 3.4 or newer".to_owned(),
                });
            }
        }
        if stale_leader_revokes(&version) {
            tracing::warn!(
                version = %version,
                "etcd before 3.4.31 and 3.5.13 lets a Raft leader that stalled (a pause, a slow disk) \
                 revoke leases that the new leader kept alive (etcd-io/etcd#15247): a lease can end \
                 before its holder's deadline, so two leaders may overlap until the old one sees the \
                 delete; upgrade the cluster"
            );
        }
        // Nothing to create: the first acquire on a cluster with no epoch
        // marker writes it, and every acquire waits for the fresh marker
        // to expire (see the module docs), which covers what
        // `Prepared::Created` would.
        Ok(Prepared::Existing)
    }

    async fn acquire(
        &self,
        key: &Key,
        claim: &Claim,
        ttl: Duration,
        budget: Duration,
    ) -> Result<Acquired, BackendError> {
        within(budget, self.acquire_inner(key, claim, ttl, budget)).await
    }

    async fn renew(
        &self,
        key: &Key,
        lease: &Lease,
        ttl: Duration,
        budget: Duration,
    ) -> Result<Renewed, BackendError> {
        within(budget, self.renew_inner(key, lease, ttl, budget)).await
    }

    async fn release(
        &self,
        key: &Key,
        lease: &Lease,
        budget: Duration,
    ) -> Result<(), BackendError> {
        within(budget, async {
            let nonce = lease.nonce();
            let rev = match self.held(key, nonce).and_then(|h| h.create_rev) {
                Some(rev) => Some(rev),
                None => {
                    let (kv, _) = self.read(key, budget).await?;
                    kv.filter(|kv| LeaseValue::decode(kv.value()).is_ok_and(|v| v.nonce == nonce))
                        .map(|kv| kv.create_revision())
                }
            };
            if let Some(rev) = rev {
                self.delete_created(key, rev, budget).await?;
            }
            self.forget(key, nonce);
            Ok(())
        })
        .await
    }

    async fn holder(&self, key: &Key, budget: Duration) -> Result<Option<Holder>, BackendError> {
        within(budget, async {
            let (kv, base) = self.read(key, budget).await?;
            match kv {
                Some(kv) => Ok(Some(self.holder_of(&kv, base, budget).await)),
                None => Ok(None),
            }
        })
        .await
    }

    /// One keys-only range read of `<prefix>/lease/`.
    async fn keys(&self, budget: Duration) -> Result<Vec<Key>, BackendError> {
        within(budget, async {
            let prefix = &self.inner.lease_prefix;
            let txn = Txn::new().and_then(vec![TxnOp::get(
                prefix.clone(),
                Some(GetOptions::new().with_prefix().with_keys_only()),
            )]);
            let reply = self.txn(txn, budget).await?;
            let mut keys = Vec::new();
            for op in reply.op_responses() {
                let TxnOpResponse::Get(get) = op else {
                    continue;
                };
                keys.extend(
                    get.kvs()
                        .iter()
                        .filter_map(|kv| kv.key().strip_prefix(prefix.as_bytes()))
                        .filter_map(|name| std::str::from_utf8(name).ok())
                        .filter_map(|name| Key::new(name).ok()),
                );
            }
            Ok(keys)
        })
        .await
    }

    async fn watch(&self) -> Result<Option<WatchStream>, BackendError> {
        let budget = DEFAULT_CONNECT_TIMEOUT * 5;
        let client = self.client(budget).await?;
        let mut watcher = client.watch_client();
        let from = self.inner.watch.revision.load(Ordering::Acquire);
        let mut options = WatchOptions::new().with_prefix();
        if from > 0 {
            options = options.with_start_revision(from + 1);
        }
        let prefix = format!("{}/", self.inner.prefix);
        let mut stream =
            match tokio::time::timeout(budget, watcher.watch(prefix, Some(options))).await {
                Ok(Ok(stream)) => stream,
                Ok(Err(e)) => return Err(error(e)),
                Err(_) => {
                    self.reset_client();
                    return Err(BackendError::Timeout(budget));
                }
            };
        // The first reply says the watch was created (or refused: a start
        // revision compacted away).
        let first = match tokio::time::timeout(budget, stream.message()).await {
            Ok(Ok(Some(reply))) => reply,
            Ok(Ok(None)) => return Err(BackendError::unavailable("the watch stream closed")),
            Ok(Err(e)) => return Err(error(e)),
            Err(_) => {
                self.reset_client();
                return Err(BackendError::Timeout(budget));
            }
        };
        if first.canceled() || first.compact_revision() > 0 {
            tracing::warn!(
                from,
                compacted = first.compact_revision(),
                "watch revision compacted away; watching from now (followers resync)"
            );
            self.inner.watch.revision.store(0, Ordering::Release);
            return Err(BackendError::unavailable(format!(
                "watch start revision {} compacted (compact revision {})",
                from + 1,
                first.compact_revision()
            )));
        }
        if from == 0
            && let Some(header) = first.header()
        {
            self.inner
                .watch
                .revision
                .store(header.revision(), Ordering::Release);
        }
        let generation = self.inner.watch.generation.fetch_add(1, Ordering::AcqRel) + 1;
        self.inner.watch.up.store(true, Ordering::Release);
        let guard = UpGuard {
            inner: Arc::downgrade(&self.inner),
            generation,
        };
        let (sender, receiver) = stream.split();
        let watching = Watching {
            sender,
            receiver,
            backend: self.clone(),
            _guard: guard,
            queue: std::collections::VecDeque::new(),
            ended: false,
            ping: self.inner.watch_ping,
            next_ping: Instant::now() + self.inner.watch_ping,
            asked: None,
        };
        let events = futures_util::stream::unfold(watching, |mut w| async move {
            let event = w.next().await?;
            Some((event, w))
        });
        Ok(Some(Box::pin(events)))
    }

    fn watch_reports_expiry(&self) -> bool {
        true
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
        within(
            budget,
            self.proclaim_inner(key, lease, metadata, ttl, budget),
        )
        .await
    }

    async fn register(
        &self,
        key: &Key,
        candidate: &Candidate,
        ttl: Duration,
        budget: Duration,
    ) -> Result<(), BackendError> {
        within(budget, self.register_inner(key, candidate, ttl, budget)).await
    }

    async fn deregister(
        &self,
        key: &Key,
        id: LeaderId,
        budget: Duration,
    ) -> Result<(), BackendError> {
        within(budget, async {
            let txn = Txn::new().and_then(vec![TxnOp::delete(self.candidate_key(key, id), None)]);
            self.txn(txn, budget).await?;
            // Kept until the delete succeeded: an entry left behind is
            // swept a ttl after its last register.
            lock(&self.inner.entries).by_slot.remove(&(key.clone(), id));
            Ok(())
        })
        .await
    }

    async fn candidates(
        &self,
        key: &Key,
        budget: Duration,
    ) -> Result<Vec<Candidate>, BackendError> {
        within(budget, async {
            let prefix = self.candidates_prefix(key);
            let txn = Txn::new().and_then(vec![TxnOp::get(
                prefix.clone(),
                Some(GetOptions::new().with_prefix()),
            )]);
            let reply = self.txn(txn, budget).await?;
            let mut list = Vec::new();
            for op in reply.op_responses() {
                let TxnOpResponse::Get(get) = op else {
                    continue;
                };
                for kv in get.kvs() {
                    let id = kv
                        .key()
                        .strip_prefix(prefix.as_bytes())
                        .and_then(|id| std::str::from_utf8(id).ok())
                        .and_then(parse_id);
                    if let (Some(id), Ok(candidate)) = (id, Candidate::decode(kv.value()))
                        && candidate.id() == id
                    {
                        list.push(candidate);
                    }
                }
            }
            Ok(list)
        })
        .await
    }

    async fn candidate(
        &self,
        key: &Key,
        id: LeaderId,
        budget: Duration,
    ) -> Result<Option<Candidate>, BackendError> {
        within(budget, async {
            let txn = Txn::new().and_then(vec![TxnOp::get(self.candidate_key(key, id), None)]);
            let reply = self.txn(txn, budget).await?;
            Ok(reply
                .op_responses()
                .into_iter()
                .filter_map(|op| match op {
                    TxnOpResponse::Get(get) => Some(get),
                    _ => None,
                })
                .flat_map(|get| get.kvs().to_vec())
                .filter_map(|kv| Candidate::decode(kv.value()).ok())
                .find(|c| c.id() == id))
        })
        .await
    }
}

/// One watch stream, as the hub reads it.
struct Watching {
    sender: etcd_client::WatchRequestSender,
    receiver: etcd_client::WatchResponseStream,
    backend: EtcdBackend,
    _guard: UpGuard,
    queue: std::collections::VecDeque<WatchEvent>,
    ended: bool,
    /// No reply for this long: ask for one (a progress request); none for
    /// this long after asking: the stream is dead.
    ping: Duration,
    next_ping: Instant,
    /// When the progress request still unanswered was sent.
    asked: Option<Instant>,
}

impl Watching {
    /// The next event, or `None` once the stream is over (the watch is
    /// marked down before).
    async fn next(&mut self) -> Option<WatchEvent> {
        loop {
            if let Some(event) = self.queue.pop_front() {
                return Some(event);
            }
            if self.ended {
                return None;
            }
            let wake = self.asked.map_or(self.next_ping, |at| at + self.ping);
            tokio::select! {
                reply = self.receiver.message() => match reply {
                    Ok(Some(reply)) => {
                        // Any reply shows the stream alive.
                        self.asked = None;
                        self.next_ping = Instant::now() + self.ping;
                        if reply.canceled() || reply.compact_revision() > 0 {
                            tracing::warn!(
                                compacted = reply.compact_revision(),
                                "watch cancelled by the server; reconnecting"
                            );
                            if reply.compact_revision() > 0 {
                                self.backend.inner.watch.revision.store(0, Ordering::Release);
                            }
                            self.end();
                            continue;
                        }
                        self.backend.on_watch(&reply, &mut self.queue);
                    }
                    Ok(None) | Err(_) => {
                        self.end();
                        return None;
                    }
                },
                () = tokio::time::sleep_until(wake) => {
                    if self.asked.is_some() {
                        tracing::warn!(ping = ?self.ping, "the watch stream went silent; reconnecting");
                        self.backend.reset_client();
                        self.end();
                        return None;
                    }
                    if self.sender.request_progress().await.is_err() {
                        self.end();
                        return None;
                    }
                    self.asked = Some(Instant::now());
                }
            }
        }
    }

    fn end(&mut self) {
        self._guard.down();
        self.ended = true;
    }
}

/// Marks the watch down when its stream ends or is dropped (unless a newer
/// stream has started).
struct UpGuard {
    inner: Weak<Inner>,
    generation: u64,
}

impl UpGuard {
    fn down(&self) {
        if let Some(inner) = self.inner.upgrade()
            && inner.watch.generation.load(Ordering::Acquire) == self.generation
        {
            inner.watch.up.store(false, Ordering::Release);
        }
    }
}

impl Drop for UpGuard {
    fn drop(&mut self) {
        self.down();
    }
}

impl EtcdBackend {
    async fn register_inner(
        &self,
        key: &Key,
        candidate: &Candidate,
        ttl: Duration,
        budget: Duration,
    ) -> Result<(), BackendError> {
        let called = Instant::now();
        if ttl_secs(ttl) > MAX_LEASE_TTL_SECS {
            return Err(BackendError::Unsupported {
                what: format!("a ttl of {ttl:?}"),
                needed: format!("at most {MAX_LEASE_TTL_SECS} s, etcd's longest lease"),
            });
        }
        let keeper = self.keeper(ttl);
        // The entry must live a ttl from this call: a keep-alive sent
        // after it began does (or one sent earlier by no more than the
        // lease's rounding up to whole seconds).
        let surplus = keeper.ttl().saturating_sub(ttl);
        let not_before = called.checked_sub(surplus).unwrap_or(called);
        let slot = (key.clone(), candidate.id());
        let name = self.candidate_key(key, candidate.id());
        let value = candidate.encode();
        // Two rounds at most: a lease that expired between its keep-alive
        // and the put is replaced once.
        for _ in 0..2 {
            let lease = match keeper.confirm(self, not_before).await {
                Outcome::Alive(id, _) => id,
                Outcome::Gone(_) => continue,
                Outcome::Failed(message, transient) => return Err(failed(message, transient)),
            };
            let generation = self.generation();
            let known = {
                let mut entries = lock(&self.inner.entries);
                match entries.by_slot.get_mut(&slot) {
                    Some(e) if e.lease == lease && e.value == value => {
                        e.touched = called;
                        e.ttl = ttl;
                        Some(e.checked_gen)
                    }
                    _ => None,
                }
            };
            let put = TxnOp::put(
                name.clone(),
                value.to_vec(),
                Some(PutOptions::new().with_lease(lease)),
            );
            let txn = match known {
                // As written, and the watch has seen nothing happen to it.
                Some(checked) if checked == generation && self.watch_up() => return Ok(()),
                // As written, but the watch cannot vouch for it: put it
                // unless it is still there, on the lease.
                Some(_) => Txn::new()
                    .when(vec![
                        Compare::value(name.clone(), CompareOp::Equal, value.to_vec()),
                        Compare::lease(name.clone(), CompareOp::Equal, lease),
                    ])
                    .or_else(vec![put]),
                // New, rewritten, or on another lease.
                None => Txn::new().and_then(vec![put]),
            };
            let reply = match self.txn_raw(txn, budget).await? {
                Ok(reply) => reply,
                Err(e) if lease_gone(&e) => {
                    let mut state = lock(&keeper.state);
                    if state.lease == Some(lease) {
                        state.lease = None;
                        state.confirmed = None;
                    }
                    continue;
                }
                Err(e) => return Err(error(e)),
            };
            let revision = reply.header().map_or(0, |h| h.revision());
            let mut entries = lock(&self.inner.entries);
            // A registry event the watch applied at a later revision may
            // have concerned this entry: then let the next call check it.
            let checked_gen = if entries.last_event > revision {
                0
            } else {
                generation
            };
            entries.by_slot.insert(
                slot,
                Entry {
                    value,
                    lease,
                    revision,
                    checked_gen,
                    touched: called,
                    ttl,
                },
            );
            return Ok(());
        }
        Err(BackendError::unavailable(
            "the shared lease expired twice while registering",
        ))
    }

    /// Deletes the registry entries on `lease` that their candidates have
    /// not registered in a whole ttl (a deregister that did not reach the
    /// server): the shared lease would keep them alive.
    async fn sweep_entries(&self, lease: i64, budget: Duration) {
        let now = Instant::now();
        let stale: Vec<((Key, LeaderId), Entry)> = lock(&self.inner.entries)
            .by_slot
            .iter()
            .filter(|(_, e)| e.lease == lease && e.untouched_since(now))
            .map(|(slot, e)| (slot.clone(), e.clone()))
            .collect();
        for ((key, id), entry) in stale {
            let name = self.candidate_key(&key, id);
            let txn = Txn::new()
                .when(vec![Compare::lease(name.clone(), CompareOp::Equal, lease)])
                .and_then(vec![TxnOp::delete(name, None)]);
            if self.txn(txn, budget).await.is_ok() {
                tracing::debug!(%key, candidate = %id, "deleted a registry entry no longer registered");
                let mut entries = lock(&self.inner.entries);
                let slot = (key, id);
                if entries
                    .by_slot
                    .get(&slot)
                    .is_some_and(|e| e.revision == entry.revision && e.untouched_since(now))
                {
                    entries.by_slot.remove(&slot);
                }
            }
        }
    }

    /// A watch event on a registry entry: forget an entry of ours that
    /// someone else deleted or overwrote (or that went with its lease), so
    /// that the next register puts it again.
    fn on_candidate_event(&self, slot: (Key, LeaderId), kv: &KeyValue, deleted: bool) {
        let mut entries = lock(&self.inner.entries);
        entries.last_event = entries.last_event.max(kv.mod_revision());
        let stale = entries.by_slot.get(&slot).is_some_and(|e| {
            kv.mod_revision() > e.revision
                && (deleted || kv.lease() != e.lease || kv.value() != e.value.as_ref())
        });
        if stale {
            entries.by_slot.remove(&slot);
        }
    }

    async fn acquire_inner(
        &self,
        key: &Key,
        claim: &Claim,
        ttl: Duration,
        budget: Duration,
    ) -> Result<Acquired, BackendError> {
        let called = Instant::now();
        if ttl_secs(ttl) > MAX_LEASE_TTL_SECS {
            return Err(BackendError::Unsupported {
                what: format!("a ttl of {ttl:?}"),
                needed: format!("at most {MAX_LEASE_TTL_SECS} s, etcd's longest lease"),
            });
        }
        let keeper = self.keeper(ttl);
        let mut swept = false;
        // Three rounds at most: a lease that expired between its keep-alive
        // and the put is replaced once, and a key an abandoned acquire of
        // ours left is deleted once, each followed by another try.
        for _ in 0..3 {
            // A lease confirmed by a request sent after this call began
            // lives a ttl from then at least: so does the key bound to it.
            let lease = match keeper.confirm(self, called).await {
                Outcome::Alive(id, _) => id,
                Outcome::Gone(_) => continue,
                Outcome::Failed(message, transient) => return Err(failed(message, transient)),
            };
            let generation = self.generation();
            // Recorded before the put: if the reply is lost, the sweep
            // still finds the key should its campaign give it up. An entry
            // under another nonce is one the campaign gave up (it acquires
            // only when it does not lead): kept aside, since that acquire
            // may have written the key.
            let replaced = lock(&self.inner.held).insert(
                key.clone(),
                Held {
                    nonce: claim.nonce,
                    lease,
                    create_rev: None,
                    checked_gen: generation,
                    touched: called,
                    ttl,
                },
            );
            if let Some(old) = replaced.filter(|old| old.nonce != claim.nonce) {
                let mut abandoned = lock(&self.inner.abandoned);
                if !abandoned
                    .iter()
                    .any(|(k, h)| k == key && h.nonce == old.nonce)
                {
                    abandoned.push((key.clone(), old));
                }
            }
            let name = self.lease_key(key);
            let value = LeaseValue {
                token: None,
                ..claim.value(FencingToken::new(0))
            }
            .encode();
            let txn = Txn::new()
                .when(vec![
                    Compare::create_revision(name.clone(), CompareOp::Equal, 0),
                    Compare::create_revision(self.inner.epoch_key.clone(), CompareOp::Greater, 0),
                    Compare::create_revision(self.inner.fresh_key.clone(), CompareOp::Equal, 0),
                ])
                .and_then(vec![
                    TxnOp::put(
                        name.clone(),
                        value,
                        Some(PutOptions::new().with_lease(lease)),
                    ),
                    TxnOp::get(self.inner.epoch_key.clone(), None),
                ])
                .or_else(vec![
                    TxnOp::get(name.clone(), None),
                    TxnOp::get(self.inner.epoch_key.clone(), None),
                    TxnOp::get(self.inner.fresh_key.clone(), None),
                ]);
            let reply = match self.txn_raw(txn, budget).await? {
                Ok(reply) => reply,
                Err(e) if lease_gone(&e) => {
                    // Expired between the keep-alive and the put (nothing
                    // was written): grant a new one.
                    self.forget(key, claim.nonce);
                    let mut state = lock(&keeper.state);
                    if state.lease == Some(lease) {
                        state.lease = None;
                        state.confirmed = None;
                    }
                    continue;
                }
                Err(e) => return Err(error(e)),
            };
            if reply.succeeded() {
                let rev = reply.header().map_or(0, |h| h.revision());
                let base = self.base_of(ranges(&reply).next().flatten().as_ref());
                let token = base.and_then(|b| self.token(b, rev));
                let Some(token) = token else {
                    return Err(BackendError::Misconfigured {
                        problem: format!(
                            "the epoch marker {} does not hold a number",
                            self.inner.epoch_key
                        ),
                        fix: format!(
                            "delete {} and {} (etcdctl del), and let the next acquire write them",
                            self.inner.epoch_key, self.inner.fresh_key
                        ),
                    });
                };
                if let Some(held) = lock(&self.inner.held).get_mut(key)
                    && held.nonce == claim.nonce
                {
                    held.create_rev = Some(rev);
                }
                return Ok(Acquired::Won(Lease::new(
                    claim,
                    token,
                    u64::try_from(rev).unwrap_or(0),
                )));
            }
            self.forget(key, claim.nonce);
            let mut gets = ranges(&reply);
            let (kv, epoch, fresh) = (
                gets.next().flatten(),
                gets.next().flatten(),
                gets.next().flatten(),
            );
            if let Some(kv) = kv {
                if !swept && let Some(old) = self.abandoned_and_stale(key, &kv) {
                    // Our own key, written by an acquire the campaign gave
                    // up a ttl ago or more: delete it and try again.
                    swept = true;
                    if self
                        .delete_created(key, kv.create_revision(), budget)
                        .await
                        .is_ok()
                    {
                        tracing::info!(%key, "deleted a key an abandoned acquire had written");
                        self.drop_abandoned(key, old.nonce);
                        continue;
                    }
                }
                let base = self.base_of(epoch.as_ref());
                return Ok(Acquired::Held(self.holder_of(&kv, base, budget).await));
            }
            if epoch.is_none() {
                self.plant_epoch(ttl, budget.saturating_sub(called.elapsed()))
                    .await?;
                return Ok(Acquired::Held(Holder::foreign(0, Some(ttl))));
            }
            let hint = match fresh {
                Some(fresh) => self.hint(fresh.lease(), budget).await,
                None => Some(ttl),
            };
            return Ok(Acquired::Held(Holder::foreign(0, hint)));
        }
        Err(BackendError::unavailable(
            "the shared lease expired twice while acquiring",
        ))
    }

    async fn renew_inner(
        &self,
        key: &Key,
        lease: &Lease,
        ttl: Duration,
        budget: Duration,
    ) -> Result<Renewed, BackendError> {
        let called = Instant::now();
        let nonce = lease.nonce();
        let mut held = match self.held(key, nonce) {
            Some(held) => held,
            None => match self.check(key, nonce, budget).await? {
                Some(held) => held,
                None => return Ok(Renewed::Lost),
            },
        };
        if held.create_rev.is_none() || !self.watch_up() || held.checked_gen != self.generation() {
            // The watch cannot vouch for the key: read it.
            held = match self.check(key, nonce, budget).await? {
                Some(held) => held,
                None => return Ok(Renewed::Lost),
            };
        }
        if let Some(h) = lock(&self.inner.held).get_mut(key)
            && h.nonce == nonce
        {
            h.touched = called;
            h.ttl = ttl;
        }
        let keeper = self.keeper(ttl);
        let not_before = called.checked_sub(ttl / SHARE_FRACTION).unwrap_or(called);
        match keeper.confirm(self, not_before).await {
            Outcome::Alive(id, sent) if id == held.lease => {
                // Still bound? The watch would have dropped the entry.
                if self.held(key, nonce).is_none() {
                    return Ok(Renewed::Lost);
                }
                Ok(Renewed::SentAt(lease.clone(), sent))
            }
            // The key's lease is gone (a new one was granted since).
            Outcome::Alive(..) | Outcome::Gone(_) => {
                self.forget(key, nonce);
                Ok(Renewed::Lost)
            }
            Outcome::Failed(message, transient) => Err(failed(message, transient)),
        }
    }

    async fn proclaim_inner(
        &self,
        key: &Key,
        lease: &Lease,
        metadata: &bytes::Bytes,
        ttl: Duration,
        budget: Duration,
    ) -> Result<Renewed, BackendError> {
        let called = Instant::now();
        let nonce = lease.nonce();
        // The key's binding as this backend knows it (read if unknown).
        // Unlike a renewal, no read when the watch cannot vouch for the
        // key: the transaction below compares the key itself.
        let mut held = match self.held(key, nonce) {
            Some(held) => held,
            None => match self.check(key, nonce, budget).await? {
                Some(held) => held,
                None => return Ok(Renewed::Lost),
            },
        };
        if held.create_rev.is_none() {
            held = match self.check(key, nonce, budget).await? {
                Some(held) => held,
                None => return Ok(Renewed::Lost),
            };
        }
        let Some(create_rev) = held.create_rev else {
            return Err(BackendError::unavailable(
                "the key's create revision is not known yet",
            ));
        };
        if let Some(h) = lock(&self.inner.held).get_mut(key)
            && h.nonce == nonce
        {
            h.touched = called;
            h.ttl = ttl;
        }
        // A keep-alive sent after this call began, as for an acquire (not
        // an earlier one, as a renewal may take): the put moves the key's
        // revision, and a read-back that sees it credits this call's own
        // send time.
        let keeper = self.keeper(ttl);
        match keeper.confirm(self, called).await {
            Outcome::Alive(id, _) if id == held.lease => {}
            // The key's lease is gone (a new one was granted since).
            Outcome::Alive(..) | Outcome::Gone(_) => {
                self.forget(key, nonce);
                return Ok(Renewed::Lost);
            }
            Outcome::Failed(message, transient) => return Err(failed(message, transient)),
        }
        let name = self.lease_key(key);
        let proclaimed = lease.with_metadata(metadata.clone());
        let value = LeaseValue {
            token: None,
            ..proclaimed.value()
        }
        .encode();
        // Put only over the write the term last knew (its revision): a
        // proclaim that lands late, after a later one, then changes
        // nothing. A key still ours at another revision (an earlier
        // proclaim whose reply was lost) is written at that one.
        let mut expected = i64::try_from(lease.revision()).unwrap_or(0);
        for _ in 0..3 {
            let txn = Txn::new()
                .when(vec![
                    Compare::create_revision(name.clone(), CompareOp::Equal, create_rev),
                    Compare::lease(name.clone(), CompareOp::Equal, held.lease),
                    Compare::mod_revision(name.clone(), CompareOp::Equal, expected),
                ])
                .and_then(vec![TxnOp::put(
                    name.clone(),
                    value.to_vec(),
                    Some(PutOptions::new().with_lease(held.lease)),
                )])
                .or_else(vec![TxnOp::get(name.clone(), None)]);
            let reply = match self.txn_raw(txn, budget).await? {
                Ok(reply) => reply,
                Err(e) if lease_gone(&e) => {
                    // Gone since the keep-alive: so is the key.
                    self.forget(key, nonce);
                    let mut state = lock(&keeper.state);
                    if state.lease == Some(held.lease) {
                        state.lease = None;
                        state.confirmed = None;
                    }
                    return Ok(Renewed::Lost);
                }
                Err(e) => return Err(error(e)),
            };
            if reply.succeeded() {
                // The key's new revision, as holders will report it: the
                // term must know it, or a later read-back would take it for
                // a renewal of its own.
                let Some(rev) = reply
                    .header()
                    .and_then(|h| u64::try_from(h.revision()).ok())
                else {
                    return Err(BackendError::unavailable(
                        "a proclaim's reply had no revision",
                    ));
                };
                return Ok(Renewed::Renewed(proclaimed.with_revision(rev)));
            }
            match ranges(&reply).next().flatten() {
                Some(kv)
                    if kv.create_revision() == create_rev
                        && kv.lease() == held.lease
                        && LeaseValue::decode(kv.value()).is_ok_and(|v| v.nonce == nonce) =>
                {
                    expected = kv.mod_revision();
                }
                // Deleted, replaced, or rebound: not ours any more.
                _ => {
                    self.forget(key, nonce);
                    return Ok(Renewed::Lost);
                }
            }
        }
        Err(BackendError::unavailable(
            "the key kept changing under the proclaim",
        ))
    }

    /// Updates what the backend knows of its keys from one watch reply,
    /// and queues the events for the hub.
    fn on_watch(
        &self,
        reply: &etcd_client::WatchResponse,
        queue: &mut std::collections::VecDeque<WatchEvent>,
    ) {
        let mut last = 0;
        for event in reply.events() {
            let Some(kv) = event.kv() else { continue };
            last = last.max(kv.mod_revision());
            let Ok(name) = std::str::from_utf8(kv.key()) else {
                continue;
            };
            if name == self.inner.fresh_key || name == self.inner.epoch_key {
                // A new epoch, or the wait after one is over.
                if name == self.inner.epoch_key {
                    self.inner.base.store(0, Ordering::Relaxed);
                }
                queue.push_back(WatchEvent::Resync);
                continue;
            }
            let deleted = event.event_type() == EventType::Delete;
            if let Some(entry) = name.strip_prefix(&self.inner.cand_prefix) {
                // A registry entry, never a lease: added, rewritten,
                // deleted, or gone with its lease.
                if let Some((key, id)) = parse_candidate_name(entry) {
                    self.on_candidate_event((key.clone(), id), kv, deleted);
                    queue.push_back(WatchEvent::Candidates(key));
                }
                continue;
            }
            let Some(key) = name
                .strip_prefix(&self.inner.lease_prefix)
                .and_then(|k| Key::new(k).ok())
            else {
                continue;
            };
            {
                let mut held = lock(&self.inner.held);
                if let Some(h) = held.get(&key) {
                    let ours = !deleted
                        && kv.lease() == h.lease
                        && LeaseValue::decode(kv.value()).is_ok_and(|v| v.nonce == h.nonce);
                    // A pending acquire is settled by its own reply or read.
                    let after = h.create_rev.is_some_and(|rev| kv.mod_revision() > rev);
                    if !ours && after {
                        // Deleted or overwritten: the next renewal reads it.
                        held.remove(&key);
                    }
                }
            }
            if deleted {
                queue.push_back(WatchEvent::Released(key));
            } else {
                // No hint: the watch reports the deletion when the lease
                // ends. The token needs the epoch base, which an event
                // does not carry: the last one read, if any.
                let revision = u64::try_from(kv.mod_revision()).unwrap_or(0);
                let base = self.inner.base.load(Ordering::Relaxed);
                let holder = match LeaseValue::decode(kv.value()) {
                    Ok(value) if base > 0 => self
                        .token(base, kv.create_revision())
                        .map(|token| Holder::from_value(&value, Some(token), revision, None)),
                    Ok(_) => None,
                    Err(_) => Some(Holder::foreign(revision, None)),
                };
                queue.push_back(WatchEvent::Updated(key, holder));
            }
        }
        if let Some(header) = reply.header() {
            last = last.max(header.revision());
        }
        if last > 0 {
            self.inner.watch.revision.fetch_max(last, Ordering::AcqRel);
        }
    }
}

/// `major.minor` of a version string such as `3.5.17`.
fn parse_version(version: &str) -> Option<(u32, u32)> {
    let mut parts = version.trim().split('.');
    let major = parts.next()?.parse().ok()?;
    let minor = parts
        .next()?
        .chars()
        .take_while(char::is_ascii_digit)
        .collect::<String>()
        .parse()
        .ok()?;
    Some((major, minor))
}

/// Whether etcd `version` has the bug fixed in 3.4.31 and 3.5.13: a Raft
/// leader that stalled and lost its leadership still revokes the leases
/// its stale clock thinks expired, and the new leader commits the revoke
/// (etcd-io/etcd#15247, fixed by etcd-io/etcd#17425 and #17465).
fn stale_leader_revokes(version: &str) -> bool {
    let patch = version
        .trim()
        .split('.')
        .nth(2)
        .and_then(|p| {
            p.chars()
                .take_while(char::is_ascii_digit)
                .collect::<String>()
                .parse::<u32>()
                .ok()
        })
        .unwrap_or(0);
    match parse_version(version) {
        Some((3, 4)) => patch < 31,
        Some((3, 5)) => patch < 13,
        Some((3, minor)) => minor < 4,
        _ => false,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn whole_second_ttls_round_up() {
        assert_eq!(ttl_secs(Duration::from_millis(1)), 1);
        assert_eq!(ttl_secs(Duration::from_secs(1)), 1);
        assert_eq!(ttl_secs(Duration::from_millis(1001)), 2);
        assert_eq!(ttl_secs(Duration::from_secs(10)), 10);
        assert_eq!(ttl_secs(Duration::MAX), i64::MAX);
    }

    #[test]
    fn registry_names_keep_keys_apart() {
        let backend = EtcdBackend::builder().endpoint("h:1").build().unwrap();
        let id = LeaderId::new();
        for key in ["a", "a/b", "a%2Fb", "%", "a/", "/", "x%25/%2F"] {
            let key = Key::new(key).unwrap();
            let name = backend.candidate_key(&key, id);
            let rest = name.strip_prefix("leaseholder/cand/").unwrap();
            assert_eq!(parse_candidate_name(rest), Some((key.clone(), id)), "{key}");
            // Nobody else's entries list under this key's prefix.
            let prefix = backend.candidates_prefix(&key);
            assert_eq!(prefix.matches('/').count(), 3, "{prefix}");
        }
        let a = backend.candidates_prefix(&Key::new("a").unwrap());
        let ab = backend.candidate_key(&Key::new("a/b").unwrap(), id);
        assert!(!ab.starts_with(&a), "{ab} lists under {a}");
        for junk in [
            "k",
            "k/",
            "k/xyz",
            "k/ABCDEF00000000000000000000000000",
            "%zz/00000000000000000000000000000000",
            "k/00000000000000000000000000000000/x",
        ] {
            assert_eq!(parse_candidate_name(junk), None, "{junk}");
        }
    }

    #[test]
    fn versions_parse() {
        assert_eq!(parse_version("3.4.23"), Some((3, 4)));
        assert_eq!(parse_version("3.6.0-rc.1"), Some((3, 6)));
        assert_eq!(parse_version("garbage"), None);
        assert!(stale_leader_revokes("3.4.23"));
        assert!(!stale_leader_revokes("3.4.31"));
        assert!(stale_leader_revokes("3.5.12"));
        assert!(!stale_leader_revokes("3.5.16"));
        assert!(!stale_leader_revokes("3.6.0-rc.1"));
    }

    #[test]
    fn bad_settings_are_refused_at_build() {
        let e = |b: EtcdBuilder| b.build().unwrap_err().to_string();
        assert!(e(EtcdBackend::builder()).contains("no endpoint"));
        assert!(e(EtcdBackend::builder().endpoint("")).contains("not host:port"));
        assert!(e(EtcdBackend::builder().endpoint("h:notaport")).contains("not host:port"));
        assert!(e(EtcdBackend::builder().endpoint("http://h:1/x")).contains("not host:port"));
        assert!(e(EtcdBackend::builder().endpoint("https://h:1")).contains("TLS"));
        assert!(e(EtcdBackend::builder().endpoint("h:1").prefix("")).contains("empty"));
        assert!(e(EtcdBackend::builder().endpoint("h:1").prefix("a/")).contains("ends with"));
        assert!(e(EtcdBackend::builder().endpoint("h:1").prefix("a\nb")).contains("control"));
        assert!(
            e(EtcdBackend::builder()
                .endpoint("h:1")
                .prefix("x".repeat(129)))
            .contains("limit")
        );
        assert!(
            e(EtcdBackend::builder()
                .endpoint("h:1")
                .connect_timeout(Duration::ZERO))
            .contains("connect_timeout")
        );
        assert!(e(EtcdBackend::builder().endpoint("h:1").user("", "pw")).contains("user"));
        let ok = EtcdBackend::builder()
            .endpoints(["127.0.0.1:2379", "http://[::1]:2379", "localhost:1"])
            .prefix("a/b")
            .build()
            .unwrap();
        assert_eq!(ok.lease_key(&Key::new("k").unwrap()), "a/b/lease/k");
        assert_eq!(ok.epoch_key(), "a/b/epoch");
        assert_eq!(ok.fresh_key(), "a/b/fresh");
    }
}
