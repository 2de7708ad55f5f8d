//! Text, tables, colour and JSON.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anstyle::{AnsiColor, Style};
use leaseholder::{Candidate, Holder, Key};
use serde_json::{Value, json};

/// Styles, or none when colour is off.
#[derive(Clone, Copy)]
pub(crate) struct Paint {
    on: bool,
}

impl Paint {
    pub(crate) fn new(on: bool) -> Paint {
        Paint { on }
    }

    fn with(&self, style: Style, text: &str) -> String {
        if self.on {
            format!("{style}{text}{style:#}")
        } else {
            text.to_owned()
        }
    }

    pub(crate) fn key(&self, text: &str) -> String {
        self.with(Style::new().bold(), text)
    }
    pub(crate) fn holder(&self, text: &str) -> String {
        self.with(AnsiColor::Cyan.on_default(), text)
    }
    pub(crate) fn token(&self, text: &str) -> String {
        self.with(AnsiColor::Yellow.on_default(), text)
    }
    pub(crate) fn warn(&self, text: &str) -> String {
        self.with(AnsiColor::Red.on_default().bold(), text)
    }
    pub(crate) fn dim(&self, text: &str) -> String {
        self.with(Style::new().dimmed(), text)
    }
}

/// `2026-01-31T12:34:56Z` (UTC, whole seconds).
pub(crate) fn time(at: SystemTime) -> String {
    let secs = at
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// `4s`, `2m05s`, `3h02m`.
pub(crate) fn span(d: Duration) -> String {
    let s = d.as_secs();
    if s < 60 {
        if s < 10 && d.subsec_millis() > 0 {
            return format!("{:.1}s", d.as_secs_f64());
        }
        format!("{s}s")
    } else if s < 3600 {
        format!("{}m{:02}s", s / 60, s % 60)
    } else {
        format!("{}h{:02}m", s / 3600, s % 3600 / 60)
    }
}

/// How long ago `at` was, by this machine's clock (a hint: the holder's
/// clock wrote it).
pub(crate) fn ago(at: SystemTime) -> String {
    match SystemTime::now().duration_since(at) {
        Ok(d) => format!("{} ago", span(d)),
        Err(_) => "in the future (clock skew)".into(),
    }
}

/// Metadata as text if it is printable UTF-8, else hex; `-` if empty.
pub(crate) fn metadata(bytes: &[u8]) -> String {
    if bytes.is_empty() {
        return "-".into();
    }
    match std::str::from_utf8(bytes) {
        Ok(text) if !text.chars().any(char::is_control) => text.to_owned(),
        _ => format!("0x{}", hex(bytes)),
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn metadata_json(bytes: &[u8]) -> Value {
    match std::str::from_utf8(bytes) {
        Ok(text) => json!(text),
        Err(_) => Value::Null,
    }
}

/// A holder as JSON (the key included).
pub(crate) fn holder_json(key: &Key, h: &Holder) -> Value {
    json!({
        "key": key.as_str(),
        "foreign": h.is_foreign(),
        "holder": h.id().map(|id| id.to_string()),
        "token": h.token().map(|t| t.get()),
        "since": h.since().map(time),
        "since_unix_ms": h.since().and_then(|s| s.duration_since(UNIX_EPOCH).ok()).map(|d| d.as_millis() as u64),
        "expires_in_ms": h.expires_in().map(|d| d.as_millis() as u64),
        "revision": h.revision(),
        "metadata": metadata_json(h.metadata()),
        "metadata_hex": hex(h.metadata()),
    })
}

/// A candidate as JSON.
pub(crate) fn candidate_json(c: &Candidate) -> Value {
    json!({
        "id": c.id().to_string(),
        "priority": c.priority(),
        "since": time(c.since()),
        "metadata": metadata_json(c.metadata()),
        "metadata_hex": hex(c.metadata()),
    })
}

/// The cells of a holder's row: holder, token, since, expires, metadata.
pub(crate) fn holder_cells(h: &Holder, paint: Paint) -> Vec<(String, String)> {
    let cell = |plain: String, painted: String| (plain, painted);
    if h.is_foreign() {
        let text = "(foreign value)".to_owned();
        return vec![
            cell(text.clone(), paint.warn(&text)),
            cell("-".into(), "-".into()),
            cell("-".into(), "-".into()),
            expires_cell(h),
            cell("-".into(), "-".into()),
        ];
    }
    let id = h.id().map_or_else(|| "-".into(), |id| id.to_string());
    let token = h.token().map_or_else(|| "-".into(), |t| t.to_string());
    let since = h
        .since()
        .map_or_else(|| "-".into(), |s| format!("{} ({})", time(s), ago(s)));
    let meta = metadata(h.metadata());
    vec![
        cell(id.clone(), paint.holder(&id)),
        cell(token.clone(), paint.token(&token)),
        cell(since.clone(), since),
        expires_cell(h),
        cell(meta.clone(), meta),
    ]
}

fn expires_cell(h: &Holder) -> (String, String) {
    let text = h
        .expires_in()
        .map_or_else(|| "-".into(), |d| format!("in {}", span(d)));
    (text.clone(), text)
}

/// An aligned table: `rows` of (plain, painted) cells; widths from the
/// plain text, so escape codes never break the alignment.
pub(crate) fn table(header: &[&str], rows: &[Vec<(String, String)>], paint: Paint) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (i, (plain, _)) in row.iter().enumerate() {
            if let Some(w) = widths.get_mut(i) {
                *w = (*w).max(plain.chars().count());
            }
        }
    }
    let line = |cells: Vec<(String, String)>| {
        let last = cells.len().saturating_sub(1);
        let mut out = String::new();
        for (i, (plain, painted)) in cells.into_iter().enumerate() {
            out.push_str(&painted);
            if i < last {
                let pad = widths
                    .get(i)
                    .copied()
                    .unwrap_or(0)
                    .saturating_sub(plain.chars().count());
                out.push_str(&" ".repeat(pad + 2));
            }
        }
        out.push('\n');
        out
    };
    let mut out = line(
        header
            .iter()
            .map(|h| (h.to_string(), paint.dim(h)))
            .collect(),
    );
    for row in rows {
        out.push_str(&line(row.clone()));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_are_rfc3339_utc() {
        assert_eq!(time(UNIX_EPOCH), "1970-01-01T00:00:00Z");
        let at = UNIX_EPOCH + Duration::from_secs(1_709_210_096); // a leap day
        assert_eq!(time(at), "2024-02-29T12:34:56Z");
    }

    #[test]
    fn spans_read_well() {
        assert_eq!(span(Duration::from_millis(2500)), "2.5s");
        assert_eq!(span(Duration::from_secs(42)), "42s");
        assert_eq!(span(Duration::from_secs(125)), "2m05s");
        assert_eq!(span(Duration::from_secs(3720)), "1h02m");
    }

    #[test]
    fn metadata_is_text_or_hex() {
        assert_eq!(metadata(b""), "-");
        assert_eq!(metadata(b"host=a"), "host=a");
        assert_eq!(metadata(&[0xff, 0x00]), "0xff00");
    }

    #[test]
    fn tables_align_on_plain_text() {
        let paint = Paint::new(true);
        let rows = vec![vec![
            ("a".to_owned(), paint.key("a")),
            ("1".to_owned(), paint.token("1")),
        ]];
        let out = table(&["KEY", "TOKEN"], &rows, Paint::new(false));
        assert!(out.starts_with("KEY  TOKEN\n"));
        let plain = table(
            &["KEY", "TOKEN"],
            &[vec![("a".into(), "a".into()), ("1".into(), "1".into())]],
            Paint::new(false),
        );
        assert_eq!(plain, "KEY  TOKEN\na    1\n");
    }
}
