//! Small server-rendered SVG line charts (no script, no inline style: the CSP
//! allows them as they are).

/// A line chart of `points` (x label, y value), newest last, with the y axis
/// labelled by `fmt`. Labels and values come from dbops' own numbers and dates, and
/// are escaped anyway.
pub fn line(title: &str, points: &[(String, f64)], fmt: impl Fn(f64) -> String) -> String {
    const W: f64 = 640.0;
    const H: f64 = 180.0;
    const L: f64 = 70.0;
    const B: f64 = 28.0;
    const T: f64 = 12.0;
    let esc = |s: &str| {
        s.replace('&', "&amp;")
            .replace('<', "&lt;")
            .replace('>', "&gt;")
            .replace('"', "&quot;")
    };
    if points.is_empty() {
        return format!("<p class=\"empty\">No data for “{}” yet.</p>", esc(title));
    }
    let max = points.iter().map(|p| p.1).fold(0.0f64, f64::max).max(1e-9);
    let n = points.len();
    let x = |i: usize| {
        if n == 1 {
            L + (W - L) / 2.0
        } else {
            L + (W - L - 10.0) * i as f64 / (n - 1) as f64
        }
    };
    let y = |v: f64| T + (H - T - B) * (1.0 - v / max);
    let mut svg = format!(
        "<svg class=\"chart\" viewBox=\"0 0 {W} {H}\" role=\"img\" aria-label=\"{}\"><title>{}</title>",
        esc(title),
        esc(title)
    );
    for frac in [0.0, 0.5, 1.0] {
        let v = max * frac;
        let yy = y(v);
        svg.push_str(&format!(
            "<line class=\"grid\" x1=\"{L}\" x2=\"{W}\" y1=\"{yy:.1}\" y2=\"{yy:.1}\"/><text class=\"axis\" x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>",
            L - 6.0,
            yy + 4.0,
            esc(&fmt(v))
        ));
    }
    let path: Vec<String> = points
        .iter()
        .enumerate()
        .map(|(i, p)| format!("{:.1},{:.1}", x(i), y(p.1)))
        .collect();
    svg.push_str(&format!(
        "<polyline class=\"line\" points=\"{}\"/>",
        path.join(" ")
    ));
    for (i, p) in points.iter().enumerate() {
        svg.push_str(&format!(
            "<circle class=\"dot\" cx=\"{:.1}\" cy=\"{:.1}\" r=\"3\"><title>{}: {}</title></circle>",
            x(i),
            y(p.1),
            esc(&p.0),
            esc(&fmt(p.1))
        ));
    }
    let label_every = n.div_ceil(6).max(1);
    for (i, p) in points.iter().enumerate() {
        if i % label_every == 0 || i == n - 1 {
            svg.push_str(&format!(
                "<text class=\"axis\" x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}</text>",
                x(i),
                H - 8.0,
                esc(&p.0)
            ));
        }
    }
    svg.push_str("</svg>");
    svg
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_chart_has_one_dot_per_point_and_escapes_labels() {
        let svg = super::line("size <x>", &[("a".into(), 1.0), ("<b>".into(), 3.0)], |v| {
            format!("{v}")
        });
        assert_eq!(svg.matches("<circle").count(), 2);
        assert!(!svg.contains("<b>") && svg.contains("&lt;b&gt;"));
        assert!(super::line("t", &[], |v| v.to_string()).contains("No data"));
    }
}
