//! The errors of building and running a group member.

use std::time::Duration;

/// Why a [`PeerGroup`](crate::PeerGroup) could not be built or answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum GroupError {
    /// The builder's settings are incomplete or contradict each other.
    #[error("peer group settings: {0}")]
    Config(String),
    /// The group could not serve the call (no quorum, a member down, the
    /// Raft node stopped).
    #[error("peer group unavailable: {0}")]
    Unavailable(String),
    /// No leader of the group was known within the time given.
    #[error("no leader of the group within {0:?}")]
    NoLeader(Duration),
    /// This member's Raft node has stopped.
    #[error("this member's Raft node has stopped")]
    Stopped,
}
