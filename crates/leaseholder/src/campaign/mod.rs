//! The campaign: one spawned task per campaigning [`Leader`](crate::Leader)
//! that drives the pure state machine in [`core`] against the store.
//!
//! The task owns everything with a deadline: the one store call in flight
//! (bounded by a timeout the machine chooses), the timers, the key's watch
//! subscription, and the user's work, which it spawns as a task of its own
//! so that a panic or a slow poll there never stops the campaign, and so
//! that it can wait for the work to have really stopped before it releases
//! the lease.

pub(crate) mod core;
#[cfg(test)]
mod model;
pub(crate) mod registry;
mod telemetry;

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use futures_channel::mpsc;
use futures_util::StreamExt;
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use self::core::{Core, Input, Output, StopKind};
use self::telemetry::{Call, Telemetry};
use crate::backend::{Backend, Candidate, Claim, Key, LeaderId, Renewed};
use crate::config::LeaderConfig;
use crate::error::BackendError;
use crate::error::BoxError;
use crate::state::State;
use crate::term::Term;

pub(crate) type WorkFuture = Pin<Box<dyn Future<Output = Result<(), BoxError>> + Send + 'static>>;
type OpFuture = Pin<Box<dyn Future<Output = Input> + Send + 'static>>;

/// Why a campaign stopped on its own.
#[derive(Clone, Debug)]
pub(crate) enum Fatal {
    /// A fatal store error (a panic in a backend call included).
    Store(self::core::FatalError),
    /// The campaign task panicked; the panic's message.
    Panicked(Arc<str>),
}

/// Test-only: see [`Shared::on_output`].
#[cfg(test)]
pub(crate) type OutputHook = Box<dyn Fn(&Output) + Send + Sync>;

/// Requests to the campaign task.
pub(crate) enum Command {
    Stop(StopKind),
    /// Run `work` in term `term`, if that term is still live.
    Spawn {
        term: u64,
        work: WorkFuture,
        reply: oneshot::Sender<WorkOutcome>,
    },
    /// `resign_to`: nominate a live candidate, then resign.
    ResignTo(registry::Ask),
    /// `proclaim`: replace the lease's metadata within the term.
    Proclaim {
        metadata: bytes::Bytes,
        reply: oneshot::Sender<Proclaimed>,
    },
}

/// How a `proclaim` ended.
#[derive(Debug)]
pub(crate) enum Proclaimed {
    /// The store shows the new metadata.
    Done,
    /// Not leading (or the term is ending).
    NotLeading,
    /// The term ended before the store confirmed it.
    Lost(crate::backend::FencingToken),
}

/// How a piece of work ended.
#[derive(Debug)]
pub(crate) enum WorkOutcome {
    /// The term was no longer live; the work was not started.
    NotStarted,
    /// Returned `Ok`; `cancelled` tells whether its token had fired.
    Ok {
        cancelled: bool,
    },
    Err(BoxError),
    Panicked,
    /// Dropped by the campaign (drain timeout, or the run was abandoned).
    Aborted,
}

/// Whether a campaign runs.
#[derive(Clone, Debug)]
pub(crate) enum Run {
    NotStarted,
    Running,
    Stopped(Option<Fatal>),
}

/// What the `Leader` handles and the campaign task share.
pub(crate) struct Shared {
    pub(crate) config: LeaderConfig,
    /// Set for a `Leader::new` handle whose key was rejected.
    pub(crate) invalid: Option<crate::error::ConfigError>,
    pub(crate) key: Key,
    pub(crate) id: LeaderId,
    pub(crate) backend: Backend,
    pub(crate) state: watch::Sender<State>,
    pub(crate) term: watch::Sender<Option<Term>>,
    pub(crate) run: watch::Sender<Run>,
    pub(crate) control: Mutex<Control>,
    pub(crate) health: crate::health::HealthCell,
    /// Fires once the current work's future has been dropped (returned or
    /// aborted), so that the campaign's supervisor can wait for it after a
    /// panic.
    pub(crate) work_gone: Mutex<Option<CancellationToken>>,
    /// Test-only: called with every output before the driver acts on it
    /// (to inject a panic into the driver).
    #[cfg(test)]
    pub(crate) on_output: std::sync::OnceLock<OutputHook>,
}

#[derive(Default)]
pub(crate) struct Control {
    /// A `futures` channel rather than tokio's: tokio's allocates a block
    /// of 32 slots up front, per campaign (issue 17: bytes per key).
    pub(crate) commands: Option<mpsc::UnboundedSender<Command>>,
    pub(crate) task: Option<JoinHandle<()>>,
    pub(crate) shut_down: bool,
    pub(crate) busy: bool,
}

impl Shared {
    pub(crate) fn control(&self) -> MutexGuard<'_, Control> {
        // Each critical section is a few field assignments; a poisoned lock
        // leaves nothing half-done.
        self.control
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
    }

    /// Sends a command to the running campaign; `false` if none runs.
    pub(crate) fn command(&self, command: Command) -> bool {
        match &self.control().commands {
            Some(tx) => tx.unbounded_send(command).is_ok(),
            None => false,
        }
    }
}

/// Spawns the campaign task. The caller holds the control lock.
pub(crate) fn spawn(shared: &Arc<Shared>, control: &mut Control) {
    let (tx, rx) = mpsc::unbounded();
    control.commands = Some(tx);
    shared.run.send_replace(Run::Running);
    let span = tracing::info_span!("campaign", key = %shared.key, candidate = %shared.id);
    let seed = uuid::Uuid::new_v4().as_u64_pair().0;
    // Boxed: `supervise` holding the future by value would reserve room
    // for it twice in the task (a moved-from argument keeps its slot).
    let campaign = Box::pin(run(shared.clone(), shared.config.clone(), rx, seed));
    let task = tokio::spawn(supervise(shared.clone(), campaign).instrument(span));
    control.task = Some(task);
}

/// Runs the campaign and contains a panic in it: the term's token has
/// fired and the work has been aborted while the panic unwound (see the
/// `Drop` impls of [`Running`] and [`Work`]); here the work is awaited
/// until its future is really gone, then the campaign reports itself
/// stopped, so that no caller hangs and none is told `Ok`. A lease left in
/// the store expires there, after the work has stopped.
async fn supervise(shared: Arc<Shared>, campaign: Pin<Box<dyn Future<Output = ()> + Send>>) {
    use futures_util::FutureExt;
    let Err(payload) = std::panic::AssertUnwindSafe(campaign).catch_unwind().await else {
        return;
    };
    let message = crate::error::panic_message(&*payload);
    tracing::error!(%message, "the campaign panicked; it stops (the work was dropped)");
    let gone = lock(&shared.work_gone).take();
    if let Some(gone) = gone {
        gone.cancelled().await;
    }
    if let Some(term) = shared.term.send_replace(None) {
        term.cancel();
    }
    shared.health.set_work(None);
    shared.health.set_unknown(None);
    shared.health.publish(Instant::now());
    shared.state.send_replace(State::Stopped);
    let mut control = shared.control();
    control.commands = None;
    shared
        .run
        .send_replace(Run::Stopped(Some(Fatal::Panicked(message.into()))));
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poison| poison.into_inner())
}

/// The current term. Dropping it (a panic unwinding the campaign) fires
/// the work's token.
struct Running {
    term: Term,
}

impl Drop for Running {
    fn drop(&mut self) {
        self.term.cancel();
    }
}

/// The work's task. Dropping it (a panic unwinding the campaign) aborts
/// the task.
struct Work {
    term: u64,
    handle: JoinHandle<Result<(), BoxError>>,
    reply: Option<oneshot::Sender<WorkOutcome>>,
}

impl Drop for Work {
    fn drop(&mut self) {
        self.handle.abort();
    }
}

enum WorkEvent {
    Joined(Result<Result<(), BoxError>, tokio::task::JoinError>),
    RunnerGone,
}

async fn run(
    shared: Arc<Shared>,
    config: LeaderConfig,
    mut commands: mpsc::UnboundedReceiver<Command>,
    seed: u64,
) {
    let timing = config.timing;
    let mut core = Core::new(&timing, seed);
    core.set_watch_reports_expiry(shared.backend.watch_reports_expiry());
    let mut registry = config.candidacy.registry.then(|| {
        core.set_rank(shared.id, config.candidacy.holdoff);
        registry::Registry::new(
            shared.backend.clone(),
            shared.key.clone(),
            Candidate::new(
                shared.id,
                config.candidacy.priority,
                config.metadata.clone(),
            ),
            config.candidacy,
            timing.ttl,
            timing.renew_interval,
            seed.rotate_left(17),
        )
    });
    let mut subscription = shared.backend.subscribe(&shared.key);
    let mut op: Option<OpFuture> = None;
    let mut term: Option<Running> = None;
    let mut work: Option<Work> = None;
    let mut telemetry = Telemetry::new(&shared.key);
    // The store call in flight: which, and when it was sent.
    let mut call: Option<(Call, Instant)> = None;
    let mut last_renew: Option<Duration> = None;
    // The metadata of later claims: the builder's, until a proclaim.
    let mut metadata = config.metadata.clone();
    // Proclaims waiting for the store: the term, its token, the reply.
    let mut proclaims: Vec<(
        u64,
        crate::backend::FencingToken,
        oneshot::Sender<Proclaimed>,
    )> = Vec::new();
    // One timer for the loop's deadlines (the core's, the registry's,
    // health's), moved only when the earliest of them changes: a timer
    // made afresh on every pass costs a timer-wheel insert and removal per
    // event, per key (issue 17).
    let alarm = tokio::time::sleep_until(Instant::now());
    tokio::pin!(alarm);
    let mut alarm_at: Option<Instant> = None;
    let mut outputs = core.handle(Instant::now(), Input::Start);
    let fatal = loop {
        let mut stopped = None;
        for output in outputs.drain(..) {
            tracing::trace!(?output, "campaign output");
            #[cfg(test)]
            if let Some(hook) = shared.on_output.get() {
                hook(&output);
            }
            match output {
                Output::Setup => {
                    call = Some((Call::Setup, Instant::now()));
                    let backend = shared.backend.clone();
                    let limit = timing.renew_interval;
                    op = Some(Box::pin(async move {
                        Input::Setup(bounded(limit, backend.setup_at(limit)).await)
                    }));
                }
                Output::Acquire { nonce, timeout } => {
                    call = Some((Call::Acquire, Instant::now()));
                    let backend = shared.backend.clone();
                    let key = shared.key.clone();
                    let claim = Claim {
                        nonce,
                        id: shared.id,
                        metadata: metadata.clone(),
                        at: SystemTime::now(),
                    };
                    let ttl = timing.ttl;
                    op = Some(Box::pin(async move {
                        Input::Acquire(
                            bounded(timeout, backend.acquire_within(&key, &claim, ttl, timeout))
                                .await,
                        )
                    }));
                }
                Output::Renew { lease, timeout } => {
                    call = Some((Call::Renew, Instant::now()));
                    let backend = shared.backend.clone();
                    let key = shared.key.clone();
                    let ttl = timing.ttl;
                    op = Some(Box::pin(async move {
                        Input::Renew(
                            bounded(timeout, backend.renew_within(&key, &lease, ttl, timeout))
                                .await,
                        )
                    }));
                }
                Output::Proclaim {
                    lease,
                    metadata,
                    timeout,
                } => {
                    call = Some((Call::Renew, Instant::now()));
                    let backend = shared.backend.clone();
                    let key = shared.key.clone();
                    let ttl = timing.ttl;
                    op = Some(Box::pin(async move {
                        Input::Renew(
                            bounded(
                                timeout,
                                backend.proclaim_within(&key, &lease, &metadata, ttl, timeout),
                            )
                            .await,
                        )
                    }));
                }
                Output::Proclaimed { id } => {
                    for (_, _, reply) in extract(&mut proclaims, |p| p.0 == id) {
                        let _ = reply.send(Proclaimed::Done);
                    }
                }
                Output::Release { lease, timeout } => {
                    call = Some((Call::Release, Instant::now()));
                    let backend = shared.backend.clone();
                    let key = shared.key.clone();
                    op = Some(Box::pin(async move {
                        Input::Release(
                            bounded(timeout, backend.release_within(&key, &lease, timeout)).await,
                        )
                    }));
                }
                Output::ReadCandidates { last, timeout } => {
                    call = Some((Call::Candidates, Instant::now()));
                    let backend = shared.backend.clone();
                    let key = shared.key.clone();
                    op = Some(Box::pin(async move {
                        Input::Candidates(
                            bounded(timeout, registry::rank(&backend, &key, last, timeout)).await,
                        )
                    }));
                }
                Output::ReadHolder { timeout } => {
                    call = Some((Call::Holder, Instant::now()));
                    let backend = shared.backend.clone();
                    let key = shared.key.clone();
                    op = Some(Box::pin(async move {
                        Input::Holder(bounded(timeout, backend.holder_within(&key, timeout)).await)
                    }));
                }
                Output::BeginTerm {
                    id,
                    lease,
                    deadline,
                } => {
                    // The echo of our own renewals says nothing to a
                    // leader: not delivered while the term is live.
                    subscription.mute(Some(lease.nonce()));
                    let t = Term::new(shared.key.clone(), id, lease.token(), deadline);
                    shared.term.send_replace(Some(t.clone()));
                    term = Some(Running { term: t });
                    telemetry.term_began();
                    if let Some(r) = registry.as_mut() {
                        r.began(lease.token(), Instant::now());
                    }
                }
                Output::Extend { id, deadline } => {
                    if let Some(r) = term.as_ref().filter(|r| r.term.id() == id) {
                        let now = Instant::now();
                        let slack = r.term.deadline().saturating_duration_since(now);
                        telemetry.renewed(last_renew.take(), slack);
                        r.term.extend(deadline);
                        if work.as_ref().is_some_and(|w| w.term == id) {
                            shared.health.set_work(Some(deadline));
                        }
                    }
                }
                Output::CancelTerm { id, reason } => {
                    // A follower goes by every holder's events, its own
                    // old lease's too.
                    subscription.mute(None);
                    if let Some(r) = registry.as_mut() {
                        r.ended();
                    }
                    for (_, token, reply) in extract(&mut proclaims, |p| p.0 == id) {
                        let _ = reply.send(Proclaimed::Lost(token));
                    }
                    if let Some(r) = term.as_ref().filter(|r| r.term.id() == id) {
                        tracing::debug!(?reason, "cancelling the term's token");
                        if !r.term.is_cancelled() {
                            telemetry.term_ended(reason);
                        }
                        r.term.cancel();
                    }
                    shared.term.send_if_modified(|t| t.take().is_some());
                }
                Output::AbortWork { id } => {
                    if let Some(w) = work.as_ref().filter(|w| w.term == id) {
                        w.handle.abort();
                    }
                }
                Output::TermEnded { id } => {
                    if let Some(r) = term.take() {
                        if r.term.id() == id {
                            r.term.end();
                        } else {
                            term = Some(r);
                        }
                    }
                }
                Output::State(state) => {
                    shared.health.set_unknown(match &state.0 {
                        State::Unknown { since, .. } => Some(*since),
                        _ => None,
                    });
                    shared.state.send_replace(state.0);
                }
                Output::Stopped { error } => stopped = Some(error),
            }
        }
        // Health can change with time alone (work past its deadline, the
        // store down for a ttl): look again then.
        let health_at = shared.health.publish(Instant::now());
        if let Some(error) = stopped {
            break error;
        }
        if let Some(r) = registry.as_mut() {
            // Once armed, neither the core nor the hub is looked at again.
            if !r.is_armed() && core.is_set_up() {
                r.ready();
                if subscription.is_live() {
                    r.arm(Instant::now());
                }
            }
            r.start(Instant::now());
        }

        let wake = core.next_wake();
        let registry_wake = registry.as_ref().and_then(registry::Registry::wake);
        let next = [wake, registry_wake, health_at].into_iter().flatten().min();
        if next != alarm_at {
            if let Some(at) = next {
                alarm.as_mut().reset(at);
            }
            alarm_at = next;
        }
        let input = tokio::select! {
            biased;
            command = commands.next() => match command {
                Some(Command::Stop(kind)) => Input::Stop(kind),
                Some(Command::Spawn { term: id, work: fut, reply }) => {
                    match (&term, &work) {
                        (Some(r), None) if r.term.id() == id && r.term.is_valid() => {
                            shared.health.set_work(Some(r.term.deadline()));
                            let gone = CancellationToken::new();
                            *lock(&shared.work_gone) = Some(gone.clone());
                            let handle = tokio::spawn(async move {
                                let _gone = gone.drop_guard();
                                fut.await
                            });
                            work = Some(Work { term: id, handle, reply: Some(reply) });
                            Input::WorkStarted(id)
                        }
                        _ => {
                            let _ = reply.send(WorkOutcome::NotStarted);
                            continue;
                        }
                    }
                }
                Some(Command::Proclaim { metadata: new, reply }) => {
                    match term.as_ref().filter(|r| r.term.is_valid()) {
                        Some(r) => {
                            proclaims.push((r.term.id(), r.term.fencing_token(), reply));
                            metadata = new.clone();
                            if let Some(reg) = registry.as_mut() {
                                reg.set_metadata(new.clone());
                            }
                            Input::Proclaim(new)
                        }
                        None => {
                            let _ = reply.send(Proclaimed::NotLeading);
                            continue;
                        }
                    }
                }
                Some(Command::ResignTo(ask)) => match registry.as_mut() {
                    Some(r) => {
                        r.ask(ask);
                        continue;
                    }
                    None => {
                        let _ = ask.reply.send(registry::Handover::NotACandidate);
                        continue;
                    }
                },
                // Every handle is gone: nobody can stop us any more.
                None => Input::Stop(StopKind::Abandon),
            },
            event = work_event(&mut work) => match event {
                WorkEvent::Joined(joined) => {
                    let Some(mut w) = work.take() else { continue };
                    lock(&shared.work_gone).take();
                    shared.health.set_work(None);
                    // Whether the token had fired when the work returned; the
                    // machine has not reacted to the return yet.
                    // Past the deadline counts as lost even if the token has
                    // not been cancelled yet (work that checked `is_valid`).
                    let cancelled = term
                        .as_ref()
                        .filter(|r| r.term.id() == w.term)
                        .is_none_or(|r| !r.term.is_valid());
                    let outcome = match joined {
                        Ok(Ok(())) => WorkOutcome::Ok { cancelled },
                        Ok(Err(e)) => WorkOutcome::Err(e),
                        Err(e) if e.is_panic() => {
                            tracing::error!("the leader's work panicked");
                            WorkOutcome::Panicked
                        }
                        Err(_) => WorkOutcome::Aborted,
                    };
                    if let Some(reply) = w.reply.take() {
                        let _ = reply.send(outcome);
                    }
                    Input::WorkEnded(w.term)
                }
                WorkEvent::RunnerGone => {
                    // The runner was dropped: drop its work too. The machine
                    // hears of it when the task has really stopped.
                    if let Some(w) = work.as_mut() {
                        w.handle.abort();
                        w.reply = None;
                    }
                    continue;
                }
            },
            input = maybe(&mut op) => {
                op = None;
                if let Some((kind, sent)) = call.take() {
                    if let Some(e) = input.error() {
                        telemetry.store_error(kind, e);
                    } else if matches!(input, Input::Renew(Ok(Renewed::Renewed(_) | Renewed::SentAt(..)))) {
                        last_renew = Some(sent.elapsed());
                    }
                }
                input
            },
            () = &mut alarm, if alarm_at.is_some() => {
                // Fired: it must be reset before it is polled again.
                alarm_at = None;
                // Only the core's deadline is an input; the others are
                // looked at again at the top of the loop.
                if wake.is_some_and(|w| w <= Instant::now()) {
                    Input::Tick
                } else {
                    continue;
                }
            }
            done = next_registry(&mut registry) => {
                match registry.as_mut().and_then(|r| r.done(Instant::now(), done)) {
                    Some(input) => input,
                    None => continue,
                }
            }
            event = subscription.next() => {
                if let (crate::backend::WatchEvent::Candidates(_), Some(r)) = (&event, registry.as_mut()) {
                    r.changed(Instant::now());
                }
                Input::Watch(event)
            }
        };
        tracing::trace!(?input, "campaign input");
        outputs = core.handle(Instant::now(), input);
    };

    // Stopped: nothing of ours may outlive the campaign.
    if let Some(mut w) = work.take() {
        w.handle.abort();
        let _ = (&mut w.handle).await;
    }
    shared.health.set_work(None);
    shared.health.set_unknown(None);
    shared.health.publish(Instant::now());
    telemetry.stopped();
    if let Some(r) = term.take() {
        r.term.cancel();
        r.term.end();
    }
    shared.term.send_replace(None);
    if let Some(r) = registry.take() {
        r.deregister().await;
    }
    let mut control = shared.control();
    control.commands = None;
    shared
        .run
        .send_replace(Run::Stopped(fatal.map(Fatal::Store)));
}

/// Removes and returns the items of `v` that match.
fn extract<T>(v: &mut Vec<T>, mut matches: impl FnMut(&T) -> bool) -> Vec<T> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < v.len() {
        if matches(&v[i]) {
            out.push(v.remove(i));
        } else {
            i += 1;
        }
    }
    out
}

async fn next_registry(registry: &mut Option<registry::Registry>) -> registry::Done {
    match registry {
        Some(r) => r.next().await,
        None => std::future::pending().await,
    }
}

async fn work_event(work: &mut Option<Work>) -> WorkEvent {
    let Some(w) = work else {
        return std::future::pending().await;
    };
    tokio::select! {
        joined = &mut w.handle => WorkEvent::Joined(joined),
        () = closed(&mut w.reply) => WorkEvent::RunnerGone,
    }
}

async fn closed(reply: &mut Option<oneshot::Sender<WorkOutcome>>) {
    match reply {
        Some(reply) => reply.closed().await,
        None => std::future::pending().await,
    }
}

async fn maybe(op: &mut Option<OpFuture>) -> Input {
    match op {
        Some(f) => f.await,
        None => std::future::pending().await,
    }
}

async fn bounded<T>(
    limit: Duration,
    call: impl Future<Output = Result<T, BackendError>>,
) -> Result<T, BackendError> {
    let limit = limit.max(Duration::from_millis(1));
    tokio::time::timeout(limit, call)
        .await
        .unwrap_or(Err(BackendError::Timeout(limit)))
}
