//! Locating server binaries and asking them for their version.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::Error;

/// Finds the executable `name` on `PATH`.
///
/// `setup_hint` is the command that installs the binary (for example
/// `scripts/setup`); it is named in the [`Error::MissingBinary`] message so
/// that a developer running the tests knows what to do.
///
/// See [`find_binary_in`] to also search directories that are not on `PATH`.
pub fn find_binary(name: &str, setup_hint: &str) -> Result<PathBuf, Error> {
    find_binary_in(name, &[], setup_hint)
}

/// Finds the executable `name` in `extra_dirs` or on `PATH`.
///
/// The extra directories are searched first, in order, then the `PATH`
/// entries: a binary installed for the project (for example by a setup
/// script into a project-local directory) wins over whatever happens to be
/// installed system-wide. Use [`find_binary_candidates`] and
/// [`binary_version`] when the choice must depend on the version.
///
/// Returns [`Error::MissingBinary`], naming `setup_hint` as the install
/// command, when no executable file called `name` is found.
pub fn find_binary_in(
    name: &str,
    extra_dirs: &[PathBuf],
    setup_hint: &str,
) -> Result<PathBuf, Error> {
    find_binary_candidates(name, extra_dirs)
        .into_iter()
        .next()
        .ok_or_else(|| Error::MissingBinary {
            name: name.to_owned(),
            dirs: extra_dirs.to_vec(),
            setup: setup_hint.to_owned(),
        })
}

/// Lists every executable called `name` in `extra_dirs` and on `PATH`, in
/// search order (extra directories first), without duplicates.
///
/// Useful to pick a binary by its version (see [`binary_version`]) rather
/// than by its position on `PATH`.
pub fn find_binary_candidates(name: &str, extra_dirs: &[PathBuf]) -> Vec<PathBuf> {
    let path_var = std::env::var_os("PATH").unwrap_or_default();
    let path_dirs = std::env::split_paths(&path_var).filter(|dir| !dir.as_os_str().is_empty());
    let mut found: Vec<PathBuf> = Vec::new();
    for dir in extra_dirs.iter().cloned().chain(path_dirs) {
        let candidate = dir.join(name);
        if is_executable(&candidate) && !found.contains(&candidate) {
            found.push(candidate);
        }
    }
    found
}

/// Runs the binary at `path` with `args` (typically `["--version"]`) and
/// returns its standard output followed by its standard error, each
/// trimmed, joined by a newline when both are non-empty.
///
/// Both streams are included because some servers print their version on
/// standard error. This blocks the calling thread until the binary exits,
/// which is fine for a version query.
///
/// Returns [`Error::CommandFailed`] if the binary exits unsuccessfully, and
/// [`Error::Io`] if it cannot be run at all.
pub fn binary_version(path: &Path, args: &[&str]) -> Result<String, Error> {
    let command = command_line(path, args);
    let output = Command::new(path)
        .args(args)
        .output()
        .map_err(|e| Error::io(format!("running `{command}`"), e))?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    let text = [stdout.trim(), stderr.trim()]
        .into_iter()
        .filter(|stream| !stream.is_empty())
        .collect::<Vec<_>>()
        .join("\n");
    if output.status.success() {
        Ok(text)
    } else {
        Err(Error::CommandFailed {
            command,
            status: output.status,
            output: text,
        })
    }
}

/// The first of `candidates` whose version, as `version_of` reads it, is
/// at least `min`.
///
/// Returns [`Error::UnsupportedVersion`] (naming the first candidate that
/// was too old) if every readable one is older, and
/// [`Error::MissingBinary`] (as `name >= MAJOR.MINOR`) if none could be
/// read; both name `setup` as the install command.
pub(crate) fn pick_by_version(
    name: &str,
    candidates: Vec<PathBuf>,
    min: (u32, u32),
    setup: &str,
    version_of: impl Fn(&Path) -> Option<String>,
) -> Result<PathBuf, Error> {
    pick_accepted(
        candidates,
        &format!("{name} >= {}.{}", min.0, min.1),
        setup,
        version_of,
        |version| parse_major_minor(version).is_some_and(|found| found >= min),
    )
}

/// The first of `candidates` whose version, as `version_of` reads it,
/// `accept` takes; `required` says which ones those are, in errors
/// (`etcd >= 3.5.13`).
///
/// Returns [`Error::UnsupportedVersion`] (naming the first candidate that
/// was refused) if `accept` refuses every readable one, and
/// [`Error::MissingBinary`] if none could be read; both name `setup` as the
/// install command.
pub(crate) fn pick_accepted(
    candidates: Vec<PathBuf>,
    required: &str,
    setup: &str,
    version_of: impl Fn(&Path) -> Option<String>,
    accept: impl Fn(&str) -> bool,
) -> Result<PathBuf, Error> {
    let mut too_old = None;
    for candidate in candidates {
        let version = version_of(&candidate);
        tracing::debug!(candidate = %candidate.display(), ?version, "{required} candidate");
        let Some(version) = version else { continue };
        if accept(&version) {
            return Ok(candidate);
        }
        too_old.get_or_insert((candidate, version));
    }
    match too_old {
        Some((binary, found)) => Err(Error::UnsupportedVersion {
            binary,
            found,
            required: required.to_owned(),
            setup: setup.to_owned(),
        }),
        None => Err(Error::MissingBinary {
            name: required.to_owned(),
            dirs: Vec::new(),
            setup: setup.to_owned(),
        }),
    }
}

/// (major, minor, patch) of `MAJOR.MINOR.PATCH[...]`: the patch's leading
/// digits (`3.6.0-rc.1` is 3.6.0).
pub(crate) fn parse_major_minor_patch(version: &str) -> Option<(u32, u32, u32)> {
    let (major, minor) = parse_major_minor(version)?;
    let patch = version.split('.').nth(2)?;
    let digits: String = patch.chars().take_while(char::is_ascii_digit).collect();
    Some((major, minor, digits.parse().ok()?))
}

/// (major, minor) of `MAJOR.MINOR[.PATCH...]`.
pub(crate) fn parse_major_minor(version: &str) -> Option<(u32, u32)> {
    let mut parts = version.split('.');
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?;
    let digits: String = minor.chars().take_while(char::is_ascii_digit).collect();
    Some((major, digits.parse().ok()?))
}

fn command_line(path: &Path, args: &[&str]) -> String {
    std::iter::once(path.as_os_str())
        .chain(args.iter().map(OsStr::new))
        .map(OsStr::to_string_lossy)
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(unix)]
pub(crate) fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    path.metadata()
        .is_ok_and(|meta| meta.is_file() && meta.permissions().mode() & 0o111 != 0)
}

#[cfg(not(unix))]
pub(crate) fn is_executable(path: &Path) -> bool {
    path.is_file()
}
