//! Latency over time as an SVG, one dot per completed operation (green ok, red fail, orange
//! info), fault windows shaded and labelled, as Jepsen draws them.

use std::fmt::Write;

use crate::history::{Kind, Op};
use crate::nemesis::Window;

const W: f64 = 1100.0;
const H: f64 = 420.0;
const L: f64 = 60.0;
const R: f64 = 20.0;
const T: f64 = 30.0;
const B: f64 = 40.0;

pub fn latency_svg(ops: &[Op], windows: &[Window], title: &str) -> String {
    let end_ns = ops
        .iter()
        .filter_map(|o| o.complete.map(|c| c.time_ns))
        .chain(windows.iter().map(|w| w.end_ns))
        .max()
        .unwrap_or(1)
        .max(1);
    let secs = end_ns as f64 / 1e9;
    // Log scale from 0.1 ms to the slowest operation (at least 10 s).
    let max_ms = ops
        .iter()
        .filter_map(|o| {
            o.complete
                .map(|c| (c.time_ns - o.invoke.time_ns) as f64 / 1e6)
        })
        .fold(10_000.0f64, f64::max);
    let (lo, hi) = (0.1f64.log10(), max_ms.log10());
    let x = |t_ns: u64| L + (t_ns as f64 / 1e9) / secs * (W - L - R);
    let y = |ms: f64| {
        let v = ms.max(0.1).log10();
        T + (1.0 - (v - lo) / (hi - lo)) * (H - T - B)
    };
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="11">"#
    );
    let _ = writeln!(s, r#"<rect width="{W}" height="{H}" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="{L}" y="18" font-size="13">{}</text>"#,
        escape(title)
    );
    for w in windows {
        let (x0, x1) = (x(w.start_ns), x(w.end_ns));
        let _ = writeln!(
            s,
            r##"<rect x="{x0:.1}" y="{T}" width="{:.1}" height="{:.1}" fill="#888" fill-opacity="0.18"><title>{}: {}</title></rect>"##,
            (x1 - x0).max(1.0),
            H - T - B,
            escape(&w.fault),
            escape(&w.detail)
        );
        let _ = writeln!(
            s,
            r##"<text x="{:.1}" y="{}" fill="#444" font-size="9">{}</text>"##,
            x0 + 2.0,
            T + 10.0,
            escape(&w.fault)
        );
    }
    // Axes and ticks.
    let _ = writeln!(
        s,
        r#"<line x1="{L}" y1="{}" x2="{}" y2="{}" stroke="black"/><line x1="{L}" y1="{T}" x2="{L}" y2="{}" stroke="black"/>"#,
        H - B,
        W - R,
        H - B,
        H - B
    );
    let mut ms = 0.1;
    while ms <= max_ms * 1.0001 {
        let yy = y(ms);
        let _ = writeln!(
            s,
            r##"<line x1="{L}" y1="{yy:.1}" x2="{}" y2="{yy:.1}" stroke="#ddd"/><text x="{}" y="{:.1}" text-anchor="end">{ms} ms</text>"##,
            W - R,
            L - 4.0,
            yy + 4.0
        );
        ms *= 10.0;
    }
    let step = (secs / 10.0).ceil().max(1.0);
    let mut t = 0.0;
    while t <= secs {
        let xx = L + t / secs * (W - L - R);
        let _ = writeln!(
            s,
            r#"<text x="{xx:.1}" y="{}" text-anchor="middle">{t}s</text>"#,
            H - B + 14.0
        );
        t += step;
    }
    let _ = writeln!(
        s,
        r#"<text x="{}" y="{}" text-anchor="middle">time since start</text>"#,
        (W + L) / 2.0,
        H - 6.0
    );
    for o in ops {
        let Some(c) = o.complete else { continue };
        let color = match c.kind {
            Kind::Ok => "#2a9d3f",
            Kind::Fail => "#d62828",
            _ => "#f4a261",
        };
        let ms = (c.time_ns - o.invoke.time_ns) as f64 / 1e6;
        let _ = writeln!(
            s,
            r#"<circle cx="{:.1}" cy="{:.1}" r="1.6" fill="{color}" fill-opacity="0.7"/>"#,
            x(c.time_ns),
            y(ms)
        );
    }
    s.push_str("</svg>\n");
    s
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::history::{pair, Event, F};

    #[test]
    fn draws_ops_and_windows() {
        let mut a = Event::new(1, Kind::Invoke, F::Read, 1_000_000);
        a.key = Some("k".into());
        let mut b = a.clone();
        b.kind = Kind::Info;
        b.time_ns = 2_000_000_000;
        let ev = vec![a, b];
        let ops = pair(&ev).unwrap();
        let w = Window {
            fault: "kill".into(),
            detail: "killed <1>".into(),
            start_ns: 500_000_000,
            end_ns: 1_500_000_000,
            leader_changes: None,
            terms: None,
            isolated_terms: None,
            stall_after_heal_ms: None,
        };
        let svg = latency_svg(&ops, &[w], "t");
        assert!(svg.starts_with("<svg"));
        assert!(svg.contains("#f4a261"), "info dot drawn");
        assert!(svg.contains("killed &lt;1&gt;"), "detail escaped");
        assert!(svg.trim_end().ends_with("</svg>"));
    }
}
