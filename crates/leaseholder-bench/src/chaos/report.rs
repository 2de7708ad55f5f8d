//! The run's report: `report.json` (the summary, per key) and SVG
//! timelines, one per key shown: the first keys over the first minute, and
//! every key with a violation over the whole run.
//!
//! A timeline has one row per candidate slot (a killed candidate's
//! successor takes its slot) and a row for the store. A bar is a work
//! interval, labelled with its instance and the last digits of its token;
//! shading behind it marks the faults on that slot (a pause of its
//! process, a cut or blackholed link), a cross a kill, a red tick a write
//! the fence refused. Faults of the store (restart, wipe, a member killed
//! or paused) are drawn on the store's row.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::Context as _;

use super::check::{FaultKind, Micros, Record, Report};

/// How many keys get a timeline of the first minute.
const FIRST_KEYS: usize = 3;

/// The span of those timelines.
const FIRST_SPAN: Micros = 60_000_000;

/// Writes `report.json` and the timelines into `dir` (created if needed);
/// returns the files written.
pub(crate) fn write(
    dir: &Path,
    summary: serde_json::Value,
    record: &Record,
    report: &Report,
) -> anyhow::Result<Vec<String>> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let keys = record.events.len();
    let mut per_key = Vec::with_capacity(keys);
    for key in 0..keys {
        let terms = report.terms.iter().filter(|t| t.key == key).count();
        per_key.push(serde_json::json!({
            "key": key,
            "terms": terms,
            "transitions": terms.saturating_sub(1),
            "refused_writes": report.refused.iter().filter(|r| r.0 == key).count(),
            "violations": report.violating_keys.get(&key).copied().unwrap_or(0),
        }));
    }
    let mut shown: Vec<(usize, Micros, Micros, &str)> = (0..keys.min(FIRST_KEYS))
        .map(|k| {
            (
                k,
                record.origin,
                (record.origin + FIRST_SPAN).min(record.end),
                "first minute",
            )
        })
        .collect();
    for &k in report.violating_keys.keys() {
        shown.push((k, record.origin, record.end, "whole run, with a violation"));
    }
    let mut files = Vec::new();
    for (key, from, to, what) in shown {
        let name = if what.starts_with("whole") {
            format!("timeline-key{key}-violation.svg")
        } else {
            format!("timeline-key{key}.svg")
        };
        let path = dir.join(&name);
        std::fs::write(&path, timeline(record, report, key, from, to, what))
            .with_context(|| format!("writing {}", path.display()))?;
        files.push(name);
    }
    let mut summary = summary;
    if let Some(obj) = summary.as_object_mut() {
        obj.insert("per_key".into(), serde_json::Value::Array(per_key));
        obj.insert("timelines".into(), serde_json::json!(files));
    }
    let path = dir.join("report.json");
    std::fs::write(&path, serde_json::to_string_pretty(&summary)? + "\n")
        .with_context(|| format!("writing {}", path.display()))?;
    files.push("report.json".into());
    Ok(files)
}

/// Colours of the instances' bars, by instance number.
const COLOURS: [&str; 6] = [
    "#4e79a7", "#59a14f", "#9c755f", "#b07aa1", "#76b7b2", "#edc948",
];

/// Key `key`'s timeline over `[from, to]`.
pub(crate) fn timeline(
    record: &Record,
    report: &Report,
    key: usize,
    from: Micros,
    to: Micros,
    what: &str,
) -> String {
    let slots = record
        .instances
        .iter()
        .map(|i| i.slot + 1)
        .max()
        .unwrap_or(1);
    let (left, width, row_h, top) = (90.0, 1100.0, 24.0, 44.0);
    let store_row = slots;
    let height = top + row_h * (slots + 1) as f64 + 60.0;
    let span = to.saturating_sub(from).max(1) as f64;
    let x = |t: Micros| left + width * (t.saturating_sub(from) as f64 / span).clamp(0.0, 1.0);
    let y = |row: usize| top + row_h * row as f64;
    let visible = |a: Micros, b: Micros| a < to && b > from;
    let secs = |t: Micros| t.saturating_sub(record.origin) as f64 / 1e6;

    let mut out = String::new();
    let total_w = left + width + 20.0;
    let _ = writeln!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{total_w}" height="{height}" font-family="sans-serif" font-size="11">"#
    );
    let _ = writeln!(out, r##"<rect width="100%" height="100%" fill="#fff"/>"##);
    let terms = report.terms.iter().filter(|t| t.key == key).count();
    let _ = writeln!(
        out,
        r#"<text x="10" y="18" font-weight="bold">key {key}: {what} ({:.0} s to {:.0} s); {} transitions over the run, {} writes refused</text>"#,
        secs(from),
        secs(to),
        terms.saturating_sub(1),
        report.refused.iter().filter(|r| r.0 == key).count()
    );
    for row in 0..=slots {
        let label = if row == store_row {
            "store".to_owned()
        } else {
            format!("slot {row}")
        };
        let _ = writeln!(
            out,
            r##"<text x="10" y="{:.1}">{label}</text><line x1="{left}" x2="{:.1}" y1="{:.1}" y2="{:.1}" stroke="#eee"/>"##,
            y(row) + row_h * 0.65,
            left + width,
            y(row) + row_h / 2.0,
            y(row) + row_h / 2.0
        );
    }
    // Faults first, so the bars are drawn over them.
    let slot_of = |inst: usize| record.instances.get(inst).map_or(0, |i| i.slot);
    for f in &record.faults {
        let end = if f.to == Micros::MAX {
            record.end
        } else {
            f.to
        };
        if !visible(f.from, end.max(f.from + 1)) {
            continue;
        }
        let (row, colour, label) = match f.kind {
            FaultKind::Pause => (slot_of(f.target), "#a0cbe8", ""),
            FaultKind::Cut => (f.target, "#ffbe7d", ""),
            FaultKind::Blackhole => (f.target, "#bab0ac", ""),
            FaultKind::Kill => {
                let cx = x(f.from);
                let cy = y(slot_of(f.target)) + row_h / 2.0;
                let _ = writeln!(
                    out,
                    r##"<path d="M{:.1},{:.1}l8,8m0,-8l-8,8" stroke="#000" stroke-width="2"/>"##,
                    cx - 4.0,
                    cy - 4.0
                );
                continue;
            }
            FaultKind::Restart => (store_row, "#e15759", "restart"),
            FaultKind::Wipe => (store_row, "#b6992d", "wipe"),
            FaultKind::MemberKill => (store_row, "#ff9d9a", "member kill"),
            FaultKind::MemberPause => (store_row, "#d4a6c8", "member pause"),
            FaultKind::MemberCut => (store_row, "#b07aa1", "member cut"),
        };
        let (x0, x1) = (x(f.from), x(end).max(x(f.from) + 2.0));
        let _ = writeln!(
            out,
            r#"<rect x="{x0:.1}" y="{:.1}" width="{:.1}" height="{row_h}" fill="{colour}" opacity="0.8"><title>{} {:.3} s to {:.3} s</title></rect>"#,
            y(row),
            x1 - x0,
            f.kind.name(),
            secs(f.from),
            secs(end)
        );
        if !label.is_empty() && x1 - x0 > 40.0 {
            let _ = writeln!(
                out,
                r#"<text x="{:.1}" y="{:.1}" font-size="9">{label}</text>"#,
                x0 + 2.0,
                y(row) + row_h * 0.65
            );
        }
    }
    for t in report.terms.iter().filter(|t| t.key == key) {
        if !visible(t.start, t.end.max(t.start + 1)) {
            continue;
        }
        let row = slot_of(t.inst);
        let (x0, x1) = (x(t.start), x(t.end).max(x(t.start) + 1.0));
        let colour = COLOURS[t.inst % COLOURS.len()];
        let _ = writeln!(
            out,
            r#"<rect x="{x0:.1}" y="{:.1}" width="{:.1}" height="{:.1}" fill="{colour}"><title>c{} token {} from {:.3} s to {:.3} s</title></rect>"#,
            y(row) + 5.0,
            x1 - x0,
            row_h - 10.0,
            t.inst,
            t.token,
            secs(t.start),
            secs(t.end)
        );
        if x1 - x0 > 70.0 {
            let _ = writeln!(
                out,
                r##"<text x="{:.1}" y="{:.1}" fill="#fff" font-size="9">c{} …{:04}</text>"##,
                x0 + 3.0,
                y(row) + row_h * 0.62,
                t.inst,
                t.token % 10_000
            );
        }
    }
    for &(_, inst, at) in report.refused.iter().filter(|r| r.0 == key) {
        if !visible(at, at + 1) {
            continue;
        }
        let row = slot_of(inst);
        let _ = writeln!(
            out,
            r##"<line x1="{0:.1}" x2="{0:.1}" y1="{1:.1}" y2="{2:.1}" stroke="#d00" stroke-width="2"/>"##,
            x(at),
            y(row),
            y(row) + row_h
        );
    }
    // Axis and legend.
    let axis = y(slots + 1) + 14.0;
    for i in 0..=10 {
        let t = from + (span * f64::from(i) / 10.0) as Micros;
        let _ = writeln!(
            out,
            r#"<text x="{:.1}" y="{axis:.1}" text-anchor="middle">{:.1} s</text>"#,
            x(t),
            secs(t)
        );
    }
    let legend = [
        ("#4e79a7", "work (bar per term)"),
        ("#a0cbe8", "process paused"),
        ("#ffbe7d", "link cut"),
        ("#bab0ac", "link blackholed"),
        ("#e15759", "store restart / quorum loss"),
        ("#ff9d9a", "member killed"),
        ("#d4a6c8", "member paused"),
        ("#d00", "write refused by the fence"),
        ("#000", "\u{d7} candidate killed"),
    ];
    let ly = axis + 20.0;
    for (i, (colour, text)) in legend.iter().enumerate() {
        let lx = left + 120.0 * i as f64;
        let _ = writeln!(
            out,
            r#"<rect x="{lx:.1}" y="{:.1}" width="10" height="10" fill="{colour}"/><text x="{:.1}" y="{ly:.1}" font-size="10">{text}</text>"#,
            ly - 9.0,
            lx + 13.0
        );
    }
    out.push_str("</svg>\n");
    out
}
