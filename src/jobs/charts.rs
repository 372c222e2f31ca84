//! Loss and learning-rate charts as SVG, drawn on the server (no JS chart library): the dashboard
//! swaps a fresh chart in over SSE as steps arrive.

use std::fmt::Write;

/// Most points drawn per line; longer series are averaged into this many buckets.
const MAX_POINTS: usize = 400;

const W: f64 = 640.0;
const H: f64 = 200.0;
const LEFT: f64 = 56.0;
const RIGHT: f64 = 10.0;
const TOP: f64 = 12.0;
const BOTTOM: f64 = 22.0;

/// One line: (step, value) points, drawn with a CSS class (`raw`, `smooth`, `lr`).
pub struct Line<'a> {
    pub points: &'a [(f64, f64)],
    pub class: &'static str,
    pub label: &'static str,
    /// Mark each point (a sparse series, such as the validation loss, that a line alone would
    /// hide while it has one point).
    pub dots: bool,
}

/// A debiased exponential moving average (TensorBoard's smoothing, weight 0.9): follows the trend
/// without the first values being pulled towards zero.
pub fn smooth(points: &[(f64, f64)], weight: f64) -> Vec<(f64, f64)> {
    let mut last = 0.0;
    let mut debias = 1.0;
    points
        .iter()
        .map(|&(x, y)| {
            last = last * weight + (1.0 - weight) * y;
            debias *= weight;
            (x, last / (1.0 - debias))
        })
        .collect()
}

/// Averages a long series into at most `MAX_POINTS` points.
fn downsample(points: &[(f64, f64)]) -> Vec<(f64, f64)> {
    if points.len() <= MAX_POINTS {
        return points.to_vec();
    }
    let per = points.len().div_ceil(MAX_POINTS);
    points
        .chunks(per)
        .map(|c| {
            let n = c.len() as f64;
            (c.iter().map(|p| p.0).sum::<f64>() / n, c.iter().map(|p| p.1).sum::<f64>() / n)
        })
        .collect()
}

/// A compact number: 3 significant digits, scientific for very small or large values.
pub fn short(v: f64) -> String {
    let a = v.abs();
    if v == 0.0 {
        "0".into()
    } else if !(1e-3..1e5).contains(&a) {
        format!("{v:.1e}")
    } else if a >= 100.0 {
        format!("{v:.0}")
    } else if a >= 10.0 {
        format!("{v:.1}")
    } else if a >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    }
}

/// An axis label precise enough to tell the ticks of a narrow range apart (0.00495 vs 0.00505).
fn tick(v: f64, range: f64) -> String {
    let a = v.abs();
    if v == 0.0 || range <= 0.0 || !range.is_finite() {
        return short(v);
    }
    // Significant digits: enough for the step between ticks (half the range).
    let digits = ((a / (range / 2.0)).log10().ceil().max(0.0) as usize + 1).min(6);
    if !(1e-3..1e5).contains(&a) {
        format!("{v:.*e}", digits.saturating_sub(1).max(1))
    } else {
        let decimals = (digits as i32 - 1 - a.log10().floor() as i32).clamp(0, 8) as usize;
        format!("{v:.decimals$}")
    }
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

/// An SVG line chart with a y axis (min, middle, max), the first and last step, and a legend.
pub fn line_chart(title: &str, lines: &[Line]) -> String {
    let lines: Vec<(Vec<(f64, f64)>, &Line)> = lines
        .iter()
        .map(|l| (downsample(&l.points.iter().copied().filter(|p| p.0.is_finite() && p.1.is_finite()).collect::<Vec<_>>()), l))
        .collect();
    let mut svg = String::new();
    let _ = write!(
        svg,
        r#"<svg class="chart" viewBox="0 0 {W} {H}" preserveAspectRatio="none" role="img" aria-label="{}"><title>{}</title>"#,
        escape(title),
        escape(title)
    );
    let all: Vec<&(f64, f64)> = lines.iter().flat_map(|(p, _)| p.iter()).collect();
    if all.is_empty() {
        let _ = write!(svg, r#"<text class="empty" x="{}" y="{}" text-anchor="middle">no steps yet</text></svg>"#, W / 2.0, H / 2.0);
        return svg;
    }
    let (mut x0, mut x1) = (f64::MAX, f64::MIN);
    let (mut y0, mut y1) = (f64::MAX, f64::MIN);
    for (x, y) in all.iter().map(|p| (p.0, p.1)) {
        x0 = x0.min(x);
        x1 = x1.max(x);
        y0 = y0.min(y);
        y1 = y1.max(y);
    }
    if x1 <= x0 {
        x1 = x0 + 1.0;
    }
    if y1 <= y0 {
        let pad = if y0 == 0.0 { 1.0 } else { y0.abs() * 0.1 };
        (y0, y1) = (y0 - pad, y1 + pad);
    } else {
        let pad = (y1 - y0) * 0.05;
        // Padding never takes a non-negative series (a learning rate, a loss) below zero.
        (y0, y1) = (if y0 >= 0.0 { (y0 - pad).max(0.0) } else { y0 - pad }, y1 + pad);
    }
    let px = |x: f64| LEFT + (x - x0) / (x1 - x0) * (W - LEFT - RIGHT);
    let py = |y: f64| TOP + (1.0 - (y - y0) / (y1 - y0)) * (H - TOP - BOTTOM);
    // Grid and y labels.
    for y in [y1, (y0 + y1) / 2.0, y0] {
        let _ = write!(
            svg,
            r#"<line class="grid" x1="{LEFT}" x2="{}" y1="{py:.1}" y2="{py:.1}"/><text class="axis" x="{}" y="{:.1}" text-anchor="end">{}</text>"#,
            W - RIGHT,
            LEFT - 4.0,
            py(y) + 4.0,
            tick(y, y1 - y0),
            py = py(y)
        );
    }
    let _ = write!(
        svg,
        r#"<text class="axis" x="{LEFT}" y="{}">step {}</text><text class="axis" x="{}" y="{}" text-anchor="end">{}</text>"#,
        H - 6.0,
        x0.round(),
        W - RIGHT,
        H - 6.0,
        x1.round()
    );
    for (points, line) in &lines {
        let mut d = String::new();
        for (i, (x, y)) in points.iter().enumerate() {
            let _ = write!(d, "{}{:.1},{:.1}", if i == 0 { "M" } else { " L" }, px(*x), py(*y));
        }
        let _ = write!(svg, r#"<path class="line {}" d="{d}"/>"#, line.class);
        if line.dots {
            for (x, y) in points {
                let _ = write!(svg, r#"<circle class="dot {}" cx="{:.1}" cy="{:.1}" r="3"/>"#, line.class, px(*x), py(*y));
            }
        }
    }
    let mut lx = LEFT + 8.0;
    for (_, line) in &lines {
        let _ = write!(svg, r#"<text class="legend {}" x="{lx:.0}" y="{}">{}</text>"#, line.class, TOP + 10.0, escape(line.label));
        lx += 8.0 * line.label.len() as f64 + 16.0;
    }
    svg.push_str("</svg>");
    svg
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draws_lines_and_handles_empty_and_flat_series() {
        assert!(line_chart("Loss", &[]).contains("no steps yet"));
        let flat = [(1.0, 0.5), (2.0, 0.5)];
        let svg = line_chart("Loss", &[Line { points: &flat, class: "raw", label: "loss", dots: false }]);
        assert!(svg.contains(r#"class="line raw""#) && !svg.contains("NaN"), "{svg}");
        let long: Vec<(f64, f64)> = (0..5000).map(|i| (i as f64, (i as f64).sin())).collect();
        let svg = line_chart("Loss", &[Line { points: &long, class: "raw", label: "loss", dots: false }]);
        assert!(svg.matches(" L").count() < MAX_POINTS, "downsampled");
        assert_ne!(tick(0.00495, 0.0001), tick(0.00505, 0.0001), "narrow ranges get more digits");
        assert_eq!(tick(0.25, 0.1), "0.25");
        let s = smooth(&[(0.0, 1.0), (1.0, 1.0)], 0.9);
        assert!((s[0].1 - 1.0).abs() < 1e-12 && (s[1].1 - 1.0).abs() < 1e-12, "debiased: {s:?}");
    }
}
