//! A candidate as its own process, for tests and benchmarks that kill or
//! pause one.
//!
//! `leaseholder-candidate <url> <key> <ttl-ms> [write-delay-ms]` campaigns
//! for `key` on NATS (`nats://…`), PostgreSQL (`postgres://…`), Redis
//! (`redis://…` or `redis+sentinel://…`), etcd
//! (`etcd://host:port[,host:port…][/prefix]`; whole-second ttls) or a SQLite
//! file (`sqlite:<path>`) and prints one line per event on stdout:
//!
//! - `READY` once the bucket is set up and the campaign starts;
//! - `START <token>` when its work starts, `STOP <token>` when the work
//!   returns (work dropped at its deadline prints nothing);
//! - `WRITE <token>` for every write the work sends to a downstream sink
//!   (one per 50 ms while it leads). Writes leave through an outbox that
//!   delivers each one `write-delay-ms` (default 0) after the work issued
//!   it, the way a request sits in a queue or a socket buffer: a write
//!   issued just before the process is paused is delivered after it
//!   resumes, and only a fenced sink can refuse it;
//! - `LOST <token>` when the campaign stops leading that term;
//! - `EXIT` after a clean shutdown. SIGTERM shuts down gracefully (drain,
//!   release).
//!
//! With `LEASEHOLDER_PRIORITY=<i32>` in its environment it keeps a
//! candidate-registry entry with that priority (and
//! `LEASEHOLDER_MIN_TERM_MS=<ms>` sets its minimum term), and prints
//! `REGISTERED` once the registry lists it. `LEASEHOLDER_METADATA=<text>`
//! sets the metadata that followers, observers and `leaseholder list` see.
//!
//! # A member of a peer group: `raft:<data-dir>`
//!
//! With the store `raft:<data-dir>` the process is a member of a
//! `leaseholder-raft` peer group (its Raft log fsynced in `<data-dir>`; a
//! process restarted on the same directory rejoins with its log and votes)
//! and campaigns on the group's backend. The member is configured by its
//! environment:
//!
//! - `LEASEHOLDER_RAFT_ID=<u64>`: this member's id;
//! - `LEASEHOLDER_RAFT_PEERS=1=127.0.0.1:7001,2=…`: every member's id and
//!   address, the same list for every member; this member listens on its
//!   own entry;
//! - `LEASEHOLDER_RAFT_ROUTES=2=127.0.0.1:7102,…` (optional): dial member
//!   N at that address instead (a proxy of this member's own per link);
//!   ids not yet in the group may be given, for members added later;
//! - `LEASEHOLDER_RAFT_JOIN=1` (optional): join a group that runs already
//!   rather than form one, and wait until a member adds this one.
//!
//! `READY` then means the member started (no setup is waited for: the
//! campaign sets the group up once it has a quorum). On top of the lines
//! above it prints `RAFT LEADER` when this member becomes the group's Raft
//! leader and `RAFT FOLLOWER` when it stops being it, and reads commands
//! from stdin, one a line: `MEMBERS 1=addr,2=addr,…` makes exactly those
//! the group's voting members (`PeerGroup::set_members`, at most 10 s) and
//! prints `MEMBERS OK` or `MEMBERS ERR <error>` (another line: `ERR
//! unknown command …`). On SIGTERM the group is
//! shut down after the campaign, before `EXIT`.

use std::io::Write;
use std::time::Duration;

use anyhow::Context;
use leaseholder::{
    Backend, EtcdBackend, Leader, PostgresBackend, RedisBackend, SqliteBackend, State,
};
use leaseholder_raft::PeerGroup;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::mpsc;
use tokio::time::Instant;

fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let (Some(url), Some(key), Some(ttl)) = (args.next(), args.next(), args.next()) else {
        anyhow::bail!(
            "usage: leaseholder-candidate <nats://…|postgres://…|redis://…|etcd://…|sqlite:PATH|raft:DIR> <key> <ttl-ms> [write-delay-ms]"
        );
    };
    let ttl = Duration::from_millis(ttl.parse()?);
    let write_delay = Duration::from_millis(match args.next() {
        Some(ms) => ms.parse()?,
        None => 0,
    });
    let mut group = None;
    let backend = if let Some(dir) = url.strip_prefix("raft:") {
        let member = start_member(dir).await?;
        let backend = member.backend();
        group = Some(member);
        backend
    } else if let Some(path) = url.strip_prefix("sqlite:") {
        Backend::sqlite(SqliteBackend::builder().path(path).build()?)
    } else if url.starts_with("redis") {
        Backend::redis(RedisBackend::builder().url(url).build()?)
    } else if url.starts_with("etcd://") {
        Backend::etcd(EtcdBackend::builder().url(&url).build()?)
    } else if url.starts_with("postgres") {
        Backend::postgres(PostgresBackend::builder().url(url).build()?)
    } else {
        Backend::nats(async_nats::connect(&url).await?, "leases")
    };
    let mut builder = Leader::builder(key).backend(backend).ttl(ttl);
    let priority = match std::env::var("LEASEHOLDER_PRIORITY") {
        Ok(p) => Some(p.parse::<i32>()?),
        Err(_) => None,
    };
    if let Some(p) = priority {
        builder = builder.priority(p);
    }
    if let Ok(ms) = std::env::var("LEASEHOLDER_MIN_TERM_MS") {
        builder = builder.min_term(Duration::from_millis(ms.parse()?));
    }
    if let Ok(metadata) = std::env::var("LEASEHOLDER_METADATA") {
        builder = builder.metadata(metadata);
    }
    let leader = builder.build()?;
    // A peer group is set up by the campaign once it has a quorum (a
    // member restarted alone, or one waiting to be added, has none yet).
    if group.is_none() {
        leader.setup().await?;
    }
    if let Some(group) = &group {
        tokio::spawn(report_raft_role(group.clone()));
        tokio::spawn(serve_commands(group.clone()));
    }

    let mut term_signal = signal(SignalKind::terminate())?;
    let stopper = leader.clone();
    tokio::spawn(async move {
        term_signal.recv().await;
        let _ = stopper.shutdown().await;
    });

    let mut states = leader.state();
    tokio::spawn(async move {
        let mut leading = None;
        loop {
            let token = states.borrow_and_update().token();
            if let Some(lost) = leading
                && leading != token
            {
                say(&format!("LOST {lost}"));
            }
            leading = token;
            if matches!(*states.borrow(), State::Stopped) || states.changed().await.is_err() {
                break;
            }
        }
    });

    let (outbox, mut queued) = mpsc::unbounded_channel::<(Instant, u64)>();
    tokio::spawn(async move {
        while let Some((issued, token)) = queued.recv().await {
            tokio::time::sleep_until(issued + write_delay).await;
            say(&format!("WRITE {token}"));
        }
    });

    say("READY");
    if priority.is_some() {
        let me = leader.leader_id();
        let watcher = leader.clone();
        tokio::spawn(async move {
            loop {
                if let Ok(list) = watcher.candidates().await
                    && list.iter().any(|c| c.id() == me)
                {
                    say("REGISTERED");
                    break;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        });
    }
    leader
        .acquire_and_run(|term| {
            let outbox = outbox.clone();
            async move {
                let token = term.fencing_token();
                say(&format!("START {token}"));
                while !term.is_cancelled() {
                    let _ = outbox.send((Instant::now(), token.get()));
                    tokio::select! {
                        () = term.cancelled() => {}
                        () = tokio::time::sleep(Duration::from_millis(50)) => {}
                    }
                }
                say(&format!("STOP {token}"));
                Ok::<_, anyhow::Error>(())
            }
        })
        .await?;
    if let Some(group) = &group {
        group.shutdown().await;
    }
    say("EXIT");
    Ok(())
}

/// Starts this process's peer group member from its environment, its data
/// in `dir`.
async fn start_member(dir: &str) -> anyhow::Result<PeerGroup> {
    if dir.is_empty() {
        anyhow::bail!("raft:<data-dir>: the data directory is missing");
    }
    let id: u64 = std::env::var("LEASEHOLDER_RAFT_ID")
        .context("raft: set LEASEHOLDER_RAFT_ID to this member's id")?
        .trim()
        .parse()
        .context("LEASEHOLDER_RAFT_ID is not a number")?;
    let peers = parse_members(
        "LEASEHOLDER_RAFT_PEERS",
        &std::env::var("LEASEHOLDER_RAFT_PEERS")
            .context("raft: set LEASEHOLDER_RAFT_PEERS to every member's ID=HOST:PORT")?,
    )?;
    let listen = peers
        .iter()
        .find(|(peer, _)| *peer == id)
        .map(|(_, addr)| addr.clone())
        .with_context(|| {
            format!("LEASEHOLDER_RAFT_ID {id} is not one of the LEASEHOLDER_RAFT_PEERS")
        })?;
    let routes = match std::env::var("LEASEHOLDER_RAFT_ROUTES") {
        Ok(text) if !text.trim().is_empty() => parse_members("LEASEHOLDER_RAFT_ROUTES", &text)?,
        _ => Vec::new(),
    };
    let join = match std::env::var("LEASEHOLDER_RAFT_JOIN").as_deref() {
        Err(_) | Ok("" | "0") => false,
        Ok("1") => true,
        Ok(other) => anyhow::bail!("LEASEHOLDER_RAFT_JOIN is {other:?}: use 1 (or 0)"),
    };
    let mut builder = PeerGroup::builder()
        .node_id(id)
        .peers(peers)
        .tcp(listen)
        .data_dir(dir);
    for (to, addr) in routes {
        builder = builder.tcp_route(to, addr);
    }
    if join {
        builder = builder.join();
    }
    builder
        .start()
        .await
        .with_context(|| format!("starting peer group member {id}"))
}

/// The member list in `text` (`1=host:port,2=host:port,…`); `what`
/// names it in errors.
fn parse_members(what: &str, text: &str) -> anyhow::Result<Vec<(u64, String)>> {
    leaseholder_raft::parse_members(text).with_context(|| format!("{what}={text:?}"))
}

/// Prints `RAFT LEADER` / `RAFT FOLLOWER` whenever this member's Raft role
/// changes (the group has no watch of its own for it: polled every 20 ms).
async fn report_raft_role(group: PeerGroup) {
    let mut leading = false;
    let mut every = tokio::time::interval(Duration::from_millis(20));
    loop {
        every.tick().await;
        let now = group.is_leader();
        if now != leading {
            say(if now { "RAFT LEADER" } else { "RAFT FOLLOWER" });
            leading = now;
        }
    }
}

/// Serves the commands read from stdin (`MEMBERS …`) until it closes.
/// Stdin is read on a thread of its own, not on the runtime's blocking
/// pool: a read pending there would hold up the runtime's shutdown (and
/// the process's exit) until the next line.
async fn serve_commands(group: PeerGroup) {
    let (tx, mut commands) = mpsc::unbounded_channel::<String>();
    std::thread::spawn(move || {
        for line in std::io::stdin().lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    while let Some(line) = commands.recv().await {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        if let Some(list) = line.strip_prefix("MEMBERS ") {
            let result = match parse_members("MEMBERS", list) {
                Ok(members) => group
                    .set_members(members, Duration::from_secs(10))
                    .await
                    .map_err(anyhow::Error::from),
                Err(e) => Err(e),
            };
            match result {
                Ok(()) => say("MEMBERS OK"),
                Err(e) => say(&format!(
                    "MEMBERS ERR {}",
                    format!("{e:#}").replace('\n', " ")
                )),
            }
        } else {
            say(&format!("ERR unknown command {line:?}"));
        }
    }
}
