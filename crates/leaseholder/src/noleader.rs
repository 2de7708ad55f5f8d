//! A drop-in for users of the crate `noleader` (0.1.3): the same public
//! signatures, on leaseholder's campaign.
//!
//! Change `use noleader::Leader;` to `use leaseholder::noleader::Leader;`
//! and the code compiles as before; it then gets leaseholder's fast
//! handoff, release on shutdown and fencing underneath. Closures take a
//! [`CancellationToken`] and return `anyhow::Result<()>`, as in noleader.
//!
//! Differences worth knowing:
//! - Work that returns `Ok` while still leading is run again, as in
//!   noleader, but the lease is released and won again in between (another
//!   candidate may win it).
//! - A running noleader fleet stores a bare UUID under its key, which
//!   leaseholder reads as a lease held by someone unknown: switch the whole
//!   fleet to a **new key** rather than mixing the two on one key.
//! - For typed errors, fencing tokens and state, use [`crate::Leader`]
//!   ([`Leader::inner`] gives it).
//!
//! ```
//! use leaseholder::noleader::Leader;
//! use leaseholder::{Backend, MemoryStore};
//! use tokio_util::sync::CancellationToken;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> anyhow::Result<()> {
//! let leader = Leader::new("election_key", Backend::memory(&MemoryStore::new()));
//! leader.create_bucket().await?;
//! let stop = CancellationToken::new();
//! let runner = tokio::spawn({
//!     let leader = leader.clone();
//!     let stop = stop.clone();
//!     async move { leader.start(stop).await }
//! });
//! while leader.is_leader().await != leaseholder::Status::Leader {
//!     tokio::task::yield_now().await;
//! }
//! stop.cancel();
//! runner.await??;
//! # Ok(())
//! # }
//! ```

use std::future::Future;

use tokio_util::sync::CancellationToken;

pub use crate::Status;
pub use crate::backend::Backend;

/// noleader's `Leader`, implemented on [`crate::Leader`].
#[derive(Clone, Debug)]
pub struct Leader {
    inner: crate::Leader,
}

impl Leader {
    /// A candidate for `key` on `backend`, with default settings (ttl 10 s).
    pub fn new(key: &str, backend: Backend) -> Self {
        Leader {
            inner: crate::Leader::new(key, backend),
        }
    }

    /// A candidate for `key` on the NATS KV bucket `bucket` (feature
    /// `nats`), as in noleader.
    #[cfg(feature = "nats")]
    #[cfg_attr(docsrs, doc(cfg(feature = "nats")))]
    pub fn new_nats(key: &str, bucket: &str, client: async_nats::Client) -> Self {
        Leader::new(key, Backend::nats(client, bucket))
    }

    /// The leaseholder handle underneath: state, fencing tokens, typed
    /// errors, resign and shutdown.
    pub fn inner(&self) -> &crate::Leader {
        &self.inner
    }

    /// Creates (or validates) the store's bucket or table. Idempotent.
    pub async fn create_bucket(&self) -> anyhow::Result<()> {
        self.inner.setup().await?;
        Ok(())
    }

    /// Runs the election loop until `token` is cancelled, then releases the
    /// lease.
    pub async fn start(&self, token: CancellationToken) -> anyhow::Result<()> {
        self.inner.start(token).await?;
        Ok(())
    }

    /// Runs `f` whenever this candidate leads; its token is cancelled the
    /// moment leadership is lost. Pair it with [`start`](Self::start).
    /// Returns when `f` fails or the election loop stops.
    pub async fn do_while_leader<F, Fut>(&self, f: F) -> anyhow::Result<()>
    where
        F: Fn(CancellationToken) -> Fut,
        Fut: Future<Output = anyhow::Result<()>> + Send + 'static,
    {
        loop {
            self.inner
                .do_while_leader(|term| f(term.cancellation_token().clone()))
                .await?;
            if self.inner.state().borrow().clone().is_stopped() {
                return Ok(());
            }
        }
    }

    /// Campaigns and runs `f` while leading, campaigning again whenever
    /// leadership is lost; returns when `f` fails or the election fails.
    pub async fn acquire_and_run<F, Fut>(&self, f: F) -> anyhow::Result<()>
    where
        F: Fn(CancellationToken) -> Fut,
        Fut: Future<Output = anyhow::Result<()>> + Send + 'static,
    {
        loop {
            match self
                .inner
                .acquire_and_run(|term| f(term.cancellation_token().clone()))
                .await
            {
                Ok(()) => continue,
                Err(crate::Error::Shutdown { .. }) => return Ok(()),
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// This candidate's id.
    pub async fn leader_id(&self) -> uuid::Uuid {
        self.inner.leader_id().as_uuid()
    }

    /// Whether this candidate leads now.
    pub async fn is_leader(&self) -> Status {
        self.inner.is_leader()
    }
}
