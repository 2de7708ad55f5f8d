//! The crate's error type.

use std::path::PathBuf;
use std::process::ExitStatus;
use std::time::Duration;

/// Everything that can go wrong while setting up test infrastructure.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A required binary is neither on `PATH` nor in the extra directories
    /// that were searched.
    #[error("{name} not found on PATH or in {dirs:?}; install it with `{setup}`")]
    MissingBinary {
        /// The binary that was looked for, e.g. `nats-server`.
        name: String,
        /// The extra directories that were searched besides `PATH`.
        dirs: Vec<PathBuf>,
        /// The command that installs the binary, e.g. `scripts/setup`.
        setup: String,
    },

    /// A required binary was found, but only in a version that is too old.
    #[error("{binary} is version {found}, but {required} is needed; install it with `{setup}`")]
    UnsupportedVersion {
        /// The binary that was found (the first candidate on `PATH`).
        binary: PathBuf,
        /// The version it reported, e.g. `6.0.16`.
        found: String,
        /// What is needed, e.g. `redis-server >= 7.0`.
        required: String,
        /// The command that installs a suitable version, e.g.
        /// `scripts/setup`.
        setup: String,
    },

    /// An I/O operation failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done, e.g. `binding 127.0.0.1:0`.
        context: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },

    /// A command ran but exited unsuccessfully.
    #[error("`{command}` failed with {status}: {output}")]
    CommandFailed {
        /// The command line that was run.
        command: String,
        /// How it exited.
        status: ExitStatus,
        /// Its trimmed standard output and standard error.
        output: String,
    },

    /// The child process has already exited and been reaped, so it can no
    /// longer be signalled (its PID may belong to another process by now).
    #[error("process {pid} has already exited")]
    ProcessExited {
        /// The PID the process had.
        pid: u32,
    },

    /// A server was started but did not answer its readiness probe in time.
    #[error("{server} was not ready after {waited:?}: {last_error}")]
    NotReady {
        /// The server, e.g. `nats-server at 127.0.0.1:4222`.
        server: String,
        /// How long readiness was probed for.
        waited: Duration,
        /// Why the last probe failed.
        last_error: String,
    },

    /// A Redis server (or Sentinel) answered a command with an error, or
    /// with a reply the testkit did not expect.
    #[error("{context}: {message}")]
    Redis {
        /// What was being done, e.g. `SENTINEL FAILOVER leaseholder on
        /// 127.0.0.1:26379`.
        context: String,
        /// The error reply, e.g. `NOGOODSLAVE No suitable replica to
        /// promote`, or what was wrong with the reply.
        message: String,
    },

    /// A PostgreSQL client operation (connecting, a query) failed.
    #[error("{context}: {source}")]
    Postgres {
        /// What was being done, e.g. `connecting to postgres://...`.
        context: String,
        /// The underlying error.
        #[source]
        source: tokio_postgres::Error,
    },
}

impl Error {
    /// Wraps an I/O error with a description of what was being done.
    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Self::Io {
            context: context.into(),
            source,
        }
    }
}
