//! What a candidate can observe about its own campaign.

use std::sync::Arc;

use tokio::time::Instant;

use crate::backend::{FencingToken, Holder};
use crate::error::BackendError;

/// The state of one [`Leader`](crate::Leader)'s campaign, published through
/// [`Leader::state`](crate::Leader::state).
#[derive(Clone, Debug)]
#[non_exhaustive]
pub enum State {
    /// Not campaigning yet.
    Idle,
    /// Campaigning; someone else leads, or nobody does yet. `leader` is the
    /// holder last seen, if any.
    Follower {
        /// The current leader as last seen.
        leader: Option<Holder>,
    },
    /// This candidate leads.
    Leader {
        /// The term's fencing token.
        token: FencingToken,
        /// When this term began, on tokio's clock.
        since: Instant,
    },
    /// The store cannot be reached; who leads is unknown. A candidate never
    /// reports a stale leader while the store is down.
    Unknown {
        /// Since when.
        since: Instant,
        /// The last error.
        error: Arc<BackendError>,
    },
    /// Shut down (or stopped by a fatal error); does not campaign again.
    Stopped,
}

impl State {
    /// `true` in [`State::Leader`].
    pub fn is_leader(&self) -> bool {
        matches!(self, State::Leader { .. })
    }

    /// `true` in [`State::Stopped`].
    pub fn is_stopped(&self) -> bool {
        matches!(self, State::Stopped)
    }

    /// The fencing token while leading.
    pub fn token(&self) -> Option<FencingToken> {
        match self {
            State::Leader { token, .. } => Some(*token),
            _ => None,
        }
    }
}

/// noleader's view of a candidate: leading or not.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Status {
    /// This candidate leads.
    Leader,
    /// This candidate does not lead (it campaigns, is stopped, or cannot
    /// reach the store).
    Candidate,
}
