//! What a candidate can observe about its own campaign.

use std::sync::Arc;

use tokio::time::Instant;

use crate::backend::{FencingToken, Holder, LeaderId};
use crate::error::BackendError;

/// The state of one [`Leader`](crate::Leader)'s campaign, published through
/// [`Leader::state`](crate::Leader::state).
#[derive(Clone, Debug)]
#[non_exhaustive]
pub enum State {
    /// Not campaigning yet.
    Idle,
    /// Campaigning; someone else leads, or nobody does yet. `leader` is the
    /// holder last seen, if any; `waiting` says why this candidate does not
    /// lead. Match with `..`: more fields may come.
    #[non_exhaustive]
    Follower {
        /// The current leader as last seen.
        leader: Option<Holder>,
        /// Why this candidate waits.
        waiting: Waiting,
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

/// Why a [`State::Follower`] does not lead.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Waiting {
    /// Another candidate holds the lease (as last seen).
    Held,
    /// No live lease is known to this candidate: it is about to try, or
    /// waits for the store's answer, a retry or the end of a quiet period
    /// after stepping down.
    Trying,
    /// The key is free, but a preferred candidate (of higher priority, or
    /// nominated by the last leader) goes first; this one tries when the
    /// bounded hold-off has passed, unless a new leader shows up.
    HoldingOff {
        /// The candidate that goes first.
        preferred: LeaderId,
    },
}

impl State {
    /// A follower's state: [`Waiting::Held`] if a leader is known, else
    /// [`Waiting::Trying`].
    pub(crate) fn following(leader: Option<Holder>) -> State {
        let waiting = if leader.is_some() {
            Waiting::Held
        } else {
            Waiting::Trying
        };
        State::Follower { leader, waiting }
    }

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
