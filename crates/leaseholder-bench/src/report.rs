//! Results as JSON, a markdown table and SVG files.

use std::fmt::Write;
use std::path::Path;

use crate::stats::summarize;

/// One line of the results: a distribution of samples, or a single figure.
pub(crate) struct Row {
    pub(crate) backend: String,
    pub(crate) imp: &'static str,
    pub(crate) scenario: String,
    pub(crate) unit: &'static str,
    pub(crate) samples: Vec<f64>,
    /// `(text, limit)`: met when p99 (a single figure: its value) <= limit.
    pub(crate) target: Option<(String, f64)>,
    pub(crate) svg: Option<String>,
    pub(crate) note: String,
}

fn json_str(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn num(v: f64) -> String {
    if v.is_finite() {
        format!("{v}")
    } else {
        "null".to_owned()
    }
}

/// The noleader row matching `row`, if any.
fn noleader_of<'a>(rows: &'a [Row], row: &Row) -> Option<&'a Row> {
    rows.iter().find(|r| {
        r.imp == "noleader" && r.backend == row.backend && base(&r.scenario) == base(&row.scenario)
    })
}

/// The scenario name without its ttl.
fn base(s: &str) -> &str {
    s.split(" (ttl").next().unwrap_or(s)
}

fn ratio(rows: &[Row], row: &Row) -> Option<f64> {
    if row.imp == "noleader" {
        return None;
    }
    let ours = summarize(&row.samples)?;
    let theirs = summarize(&noleader_of(rows, row)?.samples)?;
    (theirs.median > 0.0).then(|| ours.median / theirs.median)
}

pub(crate) fn json(rows: &[Row], meta: &[(&str, String)]) -> String {
    let mut out = String::from("{\n");
    for (k, v) in meta {
        let _ = writeln!(out, "  {}: {},", json_str(k), json_str(v));
    }
    out.push_str("  \"rows\": [\n");
    for (i, r) in rows.iter().enumerate() {
        let s = summarize(&r.samples);
        let _ = write!(
            out,
            "    {{\"backend\": {}, \"implementation\": {}, \"scenario\": {}, \"unit\": {}, \"n\": {}, \"median\": {}, \"p99\": {}, \"max\": {}, \"ratio_to_noleader_median\": {}, \"target\": {}, \"target_met\": {}, \"timeline\": {}, \"note\": {}, \"samples\": [{}]}}",
            json_str(&r.backend),
            json_str(r.imp),
            json_str(&r.scenario),
            json_str(r.unit),
            r.samples.len(),
            s.map_or("null".into(), |s| num(s.median)),
            s.map_or("null".into(), |s| num(s.p99)),
            s.map_or("null".into(), |s| num(s.max)),
            ratio(rows, r).map_or("null".into(), num),
            r.target.as_ref().map_or("null".into(), |t| json_str(&t.0)),
            met(r).map_or("null".into(), |m| m.to_string()),
            r.svg.as_deref().map_or("null".into(), json_str),
            json_str(&r.note),
            r.samples
                .iter()
                .map(|v| num(*v))
                .collect::<Vec<_>>()
                .join(", ")
        );
        out.push_str(if i + 1 < rows.len() { ",\n" } else { "\n" });
    }
    out.push_str("  ]\n}\n");
    out
}

fn met(r: &Row) -> Option<bool> {
    let (_, limit) = r.target.as_ref()?;
    let s = summarize(&r.samples)?;
    Some(s.p99 <= *limit)
}

fn fmt(v: f64) -> String {
    if v == 0.0 {
        "0".into()
    } else if v.abs() >= 100.0 {
        format!("{v:.0}")
    } else if v.abs() >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    }
}

pub(crate) fn markdown(rows: &[Row], header: &str) -> String {
    let mut out = String::from(header);
    out.push_str("\n| backend | implementation | scenario | unit | n | median | p99 | max | ours / noleader (median) | target | met | timeline | note |\n");
    out.push_str("|---|---|---|---|---|---|---|---|---|---|---|---|---|\n");
    for r in rows {
        let s = summarize(&r.samples);
        let cell =
            |f: fn(&crate::stats::Summary) -> f64| s.as_ref().map_or("–".into(), |s| fmt(f(s)));
        let ratio = ratio(rows, r).map_or(String::new(), |x| {
            if x > 0.0 && x < 1.0 {
                format!("{} ({:.0}x faster)", fmt(x), 1.0 / x)
            } else {
                fmt(x)
            }
        });
        let met = match met(r) {
            Some(true) => "yes",
            Some(false) => "**no**",
            None => "",
        };
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            r.backend,
            r.imp,
            r.scenario,
            r.unit,
            r.samples.len(),
            cell(|s| s.median),
            cell(|s| s.p99),
            cell(|s| s.max),
            ratio,
            r.target.as_ref().map_or("", |t| t.0.as_str()),
            met,
            r.svg
                .as_deref()
                .map_or(String::new(), |f| format!("[svg]({f})")),
            r.note
        );
    }
    out
}

pub(crate) fn write(dir: &Path, name: &str, text: &str) -> anyhow::Result<()> {
    let path = dir.join(name);
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::write(path, text)?;
    Ok(())
}
