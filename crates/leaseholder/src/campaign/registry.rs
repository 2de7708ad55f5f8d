//! The candidate registry's side of a campaign: this candidate's entry,
//! written once per renew interval; the leader's reads of the registry,
//! which decide a preemption; and nominations ([`Leader::resign_to`] and
//! preemptions), written before the term is given up.
//!
//! None of it can make anyone lead: the driver runs these calls beside the
//! machine's own, and hands the machine only [`Input::Preempt`] (a resign
//! with its own cause) or [`Input::Stop`]`(Resign)`, both of which end a
//! term the ordinary way. A registry that fails, hangs or lies costs a
//! preemption that does not happen, or a hold-off, never safety.
//!
//! [`Leader::resign_to`]: crate::Leader::resign_to

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use tokio::sync::oneshot;
use tokio::time::Instant;

use super::core::{Input, Ranking, StopKind, later};
use crate::backend::{Backend, Candidate, FencingToken, Key, LeaderId};
use crate::config::Candidacy;
use crate::error::BackendError;

/// A follower's registry read ([`Output::ReadCandidates`]): the last
/// holder's entry, if a holder is known, and the whole registry only if
/// that entry names nobody to go next after that holder's term. With a
/// leader that names its successor, a handoff costs each follower one read
/// of one entry, however many wait.
///
/// [`Output::ReadCandidates`]: super::core::Output::ReadCandidates
pub(crate) async fn rank(
    backend: &Backend,
    key: &Key,
    last: Option<(LeaderId, FencingToken)>,
    budget: Duration,
) -> Result<Ranking, BackendError> {
    if let Some((holder, token)) = last {
        let entry = backend.candidate_within(key, holder, budget).await?;
        if let Some(who) = crate::backend::named(entry.as_ref(), token) {
            return Ok(Ranking::Named(who));
        }
    }
    Ok(Ranking::Listed(
        backend.candidates_within(key, budget).await?,
    ))
}

/// What a `resign_to` learns.
#[derive(Debug)]
pub(crate) enum Handover {
    /// Not leading: nothing to hand over.
    NotLeading,
    /// The nomination is written and the term is being given up.
    Handing,
    /// The named candidate is not live in the registry (or is this one).
    NotACandidate,
    /// The registry could not be read or written.
    Store(crate::error::Op, BackendError),
}

/// A `resign_to` waiting for its answer.
pub(crate) struct Ask {
    pub(crate) to: LeaderId,
    pub(crate) reply: oneshot::Sender<Handover>,
}

pub(crate) enum Done {
    Written(Result<(), BackendError>),
    Listed(Option<Ask>, Result<Vec<Candidate>, BackendError>),
    Nominated(Nomination, Result<(), BackendError>),
}

pub(crate) struct Nomination {
    to: LeaderId,
    token: FencingToken,
    /// `None` for a preemption, else the `resign_to` to answer.
    ask: Option<Ask>,
}

type Call = Pin<Box<dyn Future<Output = Done> + Send + 'static>>;

/// The registry driver of one campaign.
pub(crate) struct Registry {
    backend: Backend,
    key: Key,
    entry: Candidate,
    cfg: Candidacy,
    ttl: Duration,
    interval: Duration,
    write_at: Instant,
    /// While leading: when to read the registry next.
    read_at: Option<Instant>,
    /// The current term: its token and when it began.
    leading: Option<(FencingToken, Instant)>,
    call: Option<Call>,
    asks: Vec<Ask>,
    failures: u32,
    rng: u64,
    /// The term named its successor by a `resign_to` or a preemption: the
    /// periodic reads no longer change the name.
    handing: bool,
    /// Whether the entry is written yet. A candidate registers once it
    /// could take the lease at once: its campaign has set up the store
    /// and its backend's watch is up (it hears of a release at once); or
    /// when it leads; or, set up, a renew interval after it started,
    /// whichever comes first. A leader hands over to a preferred
    /// candidate the moment it appears, so an entry written earlier would
    /// make the key wait for the candidate's setup (tens of ms on
    /// PostgreSQL) or its watch, and one whose setup fails (a
    /// misconfigured candidate) would preempt a healthy leader for
    /// nothing.
    armed: bool,
    /// Whether the campaign has set up the store.
    ready: bool,
    arm_by: Instant,
}

impl Registry {
    pub(crate) fn new(
        backend: Backend,
        key: Key,
        entry: Candidate,
        cfg: Candidacy,
        ttl: Duration,
        interval: Duration,
        seed: u64,
    ) -> Registry {
        Registry {
            backend,
            key,
            entry,
            cfg,
            ttl,
            interval,
            write_at: Instant::now(),
            read_at: None,
            leading: None,
            call: None,
            asks: Vec::new(),
            failures: 0,
            rng: seed | 1,
            handing: false,
            armed: false,
            ready: false,
            arm_by: later(Instant::now(), interval),
        }
    }

    fn jittered(&mut self, d: Duration) -> Duration {
        let mut x = self.rng;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.rng = x;
        let unit = (x >> 11) as f64 / (1u64 << 53) as f64;
        d.mul_f64(1.0 - 0.1 * unit)
    }

    /// Whether the entry is written yet (see [`arm`](Self::arm)).
    pub(crate) fn is_armed(&self) -> bool {
        self.armed
    }

    /// The campaign has set up the store: from now the entry may be
    /// written (at the latest by `arm_by`).
    pub(crate) fn ready(&mut self) {
        self.ready = true;
    }

    /// The campaign could now take the lease at once: register.
    pub(crate) fn arm(&mut self, now: Instant) {
        if !self.armed {
            self.armed = true;
            self.write_at = now;
        }
    }

    /// The candidate's metadata changed (a proclaim): later writes carry it.
    pub(crate) fn set_metadata(&mut self, metadata: bytes::Bytes) {
        let e = &self.entry;
        self.entry = Candidate::new(e.id(), e.priority(), metadata)
            .with_since(e.since())
            .with_nominee(e.nominee());
        self.write_at = Instant::now();
    }

    /// A term began: the registry is read at once, and the entry names
    /// this term's successor as soon as it is known.
    pub(crate) fn began(&mut self, token: FencingToken, now: Instant) {
        self.leading = Some((token, now));
        self.handing = false;
        self.arm(now);
        // A nomination of an earlier term names that term's token, so it
        // counts for nothing now; the first read replaces it.
        self.read_at = Some(now);
    }

    /// The term ended (its token was cancelled). The entry keeps naming
    /// the successor: followers read it when the key becomes free, and it
    /// names this term's token, so it counts for nothing after it.
    pub(crate) fn ended(&mut self) {
        self.leading = None;
        self.read_at = None;
        for ask in self.asks.drain(..) {
            let _ = ask.reply.send(Handover::NotLeading);
        }
    }

    /// The registry of the key changed: a leader looks at once.
    pub(crate) fn changed(&mut self, now: Instant) {
        if self.leading.is_some() && !self.handing {
            self.read_at = Some(now);
        }
    }

    /// A `resign_to`.
    pub(crate) fn ask(&mut self, ask: Ask) {
        if self.leading.is_none() {
            let _ = ask.reply.send(Handover::NotLeading);
            return;
        }
        self.asks.push(ask);
    }

    /// When something is due, if no call is in flight.
    pub(crate) fn wake(&self) -> Option<Instant> {
        if self.call.is_some() {
            return None;
        }
        if !self.asks.is_empty() {
            return Some(Instant::now());
        }
        if !self.armed {
            return self.ready.then_some(self.arm_by);
        }
        Some(match self.read_at {
            Some(r) => r.min(self.write_at),
            None => self.write_at,
        })
    }

    /// Starts what is due at `now`.
    pub(crate) fn start(&mut self, now: Instant) {
        if self.call.is_some() {
            return;
        }
        let budget = self.interval;
        if let Some(ask) = self.asks.pop() {
            return self.list(Some(ask), budget);
        }
        if !self.armed {
            if !self.ready || now < self.arm_by {
                return;
            }
            self.arm(now);
        }
        if self.write_at <= now {
            let (backend, key, entry, ttl) = (
                self.backend.clone(),
                self.key.clone(),
                self.entry.clone(),
                self.ttl,
            );
            self.call = Some(Box::pin(async move {
                Done::Written(
                    super::bounded(budget, backend.register_within(&key, &entry, ttl, budget))
                        .await,
                )
            }));
            return;
        }
        if self.read_at.is_some_and(|at| at <= now) {
            self.read_at = None;
            self.list(None, budget);
        }
    }

    fn list(&mut self, ask: Option<Ask>, budget: Duration) {
        let (backend, key) = (self.backend.clone(), self.key.clone());
        self.call = Some(Box::pin(async move {
            let result = super::bounded(budget, backend.candidates_within(&key, budget)).await;
            Done::Listed(ask, result)
        }));
    }

    fn nominate(&mut self, nomination: Nomination) {
        let entry = self
            .entry
            .clone()
            .with_nominee(Some((nomination.to, nomination.token)));
        let (backend, key, ttl, budget) = (
            self.backend.clone(),
            self.key.clone(),
            self.ttl,
            self.interval,
        );
        self.call = Some(Box::pin(async move {
            let result =
                super::bounded(budget, backend.register_within(&key, &entry, ttl, budget)).await;
            Done::Nominated(nomination, result)
        }));
    }

    /// Waits for the call in flight.
    pub(crate) async fn next(&mut self) -> Done {
        match &mut self.call {
            Some(call) => call.await,
            None => std::future::pending().await,
        }
    }

    /// A call ended: what the machine must hear, if anything.
    pub(crate) fn done(&mut self, now: Instant, done: Done) -> Option<Input> {
        self.call = None;
        match done {
            Done::Written(result) => {
                let wait = match result {
                    Ok(()) => {
                        self.failures = 0;
                        if self.leading.is_some() && !self.handing {
                            self.read_at = Some(now);
                        }
                        self.jittered(self.interval)
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, "could not write the registry entry");
                        self.failures = self.failures.saturating_add(1);
                        (Duration::from_millis(50) * (1 << self.failures.min(6))).min(self.interval)
                    }
                };
                self.write_at = later(now, wait);
                None
            }
            Done::Listed(None, result) => {
                let (token, since) = self.leading?;
                let next = later(now, self.jittered(self.interval));
                let list = match result {
                    Ok(list) => list,
                    Err(e) => {
                        tracing::debug!(error = %e, "could not read the registry");
                        self.read_at = Some(next);
                        return None;
                    }
                };
                if self.handing {
                    return None;
                }
                let me = self.entry.id();
                let others = || list.iter().filter(|c| c.id() != me);
                // The successor: whom the followers let go first when this
                // term ends, by resign or crash. Named in the entry, it
                // spares each of them a read of the whole registry.
                let successor = crate::backend::best(others()).map(|c| (c.id(), token));
                if self.entry.nominee() != successor {
                    self.entry = self.entry.clone().with_nominee(successor);
                    self.write_at = now;
                }
                let better =
                    crate::backend::best(others().filter(|c| c.priority() > self.cfg.priority));
                match better {
                    Some(c) if self.cfg.preemptible => {
                        let not_before = later(since, self.cfg.min_term);
                        if now < not_before {
                            self.read_at = Some(not_before);
                        } else {
                            tracing::info!(
                                preferred = %c.id(),
                                priority = c.priority(),
                                "a candidate of higher priority is live; handing over"
                            );
                            self.nominate(Nomination {
                                to: c.id(),
                                token,
                                ask: None,
                            });
                        }
                    }
                    _ => self.read_at = Some(next),
                }
                None
            }
            Done::Listed(Some(ask), result) => {
                let Some((token, _)) = self.leading else {
                    let _ = ask.reply.send(Handover::NotLeading);
                    return None;
                };
                match result {
                    Ok(list)
                        if ask.to != self.entry.id() && list.iter().any(|c| c.id() == ask.to) =>
                    {
                        self.nominate(Nomination {
                            to: ask.to,
                            token,
                            ask: Some(ask),
                        });
                    }
                    Ok(_) => {
                        let _ = ask.reply.send(Handover::NotACandidate);
                    }
                    Err(e) => {
                        let _ = ask
                            .reply
                            .send(Handover::Store(crate::error::Op::Candidates, e));
                    }
                }
                None
            }
            Done::Nominated(nomination, result) => {
                let still = self.leading.is_some_and(|(t, _)| t == nomination.token);
                match (result, nomination.ask) {
                    (Ok(()), ask) if still => {
                        // Later writes keep the nomination: it names its
                        // term, so it counts for nothing after it.
                        self.handing = true;
                        self.read_at = None;
                        // The nomination renewed the entry.
                        self.write_at = later(now, self.jittered(self.interval));
                        self.entry = self
                            .entry
                            .clone()
                            .with_nominee(Some((nomination.to, nomination.token)));
                        match ask {
                            Some(ask) => {
                                let _ = ask.reply.send(Handover::Handing);
                                Some(Input::Stop(StopKind::Resign))
                            }
                            None => Some(Input::Preempt),
                        }
                    }
                    (Ok(()), Some(ask)) => {
                        let _ = ask.reply.send(Handover::NotLeading);
                        None
                    }
                    (Ok(()), None) => None,
                    (Err(e), ask) => {
                        tracing::debug!(error = %e, "could not write the nomination");
                        if let Some(ask) = ask {
                            let _ = ask
                                .reply
                                .send(Handover::Store(crate::error::Op::Register, e));
                        }
                        if still {
                            self.read_at = Some(later(now, self.jittered(self.interval)));
                        }
                        None
                    }
                }
            }
        }
    }

    /// Removes the entry (the campaign stops); bounded by one interval.
    pub(crate) async fn deregister(self) {
        let budget = self.interval;
        let id = self.entry.id();
        if let Err(e) = super::bounded(
            budget,
            self.backend.deregister_within(&self.key, id, budget),
        )
        .await
        {
            tracing::debug!(error = %e, "could not remove the registry entry; it expires");
        }
    }
}
