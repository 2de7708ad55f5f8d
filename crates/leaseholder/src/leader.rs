//! [`Leader`]: the handle a service holds for one key.

use std::fmt;
use std::future::Future;
use std::sync::Arc;

use tokio::sync::{oneshot, watch};
use tokio_util::sync::CancellationToken;

use crate::backend::{Backend, Candidate, FencingToken, Holder, Key, LeaderId};
use crate::campaign::core::StopKind;
use crate::campaign::{self, Command, Fatal, Run, Shared, WorkOutcome};
use crate::config::{LeaderBuilder, LeaderConfig};
use crate::error::{BoxError, Error, Op};
use crate::health::Health;
use crate::state::{State, Status};
use crate::term::Term;

/// A candidate for the leadership of one key.
///
/// Cheap to clone; clones share the campaign. Build one with
/// [`Leader::builder`], run work while leading with
/// [`acquire_and_run`](Self::acquire_and_run), and observe it with
/// [`state`](Self::state).
///
/// ```
/// use std::time::Duration;
/// use leaseholder::{Backend, Leader, MemoryStore};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), leaseholder::Error> {
/// let store = MemoryStore::new();
/// let leader = Leader::builder("scheduler")
///     .backend(Backend::memory(&store))
///     .ttl(Duration::from_secs(10))
///     .build()?;
///
/// leader
///     .acquire_and_run(|term| async move {
///         // Leader-only work. `term` fires when leadership is lost.
///         println!("leading with fencing token {}", term.fencing_token());
///         Ok::<_, std::io::Error>(()) // done: release and return
///     })
///     .await?;
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct Leader {
    shared: Arc<Shared>,
}

impl Leader {
    /// Starts building a `Leader` for `key`.
    pub fn builder(key: impl Into<String>) -> LeaderBuilder {
        LeaderBuilder::new(key)
    }

    /// A `Leader` for `key` with default settings, in noleader's shape.
    ///
    /// It cannot fail here: if the key is invalid for the backend, the first
    /// call that campaigns returns [`Error::Config`]. Prefer
    /// [`Leader::builder`], which reports it at once.
    pub fn new(key: &str, backend: Backend) -> Leader {
        let builder = LeaderBuilder::new(key);
        match builder.validate(&backend) {
            Ok(config) => Leader::from_config(config, backend),
            Err(invalid) => Leader::with(builder.unchecked(), backend, Some(invalid)),
        }
    }

    /// A `Leader` for `key` on the NATS KV `bucket`, with default settings:
    /// noleader's `Leader::new_nats`. Same as
    /// `Leader::new(key, Backend::nats(client, bucket))`.
    ///
    /// ```no_run
    /// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
    /// let client = async_nats::connect("localhost:4222").await?;
    /// let leader = leaseholder::Leader::new_nats("scheduler", "leases", client);
    /// leader.setup().await?; // creates or validates the bucket
    /// # Ok(())
    /// # }
    /// ```
    #[cfg(feature = "nats")]
    #[cfg_attr(docsrs, doc(cfg(feature = "nats")))]
    pub fn new_nats(key: &str, bucket: &str, client: async_nats::Client) -> Leader {
        Leader::new(key, Backend::nats(client, bucket))
    }

    pub(crate) fn from_config(config: LeaderConfig, backend: Backend) -> Leader {
        Leader::with(config, backend, None)
    }

    fn with(
        config: LeaderConfig,
        backend: Backend,
        invalid: Option<crate::error::ConfigError>,
    ) -> Leader {
        let health = crate::health::HealthCell::new(config.timing.ttl, config.timing.drift_margin);
        Leader {
            shared: Arc::new(Shared {
                key: config.key.clone(),
                id: LeaderId::new(),
                config,
                invalid,
                backend,
                state: watch::Sender::new(State::Idle),
                term: watch::Sender::new(None),
                run: watch::Sender::new(Run::NotStarted),
                control: Default::default(),
                health,
                work_gone: Default::default(),
                #[cfg(test)]
                on_output: Default::default(),
            }),
        }
    }

    /// Test-only: `hook` sees every output of the campaign's machine before
    /// the driver acts on it (to inject a panic into the driver).
    #[cfg(test)]
    pub(crate) fn on_output(&self, hook: impl Fn(&campaign::core::Output) + Send + Sync + 'static) {
        let _ = self.shared.on_output.set(Box::new(hook));
    }

    /// The key this candidate campaigns for.
    pub fn key(&self) -> &Key {
        &self.shared.key
    }

    /// This candidate's id (a UUID v7, new for every `Leader`).
    pub fn leader_id(&self) -> LeaderId {
        self.shared.id
    }

    /// The settings this `Leader` was built with.
    pub fn config(&self) -> &LeaderConfig {
        &self.shared.config
    }

    /// A receiver of the campaign's [`State`]. Wait for a change with
    /// `changed()` or `wait_for(..)`.
    ///
    /// ```
    /// # use std::time::Duration;
    /// # use leaseholder::{Backend, Leader, MemoryStore};
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let store = MemoryStore::new();
    /// # let leader = Leader::builder("k").backend(Backend::memory(&store)).build()?;
    /// let runner = leader.clone();
    /// let task = tokio::spawn(async move { runner.start(Default::default()).await });
    /// let mut state = leader.state();
    /// state.wait_for(|s| s.is_leader()).await?;
    /// leader.shutdown().await?;
    /// task.await??;
    /// # Ok(())
    /// # }
    /// ```
    pub fn state(&self) -> watch::Receiver<State> {
        self.shared.state.subscribe()
    }

    /// Whether the campaign is in a state to alert on, computed now from
    /// what the campaign last recorded: cheap, and right even while the
    /// campaign task cannot run (work that blocks the runtime). See
    /// [`Health`].
    pub fn health(&self) -> Health {
        self.shared.health.now()
    }

    /// A watch of [`health`](Self::health), updated by the campaign task
    /// (at the moment health changes, when the task can run).
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() {
    /// # use leaseholder::{Backend, Leader, MemoryStore};
    /// # let leader = Leader::builder("k").backend(Backend::memory(&MemoryStore::new())).build().unwrap();
    /// let mut health = leader.health_watch();
    /// tokio::spawn(async move {
    ///     while health.changed().await.is_ok() {
    ///         let now = health.borrow_and_update().clone();
    ///         if !now.is_healthy() {
    ///             eprintln!("leaseholder: {now:?}"); // flip readiness, page someone
    ///         }
    ///     }
    /// });
    /// # }
    /// ```
    pub fn health_watch(&self) -> watch::Receiver<Health> {
        self.shared.health.subscribe()
    }

    /// [`Status::Leader`] while this candidate leads, else
    /// [`Status::Candidate`].
    pub fn is_leader(&self) -> Status {
        if self.fencing_token().is_some() {
            Status::Leader
        } else {
            Status::Candidate
        }
    }

    /// The current term's fencing token, while leading.
    pub fn fencing_token(&self) -> Option<FencingToken> {
        self.current_term().map(|t| t.fencing_token())
    }

    /// The current term, while leading.
    pub fn current_term(&self) -> Option<Term> {
        self.shared
            .term
            .borrow()
            .as_ref()
            .filter(|t| t.is_valid())
            .cloned()
    }

    /// Creates or validates what the store needs (bucket, table) now, so
    /// that a misconfigured or unsupported store shows at startup. The
    /// campaign also does this before it first acquires. Idempotent.
    pub async fn setup(&self) -> Result<(), Error> {
        if let Some(e) = &self.shared.invalid {
            return Err(Error::Config(e.clone()));
        }
        self.shared
            .backend
            .setup()
            .await
            .map(|_| ())
            .map_err(|e| self.backend_error(Op::Setup, Arc::new(e)))
    }

    /// Asks the store who leads the key now (one read).
    pub async fn current_leader(&self) -> Result<Option<Holder>, Error> {
        if let Some(e) = &self.shared.invalid {
            return Err(Error::Config(e.clone()));
        }
        let limit = self.shared.config.timing.renew_interval;
        match tokio::time::timeout(
            limit,
            self.shared.backend.holder_within(&self.shared.key, limit),
        )
        .await
        {
            Ok(Ok(holder)) => Ok(holder),
            Ok(Err(e)) => Err(self.backend_error(Op::Holder, Arc::new(e))),
            Err(_) => Err(self.backend_error(
                Op::Holder,
                Arc::new(crate::error::BackendError::Timeout(limit)),
            )),
        }
    }

    /// Campaigns and runs `work` while this candidate leads.
    ///
    /// `work` is called with a [`Term`] at the start of each term and its
    /// future is spawned as a task. What happens next:
    ///
    /// | event | behaviour |
    /// |---|---|
    /// | work returns `Ok` after its token was cancelled (leadership lost) | campaign again; run `work` again on the next term |
    /// | work returns `Ok` while still leading | release, return `Ok` (the job is done) |
    /// | work returns `Err(e)` | release, return [`Error::Work`] |
    /// | work panics | release, return [`Error::Panicked`] (the panic does not unwind into the campaign) |
    /// | [`shutdown()`](Self::shutdown) | cancel the token, keep renewing while the work drains, release, return `Ok` |
    /// | transient store errors | retried forever with backoff, visible in [`state`](Self::state) as [`State::Unknown`] |
    /// | fatal store errors | returned at once ([`Error::Backend`]) |
    ///
    /// # Cancel safety
    ///
    /// Dropping the returned future cancels the work's token, drops the
    /// work, and releases the lease in the background once the work has
    /// stopped. [`shutdown`](Self::shutdown) waits for that.
    ///
    /// # Errors
    ///
    /// Besides the table: [`Error::Config`] for a `Leader::new` handle with
    /// an invalid key, [`Error::AlreadyRunning`] if work already runs on this
    /// handle, [`Error::Shutdown`] after `shutdown()`.
    pub async fn acquire_and_run<F, Fut, E>(&self, work: F) -> Result<(), Error>
    where
        F: FnMut(Term) -> Fut,
        Fut: Future<Output = Result<(), E>> + Send + 'static,
        E: Into<BoxError>,
    {
        let busy = Busy::take(&self.shared)?;
        let owner = self.ensure_campaign()?;
        let result = self.run_work(work).await;
        if let Some(owner) = owner {
            owner.disarm();
            // The campaign was ours alone: stop it (the lease is already
            // released, or being drained by a shutdown).
            let stopped = self.stop_campaign(StopKind::Shutdown).await;
            if result.is_ok() {
                stopped?;
            }
        }
        drop(busy);
        result
    }

    /// Runs `work` whenever this candidate leads, like
    /// [`acquire_and_run`](Self::acquire_and_run) (same table), but does
    /// not campaign by itself: pair it with [`start`](Self::start), as with
    /// noleader. Returns `Ok` when the campaign is shut down.
    pub async fn do_while_leader<F, Fut, E>(&self, work: F) -> Result<(), Error>
    where
        F: FnMut(Term) -> Fut,
        Fut: Future<Output = Result<(), E>> + Send + 'static,
        E: Into<BoxError>,
    {
        if let Some(e) = &self.shared.invalid {
            return Err(Error::Config(e.clone()));
        }
        let _busy = Busy::take(&self.shared)?;
        self.run_work(work).await
    }

    /// Campaigns until `token` is cancelled, then shuts the campaign down
    /// (drain, release). Leadership shows in [`state`](Self::state) and
    /// [`is_leader`](Self::is_leader); run work with
    /// [`do_while_leader`](Self::do_while_leader).
    ///
    /// Returns early with an error if the store fails fatally. Dropping
    /// the future stops the campaign and releases in the background.
    pub async fn start(&self, token: CancellationToken) -> Result<(), Error> {
        let owner = self.ensure_campaign()?;
        let mut run = self.shared.run.subscribe();
        tokio::select! {
            () = token.cancelled() => {
                if let Some(owner) = owner {
                    owner.disarm();
                }
                self.stop_campaign(StopKind::Shutdown).await
            }
            result = wait_stopped(&mut run) => {
                if let Some(owner) = owner {
                    owner.disarm();
                }
                self.fatal(result)
            }
        }
    }

    /// Steps down now if leading: cancels the work's token, keeps renewing
    /// while the work drains (at most the drain timeout), releases the lease
    /// so another candidate takes over at once, then keeps campaigning.
    /// Returns when the lease is released. Does nothing if not leading.
    pub async fn resign(&self) -> Result<(), Error> {
        self.stopped_by()?;
        let Some(term) = self.shared.term.borrow().clone() else {
            return Ok(());
        };
        if !self.shared.command(Command::Stop(StopKind::Resign)) {
            return self.stopped_by();
        }
        let mut run = self.shared.run.subscribe();
        tokio::select! {
            () = term.ended() => Ok(()),
            result = wait_stopped(&mut run) => self.fatal(result),
        }
    }

    /// Steps down in favour of `candidate`, a live candidate in the key's
    /// registry: writes a nomination into this candidate's registry entry,
    /// then resigns as [`resign`](Self::resign) does. When the lease is
    /// released, the nominee tries first and every other candidate holds
    /// off (for at most its [`holdoff`](crate::LeaderBuilder::holdoff)), so
    /// the handover costs the nomination, the release and one acquire. If
    /// the nominee does not take the key within the hold-off, the others
    /// try. Returns when the lease is released; does nothing if not leading.
    ///
    /// # Errors
    ///
    /// [`Error::NotACandidate`] if `candidate` is not live in the registry
    /// (the leader keeps leading); [`Error::Config`] with
    /// [`ConfigError::NeedsRegistry`](crate::ConfigError::NeedsRegistry) if
    /// this leader was built without the registry; [`Error::Backend`] if the
    /// registry could not be read or written.
    ///
    /// ```
    /// # use std::time::Duration;
    /// # use leaseholder::{Backend, Leader, MemoryStore};
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let store = MemoryStore::new();
    /// let build = |p| Leader::builder("k").backend(Backend::memory(&store)).priority(p).build();
    /// let (a, b) = (build(1)?, build(1)?);
    /// let (ra, rb) = (a.clone(), b.clone());
    /// tokio::spawn(async move { ra.start(Default::default()).await });
    /// a.state().wait_for(|s| s.is_leader()).await?;
    /// tokio::spawn(async move { rb.start(Default::default()).await });
    /// # tokio::time::sleep(Duration::from_millis(50)).await; // b registers
    /// a.resign_to(b.leader_id()).await?;
    /// b.state().wait_for(|s| s.is_leader()).await?;
    /// # a.shutdown().await?; b.shutdown().await?;
    /// # Ok(())
    /// # }
    /// ```
    pub async fn resign_to(&self, candidate: LeaderId) -> Result<(), Error> {
        self.stopped_by()?;
        if !self.shared.config.candidacy.registry {
            return Err(Error::Config(crate::ConfigError::NeedsRegistry {
                setting: "resign_to",
            }));
        }
        let Some(term) = self.shared.term.borrow().clone() else {
            return Ok(());
        };
        let (reply, answer) = oneshot::channel();
        let ask = campaign::registry::Ask {
            to: candidate,
            reply,
        };
        if !self.shared.command(Command::ResignTo(ask)) {
            return self.stopped_by();
        }
        let mut run = self.shared.run.subscribe();
        let answer = tokio::select! {
            answer = answer => answer,
            result = wait_stopped(&mut run) => return self.fatal(result),
        };
        use campaign::registry::Handover;
        match answer {
            Ok(Handover::Handing) => {}
            Ok(Handover::NotLeading) => return Ok(()),
            Ok(Handover::NotACandidate) => {
                return Err(Error::NotACandidate {
                    key: self.shared.key.clone(),
                    candidate,
                });
            }
            Ok(Handover::Store(op, e)) => return Err(self.backend_error(op, Arc::new(e))),
            Err(_) => return self.stopped_by(),
        }
        tokio::select! {
            () = term.ended() => Ok(()),
            result = wait_stopped(&mut run) => self.fatal(result),
        }
    }

    /// Replaces this leader's metadata within its term, without a new
    /// election (as etcd's `Proclaim`): one write that renews the lease and
    /// stores `metadata` in it, so followers, observers and
    /// [`current_leader`](Self::current_leader) see it. Later terms of
    /// this handle and its registry entry carry it too. Returns once the
    /// store has confirmed it.
    ///
    /// # Errors
    ///
    /// [`Error::NotLeading`] if this candidate does not lead;
    /// [`Error::Lost`] if the term ended before the store confirmed it (it
    /// may still have been written); [`Error::Config`] with
    /// [`ConfigError::MetadataTooLarge`](crate::ConfigError::MetadataTooLarge)
    /// over 512 bytes; [`Error::Backend`] with
    /// [`BackendError::Unsupported`](crate::BackendError::Unsupported) on a
    /// backend that cannot ([`BackendEdge::supports_proclaim`](crate::BackendEdge::supports_proclaim)).
    ///
    /// ```
    /// # use leaseholder::{Backend, Leader, MemoryStore};
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let store = MemoryStore::new();
    /// let leader = Leader::builder("k").backend(Backend::memory(&store)).metadata("starting").build()?;
    /// let runner = leader.clone();
    /// tokio::spawn(async move { runner.start(Default::default()).await });
    /// leader.state().wait_for(|s| s.is_leader()).await?;
    /// leader.proclaim("serving at 10.0.0.7:8080").await?;
    /// let now = leader.current_leader().await?.expect("held");
    /// assert_eq!(now.metadata().as_ref(), b"serving at 10.0.0.7:8080");
    /// # leader.shutdown().await?;
    /// # Ok(())
    /// # }
    /// ```
    pub async fn proclaim(&self, metadata: impl Into<bytes::Bytes>) -> Result<(), Error> {
        self.stopped_by()?;
        let metadata = metadata.into();
        if metadata.len() > crate::backend::MAX_METADATA_LEN {
            return Err(Error::Config(crate::ConfigError::MetadataTooLarge {
                len: metadata.len(),
                max: crate::backend::MAX_METADATA_LEN,
            }));
        }
        if !self.shared.backend.supports_proclaim() {
            return Err(self.backend_error(
                Op::Proclaim,
                Arc::new(crate::BackendError::Unsupported {
                    what: format!("proclaim on the {} backend", self.shared.backend.name()),
                    needed: "a backend that implements BackendEdge::proclaim".to_owned(),
                }),
            ));
        }
        let not_leading = || Error::NotLeading {
            key: self.shared.key.clone(),
        };
        let (reply, answer) = oneshot::channel();
        if !self.shared.command(Command::Proclaim { metadata, reply }) {
            self.stopped_by()?;
            return Err(not_leading());
        }
        let mut run = self.shared.run.subscribe();
        let answer = tokio::select! {
            answer = answer => answer,
            result = wait_stopped(&mut run) => {
                self.fatal(result)?;
                return Err(not_leading());
            }
        };
        match answer {
            Ok(campaign::Proclaimed::Done) => Ok(()),
            Ok(campaign::Proclaimed::NotLeading) => Err(not_leading()),
            Ok(campaign::Proclaimed::Lost(token)) => Err(Error::Lost {
                key: self.shared.key.clone(),
                token,
            }),
            Err(_) => {
                self.stopped_by()?;
                Err(not_leading())
            }
        }
    }

    /// The live candidates in the key's registry (one read), in the order
    /// in which they would go first: highest priority, then the
    /// longest-waiting. Works whether or not this handle keeps an entry,
    /// on any backend that keeps a registry.
    ///
    /// ```
    /// # use leaseholder::{Backend, Leader, MemoryStore};
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let store = MemoryStore::new();
    /// let leader = Leader::builder("k").backend(Backend::memory(&store)).priority(5).build()?;
    /// let runner = leader.clone();
    /// tokio::spawn(async move { runner.start(Default::default()).await });
    /// leader.state().wait_for(|s| s.is_leader()).await?;
    /// let live = leader.candidates().await?;
    /// assert_eq!(live[0].id(), leader.leader_id());
    /// assert_eq!(live[0].priority(), 5);
    /// # leader.shutdown().await?;
    /// # Ok(())
    /// # }
    /// ```
    pub async fn candidates(&self) -> Result<Vec<Candidate>, Error> {
        if let Some(e) = &self.shared.invalid {
            return Err(Error::Config(e.clone()));
        }
        let limit = self.shared.config.timing.renew_interval;
        crate::observer::read_candidates(&self.shared.backend, &self.shared.key, limit)
            .await
            .map_err(|e| self.backend_error(Op::Candidates, Arc::new(e)))
    }

    /// Stops for good: cancels the work's token, keeps renewing while the
    /// work drains (at most the drain timeout; then the work is dropped),
    /// releases the lease, and stops campaigning. Idempotent. Later calls
    /// that would campaign return [`Error::Shutdown`].
    pub async fn shutdown(&self) -> Result<(), Error> {
        self.shared.control().shut_down = true;
        let result = self.stop_campaign(StopKind::Shutdown).await;
        self.shared.state.send_replace(State::Stopped);
        result
    }

    // ----- internals -------------------------------------------------------

    /// Starts the campaign unless one runs; `Some` if this call started it.
    fn ensure_campaign(&self) -> Result<Option<Owner<'_>>, Error> {
        if let Some(e) = &self.shared.invalid {
            return Err(Error::Config(e.clone()));
        }
        let mut control = self.shared.control();
        if control.shut_down {
            return Err(Error::Shutdown {
                key: self.shared.key.clone(),
            });
        }
        if control.commands.is_some() {
            return Ok(None);
        }
        campaign::spawn(&self.shared, &mut control);
        Ok(Some(Owner {
            shared: &self.shared,
            armed: true,
        }))
    }

    /// Asks the campaign to stop and waits until it has.
    async fn stop_campaign(&self, kind: StopKind) -> Result<(), Error> {
        let mut run = self.shared.run.subscribe();
        if !self.shared.command(Command::Stop(kind)) {
            // Not running: it never ran, was stopped, or stopped on its own
            // (then say why, every time).
            return self.stopped_by();
        }
        let result = wait_stopped(&mut run).await;
        self.fatal(result)
    }

    fn fatal(&self, stopped: Option<Fatal>) -> Result<(), Error> {
        match stopped {
            None => Ok(()),
            Some(Fatal::Store(crate::campaign::core::FatalError(op, source))) => {
                Err(self.backend_error(op, source))
            }
            Some(Fatal::Panicked(message)) => Err(Error::CampaignPanicked {
                key: self.shared.key.clone(),
                message: message.to_string(),
            }),
        }
    }

    /// The error that stopped the campaign on its own, if it did.
    fn stopped_by(&self) -> Result<(), Error> {
        match &*self.shared.run.borrow() {
            Run::Stopped(fatal) => self.fatal(fatal.clone()),
            _ => Ok(()),
        }
    }

    fn backend_error(&self, op: Op, source: Arc<crate::error::BackendError>) -> Error {
        Error::Backend {
            op,
            key: self.shared.key.clone(),
            source,
        }
    }

    async fn run_work<F, Fut, E>(&self, mut work: F) -> Result<(), Error>
    where
        F: FnMut(Term) -> Fut,
        Fut: Future<Output = Result<(), E>> + Send + 'static,
        E: Into<BoxError>,
    {
        let mut terms = self.shared.term.subscribe();
        let mut run = self.shared.run.subscribe();
        loop {
            let term = tokio::select! {
                biased;
                result = wait_stopped(&mut run) => return self.fatal(result),
                term = next_term(&mut terms) => term,
            };
            let fut = work(term.clone());
            let (reply, outcome) = oneshot::channel();
            let command = Command::Spawn {
                term: term.id(),
                work: Box::pin(async move { fut.await.map_err(Into::into) }),
                reply,
            };
            if !self.shared.command(command) {
                continue; // the campaign is gone; the next turn sees it
            }
            let outcome = outcome.await.unwrap_or(WorkOutcome::Aborted);
            if let WorkOutcome::NotStarted = outcome {
                // That term ended before the work could start.
                let id = term.id();
                let _ = terms
                    .wait_for(|t| t.as_ref().is_none_or(|t| t.id() != id))
                    .await;
                continue;
            }
            // Whatever happened, the term is over or ending: wait until the
            // lease is released (or known gone) before going on.
            tokio::select! {
                () = term.ended() => {}
                _ = wait_stopped(&mut run) => {}
            }
            match outcome {
                WorkOutcome::NotStarted
                | WorkOutcome::Aborted
                | WorkOutcome::Ok { cancelled: true } => continue,
                WorkOutcome::Ok { cancelled: false } => return Ok(()),
                WorkOutcome::Err(e) => return Err(Error::Work(e)),
                WorkOutcome::Panicked => {
                    return Err(Error::Panicked {
                        key: self.shared.key.clone(),
                    });
                }
            }
        }
    }
}

/// Waits for the next live term.
async fn next_term(terms: &mut watch::Receiver<Option<Term>>) -> Term {
    loop {
        if let Some(term) = terms.borrow_and_update().as_ref().filter(|t| t.is_valid()) {
            return term.clone();
        }
        if terms.changed().await.is_err() {
            return std::future::pending().await;
        }
    }
}

/// Waits until the campaign has stopped; its fatal error, if any.
async fn wait_stopped(run: &mut watch::Receiver<Run>) -> Option<Fatal> {
    let stopped = match run.wait_for(|r| matches!(r, Run::Stopped(_))).await {
        Ok(r) => match &*r {
            Run::Stopped(fatal) => Some(fatal.clone()),
            _ => Some(None),
        },
        Err(_) => None,
    };
    match stopped {
        Some(fatal) => fatal,
        // The sender lives in `Shared`, which outlives every receiver.
        None => std::future::pending().await,
    }
}

/// Marks the one work runner of a handle.
struct Busy<'a>(&'a Shared);

impl<'a> Busy<'a> {
    fn take(shared: &'a Shared) -> Result<Busy<'a>, Error> {
        let mut control = shared.control();
        if control.busy {
            return Err(Error::AlreadyRunning {
                key: shared.key.clone(),
            });
        }
        control.busy = true;
        Ok(Busy(shared))
    }
}

impl Drop for Busy<'_> {
    fn drop(&mut self) {
        self.0.control().busy = false;
    }
}

/// Held by the call that started the campaign: if that call's future is
/// dropped, the campaign is abandoned (work dropped, lease released in the
/// background, campaign stopped).
struct Owner<'a> {
    shared: &'a Shared,
    armed: bool,
}

impl Owner<'_> {
    fn disarm(mut self) {
        self.armed = false;
    }
}

impl Drop for Owner<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.shared.command(Command::Stop(StopKind::Abandon));
        }
    }
}

impl fmt::Debug for Leader {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Leader")
            .field("key", &self.shared.key)
            .field("id", &self.shared.id)
            .field("state", &*self.shared.state.borrow())
            .field("token", &self.fencing_token())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use tokio::time::Instant;

    use super::*;
    use crate::MemoryStore;
    use crate::campaign::core::Output;

    /// A panic in the driver itself, in the middle of a term whose work
    /// ignores its token: the token fires, the work is aborted and awaited,
    /// the campaign reports `Stopped` and every caller gets a typed error;
    /// a second candidate leads only after the work has stopped.
    #[tokio::test(start_paused = true)]
    async fn a_panic_in_the_driver_mid_term_is_contained() {
        let ttl = Duration::from_secs(2);
        let store = MemoryStore::new();
        let a = Leader::builder("job")
            .backend(Backend::memory(&store))
            .ttl(ttl)
            .build()
            .unwrap();
        a.on_output(|o| {
            if matches!(o, Output::Extend { .. }) {
                panic!("injected panic in the driver");
            }
        });
        let b = Leader::builder("job")
            .backend(Backend::memory(&store))
            .ttl(ttl)
            .build()
            .unwrap();
        // (who, start, end) of every work interval.
        type Log = Arc<Mutex<Vec<(&'static str, Instant, Option<Instant>)>>>;
        let log: Log = Arc::default();
        struct End(Log, usize);
        impl Drop for End {
            fn drop(&mut self) {
                self.0.lock().unwrap()[self.1].2 = Some(Instant::now());
            }
        }
        let run = |l: &Leader, who: &'static str| {
            let (l, log) = (l.clone(), log.clone());
            tokio::spawn(async move {
                l.acquire_and_run(move |term: Term| {
                    let log = log.clone();
                    async move {
                        let index = {
                            let mut log = log.lock().unwrap();
                            log.push((who, Instant::now(), None));
                            log.len() - 1
                        };
                        let _end = End(log, index);
                        let _ = term;
                        // Ignores its token: only an abort stops it.
                        std::future::pending::<()>().await;
                        Ok::<_, std::io::Error>(())
                    }
                })
                .await
            })
        };
        let ta = run(&a, "a");
        a.state().wait_for(State::is_leader).await.unwrap();
        let term = a.current_term().unwrap();
        let tb = run(&b, "b");
        let result = tokio::time::timeout(ttl * 10, ta).await.unwrap().unwrap();
        assert!(
            matches!(&result, Err(Error::CampaignPanicked { message, .. }) if message.contains("injected")),
            "{result:?}"
        );
        assert!(term.is_cancelled(), "the work's token did not fire");
        assert!(a.state().borrow().is_stopped());
        assert!(matches!(
            a.shutdown().await,
            Err(Error::CampaignPanicked { .. })
        ));
        assert!(matches!(
            a.resign().await,
            Err(Error::CampaignPanicked { .. })
        ));
        // The work was dropped before acquire_and_run returned.
        let a_end = log.lock().unwrap()[0].2.expect("a's work still runs");
        b.state().wait_for(State::is_leader).await.unwrap();
        b.shutdown().await.unwrap();
        tb.await.unwrap().unwrap();
        let log = log.lock().unwrap().clone();
        assert_eq!(log.len(), 2, "{log:?}");
        assert!(
            log[1].1 >= a_end,
            "b's work started before a's stopped: {log:?}"
        );
    }
}
