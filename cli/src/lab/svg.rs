//! Small standalone SVG plots (no plotting dependency): latency CDFs and
//! time series.

/// One curve: a label and sorted samples in milliseconds.
pub struct Curve<'a> {
    /// Legend text.
    pub label: &'a str,
    /// Sorted samples (ms).
    pub sorted_ms: &'a [f64],
    /// Stroke colour.
    pub color: &'a str,
}

/// Renders CDF curves on a logarithmic millisecond axis.
pub fn cdf(title: &str, curves: &[Curve<'_>]) -> String {
    let (w, h, left, right, top, bottom) = (720.0, 420.0, 70.0, 20.0, 40.0, 50.0);
    let pw = w - left - right;
    let ph = h - top - bottom;
    let all = curves.iter().flat_map(|c| c.sorted_ms.iter().copied());
    let max = all.clone().fold(0.001f64, f64::max);
    let min = all.fold(f64::MAX, f64::min).max(0.01);
    let (lo, hi) = (
        min.log10().floor(),
        max.log10().ceil().max(min.log10().floor() + 1.0),
    );
    let x = |ms: f64| left + (ms.max(0.01).log10() - lo) / (hi - lo) * pw;
    let y = |q: f64| top + (1.0 - q) * ph;
    let mut s = format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">
<rect width="{w}" height="{h}" fill="white"/>
<text x="{}" y="22" text-anchor="middle" font-size="15">{title}</text>
"#,
        w / 2.0
    );
    let mut e = lo;
    while e <= hi {
        let ms = 10f64.powf(e);
        let xx = x(ms);
        s += &format!(
            r##"<line x1="{xx:.1}" y1="{top}" x2="{xx:.1}" y2="{:.1}" stroke="#ddd"/><text x="{xx:.1}" y="{:.1}" text-anchor="middle">{}</text>
"##,
            top + ph,
            top + ph + 18.0,
            if ms < 1.0 {
                format!("{ms}")
            } else {
                format!("{ms:.0}")
            }
        );
        e += 1.0;
    }
    for q in [0.0, 0.25, 0.5, 0.75, 0.9, 0.99, 1.0] {
        s += &format!(
            r##"<line x1="{left}" y1="{:.1}" x2="{:.1}" y2="{:.1}" stroke="#eee"/><text x="{:.1}" y="{:.1}" text-anchor="end">{q}</text>
"##,
            y(q),
            left + pw,
            y(q),
            left - 6.0,
            y(q) + 4.0
        );
    }
    s += &format!(
        r#"<text x="{}" y="{}" text-anchor="middle">latency (ms, log scale)</text>
<text x="16" y="{}" transform="rotate(-90 16 {})" text-anchor="middle">share of samples ≤ x</text>
"#,
        left + pw / 2.0,
        h - 10.0,
        top + ph / 2.0,
        top + ph / 2.0
    );
    for (i, c) in curves.iter().enumerate() {
        let n = c.sorted_ms.len().max(1) as f64;
        let step = (c.sorted_ms.len() / 400).max(1);
        let pts: Vec<String> = c
            .sorted_ms
            .iter()
            .enumerate()
            .filter(|(j, _)| j % step == 0 || *j + 1 == c.sorted_ms.len())
            .map(|(j, &v)| format!("{:.1},{:.1}", x(v), y((j + 1) as f64 / n)))
            .collect();
        s += &line(
            c.color,
            c.label,
            &pts,
            (left + 10.0, top + 16.0 + 16.0 * i as f64),
        );
    }
    s + "</svg>\n"
}

/// The next "round" number at or above `v` (1, 2, 4 or 5 times a power of
/// ten), so axis ticks at quarters read well.
pub fn nice(v: f64) -> f64 {
    let p = 10f64.powf(v.max(1e-9).log10().floor());
    [1.0, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0, 8.0, 10.0]
        .iter()
        .map(|m| m * p)
        .find(|&c| c >= v)
        .unwrap_or(10.0 * p)
}

/// A polyline through `pts` and its legend entry at `legend`.
fn line(color: &str, label: &str, pts: &[String], legend: (f64, f64)) -> String {
    format!(
        r#"<polyline fill="none" stroke="{color}" stroke-width="2" points="{}"/>
<text x="{}" y="{}" fill="{color}">{label}</text>
"#,
        pts.join(" "),
        legend.0,
        legend.1
    )
}

/// One time series: a label and (x, y) points in x order.
pub struct Series<'a> {
    /// Legend text.
    pub label: &'a str,
    /// Points.
    pub points: &'a [(f64, f64)],
    /// Stroke colour.
    pub color: &'a str,
}

/// Renders series on linear axes starting at zero, with vertical markers
/// (x, label) for events such as "backend killed".
pub fn series(
    title: &str,
    x_label: &str,
    y_label: &str,
    lines: &[Series<'_>],
    markers: &[(f64, &str)],
) -> String {
    let (w, h, left, right, top, bottom) = (720.0, 420.0, 70.0, 20.0, 40.0, 50.0);
    let pw = w - left - right;
    let ph = h - top - bottom;
    let pts = lines.iter().flat_map(|l| l.points.iter().copied());
    let x_max = nice(pts.clone().map(|p| p.0).fold(1e-9f64, f64::max));
    let y_max = nice(pts.map(|p| p.1).fold(1e-9f64, f64::max) * 1.05);
    let x = |v: f64| left + v / x_max * pw;
    let y = |v: f64| top + (1.0 - v / y_max) * ph;
    let mut s = format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">
<rect width="{w}" height="{h}" fill="white"/>
<text x="{}" y="22" text-anchor="middle" font-size="15">{title}</text>
"#,
        w / 2.0
    );
    for i in 0..=4 {
        let (xv, yv) = (x_max * f64::from(i) / 4.0, y_max * f64::from(i) / 4.0);
        s += &format!(
            r##"<line x1="{:.1}" y1="{top}" x2="{:.1}" y2="{:.1}" stroke="#eee"/><text x="{:.1}" y="{:.1}" text-anchor="middle">{xv}</text>
<line x1="{left}" y1="{:.1}" x2="{:.1}" y2="{:.1}" stroke="#eee"/><text x="{:.1}" y="{:.1}" text-anchor="end">{yv}</text>
"##,
            x(xv),
            x(xv),
            top + ph,
            x(xv),
            top + ph + 18.0,
            y(yv),
            left + pw,
            y(yv),
            left - 6.0,
            y(yv) + 4.0
        );
    }
    // Labels run up their lines, so close events stay readable.
    for (mx, label) in markers {
        let (lx, ly) = (x(*mx) + 12.0, top + ph - 4.0);
        s += &format!(
            r##"<line x1="{:.1}" y1="{top}" x2="{:.1}" y2="{:.1}" stroke="#999" stroke-dasharray="4 3"/><text x="{lx:.1}" y="{ly:.1}" fill="#666" font-size="11" transform="rotate(-90 {lx:.1} {ly:.1})">{label}</text>
"##,
            x(*mx),
            x(*mx),
            top + ph,
        );
    }
    s += &format!(
        r#"<text x="{}" y="{}" text-anchor="middle">{x_label}</text>
<text x="16" y="{}" transform="rotate(-90 16 {})" text-anchor="middle">{y_label}</text>
"#,
        left + pw / 2.0,
        h - 10.0,
        top + ph / 2.0,
        top + ph / 2.0
    );
    for (i, l) in lines.iter().enumerate() {
        let pts: Vec<String> = l
            .points
            .iter()
            .map(|&(a, b)| format!("{:.1},{:.1}", x(a), y(b)))
            .collect();
        s += &line(
            l.color,
            l.label,
            &pts,
            (left + 10.0, top + 16.0 + 16.0 * i as f64),
        );
    }
    s + "</svg>\n"
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn axes_end_on_round_numbers() {
        assert_eq!(nice(99.0), 100.0);
        assert_eq!(nice(37.0), 40.0);
        assert_eq!(nice(1.0), 1.0);
        assert_eq!(nice(0.7), 0.8);
        assert_eq!(nice(2100.0), 2500.0);
        assert_eq!(nice(59.5), 60.0);
    }

    #[test]
    fn series_draw_every_line_and_marker() {
        let pts = [(0.0, 1.0), (50.0, 3.0), (99.0, 0.0)];
        let svg = series(
            "t",
            "x",
            "y",
            &[
                Series {
                    label: "a",
                    points: &pts,
                    color: "red",
                },
                Series {
                    label: "b",
                    points: &pts,
                    color: "blue",
                },
            ],
            &[(40.0, "killed")],
        );
        assert_eq!(svg.matches("<polyline").count(), 2);
        assert!(svg.contains(">killed</text>") && svg.ends_with("</svg>\n"));
    }
}
