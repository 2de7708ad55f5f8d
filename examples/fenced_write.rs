//! A leader whose writes to a PostgreSQL table are guarded by its fencing
//! token, so that a write from a leader that has been overtaken (paused,
//! partitioned, or simply slow) is refused instead of applied.
//!
//! ```sh
//! DATABASE_URL=postgres://postgres@localhost:5432/postgres \
//!     cargo run -p leaseholder-examples --example fenced_write
//! ```
//!
//! It creates the table `fenced_counter` if it is missing, leads, adds 1 to
//! the counter three times with its term's token, and prints the counter and
//! the fence (the highest token that has written). Run it again: the next
//! term's token is larger, so its writes are accepted too. A write carrying
//! an older term's token after a newer term has written is refused
//! (`cargo nextest run -p leaseholder-examples --test operability fenced`
//! shows one, with two real leaders).

use std::sync::Arc;
use std::time::Duration;

use leaseholder::{Backend, FencingToken, Leader, PostgresBackend};
use tokio_postgres::{Client, NoTls};

/// The downstream table, and its one row. `fence` is the highest fencing
/// token that has written the row.
pub(crate) const CREATE_TABLE: &str = "
    CREATE TABLE IF NOT EXISTS fenced_counter (
        id int PRIMARY KEY,
        value bigint NOT NULL,
        fence bigint NOT NULL
    );
    INSERT INTO fenced_counter (id, value, fence) VALUES (1, 0, 0) ON CONFLICT (id) DO NOTHING;
";

/// The fenced write. The guard (`fence <= $1`) is in the same statement as
/// the write: PostgreSQL checks it and applies the update atomically, under
/// the row's lock. Checking first (a `SELECT`, or `term.is_valid()`) and
/// writing afterwards leaves a gap in which a newer leader can write, and
/// the stale write would then land on top of it.
///
/// `<=`, not `<`: the current term writes the row many times with the same
/// token. Only a token lower than the fence, from an older term, is refused,
/// so a stale write is refused once a newer term has written the row (until
/// then the row holds nothing the stale write could overwrite).
pub(crate) const WRITE: &str =
    "UPDATE fenced_counter SET value = value + 1, fence = $1 WHERE id = 1 AND fence <= $1";

/// Adds 1 to the counter with `token`. `Ok(false)`: refused, a newer
/// leader has written the row, so this one must stop.
pub(crate) async fn write_fenced(client: &Client, token: FencingToken) -> anyhow::Result<bool> {
    let token = i64::try_from(token.get())?; // PostgreSQL has no unsigned bigint
    Ok(client.execute(WRITE, &[&token]).await? == 1)
}

/// The counter and its fence.
pub(crate) async fn read_counter(client: &Client) -> anyhow::Result<(i64, i64)> {
    let row = client
        .query_one("SELECT value, fence FROM fenced_counter WHERE id = 1", &[])
        .await?;
    Ok((row.try_get(0)?, row.try_get(1)?))
}

#[tokio::main]
async fn main() {
    if let Err(e) = run().await {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

async fn run() -> anyhow::Result<()> {
    let url = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@localhost:5432/postgres".into());
    let client = match tokio::time::timeout(
        Duration::from_secs(5),
        tokio_postgres::connect(&url, NoTls),
    )
    .await
    {
        Ok(Ok((client, connection))) => {
            tokio::spawn(connection);
            Arc::new(client)
        }
        Ok(Err(e)) => anyhow::bail!(
            "cannot connect to PostgreSQL at {url}: {:#} (start PostgreSQL or set DATABASE_URL)",
            anyhow::Error::new(e)
        ),
        Err(_) => anyhow::bail!(
            "no PostgreSQL answered at {url} within 5 s (start PostgreSQL or set DATABASE_URL)"
        ),
    };
    client.batch_execute(CREATE_TABLE).await?;

    let leader = Leader::builder("fenced-writer")
        .backend(Backend::postgres(
            PostgresBackend::builder().url(&url).build()?,
        ))
        .ttl(Duration::from_secs(10))
        .build()?;
    leader.setup().await?;
    leader
        .acquire_and_run(|term| {
            let client = client.clone();
            async move {
                println!("leading with fencing token {}", term.fencing_token());
                for _ in 0..3 {
                    // check() refuses to start a write after the term's
                    // deadline; once the write is on its way, only the
                    // fence in the statement can stop it.
                    let token = term.check()?;
                    if !write_fenced(&client, token).await? {
                        println!("refused: a newer leader has written; stopping");
                        return Ok(());
                    }
                    println!("write accepted with fencing token {token}");
                    tokio::select! {
                        () = tokio::time::sleep(Duration::from_millis(100)) => {}
                        () = term.cancelled() => return Ok(()),
                    }
                }
                Ok::<_, anyhow::Error>(()) // done: release the lease
            }
        })
        .await?;
    let (value, fence) = read_counter(&client).await?;
    println!("counter {value}, fence {fence}");
    Ok(())
}
