//! The candidate process the harness runs (`chaos candidate …`): like
//! `examples/candidate.rs`, but every line starts with a wall-clock stamp
//! (microseconds) taken when the event happened, so the harness can order
//! events of different processes without trusting when it read them, and
//! work dropped by the library says so (`DROP`) instead of ending silently.
//!
//! Lines: `<us> READY`, `<us> START <token>`, `<us> WRITE <token> <issued
//! us>` (a write leaving the outbox), `<us> STOP <token>` (the work
//! returned), `<us> DROP <token>` (the work future was dropped before it
//! returned), `<us> LOST <token>` (the campaign stopped leading that term),
//! `<us> EXIT`. SIGTERM shuts down gracefully. The process exits at once
//! when its standard input closes (the harness is gone).

use std::io::Write;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use leaseholder::{Backend, EtcdBackend, Leader, PostgresBackend, RedisBackend, State};
use tokio::io::AsyncReadExt;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::mpsc;
use tokio::time::Instant;

/// Microseconds since the Unix epoch, on the host's wall clock.
pub(crate) fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
}

/// Prints `<now> <what>`. The stamp is taken before the line is written,
/// so a pause in between does not move it.
fn say(what: &str) {
    let at = now_us();
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{at} {what}");
    let _ = out.flush();
}

/// Prints `DROP <token>` if the work future is dropped before it returns.
struct DropGuard {
    token: u64,
    returned: bool,
}

impl Drop for DropGuard {
    fn drop(&mut self) {
        if !self.returned {
            say(&format!("DROP {}", self.token));
        }
    }
}

/// How long the candidate keeps retrying its first connection and setup
/// (the harness may have cut its link, or be restarting the server).
const SETUP_PATIENCE: Duration = Duration::from_secs(60);

pub(crate) async fn run(args: &[String]) -> anyhow::Result<()> {
    let [url, key, ttl, write_delay] = args else {
        anyhow::bail!(
            "usage: chaos candidate <nats-postgres-redis-or-etcd-url | sqlite:path> <key> <ttl-ms> <write-delay-ms>"
        );
    };
    let ttl = Duration::from_millis(ttl.parse().context("ttl-ms")?);
    let write_delay = Duration::from_millis(write_delay.parse().context("write-delay-ms")?);

    // The harness holds our stdin; when it goes away, so do we.
    tokio::spawn(async {
        let mut stdin = tokio::io::stdin();
        let mut buf = [0u8; 64];
        while matches!(stdin.read(&mut buf).await, Ok(n) if n > 0) {}
        std::process::exit(3);
    });

    let patience = Instant::now() + SETUP_PATIENCE;
    let backend = if let Some(path) = url.strip_prefix("sqlite:") {
        Backend::sqlite(leaseholder::SqliteBackend::builder().path(path).build()?)
    } else if url.starts_with("postgres") {
        Backend::postgres(PostgresBackend::builder().url(url).pool_size(2).build()?)
    } else if url.starts_with("redis") {
        Backend::redis(RedisBackend::builder().url(url).build()?)
    } else if url.starts_with("etcd://") {
        Backend::etcd(EtcdBackend::builder().url(url).build()?)
    } else {
        loop {
            match tokio::time::timeout(Duration::from_secs(2), async_nats::connect(url)).await {
                Ok(Ok(client)) => break Backend::nats(client, "leases"),
                Ok(Err(e)) if Instant::now() > patience => {
                    return Err(e).context(format!("connecting to {url}"));
                }
                _ => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    };
    let mut builder = Leader::builder(key.as_str()).backend(backend).ttl(ttl);
    // `--priorities`: a registry entry with this priority.
    if let Ok(p) = std::env::var("LEASEHOLDER_PRIORITY") {
        builder = builder.priority(p.parse().context("LEASEHOLDER_PRIORITY")?);
    }
    let leader = builder.build()?;
    loop {
        match tokio::time::timeout(Duration::from_secs(5), leader.setup()).await {
            Ok(Ok(())) => break,
            Ok(Err(e)) if Instant::now() > patience => return Err(e).context("setup"),
            _ if Instant::now() > patience => anyhow::bail!("setup timed out"),
            _ => tokio::time::sleep(Duration::from_millis(100)).await,
        }
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

    // Writes leave `write_delay` after the work issued them, the way a
    // request sits in a queue or a socket buffer: one issued just before a
    // pause leaves after the process resumes.
    let (outbox, mut queued) = mpsc::unbounded_channel::<(Instant, u64, u64)>();
    tokio::spawn(async move {
        while let Some((issued, issued_us, token)) = queued.recv().await {
            tokio::time::sleep_until(issued + write_delay).await;
            say(&format!("WRITE {token} {issued_us}"));
        }
    });

    say("READY");
    leader
        .acquire_and_run(|term| {
            let outbox = outbox.clone();
            async move {
                let token = term.fencing_token().get();
                let mut guard = DropGuard {
                    token,
                    returned: false,
                };
                say(&format!("START {token}"));
                while !term.is_cancelled() {
                    let _ = outbox.send((Instant::now(), now_us(), token));
                    tokio::select! {
                        () = term.cancelled() => {}
                        () = tokio::time::sleep(Duration::from_millis(50)) => {}
                    }
                }
                guard.returned = true;
                say(&format!("STOP {token}"));
                Ok::<_, anyhow::Error>(())
            }
        })
        .await?;
    say("EXIT");
    Ok(())
}
