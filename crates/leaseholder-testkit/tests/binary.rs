//! Finding binaries and asking for their version.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use leaseholder_testkit::{
    Error, TempDir, binary_version, find_binary, find_binary_candidates, find_binary_in,
};

const NOT_A_BINARY: &str = "leaseholder-testkit-no-such-binary";

fn write_file(dir: &Path, name: &str, mode: u32) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, "#!/bin/sh\n").unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
    path
}

#[test]
fn missing_binary_names_the_setup_command() {
    let dir = TempDir::new("testkit-binary").unwrap();
    let dirs = [dir.path().to_path_buf()];

    let error = find_binary_in(NOT_A_BINARY, &dirs, "scripts/setup").unwrap_err();
    let message = error.to_string();
    assert!(
        matches!(&error, Error::MissingBinary { name, setup, .. }
            if name == NOT_A_BINARY && setup == "scripts/setup"),
        "{error:?}"
    );
    assert!(
        message.starts_with(&format!("{NOT_A_BINARY} not found on PATH or in [")),
        "{message}"
    );
    assert!(
        message.contains(&dir.path().display().to_string()),
        "{message}"
    );
    assert!(
        message.ends_with("install it with `scripts/setup`"),
        "{message}"
    );

    let error = find_binary(NOT_A_BINARY, "make tools").unwrap_err();
    assert!(error.to_string().ends_with("install it with `make tools`"));
}

#[test]
fn finds_executables_in_extra_dirs_first() {
    let first = TempDir::new("testkit-binary").unwrap();
    let second = TempDir::new("testkit-binary").unwrap();
    // Not executable: skipped.
    write_file(first.path(), "sh", 0o644);
    let wanted = write_file(second.path(), "sh", 0o755);
    let dirs = [first.path().to_path_buf(), second.path().to_path_buf()];

    assert_eq!(
        find_binary_in("sh", &dirs, "scripts/setup").unwrap(),
        wanted
    );

    // The copy in the extra dirs comes first, then the one(s) on PATH.
    let candidates = find_binary_candidates("sh", &dirs);
    assert_eq!(candidates.first(), Some(&wanted));
    assert!(candidates.len() >= 2, "{candidates:?}");
    assert!(candidates.iter().skip(1).all(|path| path != &wanted));
}

#[test]
fn finds_binaries_on_path() {
    let sh = find_binary("sh", "scripts/setup").unwrap();
    assert!(sh.is_absolute() || sh.components().count() > 1, "{sh:?}");
    assert!(sh.ends_with("sh"));
}

#[test]
fn binary_version_returns_trimmed_stdout_and_stderr() {
    let sh = Path::new("/bin/sh");
    let version = binary_version(sh, &["-c", "echo '  fake 1.2.3'; echo 'warning' >&2"]).unwrap();
    assert_eq!(version, "fake 1.2.3\nwarning");

    let version = binary_version(sh, &["-c", "echo 'on stderr 4.5' >&2"]).unwrap();
    assert_eq!(version, "on stderr 4.5");
}

#[test]
fn binary_version_reports_failures() {
    let error = binary_version(Path::new("/bin/sh"), &["-c", "echo broken; exit 3"]).unwrap_err();
    match &error {
        Error::CommandFailed { status, output, .. } => {
            assert_eq!(status.code(), Some(3));
            assert_eq!(output, "broken");
        }
        other => panic!("unexpected error: {other:?}"),
    }

    let error = binary_version(Path::new("/nonexistent/binary"), &["--version"]).unwrap_err();
    assert!(matches!(error, Error::Io { .. }), "{error:?}");
}
