//! The command line.

use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};

/// Show, watch and force-release leaseholder leases, and set up the store.
#[derive(Debug, Parser)]
#[command(name = "leaseholder", version, about, long_about = None)]
pub(crate) struct Args {
    /// The store, as a URL:
    /// nats://HOST:PORT[,HOST:PORT…]?bucket=B,
    /// postgres://USER@HOST:PORT/DB?table=[SCHEMA.]TABLE,
    /// redis://HOST:PORT[/DB]?prefix=P (or redis+sentinel://…),
    /// etcd://HOST:PORT[,HOST:PORT…][/PREFIX],
    /// sqlite:///PATH?table=T.
    #[arg(long, short, env = "LEASEHOLDER_STORE", value_name = "URL")]
    pub(crate) store: String,

    /// How long one store call may take (e.g. 5s, 500ms).
    #[arg(long, default_value = "5s", value_parser = parse_duration, value_name = "DURATION")]
    pub(crate) timeout: Duration,

    /// Colour: auto (when stdout is a terminal and NO_COLOR is unset),
    /// always or never.
    #[arg(long, value_enum, default_value_t = Color::Auto)]
    pub(crate) color: Color,

    #[command(subcommand)]
    pub(crate) command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum Color {
    Auto,
    Always,
    Never,
}

#[derive(Debug, Subcommand)]
pub(crate) enum Command {
    /// Every key with a live lease: holder, token, since, expiry, metadata.
    List {
        /// One JSON array instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// One key in full, with its candidates where the store keeps them.
    Show {
        /// The key.
        key: String,
        /// JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// One line per change of term (a handover, a vacancy), until Ctrl-C.
    Watch {
        /// The key; without it, every key (new keys are found by listing
        /// again every --poll).
        key: Option<String>,
        /// One JSON object per line instead of text.
        #[arg(long)]
        json: bool,
        /// Read the store at least this often (e.g. 1s).
        #[arg(long, default_value = "1s", value_parser = parse_duration, value_name = "DURATION")]
        poll: Duration,
        /// Stop after printing this many lines.
        #[arg(long, value_name = "N")]
        count: Option<u64>,
    },
    /// End the current lease of KEY so that the next candidate takes over
    /// now, with a larger fencing token.
    ///
    /// The old leader is not stopped by the store: it finds out at its next
    /// renewal (at once on stores whose watch reports releases) and cancels
    /// its work. Until then both may run: only fencing tokens protect
    /// writes made in that window. Prefer Leader::resign where you can.
    Release {
        /// The key.
        key: String,
        /// Required: confirms you mean to end another process's lease.
        #[arg(long)]
        force: bool,
        /// Do not ask for confirmation on stdin.
        #[arg(long, short)]
        yes: bool,
    },
    /// Create the bucket or table, or check an existing one, and print the
    /// settings or DDL it uses.
    Setup {
        /// Print the settings or DDL without creating or checking anything.
        #[arg(long)]
        dry_run: bool,
    },
}

/// `5s`, `500ms`, `2m`, `1h`, or plain seconds (`1.5`).
pub(crate) fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: f64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a duration (e.g. 5s, 500ms, 2m)"))?;
    let scale = match unit.trim() {
        "" | "s" => 1.0,
        "ms" => 0.001,
        "m" => 60.0,
        "h" => 3600.0,
        other => return Err(format!("unknown unit {other:?} (use ms, s, m or h)")),
    };
    let duration = Duration::try_from_secs_f64(number * scale).map_err(|e| e.to_string())?;
    if duration.is_zero() {
        return Err("the duration must be greater than zero".into());
    }
    Ok(duration)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("5s"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1.5"), Ok(Duration::from_millis(1500)));
        assert!(parse_duration("0s").is_err());
        assert!(parse_duration("soon").is_err());
        assert!(parse_duration("5d").is_err());
    }

    #[test]
    fn the_command_line_is_consistent() {
        use clap::CommandFactory;
        Args::command().debug_assert();
    }
}
