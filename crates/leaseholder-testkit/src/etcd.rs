//! Real etcd servers as child processes: a single member ([`EtcdServer`])
//! and a cluster of members ([`EtcdCluster`]).
//!
//! Readiness and state are probed with plain HTTP/1.0 over a TCP
//! connection: `GET /health`, and the gRPC gateway's JSON endpoints
//! `/v3/maintenance/status` and `/v3/cluster/member/list` (a few lines, no
//! client library); [`EtcdServer::ctl`] runs `etcdctl` for anything else.

use std::fs::OpenOptions;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Command as StdCommand, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::process::Command;
use tokio::time::Instant;

use crate::binary::{parse_major_minor, parse_major_minor_patch, pick_accepted};
use crate::peer_links::{Partition, PeerLinks};
use crate::process::{log_tail, wait_stopped};
use crate::{ChildGuard, Error, TempDir, find_binary_candidates, free_port};

/// The oldest etcd (major, minor, patch) of the 3.5 line that
/// [`find_etcd`] and [`find_etcdctl`] accept; see [`etcd_version_accepted`]
/// for the whole rule.
///
/// Before 3.5.13 (and 3.4.31), a Raft leader that stalled (`SIGSTOP`, a
/// slow disk) and then resumed could still revoke leases that its
/// successor had seen renewed (etcd issue 15247), so a lease holder could
/// lose its keys while it rightly believed it held them: a chaos run on
/// Debian 12's 3.4.23 showed overlapping terms each time. The tests pause
/// and cut members on purpose, so they need a server without that bug;
/// `scripts/setup` installs 3.5.16.
pub const MIN_ETCD_VERSION: (u32, u32, u32) = (3, 5, 13);

/// The oldest 3.4 release with the fix that [`MIN_ETCD_VERSION`] is about.
const MIN_ETCD_34: (u32, u32, u32) = (3, 4, 31);

/// What [`find_etcd`] and [`find_etcdctl`] ask for, in errors.
const REQUIRED: &str = ">= 3.5.13 (or 3.4.31+)";

/// Whether the testkit runs etcd (or etcdctl) `version`, e.g. `3.5.16`:
/// 3.4.31 or later in the 3.4 line, [`MIN_ETCD_VERSION`] or later in 3.5,
/// and any release from 3.6 on.
///
/// ```
/// use leaseholder_testkit::etcd_version_accepted;
///
/// assert!(etcd_version_accepted("3.5.16"));
/// assert!(etcd_version_accepted("3.4.31"));
/// assert!(etcd_version_accepted("3.6.0-rc.1"));
/// assert!(!etcd_version_accepted("3.4.23"));
/// assert!(!etcd_version_accepted("3.5.12"));
/// ```
pub fn etcd_version_accepted(version: &str) -> bool {
    match parse_major_minor_patch(version) {
        Some(found @ (3, 4, _)) => found >= MIN_ETCD_34,
        Some(found) => found >= MIN_ETCD_VERSION,
        None => false,
    }
}

/// The `--heartbeat-interval` of every member the testkit starts: how often
/// the Raft leader tells the followers it is alive (etcd's default is
/// 100 ms).
pub const ETCD_HEARTBEAT_INTERVAL: Duration = Duration::from_millis(50);

/// The `--election-timeout` of every member the testkit starts (etcd's
/// default is 1 s): a follower that has not heard from the leader for
/// this long (randomised up to twice as long) starts an election. A new
/// leader is usually elected within one to two of these after the old one
/// died, a little more when two candidates split the vote.
pub const ETCD_ELECTION_TIMEOUT: Duration = Duration::from_millis(500);

/// The command that installs the servers, named in errors.
const SETUP: &str = "scripts/setup";

/// How long a started or restarted single member has to become healthy.
/// A restarted one waits an election timeout or so before it elects
/// itself again.
const READY_DEADLINE: Duration = Duration::from_secs(10);

/// How long a cluster has to come up, or to be healthy with one leader
/// again.
const SETTLE_DEADLINE: Duration = Duration::from_secs(30);

/// Bound on one probe (connect, one HTTP request). `/health` takes up to
/// a second of its own while an election is under way.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// Pause between two failed readiness probes, so the loop does not spin
/// while the server is still binding its ports.
const PROBE_BACKOFF: Duration = Duration::from_millis(20);

/// Pause between two checks of a cluster's state.
const POLL: Duration = Duration::from_millis(50);

/// How long a dropped member has to exit after `SIGKILL`.
const STOP_DEADLINE: Duration = Duration::from_secs(5);

/// How many times a server (or a whole cluster) is started on fresh ports
/// when one it picked was taken before it could bind it.
const START_ATTEMPTS: u32 = 3;

/// The file, in a member's directory, that gets its log (`--log-outputs
/// stderr`) and its output.
const LOG_FILE: &str = "etcd.log";

/// The data directory (`--data-dir`), inside a member's directory; etcd
/// creates it with mode 0700.
const DATA_DIR: &str = "data";

/// Finds the first `etcd` on `PATH` whose `--version`
/// [`etcd_version_accepted`] takes.
///
/// Returns [`Error::MissingBinary`], naming `scripts/setup`, if there is no
/// `etcd` on `PATH`, and [`Error::UnsupportedVersion`] (with the version
/// found and the one needed) if every one there is too old. Blocks while
/// the candidates run.
pub fn find_etcd() -> Result<PathBuf, Error> {
    pick_etcd_binary("etcd", find_binary_candidates("etcd", &[]))
}

/// Finds the first `etcdctl` on `PATH` whose `version` (with
/// `ETCDCTL_API=3`) [`etcd_version_accepted`] takes, like [`find_etcd`].
pub fn find_etcdctl() -> Result<PathBuf, Error> {
    pick_etcd_binary("etcdctl", find_binary_candidates("etcdctl", &[]))
}

/// The first of `candidates` whose version [`etcd_version_accepted`]
/// takes.
fn pick_etcd_binary(name: &str, candidates: Vec<PathBuf>) -> Result<PathBuf, Error> {
    pick_accepted(
        candidates,
        &format!("{name} {REQUIRED}"),
        SETUP,
        |path| version_text(path, name).and_then(|text| version_token(&text).map(str::to_owned)),
        etcd_version_accepted,
    )
}

/// What `etcd --version` or `etcdctl version` prints (`etcdctl` has no
/// `--version` with the v3 API), or `None` if it fails.
fn version_text(path: &Path, name: &str) -> Option<String> {
    let mut command = StdCommand::new(path);
    clean_env(&mut command);
    if name == "etcdctl" {
        command.arg("version").env("ETCDCTL_API", "3");
    } else {
        command.arg("--version");
    }
    let output = command.stdin(Stdio::null()).output().ok()?;
    output
        .status
        .success()
        .then(|| String::from_utf8_lossy(&output.stdout).into_owned())
}

/// Removes the `ETCD_*` and `ETCDCTL_*` variables from `command`'s
/// environment: both programs read them as flags, and one set in the
/// developer's shell (an `ETCDCTL_ENDPOINTS`, say) would change what the
/// testkit starts or talks to.
fn clean_env(command: &mut StdCommand) {
    for (key, _) in std::env::vars_os() {
        let key_text = key.to_string_lossy();
        if key_text.starts_with("ETCD_") || key_text.starts_with("ETCDCTL_") {
            command.env_remove(&key);
        }
    }
}

/// `etcdctl`, found once per process.
fn etcdctl() -> Result<PathBuf, Error> {
    static CTL: OnceLock<PathBuf> = OnceLock::new();
    if let Some(path) = CTL.get() {
        return Ok(path.clone());
    }
    let path = find_etcdctl()?;
    Ok(CTL.get_or_init(|| path).clone())
}

/// What a member reports about itself and its cluster in
/// `/v3/maintenance/status` (what `etcdctl endpoint status` shows), as
/// read by [`EtcdServer::status`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct EtcdStatus {
    /// The member's ID (what `etcdctl member list` shows in hexadecimal).
    pub member_id: u64,
    /// The ID of the member this one takes to be the Raft leader, or 0 if
    /// it knows of none.
    pub leader: u64,
    /// The Raft term the member is in; each election starts a new one.
    pub raft_term: u64,
    /// The Raft index of the member's last log entry.
    pub raft_index: u64,
    /// The key-value store's revision as of the member's last applied
    /// entry.
    pub revision: i64,
    /// The server's version, e.g. `3.4.23`.
    pub version: String,
}

impl EtcdStatus {
    /// Whether the member takes itself to be the Raft leader.
    pub fn is_leader(&self) -> bool {
        self.member_id != 0 && self.leader == self.member_id
    }
}

/// How a member is started: its place in a cluster.
#[derive(Debug, Clone)]
struct Membership {
    /// `--name`, unique within the process.
    name: String,
    /// `--initial-cluster`: `name=http://127.0.0.1:PEER_PORT,...` for every
    /// member.
    initial_cluster: String,
    /// `--initial-cluster-token`, unique per cluster, so that members of
    /// two clusters never join up (when a port is reused, say).
    token: String,
}

/// A single etcd member running as a child process, on a free `127.0.0.1`
/// client port ([`endpoint`](Self::endpoint)) and a free peer port, with
/// its own temporary directory: the data directory `data` and the log
/// `etcd.log` are there. The members of an [`EtcdCluster`] are
/// `EtcdServer`s too.
///
/// Every member runs with `--heartbeat-interval`
/// [`ETCD_HEARTBEAT_INTERVAL`], `--election-timeout`
/// [`ETCD_ELECTION_TIMEOUT`], `--logger zap --log-level warn
/// --log-outputs stderr`, and a unique `--name` and
/// `--initial-cluster-token`. etcd always persists what it acknowledged
/// (its write-ahead log is `fsync`ed), so whatever was written before a
/// [`kill`](Self::kill) is there again after a [`restart`](Self::restart),
/// which keeps the ports, the directory and the flags. Dropping the value
/// kills the process and blocks the thread until it has exited (a few
/// milliseconds), then removes the directory.
///
/// Must be started, used and dropped within a Tokio runtime with the time,
/// I/O and process drivers enabled.
#[derive(Debug)]
pub struct EtcdServer {
    // Field order matters: the child is dropped (and killed) before its
    // directory is removed.
    child: ChildGuard,
    dir: TempDir,
    binary: PathBuf,
    client_port: u16,
    peer_port: u16,
    /// The peer port the other members dial (`--initial-advertise-peer-urls`):
    /// the peer port itself, or in a cluster the port of its front (see
    /// [`EtcdCluster::isolate`]).
    advertised_peer_port: u16,
    /// In a cluster: the fronts' shared state and this member's index, to
    /// record each new PID in.
    partition: Option<(Arc<Partition>, usize)>,
    membership: Membership,
    /// The member ID, learnt when the member first became ready (0 until
    /// then); it is the same after a restart.
    member_id: u64,
    version: String,
}

impl EtcdServer {
    /// Starts a single-member etcd (found with [`find_etcd`]) and waits
    /// until it is healthy (`GET /health` answers `true`, so it has
    /// elected itself and serves reads) and the member answering on its
    /// port is this one. Takes a few hundred milliseconds.
    ///
    /// Returns [`Error::MissingBinary`] or [`Error::UnsupportedVersion`]
    /// (naming `scripts/setup`) if there is no suitable binary, and
    /// [`Error::NotReady`] or [`Error::CommandFailed`] if the server does
    /// not come up. A port taken by another process before the server could
    /// bind it is retried on fresh ones.
    pub async fn start() -> Result<Self, Error> {
        let binary = find_etcd()?;
        let mut attempt = 1;
        loop {
            let client_port = free_port()?;
            let peer_port = other_free_port(&[client_port])?;
            let token = unique_name();
            let name = format!("{token}-m0");
            let membership = Membership {
                initial_cluster: format!("{name}={}", local_url(peer_port)),
                name,
                token,
            };
            let mut server = Self::spawn_new(
                &binary,
                client_port,
                (peer_port, peer_port),
                None,
                membership,
            )?;
            match server.wait_ready(READY_DEADLINE).await {
                Ok(()) => return Ok(server),
                Err(error) if attempt < START_ATTEMPTS && port_taken(&error) => {
                    tracing::debug!(attempt, client_port, peer_port, "an etcd port was taken");
                    attempt += 1;
                }
                Err(error) => return Err(error),
            }
        }
    }

    /// Spawns a member with a fresh directory, without waiting for it to be
    /// ready.
    /// `peer_ports`: the one it listens on, the one it advertises.
    fn spawn_new(
        binary: &Path,
        client_port: u16,
        peer_ports: (u16, u16),
        partition: Option<(Arc<Partition>, usize)>,
        membership: Membership,
    ) -> Result<Self, Error> {
        let dir = TempDir::new("leaseholder-etcd")?;
        let (peer_port, advertised_peer_port) = peer_ports;
        let child = spawn(
            binary,
            dir.path(),
            &args(dir.path(), client_port, peer_ports, &membership),
        )?;
        let server = Self {
            child,
            dir,
            binary: binary.to_owned(),
            client_port,
            peer_port,
            advertised_peer_port,
            partition,
            membership,
            member_id: 0,
            version: String::new(),
        };
        server.record_pid();
        Ok(server)
    }

    /// Tells the cluster's peer fronts the current PID.
    fn record_pid(&self) {
        if let Some((partition, i)) = &self.partition {
            partition.set_pid(*i, self.child.pid());
        }
    }

    /// The client URL, `http://127.0.0.1:PORT`, as etcd clients and
    /// `etcdctl --endpoints` take it.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr())
    }

    /// The client port (`--listen-client-urls`).
    pub fn client_port(&self) -> u16 {
        self.client_port
    }

    /// The client address, `127.0.0.1:PORT`.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, self.client_port))
    }

    /// The peer port (`--listen-peer-urls`), which the members of a cluster
    /// talk Raft on.
    pub fn peer_port(&self) -> u16 {
        self.peer_port
    }

    /// The peer port the other members dial (`--initial-advertise-peer-urls`):
    /// [`peer_port`](Self::peer_port) for a single member; in an
    /// [`EtcdCluster`] the port of the member's front, which forwards to
    /// it (see [`EtcdCluster::isolate`]).
    pub fn advertised_peer_port(&self) -> u16 {
        self.advertised_peer_port
    }

    /// The member's name (`--name`), unique within this process.
    pub fn name(&self) -> &str {
        &self.membership.name
    }

    /// The member's ID, as [`EtcdStatus::member_id`] and
    /// [`EtcdStatus::leader`] name it.
    pub fn member_id(&self) -> u64 {
        self.member_id
    }

    /// The member's directory: the data directory `data` and the log
    /// `etcd.log`.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The PID of the current process (it changes on
    /// [`restart`](Self::restart)).
    pub fn pid(&self) -> u32 {
        self.child.pid()
    }

    /// The server's version as it reports it, e.g. `3.4.23`.
    pub fn version(&self) -> &str {
        &self.version
    }

    /// The server's (major, minor) version, if [`version`](Self::version)
    /// parses.
    pub fn version_major_minor(&self) -> Option<(u32, u32)> {
        parse_major_minor(&self.version)
    }

    /// Freezes the member with `SIGSTOP`, and returns once it is stopped:
    /// connections stay open, new ones are accepted by the kernel, and
    /// nothing is answered, neither clients nor peers. See
    /// [`ChildGuard::pause`].
    pub fn pause(&self) -> Result<(), Error> {
        self.child.pause()?;
        wait_stopped(&[self.child.pid()]);
        Ok(())
    }

    /// Wakes a member frozen by [`pause`](Self::pause) with `SIGCONT`.
    pub fn resume(&self) -> Result<(), Error> {
        self.child.resume()
    }

    /// Kills the member with `SIGKILL` (a crash) and waits until it has
    /// exited. Works on a paused member too. The directory is kept;
    /// [`restart`](Self::restart) brings the member back.
    pub async fn kill(&mut self) -> Result<(), Error> {
        self.child.kill().await
    }

    /// Kills the member (if it is running) and starts it again on the same
    /// ports with the same directory and flags, then waits until it is
    /// healthy again, as [`start`](Self::start) does. The data directory
    /// holds the member's identity and its data: etcd ignores the
    /// `--initial-cluster` flags then, so the same `new` cluster state
    /// works, for a single member and for one that rejoins its cluster.
    ///
    /// A single member elects itself again after about an election
    /// timeout; a cluster member is healthy once it has caught up with the
    /// leader, so with a majority of the cluster down this fails after
    /// 10 s.
    pub async fn restart(&mut self) -> Result<(), Error> {
        self.child.kill().await?;
        self.child = spawn(&self.binary, self.dir.path(), &self.args())?;
        self.record_pid();
        self.wait_ready(READY_DEADLINE).await
    }

    /// Probes the member once: `GET /health`, expecting `{"health":"true"}`,
    /// which etcd answers only if the member knows a leader and a read
    /// through Raft succeeds (without a leader it answers `false`, after
    /// up to a second).
    ///
    /// Has no timeout of its own (a paused member accepts the connection
    /// but never answers), so wrap it in [`tokio::time::timeout`].
    pub async fn ping(&self) -> Result<(), Error> {
        let addr = self.addr();
        let (code, body) = http(addr, "GET", "/health", None).await?;
        let health = serde_json::from_str::<Value>(&body)
            .ok()
            .and_then(|json| json.get("health")?.as_str().map(str::to_owned));
        if code == 200 && health.as_deref() == Some("true") {
            Ok(())
        } else {
            Err(Error::io(
                format!("GET http://{addr}/health"),
                std::io::Error::other(format!("unhealthy: {code} {}", body.trim())),
            ))
        }
    }

    /// The member's status, from the gRPC gateway's
    /// `/v3/maintenance/status` (what `etcdctl endpoint status` shows).
    ///
    /// Has no timeout of its own, like [`ping`](Self::ping); etcd answers
    /// it without a leader too.
    pub async fn status(&self) -> Result<EtcdStatus, Error> {
        status(self.addr()).await
    }

    /// Runs `etcdctl --endpoints=http://127.0.0.1:PORT ARGS...` with
    /// `ETCDCTL_API=3` (and no other `ETCDCTL_*` variables) and returns its
    /// standard output without the trailing newline, e.g. `OK` for `["put",
    /// "k", "v"]`, or `k\nv` for `["get", "k"]`. Another `--endpoints` in
    /// `args` adds to this one rather than replacing it; see
    /// [`EtcdCluster::ctl`] for every member of a cluster.
    ///
    /// A failure (an error from the server, or not reaching it within
    /// `etcdctl`'s own `--dial-timeout` of 2 s and `--command-timeout` of
    /// 5 s) is [`Error::CommandFailed`], with `etcdctl`'s output. Wrap it in
    /// [`tokio::time::timeout`] for a shorter bound; the `etcdctl` process
    /// is killed when the future is dropped.
    pub async fn ctl(&self, args: &[&str]) -> Result<String, Error> {
        let endpoints = format!("--endpoints={}", self.endpoint());
        let mut full = vec![endpoints.as_str()];
        full.extend_from_slice(args);
        run_ctl(&etcdctl()?, &full).await
    }

    /// Probes until the member is healthy and is the member answering on
    /// its port, or `deadline` passes, and fails at once if the process
    /// exits (with the end of its log).
    async fn wait_ready(&mut self, deadline: Duration) -> Result<(), Error> {
        let start = Instant::now();
        loop {
            self.check_running()?;
            let last_error = match tokio::time::timeout(PROBE_TIMEOUT, self.probe_ready()).await {
                Ok(Ok((member_id, version))) => {
                    self.member_id = member_id;
                    self.version = version;
                    tracing::debug!(
                        binary = %self.binary.display(),
                        name = %self.membership.name,
                        endpoint = %self.endpoint(),
                        version = %self.version,
                        elapsed = ?start.elapsed(),
                        "etcd ready"
                    );
                    return Ok(());
                }
                Ok(Err(e)) => e,
                Err(_) => format!("no answer within {PROBE_TIMEOUT:?}"),
            };
            if start.elapsed() + PROBE_BACKOFF >= deadline {
                return Err(Error::NotReady {
                    server: format!("{} at {}", self.binary.display(), self.endpoint()),
                    waited: start.elapsed(),
                    last_error: format!("{last_error}; {}", log_tail(&self.log_path())),
                });
            }
            tokio::time::sleep(PROBE_BACKOFF).await;
        }
    }

    /// Waits until the member answers `GET /members` on its peer port,
    /// which it does once it has bootstrapped, before it has a leader;
    /// fails at once if the process exits.
    ///
    /// A fresh member of a multi-member cluster first asks the other
    /// members' peer URLs, in string order, whether it already belongs to
    /// the cluster, and stops at the first answer: one that is not
    /// listening yet refuses the connection at once, but one that listens
    /// and has not bootstrapped yet leaves the request hanging for etcd's
    /// 1 s bootstrap timeout. Started all at once, every member would wait
    /// that long for each other member; started after a first member that
    /// serves its peer port, and sorts first, none waits.
    async fn wait_serving_peers(&mut self) -> Result<(), Error> {
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, self.peer_port));
        let start = Instant::now();
        loop {
            self.check_running()?;
            let last_error = match tokio::time::timeout(
                PROBE_TIMEOUT,
                http(addr, "GET", "/members", None),
            )
            .await
            {
                Ok(Ok((200, _))) => return Ok(()),
                Ok(Ok((code, body))) => format!("{code} {}", body.trim()),
                Ok(Err(e)) => e.to_string(),
                Err(_) => format!("no answer within {PROBE_TIMEOUT:?}"),
            };
            if start.elapsed() + PROBE_BACKOFF >= READY_DEADLINE {
                return Err(Error::NotReady {
                    server: format!("etcd peer port http://{addr}"),
                    waited: start.elapsed(),
                    last_error: format!("{last_error}; {}", log_tail(&self.log_path())),
                });
            }
            tokio::time::sleep(PROBE_BACKOFF).await;
        }
    }

    /// [`Error::CommandFailed`], with the end of the log, if the process
    /// has exited.
    fn check_running(&mut self) -> Result<(), Error> {
        match self.child.try_wait()? {
            None => Ok(()),
            Some(status) => Err(Error::CommandFailed {
                command: format!("{} {}", self.binary.display(), self.args().join(" ")),
                status,
                output: log_tail(&self.log_path()),
            }),
        }
    }

    /// One readiness probe: healthy, and the member answering is this one
    /// (its member list names it, by our unique name, as the member that
    /// answers), not a member of someone else's cluster that took the port.
    /// Returns the member ID and the version.
    async fn probe_ready(&self) -> Result<(u64, String), String> {
        self.ping().await.map_err(|e| e.to_string())?;
        let status = self.status().await.map_err(|e| e.to_string())?;
        let members = member_list(self.addr()).await.map_err(|e| e.to_string())?;
        let answering = members
            .iter()
            .find(|member| member.id == status.member_id)
            .map(|member| member.name.as_str());
        if answering != Some(self.membership.name.as_str()) {
            return Err(format!(
                "another member answers on {}: {answering:?}, not {}",
                self.endpoint(),
                self.membership.name
            ));
        }
        if self.member_id != 0 && status.member_id != self.member_id {
            return Err(format!(
                "member {:x} answers, not {:x}",
                status.member_id, self.member_id
            ));
        }
        Ok((status.member_id, status.version))
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join(LOG_FILE)
    }

    fn args(&self) -> Vec<String> {
        args(
            self.dir.path(),
            self.client_port,
            (self.peer_port, self.advertised_peer_port),
            &self.membership,
        )
    }
}

impl Drop for EtcdServer {
    fn drop(&mut self) {
        // Reaped here, so that no zombie outlives the test (see
        // `ChildGuard::kill_blocking`) and nothing writes to the directory
        // while it is removed.
        self.child.kill_blocking(STOP_DEADLINE);
    }
}

/// An etcd cluster on `127.0.0.1`: each member an [`EtcdServer`] on its own
/// free client and peer ports, with its own directory, all started
/// together with the same `--initial-cluster` (every member's peer URL)
/// and a unique `--initial-cluster-token`.
///
/// [`kill`](Self::kill) and [`restart`](Self::restart) act on one member;
/// a restarted member keeps its ports and its data directory (so its
/// identity and data), and rejoins. [`isolate`](Self::isolate) cuts one
/// member off from the others while its clients still reach it, and
/// [`heal`](Self::heal) joins it up again: the members of a cluster
/// advertise peer URLs of fronts in this process, which forward to their
/// peer ports. Every member is killed when the value is dropped.
#[derive(Debug)]
pub struct EtcdCluster {
    // The members are dropped (killed) before their fronts.
    members: Vec<EtcdServer>,
    token: String,
    /// The fronts of the members' peer ports (clusters of 2 or more).
    links: Option<PeerLinks>,
}

impl EtcdCluster {
    /// Starts `n` members (at least 1; 3 tolerate the loss of one) and
    /// waits until every one is healthy and they agree on one leader: see
    /// [`wait_healthy`](Self::wait_healthy). The first member is started
    /// alone, and the others once it serves its peer port: started all at
    /// once, each would wait a second per other member while bootstrapping
    /// (see `wait_serving_peers` in the source). Takes about half a second
    /// for 3 members.
    ///
    /// A member that loses the race for one of its ports (to another
    /// process that took it after [`free_port`] released it) fails to
    /// bind; the whole cluster is then started again on fresh ports, a few
    /// times.
    pub async fn start(n: usize) -> Result<Self, Error> {
        if n == 0 {
            return Err(Error::io(
                "starting an etcd cluster",
                std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    "an etcd cluster needs at least 1 member",
                ),
            ));
        }
        let binary = find_etcd()?;
        let started = Instant::now();
        let mut attempt = 1;
        loop {
            match Self::start_once(&binary, n).await {
                Err(error) if attempt < START_ATTEMPTS && port_taken(&error) => {
                    tracing::debug!(attempt, "an etcd cluster port was taken; starting again");
                    attempt += 1;
                }
                Ok(cluster) => {
                    tracing::debug!(
                        endpoints = ?cluster.endpoints(),
                        elapsed = ?started.elapsed(),
                        "etcd cluster ready"
                    );
                    return Ok(cluster);
                }
                Err(error) => return Err(error),
            }
        }
    }

    async fn start_once(binary: &Path, n: usize) -> Result<Self, Error> {
        let token = unique_name();
        let mut ports = Vec::with_capacity(2 * n);
        for _ in 0..2 * n {
            let port = other_free_port(&ports)?;
            ports.push(port);
        }
        let (client_ports, peer_ports) = ports.split_at(n);
        // A cluster's members advertise the ports of fronts that forward to
        // their peer ports, so that one can be cut off (`isolate`).
        let mut links = if n > 1 {
            Some(PeerLinks::bind(n, &ports).await?)
        } else {
            None
        };
        // The first member gets the first peer URL in string order, the
        // one the others ask first (see `wait_serving_peers`).
        let advertised: Vec<u16> = match &mut links {
            Some(links) => {
                links.sort_by_url();
                links.start(peer_ports);
                links.ports().to_vec()
            }
            None => peer_ports.to_vec(),
        };
        let partition = links.as_ref().map(PeerLinks::partition);
        let names: Vec<String> = (0..n).map(|i| format!("{token}-m{i}")).collect();
        let initial_cluster = names
            .iter()
            .zip(advertised.iter())
            .map(|(name, &port)| format!("{name}={}", local_url(port)))
            .collect::<Vec<_>>()
            .join(",");
        let mut cluster = Self {
            members: Vec::with_capacity(n),
            token,
            links,
        };
        for (i, name) in names.into_iter().enumerate() {
            let membership = Membership {
                name,
                initial_cluster: initial_cluster.clone(),
                token: cluster.token.clone(),
            };
            cluster.members.push(EtcdServer::spawn_new(
                binary,
                client_ports[i],
                (peer_ports[i], advertised[i]),
                partition.clone().map(|p| (p, i)),
                membership,
            )?);
            if i == 0 && n > 1 {
                cluster.members[0].wait_serving_peers().await?;
            }
        }
        cluster.wait_members_ready().await?;
        cluster.wait_healthy().await?;
        Ok(cluster)
    }

    /// Waits until every freshly spawned member is ready (see
    /// [`EtcdServer::start`]); fails at once if any of them exits.
    async fn wait_members_ready(&mut self) -> Result<(), Error> {
        let start = Instant::now();
        let mut ready = vec![false; self.members.len()];
        loop {
            let mut last_error = None;
            for (member, ready) in self.members.iter_mut().zip(&mut ready) {
                member.check_running()?;
                if *ready {
                    continue;
                }
                match tokio::time::timeout(PROBE_TIMEOUT, member.probe_ready()).await {
                    Ok(Ok((member_id, version))) => {
                        member.member_id = member_id;
                        member.version = version;
                        *ready = true;
                    }
                    Ok(Err(e)) => last_error = Some(format!("{}: {e}", member.endpoint())),
                    Err(_) => {
                        last_error = Some(format!(
                            "{}: no answer within {PROBE_TIMEOUT:?}",
                            member.endpoint()
                        ));
                    }
                }
            }
            let Some(last_error) = last_error else {
                return Ok(());
            };
            if start.elapsed() + POLL >= SETTLE_DEADLINE {
                let logs = self
                    .members
                    .iter()
                    .map(|member| log_tail(&member.log_path()))
                    .collect::<Vec<_>>()
                    .join("\n");
                return Err(Error::NotReady {
                    server: format!("etcd cluster {}", self.endpoints().join(",")),
                    waited: start.elapsed(),
                    last_error: format!("{last_error}; {logs}"),
                });
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// The members, in start order.
    pub fn members(&self) -> &[EtcdServer] {
        &self.members
    }

    /// Member `i`. Panics if there is no such member.
    pub fn member(&self, i: usize) -> &EtcdServer {
        &self.members[i]
    }

    /// Member `i`, to [`pause`](EtcdServer::pause),
    /// [`kill`](EtcdServer::kill) or [`restart`](EtcdServer::restart) it
    /// without waiting for the cluster. Panics if there is no such member.
    pub fn member_mut(&mut self, i: usize) -> &mut EtcdServer {
        &mut self.members[i]
    }

    /// Every member's client URL, `http://127.0.0.1:PORT`, in start order,
    /// as etcd clients take them.
    pub fn endpoints(&self) -> Vec<String> {
        self.members.iter().map(EtcdServer::endpoint).collect()
    }

    /// The number of members.
    pub fn len(&self) -> usize {
        self.members.len()
    }

    /// Whether the cluster has no members (never true for a started one).
    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    /// The `--initial-cluster-token` shared by the members, unique within
    /// this process.
    pub fn token(&self) -> &str {
        &self.token
    }

    /// Which member is the Raft leader, asked once: every member that
    /// answers its status request within 2 s must name the same leader,
    /// and that member must answer too and name itself. A killed or paused
    /// member does not answer and is not counted.
    ///
    /// Returns [`Error::NotReady`] if that is not so: no member answers,
    /// or one knows of no leader (an election is under way), or they
    /// disagree, or they name a leader that does not answer (it just died,
    /// and the others have not noticed yet). See
    /// [`wait_leader`](Self::wait_leader) to wait for a leader.
    pub async fn leader_index(&self) -> Result<usize, Error> {
        self.check_leader()
            .await
            .map_err(|problem| Error::NotReady {
                server: format!("etcd cluster {}", self.endpoints().join(",")),
                waited: Duration::ZERO,
                last_error: problem,
            })
    }

    /// Waits until [`leader_index`](Self::leader_index) finds a leader, and
    /// returns it; fails with [`Error::NotReady`] after 30 s. After the
    /// leader was killed, that is about one to two
    /// [`ETCD_ELECTION_TIMEOUT`]s.
    pub async fn wait_leader(&self) -> Result<usize, Error> {
        let start = Instant::now();
        loop {
            let last_error = match self.check_leader().await {
                Ok(i) => return Ok(i),
                Err(problem) => problem,
            };
            if start.elapsed() + POLL >= SETTLE_DEADLINE {
                return Err(Error::NotReady {
                    server: format!("a leader of etcd cluster {}", self.endpoints().join(",")),
                    waited: start.elapsed(),
                    last_error,
                });
            }
            tokio::time::sleep(POLL).await;
        }
    }

    async fn check_leader(&self) -> Result<usize, String> {
        let mut leader = None;
        let mut answered = Vec::with_capacity(self.members.len());
        for (i, member) in self.members.iter().enumerate() {
            let status = match tokio::time::timeout(PROBE_TIMEOUT, member.status()).await {
                Ok(Ok(status)) => status,
                Ok(Err(_)) | Err(_) => continue,
            };
            if status.leader == 0 {
                return Err(format!("{} knows of no leader", member.endpoint()));
            }
            match leader {
                Some(other) if other != status.leader => {
                    return Err(format!(
                        "the members name both {other:x} and {:x} as the leader",
                        status.leader
                    ));
                }
                _ => leader = Some(status.leader),
            }
            answered.push((i, status));
        }
        let leader = leader.ok_or_else(|| "no member answers".to_owned())?;
        answered
            .iter()
            .find(|(_, status)| status.member_id == leader && status.is_leader())
            .map(|&(i, _)| i)
            .ok_or_else(|| format!("the members name {leader:x}, which does not answer"))
    }

    /// Runs `etcdctl --endpoints=URL,URL,... ARGS...` with every member's
    /// endpoint, otherwise like [`EtcdServer::ctl`]: `etcdctl` sends a
    /// request to one member that answers (`["put", "k", "v"]`), or to each
    /// of them (`["endpoint", "status"]`, which fails if one does not
    /// answer).
    pub async fn ctl(&self, args: &[&str]) -> Result<String, Error> {
        let endpoints = format!("--endpoints={}", self.endpoints().join(","));
        let mut full = vec![endpoints.as_str()];
        full.extend_from_slice(args);
        run_ctl(&etcdctl()?, &full).await
    }

    /// Kills member `i` with `SIGKILL` and waits until it has exited; its
    /// ports and data directory are kept for [`restart`](Self::restart).
    /// If it was the leader, the others elect a new one (see
    /// [`wait_leader`](Self::wait_leader)) if they are a majority.
    pub async fn kill(&mut self, i: usize) -> Result<(), Error> {
        self.members[i].kill().await
    }

    /// Restarts member `i` (killing it first if it runs) and waits until
    /// it is healthy, then until the whole cluster is (see
    /// [`wait_healthy`](Self::wait_healthy)). The member rejoins with its
    /// data directory, and catches up with the leader.
    pub async fn restart(&mut self, i: usize) -> Result<(), Error> {
        self.members[i].restart().await?;
        self.wait_healthy().await
    }

    /// Cuts member `i` off from the other members, as on the minority side
    /// of a network partition, until [`heal`](Self::heal): every
    /// connection between it and another member is closed, and new ones
    /// are closed as soon as they are accepted, both ways. Its clients
    /// still reach it (a member without a quorum answers no linearizable
    /// request; a Raft leader steps down after an election timeout, as etcd
    /// checks its quorum), and so do the testkit's probes.
    ///
    /// Each member advertises the address of a front that forwards to its
    /// peer port and tells which member dialed a connection by the process
    /// that owns the other end (`/proc/net/tcp` and `/proc/<pid>/fd`), so
    /// this works on Linux only; elsewhere, and for a single member, it
    /// fails with [`Error::Io`]. Panics if there is no member `i`.
    pub fn isolate(&self, i: usize) -> Result<(), Error> {
        assert!(i < self.members.len(), "there is no member {i}");
        match &self.links {
            Some(links) => links.isolate(i),
            None => Err(Error::io(
                "cutting an etcd member off",
                std::io::Error::new(
                    std::io::ErrorKind::Unsupported,
                    "a single member has no peers to be cut off from",
                ),
            )),
        }
    }

    /// Lets member `i` reach the other members again after
    /// [`isolate`](Self::isolate); they dial each other again on their own
    /// (see [`wait_healthy`](Self::wait_healthy) to wait for it).
    pub fn heal(&self, i: usize) {
        if let Some(links) = &self.links {
            links.heal(i);
        }
    }

    /// Waits until every member answers `GET /health` with `true` and the
    /// members agree on one leader (see
    /// [`leader_index`](Self::leader_index)). A killed or paused member is
    /// not healthy: this then fails with [`Error::NotReady`] after 30 s.
    pub async fn wait_healthy(&self) -> Result<(), Error> {
        let start = Instant::now();
        loop {
            let last_error = match self.check_healthy().await {
                Ok(()) => return Ok(()),
                Err(problem) => problem,
            };
            if start.elapsed() + POLL >= SETTLE_DEADLINE {
                return Err(Error::NotReady {
                    server: format!("etcd cluster {}", self.endpoints().join(",")),
                    waited: start.elapsed(),
                    last_error,
                });
            }
            tokio::time::sleep(POLL).await;
        }
    }

    async fn check_healthy(&self) -> Result<(), String> {
        for member in &self.members {
            match tokio::time::timeout(PROBE_TIMEOUT, member.ping()).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return Err(e.to_string()),
                Err(_) => {
                    return Err(format!(
                        "{}: no answer to GET /health within {PROBE_TIMEOUT:?}",
                        member.endpoint()
                    ));
                }
            }
        }
        self.check_leader().await.map(drop)
    }
}

/// A member as `/v3/cluster/member/list` lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Member {
    id: u64,
    name: String,
}

/// `/v3/maintenance/status` on `addr`.
async fn status(addr: SocketAddr) -> Result<EtcdStatus, Error> {
    let path = "/v3/maintenance/status";
    let json = gateway(addr, path).await?;
    parse_status(&json).ok_or_else(|| bad_reply(addr, path, &json))
}

/// `/v3/cluster/member/list` on `addr`.
async fn member_list(addr: SocketAddr) -> Result<Vec<Member>, Error> {
    let path = "/v3/cluster/member/list";
    let json = gateway(addr, path).await?;
    parse_members(&json).ok_or_else(|| bad_reply(addr, path, &json))
}

fn parse_status(json: &Value) -> Option<EtcdStatus> {
    let header = json.get("header")?;
    Some(EtcdStatus {
        member_id: number(header.get("member_id")?)?,
        // Fields at their zero value are left out of the JSON.
        leader: json.get("leader").map_or(Some(0), number)?,
        raft_term: json.get("raftTerm").map_or(Some(0), number)?,
        raft_index: json.get("raftIndex").map_or(Some(0), number)?,
        revision: header
            .get("revision")
            .map_or(Some(0), |value| number(value)?.try_into().ok())?,
        version: json.get("version")?.as_str()?.to_owned(),
    })
}

fn parse_members(json: &Value) -> Option<Vec<Member>> {
    json.get("members")?
        .as_array()?
        .iter()
        .map(|member| {
            Some(Member {
                id: number(member.get("ID")?)?,
                // A member that was added but has not started yet has no
                // name.
                name: member
                    .get("name")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_owned(),
            })
        })
        .collect()
}

/// A 64-bit integer in the gateway's JSON, which writes them as strings
/// (`"member_id":"3319814642761637952"`); plain numbers are accepted too.
fn number(value: &Value) -> Option<u64> {
    match value {
        Value::String(text) => text.parse().ok(),
        Value::Number(number) => number.as_u64(),
        _ => None,
    }
}

fn bad_reply(addr: SocketAddr, path: &str, json: &Value) -> Error {
    Error::io(
        format!("POST http://{addr}{path}"),
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("unexpected reply {json}"),
        ),
    )
}

/// `POST path` with an empty JSON request on the gRPC gateway of `addr`;
/// the reply, which must be a JSON object with status 200.
async fn gateway(addr: SocketAddr, path: &str) -> Result<Value, Error> {
    let context = || format!("POST http://{addr}{path}");
    let (code, body) = http(addr, "POST", path, Some("{}")).await?;
    let json = serde_json::from_str::<Value>(&body).map_err(|e| {
        Error::io(
            context(),
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("{e}: {code} {}", body.trim()),
            ),
        )
    })?;
    if code == 200 && json.is_object() {
        Ok(json)
    } else {
        Err(Error::io(
            context(),
            std::io::Error::other(format!("{code} {}", body.trim())),
        ))
    }
}

/// One HTTP/1.0 request to `addr`; the status code and the body.
///
/// The reply is read up to the end of its `Content-Length`, not to the end
/// of the stream: etcd 3.4 answers a connection that was accepted (by the
/// kernel) before it served the port, but never closes it.
async fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> Result<(u16, String), Error> {
    let context = || format!("{method} http://{addr}{path}");
    let mut stream = TcpStream::connect(addr)
        .await
        .map_err(|e| Error::io(context(), e))?;
    let mut request = format!("{method} {path} HTTP/1.0\r\nHost: {addr}\r\n");
    if let Some(body) = body {
        request.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        ));
    } else {
        request.push_str("\r\n");
    }
    stream
        .write_all(request.as_bytes())
        .await
        .map_err(|e| Error::io(context(), e))?;
    let mut response = Vec::new();
    loop {
        let read = stream
            .read_buf(&mut response)
            .await
            .map_err(|e| Error::io(context(), e))?;
        match parse_response(&response, read == 0) {
            Ok(Some(reply)) => return Ok(reply),
            Ok(None) if read > 0 => {}
            Ok(None) | Err(()) => {
                return Err(Error::io(
                    context(),
                    std::io::Error::new(
                        std::io::ErrorKind::InvalidData,
                        format!(
                            "not a complete HTTP response: {:?}",
                            String::from_utf8_lossy(&response[..response.len().min(200)])
                        ),
                    ),
                ));
            }
        }
    }
}

/// The status code and the body of the HTTP/1.x response in `response`
/// (all of it if `eof`, the stream having ended): `Ok(None)` if it is not
/// all there yet, `Err` if it is not one. Without a `Content-Length`, the
/// body is everything up to the end of the stream.
fn parse_response(response: &[u8], eof: bool) -> Result<Option<(u16, String)>, ()> {
    let Some(head_end) = response.windows(4).position(|w| w == b"\r\n\r\n") else {
        return Ok(None);
    };
    let head = std::str::from_utf8(&response[..head_end]).map_err(drop)?;
    let mut lines = head.split("\r\n");
    let mut words = lines.next().ok_or(())?.split(' ');
    if !words.next().ok_or(())?.starts_with("HTTP/1.") {
        return Err(());
    }
    let code = words.next().ok_or(())?.parse().map_err(drop)?;
    let length = lines
        .filter_map(|line| line.split_once(':'))
        .find(|(name, _)| name.trim().eq_ignore_ascii_case("content-length"))
        .map(|(_, value)| value.trim().parse::<usize>().map_err(drop))
        .transpose()?;
    let body = &response[head_end + 4..];
    let text = |bytes: &[u8]| Some((code, String::from_utf8_lossy(bytes).into_owned()));
    match length {
        Some(length) if body.len() >= length => Ok(text(&body[..length])),
        None if eof => Ok(text(body)),
        _ => Ok(None),
    }
}

/// Whether `error` says that the server exited because one of its ports
/// was taken.
fn port_taken(error: &Error) -> bool {
    matches!(error, Error::CommandFailed { output, .. } if output.contains("address already in use"))
}

/// A name unique within this process, for a member or a cluster token.
fn unique_name() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    format!(
        "leaseholder-testkit-{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// `http://127.0.0.1:PORT`, a client or peer URL.
fn local_url(port: u16) -> String {
    format!("http://{}:{port}", Ipv4Addr::LOCALHOST)
}

/// A free port other than those in `taken`.
fn other_free_port(taken: &[u16]) -> Result<u16, Error> {
    loop {
        let port = free_port()?;
        if !taken.contains(&port) {
            return Ok(port);
        }
    }
}

/// The command line of a member; `peer_ports`: the one it listens on, the
/// one it advertises.
fn args(
    dir: &Path,
    client_port: u16,
    peer_ports: (u16, u16),
    membership: &Membership,
) -> Vec<String> {
    let client_url = local_url(client_port);
    let peer = local_url(peer_ports.0);
    let advertised = local_url(peer_ports.1);
    [
        "--name",
        &membership.name,
        "--data-dir",
        &dir.join(DATA_DIR).to_string_lossy(),
        "--listen-client-urls",
        &client_url,
        "--advertise-client-urls",
        &client_url,
        "--listen-peer-urls",
        &peer,
        "--initial-advertise-peer-urls",
        &advertised,
        "--initial-cluster",
        &membership.initial_cluster,
        "--initial-cluster-state",
        "new",
        "--initial-cluster-token",
        &membership.token,
        "--heartbeat-interval",
        &ETCD_HEARTBEAT_INTERVAL.as_millis().to_string(),
        "--election-timeout",
        &ETCD_ELECTION_TIMEOUT.as_millis().to_string(),
        // etcd 3.4's default logger (capnslog) has no `--log-level`.
        "--logger",
        "zap",
        "--log-level",
        "warn",
        // Not journald, even under systemd.
        "--log-outputs",
        "stderr",
    ]
    .map(str::to_owned)
    .to_vec()
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
    let mut command = StdCommand::new(binary);
    clean_env(&mut command);
    // etcd 3.4 refuses to start on architectures other than amd64 and
    // ppc64le unless told that it is on its own.
    if let Some(arch) = unsupported_go_arch() {
        command.env("ETCD_UNSUPPORTED_ARCH", arch);
    }
    command
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::from(open()?))
        .stderr(Stdio::from(open()?));
    ChildGuard::spawn(&mut Command::from(command))
}

/// Go's name for this machine's architecture, if etcd 3.4 does not
/// support it without `ETCD_UNSUPPORTED_ARCH`.
fn unsupported_go_arch() -> Option<&'static str> {
    match std::env::consts::ARCH {
        "x86_64" | "powerpc64" => None,
        "aarch64" => Some("arm64"),
        "x86" => Some("386"),
        other => Some(other),
    }
}

/// Runs `etcdctl` with `args` and `ETCDCTL_API=3`; its standard output
/// without the trailing newline, or [`Error::CommandFailed`].
async fn run_ctl(program: &Path, args: &[&str]) -> Result<String, Error> {
    let command_line = std::iter::once(program.to_string_lossy().into_owned())
        .chain(args.iter().map(|arg| (*arg).to_owned()))
        .collect::<Vec<_>>()
        .join(" ");
    let mut command = StdCommand::new(program);
    clean_env(&mut command);
    command
        .env("ETCDCTL_API", "3")
        .args(args)
        .stdin(Stdio::null());
    let output = Command::from(command)
        .kill_on_drop(true)
        .output()
        .await
        .map_err(|e| Error::io(format!("running `{command_line}`"), e))?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    if output.status.success() {
        return Ok(stdout.trim_end_matches(['\r', '\n']).to_owned());
    }
    let stderr = String::from_utf8_lossy(&output.stderr);
    Err(Error::CommandFailed {
        command: command_line,
        status: output.status,
        output: [stdout.trim(), stderr.trim()]
            .into_iter()
            .filter(|stream| !stream.is_empty())
            .collect::<Vec<_>>()
            .join("\n"),
    })
}

/// The version in `etcd --version` (`etcd Version: 3.4.23`, then the Git
/// SHA and Go version) or `etcdctl version` (`etcdctl version: 3.4.23`,
/// then `API version: 3.4`) output: the first `MAJOR.MINOR.PATCH` word.
fn version_token(text: &str) -> Option<&str> {
    text.split_whitespace()
        .find(|word| word.split('.').count() >= 3 && parse_major_minor(word).is_some())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[test]
    fn parses_versions() {
        let etcd = "etcd Version: 3.4.23\nGit SHA: Not provided (use ./build instead of go build)\n\
                    Go Version: go1.19.8\nGo OS/Arch: linux/amd64";
        assert_eq!(version_token(etcd), Some("3.4.23"));
        let ctl = "etcdctl version: 3.5.17\nAPI version: 3.5";
        assert_eq!(version_token(ctl), Some("3.5.17"));
        assert_eq!(version_token("no version"), None);
        assert_eq!(parse_major_minor("3.4.23"), Some((3, 4)));
        assert_eq!(parse_major_minor("3.6.0-rc.1"), Some((3, 6)));
        assert_eq!(parse_major_minor("3"), None);
    }

    #[test]
    fn parses_status_and_member_lists() {
        let status: Value = serde_json::from_str(
            r#"{"header":{"cluster_id":"324952591200643719","member_id":"3319814642761637952",
                "revision":"7","raft_term":"2"},"version":"3.4.23","dbSize":"20480",
                "leader":"3319814642761637952","raftIndex":"5","raftTerm":"2",
                "raftAppliedIndex":"5","dbSizeInUse":"16384"}"#,
        )
        .unwrap();
        let status = parse_status(&status).unwrap();
        assert_eq!(status.member_id, 3_319_814_642_761_637_952);
        assert_eq!(status.leader, status.member_id);
        assert!(status.is_leader());
        assert_eq!((status.raft_term, status.raft_index), (2, 5));
        assert_eq!(status.revision, 7);
        assert_eq!(status.version, "3.4.23");

        // Without a leader, the field is left out.
        let follower: Value = serde_json::from_str(
            r#"{"header":{"member_id":"12"},"version":"3.4.23","raftTerm":"3"}"#,
        )
        .unwrap();
        let follower = parse_status(&follower).unwrap();
        assert_eq!(follower.leader, 0);
        assert!(!follower.is_leader());
        assert_eq!(parse_status(&Value::Null), None);

        let members: Value = serde_json::from_str(
            r#"{"header":{"member_id":"1"},"members":[
                {"ID":"10551595412508535384","name":"m0","peerURLs":["http://127.0.0.1:24800"]},
                {"ID":"42","peerURLs":["http://127.0.0.1:24801"]}]}"#,
        )
        .unwrap();
        assert_eq!(
            parse_members(&members).unwrap(),
            vec![
                Member {
                    id: 10_551_595_412_508_535_384,
                    name: "m0".to_owned()
                },
                Member {
                    id: 42,
                    name: String::new()
                },
            ]
        );
        assert_eq!(number(&Value::from(7_u64)), Some(7));
        assert_eq!(number(&Value::from("x")), None);
    }

    #[test]
    fn parses_http_responses() {
        let response = b"HTTP/1.0 200 OK\r\nContent-Type: application/json\r\n\
                         Content-Length: 17\r\n\r\n{\"health\":\"true\"}";
        let health = Some((200, "{\"health\":\"true\"}".to_owned()));
        assert_eq!(parse_response(response, false), Ok(health.clone()));
        assert_eq!(parse_response(response, true), Ok(health));
        let short = &response[..response.len() - 1];
        assert_eq!(parse_response(short, false), Ok(None));
        assert_eq!(parse_response(short, true), Ok(None));
        assert_eq!(
            parse_response(
                b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\n\r\n",
                false
            ),
            Ok(Some((503, String::new())))
        );
        // No length: the body ends with the stream.
        let no_length = b"HTTP/1.0 200 OK\r\n\r\nbody";
        assert_eq!(parse_response(no_length, false), Ok(None));
        assert_eq!(
            parse_response(no_length, true),
            Ok(Some((200, "body".to_owned())))
        );
        assert_eq!(parse_response(b"HTTP/1.0 200 OK\r\n", true), Ok(None));
        assert_eq!(parse_response(b"SSH-2.0-OpenSSH\r\n\r\n", false), Err(()));
        assert_eq!(
            parse_response(b"HTTP/1.0 200 OK\r\nContent-Length: x\r\n\r\n", false),
            Err(())
        );
    }

    fn fake_binary(dir: &Path, name: &str, output: &str) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, format!("#!/bin/sh\necho '{output}'\n")).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        path
    }

    #[test]
    fn an_old_etcd_is_refused_with_the_version_found_and_needed() {
        let dir = TempDir::new("testkit-etcd-version").unwrap();
        let old = fake_binary(dir.path(), "etcd", "etcd Version: 3.3.25");
        let error = pick_etcd_binary("etcd", vec![old.clone()]).unwrap_err();
        let message = error.to_string();
        assert!(
            matches!(&error, Error::UnsupportedVersion { binary, found, .. }
                if *binary == old && found == "3.3.25"),
            "{error:?}"
        );
        assert!(message.contains("etcd >= 3.5.13 (or 3.4.31+)"), "{message}");
        assert!(message.contains("scripts/setup"), "{message}");

        // Debian 12's 3.4.23 has the stale-leader bug: it is passed over
        // for a fixed one later on PATH.
        let debian_dir = TempDir::new("testkit-etcd-version").unwrap();
        let debian = fake_binary(debian_dir.path(), "etcd", "etcd Version: 3.4.23");
        let new_dir = TempDir::new("testkit-etcd-version").unwrap();
        let new = fake_binary(new_dir.path(), "etcd", "etcd Version: 3.5.17");
        assert_eq!(
            pick_etcd_binary("etcd", vec![old, debian.clone(), new.clone()]).unwrap(),
            new
        );
        let error = pick_etcd_binary("etcd", vec![debian.clone()]).unwrap_err();
        assert!(
            matches!(&error, Error::UnsupportedVersion { binary, found, .. }
                if *binary == debian && found == "3.4.23"),
            "{error:?}"
        );
    }

    #[test]
    fn versions_with_the_stale_leader_fix_are_accepted() {
        for version in [
            "3.4.31",
            "3.4.40",
            "3.5.13",
            "3.5.16",
            "3.6.0",
            "3.6.0-rc.1",
            "4.0.0",
        ] {
            assert!(etcd_version_accepted(version), "{version}");
        }
        for version in ["3.3.25", "3.4.23", "3.4.30", "3.5.0", "3.5.12", "3.5", "x"] {
            assert!(!etcd_version_accepted(version), "{version}");
        }
    }

    #[test]
    fn no_etcdctl_is_a_missing_binary() {
        let error = pick_etcd_binary("etcdctl", Vec::new()).unwrap_err();
        assert!(
            matches!(&error, Error::MissingBinary { name, setup, .. }
                if name == "etcdctl >= 3.5.13 (or 3.4.31+)" && setup == "scripts/setup"),
            "{error:?}"
        );
    }
}
