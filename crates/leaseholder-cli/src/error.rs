//! The CLI's errors: one line each, and an exit code per kind.

use std::process::ExitCode;

use leaseholder::{BackendError, BoxError, ConfigError};

/// Exit codes other than 0 (success) and 2 (usage, as clap uses it).
pub(crate) mod code {
    /// Any other failure.
    pub(crate) const OTHER: u8 = 1;
    /// Bad arguments or store URL.
    pub(crate) const USAGE: u8 = 2;
    /// The store cannot be reached (connection refused, timeout).
    pub(crate) const UNREACHABLE: u8 = 3;
    /// The bucket or table is missing or misconfigured.
    pub(crate) const MISCONFIGURED: u8 = 4;
    /// The key holds a value that is not a leaseholder lease.
    pub(crate) const FOREIGN: u8 = 5;
    /// The store or backend cannot do this (e.g. list a Redis Cluster).
    pub(crate) const UNSUPPORTED: u8 = 6;
    /// The store refused for lack of permission.
    pub(crate) const DENIED: u8 = 7;
    /// A forced release was not confirmed.
    pub(crate) const NOT_CONFIRMED: u8 = 8;
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum CliError {
    #[error("{0}")]
    Usage(String),
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("cannot connect to {store}")]
    #[cfg_attr(not(feature = "nats"), allow(dead_code))]
    Connect {
        store: String,
        #[source]
        source: BoxError,
    },
    #[error("{what} on {store} failed")]
    Store {
        what: &'static str,
        store: String,
        #[source]
        source: BackendError,
    },
    #[error(
        "key {key} holds a value that is not a leaseholder lease (another program's, or \
         unreadable): refusing to release it; delete it with the store's own tools if you \
         are sure"
    )]
    Foreign { key: String },
    #[error("not confirmed: nothing was released")]
    NotConfirmed,
    #[error("i/o error")]
    Io(#[from] std::io::Error),
}

impl CliError {
    pub(crate) fn exit_code(&self) -> ExitCode {
        ExitCode::from(match self {
            CliError::Usage(_) | CliError::Config(_) => code::USAGE,
            CliError::Connect { .. } => code::UNREACHABLE,
            CliError::Store { source, .. } => match source {
                e if e.is_transient() => code::UNREACHABLE,
                BackendError::Misconfigured { .. } => code::MISCONFIGURED,
                BackendError::Unsupported { .. } => code::UNSUPPORTED,
                BackendError::Denied(_) => code::DENIED,
                _ => code::OTHER,
            },
            CliError::Foreign { .. } => code::FOREIGN,
            CliError::NotConfirmed => code::NOT_CONFIRMED,
            CliError::Io(_) => code::OTHER,
        })
    }

    /// The error and its causes on one line.
    pub(crate) fn one_line(&self) -> String {
        let mut line = self.to_string();
        let mut source = std::error::Error::source(self);
        while let Some(cause) = source {
            let text = cause.to_string();
            // Some errors repeat their cause in their own message.
            if !line.ends_with(&text) {
                line.push_str(": ");
                line.push_str(&text);
            }
            source = cause.source();
        }
        line.replace('\n', " ")
    }
}
