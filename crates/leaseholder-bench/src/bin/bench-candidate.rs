//! A candidate process for the benchmarks, for leaseholder or noleader 0.1.2.
//!
//! `bench-candidate <leaseholder|noleader> <nats-postgres-redis-or-etcd-url> <key> <ttl-ms>`
//! connects, sets the bucket, table or Redis or etcd key prefix (`bench`) up,
//! prints `READY` and waits for a `GO` line on stdin before it campaigns,
//! so that a first election can be timed from the moment every candidate
//! is connected. Then it prints:
//!
//! - `START <token>` when its work starts (noleader has no fencing token:
//!   it prints `START 0`), `STOP <token>` when the work returns;
//! - `EXIT` after SIGTERM was handled: leaseholder shuts down (drains the
//!   work, releases the lease); noleader cancels its campaign and exits (it
//!   has no release).
//!
//! noleader ignores the ttl (it has a fixed 10 s interval and a 60 s ttl).

use std::io::Write;
use std::time::Duration;

use anyhow::Context;
use leaseholder::{Backend, EtcdBackend, Leader, PostgresBackend, RedisBackend};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;

fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

/// Waits for the `GO` line on stdin.
async fn wait_for_go() -> anyhow::Result<()> {
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    while let Some(line) = lines.next_line().await? {
        if line.trim() == "GO" {
            return Ok(());
        }
    }
    anyhow::bail!("stdin closed before GO")
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let (Some(kind), Some(url), Some(key), Some(ttl)) =
        (args.next(), args.next(), args.next(), args.next())
    else {
        anyhow::bail!("usage: bench-candidate <leaseholder|noleader> <url> <key> <ttl-ms>");
    };
    let ttl = Duration::from_millis(ttl.parse().context("ttl-ms")?);
    let mut term_signal = signal(SignalKind::terminate())?;
    match kind.as_str() {
        "leaseholder" => leaseholder(&url, &key, ttl, &mut term_signal).await,
        "noleader" => noleader(&url, &key, &mut term_signal).await,
        other => anyhow::bail!("unknown implementation {other:?}"),
    }
}

async fn leaseholder(
    url: &str,
    key: &str,
    ttl: Duration,
    term_signal: &mut tokio::signal::unix::Signal,
) -> anyhow::Result<()> {
    let backend = if url.starts_with("postgres") {
        Backend::postgres(PostgresBackend::builder().url(url).build()?)
    } else if url.starts_with("redis") {
        Backend::redis(RedisBackend::builder().url(url).prefix("bench").build()?)
    } else if url.starts_with("etcd://") {
        Backend::etcd(EtcdBackend::builder().url(url).prefix("bench").build()?)
    } else {
        Backend::nats(async_nats::connect(url).await?, "bench")
    };
    let leader = Leader::builder(key).backend(backend).ttl(ttl).build()?;
    leader.setup().await?;
    say("READY");
    wait_for_go().await?;
    let stopper = leader.clone();
    let mut stopped = false;
    let run = leader.acquire_and_run(|term| async move {
        let token = term.fencing_token();
        say(&format!("START {token}"));
        term.cancelled().await;
        say(&format!("STOP {token}"));
        Ok::<_, anyhow::Error>(())
    });
    tokio::pin!(run);
    loop {
        tokio::select! {
            res = &mut run => {
                res?;
                break;
            }
            _ = term_signal.recv(), if !stopped => {
                stopped = true;
                let stopper = stopper.clone();
                tokio::spawn(async move { stopper.shutdown().await });
            }
        }
    }
    say("EXIT");
    Ok(())
}

async fn noleader(
    url: &str,
    key: &str,
    term_signal: &mut tokio::signal::unix::Signal,
) -> anyhow::Result<()> {
    let client = async_nats_noleader::connect(url).await?;
    let leader = noleader::Leader::new("noleader_bench", key, client);
    leader.create_bucket().await?;
    say("READY");
    wait_for_go().await?;
    let campaign = CancellationToken::new();
    let started = tokio::spawn({
        let leader = leader.clone();
        let campaign = campaign.clone();
        async move { leader.start(campaign).await }
    });
    let work = leader.do_while_leader(|token| async move {
        say("START 0");
        token.cancelled().await;
        say("STOP 0");
        Ok(())
    });
    tokio::select! {
        res = work => res?,
        _ = term_signal.recv() => {}
    }
    campaign.cancel();
    let _ = started.await;
    say("EXIT");
    Ok(())
}
