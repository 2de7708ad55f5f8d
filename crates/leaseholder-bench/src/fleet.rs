//! Candidates for one key: OS processes (NATS, PostgreSQL, Redis;
//! leaseholder or noleader) or tasks in this process (the memory backend),
//! driven the same way and reporting the same events.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use anyhow::Context;
use leaseholder::{Backend, Faults, Leader, MemoryStore};
use leaseholder_testkit::ChildGuard;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::ChildStdin;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::{Instant, timeout_at};

/// What happened to a candidate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Ev {
    Ready,
    Start(u64),
    Stop(u64),
    Exit,
    /// The bench asked it to shut down gracefully (SIGTERM, `shutdown()`).
    Term,
    /// The bench crashed it (SIGKILL; in process: link cut, task aborted).
    Kill,
}

#[derive(Clone, Copy, Debug)]
pub(crate) struct Event {
    pub(crate) who: usize,
    pub(crate) at: Instant,
    pub(crate) ev: Ev,
}

/// The events of a fleet: a channel, what was read but not waited for yet,
/// and everything, for the timelines.
pub(crate) struct Events {
    tx: mpsc::UnboundedSender<Event>,
    rx: mpsc::UnboundedReceiver<Event>,
    backlog: VecDeque<Event>,
    pub(crate) log: Vec<Event>,
}

impl Events {
    pub(crate) fn new() -> Events {
        let (tx, rx) = mpsc::unbounded_channel();
        Events {
            tx,
            rx,
            backlog: VecDeque::new(),
            log: Vec::new(),
        }
    }

    /// A sender for the events of an in-process candidate.
    pub(crate) fn sender(&self) -> mpsc::UnboundedSender<Event> {
        self.tx.clone()
    }

    /// Records an event the bench itself caused.
    pub(crate) fn mark(&mut self, who: usize, ev: Ev) {
        self.log.push(Event {
            who,
            at: Instant::now(),
            ev,
        });
    }

    /// The first event `want` matches, or `None` at `deadline`.
    pub(crate) async fn until(
        &mut self,
        deadline: Instant,
        mut want: impl FnMut(&Event) -> bool,
    ) -> Option<Event> {
        if let Some(at) = self.backlog.iter().position(&mut want) {
            return self.backlog.remove(at);
        }
        loop {
            let event = timeout_at(deadline, self.rx.recv()).await.ok()??;
            self.log.push(event);
            if want(&event) {
                return Some(event);
            }
            self.backlog.push_back(event);
        }
    }
}

/// The candidates of one key.
pub(crate) trait Fleet {
    fn events(&mut self) -> &mut Events;
    /// Starts a candidate and waits until it is connected (`READY`).
    async fn spawn(&mut self) -> anyhow::Result<usize>;
    /// Lets candidate `i` campaign.
    async fn go(&mut self, i: usize) -> anyhow::Result<()>;
    /// Asks candidate `i` to shut down gracefully.
    fn terminate(&mut self, i: usize) -> anyhow::Result<()>;
    /// Crashes candidate `i`.
    async fn kill(&mut self, i: usize) -> anyhow::Result<()>;
    /// Stops every candidate still running.
    async fn close(&mut self);
}

/// How long a fleet waits for any single event before giving up.
pub(crate) const SPAWN_WAIT: Duration = Duration::from_secs(30);

/// Candidate processes running `bench-candidate`.
pub(crate) struct ProcFleet {
    exe: PathBuf,
    kind: &'static str,
    url: String,
    key: String,
    ttl: Duration,
    procs: Vec<(ChildGuard, Option<ChildStdin>, bool)>,
    events: Events,
}

impl ProcFleet {
    pub(crate) fn new(
        exe: PathBuf,
        kind: &'static str,
        url: &str,
        key: &str,
        ttl: Duration,
    ) -> ProcFleet {
        ProcFleet {
            exe,
            kind,
            url: url.to_owned(),
            key: key.to_owned(),
            ttl,
            procs: Vec::new(),
            events: Events::new(),
        }
    }
}

fn parse(line: &str) -> Option<Ev> {
    let (word, arg) = line.split_once(' ').unwrap_or((line, ""));
    match word {
        "READY" => Some(Ev::Ready),
        "START" => arg.parse().ok().map(Ev::Start),
        "STOP" => arg.parse().ok().map(Ev::Stop),
        "EXIT" => Some(Ev::Exit),
        _ => None,
    }
}

impl Fleet for ProcFleet {
    fn events(&mut self) -> &mut Events {
        &mut self.events
    }

    async fn spawn(&mut self) -> anyhow::Result<usize> {
        let mut cmd = tokio::process::Command::new(&self.exe);
        cmd.args([
            self.kind,
            &self.url,
            &self.key,
            &self.ttl.as_millis().to_string(),
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped());
        let mut guard = ChildGuard::spawn(&mut cmd)
            .with_context(|| format!("starting {}", self.exe.display()))?;
        let stdout = guard
            .child_mut()
            .stdout
            .take()
            .context("the candidate's stdout")?;
        let stdin = guard.child_mut().stdin.take();
        let who = self.procs.len();
        let tx = self.events.tx.clone();
        tokio::spawn(async move {
            let mut lines = BufReader::new(stdout).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                if let Some(ev) = parse(&line) {
                    let _ = tx.send(Event {
                        who,
                        at: Instant::now(),
                        ev,
                    });
                }
            }
        });
        self.procs.push((guard, stdin, true));
        let deadline = Instant::now() + SPAWN_WAIT;
        self.events
            .until(deadline, |e| e.who == who && e.ev == Ev::Ready)
            .await
            .with_context(|| {
                format!("{} candidate {who} not ready in {SPAWN_WAIT:?}", self.kind)
            })?;
        Ok(who)
    }

    async fn go(&mut self, i: usize) -> anyhow::Result<()> {
        let stdin = self.procs[i].1.as_mut().context("stdin already closed")?;
        stdin.write_all(b"GO\n").await?;
        stdin.flush().await?;
        Ok(())
    }

    fn terminate(&mut self, i: usize) -> anyhow::Result<()> {
        self.events.mark(i, Ev::Term);
        self.procs[i].0.terminate()?;
        Ok(())
    }

    async fn kill(&mut self, i: usize) -> anyhow::Result<()> {
        self.events.mark(i, Ev::Kill);
        self.procs[i].0.kill().await?;
        self.procs[i].2 = false;
        Ok(())
    }

    async fn close(&mut self) {
        for (guard, _, alive) in &mut self.procs {
            if *alive {
                let _ = guard.terminate();
            }
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        for (guard, _, alive) in &mut self.procs {
            if *alive {
                let _ = timeout_at(deadline, guard.wait()).await;
                *alive = false;
            }
        }
    }
}

/// Candidates as tasks in this process, on one [`MemoryStore`]; each has
/// its own client (and fault injector) of the store.
pub(crate) struct MemFleet {
    store: MemoryStore,
    key: String,
    ttl: Duration,
    cands: Vec<(Leader, Faults, Option<JoinHandle<()>>)>,
    events: Events,
}

impl MemFleet {
    pub(crate) fn new(store: &MemoryStore, key: &str, ttl: Duration) -> MemFleet {
        MemFleet {
            store: store.clone(),
            key: key.to_owned(),
            ttl,
            cands: Vec::new(),
            events: Events::new(),
        }
    }
}

impl Fleet for MemFleet {
    fn events(&mut self) -> &mut Events {
        &mut self.events
    }

    async fn spawn(&mut self) -> anyhow::Result<usize> {
        let edge = self.store.backend();
        let faults = edge.faults();
        let leader = Leader::builder(self.key.clone())
            .backend(Backend::new(edge))
            .ttl(self.ttl)
            .build()?;
        leader.setup().await?;
        let who = self.cands.len();
        self.cands.push((leader, faults, None));
        self.events.mark(who, Ev::Ready);
        Ok(who)
    }

    async fn go(&mut self, i: usize) -> anyhow::Result<()> {
        let leader = self.cands[i].0.clone();
        self.cands[i].2 = Some(campaign(leader, i, self.events.sender()));
        Ok(())
    }

    fn terminate(&mut self, i: usize) -> anyhow::Result<()> {
        self.events.mark(i, Ev::Term);
        let leader = self.cands[i].0.clone();
        tokio::spawn(async move { leader.shutdown().await });
        Ok(())
    }

    async fn kill(&mut self, i: usize) -> anyhow::Result<()> {
        self.events.mark(i, Ev::Kill);
        self.cands[i].1.partition();
        if let Some(task) = self.cands[i].2.take() {
            task.abort();
        }
        Ok(())
    }

    async fn close(&mut self) {
        for (leader, _, task) in &mut self.cands {
            if task.is_some() {
                let _ = tokio::time::timeout(Duration::from_secs(5), leader.shutdown()).await;
            }
            if let Some(task) = task.take() {
                task.abort();
            }
        }
    }
}

/// Runs candidate `who`'s campaign in this process, reporting its terms'
/// starts and stops and its exit on `tx`, as a candidate process does on
/// its stdout.
pub(crate) fn campaign(
    leader: Leader,
    who: usize,
    tx: mpsc::UnboundedSender<Event>,
) -> JoinHandle<()> {
    let send = move |ev| {
        let _ = tx.send(Event {
            who,
            at: Instant::now(),
            ev,
        });
    };
    tokio::spawn(async move {
        let work_send = send.clone();
        let _ = leader
            .acquire_and_run(|term| {
                let send = work_send.clone();
                async move {
                    let token = term.fencing_token().get();
                    send(Ev::Start(token));
                    term.cancelled().await;
                    send(Ev::Stop(token));
                    Ok::<_, std::convert::Infallible>(())
                }
            })
            .await;
        send(Ev::Exit);
    })
}
