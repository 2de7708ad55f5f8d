//! A real PostgreSQL server as a child process.
//!
//! `initdb` and `postgres` refuse to run as root. When the tests run as root
//! (as they do on the project's machines and in CI), both are run as the
//! `postgres` user that Debian's package creates: the child process is
//! started with that user's uid and gid ([`Command::uid`]), not through
//! `runuser` or `su`, which would fork and leave the test holding the PID of
//! a wrapper rather than of the postmaster.

use std::fs::OpenOptions;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Command as StdCommand, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use tokio::process::Command;
use tokio::time::Instant;
use tokio_postgres::{Client, NoTls, SimpleQueryMessage};

use crate::binary::is_executable;
use crate::process::{log_tail, wait_stopped};
use crate::{ChildGuard, Error, TempDir, binary_version, find_binary_candidates, free_port};

/// The oldest PostgreSQL major version that [`PostgresServer::start`]
/// accepts (Debian 12 ships 15).
pub const MIN_POSTGRES_VERSION: u32 = 15;

/// Where Debian's `postgresql` packages install their binaries, one
/// `<major>/bin` directory per version.
pub const DEBIAN_POSTGRES_LIB: &str = "/usr/lib/postgresql";

/// The command that installs the servers, named in errors.
const SETUP: &str = "scripts/setup";

/// The user `initdb` and `postgres` run as when the tests run as root.
const POSTGRES_USER: &str = "postgres";

/// How long a started server has to answer its readiness probe.
const READY_DEADLINE: Duration = Duration::from_secs(30);

/// Bound on one readiness probe (connect, query).
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// Pause between two failed probes, so the loop does not spin while the
/// server is still starting.
const PROBE_BACKOFF: Duration = Duration::from_millis(20);

/// How long the postmaster has to exit after an immediate shutdown before
/// it is sent `SIGKILL`.
const STOP_DEADLINE: Duration = Duration::from_secs(10);

/// Pause between two checks for the postmaster's exit during a drop (which
/// cannot await).
const STOP_POLL: Duration = Duration::from_millis(2);

/// How many times [`PostgresServer::start`] tries a fresh port when the one
/// it picked was taken before the server could bind it.
const START_ATTEMPTS: u32 = 3;

/// The maximum number of client connections the server accepts.
pub const POSTGRES_MAX_CONNECTIONS: u32 = 200;

/// A PostgreSQL server running as a child process on a free `127.0.0.1`
/// port, with a fresh cluster (`initdb -A trust -U postgres`) in its own
/// temporary directory.
///
/// Connect as the superuser `postgres`, without a password, to the
/// `postgres` database: see [`url`](Self::url) and
/// [`connect`](Self::connect). The server runs with `fsync=off` (data
/// survives a process crash, which is all the tests cause, but not an
/// operating system crash) and `max_connections=200`.
///
/// [`pause`](Self::pause), [`kill`](Self::kill) and dropping the value act
/// on the postmaster *and* on every process it started (backends,
/// checkpointer, ...), so a paused server answers nothing and a dropped one
/// leaves no process behind. [`restart`](Self::restart) keeps the port and
/// the data directory, so committed data survives it.
///
/// Must be started and used within a Tokio runtime with the time, I/O and
/// process drivers enabled. Dropping it blocks the thread until the server
/// has exited (a few milliseconds).
#[derive(Debug)]
pub struct PostgresServer {
    // Field order matters: the child is dropped (and killed) before its
    // directory is removed.
    child: ChildGuard,
    dir: TempDir,
    bin_dir: PathBuf,
    port: u16,
    version: String,
    /// The (uid, gid) the server runs as, when the tests run as root.
    run_as: Option<(u32, u32)>,
}

impl PostgresServer {
    /// Starts the newest PostgreSQL found by [`find_postgres`] whose major
    /// version is at least [`MIN_POSTGRES_VERSION`], and waits until it
    /// answers a query.
    ///
    /// Returns [`Error::MissingBinary`] (naming `scripts/setup`) if there is
    /// no such installation, and [`Error::NotReady`] or
    /// [`Error::CommandFailed`] if the server does not come up.
    pub async fn start() -> Result<Self, Error> {
        let bin_dir = find_postgres(MIN_POSTGRES_VERSION)?;
        Self::start_with(&bin_dir).await
    }

    /// Starts the PostgreSQL whose `initdb` and `postgres` are in
    /// `bin_dir`, whatever its version, and waits until it answers a query.
    pub async fn start_with(bin_dir: &Path) -> Result<Self, Error> {
        let started = Instant::now();
        let run_as = if running_as_root() {
            Some(postgres_user()?)
        } else {
            None
        };
        let dir = TempDir::new("leaseholder-postgres")?;
        if let Some((uid, gid)) = run_as {
            std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid)).map_err(|e| {
                Error::io(
                    format!(
                        "handing {} to the {POSTGRES_USER} user",
                        dir.path().display()
                    ),
                    e,
                )
            })?;
        }
        initdb(bin_dir, dir.path(), run_as).await?;

        let mut attempt = 1;
        loop {
            let port = free_port()?;
            let mut child = spawn(bin_dir, dir.path(), port, run_as, false)?;
            match wait_ready(&mut child, bin_dir, dir.path(), port).await {
                Ok(version) => {
                    tracing::debug!(
                        bin_dir = %bin_dir.display(),
                        port,
                        %version,
                        elapsed = ?started.elapsed(),
                        "postgres ready"
                    );
                    return Ok(Self {
                        child,
                        dir,
                        bin_dir: bin_dir.to_owned(),
                        port,
                        version,
                        run_as,
                    });
                }
                Err(Error::CommandFailed { output, .. })
                    if attempt < START_ATTEMPTS && output.contains("already in use") =>
                {
                    tracing::debug!(attempt, port, "postgres port was taken; trying another");
                    attempt += 1;
                }
                Err(error) => {
                    stop_blocking(&mut child);
                    return Err(error);
                }
            }
        }
    }

    /// The connection string,
    /// `postgres://postgres@127.0.0.1:PORT/postgres`, as
    /// [`tokio_postgres::connect`] and `psql` accept it.
    pub fn url(&self) -> String {
        format!("postgres://{POSTGRES_USER}@{}/postgres", self.addr())
    }

    /// The client port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The client address, `127.0.0.1:PORT`.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, self.port))
    }

    /// The server's version as it reports it (`server_version`), e.g.
    /// `15.18 (Debian 15.18-0+deb12u1)`.
    pub fn version(&self) -> &str {
        &self.version
    }

    /// The server's major version, if [`version`](Self::version) parses.
    pub fn major_version(&self) -> Option<u32> {
        parse_major_version(&self.version)
    }

    /// The directory holding the `initdb` and `postgres` that were run.
    pub fn bin_dir(&self) -> &Path {
        &self.bin_dir
    }

    /// The server's scratch directory: the cluster is in its `data`
    /// subdirectory (which also holds the Unix socket), the server's output
    /// in `postgres.log`.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The cluster's data directory (`-D`).
    pub fn data_dir(&self) -> PathBuf {
        data_dir(self.dir.path())
    }

    /// The PID of the postmaster (it changes on
    /// [`restart`](Self::restart)).
    pub fn pid(&self) -> u32 {
        self.child.pid()
    }

    /// The PIDs of the processes the postmaster has started: a backend per
    /// connection, and the checkpointer, WAL writer and other auxiliary
    /// processes.
    pub fn child_pids(&self) -> Vec<u32> {
        children_of(self.child.pid())
    }

    /// Freezes the server with `SIGSTOP`: the postmaster first (so it
    /// starts no new process), then every process it started. Connections
    /// stay open, new ones are accepted by the kernel, and nothing is
    /// answered.
    pub fn pause(&self) -> Result<(), Error> {
        let children = stop_postmaster(&self.child)?;
        signal_pids("STOP", &children)?;
        wait_stopped(&children);
        Ok(())
    }

    /// Wakes a server frozen by [`pause`](Self::pause) with `SIGCONT`.
    pub fn resume(&self) -> Result<(), Error> {
        signal_pids("CONT", &self.child_pids())?;
        self.child.resume()
    }

    /// Crashes the server and waits until every one of its processes has
    /// exited. Works on a paused server too. The data directory is kept;
    /// [`restart`](Self::restart) brings the server back, replaying the
    /// WAL as after any crash.
    ///
    /// The postmaster is stopped, every process it started is sent
    /// `SIGKILL` (so no query is answered from here on), then the
    /// postmaster gets `SIGQUIT` (an immediate shutdown: it reaps them,
    /// removes its shared memory and exits). It is sent `SIGKILL` if it has
    /// not exited after 10 s.
    pub async fn kill(&mut self) -> Result<(), Error> {
        if self.child.try_wait()?.is_some() {
            return Ok(());
        }
        begin_crash(&self.child)?;
        match tokio::time::timeout(STOP_DEADLINE, self.child.wait()).await {
            Ok(status) => status.map(drop),
            Err(_) => {
                tracing::warn!(
                    pid = self.pid(),
                    "postgres ignored SIGQUIT; sending SIGKILL"
                );
                self.child.kill().await
            }
        }
    }

    /// Kills the server (if it is running, see [`kill`](Self::kill)) and
    /// starts it again on the same port with the same data directory, then
    /// waits until it answers a query.
    pub async fn restart(&mut self) -> Result<(), Error> {
        self.kill().await?;
        self.child = spawn(&self.bin_dir, self.dir.path(), self.port, self.run_as, true)?;
        self.version =
            wait_ready(&mut self.child, &self.bin_dir, self.dir.path(), self.port).await?;
        Ok(())
    }

    /// Connects as `postgres` to the `postgres` database, and spawns the
    /// task that drives the connection (it ends when the client is dropped
    /// or the server goes away).
    ///
    /// Has no timeout of its own (a paused server accepts the TCP
    /// connection but never answers), so wrap it in
    /// [`tokio::time::timeout`] where that matters.
    pub async fn connect(&self) -> Result<Client, Error> {
        let url = self.url();
        let (client, connection) =
            tokio_postgres::connect(&url, NoTls)
                .await
                .map_err(|source| Error::Postgres {
                    context: format!("connecting to {url}"),
                    source,
                })?;
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::debug!(%url, %error, "postgres connection ended");
            }
        });
        Ok(client)
    }

    /// Probes the server once: connects and runs a query. Returns the
    /// server's version.
    ///
    /// Has no timeout of its own, so wrap it in [`tokio::time::timeout`].
    pub async fn ping(&self) -> Result<String, Error> {
        ping(self.dir.path(), self.port).await
    }
}

impl Drop for PostgresServer {
    fn drop(&mut self) {
        stop_blocking(&mut self.child);
    }
}

/// Probes until the server answers or [`READY_DEADLINE`] passes, and fails
/// at once if the postmaster exits.
async fn wait_ready(
    child: &mut ChildGuard,
    bin_dir: &Path,
    dir: &Path,
    port: u16,
) -> Result<String, Error> {
    let start = Instant::now();
    let deadline = start + READY_DEADLINE;
    loop {
        if let Some(status) = child.try_wait()? {
            return Err(Error::CommandFailed {
                command: format!(
                    "{} {}",
                    bin_dir.join("postgres").display(),
                    postgres_args(dir, port).join(" ")
                ),
                status,
                output: log_tail(&log_path(dir)),
            });
        }
        let last_error = match tokio::time::timeout(PROBE_TIMEOUT, ping(dir, port)).await {
            Ok(Ok(version)) => return Ok(version),
            Ok(Err(e)) => e.to_string(),
            Err(_) => format!("no answer within {PROBE_TIMEOUT:?}"),
        };
        if Instant::now() + PROBE_BACKOFF >= deadline {
            return Err(Error::NotReady {
                server: format!(
                    "postgres ({}) at {}",
                    bin_dir.display(),
                    SocketAddr::from((Ipv4Addr::LOCALHOST, port))
                ),
                waited: start.elapsed(),
                last_error: format!("{last_error}; {}", log_tail(&log_path(dir))),
            });
        }
        tokio::time::sleep(PROBE_BACKOFF).await;
    }
}

/// Connects to the server on `port` and runs a query; checks that it is
/// the server of `dir` (not another one that took the port), and returns
/// its version.
async fn ping(dir: &Path, port: u16) -> Result<String, Error> {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let url = format!("postgres://{POSTGRES_USER}@{addr}/postgres");
    let (data_directory, version) = probe(&url).await?;
    let expected = data_dir(dir);
    if Path::new(&data_directory) == expected {
        Ok(version)
    } else {
        Err(Error::io(
            format!("probing postgres at {addr}"),
            std::io::Error::other(format!(
                "another server answers: its data directory is {data_directory}, not {}",
                expected.display()
            )),
        ))
    }
}

/// Stops the postmaster with `SIGSTOP`, waits until it is stopped, and
/// returns the PIDs of its children: as it is stopped, it starts no more.
fn stop_postmaster(child: &ChildGuard) -> Result<Vec<u32>, Error> {
    child.pause()?;
    wait_stopped(&[child.pid()]);
    Ok(children_of(child.pid()))
}

/// Starts a crash without waiting for it: stops the postmaster, kills every
/// process it started (so nothing is answered from here on), and asks it
/// for an immediate shutdown (`SIGQUIT`), which it carries out once
/// continued: it reaps its children, removes its shared memory and exits.
fn begin_crash(child: &ChildGuard) -> Result<(), Error> {
    let children = stop_postmaster(child)?;
    signal_pids("KILL", &children)?;
    child.signal("QUIT")?;
    child.resume()
}

/// Crashes a running postmaster and blocks until it has exited, for drops
/// and failed starts, which cannot await.
///
/// The postmaster, not the test, must reap its children: orphans would be
/// handed to PID 1, which may reap them late (seconds, on the project's
/// machines) or never, so a test could still see them. It takes
/// milliseconds. `ChildGuard`'s own drop then sends a harmless `SIGKILL`,
/// or a useful one if the wait timed out.
fn stop_blocking(child: &mut ChildGuard) {
    match child.try_wait() {
        Ok(None) => {}
        Ok(Some(_)) | Err(_) => return,
    }
    if let Err(error) = begin_crash(child) {
        tracing::debug!(pid = child.pid(), %error, "stopping postgres");
        return;
    }
    let deadline = std::time::Instant::now() + STOP_DEADLINE;
    while std::time::Instant::now() < deadline {
        match child.try_wait() {
            Ok(None) => std::thread::sleep(STOP_POLL),
            Ok(Some(_)) | Err(_) => return,
        }
    }
    tracing::warn!(pid = child.pid(), "postgres did not exit; sending SIGKILL");
}

/// Finds the directory holding a PostgreSQL `postgres` and `initdb` whose
/// major version is at least `min_major`, judging by `postgres --version`.
///
/// Searched, in order: Debian's `/usr/lib/postgresql/<major>/bin`
/// directories, newest first, then `PATH` (where `postgres` may be a symlink
/// into one of them; `initdb` is looked for next to the link, then next to
/// its target). Returns [`Error::MissingBinary`], naming `scripts/setup`,
/// when there is none. Blocks while the candidates run.
pub fn find_postgres(min_major: u32) -> Result<PathBuf, Error> {
    let dirs = debian_bin_dirs();
    for candidate in find_binary_candidates("postgres", &dirs) {
        let Some(bin_dir) = bin_dir_with_initdb(&candidate) else {
            tracing::debug!(candidate = %candidate.display(), "postgres without initdb");
            continue;
        };
        let major = binary_version(&candidate, &["--version"])
            .ok()
            .and_then(|text| parse_major_version(&text));
        tracing::debug!(candidate = %candidate.display(), ?major, "postgres candidate");
        if major.is_some_and(|major| major >= min_major) {
            return Ok(bin_dir);
        }
    }
    Err(Error::MissingBinary {
        name: format!("postgres and initdb >= {min_major}"),
        dirs,
        setup: SETUP.to_owned(),
    })
}

/// `/usr/lib/postgresql/<major>/bin` for every installed major version,
/// newest first.
fn debian_bin_dirs() -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(DEBIAN_POSTGRES_LIB) else {
        return Vec::new();
    };
    let mut versions: Vec<(u32, PathBuf)> = entries
        .filter_map(Result::ok)
        .filter_map(|entry| {
            let major = entry.file_name().to_str()?.parse().ok()?;
            Some((major, entry.path().join("bin")))
        })
        .collect();
    versions.sort_by_key(|&(major, _)| std::cmp::Reverse(major));
    versions.into_iter().map(|(_, dir)| dir).collect()
}

/// The directory of `postgres` if `initdb` is next to it, else the
/// directory of its resolved target if `initdb` is there.
fn bin_dir_with_initdb(postgres: &Path) -> Option<PathBuf> {
    let resolved = std::fs::canonicalize(postgres).ok();
    [Some(postgres.to_owned()), resolved]
        .into_iter()
        .flatten()
        .filter_map(|path| path.parent().map(Path::to_owned))
        .find(|dir| is_executable(&dir.join("initdb")))
}

/// The major version in `postgres --version` output
/// (`postgres (PostgreSQL) 15.18 (Debian 15.18-0+deb12u1)`) or in
/// `server_version` (`15.18 (Debian ...)`, `16beta1`).
fn parse_major_version(text: &str) -> Option<u32> {
    text.split_whitespace()
        .filter_map(|word| {
            let digits: String = word.chars().take_while(char::is_ascii_digit).collect();
            let rest = &word[digits.len()..];
            let looks_like_version = rest.is_empty()
                || rest.starts_with('.')
                || rest.starts_with("beta")
                || rest.starts_with("rc")
                || rest.starts_with("devel");
            if looks_like_version {
                digits.parse().ok()
            } else {
                None
            }
        })
        .next()
}

/// Whether this process runs as root (effective uid 0), read from
/// `/proc/self/status`, falling back on `id -u`.
fn running_as_root() -> bool {
    static ROOT: OnceLock<bool> = OnceLock::new();
    *ROOT.get_or_init(|| {
        if let Ok(status) = std::fs::read_to_string("/proc/self/status")
            && let Some(uids) = status.lines().find_map(|line| line.strip_prefix("Uid:"))
            && let Some(effective) = uids.split_whitespace().nth(1)
        {
            return effective == "0";
        }
        id(&["-u"]).is_ok_and(|uid| uid == 0)
    })
}

/// The (uid, gid) of the `postgres` user.
fn postgres_user() -> Result<(u32, u32), Error> {
    let uid = id(&["-u", POSTGRES_USER]);
    let gid = id(&["-g", POSTGRES_USER]);
    match (uid, gid) {
        (Ok(uid), Ok(gid)) => Ok((uid, gid)),
        (Err(mut error), _) | (_, Err(mut error)) => {
            if let Error::CommandFailed { output, .. } = &mut error {
                output.push_str(&format!(
                    "; running as root, the testkit runs PostgreSQL as the \
                     {POSTGRES_USER} user, which Debian's postgresql package \
                     creates: install it with `{SETUP}`"
                ));
            }
            Err(error)
        }
    }
}

/// Runs `id ARGS` and parses the number it prints.
fn id(args: &[&str]) -> Result<u32, Error> {
    let command = format!("id {}", args.join(" "));
    let output = StdCommand::new("id")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| Error::io(format!("running `{command}`"), e))?;
    let text = String::from_utf8_lossy(&output.stdout);
    match text.trim().parse() {
        Ok(number) if output.status.success() => Ok(number),
        _ => Err(Error::CommandFailed {
            command,
            status: output.status,
            output: format!(
                "{}{}",
                text.trim(),
                String::from_utf8_lossy(&output.stderr).trim()
            ),
        }),
    }
}

fn data_dir(dir: &Path) -> PathBuf {
    dir.join("data")
}

fn log_path(dir: &Path) -> PathBuf {
    dir.join("postgres.log")
}

/// A command for `program`, run as `run_as` if given, with no input, in
/// `dir` (which the `postgres` user can enter, unlike the test's working
/// directory perhaps).
fn command(program: &Path, dir: &Path, run_as: Option<(u32, u32)>) -> Command {
    let mut command = Command::new(program);
    command.current_dir(dir).stdin(Stdio::null());
    if let Some((uid, gid)) = run_as {
        command.uid(uid).gid(gid);
    }
    command
}

/// Creates the cluster in `dir/data`: trust authentication, superuser
/// `postgres`, C locale (the fastest, and independent of the machine's).
async fn initdb(bin_dir: &Path, dir: &Path, run_as: Option<(u32, u32)>) -> Result<(), Error> {
    let program = bin_dir.join("initdb");
    let data = data_dir(dir);
    let args = [
        "-D".as_ref(),
        data.as_os_str(),
        "-A".as_ref(),
        "trust".as_ref(),
        "-U".as_ref(),
        POSTGRES_USER.as_ref(),
        "-E".as_ref(),
        "UTF8".as_ref(),
        "--locale=C".as_ref(),
        "--no-sync".as_ref(),
        "--no-instructions".as_ref(),
    ];
    let command_line = || {
        std::iter::once(program.as_os_str())
            .chain(args)
            .map(|arg| arg.to_string_lossy())
            .collect::<Vec<_>>()
            .join(" ")
    };
    let output = command(&program, dir, run_as)
        .args(args)
        .kill_on_drop(true)
        .output()
        .await
        .map_err(|e| Error::io(format!("running `{}`", command_line()), e))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(Error::CommandFailed {
            command: command_line(),
            status: output.status,
            output: format!(
                "{}\n{}",
                String::from_utf8_lossy(&output.stdout).trim(),
                String::from_utf8_lossy(&output.stderr).trim()
            )
            .trim()
            .to_owned(),
        })
    }
}

fn postgres_args(dir: &Path, port: u16) -> Vec<String> {
    let data = data_dir(dir).to_string_lossy().into_owned();
    let mut args = vec![
        "-D".to_owned(),
        data.clone(),
        "-p".to_owned(),
        port.to_string(),
        "-k".to_owned(),
        data,
    ];
    for setting in [
        format!("listen_addresses={}", Ipv4Addr::LOCALHOST),
        "fsync=off".to_owned(),
        format!("max_connections={POSTGRES_MAX_CONNECTIONS}"),
    ] {
        args.push("-c".to_owned());
        args.push(setting);
    }
    args
}

/// Starts the postmaster, its output appended to `dir/postgres.log` (or
/// written to a fresh one unless `append`).
fn spawn(
    bin_dir: &Path,
    dir: &Path,
    port: u16,
    run_as: Option<(u32, u32)>,
    append: bool,
) -> Result<ChildGuard, Error> {
    let log_path = log_path(dir);
    let log = OpenOptions::new()
        .create(true)
        .write(true)
        .append(append)
        .truncate(!append)
        .open(&log_path)
        .map_err(|e| Error::io(format!("opening {}", log_path.display()), e))?;
    let log_err = log
        .try_clone()
        .map_err(|e| Error::io(format!("opening {}", log_path.display()), e))?;
    ChildGuard::spawn(
        command(&bin_dir.join("postgres"), dir, run_as)
            .args(postgres_args(dir, port))
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(log_err)),
    )
}

/// Connects to `url` and asks for the server's data directory and version.
async fn probe(url: &str) -> Result<(String, String), Error> {
    let postgres_error = |context: &str| {
        let context = format!("{context} {url}");
        move |source| Error::Postgres { context, source }
    };
    let (client, connection) = tokio_postgres::connect(url, NoTls)
        .await
        .map_err(postgres_error("connecting to"))?;
    let query = client.simple_query(
        "SELECT current_setting('data_directory'), current_setting('server_version')",
    );
    // Drive the connection here rather than in a spawned task, so that
    // nothing outlives the probe.
    let messages = tokio::select! {
        messages = query => messages.map_err(postgres_error("querying"))?,
        ended = connection => {
            ended.map_err(postgres_error("connection to"))?;
            return Err(Error::io(
                format!("querying {url}"),
                std::io::Error::from(std::io::ErrorKind::UnexpectedEof),
            ));
        }
    };
    messages
        .iter()
        .find_map(|message| match message {
            SimpleQueryMessage::Row(row) => Some((row.get(0)?.to_owned(), row.get(1)?.to_owned())),
            _ => None,
        })
        .ok_or_else(|| {
            Error::io(
                format!("querying {url}"),
                std::io::Error::new(std::io::ErrorKind::InvalidData, "no row returned"),
            )
        })
}

/// The PIDs of the processes whose parent is `pid`, from `/proc`.
fn children_of(pid: u32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(Result::ok)
        .filter_map(|entry| entry.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&child| {
            std::fs::read_to_string(format!("/proc/{child}/stat"))
                .ok()
                .and_then(|stat| parent_pid(&stat))
                == Some(pid)
        })
        .collect()
}

/// The parent PID in the contents of `/proc/PID/stat`.
fn parent_pid(stat: &str) -> Option<u32> {
    // The command name is in parentheses and may contain anything.
    let (_, after_name) = stat.rsplit_once(')')?;
    after_name.split_whitespace().nth(1)?.parse().ok()
}

/// Sends signal `name` to each of `pids` with the `kill` command. A
/// process that has exited in the meantime is not an error.
fn signal_pids(name: &str, pids: &[u32]) -> Result<(), Error> {
    if pids.is_empty() {
        return Ok(());
    }
    let pid_args: Vec<String> = pids.iter().map(u32::to_string).collect();
    let command = format!("kill -{name} {}", pid_args.join(" "));
    let output = StdCommand::new("kill")
        .arg(format!("-{name}"))
        .args(&pid_args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| Error::io(format!("running `{command}`"), e))?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    // Only processes that have exited in the meantime may fail.
    let only_gone = stderr
        .lines()
        .filter(|line| !line.trim().is_empty())
        .all(|line| line.contains("No such process"));
    if output.status.success() || only_gone {
        Ok(())
    } else {
        Err(Error::CommandFailed {
            command,
            status: output.status,
            output: stderr.trim().to_owned(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::{parent_pid, parse_major_version};

    #[test]
    fn parses_major_versions() {
        assert_eq!(
            parse_major_version("postgres (PostgreSQL) 15.18 (Debian 15.18-0+deb12u1)"),
            Some(15)
        );
        assert_eq!(
            parse_major_version("15.18 (Debian 15.18-0+deb12u1)"),
            Some(15)
        );
        assert_eq!(parse_major_version("16beta1"), Some(16));
        assert_eq!(parse_major_version("postgres (PostgreSQL) 9.6.24"), Some(9));
        assert_eq!(parse_major_version("no version here"), None);
    }

    #[test]
    fn parses_parent_pids() {
        assert_eq!(parent_pid("42 (postgres) S 17 42 42 0 -1"), Some(17));
        assert_eq!(parent_pid("42 (a) b) (c) R 9 1 1"), Some(9));
        assert_eq!(parent_pid("garbage"), None);
    }
}
