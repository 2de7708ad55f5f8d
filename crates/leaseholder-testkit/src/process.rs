//! Child processes and scratch directories that clean up after themselves.

use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::process::{Child, Command};

use crate::Error;

/// A child process that is killed when the guard is dropped.
///
/// The process is started with [`Command::kill_on_drop`], and dropping the
/// guard also sends it `SIGKILL` explicitly, so a test that fails or panics
/// never leaves a server running. Dropping never panics; the exited process
/// is reaped in the background by Tokio.
///
/// The guard can own a [`TempDir`] (the server's data directory, say),
/// which is removed after the process has been killed.
#[derive(Debug)]
pub struct ChildGuard {
    // Field order matters: the child is dropped (and killed) before the
    // directory it may be writing to is removed.
    child: Child,
    pid: u32,
    program: String,
    temp_dir: Option<TempDir>,
}

impl ChildGuard {
    /// Starts `command` as a child process.
    ///
    /// `kill_on_drop(true)` is set on the command. Standard input, output
    /// and error are whatever the command was configured with. Must be
    /// called from within a Tokio runtime. The command can be reused to
    /// start the process again later.
    pub fn spawn(command: &mut Command) -> Result<Self, Error> {
        let program = command
            .as_std()
            .get_program()
            .to_string_lossy()
            .into_owned();
        let child = command
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| Error::io(format!("starting {program}"), e))?;
        // A freshly spawned child has not been reaped, so it has a PID.
        let pid = child.id().ok_or_else(|| {
            Error::io(
                format!("starting {program}"),
                std::io::Error::other("the child exited before its PID could be read"),
            )
        })?;
        tracing::debug!(%program, pid, "started child process");
        Ok(Self {
            child,
            pid,
            program,
            temp_dir: None,
        })
    }

    /// Hands `dir` to the guard, which removes it on drop, after the child
    /// has been killed.
    #[must_use]
    pub fn with_temp_dir(mut self, dir: TempDir) -> Self {
        self.temp_dir = Some(dir);
        self
    }

    /// The directory owned by the guard, if any.
    pub fn temp_dir(&self) -> Option<&Path> {
        self.temp_dir.as_ref().map(TempDir::path)
    }

    /// The process ID the child was started with.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The underlying Tokio child, e.g. to take its standard output.
    pub fn child_mut(&mut self) -> &mut Child {
        &mut self.child
    }

    /// Returns the child's exit status if it has exited, without waiting.
    pub fn try_wait(&mut self) -> Result<Option<ExitStatus>, Error> {
        self.child
            .try_wait()
            .map_err(|e| Error::io(format!("checking on {} ({})", self.program, self.pid), e))
    }

    /// Waits for the child to exit.
    pub async fn wait(&mut self) -> Result<ExitStatus, Error> {
        self.child
            .wait()
            .await
            .map_err(|e| Error::io(format!("waiting for {} ({})", self.program, self.pid), e))
    }

    /// Kills the child with `SIGKILL` and waits until it has exited.
    ///
    /// Succeeds if the child had already exited.
    pub async fn kill(&mut self) -> Result<(), Error> {
        if self.try_wait()?.is_some() {
            return Ok(());
        }
        self.child
            .kill()
            .await
            .map_err(|e| Error::io(format!("killing {} ({})", self.program, self.pid), e))
    }

    /// Sends the child `SIGKILL` and blocks the thread until it has exited
    /// and been reaped, for at most `deadline`; for drops, which cannot
    /// await. Does nothing if the child has already exited.
    ///
    /// Left to [`Drop`], the child is killed but reaped later, in the
    /// background; if the test process exits first, the zombie is handed
    /// to PID 1, which may reap it late (seconds, on the project's
    /// machines), so it can outlive the test run.
    pub(crate) fn kill_blocking(&mut self, deadline: Duration) {
        match self.try_wait() {
            Ok(None) => {}
            Ok(Some(_)) | Err(_) => return,
        }
        if let Err(error) = self.child.start_kill() {
            tracing::debug!(program = %self.program, pid = self.pid, %error, "killing");
            return;
        }
        let deadline = std::time::Instant::now() + deadline;
        while std::time::Instant::now() < deadline {
            match self.try_wait() {
                Ok(None) => std::thread::sleep(Duration::from_micros(500)),
                Ok(Some(_)) | Err(_) => return,
            }
        }
        tracing::warn!(program = %self.program, pid = self.pid, "killed child not reaped in time");
    }

    /// Freezes the child with `SIGSTOP`: it stays alive, keeps its sockets
    /// open, and does nothing, like a process stuck in a long GC pause or a
    /// VM that was suspended.
    ///
    /// Returns [`Error::ProcessExited`] if the child has been reaped.
    pub fn pause(&self) -> Result<(), Error> {
        self.signal("STOP")
    }

    /// Wakes a child frozen by [`pause`](Self::pause) with `SIGCONT`.
    ///
    /// Returns [`Error::ProcessExited`] if the child has been reaped.
    pub fn resume(&self) -> Result<(), Error> {
        self.signal("CONT")
    }

    /// Asks the child to shut down gracefully with `SIGTERM`, the way an
    /// orchestrator stops a pod; does not wait for it to exit.
    ///
    /// Returns [`Error::ProcessExited`] if the child has been reaped.
    pub fn terminate(&self) -> Result<(), Error> {
        self.signal("TERM")
    }

    /// Sends signal `name` (without the `SIG` prefix) with the `kill`
    /// command, which avoids both unsafe code and a `libc` dependency.
    pub(crate) fn signal(&self, name: &str) -> Result<(), Error> {
        // Once Tokio has reaped the child its PID may be reused, so refuse
        // to signal it.
        if self.child.id().is_none() {
            return Err(Error::ProcessExited { pid: self.pid });
        }
        let pid = self.pid.to_string();
        let output = std::process::Command::new("kill")
            .arg(format!("-{name}"))
            .arg(&pid)
            .output()
            .map_err(|e| Error::io(format!("running `kill -{name} {pid}`"), e))?;
        if output.status.success() {
            Ok(())
        } else {
            Err(Error::CommandFailed {
                command: format!("kill -{name} {pid}"),
                status: output.status,
                output: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
            })
        }
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        // Fails harmlessly if the child has already exited and been reaped.
        if let Err(error) = self.child.start_kill() {
            tracing::trace!(program = %self.program, pid = self.pid, %error, "kill on drop");
        }
    }
}

/// A uniquely named directory under [`std::env::temp_dir`], removed with
/// everything in it when dropped.
///
/// Removal is best effort: errors are ignored, as there is nobody to report
/// them to during a drop.
#[derive(Debug)]
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    /// Creates a new empty directory named
    /// `<prefix>-<pid>-<counter>-<nanos>`, unique within this process (the
    /// counter) and among processes (the PID, and the time in case a PID
    /// has been reused by a crashed run that left its directory behind).
    pub fn new(prefix: &str) -> Result<Self, Error> {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        const ATTEMPTS: usize = 16;

        let base = std::env::temp_dir();
        let mut last_error = None;
        for _ in 0..ATTEMPTS {
            let counter = COUNTER.fetch_add(1, Ordering::Relaxed);
            let nanos = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |elapsed| elapsed.subsec_nanos());
            let path = base.join(format!("{prefix}-{}-{counter}-{nanos}", std::process::id()));
            match std::fs::create_dir(&path) {
                Ok(()) => return Ok(Self { path }),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => last_error = Some(e),
                Err(e) => {
                    return Err(Error::io(format!("creating {}", path.display()), e));
                }
            }
        }
        Err(Error::io(
            format!("creating a directory in {}", base.display()),
            last_error.unwrap_or_else(|| std::io::ErrorKind::AlreadyExists.into()),
        ))
    }

    /// The directory's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if let Err(error) = std::fs::remove_dir_all(&self.path) {
            tracing::trace!(path = %self.path.display(), %error, "removing temporary directory");
        }
    }
}

/// How much of a server's log [`log_tail`] quotes.
const LOG_TAIL: usize = 2000;

/// Bound on waiting for a signalled process to be stopped.
const STOP_WAIT: Duration = Duration::from_secs(1);

/// The end of a server's log at `path`, for an error message.
pub(crate) fn log_tail(path: &Path) -> String {
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

/// Blocks until each of `pids` is stopped, a zombie or gone, for at most
/// [`STOP_WAIT`]: a signal is delivered asynchronously, after `kill`
/// returns.
pub(crate) fn wait_stopped(pids: &[u32]) {
    let deadline = std::time::Instant::now() + STOP_WAIT;
    while pids
        .iter()
        .any(|&pid| process_state(pid).is_some_and(|state| !matches!(state, 'T' | 't' | 'Z' | 'X')))
    {
        if std::time::Instant::now() >= deadline {
            tracing::debug!(?pids, "processes not stopped in time");
            return;
        }
        std::thread::sleep(Duration::from_micros(200));
    }
}

/// The state letter of process `pid` (`S` sleeping, `T` stopped, `Z`
/// zombie...), or `None` if there is no such process.
fn process_state(pid: u32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, after_name) = stat.rsplit_once(')')?;
    after_name.trim_start().chars().next()
}
