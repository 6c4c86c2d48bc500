//! Latency CDFs as a standalone SVG, drawn with `plotters`.
//!
//! `plotters` is built without its font features: its SVG backend writes text
//! as `<text>` elements that the viewer renders, so no font file is needed,
//! and layout uses a crude width estimate.

use std::path::{Path, PathBuf};

use plotters::prelude::*;

/// Width of the SVG in pixels.
const WIDTH: u32 = 1000;
/// Height of the SVG in pixels.
const HEIGHT: u32 = 600;
/// x range drawn when no curve has a point to plot.
const EMPTY_X_RANGE: (f64, f64) = (1.0, 1000.0);
/// Line colours, picked in turn; past the end, `Palette99` takes over.
const COLOURS: [RGBColor; 8] = [
    RGBColor(31, 119, 180),
    RGBColor(214, 39, 40),
    RGBColor(44, 160, 44),
    RGBColor(255, 127, 14),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(23, 190, 207),
];

/// One curve: a label and (latency in ns, cumulative fraction in 0..=1) points, sorted by latency.
#[derive(Debug, Clone, PartialEq)]
pub struct Curve {
    /// Legend text for this curve.
    pub label: String,
    /// (latency in ns, cumulative fraction in 0..=1), sorted by latency.
    pub points: Vec<(f64, f64)>,
}

/// Why a CDF plot could not be written.
#[derive(Debug, thiserror::Error)]
pub enum PlotError {
    /// plotters failed while laying out or drawing the chart.
    #[error("cannot draw the plot for {}: {message}", path.display())]
    Draw {
        /// The SVG file that was to be written.
        path: PathBuf,
        /// What plotters reported.
        message: String,
    },
    /// The finished SVG could not be written to its file.
    #[error("cannot write plot {}: {source}", path.display())]
    Write {
        /// The SVG file that was to be written.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
}

/// Writes an SVG (about 1000x600) to `path`: title, x axis "latency (ns, log scale)" logarithmic, y axis "fraction of
/// calls ≤ x" 0..1, one coloured line per curve, a legend with the labels. Empty curves are skipped; points with
/// x <= 0 (or a coordinate that is not finite) are dropped. x range from the smallest to the largest x over all
/// curves (padded a little); with no point at all, the axes are drawn over 1..1000 ns.
///
/// The SVG is rendered in memory first, so a failed write leaves no partial file behind it.
pub fn write_cdf_svg(path: &Path, title: &str, curves: &[Curve]) -> Result<(), PlotError> {
    let svg = render_cdf_svg(title, curves).map_err(|message| PlotError::Draw { path: path.to_path_buf(), message })?;
    std::fs::write(path, svg).map_err(|source| PlotError::Write { path: path.to_path_buf(), source })
}

/// The points of `curve` that a log-x plot can show.
fn plottable(curve: &Curve) -> Vec<(f64, f64)> {
    curve.points.iter().copied().filter(|&(x, y)| x.is_finite() && y.is_finite() && x > 0.0).collect()
}

/// The padded x range over all plottable points.
fn x_range(curves: &[(&str, Vec<(f64, f64)>)]) -> (f64, f64) {
    let mut lo = f64::INFINITY;
    let mut hi = f64::NEG_INFINITY;
    for (x, _) in curves.iter().flat_map(|(_, pts)| pts.iter()) {
        lo = lo.min(*x);
        hi = hi.max(*x);
    }
    if lo > hi {
        return EMPTY_X_RANGE;
    }
    // Multiplicative padding suits a log axis; a single x still gets a visible span.
    if hi / lo < 1.5 {
        (lo / 1.5, hi * 1.5)
    } else {
        (lo / 1.1, hi * 1.1)
    }
}

/// Labelled and light grid positions for a log axis over `lo..=hi` (`0 < lo < hi`).
///
/// plotters' own log key points start at the first power of ten inside the range, which leaves a range like
/// 40..100 with a single label; here the labels are the powers of ten, or 1-2-5 steps, or every 1..9 step of each
/// decade, whichever is the first to give at least 4 labels. Light lines go on the other 1..9 steps.
fn log_ticks(lo: f64, hi: f64) -> (Vec<f64>, Vec<f64>) {
    const DENSITIES: [&[f64]; 3] = [&[1.0], &[1.0, 2.0, 5.0], &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0]];
    let steps = |mantissas: &[f64]| -> Vec<f64> {
        let mut out = Vec::new();
        if !(lo > 0.0 && hi >= lo && hi.is_finite()) {
            return out;
        }
        // Start at the power of ten at or below `lo`.
        let mut exp: i32 = 0;
        while 10f64.powi(exp) > lo && exp > -300 {
            exp -= 1;
        }
        while 10f64.powi(exp + 1) <= lo && exp < 300 {
            exp += 1;
        }
        while 10f64.powi(exp) <= hi && exp <= 300 {
            // Dividing by 10^-exp keeps 0.6 exact where 6 * 0.1 is not.
            let at = |m: &f64| if exp >= 0 { m * 10f64.powi(exp) } else { m / 10f64.powi(-exp) };
            out.extend(mantissas.iter().map(at).filter(|v| (lo..=hi).contains(v)));
            exp += 1;
        }
        out
    };
    let bold = DENSITIES.iter().map(|m| steps(m)).find(|t| t.len() >= 4).unwrap_or_else(|| steps(DENSITIES[2]));
    let light = steps(DENSITIES[2]).into_iter().filter(|v| !bold.contains(v)).collect();
    (bold, light)
}

/// Colour of the `i`-th curve.
fn colour(i: usize) -> RGBColor {
    match COLOURS.get(i) {
        Some(c) => *c,
        None => {
            let (r, g, b) = Palette99::pick(i).rgb();
            RGBColor(r, g, b)
        }
    }
}

/// Renders the chart into an SVG string; errors are plotters' messages.
fn render_cdf_svg(title: &str, curves: &[Curve]) -> Result<String, String> {
    let curves: Vec<(&str, Vec<(f64, f64)>)> =
        curves.iter().map(|c| (c.label.as_str(), plottable(c))).filter(|(_, pts)| !pts.is_empty()).collect();
    let (x_lo, x_hi) = x_range(&curves);
    let (bold_ticks, light_ticks) = log_ticks(x_lo, x_hi);

    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (WIDTH, HEIGHT)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| e.to_string())?;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 28))
            .margin(15)
            .x_label_area_size(50)
            .y_label_area_size(70)
            .build_cartesian_2d(
                (x_lo..x_hi).log_scale().with_key_points(bold_ticks).with_light_points(light_ticks),
                0.0f64..1.0f64,
            )
            .map_err(|e| e.to_string())?;
        chart
            .configure_mesh()
            .x_desc("latency (ns, log scale)")
            .y_desc("fraction of calls ≤ x")
            .axis_desc_style(("sans-serif", 18))
            .label_style(("sans-serif", 15))
            .x_label_formatter(&|x| format_ns(*x))
            .y_label_formatter(&|y| format!("{y:.1}"))
            .y_max_light_lines(2)
            .draw()
            .map_err(|e| e.to_string())?;

        for (i, (label, points)) in curves.iter().enumerate() {
            let c = colour(i);
            chart
                .draw_series(LineSeries::new(points.iter().copied(), c.stroke_width(2)))
                .map_err(|e| e.to_string())?
                .label(*label)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(2)));
        }
        if !curves.is_empty() {
            chart
                .configure_series_labels()
                .position(SeriesLabelPosition::LowerRight)
                .background_style(WHITE.mix(0.85))
                .border_style(BLACK)
                .label_font(("sans-serif", 16))
                .draw()
                .map_err(|e| e.to_string())?;
        }
        root.present().map_err(|e| e.to_string())?;
    }
    Ok(svg)
}

/// A tick label for a latency in ns: up to 3 significant digits below 10^6, else in powers of ten ("2.5e6").
fn format_ns(x: f64) -> String {
    if x >= 1e6 {
        let exp = x.log10().floor();
        format!("{}e{exp}", trim(x / 10f64.powf(exp)))
    } else {
        trim(x)
    }
}

/// `x` with at most 3 significant digits below 1000 (whole numbers above) and no trailing zeros.
fn trim(x: f64) -> String {
    let s = if x >= 100.0 {
        format!("{x:.0}")
    } else if x >= 10.0 {
        format!("{x:.1}")
    } else {
        format!("{x:.2}")
    };
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_path(tag: &str) -> PathBuf {
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
        std::env::temp_dir().join(format!("sidecore-plot-{tag}-{}-{nanos}.svg", std::process::id()))
    }

    fn cdf(label: &str, lo: f64, n: u32) -> Curve {
        let points = (1..=n).map(|i| (lo * f64::from(i), f64::from(i) / f64::from(n))).collect();
        Curve { label: label.to_string(), points }
    }

    #[test]
    fn writes_svg_with_title_and_labels() {
        let path = temp_path("ok");
        let curves = vec![
            cdf("sidecall", 60.0, 50),
            cdf("kernel & exit <pio>", 900.0, 50),
            Curve { label: "empty".to_string(), points: vec![] },
            Curve { label: "floor".to_string(), points: vec![(0.0, 0.1), (-3.0, 0.2), (55.0, 0.5), (70.0, 1.0)] },
        ];
        write_cdf_svg(&path, "null op latency CDF", &curves).unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        assert!(svg.starts_with("<svg"), "{}", &svg[..svg.len().min(200)]);
        assert!(svg.contains("null op latency CDF"));
        assert!(svg.contains("latency (ns, log scale)"));
        assert!(svg.contains("fraction of calls ≤ x"));
        assert!(svg.contains("sidecall"));
        assert!(svg.contains("kernel &amp; exit &lt;pio&gt;"));
        assert!(svg.contains("floor"));
        // Skipped curves get no legend entry.
        assert!(!svg.contains(">empty<"));
    }

    #[test]
    fn writes_svg_with_no_points() {
        let path = temp_path("empty");
        let curves = vec![Curve { label: "nothing".to_string(), points: vec![(0.0, 1.0)] }];
        write_cdf_svg(&path, "no data", &curves).unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        assert!(svg.starts_with("<svg"));
        assert!(svg.contains("no data"));
    }

    #[test]
    fn unwritable_path_names_the_file() {
        let path = Path::new("/nonexistent-dir/x.svg");
        let err = write_cdf_svg(path, "t", &[cdf("a", 10.0, 5)]).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, PlotError::Write { .. }), "{err:?}");
        assert!(msg.contains("/nonexistent-dir/x.svg"), "{msg}");
        assert!(!path.exists());
    }

    #[test]
    fn x_range_is_padded_and_positive() {
        let (lo, hi) = x_range(&[("a", vec![(100.0, 0.5), (1000.0, 1.0)])]);
        assert!(lo > 0.0 && lo < 100.0 && hi > 1000.0);
        let (lo, hi) = x_range(&[("a", vec![(50.0, 1.0)])]);
        assert!(lo < 50.0 && hi > 50.0);
        assert_eq!(x_range(&[]), EMPTY_X_RANGE);
    }

    #[test]
    fn log_ticks_label_narrow_and_wide_ranges() {
        let (bold, light) = log_ticks(36.7, 107.0);
        assert_eq!(bold, vec![40.0, 50.0, 60.0, 70.0, 80.0, 90.0, 100.0]);
        assert!(light.is_empty());
        let (bold, light) = log_ticks(45.0, 5000.0);
        assert_eq!(bold, vec![50.0, 100.0, 200.0, 500.0, 1000.0, 2000.0, 5000.0]);
        assert!(light.contains(&60.0) && light.contains(&3000.0) && !light.contains(&100.0));
        let (bold, _) = log_ticks(3.0, 4e7);
        assert_eq!(bold, vec![10.0, 100.0, 1e3, 1e4, 1e5, 1e6, 1e7]);
        let (bold, _) = log_ticks(0.5, 2.0);
        assert_eq!(bold, vec![0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 2.0]);
    }

    #[test]
    fn tick_labels() {
        assert_eq!(format_ns(60.0), "60");
        assert_eq!(format_ns(1500.0), "1500");
        assert_eq!(format_ns(25_000.0), "25000");
        assert_eq!(format_ns(2_500_000.0), "2.5e6");
        assert_eq!(format_ns(1e7), "1e7");
        assert_eq!(format_ns(62.5), "62.5");
        assert_eq!(format_ns(3.0), "3");
    }
}
