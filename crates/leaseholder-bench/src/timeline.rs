//! SVG timelines: one row per candidate, a bar where its work ran, marks
//! where the bench shut one down (SIGTERM) or crashed it (SIGKILL).

use std::fmt::Write;

use tokio::time::Instant;

use crate::fleet::{Ev, Event};

/// Renders the window `[from, to]` of `log`; times are labelled in ms from
/// `zero` (the moment the scenario acted).
pub(crate) fn svg(title: &str, log: &[Event], zero: Instant, from: Instant, to: Instant) -> String {
    let rows = log.iter().map(|e| e.who + 1).max().unwrap_or(1);
    let (left, width, row_h, top) = (110.0, 640.0, 26.0, 40.0);
    let height = top + row_h * rows as f64 + 40.0;
    let span = (to - from).as_secs_f64().max(1e-9);
    let x = |t: Instant| {
        let s = if t >= from {
            (t - from).as_secs_f64()
        } else {
            -((from - t).as_secs_f64())
        };
        left + width * (s / span).clamp(0.0, 1.0)
    };
    let rel_ms = |t: Instant| {
        if t >= zero {
            (t - zero).as_secs_f64() * 1e3
        } else {
            -(zero - t).as_secs_f64() * 1e3
        }
    };
    let mut out = String::new();
    let total_w = left + width + 30.0;
    let _ = writeln!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{total_w}" height="{height}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(out, r##"<rect width="100%" height="100%" fill="#fff"/>"##);
    let _ = writeln!(
        out,
        r#"<text x="10" y="20" font-weight="bold">{}</text>"#,
        escape(title)
    );
    for row in 0..rows {
        let y = top + row_h * row as f64;
        let _ = writeln!(
            out,
            r#"<text x="10" y="{}">candidate {row}</text>"#,
            y + row_h * 0.65
        );
        let _ = writeln!(
            out,
            r##"<line x1="{left}" x2="{}" y1="{}" y2="{}" stroke="#ddd"/>"##,
            left + width,
            y + row_h / 2.0,
            y + row_h / 2.0
        );
    }
    // Bars: from each Start to the candidate's next Stop, Kill or Exit.
    let mut open: Vec<Option<(Instant, u64)>> = vec![None; rows];
    let mut bars = Vec::new();
    for e in log {
        match e.ev {
            Ev::Start(token) => open[e.who] = Some((e.at, token)),
            Ev::Stop(_) | Ev::Kill | Ev::Exit => {
                if let Some((s, token)) = open[e.who].take() {
                    bars.push((e.who, s, e.at, token));
                }
            }
            _ => {}
        }
    }
    for (who, o) in open.iter().enumerate() {
        if let Some((s, token)) = o {
            bars.push((who, *s, to, *token));
        }
    }
    for (who, s, e, token) in bars {
        if e < from || s > to {
            continue;
        }
        let (x1, x2) = (x(s), x(e));
        let y = top + row_h * who as f64 + 5.0;
        let _ = writeln!(
            out,
            r##"<rect x="{x1:.1}" y="{y}" width="{:.1}" height="{}" fill="#4a90d9"><title>candidate {who} leads, token {token}: {:.2} ms .. {:.2} ms</title></rect>"##,
            (x2 - x1).max(1.0),
            row_h - 10.0,
            rel_ms(s),
            rel_ms(e)
        );
    }
    for e in log {
        if e.at < from || e.at > to {
            continue;
        }
        let (color, label) = match e.ev {
            Ev::Term => ("#e69500", "SIGTERM"),
            Ev::Kill => ("#d0021b", "SIGKILL"),
            _ => continue,
        };
        let cx = x(e.at);
        let y = top + row_h * e.who as f64;
        let _ = writeln!(
            out,
            r#"<line x1="{cx:.1}" x2="{cx:.1}" y1="{y}" y2="{}" stroke="{color}" stroke-width="2"/><text x="{:.1}" y="{}" fill="{color}" font-size="10">{label}</text>"#,
            y + row_h,
            cx + 3.0,
            y + 9.0
        );
    }
    // Axis: five ticks, in ms from the action.
    let axis_y = top + row_h * rows as f64 + 15.0;
    for k in 0..=4 {
        let t = from + (to - from).mul_f64(f64::from(k) / 4.0);
        let _ = writeln!(
            out,
            r##"<text x="{:.1}" y="{axis_y}" text-anchor="middle" fill="#555">{}</text>"##,
            x(t),
            fmt_ms(rel_ms(t))
        );
    }
    let _ = writeln!(
        out,
        r##"<text x="{}" y="{}" text-anchor="end" fill="#555">time from the action</text>"##,
        left + width,
        axis_y + 16.0
    );
    out.push_str("</svg>\n");
    out
}

fn fmt_ms(v: f64) -> String {
    if v.abs() >= 1000.0 {
        format!("{:.2} s", v / 1e3)
    } else {
        format!("{v:.2} ms")
    }
}

/// Escapes text for an SVG document.
pub(crate) fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}
