//! The subcommands.

use std::collections::HashMap;
use std::io::{IsTerminal, Write};
use std::time::{Duration, SystemTime};

use leaseholder::{Backend, ForceReleased, Holder, Key, Observed, Observer, Prepared};
use serde_json::json;
use tokio::sync::mpsc;
use tokio::task::JoinSet;

use crate::args::{Args, Color, Command};
use crate::error::CliError;
use crate::render::{self, Paint};
use crate::store::{self, Store};

pub(crate) async fn run(args: Args) -> Result<(), CliError> {
    let dry_run = matches!(args.command, Command::Setup { dry_run: true });
    let store = store::open(&args.store, args.timeout, dry_run).await?;
    let paint = Paint::new(match args.color {
        Color::Always => true,
        Color::Never => false,
        Color::Auto => {
            std::io::stdout().is_terminal()
                && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
        }
    });
    let budget = args.timeout;
    match args.command {
        Command::List { json } => list(&store, budget, json, paint).await,
        Command::Show { key, json } => show(&store, &key, budget, json, paint).await,
        Command::Watch {
            key,
            json,
            poll,
            count,
        } => watch(&store, key, budget, poll, count, json, paint).await,
        Command::Release { key, force, yes } => {
            release(&store, &key, budget, force, yes, paint).await
        }
        Command::Setup { dry_run } => setup(&store, budget, dry_run).await,
    }
}

fn failed(store: &Store, what: &'static str) -> impl FnOnce(leaseholder::BackendError) -> CliError {
    let name = store.name.clone();
    move |source| CliError::Store {
        what,
        store: name,
        source,
    }
}

fn key_of(store: &Store, key: &str) -> Result<Key, CliError> {
    let key = Key::new(key)?;
    store.backend.validate_key(&key)?;
    Ok(key)
}

fn out(text: &str) -> Result<(), CliError> {
    let mut stdout = std::io::stdout().lock();
    stdout.write_all(text.as_bytes())?;
    stdout.flush()?;
    Ok(())
}

async fn list(store: &Store, budget: Duration, json: bool, paint: Paint) -> Result<(), CliError> {
    let held = store
        .backend
        .holders_within(budget)
        .await
        .map_err(failed(store, "listing keys"))?;
    if json {
        let items: Vec<_> = held
            .iter()
            .map(|(k, h)| render::holder_json(k, h))
            .collect();
        return out(&format!("{}\n", serde_json::Value::Array(items)));
    }
    if held.is_empty() {
        return out("no key is held\n");
    }
    let rows: Vec<_> = held
        .iter()
        .map(|(key, h)| {
            let mut row = vec![(key.to_string(), paint.key(key.as_str()))];
            row.extend(render::holder_cells(h, paint));
            row
        })
        .collect();
    out(&render::table(
        &["KEY", "HOLDER", "TOKEN", "SINCE", "EXPIRES", "METADATA"],
        &rows,
        paint,
    ))
}

async fn show(
    store: &Store,
    key: &str,
    budget: Duration,
    json: bool,
    paint: Paint,
) -> Result<(), CliError> {
    let key = key_of(store, key)?;
    let holder = store
        .backend
        .holder_within(&key, budget)
        .await
        .map_err(failed(store, "reading the key"))?;
    // The registry, where the store keeps one; a failure to read it is
    // shown, not fatal: the lease is what matters.
    let candidates = if !store.backend.supports_candidates() {
        None
    } else if store.may_have_registry().await {
        Some(store.backend.candidates_within(&key, budget).await)
    } else {
        // No registry was ever made: reading it would create it.
        Some(Ok(Vec::new()))
    };
    if json {
        let mut value = match &holder {
            Some(h) => render::holder_json(&key, h),
            None => json!({ "key": key.as_str() }),
        };
        value["held"] = json!(holder.is_some());
        value["candidates"] = match &candidates {
            Some(Ok(list)) => list.iter().map(render::candidate_json).collect(),
            Some(Err(_)) | None => serde_json::Value::Null,
        };
        if let Some(Err(e)) = &candidates {
            value["candidates_error"] = json!(e.to_string());
        }
        return out(&format!("{value}\n"));
    }
    let mut text = format!("key:        {}\n", paint.key(key.as_str()));
    match &holder {
        None => text.push_str("holder:     none (the key is free)\n"),
        Some(h) if h.is_foreign() => {
            text.push_str(&format!(
                "holder:     {}\n",
                paint.warn("a foreign value (not a leaseholder lease)")
            ));
            text.push_str(&format!("revision:   {}\n", h.revision()));
            text.push_str(&expires_line(h));
        }
        Some(h) => {
            let id = h.id().map_or_else(|| "-".into(), |id| id.to_string());
            let token = h.token().map_or_else(|| "-".into(), |t| t.to_string());
            text.push_str(&format!("holder:     {}\n", paint.holder(&id)));
            text.push_str(&format!("token:      {}\n", paint.token(&token)));
            if let Some(since) = h.since() {
                text.push_str(&format!(
                    "since:      {} ({}, by the holder's clock)\n",
                    render::time(since),
                    render::ago(since)
                ));
            }
            text.push_str(&expires_line(h));
            text.push_str(&format!("revision:   {}\n", h.revision()));
            text.push_str(&format!("metadata:   {}\n", render::metadata(h.metadata())));
        }
    }
    match candidates {
        None => text.push_str("candidates: not kept by this store\n"),
        Some(Err(e)) => text.push_str(&format!(
            "candidates: {}\n",
            paint.warn(&format!("could not be read: {e}"))
        )),
        Some(Ok(list)) if list.is_empty() => {
            text.push_str("candidates: none registered\n");
        }
        Some(Ok(mut list)) => {
            list.sort_by_key(|c| (std::cmp::Reverse(c.priority()), c.since()));
            text.push_str(&format!("candidates: {}\n", list.len()));
            let rows: Vec<_> = list
                .iter()
                .map(|c| {
                    let id = c.id().to_string();
                    let leading = holder.as_ref().and_then(Holder::id) == Some(c.id());
                    let mark = if leading { "*" } else { " " };
                    let since = render::time(c.since());
                    let meta = render::metadata(c.metadata());
                    vec![
                        (mark.to_owned(), mark.to_owned()),
                        (id.clone(), paint.holder(&id)),
                        (c.priority().to_string(), c.priority().to_string()),
                        (since.clone(), since),
                        (meta.clone(), meta),
                    ]
                })
                .collect();
            let table = render::table(&[" ", "ID", "PRIORITY", "SINCE", "METADATA"], &rows, paint);
            for line in table.lines() {
                text.push_str(&format!("  {line}\n"));
            }
        }
    }
    out(&text)
}

fn expires_line(h: &Holder) -> String {
    match h.expires_in() {
        Some(d) => format!(
            "expires:    in {} unless renewed (a hint from the store)\n",
            render::span(d)
        ),
        None => "expires:    - (the store gives no hint)\n".into(),
    }
}

/// One line of `watch`.
/// `width`: the key column's (the longest key seen so far).
fn watch_line(key: &Key, seen: &Observed, json: bool, width: usize, paint: Paint) -> String {
    let at = render::time(SystemTime::now());
    if json {
        let value = match seen {
            Observed::Held(h) => {
                let mut v = render::holder_json(key, h);
                v["state"] = json!("held");
                v
            }
            Observed::Vacant => json!({ "key": key.as_str(), "state": "vacant" }),
            _ => json!({ "key": key.as_str(), "state": "unknown" }),
        };
        let mut value = value;
        value["at"] = json!(at);
        return format!("{value}\n");
    }
    let what = match seen {
        Observed::Held(h) if h.is_foreign() => paint.warn("held by a foreign value"),
        Observed::Held(h) => {
            let id = h.id().map_or_else(|| "-".into(), |id| id.to_string());
            let token = h.token().map_or_else(|| "-".into(), |t| t.to_string());
            format!(
                "leader {} token {} metadata {}",
                paint.holder(&id),
                paint.token(&token),
                render::metadata(h.metadata())
            )
        }
        Observed::Vacant => "vacant".to_owned(),
        _ => paint.warn("unknown (the store cannot be read)"),
    };
    let pad = " ".repeat(width.saturating_sub(key.as_str().chars().count()));
    format!(
        "{}  {}{pad}  {what}\n",
        paint.dim(&at),
        paint.key(key.as_str())
    )
}

/// Starts observing `key`; its changes go to `tx`.
fn observe(
    backend: &Backend,
    key: &Key,
    poll: Duration,
    tx: &mpsc::UnboundedSender<(Key, Observed)>,
    tasks: &mut JoinSet<()>,
) -> Result<Observer, CliError> {
    let observer = Observer::new(key.as_str(), backend.clone(), poll)?;
    let mut seen = observer.watch();
    let (tx, key) = (tx.clone(), key.clone());
    tasks.spawn(async move {
        let mut known = false;
        loop {
            let now = seen.borrow_and_update().clone();
            // The first read is still to come: nothing to say yet.
            if known || now != Observed::Unknown {
                known = true;
                if tx.send((key.clone(), now)).is_err() {
                    return;
                }
            }
            if seen.changed().await.is_err() {
                return;
            }
        }
    });
    Ok(observer)
}

async fn watch(
    store: &Store,
    key: Option<String>,
    budget: Duration,
    poll: Duration,
    count: Option<u64>,
    json: bool,
    paint: Paint,
) -> Result<(), CliError> {
    let (tx, mut rx) = mpsc::unbounded_channel();
    let mut tasks = JoinSet::new();
    let mut observers: HashMap<Key, Observer> = HashMap::new();
    let all = key.is_none();
    // Read once first, so that an unreachable store or a missing bucket
    // or table is an error, not a line of "unknown".
    match &key {
        Some(key) => {
            let key = key_of(store, key)?;
            store
                .backend
                .holder_within(&key, budget)
                .await
                .map_err(failed(store, "reading the key"))?;
            let observer = observe(&store.backend, &key, poll, &tx, &mut tasks)?;
            observers.insert(key, observer);
        }
        None => {
            for key in store
                .backend
                .keys_within(budget)
                .await
                .map_err(failed(store, "listing keys"))?
            {
                let observer = observe(&store.backend, &key, poll, &tx, &mut tasks)?;
                observers.insert(key, observer);
            }
        }
    }
    let mut rescan = tokio::time::interval(poll);
    rescan.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut printed = 0u64;
    let mut width = observers
        .keys()
        .map(|k| k.as_str().chars().count())
        .max()
        .unwrap_or(0);
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    loop {
        tokio::select! {
            _ = &mut ctrl_c => break,
            Some((key, seen)) = rx.recv() => {
                width = width.max(key.as_str().chars().count());
                out(&watch_line(&key, &seen, json, width, paint))?;
                printed += 1;
                if count.is_some_and(|n| printed >= n) {
                    break;
                }
            }
            _ = rescan.tick(), if all => {
                // New keys since the last listing; a failed listing is
                // retried at the next tick (the observers say "unknown").
                if let Ok(keys) = store.backend.keys_within(budget).await {
                    for key in keys {
                        if let std::collections::hash_map::Entry::Vacant(slot) =
                            observers.entry(key)
                        {
                            let observer =
                                observe(&store.backend, slot.key(), poll, &tx, &mut tasks)?;
                            slot.insert(observer);
                        }
                    }
                }
            }
        }
    }
    drop(observers);
    tasks.abort_all();
    Ok(())
}

async fn release(
    store: &Store,
    key: &str,
    budget: Duration,
    force: bool,
    yes: bool,
    paint: Paint,
) -> Result<(), CliError> {
    if !force {
        return Err(CliError::Usage(
            "release ends another process's lease: add --force to confirm that you mean it \
             (the old leader may act until it notices; only fencing tokens protect its writes)"
                .into(),
        ));
    }
    let key = key_of(store, key)?;
    let Some(holder) = store
        .backend
        .holder_within(&key, budget)
        .await
        .map_err(failed(store, "reading the key"))?
    else {
        return out(&format!("key {key} is free: nothing to release\n"));
    };
    if holder.is_foreign() {
        return Err(CliError::Foreign {
            key: key.to_string(),
        });
    }
    let who = describe(&holder);
    if !yes {
        eprint!(
            "release key {} held by {who}? [y/N] ",
            paint.key(key.as_str())
        );
        let _ = std::io::stderr().flush();
        let answer = tokio::task::spawn_blocking(|| {
            let mut line = String::new();
            std::io::stdin().read_line(&mut line).map(|_| line)
        })
        .await
        .map_err(|e| CliError::Io(std::io::Error::other(e)))??;
        // An answer piped in is not echoed: end the prompt's line.
        if !std::io::stdin().is_terminal() {
            eprintln!();
        }
        if !matches!(answer.trim(), "y" | "Y" | "yes" | "YES" | "Yes") {
            return Err(CliError::NotConfirmed);
        }
    }
    match store
        .backend
        .force_release_within(&key, &holder, budget)
        .await
        .map_err(failed(store, "releasing the key"))?
    {
        ForceReleased::Ended { token, now } => {
            let mut text = format!(
                "released key {}: holder {who}, token {} ended\n",
                paint.key(key.as_str()),
                paint.token(&token.to_string())
            );
            text.push_str(&match now {
                None => "the key is free now; the next candidate takes it with a larger token\n"
                    .to_owned(),
                Some(next) => format!("the key is now held by {}\n", describe(&next)),
            });
            out(&text)
        }
        ForceReleased::Foreign => Err(CliError::Foreign {
            key: key.to_string(),
        }),
        _ => Err(CliError::Usage("unexpected outcome of the release".into())),
    }
}

/// `<id> (token N, metadata M)`.
fn describe(h: &Holder) -> String {
    format!(
        "{} (token {}, metadata {})",
        h.id().map_or_else(|| "-".into(), |id| id.to_string()),
        h.token().map_or_else(|| "-".into(), |t| t.to_string()),
        render::metadata(h.metadata())
    )
}

async fn setup(store: &Store, budget: Duration, dry_run: bool) -> Result<(), CliError> {
    let mut settings = store.settings.clone();
    if !settings.ends_with('\n') {
        settings.push('\n');
    }
    if dry_run {
        return out(&format!(
            "{settings}(dry run: nothing was created or checked)\n"
        ));
    }
    let prepared = store
        .backend
        .setup_within(budget)
        .await
        .map_err(failed(store, "setup"))?;
    match prepared {
        Prepared::Created => out(&format!("{settings}created\n")),
        _ => out("exists, and its settings are valid\n"),
    }
}
