//! Charts drawn on the server as inline SVG: no script is needed to see them, and none is
//! allowed (the pages' Content-Security-Policy). Sizes are SVG attributes, never `style`,
//! which the policy forbids inline.

use maud::{Markup, html};

/// A horizontal bar: `value` of `max`, labelled by the caller beside it.
pub fn bar(value: f64, max: f64, class: &str) -> Markup {
    let width = if max > 0.0 {
        (value / max * 100.0).clamp(0.0, 100.0)
    } else {
        0.0
    };
    html! {
        svg.bar viewBox="0 0 100 10" preserveAspectRatio="none" aria-hidden="true" {
            rect.track x="0" y="0" width="100" height="10" {}
            rect class=(class) x="0" y="0" width=(format!("{width:.2}")) height="10" {}
        }
    }
}

/// Two stacked bars against a limit: `first` then `second` (spent, then reserved), and a
/// mark where the limit is when the total goes past it.
pub fn stacked(first: f64, second: f64, limit: Option<f64>) -> Markup {
    let total = first + second;
    let scale = limit.unwrap_or(0.0).max(total);
    let w = |v: f64| {
        if scale > 0.0 {
            (v / scale * 100.0).clamp(0.0, 100.0)
        } else {
            0.0
        }
    };
    let (a, b) = (w(first), w(second));
    let over = limit.is_some_and(|l| total > l);
    html! {
        svg.bar viewBox="0 0 100 10" preserveAspectRatio="none" aria-hidden="true" {
            rect.track x="0" y="0" width="100" height="10" {}
            rect class=(if over { "over" } else { "spent" }) x="0" y="0"
                width=(format!("{a:.2}")) height="10" {}
            rect.reserved x=(format!("{a:.2}")) y="0" width=(format!("{b:.2}")) height="10" {}
            @if let Some(l) = limit.filter(|_| over) {
                rect.limit x=(format!("{:.2}", w(l).min(99.5))) y="0" width="0.5" height="10" {}
            }
        }
    }
}

/// One series of a line chart: its name (CSS class `s-<name>`) and a value a day.
pub struct Series<'a> {
    pub name: &'a str,
    pub values: Vec<i64>,
}

const W: f64 = 720.0;
const H: f64 = 220.0;
const LEFT: f64 = 44.0;
const BOTTOM: f64 = 24.0;
const TOP: f64 = 10.0;

/// A line chart of daily values, with the first, middle and last day named under it.
pub fn lines(labels: &[String], series: &[Series<'_>], title: &str) -> Markup {
    let max = series
        .iter()
        .flat_map(|s| s.values.iter().copied())
        .max()
        .unwrap_or(0)
        .max(1);
    let n = labels.len().max(2);
    let x = |i: usize| LEFT + (W - LEFT - 8.0) * i as f64 / (n - 1) as f64;
    let y = |v: i64| TOP + (H - TOP - BOTTOM) * (1.0 - v as f64 / max as f64);
    html! {
        svg.chart viewBox=(format!("0 0 {W} {H}")) role="img" aria-label=(title) {
            title { (title) }
            @for tick in [0, max / 2, max] {
                line.gridline x1=(LEFT) x2=(W - 8.0) y1=(format!("{:.1}", y(tick))) y2=(format!("{:.1}", y(tick))) {}
                text.axis x=(LEFT - 6.0) y=(format!("{:.1}", y(tick) + 4.0)) text-anchor="end" { (crate::console::format::count(tick)) }
            }
            @for i in label_indexes(labels.len()) {
                text.axis x=(format!("{:.1}", x(i))) y=(H - 6.0) text-anchor=(anchor(i, labels.len())) { (labels[i]) }
            }
            @for s in series {
                polyline class=(format!("line s-{}", s.name)) fill="none"
                    points=(s.values.iter().enumerate().map(|(i, v)| format!("{:.1},{:.1}", x(i), y(*v))).collect::<Vec<_>>().join(" ")) {}
            }
        }
    }
}

/// Vertical bars of daily values (costs by day), amounts as decimals.
pub fn columns(labels: &[String], values: &[f64], title: &str) -> Markup {
    let max = values.iter().copied().fold(0.0_f64, f64::max);
    let scale = if max > 0.0 { max } else { 1.0 };
    let n = values.len().max(1);
    let slot = (W - LEFT - 8.0) / n as f64;
    let y = |v: f64| TOP + (H - TOP - BOTTOM) * (1.0 - v / scale);
    html! {
        svg.chart viewBox=(format!("0 0 {W} {H}")) role="img" aria-label=(title) {
            title { (title) }
            @for tick in [0.0, scale / 2.0, scale] {
                line.gridline x1=(LEFT) x2=(W - 8.0) y1=(format!("{:.1}", y(tick))) y2=(format!("{:.1}", y(tick))) {}
                text.axis x=(LEFT - 6.0) y=(format!("{:.1}", y(tick) + 4.0)) text-anchor="end" { (format!("{tick:.0}")) }
            }
            @for (i, v) in values.iter().enumerate() {
                rect.column x=(format!("{:.1}", LEFT + slot * i as f64 + slot * 0.15))
                    y=(format!("{:.1}", y(*v))) width=(format!("{:.1}", slot * 0.7))
                    height=(format!("{:.1}", (H - BOTTOM) - y(*v))) {
                    title { (labels.get(i).cloned().unwrap_or_default()) ": " (format!("{v:.2}")) }
                }
            }
            @for i in label_indexes(labels.len()) {
                text.axis x=(format!("{:.1}", LEFT + slot * (i as f64 + 0.5))) y=(H - 6.0) text-anchor=(anchor(i, labels.len())) { (labels[i]) }
            }
        }
    }
}

/// Where a label of the x axis hangs from its point: the first from its start and the last
/// from its end, so neither is cut by the chart's edge.
fn anchor(i: usize, n: usize) -> &'static str {
    if i == 0 {
        "start"
    } else if i + 1 == n {
        "end"
    } else {
        "middle"
    }
}

/// The first, middle and last of `n` labels (fewer when there are fewer).
fn label_indexes(n: usize) -> Vec<usize> {
    let mut out = vec![];
    for i in [0, n / 2, n.saturating_sub(1)] {
        if i < n && !out.contains(&i) {
            out.push(i);
        }
    }
    out
}
