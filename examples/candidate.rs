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

use std::io::Write;
use std::time::Duration;

use leaseholder::{
    Backend, EtcdBackend, Leader, PostgresBackend, RedisBackend, SqliteBackend, State,
};
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
            "usage: leaseholder-candidate <nats://…|postgres://…|redis://…|etcd://…|sqlite:PATH> <key> <ttl-ms> [write-delay-ms]"
        );
    };
    let ttl = Duration::from_millis(ttl.parse()?);
    let write_delay = Duration::from_millis(match args.next() {
        Some(ms) => ms.parse()?,
        None => 0,
    });
    let backend = if let Some(path) = url.strip_prefix("sqlite:") {
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
    leader.setup().await?;

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
    say("EXIT");
    Ok(())
}
