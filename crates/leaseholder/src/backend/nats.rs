//! NATS JetStream KV (feature `nats`, nats-server 2.11 or newer).
//!
//! How the lease contract maps onto a KV bucket:
//!
//! | op | on the bucket |
//! |---|---|
//! | setup | check the server version (per-message TTL needs 2.11); create the bucket's stream with per-message TTL and expiry markers, seeding its first sequence from the wall clock in microseconds so a re-created bucket still issues larger tokens; or validate an existing one |
//! | acquire | read the key; if a live value is there it is held. Else publish with `Nats-TTL` and `Nats-Expected-Last-Subject-Sequence` (0, or the revision of the delete or expiry marker) — never `create_with_ttl`, which drops the TTL after a marker |
//! | renew | read the key: only a message with our nonce is renewed, by publishing with `Nats-TTL` on its revision (a newer one after a lost reply); anything else is `Lost` |
//! | release | read the key; if the message has our nonce, delete on its revision (compare-and-delete); the marker keeps the sequence moving |
//! | token | the stream sequence of the acquiring publish, carried in the value from the first renewal on |
//! | holder | read the key; a value is the holder (undecodable: a foreign lease, e.g. noleader's), with an expiry hint from the message's server timestamp and its `Nats-TTL` |
//! | watch | one wildcard KV watch per backend; a value is `Updated`, a delete or expiry marker is `Released` |
//!
//! Every read goes to the stream's leader (`STREAM.MSG.GET`), never a
//! direct get: on a replicated bucket a replica may answer a direct get
//! from behind the leader, and a read right after a lost race would then
//! show the key as it was before. Writes are compare-and-set on the
//! subject's last sequence, so a stale read can cost a retry but never
//! safety; reading from the leader keeps it from costing the retry.
//!
//! The TTL sent is the ttl rounded up to whole seconds; the leader's
//! deadline uses the configured ttl, which is never longer. The expiry hint
//! compares the server's clock with ours, so it is only a hint: one that
//! has already passed by our clock is dropped, and followers learn of the
//! expiry from the watch (the server's expiry marker) anyway.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_nats::HeaderMap;
use async_nats::jetstream::stream::LastRawMessageErrorKind;
use async_nats::jetstream::{self, context::PublishErrorKind, kv, stream};
use bytes::Bytes;
use futures_util::StreamExt;
use tokio::sync::OnceCell;

use super::{
    Acquired, BackendEdge, Claim, FencingToken, Holder, Key, Lease, LeaseValue, Prepared, Renewed,
    WatchEvent, WatchStream,
};
use crate::error::{BackendError, ConfigError};

/// The oldest nats-server with per-message TTL.
const MIN_VERSION: (u64, u64) = (2, 11);
/// How long expiry markers stay in the bucket.
const MARKER_TTL: Duration = Duration::from_secs(60);

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
    store: std::sync::Arc<OnceCell<kv::Store>>,
}

impl NatsBackend {
    /// A backend on `bucket`, created by [`setup`](BackendEdge::setup) if
    /// missing.
    pub fn new(client: async_nats::Client, bucket: &str) -> NatsBackend {
        NatsBackend {
            js: jetstream::new(client.clone()),
            client,
            bucket: bucket.to_owned(),
            store: Default::default(),
        }
    }

    fn subject(&self, key: &Key) -> String {
        format!("$KV.{}.{}", self.bucket, key)
    }

    async fn store(&self) -> Result<&kv::Store, BackendError> {
        self.store
            .get_or_try_init(|| async {
                self.js
                    .get_key_value(&self.bucket)
                    .await
                    .map_err(BackendError::unavailable)
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
        let message = match store
            .stream
            .get_last_raw_message_by_subject(&self.subject(key))
            .await
        {
            Ok(message) => message,
            Err(e) => {
                return match e.kind() {
                    LastRawMessageErrorKind::NoMessageFound => Ok(None),
                    LastRawMessageErrorKind::JetStream(js)
                        if js.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND =>
                    {
                        Err(self.bucket_missing())
                    }
                    _ => Err(BackendError::unavailable(e)),
                };
            }
        };
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
        let mut headers = HeaderMap::new();
        let secs = ttl.as_secs() + u64::from(ttl.subsec_nanos() > 0);
        headers.insert("Nats-TTL", format!("{}s", secs.max(1)).as_str());
        headers.insert(
            "Nats-Expected-Last-Subject-Sequence",
            expected.to_string().as_str(),
        );
        let ack = self
            .js
            .publish_with_headers(self.subject(key), headers, value)
            .await
            .map_err(BackendError::unavailable)?;
        match ack.await {
            Ok(ack) => Ok(Some(ack.sequence)),
            Err(e) if lost_race(&e) => Ok(None),
            Err(e) if e.kind() == PublishErrorKind::StreamNotFound => Err(self.bucket_missing()),
            Err(e) => Err(BackendError::unavailable(e)),
        }
    }

    /// The bucket was there at setup and is gone: someone deleted it. It is
    /// not created again behind the user's back.
    fn bucket_missing(&self) -> BackendError {
        BackendError::Misconfigured {
            problem: format!("bucket {} does not exist (deleted?)", self.bucket),
            fix: "create it again with setup() (a new Leader runs it), then restart the campaigns"
                .into(),
        }
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
        if !config.max_age.is_zero() && config.max_age < Duration::from_secs(3600) {
            return Err(fix(
                format!("max_age is {:?}", config.max_age),
                "set max_age to 0 (or hours): it would drop live leases",
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

    async fn setup(&self) -> Result<Prepared, BackendError> {
        self.check_version().await?;
        let name = format!("KV_{}", self.bucket);
        let config = stream::Config {
            name: name.clone(),
            description: Some("leaseholder leases".into()),
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
        };
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
        self.store().await?;
        Ok(prepared)
    }

    async fn acquire(
        &self,
        key: &Key,
        claim: &Claim,
        ttl: Duration,
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
        // The revision alone does not prove ownership: read the key and
        // renew only the message with our nonce, on its revision (a newer
        // one if an earlier renewal's reply was lost).
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
        Err(BackendError::unavailable(
            "the key kept changing during renew",
        ))
    }

    async fn release(&self, key: &Key, lease: &Lease) -> Result<(), BackendError> {
        let store = self.store().await?;
        for _ in 0..2 {
            let revision = match self.entry(key).await?.as_ref().and_then(Self::holder) {
                Some(h) if h.is_nonce(lease.nonce()) => h.revision(),
                // Gone or another's: nothing of ours to release.
                _ => return Ok(()),
            };
            if store
                .delete_expect_revision(key.as_str(), Some(revision))
                .await
                .is_ok()
            {
                return Ok(());
            }
        }
        Err(BackendError::unavailable(
            "the key kept changing during release",
        ))
    }

    async fn holder(&self, key: &Key) -> Result<Option<Holder>, BackendError> {
        Ok(self.entry(key).await?.as_ref().and_then(Self::holder))
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
