//! The backend conformance suite: every row of the lease contract, run
//! against a real store.
//!
//! A backend author implements [`Harness`] (how to get a fresh client of the
//! store, how to plant a value the way a foreign program would) and calls
//! [`run`] from a test. Each row is also public on its own, so a failing row
//! can be run alone.
//!
//! ```
//! use std::time::Duration;
//! use leaseholder::conformance::{self, Harness};
//! use leaseholder::{Backend, BoxError, Key, MemoryStore};
//!
//! struct Memory(MemoryStore);
//!
//! impl Harness for Memory {
//!     async fn backend(&self) -> Backend {
//!         Backend::memory(&self.0)
//!     }
//!     async fn put_foreign(&self, key: &Key, value: &[u8], ttl: Duration) -> Result<(), BoxError> {
//!         self.0.put_raw(key, value.to_vec(), ttl);
//!         Ok(())
//!     }
//!     fn ttl(&self) -> Duration {
//!         Duration::from_millis(300)
//!     }
//! }
//!
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() {
//! let report = conformance::run(&Memory(MemoryStore::new())).await;
//! assert!(report.is_ok(), "{report}");
//! # }
//! ```
//!
//! Rows wait for the store's clock with `tokio::time`, so the memory
//! backend runs them under paused time in no wall time; a real store takes a
//! few multiples of [`Harness::ttl`] in all.

use std::fmt;
use std::future::Future;
use std::time::Duration;

use bytes::Bytes;
use futures_util::future::join_all;
use tokio::time::Instant;

use crate::backend::{
    Acquired, Backend, Candidate, Claim, FencingToken, Key, LeaderId, Lease, Nonce, Renewal,
    Renewed, WatchEvent,
};
use crate::error::{BackendError, BoxError};

/// What the suite needs from the store under test.
pub trait Harness: Send + Sync {
    /// A new client of the store under test, as a separate candidate (a
    /// separate process) would have: its own connection where the store has
    /// connections.
    fn backend(&self) -> impl Future<Output = Backend> + Send;

    /// Writes `value` under `key`, bypassing the lease contract, as another
    /// program (noleader, an operator) would; it should live about `ttl`.
    fn put_foreign(
        &self,
        key: &Key,
        value: &[u8],
        ttl: Duration,
    ) -> impl Future<Output = Result<(), BoxError>> + Send;

    /// The ttl the rows use: the shortest the store supports comfortably
    /// (e.g. 1 s for stores with second resolution).
    fn ttl(&self) -> Duration;

    /// How long past `ttl` the store may take to remove an expired lease.
    /// Default: half the ttl plus 500 ms.
    fn expiry_slack(&self) -> Duration {
        self.ttl() / 2 + Duration::from_millis(500)
    }

    /// A command that starts this test binary's *child* test in a new
    /// process, for the rows where separate processes matter (racers). The
    /// child test calls [`child_main`] first thing. Default: `None` (those
    /// rows are reported unsupported).
    ///
    /// ```no_run
    /// # fn child() -> Option<tokio::process::Command> {
    /// let mut cmd = tokio::process::Command::new(std::env::current_exe().ok()?);
    /// cmd.args(["--exact", "child", "--nocapture"]);
    /// Some(cmd)
    /// # }
    /// ```
    fn child(&self) -> Option<tokio::process::Command> {
        None
    }

    /// A fresh key for one row, so rows and runs never share state.
    fn key(&self, row: &str) -> Key {
        let suffix = uuid::Uuid::new_v4().simple().to_string();
        // Row names are short ASCII identifiers; the fallback never fires.
        Key::new(format!("conformance-{row}-{}", &suffix[..12]))
            .unwrap_or_else(|_| Key::unchecked("conformance"))
    }
}

/// A contract row that did not hold.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{row}: {detail}")]
pub struct Failure {
    /// The row's name.
    pub row: &'static str,
    /// What went wrong.
    pub detail: String,
}

/// The outcome of [`run`].
#[derive(Debug, Clone, Default)]
pub struct Report {
    /// Rows that held.
    pub passed: Vec<&'static str>,
    /// Rows the backend does not claim to support (e.g. watch), with why.
    pub unsupported: Vec<(&'static str, String)>,
    /// Rows that did not hold.
    pub failed: Vec<Failure>,
}

impl Report {
    /// `true` if no row failed.
    pub fn is_ok(&self) -> bool {
        self.failed.is_empty()
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{} passed, {} failed, {} unsupported",
            self.passed.len(),
            self.failed.len(),
            self.unsupported.len()
        )?;
        for failure in &self.failed {
            writeln!(f, "  FAILED {failure}")?;
        }
        for (row, why) in &self.unsupported {
            writeln!(f, "  unsupported {row}: {why}")?;
        }
        Ok(())
    }
}

/// What one row found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The row held.
    Passed,
    /// The backend does not support what the row checks.
    Unsupported(String),
}

type RowResult = Result<Outcome, Failure>;

/// Runs every row, one after the other, and reports.
pub async fn run<H: Harness>(h: &H) -> Report {
    let mut report = Report::default();
    let rows: Vec<(&'static str, RowResult)> = vec![
        ("setup_is_idempotent", setup_is_idempotent(h).await),
        ("one_winner_among_racers", one_winner_among_racers(h).await),
        (
            "tokens_increase_across_terms",
            tokens_increase_across_terms(h).await,
        ),
        ("renew_extends_the_lease", renew_extends_the_lease(h).await),
        (
            "renew_of_a_lost_lease_is_lost",
            renew_of_a_lost_lease_is_lost(h).await,
        ),
        (
            "renew_many_answers_each_renewal_alone",
            renew_many_answers_each_renewal_alone(h).await,
        ),
        (
            "same_candidate_id_never_shares",
            same_candidate_id_never_shares(h).await,
        ),
        (
            "release_is_compare_and_delete",
            release_is_compare_and_delete(h).await,
        ),
        ("keys_lists_held_keys", keys_lists_held_keys(h).await),
        (
            "forced_release_ends_the_term_and_fences",
            forced_release_ends_the_term_and_fences(h).await,
        ),
        (
            "expiry_by_the_store_clock",
            expiry_by_the_store_clock(h).await,
        ),
        (
            "reacquired_lease_expires_too",
            reacquired_lease_expires_too(h).await,
        ),
        (
            "lost_reply_recognized_on_read_back",
            lost_reply_recognized_on_read_back(h).await,
        ),
        (
            "revision_changes_only_with_a_write",
            revision_changes_only_with_a_write(h).await,
        ),
        (
            "watch_fires_on_release_and_expiry",
            watch_fires_on_release_and_expiry(h).await,
        ),
        ("foreign_values_are_held", foreign_values_are_held(h).await),
        (
            "a_short_renew_budget_never_breaks_the_lease",
            a_short_renew_budget_never_breaks_the_lease(h).await,
        ),
        (
            "racers_in_separate_processes",
            racers_in_separate_processes(h).await,
        ),
        (
            "a_lease_of_a_process_that_died_is_kept_not_adopted",
            a_lease_of_a_process_that_died_is_kept_not_adopted(h).await,
        ),
        (
            "proclaim_replaces_the_metadata_and_renews",
            proclaim_replaces_the_metadata_and_renews(h).await,
        ),
        (
            "registry_lists_replaces_and_removes_entries",
            registry_lists_replaces_and_removes_entries(h).await,
        ),
        (
            "registry_entries_expire_by_the_store_clock",
            registry_entries_expire_by_the_store_clock(h).await,
        ),
        (
            "registry_takes_many_candidates_at_once",
            registry_takes_many_candidates_at_once(h).await,
        ),
    ];
    for (row, result) in rows {
        match result {
            Ok(Outcome::Passed) => report.passed.push(row),
            Ok(Outcome::Unsupported(why)) => report.unsupported.push((row, why)),
            Err(failure) => report.failed.push(failure),
        }
    }
    report
}

fn fail(row: &'static str, detail: impl fmt::Display) -> Failure {
    Failure {
        row,
        detail: detail.to_string(),
    }
}

fn claim() -> Claim {
    Claim::new(LeaderId::new(), Bytes::from_static(b"conformance"))
}

/// Unwraps a store reply or fails the row.
fn ok<T>(row: &'static str, what: &str, r: Result<T, BackendError>) -> Result<T, Failure> {
    r.map_err(|e| fail(row, format!("{what} failed: {e} ({e:?})")))
}

/// A fresh key for a row and a set-up client of the store.
async fn one_client<H: Harness>(
    h: &H,
    row: &'static str,
    name: &str,
) -> Result<(Key, Backend), Failure> {
    let a = h.backend().await;
    ok(row, "setup", a.setup().await)?;
    Ok((h.key(name), a))
}

/// A fresh key for a row and two clients of the store, as two candidates.
async fn two_clients<H: Harness>(
    h: &H,
    row: &'static str,
    name: &str,
) -> Result<(Key, Backend, Backend), Failure> {
    let (key, a) = one_client(h, row, name).await?;
    Ok((key, a, h.backend().await))
}

async fn acquire_won(
    row: &'static str,
    b: &Backend,
    key: &Key,
    claim: &Claim,
    ttl: Duration,
) -> Result<Lease, Failure> {
    match ok(row, "acquire", b.acquire(key, claim, ttl).await)? {
        Acquired::Won(lease) => {
            if lease.nonce() != claim.nonce {
                return Err(fail(row, "acquire returned a lease with another nonce"));
            }
            Ok(lease)
        }
        Acquired::Held(h) => Err(fail(row, format!("expected a free key, found {h:?}"))),
    }
}

/// Polls `holder` until the key is free; fails after `limit`. Returns how
/// long it took from `since`.
async fn wait_free(
    row: &'static str,
    b: &Backend,
    key: &Key,
    since: Instant,
    limit: Duration,
) -> Result<Duration, Failure> {
    let step = (limit / 100).clamp(Duration::from_millis(5), Duration::from_millis(50));
    loop {
        if ok(row, "holder", b.holder(key).await)?.is_none() {
            return Ok(since.elapsed());
        }
        if since.elapsed() > limit {
            return Err(fail(
                row,
                format!("lease still present {limit:?} after it was written"),
            ));
        }
        tokio::time::sleep(step).await;
    }
}

/// `setup` is idempotent, and safe when 16 candidates call it at once.
pub async fn setup_is_idempotent<H: Harness>(h: &H) -> RowResult {
    const ROW: &str = "setup_is_idempotent";
    let backends = join_all((0..16).map(|_| h.backend())).await;
    let results = join_all(backends.iter().map(Backend::setup)).await;
    for r in results {
        ok(ROW, "concurrent setup", r)?;
    }
    // A second round on fresh clients, after the store exists.
    ok(ROW, "repeated setup", h.backend().await.setup().await)?;
    Ok(Outcome::Passed)
}

/// Exactly one of 16 concurrent racers wins; the others see the winner.
pub async fn one_winner_among_racers<H: Harness>(h: &H) -> RowResult {
    const ROW: &str = "one_winner_among_racers";
    let key = h.key("race");
    let backends = join_all((0..16).map(|_| h.backend())).await;
    ok(ROW, "setup", backends[0].setup().await)?;
    let claims: Vec<Claim> = (0..16).map(|_| claim()).collect();
    let ttl = h.ttl() * 4;
    let results = join_all(
        backends
            .iter()
            .zip(&claims)
            .map(|(b, c)| b.acquire(&key, c, ttl)),
    )
    .await;
    let mut winners = Vec::new();
    let mut held = Vec::new();
    for r in results {
        match ok(ROW, "acquire", r)? {
            Acquired::Won(lease) => winners.push(lease),
            Acquired::Held(holder) => held.push(holder),
        }
    }
    if winners.len() != 1 {
        return Err(fail(
            ROW,
            format!("{} winners among 16 racers", winners.len()),
        ));
    }
    let winner = &winners[0];
    if let Some(other) = held.iter().find(|h| !h.is_nonce(winner.nonce())) {
        return Err(fail(ROW, format!("a loser saw {other:?}, not the winner")));
    }
    Ok(Outcome::Passed)
}

/// Tokens strictly increase across terms: after release, after expiry, and
/// for another candidate.
pub async fn tokens_increase_across_terms<H: Harness>(h: &H) -> RowResult {
    const ROW: &str = "tokens_increase_across_terms";
    let (key, a, b) = two_clients(h, ROW, "tokens").await?;
    let ttl = h.ttl();
    let first = acquire_won(ROW, &a, &key, &claim(), ttl).await?;
    ok(ROW, "release", a.release(&key, &first).await)?;
    let second = acquire_won(ROW, &b, &key, &claim(), ttl).await?;
    if second.token() <= first.token() {
        return Err(fail(
            ROW,
            format!(
                "after release: token {} is not above {}",
                second.token(),
                first.token()
            ),
        ));
    }
    let since = Instant::now();
    wait_free(ROW, &b, &key, since, ttl + h.expiry_slack()).await?;
    let third = acquire_won(ROW, &a, &key, &claim(), ttl).await?;
    if third.token() <= second.token() {
        return Err(fail(
            ROW,
            format!(
                "after expiry: token {} is not above {}",
                third.token(),
                second.token()
            ),
        ));
    }
    ok(ROW, "release", a.release(&key, &third).await)?;
    Ok(Outcome::Passed)
}

/// Renewals keep a lease alive past its first ttl, keep its token, and the
/// holder's expiry hint stays within the ttl (rounded up to a second).
pub async fn renew_extends_the_lease<H: Harness>(h: &H) -> RowResult {
    const ROW: &str = "renew_extends_the_lease";
    let (key, a) = one_client(h, ROW, "renew").await?;
    let ttl = h.ttl();
    let mut lease = acquire_won(ROW, &a, &key, &claim(), ttl).await?;
    let token = lease.token();
    let start = Instant::now();
    while start.elapsed() < ttl * 2 {
        tokio::time::sleep(ttl / 3).await;
        let called = Instant::now();
        let renewed = ok(ROW, "renew", a.renew(&key, &lease, ttl).await)?;
        if let Some(at) = renewed.sent_at()
            && at > Instant::now()
        {
            return Err(fail(
                ROW,
                format!(
                    "a renewal called {:?} ago reported a send time in the future",
                    called.elapsed()
                ),
            ));
        }
        if let Renewed::SentAt(l, _) = &renewed
            && l.revision() != lease.revision()
        {
            return Err(fail(
                ROW,
                format!(
                    "a renewal answered with SentAt moved the revision from {} to {}: \
                     a read-back after a lost reply would credit the wrong send time",
                    lease.revision(),
                    l.revision()
                ),
            ));
        }
        lease = match renewed {
            Renewed::Renewed(l) | Renewed::SentAt(l, _) => l,
            Renewed::Lost => return Err(fail(ROW, "renewal of a live lease said Lost")),
        };
        if lease.token() != token {
            return Err(fail(ROW, "renewal changed the token"));
        }
    }
    let holder = ok(ROW, "holder", a.holder(&key).await)?
        .ok_or_else(|| fail(ROW, "renewed lease is gone"))?;
    if !holder.is_nonce(lease.nonce()) || holder.token() != Some(token) {
        return Err(fail(ROW, format!("holder shows {holder:?}")));
    }
    let bound = Duration::from_secs(ttl.as_secs_f64().ceil() as u64) + Duration::from_millis(50);
    match holder.expires_in() {
        Some(left) if left > bound => {
            return Err(fail(ROW, format!("expiry hint {left:?} exceeds the ttl")));
        }
        _ => {}
    }
    ok(ROW, "release", a.release(&key, &lease).await)?;
    Ok(Outcome::Passed)
}

/// [`Backend::renew_many`] answers each renewal with its own result, in
/// order: two live leases renewed (token kept) beside a released one that
/// says `Lost` and is not resurrected, over two ttls; an empty call
/// answers nothing. Runs on every backend: one that does not batch
/// renewals uses the trait's default, which must hold too.
pub async fn renew_many_answers_each_renewal_alone<H: Harness>(h: &H) -> RowResult {
    const ROW: &str = "renew_many_answers_each_renewal_alone";
    let (first, a) = one_client(h, ROW, "many").await?;
    let (gone, third) = (h.key("many"), h.key("many"));
    let ttl = h.ttl();
    if !a.renew_many(&[]).await.is_empty() {
        return Err(fail(ROW, "renew_many of no renewals answered something"));
    }
    let mut live = [
        acquire_won(ROW, &a, &first, &claim(), ttl).await?,
        acquire_won(ROW, &a, &third, &claim(), ttl).await?,
    ];
    let tokens = [live[0].token(), live[1].token()];
    let released = acquire_won(ROW, &a, &gone, &claim(), ttl).await?;
    ok(ROW, "release", a.release(&gone, &released).await)?;
    let start = Instant::now();
    while start.elapsed() < ttl * 2 {
        tokio::time::sleep(ttl / 3).await;
        let batch = [
            Renewal::new(first.clone(), live[0].clone(), ttl, ttl),
            Renewal::new(gone.clone(), released.clone(), ttl, ttl),
            Renewal::new(third.clone(), live[1].clone(), ttl, ttl),
        ];
        let results = a.renew_many(&batch).await;
        if results.len() != 3 {
            return Err(fail(
                ROW,
                format!("3 renewals got {} results", results.len()),
            ));
        }
        let mut results = results.into_iter();
        let (r0, r1, r2) = (results.next(), results.next(), results.next());
        match r1 {
            Some(Ok(Renewed::Lost)) => {}
            other => {
                return Err(fail(
                    ROW,
                    format!("renewing a released lease in a batch answered {other:?}"),
                ));
            }
        }
        for (slot, result) in [r0, r2].into_iter().enumerate() {
            let result = result.unwrap_or(Ok(Renewed::Lost));
            match ok(ROW, "renew_many", result)? {
                Renewed::Renewed(l) | Renewed::SentAt(l, _) if l.token() == tokens[slot] => {
                    live[slot] = l;
                }
                Renewed::Lost => {
                    return Err(fail(ROW, "a renewal of a live lease in a batch said Lost"));
                }
                other => {
                    return Err(fail(
                        ROW,
                        format!("a renewal in a batch changed the token: {other:?}"),
                    ));
                }
            }
        }
    }
    if ok(ROW, "holder", a.holder(&gone).await)?.is_some() {
        return Err(fail(
            ROW,
            "renewing a released lease in a batch resurrected it",
        ));
    }
    for (key, lease) in [(&first, &live[0]), (&third, &live[1])] {
        let holder = ok(ROW, "holder", a.holder(key).await)?
            .ok_or_else(|| fail(ROW, "a lease renewed in batches for two ttls is gone"))?;
        if !holder.is_nonce(lease.nonce()) {
            return Err(fail(ROW, format!("holder shows {holder:?}")));
        }
        ok(ROW, "release", a.release(key, lease).await)?;
    }
    Ok(Outcome::Passed)
}

/// Renewing a released lease, or one that expired and was taken by another
/// candidate, says `Lost` and does not disturb the new holder.
pub async fn renew_of_a_lost_lease_is_lost<H: Harness>(h: &H) -> RowResult {
    const ROW: &str = "renew_of_a_lost_lease_is_lost";
    let (key, a, b) = two_clients(h, ROW, "lost").await?;
    let ttl = h.ttl();
    let released = acquire_won(ROW, &a, &key, &claim(), ttl).await?;
    ok(ROW, "release", a.release(&key, &released).await)?;
    if ok(ROW, "renew", a.renew(&key, &released, ttl).await)? != Renewed::Lost {
        return Err(fail(ROW, "renewing a released lease did not say Lost"));
    }
    if ok(ROW, "holder", a.holder(&key).await)?.is_some() {
        return Err(fail(ROW, "renewing a released lease resurrected it"));
    }
    let expired = acquire_won(ROW, &a, &key, &claim(), ttl).await?;
    wait_free(ROW, &a, &key, Instant::now(), ttl + h.expiry_slack()).await?;
    if ok(ROW, "renew", a.renew(&key, &expired, ttl).await)? != Renewed::Lost {
        return Err(fail(ROW, "renewing an expired lease did not say Lost"));
    }
    let expired2 = acquire_won(ROW, &a, &key, &claim(), ttl).await?;
    wait_free(ROW, &a, &key, Instant::now(), ttl + h.expiry_slack()).await?;
    let taken = acquire_won(ROW, &b, &key, &claim(), ttl * 4).await?;
    if ok(ROW, "renew", a.renew(&key, &expired2, ttl).await)? != Renewed::Lost {
        return Err(fail(
            ROW,
            "renewing a lease another candidate took did not say Lost",
        ));
    }
    let holder = ok(ROW, "holder", b.holder(&key).await)?;
    if !holder.is_some_and(|h| h.is_nonce(taken.nonce())) {
        return Err(fail(ROW, "a stale renewal disturbed the new holder"));
    }
    ok(ROW, "release", b.release(&key, &taken).await)?;
    Ok(Outcome::Passed)
}

/// Two handles with the same candidate id never both hold the lease:
/// ownership is the nonce.
pub async fn same_candidate_id_never_shares<H: Harness>(h: &H) -> RowResult {
    const ROW: &str = "same_candidate_id_never_shares";
    let (key, a, b) = two_clients(h, ROW, "sameid").await?;
    let id = LeaderId::new();
    let first = Claim::new(id, Bytes::new());
    let second = Claim::new(id, Bytes::new());
    let ttl = h.ttl() * 4;
    let lease = acquire_won(ROW, &a, &key, &first, ttl).await?;
    match ok(ROW, "acquire", b.acquire(&key, &second, ttl).await)? {
        Acquired::Won(_) => return Err(fail(ROW, "a second handle with the same id won")),
        Acquired::Held(holder) if !holder.is_nonce(first.nonce) => {
            return Err(fail(ROW, format!("holder is {holder:?}")));
        }
        Acquired::Held(_) => {}
    }
    // A lease forged from the second claim with the first's token and
    // revision must not renew or release the first.
    let forged = Lease::new(&second, lease.token(), lease.revision());
    if ok(ROW, "renew", b.renew(&key, &forged, ttl).await)? != Renewed::Lost {
        return Err(fail(ROW, "a same-id handle renewed another's lease"));
    }
    ok(ROW, "release", b.release(&key, &forged).await)?;
    let holder = ok(ROW, "holder", a.holder(&key).await)?;
    if !holder.is_some_and(|h| h.is_nonce(first.nonce)) {
        return Err(fail(ROW, "a same-id handle released another's lease"));
    }
    ok(ROW, "release", a.release(&key, &lease).await)?;
    Ok(Outcome::Passed)
}

/// Release removes only our own lease, and is idempotent.
pub async fn release_is_compare_and_delete<H: Harness>(h: &H) -> RowResult {
    const ROW: &str = "release_is_compare_and_delete";
    let (key, a, b) = two_clients(h, ROW, "release").await?;
    let ttl = h.ttl() * 4;
    let ours = acquire_won(ROW, &a, &key, &claim(), ttl).await?;
    let stranger = Lease::new(&claim(), ours.token(), ours.revision());
    ok(ROW, "release", b.release(&key, &stranger).await)?;
    if !ok(ROW, "holder", a.holder(&key).await)?.is_some_and(|h| h.is_nonce(ours.nonce())) {
        return Err(fail(ROW, "another candidate's release removed our lease"));
    }
    ok(ROW, "release", a.release(&key, &ours).await)?;
    if ok(ROW, "holder", a.holder(&key).await)?.is_some() {
        return Err(fail(ROW, "release left the lease in place"));
    }
    ok(ROW, "second release", a.release(&key, &ours).await)?;
    let next = acquire_won(ROW, &b, &key, &claim(), ttl).await?;
    ok(ROW, "stale release", a.release(&key, &ours).await)?;
    if !ok(ROW, "holder", b.holder(&key).await)?.is_some_and(|h| h.is_nonce(next.nonce())) {
        return Err(fail(ROW, "a stale release removed the next holder's lease"));
    }
    ok(ROW, "release", b.release(&key, &next).await)?;
    Ok(Outcome::Passed)
}

/// [`keys`](crate::BackendEdge::keys) lists every key with a live lease
/// (seen from another client), and
/// [`holders_within`](Backend::holders_within) shows each one's holder
/// and leaves out a released key. Unsupported if the backend cannot list.
pub async fn keys_lists_held_keys<H: Harness>(h: &H) -> RowResult {
    const ROW: &str = "keys_lists_held_keys";
    let (first, a, b) = two_clients(h, ROW, "keys").await?;
    let second = h.key("keys");
    let ttl = h.ttl() * 4;
    let one = acquire_won(ROW, &a, &first, &claim(), ttl).await?;
    let two = acquire_won(ROW, &a, &second, &claim(), ttl).await?;
    let keys = match b.keys().await {
        Err(BackendError::Unsupported { what, needed }) => {
            ok(ROW, "release", a.release(&first, &one).await)?;
            ok(ROW, "release", a.release(&second, &two).await)?;
            return Ok(Outcome::Unsupported(format!("{what}; needs {needed}")));
        }
        other => ok(ROW, "keys", other)?,
    };
    for key in [&first, &second] {
        if !keys.contains(key) {
            return Err(fail(ROW, format!("keys() left out held key {key}")));
        }
    }
    if !keys.windows(2).all(|w| w[0] < w[1]) {
        return Err(fail(ROW, "Backend::keys is not sorted and deduplicated"));
    }
    let listed = ok(ROW, "holders", b.holders_within(ttl).await)?;
    for (key, lease) in [(&first, &one), (&second, &two)] {
        if !listed
            .iter()
            .any(|(k, h)| k == key && h.is_nonce(lease.nonce()) && h.token() == Some(lease.token()))
        {
            return Err(fail(
                ROW,
                format!("holders_within did not show {key}'s lease"),
            ));
        }
    }
    ok(ROW, "release", a.release(&first, &one).await)?;
    let listed = ok(ROW, "holders", b.holders_within(ttl).await)?;
    if listed.iter().any(|(k, _)| k == &first) {
        return Err(fail(ROW, "holders_within listed a released key"));
    }
    ok(ROW, "release", a.release(&second, &two).await)?;
    Ok(Outcome::Passed)
}

/// [`Backend::force_release_within`] from another client ends the
/// holder's term: the holder's renewal is `Lost`, the next acquire gets a
/// larger token, a second forced release of the same (now stale) holder
/// leaves the next term alone, and a foreign value is refused.
pub async fn forced_release_ends_the_term_and_fences<H: Harness>(h: &H) -> RowResult {
    use crate::backend::ForceReleased;
    const ROW: &str = "forced_release_ends_the_term_and_fences";
    let (key, a, b) = two_clients(h, ROW, "force").await?;
    let ttl = h.ttl() * 4;
    let old = acquire_won(ROW, &a, &key, &claim(), ttl).await?;
    let seen = ok(ROW, "holder", b.holder(&key).await)?
        .ok_or_else(|| fail(ROW, "the held key read as free"))?;
    match ok(
        ROW,
        "force release",
        b.force_release_within(&key, &seen, ttl).await,
    )? {
        ForceReleased::Ended { token, now: None } if token == old.token() => {}
        other => return Err(fail(ROW, format!("force release reported {other:?}"))),
    }
    if ok(ROW, "renew", a.renew(&key, &old, ttl).await)? != Renewed::Lost {
        return Err(fail(ROW, "the old holder renewed a force-released lease"));
    }
    let next = acquire_won(ROW, &b, &key, &claim(), ttl).await?;
    if next.token() <= old.token() {
        return Err(fail(
            ROW,
            format!(
                "token {} after a forced release of {}",
                next.token(),
                old.token()
            ),
        ));
    }
    match ok(
        ROW,
        "stale force release",
        b.force_release_within(&key, &seen, ttl).await,
    )? {
        ForceReleased::Ended { now: Some(now), .. } if now.is_nonce(next.nonce()) => {}
        other => {
            return Err(fail(
                ROW,
                format!("a stale forced release reported {other:?}"),
            ));
        }
    }
    ok(ROW, "release", b.release(&key, &next).await)?;
    let foreign = h.key("force-foreign");
    ok(ROW, "setup", b.setup().await)?;
    h.put_foreign(&foreign, b"not a leaseholder value", ttl)
        .await
        .map_err(|e| fail(ROW, format!("put_foreign failed: {e}")))?;
    let seen = ok(ROW, "holder", b.holder(&foreign).await)?
        .ok_or_else(|| fail(ROW, "a foreign value read as free"))?;
    match ok(
        ROW,
        "force release",
        b.force_release_within(&foreign, &seen, ttl).await,
    )? {
        ForceReleased::Foreign => {}
        other => {
            return Err(fail(
                ROW,
                format!("a foreign value was force-released: {other:?}"),
            ));
        }
    }
    if ok(ROW, "holder", b.holder(&foreign).await)?.is_none() {
        return Err(fail(ROW, "refusing a foreign value removed it"));
    }
    Ok(Outcome::Passed)
}

/// A lease expires by the store's clock: never before `ttl` after it was
/// sent, and within the store's slack after that.
pub async fn expiry_by_the_store_clock<H: Harness>(h: &H) -> RowResult {
    const ROW: &str = "expiry_by_the_store_clock";
    let (key, a) = one_client(h, ROW, "expiry").await?;
    let ttl = h.ttl();
    let sent = Instant::now();
    acquire_won(ROW, &a, &key, &claim(), ttl).await?;
    let took = wait_free(ROW, &a, &key, sent, ttl + h.expiry_slack()).await?;
    if took < ttl {
        return Err(fail(
            ROW,
            format!("lease gone {took:?} after it was sent, before its ttl {ttl:?}"),
        ));
    }
    Ok(Outcome::Passed)
}

/// A lease acquired right after the previous one expired (while a store may
/// still hold an expiry marker) expires too.
pub async fn reacquired_lease_expires_too<H: Harness>(h: &H) -> RowResult {
    const ROW: &str = "reacquired_lease_expires_too";
    let (key, a) = one_client(h, ROW, "reacquire").await?;
    let ttl = h.ttl();
    acquire_won(ROW, &a, &key, &claim(), ttl).await?;
    wait_free(ROW, &a, &key, Instant::now(), ttl + h.expiry_slack()).await?;
    let sent = Instant::now();
    acquire_won(ROW, &a, &key, &claim(), ttl).await?;
    let took = wait_free(ROW, &a, &key, sent, ttl + h.expiry_slack()).await?;
    if took < ttl {
        return Err(fail(ROW, format!("re-acquired lease gone after {took:?}")));
    }
    Ok(Outcome::Passed)
}

/// A write that took effect but whose reply was lost is recognized by
/// reading back: `holder` shows our nonce, and the lease it shows can be
/// renewed. An acquire dropped mid-flight leaves either our lease or none.
pub async fn lost_reply_recognized_on_read_back<H: Harness>(h: &H) -> RowResult {
    const ROW: &str = "lost_reply_recognized_on_read_back";
    let (key, a) = one_client(h, ROW, "readback").await?;
    let ttl = h.ttl() * 4;
    let c = claim();
    // The reply is "lost": we ignore it and read back.
    let _ = a.acquire(&key, &c, ttl).await;
    let seen = ok(ROW, "holder", a.holder(&key).await)?
        .ok_or_else(|| fail(ROW, "acquire took no effect"))?;
    if !seen.is_nonce(c.nonce) {
        return Err(fail(
            ROW,
            format!("read-back shows {seen:?}, not our nonce"),
        ));
    }
    let token = seen
        .token()
        .ok_or_else(|| fail(ROW, "read-back of our lease has no token"))?;
    let lease = Lease::new(&c, token, seen.revision());
    let _ = a.renew(&key, &lease, ttl).await;
    let after = ok(ROW, "holder", a.holder(&key).await)?
        .ok_or_else(|| fail(ROW, "lease gone after renewal"))?;
    if !after.is_nonce(c.nonce) || after.token() != Some(token) {
        return Err(fail(ROW, format!("after a lost renewal reply: {after:?}")));
    }
    let adopted = lease.with_revision(after.revision());
    match ok(ROW, "renew", a.renew(&key, &adopted, ttl).await)? {
        Renewed::Renewed(l) | Renewed::SentAt(l, _) => {
            ok(ROW, "release", a.release(&key, &l).await)?
        }
        Renewed::Lost => return Err(fail(ROW, "the read-back lease could not be renewed")),
    }
    // Drop an acquire after its first poll.
    let d = claim();
    {
        let mut call = std::pin::pin!(a.acquire(&key, &d, ttl));
        let _ = futures_util::poll!(call.as_mut());
    }
    match ok(ROW, "holder", a.holder(&key).await)? {
        None => {}
        Some(h) if h.is_nonce(d.nonce) => {
            let token = h.token().ok_or_else(|| fail(ROW, "no token"))?;
            ok(
                ROW,
                "release",
                a.release(&key, &Lease::new(&d, token, h.revision())).await,
            )?;
        }
        Some(other) => return Err(fail(ROW, format!("dropped acquire left {other:?}"))),
    }
    Ok(Outcome::Passed)
}

/// A lease's revision records its last write: `holder` shows the revision
/// the acquire or the last renewal returned, and the same one on every
/// read until the next write, however much time passes between reads.
///
/// The campaign relies on it: after a renewal whose reply was lost it reads
/// the key back, and a revision other than the one it knows proves that
/// the renewal landed, so the term's deadline moves to that renewal's send
/// time. A revision made of the time of the read (say, the server's clock
/// plus the time to live left, in whole milliseconds) differs between
/// reads of an unchanged lease, credits a renewal that never happened, and
/// lets the leader work past the store's expiry.
pub async fn revision_changes_only_with_a_write<H: Harness>(h: &H) -> RowResult {
    const ROW: &str = "revision_changes_only_with_a_write";
    let (key, a) = one_client(h, ROW, "revision").await?;
    let ttl = h.ttl() * 4;
    let c = claim();
    let mut lease = acquire_won(ROW, &a, &key, &c, ttl).await?;
    for write in 0..3 {
        for read in 0..3 {
            // Reads in other milliseconds than the write and each other.
            tokio::time::sleep(Duration::from_millis(3)).await;
            let seen = ok(ROW, "holder", a.holder(&key).await)?
                .ok_or_else(|| fail(ROW, "the lease is gone"))?;
            if !seen.is_nonce(c.nonce) {
                return Err(fail(ROW, format!("the key shows {seen:?}, not our lease")));
            }
            if seen.revision() != lease.revision() {
                return Err(fail(
                    ROW,
                    format!(
                        "read {read} after write {write} shows revision {}, but the write \
                         returned {} and nothing was written since: a read-back would \
                         take it for a renewal that landed",
                        seen.revision(),
                        lease.revision()
                    ),
                ));
            }
        }
        tokio::time::sleep(Duration::from_millis(3)).await;
        lease = match ok(ROW, "renew", a.renew(&key, &lease, ttl).await)? {
            Renewed::Renewed(l) | Renewed::SentAt(l, _) => l,
            Renewed::Lost => return Err(fail(ROW, "renewal of a live lease said Lost")),
        };
    }
    ok(ROW, "release", a.release(&key, &lease).await)?;
    Ok(Outcome::Passed)
}

/// A renewal given almost no time (1 ms, then 10 ms) either renews or
/// fails with a transient error; it never reports the live lease `Lost`,
/// never hands back another lease, and leaves the lease ours: a normal
/// renewal afterwards succeeds. (A store that bounds the request on its
/// side by the budget is exercised here.)
pub async fn a_short_renew_budget_never_breaks_the_lease<H: Harness>(h: &H) -> RowResult {
    const ROW: &str = "a_short_renew_budget_never_breaks_the_lease";
    let (key, a) = one_client(h, ROW, "budget").await?;
    let ttl = h.ttl() * 4;
    let c = claim();
    let mut lease = acquire_won(ROW, &a, &key, &c, ttl).await?;
    for budget in [Duration::from_millis(1), Duration::from_millis(10)] {
        for _ in 0..3 {
            match a.renew_within(&key, &lease, ttl, budget).await {
                Ok(Renewed::Renewed(l) | Renewed::SentAt(l, _))
                    if l.nonce() == c.nonce && l.token() == lease.token() =>
                {
                    lease = l;
                }
                Ok(Renewed::Renewed(l) | Renewed::SentAt(l, _)) => {
                    return Err(fail(ROW, format!("a short renewal returned {l:?}")));
                }
                Ok(Renewed::Lost) => {
                    return Err(fail(
                        ROW,
                        format!(
                            "a renewal with a budget of {budget:?} reported the live lease lost"
                        ),
                    ));
                }
                Err(e) if e.is_transient() => {}
                Err(e) => {
                    return Err(fail(
                        ROW,
                        format!(
                            "a renewal with a budget of {budget:?} failed fatally: {e} ({e:?})"
                        ),
                    ));
                }
            }
        }
    }
    // The lease is still ours (a renewal that timed out on the store's
    // side may or may not have landed: adopt the revision the store shows).
    let seen = ok(ROW, "holder", a.holder(&key).await)?
        .ok_or_else(|| fail(ROW, "the lease is gone after short renewals"))?;
    if !seen.is_nonce(c.nonce) {
        return Err(fail(
            ROW,
            format!("after short renewals the key shows {seen:?}"),
        ));
    }
    let adopted = lease.with_revision(seen.revision());
    match ok(ROW, "renew", a.renew(&key, &adopted, ttl).await)? {
        Renewed::Renewed(l) | Renewed::SentAt(l, _) => {
            ok(ROW, "release", a.release(&key, &l).await)?
        }
        Renewed::Lost => {
            return Err(fail(ROW, "a normal renewal after short ones reported Lost"));
        }
    }
    Ok(Outcome::Passed)
}

/// Five racers in five separate processes (each its own client, as
/// [`Harness::child`] starts them): exactly one wins, and every other one
/// sees the winner. Unsupported unless the harness can start processes.
pub async fn racers_in_separate_processes<H: Harness>(h: &H) -> RowResult {
    const ROW: &str = "racers_in_separate_processes";
    const RACERS: usize = 5;
    let (key, a) = one_client(h, ROW, "processes").await?;
    let ttl = h.ttl() * 4;
    let task = format!("race {} {}", ttl.as_millis(), key.as_str());
    let mut children = Vec::new();
    for _ in 0..RACERS {
        match spawn_child(h, ROW, &task)? {
            Some(child) => children.push(child),
            None => return Ok(unsupported_without_children()),
        }
    }
    let mut won = Vec::new();
    let mut held = Vec::new();
    for child in children {
        let line = child_reply(ROW, child, ttl).await?;
        match line.split_whitespace().collect::<Vec<_>>().as_slice() {
            ["won", nonce] => won.push(nonce.to_string()),
            ["held", nonce] => held.push(nonce.to_string()),
            _ => return Err(fail(ROW, format!("a child replied {line:?}"))),
        }
    }
    if won.len() != 1 {
        return Err(fail(
            ROW,
            format!("{} winners among {RACERS} racing processes", won.len()),
        ));
    }
    if let Some(other) = held.iter().find(|n| **n != won[0]) {
        return Err(fail(
            ROW,
            format!(
                "a loser saw holder nonce {other}, not the winner's {}",
                won[0]
            ),
        ));
    }
    // The winner's process is gone; its lease lives on in the store.
    let seen = ok(ROW, "holder", a.holder(&key).await)?
        .ok_or_else(|| fail(ROW, "the winner's lease is gone"))?;
    let nonce = seen.nonce().map(|n| format!("{:032x}", n.as_u128()));
    if nonce.as_deref() != Some(won[0].as_str()) {
        return Err(fail(
            ROW,
            format!("the store shows {seen:?}, not the winner"),
        ));
    }
    Ok(Outcome::Passed)
}

/// A process acquires and exits before anyone hears its reply (a crash
/// right after the write): the store keeps that process's lease, with its
/// nonce, until it expires; another client sees it held, never free and
/// never its own; after the ttl the key is free again and the next token
/// is larger. Unsupported unless the harness can start processes.
pub async fn a_lease_of_a_process_that_died_is_kept_not_adopted<H: Harness>(h: &H) -> RowResult {
    const ROW: &str = "a_lease_of_a_process_that_died_is_kept_not_adopted";
    let (key, a) = one_client(h, ROW, "died").await?;
    let ttl = h.ttl();
    let task = format!("die {} {}", ttl.as_millis(), key.as_str());
    let Some(child) = spawn_child(h, ROW, &task)? else {
        return Ok(unsupported_without_children());
    };
    let line = child_reply(ROW, child, ttl).await?;
    let nonce = line
        .strip_prefix("claim ")
        .ok_or_else(|| fail(ROW, format!("the child printed no claim: {line:?}")))?
        .trim()
        .to_owned();
    let started = Instant::now();
    let seen = ok(ROW, "holder", a.holder(&key).await)?
        .ok_or_else(|| fail(ROW, "the dead process's acquire left no lease"))?;
    if seen.nonce().map(|n| format!("{:032x}", n.as_u128())) != Some(nonce.clone()) {
        return Err(fail(
            ROW,
            format!("the store shows {seen:?}, not the dead process's lease"),
        ));
    }
    let token = seen
        .token()
        .ok_or_else(|| fail(ROW, "the dead process's lease has no token"))?;
    match ok(ROW, "acquire", a.acquire(&key, &claim(), ttl).await)? {
        Acquired::Held(holder) if holder.is_nonce(seen.nonce().unwrap_or(Nonce::from_u128(0))) => {}
        other => return Err(fail(ROW, format!("acquire beside a live lease: {other:?}"))),
    }
    wait_free(ROW, &a, &key, started, ttl + h.expiry_slack()).await?;
    let next = acquire_won(ROW, &a, &key, &claim(), ttl).await?;
    if next.token() <= token {
        return Err(fail(
            ROW,
            format!("token {} after the dead process's {token}", next.token()),
        ));
    }
    ok(ROW, "release", a.release(&key, &next).await)?;
    Ok(Outcome::Passed)
}

fn unsupported_without_children() -> Outcome {
    Outcome::Unsupported("the harness starts no child processes (Harness::child)".into())
}

/// Starts the harness's child process on `task`; `None` if the harness
/// starts none.
fn spawn_child<H: Harness>(
    h: &H,
    row: &'static str,
    task: &str,
) -> Result<Option<tokio::process::Child>, Failure> {
    let Some(mut cmd) = h.child() else {
        return Ok(None);
    };
    cmd.env(CHILD_ENV, task)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::inherit())
        .kill_on_drop(true);
    cmd.spawn()
        .map(Some)
        .map_err(|e| fail(row, format!("starting a child process failed: {e}")))
}

/// Waits for a child to finish; the reply it printed.
async fn child_reply(
    row: &'static str,
    child: tokio::process::Child,
    ttl: Duration,
) -> Result<String, Failure> {
    let limit = ttl + Duration::from_secs(30);
    let out = tokio::time::timeout(limit, child.wait_with_output())
        .await
        .map_err(|_| fail(row, format!("a child did not finish within {limit:?}")))?
        .map_err(|e| fail(row, format!("a child failed: {e}")))?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find_map(|l| l.strip_prefix(CHILD_REPLY))
        .map(str::to_owned)
        .ok_or_else(|| fail(row, format!("a child printed no reply: {text:?}")))
}

/// The environment variable that tells a test binary started by
/// [`racers_in_separate_processes`] what to do; see [`child_main`].
pub const CHILD_ENV: &str = "LEASEHOLDER_CONFORMANCE_CHILD";

const CHILD_REPLY: &str = "leaseholder-conformance-child: ";

/// The child side of the rows that run in separate processes. Call it at
/// the start of the test that [`Harness::child`] starts: it returns `false`
/// at once unless [`CHILD_ENV`] is set; if it is, it does what the
/// variable asks (one acquire, with a client from
/// [`Harness::backend`]), prints the result on stdout and returns `true`.
///
/// ```no_run
/// # use leaseholder::conformance::{self, Harness};
/// # async fn demo<H: Harness>(harness: H) {
/// // tests/conformance.rs: a test named `child`, started by Harness::child
/// if conformance::child_main(&harness).await {
///     return;
/// }
/// # }
/// ```
pub async fn child_main<H: Harness>(h: &H) -> bool {
    let Ok(task) = std::env::var(CHILD_ENV) else {
        return false;
    };
    let reply = match task.split_whitespace().collect::<Vec<_>>().as_slice() {
        ["die", ms, key] => match (ms.parse::<u64>(), Key::new(*key)) {
            (Ok(ms), Ok(key)) => {
                let b = h.backend().await;
                let c = claim();
                // The claim goes out first; the reply never does: the
                // process exits as if it crashed after the write.
                println!("{CHILD_REPLY}claim {:032x}", c.nonce.as_u128());
                let _ = b.acquire(&key, &c, Duration::from_millis(ms)).await;
                return true;
            }
            _ => format!("bad task {task:?}"),
        },
        ["race", ms, key] => match (ms.parse::<u64>(), Key::new(*key)) {
            (Ok(ms), Ok(key)) => {
                let b = h.backend().await;
                let c = claim();
                match b.acquire(&key, &c, Duration::from_millis(ms)).await {
                    Ok(Acquired::Won(l)) => format!("won {:032x}", l.nonce().as_u128()),
                    Ok(Acquired::Held(holder)) => match holder.nonce() {
                        Some(n) => format!("held {:032x}", n.as_u128()),
                        None => "held foreign".to_owned(),
                    },
                    Err(e) => format!("error {e}"),
                }
            }
            _ => format!("bad task {task:?}"),
        },
        _ => format!("bad task {task:?}"),
    };
    println!("{CHILD_REPLY}{reply}");
    true
}

/// The watch reports a release, and an expiry where the backend says it
/// does.
pub async fn watch_fires_on_release_and_expiry<H: Harness>(h: &H) -> RowResult {
    const ROW: &str = "watch_fires_on_release_and_expiry";
    let (key, a) = one_client(h, ROW, "watch").await?;
    let ttl = h.ttl();
    let limit = ttl * 2 + h.expiry_slack() + Duration::from_secs(2);
    let watcher = h.backend().await;
    let mut sub = watcher.subscribe(&key);
    // The watcher says Resync once its subscription is up.
    match tokio::time::timeout(limit, sub.next()).await {
        Ok(WatchEvent::Resync) => {}
        Ok(other) => return Err(fail(ROW, format!("first event was {other:?}"))),
        Err(_) => return Ok(Outcome::Unsupported("the backend has no watch".into())),
    }
    let lease = acquire_won(ROW, &a, &key, &claim(), ttl * 4).await?;
    ok(ROW, "release", a.release(&key, &lease).await)?;
    wait_event(ROW, &mut sub, limit, freed(&key))
        .await
        .map_err(|f| fail(ROW, format!("no Released after release: {}", f.detail)))?;
    if !a.watch_reports_expiry() {
        return Ok(Outcome::Passed);
    }
    acquire_won(ROW, &a, &key, &claim(), ttl).await?;
    wait_event(ROW, &mut sub, limit, freed(&key))
        .await
        .map_err(|f| fail(ROW, format!("no Released after expiry: {}", f.detail)))?;
    Ok(Outcome::Passed)
}

async fn wait_event(
    row: &'static str,
    sub: &mut crate::backend::Subscription,
    limit: Duration,
    want: impl Fn(&WatchEvent) -> bool,
) -> Result<(), Failure> {
    let until = Instant::now() + limit;
    let mut arrived = Vec::new();
    loop {
        match tokio::time::timeout_at(until, sub.next()).await {
            Ok(event) if want(&event) => return Ok(()),
            Ok(event) => arrived.push(event),
            Err(_) if arrived.is_empty() => {
                return Err(fail(row, format!("nothing within {limit:?}")));
            }
            Err(_) => {
                return Err(fail(
                    row,
                    format!("not within {limit:?}; what arrived instead: {arrived:?}"),
                ));
            }
        }
    }
}

/// The key became free, as a watch may say it: `Released(key)`, or
/// `Resync` from a watch that polls and cannot tell which key changed
/// (the campaign re-reads every key on it).
fn freed(key: &Key) -> impl Fn(&WatchEvent) -> bool + '_ {
    move |e| match e {
        WatchEvent::Released(k) => k == key,
        WatchEvent::Resync => true,
        _ => false,
    }
}

/// A value the backend cannot decode (garbage, a noleader UUID) is a live
/// lease held by someone unknown: acquire reports it held, and renew and
/// release leave it alone.
pub async fn foreign_values_are_held<H: Harness>(h: &H) -> RowResult {
    const ROW: &str = "foreign_values_are_held";
    let a = h.backend().await;
    ok(ROW, "setup", a.setup().await)?;
    let ttl = h.ttl() * 4;
    let noleader = *uuid::Uuid::new_v4().as_bytes();
    for (name, value) in [
        ("garbage", b"\xff\x00 not a lease".as_slice()),
        ("uuid", noleader.as_slice()),
        ("empty", b"".as_slice()),
        ("future-version", b"LH\x7fsomething".as_slice()),
    ] {
        let key = h.key(name);
        h.put_foreign(&key, value, ttl)
            .await
            .map_err(|e| fail(ROW, format!("put_foreign failed: {e}")))?;
        let c = claim();
        match ok(ROW, "acquire", a.acquire(&key, &c, ttl).await)? {
            Acquired::Won(_) => {
                return Err(fail(ROW, format!("acquired over a foreign {name} value")));
            }
            Acquired::Held(holder) if !holder.is_foreign() => {
                return Err(fail(ROW, format!("{name} value read as {holder:?}")));
            }
            Acquired::Held(_) => {}
        }
        let held = ok(ROW, "holder", a.holder(&key).await)?;
        if !held.as_ref().is_some_and(|h| h.is_foreign()) {
            return Err(fail(ROW, format!("holder of a {name} value: {held:?}")));
        }
        let forged = Lease::new(&c, crate::backend::FencingToken::new(1), 1);
        if ok(ROW, "renew", a.renew(&key, &forged, ttl).await)? != Renewed::Lost {
            return Err(fail(ROW, format!("renewed over a foreign {name} value")));
        }
        ok(ROW, "release", a.release(&key, &forged).await)?;
        if ok(ROW, "holder", a.holder(&key).await)?.is_none() {
            return Err(fail(ROW, format!("release removed a foreign {name} value")));
        }
    }
    Ok(Outcome::Passed)
}

fn no_registry(b: &Backend) -> Option<Outcome> {
    (!b.supports_candidates())
        .then(|| Outcome::Unsupported("the backend keeps no candidate registry".into()))
}

/// The entries `b` lists for `key`, by id.
async fn listed(
    row: &'static str,
    b: &Backend,
    key: &Key,
) -> Result<std::collections::BTreeMap<LeaderId, Candidate>, Failure> {
    let list = ok(row, "candidates", b.candidates(key).await)?;
    let n = list.len();
    let by_id: std::collections::BTreeMap<_, _> = list.into_iter().map(|c| (c.id(), c)).collect();
    if by_id.len() != n {
        return Err(fail(row, "an id is listed twice"));
    }
    Ok(by_id)
}

/// What `b` reads as the one entry of `id` under `key` must be `want`.
async fn one_entry(
    row: &'static str,
    b: &Backend,
    key: &Key,
    id: LeaderId,
    want: Option<&Candidate>,
) -> Result<(), Failure> {
    let got = ok(row, "candidate", b.candidate(key, id).await)?;
    if got.as_ref() != want {
        return Err(fail(
            row,
            format!("candidate({id}) read {got:?}, expected {want:?}"),
        ));
    }
    Ok(())
}

/// An entry as stored: `since` at millisecond precision.
fn entry(priority: i32, metadata: &'static [u8]) -> Candidate {
    let since = std::time::UNIX_EPOCH
        + Duration::from_millis(
            u64::try_from(
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap_or_default()
                    .as_millis(),
            )
            .unwrap_or(0),
        );
    Candidate::new(LeaderId::new(), priority, Bytes::from_static(metadata)).with_since(since)
}

/// The registry of a key lists what was registered, as written, to every
/// client, and reads each entry alone (`candidate`) the same; writing an
/// entry again replaces it (no second entry for the id); deregistering
/// removes it (and is idempotent); a key's registry is its own, and it
/// neither makes the key held nor touches its lease.
pub async fn registry_lists_replaces_and_removes_entries<H: Harness>(h: &H) -> RowResult {
    const ROW: &str = "registry_lists_replaces_and_removes_entries";
    let (key, a, b) = two_clients(h, ROW, "registry").await?;
    if let Some(unsupported) = no_registry(&a) {
        return Ok(unsupported);
    }
    let ttl = h.ttl() * 20;
    let (ca, cb) = (entry(3, b"a"), entry(-7, b""));
    ok(
        ROW,
        "register",
        a.register_within(&key, &ca, ttl, ttl).await,
    )?;
    ok(
        ROW,
        "register",
        b.register_within(&key, &cb, ttl, ttl).await,
    )?;
    for client in [&a, &b] {
        let seen = listed(ROW, client, &key).await?;
        if seen.len() != 2 || seen.get(&ca.id()) != Some(&ca) || seen.get(&cb.id()) != Some(&cb) {
            return Err(fail(
                ROW,
                format!("listed {seen:?}, registered {ca:?} and {cb:?}"),
            ));
        }
        one_entry(ROW, client, &key, ca.id(), Some(&ca)).await?;
        one_entry(ROW, client, &key, cb.id(), Some(&cb)).await?;
        one_entry(ROW, client, &key, LeaderId::new(), None).await?;
    }
    if ok(ROW, "holder", a.holder(&key).await)?.is_some() {
        return Err(fail(ROW, "registering made the key held"));
    }
    let lease = acquire_won(ROW, &a, &key, &claim(), ttl).await?;
    let other = h.key("registry-other");
    if !listed(ROW, &a, &other).await?.is_empty() {
        return Err(fail(ROW, "another key lists this key's entries"));
    }
    one_entry(ROW, &a, &other, ca.id(), None).await?;
    let again = ca
        .clone()
        .with_nominee(Some((cb.id(), FencingToken::new(41))));
    let again = Candidate::new(again.id(), 9, Bytes::from_static(b"a2"))
        .with_since(again.since())
        .with_nominee(again.nominee());
    ok(
        ROW,
        "register",
        a.register_within(&key, &again, ttl, ttl).await,
    )?;
    let seen = listed(ROW, &b, &key).await?;
    if seen.len() != 2 || seen.get(&ca.id()) != Some(&again) {
        return Err(fail(ROW, format!("after a rewrite: {seen:?}")));
    }
    one_entry(ROW, &b, &key, ca.id(), Some(&again)).await?;
    ok(
        ROW,
        "deregister",
        a.deregister_within(&key, ca.id(), ttl).await,
    )?;
    ok(
        ROW,
        "deregister",
        a.deregister_within(&key, ca.id(), ttl).await,
    )?;
    let seen = listed(ROW, &b, &key).await?;
    if seen.len() != 1 || !seen.contains_key(&cb.id()) {
        return Err(fail(ROW, format!("after deregister: {seen:?}")));
    }
    one_entry(ROW, &b, &key, ca.id(), None).await?;
    match ok(ROW, "holder", a.holder(&key).await)? {
        Some(holder) if holder.is_nonce(lease.nonce()) => {}
        other => {
            return Err(fail(
                ROW,
                format!("the registry touched the lease: {other:?}"),
            ));
        }
    }
    ok(ROW, "release", a.release(&key, &lease).await)?;
    if listed(ROW, &a, &key).await?.len() != 1 {
        return Err(fail(ROW, "releasing the lease touched the registry"));
    }
    ok(
        ROW,
        "deregister",
        b.deregister_within(&key, cb.id(), ttl).await,
    )?;
    Ok(Outcome::Passed)
}

/// An entry lives at least its ttl from its last write by the store's
/// clock, a rewrite extends it, and one not written again is gone within
/// the ttl plus the store's expiry slack, from the list and as one entry.
pub async fn registry_entries_expire_by_the_store_clock<H: Harness>(h: &H) -> RowResult {
    const ROW: &str = "registry_entries_expire_by_the_store_clock";
    let (key, a, b) = two_clients(h, ROW, "registry-expiry").await?;
    if let Some(unsupported) = no_registry(&a) {
        return Ok(unsupported);
    }
    let ttl = h.ttl() * 2;
    let c = entry(1, b"short");
    let budget = h.ttl() * 10;
    ok(
        ROW,
        "register",
        a.register_within(&key, &c, ttl, budget).await,
    )?;
    tokio::time::sleep(ttl * 6 / 10).await;
    let written = Instant::now();
    ok(
        ROW,
        "register",
        a.register_within(&key, &c, ttl, budget).await,
    )?;
    // Past the first write's ttl, inside the second's.
    tokio::time::sleep(ttl / 2).await;
    if !listed(ROW, &b, &key).await?.contains_key(&c.id())
        || ok(ROW, "candidate", b.candidate(&key, c.id()).await)?.is_none()
    {
        return Err(fail(
            ROW,
            format!(
                "gone {:?} after a write with ttl {ttl:?}",
                written.elapsed()
            ),
        ));
    }
    let limit = ttl + h.expiry_slack() + Duration::from_secs(1);
    let step = (ttl / 20).max(Duration::from_millis(10));
    loop {
        if !listed(ROW, &b, &key).await?.contains_key(&c.id()) {
            let after = written.elapsed();
            // The reads above took time too: only a plain early expiry fails.
            if after + step < ttl {
                return Err(fail(ROW, format!("expired after {after:?}, ttl {ttl:?}")));
            }
            // Expired for the list: expired as one entry too.
            one_entry(ROW, &b, &key, c.id(), None).await?;
            return Ok(Outcome::Passed);
        }
        if written.elapsed() > limit {
            return Err(fail(
                ROW,
                format!("still listed {limit:?} after its last write"),
            ));
        }
        tokio::time::sleep(step).await;
    }
}

/// Sixteen candidates that register at once, each with its own client,
/// are all listed: the registry is a set of entries, not one value.
pub async fn registry_takes_many_candidates_at_once<H: Harness>(h: &H) -> RowResult {
    const ROW: &str = "registry_takes_many_candidates_at_once";
    let (key, a) = one_client(h, ROW, "registry-many").await?;
    if let Some(unsupported) = no_registry(&a) {
        return Ok(unsupported);
    }
    let ttl = h.ttl() * 20;
    let clients = join_all((0..16).map(|_| h.backend())).await;
    let entries: Vec<Candidate> = (0..16).map(|i| entry(i, b"many")).collect();
    let writes = join_all(
        clients
            .iter()
            .zip(&entries)
            .map(|(b, c)| b.register_within(&key, c, ttl, ttl)),
    )
    .await;
    for w in writes {
        ok(ROW, "register", w)?;
    }
    let seen = listed(ROW, &a, &key).await?;
    if seen.len() != 16 || entries.iter().any(|c| seen.get(&c.id()) != Some(c)) {
        return Err(fail(ROW, format!("{} of 16 listed as written", seen.len())));
    }
    for (b, c) in clients.iter().zip(&entries) {
        ok(
            ROW,
            "deregister",
            b.deregister_within(&key, c.id(), ttl).await,
        )?;
    }
    if !listed(ROW, &a, &key).await?.is_empty() {
        return Err(fail(ROW, "entries left after every candidate deregistered"));
    }
    Ok(Outcome::Passed)
}

/// `proclaim` replaces a live lease's metadata and renews it, keeping its
/// token: the holder shows the new metadata to every client, a renewal
/// after it keeps it, and the lease lives a full ttl from the proclaim.
/// Proclaiming a lease that is not ours, or gone, is `Lost` and changes
/// nothing.
pub async fn proclaim_replaces_the_metadata_and_renews<H: Harness>(h: &H) -> RowResult {
    const ROW: &str = "proclaim_replaces_the_metadata_and_renews";
    let (key, a, b) = two_clients(h, ROW, "proclaim").await?;
    if !a.supports_proclaim() {
        return Ok(Outcome::Unsupported("the backend cannot proclaim".into()));
    }
    let ttl = h.ttl() * 2;
    let c = claim();
    let lease = acquire_won(ROW, &a, &key, &c, ttl).await?;
    let new = Bytes::from_static(b"proclaimed metadata");
    let proclaimed = match ok(
        ROW,
        "proclaim",
        a.proclaim_within(&key, &lease, &new, ttl, ttl).await,
    )? {
        Renewed::Renewed(l) | Renewed::SentAt(l, _) => l,
        Renewed::Lost => return Err(fail(ROW, "proclaim of a live lease was Lost")),
    };
    if proclaimed.metadata() != &new
        || proclaimed.token() != lease.token()
        || proclaimed.nonce() != lease.nonce()
    {
        return Err(fail(ROW, format!("proclaim returned {proclaimed:?}")));
    }
    let seen = ok(ROW, "holder", b.holder(&key).await)?;
    match &seen {
        Some(s)
            if s.is_nonce(lease.nonce())
                && s.metadata() == &new
                && s.token() == Some(lease.token()) => {}
        other => {
            return Err(fail(
                ROW,
                format!("after proclaim another client sees {other:?}"),
            ));
        }
    }
    let renewed = match ok(ROW, "renew", a.renew(&key, &proclaimed, ttl).await)? {
        Renewed::Renewed(l) | Renewed::SentAt(l, _) => l,
        Renewed::Lost => return Err(fail(ROW, "renew after proclaim was Lost")),
    };
    let _ = renewed;
    let seen = ok(ROW, "holder", b.holder(&key).await)?;
    if seen.as_ref().is_none_or(|s| s.metadata() != &new) {
        return Err(fail(
            ROW,
            format!("a renewal after proclaim shows {seen:?}"),
        ));
    }
    // Someone else's proclaim of our lease changes nothing.
    let forged = Lease::new(&claim(), lease.token(), lease.revision());
    if ok(
        ROW,
        "proclaim",
        b.proclaim_within(&key, &forged, &Bytes::from_static(b"x"), ttl, ttl)
            .await,
    )? != Renewed::Lost
    {
        return Err(fail(ROW, "proclaim with another nonce was not Lost"));
    }
    ok(ROW, "release", a.release(&key, &proclaimed).await)?;
    if ok(
        ROW,
        "proclaim",
        a.proclaim_within(&key, &proclaimed, &new, ttl, ttl).await,
    )? != Renewed::Lost
    {
        return Err(fail(ROW, "proclaim of a released lease was not Lost"));
    }
    if ok(ROW, "holder", a.holder(&key).await)?.is_some() {
        return Err(fail(ROW, "proclaim brought a released lease back"));
    }
    Ok(Outcome::Passed)
}
