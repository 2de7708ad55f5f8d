//! The group as a [`BackendEdge`]: every call is served by the member that
//! leads the group.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::stream;
use leaseholder::{
    Acquired, BackendEdge, BackendError, Candidate, Claim, FencingToken, Holder, Key, LeaderId,
    Lease, Prepared, Renewed, WatchEvent, WatchStream,
};
use tokio::sync::broadcast;

use crate::group::{self, GroupInner, Reply, Request, ServeError};
use crate::table::{self, Outcome};

/// The [`BackendEdge`] of a [`PeerGroup`](crate::PeerGroup) member (take
/// it as a [`leaseholder::Backend`] from
/// [`PeerGroup::backend`](crate::PeerGroup::backend)).
pub(crate) struct RaftBackend {
    inner: Arc<GroupInner>,
}

impl RaftBackend {
    pub(crate) fn new(inner: Arc<GroupInner>) -> RaftBackend {
        RaftBackend { inner }
    }

    async fn call(&self, request: Request, budget: Duration) -> Result<Reply, BackendError> {
        group::serve(&self.inner, request, budget, 0)
            .await
            .map_err(|e| match e {
                ServeError::Timeout => BackendError::Timeout(budget),
                other => BackendError::unavailable(other),
            })
    }

    /// A renewal, replacing the lease's metadata when `metadata` is given
    /// (a proclaim).
    async fn renewal(
        &self,
        key: &Key,
        lease: &Lease,
        metadata: Option<&Bytes>,
        ttl: Duration,
        budget: Duration,
    ) -> Result<Renewed, BackendError> {
        let request = Request::Renew {
            key: key_string(key),
            nonce: lease.nonce().as_u128(),
            ttl_us: table::us(ttl),
            metadata: metadata.map(|m| m.to_vec()),
        };
        match self.outcome(request, budget).await? {
            Outcome::Renewed { revision } => {
                let lease = match metadata {
                    Some(m) => lease.with_metadata(m.clone()),
                    None => lease.clone(),
                };
                Ok(Renewed::Renewed(lease.with_revision(revision)))
            }
            Outcome::Lost => Ok(Renewed::Lost),
            other => Err(BackendError::fatal(std::io::Error::other(format!(
                "renew answered {other:?}"
            )))),
        }
    }

    async fn outcome(&self, request: Request, budget: Duration) -> Result<Outcome, BackendError> {
        match self.call(request, budget).await? {
            Reply::Outcome(o) => Ok(o),
            other => Err(mismatch(&other)),
        }
    }
}

fn mismatch(reply: &Reply) -> BackendError {
    BackendError::fatal(std::io::Error::other(format!(
        "the group's leader answered with a reply of another kind: {reply:?}"
    )))
}

fn key_string(key: &Key) -> String {
    key.as_str().to_owned()
}

impl BackendEdge for RaftBackend {
    fn name(&self) -> &'static str {
        "raft"
    }

    async fn setup(&self, budget: Duration) -> Result<Prepared, BackendError> {
        match self.call(Request::Setup, budget).await? {
            Reply::Setup { created: true } => Ok(Prepared::Created),
            Reply::Setup { created: false } => Ok(Prepared::Existing),
            other => Err(mismatch(&other)),
        }
    }

    async fn acquire(
        &self,
        key: &Key,
        claim: &Claim,
        ttl: Duration,
        budget: Duration,
    ) -> Result<Acquired, BackendError> {
        let request = Request::Acquire {
            key: key_string(key),
            nonce: claim.nonce.as_u128(),
            id: *claim.id.as_bytes(),
            metadata: claim.metadata.to_vec(),
            at_us: table::micros(claim.at),
            ttl_us: table::us(ttl),
        };
        match self.outcome(request, budget).await? {
            Outcome::Won { token, revision } => Ok(Acquired::Won(Lease::new(
                claim,
                FencingToken::new(token),
                revision,
            ))),
            Outcome::Held(Some(holder)) => Ok(Acquired::Held(holder.holder())),
            // The lease the leader judged expired changed before the
            // acquire applied (released meanwhile): try again.
            Outcome::Held(None) => Err(BackendError::unavailable(std::io::Error::other(
                "the key changed while the acquire was proposed",
            ))),
            other => Err(BackendError::fatal(std::io::Error::other(format!(
                "acquire answered {other:?}"
            )))),
        }
    }

    async fn renew(
        &self,
        key: &Key,
        lease: &Lease,
        ttl: Duration,
        budget: Duration,
    ) -> Result<Renewed, BackendError> {
        self.renewal(key, lease, None, ttl, budget).await
    }

    async fn release(
        &self,
        key: &Key,
        lease: &Lease,
        budget: Duration,
    ) -> Result<(), BackendError> {
        let request = Request::Release {
            key: key_string(key),
            nonce: lease.nonce().as_u128(),
        };
        self.outcome(request, budget).await.map(|_| ())
    }

    async fn holder(&self, key: &Key, budget: Duration) -> Result<Option<Holder>, BackendError> {
        match self
            .call(
                Request::Holder {
                    key: key_string(key),
                },
                budget,
            )
            .await?
        {
            Reply::Holder(h) => Ok(h.map(|h| h.holder())),
            other => Err(mismatch(&other)),
        }
    }

    async fn keys(&self, budget: Duration) -> Result<Vec<Key>, BackendError> {
        match self.call(Request::Keys, budget).await? {
            Reply::Keys(keys) => Ok(keys.iter().filter_map(|k| Key::new(k).ok()).collect()),
            other => Err(mismatch(&other)),
        }
    }

    async fn watch(&self) -> Result<Option<WatchStream>, BackendError> {
        let rx = self.inner.machine.subscribe();
        let events = stream::unfold(rx, |mut rx| async move {
            match rx.recv().await {
                Ok(event) => Some((event, rx)),
                // Missed events: every key is read again.
                Err(broadcast::error::RecvError::Lagged(_)) => Some((WatchEvent::Resync, rx)),
                Err(broadcast::error::RecvError::Closed) => None,
            }
        });
        Ok(Some(Box::pin(events)))
    }

    /// A member tells its watchers when a lease expires on its own clock
    /// (once per write; see the store's expiry timer), so followers try the
    /// key within a millisecond of its expiry instead of at their timers.
    fn watch_reports_expiry(&self) -> bool {
        true
    }

    fn supports_candidates(&self) -> bool {
        true
    }

    fn supports_proclaim(&self) -> bool {
        true
    }

    async fn proclaim(
        &self,
        key: &Key,
        lease: &Lease,
        metadata: &Bytes,
        ttl: Duration,
        budget: Duration,
    ) -> Result<Renewed, BackendError> {
        self.renewal(key, lease, Some(metadata), ttl, budget).await
    }

    async fn register(
        &self,
        key: &Key,
        candidate: &Candidate,
        ttl: Duration,
        budget: Duration,
    ) -> Result<(), BackendError> {
        let request = Request::Register {
            key: key_string(key),
            id: *candidate.id().as_bytes(),
            value: candidate.encode().to_vec(),
            ttl_us: table::us(ttl),
        };
        self.outcome(request, budget).await.map(|_| ())
    }

    async fn deregister(
        &self,
        key: &Key,
        id: LeaderId,
        budget: Duration,
    ) -> Result<(), BackendError> {
        let request = Request::Deregister {
            key: key_string(key),
            id: *id.as_bytes(),
        };
        self.outcome(request, budget).await.map(|_| ())
    }

    async fn candidates(
        &self,
        key: &Key,
        budget: Duration,
    ) -> Result<Vec<Candidate>, BackendError> {
        match self
            .call(
                Request::Candidates {
                    key: key_string(key),
                },
                budget,
            )
            .await?
        {
            Reply::Candidates(list) => Ok(list
                .iter()
                .filter_map(|v| Candidate::decode(v).ok())
                .collect()),
            other => Err(mismatch(&other)),
        }
    }
}
