//! Bounded, exhaustive model checking of the campaign machine [`Core`], and
//! scenario tests that read as its documentation.
//!
//! # The model
//!
//! Two (or three) candidates, each a [`Core`] run the way `campaign::run`
//! runs it, share one abstract, linearizable store holding one key. The
//! store follows the lease contract of `backend/mod.rs` on the model's
//! global clock: `acquire` creates a lease only if none is live, with a
//! token one above every token issued; `renew` extends only the live lease
//! with that nonce, to `now + ttl`; `release` is compare-and-delete on the
//! nonce; `holder` returns the live lease with its `expires_in`. A lease
//! written at `t` expires at `t + ttl` (`expires_at <= now` is expired).
//!
//! Each candidate has at most one store call in flight, as the driver has,
//! bounded by the timeout the machine chose; its work is a task that starts
//! when a term begins, and returns within [`PROMPT`] of its token being
//! cancelled, or at once when aborted.
//!
//! # The search
//!
//! By default everything is prompt: a call is applied and answered the
//! moment it is sent, work starts the moment a term begins, watch events
//! arrive the moment the store changes, and the clock then jumps to the
//! next instant at which something is due (a machine's wake-up, a call's
//! timeout or the millisecond before it, a lease's expiry, a work's stop
//! deadline), where due ticks, timeouts and work stops are handled (in
//! every order, for one candidate at a time) before anything else happens
//! at that instant, except that a reply held in the network may arrive at
//! that very instant and be handled first (the driver's `select!` polls
//! store replies before timers). Several calls in flight at one instant are
//! applied in every order. (Setup is done at once when the search starts.)
//!
//! Each path may deviate from that schedule up to [`Config::deviations`]
//! times, each a nondeterministic edge:
//!
//! * a call is held in the network: it may then be applied, and its reply
//!   delivered, at any later instant before its timeout, else the driver
//!   feeds `Timeout`;
//! * a call is applied but its reply held (delivered later, or lost to the
//!   timeout), or lost at once with `Unavailable`;
//! * a call fails with `Unavailable`, applied or not;
//! * a call that failed without being applied stays stuck in the network
//!   and is applied later, at any instant (the nasty case; at most once per
//!   path, and after `Unavailable` only if
//!   [`Config::late_after_unavailable`]);
//! * the work returns on its own, never starts, or lingers after its token
//!   fired until [`PROMPT`] has passed;
//! * a watch event is dropped or delivered later.
//!
//! `resign()` and `shutdown()` come on top, [`Config::stops`] per path.
//!
//! # Batched renewals
//!
//! A backend that batches renewals (`BackendEdge::renew_many`, gathered by
//! `backend/batch.rs`) gives a key's machine no input it could tell apart
//! from a path searched here, so the machine is checked for it as it is:
//!
//! * waiting in the batcher's queue is a call held in the network; the
//!   store is told the time left before the leader's deadline, so the
//!   renewal is applied before its timeout or not at all (a renewal whose
//!   budget ran out in the queue is answered `Timeout` unsent: held, then
//!   timed out);
//! * a batch half applied is, for each key in it, either an applied call
//!   or a failed one, answered in its own right;
//! * a batch whose reply is lost, or that fails as a whole after the store
//!   applied it, is an applied call whose reply is lost or `Unavailable`;
//!   one the store refused is a call that failed without being applied;
//! * a key whose batched renewal failed is renewed alone: another call,
//!   made when the machine asks for it.
//!
//! What the machine must get right is that an extension counts from when
//! it asked, not from when the batch left or was applied:
//! `a_renewal_that_waited_in_a_batch_extends_from_when_it_was_asked_for`.
//! The batcher's own rules (the budget less the wait, no sending for a
//! caller that gave up, one result per renewal, the failed key alone) are
//! tested in `backend/batch.rs`; the whole under random faults, with
//! batches carrying two keys, in `tests/safety_proptest.rs`.
//!
//! States are deduplicated by a hash of everything (machines, store, calls,
//! work, clock) in which nonces, which the machine draws at random, are
//! renamed in order of first appearance, so that states equal up to the
//! choice of nonces are one; a state reached again with no more deviations
//! left than before is not explored again.
//!
//! # The invariants, checked in every reached state
//!
//! * **A** at most one candidate runs work; at most one has a live term
//!   (begun, not cancelled) whose deadline is still ahead.
//! * **B** a live term's deadline plus the drift margin is never after the
//!   store's expiry of that lease (the machine claims
//!   `expires_at >= deadline + drift`; the model's clocks are perfect).
//! * **C** fencing tokens of successive `BeginTerm`s strictly increase.
//! * **D** a machine never emits a store call while one is in flight, never
//!   panics, never asks to be woken in the past, and is never stalled (no
//!   call, no wake-up, no work) unless stopped.
//! * Bookkeeping: a term begins only after the last one ended, `Extend`
//!   moves the deadline forward and never comes once the deadline has
//!   passed (a term is never revived), `CancelTerm` only for a live term,
//!   `TermEnded` only after it and after its work returned, `Stopped` with
//!   no live term, no work and no call.
//!
//! On a violation the test replays the shortest path to it and panics with
//! the trace: every step, input, output and store change.
//!
//! The `exhaustive_*` tests print the number of states explored (run with
//! `--nocapture`); `by_hand` (ignored) takes its bounds from `MODEL_*`
//! environment variables, see [`env_config`].

use std::collections::HashMap;
use std::fmt::Write as _;
use std::hash::{BuildHasherDefault, Hash, Hasher};
use std::panic::{self, AssertUnwindSafe};
use std::sync::OnceLock;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use tokio::time::Instant;

use super::core::{Core, EndReason, Input, Output, Ranking, StopKind};
use crate::backend::{
    Acquired, Candidate, Claim, FencingToken, Holder, Key, LeaderId, Lease, Nonce, Renewed,
    WatchEvent,
};
use crate::config::Timing;
use crate::error::BackendError;

// ----- timing ------------------------------------------------------------

const fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

const TTL: Duration = ms(1000);
const RENEW: Duration = ms(300);
const RETRY: Duration = ms(200);
const DRIFT: Duration = ms(100);
const DRAIN: Duration = ms(500);
const BACKOFF_MIN: Duration = ms(50);
const BACKOFF_MAX: Duration = ms(200);

/// How soon work returns once its token is cancelled: less than the drift
/// margin, so that a term cancelled at its deadline has stopped before the
/// store can let anyone else in.
const PROMPT: Duration = ms(50);

fn timing() -> Timing {
    let t = Timing {
        ttl: TTL,
        renew_interval: RENEW,
        retry_interval: RETRY,
        drift_margin: DRIFT,
        jitter: 0.0,
        drain_timeout: DRAIN,
        backoff_min: BACKOFF_MIN,
        backoff_max: BACKOFF_MAX,
    };
    // The builder's rule.
    let usable = (t.ttl - t.drift_margin).as_secs_f64();
    assert!(usable >= 2.0 * t.renew_interval.as_secs_f64() * (1.0 + t.jitter));
    t
}

fn base() -> Instant {
    static BASE: OnceLock<Instant> = OnceLock::new();
    *BASE.get_or_init(|| Instant::from_std(std::time::Instant::now()))
}

fn at(d: Duration) -> Instant {
    base() + d
}

fn since_base(i: Instant) -> Duration {
    i.saturating_duration_since(base())
}

fn show_t(d: Duration) -> String {
    if d.subsec_nanos().is_multiple_of(1_000_000) {
        format!("{}ms", d.as_millis())
    } else {
        format!("{:.3}ms", d.as_secs_f64() * 1e3)
    }
}

fn key() -> Key {
    Key::unchecked("model")
}

fn leader_id(who: usize) -> LeaderId {
    LeaderId::from(uuid::Uuid::from_u128(0x1000 + who as u128))
}

fn claim(who: usize, nonce: Nonce) -> Claim {
    Claim {
        nonce,
        id: leader_id(who),
        metadata: Bytes::new(),
        at: SystemTime::UNIX_EPOCH,
    }
}

// ----- the searched configuration --------------------------------------

/// The bounds and the nondeterminism of one search.
#[derive(Clone, Debug)]
struct Config {
    candidates: usize,
    /// The clock never passes this.
    horizon: Duration,
    /// No path longer than this many steps.
    depth: usize,
    /// Deviations from the prompt schedule per path.
    deviations: u8,
    /// A call that failed without being applied may land later (once).
    late: bool,
    /// ... also after `Unavailable`, not only after its timeout.
    late_after_unavailable: bool,
    /// `resign`/`shutdown` events per path, and which.
    stops: u8,
    stop_kinds: &'static [StopKind],
    /// Deliver watch events.
    watch: bool,
    /// Work runs in each term (else the candidate runs without work).
    work: bool,
    /// Work cancelled for a drain (resign, shutdown) may run until the
    /// drain timeout aborts it, instead of returning within [`PROMPT`].
    slow_drain: bool,
    /// Also stop the clock one millisecond before a held call times out.
    edge_points: bool,
    /// Check B as `deadline + margin <= expires_at`: the machine claims it
    /// for the drift margin. `None`: do not check B (to see what A says).
    b_margin: Option<Duration>,
    /// Renewals are answered as by a keep-alive shared by many keys, sent
    /// this long before the store applies the call: the store extends the
    /// lease from then, and the reply is `Renewed::SentAt` with that
    /// instant (later than the campaign's own send time when the call was
    /// held in the network).
    shared: Option<Duration>,
    /// The candidate registry: each candidate's priority (all registered
    /// for the whole search, so a stopped one is a dead entry that has not
    /// expired yet). A follower about to try reads it and may hold off for
    /// [`HOLDOFF`]; [`Config::preempts`] preemptions per path come on top.
    ranked: Option<&'static [i32]>,
    /// `Preempt` inputs per path (with a nomination of the best other
    /// candidate in the leader's entry, as the driver writes it first).
    preempts: u8,
    /// `Proclaim` inputs per path, to a leader.
    proclaims: u8,
}

/// A follower's hold-off for a preferred candidate.
const HOLDOFF: Duration = ms(100);

// ----- the world -----------------------------------------------------------

#[derive(Clone)]
struct World {
    now: Duration,
    cands: Vec<Cand>,
    store: Store,
    /// A call stuck in the network: it may still be applied.
    late: Option<(usize, Req)>,
    late_left: u8,
    stops_left: u8,
    /// The token of the last `BeginTerm` of anyone.
    last_token: u64,
    /// [`Config::slow_drain`].
    slow_drain: bool,
    preempts_left: u8,
    proclaims_left: u8,
    /// Not part of the state's identity (see [`explore`]).
    deviations_left: u8,
}

impl Hash for World {
    fn hash<H: Hasher>(&self, h: &mut H) {
        self.now.hash(h);
        self.cands.hash(h);
        self.store.hash(h);
        self.late.hash(h);
        self.late_left.hash(h);
        self.stops_left.hash(h);
        self.preempts_left.hash(h);
        self.proclaims_left.hash(h);
        self.last_token.hash(h);
    }
}

#[derive(Clone, Hash)]
struct Cand {
    core: Core,
    pending: Option<Pending>,
    term: Option<TermView>,
    work: Option<Work>,
    watch: Option<WatchMsg>,
    /// The watch event was delayed: it may arrive at any later instant.
    watch_held: bool,
    stopped: bool,
}

#[derive(Clone, Hash)]
struct Pending {
    req: Req,
    sent: Duration,
    limit: Duration,
    /// `Some` once applied to the store: the reply on its way.
    reply: Option<Reply>,
    /// Held in the network (not prompt).
    held: bool,
}

impl Pending {
    fn give_up(&self) -> Duration {
        self.sent + self.limit
    }
}

#[derive(Clone, Debug, Hash)]
enum Req {
    Setup,
    Acquire(Nonce),
    Renew(Lease),
    Release(Lease),
    Holder,
    /// A follower's registry read, with the last holder it knows.
    Candidates(Option<(LeaderId, FencingToken)>),
    /// A proclaim: a renewal that also stores this metadata.
    Proclaim(Lease, Bytes),
}

#[derive(Clone, Debug, Hash)]
enum Reply {
    Setup,
    Won(Lease),
    Held(Holder),
    Renewed(Lease),
    /// `Renewed::SentAt` with this instant.
    RenewedAt(Lease, Duration),
    Lost,
    Released,
    Holder(Option<Holder>),
    Candidates(Ranking),
}

#[derive(Clone, Hash)]
struct TermView {
    id: u64,
    nonce: Nonce,
    token: FencingToken,
    deadline: Duration,
    live: bool,
    /// Work started, or it was decided that none will.
    work_decided: bool,
}

#[derive(Clone, Hash)]
struct Work {
    id: u64,
    /// Its token fired.
    cancelled: bool,
    /// Cancelled, but not returning at once.
    linger: bool,
    /// It has returned by then.
    stop_by: Option<Duration>,
}

#[derive(Clone, Hash)]
enum WatchMsg {
    Released,
    Updated(Holder),
}

#[derive(Clone, Default, Hash)]
struct Store {
    lease: Option<Stored>,
    tokens: u64,
    revision: u64,
    registry: Vec<Candidate>,
}

#[derive(Clone, Hash)]
struct Stored {
    lease: Lease,
    expires_at: Duration,
}

/// One edge of the search. `*` marks a deviation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Step {
    /// Move the clock to the next instant at which something is due.
    Advance,
    Tick(usize),
    /// The call's timeout passed: the driver feeds `Timeout`.
    Timeout(usize),
    /// The same, and the unapplied call stays stuck in the network.
    TimeoutStuck(usize),
    /// Apply the call now and deliver its reply.
    ApplyDeliver(usize),
    /// Apply a held call now; its reply stays held.
    Apply(usize),
    /// Deliver a held reply.
    Deliver(usize),
    /// * Hold the call in the network.
    Hold(usize),
    /// * Apply the call now and hold its reply.
    ApplyHold(usize),
    /// * Apply the call now and lose its reply: `Unavailable`.
    ApplyFail(usize),
    /// * `Unavailable` now, applied or not.
    Fail(usize),
    /// * `Unavailable` now; the unapplied call lands later.
    FailStuck(usize),
    /// The stuck call lands.
    ApplyLate,
    StartWork(usize),
    /// * The term's work never starts.
    SkipWork(usize),
    /// Cancelled (or aborted) work returns.
    WorkStops(usize),
    /// * Cancelled work returns only at its stop deadline (or before).
    Linger(usize),
    /// * The work returns on its own while the term is live.
    Quit(usize),
    Watch(usize),
    /// * The watch event is lost.
    DropWatch(usize),
    /// * The watch event arrives at some later instant.
    DelayWatch(usize),
    Stop(usize, StopKind),
    /// The driver saw a candidate of higher priority: nominate it, preempt.
    Preempt(usize),
    /// The leader's registry driver names its successor (the best other
    /// candidate) for its term in its entry, as it does after its first
    /// read of the registry; until then, followers read the whole list.
    NameSuccessor(usize),
    /// `proclaim()` to a leader.
    Proclaim(usize),
}

impl Step {
    fn is_deviation(self) -> bool {
        use Step::*;
        matches!(
            self,
            Hold(_)
                | ApplyHold(_)
                | ApplyFail(_)
                | Fail(_)
                | FailStuck(_)
                | SkipWork(_)
                | Linger(_)
                | Quit(_)
                | DropWatch(_)
                | DelayWatch(_)
        )
    }
}

type Log<'a> = Option<&'a mut String>;

macro_rules! log {
    ($log:expr, $($arg:tt)*) => {
        if let Some(l) = $log.as_deref_mut() {
            let _ = writeln!(l, $($arg)*);
        }
    };
}

impl World {
    fn new(cfg: &Config) -> World {
        let t = timing();
        let mut w = World {
            now: Duration::ZERO,
            cands: (0..cfg.candidates)
                .map(|i| Cand {
                    core: {
                        let mut core = Core::new(&t, 0x9E37_79B9 + i as u64);
                        if cfg.ranked.is_some() {
                            core.set_rank(leader_id(i), HOLDOFF);
                        }
                        core
                    },
                    pending: None,
                    term: None,
                    work: None,
                    watch: None,
                    watch_held: false,
                    stopped: false,
                })
                .collect(),
            store: Store {
                registry: cfg
                    .ranked
                    .map(|p| {
                        p.iter()
                            .take(cfg.candidates)
                            .enumerate()
                            .map(|(i, &prio)| {
                                Candidate::new(leader_id(i), prio, Bytes::new())
                                    .with_since(SystemTime::UNIX_EPOCH + ms(i as u64))
                            })
                            .collect()
                    })
                    .unwrap_or_default(),
                ..Store::default()
            },
            late: None,
            late_left: u8::from(cfg.late),
            stops_left: cfg.stops,
            preempts_left: cfg.preempts,
            proclaims_left: cfg.proclaims,
            last_token: 0,
            slow_drain: cfg.slow_drain,
            deviations_left: cfg.deviations,
        };
        // Setup is uneventful: do it at once, so that the search starts
        // with every candidate's first acquire in flight.
        for i in 0..cfg.candidates {
            let started = w.feed(i, Input::Start, &mut None);
            w.cands[i].pending = None;
            if let Err(e) = started.and_then(|()| w.feed(i, Input::Setup(Ok(None)), &mut None)) {
                panic!("setup: {e}");
            }
        }
        w
    }

    /// A hash of the state in which nonces are renamed by first appearance.
    fn fingerprint(&self) -> u128 {
        let mut h = Canonical::default();
        self.hash(&mut h);
        h.fingerprint()
    }

    // ----- the edges -----------------------------------------------------

    fn steps(&self, cfg: &Config) -> Vec<Step> {
        let now = self.now;
        let dev = self.deviations_left > 0;
        // What is due now comes first, one candidate at a time (what one
        // candidate does alone commutes with what another does alone).
        for (i, c) in self.cands.iter().enumerate() {
            let mut due = Vec::new();
            if c.core.next_wake().is_some_and(|w| since_base(w) <= now) {
                due.push(Step::Tick(i));
            }
            if let Some(p) = c.pending.as_ref().filter(|p| p.give_up() <= now) {
                due.push(Step::Timeout(i));
                if p.reply.is_none() && self.late_left > 0 {
                    due.push(Step::TimeoutStuck(i));
                }
            }
            if c.work
                .as_ref()
                .and_then(|w| w.stop_by)
                .is_some_and(|s| s <= now)
            {
                due.push(Step::WorkStops(i));
            }
            // The driver's `select!` polls a store reply before its timers:
            // a reply held in the network that arrives at this very instant
            // is handled before the due tick.
            if !due.is_empty()
                && let Some(p) = c.pending.as_ref().filter(|p| p.held && p.give_up() > now)
            {
                due.push(match p.reply {
                    Some(_) => Step::Deliver(i),
                    None => Step::ApplyDeliver(i),
                });
            }
            if !due.is_empty() {
                return due;
            }
        }
        // Then what happens at once and concerns one candidate alone.
        for (i, c) in self.cands.iter().enumerate() {
            let mut once = Vec::new();
            if let Some(t) = &c.term
                && cfg.work
                && t.live
                && !t.work_decided
                && now < t.deadline
            {
                once.push(Step::StartWork(i));
                if dev {
                    once.push(Step::SkipWork(i));
                }
            } else if let Some(w) = c.work.as_ref().filter(|w| w.cancelled && !w.linger) {
                once.push(Step::WorkStops(i));
                if dev && w.stop_by.is_some() {
                    once.push(Step::Linger(i));
                }
            } else if c.watch.is_some() && !c.watch_held {
                once.push(Step::Watch(i));
                if dev {
                    once.push(Step::DropWatch(i));
                    once.push(Step::DelayWatch(i));
                }
            }
            if !once.is_empty() {
                return once;
            }
        }
        // Then calls (in every order), and whatever may happen at any time.
        let mut steps = Vec::new();
        let mut prompt_calls = false;
        for (i, c) in self.cands.iter().enumerate() {
            if let Some(p) = &c.pending {
                match (&p.reply, p.held) {
                    (None, false) => {
                        prompt_calls = true;
                        steps.push(Step::ApplyDeliver(i));
                        if dev {
                            steps.push(Step::Hold(i));
                            steps.push(Step::ApplyHold(i));
                        }
                    }
                    (None, true) => {
                        steps.push(Step::ApplyDeliver(i));
                        steps.push(Step::Apply(i));
                    }
                    (Some(_), _) => steps.push(Step::Deliver(i)),
                }
                if dev {
                    if p.reply.is_none() {
                        steps.push(Step::ApplyFail(i));
                    }
                    steps.push(Step::Fail(i));
                    if p.reply.is_none() && self.late_left > 0 && cfg.late_after_unavailable {
                        steps.push(Step::FailStuck(i));
                    }
                }
            }
            if c.watch.is_some() {
                steps.push(Step::Watch(i));
            }
            if let Some(w) = &c.work {
                if w.cancelled {
                    steps.push(Step::WorkStops(i));
                } else if dev {
                    steps.push(Step::Quit(i));
                }
            }
            if self.stops_left > 0 && !c.stopped {
                for &kind in cfg.stop_kinds {
                    steps.push(Step::Stop(i, kind));
                }
            }
            if self.preempts_left > 0 && c.term.as_ref().is_some_and(|t| t.live) {
                steps.push(Step::Preempt(i));
            }
            if let Some(t) = c.term.as_ref().filter(|t| t.live)
                && let Some(entry) = self.store.registry.iter().find(|e| e.id() == leader_id(i))
                && entry.nominee().is_none_or(|(_, token)| token != t.token)
            {
                steps.push(Step::NameSuccessor(i));
            }
            if self.proclaims_left > 0 && c.term.as_ref().is_some_and(|t| t.live) {
                steps.push(Step::Proclaim(i));
            }
        }
        if self.late.is_some() {
            steps.push(Step::ApplyLate);
        }
        if !prompt_calls && self.next_instant(cfg).is_some() {
            steps.push(Step::Advance);
        }
        steps
    }

    /// Where [`Step::Advance`] moves the clock, if anywhere.
    fn next_instant(&self, cfg: &Config) -> Option<Duration> {
        let now = self.now;
        let mut points = Vec::new();
        for c in &self.cands {
            points.extend(c.core.next_wake().map(since_base));
            if let Some(p) = &c.pending {
                points.push(p.give_up());
                if cfg.edge_points {
                    points.push(p.give_up().saturating_sub(ms(1)));
                }
            }
            points.extend(c.work.as_ref().and_then(|w| w.stop_by));
        }
        points.extend(self.store.lease.as_ref().map(|s| s.expires_at));
        points
            .into_iter()
            .filter(|&p| p > now)
            .min()
            .filter(|&p| p <= cfg.horizon)
    }

    fn apply(&mut self, step: Step, cfg: &Config, log: &mut Log<'_>) -> Result<(), String> {
        if step.is_deviation() {
            self.deviations_left -= 1;
        }
        match step {
            Step::Advance => {
                let to = self.next_instant(cfg).ok_or("no instant to advance to")?;
                self.now = to;
                log!(log, "  clock -> {}", show_t(to));
                if let Some(s) = &self.store.lease
                    && s.expires_at <= to
                {
                    log!(
                        log,
                        "  store: the lease (token {}) expires",
                        s.lease.token()
                    );
                    self.store.lease = None;
                    self.watch_all(WatchMsg::Released, cfg);
                }
                Ok(())
            }
            Step::Tick(i) => self.feed(i, Input::Tick, log),
            Step::Apply(i) | Step::ApplyHold(i) => {
                let req = self.cands[i].pending.as_ref().ok_or("no call")?.req.clone();
                let reply = self.store_apply(i, &req, cfg, log);
                if let Some(p) = self.cands[i].pending.as_mut() {
                    p.reply = Some(reply);
                    p.held = true;
                }
                log!(log, "  the reply is held");
                Ok(())
            }
            Step::Hold(i) => {
                log!(log, "  the call is held in the network");
                let p = self.cands[i].pending.as_mut().ok_or("no call")?;
                p.held = true;
                Ok(())
            }
            Step::ApplyDeliver(i) | Step::Deliver(i) => {
                if step == Step::ApplyDeliver(i) {
                    let req = self.cands[i].pending.as_ref().ok_or("no call")?.req.clone();
                    let reply = self.store_apply(i, &req, cfg, log);
                    if let Some(p) = self.cands[i].pending.as_mut() {
                        p.reply = Some(reply);
                    }
                }
                let p = self.cands[i].pending.take().ok_or("no call")?;
                let input = match p.reply.ok_or("not applied")? {
                    Reply::Setup => Input::Setup(Ok(None)),
                    Reply::Won(l) => Input::Acquire(Ok(Acquired::Won(l))),
                    Reply::Held(h) => Input::Acquire(Ok(Acquired::Held(h))),
                    Reply::Renewed(l) => Input::Renew(Ok(Renewed::Renewed(l))),
                    Reply::RenewedAt(l, t) => Input::Renew(Ok(Renewed::SentAt(l, at(t)))),
                    Reply::Lost => Input::Renew(Ok(Renewed::Lost)),
                    Reply::Released => Input::Release(Ok(())),
                    Reply::Holder(h) => Input::Holder(Ok(h)),
                    Reply::Candidates(ranking) => Input::Candidates(Ok(ranking)),
                };
                self.feed(i, input, log)
            }
            Step::ApplyFail(i)
            | Step::Fail(i)
            | Step::FailStuck(i)
            | Step::Timeout(i)
            | Step::TimeoutStuck(i) => {
                if step == Step::ApplyFail(i) {
                    let req = self.cands[i].pending.as_ref().ok_or("no call")?.req.clone();
                    let _ = self.store_apply(i, &req, cfg, log);
                    log!(log, "  the reply is lost");
                }
                let p = self.cands[i].pending.take().ok_or("no call")?;
                if matches!(step, Step::FailStuck(_) | Step::TimeoutStuck(_)) {
                    log!(log, "  the call stays stuck in the network");
                    self.late = Some((i, p.req.clone()));
                    self.late_left -= 1;
                }
                let error = match step {
                    Step::Timeout(_) | Step::TimeoutStuck(_) => BackendError::Timeout(p.limit),
                    _ => BackendError::unavailable("model: connection reset"),
                };
                let input = match p.req {
                    Req::Setup => Input::Setup(Err(error)),
                    Req::Acquire(_) => Input::Acquire(Err(error)),
                    Req::Renew(_) => Input::Renew(Err(error)),
                    Req::Release(_) => Input::Release(Err(error)),
                    Req::Holder => Input::Holder(Err(error)),
                    Req::Candidates(_) => Input::Candidates(Err(error)),
                    Req::Proclaim(..) => Input::Renew(Err(error)),
                };
                self.feed(i, input, log)
            }
            Step::ApplyLate => {
                let (who, req) = self.late.take().ok_or("nothing stuck")?;
                log!(log, "  the stuck call of c{who} lands");
                let _ = self.store_apply(who, &req, cfg, log);
                Ok(())
            }
            Step::StartWork(i) => {
                let t = self.cands[i].term.as_mut().ok_or("no term")?;
                t.work_decided = true;
                let id = t.id;
                self.cands[i].work = Some(Work {
                    id,
                    cancelled: false,
                    linger: false,
                    stop_by: None,
                });
                self.feed(i, Input::WorkStarted(id), log)
            }
            Step::SkipWork(i) => {
                log!(log, "  no work in this term");
                let t = self.cands[i].term.as_mut().ok_or("no term")?;
                t.work_decided = true;
                Ok(())
            }
            Step::Linger(i) => {
                let w = self.cands[i].work.as_mut().ok_or("no work")?;
                w.linger = true;
                log!(log, "  the work lingers until {:?}", w.stop_by.map(show_t));
                Ok(())
            }
            Step::WorkStops(i) | Step::Quit(i) => {
                let w = self.cands[i].work.take().ok_or("no work")?;
                log!(log, "  the work returns");
                self.feed(i, Input::WorkEnded(w.id), log)
            }
            Step::Watch(i) => {
                let msg = self.cands[i].watch.take().ok_or("no event")?;
                self.cands[i].watch_held = false;
                let event = match msg {
                    WatchMsg::Released => WatchEvent::Released(key()),
                    WatchMsg::Updated(h) => WatchEvent::Updated(key(), Some(h)),
                };
                self.feed(i, Input::Watch(event), log)
            }
            Step::DropWatch(i) => {
                log!(log, "  c{i}'s watch event is lost");
                self.cands[i].watch = None;
                Ok(())
            }
            Step::DelayWatch(i) => {
                log!(log, "  c{i}'s watch event is delayed");
                self.cands[i].watch_held = true;
                Ok(())
            }
            Step::Stop(i, kind) => {
                self.stops_left -= 1;
                self.feed(i, Input::Stop(kind), log)
            }
            Step::Proclaim(i) => {
                self.proclaims_left -= 1;
                self.feed(i, Input::Proclaim(Bytes::from_static(b"proclaimed")), log)
            }
            Step::Preempt(i) => {
                self.preempts_left -= 1;
                let token = self.cands[i].term.as_ref().ok_or("no term")?.token;
                let me = leader_id(i);
                let best =
                    crate::backend::best(self.store.registry.iter().filter(|c| c.id() != me))
                        .map(Candidate::id);
                if let (Some(to), Some(entry)) =
                    (best, self.store.registry.iter_mut().find(|c| c.id() == me))
                {
                    *entry = entry.clone().with_nominee(Some((to, token)));
                    log!(log, "  c{i} nominates {to} in its registry entry");
                }
                self.feed(i, Input::Preempt, log)
            }
            Step::NameSuccessor(i) => {
                let token = self.cands[i].term.as_ref().ok_or("no term")?.token;
                let me = leader_id(i);
                let best =
                    crate::backend::best(self.store.registry.iter().filter(|c| c.id() != me))
                        .map(Candidate::id);
                let entry = self
                    .store
                    .registry
                    .iter_mut()
                    .find(|c| c.id() == me)
                    .ok_or("no entry")?;
                *entry = entry.clone().with_nominee(best.map(|to| (to, token)));
                log!(
                    log,
                    "  c{i} names its successor {best:?} in its registry entry"
                );
                Ok(())
            }
        }
    }

    fn watch_all(&mut self, msg: WatchMsg, cfg: &Config) {
        if cfg.watch {
            for c in self.cands.iter_mut().filter(|c| !c.stopped) {
                c.watch = Some(msg.clone());
                c.watch_held = false;
            }
        }
    }

    /// The store, linearizable, at the model's clock.
    fn store_apply(&mut self, who: usize, req: &Req, cfg: &Config, log: &mut Log<'_>) -> Reply {
        let now = self.now;
        let live = self.store.lease.clone().filter(|s| s.expires_at > now);
        let reply = match req {
            Req::Setup => Reply::Setup,
            Req::Acquire(nonce) => match live {
                Some(s) => Reply::Held(s.lease.holder(Some(s.expires_at - now))),
                None => {
                    self.store.tokens += 1;
                    self.store.revision += 1;
                    let token = FencingToken::new(self.store.tokens);
                    let lease = Lease::new(&claim(who, *nonce), token, self.store.revision);
                    self.store.lease = Some(Stored {
                        lease: lease.clone(),
                        expires_at: now + TTL,
                    });
                    self.watch_all(WatchMsg::Updated(lease.holder(Some(TTL))), cfg);
                    Reply::Won(lease)
                }
            },
            Req::Renew(lease) | Req::Proclaim(lease, _) => match live {
                Some(s) if s.lease.nonce() == lease.nonce() => {
                    // A shared keep-alive does not write the key: its
                    // revision stays (the contract of `Renewed::SentAt`).
                    // A proclaim writes it.
                    let proclaim = match req {
                        Req::Proclaim(_, metadata) => Some(metadata.clone()),
                        _ => None,
                    };
                    if cfg.shared.is_none() || proclaim.is_some() {
                        self.store.revision += 1;
                    }
                    let mut lease = s.lease.with_revision(self.store.revision);
                    if let Some(metadata) = proclaim {
                        lease = lease.with_metadata(metadata);
                    }
                    // A shared keep-alive sent `early` ago extended it from
                    // then (never shortening it).
                    let from = cfg.shared.map_or(now, |early| now.saturating_sub(early));
                    let expires_at = s.expires_at.max(from + TTL);
                    self.store.lease = Some(Stored {
                        lease: lease.clone(),
                        expires_at,
                    });
                    self.watch_all(WatchMsg::Updated(lease.holder(Some(expires_at - now))), cfg);
                    match cfg.shared {
                        Some(_) => Reply::RenewedAt(lease, from),
                        None => Reply::Renewed(lease),
                    }
                }
                _ => Reply::Lost,
            },
            Req::Release(lease) => {
                if self
                    .store
                    .lease
                    .as_ref()
                    .is_some_and(|s| s.lease.nonce() == lease.nonce())
                {
                    self.store.lease = None;
                    self.store.revision += 1;
                    self.watch_all(WatchMsg::Released, cfg);
                }
                Reply::Released
            }
            Req::Holder => Reply::Holder(live.map(|s| s.lease.holder(Some(s.expires_at - now)))),
            // As the driver reads it (`registry::rank`): the last
            // holder's entry, then the whole registry if that names nobody.
            Req::Candidates(last) => Reply::Candidates(
                last.and_then(|(holder, token)| {
                    let entry = self.store.registry.iter().find(|c| c.id() == holder);
                    crate::backend::named(entry, token)
                })
                .map_or_else(
                    || Ranking::Listed(self.store.registry.clone()),
                    Ranking::Named,
                ),
            ),
        };
        log!(
            log,
            "  store applies c{who}'s {} -> {}; store now {}",
            show_req(req),
            show_reply(&reply),
            self.show_store()
        );
        reply
    }

    /// Feeds one input to a machine and carries out its outputs as the
    /// driver does.
    fn feed(&mut self, i: usize, input: Input, log: &mut Log<'_>) -> Result<(), String> {
        log!(log, "  c{i} <- {}", show_input(&input));
        let now = at(self.now);
        let core = &mut self.cands[i].core;
        let outputs =
            panic::catch_unwind(AssertUnwindSafe(|| core.handle(now, input))).map_err(|e| {
                let msg = e
                    .downcast_ref::<&str>()
                    .map(|s| (*s).to_owned())
                    .or_else(|| e.downcast_ref::<String>().cloned())
                    .unwrap_or_default();
                format!("D: c{i}'s machine panicked: {msg}")
            })?;
        for o in outputs {
            log!(log, "  c{i} -> {}", show_output(&o));
            self.output(i, o)?;
        }
        if let Some(w) = self.cands[i].core.next_wake()
            && w <= now
        {
            return Err(format!("D: c{i} asks to be woken in the past (busy loop)"));
        }
        Ok(())
    }

    fn send(&mut self, i: usize, req: Req, timeout: Duration) -> Result<(), String> {
        let c = &mut self.cands[i];
        if let Some(p) = &c.pending {
            return Err(format!(
                "D: c{i} sends {} while {} is in flight",
                show_req(&req),
                show_req(&p.req)
            ));
        }
        c.pending = Some(Pending {
            req,
            sent: self.now,
            // As the driver's `bounded`.
            limit: timeout.max(ms(1)),
            reply: None,
            held: false,
        });
        Ok(())
    }

    fn output(&mut self, i: usize, output: Output) -> Result<(), String> {
        let now = self.now;
        match output {
            Output::Setup => self.send(i, Req::Setup, RENEW),
            Output::Acquire { nonce, timeout } => self.send(i, Req::Acquire(nonce), timeout),
            Output::Renew { lease, timeout } => self.send(i, Req::Renew(lease), timeout),
            Output::Release { lease, timeout } => self.send(i, Req::Release(lease), timeout),
            Output::ReadHolder { timeout } => self.send(i, Req::Holder, timeout),
            Output::ReadCandidates { last, timeout } => {
                self.send(i, Req::Candidates(last), timeout)
            }
            Output::Proclaim {
                lease,
                metadata,
                timeout,
            } => self.send(i, Req::Proclaim(lease, metadata), timeout),
            Output::Proclaimed { .. } => Ok(()),
            Output::BeginTerm {
                id,
                lease,
                deadline,
            } => {
                let token = lease.token().get();
                if token <= self.last_token {
                    return Err(format!(
                        "C: c{i} begins a term with token {token} after token {}",
                        self.last_token
                    ));
                }
                self.last_token = token;
                let c = &mut self.cands[i];
                if let Some(t) = &c.term {
                    return Err(format!("c{i} begins term {id} before term {} ended", t.id));
                }
                c.term = Some(TermView {
                    id,
                    nonce: lease.nonce(),
                    token: lease.token(),
                    deadline: since_base(deadline),
                    live: true,
                    work_decided: false,
                });
                Ok(())
            }
            Output::Extend { id, deadline } => {
                let t = self.cands[i]
                    .term
                    .as_mut()
                    // Renewals go on while a cancelled term drains.
                    .filter(|t| t.id == id)
                    .ok_or_else(|| format!("c{i} extends term {id}, which is not current"))?;
                let deadline = since_base(deadline);
                if deadline <= t.deadline {
                    return Err(format!("c{i}'s deadline moves back"));
                }
                if now >= t.deadline {
                    return Err(format!(
                        "c{i} revives term {id}: extended at {} after its deadline {} had passed",
                        show_t(now),
                        show_t(t.deadline)
                    ));
                }
                t.deadline = deadline;
                Ok(())
            }
            Output::CancelTerm { id, reason } => {
                let c = &mut self.cands[i];
                let t = c
                    .term
                    .as_mut()
                    .filter(|t| t.id == id && t.live)
                    .ok_or_else(|| format!("c{i} cancels term {id}, which is not live"))?;
                t.live = false;
                if let Some(w) = c.work.as_mut().filter(|w| w.id == id) {
                    w.cancelled = true;
                    let drain = matches!(
                        reason,
                        EndReason::Resign | EndReason::Preempted | EndReason::Shutdown
                    );
                    if drain && self.slow_drain {
                        // Returns whenever it likes, or when aborted.
                        w.linger = true;
                    } else {
                        w.stop_by = Some(now + PROMPT);
                    }
                }
                Ok(())
            }
            Output::AbortWork { id } => {
                if let Some(w) = self.cands[i].work.as_mut().filter(|w| w.id == id) {
                    w.cancelled = true;
                    w.stop_by = Some(now);
                }
                Ok(())
            }
            Output::TermEnded { id } => {
                let c = &mut self.cands[i];
                match &c.term {
                    Some(t) if t.id == id && !t.live => {}
                    // A lease won after a stop, or won too late, is released
                    // under a term id that never began; the driver ignores
                    // its `TermEnded`.
                    None => {}
                    _ => return Err(format!("c{i} ends term {id}, which was not cancelled")),
                }
                if c.work.is_some() {
                    return Err(format!("c{i} ends term {id} while its work runs"));
                }
                c.term = None;
                Ok(())
            }
            Output::State(_) => Ok(()),
            Output::Stopped { .. } => {
                let c = &mut self.cands[i];
                if c.work.is_some() || c.term.as_ref().is_some_and(|t| t.live) {
                    return Err(format!("c{i} stops with a live term or running work"));
                }
                c.stopped = true;
                c.watch = None;
                // A stop bounded in time drops the call in flight, as the
                // driver does; one not yet applied may still land later
                // (or never).
                if let Some(p) = c.pending.take()
                    && p.reply.is_none()
                    && self.late.is_none()
                {
                    self.late = Some((i, p.req));
                }
                Ok(())
            }
        }
    }

    // ----- the invariants -------------------------------------------------

    fn check(&self, cfg: &Config) -> Result<(), String> {
        let now = self.now;
        let working: Vec<usize> = (0..self.cands.len())
            .filter(|&i| self.cands[i].work.is_some())
            .collect();
        if working.len() > 1 {
            return Err(format!("A: the work of {working:?} runs at once"));
        }
        let leading: Vec<usize> = (0..self.cands.len())
            .filter(|&i| {
                self.cands[i]
                    .term
                    .as_ref()
                    .is_some_and(|t| t.live && now < t.deadline)
            })
            .collect();
        if leading.len() > 1 {
            return Err(format!("A: {leading:?} all have a live term"));
        }
        for (i, c) in self.cands.iter().enumerate() {
            if let Some(t) = c.term.as_ref().filter(|t| t.live)
                && let Some(s) = &self.store.lease
                && s.lease.nonce() == t.nonce
                && let Some(margin) = cfg.b_margin
                && t.deadline + margin > s.expires_at
            {
                return Err(format!(
                    "B: c{i}'s deadline {} is {} the store's expiry {}",
                    show_t(t.deadline),
                    if t.deadline > s.expires_at {
                        "after"
                    } else {
                        "less than the drift margin before"
                    },
                    show_t(s.expires_at)
                ));
            }
            if !c.stopped && c.pending.is_none() && c.core.next_wake().is_none() && c.work.is_none()
            {
                return Err(format!("D: c{i} is stalled: no call, no wake-up, no work"));
            }
            if c.stopped && c.pending.is_some() {
                return Err(format!("c{i} stopped with a call in flight"));
            }
        }
        Ok(())
    }

    fn show_store(&self) -> String {
        match &self.store.lease {
            None => format!("empty (tokens issued: {})", self.store.tokens),
            Some(s) => format!(
                "{:?} token {} rev {} expires {}",
                s.lease.nonce(),
                s.lease.token(),
                s.lease.revision(),
                show_t(s.expires_at)
            ),
        }
    }

    fn summary(&self) -> String {
        let mut s = format!("  [{}] store: {}", show_t(self.now), self.show_store());
        if let Some((who, req)) = &self.late {
            let _ = write!(s, "; stuck: c{who}'s {}", show_req(req));
        }
        for (i, c) in self.cands.iter().enumerate() {
            let _ = write!(s, "\n    c{i}:");
            if c.stopped {
                s.push_str(" stopped");
            }
            if let Some(p) = &c.pending {
                let _ = write!(
                    s,
                    " call {} sent {} times out {}{}",
                    show_req(&p.req),
                    show_t(p.sent),
                    show_t(p.give_up()),
                    match (&p.reply, p.held) {
                        (Some(_), _) => " (applied, reply held)",
                        (None, true) => " (held)",
                        (None, false) => "",
                    }
                );
            }
            if let Some(t) = &c.term {
                let _ = write!(
                    s,
                    "; term {} token {} deadline {}{}",
                    t.id,
                    t.token,
                    show_t(t.deadline),
                    if t.live { " live" } else { " cancelled" }
                );
            }
            if let Some(w) = &c.work {
                let _ = write!(
                    s,
                    "; work of term {} runs{}",
                    w.id,
                    if w.cancelled { " (cancelled)" } else { "" }
                );
            }
            if let Some(w) = c.core.next_wake() {
                let _ = write!(s, "; wakes {}", show_t(since_base(w)));
            }
        }
        s
    }
}

/// A fast (not cryptographic) 128-bit hasher that renames `u128` values
/// (only [`Nonce`]s in these states) by order of first appearance.
struct Canonical {
    a: u64,
    b: u64,
    seen: Vec<u128>,
}

impl Default for Canonical {
    fn default() -> Self {
        Canonical {
            a: 0x243F_6A88_85A3_08D3,
            b: 0x1319_8A2E_0370_7344,
            seen: Vec::new(),
        }
    }
}

impl Canonical {
    fn mix(&mut self, v: u64) {
        self.a = (self.a.rotate_left(5) ^ v).wrapping_mul(0x51_7C_C1_B7_27_22_0A_95);
        self.b = (self.b ^ v)
            .wrapping_mul(0x9E37_79B9_7F4A_7C15)
            .rotate_left(29);
    }

    fn fingerprint(&self) -> u128 {
        fn fmix(mut x: u64) -> u64 {
            x ^= x >> 33;
            x = x.wrapping_mul(0xFF51_AFD7_ED55_8CCD);
            x ^= x >> 33;
            x = x.wrapping_mul(0xC4CE_B9FE_1A85_EC53);
            x ^ (x >> 33)
        }
        (u128::from(fmix(self.a)) << 64) | u128::from(fmix(self.b ^ self.a.rotate_left(17)))
    }
}

impl Hasher for Canonical {
    fn finish(&self) -> u64 {
        self.fingerprint() as u64
    }
    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            self.mix(u64::from_le_bytes(word));
        }
        self.mix(bytes.len() as u64);
    }
    fn write_u8(&mut self, v: u8) {
        self.mix(u64::from(v));
    }
    fn write_u16(&mut self, v: u16) {
        self.mix(u64::from(v));
    }
    fn write_u32(&mut self, v: u32) {
        self.mix(u64::from(v));
    }
    fn write_u64(&mut self, v: u64) {
        self.mix(v);
    }
    fn write_usize(&mut self, v: usize) {
        self.mix(v as u64);
    }
    fn write_i64(&mut self, v: i64) {
        self.mix(v as u64);
    }
    fn write_u128(&mut self, v: u128) {
        let n = match self.seen.iter().position(|&s| s == v) {
            Some(n) => n,
            None => {
                self.seen.push(v);
                self.seen.len() - 1
            }
        };
        self.mix(0xA5A5_0000 + n as u64);
    }
}

/// For maps keyed by fingerprints, which are hashes already.
#[derive(Default)]
struct Prehashed(u64);

impl Hasher for Prehashed {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }
    fn write_u128(&mut self, v: u128) {
        self.0 = v as u64;
    }
}

// ----- showing things ------------------------------------------------------

fn show_lease(l: &Lease) -> String {
    format!("{:?} token {} rev {}", l.nonce(), l.token(), l.revision())
}

fn show_holder(h: &Option<Holder>) -> String {
    match h {
        None => "none".into(),
        Some(h) => format!(
            "{:?} token {:?} rev {} expires_in {:?}",
            h.nonce(),
            h.token().map(|t| t.get()),
            h.revision(),
            h.expires_in()
        ),
    }
}

fn show_req(r: &Req) -> String {
    match r {
        Req::Setup => "setup".into(),
        Req::Acquire(n) => format!("acquire({n:?})"),
        Req::Renew(l) => format!("renew({})", show_lease(l)),
        Req::Release(l) => format!("release({})", show_lease(l)),
        Req::Holder => "holder".into(),
        Req::Candidates(None) => "candidates".into(),
        Req::Candidates(Some((who, token))) => {
            format!("candidates (after {who}, t{})", token.get())
        }
        Req::Proclaim(l, m) => format!("proclaim({}, {} bytes)", show_lease(l), m.len()),
    }
}

fn show_reply(r: &Reply) -> String {
    match r {
        Reply::Setup => "ok".into(),
        Reply::Won(l) => format!("Won({})", show_lease(l)),
        Reply::Held(h) => format!("Held({})", show_holder(&Some(h.clone()))),
        Reply::Renewed(l) => format!("Renewed({})", show_lease(l)),
        Reply::RenewedAt(l, t) => format!("Renewed({}, sent {})", show_lease(l), show_t(*t)),
        Reply::Lost => "Lost".into(),
        Reply::Released => "ok".into(),
        Reply::Holder(h) => format!("Holder({})", show_holder(h)),
        Reply::Candidates(Ranking::Named(who)) => format!("Named({who})"),
        Reply::Candidates(Ranking::Listed(list)) => format!(
            "Candidates({})",
            list.iter()
                .map(|c| format!("{}:{}", c.id(), c.priority()))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

fn show_result<T>(r: &Result<T, BackendError>, ok: impl Fn(&T) -> String) -> String {
    match r {
        Ok(v) => format!("Ok({})", ok(v)),
        Err(e) => format!("Err({e})"),
    }
}

fn show_input(i: &Input) -> String {
    match i {
        Input::Setup(r) => format!("Setup {}", show_result(r, |_| String::new())),
        Input::Acquire(r) => format!(
            "Acquire {}",
            show_result(r, |a| match a {
                Acquired::Won(l) => format!("Won({})", show_lease(l)),
                Acquired::Held(h) => format!("Held({})", show_holder(&Some(h.clone()))),
            })
        ),
        Input::Renew(r) => format!(
            "Renew {}",
            show_result(r, |a| match a {
                Renewed::Renewed(l) => format!("Renewed({})", show_lease(l)),
                Renewed::SentAt(l, t) => {
                    format!(
                        "Renewed({}, sent {})",
                        show_lease(l),
                        show_t(since_base(*t))
                    )
                }
                Renewed::Lost => "Lost".into(),
            })
        ),
        Input::Holder(r) => format!("Holder {}", show_result(r, show_holder)),
        Input::Release(r) => format!("Release {}", show_result(r, |_| String::new())),
        other => format!("{other:?}"),
    }
}

fn show_output(o: &Output) -> String {
    match o {
        Output::Acquire { nonce, timeout } => format!("Acquire({nonce:?}, timeout {timeout:?})"),
        Output::Renew { lease, timeout } => {
            format!("Renew({}, timeout {timeout:?})", show_lease(lease))
        }
        Output::Release { lease, timeout } => {
            format!("Release({}, timeout {timeout:?})", show_lease(lease))
        }
        Output::BeginTerm {
            id,
            lease,
            deadline,
        } => format!(
            "BeginTerm(id {id}, {}, deadline {})",
            show_lease(lease),
            show_t(since_base(*deadline))
        ),
        Output::Extend { id, deadline } => {
            format!(
                "Extend(id {id}, deadline {})",
                show_t(since_base(*deadline))
            )
        }
        Output::State(s) => format!("State({})", show_state(&s.0)),
        other => format!("{other:?}"),
    }
}

fn show_state(s: &crate::state::State) -> &'static str {
    use crate::state::State::*;
    match s {
        Idle => "Idle",
        Follower { .. } => "Follower",
        Leader { .. } => "Leader",
        Unknown { .. } => "Unknown",
        Stopped => "Stopped",
    }
}

// ----- the search ----------------------------------------------------------

#[derive(Debug, Default)]
struct Stats {
    states: usize,
    edges: usize,
    depth: usize,
    tokens: u64,
}

/// Breadth-first search of every path within the bounds; panics with the
/// shortest path to a violation.
fn explore(cfg: &Config) -> Stats {
    let root = World::new(cfg);
    if let Err(v) = root.check(cfg) {
        panic!("the initial state violates {v}");
    }
    // For each state explored: its parent and the step that led to it.
    let mut tree: Vec<(u32, Step)> = vec![(0, Step::Advance)];
    // The most deviations left with which each state was reached.
    let mut seen: HashMap<u128, u8, BuildHasherDefault<Prehashed>> = HashMap::default();
    seen.insert(root.fingerprint(), root.deviations_left);
    let mut frontier = vec![(root, 0u32)];
    let mut stats = Stats::default();
    while !frontier.is_empty() && stats.depth < cfg.depth {
        stats.depth += 1;
        let mut next = Vec::new();
        for (world, id) in frontier {
            for step in world.steps(cfg) {
                stats.edges += 1;
                let mut w = world.clone();
                let result = w.apply(step, cfg, &mut None).and_then(|()| w.check(cfg));
                if let Err(violation) = result {
                    let mut path = vec![step];
                    let mut at = id;
                    while at != 0 {
                        path.push(tree[at as usize].1);
                        at = tree[at as usize].0;
                    }
                    path.reverse();
                    panic!("{}", replay(cfg, &path, &violation));
                }
                let left = seen.entry(w.fingerprint()).or_insert(u8::MAX);
                if *left == u8::MAX || *left < w.deviations_left {
                    *left = w.deviations_left;
                    stats.tokens = stats.tokens.max(w.last_token);
                    tree.push((id, step));
                    next.push((w, (tree.len() - 1) as u32));
                }
            }
        }
        frontier = next;
        if std::env::var_os("MODEL_PROGRESS").is_some() {
            eprintln!(
                "depth {}: {} states, frontier {}",
                stats.depth,
                seen.len(),
                frontier.len()
            );
        }
    }
    assert!(
        frontier.is_empty(),
        "the depth bound {} cut the search; raise it",
        cfg.depth
    );
    stats.states = seen.len();
    stats
}

/// Replays a path with a log of every input, output and store change.
fn replay(cfg: &Config, path: &[Step], violation: &str) -> String {
    let mut w = World::new(cfg);
    let mut out = format!(
        "violation of {violation}\nafter {} steps ({cfg:?}):\n{}\n",
        path.len(),
        w.summary()
    );
    for (n, &step) in path.iter().enumerate() {
        let _ = writeln!(out, "{:>3}. at {}: {step:?}", n + 1, show_t(w.now));
        let mut log = String::new();
        let result = w
            .apply(step, cfg, &mut Some(&mut log))
            .and_then(|()| w.check(cfg));
        out.push_str(&log);
        out.push_str(&w.summary());
        out.push('\n');
        if let Err(v) = result {
            let _ = writeln!(out, "  !!! {v}");
            break;
        }
    }
    out
}

fn run(name: &str, cfg: &Config) -> Stats {
    let start = std::time::Instant::now();
    let stats = explore(cfg);
    println!(
        "{name}: {} states, {} edges, depth {}, highest token {}, {:.1?}",
        stats.states,
        stats.edges,
        stats.depth,
        stats.tokens,
        start.elapsed()
    );
    stats
}

const BOTH_STOPS: &[StopKind] = &[StopKind::Resign, StopKind::Shutdown];

/// The base configuration: two candidates with work, faults only.
fn two() -> Config {
    Config {
        candidates: 2,
        horizon: ms(1500),
        depth: 400,
        deviations: 3,
        late: true,
        late_after_unavailable: false,
        stops: 0,
        stop_kinds: BOTH_STOPS,
        watch: false,
        work: true,
        slow_drain: false,
        edge_points: true,
        b_margin: Some(DRIFT),
        shared: None,
        ranked: None,
        preempts: 0,
        proclaims: 0,
    }
}

/// Up to three faults (held, lost or failed calls, lost replies, early or
/// lingering work, one call stuck past its timeout) in the first 1.5 s:
/// takeover at expiry, renewals and read-backs.
#[test]
fn exhaustive_faults() {
    let stats = run("faults", &two());
    assert!(stats.tokens >= 3, "the search should reach a third term");
}

/// Renewals answered by a shared keep-alive sent 150 ms before the store
/// applies them (`Renewed::SentAt`), with up to three faults: the
/// deadline follows the earlier of that instant and the campaign's own
/// send time, and the next renewal is due one interval after it.
#[test]
fn exhaustive_shared_renewals() {
    let stats = run(
        "shared renewals",
        &Config {
            shared: Some(ms(150)),
            ..two()
        },
    );
    assert!(stats.tokens >= 3, "the search should reach a third term");
}

/// One `resign()` or `shutdown()` anywhere, with up to two faults.
#[test]
fn exhaustive_stops() {
    run(
        "stops",
        &Config {
            deviations: 2,
            stops: 1,
            ..two()
        },
    );
}

/// Watch events (prompt, lost, or late) over 2.5 s, with up to two faults
/// (a lost or late event counts as one).
#[test]
fn exhaustive_watch() {
    run(
        "watch",
        &Config {
            horizon: ms(2500),
            deviations: 2,
            watch: true,
            ..two()
        },
    );
}

/// Three candidates, one fault, one stop, watch events.
#[test]
fn exhaustive_three_candidates() {
    run(
        "three candidates",
        &Config {
            candidates: 3,
            deviations: 1,
            stops: 1,
            watch: true,
            ..two()
        },
    );
}

/// A call that failed with `Unavailable` (not only one that timed out)
/// may still land later. About 10 s.
#[test]
fn exhaustive_stuck_after_unavailable() {
    run(
        "stuck after Unavailable",
        &Config {
            late_after_unavailable: true,
            ..two()
        },
    );
}

/// Work cancelled by `resign()`/`shutdown()` may take the whole drain
/// timeout to return. If the deadline passes during the drain (renewals
/// failing), `Core` must drop the work before the store can let anyone else
/// in (found by this search; fixed by aborting at `deadline + drift/2`).
#[test]
fn exhaustive_slow_drain() {
    run(
        "slow drain",
        &Config {
            deviations: 2,
            stops: 1,
            slow_drain: true,
            ..two()
        },
    );
}

/// The candidate registry with priorities 5 and 10: a follower about to
/// try reads it and holds off for the other when that one goes first (a
/// stopped candidate's entry stays, as a dead one does until it expires);
/// one preemption (a resign with a nomination written first) and one stop
/// anywhere, with one fault and watch events.
#[test]
fn exhaustive_priorities_and_preemption() {
    let stats = run(
        "priorities and preemption",
        &Config {
            deviations: 1,
            watch: true,
            stops: 1,
            ranked: Some(&[5, 10]),
            preempts: 1,
            ..two()
        },
    );
    assert!(stats.tokens >= 2, "the search should reach a second term");
}

/// One `proclaim()` to a leader anywhere (a renewal that also writes the
/// metadata, repeated until the store shows it), with up to two faults:
/// it renews like any renewal, so the deadline rules hold through it.
#[test]
fn exhaustive_proclaim() {
    let stats = run(
        "proclaim",
        &Config {
            deviations: 2,
            proclaims: 1,
            ..two()
        },
    );
    assert!(stats.tokens >= 3, "the search should reach a third term");
}

/// Three candidates with priorities 1, 5 and 10 (the registry read, the
/// hold-offs and one preemption), one fault.
#[test]
fn exhaustive_three_priorities() {
    run(
        "three priorities",
        &Config {
            candidates: 3,
            deviations: 1,
            watch: true,
            ranked: Some(&[1, 5, 10]),
            preempts: 1,
            ..two()
        },
    );
}

fn env_config(mut cfg: Config) -> Config {
    let var = |name: &str| std::env::var(name).ok().and_then(|v| v.parse::<u64>().ok());
    let flag = |name: &str| var(name).map(|v| v != 0);
    if let Some(v) = var("MODEL_CANDIDATES") {
        cfg.candidates = v as usize;
    }
    if let Some(v) = var("MODEL_HORIZON") {
        cfg.horizon = ms(v);
    }
    if let Some(v) = var("MODEL_DEVIATIONS") {
        cfg.deviations = v as u8;
    }
    if let Some(v) = var("MODEL_STOPS") {
        cfg.stops = v as u8;
    }
    if let Some(v) = var("MODEL_B_MARGIN") {
        // In ms; above the ttl: do not check B.
        cfg.b_margin = (v <= 1000).then(|| ms(v));
    }
    cfg.watch = flag("MODEL_WATCH").unwrap_or(cfg.watch);
    cfg.work = flag("MODEL_WORK").unwrap_or(cfg.work);
    cfg.late = flag("MODEL_LATE").unwrap_or(cfg.late);
    cfg.late_after_unavailable =
        flag("MODEL_LATE_UNAVAILABLE").unwrap_or(cfg.late_after_unavailable);
    cfg.slow_drain = flag("MODEL_SLOW_DRAIN").unwrap_or(cfg.slow_drain);
    cfg
}

/// A search configured from the environment, for exploring by hand, e.g.
/// `MODEL_DEVIATIONS=4 MODEL_WATCH=1 MODEL_PROGRESS=1 cargo test -p
/// leaseholder --lib campaign::model::by_hand -- --ignored --nocapture`.
#[test]
#[ignore = "for exploring by hand"]
fn by_hand() {
    run("by hand", &env_config(two()));
}

// ----- liveness (not exhaustive) ---------------------------------------------

/// Runs the prompt schedule (no faults, no stops, first choice everywhere)
/// until some candidate leads; returns when, or `None` past `until`.
fn first_term(cfg: &Config, mut w: World, until: Duration) -> Option<Duration> {
    let before = w.last_token;
    while w.now <= until {
        if w.last_token > before {
            assert!(w.cands.iter().any(|c| c.core.is_leading()));
            return Some(w.now);
        }
        let step = w
            .steps(cfg)
            .into_iter()
            .find(|s| !s.is_deviation() && !matches!(s, Step::Stop(..) | Step::TimeoutStuck(_)))?;
        if let Err(v) = w.apply(step, cfg, &mut None).and_then(|()| w.check(cfg)) {
            panic!("violation of {v}");
        }
    }
    None
}

#[test]
fn fault_free_candidates_elect_a_leader_within_two_seconds() {
    for candidates in [2, 3] {
        let cfg = Config {
            candidates,
            deviations: 0,
            stops: 0,
            ..two()
        };
        // A fresh start: the first acquire wins.
        let at = first_term(&cfg, World::new(&cfg), ms(2000));
        assert_eq!(at, Some(Duration::ZERO), "{candidates} candidates");

        // A crashed leader's lease is still in the store: the candidates
        // wait for its expiry (1000ms) rather than polling, then one wins.
        let mut w = World::new(&cfg);
        let dead = Lease::new(&claim(9, Nonce::from_u128(9)), FencingToken::new(1), 1);
        w.store = Store {
            lease: Some(Stored {
                lease: dead,
                expires_at: ms(1000),
            }),
            tokens: 1,
            revision: 1,
            registry: Vec::new(),
        };
        let at = first_term(&cfg, w, ms(2000));
        assert_eq!(at, Some(ms(1000)), "{candidates} candidates, after a crash");
    }
}

// ----- scenarios -------------------------------------------------------------

/// One machine fed by hand, with the model's timing (ttl 1000ms, renew
/// 300ms, retry 200ms, drift 100ms, backoff 50..200ms, no jitter).
struct Solo {
    core: Core,
    now: Duration,
}

impl Solo {
    /// Started and set up at 0ms, its first acquire sent; returns its nonce.
    fn new() -> (Solo, Nonce) {
        let mut s = Solo {
            core: Core::new(&timing(), 7),
            now: Duration::ZERO,
        };
        assert!(s.feed(Input::Start).contains(&Output::Setup));
        let out = s.feed(Input::Setup(Ok(None)));
        let nonce = out
            .iter()
            .find_map(|o| match o {
                Output::Acquire { nonce, timeout } => {
                    // The reply must come while a term could still begin.
                    assert_eq!(*timeout, TTL - DRIFT);
                    Some(*nonce)
                }
                _ => None,
            })
            .unwrap_or_else(|| panic!("no acquire in {out:?}"));
        (s, nonce)
    }

    /// Won its first acquire (sent at 0ms): token 1, revision 1, deadline
    /// 900ms, next renewal at 300ms.
    fn lead() -> (Solo, Lease) {
        let (mut s, nonce) = Solo::new();
        let lease = our_lease(nonce, 1);
        let out = s.feed(Input::Acquire(Ok(Acquired::Won(lease.clone()))));
        assert_eq!(
            out[0],
            Output::BeginTerm {
                id: 1,
                lease: lease.clone(),
                deadline: at(ms(900)),
            }
        );
        assert!(s.core.is_leading());
        assert_eq!(s.wake(), Some(ms(300)));
        (s, lease)
    }

    fn at(&mut self, t: u64) -> &mut Solo {
        self.now = ms(t);
        self
    }

    fn feed(&mut self, input: Input) -> Vec<Output> {
        self.core.handle(at(self.now), input)
    }

    fn tick(&mut self) -> Vec<Output> {
        self.feed(Input::Tick)
    }

    fn wake(&self) -> Option<Duration> {
        self.core.next_wake().map(since_base)
    }
}

fn our_lease(nonce: Nonce, token: u64) -> Lease {
    Lease::new(&claim(0, nonce), FencingToken::new(token), 1)
}

fn reset() -> BackendError {
    BackendError::unavailable("connection reset")
}

#[test]
fn lost_acquire_reply_is_adopted_through_a_read_back() {
    let (mut c, nonce) = Solo::new();
    // The connection breaks: the acquire may or may not have taken effect.
    let out = c.at(40).feed(Input::Acquire(Err(reset())));
    assert_eq!(out, vec![Output::ReadHolder { timeout: RENEW }]);
    assert!(!c.core.is_leading());

    // The store shows our nonce: it did. The term's deadline counts from
    // when the acquire was sent (0ms), not from the read.
    let lease = our_lease(nonce, 1);
    let out = c
        .at(60)
        .feed(Input::Holder(Ok(Some(lease.holder(Some(ms(940)))))));
    assert!(out.contains(&Output::BeginTerm {
        id: 1,
        lease,
        deadline: at(ms(900)),
    }));
    assert!(c.core.is_leading());
}

#[test]
fn lost_acquire_reply_with_someone_else_in_the_store_follows() {
    let (mut c, _) = Solo::new();
    c.at(40).feed(Input::Acquire(Err(reset())));
    let other = Lease::new(&claim(1, Nonce::from_u128(1)), FencingToken::new(1), 1);
    let out = c
        .at(60)
        .feed(Input::Holder(Ok(Some(other.holder(Some(ms(700)))))));
    assert!(!out.iter().any(|o| matches!(o, Output::BeginTerm { .. })));
    // It tries again when that lease would expire.
    assert_eq!(c.wake(), Some(ms(760)));
}

#[test]
fn lost_renewal_reply_with_a_newer_revision_in_the_store_extends() {
    let (mut c, l1) = Solo::lead();
    let out = c.at(300).tick();
    assert_eq!(
        out,
        vec![Output::Renew {
            lease: l1.clone(),
            timeout: ms(600),
        }]
    );
    let out = c.at(320).feed(Input::Renew(Err(reset())));
    assert_eq!(out, vec![Output::ReadHolder { timeout: RENEW }]);

    // The store moved to a new revision of our lease: the renewal sent at
    // 300ms took effect, so the deadline is 300 + ttl - drift.
    let l2 = l1.with_revision(2);
    let out = c
        .at(330)
        .feed(Input::Holder(Ok(Some(l2.holder(Some(ms(970)))))));
    assert_eq!(
        out,
        vec![Output::Extend {
            id: 1,
            deadline: at(ms(1200)),
        }]
    );
    // The next renewal is one interval later, with the new revision.
    assert_eq!(c.wake(), Some(ms(630)));
    let out = c.at(630).tick();
    assert_eq!(
        out,
        vec![Output::Renew {
            lease: l2,
            timeout: ms(570),
        }]
    );
}

/// A renewal that waited 20 ms in a batch, was applied by the store at
/// 320 ms and answered at 325 ms extends the term from 300 ms, when the
/// machine asked for it: the store's expiry (320 + ttl) is later than
/// what the machine believes, never earlier.
#[test]
fn a_renewal_that_waited_in_a_batch_extends_from_when_it_was_asked_for() {
    let (mut c, l1) = Solo::lead();
    assert_eq!(
        c.at(300).tick(),
        vec![Output::Renew {
            lease: l1.clone(),
            timeout: ms(600),
        }]
    );
    let out = c
        .at(325)
        .feed(Input::Renew(Ok(Renewed::Renewed(l1.with_revision(2)))));
    assert_eq!(
        out,
        vec![Output::Extend {
            id: 1,
            deadline: at(ms(300) + TTL - DRIFT),
        }]
    );
    // A batched renewal whose budget ran out in the queue is answered
    // `Timeout` without being sent: ambiguous like any timeout, the
    // machine reads the key back.
    assert_eq!(c.wake(), Some(ms(625)));
    assert!(matches!(c.at(625).tick()[..], [Output::Renew { .. }]));
    let out = c
        .at(630)
        .feed(Input::Renew(Err(BackendError::Timeout(ms(575)))));
    assert!(matches!(out[..], [Output::ReadHolder { .. }]), "{out:?}");
}

/// A renewal answered by a request sent before it (a shared keep-alive)
/// credits that earlier instant and schedules the next renewal one
/// interval after it; one sent after the call credits the call; one so
/// old that its interval has passed moves nothing and renews one interval
/// from now.
#[test]
fn a_shared_renewal_credits_the_earlier_send_time_and_keeps_in_step() {
    let (mut c, l1) = Solo::lead();
    assert_eq!(
        c.at(300).tick(),
        vec![Output::Renew {
            lease: l1.clone(),
            timeout: ms(600),
        }]
    );
    // Answered by a keep-alive sent at 200ms: deadline 200 + ttl - drift,
    // next renewal at 200 + 300.
    let out = c
        .at(320)
        .feed(Input::Renew(Ok(Renewed::SentAt(l1.clone(), at(ms(200))))));
    assert_eq!(
        out,
        vec![Output::Extend {
            id: 1,
            deadline: at(ms(1100)),
        }]
    );
    assert_eq!(c.wake(), Some(ms(500)));

    // Sent at 500ms, answered by one the backend says it sent at 700ms:
    // the campaign credits its own 500ms.
    assert_eq!(
        c.at(500).tick(),
        vec![Output::Renew {
            lease: l1.clone(),
            timeout: ms(600),
        }]
    );
    let out = c
        .at(510)
        .feed(Input::Renew(Ok(Renewed::SentAt(l1.clone(), at(ms(700))))));
    assert_eq!(
        out,
        vec![Output::Extend {
            id: 1,
            deadline: at(ms(1400)),
        }]
    );
    assert_eq!(c.wake(), Some(ms(800)));

    // A stale instant (0ms): the deadline stays, the next renewal is one
    // interval from now.
    assert_eq!(
        c.at(800).tick(),
        vec![Output::Renew {
            lease: l1.clone(),
            timeout: ms(600),
        }]
    );
    let out = c
        .at(810)
        .feed(Input::Renew(Ok(Renewed::SentAt(l1.clone(), at(ms(0))))));
    assert_eq!(out, vec![]);
    assert_eq!(c.wake(), Some(ms(1110)));
    assert!(c.core.is_leading());

    // Someone else's lease in a SentAt is a lost term.
    let other = our_lease(Nonce::from_u128(99), 2);
    assert_eq!(c.at(1110).tick().len(), 1);
    let out = c
        .at(1120)
        .feed(Input::Renew(Ok(Renewed::SentAt(other, at(ms(1110))))));
    assert!(
        out.iter().any(|o| matches!(o, Output::CancelTerm { .. })),
        "{out:?}"
    );
}

/// With a watch that reports expiry, a follower that saw the holder with
/// no expiry hint sets no timer: the watch will say when the lease ends
/// (`Released`) or that it broke (`Resync`, after which the follower goes
/// by the hints of what it reads).
#[test]
fn a_follower_without_a_hint_waits_for_a_watch_that_reports_expiry() {
    let (mut c, _) = Solo::new();
    c.core.set_watch_reports_expiry(true);
    let year = crate::config::MAX_INTERVAL;
    let other = Lease::new(&claim(1, Nonce::from_u128(5)), FencingToken::new(1), 1);
    let out = c
        .at(10)
        .feed(Input::Acquire(Ok(Acquired::Held(other.holder(None)))));
    assert!(
        !out.iter()
            .any(|o| matches!(o, Output::Acquire { .. } | Output::ReadHolder { .. })),
        "{out:?}"
    );
    assert!(c.wake().is_some_and(|w| w >= year), "{:?}", c.wake());
    let out = c.at(500).feed(Input::Watch(WatchEvent::Updated(
        key(),
        Some(other.with_revision(2).holder(None)),
    )));
    assert!(
        !out.iter().any(|o| matches!(o, Output::Acquire { .. })),
        "{out:?}"
    );
    assert!(c.wake().is_some_and(|w| w >= year), "{:?}", c.wake());

    // The watch broke: the hub's Resync makes it read now, and a read
    // with a hint sets the timer to it.
    let out = c.at(600).feed(Input::Watch(WatchEvent::Resync));
    assert!(
        out.iter().any(|o| matches!(o, Output::Acquire { .. })) || {
            let out = c.at(601).tick();
            out.iter().any(|o| matches!(o, Output::Acquire { .. }))
        },
        "a Resync should make the follower try"
    );
    c.at(610).feed(Input::Acquire(Ok(Acquired::Held(
        other.holder(Some(ms(800))),
    ))));
    assert!(
        c.wake().is_some_and(|w| w >= ms(1410) && w < ms(1500)),
        "{:?}",
        c.wake()
    );

    // Without a watch that reports expiry, a hint-less holder means a
    // retry interval.
    let (mut c, _) = Solo::new();
    c.at(10)
        .feed(Input::Acquire(Ok(Acquired::Held(other.holder(None)))));
    assert_eq!(c.wake(), Some(ms(10) + RETRY));
}

#[test]
fn lost_renewal_reply_with_the_same_revision_retries_with_backoff() {
    let (mut c, l1) = Solo::lead();
    c.at(300).tick();
    c.at(320).feed(Input::Renew(Err(reset())));
    // The store still has the old revision: the renewal did not land.
    let out = c
        .at(330)
        .feed(Input::Holder(Ok(Some(l1.holder(Some(ms(670)))))));
    assert_eq!(out, vec![]);
    // Retried after the minimum backoff, well before the 900ms deadline.
    assert_eq!(c.wake(), Some(ms(380)));
    let out = c.at(380).tick();
    assert_eq!(
        out,
        vec![Output::Renew {
            lease: l1.clone(),
            timeout: ms(520),
        }]
    );
    // A second failure backs off twice as long.
    c.at(390).feed(Input::Renew(Err(reset())));
    c.at(400)
        .feed(Input::Holder(Ok(Some(l1.holder(Some(ms(600)))))));
    assert_eq!(c.wake(), Some(ms(500)));
    assert!(c.core.is_leading());
}

#[test]
fn deadline_passing_while_a_renewal_hangs_cancels_before_the_store_expires() {
    // Acquired with a call sent at 0ms: the store keeps the lease until at
    // least 1000ms.
    let (mut c, l1) = Solo::lead();
    let out = c.at(300).tick();
    // The renewal may take until the deadline, no longer.
    assert_eq!(
        out,
        vec![Output::Renew {
            lease: l1.clone(),
            timeout: ms(600),
        }]
    );
    // No reply. At the deadline (900ms, a drift margin before the store's
    // expiry) the term is cancelled.
    assert_eq!(c.wake(), Some(ms(900)));
    let out = c.at(900).tick();
    assert!(out.contains(&Output::CancelTerm {
        id: 1,
        reason: EndReason::Deadline,
    }));
    assert!(!c.core.is_leading());
    // The hung call times out; the lease is released, with a timeout that
    // ends when the store expires it anyway.
    let out = c
        .at(900)
        .feed(Input::Renew(Err(BackendError::Timeout(ms(600)))));
    assert_eq!(
        out,
        vec![Output::Release {
            lease: l1,
            timeout: ms(100),
        }]
    );
}

#[test]
fn shutdown_drains_the_work_while_renewing_then_releases_and_stops() {
    let (mut c, l1) = Solo::lead();
    assert_eq!(c.at(10).feed(Input::WorkStarted(1)), vec![]);
    let out = c.at(100).feed(Input::Stop(StopKind::Shutdown));
    assert_eq!(
        out[0],
        Output::CancelTerm {
            id: 1,
            reason: EndReason::Shutdown,
        }
    );
    assert!(!out.iter().any(|o| matches!(o, Output::Release { .. })));

    // The work is still running: the lease is renewed as usual.
    let out = c.at(300).tick();
    assert_eq!(
        out,
        vec![Output::Renew {
            lease: l1.clone(),
            timeout: ms(600),
        }]
    );
    let l2 = l1.with_revision(2);
    let out = c
        .at(310)
        .feed(Input::Renew(Ok(Renewed::Renewed(l2.clone()))));
    assert_eq!(
        out,
        vec![Output::Extend {
            id: 1,
            deadline: at(ms(1200)),
        }]
    );

    // The work returns: release, then stop.
    let out = c.at(400).feed(Input::WorkEnded(1));
    assert!(out.contains(&Output::Release {
        lease: l2,
        timeout: RENEW,
    }));
    assert!(!out.iter().any(|o| matches!(o, Output::Stopped { .. })));
    let out = c.at(410).feed(Input::Release(Ok(())));
    let ended = out.iter().position(|o| *o == Output::TermEnded { id: 1 });
    let stopped = out
        .iter()
        .position(|o| *o == Output::Stopped { error: None });
    assert!(ended.is_some() && ended < stopped, "{out:?}");
    assert!(c.core.is_stopped());
    assert_eq!(c.wake(), None);
}

#[test]
fn resign_releases_then_follows_quietly() {
    let (mut c, l1) = Solo::lead();
    // No work runs: straight to releasing.
    let out = c.at(100).feed(Input::Stop(StopKind::Resign));
    assert!(out.contains(&Output::CancelTerm {
        id: 1,
        reason: EndReason::Resign,
    }));
    assert!(out.contains(&Output::Release {
        lease: l1,
        timeout: RENEW,
    }));
    let out = c.at(110).feed(Input::Release(Ok(())));
    assert!(out.contains(&Output::TermEnded { id: 1 }));
    assert!(!c.core.is_stopped() && !c.core.is_leading());

    // Quiet for one retry interval: the key's Released event (its own
    // release) does not bring it straight back.
    assert_eq!(c.wake(), Some(ms(310)));
    let out = c.at(150).feed(Input::Watch(WatchEvent::Released(key())));
    assert_eq!(out, vec![]);
    assert_eq!(c.wake(), Some(ms(310)));
    // Then it campaigns again.
    let out = c.at(310).tick();
    assert!(
        matches!(out.as_slice(), [Output::Acquire { .. }]),
        "{out:?}"
    );
}

/// Found by `exhaustive_faults`. A renewal lands but its reply is lost, the
/// read-back times out, a second renewal fails without landing, and the
/// next read-back sees the first renewal's revision: that proves only that
/// a renewal sent at 300ms or later landed, so the store may expire the
/// lease at 1300ms. Crediting the renewal sent at 650ms instead (deadline
/// 1550ms) lets another candidate lead from 1300ms while this one still
/// believes it leads.
#[test]
fn a_read_back_credits_no_later_renewal_than_the_one_that_may_have_landed() {
    let (mut c, l1) = Solo::lead();
    // Renewal #1 lands at 300ms (the store's expiry is now 1300ms); its
    // reply is lost.
    c.at(300).tick();
    c.at(300).feed(Input::Renew(Err(reset())));
    // The read-back times out; retry after the backoff.
    c.at(600)
        .feed(Input::Holder(Err(BackendError::Timeout(RENEW))));
    assert_eq!(c.wake(), Some(ms(650)));
    // Renewal #2 fails without landing.
    let out = c.at(650).tick();
    assert!(matches!(out.as_slice(), [Output::Renew { .. }]), "{out:?}");
    c.at(650).feed(Input::Renew(Err(reset())));
    // The read-back shows renewal #1's revision.
    let l2 = l1.with_revision(2);
    let out = c
        .at(650)
        .feed(Input::Holder(Ok(Some(l2.holder(Some(ms(650)))))));
    for o in &out {
        if let Output::Extend { deadline, .. } = o {
            let deadline = since_base(*deadline);
            assert!(
                deadline + DRIFT <= ms(1300),
                "deadline {} while the store may expire the lease at 1300ms",
                show_t(deadline)
            );
        }
    }
}

/// Found by the model once it knew the driver's order: a renewal reply
/// that arrives at the very instant of the deadline is handled before the
/// deadline's timer. It must end the term, not extend it: `Term::is_valid`
/// may already have said `false`, and a term is never revived.
#[test]
fn a_renewal_reply_handled_at_the_deadline_ends_the_term() {
    let (mut c, l1) = Solo::lead();
    c.at(300).tick();
    // The reply (the renewal landed) reaches the driver at 900ms, the
    // deadline, before the timer does.
    let out = c
        .at(900)
        .feed(Input::Renew(Ok(Renewed::Renewed(l1.with_revision(2)))));
    assert!(
        !out.iter().any(|o| matches!(o, Output::Extend { .. })),
        "{out:?}"
    );
    assert!(out.contains(&Output::CancelTerm {
        id: 1,
        reason: EndReason::Deadline,
    }));
    assert!(!c.core.is_leading());
}

/// Work that returns once the deadline has passed did not finish while
/// leading: the term ends as lost (not "job done", so no quiet period, and
/// the runner campaigns again).
#[test]
fn work_returning_after_the_deadline_ends_the_term_as_lost() {
    let (mut c, _) = Solo::lead();
    c.at(0).feed(Input::WorkStarted(1));
    c.at(300).tick(); // a renewal that never answers
    let out = c.at(900).feed(Input::WorkEnded(1));
    assert!(out.contains(&Output::CancelTerm {
        id: 1,
        reason: EndReason::Deadline,
    }));
}

/// A shutdown while an acquire hangs returns within one call timeout (the
/// renew interval), not the acquire's own timeout (ttl - drift).
#[test]
fn a_shutdown_during_a_hanging_acquire_stops_within_one_call_timeout() {
    let (mut c, _) = Solo::new();
    let out = c.at(10).feed(Input::Stop(StopKind::Shutdown));
    assert!(!out.iter().any(|o| matches!(o, Output::Stopped { .. })));
    assert_eq!(c.wake(), Some(ms(10) + RENEW));
    let out = c.at(310).tick();
    assert!(
        out.iter().any(|o| matches!(o, Output::Stopped { .. })),
        "{out:?}"
    );
    assert!(c.core.is_stopped());
}

/// A shutdown whose work has returned while a renewal hangs: the release
/// waits for the renewal at most until one call timeout after the stop
/// could go on without the work, then the campaign stops anyway.
#[test]
fn a_shutdown_with_a_hanging_renewal_stops_within_one_call_timeout() {
    let (mut c, _) = Solo::lead();
    c.at(0).feed(Input::WorkStarted(1));
    let out = c.at(300).tick();
    assert!(matches!(out.as_slice(), [Output::Renew { .. }]), "{out:?}");
    // Shut down at 310ms: the token fires and the work drains, returning
    // at 320ms. The renewal (timeout 600ms) still hangs.
    c.at(310).feed(Input::Stop(StopKind::Shutdown));
    c.at(320).feed(Input::WorkEnded(1));
    assert_eq!(c.wake(), Some(ms(320) + RENEW));
    let out = c.at(620).tick();
    assert!(
        out.iter().any(|o| matches!(o, Output::Stopped { .. })),
        "{out:?}"
    );
}

/// `drain_timeout(Duration::MAX)` means no limit: a drain never overflows
/// the clock, and lingering work is still dropped before the store can let
/// anyone else in.
#[test]
fn an_unlimited_drain_never_overflows_and_still_drops_work_by_the_deadline() {
    let t = Timing {
        drain_timeout: Duration::MAX,
        ..timing()
    };
    let mut c = Solo {
        core: Core::new(&t, 7),
        now: Duration::ZERO,
    };
    c.feed(Input::Start);
    let out = c.feed(Input::Setup(Ok(None)));
    let nonce = out
        .iter()
        .find_map(|o| match o {
            Output::Acquire { nonce, .. } => Some(*nonce),
            _ => None,
        })
        .unwrap_or_else(|| panic!("no acquire in {out:?}"));
    c.feed(Input::Acquire(Ok(Acquired::Won(our_lease(nonce, 1)))));
    c.feed(Input::WorkStarted(1));
    c.at(100).feed(Input::Stop(StopKind::Resign));
    // Renewals go on during the drain; with none confirmed the deadline
    // (900ms) ends the term and the work is dropped by 950ms.
    let mut aborted = None;
    for t in (100..=1000).step_by(10) {
        let out = c.at(t).tick();
        if out.contains(&Output::AbortWork { id: 1 }) {
            aborted = Some(t);
            break;
        }
    }
    assert_eq!(aborted, Some(950));
}

/// Followers woken by one release do not all call at the same instant:
/// each waits a random spread of at most 1 ms.
#[test]
fn released_events_wake_followers_at_spread_instants() {
    let t = Timing {
        jitter: 0.1,
        ..timing()
    };
    let mut wakes = Vec::new();
    for seed in 1..=8 {
        let mut c = Solo {
            core: Core::new(&t, seed),
            now: Duration::ZERO,
        };
        c.feed(Input::Start);
        c.feed(Input::Setup(Ok(None)));
        let other = Lease::new(&claim(1, Nonce::from_u128(1)), FencingToken::new(1), 1);
        c.at(10).feed(Input::Acquire(Ok(Acquired::Held(
            other.holder(Some(ms(900))),
        ))));
        let out = c.at(100).feed(Input::Watch(WatchEvent::Released(key())));
        let wake = match c.wake() {
            Some(w) => w,
            None => panic!("no wake-up after a release: {out:?}"),
        };
        assert!(wake >= ms(100) && wake <= ms(101), "{}", show_t(wake));
        wakes.push(wake);
    }
    wakes.sort();
    wakes.dedup();
    assert!(wakes.len() > 1, "every follower wakes at the same instant");
}
