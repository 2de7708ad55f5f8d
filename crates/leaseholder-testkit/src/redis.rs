//! Real Redis servers as child processes: a standalone `redis-server`
//! ([`RedisServer`]), a Redis Cluster ([`RedisCluster`]), and a primary with
//! a replica watched by three Sentinels ([`RedisSentinel`]).
//!
//! Readiness and state are probed with RESP over a plain TCP connection (a
//! few lines, no client library); [`RedisServer::cli`] runs `redis-cli` for
//! anything else.

use std::collections::HashMap;
use std::fs::OpenOptions;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::OnceLock;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::process::Command;
use tokio::time::Instant;

use crate::binary::{parse_major_minor, pick_by_version};
use crate::process::{log_tail, wait_stopped};
use crate::{ChildGuard, Error, TempDir, binary_version, find_binary_candidates, free_port};

/// The oldest Redis (major, minor) that [`find_redis_server`] and
/// [`find_redis_cli`] accept: 7.0 brought `--cluster-port` and multi-part
/// AOF, and is what Debian 12 ships.
pub const MIN_REDIS_VERSION: (u32, u32) = (7, 0);

/// The `cluster-node-timeout` of [`RedisCluster`] nodes: a node that has not
/// answered for this long is suspected to have failed (`PFAIL`), and marked
/// failed (`FAIL`) once a majority of primaries agree.
pub const REDIS_CLUSTER_NODE_TIMEOUT: Duration = Duration::from_millis(2000);

/// The `down-after-milliseconds` of [`RedisSentinel`]'s Sentinels: a
/// primary that has not answered for this long is subjectively down, and a
/// failover starts once two Sentinels agree.
pub const REDIS_SENTINEL_DOWN_AFTER: Duration = Duration::from_millis(1000);

/// The `failover-timeout` of [`RedisSentinel`]'s Sentinels. A Sentinel
/// does not start an automatic failover of the same primary within twice
/// this time of the previous attempt (forced ones, with
/// [`RedisSentinel::failover`], are not held back).
pub const REDIS_SENTINEL_FAILOVER_TIMEOUT: Duration = Duration::from_millis(5000);

/// The command that installs the servers, named in errors.
const SETUP: &str = "scripts/setup";

/// The name under which [`RedisSentinel`]'s Sentinels monitor the primary.
const MASTER_NAME: &str = "leaseholder";

/// How many Sentinels [`RedisSentinel`] starts, and how many must agree
/// that the primary is down.
const SENTINELS: usize = 3;
const QUORUM: usize = 2;

/// The number of hash slots of a Redis Cluster.
const CLUSTER_SLOTS: u32 = 16384;

/// How long a started server has to answer its readiness probe.
const READY_DEADLINE: Duration = Duration::from_secs(10);

/// How long a cluster has to be created and report `cluster_state:ok`, and
/// Sentinels to learn about the primary, its replica and each other.
const SETTLE_DEADLINE: Duration = Duration::from_secs(30);

/// How long a Sentinel failover has to complete.
const FAILOVER_DEADLINE: Duration = Duration::from_secs(30);

/// Bound on one probe (connect, a command or two).
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);

/// Pause between two failed readiness probes, so the loop does not spin
/// while the server is still binding its port.
const PROBE_BACKOFF: Duration = Duration::from_millis(20);

/// How long a dropped server has to exit after `SIGKILL`.
const STOP_DEADLINE: Duration = Duration::from_secs(5);

/// Pause between two checks of a cluster's or Sentinels' state.
const POLL: Duration = Duration::from_millis(100);

/// How many times a server is started on fresh ports when one it picked
/// was taken before it could bind it.
const START_ATTEMPTS: u32 = 3;

/// The file, in a server's directory, that gets its log and its output.
const LOG_FILE: &str = "redis.log";

/// The configuration file, in a server's directory, that `redis-server` is
/// started with (so that `CONFIG REWRITE` works) or a Sentinel keeps its
/// state in.
const CONFIG_FILE: &str = "redis.conf";

/// Finds a `redis-server` of at least [`MIN_REDIS_VERSION`] on `PATH`,
/// judging by its `--version`.
///
/// Returns [`Error::MissingBinary`], naming `scripts/setup`, if there is
/// no `redis-server` on `PATH`, and [`Error::UnsupportedVersion`] (with
/// the version found and the one needed) if every one there is too old.
/// Blocks while the candidates run.
pub fn find_redis_server() -> Result<PathBuf, Error> {
    find_redis_binary("redis-server")
}

/// Finds a `redis-cli` of at least [`MIN_REDIS_VERSION`] on `PATH`, like
/// [`find_redis_server`].
pub fn find_redis_cli() -> Result<PathBuf, Error> {
    find_redis_binary("redis-cli")
}

fn find_redis_binary(name: &str) -> Result<PathBuf, Error> {
    pick_redis_binary(name, find_binary_candidates(name, &[]))
}

/// The first of `candidates` whose version is at least
/// [`MIN_REDIS_VERSION`].
fn pick_redis_binary(name: &str, candidates: Vec<PathBuf>) -> Result<PathBuf, Error> {
    pick_by_version(name, candidates, MIN_REDIS_VERSION, SETUP, |path| {
        binary_version(path, &["--version"])
            .ok()
            .and_then(|text| version_token(&text).map(str::to_owned))
    })
}

/// `redis-cli`, found once per process.
fn redis_cli() -> Result<PathBuf, Error> {
    static CLI: OnceLock<PathBuf> = OnceLock::new();
    if let Some(path) = CLI.get() {
        return Ok(path.clone());
    }
    let path = find_redis_cli()?;
    Ok(CLI.get_or_init(|| path).clone())
}

/// How [`RedisServer::start_with`] and [`RedisCluster::start_with`]
/// configure a server, beyond what the testkit always sets.
///
/// The testkit always starts `redis-server` on `127.0.0.1` and a free
/// port, with `--protected-mode no`, its own directory as `--dir`, a
/// `--logfile` there, `--save ""` (no RDB snapshots),
/// `--repl-diskless-sync-delay 0` (a replica is synced at once, not after
/// the default 5 s wait for more replicas), and, by default, `--appendonly
/// no`: nothing survives a restart.
///
/// ```
/// use leaseholder_testkit::RedisOptions;
///
/// let options = RedisOptions::new()
///     .persistence(true)
///     .arg("maxmemory", "64mb")
///     .arg_values("client-output-buffer-limit", ["pubsub", "0", "0", "0"]);
/// assert!(options.is_persistent());
/// ```
#[derive(Debug, Clone, Default)]
pub struct RedisOptions {
    persistence: bool,
    args: Vec<String>,
}

impl RedisOptions {
    /// The defaults: no persistence, no extra arguments.
    pub fn new() -> Self {
        Self::default()
    }

    /// With `true`, the server writes every command to its append-only
    /// file and `fsync`s it before answering (`--appendonly yes
    /// --appendfsync always`), so whatever was written before a
    /// [`kill`](RedisServer::kill) is there again after a
    /// [`restart`](RedisServer::restart).
    #[must_use]
    pub fn persistence(mut self, on: bool) -> Self {
        self.persistence = on;
        self
    }

    /// Whether [`persistence`](Self::persistence) is on.
    pub fn is_persistent(&self) -> bool {
        self.persistence
    }

    /// Adds `--NAME VALUE` to the command line (`name` without the leading
    /// `--`), after the testkit's own options: for most options Redis
    /// keeps the last value given, so this can also override them.
    #[must_use]
    pub fn arg(self, name: &str, value: &str) -> Self {
        self.arg_values(name, [value])
    }

    /// Adds `--NAME VALUE1 VALUE2...`, for options that take several
    /// values, like `client-output-buffer-limit`. Each value is one
    /// argument: `["60", "1"]`, not `["60 1"]`.
    #[must_use]
    pub fn arg_values<I, S>(mut self, name: &str, values: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.args
            .push(format!("--{}", name.trim_start_matches('-')));
        self.args.extend(values.into_iter().map(Into::into));
        self
    }
}

/// What a [`RedisServer`] is started as.
#[derive(Debug, Clone)]
enum Role {
    /// A standalone server (a primary).
    Standalone,
    /// A replica of the server on `primary_port`; the `replicaof` line is
    /// in its configuration file, where Sentinel's `CONFIG REWRITE`
    /// changes it.
    Replica { primary_port: u16 },
    /// A Redis Cluster node, its cluster bus on its own free port.
    ClusterNode,
    /// A Sentinel monitoring the primary on `primary_port`.
    Sentinel { primary_port: u16 },
}

/// A `redis-server` running as a child process on a free `127.0.0.1` port,
/// with its own temporary directory as its `dir` (its log is `redis.log`
/// there). The nodes of a [`RedisCluster`] and the servers and Sentinels of
/// a [`RedisSentinel`] are `RedisServer`s too.
///
/// By default nothing is persisted; see [`RedisOptions::persistence`].
/// [`restart`](Self::restart) keeps the port, the directory and the
/// options. Dropping the value kills the process and blocks the thread
/// until it has exited (a few milliseconds), then removes the directory.
///
/// Must be started, used and dropped within a Tokio runtime with the time,
/// I/O and process drivers enabled.
#[derive(Debug)]
pub struct RedisServer {
    // Field order matters: the child is dropped (and killed) before its
    // directory is removed.
    child: ChildGuard,
    dir: TempDir,
    binary: PathBuf,
    port: u16,
    /// The cluster bus port of a cluster node.
    bus_port: Option<u16>,
    version: String,
    role: Role,
    options: RedisOptions,
}

impl RedisServer {
    /// Starts a `redis-server` (found with [`find_redis_server`]) with the
    /// default [`RedisOptions`], and waits until it answers `PING`.
    ///
    /// Returns [`Error::MissingBinary`] or [`Error::UnsupportedVersion`]
    /// (naming `scripts/setup`) if there is no suitable binary, and
    /// [`Error::NotReady`] or [`Error::CommandFailed`] if the server does
    /// not come up. A port taken by another process before the server could
    /// bind it is retried on a fresh one.
    pub async fn start() -> Result<Self, Error> {
        Self::start_with(RedisOptions::new()).await
    }

    /// Starts a `redis-server` configured by `options`, like
    /// [`start`](Self::start).
    pub async fn start_with(options: RedisOptions) -> Result<Self, Error> {
        let binary = find_redis_server()?;
        Self::start_new(&binary, Role::Standalone, options).await
    }

    async fn start_new(binary: &Path, role: Role, options: RedisOptions) -> Result<Self, Error> {
        let mut server = Self::spawn_new(binary, role, options)?;
        server.wait_ready_retrying().await?;
        Ok(server)
    }

    /// Spawns a server on fresh ports with a fresh directory, without
    /// waiting for it to be ready.
    fn spawn_new(binary: &Path, role: Role, options: RedisOptions) -> Result<Self, Error> {
        let prefix = match role {
            Role::Sentinel { .. } => "leaseholder-redis-sentinel",
            _ => "leaseholder-redis",
        };
        let dir = TempDir::new(prefix)?;
        let port = free_port()?;
        let bus_port = match role {
            Role::ClusterNode => Some(other_free_port(port)?),
            _ => None,
        };
        let config = match role {
            Role::Standalone | Role::ClusterNode => String::new(),
            Role::Replica { primary_port } => {
                format!("replicaof {} {primary_port}\n", Ipv4Addr::LOCALHOST)
            }
            Role::Sentinel { primary_port } => sentinel_config(dir.path(), port, primary_port),
        };
        let config_path = dir.path().join(CONFIG_FILE);
        std::fs::write(
            &config_path,
            format!(
                "# Written by leaseholder-testkit; CONFIG REWRITE (and Sentinel) rewrite it.\n\
                 {config}"
            ),
        )
        .map_err(|e| Error::io(format!("writing {}", config_path.display()), e))?;
        let args = args(dir.path(), port, bus_port, &role, &options);
        let child = spawn(binary, dir.path(), &args)?;
        Ok(Self {
            child,
            dir,
            binary: binary.to_owned(),
            port,
            bus_port,
            version: String::new(),
            role,
            options,
        })
    }

    /// Waits until the server is ready; if it exits because one of its
    /// ports was taken, starts it again on fresh ports, a few times.
    async fn wait_ready_retrying(&mut self) -> Result<(), Error> {
        let mut attempt = 1;
        loop {
            match self.wait_ready().await {
                Ok(version) => {
                    self.version = version;
                    tracing::debug!(
                        binary = %self.binary.display(),
                        port = self.port,
                        version = %self.version,
                        role = ?self.role,
                        "redis-server ready"
                    );
                    return Ok(());
                }
                Err(Error::CommandFailed { output, .. })
                    if attempt < START_ATTEMPTS && output.contains("already in use") =>
                {
                    tracing::debug!(
                        attempt,
                        port = self.port,
                        "a redis port was taken; trying others"
                    );
                    *self = Self::spawn_new(&self.binary, self.role.clone(), self.options.clone())?;
                    attempt += 1;
                }
                Err(error) => return Err(error),
            }
        }
    }

    /// The client URL, `redis://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("redis://{}", self.addr())
    }

    /// The client port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The client address, `127.0.0.1:PORT`.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, self.port))
    }

    /// The cluster bus port (`--cluster-port`) of a [`RedisCluster`] node,
    /// `None` for other servers.
    pub fn cluster_bus_port(&self) -> Option<u16> {
        self.bus_port
    }

    /// The server's directory (its `dir`): the log `redis.log`, the
    /// configuration file `redis.conf` (a Sentinel's state, or what
    /// `CONFIG REWRITE` wrote), a cluster node's `nodes.conf`, and with
    /// persistence on, the append-only files in `appendonlydir`.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The PID of the current process (it changes on
    /// [`restart`](Self::restart)).
    pub fn pid(&self) -> u32 {
        self.child.pid()
    }

    /// The server's version as it reports it (`redis_version` in `INFO
    /// server`), e.g. `7.0.15`.
    pub fn version(&self) -> &str {
        &self.version
    }

    /// The server's (major, minor) version, if [`version`](Self::version)
    /// parses.
    pub fn version_major_minor(&self) -> Option<(u32, u32)> {
        parse_major_minor(&self.version)
    }

    /// Whether this is a Sentinel (of a [`RedisSentinel`]) rather than a
    /// data server.
    pub fn is_sentinel(&self) -> bool {
        matches!(self.role, Role::Sentinel { .. })
    }

    /// Freezes the server with `SIGSTOP`, and returns once it is stopped:
    /// connections stay open, new ones are accepted by the kernel, and
    /// nothing is answered. See [`ChildGuard::pause`].
    pub fn pause(&self) -> Result<(), Error> {
        self.child.pause()?;
        wait_stopped(&[self.child.pid()]);
        Ok(())
    }

    /// Wakes a server frozen by [`pause`](Self::pause) with `SIGCONT`.
    pub fn resume(&self) -> Result<(), Error> {
        self.child.resume()
    }

    /// Kills the server with `SIGKILL` (a crash: nothing is flushed) and
    /// waits until it has exited. Works on a paused server too. The
    /// directory is kept; [`restart`](Self::restart) brings the server
    /// back.
    pub async fn kill(&mut self) -> Result<(), Error> {
        self.child.kill().await
    }

    /// Kills the server (if it is running) and starts it again on the same
    /// port with the same directory and options, then waits until it
    /// answers `PING` (for a server with persistence on, once it has loaded
    /// its append-only file: what was written before is there again).
    pub async fn restart(&mut self) -> Result<(), Error> {
        self.child.kill().await?;
        self.child = spawn(&self.binary, self.dir.path(), &self.args())?;
        self.version = self.wait_ready().await?;
        Ok(())
    }

    /// Probes the server once: connects and sends `PING`, expecting
    /// `PONG`.
    ///
    /// Has no timeout of its own (a paused server accepts the connection
    /// but never answers), so wrap it in [`tokio::time::timeout`].
    pub async fn ping(&self) -> Result<(), Error> {
        let addr = self.addr();
        match Connection::open(addr).await?.call(&["PING"]).await? {
            Reply::Status(pong) if pong == "PONG" => Ok(()),
            other => Err(unexpected(format!("PING to {addr}"), &other)),
        }
    }

    /// Runs `redis-cli -e -h 127.0.0.1 -p PORT ARGS...` and returns its
    /// standard output without the trailing newline, e.g. `OK` for `["SET",
    /// "k", "v"]`. Pass `-c` first to follow cluster redirections.
    ///
    /// `-e` makes `redis-cli` fail when the server answers with an error
    /// (without it, it prints the error and exits with 0); that, or not
    /// reaching the server, is [`Error::CommandFailed`], with the error in
    /// its output. Has no timeout of its own (against a paused server it
    /// waits), so wrap it in [`tokio::time::timeout`]; the `redis-cli`
    /// process is killed when the future is dropped.
    pub async fn cli(&self, args: &[&str]) -> Result<String, Error> {
        let port = self.port.to_string();
        let host = Ipv4Addr::LOCALHOST.to_string();
        let mut full = vec!["-e", "-h", &host, "-p", &port];
        full.extend_from_slice(args);
        run(&redis_cli()?, &full).await
    }

    /// Probes until the server answers, or [`READY_DEADLINE`] passes, and
    /// fails at once if the process exits.
    ///
    /// Ready means: `PING` is answered with `PONG` (not `LOADING`, as while
    /// an append-only file is loaded), and `INFO server` names this
    /// process's PID (not another server's that took the port). Returns the
    /// version from `INFO`.
    async fn wait_ready(&mut self) -> Result<String, Error> {
        let addr = self.addr();
        let pid = self.child.pid();
        let start = Instant::now();
        let deadline = start + READY_DEADLINE;
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Err(Error::CommandFailed {
                    command: format!("{} {}", self.binary.display(), self.args().join(" ")),
                    status,
                    output: log_tail(&self.dir.path().join(LOG_FILE)),
                });
            }
            let last_error = match tokio::time::timeout(PROBE_TIMEOUT, identify(addr)).await {
                Ok(Ok((answering, version))) if answering == pid => return Ok(version),
                Ok(Ok((answering, _))) => {
                    format!("another server answers: process {answering}, not {pid}")
                }
                Ok(Err(e)) => e.to_string(),
                Err(_) => format!("no answer within {PROBE_TIMEOUT:?}"),
            };
            if Instant::now() + PROBE_BACKOFF >= deadline {
                return Err(Error::NotReady {
                    server: format!("{} at {addr}", self.binary.display()),
                    waited: start.elapsed(),
                    last_error: format!(
                        "{last_error}; {}",
                        log_tail(&self.dir.path().join(LOG_FILE))
                    ),
                });
            }
            tokio::time::sleep(PROBE_BACKOFF).await;
        }
    }

    fn args(&self) -> Vec<String> {
        args(
            self.dir.path(),
            self.port,
            self.bus_port,
            &self.role,
            &self.options,
        )
    }

    /// `INFO section`, bounded by [`PROBE_TIMEOUT`].
    async fn info(&self, section: &str) -> Result<String, Error> {
        text_command(self.addr(), &["INFO", section]).await
    }

    /// `CLUSTER INFO`, bounded by [`PROBE_TIMEOUT`].
    async fn cluster_info(&self) -> Result<String, Error> {
        text_command(self.addr(), &["CLUSTER", "INFO"]).await
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        // Reaped here, so that no zombie outlives the test (see
        // `ChildGuard::kill_blocking`) and nothing writes to the directory
        // while it is removed.
        self.child.kill_blocking(STOP_DEADLINE);
    }
}

/// A Redis Cluster on `127.0.0.1`: each node a [`RedisServer`] with
/// `--cluster-enabled yes`, its own `nodes.conf`, a cluster bus on its own
/// free port (`--cluster-port`, rather than the default client port +
/// 10000, which may be taken or beyond 65535), and
/// `--cluster-node-timeout` [`REDIS_CLUSTER_NODE_TIMEOUT`]. The slots are
/// spread over the primaries by `redis-cli --cluster create`.
///
/// [`kill`](Self::kill) and [`restart`](Self::restart) act on one node; a
/// restarted node keeps its port, its `nodes.conf` (so its place in the
/// cluster) and its options, and rejoins. Every node is killed when the
/// value is dropped.
#[derive(Debug)]
pub struct RedisCluster {
    nodes: Vec<RedisServer>,
    primaries: usize,
}

impl RedisCluster {
    /// Starts `primaries` nodes (at least 3, which Redis Cluster requires)
    /// without replicas, creates the cluster, and waits until every node
    /// reports `cluster_state:ok` with all 16384 slots assigned: see
    /// [`wait_ok`](Self::wait_ok). Takes about 2 s, most of it Redis's
    /// own delay before a freshly started primary accepts writes.
    pub async fn start(primaries: usize) -> Result<Self, Error> {
        Self::start_with(primaries, 0, RedisOptions::new()).await
    }

    /// Starts `primaries` primaries with `replicas_per_primary` replicas
    /// each, like [`start`](Self::start); also waits until every replica is
    /// in sync with its primary. The nodes are in start order: which are
    /// primaries is up to `redis-cli` (see [`primary_count`] and `ROLE`).
    ///
    /// [`primary_count`]: Self::primary_count
    pub async fn start_with_replicas(
        primaries: usize,
        replicas_per_primary: usize,
    ) -> Result<Self, Error> {
        Self::start_with(primaries, replicas_per_primary, RedisOptions::new()).await
    }

    /// Starts a cluster like [`start_with_replicas`](Self::start_with_replicas),
    /// every node configured by `options` (e.g. with persistence on, so a
    /// restarted node keeps its keys).
    pub async fn start_with(
        primaries: usize,
        replicas_per_primary: usize,
        options: RedisOptions,
    ) -> Result<Self, Error> {
        if primaries < 3 {
            return Err(Error::io(
                "starting a Redis Cluster",
                std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    format!("Redis Cluster needs at least 3 primaries, not {primaries}"),
                ),
            ));
        }
        let binary = find_redis_server()?;
        let cli = redis_cli()?;
        let started = Instant::now();
        let total = primaries * (1 + replicas_per_primary);
        let mut nodes = (0..total)
            .map(|_| RedisServer::spawn_new(&binary, Role::ClusterNode, options.clone()))
            .collect::<Result<Vec<_>, Error>>()?;
        for node in &mut nodes {
            node.wait_ready_retrying().await?;
        }
        let cluster = Self { nodes, primaries };
        cluster.create(&cli, replicas_per_primary).await?;
        cluster.wait_ok().await?;
        tracing::debug!(
            urls = ?cluster.urls(),
            elapsed = ?started.elapsed(),
            "redis cluster ready"
        );
        Ok(cluster)
    }

    /// Runs `redis-cli --cluster create` on the nodes.
    async fn create(&self, cli: &Path, replicas_per_primary: usize) -> Result<(), Error> {
        let addrs: Vec<String> = self.nodes.iter().map(|n| n.addr().to_string()).collect();
        let replicas = replicas_per_primary.to_string();
        let mut args = vec!["--cluster", "create"];
        args.extend(addrs.iter().map(String::as_str));
        args.extend(["--cluster-replicas", &replicas, "--cluster-yes"]);
        match tokio::time::timeout(SETTLE_DEADLINE, run(cli, &args)).await {
            Ok(result) => result.map(drop),
            Err(_) => Err(Error::NotReady {
                server: format!("redis-cli {}", args.join(" ")),
                waited: SETTLE_DEADLINE,
                last_error: "did not finish".to_owned(),
            }),
        }
    }

    /// The nodes, in start order.
    pub fn nodes(&self) -> &[RedisServer] {
        &self.nodes
    }

    /// Node `i`. Panics if there is no such node.
    pub fn node(&self, i: usize) -> &RedisServer {
        &self.nodes[i]
    }

    /// Node `i`, to [`kill`](RedisServer::kill) or
    /// [`restart`](RedisServer::restart) it without waiting for the
    /// cluster. Panics if there is no such node.
    pub fn node_mut(&mut self, i: usize) -> &mut RedisServer {
        &mut self.nodes[i]
    }

    /// Every node's client URL, `redis://127.0.0.1:PORT`, in start order,
    /// as cluster clients take them.
    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(RedisServer::url).collect()
    }

    /// The number of nodes.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Whether the cluster has no nodes (never true for a started one).
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// The number of primaries the cluster was created with (the nodes
    /// that serve slots).
    pub fn primary_count(&self) -> usize {
        self.primaries
    }

    /// Kills node `i` with `SIGKILL` and waits until it has exited; its
    /// port, `nodes.conf` and data are kept for [`restart`](Self::restart).
    /// Without replicas, the cluster reports `cluster_state:fail` once the
    /// others have noticed (after [`REDIS_CLUSTER_NODE_TIMEOUT`]).
    pub async fn kill(&mut self, i: usize) -> Result<(), Error> {
        self.nodes[i].kill().await
    }

    /// Restarts node `i` (killing it first if it runs) and waits until it
    /// answers and the whole cluster is ok again (see
    /// [`wait_ok`](Self::wait_ok)). The other nodes clear a failed
    /// primary's `FAIL` flag only after twice
    /// [`REDIS_CLUSTER_NODE_TIMEOUT`], so this can take a few seconds.
    pub async fn restart(&mut self, i: usize) -> Result<(), Error> {
        self.nodes[i].restart().await?;
        self.wait_ok().await
    }

    /// Waits until every node reports, in `CLUSTER INFO`,
    /// `cluster_state:ok`, all 16384 slots assigned and ok, every node
    /// known and as many primaries serving slots as the cluster was created
    /// with, and every replica reports `master_link_status:up`. Fails with
    /// [`Error::NotReady`] after 30 s.
    pub async fn wait_ok(&self) -> Result<(), Error> {
        let start = Instant::now();
        loop {
            let last_error = match self.check_ok().await {
                Ok(()) => return Ok(()),
                Err(problem) => problem,
            };
            if start.elapsed() + POLL >= SETTLE_DEADLINE {
                return Err(Error::NotReady {
                    server: format!("Redis Cluster {}", self.urls().join(",")),
                    waited: start.elapsed(),
                    last_error,
                });
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// `Err` describes the first node found not ok.
    async fn check_ok(&self) -> Result<(), String> {
        let nodes = self.nodes.len().to_string();
        let slots = CLUSTER_SLOTS.to_string();
        let primaries = self.primaries.to_string();
        let expected = [
            ("cluster_state", "ok"),
            ("cluster_slots_assigned", slots.as_str()),
            ("cluster_slots_ok", slots.as_str()),
            ("cluster_known_nodes", nodes.as_str()),
            ("cluster_size", primaries.as_str()),
        ];
        for node in &self.nodes {
            let url = node.url();
            let info = node
                .cluster_info()
                .await
                .map_err(|e| format!("CLUSTER INFO on {url}: {e}"))?;
            for (field, value) in expected {
                let found = info_field(&info, field);
                if found != Some(value) {
                    return Err(format!(
                        "{url} reports {field}:{}, not {value}",
                        found.unwrap_or("(missing)")
                    ));
                }
            }
            let replication = node
                .info("replication")
                .await
                .map_err(|e| format!("INFO replication on {url}: {e}"))?;
            if info_field(&replication, "role") == Some("slave")
                && info_field(&replication, "master_link_status") != Some("up")
            {
                return Err(format!("replica {url} is not in sync with its primary"));
            }
        }
        Ok(())
    }
}

/// A primary and one replica (`replicaof` the primary), each a
/// [`RedisServer`], watched by three Sentinels (`redis-server
/// <sentinel.conf> --sentinel`, each on its own free port with its own
/// writable configuration file) that monitor the primary as
/// [`master_name`](Self::master_name) with a quorum of 2,
/// `down-after-milliseconds` [`REDIS_SENTINEL_DOWN_AFTER`],
/// `failover-timeout` [`REDIS_SENTINEL_FAILOVER_TIMEOUT`] and
/// `parallel-syncs 1`.
///
/// The data servers are started with a configuration file, which
/// Sentinel's `CONFIG REWRITE` updates when it changes a server's role: a
/// restarted server keeps the role Sentinel gave it, as in production.
///
/// [`primary`](Self::primary) and [`replica`](Self::replica) are the
/// testkit's view, updated by [`failover`](Self::failover),
/// [`kill_primary`](Self::kill_primary) and
/// [`wait_primary_change`](Self::wait_primary_change);
/// [`current_primary_addr`](Self::current_primary_addr) asks a Sentinel.
/// Everything is killed when the value is dropped.
#[derive(Debug)]
pub struct RedisSentinel {
    // The Sentinels are dropped (killed) first, so they do not react to
    // the servers going away.
    sentinels: Vec<RedisServer>,
    /// The two data servers, in start order (the first was the primary).
    nodes: Vec<RedisServer>,
    primary: usize,
}

impl RedisSentinel {
    /// Starts the primary and the replica, waits until the replica is in
    /// sync, then starts the Sentinels and waits until each one names the
    /// primary as the master, knows the replica (connected, its link to
    /// the primary up) and knows the two other Sentinels, so that both a
    /// forced [`failover`](Self::failover) and one after the primary fails
    /// work from the start. Takes about 2 s, most of it the Sentinels
    /// finding each other (they announce themselves every 2 s).
    pub async fn start() -> Result<Self, Error> {
        let binary = find_redis_server()?;
        let started = Instant::now();
        let primary =
            RedisServer::start_new(&binary, Role::Standalone, RedisOptions::new()).await?;
        let primary_port = primary.port();
        let replica =
            RedisServer::start_new(&binary, Role::Replica { primary_port }, RedisOptions::new())
                .await?;
        let mut group = Self {
            sentinels: Vec::with_capacity(SENTINELS),
            nodes: vec![primary, replica],
            primary: 0,
        };
        // A Sentinel learns about replicas from the primary's INFO, which it
        // asks for at once and then every 10 s: the replica must be there
        // before the Sentinels start.
        group.wait_replicated().await?;
        for _ in 0..SENTINELS {
            group.sentinels.push(RedisServer::spawn_new(
                &binary,
                Role::Sentinel { primary_port },
                RedisOptions::new(),
            )?);
        }
        for sentinel in &mut group.sentinels {
            sentinel.wait_ready_retrying().await?;
        }
        group.wait_watching().await?;
        tracing::debug!(
            primary = %group.primary().addr(),
            replica = %group.replica().addr(),
            sentinels = ?group.sentinel_addrs(),
            elapsed = ?started.elapsed(),
            "redis sentinel ready"
        );
        Ok(group)
    }

    /// The name the Sentinels monitor the primary under, as Sentinel
    /// clients take it.
    pub fn master_name(&self) -> &str {
        MASTER_NAME
    }

    /// Every Sentinel's URL, `redis://127.0.0.1:PORT`, as Sentinel clients
    /// take them.
    pub fn sentinel_urls(&self) -> Vec<String> {
        self.sentinels.iter().map(RedisServer::url).collect()
    }

    /// Every Sentinel's address.
    pub fn sentinel_addrs(&self) -> Vec<SocketAddr> {
        self.sentinels.iter().map(RedisServer::addr).collect()
    }

    /// The Sentinels, e.g. to pause or kill one.
    pub fn sentinels(&self) -> &[RedisServer] {
        &self.sentinels
    }

    /// The Sentinels, mutably, to kill or restart one.
    pub fn sentinels_mut(&mut self) -> &mut [RedisServer] {
        &mut self.sentinels
    }

    /// The data server that is the primary as far as the testkit knows:
    /// the one started as primary, until [`failover`](Self::failover),
    /// [`kill_primary`](Self::kill_primary) or
    /// [`wait_primary_change`](Self::wait_primary_change) learn otherwise.
    pub fn primary(&self) -> &RedisServer {
        &self.nodes[self.primary]
    }

    /// The primary, mutably, e.g. to kill or restart it.
    pub fn primary_mut(&mut self) -> &mut RedisServer {
        &mut self.nodes[self.primary]
    }

    /// The other data server: the replica, as far as the testkit knows.
    /// After a failover, the old primary: Sentinel turns it into a replica
    /// of the new one some seconds later (see
    /// [`wait_replicated`](Self::wait_replicated)), or once it is back if
    /// it was killed.
    pub fn replica(&self) -> &RedisServer {
        &self.nodes[1 - self.primary]
    }

    /// The replica, mutably, e.g. to kill or restart it.
    pub fn replica_mut(&mut self) -> &mut RedisServer {
        &mut self.nodes[1 - self.primary]
    }

    /// The primary's address according to the first Sentinel that answers
    /// `SENTINEL get-master-addr-by-name` within a second.
    pub async fn current_primary_addr(&self) -> Result<SocketAddr, Error> {
        let mut last_error = None;
        for sentinel in &self.sentinels {
            match master_addr(sentinel.addr()).await {
                Ok(addr) => return Ok(addr),
                Err(error) => last_error = Some(error),
            }
        }
        Err(last_error.unwrap_or_else(|| Error::Redis {
            context: "asking for the primary".to_owned(),
            message: "there are no Sentinels".to_owned(),
        }))
    }

    /// Forces a failover with `SENTINEL FAILOVER` (asking the Sentinels in
    /// turn until one accepts), then waits as
    /// [`wait_primary_change`](Self::wait_primary_change) does. Returns the
    /// new primary's address. Takes a few seconds.
    ///
    /// Returns the error reply (e.g. `NOGOODSLAVE`, when no Sentinel sees
    /// a replica fit to be promoted) as [`Error::Redis`].
    pub async fn failover(&mut self) -> Result<SocketAddr, Error> {
        let old = self.current_primary_addr().await?;
        let mut last_error = None;
        for sentinel in &self.sentinels {
            let addr = sentinel.addr();
            let reply = tokio::time::timeout(
                PROBE_TIMEOUT,
                call(addr, &["SENTINEL", "FAILOVER", MASTER_NAME]),
            )
            .await;
            match reply {
                Ok(Ok(_)) => {
                    last_error = None;
                    break;
                }
                // Someone else's failover is already under way: wait for it.
                Ok(Err(Error::Redis { message, .. })) if message.starts_with("INPROG") => {
                    last_error = None;
                    break;
                }
                Ok(Err(error)) => last_error = Some(error),
                Err(_) => last_error = Some(no_answer(format!("SENTINEL FAILOVER on {addr}"))),
            }
        }
        if let Some(error) = last_error {
            return Err(error);
        }
        self.wait_primary_change(old).await
    }

    /// Kills the server the Sentinels name as the primary (or, if none
    /// answers, the testkit's [`primary`](Self::primary)) with `SIGKILL`,
    /// and returns its address once it has exited, without waiting for the
    /// failover: pass the address to
    /// [`wait_primary_change`](Self::wait_primary_change) for that. The
    /// Sentinels notice after [`REDIS_SENTINEL_DOWN_AFTER`], agree, elect a
    /// leader and promote the replica, a few seconds in all.
    pub async fn kill_primary(&mut self) -> Result<SocketAddr, Error> {
        if let Ok(addr) = self.current_primary_addr().await
            && let Some(i) = self.node_index(addr)
        {
            self.primary = i;
        }
        let addr = self.primary().addr();
        self.primary_mut().kill().await?;
        Ok(addr)
    }

    /// Waits until every Sentinel that answers names a primary other than
    /// `old`, the same one, and that server reports `role:master`; makes it
    /// the testkit's [`primary`](Self::primary) and returns its address.
    /// Fails with [`Error::NotReady`] after 30 s.
    ///
    /// All Sentinels, not just one, so that a client asking any of them
    /// finds the new primary; the others learn of the failover from the
    /// leader's announcements, every 2 s. The old primary, if it runs, is
    /// still a primary when this returns (until Sentinel converts it).
    pub async fn wait_primary_change(&mut self, old: SocketAddr) -> Result<SocketAddr, Error> {
        let start = Instant::now();
        loop {
            let last_error = match self.check_new_primary(old).await {
                Ok((i, addr)) => {
                    self.primary = i;
                    tracing::debug!(%old, new = %addr, elapsed = ?start.elapsed(), "redis failover done");
                    return Ok(addr);
                }
                Err(problem) => problem,
            };
            if start.elapsed() + POLL >= FAILOVER_DEADLINE {
                return Err(Error::NotReady {
                    server: format!("a Sentinel failover away from {old}"),
                    waited: start.elapsed(),
                    last_error,
                });
            }
            tokio::time::sleep(POLL).await;
        }
    }

    async fn check_new_primary(&self, old: SocketAddr) -> Result<(usize, SocketAddr), String> {
        let mut named = None;
        for sentinel in &self.sentinels {
            let Ok(addr) = master_addr(sentinel.addr()).await else {
                continue;
            };
            if addr == old {
                return Err(format!("{} still names {old}", sentinel.addr()));
            }
            match named {
                Some(other) if other != addr => {
                    return Err(format!("the Sentinels name both {other} and {addr}"));
                }
                _ => named = Some(addr),
            }
        }
        let addr = named.ok_or_else(|| "no Sentinel answers".to_owned())?;
        let i = self
            .node_index(addr)
            .ok_or_else(|| format!("the Sentinels name {addr}, which is not one of ours"))?;
        let replication = self.nodes[i]
            .info("replication")
            .await
            .map_err(|e| format!("INFO replication on {addr}: {e}"))?;
        match info_field(&replication, "role") {
            Some("master") => Ok((i, addr)),
            role => Err(format!(
                "{addr} is named by the Sentinels but reports role:{}",
                role.unwrap_or("(missing)")
            )),
        }
    }

    /// Waits until [`replica`](Self::replica) reports
    /// `master_link_status:up` with [`primary`](Self::primary) as its
    /// master, and the primary lists it with `state=online`. Fails with
    /// [`Error::NotReady`] after 30 s.
    ///
    /// After a failover this is how long Sentinel takes to turn the old
    /// primary into a replica of the new one (it waits some seconds before
    /// reconfiguring a server that still says it is a primary). Before each
    /// check the testkit's [`primary`](Self::primary) follows the server
    /// the Sentinels name, once they have Sentinels, so a further failover
    /// while waiting (the Sentinels may promote a restarted server again)
    /// is followed rather than waited out.
    pub async fn wait_replicated(&mut self) -> Result<(), Error> {
        let start = Instant::now();
        loop {
            if !self.sentinels.is_empty()
                && let Ok(addr) = self.current_primary_addr().await
                && let Some(i) = self.node_index(addr)
            {
                self.primary = i;
            }
            let last_error = match self.check_replicated().await {
                Ok(()) => return Ok(()),
                Err(problem) => problem,
            };
            if start.elapsed() + POLL >= SETTLE_DEADLINE {
                return Err(Error::NotReady {
                    server: format!(
                        "replication from {} to {}",
                        self.primary().addr(),
                        self.replica().addr()
                    ),
                    waited: start.elapsed(),
                    last_error,
                });
            }
            tokio::time::sleep(POLL).await;
        }
    }

    async fn check_replicated(&self) -> Result<(), String> {
        let (primary, replica) = (self.primary(), self.replica());
        let info = replica
            .info("replication")
            .await
            .map_err(|e| format!("INFO replication on {}: {e}", replica.addr()))?;
        let master = (
            info_field(&info, "master_host"),
            info_field(&info, "master_port"),
        );
        let primary_port = primary.port().to_string();
        if info_field(&info, "role") != Some("slave")
            || master != (Some("127.0.0.1"), Some(primary_port.as_str()))
            || info_field(&info, "master_link_status") != Some("up")
        {
            return Err(format!(
                "{} is not an in-sync replica of {}: {}",
                replica.addr(),
                primary.addr(),
                one_line(&info)
            ));
        }
        let info = primary
            .info("replication")
            .await
            .map_err(|e| format!("INFO replication on {}: {e}", primary.addr()))?;
        let port = replica.port().to_string();
        let listed = replicas_in_info(&info).iter().any(|fields| {
            fields.get("port") == Some(&port.as_str()) && fields.get("state") == Some(&"online")
        });
        if listed {
            Ok(())
        } else {
            Err(format!(
                "{} does not list {} as an online replica: {}",
                primary.addr(),
                replica.addr(),
                one_line(&info)
            ))
        }
    }

    /// Waits until every Sentinel names the primary, knows the replica,
    /// connected and in sync, and knows the other Sentinels.
    async fn wait_watching(&self) -> Result<(), Error> {
        let start = Instant::now();
        loop {
            let mut last_error = None;
            for sentinel in &self.sentinels {
                if let Err(problem) = self.check_watching(sentinel.addr()).await {
                    last_error = Some(problem);
                    break;
                }
            }
            let Some(last_error) = last_error else {
                return Ok(());
            };
            if start.elapsed() + POLL >= SETTLE_DEADLINE {
                return Err(Error::NotReady {
                    server: format!("Sentinels {:?}", self.sentinel_addrs()),
                    waited: start.elapsed(),
                    last_error,
                });
            }
            tokio::time::sleep(POLL).await;
        }
    }

    async fn check_watching(&self, sentinel: SocketAddr) -> Result<(), String> {
        let (primary, replica) = (self.primary().addr(), self.replica().addr());
        let named = master_addr(sentinel).await.map_err(|e| e.to_string())?;
        if named != primary {
            return Err(format!(
                "{sentinel} names {named}, not {primary}, as the primary"
            ));
        }
        let master = sentinel_fields(sentinel, &["SENTINEL", "MASTER", MASTER_NAME]).await?;
        let others = master.get("num-other-sentinels").map(String::as_str);
        let expected = (SENTINELS - 1).to_string();
        if others != Some(expected.as_str()) {
            return Err(format!(
                "{sentinel} knows {} other Sentinels, not {expected}",
                others.unwrap_or("(missing)")
            ));
        }
        let reply = sentinel_call(sentinel, &["SENTINEL", "REPLICAS", MASTER_NAME]).await?;
        let replicas = match reply {
            Reply::Array(Some(items)) => items.iter().map(flat_fields).collect::<Vec<_>>(),
            other => return Err(format!("SENTINEL REPLICAS on {sentinel}: {other:?}")),
        };
        let port = replica.port().to_string();
        let known = replicas.iter().any(|fields| {
            fields.get("port") == Some(&port)
                && fields.get("flags").map(String::as_str) == Some("slave")
                && fields.get("master-link-status").map(String::as_str) == Some("ok")
        });
        if known {
            Ok(())
        } else {
            Err(format!(
                "{sentinel} does not see {replica} as a connected, in-sync replica: {replicas:?}"
            ))
        }
    }

    fn node_index(&self, addr: SocketAddr) -> Option<usize> {
        self.nodes.iter().position(|node| node.addr() == addr)
    }
}

/// `SENTINEL get-master-addr-by-name` on `sentinel`, bounded by
/// [`PROBE_TIMEOUT`].
async fn master_addr(sentinel: SocketAddr) -> Result<SocketAddr, Error> {
    let context = || format!("SENTINEL get-master-addr-by-name {MASTER_NAME} on {sentinel}");
    let reply = tokio::time::timeout(
        PROBE_TIMEOUT,
        call(
            sentinel,
            &["SENTINEL", "GET-MASTER-ADDR-BY-NAME", MASTER_NAME],
        ),
    )
    .await
    .map_err(|_| no_answer(context()))??;
    if let Reply::Array(Some(items)) = &reply
        && let [ip, port] = items.as_slice()
        && let (Some(ip), Some(port)) = (ip.text(), port.text())
        && let Ok(addr) = format!("{ip}:{port}").parse()
    {
        return Ok(addr);
    }
    Err(unexpected(context(), &reply))
}

/// A Sentinel command's reply, bounded by [`PROBE_TIMEOUT`]; errors as
/// text.
async fn sentinel_call(sentinel: SocketAddr, command: &[&str]) -> Result<Reply, String> {
    match tokio::time::timeout(PROBE_TIMEOUT, call(sentinel, command)).await {
        Ok(Ok(reply)) => Ok(reply),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!(
            "{} on {sentinel}: no answer within {PROBE_TIMEOUT:?}",
            command.join(" ")
        )),
    }
}

/// A Sentinel command's reply, a flat list of names and values, as a map.
async fn sentinel_fields(
    sentinel: SocketAddr,
    command: &[&str],
) -> Result<HashMap<String, String>, String> {
    Ok(flat_fields(&sentinel_call(sentinel, command).await?))
}

/// The name/value pairs of a flat array reply (`[name, value, ...]`).
fn flat_fields(reply: &Reply) -> HashMap<String, String> {
    let Reply::Array(Some(items)) = reply else {
        return HashMap::new();
    };
    items
        .chunks_exact(2)
        .filter_map(|pair| Some((pair[0].text()?.to_owned(), pair[1].text()?.to_owned())))
        .collect()
}

/// The `slaveN:ip=...,port=...,state=online,...` lines of `INFO
/// replication`, each as a map.
fn replicas_in_info(info: &str) -> Vec<HashMap<&str, &str>> {
    info.lines()
        .filter_map(|line| {
            let (name, value) = line.trim_end().split_once(':')?;
            let index = name.strip_prefix("slave")?;
            if index.is_empty() || !index.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            Some(
                value
                    .split(',')
                    .filter_map(|pair| pair.split_once('='))
                    .collect(),
            )
        })
        .collect()
}

/// The value of `field:value` in an `INFO` (or `CLUSTER INFO`) text.
fn info_field<'a>(info: &'a str, field: &str) -> Option<&'a str> {
    info.lines()
        .find_map(|line| line.trim_end().strip_prefix(field)?.strip_prefix(':'))
}

/// `INFO` text on one line, for an error message.
fn one_line(info: &str) -> String {
    info.lines()
        .map(str::trim)
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
        .collect::<Vec<_>>()
        .join(" ")
}

/// A Sentinel's configuration file.
fn sentinel_config(dir: &Path, port: u16, primary_port: u16) -> String {
    let localhost = Ipv4Addr::LOCALHOST;
    let down_after = REDIS_SENTINEL_DOWN_AFTER.as_millis();
    let failover_timeout = REDIS_SENTINEL_FAILOVER_TIMEOUT.as_millis();
    format!(
        "port {port}\n\
         bind {localhost}\n\
         protected-mode no\n\
         daemonize no\n\
         dir {dir}\n\
         logfile {log}\n\
         sentinel monitor {MASTER_NAME} {localhost} {primary_port} {QUORUM}\n\
         sentinel down-after-milliseconds {MASTER_NAME} {down_after}\n\
         sentinel failover-timeout {MASTER_NAME} {failover_timeout}\n\
         sentinel parallel-syncs {MASTER_NAME} 1\n",
        dir = quoted(dir),
        log = quoted(&dir.join(LOG_FILE)),
    )
}

/// `path` as a double-quoted string of a Redis configuration file.
fn quoted(path: &Path) -> String {
    let path = path.to_string_lossy();
    format!("\"{}\"", path.replace('\\', "\\\\").replace('"', "\\\""))
}

/// The command line of a server.
fn args(
    dir: &Path,
    port: u16,
    bus_port: Option<u16>,
    role: &Role,
    options: &RedisOptions,
) -> Vec<String> {
    let path = |name: &str| dir.join(name).to_string_lossy().into_owned();
    let mut args = vec![path(CONFIG_FILE)];
    if let Role::Sentinel { .. } = role {
        args.push("--sentinel".to_owned());
        return args;
    }
    let persistence = if options.persistence { "yes" } else { "no" };
    args.extend(
        [
            "--port",
            &port.to_string(),
            "--bind",
            &Ipv4Addr::LOCALHOST.to_string(),
            "--protected-mode",
            "no",
            "--daemonize",
            "no",
            "--dir",
            &dir.to_string_lossy(),
            "--logfile",
            &path(LOG_FILE),
            "--save",
            "",
            "--appendonly",
            persistence,
            "--repl-diskless-sync-delay",
            "0",
        ]
        .map(str::to_owned),
    );
    if options.persistence {
        args.extend(["--appendfsync", "always"].map(str::to_owned));
    }
    if let Some(bus_port) = bus_port {
        args.extend(
            [
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                &path("nodes.conf"),
                "--cluster-node-timeout",
                &REDIS_CLUSTER_NODE_TIMEOUT.as_millis().to_string(),
                "--cluster-port",
                &bus_port.to_string(),
            ]
            .map(str::to_owned),
        );
    }
    args.extend_from_slice(&options.args);
    args
}

/// A free port other than `port`.
fn other_free_port(port: u16) -> Result<u16, Error> {
    loop {
        let other = free_port()?;
        if other != port {
            return Ok(other);
        }
    }
}

/// Starts `binary` with `args` in `dir`, its output appended to the log.
fn spawn(binary: &Path, dir: &Path, args: &[String]) -> Result<ChildGuard, Error> {
    let log_path = dir.join(LOG_FILE);
    let open = || {
        OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(|e| Error::io(format!("opening {}", log_path.display()), e))
    };
    ChildGuard::spawn(
        Command::new(binary)
            .args(args)
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(Stdio::from(open()?))
            .stderr(Stdio::from(open()?)),
    )
}

/// Runs `program` with `args`; its standard output without the trailing
/// newline, or [`Error::CommandFailed`].
async fn run(program: &Path, args: &[&str]) -> Result<String, Error> {
    let command = std::iter::once(program.to_string_lossy().into_owned())
        .chain(args.iter().map(|arg| (*arg).to_owned()))
        .collect::<Vec<_>>()
        .join(" ");
    let output = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output()
        .await
        .map_err(|e| Error::io(format!("running `{command}`"), e))?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    if output.status.success() {
        return Ok(stdout.trim_end_matches(['\r', '\n']).to_owned());
    }
    let stderr = String::from_utf8_lossy(&output.stderr);
    Err(Error::CommandFailed {
        command,
        status: output.status,
        output: [stdout.trim(), stderr.trim()]
            .into_iter()
            .filter(|stream| !stream.is_empty())
            .collect::<Vec<_>>()
            .join("\n"),
    })
}

/// Sends `PING` (expecting `PONG`), then `INFO server`; returns the PID
/// and the version the server reports.
async fn identify(addr: SocketAddr) -> Result<(u32, String), Error> {
    let mut connection = Connection::open(addr).await?;
    match connection.call(&["PING"]).await? {
        Reply::Status(pong) if pong == "PONG" => {}
        // E.g. `LOADING Redis is loading the dataset in memory`.
        Reply::Error(message) => {
            return Err(Error::Redis {
                context: format!("PING to {addr}"),
                message,
            });
        }
        other => return Err(unexpected(format!("PING to {addr}"), &other)),
    }
    let reply = connection.call(&["INFO", "server"]).await?;
    let context = || format!("INFO server on {addr}");
    let info = reply.text().ok_or_else(|| unexpected(context(), &reply))?;
    let pid = info_field(info, "process_id").and_then(|pid| pid.parse().ok());
    let version = info_field(info, "redis_version");
    match (pid, version) {
        (Some(pid), Some(version)) => Ok((pid, version.to_owned())),
        _ => Err(unexpected(context(), &reply)),
    }
}

/// `command` on `addr`, bounded by [`PROBE_TIMEOUT`], whose reply must be
/// text (a bulk or status reply).
async fn text_command(addr: SocketAddr, command: &[&str]) -> Result<String, Error> {
    let context = || format!("{} on {addr}", command.join(" "));
    let reply = tokio::time::timeout(PROBE_TIMEOUT, call(addr, command))
        .await
        .map_err(|_| no_answer(context()))??;
    match reply.text() {
        Some(text) => Ok(text.to_owned()),
        None => Err(unexpected(context(), &reply)),
    }
}

/// Connects to `addr` and sends `command`; an error reply is
/// [`Error::Redis`].
async fn call(addr: SocketAddr, command: &[&str]) -> Result<Reply, Error> {
    match Connection::open(addr).await?.call(command).await? {
        Reply::Error(message) => Err(Error::Redis {
            context: format!("{} on {addr}", command.join(" ")),
            message,
        }),
        reply => Ok(reply),
    }
}

fn unexpected(context: String, reply: &Reply) -> Error {
    Error::Redis {
        context,
        message: format!("unexpected reply {reply:?}"),
    }
}

fn no_answer(context: String) -> Error {
    Error::Redis {
        context,
        message: format!("no answer within {PROBE_TIMEOUT:?}"),
    }
}

/// A RESP2 reply.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Reply {
    /// `+OK`
    Status(String),
    /// `-ERR ...`
    Error(String),
    /// `:42`
    Integer(i64),
    /// `$3\r\nabc`, or `$-1` (`None`).
    Bulk(Option<String>),
    /// `*2\r\n...`, or `*-1` (`None`).
    Array(Option<Vec<Reply>>),
}

impl Reply {
    /// The text of a status or (non-null) bulk reply.
    fn text(&self) -> Option<&str> {
        match self {
            Self::Status(text) | Self::Bulk(Some(text)) => Some(text),
            _ => None,
        }
    }
}

/// A RESP2 connection, one command at a time.
struct Connection {
    stream: TcpStream,
    addr: SocketAddr,
    buffer: Vec<u8>,
}

impl Connection {
    async fn open(addr: SocketAddr) -> Result<Self, Error> {
        let stream = TcpStream::connect(addr)
            .await
            .map_err(|e| Error::io(format!("connecting to {addr}"), e))?;
        Ok(Self {
            stream,
            addr,
            buffer: Vec::new(),
        })
    }

    /// Sends `command` and reads its reply (an error reply is a `Reply`,
    /// not an `Err`).
    async fn call(&mut self, command: &[&str]) -> Result<Reply, Error> {
        let name = command.first().copied().unwrap_or_default();
        let addr = self.addr;
        self.stream
            .write_all(&encode(command))
            .await
            .map_err(|e| Error::io(format!("sending {name} to {addr}"), e))?;
        loop {
            match parse(&self.buffer) {
                Ok(Some((reply, used))) => {
                    self.buffer.drain(..used);
                    return Ok(reply);
                }
                Ok(None) => {}
                Err(message) => {
                    return Err(Error::Redis {
                        context: format!("reading the reply to {name} from {addr}"),
                        message,
                    });
                }
            }
            let read =
                self.stream.read_buf(&mut self.buffer).await.map_err(|e| {
                    Error::io(format!("reading the reply to {name} from {addr}"), e)
                })?;
            if read == 0 {
                return Err(Error::io(
                    format!("reading the reply to {name} from {addr}"),
                    std::io::ErrorKind::UnexpectedEof.into(),
                ));
            }
        }
    }
}

/// `command` as a RESP array of bulk strings.
fn encode(command: &[&str]) -> Vec<u8> {
    let mut out = format!("*{}\r\n", command.len()).into_bytes();
    for arg in command {
        out.extend_from_slice(format!("${}\r\n", arg.len()).as_bytes());
        out.extend_from_slice(arg.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out
}

/// Parses one reply at the start of `buffer`: `Ok(None)` if it is not all
/// there yet, else the reply and how many bytes it took.
fn parse(buffer: &[u8]) -> Result<Option<(Reply, usize)>, String> {
    let Some(end) = buffer.windows(2).position(|pair| pair == b"\r\n") else {
        return Ok(None);
    };
    let line = std::str::from_utf8(&buffer[1..end])
        .map_err(|_| "a reply line that is not UTF-8".to_owned())?;
    let rest = end + 2;
    let number = || {
        line.parse::<i64>()
            .map_err(|_| format!("a bad length or integer {line:?}"))
    };
    let reply = match buffer[0] {
        b'+' => (Reply::Status(line.to_owned()), rest),
        b'-' => (Reply::Error(line.to_owned()), rest),
        b':' => (Reply::Integer(number()?), rest),
        b'$' => match usize::try_from(number()?) {
            Err(_) => (Reply::Bulk(None), rest),
            Ok(len) => {
                let Some(after) = buffer.get(rest + len..rest + len + 2) else {
                    return Ok(None);
                };
                if after != b"\r\n" {
                    return Err("a bulk string not followed by CRLF".to_owned());
                }
                let text = String::from_utf8_lossy(&buffer[rest..rest + len]).into_owned();
                (Reply::Bulk(Some(text)), rest + len + 2)
            }
        },
        b'*' => match usize::try_from(number()?) {
            Err(_) => (Reply::Array(None), rest),
            Ok(len) => {
                let mut items = Vec::with_capacity(len.min(1024));
                let mut at = rest;
                for _ in 0..len {
                    match parse(&buffer[at..])? {
                        Some((item, used)) => {
                            items.push(item);
                            at += used;
                        }
                        None => return Ok(None),
                    }
                }
                (Reply::Array(Some(items)), at)
            }
        },
        other => return Err(format!("an unknown reply type {:?}", char::from(other))),
    };
    Ok(Some(reply))
}

/// The version in `redis-server --version` (`Redis server v=7.0.15
/// sha=...`) or `redis-cli --version` (`redis-cli 7.0.15`) output.
fn version_token(text: &str) -> Option<&str> {
    text.split_whitespace()
        .map(|word| word.strip_prefix("v=").unwrap_or(word))
        .find(|word| parse_major_minor(word).is_some())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[test]
    fn parses_replies() {
        assert_eq!(parse(b""), Ok(None));
        assert_eq!(parse(b"+PO"), Ok(None));
        assert_eq!(
            parse(b"+PONG\r\nextra"),
            Ok(Some((Reply::Status("PONG".to_owned()), 7)))
        );
        assert_eq!(
            parse(b"-ERR nope\r\n"),
            Ok(Some((Reply::Error("ERR nope".to_owned()), 11)))
        );
        assert_eq!(parse(b":-3\r\n"), Ok(Some((Reply::Integer(-3), 5))));
        assert_eq!(parse(b"$3\r\nab"), Ok(None));
        assert_eq!(parse(b"$3\r\nabc\r"), Ok(None));
        assert_eq!(
            parse(b"$4\r\na\r\nb\r\n"),
            Ok(Some((Reply::Bulk(Some("a\r\nb".to_owned())), 10)))
        );
        assert_eq!(parse(b"$-1\r\n"), Ok(Some((Reply::Bulk(None), 5))));
        assert_eq!(parse(b"*-1\r\n"), Ok(Some((Reply::Array(None), 5))));
        let nested = b"*2\r\n*2\r\n$2\r\nip\r\n$9\r\n127.0.0.1\r\n:1\r\n";
        assert_eq!(
            parse(nested),
            Ok(Some((
                Reply::Array(Some(vec![
                    Reply::Array(Some(vec![
                        Reply::Bulk(Some("ip".to_owned())),
                        Reply::Bulk(Some("127.0.0.1".to_owned())),
                    ])),
                    Reply::Integer(1),
                ])),
                nested.len()
            )))
        );
        assert_eq!(parse(&nested[..nested.len() - 1]), Ok(None));
        assert!(parse(b"$3\r\nabcd\r\n").is_err());
        assert!(parse(b"?\r\n").is_err());
    }

    #[test]
    fn encodes_commands() {
        assert_eq!(encode(&["PING"]), b"*1\r\n$4\r\nPING\r\n");
        assert_eq!(
            encode(&["SET", "k", ""]),
            b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$0\r\n\r\n"
        );
    }

    #[test]
    fn reads_info_fields() {
        let info = "# Replication\r\nrole:master\r\nconnected_slaves:1\r\n\
                    slave0:ip=127.0.0.1,port=6380,state=online,offset=42,lag=0\r\n\
                    master_failover_state:no-failover\r\n";
        assert_eq!(info_field(info, "role"), Some("master"));
        assert_eq!(info_field(info, "connected_slaves"), Some("1"));
        assert_eq!(info_field(info, "connected"), None);
        let replicas = replicas_in_info(info);
        assert_eq!(replicas.len(), 1);
        assert_eq!(replicas[0].get("port"), Some(&"6380"));
        assert_eq!(replicas[0].get("state"), Some(&"online"));
        let fields = flat_fields(&Reply::Array(Some(vec![
            Reply::Bulk(Some("name".to_owned())),
            Reply::Bulk(Some("leaseholder".to_owned())),
            Reply::Bulk(Some("num-other-sentinels".to_owned())),
            Reply::Bulk(Some("2".to_owned())),
        ])));
        assert_eq!(
            fields.get("num-other-sentinels").map(String::as_str),
            Some("2")
        );
    }

    #[test]
    fn parses_versions() {
        let server = "Redis server v=7.0.15 sha=00000000:0 malloc=jemalloc-5.3.0 bits=64";
        assert_eq!(version_token(server), Some("7.0.15"));
        assert_eq!(version_token("redis-cli 7.2.4"), Some("7.2.4"));
        assert_eq!(version_token("redis-cli 6.0.16 (git:abc)"), Some("6.0.16"));
        assert_eq!(version_token("no version"), None);
        assert_eq!(parse_major_minor("7.0.15"), Some((7, 0)));
        assert_eq!(parse_major_minor("7.2-rc1"), Some((7, 2)));
        assert_eq!(parse_major_minor("7"), None);
    }

    fn fake_binary(dir: &Path, name: &str, output: &str) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, format!("#!/bin/sh\necho '{output}'\n")).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        path
    }

    #[test]
    fn an_old_redis_is_refused_with_the_version_found_and_needed() {
        let dir = TempDir::new("testkit-redis-version").unwrap();
        let old = fake_binary(dir.path(), "redis-server", "Redis server v=6.0.16 sha=0");
        let error = pick_redis_binary("redis-server", vec![old.clone()]).unwrap_err();
        let message = error.to_string();
        assert!(
            matches!(&error, Error::UnsupportedVersion { binary, found, .. }
                if *binary == old && found == "6.0.16"),
            "{error:?}"
        );
        assert!(message.contains("6.0.16"), "{message}");
        assert!(message.contains("redis-server >= 7.0"), "{message}");
        assert!(message.contains("scripts/setup"), "{message}");

        let new_dir = TempDir::new("testkit-redis-version").unwrap();
        let new = fake_binary(new_dir.path(), "redis-server", "Redis server v=7.2.4 sha=0");
        assert_eq!(
            pick_redis_binary("redis-server", vec![old, new.clone()]).unwrap(),
            new
        );
    }

    #[test]
    fn no_redis_is_a_missing_binary() {
        let error = pick_redis_binary("redis-cli", Vec::new()).unwrap_err();
        assert!(
            matches!(&error, Error::MissingBinary { name, setup, .. }
                if name == "redis-cli >= 7.0" && setup == "scripts/setup"),
            "{error:?}"
        );
    }
}
