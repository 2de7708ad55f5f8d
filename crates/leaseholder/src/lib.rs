#![doc = include_str!("../../../README.md")]
#![warn(missing_docs)]
#![forbid(unsafe_code)]
#![cfg_attr(docsrs, feature(doc_cfg))]

pub mod backend;
mod campaign;
mod config;
mod error;
mod health;
mod leader;
#[cfg(feature = "metrics")]
#[cfg_attr(docsrs, doc(cfg(feature = "metrics")))]
pub mod metrics;
mod observer;
mod state;
mod term;

#[cfg(feature = "conformance")]
#[cfg_attr(docsrs, doc(cfg(feature = "conformance")))]
pub mod conformance;

#[cfg(feature = "noleader")]
#[cfg_attr(docsrs, doc(cfg(feature = "noleader")))]
pub mod noleader;

pub use backend::blocking::{Blocking, BlockingBackendEdge};
#[cfg(feature = "etcd")]
#[cfg_attr(docsrs, doc(cfg(feature = "etcd")))]
pub use backend::etcd::{EtcdBackend, EtcdBuilder};
pub use backend::memory::{Fault, Faults, MemoryBackend, MemoryStore};
#[cfg(feature = "nats")]
#[cfg_attr(docsrs, doc(cfg(feature = "nats")))]
pub use backend::nats::NatsBackend;
#[cfg(feature = "postgres")]
#[cfg_attr(docsrs, doc(cfg(feature = "postgres")))]
pub use backend::postgres::{PostgresBackend, PostgresBuilder};
#[cfg(feature = "redis")]
#[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
pub use backend::redis::{RedisBackend, RedisBuilder};
#[cfg(feature = "sqlite")]
#[cfg_attr(docsrs, doc(cfg(feature = "sqlite")))]
pub use backend::sqlite::{SqliteBackend, SqliteBuilder};
pub use backend::{
    Acquired, Backend, BackendEdge, Candidate, Claim, FencingToken, ForceReleased, Holder, Key,
    LeaderId, Lease, LeaseValue, Nonce, Prepared, Renewal, Renewed, WatchEvent, WatchStream,
};
pub use config::{LeaderBuilder, LeaderConfig, MAX_INTERVAL, MIN_INTERVAL};
pub use error::{BackendError, BoxError, ConfigError, Error, Op};
pub use health::Health;
pub use leader::Leader;
pub use observer::{Observed, Observer};
pub use state::{State, Status, Waiting};
pub use term::Term;
