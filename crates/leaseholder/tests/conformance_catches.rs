//! Proof that the conformance suite can fail: a wrapper around the memory
//! backend that breaks one rule of the lease contract at a time, and the
//! rows that must catch each break.
#![cfg(feature = "conformance")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use futures_util::StreamExt;
use leaseholder::conformance::{self, Failure, Harness, Outcome};
use leaseholder::{
    Acquired, Backend, BackendEdge, BackendError, BoxError, Candidate, Claim, FencingToken, Holder,
    Key, LeaderId, Lease, LeaseValue, MemoryBackend, MemoryStore, Renewal, Renewed, WatchEvent,
    WatchStream,
};

/// One deliberate violation of the lease contract.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Flaw {
    /// No violation: the control.
    None,
    /// `setup` fails when the store was already set up ("table exists").
    SetupNotIdempotent,
    /// `release` deletes whatever is stored, not only our lease.
    ReleaseDeletesAnything,
    /// Every lease gets token 1: tokens restart instead of increasing.
    TokensReset,
    /// `renew` of a lease that is gone creates it again.
    RenewResurrects,
    /// `renew` says `Renewed` whatever lease is there.
    RenewIgnoresNonce,
    /// `holder` hides who holds the lease (always foreign).
    HolderHidesNonce,
    /// `acquire` treats a value it cannot decode as free.
    ForeignIsFree,
    /// `acquire` deletes the current lease first: everyone wins.
    EveryoneWins,
    /// Leases never expire (they are written for a thousand ttls).
    NeverExpires,
    /// Leases expire after half their ttl.
    ExpiresEarly,
    /// The watch drops `Released` events but claims to report expiry.
    WatchDropsReleased,
    /// `proclaim` renews but does not store the metadata (it only says so).
    ProclaimStoresNothing,
    /// Registry entries never expire.
    RegistryNeverExpires,
    /// A registry write replaces every entry of the key (one value, not a
    /// set of entries).
    RegistryKeepsOne,
    /// `candidate` answers with whichever entry of the key comes first.
    CandidateReadsAnyEntry,
    /// `holder` reports a revision that moves on every read (as one made of
    /// the time of the read would), though nothing was written.
    RevisionOfTheRead,
    /// `renew_many` answers in the reverse order.
    ManyReversed,
    /// `renew_many` leaves the last renewal unanswered.
    ManyShort,
}

/// The memory backend with one [`Flaw`].
struct Broken {
    inner: MemoryBackend,
    flaw: Flaw,
    reads: std::sync::atomic::AtomicU64,
}

impl BackendEdge for Broken {
    fn name(&self) -> &'static str {
        "broken-memory"
    }

    async fn setup(&self, budget: Duration) -> Result<leaseholder::Prepared, BackendError> {
        if self.flaw == Flaw::SetupNotIdempotent && self.inner.store().setups() > 0 {
            return Err(BackendError::fatal("the lease table already exists"));
        }
        self.inner.setup(budget).await
    }

    async fn acquire(
        &self,
        key: &Key,
        claim: &Claim,
        ttl: Duration,
        budget: Duration,
    ) -> Result<Acquired, BackendError> {
        let free_it = match self.flaw {
            Flaw::EveryoneWins => true,
            Flaw::ForeignIsFree => self
                .inner
                .holder(key, budget)
                .await?
                .is_some_and(|h| h.is_foreign()),
            _ => false,
        };
        if free_it {
            self.inner.store().force_delete(key);
        }
        let ttl = match self.flaw {
            Flaw::NeverExpires => ttl * 1000,
            Flaw::ExpiresEarly => ttl / 2,
            _ => ttl,
        };
        let acquired = self.inner.acquire(key, claim, ttl, budget).await?;
        Ok(match (self.flaw, acquired) {
            (Flaw::TokensReset, Acquired::Won(lease)) => {
                Acquired::Won(Lease::new(claim, FencingToken::new(1), lease.revision()))
            }
            (Flaw::TokensReset, Acquired::Held(h)) => Acquired::Held(token_one(h)),
            (_, acquired) => acquired,
        })
    }

    fn batches_renewals(&self) -> bool {
        matches!(self.flaw, Flaw::ManyReversed | Flaw::ManyShort)
    }

    async fn renew_many(&self, renewals: &[Renewal]) -> Vec<Result<Renewed, BackendError>> {
        let mut out = Vec::new();
        for r in renewals {
            out.push(self.renew(&r.key, &r.lease, r.ttl, r.budget).await);
        }
        match self.flaw {
            Flaw::ManyReversed => out.reverse(),
            Flaw::ManyShort => {
                out.pop();
            }
            _ => {}
        }
        out
    }

    async fn renew(
        &self,
        key: &Key,
        lease: &Lease,
        ttl: Duration,
        budget: Duration,
    ) -> Result<Renewed, BackendError> {
        let ttl = match self.flaw {
            Flaw::NeverExpires => ttl * 1000,
            Flaw::ExpiresEarly => ttl / 2,
            _ => ttl,
        };
        let renewed = self.inner.renew(key, lease, ttl, budget).await?;
        match (self.flaw, renewed) {
            (Flaw::RenewResurrects, Renewed::Lost)
                if self.inner.holder(key, budget).await?.is_none() =>
            {
                let claim = Claim {
                    nonce: lease.nonce(),
                    id: lease.id(),
                    metadata: lease.metadata().clone(),
                    at: lease.acquired_at(),
                };
                match self.inner.acquire(key, &claim, ttl, budget).await? {
                    Acquired::Won(l) => Ok(Renewed::Renewed(l)),
                    Acquired::Held(_) => Ok(Renewed::Lost),
                }
            }
            (Flaw::RenewIgnoresNonce, Renewed::Lost)
                if self.inner.holder(key, budget).await?.is_some() =>
            {
                Ok(Renewed::Renewed(lease.clone()))
            }
            (_, renewed) => Ok(renewed),
        }
    }

    async fn release(
        &self,
        key: &Key,
        lease: &Lease,
        budget: Duration,
    ) -> Result<(), BackendError> {
        if self.flaw == Flaw::ReleaseDeletesAnything {
            self.inner.store().force_delete(key);
            return Ok(());
        }
        self.inner.release(key, lease, budget).await
    }

    async fn holder(&self, key: &Key, budget: Duration) -> Result<Option<Holder>, BackendError> {
        let holder = self.inner.holder(key, budget).await?;
        Ok(match self.flaw {
            Flaw::HolderHidesNonce => holder.map(|h| Holder::foreign(h.revision(), h.expires_in())),
            Flaw::TokensReset => holder.map(token_one),
            Flaw::RevisionOfTheRead => {
                let reads = self
                    .reads
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                holder.map(|h| {
                    let revision = h.revision() + 1 + reads;
                    rebuilt(h, None, revision)
                })
            }
            _ => holder,
        })
    }

    async fn keys(&self, budget: Duration) -> Result<Vec<Key>, BackendError> {
        self.inner.keys(budget).await
    }

    async fn watch(&self) -> Result<Option<WatchStream>, BackendError> {
        let stream = self.inner.watch().await?;
        if self.flaw != Flaw::WatchDropsReleased {
            return Ok(stream);
        }
        Ok(stream.map(|s| -> WatchStream {
            Box::pin(s.filter(|e| std::future::ready(!matches!(e, WatchEvent::Released(_)))))
        }))
    }

    fn watch_reports_expiry(&self) -> bool {
        self.inner.watch_reports_expiry()
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
        metadata: &bytes::Bytes,
        ttl: Duration,
        budget: Duration,
    ) -> Result<Renewed, BackendError> {
        if self.flaw == Flaw::ProclaimStoresNothing {
            return Ok(match self.inner.renew(key, lease, ttl, budget).await? {
                Renewed::Renewed(l) => Renewed::Renewed(l.with_metadata(metadata.clone())),
                other => other,
            });
        }
        self.inner.proclaim(key, lease, metadata, ttl, budget).await
    }

    async fn register(
        &self,
        key: &Key,
        candidate: &Candidate,
        ttl: Duration,
        budget: Duration,
    ) -> Result<(), BackendError> {
        if self.flaw == Flaw::RegistryKeepsOne {
            for other in self.inner.candidates(key, budget).await? {
                self.inner.deregister(key, other.id(), budget).await?;
            }
        }
        let ttl = match self.flaw {
            Flaw::RegistryNeverExpires => ttl * 1000,
            _ => ttl,
        };
        self.inner.register(key, candidate, ttl, budget).await
    }

    async fn deregister(
        &self,
        key: &Key,
        id: LeaderId,
        budget: Duration,
    ) -> Result<(), BackendError> {
        self.inner.deregister(key, id, budget).await
    }

    async fn candidates(
        &self,
        key: &Key,
        budget: Duration,
    ) -> Result<Vec<Candidate>, BackendError> {
        self.inner.candidates(key, budget).await
    }

    async fn candidate(
        &self,
        key: &Key,
        id: LeaderId,
        budget: Duration,
    ) -> Result<Option<Candidate>, BackendError> {
        if self.flaw == Flaw::CandidateReadsAnyEntry {
            return Ok(self.inner.candidates(key, budget).await?.into_iter().next());
        }
        self.inner.candidate(key, id, budget).await
    }
}

/// The holder as a store whose tokens restart would show it: token 1.
fn token_one(h: Holder) -> Holder {
    let revision = h.revision();
    rebuilt(h, Some(FencingToken::new(1)), revision)
}

/// `h` with another token (if `token` is given) and another revision.
fn rebuilt(h: Holder, token: Option<FencingToken>, revision: u64) -> Holder {
    match (h.nonce(), h.id(), h.since()) {
        (Some(nonce), Some(id), Some(acquired_at)) => {
            let token = token.or(h.token());
            let value = LeaseValue {
                nonce,
                id,
                token,
                acquired_at,
                metadata: h.metadata().clone(),
            };
            Holder::from_value(&value, token, revision, h.expires_in())
        }
        _ => Holder::foreign(revision, h.expires_in()),
    }
}

struct BrokenHarness {
    store: MemoryStore,
    flaw: Flaw,
}

impl BrokenHarness {
    fn new(flaw: Flaw) -> Self {
        BrokenHarness {
            store: MemoryStore::new(),
            flaw,
        }
    }
}

impl Harness for BrokenHarness {
    async fn backend(&self) -> Backend {
        Backend::new(Broken {
            inner: self.store.backend(),
            flaw: self.flaw,
            reads: std::sync::atomic::AtomicU64::new(0),
        })
    }

    async fn put_foreign(&self, key: &Key, value: &[u8], ttl: Duration) -> Result<(), BoxError> {
        self.store.put_raw(key, value.to_vec(), ttl);
        Ok(())
    }

    fn ttl(&self) -> Duration {
        Duration::from_secs(1)
    }

    fn expiry_slack(&self) -> Duration {
        Duration::from_millis(100)
    }
}

type RowResult = Result<Outcome, Failure>;

/// Asserts that a row failed, and that it named itself.
fn assert_caught(flaw: Flaw, row: &'static str, result: RowResult) {
    match result {
        Err(failure) => {
            assert_eq!(failure.row, row, "{flaw:?}: failure names another row");
            println!("{flaw:?} caught by {failure}");
        }
        Ok(outcome) => panic!("{flaw:?}: row {row} did not catch it ({outcome:?})"),
    }
}

/// Runs the whole suite on a fresh store with `flaw` and asserts that
/// every row in `rows` is among the failures.
async fn assert_run_catches(flaw: Flaw, rows: &[&'static str]) {
    let report = conformance::run(&BrokenHarness::new(flaw)).await;
    println!("{flaw:?}: {report}");
    assert!(!report.is_ok(), "{flaw:?}: the suite passed\n{report}");
    for row in rows {
        assert!(
            report.failed.iter().any(|f| f.row == *row),
            "{flaw:?}: run() did not report {row} as failed\n{report}"
        );
        assert!(
            !report.passed.contains(row),
            "{flaw:?}: {row} also reported as passed\n{report}"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn the_wrapper_without_a_flaw_passes() {
    // The control: the wrapper itself breaks nothing, so each failure below
    // comes from its flaw.
    let report = conformance::run(&BrokenHarness::new(Flaw::None)).await;
    assert!(report.is_ok(), "{report}");
    // Only the multi-process row may be unsupported: this harness starts
    // no child processes (the single-node real-server suites do).
    assert!(
        report
            .unsupported
            .iter()
            .all(|(row, _)| row.contains("process")),
        "{report}"
    );
    assert_eq!(report.passed.len(), 21, "{report}");
}

#[tokio::test(start_paused = true)]
async fn setup_that_is_not_idempotent() {
    let flaw = Flaw::SetupNotIdempotent;
    let h = BrokenHarness::new(flaw);
    assert_caught(
        flaw,
        "setup_is_idempotent",
        conformance::setup_is_idempotent(&h).await,
    );
    assert_run_catches(flaw, &["setup_is_idempotent"]).await;
}

#[tokio::test(start_paused = true)]
async fn release_that_deletes_anything() {
    let flaw = Flaw::ReleaseDeletesAnything;
    let h = BrokenHarness::new(flaw);
    assert_caught(
        flaw,
        "release_is_compare_and_delete",
        conformance::release_is_compare_and_delete(&h).await,
    );
    assert_caught(
        flaw,
        "same_candidate_id_never_shares",
        conformance::same_candidate_id_never_shares(&h).await,
    );
    assert_caught(
        flaw,
        "foreign_values_are_held",
        conformance::foreign_values_are_held(&h).await,
    );
    assert_run_catches(
        flaw,
        &[
            "release_is_compare_and_delete",
            "same_candidate_id_never_shares",
            "foreign_values_are_held",
        ],
    )
    .await;
}

#[tokio::test(start_paused = true)]
async fn tokens_that_reset() {
    let flaw = Flaw::TokensReset;
    let h = BrokenHarness::new(flaw);
    assert_caught(
        flaw,
        "tokens_increase_across_terms",
        conformance::tokens_increase_across_terms(&h).await,
    );
    assert_run_catches(flaw, &["tokens_increase_across_terms"]).await;
}

#[tokio::test(start_paused = true)]
async fn renew_that_resurrects_a_released_lease() {
    let flaw = Flaw::RenewResurrects;
    let h = BrokenHarness::new(flaw);
    assert_caught(
        flaw,
        "renew_of_a_lost_lease_is_lost",
        conformance::renew_of_a_lost_lease_is_lost(&h).await,
    );
    assert_run_catches(flaw, &["renew_of_a_lost_lease_is_lost"]).await;
}

#[tokio::test(start_paused = true)]
async fn renew_that_ignores_the_nonce() {
    let flaw = Flaw::RenewIgnoresNonce;
    let h = BrokenHarness::new(flaw);
    assert_caught(
        flaw,
        "same_candidate_id_never_shares",
        conformance::same_candidate_id_never_shares(&h).await,
    );
    assert_caught(
        flaw,
        "renew_of_a_lost_lease_is_lost",
        conformance::renew_of_a_lost_lease_is_lost(&h).await,
    );
    assert_caught(
        flaw,
        "foreign_values_are_held",
        conformance::foreign_values_are_held(&h).await,
    );
    assert_run_catches(
        flaw,
        &[
            "same_candidate_id_never_shares",
            "renew_of_a_lost_lease_is_lost",
            "foreign_values_are_held",
        ],
    )
    .await;
}

#[tokio::test(start_paused = true)]
async fn holder_that_hides_the_nonce() {
    let flaw = Flaw::HolderHidesNonce;
    let h = BrokenHarness::new(flaw);
    assert_caught(
        flaw,
        "lost_reply_recognized_on_read_back",
        conformance::lost_reply_recognized_on_read_back(&h).await,
    );
    assert_caught(
        flaw,
        "renew_extends_the_lease",
        conformance::renew_extends_the_lease(&h).await,
    );
    assert_run_catches(
        flaw,
        &[
            "lost_reply_recognized_on_read_back",
            "renew_extends_the_lease",
        ],
    )
    .await;
}

#[tokio::test(start_paused = true)]
async fn foreign_value_treated_as_free() {
    let flaw = Flaw::ForeignIsFree;
    let h = BrokenHarness::new(flaw);
    assert_caught(
        flaw,
        "foreign_values_are_held",
        conformance::foreign_values_are_held(&h).await,
    );
    assert_run_catches(flaw, &["foreign_values_are_held"]).await;
}

#[tokio::test(start_paused = true)]
async fn acquire_that_lets_everyone_win() {
    let flaw = Flaw::EveryoneWins;
    let h = BrokenHarness::new(flaw);
    assert_caught(
        flaw,
        "one_winner_among_racers",
        conformance::one_winner_among_racers(&h).await,
    );
    assert_caught(
        flaw,
        "same_candidate_id_never_shares",
        conformance::same_candidate_id_never_shares(&h).await,
    );
    assert_run_catches(
        flaw,
        &["one_winner_among_racers", "same_candidate_id_never_shares"],
    )
    .await;
}

#[tokio::test(start_paused = true)]
async fn leases_that_never_expire() {
    let flaw = Flaw::NeverExpires;
    let h = BrokenHarness::new(flaw);
    assert_caught(
        flaw,
        "expiry_by_the_store_clock",
        conformance::expiry_by_the_store_clock(&h).await,
    );
    assert_caught(
        flaw,
        "reacquired_lease_expires_too",
        conformance::reacquired_lease_expires_too(&h).await,
    );
    assert_run_catches(
        flaw,
        &["expiry_by_the_store_clock", "reacquired_lease_expires_too"],
    )
    .await;
}

#[tokio::test(start_paused = true)]
async fn leases_that_expire_early() {
    let flaw = Flaw::ExpiresEarly;
    let h = BrokenHarness::new(flaw);
    assert_caught(
        flaw,
        "expiry_by_the_store_clock",
        conformance::expiry_by_the_store_clock(&h).await,
    );
    assert_run_catches(flaw, &["expiry_by_the_store_clock"]).await;
}

#[tokio::test(start_paused = true)]
async fn watch_that_drops_releases() {
    let flaw = Flaw::WatchDropsReleased;
    let h = BrokenHarness::new(flaw);
    assert_caught(
        flaw,
        "watch_fires_on_release_and_expiry",
        conformance::watch_fires_on_release_and_expiry(&h).await,
    );
    assert_run_catches(flaw, &["watch_fires_on_release_and_expiry"]).await;
}

#[tokio::test(start_paused = true)]
async fn registry_entries_that_never_expire() {
    let flaw = Flaw::RegistryNeverExpires;
    let h = BrokenHarness::new(flaw);
    assert_caught(
        flaw,
        "registry_entries_expire_by_the_store_clock",
        conformance::registry_entries_expire_by_the_store_clock(&h).await,
    );
    assert_run_catches(flaw, &["registry_entries_expire_by_the_store_clock"]).await;
}

#[tokio::test(start_paused = true)]
async fn a_registry_that_keeps_one_entry() {
    let flaw = Flaw::RegistryKeepsOne;
    let h = BrokenHarness::new(flaw);
    assert_caught(
        flaw,
        "registry_takes_many_candidates_at_once",
        conformance::registry_takes_many_candidates_at_once(&h).await,
    );
    assert_run_catches(
        flaw,
        &[
            "registry_lists_replaces_and_removes_entries",
            "registry_takes_many_candidates_at_once",
        ],
    )
    .await;
}

#[tokio::test(start_paused = true)]
async fn a_registry_that_reads_any_entry_for_an_id() {
    let flaw = Flaw::CandidateReadsAnyEntry;
    let h = BrokenHarness::new(flaw);
    assert_caught(
        flaw,
        "registry_lists_replaces_and_removes_entries",
        conformance::registry_lists_replaces_and_removes_entries(&h).await,
    );
    assert_run_catches(flaw, &["registry_lists_replaces_and_removes_entries"]).await;
}

#[tokio::test(start_paused = true)]
async fn a_proclaim_that_stores_nothing() {
    let flaw = Flaw::ProclaimStoresNothing;
    let h = BrokenHarness::new(flaw);
    assert_caught(
        flaw,
        "proclaim_replaces_the_metadata_and_renews",
        conformance::proclaim_replaces_the_metadata_and_renews(&h).await,
    );
    assert_run_catches(flaw, &["proclaim_replaces_the_metadata_and_renews"]).await;
}

#[tokio::test(start_paused = true)]
async fn a_revision_that_moves_on_every_read() {
    let flaw = Flaw::RevisionOfTheRead;
    let h = BrokenHarness::new(flaw);
    assert_caught(
        flaw,
        "revision_changes_only_with_a_write",
        conformance::revision_changes_only_with_a_write(&h).await,
    );
    assert_run_catches(flaw, &["revision_changes_only_with_a_write"]).await;
}

#[tokio::test(start_paused = true)]
async fn renew_many_that_answers_out_of_order() {
    let flaw = Flaw::ManyReversed;
    let h = BrokenHarness::new(flaw);
    assert_caught(
        flaw,
        "renew_many_answers_each_renewal_alone",
        conformance::renew_many_answers_each_renewal_alone(&h).await,
    );
    assert_run_catches(flaw, &["renew_many_answers_each_renewal_alone"]).await;
}

#[tokio::test(start_paused = true)]
async fn renew_many_that_leaves_a_renewal_unanswered() {
    let flaw = Flaw::ManyShort;
    let h = BrokenHarness::new(flaw);
    assert_caught(
        flaw,
        "renew_many_answers_each_renewal_alone",
        conformance::renew_many_answers_each_renewal_alone(&h).await,
    );
    assert_run_catches(flaw, &["renew_many_answers_each_renewal_alone"]).await;
}
