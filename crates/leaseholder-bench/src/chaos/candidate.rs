//! The candidate process the harness runs (`chaos candidate …`): like
//! `examples/candidate.rs`, but every line starts with a wall-clock stamp
//! (microseconds) taken when the event happened, so the harness can order
//! events of different processes without trusting when it read them, and
//! work dropped by the library says so (`DROP`) instead of ending silently.
//!
//! A candidate campaigns for `keys` keys at once (`<prefix>-0`, `<prefix>-1`,
//! …), one `Leader` each, all on one `Backend`, as a sharded service would.
//!
//! Lines: `<us> READY`, `<us> START <key> <token>`, `<us> WRITE <key>
//! <token> <issued us>` (a write leaving the outbox), `<us> STOP <key>
//! <token>` (the work returned), `<us> DROP <key> <token>` (the work future
//! was dropped before it returned), `<us> LOST <key> <token>` (the campaign
//! stopped leading that term), `<us> EXIT`; `<key>` is the key's index.
//! SIGTERM shuts down gracefully. The process exits at once when its
//! standard input closes (the harness is gone).
//!
//! With the store `raft:<data-dir>` the process is a member of a peer
//! group (`leaseholder-raft` over TCP, its log fsynced in `<data-dir>`) and
//! campaigns on the group's backend: `LEASEHOLDER_RAFT_ID` is its member
//! id, `LEASEHOLDER_RAFT_PEERS` every member's listen address
//! (`ID=HOST:PORT,…`, its own entry where it listens) and the optional
//! `LEASEHOLDER_RAFT_ROUTES` the addresses it dials its peers at instead
//! (the harness's proxies). It leaves the group after its campaigns end.
//!
//! With `LEASEHOLDER_CLOCK_RATE=r` in its environment the process runs on
//! a tokio clock that moves `r` times as fast as the host's (0.8: a clock
//! 20% slow): every timer of the library and of the work is scaled, the
//! line stamps (the host's wall clock) are not. See [`drive_clock`].

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

/// Prints `DROP <key> <token>` if the work future is dropped before it
/// returns.
struct DropGuard {
    key: usize,
    token: u64,
    returned: bool,
}

impl Drop for DropGuard {
    fn drop(&mut self) {
        if !self.returned {
            say(&format!("DROP {} {}", self.key, self.token));
        }
    }
}

/// A peer-group candidate's member id (see the module docs).
pub(crate) const RAFT_ID: &str = "LEASEHOLDER_RAFT_ID";
/// A peer-group candidate's members and their listen addresses.
pub(crate) const RAFT_PEERS: &str = "LEASEHOLDER_RAFT_PEERS";
/// Where a peer-group candidate dials each peer (its proxy), if not at
/// the peer's listen address.
pub(crate) const RAFT_ROUTES: &str = "LEASEHOLDER_RAFT_ROUTES";

/// Starts this process's member of the peer group, configured by the
/// environment, with its log in `dir`.
async fn raft_member(dir: &str) -> anyhow::Result<leaseholder_raft::PeerGroup> {
    let var = |name: &str| std::env::var(name).with_context(|| format!("{name} is not set"));
    let id: leaseholder_raft::NodeId = var(RAFT_ID)?.parse().context(RAFT_ID)?;
    let peers = leaseholder_raft::parse_members(&var(RAFT_PEERS)?).context(RAFT_PEERS)?;
    let listen = peers
        .iter()
        .find(|(m, _)| *m == id)
        .map(|(_, addr)| addr.clone())
        .with_context(|| format!("{RAFT_ID} {id} is not one of the {RAFT_PEERS}"))?;
    let mut builder = leaseholder_raft::PeerGroup::builder()
        .node_id(id)
        .peers(peers)
        .tcp(listen)
        .data_dir(dir);
    match std::env::var(RAFT_ROUTES) {
        Ok(routes) if !routes.is_empty() => {
            for (to, addr) in leaseholder_raft::parse_members(&routes).context(RAFT_ROUTES)? {
                builder = builder.tcp_route(to, addr);
            }
        }
        _ => {}
    }
    Ok(builder.start().await?)
}

/// The environment variable naming the rate of a candidate's clock.
pub(crate) const CLOCK_RATE: &str = "LEASEHOLDER_CLOCK_RATE";

/// The clock rate asked for in the environment, if it is not 1.
pub(crate) fn clock_rate() -> anyhow::Result<Option<f64>> {
    let Ok(v) = std::env::var(CLOCK_RATE) else {
        return Ok(None);
    };
    let rate: f64 = v.parse().with_context(|| format!("{CLOCK_RATE}={v:?}"))?;
    anyhow::ensure!(
        rate.is_finite() && (0.1..=10.0).contains(&rate),
        "{CLOCK_RATE}={v}: a rate from 0.1 to 10"
    );
    Ok(((rate - 1.0).abs() > f64::EPSILON).then_some(rate))
}

/// Moves the paused tokio clock of this (current-thread) runtime `rate`
/// times as fast as the host's monotonic clock, in steps of about a
/// millisecond, for ever.
///
/// The runtime starts paused, so its clock moves only by `advance`. Each
/// step waits for a blocking task that sleeps a millisecond of real time:
/// while a blocking task is in flight, tokio does not jump a paused clock
/// to the next timer when the runtime is idle, so the clock moves only
/// here, and timers fire as the scaled clock passes them. The clock is
/// set from the real time elapsed, so steps do not add up errors.
pub(crate) async fn drive_clock(rate: f64) {
    let real0 = std::time::Instant::now();
    let mut moved = Duration::ZERO;
    loop {
        let _ = tokio::task::spawn_blocking(|| std::thread::sleep(Duration::from_millis(1))).await;
        let target = real0.elapsed().mul_f64(rate);
        if target > moved {
            tokio::time::advance(target - moved).await;
            moved = target;
        }
    }
}

/// How long the candidate keeps retrying its first connection and setup
/// (the harness may have cut its link, or be restarting the server).
const SETUP_PATIENCE: Duration = Duration::from_secs(60);

pub(crate) async fn run(args: &[String]) -> anyhow::Result<()> {
    let [url, prefix, keys, ttl, write_delay] = args else {
        anyhow::bail!(
            "usage: chaos candidate <nats-postgres-redis-or-etcd-url | sqlite:path | raft:dir> <key-prefix> <keys> <ttl-ms> <write-delay-ms>"
        );
    };
    let keys: usize = keys.parse().context("keys")?;
    anyhow::ensure!(keys >= 1, "keys: at least 1");
    let ttl = Duration::from_millis(ttl.parse().context("ttl-ms")?);
    let write_delay = Duration::from_millis(write_delay.parse().context("write-delay-ms")?);
    if let Some(rate) = clock_rate()? {
        tokio::spawn(drive_clock(rate));
    }

    // The harness holds our stdin; when it goes away, so do we.
    tokio::spawn(async {
        let mut stdin = tokio::io::stdin();
        let mut buf = [0u8; 64];
        while matches!(stdin.read(&mut buf).await, Ok(n) if n > 0) {}
        std::process::exit(3);
    });

    let patience = Instant::now() + SETUP_PATIENCE;
    let mut group = None;
    let backend = if let Some(dir) = url.strip_prefix("raft:") {
        let member = raft_member(dir).await?;
        let backend = member.backend();
        group = Some(member);
        backend
    } else if let Some(path) = url.strip_prefix("sqlite:") {
        Backend::sqlite(leaseholder::SqliteBackend::builder().path(path).build()?)
    } else if url.starts_with("postgres") {
        // Two connections for one key; more for many, so acquires (one
        // at a time on all connections but one) do not queue for long.
        let pool = if keys > 1 { 4 } else { 2 };
        Backend::postgres(
            PostgresBackend::builder()
                .url(url)
                .pool_size(pool)
                .build()?,
        )
    } else if url.starts_with("redis") {
        Backend::redis(RedisBackend::builder().url(url).build()?)
    } else if url.starts_with("etcd://") {
        Backend::etcd(EtcdBackend::builder().url(url).build()?)
    } else {
        loop {
            let addrs = super::harness::nats_addrs(url)?;
            match tokio::time::timeout(Duration::from_secs(2), async_nats::connect(addrs)).await {
                Ok(Ok(client)) => break Backend::nats(client, "leases"),
                Ok(Err(e)) if Instant::now() > patience => {
                    return Err(e).context(format!("connecting to {url}"));
                }
                _ => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    };
    // `--priorities`: a registry entry with this priority.
    let priority = match std::env::var("LEASEHOLDER_PRIORITY") {
        Ok(p) => Some(p.parse().context("LEASEHOLDER_PRIORITY")?),
        Err(_) => None,
    };
    let mut leaders = Vec::with_capacity(keys);
    for k in 0..keys {
        let mut builder = Leader::builder(format!("{prefix}-{k}"))
            .backend(backend.clone())
            .ttl(ttl);
        if let Some(p) = priority {
            builder = builder.priority(p);
        }
        leaders.push(builder.build()?);
    }
    // One setup prepares the bucket or table for every key.
    if let Some(first) = leaders.first() {
        loop {
            match tokio::time::timeout(Duration::from_secs(5), first.setup()).await {
                Ok(Ok(())) => break,
                Ok(Err(e)) if Instant::now() > patience => return Err(e).context("setup"),
                _ if Instant::now() > patience => anyhow::bail!("setup timed out"),
                _ => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }

    let mut term_signal = signal(SignalKind::terminate())?;
    let stoppers = leaders.clone();
    tokio::spawn(async move {
        term_signal.recv().await;
        let _ = futures_util::future::join_all(stoppers.iter().map(Leader::shutdown)).await;
    });

    for (k, leader) in leaders.iter().enumerate() {
        let mut states = leader.state();
        tokio::spawn(async move {
            let mut leading = None;
            loop {
                let token = states.borrow_and_update().token();
                if let Some(lost) = leading
                    && leading != token
                {
                    say(&format!("LOST {k} {lost}"));
                }
                leading = token;
                if matches!(*states.borrow(), State::Stopped) || states.changed().await.is_err() {
                    break;
                }
            }
        });
    }

    // Writes leave `write_delay` after the work issued them, the way a
    // request sits in a queue or a socket buffer: one issued just before a
    // pause leaves after the process resumes.
    let (outbox, mut queued) = mpsc::unbounded_channel::<(Instant, u64, usize, u64)>();
    tokio::spawn(async move {
        while let Some((issued, issued_us, key, token)) = queued.recv().await {
            tokio::time::sleep_until(issued + write_delay).await;
            say(&format!("WRITE {key} {token} {issued_us}"));
        }
    });
    // One write per term every 50 ms with one key; with many, every
    // 50 ms x keys/10 (at most a second), so the lines stay few.
    let every = Duration::from_millis(50).max(Duration::from_millis(5) * keys.min(200) as u32);

    say("READY");
    let campaigns = leaders.into_iter().enumerate().map(|(k, leader)| {
        let outbox = outbox.clone();
        async move {
            leader
                .acquire_and_run(|term| {
                    let outbox = outbox.clone();
                    async move {
                        let token = term.fencing_token().get();
                        let mut guard = DropGuard {
                            key: k,
                            token,
                            returned: false,
                        };
                        say(&format!("START {k} {token}"));
                        while !term.is_cancelled() {
                            let _ = outbox.send((Instant::now(), now_us(), k, token));
                            tokio::select! {
                                () = term.cancelled() => {}
                                () = tokio::time::sleep(every) => {}
                            }
                        }
                        guard.returned = true;
                        say(&format!("STOP {k} {token}"));
                        Ok::<_, anyhow::Error>(())
                    }
                })
                .await
        }
    });
    for result in futures_util::future::join_all(campaigns).await {
        result?;
    }
    if let Some(group) = group {
        group.shutdown().await;
    }
    say("EXIT");
    Ok(())
}
