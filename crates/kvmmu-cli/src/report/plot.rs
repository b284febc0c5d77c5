//! Bar charts of phase times (one series per configuration), as SVG or PNG, drawn with plotters.
//!
//! Text is rasterised with ab_glyph from a bundled font (DejaVu Sans, Bitstream Vera license,
//! `assets/DejaVu-LICENSE.txt`), so plotting needs no system fonts. A proportional font on
//! purpose: plotters 0.3.7's ab_glyph text drawing places each glyph's ink at the pen position and
//! ignores its left side bearing, which in a monospace font (where narrow glyphs such as `.`, `(`
//! and `-` sit in the middle of a wide cell) shows as `16. 0` and `( vcpus`; a proportional font's
//! bearings are a pixel or so.

use anyhow::{Context, bail};
use plotters::prelude::*;
use plotters::style::{FontStyle, register_font};
use std::path::Path;
use std::sync::Once;

static FONT: &[u8] = include_bytes!("../../assets/DejaVuSans.ttf");
const FAMILY: &str = "kvmmu-sans";
static REGISTER: Once = Once::new();
/// Lines of a category name under its bars, their height, and the width of one character (px).
const LABEL_LINES: usize = 3;
const LINE_PX: u32 = 15;
const CHAR_PX: f64 = 7.5;

/// One series of bars: a configuration and its value per category, in seconds.
#[derive(Clone, Debug)]
pub struct Series {
    /// Legend text.
    pub name: String,
    /// One value per category.
    pub values: Vec<f64>,
}

const COLORS: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
];

/// Draws grouped bars (categories along x, one bar per series in each group, times in ms on y) to
/// `path`; `.svg` or `.png` by extension.
pub fn bars(
    path: &Path,
    title: &str,
    categories: &[String],
    series: &[Series],
) -> anyhow::Result<()> {
    bars_in(path, title, ("ms", 1e3), categories, series)
}

/// [`bars`] with another unit: values are multiplied by `unit.1` and the y axis reads `unit.0`.
pub fn bars_in(
    path: &Path,
    title: &str,
    unit: (&str, f64),
    categories: &[String],
    series: &[Series],
) -> anyhow::Result<()> {
    if categories.is_empty() || series.is_empty() {
        bail!("nothing to plot");
    }
    if series.iter().any(|s| s.values.len() != categories.len()) {
        bail!("every series needs one value per category");
    }
    REGISTER.call_once(|| {
        // A bundled, known-good font: failing to parse it is a build defect, reported by the
        // draw below as a font error.
        let _ = register_font(FAMILY, FontStyle::Normal, FONT);
    });
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase);
    let width = (200 * categories.len() as u32).clamp(640, 2000);
    let size = (width, 520);
    match ext.as_deref() {
        Some("svg") => draw(
            SVGBackend::new(path, size).into_drawing_area(),
            title,
            unit,
            categories,
            series,
        ),
        Some("png") => draw(
            BitMapBackend::new(path, size).into_drawing_area(),
            title,
            unit,
            categories,
            series,
        ),
        _ => bail!("--plot: {} must end in .svg or .png", path.display()),
    }
    .with_context(|| format!("drawing {}", path.display()))
}

fn draw<DB: DrawingBackend>(
    root: DrawingArea<DB, plotters::coord::Shift>,
    title: &str,
    (unit, scale): (&str, f64),
    categories: &[String],
    series: &[Series],
) -> anyhow::Result<()>
where
    DB::ErrorType: 'static,
{
    let err = |e: DrawingAreaErrorKind<DB::ErrorType>| anyhow::anyhow!("{e:?}");
    root.fill(&WHITE).map_err(err)?;
    let ymax = series
        .iter()
        .flat_map(|s| s.values.iter())
        .fold(0.0f64, |a, v| a.max(v * scale))
        .max(1e-3)
        * 1.3;
    let n = categories.len() as f64;
    // The title on one line: smaller type for a long one (a glyph is at most ~0.6 em wide on average).
    let width_px = f64::from(root.dim_in_pixel().0);
    let title_px = ((width_px - 24.0) / (title.chars().count() as f64 * 0.6)).clamp(10.0, 20.0);
    let mut chart = ChartBuilder::on(&root)
        .caption(title, (FAMILY, title_px))
        .margin(12)
        .x_label_area_size(LABEL_LINES as u32 * LINE_PX + 8)
        .y_label_area_size(70)
        .build_cartesian_2d(0.0..n, 0.0..ymax)
        .map_err(err)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .disable_x_axis()
        .y_desc(unit)
        .label_style((FAMILY, 13))
        .draw()
        .map_err(err)?;
    let w = 0.8 / series.len() as f64;
    for (j, s) in series.iter().enumerate() {
        let color = COLORS[j % COLORS.len()];
        chart
            .draw_series(s.values.iter().enumerate().map(|(i, v)| {
                let x0 = i as f64 + 0.1 + j as f64 * w;
                Rectangle::new([(x0, 0.0), (x0 + w * 0.92, v * scale)], color.filled())
            }))
            .map_err(err)?
            .label(s.name.clone())
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 10, y + 5)], color.filled()));
    }
    // Each category's name under its group of bars, centred, wrapped to the group's width.
    let (px, _) = chart.plotting_area().get_pixel_range();
    let group_px = (px.end - px.start) as f64 / n;
    let per_line = ((group_px / CHAR_PX) as usize).max(6);
    let label_style =
        TextStyle::from((FAMILY, 12).into_font()).pos(plotters::style::text_anchor::Pos::new(
            plotters::style::text_anchor::HPos::Center,
            plotters::style::text_anchor::VPos::Top,
        ));
    for (i, c) in categories.iter().enumerate() {
        let (x, y) = chart.backend_coord(&(i as f64 + 0.5, 0.0));
        let lines = super::table::wrap(c, "", "", per_line);
        for (k, line) in lines.lines().take(LABEL_LINES).enumerate() {
            root.draw_text(line, &label_style, (x, y + 6 + k as i32 * LINE_PX as i32))
                .map_err(err)?;
        }
    }
    let legend_at = SeriesLabelPosition::UpperRight;
    chart
        .configure_series_labels()
        .position(legend_at)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .label_font((FAMILY, 13))
        .draw()
        .map_err(err)?;
    root.present().map_err(err)?;
    Ok(())
}
