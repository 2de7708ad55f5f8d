//! [`Term`]: what the leader's work holds while it runs.

use std::fmt;
use std::ops::Deref;
use std::sync::{Arc, Mutex};

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::backend::{FencingToken, Key};
use crate::error::Error;

/// One term of leadership, handed to the work by
/// [`acquire_and_run`](crate::Leader::acquire_and_run) and
/// [`do_while_leader`](crate::Leader::do_while_leader).
///
/// It dereferences to a [`CancellationToken`] that fires the moment
/// leadership is lost, always before the store can let another candidate
/// in (by the drift margin), and also on `resign()` and `shutdown()`. So
/// noleader-style code works unchanged:
///
/// ```
/// # async fn demo(term: leaseholder::Term) {
/// while !term.is_cancelled() {
///     // leader-only work, with .await points
/// #   break;
/// }
/// # }
/// ```
///
/// Besides the token it carries the term's [`FencingToken`], and a
/// deadline to check synchronously ([`is_valid`](Self::is_valid),
/// [`check`](Self::check)): a process that was paused (GC, `SIGSTOP`, a VM
/// migration) sees it has lost before it acts, even if the campaign task has
/// not run yet. Only fencing protects a write that is already on its way to
/// a store; pass [`fencing_token`](Self::fencing_token) with it.
///
/// When the token fires because leadership was lost (not for a resign or
/// shutdown, which wait for the work), the work has about the drift margin
/// (see [`LeaderBuilder::drift_margin`](crate::LeaderBuilder::drift_margin))
/// to stop before the store may let another candidate in: stop at once,
/// and leave slow cleanup to code that does not need leadership.
///
/// The work must yield to the runtime (`.await`) regularly: a loop that
/// never awaits starves the campaign on the same thread, which then cannot
/// cancel the token in time. Put blocking code in
/// `tokio::task::spawn_blocking` and check [`is_valid`](Self::is_valid)
/// between steps.
///
/// Clones share the term.
#[derive(Clone)]
pub struct Term {
    inner: Arc<Inner>,
}

struct Inner {
    key: Key,
    id: u64,
    token: FencingToken,
    cancel: CancellationToken,
    ended: CancellationToken,
    deadline: Mutex<Deadline>,
}

/// The deadline, and whether it has been seen passed. Both change under
/// one lock, so that once [`Term::is_valid`] has returned `false` no
/// renewal can make it return `true` again.
struct Deadline {
    at: Instant,
    passed: bool,
}

impl Term {
    pub(crate) fn new(key: Key, id: u64, token: FencingToken, deadline: Instant) -> Term {
        Term {
            inner: Arc::new(Inner {
                key,
                id,
                token,
                cancel: CancellationToken::new(),
                ended: CancellationToken::new(),
                deadline: Mutex::new(Deadline {
                    at: deadline,
                    passed: false,
                }),
            }),
        }
    }

    pub(crate) fn id(&self) -> u64 {
        self.inner.id
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Deadline> {
        // Each critical section is a read or two assignments; a poisoned
        // lock leaves nothing half-done.
        self.inner
            .deadline
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
    }

    /// Moves the deadline forward, unless it has already passed: a term
    /// whose deadline passed is over even if a renewal lands afterwards.
    pub(crate) fn extend(&self, deadline: Instant) {
        let mut d = self.lock();
        if d.passed || Instant::now() >= d.at {
            d.passed = true;
            return;
        }
        if deadline > d.at {
            d.at = deadline;
        }
    }

    pub(crate) fn cancel(&self) {
        self.inner.cancel.cancel();
    }

    /// Marks the term over: its work has returned and the lease was
    /// released (or is known to be gone).
    pub(crate) fn end(&self) {
        self.inner.cancel.cancel();
        self.inner.ended.cancel();
    }

    /// Completes once the term is over: the work has returned and the lease
    /// has been released or is gone.
    pub(crate) async fn ended(&self) {
        self.inner.ended.cancelled().await;
    }

    /// The key this term leads.
    pub fn key(&self) -> &Key {
        &self.inner.key
    }

    /// The term's fencing token: larger than that of every earlier term of
    /// this key.
    pub fn fencing_token(&self) -> FencingToken {
        self.inner.token
    }

    /// The token that fires when leadership ends.
    pub fn cancellation_token(&self) -> &CancellationToken {
        &self.inner.cancel
    }

    /// The local deadline (tokio's clock): the lease is ours until then
    /// unless the token fires earlier. Moves forward with each renewal.
    pub fn deadline(&self) -> Instant {
        self.lock().at
    }

    /// `true` while the token has not fired and the deadline has not passed.
    /// Cheap and synchronous: call it right before acting. Once it has
    /// returned `false` it never returns `true` again.
    pub fn is_valid(&self) -> bool {
        if self.inner.cancel.is_cancelled() {
            return false;
        }
        let mut d = self.lock();
        if d.passed || Instant::now() >= d.at {
            d.passed = true;
            return false;
        }
        true
    }

    /// The fencing token if the term [is valid](Self::is_valid), else
    /// [`Error::Lost`].
    ///
    /// ```
    /// # fn write(_: u64) {}
    /// # fn demo(term: &leaseholder::Term) -> Result<(), leaseholder::Error> {
    /// let token = term.check()?;
    /// write(token.get()); // send the token with the write
    /// # Ok(())
    /// # }
    /// ```
    pub fn check(&self) -> Result<FencingToken, Error> {
        if self.is_valid() {
            Ok(self.inner.token)
        } else {
            Err(Error::Lost {
                key: self.inner.key.clone(),
                token: self.inner.token,
            })
        }
    }
}

impl Deref for Term {
    type Target = CancellationToken;

    fn deref(&self) -> &CancellationToken {
        &self.inner.cancel
    }
}

impl fmt::Debug for Term {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Term")
            .field("key", &self.inner.key)
            .field("token", &self.inner.token)
            .field("cancelled", &self.inner.cancel.is_cancelled())
            .field("deadline", &self.deadline())
            .finish()
    }
}
