//! The scale graph: CPU (% of one core) and resident memory (MiB) of one
//! process against the number of keys it holds, both axes logarithmic, one
//! line per backend, with a dotted line of slope one (cost proportional to
//! the key count) through each panel's first backend's first point: a line
//! parallel to it grows linearly, a steeper one faster.

use std::fmt::Write;

use crate::timeline::escape;

/// One measured point: backend, keys, CPU %, resident KiB.
pub(crate) struct Point {
    pub(crate) backend: String,
    pub(crate) keys: usize,
    pub(crate) cpu_pct: f64,
    pub(crate) rss_kib: f64,
}

/// What a panel plots of a point.
type Value = fn(&Point) -> f64;

const COLOURS: [&str; 5] = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e"];

/// Renders the two panels side by side.
pub(crate) fn svg(title: &str, points: &[Point]) -> String {
    let mut backends: Vec<&str> = Vec::new();
    for p in points {
        if !backends.contains(&p.backend.as_str()) {
            backends.push(&p.backend);
        }
    }
    let (panel_w, panel_h, left, top, gap) = (380.0, 300.0, 60.0, 50.0, 90.0);
    let width = left + 2.0 * panel_w + gap + 30.0;
    let height = top + panel_h + 50.0 + 20.0 * backends.len() as f64;
    let mut out = String::new();
    let _ = writeln!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(out, r##"<rect width="100%" height="100%" fill="#fff"/>"##);
    let _ = writeln!(
        out,
        r#"<text x="10" y="20" font-weight="bold">{}</text>"#,
        escape(title)
    );
    let panels: [(&str, Value); 2] = [
        ("CPU, % of one core", |p| p.cpu_pct),
        ("resident memory, MiB", |p| p.rss_kib / 1024.0),
    ];
    for (i, (label, value)) in panels.iter().enumerate() {
        let x0 = left + i as f64 * (panel_w + gap);
        panel(
            &mut out,
            label,
            points,
            &backends,
            *value,
            (x0, top, panel_w, panel_h),
        );
    }
    for (i, b) in backends.iter().enumerate() {
        let y = top + panel_h + 45.0 + 20.0 * i as f64;
        let colour = COLOURS[i % COLOURS.len()];
        let _ = writeln!(
            out,
            r#"<line x1="{left}" x2="{}" y1="{y}" y2="{y}" stroke="{colour}" stroke-width="2"/><text x="{}" y="{}">{}</text>"#,
            left + 30.0,
            left + 40.0,
            y + 4.0,
            escape(b)
        );
    }
    let y = top + panel_h + 45.0 + 20.0 * backends.len() as f64;
    let _ = writeln!(
        out,
        r##"<text x="{}" y="{}" fill="#555">dotted: proportional to the key count (slope 1)</text>"##,
        left + 200.0,
        y - 16.0
    );
    out.push_str("</svg>\n");
    out
}

fn panel(
    out: &mut String,
    label: &str,
    points: &[Point],
    backends: &[&str],
    value: Value,
    (x0, y0, w, h): (f64, f64, f64, f64),
) {
    let usable: Vec<&Point> = points
        .iter()
        .filter(|p| p.keys > 0 && value(p) > 0.0)
        .collect();
    let (kmin, kmax) = usable.iter().fold((f64::MAX, f64::MIN), |(a, b), p| {
        let k = p.keys as f64;
        (a.min(k), b.max(k))
    });
    let (vmin, vmax) = usable.iter().fold((f64::MAX, f64::MIN), |(a, b), p| {
        (a.min(value(p)), b.max(value(p)))
    });
    let _ = writeln!(
        out,
        r##"<rect x="{x0}" y="{y0}" width="{w}" height="{h}" fill="none" stroke="#999"/><text x="{x0}" y="{}" font-weight="bold">{}</text>"##,
        y0 - 8.0,
        escape(label)
    );
    if usable.is_empty() {
        return;
    }
    // Decades that cover the data.
    let (lk0, lk1) = (
        kmin.log10().floor(),
        kmax.log10().ceil().max(kmin.log10().floor() + 1.0),
    );
    let (lv0, lv1) = (
        vmin.log10().floor(),
        vmax.log10().ceil().max(vmin.log10().floor() + 1.0),
    );
    let x = |k: f64| x0 + w * (k.log10() - lk0) / (lk1 - lk0);
    let y = |v: f64| y0 + h - h * (v.log10() - lv0) / (lv1 - lv0);
    let mut d = lk0;
    while d <= lk1 + 1e-9 {
        let xv = x(10f64.powf(d));
        let _ = writeln!(
            out,
            r##"<line x1="{xv}" x2="{xv}" y1="{y0}" y2="{}" stroke="#eee"/><text x="{xv}" y="{}" text-anchor="middle">{}</text>"##,
            y0 + h,
            y0 + h + 16.0,
            fmt_decade(d)
        );
        d += 1.0;
    }
    let mut d = lv0;
    while d <= lv1 + 1e-9 {
        let yv = y(10f64.powf(d));
        let _ = writeln!(
            out,
            r##"<line x1="{x0}" x2="{}" y1="{yv}" y2="{yv}" stroke="#eee"/><text x="{}" y="{}" text-anchor="end">{}</text>"##,
            x0 + w,
            x0 - 4.0,
            yv + 4.0,
            fmt_decade(d)
        );
        d += 1.0;
    }
    let _ = writeln!(
        out,
        r#"<text x="{}" y="{}" text-anchor="middle">keys in one process</text>"#,
        x0 + w / 2.0,
        y0 + h + 32.0
    );
    for (i, b) in backends.iter().enumerate() {
        let mut line: Vec<&Point> = usable.iter().copied().filter(|p| p.backend == *b).collect();
        line.sort_by_key(|p| p.keys);
        let colour = COLOURS[i % COLOURS.len()];
        let path: Vec<String> = line
            .iter()
            .map(|p| format!("{:.1},{:.1}", x(p.keys as f64), y(value(p))))
            .collect();
        let _ = writeln!(
            out,
            r#"<polyline points="{}" fill="none" stroke="{colour}" stroke-width="2"/>"#,
            path.join(" ")
        );
        for p in &line {
            let _ = writeln!(
                out,
                r#"<circle cx="{:.1}" cy="{:.1}" r="3" fill="{colour}"><title>{} {} keys: {:.3}</title></circle>"#,
                x(p.keys as f64),
                y(value(p)),
                escape(b),
                p.keys,
                value(p)
            );
        }
        // The slope-one guide through the first backend's first point.
        if i == 0
            && let Some(first) = line.first()
        {
            let (k1, v1) = (first.keys as f64, value(first));
            // To the right edge, or to the top edge if it gets there first.
            let k2 = 10f64.powf(lk1).min(k1 * 10f64.powf(lv1) / v1);
            let v2 = v1 * k2 / k1;
            let _ = writeln!(
                out,
                r##"<line x1="{:.1}" y1="{:.1}" x2="{:.1}" y2="{:.1}" stroke="#777" stroke-dasharray="3,4"/>"##,
                x(k1),
                y(v1),
                x(k2),
                y(v2),
            );
        }
    }
}

fn fmt_decade(d: f64) -> String {
    let v = 10f64.powf(d);
    if v >= 1.0 {
        let n = v.round() as u64;
        match n {
            1_000_000.. => format!("{}M", n / 1_000_000),
            1_000.. => format!("{}k", n / 1_000),
            _ => n.to_string(),
        }
    } else {
        format!("{v}")
    }
}
