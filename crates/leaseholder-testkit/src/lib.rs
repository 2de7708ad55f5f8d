//! Test support for `leaseholder`.
//!
//! This crate is meant for tests only (it is not published). It provides:
//!
//! - [`free_port`]: a free TCP port on the loopback interface;
//! - [`find_binary`], [`find_binary_in`] and [`binary_version`]: locating the
//!   server binaries a test needs, and checking their versions, with an error
//!   that tells the developer how to install what is missing;
//! - [`ChildGuard`] and [`TempDir`]: servers run as child processes listening
//!   on free loopback ports, each with its own scratch directory; both are
//!   cleaned up on drop, so a failing or panicking test leaks neither
//!   processes nor files;
//! - [`TcpProxy`]: a TCP proxy placed between a client and a server to inject
//!   faults (cut the link, blackhole it, add latency) and heal it again;
//! - [`WorkLog`]: when each candidate's work ran, checked against the safety
//!   property (no overlap, tokens strictly increasing);
//! - [`NatsServer`] and [`NatsCluster`]: real `nats-server`s with JetStream;
//! - [`PostgresServer`]: a real PostgreSQL server with a fresh cluster
//!   (run as the `postgres` user when the tests run as root);
//! - [`RedisServer`], [`RedisCluster`] and [`RedisSentinel`]: a real
//!   `redis-server`, a Redis Cluster, and a primary with a replica watched
//!   by three Sentinels;
//! - [`EtcdServer`] and [`EtcdCluster`]: a real single-member etcd, and a
//!   cluster of members.
//!
//! Wrappers that start real servers (NATS, Postgres, Redis, etcd) build on
//! these pieces, one module per server.

#![warn(missing_docs)]

mod binary;
mod error;
mod etcd;
mod nats;
mod peer_links;
mod port;
mod postgres;
mod process;
mod proxy;
mod redis;
mod worklog;

pub use binary::{binary_version, find_binary, find_binary_candidates, find_binary_in};
pub use error::Error;
pub use etcd::{
    ETCD_ELECTION_TIMEOUT, ETCD_HEARTBEAT_INTERVAL, EtcdCluster, EtcdServer, EtcdStatus,
    MIN_ETCD_VERSION, etcd_version_accepted, find_etcd, find_etcdctl,
};
pub use nats::{DEBIAN_NATS_SERVER, MIN_NATS_VERSION, NatsCluster, NatsServer, find_nats_server};
pub use port::free_port;
pub use postgres::{
    DEBIAN_POSTGRES_LIB, MIN_POSTGRES_VERSION, POSTGRES_MAX_CONNECTIONS, PostgresServer,
    find_postgres,
};
pub use process::{ChildGuard, TempDir};
pub use proxy::{LinkState, TcpProxy};
pub use redis::{
    MIN_REDIS_VERSION, REDIS_CLUSTER_NODE_TIMEOUT, REDIS_SENTINEL_DOWN_AFTER,
    REDIS_SENTINEL_FAILOVER_TIMEOUT, RedisCluster, RedisOptions, RedisSentinel, RedisServer,
    find_redis_cli, find_redis_server,
};
pub use worklog::{Interval, Violation, WorkGuard, WorkLog};
