//! NATS JetStream KV (feature `nats`, nats-server 2.11 or newer).
//!
//! How the lease contract maps onto a KV bucket:
//!
//! | op | on the bucket |
//! |---|---|
//! | setup | check the server version (per-message TTL needs 2.11); create the bucket's stream with per-message TTL and expiry markers, seeding its first sequence from the wall clock in microseconds so a re-created bucket still issues larger tokens; or validate an existing one |
//! | acquire | read the key; if a live value is there it is held. Else publish with `Nats-TTL` and `Nats-Expected-Last-Subject-Sequence` (0, or the revision of the delete or expiry marker) — never `create_with_ttl`, which drops the TTL after a marker |
//! | renew | read the key: only a message with our nonce is renewed, by publishing with `Nats-TTL` on its revision (a newer one after a lost reply); anything else is `Lost` |
//! | proclaim | as renew, publishing the value with the new metadata (and the token) in the same compare-and-set on the revision read: one read and one publish |
//! | release | read the key; if the message has our nonce, delete on its revision (compare-and-delete); the marker keeps the sequence moving |
//! | token | the stream sequence of the acquiring publish, carried in the value from the first renewal on |
//! | holder | read the key; a value is the holder (undecodable: a foreign lease, e.g. noleader's), with an expiry hint from the message's server timestamp and its `Nats-TTL` |
//! | watch | one wildcard KV watch per backend; a value is `Updated`, a delete or expiry marker is `Released` |
//! | registry bucket | a second bucket, `<bucket>_candidates` (stream `KV_<bucket>_candidates`), found or created on the first registry call (never by setup, so a deployment without the registry needs no new permissions): one replica, per-message TTL, direct gets, one message per subject; an existing one is checked likewise (and refused if it is a lease bucket of that name) |
//! | register | publish the encoded [`Candidate`] to `$KV.<bucket>_candidates.<key>.<id as 32 hex>` with `Nats-TTL` = ttl rounded up to whole seconds: a rewrite replaces the message; an entry not written again is removed by the server at its TTL |
//! | deregister | publish an empty `KV-Operation: DEL` marker with `Nats-TTL: 1s` on the entry's subject: it replaces the entry and is itself gone a second later |
//! | candidates | one batched direct get, `{"multi_last": ["$KV.<bucket>_candidates.<key>.*"]}`: the last message of each subject of the key, ended by the server's end-of-batch; markers and values that do not decode are left out |
//! | candidate | the same batched direct get, of the one subject `<key>.<id>` |
//! | registry events | none: every rewrite of an entry looks the same to a watcher, so a watch would bring every candidate's renewal to every leader; leaders read the registry once per renew interval instead |
//!
//! **The registry's subjects.** The key is followed by exactly one token,
//! the candidate id, and a key's listing filters on `<key>.*`: `*` matches
//! one token, so the list of key `a` (`a.*`) never includes key `a.b`'s
//! entries (`a.b.<id>`, three tokens), and no key's entries can be another
//! key's, since every subject's last token is the id and the tokens before
//! it are the key.
//!
//! **Why one replica.** Direct gets are answered by any replica of a
//! stream, and a replica can be behind the stream leader (until the next
//! heartbeat carries the commit), so on a replicated registry an entry
//! just written or removed could read as it was. The registry is advisory
//! and rewritten every renew interval: one replica (placed like the lease
//! bucket, with its storage type) reads back every acknowledged write. If
//! its server is down, registry calls fail and the campaigns go on without
//! priorities (a follower that cannot read the registry tries at once)
//! until it is back. A registry bucket made by hand with more replicas is
//! accepted, with that staleness. A deleted registry bucket is created
//! again on the next registry call: it holds no tokens.
//!
//! Every read goes to the stream's leader (`STREAM.MSG.GET`), never a
//! direct get: on a replicated bucket a replica may answer a direct get
//! from behind the leader, and a read right after a lost race would then
//! show the key as it was before. Writes are compare-and-set on the
//! subject's last sequence, so a stale read can cost a retry but never
//! safety; reading from the leader keeps it from costing the retry.
//!
//! **Errors.** A reply is classified by what it means, not by where it
//! came from:
//!
//! | the server says | error |
//! |---|---|
//! | no responders for a publish, or "stream not found", and the bucket's stream info confirms it is gone | [`Misconfigured`](BackendError::Misconfigured): the bucket was deleted; it is never re-created behind the user's back |
//! | no responders, but stream info does not confirm (a server restarting, a stream leader moving) | [`Unavailable`](BackendError::Unavailable), retried |
//! | a publish to a subject this user's permissions deny (nothing comes back: see below) | [`Denied`](BackendError::Denied), with a [`PublishDenied`] naming the subject |
//! | per-message TTL disabled (10166), `max_msgs` or `max_bytes` reached with discard new (10077), a message over `max_msg_size` (10054), a sealed stream (10109), an account or storage limit (10002, 10047, 10028) | [`Misconfigured`](BackendError::Misconfigured), saying what to change |
//! | anything else | [`Unavailable`](BackendError::Unavailable) |
//!
//! A publish the server refuses for lack of permission is answered only
//! with an asynchronous `-ERR 'Permissions Violation for Publish to ..'`
//! that goes to the client's event callback, never to the request, which
//! times out. So setup asks the server for the connection's permissions
//! (`$SYS.REQ.USER.INFO`, which nats-server answers for any user allowed
//! to publish there; verified on 2.15), every publish and read is checked
//! against them first, they are read again (in the background) after any
//! request that went unanswered, and again before a denial is reported.
//! A user who may not ask gets timeouts instead, retried as transient
//! errors: allow it `$SYS.REQ.USER.INFO` to have denials reported.
//!
//! **`max_age`.** A lease message lives its TTL from its last write, and
//! the stream's `max_age` counts from the same write, so a bucket whose
//! `max_age` is not 0 must keep a message at least as long as the TTL;
//! the rule is `max_age` 0 or at least [`MAX_AGE_TTL_FACTOR`] times the TTL
//! sent, leaving room for the TTL's rounding and the server's expiry
//! timer. One bucket serves leaders with different ttls, so setup only
//! records `max_age` (refusing one below 2 s, too short for any lease) and
//! each acquire and renewal checks it against its own ttl.
//!
//! The TTL sent is the ttl rounded up to whole seconds; the leader's
//! deadline uses the configured ttl, which is never longer. The expiry hint
//! compares the server's clock with ours, so it is only a hint: one that
//! has already passed by our clock is dropped, and followers learn of the
//! expiry from the watch (the server's expiry marker) anyway.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_nats::HeaderMap;
use async_nats::jetstream::context::{
    CreateStreamErrorKind, GetStreamErrorKind, PublishError, PublishErrorKind,
};
use async_nats::jetstream::stream::LastRawMessageErrorKind;
use async_nats::jetstream::{self, ErrorCode, kv, stream};
use bytes::Bytes;
use futures_util::StreamExt;
use tokio::sync::OnceCell;

use super::{
    Acquired, BackendEdge, Candidate, Claim, FencingToken, Holder, Key, LeaderId, Lease,
    LeaseValue, Prepared, Renewed, WatchEvent, WatchStream,
};
use crate::error::{BackendError, ConfigError};

/// The oldest nats-server with per-message TTL.
const MIN_VERSION: (u64, u64) = (2, 11);
/// How long expiry markers stay in the bucket.
const MARKER_TTL: Duration = Duration::from_secs(60);

/// A bucket's `max_age`, unless 0, must be at least this many times the
/// TTL a lease is written with (the ttl rounded up to whole seconds).
pub const MAX_AGE_TTL_FACTOR: u32 = 2;

/// What the candidate registry's bucket adds to the lease bucket's name:
/// the registry of bucket `leases` is bucket `leases_candidates`.
pub const CANDIDATES_SUFFIX: &str = "_candidates";

/// The description setup gives a lease bucket's stream.
const LEASES_DESCRIPTION: &str = "leaseholder leases";

/// How long a deregistered entry's delete marker stays (the shortest
/// `Nats-TTL`).
const DELETED_TTL: &str = "1s";

/// The most entries the server returns for one key in one batched read.
const MAX_LISTED: usize = 1024;

/// The rule for bucket names, as NATS KV states it.
pub const BUCKET_RULE: &str =
    "NATS KV bucket names use only A-Z a-z 0-9 - _ (no dots, spaces or wildcards)";

/// The server's answer to "what may this connection do".
const USER_INFO: &str = "$SYS.REQ.USER.INFO";

/// Bound on asking for [`USER_INFO`].
const USER_INFO_TIMEOUT: Duration = Duration::from_secs(1);

/// Checks a bucket name against [`BUCKET_RULE`].
///
/// ```
/// use leaseholder::backend::nats::validate_bucket;
/// assert!(validate_bucket("leases").is_ok());
/// assert!(validate_bucket("bad name!").is_err());
/// ```
pub fn validate_bucket(bucket: &str) -> Result<(), ConfigError> {
    if !bucket.is_empty()
        && bucket
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        return Ok(());
    }
    Err(ConfigError::Backend {
        backend: "nats",
        problem: format!("bucket name {bucket:?} is invalid: {BUCKET_RULE}"),
    })
}

/// The server refused a publish because this connection's user may not
/// publish to the subject: the source of a [`BackendError::Denied`] from
/// the NATS backend.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "NATS user {user} may not publish to {subject}: allow it in the user's publish permissions \
     (bucket {bucket} is written at $KV.{bucket}.>)"
)]
#[non_exhaustive]
pub struct PublishDenied {
    /// The subject refused.
    pub subject: String,
    /// The user, as the server names it (`?` if it did not).
    pub user: String,
    /// The bucket.
    pub bucket: String,
}

/// One direction's permissions: the subjects allowed (`None`: all) and
/// denied.
#[derive(Debug, Clone, Default)]
struct Rules {
    allow: Option<Vec<String>>,
    deny: Vec<String>,
}

impl Rules {
    fn from_json(value: Option<&serde_json::Value>) -> Rules {
        let list = |field: &str| -> Option<Vec<String>> {
            let items = value?.get(field)?.as_array()?;
            Some(
                items
                    .iter()
                    .filter_map(|s| s.as_str().map(str::to_owned))
                    .collect(),
            )
        };
        Rules {
            allow: list("allow").filter(|a| !a.is_empty()),
            deny: list("deny").unwrap_or_default(),
        }
    }

    fn permits(&self, subject: &str) -> bool {
        let matches = |pattern: &String| subject_matches(pattern, subject);
        self.allow.as_ref().is_none_or(|a| a.iter().any(matches)) && !self.deny.iter().any(matches)
    }
}

/// What `$SYS.REQ.USER.INFO` said about this connection.
#[derive(Debug, Clone)]
struct Permissions {
    user: String,
    publish: Rules,
}

impl Permissions {
    /// Parses the server's reply; `None` if it is not one.
    fn from_reply(payload: &[u8]) -> Option<Permissions> {
        let reply: serde_json::Value = serde_json::from_slice(payload).ok()?;
        let data = reply.get("data")?;
        let user = data
            .get("user")
            .and_then(|u| u.as_str())
            .unwrap_or("?")
            .to_owned();
        Some(Permissions {
            user,
            publish: Rules::from_json(data.get("permissions").and_then(|p| p.get("publish"))),
        })
    }
}

/// `true` if the literal `subject` matches `pattern` (`*` one token, `>`
/// the rest).
fn subject_matches(pattern: &str, subject: &str) -> bool {
    let mut pattern = pattern.split('.');
    let mut subject = subject.split('.');
    loop {
        match (pattern.next(), subject.next()) {
            (Some(">"), Some(_)) => return true,
            (Some(p), Some(s)) if p == "*" || p == s => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// Marks the backend's permissions as worth reading again if it is dropped
/// before [`answered`](Self::answered): the request went unanswered, which
/// is all a client sees of a publish refused for lack of permission.
struct Unanswered<'a> {
    flag: &'a AtomicBool,
    answered: bool,
}

impl<'a> Unanswered<'a> {
    fn new(flag: &'a AtomicBool) -> Self {
        Unanswered {
            flag,
            answered: false,
        }
    }

    fn answered(&mut self) {
        self.answered = true;
    }
}

impl Drop for Unanswered<'_> {
    fn drop(&mut self) {
        if !self.answered {
            self.flag.store(true, Ordering::Relaxed);
        }
    }
}

/// What every clone of a backend shares.
#[derive(Debug, Default)]
struct Shared {
    store: OnceCell<kv::Store>,
    /// The bucket's `max_age` as setup found it.
    max_age: OnceLock<Duration>,
    /// The registry bucket's `max_age`, once it has been found (or
    /// created) and checked; `None` before, and again after its stream
    /// went missing.
    registry: Mutex<Option<Duration>>,
    /// This connection's permissions; `None` while unknown.
    permissions: Mutex<Option<Permissions>>,
    /// A request went unanswered since the permissions were last read.
    unanswered: AtomicBool,
    /// The permissions are being read in the background.
    refreshing: AtomicBool,
    /// That background read (bounded by `USER_INFO_TIMEOUT`), aborted
    /// when the backend is dropped.
    refresh: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl Drop for Shared {
    fn drop(&mut self) {
        let task = self
            .refresh
            .get_mut()
            .unwrap_or_else(|poison| poison.into_inner())
            .take();
        if let Some(task) = task {
            task.abort();
        }
    }
}

/// The last message under a key.
struct Read {
    revision: u64,
    /// `None` for a delete, purge or expiry marker.
    value: Option<Bytes>,
    expires_in: Option<Duration>,
}

/// Parses a `Nats-TTL` header: whole seconds, or a Go duration such as
/// `10s`, `1m30s`, `1500ms`. `never` and anything unparsable are `None`.
fn parse_ttl(text: &str) -> Option<Duration> {
    let text = text.trim();
    if let Ok(secs) = text.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let mut total = Duration::ZERO;
    let mut rest = text;
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .filter(|&n| n > 0)?;
        let number: f64 = rest[..digits].parse().ok()?;
        rest = &rest[digits..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let scale = match &rest[..unit_len] {
            "h" => 3600.0,
            "m" => 60.0,
            "s" => 1.0,
            "ms" => 1e-3,
            "us" | "µs" => 1e-6,
            "ns" => 1e-9,
            _ => return None,
        };
        rest = &rest[unit_len..];
        total = total.checked_add(Duration::try_from_secs_f64(number * scale).ok()?)?;
    }
    (!total.is_zero()).then_some(total)
}

/// A NATS JetStream KV bucket as a lease store.
#[derive(Clone, Debug)]
pub struct NatsBackend {
    client: async_nats::Client,
    js: jetstream::Context,
    bucket: String,
    shared: Arc<Shared>,
}

/// A [`NatsBackend`] that does not keep its shared state alive.
struct WeakNats {
    client: async_nats::Client,
    js: jetstream::Context,
    bucket: String,
    shared: std::sync::Weak<Shared>,
}

impl WeakNats {
    fn upgrade(&self) -> Option<NatsBackend> {
        Some(NatsBackend {
            client: self.client.clone(),
            js: self.js.clone(),
            bucket: self.bucket.clone(),
            shared: self.shared.upgrade()?,
        })
    }
}

impl NatsBackend {
    fn weak(&self) -> WeakNats {
        WeakNats {
            client: self.client.clone(),
            js: self.js.clone(),
            bucket: self.bucket.clone(),
            shared: Arc::downgrade(&self.shared),
        }
    }

    /// A backend on `bucket`, created by [`setup`](BackendEdge::setup) if
    /// missing.
    ///
    /// An invalid bucket name (see [`BUCKET_RULE`]) is reported by
    /// [`LeaderBuilder::build`](crate::LeaderBuilder::build) (as
    /// [`ConfigError::Backend`]) and by setup; [`try_new`](Self::try_new)
    /// reports it at once.
    pub fn new(client: async_nats::Client, bucket: &str) -> NatsBackend {
        NatsBackend {
            js: jetstream::new(client.clone()),
            client,
            bucket: bucket.to_owned(),
            shared: Default::default(),
        }
    }

    /// Like [`new`](Self::new), but fails if `bucket` breaks
    /// [`BUCKET_RULE`].
    pub fn try_new(client: async_nats::Client, bucket: &str) -> Result<NatsBackend, ConfigError> {
        validate_bucket(bucket)?;
        Ok(NatsBackend::new(client, bucket))
    }

    /// The stream setup creates for a missing bucket.
    fn stream_config(&self) -> stream::Config {
        stream::Config {
            name: self.stream_name(),
            description: Some(LEASES_DESCRIPTION.into()),
            subjects: vec![format!("$KV.{}.>", self.bucket)],
            max_messages_per_subject: 1,
            allow_rollup: true,
            deny_delete: true,
            allow_direct: true,
            discard: stream::DiscardPolicy::New,
            allow_message_ttl: true,
            subject_delete_marker_ttl: Some(MARKER_TTL),
            // A re-created bucket still issues larger tokens than any
            // earlier one: sequences start at the wall clock in µs.
            first_sequence: Some(now_micros()),
            ..Default::default()
        }
    }

    /// The bucket's settings as [`setup`](BackendEdge::setup) would create
    /// it, one `name: value` per line, for operators (`leaseholder setup
    /// --dry-run`) and for creating the bucket by hand. `first_seq` is the
    /// current Unix time in microseconds.
    pub fn bucket_settings(&self) -> String {
        let c = self.stream_config();
        format!(
            "bucket: {}\nstream: {}\nsubjects: {}\nmax_msgs_per_subject: {} (history 1)\n\
             discard: new\nallow_rollup_hdrs: true\ndeny_delete: true\nallow_direct: true\n\
             allow_msg_ttl: true\nsubject_delete_marker_ttl: {}s\nmax_age: 0 (or at least \
             {MAX_AGE_TTL_FACTOR} x the longest lease ttl)\nfirst_seq: {}\n",
            self.bucket,
            c.name,
            c.subjects.join(", "),
            c.max_messages_per_subject,
            MARKER_TTL.as_secs(),
            c.first_sequence.unwrap_or(1),
        )
    }

    fn subject(&self, key: &Key) -> String {
        format!("$KV.{}.{}", self.bucket, key)
    }

    fn stream_name(&self) -> String {
        format!("KV_{}", self.bucket)
    }

    /// Reads this connection's permissions from the server, if it answers.
    async fn read_permissions(&self) {
        let reply = tokio::time::timeout(
            USER_INFO_TIMEOUT,
            self.client.request(USER_INFO, Bytes::new()),
        )
        .await;
        let found = match reply {
            Ok(Ok(message)) => Permissions::from_reply(&message.payload),
            _ => None,
        };
        tracing::debug!(bucket = %self.bucket, permissions = ?found, "NATS permissions");
        if found.is_some() {
            *self.permissions() = found;
        }
    }

    fn permissions(&self) -> std::sync::MutexGuard<'_, Option<Permissions>> {
        self.shared
            .permissions
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// The denial of a publish to `subject`, if the permissions say so.
    fn denial(&self, subject: &str) -> Option<BackendError> {
        let permissions = self.permissions();
        let p = permissions.as_ref()?;
        (!p.publish.permits(subject)).then(|| {
            BackendError::denied(PublishDenied {
                subject: subject.to_owned(),
                user: p.user.clone(),
                bucket: self.bucket.clone(),
            })
        })
    }

    /// Reads the permissions again in the background if a request went
    /// unanswered since they were last read: the next call sees the result.
    /// Never in line, which would add a round trip to the call after every
    /// timeout (on a slow link, enough to make that call time out too).
    fn refresh_if_unanswered(&self) {
        if self.shared.unanswered.swap(false, Ordering::Relaxed)
            && !self.shared.refreshing.swap(true, Ordering::Relaxed)
        {
            // A weak handle: the read must not keep a dropped backend alive.
            let this = self.weak();
            let task = tokio::spawn(async move {
                if let Some(this) = this.upgrade() {
                    this.read_permissions().await;
                    this.shared.refreshing.store(false, Ordering::Relaxed);
                }
            });
            *self
                .shared
                .refresh
                .lock()
                .unwrap_or_else(|poison| poison.into_inner()) = Some(task);
        }
    }

    /// `Denied` if this connection may not publish to `subject`, by the
    /// permissions last read; they are read again (in line) before a
    /// denial is reported, since they may have been widened since.
    async fn check_publish(&self, subject: &str) -> Result<(), BackendError> {
        self.refresh_if_unanswered();
        if self.denial(subject).is_none() {
            return Ok(());
        }
        self.read_permissions().await;
        self.denial(subject).map_or(Ok(()), Err)
    }

    async fn store(&self) -> Result<&kv::Store, BackendError> {
        self.shared
            .store
            .get_or_try_init(|| async {
                match self.js.get_key_value(&self.bucket).await {
                    Ok(store) => Ok(store),
                    // The bucket's stream may be missing: say so if it is.
                    Err(e) if e.kind() == jetstream::context::KeyValueErrorKind::GetBucket => {
                        Err(match self.confirm_missing().await {
                            BackendError::Misconfigured { .. } => BackendError::Misconfigured {
                                problem: format!(
                                    "bucket {} does not exist (its stream {} is missing: never \
                                     created, or deleted)",
                                    self.bucket,
                                    self.stream_name()
                                ),
                                fix: "create it with setup() (a new Leader or Backend runs it; \
                                      so does `leaseholder setup`)"
                                    .into(),
                            },
                            other => other,
                        })
                    }
                    Err(e) => Err(BackendError::unavailable(e)),
                }
            })
            .await
    }

    /// The key's last message, read from the stream leader.
    ///
    /// Not a direct get: on a replicated stream any replica answers those,
    /// and a replica can be behind the leader, so right after a lost race
    /// it would show the state from before it. The leader's `MSG.GET`
    /// sees every write that has been acknowledged.
    async fn entry(&self, key: &Key) -> Result<Option<Read>, BackendError> {
        let store = self.store().await?;
        let api = format!("$JS.API.STREAM.MSG.GET.{}", self.stream_name());
        self.check_publish(&api).await?;
        let mut waiting = Unanswered::new(&self.shared.unanswered);
        let message = match store
            .stream
            .get_last_raw_message_by_subject(&self.subject(key))
            .await
        {
            Ok(message) => message,
            Err(e) => {
                return match e.kind() {
                    LastRawMessageErrorKind::NoMessageFound => {
                        waiting.answered();
                        Ok(None)
                    }
                    LastRawMessageErrorKind::JetStream(js)
                        if js.error_code() == ErrorCode::STREAM_NOT_FOUND =>
                    {
                        waiting.answered();
                        Err(self.confirm_missing().await)
                    }
                    LastRawMessageErrorKind::JetStream(_) => {
                        waiting.answered();
                        Err(BackendError::unavailable(e))
                    }
                    // A timeout (perhaps a denied request) or a broken
                    // connection: the permissions are read again before
                    // the next call (`waiting` marks it unanswered).
                    _ => Err(BackendError::unavailable(e)),
                };
            }
        };
        waiting.answered();
        let headers = &message.headers;
        let is_put = match headers.get("KV-Operation").map(|op| op.as_str()) {
            Some("DEL" | "PURGE") => false,
            // An operation we do not know: someone's value, a foreign lease.
            Some(_) => true,
            None => headers.get("Nats-Marker-Reason").is_none(),
        };
        // The server stamps the message with its clock; with the TTL header
        // that says when it expires, as far as our clock agrees with the
        // server's. A hint that has already passed by our clock is dropped
        // rather than trusted (the follower falls back to its retry timer).
        let expires_in = headers
            .get("Nats-TTL")
            .and_then(|ttl| parse_ttl(ttl.as_str()))
            .and_then(|ttl| {
                let stamped =
                    Duration::from_nanos(u64::try_from(message.time.unix_timestamp_nanos()).ok()?);
                let now = SystemTime::now().duration_since(UNIX_EPOCH).ok()?;
                let left = (stamped + ttl).checked_sub(now)?;
                (!left.is_zero()).then_some(left.min(ttl))
            });
        Ok(Some(Read {
            revision: message.sequence,
            value: is_put.then_some(message.payload),
            expires_in,
        }))
    }

    /// Publishes `value` under `key` with a TTL, if the key's last message
    /// is `expected` (0: none). `Ok(None)` on a sequence mismatch.
    async fn publish(
        &self,
        key: &Key,
        value: Bytes,
        ttl: Duration,
        expected: u64,
    ) -> Result<Option<u64>, BackendError> {
        self.check_max_age(ttl)?;
        let mut headers = HeaderMap::new();
        headers.insert("Nats-TTL", format!("{}s", ttl_secs(ttl)).as_str());
        headers.insert(
            "Nats-Expected-Last-Subject-Sequence",
            expected.to_string().as_str(),
        );
        self.publish_raw(self.subject(key), headers, value).await
    }

    /// Publishes and classifies the reply. `Ok(None)` on a sequence
    /// mismatch.
    async fn publish_raw(
        &self,
        subject: String,
        headers: HeaderMap,
        value: Bytes,
    ) -> Result<Option<u64>, BackendError> {
        self.check_publish(&subject).await?;
        let ack = self
            .js
            .publish_with_headers(subject.clone(), headers, value)
            .await
            .map_err(BackendError::unavailable)?;
        let mut waiting = Unanswered::new(&self.shared.unanswered);
        let result = ack.await;
        if !matches!(&result, Err(e) if e.kind() == PublishErrorKind::TimedOut) {
            waiting.answered();
        }
        drop(waiting);
        match result {
            Ok(ack) => Ok(Some(ack.sequence)),
            Err(e) if lost_race(&e) => Ok(None),
            // No responders: the bucket's stream is gone, or not there
            // yet on a server that is restarting or electing a leader.
            Err(e) if e.kind() == PublishErrorKind::StreamNotFound => {
                Err(self.confirm_missing().await)
            }
            // Unanswered: a publish refused for lack of permission looks
            // like this (the server's -ERR goes to the client's event
            // callback, not to the request).
            Err(e) if e.kind() == PublishErrorKind::TimedOut => {
                self.shared.unanswered.store(false, Ordering::Relaxed);
                self.read_permissions().await;
                Err(self
                    .denial(&subject)
                    .unwrap_or_else(|| BackendError::unavailable(e)))
            }
            Err(e) => Err(self.classify(e, &self.bucket, &self.stream_name(), "a lease")),
        }
    }

    /// A publish error the server answered with a JetStream error code:
    /// settings that break the contract are `Misconfigured`, saying what
    /// to change; anything else is transient. `what` was published to
    /// `bucket`, whose stream is `stream`.
    fn classify(&self, e: PublishError, bucket: &str, stream: &str, what: &str) -> BackendError {
        let Some(js) =
            std::error::Error::source(&e).and_then(|s| s.downcast_ref::<jetstream::Error>())
        else {
            return BackendError::unavailable(e);
        };
        let (code, text) = (js.error_code(), js.to_string());
        let fix = |fix: String| BackendError::Misconfigured {
            problem: format!("bucket {bucket}: the server refused {what}: {text}"),
            fix,
        };
        match code {
            ErrorCode::MESSAGE_TTL_DISABLED => fix(format!(
                "per-message TTL is off on stream {stream} (was the bucket re-created by hand?): \
                 delete the bucket and let setup() create it, or create its stream with \
                 allow_msg_ttl and subject_delete_marker_ttl"
            )),
            ErrorCode::STREAM_STORE_FAILED if text.contains("maximum") => fix(format!(
                "stream {stream} reached its max_msgs or max_bytes limit and discards new \
                 messages: set max_msgs and max_bytes to -1 (unlimited) on it, or raise them \
                 well above one message per key"
            )),
            ErrorCode::STREAM_MESSAGE_EXCEEDS_MAXIMUM
            | ErrorCode::STREAM_HEADER_EXCEEDS_MAXIMUM => fix(format!(
                "{what} is larger than stream {stream}'s max_msg_size: set max_msg_size to -1, \
                     or at least 4 KiB"
            )),
            ErrorCode::STREAM_SEALED => fix(format!(
                "stream {stream} is sealed and takes no writes: delete the bucket and let setup() \
                 create it, or use a new bucket"
            )),
            ErrorCode::ACCOUNT_RESOURCES_EXCEEDED
            | ErrorCode::STORAGE_RESOURCES_EXCEEDED
            | ErrorCode::MEMORY_RESOURCES_EXCEEDED => fix(
                "the account's JetStream limits are reached: raise the account's max_file / \
                 max_mem or free space in its other streams"
                    .into(),
            ),
            _ => BackendError::unavailable(e),
        }
    }

    /// Refuses a `ttl` that the bucket's `max_age` would cut short.
    fn check_max_age(&self, ttl: Duration) -> Result<(), BackendError> {
        let Some(&max_age) = self.shared.max_age.get() else {
            return Ok(());
        };
        let sent = Duration::from_secs(ttl_secs(ttl));
        let least = sent * MAX_AGE_TTL_FACTOR;
        if max_age.is_zero() || max_age >= least {
            return Ok(());
        }
        Err(BackendError::Misconfigured {
            problem: format!(
                "bucket {}: max_age is {max_age:?}, below {MAX_AGE_TTL_FACTOR} x the lease ttl \
                 {ttl:?} (sent as {sent:?}): the server could drop a live lease",
                self.bucket
            ),
            fix: format!(
                "set max_age on stream {} to 0 or at least {least:?}, or use a ttl of at most {:?}",
                self.stream_name(),
                max_age / MAX_AGE_TTL_FACTOR
            ),
        })
    }

    /// A publish found no responders, or a read no stream: the bucket is
    /// gone only if its stream info says so. Anything else (a server
    /// restarting, a stream leader moving) is transient.
    async fn confirm_missing(&self) -> BackendError {
        let info = format!("$JS.API.STREAM.INFO.{}", self.stream_name());
        if let Err(denied) = self.check_publish(&info).await {
            return denied;
        }
        match self.js.get_stream(self.stream_name()).await {
            Err(e) => match e.kind() {
                GetStreamErrorKind::JetStream(js)
                    if js.error_code() == ErrorCode::STREAM_NOT_FOUND =>
                {
                    self.bucket_missing()
                }
                _ => BackendError::unavailable(e),
            },
            Ok(_) => BackendError::unavailable(
                "no responders for the bucket's subjects, though its stream exists \
                 (a server restarting or a stream leader moving?)",
            ),
        }
    }

    /// The bucket was there at setup and is gone: someone deleted it. It is
    /// not created again behind the user's back.
    fn bucket_missing(&self) -> BackendError {
        BackendError::Misconfigured {
            problem: format!(
                "bucket {} was deleted (its stream {} does not exist)",
                self.bucket,
                self.stream_name()
            ),
            fix: "create it again with setup() (a new Leader or Backend runs it; its first \
                  acquire waits one ttl), then restart the campaigns"
                .into(),
        }
    }

    /// Renew (and, for a proclaim, `lease` carries the new metadata):
    /// rewrites the key's message with `lease`'s value and a fresh TTL.
    /// The revision alone does not prove ownership: read the key and
    /// rewrite only the message with our nonce, on its revision (a newer
    /// one if an earlier renewal's reply was lost). A message that expired
    /// or was replaced in between has a marker or another message after
    /// it, so the compare-and-set refuses the write: it never resurrects
    /// a lease.
    async fn rewrite(
        &self,
        key: &Key,
        lease: &Lease,
        ttl: Duration,
        what: &str,
    ) -> Result<Renewed, BackendError> {
        for _ in 0..2 {
            let revision = match self.entry(key).await?.as_ref().and_then(Self::holder) {
                Some(h) if h.is_nonce(lease.nonce()) => h.revision(),
                _ => return Ok(Renewed::Lost),
            };
            if let Some(seq) = self
                .publish(key, lease.value().encode(), ttl, revision)
                .await?
            {
                return Ok(Renewed::Renewed(lease.with_revision(seq)));
            }
        }
        Err(BackendError::unavailable(format!(
            "the key kept changing during {what}"
        )))
    }

    fn holder(read: &Read) -> Option<Holder> {
        let value = read.value.as_ref()?;
        let holder = Holder::decode(value, None, read.revision, read.expires_in);
        if holder.is_foreign() || holder.token().is_some() {
            return Some(holder);
        }
        // Not renewed yet: the token is the acquiring revision.
        Some(Holder::decode(
            value,
            Some(FencingToken::new(read.revision)),
            read.revision,
            read.expires_in,
        ))
    }

    async fn check_version(&self) -> Result<(), BackendError> {
        let version = self.client.server_info().version;
        if version.is_empty() {
            // Not connected yet: nothing is known about the server.
            return Err(BackendError::unavailable(
                "not connected to a NATS server yet",
            ));
        }
        let mut parts = version.split('.').map(|p| p.parse::<u64>().unwrap_or(0));
        let found = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
        if found < MIN_VERSION {
            return Err(BackendError::Unsupported {
                what: format!("per-message TTL (nats-server {version})"),
                needed: "nats-server 2.11 or newer".into(),
            });
        }
        Ok(())
    }

    fn validate(&self, config: &stream::Config) -> Result<(), BackendError> {
        let fix = |problem: String, fix: &str| BackendError::Misconfigured {
            problem: format!("bucket {}: {problem}", self.bucket),
            fix: fix.into(),
        };
        if !config.allow_message_ttl || config.subject_delete_marker_ttl.is_none() {
            return Err(fix(
                "per-message TTL or limit markers are off".into(),
                "enable limit markers (allow_msg_ttl and subject_delete_marker_ttl) on the bucket, or use a new bucket",
            ));
        }
        // Each lease checks max_age against its own ttl (one bucket serves
        // many ttls); below 2 s no ttl can work.
        let least = Duration::from_secs(1) * MAX_AGE_TTL_FACTOR;
        if !config.max_age.is_zero() && config.max_age < least {
            return Err(fix(
                format!("max_age is {:?}, too short for any lease", config.max_age),
                &format!(
                    "set max_age to 0, or at least {MAX_AGE_TTL_FACTOR} x the longest lease ttl: \
                     it would drop live leases"
                ),
            ));
        }
        if config.discard == stream::DiscardPolicy::Old
            && (config.max_bytes > 0 || config.max_messages > 0)
        {
            return Err(fix(
                "discard-old with a size or message limit".into(),
                "use discard new, or remove max_bytes/max_msgs: they could drop a live lease",
            ));
        }
        // Fencing tokens are stream sequences. A bucket whose sequences
        // start at 1 hands out small tokens again if it is ever deleted and
        // re-created, below tokens a downstream store has already seen.
        if config.first_sequence.is_none_or(|first| first <= 1) {
            return Err(fix(
                "its sequences start at 1, so fencing tokens would go back to 1 if it were re-created".into(),
                "let setup create the bucket (it seeds the first sequence from the clock in microseconds), \
                 or create its stream with first_seq set to the current Unix time in microseconds",
            ));
        }
        Ok(())
    }
}

/// The candidate registry (see the module docs).
impl NatsBackend {
    /// The registry bucket of this backend: the lease bucket's name and
    /// [`CANDIDATES_SUFFIX`].
    ///
    /// ```
    /// # async fn demo(client: async_nats::Client) {
    /// let nats = leaseholder::backend::nats::NatsBackend::new(client, "leases");
    /// assert_eq!(nats.registry_bucket(), "leases_candidates");
    /// # }
    /// ```
    pub fn registry_bucket(&self) -> String {
        format!("{}{CANDIDATES_SUFFIX}", self.bucket)
    }

    fn registry_stream(&self) -> String {
        format!("KV_{}", self.registry_bucket())
    }

    /// `$KV.<registry bucket>.<key>.<id as 32 hex>`.
    fn entry_subject(&self, key: &Key, id: LeaderId) -> String {
        format!(
            "$KV.{}.{key}.{}",
            self.registry_bucket(),
            id.as_uuid().simple()
        )
    }

    fn registry_state(&self) -> std::sync::MutexGuard<'_, Option<Duration>> {
        self.shared
            .registry
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Finds the registry bucket, or creates it, and checks it; returns
    /// its `max_age`. Once per backend (again after its stream went
    /// missing).
    async fn registry(&self) -> Result<Duration, BackendError> {
        if let Some(max_age) = *self.registry_state() {
            return Ok(max_age);
        }
        let name = self.registry_stream();
        self.check_publish(&format!("$JS.API.STREAM.INFO.{name}"))
            .await?;
        let config = match self.js.get_stream(&name).await {
            Ok(stream) => stream.cached_info().config.clone(),
            Err(e) => match e.kind() {
                GetStreamErrorKind::JetStream(js)
                    if js.error_code() == ErrorCode::STREAM_NOT_FOUND =>
                {
                    self.create_registry().await?
                }
                _ => return Err(BackendError::unavailable(e)),
            },
        };
        self.validate_registry(&config)?;
        *self.registry_state() = Some(config.max_age);
        Ok(config.max_age)
    }

    /// Creates the registry bucket: one replica, stored and placed like
    /// the lease bucket.
    async fn create_registry(&self) -> Result<stream::Config, BackendError> {
        let (name, bucket) = (self.registry_stream(), self.registry_bucket());
        let create = format!("$JS.API.STREAM.CREATE.{name}");
        let missing = |why: String| BackendError::Misconfigured {
            problem: format!(
                "the candidate registry's bucket {bucket} (stream {name}) does not exist, and \
                 it could not be created: {why}"
            ),
            fix: format!(
                "create stream {name} with subjects $KV.{bucket}.>, allow_msg_ttl, allow_direct \
                 and max_msgs_per_subject 1 on one replica, or allow this user to publish to \
                 {create}; or build the Leaders without the registry"
            ),
        };
        if let Err(denied) = self.check_publish(&create).await {
            return Err(missing(denied.to_string()));
        }
        let (storage, placement) = match self.js.get_stream(self.stream_name()).await {
            Ok(leases) => {
                let config = &leases.cached_info().config;
                (config.storage, config.placement.clone())
            }
            Err(_) => (stream::StorageType::File, None),
        };
        let config = stream::Config {
            name: name.clone(),
            description: Some(format!(
                "leaseholder candidate registry of bucket {}",
                self.bucket
            )),
            subjects: vec![format!("$KV.{bucket}.>")],
            max_messages_per_subject: 1,
            deny_delete: true,
            allow_direct: true,
            discard: stream::DiscardPolicy::New,
            allow_message_ttl: true,
            num_replicas: 1,
            storage,
            placement,
            ..Default::default()
        };
        match self.js.create_stream(config).await {
            Ok(stream) => Ok(stream.cached_info().config.clone()),
            Err(created) => match self.js.get_stream(&name).await {
                // Another candidate created it first.
                Ok(stream) => Ok(stream.cached_info().config.clone()),
                Err(_) => Err(match created.kind() {
                    CreateStreamErrorKind::JetStream(_) => missing(created.to_string()),
                    _ => BackendError::unavailable(created),
                }),
            },
        }
    }

    fn validate_registry(&self, config: &stream::Config) -> Result<(), BackendError> {
        let bucket = self.registry_bucket();
        let fix = |problem: &str, fix: &str| BackendError::Misconfigured {
            problem: format!("the candidate registry's bucket {bucket}: {problem}"),
            fix: format!("{fix}, or delete the bucket: the next registry call creates it"),
        };
        // A lease bucket that happens to have this name (setup describes
        // its streams so): entries there would read as foreign leases.
        if config.description.as_deref() == Some(LEASES_DESCRIPTION) {
            return Err(BackendError::Misconfigured {
                problem: format!(
                    "bucket {bucket}, where the candidate registry of bucket {} goes, is a lease \
                     bucket",
                    self.bucket
                ),
                fix: "rename one of the two lease buckets".into(),
            });
        }
        let subjects = format!("$KV.{bucket}.>");
        if !config.subjects.contains(&subjects) {
            return Err(fix(
                &format!("its stream does not take the subjects {subjects}"),
                &format!("set its subjects to {subjects}"),
            ));
        }
        if !config.allow_message_ttl {
            return Err(fix(
                "per-message TTL is off, so an entry would never expire",
                "enable allow_msg_ttl on it",
            ));
        }
        if !config.allow_direct {
            return Err(fix(
                "direct gets are off, and the registry is read by one",
                "enable allow_direct on it",
            ));
        }
        if config.sealed {
            return Err(fix("it is sealed and takes no writes", "use a new one"));
        }
        Ok(())
    }

    /// Publishes a registry entry (or its delete marker) and classifies the
    /// reply, as [`publish_raw`](Self::publish_raw) does for leases.
    async fn publish_entry(
        &self,
        subject: String,
        headers: HeaderMap,
        value: Bytes,
    ) -> Result<(), BackendError> {
        self.check_publish(&subject).await?;
        let ack = self
            .js
            .publish_with_headers(subject.clone(), headers, value)
            .await
            .map_err(BackendError::unavailable)?;
        let mut waiting = Unanswered::new(&self.shared.unanswered);
        let result = ack.await;
        if !matches!(&result, Err(e) if e.kind() == PublishErrorKind::TimedOut) {
            waiting.answered();
        }
        drop(waiting);
        match result {
            Ok(_) => Ok(()),
            // No responders: the registry's stream is gone (the next call
            // looks for it again, and creates it) or its server is down.
            Err(e) if e.kind() == PublishErrorKind::StreamNotFound => {
                *self.registry_state() = None;
                Err(BackendError::unavailable(format!(
                    "no responders for the candidate registry's bucket {} (deleted, or its \
                     server is down)",
                    self.registry_bucket()
                )))
            }
            Err(e) if e.kind() == PublishErrorKind::TimedOut => {
                self.shared.unanswered.store(false, Ordering::Relaxed);
                self.read_permissions().await;
                Err(self
                    .denial(&subject)
                    .unwrap_or_else(|| BackendError::unavailable(e)))
            }
            Err(e) => Err(self.classify(
                e,
                &self.registry_bucket(),
                &self.registry_stream(),
                "a candidate's entry",
            )),
        }
    }

    /// Refuses a `ttl` that the registry bucket's `max_age` would cut short.
    fn check_registry_max_age(&self, max_age: Duration, ttl: Duration) -> Result<(), BackendError> {
        let sent = Duration::from_secs(ttl_secs(ttl));
        if max_age.is_zero() || max_age >= sent {
            return Ok(());
        }
        Err(BackendError::Misconfigured {
            problem: format!(
                "the candidate registry's bucket {}: max_age is {max_age:?}, below the entries' \
                 ttl {sent:?}: entries would drop out while their candidates live",
                self.registry_bucket()
            ),
            fix: format!(
                "set max_age on stream {} to 0 (the default)",
                self.registry_stream()
            ),
        })
    }

    /// One batched direct get of the last message of every subject under
    /// `<key>.*` (or of the one entry of candidate `only`), up to the
    /// server's end-of-batch.
    async fn list_entries(
        &self,
        key: &Key,
        only: Option<LeaderId>,
        budget: Duration,
    ) -> Result<Vec<Candidate>, BackendError> {
        let api = format!("$JS.API.DIRECT.GET.{}", self.registry_stream());
        self.check_publish(&api).await?;
        let filter = match only {
            Some(id) => self.entry_subject(key, id),
            None => format!("$KV.{}.{key}.*", self.registry_bucket()),
        };
        let request = serde_json::json!({ "multi_last": [filter] }).to_string();
        let inbox = self.client.new_inbox();
        let mut replies = self
            .client
            .subscribe(inbox.clone())
            .await
            .map_err(BackendError::unavailable)?;
        self.client
            .publish_with_reply(api, inbox, request.into())
            .await
            .map_err(BackendError::unavailable)?;
        let mut waiting = Unanswered::new(&self.shared.unanswered);
        let mut found = Vec::new();
        let read = async {
            loop {
                let Some(message) = replies.next().await else {
                    return Err(BackendError::unavailable(
                        "the connection closed during a registry read",
                    ));
                };
                let status = message.status.map(|s| s.as_u16());
                match status {
                    None | Some(200) => {}
                    // End of batch, or nothing under the key.
                    Some(204 | 404) => return Ok(()),
                    Some(503) => {
                        *self.registry_state() = None;
                        return Err(BackendError::unavailable(format!(
                            "no responders for the candidate registry's bucket {} (deleted, \
                             or its server is down)",
                            self.registry_bucket()
                        )));
                    }
                    Some(413) => {
                        return Err(BackendError::unavailable(format!(
                            "more than {MAX_LISTED} registry entries under key {key}"
                        )));
                    }
                    Some(code) => {
                        return Err(BackendError::unavailable(format!(
                            "the registry read was refused: {code} {}",
                            message.description.as_deref().unwrap_or("")
                        )));
                    }
                }
                let marker = message.headers.as_ref().is_some_and(|h| {
                    matches!(
                        h.get("KV-Operation").map(|op| op.as_str()),
                        Some("DEL" | "PURGE")
                    ) || h.get("Nats-Marker-Reason").is_some()
                });
                if !marker && let Ok(candidate) = Candidate::decode(&message.payload) {
                    found.push(candidate);
                }
            }
        };
        let result = tokio::time::timeout(budget, read).await;
        if result.is_ok() {
            waiting.answered();
        }
        drop(waiting);
        match result {
            Ok(Ok(())) => Ok(found),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(BackendError::Timeout(budget)),
        }
    }
}

/// A publish refused because the key's last sequence was not the expected
/// one: 10071 from a single server, 10164 from a replicated stream (which
/// async-nats 0.51 reports as `Other`).
fn lost_race(e: &async_nats::jetstream::context::PublishError) -> bool {
    if e.kind() == PublishErrorKind::WrongLastSequence {
        return true;
    }
    std::error::Error::source(e)
        .and_then(|s| s.downcast_ref::<jetstream::Error>())
        .is_some_and(|s| {
            matches!(
                s.error_code(),
                jetstream::ErrorCode::STREAM_WRONG_LAST_SEQUENCE
                    | jetstream::ErrorCode::STREAM_WRONG_LAST_SEQUENCE_CONSTANT
            )
        })
}

/// The TTL sent for `ttl`: whole seconds, rounded up, at least 1.
fn ttl_secs(ttl: Duration) -> u64 {
    (ttl.as_secs() + u64::from(ttl.subsec_nanos() > 0)).max(1)
}

fn now_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(1, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
}

impl BackendEdge for NatsBackend {
    fn name(&self) -> &'static str {
        "nats"
    }

    fn min_ttl(&self) -> Duration {
        Duration::from_secs(1)
    }

    fn validate_key(&self, key: &Key) -> Result<(), ConfigError> {
        // The bucket is part of every subject: a bad name is as fatal as a
        // bad key, and build() is where configuration errors belong.
        validate_bucket(&self.bucket)?;
        const RULE: &str =
            "NATS KV keys use A-Z a-z 0-9 - _ = / . and do not start or end with '.'";
        let s = key.as_str();
        if let Some(ch) = s
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || "-_=/.".contains(*c)))
        {
            return Err(ConfigError::KeyCharacter {
                key: s.to_owned(),
                ch,
                backend: "nats",
                rule: RULE,
            });
        }
        if s.starts_with('.') || s.ends_with('.') || s.contains("..") {
            return Err(ConfigError::KeyRejected {
                key: s.to_owned(),
                backend: "nats",
                rule: RULE,
            });
        }
        Ok(())
    }

    async fn setup(&self, _budget: Duration) -> Result<Prepared, BackendError> {
        if let Err(e) = validate_bucket(&self.bucket) {
            return Err(BackendError::Misconfigured {
                problem: e.to_string(),
                fix: "choose a bucket name that follows the rule".into(),
            });
        }
        self.check_version().await?;
        // What this user may publish, so that a denial is reported as one
        // rather than as a request that timed out.
        self.read_permissions().await;
        let name = self.stream_name();
        self.check_publish(&format!("$JS.API.STREAM.INFO.{name}"))
            .await?;
        let config = self.stream_config();
        let existing = match self.js.get_stream(&name).await {
            Ok(mut s) => Some(
                s.info()
                    .await
                    .map_err(BackendError::unavailable)?
                    .config
                    .clone(),
            ),
            Err(_) => None,
        };
        let mut prepared = Prepared::Existing;
        if existing.is_none() {
            self.check_publish(&format!("$JS.API.STREAM.CREATE.{name}"))
                .await?;
        }
        let config = match existing {
            Some(config) => config,
            None => match self.js.create_stream(config).await {
                Ok(mut s) => {
                    prepared = Prepared::Created;
                    s.info()
                        .await
                        .map_err(BackendError::unavailable)?
                        .config
                        .clone()
                }
                // Another candidate created it first.
                Err(_) => self
                    .js
                    .get_stream(&name)
                    .await
                    .map_err(BackendError::unavailable)?
                    .info()
                    .await
                    .map_err(BackendError::unavailable)?
                    .config
                    .clone(),
            },
        };
        self.validate(&config)?;
        let _ = self.shared.max_age.set(config.max_age);
        self.store().await?;
        Ok(prepared)
    }

    async fn acquire(
        &self,
        key: &Key,
        claim: &Claim,
        ttl: Duration,
        _budget: Duration,
    ) -> Result<Acquired, BackendError> {
        let expected = match self.entry(key).await? {
            Some(e) => match Self::holder(&e) {
                Some(h) => return Ok(Acquired::Held(h)),
                None => e.revision, // a delete or expiry marker
            },
            None => 0,
        };
        let value = LeaseValue {
            token: None,
            ..claim.value(FencingToken::new(0))
        }
        .encode();
        match self.publish(key, value, ttl, expected).await? {
            Some(seq) => Ok(Acquired::Won(Lease::new(
                claim,
                FencingToken::new(seq),
                seq,
            ))),
            None => {
                // Lost the race. On a replicated stream the leader refuses
                // a write while a competing one is still being replicated,
                // so the winner may not be readable yet, even from the
                // leader: read again, briefly, before giving up.
                let mut pause = Duration::from_millis(2);
                for _ in 0..6 {
                    if let Some(h) = self.entry(key).await?.as_ref().and_then(Self::holder) {
                        return Ok(Acquired::Held(h));
                    }
                    tokio::time::sleep(pause).await;
                    pause *= 2;
                }
                Err(BackendError::unavailable(
                    "lost the race for the key, but no holder became readable",
                ))
            }
        }
    }

    async fn renew(
        &self,
        key: &Key,
        lease: &Lease,
        ttl: Duration,
        _budget: Duration,
    ) -> Result<Renewed, BackendError> {
        self.rewrite(key, lease, ttl, "renew").await
    }

    async fn release(
        &self,
        key: &Key,
        lease: &Lease,
        _budget: Duration,
    ) -> Result<(), BackendError> {
        for _ in 0..2 {
            let revision = match self.entry(key).await?.as_ref().and_then(Self::holder) {
                Some(h) if h.is_nonce(lease.nonce()) => h.revision(),
                // Gone or another's: nothing of ours to release.
                _ => return Ok(()),
            };
            // A delete marker on our revision (compare-and-delete), as
            // `kv::Store::delete_expect_revision` writes it.
            let mut headers = HeaderMap::new();
            headers.insert("KV-Operation", "DEL");
            headers.insert(
                "Nats-Expected-Last-Subject-Sequence",
                revision.to_string().as_str(),
            );
            if self
                .publish_raw(self.subject(key), headers, Bytes::new())
                .await?
                .is_some()
            {
                return Ok(());
            }
        }
        Err(BackendError::unavailable(
            "the key kept changing during release",
        ))
    }

    async fn holder(&self, key: &Key, _budget: Duration) -> Result<Option<Holder>, BackendError> {
        Ok(self.entry(key).await?.as_ref().and_then(Self::holder))
    }

    /// The bucket's keys (`kv::Store::keys`: an ordered consumer that
    /// delivers the last message per subject, headers only); delete and
    /// expiry markers are left out.
    async fn keys(&self, budget: Duration) -> Result<Vec<Key>, BackendError> {
        let store = self.store().await?;
        let list = async {
            let mut names = store.keys().await.map_err(BackendError::unavailable)?;
            let mut keys = Vec::new();
            while let Some(name) = names.next().await {
                let name = name.map_err(BackendError::unavailable)?;
                keys.extend(Key::new(&name).ok());
            }
            Ok(keys)
        };
        tokio::time::timeout(budget, list)
            .await
            .map_err(|_| BackendError::Timeout(budget))?
    }

    async fn watch(&self) -> Result<Option<WatchStream>, BackendError> {
        let watch = self
            .store()
            .await?
            .watch_all()
            .await
            .map_err(BackendError::unavailable)?;
        let stream = watch
            .take_while(|e| std::future::ready(e.is_ok()))
            .filter_map(|e| async move {
                let entry = e.ok()?;
                let key = Key::new(&entry.key).ok()?;
                let read = Read {
                    revision: entry.revision,
                    value: (entry.operation == kv::Operation::Put).then_some(entry.value),
                    // A watched entry carries no headers, so no TTL.
                    expires_in: None,
                };
                Some(match Self::holder(&read) {
                    Some(h) => WatchEvent::Updated(key, Some(h)),
                    None => WatchEvent::Released(key),
                })
            });
        Ok(Some(Box::pin(stream)))
    }

    fn watch_reports_expiry(&self) -> bool {
        true
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
        _budget: Duration,
    ) -> Result<Renewed, BackendError> {
        self.rewrite(key, &lease.with_metadata(metadata.clone()), ttl, "proclaim")
            .await
    }

    fn supports_candidates(&self) -> bool {
        true
    }

    async fn register(
        &self,
        key: &Key,
        candidate: &Candidate,
        ttl: Duration,
        _budget: Duration,
    ) -> Result<(), BackendError> {
        let max_age = self.registry().await?;
        self.check_registry_max_age(max_age, ttl)?;
        let mut headers = HeaderMap::new();
        headers.insert("Nats-TTL", format!("{}s", ttl_secs(ttl)).as_str());
        self.publish_entry(
            self.entry_subject(key, candidate.id()),
            headers,
            candidate.encode(),
        )
        .await
    }

    async fn deregister(
        &self,
        key: &Key,
        id: LeaderId,
        _budget: Duration,
    ) -> Result<(), BackendError> {
        self.registry().await?;
        // A delete marker replaces the entry, and expires itself.
        let mut headers = HeaderMap::new();
        headers.insert("KV-Operation", "DEL");
        headers.insert("Nats-TTL", DELETED_TTL);
        self.publish_entry(self.entry_subject(key, id), headers, Bytes::new())
            .await
    }

    async fn candidates(
        &self,
        key: &Key,
        budget: Duration,
    ) -> Result<Vec<Candidate>, BackendError> {
        self.registry().await?;
        self.list_entries(key, None, budget).await
    }

    async fn candidate(
        &self,
        key: &Key,
        id: LeaderId,
        budget: Duration,
    ) -> Result<Option<Candidate>, BackendError> {
        self.registry().await?;
        let found = self.list_entries(key, Some(id), budget).await?;
        Ok(found.into_iter().find(|c| c.id() == id))
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::parse_ttl;

    #[test]
    fn nats_ttl_headers_parse_as_the_server_writes_them() {
        assert_eq!(parse_ttl("10"), Some(Duration::from_secs(10)));
        assert_eq!(parse_ttl("10s"), Some(Duration::from_secs(10)));
        assert_eq!(parse_ttl("1m30s"), Some(Duration::from_secs(90)));
        assert_eq!(parse_ttl("1h"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_ttl("1500ms"), Some(Duration::from_millis(1500)));
        assert_eq!(parse_ttl("1.5s"), Some(Duration::from_millis(1500)));
        for bad in ["never", "", "s", "10x", "-1s", "0s", "1e400h"] {
            assert_eq!(parse_ttl(bad), None, "{bad:?}");
        }
    }
}
