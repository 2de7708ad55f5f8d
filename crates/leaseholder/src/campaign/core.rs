//! The election state machine, free of I/O: events in, actions out.
//!
//! ```text
//!            Start
//!   Idle ───────────► SettingUp ──ok──► Follower ◄─────────────────────────┐
//!                                        │  ▲  wake: watch Released/Resync, │
//!                                acquire │  │  expiry hint + jitter, retry  │
//!                                        ▼  │ held / not ours               │
//!                                     Acquiring ──(ambiguous: read back)    │
//!                                        │ won, reply before its deadline   │
//!                                        ▼                                  │
//!                                     Leading ── renew every interval       │
//!                                        │  deadline passed, Lost, stop,    │
//!                                        │  or the work returned            │
//!                                        ▼                                  │
//!                                     Ending: token cancelled; wait for the │
//!                                     work, release (CAS), then ────────────┘
//!                                                          or ──► Stopped
//! ```
//!
//! Invariants (checked by the model checker and scenario tests in
//! `campaign/model.rs`, and by the proptest in `tests/safety_proptest.rs`):
//!
//! 1. At most one store call is in flight ([`Core::op`]).
//! 2. A term begins only if the acquire reply (or its read-back) arrived
//!    before `sent_at + ttl - drift`, where `sent_at` is when the acquire was
//!    sent; the store cannot expire the lease before `sent_at + ttl`.
//! 3. A term's deadline is `sent_at + ttl - drift` of a request known to
//!    have extended the lease: a renewal whose reply came back, or, when a
//!    read-back shows that an unanswered renewal landed, the earliest
//!    renewal of the term whose outcome was ambiguous. It only moves
//!    forward.
//! 4. A term is cancelled at its deadline at the latest, and a cancelled
//!    term is never revived: it is released (compare-and-delete) after its
//!    work has returned, and the next term needs a new acquisition.
//! 5. While the work of a term runs, no new term begins.
//! 6. Work still running when its term ends is dropped before the store can
//!    let anyone else in: at once when the lease is known gone, by
//!    `deadline + drift/2` otherwise, even in the middle of a drain.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use crate::backend::{
    Acquired, Candidate, FencingToken, Holder, LeaderId, Lease, Nonce, Renewed, WatchEvent,
};
use crate::config::Timing;
use crate::error::{BackendError, Op};
use crate::state::{State, Waiting};

/// Why a term ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum EndReason {
    /// The local deadline passed without a confirmed renewal.
    Deadline,
    /// The store says the lease is no longer ours.
    Lost,
    /// The work returned while we led.
    WorkDone,
    /// `resign()` or `resign_to()`.
    Resign,
    /// A live candidate of higher priority asked for the key.
    Preempted,
    /// `shutdown()`, or the run was abandoned.
    Shutdown,
    /// A fatal store error.
    Fatal,
}

/// How the campaign was asked to stop.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum StopKind {
    /// Step down from the current term, then keep campaigning.
    Resign,
    /// Drain, release, stop.
    Shutdown,
    /// Drop the work at once, release, stop (the runner went away).
    Abandon,
}

/// What a follower's registry read learned: who should try first.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) enum Ranking {
    /// The last holder's entry named this candidate to go next after its
    /// term ([`Candidate::nominee`]).
    Named(LeaderId),
    /// The whole registry, ranked by [`first_choice`](crate::backend::first_choice).
    Listed(Vec<Candidate>),
}

/// Inputs to the machine.
#[derive(Debug)]
pub(crate) enum Input {
    Start,
    /// A timer fired (the machine checks what is due).
    Tick,
    Watch(WatchEvent),
    /// `Ok(Some(t))`: the setup created the store object at `t`.
    Setup(Result<Option<Instant>, BackendError>),
    Acquire(Result<Acquired, BackendError>),
    Renew(Result<Renewed, BackendError>),
    Holder(Result<Option<Holder>, BackendError>),
    Release(Result<(), BackendError>),
    WorkStarted(u64),
    WorkEnded(u64),
    Stop(StopKind),
    /// The candidate registry, read for a follower about to try.
    Candidates(Result<Ranking, BackendError>),
    /// Step down for a preferred candidate (the driver checked the minimum
    /// term and wrote the nomination): like a resign, with its own cause.
    Preempt,
    /// Replace the lease's metadata within the term (`Leader::proclaim`):
    /// the next renewal, sent at once, is a proclaim.
    Proclaim(bytes::Bytes),
}

impl Input {
    /// The store's error, for a store call's result.
    pub(crate) fn error(&self) -> Option<&BackendError> {
        match self {
            Input::Setup(Err(e))
            | Input::Acquire(Err(e))
            | Input::Renew(Err(e))
            | Input::Holder(Err(e))
            | Input::Release(Err(e))
            | Input::Candidates(Err(e)) => Some(e),
            _ => None,
        }
    }
}

/// Actions for the driver.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Output {
    Setup,
    Acquire {
        nonce: Nonce,
        timeout: Duration,
    },
    Renew {
        lease: Lease,
        timeout: Duration,
    },
    /// A renewal that also replaces the lease's metadata; its reply comes
    /// as [`Input::Renew`].
    Proclaim {
        lease: Lease,
        metadata: bytes::Bytes,
        timeout: Duration,
    },
    /// The store confirmed the proclaimed metadata of term `id`.
    Proclaimed {
        id: u64,
    },
    Release {
        lease: Lease,
        timeout: Duration,
    },
    ReadHolder {
        timeout: Duration,
    },
    /// Read the candidate registry (the key looks free: who goes first?):
    /// the entry of the last holder, if known (`last`: its id and the token
    /// of its term), for whom it named to go next; the whole registry if
    /// that entry names nobody for that term, or no holder is known. The
    /// reply comes as [`Input::Candidates`].
    ReadCandidates {
        last: Option<(LeaderId, FencingToken)>,
        timeout: Duration,
    },
    BeginTerm {
        id: u64,
        lease: Lease,
        deadline: Instant,
    },
    Extend {
        id: u64,
        deadline: Instant,
    },
    CancelTerm {
        id: u64,
        reason: EndReason,
    },
    AbortWork {
        id: u64,
    },
    TermEnded {
        id: u64,
    },
    State(StateOut),
    Stopped {
        error: Option<FatalError>,
    },
}

/// A fatal store error that stopped the campaign. Compared by operation
/// only (the model tests hash machine states).
#[derive(Clone, Debug)]
pub(crate) struct FatalError(pub(crate) Op, pub(crate) Arc<BackendError>);

impl PartialEq for FatalError {
    fn eq(&self, other: &Self) -> bool {
        self.0 == other.0
    }
}

impl Eq for FatalError {}

impl std::hash::Hash for FatalError {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.0.hash(state);
    }
}

/// A state to publish (a copy of [`State`] that is `PartialEq` for tests).
#[derive(Debug, Clone)]
pub(crate) struct StateOut(pub(crate) State);

impl PartialEq for StateOut {
    fn eq(&self, other: &Self) -> bool {
        use State::*;
        match (&self.0, &other.0) {
            (Idle, Idle) | (Stopped, Stopped) => true,
            (
                Follower {
                    leader: a,
                    waiting: x,
                },
                Follower {
                    leader: b,
                    waiting: y,
                },
            ) => a == b && x == y,
            (Leader { token: a, since: s }, Leader { token: b, since: t }) => a == b && s == t,
            (Unknown { since: a, .. }, Unknown { since: b, .. }) => a == b,
            _ => false,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum InFlight {
    Setup,
    Acquire,
    Renew {
        sent_at: Instant,
    },
    /// Reading the key back after an ambiguous reply: of the acquire
    /// (`None`) or of the renewal sent at this time.
    ReadBack {
        renewal: Option<Instant>,
    },
    Release,
    /// Reading the candidate registry before trying, since `sent_at`,
    /// with `last` the holder known then.
    Rank {
        sent_at: Instant,
        last: Option<(LeaderId, FencingToken)>,
    },
}

/// Why a follower holds off before it tries.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Hold {
    /// For this preferred candidate.
    For(LeaderId),
    /// The registry read failed at once: nobody is known to go first, so
    /// the follower waits out the rest of the hold-off as if somebody did.
    /// Some followers' reads failing while others' succeed (a store under
    /// load) then costs a hold-off, not an acquire per failed read.
    Unranked,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum Phase {
    Idle,
    SettingUp {
        retry_at: Option<Instant>,
    },
    Follower {
        wake_at: Instant,
        quiet_until: Option<Instant>,
        /// Holding off until `wake_at`, then trying without reading the
        /// registry again.
        hold: Option<Hold>,
    },
    Acquiring {
        nonce: Nonce,
        sent_at: Instant,
        /// Reading back after an ambiguous reply; retry the read at this time.
        confirming: Option<Option<Instant>>,
    },
    Leading(Term),
    Ending(Ending),
    Stopped,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct Term {
    id: u64,
    lease: Lease,
    deadline: Instant,
    renew_at: Instant,
    failures: u32,
    work: bool,
    /// The send time of the earliest renewal of this term whose outcome was
    /// ambiguous. A read-back that shows a newer revision proves only that
    /// *some* renewal since then landed, so it credits this time, never a
    /// later one. Never cleared: such a renewal may land at any time.
    unconfirmed: Option<Instant>,
    /// Set once the token is cancelled for a stop (resign, shutdown): keep
    /// renewing until the work returns or this time passes.
    drain_until: Option<(Instant, EndReason)>,
    /// Metadata to proclaim: the next renewals are proclaims until the
    /// store confirms it.
    proclaim: Option<bytes::Bytes>,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct Ending {
    id: u64,
    /// The lease to release, while it may still be ours.
    lease: Option<Lease>,
    /// After this the lease has expired in the store anyway.
    release_by: Instant,
    work: bool,
    abort_at: Option<Instant>,
    retry_at: Option<Instant>,
    failures: u32,
    quiet: bool,
}

/// The machine. See the module docs.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(crate) struct Core {
    t: TimingKey,
    rng: u64,
    phase: Phase,
    op: Option<InFlight>,
    stop: Option<StopKind>,
    /// Consecutive store errors (the backoff exponent).
    errors: u32,
    unknown_since: Option<Instant>,
    next_term: u64,
    /// The last holder seen, for the follower state.
    leader: Option<Holder>,
    /// A fatal error to report once the lease is given back.
    fatal: Option<FatalError>,
    /// The backend's watch reports expiry: a follower that sees a write
    /// without an expiry hint need not poll before a ttl has passed.
    watch_reports_expiry: bool,
    /// Once a stop (shutdown, abandon) waits on the store alone (no work
    /// runs), it ends by this time whatever the store does: a call still in
    /// flight then is dropped and a lease not yet released is left to
    /// expire. Keeps `shutdown()` within the drain timeout plus one call.
    stop_by: Option<Instant>,
    /// What was last published, so that each change is published once.
    published: Option<Published>,
    /// With a candidate registry: this candidate's id and its hold-off.
    /// A follower about to try reads the registry first, and holds off if
    /// another candidate should go first.
    rank: Option<(LeaderId, Duration)>,
}

/// The identity of a published state: a follower's state changes when the
/// leader's term does, not when it renews.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Published {
    Idle,
    /// The leader's term and a digest of its metadata (a proclaim changes
    /// the metadata within a term).
    Follower(Option<(Option<Nonce>, Option<FencingToken>, u64)>, Waiting),
    Leader(FencingToken),
    Unknown(Instant),
    Stopped,
}

impl Published {
    fn of(state: &State) -> Published {
        match state {
            State::Idle => Published::Idle,
            State::Follower { leader, waiting } => Published::Follower(
                leader
                    .as_ref()
                    .map(|h| (h.nonce(), h.token(), digest(h.metadata()))),
                *waiting,
            ),
            State::Leader { token, .. } => Published::Leader(*token),
            State::Unknown { since, .. } => Published::Unknown(*since),
            State::Stopped => Published::Stopped,
        }
    }
}

/// FNV-1a of `bytes`: tells a proclaimed metadata from the one before.
fn digest(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// `Timing` with `jitter` as parts per million, so the machine is `Hash`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct TimingKey {
    ttl: Duration,
    renew: Duration,
    retry: Duration,
    drift: Duration,
    jitter_ppm: u32,
    drain: Duration,
    backoff_min: Duration,
    backoff_max: Duration,
}

impl Core {
    /// Tells the machine that the backend's watch reports expiry
    /// ([`BackendEdge::watch_reports_expiry`](crate::BackendEdge::watch_reports_expiry)).
    pub(crate) fn set_watch_reports_expiry(&mut self, reports: bool) {
        self.watch_reports_expiry = reports;
    }

    /// Tells the machine that this candidate is in the registry as `me`: a
    /// follower about to try reads the registry first, and lets the
    /// candidate that should go first try alone for `holdoff`.
    pub(crate) fn set_rank(&mut self, me: LeaderId, holdoff: Duration) {
        self.rank = Some((me, holdoff));
    }

    pub(crate) fn new(timing: &Timing, seed: u64) -> Core {
        Core {
            t: TimingKey {
                ttl: timing.ttl,
                renew: timing.renew_interval,
                retry: timing.retry_interval,
                drift: timing.drift_margin,
                jitter_ppm: (timing.jitter * 1e6) as u32,
                drain: timing.drain_timeout,
                backoff_min: timing.backoff_min,
                backoff_max: timing.backoff_max,
            },
            rng: seed | 1,
            phase: Phase::Idle,
            op: None,
            stop: None,
            errors: 0,
            unknown_since: None,
            next_term: 1,
            leader: None,
            fatal: None,
            watch_reports_expiry: false,
            stop_by: None,
            published: None,
            rank: None,
        }
    }

    /// `true` once stopped.
    #[cfg(test)]
    pub(crate) fn is_stopped(&self) -> bool {
        self.phase == Phase::Stopped
    }

    /// `true` once the store is set up for this campaign (and since: a
    /// campaign never goes back to setting up).
    pub(crate) fn is_set_up(&self) -> bool {
        !matches!(self.phase, Phase::Idle | Phase::SettingUp { .. })
    }

    /// `true` while a term is live (begun, not cancelled).
    #[cfg(test)]
    pub(crate) fn is_leading(&self) -> bool {
        matches!(&self.phase, Phase::Leading(t) if t.drain_until.is_none())
    }

    /// The earliest time at which [`Input::Tick`] has something to do.
    pub(crate) fn next_wake(&self) -> Option<Instant> {
        let at = self.phase_wake();
        match (at, self.stop_by.filter(|_| self.phase != Phase::Stopped)) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    fn phase_wake(&self) -> Option<Instant> {
        let idle = self.op.is_none();
        match &self.phase {
            Phase::Idle | Phase::Stopped => None,
            Phase::SettingUp { retry_at } => retry_at.filter(|_| idle),
            Phase::Follower { wake_at, .. } => idle.then_some(*wake_at),
            Phase::Acquiring { confirming, .. } => confirming.flatten().filter(|_| idle),
            Phase::Leading(term) => {
                let mut at = term.deadline;
                if idle {
                    at = at.min(term.renew_at);
                }
                if let Some((d, _)) = term.drain_until.filter(|_| term.work) {
                    at = at.min(d);
                }
                Some(at)
            }
            Phase::Ending(e) if e.work => e.abort_at,
            Phase::Ending(e) => e.retry_at.filter(|_| idle),
        }
    }

    /// Feeds one input at `now` and returns the actions to take, in order.
    pub(crate) fn handle(&mut self, now: Instant, input: Input) -> Vec<Output> {
        let mut out = Vec::new();
        self.step(now, input, &mut out);
        self.arm_stop(now);
        // Anything that became due at `now` is done at once.
        for _ in 0..4 {
            match self.next_wake() {
                Some(at) if at <= now => {
                    self.step(now, Input::Tick, &mut out);
                    self.arm_stop(now);
                }
                _ => break,
            }
        }
        if let Some(stop_by) = self.stop_by {
            // Stopping: no call may outlast the stop's own bound.
            let left = stop_by
                .saturating_duration_since(now)
                .max(Duration::from_millis(1));
            for output in &mut out {
                if let Output::Acquire { timeout, .. }
                | Output::Renew { timeout, .. }
                | Output::Proclaim { timeout, .. }
                | Output::Release { timeout, .. }
                | Output::ReadHolder { timeout }
                | Output::ReadCandidates { timeout, .. } = output
                {
                    *timeout = (*timeout).min(left);
                }
            }
        }
        out
    }

    fn step(&mut self, now: Instant, input: Input, out: &mut Vec<Output>) {
        match input {
            Input::Start => {
                if self.phase == Phase::Idle {
                    self.phase = Phase::SettingUp { retry_at: None };
                    self.send(InFlight::Setup, Output::Setup, out);
                    self.publish(State::following(None), out);
                }
            }
            Input::Tick => self.tick(now, out),
            Input::Watch(event) => self.watch(now, event, out),
            Input::Setup(result) => self.on_setup(now, result, out),
            Input::Acquire(result) => self.on_acquire(now, result, out),
            Input::Renew(result) => self.on_renew(now, result, out),
            Input::Holder(result) => self.on_holder(now, result, out),
            Input::Release(result) => self.on_release(now, result),
            Input::WorkStarted(id) => match &mut self.phase {
                Phase::Leading(term) if term.id == id => term.work = true,
                _ => {}
            },
            Input::WorkEnded(id) => self.on_work_ended(now, id, out),
            Input::Stop(kind) => self.on_stop(now, kind, out),
            Input::Candidates(result) => self.on_candidates(now, result, out),
            Input::Proclaim(metadata) => {
                if let Phase::Leading(term) = &mut self.phase
                    && term.drain_until.is_none()
                {
                    term.proclaim = Some(metadata);
                    term.renew_at = now;
                }
            }
            Input::Preempt => {
                if let Phase::Leading(term) = &self.phase
                    && term.drain_until.is_none()
                    && self.stop.is_none()
                {
                    self.drain(now, EndReason::Preempted, false, out);
                }
            }
        }
    }

    // ----- helpers -------------------------------------------------------

    fn rand_unit(&mut self) -> f64 {
        // xorshift64*: deterministic for a seed, which the model tests need.
        let mut x = self.rng;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.rng = x;
        (x.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 11) as f64 / (1u64 << 53) as f64
    }

    /// `d` shortened by up to the jitter fraction.
    fn jittered(&mut self, d: Duration) -> Duration {
        let j = f64::from(self.t.jitter_ppm) / 1e6;
        d.mul_f64(1.0 - j * self.rand_unit())
    }

    /// A random extra wait in `[0, jitter x retry]`, so followers woken by
    /// the same expiry do not all call at once.
    fn spread(&mut self) -> Duration {
        let j = f64::from(self.t.jitter_ppm) / 1e6;
        self.t.retry.mul_f64(j * self.rand_unit())
    }

    /// The spread of followers' acquires after a release: uniform up to the
    /// jitter fraction of the retry interval, but at most 1 ms (a handoff
    /// should cost milliseconds, not a retry interval).
    fn release_spread(&mut self) -> Duration {
        let j = f64::from(self.t.jitter_ppm) / 1e6;
        let cap = self.t.retry.mul_f64(j).min(Duration::from_millis(1));
        cap.mul_f64(self.rand_unit())
    }

    /// Capped, jittered exponential backoff for the `n`th consecutive error.
    fn backoff(&mut self, n: u32) -> Duration {
        let exp = self
            .t
            .backoff_min
            .saturating_mul(1u32 << n.min(20))
            .min(self.t.backoff_max);
        self.jittered(exp)
    }

    /// The last holder seen, as a registry read names it: id and token.
    fn known_holder(&self) -> Option<(LeaderId, FencingToken)> {
        self.leader
            .as_ref()
            .and_then(|h| Some((h.id()?, h.token()?)))
    }

    fn send(&mut self, op: InFlight, output: Output, out: &mut Vec<Output>) {
        debug_assert!(self.op.is_none(), "one store call at a time");
        self.op = Some(op);
        out.push(output);
    }

    /// Publishes `state` unless it is what was last published (a follower
    /// polling a steady leader publishes it once per term).
    fn publish(&mut self, state: State, out: &mut Vec<Output>) {
        let id = Published::of(&state);
        if self.published == Some(id) {
            return;
        }
        self.published = Some(id);
        out.push(Output::State(StateOut(state)));
    }

    /// Starts the bound of a stop once it waits on the store alone.
    fn arm_stop(&mut self, now: Instant) {
        if self.stop_by.is_some()
            || !matches!(self.stop, Some(StopKind::Shutdown | StopKind::Abandon))
        {
            return;
        }
        let work = match &self.phase {
            Phase::Leading(t) => t.work,
            Phase::Ending(e) => e.work,
            Phase::Stopped => return,
            _ => false,
        };
        if !work {
            self.stop_by = Some(later(now, self.t.renew));
        }
    }

    fn store_ok(&mut self) {
        self.errors = 0;
        self.unknown_since = None;
    }

    /// Records a transient error while not leading; returns the backoff.
    fn store_down(&mut self, now: Instant, error: BackendError, out: &mut Vec<Output>) -> Duration {
        let since = *self.unknown_since.get_or_insert(now);
        let wait = self.backoff(self.errors);
        self.errors = self.errors.saturating_add(1);
        self.publish(
            State::Unknown {
                since,
                error: Arc::new(error),
            },
            out,
        );
        wait
    }

    /// A fatal store error: give back a live term first, then stop.
    fn fatal(&mut self, now: Instant, op: Op, error: BackendError, out: &mut Vec<Output>) {
        tracing::error!(%op, %error, "fatal store error; the campaign stops");
        self.fatal = Some(FatalError(op, Arc::new(error)));
        self.stop = Some(StopKind::Shutdown);
        match self.phase {
            Phase::Leading(_) => self.end_term(now, EndReason::Fatal, out),
            Phase::Ending(_) => {}
            _ => self.stopped(out),
        }
    }

    fn stopped(&mut self, out: &mut Vec<Output>) {
        // A call still in flight is dropped by the driver; it may still land,
        // like any call whose reply is lost (no work runs, so it is safe).
        self.op = None;
        self.phase = Phase::Stopped;
        self.publish(State::Stopped, out);
        out.push(Output::Stopped {
            error: self.fatal.take(),
        });
    }

    fn follow(&mut self, wake_at: Instant, quiet_until: Option<Instant>, out: &mut Vec<Output>) {
        if matches!(self.stop, Some(StopKind::Shutdown | StopKind::Abandon)) {
            return self.stopped(out);
        }
        self.phase = Phase::Follower {
            wake_at,
            quiet_until,
            hold: None,
        };
    }

    /// When a follower that saw `holder` should try again. Without an
    /// expiry hint it retries after the retry interval, unless the watch
    /// reports expiry: then the watch says when the lease ends (a
    /// `Released`, or a `Resync` when the watch breaks or comes back), and
    /// the follower sets no timer of its own.
    fn wake_for(&mut self, now: Instant, holder: Option<&Holder>) -> Instant {
        match holder.and_then(Holder::expires_in) {
            Some(left) => later(later(now, left), self.spread()),
            None if self.watch_reports_expiry && holder.is_some() => later(now, UNTIL_TOLD),
            None => now + self.jittered(self.t.retry),
        }
    }

    fn acquire(&mut self, now: Instant, out: &mut Vec<Output>) {
        let nonce = Nonce::random();
        self.phase = Phase::Acquiring {
            nonce,
            sent_at: now,
            confirming: None,
        };
        let timeout = self.t.ttl - self.t.drift;
        self.send(InFlight::Acquire, Output::Acquire { nonce, timeout }, out);
    }

    fn begin(&mut self, now: Instant, lease: Lease, sent_at: Instant, out: &mut Vec<Output>) {
        let deadline = sent_at + self.t.ttl - self.t.drift;
        let id = self.next_term;
        self.next_term += 1;
        if now >= deadline {
            tracing::warn!(token = %lease.token(), "acquire reply came after its deadline; releasing");
            self.phase = Phase::Ending(Ending {
                id,
                release_by: sent_at + self.t.ttl,
                lease: Some(lease),
                work: false,
                abort_at: None,
                retry_at: Some(now),
                failures: 0,
                quiet: false,
            });
            return;
        }
        if self.stop.is_some() {
            // Asked to stop while the acquire was in flight: give it back.
            self.phase = Phase::Ending(Ending {
                id,
                release_by: sent_at + self.t.ttl,
                lease: Some(lease),
                work: false,
                abort_at: None,
                retry_at: Some(now),
                failures: 0,
                quiet: true,
            });
            return;
        }
        tracing::info!(token = %lease.token(), "won leadership");
        let renew_at = now + self.jittered(self.t.renew);
        out.push(Output::BeginTerm {
            id,
            lease: lease.clone(),
            deadline,
        });
        self.publish(
            State::Leader {
                token: lease.token(),
                since: now,
            },
            out,
        );
        self.phase = Phase::Leading(Term {
            id,
            lease,
            deadline,
            renew_at,
            failures: 0,
            work: false,
            unconfirmed: None,
            drain_until: None,
            proclaim: None,
        });
    }

    /// Cancels the current term and moves to `Ending`.
    fn end_term(&mut self, now: Instant, reason: EndReason, out: &mut Vec<Output>) {
        let Phase::Leading(term) = &self.phase else {
            return;
        };
        let term = term.clone();
        if term.drain_until.is_none() {
            out.push(Output::CancelTerm {
                id: term.id,
                reason,
            });
        }
        match reason {
            EndReason::Deadline | EndReason::Lost | EndReason::Fatal => {
                tracing::warn!(token = %term.lease.token(), ?reason, "lost leadership")
            }
            _ => tracing::info!(token = %term.lease.token(), ?reason, "stepped down"),
        }
        let keep_lease = !matches!(reason, EndReason::Lost);
        // The store cannot expire the lease before deadline + drift.
        let release_by = term.deadline + self.t.drift;
        // Work that is still running when the term ends is dropped before
        // anyone else can lead: at once if the lease is gone, else halfway
        // through the drift margin (the token fired at the deadline; the
        // store lets others in at deadline + drift). A drain for resign or
        // shutdown ends there too if the deadline passed meanwhile.
        let last_safe = match reason {
            EndReason::Lost => now,
            _ => (term.deadline + self.t.drift / 2).max(now),
        };
        let abort_at = if matches!(self.stop, Some(StopKind::Abandon)) {
            Some(now)
        } else if term.work {
            let drain = term
                .drain_until
                .map_or_else(|| later(now, self.t.drain), |(at, _)| at);
            Some(drain.min(last_safe))
        } else {
            None
        };
        self.phase = Phase::Ending(Ending {
            id: term.id,
            lease: keep_lease.then_some(term.lease),
            release_by,
            work: term.work,
            abort_at,
            retry_at: Some(now),
            failures: 0,
            // A lease that is gone while we still led was taken from us
            // (an operator's forced release, a deleted key): let the other
            // candidates take over first, as after a resign, instead of
            // racing them for the key at once.
            quiet: matches!(
                reason,
                EndReason::Resign | EndReason::Preempted | EndReason::WorkDone | EndReason::Lost
            ),
        });
        self.publish(State::following(None), out);
    }

    fn finish_ending(&mut self, now: Instant, out: &mut Vec<Output>) {
        let Phase::Ending(e) = &self.phase else {
            return;
        };
        let (id, quiet) = (e.id, e.quiet);
        out.push(Output::TermEnded { id });
        if quiet {
            let wake = now + self.jittered(self.t.retry);
            self.follow(wake, Some(wake), out);
        } else {
            self.follow(now, None, out);
        }
    }

    // ----- inputs --------------------------------------------------------

    fn tick(&mut self, now: Instant, out: &mut Vec<Output>) {
        if self.phase != Phase::Stopped && self.stop_by.is_some_and(|at| at <= now) {
            tracing::warn!(
                "the store did not answer in time while stopping; stopping anyway \
                 (a lease not released expires in the store)"
            );
            if let Phase::Ending(e) = &self.phase {
                out.push(Output::TermEnded { id: e.id });
            }
            return self.stopped(out);
        }
        let idle = self.op.is_none();
        match &mut self.phase {
            Phase::Idle | Phase::Stopped => {}
            Phase::SettingUp { retry_at } => {
                if idle && retry_at.is_some_and(|at| at <= now) {
                    *retry_at = None;
                    self.send(InFlight::Setup, Output::Setup, out);
                }
            }
            Phase::Follower { wake_at, hold, .. } => {
                if idle && *wake_at <= now {
                    if hold.is_none()
                        && let Some((_, holdoff)) = self.rank
                    {
                        // Who goes first? One read of the registry, bounded
                        // by the hold-off (a slow registry costs no more).
                        let timeout = holdoff.max(Duration::from_millis(1));
                        let last = self.known_holder();
                        self.send(
                            InFlight::Rank { sent_at: now, last },
                            Output::ReadCandidates { last, timeout },
                            out,
                        );
                    } else {
                        self.acquire(now, out);
                    }
                }
            }
            Phase::Acquiring { confirming, .. } => {
                if idle && confirming.flatten().is_some_and(|at| at <= now) {
                    *confirming = Some(None);
                    let timeout = self.t.renew;
                    self.send(
                        InFlight::ReadBack { renewal: None },
                        Output::ReadHolder { timeout },
                        out,
                    );
                }
            }
            Phase::Leading(term) => {
                if now >= term.deadline {
                    return self.end_term(now, EndReason::Deadline, out);
                }
                if term.work
                    && let Some((until, reason)) = term.drain_until
                    && now >= until
                {
                    // Ending drops the work (its abort time has passed) and
                    // waits until it has really stopped before releasing.
                    return self.end_term(now, reason, out);
                }
                if idle && term.renew_at <= now {
                    let timeout = term.deadline - now;
                    let lease = term.lease.clone();
                    let output = match term.proclaim.clone() {
                        Some(metadata) => Output::Proclaim {
                            lease,
                            metadata,
                            timeout,
                        },
                        None => Output::Renew { lease, timeout },
                    };
                    self.send(InFlight::Renew { sent_at: now }, output, out);
                }
            }
            Phase::Ending(e) => {
                if e.work && e.abort_at.is_some_and(|at| at <= now) {
                    if self.stop == Some(StopKind::Abandon) {
                        tracing::debug!("the runner went away; dropping the work");
                    } else {
                        tracing::warn!("work outlived its term by the drain timeout; dropping it");
                    }
                    e.abort_at = None;
                    out.push(Output::AbortWork { id: e.id });
                    return;
                }
                if e.work || !idle || e.retry_at.is_none_or(|at| at > now) {
                    return;
                }
                e.retry_at = None;
                match e.lease.clone() {
                    Some(lease) if now < e.release_by => {
                        let timeout = self.t.renew.min(e.release_by - now);
                        self.send(InFlight::Release, Output::Release { lease, timeout }, out);
                    }
                    _ => self.finish_ending(now, out),
                }
            }
        }
    }

    fn watch(&mut self, now: Instant, event: WatchEvent, out: &mut Vec<Output>) {
        match (&mut self.phase, event) {
            (
                Phase::Follower { quiet_until, .. },
                event @ (WatchEvent::Released(_) | WatchEvent::Resync),
            ) => {
                // The key is free (or events were missed). Just after
                // resigning, wait out the quiet period first, so that others
                // take over. Followers woken by one release spread their
                // acquires over a few milliseconds.
                let quiet = *quiet_until;
                let spread = match event {
                    WatchEvent::Released(_) => self.release_spread(),
                    _ => Duration::ZERO,
                };
                if let Phase::Follower { wake_at, hold, .. } = &mut self.phase {
                    // Free again (or unknown): who goes first is asked anew.
                    *hold = None;
                    *wake_at = match quiet {
                        Some(q) if q > now => (*wake_at).min(q),
                        _ => (*wake_at).min(later(now, spread)),
                    };
                }
            }
            (Phase::Follower { .. }, WatchEvent::Updated(_, Some(holder)))
                if self.leader.as_ref().is_some_and(|l| is_older(&holder, l)) =>
            {
                // An event queued behind a newer read: it says nothing new.
            }
            (Phase::Follower { .. }, WatchEvent::Updated(_, Some(holder))) => {
                // A renewal or a new leader: push the expiry wake-up out,
                // with no store call. Without a hint, a watch that reports
                // expiry will say when the lease ends (or send `Resync`
                // when it breaks), so the follower sets no timer: an idle
                // follower makes no store calls while the watch is up,
                // whether or not the leader's renewals write the key.
                let left = match holder.expires_in() {
                    Some(left) => Some(left),
                    None if self.watch_reports_expiry => Some(UNTIL_TOLD),
                    None => None,
                };
                let spread = self.spread();
                if let Phase::Follower { wake_at, hold, .. } = &mut self.phase {
                    // A new leader ends a hold-off: nothing to try for.
                    if hold.take().is_some() && left.is_none() {
                        *wake_at = now + self.t.retry;
                    }
                    if let Some(left) = left {
                        *wake_at = (*wake_at).max(later(later(now, left), spread));
                    }
                }
                self.publish(State::following(Some(holder.clone())), out);
                self.leader = Some(holder);
            }
            (Phase::Leading(term), WatchEvent::Updated(_, Some(holder)))
                if !holder.is_nonce(term.lease.nonce()) =>
            {
                // Someone else wrote the key: check now rather than at the
                // next renewal.
                term.renew_at = now;
            }
            (Phase::Leading(term), WatchEvent::Released(_) | WatchEvent::Resync) => {
                term.renew_at = now;
            }
            _ => {}
        }
    }

    fn on_setup(
        &mut self,
        now: Instant,
        result: Result<Option<Instant>, BackendError>,
        out: &mut Vec<Output>,
    ) {
        if self.op.take() != Some(InFlight::Setup) {
            return;
        }
        match result {
            Ok(created) => {
                self.store_ok();
                if self.stop.is_some() {
                    return self.stopped(out);
                }
                // A store object this setup created may replace one deleted
                // under a running fleet, whose leader can still be inside
                // its deadline: wait out one ttl since the creation.
                let wake_at = match created {
                    Some(at) => later(at, self.t.ttl).max(now),
                    None => now,
                };
                self.phase = Phase::Follower {
                    wake_at,
                    hold: None,
                    // Also when the watch says the key is free (its first
                    // Resync does, at once): nothing in a new bucket or
                    // table shows the old one's leader.
                    quiet_until: created.map(|_| wake_at),
                };
            }
            Err(e) if e.is_transient() => {
                if self.stop.is_some() {
                    return self.stopped(out);
                }
                let wait = self.store_down(now, e, out);
                self.phase = Phase::SettingUp {
                    retry_at: Some(now + wait),
                };
            }
            Err(e) => self.fatal(now, Op::Setup, e, out),
        }
    }

    fn on_acquire(
        &mut self,
        now: Instant,
        result: Result<Acquired, BackendError>,
        out: &mut Vec<Output>,
    ) {
        if self.op.take() != Some(InFlight::Acquire) {
            return;
        }
        let Phase::Acquiring { nonce, sent_at, .. } = self.phase else {
            return;
        };
        match result {
            Ok(Acquired::Won(lease)) if lease.nonce() == nonce => {
                self.store_ok();
                self.begin(now, lease, sent_at, out);
            }
            Ok(Acquired::Won(_)) => {
                // A backend that hands back someone else's lease breaks the
                // contract; never act on it.
                tracing::error!("backend returned a lease with another nonce; treating as held");
                let wake = now + self.jittered(self.t.retry);
                self.follow(wake, None, out);
            }
            Ok(Acquired::Held(holder)) => {
                self.store_ok();
                if self.stop.is_some() {
                    return self.stopped(out);
                }
                let wake = self.wake_for(now, Some(&holder));
                self.leader = Some(holder.clone());
                self.publish(State::following(Some(holder)), out);
                self.follow(wake, None, out);
            }
            Err(e) if e.is_transient() => {
                // The acquire may have taken effect: read back.
                tracing::debug!(error = %e, "acquire reply lost; reading back");
                self.phase = Phase::Acquiring {
                    nonce,
                    sent_at,
                    confirming: Some(None),
                };
                let timeout = self.t.renew;
                self.send(
                    InFlight::ReadBack { renewal: None },
                    Output::ReadHolder { timeout },
                    out,
                );
            }
            Err(e) => self.fatal(now, Op::Acquire, e, out),
        }
    }

    fn on_renew(
        &mut self,
        now: Instant,
        result: Result<Renewed, BackendError>,
        out: &mut Vec<Output>,
    ) {
        let Some(InFlight::Renew { sent_at }) = self.op.take() else {
            return;
        };
        let Phase::Leading(term) = &mut self.phase else {
            // The term already ended; its Ending releases the lease.
            return;
        };
        if matches!(&result, Err(e) if e.is_transient()) {
            term.unconfirmed.get_or_insert(sent_at);
        }
        let nonce = term.lease.nonce();
        let deadline = term.deadline;
        match result {
            Ok(Renewed::Renewed(lease)) if lease.nonce() == nonce => {
                tracing::debug!(token = %lease.token(), "renewed");
                self.store_ok();
                self.extend(now, lease, sent_at, None, out);
            }
            Ok(Renewed::SentAt(lease, at)) if lease.nonce() == nonce => {
                // Renewed by a request that may have been sent before ours
                // (a keep-alive shared by many keys): credit the earlier of
                // the two, and renew next one interval after it.
                tracing::debug!(token = %lease.token(), "renewed by a shared request");
                self.store_ok();
                let credit = at.min(sent_at);
                self.extend(now, lease, credit, Some(credit), out);
            }
            Ok(Renewed::Renewed(_) | Renewed::SentAt(..) | Renewed::Lost) => {
                self.end_term(now, EndReason::Lost, out)
            }
            Err(e) if e.is_transient() => {
                // The renewal may have taken effect: read back.
                tracing::debug!(error = %e, "renewal failed; reading back");
                let timeout = self.t.renew.min(deadline.saturating_duration_since(now));
                self.send(
                    InFlight::ReadBack {
                        renewal: Some(sent_at),
                    },
                    Output::ReadHolder { timeout },
                    out,
                );
            }
            Err(e) => self.fatal(now, Op::Renew, e, out),
        }
    }

    /// A renewal sent at `sent_at` is confirmed: move the deadline forward.
    /// The next renewal is due one (jittered) interval after `from` if that
    /// is still ahead, else one interval from now.
    fn extend(
        &mut self,
        now: Instant,
        lease: Lease,
        sent_at: Instant,
        from: Option<Instant>,
        out: &mut Vec<Output>,
    ) {
        if let Phase::Leading(term) = &self.phase
            && now >= term.deadline
        {
            // The reply came when the deadline had passed (the driver saw
            // it before the timer): the term is over, and a term once over
            // is never revived, whatever the store says.
            return self.end_term(now, EndReason::Deadline, out);
        }
        let next = self.jittered(self.t.renew);
        let Phase::Leading(term) = &mut self.phase else {
            return;
        };
        term.lease = lease;
        term.failures = 0;
        term.renew_at = match from {
            Some(from) if from + next > now => from + next,
            _ => now + next,
        };
        let unconfirmed = match &term.proclaim {
            Some(metadata) if term.lease.metadata() == metadata => {
                term.proclaim = None;
                out.push(Output::Proclaimed { id: term.id });
                false
            }
            Some(_) => true,
            None => false,
        };
        let deadline = sent_at + self.t.ttl - self.t.drift;
        if deadline > term.deadline {
            term.deadline = deadline;
            out.push(Output::Extend {
                id: term.id,
                deadline,
            });
        }
        if unconfirmed {
            // Not confirmed yet (a renewal that crossed it, or a read-back
            // that shows only the revision): proclaim again soon, after
            // the shortest backoff, so that a backend that never shows the
            // new metadata cannot make the campaign spin.
            let soon = now + self.backoff(0);
            if let Phase::Leading(term) = &mut self.phase {
                term.renew_at = term.renew_at.min(soon);
            }
        }
    }

    /// A renewal failed without a verdict: try again soon, but well before
    /// the deadline.
    fn retry_renew(&mut self, now: Instant) {
        let Phase::Leading(term) = &self.phase else {
            return;
        };
        let n = term.failures;
        let room = term.deadline.saturating_duration_since(now) / 2;
        let wait = self.backoff(n).min(room);
        if let Phase::Leading(term) = &mut self.phase {
            term.failures = n.saturating_add(1);
            term.renew_at = now + wait;
        }
    }

    fn on_holder(
        &mut self,
        now: Instant,
        result: Result<Option<Holder>, BackendError>,
        out: &mut Vec<Output>,
    ) {
        let Some(InFlight::ReadBack { renewal }) = self.op.take() else {
            return;
        };
        match (renewal, &self.phase) {
            (None, Phase::Acquiring { nonce, sent_at, .. }) => {
                let (nonce, sent_at) = (*nonce, *sent_at);
                self.confirm_acquire(now, nonce, sent_at, result, out);
            }
            (Some(sent_at), Phase::Leading(term)) => {
                let lease = term.lease.clone();
                let credit = term.unconfirmed.map_or(sent_at, |t| t.min(sent_at));
                match result {
                    Ok(Some(h)) if h.is_nonce(lease.nonce()) => {
                        self.store_ok();
                        if h.revision() != lease.revision() {
                            // A renewal took effect whose reply was lost: the
                            // earliest ambiguous one, as far as we can tell.
                            self.extend(now, lease.with_revision(h.revision()), credit, None, out);
                        } else {
                            self.retry_renew(now);
                        }
                    }
                    Ok(_) => self.end_term(now, EndReason::Lost, out),
                    Err(e) if e.is_transient() => self.retry_renew(now),
                    Err(e) => self.fatal(now, Op::Holder, e, out),
                }
            }
            // The phase moved on (deadline, stop) while the read was in
            // flight; the new phase decides.
            _ => {}
        }
    }

    fn confirm_acquire(
        &mut self,
        now: Instant,
        nonce: Nonce,
        sent_at: Instant,
        result: Result<Option<Holder>, BackendError>,
        out: &mut Vec<Output>,
    ) {
        match result {
            Ok(Some(h)) if h.is_nonce(nonce) => match lease_of(&h) {
                Some(lease) => {
                    self.store_ok();
                    self.begin(now, lease, sent_at, out);
                }
                None => {
                    let wake = now + self.jittered(self.t.retry);
                    self.follow(wake, None, out);
                }
            },
            Ok(holder) => {
                self.store_ok();
                if self.stop.is_some() {
                    return self.stopped(out);
                }
                let wake = match &holder {
                    Some(h) => self.wake_for(now, Some(h)),
                    None => now + self.backoff(0),
                };
                self.leader = holder.clone();
                self.publish(State::following(holder), out);
                self.follow(wake, None, out);
            }
            Err(_) if self.stop.is_some() => {
                // No work was started, so stopping is safe; a lease the
                // attempt may have made expires on its own.
                self.stopped(out);
            }
            Err(e) if e.is_transient() => {
                let wait = self.store_down(now, e, out);
                if now + wait < sent_at + self.t.ttl {
                    self.phase = Phase::Acquiring {
                        nonce,
                        sent_at,
                        confirming: Some(Some(now + wait)),
                    };
                } else {
                    // Any lease that attempt made has expired by now.
                    self.follow(now + wait, None, out);
                }
            }
            Err(e) => self.fatal(now, Op::Holder, e, out),
        }
    }

    /// The registry, read by a follower about to try: go now if this
    /// candidate should go first (or nobody is preferred), else hold off.
    /// A failed read (the registry is advisory) means "try once the
    /// hold-off since the read was sent has passed".
    fn on_candidates(
        &mut self,
        now: Instant,
        result: Result<Ranking, BackendError>,
        out: &mut Vec<Output>,
    ) {
        let Some(InFlight::Rank { sent_at, last }) = self.op else {
            return;
        };
        self.op = None;
        if !matches!(self.phase, Phase::Follower { .. }) {
            return;
        }
        if matches!(self.stop, Some(StopKind::Shutdown | StopKind::Abandon)) {
            return self.stopped(out);
        }
        if self.known_holder() != last {
            // A new holder was seen while the read was out (the preferred
            // candidate, most likely): the key is held, and the follower
            // waits as that event set it, instead of holding off and then
            // trying against a live lease.
            return;
        }
        let Some((me, holdoff)) = self.rank else {
            return self.acquire(now, out);
        };
        let ranking = match result {
            Ok(ranking) => ranking,
            Err(e) => {
                let until = later(sent_at, holdoff);
                if until <= now {
                    tracing::debug!(error = %e, "could not read the candidates; trying");
                    return self.acquire(now, out);
                }
                tracing::debug!(error = %e, "could not read the candidates; trying after the hold-off");
                self.phase = Phase::Follower {
                    wake_at: until,
                    quiet_until: None,
                    hold: Some(Hold::Unranked),
                };
                return;
            }
        };
        let chosen = match ranking {
            Ranking::Named(who) => Some(who),
            Ranking::Listed(list) => {
                let last = self
                    .leader
                    .as_ref()
                    .and_then(|h| Some((h.id()?, h.token())));
                crate::backend::first_choice(&list, last)
            }
        };
        match chosen {
            Some(preferred) if preferred != me => {
                tracing::debug!(%preferred, "holding off for a preferred candidate");
                self.phase = Phase::Follower {
                    wake_at: later(now, holdoff),
                    quiet_until: None,
                    hold: Some(Hold::For(preferred)),
                };
                self.publish(
                    State::Follower {
                        leader: None,
                        waiting: Waiting::HoldingOff { preferred },
                    },
                    out,
                );
            }
            _ => self.acquire(now, out),
        }
    }

    fn on_release(&mut self, now: Instant, result: Result<(), BackendError>) {
        if self.op.take() != Some(InFlight::Release) {
            return;
        }
        let wait = match &result {
            Err(e) if e.is_transient() => {
                let n = match &self.phase {
                    Phase::Ending(e) => e.failures,
                    _ => 0,
                };
                Some(self.backoff(n))
            }
            _ => None,
        };
        let Phase::Ending(e) = &mut self.phase else {
            return;
        };
        match result {
            Ok(()) => {
                tracing::debug!("released");
                e.lease = None;
                e.retry_at = Some(now);
            }
            Err(err) => match wait {
                Some(wait) if now + wait < e.release_by => {
                    tracing::debug!(error = %err, "release failed; retrying");
                    e.failures = e.failures.saturating_add(1);
                    e.retry_at = Some(now + wait);
                }
                _ => {
                    tracing::warn!(error = %err, "release failed; the lease will expire in the store");
                    e.lease = None;
                    e.retry_at = Some(now);
                }
            },
        }
    }

    fn on_work_ended(&mut self, now: Instant, id: u64, out: &mut Vec<Output>) {
        match &mut self.phase {
            Phase::Leading(term) if term.id == id => {
                term.work = false;
                // Work that returns once the deadline has passed did not
                // finish while leading: the term was lost.
                let reason = if now >= term.deadline {
                    EndReason::Deadline
                } else {
                    term.drain_until.map_or(EndReason::WorkDone, |(_, r)| r)
                };
                self.end_term(now, reason, out);
            }
            Phase::Ending(e) if e.id == id => {
                e.work = false;
                e.abort_at = None;
            }
            _ => {}
        }
    }

    fn on_stop(&mut self, now: Instant, kind: StopKind, out: &mut Vec<Output>) {
        if kind == StopKind::Resign {
            if let Phase::Leading(term) = &self.phase
                && term.drain_until.is_none()
            {
                self.drain(now, EndReason::Resign, false, out);
            }
            return;
        }
        if self.stop != Some(StopKind::Abandon) {
            self.stop = Some(kind);
        }
        let abandon = self.stop == Some(StopKind::Abandon);
        let idle = self.op.is_none();
        match &mut self.phase {
            Phase::Idle | Phase::Follower { .. } => self.stopped(out),
            Phase::SettingUp { .. } | Phase::Acquiring { .. } if idle => self.stopped(out),
            // A call is in flight: its reply decides (a won lease is given
            // back, never used).
            Phase::SettingUp { .. } | Phase::Acquiring { .. } => {}
            Phase::Leading(_) => self.drain(now, EndReason::Shutdown, abandon, out),
            Phase::Ending(e) => {
                if kind == StopKind::Abandon && e.work {
                    e.abort_at = Some(now);
                }
            }
            Phase::Stopped => {}
        }
    }

    /// Cancels the term's token for a stop and keeps renewing while the work
    /// drains; releases once it has returned (at once if `abandon`, after
    /// dropping the work).
    fn drain(&mut self, now: Instant, reason: EndReason, abandon: bool, out: &mut Vec<Output>) {
        let until = later(now, self.t.drain);
        let Phase::Leading(term) = &mut self.phase else {
            return;
        };
        if term.drain_until.is_none() {
            out.push(Output::CancelTerm {
                id: term.id,
                reason,
            });
            term.drain_until = Some((until, reason));
            self.publish(State::following(None), out);
        }
        if let Phase::Leading(term) = &self.phase
            && (abandon || !term.work)
        {
            self.end_term(now, reason, out);
        }
    }
}

/// `at + d`, or a far-future instant where that would overflow (settings
/// such as `drain_timeout(Duration::MAX)` mean "no limit").
/// How long a follower waits with no timer of its own, when the watch
/// will tell it when to act: far enough never to fire in practice, short
/// enough to add to any instant.
const UNTIL_TOLD: Duration = crate::config::MAX_INTERVAL;

pub(crate) fn later(at: Instant, d: Duration) -> Instant {
    at.checked_add(d)
        .unwrap_or_else(|| at + Duration::from_secs(86_400 * 365 * 30))
}

/// `true` if `h` shows an earlier state of the key than `seen`: an earlier
/// term (a smaller token), or an earlier write of the same term.
pub(crate) fn is_older(h: &Holder, seen: &Holder) -> bool {
    match (h.token(), seen.token()) {
        (Some(a), Some(b)) if a != b => a < b,
        _ => h.nonce() == seen.nonce() && h.revision() < seen.revision(),
    }
}

/// Our lease as a read-back shows it.
fn lease_of(h: &Holder) -> Option<Lease> {
    let claim = crate::backend::Claim {
        nonce: h.nonce()?,
        id: h.id()?,
        metadata: h.metadata().clone(),
        at: h.since()?,
    };
    Some(Lease::new(&claim, h.token()?, h.revision()))
}

#[allow(dead_code)]
fn _assert_token(_: FencingToken) {}
