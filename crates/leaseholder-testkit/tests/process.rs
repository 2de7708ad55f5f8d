//! Child processes and temporary directories.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::time::Duration;

use leaseholder_testkit::{ChildGuard, Error, TempDir};
use tokio::process::Command;
use tokio::time::timeout;

/// Bound on waiting for something that should happen promptly.
const PATIENCE: Duration = Duration::from_secs(10);

/// Interval between two checks of a condition that cannot be awaited.
const POLL: Duration = Duration::from_millis(10);

/// Polls `condition` until it holds, failing after [`PATIENCE`].
async fn wait_until(what: &str, mut condition: impl FnMut() -> bool) {
    let polled = timeout(PATIENCE, async {
        while !condition() {
            tokio::time::sleep(POLL).await;
        }
    })
    .await;
    assert!(polled.is_ok(), "timed out waiting until {what}");
}

/// The state letter of process `pid` (`S` sleeping, `T` stopped, `Z`
/// zombie...), or `None` if there is no such process.
fn process_state(pid: u32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may contain spaces.
    let (_, after_name) = stat.rsplit_once(')')?;
    after_name.trim_start().chars().next()
}

fn sleeper() -> ChildGuard {
    ChildGuard::spawn(Command::new("sleep").arg("1000")).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_the_guard_kills_the_child() {
    let guard = sleeper();
    let pid = guard.pid();
    assert!(Path::new(&format!("/proc/{pid}")).exists());

    drop(guard);
    // Gone once killed and reaped by Tokio in the background.
    wait_until("the child is gone", || {
        !Path::new(&format!("/proc/{pid}")).exists()
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_and_resume_stop_and_continue_the_child() {
    let mut guard = sleeper();
    let pid = guard.pid();
    wait_until("the child sleeps", || process_state(pid) == Some('S')).await;

    guard.pause().unwrap();
    wait_until("the child is stopped", || process_state(pid) == Some('T')).await;

    guard.resume().unwrap();
    wait_until("the child runs again", || process_state(pid) == Some('S')).await;

    guard.kill().await.unwrap();
    assert!(guard.try_wait().unwrap().is_some());
    // Killing again is fine; signalling a reaped child is refused.
    guard.kill().await.unwrap();
    assert!(matches!(guard.pause(), Err(Error::ProcessExited { pid: p }) if p == pid));
    assert!(matches!(guard.resume(), Err(Error::ProcessExited { .. })));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_waits_for_the_child_to_exit() {
    let mut guard = sleeper();
    let pid = guard.pid();
    guard.kill().await.unwrap();
    // Reaped by `kill`, so the process is gone at once.
    assert!(!Path::new(&format!("/proc/{pid}")).exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guard_removes_its_temp_dir_after_the_child() {
    let dir = TempDir::new("testkit-process").unwrap();
    let path = dir.path().to_path_buf();
    std::fs::write(path.join("data"), "x").unwrap();

    let guard = ChildGuard::spawn(Command::new("sleep").arg("1000").current_dir(&path))
        .unwrap()
        .with_temp_dir(dir);
    assert_eq!(guard.temp_dir(), Some(path.as_path()));
    let pid = guard.pid();

    drop(guard);
    assert!(!path.exists());
    wait_until("the child is gone", || {
        !Path::new(&format!("/proc/{pid}")).exists()
    })
    .await;
}

#[tokio::test]
async fn spawn_reports_missing_programs() {
    let error = ChildGuard::spawn(&mut Command::new("/nonexistent/server")).unwrap_err();
    assert!(matches!(error, Error::Io { .. }), "{error:?}");
    assert!(error.to_string().contains("/nonexistent/server"), "{error}");
}

#[test]
fn temp_dirs_are_unique_and_removed_on_drop() {
    let first = TempDir::new("testkit-tmp").unwrap();
    let second = TempDir::new("testkit-tmp").unwrap();
    assert_ne!(first.path(), second.path());
    assert!(first.path().is_dir());
    assert!(first.path().starts_with(std::env::temp_dir()));

    let nested = first.path().join("a/b");
    std::fs::create_dir_all(&nested).unwrap();
    std::fs::write(nested.join("file"), "x").unwrap();
    let path = first.path().to_path_buf();
    drop(first);
    assert!(!path.exists());
    assert!(second.path().is_dir());
}
