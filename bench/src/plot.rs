//! SVG charts of the bench results (plotters' SVG backend only: no font
//! or image libraries needed on the machine).

use std::path::Path;

use anyhow::{Result, anyhow};
use plotters::{coord::Shift, prelude::*};

/// Distinct series colours (Okabe–Ito, then Tol's muted tones).
const PALETTE: [RGBColor; 11] = [
    RGBColor(0, 114, 178),
    RGBColor(213, 94, 0),
    RGBColor(0, 158, 115),
    RGBColor(204, 121, 167),
    RGBColor(230, 159, 0),
    RGBColor(86, 180, 233),
    RGBColor(0, 0, 0),
    RGBColor(170, 51, 119),
    RGBColor(102, 102, 102),
    RGBColor(153, 153, 51),
    RGBColor(51, 34, 136),
];

pub fn colour(index: usize) -> RGBColor {
    PALETTE[index % PALETTE.len()]
}

/// One curve of a line chart.
pub struct Series {
    pub label: String,
    pub points: Vec<(f64, f64)>,
    /// Index into the palette (same datapath, same colour across charts).
    pub colour: usize,
    /// Drawn dashed (e.g. the second endpoint count of a datapath).
    pub dashed: bool,
    /// Crosses and no line: points that are not measurements (a run
    /// killed at its time limit, drawn at the limit).
    pub crosses: bool,
}

/// Axes of a line chart.
pub struct Axes<'a> {
    pub title: &'a str,
    pub x: &'a str,
    pub y: &'a str,
    pub log_x: bool,
    pub log_y: bool,
    /// How x values are labelled (e.g. [`number`]).
    pub x_label: fn(f64) -> String,
    /// Exact x range and label count (e.g. whole "nines"), instead of
    /// the data's range with plotters' own label spacing.
    pub x_ticks: Option<(f64, f64, usize)>,
}

fn plot_error(error: impl std::fmt::Display) -> anyhow::Error {
    anyhow!("drawing the chart: {error}")
}

/// Writes a line chart of `series` to `path` (points sorted by x; empty
/// series are left out; an axis is logarithmic when asked and all its
/// values are positive).
pub fn lines(path: &Path, axes: &Axes, series: &[Series]) -> Result<()> {
    let values = |pick: fn(&(f64, f64)) -> f64| {
        series
            .iter()
            .flat_map(|s| s.points.iter().map(pick))
            .filter(|v| v.is_finite())
            .collect::<Vec<f64>>()
    };
    let xs = values(|p| p.0);
    let ys = values(|p| p.1);
    if xs.is_empty() {
        return Ok(());
    }
    // Head room above the data (y only) for the legend, upper left.
    let range = |v: &[f64], log: bool, headroom: bool| {
        let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
        let hi = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        if log && lo > 0.0 {
            let room = if headroom {
                (hi / lo).max(10.0).powf(0.45)
            } else {
                1.5
            };
            (lo / 1.5, hi * room, true)
        } else {
            let hi = if hi > lo { hi } else { lo + 1.0 };
            (lo.min(0.0), hi * if headroom { 1.45 } else { 1.05 }, false)
        }
    };
    let (x0, x1, log_x) = match axes.x_ticks {
        Some((lo, hi, _)) => (lo, hi, false),
        None => range(&xs, axes.log_x, false),
    };
    let (y0, y1, log_y) = range(&ys, axes.log_y, true);
    let root = SVGBackend::new(path, (800, 500)).into_drawing_area();
    root.fill(&WHITE).map_err(plot_error)?;
    // plotters types the chart by its coordinate kinds: four shapes.
    match (log_x, log_y) {
        (true, true) => draw_lines(
            &root,
            axes,
            series,
            (x0..x1).log_scale(),
            (y0..y1).log_scale(),
        ),
        (true, false) => draw_lines(&root, axes, series, (x0..x1).log_scale(), y0..y1),
        (false, true) => draw_lines(&root, axes, series, x0..x1, (y0..y1).log_scale()),
        (false, false) => draw_lines(&root, axes, series, x0..x1, y0..y1),
    }?;
    root.present().map_err(plot_error)
}

fn draw_lines<X, Y>(
    root: &DrawingArea<SVGBackend, Shift>,
    axes: &Axes,
    series: &[Series],
    x: X,
    y: Y,
) -> Result<()>
where
    X: plotters::coord::ranged1d::AsRangedCoord<Value = f64>,
    Y: plotters::coord::ranged1d::AsRangedCoord<Value = f64>,
    X::CoordDescType: plotters::coord::ranged1d::ValueFormatter<f64>,
    Y::CoordDescType: plotters::coord::ranged1d::ValueFormatter<f64>,
{
    let mut chart = ChartBuilder::on(root)
        .caption(axes.title, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(45)
        .y_label_area_size(70)
        .build_cartesian_2d(x, y)
        .map_err(plot_error)?;
    chart
        .configure_mesh()
        .x_desc(axes.x)
        .y_desc(axes.y)
        .x_labels(axes.x_ticks.map_or(10, |(_, _, n)| n))
        .x_label_formatter(&|v| (axes.x_label)(*v))
        .y_label_formatter(&|v| number(*v))
        .draw()
        .map_err(plot_error)?;
    for s in series.iter().filter(|s| !s.points.is_empty()) {
        let mut points = s.points.clone();
        points.sort_by(|a, b| a.0.total_cmp(&b.0));
        let colour = colour(s.colour);
        let style = colour.stroke_width(2);
        let legend_dashed = s.dashed;
        if s.crosses {
            chart
                .draw_series(
                    points
                        .iter()
                        .map(|&p| Cross::new(p, 6, colour.stroke_width(2))),
                )
                .map_err(plot_error)?
                .label(&s.label)
                .legend(move |(x, y)| Cross::new((x + 6, y), 4, colour.stroke_width(2)));
            continue;
        }
        if s.dashed {
            chart
                .draw_series(DashedLineSeries::new(points.clone(), 6, 4, style))
                .map_err(plot_error)?;
        } else {
            chart
                .draw_series(LineSeries::new(points.clone(), style))
                .map_err(plot_error)?;
        }
        chart
            .draw_series(points.iter().map(|&p| Circle::new(p, 3, colour.filled())))
            .map_err(plot_error)?
            .label(&s.label)
            .legend(move |(x, y)| {
                if legend_dashed {
                    PathElement::new(vec![(x, y), (x + 8, y)], colour.stroke_width(2))
                } else {
                    PathElement::new(vec![(x, y), (x + 20, y)], colour.stroke_width(2))
                }
            });
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
        .map_err(plot_error)?;
    Ok(())
}

/// An axis label: whole numbers without decimals, small ones with two.
pub fn number(value: f64) -> String {
    if value.abs() >= 100.0 || value == value.trunc() {
        format!("{value:.0}")
    } else if value.abs() >= 1.0 {
        format!("{value:.1}")
    } else {
        format!("{value:.2}")
    }
}

/// One bar: a label, the median and the min–max whisker.
pub struct Bar {
    pub label: String,
    pub median: f64,
    pub min: f64,
    pub max: f64,
}

/// Writes a horizontal bar chart (one bar per row, whiskers min–max) to
/// `path`.
pub fn bars(path: &Path, title: &str, unit: &str, bars: &[Bar]) -> Result<()> {
    if bars.is_empty() {
        return Ok(());
    }
    let top = bars
        .iter()
        .map(|b| b.max.max(b.median))
        .fold(0.0, f64::max)
        .max(f64::MIN_POSITIVE)
        * 1.15;
    let height = 90 + 40 * bars.len() as u32;
    let root = SVGBackend::new(path, (800, height)).into_drawing_area();
    root.fill(&WHITE).map_err(plot_error)?;
    let count = bars.len() as i32;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(250)
        .build_cartesian_2d(0.0..top, (0..count).into_segmented())
        .map_err(plot_error)?;
    // The first bar on top: segment 0 is at the bottom.
    let labels: Vec<String> = bars.iter().rev().map(|b| b.label.clone()).collect();
    let row = |i: usize| count - 1 - i as i32;
    chart
        .configure_mesh()
        .disable_y_mesh()
        .x_desc(unit)
        .x_label_formatter(&|v| number(*v))
        .y_labels(bars.len())
        .y_label_formatter(&|v| match v {
            SegmentValue::CenterOf(i) | SegmentValue::Exact(i) => labels
                .get(usize::try_from(*i).unwrap_or(usize::MAX))
                .cloned()
                .unwrap_or_default(),
            SegmentValue::Last => String::new(),
        })
        .draw()
        .map_err(plot_error)?;
    chart
        .draw_series(bars.iter().enumerate().map(|(i, b)| {
            let mut bar = Rectangle::new(
                [
                    (0.0, SegmentValue::Exact(row(i))),
                    (b.median, SegmentValue::Exact(row(i) + 1)),
                ],
                colour(i).mix(0.8).filled(),
            );
            bar.set_margin(6, 6, 0, 0);
            bar
        }))
        .map_err(plot_error)?;
    chart
        .draw_series(bars.iter().enumerate().map(|(i, b)| {
            PathElement::new(
                vec![
                    (b.min, SegmentValue::CenterOf(row(i))),
                    (b.max, SegmentValue::CenterOf(row(i))),
                ],
                BLACK.stroke_width(2),
            )
        }))
        .map_err(plot_error)?;
    root.present().map_err(plot_error)
}
