//! From a store URL to a [`Backend`], through each backend's own builder.

// A build without some stores leaves some URL helpers unused.
#![cfg_attr(
    not(all(
        feature = "nats",
        feature = "postgres",
        feature = "redis",
        feature = "etcd",
        feature = "sqlite"
    )),
    allow(dead_code)
)]

use std::time::Duration;

use leaseholder::Backend;

use crate::error::CliError;

/// An opened store.
pub(crate) struct Store {
    pub(crate) backend: Backend,
    /// The URL without its password, for messages.
    pub(crate) name: String,
    /// What `setup` creates: the DDL, or the bucket's settings.
    pub(crate) settings: String,
    /// NATS: the client and the registry's stream, to look for it without
    /// creating it (the backend's first registry call would).
    #[cfg(feature = "nats")]
    nats_registry: Option<(async_nats::Client, String)>,
}

impl Store {
    /// `false` if the store certainly has no candidate registry for this
    /// backend, so that reading it would only create it (NATS creates the
    /// registry bucket on its first use); `true` otherwise.
    pub(crate) async fn may_have_registry(&self) -> bool {
        #[cfg(feature = "nats")]
        if let Some((client, stream)) = &self.nats_registry {
            let js = async_nats::jetstream::new(client.clone());
            return js.get_stream(stream).await.is_ok();
        }
        true
    }
}

/// Splits `url` at `?` into the part before and its `name=value` pairs.
fn split_query(url: &str) -> (&str, Vec<(String, String)>) {
    match url.split_once('?') {
        None => (url, Vec::new()),
        Some((base, query)) => (
            base,
            query
                .split('&')
                .filter(|p| !p.is_empty())
                .map(|p| match p.split_once('=') {
                    Some((k, v)) => (k.to_owned(), v.to_owned()),
                    None => (p.to_owned(), String::new()),
                })
                .collect(),
        ),
    }
}

/// Removes parameter `name` from `params` and returns its value.
fn take(params: &mut Vec<(String, String)>, name: &str) -> Option<String> {
    let at = params.iter().position(|(k, _)| k == name)?;
    Some(params.remove(at).1)
}

/// `base` with the parameters left in `params`.
fn with_query(base: &str, params: &[(String, String)]) -> String {
    if params.is_empty() {
        return base.to_owned();
    }
    let query: Vec<String> = params.iter().map(|(k, v)| format!("{k}={v}")).collect();
    format!("{base}?{}", query.join("&"))
}

/// `url` with the password of its user info, if any, replaced by `***`.
pub(crate) fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let end = rest.find('/').unwrap_or(rest.len());
    let Some(at) = rest[..end].rfind('@') else {
        return url.to_owned();
    };
    match rest[..at].split_once(':') {
        Some((user, _)) => format!("{scheme}://{user}:***{}", &rest[at..]),
        None => url.to_owned(),
    }
}

fn unknown(name: &str, params: &[(String, String)]) -> Result<(), CliError> {
    match params.first() {
        Some((k, _)) => Err(CliError::Usage(format!(
            "the {name} store URL takes no parameter {k:?}"
        ))),
        None => Ok(()),
    }
}

/// Opens the store `url` names. `dry_run`: only `settings` will be used
/// (NATS then connects in the background instead of failing at once).
pub(crate) async fn open(url: &str, timeout: Duration, dry_run: bool) -> Result<Store, CliError> {
    let name = redact(url);
    let scheme = url.split_once("://").map_or(url, |(s, _)| s);
    let _ = (&timeout, dry_run);
    match scheme {
        #[cfg(feature = "nats")]
        "nats" | "tls" => nats(url, name, timeout, dry_run).await,
        #[cfg(feature = "postgres")]
        "postgres" | "postgresql" => postgres(url, name, timeout),
        #[cfg(feature = "redis")]
        "redis" | "rediss" | "redis+sentinel" | "redis+unix" => redis(url, name, timeout),
        #[cfg(feature = "etcd")]
        "etcd" => etcd(url, name, timeout),
        #[cfg(feature = "sqlite")]
        "sqlite" => sqlite(url, name),
        other => Err(CliError::Usage(format!(
            "unsupported store {other:?} in {name}: this build knows {}",
            SCHEMES.join(", ")
        ))),
    }
}

/// The store URL schemes of this build.
const SCHEMES: &[&str] = &[
    #[cfg(feature = "nats")]
    "nats://HOST:PORT?bucket=B",
    #[cfg(feature = "postgres")]
    "postgres://…?table=[SCHEMA.]TABLE",
    #[cfg(feature = "redis")]
    "redis://…?prefix=P",
    #[cfg(feature = "etcd")]
    "etcd://HOST:PORT[/PREFIX]",
    #[cfg(feature = "sqlite")]
    "sqlite:///PATH?table=T",
];

#[cfg(feature = "nats")]
async fn nats(
    url: &str,
    name: String,
    timeout: Duration,
    dry_run: bool,
) -> Result<Store, CliError> {
    use leaseholder::backend::nats::NatsBackend;

    let (base, mut params) = split_query(url);
    let bucket = take(&mut params, "bucket").ok_or_else(|| {
        CliError::Usage(format!(
            "the NATS store URL needs the bucket: {base}?bucket=NAME"
        ))
    })?;
    unknown("NATS", &params)?;
    let options = async_nats::ConnectOptions::new()
        .name("leaseholder-cli")
        .connection_timeout(timeout);
    let options = if dry_run {
        options.retry_on_initial_connect()
    } else {
        options
    };
    let client = options.connect(base).await.map_err(|e| CliError::Connect {
        store: name.clone(),
        source: e.into(),
    })?;
    let nats = NatsBackend::try_new(client.clone(), &bucket)?;
    let registry = format!("KV_{}", nats.registry_bucket());
    Ok(Store {
        settings: nats.bucket_settings(),
        backend: Backend::new(nats),
        name,
        nats_registry: Some((client, registry)),
    })
}

#[cfg(feature = "postgres")]
fn postgres(url: &str, name: String, timeout: Duration) -> Result<Store, CliError> {
    use leaseholder::PostgresBackend;

    let (base, mut params) = split_query(url);
    let table = take(&mut params, "table");
    let mut builder = PostgresBackend::builder()
        .url(with_query(base, &params))
        .pool_size(2)
        .statement_timeout(timeout);
    match table
        .as_deref()
        .map(|t| t.split_once('.').unwrap_or(("", t)))
    {
        Some(("", table)) => builder = builder.table(table),
        Some((schema, table)) => builder = builder.schema(schema).table(table),
        None => {}
    }
    let pg = builder.build()?;
    let (schema, table) = pg.table();
    let settings = format!(
        "-- table \"{schema}\".\"{table}\" (and its candidate registry)\n{}",
        pg.ddl()
    );
    Ok(Store {
        settings,
        backend: Backend::postgres(pg),
        name,
        #[cfg(feature = "nats")]
        nats_registry: None,
    })
}

#[cfg(feature = "redis")]
fn redis(url: &str, name: String, timeout: Duration) -> Result<Store, CliError> {
    use leaseholder::RedisBackend;

    let (base, mut params) = split_query(url);
    let prefix = take(&mut params, "prefix");
    let mut builder = RedisBackend::builder()
        .url(with_query(base, &params))
        .connect_timeout(timeout);
    if let Some(prefix) = prefix {
        builder = builder.prefix(prefix);
    }
    let redis = builder.build()?;
    let example = leaseholder::Key::new("KEY")?;
    let settings = format!(
        "no schema: keys are created on first use\n\
         lease of a key: {}\n\
         last token of a key: {}\n\
         candidate registry of a key: {} and {}\n\
         epoch marker: {}\n\
         channel: {}\n",
        redis.lease_key(&example),
        redis.token_key(&example),
        redis.candidates_key(&example),
        redis.candidates_expiry_key(&example),
        redis.epoch_key(&example),
        redis.channel(),
    );
    Ok(Store {
        settings,
        backend: Backend::redis(redis),
        name,
        #[cfg(feature = "nats")]
        nats_registry: None,
    })
}

#[cfg(feature = "etcd")]
fn etcd(url: &str, name: String, timeout: Duration) -> Result<Store, CliError> {
    use leaseholder::EtcdBackend;

    let etcd = EtcdBackend::builder()
        .url(url)
        .connect_timeout(timeout)
        .build()?;
    let example = leaseholder::Key::new("KEY")?;
    let settings = format!(
        "no schema: keys are created on first use\n\
         lease of a key: {}\n\
         candidate registry of a key: {}/<candidate id>\n\
         epoch marker: {}\n\
         fresh-cluster marker: {}\n",
        etcd.lease_key(&example),
        etcd.candidate_key(&example, leaseholder::LeaderId::new())
            .rsplit_once('/')
            .map_or("", |(head, _)| head),
        etcd.epoch_key(),
        etcd.fresh_key(),
    );
    Ok(Store {
        settings,
        backend: Backend::etcd(etcd),
        name,
        #[cfg(feature = "nats")]
        nats_registry: None,
    })
}

#[cfg(feature = "sqlite")]
fn sqlite(url: &str, name: String) -> Result<Store, CliError> {
    use leaseholder::SqliteBackend;

    let (base, mut params) = split_query(url);
    let path = base
        .strip_prefix("sqlite://")
        .or_else(|| base.strip_prefix("sqlite:"))
        .unwrap_or(base);
    let table = take(&mut params, "table");
    unknown("SQLite", &params)?;
    let mut builder = SqliteBackend::builder().path(path);
    if let Some(table) = table {
        builder = builder.table(table);
    }
    let sqlite = builder.build()?;
    let settings = format!(
        "-- file {}, table {}\n{}",
        sqlite.path().display(),
        sqlite.table(),
        sqlite.ddl()
    );
    Ok(Store {
        settings,
        backend: Backend::sqlite(sqlite),
        name,
        #[cfg(feature = "nats")]
        nats_registry: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queries_split_and_rejoin() {
        let (base, mut params) = split_query("postgres://u@h/db?table=ops.t&sslmode=disable");
        assert_eq!(base, "postgres://u@h/db");
        assert_eq!(take(&mut params, "table").as_deref(), Some("ops.t"));
        assert_eq!(take(&mut params, "table"), None);
        assert_eq!(
            with_query(base, &params),
            "postgres://u@h/db?sslmode=disable"
        );
        assert_eq!(split_query("redis://h").1, Vec::new());
    }

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(redact("redis://u:secret@h:1/0"), "redis://u:***@h:1/0");
        assert_eq!(redact("postgres://u@h/db"), "postgres://u@h/db");
        assert_eq!(redact("nats://h:4222"), "nats://h:4222");
    }
}
