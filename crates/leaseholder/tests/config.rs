//! Every rule of `LeaderBuilder::build()` gives its own `ConfigError`, the
//! defaults read back through `Leader::config()`, and a `Leader::new` handle
//! with an invalid configuration reports it instead of campaigning.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use leaseholder::{
    Acquired, Backend, BackendEdge, BackendError, Claim, ConfigError, Error, Holder, Key, Leader,
    LeaderBuilder, Lease, MemoryBackend, MemoryStore, Renewed, WatchStream,
};
use tokio_util::sync::CancellationToken;

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

fn memory() -> Backend {
    Backend::memory(&MemoryStore::new())
}

fn builder(key: &str) -> LeaderBuilder {
    Leader::builder(key).backend(memory())
}

fn err(b: LeaderBuilder) -> ConfigError {
    b.build()
        .expect_err("build() should reject this configuration")
}

fn ok(b: LeaderBuilder) -> Leader {
    b.build().expect("build() should accept this configuration")
}

// ----- a custom backend: the memory store with stricter rules --------------

/// The memory backend, with keys that must not contain '/' and a minimum
/// ttl.
struct Strict {
    inner: MemoryBackend,
    min_ttl: Duration,
}

impl Strict {
    fn backend(min_ttl: Duration) -> Backend {
        Backend::new(Strict {
            inner: MemoryStore::new().backend(),
            min_ttl,
        })
    }
}

impl BackendEdge for Strict {
    fn name(&self) -> &'static str {
        "strict"
    }

    fn min_ttl(&self) -> Duration {
        self.min_ttl
    }

    fn validate_key(&self, key: &Key) -> Result<(), ConfigError> {
        match key.as_str().chars().find(|&c| c == '/') {
            Some(ch) => Err(ConfigError::KeyCharacter {
                key: key.as_str().to_owned(),
                ch,
                backend: "strict",
                rule: "no '/' in keys",
            }),
            None => Ok(()),
        }
    }

    async fn setup(&self, budget: Duration) -> Result<leaseholder::Prepared, BackendError> {
        self.inner.setup(budget).await
    }

    async fn acquire(
        &self,
        key: &Key,
        claim: &Claim,
        ttl: Duration,
        budget: Duration,
    ) -> Result<Acquired, BackendError> {
        self.inner.acquire(key, claim, ttl, budget).await
    }

    async fn renew(
        &self,
        key: &Key,
        lease: &Lease,
        ttl: Duration,
        budget: Duration,
    ) -> Result<Renewed, BackendError> {
        self.inner.renew(key, lease, ttl, budget).await
    }

    async fn release(
        &self,
        key: &Key,
        lease: &Lease,
        budget: Duration,
    ) -> Result<(), BackendError> {
        self.inner.release(key, lease, budget).await
    }

    async fn holder(&self, key: &Key, budget: Duration) -> Result<Option<Holder>, BackendError> {
        self.inner.holder(key, budget).await
    }

    async fn watch(&self) -> Result<Option<WatchStream>, BackendError> {
        self.inner.watch().await
    }

    fn watch_reports_expiry(&self) -> bool {
        self.inner.watch_reports_expiry()
    }
}

// ----- backend and key -----------------------------------------------------

#[test]
fn missing_backend() {
    assert_eq!(err(Leader::builder("k")), ConfigError::MissingBackend);
}

#[test]
fn empty_key() {
    assert_eq!(err(builder("")), ConfigError::EmptyKey);
}

#[test]
fn key_over_256_bytes() {
    let long = "k".repeat(257);
    assert_eq!(
        err(builder(&long)),
        ConfigError::KeyTooLong { len: 257, max: 256 }
    );
    // The limit is in bytes, not characters: 129 two-byte characters.
    let wide = "é".repeat(129);
    assert_eq!(
        err(builder(&wide)),
        ConfigError::KeyTooLong { len: 258, max: 256 }
    );
    // Exactly 256 bytes is fine.
    let leader = ok(builder(&"k".repeat(256)));
    assert_eq!(leader.key().as_str().len(), 256);
}

#[test]
fn control_character_in_key() {
    for (key, ch) in [
        ("a\nb", '\n'),
        ("\0", '\0'),
        ("tab\there", '\t'),
        ("del\u{7f}", '\u{7f}'),
    ] {
        match err(builder(key)) {
            ConfigError::KeyCharacter { key: k, ch: c, .. } => {
                assert_eq!(k, key);
                assert_eq!(c, ch, "key {key:?}");
            }
            other => panic!("key {key:?}: expected KeyCharacter, got {other:?}"),
        }
    }
    // Ordinary punctuation, spaces and non-ASCII letters are fine for the
    // memory backend.
    ok(builder("jobs/scheduler: eu-west é"));
}

#[test]
fn a_backends_own_key_rule_fails_build_with_its_error() {
    let e = Leader::builder("jobs/scheduler")
        .backend(Strict::backend(ms(1)))
        .build()
        .unwrap_err();
    assert_eq!(
        e,
        ConfigError::KeyCharacter {
            key: "jobs/scheduler".into(),
            ch: '/',
            backend: "strict",
            rule: "no '/' in keys",
        }
    );
    // The same backend takes a key without '/'.
    Leader::builder("jobs.scheduler")
        .backend(Strict::backend(ms(1)))
        .build()
        .unwrap();
    // The shared rules still come first.
    assert_eq!(
        Leader::builder("")
            .backend(Strict::backend(ms(1)))
            .build()
            .unwrap_err(),
        ConfigError::EmptyKey
    );
}

#[test]
fn a_backends_min_ttl_rejects_a_shorter_ttl() {
    let e = Leader::builder("k")
        .backend(Strict::backend(secs(1)))
        .ttl(ms(500))
        .build()
        .unwrap_err();
    assert_eq!(
        e,
        ConfigError::TtlTooShort {
            ttl: ms(500),
            min: secs(1),
            backend: "strict",
        }
    );
    // Exactly the minimum is fine.
    let leader = Leader::builder("k")
        .backend(Strict::backend(secs(1)))
        .ttl(secs(1))
        .build()
        .unwrap();
    assert_eq!(leader.config().ttl(), secs(1));
}

// ----- timing ----------------------------------------------------------------

#[test]
fn zero_ttl() {
    assert_eq!(
        err(builder("k").ttl(Duration::ZERO)),
        ConfigError::Zero { field: "ttl" }
    );
}

#[test]
fn drift_margin_zero() {
    assert_eq!(
        err(builder("k").ttl(secs(10)).drift_margin(Duration::ZERO)),
        ConfigError::DriftMargin {
            drift: Duration::ZERO,
            ttl: secs(10)
        }
    );
}

#[test]
fn drift_margin_at_or_above_half_the_ttl() {
    for drift in [secs(5), secs(6), secs(10), secs(60)] {
        assert_eq!(
            err(builder("k")
                .ttl(secs(10))
                .renew_interval(secs(1))
                .drift_margin(drift)),
            ConfigError::DriftMargin {
                drift,
                ttl: secs(10)
            },
            "drift {drift:?}"
        );
    }
    // Just below half is allowed (with a renew interval that fits).
    let leader = ok(builder("k")
        .ttl(secs(10))
        .renew_interval(secs(1))
        .drift_margin(ms(4_999)));
    assert_eq!(leader.config().drift_margin(), ms(4_999));
}

#[test]
fn renew_interval_too_long() {
    // ttl 10 s, drift 1 s (default): usable 9 s >= 2 x renew x 1.1, so the
    // longest renew interval is 9 / 2.2 = 4.0909.. s.
    let e = err(builder("k").ttl(secs(10)).renew_interval(ms(4_100)));
    assert_eq!(
        e,
        ConfigError::RenewInterval {
            renew: ms(4_100),
            usable: secs(9)
        }
    );
    assert_eq!(
        ok(builder("k").ttl(secs(10)).renew_interval(ms(4_090)))
            .config()
            .renew_interval(),
        ms(4_090)
    );
    // The jitter counts: without it 4.5 s fits, 4.6 s does not.
    ok(builder("k")
        .ttl(secs(10))
        .jitter(0.0)
        .renew_interval(ms(4_500)));
    assert_eq!(
        err(builder("k")
            .ttl(secs(10))
            .jitter(0.0)
            .renew_interval(ms(4_600))),
        ConfigError::RenewInterval {
            renew: ms(4_600),
            usable: secs(9)
        }
    );
    // So does the drift margin: with drift 3 s, usable is 7 s and 3.3 s
    // (x 2.2 = 7.26 s) no longer fits.
    assert_eq!(
        err(builder("k")
            .ttl(secs(10))
            .drift_margin(secs(3))
            .renew_interval(ms(3_300))),
        ConfigError::RenewInterval {
            renew: ms(3_300),
            usable: secs(7)
        }
    );
    // A high jitter with the default renew interval (ttl/3) breaks the rule.
    assert!(matches!(
        err(builder("k").ttl(secs(10)).jitter(0.5)),
        ConfigError::RenewInterval { .. }
    ));
}

#[test]
fn zero_renew_retry_drain() {
    assert_eq!(
        err(builder("k").renew_interval(Duration::ZERO)),
        ConfigError::Zero {
            field: "renew_interval"
        }
    );
    assert_eq!(
        err(builder("k").retry_interval(Duration::ZERO)),
        ConfigError::Zero {
            field: "retry_interval"
        }
    );
    assert_eq!(
        err(builder("k").drain_timeout(Duration::ZERO)),
        ConfigError::Zero {
            field: "drain_timeout"
        }
    );
}

#[test]
fn jitter_out_of_range() {
    for j in [
        -0.1,
        -0.0001,
        1.0,
        1.5,
        f64::NAN,
        f64::INFINITY,
        f64::NEG_INFINITY,
    ] {
        match err(builder("k").renew_interval(secs(1)).jitter(j)) {
            ConfigError::Jitter(shown) => {
                assert_eq!(shown, j.to_string(), "jitter {j}");
            }
            other => panic!("jitter {j}: expected Jitter, got {other:?}"),
        }
    }
    // The ends of [0, 1) that are inside it.
    assert_eq!(ok(builder("k").jitter(0.0)).config().jitter(), 0.0);
    assert_eq!(
        ok(builder("k").renew_interval(secs(2)).jitter(0.99))
            .config()
            .jitter(),
        0.99
    );
}

#[test]
fn backoff_min_above_max_or_zero() {
    assert_eq!(
        err(builder("k").backoff(ms(500), ms(100))),
        ConfigError::Backoff {
            min: ms(500),
            max: ms(100)
        }
    );
    assert_eq!(
        err(builder("k").backoff(Duration::ZERO, ms(100))),
        ConfigError::Zero {
            field: "backoff minimum"
        }
    );
    assert_eq!(
        err(builder("k").backoff(Duration::ZERO, Duration::ZERO)),
        ConfigError::Zero {
            field: "backoff minimum"
        }
    );
    assert_eq!(
        err(builder("k").backoff(ms(1), Duration::ZERO)),
        ConfigError::Backoff {
            min: ms(1),
            max: Duration::ZERO
        }
    );
    // min == max is a fixed backoff, allowed.
    assert_eq!(
        ok(builder("k").backoff(ms(200), ms(200)))
            .config()
            .backoff(),
        (ms(200), ms(200))
    );
}

#[test]
fn metadata_over_512_bytes() {
    assert_eq!(
        err(builder("k").metadata(vec![b'm'; 513])),
        ConfigError::MetadataTooLarge { len: 513, max: 512 }
    );
    let leader = ok(builder("k").metadata(vec![b'm'; 512]));
    assert_eq!(leader.config().metadata().len(), 512);
}

// ----- defaults --------------------------------------------------------------

#[test]
fn defaults_for_the_default_ttl() {
    let leader = ok(builder("k"));
    let c = leader.config();
    assert_eq!(c.key().as_str(), "k");
    assert_eq!(c.ttl(), secs(10));
    assert_eq!(c.renew_interval(), secs(10) / 3);
    assert_eq!(c.retry_interval(), secs(2));
    // max(100 ms, ttl/10) = 1 s, under the cap ttl/4.
    assert_eq!(c.drift_margin(), secs(1));
    assert_eq!(c.jitter(), 0.1);
    assert_eq!(c.drain_timeout(), secs(10));
    // 50 ms up to the retry interval.
    assert_eq!(c.backoff(), (ms(50), secs(2)));
    assert!(c.metadata().is_empty());
}

#[test]
fn defaults_follow_the_ttl() {
    let c = ok(builder("k").ttl(secs(30))).config().clone();
    assert_eq!(c.renew_interval(), secs(10));
    assert_eq!(c.retry_interval(), secs(6));
    assert_eq!(c.drift_margin(), secs(3));
    assert_eq!(c.backoff(), (ms(50), secs(6)));

    // ttl/10 = 50 ms < 100 ms: the floor applies (under the cap 125 ms).
    let c = ok(builder("k").ttl(ms(500))).config().clone();
    assert_eq!(c.renew_interval(), ms(500) / 3);
    assert_eq!(c.retry_interval(), ms(100));
    assert_eq!(c.drift_margin(), ms(100));

    // ttl 300 ms: the floor 100 ms is above ttl/4 = 75 ms; the cap wins.
    let c = ok(builder("k").ttl(ms(300))).config().clone();
    assert_eq!(c.drift_margin(), ms(75));

    // ttl 200 ms: cap 50 ms; the retry interval (40 ms) also caps the
    // backoff's minimum.
    let c = ok(builder("k").ttl(ms(200))).config().clone();
    assert_eq!(c.drift_margin(), ms(50));
    assert_eq!(c.retry_interval(), ms(40));
    assert_eq!(c.backoff(), (ms(40), ms(40)));

    // Explicit settings are kept as given.
    let c = ok(builder("k")
        .ttl(secs(10))
        .renew_interval(secs(2))
        .retry_interval(ms(700))
        .drift_margin(ms(300))
        .jitter(0.25)
        .drain_timeout(secs(3))
        .backoff(ms(10), secs(1))
        .metadata("10.0.0.7:8080"))
    .config()
    .clone();
    assert_eq!(c.renew_interval(), secs(2));
    assert_eq!(c.retry_interval(), ms(700));
    assert_eq!(c.drift_margin(), ms(300));
    assert_eq!(c.jitter(), 0.25);
    assert_eq!(c.drain_timeout(), secs(3));
    assert_eq!(c.backoff(), (ms(10), secs(1)));
    assert_eq!(&c.metadata()[..], b"10.0.0.7:8080");
}

// ----- Leader::new with an invalid configuration -----------------------------

fn is_config(r: Result<(), Error>, want: &ConfigError) -> bool {
    matches!(r, Err(Error::Config(ref e)) if e == want)
}

#[tokio::test(start_paused = true)]
async fn leader_new_with_an_empty_key_reports_it_on_use() {
    let store = MemoryStore::new();
    let leader = Leader::new("", Backend::memory(&store));
    let limit = secs(60);

    let ran = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = ran.clone();
    let r = tokio::time::timeout(
        limit,
        leader.acquire_and_run(move |_term| {
            flag.store(true, std::sync::atomic::Ordering::SeqCst);
            async { Ok::<_, std::io::Error>(()) }
        }),
    )
    .await
    .expect("acquire_and_run should return at once");
    assert!(is_config(r, &ConfigError::EmptyKey), "acquire_and_run");
    assert!(!ran.load(std::sync::atomic::Ordering::SeqCst), "work ran");

    let r = tokio::time::timeout(limit, leader.start(CancellationToken::new()))
        .await
        .expect("start should return at once");
    assert!(is_config(r, &ConfigError::EmptyKey), "start");

    let r = tokio::time::timeout(
        limit,
        leader.do_while_leader(|_term| async { Ok::<_, std::io::Error>(()) }),
    )
    .await
    .expect("do_while_leader should return at once");
    assert!(is_config(r, &ConfigError::EmptyKey), "do_while_leader");

    let r = tokio::time::timeout(limit, leader.setup())
        .await
        .expect("setup should return at once");
    assert!(is_config(r, &ConfigError::EmptyKey), "setup");

    // It never touched the store, and it does not claim to lead.
    assert_eq!(store.setups(), 0);
    assert!(leader.fencing_token().is_none());
    assert_eq!(leader.is_leader(), leaseholder::Status::Candidate);
}

#[tokio::test(start_paused = true)]
async fn leader_new_reports_a_backends_rejection_on_use() {
    let limit = secs(60);
    let leader = Leader::new("a/b", Strict::backend(ms(1)));
    let r = tokio::time::timeout(
        limit,
        leader.acquire_and_run(|_term| async { Ok::<_, std::io::Error>(()) }),
    )
    .await
    .unwrap();
    assert!(
        matches!(
            r,
            Err(Error::Config(ConfigError::KeyCharacter { ch: '/', .. }))
        ),
        "{r:?}"
    );

    // The default ttl (10 s) is below this backend's minimum.
    let leader = Leader::new("k", Strict::backend(secs(20)));
    let r = tokio::time::timeout(limit, leader.start(CancellationToken::new()))
        .await
        .unwrap();
    assert!(
        matches!(r, Err(Error::Config(ConfigError::TtlTooShort { .. }))),
        "{r:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn leader_new_with_a_valid_key_campaigns() {
    // The control for the two tests above: the same calls with a valid key
    // do lead.
    let store = MemoryStore::new();
    let leader = Leader::new("k", Backend::memory(&store));
    let (tx, rx) = tokio::sync::oneshot::channel();
    let mut tx = Some(tx);
    tokio::time::timeout(
        secs(60),
        leader.acquire_and_run(move |term| {
            if let Some(tx) = tx.take() {
                let _ = tx.send(term.fencing_token());
            }
            async { Ok::<_, std::io::Error>(()) }
        }),
    )
    .await
    .unwrap()
    .unwrap();
    assert_eq!(rx.await.unwrap().get(), 1);
    assert_eq!(store.setups(), 1);
}
